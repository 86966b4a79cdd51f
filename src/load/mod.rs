//! The end-to-end load tool behind `alarm-digest bench`: publishes a workload the way
//! producers do, waits for the service to drain it (from the consumers' state), measures
//! request-to-digest latency, and optionally the broker-only ceiling through the same topology.

pub mod bench;
pub mod ceiling;
pub mod naive;
pub mod producer;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::Context;
use async_nats::Client;
use futures::StreamExt;

use crate::bus::Topology;
use crate::config::Config;
use crate::wire::AlarmDigest;
use producer::Producer;

/// How often a long phase says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `events` status changes spread over `users` × `alarms`: the first users×alarms events
/// create every alarm once, later ones change them again.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub events: u64,
    pub users: u64,
    pub alarms: u64,
}

const STATUSES: [&str; 3] = ["WARNING", "CRITICAL", "CLEARED"];

impl Workload {
    pub fn user_id(user: u64) -> String {
        format!("bench-user-{user:08}")
    }

    pub fn payload(&self, event: u64) -> String {
        let pair = event % (self.users * self.alarms);
        let user = pair / self.alarms;
        let alarm = pair % self.alarms;
        let round = event / (self.users * self.alarms);
        // Mostly active, a third cleared, varying per alarm and round.
        let status = STATUSES[((pair * 7 + round) % 3) as usize];
        let nanos = 1_600_000_000_000_000_000i64 + event as i64;
        let at = chrono::DateTime::from_timestamp_nanos(nanos);
        format!(
            r#"{{"AlarmID":"bench-alarm-{alarm:04}","UserID":"{}","Status":"{status}","ChangedAt":"{}"}}"#,
            Workload::user_id(user),
            crate::wire::format_time(&at)
        )
    }

    pub fn stored_alarms(&self) -> u64 {
        self.events.min(self.users * self.alarms)
    }
}

/// Paces a loop to `per_second` (0 = unpaced). It checks the clock about once a millisecond's
/// worth of messages (every message below 1000/s), so a paced load is smooth, not bursts.
pub struct Pacer {
    per_second: u64,
    every: u64,
    started: Instant,
}

impl Pacer {
    pub fn new(per_second: u64) -> Pacer {
        Pacer {
            per_second,
            every: (per_second / 1000).max(1),
            started: Instant::now(),
        }
    }

    pub async fn pace(&self, sent: u64) {
        if self.per_second == 0 || !sent.is_multiple_of(self.every) {
            return;
        }
        let due = Duration::from_secs_f64(sent as f64 / self.per_second as f64);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
}

/// Publishes events `from..to`, paced to `rate` per second, each acknowledged by the broker.
pub async fn publish_events(
    producer: &Producer,
    subject: &str,
    workload: &Workload,
    range: std::ops::Range<u64>,
    rate: u64,
) -> anyhow::Result<()> {
    producer
        .publish(
            subject,
            range,
            rate,
            |event| workload.payload(event),
            |_| {},
        )
        .await
}

/// Publishes events `range` in `chunks` contiguous parts at once, chunk `c` through
/// `producers[c % producers.len()]` to `subject(c)`, each paced to its share of `rate`: several
/// connections and partitions loaded together, so the tool is not what limits a run.
pub async fn publish_spread(
    producers: &[Producer],
    chunks: usize,
    subject: impl Fn(usize) -> String,
    workload: &Workload,
    range: std::ops::Range<u64>,
    rate: u64,
) -> anyhow::Result<()> {
    let chunks = chunks.max(1);
    if producers.is_empty() {
        bail!("no producer to publish with");
    }
    let (start, total) = (range.start, range.end.saturating_sub(range.start));
    let part = |c: u64| start + total * c / chunks as u64;
    let rate = rate.div_ceil(chunks as u64);
    let acked_before = producers[0].stats().acked();
    let first_subject = subject(0);
    let runs = (0..chunks).map(|c| {
        let producer = &producers[c % producers.len()];
        let subject = subject(c);
        let range = part(c as u64)..part(c as u64 + 1);
        async move { publish_events(producer, &subject, workload, range, rate).await }
    });
    // The first chunk to give up ends the run; say what never arrived of all of it.
    if let Err(error) = futures::future::try_join_all(runs).await {
        let acked = producers[0].stats().acked() - acked_before;
        bail!(
            "{} of {total} messages to {first_subject} were never acknowledged (published by \
             {chunks} at once); the first to give up: {}",
            total.saturating_sub(acked),
            crate::errors::describe(&error)
        );
    }
    Ok(())
}

/// Prints, every few seconds until dropped, how many of `total` messages the broker has
/// acknowledged, the retries and the rate so far.
pub fn report_progress(producer: &Producer, total: u64) -> tokio::task::JoinHandle<()> {
    let producer = producer.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let first = producer.stats().acked();
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            let acked = producer.stats().acked() - first;
            eprintln!(
                "bench: {acked} of {total} acknowledged by the broker, {} retried, {:.0}/s so far",
                producer.stats().retries(),
                acked as f64 / started.elapsed().as_secs_f64()
            );
        }
    })
}

