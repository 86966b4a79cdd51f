//! The broker alone doing the service's work with zero processing, on the same server and
//! through the same topology: input stream → a router hop (republish to the user's shard
//! stream, ack after the PubAck) → one stream per shard → consume and ack.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::producer::Producer;
use super::{publish_spread, wait_drained, Workload};
use crate::bus::envelope::{self, Packer};
use crate::bus::{self, Outgoing, Topology};
use crate::config::{Config, StreamsConfig};
use crate::router::{Router, QUEUED_BATCHES};
use crate::wire::InputKind;

fn ceiling_streams(base: &StreamsConfig) -> StreamsConfig {
    StreamsConfig {
        status_subject: "BenchCeiling.AlarmStatusChanged".into(),
        digest_request_subject: "BenchCeiling.SendAlarmDigest".into(),
        digest_subject: "BenchCeiling.AlarmDigest".into(),
        output_subject: "BenchCeiling.Output".into(),
        dead_letter_subject: "BenchCeiling.DeadLetter".into(),
        input_stream: "BENCH_CEILING_INPUT".into(),
        shard_stream_prefix: "BENCH_CEILING_SHARD".into(),
        output_stream: "BENCH_CEILING_OUTPUT".into(),
        dead_letter_stream: "BENCH_CEILING_DEAD_LETTER".into(),
        snapshot_stream: "BENCH_CEILING_SNAPSHOTS".into(),
        snapshot_subject: "BenchCeiling.Snapshot".into(),
        ..base.clone()
    }
}

async fn delete_streams(js: &Context, topology: &Topology) {
    let s = &topology.streams;
    let mut names: Vec<String> = (0..topology.input_partitions())
        .map(|partition| topology.partition_stream(partition))
        .collect();
    names.extend([
        s.output_stream.clone(),
        s.dead_letter_stream.clone(),
        s.snapshot_stream.clone(),
    ]);
    names.extend((0..topology.shard_count).map(|shard| topology.shard_stream(shard)));
    for name in names {
        let _ = js.delete_stream(&name).await;
    }
}

/// Returns how long the broker alone took to move `workload` through the topology, with the
/// events published meanwhile by `producers` at `rate`. With several input partitions the
/// events are spread over them by the producers themselves (the ceiling's subjects are not
/// the ones the server's mapping spreads).
pub async fn measure(
    producers: &[Producer],
    config: &Config,
    workload: &Workload,
    rate: u64,
    limits: (Duration, Duration),
) -> anyhow::Result<Duration> {
    // Same connection layout as the service: consumers on one connection, the router's
    // republishes on another, both apart from the producer's.
    let consumer_client =
        async_nats::connect(config.nats.servers().map_err(anyhow::Error::msg)?).await?;
    let js = bus::jetstream(consumer_client.clone(), 64);
    let publisher_client =
        async_nats::connect(config.nats.servers().map_err(anyhow::Error::msg)?).await?;
    let topology = Topology::new(ceiling_streams(&config.streams), config.shards.count);
    delete_streams(&js, &topology).await;
    topology.ensure_streams(&js).await?;

    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    for partition in 0..topology.input_partitions() {
        let router = topology
            .router_consumer(&js, &config.tuning, partition)
            .await?;
        tasks.push(tokio::spawn(route(
            router,
            // A context (in-flight permits) per loop, as the service's router has.
            bus::jetstream(
                publisher_client.clone(),
                Router::in_flight_bound(&config.tuning),
            ),
            topology.clone(),
            config.tuning.clone(),
            cancel.clone(),
        )));
    }
    for shard in 0..topology.shard_count {
        let consumer = topology
            .worker_consumer_from(&js, shard, &config.tuning, 1)
            .await?;
        tasks.push(tokio::spawn(drain_shard(
            consumer,
            config.tuning.clone(),
            js.client().max_payload(),
            cancel.clone(),
        )));
    }

    let ceiling_config = Config {
        streams: topology.streams.clone(),
        shards: config.shards.clone(),
        ..Config::default()
    };
    let inputs = super::input_streams(&ceiling_config);
    let first = super::inputs_stored(&js, &inputs).await?;
    let started = Instant::now();
    let partitions = usize::from(topology.input_partitions());
    let subject = |chunk: usize| match partitions {
        1 => topology.input_subject(InputKind::StatusChange).to_string(),
        // Lossless: below the partition count, a u16.
        _ => topology.partition_subject(InputKind::StatusChange, (chunk % partitions) as u16),
    };
    let chunks = producers.len().max(partitions);
    let range = 0..workload.events;
    publish_spread(producers, chunks, subject, workload, range, rate).await?;
    let consumers = super::service_consumers(&ceiling_config);
    let stored = (&inputs[..], first + workload.events);
    wait_drained(&js, stored, &consumers, limits).await?;
    let elapsed = started.elapsed();

    cancel.cancel();
    for task in tasks {
        let _ = task.await;
    }
    delete_streams(&js, &topology).await;
    Ok(elapsed)
}

