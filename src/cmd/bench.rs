//! `alarm-digest bench`: end-to-end load against a running deployment (see README,
//! Performance). It talks to the broker only; RSS and disk are read when the service is local.
//! The run itself is the load tool's (`load/bench.rs`).

use std::process::ExitCode;

use crate::config::Config;
pub use crate::load::bench::BenchArgs;

pub async fn run(config: Config, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    crate::load::bench::run(config, args).await
}