/// Waits until the input streams hold at least `stored` messages in all (counted by their
/// last sequences), and every named consumer has nothing pending or unacknowledged. Says what
/// it waits for every few seconds; fails when that has not changed for `give_up_after` (the
/// deployment stopped making progress), or after `timeout` in all.
pub async fn wait_drained(
    js: &Context,
    inputs: (&[String], u64),
    consumers: &[(String, String)],
    (timeout, give_up_after): (Duration, Duration),
) -> anyhow::Result<()> {
    let started = Instant::now();
    // A broker answering slowly (a loaded machine, a leader election) is no answer yet: keep
    // asking until the deadline, and say what was last seen.
    let mut last_problem = String::from("nothing read yet");
    let mut changed = Instant::now();
    let mut reported = Instant::now();
    loop {
        if started.elapsed() > timeout {
            bail!("not drained within {timeout:?}: {last_problem}");
        }
        if changed.elapsed() > give_up_after {
            bail!("no progress for {give_up_after:?}, the deployment is stuck: {last_problem}");
        }
        let problem = match drained(js, inputs, consumers).await {
            Ok(None) => return Ok(()),
            Ok(Some(waiting)) => waiting,
            Err(error) => crate::errors::describe(&error),
        };
        if problem != last_problem {
            last_problem = problem;
            changed = Instant::now();
        }
        if reported.elapsed() >= PROGRESS_EVERY {
            eprintln!("bench: draining: {last_problem}");
            reported = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `None` once the inputs hold `stored` messages and no consumer has anything pending or
/// unacknowledged; else what is still waiting.
async fn drained(
    js: &Context,
    (inputs, stored): (&[String], u64),
    consumers: &[(String, String)],
) -> anyhow::Result<Option<String>> {
    let have = inputs_stored(js, inputs).await?;
    if have < stored {
        return Ok(Some(format!(
            "the input streams hold {have} of {stored} messages"
        )));
    }
    for (stream_name, consumer_name) in consumers {
        let stream = js.get_stream_no_info(stream_name).await?;
        let info = stream
            .consumer_info(consumer_name)
            .await
            .with_context(|| format!("consumer {consumer_name} on {stream_name}"))?;
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            return Ok(Some(format!(
                "{consumer_name} on {stream_name}: {} pending, {} unacknowledged",
                info.num_pending, info.num_ack_pending
            )));
        }
    }
    Ok(None)
}

/// The configured input partition streams.
pub fn input_streams(config: &Config) -> Vec<String> {
    partition_streams(&Topology::new(config.streams.clone(), config.shards.count))
}

fn partition_streams(topology: &Topology) -> Vec<String> {
    (0..topology.input_partitions())
        .map(|partition| topology.partition_stream(partition))
        .collect()
}

/// The service's consumers: the routers' (one per input partition) and every shard worker's.
pub fn service_consumers(config: &Config) -> Vec<(String, String)> {
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let mut consumers: Vec<(String, String)> = partition_streams(&topology)
        .into_iter()
        .map(|stream| (stream, config.streams.router_consumer.clone()))
        .collect();
    consumers.extend((0..config.shards.count).map(|shard| {
        (
            topology.shard_stream(shard),
            config.streams.worker_consumer.clone(),
        )
    }));
    consumers
}

/// Messages the input streams have stored in all, by their last sequences (a WorkQueue
/// stream deletes what is acked, its sequence stays).
pub async fn inputs_stored(js: &Context, streams: &[String]) -> anyhow::Result<u64> {
    let mut total = 0;
    for name in streams {
        let mut stream = js
            .get_stream(name)
            .await
            .with_context(|| format!("stream {name}"))?;
        total += stream.info().await?.state.last_sequence;
    }
    Ok(total)
}

/// Sends `count` digest requests at `rate` per second for users spread over the workload and
/// returns each request-to-digest latency. Fails when no digest has arrived for
/// `give_up_after`.
pub async fn digest_latencies(
    client: &Client,
    producer: &Producer,
    config: &Config,
    workload: &Workload,
    (count, rate): (u64, u64),
    give_up_after: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let sent: Arc<Mutex<HashMap<String, VecDeque<Instant>>>> = Arc::default();
    let mut digests = client
        .subscribe(config.streams.digest_subject.clone())
        .await?;
    // Let the server register the subscription before the first answer can arrive.
    client.flush().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let receiver_sent = sent.clone();
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(count as usize);
        while (latencies.len() as u64) < count {
            let Ok(Some(message)) = tokio::time::timeout(give_up_after, digests.next()).await
            else {
                break;
            };
            // A request is answered when its first part arrives; later parts answer nothing.
            let later_part = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(crate::bus::DIGEST_PART_HEADER))
                .is_some_and(|part| !part.as_str().starts_with("1/"));
            if later_part {
                continue;
            }
            let Ok(digest) = serde_json::from_slice::<AlarmDigest>(&message.payload) else {
                continue;
            };
            let started = receiver_sent
                .lock()
                .ok()
                .and_then(|mut sent| sent.get_mut(&digest.user_id)?.pop_front());
            if let Some(started) = started {
                latencies.push(started.elapsed());
            }
        }
        latencies
    });
    let user = |request: u64| Workload::user_id((request * 7_919) % workload.users);
    producer
        .publish(
            &config.streams.digest_request_subject,
            0..count,
            rate,
            |request| format!(r#"{{"UserID":"{}"}}"#, user(request)),
            |request| {
                if let Ok(mut sent) = sent.lock() {
                    sent.entry(user(request))
                        .or_default()
                        .push_back(Instant::now());
                }
            },
        )
        .await?;
    let latencies = receiver.await?;
    if (latencies.len() as u64) < count {
        bail!(
            "only {} of {count} digests arrived (none for {give_up_after:?})",
            latencies.len()
        );
    }
    Ok(latencies)
}

