//! `alarm-digest setup`: create or check the streams and consumers, then exit.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::bus::{self, Cluster, Member, Topology};
use crate::config::Config;
use crate::retry::until_ok;

pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let Some(client) = bus::connect(&config.nats, &cancel).await? else {
        return Ok(ExitCode::from(130));
    };
    let js = bus::jetstream(client.clone(), 1024);
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let tuning = &config.tuning;
    // The ownership buckets, and the cluster's shard and partition counts if none are
    // recorded yet (a different count is refused before any stream is made for it).
    let observer = Member::here("setup".into(), &config);
    if Cluster::join(&js, &config, observer, &cancel)
        .await?
        .is_none()
    {
        return Ok(ExitCode::from(130));
    }
    if until_ok("creating the streams", &cancel, || {
        topology.ensure_streams(&js)
    })
    .await?
    .is_none()
    {
        return Ok(ExitCode::from(130));
    }
    // Shard consumers are created by whoever takes a shard, at the sequence its state needs.
    for partition in 0..topology.input_partitions() {
        topology.router_consumer(&js, tuning, partition).await?;
    }
    // Replicated streams: their leaders to the placement plan now, rather than at the
    // instances' first balancing round. Best effort: a leader not elected yet moves later.
    if config.streams.replicas > 1 {
        let moves = match bus::balance::survey(&js, &topology).await {
            Ok(survey) => bus::balance::leader_moves(&survey),
            Err(_) => Vec::new(),
        };
        let mut moved = 0;
        for step in &moves {
            if bus::balance::carry_out(&js, &topology, step).await.is_ok() {
                moved += 1;
            }
        }
        println!(
            "leaders            {moved} of {} moved to the placement plan",
            moves.len()
        );
    }
    let s = &config.streams;
    for partition in 0..topology.input_partitions() {
        println!(
            "input stream       {} <- {}",
            topology.partition_stream(partition),
            topology.partition_subjects(partition).join(", ")
        );
    }
    println!(
        "shard streams      {}_LOG_0 .. {}_LOG_{} <- {}.shard.N, {}.shard.N",
        s.shard_stream_prefix,
        s.shard_stream_prefix,
        config.shards.count - 1,
        s.status_subject,
        s.digest_request_subject
    );
    println!(
        "output stream      {} <- {}",
        s.output_stream, s.digest_subject
    );
    println!(
        "dead-letter stream {} <- {}",
        s.dead_letter_stream, s.dead_letter_subject
    );
    println!(
        "snapshot stream    {} <- {}.>",
        s.snapshot_stream, s.snapshot_subject
    );
    println!(
        "ownership          key-value buckets {} (shards.count = {}), {} (leases)",
        s.shards_bucket, config.shards.count, s.leases_bucket
    );
    println!("ok");
    client.flush().await?;
    Ok(ExitCode::SUCCESS)
}
