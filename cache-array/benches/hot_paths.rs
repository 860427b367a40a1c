//! Micro benchmarks of an array server's hot paths (`cargo bench -p cache-array --bench
//! hot_paths`): applying a batch of client puts to the state machine, and appending entries to the
//! sled log up to the fsync that makes them durable. Bounded: each benchmark measures for about
//! three seconds.
//!
//! Both go through the openraft traits the Raft core calls (`RaftStateMachine::apply`,
//! `RaftLogStorage::append`), so they measure what a stripe member does per entry.

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use cache_array::command::{Change, Command, CommandKind};
use cache_array::log_store::LogStore;
use cache_array::state_machine::StateMachineStore;
use cache_array::types::Entry;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferrocotta::protocol::{PutOptions, WriteOp};
use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
use openraft::EntryPayload;

/// The cache `ferrocotta bench` writes to.
const CACHE: &str = "ferrocotta.bench";
/// Value length of every put (the default of `ferrocotta bench`).
const VALUE_BYTES: usize = 100;
/// Entries in one applied batch.
const APPLY_BATCH: usize = 1_000;
/// Entries in one append, from a single client write to a busy active's batch.
const APPEND_BATCHES: [usize; 3] = [1, 16, 256];
/// Wall-clock stamp of the entries (any fixed value: apply never reads the clock).
const AT_MS: u64 = 1_700_000_000_000;

/// Measurement time of each benchmark.
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);
/// Warm-up of each benchmark.
const WARM_UP_TIME: Duration = Duration::from_secs(1);
/// Samples of each benchmark; an append takes milliseconds, so more samples would stretch the
/// run past the measurement time.
const SAMPLE_SIZE: usize = 20;

fn key(i: u64) -> Vec<u8> {
    format!("session-{i:08}").into_bytes()
}

/// A log entry holding a client put, as `Stripe::write` proposes it.
fn put_entry(index: u64, key_number: u64) -> Entry {
    Entry {
        log_id: openraft::testing::log_id(1, 1, index),
        payload: EntryPayload::Normal(Command {
            at_ms: AT_MS,
            kind: CommandKind::Client(write_change(WriteOp::Put {
                cache: CACHE.into(),
                key: key(key_number),
                value: vec![b'v'; VALUE_BYTES],
                opts: PutOptions::default(),
            })),
        }),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn open_state_machine(dir: &Path) -> StateMachineStore {
    StateMachineStore::open(dir, Default::default()).expect("open the state machine")
}

fn state_machine_apply(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let batch: Vec<Entry> = (0..APPLY_BATCH as u64).map(|i| put_entry(i + 1, i)).collect();

    let mut g = c.benchmark_group("state_machine_apply");
    g.throughput(Throughput::Elements(APPLY_BATCH as u64));

    // Every key new: a fresh state machine per batch (built, and dropped with its 1,000 entries,
    // outside the timing).
    g.bench_function("put_1000_new_keys", |b| {
        b.iter_batched(
            || (open_state_machine(dir.path()), batch.clone()),
            |(mut sm, entries)| {
                let results = rt.block_on(sm.apply(entries)).expect("apply");
                (sm, results)
            },
            BatchSize::PerIteration,
        )
    });

    // Every key already there: the steady state of a session cache, where each put replaces a
    // value and returns the previous one.
    let mut sm = open_state_machine(dir.path());
    rt.block_on(sm.apply(batch.clone())).expect("apply");
    g.bench_function("put_1000_existing_keys", |b| {
        b.iter_batched(
            || batch.clone(),
            |entries| rt.block_on(sm.apply(entries)).expect("apply"),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn log_append_flush(c: &mut Criterion) {
    let rt = runtime();
    // Under target/, not /tmp: the fsync must hit the disk the server's data would be on, and
    // /tmp may be a tmpfs where fsync costs nothing.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let (mut log, _) = LogStore::open(dir.path()).expect("open the log store");
    let stats = log.flush_stats();
    let mut next_index = 1u64;

    let mut g = c.benchmark_group("log_append_flush");
    for entries_per_append in APPEND_BATCHES {
        g.throughput(Throughput::Elements(entries_per_append as u64));
        let flushes_before = stats.flushes.load(Relaxed);
        let mut appends = 0u64;
        g.bench_function(format!("append_{entries_per_append}"), |b| {
            b.iter_batched(
                || {
                    // Entries are built outside the timing: openraft hands the store entries it
                    // already holds.
                    let first = next_index;
                    next_index += entries_per_append as u64;
                    (first..next_index).map(|i| put_entry(i, i)).collect::<Vec<_>>()
                },
                |entries| {
                    appends += 1;
                    // `blocking_append` is openraft's own helper: it calls `append` with a real
                    // `LogFlushed` callback (whose constructor openraft keeps to itself) and
                    // returns when the flusher thread has completed it, after its fsync.
                    rt.block_on(log.blocking_append(entries)).expect("append")
                },
                BatchSize::PerIteration,
            )
        });
        let flushes = stats.flushes.load(Relaxed) - flushes_before;
        println!(
            "append_{entries_per_append}: {appends} appends, {flushes} fsyncs, log now {} entries, {} bytes on disk",
            next_index - 1,
            log.size_on_disk()
        );
    }

    // Floor of the above: overwriting one page of a plain file next to the log and fsyncing it,
    // the least an append that waits for durability can cost on this disk.
    g.throughput(Throughput::Elements(1));
    g.bench_function("fsync_floor_4k", |b| {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(dir.path().join("fsync-floor")).expect("create");
        let page = [0u8; 4096];
        b.iter_custom(|iterations| {
            let started = Instant::now();
            for _ in 0..iterations {
                file.write_all_at(black_box(&page), 0).expect("write");
                file.sync_data().expect("fsync");
            }
            started.elapsed()
        })
    });
    g.finish();
}

fn criterion_config() -> Criterion {
    Criterion::default()
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME)
        .sample_size(SAMPLE_SIZE)
}

criterion_group! {
    name = hot_paths;
    config = criterion_config();
    targets = state_machine_apply, log_append_flush
}
criterion_main!(hot_paths);

/// The log's form of a write (no transaction here, so the value limit plays no part).
fn write_change(op: WriteOp) -> Change {
    Change::of_write(op, u64::MAX)
}
