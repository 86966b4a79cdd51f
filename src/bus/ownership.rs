//! Exclusive shard ownership, enforced through JetStream rather than trust in config.
//!
//! Two key-value buckets (names in `streams.*_bucket`):
//!
//! | bucket         | key            | value                                   | expires |
//! |----------------|----------------|-----------------------------------------|---------|
//! | shards         | `shards.count` | the cluster's shard count (JSON number) | never   |
//! | shards         | `input.partitions` | the cluster's input partition count (JSON number) | never |
//! | shards         | `envelope.format` | the envelope format routers write (`envelope_format.rs`) | never |
//! | shards         | `home.N`       | the previous release's [`Member`] holding shard N (read by the upgrade only, then deleted) | never |
//! | leases         | `shard.N`      | [`LeaseRecord`] of the process applying | max age |
//!
//! Any instance that owns a shard by config may take its lease; its state comes from JetStream
//! (snapshots and the shard stream), not from a particular data dir. A lease is created if absent, renewed (compare-and-set on its
//! revision) every third of the bucket's max age, and trusted by its holder only for two
//! thirds of it, so a holder that missed renewals stops applying before the server lets
//! anyone else create the key. A renewal that finds the key gone or taken never creates it
//! again: the lease is lost for good, and the worker takes the shard again, if at all,
//! through [`Cluster::acquire`], restoring first like any new owner. Homes and leases live in two buckets because a bucket's max
//! age applies to every key in it (nats-server 2.9 has no per-key TTL).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{stream, Context};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::BusError;
use crate::config::{Config, ConfigError};
use crate::retry::until_ok;

const COUNT_KEY: &str = "shards.count";
const PARTITIONS_KEY: &str = "input.partitions";

/// The header a key-value delete or purge carries (`DEL`, `PURGE`); a put carries none.
const KV_OPERATION: &str = "KV-Operation";

fn home_key(shard: u16) -> String {
    format!("home.{shard}")
}

fn lease_key(shard: u16) -> String {
    format!("shard.{shard}")
}

/// One instance: its data dir's id, and where to find it (for the operator reading errors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub instance: String,
    pub host: String,
    pub data_dir: String,
}

impl Member {
    /// This machine and data dir, under the data dir's instance id.
    pub fn here(instance: String, config: &Config) -> Member {
        Member {
            instance,
            host: crate::config::hostname(),
            data_dir: config.storage.path.display().to_string(),
        }
    }
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {} (host {}, data dir {})",
            self.instance, self.host, self.data_dir
        )
    }
}

/// The lease value: the member plus a per-process nonce, so a second process started on a
/// copy of the same data dir is a different holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: Member,
    pub process: String,
}

/// What a holder tells the shard's standbys with every renewal: its digest epoch and the
/// outbox sequence below which the output stream acknowledged every digest part. A standby,
/// whose copy of the shard queues the same parts under the same sequences, drops those.
///
/// A lease without it was written by the previous release, whose holders say nothing: a
/// standby cannot tell which parts of its copy were published, so it does not follow such a
/// holder (it restores at a takeover, as before).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub epoch: u64,
    pub below: u64,
}

impl Published {
    /// What a new holder writes before its state is restored: epoch 0 matches no copy's
    /// (a random or time-derived u64), so nothing is dropped yet.
    pub const NOTHING_YET: Published = Published { epoch: 0, below: 0 };
}

/// The lease key's value: the record, and what the holder published. The previous release
/// reads the record alone (unknown fields are ignored) and writes no `published`.
#[derive(Serialize, Deserialize)]
struct LeaseValue {
    #[serde(flatten)]
    record: LeaseRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    published: Option<Published>,
}

pub enum Acquired {
    Held(Box<ShardLease>),
    /// Another process holds it.
    HeldBy(Holder),
}

/// Who holds a lease, what it published, and the lease's revision (which every renewal
/// changes).
pub struct Holder {
    pub record: LeaseRecord,
    pub published: Option<Published>,
    pub revision: u64,
}

