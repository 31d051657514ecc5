//! Throughput of a Persist store against plain redb doing the same work with
//! the same durability, measured in one run so both sides see the same disk.
//!
//! ```text
//! cargo bench -p persist --bench store                        # full run
//! PERSIST_BENCH_QUICK=1 cargo bench -p persist --bench store  # smoke run, seconds
//! ```
//!
//! The baseline is redb used directly: one table `[u8; 32] → &[u8]`, default
//! (`Durability::Immediate`) commits, the page cache Persist gives redb, and
//! values of the same size (1 KiB of random bytes; Persist stores them as a
//! CBOR byte string, 3 bytes longer). Workloads:
//!
//! 1. single durable put: one write awaited at a time, one commit each;
//! 2. batched puts: batches of 1000 writes, one commit each;
//! 3. random get: a new read transaction per get on both sides (the engine
//!    takes one per `get`), plus redb with one reused transaction for context.
//!
//! Each is run for every side in rounds whose order alternates, and the best
//! round of each side counts, so a noisy moment does not favour either. The
//! same workloads run against `Config::encrypt(false)` for context. Besides
//! throughput, the report gives CPU time per operation (user + system, all
//! threads, from `/proc/self/stat`): unlike wall time it does not depend on
//! how long the disk takes to acknowledge an fsync.
//!
//! Environment:
//!
//! - `PERSIST_BENCH_QUICK=1` shrinks every size to a smoke run;
//! - `PERSIST_BENCH_ROUNDS=n` sets the rounds per side (default 2);
//! - `PERSIST_BENCH_ONLY=single,batched,get` runs only those workloads (`get`
//!   reads what the batched workload loaded, so it runs that too);
//! - `PERSIST_BENCH_SIDES=redb,persist,plain` runs only those sides (for
//!   profiling one of them);
//! - `PERSIST_BENCH_DIR` picks the directory the databases live in (default:
//!   the system temp dir, or `target/persist-bench` when that is a tmpfs, on
//!   which fsync would cost nothing).
//!
//! The bench exits 0 even when a goal is missed: the numbers are for people;
//! CI only checks that it still runs.

// allow-nondeterminism: a benchmark measures wall-clock time, which is
// exactly what the determinism rules keep out of engine logic.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{bench_root, env_usize, fs_type, ms, proc_status_kib, process_cpu, us};
use std::error::Error;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use persist::{Config, Store};
use redb::{ReadableDatabase, TableDefinition};
use serde_bytes::ByteBuf;

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// The baseline's one table.
const TABLE: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("bench");

/// Bytes of each value before encoding.
const VALUE_BYTES: usize = 1024;

/// Distinct random values cycled through, so values are incompressible
/// without holding one per record in memory (which would swamp the
/// peak-memory figure).
const VALUE_POOL_LEN: usize = 256;

/// Seed of the bench's own PRNG: values, keys and get order are the same in
/// every run.
const SEED: u64 = 0x0005_EED0_F9E2_5157;

