use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use super::Outgoing;

/// Header names on a dead-letter record.
pub struct DeadLetterHeaders;

impl DeadLetterHeaders {
    /// The rejection's stable code, e.g. `bad_time`.
    pub const REASON: &'static str = "Alarm-Digest-Reason";
    /// The human-readable explanation.
    pub const ERROR: &'static str = "Alarm-Digest-Error";
    pub const ORIGINAL_SUBJECT: &'static str = "Alarm-Digest-Original-Subject";
    pub const STREAM: &'static str = "Alarm-Digest-Stream";
    pub const STREAM_SEQUENCE: &'static str = "Alarm-Digest-Stream-Sequence";
}

/// Why and from where a message is dead-lettered.
pub struct DeadLetter<'a> {
    pub reason: &'static str,
    pub error: &'a str,
    pub original_subject: &'a str,
    pub stream: &'a str,
    pub stream_sequence: u64,
}

impl DeadLetter<'_> {
    /// The dead-letter record: the original payload with why and where it came from. The
    /// caller acks the original only after this record's PubAck.
    pub fn outgoing(&self, dead_letter_subject: &str, payload: Bytes) -> Outgoing {
        let mut headers = HeaderMap::new();
        headers.insert(DeadLetterHeaders::REASON, self.reason);
        // Header values cannot hold line breaks.
        let error: String = self
            .error
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(512)
            .collect();
        headers.insert(DeadLetterHeaders::ERROR, error.as_str());
        headers.insert(DeadLetterHeaders::ORIGINAL_SUBJECT, self.original_subject);
        headers.insert(DeadLetterHeaders::STREAM, self.stream);
        headers.insert(
            DeadLetterHeaders::STREAM_SEQUENCE,
            self.stream_sequence.to_string().as_str(),
        );
        // One record per rejected input: an envelope redelivered because another entry's
        // record was not stored publishes this one again, and the stream drops the copy.
        let id = format!("dead-letter:{}:{}", self.stream, self.stream_sequence);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        Outgoing {
            subject: Subject::from(dead_letter_subject),
            headers,
            payload,
        }
    }
}