/// How a count was agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreed {
    /// This process recorded it: the cluster is new.
    Recorded,
    /// The same count was recorded already.
    Found,
}

/// The cluster's shared records, as seen by one process.
#[derive(Clone)]
pub struct Cluster {
    shards: kv::Store,
    leases: kv::Store,
    shards_bucket: String,
    lease_period: Duration,
    me: LeaseRecord,
}

impl Cluster {
    /// Opens (creating if needed) both buckets. The lease period is the leases bucket's
    /// actual max age, whoever created it.
    pub async fn open(js: &Context, config: &Config, me: Member) -> Result<Cluster, BusError> {
        let streams = &config.streams;
        let shards = open_bucket(
            js,
            kv::Config {
                bucket: streams.shards_bucket.clone(),
                description: "alarm-digest: the cluster's shard count and each shard's home".into(),
                history: 1,
                num_replicas: streams.replicas,
                ..Default::default()
            },
        )
        .await?;
        let mut leases = open_bucket(
            js,
            kv::Config {
                bucket: streams.leases_bucket.clone(),
                description: "alarm-digest: which process applies each shard now".into(),
                history: 1,
                max_age: Duration::from_secs(config.shards.lease_secs),
                num_replicas: streams.replicas,
                ..Default::default()
            },
        )
        .await?;
        let lease_period = bucket_max_age(&mut leases).await?;
        let configured = Duration::from_secs(config.shards.lease_secs);
        if lease_period != configured {
            tracing::warn!(
                bucket = %streams.leases_bucket,
                period_secs = lease_period.as_secs(),
                configured_secs = configured.as_secs(),
                "the leases bucket keeps the lease period it was created with, not \
                 shards.lease_secs; to change it, stop every instance and delete the bucket's \
                 stream (README, 'Upgrading')"
            );
        }
        if lease_period.is_zero() {
            return Err(BusError::StreamMismatch {
                stream: format!("KV_{}", streams.leases_bucket),
                problem: "it has no max age, so a dead holder's lease would never expire".into(),
            });
        }
        Ok(Cluster {
            shards,
            leases,
            shards_bucket: streams.shards_bucket.clone(),
            lease_period,
            me: LeaseRecord {
                holder: me,
                process: format!("{:016x}", rand::random::<u64>()),
            },
        })
    }

    /// Joins the cluster: opens the buckets and agrees on `shards.count`, retrying transient
    /// failures. `Ok(None)` when cancelled; a count mismatch is the fatal error.
    pub async fn join(
        js: &Context,
        config: &Config,
        me: Member,
        cancel: &CancellationToken,
    ) -> Result<Option<Cluster>, BusError> {
        let Some(cluster) = until_ok("opening the ownership buckets", cancel, || {
            Cluster::open(js, config, me.clone())
        })
        .await?
        else {
            return Ok(None);
        };
        let agreed = until_ok("agreeing on shards.count", cancel, || {
            cluster.agree_shard_count(config.shards.count)
        })
        .await?;
        match agreed {
            None => return Ok(None),
            Some(Agreed::Recorded) => {
                // A new cluster: no instance of the release before reads its envelopes.
                let recorded = until_ok("recording the envelope format", cancel, || {
                    cluster.record_newest_envelope_format()
                })
                .await?;
                if recorded.is_none() {
                    return Ok(None);
                }
            }
            Some(Agreed::Found) => {}
        }
        let agreed = until_ok("agreeing on streams.input_partitions", cancel, || {
            cluster.agree_input_partitions(config.streams.input_partitions)
        })
        .await?;
        Ok(agreed.map(|()| cluster))
    }

    /// This process's instance, as its leases name it.
    pub fn member(&self) -> &Member {
        &self.me.holder
    }

    /// Forgets a shard's home: the previous release pinned each shard to a data dir; once a
    /// shard's first snapshot is in JetStream, nothing reads it.
    pub async fn forget_home(&self, shard: u16) -> Result<(), BusError> {
        self.shards
            .delete(home_key(shard))
            .await
            .map_err(|e| BusError::transient("forgetting a shard home", e))
    }

