//! The binary's contract: exit codes, `setup`, `inspect`, health endpoints.

use std::time::Duration;

use tempfile::tempdir;

use crate::support::*;

#[test]
fn bad_config_exits_64_and_names_the_key() {
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("ALARM_DIGEST_SHARDS__COUNT", "0")], "shards.count"),
        // A server list with one bad URL: a config error, never a connection to retry.
        (
            &[(
                "ALARM_DIGEST_NATS__URL",
                "nats://127.0.0.1:4222,nats://127.0.0.1:port,nats://127.0.0.1:4224",
            )],
            "nats.url",
        ),
        (
            &[("ALARM_DIGEST_LIMITS__MAX_FUTURE_SKEW_SECS", "0")],
            "limits.max_future_skew_secs",
        ),
        (
            &[("ALARM_DIGEST_HTTP__LISTEN", "not-an-address")],
            "http.listen",
        ),
        (
            &[
                ("ALARM_DIGEST_SHARDS__COUNT", "4"),
                ("ALARM_DIGEST_SHARDS__OWNED", "[9]"),
            ],
            "shards.owned",
        ),
        (
            &[("ALARM_DIGEST_CONFIG", "/nonexistent/alarm-digest.toml")],
            "does not exist",
        ),
    ];
    for (env, key) in cases {
        let (code, _, stderr) = run_binary(&["run"], env);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(key), "{env:?} should name {key}: {stderr}");
    }
}

#[test]
fn a_changed_shard_count_is_refused_with_how_to_migrate() {
    let data = tempdir().expect("data dir");
    let store = alarm_digest::store::Store::open(data.path(), 8).expect("open");
    store.check_shard_count(4).expect("record");
    drop(store);
    let path = data.path().to_string_lossy().into_owned();
    let (code, _, stderr) = run_binary(
        &["run"],
        &[
            ("ALARM_DIGEST_STORAGE__PATH", &path),
            ("ALARM_DIGEST_SHARDS__COUNT", "8"),
        ],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("holds 4 shards") && stderr.contains("migrate"),
        "{stderr}"
    );
}

