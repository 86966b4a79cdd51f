//! `alarm-digest partitions show|set|prune`: the cluster's input partition count and its
//! streams, changed in place (README, "Input partitions").

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;

use super::shard::connect_cluster;
use crate::bus::{self, Member, Topology};
use crate::config::{Config, MAX_INPUT_PARTITIONS};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PartitionsAction {
    /// Print the recorded count and, per input partition stream, what it captures and holds
    /// (JSON lines).
    Show,
    /// Change the cluster's input partition count: create the partition streams it adds (the
    /// first one gains its `.in.0` subjects) and record the count. Streams it retires stay
    /// and are routed until they are empty; `prune` deletes them.
    Set {
        /// The new partition count.
        #[arg(long)]
        count: u16,
    },
    /// Delete the retired partition streams (beyond the recorded count) that hold nothing
    /// and have received nothing for `--quiet-secs`: the servers' mapping no longer sends
    /// to them.
    Prune {
        #[arg(long, default_value_t = 60)]
        quiet_secs: u64,
    },
}

pub async fn run(config: Config, action: &PartitionsAction) -> anyhow::Result<ExitCode> {
    match action {
        PartitionsAction::Show => show(&config).await,
        PartitionsAction::Set { count } => set(config, *count).await,
        PartitionsAction::Prune { quiet_secs } => {
            prune(&config, Duration::from_secs(*quiet_secs)).await
        }
    }
}

/// One partition stream as `show` and `prune` see it.
struct PartitionState {
    stream: String,
    subjects: Vec<String>,
    messages: u64,
    /// Delivered to no router yet, and delivered but not acked.
    router_pending: Option<(u64, u64)>,
    /// Since the newest message arrived.
    quiet_for: Duration,
}

async fn read_state(
    js: &async_nats::jetstream::Context,
    topology: &Topology,
    partition: u16,
) -> anyhow::Result<Option<PartitionState>> {
    let name = topology.partition_stream(partition);
    let Some(mut stream) = bus::lookup_stream(js, &name).await? else {
        return Ok(None);
    };
    let info = stream.info().await?.clone();
    let router_pending = stream
        .consumer_info(&topology.streams.router_consumer)
        .await
        .ok()
        .map(|c| (c.num_pending, c.num_ack_pending as u64));
    // Quiet by the broker's clock, which stamped the newest message: a wrong clock on the
    // operator's host must not make a live partition look quiet.
    let broker_now = bus::clock::read(js, &name).await?.broker_now;
    let newest_ms = info.state.last_timestamp.unix_timestamp_nanos() / 1_000_000;
    let quiet_ms = i128::from(broker_now.timestamp_millis()) - newest_ms;
    let quiet_for = Duration::from_millis(u64::try_from(quiet_ms).unwrap_or(0));
    Ok(Some(PartitionState {
        stream: name,
        subjects: info.config.subjects,
        messages: info.state.messages,
        router_pending,
        quiet_for,
    }))
}

async fn show(config: &Config) -> anyhow::Result<ExitCode> {
    let observer = Member::here("partitions".into(), config);
    let (client, cluster) = connect_cluster(config, observer).await?;
    let recorded = cluster.recorded_input_partitions().await?;
    println!(
        "{}",
        serde_json::json!({
            "input_partitions": recorded,
            "configured": config.streams.input_partitions,
        })
    );
    let js = async_nats::jetstream::new(client);
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let count = recorded.unwrap_or(config.streams.input_partitions);
    for partition in topology.existing_partitions(&js).await? {
        let Some(state) = read_state(&js, &topology, partition).await? else {
            continue;
        };
        println!(
            "{}",
            serde_json::json!({
                "partition": partition,
                "stream": state.stream,
                "retired": partition >= count,
                "subjects": state.subjects,
                "messages": state.messages,
                "router_pending": state.router_pending.map(|p| p.0),
                "router_unacked": state.router_pending.map(|p| p.1),
                "quiet_secs": state.quiet_for.as_secs(),
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn set(mut config: Config, count: u16) -> anyhow::Result<ExitCode> {
    if !(1..=MAX_INPUT_PARTITIONS).contains(&count) {
        bail!("--count must be between 1 and {MAX_INPUT_PARTITIONS}");
    }
    config.streams.input_partitions = count;
    let observer = Member::here("partitions".into(), &config);
    let (client, cluster) = connect_cluster(&config, observer).await?;
    let js = bus::jetstream(client.clone(), 1024);
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    // Streams first: once the count is recorded, instances with it may start, and a server
    // given the new mapping must find a stream for every partition subject.
    topology.ensure_streams(&js).await?;
    for partition in 0..count {
        topology
            .router_consumer(&js, &config.tuning, partition)
            .await?;
    }
    let before = cluster.set_input_partitions(count).await?;
    client.flush().await?;
    let before = before.unwrap_or(1);
    println!("input partitions: {before} -> {count} (recorded; streams ready)");
    if count > before {
        println!(
            "next: restart every instance with streams.input_partitions = {count}, then put \
             `alarm-digest nats-mappings` (with the same setting) in every server's config and \
             reload them (SIGHUP)"
        );
    } else if count < before {
        println!(
            "next: put `alarm-digest nats-mappings` (with streams.input_partitions = {count}) \
             in every server's config and reload them (SIGHUP), restart every instance with \
             the new setting, and once the retired partition streams are empty, \
             `alarm-digest partitions prune`"
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn prune(config: &Config, quiet: Duration) -> anyhow::Result<ExitCode> {
    let observer = Member::here("partitions".into(), config);
    let (client, cluster) = connect_cluster(config, observer).await?;
    let Some(count) = cluster.recorded_input_partitions().await? else {
        bail!("no input partition count is recorded yet: start an instance or run setup first");
    };
    let js = async_nats::jetstream::new(client);
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let mut kept = 0;
    for partition in topology.existing_partitions(&js).await? {
        if partition < count {
            continue;
        }
        let Some(state) = read_state(&js, &topology, partition).await? else {
            continue;
        };
        let busy = state.messages > 0 || state.router_pending.is_some_and(|(p, u)| p + u > 0);
        if busy || state.quiet_for < quiet {
            kept += 1;
            println!(
                "kept {}: {} message(s) held, newest {} s ago (needs 0 held and {} s quiet; is \
                 the servers' mapping reloaded?)",
                state.stream,
                state.messages,
                state.quiet_for.as_secs(),
                quiet.as_secs()
            );
            continue;
        }
        js.delete_stream(&state.stream).await?;
        println!("deleted {} (retired and empty)", state.stream);
    }
    Ok(if kept == 0 {
        ExitCode::SUCCESS
    } else {
        // EX_TEMPFAIL: try again later.
        ExitCode::from(75)
    })
}