    pub fn lease_period(&self) -> Duration {
        self.lease_period
    }

    /// How often holders renew, and how often a waiting instance looks again.
    pub fn renew_every(&self) -> Duration {
        self.lease_period / 3
    }

    /// The shards bucket, for the records other rooms of `bus` keep there.
    pub(super) fn shards_bucket(&self) -> &kv::Store {
        &self.shards
    }

    /// Records the shard count on first start; refuses another one later.
    pub async fn agree_shard_count(&self, configured: u16) -> Result<Agreed, BusError> {
        let recorded = self
            .agree_count(COUNT_KEY, "shard count", configured)
            .await?;
        recorded.map_err(|recorded| {
            BusError::from(ConfigError::ClusterShardCount {
                recorded,
                configured,
                bucket: self.shards_bucket.clone(),
            })
        })
    }

    /// Records the input partition count on first start (a deployment of the release before
    /// records its one partition then); refuses another one later: `partitions set` changes
    /// it.
    pub async fn agree_input_partitions(&self, configured: u16) -> Result<(), BusError> {
        let recorded = self
            .agree_count(PARTITIONS_KEY, "input partition count", configured)
            .await?;
        recorded.map(|_| ()).map_err(|recorded| {
            BusError::from(ConfigError::ClusterPartitionCount {
                recorded,
                configured,
                bucket: self.shards_bucket.clone(),
            })
        })
    }

    /// Records `configured` under `key` unless a count is recorded there already; `Ok(Err(n))`
    /// when the recorded count `n` differs.
    async fn agree_count(
        &self,
        key: &str,
        what: &str,
        configured: u16,
    ) -> Result<Result<Agreed, u16>, BusError> {
        match self.shards.create(key, to_json(&configured)).await {
            Ok(_) => Ok(Ok(Agreed::Recorded)),
            Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {
                let context = format!("reading the cluster's {what}");
                match read_json::<u16>(&self.shards, key, &context).await? {
                    Some(recorded) if recorded == configured => Ok(Ok(Agreed::Found)),
                    Some(recorded) => Ok(Err(recorded)),
                    // Deleted between create and get: try again.
                    None => Err(BusError::transient(context, "the record vanished")),
                }
            }
            Err(error) => Err(BusError::transient(format!("recording the {what}"), error)),
        }
    }

    pub async fn recorded_input_partitions(&self) -> Result<Option<u16>, BusError> {
        read_json(
            &self.shards,
            PARTITIONS_KEY,
            "reading the cluster's input partition count",
        )
        .await
    }

    /// Records a new input partition count (compare-and-set on the one read), for
    /// `partitions set`. Returns the count it replaced (`None`: none was recorded).
    pub async fn set_input_partitions(&self, to: u16) -> Result<Option<u16>, BusError> {
        let context = "recording the new input partition count";
        let entry = self
            .shards
            .entry(PARTITIONS_KEY)
            .await
            .map_err(|e| BusError::transient(context, e))?;
        match entry.filter(|e| e.operation == kv::Operation::Put) {
            Some(entry) => {
                let before: Option<u16> = serde_json::from_slice(&entry.value).ok();
                self.shards
                    .update(PARTITIONS_KEY, to_json(&to), entry.revision)
                    .await
                    .map_err(|e| BusError::transient(context, e))?;
                Ok(before)
            }
            None => {
                self.shards
                    .create(PARTITIONS_KEY, to_json(&to))
                    .await
                    .map_err(|e| BusError::transient(context, e))?;
                Ok(None)
            }
        }
    }

    pub async fn read_home(&self, shard: u16) -> Result<Option<Member>, BusError> {
        read_json(&self.shards, &home_key(shard), "reading a shard home").await
    }

    pub async fn read_lease(&self, shard: u16) -> Result<Option<LeaseRecord>, BusError> {
        Ok(self
            .read_lease_value(shard)
            .await?
            .map(|value| value.record))
    }