#[test]
fn a_server_without_jetstream_is_a_clear_fatal_error() {
    let nats = NatsServer::start_without_jetstream();
    let data = tempdir().expect("data dir");
    let path = data.path().to_string_lossy().into_owned();
    let (code, _, stderr) = run_binary(
        &["run"],
        &[
            ("ALARM_DIGEST_NATS__URL", &nats.url()),
            ("ALARM_DIGEST_STORAGE__PATH", &path),
            ("ALARM_DIGEST_HTTP__LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("does not have JetStream enabled"),
        "{stderr}"
    );
}

#[tokio::test]
async fn setup_creates_every_stream_and_is_idempotent() {
    let nats = NatsServer::start();
    let env = [
        ("ALARM_DIGEST_NATS__URL", nats.url()),
        ("ALARM_DIGEST_SHARDS__COUNT", "4".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for _ in 0..2 {
        let (code, stdout, stderr) = run_binary(&["setup"], &env);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stdout.contains("ok"));
    }
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let defaults = alarm_digest::config::StreamsConfig::default();
    let mut names = vec![
        defaults.input_stream.clone(),
        defaults.output_stream.clone(),
        defaults.dead_letter_stream.clone(),
    ];
    names.push(defaults.snapshot_stream.clone());
    names.extend((0..4).map(|s| format!("{}_LOG_{s}", defaults.shard_stream_prefix)));
    for name in names {
        js.get_stream(&name)
            .await
            .unwrap_or_else(|e| panic!("{name} missing: {e}"));
    }
}

#[test]
fn publish_waits_for_the_stream_to_store_the_message_and_fails_when_none_does() {
    let nats = NatsServer::start();
    let (code, _, stderr) = cli_against(&nats, &["setup"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) =
        cli_against(&nats, &["publish", "SendAlarmDigest", r#"{"UserID":"u1"}"#]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("stored in ALARM_DIGEST_INPUT at sequence 1"),
        "{stderr}"
    );
    // No stream captures it: a plain publish would vanish without a word.
    let (code, _, stderr) = cli_against(&nats, &["publish", "Nobody.Listens", "{}"]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("Nobody.Listens: not stored"), "{stderr}");
}

#[tokio::test]
async fn inspect_reads_a_running_instance_over_http_and_a_stopped_one_from_disk() {
    let bed = TestBed::start().await;
    let service = ServiceProcess::spawn(&bed.nats, bed.data.path(), &[]);
    wait_ready(&service.http).await;
    bed.client
        .status("u/1 é", "a", "CRITICAL", "2021-06-07T20:00:01Z")
        .await;
    bed.client.request_digest("u/1 é").await;
    let mut digests = bed.client.digests().await;
    assert_eq!(digests.next().await.active_alarms.len(), 1);

    let path = bed.data.path().to_string_lossy().into_owned();
    let http = service.http.clone();
    let env = [
        ("ALARM_DIGEST_STORAGE__PATH", path.as_str()),
        ("ALARM_DIGEST_HTTP__LISTEN", http.as_str()),
        ("ALARM_DIGEST_SHARDS__COUNT", "4"),
    ];
    let (code, online, stderr) = run_binary(&["inspect", "user", "u/1 é"], &env);
    assert_eq!(code, Some(0), "{stderr}");
    let report: alarm_digest::wire::UserReport =
        serde_json::from_str(&online).expect("JSON report");
    assert_eq!(report.alarms.len(), 1);
    assert_eq!(report.alarms[0].status, "CRITICAL");
    assert_eq!(report.alarms[0].sent_status.as_deref(), Some("CRITICAL"));
    assert!(!report.alarms[0].due);

    service.signal("TERM");
    assert_eq!(service.wait_exit(Duration::from_secs(15)).code(), Some(0));
    let (code, offline, stderr) = run_binary(&["inspect", "user", "u/1 é"], &env);
    assert_eq!(code, Some(0), "{stderr}");
    let offline: alarm_digest::wire::UserReport =
        serde_json::from_str(&offline).expect("JSON report");
    assert_eq!(offline, report, "the same state, read from disk");
}

#[tokio::test]
async fn live_while_waiting_for_nats_and_ready_once_it_comes_up() {
    let data = tempdir().expect("data dir");
    let port = free_port();
    let path = data.path().to_string_lossy().into_owned();
    let http = format!("127.0.0.1:{}", free_port());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_alarm-digest"));
    command
        .arg("run")
        .env("ALARM_DIGEST_NATS__URL", format!("nats://127.0.0.1:{port}"))
        .env("ALARM_DIGEST_STORAGE__PATH", &path)
        .env("ALARM_DIGEST_HTTP__LISTEN", &http)
        .env("RUST_LOG", "error")
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().expect("spawn");
    let deadline = std::time::Instant::now() + WAIT;
    while http_get(&http, "/livez").await.map(|r| r.0).unwrap_or(0) != 200 {
        assert!(std::time::Instant::now() < deadline, "never live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = http_get(&http, "/readyz").await.expect("readyz");
    assert_eq!(code, 503);
    assert!(body.contains("nats"), "{body}");

    // The broker comes up later: start order does not matter.
    let _nats = NatsServer::start_on(port);
    wait_ready(&http).await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn dlq_lists_records_and_replays_them_once_the_cause_is_fixed() {
    let mut bed = TestBed::start_with(|c| {
        c.limits.max_alarms_per_user = 1;
    })
    .await;
    let service = start_service(bed.config.clone()).await;
    bed.client
        .status("u", "first", "WARNING", "2021-06-07T20:00:01Z")
        .await;
    bed.client
        .status("u", "second", "CRITICAL", "2021-06-07T20:00:02Z")
        .await;
    let subject = bed.config.streams.status_subject.clone();
    bed.client.publish(&subject, "not json").await;
    bed.client.wait_drained().await;
    service.stop().await.expect("clean stop");

    let url = bed.nats.url();
    let env = [
        ("ALARM_DIGEST_NATS__URL", url.as_str()),
        ("ALARM_DIGEST_SHARDS__COUNT", "4"),
    ];
    let (code, listed, stderr) = run_binary(&["dlq", "list"], &env);
    assert_eq!(code, Some(0), "{stderr}");
    let reasons: Vec<String> = listed
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).expect("JSON line")["reason"]
                .to_string()
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{listed}");
    assert!(
        listed.contains("too_many_alarms") && listed.contains("malformed"),
        "{listed}"
    );
    let (code, _, stderr) = run_binary(&["dlq", "replay"], &env);
    assert_eq!(code, Some(1), "replay needs a selector");
    assert!(
        stderr.contains("--seq") && stderr.contains("--all"),
        "{stderr}"
    );

    // The cause is fixed: the limit is raised. Replay puts the event back through the router.
    bed.config.limits.max_alarms_per_user = 100;
    let service = start_service(bed.config.clone()).await;
    let (code, replayed, stderr) =
        run_binary(&["dlq", "replay", "--reason", "too_many_alarms"], &env);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(replayed.contains("replayed 1"), "{replayed}");
    bed.client.wait_drained().await;
    bed.client.request_digest("u").await;
    let digest = bed.client.digests().await.next().await;
    let ids: Vec<&str> = digest
        .active_alarms
        .iter()
        .map(|a| a.alarm_id.as_str())
        .collect();
    assert_eq!(ids, ["first", "second"]);
    let (_, listed, _) = run_binary(&["dlq", "list"], &env);
    assert_eq!(
        listed.lines().count(),
        1,
        "only the malformed record is left: {listed}"
    );
    service.stop().await.expect("clean stop");
}
