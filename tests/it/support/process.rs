//! The real binary as a process: the service configured through the documented
//! environment, and one-shot commands against a broker.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::NatsServer;

/// The real binary, configured through the documented environment variables.
pub struct ServiceProcess {
    child: Child,
    pub http: String,
}

impl ServiceProcess {
    pub fn spawn(nats: &NatsServer, data_dir: &Path, extra_env: &[(&str, &str)]) -> ServiceProcess {
        ServiceProcess::spawn_at(&nats.url(), data_dir, extra_env)
    }

    /// Against any server URL list (a cluster's).
    pub fn spawn_at(urls: &str, data_dir: &Path, extra_env: &[(&str, &str)]) -> ServiceProcess {
        let http = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_alarm-digest"));
        command
            .arg("run")
            .env_remove("ALARM_DIGEST_CONFIG")
            .env("ALARM_DIGEST_NATS__URL", urls)
            .env("ALARM_DIGEST_STORAGE__PATH", data_dir)
            .env("ALARM_DIGEST_HTTP__LISTEN", &http)
            .env("ALARM_DIGEST_SHARDS__COUNT", "4")
            .env("ALARM_DIGEST_SHARDS__LEASE_SECS", "3")
            .env("ALARM_DIGEST_TUNING__ACK_WAIT_SECS", "5")
            .env(
                "RUST_LOG",
                std::env::var("SERVICE_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // A hunt for a rare failure keeps each process's log in a file of its own.
        if let Ok(dir) = std::env::var("SERVICE_TEST_LOGS") {
            let name = format!("{}-{}.log", data_dir.display(), http).replace('/', "_");
            let file = std::fs::File::create(Path::new(&dir).join(name)).expect("log file");
            command.stderr(file);
        }
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn alarm-digest");
        ServiceProcess { child, http }
    }

    /// Whether the process is stopped (SIGSTOP): state `T` in `/proc/<pid>/stat`.
    pub fn is_stopped(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|stat| {
                let (_, after_name) = stat.rsplit_once(')')?;
                after_name
                    .split_whitespace()
                    .next()
                    .map(|state| state == "T")
            })
            .unwrap_or(false)
    }

    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill command");
        assert!(status.success());
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("alarm-digest did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs a one-shot subcommand (`dlq list`, ...) against `nats` with the tests' 4 shards;
/// returns (code, stdout, stderr).
pub fn cli_against(nats: &NatsServer, args: &[&str]) -> (Option<i32>, String, String) {
    let url = nats.url();
    run_binary(
        args,
        &[
            ("ALARM_DIGEST_NATS__URL", url.as_str()),
            ("ALARM_DIGEST_SHARDS__COUNT", "4"),
        ],
    )
}

/// Runs the binary to completion with the given args and env; returns (code, stderr).
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_alarm-digest"))
        .args(args)
        // A figment Jail in a test beside this one may have set it in this process.
        .env_remove("ALARM_DIGEST_CONFIG")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run alarm-digest");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
