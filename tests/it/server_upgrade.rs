//! A deployment of the release before, on the server it ran (Debian 12's nats-server 2.9.10),
//! upgraded in place: the broker restarted on the newest release over the same store dir,
//! then the instance on this build over its data dir. Streams, buckets, snapshots, queued
//! events and the output stream all carry over: every alarm is kept and none is re-sent.

use std::time::Duration;

use tempfile::tempdir;

use crate::support::*;

#[tokio::test]
async fn a_deployment_on_nats_2_9_keeps_every_alarm_across_an_in_place_server_upgrade() {
    let mut nats = NatsServer::start_previous_release();
    let data = tempdir().unwrap();
    let config = test_config(&nats, data.path());
    let users: Vec<String> = (0..8).map(|i| format!("upgrading-user-{i}")).collect();
    let (answered, unanswered) = users.split_at(4);

    // Before: every user has two active alarms; half of them got their digest.
    let client = TestClient::connect(&config).await;
    let service = start_service(config.clone()).await;
    for user in &users {
        client
            .status(user, "disk", "CRITICAL", "2026-01-01T00:00:01Z")
            .await;
        client
            .status(user, "cpu", "WARNING", "2026-01-01T00:00:02Z")
            .await;
    }
    for user in answered {
        client.request_digest(user).await;
    }
    // Shards answer in any order: collect one digest per request, then check them.
    let mut before = client.digests().await;
    let mut first_digests = Vec::new();
    for _ in answered {
        first_digests.push(before.next().await);
    }
    let mut got: Vec<_> = first_digests.iter().map(|d| d.user_id.clone()).collect();
    got.sort();
    assert_eq!(got, answered);
    assert!(first_digests.iter().all(|d| d.active_alarms.len() == 2));
    client.wait_drained().await;
    service.stop().await.expect("clean stop");
    // While the service is down, new events queue in the input stream on the old server.
    for user in answered {
        client
            .status(user, "net", "CRITICAL", "2026-01-01T00:00:03Z")
            .await;
    }
    drop(before);
    drop(client);

    nats.upgrade_in_place();
    let client = TestClient::connect(&config).await;
    let version = client.nats.server_info().version;
    assert!(
        alarm_digest::bus::is_supported_server(&version),
        "upgraded to {version}"
    );
    let _service = start_service(config.clone()).await;
    for user in &users {
        client.request_digest(user).await;
    }
    // The output stream from its start: the 4 digests from before the upgrade, one per request
    // now, and nothing more.
    let mut reader = client.digests().await;
    let mut all = Vec::new();
    for _ in 0..4 + 8 {
        all.push(reader.next().await);
    }
    reader.assert_none_within(Duration::from_secs(2)).await;
    let after = &all[4..];
    assert_eq!(duplicate_alarms(&all), 0, "nothing re-sent: {all:#?}");
    for user in answered {
        let digest = after.iter().find(|d| &d.user_id == user).expect("answered");
        let alarms: Vec<_> = entries(digest).into_iter().map(|e| e.0).collect();
        assert_eq!(alarms, ["net"], "only what changed since its last digest");
    }
    for user in unanswered {
        let digest = after.iter().find(|d| &d.user_id == user).expect("answered");
        let alarms: Vec<_> = entries(digest).into_iter().map(|e| e.0).collect();
        assert_eq!(alarms, ["disk", "cpu"], "every active alarm, oldest first");
    }
}
