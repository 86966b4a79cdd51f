//! The router: reads every input partition stream through one durable consumer per stream,
//! shared by every instance, and republishes each message to its user's shard stream: status
//! changes packed into one envelope per shard (`bus::envelope`), digest requests as single
//! messages. Envelopes are in the format the cluster records (`bus/envelope_format.rs`),
//! read again with every look for partitions. One loop per partition stream, all on the router's thread; a supervisor starts
//! a loop for each partition stream it finds (`bus/partitions.rs`), retired ones included.
//!
//! Publishes of a batch are pipelined; a separate acker task awaits their PubAcks and only
//! then acks the inputs (every input of an envelope after that envelope's PubAck), so the next
//! fetch overlaps the previous batch's round trips.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{AckKind, Message};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::envelope::{self, Content, Entry, Format, Packer, Sealed};
use crate::bus::{self, BusError, Cluster, DeadLetter, Nodes, Outgoing};
use crate::retry::{until_ok, Backoff};
use crate::shared::Shared;
use crate::wire::{self, Input, InputKind, Rejection};

/// How long JetStream waits before redelivering an input whose republish failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// How often the supervisor looks for input partition streams it does not route yet, and
/// reads the cluster's envelope format again.
pub const DISCOVER_EVERY: Duration = Duration::from_secs(5);

/// Routed batches the acker awaits at once. With one queued for it and the one being
/// published, `QUEUED_BATCHES + 2` batches of PubAcks may be outstanding at once.
pub const QUEUED_BATCHES: usize = 2;

/// One publish and the inputs it carries: acked together once it is stored.
type Pending = Vec<(Result<PublishAckFuture, BusError>, Vec<Message>, Routed)>;

#[derive(Clone, Copy)]
enum Routed {
    ToShard,
    DeadLettered,
}

#[derive(Clone)]
pub struct Router {
    shared: Shared,
    /// Republishes go out on their own connection: one connection's read loop then carries
    /// only fetched messages, the other's only PubAcks (measured ~25% more routed msgs/s).
    publisher: async_nats::jetstream::Context,
    /// Whether the first input that no mapping spread has been logged (once per process).
    unmapped_logged: Arc<AtomicBool>,
    /// Where the cluster records the envelope format to write (`bus/envelope_format.rs`).
    cluster: Cluster,
    /// That format's number, as last read; each round packs in the format it finds here.
    envelopes: Arc<AtomicU8>,
    /// A connection on each broker node: a partition is read through its consumer's leader.
    nodes: Arc<Nodes>,
}

/// How often a partition's loop asks which node leads its consumer.
const NEAR_LEADER_EVERY: Duration = Duration::from_secs(10);

/// Which node a partition's loop reads through, and when it last asked.
struct Near {
    on: Option<String>,
    checked: Instant,
}

impl Default for Near {
    fn default() -> Near {
        Near {
            on: None,
            checked: Instant::now(),
        }
    }
}

/// One partition's loop: which stream it reads, and the name its readiness goes by (none
/// for a retired partition: draining it never makes an instance unready).
struct Partition {
    stream: String,
    part: Option<String>,
}

impl Partition {
    fn ready(&self, readiness: &crate::readiness::Readiness, ready: bool) {
        if let Some(part) = &self.part {
            readiness.set(part, ready);
        }
    }
}

impl Router {
    /// `publisher`: the connection republishes go out on. Each partition's loop publishes
    /// through a JetStream context of its own on it, bounded by [`Router::in_flight_bound`].
    pub fn new(
        shared: Shared,
        publisher: async_nats::Client,
        cluster: Cluster,
        nodes: Nodes,
    ) -> Router {
        let bound = Router::in_flight_bound(&shared.config.tuning);
        Router {
            publisher: bus::jetstream(publisher, bound),
            shared,
            unmapped_logged: Arc::default(),
            cluster,
            envelopes: Arc::new(AtomicU8::new(Format::V1.number())),
            nodes: Arc::new(nodes),
        }
    }

    /// The envelope format a round packs in.
    fn envelope_format(&self) -> Format {
        Format::from_number(self.envelopes.load(Ordering::Relaxed)).unwrap_or(Format::V1)
    }

