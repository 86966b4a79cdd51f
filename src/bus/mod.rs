//! The JetStream adapter: connecting, the stream topology, and the publishing helpers. It
//! knows subjects and headers; it knows nothing of alarms beyond routing by UserID.

pub mod balance;
pub mod clock;
mod connect;
mod dead_letter;
pub mod envelope;
pub mod envelope_format;
mod nodes;
pub mod ownership;
mod partitions;
pub mod placement;
mod previous_release;
mod publish;
pub mod snapshots;
mod topology;

pub use connect::{
    connect, is_supported_server, jetstream, warn_if_single_replica_in_a_cluster,
    OLDEST_SUPPORTED_SERVER,
};
pub use dead_letter::{DeadLetter, DeadLetterHeaders};
pub use nodes::Nodes;
pub use ownership::{Cluster, Member};
pub use partitions::InputOrigin;
pub use publish::{
    publish_windowed, Outgoing, PartHeaders, DIGEST_ID_HEADER, DIGEST_PART_HEADER, HEADER_ROOM,
    PUBLISH_WINDOW,
};
pub use snapshots::Snapshots;
pub use topology::Topology;

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{Context, ErrorCode, Message};
use futures::StreamExt;

/// A stream by name, without asking the server anything yet.
pub async fn open_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<async_nats::jetstream::stream::Stream<()>, BusError> {
    js.get_stream_no_info(name)
        .await
        .map_err(|e| BusError::transient(format!("opening stream {name}"), e))
}

/// The named stream, or `None` when the server says it has none. Any other failure is an
/// error, transient unless JetStream is off: an outage must never be taken for an absent
/// stream, which would skip a migration or an upgrade step.
pub async fn lookup_stream(js: &Context, name: &str) -> Result<Option<Stream>, BusError> {
    // `get_stream_no_info` asks the server nothing: only a lookup tells.
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(error) => match error.kind() {
            GetStreamErrorKind::JetStream(ref e)
                if e.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(jetstream_error(format!("looking up stream {name}"), error)),
        },
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

/// The message stored at `sequence`, or `None` where the stream holds none (deleted or
/// purged: a gap, not a failure). Any other failure is an error: a timeout must never be
/// taken for a gap by a tool that deletes what it has read.
pub async fn message_at<I>(
    stream: &Stream<I>,
    sequence: u64,
) -> Result<Option<StreamMessage>, BusError> {
    match stream.get_raw_message(sequence).await {
        Ok(message) => Ok(Some(message)),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(error) => Err(BusError::transient(
            format!("reading stream message {sequence}"),
            error,
        )),
    }
}

/// A stream's current state (first and last sequence, messages, bytes) and creation time.
pub async fn stream_info(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<async_nats::jetstream::stream::Info, BusError> {
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|e| BusError::transient(format!("opening stream {name}"), e))?;
    stream
        .info()
        .await
        .cloned()
        .map_err(|e| BusError::transient(format!("reading stream {name}"), e))
}

/// Pulls up to `max` messages. Whatever is already queued comes back at once; when nothing
/// is, this waits server-side (up to `expires`) for the first message instead of polling,
/// then takes whatever else arrived meanwhile. So an idle consumer costs one request per
/// `expires`, and a lone message is handled without waiting for a batch to fill.
pub async fn fetch(
    consumer: &PullConsumer,
    max: usize,
    expires: Duration,
) -> Result<Vec<Message>, BusError> {
    fetch_limited(consumer, Limit::messages(max), expires).await
}

/// How much one fetch may take.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub messages: usize,
    /// At most this many bytes (0: no limit). It must exceed the largest message the stream
    /// can hold (the server's `max_payload` does), or that message would never be delivered.
    pub bytes: usize,
}

impl Limit {
    pub fn messages(messages: usize) -> Limit {
        Limit { messages, bytes: 0 }
    }

    /// A shard consumer's fetch: `messages`, and at most twice the server's `max_payload` in
    /// bytes (at least 1 MiB): any one message still fits, and a worker never buffers hundreds
    /// of envelopes for one batch.
    pub fn shard_fetch(messages: usize, max_payload: usize) -> Limit {
        Limit {
            messages,
            bytes: max_payload.saturating_mul(2).max(1024 * 1024),
        }
    }
}

/// [`fetch`] bounded by bytes too: a shard worker's envelopes each carry hundreds of events,
/// so a fetch of `worker_batch` of them would buffer far more than the batch needs.
pub async fn fetch_limited(
    consumer: &PullConsumer,
    limit: Limit,
    expires: Duration,
) -> Result<Vec<Message>, BusError> {
    let mut messages = pull_bounded(consumer, limit, expires, Wait::No).await?;
    if messages.is_empty() {
        // A batch of one cannot be left half-filled at expiry, which nats-server 2.9 can
        // fail to close (README, Pitfalls).
        let one = Limit {
            messages: 1,
            ..limit
        };
        messages = pull_bounded(consumer, one, expires, Wait::ForFirst).await?;
        if !messages.is_empty() && limit.messages > 1 {
            let rest = Limit {
                messages: limit.messages - 1,
                ..limit
            };
            messages.extend(pull_bounded(consumer, rest, expires, Wait::No).await?);
        }
    }
    Ok(messages)
}

/// The status nats-server closes a pull request with once its byte limit is used up.
const BATCH_COMPLETED: &str = "Batch Completed";

