//! The router → shard frame: many input messages in one shard-stream message, so the second
//! hop costs one stream write, one delivery and one ack per envelope instead of per event.
//!
//! Two formats, named by the `Alarm-Digest-Frame` header and by the first byte. Integers are
//! big-endian.
//!
//! ```text
//! envelope-1 (the release before: the router's input, unchanged)
//!   u8   format version (1)
//!   u32  entry count
//!   per entry:
//!     u64  input stream sequence
//!     u16  subject length, then the input subject
//!     u32  payload length, then the input's JSON payload, unchanged
//!
//! envelope-2 (the change the router validated: the worker parses no JSON)
//!   u8   format version (2)
//!   u32  entry count
//!   per entry:
//!     u64  input stream sequence
//!     u16  subject length, then the input subject
//!     u8   Status: 0 CLEARED, 1 WARNING, 2 CRITICAL
//!     i64  ChangedAt: seconds since the Unix epoch
//!     u32  ChangedAt: nanoseconds within that second (below 10^9)
//!     u16  UserID length, then UserID (UTF-8, 1 to wire::MAX_ID_BYTES bytes)
//!     u16  AlarmID length, then AlarmID (likewise)
//! ```
//!
//! A reader of this build reads both; which one routers write is the cluster's choice
//! (`bus/envelope_format.rs`), so instances of the release before never meet a format they
//! cannot read.
//!
//! Pure: no I/O, tested with byte literals and properties. [`Packer`] holds the open envelopes
//! of every shard and says when one must be flushed; the router and the broker-ceiling bench
//! share it, so both flush by the same rules.

use std::borrow::Cow;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::domain::{Observation, Status, StatusChange};
use crate::wire::{self, MAX_ID_BYTES};

/// Header naming a shard-stream message's frame. A message without it is a single input
/// message: a digest request, or a status change in the previous release's format.
pub const FRAME_HEADER: &str = "Alarm-Digest-Frame";
/// The header's value for [`Format::V1`].
pub const ENVELOPE_V1: &str = "envelope-1";
/// The header's value for [`Format::V2`].
pub const ENVELOPE_V2: &str = "envelope-2";

/// Version byte and entry count.
const PREAMBLE: usize = 1 + 4;
/// v1: sequence, subject length, payload length.
const V1_OVERHEAD: usize = 8 + 2 + 4;
/// v2: sequence, subject length, status, seconds, nanoseconds, two ID lengths.
const V2_OVERHEAD: usize = 8 + 2 + 1 + 8 + 4 + 2 + 2;

/// Which envelope format a router writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    /// Each entry is the input's subject and JSON payload, unchanged.
    V1,
    /// Each entry is the input's subject and the change the router validated.
    V2,
}

impl Format {
    /// The newest format; a cluster this build creates records it.
    pub const NEWEST: Format = Format::V2;

    pub fn number(self) -> u8 {
        match self {
            Format::V1 => 1,
            Format::V2 => 2,
        }
    }

    pub fn from_number(number: u8) -> Option<Format> {
        match number {
            1 => Some(Format::V1),
            2 => Some(Format::V2),
            _ => None,
        }
    }

    /// The `Alarm-Digest-Frame` header's value.
    pub fn header(self) -> &'static str {
        match self {
            Format::V1 => ENVELOPE_V1,
            Format::V2 => ENVELOPE_V2,
        }
    }

    pub fn from_header(value: &str) -> Option<Format> {
        [Format::V1, Format::V2]
            .into_iter()
            .find(|format| format.header() == value)
    }
}

/// What an entry carries: the input's JSON (v1), or the change validated from it (v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<'a> {
    Json(&'a [u8]),
    Change(Cow<'a, StatusChange>),
}

impl Content<'_> {
    /// The JSON input the entry stands for, for a dead letter or a requeue: the input's own
    /// payload (v1), or the validated change rendered again (v2: same fields and instant,
    /// `ChangedAt` in UTC).
    pub fn to_json(&self) -> Bytes {
        match self {
            Content::Json(payload) => Bytes::copy_from_slice(payload),
            Content::Change(change) => wire::encode_status_change(change).into(),
        }
    }

    fn format(&self) -> Format {
        match self {
            Content::Json(_) => Format::V1,
            Content::Change(_) => Format::V2,
        }
    }
}