    /// Who holds the shard's lease now; `None` when nobody does. Read from the stream's
    /// leader, not through a direct get that any replica may answer: a replica that lags
    /// (seen after a node restart) would say "nobody" while the leader still holds the key,
    /// so the lease could neither be taken nor ended.
    pub async fn holder(&self, shard: u16) -> Result<Option<Holder>, BusError> {
        let context = "reading a shard lease";
        let key = lease_key(shard);
        let subject = format!("{}{key}", self.leases.prefix);
        let message = match self
            .leases
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(message) => message,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(error) => return Err(BusError::transient(context, error)),
        };
        let removed = message
            .headers
            .get(KV_OPERATION)
            .is_some_and(|op| op.as_str() != "PUT");
        if removed {
            return Ok(None);
        }
        let value: LeaseValue = serde_json::from_slice(&message.payload).map_err(|e| {
            BusError::transient(context, format!("unreadable record under {key}: {e}"))
        })?;
        Ok(Some(Holder {
            record: value.record,
            published: value.published,
            revision: message.sequence,
        }))
    }

    async fn read_lease_value(&self, shard: u16) -> Result<Option<LeaseValue>, BusError> {
        read_json(&self.leases, &lease_key(shard), "reading a shard lease").await
    }

    /// Ends a lease its holder stopped renewing, without waiting for the server to expire
    /// it: a delete that the broker refuses unless `revision` is still the lease's last.
    /// Call it only once `revision` was seen unchanged for a whole lease period: the holder
    /// renews every third of it and trusts a renewal for two thirds of it after sending it,
    /// so by then it trusts `revision` no more, and any renewal would have changed it.
    /// `false`: not ended (renewed or taken meanwhile, or the broker did not answer; the
    /// server's own expiry, or the next look, ends it).
    pub async fn end_expired(&self, shard: u16, revision: u64) -> bool {
        match self
            .leases
            .delete_expect_revision(lease_key(shard), Some(revision))
            .await
        {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(shard, %error, "lease not ended: renewed, taken or unanswered");
                false
            }
        }
    }

    pub async fn recorded_count(&self) -> Result<Option<u16>, BusError> {
        read_json(&self.shards, COUNT_KEY, "reading the cluster's shard count").await
    }

    /// Changes the recorded shard count from `from` to `to` (compare-and-set) and forgets
    /// every home, for `shard recount`: after a re-shard no data dir holds any new shard
    /// until `shard import` puts one there.
    pub async fn recount(&self, from: u16, to: u16) -> Result<(), BusError> {
        let entry = self
            .shards
            .entry(COUNT_KEY)
            .await
            .map_err(|e| BusError::transient("reading the cluster's shard count", e))?;
        match entry.filter(|e| e.operation == kv::Operation::Put) {
            Some(entry) => {
                let recorded: Option<u16> = serde_json::from_slice(&entry.value).ok();
                if recorded != Some(from) {
                    return Err(BusError::from(ConfigError::ClusterShardCount {
                        recorded: recorded.unwrap_or(0),
                        configured: from,
                        bucket: self.shards_bucket.clone(),
                    }));
                }
                for shard in 0..from.max(to) {
                    self.shards
                        .delete(home_key(shard))
                        .await
                        .map_err(|e| BusError::transient("forgetting a shard home", e))?;
                }
                self.shards
                    .update(COUNT_KEY, to_json(&to), entry.revision)
                    .await
                    .map_err(|e| BusError::transient("recording the new shard count", e))?;
            }
            None => {
                self.shards
                    .create(COUNT_KEY, to_json(&to))
                    .await
                    .map_err(|e| BusError::transient("recording the new shard count", e))?;
            }
        }
        Ok(())
    }

    /// Takes the shard's lease if nobody holds it, and keeps renewing it until released.
    pub async fn acquire(&self, shard: u16) -> Result<Acquired, BusError> {
        let key = lease_key(shard);
        let sent = Instant::now();
        let published = Some(Published::NOTHING_YET);
        match self.leases.create(&key, self.lease_value(published)).await {
            Ok(revision) => {
                let state = Arc::new(Mutex::new(LeaseState {
                    revision: Some(revision),
                    trusted_until: Some(sent + self.trusted_for()),
                    published,
                }));
                let stop = CancellationToken::new();
                let renewer = tokio::spawn(renew(self.clone(), shard, state.clone(), stop.clone()));
                Ok(Acquired::Held(Box::new(ShardLease {
                    cluster: self.clone(),
                    shard,
                    epoch: revision,
                    state,
                    stop,
                    renewer: Some(renewer),
                })))
            }
            // Whatever the create said (its own check of the key is a direct get, which a
            // lagging replica may answer), the leader says who holds it.
            Err(error) => match self.holder(shard).await? {
                Some(holder) => Ok(Acquired::HeldBy(holder)),
                None if error.kind() == CreateErrorKind::AlreadyExists => Err(BusError::transient(
                    "taking a shard lease",
                    "it just expired",
                )),
                None => Err(BusError::transient("taking a shard lease", error)),
            },
        }
    }

    /// The lease's revision if the shard's lease record is this process's own (read from
    /// the leader, as [`Cluster::holder`] reads it).
    async fn own_lease_revision(&self, shard: u16) -> Option<u64> {
        let holder = self.holder(shard).await.ok()??;
        (holder.record == self.me).then_some(holder.revision)
    }

    fn lease_value(&self, published: Option<Published>) -> Bytes {
        to_json(&LeaseValue {
            record: self.me.clone(),
            published,
        })
    }

    /// A holder trusts a renewal this long after sending it; the server keeps the key for the
    /// whole period after receiving it, so a third of the period separates the two.
    fn trusted_for(&self) -> Duration {
        self.lease_period * 2 / 3
    }
}

