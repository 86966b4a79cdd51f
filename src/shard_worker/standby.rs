//! A warm standby: an owner that does not hold the shard's lease keeps its own copy of the
//! shard current while it waits, so a takeover replays only the last messages.
//!
//! The standby brings its copy up to date once, as a new owner would (its own data dir when
//! that is at least as new as the newest snapshot and the log still reaches back to it, else
//! the newest good snapshot), then reads the shard log after it through a reader of its own
//! (ephemeral, no acks: the holder's consumer is the holder's alone) and applies it with the
//! holder's own code ([`ShardWorker::stage`]), so its copy is the holder's state, outbox
//! sequences and digest Msg-Ids included. It answers nothing: no ack, no dead letter, no
//! digest. The parts its copy queues are dropped once the holder's lease record says they
//! were published ([`Published`]); at a takeover the few left go out again with the same
//! Msg-Ids, and the output stream drops the copies.
//!
//! A log purged past the copy (the standby fell behind the holder's snapshots) sends it back
//! to the newest snapshot. Anything the standby cannot do makes the shard not ready with the
//! reason; it never touches the holder's consumer, lease or snapshots.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::Message;
use tokio_util::sync::CancellationToken;

use super::batch::Source;
use super::restore::NoBase;
use super::ShardWorker;
use crate::bus::ownership::Published;
use crate::bus::{self, BusError};
use crate::metrics::Phase;

/// A standby's reader and how current its copy is; lives while the worker waits for the lease.
#[derive(Default)]
pub(super) struct Standby {
    reader: Option<PullConsumer>,
    /// The copy was brought up to date from a base in this waiting period.
    based: bool,
    /// Shard log messages after the last one applied, as the reader last said.
    behind: u64,
}

fn sequence_of(message: &Message) -> u64 {
    message.info().map(|info| info.stream_sequence).unwrap_or(0)
}

impl ShardWorker {
    /// Follows the shard for one look's time (a sixth of the lease period: half the holder's
    /// renewal interval, so a holder that stopped renewing is noticed soon), then returns so
    /// the caller can try the lease again; `false` if cancelled.
    pub(super) async fn follow(
        &mut self,
        standby: &mut Standby,
        holder: &str,
        published: Published,
        cancel: &CancellationToken,
    ) -> bool {
        let until = Instant::now() + self.cluster.renew_every() / 2;
        let shard = self.store.shard();
        if !standby.based {
            match self.choose_and_load_base().await {
                Ok(_) => {
                    standby.based = true;
                    // The copy's outbox is the holder's to publish while it holds the shard.
                    self.outbox.forget();
                    self.drop_published(published);
                }
                Err(no_base) => {
                    let reason = match no_base {
                        NoBase::Bus(error) => error.to_string(),
                        NoBase::Unusable(reason) => reason,
                    };
                    return self
                        .standby_blocked(
                            format!("{holder}; standby cannot restore: {reason}"),
                            until,
                            cancel,
                        )
                        .await;
                }
            }
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            let reader = match self.reader(standby).await {
                Ok(reader) => reader,
                Err(error) => {
                    let reason = format!("{holder}; standby cannot read the shard log: {error}");
                    return self.standby_blocked(reason, until, cancel).await;
                }
            };
            let expires = left.min(self.shared.config.tuning.fetch_expires());
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return false,
                fetched = bus::fetch_limited(&reader, self.fetch_limit(), expires) => fetched,
            };
            match fetched {
                Ok(messages) if messages.is_empty() => {}
                Ok(messages) => {
                    if let Err(reason) = self.apply_followed(standby, &messages) {
                        return self
                            .standby_blocked(format!("{holder}; {reason}"), until, cancel)
                            .await;
                    }
                    if !standby.based {
                        // Restored from the newest snapshot at the next look.
                        return true;
                    }
                }
                Err(error) => {
                    // The reader is gone (a broker restart, an inactive threshold): a new one
                    // starts where the copy stands.
                    standby.reader = None;
                    tracing::debug!(shard, %error, "standby reader failed; creating another");
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(left.min(Duration::from_millis(250))) => {}
                    }
                    continue;
                }
            }
            self.drop_published(published);
            self.shared
                .metrics
                .set_standby_behind(shard, standby.behind);
            self.report(
                Phase::Standby,
                format!("{holder}; {} message(s) behind", standby.behind),
            );
        }
    }

    /// The standby's reader of the shard log, created after the copy's last applied message
    /// when there is none.
    async fn reader(&self, standby: &mut Standby) -> Result<PullConsumer, BusError> {
        if let Some(reader) = &standby.reader {
            return Ok(reader.clone());
        }
        let start = self.store.applied() + 1;
        let shared = &self.shared;
        let reader = shared
            .topology
            .standby_consumer_from(&shared.js, self.store.shard(), start)
            .await?;
        standby.reader = Some(reader.clone());
        Ok(reader)
    }

    /// Applies what the reader brought to the copy; `Err` with the reason the copy cannot
    /// follow right now (it starts again from a base or a new reader).
    fn apply_followed(
        &mut self,
        standby: &mut Standby,
        messages: &[Message],
    ) -> Result<(), String> {
        let shard = self.store.shard();
        let next = self.store.applied() + 1;
        let first = messages.first().map(sequence_of).unwrap_or(next);
        if first > next {
            // The holder's snapshots purged the log past this copy: start from the newest.
            tracing::info!(
                shard,
                applied = next - 1,
                first,
                "standby fell behind the shard log's start; restoring from the newest snapshot"
            );
            standby.based = false;
            standby.reader = None;
            return Ok(());
        }
        match self.stage(messages, sequence_of, Source::ShardLog) {
            Ok(staged) => {
                if staged.gap_at.is_some() {
                    standby.reader = None;
                }
                let applied = self.store.applied().saturating_sub(next - 1);
                self.shared.metrics.standby_applied.inc_by(applied);
                if let Some(last) = messages.last().and_then(|m| m.info().ok()) {
                    standby.behind = last.pending;
                }
                Ok(())
            }
            Err(error) => {
                standby.based = false;
                standby.reader = None;
                Err(format!("standby cannot apply the shard log: {error}"))
            }
        }
    }

    /// Drops the parts of the copy's outbox the holder has published.
    fn drop_published(&self, published: Published) {
        if published.epoch != self.store.digest_epoch() {
            return;
        }
        if let Err(error) = self.store.drop_outbox_below(published.below) {
            tracing::warn!(shard = self.store.shard(), %error, "standby cannot drop published digests");
        }
    }

    /// Not ready with the reason, until the next look.
    async fn standby_blocked(
        &mut self,
        reason: String,
        until: Instant,
        cancel: &CancellationToken,
    ) -> bool {
        tracing::debug!(shard = self.store.shard(), "{reason}");
        self.report(Phase::Waiting, reason);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep_until(until.into()) => true,
        }
    }
}
