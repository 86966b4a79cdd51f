//! What every long-running part of an instance holds.

use std::sync::Arc;

use async_nats::jetstream::Context;

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
