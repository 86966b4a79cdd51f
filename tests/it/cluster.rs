//! Several instances share one nats-server and six shards: each shard is applied by its lease
//! holder only, nothing is lost when one dies, and shards move between instances through
//! their snapshots in JetStream (export/import stays as an offline tool).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use alarm_digest::bus::Topology;
use alarm_digest::config::{Config, OwnedShards};
use alarm_digest::wire::AlarmDigest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::tempdir;

use crate::support::*;

pub(crate) const SHARDS: u16 = 6;

/// One of three instances over six shards, owning `s % 3 == ordinal`.
pub(crate) fn member_config(nats: &NatsServer, data_dir: &Path, ordinal: u16) -> Config {
    let mut config = test_config(nats, data_dir);
    config.shards.count = SHARDS;
    config.shards.owned = OwnedShards::Ordinal;
    config.shards.replicas = 3;
    config.shards.ordinal = Some(ordinal);
    config
}

fn owning(nats: &NatsServer, data_dir: &Path, shards: &[u16]) -> Config {
    let mut config = test_config(nats, data_dir);
    config.shards.count = SHARDS;
    config.shards.owned = OwnedShards::List(shards.iter().copied().collect());
    config
}

pub(crate) fn shard_of(user: &str) -> u16 {
    Topology::new(Default::default(), SHARDS).shard_of(user)
}

/// Status changes for many users in several rounds (later rounds newer), and the digest each
/// user must get after all of them.
pub(crate) struct Workload {
    pub(crate) events: Vec<(String, String, String, String)>,
    pub(crate) expected: BTreeMap<String, Vec<(String, String, String)>>,
}

impl Workload {
    pub(crate) fn new(users: usize, alarms: usize, rounds: usize, seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut events = Vec::new();
        let mut latest = BTreeMap::new();
        for round in 0..rounds {
            for user in 0..users {
                for alarm in 0..alarms {
                    let status = ["CRITICAL", "WARNING", "CLEARED"][rng.gen_range(0..3)];
                    let at = format!("2026-01-01T00:{round:02}:{:02}Z", (user + alarm * 7) % 60);
                    let (user, alarm) = (format!("user-{user}"), format!("alarm-{alarm}"));
                    latest.insert(
                        (user.clone(), alarm.clone()),
                        (status.to_string(), at.clone()),
                    );
                    events.push((user, alarm, status.to_string(), at));
                }
            }
        }
        let mut expected: BTreeMap<String, Vec<_>> = (0..users)
            .map(|u| (format!("user-{u}"), Vec::new()))
            .collect();
        for ((user, alarm), (status, at)) in latest {
            if status != "CLEARED" {
                expected.entry(user).or_default().push((alarm, status, at));
            }
        }
        Workload { events, expected }
    }

    pub(crate) async fn publish(&self, client: &TestClient, range: std::ops::Range<usize>) {
        for (user, alarm, status, at) in &self.events[range] {
            client.status(user, alarm, status, at).await;
        }
    }

    pub(crate) async fn request_all(&self, client: &TestClient) {
        for user in self.expected.keys() {
            client.request_digest(user).await;
        }
    }

    /// Each received digest equals the expected one, oldest first.
    pub(crate) fn check(&self, digests: &[AlarmDigest]) {
        for digest in digests {
            let got = entries(digest);
            let mut want = self.expected[&digest.user_id].clone();
            want.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
            let mut got_sorted = got.clone();
            got_sorted.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
            assert_eq!(got_sorted, want, "digest of {}", digest.user_id);
            assert!(
                got.windows(2).all(|w| w[0].2 <= w[1].2),
                "digest of {} is not oldest first: {got:?}",
                digest.user_id
            );
        }
    }
}

