//! Failover and fencing: a warm standby takes a killed holder's shards with nothing lost or
//! sent twice; a process that lost a shard's lease (paused, cut off) takes it again only as a
//! new owner does, restoring first, and the broker refuses what it writes meanwhile; only the
//! holder touches the shard's consumer; a shard that holds work it does not apply says so and
//! recovers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use alarm_digest::bus::snapshots::Manifest;
use alarm_digest::bus::{Snapshots, Topology};
use alarm_digest::wire::InputKind;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use tempfile::tempdir;

use crate::drills::{assert_answered_once, PlainSaw, Traffic};
use crate::shard_state::ask_everyone_and_check;
use crate::support::*;

fn users_on_every_shard(count: u16, per_shard: usize) -> Vec<String> {
    let topology = Topology::new(Default::default(), count);
    let mut by_shard: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let user = format!("user-{i}");
        let shard = topology.shard_of(&user);
        let mine = by_shard.entry(shard).or_default();
        if mine.len() < per_shard {
            mine.push(user);
        }
        if by_shard.len() == usize::from(count) && by_shard.values().all(|u| u.len() == per_shard) {
            break;
        }
    }
    by_shard.into_values().flatten().collect()
}

/// Publishes one new CRITICAL alarm per user, named after `round`; records it as due.
async fn round(
    client: &TestClient,
    users: &[String],
    round: u32,
    due: &mut BTreeMap<String, Vec<(String, String, String)>>,
) {
    for user in users {
        let (alarm, at) = (
            format!("r{round}"),
            format!("2026-03-01T00:{:02}:{:02}Z", round / 60, round % 60),
        );
        client.status(user, &alarm, "CRITICAL", &at).await;
        due.entry(user.clone())
            .or_default()
            .push((alarm, "CRITICAL".into(), at));
    }
}

async fn metric(http: &str, name: &str) -> u64 {
    let (_, metrics) = http_get(http, "/metrics").await.expect("metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} in:\n{metrics}"))
}

