//! The incremental retention sweep, one page between two batches.

use std::time::{Duration, Instant};

use super::ShardWorker;

/// Progress of the incremental retention sweep over this shard's alarms.
pub(super) struct Sweep {
    /// Where the running pass continues; `None` between passes.
    pub(super) cursor: Option<Vec<u8>>,
    pub(super) running: bool,
    pub(super) last_pass: Instant,
    /// The newest ChangedAt this worker has applied. Retention is measured from it, not
    /// from the wall clock alone: replayed or backfilled events with old timestamps must not
    /// expire each other's tombstones (a late, older CRITICAL would then resurrect an alarm).
    pub(super) newest_seen: Option<chrono::DateTime<chrono::Utc>>,
}

impl ShardWorker {
    /// One sweep step if a pass is running or due: at most `sweep_page` alarms examined.
    pub(super) fn sweep_step(&mut self) {
        let retention = &self.shared.config.retention;
        if !self.sweep.running {
            if self.sweep.last_pass.elapsed() < Duration::from_secs(retention.sweep_every_secs) {
                return;
            }
            self.sweep.running = true;
        }
        // The reference instant: the newest event applied, never later than the clock (a
        // far-future ChangedAt must not expire everything). No events yet: nothing to judge.
        let Some(newest_seen) = self.sweep.newest_seen else {
            return;
        };
        let now = newest_seen.min(chrono::Utc::now());
        match self.store.sweep_cleared(
            self.sweep.cursor.as_deref(),
            retention.sweep_page,
            now,
            retention.cleared_after(),
        ) {
            Ok((removed, next)) => {
                if removed > 0 {
                    self.shared.metrics.tombstones_swept.inc_by(removed as u64);
                }
                if next.is_none() {
                    self.sweep.running = false;
                    self.sweep.last_pass = Instant::now();
                    self.shared.metrics.sweep_passes.inc();
                }
                self.sweep.cursor = next;
            }
            Err(error) => {
                tracing::warn!(shard = self.store.shard(), %error, "retention sweep step failed");
                self.sweep.running = false;
                self.sweep.last_pass = Instant::now();
            }
        }
    }
}
