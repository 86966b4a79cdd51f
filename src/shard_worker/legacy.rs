//! The upgrade from the release that kept each shard in a WorkQueue stream, pinned to the
//! data dir of its "home".
//!
//! At start every instance retires each previous-release shard stream (takes the shard
//! subjects from it, so the new Limits stream captures new messages; `bus/topology.rs`). The
//! shard's home there, started on this release, takes the lease, applies what the old stream
//! still holds exactly as that release did, then writes the shard's first snapshot (its
//! local state, covering none of the new stream yet), deletes the old stream and forgets the
//! home. From then on the shard is like any other: whoever takes it restores and replays the
//! new stream from sequence 1. Until then no other instance takes the shard: the state is in
//! that one data dir only.

use tokio_util::sync::CancellationToken;

use super::batch::Source;
use super::ShardWorker;
use crate::bus::ownership::ShardLease;
use crate::bus::{self, BusError, Member};
use crate::metrics::Phase;
use crate::retry::{until_ok, Backoff};

impl ShardWorker {
    /// The previous release's home of this shard while the shard is mid-upgrade and that home
    /// is another instance; `None` when this instance may take it.
    pub(super) async fn previous_release_home(&self) -> Result<Option<Member>, BusError> {
        let shard = self.store.shard();
        let topology = &self.shared.topology;
        if !topology
            .legacy_shard_stream_exists(&self.shared.js, shard)
            .await?
        {
            return Ok(None);
        }
        match self.cluster.read_home(shard).await? {
            Some(home) if home.instance != self.cluster.member().instance => Ok(Some(home)),
            _ => Ok(None),
        }
    }

    /// Drains the previous release's shard stream, if there is one, and stores the shard's
    /// first snapshot. `Ok(false)` if cancelled meanwhile.
    pub(super) async fn drain_previous_release(
        &mut self,
        lease: &ShardLease,
        cancel: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let shard = self.store.shard();
        let shared = self.shared.clone();
        let (js, topology) = (&shared.js, &shared.topology);
        let Some(exists) = until_ok(
            "looking for the previous release's shard stream",
            cancel,
            || topology.retire_legacy_shard_stream(js, shard),
        )
        .await?
        else {
            return Ok(false);
        };
        if !exists {
            return Ok(true);
        }
        self.report(
            Phase::Upgrading,
            "upgrading: draining the previous release's shard stream",
        );
        tracing::warn!(
            shard,
            "draining the previous release's shard stream into this data dir"
        );
        if !self.drain_legacy_stream(lease, cancel).await? {
            return Ok(false);
        }
        // Answered-request markers named the old stream's sequences; the new stream's start
        // at 1 again, and its requests are recognised by the sequence the state reflects.
        self.store.prune_answered(u64::MAX)?;
        self.flusher.flush().await?;
        let mut backoff = Backoff::default();
        loop {
            let instance = &self.cluster.member().instance;
            match self
                .snapshots
                .store(&self.store, &self.shared, instance)
                .await
            {
                Ok(stored) => {
                    self.shared.metrics.snapshots_taken.inc();
                    self.snapshots.note_newest(stored, &self.shared);
                    break;
                }
                Err(error) if error.is_fenced() => {
                    self.snapshots.note_fenced(&error, &self.shared);
                    return Ok(false);
                }
                Err(error) => {
                    tracing::warn!(shard, %error, "the upgrade's first snapshot is not stored yet; retrying");
                    if !backoff.wait(cancel).await {
                        return Ok(false);
                    }
                }
            }
        }
        let legacy = topology.legacy_shard_stream(shard);
        if let Err(error) = js.delete_stream(&legacy).await {
            tracing::warn!(stream = %legacy, %error, "could not delete the drained stream; deleted on the next start");
        }
        if let Err(error) = self.cluster.forget_home(shard).await {
            tracing::warn!(shard, %error, "could not forget the previous release's home record");
        }
        tracing::warn!(shard, "upgraded: the previous release's shard stream is drained, the shard's first snapshot stored");
        Ok(true)
    }

    async fn drain_legacy_stream(
        &mut self,
        lease: &ShardLease,
        cancel: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let shard = self.store.shard();
        let shared = self.shared.clone();
        let (js, topology, tuning) = (&shared.js, &shared.topology, &shared.config.tuning);
        let bind = || topology.legacy_worker_consumer(js, shard, tuning);
        let Some(mut consumer) =
            until_ok("binding the previous release's consumer", cancel, bind).await?
        else {
            return Ok(false);
        };
        let mut backoff = Backoff::default();
        loop {
            if !self.outbox.is_empty() {
                if let Err(error) = self.outbox.publish(&self.shared, &self.store).await {
                    tracing::warn!(shard, %error, "digests not published yet; retrying");
                    if !backoff.wait(cancel).await {
                        return Ok(false);
                    }
                    continue;
                }
            }
            if !lease.is_fresh() {
                if !backoff.wait(cancel).await {
                    return Ok(false);
                }
                continue;
            }
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                fetched = bus::fetch_limited(&consumer, self.fetch_limit(), tuning.fetch_expires()) => fetched,
            };
            match fetched {
                Ok(messages) if messages.is_empty() => {
                    if !self.outbox.holds_requests() && self.legacy_stream_is_empty().await? {
                        return Ok(true);
                    }
                }
                Ok(messages) => {
                    if let Err(error) = self.process(messages, Source::PreviousRelease).await {
                        tracing::error!(shard, %error, "batch not applied; it will be redelivered");
                        if !backoff.wait(cancel).await {
                            return Ok(false);
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(shard, %error, "fetch from the previous release's stream failed");
                    if !backoff.wait(cancel).await {
                        return Ok(false);
                    }
                    if let Some(rebound) =
                        until_ok("binding the previous release's consumer", cancel, bind).await?
                    {
                        consumer = rebound;
                    }
                }
            }
        }
    }

    async fn legacy_stream_is_empty(&self) -> Result<bool, BusError> {
        let name = self.shared.topology.legacy_shard_stream(self.store.shard());
        let info = bus::stream_info(&self.shared.js, &name).await?;
        Ok(info.state.messages == 0)
    }
}
