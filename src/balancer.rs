//! Keeps the broker nodes sharing the work: each round reads who leads the service's
//! streams (`bus::balance::survey`), publishes it as metrics, and on replicated streams asks
//! the broker to move up to [`MOVES_PER_ROUND`] leaders (and their durable consumers'
//! leaders) to the placement plan (`bus/placement.rs`). Every instance runs it; the plan is
//! the same for all, so two rounds at once ask for the same moves and never undo each other.
//! A node that comes back, or joins, gets its share within a round or two; the first round
//! comes one period after start.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::balance::{self, StreamLead};
use crate::metrics::Led;
use crate::shared::Shared;

/// At most this many step-downs a round: each pauses its stream for about a second, so a
/// node that returns takes its share back a few streams at a time.
pub const MOVES_PER_ROUND: usize = 8;

/// How often the survey runs when the automatic moves are off (`balance_every_secs = 0`):
/// the metrics still follow the leaders.
const SURVEY_ONLY_EVERY: Duration = Duration::from_secs(30);

pub async fn run(shared: Shared, cancel: CancellationToken) {
    let every_secs = shared.config.streams.balance_every_secs;
    let moves_allowed = every_secs > 0 && shared.config.streams.replicas > 1;
    let every = if every_secs == 0 {
        SURVEY_ONLY_EVERY
    } else {
        Duration::from_secs(every_secs)
    };
    // The first round one period after start, spread over instances: a starting cluster
    // (leaders still being elected, shards being taken) settles first; `setup` and
    // `streams balance` move leaders at once when asked.
    let mut wait = every + every.mul_f64(rand::random::<f64>() / 4.0);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = every;
        let survey = match balance::survey(&shared.js, &shared.topology).await {
            Ok(survey) => survey,
            Err(error) => {
                tracing::debug!(%error, "could not read the streams' leaders this round");
                continue;
            }
        };
        shared.metrics.set_leadership(leadership(&survey));
        if !moves_allowed {
            continue;
        }
        for step in balance::leader_moves(&survey)
            .into_iter()
            .take(MOVES_PER_ROUND)
        {
            if cancel.is_cancelled() {
                return;
            }
            match balance::carry_out(&shared.js, &shared.topology, &step).await {
                Ok(()) => {
                    shared.metrics.leader_moves.inc();
                    tracing::info!(
                        stream = %step.stream,
                        consumer = step.consumer.as_deref().unwrap_or(""),
                        from = step.from.as_deref().unwrap_or("none"),
                        to = %step.to,
                        "moved a leader to follow the placement plan"
                    );
                }
                Err(error) => tracing::warn!(
                    stream = %step.stream,
                    to = %step.to,
                    %error,
                    "could not move a leader; the next round tries again"
                ),
            }
        }
    }
}

/// The survey as the metrics show it.
pub fn leadership(survey: &[StreamLead]) -> Vec<Led> {
    survey
        .iter()
        .map(|lead| Led {
            stream: lead.name.clone(),
            node: lead.leader.clone(),
            messages: lead.messages,
        })
        .collect()
}
