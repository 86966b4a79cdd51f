//! Versioned value encoding. Every value starts with a format version byte so a later release
//! can read old data (or refuse it clearly) instead of misreading it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{AlarmRecord, Observation, Status};

const RECORD_V1: u8 = 1;
/// One digest a record (the release before digest parts).
const OUTBOX_V1: u8 = 1;
/// One digest part a record, with its place in the digest and when it was written.
const OUTBOX_V2: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("value has format version {0}, which this build does not read; upgrade the binary")]
    UnknownVersion(u8),
    #[error("value is empty")]
    Empty,
    #[error("value is corrupt: {0}")]
    Corrupt(#[from] bincode::Error),
    #[error("stored instant is out of range")]
    BadInstant,
}

#[derive(Serialize, Deserialize)]
struct ObservationV1 {
    status: u8,
    secs: i64,
    nanos: u32,
}

#[derive(Serialize, Deserialize)]
struct RecordV1 {
    current: ObservationV1,
    sent: Option<ObservationV1>,
    changed_since_sent: bool,
}

fn status_byte(status: Status) -> u8 {
    match status {
        Status::Cleared => 0,
        Status::Warning => 1,
        Status::Critical => 2,
    }
}

fn observation_to_v1(observation: &Observation) -> ObservationV1 {
    ObservationV1 {
        status: status_byte(observation.status),
        secs: observation.changed_at.timestamp(),
        nanos: observation.changed_at.timestamp_subsec_nanos(),
    }
}

fn observation_from_v1(stored: &ObservationV1) -> Result<Observation, CodecError> {
    let status = match stored.status {
        0 => Status::Cleared,
        1 => Status::Warning,
        2 => Status::Critical,
        _ => return Err(CodecError::BadInstant),
    };
    let changed_at =
        DateTime::<Utc>::from_timestamp(stored.secs, stored.nanos).ok_or(CodecError::BadInstant)?;
    Ok(Observation { status, changed_at })
}

fn versioned<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut bytes = vec![version];
    // bincode into a Vec only fails for types it cannot represent; ours are plain structs.
    if let Err(error) = bincode::serialize_into(&mut bytes, value) {
        tracing::error!(%error, "encoding a value failed");
    }
    bytes
}

fn unversioned(expected: u8, bytes: &[u8]) -> Result<&[u8], CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != expected {
        return Err(CodecError::UnknownVersion(version));
    }
    Ok(body)
}

pub fn encode_record(record: &AlarmRecord) -> Vec<u8> {
    versioned(
        RECORD_V1,
        &RecordV1 {
            current: observation_to_v1(&record.current),
            sent: record.sent.as_ref().map(observation_to_v1),
            changed_since_sent: record.changed_since_sent,
        },
    )
}

pub fn decode_record(bytes: &[u8]) -> Result<AlarmRecord, CodecError> {
    let stored: RecordV1 = bincode::deserialize(unversioned(RECORD_V1, bytes)?)?;
    Ok(AlarmRecord {
        current: observation_from_v1(&stored.current)?,
        sent: stored.sent.as_ref().map(observation_from_v1).transpose()?,
        changed_since_sent: stored.changed_since_sent,
    })
}

/// One part of a digest, written in the same atomic batch that marked its alarms sent,
/// waiting for its PubAck.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Stable across republishing, so JetStream drops a copy published twice across a crash.
    /// Each part has its own.
    pub msg_id: String,
    pub user_id: String,
    /// The rendered `AlarmDigest` JSON of this part: a complete digest on its own.
    pub payload: Vec<u8>,
    pub alarm_count: u32,
    /// Shared by every part of one digest (the `Alarm-Digest-Id` header).
    pub digest_id: String,
    /// This part's place, from 1, and how many parts the digest has (`Alarm-Digest-Part`).
    pub part: u32,
    pub parts: u32,
    /// When the digest was written (Unix milliseconds); unknown for records of the release
    /// before parts, whose reader then counts from when it loaded them.
    pub written_at_ms: Option<i64>,
}

/// The outbox record as the release before digest parts wrote it.
#[derive(Deserialize)]
struct OutboxEntryV1 {
    msg_id: String,
    user_id: String,
    payload: Vec<u8>,
    alarm_count: u32,
}

pub fn encode_outbox(entry: &OutboxEntry) -> Vec<u8> {
    versioned(OUTBOX_V2, entry)
}

/// Reads both formats: a version-1 record is a whole digest, so it becomes its own part 1 of 1
/// with its message id as the digest id (an upgrade in place needs no migration step).
pub fn decode_outbox(bytes: &[u8]) -> Result<OutboxEntry, CodecError> {
    match bytes.first() {
        Some(&OUTBOX_V1) => {
            let old: OutboxEntryV1 = bincode::deserialize(unversioned(OUTBOX_V1, bytes)?)?;
            Ok(OutboxEntry {
                digest_id: old.msg_id.clone(),
                msg_id: old.msg_id,
                user_id: old.user_id,
                payload: old.payload,
                alarm_count: old.alarm_count,
                part: 1,
                parts: 1,
                written_at_ms: None,
            })
        }
        _ => Ok(bincode::deserialize(unversioned(OUTBOX_V2, bytes)?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_with_nanoseconds() {
        let at = |nanos| DateTime::<Utc>::from_timestamp(1_623_098_415, nanos).unwrap_or_default();
        let record = AlarmRecord {
            current: Observation {
                status: Status::Critical,
                changed_at: at(598_765_212),
            },
            sent: Some(Observation {
                status: Status::Warning,
                changed_at: at(1),
            }),
            changed_since_sent: true,
        };
        let decoded = decode_record(&encode_record(&record)).expect("round trip");
        assert_eq!(decoded, record);
    }

    /// What the release before digest parts stored, byte for byte: version 1, then bincode of
    /// (msg_id, user_id, payload, alarm_count).
    #[test]
    fn an_outbox_record_of_the_previous_release_reads_as_a_one_part_digest() {
        #[derive(Serialize)]
        struct Previous<'a> {
            msg_id: &'a str,
            user_id: &'a str,
            payload: Vec<u8>,
            alarm_count: u32,
        }
        let mut bytes = vec![1u8];
        let previous = Previous {
            msg_id: "alarm-digest:3:00000000000000aa:7",
            user_id: "u",
            payload: br#"{"UserID":"u","ActiveAlarms":[]}"#.to_vec(),
            alarm_count: 0,
        };
        bincode::serialize_into(&mut bytes, &previous).expect("encode");
        let entry = decode_outbox(&bytes).expect("the old format still reads");
        assert_eq!(entry.msg_id, previous.msg_id);
        assert_eq!(entry.digest_id, previous.msg_id);
        assert_eq!((entry.part, entry.parts), (1, 1));
        assert_eq!(entry.payload, previous.payload);
        assert_eq!(entry.written_at_ms, None);
        let again = decode_outbox(&encode_outbox(&entry)).expect("round trip");
        assert_eq!(again, entry);
        assert_eq!(encode_outbox(&entry)[0], 2);
    }

    #[test]
    fn unknown_version_is_refused_not_misread() {
        let mut bytes = encode_record(&AlarmRecord::new(Observation {
            status: Status::Warning,
            changed_at: DateTime::<Utc>::UNIX_EPOCH,
        }));
        bytes[0] = 9;
        assert!(matches!(
            decode_record(&bytes),
            Err(CodecError::UnknownVersion(9))
        ));
        assert!(matches!(decode_record(&[]), Err(CodecError::Empty)));
        assert!(decode_record(&[1, 2]).is_err());
    }
}