struct LeaseState {
    /// The revision of our last write; `None` once the lease is lost (for good: it is never
    /// recreated by a renewal).
    revision: Option<u64>,
    trusted_until: Option<Instant>,
    /// What the holder published so far, written with the next renewal.
    published: Option<Published>,
}

/// A held lease on one shard. Check [`ShardLease::is_fresh`] before applying each batch.
pub struct ShardLease {
    cluster: Cluster,
    shard: u16,
    epoch: u64,
    state: Arc<Mutex<LeaseState>>,
    stop: CancellationToken,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl ShardLease {
    /// Whether this process may apply the shard's next batch.
    pub fn is_fresh(&self) -> bool {
        self.state
            .lock()
            .ok()
            .and_then(|state| state.trusted_until)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Whether a renewal found the lease gone or taken: this process must stop applying the
    /// shard and take it again, if at all, as a new owner.
    pub fn is_lost(&self) -> bool {
        self.state
            .lock()
            .map(|state| state.revision.is_none())
            .unwrap_or(true)
    }

    /// The lease's revision when this process took it: the owner's epoch, which grows with
    /// every new holder (the bucket's stream sequence).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records what this holder published; the next renewal tells the standbys.
    pub fn note_published(&self, published: Published) {
        if let Ok(mut state) = self.state.lock() {
            state.published = Some(published);
        }
    }

    /// Stops renewing and deletes the lease, so the next holder (this instance restarted,
    /// or the shard's new home) need not wait for it to expire.
    pub async fn release(mut self) {
        self.stop.cancel();
        // A renewal in flight would change the revision under the delete.
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.await;
        }
        let revision = self.state.lock().ok().and_then(|state| state.revision);
        if let Some(revision) = revision {
            let key = lease_key(self.shard);
            if let Err(error) = self
                .cluster
                .leases
                .delete_expect_revision(&key, Some(revision))
                .await
            {
                tracing::warn!(shard = self.shard, %error, "lease not released; it will expire");
            }
        }
    }
}

impl Drop for ShardLease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn renew(
    cluster: Cluster,
    shard: u16,
    state: Arc<Mutex<LeaseState>>,
    stop: CancellationToken,
) {
    let key = lease_key(shard);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cluster.renew_every()) => {}
        }
        // Lost: never taken again here. Whoever takes the shard next, this process included,
        // does it through `acquire` and restores the state first (ARCHITECTURE.md, "Who may
        // apply a shard").
        let Some((revision, published)) = state
            .lock()
            .ok()
            .and_then(|state| Some((state.revision?, state.published)))
        else {
            return;
        };
        let sent = Instant::now();
        let result = cluster
            .leases
            .update(&key, cluster.lease_value(published), revision)
            .await
            .map_err(|e| e.kind() == UpdateErrorKind::WrongLastRevision);
        // A write whose reply was lost still happened: if the record is ours, keep it.
        let result = match result {
            Err(true) => match cluster.own_lease_revision(shard).await {
                Some(revision) => Ok(revision),
                None => Err(true),
            },
            other => other,
        };
        let Ok(mut state) = state.lock() else { return };
        match result {
            Ok(new_revision) => {
                state.revision = Some(new_revision);
                state.trusted_until = Some(sent + cluster.trusted_for());
            }
            Err(true) => {
                tracing::error!(
                    shard,
                    "shard lease lost: this process missed its renewals (paused or cut off) \
                     and another one may hold the shard now; this process stops applying it \
                     and takes it again only as a new owner does, restoring first"
                );
                state.revision = None;
                state.trusted_until = None;
                return;
            }
            Err(false) => {
                // Transient: keep the lease until trust runs out; the next renewal retries.
                tracing::warn!(shard, "shard lease renewal failed; retrying");
            }
        }
    }
}

