//! Shard state lives in JetStream: a shard's snapshots and its stream's tail rebuild it on any
//! instance. A wiped data dir loses no alarm, shards follow ordinal ownership by themselves,
//! two racers never both apply, a damaged snapshot falls back to the one before, the stream
//! is purged only behind a stored snapshot, and the previous release upgrades in place (an
//! outage during its checks is retried, never taken for "nothing to upgrade").

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use alarm_digest::bus::envelope::{Content, Format};
use alarm_digest::bus::{self, Cluster, Member, Snapshots, Topology};
use alarm_digest::config::{Config, OwnedShards};
use alarm_digest::domain::{Observation, Status, StatusChange};
use alarm_digest::shard_worker::answer::{answer, DigestOptions};
use alarm_digest::store::Store;
use alarm_digest::wire::AlarmDigest;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use tempfile::tempdir;

use crate::cluster::{collect, member_config, per_user, Workload};
use crate::support::*;

fn snapshots(client: &TestClient) -> Snapshots {
    let streams = &client.config.streams;
    Snapshots::new(
        client.js.clone(),
        streams.snapshot_stream.clone(),
        streams.snapshot_subject.clone(),
    )
}

fn user_on_shard(count: u16, shard: u16) -> String {
    let topology = Topology::new(Default::default(), count);
    (0..)
        .map(|i| format!("u{i}"))
        .find(|u| topology.shard_of(u) == shard)
        .expect("a user")
}

fn wipe(dir: &Path) {
    std::fs::remove_dir_all(dir).expect("wipe the data dir");
    std::fs::create_dir_all(dir).expect("an empty data dir");
}

/// `(first, last)` sequence of the shard stream.
async fn stream_extent(client: &TestClient, shard: u16) -> (u64, u64) {
    let topology = Topology::new(client.config.streams.clone(), client.config.shards.count);
    let mut stream = client
        .js
        .get_stream(topology.shard_stream(shard))
        .await
        .expect("shard stream");
    let state = &stream.info().await.expect("info").state;
    (state.first_sequence, state.last_sequence)
}

/// Publishes, for every user, `alarms` new CRITICAL alarms named after `round`, and returns
/// what each user's next digest must hold: exactly those.
async fn new_round(
    client: &TestClient,
    users: &[String],
    round: u32,
    alarms: u32,
) -> BTreeMap<String, Vec<(String, String, String)>> {
    let mut due = BTreeMap::new();
    for user in users {
        let mut mine = Vec::new();
        for k in 0..alarms {
            let (alarm, at) = (
                format!("r{round}-a{k}"),
                format!("2026-02-{:02}T00:00:{k:02}Z", round + 1),
            );
            client.status(user, &alarm, "CRITICAL", &at).await;
            mine.push((alarm, "CRITICAL".to_string(), at));
        }
        due.insert(user.clone(), mine);
    }
    due
}

/// Every user asked once; each digest must hold exactly what is due, and nothing more may
/// arrive (no digest answered twice, nothing re-sent).
pub(crate) async fn ask_everyone_and_check(
    client: &TestClient,
    reader: &mut DigestReader,
    due: &BTreeMap<String, Vec<(String, String, String)>>,
) {
    // Inputs a stopped or killed router had taken come back after the ack wait: let them
    // arrive first, so each request follows every event published before it.
    client.wait_drained().await;
    for user in due.keys() {
        client.request_digest(user).await;
    }
    let digests = collect(reader, due.len()).await;
    assert_eq!(
        digests.len(),
        due.len(),
        "one digest per request, no re-sends"
    );
    assert!(per_user(&digests).values().all(|n| *n == 1));
    for digest in &digests {
        assert_eq!(
            entries(digest),
            due[&digest.user_id],
            "digest of {}",
            digest.user_id
        );
    }
}

#[tokio::test]
async fn a_wiped_data_dir_after_kill_9_under_traffic_loses_no_alarm_and_resends_nothing() {
    // With snapshots every second (the restore starts from one), and with none before the
    // kill (the restore replays the whole log from the initial state).
    for every_secs in ["1", "3600"] {
        wiped_after_kill_9(every_secs).await;
    }
}

