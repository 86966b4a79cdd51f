//! Publishing the outbox: every digest part with its Msg-Id and part headers, pipelined; the
//! PubAck'd ones dropped, the refused ones returned to unsent, the held requests acked once
//! nothing is left.

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use super::{ack, ShardWorker};
use crate::bus::{self, BusError, Outgoing, DIGEST_ID_HEADER, DIGEST_PART_HEADER};

/// Room left in every digest message for its headers (Msg-Id, digest id and part: about 150
/// bytes), so payload plus headers stay within the server's `max_payload`.
const HEADER_ROOM: usize = 512;

impl ShardWorker {
    /// Publishes every outbox entry (pipelined) to the output subject, drops the acknowledged
    /// ones, returns the ones the broker refuses for good (their alarms become unsent again),
    /// and acks the held requests once the outbox is empty.
    pub(super) async fn publish_outbox(&mut self) -> Result<(), BusError> {
        let shared = &self.shared;
        let subject = Subject::from(shared.config.streams.output_subject.as_str());
        let outgoing = self
            .outbox
            .iter()
            .map(|(_, entry)| {
                let mut headers = HeaderMap::new();
                headers.insert(NATS_MESSAGE_ID, entry.msg_id.as_str());
                headers.insert(DIGEST_ID_HEADER, entry.digest_id.as_str());
                headers.insert(
                    DIGEST_PART_HEADER,
                    format!("{}/{}", entry.part, entry.parts).as_str(),
                );
                Outgoing {
                    subject: subject.clone(),
                    headers,
                    payload: Bytes::from(entry.payload.clone()),
                }
            })
            .collect();
        let outcomes = bus::publish_windowed(&shared.js, outgoing).await;
        let mut delivered = Vec::with_capacity(outcomes.len());
        let mut refused = Vec::new();
        let mut first_error = None;
        for ((sequence, entry), outcome) in self.outbox.iter().zip(outcomes) {
            match outcome {
                Ok(_) => delivered.push(*sequence),
                Err(error) if error.is_refused() => {
                    tracing::error!(
                        shard = self.store.shard(),
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
        if let Err(error) = self.store.remove_outbox(&delivered) {
            // They would be published again with the same Msg-Id; JetStream drops copies.
            tracing::warn!(shard = self.store.shard(), %error, "cannot drop published digests");
        }
        let mut done = delivered;
        if !refused.is_empty() {
            match self.store.return_to_unsent(&refused) {
                Ok(_) => {
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
        self.outbox.retain(|(sequence, _)| !done.contains(sequence));
        self.note_outbox();
        if !refused.is_empty() {
            // The stream's limit may have changed under us: fit the next digest to it.
            self.read_stream_limit().await;
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        let now_nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        for message in self.held.drain(..) {
            // Request stored in the shard stream (the broker's clock) → digest acknowledged.
            if let Ok(info) = message.info() {
                let stored = i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0);
                let seconds = (now_nanos.saturating_sub(stored)).max(0) as f64 / 1e9;
                self.shared.metrics.digest_latency.observe(seconds);
            }
            ack(&message).await;
        }
        Ok(())
    }

    /// The most a digest part's payload may weigh: the connected server's `max_payload` (read
    /// per batch: it can differ per server of a cluster) or the output stream's
    /// `max_msg_size`, whichever is smaller, less room for the headers.
    pub(super) fn part_limit(&self) -> usize {
        let server = self.shared.js.client().max_payload();
        self.stream_limit
            .map_or(server, |stream| stream.min(server))
            .saturating_sub(HEADER_ROOM)
    }

    pub(super) async fn read_stream_limit(&mut self) {
        let output = &self.shared.config.streams.output_stream;
        match self.shared.js.get_stream(output).await {
            Ok(stream) => {
                let limit = stream.cached_info().config.max_message_size;
                self.stream_limit = usize::try_from(limit).ok().filter(|limit| *limit > 0);
            }
            // The stream may be away (it is then recreated); the server's limit still holds.
            Err(error) => tracing::debug!(%error, "cannot read the output stream's limits"),
        }
    }

    /// Publishes the outbox's depth and its oldest entry's age (gauges, per shard).
    pub(super) fn note_outbox(&self) {
        let oldest = self
            .outbox
            .iter()
            .filter_map(|(_, entry)| entry.written_at_ms)
            .min();
        self.shared
            .metrics
            .set_outbox(self.store.shard(), self.outbox.len(), oldest);
    }

    /// Why this shard takes no new work, for `/readyz`.
    pub(super) fn outbox_wait_reason(&self, error: &BusError) -> String {
        let now = chrono::Utc::now().timestamp_millis();
        let oldest = self
            .outbox
            .iter()
            .filter_map(|(_, entry)| entry.written_at_ms)
            .min()
            .unwrap_or(now);
        format!(
            "{} digest part(s) unpublished, oldest for {}s: {error}",
            self.outbox.len(),
            (now - oldest).max(0) / 1000
        )
    }
}
