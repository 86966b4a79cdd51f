//! The operator's tools the tests run for real: Prometheus (`prometheus`, `promtool`, from
//! Debian's `prometheus` package) and `kubernetes-validate` (PyPI). A missing one fails the
//! test with how to install it; `scripts/test.sh` installs them when run as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, http_get};

fn find(name: &str, env: &str, hint: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| panic!("{name} is required by this test and was not found ({env}, /usr/bin, $PATH). {hint}"))
}

const PROMETHEUS_HINT: &str =
    "Install it with `sudo apt-get install prometheus` (it brings promtool), or run ./scripts/test.sh as root.";

pub fn promtool() -> PathBuf {
    find("promtool", "PROMTOOL_BIN", PROMETHEUS_HINT)
}

pub fn kubernetes_validate() -> PathBuf {
    find(
        "kubernetes-validate",
        "KUBERNETES_VALIDATE_BIN",
        "Install it with `pip install kubernetes-validate`, or run ./scripts/test.sh as root.",
    )
}

/// Runs a tool to completion.
pub fn run(tool: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(tool);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("tool output")
}

/// A real Prometheus server on a free loopback port with its own storage dir, scraping
/// `targets` as job `alarm-digest` every second and loading the shipped alert rules.
pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    pub addr: String,
}

impl Prometheus {
    pub async fn start(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().expect("prometheus dir");
        let rules = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/prometheus/alerts.yml"
        );
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: alarm-digest\n    static_configs:\n      - targets: [{targets}]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("prometheus config");
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(find("prometheus", "PROMETHEUS_BIN", PROMETHEUS_HINT))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&prometheus.addr, "/-/ready").await {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query through the HTTP API: `(labels, value)` of each sample.
    pub async fn query(&self, promql: &str) -> Vec<(serde_json::Value, String)> {
        let path = format!(
            "/api/v1/query?query={}",
            alarm_digest::http::percent_encode(promql)
        );
        let Ok((200, body)) = http_get(&self.addr, &path).await else {
            return Vec::new();
        };
        let answer: serde_json::Value = serde_json::from_str(&body).expect("prometheus JSON");
        answer["data"]["result"]
            .as_array()
            .map(|samples| {
                samples
                    .iter()
                    .map(|s| {
                        (
                            s["metric"].clone(),
                            s["value"][1].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> String {
        http_get(&self.addr, path)
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
