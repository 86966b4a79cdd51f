//! What every long-running part of an instance holds.

use std::sync::Arc;

use async_nats::jetstream::{Context, Message};

use crate::bus::Topology;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub topology: Arc<Topology>,
    pub js: Context,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
}

impl Shared {
    /// The message's stream sequence (0 if its reply subject carries none), counting it as
    /// a redelivery when JetStream delivered it before.
    pub fn note_delivery(&self, message: &Message) -> u64 {
        match message.info() {
            Ok(info) => {
                if info.delivered > 1 {
                    self.metrics.redeliveries.inc();
                }
                info.stream_sequence
            }
            Err(_) => 0,
        }
    }
}
