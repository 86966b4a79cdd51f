//! One shard worker per owned shard: takes the shard's lease, brings the shard's state up to
//! date, applies its shard stream to sled in batches and answers digest requests through the
//! outbox; snapshots the state into JetStream as it goes and once more when it lets go.
//!
//! - `mod.rs` (here): the life of a worker (admit, restore, consume, hand off), binding.
//! - `legacy.rs`: the upgrade: drains the previous release's WorkQueue shard stream first.
//! - `restore.rs`: local state, or the newest good snapshot, as the base to replay from.
//! - `answer.rs`: answering a digest request: what is due (`domain`), rendered (`wire`),
//!   queued in the batch's overlay.
//! - `batch.rs`: one fetched batch → one [`crate::store::ShardWrite`] overlay → one atomic
//!   sled batch (with the shard stream sequence it reaches) → one group flush → acks and dead
//!   letters. Envelopes are unpacked here.
//! - `snapshot.rs`: when to snapshot, storing it, purging the shard stream behind it.
//! - `outbox.rs`: publishing digest parts (Msg-Id from the outbox sequence), PubAcks, refusals.
//! - `health.rs`: the phase and readiness, reported together; noticing a stalled shard.
//! - `waiting.rs`: why a worker is not consuming yet. `sweep.rs`: the retention sweep.
//!
//! A worker's life is a loop of tenures: admit (take the lease) → serve → let go. A tenure
//! ends when the worker is cancelled (graceful stop: outbox, final snapshot, lease released)
//! or when a renewal finds the lease lost (a pause or a cut-off outlived it): then nothing
//! more is applied or published, what was fetched is handed back, and the worker waits for
//! the lease again like any owner, restoring from the newest snapshot if that is newer than
//! its own data dir.

pub mod answer;
mod batch;
mod health;
mod legacy;
mod outbox;
mod restore;
mod snapshot;
mod standby;
mod sweep;
mod waiting;

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use tokio_util::sync::CancellationToken;

use crate::bus::ownership::{Acquired, Published, ShardLease};
use crate::bus::snapshots::Stored;
use crate::bus::{self, BusError, Cluster, Snapshots};
use crate::retry::{until_ok, Backoff};
use crate::shared::Shared;
use crate::store::{GroupFlusher, ShardStore};
use health::{Idle, Progress};
use outbox::Outbox;
use standby::Standby;
use sweep::Sweep;
use waiting::Waiting;

/// How often answered-request markers below the ack floor are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct ShardWorker {
    shared: Shared,
    cluster: Cluster,
    store: ShardStore,
    flusher: GroupFlusher,
    outbox: Outbox,
    part: String,
    sweep: Sweep,
    snapshots: Snapshots,
    /// The shard's newest snapshot (whoever took it), once known.
    newest_snapshot: Option<Stored>,
    /// Shard stream bytes applied since the newest snapshot, and when that was.
    tail_bytes: u64,
    snapshot_at: Instant,
    /// While draining the previous release's WorkQueue stream: its sequences are not the
    /// shard log's, so they are neither tracked nor checked for gaps.
    draining_legacy: bool,
    /// Where the shard stream ended when the shard was taken: until the state reaches it,
    /// the worker is replaying.
    replay_target: u64,
    /// The phase last reported (`health.rs`).
    phase: Option<Phase>,
    /// The last sequence of the shard's manifest subject as this owner wrote it: its next
    /// manifest expects it, so the broker refuses it once a newer owner fenced
    /// (`bus/snapshots.rs`).
    fence: u64,
    /// A write of this tenure was refused for a newer owner: the tenure ends.
    fenced: bool,
    /// The shard's first owner by ordinal (always, without ordinal ownership): it may take
    /// a free lease at once; a standby by ordinal leaves it a lease period after start.
    primary: bool,
    started: Instant,
}

/// A holder's lease revision as a waiting owner first saw it, and when. Every renewal (each
/// third of the period) changes it, so one seen unchanged for a whole period belongs to a
/// holder that is gone.
#[derive(Default)]
struct RenewalWatch {
    seen: Option<(u64, Instant)>,
}

