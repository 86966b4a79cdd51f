//! Invalid input is dead-lettered with its reason and origin, never applied, never blocking.

use crate::support::*;
use alarm_digest::bus::DeadLetterHeaders;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use std::collections::BTreeMap;

#[tokio::test]
async fn garbage_on_both_input_subjects_is_dead_lettered_while_good_traffic_flows() {
    let bed = TestBed::start_with(|c| {
        c.limits.max_payload_bytes = 1024;
    })
    .await;
    let service = start_service(bed.config.clone()).await;
    let status = bed.config.streams.status_subject.clone();
    let request = bed.config.streams.digest_request_subject.clone();
    let long_id = "x".repeat(257);

    let garbage: Vec<(&str, String, &str)> = vec![
        (&status, "not json at all".into(), "malformed"),
        (
            &status,
            r#"{"UserID":"u","Status":"WARNING","ChangedAt":"2021-06-07T20:00:01Z"}"#.into(),
            "missing_field",
        ),
        (
            &status,
            status_payload("u", "a", "SORT_OF_BAD", "2021-06-07T20:00:01Z"),
            "unknown_status",
        ),
        (
            &status,
            status_payload("u", "a", "WARNING", "last tuesday"),
            "bad_time",
        ),
        (
            &status,
            status_payload(&long_id, "a", "WARNING", "2021-06-07T20:00:01Z"),
            "id_too_long",
        ),
        (
            &status,
            format!(r#"{{"pad":"{}"}}"#, "p".repeat(2000)),
            "too_large",
        ),
        (&request, "{".into(), "malformed"),
        (&request, r#"{"UserID":""}"#.into(), "empty_field"),
        (&request, "null".into(), "malformed"),
    ];
    for (i, (subject, payload, _)) in garbage.iter().enumerate() {
        bed.client.publish(subject, payload.clone()).await;
        // Good traffic interleaved with the bad.
        bed.client
            .status("u", &format!("good-{i}"), "WARNING", "2021-06-07T20:00:01Z")
            .await;
    }
    bed.client.request_digest("u").await;

    let mut digests = bed.client.digests().await;
    let digest = digests.next().await;
    assert_eq!(
        digest.active_alarms.len(),
        garbage.len(),
        "every good event applied"
    );
    assert!(digest
        .active_alarms
        .iter()
        .all(|a| a.alarm_id.starts_with("good-")));

    let dead_letters = bed
        .client
        .js
        .get_stream(&bed.config.streams.dead_letter_stream)
        .await
        .expect("dead-letter stream")
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut records = dead_letters.messages().await.expect("messages");
    let mut reasons = BTreeMap::new();
    for (_, payload, expected_reason) in &garbage {
        let record = tokio::time::timeout(WAIT, records.next())
            .await
            .expect("a dead letter")
            .expect("open")
            .expect("message");
        let headers = record.headers.clone().expect("dead letters carry headers");
        let reason = headers
            .get(DeadLetterHeaders::REASON)
            .expect("reason")
            .to_string();
        assert_eq!(&reason, expected_reason, "for {payload:.60}");
        let subject = headers
            .get(DeadLetterHeaders::ORIGINAL_SUBJECT)
            .expect("subject")
            .to_string();
        assert!(subject == status || subject == request);
        let sequence = headers
            .get(DeadLetterHeaders::STREAM_SEQUENCE)
            .expect("sequence");
        assert!(sequence.as_str().parse::<u64>().expect("a number") > 0);
        assert!(headers.get(DeadLetterHeaders::ERROR).is_some());
        assert_eq!(
            record.payload.as_ref(),
            payload.as_bytes(),
            "original payload kept"
        );
        *reasons.entry(reason).or_insert(0) += 1;
    }
    assert_eq!(service.metrics.rejected_total(), garbage.len() as u64);

    // Nothing is stuck: the input stream is empty and the service stays ready.
    bed.client.wait_drained().await;
    let (status_code, _) = http_get(&service.http_addr.to_string(), "/readyz")
        .await
        .expect("readyz");
    assert_eq!(status_code, 200);
    let (_, metrics) = http_get(&service.http_addr.to_string(), "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics.contains(r#"alarm_digest_rejected_total{reason="malformed"} 3"#),
        "{metrics}"
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_alarm_beyond_the_per_user_limit_is_dead_lettered_and_updates_still_apply() {
    let bed = TestBed::start_with(|c| {
        c.limits.max_alarms_per_user = 2;
    })
    .await;
    let service = start_service(bed.config.clone()).await;
    bed.client
        .status("big", "a1", "WARNING", "2021-06-07T20:00:01Z")
        .await;
    bed.client
        .status("big", "a2", "WARNING", "2021-06-07T20:00:02Z")
        .await;
    bed.client
        .status("big", "a3", "CRITICAL", "2021-06-07T20:00:03Z")
        .await;
    bed.client
        .status("big", "a1", "CRITICAL", "2021-06-07T20:00:04Z")
        .await;
    bed.client.request_digest("big").await;

    let digest = bed.client.digests().await.next().await;
    assert_eq!(
        entries(&digest),
        [
            ("a2".into(), "WARNING".into(), "2021-06-07T20:00:02Z".into()),
            (
                "a1".into(),
                "CRITICAL".into(),
                "2021-06-07T20:00:04Z".into()
            ),
        ]
    );
    let mut dead_letters = bed
        .client
        .js
        .get_stream(&bed.config.streams.dead_letter_stream)
        .await
        .expect("dead-letter stream");
    let record = dead_letters
        .get_raw_message(1)
        .await
        .expect("one dead letter");
    assert!(String::from_utf8_lossy(&record.payload).contains(r#""AlarmID":"a3""#));
    let headers = record.headers;
    assert_eq!(
        headers
            .get(DeadLetterHeaders::REASON)
            .map(|v| v.to_string()),
        Some("too_many_alarms".to_string())
    );
    assert_eq!(dead_letters.info().await.expect("info").state.messages, 1);
    service.stop().await.expect("clean stop");
}
