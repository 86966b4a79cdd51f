//! `alarm-digest publish <SUBJECT> <PAYLOAD>`: one plain NATS publish, exactly as producers
//! do, for trying the service by hand where the `nats` CLI is not installed.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::bus;
use crate::config::Config;

pub async fn run(config: Config, subject: &str, payload: &str) -> anyhow::Result<ExitCode> {
    let Some(client) = bus::connect(&config.nats, &CancellationToken::new()).await? else {
        return Ok(ExitCode::from(130));
    };
    client
        .publish(subject.to_string(), payload.to_string().into())
        .await?;
    client.flush().await?;
    Ok(ExitCode::SUCCESS)
}
