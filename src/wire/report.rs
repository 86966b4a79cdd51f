//! What `inspect user` prints about a user's stored alarms (and `/inspect/user` answers).

use serde::{Deserialize, Serialize};

use super::format_time;
use crate::domain::AlarmRecord;

/// What `inspect user` prints.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserReport {
    pub user_id: String,
    pub shard: u16,
    pub alarms: Vec<AlarmReport>,
    /// Digests of this shard (any user) stored but not yet acknowledged by JetStream.
    pub pending_digests: usize,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AlarmReport {
    pub alarm_id: String,
    pub status: String,
    pub changed_at: String,
    pub sent_status: Option<String>,
    pub sent_changed_at: Option<String>,
    pub changed_since_sent: bool,
    pub due: bool,
}

impl UserReport {
    pub fn new(
        user_id: &str,
        shard: u16,
        alarms: &[(String, AlarmRecord)],
        pending: usize,
    ) -> Self {
        UserReport {
            user_id: user_id.to_string(),
            shard,
            alarms: alarms
                .iter()
                .map(|(alarm_id, record)| AlarmReport::new(alarm_id.clone(), record))
                .collect(),
            pending_digests: pending,
        }
    }
}

impl AlarmReport {
    fn new(alarm_id: String, record: &AlarmRecord) -> AlarmReport {
        AlarmReport {
            alarm_id,
            status: record.current.status.as_str().into(),
            changed_at: format_time(&record.current.changed_at),
            sent_status: record.sent.map(|s| s.status.as_str().into()),
            sent_changed_at: record.sent.map(|s| format_time(&s.changed_at)),
            changed_since_sent: record.changed_since_sent,
            due: record.is_due(),
        }
    }
}
