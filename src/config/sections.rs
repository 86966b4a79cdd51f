//! The sections other than `[nats]` and `[shards]`: each struct with its defaults and the
//! durations it derives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// Partition 0's stream of the input subjects; partition p > 0 is `<input_stream>_<p>`.
    pub input_stream: String,
    /// Input partitions: 1 keeps one input stream fed by the plain subjects. With more, the
    /// server's weighted mapping (`alarm-digest nats-mappings`) spreads the input subjects
    /// over `<subject>.in.<p>`, each captured by its own stream and routed by every instance.
    pub input_partitions: u16,
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
    /// With `replicas = 1`: one `server_tags` entry per broker node (each node's config carries
    /// its own). Each stream is placed on the node whose tag the plan gives it, so the nodes
    /// share the work (`bus/placement.rs`). Empty: the broker places streams as it likes.
    pub node_tags: Vec<String>,
    /// How often each instance checks that the replicated streams' leaders match the plan and
    /// moves the ones that do not (a few per round); 0 turns the automatic moves off.
    pub balance_every_secs: u64,
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
            input_partitions: 1,
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
            node_tags: Vec::new(),
            balance_every_secs: 30,
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
    /// How far a ChangedAt may lie ahead of the time the broker stored the event. A later one
    /// is dead-lettered (`future_time`) by the router: newest-wins would let it outrank every
    /// honest event.
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
