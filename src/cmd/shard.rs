//! `alarm-digest shard export|import|status`: moving a shard's state between data dirs, and
//! seeing where each shard lives. Export and import run with the instance stopped (sled
//! locks the data dir, so they refuse to run beside it).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;

use crate::bus::ownership::MoveError;
use crate::bus::Topology;
use crate::bus::{self, Cluster, Member};
use crate::config::Config;
use crate::retry::until_ok;
use crate::store::{ShardExport, Store, RESHARD_SOURCE};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ShardAction {
    /// Write one shard's state from this data dir to a self-describing file.
    Export {
        #[arg(long)]
        shard: u16,
        /// Where to write (default: shard-<N>.export in the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Load an exported shard into this data dir and make this instance its home.
    Import {
        /// The file `shard export` wrote.
        #[arg(long)]
        file: PathBuf,
    },
    /// Print the cluster's shard count and each shard's home and lease holder (JSON lines).
    Status,
    /// Re-split the exports of every shard into exports for another shard count (offline).
    Reshard {
        /// The new shard count.
        #[arg(long)]
        count: u16,
        /// Directory for the new files (shard-<N>.export).
        #[arg(long)]
        out: PathBuf,
        /// One export per shard of the current count.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Switch the cluster to another shard count: requeue the shard streams' backlog into
    /// the input stream, forget every home, record the count. Every instance must be stopped.
    Recount {
        /// The new shard count (shards.count in the config is the current one).
        #[arg(long)]
        count: u16,
    },
}

pub async fn run(config: Config, action: &ShardAction) -> anyhow::Result<ExitCode> {
    match action {
        ShardAction::Export { shard, out } => export(&config, *shard, out.clone()),
        ShardAction::Import { file } => import(&config, file).await,
        ShardAction::Status => status(&config).await,
        ShardAction::Reshard { count, out, files } => reshard(&config, *count, out, files),
        ShardAction::Recount { count } => recount(&config, *count).await,
    }
}

fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::open(&config.storage.path, config.storage.cache_capacity_mb)
        .context("export and import need the instance stopped")?;
    store.check_shard_count(config.shards.count)?;
    Ok(store)
}

fn export(config: &Config, shard: u16, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    if shard >= config.shards.count {
        bail!(
            "shard {shard} does not exist: shards.count is {}",
            config.shards.count
        );
    }
    let store = open_store(config)?;
    let export = store.export_shard(shard, config.shards.count)?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("shard-{shard}.export")));
    let bytes = export.encode();
    // Write beside the target and rename, so a crash never leaves a half file under the name.
    let partial = out.with_extension("partial");
    std::fs::write(&partial, &bytes)
        .and_then(|()| std::fs::rename(&partial, &out))
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "exported shard {shard} ({} entries, {} bytes) from instance {} to {}",
        export.entries.len(),
        bytes.len(),
        export.source_instance,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn import(config: &Config, file: &PathBuf) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let export =
        ShardExport::decode(&bytes).with_context(|| format!("reading {}", file.display()))?;
    let shard = export.shard;
    if export.count != config.shards.count {
        bail!(
            "{} holds shard {shard} of a cluster with {} shards, but shards.count here is {}",
            file.display(),
            export.count,
            config.shards.count
        );
    }
    let store = open_store(config)?;
    let me = Member::here(store.instance_id()?, config);
    let (_, cluster) = connect_cluster(config, me.clone()).await?;
    // The move is safe only while nobody applies the shard: the exporting instance must be
    // stopped, or its later batches would be missing from this copy.
    if let Some(lease) = cluster.read_lease(shard).await? {
        bail!(
            "shard {shard} is being applied right now by {} (process {}); stop that instance \
             first (a killed instance's lease expires within {}s)",
            lease.holder,
            lease.process,
            cluster.lease_period().as_secs()
        );
    }
    match cluster.read_home(shard).await? {
        Some(_) if export.source_instance == RESHARD_SOURCE => bail!(
            "shard {shard} still has a home from before the re-shard: run `alarm-digest shard \
             recount --count {}` (with every instance stopped) before importing",
            export.count
        ),
        Some(home) if home.instance != export.source_instance => {
            return Err(MoveError::HomeMoved(home).into());
        }
        _ => {}
    }
    store.import_shard(&export)?;
    match cluster.move_home(shard, &export.source_instance).await {
        Ok(()) => {}
        Err(MoveError::HomeMoved(home)) => {
            bail!(
                "the data was written here but shard {shard}'s home moved to {home} meanwhile, \
                 so this copy stays unused; export again from there"
            )
        }
        Err(MoveError::Bus(error)) => return Err(error.into()),
    }
    println!(
        "imported shard {shard} ({} entries) from instance {}; its home is now {me}",
        export.entries.len(),
        export.source_instance
    );
    Ok(ExitCode::SUCCESS)
}

