//! Shard snapshots in JetStream: the durable copy of a shard's state that, with the shard
//! stream's tail after it, rebuilds the shard on any instance.
//!
//! One Limits stream (`streams.snapshot_stream`) holds, per shard, chunk messages on
//! `<snapshot_subject>.<shard>.chunk` and one manifest per snapshot on
//! `<snapshot_subject>.<shard>.manifest`. A snapshot's bytes are the shard export format
//! (`store/export.rs`: magic, format version, shard, shard count, entries, crc32); the
//! manifest (JSON) names the shard stream sequence the state covers, the chunks' stream
//! sequences, the length and a crc32 of the whole, and the manifest before it. The manifest is
//! written only after every chunk got its PubAck, so the newest manifest always points at a
//! complete snapshot; a damaged one is detected by the checksums and the reader falls back
//! along `previous`. Chunks are read with the stream's message-get API (no consumer, so no
//! consumer state to go wrong mid-restore), and forgotten by deleting them one by one.
//!
//! **Fencing.** Every manifest is published with `Nats-Expected-Last-Subject-Sequence`: the
//! sequence of the newest message on the shard's manifest subject as its writer knows it.
//! A new owner first [`Snapshots::fence`]s: it publishes a copy of the newest manifest (or,
//! with none yet, an empty marker) under that check, so the subject's last sequence moves
//! and a former owner's later manifest is refused by the broker, whatever its clock says.
//! Its chunks are then deleted: nothing points to them.

use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use std::collections::VecDeque;

use async_nats::jetstream::context::PublishAckFuture;
use futures::StreamExt;

use super::BusError;

/// The manifest's own format.
pub const MANIFEST_FORMAT: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u16,
    pub shard: u16,
    pub shard_count: u16,
    /// Every shard stream message at or below this sequence is in the snapshot.
    pub covers: u64,
    pub bytes: u64,
    /// crc32 of all the bytes (the export format also checks itself).
    pub crc32: u32,
    /// The snapshot stream sequences of the chunks, in order.
    pub chunks: Vec<u64>,
    /// Milliseconds since the epoch when it was taken.
    pub taken_at_ms: i64,
    /// The manifest of the snapshot before this one, while it is kept.
    pub previous: Option<u64>,
}

impl Manifest {
    /// The fence a new owner writes when the shard has no snapshot yet: no chunks, covering
    /// nothing. Readers take it for "no snapshot" (the previous release's too: a base covering
    /// 0 never beats its own data dir).
    pub fn marker(shard: u16, shard_count: u16) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            shard,
            shard_count,
            covers: 0,
            bytes: 0,
            crc32: 0,
            chunks: Vec::new(),
            taken_at_ms: 0,
            previous: None,
        }
    }

    pub fn is_marker(&self) -> bool {
        self.covers == 0 && self.chunks.is_empty()
    }
}

/// A manifest as stored: with its own sequence in the snapshot stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub sequence: u64,
    pub manifest: Manifest,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The snapshot cannot be used: a chunk is missing or its bytes do not check out.
    #[error("snapshot {sequence} of shard {shard} is damaged: {problem}")]
    Damaged {
        shard: u16,
        sequence: u64,
        problem: String,
    },
}

/// The snapshot stream of one cluster.
#[derive(Clone)]
pub struct Snapshots {
    js: Context,
    stream_name: String,
    subject: String,
}

impl Snapshots {
    pub fn new(js: Context, stream_name: String, subject: String) -> Snapshots {
        Snapshots {
            js,
            stream_name,
            subject,
        }
    }

    fn chunk_subject(&self, shard: u16) -> String {
        format!("{}.{shard}.chunk", self.subject)
    }

    fn manifest_subject(&self, shard: u16) -> String {
        format!("{}.{shard}.manifest", self.subject)
    }

    async fn stream(&self) -> Result<Stream<()>, BusError> {
        super::open_stream(&self.js, &self.stream_name).await
    }

