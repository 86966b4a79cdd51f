//! The naive single-hop durable design, for `bench --naive`: what one would write first.
//! One durable consumer on an input stream of its own; for every message, in order: decode,
//! read-modify-write the alarm in sled, flush to disk, ack. No router hop, no batching of
//! writes or flushes: each event is durable before it is acked, one at a time.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::stream;

use super::producer::Producer;
use super::{publish_events, Workload};
use crate::bus;
use crate::config::Config;
use crate::store::Store;
use crate::wire::{self, Input, InputKind};

const STREAM: &str = "BENCH_NAIVE_INPUT";
const SUBJECT: &str = "BenchNaive.AlarmStatusChanged";

/// How long the naive design takes to make `workload` durable, published at `rate`.
pub async fn measure(
    producer: &Producer,
    config: &Config,
    workload: &Workload,
    rate: u64,
    (timeout, give_up_after): (Duration, Duration),
) -> anyhow::Result<Duration> {
    let client = async_nats::connect(config.nats.servers().map_err(anyhow::Error::msg)?).await?;
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("naive".into()),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let dir = tempfile_dir()?;
    let store = Store::open(&dir, config.storage.cache_capacity_mb)?;
    let mut shard = store.shard(0)?;
    let limits = &config.limits;

    let started = Instant::now();
    let publisher = {
        let (producer, workload) = (producer.clone(), *workload);
        tokio::spawn(async move {
            publish_events(&producer, SUBJECT, &workload, 0..workload.events, rate).await
        })
    };
    let mut applied = 0;
    let mut last_applied = Instant::now();
    while applied < workload.events {
        if started.elapsed() > timeout {
            anyhow::bail!("the naive design did not finish within {timeout:?}");
        }
        if last_applied.elapsed() > give_up_after {
            publisher.abort();
            anyhow::bail!(
                "the naive design applied nothing for {give_up_after:?}: {applied} of {} events",
                workload.events
            );
        }
        let batch = bus::fetch(&consumer, 100, Duration::from_secs(1)).await?;
        if !batch.is_empty() {
            last_applied = Instant::now();
        }
        for message in batch {
            if let Ok(Input::StatusChange(change)) = wire::decode(
                InputKind::StatusChange,
                &message.payload,
                limits.max_payload_bytes,
            ) {
                let mut write = shard.begin();
                write.apply(&change, limits.max_alarms_per_user)?;
                write.commit()?;
                store.flush()?;
            }
            message
                .double_ack()
                .await
                .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            applied += 1;
        }
    }
    let elapsed = started.elapsed();
    publisher.await??;
    drop(shard);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = js.delete_stream(STREAM).await;
    Ok(elapsed)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("alarm-digest-naive-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
