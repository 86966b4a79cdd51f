//! `alarm-digest publish <SUBJECT> <PAYLOAD>`: one publish as a careful producer makes it,
//! for trying the service by hand: through JetStream, waiting for the stream's PubAck, so a
//! message the server did not store is an error, not a silent loss (a plain `nats pub` is
//! at-most-once when the server sheds load or a stream elects a leader).

use std::process::ExitCode;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::bus;
use crate::config::Config;

pub async fn run(config: Config, subject: &str, payload: &str) -> anyhow::Result<ExitCode> {
    let Some(client) = bus::connect(&config.nats, &CancellationToken::new()).await? else {
        return Ok(ExitCode::from(130));
    };
    let js = bus::jetstream(client, 1);
    let stored = js
        .publish(subject.to_string(), payload.to_string().into())
        .await
        .with_context(|| format!("publishing to {subject}"))?
        .await
        .with_context(|| {
            format!("{subject}: not stored (no stream captures the subject, or it refused)")
        })?;
    eprintln!(
        "stored in {} at sequence {}",
        stored.stream, stored.sequence
    );
    Ok(ExitCode::SUCCESS)
}
