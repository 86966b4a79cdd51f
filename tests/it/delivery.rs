//! Digest delivery: digests larger than the server's `max_payload` go out in parts, a crash
//! between parts resends nothing already stored, plain subscribers see each stored digest
//! once (the output stream republishes it), and clocks from the future pin nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use alarm_digest::bus::Topology;
use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::stream::DiscardPolicy;
use futures::StreamExt;
use tempfile::tempdir;

use crate::support::*;

/// A broker whose `max_payload` is 64 KiB, so a digest of a few thousand alarms needs parts.
const SMALL_MAX_PAYLOAD: usize = 64 * 1024;

fn small_payload_server() -> NatsServer {
    NatsServer::start_with_config(&format!("max_payload: {SMALL_MAX_PAYLOAD}\n"))
}

/// A user that lands on the same shard as `user` (shard count from `config`).
fn neighbour_of(config: &alarm_digest::config::Config, user: &str) -> String {
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let shard = topology.shard_of(user);
    (0..)
        .map(|n| format!("neighbour-{n}"))
        .find(|candidate| topology.shard_of(candidate) == shard)
        .unwrap_or_default()
}

/// `count` CRITICAL alarms for `user`, with 40-character ids, one second apart, published
/// pipelined. Returns their ids, oldest first.
async fn heavy_user(client: &TestClient, user: &str, count: usize) -> Vec<String> {
    let subject = client.config.streams.status_subject.clone();
    let mut ids = Vec::with_capacity(count);
    let mut acks = Vec::with_capacity(count);
    for n in 0..count {
        let alarm = format!("alarm-{n:06}-{}", "x".repeat(27));
        let at = chrono::DateTime::from_timestamp(1_623_000_000 + n as i64, 0).unwrap_or_default();
        let payload = status_payload(
            user,
            &alarm,
            "CRITICAL",
            &alarm_digest::wire::format_time(&at),
        );
        acks.push(
            client
                .js
                .publish(subject.clone(), payload.into())
                .await
                .expect("publish"),
        );
        ids.push(alarm);
    }
    for ack in acks {
        ack.await.expect("stored in the input stream");
    }
    ids
}

/// The parts of `user`'s digest among what a subscriber received, checked to be one digest:
/// one digest id, parts 1..n in order, each within the server's limit.
fn parts_of(received: &[Received], user: &str) -> Vec<Received> {
    let parts: Vec<Received> = received
        .iter()
        .filter(|r| r.digest.user_id == user)
        .cloned()
        .collect();
    let ids: BTreeSet<_> = parts.iter().map(|p| p.digest_id.clone()).collect();
    assert_eq!(ids.len(), 1, "one digest: {ids:?}");
    let total = parts.len();
    for (index, part) in parts.iter().enumerate() {
        assert_eq!(
            part.part.as_deref(),
            Some(format!("{}/{total}", index + 1).as_str()),
            "parts in order"
        );
        assert!(
            part.wire_bytes <= SMALL_MAX_PAYLOAD,
            "part of {} bytes",
            part.wire_bytes
        );
    }
    parts
}

fn all_parts_arrived(received: &[Received], user: &str) -> bool {
    let parts: Vec<&Received> = received
        .iter()
        .filter(|r| r.digest.user_id == user)
        .collect();
    parts
        .first()
        .and_then(|p| p.part.as_deref())
        .is_some_and(|first| {
            first
                .split('/')
                .nth(1)
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|total| parts.len() >= total)
        })
}

/// A broker with a small `max_payload`, a data dir, a plain subscriber listening, and a heavy
/// user's 3,000 alarms waiting in the input stream.
struct HeavyUser {
    nats: NatsServer,
    data: tempfile::TempDir,
    config: alarm_digest::config::Config,
    client: TestClient,
    subscriber: PlainSubscriber,
    ids: Vec<String>,
}

async fn heavy_user_bed() -> HeavyUser {
    let nats = small_payload_server();
    let data = tempdir().expect("data dir");
    let config = test_config(&nats, data.path());
    let client = TestClient::connect(&config).await;
    let subscriber = PlainSubscriber::start(&client).await;
    let ids = heavy_user(&client, "heavy", 3_000).await;
    HeavyUser {
        nats,
        data,
        config,
        client,
        subscriber,
        ids,
    }
}

