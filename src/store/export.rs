//! The shard export file: how a shard's state moves between data dirs (and machines).
//!
//! Self-describing and checked end to end, so a truncated copy or a file meant for another
//! cluster is refused before anything is written:
//!
//! ```text
//! "ALARM-DIGEST-SHARD\n"   magic
//! u16 format version       (1)
//! u16 shard, u16 shards.count
//! u16 len + instance id    the data dir it was exported from (the shard's home then)
//! u64 entry count
//! entries: u32 len + key, u32 len + value   (the shard tree, verbatim)
//! u32 crc32 of every byte above
//! ```
//! All integers big-endian. Entries are the raw tree, so the outbox, answered-request
//! markers and the digest epoch move with the alarms.

const MAGIC: &[u8] = b"ALARM-DIGEST-SHARD\n";
pub const FORMAT_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardExport {
    pub shard: u16,
    pub count: u16,
    pub source_instance: String,
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("not an alarm-digest shard export (wrong magic)")]
    NotAnExport,
    #[error("export format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("the file is truncated or damaged: checksum mismatch")]
    Checksum,
    #[error("the file is truncated or damaged: {0}")]
    Malformed(&'static str),
}

impl ShardExport {
    pub fn encode(&self) -> Vec<u8> {
        let payload: usize = self
            .entries
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum();
        let mut out = Vec::with_capacity(MAGIC.len() + 32 + payload);
        let mut encoder = Encoder::start(
            &mut out,
            self.shard,
            self.count,
            &self.source_instance,
            self.entries.len() as u64,
        );
        for (key, value) in &self.entries {
            encoder.entry(&mut out, key, value);
        }
        encoder.finish(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ShardExport, ExportError> {
        if !bytes.starts_with(MAGIC) {
            return Err(ExportError::NotAnExport);
        }
        let mut reader = Reader {
            rest: &bytes[MAGIC.len()..],
        };
        // Refuse a newer format by its version, before the checksum: it may checksum otherwise.
        let version = reader.u16()?;
        if version != FORMAT_VERSION {
            return Err(ExportError::UnsupportedVersion(version));
        }
        let body_len = bytes.len().checked_sub(4).ok_or(ExportError::Checksum)?;
        let (body, stored) = bytes.split_at(body_len);
        let stored = u32::from_be_bytes(stored.try_into().map_err(|_| ExportError::Checksum)?);
        if body.len() < MAGIC.len() + 2 || crc32fast::hash(body) != stored {
            return Err(ExportError::Checksum);
        }
        reader.rest = &body[MAGIC.len() + 2..];
        let shard = reader.u16()?;
        let count = reader.u16()?;
        let id_len = usize::from(reader.u16()?);
        let source_instance = String::from_utf8(reader.take(id_len)?.to_vec())
            .map_err(|_| ExportError::Malformed("instance id is not UTF-8"))?;
        let entry_count = reader.u64()?;
        // Each entry takes at least 8 bytes: a count larger than that is a lie, not an OOM.
        if entry_count > (reader.rest.len() / 8) as u64 {
            return Err(ExportError::Malformed("entry count exceeds the file"));
        }
        let mut entries = Vec::with_capacity(entry_count as usize);
        for _ in 0..entry_count {
            let key_len = reader.u32()? as usize;
            let key = reader.take(key_len)?.to_vec();
            let value_len = reader.u32()? as usize;
            let value = reader.take(value_len)?.to_vec();
            entries.push((key, value));
        }
        if !reader.rest.is_empty() {
            return Err(ExportError::Malformed("bytes after the last entry"));
        }
        if shard >= count {
            return Err(ExportError::Malformed("shard is not below the shard count"));
        }
        Ok(ShardExport {
            shard,
            count,
            source_instance,
            entries,
        })
    }
}

/// Writes an export piece by piece, so a large shard is encoded (and snapshotted) a chunk at
/// a time instead of whole in memory. The entry count goes in the header, so the caller counts
/// first. Every byte appended is checksummed.
pub struct Encoder {
    hasher: crc32fast::Hasher,
}

impl Encoder {
    /// Appends the header to `out`.
    pub fn start(out: &mut Vec<u8>, shard: u16, count: u16, source: &str, entries: u64) -> Encoder {
        let mut encoder = Encoder {
            hasher: crc32fast::Hasher::new(),
        };
        let from = out.len();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&shard.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        let id = source.as_bytes();
        let id = &id[..id.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&entries.to_be_bytes());
        encoder.hasher.update(&out[from..]);
        encoder
    }

    pub fn entry(&mut self, out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
        let from = out.len();
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
        self.hasher.update(&out[from..]);
    }

    /// Appends the checksum of everything before it.
    pub fn finish(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hasher.finalize().to_be_bytes());
    }
}

/// What an export's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub shard: u16,
    pub count: u16,
    pub source_instance: String,
}

