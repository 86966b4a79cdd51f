//! The one `Config`: defaults, then a TOML file, then `ALARM_DIGEST_*` environment variables
//! (`__` between levels), then command-line flags. Loaded and validated before anything binds.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "ALARM_DIGEST_CONFIG";
const ENV_PREFIX: &str = "ALARM_DIGEST_";

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

/// A string that never shows up in logs, `Debug` output or `inspect`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

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
fn server_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The sled directory. One process at a time may open it.
    pub path: PathBuf,
    /// sled's page cache; memory use is bounded by this, not by the number of users.
    pub cache_capacity_mb: u64,
    /// After a write or flush error sled keeps failing until the process restarts, so a
    /// shard whose store has failed this long stops the instance (exit 1) for systemd or
    /// Kubernetes to restart it; nothing it failed to store was acked.
    pub give_up_after_secs: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("alarm-digest-data"),
            cache_capacity_mb: 32,
            give_up_after_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Probes and `/metrics`; also `/inspect` (a user's alarms) when this is a loopback
    /// address.
    pub listen: String,
    /// Where `/inspect` is served when `listen` is not loopback (a pod's `0.0.0.0`): user data
    /// never goes out on an open port. Must be a loopback address.
    pub inspect_listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9090".into(),
            inspect_listen: "127.0.0.1:9091".into(),
        }
    }
}

impl HttpConfig {
    /// Whether `/inspect` is served on `listen` itself (it is loopback).
    pub fn inspect_on_main_listener(&self) -> bool {
        self.listen
            .parse::<SocketAddr>()
            .is_ok_and(|addr| addr.ip().is_loopback())
    }

    /// Where `alarm-digest inspect` asks a running instance.
    pub fn inspect_addr(&self) -> &str {
        if self.inspect_on_main_listener() {
            &self.listen
        } else {
            &self.inspect_listen
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardsConfig {
    /// Fixed for the life of a cluster: recorded in the local data dir and in the cluster's
    /// shards bucket.
    pub count: u16,
    pub owned: OwnedShards,
    /// With `owned = "ordinal"`: how many instances share the shards.
    pub replicas: u16,
    /// With `owned = "ordinal"`: this instance's ordinal. Unset: the number after the last
    /// `-` of the hostname (`alarm-digest-3` → 3), as a StatefulSet names its pods.
    pub ordinal: Option<u16>,
    /// The lease period, used when the leases bucket is created (its max age). A holder
    /// renews every third of it and stops applying once two thirds passed without renewal;
    /// after a crash, another owner takes the shard within the period plus a third of it.
    pub lease_secs: u64,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            count: 16,
            owned: OwnedShards::All,
            replicas: 1,
            ordinal: None,
            lease_secs: 3,
        }
    }
}

impl ShardsConfig {
    /// The shards this instance runs workers for. `ordinal` must have been resolved
    /// (`Config::load` does).
    pub fn owned_shards(&self) -> Vec<u16> {
        match &self.owned {
            OwnedShards::All => (0..self.count).collect(),
            OwnedShards::List(list) => list.iter().copied().collect(),
            OwnedShards::Ordinal => {
                let ordinal = self.ordinal.unwrap_or(0);
                (0..self.count)
                    .filter(|shard| shard % self.replicas.max(1) == ordinal)
                    .collect()
            }
        }
    }
}

/// Which shards this instance runs workers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedShards {
    All,
    List(BTreeSet<u16>),
    /// Every shard s with `s % shards.replicas == ordinal`.
    Ordinal,
}

impl OwnedShards {
    fn parse(text: &str) -> Result<OwnedShards, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(OwnedShards::All);
        }
        if text.eq_ignore_ascii_case("ordinal") {
            return Ok(OwnedShards::Ordinal);
        }
        let inner = text.trim_start_matches('[').trim_end_matches(']');
        inner
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse::<u16>()
                    .map_err(|_| format!("{part:?} is not a shard number"))
            })
            .collect::<Result<BTreeSet<u16>, String>>()
            .map(OwnedShards::List)
    }
}

