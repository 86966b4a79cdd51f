//! Bringing a taken shard's state up to date before anything is answered.
//!
//! The base is the data dir's own state when it is at least as new as the newest snapshot
//! and the shard stream still holds everything after it; otherwise the newest snapshot that
//! checks out and whose tail the stream still holds (a damaged one falls back to the one
//! before). The consumer then starts right after the base's sequence, so the replay applies
//! exactly the messages the base does not reflect, in order, answering each digest request
//! exactly as the first time: same state, same outbox sequence, so the same Msg-Ids, which
//! the output stream drops within its duplicate window.

use std::time::Instant;

use super::ShardWorker;
use crate::bus::snapshots::{SnapshotError, Stored};
use crate::bus::{self, BusError};
use crate::metrics::Phase;
use crate::retry::Backoff;
use crate::store::{Header, StoreError, StreamDecoder};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Where the shard stream stands.
pub(super) struct Extent {
    first: u64,
    last: u64,
    /// When this incarnation of the stream was created (Unix nanoseconds).
    created: u64,
}

/// Why no base could be chosen.
pub(super) enum NoBase {
    Bus(BusError),
    /// Nothing usable: the reason, for `/readyz` and the log.
    Unusable(String),
}

/// Waits for one restore write.
async fn written(
    writing: tokio::task::JoinHandle<Result<(), StoreError>>,
) -> Result<(), SnapshotError> {
    match writing.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(BusError::transient("writing a restored snapshot", error).into()),
        Err(error) => Err(BusError::transient("writing a restored snapshot", error).into()),
    }
}

impl From<BusError> for NoBase {
    fn from(error: BusError) -> NoBase {
        NoBase::Bus(error)
    }
}

impl ShardWorker {
    /// Restores the base; `Ok(false)` if cancelled meanwhile.
    pub(super) async fn restore(&mut self, cancel: &CancellationToken) -> anyhow::Result<bool> {
        let shard = self.store.shard();
        self.report(Phase::Restoring, "restoring the shard's state");
        let mut backoff = Backoff::default();
        loop {
            let started = Instant::now();
            match self.choose_and_load_base().await {
                Ok(extent) => {
                    self.health.replay_until(extent.last);
                    tracing::info!(
                        shard,
                        applied = self.store.applied(),
                        stream_last = extent.last,
                        took_ms = started.elapsed().as_millis() as u64,
                        "shard state restored; replaying the shard stream from there"
                    );
                    return Ok(true);
                }
                Err(NoBase::Bus(error)) => {
                    tracing::warn!(shard, %error, "cannot restore the shard yet; retrying");
                    self.report(Phase::Restoring, format!("restoring: {error}"));
                }
                Err(NoBase::Unusable(reason)) => {
                    tracing::error!(shard, "cannot restore the shard: {reason}");
                    self.report(Phase::Restoring, format!("cannot restore: {reason}"));
                }
            }
            if !backoff.wait(cancel).await {
                return Ok(false);
            }
        }
    }

    /// Brings the data dir up to date from the chosen base (a new owner's restore, and a
    /// standby's start); returns where the shard log stands.
    pub(super) async fn choose_and_load_base(&mut self) -> Result<Extent, NoBase> {
        let shard = self.store.shard();
        let keep = self.shared.config.snapshots.keep;
        let chain = self.snapshots.snapshots().chain(shard, keep + 16).await?;
        let extent = self.shard_stream_extent().await?;
        // Every message after `base` must still be in the stream, and `base` cannot be past
        // its end (a state of another incarnation of the stream).
        let replayable = |base: u64| base + 1 >= extent.first && base <= extent.last;
        let local = self.store.applied();
        let newest = chain.first().map(|s| s.manifest.covers);
        if newest.is_none_or(|covers| local >= covers) && replayable(local) {
            if let Some(stored) = chain.first() {
                self.snapshots.note_newest(stored.clone(), &self.shared);
            }
            if local == 0 && self.is_initial_state()? {
                // The state before the log's first message: every instance that starts the
                // shard from it must name its digests alike, so a replay after a lost disk
                // answers with the Msg-Ids of the first time (the epoch otherwise random).
                self.store
                    .set_epoch(extent.created ^ u64::from(shard))
                    .map_err(|e| BusError::transient("recording the digest epoch", e))?;
            }
            return Ok(extent);
        }
        let mut problems = Vec::new();
        for stored in &chain {
            let covers = stored.manifest.covers;
            if !replayable(covers) {
                problems.push(format!(
                    "snapshot {} covers {covers}, the stream holds {}..={}",
                    stored.sequence, extent.first, extent.last
                ));
                continue;
            }
            match self.load_snapshot(stored).await {
                Ok(()) => {
                    if let Some(newest) = chain.first() {
                        self.snapshots.note_newest(newest.clone(), &self.shared);
                    }
                    return Ok(extent);
                }
                Err(SnapshotError::Bus(error)) => return Err(error.into()),
                Err(damaged) => {
                    self.shared.metrics.snapshots_damaged.inc();
                    tracing::error!(shard, error = %damaged, "snapshot unusable; trying the one before");
                    problems.push(damaged.to_string());
                }
            }
        }
        if problems.is_empty() {
            problems.push(format!(
                "the data dir reflects sequence {local}, the stream holds {}..={} and there is \
                 no snapshot",
                extent.first, extent.last
            ));
        }
        Err(NoBase::Unusable(problems.join("; ")))
    }

