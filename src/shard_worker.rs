//! One shard worker per owned shard: applies its shard stream to sled in batches and answers
//! digest requests through the outbox.
//!
//! Per batch: decode every message into one [`ShardWrite`] overlay → one atomic sled batch →
//! one group flush → ack the status changes → publish the batch's digests (Msg-Id from the
//! outbox sequence) → on their PubAcks, drop them from the outbox and ack the requests.

use std::time::{Duration, Instant};

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::bus::ownership::{Acquired, Home, LeaseRecord, ShardLease};
use crate::bus::{
    self, BusError, Cluster, DeadLetter, Member, Outgoing, DIGEST_ID_HEADER, DIGEST_PART_HEADER,
};
use crate::retry::{until_ok, Backoff};
use crate::shared::Shared;
use crate::store::{
    Applied, DigestOptions, DigestOutcome, GroupFlusher, OutboxEntry, ShardStore, StoreError,
};
use crate::wire::{self, Input, Rejection};

/// Redelivery delay for a batch the store could not take.
const STORE_RETRY_DELAY: Duration = Duration::from_secs(2);
/// How often answered-request markers below the ack floor are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Room left in every digest message for its headers (Msg-Id, digest id and part: about 150
/// bytes), so payload plus headers stay within the server's `max_payload`.
const HEADER_ROOM: usize = 512;

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

/// Progress of the incremental retention sweep over this shard's alarms.
struct Sweep {
    /// Where the running pass continues; `None` between passes.
    cursor: Option<Vec<u8>>,
    running: bool,
    last_pass: Instant,
    /// The newest ChangedAt this worker has applied. Retention is measured from it, not
    /// from the wall clock alone: replayed or backfilled events with old timestamps must not
    /// expire each other's tombstones (a late, older CRITICAL would then resurrect an alarm).
    newest_seen: Option<chrono::DateTime<chrono::Utc>>,
}

/// Why a shard worker is not consuming yet.
#[derive(PartialEq)]
enum Waiting {
    /// The shard's state lives in another instance's data dir.
    NotHome(Member),
    /// Another process applies the shard (a previous run of this instance whose lease has
    /// not expired, or a copy of this data dir).
    LeaseHeld(LeaseRecord),
    /// The ownership buckets could not be read.
    Unavailable(String),
}

impl Waiting {
    /// Short, for `/readyz`.
    fn reason(&self) -> String {
        match self {
            Waiting::NotHome(home) => format!("its home is {home}"),
            Waiting::LeaseHeld(lease) => {
                format!(
                    "lease held by process {} of {}",
                    lease.process, lease.holder
                )
            }
            Waiting::Unavailable(error) => format!("ownership unknown: {error}"),
        }
    }

    /// Long, with the fix, once per change.
    fn log(&self, shard: u16, lease_period: Duration) {
        match self {
            Waiting::NotHome(home) => tracing::error!(
                shard,
                %home,
                "not consuming shard {shard}: its state lives in the data dir of {home}, not \
                 here, so applying it here would lose that state. Fix: remove {shard} from \
                 shards.owned on this instance, or move the shard here (stop both; \
                 `alarm-digest shard export --shard {shard}` there; `alarm-digest shard \
                 import` here; README, 'Rebalancing runbook')"
            ),
            Waiting::LeaseHeld(lease) => tracing::warn!(
                shard,
                holder = %lease.holder,
                process = %lease.process,
                "waiting for shard {shard}'s lease: another process holds it (a previous run \
                 of this instance, or a copy of this data dir); it expires {}s after its \
                 holder stops renewing",
                lease_period.as_secs()
            ),
            Waiting::Unavailable(error) => {
                tracing::warn!(shard, %error, "shard ownership unknown; retrying")
            }
        }
    }
}

