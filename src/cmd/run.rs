//! `alarm-digest run`: the daemon.

use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::service;

/// What a stop may take beyond `shutdown.grace_secs`: the flusher's and the final flush's
/// bounds, the acks' flush, and a margin.
const STOP_BEYOND_GRACE: Duration = Duration::from_secs(20);

/// Once the stop begins, ends the process if it has not ended within `bound`: a store call
/// that never returns (sled on a full or failed disk can block a flush, or the thread that
/// drops the last handle) must not keep a stopping instance alive, holding its leases,
/// until a supervisor kills it. Its own thread, so a blocked runtime cannot hold it up.
fn spawn_watchdog(
    shutdown: tokio_util::sync::CancellationToken,
    bound: Duration,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("alarm-digest-stop-watchdog".into())
        .spawn(move || {
            futures::executor::block_on(shutdown.cancelled());
            std::thread::sleep(bound);
            tracing::error!(
                bound_secs = bound.as_secs(),
                "the stop did not finish in time; exiting without the rest of the drain"
            );
            eprintln!(
                "alarm-digest: the stop did not finish within {}s (shutdown.grace_secs + {}s); \
                 exiting",
                bound.as_secs(),
                STOP_BEYOND_GRACE.as_secs()
            );
            std::process::exit(1);
        })?;
    Ok(())
}

/// Runs until SIGTERM or SIGINT, then drains within `shutdown.grace_secs`. A second signal
/// exits at once.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let grace = Duration::from_secs(config.shutdown.grace_secs);
    let service = service::start(config).await?;
    let shutdown = service.shutdown_token();
    spawn_watchdog(shutdown.clone(), grace + STOP_BEYOND_GRACE)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("signal received: draining; a second signal exits at once");
        shutdown.cancel();
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    service.wait().await?;
    Ok(ExitCode::SUCCESS)
}
