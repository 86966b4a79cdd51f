use std::time::Duration;

use async_nats::jetstream::{self, Context};
use async_nats::{Client, ConnectOptions};
use tokio_util::sync::CancellationToken;

use super::BusError;
use crate::config::NatsConfig;
use crate::retry::until_ok;

pub(super) async fn options(config: &NatsConfig) -> Result<ConnectOptions, BusError> {
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
    let servers = config.servers().map_err(|problem| {
        BusError::Config(crate::config::ConfigError::Invalid {
            key: "nats.url",
            problem,
        })
    })?;
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
        let version = &client.server_info().version;
        tracing::info!(url = %config.url, server = %version, "connected to NATS");
        if !is_supported_server(version) {
            tracing::warn!(
                server = %version,
                oldest_supported = OLDEST_SUPPORTED_SERVER,
                "this nats-server is older than the oldest release alarm-digest supports: \
                 acknowledged events are not fsynced on a configurable interval before 2.10 \
                 and the compare-and-set writes that fence a former shard owner were hardened \
                 in 2.11; upgrade the server (README, Supported servers)"
            );
        }
    }
    Ok(client)
}

/// A clustered server with single-replica streams keeps every stream on one node: that
/// node's disk or power loss loses acknowledged messages the cluster could have kept (README,
/// Guarantees). Said once at start, since the operator chose it.
pub fn warn_if_single_replica_in_a_cluster(server: &async_nats::ServerInfo, replicas: usize) {
    if let Some(cluster) = server.cluster.as_deref().filter(|_| replicas < 3) {
        tracing::warn!(
            cluster,
            streams.replicas = replicas,
            "the NATS server is part of a cluster but streams.replicas is below 3: each \
             stream lives on {replicas} node(s), so losing that node's disk loses acknowledged \
             events and digests; production runs streams.replicas = 3"
        );
    }
}

/// The oldest nats-server release the service supports and CI tests (README, Supported
/// servers); `scripts/nats-server.sh` pins the patch release the suite runs on.
pub const OLDEST_SUPPORTED_SERVER: &str = "2.11.0";

/// Whether a server's reported version (`2.15.1`, `2.12.0-RC.1`, `v2.11.4`) is at least
/// [`OLDEST_SUPPORTED_SERVER`]. A version that cannot be read is given the benefit of the
/// doubt: the warning is advice, and a custom build's string says nothing about its age.
pub fn is_supported_server(version: &str) -> bool {
    let numbers = |v: &str| -> Option<(u64, u64, u64)> {
        let core = v.trim().trim_start_matches('v');
        let core = core.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        Some((
            parts.next()??,
            parts.next()??,
            parts.next().flatten().unwrap_or(0),
        ))
    };
    match (numbers(version), numbers(OLDEST_SUPPORTED_SERVER)) {
        (Some(have), Some(oldest)) => have >= oldest,
        _ => true,
    }
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

#[cfg(test)]
mod tests {
    use super::is_supported_server;

    #[test]
    fn servers_from_2_11_on_are_supported() {
        for version in [
            "2.11.0",
            "2.11.11",
            "2.15.1",
            "v2.12.0",
            "2.14.0-RC.2",
            "3.0.0",
        ] {
            assert!(is_supported_server(version), "{version}");
        }
        for version in ["2.9.10", "2.10.26", "v2.10.0-beta.1", "1.4.1"] {
            assert!(!is_supported_server(version), "{version}");
        }
        assert!(is_supported_server("custom-build"));
    }
}
