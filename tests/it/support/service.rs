//! alarm-digest instances (in-process through the library, or the real binary) and a client
//! that publishes like producers do and reads digests like the notification service does.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use alarm_digest::bus::Topology;
use alarm_digest::config::Config;
use alarm_digest::load;
use alarm_digest::service::{self, RunningService};
use alarm_digest::wire::AlarmDigest;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, Context};
use futures::StreamExt;

use super::NatsServer;

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

pub use alarm_digest::http::get as http_get;

/// Producer and notification-service side of a test.
pub struct TestClient {
    pub nats: async_nats::Client,
    pub js: Context,
    pub config: Config,
}

impl TestClient {
    /// Connects and creates the streams the way `alarm-digest setup` does, so a test can
    /// publish before any instance runs.
    pub async fn connect(config: &Config) -> TestClient {
        TestClient::connect_with(async_nats::ConnectOptions::new(), config).await
    }

    /// Like `connect`, with credentials or TLS for a server that requires them.
    pub async fn connect_with(options: async_nats::ConnectOptions, config: &Config) -> TestClient {
        let servers = config.nats.servers().expect("a valid server list");
        let nats = options.connect(servers).await.expect("connect to nats");
        let js = jetstream::new(nats.clone());
        // A cluster that just started answers "JetStream unavailable" until it has a leader.
        let topology = Topology::new(config.streams.clone(), config.shards.count);
        let deadline = Instant::now() + WAIT;
        while let Err(error) = topology.ensure_streams(&js).await {
            assert!(Instant::now() < deadline, "streams not created: {error}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        TestClient {
            nats,
            js,
            config: config.clone(),
        }
    }

    /// Publishes to an input subject and waits until the input stream stored it.
    pub async fn publish(&self, subject: &str, payload: impl Into<Vec<u8>>) {
        self.js
            .publish(subject.to_string(), payload.into().into())
            .await
            .expect("publish")
            .await
            .expect("stored in the input stream");
    }

    pub async fn status(&self, user: &str, alarm: &str, status: &str, changed_at: &str) {
        let payload = status_payload(user, alarm, status, changed_at);
        self.publish(&self.config.streams.status_subject.clone(), payload)
            .await;
    }

    pub async fn request_digest(&self, user: &str) {
        let payload = format!(r#"{{"UserID":"{user}"}}"#);
        self.publish(&self.config.streams.digest_request_subject.clone(), payload)
            .await;
    }

    /// The output stream's last sequence: how many digest messages were ever stored.
    pub async fn digests_stored(&self) -> u64 {
        last_sequence(&self.js, &self.config.streams.output_stream).await
    }

    /// Waits until the output stream has stored `count` digest messages in all. Consumer
    /// state alone does not show that every shard applied its log: a cluster that just lost
    /// a node was seen answering `0 pending, 0 unacknowledged` for a shard consumer whose
    /// worker was 1,000 messages behind, so an end-of-run check waits for the answers
    /// themselves.
    pub async fn wait_digests_stored(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let stored = self.digests_stored().await;
            if stored >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the output stream holds {stored} digests, not {count}, after 120s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reads every digest in the output stream from the start, in publish order.
    pub async fn digests(&self) -> DigestReader {
        self.reader(pull::Config {
            inactive_threshold: Duration::from_secs(120),
            ..Default::default()
        })
        .await
    }

    /// Like `digests`, through a durable consumer of the output stream, as a notification
    /// service that consumes durably would read them.
    pub async fn durable_digests(&self, durable: &str) -> DigestReader {
        self.reader(pull::Config {
            durable_name: Some(durable.into()),
            ..Default::default()
        })
        .await
    }

    async fn reader(&self, config: pull::Config) -> DigestReader {
        let stream = self
            .js
            .get_stream(&self.config.streams.output_stream)
            .await
            .expect("output stream");
        let consumer = stream
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                ..config
            })
            .await
            .expect("output consumer");
        DigestReader {
            messages: consumer.messages().await.expect("output messages"),
            js: self.js.clone(),
            stream: self.config.streams.output_stream.clone(),
            reached: 0,
        }
    }

    /// Waits until every consumer of the service (router and shard workers) has nothing
    /// pending and nothing unacknowledged. Judged from consumer state, not stream sizes: a
    /// broker killed mid-write can keep a WorkQueue message whose ack it already recorded.
    pub async fn wait_drained(&self) {
        // Every input partition stream there is, retired ones included.
        let topology = Topology::new(self.config.streams.clone(), self.config.shards.count);
        let existing = asking_again("listing the input partitions", || {
            topology.existing_partitions(&self.js)
        })
        .await;
        let inputs: Vec<String> = existing
            .into_iter()
            .map(|partition| topology.partition_stream(partition))
            .collect();
        let last = load::inputs_stored(&self.js, &inputs)
            .await
            .expect("input streams");
        let mut consumers = load::service_consumers(&self.config);
        for input in &inputs {
            let router = (input.clone(), self.config.streams.router_consumer.clone());
            if !consumers.contains(&router) {
                consumers.push(router);
            }
        }
        let limit = Duration::from_secs(90);
        if let Err(error) =
            load::wait_drained(&self.js, (&inputs, last), &consumers, (limit, limit)).await
        {
            let mut state = String::new();
            for (stream, consumer) in &consumers {
                if let Ok(stream) = self.js.get_stream_no_info(stream).await {
                    if let Ok(info) = stream.consumer_info(consumer).await {
                        state += &format!(
                            "\n{}: pending {} ack-pending {} redelivered {}",
                            info.stream_name,
                            info.num_pending,
                            info.num_ack_pending,
                            info.num_redelivered
                        );
                    }
                }
            }
            panic!("not drained: {error}{state}");
        }
    }

    /// Changes the output stream's settings, as an operator would with `nats stream edit`.
    pub async fn update_output_stream(
        &self,
        change: impl FnOnce(&mut async_nats::jetstream::stream::Config),
    ) {
        let mut stream = self
            .js
            .get_stream(&self.config.streams.output_stream)
            .await
            .expect("output stream");
        let mut config = stream.info().await.expect("info").config.clone();
        change(&mut config);
        self.js
            .update_stream(&config)
            .await
            .expect("output stream updated");
    }

    pub async fn stream_messages(&self, name: &str) -> u64 {
        let mut stream = self.js.get_stream(name).await.expect("stream");
        stream.info().await.expect("stream info").state.messages
    }
}

pub fn status_payload(user: &str, alarm: &str, status: &str, changed_at: &str) -> String {
    format!(
        r#"{{"AlarmID":"{alarm}","UserID":"{user}","Status":"{status}","ChangedAt":"{changed_at}"}}"#
    )
}

/// Asks the broker `ask` again for up to 60 s while it fails: a cluster that just lost a
/// node times out requests for a while.
pub async fn asking_again<
    T,
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
>(
    what: &str,
    ask: impl Fn() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ask().await {
            Ok(answer) => return answer,
            Err(error) if Instant::now() < deadline => {
                eprintln!("{what}: {error}; again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("{what}: {error}"),
        }
    }
}

/// A stream's last sequence.
async fn last_sequence(js: &Context, stream: &str) -> u64 {
    let what = format!("reading stream {stream}'s info");
    let stream = asking_again(&what, || js.get_stream(stream)).await;
    stream.cached_info().state.last_sequence
}

pub struct DigestReader {
    messages: pull::Stream,
    js: Context,
    /// The output stream's name.
    stream: String,
    /// The highest output stream sequence read.
    reached: u64,
}

impl DigestReader {
    pub async fn next(&mut self) -> AlarmDigest {
        let message = tokio::time::timeout(WAIT, self.messages.next())
            .await
            .expect("a digest within the wait")
            .expect("output stream open")
            .expect("digest message");
        if let Ok(info) = message.info() {
            self.reached = self.reached.max(info.stream_sequence);
        }
        serde_json::from_slice(&message.payload).expect("digest is valid JSON")
    }

    /// The next digest for `user`, skipping other users'.
    pub async fn next_for(&mut self, user: &str) -> AlarmDigest {
        loop {
            let digest = self.next().await;
            if digest.user_id == user {
                return digest;
            }
        }
    }

    /// Asserts no digest arrives within `wait`.
    pub async fn assert_none_within(&mut self, wait: Duration) {
        if let Ok(Some(Ok(message))) = tokio::time::timeout(wait, self.messages.next()).await {
            panic!(
                "unexpected digest: {}",
                String::from_utf8_lossy(&message.payload)
            );
        }
    }

    /// Reads every digest the output stream holds now that this reader has not read yet.
    ///
    /// Judged by the stream's last sequence, never by a quiet spell: on a loaded machine or a
    /// cluster that just lost a node, deliveries can pause for seconds, and the consumer's
    /// stream can yield a transient error (a missed heartbeat, a leader change) mid-way.
    pub async fn drain(&mut self) -> Vec<AlarmDigest> {
        let last = last_sequence(&self.js, &self.stream).await;
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut digests = Vec::new();
        let mut reached = self.reached;
        while reached < last {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.messages.next()).await {
                Ok(Some(Ok(message))) => {
                    if let Ok(info) = message.info() {
                        reached = reached.max(info.stream_sequence);
                    }
                    digests.push(
                        serde_json::from_slice(&message.payload).expect("digest is valid JSON"),
                    );
                }
                Ok(Some(Err(error))) => eprintln!("reading digests: {error}; reading on"),
                Ok(None) => panic!("the output consumer ended at sequence {reached} of {last}"),
                Err(_) => panic!(
                    "read the output stream up to sequence {reached} of {last} within 90s \
                     ({} digests)",
                    digests.len()
                ),
            }
        }
        self.reached = reached;
        digests
    }
}

/// One digest message as a plain subscriber received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub digest: AlarmDigest,
    pub msg_id: Option<String>,
    pub digest_id: Option<String>,
    /// `i/n`.
    pub part: Option<String>,
    /// Payload plus headers, as the server counts against `max_payload`.
    pub wire_bytes: usize,
}

