//! One shard worker per owned shard: takes the shard's lease, brings the shard's state up to
//! date, applies its shard stream to sled in batches and answers digest requests through the
//! outbox; snapshots the state into JetStream as it goes and once more when it lets go.
//!
//! - `mod.rs` (here): the life of a worker (admit, restore, consume, hand off), binding.
//! - `legacy.rs`: the upgrade: drains the previous release's WorkQueue shard stream first.
//! - `restore.rs`: local state, or the newest good snapshot, as the base to replay from.
//! - `answer.rs`: answering a digest request: what is due (`domain`), rendered (`wire`),
//!   queued in the batch's overlay.
//! - `consume.rs`: the holder's loop: publish what is owed, then fetch, apply, ack; stalls,
//!   store failures and a lost lease end or pause it.
//! - `batch.rs`: one fetched batch → one [`crate::store::ShardWrite`] overlay → one atomic
//!   sled batch (with the shard stream sequence it reaches) → one group flush → acks and dead
//!   letters. Envelopes are unpacked here.
//!
//! The parts, each the only owner of its fields (their invariants are written where each is
//! defined):
//! - `outbox.rs` ([`outbox::Outbox`]): digest parts not yet acknowledged and the requests
//!   they answer; publishing (Msg-Id from the outbox sequence), PubAcks, refusals.
//! - `snapshot.rs` ([`snapshot::Snapshotter`]): when to snapshot, storing it fenced, purging
//!   the shard stream behind it; the tenure's fence.
//! - `health.rs` ([`health::Health`]): the phase and readiness, reported together; the
//!   replay target; noticing a stalled shard.
//! - `standby.rs`: the warm standby's reader and how current its copy is.
//! - `sweep.rs`: the retention sweep. `waiting.rs`: why a worker is not consuming yet.
//!
//! A worker's life is a loop of tenures: admit (take the lease) → serve → let go. A tenure
//! ends when the worker is cancelled (graceful stop: outbox, final snapshot, lease released)
//! or when a renewal finds the lease lost (a pause or a cut-off outlived it): then nothing
//! more is applied or published, what was fetched is handed back, and the worker waits for
//! the lease again like any owner, restoring from the newest snapshot if that is newer than
//! its own data dir.

pub mod answer;
mod batch;
mod consume;
mod health;
mod legacy;
mod outbox;
mod restore;
mod snapshot;
mod standby;
mod sweep;
mod waiting;

use std::time::{Duration, Instant};

use async_nats::jetstream::Message;
use tokio_util::sync::CancellationToken;

use crate::bus::ownership::{Acquired, Published, ShardLease};
use crate::bus::Cluster;
use crate::shared::Shared;
use crate::store::{GroupFlusher, ShardStore};
use health::Health;
use outbox::Outbox;
use snapshot::Snapshotter;
use standby::Standby;
use sweep::Sweep;
use waiting::Waiting;

pub struct ShardWorker {
    shared: Shared,
    cluster: Cluster,
    store: ShardStore,
    flusher: GroupFlusher,
    outbox: Outbox,
    sweep: Sweep,
    snapshots: Snapshotter,
    health: Health,
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
        ShardWorker {
            snapshots: Snapshotter::new(shard, &shared),
            health: Health::new(shard),
            primary: shared.config.shards.is_primary(store.shard()),
            started: Instant::now(),
            shared,
            cluster,
            store,
            flusher,
            outbox: Outbox::new(shard),
            sweep: Sweep::new(),
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
        let count = self.shared.config.shards.count;
        if !self.snapshots.fence_manifests(count, cancel).await? {
            return Ok(Tenure::Stopped);
        }
        self.outbox.load(&self.store, &self.shared);
        let drained = self.drain_previous_release(lease, cancel).await?;
        if self.snapshots.is_fenced() || lease.is_lost() {
            return Ok(Tenure::LeaseLost);
        }
        if !drained || !self.restore(cancel).await? {
            return Ok(Tenure::Stopped);
        }
        let tenure = self.consume(lease, cancel).await?;
        // The snapshot taken when the worker lets go, so the next owner restores exactly
        // where this one stopped and replays nothing; skipped when the newest snapshot
        // already covers the state and no digest waits in the outbox.
        let current = self.snapshots.covers(self.store.applied()) && self.outbox.is_empty();
        if matches!(tenure, Tenure::Stopped) && lease.is_fresh() && !current {
            let instance = &self.cluster.member().instance;
            self.snapshots
                .take(&self.store, &self.shared, instance)
                .await;
        }
        Ok(tenure)
    }

    /// Forgets what a tenure held in memory: the next one starts from the store and the
    /// broker. Fetched requests not acked are handed back by JetStream after `ack_wait` (or
    /// at once to the next holder, whose consumer starts at its state's sequence).
    fn forget_tenure(&mut self) {
        self.outbox.forget();
        self.snapshots.forget_tenure();
        self.health.forget_tenure();
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