type Published = (
    Result<jetstream::context::PublishAckFuture, async_nats::Error>,
    Vec<Message>,
);

/// The router's job with zero processing: the same fetches, the same envelopes sealed by the
/// same rules (`bus::envelope::Packer`), the same acks after each envelope's PubAck.
async fn route(
    consumer: jetstream::consumer::PullConsumer,
    js: Context,
    topology: Topology,
    tuning: crate::config::TuningConfig,
    cancel: CancellationToken,
) {
    let (to_acker, mut batches) = mpsc::channel::<Vec<Published>>(QUEUED_BATCHES);
    let acker = tokio::spawn(async move {
        while let Some(batch) = batches.recv().await {
            for (published, messages) in batch {
                if let Ok(future) = published {
                    if future.await.is_ok() {
                        for message in messages {
                            let _ = message.ack().await;
                        }
                    }
                }
            }
        }
    });
    let limits = envelope::Limits {
        max_entries: tuning.envelope_max_events,
        max_bytes: tuning
            .envelope_max_bytes
            .min(js.client().max_payload().saturating_sub(512)),
    };
    loop {
        let fetched = tokio::select! {
            _ = cancel.cancelled() => break,
            fetched = bus::fetch(&consumer, tuning.router_batch, tuning.fetch_expires()) => fetched,
        };
        let Ok(messages) = fetched else { continue };
        // The input's bytes unchanged, as a router that validates nothing would carry them.
        let mut packer = Packer::new(topology.shard_count, limits, envelope::Format::V1);
        let mut sealed = Vec::new();
        for message in messages {
            // Zero processing: route on the raw payload's checksum instead of the UserID.
            let shard =
                (crc32fast::hash(&message.payload) % u32::from(topology.shard_count)) as u16;
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            let (subject, payload) = (message.subject.clone(), message.payload.clone());
            let entry = envelope::Entry {
                input_sequence: sequence,
                subject: &subject,
                content: envelope::Content::Json(&payload),
            };
            // Every shard is below the count and the subject short: nothing is handed back.
            if let Ok(full) = packer.push(shard, &entry, message) {
                sealed.extend(full);
            }
        }
        sealed.extend(packer.seal_all());
        let mut batch = Vec::with_capacity(sealed.len());
        for envelope in sealed {
            let subject = topology.shard_subject(InputKind::StatusChange, envelope.shard);
            let outgoing = Outgoing::envelope(subject, envelope.format, envelope.payload);
            let published = js
                .publish_with_headers(outgoing.subject, outgoing.headers, outgoing.payload)
                .await
                .map_err(Into::into);
            batch.push((published, envelope.tags));
        }
        if to_acker.send(batch).await.is_err() {
            break;
        }
    }
    drop(to_acker);
    let _ = acker.await;
}

async fn drain_shard(
    consumer: jetstream::consumer::PullConsumer,
    tuning: crate::config::TuningConfig,
    max_payload: usize,
    cancel: CancellationToken,
) {
    let limit = bus::Limit::shard_fetch(tuning.worker_batch, max_payload);
    loop {
        let fetched = tokio::select! {
            _ = cancel.cancelled() => break,
            fetched = bus::fetch_limited(&consumer, limit, tuning.fetch_expires()) => fetched,
        };
        for message in fetched.unwrap_or_default() {
            let _ = message.ack().await;
        }
    }
}
