//! Which envelope format routers write: the cluster's record `envelope.format` in the shards
//! bucket (a JSON number; no record means 1).
//!
//! Instances of the release before read envelope-1 alone: one of them would dead-letter an
//! envelope-2 as malformed. So a cluster they built keeps envelope-1 while instances of both
//! releases may run (a rolling upgrade restarts them in any order); once every instance runs
//! this release, `alarm-digest streams envelopes --format 2` records 2 and every router
//! writes it within [`crate::router`]'s look-again period. A cluster this build creates
//! records 2 from the start. Readers of this build take both formats, whatever is recorded.

use async_nats::jetstream::kv::{self, CreateErrorKind};

use super::envelope::Format;
use super::ownership::{to_json, Cluster};
use super::BusError;

const FORMAT_KEY: &str = "envelope.format";

/// What the cluster records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The format routers write.
    pub format: Format,
    /// Whether a record exists (none: a cluster the release before built, writing 1).
    pub explicit: bool,
}

impl Cluster {
    /// The format routers write now. A number this build does not know (recorded by a newer
    /// release) reads as the newest it knows, which that release still reads.
    pub async fn envelope_format(&self) -> Result<Recorded, BusError> {
        let entry = self
            .shards_bucket()
            .entry(FORMAT_KEY)
            .await
            .map_err(|e| BusError::transient("reading the cluster's envelope format", e))?;
        Ok(match entry.filter(|e| e.operation == kv::Operation::Put) {
            None => Recorded {
                format: Format::V1,
                explicit: false,
            },
            Some(entry) => Recorded {
                format: serde_json::from_slice::<u8>(&entry.value)
                    .ok()
                    .and_then(Format::from_number)
                    .unwrap_or(Format::NEWEST),
                explicit: true,
            },
        })
    }

    /// Records the newest format unless a format is recorded: for a cluster this process
    /// just created (it recorded the shard count), where no instance of the release before
    /// can be running.
    pub(super) async fn record_newest_envelope_format(&self) -> Result<(), BusError> {
        let value = to_json(&Format::NEWEST.number());
        match self.shards_bucket().create(FORMAT_KEY, value).await {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == CreateErrorKind::AlreadyExists => Ok(()),
            Err(error) => Err(BusError::transient(
                "recording the cluster's envelope format",
                error,
            )),
        }
    }

    /// Records `to` (for `streams envelopes --format`); returns what was recorded before.
    pub async fn set_envelope_format(&self, to: Format) -> Result<Recorded, BusError> {
        let before = self.envelope_format().await?;
        self.shards_bucket()
            .put(FORMAT_KEY, to_json(&to.number()))
            .await
            .map_err(|e| BusError::transient("recording the cluster's envelope format", e))?;
        Ok(before)
    }
}