/// Reads an export fed a chunk at a time, handing back each complete entry as soon as it is
/// in: a restore applies a large snapshot without holding it whole. The checksum is known
/// only at the end ([`StreamDecoder::finish`]), so a caller must not trust what it applied
/// before that returns `Ok`.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    hasher: crc32fast::Hasher,
    header: Option<Header>,
    remaining: u64,
}

impl StreamDecoder {
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// Takes the next bytes; returns the entries they complete.
    #[allow(clippy::type_complexity)]
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ExportError> {
        self.pending.extend_from_slice(bytes);
        let mut reader = Reader {
            rest: &self.pending,
        };
        let mut entries = Vec::new();
        if self.header.is_none() {
            if reader.rest.len() >= MAGIC.len() && !reader.rest.starts_with(MAGIC) {
                return Err(ExportError::NotAnExport);
            }
            let Some((header, remaining)) = read_header(&mut reader)? else {
                return Ok(entries);
            };
            self.header = Some(header);
            self.remaining = remaining;
        }
        // Keep the 4 checksum bytes back: they are no entry.
        while self.remaining > 0 {
            let before = reader.rest;
            let entry = (|| -> Result<(Vec<u8>, Vec<u8>), ExportError> {
                let key_len = reader.u32()? as usize;
                let key = reader.take(key_len)?.to_vec();
                let value_len = reader.u32()? as usize;
                let value = reader.take(value_len)?.to_vec();
                Ok((key, value))
            })();
            match entry {
                Ok(entry) => {
                    entries.push(entry);
                    self.remaining -= 1;
                }
                Err(_) => {
                    reader.rest = before;
                    break;
                }
            }
        }
        let consumed = self.pending.len() - reader.rest.len();
        self.hasher.update(&self.pending[..consumed]);
        self.pending.drain(..consumed);
        Ok(entries)
    }

    /// Checks that every entry arrived and the checksum matches.
    pub fn finish(self) -> Result<Header, ExportError> {
        let header = self
            .header
            .ok_or(ExportError::Malformed("ends inside the header"))?;
        if self.remaining > 0 {
            return Err(ExportError::Malformed("ends inside the entries"));
        }
        let stored: [u8; 4] = self
            .pending
            .as_slice()
            .try_into()
            .map_err(|_| ExportError::Checksum)?;
        if self.hasher.finalize() != u32::from_be_bytes(stored) {
            return Err(ExportError::Checksum);
        }
        Ok(header)
    }
}

