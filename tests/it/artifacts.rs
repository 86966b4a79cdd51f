//! The deployment artifacts parse, agree with the config keys the daemon reads, and (the
//! systemd unit) pass the tools that check them. No Docker engine or Kubernetes here: the
//! manifests are loaded through the real config loader instead.

// figment's `Jail` closures return its large error type; that is its API, not ours.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use alarm_digest::config::{Config, Overrides};
use figment::Jail;
use serde::Deserialize;
use serde_yaml::Value;
use tempfile::tempdir;

use crate::support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `Key=value` lines of a systemd unit (the last one wins, as in systemd).
fn unit_settings(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Ok(analyze) = which("systemd-analyze") else {
        panic!("systemd-analyze is missing: install it with `sudo apt-get install systemd`");
    };
    let unit = read("systemd/alarm-digest.service");
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempdir().unwrap();
    let path = dir.path().join("alarm-digest.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/alarm-digest", env!("CARGO_BIN_EXE_alarm-digest")),
    )
    .unwrap();
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<_> = stderr
        .lines()
        .filter(|line| line.contains("alarm-digest.service"))
        .collect();
    assert!(output.status.success() && complaints.is_empty(), "{stderr}");

    let settings = unit_settings(&unit);
    for (key, value) in [
        ("Type", "notify"),
        ("Restart", "always"),
        ("StateDirectory", "alarm-digest"),
        ("User", "alarm-digest"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("RestartPreventExitStatus", "64"),
        (
            "Environment",
            "ALARM_DIGEST_STORAGE__PATH=/var/lib/alarm-digest",
        ),
    ] {
        assert_eq!(settings.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert!(settings["ExecStart"].contains("--config /etc/alarm-digest/config.toml"));
    let stop: u64 = settings["TimeoutStopSec"].parse().unwrap();
    assert!(
        stop >= Config::default().shutdown.grace_secs + 5,
        "TimeoutStopSec leaves the drain its grace and a margin"
    );
}

fn which(tool: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .ok_or(())
}

#[tokio::test]
async fn systemd_hears_ready_once_the_instance_has_joined_and_stopping_on_sigterm() {
    let nats = NatsServer::start();
    let data = tempdir().unwrap();
    let socket_path = data.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let socket_env = socket_path.display().to_string();
    let process = ServiceProcess::spawn(
        &nats,
        &data.path().join("data"),
        &[("NOTIFY_SOCKET", &socket_env)],
    );
    let mut buffer = [0u8; 64];
    let len = socket.recv(&mut buffer).expect("READY=1 within 30 s");
    assert_eq!(buffer[..len].trim_ascii_end(), b"READY=1");
    process.signal("TERM");
    let len = socket.recv(&mut buffer).expect("STOPPING=1 on SIGTERM");
    assert_eq!(buffer[..len].trim_ascii_end(), b"STOPPING=1");
    assert!(process.wait_exit(WAIT).success());
}

#[test]
fn the_debian_package_metadata_names_files_that_exist() {
    let manifest: toml::Value = read("Cargo.toml").parse().expect("Cargo.toml is TOML");
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets = deb["assets"].as_array().expect("assets");
    let mut destinations = Vec::new();
    for asset in assets {
        let source = asset[0].as_str().unwrap();
        destinations.push(format!("/{}", asset[1].as_str().unwrap()));
        if !source.starts_with("target/") {
            assert!(repo(source).is_file(), "asset {source} exists");
        }
    }
    assert!(destinations.iter().any(|d| d == "/usr/bin/"), "the binary");
    for conf in deb["conf-files"].as_array().unwrap() {
        assert!(
            destinations.contains(&conf.as_str().unwrap().to_string()),
            "{conf}"
        );
    }
    let units = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
    assert!(repo(units).join("alarm-digest.service").is_file());
    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    let postinst = std::fs::read_to_string(repo(scripts).join("postinst")).unwrap();
    assert!(
        postinst.contains("#DEBHELPER#"),
        "cargo-deb's unit snippets go in"
    );
    assert!(postinst.contains("adduser --system"), "the dedicated user");
    // The packaged default config is the documented one, so it loads.
    Jail::expect_with(|_| {
        Config::load(Some(&repo("packaging/config.toml")), &Overrides::default())
            .map_err(|e| e.to_string())?;
        Ok(())
    });
}

fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Value::deserialize(document).expect("valid YAML");
            value.apply_merge().expect("merge keys resolve");
            value
        })
        .collect()
}

fn kubernetes() -> BTreeMap<String, Value> {
    let mut by_kind = BTreeMap::new();
    let dir = repo("packaging/kubernetes");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        for document in yaml_documents(&format!("packaging/kubernetes/{name}")) {
            let kind = document["kind"].as_str().expect("kind").to_string();
            by_kind.insert(kind, document);
        }
    }
    by_kind
}

