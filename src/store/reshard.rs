//! Offline re-sharding: the exports of every shard of a cluster with one `shards.count`,
//! re-split into exports for another count. Users move by `shard_of` under the new count;
//! each alarm keeps its record (and so its sent marker).
//!
//! What does not move: answered-request markers (they name sequences of the old shard
//! streams, which are empty by then) and the digest epoch and outbox counter (each new shard
//! tree starts its own, so Msg-Ids stay unique). Unpublished digests do not move either: a
//! shard with any is refused, and starting its instance once delivers them.

use super::export::ShardExport;
use super::keys;

/// The data source the new exports name; `shard import` accepts it where a shard has no home.
pub const RESHARD_SOURCE: &str = "reshard";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReshardError {
    #[error("the exports are of clusters with different shard counts ({0} and {1})")]
    MixedCounts(u16, u16),
    #[error("shard {0} does not exist in a cluster of {1} shards")]
    OutOfRange(u16, u16),
    #[error("shard {0} is given twice")]
    Duplicate(u16),
    #[error("shard {0} of {1} is missing: every shard must be exported and given")]
    Missing(u16, u16),
    #[error("shard {shard} has {pending} digest(s) not yet published: start its instance once so it delivers them, stop it, and export again")]
    PendingDigests { shard: u16, pending: usize },
    #[error("the new shard count must be between 1 and 4096")]
    BadCount,
}

pub fn reshard(
    exports: &[ShardExport],
    new_count: u16,
    shard_of: impl Fn(&str) -> u16,
) -> Result<Vec<ShardExport>, ReshardError> {
    if new_count == 0 || new_count > 4096 {
        return Err(ReshardError::BadCount);
    }
    let old_count = exports.first().map(|e| e.count).unwrap_or(0);
    let mut seen = vec![false; usize::from(old_count)];
    for export in exports {
        if export.count != old_count {
            return Err(ReshardError::MixedCounts(old_count, export.count));
        }
        let Some(slot) = seen.get_mut(usize::from(export.shard)) else {
            return Err(ReshardError::OutOfRange(export.shard, old_count));
        };
        if *slot {
            return Err(ReshardError::Duplicate(export.shard));
        }
        *slot = true;
        let pending = export
            .entries
            .iter()
            .filter(|(key, _)| key.first() == Some(&keys::OUTBOX))
            .count();
        if pending > 0 {
            return Err(ReshardError::PendingDigests {
                shard: export.shard,
                pending,
            });
        }
    }
    if let Some(missing) = seen.iter().position(|given| !given) {
        return Err(ReshardError::Missing(missing as u16, old_count));
    }
    let mut new: Vec<ShardExport> = (0..new_count)
        .map(|shard| ShardExport {
            shard,
            count: new_count,
            source_instance: RESHARD_SOURCE.into(),
            entries: Vec::new(),
        })
        .collect();
    for export in exports {
        for (key, value) in &export.entries {
            if let Some((user, _alarm)) = keys::parse_alarm_key(key) {
                new[usize::from(shard_of(&user))]
                    .entries
                    .push((key.clone(), value.clone()));
            }
        }
    }
    for export in &mut new {
        // Tree order, as an export of a live tree would list them.
        export.entries.sort();
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(shard: u16, count: u16, users: &[&str]) -> ShardExport {
        let mut entries: Vec<_> = users
            .iter()
            .map(|user| (keys::alarm_key(user, "a"), user.as_bytes().to_vec()))
            .collect();
        entries.push((keys::META_EPOCH.to_vec(), vec![1; 8]));
        entries.push((keys::sequence_key(keys::REQUEST, 7).to_vec(), vec![]));
        ShardExport {
            shard,
            count,
            source_instance: "old".into(),
            entries,
        }
    }

    fn by_len(user: &str) -> u16 {
        user.len() as u16 % 3
    }

    #[test]
    fn every_alarm_lands_in_its_users_new_shard_and_nothing_else_moves() {
        let old = [export(0, 2, &["a", "bbb"]), export(1, 2, &["cc", "dddd"])];
        let new = reshard(&old, 3, by_len).expect("reshard");
        assert_eq!(new.len(), 3);
        let users = |export: &ShardExport| -> Vec<String> {
            export
                .entries
                .iter()
                .map(|(key, _)| keys::parse_alarm_key(key).expect("only alarms").0)
                .collect()
        };
        assert_eq!(users(&new[0]), ["bbb"]);
        assert_eq!(users(&new[1]), ["a", "dddd"]);
        assert_eq!(users(&new[2]), ["cc"]);
        assert!(new
            .iter()
            .all(|e| e.count == 3 && e.source_instance == RESHARD_SOURCE));
        // Values travel untouched.
        assert_eq!(new[2].entries[0].1, b"cc");
    }

    #[test]
    fn refuses_an_incomplete_duplicated_or_mixed_set() {
        assert_eq!(
            reshard(&[export(0, 2, &[])], 3, by_len),
            Err(ReshardError::Missing(1, 2))
        );
        assert_eq!(
            reshard(&[export(0, 2, &[]), export(0, 2, &[])], 3, by_len),
            Err(ReshardError::Duplicate(0))
        );
        assert_eq!(
            reshard(&[export(0, 2, &[]), export(1, 3, &[])], 3, by_len),
            Err(ReshardError::MixedCounts(2, 3))
        );
    }

    #[test]
    fn refuses_a_shard_with_undelivered_digests() {
        let mut with_outbox = export(1, 2, &[]);
        with_outbox
            .entries
            .push((keys::sequence_key(keys::OUTBOX, 0).to_vec(), vec![]));
        assert_eq!(
            reshard(&[export(0, 2, &[]), with_outbox], 3, by_len),
            Err(ReshardError::PendingDigests {
                shard: 1,
                pending: 1
            })
        );
    }
}
