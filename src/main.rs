//! The `alarm-digest` binary: parse arguments, load and validate config, dispatch.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use alarm_digest::cli::{Cli, Command, InspectTarget};
use alarm_digest::cmd;
use alarm_digest::config::{Config, LogConfig};
use alarm_digest::store::StoreError;

/// sysexits' EX_USAGE: the configuration is wrong.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("alarm-digest: bad configuration: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_logging(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("alarm-digest: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Run => cmd::run::run(config).await,
            Command::Setup => cmd::setup::run(config).await,
            Command::Inspect {
                target: InspectTarget::User { user_id },
            } => cmd::inspect::run(config, user_id).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "alarm-digest failed");
            eprintln!("alarm-digest: {error:#}");
            if matches!(
                error.downcast_ref(),
                Some(StoreError::ShardCountMismatch { .. })
            ) {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
