//! One fetched batch, applied atomically: every message (an envelope of status changes, a
//! digest request, or a single status change in the previous release's format) into one
//! [`crate::store::ShardWrite`] overlay → one atomic sled batch → one group flush → acks, dead
//! letters and digests.

use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;

use super::answer::{answer, DigestOptions, DigestOutcome};
use super::{ack, Continuity, ShardWorker};
use crate::bus::envelope::{self, Content, Entry, Format, FRAME_HEADER};
use crate::bus::{self, DeadLetter};
use crate::domain::StatusChange;
use crate::store::{Applied, OutboxEntry, ShardWrite, StoreError};
use crate::wire::{self, Input, InputKind, Rejection};

/// Redelivery delay for a batch the store could not take.
pub(super) const STORE_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Which log a batch comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// The shard log: applied in sequence order, the sequence reached recorded with the state.
    ShardLog,
    /// The previous release's WorkQueue shard stream, drained at the upgrade: its sequences
    /// are not the shard log's, so they are neither tracked nor checked for gaps.
    PreviousRelease,
}

/// What to do with one message of a batch once the batch is durable.
enum Disposition {
    /// Applied (or a duplicate): ack after the flush.
    Ack,
    /// A digest was queued: ack after its PubAck.
    AfterDigest,
    /// These inputs (the message itself, or entries of its envelope) are dead-lettered; ack
    /// the message once every record is stored.
    DeadLetters(Vec<Rejected>),
}

/// One input that is not applied, with where it came from for its dead-letter headers.
struct Rejected {
    code: &'static str,
    error: String,
    subject: String,
    /// The stream and sequence the input is known by: the input stream's for an envelope
    /// entry, the shard stream's for a single message.
    stream: String,
    sequence: u64,
    payload: Bytes,
}

/// One input to apply: a single message, or one entry of an envelope.
struct Item<'a> {
    kind: Option<InputKind>,
    subject: &'a str,
    /// The input's JSON, or the change the router validated from it.
    content: &'a Content<'a>,
    stream: &'a str,
    sequence: u64,
}

/// What applying one item did.
enum Outcome {
    Done,
    Digest,
    Rejected(Rejected),
}

impl ShardWorker {
    /// Applies one batch. An `Err` means nothing of it was acked; JetStream redelivers it.
    ///
    /// The shard log is applied in sequence order: a message at or below the sequence the
    /// state reflects is acked unapplied (a redelivery), and one past the next expected
    /// sequence ends the batch there ([`Continuity::Gap`]). The sequence reached is written
    /// in the same atomic batch as what it covers.
    pub(super) async fn process(
        &mut self,
        mut messages: Vec<Message>,
        source: Source,
    ) -> Result<Continuity, StoreError> {
        let started = Instant::now();
        let shared = self.shared.clone();
        let shard = self.store.shard();
        let sequence_of = |message: &Message| shared.note_delivery(message);
        let staged = match self.stage(&messages, sequence_of, source) {
            Ok(staged) => staged,
            Err(error) => return Err(self.nak_all(messages, error).await),
        };
        if let Some(gap) = staged.gap_at {
            // Neither applied nor acked: the consumer is created again at the first message
            // not applied.
            messages.truncate(gap);
        }
        if let Err(error) = self.flusher.flush().await {
            return Err(self.nak_all(messages, error).await);
        }
        self.sweep.note_newest_seen(staged.newest_seen);
        self.snapshots.note_applied(staged.tail_bytes);
        staged.counts.record(&shared.metrics);
        let gap_at = staged.gap_at;
        let dispositions = staged.dispositions;

        // Every record with the index of the message it belongs to.
        let mut records = Vec::new();
        let mut answered = Vec::new();
        let mut waiting: Vec<(Message, usize)> = Vec::new();
        for (message, disposition) in messages.into_iter().zip(dispositions) {
            match disposition {
                Disposition::Ack => ack(&message).await,
                Disposition::AfterDigest => answered.push(message),
                Disposition::DeadLetters(rejected) => {
                    let index = waiting.len();
                    for one in &rejected {
                        let record = DeadLetter {
                            reason: one.code,
                            error: &one.error,
                            original_subject: &one.subject,
                            stream: &one.stream,
                            stream_sequence: one.sequence,
                        };
                        records.push((shared.dead_letter(&record, one.payload.clone()), index));
                    }
                    waiting.push((message, rejected.len()));
                }
            }
        }
        self.outbox.add(staged.queued, answered, &shared);
        if let Err(error) = self.outbox.publish(&shared, &self.store).await {
            // The digests are durable in the outbox; the loop retries before taking more.
            tracing::warn!(shard, %error, "digest publish failed; will retry");
        }
        let (outgoing, owners): (Vec<_>, Vec<_>) = records.into_iter().unzip();
        let outcomes = bus::publish_windowed(&shared.js, outgoing).await;
        let mut failed = vec![false; waiting.len()];
        for (owner, outcome) in owners.into_iter().zip(outcomes) {
            if let Err(error) = outcome {
                tracing::warn!(shard, %error, "dead letter not stored; will be redelivered");
                failed[owner] = true;
            }
        }
        // A message is acked once all its records are stored; else it comes back whole
        // (applying it again is harmless, and each record's Msg-Id drops a second copy).
        for ((message, _), failed) in waiting.into_iter().zip(failed) {
            if failed {
                let _ = message
                    .ack_with(AckKind::Nak(Some(STORE_RETRY_DELAY)))
                    .await;
            } else {
                ack(&message).await;
            }
        }
        shared.metrics.observe_batch(started.elapsed());
        Ok(if gap_at.is_some() {
            Continuity::Gap
        } else {
            Continuity::Contiguous
        })
    }

