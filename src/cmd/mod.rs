//! One file per subcommand. Each takes a validated `Config` and returns the exit code.

pub mod bench;
pub mod dlq;
pub mod inspect;
pub mod nats_mappings;
pub mod partitions;
pub mod publish;
pub mod run;
pub mod setup;
pub mod shard;
pub mod streams;
pub mod watch;