    /// Reads the format the cluster records again; a failed read keeps the one known.
    async fn follow_envelope_format(&self) -> Result<(), BusError> {
        let recorded = self.cluster.envelope_format().await?.format;
        let before = self.envelopes.swap(recorded.number(), Ordering::Relaxed);
        if before != recorded.number() {
            tracing::info!(
                format = recorded.header(),
                "routing status changes in the cluster's envelope format"
            );
        }
        Ok(())
    }

    /// The PubAcks one partition's loop may hold un-awaited: its batches in flight, each up
    /// to `router_batch` publishes.
    pub fn in_flight_bound(tuning: &crate::config::TuningConfig) -> usize {
        tuning.router_batch * (QUEUED_BATCHES + 2) + 64
    }

    /// This router with a publish context (in-flight permits) of its own, for one partition's
    /// loop: loops sharing one context's permits could each hold some mid-batch and wait for
    /// the others' forever.
    fn with_own_window(&self) -> Router {
        let bound = Router::in_flight_bound(&self.shared.config.tuning);
        Router {
            publisher: bus::jetstream(self.publisher.client(), bound),
            ..self.clone()
        }
    }

    /// Envelope limits: the configured ones, always under the publishing server's limit.
    fn envelope_limits(&self) -> envelope::Limits {
        let tuning = &self.shared.config.tuning;
        let server = self
            .publisher
            .client()
            .max_payload()
            .saturating_sub(bus::HEADER_ROOM);
        envelope::Limits {
            max_entries: tuning.envelope_max_events,
            max_bytes: tuning.envelope_max_bytes.min(server),
        }
    }

