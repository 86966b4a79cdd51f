//! The readiness latch behind `/readyz`: every part registers itself as not ready and flips
//! to ready once it is bound; the instance is ready only when all of them are and the NATS
//! connection is up. A shard this instance is a standby for counts as ready while it follows
//! its holder, with a note `/readyz` prints (which holder, how far behind).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Readiness {
    /// Part → `None` when ready, else why not (empty: no reason worth printing).
    parts: Arc<Mutex<BTreeMap<String, Option<String>>>>,
    /// Ready parts with something to say: standbys.
    notes: Arc<Mutex<BTreeMap<String, String>>>,
    /// What an operator should know that does not make the instance unready (a clock off
    /// the broker's), by topic.
    warnings: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Readiness {
    pub fn set(&self, part: impl Into<String>, ready: bool) {
        self.put(part.into(), (!ready).then(String::new), None);
    }

    /// Not ready, with a reason `/readyz` prints next to the part.
    pub fn block(&self, part: impl Into<String>, reason: impl Into<String>) {
        self.put(part.into(), Some(reason.into()), None);
    }

    /// Ready, as a standby: the note says for whom and how far behind.
    pub fn standby(&self, part: impl Into<String>, note: impl Into<String>) {
        self.put(part.into(), None, Some(note.into()));
    }

    fn put(&self, part: String, reason: Option<String>, note: Option<String>) {
        if let Ok(mut notes) = self.notes.lock() {
            match note {
                Some(note) => notes.insert(part.clone(), note),
                None => notes.remove(&part),
            };
        }
        if let Ok(mut parts) = self.parts.lock() {
            parts.insert(part, reason);
        }
    }

    /// Says `text` under `topic` in `/readyz` while ready (`None` takes it back).
    pub fn warn(&self, topic: impl Into<String>, text: Option<String>) {
        if let Ok(mut warnings) = self.warnings.lock() {
            match text {
                Some(text) => warnings.insert(topic.into(), text),
                None => warnings.remove(&topic.into()),
            };
        }
    }

    /// The warnings in force, each with its topic.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .map(|warnings| {
                warnings
                    .iter()
                    .map(|(topic, text)| format!("{topic}: {text}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The standbys, each with its note.
    pub fn standbys(&self) -> Vec<String> {
        self.notes
            .lock()
            .map(|notes| {
                notes
                    .iter()
                    .map(|(part, note)| format!("{part} ({note})"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The parts that are not ready; empty means ready (once at least one part registered).
    pub fn not_ready(&self) -> Option<Vec<String>> {
        let parts = self.parts.lock().ok()?;
        if parts.is_empty() {
            return Some(vec!["starting".into()]);
        }
        Some(
            parts
                .iter()
                .filter_map(|(name, reason)| match reason.as_deref() {
                    None => None,
                    Some("") => Some(name.clone()),
                    Some(reason) => Some(format!("{name} ({reason})")),
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_registered_part_is() {
        let readiness = Readiness::default();
        assert_eq!(readiness.not_ready(), Some(vec!["starting".to_string()]));
        readiness.set("store", true);
        readiness.set("shard 0", false);
        assert_eq!(readiness.not_ready(), Some(vec!["shard 0".to_string()]));
        readiness.block("shard 0", "home is elsewhere");
        assert_eq!(
            readiness.not_ready(),
            Some(vec!["shard 0 (home is elsewhere)".to_string()])
        );
        readiness.set("shard 0", true);
        assert_eq!(readiness.not_ready(), Some(vec![]));
    }

    #[test]
    fn a_standby_is_ready_with_a_note_until_it_is_anything_else() {
        let readiness = Readiness::default();
        readiness.standby("shard 1", "holder p, 3 behind");
        assert_eq!(readiness.not_ready(), Some(vec![]));
        assert_eq!(readiness.standbys(), vec!["shard 1 (holder p, 3 behind)"]);
        readiness.block("shard 1", "cannot follow");
        assert_eq!(
            readiness.not_ready(),
            Some(vec!["shard 1 (cannot follow)".to_string()])
        );
        assert!(readiness.standbys().is_empty());
        readiness.standby("shard 1", "again");
        readiness.set("shard 1", true);
        assert!(readiness.standbys().is_empty());
    }
}