/// p50/p90/p99/max of a set of latencies.
pub fn percentiles(mut latencies: Vec<Duration>) -> [Duration; 4] {
    latencies.sort();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1);
        latencies.get(index).copied().unwrap_or_default()
    };
    [
        at(0.50),
        at(0.90),
        at(0.99),
        latencies.last().copied().unwrap_or_default(),
    ]
}

/// Resident set size of a process, from /proc.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) a local process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    /// `/proc` counts in USER_HZ, which Linux fixes at 100 for user space.
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are numbers.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (user + system) * 1000 / TICKS_PER_SECOND,
    ))
}

/// The pid of a local `alarm-digest run`, if exactly one runs.
pub fn find_service_pid() -> Option<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_service = args.first().is_some_and(|a| a.ends_with(b"alarm-digest"))
            && args.iter().any(|a| *a == b"run");
        if is_service && pid != std::process::id() {
            found.push(pid);
        }
    }
    (found.len() == 1).then(|| found[0])
}

/// Bytes of every file below `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, Input, InputKind};

    #[test]
    fn cpu_time_reads_this_process_and_grows_with_work() {
        let before = cpu_time(std::process::id()).unwrap_or_default();
        let started = Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < Duration::from_millis(60) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let after = cpu_time(std::process::id());
        assert!(
            after.is_some_and(|after| after > before),
            "{before:?} → {after:?}"
        );
        assert_eq!(cpu_time(u32::MAX), None);
    }

    #[test]
    fn workload_events_are_valid_and_cover_every_alarm_first() {
        let workload = Workload {
            events: 40,
            users: 4,
            alarms: 5,
        };
        let mut pairs = std::collections::BTreeSet::new();
        for event in 0..20 {
            let payload = workload.payload(event);
            let Ok(Input::StatusChange(change)) =
                decode(InputKind::StatusChange, payload.as_bytes(), 1024)
            else {
                panic!("invalid workload event {payload}");
            };
            pairs.insert((change.user_id, change.alarm_id));
        }
        assert_eq!(pairs.len(), 20);
        assert_eq!(workload.stored_alarms(), 20);
    }

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let latencies = (1..=100).map(Duration::from_millis).collect();
        let [p50, p90, p99, max] = percentiles(latencies);
        assert_eq!(
            (p50, p90, p99, max),
            (
                Duration::from_millis(50),
                Duration::from_millis(90),
                Duration::from_millis(99),
                Duration::from_millis(100)
            )
        );
    }
}