async fn wiped_after_kill_9(every_secs: &str) {
    let nats = NatsServer::start();
    let dir = tempdir().unwrap();
    let config = test_config(&nats, dir.path());
    let client = TestClient::connect(&config).await;
    let mut reader = client.digests().await;
    let env = [("ALARM_DIGEST_SNAPSHOTS__EVERY_SECS", every_secs)];
    let service = ServiceProcess::spawn(&nats, dir.path(), &env);
    wait_ready(&service.http).await;

    let workload = Workload::new(100, 3, 2, 17);
    workload.publish(&client, 0..workload.events.len()).await;
    workload.request_all(&client).await;
    let first = collect(&mut reader, 100).await;
    workload.check(&first);
    assert_eq!(first.len(), 100);

    // New alarms arrive; the instance is killed among them and its disk is lost.
    let users: Vec<String> = workload.expected.keys().cloned().collect();
    let (head, tail) = users.split_at(50);
    let mut due = new_round(&client, head, 1, 2).await;
    service.kill_9();
    wipe(dir.path());
    due.extend(new_round(&client, tail, 1, 2).await);
    let service = ServiceProcess::spawn(&nats, dir.path(), &env);
    wait_ready(&service.http).await;

    // Every user's next digest is exactly the new alarms: nothing lost with the disk, and
    // nothing told before told again. The requests answered before the kill that the
    // restore replayed were answered again with the same Msg-Ids, which the output stream
    // dropped (the README's bound: zero re-sent within streams.duplicate_window_secs).
    ask_everyone_and_check(&client, &mut reader, &due).await;
    drop(service);
}

fn pod(nats: &NatsServer, dir: &Path, replicas: u16, ordinal: u16) -> Config {
    let mut config = member_config(nats, dir, ordinal);
    config.shards.owned = OwnedShards::Ordinal;
    config.shards.replicas = replicas;
    config
}

#[tokio::test]
async fn ordinal_ownership_scales_from_one_pod_to_three_and_back_with_nothing_lost_or_resent() {
    let nats = NatsServer::start();
    let dirs = [tempdir().unwrap(), tempdir().unwrap(), tempdir().unwrap()];
    let client = TestClient::connect(&pod(&nats, dirs[0].path(), 1, 0)).await;
    let mut reader = client.digests().await;
    let users: Vec<String> = (0..60).map(|u| format!("user-{u}")).collect();

    let single = start_service(pod(&nats, dirs[0].path(), 1, 0)).await;
    let due = new_round(&client, &users, 1, 2).await;
    ask_everyone_and_check(&client, &mut reader, &due).await;
    let _more = new_round(&client, &users, 2, 1).await;

    // 1 → 3: pod 0 restarts with replicas = 3; pods 1 and 2 start on empty volumes.
    single.stop().await.expect("clean stop");
    let pods = [
        start_service(pod(&nats, dirs[0].path(), 3, 0)).await,
        start_service(pod(&nats, dirs[1].path(), 3, 1)).await,
        start_service(pod(&nats, dirs[2].path(), 3, 2)).await,
    ];
    for (ordinal, pod) in pods.iter().enumerate() {
        assert_eq!(pod.metrics.shards_consuming.get(), 2, "pod {ordinal}");
    }
    let mut due = new_round(&client, &users, 3, 1).await;
    // The round-2 alarm arrived before the scale-up and was never told: it is due too.
    for (user, alarms) in &mut due {
        alarms.insert(
            0,
            (
                "r2-a0".into(),
                "CRITICAL".into(),
                "2026-02-03T00:00:00Z".into(),
            ),
        );
        assert!(users.contains(user));
    }
    ask_everyone_and_check(&client, &mut reader, &due).await;
    assert!(
        pods.iter().all(|p| p.metrics.digest_requests.get() > 0),
        "every pod answers its users"
    );

    // 3 → 1: pod 0 restarts with replicas = 1 while pods 1 and 2 still hold their shards;
    // it takes them as they stop.
    let [p0, p1, p2] = pods;
    p0.stop().await.expect("clean stop");
    let single = start_service_unready(pod(&nats, dirs[0].path(), 1, 0)).await;
    p1.stop().await.expect("clean stop");
    p2.stop().await.expect("clean stop");
    wait_ready(&single.http_addr.to_string()).await;
    let due = new_round(&client, &users, 4, 2).await;
    ask_everyone_and_check(&client, &mut reader, &due).await;
    single.stop().await.expect("clean stop");
}

