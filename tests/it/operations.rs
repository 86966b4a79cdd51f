//! The operator's surface, checked with the operator's own tools: `/metrics` linted by
//! promtool and scraped by a real Prometheus, the shipped alert rules' unit tests, the
//! dashboard's queries against the names the service exports, the Kubernetes manifests against
//! the Kubernetes schema, and no user data on a listener open to the network.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::tools::{self, Prometheus};
use crate::support::*;

const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/prometheus/alerts.yml"
);
const ALERT_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/prometheus/alerts_test.yml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/grafana/alarm-digest.json"
);

/// An instance that has applied events, answered a digest, dead-lettered a message and read
/// its consumers' state at least once: every metric family then has a sample.
async fn busy_instance() -> (TestBed, alarm_digest::service::RunningService) {
    // Snapshots every second, so the snapshot gauges have a sample too.
    let bed = TestBed::start_with(|config| {
        config.tuning.consumer_stats_every_secs = 1;
        config.snapshots.every_secs = 1;
    })
    .await;
    let service = start_service(bed.config.clone()).await;
    bed.client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:00Z")
        .await;
    bed.client
        .publish(&bed.config.streams.status_subject.clone(), "not json")
        .await;
    let mut digests = bed.client.digests().await;
    bed.client.request_digest("u").await;
    digests.next_for("u").await;
    bed.client.wait_drained().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = std::time::Instant::now() + WAIT;
    while service.metrics.snapshots_taken.get() == 0 {
        assert!(std::time::Instant::now() < deadline, "no snapshot taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (bed, service)
}

async fn scrape(service: &alarm_digest::service::RunningService) -> String {
    let (status, body) = http_get(&service.http_addr.to_string(), "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    body
}

/// Every series name a scrape exposes, including the `_total`, `_bucket`, `_sum`, `_count` and
/// `_info` names of families declared without a sample yet.
fn exported_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_string());
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    "info" => &["_info"],
                    _ => &[],
                };
                for suffix in suffixes {
                    names.insert(format!("{}{suffix}", name.trim_end_matches("_total")));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            names.insert(name.to_string());
        }
    }
    names
}

