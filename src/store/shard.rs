//! One shard's tree, owned by exactly one shard worker: reads, digests, the outbox, the
//! retention sweep, export and restore.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{
    codec, keys, read_u64, DataDirHealth, Encoder, OutboxEntry, ShardExport, ShardWrite, StoreError,
};
use crate::domain::AlarmRecord;

/// One shard's tree. Owned by exactly one shard worker, which is its only writer.
pub struct ShardStore {
    pub(super) shard: u16,
    pub(super) tree: sled::Tree,
    pub(super) failing: DataDirHealth,
    pub(super) epoch: u64,
    pub(super) next_outbox: u64,
    /// The shard stream sequence the tree reflects ([`keys::META_APPLIED`]).
    pub(super) applied: u64,
}

/// Writes a snapshot's entries into a shard tree during a restore (see
/// [`ShardStore::restore_writer`]); `Send`, so sled's synchronous writes run off the runtime.
#[derive(Clone)]
pub struct RestoreWriter {
    pub(super) tree: sled::Tree,
}

impl RestoreWriter {
    /// Writes restored entries. The applied sequence is left out: it is set by
    /// [`ShardStore::finish_restore`] only once the whole snapshot checked out, so a restore
    /// cut short never passes for a current state.
    pub fn write(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in entries {
            if key.as_slice() != keys::META_APPLIED {
                batch.insert(key.as_slice(), value.as_slice());
            }
        }
        Ok(self.tree.apply_batch(batch)?)
    }
}

/// The chunks of [`ShardStore::export_chunks`].
struct ExportChunks {
    pub(super) entries: sled::Iter,
    /// `None` once the checksum is written.
    pub(super) encoder: Option<Encoder>,
    pub(super) buffer: Vec<u8>,
    pub(super) chunk_bytes: usize,
}

impl Iterator for ExportChunks {
    type Item = Result<Vec<u8>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let encoder = self.encoder.as_mut()?;
        while self.buffer.len() < self.chunk_bytes {
            match self.entries.next() {
                Some(Ok((key, value))) => encoder.entry(&mut self.buffer, &key, &value),
                Some(Err(error)) => {
                    self.encoder = None;
                    return Some(Err(error.into()));
                }
                None => {
                    if let Some(encoder) = self.encoder.take() {
                        encoder.finish(&mut self.buffer);
                    }
                    break;
                }
            }
        }
        let next = Vec::with_capacity(self.chunk_bytes + 1024);
        Some(Ok(std::mem::replace(&mut self.buffer, next)))
    }
}

/// An outbox entry the broker refused for good, with the alarms its payload carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPart {
    pub sequence: u64,
    pub user_id: String,
    pub alarm_ids: Vec<String>,
}

/// Result of applying one status change inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Changed,
    /// Stale or duplicate: nothing to write.
    Unchanged,
    /// It would create an alarm beyond `limits.max_alarms_per_user`.
    TooManyAlarms,
}

impl ShardStore {
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Whether the data dir's last write or flush failed and no flush has succeeded since:
    /// reading the whole tree then may never return (see `DataDirHealth`).
    pub fn data_dir_failing(&self) -> bool {
        self.failing.failing()
    }

    /// Reads the metadata the store caches, creating the digest epoch on first use.
    pub(super) fn load_meta(&mut self) -> Result<(), StoreError> {
        self.epoch = match self.tree.get(keys::META_EPOCH)? {
            Some(bytes) => read_u64(&bytes),
            None => {
                let epoch = rand::random::<u64>();
                self.tree.insert(keys::META_EPOCH, &epoch.to_be_bytes())?;
                epoch
            }
        };
        let meta = |key: &[u8]| -> Result<u64, StoreError> {
            Ok(self.tree.get(key)?.map(|b| read_u64(&b)).unwrap_or(0))
        };
        self.next_outbox = meta(keys::META_NEXT_OUTBOX)?;
        self.applied = meta(keys::META_APPLIED)?;
        Ok(())
    }

    /// The shard stream sequence this tree reflects: every message at or below it is applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Records that the tree reflects the shard stream up to `sequence` (not flushed: the
    /// caller flushes through the group flusher or at shutdown).
    pub fn set_applied(&mut self, sequence: u64) -> Result<(), StoreError> {
        self.tree
            .insert(keys::META_APPLIED, &sequence.to_be_bytes())?;
        self.applied = sequence;
        Ok(())
    }

