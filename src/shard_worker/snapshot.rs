//! Snapshots: the shard's state stored in JetStream, so any instance can rebuild it from the
//! newest one and the shard stream's tail.
//!
//! Order, each step safe to crash after: export the tree between two batches, a chunk at a
//! time (the worker is its only writer and waits meanwhile, so the copy is consistent and
//! covers exactly `applied`) → store the chunks
//! → store the manifest (the newest snapshot is now this one) → purge the shard stream up to
//! the oldest *kept* snapshot (so a damaged newest one can still fall back, with its tail) →
//! forget the snapshots beyond `snapshots.keep`. A crash before the manifest leaves orphan
//! chunks nobody points to (forgotten with nothing); after it, the next snapshot purges and
//! forgets what this one did not.
//!
//! [`Snapshotter`] owns everything about a shard's snapshots in a tenure. Invariants:
//! - Every manifest it stores names the manifest subject's last sequence as this tenure saw
//!   it (`fence`), so once a newer owner fenced the shard, the broker refuses the write and
//!   `fenced` is set: the tenure ends and nothing more is stored.
//! - `newest` is the shard's newest snapshot (whoever took it); the log is purged only up to
//!   the oldest kept one.
//! - `tail_bytes` and `due_from` restart after every attempt, stored or not.

use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::bus::snapshots::{Manifest, Stored, MANIFEST_FORMAT};
use crate::bus::{self, BusError, Snapshots};
use crate::failpoint;
use crate::retry::until_ok;
use crate::shared::Shared;
use crate::store::ShardStore;

/// One shard's snapshots: when the next is due, storing it fenced, purging behind it.
pub(super) struct Snapshotter {
    shard: u16,
    snapshots: Snapshots,
    /// The shard's newest snapshot (whoever took it), once known.
    newest: Option<Stored>,
    /// Shard stream bytes applied since the newest snapshot attempt, and when that was.
    tail_bytes: u64,
    due_from: Instant,
    /// The last sequence of the shard's manifest subject as this owner wrote it: its next
    /// manifest expects it, so the broker refuses it once a newer owner fenced
    /// (`bus/snapshots.rs`).
    fence: u64,
    /// A write of this tenure was refused for a newer owner: the tenure ends.
    fenced: bool,
}

impl Snapshotter {
    pub(super) fn new(shard: u16, shared: &Shared) -> Snapshotter {
        let streams = &shared.config.streams;
        Snapshotter {
            shard,
            snapshots: Snapshots::new(
                shared.js.clone(),
                streams.snapshot_stream.clone(),
                streams.snapshot_subject.clone(),
            ),
            newest: None,
            tail_bytes: 0,
            // Shards started together would all snapshot at once, every period: start each
            // at a random point of its first period instead.
            due_from: Instant::now()
                .checked_sub(
                    shared
                        .config
                        .snapshots
                        .every()
                        .mul_f64(rand::random::<f64>()),
                )
                .unwrap_or_else(Instant::now),
            fence: 0,
            fenced: false,
        }
    }

    /// The shard's snapshots in the broker (restore reads them).
    pub(super) fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    pub(super) fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Forgets what a tenure learned: the next one reads it from the broker again.
    pub(super) fn forget_tenure(&mut self) {
        self.fenced = false;
        self.newest = None;
        self.tail_bytes = 0;
    }

