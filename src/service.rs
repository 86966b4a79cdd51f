//! Starting and stopping one instance: the library entry point the binary and the tests share.
//!
//! Order: open the store and check it, bind HTTP (so `/livez` answers while NATS is still
//! away), connect (retrying), agree on the shard and partition counts, create or check the
//! streams, then start the router and one shard worker per owned shard. One root cancellation token stops them all.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::bus::{self, Cluster, Member, Topology};
use crate::config::Config;
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::retry::until_ok;
use crate::router::Router;
use crate::shard_worker::ShardWorker;
use crate::shared::Shared;
use crate::store::{GroupFlusher, Store};

/// A started instance.
pub struct RunningService {
    pub http_addr: SocketAddr,
    /// Where `/inspect` answers: `http_addr` itself when that is loopback.
    pub inspect_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    supervisor: JoinHandle<anyhow::Result<()>>,
}

impl RunningService {
    /// The root token: cancelling it starts the graceful drain.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the instance stopped (after shutdown, or on a fatal error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.supervisor.await.context("supervisor task panicked")?
    }

    /// Requests shutdown and waits for the drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Opens the store and binds HTTP before returning, so a bad data dir or a taken port fails
/// here; everything that waits on the network runs in the background.
pub async fn start(config: Config) -> anyhow::Result<RunningService> {
    let config = Arc::new(config);
    let store = Store::open(&config.storage.path, config.storage.cache_capacity_mb)?;
    store.check_shard_count(config.shards.count)?;
    let member = Member::here(store.instance_id()?, &config);
    let listener = TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("binding http.listen {}", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    // User data stays on loopback: a second listener for /inspect when the main one is open.
    let inspect_listener = if config.http.inspect_on_main_listener() {
        None
    } else {
        let bound = TcpListener::bind(&config.http.inspect_listen)
            .await
            .with_context(|| {
                format!("binding http.inspect_listen {}", config.http.inspect_listen)
            })?;
        Some(bound)
    };
    let inspect_addr = match &inspect_listener {
        Some(bound) => bound.local_addr()?,
        None => http_addr,
    };

    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let readiness = Readiness::default();
    readiness.set("store", true);
    readiness.set("streams", false);
    let topology = Arc::new(Topology::new(config.streams.clone(), config.shards.count));
    let nats = Arc::new(OnceLock::new());
    let http_state = HttpState {
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        store: store.clone(),
        topology: topology.clone(),
        nats: nats.clone(),
    };
    let http_task = {
        let (state, cancel) = (http_state.clone(), shutdown.clone());
        let with_inspect = inspect_listener.is_none();
        tokio::spawn(async move {
            let main = http::serve(listener, state.clone(), with_inspect, cancel.clone());
            match inspect_listener {
                Some(inspect) => {
                    tokio::join!(main, http::serve_inspect(inspect, state, cancel));
                }
                None => main.await,
            }
        })
    };
    tracing::info!(
        %http_addr,
        data_dir = %config.storage.path.display(),
        instance = %member.instance,
        shards = ?config.shards.owned_shards(),
        "alarm-digest starting"
    );

    let parts = Parts {
        config,
        member,
        store,
        topology,
        metrics: metrics.clone(),
        readiness,
        nats,
    };
    let supervisor = tokio::spawn(supervise(parts, shutdown.clone(), http_task));
    Ok(RunningService {
        http_addr,
        inspect_addr,
        metrics,
        shutdown,
        supervisor,
    })
}

struct Parts {
    config: Arc<Config>,
    member: Member,
    store: Store,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    nats: Arc<OnceLock<async_nats::Client>>,
}

/// How long the last flush of a stopping instance may take.
const FINAL_FLUSH_WITHIN: Duration = Duration::from_secs(5);

async fn supervise(
    parts: Parts,
    shutdown: CancellationToken,
    http_task: JoinHandle<()>,
) -> anyhow::Result<()> {
    let result = run_parts(&parts, &shutdown).await;
    shutdown.cancel();
    let store = parts.store.clone();
    // Bounded: on a failed disk sled's flush may never return (the `run` watchdog bounds
    // the whole stop as well).
    let flushed = tokio::time::timeout(
        FINAL_FLUSH_WITHIN,
        tokio::task::spawn_blocking(move || store.flush()),
    )
    .await;
    match flushed {
        Ok(Ok(Ok(_))) => tracing::info!("data dir flushed"),
        Ok(Ok(Err(error))) => tracing::error!(%error, "final flush failed"),
        Ok(Err(error)) => tracing::error!(%error, "final flush task failed"),
        Err(_) => tracing::error!(
            "final flush did not finish within {}s",
            FINAL_FLUSH_WITHIN.as_secs()
        ),
    }
    let _ = http_task.await;
    tracing::info!(ok = result.is_ok(), "alarm-digest stopped");
    result
}

async fn run_parts(parts: &Parts, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let config = &parts.config;
    let Some(client) = bus::connect(&config.nats, shutdown).await? else {
        return Ok(());
    };
    let _ = parts.nats.set(client.clone());
    bus::warn_if_single_replica_in_a_cluster(&client.server_info(), config.streams.replicas);
    // Every holder of PubAck futures is bounded: each shard worker by one publish window at
    // a time, each partition loop of the router (on its own connection, a context each) by
    // its queued batches. Each context's in-flight limit is the sum of its holders' bounds,
    // so no holder ever waits for a permit that another waiting holder owns.
    let owned = config.shards.owned_shards();
    let js = bus::jetstream(client.clone(), owned.len() * bus::PUBLISH_WINDOW + 64);
    let Some(router_client) = bus::connect(&config.nats, shutdown).await? else {
        return Ok(());
    };
    // Ownership records go through a context without publish backpressure: a lease
    // renewal must never queue behind digests. Joining first agrees on the shard and
    // partition counts, so an instance with another count creates no stream for it.
    let kv_js = async_nats::jetstream::new(client.clone());
    let Some(cluster) = Cluster::join(&kv_js, config, parts.member.clone(), shutdown).await? else {
        return Ok(());
    };
    let ensured = until_ok("creating the streams", shutdown, || {
        parts.topology.ensure_streams(&js)
    })
    .await?;
    if ensured.is_none() {
        return Ok(());
    }
    parts.readiness.set("streams", true);
    // For systemd (Type=notify): started means connected, streams checked and the shard
    // count agreed with the cluster. Per-shard readiness is /readyz's business.
    crate::notify::notify(crate::notify::NotifyState::Ready);

    let shared = Shared {
        config: config.clone(),
        topology: parts.topology.clone(),
        js,
        metrics: parts.metrics.clone(),
        readiness: parts.readiness.clone(),
    };
    let (flusher, flusher_task) = GroupFlusher::spawn(parts.store.clone());
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let nodes = bus::Nodes::connect(&config.nats, &router_client.server_info()).await;
    let router = Router::new(shared.clone(), router_client, cluster.clone(), nodes);
    let routed = run_on_own_thread("alarm-digest-router", router.run(shutdown.clone()))?;
    tasks.spawn(async move {
        match routed.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(anyhow!("the router thread stopped without a result")),
        }
    });
    parts
        .metrics
        .shards_owned
        .set(i64::try_from(owned.len()).unwrap_or(i64::MAX));
    spawn_watchers(&mut tasks, &shared, owned.clone(), shutdown);
    for shard in owned {
        let store = parts.store.shard(shard)?;
        let worker = ShardWorker::new(shared.clone(), cluster.clone(), store, flusher.clone());
        tasks.spawn(worker.run(shutdown.clone()));
    }

    let mut failure = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(joined) = tasks.join_next() => {
            failure = task_failure(joined);
            shutdown.cancel();
        }
    }
    crate::notify::notify(crate::notify::NotifyState::Stopping);
    tracing::info!("stopping: finishing in-flight batches");
    let grace = Duration::from_secs(config.shutdown.grace_secs);
    if let Some(error) = drain(&mut tasks, grace).await {
        failure.get_or_insert(error);
    }
    // The flusher holds the data dir open until its last handle is gone: wait for it, so a
    // stopped instance has let go of the directory when `stop` returns.
    drop(flusher);
    if tokio::time::timeout(Duration::from_secs(5), flusher_task)
        .await
        .is_err()
    {
        tracing::warn!("the flusher did not stop within 5 s");
    }
    // Acks are buffered in the client: push them to the server before exiting.
    match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "acks may not have reached the server"),
        Err(_) => tracing::warn!("acks may not have reached the server in 2 s"),
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// The instance's watchers beside the workers: consumer stats, the balancer, the clock.
fn spawn_watchers(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    shared: &Shared,
    owned: Vec<u16>,
    shutdown: &CancellationToken,
) {
    let stats = crate::consumer_stats::run(
        shared.clone(),
        owned,
        shared.config.tuning.consumer_stats_every(),
        shutdown.clone(),
    );
    tasks.spawn(async move {
        stats.await;
        Ok(())
    });
    let balancer = crate::balancer::run(shared.clone(), shutdown.clone());
    tasks.spawn(async move {
        balancer.await;
        Ok(())
    });
    let clock = crate::clock_watch::run(shared.clone(), shutdown.clone());
    tasks.spawn(async move {
        clock.await;
        Ok(())
    });
}

