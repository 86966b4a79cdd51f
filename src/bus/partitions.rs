//! Input partitions: the first hop spread over several streams, so that more instances and more
//! broker nodes carry more events (ARCHITECTURE.md, "Scaling model").
//!
//! Producers keep publishing the plain input subjects. With `streams.input_partitions` = P > 1,
//! the server's weighted subject mapping ([`Topology::nats_mappings`]) sends each message to one
//! of `<subject>.in.0` … `.in.<P-1>`. Partition p is captured by its own stream: partition 0
//! by `streams.input_stream` (which also keeps capturing the plain subjects, so a server
//! without the mapping loses nothing), partition p > 0 by `<input_stream>_<p>`. Every
//! instance routes every partition stream that exists, the retired ones (p ≥ P, left by a
//! smaller count) included, until they are empty and pruned.

use std::borrow::Cow;
use std::collections::BTreeSet;

use async_nats::jetstream::Context;
use futures::StreamExt;

use super::{BusError, Topology};
use crate::wire::InputKind;

/// Where an input message came from: what it carries, through which partition, and whether
/// it came on a plain input subject (no mapping spread it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputOrigin {
    pub kind: InputKind,
    pub partition: u16,
    pub plain: bool,
}

const KINDS: [InputKind; 2] = [InputKind::StatusChange, InputKind::DigestRequest];

/// Partition `p`'s stream name: the input stream itself for partition 0 (today's name, so one
/// partition is exactly the previous release's topology), `<input_stream>_<p>` otherwise.
pub(super) fn partition_stream_of(input_stream: &str, partition: u16) -> String {
    match partition {
        0 => input_stream.to_string(),
        p => format!("{input_stream}_{p}"),
    }
}

impl Topology {
    /// The configured partition count.
    pub fn input_partitions(&self) -> u16 {
        self.streams.input_partitions
    }

    /// Partition `p`'s stream (see [`partition_stream_of`]).
    pub fn partition_stream(&self, partition: u16) -> String {
        self.partition_stream_name(partition).into_owned()
    }