fn main() -> BenchResult<()> {
    let opts = Options::from_env();
    let sizes = &opts.sizes;
    let root = bench_root()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let data = Data::new(sizes.records());
    println!(
        "persist store bench{}: {} B values, dir {} ({}), {} rounds per side, best counts",
        if opts.quick { " (quick)" } else { "" },
        VALUE_BYTES,
        root.display(),
        fs_type(&root).unwrap_or_else(|| "unknown fs".into()),
        sizes.rounds,
    );

    let mut single = Best::default();
    let mut single_latency: Vec<(Side, Latency)> = Vec::new();
    for round in (0..sizes.rounds).filter(|_| opts.runs("single")) {
        for side in opts.order(round) {
            let dir = tempfile::tempdir_in(&root)?;
            let (m, latency) = match side {
                Side::Redb => redb_single(dir.path(), &data, sizes.single_puts)?,
                _ => rt.block_on(persist_single(dir.path(), side, &data, sizes.single_puts))?,
            };
            single.record(side, m);
            keep_best_latency(&mut single_latency, side, latency);
        }
    }

    // The databases of the last batched round are the ones gets read.
    let mut batched = Best::default();
    let mut memory = Vec::new();
    let mut loaded: Option<Loaded> = None;
    let load = opts.runs("batched") || opts.runs("get");
    for round in (0..sizes.rounds).filter(|_| load) {
        // Only the last round's databases are kept: close the older ones
        // first, so they do not sit in memory while the next round loads.
        if let Some(old) = loaded.take() {
            old.close(&rt)?;
        }
        let mut this_round = Loaded::default();
        for side in opts.order(round) {
            let dir = tempfile::tempdir_in(&root)?;
            let rss_before = reset_peak_rss();
            let m = match side {
                Side::Redb => {
                    let (m, db) = redb_batched(dir.path(), &data, sizes)?;
                    this_round.redb = Some((db, dir));
                    m
                }
                Side::Persist | Side::PersistPlain => {
                    let (m, store) =
                        rt.block_on(persist_batched(dir.path(), side, &data, sizes))?;
                    *this_round.store_mut(side) = Some((store, dir));
                    m
                }
            };
            batched.record(side, m);
            if let (Some(before), Some(peak)) = (rss_before, proc_status_kib("VmHWM")) {
                keep_max(&mut memory, side, peak.saturating_sub(before));
            }
        }
        loaded = Some(this_round);
    }
    let process_peak_kib = proc_status_kib("VmHWM");
    let loaded = loaded.unwrap_or_default();

    let order = random_order(sizes.records(), sizes.gets);
    let mut gets = Best::default();
    let mut redb_reused = Best::default();
    for round in (0..sizes.rounds).filter(|_| opts.runs("get")) {
        for side in opts.order(round) {
            let m = match side {
                Side::Redb => {
                    let (db, _) = loaded.redb.as_ref().ok_or("redb not loaded")?;
                    redb_reused.record(side, redb_gets_reused(db, &data, &order)?);
                    redb_gets(db, &data, &order)?
                }
                Side::Persist | Side::PersistPlain => {
                    let (store, _) = loaded.store(side).ok_or("store not loaded")?;
                    rt.block_on(persist_gets(store, &data, &order))?
                }
            };
            gets.record(side, m);
        }
    }
    loaded.close(&rt)?;

    print_report(sizes, &single, &batched, &gets, redb_reused.redb);
    for (side, latency) in &single_latency {
        println!(
            "single put latency, {:<13} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
            side.name(),
            ms(latency.p50),
            ms(latency.p99),
            ms(latency.max)
        );
    }
    if load {
        match process_peak_kib {
            Some(kib) => println!(
                "peak memory after the {}-record phase: VmHWM {:.1} MiB (whole process, every side's databases)",
                sizes.records(),
                kib as f64 / 1024.0
            ),
            None => println!("peak memory: /proc/self/status not readable"),
        }
    }
    for (side, kib) in memory {
        println!(
            "  peak RSS growth while loading {} records, {:<13} {:>7.1} MiB",
            sizes.records(),
            side.name(),
            kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// What to run, from the environment (see the crate docs).
struct Options {
    quick: bool,
    sizes: Sizes,
    only: Vec<String>,
    sides: Vec<Side>,
}

impl Options {
    fn from_env() -> Self {
        let quick =
            std::env::var_os("PERSIST_BENCH_QUICK").is_some_and(|v| !v.is_empty() && v != "0");
        let mut sizes = if quick { Sizes::quick() } else { Sizes::full() };
        if let Some(rounds) = env_usize("PERSIST_BENCH_ROUNDS") {
            sizes.rounds = rounds.max(1);
        }
        let only = env_list("PERSIST_BENCH_ONLY");
        let sides = env_list("PERSIST_BENCH_SIDES");
        let sides = Side::ALL
            .into_iter()
            .filter(|s| sides.is_empty() || sides.iter().any(|n| n == s.short_name()))
            .collect();
        Options {
            quick,
            sizes,
            only,
            sides,
        }
    }

    fn runs(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }

    /// The sides in the order round `round` runs them: alternating, so no
    /// side always goes first (on a cold cache) or last (on a warm one).
    fn order(&self, round: usize) -> Vec<Side> {
        let mut sides = self.sides.clone();
        if round % 2 == 1 {
            sides.reverse();
        }
        sides
    }
}

/// How much work each workload does.
struct Sizes {
    /// Sequential durable puts.
    single_puts: usize,
    /// Batches in the batched workload (their records are what gets read).
    batches: usize,
    /// Writes per batch.
    batch_len: usize,
    /// Random gets.
    gets: usize,
    /// Rounds per side; the best counts.
    rounds: usize,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            single_puts: 300,
            batches: 100,
            batch_len: 1000,
            gets: 200_000,
            rounds: 2,
        }
    }

    fn quick() -> Self {
        Sizes {
            single_puts: 20,
            batches: 4,
            batch_len: 250,
            gets: 5_000,
            rounds: 2,
        }
    }

    fn records(&self) -> usize {
        self.batches * self.batch_len
    }
}

/// One contestant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Redb,
    Persist,
    PersistPlain,
}

