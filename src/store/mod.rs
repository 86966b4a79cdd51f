//! The sled adapter: one database per instance, one tree per shard.
//!
//! A shard worker collects a whole fetched batch in a [`ShardWrite`] overlay (later messages
//! in the batch see earlier ones), commits it with one atomic `apply_batch`, and then asks the
//! [`GroupFlusher`] to make it durable; only then are the messages acked.

pub mod codec;
mod export;
mod flusher;
pub mod keys;
mod reshard;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use crate::domain::{self, AlarmRecord, StatusChange};
use crate::wire;
pub use codec::{CodecError, OutboxEntry};
pub use export::{Encoder, ExportError, Header, ShardExport, StreamDecoder};
pub use flusher::GroupFlusher;
pub use reshard::{reshard, ReshardError, RESHARD_SOURCE};

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
    #[error(
        "this data dir holds {stored} shards but shards.count is {configured}; shards.count \
         must not change in place: set it back to {stored}, or migrate to the new count with \
         `shard export`, `shard reshard`, `shard recount` and `shard import` into a fresh data \
         dir (README, 'Changing shards.count')"
    )]
    ShardCountMismatch { stored: u16, configured: u16 },
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
                    Err(StoreError::ShardCountMismatch { stored, configured })
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
    pub fn inspect_user(&self, shard: u16, user_id: &str) -> Result<UserReport, StoreError> {
        let store = self.shard(shard)?;
        let alarms = store
            .user_alarms(user_id)?
            .into_iter()
            .map(|(alarm_id, record)| AlarmReport::new(alarm_id, &record))
            .collect();
        Ok(UserReport {
            user_id: user_id.to_string(),
            shard,
            alarms,
            pending_digests: store.tree.scan_prefix([keys::OUTBOX]).count(),
        })
    }
}

fn shard_tree_name(shard: u16) -> String {
    format!("shard/{shard}")
}

fn read_u64(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// What `inspect user` prints.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct UserReport {
    pub user_id: String,
    pub shard: u16,
    pub alarms: Vec<AlarmReport>,
    /// Digests of this shard (any user) stored but not yet acknowledged by JetStream.
    pub pending_digests: usize,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AlarmReport {
    pub alarm_id: String,
    pub status: String,
    pub changed_at: String,
    pub sent_status: Option<String>,
    pub sent_changed_at: Option<String>,
    pub changed_since_sent: bool,
    pub due: bool,
}

impl AlarmReport {
    fn new(alarm_id: String, record: &AlarmRecord) -> AlarmReport {
        AlarmReport {
            alarm_id,
            status: record.current.status.as_str().into(),
            changed_at: wire::format_time(&record.current.changed_at),
            sent_status: record.sent.map(|s| s.status.as_str().into()),
            sent_changed_at: record.sent.map(|s| wire::format_time(&s.changed_at)),
            changed_since_sent: record.changed_since_sent,
            due: record.is_due(),
        }
    }
}

/// One shard's tree. Owned by exactly one shard worker, which is its only writer.
pub struct ShardStore {
    shard: u16,
    tree: sled::Tree,
    failing: DataDirHealth,
    epoch: u64,
    next_outbox: u64,
    /// The shard stream sequence the tree reflects ([`keys::META_APPLIED`]).
    applied: u64,
}

/// Writes a snapshot's entries into a shard tree during a restore (see
/// [`ShardStore::restore_writer`]); `Send`, so sled's synchronous writes run off the runtime.
#[derive(Clone)]
pub struct RestoreWriter {
    tree: sled::Tree,
}

impl RestoreWriter {
    /// Writes restored entries. The applied sequence is left out: it is set by
    /// [`ShardStore::finish_restore`] only once the whole snapshot checked out, so a restore
    /// cut short never passes for a current state.
    pub fn write(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in entries {
            if key.as_slice() != keys::META_APPLIED {
                batch.insert(key.as_slice(), value.as_slice());
            }
        }
        Ok(self.tree.apply_batch(batch)?)
    }
}

/// The chunks of [`ShardStore::export_chunks`].
struct ExportChunks {
    entries: sled::Iter,
    /// `None` once the checksum is written.
    encoder: Option<Encoder>,
    buffer: Vec<u8>,
    chunk_bytes: usize,
}

impl Iterator for ExportChunks {
    type Item = Result<Vec<u8>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let encoder = self.encoder.as_mut()?;
        while self.buffer.len() < self.chunk_bytes {
            match self.entries.next() {
                Some(Ok((key, value))) => encoder.entry(&mut self.buffer, &key, &value),
                Some(Err(error)) => {
                    self.encoder = None;
                    return Some(Err(error.into()));
                }
                None => {
                    if let Some(encoder) = self.encoder.take() {
                        encoder.finish(&mut self.buffer);
                    }
                    break;
                }
            }
        }
        let next = Vec::with_capacity(self.chunk_bytes + 1024);
        Some(Ok(std::mem::replace(&mut self.buffer, next)))
    }
}

