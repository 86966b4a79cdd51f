//! `[nats]`: where the broker is and how to authenticate; `Secret` keeps credentials out of
//! logs.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string that never shows up in logs, `Debug` output or `inspect`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub(super) String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Serialised only to feed figment's defaults, where a secret is never set.
        serializer.serialize_str(&self.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// One server, or several separated by commas (a TOML array is accepted too), as the
    /// NATS tools take them: the client connects to any of them and fails over between them.
    #[serde(deserialize_with = "server_list")]
    pub url: String,
    /// Connection name shown by the server's monitoring.
    pub name: String,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
    /// A `.creds` file (JWT and NKey seed) as `nsc` writes it.
    pub creds_file: Option<PathBuf>,
    /// An NKey seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    pub tls: TlsConfig,
    pub connect_timeout_ms: u64,
    /// In a cluster, also connect to each broker node, so each input partition is read
    /// through the node that leads its consumer (no hop between nodes).
    pub connect_to_leaders: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            name: "alarm-digest".into(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed: None,
            tls: TlsConfig::default(),
            connect_timeout_ms: 5_000,
            connect_to_leaders: true,
        }
    }
}

impl NatsConfig {
    /// Every server of `url`, parsed as the client will connect to them.
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, String> {
        let servers = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|server| !server.is_empty())
            .map(|server| {
                server
                    .parse::<async_nats::ServerAddr>()
                    .map_err(|error| format!("{server:?} is not a NATS server URL: {error}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if servers.is_empty() {
            return Err("must name at least one server, such as nats://127.0.0.1:4222".into());
        }
        Ok(servers)
    }
}

/// `nats.url` as a string (comma-separated) or an array of strings; kept as one string so
/// logs and every layer of the config see the same text.
pub(super) fn server_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Repr::deserialize(deserializer)? {
        Repr::One(text) => text,
        Repr::Many(list) => list.join(","),
    })
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub required: bool,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}