/// What to do with one message of a batch once the batch is durable.
enum Disposition {
    /// Applied (or a duplicate): ack after the flush.
    Ack,
    /// A digest was queued: ack after its PubAck.
    AfterDigest,
    /// Dead-letter with this reason, then ack.
    DeadLetter { code: &'static str, error: String },
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

    /// One sweep step if a pass is running or due: at most `sweep_page` alarms examined.
    fn sweep_step(&mut self) {
        let retention = &self.shared.config.retention;
        if !self.sweep.running {
            if self.sweep.last_pass.elapsed() < Duration::from_secs(retention.sweep_every_secs) {
                return;
            }
            self.sweep.running = true;
        }
        // The reference instant: the newest event applied, never later than the clock (a
        // far-future ChangedAt must not expire everything). No events yet: nothing to judge.
        let Some(newest_seen) = self.sweep.newest_seen else {
            return;
        };
        let now = newest_seen.min(chrono::Utc::now());
        match self.store.sweep_cleared(
            self.sweep.cursor.as_deref(),
            retention.sweep_page,
            now,
            retention.cleared_after(),
        ) {
            Ok((removed, next)) => {
                if removed > 0 {
                    self.shared.metrics.tombstones_swept.inc_by(removed as u64);
                }
                if next.is_none() {
                    self.sweep.running = false;
                    self.sweep.last_pass = Instant::now();
                    self.shared.metrics.sweep_passes.inc();
                }
                self.sweep.cursor = next;
            }
            Err(error) => {
                tracing::warn!(shard = self.store.shard(), %error, "retention sweep step failed");
                self.sweep.running = false;
                self.sweep.last_pass = Instant::now();
            }
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
                fetched = bus::fetch(&consumer, tuning.worker_batch, tuning.fetch_expires()) => fetched,
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

    /// Applies one batch. An `Err` means nothing of it was acked; JetStream redelivers it.
    async fn process(&mut self, messages: Vec<Message>) -> Result<(), StoreError> {
        let started = Instant::now();
        let shared = self.shared.clone();
        let shard = self.store.shard();
        let limits = &shared.config.limits;
        let options = DigestOptions {
            skip_empty: shared.config.digest.skip_empty,
            max_part_bytes: self.part_limit(),
            written_at: chrono::Utc::now(),
        };
        let mut dispositions = Vec::with_capacity(messages.len());
        let mut counts = BatchCounts::default();
        let mut write = self.store.begin();
        for message in &messages {
            let sequence = shared.note_delivery(message);
            let decoded = match shared.topology.shard_kind(shard, &message.subject) {
                Some(kind) => wire::decode(kind, &message.payload, limits.max_payload_bytes),
                None => Err(Rejection::UnknownSubject(message.subject.to_string())),
            };
            let disposition = match decoded {
                Err(rejection) => Disposition::DeadLetter {
                    code: rejection.code(),
                    error: rejection.to_string(),
                },
                Ok(input) if shared.topology.shard_of(input.user_id()) != shard => {
                    Disposition::DeadLetter {
                        code: "misrouted",
                        error: format!(
                            "user belongs to shard {}, not {shard}",
                            shared.topology.shard_of(input.user_id())
                        ),
                    }
                }
                Ok(Input::StatusChange(change)) => {
                    let at = change.observation.changed_at;
                    if self.sweep.newest_seen.is_none_or(|seen| at > seen) {
                        self.sweep.newest_seen = Some(at);
                    }
                    match write.apply(&change, limits.max_alarms_per_user) {
                        Ok(Applied::Changed) => {
                            counts.applied += 1;
                            Disposition::Ack
                        }
                        Ok(Applied::Unchanged) => {
                            counts.unchanged += 1;
                            Disposition::Ack
                        }
                        Ok(Applied::TooManyAlarms) => Disposition::DeadLetter {
                            code: "too_many_alarms",
                            error: format!(
                                "the user already has limits.max_alarms_per_user = {} alarms",
                                limits.max_alarms_per_user
                            ),
                        },
                        Err(error) => unreadable_or_fail(error)?,
                    }
                }
                Ok(Input::DigestRequest(request)) => {
                    match write.digest(&request.user_id, sequence, &options) {
                        Ok(DigestOutcome::Queued { parts, .. }) => {
                            counts.requests += 1;
                            if parts > 1 {
                                counts.split_digests += 1;
                            }
                            Disposition::AfterDigest
                        }
                        Ok(DigestOutcome::SkippedEmpty) => {
                            counts.requests += 1;
                            counts.skipped_empty += 1;
                            Disposition::Ack
                        }
                        Ok(DigestOutcome::AlreadyAnswered) => {
                            counts.duplicates += 1;
                            Disposition::Ack
                        }
                        Err(error) => unreadable_or_fail(error)?,
                    }
                }
            };
            dispositions.push((disposition, sequence));
        }
        let queued = match write.commit() {
            Ok(queued) => queued,
            Err(error) => return Err(self.nak_all(messages, error).await),
        };
        if let Err(error) = self.flusher.flush().await {
            return Err(self.nak_all(messages, error).await);
        }
        counts.record(&shared.metrics);
        self.outbox.extend(queued);
        self.note_outbox();

        let mut dead_letters = Vec::new();
        let mut records = Vec::new();
        for (message, (disposition, sequence)) in messages.into_iter().zip(dispositions) {
            match disposition {
                Disposition::Ack => ack(&message).await,
                Disposition::AfterDigest => self.held.push(message),
                Disposition::DeadLetter { code, error } => {
                    shared.metrics.rejected(code);
                    tracing::warn!(
                        message = "rejected shard message; dead-lettering it",
                        shard,
                        reason = code,
                        %error,
                        subject = %message.subject,
                        stream_sequence = sequence,
                    );
                    let record = DeadLetter {
                        reason: code,
                        error: &error,
                        original_subject: &message.subject,
                        stream: &shared.topology.shard_stream(shard),
                        stream_sequence: sequence,
                    };
                    records.push(record.outgoing(
                        &shared.config.streams.dead_letter_subject,
                        message.payload.clone(),
                    ));
                    dead_letters.push(message);
                }
            }
        }
        if let Err(error) = self.publish_outbox().await {
            // The digests are durable in the outbox; the loop retries before taking more.
            tracing::warn!(shard, %error, "digest publish failed; will retry");
        }
        let outcomes = bus::publish_windowed(&shared.js, records).await;
        for (message, outcome) in dead_letters.into_iter().zip(outcomes) {
            match outcome {
                Ok(()) => ack(&message).await,
                Err(error) => {
                    tracing::warn!(shard, %error, "dead letter not stored; will be redelivered");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(STORE_RETRY_DELAY)))
                        .await;
                }
            }
        }
        shared.metrics.observe_batch(started.elapsed());
        Ok(())
    }

    async fn nak_all(&self, messages: Vec<Message>, error: StoreError) -> StoreError {
        for message in messages {
            let _ = message
                .ack_with(AckKind::Nak(Some(STORE_RETRY_DELAY)))
                .await;
        }
        error
    }

    /// Publishes every outbox entry (pipelined) to the output subject, drops the acknowledged
    /// ones, returns the ones the broker refuses for good (their alarms become unsent again),
    /// and acks the held requests once the outbox is empty.
    async fn publish_outbox(&mut self) -> Result<(), BusError> {
        let shared = &self.shared;
        let subject = Subject::from(shared.config.streams.output_subject.as_str());
        let outgoing = self
            .outbox
            .iter()
            .map(|(_, entry)| {
                let mut headers = HeaderMap::new();
                headers.insert(NATS_MESSAGE_ID, entry.msg_id.as_str());
                headers.insert(DIGEST_ID_HEADER, entry.digest_id.as_str());
                headers.insert(
                    DIGEST_PART_HEADER,
                    format!("{}/{}", entry.part, entry.parts).as_str(),
                );
                Outgoing {
                    subject: subject.clone(),
                    headers,
                    payload: Bytes::from(entry.payload.clone()),
                }
            })
            .collect();
        let outcomes = bus::publish_windowed(&shared.js, outgoing).await;
        let mut delivered = Vec::with_capacity(outcomes.len());
        let mut refused = Vec::new();
        let mut first_error = None;
        for ((sequence, entry), outcome) in self.outbox.iter().zip(outcomes) {
            match outcome {
                Ok(()) => delivered.push(*sequence),
                Err(error) if error.is_refused() => {
                    tracing::error!(
                        shard = self.store.shard(),
                        digest = %entry.digest_id,
                        part = entry.part,
                        parts = entry.parts,
                        bytes = entry.payload.len(),
                        %error,
                        "digest part refused by the broker for good; its alarms go back to \
                         unsent and the user's next digest carries them"
                    );
                    refused.push((*sequence, entry.clone()));
                }
                Err(error) => {
                    shared.metrics.publish_failures.inc();
                    first_error.get_or_insert(error);
                }
            }
        }
        shared
            .metrics
            .digests_published
            .inc_by(delivered.len() as u64);
        if let Err(error) = self.store.remove_outbox(&delivered) {
            // They would be published again with the same Msg-Id; JetStream drops copies.
            tracing::warn!(shard = self.store.shard(), %error, "cannot drop published digests");
        }
        let mut done = delivered;
        if !refused.is_empty() {
            match self.store.return_to_unsent(&refused) {
                Ok(_) => {
                    shared
                        .metrics
                        .digest_parts_refused
                        .inc_by(refused.len() as u64);
                    done.extend(refused.iter().map(|(sequence, _)| *sequence));
                }
                Err(error) => {
                    first_error.get_or_insert(BusError::transient(
                        "returning refused digest parts to unsent",
                        error,
                    ));
                }
            }
        }
        self.outbox.retain(|(sequence, _)| !done.contains(sequence));
        self.note_outbox();
        if !refused.is_empty() {
            // The stream's limit may have changed under us: fit the next digest to it.
            self.read_stream_limit().await;
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        let now_nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        for message in self.held.drain(..) {
            // Request stored in the shard stream (the broker's clock) → digest acknowledged.
            if let Ok(info) = message.info() {
                let stored = i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0);
                let seconds = (now_nanos.saturating_sub(stored)).max(0) as f64 / 1e9;
                self.shared.metrics.digest_latency.observe(seconds);
            }
            ack(&message).await;
        }
        Ok(())
    }

    /// The most a digest part's payload may weigh: the connected server's `max_payload` (read
    /// per batch: it can differ per server of a cluster) or the output stream's
    /// `max_msg_size`, whichever is smaller, less room for the headers.
    fn part_limit(&self) -> usize {
        let server = self.shared.js.client().max_payload();
        self.stream_limit
            .map_or(server, |stream| stream.min(server))
            .saturating_sub(HEADER_ROOM)
    }

    async fn read_stream_limit(&mut self) {
        let output = &self.shared.config.streams.output_stream;
        match self.shared.js.get_stream(output).await {
            Ok(stream) => {
                let limit = stream.cached_info().config.max_message_size;
                self.stream_limit = usize::try_from(limit).ok().filter(|limit| *limit > 0);
            }
            // The stream may be away (it is then recreated); the server's limit still holds.
            Err(error) => tracing::debug!(%error, "cannot read the output stream's limits"),
        }
    }

    /// Publishes the outbox's depth and its oldest entry's age (gauges, per shard).
    fn note_outbox(&self) {
        let oldest = self
            .outbox
            .iter()
            .filter_map(|(_, entry)| entry.written_at_ms)
            .min();
        self.shared
            .metrics
            .set_outbox(self.store.shard(), self.outbox.len(), oldest);
    }

    /// Why this shard takes no new work, for `/readyz`.
    fn outbox_wait_reason(&self, error: &BusError) -> String {
        let now = chrono::Utc::now().timestamp_millis();
        let oldest = self
            .outbox
            .iter()
            .filter_map(|(_, entry)| entry.written_at_ms)
            .min()
            .unwrap_or(now);
        format!(
            "{} digest part(s) unpublished, oldest for {}s: {error}",
            self.outbox.len(),
            (now - oldest).max(0) / 1000
        )
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

/// What one batch did, added to the metrics only once the batch is durable (a failed batch
/// is redelivered and would otherwise be counted twice).
#[derive(Default)]
struct BatchCounts {
    applied: u64,
    unchanged: u64,
    requests: u64,
    skipped_empty: u64,
    duplicates: u64,
    split_digests: u64,
}

impl BatchCounts {
    fn record(&self, metrics: &crate::metrics::Metrics) {
        metrics.events_applied.inc_by(self.applied);
        metrics.events_unchanged.inc_by(self.unchanged);
        metrics.digest_requests.inc_by(self.requests);
        metrics.digests_skipped_empty.inc_by(self.skipped_empty);
        metrics.duplicate_requests.inc_by(self.duplicates);
        metrics.digests_split.inc_by(self.split_digests);
    }
}

/// A record that cannot be decoded will never decode: dead-letter the message instead of
/// failing the batch forever. Any other store error fails the batch.
fn unreadable_or_fail(error: StoreError) -> Result<Disposition, StoreError> {
    match error {
        StoreError::Codec { .. } => Ok(Disposition::DeadLetter {
            code: "unreadable_state",
            error: error.to_string(),
        }),
        other => Err(other),
    }
}

async fn ack(message: &Message) {
    // Acks are fire-and-forget; a lost one means a redelivery, which is idempotent.
    if let Err(error) = message.ack().await {
        tracing::debug!(%error, "ack not sent; the message will be redelivered");
    }
}