impl Serialize for OwnedShards {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            OwnedShards::All => serializer.serialize_str("all"),
            OwnedShards::List(list) => list.serialize(serializer),
            OwnedShards::Ordinal => serializer.serialize_str("ordinal"),
        }
    }
}

impl<'de> Deserialize<'de> for OwnedShards {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Number(u16),
            List(Vec<u16>),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Text(text) => OwnedShards::parse(&text).map_err(serde::de::Error::custom),
            Repr::Number(shard) => Ok(OwnedShards::List(BTreeSet::from([shard]))),
            Repr::List(list) => Ok(OwnedShards::List(list.into_iter().collect())),
        }
    }
}

/// Stream, subject and consumer names. The defaults are the product's contract with producers
/// and the notification service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    pub status_subject: String,
    pub digest_request_subject: String,
    /// Where subscribers receive digests: the output stream republishes each digest it stored
    /// here, once.
    pub digest_subject: String,
    /// What the service publishes digests to: captured by the output stream alone, so a copy
    /// dropped by the duplicate window never reaches a subscriber.
    pub output_subject: String,
    pub dead_letter_subject: String,
    pub input_stream: String,
    pub shard_stream_prefix: String,
    pub output_stream: String,
    pub dead_letter_stream: String,
    /// Where each shard's snapshots are kept (chunks and manifests).
    pub snapshot_stream: String,
    /// Snapshot messages go to `<snapshot_subject>.<shard>.chunk|manifest`.
    pub snapshot_subject: String,
    pub router_consumer: String,
    pub worker_consumer: String,
    /// JetStream key-value bucket holding the cluster's shard count and each shard's home.
    pub shards_bucket: String,
    /// Key-value bucket of shard leases; its max age is the lease period.
    pub leases_bucket: String,
    /// Stream replicas; production runs 3 (see README, Guarantees).
    pub replicas: usize,
    pub output_max_age_hours: u64,
    /// How long the output and shard streams remember a Msg-Id. A digest republished after a
    /// crash within this window is dropped; the broker keeps every id of the window in memory.
    pub duplicate_window_secs: u64,
    pub dead_letter_max_age_hours: u64,
    pub dead_letter_max_bytes: i64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            status_subject: "AlarmStatusChanged".into(),
            digest_request_subject: "SendAlarmDigest".into(),
            digest_subject: "AlarmDigest".into(),
            output_subject: "alarm-digest.output".into(),
            dead_letter_subject: "AlarmDigest.DeadLetter".into(),
            input_stream: "ALARM_DIGEST_INPUT".into(),
            shard_stream_prefix: "ALARM_DIGEST_SHARD".into(),
            output_stream: "ALARM_DIGEST_OUTPUT".into(),
            dead_letter_stream: "ALARM_DIGEST_DEAD_LETTER".into(),
            snapshot_stream: "ALARM_DIGEST_SNAPSHOTS".into(),
            snapshot_subject: "alarm-digest.snapshot".into(),
            router_consumer: "alarm-digest-router".into(),
            worker_consumer: "alarm-digest-worker".into(),
            shards_bucket: "alarm_digest_shards".into(),
            leases_bucket: "alarm_digest_leases".into(),
            replicas: 1,
            output_max_age_hours: 24 * 7,
            duplicate_window_secs: 120,
            dead_letter_max_age_hours: 24 * 14,
            dead_letter_max_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DigestConfig {
    /// When true, a request for a user with nothing to report publishes nothing.
    pub skip_empty: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_payload_bytes: usize,
    /// A status change that would create one alarm more than this for its user is
    /// dead-lettered (`too_many_alarms`): one producer cannot grow a user without bound.
    pub max_alarms_per_user: usize,
    /// How far a ChangedAt may lie ahead of this service's clock. A later one is dead-lettered
    /// (`future_time`) by the router: newest-wins would let it outrank every honest event.
    pub max_future_skew_secs: u64,
}

