//! What `inspect user` prints about a user's stored alarms.

use super::*;

/// What `inspect user` prints.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct UserReport {
    pub user_id: String,
    pub shard: u16,
    pub alarms: Vec<AlarmReport>,
    /// Digests of this shard (any user) stored but not yet acknowledged by JetStream.
    pub pending_digests: usize,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AlarmReport {
    pub alarm_id: String,
    pub status: String,
    pub changed_at: String,
    pub sent_status: Option<String>,
    pub sent_changed_at: Option<String>,
    pub changed_since_sent: bool,
    pub due: bool,
}

impl AlarmReport {
    pub(super) fn new(alarm_id: String, record: &AlarmRecord) -> AlarmReport {
        AlarmReport {
            alarm_id,
            status: record.current.status.as_str().into(),
            changed_at: wire::format_time(&record.current.changed_at),
            sent_status: record.sent.map(|s| s.status.as_str().into()),
            sent_changed_at: record.sent.map(|s| wire::format_time(&s.changed_at)),
            changed_since_sent: record.changed_since_sent,
            due: record.is_due(),
        }
    }
}