impl RenewalWatch {
    /// Whether `revision` has been the lease's for at least `period` of this watch.
    fn unrenewed_for(&mut self, revision: u64, period: Duration) -> bool {
        match self.seen {
            Some((seen, since)) if seen == revision => since.elapsed() >= period,
            _ => {
                self.seen = Some((revision, Instant::now()));
                false
            }
        }
    }
}

/// How a tenure under one lease ended.
enum Tenure {
    /// Cancelled: the instance is stopping.
    Stopped,
    /// A renewal found the lease gone or taken: this process lets the shard go.
    LeaseLost,
}

impl ShardWorker {
    pub fn new(
        shared: Shared,
        cluster: Cluster,
        store: ShardStore,
        flusher: GroupFlusher,
    ) -> ShardWorker {
        let shard = store.shard();
        let part = format!("shard {shard}");
        let snapshots = Snapshots::new(
            shared.js.clone(),
            shared.config.streams.snapshot_stream.clone(),
            shared.config.streams.snapshot_subject.clone(),
        );
        ShardWorker {
            snapshots,
            newest_snapshot: None,
            tail_bytes: 0,
            // Shards started together would all snapshot at once, every period: start each
            // at a random point of its first period instead.
            snapshot_at: Instant::now()
                .checked_sub(
                    shared
                        .config
                        .snapshots
                        .every()
                        .mul_f64(rand::random::<f64>()),
                )
                .unwrap_or_else(Instant::now),
            draining_legacy: false,
            replay_target: 0,
            phase: None,
            fence: 0,
            fenced: false,
            primary: shared.config.shards.is_primary(store.shard()),
            started: Instant::now(),
            shared,
            cluster,
            store,
            flusher,
            outbox: Outbox::new(shard),
            part,
            sweep: Sweep {
                cursor: None,
                // The first pass starts once events have shown what time it is.
                running: true,
                last_pass: Instant::now(),
                newest_seen: None,
            },
        }
    }