    /// [`Self::partition_stream`] without allocating for a configured partition.
    pub fn partition_stream_name(&self, partition: u16) -> Cow<'_, str> {
        match self.partition_streams.get(usize::from(partition)) {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(partition_stream_of(&self.streams.input_stream, partition)),
        }
    }

    /// The partition a stream name belongs to, if it is one of the input partition streams.
    pub fn partition_of_stream(&self, name: &str) -> Option<u16> {
        if name == self.streams.input_stream {
            return Some(0);
        }
        let suffix = name
            .strip_prefix(&self.streams.input_stream)?
            .strip_prefix('_')?;
        // Only the canonical spelling: `_01` is someone else's stream.
        let partition: u16 = suffix.parse().ok()?;
        (partition > 0 && partition.to_string() == suffix).then_some(partition)
    }

    /// `<input subject>.in.<p>`: what the mapping sends partition `p`'s share to.
    pub fn partition_subject(&self, kind: InputKind, partition: u16) -> String {
        format!("{}.in.{partition}", self.input_subject(kind))
    }

    /// The subjects the mapping sends partition `p`'s share to.
    pub fn spread_subjects(&self, partition: u16) -> Vec<String> {
        KINDS
            .map(|kind| self.partition_subject(kind, partition))
            .to_vec()
    }

    /// What partition `p`'s stream captures with the configured count: partition 0 the plain
    /// subjects (and its `.in.0` subjects once there is more than one partition), every other
    /// partition its own `.in.<p>` subjects.
    pub fn partition_subjects(&self, partition: u16) -> Vec<String> {
        let mut subjects = Vec::new();
        if partition == 0 {
            subjects.extend(KINDS.map(|kind| self.input_subject(kind).to_string()));
        }
        if partition > 0 || self.input_partitions() > 1 {
            subjects.extend(self.spread_subjects(partition));
        }
        subjects
    }

    /// What an input subject carries and through which partition; `None` for anything else.
    /// Any `.in.<p>` is accepted, also beyond the configured count: a retired partition's
    /// messages are still input.
    pub fn input_origin(&self, subject: &str) -> Option<InputOrigin> {
        KINDS.into_iter().find_map(|kind| {
            let base = self.input_subject(kind);
            let rest = subject.strip_prefix(base)?;
            if rest.is_empty() {
                return Some(InputOrigin {
                    kind,
                    partition: 0,
                    plain: true,
                });
            }
            let digits = rest.strip_prefix(".in.")?;
            let partition: u16 = digits.parse().ok()?;
            (partition.to_string() == digits).then_some(InputOrigin {
                kind,
                partition,
                plain: false,
            })
        })
    }

    /// Every input partition stream on the server, retired ones included, in order.
    pub async fn existing_partitions(&self, js: &Context) -> Result<BTreeSet<u16>, BusError> {
        let mut found = BTreeSet::new();
        let mut names = js.stream_names();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| BusError::transient("listing the streams", e))?;
            if let Some(partition) = self.partition_of_stream(&name) {
                found.insert(partition);
            }
        }
        Ok(found)
    }

    /// The whole-percent weight of each partition in the mapping: equal shares, the first
    /// ones one point more where 100 does not divide evenly.
    pub fn partition_weights(&self) -> Vec<u8> {
        let count = self.input_partitions().max(1);
        (0..count)
            .map(|p| {
                let share = 100 / count + u16::from(p < 100 % count);
                u8::try_from(share).unwrap_or(100)
            })
            .collect()
    }

    /// The nats-server configuration block (top level, global account) that spreads the
    /// input subjects over the partitions. One partition needs no mapping: then only a
    /// comment saying so, which is still a valid file to include.
    pub fn nats_mappings(&self) -> String {
        let count = self.input_partitions();
        let mut text = format!(
            "# alarm-digest: streams.input_partitions = {count}. Generated by \
             `alarm-digest nats-mappings`;\n# every server of the cluster includes the same \
             block, and a reload (SIGHUP) applies a change.\n"
        );
        if count <= 1 {
            text += "# One partition: producers' subjects are captured as they are; no mapping.\n";
            return text;
        }
        text += "mappings = {\n";
        let weights = self.partition_weights();
        for kind in KINDS {
            text += &format!("  \"{}\": [\n", self.input_subject(kind));
            for (partition, weight) in (0..count).zip(&weights) {
                text += &format!(
                    "    {{ destination: \"{}\", weight: {weight}% }}\n",
                    self.partition_subject(kind, partition)
                );
            }
            text += "  ]\n";
        }
        text += "}\n";
        text
    }

    /// The same mapping for an account of an operator (JWT) setup, as `nsc` commands.
    pub fn nsc_mappings(&self, account: &str) -> String {
        let count = self.input_partitions();
        let mut text = format!(
            "# alarm-digest: streams.input_partitions = {count}, for account {account}; then \
             `nsc push` the account.\n"
        );
        if count <= 1 {
            text += "# One partition: no mapping.\n";
            return text;
        }
        let weights = self.partition_weights();
        for kind in KINDS {
            for (partition, weight) in (0..count).zip(&weights) {
                text += &format!(
                    "nsc add mapping --account {account} --from {} --to {} --weight {weight}\n",
                    self.input_subject(kind),
                    self.partition_subject(kind, partition)
                );
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamsConfig;

    fn partitioned(count: u16) -> Topology {
        Topology::new(
            StreamsConfig {
                input_partitions: count,
                ..StreamsConfig::default()
            },
            4,
        )
    }

    #[test]
    fn one_partition_is_todays_single_input_stream_of_the_plain_subjects() {
        let topology = partitioned(1);
        assert_eq!(topology.partition_stream(0), "ALARM_DIGEST_INPUT");
        assert_eq!(
            topology.partition_subjects(0),
            ["AlarmStatusChanged", "SendAlarmDigest"]
        );
        assert!(!topology.nats_mappings().contains("mappings = {"));
    }

    #[test]
    fn partition_streams_capture_their_in_subjects_and_the_first_also_the_plain_ones() {
        let topology = partitioned(4);
        assert_eq!(
            topology.partition_subjects(0),
            [
                "AlarmStatusChanged",
                "SendAlarmDigest",
                "AlarmStatusChanged.in.0",
                "SendAlarmDigest.in.0"
            ]
        );
        assert_eq!(topology.partition_stream(3), "ALARM_DIGEST_INPUT_3");
        assert_eq!(
            topology.partition_subjects(3),
            ["AlarmStatusChanged.in.3", "SendAlarmDigest.in.3"]
        );
        for partition in 0..4 {
            let name = topology.partition_stream(partition);
            assert_eq!(topology.partition_of_stream(&name), Some(partition));
        }
        for foreign in [
            "ALARM_DIGEST_INPUT_01",
            "ALARM_DIGEST_INPUT_0",
            "ALARM_DIGEST_INPUTS",
        ] {
            assert_eq!(topology.partition_of_stream(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn input_subjects_map_back_to_kind_partition_and_whether_they_were_spread() {
        let topology = partitioned(4);
        let origin = |s| topology.input_origin(s);
        assert_eq!(
            origin("SendAlarmDigest.in.2"),
            Some(InputOrigin {
                kind: InputKind::DigestRequest,
                partition: 2,
                plain: false
            })
        );
        assert_eq!(
            origin("AlarmStatusChanged"),
            Some(InputOrigin {
                kind: InputKind::StatusChange,
                partition: 0,
                plain: true
            })
        );
        // A retired partition's subject is still input.
        assert_eq!(
            origin("AlarmStatusChanged.in.7").map(|o| o.partition),
            Some(7)
        );
        for other in [
            "AlarmStatusChanged.shard.1",
            "AlarmStatusChanged.in.01",
            "AlarmStatusChanged.in.x",
            "AlarmStatusChangedX",
        ] {
            assert_eq!(origin(other), None, "{other}");
        }
        assert_eq!(
            topology
                .partition_stream_name(origin("SendAlarmDigest.in.2").map_or(0, |o| o.partition)),
            "ALARM_DIGEST_INPUT_2"
        );
    }

    #[test]
    fn mapping_weights_are_whole_percents_summing_to_100() {
        for count in 1..=100 {
            let weights = partitioned(count).partition_weights();
            assert_eq!(weights.len(), usize::from(count));
            assert_eq!(weights.iter().map(|w| u32::from(*w)).sum::<u32>(), 100);
            assert!(weights.iter().all(|w| *w >= 1));
        }
        assert_eq!(partitioned(3).partition_weights(), [34, 33, 33]);
    }

    #[test]
    fn the_mapping_spreads_both_input_subjects_over_every_partition() {
        let text = partitioned(2).nats_mappings();
        for line in [
            "\"AlarmStatusChanged\": [",
            "{ destination: \"AlarmStatusChanged.in.1\", weight: 50% }",
            "{ destination: \"SendAlarmDigest.in.0\", weight: 50% }",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let nsc = partitioned(2).nsc_mappings("ALARMS");
        assert!(nsc.contains(
            "nsc add mapping --account ALARMS --from SendAlarmDigest --to SendAlarmDigest.in.1 --weight 50"
        ));
    }
}