/// The metric names a PromQL expression reads.
fn queried_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut index = 0;
    while index < bytes.len() {
        let rest: String = bytes[index..].iter().collect();
        let starts_name =
            index == 0 || !(bytes[index - 1].is_alphanumeric() || bytes[index - 1] == '_');
        if starts_name && (rest.starts_with("alarm_digest_") || rest.starts_with("process_")) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            index += name.len();
            names.push(name);
        } else {
            index += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_carry_process_build_lag_and_latency() {
    let (_bed, service) = busy_instance().await;
    let metrics = scrape(&service).await;
    let lint = tools::run(&tools::promtool(), &["check", "metrics"], Some(&metrics));
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let version = env!("CARGO_PKG_VERSION");
    for expected in [
        "process_resident_memory_bytes ".to_string(),
        "process_cpu_seconds_total ".to_string(),
        "process_open_fds ".to_string(),
        "process_start_time_seconds ".to_string(),
        format!("alarm_digest_build_info{{version=\"{version}\"}} 1"),
        "alarm_digest_ready 1".to_string(),
        "alarm_digest_shard_consumer_pending{shard=\"0\"} 0".to_string(),
        "alarm_digest_shard_consumer_redelivered{shard=\"0\"} 0".to_string(),
        "alarm_digest_input_consumer_pending 0".to_string(),
        "alarm_digest_outbox_entries{shard=\"0\"} 0".to_string(),
        "alarm_digest_digest_latency_seconds_count 1".to_string(),
        "alarm_digest_rejected_total{reason=\"malformed\"} 1".to_string(),
    ] {
        assert!(
            metrics.contains(&expected),
            "missing {expected:?}:\n{metrics}"
        );
    }
    assert!(!metrics.contains("user="), "a user ID is never a label");
    service.stop().await.expect("clean stop");
}

#[test]
fn alert_rules_are_valid_and_pass_their_unit_tests() {
    let promtool = tools::promtool();
    for args in [["check", "rules", ALERTS], ["test", "rules", ALERT_TESTS]] {
        let output = tools::run(&promtool, &args, None);
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_query_only_metrics_the_service_exports() {
    let (_bed, service) = busy_instance().await;
    let exported = exported_names(&scrape(&service).await);
    service.stop().await.expect("clean stop");

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard"))
            .expect("JSON");
    let mut exprs: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(query) = variable["query"].as_str() {
            exprs.push(query.to_string());
        }
    }
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for topic in ["Ingest", "Lag", "latency", "Dead letters", "memory"] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "no {topic} panel: {titles:?}"
        );
    }
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(ALERTS).expect("alerts")).expect("YAML");
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            exprs.push(rule["expr"].as_str().expect("expr").to_string());
        }
    }
    let mut queried = 0;
    for expr in &exprs {
        for name in queried_names(expr) {
            queried += 1;
            assert!(
                exported.contains(&name),
                "{name} (in `{expr}`) is not exported; exported: {exported:?}"
            );
        }
    }
    assert!(queried > 20, "only {queried} metric references found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_running_instance_and_sees_the_counter_move() {
    let bed = TestBed::start().await;
    let service = start_service(bed.config.clone()).await;
    let prometheus = Prometheus::start(&[service.http_addr.to_string()]).await;
    for n in 0..5 {
        bed.client
            .status("u", &format!("a{n}"), "WARNING", "2021-06-07T20:00:00Z")
            .await;
    }
    bed.client.wait_drained().await;
    let query = r#"alarm_digest_events_applied_total{job="alarm-digest"}"#;
    let deadline = Instant::now() + WAIT;
    loop {
        let samples = prometheus.query(query).await;
        if samples.iter().any(|(_, value)| value == "5") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw 5 applied events: {samples:?}; targets: {}",
            prometheus.get("/api/v1/targets").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let up = prometheus.query(r#"up{job="alarm-digest"}"#).await;
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0].1, "1");
    let rss = prometheus.query("process_resident_memory_bytes").await;
    assert!(
        rss.first()
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .is_some_and(|bytes| bytes > 1e6),
        "{rss:?}"
    );
    let rules = prometheus.get("/api/v1/rules").await;
    assert!(
        rules.contains("AlarmDigestOutboxStuck"),
        "rules not loaded: {rules}"
    );
    assert!(prometheus.data_dir().exists());
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_open_to_the_network_never_serves_inspect() {
    let bed = TestBed::start_with(|config| {
        config.http.listen = "0.0.0.0:0".into();
        config.http.inspect_listen = "127.0.0.1:0".into();
    })
    .await;
    let service = start_service_unready(bed.config.clone()).await;
    let open = format!("127.0.0.1:{}", service.http_addr.port());
    wait_ready(&open).await;
    bed.client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:00Z")
        .await;
    bed.client.wait_drained().await;

    let (status, _) = http_get(&open, "/inspect/user?id=u").await.expect("answer");
    assert_eq!(status, 404, "the open listener refuses /inspect");
    let (status, _) = http_get(&open, "/metrics").await.expect("answer");
    assert_eq!(status, 200, "probes and metrics stay on it");
    let inspect = service.inspect_addr.to_string();
    assert!(service.inspect_addr.ip().is_loopback());
    let (status, body) = http_get(&inspect, "/inspect/user?id=u")
        .await
        .expect("answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"alarm_id\":\"a\""), "{body}");
    let (status, _) = http_get(&inspect, "/metrics").await.expect("answer");
    assert_eq!(status, 404, "the loopback listener serves /inspect alone");
    service.stop().await.expect("clean stop");

    // The CLI finds a running instance's /inspect through the same config.
    let data = &bed.data;
    let (http, inspect) = (free_port(), free_port());
    let env = [
        ("ALARM_DIGEST_HTTP__LISTEN", format!("0.0.0.0:{http}")),
        (
            "ALARM_DIGEST_HTTP__INSPECT_LISTEN",
            format!("127.0.0.1:{inspect}"),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let process = ServiceProcess::spawn(&bed.nats, data.path(), &env);
    wait_ready(&format!("127.0.0.1:{http}")).await;
    let url = bed.nats.url();
    let data_path = data.path().to_string_lossy().into_owned();
    let mut cli_env = env.clone();
    cli_env.extend([
        ("ALARM_DIGEST_NATS__URL", url.as_str()),
        ("ALARM_DIGEST_SHARDS__COUNT", "4"),
        ("ALARM_DIGEST_STORAGE__PATH", data_path.as_str()),
    ]);
    let (code, stdout, stderr) = run_binary(&["inspect", "user", "u"], &cli_env);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"alarm_id\": \"a\""), "{stdout}");
    drop(process);
}

#[test]
fn a_non_loopback_inspect_listener_is_a_config_error() {
    let (code, _, stderr) = run_binary(
        &["run"],
        &[("ALARM_DIGEST_HTTP__INSPECT_LISTEN", "0.0.0.0:9091")],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("http.inspect_listen"), "{stderr}");
}

#[test]
fn the_kubernetes_manifests_are_valid_for_kubernetes_1_37() {
    let dirs = ["packaging/kubernetes", "packaging/nats"]
        .map(|dir| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir));
    let mut manifests: Vec<String> = dirs
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("manifests"))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        // kustomization.yaml is kustomize's, not a Kubernetes resource: it has no schema.
        .filter(|path| !path.ends_with("kustomization.yaml"))
        .map(|path| path.to_string_lossy().into_owned())
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 5, "{manifests:?}");
    let mut args = vec!["--strict", "--kubernetes-version", "1.37"];
    args.extend(manifests.iter().map(String::as_str));
    let output = tools::run(&tools::kubernetes_validate(), &args, None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    for manifest in &manifests {
        assert!(
            text.lines()
                .any(|l| l.contains(manifest.as_str()) && l.contains("passed")),
            "{manifest} not validated: {text}"
        );
    }
}
