//! The outbox: digest parts written to the store but not yet acknowledged by JetStream, and
//! the digest requests they answer.
//!
//! Invariants, kept by [`Outbox`] alone:
//! - `parts` mirrors the store's outbox entries of this tenure, in outbox sequence order: a
//!   part leaves it only once JetStream acknowledged it (and it was dropped from the store) or
//!   refused it for good (and its alarms went back to unsent in the same store write).
//! - A held request is acked only once `parts` is empty: its digest is then acknowledged.
//! - Every part is published with its Msg-Id (`alarm-digest:<shard>:<epoch>:<sequence>`), so
//!   publishing again after a crash or a lost PubAck stores nothing twice.

use async_nats::jetstream::Message;
use bytes::Bytes;

use super::ack;
use super::answer::refused_part;
use crate::bus::{self, BusError, Outgoing, PartHeaders};
use crate::shared::Shared;
use crate::store::{OutboxEntry, ShardStore};

/// Digest parts on their way out, and the requests waiting for them.
pub(super) struct Outbox {
    shard: u16,
    /// Digests written but not yet acknowledged by JetStream (mirrors the stored outbox).
    parts: Vec<(u64, OutboxEntry)>,
    /// Digest requests whose digests are in `parts`; acked once it is empty.
    held: Vec<Message>,
    /// The output stream's `max_msg_size`, if it has one: read when consuming starts and again
    /// after a refusal, so the next digest is split to fit it.
    stream_limit: Option<usize>,
}