    fn is_initial_state(&self) -> Result<bool, BusError> {
        self.store
            .is_empty()
            .map_err(|e| BusError::transient("reading the shard's state", e))
    }

    /// Loads a snapshot into the data dir, writing entries as chunks arrive, so a large shard
    /// is never whole in memory. Its bytes are checked twice over (the manifest's length and
    /// crc32, the export's own checksum, shard and count); the applied sequence is written
    /// last, only once all of it checked out, so a restore cut short or refused at the end is
    /// never taken for a current state (the next base choice clears the tree again).
    async fn load_snapshot(&mut self, stored: &Stored) -> Result<(), SnapshotError> {
        let damaged = |problem: String| SnapshotError::Damaged {
            shard: stored.manifest.shard,
            sequence: stored.sequence,
            problem,
        };
        let expected = (self.store.shard(), self.shared.config.shards.count);
        let check_header = move |header: &Header| {
            if (header.shard, header.count) == expected {
                Ok(())
            } else {
                Err(format!(
                    "it holds shard {} of {}, not shard {} of {}",
                    header.shard, header.count, expected.0, expected.1
                ))
            }
        };
        let store_error = |e: StoreError| BusError::transient("writing a restored snapshot", e);
        self.store.clear().map_err(store_error)?;
        let mut decoder = StreamDecoder::default();
        // sled's writes are synchronous: on a blocking thread, one chunk's entries written
        // while the next chunks are fetched and decoded.
        let writer = self.store.restore_writer();
        let mut writing: Option<tokio::task::JoinHandle<Result<(), StoreError>>> = None;
        let chunks = self.snapshots.snapshots().chunks(stored);
        futures::pin_mut!(chunks);
        let mut read = Ok(());
        while let Some(chunk) = chunks.next().await {
            let entries = match chunk.and_then(|chunk| {
                let entries = decoder.feed(&chunk).map_err(|e| damaged(e.to_string()))?;
                if let Some(header) = decoder.header() {
                    check_header(header).map_err(damaged)?;
                }
                Ok(entries)
            }) {
                Ok(entries) => entries,
                Err(error) => {
                    read = Err(error);
                    break;
                }
            };
            if let Some(previous) = writing.take() {
                if let Err(error) = written(previous).await {
                    read = Err(error);
                    break;
                }
            }
            let writer = writer.clone();
            writing = Some(tokio::task::spawn_blocking(move || writer.write(&entries)));
        }
        // Never leave a write running behind a failure: the next base clears the tree.
        if let Some(last) = writing.take() {
            let last = written(last).await;
            read = read.and(last);
        }
        read?;
        decoder.finish().map_err(|e| damaged(e.to_string()))?;
        self.store
            .finish_restore(stored.manifest.covers)
            .map_err(store_error)?;
        self.flusher
            .flush()
            .await
            .map_err(|e| BusError::transient("flushing a restored snapshot", e))?;
        // The restored outbox (digests not yet acknowledged when it was taken) goes out first.
        self.outbox.load(&self.store, &self.shared);
        tracing::info!(
            shard = self.store.shard(),
            covers = stored.manifest.covers,
            bytes = stored.manifest.bytes,
            "restored the shard from its snapshot"
        );
        Ok(())
    }

    async fn shard_stream_extent(&self) -> Result<Extent, BusError> {
        let name = self.shared.topology.shard_stream(self.store.shard());
        let info = bus::stream_info(&self.shared.js, &name).await?;
        Ok(Extent {
            first: info.state.first_sequence,
            last: info.state.last_sequence,
            created: u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0),
        })
    }
}