impl Side {
    const ALL: [Side; 3] = [Side::Redb, Side::Persist, Side::PersistPlain];

    fn name(self) -> &'static str {
        match self {
            Side::Redb => "redb",
            Side::Persist => "persist",
            Side::PersistPlain => "persist-plain",
        }
    }

    /// The name `PERSIST_BENCH_SIDES` uses.
    fn short_name(self) -> &'static str {
        match self {
            Side::Redb => "redb",
            Side::Persist => "persist",
            Side::PersistPlain => "plain",
        }
    }
}

/// One run of one workload by one side.
#[derive(Clone, Copy, Default)]
struct Measure {
    ops_per_s: f64,
    /// CPU time of every thread of the process, per operation.
    cpu_per_op: Duration,
}

impl Measure {
    /// Runs `f`, which does `ops` operations, and measures it.
    fn of<T>(ops: usize, f: impl FnOnce() -> BenchResult<T>) -> BenchResult<(Measure, T)> {
        let cpu = process_cpu();
        let start = Instant::now();
        let out = f()?;
        let wall = start.elapsed();
        let cpu = process_cpu().saturating_sub(cpu);
        let ops_u32 = u32::try_from(ops.max(1)).unwrap_or(u32::MAX);
        Ok((
            Measure {
                ops_per_s: ops as f64 / wall.as_secs_f64(),
                cpu_per_op: cpu / ops_u32,
            },
            out,
        ))
    }
}

/// Best round of each side in one workload: highest throughput, and least
/// CPU per operation (each taken on its own).
#[derive(Default)]
struct Best {
    redb: Option<Measure>,
    persist: Option<Measure>,
    plain: Option<Measure>,
}

impl Best {
    fn record(&mut self, side: Side, m: Measure) {
        let slot = match side {
            Side::Redb => &mut self.redb,
            Side::Persist => &mut self.persist,
            Side::PersistPlain => &mut self.plain,
        };
        *slot = Some(match *slot {
            None => m,
            Some(best) => Measure {
                ops_per_s: best.ops_per_s.max(m.ops_per_s),
                cpu_per_op: best.cpu_per_op.min(m.cpu_per_op),
            },
        });
    }
}

/// What every workload reads from: values, paths and baseline keys.
struct Data {
    values: Vec<ByteBuf>,
    paths: Vec<String>,
    keys: Vec<[u8; 32]>,
}

impl Data {
    fn new(records: usize) -> Self {
        let mut rng = SplitMix64(SEED);
        let values = (0..VALUE_POOL_LEN)
            .map(|_| {
                let mut v = vec![0u8; VALUE_BYTES];
                rng.fill(&mut v);
                ByteBuf::from(v)
            })
            .collect();
        let paths = (0..records).map(|i| format!("bench/{i:08}")).collect();
        // Locators are keyed hashes, so the baseline's keys are random too:
        // both B-trees see the same insertion pattern.
        let keys = (0..records)
            .map(|_| {
                let mut k = [0u8; 32];
                rng.fill(&mut k);
                k
            })
            .collect();
        Data {
            values,
            paths,
            keys,
        }
    }

    fn value(&self, i: usize) -> &ByteBuf {
        &self.values[i % VALUE_POOL_LEN]
    }
}

/// The databases loaded by one batched round, kept for the gets.
#[derive(Default)]
struct Loaded {
    redb: Option<(redb::Database, tempfile::TempDir)>,
    persist: Option<(Store, tempfile::TempDir)>,
    plain: Option<(Store, tempfile::TempDir)>,
}

impl Loaded {
    fn store_mut(&mut self, side: Side) -> &mut Option<(Store, tempfile::TempDir)> {
        if side == Side::Persist {
            &mut self.persist
        } else {
            &mut self.plain
        }
    }

    fn store(&self, side: Side) -> Option<&(Store, tempfile::TempDir)> {
        if side == Side::Persist {
            self.persist.as_ref()
        } else {
            self.plain.as_ref()
        }
    }

    fn close(self, rt: &tokio::runtime::Runtime) -> BenchResult<()> {
        for (store, _dir) in [self.persist, self.plain].into_iter().flatten() {
            rt.block_on(store.close())?;
        }
        Ok(())
    }
}

// ---- workloads: plain redb ----

