//! Answering a digest request inside a batch: the product decision (`domain::take_digest`),
//! its rendering (`wire`), and the store's overlay that keeps both in one atomic write.

use crate::domain;
use crate::store::{OutboxEntry, QueuedPart, RefusedPart, ShardWrite, StoreError};
use crate::wire;

/// How digests are written.
#[derive(Debug, Clone)]
pub struct DigestOptions {
    /// Nothing to report: write nothing (`digest.skip_empty`).
    pub skip_empty: bool,
    /// The most one part's payload may weigh: what the broker accepts, less room for headers.
    pub max_part_bytes: usize,
    /// Recorded with each part, for the outbox age gauge.
    pub written_at: chrono::DateTime<chrono::Utc>,
}

/// Result of answering one digest request inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestOutcome {
    /// A digest was written to the outbox, in this many parts.
    Queued { alarms: usize, parts: usize },
    /// Nothing to report and `digest.skip_empty` is on.
    SkippedEmpty,
    /// This request (same shard stream sequence) was answered before: a redelivery.
    AlreadyAnswered,
}

/// Answers a digest request: selects what is due, marks it sent and queues the digest in
/// the outbox, split into parts that each fit `options.max_part_bytes`, all in `write`.
/// `request_sequence` is the request's shard stream sequence, remembered so a redelivery is
/// not answered twice.
pub fn answer(
    write: &mut ShardWrite<'_>,
    user_id: &str,
    request_sequence: u64,
    options: &DigestOptions,
) -> Result<DigestOutcome, StoreError> {
    if write.is_answered(request_sequence)? {
        return Ok(DigestOutcome::AlreadyAnswered);
    }
    let mut alarms = write.user_alarms(user_id)?;
    let (entries, changed) = domain::take_digest(&mut alarms);
    if entries.is_empty() && options.skip_empty {
        return Ok(DigestOutcome::SkippedEmpty);
    }
    for index in changed {
        let (alarm_id, record) = &alarms[index];
        write.put(user_id, alarm_id, *record);
    }
    let parts: Vec<QueuedPart> =
        wire::encode_digest_parts(user_id, &entries, options.max_part_bytes)
            .into_iter()
            .map(|part| QueuedPart {
                payload: part.payload,
                alarms: part.alarms,
            })
            .collect();
    let count = parts.len();
    write.queue_digest(
        user_id,
        request_sequence,
        parts,
        options.written_at.timestamp_millis(),
    );
    Ok(DigestOutcome::Queued {
        alarms: entries.len(),
        parts: count,
    })
}

