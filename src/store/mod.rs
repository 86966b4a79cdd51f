//! The sled adapter: one database per instance, one tree per shard.
//!
//! A shard worker collects a whole fetched batch in a [`ShardWrite`] overlay (later messages
//! in the batch see earlier ones), commits it with one atomic `apply_batch`, and then asks the
//! [`GroupFlusher`] to make it durable; only then are the messages acked.
//!
//! The room: this file (the database: open, meta, shards), `shard.rs` (one shard's tree:
//! reads, digests, the outbox, the sweep, export and restore), `write.rs` (the batch overlay),
//! `keys.rs`, `codec.rs`, `export.rs`, `flusher.rs`,
//! `reshard.rs`.

pub mod codec;
mod export;
mod flusher;
pub mod keys;
mod reshard;
mod shard;
mod write;

use std::path::Path;

use crate::config::ConfigError;
use crate::domain::{AlarmRecord, StatusChange};
pub use codec::{CodecError, OutboxEntry};
pub use export::{Encoder, ExportError, Header, ShardExport, StreamDecoder};
pub use flusher::GroupFlusher;
pub use reshard::{reshard, ReshardError, RESHARD_SOURCE};
pub use shard::{Applied, RefusedPart, RestoreWriter, ShardStore};
pub use write::{QueuedPart, ShardWrite};

const META_SHARD_COUNT: &[u8] = b"shards.count";
const META_INSTANCE_ID: &[u8] = b"instance.id";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the data dir {path}: {source} (is another instance using it, or is it not writable?)")]
    Open { path: String, source: sled::Error },
    #[error("flushing the data dir failed: {0}")]
    Flush(String),
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored value under {key}: {source}")]
    Codec { key: String, source: CodecError },
    /// The data dir was written for another shard count; the process exits 64.
    #[error("{0}")]
    Config(#[from] ConfigError),
}

impl StoreError {
    fn codec(key: &[u8], source: CodecError) -> StoreError {
        StoreError::Codec {
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        }
    }
}

/// The instance's sled database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    failing: DataDirHealth,
}

