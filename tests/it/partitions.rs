//! Input partitions (`streams.input_partitions`): the server's mapping from
//! `alarm-digest nats-mappings` spreads the input subjects, every instance routes every
//! partition, and the count changes in place.

use std::path::Path;
use std::time::Duration;

use alarm_digest::bus::Topology;
use tempfile::tempdir;

use crate::drills::{assert_answered_once, PlainSaw, Traffic};
use crate::support::*;

const PARTITIONS_ENV: &str = "ALARM_DIGEST_STREAMS__INPUT_PARTITIONS";

/// What `alarm-digest nats-mappings` prints for `count` partitions.
pub(crate) fn mappings(count: u16) -> String {
    let count = count.to_string();
    let (code, out, err) = run_binary(&["nats-mappings"], &[(PARTITIONS_ENV, count.as_str())]);
    assert_eq!(code, Some(0), "nats-mappings failed: {err}");
    out
}

/// A server config file of a mapping for `count` partitions, written (again) at `path`.
fn write_server_config(path: &Path, count: u16) {
    std::fs::write(path, mappings(count)).expect("write the server config");
}

/// Messages each input partition stream has received so far, by partition.
async fn received_per_partition(client: &TestClient, topology: &Topology) -> Vec<(u16, u64)> {
    let mut received = Vec::new();
    for partition in topology
        .existing_partitions(&client.js)
        .await
        .expect("partitions")
    {
        let mut stream = client
            .js
            .get_stream(topology.partition_stream(partition))
            .await
            .expect("partition stream");
        let last = stream.info().await.expect("info").state.last_sequence;
        received.push((partition, last));
    }
    received
}

