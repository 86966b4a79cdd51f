use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::Context;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt;

use super::BusError;

/// Un-awaited PubAcks one burst may hold. Every holder of PubAck futures is bounded like
/// this so the context's in-flight limit (sized in `service.rs` from these bounds) can
/// never be exhausted by holders that each wait for one more permit.
pub const PUBLISH_WINDOW: usize = 256;

/// Which digest a published part belongs to: the same value on every part of one digest.
pub const DIGEST_ID_HEADER: &str = "Alarm-Digest-Id";
/// A part's place in its digest, `i/n` from 1: part 1 holds the oldest alarms.
pub const DIGEST_PART_HEADER: &str = "Alarm-Digest-Part";

/// Room left in every message this service publishes for its headers, so payload plus
/// headers stay within the server's `max_payload`: an envelope's frame header, a digest
/// part's Msg-Id, digest id and part (about 150 bytes).
pub const HEADER_ROOM: usize = 512;

/// One JetStream publish.
pub struct Outgoing {
    pub subject: Subject,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// What tells a digest part apart on the output stream.
pub struct PartHeaders<'a> {
    /// The part's own Msg-Id: a second publish of it is dropped by the stream.
    pub msg_id: &'a str,
    /// The same on every part of one digest.
    pub digest_id: &'a str,
    /// The part's place, from 1, and how many the digest has.
    pub part: u32,
    pub parts: u32,
}

impl Outgoing {
    /// An envelope of status changes for a shard log. Applying a status change twice is
    /// harmless: envelopes carry no Msg-Id, which would cost the shard stream memory for
    /// nothing.
    pub fn envelope(
        subject: impl Into<Subject>,
        format: super::envelope::Format,
        payload: Bytes,
    ) -> Outgoing {
        let mut headers = HeaderMap::new();
        headers.insert(super::envelope::FRAME_HEADER, format.header());
        Outgoing {
            subject: subject.into(),
            headers,
            payload,
        }
    }

    /// A digest request for a shard log, under a Msg-Id stable across republishing (a
    /// request republished twice would be answered twice).
    pub fn digest_request(subject: impl Into<Subject>, msg_id: &str, payload: Bytes) -> Outgoing {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        Outgoing {
            subject: subject.into(),
            headers,
            payload,
        }
    }

    /// One part of a digest for the output stream.
    pub fn digest_part(subject: &str, part: PartHeaders<'_>, payload: Bytes) -> Outgoing {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, part.msg_id);
        headers.insert(DIGEST_ID_HEADER, part.digest_id);
        headers.insert(
            DIGEST_PART_HEADER,
            format!("{}/{}", part.part, part.parts).as_str(),
        );
        Outgoing {
            subject: Subject::from(subject),
            headers,
            payload,
        }
    }
}

/// Publishes in order with at most [`PUBLISH_WINDOW`] PubAcks outstanding, and returns each
/// publish's outcome (the stream sequence it was stored under) in the same order.
pub async fn publish_windowed(js: &Context, outgoing: Vec<Outgoing>) -> Vec<Result<u64, BusError>> {
    let mut outcomes = Vec::with_capacity(outgoing.len());
    // Awaited together, in order: each PubAck's timeout runs from when it is first polled,
    // so one after another a silent broker would cost a timeout per publish.
    let mut window = FuturesOrdered::new();
    for message in outgoing {
        if window.len() == PUBLISH_WINDOW {
            if let Some(oldest) = window.next().await {
                outcomes.push(oldest);
            }
        }
        let published = js
            .publish_with_headers(message.subject, message.headers, message.payload)
            .await
            .map_err(|e| {
                if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                    BusError::Refused {
                        context: "publishing".into(),
                        message: e.to_string(),
                    }
                } else {
                    BusError::transient("publishing", e)
                }
            });
        window.push_back(settle(published));
    }
    while let Some(outcome) = window.next().await {
        outcomes.push(outcome);
    }
    outcomes
}

async fn settle(published: Result<PublishAckFuture, BusError>) -> Result<u64, BusError> {
    published?.await.map(|ack| ack.sequence).map_err(|e| {
        let text = e.to_string();
        if refused_by_the_stream(&text) {
            BusError::Refused {
                context: "awaiting a PubAck".into(),
                message: text,
            }
        } else {
            BusError::transient("awaiting a PubAck", text)
        }
    })
}

/// JetStream's answer for a message larger than the stream's `max_msg_size` (error code 10054)
/// or the server's `max_payload`. Everything else a PubAck can say (stream full, no stream,
/// timeouts, a leader election) may pass.
fn refused_by_the_stream(error: &str) -> bool {
    error.contains("10054")
        || error.contains("message size exceeds maximum")
        || error.contains("maximum payload exceeded")
}

#[cfg(test)]
mod tests {
    use super::refused_by_the_stream;

    #[test]
    fn only_size_refusals_are_permanent() {
        assert!(refused_by_the_stream(
            "publish failed: message size exceeds maximum allowed (error code 10054)"
        ));
        assert!(!refused_by_the_stream(
            "publish failed: maximum messages exceeded (error code 10077)"
        ));
        assert!(!refused_by_the_stream(
            "timed out: didn't receive ack in time"
        ));
        assert!(!refused_by_the_stream("no stream found for given subject"));
    }
}