fn redb_open(dir: &Path) -> BenchResult<redb::Database> {
    let mut builder = redb::Builder::new();
    // The cache Persist configures, so neither side reads from a bigger one.
    builder.set_cache_size(persist_storage::CACHE_BYTES_MAX);
    Ok(builder.create(dir.join("plain.redb"))?)
}

fn redb_single(dir: &Path, data: &Data, n: usize) -> BenchResult<(Measure, Latency)> {
    let db = redb_open(dir)?;
    let mut latencies = Vec::with_capacity(n);
    let (m, ()) = Measure::of(n, || {
        for i in 0..n {
            let op = Instant::now();
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(TABLE)?;
                table.insert(&data.keys[i], data.value(i).as_slice())?;
            }
            txn.commit()?;
            latencies.push(op.elapsed());
        }
        Ok(())
    })?;
    Ok((m, Latency::of(latencies)))
}

fn redb_batched(dir: &Path, data: &Data, sizes: &Sizes) -> BenchResult<(Measure, redb::Database)> {
    let db = redb_open(dir)?;
    let (m, ()) = Measure::of(sizes.records(), || {
        for b in 0..sizes.batches {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(TABLE)?;
                for i in b * sizes.batch_len..(b + 1) * sizes.batch_len {
                    table.insert(&data.keys[i], data.value(i).as_slice())?;
                }
            }
            txn.commit()?;
        }
        Ok(())
    })?;
    Ok((m, db))
}

/// A read transaction per get, as the engine does. The value is copied out,
/// as `Store::get` returns an owned value.
fn redb_gets(db: &redb::Database, data: &Data, order: &[usize]) -> BenchResult<Measure> {
    let (m, ()) = Measure::of(order.len(), || {
        for &i in order {
            let txn = db.begin_read()?;
            let table = txn.open_table(TABLE)?;
            let value = table
                .get(&data.keys[i])?
                .ok_or("redb lost a record")?
                .value()
                .to_vec();
            black_box(value);
        }
        Ok(())
    })?;
    Ok(m)
}

/// One read transaction for every get: redb's best case, for context.
fn redb_gets_reused(db: &redb::Database, data: &Data, order: &[usize]) -> BenchResult<Measure> {
    let (m, ()) = Measure::of(order.len(), || {
        let txn = db.begin_read()?;
        let table = txn.open_table(TABLE)?;
        for &i in order {
            let value = table
                .get(&data.keys[i])?
                .ok_or("redb lost a record")?
                .value()
                .to_vec();
            black_box(value);
        }
        Ok(())
    })?;
    Ok(m)
}

// ---- workloads: Persist ----

async fn persist_open(dir: &Path, side: Side) -> BenchResult<Store> {
    let config = Config::new(dir.join("store"))
        .key_file(dir.join("keys").join("device.key"))
        .encrypt(side == Side::Persist);
    Ok(Store::open(config).await?)
}

async fn persist_single(
    dir: &Path,
    side: Side,
    data: &Data,
    n: usize,
) -> BenchResult<(Measure, Latency)> {
    let store = persist_open(dir, side).await?;
    let mut latencies = Vec::with_capacity(n);
    let cpu = process_cpu();
    let start = Instant::now();
    for i in 0..n {
        let op = Instant::now();
        store.put(&data.paths[i], data.value(i)).await?;
        latencies.push(op.elapsed());
    }
    let m = measured(n, start, cpu);
    store.close().await?;
    Ok((m, Latency::of(latencies)))
}

async fn persist_batched(
    dir: &Path,
    side: Side,
    data: &Data,
    sizes: &Sizes,
) -> BenchResult<(Measure, Store)> {
    let store = persist_open(dir, side).await?;
    let cpu = process_cpu();
    let start = Instant::now();
    for b in 0..sizes.batches {
        let mut batch = store.batch();
        for i in b * sizes.batch_len..(b + 1) * sizes.batch_len {
            batch.put(&data.paths[i], data.value(i));
        }
        batch.commit().await?;
    }
    Ok((measured(sizes.records(), start, cpu), store))
}

async fn persist_gets(store: &Store, data: &Data, order: &[usize]) -> BenchResult<Measure> {
    let cpu = process_cpu();
    let start = Instant::now();
    for &i in order {
        let value: ByteBuf = store
            .get(&data.paths[i])
            .await?
            .ok_or("persist lost a record")?;
        black_box(value);
    }
    Ok(measured(order.len(), start, cpu))
}

