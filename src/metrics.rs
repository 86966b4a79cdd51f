//! Counters and one latency histogram, rendered in Prometheus text format. Labels are only
//! low-cardinality reasons and shard numbers; a user ID is never a label.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
pub struct Metrics {
    pub events_applied: AtomicU64,
    pub events_unchanged: AtomicU64,
    pub digest_requests: AtomicU64,
    pub digests_published: AtomicU64,
    pub digests_skipped_empty: AtomicU64,
    pub duplicate_requests: AtomicU64,
    pub routed: AtomicU64,
    pub redeliveries: AtomicU64,
    pub publish_failures: AtomicU64,
    pub store_failures: AtomicU64,
    pub tombstones_swept: AtomicU64,
    pub sweep_passes: AtomicU64,
    pub lease_stale_batches: AtomicU64,
    /// Gauge: shards this instance is configured to own.
    pub shards_owned: AtomicU64,
    /// Gauge: owned shards being consumed (home here, lease taken).
    pub shards_consuming: AtomicU64,
    /// Digests written in more than one part (larger than the server's `max_payload`).
    pub digests_split: AtomicU64,
    /// Digest parts the broker refused for good; their alarms went back to unsent.
    pub digest_parts_refused: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Per shard: outbox entries waiting for a PubAck, and the oldest one's write time (Unix
    /// ms). Only shard numbers label them.
    outbox: Mutex<BTreeMap<u16, (usize, Option<i64>)>>,
    batch_latency: Histogram,
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Metrics {
    pub fn rejected(&self, code: &'static str) {
        if let Ok(mut rejected) = self.rejected.lock() {
            *rejected.entry(code).or_default() += 1;
        }
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.lock().map(|r| r.values().sum()).unwrap_or(0)
    }

    pub fn set_outbox(&self, shard: u16, entries: usize, oldest_written_ms: Option<i64>) {
        if let Ok(mut outbox) = self.outbox.lock() {
            outbox.insert(shard, (entries, oldest_written_ms));
        }
    }

    pub fn observe_batch(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let h = &self.batch_latency;
        for (bucket, bound) in h.buckets.iter().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        h.count.fetch_add(1, Relaxed);
        h.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "events_applied_total",
                "Status changes that changed stored state.",
                &self.events_applied,
            ),
            (
                "events_unchanged_total",
                "Status changes that were stale or duplicates.",
                &self.events_unchanged,
            ),
            (
                "digest_requests_total",
                "Digest requests answered.",
                &self.digest_requests,
            ),
            (
                "digests_published_total",
                "Digest messages (parts) acknowledged by JetStream; a digest that fits one message is one.",
                &self.digests_published,
            ),
            (
                "digests_split_total",
                "Digests written in several parts because they exceed the server's max_payload.",
                &self.digests_split,
            ),
            (
                "digest_parts_refused_total",
                "Digest parts the broker refused for good; their alarms went back to unsent.",
                &self.digest_parts_refused,
            ),
            (
                "digests_skipped_empty_total",
                "Empty digests not sent (digest.skip_empty).",
                &self.digests_skipped_empty,
            ),
            (
                "duplicate_requests_total",
                "Redelivered digest requests answered before.",
                &self.duplicate_requests,
            ),
            (
                "routed_total",
                "Input messages republished to a shard stream.",
                &self.routed,
            ),
            (
                "redeliveries_total",
                "Messages delivered more than once.",
                &self.redeliveries,
            ),
            (
                "publish_failures_total",
                "Publishes without a PubAck (retried).",
                &self.publish_failures,
            ),
            (
                "store_failures_total",
                "Batches the store could not apply or flush (retried).",
                &self.store_failures,
            ),
            (
                "tombstones_swept_total",
                "CLEARED alarms removed by the retention sweep.",
                &self.tombstones_swept,
            ),
            (
                "sweep_passes_total",
                "Completed retention sweep passes over a shard.",
                &self.sweep_passes,
            ),
            (
                "lease_stale_batches_total",
                "Fetched batches handed back unapplied: the shard lease was not renewed in time.",
                &self.lease_stale_batches,
            ),
        ];
        let gauges = [
            (
                "shards_owned",
                "Shards this instance is configured to own.",
                &self.shards_owned,
            ),
            (
                "shards_consuming",
                "Owned shards being consumed; fewer than owned: see /readyz for why.",
                &self.shards_consuming,
            ),
        ];
        let typed = (counters.iter().map(|metric| ("counter", metric)))
            .chain(gauges.iter().map(|metric| ("gauge", metric)));
        for (kind, (name, help, value)) in typed {
            let _ = writeln!(out, "# HELP alarm_digest_{name} {help}");
            let _ = writeln!(out, "# TYPE alarm_digest_{name} {kind}");
            let _ = writeln!(out, "alarm_digest_{name} {}", value.load(Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP alarm_digest_rejected_total Invalid input dead-lettered, by reason."
        );
        let _ = writeln!(out, "# TYPE alarm_digest_rejected_total counter");
        if let Ok(rejected) = self.rejected.lock() {
            for (reason, count) in rejected.iter() {
                let _ = writeln!(
                    out,
                    "alarm_digest_rejected_total{{reason=\"{reason}\"}} {count}"
                );
            }
        }
        self.render_outbox(&mut out, chrono::Utc::now().timestamp_millis());
        let h = &self.batch_latency;
        let name = "alarm_digest_batch_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to apply, flush, publish and ack one shard batch."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bucket, bound) in h.buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = h.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            h.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

impl Metrics {
    fn render_outbox(&self, out: &mut String, now_ms: i64) {
        let Ok(outbox) = self.outbox.lock() else {
            return;
        };
        let _ = writeln!(
            out,
            "# HELP alarm_digest_outbox_entries Digest parts written but not yet acknowledged by JetStream, per shard."
        );
        let _ = writeln!(out, "# TYPE alarm_digest_outbox_entries gauge");
        for (shard, (entries, _)) in outbox.iter() {
            let _ = writeln!(
                out,
                "alarm_digest_outbox_entries{{shard=\"{shard}\"}} {entries}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP alarm_digest_outbox_oldest_age_seconds Age of the oldest unpublished digest part, per shard (0 when none)."
        );
        let _ = writeln!(out, "# TYPE alarm_digest_outbox_oldest_age_seconds gauge");
        for (shard, (_, oldest)) in outbox.iter() {
            let age = oldest.map_or(0.0, |written| (now_ms - written).max(0) as f64 / 1000.0);
            let _ = writeln!(
                out,
                "alarm_digest_outbox_oldest_age_seconds{{shard=\"{shard}\"}} {age}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_reasons_and_cumulative_buckets() {
        let metrics = Metrics::default();
        metrics.events_applied.fetch_add(3, Relaxed);
        metrics.rejected("bad_time");
        metrics.observe_batch(Duration::from_millis(3));
        metrics.shards_owned.store(2, Relaxed);
        let text = metrics.render();
        assert!(
            text.contains("# TYPE alarm_digest_shards_owned gauge\nalarm_digest_shards_owned 2\n")
        );
        assert!(text.contains("alarm_digest_events_applied_total 3\n"));
        assert!(text.contains("alarm_digest_rejected_total{reason=\"bad_time\"} 1\n"));
        assert!(text.contains("alarm_digest_batch_duration_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("alarm_digest_batch_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("alarm_digest_batch_duration_seconds_count 1\n"));
    }

    #[test]
    fn outbox_gauges_give_depth_and_oldest_age_per_shard() {
        let metrics = Metrics::default();
        metrics.set_outbox(2, 3, Some(10_000));
        metrics.set_outbox(5, 0, None);
        let mut out = String::new();
        metrics.render_outbox(&mut out, 25_500);
        assert!(
            out.contains("alarm_digest_outbox_entries{shard=\"2\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("alarm_digest_outbox_oldest_age_seconds{shard=\"2\"} 15.5\n"),
            "{out}"
        );
        assert!(
            out.contains("alarm_digest_outbox_oldest_age_seconds{shard=\"5\"} 0\n"),
            "{out}"
        );
    }
}
