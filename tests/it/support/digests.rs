//! Reading digests back: from the output stream (a durable reader) or as a plain subscriber
//! sees them, and what they say.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use alarm_digest::wire::AlarmDigest;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::Context;
use futures::StreamExt;

use super::client::last_sequence;
use super::{TestClient, WAIT};

pub struct DigestReader {
    messages: pull::Stream,
    js: Context,
    /// The output stream's name.
    stream: String,
    /// The highest output stream sequence read.
    reached: u64,
}

impl DigestReader {
    /// Reads `messages`, a consumer of the output stream `stream`.
    pub fn new(messages: pull::Stream, js: Context, stream: &str) -> DigestReader {
        DigestReader {
            messages,
            js,
            stream: stream.to_string(),
            reached: 0,
        }
    }

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
