//! The holder's loop: applies the shard log until cancelled or the lease is lost.
//!
//! Each turn: the lease first (a process woken from a pause applies nothing for a shard it
//! may have lost), then the outbox (no new work while digests are owed), the phase, a sweep
//! step and a due snapshot; then one fetch, applied as one batch. A failed batch is handed
//! back and retried with backoff, and the consumer is created again; a data dir failing for
//! `storage.give_up_after_secs` stops the process so a restart can recover the store.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use tokio_util::sync::CancellationToken;

use super::batch::Source;
use super::health::{Idle, Progress};
use super::{Continuity, Phase, ShardWorker, Tenure};
use crate::bus::ownership::ShardLease;
use crate::bus::{self, BusError};
use crate::retry::{until_ok, Backoff};
use crate::store::StoreError;

/// How often answered-request markers below the ack floor are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The loop's own state for one tenure.
struct Turns {
    backoff: Backoff,
    last_prune: Instant,
    progress: Progress,
    /// Set on a failed batch, cleared by the next one that is applied and flushed.
    store_failing_since: Option<Instant>,
    /// Set when the consumer must be created again before the next fetch.
    rebind: bool,
    give_up: Duration,
}

/// What a turn asks of the next one.
enum Then {
    Go,
    /// Wait a backoff step first (stop if cancelled meanwhile).
    Wait,
}

impl ShardWorker {
    /// Applies the shard log until cancelled or the lease is lost. Only the lease holder
    /// creates (or deletes) the shard's consumer, and only while its lease is fresh.
    pub(super) async fn consume(
        &mut self,
        lease: &ShardLease,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Tenure> {
        let Some(mut consumer) = self.bind(cancel).await? else {
            return Ok(Tenure::Stopped);
        };
        self.outbox.read_stream_limit(&self.shared).await;
        let mut turns = Turns {
            backoff: Backoff::default(),
            last_prune: Instant::now(),
            progress: Progress::new(self.store.applied()),
            store_failing_since: None,
            rebind: false,
            give_up: Duration::from_secs(self.shared.config.storage.give_up_after_secs),
        };
        loop {
            if lease.is_lost() || self.snapshots.is_fenced() {
                return Ok(Tenure::LeaseLost);
            }
            if !lease.is_fresh() {
                self.report(Phase::Waiting, "shard lease not renewed; not applying");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(self.cluster.renew_every() / 4) => continue,
                }
            }
            if turns.rebind {
                let Some(rebound) = self.bind(cancel).await? else {
                    break;
                };
                consumer = rebound;
                turns.rebind = false;
            }
            let then = match self.publish_owed().await {
                Then::Go => {
                    lease.note_published(self.published());
                    self.between_batches(&turns).await;
                    let tuning = &self.shared.config.tuning;
                    let fetched = tokio::select! {
                        _ = cancel.cancelled() => break,
                        fetched = bus::fetch_limited(&consumer, self.fetch_limit(), tuning.fetch_expires()) => fetched,
                    };
                    self.take(fetched, lease, &consumer, &mut turns).await?
                }
                wait => wait,
            };
            if matches!(then, Then::Wait) && !turns.backoff.wait(cancel).await {
                break;
            }
        }
        // Finish what this worker owes before stopping: digests of acked work, while the
        // shard is still this process's.
        if !self.outbox.is_empty() && lease.is_fresh() {
            if let Err(error) = self.outbox.publish(&self.shared, &self.store).await {
                let shard = self.store.shard();
                tracing::warn!(shard, %error, "digests left in the outbox; sent on next start");
            }
        }
        Ok(Tenure::Stopped)
    }

    /// Digests owed go out before new work is taken.
    async fn publish_owed(&mut self) -> Then {
        if self.outbox.is_empty() {
            return Then::Go;
        }
        match self.outbox.publish(&self.shared, &self.store).await {
            Ok(()) => Then::Go,
            Err(error) => {
                let waiting = self.outbox.wait_reason(&error);
                self.report(Phase::Stalled, waiting.clone());
                let shard = self.store.shard();
                tracing::warn!(shard, %error, "{waiting}; holding new work");
                Then::Wait
            }
        }
    }