    /// Stores one snapshot: its chunks first, pipelined (at most [`CHUNKS_IN_FLIGHT`]
    /// awaiting their PubAck, so a large shard is never whole in memory), the manifest last.
    ///
    /// `fence` is the last sequence of the shard's manifest subject as this owner knows it
    /// (from [`Snapshots::fence`] or its previous `put`): the broker refuses the manifest if
    /// anyone wrote one since, and the chunks are then deleted again ([`BusError::Fenced`]).
    pub async fn put<E: std::error::Error + Send + Sync + 'static>(
        &self,
        manifest: Manifest,
        chunks: impl futures::Stream<Item = Result<Vec<u8>, E>>,
        fence: u64,
    ) -> Result<Stored, BusError> {
        futures::pin_mut!(chunks);
        let shard = manifest.shard;
        let subject = self.chunk_subject(shard);
        let mut hasher = crc32fast::Hasher::new();
        let mut bytes = 0u64;
        let mut sequences = Vec::new();
        let mut in_flight = VecDeque::new();
        while let Some(chunk) = chunks.next().await {
            let chunk =
                chunk.map_err(|e| BusError::transient("reading the shard for a snapshot", e))?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            if in_flight.len() >= CHUNKS_IN_FLIGHT {
                if let Some(oldest) = in_flight.pop_front() {
                    sequences.push(pub_ack(oldest).await?);
                }
            }
            let ack = self
                .js
                .publish(subject.clone(), Bytes::from(chunk))
                .await
                .map_err(|e| BusError::transient("storing a snapshot chunk", e))?;
            in_flight.push_back(ack);
        }
        for ack in in_flight {
            sequences.push(pub_ack(ack).await?);
        }
        let manifest = Manifest {
            chunks: sequences,
            bytes,
            crc32: hasher.finalize(),
            ..manifest
        };
        let payload = serde_json::to_vec(&manifest)
            .map_err(|e| BusError::transient("encoding a snapshot manifest", e))?;
        match self.publish_fenced(shard, payload.into(), fence).await {
            Ok(sequence) => Ok(Stored { sequence, manifest }),
            Err(error) => {
                if error.is_fenced() {
                    // Nothing will ever point at them.
                    if let Err(error) = self.delete_messages(&manifest.chunks).await {
                        tracing::debug!(%error, "a refused snapshot's chunks stay");
                    }
                }
                Err(error)
            }
        }
    }

    /// Publishes on the shard's manifest subject only if its last message is still
    /// `expected` (0: none): the broker's compare-and-set.
    async fn publish_fenced(
        &self,
        shard: u16,
        payload: Bytes,
        expected: u64,
    ) -> Result<u64, BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        let context = "storing a snapshot manifest";
        let ack = self
            .js
            .publish_with_headers(self.manifest_subject(shard), headers, payload)
            .await
            .map_err(|e| BusError::transient(context, e))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                Err(BusError::Fenced {
                    context: context.into(),
                })
            }
            Err(error) => Err(BusError::transient(context, error)),
        }
    }

    /// Takes the shard's manifest subject for a new owner: republishes its newest manifest
    /// (or a marker, when there is none) on condition that it is still the newest, and
    /// deletes the original. Returns the new last sequence, which the owner's manifests then
    /// expect. Losing the race to another writer just reads again.
    pub async fn fence(&self, shard: u16, shard_count: u16) -> Result<u64, BusError> {
        let stream = self.stream().await?;
        let subject = self.manifest_subject(shard);
        for _ in 0..FENCE_ATTEMPTS {
            let (expected, payload) = match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(newest) => (newest.sequence, newest.payload),
                Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                    let marker = serde_json::to_vec(&Manifest::marker(shard, shard_count))
                        .map_err(|e| BusError::transient("encoding a snapshot marker", e))?;
                    (0, Bytes::from(marker))
                }
                Err(error) => {
                    return Err(BusError::transient("reading a snapshot manifest", error))
                }
            };
            match self.publish_fenced(shard, payload, expected).await {
                Ok(sequence) => {
                    if expected > 0 {
                        if let Err(error) = stream.delete_message(expected).await {
                            tracing::debug!(%error, "the fenced manifest's original stays");
                        }
                    }
                    return Ok(sequence);
                }
                Err(error) if error.is_fenced() => continue,
                Err(error) => return Err(error),
            }
        }
        Err(BusError::transient(
            "fencing the shard's snapshots",
            "another process kept writing manifests",
        ))
    }

    /// The newest snapshot's manifest of the shard, and those before it that are still kept
    /// (newest first, at most `max`). A manifest that cannot be read ends the chain.
    pub async fn chain(&self, shard: u16, max: usize) -> Result<Vec<Stored>, BusError> {
        let stream = self.stream().await?;
        let newest = match stream
            .get_last_raw_message_by_subject(&self.manifest_subject(shard))
            .await
        {
            Ok(message) => message,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Vec::new())
            }
            // No snapshot stream (deleted by `shard recount`; created again at start): none.
            Err(error) if error.to_string().contains("10059") => return Ok(Vec::new()),
            Err(error) => return Err(BusError::transient("reading a snapshot manifest", error)),
        };
        let mut chain = Vec::new();
        let mut next = decode_manifest(newest.sequence, &newest.payload)
            .filter(|stored| !stored.manifest.is_marker());
        while let Some(stored) = next.take() {
            let previous = stored.manifest.previous;
            chain.push(stored);
            if chain.len() >= max {
                break;
            }
            if let Some(sequence) = previous {
                next = super::message_at(&stream, sequence)
                    .await?
                    .and_then(|message| decode_manifest(message.sequence, &message.payload));
            }
        }
        Ok(chain)
    }

    /// A snapshot's bytes as a stream of chunks (the next few fetched while one is used),
    /// checked against the manifest at the end: a last `Err` item says the whole did not check
    /// out, so a caller must not trust what it did with the chunks before the stream ended
    /// without one.
    pub fn chunks(
        &self,
        stored: &Stored,
    ) -> impl futures::Stream<Item = Result<Bytes, SnapshotError>> + Send + 'static {
        let (js, name) = (self.js.clone(), self.stream_name.clone());
        let manifest = stored.manifest.clone();
        let damaged = {
            let (shard, sequence) = (manifest.shard, stored.sequence);
            move |problem: String| SnapshotError::Damaged {
                shard,
                sequence,
                problem,
            }
        };
        let fetches = futures::stream::iter(manifest.chunks.clone())
            .map(move |sequence| {
                let (js, name) = (js.clone(), name.clone());
                async move {
                    let stream = super::open_stream(&js, &name).await?;
                    match super::message_at(&stream, sequence).await? {
                        Some(message) => Ok(message.payload),
                        None => Err(damaged(format!("chunk {sequence} is missing"))),
                    }
                }
            })
            .buffered(CHUNKS_IN_FLIGHT);
        let start = (Box::pin(fetches), crc32fast::Hasher::new(), 0u64, false);
        futures::stream::unfold(start, move |(mut fetches, mut hasher, mut bytes, done)| {
            let manifest = manifest.clone();
            async move {
                if done {
                    return None;
                }
                let item = match fetches.next().await {
                    Some(Ok(chunk)) => {
                        hasher.update(&chunk);
                        bytes += chunk.len() as u64;
                        return Some((Ok(chunk), (fetches, hasher, bytes, false)));
                    }
                    Some(Err(error)) => Err(error),
                    None if bytes != manifest.bytes => Err(damaged(format!(
                        "{bytes} bytes, the manifest says {}",
                        manifest.bytes
                    ))),
                    None if hasher.clone().finalize() != manifest.crc32 => {
                        Err(damaged("checksum mismatch".into()))
                    }
                    None => return None,
                };
                Some((item, (fetches, hasher, bytes, true)))
            }
        })
    }

    /// Deletes a snapshot: its chunks, then its manifest. Missing pieces are fine (a delete
    /// repeated after a crash).
    pub async fn forget(&self, stored: &Stored) -> Result<(), BusError> {
        self.delete_messages(&stored.manifest.chunks).await?;
        self.delete_messages(&[stored.sequence]).await
    }

    /// Deletes messages of the snapshot stream; missing ones are fine.
    async fn delete_messages(&self, sequences: &[u64]) -> Result<(), BusError> {
        let stream = self.stream().await?;
        for sequence in sequences {
            if let Err(error) = stream.delete_message(*sequence).await {
                let text = error.to_string();
                if !text.contains("no message found") && !text.contains("10037") {
                    return Err(BusError::transient("deleting an old snapshot", text));
                }
            }
        }
        Ok(())
    }
}

/// Tries at taking the manifest subject while other writers race for it.
const FENCE_ATTEMPTS: usize = 10;

/// Snapshot chunks awaiting their PubAck at once.
pub const CHUNKS_IN_FLIGHT: usize = 8;

async fn pub_ack(ack: PublishAckFuture) -> Result<u64, BusError> {
    ack.await
        .map(|ack| ack.sequence)
        .map_err(|e| BusError::transient("storing a snapshot", e))
}

/// A manifest the service cannot read is treated as absent (with a warning): the chain ends
/// there and the restore uses what it has.
fn decode_manifest(sequence: u64, payload: &[u8]) -> Option<Stored> {
    match serde_json::from_slice::<Manifest>(payload) {
        Ok(manifest) if manifest.format == MANIFEST_FORMAT => Some(Stored { sequence, manifest }),
        Ok(manifest) => {
            tracing::warn!(
                sequence,
                format = manifest.format,
                "snapshot manifest of an unknown format; ignored"
            );
            None
        }
        Err(error) => {
            tracing::warn!(sequence, %error, "unreadable snapshot manifest; ignored");
            None
        }
    }
}
