//! Fault drills: repeated crashes, broker outages and a missing output stream while traffic
//! flows. Every drill ends by checking that no active alarm was lost.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use alarm_digest::wire::AlarmDigest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::tempdir;

use crate::support::*;

const STATUSES: [&str; 3] = ["CLEARED", "WARNING", "CRITICAL"];

/// Publishes random status changes (reordered, some twice) and digest requests until stopped,
/// retrying each publish until JetStream stored it (the broker may be away), and remembers
/// the final state.
pub(crate) struct Traffic {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<HashMap<(String, String), (i64, usize)>>,
}

impl Traffic {
    pub(crate) fn start(client: &TestClient, seed: u64, users: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let js = client.js.clone();
        let config = client.config.clone();
        let (stop_flag, request_count) = (stop.clone(), requests.clone());
        let task = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut state: HashMap<(String, String), (i64, usize)> = HashMap::new();
            let mut clock = 0i64;
            let mut sent = 0u64;
            while !stop_flag.load(Ordering::Relaxed) {
                let user = format!("drill-user-{}", rng.gen_range(0..users));
                let (subject, payload) = if rng.gen_ratio(1, 20) {
                    request_count.fetch_add(1, Ordering::Relaxed);
                    (
                        config.streams.digest_request_subject.clone(),
                        format!(r#"{{"UserID":"{user}"}}"#),
                    )
                } else {
                    let alarm = format!("alarm-{}", rng.gen_range(0..5));
                    let status = rng.gen_range(0..3);
                    // Mostly moving forward, sometimes late: the broker reorders.
                    clock += 1_000;
                    let nanos = clock - rng.gen_range(0..5_000);
                    let entry = state
                        .entry((user.clone(), alarm.clone()))
                        .or_insert((nanos, status));
                    if (nanos, status) > *entry {
                        *entry = (nanos, status);
                    }
                    let at =
                        chrono::DateTime::from_timestamp_nanos(1_623_000_000_000_000_000 + nanos);
                    let payload = status_payload(
                        &user,
                        &alarm,
                        STATUSES[status],
                        &alarm_digest::wire::format_time(&at),
                    );
                    (config.streams.status_subject.clone(), payload)
                };
                // As a careful producer publishes: until the PubAck, retrying under one
                // Nats-Msg-Id, so a publish stored before its ack was lost is not stored twice.
                // Now and then a status change is sent twice, as a producer that restarted
                // would: a second message with the same content.
                let copies = if subject == config.streams.status_subject && rng.gen_ratio(1, 10) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    sent += 1;
                    let id = format!("drill-{seed}-{sent}");
                    loop {
                        let message = async_nats::jetstream::message::PublishMessage::build()
                            .payload(payload.clone().into())
                            .message_id(&id);
                        match js.send_publish(subject.clone(), message).await {
                            Ok(ack) => match ack.await {
                                Ok(_) => break,
                                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                            },
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                }
            }
            state
        });
        Traffic {
            stop,
            requests,
            task,
        }
    }

    pub(crate) async fn finish(self) -> (HashMap<(String, String), (i64, usize)>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let state = self.task.await.expect("traffic task");
        (state, self.requests.load(Ordering::Relaxed))
    }
}

/// Requests a final digest for every user and checks that the last digest mentioning each
/// finally-active alarm reports its final status. Returns all digests.
pub(crate) async fn assert_nothing_lost(
    client: &TestClient,
    state: &HashMap<(String, String), (i64, usize)>,
) -> Vec<AlarmDigest> {
    final_digests_checked(client, state, None).await
}