impl Outbox {
    pub(super) fn new(shard: u16) -> Outbox {
        Outbox {
            shard,
            parts: Vec::new(),
            held: Vec::new(),
            stream_limit: None,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Whether requests still wait for their digests' PubAcks.
    pub(super) fn holds_requests(&self) -> bool {
        !self.held.is_empty()
    }

    /// The oldest part not yet acknowledged.
    pub(super) fn first_sequence(&self) -> Option<u64> {
        self.parts.first().map(|(sequence, _)| *sequence)
    }

    /// Digests stored before a crash go out before anything new is taken.
    pub(super) fn load(&mut self, store: &ShardStore, shared: &Shared) {
        match store.pending_outbox() {
            Ok(mut pending) => {
                // Records of the release before parts carry no time: count from now.
                let now = chrono::Utc::now().timestamp_millis();
                for (_, entry) in &mut pending {
                    entry.written_at_ms.get_or_insert(now);
                }
                self.parts = pending;
                self.note(shared);
            }
            Err(error) => tracing::error!(shard = self.shard, %error, "cannot read the outbox"),
        }
    }

    /// Parts a durable batch queued, and the requests they answer.
    pub(super) fn add(
        &mut self,
        queued: Vec<(u64, OutboxEntry)>,
        requests: Vec<Message>,
        shared: &Shared,
    ) {
        self.parts.extend(queued);
        self.held.extend(requests);
        self.note(shared);
    }

    /// Forgets everything in memory: a tenure ended, or a standby's copy queued parts that are
    /// its holder's to publish. Unacked requests come back from JetStream.
    pub(super) fn forget(&mut self) {
        self.parts.clear();
        self.held.clear();
    }

    /// Publishes every part (pipelined) to the output subject, drops the acknowledged ones,
    /// returns the ones the broker refuses for good (their alarms become unsent again), and
    /// acks the held requests once nothing is left.
    pub(super) async fn publish(
        &mut self,
        shared: &Shared,
        store: &ShardStore,
    ) -> Result<(), BusError> {
        let subject = shared.config.streams.output_subject.as_str();
        let outgoing = self
            .parts
            .iter()
            .map(|(_, entry)| {
                let headers = PartHeaders {
                    msg_id: &entry.msg_id,
                    digest_id: &entry.digest_id,
                    part: entry.part,
                    parts: entry.parts,
                };
                Outgoing::digest_part(subject, headers, Bytes::from(entry.payload.clone()))
            })
            .collect();
        let outcomes = bus::publish_windowed(&shared.js, outgoing).await;
        let mut delivered = Vec::with_capacity(outcomes.len());
        let mut refused = Vec::new();
        let mut first_error = None;
        for ((sequence, entry), outcome) in self.parts.iter().zip(outcomes) {
            match outcome {
                Ok(_) => delivered.push(*sequence),
                Err(error) if error.is_refused() => {
                    tracing::error!(
                        shard = self.shard,
                        digest = %entry.digest_id,
                        part = entry.part,
                        parts = entry.parts,
                        bytes = entry.payload.len(),
                        %error,
                        "digest part refused by the broker for good; its alarms go back to \
                         unsent and the user's next digest carries them"
                    );
                    refused.push((*sequence, entry.clone()));
                }
                Err(error) => {
                    shared.metrics.publish_failures.inc();
                    first_error.get_or_insert(error);
                }
            }
        }
        shared
            .metrics
            .digests_published
            .inc_by(delivered.len() as u64);
        if let Err(error) = store.remove_outbox(&delivered) {
            // They would be published again with the same Msg-Id; JetStream drops copies.
            tracing::warn!(shard = self.shard, %error, "cannot drop published digests");
        }
        let mut done = delivered;
        if !refused.is_empty() {
            match return_to_unsent(store, &refused) {
                Ok(()) => {
                    shared
                        .metrics
                        .digest_parts_refused
                        .inc_by(refused.len() as u64);
                    done.extend(refused.iter().map(|(sequence, _)| *sequence));
                }
                Err(error) => {
                    first_error.get_or_insert(BusError::transient(
                        "returning refused digest parts to unsent",
                        error,
                    ));
                }
            }
        }
        self.parts.retain(|(sequence, _)| !done.contains(sequence));
        self.note(shared);
        if !refused.is_empty() {
            // The stream's limit may have changed under us: fit the next digest to it.
            self.read_stream_limit(shared).await;
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        self.ack_held(shared).await;
        Ok(())
    }

    /// Acks the requests whose digests are all acknowledged, timing each from its request
    /// stored in the shard stream (the broker's clock) to now.
    async fn ack_held(&mut self, shared: &Shared) {
        let now_nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        for message in self.held.drain(..) {
            if let Ok(info) = message.info() {
                let stored = i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0);
                let seconds = (now_nanos.saturating_sub(stored)).max(0) as f64 / 1e9;
                shared.metrics.digest_latency.observe(seconds);
            }
            ack(&message).await;
        }
    }

    /// The most a digest part's payload may weigh: the connected server's `max_payload` (read
    /// per batch: it can differ per server of a cluster) or the output stream's
    /// `max_msg_size`, whichever is smaller, less room for the headers.
    pub(super) fn part_limit(&self, shared: &Shared) -> usize {
        let server = shared.js.client().max_payload();
        self.stream_limit
            .map_or(server, |stream| stream.min(server))
            .saturating_sub(bus::HEADER_ROOM)
    }

    pub(super) async fn read_stream_limit(&mut self, shared: &Shared) {
        let output = &shared.config.streams.output_stream;
        match shared.js.get_stream(output).await {
            Ok(stream) => {
                let limit = stream.cached_info().config.max_message_size;
                self.stream_limit = usize::try_from(limit).ok().filter(|limit| *limit > 0);
            }
            // The stream may be away (it is then recreated); the server's limit still holds.
            Err(error) => tracing::debug!(%error, "cannot read the output stream's limits"),
        }
    }

    /// Publishes the outbox's depth and its oldest entry's age (gauges, per shard).
    fn note(&self, shared: &Shared) {
        shared
            .metrics
            .set_outbox(self.shard, self.parts.len(), self.oldest_written_ms());
    }

    fn oldest_written_ms(&self) -> Option<i64> {
        self.parts
            .iter()
            .filter_map(|(_, entry)| entry.written_at_ms)
            .min()
    }

    /// Why this shard takes no new work, for `/readyz`.
    pub(super) fn wait_reason(&self, error: &BusError) -> String {
        let now = chrono::Utc::now().timestamp_millis();
        let oldest = self.oldest_written_ms().unwrap_or(now);
        format!(
            "{} digest part(s) unpublished, oldest for {}s: {error}",
            self.parts.len(),
            (now - oldest).max(0) / 1000
        )
    }
}

/// Takes refused parts out of the store's outbox and their alarms back to unsent. The error
/// is the cause itself: a part's payload that does not parse, or the store's.
fn return_to_unsent(
    store: &ShardStore,
    refused: &[(u64, OutboxEntry)],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let parts = refused
        .iter()
        .map(|(sequence, entry)| refused_part(*sequence, entry))
        .collect::<Result<Vec<_>, _>>()?;
    store.return_to_unsent(&parts)?;
    Ok(())
}
