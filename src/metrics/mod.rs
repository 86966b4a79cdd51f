//! The instance's metrics, kept in `prometheus-client` types and rendered as OpenMetrics text.
//! Labels are only low-cardinality reasons and shard numbers; a user ID is never a label.

mod leadership;
mod process;

pub use leadership::Led;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// `/metrics` for a client that asks for OpenMetrics (Prometheus does).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `/metrics` for every other client (curl, `promtool check metrics`): the classic text format.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Shard {
    shard: String,
}

impl Shard {
    pub fn new(shard: u16) -> Shard {
        Shard {
            shard: shard.to_string(),
        }
    }
}

/// What a shard worker is doing, for `alarm_digest_shard_phase` and `/readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not holding the shard (another instance does, or it waits for its lease).
    Waiting,
    /// Draining the previous release's WorkQueue stream (the upgrade).
    Upgrading,
    /// Loading the newest good snapshot into the data dir.
    Restoring,
    /// Applying the shard stream's tail up to where it ended when the shard was taken.
    Replaying,
    /// Caught up: applying new messages as they come. The only phase in which the shard is
    /// ready.
    Consuming,
    /// Another process holds the lease; this one follows the shard log into its own copy,
    /// answering nothing, so a takeover replays only the last messages. Counts as ready
    /// while it follows.
    Standby,
    /// Holding the shard but making no progress: queued work not delivered, a failing fetch,
    /// data dir or outbox (`/readyz` says which).
    Stalled,
}