/// Result of applying one status change inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Changed,
    /// Stale or duplicate: nothing to write.
    Unchanged,
    /// It would create an alarm beyond `limits.max_alarms_per_user`.
    TooManyAlarms,
}

/// How digests are written.
#[derive(Debug, Clone)]
pub struct DigestOptions {
    /// Nothing to report: write nothing (`digest.skip_empty`).
    pub skip_empty: bool,
    /// The most one part's payload may weigh: what the broker accepts, less room for headers.
    pub max_part_bytes: usize,
    /// Recorded with each part, for the outbox age gauge.
    pub written_at: chrono::DateTime<chrono::Utc>,
}

/// Result of answering one digest request inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestOutcome {
    /// A digest was written to the outbox, in this many parts.
    Queued { alarms: usize, parts: usize },
    /// Nothing to report and `digest.skip_empty` is on.
    SkippedEmpty,
    /// This request (same shard stream sequence) was answered before: a redelivery.
    AlreadyAnswered,
}

impl ShardStore {
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Whether the data dir's last write or flush failed and no flush has succeeded since:
    /// reading the whole tree then may never return (see `DataDirHealth`).
    pub fn data_dir_failing(&self) -> bool {
        self.failing.failing()
    }

    /// Reads the metadata the store caches, creating the digest epoch on first use.
    fn load_meta(&mut self) -> Result<(), StoreError> {
        self.epoch = match self.tree.get(keys::META_EPOCH)? {
            Some(bytes) => read_u64(&bytes),
            None => {
                let epoch = rand::random::<u64>();
                self.tree.insert(keys::META_EPOCH, &epoch.to_be_bytes())?;
                epoch
            }
        };
        let meta = |key: &[u8]| -> Result<u64, StoreError> {
            Ok(self.tree.get(key)?.map(|b| read_u64(&b)).unwrap_or(0))
        };
        self.next_outbox = meta(keys::META_NEXT_OUTBOX)?;
        self.applied = meta(keys::META_APPLIED)?;
        Ok(())
    }

    /// The shard stream sequence this tree reflects: every message at or below it is applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Records that the tree reflects the shard stream up to `sequence` (not flushed: the
    /// caller flushes through the group flusher or at shutdown).
    pub fn set_applied(&mut self, sequence: u64) -> Result<(), StoreError> {
        self.tree
            .insert(keys::META_APPLIED, &sequence.to_be_bytes())?;
        self.applied = sequence;
        Ok(())
    }

    /// Sets the digest epoch (part of every digest's Msg-Id). Only for a tree in its initial
    /// state, before any digest was written.
    pub fn set_epoch(&mut self, epoch: u64) -> Result<(), StoreError> {
        self.tree.insert(keys::META_EPOCH, &epoch.to_be_bytes())?;
        self.epoch = epoch;
        Ok(())
    }