/// Loads the config a container would, through `Config::load`: the given env, with
/// `ALARM_DIGEST_CONFIG` pointing at `config_text` written to a file.
fn load_as_container(env: &[(String, String)], config_text: &str) -> Config {
    let mut loaded = None;
    Jail::expect_with(|jail| {
        jail.create_file("config.toml", config_text)?;
        for (key, value) in env {
            jail.set_env(key, value);
        }
        jail.set_env(
            "ALARM_DIGEST_CONFIG",
            jail.directory().join("config.toml").display(),
        );
        loaded = Some(Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?);
        Ok(())
    });
    loaded.expect("config loaded")
}

#[test]
fn the_kubernetes_statefulset_gives_every_shard_one_first_owner_and_one_standby() {
    let manifests = kubernetes();
    for kind in [
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Kustomization",
    ] {
        assert!(manifests.contains_key(kind), "{kind} shipped");
    }
    let set = &manifests["StatefulSet"];
    let spec = &set["spec"];
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    let service = &manifests["Service"];
    assert_eq!(service["spec"]["clusterIP"], "None", "headless");
    assert_eq!(spec["serviceName"], service["metadata"]["name"]);
    let replicas = spec["replicas"].as_u64().unwrap();
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    let config_text = manifests["ConfigMap"]["data"]["config.toml"]
        .as_str()
        .unwrap();

    // The env each pod gets, with the pod name as Kubernetes fills it in.
    let pod_env = |ordinal: u64| -> Vec<(String, String)> {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|var| var["name"] != "ALARM_DIGEST_CONFIG")
            .map(|var| {
                let name = var["name"].as_str().unwrap().to_string();
                let value = match var["value"].as_str() {
                    Some(value) => value.to_string(),
                    None => {
                        assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
                        format!("{}-{ordinal}", set["metadata"]["name"].as_str().unwrap())
                    }
                };
                (name, value)
            })
            .collect()
    };
    let mut owners = BTreeMap::new();
    let mut primaries = BTreeMap::new();
    let mut config = Config::default();
    for ordinal in 0..replicas {
        config = load_as_container(&pod_env(ordinal), config_text);
        assert_eq!(
            u64::from(config.shards.replicas),
            replicas,
            "env matches spec.replicas"
        );
        for shard in config.shards.owned_shards() {
            *owners.entry(shard).or_insert(0) += 1;
            if config.shards.is_primary(shard) {
                *primaries.entry(shard).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(config.shards.standbys, 1, "one warm standby per shard");
    assert_eq!(
        owners,
        (0..config.shards.count).map(|s| (s, 2)).collect(),
        "every shard has two pods: its first owner and its standby"
    );
    assert_eq!(
        primaries,
        (0..config.shards.count).map(|s| (s, 1)).collect(),
        "every shard has exactly one first owner"
    );
    assert_eq!(config.streams.replicas, 3, "R3 streams in production");

    // Mounts, probes and grace agree with the loaded config.
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let mount_of = |volume: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap()
            .to_string()
    };
    assert_eq!(Path::new(&mount_of("data")), config.storage.path);
    let config_env = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|var| var["name"] == "ALARM_DIGEST_CONFIG")
        .and_then(|var| var["value"].as_str())
        .unwrap();
    assert_eq!(config_env, format!("{}/config.toml", mount_of("config")));
    let claim = &spec["volumeClaimTemplates"][0]["metadata"]["name"];
    assert_eq!(claim, "data", "the data dir is a per-pod volume");
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(config.http.listen.ends_with(&format!(":{port}")));
    assert!(config.http.listen.starts_with("0.0.0.0"), "probes reach it");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > config.shutdown.grace_secs,
        "the drain finishes before SIGKILL"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
}