/// An instance's counter from its `/metrics`.
async fn metric(http: &str, name: &str) -> f64 {
    let (_, body) = http_get(http, "/metrics").await.expect("metrics");
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn ordinal_env(ordinal: &str, partitions: &str) -> Vec<(&'static str, String)> {
    vec![
        (PARTITIONS_ENV, partitions.to_string()),
        ("ALARM_DIGEST_SHARDS__OWNED", "ordinal".into()),
        ("ALARM_DIGEST_SHARDS__REPLICAS", "2".into()),
        ("ALARM_DIGEST_SHARDS__ORDINAL", ordinal.to_string()),
    ]
}

fn spawn(nats: &NatsServer, dir: &Path, env: &[(&'static str, String)]) -> ServiceProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ServiceProcess::spawn(nats, dir, &env)
}

/// A server running the mapping the project prints for 4 partitions (it must accept it),
/// two instances sharing the shards by ordinal, and a client.
struct Partitioned {
    nats: NatsServer,
    dirs: [tempfile::TempDir; 2],
    a: ServiceProcess,
    b: ServiceProcess,
    client: TestClient,
}

impl Partitioned {
    async fn start() -> Partitioned {
        let nats = NatsServer::start_with_config(&mappings(4));
        let dirs = [tempdir().expect("dir"), tempdir().expect("dir")];
        let a = spawn(&nats, dirs[0].path(), &ordinal_env("0", "4"));
        let b = spawn(&nats, dirs[1].path(), &ordinal_env("1", "4"));
        wait_ready(&a.http).await;
        wait_ready(&b.http).await;
        let mut config = test_config(&nats, dirs[0].path());
        config.streams.input_partitions = 4;
        let client = TestClient::connect(&config).await;
        Partitioned {
            nats,
            dirs,
            a,
            b,
            client,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_partitions_keep_the_semantics_across_two_instances() {
    let Partitioned {
        nats: _nats,
        dirs: _dirs,
        a,
        b,
        client,
    } = Partitioned::start().await;
    let mut digests = client.digests().await;

    // Latest wins, whichever partition each change went through; a late change is ignored.
    client
        .status("u1", "a", "WARNING", "2021-06-07T20:40:10Z")
        .await;
    client
        .status("u1", "a", "CRITICAL", "2021-06-07T20:40:20Z")
        .await;
    client
        .status("u1", "a", "CLEARED", "2021-06-07T20:40:15Z")
        .await;
    client
        .status("u1", "b", "WARNING", "2021-06-07T20:40:11Z")
        .await;
    // A request may overtake events that went through another partition: requested once
    // every event is in, the digest has them all.
    client.wait_drained().await;
    client.request_digest("u1").await;
    let first = digests.next_for("u1").await;
    assert_eq!(
        entries(&first),
        [
            triple("b", "WARNING", "2021-06-07T20:40:11Z"),
            triple("a", "CRITICAL", "2021-06-07T20:40:20Z"),
        ]
    );
    // Nothing changed: nothing is resent.
    client.request_digest("u1").await;
    client.wait_drained().await;
    let second = digests.next_for("u1").await;
    assert!(second.active_alarms.is_empty(), "{second:?}");
    // A change of status re-triggers the alarm.
    client
        .status("u1", "b", "CRITICAL", "2021-06-07T20:41:00Z")
        .await;
    client.wait_drained().await;
    client.request_digest("u1").await;
    let third = digests.next_for("u1").await;
    assert_eq!(
        entries(&third),
        [triple("b", "CRITICAL", "2021-06-07T20:41:00Z")]
    );
    assert_eq!(
        metric(&a.http, "alarm_digest_unmapped_inputs_total").await,
        0.0
    );
    drop((a, b));
}

fn triple(alarm: &str, status: &str, at: &str) -> (String, String, String) {
    (alarm.into(), status.into(), at.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_and_a_lost_data_dir_lose_nothing_and_every_partition_carries_traffic() {
    let Partitioned {
        nats,
        dirs,
        a,
        b,
        client,
    } = Partitioned::start().await;
    let config = client.config.clone();
    let subscriber = PlainSubscriber::start(&client).await;
    let traffic = Traffic::start(&client, 19, 60);

    tokio::time::sleep(Duration::from_secs(2)).await;
    b.kill_9();
    // Its disk is gone too: it comes back on an empty data dir.
    std::fs::remove_dir_all(dirs[1].path()).expect("wipe the data dir");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = spawn(&nats, dirs[1].path(), &ordinal_env("1", "4"));
    wait_ready(&b.http).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (state, requests) = traffic.finish().await;

    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let received = received_per_partition(&client, &topology).await;
    assert_eq!(received.len(), 4, "{received:?}");
    assert!(
        received.iter().all(|(_, messages)| *messages > 20),
        "every partition carries a share: {received:?}"
    );
    assert_answered_once(&client, &subscriber, &state, requests, PlainSaw::All).await;
    // Both instances routed: the work is shared.
    for http in [&a.http, &b.http] {
        assert!(
            metric(http, "alarm_digest_routed_total").await > 0.0,
            "{http} routed nothing"
        );
    }
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_mapping_every_event_is_still_applied_and_the_gap_is_counted() {
    let TestBed {
        nats,
        data,
        mut config,
        ..
    } = TestBed::start().await;
    config.streams.input_partitions = 4;
    let client = TestClient::connect(&config).await;
    let service = start_service(config.clone()).await;
    let mut digests = client.digests().await;
    client
        .status("u1", "a", "CRITICAL", "2021-06-07T20:40:10Z")
        .await;
    client.wait_drained().await;
    client.request_digest("u1").await;
    let digest = digests.next_for("u1").await;
    assert_eq!(
        entries(&digest),
        [triple("a", "CRITICAL", "2021-06-07T20:40:10Z")]
    );
    let text = http_get(&service.http_addr.to_string(), "/metrics")
        .await
        .expect("metrics")
        .1;
    assert!(
        text.contains("alarm_digest_unmapped_inputs_total 2"),
        "both inputs counted as unmapped:\n{}",
        text.lines()
            .filter(|l| l.contains("unmapped"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    service.stop().await.expect("stop");
    drop((nats, data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_partition_count_is_refused_until_the_cluster_changes_it() {
    let nats = NatsServer::start();
    let url = nats.url();
    let env = |count: &'static str| {
        vec![
            ("ALARM_DIGEST_NATS__URL", url.clone()),
            ("ALARM_DIGEST_SHARDS__COUNT", "4".to_string()),
            (PARTITIONS_ENV, count.to_string()),
        ]
    };
    let run = |args: &[&str], env: Vec<(&'static str, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_binary(args, &env)
    };
    let (code, _, err) = run(&["setup"], env("4"));
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run(&["setup"], env("2"));
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("streams.input_partitions is 4") && err.contains("partitions set"),
        "{err}"
    );
    let (code, out, err) = run(&["partitions", "set", "--count", "2"], env("4"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("4 -> 2"), "{out}");
    let (code, _, err) = run(&["setup"], env("2"));
    assert_eq!(code, Some(0), "{err}");
    // Retired partitions stay until pruned; pruning an empty, quiet one deletes it.
    let (code, out, err) = run(&["partitions", "prune", "--quiet-secs", "0"], env("2"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deleted ALARM_DIGEST_INPUT_3"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_changes_in_place_from_1_to_4_to_2_under_traffic() {
    let server_dir = tempdir().expect("dir");
    let server_config = server_dir.path().join("nats-server.conf");
    write_server_config(&server_config, 1);
    let nats = NatsServer::start_with_config_file(&server_config);
    let dirs = [tempdir().expect("dir"), tempdir().expect("dir")];
    let mut a = spawn(&nats, dirs[0].path(), &ordinal_env("0", "1"));
    let mut b = spawn(&nats, dirs[1].path(), &ordinal_env("1", "1"));
    wait_ready(&a.http).await;
    wait_ready(&b.http).await;
    let config = test_config(&nats, dirs[0].path());
    let client = TestClient::connect(&config).await;
    let subscriber = PlainSubscriber::start(&client).await;
    let traffic = Traffic::start(&client, 142, 60);
    let url = nats.url();
    let cli = |args: &[&str], count: &str| {
        let env = [
            ("ALARM_DIGEST_NATS__URL", url.as_str()),
            ("ALARM_DIGEST_SHARDS__COUNT", "4"),
            (PARTITIONS_ENV, count),
        ];
        run_binary(args, &env)
    };
    // A rolling restart onto a new count, one instance at a time, gracefully.
    let roll = |process: ServiceProcess, dir: &Path, ordinal: &str, count: &str| {
        process.signal("TERM");
        assert!(process.wait_exit(Duration::from_secs(20)).success());
        spawn(&nats, dir, &ordinal_env(ordinal, count))
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    // 1 → 4: streams first, then the instances, then the servers' mapping.
    let (code, _, err) = cli(&["partitions", "set", "--count", "4"], "1");
    assert_eq!(code, Some(0), "{err}");
    a = roll(a, dirs[0].path(), "0", "4");
    wait_ready(&a.http).await;
    b = roll(b, dirs[1].path(), "1", "4");
    wait_ready(&b.http).await;
    write_server_config(&server_config, 4);
    nats.reload();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let topology = Topology::new(
        alarm_digest::config::StreamsConfig {
            input_partitions: 4,
            ..config.streams.clone()
        },
        4,
    );
    let spread = received_per_partition(&client, &topology).await;
    assert!(
        spread.len() == 4 && spread.iter().all(|(_, messages)| *messages > 0),
        "the reloaded mapping spreads over 4: {spread:?}"
    );

    // 4 → 2: the mapping first, then the count and the instances; the retired partitions
    // are routed until empty, then pruned.
    write_server_config(&server_config, 2);
    nats.reload();
    let (code, _, err) = cli(&["partitions", "set", "--count", "2"], "4");
    assert_eq!(code, Some(0), "{err}");
    a = roll(a, dirs[0].path(), "0", "2");
    wait_ready(&a.http).await;
    b = roll(b, dirs[1].path(), "1", "2");
    wait_ready(&b.http).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (state, requests) = traffic.finish().await;
    client.wait_drained().await;
    let (code, out, err) = cli(&["partitions", "prune", "--quiet-secs", "1"], "2");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("deleted ALARM_DIGEST_INPUT_2")
            && out.contains("deleted ALARM_DIGEST_INPUT_3"),
        "{out}"
    );
    let left: Vec<u16> = received_per_partition(&client, &topology)
        .await
        .into_iter()
        .map(|(partition, _)| partition)
        .collect();
    assert_eq!(left, [0, 1]);
    assert_answered_once(&client, &subscriber, &state, requests, PlainSaw::All).await;
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_of_the_release_before_upgrades_in_place_to_four_partitions() {
    let server_dir = tempdir().expect("dir");
    let server_config = server_dir.path().join("nats-server.conf");
    write_server_config(&server_config, 1);
    let nats = NatsServer::start_with_config_file(&server_config);
    let data = tempdir().expect("dir");
    let env = |count: &str| vec![(PARTITIONS_ENV, count.to_string())];
    // The release before: one input stream of the plain subjects, and a shards bucket that
    // records the shard count only (one partition writes exactly those streams; the key the
    // previous release never wrote is taken away again).
    let before = spawn(&nats, data.path(), &env("1"));
    wait_ready(&before.http).await;
    before.signal("TERM");
    assert!(before.wait_exit(Duration::from_secs(20)).success());
    let config = test_config(&nats, data.path());
    let client = TestClient::connect(&config).await;
    let mut input = client
        .js
        .get_stream(&config.streams.input_stream)
        .await
        .expect("input stream");
    let subjects = input.info().await.expect("info").config.subjects.clone();
    assert_eq!(subjects, ["AlarmStatusChanged", "SendAlarmDigest"]);
    let shards = client
        .js
        .get_key_value(&config.streams.shards_bucket)
        .await
        .expect("shards bucket");
    shards.purge("input.partitions").await.expect("purge");
    // Events wait in the input stream while no instance runs.
    client
        .status("u1", "a", "CRITICAL", "2021-06-07T20:40:10Z")
        .await;
    client
        .status("u2", "b", "WARNING", "2021-06-07T20:40:11Z")
        .await;

    // The upgrade: this release's binary on one partition, then the runbook to four.
    let upgraded = spawn(&nats, data.path(), &env("1"));
    wait_ready(&upgraded.http).await;
    let url = nats.url();
    let (code, out, err) = run_binary(
        &["partitions", "set", "--count", "4"],
        &[
            ("ALARM_DIGEST_NATS__URL", url.as_str()),
            ("ALARM_DIGEST_SHARDS__COUNT", "4"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("1 -> 4"), "{out}");
    upgraded.signal("TERM");
    assert!(upgraded.wait_exit(Duration::from_secs(20)).success());
    let upgraded = spawn(&nats, data.path(), &env("4"));
    wait_ready(&upgraded.http).await;
    write_server_config(&server_config, 4);
    nats.reload();

    let mut partitioned = config.clone();
    partitioned.streams.input_partitions = 4;
    let client = TestClient::connect(&partitioned).await;
    let mut digests = client.digests().await;
    client
        .status("u1", "c", "WARNING", "2021-06-07T20:40:12Z")
        .await;
    client.wait_drained().await;
    client.request_digest("u1").await;
    client.request_digest("u2").await;
    // Two shards answer, in either order.
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let digest = digests.next().await;
        answers.insert(digest.user_id.clone(), entries(&digest));
    }
    assert_eq!(
        answers["u1"],
        [
            triple("a", "CRITICAL", "2021-06-07T20:40:10Z"),
            triple("c", "WARNING", "2021-06-07T20:40:12Z"),
        ]
    );
    assert_eq!(
        answers["u2"],
        [triple("b", "WARNING", "2021-06-07T20:40:11Z")]
    );
    drop(upgraded);
}