    /// Whether the tree holds no alarms, digests or markers at all.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        for item in self.tree.iter().keys() {
            if item?.first() != Some(&b'm') {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The whole tree as an export (the snapshot and `shard export` format). Consistent as
    /// long as nothing writes meanwhile, which the worker (the tree's only writer) ensures by
    /// exporting between batches.
    pub fn export(&self, count: u16, source_instance: String) -> Result<ShardExport, StoreError> {
        let entries = self
            .tree
            .iter()
            .map(|entry| entry.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<Vec<_>, sled::Error>>()?;
        Ok(ShardExport {
            shard: self.shard,
            count,
            source_instance,
            entries,
        })
    }

    /// The tree in the export format, `chunk_bytes` at a time, for a snapshot: never the
    /// whole shard in memory. Consistent as long as nothing writes meanwhile (the worker, the
    /// tree's only writer, awaits the snapshot).
    pub fn export_chunks(
        &self,
        count: u16,
        source_instance: &str,
        chunk_bytes: usize,
    ) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + Send + 'static {
        let entries = self.tree.len() as u64;
        let mut first = Vec::with_capacity(chunk_bytes + 1024);
        let encoder = Encoder::start(&mut first, self.shard, count, source_instance, entries);
        ExportChunks {
            entries: self.tree.iter(),
            encoder: Some(encoder),
            buffer: first,
            chunk_bytes: chunk_bytes.max(1024),
        }
    }

    /// Empties the tree, before a restore writes a snapshot's entries into it.
    pub fn clear(&mut self) -> Result<(), StoreError> {
        loop {
            let mut batch = sled::Batch::default();
            let mut any = false;
            for key in self.tree.iter().keys().take(10_000) {
                batch.remove(key?);
                any = true;
            }
            if !any {
                return Ok(());
            }
            self.tree.apply_batch(batch)?;
        }
    }

    /// What a restore writes entries through, from a blocking thread.
    pub fn restore_writer(&self) -> RestoreWriter {
        RestoreWriter {
            tree: self.tree.clone(),
        }
    }

    /// Marks a restore complete at `applied`.
    pub fn finish_restore(&mut self, applied: u64) -> Result<(), StoreError> {
        self.load_meta()?;
        self.set_applied(applied)
    }

    /// Replaces the tree with an export's entries in one atomic batch (not flushed) and
    /// reloads the metadata from them.
    pub fn replace(&mut self, export: &ShardExport) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.tree.iter().keys() {
            batch.remove(key?);
        }
        for (key, value) in &export.entries {
            batch.insert(key.as_slice(), value.as_slice());
        }
        self.tree.apply_batch(batch)?;
        self.load_meta()
    }

