//! `alarm-digest shard export|import|status`: moving a shard's state between data dirs, and
//! seeing where each shard lives. Export and import run with the instance stopped (sled
//! locks the data dir, so they refuse to run beside it).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;

use crate::bus::{self, Cluster, Member, Snapshots, Topology};
use crate::config::Config;
use crate::retry::until_ok;
use crate::store::{ShardExport, Store};

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
    /// Load an exported shard into this data dir (used when it is newer than the shard's
    /// newest snapshot).
    Import {
        /// The file `shard export` wrote.
        #[arg(long)]
        file: PathBuf,
    },
    /// Print the cluster's shard count and, per shard, its lease holder, newest snapshot and
    /// shard stream (JSON lines).
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
    /// Switch the cluster to another shard count: requeue what the shard streams hold beyond
    /// the newest snapshots into the input stream, delete the shard streams and snapshots,
    /// record the count. Every instance must be stopped.
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
    let (client, cluster) = connect_cluster(config, me.clone()).await?;
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
    store.import_shard(&export)?;
    let imported = store.shard(shard)?.applied();
    let snapshots = snapshots_of(&client, config);
    let newest = snapshots.chain(shard, 1).await?.pop();
    println!(
        "imported shard {shard} ({} entries, shard stream sequence {imported}) from instance {}",
        export.entries.len(),
        export.source_instance
    );
    if let Some(newest) = newest.filter(|n| n.manifest.covers > imported) {
        println!(
            "note: the shard's newest snapshot in JetStream covers sequence {}, newer than this \
             file: the instance that takes the shard restores from the snapshot instead",
            newest.manifest.covers
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn snapshots_of(client: &async_nats::Client, config: &Config) -> Snapshots {
    Snapshots::new(
        async_nats::jetstream::new(client.clone()),
        config.streams.snapshot_stream.clone(),
        config.streams.snapshot_subject.clone(),
    )
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
    // Messages routed by the old count that no snapshot holds go back through the routers,
    // which route them by the new one. Events are order-independent; a request answered
    // later only sees more.
    let js = async_nats::jetstream::new(client.clone());
    let old = Topology::new(config.streams.clone(), from);
    let snapshots = snapshots_of(&client, config);
    let mut requeued = 0u64;
    for shard in 0..from {
        let covered = match snapshots.chain(shard, 1).await?.pop() {
            Some(newest) => newest.manifest.covers,
            None => 0,
        };
        for (name, after) in [
            (old.legacy_shard_stream(shard), 0),
            (old.shard_stream(shard), covered),
        ] {
            requeued += requeue(&js, &old, shard, &name, after).await?;
            if let Err(error) = js.delete_stream(&name).await {
                if !error.to_string().contains("not found") {
                    bail!("deleting {name}: {error}");
                }
            }
        }
    }
    // Snapshots of the old shards describe shards that no longer exist.
    if let Err(error) = js.delete_stream(&config.streams.snapshot_stream).await {
        if !error.to_string().contains("not found") {
            bail!("deleting {}: {error}", config.streams.snapshot_stream);
        }
    }
    cluster.recount(from, count).await?;
    client.flush().await?;
    println!(
        "shards.count is now {count} (was {from}); {requeued} routed message(s) requeued; shard \
         streams and snapshots of the old count deleted: set shards.count = {count} everywhere, \
         import the re-sharded exports into fresh data dirs, start"
    );
    Ok(ExitCode::SUCCESS)
}

/// Publishes every message of a shard stream after `after` back to its input subject.
async fn requeue(
    js: &async_nats::jetstream::Context,
    old: &Topology,
    shard: u16,
    name: &str,
    after: u64,
) -> anyhow::Result<u64> {
    let Some(mut stream) = crate::bus::lookup_stream(js, name).await? else {
        return Ok(0);
    };
    let state = stream.info().await?.state.clone();
    if state.messages == 0 {
        return Ok(0);
    }
    let mut requeued = 0;
    for seq in state.first_sequence.max(after + 1)..=state.last_sequence {
        // A failed read stops the command before anything is deleted.
        let Some(message) = crate::bus::message_at(&stream, seq).await? else {
            continue; // already deleted: a gap
        };
        // An envelope is on the status shard subject; its entries name their input subject.
        let subject = match old.shard_kind(shard, &message.subject) {
            Some(kind) => old.input_subject(kind).to_string(),
            None => bail!(
                "shard stream {name} holds a message on {}, which is not a shard subject",
                message.subject
            ),
        };
        let payloads = match crate::bus::envelope::decode(&message.payload) {
            Ok(entries)
                if message
                    .headers
                    .get(crate::bus::envelope::FRAME_HEADER)
                    .is_some() =>
            {
                entries
                    .into_iter()
                    .map(|entry| (entry.subject.to_string(), entry.content.to_json()))
                    .collect()
            }
            _ => vec![(subject, message.payload.clone())],
        };
        for (subject, payload) in payloads {
            js.publish(subject.clone(), payload)
                .await?
                .await
                .with_context(|| format!("requeueing {name} #{seq} to {subject}"))?;
        }
        requeued += 1;
    }
    Ok(requeued)
}

async fn status(config: &Config) -> anyhow::Result<ExitCode> {
    // Read-only: a member that claims nothing. Its id marks it as not an instance.
    let observer = Member::here("status-reader".into(), config);
    let (client, cluster) = connect_cluster(config, observer).await?;
    let count = cluster.recorded_count().await?;
    println!(
        "{}",
        serde_json::json!({ "shards_count": count, "lease_secs": cluster.lease_period().as_secs() })
    );
    let js = async_nats::jetstream::new(client.clone());
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    let snapshots = snapshots_of(&client, config);
    let now_ms = chrono::Utc::now().timestamp_millis();
    for shard in 0..count.unwrap_or(config.shards.count) {
        let lease = cluster.read_lease(shard).await?;
        let newest = snapshots.chain(shard, 1).await?.pop();
        let snapshot = newest.map(|s| {
            serde_json::json!({
                "covers": s.manifest.covers,
                "bytes": s.manifest.bytes,
                "age_secs": (now_ms - s.manifest.taken_at_ms).max(0) / 1000,
            })
        });
        let stream = match js.get_stream(topology.shard_stream(shard)).await {
            Ok(mut stream) => {
                let state = &stream.info().await?.state;
                Some(serde_json::json!({
                    "first": state.first_sequence,
                    "last": state.last_sequence,
                    "messages": state.messages,
                    "bytes": state.bytes,
                }))
            }
            Err(_) => None,
        };
        let upgrading = topology.legacy_shard_stream_exists(&js, shard).await?;
        println!(
            "{}",
            serde_json::json!({
                "shard": shard,
                "lease": lease,
                "snapshot": snapshot,
                "stream": stream,
                "upgrading": upgrading,
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn connect_cluster(
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
