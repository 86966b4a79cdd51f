//! The `alarm-digest` binary: parse arguments, load and validate config, dispatch.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use alarm_digest::cli::{Cli, Command, InspectTarget};
use alarm_digest::cmd;
use alarm_digest::config::{Config, ConfigError, LogConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("alarm-digest: bad configuration: {error}");
            return ExitCode::from(ConfigError::EXIT_CODE);
        }
    };
    // One-shot commands print their result on stdout; keep their log to warnings.
    let default_filter = match cli.command {
        Command::Run | Command::Bench(_) => config.log.filter.as_str(),
        _ => "warn",
    };
    init_logging(&config.log, default_filter);
    if let Some(path) = Config::world_readable_secret_file(cli.config.as_deref()) {
        tracing::warn!(
            message = "the config file holds a secret and is readable by every user; chmod o-r it",
            path = %path.display(),
        );
    }
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
            Command::Publish { subject, payload } => {
                cmd::publish::run(config, subject, payload).await
            }
            Command::Watch => cmd::watch::run(config).await,
            Command::Bench(args) => cmd::bench::run(config, args).await,
            Command::Dlq { action } => cmd::dlq::run(config, action).await,
            Command::Shard { action } => cmd::shard::run(config, action).await,
            Command::NatsMappings(args) => cmd::nats_mappings::run(&config, args),
            Command::Partitions { action } => cmd::partitions::run(config, action).await,
            Command::Streams { action } => cmd::streams::run(config, action).await,
        }
    });
    // Blocking threads still inside a store call (a failed disk) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(3));
    match result {
        Ok(code) => code,
        Err(error) => {
            let described = alarm_digest::errors::describe(&error);
            tracing::error!(error = %described, "alarm-digest failed");
            eprintln!("alarm-digest: {described}");
            // A configuration that cannot work is a ConfigError wherever it was found (an
            // adapter carries it as its source): exit 64, like a bad config file.
            let bad_config = error.chain().any(|cause| cause.is::<ConfigError>());
            if bad_config {
                ExitCode::from(ConfigError::EXIT_CODE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(log: &LogConfig, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
