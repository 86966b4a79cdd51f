//! The store's contract: batches, digests, the outbox, the sweep, export and restore.

use super::*;
use crate::domain::{Observation, Status};

pub(crate) fn change(user: &str, alarm: &str, status: Status, secs: i64) -> StatusChange {
    StatusChange {
        user_id: user.into(),
        alarm_id: alarm.into(),
        observation: Observation {
            status,
            changed_at: chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default(),
        },
    }
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