/// One input message inside an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub input_sequence: u64,
    pub subject: &'a str,
    pub content: Content<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is empty")]
    Empty,
    #[error("envelope has format version {0}, which this build does not read; upgrade the binary")]
    UnknownVersion(u8),
    #[error("envelope is cut short at byte {0}")]
    Truncated(usize),
    #[error("envelope entry {0} has a subject that is not UTF-8")]
    BadSubject(usize),
    #[error("envelope entry {0} has a Status byte that names no status")]
    BadStatus(usize),
    #[error("envelope entry {0} has a ChangedAt that names no instant")]
    BadTime(usize),
    #[error("envelope entry {0} has a UserID or AlarmID that is empty, too long or not UTF-8")]
    BadId(usize),
    #[error("envelope has {0} bytes after its last entry")]
    Trailing(usize),
}

/// Encodes entries of one format, one at a time.
#[derive(Debug, Clone)]
pub struct Builder {
    format: Format,
    bytes: Vec<u8>,
    count: u32,
}

impl Builder {
    pub fn new(format: Format) -> Builder {
        let mut bytes = Vec::with_capacity(4096);
        bytes.push(format.number());
        bytes.extend_from_slice(&0u32.to_be_bytes());
        Builder {
            format,
            bytes,
            count: 0,
        }
    }

    /// What an entry adds to the envelope's size.
    pub fn entry_size(subject: &str, content: &Content<'_>) -> usize {
        subject.len()
            + match content {
                Content::Json(payload) => V1_OVERHEAD + payload.len(),
                Content::Change(change) => {
                    V2_OVERHEAD + change.user_id.len() + change.alarm_id.len()
                }
            }
    }

    /// Appends an entry. An entry this format cannot hold is refused with `false`: content of
    /// the other format, a subject longer than 65,535 bytes (NATS subjects are far shorter),
    /// IDs that are empty or longer than `wire::MAX_ID_BYTES` (the router refuses those).
    pub fn push(&mut self, input_sequence: u64, subject: &str, content: &Content<'_>) -> bool {
        if !Builder::holds(self.format, subject, content) {
            return false;
        }
        // `holds` checked every length against its field's width.
        let subject_len = subject.len() as u16;
        let mut entry = Vec::with_capacity(Builder::entry_size(subject, content));
        entry.extend_from_slice(&input_sequence.to_be_bytes());
        entry.extend_from_slice(&subject_len.to_be_bytes());
        entry.extend_from_slice(subject.as_bytes());
        match content {
            Content::Json(payload) => {
                entry.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                entry.extend_from_slice(payload);
            }
            Content::Change(change) => {
                let at = change.observation.changed_at;
                entry.push(status_byte(change.observation.status));
                entry.extend_from_slice(&at.timestamp().to_be_bytes());
                entry.extend_from_slice(&at.timestamp_subsec_nanos().to_be_bytes());
                for id in [&change.user_id, &change.alarm_id] {
                    entry.extend_from_slice(&(id.len() as u16).to_be_bytes());
                    entry.extend_from_slice(id.as_bytes());
                }
            }
        }
        self.bytes.extend_from_slice(&entry);
        self.count += 1;
        true
    }