impl LimitsConfig {
    pub fn max_future_skew(&self) -> chrono::Duration {
        chrono::Duration::seconds(i64::try_from(self.max_future_skew_secs).unwrap_or(i64::MAX))
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_payload_bytes: 64 * 1024,
            max_alarms_per_user: 10_000,
            max_future_skew_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TuningConfig {
    /// Messages the router fetches, publishes (pipelined) and acks at a time.
    pub router_batch: usize,
    /// Messages a shard worker applies with one sled batch and one flush.
    pub worker_batch: usize,
    /// How long a pull waits for a full batch. About 1 s: shorter expiries stall on
    /// nats-server 2.9 (README, Pitfalls).
    pub fetch_expires_ms: u64,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait_secs: u64,
    /// How often the per-shard consumer gauges (lag, ack pending, redelivered) are read from
    /// JetStream: one consumer-info request per owned shard each time.
    pub consumer_stats_every_secs: u64,
    /// The router packs each shard's status changes into envelopes of at most this many
    /// events...
    pub envelope_max_events: usize,
    /// ...and at most this many bytes (and always under the server's `max_payload`).
    pub envelope_max_bytes: usize,
    /// How long an open envelope may wait for more events after its fetch (0: sealed at the
    /// end of every fetched batch).
    pub envelope_linger_ms: u64,
}

impl Default for TuningConfig {
    fn default() -> Self {
        TuningConfig {
            router_batch: 1000,
            worker_batch: 1000,
            fetch_expires_ms: 1000,
            ack_wait_secs: 30,
            consumer_stats_every_secs: 15,
            envelope_max_events: 256,
            envelope_max_bytes: 256 * 1024,
            envelope_linger_ms: 0,
        }
    }
}

impl TuningConfig {
    pub fn fetch_expires(&self) -> Duration {
        Duration::from_millis(self.fetch_expires_ms)
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }

    pub fn consumer_stats_every(&self) -> Duration {
        Duration::from_secs(self.consumer_stats_every_secs)
    }

    pub fn envelope_linger(&self) -> Duration {
        Duration::from_millis(self.envelope_linger_ms)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long SIGTERM waits for in-flight batches before giving up. Keep it below systemd's
    /// `TimeoutStopSec` and Kubernetes' `terminationGracePeriodSeconds`.
    pub grace_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_secs: 20 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// CLEARED alarms are kept as tombstones (so a late redelivery of an older CRITICAL
    /// cannot resurrect them) until their ChangedAt is this much older than the newest
    /// ChangedAt their shard has applied (capped at the clock), then swept away.
    pub cleared_after_hours: u64,
    /// How often a sweep pass over each shard starts.
    pub sweep_every_secs: u64,
    /// Alarms a sweep step examines between two batches: bounds how long it holds a shard.
    pub sweep_page: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            cleared_after_hours: 24 * 7,
            sweep_every_secs: 600,
            sweep_page: 1000,
        }
    }
}

impl RetentionConfig {
    pub fn cleared_after(&self) -> chrono::Duration {
        chrono::Duration::hours(i64::try_from(self.cleared_after_hours).unwrap_or(i64::MAX / 3600))
    }
}

/// When each shard's state is snapshotted into JetStream. The shard stream keeps everything
/// after the oldest kept snapshot, so these bound the broker disk the streams hold (README,
/// 'Broker disk').
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// A snapshot at least this often while the shard changes.
    pub every_secs: u64,
    /// ...and as soon as the shard stream's tail since the last one holds this many MiB.
    pub every_mb: u64,
    /// How many snapshots each shard keeps (at least 2: a damaged newest one falls back to
    /// the one before, whose tail is still in the stream).
    pub keep: usize,
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        SnapshotsConfig {
            every_secs: 300,
            every_mb: 64,
            keep: 2,
        }
    }
}

