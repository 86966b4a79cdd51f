//! `alarm-digest streams status|balance`: which broker node leads each of the service's
//! streams and what share of the traffic it carries; moving them to the placement plan
//! (docs/cluster.md, "Spreading the load over broker nodes").

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::bus::balance::{self, StreamLead};
use crate::bus::{self, Topology};
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
}

pub async fn run(config: Config, action: &StreamsAction) -> anyhow::Result<ExitCode> {
    let cancel = CancellationToken::new();
    let client = bus::connect(&config.nats, &cancel)
        .await?
        .context("not connected")?;
    let js = async_nats::jetstream::new(client);
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let survey = balance::survey(&js, &topology).await?;
    match action {
        StreamsAction::Status => {
            for line in status_lines(&topology, &survey) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        StreamsAction::Balance => {
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