    /// Routes every input partition until cancelled: the configured ones from the start,
    /// any other partition stream (a retired one, or one a larger count added) once found.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), BusError> {
        let shared = &self.shared;
        let configured = shared.topology.input_partitions();
        let known = until_ok("reading the envelope format", &cancel, || {
            self.follow_envelope_format()
        })
        .await?;
        if known.is_none() {
            return Ok(());
        }
        let mut routing = BTreeSet::new();
        let mut loops = JoinSet::new();
        let mut found: BTreeSet<u16> = (0..configured).collect();
        loop {
            for number in found {
                if !routing.insert(number) {
                    continue;
                }
                if number >= configured {
                    tracing::warn!(
                        stream = %shared.topology.partition_stream(number),
                        input_partitions = configured,
                        "routing a retired input partition stream until it is empty; \
                         `alarm-digest partitions prune` deletes it once the server's \
                         mapping no longer sends to it"
                    );
                }
                let router = self.with_own_window();
                let cancel = cancel.clone();
                loops.spawn(async move {
                    let ended = router.run_partition(number, cancel).await;
                    (number, ended)
                });
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(joined) = loops.join_next(), if !loops.is_empty() => {
                    match joined {
                        Ok((number, Err(error))) => {
                            tracing::error!(partition = number, %error, "a partition's router stopped");
                            routing.remove(&number);
                        }
                        Ok((number, Ok(()))) => {
                            routing.remove(&number);
                        }
                        Err(error) => tracing::error!(%error, "a partition's router panicked"),
                    }
                }
                _ = tokio::time::sleep(DISCOVER_EVERY) => {}
            }
            if let Err(error) = self.follow_envelope_format().await {
                tracing::debug!(%error, "envelope format not read; looking again later");
            }
            found = match shared.topology.existing_partitions(&shared.js).await {
                Ok(existing) => existing.into_iter().chain(0..configured).collect(),
                Err(error) => {
                    tracing::debug!(%error, "input partitions not listed; looking again later");
                    BTreeSet::new()
                }
            };
        }
        while let Some(joined) = loops.join_next().await {
            if let Ok((number, Err(error))) = joined {
                tracing::error!(partition = number, %error, "a partition's router failed");
            }
        }
        Ok(())
    }

    /// Routes one input partition until cancelled, or until its stream is gone and it is
    /// beyond the configured count (a pruned retired partition).
    async fn run_partition(&self, number: u16, cancel: CancellationToken) -> Result<(), BusError> {
        let shared = &self.shared;
        let tuning = &shared.config.tuning;
        let retired = number >= shared.topology.input_partitions();
        let partition = Partition {
            stream: shared.topology.partition_stream(number),
            part: match number {
                _ if retired => None,
                0 => Some("router".to_string()),
                n => Some(format!("router.{n}")),
            },
        };
        partition.ready(&shared.readiness, false);
        let bind = || async {
            // A retired partition pruned meanwhile: nothing to bind, nothing to route.
            if retired
                && matches!(
                    bus::lookup_stream(&shared.js, &partition.stream).await,
                    Ok(None)
                )
            {
                return Ok(None);
            }
            let consumer = shared.topology.router_consumer(&shared.js, tuning, number);
            consumer.await.map(Some)
        };
        let Some(Some(mut consumer)) =
            until_ok("binding the router consumer", &cancel, bind).await?
        else {
            return Ok(());
        };
        partition.ready(&shared.readiness, true);
        let mut near = Near::default();
        consumer = self.near_leader(&partition, consumer, &mut near).await;

        let (to_acker, from_router) = mpsc::channel::<Pending>(1);
        let acker = tokio::spawn(ack_routed(from_router, self.shared.clone()));
        let mut backoff = Backoff::default();
        loop {
            let fetched = tokio::select! {
                _ = cancel.cancelled() => break,
                fetched = bus::fetch(&consumer, tuning.router_batch, tuning.fetch_expires()) => fetched,
            };
            match fetched {
                Ok(messages) => {
                    backoff.reset();
                    partition.ready(&shared.readiness, true);
                    if near.checked.elapsed() >= NEAR_LEADER_EVERY {
                        consumer = self.near_leader(&partition, consumer, &mut near).await;
                    }
                    if messages.is_empty() {
                        continue;
                    }
                    let pending = self.route_round(&partition, &consumer, messages).await;
                    if to_acker.send(pending).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    if retired
                        && matches!(
                            bus::lookup_stream(&shared.js, &partition.stream).await,
                            Ok(None)
                        )
                    {
                        tracing::info!(stream = %partition.stream, "retired input partition stream deleted; no longer routing it");
                        break;
                    }
                    partition.ready(&shared.readiness, false);
                    tracing::warn!(message = "router fetch failed; retrying", stream = %partition.stream, %error);
                    if !backoff.wait(&cancel).await {
                        break;
                    }
                    // The consumer may be gone (broker restarted on a fresh store).
                    if let Ok(Some(rebound)) = bind().await {
                        near = Near::default();
                        consumer = self.near_leader(&partition, rebound, &mut near).await;
                    }
                }
            }
        }
        // Let the acker finish the batches already published, then stop.
        drop(to_acker);
        if let Err(error) = acker.await {
            tracing::error!(%error, "router acker task failed");
        }
        Ok(())
    }

    /// The partition's consumer, read through the connection on the node that leads it when
    /// there is one (else as it is). Asked again every [`NEAR_LEADER_EVERY`]: leaders move.
    async fn near_leader(
        &self,
        partition: &Partition,
        consumer: PullConsumer,
        near: &mut Near,
    ) -> PullConsumer {
        near.checked = Instant::now();
        let leader = match consumer.get_info().await {
            Ok(info) => info.cluster.and_then(|cluster| cluster.leader),
            Err(error) => {
                tracing::debug!(stream = %partition.stream, %error, "router consumer's leader not read");
                None
            }
        };
        let Some(leader) = leader.filter(|leader| near.on.as_ref() != Some(leader)) else {
            return consumer;
        };
        let Some(client) = self.nodes.on(&leader) else {
            return consumer;
        };
        let js = async_nats::jetstream::new(client);
        let name = &self.shared.config.streams.router_consumer;
        match js
            .get_consumer_from_stream::<pull::Config, _, _>(name, &partition.stream)
            .await
        {
            Ok(nearer) => {
                tracing::debug!(stream = %partition.stream, node = %leader, "reading the partition through its leader's node");
                near.on = Some(leader);
                nearer
            }
            Err(error) => {
                tracing::debug!(stream = %partition.stream, %error, "partition not bound on its leader's node");
                consumer
            }
        }
    }

    /// Routes one fetched batch and, while `tuning.envelope_linger_ms` allows, whatever else
    /// is already queued (never more than `router_batch` inputs a round, which bounds the
    /// PubAcks a round holds), then seals every open envelope.
    async fn route_round(
        &self,
        partition: &Partition,
        consumer: &PullConsumer,
        messages: Vec<Message>,
    ) -> Pending {
        let tuning = &self.shared.config.tuning;
        let mut packer = Packer::new(
            self.shared.topology.shard_count,
            self.envelope_limits(),
            self.envelope_format(),
        );
        let mut taken = messages.len();
        let mut pending = self.route(partition, messages, &mut packer).await;
        let linger = tuning.envelope_linger();
        if !linger.is_zero() {
            let deadline = Instant::now() + linger;
            while !packer.is_empty() && taken < tuning.router_batch {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let room = tuning.router_batch - taken;
                let more = bus::fetch_queued(consumer, room, tuning.fetch_expires())
                    .await
                    .unwrap_or_default();
                if more.is_empty() {
                    tokio::time::sleep((deadline - now).min(Duration::from_millis(1))).await;
                    continue;
                }
                taken += more.len();
                let routed = self.route(partition, more, &mut packer).await;
                pending.extend(routed);
            }
        }
        for sealed in packer.seal_all() {
            pending.push(self.publish_envelope(sealed).await);
        }
        pending
    }

    /// Validates every message of a batch: status changes go into their shard's envelope
    /// (publishing the ones that fill up), digest requests out as single messages after their
    /// shard's open envelope, invalid input to the dead-letter stream. No PubAck is awaited.
    async fn route(
        &self,
        partition: &Partition,
        messages: Vec<Message>,
        packer: &mut Packer<Message>,
    ) -> Pending {
        let shared = &self.shared;
        let mut pending = Vec::new();
        // The future-time check compares an event with the time the broker stored it, never
        // with this machine's clock: every instance decides every event the same way.
        let max_skew = shared.config.limits.max_future_skew();
        let read_at = chrono::Utc::now();
        for message in messages {
            let sequence = shared.note_delivery(&message);
            // A message without JetStream metadata (none is expected) is judged by our clock.
            let now = bus::clock::stored_at(&message).unwrap_or(read_at);
            let origin = shared.topology.input_origin(&message.subject);
            if let Some(origin) = origin.filter(|o| o.plain) {
                self.note_unmapped(origin.kind);
            }
            let decoded = match origin {
                Some(origin) => wire::decode(
                    origin.kind,
                    &message.payload,
                    shared.config.limits.max_payload_bytes,
                ),
                None => Err(Rejection::UnknownSubject(message.subject.to_string())),
            }
            .and_then(|input| wire::check_clock(input, now, max_skew));
            match decoded {
                Ok(Input::StatusChange(change)) => {
                    let shard = shared.topology.shard_of(&change.user_id);
                    let subject = message.subject.clone();
                    let payload = message.payload.clone();
                    // The change validated here travels on (v2), or the input's JSON (v1).
                    let content = match packer.format() {
                        Format::V1 => Content::Json(&payload),
                        Format::V2 => Content::Change(Cow::Owned(change)),
                    };
                    let entry = Entry {
                        input_sequence: sequence,
                        subject: &subject,
                        content,
                    };
                    match packer.push(shard, &entry, message) {
                        Ok(Some(full)) => pending.push(self.publish_envelope(full).await),
                        Ok(None) => {}
                        // Not reachable with a validated config (shard_of is below the count,
                        // subjects are at most 255 bytes); if it were, redeliver, never drop.
                        Err(message) => {
                            tracing::error!(shard, "input does not fit an envelope; naking it");
                            let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
                        }
                    }
                }
                Ok(Input::DigestRequest(request)) => {
                    // Everything routed before the request goes first: a request never
                    // overtakes its user's earlier events.
                    let shard = shared.topology.shard_of(&request.user_id);
                    if let Some(before) = packer.seal(shard) {
                        pending.push(self.publish_envelope(before).await);
                    }
                    let outgoing =
                        self.request_message(shard, &partition.stream, &message, sequence);
                    let published = self.publish(outgoing).await;
                    pending.push((published, vec![message], Routed::ToShard));
                }
                Err(rejection) => {
                    let record = DeadLetter {
                        reason: rejection.code(),
                        error: &rejection.to_string(),
                        original_subject: &message.subject,
                        stream: &partition.stream,
                        stream_sequence: sequence,
                    };
                    let outgoing = shared.dead_letter(&record, message.payload.clone());
                    let published = self.publish(outgoing).await;
                    pending.push((published, vec![message], Routed::DeadLettered));
                }
            }
        }
        pending
    }

    async fn publish(&self, outgoing: Outgoing) -> Result<PublishAckFuture, BusError> {
        self.publisher
            .publish_with_headers(outgoing.subject, outgoing.headers, outgoing.payload)
            .await
            .map_err(|e| BusError::transient("republishing", e))
    }

    async fn publish_envelope(
        &self,
        sealed: Sealed<Message>,
    ) -> (Result<PublishAckFuture, BusError>, Vec<Message>, Routed) {
        let subject = self
            .shared
            .topology
            .shard_subject(InputKind::StatusChange, sealed.shard);
        let outgoing = Outgoing::envelope(subject, sealed.format, sealed.payload);
        (self.publish(outgoing).await, sealed.tags, Routed::ToShard)
    }

    /// A digest request republished twice (router crash between PubAck and ack) would be
    /// answered twice; the stable Msg-Id lets JetStream drop the copy.
    /// The id names the partition stream: sequences of different partitions overlap.
    fn request_message(
        &self,
        shard: u16,
        input_stream: &str,
        message: &Message,
        input_sequence: u64,
    ) -> Outgoing {
        let subject = self
            .shared
            .topology
            .shard_subject(InputKind::DigestRequest, shard);
        let id = format!("{input_stream}:{input_sequence}");
        Outgoing::digest_request(subject, &id, message.payload.clone())
    }
}