    /// Sets the digest epoch (part of every digest's Msg-Id). Only for a tree in its initial
    /// state, before any digest was written.
    pub fn set_epoch(&mut self, epoch: u64) -> Result<(), StoreError> {
        self.tree.insert(keys::META_EPOCH, &epoch.to_be_bytes())?;
        self.epoch = epoch;
        Ok(())
    }

    /// Whether the tree holds no alarms, digests or markers at all.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        for item in self.tree.iter().keys() {
            if item?.first() != Some(&b'm') {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The whole tree as an export (the snapshot and `shard export` format). Consistent as
    /// long as nothing writes meanwhile, which the worker (the tree's only writer) ensures by
    /// exporting between batches.
    pub fn export(&self, count: u16, source_instance: String) -> Result<ShardExport, StoreError> {
        let entries = self
            .tree
            .iter()
            .map(|entry| entry.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<Vec<_>, sled::Error>>()?;
        Ok(ShardExport {
            shard: self.shard,
            count,
            source_instance,
            entries,
        })
    }

    /// The tree in the export format, `chunk_bytes` at a time, for a snapshot: never the
    /// whole shard in memory. Consistent as long as nothing writes meanwhile (the worker, the
    /// tree's only writer, awaits the snapshot).
    pub fn export_chunks(
        &self,
        count: u16,
        source_instance: &str,
        chunk_bytes: usize,
    ) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + Send + 'static {
        let entries = self.tree.len() as u64;
        let mut first = Vec::with_capacity(chunk_bytes + 1024);
        let encoder = Encoder::start(&mut first, self.shard, count, source_instance, entries);
        ExportChunks {
            entries: self.tree.iter(),
            encoder: Some(encoder),
            buffer: first,
            chunk_bytes: chunk_bytes.max(1024),
        }
    }

    /// Empties the tree, before a restore writes a snapshot's entries into it.
    pub fn clear(&mut self) -> Result<(), StoreError> {
        loop {
            let mut batch = sled::Batch::default();
            let mut any = false;
            for key in self.tree.iter().keys().take(10_000) {
                batch.remove(key?);
                any = true;
            }
            if !any {
                return Ok(());
            }
            self.tree.apply_batch(batch)?;
        }
    }

    /// What a restore writes entries through, from a blocking thread.
    pub fn restore_writer(&self) -> RestoreWriter {
        RestoreWriter {
            tree: self.tree.clone(),
        }
    }

    /// Marks a restore complete at `applied`.
    pub fn finish_restore(&mut self, applied: u64) -> Result<(), StoreError> {
        self.load_meta()?;
        self.set_applied(applied)
    }

    /// Replaces the tree with an export's entries in one atomic batch (not flushed) and
    /// reloads the metadata from them.
    pub fn replace(&mut self, export: &ShardExport) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.tree.iter().keys() {
            batch.remove(key?);
        }
        for (key, value) in &export.entries {
            batch.insert(key.as_slice(), value.as_slice());
        }
        self.tree.apply_batch(batch)?;
        self.load_meta()
    }