    /// Whether an entry fits `format`: content of that format, each length within its
    /// field's width, IDs of 1 to `wire::MAX_ID_BYTES` bytes (the router refuses others).
    pub fn holds(format: Format, subject: &str, content: &Content<'_>) -> bool {
        content.format() == format
            && u16::try_from(subject.len()).is_ok()
            && match content {
                Content::Json(payload) => u32::try_from(payload.len()).is_ok(),
                Content::Change(change) => valid_id(&change.user_id) && valid_id(&change.alarm_id),
            }
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    pub fn finish(mut self) -> Bytes {
        self.bytes[1..PREAMBLE].copy_from_slice(&self.count.to_be_bytes());
        Bytes::from(self.bytes)
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES
}

fn status_byte(status: Status) -> u8 {
    match status {
        Status::Cleared => 0,
        Status::Warning => 1,
        Status::Critical => 2,
    }
}

fn status_of(byte: u8) -> Option<Status> {
    match byte {
        0 => Some(Status::Cleared),
        1 => Some(Status::Warning),
        2 => Some(Status::Critical),
        _ => None,
    }
}

/// Decodes a whole envelope of either format, refusing anything malformed rather than
/// guessing.
pub fn decode(bytes: &[u8]) -> Result<Vec<Entry<'_>>, EnvelopeError> {
    let (&version, _) = bytes.split_first().ok_or(EnvelopeError::Empty)?;
    let format = Format::from_number(version).ok_or(EnvelopeError::UnknownVersion(version))?;
    let mut at = 1;
    let count = read_u32(bytes, &mut at)? as usize;
    let overhead = match format {
        Format::V1 => V1_OVERHEAD,
        Format::V2 => V2_OVERHEAD,
    };
    // Every entry takes at least its overhead: a count beyond that is a lie, and must not
    // make us allocate for it.
    let mut entries = Vec::with_capacity(count.min(bytes.len() / overhead));
    for index in 0..count {
        let input_sequence = read_u64(bytes, &mut at)?;
        let subject = read_text(bytes, &mut at).ok_or(EnvelopeError::BadSubject(index))??;
        let content = match format {
            Format::V1 => {
                let payload_len = read_u32(bytes, &mut at)? as usize;
                Content::Json(take(bytes, &mut at, payload_len)?)
            }
            Format::V2 => Content::Change(Cow::Owned(read_change(bytes, &mut at, index)?)),
        };
        entries.push(Entry {
            input_sequence,
            subject,
            content,
        });
    }
    if at != bytes.len() {
        return Err(EnvelopeError::Trailing(bytes.len() - at));
    }
    Ok(entries)
}

fn read_change(bytes: &[u8], at: &mut usize, index: usize) -> Result<StatusChange, EnvelopeError> {
    let status = status_of(take(bytes, at, 1)?[0]).ok_or(EnvelopeError::BadStatus(index))?;
    let seconds = i64::from_be_bytes(read_array(bytes, at)?);
    let nanos = read_u32(bytes, at)?;
    let changed_at: DateTime<Utc> = (nanos < 1_000_000_000)
        .then(|| DateTime::from_timestamp(seconds, nanos))
        .flatten()
        .ok_or(EnvelopeError::BadTime(index))?;
    let mut id = || match read_text(bytes, at) {
        Some(Ok(text)) if valid_id(text) => Ok(text.to_string()),
        Some(Err(error)) => Err(error),
        _ => Err(EnvelopeError::BadId(index)),
    };
    let user_id = id()?;
    let alarm_id = id()?;
    Ok(StatusChange {
        user_id,
        alarm_id,
        observation: Observation { status, changed_at },
    })
}

/// A u16-length-prefixed string: `None` when its bytes are not UTF-8, `Some(Err)` when cut
/// short.
fn read_text<'a>(bytes: &'a [u8], at: &mut usize) -> Option<Result<&'a str, EnvelopeError>> {
    let text = read_u16(bytes, at).and_then(|len| take(bytes, at, usize::from(len)));
    match text {
        Ok(text) => std::str::from_utf8(text).ok().map(Ok),
        Err(error) => Some(Err(error)),
    }
}

fn take<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8], EnvelopeError> {
    let end = at.checked_add(len).ok_or(EnvelopeError::Truncated(*at))?;
    let slice = bytes.get(*at..end).ok_or(EnvelopeError::Truncated(*at))?;
    *at = end;
    Ok(slice)
}

fn read_array<const N: usize>(bytes: &[u8], at: &mut usize) -> Result<[u8; N], EnvelopeError> {
    let mut array = [0u8; N];
    array.copy_from_slice(take(bytes, at, N)?);
    Ok(array)
}

fn read_u16(bytes: &[u8], at: &mut usize) -> Result<u16, EnvelopeError> {
    read_array(bytes, at).map(u16::from_be_bytes)
}

fn read_u32(bytes: &[u8], at: &mut usize) -> Result<u32, EnvelopeError> {
    read_array(bytes, at).map(u32::from_be_bytes)
}

fn read_u64(bytes: &[u8], at: &mut usize) -> Result<u64, EnvelopeError> {
    read_array(bytes, at).map(u64::from_be_bytes)
}

/// When an envelope is flushed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// At most this many entries.
    pub max_entries: usize,
    /// At most this many bytes (the caller keeps it under the server's `max_payload`, less
    /// room for headers). One entry larger than this still travels, alone.
    pub max_bytes: usize,
}

