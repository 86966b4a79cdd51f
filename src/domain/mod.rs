//! The product's rules, free of I/O.
//!
//! Nothing in here may import tokio, sled or async_nats (see ARCHITECTURE.md): the rules are
//! unit- and property-tested in microseconds, and every adapter converts its own types into
//! these ones at the edge.

mod alarm;
mod digest;

pub use alarm::{AlarmRecord, Observation, Status, StatusChange};
pub use digest::{split_into_parts, take_digest, DigestEntry, PartBudget};

#[cfg(test)]
mod properties;

/// ARCHITECTURE.md's invariant, checked: the rules import no I/O crate and no adapter.
#[cfg(test)]
#[test]
fn domain_imports_no_io_and_no_adapter() {
    let sources = [
        ("mod.rs", include_str!("mod.rs")),
        ("alarm.rs", include_str!("alarm.rs")),
        ("digest.rs", include_str!("digest.rs")),
    ];
    let forbidden = [
        "tokio",
        "sled",
        "async_nats",
        "serde_json",
        "crate::store",
        "crate::bus",
        "crate::wire",
    ];
    for (file, source) in sources {
        for line in source
            .lines()
            .filter(|l| l.trim_start().starts_with("use "))
        {
            for name in forbidden {
                assert!(!line.contains(name), "domain/{file} imports {name}: {line}");
            }
        }
    }
}