#[tokio::test]
async fn two_instances_racing_for_one_shard_never_both_apply_it() {
    let nats = NatsServer::start();
    let (a_dir, b_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let owning_0 = |dir: &Path| {
        let mut config = test_config(&nats, dir);
        config.shards.owned = OwnedShards::List([0].into_iter().collect());
        config
    };
    let client = TestClient::connect(&owning_0(a_dir.path())).await;
    let (a, b) = tokio::join!(
        start_service_unready(owning_0(a_dir.path())),
        start_service_unready(owning_0(b_dir.path()))
    );
    let user = user_on_shard(4, 0);
    for n in 0..20 {
        client
            .status(&user, &format!("a{n}"), "WARNING", "2026-01-01T00:00:01Z")
            .await;
    }
    let total = || a.metrics.events_applied.get() + b.metrics.events_applied.get();
    wait_for("the events applied", || total() >= 20).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let applied = [
        a.metrics.events_applied.get(),
        b.metrics.events_applied.get(),
    ];
    assert!(
        applied == [20, 0] || applied == [0, 20],
        "exactly one applies: {applied:?}"
    );
    let loser = if applied[0] == 0 { &a } else { &b };
    let waiting = wait_standby(&loser.http_addr.to_string(), "lease held by").await;
    assert!(waiting.contains("shard 0 (lease held by"), "{waiting}");
    assert_eq!(loser.metrics.shards_consuming.get(), 0);
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
}

async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_damaged_newest_snapshot_falls_back_to_the_one_before() {
    let nats = NatsServer::start();
    let (a_dir, b_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let config = |dir: &Path| {
        let mut config = test_config(&nats, dir);
        config.snapshots.every_secs = 1;
        config
    };
    let client = TestClient::connect(&config(a_dir.path())).await;
    let mut reader = client.digests().await;
    let user = user_on_shard(4, 1);
    let a = start_service(config(a_dir.path())).await;
    for (n, taken) in [(1, 1), (2, 2)] {
        let at = format!("2026-01-01T00:00:0{n}Z");
        client
            .status(&user, &format!("a{n}"), "CRITICAL", &at)
            .await;
        client.wait_drained().await;
        wait_for("a snapshot", || a.metrics.snapshots_taken.get() >= taken).await;
    }
    a.stop().await.expect("clean stop");
    client
        .status(&user, "a3", "CRITICAL", "2026-01-01T00:00:03Z")
        .await;

    let chain = snapshots(&client).chain(1, 5).await.expect("snapshots");
    assert_eq!(chain.len(), 2, "keep = 2");
    assert!(chain[0].manifest.covers > chain[1].manifest.covers);
    // The stream still holds everything after the older snapshot.
    let (first, _) = stream_extent(&client, 1).await;
    assert_eq!(first, chain[1].manifest.covers + 1);
    // Lose one chunk of the newest snapshot.
    client
        .js
        .get_stream(&client.config.streams.snapshot_stream)
        .await
        .expect("snapshot stream")
        .delete_message(chain[0].manifest.chunks[0])
        .await
        .expect("chunk deleted");

    let b = start_service(config(b_dir.path())).await;
    assert_eq!(b.metrics.snapshots_damaged.get(), 1);
    client.request_digest(&user).await;
    let digest = reader.next_for(&user).await;
    let alarms: Vec<String> = entries(&digest).into_iter().map(|e| e.0).collect();
    assert_eq!(alarms, ["a1", "a2", "a3"]);
    b.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_shard_stream_is_purged_only_behind_a_stored_snapshot_even_across_crashes() {
    for point in ["snapshot-stored", "shard-stream-purged"] {
        let nats = NatsServer::start();
        let dir = tempdir().unwrap();
        let client = TestClient::connect(&test_config(&nats, dir.path())).await;
        let mut reader = client.digests().await;
        let user = user_on_shard(4, 2);
        let env = [
            ("ALARM_DIGEST_SNAPSHOTS__EVERY_SECS", "1"),
            (alarm_digest::failpoint::ENV, point),
        ];
        let service = ServiceProcess::spawn(&nats, dir.path(), &env);
        wait_ready(&service.http).await;
        client
            .status(&user, "a1", "CRITICAL", "2026-01-01T00:00:01Z")
            .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client
            .status(&user, "a2", "WARNING", "2026-01-01T00:00:02Z")
            .await;
        let status = service.wait_exit(WAIT);
        assert!(!status.success(), "{point}: aborted there");

        let chain = snapshots(&client).chain(2, 5).await.expect("snapshots");
        let (first, last) = stream_extent(&client, 2).await;
        match point {
            "snapshot-stored" => {
                assert_eq!(chain.len(), 1, "{point}");
                assert_eq!(first, 1, "{point}: nothing purged before the purge step");
            }
            _ => {
                assert_eq!(chain.len(), 2, "{point}");
                let older = chain[1].manifest.covers;
                assert!(older >= 1, "{point}");
                assert_eq!(
                    first,
                    older + 1,
                    "{point}: purged up to the older kept snapshot, not the newest"
                );
                assert!(last > older);
            }
        }

        // A new disk: the snapshot and the tail rebuild the shard.
        wipe(dir.path());
        let service = ServiceProcess::spawn(&nats, dir.path(), &[]);
        wait_ready(&service.http).await;
        // a2 may have been taken by the aborted router: it comes back after the ack wait.
        client.wait_drained().await;
        client.request_digest(&user).await;
        let digest = reader.next_for(&user).await;
        let alarms: Vec<(String, String)> = entries(&digest)
            .into_iter()
            .map(|(alarm, status, _)| (alarm, status))
            .collect();
        assert_eq!(
            alarms,
            [
                ("a1".to_string(), "CRITICAL".to_string()),
                ("a2".to_string(), "WARNING".to_string())
            ],
            "{point}"
        );
        drop(service);
    }
}

fn change(user: &str, alarm: &str, at: i64) -> StatusChange {
    StatusChange {
        user_id: user.into(),
        alarm_id: alarm.into(),
        observation: Observation {
            status: Status::Critical,
            changed_at: chrono::DateTime::from_timestamp(at, 0).expect("a time"),
        },
    }
}

#[tokio::test]
async fn a_broker_outage_is_never_taken_for_an_absent_stream_or_message() {
    let mut nats = NatsServer::start();
    let topology = Topology::new(Default::default(), 4);
    let raw = async_nats::connect(nats.url()).await.expect("connect");
    let mut js = async_nats::jetstream::new(raw);
    js.set_timeout(Duration::from_secs(1));
    assert!(!topology
        .legacy_shard_stream_exists(&js, 0)
        .await
        .expect("lookup"));
    // A deleted message is a gap; a stored one is read.
    let stream = js
        .create_stream(stream::Config {
            name: "GAPS".into(),
            subjects: vec!["gaps".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    for payload in ["first", "second"] {
        js.publish("gaps", payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    stream.delete_message(1).await.expect("delete");
    assert!(bus::message_at(&stream, 1).await.expect("read").is_none());
    let second = bus::message_at(&stream, 2).await.expect("read");
    assert_eq!(second.map(|m| m.payload), Some("second".into()));

    nats.stop();
    // `shard recount` deletes the streams it has read: a read that failed is not a gap.
    let read = bus::message_at(&stream, 2).await;
    assert!(read.as_ref().is_err_and(|e| !e.is_fatal()), "{read:?}");
    // Had a previous-release stream existed, "absent" would skip its drain: the answer must
    // be an error the caller retries, never "no such stream".
    let retired = topology.retire_legacy_shard_stream(&js, 0).await;
    assert!(
        retired.as_ref().is_err_and(|e| !e.is_fatal()),
        "{retired:?}"
    );
    let exists = topology.legacy_shard_stream_exists(&js, 0).await;
    assert!(exists.as_ref().is_err_and(|e| !e.is_fatal()), "{exists:?}");

    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match topology.retire_legacy_shard_stream(&js, 0).await {
            Ok(found) => break assert!(!found),
            Err(error) if Instant::now() < deadline => {
                assert!(!error.is_fatal(), "{error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("the broker is back but the lookup still fails: {error}"),
        }
    }
}

#[tokio::test]
async fn the_previous_release_upgrades_in_place_with_its_queued_messages_and_local_state() {
    let nats = NatsServer::start();
    let dir = tempdir().unwrap();
    let config = test_config(&nats, dir.path());
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let user = user_on_shard(4, 3);
    let bystander = (0..)
        .map(|i| format!("b{i}"))
        .find(|u| topology.shard_of(u) == 3)
        .expect("a user");

    // The previous release's data dir: an alarm of the user, and an answered request at shard
    // stream sequence 1 (the new stream starts at 1 again) whose digest is still unpublished.
    let instance = {
        let store = Store::open(dir.path(), 8).expect("open");
        store.check_shard_count(4).expect("count");
        let mut shard = store.shard(3).expect("shard");
        let mut write = shard.begin();
        write
            .apply(&change(&user, "kept", 1_767_225_600), 100)
            .expect("apply");
        let options = DigestOptions {
            skip_empty: false,
            max_part_bytes: 512 * 1024,
            written_at: chrono::Utc::now(),
        };
        answer(&mut write, &bystander, 1, &options).expect("digest");
        write.commit().expect("commit");
        store.flush().expect("flush");
        store.instance_id().expect("id")
    };

    // Its broker: WorkQueue shard streams holding routed messages (a single status change of
    // the release before envelopes, and an envelope), homes recorded in the shards bucket.
    let raw = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(raw.clone());
    for shard in 0..4 {
        js.create_stream(stream::Config {
            name: topology.legacy_shard_stream(shard),
            subjects: vec![
                format!("AlarmStatusChanged.shard.{shard}"),
                format!("SendAlarmDigest.shard.{shard}"),
            ],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("previous release's shard stream");
    }
    let single = status_payload(&user, "queued-single", "WARNING", "2026-01-01T00:00:02Z");
    js.publish("AlarmStatusChanged.shard.3", single.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let mut builder = alarm_digest::bus::envelope::Builder::new(Format::V1);
    let entry = status_payload(&user, "queued-envelope", "CRITICAL", "2026-01-01T00:00:03Z");
    builder.push(7, "AlarmStatusChanged", &Content::Json(entry.as_bytes()));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        alarm_digest::bus::envelope::FRAME_HEADER,
        alarm_digest::bus::envelope::ENVELOPE_V1,
    );
    js.publish_with_headers("AlarmStatusChanged.shard.3", headers, builder.finish())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let me = Member::here(instance.clone(), &config);
    Cluster::open(&js, &config, me.clone())
        .await
        .expect("buckets");
    let homes = js
        .get_key_value(&config.streams.shards_bucket)
        .await
        .expect("shards bucket");
    for shard in 0..4 {
        homes
            .put(
                format!("home.{shard}"),
                serde_json::to_vec(&me).expect("json").into(),
            )
            .await
            .expect("home");
    }

    // Another instance (another data dir) owning the shard waits for the home to upgrade it.
    let other_dir = tempdir().unwrap();
    let mut other_config = test_config(&nats, other_dir.path());
    other_config.shards.owned = OwnedShards::List([3].into_iter().collect());
    let other = start_service_unready(other_config).await;
    let waiting = wait_shard_blocked_by(
        &other.http_addr.to_string(),
        "upgrading: waiting for the previous release's home",
    )
    .await;
    assert!(waiting.contains(&instance), "{waiting}");
    other.stop().await.expect("clean stop");

    for shard in 0..4 {
        assert!(topology
            .legacy_shard_stream_exists(&js, shard)
            .await
            .expect("lookup"));
    }

    // The new release starts on the old data dir.
    let client = TestClient::connect(&config).await;
    let mut reader = client.digests().await;
    let service = start_service(config.clone()).await;
    client.request_digest(&user).await;
    // The digest the previous release had not published yet, and the answer to the request.
    let digests: Vec<AlarmDigest> = collect(&mut reader, 2).await;
    assert_eq!(digests.len(), 2, "{digests:?}");
    let of = |who: &str| {
        digests
            .iter()
            .find(|d| d.user_id == who)
            .unwrap_or_else(|| panic!("no digest for {who}: {digests:?}"))
    };
    let alarms: Vec<String> = entries(of(&user)).into_iter().map(|e| e.0).collect();
    assert_eq!(alarms, ["kept", "queued-single", "queued-envelope"]);
    assert!(of(&bystander).active_alarms.is_empty());

    // The old streams are gone, the homes forgotten, every shard has a first snapshot.
    for shard in 0..4 {
        assert!(!topology
            .legacy_shard_stream_exists(&js, shard)
            .await
            .expect("lookup"));
        assert!(homes
            .get(format!("home.{shard}"))
            .await
            .expect("read")
            .is_none());
        assert!(!snapshots(&client)
            .chain(shard, 1)
            .await
            .expect("chain")
            .is_empty());
    }
    service.stop().await.expect("clean stop");

    // The data dir is no longer the only copy: a new disk carries on, sent markers included,
    // and a home record left behind (its deletion failed) pins nothing once the old stream
    // is gone.
    let gone = Member::here("gone".into(), &config);
    homes
        .put("home.3", serde_json::to_vec(&gone).expect("json").into())
        .await
        .expect("home");
    wipe(dir.path());
    let service = start_service(config).await;
    client
        .status(&user, "after", "WARNING", "2026-01-01T00:00:04Z")
        .await;
    client.request_digest(&user).await;
    let digest = reader.next_for(&user).await;
    let alarms: Vec<String> = entries(&digest).into_iter().map(|e| e.0).collect();
    assert_eq!(alarms, ["after"]);
    service.stop().await.expect("clean stop");
}