impl SnapshotsConfig {
    pub fn every(&self) -> Duration {
        Duration::from_secs(self.every_secs)
    }

    pub fn every_bytes(&self) -> u64 {
        self.every_mb.saturating_mul(1024 * 1024)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            filter: "info".into(),
        }
    }
}

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
fn ordinal_from_hostname() -> Result<u16, ConfigError> {
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

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nats
            .servers()
            .map_err(|problem| invalid("nats.url", problem))?;
        if self.nats.password.is_some() != self.nats.user.is_some() {
            return Err(invalid(
                "nats.user",
                "nats.user and nats.password go together",
            ));
        }
        if self.nats.tls.cert_file.is_some() != self.nats.tls.key_file.is_some() {
            return Err(invalid(
                "nats.tls.cert_file",
                "cert_file and key_file go together",
            ));
        }
        if self.storage.path.as_os_str().is_empty() {
            return Err(invalid("storage.path", "must name a directory"));
        }
        if self.storage.cache_capacity_mb == 0 {
            return Err(invalid("storage.cache_capacity_mb", "must be at least 1"));
        }
        self.http.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "http.listen",
                format!(
                    "{:?} is not an address such as 127.0.0.1:9090",
                    self.http.listen
                ),
            )
        })?;
        let inspect = self
            .http
            .inspect_listen
            .parse::<SocketAddr>()
            .map_err(|_| {
                invalid(
                    "http.inspect_listen",
                    format!(
                        "{:?} is not an address such as 127.0.0.1:9091",
                        self.http.inspect_listen
                    ),
                )
            })?;
        if !inspect.ip().is_loopback() {
            return Err(invalid(
                "http.inspect_listen",
                "must be a loopback address (127.0.0.1 or ::1): it serves users' alarms",
            ));
        }
        if self.shards.count == 0 || self.shards.count > 4096 {
            return Err(invalid("shards.count", "must be between 1 and 4096"));
        }
        if let OwnedShards::List(list) = &self.shards.owned {
            if list.is_empty() {
                return Err(invalid(
                    "shards.owned",
                    "must be `all` or a non-empty list such as [0,2]",
                ));
            }
            if let Some(bad) = list.iter().find(|s| **s >= self.shards.count) {
                return Err(invalid(
                    "shards.owned",
                    format!(
                        "shard {bad} does not exist: shards.count is {}",
                        self.shards.count
                    ),
                ));
            }
        }
        if self.shards.replicas == 0 || self.shards.replicas > self.shards.count {
            return Err(invalid(
                "shards.replicas",
                format!("must be between 1 and shards.count ({})", self.shards.count),
            ));
        }
        if let Some(ordinal) = self.shards.ordinal {
            if ordinal >= self.shards.replicas {
                return Err(invalid(
                    "shards.ordinal",
                    format!(
                        "{ordinal} is not below shards.replicas ({}): with {} instances the \
                         ordinals are 0 to {}",
                        self.shards.replicas,
                        self.shards.replicas,
                        self.shards.replicas - 1
                    ),
                ));
            }
        }
        if !(3..=3600).contains(&self.shards.lease_secs) {
            return Err(invalid("shards.lease_secs", "must be between 3 and 3600"));
        }
        let s = &self.streams;
        for (key, subject) in [
            ("streams.status_subject", &s.status_subject),
            ("streams.digest_request_subject", &s.digest_request_subject),
            ("streams.digest_subject", &s.digest_subject),
            ("streams.output_subject", &s.output_subject),
            ("streams.dead_letter_subject", &s.dead_letter_subject),
        ] {
            if !is_literal_subject(subject) || subject.len() > 255 {
                return Err(invalid(
                    key,
                    format!("{subject:?} is not a literal NATS subject of at most 255 bytes"),
                ));
            }
        }
        let subjects = BTreeSet::from([
            &s.status_subject,
            &s.digest_request_subject,
            &s.digest_subject,
            &s.output_subject,
            &s.dead_letter_subject,
        ]);
        if subjects.len() != 5 {
            return Err(invalid("streams", "the five subjects must all differ"));
        }
        if !(1..=86_400).contains(&s.duplicate_window_secs) {
            return Err(invalid(
                "streams.duplicate_window_secs",
                "must be between 1 and 86400",
            ));
        }
        for (key, name) in [
            ("streams.input_stream", &s.input_stream),
            ("streams.shard_stream_prefix", &s.shard_stream_prefix),
            ("streams.output_stream", &s.output_stream),
            ("streams.dead_letter_stream", &s.dead_letter_stream),
            ("streams.snapshot_stream", &s.snapshot_stream),
            ("streams.router_consumer", &s.router_consumer),
            ("streams.worker_consumer", &s.worker_consumer),
        ] {
            if !is_valid_name(name) {
                return Err(invalid(
                    key,
                    format!("{name:?} must be non-empty, without spaces, '.', '*', '>' or '/'"),
                ));
            }
        }
        for (key, name) in [
            ("streams.shards_bucket", &s.shards_bucket),
            ("streams.leases_bucket", &s.leases_bucket),
        ] {
            let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if name.is_empty() || !name.chars().all(allowed) {
                return Err(invalid(
                    key,
                    format!("{name:?} must be non-empty letters, digits, '_' or '-'"),
                ));
            }
        }
        if s.shards_bucket == s.leases_bucket {
            return Err(invalid(
                "streams.leases_bucket",
                "must differ from streams.shards_bucket (leases expire, homes must not)",
            ));
        }
        if !(1..=5).contains(&s.replicas) {
            return Err(invalid("streams.replicas", "must be between 1 and 5"));
        }
        if !s.snapshot_subject.split('.').all(is_valid_name) {
            return Err(invalid(
                "streams.snapshot_subject",
                "must be dot-separated tokens without spaces, '*', '>' or '/'",
            ));
        }
        let snapshots = &self.snapshots;
        if !(1..=86_400).contains(&snapshots.every_secs) {
            return Err(invalid(
                "snapshots.every_secs",
                "must be between 1 and 86400",
            ));
        }
        if snapshots.every_mb == 0 {
            return Err(invalid("snapshots.every_mb", "must be at least 1"));
        }
        if !(2..=100).contains(&snapshots.keep) {
            return Err(invalid(
                "snapshots.keep",
                "must be between 2 and 100: one damaged snapshot must have one to fall back to",
            ));
        }
        if self.limits.max_alarms_per_user == 0 {
            return Err(invalid("limits.max_alarms_per_user", "must be at least 1"));
        }
        if !(1..=31_536_000).contains(&self.limits.max_future_skew_secs) {
            return Err(invalid(
                "limits.max_future_skew_secs",
                "must be between 1 and 31536000 (a year)",
            ));
        }
        if self.limits.max_payload_bytes < 64 {
            return Err(invalid("limits.max_payload_bytes", "must be at least 64"));
        }
        let t = &self.tuning;
        if !(1..=10_000).contains(&t.router_batch) {
            return Err(invalid(
                "tuning.router_batch",
                "must be between 1 and 10000",
            ));
        }
        if !(1..=10_000).contains(&t.worker_batch) {
            return Err(invalid(
                "tuning.worker_batch",
                "must be between 1 and 10000",
            ));
        }
        if !(100..=30_000).contains(&t.fetch_expires_ms) {
            return Err(invalid(
                "tuning.fetch_expires_ms",
                "must be between 100 and 30000",
            ));
        }
        if t.ack_wait_secs < 5 {
            return Err(invalid("tuning.ack_wait_secs", "must be at least 5"));
        }
        if !(1..=10_000).contains(&t.envelope_max_events) {
            return Err(invalid(
                "tuning.envelope_max_events",
                "must be between 1 and 10000",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&t.envelope_max_bytes) {
            return Err(invalid(
                "tuning.envelope_max_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if t.envelope_linger_ms > 1000 {
            return Err(invalid("tuning.envelope_linger_ms", "must be at most 1000"));
        }
        if !(1..=3600).contains(&t.consumer_stats_every_secs) {
            return Err(invalid(
                "tuning.consumer_stats_every_secs",
                "must be between 1 and 3600",
            ));
        }
        let r = &self.retention;
        if r.cleared_after_hours == 0 || r.cleared_after_hours > 24 * 365 * 100 {
            return Err(invalid(
                "retention.cleared_after_hours",
                "must be between 1 and 876000",
            ));
        }
        if r.sweep_every_secs == 0 {
            return Err(invalid("retention.sweep_every_secs", "must be at least 1"));
        }
        if !(1..=100_000).contains(&r.sweep_page) {
            return Err(invalid(
                "retention.sweep_page",
                "must be between 1 and 100000",
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be `text` or `json`"));
        }
        Ok(())
    }
}

fn describe_figment_error(error: figment::Error) -> String {
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

fn is_literal_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|token| !token.is_empty() && !token.contains(['*', '>', ' ', '\t', '\r', '\n']))
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['.', '*', '>', '/', '\\', ' ', '\t', '\r', '\n'])
}

#[cfg(test)]
// figment's `Jail` closures return its large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().validate().is_ok());
    }

    /// packaging/config.toml documents every key with its default; keep it true.
    #[test]
    fn the_shipped_example_config_loads_and_states_the_defaults() {
        Jail::expect_with(|jail| {
            let example = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/config.toml");
            let config = Config::load(Some(Path::new(example)), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let defaults = Config::default();
            assert_eq!(format!("{config:?}"), format!("{defaults:?}"));
            let _ = jail;
            Ok(())
        });
    }

    #[test]
    fn a_server_list_is_a_comma_separated_string_or_a_toml_array() {
        Jail::expect_with(|jail| {
            jail.set_env(
                "ALARM_DIGEST_NATS__URL",
                "nats://127.0.0.1:4222, nats://127.0.0.1:4223,127.0.0.1:4224",
            );
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            let servers = config.nats.servers().map_err(|e| e.to_string())?;
            assert_eq!(servers.len(), 3);
            assert_eq!(servers[2].port(), 4224);
            jail.clear_env();
            jail.create_file(
                "c.toml",
                "[nats]\nurl = [\"nats://a:4222\", \"tls://b:4443\"]\n",
            )?;
            let config = Config::load(Some(Path::new("c.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(config.nats.url, "nats://a:4222,tls://b:4443");
            assert_eq!(config.nats.servers().map_err(|e| e.to_string())?.len(), 2);
            Ok(())
        });
    }

    #[test]
    fn a_server_list_that_does_not_parse_names_the_key() {
        for bad in [
            "nats://127.0.0.1:4222,nats://127.0.0.1:port",
            "http://127.0.0.1:4222",
            " , ",
        ] {
            let mut config = Config::default();
            config.nats.url = bad.into();
            let error = config.validate().expect_err(bad).to_string();
            assert!(error.starts_with("config key `nats.url`"), "{bad}: {error}");
        }
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[nats]\nurl = \"nats://file:4222\"\n[shards]\ncount = 8\n",
            )?;
            jail.set_env("ALARM_DIGEST_NATS__URL", "nats://env:4222");
            jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "[0,2]");
            let config = Config::load(Some(Path::new("c.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(config.nats.url, "nats://env:4222");
            assert_eq!(config.shards.count, 8);
            assert_eq!(
                config.shards.owned,
                OwnedShards::List(BTreeSet::from([0, 2]))
            );
            let flags = Overrides {
                nats_url: Some("nats://flag:4222".into()),
                ..Overrides::default()
            };
            let config =
                Config::load(Some(Path::new("c.toml")), &flags).map_err(|e| e.to_string())?;
            assert_eq!(config.nats.url, "nats://flag:4222");
            Ok(())
        });
    }

    #[test]
    fn owned_accepts_all_and_lists_in_every_spelling() {
        for (text, expected) in [
            ("all", OwnedShards::All),
            ("[0, 2]", OwnedShards::List(BTreeSet::from([0, 2]))),
            ("1,3", OwnedShards::List(BTreeSet::from([1, 3]))),
            ("ordinal", OwnedShards::Ordinal),
        ] {
            assert_eq!(OwnedShards::parse(text), Ok(expected));
        }
        assert!(OwnedShards::parse("[0,x]").is_err());
    }

    #[test]
    fn ordinal_ownership_takes_the_statefulset_hostname_suffix() {
        Jail::expect_with(|jail| {
            jail.set_env("ALARM_DIGEST_SHARDS__COUNT", "6");
            jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "ordinal");
            jail.set_env("ALARM_DIGEST_SHARDS__REPLICAS", "3");
            jail.set_env("HOSTNAME", "alarm-digest-1");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.shards.ordinal, Some(1));
            assert_eq!(config.shards.owned_shards(), vec![1, 4]);

            // An explicit ordinal wins over the hostname.
            jail.set_env("ALARM_DIGEST_SHARDS__ORDINAL", "2");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.shards.owned_shards(), vec![2, 5]);

            jail.set_env("ALARM_DIGEST_SHARDS__ORDINAL", "3");
            let error = Config::load(None, &Overrides::default()).expect_err("ordinal too big");
            assert!(error.to_string().contains("shards.ordinal"), "{error}");
            assert!(error.to_string().contains("0 to 2"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn ordinal_ownership_without_a_numbered_hostname_says_what_to_set() {
        Jail::expect_with(|jail| {
            jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "ordinal");
            jail.set_env("ALARM_DIGEST_SHARDS__REPLICAS", "2");
            jail.set_env("HOSTNAME", "db-primary");
            let error = Config::load(None, &Overrides::default()).expect_err("no ordinal");
            let text = error.to_string();
            assert!(text.contains("db-primary"), "{text}");
            assert!(text.contains("ALARM_DIGEST_SHARDS__ORDINAL"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn every_shard_has_exactly_one_ordinal_owner() {
        let mut shards = ShardsConfig {
            count: 16,
            owned: OwnedShards::Ordinal,
            replicas: 3,
            ..ShardsConfig::default()
        };
        let mut owners = vec![0; 16];
        for ordinal in 0..3 {
            shards.ordinal = Some(ordinal);
            for shard in shards.owned_shards() {
                owners[usize::from(shard)] += 1;
            }
        }
        assert_eq!(owners, vec![1; 16]);
    }

    #[test]
    fn bad_values_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("ALARM_DIGEST_SHARDS__COUNT", "4");
            jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "[7]");
            let error = Config::load(None, &Overrides::default()).expect_err("invalid");
            assert!(error.to_string().contains("shards.owned"), "{error}");
            jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "all");
            jail.set_env("ALARM_DIGEST_SHARDS__COUNT", "lots");
            let error = Config::load(None, &Overrides::default()).expect_err("invalid");
            assert!(error.to_string().contains("shards.count"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused_rather_than_ignored() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[shards]\ncuont = 8\n")?;
            let error =
                Config::load(Some(Path::new("c.toml")), &Overrides::default()).expect_err("typo");
            assert!(error.to_string().contains("cuont"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn a_world_readable_file_with_a_secret_is_flagged_and_a_private_one_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[nats]\nuser = \"svc\"\npassword = \"x\"\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(
            Config::world_readable_secret_file(Some(&path)),
            Some(path.clone())
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(Config::world_readable_secret_file(Some(&path)), None);
        std::fs::write(&path, "[nats]\nurl = \"nats://x:4222\"\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(
            Config::world_readable_secret_file(Some(&path)),
            None,
            "no secret in it"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut config = Config::default();
        config.nats.user = Some("svc".into());
        config.nats.password = Some(Secret("hunter2".into()));
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
