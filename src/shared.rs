//! What every long-running part of an instance holds.

use std::sync::Arc;

use async_nats::jetstream::{Context, Message};
use bytes::Bytes;

use crate::bus::{DeadLetter, Outgoing, Topology};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub topology: Arc<Topology>,
    pub js: Context,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
}

impl Shared {
    /// The message's stream sequence (0 if its reply subject carries none), counting it as
    /// a redelivery when JetStream delivered it before.
    pub fn note_delivery(&self, message: &Message) -> u64 {
        match message.info() {
            Ok(info) => {
                if info.delivered > 1 {
                    self.metrics.redeliveries.inc();
                }
                info.stream_sequence
            }
            Err(_) => 0,
        }
    }

    /// The dead-letter record of one rejected input, counted under its reason and logged
    /// with where it came from (the router's and the shard worker's rejections alike). The
    /// caller acks the input only after the record's PubAck.
    pub fn dead_letter(&self, record: &DeadLetter<'_>, payload: Bytes) -> Outgoing {
        self.metrics.rejected(record.reason);
        tracing::warn!(
            message = "rejected input; dead-lettering it",
            reason = record.reason,
            error = %record.error,
            subject = %record.original_subject,
            stream = %record.stream,
            stream_sequence = record.stream_sequence,
        );
        record.outgoing(&self.config.streams.dead_letter_subject, payload)
    }
}
