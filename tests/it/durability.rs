//! Nothing is lost across stops, crashes and broker restarts.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::tempdir;

use crate::support::*;

#[tokio::test]
async fn events_published_while_the_service_is_stopped_are_processed_after_start() {
    let bed = TestBed::start().await;
    bed.client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:01Z")
        .await;
    bed.client.request_digest("u").await;

    let service = start_service(bed.config).await;
    let mut digests = bed.client.digests().await;
    let digest = digests.next().await;
    assert_eq!(
        entries(&digest),
        [("a".into(), "CRITICAL".into(), "2021-06-07T20:00:01Z".into())]
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn state_and_sent_markers_survive_a_restart() {
    let bed = TestBed::start().await;
    let mut digests = bed.client.digests().await;

    let service = start_service(bed.config.clone()).await;
    bed.client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:01Z")
        .await;
    bed.client
        .status("u", "b", "WARNING", "2021-06-07T20:00:01Z")
        .await;
    bed.client.request_digest("u").await;
    assert_eq!(digests.next().await.active_alarms.len(), 2);
    service.stop().await.expect("clean stop");

    let service = start_service(bed.config).await;
    bed.client.request_digest("u").await;
    assert!(
        digests.next().await.active_alarms.is_empty(),
        "sent markers survived"
    );
    bed.client
        .status("u", "a", "CLEARED", "2021-06-07T20:00:02Z")
        .await;
    bed.client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:03Z")
        .await;
    bed.client.request_digest("u").await;
    let digest = digests.next().await;
    assert_eq!(
        entries(&digest),
        [("a".into(), "CRITICAL".into(), "2021-06-07T20:00:03Z".into())]
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_broker_restart_is_ridden_out() {
    let mut nats = NatsServer::start();
    let data = tempdir().expect("data dir");
    let config = test_config(&nats, data.path());
    let client = TestClient::connect(&config).await;
    let service = start_service(config.clone()).await;
    client
        .status("u", "before", "WARNING", "2021-06-07T20:00:01Z")
        .await;

    nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart();

    // Both the test client and the service reconnect on their own.
    let client = TestClient::connect(&config).await;
    client
        .status("u", "after", "CRITICAL", "2021-06-07T20:00:02Z")
        .await;
    client.request_digest("u").await;
    let mut digests = client.digests().await;
    let digest = digests.next_for("u").await;
    assert_eq!(
        entries(&digest),
        [
            (
                "before".into(),
                "WARNING".into(),
                "2021-06-07T20:00:01Z".into()
            ),
            (
                "after".into(),
                "CRITICAL".into(),
                "2021-06-07T20:00:02Z".into()
            ),
        ]
    );
    service.stop().await.expect("clean stop");
}

const STATUSES: [&str; 3] = ["CLEARED", "WARNING", "CRITICAL"];

/// A reproducible storm of status changes in random order, and the final state it implies.
struct Storm {
    events: Vec<(String, String, usize, i64)>,
    users: Vec<String>,
}

impl Storm {
    fn new(seed: u64, users: usize, alarms_per_user: usize, events: usize) -> Storm {
        let mut rng = StdRng::seed_from_u64(seed);
        let users: Vec<String> = (0..users).map(|u| format!("user-{u:04}")).collect();
        let events = (0..events)
            .map(|_| {
                let user = users[rng.gen_range(0..users.len())].clone();
                let alarm = format!("alarm-{}", rng.gen_range(0..alarms_per_user));
                // Nanosecond timestamps within a minute: collisions and reordering both occur.
                (
                    user,
                    alarm,
                    rng.gen_range(0..3),
                    rng.gen_range(0..60_000_000_000i64),
                )
            })
            .collect();
        Storm { events, users }
    }

    fn payload(event: &(String, String, usize, i64)) -> String {
        let (user, alarm, status, nanos) = event;
        let at = chrono::DateTime::from_timestamp(
            1_623_000_000 + nanos / 1_000_000_000,
            (nanos % 1_000_000_000) as u32,
        )
        .expect("in range");
        status_payload(
            user,
            alarm,
            STATUSES[*status],
            &alarm_digest::wire::format_time(&at),
        )
    }

    /// Final status per (user, alarm): newest time wins, ties to the higher severity.
    fn final_state(&self) -> BTreeMap<(String, String), usize> {
        let mut best: BTreeMap<(String, String), (i64, usize)> = BTreeMap::new();
        for (user, alarm, status, nanos) in &self.events {
            let entry = best
                .entry((user.clone(), alarm.clone()))
                .or_insert((*nanos, *status));
            if (*nanos, *status) > *entry {
                *entry = (*nanos, *status);
            }
        }
        best.into_iter()
            .map(|(key, (_, status))| (key, status))
            .collect()
    }
}

async fn publish_all(client: &TestClient, payloads: &[String]) {
    let subject = client.config.streams.status_subject.clone();
    for chunk in payloads.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for payload in chunk {
            acks.push(
                client
                    .js
                    .publish(subject.clone(), payload.clone().into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    }
}

async fn request_all(client: &TestClient, users: &[String]) {
    for user in users {
        client.request_digest(user).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_resends_nothing() {
    let bed = TestBed::start().await;
    let storm = Storm::new(7, 300, 8, 24_000);
    let payloads: Vec<String> = storm.events.iter().map(Storm::payload).collect();
    let (first, second) = payloads.split_at(payloads.len() / 2);

    let service = ServiceProcess::spawn(&bed.nats, bed.data.path(), &[]);
    wait_ready(&service.http).await;
    publish_all(&bed.client, first).await;
    request_all(&bed.client, &storm.users).await;
    publish_all(&bed.client, second).await;
    // Kill while the backlog is being worked through.
    let backlog = bed
        .client
        .stream_messages(&bed.config.streams.input_stream)
        .await;
    service.kill_9();
    assert!(
        backlog > 0,
        "the kill must land while input is still queued"
    );

    let service = ServiceProcess::spawn(&bed.nats, bed.data.path(), &[]);
    wait_ready(&service.http).await;
    bed.client.wait_drained().await;
    request_all(&bed.client, &storm.users).await;
    bed.client.wait_drained().await;
    request_all(&bed.client, &storm.users).await;
    bed.client.wait_drained().await;

    let mut reader = bed.client.digests().await;
    let digests = reader.drain().await;
    let mut per_user: HashMap<&str, Vec<&alarm_digest::wire::AlarmDigest>> = HashMap::new();
    for digest in &digests {
        per_user
            .entry(digest.user_id.as_str())
            .or_default()
            .push(digest);
    }
    eprintln!(
        "input backlog at the kill: {backlog} messages; digests: {}",
        digests.len()
    );

    // Every request answered exactly once.
    for user in &storm.users {
        let count = per_user.get(user.as_str()).map_or(0, Vec::len);
        assert_eq!(count, 3, "{user} got {count} digests for 3 requests");
    }
    // Nothing lost: the last digest mentioning each finally-active alarm has its final status.
    let reported = last_reported(&digests);
    let mut active = 0;
    for ((user, alarm), status) in storm.final_state() {
        if status > 0 {
            active += 1;
            assert_eq!(
                reported
                    .get(&(user.clone(), alarm.clone()))
                    .map(String::as_str),
                Some(STATUSES[status]),
                "{user}/{alarm} lost"
            );
        }
    }
    assert!(
        active > 1000,
        "the storm leaves many alarms active ({active})"
    );
    // Nothing re-sent: the third round, with no changes since the second, is empty.
    for user in &storm.users {
        let last = per_user[user.as_str()].last().expect("three digests");
        assert!(
            last.active_alarms.is_empty(),
            "{user} was sent {:?} again",
            last.active_alarms
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_0_without_losing_work() {
    let bed = TestBed::start().await;
    let storm = Storm::new(11, 50, 4, 8_000);
    let payloads: Vec<String> = storm.events.iter().map(Storm::payload).collect();

    let service = ServiceProcess::spawn(&bed.nats, bed.data.path(), &[]);
    wait_ready(&service.http).await;
    publish_all(&bed.client, &payloads).await;
    service.signal("TERM");
    let status = service.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "graceful stop exits 0");

    let service = ServiceProcess::spawn(&bed.nats, bed.data.path(), &[]);
    wait_ready(&service.http).await;
    bed.client.wait_drained().await;
    request_all(&bed.client, &storm.users).await;
    // Every request answered before reading what is stored.
    bed.client.wait_drained().await;
    let mut reader = bed.client.digests().await;
    let digests = reader.drain().await;
    assert_eq!(digests.len(), storm.users.len());
    let reported: usize = digests.iter().map(|d| d.active_alarms.len()).sum();
    let expected = storm.final_state().values().filter(|s| **s > 0).count();
    assert_eq!(reported, expected);
    drop(service);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_larger_than_the_publish_window_is_answered_in_full() {
    let nats = NatsServer::start();
    let data = tempdir().expect("data dir");
    let mut config = test_config(&nats, data.path());
    // One shard: a single batch queues up to worker_batch digests, far above the window.
    config.shards.count = 1;
    let client = TestClient::connect(&config).await;
    let users: Vec<String> = (0..3_000).map(|u| format!("burst-{u}")).collect();
    let subject = config.streams.digest_request_subject.clone();
    let payloads: Vec<String> = users
        .iter()
        .map(|u| format!(r#"{{"UserID":"{u}"}}"#))
        .collect();
    let mut acks = Vec::new();
    for payload in payloads {
        acks.push(
            client
                .js
                .publish(subject.clone(), payload.into())
                .await
                .expect("publish"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    assert!(users.len() > 4 * alarm_digest::bus::PUBLISH_WINDOW);

    let service = start_service(config).await;
    client.wait_drained().await;
    let mut reader = client.digests().await;
    let digests = reader.drain().await;
    assert_eq!(digests.len(), users.len(), "every request answered once");
    service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn cleared_tombstones_older_than_the_retention_are_swept_and_others_kept() {
    let bed = TestBed::start_with(|c| {
        c.retention.sweep_every_secs = 1;
    })
    .await;
    let service = start_service(bed.config).await;
    let recent = alarm_digest::wire::format_time(&chrono::Utc::now());
    // 2021 is far past the default 7 days; a CLEARED from just now must stay a tombstone.
    bed.client
        .status("u", "cleared-long-ago", "CLEARED", "2021-06-07T20:00:01Z")
        .await;
    bed.client
        .status("u", "cleared-just-now", "CLEARED", &recent)
        .await;
    bed.client
        .status("u", "old-but-critical", "CRITICAL", "2021-06-07T20:00:01Z")
        .await;
    bed.client.wait_drained().await;

    let http = service.http_addr.to_string();
    let deadline = std::time::Instant::now() + WAIT;
    let report: alarm_digest::wire::UserReport = loop {
        let (_, body) = http_get(&http, "/inspect/user?id=u")
            .await
            .expect("inspect");
        let report: alarm_digest::wire::UserReport = serde_json::from_str(&body).expect("report");
        if report.alarms.len() < 3 {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing swept: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ids: Vec<&str> = report.alarms.iter().map(|a| a.alarm_id.as_str()).collect();
    assert_eq!(ids, ["cleared-just-now", "old-but-critical"]);
    let (_, metrics) = http_get(&http, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("alarm_digest_tombstones_swept_total 1\n"),
        "{metrics}"
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn backfilled_old_events_keep_their_tombstones_through_a_sweep() {
    let bed = TestBed::start_with(|c| {
        c.retention.sweep_every_secs = 1;
    })
    .await;
    let service = start_service(bed.config).await;
    // A backfill: everything is years old by the clock, but only a minute apart.
    bed.client
        .status("u", "a", "CLEARED", "2021-06-07T20:01:00Z")
        .await;
    bed.client.wait_drained().await;
    // Wait for two more completed sweep passes: at least one ran entirely after the event.
    let passes = || service.metrics.sweep_passes.get();
    let target = passes() + 2;
    let deadline = std::time::Instant::now() + WAIT;
    while passes() < target {
        assert!(std::time::Instant::now() < deadline, "no sweep pass ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The broker delivers an older CRITICAL late: it must not resurrect the alarm.
    bed.client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:00Z")
        .await;
    bed.client.request_digest("u").await;
    let digest = bed.client.digests().await.next().await;
    assert!(
        digest.active_alarms.is_empty(),
        "resurrected: {:?}",
        digest.active_alarms
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_stops_growing_when_events_only_churn_existing_alarms() {
    let bed = TestBed::start().await;
    let service = start_service(bed.config.clone()).await;
    let subject = bed.config.streams.status_subject.clone();
    let mut sizes = Vec::new();
    // 2,000 alarms, each changed once per round; 40 rounds = 80k events. sled appends
    // until it starts reusing its segments (round ~21 here), then the files stay put.
    for round in 0..40i64 {
        let mut acks = Vec::with_capacity(2_000);
        for n in 0..2_000i64 {
            let at = chrono::DateTime::from_timestamp_nanos(
                1_623_000_000_000_000_000 + round * 10_000 + n,
            );
            let status = ["WARNING", "CRITICAL"][((round + n) % 2) as usize];
            let payload = status_payload(
                &format!("churn-{}", n % 200),
                &format!("a{}", n / 200),
                status,
                &alarm_digest::wire::format_time(&at),
            );
            acks.push(
                bed.client
                    .js
                    .publish(subject.clone(), payload.into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("stored");
        }
        bed.client.wait_drained().await;
        sizes.push(alarm_digest::load::dir_bytes(bed.data.path()));
    }
    eprintln!("data dir bytes per round: {sizes:?}");
    let before_last_ten = sizes[29];
    let last = *sizes.last().expect("rounds");
    assert!(
        last <= before_last_ten + before_last_ten / 20,
        "still growing: {sizes:?}"
    );
    service.stop().await.expect("clean stop");
}
