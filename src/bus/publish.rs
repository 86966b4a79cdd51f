use std::collections::VecDeque;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::Context;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use super::BusError;

/// Un-awaited PubAcks one burst may hold. Every holder of PubAck futures is bounded like
/// this so the context's in-flight limit (sized in `service.rs` from these bounds) can
/// never be exhausted by holders that each wait for one more permit.
pub const PUBLISH_WINDOW: usize = 256;

/// One JetStream publish.
pub struct Outgoing {
    pub subject: Subject,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Publishes in order with at most [`PUBLISH_WINDOW`] PubAcks outstanding, and returns each
/// publish's outcome in the same order.
pub async fn publish_windowed(js: &Context, outgoing: Vec<Outgoing>) -> Vec<Result<(), BusError>> {
    let mut outcomes = Vec::with_capacity(outgoing.len());
    let mut window: VecDeque<Result<PublishAckFuture, BusError>> = VecDeque::new();
    for message in outgoing {
        if window.len() == PUBLISH_WINDOW {
            if let Some(oldest) = window.pop_front() {
                outcomes.push(settle(oldest).await);
            }
        }
        let published = js
            .publish_with_headers(message.subject, message.headers, message.payload)
            .await
            .map_err(|e| BusError::transient("publishing", e));
        window.push_back(published);
    }
    for pending in window {
        outcomes.push(settle(pending).await);
    }
    outcomes
}

async fn settle(published: Result<PublishAckFuture, BusError>) -> Result<(), BusError> {
    published?
        .await
        .map(|_| ())
        .map_err(|e| BusError::transient("awaiting a PubAck", e))
}
