//! The layers: defaults, a TOML file, `ALARM_DIGEST_*` variables, flags; and the hostname
//! ordinal a StatefulSet pod owns its shards by.

use super::*;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;

/// This machine's name: `$HOSTNAME` first (Kubernetes sets it to the pod name; tests can set
/// it), else the kernel's.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The ordinal a StatefulSet gives its pod, as the hostname's suffix: `alarm-digest-3` → 3.
pub(super) fn ordinal_from_hostname() -> Result<u16, ConfigError> {
    let hostname = hostname();
    let hostname = hostname.as_str();
    hostname
        .rsplit('-')
        .next()
        .and_then(|suffix| suffix.parse::<u16>().ok())
        .filter(|_| hostname.contains('-'))
        .ok_or_else(|| {
            invalid(
                "shards.ordinal",
                format!(
                    "shards.owned = \"ordinal\" but the hostname {hostname:?} has no numeric \
                     suffix such as alarm-digest-3; set shards.ordinal \
                     (ALARM_DIGEST_SHARDS__ORDINAL) explicitly"
                ),
            )
        })
}

/// Flags given on the command line; they win over every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub nats_url: Option<String>,
    pub storage_path: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub shards_owned: Option<String>,
}

impl Config {
    /// Loads every layer and validates the result. `file` falls back to `$ALARM_DIGEST_CONFIG`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let env_file = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file.map(Path::to_path_buf).or(env_file) {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]));
        if let Some(url) = &overrides.nats_url {
            figment = figment.merge(Serialized::default("nats.url", url));
        }
        if let Some(path) = &overrides.storage_path {
            figment = figment.merge(Serialized::default("storage.path", path));
        }
        if let Some(listen) = &overrides.http_listen {
            figment = figment.merge(Serialized::default("http.listen", listen));
        }
        if let Some(owned) = &overrides.shards_owned {
            figment = figment.merge(Serialized::default("shards.owned", owned));
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Load(describe_figment_error(e)))?;
        if config.shards.owned == OwnedShards::Ordinal && config.shards.ordinal.is_none() {
            config.shards.ordinal = Some(ordinal_from_hostname()?);
        }
        config.validate()?;
        Ok(config)
    }

    /// Whether the file holds a secret and anyone on the machine may read it. Checked at
    /// start-up so the operator is told (logging is not up yet while loading).
    pub fn world_readable_secret_file(file: Option<&Path>) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))?;
        let mode = std::fs::metadata(&path).ok()?.permissions().mode();
        let text = std::fs::read_to_string(&path).ok()?;
        let has_secret = text.lines().any(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            matches!(key, "password" | "token" | "nkey_seed")
        });
        (has_secret && mode & 0o004 != 0).then_some(path)
    }
}

pub(super) fn describe_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::new()
            } else {
                format!("config key `{}`: ", e.path.join("."))
            };
            format!("{key}{}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}
