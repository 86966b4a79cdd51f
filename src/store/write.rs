//! `ShardWrite`: the pending writes of one batch, read back before the tree, committed in
//! one atomic sled batch.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{codec, keys, AlarmRecord, OutboxEntry, ShardStore, StatusChange, StoreError};
use crate::store::Applied;

/// One digest part as the outbox stores it: the rendered payload and how many alarms it
/// carries.
pub struct QueuedPart {
    pub payload: Vec<u8>,
    pub alarms: usize,
}

/// The pending writes of one batch. Reads see the batch's own earlier writes first.
pub struct ShardWrite<'s> {
    pub(super) store: &'s mut ShardStore,
    /// The shard stream sequence the tree reflects once this batch is committed.
    pub(super) applied: Option<u64>,
    pub(super) alarms: BTreeMap<Vec<u8>, AlarmRecord>,
    pub(super) answered: HashSet<u64>,
    pub(super) outbox: Vec<(u64, OutboxEntry)>,
    /// Per user (by key prefix) touched by a create in this batch: how many alarms the user
    /// has now, counted once (capped at the limit) and kept up to date by later creates, so a
    /// batch creating many alarms scans each user's keys once rather than once per create.
    pub(super) user_counts: HashMap<Vec<u8>, usize>,
}

impl ShardWrite<'_> {
    /// The tree reflects the shard stream up to `sequence` once this batch commits: written
    /// in the same atomic batch as what it covers.
    pub fn applied_through(&mut self, sequence: u64) {
        self.applied = Some(sequence);
    }

    pub(super) fn record(&self, key: &[u8]) -> Result<Option<AlarmRecord>, StoreError> {
        if let Some(record) = self.alarms.get(key) {
            return Ok(Some(*record));
        }
        match self.store.tree.get(key)? {
            Some(bytes) => codec::decode_record(&bytes)
                .map(Some)
                .map_err(|e| StoreError::codec(key, e)),
            None => Ok(None),
        }
    }

    /// Applies one status change. Creating an alarm beyond `max_alarms` for its user is
    /// refused and changes nothing.
    pub fn apply(
        &mut self,
        change: &StatusChange,
        max_alarms: usize,
    ) -> Result<Applied, StoreError> {
        let key = keys::alarm_key(&change.user_id, &change.alarm_id);
        let (record, changed) = match self.record(&key)? {
            Some(mut record) => {
                let changed = record.apply(change.observation);
                (record, changed)
            }
            None => {
                let prefix = keys::user_prefix(&change.user_id);
                let count = match self.user_counts.get(&prefix) {
                    Some(count) => *count,
                    None => self.user_alarm_count(&change.user_id, max_alarms)?,
                };
                if count >= max_alarms {
                    self.user_counts.insert(prefix, count);
                    return Ok(Applied::TooManyAlarms);
                }
                self.user_counts.insert(prefix, count + 1);
                (AlarmRecord::new(change.observation), true)
            }
        };
        if changed {
            self.alarms.insert(key, record);
            Ok(Applied::Changed)
        } else {
            Ok(Applied::Unchanged)
        }
    }

    /// The user's alarms, stored or created earlier in this batch, counted up to `cap`: only
    /// called when an event would create an alarm, and never scanning more than `cap` keys.
    pub(super) fn user_alarm_count(&self, user_id: &str, cap: usize) -> Result<usize, StoreError> {
        let prefix = keys::user_prefix(user_id);
        let mut count = 0;
        for item in self.store.tree.scan_prefix(&prefix).take(cap) {
            item?;
            count += 1;
        }
        for (key, _) in self.alarms.range(prefix.clone()..) {
            if !key.starts_with(&prefix) || count >= cap {
                break;
            }
            if !self.store.tree.contains_key(key)? {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Whether the request at this shard stream sequence was answered before (a redelivery).
    pub fn is_answered(&self, request_sequence: u64) -> Result<bool, StoreError> {
        let marker = keys::sequence_key(keys::REQUEST, request_sequence);
        Ok(self.answered.contains(&request_sequence) || self.store.tree.contains_key(marker)?)
    }

    /// The user's alarms as this batch sees them (its own writes first), in AlarmID order.
    pub fn user_alarms(&self, user_id: &str) -> Result<Vec<(String, AlarmRecord)>, StoreError> {
        let prefix = keys::user_prefix(user_id);
        let mut merged: BTreeMap<Vec<u8>, AlarmRecord> = BTreeMap::new();
        for item in self.store.tree.scan_prefix(&prefix) {
            let (key, value) = item?;
            let record = codec::decode_record(&value).map_err(|e| StoreError::codec(&key, e))?;
            merged.insert(key.to_vec(), record);
        }
        for (key, record) in self.alarms.range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            merged.insert(key.clone(), *record);
        }
        Ok(merged
            .into_iter()
            .map(|(key, record)| {
                (
                    String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
                    record,
                )
            })
            .collect())
    }

    /// Writes one alarm's record as it is now (a digest marked it sent).
    pub fn put(&mut self, user_id: &str, alarm_id: &str, record: AlarmRecord) {
        self.alarms
            .insert(keys::alarm_key(user_id, alarm_id), record);
    }

    /// Queues a digest's parts in the outbox, in order, under one digest id, and remembers
    /// the request (its shard stream sequence) as answered.
    pub fn queue_digest(
        &mut self,
        user_id: &str,
        request_sequence: u64,
        parts: Vec<QueuedPart>,
        written_at_ms: i64,
    ) {
        let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        let first = self.store.next_outbox + self.outbox.len() as u64;
        let digest_id = self.store.message_id(first);
        for (index, part) in parts.into_iter().enumerate() {
            let sequence = first + index as u64;
            self.outbox.push((
                sequence,
                OutboxEntry {
                    msg_id: self.store.message_id(sequence),
                    user_id: user_id.to_string(),
                    payload: part.payload,
                    alarm_count: u32::try_from(part.alarms).unwrap_or(u32::MAX),
                    digest_id: digest_id.clone(),
                    part: u32::try_from(index + 1).unwrap_or(u32::MAX),
                    parts: count,
                    written_at_ms: Some(written_at_ms),
                },
            ));
        }
        self.answered.insert(request_sequence);
    }

    /// Writes the whole batch atomically (not yet durable: flush next). Returns the digests
    /// queued by this batch.
    pub fn commit(self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let mut batch = sled::Batch::default();
        for (key, record) in &self.alarms {
            batch.insert(key.as_slice(), codec::encode_record(record));
        }
        for sequence in &self.answered {
            batch.insert(&keys::sequence_key(keys::REQUEST, *sequence), &[][..]);
        }
        let next_outbox = self.store.next_outbox + self.outbox.len() as u64;
        for (sequence, entry) in &self.outbox {
            batch.insert(
                &keys::sequence_key(keys::OUTBOX, *sequence),
                codec::encode_outbox(entry),
            );
        }
        if !self.outbox.is_empty() {
            batch.insert(keys::META_NEXT_OUTBOX, &next_outbox.to_be_bytes());
        }
        if let Some(applied) = self.applied {
            batch.insert(keys::META_APPLIED, &applied.to_be_bytes());
        }
        if let Err(error) = self.store.tree.apply_batch(batch) {
            self.store.failing.set(true);
            return Err(error.into());
        }
        self.store.next_outbox = next_outbox;
        if let Some(applied) = self.applied {
            self.store.applied = applied;
        }
        Ok(self.outbox)
    }
}

#[cfg(test)]
impl ShardWrite<'_> {
    pub(crate) fn apply_unlimited(&mut self, change: &StatusChange) -> Result<Applied, StoreError> {
        self.apply(change, usize::MAX)
    }
}
