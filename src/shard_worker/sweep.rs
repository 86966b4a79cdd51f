//! The incremental retention sweep, one page between two batches.

use std::time::{Duration, Instant};

use crate::shared::Shared;
use crate::store::ShardStore;

/// Progress of the incremental retention sweep over this shard's alarms.
pub(super) struct Sweep {
    /// Where the running pass continues; `None` between passes.
    cursor: Option<Vec<u8>>,
    running: bool,
    last_pass: Instant,
    /// The newest ChangedAt this worker has applied. Retention is measured from it, not
    /// from the wall clock alone: replayed or backfilled events with old timestamps must not
    /// expire each other's tombstones (a late, older CRITICAL would then resurrect an alarm).
    newest_seen: Option<chrono::DateTime<chrono::Utc>>,
}

impl Sweep {
    pub(super) fn new() -> Sweep {
        Sweep {
            cursor: None,
            // The first pass starts once events have shown what time it is.
            running: true,
            last_pass: Instant::now(),
            newest_seen: None,
        }
    }

    /// The newest ChangedAt applied so far.
    pub(super) fn newest_seen(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.newest_seen
    }

    /// A durable batch applied events up to this ChangedAt.
    pub(super) fn note_newest_seen(&mut self, seen: Option<chrono::DateTime<chrono::Utc>>) {
        self.newest_seen = seen;
    }

    /// One sweep step if a pass is running or due: at most `sweep_page` alarms examined.
    pub(super) fn step(&mut self, store: &ShardStore, shared: &Shared) {
        let retention = &shared.config.retention;
        if !self.running {
            if self.last_pass.elapsed() < Duration::from_secs(retention.sweep_every_secs) {
                return;
            }
            self.running = true;
        }
        // The reference instant: the newest event applied, never later than the clock (a
        // far-future ChangedAt must not expire everything). No events yet: nothing to judge.
        let Some(newest_seen) = self.newest_seen else {
            return;
        };
        let now = newest_seen.min(chrono::Utc::now());
        match store.sweep_cleared(
            self.cursor.as_deref(),
            retention.sweep_page,
            now,
            retention.cleared_after(),
        ) {
            Ok((removed, next)) => {
                if removed > 0 {
                    shared.metrics.tombstones_swept.inc_by(removed as u64);
                }
                if next.is_none() {
                    self.running = false;
                    self.last_pass = Instant::now();
                    shared.metrics.sweep_passes.inc();
                }
                self.cursor = next;
            }
            Err(error) => {
                tracing::warn!(shard = store.shard(), %error, "retention sweep step failed");
                self.running = false;
                self.last_pass = Instant::now();
            }
        }
    }
}
