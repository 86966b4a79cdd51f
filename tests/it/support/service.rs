//! alarm-digest instances in this process, through the library: their config, a test bed
//! (broker, data dir, client), and waiting for what `/readyz` says.

use std::path::Path;
use std::time::{Duration, Instant};

use alarm_digest::config::Config;
use alarm_digest::service::{self, RunningService};

use super::{http_get, NatsServer, TestClient};

pub const WAIT: Duration = Duration::from_secs(30);

/// Config for a test instance: its own data dir, an ephemeral HTTP port, 4 shards, and a
/// short ack wait so redeliveries after a kill happen within the test.
pub fn test_config(nats: &NatsServer, data_dir: &Path) -> Config {
    test_config_at(&nats.url(), data_dir)
}

/// `test_config` for servers given by URL (a server list, for a cluster).
pub fn test_config_at(url: &str, data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.nats.url = url.to_string();
    config.storage.path = data_dir.to_path_buf();
    config.storage.cache_capacity_mb = 16;
    config.http.listen = "127.0.0.1:0".into();
    config.shards.count = 4;
    // A killed instance's lease expires within 3 s, so restarts in tests wait little.
    config.shards.lease_secs = 3;
    config.tuning.ack_wait_secs = 5;
    config.shutdown.grace_secs = 10;
    config
}

/// What most tests start with: their own broker, a data dir, a config for both, and a
/// client that has created the streams. Destructure it to keep the names:
/// `let TestBed { nats, data, config, client } = TestBed::start().await;`
pub struct TestBed {
    pub nats: NatsServer,
    pub data: tempfile::TempDir,
    pub config: Config,
    pub client: TestClient,
}

impl TestBed {
    pub async fn start() -> TestBed {
        TestBed::start_with(|_| {}).await
    }

    /// Like `start`, with the config adjusted before anything connects.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestBed {
        let nats = NatsServer::start();
        let data = tempfile::tempdir().expect("data dir");
        let mut config = test_config(&nats, data.path());
        configure(&mut config);
        let client = TestClient::connect(&config).await;
        TestBed {
            nats,
            data,
            config,
            client,
        }
    }
}

/// Logs of in-process instances go to the test's output, filtered by `RUST_LOG` (off
/// unless set), so a failing test can be rerun with `RUST_LOG=alarm_digest=debug`.
fn init_test_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Starts an instance in-process without waiting for readiness (for instances expected to
/// refuse a shard).
pub async fn start_service_unready(config: Config) -> RunningService {
    init_test_logging();
    service::start(config).await.expect("service starts")
}

/// Starts an instance in-process and waits until `/readyz` says ready.
pub async fn start_service(config: Config) -> RunningService {
    let service = start_service_unready(config).await;
    wait_ready(&service.http_addr.to_string()).await;
    service
}

pub async fn wait_ready(http: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match http_get(http, "/readyz").await {
            Ok((200, _)) => return,
            Ok((_, body)) => body,
            Err(error) => error.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "instance at {http} not ready within {WAIT:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the instance holds and consumes every shard it owns: ready, and a standby for
/// none (a standby counts as ready too).
pub async fn wait_holding(http: &str) {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Ok((code, body)) = http_get(http, "/readyz").await {
            if code == 200 && !body.contains("standby for:") {
                return;
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "instance at {http} did not take every shard it owns within {WAIT:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/readyz` answers 503 naming a shard (one that holds work it cannot finish).
pub async fn wait_shard_not_ready(http: &str) -> String {
    wait_shard_blocked_by(http, "").await
}

/// Waits until `/readyz` answers 503 naming a shard with a reason containing `reason`. A
/// shard passes through other states on the way (a fetch failing right after a pause), so
/// the first 503 alone proves nothing about why.
pub async fn wait_shard_blocked_by(http: &str, reason: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Ok((503, body)) = http_get(http, "/readyz").await {
            if body.contains("shard") && body.contains(reason) {
                return body;
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "{http} never reported a shard blocked by {reason:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/readyz` names a shard this instance is a standby for, its note containing
/// `reason` (a standby that follows counts as ready, so any status); returns the body.
pub async fn wait_standby(http: &str, reason: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Ok((_, body)) = http_get(http, "/readyz").await {
            let standbys = body
                .lines()
                .find(|line| line.starts_with("standby for:"))
                .unwrap_or_default();
            if standbys.contains(reason) {
                return body;
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "{http} never reported a standby {reason:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
