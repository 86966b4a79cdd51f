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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("{0}")]
    Load(String),
    #[error("config key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
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
