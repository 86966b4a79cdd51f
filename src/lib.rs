//! alarm-digest: per-user alarm digests from NATS JetStream, stored in sled.
//!
//! See ARCHITECTURE.md for the map; `domain` holds the rules and imports no I/O crate.

pub mod balancer;
pub mod bus;
pub mod cli;
pub mod clock_watch;
pub mod cmd;
pub mod config;
pub mod consumer_stats;
pub mod domain;
pub mod errors;
pub mod failpoint;
pub mod http;
pub mod load;
pub mod metrics;
pub mod notify;
pub mod readiness;
pub mod retry;
pub mod router;
pub mod service;
pub mod shard_worker;
pub mod shared;
pub mod store;
pub mod wire;