    pub fn begin(&mut self) -> ShardWrite<'_> {
        ShardWrite {
            applied: None,
            store: self,
            alarms: BTreeMap::new(),
            answered: HashSet::new(),
            outbox: Vec::new(),
            user_counts: HashMap::new(),
        }
    }

    /// One user's alarms as stored, in AlarmID order.
    pub fn user_alarms(&self, user_id: &str) -> Result<Vec<(String, AlarmRecord)>, StoreError> {
        let prefix = keys::user_prefix(user_id);
        self.tree
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, value) = item?;
                let alarm_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let record =
                    codec::decode_record(&value).map_err(|e| StoreError::codec(&key, e))?;
                Ok((alarm_id, record))
            })
            .collect()
    }

    /// Digests still waiting for their PubAck, oldest first.
    pub fn pending_outbox(&self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        self.tree
            .scan_prefix([keys::OUTBOX])
            .map(|item| {
                let (key, value) = item?;
                let sequence = keys::parse_sequence_key(&key).unwrap_or(0);
                let entry = codec::decode_outbox(&value).map_err(|e| StoreError::codec(&key, e))?;
                Ok((sequence, entry))
            })
            .collect()
    }

    /// Drops published digests. Not flushed on purpose: if the removal is lost in a crash the
    /// digest is published again with the same Msg-Id, and JetStream drops the copy.
    pub fn remove_outbox(&self, sequences: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for sequence in sequences {
            batch.remove(&keys::sequence_key(keys::OUTBOX, *sequence));
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Takes digest parts the broker refused for good out of the outbox and marks their alarms
    /// unsent again, in one atomic write: the user's next digest carries them (split for the
    /// limit then in force), so a refusal never loses an alarm. Returns how many alarms came
    /// back. Not flushed: if the write is lost in a crash, the parts are refused again.
    pub fn return_to_unsent(&self, refused: &[(u64, OutboxEntry)]) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut returned = 0;
        for (sequence, entry) in refused {
            let outbox_key = keys::sequence_key(keys::OUTBOX, *sequence);
            let digest = wire::decode_digest(&entry.payload)
                .map_err(|e| StoreError::codec(&outbox_key, CodecError::Payload(e.to_string())))?;
            for alarm in &digest.active_alarms {
                let key = keys::alarm_key(&entry.user_id, &alarm.alarm_id);
                // A record swept meanwhile was CLEARED: nothing left to tell.
                let Some(bytes) = self.tree.get(&key)? else {
                    continue;
                };
                let mut record =
                    codec::decode_record(&bytes).map_err(|e| StoreError::codec(&key, e))?;
                record.mark_unsent();
                batch.insert(key, codec::encode_record(&record));
                returned += 1;
            }
            batch.remove(&outbox_key[..]);
        }
        self.tree.apply_batch(batch)?;
        Ok(returned)
    }

    /// Forgets answered-request markers at or below the consumer's ack floor: JetStream will
    /// never redeliver those requests.
    pub fn prune_answered(&self, ack_floor: u64) -> Result<usize, StoreError> {
        let end = keys::sequence_key(keys::REQUEST, ack_floor.saturating_add(1));
        let mut batch = sled::Batch::default();
        let mut count = 0;
        for item in self.tree.range(keys::sequence_key(keys::REQUEST, 0)..end) {
            let (key, _) = item?;
            batch.remove(key);
            count += 1;
        }
        self.tree.apply_batch(batch)?;
        Ok(count)
    }

    /// One incremental step of the retention sweep: examines at most `limit` alarms after
    /// `cursor` and removes the expired CLEARED tombstones among them in one batch. Returns
    /// how many were removed and where to continue (`None`: the tree was covered; start over
    /// next time). `now` is passed in so tests need no clock.
    pub fn sweep_cleared(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
        now: chrono::DateTime<chrono::Utc>,
        cleared_after: chrono::Duration,
    ) -> Result<(usize, Option<Vec<u8>>), StoreError> {
        let start = match cursor {
            Some(after) => std::ops::Bound::Excluded(after.to_vec()),
            None => std::ops::Bound::Included(vec![keys::ALARM]),
        };
        let end = std::ops::Bound::Excluded(vec![keys::ALARM + 1]);
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        let mut examined = 0;
        let mut last = None;
        for item in self.tree.range::<Vec<u8>, _>((start, end)).take(limit) {
            let (key, value) = item?;
            examined += 1;
            // An unreadable record is left for the worker to report, not silently dropped.
            if let Ok(record) = codec::decode_record(&value) {
                if record.is_expired(now, cleared_after) {
                    batch.remove(key.clone());
                    removed += 1;
                }
            }
            last = Some(key.to_vec());
        }
        self.tree.apply_batch(batch)?;
        // A short page means the end of the alarms was reached: start over next time.
        let next = if examined < limit { None } else { last };
        Ok((removed, next))
    }

    fn message_id(&self, sequence: u64) -> String {
        format!(
            "alarm-digest:{}:{:016x}:{}",
            self.shard, self.epoch, sequence
        )
    }
}

/// The pending writes of one batch. Reads see the batch's own earlier writes first.
pub struct ShardWrite<'s> {
    store: &'s mut ShardStore,
    /// The shard stream sequence the tree reflects once this batch is committed.
    applied: Option<u64>,
    alarms: BTreeMap<Vec<u8>, AlarmRecord>,
    answered: HashSet<u64>,
    outbox: Vec<(u64, OutboxEntry)>,
    /// Per user (by key prefix) touched by a create in this batch: how many alarms the user
    /// has now, counted once (capped at the limit) and kept up to date by later creates, so a
    /// batch creating many alarms scans each user's keys once rather than once per create.
    user_counts: HashMap<Vec<u8>, usize>,
}

