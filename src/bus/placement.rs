//! Where each of the service's streams should live, so that several broker nodes share the
//! work. Pure: given the streams in order of weight and the nodes each may use, a plan.
//!
//! A stream's leader does its work: it stores (or orders, replicated) every message, answers
//! every pull and every PubAck. JetStream places a new single-replica stream on the node with
//! the most free storage (on a fresh cluster: every stream on one node) and elects replicated
//! leaders at random, so nothing spreads the work by itself. The plan does:
//! - the input partitions come first (every input passes one), then the shard logs (every
//!   input again, packed in envelopes), then the output, dead-letter and snapshot streams and
//!   the buckets;
//! - each stream in that order goes to the node, among those it may use, that the plan gave
//!   the fewest streams so far; ties go to the first such node in name order.
//!
//! So with P partitions on N nodes and P ≥ N, no two partitions share a node while another
//! node has none, and every node leads the same number of shard logs give or take one. The
//! plan depends only on the streams and their nodes, never on who leads now: two instances
//! that compute it at once ask for the same moves, and never undo each other's.
//!
//! Invariant: a single-replica stream is placed by its node's tag (`streams.node_tags`) when
//! it is created, and moved only by `alarm-digest streams balance` (moving it copies its data);
//! a replicated stream's leader is moved by a leader step-down (a pause of about a second).

use std::collections::BTreeMap;

use super::Topology;

/// The streams the plan spreads, in its order: input partitions, shard logs, then the rest.
/// Only streams this service creates with `stream_configs` (the buckets are appended by
/// [`with_buckets`] for the leader plan, where their leaders matter too).
pub fn ordered_streams(topology: &Topology) -> Vec<String> {
    let s = &topology.streams;
    let mut names: Vec<String> = (0..topology.input_partitions())
        .map(|partition| topology.partition_stream(partition))
        .collect();
    names.extend((0..topology.shard_count).map(|shard| topology.shard_stream(shard)));
    names.extend([
        s.output_stream.clone(),
        s.dead_letter_stream.clone(),
        s.snapshot_stream.clone(),
    ]);
    names
}

/// [`ordered_streams`] and the two key-value buckets' streams (`KV_<bucket>`).
pub fn with_buckets(topology: &Topology) -> Vec<String> {
    let s = &topology.streams;
    let mut names = ordered_streams(topology);
    names.push(format!("KV_{}", s.leases_bucket));
    names.push(format!("KV_{}", s.shards_bucket));
    names
}

/// The node each stream goes to, for streams given in plan order with the nodes each may use
/// (its replicas' servers; for single-replica placement, every node tag). `None` where a
/// stream has no node.
pub fn plan<S>(streams: &[(S, Vec<String>)]) -> Vec<Option<String>> {
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, nodes) in streams {
        for node in nodes {
            load.entry(node.as_str()).or_insert(0);
        }
    }
    streams
        .iter()
        .map(|(_, nodes)| {
            let chosen = nodes
                .iter()
                .map(String::as_str)
                .min_by_key(|node| (load.get(node).copied().unwrap_or(0), *node))?;
            *load.entry(chosen).or_insert(0) += 1;
            Some(chosen.to_string())
        })
        .collect()
}

/// The placement tag of each stream of [`ordered_streams`] on single-replica streams spread
/// over `tags` (one per node): stream i of the order gets `tags[i mod N]`, which is what
/// [`plan`] gives when every stream may use every node.
pub fn tags_in_order(count: usize, tags: &[String]) -> Vec<Option<String>> {
    let every: Vec<(usize, Vec<String>)> = (0..count).map(|i| (i, tags.to_vec())).collect();
    plan(&every)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamsConfig;
    use proptest::prelude::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn count(plan: &[Option<String>], node: &str) -> usize {
        plan.iter().filter(|n| n.as_deref() == Some(node)).count()
    }

    #[test]
    fn partitions_come_first_and_land_on_distinct_nodes() {
        let topology = Topology::new(
            StreamsConfig {
                input_partitions: 3,
                ..StreamsConfig::default()
            },
            16,
        );
        let order = ordered_streams(&topology);
        assert_eq!(order[0], "ALARM_DIGEST_INPUT");
        assert_eq!(order[2], "ALARM_DIGEST_INPUT_2");
        assert_eq!(order[3], "ALARM_DIGEST_SHARD_LOG_0");
        assert_eq!(order.len(), 3 + 16 + 3);
        let tags = tags_in_order(order.len(), &nodes(3));
        assert_eq!(
            tags[..3],
            [
                Some("node-0".to_string()),
                Some("node-1".to_string()),
                Some("node-2".to_string())
            ]
        );
        // 16 shard logs after them: 6 / 5 / 5, never more than 7 on one node.
        let shard_logs = &tags[3..19];
        for node in nodes(3) {
            assert!((5..=6).contains(&count(shard_logs, &node)), "{tags:?}");
        }
    }

    #[test]
    fn a_stream_goes_only_to_a_node_it_may_use() {
        let streams = vec![
            ("a", vec!["n1".to_string(), "n2".to_string()]),
            ("b", vec!["n1".to_string(), "n2".to_string()]),
            ("c", vec!["n2".to_string()]),
            ("d", Vec::new()),
        ];
        assert_eq!(
            plan(&streams),
            [
                Some("n1".to_string()),
                Some("n2".to_string()),
                Some("n2".to_string()),
                None
            ]
        );
    }

    proptest! {
        /// Every stream may use every node: each node gets the same number of streams give
        /// or take one, and so does every prefix (the partitions first, then the rest).
        #[test]
        fn the_plan_is_even_over_every_prefix(streams in 1usize..200, n in 1usize..8) {
            let tags = tags_in_order(streams, &nodes(n));
            for prefix in 1..=streams {
                let counts: Vec<usize> =
                    nodes(n).iter().map(|node| count(&tags[..prefix], node)).collect();
                let (min, max) = (counts.iter().min(), counts.iter().max());
                prop_assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{counts:?}");
            }
        }

        /// Replicated streams on more nodes than replicas (six nodes, three replicas each, any
        /// peer sets): the plan is the same whoever computes it, and no node leads more than
        /// a fair share plus the streams that had no other choice.
        #[test]
        fn the_leader_plan_is_deterministic_and_within_the_peer_sets(
            peer_sets in proptest::collection::vec(proptest::sample::subsequence(nodes(6), 3), 1..60)
        ) {
            let streams: Vec<(usize, Vec<String>)> = peer_sets.into_iter().enumerate().collect();
            let first = plan(&streams);
            prop_assert_eq!(&first, &plan(&streams));
            for ((_, peers), leader) in streams.iter().zip(&first) {
                prop_assert!(leader.as_ref().is_some_and(|l| peers.contains(l)));
            }
        }
    }
}
