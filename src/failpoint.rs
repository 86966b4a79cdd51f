//! Fault points for the tests. Set `FAILPOINT_ALARM_DIGEST` (not under the `ALARM_DIGEST_`
//! prefix, which the config loader owns):
//! - `<name>`: the process aborts, as kill -9 would, the first time it reaches that point (the
//!   tests that kill it between two steps which must each be safe to stop after: storing a
//!   snapshot, purging the shard stream behind it);
//! - `pause:<name>`: the process stops itself (SIGSTOP, as a frozen VM or a long GC pause
//!   would) the first time it reaches that point, mid-write; the test wakes it with SIGCONT.
//!
//! Unset (always, outside those tests), each point is one comparison.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub const ENV: &str = "FAILPOINT_ALARM_DIGEST";

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}

/// Aborts the process here if `FAILPOINT_ALARM_DIGEST` names this point.
pub fn hit(name: &str) {
    if armed() == Some(name) {
        tracing::error!(failpoint = name, "{ENV} reached: aborting");
        std::process::abort();
    }
}

/// Stops the process here, once, if `FAILPOINT_ALARM_DIGEST` is `pause:<name>`.
pub fn pause(name: &str) {
    static PAUSED: AtomicBool = AtomicBool::new(false);
    let Some(point) = armed().and_then(|armed| armed.strip_prefix("pause:")) else {
        return;
    };
    if point == name && !PAUSED.swap(true, Ordering::SeqCst) {
        tracing::error!(failpoint = name, "{ENV} reached: stopping this process");
        // Stops the whole process before it returns, right here (a signal sent from another
        // process, `kill -STOP`, lands whenever the kernel delivers it: this thread could
        // finish the write first). Returns once the test sends SIGCONT.
        // SAFETY: raise() only signals the calling thread; SIGSTOP runs no handler.
        let raised = unsafe { libc::raise(libc::SIGSTOP) };
        tracing::error!(failpoint = name, raised, "woken up");
    }
}