/// [`Measure::of`] for async code: `ops` operations since `start`, with
/// the process having used `cpu_before` of CPU time at `start`.
fn measured(ops: usize, start: Instant, cpu_before: Duration) -> Measure {
    let wall = start.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    let ops_u32 = u32::try_from(ops.max(1)).unwrap_or(u32::MAX);
    Measure {
        ops_per_s: ops as f64 / wall.as_secs_f64(),
        cpu_per_op: cpu / ops_u32,
    }
}

// ---- report ----

fn print_report(
    sizes: &Sizes,
    single: &Best,
    batched: &Best,
    gets: &Best,
    reused: Option<Measure>,
) {
    let single_name = format!("single durable put (x{})", sizes.single_puts);
    let batched_name = format!("batched put ({}x{})", sizes.batches, sizes.batch_len);
    let get_name = format!(
        "random get ({}k of {}k)",
        sizes.gets / 1000,
        sizes.records() / 1000
    );
    type Row<'a> = (
        &'a str,
        &'a str,
        Option<Measure>,
        Option<Measure>,
        Option<f64>,
    );
    let rows: [Row<'_>; 7] = [
        (
            &single_name,
            "encrypted",
            single.redb,
            single.persist,
            Some(0.90),
        ),
        (
            &batched_name,
            "encrypted",
            batched.redb,
            batched.persist,
            Some(0.75),
        ),
        (&get_name, "encrypted", gets.redb, gets.persist, Some(0.60)),
        (&single_name, "plain", single.redb, single.plain, None),
        (&batched_name, "plain", batched.redb, batched.plain, None),
        (&get_name, "plain", gets.redb, gets.plain, None),
        (&get_name, "vs 1 txn", reused, gets.persist, None),
    ];
    println!();
    println!(
        "{:<30} {:<9} {:>11} {:>11} {:>7} {:>5} {:<7} {:>9} {:>9}",
        "workload",
        "mode",
        "redb op/s",
        "persist",
        "ratio",
        "goal",
        "result",
        "redb cpu",
        "ours cpu"
    );
    for (name, mode, base, ours, goal) in rows {
        let (Some(base), Some(ours)) = (base, ours) else {
            continue;
        };
        let ratio = ours.ops_per_s / base.ops_per_s;
        let (goal, verdict) = match goal {
            Some(g) => (format!("{g:.2}"), if ratio >= g { "PASS" } else { "MISS" }),
            None => ("-".into(), "context"),
        };
        println!(
            "{name:<30} {mode:<9} {:>11.0} {:>11.0} {ratio:>6.2}x {goal:>5} {verdict:<7} {:>7.1}us {:>7.1}us",
            base.ops_per_s,
            ours.ops_per_s,
            us(base.cpu_per_op),
            us(ours.cpu_per_op),
        );
    }
    println!(
        "(ratio = persist/redb ops/s; cpu = CPU time of all threads per op; \"vs 1 txn\": encrypted persist against redb reusing one read txn;\n single durable put is bound by fsync latency, which on VMs depends on vCPU wake-ups as much as on the disk)"
    );
    println!();
}

/// Latency percentiles of one run.
#[derive(Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).saturating_sub(1);
            samples.get(i).copied().unwrap_or_default()
        };
        Latency {
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

/// Keeps, per side, the largest `kib` seen. (A later round reuses memory
/// the allocator kept from an earlier one, so the first round shows the
/// real growth.)
fn keep_max(max: &mut Vec<(Side, u64)>, side: Side, kib: u64) {
    match max.iter_mut().find(|(s, _)| *s == side) {
        Some((_, kept)) => *kept = (*kept).max(kib),
        None => max.push((side, kib)),
    }
}

/// Keeps, per side, the latencies of its round with the lower median.
fn keep_best_latency(best: &mut Vec<(Side, Latency)>, side: Side, latency: Latency) {
    match best.iter_mut().find(|(s, _)| *s == side) {
        Some((_, kept)) if latency.p50 < kept.p50 => *kept = latency,
        Some(_) => {}
        None => best.push((side, latency)),
    }
}

// ---- environment ----

/// Resets the peak RSS (VmHWM) to the current RSS and returns that RSS, so
/// the next VmHWM read is this phase's peak. `None` where Linux's
/// `clear_refs` is not writable.
fn reset_peak_rss() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    proc_status_kib("VmRSS")
}

fn env_list(name: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `gets` record indices drawn uniformly from `0..records`.
fn random_order(records: usize, gets: usize) -> Vec<usize> {
    let mut rng = SplitMix64(SEED ^ 0x6E75);
    (0..gets)
        .map(|_| (rng.next() % records as u64) as usize)
        .collect()
}

/// SplitMix64: a tiny, seedable PRNG, plenty for bench data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}
