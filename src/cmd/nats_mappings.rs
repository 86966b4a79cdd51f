//! `alarm-digest nats-mappings`: the nats-server configuration that spreads the input
//! subjects over `streams.input_partitions` partitions, printed for the servers' config.

use std::process::ExitCode;

use crate::bus::Topology;
use crate::config::Config;

#[derive(Debug, Clone, clap::Args)]
pub struct NatsMappingsArgs {
    /// Print `nsc` commands adding the mapping to this account (operator/JWT setups) instead
    /// of a server config block.
    #[arg(long, value_name = "ACCOUNT")]
    pub nsc_account: Option<String>,
}

pub fn run(config: &Config, args: &NatsMappingsArgs) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(config.streams.clone(), config.shards.count);
    match &args.nsc_account {
        Some(account) => print!("{}", topology.nsc_mappings(account)),
        None => print!("{}", topology.nats_mappings()),
    }
    Ok(ExitCode::SUCCESS)
}
