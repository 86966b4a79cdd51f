//! Why a shard worker is not consuming yet, said once per change (log) and always (`/readyz`).

use std::time::Duration;

use crate::bus::ownership::LeaseRecord;
use crate::bus::Member;

/// Why a shard worker is not consuming yet.
#[derive(PartialEq)]
pub(super) enum Waiting {
    /// The shard's state lives in another instance's data dir.
    NotHome(Member),
    /// Another process applies the shard (a previous run of this instance whose lease has
    /// not expired, or a copy of this data dir).
    LeaseHeld(LeaseRecord),
    /// The ownership buckets could not be read.
    Unavailable(String),
}

impl Waiting {
    /// Short, for `/readyz`.
    pub(super) fn reason(&self) -> String {
        match self {
            Waiting::NotHome(home) => format!("its home is {home}"),
            Waiting::LeaseHeld(lease) => {
                format!(
                    "lease held by process {} of {}",
                    lease.process, lease.holder
                )
            }
            Waiting::Unavailable(error) => format!("ownership unknown: {error}"),
        }
    }

    /// Long, with the fix, once per change.
    pub(super) fn log(&self, shard: u16, lease_period: Duration) {
        match self {
            Waiting::NotHome(home) => tracing::error!(
                shard,
                %home,
                "not consuming shard {shard}: its state lives in the data dir of {home}, not \
                 here, so applying it here would lose that state. Fix: remove {shard} from \
                 shards.owned on this instance, or move the shard here (stop both; \
                 `alarm-digest shard export --shard {shard}` there; `alarm-digest shard \
                 import` here; README, 'Rebalancing runbook')"
            ),
            Waiting::LeaseHeld(lease) => tracing::warn!(
                shard,
                holder = %lease.holder,
                process = %lease.process,
                "waiting for shard {shard}'s lease: another process holds it (a previous run \
                 of this instance, or a copy of this data dir); it expires {}s after its \
                 holder stops renewing",
                lease_period.as_secs()
            ),
            Waiting::Unavailable(error) => {
                tracing::warn!(shard, %error, "shard ownership unknown; retrying")
            }
        }
    }
}
