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

use std::time::Instant;

use super::ShardWorker;
use crate::bus::snapshots::{Manifest, Stored, MANIFEST_FORMAT};
use crate::bus::{self, BusError};
use crate::failpoint;

impl ShardWorker {
    /// Whether a snapshot is due: the tail since the newest one reached `snapshots.every_mb`,
    /// or `snapshots.every_secs` passed with anything applied since.
    pub(super) fn snapshot_due(&self) -> bool {
        let config = &self.shared.config.snapshots;
        let covered = self
            .newest_snapshot
            .as_ref()
            .map(|s| s.manifest.covers)
            .unwrap_or(0);
        let behind = self.store.applied() > covered;
        self.tail_bytes >= config.every_bytes()
            || (behind && self.snapshot_at.elapsed() >= config.every())
    }

    /// The snapshot taken when the worker lets go of the shard, so the next owner restores
    /// exactly where this one stopped and replays nothing. Skipped when the newest snapshot
    /// already covers the state and no digest waits in the outbox.
    pub(super) async fn final_snapshot(&mut self) {
        let current = self
            .newest_snapshot
            .as_ref()
            .is_some_and(|s| s.manifest.covers == self.store.applied());
        if current && self.outbox.is_empty() {
            return;
        }
        self.take_snapshot().await;
    }

    /// Takes one snapshot now; a failure is logged and the next one is tried at the next due
    /// time (the shard stream keeps everything until then, so nothing is at risk).
    pub(super) async fn take_snapshot(&mut self) {
        let shard = self.store.shard();
        failpoint::pause("snapshot");
        let started = Instant::now();
        match self.store_snapshot().await {
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
                self.shared.metrics.snapshots_taken.inc();
                self.note_snapshot(stored);
                self.forget_behind().await;
            }
            Err(error) if error.is_fenced() => self.note_fenced(&error),
            Err(error) => {
                tracing::warn!(shard, %error, "shard snapshot not stored; retried later");
            }
        }
        // Whether it worked or not, wait a whole period (or tail) before the next attempt.
        self.tail_bytes = 0;
        self.snapshot_at = Instant::now();
    }

    /// A write refused because a newer owner exists: counted, said once (the tenure ends).
    pub(super) fn note_fenced(&mut self, error: &BusError) {
        self.shared.metrics.fenced_writes.inc();
        if !self.fenced {
            tracing::error!(
                shard = self.store.shard(),
                %error,
                "a newer owner took the shard while this process was paused or cut off; it \
                 lets the shard go"
            );
        }
        self.fenced = true;
    }

    pub(super) fn note_snapshot(&mut self, stored: Stored) {
        let manifest = &stored.manifest;
        self.shared
            .metrics
            .set_snapshot(manifest.shard, manifest.covers, manifest.taken_at_ms);
        self.newest_snapshot = Some(stored);
    }

    pub(super) async fn store_snapshot(&mut self) -> Result<Stored, BusError> {
        // Reading the whole tree on a failing disk may never return (`data_dir_failing`);
        // the shard stream keeps everything the last stored snapshot does not cover.
        if self.store.data_dir_failing() {
            return Err(BusError::transient(
                "taking a snapshot",
                "the data dir is failing; not read until a flush succeeds",
            ));
        }
        let shared = &self.shared;
        let shard = self.store.shard();
        let count = shared.config.shards.count;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            shard,
            shard_count: count,
            covers: self.store.applied(),
            bytes: 0,
            crc32: 0,
            chunks: Vec::new(),
            taken_at_ms: chrono::Utc::now().timestamp_millis(),
            previous: self.newest_snapshot.as_ref().map(|s| s.sequence),
        };
        // Half the server's max_payload: a chunk comes back inside a JSON reply, base64'd.
        let chunk_bytes = (shared.js.client().max_payload() / 2).max(1024);
        let chunks = self
            .store
            .export_chunks(count, &self.cluster.member().instance, chunk_bytes);
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
    async fn forget_behind(&mut self) {
        let shard = self.store.shard();
        let keep = self.shared.config.snapshots.keep;
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
        if let Err(error) = self.purge_shard_stream(floor).await {
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

    /// Removes the shard stream's messages at or below `covered`, which a kept snapshot holds.
    /// Never with a purge sequence of 0 or 1: nats-server 2.9 purges everything for those.
    async fn purge_shard_stream(&self, covered: u64) -> Result<(), BusError> {
        if covered < 1 {
            return Ok(());
        }
        let name = self.shared.topology.shard_stream(self.store.shard());
        let stream = bus::open_stream(&self.shared.js, &name).await?;
        let purged = stream
            .purge()
            .sequence(covered + 1)
            .await
            .map_err(|e| BusError::transient(format!("purging stream {name}"), e))?;
        tracing::debug!(stream = %name, below = covered + 1, purged = purged.purged, "purged the shard stream behind its snapshots");
        Ok(())
    }
}
