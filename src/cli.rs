//! Command-line arguments. Flags here are the last config layer.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "alarm-digest",
    version,
    about = "Per-user alarm digests from NATS JetStream, stored in sled"
)]
pub struct Cli {
    /// TOML config file (default: $ALARM_DIGEST_CONFIG, else built-in defaults).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Overrides nats.url.
    #[arg(long, global = true, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Overrides storage.path.
    #[arg(long, global = true, value_name = "DIR")]
    pub storage_path: Option<PathBuf>,
    /// Overrides http.listen.
    #[arg(long, global = true, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Overrides shards.owned (`all`, `ordinal`, or a list such as `0,2`).
    #[arg(long, global = true, value_name = "SHARDS")]
    pub shards_owned: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run,
    /// Create (or check) the JetStream streams and consumers, then exit.
    Setup,
    /// Print stored state.
    Inspect {
        #[command(subcommand)]
        target: InspectTarget,
    },
    /// Publish one plain NATS message, as producers do (for trying things by hand).
    Publish {
        /// e.g. AlarmStatusChanged or SendAlarmDigest.
        subject: String,
        /// The JSON payload.
        payload: String,
    },
    /// Print every AlarmDigest as it is published.
    Watch,
    /// Load a running deployment and report ingest rate, digest latency, RSS and disk use.
    Bench(crate::cmd::bench::BenchArgs),
    /// Move a shard's state between data dirs; show where shards live.
    Shard {
        #[command(subcommand)]
        action: crate::cmd::shard::ShardAction,
    },
    /// List or replay dead-letter records.
    Dlq {
        #[command(subcommand)]
        action: crate::cmd::dlq::DlqAction,
    },
    /// Print the nats-server mapping that spreads the input subjects over
    /// streams.input_partitions partitions (include it in every server's config).
    NatsMappings(crate::cmd::nats_mappings::NatsMappingsArgs),
    /// Show or change the cluster's input partitions; prune retired ones.
    Partitions {
        #[command(subcommand)]
        action: crate::cmd::partitions::PartitionsAction,
    },
    /// Show which broker node leads each stream; move streams to the placement plan.
    Streams {
        #[command(subcommand)]
        action: crate::cmd::streams::StreamsAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum InspectTarget {
    /// A user's stored alarms and sent markers.
    User {
        /// The UserID.
        user_id: String,
    },
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            nats_url: self.nats_url.clone(),
            storage_path: self.storage_path.clone(),
            http_listen: self.http_listen.clone(),
            shards_owned: self.shards_owned.clone(),
        }
    }
}