    /// Fences the shard's snapshot manifests for this tenure: from here on, a former
    /// owner's manifests are refused. `Ok(false)` if cancelled.
    pub(super) async fn fence_manifests(
        &mut self,
        count: u16,
        cancel: &CancellationToken,
    ) -> Result<bool, BusError> {
        let (shard, snapshots) = (self.shard, self.snapshots.clone());
        let fenced = until_ok("fencing the shard's snapshots", cancel, || {
            snapshots.fence(shard, count)
        })
        .await?;
        match fenced {
            Some(sequence) => {
                self.fence = sequence;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Shard stream bytes a durable batch applied.
    pub(super) fn note_applied(&mut self, bytes: u64) {
        self.tail_bytes += bytes;
    }

    /// Whether a snapshot is due: the tail since the newest one reached `snapshots.every_mb`,
    /// or `snapshots.every_secs` passed with anything applied since.
    pub(super) fn is_due(&self, applied: u64, shared: &Shared) -> bool {
        let config = &shared.config.snapshots;
        let covered = self.newest.as_ref().map(|s| s.manifest.covers).unwrap_or(0);
        self.tail_bytes >= config.every_bytes()
            || (applied > covered && self.due_from.elapsed() >= config.every())
    }

    /// Whether the newest snapshot covers the state exactly.
    pub(super) fn covers(&self, applied: u64) -> bool {
        self.newest
            .as_ref()
            .is_some_and(|s| s.manifest.covers == applied)
    }

    /// Takes one snapshot now; a failure is logged and the next one is tried at the next due
    /// time (the shard stream keeps everything until then, so nothing is at risk).
    pub(super) async fn take(&mut self, store: &ShardStore, shared: &Shared, instance: &str) {
        let shard = self.shard;
        failpoint::pause("snapshot");
        let started = Instant::now();
        match self.store(store, shared, instance).await {
            Ok(stored) => {
                let manifest = &stored.manifest;
                tracing::info!(
                    shard,
                    covers = manifest.covers,
                    bytes = manifest.bytes,
                    chunks = manifest.chunks.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "shard snapshot stored"
                );
                shared.metrics.snapshots_taken.inc();
                self.note_newest(stored, shared);
                self.forget_behind(shared).await;
            }
            Err(error) if error.is_fenced() => self.note_fenced(&error, shared),
            Err(error) => {
                tracing::warn!(shard, %error, "shard snapshot not stored; retried later");
            }
        }
        // Whether it worked or not, wait a whole period (or tail) before the next attempt.
        self.tail_bytes = 0;
        self.due_from = Instant::now();
    }

    /// A write refused because a newer owner exists: counted, said once (the tenure ends).
    pub(super) fn note_fenced(&mut self, error: &BusError, shared: &Shared) {
        shared.metrics.fenced_writes.inc();
        if !self.fenced {
            tracing::error!(
                shard = self.shard,
                %error,
                "a newer owner took the shard while this process was paused or cut off; it \
                 lets the shard go"
            );
        }
        self.fenced = true;
    }

    /// The shard's newest snapshot, as stored here or found by a restore.
    pub(super) fn note_newest(&mut self, stored: Stored, shared: &Shared) {
        let manifest = &stored.manifest;
        shared
            .metrics
            .set_snapshot(manifest.shard, manifest.covers, manifest.taken_at_ms);
        self.newest = Some(stored);
    }

    /// Stores the tree as the shard's newest snapshot, fenced.
    pub(super) async fn store(
        &mut self,
        store: &ShardStore,
        shared: &Shared,
        instance: &str,
    ) -> Result<Stored, BusError> {
        // Reading the whole tree on a failing disk may never return (`data_dir_failing`);
        // the shard stream keeps everything the last stored snapshot does not cover.
        if store.data_dir_failing() {
            return Err(BusError::transient(
                "taking a snapshot",
                "the data dir is failing; not read until a flush succeeds",
            ));
        }
        let count = shared.config.shards.count;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            shard: self.shard,
            shard_count: count,
            covers: store.applied(),
            bytes: 0,
            crc32: 0,
            chunks: Vec::new(),
            taken_at_ms: chrono::Utc::now().timestamp_millis(),
            previous: self.newest.as_ref().map(|s| s.sequence),
        };
        // Half the server's max_payload: a chunk comes back inside a JSON reply, base64'd.
        let chunk_bytes = (shared.js.client().max_payload() / 2).max(1024);
        let chunks = store.export_chunks(count, instance, chunk_bytes);
        // Reading the tree is synchronous CPU work: one chunk at a time, yielding to the
        // runtime between chunks so the other shards keep being served. (On a blocking thread
        // instead, RSS after a 1M-alarm shard's snapshots measured ~40 MiB higher: what it
        // freed stayed in its own malloc arena.)
        let chunks = futures::stream::unfold(chunks, |mut chunks| async move {
            tokio::task::yield_now().await;
            chunks.next().map(|chunk| (chunk, chunks))
        });
        let stored = self.snapshots.put(manifest, chunks, self.fence).await?;
        self.fence = stored.sequence;
        failpoint::hit("snapshot-stored");
        Ok(stored)
    }

    /// Purges the shard stream up to the oldest kept snapshot and forgets older snapshots.
    /// Best effort: what is not done now is done after the next snapshot.
    async fn forget_behind(&mut self, shared: &Shared) {
        let shard = self.shard;
        let keep = shared.config.snapshots.keep;
        let chain = match self.snapshots.chain(shard, keep + 16).await {
            Ok(chain) => chain,
            Err(error) => {
                tracing::warn!(shard, %error, "cannot list snapshots; old ones kept for now");
                return;
            }
        };
        if chain.len() < keep {
            return;
        }
        let floor = chain[keep - 1].manifest.covers;
        if let Err(error) = purge_shard_stream(shared, shard, floor).await {
            tracing::warn!(shard, %error, "shard stream not purged; retried after the next snapshot");
            return;
        }
        failpoint::hit("shard-stream-purged");
        for old in &chain[keep..] {
            if let Err(error) = self.snapshots.forget(old).await {
                tracing::warn!(shard, %error, "old snapshot not deleted; retried later");
                return;
            }
        }
    }
}

/// Removes the shard stream's messages at or below `covered`, which a kept snapshot holds.
/// Never with a purge sequence of 0 or 1: nats-server 2.9 purges everything for those.
async fn purge_shard_stream(shared: &Shared, shard: u16, covered: u64) -> Result<(), BusError> {
    if covered < 1 {
        return Ok(());
    }
    let name = shared.topology.shard_stream(shard);
    let stream = bus::open_stream(&shared.js, &name).await?;
    let purged = stream
        .purge()
        .sequence(covered + 1)
        .await
        .map_err(|e| BusError::transient(format!("purging stream {name}"), e))?;
    tracing::debug!(stream = %name, below = covered + 1, purged = purged.purged, "purged the shard stream behind its snapshots");
    Ok(())
}