/// Reads digests until `count` arrived, then, after 2 s for any extra one (a copy sent
/// twice) to be stored, whatever else the output stream holds; returns them all.
pub(crate) async fn collect(reader: &mut DigestReader, count: usize) -> Vec<AlarmDigest> {
    let mut digests = Vec::new();
    while digests.len() < count {
        digests.push(reader.next().await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    digests.extend(reader.drain().await);
    digests
}

pub(crate) fn per_user(digests: &[AlarmDigest]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for digest in digests {
        *counts.entry(digest.user_id.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn three_instances_over_six_shards_answer_every_request_exactly_once() {
    let nats = NatsServer::start();
    let dirs = [tempdir().unwrap(), tempdir().unwrap(), tempdir().unwrap()];
    let configs: Vec<Config> = (0..3)
        .map(|i| member_config(&nats, dirs[i].path(), i as u16))
        .collect();
    let client = TestClient::connect(&configs[0]).await;
    let mut reader = client.digests().await;
    let mut instances = Vec::new();
    for config in &configs {
        instances.push(start_service(config.clone()).await);
    }

    let workload = Workload::new(300, 4, 3, 7);
    workload.publish(&client, 0..workload.events.len()).await;
    workload.request_all(&client).await;
    let digests = collect(&mut reader, 300).await;

    workload.check(&digests);
    assert!(
        per_user(&digests).values().all(|n| *n == 1) && digests.len() == 300,
        "every request answered exactly once: {} digests",
        digests.len()
    );
    // The work was shared: each instance applied exactly its own shards' events.
    for (ordinal, instance) in instances.iter().enumerate() {
        let own_events = workload
            .events
            .iter()
            .filter(|(user, ..)| usize::from(shard_of(user) % 3) == ordinal)
            .count() as u64;
        let applied =
            instance.metrics.events_applied.get() + instance.metrics.events_unchanged.get();
        assert_eq!(applied, own_events, "instance {ordinal}");
    }
    for instance in instances {
        instance.stop().await.expect("clean stop");
    }
}

#[tokio::test]
async fn a_killed_instance_catches_up_after_restart_while_the_others_keep_serving() {
    let nats = NatsServer::start();
    let dirs = [tempdir().unwrap(), tempdir().unwrap(), tempdir().unwrap()];
    let env = |ordinal: &'static str| {
        [
            ("ALARM_DIGEST_SHARDS__COUNT", "6"),
            ("ALARM_DIGEST_SHARDS__OWNED", "ordinal"),
            ("ALARM_DIGEST_SHARDS__REPLICAS", "3"),
            ("ALARM_DIGEST_SHARDS__ORDINAL", ordinal),
        ]
    };
    let spawn = |i: usize| ServiceProcess::spawn(&nats, dirs[i].path(), &env(["0", "1", "2"][i]));
    let mut processes: Vec<Option<ServiceProcess>> = (0..3).map(|i| Some(spawn(i))).collect();
    for process in processes.iter().flatten() {
        wait_ready(&process.http).await;
    }
    let client = TestClient::connect(&member_config(&nats, dirs[0].path(), 0)).await;
    let mut reader = client.digests().await;
    let workload = Workload::new(150, 4, 4, 11);
    let third = workload.events.len() / 3;

    workload.publish(&client, 0..third).await;
    // Killed with nothing in flight: a router killed holding fetched inputs gets them back
    // after ack_wait, and a request routed meanwhile by another router is answered without
    // them (they reach the user's next digest; ARCHITECTURE.md, "A request never overtakes").
    client.wait_drained().await;
    processes[1].take().expect("running").kill_9();
    workload
        .publish(&client, third..workload.events.len())
        .await;
    workload.request_all(&client).await;

    // The survivors answer their users; instance 1's users wait in JetStream.
    let (survivors_users, killed_users): (Vec<_>, Vec<_>) = workload
        .expected
        .keys()
        .cloned()
        .partition(|user| shard_of(user) % 3 != 1);
    let early = collect(&mut reader, survivors_users.len()).await;
    let early_users: BTreeSet<_> = early.iter().map(|d| d.user_id.clone()).collect();
    assert_eq!(
        early_users,
        survivors_users.iter().cloned().collect::<BTreeSet<_>>()
    );

    processes[1] = Some(spawn(1));
    let late = collect(&mut reader, killed_users.len()).await;
    let late_users: BTreeSet<_> = late.iter().map(|d| d.user_id.clone()).collect();
    assert_eq!(
        late_users,
        killed_users.iter().cloned().collect::<BTreeSet<_>>()
    );

    let all: Vec<_> = early.into_iter().chain(late).collect();
    workload.check(&all);
    assert_eq!(all.len(), 150, "each request answered exactly once");
}

#[tokio::test]
async fn a_stopped_owner_hands_its_shard_to_another_owner_through_its_final_snapshot() {
    let nats = NatsServer::start();
    let (first_dir, other_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let user = (0..)
        .map(|i| format!("u{i}"))
        .find(|u| shard_of(u) == 2)
        .unwrap();
    let first_config = owning(&nats, first_dir.path(), &[0, 1, 2, 3, 4, 5]);
    let other_config = owning(&nats, other_dir.path(), &[2]);
    let client = TestClient::connect(&first_config).await;
    let mut reader = client.digests().await;

    let first = start_service(first_config.clone()).await;
    let other = start_service_unready(other_config.clone()).await;
    let waiting = wait_standby(&other.http_addr.to_string(), "shard 2 (lease held by").await;
    assert!(waiting.contains("shard 2 (lease held by"), "{waiting}");

    client
        .status(&user, "old", "CRITICAL", "2026-01-01T00:00:01Z")
        .await;
    client.wait_drained().await;
    assert_eq!(first.metrics.events_applied.get(), 1);
    assert_eq!(other.metrics.events_applied.get(), 0);
    assert_eq!(first.metrics.shards_consuming.get(), 6);
    assert_eq!(other.metrics.shards_consuming.get(), 0);

    // The holder stops: its final snapshot carries shard 2 to the other instance, whose data
    // dir never saw it.
    first.stop().await.expect("clean stop");
    wait_holding(&other.http_addr.to_string()).await;
    client
        .status(&user, "new", "WARNING", "2026-01-01T00:00:02Z")
        .await;
    client.request_digest(&user).await;
    let digest = reader.next_for(&user).await;
    assert_eq!(
        entries(&digest),
        [
            (
                "old".into(),
                "CRITICAL".into(),
                "2026-01-01T00:00:01Z".into()
            ),
            (
                "new".into(),
                "WARNING".into(),
                "2026-01-01T00:00:02Z".into()
            ),
        ],
        "the new owner serves the shard with the old owner's state"
    );
    assert_eq!(other.metrics.events_applied.get(), 1, "only the new event");
    other.stop().await.expect("clean stop");

    // Export and import stay as offline tools: a damaged file is refused before anything is
    // written, a good one lands.
    let export = export_shard(&nats, other_dir.path(), 2);
    let damaged = first_dir.path().join("damaged.export");
    let mut bytes = std::fs::read(&export).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&damaged, bytes).unwrap();
    let (code, _, err) = shard_command(
        &nats,
        first_dir.path(),
        &["import", "--file", damaged.to_str().unwrap()],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("checksum"), "{err}");
    let (code, out, err) = shard_command(
        &nats,
        first_dir.path(),
        &["import", "--file", export.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "import: {out}{err}");
    assert!(out.contains("imported shard 2"), "{out}");
}

#[tokio::test]
async fn an_instance_with_another_shard_count_is_refused() {
    let nats = NatsServer::start();
    let (first, second) = (tempdir().unwrap(), tempdir().unwrap());
    let service = start_service(owning(&nats, first.path(), &[0, 1, 2, 3, 4, 5])).await;

    let (code, _, stderr) = run_binary(
        &["run"],
        &[
            ("ALARM_DIGEST_NATS__URL", &nats.url()),
            (
                "ALARM_DIGEST_STORAGE__PATH",
                &second.path().display().to_string(),
            ),
            ("ALARM_DIGEST_HTTP__LISTEN", "127.0.0.1:0"),
            ("ALARM_DIGEST_SHARDS__COUNT", "4"),
        ],
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("shards.count is 6"), "{stderr}");
    assert!(stderr.contains("set shards.count = 6"), "{stderr}");
    service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn changing_ownership_moves_a_shard_without_any_manual_step() {
    let nats = NatsServer::start();
    let (a_dir, b_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let client = TestClient::connect(&owning(&nats, a_dir.path(), &[0])).await;
    let mut reader = client.digests().await;
    let a = start_service(owning(&nats, a_dir.path(), &[0, 1, 2])).await;
    let b = start_service(owning(&nats, b_dir.path(), &[3, 4, 5])).await;
    let workload = Workload::new(60, 3, 2, 5);
    workload.publish(&client, 0..workload.events.len()).await;
    client.wait_drained().await;

    // Shard 2 moves from A to B by config alone.
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
    let a = start_service(owning(&nats, a_dir.path(), &[0, 1])).await;
    let b = start_service(owning(&nats, b_dir.path(), &[2, 3, 4, 5])).await;

    workload.request_all(&client).await;
    let digests = collect(&mut reader, 60).await;
    workload.check(&digests);
    assert_eq!(digests.len(), 60);
    assert!(b.metrics.digest_requests.get() > a.metrics.digest_requests.get());
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_paused_holder_loses_its_lease_and_does_not_apply_beside_a_copy_of_its_data_dir() {
    let nats = NatsServer::start();
    let (original, copy) = (tempdir().unwrap(), tempdir().unwrap());
    let env = [("ALARM_DIGEST_SHARDS__OWNED", "0")];
    let first = ServiceProcess::spawn(&nats, original.path(), &env);
    wait_ready(&first.http).await;
    first.signal("TERM");
    first.wait_exit(WAIT);
    copy_dir(original.path(), copy.path());

    let first = ServiceProcess::spawn(&nats, original.path(), &env);
    wait_ready(&first.http).await;
    let second = ServiceProcess::spawn(&nats, copy.path(), &env);
    let waiting = wait_standby(&second.http, "lease held by process").await;
    assert!(waiting.contains("lease held by process"), "{waiting}");

    // Pause the holder past its lease: the copy takes the shard over.
    first.signal("STOP");
    wait_holding(&second.http).await;
    first.signal("CONT");
    let stale = wait_standby(&first.http, "lease held by").await;
    assert!(stale.contains("lease"), "{stale}");

    let config = test_config(&nats, copy.path());
    let client = TestClient::connect(&config).await;
    let four_shards = Topology::new(Default::default(), 4);
    let user = (0..)
        .map(|i| format!("u{i}"))
        .find(|u| four_shards.shard_of(u) == 0)
        .unwrap();
    client
        .status(&user, "a", "CRITICAL", "2026-01-01T00:00:01Z")
        .await;
    let deadline = std::time::Instant::now() + WAIT;
    while events_applied(&second.http).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease holder never applied it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        events_applied(&second.http).await,
        1,
        "the lease holder applied it"
    );
    assert_eq!(
        events_applied(&first.http).await,
        0,
        "the paused process did not"
    );
}

async fn events_applied(http: &str) -> u64 {
    let (_, metrics) = http_get(http, "/metrics").await.expect("metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("alarm_digest_events_applied_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("events_applied metric")
}

#[tokio::test]
async fn changing_shards_count_by_the_runbook_keeps_every_alarm_and_sent_marker() {
    let nats = NatsServer::start();
    let old_dir = tempdir().unwrap();
    let old_config = test_config(&nats, old_dir.path()); // 4 shards, one instance
    let client = TestClient::connect(&old_config).await;
    let mut reader = client.digests().await;
    let service = start_service(old_config).await;
    let mut workload = Workload::new(40, 3, 2, 3);
    workload.publish(&client, 0..workload.events.len()).await;
    client.request_digest("user-0").await;
    workload.check(&[reader.next_for("user-0").await]);
    service.stop().await.expect("clean stop");

    // Left behind at the stop: a message already routed by the old count, and one not yet
    // routed at all.
    let old_topology = Topology::new(Default::default(), 4);
    let routed = format!(
        "AlarmStatusChanged.shard.{}",
        old_topology.shard_of("user-1")
    );
    let late = status_payload("user-1", "late", "CRITICAL", "2026-01-01T01:00:00Z");
    client.publish(&routed, late).await;
    client
        .status("user-2", "later", "WARNING", "2026-01-01T01:00:00Z")
        .await;

    // Runbook: export every shard, re-shard, recount, import into fresh data dirs, start.
    let files: Vec<String> = (0..4)
        .map(|shard| export_shard_with_count(&nats, old_dir.path(), 4, shard))
        .map(|file| file.display().to_string())
        .collect();
    let out = tempdir().unwrap();
    let out_arg = out.path().display().to_string();
    let mut args = vec!["reshard", "--count", "6", "--out", &out_arg];
    args.extend(files.iter().map(String::as_str));
    let (code, stdout, stderr) = shard_command_with_count(&nats, old_dir.path(), 4, &args);
    assert_eq!(code, Some(0), "reshard: {stdout}{stderr}");
    let (code, stdout, stderr) =
        shard_command_with_count(&nats, old_dir.path(), 4, &["recount", "--count", "6"]);
    assert_eq!(code, Some(0), "recount: {stdout}{stderr}");
    assert!(stdout.contains("1 routed message(s) requeued"), "{stdout}");
    let (b_dir, c_dir) = (tempdir().unwrap(), tempdir().unwrap());
    for shard in 0..6 {
        let dir = if shard < 3 {
            b_dir.path()
        } else {
            c_dir.path()
        };
        let file = out.path().join(format!("shard-{shard}.export"));
        let (code, stdout, stderr) =
            shard_command(&nats, dir, &["import", "--file", file.to_str().unwrap()]);
        assert_eq!(code, Some(0), "import {shard}: {stdout}{stderr}");
    }
    let b = start_service(owning(&nats, b_dir.path(), &[0, 1, 2])).await;
    let c = start_service(owning(&nats, c_dir.path(), &[3, 4, 5])).await;

    workload.request_all(&client).await;
    let digests = collect(&mut reader, 40).await;
    // user-0 was told everything before the move: the sent markers moved too.
    workload.expected.insert("user-0".into(), Vec::new());
    let at = "2026-01-01T01:00:00Z".to_string();
    let add = |alarm: &str, status: &str| (alarm.to_string(), status.to_string(), at.clone());
    workload
        .expected
        .get_mut("user-1")
        .unwrap()
        .push(add("late", "CRITICAL"));
    workload
        .expected
        .get_mut("user-2")
        .unwrap()
        .push(add("later", "WARNING"));
    workload.check(&digests);
    assert_eq!(per_user(&digests).len(), 40);
    assert_eq!(digests.len(), 40);
    b.stop().await.expect("clean stop");
    c.stop().await.expect("clean stop");
}

/// Runs `alarm-digest shard <args>` against a data dir, as an operator would.
fn shard_command(nats: &NatsServer, dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    shard_command_with_count(nats, dir, SHARDS, args)
}

fn shard_command_with_count(
    nats: &NatsServer,
    dir: &Path,
    count: u16,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let count = count.to_string();
    let dir = dir.display().to_string();
    let args: Vec<&str> = ["shard"].into_iter().chain(args.iter().copied()).collect();
    run_binary(
        &args,
        &[
            ("ALARM_DIGEST_NATS__URL", &nats.url()),
            ("ALARM_DIGEST_STORAGE__PATH", &dir),
            ("ALARM_DIGEST_SHARDS__COUNT", &count),
        ],
    )
}

/// Exports a shard of a stopped instance's data dir into that dir; returns the file.
fn export_shard(nats: &NatsServer, dir: &Path, shard: u16) -> PathBuf {
    export_shard_with_count(nats, dir, SHARDS, shard)
}

fn export_shard_with_count(nats: &NatsServer, dir: &Path, count: u16, shard: u16) -> PathBuf {
    let file = dir.join(format!("shard-{shard}.export"));
    let (code, out, err) = shard_command_with_count(
        nats,
        dir,
        count,
        &[
            "export",
            "--shard",
            &shard.to_string(),
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "export: {out}{err}");
    file
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Ordinal ownership with one standby: two pods started together each take the shards they
/// own first and stand by for the other's; kill -9 of one hands its shards to the other,
/// with their state.
#[tokio::test]
async fn ordinal_standbys_start_balanced_and_take_over_a_killed_pods_shards() {
    let nats = NatsServer::start();
    let (a_dir, b_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let pod = |ordinal: &'static str| {
        [
            ("ALARM_DIGEST_SHARDS__OWNED", "ordinal"),
            ("ALARM_DIGEST_SHARDS__REPLICAS", "2"),
            ("ALARM_DIGEST_SHARDS__STANDBYS", "1"),
            ("ALARM_DIGEST_SHARDS__ORDINAL", ordinal),
        ]
    };
    let a = ServiceProcess::spawn(&nats, a_dir.path(), &pod("0"));
    let b = ServiceProcess::spawn(&nats, b_dir.path(), &pod("1"));
    for (http, standby_for) in [(&a.http, [1, 3]), (&b.http, [0, 2])] {
        wait_ready(http).await;
        for shard in standby_for {
            wait_standby(http, &format!("shard {shard} (lease held by")).await;
        }
    }

    let config = test_config(&nats, a_dir.path());
    let client = TestClient::connect(&config).await;
    let mut reader = client.digests().await;
    let four_shards = Topology::new(Default::default(), 4);
    let users: Vec<String> = (0..4)
        .map(|shard| {
            (0..)
                .map(|i| format!("u{i}"))
                .find(|u| four_shards.shard_of(u) == shard)
                .unwrap()
        })
        .collect();
    for user in &users {
        client
            .status(user, "a", "CRITICAL", "2026-01-01T00:00:01Z")
            .await;
    }
    client.wait_drained().await;
    b.kill_9();
    wait_holding(&a.http).await;
    for user in &users {
        client.request_digest(user).await;
        let digest = reader.next_for(user).await;
        assert_eq!(
            entries(&digest),
            [("a".into(), "CRITICAL".into(), "2026-01-01T00:00:01Z".into())],
            "{user}: the standby had the killed pod's state"
        );
    }
}