/// A core NATS subscriber of the digest subject, as the notification service in the
/// challenge runs `nats sub AlarmDigest`: it sees what reaches the subject, not the stream.
pub struct PlainSubscriber {
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PlainSubscriber {
    pub async fn start(client: &TestClient) -> PlainSubscriber {
        let mut subscriber = client
            .nats
            .subscribe(client.config.streams.digest_subject.clone())
            .await
            .expect("subscribe");
        client.nats.flush().await.expect("subscription registered");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let header = |name: &str| {
                    message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.to_string())
                };
                let wire_bytes = message.length;
                let item = Received {
                    digest: serde_json::from_slice(&message.payload).expect("valid digest"),
                    msg_id: header("Nats-Msg-Id"),
                    digest_id: header("Alarm-Digest-Id"),
                    part: header("Alarm-Digest-Part"),
                    wire_bytes,
                };
                if let Ok(mut all) = sink.lock() {
                    all.push(item);
                }
            }
        });
        PlainSubscriber { received, task }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits until `done` holds for what arrived so far; returns it.
    pub async fn wait_until(&self, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + WAIT;
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "plain subscriber: condition not met; {} messages",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything received until nothing arrived for `quiet`.
    pub async fn settle(&self, quiet: Duration) -> Vec<Received> {
        let mut count = usize::MAX;
        loop {
            let received = self.received();
            if received.len() == count {
                return received;
            }
            count = received.len();
            tokio::time::sleep(quiet).await;
        }
    }
}

