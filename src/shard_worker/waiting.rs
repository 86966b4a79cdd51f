//! Why a shard worker is not consuming yet, said once per change (log) and always (`/readyz`).

use std::time::Duration;

use crate::bus::ownership::LeaseRecord;
use crate::bus::Member;

/// Why a shard worker is not consuming yet.
#[derive(PartialEq)]
pub(super) enum Waiting {
    /// The shard is still in the previous release's WorkQueue stream and its state in the
    /// data dir of that release's home for it: only that instance can carry it over.
    PreviousReleaseHome(Member),
    /// Another process applies the shard (another instance that owns it too, a previous run
    /// of this instance whose lease has not expired, or a copy of this data dir).
    LeaseHeld(LeaseRecord),
    /// The ownership buckets could not be read.
    Unavailable(String),
    /// Nobody holds the shard yet, and this instance is only a standby for it by ordinal: the
    /// shard's first owner gets the first lease period after start to take it.
    PrimaryFirst,
}

impl Waiting {
    /// Short, for `/readyz`.
    pub(super) fn reason(&self) -> String {
        match self {
            Waiting::PreviousReleaseHome(home) => {
                format!("upgrading: waiting for the previous release's home {home}")
            }
            Waiting::LeaseHeld(lease) => {
                format!(
                    "lease held by process {} of {}",
                    lease.process, lease.holder
                )
            }
            Waiting::Unavailable(error) => format!("ownership unknown: {error}"),
            Waiting::PrimaryFirst => {
                "standby by ordinal: leaving the shard to its first owner for now".into()
            }
        }
    }

    /// Long, with the fix, once per change.
    pub(super) fn log(&self, shard: u16, lease_period: Duration) {
        match self {
            Waiting::PreviousReleaseHome(home) => tracing::warn!(
                shard,
                %home,
                "not taking shard {shard} yet: the previous release kept its state in the data \
                 dir of {home} and its messages in a WorkQueue stream; that instance, started \
                 on this release, drains them and writes the shard's first snapshot, and then \
                 any owner can take it (README, 'Upgrading')"
            ),
            Waiting::LeaseHeld(lease) => tracing::info!(
                shard,
                holder = %lease.holder,
                process = %lease.process,
                "standing by for shard {shard}: another process holds its lease (another \
                 owner, a previous run of this instance, or a copy of this data dir); a holder \
                 that stops releases it, one that dies loses it {}s after its last renewal",
                lease_period.as_secs()
            ),
            Waiting::Unavailable(error) => {
                tracing::warn!(shard, %error, "shard ownership unknown; retrying")
            }
            Waiting::PrimaryFirst => tracing::info!(
                shard,
                "shard {shard} has no holder yet; as its standby by ordinal, this instance \
                 takes it only if its first owner has not within {}s of this start",
                lease_period.as_secs()
            ),
        }
    }
}
