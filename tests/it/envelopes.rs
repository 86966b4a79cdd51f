//! The router → shard hop carries envelopes: many status changes in one shard-stream message.
//! What a shard worker must do with them, and with what the previous release left in the
//! shard streams, is tested here by publishing shard-stream messages directly, as a router
//! (of this release or the one before) would have.

use std::time::Duration;

use alarm_digest::bus::envelope::{Builder, ENVELOPE_V1, FRAME_HEADER};
use alarm_digest::bus::Topology;
use alarm_digest::wire::InputKind;
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

fn envelope_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(FRAME_HEADER, ENVELOPE_V1);
    headers
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
    let mut builder = Builder::new();
    let good = |alarm: &str, at: &str| status_payload("u", alarm, "CRITICAL", at).into_bytes();
    builder.push(41, &status_subject, &good("a", "2021-06-07T20:00:01Z"));
    builder.push(
        42,
        &status_subject,
        br#"{"AlarmID":"x","UserID":"u","Status":"BAD","ChangedAt":"2021-06-07T20:00:01Z"}"#,
    );
    builder.push(43, &status_subject, &good("b", "2021-06-07T20:00:02Z"));
    let subject = topology.shard_subject(InputKind::StatusChange, shard);
    to_shard(&bed, &subject, envelope_headers(), builder.finish()).await;
    // And an envelope too damaged to read at all.
    to_shard(
        &bed,
        &subject,
        envelope_headers(),
        Bytes::from_static(&[1, 0, 0, 0, 9, 0]),
    )
    .await;

    let mut digests = bed.client.digests().await;
    let service = start_service(bed.config.clone()).await;
    bed.client.request_digest("u").await;
    let digest = digests.next_for("u").await;
    assert_eq!(
        entries(&digest),
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
    let mut builder = Builder::new();
    for (index, event) in events.iter().enumerate() {
        builder.push(index as u64 + 1, &status_subject, event.as_bytes());
    }
    let subject = topology.shard_subject(InputKind::StatusChange, shard);
    to_shard(&bed, &subject, envelope_headers(), builder.finish()).await;
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
    service.stop().await.expect("clean stop");
}