/// The steps that stalled shards for good: holder A paused, B takes over and snapshots so
/// the log is purged behind B, A woken, then B paused past its lease. A must restore B's
/// newer state before applying, and every request must be answered once, with exactly what
/// is due.
#[tokio::test]
async fn a_former_holder_takes_a_shard_again_only_after_restoring_the_newer_owners_state() {
    let nats = NatsServer::start();
    let (a_dir, b_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let env = [("ALARM_DIGEST_SNAPSHOTS__EVERY_SECS", "1")];
    let a = ServiceProcess::spawn(&nats, a_dir.path(), &env);
    wait_ready(&a.http).await;
    let b = ServiceProcess::spawn(&nats, b_dir.path(), &env);
    wait_standby(&b.http, "lease held by").await;

    let client = TestClient::connect(&test_config(&nats, a_dir.path())).await;
    let mut reader = client.digests().await;
    let users = users_on_every_shard(4, 3);
    let mut due = BTreeMap::new();
    round(&client, &users, 0, &mut due).await;
    client.wait_drained().await;

    // A paused past its lease: B takes every shard, and its snapshots (every second, two
    // kept) let it purge the shard logs behind them while new alarms keep coming.
    a.signal("STOP");
    wait_holding(&b.http).await;
    let purged_from = Instant::now();
    let mut n = 1;
    while purged_from.elapsed() < Duration::from_secs(5) {
        round(&client, &users, n, &mut due).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client.wait_drained().await;
    let topology = Topology::new(client.config.streams.clone(), 4);
    for shard in 0..4 {
        let mut stream = client
            .js
            .get_stream(topology.shard_stream(shard))
            .await
            .expect("shard stream");
        let first = stream.info().await.expect("info").state.first_sequence;
        assert!(
            first > 1,
            "shard {shard}'s log was purged behind B's snapshots"
        );
    }

    // A wakes and finds its leases gone; then B is paused past its lease, so A takes the
    // shards again, from B's newer snapshots, and applies what comes meanwhile.
    a.signal("CONT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.signal("STOP");
    wait_holding(&a.http).await;
    round(&client, &users, n, &mut due).await;
    client.wait_drained().await;
    b.signal("CONT");

    // Round 0 was never asked for: every alarm since the start is due, oldest first, once.
    ask_everyone_and_check(&client, &mut reader, &due).await;
}

/// A consumer that delivers nothing while the shard log holds work (here replaced by hand,
/// as a wedged or foreign consumer would be): the shard is reported stalled, in `/readyz`
/// and in its phase, its holder creates the consumer again, and the request is answered.
#[tokio::test]
async fn a_shard_whose_consumer_delivers_nothing_is_stalled_and_recovers_by_itself() {
    let TestBed {
        nats,
        data,
        config,
        client,
    } = TestBed::start().await;
    let mut reader = client.digests().await;
    // A long lease: the instance is paused for a moment below.
    let env = [("ALARM_DIGEST_SHARDS__LEASE_SECS", "30")];
    let service = ServiceProcess::spawn(&nats, data.path(), &env);
    let http = service.http.clone();
    wait_ready(&http).await;
    let user = users_on_every_shard(4, 1)[0].clone();
    let topology = Topology::new(config.streams.clone(), 4);
    let shard = topology.shard_of(&user);
    let stream = client
        .js
        .get_stream(topology.shard_stream(shard))
        .await
        .expect("shard stream");
    // Swapped while no pull of the worker is waiting on it (paused past the pull's expiry),
    // so nothing tells the worker: its pulls now go to a consumer that starts after what
    // the shard log holds, so it never delivers the status change and the request, which
    // are routed (as the router does) meanwhile.
    service.signal("STOP");
    tokio::time::sleep(config.tuning.fetch_expires() + Duration::from_millis(500)).await;
    let durable = config.streams.worker_consumer.clone();
    stream.delete_consumer(&durable).await.expect("deleted");
    client
        .publish(
            topology
                .shard_subject(InputKind::StatusChange, shard)
                .as_str(),
            status_payload(&user, "a", "CRITICAL", "2026-01-01T00:00:01Z"),
        )
        .await;
    client
        .publish(
            topology
                .shard_subject(InputKind::DigestRequest, shard)
                .as_str(),
            format!(r#"{{"UserID":"{user}"}}"#),
        )
        .await;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .expect("a consumer that delivers nothing");
    service.signal("CONT");

    let stalled = wait_shard_blocked_by(&http, &format!("shard {shard} (stalled")).await;
    assert!(
        stalled.contains("the shard log holds up to sequence"),
        "{stalled}"
    );
    let (_, metrics) = http_get(&http, "/metrics").await.expect("metrics");
    let phase =
        |name: &str| format!("alarm_digest_shard_phase{{shard=\"{shard}\",phase=\"{name}\"}} 1");
    assert!(
        metrics.contains(&phase("stalled")) || !metrics.contains(&phase("consuming")),
        "the phase agrees with /readyz:\n{metrics}"
    );

    let digest = reader.next_for(&user).await;
    assert_eq!(
        entries(&digest),
        vec![(
            "a".to_string(),
            "CRITICAL".to_string(),
            "2026-01-01T00:00:01Z".to_string()
        )]
    );
    assert!(metric(&http, "alarm_digest_shard_stalls_total").await >= 1);
    wait_ready(&http).await;
    let (_, metrics) = http_get(&http, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains(&phase("consuming")),
        "consuming again:\n{metrics}"
    );
}

/// The broker refuses a former owner's manifest once a new owner fenced the shard, and a
/// shard without snapshots reads as one without, fence or not.
#[tokio::test]
async fn a_former_owners_snapshot_manifest_is_refused_by_the_broker() {
    let TestBed {
        nats: _nats,
        data: _data,
        config,
        client,
    } = TestBed::start().await;
    let streams = &config.streams;
    let snapshots = || {
        Snapshots::new(
            client.js.clone(),
            streams.snapshot_stream.clone(),
            streams.snapshot_subject.clone(),
        )
    };
    let (a, b) = (snapshots(), snapshots());
    let manifest = |covers: u64| Manifest {
        covers,
        taken_at_ms: 1,
        ..Manifest::marker(1, 4)
    };
    let chunk = |bytes: &'static [u8]| {
        futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes.to_vec())])
    };

    // A owns shard 1: a marker first (no snapshot yet), then its snapshot.
    let fence_a = a.fence(1, 4).await.expect("A fences");
    assert!(
        a.chain(1, 5).await.expect("chain").is_empty(),
        "a marker is no snapshot"
    );
    let stored_a = a
        .put(manifest(10), chunk(b"state at 10"), fence_a)
        .await
        .expect("A's snapshot");

    // B takes over; A, paused through it, wakes and stores another snapshot.
    let fence_b = b.fence(1, 4).await.expect("B fences");
    let refused = a
        .put(manifest(12), chunk(b"state at 12"), stored_a.sequence)
        .await
        .expect_err("A is fenced");
    assert!(refused.is_fenced(), "{refused}");
    let chain = b.chain(1, 5).await.expect("chain");
    assert_eq!(
        chain[0].manifest.covers, 10,
        "B's copy of A's snapshot is newest"
    );
    assert_eq!(chain[0].sequence, fence_b);

    // B's own snapshot is accepted and points back to the fenced copy.
    let stored_b = b
        .put(manifest(20), chunk(b"state at 20"), fence_b)
        .await
        .expect("B's snapshot");
    let chain = b.chain(1, 5).await.expect("chain");
    assert_eq!(chain[0], stored_b);
    assert_eq!(
        chain.iter().map(|s| s.manifest.covers).collect::<Vec<_>>(),
        vec![20]
    );
}