/// A part the broker refused for good, with the alarms its payload carries: they go back
/// to unsent.
pub fn refused_part(sequence: u64, entry: &OutboxEntry) -> Result<RefusedPart, serde_json::Error> {
    let digest = wire::decode_digest(&entry.payload)?;
    Ok(RefusedPart {
        sequence,
        user_id: entry.user_id.clone(),
        alarm_ids: digest
            .active_alarms
            .into_iter()
            .map(|alarm| alarm.alarm_id)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    //! Answering against a real sled tree: what is queued, in what parts, and what a
    //! redelivery or a refusal leaves behind.

    use std::collections::HashSet;

    use super::*;
    use crate::domain::Status;
    use crate::store::tests::change;
    use crate::store::Store;
    use crate::wire::AlarmDigest;

    fn options(skip_empty: bool) -> DigestOptions {
        DigestOptions {
            skip_empty,
            max_part_bytes: 1024 * 1024,
            written_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
        }
    }

    fn digest_ids(entry: &OutboxEntry) -> Vec<String> {
        let digest: AlarmDigest = serde_json::from_slice(&entry.payload).expect("valid digest");
        digest
            .active_alarms
            .into_iter()
            .map(|a| a.alarm_id)
            .collect()
    }

    #[test]
    fn a_digest_sees_events_earlier_in_the_same_batch_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), 8).expect("open");
            let mut shard = store.shard(3).expect("shard");
            let mut write = shard.begin();
            write
                .apply_unlimited(&change("u", "a2", Status::Critical, 20))
                .expect("apply");
            write
                .apply_unlimited(&change("u", "a1", Status::Warning, 10))
                .expect("apply");
            write
                .apply_unlimited(&change("other", "x", Status::Warning, 5))
                .expect("apply");
            assert_eq!(
                answer(&mut write, "u", 7, &options(false)).expect("digest"),
                DigestOutcome::Queued {
                    alarms: 2,
                    parts: 1
                }
            );
            let queued = write.commit().expect("commit");
            assert_eq!(digest_ids(&queued[0].1), ["a1", "a2"]);
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path(), 8).expect("reopen");
        let mut shard = store.shard(3).expect("shard");
        assert_eq!(shard.pending_outbox().expect("outbox").len(), 1);
        let mut write = shard.begin();
        assert_eq!(
            answer(&mut write, "u", 7, &options(false)).expect("digest"),
            DigestOutcome::AlreadyAnswered
        );
        assert_eq!(
            answer(&mut write, "u", 8, &options(false)).expect("digest"),
            DigestOutcome::Queued {
                alarms: 0,
                parts: 1
            }
        );
        let queued = write.commit().expect("commit");
        assert_eq!(queued[0].0, 1, "outbox sequence continues after reopen");
        assert_ne!(
            queued[0].1.msg_id,
            shard.pending_outbox().expect("outbox")[0].1.msg_id
        );
    }

    #[test]
    fn a_digest_over_the_part_limit_is_queued_in_parts_with_one_digest_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(1).expect("shard");
        let mut write = shard.begin();
        for n in 0..100 {
            write
                .apply_unlimited(&change("u", &format!("alarm-{n:03}"), Status::Critical, n))
                .expect("apply");
        }
        let small = DigestOptions {
            max_part_bytes: 1_000,
            ..options(false)
        };
        let outcome = answer(&mut write, "u", 1, &small).expect("digest");
        let queued = write.commit().expect("commit");
        assert_eq!(
            outcome,
            DigestOutcome::Queued {
                alarms: 100,
                parts: queued.len()
            }
        );
        assert!(queued.len() > 5, "{} parts", queued.len());
        let mut ids = Vec::new();
        for (index, (_, entry)) in queued.iter().enumerate() {
            assert_eq!(entry.digest_id, queued[0].1.msg_id);
            assert_eq!(
                (entry.part as usize, entry.parts as usize),
                (index + 1, queued.len())
            );
            assert!(entry.payload.len() <= 1_000);
            ids.extend(digest_ids(entry));
        }
        let expected: Vec<String> = (0..100).map(|n| format!("alarm-{n:03}")).collect();
        assert_eq!(
            ids, expected,
            "every alarm once, oldest first across the parts"
        );
        let msg_ids: HashSet<&String> = queued.iter().map(|(_, e)| &e.msg_id).collect();
        assert_eq!(msg_ids.len(), queued.len(), "each part has its own Msg-Id");
    }

    #[test]
    fn a_refused_part_goes_back_to_unsent_so_the_next_digest_carries_its_alarms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let mut write = shard.begin();
        for n in 0..10 {
            write
                .apply_unlimited(&change("u", &format!("a{n}"), Status::Warning, n))
                .expect("apply");
        }
        let small = DigestOptions {
            max_part_bytes: 300,
            ..options(false)
        };
        answer(&mut write, "u", 1, &small).expect("digest");
        let queued = write.commit().expect("commit");
        assert!(queued.len() >= 2);
        let refused = [queued[1].clone()];
        let returned = shard
            .return_to_unsent(&[refused_part(refused[0].0, &refused[0].1).expect("readable")])
            .expect("return");
        assert_eq!(returned, digest_ids(&refused[0].1).len());
        let left: Vec<u64> = shard
            .pending_outbox()
            .expect("outbox")
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert!(
            !left.contains(&refused[0].0),
            "the refused part left the outbox"
        );
        let mut write = shard.begin();
        answer(&mut write, "u", 2, &options(false)).expect("digest");
        let again = write.commit().expect("commit");
        assert_eq!(digest_ids(&again[0].1), digest_ids(&refused[0].1));
    }

    #[test]
    fn skip_empty_queues_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let mut write = shard.begin();
        assert_eq!(
            answer(&mut write, "nobody", 1, &options(true)).expect("digest"),
            DigestOutcome::SkippedEmpty
        );
        assert!(write.commit().expect("commit").is_empty());
    }

    #[test]
    fn answered_markers_are_pruned_up_to_the_ack_floor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let mut write = shard.begin();
        for sequence in [1, 2, 3] {
            answer(&mut write, "u", sequence, &options(false)).expect("digest");
        }
        write.commit().expect("commit");
        assert_eq!(shard.prune_answered(2).expect("prune"), 2);
        let mut write = shard.begin();
        assert_eq!(
            answer(&mut write, "u", 3, &options(false)).expect("digest"),
            DigestOutcome::AlreadyAnswered
        );
    }

    #[test]
    fn a_standby_drops_the_digests_its_holder_published_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8).expect("open");
        let mut shard = store.shard(0).expect("shard");
        let mut write = shard.begin();
        for (index, user) in ["u1", "u2", "u3"].into_iter().enumerate() {
            write
                .apply_unlimited(&change(user, "a", Status::Critical, 10))
                .expect("apply");
            answer(&mut write, user, index as u64 + 1, &options(false)).expect("digest");
        }
        let queued = write.commit().expect("commit");
        let sequences: Vec<u64> = queued.iter().map(|(sequence, _)| *sequence).collect();
        assert_eq!(sequences.len(), 3);
        assert_eq!(shard.next_outbox(), sequences[2] + 1);

        // The holder says everything below the third part is published.
        assert_eq!(shard.drop_outbox_below(sequences[2]).expect("drop"), 2);
        let left: Vec<u64> = shard
            .pending_outbox()
            .expect("outbox")
            .into_iter()
            .map(|(sequence, _)| sequence)
            .collect();
        assert_eq!(left, vec![sequences[2]]);
        assert_eq!(shard.drop_outbox_below(sequences[2]).expect("again"), 0);
    }
}