/// Whether the data dir's last write or flush failed (a full or broken disk), shared by the
/// instance's [`Store`] and its [`ShardStore`]s. sled 0.34 splits nodes lazily, during reads
/// too, and on a full disk such a read retries its split for ever: whoever would only read
/// the whole tree (a snapshot) asks this first.
#[derive(Clone, Default)]
struct DataDirHealth(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl DataDirHealth {
    fn set(&self, failing: bool) {
        self.0.store(failing, std::sync::atomic::Ordering::Relaxed);
    }

    fn failing(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Store {
    /// Opens the data dir. sled lets go of its lock from a background thread once the last
    /// handle of a previous open is dropped, so opening again right after closing in the same
    /// process (tests, `inspect` after a stop) can find it still held for a moment: that is
    /// retried for up to 3 s. Another process holding it fails after that, with the error.
    pub fn open(path: &Path, cache_capacity_mb: u64) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let opened = sled::Config::new()
                .path(path)
                .cache_capacity(cache_capacity_mb.saturating_mul(1024 * 1024))
                .open();
            match opened {
                Ok(db) => {
                    return Ok(Store {
                        db,
                        failing: DataDirHealth::default(),
                    })
                }
                Err(source)
                    if source.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// Records the shard count on first start and refuses a different one later: a changed
    /// count would route users to shards that do not hold their alarms.
    pub fn check_shard_count(&self, configured: u16) -> Result<(), StoreError> {
        let configured_bytes = configured.to_be_bytes();
        match self.db.compare_and_swap(
            META_SHARD_COUNT,
            None as Option<&[u8]>,
            Some(&configured_bytes[..]),
        )? {
            Ok(()) => {
                self.db.flush()?;
                Ok(())
            }
            Err(existing) => {
                let stored = existing
                    .current
                    .and_then(|v| <[u8; 2]>::try_from(v.as_ref()).ok())
                    .map(u16::from_be_bytes)
                    .unwrap_or(0);
                if stored == configured {
                    Ok(())
                } else {
                    Err(ConfigError::DataDirShardCount { stored, configured }.into())
                }
            }
        }
    }

    /// This data dir's identity, created on first use. The cluster records it as the home
    /// of the shards whose state lives here; it travels with a copy of the directory, which
    /// is why leases (not the id) keep two copies from applying a shard at once.
    pub fn instance_id(&self) -> Result<String, StoreError> {
        let fresh = format!("{:032x}", rand::random::<u128>());
        match self.db.compare_and_swap(
            META_INSTANCE_ID,
            None as Option<&[u8]>,
            Some(fresh.as_bytes()),
        )? {
            Ok(()) => {
                self.db.flush()?;
                Ok(fresh)
            }
            Err(existing) => Ok(existing
                .current
                .map(|id| String::from_utf8_lossy(&id).into_owned())
                .unwrap_or(fresh)),
        }
    }

    /// The shard's whole tree, for `alarm-digest shard export`.
    pub fn export_shard(&self, shard: u16, count: u16) -> Result<ShardExport, StoreError> {
        self.shard(shard)?.export(count, self.instance_id()?)
    }

    /// Replaces the shard's tree with an export's entries, atomically, and flushes.
    pub fn import_shard(&self, export: &ShardExport) -> Result<(), StoreError> {
        self.shard(export.shard)?.replace(export)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn shard(&self, shard: u16) -> Result<ShardStore, StoreError> {
        let tree = self.db.open_tree(shard_tree_name(shard))?;
        let mut store = ShardStore {
            shard,
            tree,
            failing: self.failing.clone(),
            epoch: 0,
            next_outbox: 0,
            applied: 0,
        };
        store.load_meta()?;
        Ok(store)
    }

    /// Makes every applied batch durable. Called by the [`GroupFlusher`] and at shutdown.
    pub fn flush(&self) -> Result<usize, StoreError> {
        let flushed = self.db.flush();
        self.failing.set(flushed.is_err());
        Ok(flushed?)
    }

    /// Everything stored about one user, for `alarm-digest inspect`.
    pub fn inspect_user(&self, shard: u16, user_id: &str) -> Result<StoredUser, StoreError> {
        let store = self.shard(shard)?;
        Ok(StoredUser {
            alarms: store.user_alarms(user_id)?,
            pending_digests: store.tree.scan_prefix([keys::OUTBOX]).count(),
        })
    }
}

/// One user's alarms as stored, in AlarmID order, and the shard's unpublished digest parts.
pub struct StoredUser {
    pub alarms: Vec<(String, AlarmRecord)>,
    pub pending_digests: usize,
}

fn shard_tree_name(shard: u16) -> String {
    format!("shard/{shard}")
}

fn read_u64(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests;

/// ARCHITECTURE.md's invariant, checked: the store keeps bytes and domain values; choosing a
/// digest and rendering JSON belong to the worker (`domain`, `wire`), the bus to `bus/`.
#[cfg(test)]
#[test]
fn the_store_knows_no_json_no_wire_and_no_bus() {
    let sources = [
        ("mod.rs", include_str!("mod.rs")),
        ("codec.rs", include_str!("codec.rs")),
        ("export.rs", include_str!("export.rs")),
        ("flusher.rs", include_str!("flusher.rs")),
        ("keys.rs", include_str!("keys.rs")),
        ("reshard.rs", include_str!("reshard.rs")),
        ("shard.rs", include_str!("shard.rs")),
        ("write.rs", include_str!("write.rs")),
        ("tests.rs", include_str!("tests.rs")),
    ];
    // Written in halves, so this test's own lines do not name what they look for.
    let forbidden = [
        ["serde", "_json"],
        ["crate::", "wire"],
        ["crate::", "bus"],
        ["async", "_nats"],
    ]
    .map(|halves| halves.concat());
    for (file, source) in sources {
        let code = source
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"));
        for line in code {
            for name in &forbidden {
                assert!(!line.contains(name), "store/{file} uses {name}: {line}");
            }
        }
    }
}