    /// Between two batches: the phase, a sweep step, a due snapshot.
    async fn between_batches(&mut self, turns: &Turns) {
        match (turns.store_failing_since, turns.progress.stalled()) {
            (Some(_), _) => self.report(
                Phase::Stalled,
                "the data dir failed the last batch; retrying",
            ),
            (None, Some(reason)) => self.report(Phase::Stalled, reason.to_string()),
            (None, None) => self.health.note_applied(&self.shared, self.store.applied()),
        }
        self.sweep.step(&self.store, &self.shared);
        if self.snapshots.is_due(self.store.applied(), &self.shared) {
            let instance = &self.cluster.member().instance;
            self.snapshots
                .take(&self.store, &self.shared, instance)
                .await;
        }
    }

    /// What one fetch brought: nothing (look for a stall, prune), a batch to hand back (the
    /// lease went stale meanwhile), a batch to apply, or an error.
    async fn take(
        &mut self,
        fetched: Result<Vec<Message>, BusError>,
        lease: &ShardLease,
        consumer: &PullConsumer,
        turns: &mut Turns,
    ) -> anyhow::Result<Then> {
        let shard = self.store.shard();
        match fetched {
            Ok(messages) if messages.is_empty() => Ok(self.idle(consumer, turns).await),
            Ok(messages) if !lease.is_fresh() => {
                // Paused or cut off past the lease: another process may hold the shard
                // now. Hand the batch back unapplied.
                self.shared.metrics.lease_stale_batches.inc();
                for message in messages {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
                Ok(Then::Go)
            }
            Ok(messages) => {
                turns.backoff.reset();
                let applied = self.process(messages, Source::ShardLog).await;
                let then = self.applied(applied, turns)?;
                self.note_progress(&mut turns.progress);
                Ok(then)
            }
            Err(error) => {
                self.report(Phase::Stalled, format!("shard fetch failed: {error}"));
                tracing::warn!(shard, %error, "shard fetch failed; retrying");
                turns.rebind = true;
                Ok(Then::Wait)
            }
        }
    }

    /// Nothing fetched: a stall is reported and the consumer created again; otherwise, now
    /// and then, answered-request markers are pruned.
    async fn idle(&mut self, consumer: &PullConsumer, turns: &mut Turns) -> Then {
        if let Idle::Stalled(reason) = self.look_for_stall(&mut turns.progress).await {
            self.shared.metrics.shard_stalls.inc();
            tracing::warn!(shard = self.store.shard(), "{reason}");
            self.report(Phase::Stalled, reason.clone());
            turns.progress.stall(reason);
            turns.rebind = true;
            return Then::Wait;
        }
        if turns.last_prune.elapsed() >= PRUNE_EVERY {
            turns.last_prune = Instant::now();
            self.prune_answered(consumer).await;
        }
        Then::Go
    }

    /// After a batch: a gap takes the log again from the first message not applied; a store
    /// failure is retried, until it has lasted `storage.give_up_after_secs`.
    fn applied(
        &mut self,
        applied: Result<Continuity, StoreError>,
        turns: &mut Turns,
    ) -> anyhow::Result<Then> {
        let shard = self.store.shard();
        match applied {
            Ok(Continuity::Contiguous) => {
                turns.store_failing_since = None;
                Ok(Then::Go)
            }
            Ok(Continuity::Gap) => {
                // A message came before one it follows (a redelivery after a failure).
                turns.store_failing_since = None;
                turns.rebind = true;
                Ok(Then::Go)
            }
            Err(error) => {
                self.shared.metrics.store_failures.inc();
                self.report(Phase::Stalled, format!("batch not applied: {error}"));
                tracing::error!(shard, %error, "batch not applied; it will be redelivered");
                let since = *turns.store_failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= turns.give_up {
                    anyhow::bail!(
                        "shard {shard}: the data dir has failed for {}s ({error}); stopping so \
                         a restart can recover the store (storage.give_up_after_secs)",
                        turns.give_up.as_secs()
                    );
                }
                turns.rebind = true;
                Ok(Then::Wait)
            }
        }
    }

    pub(super) fn fetch_limit(&self) -> bus::Limit {
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
