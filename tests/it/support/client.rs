//! The producer's and the notification service's side of a test: publishing like
//! producers do, asking for digests, waiting until the service drained its input.

use std::time::{Duration, Instant};

use alarm_digest::bus::Topology;
use alarm_digest::config::Config;
use alarm_digest::load;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, Context};

use super::{DigestReader, WAIT};

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
        let messages = consumer.messages().await.expect("output messages");
        DigestReader::new(
            messages,
            self.js.clone(),
            &self.config.streams.output_stream,
        )
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
pub(super) async fn last_sequence(js: &Context, stream: &str) -> u64 {
    let what = format!("reading stream {stream}'s info");
    let stream = asking_again(&what, || js.get_stream(stream)).await;
    stream.cached_info().state.last_sequence
}
