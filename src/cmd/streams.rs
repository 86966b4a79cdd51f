//! `alarm-digest streams status|balance|envelopes`: which broker node leads each of the
//! service's streams and what share of the traffic it carries; moving them to the placement
//! plan (docs/cluster.md, "Spreading the load over broker nodes"); the envelope format
//! routers write (docs/upgrading.md).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::bus::balance::{self, StreamLead};
use crate::bus::envelope::Format;
use crate::bus::{self, Cluster, Member, Topology};
use crate::config::Config;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum StreamsAction {
    /// Per broker node: the streams it leads, each with its share of the traffic (messages
    /// stored since it was created) and the leader the plan gives it. JSON lines: one per
    /// node, then one per stream.
    Status,
    /// Move every stream to the plan now: leaders of replicated streams (and of their
    /// durable consumers) by step-down; single-replica streams to the node whose tag
    /// (`streams.node_tags`) the plan gives them, which copies their data over. Prints each
    /// move; exits 0 when every stream is where the plan wants it or waits for a node that is
    /// down.
    Balance,
    /// Show the envelope format routers write (the cluster's record), or change it. A
    /// cluster created by the release before writes format 1, which that release reads;
    /// once every instance runs this release, `--format 2` lets shard workers apply the
    /// changes routers validated without parsing JSON again (docs/upgrading.md).
    Envelopes {
        /// The format to record: 1 or 2.
        #[arg(long)]
        format: Option<u8>,
    },
}

pub async fn run(config: Config, action: &StreamsAction) -> anyhow::Result<ExitCode> {
    let cancel = CancellationToken::new();
    let client = bus::connect(&config.nats, &cancel)
        .await?
        .context("not connected")?;
    let js = async_nats::jetstream::new(client.clone());
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    match action {
        StreamsAction::Envelopes { format } => envelopes(&config, client, *format).await,
        StreamsAction::Status => {
            let survey = balance::survey(&js, &topology).await?;
            for line in status_lines(&topology, &survey) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        StreamsAction::Balance => {
            let survey = balance::survey(&js, &topology).await?;
            let moves = if config.streams.replicas == 1 {
                balance::placement_moves(&topology, &survey)
            } else {
                balance::leader_moves(&survey)
            };
            if moves.is_empty() {
                println!("every stream is where the plan wants it");
            }
            for step in &moves {
                balance::carry_out(&js, &topology, step).await?;
                println!(
                    "{}{}: {} -> {}",
                    step.stream,
                    step.consumer
                        .as_ref()
                        .map(|c| format!(" (consumer {c})"))
                        .unwrap_or_default(),
                    step.from.as_deref().unwrap_or("none"),
                    step.to
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `streams envelopes [--format N]`: prints the recorded format as JSON, or records another.
async fn envelopes(
    config: &Config,
    client: async_nats::Client,
    to: Option<u8>,
) -> anyhow::Result<ExitCode> {
    let to = match to.map(|number| (number, Format::from_number(number))) {
        None => None,
        Some((_, Some(format))) => Some(format),
        Some((number, None)) => bail!("--format {number}: this build writes format 1 or 2"),
    };
    let js = async_nats::jetstream::new(client.clone());
    let observer = Member::here("streams".into(), config);
    let cluster = Cluster::open(&js, config, observer).await?;
    let Some(to) = to else {
        let recorded = cluster.envelope_format().await?;
        println!(
            "{}",
            json!({ "envelope_format": recorded.format.number(), "recorded": recorded.explicit })
        );
        return Ok(ExitCode::SUCCESS);
    };
    let before = cluster.set_envelope_format(to).await?;
    client.flush().await?;
    println!(
        "envelope format: {} -> {} (recorded; every router writes it within {} s)",
        before.format.number(),
        to.number(),
        crate::router::DISCOVER_EVERY.as_secs()
    );
    if to < before.format {
        println!(
            "envelopes of format {} already in the shard logs are read by this release only: \
             start an older release only once a snapshot of every shard covers them",
            before.format.number()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `status`'s JSON lines: per node, the streams it leads and their share of all messages;
/// then per stream, its leader, the planned one, and its share.
pub fn status_lines(topology: &Topology, survey: &[StreamLead]) -> Vec<String> {
    let total: u64 = survey.iter().map(|lead| lead.messages).sum();
    let share = |messages: u64| {
        if total == 0 {
            0.0
        } else {
            (messages as f64 / total as f64 * 1000.0).round() / 1000.0
        }
    };
    let planned: BTreeMap<String, Option<String>> = if topology.streams.replicas == 1 {
        survey
            .iter()
            .map(|lead| {
                let tag = topology.placement_of(&lead.name).map(|p| p.tags.join(","));
                (lead.name.clone(), tag)
            })
            .collect()
    } else {
        balance::planned_leaders(survey).into_iter().collect()
    };
    let mut nodes: BTreeMap<&str, (Vec<&str>, u64)> = BTreeMap::new();
    for lead in survey {
        let node = lead.leader.as_deref().unwrap_or("(no leader)");
        let entry = nodes.entry(node).or_default();
        entry.0.push(&lead.name);
        entry.1 += lead.messages;
    }
    let mut lines: Vec<String> = nodes
        .iter()
        .map(|(node, (streams, messages))| {
            json!({
                "node": node,
                "leads": streams.len(),
                "share": share(*messages),
                "streams": streams,
            })
            .to_string()
        })
        .collect();
    lines.extend(survey.iter().map(|lead| {
        json!({
            "stream": lead.name,
            "replicas": lead.replicas,
            "leader": lead.leader,
            "planned": planned.get(&lead.name).cloned().flatten(),
            "consumer_leader": lead.consumer.as_ref().and_then(|c| c.leader.clone()),
            "messages": lead.messages,
            "share": share(lead.messages),
        })
        .to_string()
    }));
    lines
}
