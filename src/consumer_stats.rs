//! Reads how far each owned shard's consumer is behind (and the router's), from JetStream's
//! consumer info, and the bytes each shard stream holds, into the per-shard gauges. A modest
//! interval: each reading is two requests per shard to the stream's leader.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Shard;
use crate::shared::Shared;

pub async fn run(shared: Shared, owned: Vec<u16>, every: Duration, cancel: CancellationToken) {
    let streams = &shared.config.streams;
    loop {
        for shard in &owned {
            let stream = shared.topology.shard_stream(*shard);
            let info = match shared.js.get_stream(&stream).await {
                Ok(stream) => {
                    let bytes = stream.cached_info().state.bytes;
                    shared
                        .metrics
                        .shard_stream_bytes
                        .get_or_create(&Shard::new(*shard))
                        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    stream.consumer_info(&streams.worker_consumer).await
                }
                Err(error) => {
                    tracing::debug!(%error, shard, "no shard stream for consumer stats");
                    continue;
                }
            };
            match info {
                Ok(info) => {
                    let label = Shard::new(*shard);
                    let metrics = &shared.metrics;
                    metrics
                        .shard_pending
                        .get_or_create(&label)
                        .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
                    metrics
                        .shard_ack_pending
                        .get_or_create(&label)
                        .set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
                    metrics
                        .shard_redelivered
                        .get_or_create(&label)
                        .set(i64::try_from(info.num_redelivered).unwrap_or(i64::MAX));
                }
                Err(error) => tracing::debug!(%error, shard, "no shard consumer info"),
            }
        }
        // Summed over the configured input partitions (the retired ones only drain).
        let mut input_pending = 0u64;
        let mut read_all = true;
        for partition in 0..shared.topology.input_partitions() {
            let name = shared.topology.partition_stream(partition);
            let read = match shared.js.get_stream_no_info(&name).await {
                Ok(stream) => stream.consumer_info(&streams.router_consumer).await.ok(),
                Err(_) => None,
            };
            match read {
                Some(info) => input_pending += info.num_pending,
                None => read_all = false,
            }
        }
        if read_all {
            shared
                .metrics
                .input_pending
                .set(i64::try_from(input_pending).unwrap_or(i64::MAX));
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
