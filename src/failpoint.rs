//! Crash points for the tests that kill the service between two steps which must each be
//! safe to stop after (storing a snapshot, purging the shard stream behind it). Set
//! `FAILPOINT_ALARM_DIGEST=<name>` (not under the
//! `ALARM_DIGEST_` prefix, which the config loader owns) and the process aborts, as kill -9 would, the first time
//! it reaches that point. Unset (always, outside those tests), this is one comparison.

use std::sync::OnceLock;

pub const ENV: &str = "FAILPOINT_ALARM_DIGEST";

/// Aborts the process here if `FAILPOINT_ALARM_DIGEST` names this point.
pub fn hit(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()));
    if armed.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "{ENV} reached: aborting");
        std::process::abort();
    }
}
