//! How `bench` publishes: the way a careful producer does, so that a broker that sheds load
//! (or stops) shows up as an error, never as an endless wait for messages it dropped.
//!
//! - Every message is a JetStream publish under its own `Nats-Msg-Id`, and counts once its
//!   PubAck arrives. At most `window` publishes wait for theirs.
//! - A refused or timed-out publish is retried under the same id (the stream drops a copy it
//!   already stored), and counted.
//! - When nothing at all has been acknowledged for `give_up_after`, the run ends with an error
//!   that says how many messages never were, from which one, and the broker's last answer.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream::{self, message::PublishMessage, Context};
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use super::Pacer;

/// How patient the producer is.
#[derive(Debug, Clone, Copy)]
pub struct ProducerOptions {
    /// Publishes waiting for their PubAck at once.
    pub window: usize,
    /// How long one publish waits for its PubAck before it is retried.
    pub ack_timeout: Duration,
    /// With nothing acknowledged for this long, the run fails.
    pub give_up_after: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            window: 2048,
            ack_timeout: Duration::from_secs(5),
            give_up_after: Duration::from_secs(30),
        }
    }
}

/// What the producers of one run have done so far; shared with the progress report.
#[derive(Debug)]
pub struct ProducerStats {
    acked: AtomicU64,
    retries: AtomicU64,
    started: Instant,
    /// Milliseconds after `started` of the newest PubAck.
    last_ack_ms: AtomicU64,
    last_refusal: Mutex<Option<String>>,
}

impl Default for ProducerStats {
    fn default() -> Self {
        ProducerStats {
            acked: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            started: Instant::now(),
            last_ack_ms: AtomicU64::new(0),
            last_refusal: Mutex::new(None),
        }
    }
}

impl ProducerStats {
    /// Messages the broker has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Publishes sent again after a refusal or a PubAck that did not come in time.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn note_ack(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        self.last_ack_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn note_refusal(&self, error: &impl std::fmt::Display) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_refusal.lock() {
            *last = Some(error.to_string());
        }
    }

    /// How long since the broker last acknowledged anything (or since the start).
    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ack_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn last_refusal(&self) -> String {
        self.last_refusal
            .lock()
            .ok()
            .and_then(|last| last.clone())
            .unwrap_or_else(|| "no answer".into())
    }
}

/// One `publish` call's messages: how many were acknowledged, which still wait.
#[derive(Default)]
struct Tally {
    acked: u64,
    waiting: std::collections::BTreeSet<u64>,
}

/// A producer: a JetStream context whose publishes wait `ack_timeout` for their PubAck, the
/// options, and the counters of its run.
#[derive(Clone)]
pub struct Producer {
    js: Context,
    options: ProducerOptions,
    stats: Arc<ProducerStats>,
    /// Ids are `<run>-<subject>-<index>`, unique to this process, so a rerun is not taken for
    /// duplicates.
    run: String,
}

impl Producer {
    pub fn new(
        client: &async_nats::Client,
        options: ProducerOptions,
        stats: Arc<ProducerStats>,
    ) -> Producer {
        let js = jetstream::ContextBuilder::new()
            .timeout(options.ack_timeout)
            .max_ack_inflight(options.window.max(1))
            .backpressure_on_inflight(true)
            .build(client.clone());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Producer {
            js,
            options,
            stats,
            run: format!("bench-{}-{nanos:x}", std::process::id()),
        }
    }

    pub fn stats(&self) -> &ProducerStats {
        &self.stats
    }

    /// Publishes `payload(i)` for every `i` in `range` to `subject`, paced to `rate` per
    /// second (0: as fast as the window allows), each acknowledged by the broker. `sent(i)` is
    /// called as message `i` first goes out (the digest latencies start there).
    pub async fn publish(
        &self,
        subject: &str,
        range: Range<u64>,
        rate: u64,
        payload: impl Fn(u64) -> String,
        sent: impl Fn(u64),
    ) -> anyhow::Result<()> {
        let total = range.end.saturating_sub(range.start);
        let pacer = Pacer::new(rate);
        let mut in_flight = FuturesUnordered::new();
        let mut tally = Tally::default();
        for (count, index) in range.enumerate() {
            while in_flight.len() >= self.options.window.max(1) {
                self.settle(in_flight.next().await, &mut tally, (subject, total))?;
            }
            sent(index);
            tally.waiting.insert(index);
            in_flight.push(self.publish_one(subject, index, payload(index)));
            // Drive what is in flight while waiting for the next one's time: a publish is a
            // future, and one never polled is never sent. (Unpolled until the window filled,
            // paced requests all went out at the end of the run, and their latencies grew
            // with their place in it.)
            let pace = pacer.pace(count as u64);
            tokio::pin!(pace);
            loop {
                tokio::select! {
                    biased;
                    () = &mut pace => break,
                    Some(done) = in_flight.next() => {
                        self.settle(Some(done), &mut tally, (subject, total))?;
                    }
                }
            }
        }
        while let Some(done) = in_flight.next().await {
            self.settle(Some(done), &mut tally, (subject, total))?;
        }
        Ok(())
    }

    fn settle(
        &self,
        done: Option<Result<u64, u64>>,
        tally: &mut Tally,
        (subject, total): (&str, u64),
    ) -> anyhow::Result<()> {
        match done {
            Some(Ok(index)) => {
                tally.waiting.remove(&index);
                tally.acked += 1;
                Ok(())
            }
            Some(Err(_)) => bail!(
                "the broker acknowledged nothing for {:?}: {} of {total} messages to {} were \
                 never acknowledged (the first: #{}); {} publishes were retried; the broker's \
                 last answer: {}",
                self.options.give_up_after,
                total - tally.acked,
                subject,
                tally.waiting.first().copied().unwrap_or_default(),
                self.stats.retries(),
                self.stats.last_refusal(),
            ),
            None => Ok(()),
        }
    }

    /// One message until its PubAck: `Ok(index)`; `Err(index)` once the broker has been
    /// silent past `give_up_after`.
    async fn publish_one(&self, subject: &str, index: u64, payload: String) -> Result<u64, u64> {
        // The subject is part of the id: events and requests of one run share the input
        // stream, and equal ids would be dropped there as duplicates.
        let id = format!("{}-{subject}-{index}", self.run);
        let payload = bytes::Bytes::from(payload);
        let mut backoff = Duration::from_millis(20);
        loop {
            let message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id);
            // Bounded as a whole: with the broker gone, even handing the message to the
            // client can wait.
            let attempt = async {
                match self.js.send_publish(subject.to_string(), message).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(error) => Err(error.to_string()),
                }
            };
            let outcome = tokio::time::timeout(self.options.ack_timeout * 2, attempt)
                .await
                .unwrap_or_else(|_| Err("no PubAck in time".into()));
            match outcome {
                Ok(()) => {
                    self.stats.note_ack();
                    return Ok(index);
                }
                Err(error) => {
                    self.stats.note_refusal(&error);
                    if self.stats.silent_for() >= self.options.give_up_after {
                        return Err(index);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}