#[test]
fn docker_compose_runs_three_instances_over_six_shards() {
    let compose = yaml_documents("docker-compose.yml").remove(0);
    let services = compose["services"].as_mapping().unwrap();
    let nats = &services[&Value::from("nats")];
    let nats_command = format!("{:?}", nats["command"]);
    assert!(
        nats_command.contains("/etc/nats/nats-server.conf"),
        "{nats_command}"
    );
    assert!(
        format!("{:?}", nats["volumes"])
            .contains("./packaging/nats/nats-server.conf:/etc/nats/nats-server.conf"),
        "the shipped server config is mounted"
    );
    let mut owners = BTreeMap::new();
    let mut volumes = Vec::new();
    let mut count = 0;
    for (name, service) in services {
        if !name.as_str().unwrap().starts_with("alarm-digest-") {
            continue;
        }
        let env: Vec<(String, String)> = service["environment"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
            .collect();
        let config = load_as_container(&env, "");
        count = config.shards.count;
        for shard in config.shards.owned_shards() {
            *owners.entry(shard).or_insert(0) += 1;
        }
        volumes.push(format!("{:?}", service["volumes"]));
    }
    assert_eq!(volumes.len(), 3, "three instances");
    assert_eq!(count, 6);
    volumes.sort();
    volumes.dedup();
    assert_eq!(volumes.len(), 3, "each instance has its own data volume");
    assert_eq!(
        owners,
        (0..6).map(|s| (s, 1)).collect(),
        "one owner per shard"
    );
}

#[test]
fn the_container_image_runs_as_a_non_root_user() {
    let dockerfile = read("packaging/Dockerfile");
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    assert!(dockerfile.contains("ALARM_DIGEST_STORAGE__PATH=/var/lib/alarm-digest"));
}

/// The image tag every shipped deployment runs: the newest release, the one the suite runs on.
fn pinned_image() -> String {
    format!("nats:{}-alpine", crate::support::nats::pinned_newest())
}

#[test]
fn docker_compose_and_kubernetes_run_the_release_the_suite_tests() {
    let compose = yaml_documents("docker-compose.yml").remove(0);
    assert_eq!(
        compose["services"]["nats"]["image"].as_str(),
        Some(pinned_image().as_str())
    );
    let images: Vec<String> = yaml_documents("packaging/nats/kubernetes.yaml")
        .iter()
        .filter(|document| document["kind"] == "StatefulSet")
        .flat_map(|set| {
            set["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|container| container["image"].as_str().map(String::from))
        .collect();
    assert_eq!(images, vec![pinned_image()]);
}

/// `nats-server -t` parses a config and exits: 0 only for one the server would run with.
/// The shipped `mappings.conf` sits beside it, as the single-node config includes it.
fn assert_the_server_accepts(config_text: &str, env: &[(&str, &str)]) {
    let dir = tempdir().unwrap();
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, config_text).unwrap();
    std::fs::write(
        dir.path().join("mappings.conf"),
        read("packaging/nats/mappings.conf"),
    )
    .unwrap();
    let output = Command::new(crate::support::nats::binary())
        .arg("-c")
        .arg(&path)
        .arg("-t")
        .envs(env.iter().copied())
        .output()
        .expect("run nats-server -t");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}\n{config_text}");
    assert!(text.contains("is valid"), "{text}");
}

#[test]
fn the_shipped_nats_configs_are_valid_and_choose_their_fsync_interval() {
    let single = read("packaging/nats/nats-server.conf");
    assert_the_server_accepts(&single, &[]);
    let cluster = yaml_documents("packaging/nats/kubernetes.yaml")
        .into_iter()
        .find(|document| document["kind"] == "ConfigMap")
        .and_then(|map| map["data"]["nats.conf"].as_str().map(String::from))
        .expect("the cluster's nats.conf");
    assert_the_server_accepts(&cluster, &[("POD_NAME", "nats-0")]);
    // The setting docs/guarantees.md describes, chosen explicitly in every shipped config.
    for text in [&single, &cluster] {
        assert!(text.contains("sync_interval: \"2m\""), "{text}");
    }
    // The Kubernetes service is where alarm-digest's configmap points.
    let configmap = read("packaging/kubernetes/configmap.yaml");
    assert!(configmap.contains("nats://nats.nats.svc.cluster.local:4222"));
}

/// What `alarm-digest nats-mappings` prints for this partition count, without its comments.
fn mapping_block(partitions: u16) -> String {
    // In process: a figment Jail of a test beside this one may have set ALARM_DIGEST_CONFIG,
    // which a child process would inherit.
    let streams = alarm_digest::config::StreamsConfig {
        input_partitions: partitions,
        ..Default::default()
    };
    without_comments(&alarm_digest::bus::Topology::new(streams, 1).nats_mappings())
}

fn without_comments(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.to_string() + "\n")
        .collect()
}

#[test]
fn every_shipped_server_config_spreads_the_input_over_its_deployments_partitions() {
    // docker-compose: the instances' count, the mapping mounted beside the server config.
    let compose = yaml_documents("docker-compose.yml").remove(0);
    let env = &compose["services"]["alarm-digest-0"]["environment"];
    let partitions: u16 = env["ALARM_DIGEST_STREAMS__INPUT_PARTITIONS"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .expect("compose sets the partition count");
    assert!(partitions > 1);
    assert_eq!(
        without_comments(&read("packaging/nats/mappings.conf")),
        mapping_block(partitions),
        "packaging/nats/mappings.conf is what nats-mappings prints for compose's count"
    );
    assert!(format!("{:?}", compose["services"]["nats"]["volumes"])
        .contains("./packaging/nats/mappings.conf:/etc/nats/mappings.conf"));
    assert!(read("packaging/nats/nats-server.conf").contains("include \"mappings.conf\""));

    // Kubernetes: the NATS cluster's config carries the mapping for alarm-digest's count.
    let manifests = kubernetes();
    let config_text = manifests["ConfigMap"]["data"]["config.toml"]
        .as_str()
        .unwrap();
    let config = load_as_container(&[], config_text);
    let partitions = config.streams.input_partitions;
    assert!(partitions > 1);
    let cluster = yaml_documents("packaging/nats/kubernetes.yaml")
        .into_iter()
        .find(|document| document["kind"] == "ConfigMap")
        .and_then(|map| map["data"]["nats.conf"].as_str().map(String::from))
        .expect("the cluster's nats.conf");
    assert!(
        without_comments(&cluster).contains(&mapping_block(partitions)),
        "the NATS cluster's config has the mapping for {partitions} partitions:\n{cluster}"
    );
}
