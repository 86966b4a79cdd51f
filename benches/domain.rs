//! The pure rules and the value encoding, in isolation.
//! `cargo bench --bench domain`

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

use alarm_digest::bus::envelope::{self, Content, Format};
use alarm_digest::domain::{take_digest, AlarmRecord, Observation, Status, StatusChange};
use alarm_digest::store::codec;
use alarm_digest::wire::{self, Input, InputKind};

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_623_000_000 + secs, 598_765_212).unwrap_or_default()
}

fn apply_one_event(c: &mut Criterion) {
    let record = AlarmRecord::new(Observation {
        status: Status::Warning,
        changed_at: at(0),
    });
    let newer = Observation {
        status: Status::Critical,
        changed_at: at(1),
    };
    c.bench_function("apply one event", |b| {
        b.iter(|| {
            let mut record = record;
            black_box(record.apply(black_box(newer)))
        })
    });
}

fn build_digest(c: &mut Criterion) {
    let mut group = c.benchmark_group("digest for one user");
    for alarms in [10usize, 100, 1_000] {
        let user: Vec<(String, AlarmRecord)> = (0..alarms)
            .map(|i| {
                let status = [Status::Cleared, Status::Warning, Status::Critical][i % 3];
                let secs = ((i * 7919) % alarms) as i64;
                (
                    format!("alarm-{i:05}"),
                    AlarmRecord::new(Observation {
                        status,
                        changed_at: at(secs),
                    }),
                )
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(alarms), &user, |b, user| {
            b.iter(|| {
                let mut user = user.clone();
                let (entries, _) = take_digest(&mut user);
                black_box(wire::encode_digest("user", &entries))
            })
        });
    }
    group.finish();
}

fn encoding(c: &mut Criterion) {
    let mut record = AlarmRecord::new(Observation {
        status: Status::Critical,
        changed_at: at(5),
    });
    record.mark_sent();
    let bytes = codec::encode_record(&record);
    c.bench_function("encode record", |b| {
        b.iter(|| codec::encode_record(black_box(&record)))
    });
    c.bench_function("decode record", |b| {
        b.iter(|| codec::decode_record(black_box(&bytes)))
    });
    let payload = br#"{"AlarmID":"e36a6c22-1a2b-4c3d-9e8f-0a1b2c3d4e5f","UserID":"e859dab9-1bd4-4b8e-8a6c-2e6c3f9a0f31","Status":"WARNING","ChangedAt":"2021-06-07T20:40:15.598765212Z"}"#;
    c.bench_function("decode and validate AlarmStatusChanged", |b| {
        b.iter(|| wire::decode(InputKind::StatusChange, black_box(payload), 65_536))
    });
}

/// The router → shard frame: 256 typical status changes in one envelope, in each format.
/// "read" is the shard worker's part: from envelope bytes to validated changes (v1 parses
/// each entry's JSON; v2 carries the changes the router validated).
fn envelopes(c: &mut Criterion) {
    let payloads: Vec<Vec<u8>> = (0..256)
        .map(|i| {
            format!(
                r#"{{"AlarmID":"alarm-{i:05}","UserID":"e859dab9-1bd4-4b8e-8a6c-2e6c3f9a0f31","Status":"WARNING","ChangedAt":"2021-06-07T20:40:15.598765212Z"}}"#
            )
            .into_bytes()
        })
        .collect();
    let changes: Vec<StatusChange> = payloads
        .iter()
        .filter_map(
            |payload| match wire::decode(InputKind::StatusChange, payload, 65_536) {
                Ok(Input::StatusChange(change)) => Some(change),
                _ => None,
            },
        )
        .collect();
    let encode = |format: Format| {
        let mut builder = envelope::Builder::new(format);
        for (seq, (payload, change)) in payloads.iter().zip(&changes).enumerate() {
            let content = match format {
                Format::V1 => Content::Json(payload),
                Format::V2 => Content::Change(Cow::Borrowed(change)),
            };
            builder.push(seq as u64, "AlarmStatusChanged", &content);
        }
        builder.finish()
    };
    for format in [Format::V1, Format::V2] {
        let bytes = encode(format);
        let name = format.header();
        c.bench_function(&format!("{name}: encode 256 events"), |b| {
            b.iter(|| black_box(encode(format)))
        });
        c.bench_function(&format!("{name}: read 256 events"), |b| {
            b.iter(|| {
                let entries = envelope::decode(black_box(&bytes)).unwrap_or_default();
                entries
                    .into_iter()
                    .filter(|entry| match &entry.content {
                        Content::Json(payload) => {
                            wire::decode(InputKind::StatusChange, payload, 65_536).is_ok()
                        }
                        Content::Change(_) => true,
                    })
                    .count()
            })
        });
    }
}

criterion_group!(benches, apply_one_event, build_digest, encoding, envelopes);
criterion_main!(benches);