fn reshard(
    config: &Config,
    count: u16,
    out: &std::path::Path,
    files: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let exports = files
        .iter()
        .map(|file| {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            ShardExport::decode(&bytes).with_context(|| format!("reading {}", file.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let topology = Topology::new(config.streams.clone(), count);
    let resharded = crate::store::reshard(&exports, count, |user| topology.shard_of(user))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for export in &resharded {
        let file = out.join(format!("shard-{}.export", export.shard));
        std::fs::write(&file, export.encode())
            .with_context(|| format!("writing {}", file.display()))?;
    }
    let alarms: usize = resharded.iter().map(|e| e.entries.len()).sum();
    println!(
        "re-sharded {} shards into {count} ({alarms} alarms) in {}",
        exports.len(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn recount(config: &Config, count: u16) -> anyhow::Result<ExitCode> {
    let from = config.shards.count;
    if count == 0 || count > 4096 {
        bail!("--count must be between 1 and 4096");
    }
    let observer = Member::here("recount".into(), config);
    let (client, cluster) = connect_cluster(config, observer).await?;
    for shard in 0..from {
        if let Some(lease) = cluster.read_lease(shard).await? {
            bail!(
                "shard {shard} is being applied by {}; stop every instance first (a killed \
                 instance's lease expires within {}s)",
                lease.holder,
                cluster.lease_period().as_secs()
            );
        }
    }
    // Messages already routed by the old count go back through the routers, which will
    // route them by the new one. Events are order-independent; a request answered later
    // only sees more.
    let js = async_nats::jetstream::new(client.clone());
    let old = Topology::new(config.streams.clone(), from);
    let mut requeued = 0u64;
    for shard in 0..from {
        let Ok(mut stream) = js.get_stream(old.shard_stream(shard)).await else {
            continue;
        };
        let state = stream.info().await?.state.clone();
        if state.messages == 0 {
            continue;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(message) = stream.get_raw_message(seq).await else {
                continue; // already deleted: a gap
            };
            let Some(kind) = old.shard_kind(shard, &message.subject) else {
                bail!(
                    "shard stream {} holds a message on {}, which is not a shard subject",
                    old.shard_stream(shard),
                    message.subject
                );
            };
            let subject = old.input_subject(kind).to_string();
            js.publish(subject.clone(), message.payload.clone())
                .await?
                .await
                .with_context(|| {
                    format!("requeueing {} #{seq} to {subject}", old.shard_stream(shard))
                })?;
            stream.delete_message(seq).await?;
            requeued += 1;
        }
    }
    cluster.recount(from, count).await?;
    client.flush().await?;
    println!(
        "shards.count is now {count} (was {from}); {requeued} routed message(s) requeued; every \
         home forgotten: set shards.count = {count} everywhere, import the re-sharded exports \
         into fresh data dirs, start"
    );
    Ok(ExitCode::SUCCESS)
}

async fn status(config: &Config) -> anyhow::Result<ExitCode> {
    // Read-only: a member that claims nothing. Its id marks it as not an instance.
    let observer = Member::here("status-reader".into(), config);
    let (_, cluster) = connect_cluster(config, observer).await?;
    let count = cluster.recorded_count().await?;
    println!(
        "{}",
        serde_json::json!({ "shards_count": count, "lease_secs": cluster.lease_period().as_secs() })
    );
    for shard in 0..count.unwrap_or(config.shards.count) {
        let home = cluster.read_home(shard).await?;
        let lease = cluster.read_lease(shard).await?;
        println!(
            "{}",
            serde_json::json!({ "shard": shard, "home": home, "lease": lease })
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect_cluster(
    config: &Config,
    me: Member,
) -> anyhow::Result<(async_nats::Client, Cluster)> {
    let cancel = CancellationToken::new();
    let client = bus::connect(&config.nats, &cancel)
        .await?
        .context("not connected")?;
    let js = async_nats::jetstream::new(client.clone());
    let cluster = until_ok("opening the ownership buckets", &cancel, || {
        Cluster::open(&js, config, me.clone())
    })
    .await?
    .context("not connected")?;
    Ok((client, cluster))
}