/// Waits up to `grace` for every task to finish, then aborts the rest; the first failure.
async fn drain(tasks: &mut JoinSet<anyhow::Result<()>>, grace: Duration) -> Option<anyhow::Error> {
    let mut failure = None;
    let drained = async {
        while let Some(joined) = tasks.join_next().await {
            if let Some(error) = task_failure(joined) {
                failure.get_or_insert(error);
            }
        }
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tasks.abort_all();
        failure.get_or_insert(anyhow!(
            "in-flight work did not finish within shutdown.grace_secs = {}",
            grace.as_secs()
        ));
    }
    failure
}

/// Runs `work` on a thread of its own with a single-threaded runtime, and hands back its
/// result. The router is the one sequential stage every event passes; on the shared runtime it
/// waits behind shard workers' sled writes (synchronous inside their tasks), which measured
/// ~25% of ingest.
fn run_on_own_thread<F>(
    name: &str,
    work: F,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the router's runtime")?;
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = done.send(runtime.block_on(work));
        })
        .context("starting the router's thread")?;
    Ok(result)
}

fn task_failure(
    joined: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> Option<anyhow::Error> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(error)) => {
            tracing::error!(error = %crate::errors::describe(&error), "a part stopped with a fatal error");
            Some(error)
        }
        Err(error) => {
            tracing::error!(%error, "a part panicked");
            Some(anyhow!("a part panicked: {error}"))
        }
    }
}
