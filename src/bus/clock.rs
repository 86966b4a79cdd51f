//! The broker's clock, read without trusting ours: a stream-info request answers with the
//! time the server gathered it (`ts`, nats-server 2.10+), which, taken halfway through the
//! round trip, says how far this machine's clock is from the broker's.

use async_nats::jetstream::response::Response;
use async_nats::jetstream::Context;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::BusError;

/// One reading of the broker's clock against ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerClock {
    /// The server's time when it answered.
    pub broker_now: DateTime<Utc>,
    /// Our clock minus the broker's, read halfway through the round trip: negative when this
    /// machine's clock is behind. Accurate to half the round trip.
    pub skew: chrono::Duration,
}

#[derive(Deserialize)]
struct Stamped {
    ts: DateTime<Utc>,
}

/// Reads the broker's time through `stream`'s info (any stream of the service will do).
pub async fn read(js: &Context, stream: &str) -> Result<BrokerClock, BusError> {
    let context = format!("reading the broker's time (stream {stream})");
    let sent = Utc::now();
    let response: Response<Stamped> = js
        .request(format!("STREAM.INFO.{stream}"), &serde_json::json!({}))
        .await
        .map_err(|e| BusError::transient(context.clone(), e))?;
    let received = Utc::now();
    let broker_now = match response {
        Response::Ok(Stamped { ts }) => ts,
        Response::Err { error } => return Err(BusError::transient(context, error)),
    };
    let local_mid = sent + (received - sent) / 2;
    Ok(BrokerClock {
        broker_now,
        skew: local_mid - broker_now,
    })
}

/// When JetStream stored a message (its leader's clock), as a chrono instant.
pub fn stored_at(message: &async_nats::jetstream::Message) -> Option<DateTime<Utc>> {
    let info = message.info().ok()?;
    let nanos = i64::try_from(info.published.unix_timestamp_nanos()).ok()?;
    Some(DateTime::from_timestamp_nanos(nanos))
}
