//! The router → shard frame: many input messages in one shard-stream message, so the second
//! hop costs one stream write, one delivery and one ack per envelope instead of per event.
//!
//! Layout (all integers big-endian), after the `Alarm-Digest-Frame: envelope-1` header:
//!
//! ```text
//! u8   format version (1)
//! u32  entry count
//! per entry:
//!   u64  input stream sequence
//!   u16  subject length, then the original (input) subject
//!   u32  payload length, then the original payload, unchanged
//! ```
//!
//! Pure: no I/O, tested with byte literals and properties. [`Packer`] holds the open envelopes
//! of every shard and says when one must be flushed; the router and the broker-ceiling bench
//! share it, so both flush by the same rules.

use bytes::Bytes;

/// Header naming a shard-stream message's frame. A message without it is a single input
/// message in the previous release's format.
pub const FRAME_HEADER: &str = "Alarm-Digest-Frame";
/// The header's value for this format.
pub const ENVELOPE_V1: &str = "envelope-1";

const FORMAT_V1: u8 = 1;
/// Version byte and entry count.
const PREAMBLE: usize = 1 + 4;
/// Sequence, subject length, payload length.
const ENTRY_OVERHEAD: usize = 8 + 2 + 4;

/// One input message inside an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub input_sequence: u64,
    pub subject: &'a str,
    pub payload: &'a [u8],
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
    #[error("envelope has {0} bytes after its last entry")]
    Trailing(usize),
}

/// Encodes entries one at a time.
#[derive(Debug, Clone)]
pub struct Builder {
    bytes: Vec<u8>,
    count: u32,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl Builder {
    pub fn new() -> Builder {
        let mut bytes = Vec::with_capacity(4096);
        bytes.push(FORMAT_V1);
        bytes.extend_from_slice(&0u32.to_be_bytes());
        Builder { bytes, count: 0 }
    }

    /// What an entry adds to the envelope's size.
    pub fn entry_size(subject: &str, payload: &[u8]) -> usize {
        ENTRY_OVERHEAD + subject.len() + payload.len()
    }

    /// Appends an entry. Subjects longer than 65,535 bytes cannot be encoded (NATS subjects
    /// are far shorter); such an entry is refused with `false`.
    pub fn push(&mut self, input_sequence: u64, subject: &str, payload: &[u8]) -> bool {
        let (Ok(subject_len), Ok(payload_len)) =
            (u16::try_from(subject.len()), u32::try_from(payload.len()))
        else {
            return false;
        };
        self.bytes.extend_from_slice(&input_sequence.to_be_bytes());
        self.bytes.extend_from_slice(&subject_len.to_be_bytes());
        self.bytes.extend_from_slice(subject.as_bytes());
        self.bytes.extend_from_slice(&payload_len.to_be_bytes());
        self.bytes.extend_from_slice(payload);
        self.count += 1;
        true
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

/// Decodes a whole envelope, refusing anything malformed rather than guessing.
pub fn decode(bytes: &[u8]) -> Result<Vec<Entry<'_>>, EnvelopeError> {
    let (&version, _) = bytes.split_first().ok_or(EnvelopeError::Empty)?;
    if version != FORMAT_V1 {
        return Err(EnvelopeError::UnknownVersion(version));
    }
    let mut at = 1;
    let count = read_u32(bytes, &mut at)? as usize;
    // Every entry takes at least its overhead: a count beyond that is a lie, and must not
    // make us allocate for it.
    let mut entries = Vec::with_capacity(count.min(bytes.len() / ENTRY_OVERHEAD));
    for index in 0..count {
        let input_sequence = read_u64(bytes, &mut at)?;
        let subject_len = read_u16(bytes, &mut at)? as usize;
        let subject = take(bytes, &mut at, subject_len)?;
        let subject = std::str::from_utf8(subject).map_err(|_| EnvelopeError::BadSubject(index))?;
        let payload_len = read_u32(bytes, &mut at)? as usize;
        let payload = take(bytes, &mut at, payload_len)?;
        entries.push(Entry {
            input_sequence,
            subject,
            payload,
        });
    }
    if at != bytes.len() {
        return Err(EnvelopeError::Trailing(bytes.len() - at));
    }
    Ok(entries)
}

fn take<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8], EnvelopeError> {
    let end = at.checked_add(len).ok_or(EnvelopeError::Truncated(*at))?;
    let slice = bytes.get(*at..end).ok_or(EnvelopeError::Truncated(*at))?;
    *at = end;
    Ok(slice)
}

fn read_u16(bytes: &[u8], at: &mut usize) -> Result<u16, EnvelopeError> {
    let slice = take(bytes, at, 2)?;
    Ok(u16::from_be_bytes([slice[0], slice[1]]))
}

fn read_u32(bytes: &[u8], at: &mut usize) -> Result<u32, EnvelopeError> {
    let slice = take(bytes, at, 4)?;
    let mut array = [0u8; 4];
    array.copy_from_slice(slice);
    Ok(u32::from_be_bytes(array))
}

fn read_u64(bytes: &[u8], at: &mut usize) -> Result<u64, EnvelopeError> {
    let slice = take(bytes, at, 8)?;
    let mut array = [0u8; 8];
    array.copy_from_slice(slice);
    Ok(u64::from_be_bytes(array))
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

/// A flushed envelope: its shard, its bytes, and what the caller tagged its entries with (the
/// router: the input messages to ack once the envelope's PubAck arrives).
pub struct Sealed<T> {
    pub shard: u16,
    pub payload: Bytes,
    pub tags: Vec<T>,
}

/// The open envelope of every shard.
pub struct Packer<T> {
    limits: Limits,
    open: Vec<Option<(Builder, Vec<T>)>>,
}

impl<T> Packer<T> {
    pub fn new(shard_count: u16, limits: Limits) -> Packer<T> {
        Packer {
            limits,
            open: (0..shard_count).map(|_| None).collect(),
        }
    }

    /// Adds an entry to `shard`'s envelope. Returns the envelope that had to be sealed first
    /// to keep within the limits, if any (then this entry opens the next one). A shard beyond
    /// the count, or a subject too long to encode, hands the tag back: the caller must not
    /// lose what it carries.
    pub fn push(
        &mut self,
        shard: u16,
        input_sequence: u64,
        subject: &str,
        payload: &[u8],
        tag: T,
    ) -> Result<Option<Sealed<T>>, T> {
        let limits = self.limits;
        if u16::try_from(subject.len()).is_err() {
            return Err(tag);
        }
        let Some(slot) = self.open.get_mut(usize::from(shard)) else {
            return Err(tag);
        };
        let added = Builder::entry_size(subject, payload);
        let sealed = match slot {
            Some((builder, _))
                if builder.len() >= limits.max_entries
                    || builder.size() + added > limits.max_bytes =>
            {
                slot.take().map(|(builder, tags)| Sealed {
                    shard,
                    payload: builder.finish(),
                    tags,
                })
            }
            _ => None,
        };
        let (builder, tags) = slot.get_or_insert_with(|| (Builder::new(), Vec::new()));
        if !builder.push(input_sequence, subject, payload) {
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

    #[test]
    fn the_layout_is_as_documented() {
        let mut builder = Builder::new();
        assert!(builder.push(7, "S", b"{}"));
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
                payload: b"{}"
            }])
        );
    }

