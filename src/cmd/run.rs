//! `alarm-digest run`: the daemon.

use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::service;

/// Runs until SIGTERM or SIGINT, then drains within `shutdown.grace_secs`. A second signal
/// exits at once.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let service = service::start(config).await?;
    let shutdown = service.shutdown_token();
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
