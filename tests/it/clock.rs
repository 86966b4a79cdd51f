//! One clock decides: an instance whose wall clock is wrong (libfaketime, Debian's
//! `faketime` package) judges events by the time the broker stored them, and says how far off
//! its own clock is.

use std::path::Path;
use std::time::{Duration, Instant};

use tempfile::tempdir;

use crate::support::*;

/// Debian's libfaketime (multithreaded build), which scripts/test.sh installs.
fn libfaketime() -> &'static str {
    let path = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    assert!(
        Path::new(path).is_file(),
        "{path} is missing: `sudo apt-get install faketime` (scripts/test.sh does it as root)"
    );
    path
}

/// `alarm_digest_clock_skew_seconds` of an instance, once it has read the broker's time.
async fn skew(http: &str) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(http, "/metrics").await.expect("metrics");
        let value = body.lines().find_map(|line| {
            line.strip_prefix("alarm_digest_clock_skew_seconds ")?
                .parse::<f64>()
                .ok()
        });
        if let Some(value) = value.filter(|v| *v != 0.0) {
            return value;
        }
        assert!(Instant::now() < deadline, "no clock skew reading: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_clock_is_ten_minutes_slow_applies_honest_events_and_reports_its_skew() {
    let bed = TestBed::start().await;
    let data = tempdir().expect("data dir");
    // The wall clock 10 minutes behind; the monotonic clock (timers, leases) left alone.
    let slow = ServiceProcess::spawn(
        &bed.nats,
        data.path(),
        &[
            ("LD_PRELOAD", libfaketime()),
            ("FAKETIME", "-10m"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    wait_ready(&slow.http).await;
    let mut digests = bed.client.digests().await;
    let now = chrono::Utc::now();
    let stamp = |at: chrono::DateTime<chrono::Utc>| alarm_digest::wire::format_time(&at);

    // An agent with a correct clock: its event is 10 minutes ahead of the instance's clock,
    // and on time by the broker's.
    bed.client
        .status("u", "honest", "CRITICAL", &stamp(now))
        .await;
    // An agent whose clock is truly ahead, by 10 minutes of the broker's time.
    let ahead = now + chrono::Duration::minutes(10);
    bed.client
        .status("u", "ahead", "CRITICAL", &stamp(ahead))
        .await;
    bed.client.request_digest("u").await;
    let digest = digests.next_for("u").await;
    assert_eq!(
        entries(&digest),
        [("honest".into(), "CRITICAL".into(), stamp(now))],
        "the honest event applied, the one from the future did not"
    );

    let (_, metrics) = http_get(&slow.http, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("alarm_digest_rejected_total{reason=\"future_time\"} 1\n"),
        "{metrics}"
    );
    let skew = skew(&slow.http).await;
    assert!((-610.0..=-590.0).contains(&skew), "skew {skew}");
    let (code, readyz) = http_get(&slow.http, "/readyz").await.expect("readyz");
    assert_eq!(code, 200, "a slow clock does not make the instance unready");
    assert!(
        readyz.contains("warning: clock: this host's clock is 600 s behind the broker's"),
        "{readyz}"
    );
}