impl Phase {
    const ALL: [Phase; 7] = [
        Phase::Waiting,
        Phase::Upgrading,
        Phase::Restoring,
        Phase::Replaying,
        Phase::Consuming,
        Phase::Standby,
        Phase::Stalled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Upgrading => "upgrading",
            Phase::Restoring => "restoring",
            Phase::Replaying => "replaying",
            Phase::Consuming => "consuming",
            Phase::Standby => "standby",
            Phase::Stalled => "stalled",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardPhase {
    shard: String,
    phase: String,
}

pub struct Metrics {
    pub events_applied: Counter,
    pub events_unchanged: Counter,
    pub digest_requests: Counter,
    pub digests_published: Counter,
    pub digests_skipped_empty: Counter,
    pub duplicate_requests: Counter,
    pub routed: Counter,
    pub unmapped_inputs: Counter,
    pub redeliveries: Counter,
    pub publish_failures: Counter,
    pub store_failures: Counter,
    pub tombstones_swept: Counter,
    pub sweep_passes: Counter,
    pub lease_stale_batches: Counter,
    /// Times a shard held queued work it could not apply (`shard_worker/health.rs`).
    pub shard_stalls: Counter,
    /// Writes the broker refused because a newer owner of the shard exists (fencing).
    pub fenced_writes: Counter,
    /// Digests written in more than one part (larger than the server's `max_payload`).
    pub digests_split: Counter,
    /// Digest parts the broker refused for good; their alarms went back to unsent.
    pub digest_parts_refused: Counter,
    /// Redelivered shard log messages the state already reflected: acked unapplied.
    pub redeliveries_covered: Counter,
    pub snapshots_taken: Counter,
    /// Snapshots a restore found damaged (it fell back to the one before).
    pub snapshots_damaged: Counter,
    /// Per shard: the newest snapshot's shard stream sequence and time (Unix seconds).
    pub snapshot_sequence: Family<Shard, Gauge>,
    pub snapshot_timestamp: Family<Shard, Gauge>,
    /// Per shard: bytes the broker holds in the shard stream (read by `consumer_stats`).
    pub shard_stream_bytes: Family<Shard, Gauge>,
    /// Per shard: messages still to replay before the shard is caught up.
    replay_behind: Family<Shard, Gauge>,
    /// Per shard this instance is a standby for: shard log messages its copy lacks.
    standby_behind: Family<Shard, Gauge>,
    /// Shard log messages a standby applied to its copy.
    pub standby_applied: Counter,
    phase: Family<ShardPhase, Gauge>,
    /// 1 when `/readyz` would answer 200, else 0 (set when scraped).
    pub ready: Gauge,
    /// Shards this instance is configured to own.
    pub shards_owned: Gauge,
    /// Owned shards being consumed (home here, lease taken).
    pub shards_consuming: Gauge,
    /// Owned shards this instance follows as a warm standby right now.
    pub shards_standby: Gauge,
    /// Per shard, read from JetStream's consumer info (`consumer_stats`).
    pub shard_pending: Family<Shard, Gauge>,
    pub shard_ack_pending: Family<Shard, Gauge>,
    pub shard_redelivered: Family<Shard, Gauge>,
    /// The router's consumer of the input stream (shared by every instance).
    pub input_pending: Gauge,
    /// Request stored in its shard stream → its digest acknowledged by JetStream.
    pub digest_latency: Histogram,
    rejected: Family<Reason, Counter>,
    /// The sum over `rejected`, for callers (not exposed: the family already says it).
    rejected_all: Counter,
    batch_latency: Histogram,
    outbox: Arc<OutboxGauges>,
    /// Leader step-downs and placement moves this instance asked for (`balancer.rs`).
    pub leader_moves: Counter,
    /// This host's clock minus the broker's (`clock_watch.rs`).
    pub clock_skew: Gauge<f64, AtomicU64>,
    leadership: Arc<leadership::LeadershipGauges>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let histogram = || Histogram::new(LATENCY_BUCKETS);
        let metrics = Metrics {
            events_applied: Counter::default(),
            events_unchanged: Counter::default(),
            digest_requests: Counter::default(),
            digests_published: Counter::default(),
            digests_skipped_empty: Counter::default(),
            duplicate_requests: Counter::default(),
            routed: Counter::default(),
            unmapped_inputs: Counter::default(),
            redeliveries: Counter::default(),
            publish_failures: Counter::default(),
            store_failures: Counter::default(),
            tombstones_swept: Counter::default(),
            sweep_passes: Counter::default(),
            lease_stale_batches: Counter::default(),
            shard_stalls: Counter::default(),
            fenced_writes: Counter::default(),
            digests_split: Counter::default(),
            digest_parts_refused: Counter::default(),
            redeliveries_covered: Counter::default(),
            snapshots_taken: Counter::default(),
            snapshots_damaged: Counter::default(),
            snapshot_sequence: Family::default(),
            snapshot_timestamp: Family::default(),
            shard_stream_bytes: Family::default(),
            replay_behind: Family::default(),
            standby_behind: Family::default(),
            standby_applied: Counter::default(),
            phase: Family::default(),
            ready: Gauge::default(),
            shards_owned: Gauge::default(),
            shards_consuming: Gauge::default(),
            shards_standby: Gauge::default(),
            shard_pending: Family::default(),
            shard_ack_pending: Family::default(),
            shard_redelivered: Family::default(),
            input_pending: Gauge::default(),
            digest_latency: histogram(),
            rejected: Family::default(),
            rejected_all: Counter::default(),
            batch_latency: histogram(),
            outbox: Arc::new(OutboxGauges::default()),
            leader_moves: Counter::default(),
            clock_skew: Gauge::default(),
            leadership: Arc::default(),
            registry: Registry::default(),
        };
        metrics.registered()
    }

    /// Registers every metric: ours under `alarm_digest_`, the process's under `process_`,
    /// as the Prometheus conventions name them.
    fn registered(mut self) -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let ours = root.sub_registry_with_prefix("alarm_digest");
        self.register_counters(ours);
        self.register_gauges(ours);
        self.register_the_rest(ours);
        ours.register_collector(Box::new(self.outbox.clone()));
        ours.register_collector(Box::new(self.leadership.clone()));
        self.registry = root;
        self
    }