    /// Applies messages in shard log order into one atomic sled batch, committed (not
    /// flushed), with the sequence it reaches. Shared by the holder ([`Self::process`]) and a
    /// standby (`standby.rs`), so both build the same state, outbox sequences included.
    pub(super) fn stage(
        &mut self,
        messages: &[Message],
        sequence_of: impl Fn(&Message) -> u64,
        source: Source,
    ) -> Result<Staged, StoreError> {
        let shared = self.shared.clone();
        let shard = self.store.shard();
        let options = DigestOptions {
            skip_empty: shared.config.digest.skip_empty,
            max_part_bytes: self.outbox.part_limit(&shared),
            written_at: chrono::Utc::now(),
        };
        let shard_stream = shared.topology.shard_stream(shard);
        let mut dispositions = Vec::with_capacity(messages.len());
        let mut counts = BatchCounts::default();
        let mut newest_seen = self.sweep.newest_seen();
        let tracked = source == Source::ShardLog;
        let mut next = self.store.applied() + 1;
        let mut gap_at = None;
        let mut tail_bytes = 0;
        let mut write = self.store.begin();
        for (index, message) in messages.iter().enumerate() {
            let sequence = sequence_of(message);
            if tracked {
                if sequence != 0 && sequence < next {
                    counts.covered += 1;
                    dispositions.push(Disposition::Ack);
                    continue;
                }
                if sequence != next {
                    gap_at = Some(index);
                    break;
                }
                next += 1;
                tail_bytes += message.payload.len() as u64;
            }
            let mut batch = Apply {
                worker: &shared,
                shard,
                write: &mut write,
                counts: &mut counts,
                newest_seen: &mut newest_seen,
                options: &options,
            };
            let disposition = batch.message(message, sequence, &shard_stream)?;
            dispositions.push(disposition);
        }
        if tracked {
            write.applied_through(next - 1);
        }
        if gap_at.is_some() {
            tracing::info!(
                shard,
                expected = next,
                "the shard log arrived out of order; taking it again from the first message \
                 not applied"
            );
        }
        let queued = write.commit()?;
        Ok(Staged {
            dispositions,
            counts,
            newest_seen,
            gap_at,
            tail_bytes,
            queued,
        })
    }

    async fn nak_all(&self, messages: Vec<Message>, error: StoreError) -> StoreError {
        for message in messages {
            let _ = message
                .ack_with(AckKind::Nak(Some(STORE_RETRY_DELAY)))
                .await;
        }
        error
    }
}

/// A batch applied to the store: committed, not yet flushed.
pub(super) struct Staged {
    dispositions: Vec<Disposition>,
    counts: BatchCounts,
    newest_seen: Option<chrono::DateTime<chrono::Utc>>,
    /// Where the shard log skipped ahead: nothing from this index on was applied.
    pub(super) gap_at: Option<usize>,
    tail_bytes: u64,
    queued: Vec<(u64, OutboxEntry)>,
}