impl Drop for PlainSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How many times an alarm was reported again in the same status with the same
/// `LatestChangedAt`: the rules never do that, so every one is a duplicate delivery.
pub fn duplicate_alarms<'a>(digests: impl IntoIterator<Item = &'a AlarmDigest>) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    for digest in digests {
        for alarm in &digest.active_alarms {
            let key = (
                digest.user_id.clone(),
                alarm.alarm_id.clone(),
                alarm.status.clone(),
                alarm.latest_changed_at.clone(),
            );
            if !seen.insert(key) {
                duplicates += 1;
            }
        }
    }
    duplicates
}

/// The status each (user, alarm) was last reported with, over digests in publish order.
pub fn last_reported(digests: &[AlarmDigest]) -> HashMap<(String, String), String> {
    let mut last = HashMap::new();
    for digest in digests {
        for alarm in &digest.active_alarms {
            last.insert(
                (digest.user_id.clone(), alarm.alarm_id.clone()),
                alarm.status.clone(),
            );
        }
    }
    last
}

/// `(AlarmID, Status, LatestChangedAt)` triples of a digest, in its order.
pub fn entries(digest: &AlarmDigest) -> Vec<(String, String, String)> {
    digest
        .active_alarms
        .iter()
        .map(|a| {
            (
                a.alarm_id.clone(),
                a.status.clone(),
                a.latest_changed_at.clone(),
            )
        })
        .collect()
}

