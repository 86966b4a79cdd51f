//! What a worker says about its shard, and noticing when it makes no progress.
//!
//! `/readyz` and `alarm_digest_shard_phase` are set together, by [`Health::report`]
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
use crate::shared::Shared;

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
    stalled: Option<String>,
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

    /// Why the shard is stalled, if it is.
    pub(super) fn stalled(&self) -> Option<&str> {
        self.stalled.as_deref()
    }

    pub(super) fn stall(&mut self, reason: String) {
        self.stalled = Some(reason);
    }
}

/// The phase a shard last reported, and how far it has to replay. Invariant: the phase gauge
/// and the shard's `/readyz` line change together, here only.
pub(super) struct Health {
    shard: u16,
    /// The shard's name in `/readyz`.
    part: String,
    /// The phase last reported.
    phase: Option<Phase>,
    /// Where the shard stream ended when the shard was taken: until the state reaches it,
    /// the worker is replaying.
    replay_target: u64,
}

impl Health {
    pub(super) fn new(shard: u16) -> Health {
        Health {
            shard,
            part: format!("shard {shard}"),
            phase: None,
            replay_target: 0,
        }
    }

    /// Sets the shard's phase gauge and its readiness together: ready only when consuming or
    /// following as a standby; every other phase carries the reason `/readyz` prints.
    pub(super) fn report(&mut self, shared: &Shared, phase: Phase, reason: impl Into<String>) {
        if self.phase != Some(phase) {
            let metrics = &shared.metrics;
            if self.phase == Some(Phase::Standby) {
                metrics.shards_standby.dec();
            }
            if phase == Phase::Standby {
                metrics.shards_standby.inc();
            }
            self.phase = Some(phase);
            metrics.set_phase(self.shard, phase);
        }
        if phase == Phase::Consuming {
            shared.readiness.set(self.part.clone(), true);
        } else if phase == Phase::Standby {
            shared.readiness.standby(self.part.clone(), reason);
        } else {
            shared.readiness.block(self.part.clone(), reason.into());
        }
    }

    /// The shard was restored; the log ended at `last` when it was taken.
    pub(super) fn replay_until(&mut self, last: u64) {
        self.replay_target = last;
    }

    /// Forgets the tenure's replay target.
    pub(super) fn forget_tenure(&mut self) {
        self.replay_target = 0;
    }

    /// Replaying until the state reaches where the shard stream ended when the shard was
    /// taken, consuming after.
    pub(super) fn note_applied(&mut self, shared: &Shared, applied: u64) {
        let behind = self.replay_target.saturating_sub(applied);
        if behind > 0 {
            shared.metrics.set_replay_behind(self.shard, behind);
            self.report(
                shared,
                Phase::Replaying,
                format!("replaying the shard stream: {behind} message(s) behind"),
            );
        } else {
            // Caught up: the gauge changes once, not on every batch.
            if self.phase != Some(Phase::Consuming) {
                shared.metrics.set_replay_behind(self.shard, 0);
            }
            self.report(shared, Phase::Consuming, "");
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
    /// Reports the shard's phase (see [`Health::report`]).
    pub(super) fn report(&mut self, phase: Phase, reason: impl Into<String>) {
        self.health.report(&self.shared, phase, reason);
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