/// Opens a key-value bucket, creating its stream if needed. The stream is created here, with
/// the key-value layout, because async-nats's `create_key_value` first queries account info
/// in a shape nats-server 2.9 does not answer with.
async fn open_bucket(js: &Context, config: kv::Config) -> Result<kv::Store, BusError> {
    let name = config.bucket.clone();
    let stream = stream::Config {
        name: format!("KV_{name}"),
        description: Some(config.description),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: config.history,
        max_age: config.max_age,
        max_bytes: -1,
        max_message_size: -1,
        num_replicas: config.num_replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    if let Err(error) = js.get_or_create_stream(stream).await {
        // Another instance may have created it a moment ago.
        return js
            .get_key_value(&name)
            .await
            .map_err(|_| BusError::transient(format!("creating key-value bucket {name}"), error));
    }
    js.get_key_value(&name)
        .await
        .map_err(|e| BusError::transient(format!("opening key-value bucket {name}"), e))
}

async fn bucket_max_age(store: &mut kv::Store) -> Result<Duration, BusError> {
    let status = store
        .status()
        .await
        .map_err(|e| BusError::transient("reading the leases bucket", e))?;
    Ok(status.info.config.max_age)
}

pub(super) fn to_json<T: Serialize>(value: &T) -> Bytes {
    // Plain structs of strings: serialising cannot fail.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    store: &kv::Store,
    key: &str,
    context: &str,
) -> Result<Option<T>, BusError> {
    let Some(bytes) = store
        .get(key)
        .await
        .map_err(|e| BusError::transient(context, e))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| BusError::transient(context, format!("unreadable record under {key}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> LeaseRecord {
        LeaseRecord {
            holder: Member {
                instance: "i".into(),
                host: "h".into(),
                data_dir: "/d".into(),
            },
            process: "p".into(),
        }
    }

    #[test]
    fn the_previous_release_and_this_one_read_each_others_lease_values() {
        // Written by the previous release: no `published`.
        let old = serde_json::to_vec(&record()).expect("json");
        let value: LeaseValue = serde_json::from_slice(&old).expect("read by this release");
        assert_eq!(value.record, record());
        assert_eq!(value.published, None);

        // Written by this release: the previous one reads its record.
        let published = Published {
            epoch: u64::MAX - 1,
            below: 42,
        };
        let new = serde_json::to_vec(&LeaseValue {
            record: record(),
            published: Some(published),
        })
        .expect("json");
        let as_before: LeaseRecord = serde_json::from_slice(&new).expect("read as before");
        assert_eq!(as_before, record());
        let value: LeaseValue = serde_json::from_slice(&new).expect("read back");
        assert_eq!(value.published, Some(published));
    }
}