    #[test]
    fn damage_is_refused_not_guessed() {
        let mut builder = Builder::new();
        builder.push(1, "AlarmStatusChanged", b"{\"a\":1}");
        let bytes = builder.finish();
        assert_eq!(decode(&[]), Err(EnvelopeError::Empty));
        assert_eq!(
            decode(&[2, 0, 0, 0, 0]),
            Err(EnvelopeError::UnknownVersion(2))
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
    fn the_packer_seals_at_the_entry_and_byte_limits_and_on_demand() {
        let limits = Limits {
            max_entries: 3,
            max_bytes: 100,
        };
        let mut packer: Packer<u64> = Packer::new(2, limits);
        for seq in 0..3 {
            assert!(matches!(packer.push(0, seq, "S", b"x", seq), Ok(None)));
        }
        let full = packer
            .push(0, 3, "S", b"x", 3)
            .ok()
            .flatten()
            .expect("the fourth seals the first three");
        assert_eq!((full.shard, full.tags), (0, vec![0, 1, 2]));
        // 5 + 14 + 1 + 60 = 80 fits; a second such entry does not.
        assert!(matches!(packer.push(1, 10, "S", &[b'y'; 60], 10), Ok(None)));
        let by_size = packer
            .push(1, 11, "S", &[b'y'; 60], 11)
            .ok()
            .flatten()
            .expect("sealed by size");
        assert_eq!(
            packer.push(7, 12, "S", b"x", 12).err(),
            Some(12),
            "no shard 7"
        );
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

    proptest! {
        #[test]
        fn entries_round_trip_in_order(
            entries in prop::collection::vec(
                (any::<u64>(), "[A-Za-z.]{1,40}", prop::collection::vec(any::<u8>(), 0..300)),
                0..50,
            )
        ) {
            let mut builder = Builder::new();
            for (seq, subject, payload) in &entries {
                prop_assert!(builder.push(*seq, subject, payload));
            }
            let size = builder.size();
            let bytes = builder.finish();
            prop_assert_eq!(bytes.len(), size);
            let decoded = decode(&bytes).expect("decodes");
            prop_assert_eq!(decoded.len(), entries.len());
            for (entry, (seq, subject, payload)) in decoded.iter().zip(&entries) {
                prop_assert_eq!(entry.input_sequence, *seq);
                prop_assert_eq!(entry.subject, subject.as_str());
                prop_assert_eq!(entry.payload, payload.as_slice());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }
}