    pub fn begin(&mut self) -> ShardWrite<'_> {
        ShardWrite {
            applied: None,
            store: self,
            alarms: BTreeMap::new(),
            answered: HashSet::new(),
            outbox: Vec::new(),
            user_counts: HashMap::new(),
        }
    }

    /// One user's alarms as stored, in AlarmID order.
    pub fn user_alarms(&self, user_id: &str) -> Result<Vec<(String, AlarmRecord)>, StoreError> {
        let prefix = keys::user_prefix(user_id);
        self.tree
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, value) = item?;
                let alarm_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let record =
                    codec::decode_record(&value).map_err(|e| StoreError::codec(&key, e))?;
                Ok((alarm_id, record))
            })
            .collect()
    }

    /// Digests still waiting for their PubAck, oldest first.
    pub fn pending_outbox(&self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        self.tree
            .scan_prefix([keys::OUTBOX])
            .map(|item| {
                let (key, value) = item?;
                let sequence = keys::parse_sequence_key(&key).unwrap_or(0);
                let entry = codec::decode_outbox(&value).map_err(|e| StoreError::codec(&key, e))?;
                Ok((sequence, entry))
            })
            .collect()
    }

    /// The digest epoch: part of every digest part's Msg-Id.
    pub fn digest_epoch(&self) -> u64 {
        self.epoch
    }

    /// The outbox sequence the next digest part gets.
    pub fn next_outbox(&self) -> u64 {
        self.next_outbox
    }

    /// Drops every outbox entry below `floor`: for a standby, whose copy of the shard
    /// queues the digests the holder publishes, once the holder says they were published.
    /// Returns how many were dropped. Not flushed: a drop lost in a crash means those parts
    /// are published again at a takeover, and the output stream drops the copies.
    pub fn drop_outbox_below(&self, floor: u64) -> Result<usize, StoreError> {
        let start = keys::sequence_key(keys::OUTBOX, 0);
        let end = keys::sequence_key(keys::OUTBOX, floor);
        let mut batch = sled::Batch::default();
        let mut dropped = 0;
        for key in self.tree.range(start..end).keys() {
            batch.remove(key?);
            dropped += 1;
        }
        if dropped > 0 {
            self.tree.apply_batch(batch)?;
        }
        Ok(dropped)
    }

    /// Drops published digests. Not flushed on purpose: if the removal is lost in a crash the
    /// digest is published again with the same Msg-Id, and JetStream drops the copy.
    pub fn remove_outbox(&self, sequences: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for sequence in sequences {
            batch.remove(&keys::sequence_key(keys::OUTBOX, *sequence));
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Takes digest parts the broker refused for good out of the outbox and marks their alarms
    /// unsent again, in one atomic write: the user's next digest carries them (split for the
    /// limit then in force), so a refusal never loses an alarm. Returns how many alarms came
    /// back. Not flushed: if the write is lost in a crash, the parts are refused again.
    pub fn return_to_unsent(&self, refused: &[RefusedPart]) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut returned = 0;
        for part in refused {
            for alarm_id in &part.alarm_ids {
                let key = keys::alarm_key(&part.user_id, alarm_id);
                // A record swept meanwhile was CLEARED: nothing left to tell.
                let Some(bytes) = self.tree.get(&key)? else {
                    continue;
                };
                let mut record =
                    codec::decode_record(&bytes).map_err(|e| StoreError::codec(&key, e))?;
                record.mark_unsent();
                batch.insert(key, codec::encode_record(&record));
                returned += 1;
            }
            batch.remove(&keys::sequence_key(keys::OUTBOX, part.sequence)[..]);
        }
        self.tree.apply_batch(batch)?;
        Ok(returned)
    }

    /// Forgets answered-request markers at or below the consumer's ack floor: JetStream will
    /// never redeliver those requests.
    pub fn prune_answered(&self, ack_floor: u64) -> Result<usize, StoreError> {
        let end = keys::sequence_key(keys::REQUEST, ack_floor.saturating_add(1));
        let mut batch = sled::Batch::default();
        let mut count = 0;
        for item in self.tree.range(keys::sequence_key(keys::REQUEST, 0)..end) {
            let (key, _) = item?;
            batch.remove(key);
            count += 1;
        }
        self.tree.apply_batch(batch)?;
        Ok(count)
    }

    /// One incremental step of the retention sweep: examines at most `limit` alarms after
    /// `cursor` and removes the expired CLEARED tombstones among them in one batch. Returns
    /// how many were removed and where to continue (`None`: the tree was covered; start over
    /// next time). `now` is passed in so tests need no clock.
    pub fn sweep_cleared(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
        now: chrono::DateTime<chrono::Utc>,
        cleared_after: chrono::Duration,
    ) -> Result<(usize, Option<Vec<u8>>), StoreError> {
        let start = match cursor {
            Some(after) => std::ops::Bound::Excluded(after.to_vec()),
            None => std::ops::Bound::Included(vec![keys::ALARM]),
        };
        let end = std::ops::Bound::Excluded(vec![keys::ALARM + 1]);
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        let mut examined = 0;
        let mut last = None;
        for item in self.tree.range::<Vec<u8>, _>((start, end)).take(limit) {
            let (key, value) = item?;
            examined += 1;
            // An unreadable record is left for the worker to report, not silently dropped.
            if let Ok(record) = codec::decode_record(&value) {
                if record.is_expired(now, cleared_after) {
                    batch.remove(key.clone());
                    removed += 1;
                }
            }
            last = Some(key.to_vec());
        }
        self.tree.apply_batch(batch)?;
        // A short page means the end of the alarms was reached: start over next time.
        let next = if examined < limit { None } else { last };
        Ok((removed, next))
    }

    pub(super) fn message_id(&self, sequence: u64) -> String {
        format!(
            "alarm-digest:{}:{:016x}:{}",
            self.shard, self.epoch, sequence
        )
    }
}