/// Waits until `name` (a counter or gauge without labels) reaches at least `at_least`.
async fn wait_metric(http: &str, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(http, name).await;
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {value} on {http}, below {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// kill -9 of the process applying every shard, beside a warm standby: the standby's copies
/// are current when it takes over, every shard is served again, nothing is lost and nothing
/// reaches a plain subscriber twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_standby_takes_every_shard_of_a_killed_holder_with_nothing_lost_or_resent() {
    let nats = NatsServer::start();
    let (a_dir, b_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let a = ServiceProcess::spawn(&nats, a_dir.path(), &[]);
    wait_holding(&a.http).await;
    let b = ServiceProcess::spawn(&nats, b_dir.path(), &[]);
    // Each of B's shards finds the lease held on its own time: wait for all four.
    let deadline = Instant::now() + WAIT;
    loop {
        let standby = wait_standby(&b.http, "message(s) behind").await;
        let following = (0..4)
            .filter(|shard| standby.contains(&format!("shard {shard} (lease held by")))
            .count();
        if following == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "{standby}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = TestClient::connect(&test_config(&nats, b_dir.path())).await;
    let subscriber = PlainSubscriber::start(&client).await;
    let traffic = Traffic::start(&client, 17, 80);

    // The standby follows the traffic into its own copy, answering nothing.
    wait_metric(&b.http, "alarm_digest_standby_applied_total", 20).await;
    assert_eq!(
        metric(&b.http, "alarm_digest_events_applied_total").await,
        0
    );
    assert_eq!(metric(&b.http, "alarm_digest_shards_standby").await, 4);
    a.kill_9();
    wait_holding(&b.http).await;
    assert_eq!(metric(&b.http, "alarm_digest_shards_standby").await, 0);
    assert_eq!(metric(&b.http, "alarm_digest_shards_consuming").await, 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (state, requests) = traffic.finish().await;
    assert_answered_once(&client, &subscriber, &state, requests, PlainSaw::All).await;
    assert!(state.len() > 100, "traffic touched {} alarms", state.len());
}

/// A holder frozen in the middle of a snapshot (a VM pause) past its lease: the standby takes
/// over; when the frozen process wakes, the broker refuses the manifest it was writing
/// (counted), it applies and answers nothing more, and no alarm reaches a subscriber twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_frozen_mid_snapshot_wakes_fenced_and_sends_nothing_twice() {
    let nats = NatsServer::start();
    let (a_dir, b_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let snapshots = ("ALARM_DIGEST_SNAPSHOTS__EVERY_SECS", "2");
    let a = ServiceProcess::spawn(
        &nats,
        a_dir.path(),
        &[snapshots, ("FAILPOINT_ALARM_DIGEST", "pause:snapshot")],
    );
    wait_holding(&a.http).await;
    let b = ServiceProcess::spawn(&nats, b_dir.path(), &[snapshots]);
    wait_standby(&b.http, "message(s) behind").await;
    let client = TestClient::connect(&test_config(&nats, b_dir.path())).await;
    let subscriber = PlainSubscriber::start(&client).await;
    let traffic = Traffic::start(&client, 23, 60);

    // A stops itself at its first snapshot; B takes every shard once A's leases expire.
    let deadline = Instant::now() + WAIT;
    while !a.is_stopped() {
        assert!(Instant::now() < deadline, "A never reached its snapshot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_holding(&b.http).await;
    let answer = tokio::time::timeout(Duration::from_secs(1), http_get(&a.http, "/readyz")).await;
    assert!(
        !matches!(answer, Ok(Ok(_))),
        "A is frozen: it answers nothing"
    );
    a.signal("CONT");
    let fenced = wait_metric(&a.http, "alarm_digest_fenced_writes_total", 1).await;
    let woken_applied = metric(&a.http, "alarm_digest_events_applied_total").await;
    wait_standby(&a.http, "lease held by").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (state, requests) = traffic.finish().await;
    assert_answered_once(&client, &subscriber, &state, requests, PlainSaw::All).await;
    assert_eq!(
        metric(&a.http, "alarm_digest_events_applied_total").await,
        woken_applied,
        "the woken process applied nothing more"
    );
    assert_eq!(
        fenced,
        metric(&a.http, "alarm_digest_fenced_writes_total").await
    );
}

/// A standby's reader failing (here deleted under it, as an inactive threshold or a broker
/// restart would) costs the standby a new reader, never the holder its consumer.
#[tokio::test]
async fn a_standby_whose_reader_fails_never_touches_the_holders_consumer() {
    let nats = NatsServer::start();
    let (a_dir, b_dir) = (tempdir().unwrap(), tempdir().unwrap());
    let a = ServiceProcess::spawn(&nats, a_dir.path(), &[]);
    wait_holding(&a.http).await;
    let b = ServiceProcess::spawn(&nats, b_dir.path(), &[]);
    wait_standby(&b.http, "message(s) behind").await;
    let client = TestClient::connect(&test_config(&nats, b_dir.path())).await;
    let topology = Topology::new(client.config.streams.clone(), 4);
    let durable = client.config.streams.worker_consumer.clone();
    // When each shard's durable consumer (the holder's) was created.
    let created_at = |shard: u16| {
        let (client, topology, durable) = (&client, &topology, &durable);
        async move {
            let stream = client
                .js
                .get_stream(topology.shard_stream(shard))
                .await
                .expect("shard stream");
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer(durable)
                .await
                .expect("holder's consumer");
            consumer.info().await.expect("info").created
        }
    };
    let mut created = BTreeMap::new();
    for shard in 0..4 {
        created.insert(shard, created_at(shard).await);
    }

    let users = users_on_every_shard(4, 2);
    let mut due = BTreeMap::new();
    let mut reader = client.digests().await;
    for n in 0..3 {
        round(&client, &users, n, &mut due).await;
        // Every reader that is not the holder's durable consumer goes.
        for shard in 0..4 {
            let stream = client
                .js
                .get_stream(topology.shard_stream(shard))
                .await
                .expect("shard stream");
            let names: Vec<String> = stream
                .consumer_names()
                .filter_map(|name| async move { name.ok() })
                .collect()
                .await;
            for name in names.into_iter().filter(|name| *name != durable) {
                let _ = stream.delete_consumer(&name).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    client.wait_drained().await;
    let followed = wait_metric(&b.http, "alarm_digest_standby_applied_total", 1).await;
    ask_everyone_and_check(&client, &mut reader, &due).await;
    assert!(followed > 0);
    for shard in 0..4 {
        assert_eq!(
            created_at(shard).await,
            created[&shard],
            "shard {shard}: the holder's consumer was never deleted and created again"
        );
    }
    assert_eq!(metric(&a.http, "alarm_digest_shard_stalls_total").await, 0);
    let _ = b;
}

/// During a rolling upgrade a shard may be held by the previous release, whose lease says
/// nothing about what it published: the new instance does not follow it (its copy could not
/// tell published digest parts from unpublished ones), waits as that release did, and takes
/// the shard once the old holder's lease expires.
#[tokio::test]
async fn a_holder_of_the_previous_release_is_waited_for_not_followed() {
    let TestBed {
        nats,
        data: _data,
        config: _,
        client,
    } = TestBed::start().await;
    let (code, _, err) = cli_against(&nats, &["setup"]);
    assert_eq!(code, Some(0), "{err}");
    let leases = client
        .js
        .get_key_value(&client.config.streams.leases_bucket)
        .await
        .expect("leases bucket");
    // Exactly what the previous release writes: the record, nothing else.
    let old =
        br#"{"holder":{"instance":"old","host":"old-host","data_dir":"/old"},"process":"0ld"}"#;
    let dir = tempdir().unwrap();
    let user = (0..)
        .map(|i| format!("u{i}"))
        .find(|u| Topology::new(Default::default(), 4).shard_of(u) == 0)
        .unwrap();
    let renewing = tokio::spawn({
        let leases = leases.clone();
        async move {
            for _ in 0..8 {
                leases
                    .put("shard.0", old.to_vec().into())
                    .await
                    .expect("put");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = ServiceProcess::spawn(&nats, dir.path(), &[("ALARM_DIGEST_SHARDS__OWNED", "0")]);
    let waiting = wait_shard_blocked_by(&b.http, "lease held by process 0ld").await;
    assert!(!waiting.contains("standby for:"), "{waiting}");
    client
        .status(&user, "a", "CRITICAL", "2026-01-01T00:00:01Z")
        .await;
    renewing.await.expect("old holder");
    assert_eq!(
        metric(&b.http, "alarm_digest_standby_applied_total").await,
        0,
        "nothing followed"
    );
    // The old holder stops renewing: its lease expires and the new instance takes the shard.
    wait_holding(&b.http).await;
    let mut reader = client.digests().await;
    client.request_digest(&user).await;
    let digest = reader.next_for(&user).await;
    assert_eq!(digest.active_alarms.len(), 1);
}

/// A standby ends a lease whose revision it saw unchanged for a whole period; the broker
/// refuses that delete once the holder renewed, so a live holder is never cut off by it.
#[tokio::test]
async fn ending_an_unrenewed_lease_is_refused_once_its_holder_renewed() {
    use alarm_digest::bus::ownership::Acquired;
    use alarm_digest::bus::{Cluster, Member};
    let TestBed {
        nats: _nats,
        data,
        config,
        client,
    } = TestBed::start().await;
    let member = |name: &str| Member::here(name.into(), &config);
    let holder = Cluster::open(&client.js, &config, member("holder"))
        .await
        .expect("holder joins");
    let standby = Cluster::open(&client.js, &config, member("standby"))
        .await
        .expect("standby joins");
    let Ok(Acquired::Held(lease)) = holder.acquire(1).await else {
        panic!("the holder takes shard 1");
    };
    let Ok(Acquired::HeldBy(seen)) = standby.acquire(1).await else {
        panic!("the standby sees a holder");
    };
    // The holder renews (every third of the period): the revision the standby saw is stale.
    tokio::time::sleep(holder.renew_every() + Duration::from_millis(300)).await;
    assert!(lease.is_fresh());
    assert!(
        !standby.end_expired(1, seen.revision).await,
        "the broker refuses to end a renewed lease"
    );
    let current = standby.holder(1).await.expect("read").expect("held");
    assert_ne!(current.revision, seen.revision);
    assert_eq!(current.record.holder.instance, "holder");
    // The holder is gone (no renewal runs once the lease is dropped without release): the
    // revision the standby sees now is ended, and the standby takes the shard.
    drop(lease);
    let last = standby.holder(1).await.expect("read").expect("held");
    assert!(standby.end_expired(1, last.revision).await);
    assert!(matches!(standby.acquire(1).await, Ok(Acquired::Held(_))));
    drop(data);
}
