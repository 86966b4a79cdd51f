use std::ops::Range;

use chrono::{DateTime, Utc};

use super::{AlarmRecord, Status};

/// One alarm as a digest reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestEntry {
    pub alarm_id: String,
    pub status: Status,
    pub latest_changed_at: DateTime<Utc>,
}

/// Selects the alarms a digest must report for one user, ordered by `LatestChangedAt`
/// ascending (ties by AlarmID), and marks each of them sent in `alarms`.
///
/// Returns the entries and the indices into `alarms` whose records changed, so the caller
/// writes back only those.
pub fn take_digest(alarms: &mut [(String, AlarmRecord)]) -> (Vec<DigestEntry>, Vec<usize>) {
    let mut changed = Vec::new();
    let mut entries = Vec::new();
    for (index, (alarm_id, record)) in alarms.iter_mut().enumerate() {
        if record.is_due() {
            entries.push(DigestEntry {
                alarm_id: alarm_id.clone(),
                status: record.current.status,
                latest_changed_at: record.current.changed_at,
            });
            record.mark_sent();
            changed.push(index);
        }
    }
    entries.sort_by(|a, b| {
        (a.latest_changed_at, &a.alarm_id).cmp(&(b.latest_changed_at, &b.alarm_id))
    });
    (entries, changed)
}

/// How a digest's rendering is measured: every part costs `frame` bytes (the envelope around
/// the list), each entry its own size, and `separator` between two entries.
#[derive(Clone, Copy, Debug)]
pub struct PartBudget {
    pub frame: usize,
    pub separator: usize,
    /// The most a part may weigh, all included.
    pub max: usize,
}

/// Splits entries of the given rendered sizes into consecutive parts that each fit the budget,
/// keeping their order (part 1 holds the first entries). Greedy: a part takes entries while
/// the next one fits. An entry too large even alone gets a part of its own (the broker is then
/// the judge). No entries: one empty part, since an empty digest is still a digest.
pub fn split_into_parts(sizes: &[usize], budget: PartBudget) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut weight = budget.frame;
    for (index, size) in sizes.iter().enumerate() {
        let added = if index == start {
            *size
        } else {
            budget.separator + size
        };
        if index > start && weight + added > budget.max {
            parts.push(start..index);
            start = index;
            weight = budget.frame + size;
        } else {
            weight += added;
        }
    }
    parts.push(start..sizes.len());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Observation;
    use chrono::TimeZone;

    fn record(status: Status, secs: i64) -> AlarmRecord {
        AlarmRecord::new(Observation {
            status,
            changed_at: Utc.timestamp_opt(secs, 0).single().unwrap_or_default(),
        })
    }

    #[test]
    fn digest_holds_active_alarms_oldest_first_ties_by_alarm_id() {
        let mut alarms = vec![
            ("c".to_string(), record(Status::Critical, 30)),
            ("z".to_string(), record(Status::Warning, 10)),
            ("a".to_string(), record(Status::Warning, 10)),
            ("gone".to_string(), record(Status::Cleared, 5)),
        ];
        let (entries, changed) = take_digest(&mut alarms);
        let ids: Vec<&str> = entries.iter().map(|e| e.alarm_id.as_str()).collect();
        assert_eq!(ids, ["a", "z", "c"]);
        assert_eq!(changed, [0, 1, 2]);
    }

    #[test]
    fn parts_fill_up_to_the_budget_in_order() {
        let budget = PartBudget {
            frame: 10,
            separator: 1,
            max: 40,
        };
        // 10 + 10 + 1 + 10 + 1 + 10 = 42 > 40: two entries per part, then the rest.
        assert_eq!(
            split_into_parts(&[10, 10, 10, 10, 10], budget),
            vec![0..2, 2..4, 4..5]
        );
        assert_eq!(split_into_parts(&[], budget), vec![0..0]);
        assert_eq!(
            split_into_parts(&[5, 100, 5], budget),
            vec![0..1, 1..2, 2..3]
        );
    }

    #[test]
    fn second_digest_without_changes_is_empty() {
        let mut alarms = vec![("a".to_string(), record(Status::Warning, 10))];
        let _ = take_digest(&mut alarms);
        let (entries, changed) = take_digest(&mut alarms);
        assert!(entries.is_empty());
        assert!(changed.is_empty());
    }
}