impl Router {
    /// An input on a plain subject while there are several partitions: the server has no
    /// (or not this) mapping. It is routed all the same, through partition 0; counted, and
    /// logged once.
    fn note_unmapped(&self, kind: InputKind) {
        let topology = &self.shared.topology;
        if topology.input_partitions() <= 1 {
            return;
        }
        self.shared.metrics.unmapped_inputs.inc();
        if !self.unmapped_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                subject = topology.input_subject(kind),
                input_partitions = topology.input_partitions(),
                "input arrives on a plain subject: the server does not spread it over the \
                 partitions (no mapping, or another one). It is processed through partition 0 \
                 alone; include `alarm-digest nats-mappings` in the server's config and reload \
                 it. Counted in alarm_digest_unmapped_inputs_total; logged once."
            );
        }
    }
}

/// Awaits each batch's PubAcks in order and acks (or naks) the inputs each publish carries.
/// Awaits the PubAcks of up to `QUEUED_BATCHES` batches at once, every publish of them
/// concurrently, and acks (or naks) each batch's inputs in the order the batches came. Each
/// PubAck times out on its own timer from when it is awaited: awaited one after another, a
/// broker that stopped answering held a graceful stop for ten seconds per publish.
async fn ack_routed(mut batches: mpsc::Receiver<Pending>, shared: Shared) {
    let mut waiting = FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            batch = batches.recv(), if open && waiting.len() < QUEUED_BATCHES => match batch {
                Some(batch) => waiting.push_back(futures::future::join_all(batch.into_iter().map(
                    |(published, messages, routed)| async move {
                        let outcome = match published {
                            Ok(ack) => ack
                                .await
                                .map(|_| ())
                                .map_err(|e| BusError::transient("awaiting a PubAck", e)),
                            Err(error) => Err(error),
                        };
                        (outcome, messages, routed)
                    },
                ))),
                None => open = false,
            },
            Some(acked) = waiting.next(), if !waiting.is_empty() => {
                for (outcome, messages, routed) in acked {
                    settle(&shared, outcome, messages, routed).await;
                }
            }
            else => return,
        }
    }
}

/// Acks the inputs a publish carried once it is stored; naks them (redelivered after a
/// delay) if it was not.
async fn settle(
    shared: &Shared,
    outcome: Result<(), BusError>,
    messages: Vec<Message>,
    routed: Routed,
) {
    match outcome {
        Ok(()) => {
            if let Routed::ToShard = routed {
                shared.metrics.routed.inc_by(messages.len() as u64);
            }
            for message in messages {
                if let Err(error) = message.ack().await {
                    tracing::debug!(%error, "input ack not sent; it will be redelivered");
                }
            }
        }
        Err(error) => {
            shared.metrics.publish_failures.inc();
            tracing::warn!(
                message = "republish failed; its inputs will be redelivered",
                inputs = messages.len(),
                %error
            );
            for message in messages {
                let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
            }
        }
    }
}
