use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;
use async_nats::Subject;

use super::BusError;
use crate::config::{StreamsConfig, TuningConfig};
use crate::wire::InputKind;

/// JetStream's duplicate window for shard streams: a router that crashed between its publish
/// and its ack republishes digest requests with the same Msg-Id within this window.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Every stream, subject and consumer name, derived from config and the shard count.
#[derive(Debug, Clone)]
pub struct Topology {
    pub streams: StreamsConfig,
    pub shard_count: u16,
    /// Per shard, the status and request subjects: built once, since the router and the
    /// workers need one for every message (a `Subject` clone is a reference count).
    shard_subjects: Vec<[Subject; 2]>,
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
        Topology {
            streams,
            shard_count,
            shard_subjects,
        }
    }

    /// The user's shard: crc32(UserID) mod shard count, as the design card fixes it.
    pub fn shard_of(&self, user_id: &str) -> u16 {
        // Lossless: the remainder is below shard_count, a u16.
        (crc32fast::hash(user_id.as_bytes()) % u32::from(self.shard_count)) as u16
    }

    pub fn shard_stream(&self, shard: u16) -> String {
        format!("{}_{shard}", self.streams.shard_stream_prefix)
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

    /// What an input-stream subject carries.
    pub fn input_kind(&self, subject: &str) -> Option<InputKind> {
        [InputKind::StatusChange, InputKind::DigestRequest]
            .into_iter()
            .find(|kind| subject == self.input_subject(*kind))
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

    fn stream_configs(&self) -> Vec<stream::Config> {
        let s = &self.streams;
        let mut configs = vec![stream::Config {
            name: s.input_stream.clone(),
            description: Some("alarm-digest input: producers publish plain NATS messages".into()),
            subjects: vec![s.status_subject.clone(), s.digest_request_subject.clone()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: s.replicas,
            ..Default::default()
        }];
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
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                num_replicas: s.replicas,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            });
        }
        configs.push(stream::Config {
            name: s.output_stream.clone(),
            description: Some("alarm-digest output: AlarmDigest messages".into()),
            subjects: vec![s.digest_subject.clone()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: s.replicas,
            max_age: Duration::from_secs(s.output_max_age_hours * 3600),
            duplicate_window: DUPLICATE_WINDOW,
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

    /// Creates every stream, or checks that an existing one has the retention and subjects
    /// this service relies on. Safe to run from every instance at once.
    pub async fn ensure_streams(&self, js: &Context) -> Result<(), BusError> {
        for config in self.stream_configs() {
            ensure_stream(js, config).await?;
        }
        Ok(())
    }

    pub async fn router_consumer(
        &self,
        js: &Context,
        tuning: &TuningConfig,
    ) -> Result<PullConsumer, BusError> {
        // Every instance's router pulls through this one consumer; leave room for all of
        // their batches (the server's default of 1000 would stall the router silently).
        let max_ack_pending = (tuning.router_batch * 16).max(10_000);
        durable_consumer(
            js,
            &self.streams.input_stream,
            &self.streams.router_consumer,
            tuning,
            max_ack_pending,
        )
        .await
    }

    pub async fn worker_consumer(
        &self,
        js: &Context,
        shard: u16,
        tuning: &TuningConfig,
    ) -> Result<PullConsumer, BusError> {
        let max_ack_pending = (tuning.worker_batch * 4).max(5_000);
        durable_consumer(
            js,
            &self.shard_stream(shard),
            &self.streams.worker_consumer,
            tuning,
            max_ack_pending,
        )
        .await
    }
}

async fn ensure_stream(js: &Context, wanted: stream::Config) -> Result<(), BusError> {
    let name = wanted.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| BusError::transient(format!("reading stream {name}"), e))?;
            let have = &info.config;
            if have.retention != wanted.retention {
                return Err(BusError::StreamMismatch {
                    stream: name,
                    problem: format!(
                        "has retention {:?}, this service needs {:?}",
                        have.retention, wanted.retention
                    ),
                });
            }
            let have_subjects: BTreeSet<&String> = have.subjects.iter().collect();
            let want_subjects: BTreeSet<&String> = wanted.subjects.iter().collect();
            if have_subjects != want_subjects {
                return Err(BusError::StreamMismatch {
                    stream: name,
                    problem: format!(
                        "captures {:?}, this service needs {:?}",
                        have.subjects, wanted.subjects
                    ),
                });
            }
            Ok(())
        }
        Err(error) => {
            let not_found = matches!(
                error.kind(),
                GetStreamErrorKind::JetStream(ref e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND
            );
            if !not_found {
                return Err(jetstream_error(format!("looking up stream {name}"), error));
            }
            match js.create_stream(wanted).await {
                Ok(_) => {
                    tracing::info!(stream = %name, "created stream");
                    Ok(())
                }
                // Another instance may have created it meanwhile; the next start checks it.
                Err(error) if error.to_string().contains("already in use") => Ok(()),
                Err(error) => Err(jetstream_error(format!("creating stream {name}"), error)),
            }
        }
    }
}

/// Maps "JetStream not enabled" to the fatal error, everything else to a transient one.
fn jetstream_error(context: String, error: impl std::fmt::Display) -> BusError {
    let text = error.to_string();
    if text.contains("jetstream not enabled") || text.contains("10076") {
        BusError::JetStreamDisabled(text)
    } else {
        BusError::transient(context, text)
    }
}

async fn durable_consumer(
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