    pub async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let shard = self.store.shard();
        self.report(Phase::Waiting, "taking the shard's lease");
        loop {
            let Some(lease) = self.admit(&cancel).await else {
                return Ok(());
            };
            let metrics = self.shared.metrics.clone();
            metrics.shards_consuming.inc();
            let result = self.serve(&lease, &cancel).await;
            metrics.shards_consuming.dec();
            match result {
                Ok(Tenure::Stopped) => {
                    lease.release().await;
                    return Ok(());
                }
                Ok(Tenure::LeaseLost) => {
                    tracing::warn!(
                        shard,
                        "shard {shard} let go after losing its lease; waiting to take it again \
                         as a new owner"
                    );
                    drop(lease);
                    self.forget_tenure();
                    self.report(Phase::Waiting, "shard lease lost; taking it again");
                }
                Err(error) => {
                    lease.release().await;
                    return Err(error);
                }
            }
        }
    }

    /// Everything done under the lease: the upgrade's drain, the restore, consuming, and the
    /// final snapshot that lets the next owner start where this one stopped.
    async fn serve(
        &mut self,
        lease: &ShardLease,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Tenure> {
        // Before anything else: from here on, a former owner's manifests are refused.
        if !self.take_manifests(cancel).await? {
            return Ok(Tenure::Stopped);
        }
        self.outbox.load(&self.store, &self.shared);
        let drained = self.drain_previous_release(lease, cancel).await?;
        if self.fenced || lease.is_lost() {
            return Ok(Tenure::LeaseLost);
        }
        if !drained || !self.restore(cancel).await? {
            return Ok(Tenure::Stopped);
        }
        let tenure = self.consume(lease, cancel).await?;
        if matches!(tenure, Tenure::Stopped) && lease.is_fresh() {
            self.final_snapshot().await;
        }
        Ok(tenure)
    }

    /// Forgets what a tenure held in memory: the next one starts from the store and the
    /// broker. Fetched requests not acked are handed back by JetStream after `ack_wait` (or
    /// at once to the next holder, whose consumer starts at its state's sequence).
    fn forget_tenure(&mut self) {
        self.fenced = false;
        self.outbox.forget();
        self.newest_snapshot = None;
        self.replay_target = 0;
        self.tail_bytes = 0;
    }

    /// Waits until this process holds the shard's lease, as a warm standby while another
    /// process holds it (`standby.rs`). A shard still in the previous release's WorkQueue
    /// stream is taken only by its home there (the data dir holding its state), which drains
    /// it and writes its first snapshot; after that, any instance that owns the shard by
    /// config may take it.
    async fn admit(&mut self, cancel: &CancellationToken) -> Option<ShardLease> {
        let shard = self.store.shard();
        let mut last: Option<Waiting> = None;
        let mut standby = Standby::default();
        let mut watch = RenewalWatch::default();
        loop {
            let mut published = None;
            let primary_first =
                !self.primary && self.started.elapsed() < self.cluster.lease_period();
            let waiting = match self.previous_release_home().await {
                Ok(Some(home)) => Waiting::PreviousReleaseHome(home),
                Ok(None) if primary_first => match self.cluster.holder(shard).await {
                    Ok(Some(holder)) => {
                        published = Some(holder.published);
                        Waiting::LeaseHeld(holder.record)
                    }
                    Ok(None) => Waiting::PrimaryFirst,
                    Err(error) => Waiting::Unavailable(error.to_string()),
                },
                Ok(None) => match self.cluster.acquire(shard).await {
                    Ok(Acquired::Held(lease)) => {
                        tracing::info!(shard, "shard lease taken");
                        self.shared.metrics.set_standby_behind(shard, 0);
                        return Some(*lease);
                    }
                    Ok(Acquired::HeldBy(holder)) => {
                        let period = self.cluster.lease_period();
                        if watch.unrenewed_for(holder.revision, period)
                            && self.cluster.end_expired(shard, holder.revision).await
                        {
                            tracing::warn!(
                                shard,
                                holder = %holder.record.holder,
                                "shard {shard}'s lease was not renewed for {}s: its holder is \
                                 gone; taking the shard",
                                period.as_secs()
                            );
                            continue;
                        }
                        published = Some(holder.published);
                        Waiting::LeaseHeld(holder.record)
                    }
                    Err(error) => Waiting::Unavailable(error.to_string()),
                },
                Err(error) => Waiting::Unavailable(error.to_string()),
            };
            if last.as_ref() != Some(&waiting) {
                waiting.log(shard, self.cluster.lease_period());
            }
            let reason = waiting.reason();
            last = Some(waiting);
            // A holder of this release says what it published; only then can a standby's
            // copy tell its unpublished parts from the published ones.
            if let Some(Some(published)) = published {
                if !self.follow(&mut standby, &reason, published, cancel).await {
                    return None;
                }
                continue;
            }
            self.report(Phase::Waiting, reason);
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(self.cluster.renew_every()) => {}
            }
        }
    }

    /// Applies the shard log until cancelled or the lease is lost. Only the lease holder
    /// creates (or deletes) the shard's consumer, and only while its lease is fresh.
    async fn consume(
        &mut self,
        lease: &ShardLease,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Tenure> {
        let shard = self.store.shard();
        let Some(mut consumer) = self.bind(cancel).await? else {
            return Ok(Tenure::Stopped);
        };
        self.outbox.read_stream_limit(&self.shared).await;
        let mut backoff = Backoff::default();
        let mut last_prune = Instant::now();
        let mut progress = Progress::new(self.store.applied());
        // Set on a failed batch, cleared by the next one that is applied and flushed.
        let mut store_failing_since: Option<Instant> = None;
        // Set when the consumer must be created again before the next fetch.
        let mut rebind = false;
        let give_up = Duration::from_secs(self.shared.config.storage.give_up_after_secs);
        loop {
            // The lease first: a process woken from a pause publishes, applies and binds
            // nothing for a shard it may have lost.
            if lease.is_lost() || self.fenced {
                return Ok(Tenure::LeaseLost);
            }
            if !lease.is_fresh() {
                self.report(Phase::Waiting, "shard lease not renewed; not applying");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(self.cluster.renew_every() / 4) => continue,
                }
            }
            if rebind {
                let Some(rebound) = self.bind(cancel).await? else {
                    break;
                };
                consumer = rebound;
                rebind = false;
            }
            if !self.outbox.is_empty() {
                if let Err(error) = self.outbox.publish(&self.shared, &self.store).await {
                    let waiting = self.outbox.wait_reason(&error);
                    self.report(Phase::Stalled, waiting.clone());
                    tracing::warn!(shard, %error, "{waiting}; holding new work");
                    if !backoff.wait(cancel).await {
                        break;
                    }
                    continue;
                }
            }
            lease.note_published(self.published());
            match (store_failing_since, &progress.stalled) {
                (Some(_), _) => self.report(
                    Phase::Stalled,
                    "the data dir failed the last batch; retrying",
                ),
                (None, Some(reason)) => self.report(Phase::Stalled, reason.clone()),
                (None, None) => self.note_phase(),
            }
            self.sweep_step();
            if self.snapshot_due() {
                self.take_snapshot().await;
            }
            let tuning = &self.shared.config.tuning;
            let fetched = tokio::select! {
                _ = cancel.cancelled() => break,
                fetched = bus::fetch_limited(&consumer, self.fetch_limit(), tuning.fetch_expires()) => fetched,
            };
            match fetched {
                Ok(messages) if messages.is_empty() => {
                    if let Idle::Stalled(reason) = self.look_for_stall(&mut progress).await {
                        self.shared.metrics.shard_stalls.inc();
                        tracing::warn!(shard, "{reason}");
                        self.report(Phase::Stalled, reason.clone());
                        progress.stalled = Some(reason);
                        rebind = true;
                        if !backoff.wait(cancel).await {
                            break;
                        }
                        continue;
                    }
                    if last_prune.elapsed() >= PRUNE_EVERY {
                        last_prune = Instant::now();
                        self.prune_answered(&consumer).await;
                    }
                }
                Ok(messages) if !lease.is_fresh() => {
                    // Paused or cut off past the lease: another process may hold the shard
                    // now. Hand the batch back unapplied.
                    self.shared.metrics.lease_stale_batches.inc();
                    for message in messages {
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                    }
                }
                Ok(messages) => {
                    backoff.reset();
                    match self.process(messages).await {
                        Ok(Continuity::Contiguous) => store_failing_since = None,
                        Ok(Continuity::Gap) => {
                            // A message came before one it follows (a redelivery after a
                            // failure): take the log again from the first one not applied.
                            store_failing_since = None;
                            rebind = true;
                        }
                        Err(error) => {
                            self.shared.metrics.store_failures.inc();
                            self.report(Phase::Stalled, format!("batch not applied: {error}"));
                            tracing::error!(shard, %error, "batch not applied; it will be redelivered");
                            let since = *store_failing_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= give_up {
                                anyhow::bail!(
                                    "shard {shard}: the data dir has failed for {}s ({error}); \
                                     stopping so a restart can recover the store \
                                     (storage.give_up_after_secs)",
                                    give_up.as_secs()
                                );
                            }
                            if !backoff.wait(cancel).await {
                                break;
                            }
                            rebind = true;
                        }
                    }
                    self.note_progress(&mut progress);
                }
                Err(error) => {
                    self.report(Phase::Stalled, format!("shard fetch failed: {error}"));
                    tracing::warn!(shard, %error, "shard fetch failed; retrying");
                    if !backoff.wait(cancel).await {
                        break;
                    }
                    rebind = true;
                }
            }
        }
        // Finish what this worker owes before stopping: digests of acked work, while the
        // shard is still this process's.
        if !self.outbox.is_empty() && lease.is_fresh() {
            if let Err(error) = self.outbox.publish(&self.shared, &self.store).await {
                tracing::warn!(shard, %error, "digests left in the outbox; sent on next start");
            }
        }
        Ok(Tenure::Stopped)
    }

    /// Fences the shard's snapshot manifests for this tenure; `Ok(false)` if cancelled.
    async fn take_manifests(&mut self, cancel: &CancellationToken) -> Result<bool, BusError> {
        let shard = self.store.shard();
        let count = self.shared.config.shards.count;
        let snapshots = self.snapshots.clone();
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

    /// What the standbys may drop from their copies' outboxes: every part below the oldest
    /// one still unacknowledged here.
    fn published(&self) -> Published {
        Published {
            epoch: self.store.digest_epoch(),
            below: self
                .outbox
                .first_sequence()
                .unwrap_or_else(|| self.store.next_outbox()),
        }
    }

    fn fetch_limit(&self) -> bus::Limit {
        bus::Limit::shard_fetch(
            self.shared.config.tuning.worker_batch,
            self.shared.js.client().max_payload(),
        )
    }

    /// The shard's consumer, from the first shard stream sequence the state does not reflect.
    async fn bind(&self, cancel: &CancellationToken) -> Result<Option<PullConsumer>, BusError> {
        let shared = &self.shared;
        let shard = self.store.shard();
        let start = self.store.applied() + 1;
        until_ok("binding a shard consumer", cancel, || {
            shared
                .topology
                .worker_consumer_from(&shared.js, shard, &shared.config.tuning, start)
        })
        .await
    }

    /// Replaying until the state reaches where the shard stream ended when the shard was
    /// taken, consuming after.
    fn note_phase(&mut self) {
        let shard = self.store.shard();
        let behind = self.replay_target.saturating_sub(self.store.applied());
        if behind > 0 {
            self.shared.metrics.set_replay_behind(shard, behind);
            self.report(
                Phase::Replaying,
                format!("replaying the shard stream: {behind} message(s) behind"),
            );
        } else {
            // Caught up: the gauge changes once, not on every batch.
            if self.phase != Some(Phase::Consuming) {
                self.shared.metrics.set_replay_behind(shard, 0);
            }
            self.report(Phase::Consuming, "");
        }
    }

    async fn prune_answered(&self, consumer: &PullConsumer) {
        match consumer.get_info().await {
            Ok(info) => match self.store.prune_answered(info.ack_floor.stream_sequence) {
                Ok(pruned) if pruned > 0 => {
                    tracing::debug!(
                        shard = self.store.shard(),
                        pruned,
                        "forgot answered requests"
                    )
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot prune answered requests"),
            },
            Err(error) => tracing::debug!(%error, "no consumer info for pruning"),
        }
    }
}

/// Whether a batch continued the shard log without a hole.
pub(super) enum Continuity {
    Contiguous,
    /// A message arrived before one it follows: everything from there on was left unapplied
    /// and unacked, and the consumer must be created again at the first unapplied sequence.
    Gap,
}

pub use crate::metrics::Phase;

async fn ack(message: &Message) {
    // Acks are fire-and-forget; a lost one means a redelivery, which is idempotent.
    if let Err(error) = message.ack().await {
        tracing::debug!(%error, "ack not sent; the message will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_revision_counts_as_unrenewed_only_once_seen_unchanged_for_the_period() {
        let mut watch = RenewalWatch::default();
        let period = Duration::from_millis(30);
        assert!(
            !watch.unrenewed_for(7, period),
            "first sight starts the watch"
        );
        assert!(!watch.unrenewed_for(7, period), "not a whole period yet");
        std::thread::sleep(period);
        assert!(watch.unrenewed_for(7, period));
        assert!(!watch.unrenewed_for(8, period), "a renewal starts it again");
        assert!(!watch.unrenewed_for(8, period));
    }
}
