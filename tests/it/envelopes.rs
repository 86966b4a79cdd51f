//! The router → shard hop carries envelopes: many status changes in one shard-stream message.
//! What a shard worker must do with them, and with what the previous release left in the
//! shard streams, is tested here by publishing shard-stream messages directly, as a router
//! (of this release or the one before) would have.

use std::time::{Duration, Instant};

use std::borrow::Cow;

use alarm_digest::bus::envelope::{
    Builder, Content, Format, ENVELOPE_V1, ENVELOPE_V2, FRAME_HEADER,
};
use alarm_digest::bus::Topology;
use alarm_digest::bus::{self, Cluster, Member};
use alarm_digest::domain::{Observation, Status, StatusChange};
use alarm_digest::wire::{self, Input, InputKind};
use async_nats::HeaderMap;
use bytes::Bytes;

use crate::support::*;

fn topology(bed: &TestBed) -> Topology {
    Topology::new(bed.config.streams.clone(), bed.config.shards.count)
}

/// Publishes to a shard stream and waits for the PubAck.
async fn to_shard(bed: &TestBed, subject: &str, headers: HeaderMap, payload: Bytes) {
    bed.client
        .js
        .publish_with_headers(subject.to_string(), headers, payload)
        .await
        .expect("publish")
        .await
        .expect("stored in the shard stream");
}

fn status_change(payload: &str) -> StatusChange {
    match wire::decode(InputKind::StatusChange, payload.as_bytes(), usize::MAX) {
        Ok(Input::StatusChange(change)) => change,
        other => panic!("not a status change: {other:?}"),
    }
}

fn envelope_headers(format: Format) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(FRAME_HEADER, format.header());
    headers
}

/// An envelope as the release before wrote it: each entry the input's JSON, unchanged.
fn first_format(entries: &[(u64, &str, &[u8])]) -> Bytes {
    let mut builder = Builder::new(Format::V1);
    for (sequence, subject, payload) in entries {
        assert!(builder.push(*sequence, subject, &Content::Json(payload)));
    }
    builder.finish()
}

/// Starts the service on what the test put in the shard log and asks for u's digest.
async fn start_and_ask_for_u(
    bed: &TestBed,
) -> (
    alarm_digest::service::RunningService,
    Vec<(String, String, String)>,
) {
    let mut digests = bed.client.digests().await;
    let service = start_service(bed.config.clone()).await;
    bed.client.request_digest("u").await;
    let digest = digests.next_for("u").await;
    (service, entries(&digest))
}

