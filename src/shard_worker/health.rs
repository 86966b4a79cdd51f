//! What a worker says about its shard, and noticing when it makes no progress.
//!
//! `/readyz` and `alarm_digest_shard_phase` are set together, by [`ShardWorker::report`]
//! alone, so they cannot disagree: a shard is ready exactly when its phase is `consuming`, or
//! `standby` (following its holder; `/readyz` names it with how far behind it is).
//!
//! A shard whose log holds messages the state lacks while nothing arrives for
//! [`STALL_AFTER`] is *stalled* (a consumer deleted or wedged on the broker, a replica group
//! without quorum, messages held by a process that lost the lease): the worker says so with
//! the reason and creates its consumer again, which is the holder's to do.

use std::time::{Duration, Instant};

use super::ShardWorker;
use crate::bus;
use crate::metrics::Phase;

/// How long a shard may hold queued work without applying any of it before it is stalled.
pub(super) const STALL_AFTER: Duration = Duration::from_secs(5);

/// How often an idle worker asks the broker where the shard log ends.
const LOOK_EVERY: Duration = Duration::from_secs(2);

/// Progress as the worker sees it between fetches.
pub(super) struct Progress {
    /// The applied sequence when it last moved, and when.
    applied: u64,
    moved_at: Instant,
    /// When the log's end was last read.
    looked_at: Instant,
    /// Why the shard is stalled, until it applies something again or has nothing queued.
    pub(super) stalled: Option<String>,
}

impl Progress {
    pub(super) fn new(applied: u64) -> Progress {
        let now = Instant::now();
        Progress {
            applied,
            moved_at: now,
            looked_at: now,
            stalled: None,
        }
    }
}

/// What an idle worker found out about its shard log.
pub(super) enum Idle {
    /// Nothing queued, or not long enough to tell.
    Fine,
    /// Work queued and none applied for [`STALL_AFTER`], or the log cannot be read: the reason.
    Stalled(String),
}

impl ShardWorker {
    /// Sets the shard's phase gauge and its readiness together: ready only when consuming or
    /// following as a standby; every other phase carries the reason `/readyz` prints.
    pub(super) fn report(&mut self, phase: Phase, reason: impl Into<String>) {
        let shard = self.store.shard();
        if self.phase != Some(phase) {
            let metrics = &self.shared.metrics;
            if self.phase == Some(Phase::Standby) {
                metrics.shards_standby.dec();
            }
            if phase == Phase::Standby {
                metrics.shards_standby.inc();
            }
            self.phase = Some(phase);
            metrics.set_phase(shard, phase);
        }
        if phase == Phase::Consuming {
            self.shared.readiness.set(self.part.clone(), true);
        } else if phase == Phase::Standby {
            self.shared.readiness.standby(self.part.clone(), reason);
        } else {
            self.shared
                .readiness
                .block(self.part.clone(), reason.into());
        }
    }

    /// Called after every batch: the applied sequence moved (or there was nothing to do).
    pub(super) fn note_progress(&mut self, progress: &mut Progress) {
        let applied = self.store.applied();
        if applied != progress.applied {
            progress.applied = applied;
            progress.moved_at = Instant::now();
            progress.stalled = None;
        }
    }

    /// Called after a fetch that brought nothing: every [`LOOK_EVERY`], compares the end of
    /// the shard log with the state. Queued work that nothing applied for [`STALL_AFTER`] is a
    /// stall; so is a log that cannot be read.
    pub(super) async fn look_for_stall(&mut self, progress: &mut Progress) -> Idle {
        if progress.looked_at.elapsed() < LOOK_EVERY {
            return Idle::Fine;
        }
        progress.looked_at = Instant::now();
        let applied = self.store.applied();
        self.note_progress(progress);
        let name = self.shared.topology.shard_stream(self.store.shard());
        let last = match bus::stream_info(&self.shared.js, &name).await {
            Ok(info) => info.state.last_sequence,
            Err(error) => {
                return if progress.moved_at.elapsed() >= STALL_AFTER {
                    Idle::Stalled(format!("the shard log cannot be read: {error}"))
                } else {
                    Idle::Fine
                };
            }
        };
        if last <= applied {
            // Nothing queued: idle is not stalled.
            progress.moved_at = Instant::now();
            progress.stalled = None;
            return Idle::Fine;
        }
        if progress.moved_at.elapsed() < STALL_AFTER {
            return Idle::Fine;
        }
        Idle::Stalled(format!(
            "stalled: the shard log holds up to sequence {last}, the state reflects {applied}, \
             and its consumer delivered nothing for {}s; creating the consumer again",
            progress.moved_at.elapsed().as_secs()
        ))
    }
}