/// A flushed envelope: its shard, its format and bytes, and what the caller tagged its
/// entries with (the router: the input messages to ack once the envelope's PubAck arrives).
pub struct Sealed<T> {
    pub shard: u16,
    pub format: Format,
    pub payload: Bytes,
    pub tags: Vec<T>,
}

/// The open envelope of every shard, all in one format.
pub struct Packer<T> {
    limits: Limits,
    format: Format,
    open: Vec<Option<(Builder, Vec<T>)>>,
}

impl<T> Packer<T> {
    pub fn new(shard_count: u16, limits: Limits, format: Format) -> Packer<T> {
        Packer {
            limits,
            format,
            open: (0..shard_count).map(|_| None).collect(),
        }
    }

    /// The format of the entries it takes.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Adds an entry to `shard`'s envelope. Returns the envelope that had to be sealed first
    /// to keep within the limits, if any (then this entry opens the next one). A shard beyond
    /// the count, or an entry the format cannot hold ([`Builder::push`]), hands the tag back:
    /// the caller must not lose what it carries.
    pub fn push(&mut self, shard: u16, entry: &Entry<'_>, tag: T) -> Result<Option<Sealed<T>>, T> {
        let (limits, format) = (self.limits, self.format);
        if !Builder::holds(format, entry.subject, &entry.content) {
            return Err(tag);
        }
        let Some(slot) = self.open.get_mut(usize::from(shard)) else {
            return Err(tag);
        };
        let added = Builder::entry_size(entry.subject, &entry.content);
        let sealed = match slot {
            Some((builder, _))
                if builder.len() >= limits.max_entries
                    || builder.size() + added > limits.max_bytes =>
            {
                slot.take().map(|(builder, tags)| Sealed {
                    shard,
                    format,
                    payload: builder.finish(),
                    tags,
                })
            }
            _ => None,
        };
        let (builder, tags) = slot.get_or_insert_with(|| (Builder::new(format), Vec::new()));
        if !builder.push(entry.input_sequence, entry.subject, &entry.content) {
            return Err(tag);
        }
        tags.push(tag);
        Ok(sealed)
    }

    /// Seals `shard`'s open envelope, if it has one (before a digest request for that shard,
    /// so the request cannot overtake the events before it).
    pub fn seal(&mut self, shard: u16) -> Option<Sealed<T>> {
        let (builder, tags) = self.open.get_mut(usize::from(shard))?.take()?;
        Some(Sealed {
            shard,
            format: self.format,
            payload: builder.finish(),
            tags,
        })
    }