impl ShardWrite<'_> {
    /// The tree reflects the shard stream up to `sequence` once this batch commits: written
    /// in the same atomic batch as what it covers.
    pub fn applied_through(&mut self, sequence: u64) {
        self.applied = Some(sequence);
    }

    fn record(&self, key: &[u8]) -> Result<Option<AlarmRecord>, StoreError> {
        if let Some(record) = self.alarms.get(key) {
            return Ok(Some(*record));
        }
        match self.store.tree.get(key)? {
            Some(bytes) => codec::decode_record(&bytes)
                .map(Some)
                .map_err(|e| StoreError::codec(key, e)),
            None => Ok(None),
        }
    }

    /// Applies one status change. Creating an alarm beyond `max_alarms` for its user is
    /// refused and changes nothing.
    pub fn apply(
        &mut self,
        change: &StatusChange,
        max_alarms: usize,
    ) -> Result<Applied, StoreError> {
        let key = keys::alarm_key(&change.user_id, &change.alarm_id);
        let (record, changed) = match self.record(&key)? {
            Some(mut record) => {
                let changed = record.apply(change.observation);
                (record, changed)
            }
            None => {
                let prefix = keys::user_prefix(&change.user_id);
                let count = match self.user_counts.get(&prefix) {
                    Some(count) => *count,
                    None => self.user_alarm_count(&change.user_id, max_alarms)?,
                };
                if count >= max_alarms {
                    self.user_counts.insert(prefix, count);
                    return Ok(Applied::TooManyAlarms);
                }
                self.user_counts.insert(prefix, count + 1);
                (AlarmRecord::new(change.observation), true)
            }
        };
        if changed {
            self.alarms.insert(key, record);
            Ok(Applied::Changed)
        } else {
            Ok(Applied::Unchanged)
        }
    }

    /// The user's alarms, stored or created earlier in this batch, counted up to `cap`: only
    /// called when an event would create an alarm, and never scanning more than `cap` keys.
    fn user_alarm_count(&self, user_id: &str, cap: usize) -> Result<usize, StoreError> {
        let prefix = keys::user_prefix(user_id);
        let mut count = 0;
        for item in self.store.tree.scan_prefix(&prefix).take(cap) {
            item?;
            count += 1;
        }
        for (key, _) in self.alarms.range(prefix.clone()..) {
            if !key.starts_with(&prefix) || count >= cap {
                break;
            }
            if !self.store.tree.contains_key(key)? {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Answers a digest request: selects what is due, marks it sent and queues the digest in
    /// the outbox, split into parts that each fit `options.max_part_bytes`, all in this batch.
    /// `request_sequence` is the request's shard stream sequence, remembered so a redelivery
    /// is not answered twice.
    pub fn digest(
        &mut self,
        user_id: &str,
        request_sequence: u64,
        options: &DigestOptions,
    ) -> Result<DigestOutcome, StoreError> {
        let marker = keys::sequence_key(keys::REQUEST, request_sequence);
        if self.answered.contains(&request_sequence) || self.store.tree.contains_key(marker)? {
            return Ok(DigestOutcome::AlreadyAnswered);
        }
        let prefix = keys::user_prefix(user_id);
        let mut merged: BTreeMap<Vec<u8>, AlarmRecord> = BTreeMap::new();
        for item in self.store.tree.scan_prefix(&prefix) {
            let (key, value) = item?;
            let record = codec::decode_record(&value).map_err(|e| StoreError::codec(&key, e))?;
            merged.insert(key.to_vec(), record);
        }
        for (key, record) in self.alarms.range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            merged.insert(key.clone(), *record);
        }
        let mut alarms: Vec<(String, AlarmRecord)> = merged
            .iter()
            .map(|(key, record)| {
                (
                    String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
                    *record,
                )
            })
            .collect();
        let (entries, changed) = domain::take_digest(&mut alarms);
        if entries.is_empty() && options.skip_empty {
            return Ok(DigestOutcome::SkippedEmpty);
        }
        for index in changed {
            let (alarm_id, record) = &alarms[index];
            self.alarms
                .insert(keys::alarm_key(user_id, alarm_id), *record);
        }
        let payloads = wire::encode_digest_parts(user_id, &entries, options.max_part_bytes);
        let count = payloads.len();
        let parts = u32::try_from(count).unwrap_or(u32::MAX);
        let first = self.store.next_outbox + self.outbox.len() as u64;
        let digest_id = self.store.message_id(first);
        for (index, part) in payloads.into_iter().enumerate() {
            let sequence = first + index as u64;
            self.outbox.push((
                sequence,
                OutboxEntry {
                    msg_id: self.store.message_id(sequence),
                    user_id: user_id.to_string(),
                    payload: part.payload,
                    alarm_count: u32::try_from(part.alarms).unwrap_or(u32::MAX),
                    digest_id: digest_id.clone(),
                    part: u32::try_from(index + 1).unwrap_or(u32::MAX),
                    parts,
                    written_at_ms: Some(options.written_at.timestamp_millis()),
                },
            ));
        }
        self.answered.insert(request_sequence);
        Ok(DigestOutcome::Queued {
            alarms: entries.len(),
            parts: count,
        })
    }

    /// Writes the whole batch atomically (not yet durable: flush next). Returns the digests
    /// queued by this batch.
    pub fn commit(self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let mut batch = sled::Batch::default();
        for (key, record) in &self.alarms {
            batch.insert(key.as_slice(), codec::encode_record(record));
        }
        for sequence in &self.answered {
            batch.insert(&keys::sequence_key(keys::REQUEST, *sequence), &[][..]);
        }
        let next_outbox = self.store.next_outbox + self.outbox.len() as u64;
        for (sequence, entry) in &self.outbox {
            batch.insert(
                &keys::sequence_key(keys::OUTBOX, *sequence),
                codec::encode_outbox(entry),
            );
        }
        if !self.outbox.is_empty() {
            batch.insert(keys::META_NEXT_OUTBOX, &next_outbox.to_be_bytes());
        }
        if let Some(applied) = self.applied {
            batch.insert(keys::META_APPLIED, &applied.to_be_bytes());
        }
        if let Err(error) = self.store.tree.apply_batch(batch) {
            self.store.failing.set(true);
            return Err(error.into());
        }
        self.store.next_outbox = next_outbox;
        if let Some(applied) = self.applied {
            self.store.applied = applied;
        }
        Ok(self.outbox)
    }
}

#[cfg(test)]
impl ShardWrite<'_> {
    fn apply_unlimited(&mut self, change: &StatusChange) -> Result<Applied, StoreError> {
        self.apply(change, usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Observation, Status};
    use crate::wire::AlarmDigest;

    fn change(user: &str, alarm: &str, status: Status, secs: i64) -> StatusChange {
        StatusChange {
            user_id: user.into(),
            alarm_id: alarm.into(),
            observation: Observation {
                status,
                changed_at: chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default(),
            },
        }
    }

    fn options(skip_empty: bool) -> DigestOptions {
        DigestOptions {
            skip_empty,
            max_part_bytes: 1024 * 1024,
            written_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
        }
    }

    fn digest_ids(entry: &OutboxEntry) -> Vec<String> {
        let digest: AlarmDigest = serde_json::from_slice(&entry.payload).expect("valid digest");
        digest
            .active_alarms
            .into_iter()
            .map(|a| a.alarm_id)
            .collect()
    }

    #[test]
    fn a_digest_sees_events_earlier_in_the_same_batch_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), 8).expect("open");
            let mut shard = store.shard(3).expect("shard");
            let mut write = shard.begin();
            write
                .apply_unlimited(&change("u", "a2", Status::Critical, 20))
                .expect("apply");
            write
                .apply_unlimited(&change("u", "a1", Status::Warning, 10))
                .expect("apply");
            write
                .apply_unlimited(&change("other", "x", Status::Warning, 5))
                .expect("apply");
            assert_eq!(
                write.digest("u", 7, &options(false)).expect("digest"),
                DigestOutcome::Queued {
                    alarms: 2,
                    parts: 1
                }
            );
            let queued = write.commit().expect("commit");
            assert_eq!(digest_ids(&queued[0].1), ["a1", "a2"]);
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path(), 8).expect("reopen");
        let mut shard = store.shard(3).expect("shard");
        assert_eq!(shard.pending_outbox().expect("outbox").len(), 1);
        let mut write = shard.begin();
        assert_eq!(
            write.digest("u", 7, &options(false)).expect("digest"),
            DigestOutcome::AlreadyAnswered
        );
        assert_eq!(
            write.digest("u", 8, &options(false)).expect("digest"),
            DigestOutcome::Queued {
                alarms: 0,
                parts: 1
            }
        );
        let queued = write.commit().expect("commit");
        assert_eq!(queued[0].0, 1, "outbox sequence continues after reopen");
        assert_ne!(
            queued[0].1.msg_id,
            shard.pending_outbox().expect("outbox")[0].1.msg_id
        );
    }

    #[test]
    fn a_digest_over_the_part_limit_is_queued_in_parts_with_one_digest_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(1).expect("shard");
        let mut write = shard.begin();
        for n in 0..100 {
            write
                .apply_unlimited(&change("u", &format!("alarm-{n:03}"), Status::Critical, n))
                .expect("apply");
        }
        let small = DigestOptions {
            max_part_bytes: 1_000,
            ..options(false)
        };
        let outcome = write.digest("u", 1, &small).expect("digest");
        let queued = write.commit().expect("commit");
        assert_eq!(
            outcome,
            DigestOutcome::Queued {
                alarms: 100,
                parts: queued.len()
            }
        );
        assert!(queued.len() > 5, "{} parts", queued.len());
        let mut ids = Vec::new();
        for (index, (_, entry)) in queued.iter().enumerate() {
            assert_eq!(entry.digest_id, queued[0].1.msg_id);
            assert_eq!(
                (entry.part as usize, entry.parts as usize),
                (index + 1, queued.len())
            );
            assert!(entry.payload.len() <= 1_000);
            ids.extend(digest_ids(entry));
        }
        let expected: Vec<String> = (0..100).map(|n| format!("alarm-{n:03}")).collect();
        assert_eq!(
            ids, expected,
            "every alarm once, oldest first across the parts"
        );
        let msg_ids: HashSet<&String> = queued.iter().map(|(_, e)| &e.msg_id).collect();
        assert_eq!(msg_ids.len(), queued.len(), "each part has its own Msg-Id");
    }

    #[test]
    fn a_refused_part_goes_back_to_unsent_so_the_next_digest_carries_its_alarms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let mut write = shard.begin();
        for n in 0..10 {
            write
                .apply_unlimited(&change("u", &format!("a{n}"), Status::Warning, n))
                .expect("apply");
        }
        let small = DigestOptions {
            max_part_bytes: 300,
            ..options(false)
        };
        write.digest("u", 1, &small).expect("digest");
        let queued = write.commit().expect("commit");
        assert!(queued.len() >= 2);
        let refused = vec![queued[1].clone()];
        let returned = shard.return_to_unsent(&refused).expect("return");
        assert_eq!(returned, digest_ids(&refused[0].1).len());
        let left: Vec<u64> = shard
            .pending_outbox()
            .expect("outbox")
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert!(
            !left.contains(&refused[0].0),
            "the refused part left the outbox"
        );
        let mut write = shard.begin();
        write.digest("u", 2, &options(false)).expect("digest");
        let again = write.commit().expect("commit");
        assert_eq!(digest_ids(&again[0].1), digest_ids(&refused[0].1));
    }

    #[test]
    fn creating_alarms_beyond_the_per_user_limit_is_refused_but_updates_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let mut write = shard.begin();
        for n in 0..2 {
            let applied = write
                .apply(&change("u", &format!("a{n}"), Status::Warning, 1), 3)
                .expect("apply");
            assert_eq!(applied, Applied::Changed);
        }
        write.commit().expect("commit");
        // Two stored + one new in this batch reach the limit of three.
        let mut write = shard.begin();
        assert_eq!(
            write
                .apply(&change("u", "a2", Status::Warning, 1), 3)
                .expect("apply"),
            Applied::Changed
        );
        assert_eq!(
            write
                .apply(&change("u", "a3", Status::Warning, 1), 3)
                .expect("apply"),
            Applied::TooManyAlarms
        );
        assert_eq!(
            write
                .apply(&change("u", "a0", Status::Critical, 2), 3)
                .expect("apply"),
            Applied::Changed
        );
        assert_eq!(
            write
                .apply(&change("other", "a3", Status::Warning, 1), 3)
                .expect("apply"),
            Applied::Changed
        );
    }

    #[test]
    fn skip_empty_queues_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let mut write = shard.begin();
        assert_eq!(
            write.digest("nobody", 1, &options(true)).expect("digest"),
            DigestOutcome::SkippedEmpty
        );
        assert!(write.commit().expect("commit").is_empty());
    }

    #[test]
    fn shard_count_is_recorded_once_and_a_change_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        store.check_shard_count(16).expect("first start records it");
        store.check_shard_count(16).expect("same count is fine");
        let error = store.check_shard_count(8).expect_err("changed count");
        assert!(error.to_string().contains("holds 16 shards"), "{error}");
    }

    #[test]
    fn the_sweep_removes_only_expired_tombstones_a_page_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let day = 86_400;
        let mut write = shard.begin();
        for n in 0..25 {
            // Old cleared, recent cleared, old critical: only the first kind may go.
            write
                .apply_unlimited(&change(
                    "u",
                    &format!("old-cleared-{n:02}"),
                    Status::Cleared,
                    day,
                ))
                .expect("apply");
            write
                .apply_unlimited(&change(
                    "u",
                    &format!("new-cleared-{n:02}"),
                    Status::Cleared,
                    9 * day,
                ))
                .expect("apply");
            write
                .apply_unlimited(&change(
                    "u",
                    &format!("old-critical-{n:02}"),
                    Status::Critical,
                    day,
                ))
                .expect("apply");
        }
        write.commit().expect("commit");
        // The injected clock: day 10, so day 1 is past a 7-day retention and day 9 is not.
        let now = chrono::DateTime::from_timestamp(10 * day, 0).unwrap_or_default();
        let week = chrono::Duration::days(7);
        let (mut removed, mut cursor, mut steps) = (0, None, 0);
        loop {
            let (count, next) = shard
                .sweep_cleared(cursor.as_deref(), 10, now, week)
                .expect("sweep");
            removed += count;
            steps += 1;
            match next {
                Some(key) => cursor = Some(key),
                None => break,
            }
        }
        assert_eq!(removed, 25);
        assert_eq!(steps, 8, "75 alarms in pages of 10");
        let left = shard.user_alarms("u").expect("alarms");
        assert_eq!(left.len(), 50);
        assert!(left.iter().all(|(id, _)| !id.starts_with("old-cleared")));
    }

    #[test]
    fn answered_markers_are_pruned_up_to_the_ack_floor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let mut write = shard.begin();
        for sequence in [1, 2, 3] {
            write
                .digest("u", sequence, &options(false))
                .expect("digest");
        }
        write.commit().expect("commit");
        assert_eq!(shard.prune_answered(2).expect("prune"), 2);
        let mut write = shard.begin();
        assert_eq!(
            write.digest("u", 3, &options(false)).expect("digest"),
            DigestOutcome::AlreadyAnswered
        );
    }
}
