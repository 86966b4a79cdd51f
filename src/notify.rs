//! systemd's readiness protocol (`Type=notify`) through the `sd-notify` crate. Without
//! `$NOTIFY_SOCKET` (not under systemd) it does nothing.

pub use sd_notify::NotifyState;

/// Sends a state such as `Ready` or `Stopping`. Failures are logged, never fatal: the daemon
/// works the same without a supervisor listening.
pub fn notify(state: NotifyState) {
    let text = state.to_string();
    if let Err(error) = sd_notify::notify(&[state]) {
        tracing::warn!(%error, state = %text, "cannot notify systemd");
    }
}