fn alarm_ids(parts: &[Received]) -> Vec<String> {
    parts
        .iter()
        .flat_map(|p| p.digest.active_alarms.iter().map(|a| a.alarm_id.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_larger_than_max_payload_arrives_in_ordered_parts_and_blocks_nobody() {
    // Bound, not `..`: the broker and the data dir must live to the end of the test.
    let HeavyUser {
        nats: _nats,
        data: _data,
        config,
        client,
        subscriber,
        ids,
    } = heavy_user_bed().await;
    let light = neighbour_of(&config, "heavy");
    client
        .status(&light, "a", "WARNING", "2021-06-07T20:00:00Z")
        .await;
    let service = start_service(config.clone()).await;

    client.request_digest("heavy").await;
    client.request_digest(&light).await;
    let received = subscriber
        .wait_until(|r| {
            all_parts_arrived(r, "heavy") && r.iter().any(|d| d.digest.user_id == light)
        })
        .await;
    let parts = parts_of(&received, "heavy");
    let bytes: usize = parts.iter().map(|p| p.wire_bytes).sum();
    eprintln!(
        "3,000 alarms, {bytes} bytes with headers, in {} parts",
        parts.len()
    );
    assert!(parts.len() >= 3, "3,000 alarms in {} parts", parts.len());
    assert_eq!(alarm_ids(&parts), ids, "every alarm once, oldest first");
    let neighbour: Vec<_> = received
        .iter()
        .filter(|r| r.digest.user_id == light)
        .collect();
    assert_eq!(neighbour.len(), 1);
    assert_eq!(
        entries(&neighbour[0].digest),
        [("a".into(), "WARNING".into(), "2021-06-07T20:00:00Z".into())]
    );
    // The output stream holds the same parts, each once.
    let stored = client.stream_messages(&config.streams.output_stream).await;
    assert_eq!(stored, parts.len() as u64 + 1);
    let (_, metrics) = http_get(&service.http_addr.to_string(), "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics.contains("alarm_digest_digests_split_total 1\n"),
        "{metrics}"
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_between_parts_loses_nothing_and_resends_no_part_already_stored() {
    let HeavyUser {
        nats,
        data,
        config,
        client,
        subscriber,
        ids,
    } = heavy_user_bed().await;
    // The output stream takes two messages, then refuses more (as a full stream does): the
    // digest is cut after part 2, with the rest in the outbox.
    let output = &config.streams.output_stream;
    client
        .update_output_stream(|stream| {
            stream.max_messages = 2;
            stream.discard = DiscardPolicy::New;
        })
        .await;

    let service = ServiceProcess::spawn(&nats, data.path(), &[]);
    wait_ready(&service.http).await;
    client.request_digest("heavy").await;
    let blocked = wait_shard_blocked_by(&service.http, "digest part(s) unpublished").await;
    assert!(blocked.contains("digest part(s) unpublished"), "{blocked}");
    assert_eq!(client.stream_messages(output).await, 2);
    service.kill_9();

    client
        .update_output_stream(|stream| stream.max_messages = -1)
        .await;
    let service = ServiceProcess::spawn(&nats, data.path(), &[]);
    subscriber
        .wait_until(|r| all_parts_arrived(r, "heavy"))
        .await;
    wait_ready(&service.http).await;
    let received = subscriber.settle(Duration::from_secs(1)).await;
    let parts = parts_of(&received, "heavy");
    assert_eq!(
        alarm_ids(&parts),
        ids,
        "every alarm once, in order, after the crash"
    );
    assert_eq!(
        client.stream_messages(output).await,
        parts.len() as u64,
        "the stream stored each part once"
    );
    let msg_ids: BTreeSet<_> = parts.iter().map(|p| p.msg_id.clone()).collect();
    assert_eq!(
        msg_ids.len(),
        parts.len(),
        "no part reached the subscriber twice"
    );
}

#[tokio::test]
async fn an_event_from_the_future_is_dead_lettered_and_later_events_of_its_alarm_apply() {
    let bed = TestBed::start().await;
    let service = start_service(bed.config.clone()).await;
    let http = service.http_addr.to_string();
    let mut digests = bed.client.digests().await;
    let now = chrono::Utc::now();
    let stamp = |at: chrono::DateTime<chrono::Utc>| alarm_digest::wire::format_time(&at);

    bed.client
        .status("u", "pinned", "CRITICAL", "2099-01-01T00:00:00Z")
        .await;
    bed.client
        .status(
            "u",
            "pinned",
            "CLEARED",
            &stamp(now - chrono::Duration::minutes(2)),
        )
        .await;
    bed.client
        .status(
            "u",
            "pinned",
            "CRITICAL",
            &stamp(now - chrono::Duration::minutes(1)),
        )
        .await;
    bed.client.request_digest("u").await;
    let digest = digests.next_for("u").await;
    assert_eq!(
        entries(&digest),
        [(
            "pinned".into(),
            "CRITICAL".into(),
            stamp(now - chrono::Duration::minutes(1))
        )],
        "the honest events applied; the one from 2099 did not"
    );

    let (_, metrics) = http_get(&http, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("alarm_digest_rejected_total{reason=\"future_time\"} 1\n"),
        "{metrics}"
    );
    let (code, listed, stderr) =
        cli_against(&bed.nats, &["dlq", "list", "--reason", "future_time"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(listed.contains("2099-01-01T00:00:00Z"), "{listed}");

    // Replaying it says "apply it as it is": it skips the router's clock check.
    let (code, replayed, stderr) =
        cli_against(&bed.nats, &["dlq", "replay", "--reason", "future_time"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(replayed.contains("replayed 1 record"), "{replayed}");
    bed.client.wait_drained().await;
    let (_, inspected) = http_get(&http, "/inspect/user?id=u")
        .await
        .expect("inspect");
    assert!(inspected.contains("2099-01-01T00:00:00Z"), "{inspected}");
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_stream_of_the_previous_release_is_recreated_once_its_consumers_read_it() {
    let nats = NatsServer::start();
    let data = tempdir().expect("data dir");
    let config = test_config(&nats, data.path());
    let s = &config.streams;
    // What the previous release created: the output stream captures AlarmDigest itself, and
    // the notification service consumes it durably.
    let raw = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(raw.clone());
    let old = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: s.output_stream.clone(),
            subjects: vec![s.digest_subject.clone()],
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("old output stream");
    js.publish(
        s.digest_subject.clone(),
        r#"{"UserID":"old","ActiveAlarms":[]}"#.into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    let notifier = old
        .create_consumer(pull::Config {
            durable_name: Some("notifier".into()),
            filter_subject: s.digest_subject.clone(),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("durable consumer");

    // While the notifier has not read the old digest, the stream is left alone.
    let service = start_service_unready(config.clone()).await;
    let http = service.http_addr.to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, body) = http_get(&http, "/readyz").await.expect("readyz");
    assert_eq!(code, 503);
    assert!(body.contains("streams"), "{body}");
    let mut still_old = js.get_stream(&s.output_stream).await.expect("output");
    assert!(still_old
        .info()
        .await
        .expect("info")
        .config
        .republish
        .is_none());

    let mut unread = notifier
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let message = unread.next().await.expect("one").expect("message");
    assert!(String::from_utf8_lossy(&message.payload).contains("old"));
    message.double_ack().await.expect("ack");
    wait_ready(&http).await;

    let mut stream = js.get_stream(&s.output_stream).await.expect("output");
    let info = stream.info().await.expect("info").clone();
    assert_eq!(
        info.config.subjects,
        std::slice::from_ref(&s.output_subject)
    );
    let republish = info.config.republish.expect("republish configured");
    assert_eq!(republish.destination, s.digest_subject);
    let notifier: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer("notifier")
        .await
        .expect("notifier recreated");

    let client = TestClient::connect(&config).await;
    let subscriber = PlainSubscriber::start(&client).await;
    client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:00Z")
        .await;
    client.request_digest("u").await;
    subscriber
        .wait_until(|r| r.iter().any(|d| d.digest.user_id == "u"))
        .await;
    let received = subscriber.settle(Duration::from_millis(500)).await;
    assert_eq!(received.len(), 1, "reached the plain subscriber once");
    let mut next = notifier
        .fetch()
        .max_messages(1)
        .expires(WAIT)
        .messages()
        .await
        .expect("fetch");
    let message = next.next().await.expect("one").expect("message");
    let digest: alarm_digest::wire::AlarmDigest =
        serde_json::from_slice(&message.payload).expect("digest");
    assert_eq!(
        digest.user_id, "u",
        "the recreated durable consumer reads new digests"
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_the_stream_refuses_for_good_blocks_nobody_and_its_alarms_come_in_the_next_digest() {
    let bed = TestBed::start().await;
    let service = start_service(bed.config.clone()).await;
    let http = service.http_addr.to_string();
    let subscriber = PlainSubscriber::start(&bed.client).await;
    let ids = heavy_user(&bed.client, "heavy", 200).await;
    let light = neighbour_of(&bed.config, "heavy");
    bed.client
        .status(&light, "a", "WARNING", "2021-06-07T20:00:00Z")
        .await;
    bed.client.wait_drained().await;
    // The operator caps the output stream's messages below this digest's size after the
    // service started: the digest, cut for the server's 1 MiB, is refused (10054).
    bed.client
        .update_output_stream(|stream| stream.max_message_size = 8 * 1024)
        .await;

    bed.client.request_digest("heavy").await;
    bed.client.request_digest(&light).await;
    subscriber
        .wait_until(|r| r.iter().any(|d| d.digest.user_id == light))
        .await;
    let (_, metrics) = http_get(&http, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("alarm_digest_digest_parts_refused_total 1\n"),
        "{metrics}"
    );
    assert!(
        !subscriber
            .received()
            .iter()
            .any(|r| r.digest.user_id == "heavy"),
        "the refused digest was not delivered"
    );
    wait_ready(&http).await;

    // Its alarms went back to unsent: the next digest carries them, cut for the new limit.
    bed.client.request_digest("heavy").await;
    subscriber
        .wait_until(|r| all_parts_arrived(r, "heavy"))
        .await;
    let received = subscriber.settle(Duration::from_millis(500)).await;
    let parts = parts_of(&received, "heavy");
    assert!(parts.len() >= 3, "{} parts", parts.len());
    assert!(parts.iter().all(|p| p.wire_bytes <= 8 * 1024));
    assert_eq!(alarm_ids(&parts), ids, "no alarm lost to the refusal");
    service.stop().await.expect("clean stop");
}

/// A digest never waits for a pull to expire. With `tuning.fetch_expires_ms` at 5 s and a
/// quiet spell longer than that before each request (so every pull has expired once and
/// waits for a first message), a lone request to an idle service is answered long before an
/// expiry, and so is a second one. (Before the fix, the pull for "whatever else is queued"
/// after that first message sat out a whole expiry, in the router and again in the shard.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_to_an_idle_service_is_answered_without_waiting_for_a_pull_to_expire() {
    let expiry = Duration::from_secs(5);
    let bed = TestBed::start_with(|config| {
        config.tuning.fetch_expires_ms = expiry.as_millis() as u64;
    })
    .await;
    let service = start_service(bed.config.clone()).await;
    let mut digests = bed.client.digests().await;
    bed.client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:01Z")
        .await;
    bed.client.wait_drained().await;
    for round in 0..2 {
        tokio::time::sleep(expiry + Duration::from_secs(1)).await;
        let asked = std::time::Instant::now();
        bed.client.request_digest("u").await;
        let answered = tokio::time::timeout(expiry / 2, digests.next_for("u")).await;
        assert!(
            answered.is_ok(),
            "request {round} unanswered after {:?} (the pull expiry is {expiry:?})",
            asked.elapsed()
        );
    }
    service.stop().await.expect("clean stop");
}
