//! `alarm-digest inspect user <UserID>`: asks the running instance over its local HTTP
//! endpoint, or, when none answers, reads the data dir of the stopped instance directly.

use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::bus::Topology;
use crate::config::Config;
use crate::http;
use crate::store::Store;
use crate::wire::UserReport;

pub async fn run(config: Config, user_id: &str) -> anyhow::Result<ExitCode> {
    let report = match from_running_instance(config.http.inspect_addr(), user_id).await {
        Ok(Some(report)) => report,
        Ok(None) => from_data_dir(&config, user_id)?,
        Err(error) => return Err(error),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

fn from_data_dir(config: &Config, user_id: &str) -> anyhow::Result<UserReport> {
    let store = Store::open(&config.storage.path, config.storage.cache_capacity_mb)
        .context("no instance answered on its inspect address, so reading the data dir directly")?;
    store.check_shard_count(config.shards.count)?;
    let shard = Topology::new(config.streams.clone(), config.shards.count).shard_of(user_id);
    let stored = store.inspect_user(shard, user_id)?;
    Ok(UserReport::new(
        user_id,
        shard,
        &stored.alarms,
        stored.pending_digests,
    ))
}

/// `Ok(None)` when nothing listens there.
async fn from_running_instance(listen: &str, user_id: &str) -> anyhow::Result<Option<UserReport>> {
    let path = format!("/inspect/user?id={}", http::percent_encode(user_id));
    let (status, body) = match http::get(listen, &path).await {
        Ok(answer) => answer,
        Err(http::GetError::Refused(_)) => return Ok(None),
        Err(error) => return Err(error).context(format!("asking the instance at {listen}")),
    };
    if status != 200 {
        bail!(
            "the instance at {listen} answered {status}: {}",
            body.trim()
        );
    }
    Ok(Some(
        serde_json::from_str(&body).context("reading the instance's answer")?,
    ))
}
