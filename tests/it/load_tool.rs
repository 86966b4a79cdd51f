//! `alarm-digest bench` publishes as a careful producer does: a broker that refuses or stops
//! taking its messages ends the run with an error naming what was never acknowledged, within
//! its give-up time, never an endless wait.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::DiscardPolicy;

use crate::support::*;

/// Runs `bench` against `nats` until it exits; fails the test if it is still running after
/// `limit` (a hung load tool is the defect under test).
fn bench(nats: &NatsServer, args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let url = nats.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_alarm-digest"))
        .arg("bench")
        .args(args)
        .env("ALARM_DIGEST_NATS__URL", &url)
        .env("ALARM_DIGEST_SHARDS__COUNT", "4")
        .env("ALARM_DIGEST_STORAGE__PATH", dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run alarm-digest bench");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "bench still running after {limit:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code(), text)
}

#[tokio::test]
async fn bench_against_a_stream_that_refuses_new_messages_names_what_it_never_stored() {
    let nats = NatsServer::start();
    let (code, _, stderr) = cli_against(&nats, &["setup"]);
    assert_eq!(code, Some(0), "{stderr}");
    // The input stream takes 100 messages and refuses the rest (discard new), as a full
    // stream or a server shedding load at ingest does.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let mut input = js.get_stream("ALARM_DIGEST_INPUT").await.expect("input");
    let mut config = input.info().await.expect("info").config.clone();
    config.max_messages = 100;
    config.discard = DiscardPolicy::New;
    js.update_stream(&config)
        .await
        .expect("limit the input stream");

    let (code, text) = bench(
        &nats,
        &["--events", "1000", "--digests", "0", "--give-up-secs", "3"],
        Duration::from_secs(60),
    );
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains("900 of 1000 messages to AlarmStatusChanged were never acknowledged"),
        "{text}"
    );
    assert!(
        text.contains("maximum messages"),
        "the broker's refusal: {text}"
    );
}

#[tokio::test]
async fn bench_against_a_broker_stopped_mid_run_fails_within_its_give_up_time() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let limit = Duration::from_secs(90);
    let runner = std::thread::spawn({
        let nats_url = url.clone();
        move || {
            let dir = tempfile::tempdir().expect("temp dir");
            let started = Instant::now();
            let output = Command::new(env!("CARGO_BIN_EXE_alarm-digest"))
                .args(["bench", "--events", "5000000", "--digests", "0"])
                .args(["--give-up-secs", "3", "--timeout-secs", "80"])
                .env("ALARM_DIGEST_NATS__URL", &nats_url)
                .env("ALARM_DIGEST_SHARDS__COUNT", "4")
                .env("ALARM_DIGEST_STORAGE__PATH", dir.path())
                .env("RUST_LOG", "warn")
                .output()
                .expect("run alarm-digest bench");
            (output, started.elapsed())
        }
    });
    // Let it publish for a while (the input stream fills), then take the broker away.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = match js.get_stream("ALARM_DIGEST_INPUT").await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        };
        if stored >= 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "bench published nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nats.stop();

    let (output, elapsed) = runner.join().expect("bench runner");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(elapsed < limit, "bench took {elapsed:?}: {text}");
    assert_ne!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("of 5000000 messages to AlarmStatusChanged were never acknowledged"),
        "{text}"
    );
}

#[tokio::test]
async fn bench_against_a_running_instance_measures_ingest_and_digest_latency() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().expect("data dir");
    let service = ServiceProcess::spawn(&nats, data.path(), &[]);
    wait_ready(&service.http).await;
    // Events and digest requests share the input stream: their Msg-Ids must not collide.
    let (code, text) = bench(
        &nats,
        &[
            "--events",
            "200",
            "--users",
            "20",
            "--alarms",
            "2",
            "--digests",
            "10",
            "--digest-rate",
            "100",
            "--give-up-secs",
            "10",
        ],
        Duration::from_secs(90),
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("digest latency          10 reqs"), "{text}");
    assert!(
        text.contains("210 messages acknowledged by the broker"),
        "{text}"
    );
}

/// The latency `bench` reports is each request's own: from its publish to its digest. A tool
/// that sent paced requests only at the end of the run (or timed them from its start)
/// reports latencies that grow with each request's place, up to the run's length; here no
/// request may take half of the 3 s run, against a service that answers in milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_times_each_digest_request_from_its_own_publish() {
    let bed = TestBed::start().await;
    let service = ServiceProcess::spawn(&bed.nats, bed.data.path(), &[]);
    wait_ready(&service.http).await;
    let (code, out) = bench(
        &bed.nats,
        &[
            "--events",
            "200",
            "--users",
            "50",
            "--digests",
            "30",
            "--digest-rate",
            "10",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "{out}");
    let line = out
        .lines()
        .find(|line| line.starts_with("digest latency"))
        .unwrap_or_else(|| panic!("no latency line: {out}"));
    let max_ms: f64 = line
        .split("max ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.trim().parse().ok())
        .unwrap_or_else(|| panic!("no max in {line}"));
    assert!(max_ms < 1_500.0, "{line}");
}
