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
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&self.shard.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        let id = self.source_instance.as_bytes();
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&(self.entries.len() as u64).to_be_bytes());
        for (key, value) in &self.entries {
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
        let checksum = crc32fast::hash(&out);
        out.extend_from_slice(&checksum.to_be_bytes());
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
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut input = MAGIC.to_vec();
            input.extend_from_slice(&bytes);
            let _ = ShardExport::decode(&input);
        }
    }
}
