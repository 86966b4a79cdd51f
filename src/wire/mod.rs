//! The JSON messages on the bus, and their conversion into domain types.
//!
//! This is the only place that knows field names. Everything that is not a valid message
//! becomes a [`Rejection`], which the caller dead-letters.

mod report;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{split_into_parts, DigestEntry, Observation, PartBudget, Status, StatusChange};
pub use report::{AlarmReport, UserReport};

/// IDs longer than this are rejected: they would bloat keys and are never legitimate.
pub const MAX_ID_BYTES: usize = 256;

/// The reason code of a status change stamped too far ahead of the clock; `dlq replay` sends
/// such records past the router's clock check.
pub const FUTURE_TIME: &str = "future_time";

/// Why an input message was not applied. The `code` is a metric label and a header value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not a JSON object of the expected shape: {0}")]
    Malformed(String),
    #[error("field {0} is missing")]
    Missing(&'static str),
    #[error("field {0} is empty")]
    Empty(&'static str),
    #[error("field {field} is {len} bytes, longer than {MAX_ID_BYTES}")]
    TooLong { field: &'static str, len: usize },
    #[error("Status {0:?} is not one of CLEARED, WARNING, CRITICAL")]
    UnknownStatus(String),
    #[error("ChangedAt {0:?} is not an RFC 3339 timestamp")]
    BadTime(String),
    #[error("subject {0:?} is not an input subject")]
    UnknownSubject(String),
    #[error(
        "ChangedAt {changed_at} is more than {max_skew_secs} s ahead of the time the broker \
         stored the event ({now}; limits.max_future_skew_secs)"
    )]
    FutureTime {
        changed_at: String,
        now: String,
        max_skew_secs: i64,
    },
}

impl Rejection {
    /// A short, stable, low-cardinality name for metrics and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too_large",
            Rejection::Malformed(_) => "malformed",
            Rejection::Missing(_) => "missing_field",
            Rejection::Empty(_) => "empty_field",
            Rejection::TooLong { .. } => "id_too_long",
            Rejection::UnknownStatus(_) => "unknown_status",
            Rejection::BadTime(_) => "bad_time",
            Rejection::UnknownSubject(_) => "unknown_subject",
            Rejection::FutureTime { .. } => FUTURE_TIME,
        }
    }
}

#[derive(Deserialize)]
struct AlarmStatusChangedIn {
    #[serde(rename = "AlarmID")]
    alarm_id: Option<String>,
    #[serde(rename = "UserID")]
    user_id: Option<String>,
    #[serde(rename = "Status")]
    status: Option<String>,
    #[serde(rename = "ChangedAt")]
    changed_at: Option<String>,
}

#[derive(Deserialize)]
struct SendAlarmDigestIn {
    #[serde(rename = "UserID")]
    user_id: Option<String>,
}

/// A validated `SendAlarmDigest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestRequest {
    pub user_id: String,
}

/// A validated input message of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    StatusChange(StatusChange),
    DigestRequest(DigestRequest),
}

impl Input {
    pub fn user_id(&self) -> &str {
        match self {
            Input::StatusChange(change) => &change.user_id,
            Input::DigestRequest(request) => &request.user_id,
        }
    }
}

/// Which input a subject carries; the subject names are configurable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    StatusChange,
    DigestRequest,
}

/// Refuses a status change stamped further ahead of `now` than `max_skew`. The router checks
/// this once, where an event enters, with `now` the time the broker stored the input: one
/// clock for every instance, so whichever router takes an event decides it the same way, and
/// replaying a shard stream never depends on a clock.
pub fn check_clock(
    input: Input,
    now: DateTime<Utc>,
    max_skew: chrono::Duration,
) -> Result<Input, Rejection> {
    match &input {
        Input::StatusChange(change) if change.is_from_the_future(now, max_skew) => {
            Err(Rejection::FutureTime {
                changed_at: format_time(&change.observation.changed_at),
                now: format_time(&now),
                max_skew_secs: max_skew.num_seconds(),
            })
        }
        _ => Ok(input),
    }
}

