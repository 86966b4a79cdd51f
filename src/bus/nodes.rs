//! A connection to each broker node of a cluster, so a partition's router reads through the
//! node that leads its consumer: its pulls, the deliveries and the acks then cross no route
//! between nodes, which would cost a second node as much again (docs/cluster.md).
//!
//! One connection per server the configuration lists or the cluster advertises
//! (`connect_urls`), each preferring its own server and failing over to the others like any
//! connection. Which node a connection is on is read from it when asked, never assumed. With
//! one server, or `nats.connect_to_leaders = false`, nothing is opened.

use std::collections::BTreeSet;

use async_nats::{Client, ServerAddr, ServerInfo};

use crate::config::NatsConfig;

#[derive(Default)]
pub struct Nodes {
    clients: Vec<Client>,
}

impl Nodes {
    pub fn none() -> Nodes {
        Nodes::default()
    }

    /// Connects to every server `config` names or `seen` (the server one connection found)
    /// advertises. A server that does not answer now is left out: reads through it go over
    /// the instance's other connection.
    pub async fn connect(config: &NatsConfig, seen: &ServerInfo) -> Nodes {
        if !config.connect_to_leaders {
            return Nodes::none();
        }
        let servers = every_server(config, seen);
        if servers.len() < 2 {
            return Nodes::none();
        }
        let mut clients = Vec::with_capacity(servers.len());
        for first in 0..servers.len() {
            // Its own server first, then the rest in order: it returns there when it can.
            let mut order = servers.clone();
            order.rotate_left(first);
            let options = match super::connect::options(config).await {
                Ok(options) => options.retain_servers_order(),
                Err(error) => {
                    tracing::debug!(%error, "no connection per broker node");
                    return Nodes::none();
                }
            };
            match options.connect(order.as_slice()).await {
                Ok(client) => clients.push(client),
                Err(error) => {
                    tracing::debug!(server = ?servers[first], %error, "broker node not reached; reading through another connection")
                }
            }
        }
        tracing::info!(
            servers = servers.len(),
            connected = clients.len(),
            "a connection per broker node: each input partition is read on its leader's node"
        );
        Nodes { clients }
    }

    /// A connection on the server named `name` now, if one is.
    pub fn on(&self, name: &str) -> Option<Client> {
        self.clients
            .iter()
            .find(|client| {
                client.connection_state() == async_nats::connection::State::Connected
                    && client.server_info().server_name == name
            })
            .cloned()
    }
}

/// The configured servers and the advertised ones, each once (by host and port).
fn every_server(config: &NatsConfig, seen: &ServerInfo) -> Vec<ServerAddr> {
    let configured = config.servers().unwrap_or_default();
    let advertised = seen
        .connect_urls
        .iter()
        .filter_map(|url| url.parse::<ServerAddr>().ok());
    let mut known = BTreeSet::new();
    configured
        .into_iter()
        .chain(advertised)
        .filter(|server| known.insert((server.host().to_string(), server.port())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_server_is_reached_once_however_it_is_written() {
        let config = NatsConfig {
            url: "nats://127.0.0.1:4222, nats://127.0.0.1:4223".into(),
            ..NatsConfig::default()
        };
        let seen = ServerInfo {
            connect_urls: vec![
                "127.0.0.1:4222".into(),
                "127.0.0.1:4224".into(),
                "not a url at all".into(),
            ],
            ..ServerInfo::default()
        };
        let ports: Vec<u16> = every_server(&config, &seen)
            .iter()
            .map(ServerAddr::port)
            .collect();
        assert_eq!(ports, [4222, 4223, 4224]);
    }
}
