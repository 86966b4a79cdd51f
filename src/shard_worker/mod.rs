//! One shard worker per owned shard: applies its shard stream to sled in batches and answers
//! digest requests through the outbox.
//!
//! - `mod.rs` (here): admission (home and lease), the consume loop, binding.
//! - `batch.rs`: one fetched batch → one [`crate::store::ShardWrite`] overlay → one atomic
//!   sled batch → one group flush → acks and dead letters. Envelopes are unpacked here.
//! - `outbox.rs`: publishing digest parts (Msg-Id from the outbox sequence), PubAcks, refusals.
//! - `waiting.rs`: why a worker is not consuming yet. `sweep.rs`: the retention sweep.

mod batch;
mod outbox;
mod sweep;
mod waiting;

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use tokio_util::sync::CancellationToken;

use crate::bus::ownership::{Acquired, Home, ShardLease};
use crate::bus::{self, BusError, Cluster};
use crate::retry::{until_ok, Backoff};
use crate::shared::Shared;
use crate::store::{GroupFlusher, OutboxEntry, ShardStore};
use sweep::Sweep;
use waiting::Waiting;

/// How often answered-request markers below the ack floor are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct ShardWorker {
    shared: Shared,
    cluster: Cluster,
    store: ShardStore,
    flusher: GroupFlusher,
    /// Digests written but not yet acknowledged by JetStream (mirrors the stored outbox).
    outbox: Vec<(u64, OutboxEntry)>,
    /// Digest requests whose digests are in `outbox`; acked once it is empty.
    held: Vec<Message>,
    part: String,
    sweep: Sweep,
    /// The output stream's `max_msg_size`, if it has one: read when consuming starts and again
    /// after a refusal, so the next digest is split to fit it.
    stream_limit: Option<usize>,
}

impl ShardWorker {
    pub fn new(
        shared: Shared,
        cluster: Cluster,
        store: ShardStore,
        flusher: GroupFlusher,
    ) -> ShardWorker {
        let part = format!("shard {}", store.shard());
        ShardWorker {
            shared,
            cluster,
            store,
            flusher,
            outbox: Vec::new(),
            held: Vec::new(),
            part,
            stream_limit: None,
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
        self.shared.readiness.set(self.part.clone(), false);
        let Some(lease) = self.admit(&cancel).await else {
            return Ok(());
        };
        let metrics = self.shared.metrics.clone();
        metrics.shards_consuming.inc();
        let result = self.consume(&lease, &cancel).await;
        metrics.shards_consuming.dec();
        lease.release().await;
        result
    }

    /// Waits until this instance is the shard's home and holds its lease. An instance that
    /// is not the home never consumes the shard, even while the home is down: the home's
    /// data dir holds the shard's alarms, and applying without them loses alarms.
    async fn admit(&self, cancel: &CancellationToken) -> Option<ShardLease> {
        let shard = self.store.shard();
        let mut last: Option<Waiting> = None;
        loop {
            let waiting = match self.cluster.home(shard).await {
                Ok(Home::Here) => match self.cluster.acquire(shard).await {
                    Ok(Acquired::Held(lease)) => {
                        tracing::info!(shard, "shard lease taken; consuming");
                        return Some(*lease);
                    }
                    Ok(Acquired::HeldBy(record)) => Waiting::LeaseHeld(record),
                    Err(error) => Waiting::Unavailable(error.to_string()),
                },
                Ok(Home::Elsewhere(home)) => Waiting::NotHome(home),
                Err(error) => Waiting::Unavailable(error.to_string()),
            };
            if last.as_ref() != Some(&waiting) {
                waiting.log(shard, self.cluster.lease_period());
            }
            self.shared
                .readiness
                .block(self.part.clone(), waiting.reason());
            last = Some(waiting);
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(self.cluster.renew_every()) => {}
            }
        }
    }

    async fn consume(
        &mut self,
        lease: &ShardLease,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let shard = self.store.shard();
        let Some(mut consumer) = self.bind(cancel).await? else {
            return Ok(());
        };
        self.read_stream_limit().await;
        // Digests stored before a crash go out before anything new is taken.
        match self.store.pending_outbox() {
            Ok(mut pending) => {
                // Records of the release before parts carry no time: count from now.
                let now = chrono::Utc::now().timestamp_millis();
                for (_, entry) in &mut pending {
                    entry.written_at_ms.get_or_insert(now);
                }
                self.outbox = pending;
                self.note_outbox();
            }
            Err(error) => tracing::error!(shard, %error, "cannot read the outbox"),
        }
        let mut backoff = Backoff::default();
        let mut last_prune = Instant::now();
        // Set on a failed batch, cleared by the next one that is applied and flushed.
        let mut store_failing_since: Option<Instant> = None;
        let give_up = Duration::from_secs(self.shared.config.storage.give_up_after_secs);
        loop {
            if !self.outbox.is_empty() {
                if let Err(error) = self.publish_outbox().await {
                    let waiting = self.outbox_wait_reason(&error);
                    self.shared
                        .readiness
                        .block(self.part.clone(), waiting.clone());
                    tracing::warn!(shard, %error, "{waiting}; holding new work");
                    if !backoff.wait(cancel).await {
                        break;
                    }
                    continue;
                }
            }
            if !lease.is_fresh() {
                self.shared
                    .readiness
                    .block(self.part.clone(), "shard lease not renewed; not applying");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(self.cluster.renew_every() / 4) => continue,
                }
            }
            self.shared
                .readiness
                .set(self.part.clone(), store_failing_since.is_none());
            self.sweep_step();
            let tuning = &self.shared.config.tuning;
            let fetched = tokio::select! {
                _ = cancel.cancelled() => break,
                fetched = bus::fetch_limited(&consumer, self.fetch_limit(), tuning.fetch_expires()) => fetched,
            };
            match fetched {
                Ok(messages) if messages.is_empty() => {
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
                        Ok(()) => store_failing_since = None,
                        Err(error) => {
                            self.shared.metrics.store_failures.inc();
                            self.shared.readiness.set(self.part.clone(), false);
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
                        }
                    }
                }
                Err(error) => {
                    self.shared.readiness.set(self.part.clone(), false);
                    tracing::warn!(shard, %error, "shard fetch failed; retrying");
                    if !backoff.wait(cancel).await {
                        break;
                    }
                    if let Some(rebound) = self.bind(cancel).await? {
                        consumer = rebound;
                    }
                }
            }
        }
        // Finish what this worker owes before stopping: digests of acked work.
        if !self.outbox.is_empty() {
            if let Err(error) = self.publish_outbox().await {
                tracing::warn!(shard, %error, "digests left in the outbox; sent on next start");
            }
        }
        Ok(())
    }

    fn fetch_limit(&self) -> bus::Limit {
        bus::Limit::shard_fetch(
            self.shared.config.tuning.worker_batch,
            self.shared.js.client().max_payload(),
        )
    }

    async fn bind(&self, cancel: &CancellationToken) -> Result<Option<PullConsumer>, BusError> {
        let shared = &self.shared;
        let shard = self.store.shard();
        until_ok("binding a shard consumer", cancel, || {
            shared
                .topology
                .worker_consumer(&shared.js, shard, &shared.config.tuning)
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

async fn ack(message: &Message) {
    // Acks are fire-and-forget; a lost one means a redelivery, which is idempotent.
    if let Err(error) = message.ack().await {
        tracing::debug!(%error, "ack not sent; the message will be redelivered");
    }
}