/// The header, or `None` while not all of it is in.
fn read_header(reader: &mut Reader<'_>) -> Result<Option<(Header, u64)>, ExportError> {
    let start = reader.rest;
    let parsed = (|| -> Result<(u16, u16, u16, Vec<u8>, u64), ExportError> {
        reader.take(MAGIC.len())?;
        let version = reader.u16()?;
        let shard = reader.u16()?;
        let count = reader.u16()?;
        let id_len = usize::from(reader.u16()?);
        let id = reader.take(id_len)?.to_vec();
        let entries = reader.u64()?;
        Ok((version, shard, count, id, entries))
    })();
    let Ok((version, shard, count, id, entries)) = parsed else {
        reader.rest = start;
        return Ok(None);
    };
    if version != FORMAT_VERSION {
        return Err(ExportError::UnsupportedVersion(version));
    }
    if shard >= count {
        return Err(ExportError::Malformed("shard is not below the shard count"));
    }
    let source_instance =
        String::from_utf8(id).map_err(|_| ExportError::Malformed("instance id is not UTF-8"))?;
    let header = Header {
        shard,
        count,
        source_instance,
    };
    Ok(Some((header, entries)))
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], ExportError> {
        if self.rest.len() < len {
            return Err(ExportError::Malformed("ends inside a field"));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, ExportError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, ExportError> {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(bytes))
    }

    fn u64(&mut self) -> Result<u64, ExportError> {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> ShardExport {
        ShardExport {
            shard: 3,
            count: 6,
            source_instance: "4f1c".into(),
            entries: vec![
                (b"a\0\x01uX".to_vec(), vec![1, 2, 3]),
                (b"mepoch".to_vec(), vec![]),
            ],
        }
    }

    #[test]
    fn round_trips() {
        assert_eq!(ShardExport::decode(&sample().encode()), Ok(sample()));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let bytes = sample().encode();
        for at in MAGIC.len() + 2..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert_eq!(
                ShardExport::decode(&damaged),
                Err(ExportError::Checksum),
                "byte {at}"
            );
        }
    }

    #[test]
    fn truncation_and_foreign_files_are_refused() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(ShardExport::decode(&bytes[..len]).is_err(), "length {len}");
        }
        assert_eq!(
            ShardExport::decode(b"{\"json\": 1}"),
            Err(ExportError::NotAnExport)
        );
        let mut newer = bytes;
        newer[MAGIC.len() + 1] = 2;
        assert_eq!(
            ShardExport::decode(&newer),
            Err(ExportError::UnsupportedVersion(2))
        );
    }

    proptest! {
        #[test]
        fn any_export_round_trips(
            shard in 0u16..8,
            entries in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..40),
                 proptest::collection::vec(any::<u8>(), 0..40)),
                0..20),
        ) {
            let export = ShardExport { shard, count: 8, source_instance: "x".into(), entries };
            prop_assert_eq!(ShardExport::decode(&export.encode()), Ok(export));
        }

        #[test]
        fn fed_in_any_chunks_it_reads_the_same_entries(
            entries in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..40),
                 proptest::collection::vec(any::<u8>(), 0..40)),
                0..20),
            chunk in 1usize..64,
        ) {
            let export = ShardExport { shard: 1, count: 4, source_instance: "x".into(), entries };
            let bytes = export.encode();
            let mut decoder = StreamDecoder::default();
            let mut read = Vec::new();
            for piece in bytes.chunks(chunk) {
                read.extend(decoder.feed(piece).expect("feed"));
            }
            let header = decoder.finish().expect("whole");
            prop_assert_eq!((header.shard, header.count), (1, 4));
            prop_assert_eq!(read, export.entries);
        }

        #[test]
        fn fed_a_flipped_bit_it_never_finishes_ok(at in 0usize..1000, chunk in 1usize..64) {
            let bytes = sample().encode();
            let mut damaged = bytes.clone();
            let at = at % damaged.len();
            damaged[at] ^= 0x10;
            let mut decoder = StreamDecoder::default();
            let mut failed = false;
            for piece in damaged.chunks(chunk) {
                if decoder.feed(piece).is_err() {
                    failed = true;
                    break;
                }
            }
            prop_assert!(failed || decoder.finish().is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut input = MAGIC.to_vec();
            input.extend_from_slice(&bytes);
            let _ = ShardExport::decode(&input);
        }
    }
}