/// A byte-limited pull. nats-server 2.11 was seen (the nemesis test: a three-node cluster,
/// a node killed and restarted) closing every byte-limited request on a shard consumer at once
/// with `409 Batch Completed` and no message, for as long as the consumer lived and again after
/// it was created anew: the shard stalled for good. One message without a byte limit still
/// comes, so the shard progresses; the next fetch tries the limit again.
async fn pull_bounded(
    consumer: &PullConsumer,
    limit: Limit,
    expires: Duration,
    wait: Wait,
) -> Result<Vec<Message>, BusError> {
    match pull(consumer, limit, expires, wait).await {
        Err(error) if limit.bytes > 0 && error.to_string().contains(BATCH_COMPLETED) => {
            tracing::debug!(%error, "byte-limited pull closed empty; taking one message");
            pull(consumer, Limit::messages(1), expires, Wait::ForFirst).await
        }
        other => other,
    }
}

/// Takes whatever is queued, up to `max`, without waiting for more.
pub async fn fetch_queued(
    consumer: &PullConsumer,
    max: usize,
    expires: Duration,
) -> Result<Vec<Message>, BusError> {
    pull(consumer, Limit::messages(max), expires, Wait::No).await
}

enum Wait {
    /// Answer at once with whatever is queued.
    No,
    /// Wait up to the expiry for the batch.
    ForFirst,
}

/// How long past a pull's expiry the client gives up on an answer it never got (a pull lost
/// in a broker restart), as async-nats does for the pulls it times itself.
const LOST_PULL_GRACE: Duration = Duration::from_secs(5);

/// One pull request.
///
/// A `Wait::No` pull carries no expiry: nats-server treats a `no_wait` pull *with* an expiry
/// as a one-shot that waits for the next message, or the expiry, when nothing is queued. After
/// the single-message pull that waits for the first, the pull for "whatever else is queued"
/// then sat out the whole expiry (1 s) whenever nothing followed: every digest at low request
/// rates waited a second. Without an expiry the server answers at once (`404 No Messages`),
/// and this side bounds the wait itself.
async fn pull(
    consumer: &PullConsumer,
    limit: Limit,
    expires: Duration,
    wait: Wait,
) -> Result<Vec<Message>, BusError> {
    let mut messages = Vec::with_capacity(limit.messages);
    let answer = pull_answer(consumer, limit, expires, wait, &mut messages);
    match tokio::time::timeout(expires + LOST_PULL_GRACE, answer).await {
        Ok(result) => result.map(|()| messages),
        // The server never ended the pull: keep what came, as at an expiry; the next pull
        // asks again.
        Err(_) => Ok(messages),
    }
}

async fn pull_answer(
    consumer: &PullConsumer,
    limit: Limit,
    expires: Duration,
    wait: Wait,
    messages: &mut Vec<Message>,
) -> Result<(), BusError> {
    let max = limit.messages;
    let mut batch = match wait {
        Wait::No => {
            consumer
                .fetch()
                .max_messages(max)
                .max_bytes(limit.bytes)
                .messages()
                .await
        }
        Wait::ForFirst => {
            consumer
                .batch()
                .max_messages(max)
                .max_bytes(limit.bytes)
                .expires(expires)
                .messages()
                .await
        }
    }
    .map_err(|e| BusError::transient("requesting a batch", e))?;
    while let Some(item) = batch.next().await {
        match item {
            Ok(message) => messages.push(message),
            // Keep what arrived; the next pull reports a persistent problem.
            Err(error) if !messages.is_empty() => {
                tracing::debug!(%error, "batch ended early");
                break;
            }
            Err(error) => return Err(BusError::transient("receiving a batch", error)),
        }
    }
    Ok(())
}

/// Transient errors are retried with backoff; fatal ones stop the instance with a message
/// that says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(
        "the NATS server at {0} does not have JetStream enabled; start it with `-js` \
         (or a `jetstream {{}}` block in its config)"
    )]
    JetStreamDisabled(String),
    #[error("stream {stream} already exists but {problem}; fix the streams.* config or delete the stream")]
    StreamMismatch { stream: String, problem: String },
    /// The configuration cannot work against what the cluster recorded (or cannot be
    /// used to connect at all): never retried; the process exits 64.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot use the NATS credentials: {0}")]
    Credentials(String),
    /// The broker (or the client, on its behalf) refuses this message itself, e.g. it is larger
    /// than the server's `max_payload` or the stream's `max_msg_size`: publishing it again
    /// unchanged can never succeed. The caller must do something else with it.
    #[error("{context}: refused for good: {message}")]
    Refused { context: String, message: String },
    #[error("{context}: {source}")]
    Transient {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A write refused by the broker because a newer owner of the shard exists (its
    /// expected-sequence check failed): this process is no longer the shard's owner.
    #[error("{context}: refused, a newer owner of the shard exists")]
    Fenced { context: String },
}

impl BusError {
    /// A failure worth retrying, keeping its cause as the source.
    pub fn transient(
        context: impl Into<String>,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BusError {
        BusError::Transient {
            context: context.into(),
            source: error.into(),
        }
    }

    pub fn is_refused(&self) -> bool {
        matches!(self, BusError::Refused { .. })
    }

    pub fn is_fenced(&self) -> bool {
        matches!(self, BusError::Fenced { .. })
    }

    /// Fatal errors stop the instance. A fenced write is not one: it ends one shard's tenure.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, BusError::Transient { .. } | BusError::Fenced { .. })
    }
}

impl crate::retry::Retryable for BusError {
    fn is_fatal(&self) -> bool {
        BusError::is_fatal(self)
    }
}
