//! `alarm-digest dlq list|replay`: read the dead-letter stream, and send records back to
//! their input subject once the cause is fixed (a producer bug, a limit raised).

use std::process::ExitCode;

use anyhow::Context as _;
use async_nats::jetstream::stream::Stream;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::bus::{self, DeadLetterHeaders, Topology};
use crate::config::Config;
use crate::wire::{self, InputKind, FUTURE_TIME};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqAction {
    /// Print dead-letter records, oldest first, one JSON object per line.
    List {
        /// Only records with this reason (e.g. too_many_alarms).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Republish records to their input subject, then delete them from the dead-letter stream.
    Replay {
        /// Only these dead-letter stream sequences.
        #[arg(long = "seq")]
        sequences: Vec<u64>,
        /// Only records with this reason.
        #[arg(long)]
        reason: Option<String>,
        /// Required to replay everything when neither --seq nor --reason is given.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Serialize)]
struct Record {
    seq: u64,
    reason: String,
    error: String,
    original_subject: String,
    stream: String,
    stream_sequence: String,
    payload: String,
}

pub async fn run(config: Config, action: &DlqAction) -> anyhow::Result<ExitCode> {
    let Some(client) = bus::connect(&config.nats, &CancellationToken::new()).await? else {
        return Ok(ExitCode::from(130));
    };
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js
        .get_stream(&config.streams.dead_letter_stream)
        .await
        .context("opening the dead-letter stream (run `alarm-digest setup` first?)")?;
    let records = read_records(&mut stream).await?;
    match action {
        DlqAction::List { reason, limit } => {
            for record in records
                .iter()
                .filter(|r| reason.as_ref().is_none_or(|want| &r.reason == want))
                .take(*limit)
            {
                println!("{}", serde_json::to_string(record)?);
            }
        }
        DlqAction::Replay {
            sequences,
            reason,
            all,
        } => {
            if sequences.is_empty() && reason.is_none() && !all {
                anyhow::bail!("say which records: --seq N (repeatable), --reason R, or --all");
            }
            let topology = Topology::new(config.streams.clone(), config.shards.count);
            let mut replayed = 0;
            for record in records.iter().filter(|r| {
                (sequences.is_empty() || sequences.contains(&r.seq))
                    && reason.as_ref().is_none_or(|want| &r.reason == want)
            }) {
                let subject = replay_subject(&config, &topology, record);
                js.publish(subject.clone(), record.payload.clone().into())
                    .await?
                    .await
                    .with_context(|| format!("republishing record {} to {subject}", record.seq))?;
                stream.delete_message(record.seq).await?;
                replayed += 1;
            }
            println!("replayed {replayed} record(s)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn read_records(stream: &mut Stream) -> anyhow::Result<Vec<Record>> {
    let state = stream.info().await?.state.clone();
    let mut records = Vec::new();
    if state.messages == 0 {
        return Ok(records);
    }
    for seq in state.first_sequence..=state.last_sequence {
        // Deleted records leave gaps.
        let Some(message) = bus::message_at(stream, seq).await? else {
            continue;
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        records.push(Record {
            seq,
            reason: header(DeadLetterHeaders::REASON),
            error: header(DeadLetterHeaders::ERROR),
            original_subject: header(DeadLetterHeaders::ORIGINAL_SUBJECT),
            stream: header(DeadLetterHeaders::STREAM),
            stream_sequence: header(DeadLetterHeaders::STREAM_SEQUENCE),
            payload: String::from_utf8_lossy(&message.payload).into_owned(),
        });
    }
    Ok(records)
}

/// Where a replayed record goes. Most go back through the router (records rejected by a shard
/// worker carry a shard subject, mapped back to its input). A `future_time` record goes
/// straight to its user's shard: the router would refuse it again, while the shard worker
/// applies events without looking at the clock. Replaying one says "apply it as it is".
fn replay_subject(config: &Config, topology: &Topology, record: &Record) -> String {
    if record.reason == FUTURE_TIME {
        let decoded = wire::decode(
            InputKind::StatusChange,
            record.payload.as_bytes(),
            config.limits.max_payload_bytes,
        );
        if let Ok(input) = decoded {
            let shard = topology.shard_of(input.user_id());
            return topology
                .shard_subject(InputKind::StatusChange, shard)
                .to_string();
        }
    }
    input_subject(config, &record.original_subject)
}

/// Records rejected by a shard worker carry a shard subject; replay goes through the router.
fn input_subject(config: &Config, original: &str) -> String {
    let s = &config.streams;
    for input in [&s.status_subject, &s.digest_request_subject] {
        if original == input.as_str() || original.starts_with(&format!("{input}.shard.")) {
            return input.clone();
        }
    }
    original.to_string()
}
