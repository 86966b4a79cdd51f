//! `Config::validate`: every section checks itself, each error naming its key (exit 64 at
//! the top).

use super::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.storage.validate()?;
        self.http.validate()?;
        self.shards.validate()?;
        self.streams.validate()?;
        self.snapshots.validate()?;
        self.limits.validate()?;
        self.tuning.validate()?;
        self.retention.validate()?;
        self.log.validate()
    }
}

impl NatsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.servers()
            .map_err(|problem| invalid("nats.url", problem))?;
        if self.password.is_some() != self.user.is_some() {
            return Err(invalid(
                "nats.user",
                "nats.user and nats.password go together",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(invalid(
                "nats.tls.cert_file",
                "cert_file and key_file go together",
            ));
        }
        Ok(())
    }
}

impl StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(invalid("storage.path", "must name a directory"));
        }
        if self.cache_capacity_mb == 0 {
            return Err(invalid("storage.cache_capacity_mb", "must be at least 1"));
        }
        Ok(())
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "http.listen",
                format!("{:?} is not an address such as 127.0.0.1:9090", self.listen),
            )
        })?;
        let inspect = self.inspect_listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "http.inspect_listen",
                format!(
                    "{:?} is not an address such as 127.0.0.1:9091",
                    self.inspect_listen
                ),
            )
        })?;
        if !inspect.ip().is_loopback() {
            return Err(invalid(
                "http.inspect_listen",
                "must be a loopback address (127.0.0.1 or ::1): it serves users' alarms",
            ));
        }
        Ok(())
    }
}

impl ShardsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.count == 0 || self.count > 4096 {
            return Err(invalid("shards.count", "must be between 1 and 4096"));
        }
        if let OwnedShards::List(list) = &self.owned {
            if list.is_empty() {
                return Err(invalid(
                    "shards.owned",
                    "must be `all` or a non-empty list such as [0,2]",
                ));
            }
            if let Some(bad) = list.iter().find(|s| **s >= self.count) {
                return Err(invalid(
                    "shards.owned",
                    format!("shard {bad} does not exist: shards.count is {}", self.count),
                ));
            }
        }
        if self.replicas == 0 || self.replicas > self.count {
            return Err(invalid(
                "shards.replicas",
                format!("must be between 1 and shards.count ({})", self.count),
            ));
        }
        if let Some(ordinal) = self.ordinal {
            if ordinal >= self.replicas {
                return Err(invalid(
                    "shards.ordinal",
                    format!(
                        "{ordinal} is not below shards.replicas ({}): with {} instances the \
                         ordinals are 0 to {}",
                        self.replicas,
                        self.replicas,
                        self.replicas - 1
                    ),
                ));
            }
        }
        if self.standbys > 0 {
            if self.owned != OwnedShards::Ordinal {
                return Err(invalid(
                    "shards.standbys",
                    "applies to shards.owned = \"ordinal\" only; with `all` or lists, \
                     instances whose lists overlap are each other's standbys",
                ));
            }
            if self.standbys >= self.replicas {
                return Err(invalid(
                    "shards.standbys",
                    format!(
                        "must be below shards.replicas ({}): each shard has one owner plus \
                         its standbys among the {} instances",
                        self.replicas, self.replicas
                    ),
                ));
            }
        }
        if !(3..=3600).contains(&self.lease_secs) {
            return Err(invalid("shards.lease_secs", "must be between 3 and 3600"));
        }
        Ok(())
    }
}

impl StreamsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
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
        s.validate_counts()
    }

    /// The partition and replica counts, node tags, the balancing period and the snapshot
    /// subject.
    fn validate_counts(&self) -> Result<(), ConfigError> {
        let s = self;
        if !(1..=MAX_INPUT_PARTITIONS).contains(&s.input_partitions) {
            return Err(invalid(
                "streams.input_partitions",
                format!(
                    "must be between 1 and {MAX_INPUT_PARTITIONS} (the server's mapping weighs \
                     each partition in whole percent)"
                ),
            ));
        }
        if !(1..=5).contains(&s.replicas) {
            return Err(invalid("streams.replicas", "must be between 1 and 5"));
        }
        let mut tags = BTreeSet::new();
        for tag in &s.node_tags {
            if tag.is_empty() || tag.contains(char::is_whitespace) || !tags.insert(tag) {
                return Err(invalid(
                    "streams.node_tags",
                    "must be distinct server tags without spaces, one per broker node",
                ));
            }
        }
        if s.balance_every_secs > 86_400 {
            return Err(invalid(
                "streams.balance_every_secs",
                "must be at most 86400 (0 turns the automatic leader moves off)",
            ));
        }
        if !s.snapshot_subject.split('.').all(is_valid_name) {
            return Err(invalid(
                "streams.snapshot_subject",
                "must be dot-separated tokens without spaces, '*', '>' or '/'",
            ));
        }
        Ok(())
    }
}

impl SnapshotsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let snapshots = self;
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
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_alarms_per_user == 0 {
            return Err(invalid("limits.max_alarms_per_user", "must be at least 1"));
        }
        if !(1..=31_536_000).contains(&self.max_future_skew_secs) {
            return Err(invalid(
                "limits.max_future_skew_secs",
                "must be between 1 and 31536000 (a year)",
            ));
        }
        if self.max_payload_bytes < 64 {
            return Err(invalid("limits.max_payload_bytes", "must be at least 64"));
        }
        Ok(())
    }
}

impl TuningConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let t = self;
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
        Ok(())
    }
}

impl RetentionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
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
        Ok(())
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be `text` or `json`"));
        }
        Ok(())
    }
}

pub(super) fn is_literal_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|token| !token.is_empty() && !token.contains(['*', '>', ' ', '\t', '\r', '\n']))
}

pub(super) fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['.', '*', '>', '/', '\\', ' ', '\t', '\r', '\n'])
}
