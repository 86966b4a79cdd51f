//! The product's rules, free of I/O.
//!
//! Nothing in here may import tokio, sled or async_nats (see ARCHITECTURE.md): the rules are
//! unit- and property-tested in microseconds, and every adapter converts its own types into
//! these ones at the edge.

mod alarm;
mod digest;

pub use alarm::{AlarmRecord, Observation, Status, StatusChange};
pub use digest::{take_digest, DigestEntry};

#[cfg(test)]
mod properties;
