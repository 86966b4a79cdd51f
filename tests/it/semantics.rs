//! The product's rules, end to end through the broker.

use std::time::Duration;

use crate::support::*;

/// One instance with its own broker and data dir, plus a client.
struct World {
    _nats: NatsServer,
    _data: tempfile::TempDir,
    service: alarm_digest::service::RunningService,
    client: TestClient,
    digests: DigestReader,
}

async fn world_with(configure: impl FnOnce(&mut alarm_digest::config::Config)) -> World {
    let TestBed {
        nats,
        data,
        config,
        client,
    } = TestBed::start_with(configure).await;
    let service = start_service(config).await;
    let digests = client.digests().await;
    World {
        _nats: nats,
        _data: data,
        service,
        client,
        digests,
    }
}

async fn world() -> World {
    world_with(|_| {}).await
}

fn triple(alarm: &str, status: &str, at: &str) -> (String, String, String) {
    (alarm.into(), status.into(), at.into())
}

#[tokio::test]
async fn digest_lists_active_alarms_oldest_first_with_ties_by_alarm_id() {
    let mut w = world().await;
    let c = &w.client;
    c.status("u1", "late", "CRITICAL", "2021-06-07T20:40:17Z")
        .await;
    c.status("u1", "b", "WARNING", "2021-06-07T20:40:15.598765212Z")
        .await;
    c.status("u1", "a", "WARNING", "2021-06-07T22:40:15.598765212+02:00")
        .await;
    c.status("u1", "gone", "CLEARED", "2021-06-07T20:40:16Z")
        .await;
    c.status("other-user", "x", "CRITICAL", "2021-06-07T20:40:15Z")
        .await;
    c.request_digest("u1").await;

    let digest = w.digests.next().await;
    assert_eq!(digest.user_id, "u1");
    assert_eq!(
        entries(&digest),
        [
            triple("a", "WARNING", "2021-06-07T20:40:15.598765212Z"),
            triple("b", "WARNING", "2021-06-07T20:40:15.598765212Z"),
            triple("late", "CRITICAL", "2021-06-07T20:40:17Z"),
        ]
    );
    w.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_user_without_active_alarms_gets_an_empty_array() {
    let mut w = world().await;
    w.client.request_digest("nobody").await;
    let digest = w.digests.next().await;
    assert_eq!(digest.user_id, "nobody");
    assert!(digest.active_alarms.is_empty());
    // The raw payload says [] rather than null.
    let raw = w
        .client
        .js
        .get_stream(&w.client.config.streams.output_stream)
        .await
        .expect("output")
        .get_raw_message(1)
        .await
        .expect("stored digest");
    assert!(String::from_utf8_lossy(&raw.payload).contains(r#""ActiveAlarms":[]"#));
    w.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reordered_events_converge_newest_wins_and_ties_go_to_severity() {
    let mut w = world().await;
    let c = &w.client;
    // Newest first, then older ones that must not overwrite it.
    c.status("u", "newest", "WARNING", "2021-06-07T20:00:03Z")
        .await;
    c.status("u", "newest", "CRITICAL", "2021-06-07T20:00:02Z")
        .await;
    c.status("u", "newest", "CLEARED", "2021-06-07T20:00:01Z")
        .await;
    // An older CRITICAL arriving after a newer CLEARED stays cleared.
    c.status("u", "cleared", "CLEARED", "2021-06-07T20:00:05Z")
        .await;
    c.status("u", "cleared", "CRITICAL", "2021-06-07T20:00:04Z")
        .await;
    // Exact tie: the higher severity wins whatever the order.
    c.status("u", "tie", "CRITICAL", "2021-06-07T20:00:06Z")
        .await;
    c.status("u", "tie", "WARNING", "2021-06-07T20:00:06Z")
        .await;
    // Redelivered duplicate changes nothing.
    c.status("u", "tie", "CRITICAL", "2021-06-07T20:00:06Z")
        .await;
    c.request_digest("u").await;

    let digest = w.digests.next().await;
    assert_eq!(
        entries(&digest),
        [
            triple("newest", "WARNING", "2021-06-07T20:00:03Z"),
            triple("tie", "CRITICAL", "2021-06-07T20:00:06Z"),
        ]
    );
    w.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_unchanged_alarm_is_not_sent_again_but_a_transition_is() {
    let mut w = world().await;
    let c = &w.client;
    c.status("u", "steady", "WARNING", "2021-06-07T20:00:01Z")
        .await;
    c.status("u", "flapping", "CRITICAL", "2021-06-07T20:00:01Z")
        .await;
    c.request_digest("u").await;
    assert_eq!(w.digests.next().await.active_alarms.len(), 2);

    // WARNING re-reported with a newer time: not news. CRITICAL → CLEARED → CRITICAL: news.
    c.status("u", "steady", "WARNING", "2021-06-07T20:00:09Z")
        .await;
    c.status("u", "flapping", "CLEARED", "2021-06-07T20:00:02Z")
        .await;
    c.status("u", "flapping", "CRITICAL", "2021-06-07T20:00:03Z")
        .await;
    c.request_digest("u").await;
    assert_eq!(
        entries(&w.digests.next().await),
        [triple("flapping", "CRITICAL", "2021-06-07T20:00:03Z")]
    );

    c.request_digest("u").await;
    assert!(
        w.digests.next().await.active_alarms.is_empty(),
        "nothing changed since"
    );
    w.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_stale_transition_arriving_late_still_re_arms_the_alarm() {
    let mut w = world().await;
    let c = &w.client;
    c.status("u", "a", "CRITICAL", "2021-06-07T20:00:01Z").await;
    c.request_digest("u").await;
    assert_eq!(w.digests.next().await.active_alarms.len(), 1);

    // The second CRITICAL overtakes the CLEARED between them.
    c.status("u", "a", "CRITICAL", "2021-06-07T20:00:03Z").await;
    c.status("u", "a", "CLEARED", "2021-06-07T20:00:02Z").await;
    c.request_digest("u").await;
    assert_eq!(
        entries(&w.digests.next().await),
        [triple("a", "CRITICAL", "2021-06-07T20:00:03Z")]
    );
    w.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_event_with_an_old_timestamp_arriving_after_a_digest_is_not_lost() {
    let mut w = world().await;
    let c = &w.client;
    c.status("u", "recent", "WARNING", "2021-06-07T20:00:10Z")
        .await;
    c.request_digest("u").await;
    assert_eq!(w.digests.next().await.active_alarms.len(), 1);

    // Delayed by the broker: older than the last digest, but never reported.
    c.status("u", "delayed", "CRITICAL", "2021-06-07T19:00:00Z")
        .await;
    c.request_digest("u").await;
    assert_eq!(
        entries(&w.digests.next().await),
        [triple("delayed", "CRITICAL", "2021-06-07T19:00:00Z")]
    );
    w.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn skip_empty_publishes_nothing_when_there_is_nothing_to_report() {
    let mut w = world_with(|config| config.digest.skip_empty = true).await;
    let c = &w.client;
    c.request_digest("quiet").await;
    c.status("loud", "a", "WARNING", "2021-06-07T20:00:01Z")
        .await;
    c.request_digest("loud").await;
    // The only digest is loud's: quiet's request, answered first, published nothing.
    let digest = w.digests.next().await;
    assert_eq!(digest.user_id, "loud");
    w.digests
        .assert_none_within(Duration::from_millis(500))
        .await;
    w.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn plain_nats_publishes_from_producers_are_captured() {
    let mut w = world().await;
    let c = &w.client;
    let subject = c.config.streams.status_subject.clone();
    let payload = status_payload("u", "a", "WARNING", "2021-06-07T20:00:01Z");
    c.nats
        .publish(subject, payload.into())
        .await
        .expect("publish");
    let request = c.config.streams.digest_request_subject.clone();
    c.nats
        .publish(request, r#"{"UserID":"u"}"#.into())
        .await
        .expect("publish");
    // Core publishes from one connection reach the server in order; the stream was created
    // before, so both are captured (no PubAck to wait for, as with real producers).
    c.nats.flush().await.expect("flush");
    let digest = w.digests.next().await;
    assert_eq!(
        entries(&digest),
        [triple("a", "WARNING", "2021-06-07T20:00:01Z")]
    );
    w.service.stop().await.expect("clean stop");
}
