//! The readiness latch behind `/readyz`: every part registers itself as not ready and flips
//! to ready once it is bound; the instance is ready only when all of them are and the NATS
//! connection is up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Readiness {
    /// Part → `None` when ready, else why not (empty: no reason worth printing).
    parts: Arc<Mutex<BTreeMap<String, Option<String>>>>,
}

impl Readiness {
    pub fn set(&self, part: impl Into<String>, ready: bool) {
        if let Ok(mut parts) = self.parts.lock() {
            parts.insert(part.into(), (!ready).then(String::new));
        }
    }

    /// Not ready, with a reason `/readyz` prints next to the part.
    pub fn block(&self, part: impl Into<String>, reason: impl Into<String>) {
        if let Ok(mut parts) = self.parts.lock() {
            parts.insert(part.into(), Some(reason.into()));
        }
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
}