/// Decodes and validates one input payload of the given kind.
pub fn decode(kind: InputKind, payload: &[u8], max_payload: usize) -> Result<Input, Rejection> {
    if payload.len() > max_payload {
        return Err(Rejection::TooLarge {
            size: payload.len(),
            limit: max_payload,
        });
    }
    match kind {
        InputKind::StatusChange => decode_status_change(payload).map(Input::StatusChange),
        InputKind::DigestRequest => decode_digest_request(payload).map(Input::DigestRequest),
    }
}

fn decode_status_change(payload: &[u8]) -> Result<StatusChange, Rejection> {
    let raw: AlarmStatusChangedIn =
        serde_json::from_slice(payload).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let user_id = id_field("UserID", raw.user_id)?;
    let alarm_id = id_field("AlarmID", raw.alarm_id)?;
    let status_text = raw.status.ok_or(Rejection::Missing("Status"))?;
    let status = Status::parse(&status_text).ok_or(Rejection::UnknownStatus(status_text))?;
    let changed_at = parse_time(&raw.changed_at.ok_or(Rejection::Missing("ChangedAt"))?)?;
    Ok(StatusChange {
        user_id,
        alarm_id,
        observation: Observation { status, changed_at },
    })
}

fn decode_digest_request(payload: &[u8]) -> Result<DigestRequest, Rejection> {
    let raw: SendAlarmDigestIn =
        serde_json::from_slice(payload).map_err(|e| Rejection::Malformed(e.to_string()))?;
    Ok(DigestRequest {
        user_id: id_field("UserID", raw.user_id)?,
    })
}

fn id_field(field: &'static str, value: Option<String>) -> Result<String, Rejection> {
    let value = value.ok_or(Rejection::Missing(field))?;
    if value.is_empty() {
        return Err(Rejection::Empty(field));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Rejection::TooLong {
            field,
            len: value.len(),
        });
    }
    Ok(value)
}

/// Parses RFC 3339 with 0–9 fractional digits and `Z` or a numeric offset, keeping
/// nanoseconds, into the instant it names.
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, Rejection> {
    let bad = || Rejection::BadTime(text.chars().take(64).collect());
    // chrono also takes a space for `T` and more than nine digits (truncating them); the
    // contract is stricter, so check the shape first.
    let bytes = text.as_bytes();
    if bytes.len() < 20 || !matches!(bytes[10], b'T' | b't') {
        return Err(bad());
    }
    if bytes[19] == b'.' {
        let digits = bytes[20..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || digits > 9 {
            return Err(bad());
        }
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| bad())
}

/// Writes an instant as RFC 3339 in UTC with as many fractional digits as it needs (0, 3, 6
/// or 9), so nanosecond precision survives the round trip.
pub fn format_time(instant: &DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[derive(Serialize)]
struct AlarmStatusChangedOut<'a> {
    #[serde(rename = "AlarmID")]
    alarm_id: &'a str,
    #[serde(rename = "UserID")]
    user_id: &'a str,
    #[serde(rename = "Status")]
    status: &'static str,
    #[serde(rename = "ChangedAt")]
    changed_at: String,
}

/// Renders a validated change as the `AlarmStatusChanged` it came from (same fields and
/// instant; `ChangedAt` in UTC): what a dead letter or a requeue carries once the JSON
/// itself is no longer kept.
pub fn encode_status_change(change: &StatusChange) -> Vec<u8> {
    let out = AlarmStatusChangedOut {
        alarm_id: &change.alarm_id,
        user_id: &change.user_id,
        status: change.observation.status.as_str(),
        changed_at: format_time(&change.observation.changed_at),
    };
    // Strings and a &str: serializing cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

#[derive(Serialize)]
struct ActiveAlarmOut<'a> {
    #[serde(rename = "AlarmID")]
    alarm_id: &'a str,
    #[serde(rename = "Status")]
    status: &'static str,
    #[serde(rename = "LatestChangedAt")]
    latest_changed_at: String,
}

/// Renders the `AlarmDigest` payload in one piece; `ActiveAlarms` is always an array.
pub fn encode_digest(user_id: &str, entries: &[DigestEntry]) -> Vec<u8> {
    let mut parts = encode_digest_parts(user_id, entries, usize::MAX);
    parts.pop().map(|part| part.payload).unwrap_or_default()
}

/// One rendered part of a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestPart {
    /// A complete `AlarmDigest` JSON document.
    pub payload: Vec<u8>,
    /// How many alarms it carries.
    pub alarms: usize,
}