    /// The counters (`_total`).
    fn register_counters(&self, ours: &mut Registry) {
        let counters: [(&str, &str, &Counter); 21] = [
            ("events_applied", "Status changes that changed stored state.", &self.events_applied),
            ("events_unchanged", "Status changes that were stale or duplicates.", &self.events_unchanged),
            ("digest_requests", "Digest requests answered.", &self.digest_requests),
            (
                "digests_published",
                "Digest messages (parts) acknowledged by JetStream; a digest that fits one message is one.",
                &self.digests_published,
            ),
            ("digests_skipped_empty", "Empty digests not sent (digest.skip_empty).", &self.digests_skipped_empty),
            ("duplicate_requests", "Redelivered digest requests answered before.", &self.duplicate_requests),
            ("routed", "Input messages republished to a shard stream.", &self.routed),
            (
                "unmapped_inputs",
                "Inputs on a plain subject while streams.input_partitions > 1: the server's mapping did not spread them (processed through partition 0).",
                &self.unmapped_inputs,
            ),
            ("redeliveries", "Messages delivered more than once.", &self.redeliveries),
            ("publish_failures", "Publishes without a PubAck (retried).", &self.publish_failures),
            ("store_failures", "Batches the store could not apply or flush (retried).", &self.store_failures),
            ("tombstones_swept", "CLEARED alarms removed by the retention sweep.", &self.tombstones_swept),
            ("sweep_passes", "Completed retention sweep passes over a shard.", &self.sweep_passes),
            (
                "lease_stale_batches",
                "Fetched batches handed back unapplied: the shard lease was not renewed in time.",
                &self.lease_stale_batches,
            ),
            (
                "shard_stalls",
                "Times a shard held queued work and applied none of it for 5 s (its consumer is created again).",
                &self.shard_stalls,
            ),
            (
                "fenced_writes",
                "Writes of a former shard owner the broker refused because a newer owner exists.",
                &self.fenced_writes,
            ),
            (
                "digests_split",
                "Digests written in several parts because they exceed the server's max_payload.",
                &self.digests_split,
            ),
            (
                "digest_parts_refused",
                "Digest parts the broker refused for good; their alarms went back to unsent.",
                &self.digest_parts_refused,
            ),
            (
                "redeliveries_covered",
                "Redelivered shard stream messages the shard state already reflected (acked unapplied).",
                &self.redeliveries_covered,
            ),
            ("snapshots_taken", "Shard snapshots stored in JetStream.", &self.snapshots_taken),
            (
                "snapshots_damaged",
                "Snapshots a restore found damaged; it used the one before.",
                &self.snapshots_damaged,
            ),
        ];
        for (name, help, counter) in counters {
            ours.register(name, help, counter.clone());
        }
    }

    /// Rejections by reason, and the gauges: readiness, shards, consumers, snapshots,
    /// standbys.
    fn register_gauges(&self, ours: &mut Registry) {
        ours.register(
            "rejected",
            "Invalid input dead-lettered, by reason.",
            self.rejected.clone(),
        );
        ours.register(
            "ready",
            "1 when /readyz answers 200 (every owned shard consumed, NATS connected), else 0.",
            self.ready.clone(),
        );
        ours.register(
            "shards_owned",
            "Shards this instance is configured to own.",
            self.shards_owned.clone(),
        );
        ours.register(
            "shards_consuming",
            "Owned shards being consumed; fewer than owned: see /readyz for why.",
            self.shards_consuming.clone(),
        );
        ours.register(
            "shards_standby",
            "Owned shards this instance follows as a warm standby (another process holds their lease).",
            self.shards_standby.clone(),
        );
        ours.register(
            "shard_consumer_pending",
            "Messages in the shard stream not yet delivered to its worker (lag), per shard.",
            self.shard_pending.clone(),
        );
        ours.register(
            "shard_consumer_ack_pending",
            "Messages delivered to the shard worker and not yet acked, per shard.",
            self.shard_ack_pending.clone(),
        );
        ours.register(
            "shard_consumer_redelivered",
            "Messages of the shard stream delivered more than once and not yet acked, per shard.",
            self.shard_redelivered.clone(),
        );
        ours.register(
            "snapshot_sequence",
            "The shard stream sequence the shard's newest snapshot covers, per shard.",
            self.snapshot_sequence.clone(),
        );
        ours.register(
            "snapshot_timestamp_seconds",
            "When the shard's newest snapshot was taken (Unix time), per shard.",
            self.snapshot_timestamp.clone(),
        );
        ours.register(
            "shard_stream_bytes",
            "Bytes the broker holds in the shard stream (the tail since the oldest kept snapshot), per shard.",
            self.shard_stream_bytes.clone(),
        );
        ours.register(
            "shard_replay_behind_messages",
            "Shard stream messages still to replay before the shard is caught up, per shard.",
            self.replay_behind.clone(),
        );
        ours.register(
            "standby_behind_messages",
            "Shard log messages a standby's copy lacks, per shard this instance is a standby for.",
            self.standby_behind.clone(),
        );
        ours.register(
            "standby_applied",
            "Shard log messages standbys applied to their copies of shards held elsewhere.",
            self.standby_applied.clone(),
        );
        ours.register(
            "shard_phase",
            "1 for the phase each owned shard is in (waiting, upgrading, restoring, replaying, consuming, standby, stalled).",
            self.phase.clone(),
        );
        ours.register(
            "input_consumer_pending",
            "Messages in the input stream not yet delivered to any router (lag).",
            self.input_pending.clone(),
        );
    }

