//! The one `Config`: defaults, then a TOML file, then `ALARM_DIGEST_*` environment variables
//! (`__` between levels), then command-line flags. Loaded and validated before anything binds.
//!
//! The room: `sections.rs` (each section's struct and defaults), `nats.rs` (the connection
//! section and `Secret`), `shards.rs` (ownership), `load.rs` (the layers, the hostname
//! ordinal, command-line overrides), `validate.rs` (every check, naming the key).

mod load;
mod nats;
mod sections;
mod shards;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use load::{hostname, Overrides};
pub use nats::{NatsConfig, Secret, TlsConfig};
pub use sections::*;
pub use shards::{OwnedShards, ShardsConfig};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "ALARM_DIGEST_CONFIG";
const ENV_PREFIX: &str = "ALARM_DIGEST_";
/// At most this many input partitions: the server's weighted mapping gives each a whole
/// percent.
pub const MAX_INPUT_PARTITIONS: u16 = 100;

/// A configuration that cannot work: found while loading it, or later against what the
/// cluster or the data dir recorded. The process exits with [`ConfigError::EXIT_CODE`], however
/// deep in an adapter's error it was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("{0}")]
    Load(String),
    #[error("config key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error(
        "the cluster's shards.count is {recorded} (recorded in key-value bucket {bucket}) but this \
         instance has shards.count = {configured}; set shards.count = {recorded}. The count \
         cannot change in place (users would move away from their alarms); to migrate: stop \
         every instance, `shard export` every shard, `shard reshard --count {configured}`, \
         `shard recount --count {configured}`, `shard import` into fresh data dirs (README, \
         'Changing shards.count')"
    )]
    ClusterShardCount {
        recorded: u16,
        configured: u16,
        bucket: String,
    },
    #[error(
        "the cluster's streams.input_partitions is {recorded} (recorded in key-value bucket \
         {bucket}) but this instance has streams.input_partitions = {configured}; set \
         streams.input_partitions = {recorded}, or change the cluster's count first with \
         `alarm-digest partitions set --count {configured}` (README, 'Input partitions')"
    )]
    ClusterPartitionCount {
        recorded: u16,
        configured: u16,
        bucket: String,
    },
    #[error(
        "this data dir holds {stored} shards but shards.count is {configured}; shards.count \
         must not change in place: set it back to {stored}, or migrate to the new count with \
         `shard export`, `shard reshard`, `shard recount` and `shard import` into a fresh data \
         dir (README, 'Changing shards.count')"
    )]
    DataDirShardCount { stored: u16, configured: u16 },
}

impl ConfigError {
    /// sysexits' EX_USAGE: the configuration is wrong.
    pub const EXIT_CODE: u8 = 64;
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub storage: StorageConfig,
    pub http: HttpConfig,
    pub shards: ShardsConfig,
    pub streams: StreamsConfig,
    pub digest: DigestConfig,
    pub limits: LimitsConfig,
    pub tuning: TuningConfig,
    pub shutdown: ShutdownConfig,
    pub retention: RetentionConfig,
    pub snapshots: SnapshotsConfig,
    pub log: LogConfig,
}

#[cfg(test)]
// figment's `Jail` closures return its large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests;
