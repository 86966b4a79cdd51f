//! Key layout inside one shard's tree. The first byte says what a key holds, so each kind is
//! a prefix scan, and one user's alarms are the prefix `a | len(user) | user`.
//!
//! | key                                   | value                      |
//! |---------------------------------------|----------------------------|
//! | `a` u16-BE(len user) user alarm       | alarm record (codec)       |
//! | `o` u64-BE(outbox sequence)           | outbox entry (codec)       |
//! | `r` u64-BE(shard stream sequence)     | empty: request answered    |
//! | `m` name                              | shard metadata             |

pub const ALARM: u8 = b'a';
pub const OUTBOX: u8 = b'o';
pub const REQUEST: u8 = b'r';

pub const META_EPOCH: &[u8] = b"mepoch";
pub const META_NEXT_OUTBOX: &[u8] = b"mnext_outbox";
/// The shard stream sequence this tree reflects: every message at or below it is applied.
/// Written in the same atomic batch as the messages it covers. Absent in a tree of the
/// release before shard state lived in JetStream (read as 0).
pub const META_APPLIED: &[u8] = b"mapplied";

/// The prefix of every alarm of one user. The length prefix keeps user "ab" + alarm "c"
/// apart from user "a" + alarm "bc", whatever bytes the IDs contain.
pub fn user_prefix(user_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + user_id.len());
    key.push(ALARM);
    // IDs are validated to at most 256 bytes at the edge; saturate rather than wrap anyway.
    let len = u16::try_from(user_id.len()).unwrap_or(u16::MAX);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(user_id.as_bytes());
    key
}

pub fn alarm_key(user_id: &str, alarm_id: &str) -> Vec<u8> {
    let mut key = user_prefix(user_id);
    key.extend_from_slice(alarm_id.as_bytes());
    key
}

/// Splits an alarm key back into (user, alarm).
pub fn parse_alarm_key(key: &[u8]) -> Option<(String, String)> {
    let (&kind, rest) = key.split_first()?;
    if kind != ALARM || rest.len() < 2 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let ids = &rest[2..];
    if ids.len() < len {
        return None;
    }
    let (user, alarm) = ids.split_at(len);
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(alarm.to_vec()).ok()?,
    ))
}

pub fn sequence_key(kind: u8, sequence: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = kind;
    key[1..].copy_from_slice(&sequence.to_be_bytes());
    key
}

pub fn parse_sequence_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_prefix_does_not_match_a_user_whose_id_extends_it() {
        let key = alarm_key("ab", "c");
        assert!(key.starts_with(&user_prefix("ab")));
        assert!(!key.starts_with(&user_prefix("a")));
        assert!(!alarm_key("a", "bc").starts_with(&user_prefix("ab")));
    }

    #[test]
    fn alarm_keys_round_trip_even_with_separator_bytes() {
        let key = alarm_key("u\0/1", "a\0b");
        assert_eq!(parse_alarm_key(&key), Some(("u\0/1".into(), "a\0b".into())));
    }

    #[test]
    fn sequence_keys_sort_numerically() {
        assert!(sequence_key(OUTBOX, 2) < sequence_key(OUTBOX, 10));
        assert_eq!(parse_sequence_key(&sequence_key(OUTBOX, 77)), Some(77));
    }
}
