//! One file per subcommand. Each takes a validated `Config` and returns the exit code.

pub mod inspect;
pub mod run;
pub mod setup;