async fn dead_letters(bed: &TestBed) -> Vec<serde_json::Value> {
    let (code, listed, stderr) = cli_against(&bed.nats, &["dlq", "list"]);
    assert_eq!(code, Some(0), "{stderr}");
    listed
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_messages_left_by_the_previous_release_are_drained_in_order() {
    let bed = TestBed::start().await;
    let topology = topology(&bed);
    let shard = topology.shard_of("u");
    let status = topology.shard_subject(InputKind::StatusChange, shard);
    let request = topology.shard_subject(InputKind::DigestRequest, shard);
    // What the previous release's router published: one event per message, then a request
    // with its Msg-Id.
    for (alarm, state, at) in [
        ("a", "CRITICAL", "2021-06-07T20:00:01Z"),
        ("b", "WARNING", "2021-06-07T20:00:02Z"),
        ("a", "CLEARED", "2021-06-07T20:00:03Z"),
    ] {
        to_shard(
            &bed,
            &status,
            HeaderMap::new(),
            status_payload("u", alarm, state, at).into(),
        )
        .await;
    }
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "ALARM_DIGEST_INPUT:99");
    to_shard(&bed, &request, headers, r#"{"UserID":"u"}"#.into()).await;

    let mut digests = bed.client.digests().await;
    let service = start_service(bed.config.clone()).await;
    let digest = digests.next_for("u").await;
    assert_eq!(
        entries(&digest),
        [("b".into(), "WARNING".into(), "2021-06-07T20:00:02Z".into())]
    );
    bed.client.wait_drained().await;
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_inside_an_envelope_is_dead_lettered_alone_with_its_input_sequence() {
    let bed = TestBed::start().await;
    let topology = topology(&bed);
    let shard = topology.shard_of("u");
    let status_subject = bed.config.streams.status_subject.clone();
    let good = |alarm: &str, at: &str| status_payload("u", alarm, "CRITICAL", at).into_bytes();
    let bad = br#"{"AlarmID":"x","UserID":"u","Status":"BAD","ChangedAt":"2021-06-07T20:00:01Z"}"#;
    let envelope = first_format(&[
        (41, &status_subject, &good("a", "2021-06-07T20:00:01Z")),
        (42, &status_subject, bad),
        (43, &status_subject, &good("b", "2021-06-07T20:00:02Z")),
    ]);
    let subject = topology.shard_subject(InputKind::StatusChange, shard);
    to_shard(&bed, &subject, envelope_headers(Format::V1), envelope).await;
    // And an envelope too damaged to read at all.
    let damaged = Bytes::from_static(&[1, 0, 0, 0, 9, 0]);
    to_shard(&bed, &subject, envelope_headers(Format::V1), damaged).await;

    let (service, digest) = start_and_ask_for_u(&bed).await;
    assert_eq!(
        digest,
        [
            ("a".into(), "CRITICAL".into(), "2021-06-07T20:00:01Z".into()),
            ("b".into(), "CRITICAL".into(), "2021-06-07T20:00:02Z".into()),
        ],
        "the good entries around the bad one applied"
    );
    bed.client.wait_drained().await;
    let records = dead_letters(&bed).await;
    assert_eq!(records.len(), 2, "{records:?}");
    let entry = &records[0];
    assert_eq!(entry["reason"], "unknown_status");
    assert_eq!(entry["original_subject"], status_subject.as_str());
    assert_eq!(entry["stream"], bed.config.streams.input_stream.as_str());
    assert_eq!(entry["stream_sequence"], "42");
    assert!(entry["payload"]
        .as_str()
        .unwrap_or_default()
        .contains("\"BAD\""));
    let damaged = &records[1];
    assert_eq!(damaged["reason"], "bad_envelope");
    assert_eq!(damaged["stream"], topology.shard_stream(shard).as_str());
    service.stop().await.expect("clean stop");
}

/// An envelope-2 entry is the change the router validated: the worker applies it without
/// parsing JSON. One it still refuses (a user of another shard) is dead-lettered as the JSON
/// rendered from the change, under the input's stream and sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_format_entries_apply_and_a_refused_one_is_dead_lettered_as_its_json() {
    let bed = TestBed::start().await;
    let topology = topology(&bed);
    let shard = topology.shard_of("u");
    let stranger = (0..)
        .map(|i| format!("s{i}"))
        .find(|user| topology.shard_of(user) != shard)
        .expect("a user of another shard");
    let status_subject = bed.config.streams.status_subject.clone();
    // 2021-06-07T20:00:01Z
    let change = |user: &str, alarm: &str, status, seconds: i64, nanos| StatusChange {
        user_id: user.into(),
        alarm_id: alarm.into(),
        observation: Observation {
            status,
            changed_at: chrono::DateTime::from_timestamp(1_623_096_000 + seconds, nanos)
                .expect("an instant"),
        },
    };
    let mut builder = Builder::new(Format::V2);
    for (sequence, change) in [
        (51, change("u", "a", Status::Warning, 1, 0)),
        (52, change(&stranger, "x", Status::Critical, 1, 500_000_000)),
        (53, change("u", "b", Status::Critical, 2, 0)),
    ] {
        let content = Content::Change(Cow::Owned(change));
        assert!(builder.push(sequence, &status_subject, &content));
    }
    let subject = topology.shard_subject(InputKind::StatusChange, shard);
    to_shard(
        &bed,
        &subject,
        envelope_headers(Format::V2),
        builder.finish(),
    )
    .await;
    let damaged = Bytes::from_static(&[2, 0, 0, 0, 1, 0]);
    to_shard(&bed, &subject, envelope_headers(Format::V2), damaged).await;

    let (service, digest) = start_and_ask_for_u(&bed).await;
    assert_eq!(
        digest,
        [
            ("a".into(), "WARNING".into(), "2021-06-07T20:00:01Z".into()),
            ("b".into(), "CRITICAL".into(), "2021-06-07T20:00:02Z".into()),
        ]
    );
    bed.client.wait_drained().await;
    let records = dead_letters(&bed).await;
    assert_eq!(records.len(), 2, "{records:?}");
    let refused = &records[0];
    assert_eq!(refused["reason"], "misrouted");
    assert_eq!(refused["original_subject"], status_subject.as_str());
    assert_eq!(refused["stream"], bed.config.streams.input_stream.as_str());
    assert_eq!(refused["stream_sequence"], "52");
    let payload: serde_json::Value =
        serde_json::from_str(refused["payload"].as_str().unwrap_or_default())
            .expect("the dead letter carries JSON");
    assert_eq!(
        payload,
        serde_json::json!({
            "AlarmID": "x",
            "UserID": stranger,
            "Status": "CRITICAL",
            "ChangedAt": "2021-06-07T20:00:01.500Z",
        })
    );
    assert_eq!(records[1]["reason"], "bad_envelope");
    service.stop().await.expect("clean stop");
}

/// The router crashed after its envelope and its request were stored in the shard stream but
/// before it acked the inputs: they come again, are routed again, and nothing is applied or
/// answered twice (events are idempotent; the request's Msg-Id drops the second copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_crash_between_the_pubacks_and_the_input_acks_answers_once() {
    let bed = TestBed::start().await;
    let topology = topology(&bed);
    let shard = topology.shard_of("u");
    let input = bed.config.streams.input_stream.clone();
    let status_subject = bed.config.streams.status_subject.clone();
    let events: Vec<String> = (0..5)
        .map(|n| status_payload("u", &format!("a{n}"), "WARNING", "2021-06-07T20:00:00Z"))
        .collect();
    for event in &events {
        bed.client.publish(&status_subject, event.clone()).await;
    }
    bed.client.request_digest("u").await;
    // Input sequences 1..=5 are the events, 6 the request: what the crashed router had
    // already stored in the shard stream.
    let mut builder = Builder::new(Format::NEWEST);
    for (index, event) in events.iter().enumerate() {
        let change = status_change(event);
        let content = Content::Change(Cow::Owned(change));
        assert!(builder.push(index as u64 + 1, &status_subject, &content));
    }
    let subject = topology.shard_subject(InputKind::StatusChange, shard);
    to_shard(
        &bed,
        &subject,
        envelope_headers(Format::NEWEST),
        builder.finish(),
    )
    .await;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{input}:6").as_str());
    let request = topology.shard_subject(InputKind::DigestRequest, shard);
    to_shard(&bed, &request, headers, r#"{"UserID":"u"}"#.into()).await;

    let subscriber = PlainSubscriber::start(&bed.client).await;
    let service = start_service(bed.config.clone()).await;
    bed.client.wait_drained().await;
    let received = subscriber.settle(Duration::from_secs(1)).await;
    assert_eq!(received.len(), 1, "answered once: {received:?}");
    assert_eq!(received[0].digest.active_alarms.len(), 5);
    assert_eq!(service.metrics.events_applied.get(), 5);
    assert_eq!(
        service.metrics.events_unchanged.get(),
        5,
        "the routed-again copies changed nothing"
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_packs_events_into_envelopes_and_a_request_never_overtakes_them() {
    let bed = TestBed::start().await;
    let topology = topology(&bed);
    // Everything published before the service starts arrives in one fetch.
    for n in 0..300 {
        bed.client
            .status("u", &format!("a{n:03}"), "CRITICAL", "2021-06-07T20:00:00Z")
            .await;
    }
    bed.client.request_digest("u").await;
    let mut digests = bed.client.digests().await;
    let service = start_service(bed.config.clone()).await;
    let digest = digests.next_for("u").await;
    assert_eq!(
        digest.active_alarms.len(),
        300,
        "every event before the request is in it"
    );
    bed.client.wait_drained().await;
    let shard_stream = topology.shard_stream(topology.shard_of("u"));
    let info = bed
        .client
        .js
        .get_stream(&shard_stream)
        .await
        .expect("shard stream")
        .info()
        .await
        .expect("info")
        .clone();
    // 300 events and one request reached the shard stream in a handful of messages.
    assert!(
        info.state.last_sequence <= 4,
        "{} shard messages for 301 inputs",
        info.state.last_sequence
    );
    assert_eq!(service.metrics.routed.get(), 301);
    assert_eq!(
        frames(&bed, topology.shard_of("u")).await[0],
        Some(ENVELOPE_V2.to_string()),
        "a cluster this build created writes the validated changes"
    );
    service.stop().await.expect("clean stop");
}

/// The `Alarm-Digest-Frame` header of every message in a shard log (none: a single message).
async fn frames(bed: &TestBed, shard: u16) -> Vec<Option<String>> {
    let stream = bed
        .client
        .js
        .get_stream(topology(bed).shard_stream(shard))
        .await
        .expect("shard stream");
    let last = stream.get_info().await.expect("info").state.last_sequence;
    let mut frames = Vec::new();
    for sequence in 1..=last {
        if let Some(message) = bus::message_at(&stream, sequence).await.expect("read") {
            frames.push(
                message
                    .headers
                    .get(FRAME_HEADER)
                    .map(|value| value.to_string()),
            );
        }
    }
    frames
}

fn envelope_format(bed: &TestBed) -> serde_json::Value {
    let (code, shown, stderr) = cli_against(&bed.nats, &["streams", "envelopes"]);
    assert_eq!(code, Some(0), "{stderr}");
    serde_json::from_str(shown.trim()).expect("a JSON line")
}

/// A cluster the release before built: its instances read envelope-1 alone, so routers of
/// this build keep writing it (a rolling upgrade restarts instances in any order) and the
/// shard log that release wrote replays here. Once the operator records format 2, every
/// router writes envelope-2, and the shard log's mix of both applies as one history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_the_release_before_keeps_envelope_1_until_the_operator_records_2() {
    let bed = TestBed::start().await;
    let topology = topology(&bed);
    let shard = topology.shard_of("u");
    let status_subject = bed.config.streams.status_subject.clone();
    // What the release before recorded and wrote: its counts (no envelope format) and an
    // envelope-1 in the shard log.
    let member = Member::here("previous-release".into(), &bed.config);
    let cluster = Cluster::open(&bed.client.js, &bed.config, member)
        .await
        .expect("buckets");
    cluster.agree_shard_count(4).await.expect("shard count");
    cluster
        .agree_input_partitions(1)
        .await
        .expect("partition count");
    let old = status_payload("u", "from-the-log", "CRITICAL", "2021-06-07T20:00:01Z");
    let subject = topology.shard_subject(InputKind::StatusChange, shard);
    let envelope = first_format(&[(1, &status_subject, old.as_bytes())]);
    to_shard(&bed, &subject, envelope_headers(Format::V1), envelope).await;
    assert_eq!(
        envelope_format(&bed),
        serde_json::json!({ "envelope_format": 1, "recorded": false })
    );

    let mut digests = bed.client.digests().await;
    let service = start_service(bed.config.clone()).await;
    bed.client
        .status("u", "before-the-switch", "WARNING", "2021-06-07T20:00:02Z")
        .await;
    bed.client.wait_drained().await;
    assert_eq!(
        frames(&bed, shard).await,
        [Some(ENVELOPE_V1.to_string()), Some(ENVELOPE_V1.to_string())],
        "this build's router wrote envelope-1 too"
    );

    let (code, said, stderr) = cli_against(&bed.nats, &["streams", "envelopes", "--format", "2"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(said.contains("1 -> 2"), "{said}");
    assert_eq!(
        envelope_format(&bed),
        serde_json::json!({ "envelope_format": 2, "recorded": true })
    );
    // Every router reads the record again within its look-again period.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let alarm = format!("after-the-switch-{n}");
        bed.client
            .status("u", &alarm, "CRITICAL", "2021-06-07T20:00:03Z")
            .await;
        bed.client.wait_drained().await;
        let written = frames(&bed, shard).await;
        if written.last() == Some(&Some(ENVELOPE_V2.to_string())) {
            break;
        }
        assert!(Instant::now() < deadline, "still {written:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bed.client.request_digest("u").await;
    let digest = digests.next_for("u").await;
    let alarms: Vec<String> = entries(&digest).into_iter().map(|(id, ..)| id).collect();
    assert_eq!(alarms.len(), 2 + n, "{alarms:?}");
    assert_eq!(alarms[..2], ["from-the-log", "before-the-switch"]);
    service.stop().await.expect("clean stop");

    // A new instance on a fresh data dir takes the shard from its snapshot and the log.
    let fresh = tempfile::tempdir().expect("data dir");
    let mut config = bed.config.clone();
    config.storage.path = fresh.path().to_path_buf();
    let service = start_service(config).await;
    bed.client
        .status("u", "after-the-restart", "WARNING", "2021-06-07T20:00:04Z")
        .await;
    bed.client.request_digest("u").await;
    let digest = digests.next_for("u").await;
    assert_eq!(
        entries(&digest)
            .into_iter()
            .map(|(id, ..)| id)
            .collect::<Vec<_>>(),
        ["after-the-restart"],
        "nothing applied twice or lost: the rest was sent already"
    );
    service.stop().await.expect("clean stop");
}
