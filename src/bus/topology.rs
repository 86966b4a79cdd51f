use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::{self, DiscardPolicy, Republish, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use async_nats::Subject;
use futures::StreamExt;

use super::BusError;
use crate::config::{StreamsConfig, TuningConfig};
use crate::wire::InputKind;

/// Every stream, subject and consumer name, derived from config and the shard count.
#[derive(Debug, Clone)]
pub struct Topology {
    pub streams: StreamsConfig,
    pub shard_count: u16,
    /// Per shard, the status and request subjects: built once, since the router and the
    /// workers need one for every message (a `Subject` clone is a reference count).
    shard_subjects: Vec<[Subject; 2]>,
    /// The configured input partitions' stream names, for dead-letter records per event.
    pub(super) partition_streams: Vec<String>,
}

impl Topology {
    pub fn new(streams: StreamsConfig, shard_count: u16) -> Topology {
        let shard_subjects = (0..shard_count)
            .map(|shard| {
                [
                    Subject::from(format!("{}.shard.{shard}", streams.status_subject)),
                    Subject::from(format!("{}.shard.{shard}", streams.digest_request_subject)),
                ]
            })
            .collect();
        let partition_streams = (0..streams.input_partitions)
            .map(|partition| {
                super::partitions::partition_stream_of(&streams.input_stream, partition)
            })
            .collect();
        Topology {
            streams,
            shard_count,
            shard_subjects,
            partition_streams,
        }
    }

    /// The user's shard: crc32(UserID) mod shard count, as the design card fixes it.
    pub fn shard_of(&self, user_id: &str) -> u16 {
        // Lossless: the remainder is below shard_count, a u16.
        (crc32fast::hash(user_id.as_bytes()) % u32::from(self.shard_count)) as u16
    }

    /// The shard's log: Limits retention, so its tail after the oldest kept snapshot can be
    /// replayed by whichever instance takes the shard next.
    pub fn shard_stream(&self, shard: u16) -> String {
        format!("{}_LOG_{shard}", self.streams.shard_stream_prefix)
    }

    /// `<input subject>.shard.<N>`. Panics on a shard outside `0..shard_count`, which only
    /// `shard_of` and validated config produce.
    pub fn shard_subject(&self, kind: InputKind, shard: u16) -> Subject {
        let index = match kind {
            InputKind::StatusChange => 0,
            InputKind::DigestRequest => 1,
        };
        self.shard_subjects[usize::from(shard)][index].clone()
    }

    pub fn input_subject(&self, kind: InputKind) -> &str {
        match kind {
            InputKind::StatusChange => &self.streams.status_subject,
            InputKind::DigestRequest => &self.streams.digest_request_subject,
        }
    }

    /// What an input subject carries (a plain one, or a partition's `.in.<p>`).
    pub fn input_kind(&self, subject: &str) -> Option<InputKind> {
        self.input_origin(subject).map(|origin| origin.kind)
    }

    /// What a shard-stream subject carries, if it belongs to `shard`.
    pub fn shard_kind(&self, shard: u16, subject: &str) -> Option<InputKind> {
        let [status, request] = self.shard_subjects.get(usize::from(shard))?;
        if subject == status.as_str() {
            Some(InputKind::StatusChange)
        } else if subject == request.as_str() {
            Some(InputKind::DigestRequest)
        } else {
            None
        }
    }

    /// How long the output and shard streams remember a Msg-Id: a router that crashed between
    /// its publish and its ack republishes digest requests with the same Msg-Id, and a shard
    /// worker that crashed between its publish and its outbox removal republishes digests.
    fn duplicate_window(&self) -> Duration {
        Duration::from_secs(self.streams.duplicate_window_secs)
    }

    /// The output stream stores what the service publishes to `output_subject` and republishes
    /// each stored message to `digest_subject`, where plain subscribers listen: a copy the
    /// duplicate window drops is never stored, so it is never republished either.
    fn output_republish(&self) -> Republish {
        Republish {
            source: self.streams.output_subject.clone(),
            destination: self.streams.digest_subject.clone(),
            headers_only: false,
        }
    }

    /// Where a single-replica stream is created when `streams.node_tags` names the nodes: the
    /// tag the placement plan gives it (`bus/placement.rs`). `None`: the broker chooses (no
    /// tags, replicated streams, or a stream outside the plan).
    pub fn placement_of(&self, name: &str) -> Option<stream::Placement> {
        if self.streams.replicas != 1 || self.streams.node_tags.is_empty() {
            return None;
        }
        let order = super::placement::ordered_streams(self);
        let index = order.iter().position(|stream| stream == name)?;
        let tag = super::placement::tags_in_order(order.len(), &self.streams.node_tags)
            .swap_remove(index)?;
        Some(stream::Placement {
            cluster: None,
            tags: vec![tag],
        })
    }

    fn stream_configs(&self) -> Vec<stream::Config> {
        let mut configs = self.unplaced_stream_configs();
        for config in &mut configs {
            config.placement = self.placement_of(&config.name);
        }
        configs
    }

    fn unplaced_stream_configs(&self) -> Vec<stream::Config> {
        let s = &self.streams;
        let mut configs: Vec<stream::Config> = (0..self.input_partitions())
            .map(|partition| self.partition_stream_config(partition))
            .collect();
        for shard in 0..self.shard_count {
            configs.push(stream::Config {
                name: self.shard_stream(shard),
                description: Some(format!("alarm-digest shard {shard}")),
                subjects: vec![
                    self.shard_subject(InputKind::StatusChange, shard)
                        .to_string(),
                    self.shard_subject(InputKind::DigestRequest, shard)
                        .to_string(),
                ],
                retention: RetentionPolicy::Limits,
                storage: StorageType::File,
                num_replicas: s.replicas,
                duplicate_window: self.duplicate_window(),
                ..Default::default()
            });
        }
        configs.push(stream::Config {
            name: s.snapshot_stream.clone(),
            description: Some("alarm-digest shard snapshots: chunks and manifests".into()),
            subjects: vec![format!("{}.>", s.snapshot_subject)],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: s.replicas,
            ..Default::default()
        });
        configs.push(stream::Config {
            name: s.output_stream.clone(),
            description: Some(format!(
                "alarm-digest output: digests stored once, republished to {}",
                s.digest_subject
            )),
            subjects: vec![s.output_subject.clone()],
            republish: Some(self.output_republish()),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: s.replicas,
            max_age: Duration::from_secs(s.output_max_age_hours * 3600),
            duplicate_window: self.duplicate_window(),
            ..Default::default()
        });
        configs.push(stream::Config {
            name: s.dead_letter_stream.clone(),
            description: Some("alarm-digest dead letters: rejected input with the reason".into()),
            subjects: vec![s.dead_letter_subject.clone()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: s.replicas,
            max_age: Duration::from_secs(s.dead_letter_max_age_hours * 3600),
            max_bytes: s.dead_letter_max_bytes,
            discard: DiscardPolicy::Old,
            ..Default::default()
        });
        configs
    }

    /// Partition `p`'s input stream: WorkQueue, so what every router acked is gone.
    pub(super) fn partition_stream_config(&self, partition: u16) -> stream::Config {
        let s = &self.streams;
        let name = self.partition_stream(partition);
        stream::Config {
            placement: self.placement_of(&name),
            name,
            description: Some(match partition {
                0 => "alarm-digest input: producers publish plain NATS messages".into(),
                p => format!("alarm-digest input partition {p}"),
            }),
            subjects: self.partition_subjects(partition),
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: s.replicas,
            ..Default::default()
        }
    }

    /// Creates every stream, or checks that an existing one has the retention and subjects
    /// this service relies on. Safe to run from every instance at once.
    pub async fn ensure_streams(&self, js: &Context) -> Result<(), BusError> {
        for config in self.stream_configs() {
            if config.name == self.streams.output_stream {
                self.migrate_previous_output(js, &config).await?;
            }
            if let Some(shard) =
                (0..self.shard_count).find(|s| self.shard_stream(*s) == config.name)
            {
                self.retire_legacy_shard_stream(js, shard).await?;
            }
            // Partition 0 gains its `.in.0` subjects in place when partitions are added, and
            // keeps them when they are removed again: a server still mapping there loses
            // nothing.
            let may_keep = match self.partition_of_stream(&config.name) {
                Some(0) => self.spread_subjects(0),
                _ => Vec::new(),
            };
            ensure_stream(js, config, &may_keep).await?;
        }
        Ok(())
    }

    /// The routers' durable consumer of input partition `partition` (same name on every
    /// partition stream).
    pub async fn router_consumer(
        &self,
        js: &Context,
        tuning: &TuningConfig,
        partition: u16,
    ) -> Result<PullConsumer, BusError> {
        // Every instance's router pulls through this one consumer; leave room for all of
        // their batches (the server's default of 1000 would stall the router silently).
        let max_ack_pending = (tuning.router_batch * 16).max(10_000);
        durable_consumer(
            js,
            &self.partition_stream(partition),
            &self.streams.router_consumer,
            tuning,
            max_ack_pending,
        )
        .await
    }

    /// A standby's reader of the shard log from `start`: ephemeral (the broker deletes it a
    /// minute after its standby stops asking), in memory, one replica, no acks, so it costs
    /// the broker one delivery per message and never touches the holder's consumer.
    pub async fn standby_consumer_from(
        &self,
        js: &Context,
        shard: u16,
        start: u64,
    ) -> Result<PullConsumer, BusError> {
        let name = self.shard_stream(shard);
        let stream = super::open_stream(js, &name).await?;
        stream
            .create_consumer(pull::Config {
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start.max(1),
                },
                inactive_threshold: Duration::from_secs(60),
                memory_storage: true,
                num_replicas: 1,
                description: Some(format!("alarm-digest standby of shard {shard}")),
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::transient(format!("creating a standby reader on {name}"), e))
    }

    /// The shard's consumer, positioned at `start` (the first sequence the shard's state does
    /// not reflect). An existing durable would keep its old position whatever this asks
    /// (async-nats `get_or_create_consumer`), so it is deleted and created again: only the
    /// lease holder calls this, so nobody else is using it.
    pub async fn worker_consumer_from(
        &self,
        js: &Context,
        shard: u16,
        tuning: &TuningConfig,
        start: u64,
    ) -> Result<PullConsumer, BusError> {
        let name = self.shard_stream(shard);
        let durable = &self.streams.worker_consumer;
        let stream = super::open_stream(js, &name).await?;
        if let Err(error) = stream.delete_consumer(durable).await {
            let text = error.to_string();
            if !text.contains("not found") && !text.contains("10014") {
                return Err(BusError::transient(
                    format!("deleting consumer {durable} on {name}"),
                    text,
                ));
            }
        }
        let consumer: PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(durable.to_string()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: tuning.ack_wait(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start.max(1),
                },
                max_deliver: -1,
                max_ack_pending: i64::try_from((tuning.worker_batch * 4).max(5_000))
                    .unwrap_or(i64::MAX),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                BusError::transient(format!("creating consumer {durable} on {name}"), e)
            })?;
        // Trust, but check: it must deliver `start` next, or the state would skip or repeat.
        let mut created = consumer;
        let info = created
            .info()
            .await
            .map_err(|e| BusError::transient(format!("reading consumer {durable} on {name}"), e))?;
        let next = info.delivered.stream_sequence + 1;
        if next != start.max(1) {
            return Err(BusError::transient(
                format!("creating consumer {durable} on {name}"),
                format!("it starts at sequence {next}, not {start}"),
            ));
        }
        Ok(created)
    }
}

async fn ensure_stream(
    js: &Context,
    wanted: stream::Config,
    may_keep: &[String],
) -> Result<(), BusError> {
    let name = wanted.name.clone();
    let Some(mut existing) = super::lookup_stream(js, &name).await? else {
        return match js.create_stream(wanted).await {
            Ok(_) => {
                tracing::info!(stream = %name, "created stream");
                Ok(())
            }
            // Another instance may have created it meanwhile; the next start checks it.
            Err(error) if error.to_string().contains("already in use") => Ok(()),
            Err(error) => Err(super::jetstream_error(
                format!("creating stream {name}"),
                error,
            )),
        };
    };
    let info = existing
        .info()
        .await
        .map_err(|e| BusError::transient(format!("reading stream {name}"), e))?;
    let update =
        reconcile(&info.config, &wanted, may_keep).map_err(|problem| BusError::StreamMismatch {
            stream: name.clone(),
            problem,
        })?;
    let Some(update) = update else {
        return Ok(());
    };
    match js.update_stream(&update).await {
        Ok(_) => {
            tracing::info!(
                stream = %name,
                subjects = ?update.subjects,
                republish = ?update.republish.as_ref().map(|r| &r.destination),
                duplicate_window_secs = update.duplicate_window.as_secs(),
                "updated stream in place"
            );
            Ok(())
        }
        Err(error) => Err(super::jetstream_error(
            format!("updating stream {name}"),
            error,
        )),
    }
}

pub(super) async fn durables_names(stream: &stream::Stream) -> Vec<String> {
    let mut names = Vec::new();
    let mut listed = stream.consumer_names();
    while let Some(Ok(name)) = listed.next().await {
        names.push(name);
    }
    names
}

/// Compares an existing stream with what this release needs. `Ok(None)`: nothing to do;
/// `Ok(Some(config))`: update it in place to `config` (the existing one with this release's
/// duplicate window, and the subjects it lacks; everything else an operator tuned is kept);
/// `Err`: a stream this service must not use as it is, with what is wrong. nats-server cannot
/// change a stream's RePublish in place, so a different one is refused, not updated.
///
/// `may_keep`: subjects the stream may capture beyond `wanted`'s; only a stream with such
/// subjects (input partition 0) gains missing ones in place, every other one must capture
/// exactly `wanted`'s.
pub(super) fn reconcile(
    have: &stream::Config,
    wanted: &stream::Config,
    may_keep: &[String],
) -> Result<Option<stream::Config>, String> {
    if have.retention != wanted.retention {
        return Err(format!(
            "has retention {:?}, this service needs {:?}",
            have.retention, wanted.retention
        ));
    }
    let have_subjects: BTreeSet<&String> = have.subjects.iter().collect();
    let want_subjects: BTreeSet<&String> = wanted.subjects.iter().collect();
    let foreign = have_subjects
        .difference(&want_subjects)
        .any(|subject| !may_keep.contains(subject));
    let missing: Vec<String> = want_subjects
        .difference(&have_subjects)
        .map(|subject| subject.to_string())
        .collect();
    if foreign || (!missing.is_empty() && may_keep.is_empty()) {
        return Err(format!(
            "captures {:?}, this service needs {:?}",
            have.subjects, wanted.subjects
        ));
    }
    if !missing.is_empty() {
        let mut subjects = have.subjects.clone();
        subjects.extend(missing);
        return Ok(Some(stream::Config {
            subjects,
            duplicate_window: if wanted.duplicate_window.is_zero() {
                have.duplicate_window
            } else {
                wanted.duplicate_window
            },
            ..have.clone()
        }));
    }
    if have.republish != wanted.republish {
        let describe = |republish: &Option<Republish>| match republish {
            Some(r) => format!("{} to {}", r.source, r.destination),
            None => "nothing".to_string(),
        };
        return Err(format!(
            "republishes {}, this service needs it to republish {} (the server cannot change \
             that in place: delete the stream once its consumers have read it, and start again)",
            describe(&have.republish),
            describe(&wanted.republish)
        ));
    }
    // Zero: this service leaves the window to the server's default (the input and the
    // dead-letter streams).
    if wanted.duplicate_window.is_zero() || have.duplicate_window == wanted.duplicate_window {
        return Ok(None);
    }
    Ok(Some(stream::Config {
        duplicate_window: wanted.duplicate_window,
        ..have.clone()
    }))
}

pub(super) async fn durable_consumer(
    js: &Context,
    stream_name: &str,
    durable: &str,
    tuning: &TuningConfig,
    max_ack_pending: usize,
) -> Result<PullConsumer, BusError> {
    let stream = js
        .get_stream_no_info(stream_name)
        .await
        .map_err(|e| BusError::transient(format!("opening stream {stream_name}"), e))?;
    stream
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.to_string()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: tuning.ack_wait(),
                deliver_policy: DeliverPolicy::All,
                // Never give up on a message: bad input is dead-lettered, not dropped.
                max_deliver: -1,
                max_ack_pending: i64::try_from(max_ack_pending).unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| BusError::transient(format!("binding consumer {durable} on {stream_name}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_crc32_of_user_id_mod_count() {
        let topology = Topology::new(StreamsConfig::default(), 16);
        let user = "e859dab9-1bd4-4b8e-8a6c-2e6c3f9a0f31";
        assert_eq!(
            u32::from(topology.shard_of(user)),
            crc32fast::hash(user.as_bytes()) % 16
        );
    }

    fn output_configs() -> (Topology, stream::Config) {
        let topology = Topology::new(StreamsConfig::default(), 4);
        let wanted = topology
            .stream_configs()
            .into_iter()
            .find(|c| c.name == topology.streams.output_stream)
            .expect("an output stream");
        (topology, wanted)
    }

    #[test]
    fn the_output_stream_captures_only_the_output_subject_and_republishes_to_subscribers() {
        let (_, wanted) = output_configs();
        assert_eq!(wanted.subjects, ["alarm-digest.output"]);
        let republish = wanted.republish.expect("republish");
        assert_eq!(
            (republish.source.as_str(), republish.destination.as_str()),
            ("alarm-digest.output", "AlarmDigest")
        );
        assert!(!republish.headers_only);
        assert_eq!(wanted.duplicate_window, Duration::from_secs(120));
    }

    #[test]
    fn a_new_duplicate_window_updates_the_stream_keeping_what_operators_tuned() {
        let (_, wanted) = output_configs();
        assert_eq!(reconcile(&wanted, &wanted, &[]), Ok(None));
        let tuned = stream::Config {
            max_bytes: 1 << 30,
            ..wanted.clone()
        };
        let longer = stream::Config {
            duplicate_window: Duration::from_secs(600),
            ..wanted.clone()
        };
        let update = reconcile(&tuned, &longer, &[])
            .expect("ok")
            .expect("an update");
        let server_default = stream::Config {
            duplicate_window: Duration::ZERO,
            ..wanted.clone()
        };
        assert_eq!(reconcile(&wanted, &server_default, &[]), Ok(None));
        assert_eq!(update.duplicate_window, Duration::from_secs(600));
        assert_eq!(update.max_bytes, 1 << 30, "the operator's limit stays");
    }

    #[test]
    fn a_stream_with_foreign_subjects_retention_or_republish_is_refused() {
        let (_, wanted) = output_configs();
        let foreign = stream::Config {
            subjects: vec!["Other.>".into()],
            ..wanted.clone()
        };
        assert!(reconcile(&foreign, &wanted, &[])
            .expect_err("foreign")
            .contains("captures"));
        let work_queue = stream::Config {
            retention: RetentionPolicy::WorkQueue,
            ..wanted.clone()
        };
        assert!(reconcile(&work_queue, &wanted, &[])
            .expect_err("retention")
            .contains("retention"));
        let elsewhere = stream::Config {
            republish: Some(Republish {
                source: "alarm-digest.output".into(),
                destination: "Elsewhere".into(),
                headers_only: false,
            }),
            ..wanted.clone()
        };
        let error = reconcile(&elsewhere, &wanted, &[]).expect_err("republish");
        assert!(
            error.contains("to Elsewhere") && error.contains("to AlarmDigest"),
            "{error}"
        );
    }

    #[test]
    fn the_first_input_partition_gains_and_keeps_its_partition_subjects_in_place() {
        let single = Topology::new(StreamsConfig::default(), 4);
        let four = Topology::new(
            StreamsConfig {
                input_partitions: 4,
                ..StreamsConfig::default()
            },
            4,
        );
        let (today, wanted) = (
            single.partition_stream_config(0),
            four.partition_stream_config(0),
        );
        let zero: Vec<String> = ["AlarmStatusChanged.in.0", "SendAlarmDigest.in.0"]
            .map(String::from)
            .to_vec();
        let grown = reconcile(&today, &wanted, &zero)
            .expect("ok")
            .expect("update");
        assert_eq!(grown.subjects.len(), 4);
        assert_eq!(grown.retention, RetentionPolicy::WorkQueue);
        // Back to one partition: the `.in.0` subjects stay, nothing to do.
        assert_eq!(reconcile(&wanted, &today, &zero), Ok(None));
        // Any other stream must capture exactly what it needs.
        assert!(reconcile(&today, &wanted, &[]).is_err());
    }

    #[test]
    fn shard_subjects_map_back_to_their_kind_only_on_their_shard() {
        let topology = Topology::new(StreamsConfig::default(), 4);
        let subject = topology.shard_subject(InputKind::DigestRequest, 2);
        assert_eq!(subject.as_str(), "SendAlarmDigest.shard.2");
        assert_eq!(
            topology.shard_kind(2, &subject),
            Some(InputKind::DigestRequest)
        );
        assert_eq!(topology.shard_kind(1, &subject), None);
        assert_eq!(
            topology.input_kind("AlarmStatusChanged"),
            Some(InputKind::StatusChange)
        );
        assert_eq!(topology.input_kind("AlarmStatusChanged.shard.2"), None);
    }
}