/// What one message of a batch needs to be applied.
struct Apply<'b, 's> {
    worker: &'b crate::shared::Shared,
    shard: u16,
    write: &'b mut ShardWrite<'s>,
    counts: &'b mut BatchCounts,
    newest_seen: &'b mut Option<chrono::DateTime<chrono::Utc>>,
    options: &'b DigestOptions,
}

impl Apply<'_, '_> {
    /// One message of the batch: an envelope (each entry applied or rejected on its own), a
    /// digest request, or a single status change as the release before envelopes routed it.
    fn message(
        &mut self,
        message: &Message,
        sequence: u64,
        shard_stream: &str,
    ) -> Result<Disposition, StoreError> {
        let framed = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(FRAME_HEADER))
            .and_then(|frame| Format::from_header(frame.as_str()));
        if framed.is_none() {
            // A digest request, or a single status change as the release before
            // envelopes routed it.
            let item = Item {
                kind: self
                    .worker
                    .topology
                    .shard_kind(self.shard, &message.subject),
                subject: &message.subject,
                content: &Content::Json(&message.payload),
                stream: shard_stream,
                sequence,
            };
            return Ok(match self.json(&item, &message.payload)? {
                Outcome::Done => Disposition::Ack,
                Outcome::Digest => Disposition::AfterDigest,
                Outcome::Rejected(one) => Disposition::DeadLetters(vec![one]),
            });
        }
        Ok(match envelope::decode(&message.payload) {
            Ok(entries) => self.envelope(&entries)?,
            Err(error) => Disposition::DeadLetters(vec![Rejected {
                code: "bad_envelope",
                error: error.to_string(),
                subject: message.subject.to_string(),
                stream: shard_stream.to_string(),
                sequence,
                payload: message.payload.clone(),
            }]),
        })
    }

    /// An envelope's entries, each applied or rejected on its own. Rejected entries are
    /// known by their input stream and sequence.
    fn envelope(&mut self, entries: &[Entry<'_>]) -> Result<Disposition, StoreError> {
        let topology = &self.worker.topology;
        let mut rejected = Vec::new();
        for entry in entries {
            let origin = topology.input_origin(entry.subject);
            // Borrowed from the topology: naming the stream allocates nothing.
            let stream = topology.partition_stream_name(origin.map_or(0, |o| o.partition));
            let item = Item {
                kind: origin.map(|o| o.kind),
                subject: entry.subject,
                content: &entry.content,
                stream: &stream,
                sequence: entry.input_sequence,
            };
            let outcome = match &entry.content {
                Content::Json(payload) => self.json_entry(&item, payload)?,
                // Validated by the router: applied without parsing anything again.
                Content::Change(change) => self.change(&item, change)?,
            };
            match outcome {
                Outcome::Done => {}
                Outcome::Rejected(one) => rejected.push(one),
                // An entry never answers a request.
                Outcome::Digest => {}
            }
        }
        Ok(if rejected.is_empty() {
            Disposition::Ack
        } else {
            Disposition::DeadLetters(rejected)
        })
    }

    /// An envelope-1 entry: a status change's JSON. Digest requests travel as single
    /// messages (their answered-marker is their shard stream sequence), so one inside an
    /// envelope is refused.
    fn json_entry(&mut self, item: &Item<'_>, payload: &[u8]) -> Result<Outcome, StoreError> {
        if item.kind == Some(InputKind::DigestRequest) {
            return Ok(self.reject(
                item,
                "request_in_envelope",
                "digest requests travel as single messages, never inside an envelope".into(),
            ));
        }
        self.json(item, payload)
    }

    /// An input as JSON: decoded and validated here, then applied.
    fn json(&mut self, item: &Item<'_>, payload: &[u8]) -> Result<Outcome, StoreError> {
        let limits = &self.worker.config.limits;
        let decoded = match item.kind {
            Some(kind) => wire::decode(kind, payload, limits.max_payload_bytes),
            None => Err(Rejection::UnknownSubject(item.subject.to_string())),
        };
        match decoded {
            Err(rejection) => Ok(self.reject(item, rejection.code(), rejection.to_string())),
            Ok(Input::StatusChange(change)) => self.change(item, &change),
            Ok(Input::DigestRequest(request)) => self.request(item, &request.user_id),
        }
    }

    /// A user's input on the wrong shard is refused: applying it here would split the
    /// user's state over two shards.
    fn misrouted(&self, item: &Item<'_>, user_id: &str) -> Option<Outcome> {
        let belongs = self.worker.topology.shard_of(user_id);
        (belongs != self.shard).then(|| {
            let error = format!("user belongs to shard {belongs}, not {}", self.shard);
            self.reject(item, "misrouted", error)
        })
    }

    fn change(&mut self, item: &Item<'_>, change: &StatusChange) -> Result<Outcome, StoreError> {
        if let Some(refused) = self.misrouted(item, &change.user_id) {
            return Ok(refused);
        }
        let max_alarms = self.worker.config.limits.max_alarms_per_user;
        let at = change.observation.changed_at;
        if self.newest_seen.is_none_or(|seen| at > seen) {
            *self.newest_seen = Some(at);
        }
        match self.write.apply(change, max_alarms) {
            Ok(Applied::Changed) => {
                self.counts.applied += 1;
                Ok(Outcome::Done)
            }
            Ok(Applied::Unchanged) => {
                self.counts.unchanged += 1;
                Ok(Outcome::Done)
            }
            Ok(Applied::TooManyAlarms) => {
                let error = format!(
                    "the user already has limits.max_alarms_per_user = {max_alarms} alarms"
                );
                Ok(self.reject(item, "too_many_alarms", error))
            }
            Err(error) => self.unreadable_or_fail(item, error),
        }
    }

    fn request(&mut self, item: &Item<'_>, user_id: &str) -> Result<Outcome, StoreError> {
        if let Some(refused) = self.misrouted(item, user_id) {
            return Ok(refused);
        }
        match answer(self.write, user_id, item.sequence, self.options) {
            Ok(DigestOutcome::Queued { parts, .. }) => {
                self.counts.requests += 1;
                if parts > 1 {
                    self.counts.split_digests += 1;
                }
                Ok(Outcome::Digest)
            }
            Ok(DigestOutcome::SkippedEmpty) => {
                self.counts.requests += 1;
                self.counts.skipped_empty += 1;
                Ok(Outcome::Done)
            }
            Ok(DigestOutcome::AlreadyAnswered) => {
                self.counts.duplicates += 1;
                Ok(Outcome::Done)
            }
            Err(error) => self.unreadable_or_fail(item, error),
        }
    }

    fn reject(&self, item: &Item<'_>, code: &'static str, error: String) -> Outcome {
        Outcome::Rejected(Rejected {
            code,
            error,
            subject: item.subject.to_string(),
            stream: item.stream.to_string(),
            sequence: item.sequence,
            payload: item.content.to_json(),
        })
    }

    /// A record that cannot be decoded will never decode: dead-letter the input instead of
    /// failing the batch forever. Any other store error fails the batch.
    fn unreadable_or_fail(
        &self,
        item: &Item<'_>,
        error: StoreError,
    ) -> Result<Outcome, StoreError> {
        match error {
            StoreError::Codec { .. } => {
                Ok(self.reject(item, "unreadable_state", error.to_string()))
            }
            other => Err(other),
        }
    }
}

/// What one batch did, added to the metrics only once the batch is durable (a failed batch
/// is redelivered and would otherwise be counted twice).
#[derive(Default)]
struct BatchCounts {
    applied: u64,
    unchanged: u64,
    requests: u64,
    skipped_empty: u64,
    duplicates: u64,
    split_digests: u64,
    /// Redelivered shard log messages the state already reflects.
    covered: u64,
}

impl BatchCounts {
    fn record(&self, metrics: &crate::metrics::Metrics) {
        metrics.events_applied.inc_by(self.applied);
        metrics.events_unchanged.inc_by(self.unchanged);
        metrics.digest_requests.inc_by(self.requests);
        metrics.digests_skipped_empty.inc_by(self.skipped_empty);
        metrics.duplicate_requests.inc_by(self.duplicates);
        metrics.redeliveries_covered.inc_by(self.covered);
        metrics.digests_split.inc_by(self.split_digests);
    }
}