/// [`assert_nothing_lost`]; with `requests` (those sent during the run), it also waits for
/// that many answers before the final ones.
async fn final_digests_checked(
    client: &TestClient,
    state: &HashMap<(String, String), (i64, usize)>,
    requests: Option<u64>,
) -> Vec<AlarmDigest> {
    client.wait_drained().await;
    let mut users: Vec<&String> = state.keys().map(|(user, _)| user).collect();
    users.sort();
    users.dedup();
    let answered_before = match requests {
        Some(requests) => requests,
        None => client.digests_stored().await,
    };
    for user in &users {
        client.request_digest(user).await;
    }
    // Every final request answered (a request is answered after its user's earlier events
    // in the shard log), then nothing left anywhere.
    client
        .wait_digests_stored(answered_before + users.len() as u64)
        .await;
    // A shard held up at the end (a stalled consumer created again, a leader moved) answers
    // a few seconds late; late is not lost. Read again until every final status is there,
    // for up to a minute: an alarm truly lost never arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        client.wait_drained().await;
        let digests = client.digests().await.drain().await;
        let Some(key) = first_missing(&digests, state) else {
            return digests;
        };
        let ((user, alarm), (changed, status)) = (key, &state[key]);
        if std::time::Instant::now() < deadline {
            eprintln!(
                "{}/{}: final status not in the digests yet; reading again",
                key.0, key.1
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // What the user was sent, to tell a change never applied from one sent unseen.
        eprintln!(
            "{user}/{alarm}: last change {} at {changed}",
            STATUSES[*status]
        );
        for digest in digests.iter().filter(|digest| &digest.user_id == user) {
            eprintln!("  digest {:?}", entries(digest));
        }
        let got = last_reported(&digests).remove(&(user.clone(), alarm.clone()));
        assert_eq!(
            got.as_deref(),
            Some(STATUSES[*status]),
            "{user}/{alarm} lost"
        );
    }
}

/// The first alarm whose final status (active ones only) the digests do not end with.
fn first_missing<'s>(
    digests: &[AlarmDigest],
    state: &'s HashMap<(String, String), (i64, usize)>,
) -> Option<&'s (String, String)> {
    let reported = last_reported(digests);
    state
        .iter()
        .find(|(key, (_, status))| {
            *status != 0 && reported.get(*key).map(String::as_str) != Some(STATUSES[*status])
        })
        .map(|(key, _)| key)
}

/// What a plain subscriber must have seen of the stored digests.
pub(crate) enum PlainSaw {
    /// Every one, once: its server never went away.
    All,
    /// Some of them (core NATS is at most once: a subscriber whose server was killed misses
    /// what was republished meanwhile), never one twice and never one not stored.
    NoMoreThanStored,
}

