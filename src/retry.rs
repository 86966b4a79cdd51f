//! Retrying transient failures with capped exponential backoff, interruptible by shutdown.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// An error `until_ok` can retry: it says whether trying again could help. Each adapter
/// implements it for its own error type; this module knows none of them.
pub trait Retryable: std::fmt::Display {
    /// A fatal error is returned at once; any other is logged and retried.
    fn is_fatal(&self) -> bool;
}

const FIRST: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(5);

/// Capped exponential backoff.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST }
    }
}

impl Backoff {
    /// Sleeps for the current delay and doubles it; returns false if shutdown came first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(CAP);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    pub fn current(&self) -> Duration {
        self.next
    }

    pub fn reset(&mut self) {
        self.next = FIRST;
    }
}

/// Runs `attempt` until it succeeds (`Ok(Some)`), fails fatally (`Err`), or shutdown is
/// requested (`Ok(None)`). Every transient failure is logged with what was being done.
pub async fn until_ok<T, E, F, Fut>(
    what: &str,
    cancel: &CancellationToken,
    mut attempt: F,
) -> Result<Option<T>, E>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        match attempt().await {
            Ok(value) => return Ok(Some(value)),
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) => {
                tracing::warn!(
                    message = "transient failure; retrying",
                    doing = what,
                    %error,
                    retry_in_ms = backoff.current().as_millis() as u64,
                );
                if !backoff.wait(cancel).await {
                    return Ok(None);
                }
            }
        }
    }
}
