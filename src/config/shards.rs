//! `[shards]`: the shard count, which shards this instance owns, and the lease period.

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardsConfig {
    /// Fixed for the life of a cluster: recorded in the local data dir and in the cluster's
    /// shards bucket.
    pub count: u16,
    pub owned: OwnedShards,
    /// With `owned = "ordinal"`: how many instances share the shards.
    pub replicas: u16,
    /// With `owned = "ordinal"`: this instance's ordinal. Unset: the number after the last
    /// `-` of the hostname (`alarm-digest-3` → 3), as a StatefulSet names its pods.
    pub ordinal: Option<u16>,
    /// With `owned = "ordinal"`: how many instances after each shard's own (by ordinal,
    /// wrapping) also own it, as warm standbys. 0: each shard has one owner.
    pub standbys: u16,
    /// The lease period, used when the leases bucket is created (its max age). A holder
    /// renews every third of it and stops applying once two thirds passed without renewal;
    /// after a crash, another owner takes the shard within the period plus a third of it.
    pub lease_secs: u64,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            count: 16,
            owned: OwnedShards::All,
            replicas: 1,
            ordinal: None,
            standbys: 0,
            lease_secs: 3,
        }
    }
}

impl ShardsConfig {
    /// The shards this instance runs workers for. `ordinal` must have been resolved
    /// (`Config::load` does).
    pub fn owned_shards(&self) -> Vec<u16> {
        match &self.owned {
            OwnedShards::All => (0..self.count).collect(),
            OwnedShards::List(list) => list.iter().copied().collect(),
            OwnedShards::Ordinal => (0..self.count)
                .filter(|shard| self.standby_rank(*shard) <= self.standbys)
                .collect(),
        }
    }

    /// Whether this instance is the shard's first owner: the one that takes its lease when
    /// all start together (`ordinal` only; with `all` or a list, every owner is).
    pub fn is_primary(&self, shard: u16) -> bool {
        !matches!(self.owned, OwnedShards::Ordinal) || self.standby_rank(shard) == 0
    }

    /// With `ordinal`: 0 for the instance whose ordinal is `shard % replicas`, 1 for the next
    /// one (wrapping), and so on.
    fn standby_rank(&self, shard: u16) -> u16 {
        let replicas = self.replicas.max(1);
        let ordinal = self.ordinal.unwrap_or(0) % replicas;
        (ordinal + replicas - shard % replicas) % replicas
    }
}

/// Which shards this instance runs workers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedShards {
    All,
    List(BTreeSet<u16>),
    /// Every shard s with `s % shards.replicas == ordinal`.
    Ordinal,
}

impl OwnedShards {
    pub(super) fn parse(text: &str) -> Result<OwnedShards, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(OwnedShards::All);
        }
        if text.eq_ignore_ascii_case("ordinal") {
            return Ok(OwnedShards::Ordinal);
        }
        let inner = text.trim_start_matches('[').trim_end_matches(']');
        inner
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse::<u16>()
                    .map_err(|_| format!("{part:?} is not a shard number"))
            })
            .collect::<Result<BTreeSet<u16>, String>>()
            .map(OwnedShards::List)
    }
}

impl Serialize for OwnedShards {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            OwnedShards::All => serializer.serialize_str("all"),
            OwnedShards::List(list) => list.serialize(serializer),
            OwnedShards::Ordinal => serializer.serialize_str("ordinal"),
        }
    }
}

impl<'de> Deserialize<'de> for OwnedShards {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Number(u16),
            List(Vec<u16>),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Text(text) => OwnedShards::parse(&text).map_err(serde::de::Error::custom),
            Repr::Number(shard) => Ok(OwnedShards::List(BTreeSet::from([shard]))),
            Repr::List(list) => Ok(OwnedShards::List(list.into_iter().collect())),
        }
    }
}