/// Renders a digest as one or more complete `AlarmDigest` payloads of at most `max_bytes`
/// each (unless one alarm alone is larger), in order: part 1 holds the oldest alarms. The
/// bytes are exactly what serialising the whole `AlarmDigest` gives, cut between alarms.
pub fn encode_digest_parts(
    user_id: &str,
    entries: &[DigestEntry],
    max_bytes: usize,
) -> Vec<DigestPart> {
    // Serialising strings into a Vec cannot fail; an empty rendering would still be caught
    // by consumers as invalid JSON rather than panic here.
    let user = serde_json::to_vec(user_id).unwrap_or_default();
    let head = [br#"{"UserID":"#.as_slice(), &user, br#","ActiveAlarms":["#].concat();
    let tail = b"]}";
    let alarms: Vec<Vec<u8>> = entries
        .iter()
        .map(|entry| {
            serde_json::to_vec(&ActiveAlarmOut {
                alarm_id: &entry.alarm_id,
                status: entry.status.as_str(),
                latest_changed_at: format_time(&entry.latest_changed_at),
            })
            .unwrap_or_default()
        })
        .collect();
    let sizes: Vec<usize> = alarms.iter().map(Vec::len).collect();
    let budget = PartBudget {
        frame: head.len() + tail.len(),
        separator: 1,
        max: max_bytes,
    };
    split_into_parts(&sizes, budget)
        .into_iter()
        .map(|range| {
            let range_len = range.len();
            let mut part = head.clone();
            for (index, alarm) in alarms[range].iter().enumerate() {
                if index > 0 {
                    part.push(b',');
                }
                part.extend_from_slice(alarm);
            }
            part.extend_from_slice(tail);
            DigestPart {
                payload: part,
                alarms: range_len,
            }
        })
        .collect()
}

/// Reads an `AlarmDigest` payload back (one this service rendered).
pub fn decode_digest(payload: &[u8]) -> Result<AlarmDigest, serde_json::Error> {
    serde_json::from_slice(payload)
}

/// The `AlarmDigest` message as consumers (and tests) read it back.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AlarmDigest {
    #[serde(rename = "UserID")]
    pub user_id: String,
    #[serde(rename = "ActiveAlarms")]
    pub active_alarms: Vec<ActiveAlarm>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ActiveAlarm {
    #[serde(rename = "AlarmID")]
    pub alarm_id: String,
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "LatestChangedAt")]
    pub latest_changed_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 * 1024;

    fn status_change(payload: &str) -> Result<StatusChange, Rejection> {
        match decode(InputKind::StatusChange, payload.as_bytes(), LIMIT)? {
            Input::StatusChange(change) => Ok(change),
            Input::DigestRequest(_) => Err(Rejection::Malformed("wrong kind".into())),
        }
    }

    #[test]
    fn accepts_the_documented_example_and_ignores_unknown_fields() {
        let change = status_change(
            r#"{"AlarmID":"a1","UserID":"u1","Status":"WARNING","ChangedAt":"2021-06-07T20:40:15.598765212Z","Extra":1}"#,
        );
        let change = change.expect("valid");
        assert_eq!(change.user_id, "u1");
        assert_eq!(change.observation.status, Status::Warning);
        assert_eq!(
            format_time(&change.observation.changed_at),
            "2021-06-07T20:40:15.598765212Z"
        );
    }

    #[test]
    fn time_keeps_nanoseconds_and_compares_real_instants_across_offsets() {
        let utc = parse_time("2021-06-07T20:40:15.000000001Z").expect("valid");
        let offset = parse_time("2021-06-07T22:40:15.000000001+02:00").expect("valid");
        assert_eq!(utc, offset);
        let later = parse_time("2021-06-07T20:40:15.000000002Z").expect("valid");
        assert!(later > utc);
    }

    #[test]
    fn time_accepts_zero_to_nine_fraction_digits() {
        for text in [
            "2021-06-07T20:40:15Z",
            "2021-06-07T20:40:15.5Z",
            "2021-06-07T20:40:15.123456789Z",
            "2021-06-07T20:40:15.12-07:30",
            "2021-06-07t20:40:15z",
        ] {
            assert!(parse_time(text).is_ok(), "{text} should parse");
        }
    }

    #[test]
    fn time_rejects_what_rfc_3339_does_not_allow() {
        for text in [
            "",
            "2021-06-07",
            "2021-06-07 20:40:15Z",
            "2021-06-07T20:40:15",
            "2021-06-07T20:40:15.Z",
            "2021-06-07T20:40:15.1234567891Z",
            "2021-13-07T20:40:15Z",
            "2021-06-07T25:40:15Z",
            "2021-06-07T20:40:15+0200",
            "yesterday at noon, roughly",
            "2021-06-07T20:40:1é.5Z",
        ] {
            assert!(parse_time(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn formats_utc_with_the_digits_it_needs() {
        let t = parse_time("2021-06-07T22:40:15+02:00").expect("valid");
        assert_eq!(format_time(&t), "2021-06-07T20:40:15Z");
        let t = parse_time("2021-06-07T20:40:15.5Z").expect("valid");
        assert_eq!(format_time(&t), "2021-06-07T20:40:15.500Z");
    }

    #[test]
    fn each_kind_of_bad_input_has_its_own_reason() {
        let cases = [
            ("not json", "malformed"),
            ("[1,2]", "malformed"),
            (
                r#"{"UserID":"u","Status":"WARNING","ChangedAt":"2021-06-07T20:40:15Z"}"#,
                "missing_field",
            ),
            (
                r#"{"AlarmID":"","UserID":"u","Status":"WARNING","ChangedAt":"2021-06-07T20:40:15Z"}"#,
                "empty_field",
            ),
            (
                r#"{"AlarmID":"a","UserID":"u","Status":"warning","ChangedAt":"2021-06-07T20:40:15Z"}"#,
                "unknown_status",
            ),
            (
                r#"{"AlarmID":"a","UserID":"u","Status":"WARNING","ChangedAt":"noon"}"#,
                "bad_time",
            ),
            (
                r#"{"AlarmID":"a","UserID":7,"Status":"WARNING","ChangedAt":"2021-06-07T20:40:15Z"}"#,
                "malformed",
            ),
        ];
        for (payload, code) in cases {
            let rejection = status_change(payload).expect_err(payload);
            assert_eq!(rejection.code(), code, "{payload}");
        }
    }

    #[test]
    fn a_change_stamped_past_the_allowed_skew_is_refused_and_one_within_it_is_not() {
        let now = parse_time("2026-12-01T12:00:00Z").expect("time");
        let skew = chrono::Duration::minutes(5);
        let at = |changed_at: &str| {
            Input::StatusChange(
                status_change(&format!(
                    r#"{{"AlarmID":"a","UserID":"u","Status":"CRITICAL","ChangedAt":"{changed_at}"}}"#
                ))
                .expect("valid"),
            )
        };
        assert!(check_clock(at("2026-12-01T12:05:00Z"), now, skew).is_ok());
        assert!(check_clock(at("2020-01-01T00:00:00Z"), now, skew).is_ok());
        let refused = check_clock(at("2099-01-01T00:00:00Z"), now, skew).expect_err("future");
        assert_eq!(refused.code(), "future_time");
        assert!(
            refused.to_string().contains("2099-01-01T00:00:00Z"),
            "{refused}"
        );
        let request = Input::DigestRequest(DigestRequest {
            user_id: "u".into(),
        });
        assert!(check_clock(request, now, skew).is_ok());
    }

    fn entry(alarm_id: &str, secs: i64) -> DigestEntry {
        DigestEntry {
            alarm_id: alarm_id.into(),
            status: Status::Critical,
            latest_changed_at: DateTime::from_timestamp(secs, 5_000_000).unwrap_or_default(),
        }
    }

    #[test]
    fn a_digest_in_one_piece_is_what_serde_gives_for_the_whole_message() {
        let entries = [entry("a\"1", 10), entry("b", 20)];
        let expected = serde_json::json!({
            "UserID": "u\u{e9}\"",
            "ActiveAlarms": [
                {"AlarmID": "a\"1", "Status": "CRITICAL", "LatestChangedAt": "1970-01-01T00:00:10.005Z"},
                {"AlarmID": "b", "Status": "CRITICAL", "LatestChangedAt": "1970-01-01T00:00:20.005Z"},
            ]
        });
        let rendered = encode_digest("u\u{e9}\"", &entries);
        let parsed: serde_json::Value = serde_json::from_slice(&rendered).expect("valid JSON");
        assert_eq!(parsed, expected);
        // Field order as the schema writes it, compact as serde writes it.
        let text = String::from_utf8(rendered).expect("utf-8");
        assert!(text.starts_with(r#"{"UserID":"ué\"","ActiveAlarms":[{"AlarmID":"a\"1","Status":"CRITICAL","LatestChangedAt":"#), "{text}");
        assert_eq!(
            encode_digest("u", &[]),
            br#"{"UserID":"u","ActiveAlarms":[]}"#
        );
    }

    #[test]
    fn digest_parts_are_each_a_complete_digest_within_the_limit_and_keep_the_order() {
        let entries: Vec<DigestEntry> = (0..500)
            .map(|n| entry(&format!("alarm-{n:04}"), n))
            .collect();
        let whole = encode_digest("user", &entries);
        let parts = encode_digest_parts("user", &entries, 4_096);
        assert!(parts.len() >= whole.len() / 4_096, "{} parts", parts.len());
        let mut seen = Vec::new();
        for part in &parts {
            assert!(
                part.payload.len() <= 4_096,
                "part of {} bytes",
                part.payload.len()
            );
            let digest: AlarmDigest =
                serde_json::from_slice(&part.payload).expect("each part is valid");
            assert_eq!(digest.active_alarms.len(), part.alarms);
            assert_eq!(digest.user_id, "user");
            seen.extend(digest.active_alarms.into_iter().map(|a| a.alarm_id));
        }
        let expected: Vec<String> = entries.iter().map(|e| e.alarm_id.clone()).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn ids_longer_than_the_limit_are_rejected() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let payload = format!(r#"{{"UserID":"{long}"}}"#);
        let rejection = decode(InputKind::DigestRequest, payload.as_bytes(), LIMIT);
        assert_eq!(rejection.map_err(|r| r.code()), Err("id_too_long"));
        let exact = "x".repeat(MAX_ID_BYTES);
        let payload = format!(r#"{{"UserID":"{exact}"}}"#);
        assert!(decode(InputKind::DigestRequest, payload.as_bytes(), LIMIT).is_ok());
    }

    #[test]
    fn oversized_payload_is_rejected_before_parsing() {
        let payload = vec![b' '; 100];
        let rejection = decode(InputKind::DigestRequest, &payload, 10);
        assert_eq!(rejection.map_err(|r| r.code()), Err("too_large"));
    }

    #[test]
    fn empty_digest_is_an_empty_array_never_null() {
        let payload = encode_digest("u1", &[]);
        assert_eq!(payload, br#"{"UserID":"u1","ActiveAlarms":[]}"#);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use chrono::{FixedOffset, TimeZone};
    use proptest::prelude::*;

    proptest! {
        /// Any instant written with any offset and 0-9 fractional digits parses to itself,
        /// and our UTC rendering round-trips exactly.
        #[test]
        fn rfc3339_round_trips_any_instant_and_offset(
            secs in 0i64..253_402_300_799,
            nanos in 0u32..1_000_000_000,
            offset_minutes in -1439i32..1439,
            digits in 0usize..=9,
        ) {
            let nanos = nanos - nanos % 10u32.pow(9 - digits as u32);
            let instant = DateTime::<Utc>::from_timestamp(secs, nanos).unwrap_or_default();
            let offset = FixedOffset::east_opt(offset_minutes * 60).expect("offset within a day");
            let local = offset.from_utc_datetime(&instant.naive_utc());
            let fraction = if digits == 0 { String::new() } else {
                format!(".{:09}", nanos)[..=digits].to_string()
            };
            let text = format!("{}{}{}", local.format("%Y-%m-%dT%H:%M:%S"), fraction, local.format("%:z"));
            prop_assert_eq!(parse_time(&text), Ok(instant));
            prop_assert_eq!(parse_time(&format_time(&instant)), Ok(instant));
        }

        /// A change rendered again (a dead letter or requeue of an envelope-2 entry) is the
        /// input it was validated from: it decodes to the same change.
        #[test]
        fn a_rendered_change_decodes_to_itself(
            user in "[ -~]{1,40}",
            alarm in "\\PC{1,40}",
            status in prop::sample::select(vec![Status::Cleared, Status::Warning, Status::Critical]),
            secs in 0i64..253_402_300_799,
            nanos in 0u32..1_000_000_000,
        ) {
            let change = StatusChange {
                user_id: user,
                alarm_id: alarm,
                observation: Observation {
                    status,
                    changed_at: DateTime::<Utc>::from_timestamp(secs, nanos).unwrap_or_default(),
                },
            };
            let payload = encode_status_change(&change);
            prop_assert_eq!(
                decode(InputKind::StatusChange, &payload, usize::MAX),
                Ok(Input::StatusChange(change))
            );
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(InputKind::StatusChange, &bytes, 4096);
            let _ = decode(InputKind::DigestRequest, &bytes, 4096);
        }

        /// Near-valid messages (each field valid, missing, empty, oversized, of another JSON
        /// type or garbage, plus unknown fields) never panic, and whatever is accepted obeys
        /// every rule the rest of the service relies on.
        #[test]
        fn near_valid_messages_are_accepted_only_when_fully_valid(
            fields in prop::collection::vec((field_name(), field_value()), 0..7),
        ) {
            let object: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
            let payload = serde_json::to_vec(&object).unwrap_or_default();
            for kind in [InputKind::StatusChange, InputKind::DigestRequest] {
                match decode(kind, &payload, 4096) {
                    Ok(Input::StatusChange(change)) => {
                        prop_assert!(!change.user_id.is_empty() && change.user_id.len() <= MAX_ID_BYTES);
                        prop_assert!(!change.alarm_id.is_empty() && change.alarm_id.len() <= MAX_ID_BYTES);
                        prop_assert_eq!(Some(&serde_json::Value::String(change.observation.status.as_str().into())), object.get("Status"));
                    }
                    Ok(Input::DigestRequest(request)) => {
                        prop_assert!(!request.user_id.is_empty() && request.user_id.len() <= MAX_ID_BYTES);
                    }
                    Err(rejection) => prop_assert!(!rejection.code().is_empty()),
                }
            }
        }
    }

    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("AlarmID".to_string()),
            Just("UserID".to_string()),
            Just("Status".to_string()),
            Just("ChangedAt".to_string()),
            "[a-zA-Z]{1,8}",
        ]
    }

    fn field_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            Just(Value::String(String::new())),
            Just(Value::String("x".repeat(MAX_ID_BYTES + 1))),
            prop_oneof![
                Just("CLEARED"),
                Just("WARNING"),
                Just("CRITICAL"),
                Just("critical")
            ]
            .prop_map(|s| Value::String(s.into())),
            prop_oneof![
                Just("2021-06-07T20:40:15.598765212Z"),
                Just("2021-06-07T22:40:15+02:00"),
                Just("2021-02-30T20:40:15Z"),
                Just("2021-06-07T20:40:15.1234567890Z"),
            ]
            .prop_map(|s| Value::String(s.into())),
            ".{0,40}".prop_map(Value::String),
            prop::collection::vec(any::<u8>(), 0..4).prop_map(|b| Value::Array(
                b.into_iter().map(|n| Value::Number(n.into())).collect()
            )),
        ]
    }

    proptest! {
        /// Every well-formed message built from valid parts is accepted as exactly that.
        #[test]
        fn valid_messages_round_trip(
            user in "[a-zA-Z0-9-]{1,64}",
            alarm in "[a-zA-Z0-9-]{1,64}",
            status in prop_oneof![Just(Status::Cleared), Just(Status::Warning), Just(Status::Critical)],
            secs in 0i64..4_000_000_000,
            nanos in 0u32..1_000_000_000,
        ) {
            let at = DateTime::<Utc>::from_timestamp(secs, nanos).unwrap_or_default();
            let payload = format!(
                r#"{{"AlarmID":"{alarm}","UserID":"{user}","Status":"{}","ChangedAt":"{}"}}"#,
                status.as_str(),
                format_time(&at)
            );
            let decoded = decode(InputKind::StatusChange, payload.as_bytes(), 4096);
            prop_assert_eq!(
                decoded,
                Ok(Input::StatusChange(StatusChange {
                    user_id: user,
                    alarm_id: alarm,
                    observation: Observation { status, changed_at: at },
                }))
            );
        }
    }
}
