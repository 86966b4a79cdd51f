//! Property tests of the rules: convergence under any delivery order, and digest invariants.

use chrono::{DateTime, Utc};
use proptest::prelude::*;

use super::{split_into_parts, take_digest, AlarmRecord, Observation, PartBudget, Status};

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Cleared),
        Just(Status::Warning),
        Just(Status::Critical)
    ]
}

/// Instants from a small range so exact ties are common.
fn observation() -> impl Strategy<Value = Observation> {
    (
        status(),
        0i64..20,
        prop_oneof![Just(0u32), 0u32..1_000_000_000],
    )
        .prop_map(|(status, secs, nanos)| Observation {
            status,
            changed_at: DateTime::<Utc>::from_timestamp(1_600_000_000 + secs, nanos)
                .unwrap_or_default(),
        })
}

/// Events with duplicates, paired with a permutation of the same multiset.
fn events_and_permutation() -> impl Strategy<Value = (Vec<Observation>, Vec<Observation>)> {
    prop::collection::vec(observation(), 1..24).prop_flat_map(|events| {
        // Duplicate a prefix to model redelivery.
        let doubled: Vec<Observation> = events
            .iter()
            .chain(events.iter().take(events.len() / 2))
            .copied()
            .collect();
        (Just(doubled.clone()), Just(doubled).prop_shuffle())
    })
}

fn fold(start: AlarmRecord, events: &[Observation]) -> AlarmRecord {
    events.iter().fold(start, |mut record, seen| {
        record.apply(*seen);
        record
    })
}

proptest! {
    #[test]
    fn any_order_of_any_multiset_converges((events, shuffled) in events_and_permutation()) {
        let a = fold(AlarmRecord::new(events[0]), &events[1..]);
        let b = fold(AlarmRecord::new(shuffled[0]), &shuffled[1..]);
        prop_assert_eq!(a, b);
        let newest = events.iter().max_by_key(|o| (o.changed_at, o.status)).copied();
        prop_assert_eq!(Some(a.current), newest);
    }

    #[test]
    fn after_a_digest_any_order_still_converges(
        first in observation(),
        (events, shuffled) in events_and_permutation(),
    ) {
        let mut sent = AlarmRecord::new(first);
        sent.mark_sent();
        prop_assert_eq!(fold(sent, &events), fold(sent, &shuffled));
    }

    /// Random interleavings of events and digests for a few alarms: a digest is sorted and
    /// holds only active alarms; an alarm is never sent twice without a status transition in
    /// between; and an active alarm whose status the user has not been told is always due.
    #[test]
    fn digests_are_sorted_active_and_never_repeat_without_a_transition(
        steps in prop::collection::vec(prop_oneof![
            3 => (0usize..4, observation()).prop_map(Some),
            1 => Just(None),
        ], 1..60),
    ) {
        let ids = ["a", "b", "c", "d"];
        let mut alarms: Vec<(String, Option<AlarmRecord>)> =
            ids.iter().map(|id| (id.to_string(), None)).collect();
        // Per alarm: the last status sent, and all events applied since it was sent.
        let mut last_sent: Vec<Option<Observation>> = vec![None; ids.len()];
        let mut since_sent: Vec<Vec<Observation>> = vec![Vec::new(); ids.len()];
        for step in steps {
            match step {
                Some((index, seen)) => {
                    let slot = &mut alarms[index].1;
                    match slot {
                        Some(record) => { record.apply(seen); }
                        None => *slot = Some(AlarmRecord::new(seen)),
                    }
                    since_sent[index].push(seen);
                }
                None => {
                    let mut present: Vec<(String, AlarmRecord)> = alarms
                        .iter()
                        .filter_map(|(id, r)| r.map(|r| (id.clone(), r)))
                        .collect();
                    let (entries, _) = take_digest(&mut present);
                    prop_assert!(entries.windows(2).all(|w|
                        (w[0].latest_changed_at, &w[0].alarm_id) <= (w[1].latest_changed_at, &w[1].alarm_id)));
                    prop_assert!(entries.iter().all(|e| e.status.is_active()));
                    for entry in &entries {
                        let index = ids.iter().position(|id| *id == entry.alarm_id).unwrap_or(0);
                        if let Some(previous) = last_sent[index] {
                            let transition = previous.status != entry.status
                                || since_sent[index].iter().any(|o|
                                    o.changed_at > previous.changed_at && o.status != previous.status);
                            prop_assert!(transition, "{} re-sent without a transition", entry.alarm_id);
                        }
                        last_sent[index] = Some(Observation {
                            status: entry.status,
                            changed_at: entry.latest_changed_at,
                        });
                        since_sent[index].clear();
                    }
                    for (id, record) in present {
                        let index = ids.iter().position(|i| *i == id).unwrap_or(0);
                        alarms[index].1 = Some(record);
                        // Nothing active is left untold.
                        if record.current.status.is_active() {
                            prop_assert_eq!(last_sent[index].map(|o| o.status), Some(record.current.status));
                        }
                    }
                }
            }
        }
    }

    /// Parts cover every entry once, in order; each fits the budget unless it is one entry
    /// too large alone; and no part could have taken the next part's first entry.
    #[test]
    fn parts_keep_order_cover_everything_and_fit(
        sizes in prop::collection::vec(1usize..300, 0..200),
        frame in 0usize..64,
        separator in 0usize..3,
        max in 1usize..2_000,
    ) {
        let budget = PartBudget { frame, separator, max };
        let parts = split_into_parts(&sizes, budget);
        let weight = |range: &std::ops::Range<usize>| {
            frame + sizes[range.clone()].iter().sum::<usize>()
                + separator * range.len().saturating_sub(1)
        };
        prop_assert!(!parts.is_empty());
        prop_assert_eq!(parts[0].start, 0);
        prop_assert_eq!(parts[parts.len() - 1].end, sizes.len());
        for pair in parts.windows(2) {
            prop_assert_eq!(pair[0].end, pair[1].start);
            let with_next = pair[0].start..pair[0].end + 1;
            prop_assert!(weight(&with_next) > max, "greedy: {:?} could take one more", pair[0]);
        }
        for part in &parts {
            prop_assert!(!part.is_empty() || sizes.is_empty());
            // Over budget only where nothing smaller exists: one entry too large alone, or
            // the one empty part of an empty digest whose frame alone is over.
            prop_assert!(weight(part) <= max || part.len() <= 1, "{:?} over budget", part);
        }
    }
}
