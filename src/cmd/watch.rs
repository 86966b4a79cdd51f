//! `alarm-digest watch`: prints every `AlarmDigest` as it is published, one JSON per line,
//! as a plain subscriber of the notification service would see it.

use std::process::ExitCode;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::bus;
use crate::config::Config;

pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let cancel = CancellationToken::new();
    let Some(client) = bus::connect(&config.nats, &cancel).await? else {
        return Ok(ExitCode::from(130));
    };
    let mut digests = client
        .subscribe(config.streams.digest_subject.clone())
        .await?;
    eprintln!(
        "watching {} (Ctrl-C to stop)",
        config.streams.digest_subject
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            message = digests.next() => match message {
                Some(message) => println!("{}", String::from_utf8_lossy(&message.payload)),
                None => return Ok(ExitCode::SUCCESS),
            },
        }
    }
}
