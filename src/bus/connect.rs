use std::time::Duration;

use async_nats::jetstream::{self, Context};
use async_nats::{Client, ConnectOptions};
use tokio_util::sync::CancellationToken;

use super::BusError;
use crate::config::NatsConfig;
use crate::retry::until_ok;

async fn options(config: &NatsConfig) -> Result<ConnectOptions, BusError> {
    let mut options = match &config.creds_file {
        Some(path) => ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|e| BusError::Credentials(format!("{}: {e}", path.display())))?,
        None => ConnectOptions::new(),
    };
    options = options
        .name(&config.name)
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        // Reconnect forever after the first connection; outages are ridden out.
        .max_reconnects(None);
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.expose().to_string());
    }
    let tls = &config.tls;
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if tls.required {
        options = options.require_tls(true);
    }
    Ok(options)
}

/// Connects, retrying with backoff until it works or `cancel` fires (then `Ok(None)`), so the
/// start order of the broker and the service does not matter. A server without JetStream is
/// fatal.
pub async fn connect(
    config: &NatsConfig,
    cancel: &CancellationToken,
) -> Result<Option<Client>, BusError> {
    // Validated config parses; a server list that does not is a config error, never retried.
    let servers = config.servers().map_err(BusError::Config)?;
    let client = until_ok("connecting to NATS", cancel, || async {
        options(config)
            .await?
            .connect(servers.as_slice())
            .await
            .map_err(|e| BusError::transient(format!("connecting to {}", config.url), e))
    })
    .await?;
    if let Some(client) = &client {
        if !client.server_info().jetstream {
            return Err(BusError::JetStreamDisabled(config.url.clone()));
        }
        tracing::info!(url = %config.url, "connected to NATS");
    }
    Ok(client)
}

/// The JetStream context every part publishes through. `max_in_flight` bounds un-awaited
/// PubAcks; with backpressure on, a publish waits rather than failing past it.
pub fn jetstream(client: Client, max_in_flight: usize) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(max_in_flight)
        .backpressure_on_inflight(true)
        .build(client)
}