    /// Seals every open envelope, in shard order.
    pub fn seal_all(&mut self) -> Vec<Sealed<T>> {
        let shards = u16::try_from(self.open.len()).unwrap_or(u16::MAX);
        (0..shards).filter_map(|shard| self.seal(shard)).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.open.iter().all(Option::is_none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn change(user: &str, alarm: &str, status: Status, seconds: i64, nanos: u32) -> StatusChange {
        StatusChange {
            user_id: user.into(),
            alarm_id: alarm.into(),
            observation: Observation {
                status,
                changed_at: DateTime::from_timestamp(seconds, nanos).expect("an instant"),
            },
        }
    }

    fn json(payload: &[u8]) -> Content<'_> {
        Content::Json(payload)
    }

    #[test]
    fn the_first_layout_is_as_documented() {
        let mut builder = Builder::new(Format::V1);
        assert!(builder.push(7, "S", &json(b"{}")));
        let bytes = builder.finish();
        assert_eq!(
            bytes.as_ref(),
            [
                1, // version
                0, 0, 0, 1, // one entry
                0, 0, 0, 0, 0, 0, 0, 7, // input sequence
                0, 1, b'S', // subject
                0, 0, 0, 2, b'{', b'}', // payload
            ]
        );
        assert_eq!(
            decode(&bytes),
            Ok(vec![Entry {
                input_sequence: 7,
                subject: "S",
                content: json(b"{}"),
            }])
        );
    }

    #[test]
    fn the_second_layout_is_as_documented() {
        let critical = change("u", "ab", Status::Critical, 258, 3);
        let mut builder = Builder::new(Format::V2);
        assert!(builder.push(7, "S", &Content::Change(Cow::Borrowed(&critical))));
        let bytes = builder.finish();
        assert_eq!(
            bytes.as_ref(),
            [
                2, // version
                0, 0, 0, 1, // one entry
                0, 0, 0, 0, 0, 0, 0, 7, // input sequence
                0, 1, b'S', // subject
                2,    // CRITICAL
                0, 0, 0, 0, 0, 0, 1, 2, // seconds
                0, 0, 0, 3, // nanoseconds
                0, 1, b'u', // UserID
                0, 2, b'a', b'b', // AlarmID
            ]
        );
        assert_eq!(
            decode(&bytes),
            Ok(vec![Entry {
                input_sequence: 7,
                subject: "S",
                content: Content::Change(Cow::Owned(critical)),
            }])
        );
    }

    #[test]
    fn damage_is_refused_not_guessed() {
        let mut builder = Builder::new(Format::V1);
        builder.push(1, "AlarmStatusChanged", &json(b"{\"a\":1}"));
        let bytes = builder.finish();
        assert_eq!(decode(&[]), Err(EnvelopeError::Empty));
        assert_eq!(
            decode(&[3, 0, 0, 0, 0]),
            Err(EnvelopeError::UnknownVersion(3))
        );
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(EnvelopeError::Truncated(_))
        ));
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(decode(&longer), Err(EnvelopeError::Trailing(1)));
        // A count far beyond the bytes allocates nothing and fails.
        assert!(matches!(
            decode(&[1, 0xff, 0xff, 0xff, 0xff]),
            Err(EnvelopeError::Truncated(5))
        ));
    }

    #[test]
    fn a_second_format_entry_that_names_no_change_is_refused() {
        let mut builder = Builder::new(Format::V2);
        let good = change("u", "a", Status::Warning, 1, 0);
        builder.push(1, "S", &Content::Change(Cow::Borrowed(&good)));
        let bytes = builder.finish().to_vec();
        // Offsets in the one entry: status at 16, nanoseconds at 25, UserID's length at 29.
        let damaged = |at: usize, with: &[u8]| {
            let mut copy = bytes.clone();
            copy[at..at + with.len()].copy_from_slice(with);
            decode(&copy).map(|entries| entries.len())
        };
        assert_eq!(damaged(16, &[3]), Err(EnvelopeError::BadStatus(0)));
        assert_eq!(
            damaged(25, &1_000_000_000u32.to_be_bytes()),
            Err(EnvelopeError::BadTime(0))
        );
        assert_eq!(damaged(31, &[0xff]), Err(EnvelopeError::BadId(0)));
        let mut empty_user = bytes[..29].to_vec();
        empty_user.extend_from_slice(&[0, 0, 0, 1, b'a']);
        assert_eq!(decode(&empty_user), Err(EnvelopeError::BadId(0)));
    }

    #[test]
    fn a_builder_refuses_what_its_format_cannot_hold() {
        let good = change("u", "a", Status::Warning, 1, 0);
        let long = change(&"u".repeat(MAX_ID_BYTES + 1), "a", Status::Warning, 1, 0);
        let mut v1 = Builder::new(Format::V1);
        assert!(!v1.push(1, "S", &Content::Change(Cow::Borrowed(&good))));
        let mut v2 = Builder::new(Format::V2);
        assert!(!v2.push(1, "S", &json(b"{}")));
        assert!(!v2.push(1, "S", &Content::Change(Cow::Borrowed(&long))));
        assert!(v1.is_empty() && v2.is_empty());
    }

    #[test]
    fn the_packer_seals_at_the_entry_and_byte_limits_and_on_demand() {
        let limits = Limits {
            max_entries: 3,
            max_bytes: 100,
        };
        let entry = |seq: u64, payload: &'static [u8]| Entry {
            input_sequence: seq,
            subject: "S",
            content: json(payload),
        };
        let mut packer: Packer<u64> = Packer::new(2, limits, Format::V1);
        for seq in 0..3 {
            assert!(matches!(packer.push(0, &entry(seq, b"x"), seq), Ok(None)));
        }
        let full = packer
            .push(0, &entry(3, b"x"), 3)
            .ok()
            .flatten()
            .expect("the fourth seals the first three");
        assert_eq!(
            (full.shard, full.format, full.tags),
            (0, Format::V1, vec![0, 1, 2])
        );
        // 5 + 14 + 1 + 60 = 80 fits; a second such entry does not.
        assert!(matches!(
            packer.push(1, &entry(10, &[b'y'; 60]), 10),
            Ok(None)
        ));
        let by_size = packer
            .push(1, &entry(11, &[b'y'; 60]), 11)
            .ok()
            .flatten()
            .expect("sealed by size");
        assert_eq!(
            packer.push(7, &entry(12, b"x"), 12).err(),
            Some(12),
            "no shard 7"
        );
        let other_format = Entry {
            input_sequence: 13,
            subject: "S",
            content: Content::Change(Cow::Owned(change("u", "a", Status::Cleared, 0, 0))),
        };
        assert_eq!(packer.push(0, &other_format, 13).err(), Some(13), "not v1");
        assert_eq!(by_size.tags, vec![10]);
        let sealed = packer.seal(0).expect("shard 0 has one open entry");
        assert_eq!(sealed.tags, vec![3]);
        assert!(packer.seal(0).is_none());
        let rest = packer.seal_all();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].tags, vec![11]);
        assert!(packer.is_empty());
        assert_eq!(decode(&rest[0].payload).map(|e| e.len()), Ok(1));
    }

    #[test]
    fn formats_are_named_alike_by_header_and_number() {
        for format in [Format::V1, Format::V2] {
            assert_eq!(Format::from_header(format.header()), Some(format));
            assert_eq!(Format::from_number(format.number()), Some(format));
        }
        assert_eq!(Format::from_header("envelope-3"), None);
        assert_eq!(Format::from_number(0), None);
    }

    fn a_change() -> impl Strategy<Value = StatusChange> {
        (
            "[a-z0-9-]{1,40}",
            "[a-z0-9:/.-]{1,60}",
            0..3u8,
            -62_000_000_000i64..250_000_000_000,
            0..1_000_000_000u32,
        )
            .prop_map(|(user, alarm, status, seconds, nanos)| {
                let status = status_of(status).expect("0..3");
                change(&user, &alarm, status, seconds, nanos)
            })
    }

    proptest! {
        #[test]
        fn first_format_entries_round_trip_in_order(
            entries in prop::collection::vec(
                (any::<u64>(), "[A-Za-z.]{1,40}", prop::collection::vec(any::<u8>(), 0..300)),
                0..50,
            )
        ) {
            let mut builder = Builder::new(Format::V1);
            for (seq, subject, payload) in &entries {
                prop_assert!(builder.push(*seq, subject, &json(payload)));
            }
            let size = builder.size();
            let bytes = builder.finish();
            prop_assert_eq!(bytes.len(), size);
            let decoded = decode(&bytes).expect("decodes");
            prop_assert_eq!(decoded.len(), entries.len());
            for (entry, (seq, subject, payload)) in decoded.iter().zip(&entries) {
                prop_assert_eq!(entry.input_sequence, *seq);
                prop_assert_eq!(entry.subject, subject.as_str());
                prop_assert_eq!(&entry.content, &json(payload));
            }
        }

        #[test]
        fn second_format_entries_round_trip_in_order(
            entries in prop::collection::vec((any::<u64>(), "[A-Za-z.]{1,40}", a_change()), 0..50)
        ) {
            let mut builder = Builder::new(Format::V2);
            let mut expected_size = PREAMBLE;
            for (seq, subject, change) in &entries {
                let content = Content::Change(Cow::Borrowed(change));
                expected_size += Builder::entry_size(subject, &content);
                prop_assert!(builder.push(*seq, subject, &content));
            }
            prop_assert_eq!(builder.size(), expected_size);
            let bytes = builder.finish();
            let decoded = decode(&bytes).expect("decodes");
            prop_assert_eq!(decoded.len(), entries.len());
            for (entry, (seq, subject, change)) in decoded.into_iter().zip(&entries) {
                prop_assert_eq!(entry.input_sequence, *seq);
                prop_assert_eq!(entry.subject, subject.as_str());
                prop_assert_eq!(entry.content, Content::Change(Cow::Borrowed(change)));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_second_format_bodies_never_panic(
            body in prop::collection::vec(any::<u8>(), 0..512)
        ) {
            let mut bytes = vec![2, 0, 0, 0, 3];
            bytes.extend_from_slice(&body);
            let _ = decode(&bytes);
        }
    }
}