/// Checks the end of a run against the model: nothing lost, every request answered exactly
/// once, no alarm stored twice, and what a plain subscriber got. Returns the stored digests.
pub(crate) async fn assert_answered_once(
    client: &TestClient,
    subscriber: &PlainSubscriber,
    state: &HashMap<(String, String), (i64, usize)>,
    requests: u64,
    saw: PlainSaw,
) -> Vec<AlarmDigest> {
    let digests = final_digests_checked(client, state, Some(requests)).await;
    let users = state
        .keys()
        .map(|(user, _)| user)
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    assert_eq!(
        digests.len() as u64,
        requests + users,
        "every request answered exactly once"
    );
    assert_eq!(duplicate_alarms(&digests), 0, "an alarm stored twice");
    let plain: Vec<AlarmDigest> = subscriber
        .settle(Duration::from_secs(1))
        .await
        .into_iter()
        .map(|received| received.digest)
        .collect();
    assert_eq!(
        duplicate_alarms(&plain),
        0,
        "a plain subscriber got an alarm twice"
    );
    match saw {
        PlainSaw::All => assert_eq!(plain, digests, "the plain subscriber got what was stored"),
        PlainSaw::NoMoreThanStored => assert!(
            plain.iter().all(|digest| digests.contains(digest)),
            "a plain subscriber got a digest the stream never stored"
        ),
    }
    digests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_kill_9s_at_random_moments_lose_nothing_and_answer_every_request_once() {
    let bed = TestBed::start().await;
    // The notification service's two ways of listening, both from the start.
    let subscriber = PlainSubscriber::start(&bed.client).await;
    let mut durable = bed.client.durable_digests("notification-service").await;
    let traffic = Traffic::start(&bed.client, 5, 200);
    let mut rng = StdRng::seed_from_u64(99);
    for _ in 0..5 {
        let service = ServiceProcess::spawn(&bed.nats, bed.data.path(), &[]);
        wait_ready(&service.http).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
        service.kill_9();
    }
    let (state, requests) = traffic.finish().await;
    let service = ServiceProcess::spawn(&bed.nats, bed.data.path(), &[]);
    wait_ready(&service.http).await;
    let digests = assert_nothing_lost(&bed.client, &state).await;

    let users = state
        .keys()
        .map(|(u, _)| u)
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    let answered = digests.len() as u64;
    eprintln!("kill -9 x5: {requests} requests during traffic + {users} final; {answered} digests");
    assert_eq!(
        answered,
        requests + users,
        "every request answered exactly once"
    );
    let plain: Vec<AlarmDigest> = subscriber
        .settle(Duration::from_secs(1))
        .await
        .into_iter()
        .map(|r| r.digest)
        .collect();
    let consumed = durable.drain().await;
    let alarms: usize = digests.iter().map(|d| d.active_alarms.len()).sum();
    eprintln!(
        "plain subscriber: {} digests; durable consumer: {}; {alarms} alarms",
        plain.len(),
        consumed.len()
    );
    assert_eq!(
        duplicate_alarms(&plain),
        0,
        "a plain subscriber got an alarm twice"
    );
    assert_eq!(
        duplicate_alarms(&consumed),
        0,
        "a durable consumer got an alarm twice"
    );
    assert_eq!(
        plain, digests,
        "the plain subscriber got exactly what the stream stored"
    );
    assert_eq!(consumed, digests);
    assert!(
        state.len() > 500,
        "the drill touched many alarms ({})",
        state.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_while_traffic_flows_loses_nothing() {
    let mut nats = NatsServer::start();
    let data = tempdir().expect("data dir");
    let config = test_config(&nats, data.path());
    let client = TestClient::connect(&config).await;
    let service = start_service(config.clone()).await;
    let traffic = Traffic::start(&client, 8, 100);
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    nats.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (state, _) = traffic.finish().await;
    let client = TestClient::connect(&config).await;
    assert_nothing_lost(&client, &state).await;
    service.stop().await.expect("clean stop");
}

/// A three-node JetStream cluster on loopback with R3 streams, the service given all three
/// URLs and started before the cluster: a node killed under traffic and restarted loses
/// nothing, and every user's final digest is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_rides_out_a_killed_node_with_the_service_started_first() {
    let mut cluster = NatsCluster::plan(3);
    let data = tempdir().expect("data dir");
    let mut config = test_config_at(&cluster.urls(), data.path());
    config.streams.replicas = 3;
    // The service first: it retries the connection until the cluster is there.
    let service = start_service_unready(config.clone()).await;
    cluster.start();
    let client = TestClient::connect(&config).await;
    wait_ready(&service.http_addr.to_string()).await;

    let traffic = Traffic::start(&client, 13, 60);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nodes[1].stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.nodes[1].restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (state, requests) = traffic.finish().await;
    let digests = assert_nothing_lost(&client, &state).await;
    eprintln!(
        "R3 cluster, one node killed: {requests} requests, {} digests, {} alarms",
        digests.len(),
        state.len()
    );
    assert_eq!(duplicate_alarms(&digests), 0);
    assert!(state.len() > 100, "traffic touched {} alarms", state.len());
    service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn digests_wait_while_the_output_stream_is_missing_and_resume_when_it_returns() {
    let mut bed = TestBed::start().await;
    let service = start_service(bed.config.clone()).await;
    bed.client
        .status("u", "a", "CRITICAL", "2021-06-07T20:00:01Z")
        .await;
    bed.client
        .js
        .delete_stream(&bed.config.streams.output_stream)
        .await
        .expect("delete output");

    bed.client.request_digest("u").await;
    // The shard holds the digest in its outbox and reports not ready until it is delivered.
    let http = service.http_addr.to_string();
    wait_shard_not_ready(&http).await;
    let inbox = bed
        .client
        .stream_messages(&bed.config.streams.input_stream)
        .await;
    assert_eq!(inbox, 0, "the request was taken (and is held), not lost");

    // The stream returns (here: as `alarm-digest setup` would create it).
    bed.client = TestClient::connect(&bed.config).await;
    let digest = bed.client.digests().await.next().await;
    assert_eq!(
        entries(&digest),
        [("a".into(), "CRITICAL".into(), "2021-06-07T20:00:01Z".into())]
    );
    wait_ready(&http).await;
    service.stop().await.expect("clean stop");
}

#[test]
fn a_data_dir_that_cannot_be_created_is_a_clear_startup_error() {
    let parent = tempfile::NamedTempFile::new().expect("a file");
    let path = parent.path().join("data");
    let path = path.to_string_lossy().into_owned();
    let (code, _, stderr) = run_binary(&["run"], &[("ALARM_DIGEST_STORAGE__PATH", &path)]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot open the data dir") && stderr.contains(&path),
        "{stderr}"
    );
}

/// A small tmpfs for a data dir that can fill up, resized or removed on drop. Mounting needs
/// root, as the project's machines and CI run.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let dir = tempdir().expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this drill mounts a small tmpfs and needs root (as CI runs)"
        );
        SmallDisk { dir }
    }

    fn resize(&self, megabytes: u32) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={megabytes}m")])
            .arg(self.dir.path())
            .status()
            .expect("run mount");
        assert!(status.success());
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_naks_reports_not_ready_exits_and_loses_nothing_after_restart() {
    let nats = NatsServer::start();
    // 20k alarms take ~6 MB in sled (~300 B each, README Performance): twice what fits, so
    // the disk fills whatever sled's segment layout does (at 6 MiB it sometimes did not).
    let disk = SmallDisk::mount(3);
    let config = test_config(&nats, disk.path());
    let client = TestClient::connect(&config).await;
    let give_up = [("ALARM_DIGEST_STORAGE__GIVE_UP_AFTER_SECS", "3")];
    let service = ServiceProcess::spawn(&nats, disk.path(), &give_up);
    wait_ready(&service.http).await;

    // Watch readiness from the start: the instance may give up while events are published.
    let saw_not_ready = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, http) = (saw_not_ready.clone(), service.http.clone());
        tokio::spawn(async move {
            loop {
                if let Ok((503, body)) = http_get(&http, "/readyz").await {
                    if body.contains("shard") {
                        seen.store(true, Ordering::Relaxed);
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // 40k events over 20k alarms: well past what 3 MiB holds.
    let mut state: HashMap<(String, String), (i64, usize)> = HashMap::new();
    let subject = config.streams.status_subject.clone();
    let mut acks = Vec::new();
    for n in 0..40_000i64 {
        let (user, alarm, status) = (
            format!("disk-user-{}", n % 2_000),
            format!("alarm-{}", (n / 2_000) % 10),
            (n % 3) as usize,
        );
        state.insert((user.clone(), alarm.clone()), (n, status));
        let at = chrono::DateTime::from_timestamp_nanos(1_623_000_000_000_000_000 + n);
        let payload = status_payload(
            &user,
            &alarm,
            STATUSES[status],
            &alarm_digest::wire::format_time(&at),
        );
        acks.push(
            client
                .js
                .publish(subject.clone(), payload.into())
                .await
                .expect("publish"),
        );
        if acks.len() == 1_000 {
            for ack in acks.drain(..) {
                ack.await.expect("stored");
            }
        }
    }
    for ack in acks {
        ack.await.expect("stored");
    }

    // While the store fails the shard reports not ready, then the instance gives up.
    // The watcher keeps polling on the runtime's other thread while this one waits.
    let status = service.wait_exit(Duration::from_secs(60));
    watcher.abort();
    assert!(
        saw_not_ready.load(Ordering::Relaxed),
        "a failing store must show on /readyz"
    );
    assert_eq!(
        status.code(),
        Some(1),
        "gives up with exit 1 for the supervisor to restart it"
    );

    // Space returns; the restarted instance applies everything that was never acked.
    disk.resize(256);
    let service = ServiceProcess::spawn(&nats, disk.path(), &give_up);
    wait_ready(&service.http).await;
    assert_nothing_lost(&client, &state).await;
    drop(service);
}

#[tokio::test]
async fn digests_wait_while_the_output_stream_is_full_and_resume_when_it_has_room() {
    use async_nats::jetstream::stream::DiscardPolicy;
    let bed = TestBed::start().await;
    let service = start_service(bed.config.clone()).await;
    let mut digests = bed.client.digests().await;
    bed.client
        .status("u", "a", "WARNING", "2021-06-07T20:00:01Z")
        .await;
    bed.client.request_digest("u").await;
    assert_eq!(digests.next().await.active_alarms.len(), 1);

    // An operator caps the output stream at what it holds, refusing new messages.
    let mut output = bed
        .client
        .js
        .get_stream(&bed.config.streams.output_stream)
        .await
        .expect("output");
    let mut capped = output.info().await.expect("info").config.clone();
    capped.max_messages = 1;
    capped.discard = DiscardPolicy::New;
    bed.client
        .js
        .update_stream(capped.clone())
        .await
        .expect("cap the stream");

    bed.client
        .status("u", "b", "CRITICAL", "2021-06-07T20:00:02Z")
        .await;
    bed.client.request_digest("u").await;
    let http = service.http_addr.to_string();
    wait_shard_not_ready(&http).await;

    // Room again: the held digest goes out, with exactly what was due.
    capped.max_messages = -1;
    bed.client
        .js
        .update_stream(capped)
        .await
        .expect("uncap the stream");
    let digest = digests.next().await;
    assert_eq!(
        entries(&digest),
        [("b".into(), "CRITICAL".into(), "2021-06-07T20:00:02Z".into())]
    );
    wait_ready(&http).await;
    service.stop().await.expect("clean stop");
}
