//! The sled store: one shard batch with its flush, a batch of changes alone, and one user's
//! digest among 1M alarms.
//! `cargo bench --bench store`

use chrono::DateTime;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};

use alarm_digest::domain::{Observation, Status, StatusChange};
use alarm_digest::shard_worker::answer::{answer, DigestOptions};
use alarm_digest::store::{ShardStore, Store};

fn change(user: u64, alarm: u64, status: Status, nanos: i64) -> StatusChange {
    StatusChange {
        user_id: format!("bench-user-{user:08}"),
        alarm_id: format!("bench-alarm-{alarm:04}"),
        observation: Observation {
            status,
            changed_at: DateTime::from_timestamp_nanos(1_600_000_000_000_000_000 + nanos),
        },
    }
}

/// The default `limits.max_alarms_per_user`.
const MAX_ALARMS: usize = 10_000;

const STATUSES: [Status; 3] = [Status::Warning, Status::Critical, Status::Cleared];

/// Digests as the service writes them with the default server `max_payload` of 1 MiB.
fn digest_options() -> DigestOptions {
    DigestOptions {
        skip_empty: false,
        max_part_bytes: 1024 * 1024 - 512,
        written_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
    }
}

/// A store in a fresh temporary dir and its shard 0; `None` (said on stderr) if the disk
/// refuses, so the other benchmarks still run.
fn open_shard() -> Option<(tempfile::TempDir, Store, ShardStore)> {
    let opened = tempfile::tempdir()
        .map_err(|e| e.to_string())
        .and_then(|dir| {
            let store = Store::open(dir.path(), 32).map_err(|e| e.to_string())?;
            let shard = store.shard(0).map_err(|e| e.to_string())?;
            Ok((dir, store, shard))
        });
    opened
        .inspect_err(|error| eprintln!("store benchmark skipped: {error}"))
        .ok()
}

/// 450 status changes and 50 digest requests over 10k users, applied, committed and flushed.
fn batch_with_flush(c: &mut Criterion) {
    let Some((_dir, store, mut shard)) = open_shard() else {
        return;
    };
    let mut round = 0u64;
    let options = digest_options();
    c.bench_function("store: batch of 500 mixed messages + flush", |b| {
        b.iter_batched(
            || {
                round += 1;
                round
            },
            |round| {
                let mut write = shard.begin();
                for i in 0..450u64 {
                    let n = round * 450 + i;
                    let _ = write.apply(
                        &change(n % 10_000, n % 10, STATUSES[(n % 3) as usize], n as i64),
                        MAX_ALARMS,
                    );
                }
                for i in 0..50u64 {
                    let _ = answer(
                        &mut write,
                        &format!("bench-user-{:08}", (round * 50 + i) % 10_000),
                        round * 50 + i,
                        &options,
                    );
                }
                let _ = black_box(write.commit());
                let _ = store.flush();
            },
            BatchSize::SmallInput,
        )
    });
}

/// The store's share of ingest: 1,000 status changes of 100k existing alarms (each one a
/// change), applied and committed, no flush; divide by 1,000 for the cost of one event.
fn changes_committed(c: &mut Criterion) {
    let Some((_dir, _store, mut shard)) = open_shard() else {
        return;
    };
    let mut n = 0u64;
    let mut next = move || {
        n += 1;
        change(
            n % 10_000,
            n / 10_000 % 10,
            STATUSES[(n / 100_000 % 3) as usize],
            n as i64,
        )
    };
    let mut fill = shard.begin();
    for _ in 0..100_000 {
        let _ = fill.apply(&next(), MAX_ALARMS);
    }
    let _ = fill.commit();
    c.bench_function("store: 1000 changes of existing alarms, committed", |b| {
        b.iter_batched(
            || (0..1000).map(|_| next()).collect::<Vec<_>>(),
            |changes| {
                let mut write = shard.begin();
                for change in &changes {
                    let _ = write.apply(change, MAX_ALARMS);
                }
                let _ = black_box(write.commit());
            },
            BatchSize::SmallInput,
        )
    });
}

/// Reading (and selecting) one user's 10 alarms among 100k users × 10 alarms.
fn digest_among_a_million(c: &mut Criterion) {
    let Some((_dir, store, mut shard)) = open_shard() else {
        return;
    };
    for chunk in 0..100u64 {
        let mut write = shard.begin();
        for n in chunk * 10_000..(chunk + 1) * 10_000 {
            let _ = write.apply(
                &change(n / 10, n % 10, STATUSES[(n % 3) as usize], n as i64),
                MAX_ALARMS,
            );
        }
        let _ = write.commit();
    }
    let _ = store.flush();
    let mut sequence = 0;
    let options = digest_options();
    c.bench_function("store: one user's digest among 1M alarms", |b| {
        b.iter(|| {
            sequence += 1;
            let mut write = shard.begin();
            // Not committed: every iteration reads the same state.
            black_box(answer(
                &mut write,
                &format!("bench-user-{:08}", (sequence * 7_919) % 100_000),
                sequence,
                &options,
            ))
        })
    });
}

criterion_group!(
    benches,
    batch_with_flush,
    changes_committed,
    digest_among_a_million
);
criterion_main!(benches);