/// The real binary, configured through the documented environment variables.
pub struct ServiceProcess {
    child: Child,
    pub http: String,
}

impl ServiceProcess {
    pub fn spawn(nats: &NatsServer, data_dir: &Path, extra_env: &[(&str, &str)]) -> ServiceProcess {
        ServiceProcess::spawn_at(&nats.url(), data_dir, extra_env)
    }

    /// Against any server URL list (a cluster's).
    pub fn spawn_at(urls: &str, data_dir: &Path, extra_env: &[(&str, &str)]) -> ServiceProcess {
        let http = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_alarm-digest"));
        command
            .arg("run")
            .env_remove("ALARM_DIGEST_CONFIG")
            .env("ALARM_DIGEST_NATS__URL", urls)
            .env("ALARM_DIGEST_STORAGE__PATH", data_dir)
            .env("ALARM_DIGEST_HTTP__LISTEN", &http)
            .env("ALARM_DIGEST_SHARDS__COUNT", "4")
            .env("ALARM_DIGEST_SHARDS__LEASE_SECS", "3")
            .env("ALARM_DIGEST_TUNING__ACK_WAIT_SECS", "5")
            .env(
                "RUST_LOG",
                std::env::var("SERVICE_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // A hunt for a rare failure keeps each process's log in a file of its own.
        if let Ok(dir) = std::env::var("SERVICE_TEST_LOGS") {
            let name = format!("{}-{}.log", data_dir.display(), http).replace('/', "_");
            let file = std::fs::File::create(Path::new(&dir).join(name)).expect("log file");
            command.stderr(file);
        }
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn alarm-digest");
        ServiceProcess { child, http }
    }

    /// Whether the process is stopped (SIGSTOP): state `T` in `/proc/<pid>/stat`.
    pub fn is_stopped(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|stat| {
                let (_, after_name) = stat.rsplit_once(')')?;
                after_name
                    .split_whitespace()
                    .next()
                    .map(|state| state == "T")
            })
            .unwrap_or(false)
    }

    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill command");
        assert!(status.success());
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("alarm-digest did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs a one-shot subcommand (`dlq list`, ...) against `nats` with the tests' 4 shards;
/// returns (code, stdout, stderr).
pub fn cli_against(nats: &NatsServer, args: &[&str]) -> (Option<i32>, String, String) {
    let url = nats.url();
    run_binary(
        args,
        &[
            ("ALARM_DIGEST_NATS__URL", url.as_str()),
            ("ALARM_DIGEST_SHARDS__COUNT", "4"),
        ],
    )
}

/// Runs the binary to completion with the given args and env; returns (code, stderr).
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_alarm-digest"))
        .args(args)
        // A figment Jail in a test beside this one may have set it in this process.
        .env_remove("ALARM_DIGEST_CONFIG")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run alarm-digest");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