    /// Histograms, the build info, leader moves and the clock skew.
    fn register_the_rest(&self, ours: &mut Registry) {
        ours.register(
            "batch_duration_seconds",
            "Time to apply, flush, publish and ack one shard batch.",
            self.batch_latency.clone(),
        );
        ours.register(
            "digest_latency_seconds",
            "A digest request stored in its shard stream until its digest is acknowledged by JetStream.",
            self.digest_latency.clone(),
        );
        ours.register(
            "build",
            "The running build.",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        ours.register(
            "leader_moves",
            "Stream and consumer leader moves (and single-replica placement moves) this instance asked the broker for, to follow the placement plan.",
            self.leader_moves.clone(),
        );
        ours.register(
            "clock_skew_seconds",
            "This host's clock minus the broker's, read every 10 s (negative: behind). Decisions use the broker's time; a large skew only skews this host's logs and ages.",
            self.clock_skew.clone(),
        );
    }

    pub fn rejected(&self, code: &'static str) {
        self.rejected
            .get_or_create(&Reason {
                reason: code.to_string(),
            })
            .inc();
        self.rejected_all.inc();
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected_all.get()
    }

    pub fn set_outbox(&self, shard: u16, entries: usize, oldest_written_ms: Option<i64>) {
        if let Ok(mut outbox) = self.outbox.shards.lock() {
            outbox.insert(shard, (entries, oldest_written_ms));
        }
    }

    /// Who leads each of the service's streams, as the balancer's last survey saw it.
    pub fn set_leadership(&self, streams: Vec<Led>) {
        self.leadership.set(streams);
    }

    pub fn set_phase(&self, shard: u16, phase: Phase) {
        for each in Phase::ALL {
            let labels = ShardPhase {
                shard: shard.to_string(),
                phase: each.as_str().to_string(),
            };
            self.phase
                .get_or_create(&labels)
                .set(i64::from(each == phase));
        }
    }

    pub fn set_replay_behind(&self, shard: u16, behind: u64) {
        self.replay_behind
            .get_or_create(&Shard::new(shard))
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
    }

    pub fn set_standby_behind(&self, shard: u16, behind: u64) {
        self.standby_behind
            .get_or_create(&Shard::new(shard))
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
    }

    pub fn set_snapshot(&self, shard: u16, sequence: u64, taken_at_ms: i64) {
        let shard = Shard::new(shard);
        self.snapshot_sequence
            .get_or_create(&shard)
            .set(i64::try_from(sequence).unwrap_or(i64::MAX));
        self.snapshot_timestamp
            .get_or_create(&shard)
            .set(taken_at_ms / 1000);
    }

    pub fn observe_batch(&self, elapsed: Duration) {
        self.batch_latency.observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "cannot render the metrics");
        }
        out
    }

    /// The same metrics in Prometheus' classic text format (version 0.0.4).
    pub fn render_prometheus_text(&self) -> String {
        let mut out = String::new();
        if let Err(error) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(%error, "cannot render the metrics");
        }
        out
    }
}

