//! Watches this host's clock against the broker's: every [`EVERY`] it reads the broker's time
//! (`bus::clock`), exports the difference as `alarm_digest_clock_skew_seconds`, and past
//! [`WARN_AFTER`] says so in `/readyz` (the instance stays ready: no decision of the service
//! reads this clock, ARCHITECTURE.md, "One clock decides") and logs it once, and once more
//! when it is back within bounds.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

pub const EVERY: Duration = Duration::from_secs(10);
/// The skew `/readyz` and the log report, and the shipped alert fires on.
pub const WARN_AFTER: Duration = Duration::from_secs(30);

pub async fn run(shared: Shared, cancel: CancellationToken) {
    let stream = format!("KV_{}", shared.config.streams.leases_bucket);
    let mut warned = false;
    loop {
        match crate::bus::clock::read(&shared.js, &stream).await {
            Ok(reading) => {
                let skew = reading.skew.num_milliseconds() as f64 / 1000.0;
                shared.metrics.clock_skew.set(skew);
                let off = skew.abs() > WARN_AFTER.as_secs_f64();
                if off {
                    let side = if skew < 0.0 { "behind" } else { "ahead of" };
                    let text = format!(
                        "this host's clock is {:.0} s {side} the broker's (alarm_digest_clock_skew_seconds)",
                        skew.abs()
                    );
                    if !warned {
                        tracing::warn!(
                            skew_secs = skew,
                            broker_time = %reading.broker_now,
                            "this host's clock is off the broker's; decisions use the broker's \
                             time, but this host's logs and ages are off too: check its NTP"
                        );
                    }
                    shared.readiness.warn("clock", Some(text));
                } else {
                    if warned {
                        tracing::info!(
                            skew_secs = skew,
                            "this host's clock agrees with the broker's again"
                        );
                    }
                    shared.readiness.warn("clock", None);
                }
                warned = off;
            }
            Err(error) => tracing::debug!(%error, "could not read the broker's time"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}
