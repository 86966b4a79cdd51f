//! The store's contract: batches, digests, the outbox, the sweep, export and restore.

use std::collections::HashSet;

use super::*;
use crate::domain::{Observation, Status};
use crate::wire::AlarmDigest;

fn change(user: &str, alarm: &str, status: Status, secs: i64) -> StatusChange {
    StatusChange {
        user_id: user.into(),
        alarm_id: alarm.into(),
        observation: Observation {
            status,
            changed_at: chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default(),
        },
    }
}

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
            write.digest("u", 7, &options(false)).expect("digest"),
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
        write.digest("u", 7, &options(false)).expect("digest"),
        DigestOutcome::AlreadyAnswered
    );
    assert_eq!(
        write.digest("u", 8, &options(false)).expect("digest"),
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
    let outcome = write.digest("u", 1, &small).expect("digest");
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
    write.digest("u", 1, &small).expect("digest");
    let queued = write.commit().expect("commit");
    assert!(queued.len() >= 2);
    let refused = vec![queued[1].clone()];
    let returned = shard.return_to_unsent(&refused).expect("return");
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
    write.digest("u", 2, &options(false)).expect("digest");
    let again = write.commit().expect("commit");
    assert_eq!(digest_ids(&again[0].1), digest_ids(&refused[0].1));
}

#[test]
fn creating_alarms_beyond_the_per_user_limit_is_refused_but_updates_are_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 8).expect("open");
    let mut shard = store.shard(0).expect("shard");
    let mut write = shard.begin();
    for n in 0..2 {
        let applied = write
            .apply(&change("u", &format!("a{n}"), Status::Warning, 1), 3)
            .expect("apply");
        assert_eq!(applied, Applied::Changed);
    }
    write.commit().expect("commit");
    // Two stored + one new in this batch reach the limit of three.
    let mut write = shard.begin();
    assert_eq!(
        write
            .apply(&change("u", "a2", Status::Warning, 1), 3)
            .expect("apply"),
        Applied::Changed
    );
    assert_eq!(
        write
            .apply(&change("u", "a3", Status::Warning, 1), 3)
            .expect("apply"),
        Applied::TooManyAlarms
    );
    assert_eq!(
        write
            .apply(&change("u", "a0", Status::Critical, 2), 3)
            .expect("apply"),
        Applied::Changed
    );
    assert_eq!(
        write
            .apply(&change("other", "a3", Status::Warning, 1), 3)
            .expect("apply"),
        Applied::Changed
    );
}

#[test]
fn skip_empty_queues_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 8).expect("open");
    let mut shard = store.shard(0).expect("shard");
    let mut write = shard.begin();
    assert_eq!(
        write.digest("nobody", 1, &options(true)).expect("digest"),
        DigestOutcome::SkippedEmpty
    );
    assert!(write.commit().expect("commit").is_empty());
}

#[test]
fn shard_count_is_recorded_once_and_a_change_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 8).expect("open");
    store.check_shard_count(16).expect("first start records it");
    store.check_shard_count(16).expect("same count is fine");
    let error = store.check_shard_count(8).expect_err("changed count");
    assert!(error.to_string().contains("holds 16 shards"), "{error}");
}

#[test]
fn the_sweep_removes_only_expired_tombstones_a_page_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 8).expect("open");
    let mut shard = store.shard(0).expect("shard");
    let day = 86_400;
    let mut write = shard.begin();
    for n in 0..25 {
        // Old cleared, recent cleared, old critical: only the first kind may go.
        write
            .apply_unlimited(&change(
                "u",
                &format!("old-cleared-{n:02}"),
                Status::Cleared,
                day,
            ))
            .expect("apply");
        write
            .apply_unlimited(&change(
                "u",
                &format!("new-cleared-{n:02}"),
                Status::Cleared,
                9 * day,
            ))
            .expect("apply");
        write
            .apply_unlimited(&change(
                "u",
                &format!("old-critical-{n:02}"),
                Status::Critical,
                day,
            ))
            .expect("apply");
    }
    write.commit().expect("commit");
    // The injected clock: day 10, so day 1 is past a 7-day retention and day 9 is not.
    let now = chrono::DateTime::from_timestamp(10 * day, 0).unwrap_or_default();
    let week = chrono::Duration::days(7);
    let (mut removed, mut cursor, mut steps) = (0, None, 0);
    loop {
        let (count, next) = shard
            .sweep_cleared(cursor.as_deref(), 10, now, week)
            .expect("sweep");
        removed += count;
        steps += 1;
        match next {
            Some(key) => cursor = Some(key),
            None => break,
        }
    }
    assert_eq!(removed, 25);
    assert_eq!(steps, 8, "75 alarms in pages of 10");
    let left = shard.user_alarms("u").expect("alarms");
    assert_eq!(left.len(), 50);
    assert!(left.iter().all(|(id, _)| !id.starts_with("old-cleared")));
}

#[test]
fn answered_markers_are_pruned_up_to_the_ack_floor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 8).expect("open");
    let mut shard = store.shard(0).expect("shard");
    let mut write = shard.begin();
    for sequence in [1, 2, 3] {
        write
            .digest("u", sequence, &options(false))
            .expect("digest");
    }
    write.commit().expect("commit");
    assert_eq!(shard.prune_answered(2).expect("prune"), 2);
    let mut write = shard.begin();
    assert_eq!(
        write.digest("u", 3, &options(false)).expect("digest"),
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
        write
            .digest(user, index as u64 + 1, &options(false))
            .expect("digest");
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
