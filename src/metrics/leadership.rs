//! Which broker node leads each of the service's streams, and the traffic each carried: read
//! by the balancer (`balancer.rs`) each round, rendered when scraped.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

/// One stream as the last survey saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Led {
    pub stream: String,
    /// The server leading it; `None` while it has none.
    pub node: Option<String>,
    /// Messages it has ever stored (its last sequence).
    pub messages: u64,
}

#[derive(Debug, Default)]
pub(super) struct LeadershipGauges {
    streams: Mutex<Vec<Led>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamNode {
    stream: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Node {
    node: String,
}

impl LeadershipGauges {
    pub(super) fn set(&self, streams: Vec<Led>) {
        if let Ok(mut held) = self.streams.lock() {
            *held = streams;
        }
    }
}

impl Collector for LeadershipGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(streams) = self.streams.lock() else {
            return Ok(());
        };
        let kind = ConstGauge::new(0i64).metric_type();
        let mut family = encoder.encode_descriptor(
            "stream_leader",
            "1 for the broker node leading each of the service's streams (a single-replica stream: the node holding it).",
            None,
            kind,
        )?;
        for led in streams.iter() {
            if let Some(node) = &led.node {
                let labels = StreamNode {
                    stream: led.stream.clone(),
                    node: node.clone(),
                };
                ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "stream_last_sequence",
            "Messages each of the service's streams has stored since it was created: its rate is the stream's share of the traffic.",
            None,
            kind,
        )?;
        for led in streams.iter() {
            let labels = StreamLabel {
                stream: led.stream.clone(),
            };
            let messages = i64::try_from(led.messages).unwrap_or(i64::MAX);
            ConstGauge::new(messages).encode(family.encode_family(&labels)?)?;
        }
        let mut per_node: BTreeMap<&str, i64> = BTreeMap::new();
        for led in streams.iter() {
            if let Some(node) = &led.node {
                *per_node.entry(node).or_insert(0) += 1;
            }
        }
        let mut family = encoder.encode_descriptor(
            "node_streams_led",
            "How many of the service's streams each broker node leads.",
            None,
            kind,
        )?;
        for (node, count) in per_node {
            let labels = Node { node: node.into() };
            ConstGauge::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
