use chrono::{DateTime, Utc};

/// An alarm's status. The declaration order is the severity order, which breaks exact ties of
/// `ChangedAt` so every delivery order converges to the same state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    Cleared,
    Warning,
    Critical,
}

impl Status {
    /// Active alarms are the ones a digest reports.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Warning | Status::Critical)
    }

    /// The wire spelling, as monitoring agents publish it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Cleared => "CLEARED",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        match text {
            "CLEARED" => Some(Status::Cleared),
            "WARNING" => Some(Status::Warning),
            "CRITICAL" => Some(Status::Critical),
            _ => None,
        }
    }
}

/// One reported status of an alarm at an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub status: Status,
    pub changed_at: DateTime<Utc>,
}

impl Observation {
    /// Total order of observations: the newest instant wins, and on an exact tie the higher
    /// severity wins. Equal observations are duplicates.
    fn supersedes(&self, other: &Observation) -> bool {
        (self.changed_at, self.status) > (other.changed_at, other.status)
    }
}

/// A validated `AlarmStatusChanged` event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusChange {
    pub user_id: String,
    pub alarm_id: String,
    pub observation: Observation,
}

impl StatusChange {
    /// Whether the event claims a time further ahead of `now` than `max_skew` allows. Such an
    /// event would win over every honest later one (newest ChangedAt wins), so a single agent
    /// with a wrong clock could silence its alarm for good.
    pub fn is_from_the_future(&self, now: DateTime<Utc>, max_skew: chrono::Duration) -> bool {
        now.checked_add_signed(max_skew)
            .is_some_and(|limit| self.observation.changed_at > limit)
    }
}

/// Everything remembered about one (UserID, AlarmID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlarmRecord {
    /// The newest observation seen, whatever order events arrived in.
    pub current: Observation,
    /// What the last digest that contained this alarm reported.
    pub sent: Option<Observation>,
    /// Whether an observation newer than `sent` with a different status has been seen since.
    /// It lets CRITICAL → digest → CLEARED → CRITICAL be sent again even when the CLEARED event
    /// arrives after the second CRITICAL (the broker reorders).
    pub changed_since_sent: bool,
}

impl AlarmRecord {
    pub fn new(first: Observation) -> AlarmRecord {
        AlarmRecord {
            current: first,
            sent: None,
            changed_since_sent: false,
        }
    }

    /// Applies one observation and reports whether the record changed (so the caller knows
    /// whether a write is needed). Applying the same set of observations in any order, with
    /// any duplicates, yields the same record.
    pub fn apply(&mut self, seen: Observation) -> bool {
        let mut changed = false;
        if seen.supersedes(&self.current) {
            self.current = seen;
            changed = true;
        }
        if let Some(sent) = self.sent {
            if !self.changed_since_sent
                && seen.changed_at > sent.changed_at
                && seen.status != sent.status
            {
                self.changed_since_sent = true;
                changed = true;
            }
        }
        changed
    }

    /// Whether the next digest must contain this alarm: it is active and the user has not been
    /// sent it in its current status since its last transition.
    pub fn is_due(&self) -> bool {
        if !self.current.status.is_active() {
            return false;
        }
        match self.sent {
            None => true,
            Some(sent) => sent.status != self.current.status || self.changed_since_sent,
        }
    }

    pub fn mark_sent(&mut self) {
        self.sent = Some(self.current);
        self.changed_since_sent = false;
    }

    /// The digest that carried this alarm never reached the broker (it refused it for good):
    /// the next digest must carry it again, if it is still active.
    pub fn mark_unsent(&mut self) {
        self.changed_since_sent = true;
    }

    /// A CLEARED alarm is kept as a tombstone, so a late redelivery of an older CRITICAL
    /// cannot resurrect it, until its ChangedAt is older than `cleared_after` before `now`.
    /// Only then may it be forgotten.
    pub fn is_expired(&self, now: DateTime<Utc>, cleared_after: chrono::Duration) -> bool {
        self.current.status == Status::Cleared && self.current.changed_at < now - cleared_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn obs(status: Status, secs: i64) -> Observation {
        Observation {
            status,
            changed_at: Utc.timestamp_opt(secs, 0).single().unwrap_or_default(),
        }
    }

    #[test]
    fn newer_event_wins_and_older_one_never_overwrites() {
        let mut record = AlarmRecord::new(obs(Status::Warning, 10));
        assert!(record.apply(obs(Status::Critical, 20)));
        assert!(!record.apply(obs(Status::Cleared, 15)));
        assert_eq!(record.current, obs(Status::Critical, 20));
    }

    #[test]
    fn exact_tie_is_broken_by_severity_in_either_order() {
        let mut a = AlarmRecord::new(obs(Status::Warning, 10));
        a.apply(obs(Status::Critical, 10));
        let mut b = AlarmRecord::new(obs(Status::Critical, 10));
        b.apply(obs(Status::Warning, 10));
        assert_eq!(a, b);
        assert_eq!(a.current.status, Status::Critical);
    }

    #[test]
    fn duplicate_changes_nothing() {
        let mut record = AlarmRecord::new(obs(Status::Warning, 10));
        assert!(!record.apply(obs(Status::Warning, 10)));
    }

    #[test]
    fn same_status_reported_again_is_not_due_after_a_digest() {
        let mut record = AlarmRecord::new(obs(Status::Warning, 10));
        assert!(record.is_due());
        record.mark_sent();
        record.apply(obs(Status::Warning, 20));
        assert!(!record.is_due());
    }

    #[test]
    fn cleared_then_critical_again_is_due_whatever_the_arrival_order() {
        let mut in_order = AlarmRecord::new(obs(Status::Critical, 10));
        in_order.mark_sent();
        in_order.apply(obs(Status::Cleared, 20));
        in_order.apply(obs(Status::Critical, 30));

        let mut reordered = AlarmRecord::new(obs(Status::Critical, 10));
        reordered.mark_sent();
        reordered.apply(obs(Status::Critical, 30));
        assert!(!reordered.is_due(), "no transition seen yet");
        reordered.apply(obs(Status::Cleared, 20));

        assert!(in_order.is_due());
        assert!(reordered.is_due());
        assert_eq!(in_order, reordered);
    }

    #[test]
    fn stale_event_older_than_the_sent_one_is_no_transition() {
        let mut record = AlarmRecord::new(obs(Status::Critical, 10));
        record.mark_sent();
        record.apply(obs(Status::Cleared, 5));
        assert!(!record.is_due());
    }

    #[test]
    fn only_cleared_alarms_older_than_the_retention_expire() {
        let week = chrono::Duration::days(7);
        let now = Utc
            .timestamp_opt(100 * 86_400, 0)
            .single()
            .unwrap_or_default();
        let days_ago = |days: i64| (now - chrono::Duration::days(days)).timestamp();
        assert!(AlarmRecord::new(obs(Status::Cleared, days_ago(8))).is_expired(now, week));
        assert!(!AlarmRecord::new(obs(Status::Cleared, days_ago(6))).is_expired(now, week));
        assert!(!AlarmRecord::new(obs(Status::Critical, days_ago(30))).is_expired(now, week));
    }

    #[test]
    fn cleared_alarm_is_never_due() {
        let record = AlarmRecord::new(obs(Status::Cleared, 10));
        assert!(!record.is_due());
    }
}