/// Per shard: outbox entries waiting for a PubAck and the oldest one's write time (Unix ms).
/// A collector, so the age is computed when scraped rather than kept up to date by a timer.
#[derive(Debug, Default)]
struct OutboxGauges {
    shards: Mutex<BTreeMap<u16, (usize, Option<i64>)>>,
}

impl OutboxGauges {
    fn encode_at(
        &self,
        mut encoder: DescriptorEncoder,
        now_ms: i64,
    ) -> Result<(), std::fmt::Error> {
        let Ok(shards) = self.shards.lock() else {
            return Ok(());
        };
        let entries = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "outbox_entries",
            "Digest parts written but not yet acknowledged by JetStream, per shard.",
            None,
            entries.metric_type(),
        )?;
        for (shard, (count, _)) in shards.iter() {
            let gauge = ConstGauge::new(i64::try_from(*count).unwrap_or(i64::MAX));
            gauge.encode(family.encode_family(&Shard::new(*shard))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished digest part, per shard (0 when none).",
            None,
            entries.metric_type(),
        )?;
        for (shard, (_, oldest)) in shards.iter() {
            let age = oldest.map_or(0.0, |written| (now_ms - written).max(0) as f64 / 1000.0);
            ConstGauge::new(age).encode(family.encode_family(&Shard::new(*shard))?)?;
        }
        Ok(())
    }
}

impl Collector for OutboxGauges {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_at(encoder, chrono::Utc::now().timestamp_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_reasons_buckets_and_build_info() {
        let metrics = Metrics::new();
        metrics.events_applied.inc_by(3);
        metrics.rejected("bad_time");
        metrics.observe_batch(Duration::from_millis(3));
        metrics.shards_owned.set(2);
        metrics.shard_pending.get_or_create(&Shard::new(4)).set(17);
        let text = metrics.render();
        assert!(
            text.contains("# TYPE alarm_digest_shards_owned gauge\n"),
            "{text}"
        );
        assert!(text.contains("alarm_digest_shards_owned 2\n"), "{text}");
        assert!(
            text.contains("alarm_digest_events_applied_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("alarm_digest_rejected_total{reason=\"bad_time\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("alarm_digest_batch_duration_seconds_bucket{le=\"0.0025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("alarm_digest_batch_duration_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("alarm_digest_batch_duration_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains("alarm_digest_shard_consumer_pending{shard=\"4\"} 17\n"),
            "{text}"
        );
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "alarm_digest_build_info{{version=\"{version}\"}} 1\n"
            )),
            "{text}"
        );
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        let classic = metrics.render_prometheus_text();
        assert!(
            classic.contains("alarm_digest_events_applied_total 3\n"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"), "{classic}");
    }

    #[test]
    fn outbox_gauges_give_depth_and_oldest_age_per_shard() {
        let metrics = Metrics::new();
        metrics.set_outbox(2, 3, Some(10_000));
        metrics.set_outbox(5, 0, None);
        let mut registry = Registry::default();
        let outbox = metrics.outbox.clone();
        #[derive(Debug)]
        struct At(Arc<OutboxGauges>);
        impl Collector for At {
            fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                self.0.encode_at(encoder, 25_500)
            }
        }
        registry.register_collector(Box::new(At(outbox)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("render");
        assert!(out.contains("outbox_entries{shard=\"2\"} 3\n"), "{out}");
        assert!(
            out.contains("outbox_oldest_age_seconds{shard=\"2\"} 15.5\n"),
            "{out}"
        );
        assert!(
            out.contains("outbox_oldest_age_seconds{shard=\"5\"} 0.0\n"),
            "{out}"
        );
    }
}
