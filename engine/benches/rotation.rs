//! Key rotation: how fast the background re-encryption runs, and how fair it
//! is to foreground writes, against plain redb on the same disk in one run.
//!
//! ```text
//! cargo bench -p persist --bench rotation                        # full run
//! PERSIST_BENCH_QUICK=1 cargo bench -p persist --bench rotation  # smoke run, seconds
//! ```
//!
//! One encrypted store is loaded with 100k records of 1 KiB random bytes
//! (`serde_bytes::ByteBuf`), then rotated again and again; every rotation
//! reseals every record. Workloads:
//!
//! 1. rotation rate: `store.crypto().rotate_key()` then `Rotation::wait()`,
//!    records resealed per second of wall time. The baseline is redb used
//!    directly rewriting the same number of 1 KiB values over existing keys,
//!    in key order (the Rotator walks locator order), with default
//!    (`Durability::Immediate`) commits of 256 records (the Rotator's slice,
//!    `ROTATION_SLICE_RECORDS`) and, for context, of 1000 records;
//! 2. fairness: durable `put`s of 1 KiB issued open-loop at a fixed rate
//!    (500/s, paced by `tokio::time::interval`, each put its own task, its
//!    latency counted from the tick that was due, so a stall is not hidden by
//!    the pacing) while a rotation runs, against the same load with no
//!    rotation. The puts rewrite a small hot set of paths, so they neither
//!    grow the store nor add to the next rotation's work. Also: the
//!    rotation's progress rate under that load as a fraction of its idle
//!    rate, both from `Rotation::progress()` sampled every 100 ms (the slope
//!    up to the last sample before the pass ends).
//!
//! Rounds alternate the order of the sides, and the best round of each side
//! counts (for latencies: the round with the lower p99), so a noisy moment
//! favours neither. CPU time (user + system, all threads, from
//! `/proc/self/stat`) per record is given beside the rates.
//!
//! Environment:
//!
//! - `PERSIST_BENCH_QUICK=1` shrinks every size to a smoke run;
//! - `PERSIST_BENCH_ROUNDS=n` sets the rounds per side (default 2);
//! - `PERSIST_BENCH_ONLY=rate,fairness` runs only those workloads;
//! - `PERSIST_BENCH_SIDES=redb,persist` runs only those sides of the rate
//!   workload (for profiling one of them);
//! - `PERSIST_BENCH_RECORDS=n` sets the records in the store;
//! - `PERSIST_BENCH_PUTS_PER_S=n` sets the foreground rate (default 500);
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
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use persist::{Config, Rotation, Store};
use redb::TableDefinition;
use serde_bytes::ByteBuf;

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The baseline's one table.
const TABLE: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("bench");

/// Bytes of each value before encoding.
const VALUE_BYTES: usize = 1024;

/// Distinct random values cycled through, so values are incompressible
/// without holding one per record in memory.
const VALUE_POOL_LEN: usize = 256;

/// Records per commit while loading either side (untimed).
const LOAD_BATCH: usize = 1000;

/// The Rotator's slice: records per background commit.
const SLICE: usize = persist_actors::rotator::ROTATION_SLICE_RECORDS;

/// The baseline's other commit size, for context.
const BIG_COMMIT: usize = 1000;

/// Paths the foreground puts rewrite.
const HOT_PATHS: usize = 1000;

/// How often rotation progress is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Seed of the bench's own PRNG: values and keys are the same in every run.
const SEED: u64 = 0x0005_EED0_F9E2_5157;

/// Goals: rotation rate / redb 256-record commits; foreground p99 during a
/// rotation / without; progress rate under load / idle.
const GOAL_RATE: f64 = 0.60;
const GOAL_P99: f64 = 3.0;
const GOAL_PROGRESS: f64 = 0.20;

fn main() -> BenchResult<()> {
    let opts = Options::from_env();
    let sizes = &opts.sizes;
    let root = bench_root()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let data = Arc::new(Data::new(sizes.records));
    println!(
        "persist rotation bench{}: {} records of {} B, dir {} ({}), {} rounds per side, best counts",
        if opts.quick { " (quick)" } else { "" },
        sizes.records,
        VALUE_BYTES,
        root.display(),
        fs_type(&root).unwrap_or_else(|| "unknown fs".into()),
        sizes.rounds,
    );

    let runs_persist = opts.runs("fairness") || opts.sides.contains(&Side::Persist);
    let runs_redb = opts.runs("rate") && opts.sides.contains(&Side::Redb);

    let store_dir = tempfile::tempdir_in(&root)?;
    let store = if runs_persist {
        let started = Instant::now();
        let store = rt.block_on(persist_load(store_dir.path(), &data))?;
        println!(
            "  loaded the store in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Some(store)
    } else {
        None
    };
    let redb_dir = tempfile::tempdir_in(&root)?;
    let redb = if runs_redb {
        Some(redb_load(redb_dir.path(), &data)?)
    } else {
        None
    };

    // Rotation rate.
    let mut rate = RateBest::default();
    let mut idle_progress: Option<f64> = None;
    for round in (0..sizes.rounds).filter(|_| opts.runs("rate")) {
        for side in opts.order(round) {
            match side {
                Side::Redb => {
                    let db = redb.as_ref().ok_or("redb not loaded")?;
                    for (commit, slot) in [
                        (SLICE, &mut rate.redb_slice),
                        (BIG_COMMIT, &mut rate.redb_big),
                    ] {
                        let m = redb_rewrite(db, &data, commit, round)?;
                        println!(
                            "  round {}: redb rewrite, {commit}/commit: {:.0} records/s",
                            round + 1,
                            m.per_s
                        );
                        keep_best(slot, m);
                    }
                }
                Side::Persist => {
                    let store = store.as_ref().ok_or("store not loaded")?;
                    let run = rt.block_on(rotate(store, &data, None, sizes))?;
                    println!(
                        "  round {}: idle rotation: {} records in {:.1} s, {:.0} records/s ({:.0}/s from progress)",
                        round + 1,
                        run.resealed,
                        run.wall.as_secs_f64(),
                        run.measure.per_s,
                        run.progress_rate,
                    );
                    keep_best(&mut rate.persist, run.measure);
                    idle_progress = Some(idle_progress.unwrap_or(0.0).max(run.progress_rate));
                }
            }
        }
    }

    // Fairness.
    let mut quiet: Option<Latency> = None;
    let mut loaded: Option<Latency> = None;
    let mut loaded_progress: Option<f64> = None;
    for round in (0..sizes.rounds).filter(|_| opts.runs("fairness")) {
        let store = store.as_ref().ok_or("store not loaded")?;
        let mut kinds = [false, true];
        if round % 2 == 1 {
            kinds.reverse();
        }
        for with_rotation in kinds {
            if with_rotation {
                let load = Load {
                    puts_per_s: sizes.puts_per_s,
                    max: sizes.load_max,
                };
                let run = rt.block_on(rotate(store, &data, Some(load), sizes))?;
                let latency = run.latency.ok_or("no latencies")?;
                println!(
                    "  round {}: rotation under load: {} records in {:.1} s, {:.0}/s from progress; {} puts, p99 {:.2} ms",
                    round + 1,
                    run.resealed,
                    run.wall.as_secs_f64(),
                    run.progress_rate,
                    latency.count,
                    ms(latency.p99),
                );
                keep_lower_p99(&mut loaded, latency);
                loaded_progress = Some(loaded_progress.unwrap_or(0.0).max(run.progress_rate));
            } else {
                let stop = Arc::new(AtomicBool::new(false));
                let latency = Latency::of(rt.block_on(foreground_load(
                    store.clone(),
                    data.clone(),
                    sizes.puts_per_s,
                    sizes.quiet,
                    stop,
                ))?);
                println!(
                    "  round {}: no rotation: {} puts, p99 {:.2} ms",
                    round + 1,
                    latency.count,
                    ms(latency.p99)
                );
                keep_lower_p99(&mut quiet, latency);
            }
        }
    }

    let peak_kib = proc_status_kib("VmHWM");
    if let Some(store) = store {
        rt.block_on(store.close())?;
    }
    drop(redb);

    println!();
    print_rate(&rate, sizes);
    if opts.runs("fairness") {
        print_fairness(
            sizes,
            quiet,
            loaded,
            idle_progress.filter(|_| opts.runs("rate")),
            loaded_progress,
        );
    }
    if let Some(kib) = peak_kib {
        println!(
            "peak memory: VmHWM {:.1} MiB (whole process)",
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
        if let Some(records) = env_usize("PERSIST_BENCH_RECORDS") {
            sizes.records = records.max(1);
        }
        if let Some(rate) = env_usize("PERSIST_BENCH_PUTS_PER_S") {
            sizes.puts_per_s = u32::try_from(rate.clamp(1, 100_000)).unwrap_or(500);
        }
        let only = env_list("PERSIST_BENCH_ONLY");
        let sides = env_list("PERSIST_BENCH_SIDES");
        let sides = Side::ALL
            .into_iter()
            .filter(|s| sides.is_empty() || sides.iter().any(|n| n == s.name()))
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
    /// Records in the store (and in the baseline).
    records: usize,
    /// Rounds per side; the best counts.
    rounds: usize,
    /// Foreground puts per second in the fairness workload.
    puts_per_s: u32,
    /// How long the foreground load runs with no rotation.
    quiet: Duration,
    /// Longest the foreground load runs during a rotation (it stops when
    /// the rotation ends, or at this point, whichever comes first).
    load_max: Duration,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            records: 100_000,
            rounds: 2,
            puts_per_s: 500,
            quiet: Duration::from_secs(20),
            load_max: Duration::from_secs(180),
        }
    }

    fn quick() -> Self {
        Sizes {
            records: 5_000,
            rounds: 2,
            puts_per_s: 500,
            quiet: Duration::from_secs(2),
            load_max: Duration::from_secs(20),
        }
    }
}

/// One side of the rate workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Redb,
    Persist,
}

impl Side {
    const ALL: [Side; 2] = [Side::Redb, Side::Persist];

    /// The name `PERSIST_BENCH_SIDES` uses.
    fn name(self) -> &'static str {
        match self {
            Side::Redb => "redb",
            Side::Persist => "persist",
        }
    }
}

/// One timed run over some records.
#[derive(Clone, Copy, Default)]
struct Measure {
    per_s: f64,
    /// CPU time of every thread of the process, per record.
    cpu_per_record: Duration,
}

impl Measure {
    /// `records` processed since `start`, the process having used
    /// `cpu_before` of CPU time at `start`.
    fn since(records: usize, start: Instant, cpu_before: Duration) -> Self {
        let wall = start.elapsed();
        let cpu = process_cpu().saturating_sub(cpu_before);
        let n = u32::try_from(records.max(1)).unwrap_or(u32::MAX);
        Measure {
            per_s: records as f64 / wall.as_secs_f64(),
            cpu_per_record: cpu / n,
        }
    }
}

/// Keeps the highest rate and, on its own, the least CPU per record.
fn keep_best(slot: &mut Option<Measure>, m: Measure) {
    *slot = Some(match *slot {
        None => m,
        Some(best) => Measure {
            per_s: best.per_s.max(m.per_s),
            cpu_per_record: best.cpu_per_record.min(m.cpu_per_record),
        },
    });
}

/// Best round of each contestant in the rate workload.
#[derive(Default)]
struct RateBest {
    redb_slice: Option<Measure>,
    redb_big: Option<Measure>,
    persist: Option<Measure>,
}

/// What every workload reads from: values, paths and baseline keys.
struct Data {
    values: Vec<ByteBuf>,
    paths: Vec<String>,
    /// The baseline's keys, sorted: the order both sides rewrite in.
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
        // both B-trees have the same shape.
        let mut keys: Vec<[u8; 32]> = (0..records)
            .map(|_| {
                let mut k = [0u8; 32];
                rng.fill(&mut k);
                k
            })
            .collect();
        keys.sort_unstable();
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

// ---- plain redb ----

fn redb_load(dir: &Path, data: &Data) -> BenchResult<redb::Database> {
    let mut builder = redb::Builder::new();
    // The cache Persist configures, so neither side reads from a bigger one.
    builder.set_cache_size(persist_storage::CACHE_BYTES_MAX);
    let db = builder.create(dir.join("plain.redb"))?;
    for (b, keys) in data.keys.chunks(LOAD_BATCH).enumerate() {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            for (j, key) in keys.iter().enumerate() {
                table.insert(key, data.value(b * LOAD_BATCH + j).as_slice())?;
            }
        }
        txn.commit()?;
    }
    Ok(db)
}

/// Overwrites every record, in key order, `commit` records per commit, with
/// another value than it held (`pass` shifts the pool).
fn redb_rewrite(
    db: &redb::Database,
    data: &Data,
    commit: usize,
    pass: usize,
) -> BenchResult<Measure> {
    let cpu = process_cpu();
    let start = Instant::now();
    for (c, keys) in data.keys.chunks(commit).enumerate() {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            for (j, key) in keys.iter().enumerate() {
                let i = c * commit + j + pass + 1;
                table.insert(key, data.value(i).as_slice())?;
            }
        }
        txn.commit()?;
    }
    Ok(Measure::since(data.keys.len(), start, cpu))
}

// ---- Persist ----

async fn persist_load(dir: &Path, data: &Data) -> BenchResult<Store> {
    let config = Config::new(dir.join("store")).key_file(dir.join("keys").join("device.key"));
    let store = Store::open(config).await?;
    for (b, paths) in data.paths.chunks(LOAD_BATCH).enumerate() {
        let mut batch = store.batch();
        for (j, path) in paths.iter().enumerate() {
            batch.put(path, data.value(b * LOAD_BATCH + j));
        }
        batch.commit().await?;
    }
    // The hot set the foreground load rewrites, so the first rotation
    // reseals as many records as the later ones.
    let mut batch = store.batch();
    for i in 0..HOT_PATHS {
        batch.put(&hot_path(i), data.value(i));
    }
    batch.commit().await?;
    Ok(store)
}

fn hot_path(i: usize) -> String {
    format!("hot/{:04}", i % HOT_PATHS)
}

/// The foreground load run beside a rotation.
#[derive(Clone, Copy)]
struct Load {
    puts_per_s: u32,
    max: Duration,
}

/// One rotation, with or without foreground load.
struct RotationRun {
    resealed: u64,
    wall: Duration,
    /// Resealed records per second of wall time, `rotate_key` to `wait`.
    measure: Measure,
    /// Resealed records per second from the progress samples: the slope up
    /// to the last sample taken while the pass ran (and, under load, while
    /// the load ran).
    progress_rate: f64,
    /// Foreground put latencies, under load.
    latency: Option<Latency>,
}

/// Rotates the keys of `store` and waits for every record to be resealed,
/// sampling its progress; with `load`, runs foreground puts meanwhile.
async fn rotate(
    store: &Store,
    data: &Arc<Data>,
    load: Option<Load>,
    sizes: &Sizes,
) -> BenchResult<RotationRun> {
    let cpu = process_cpu();
    let start = Instant::now();
    let rotation: Rotation = store.crypto().rotate_key().await?;
    let base = rotation.progress().done;
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = load.map(|l| {
        let (store, data, stop) = (store.clone(), data.clone(), stop.clone());
        tokio::spawn(foreground_load(store, data, l.puts_per_s, l.max, stop))
    });
    let deadline = load.map(|l| l.max);
    // (seconds since start, records resealed) while the pass runs and, under
    // load, the load runs.
    let mut samples = vec![(0.0, 0u64)];
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let p = rotation.progress();
        if !p.active {
            break;
        }
        let t = start.elapsed();
        if deadline.is_some_and(|d| t > d) {
            break;
        }
        samples.push((t.as_secs_f64(), p.done.saturating_sub(base)));
    }
    stop.store(true, Ordering::Relaxed);
    let latency = match load_task {
        Some(task) => Some(Latency::of(task.await??)),
        None => None,
    };
    let done = rotation.wait().await?;
    let wall = start.elapsed();
    let resealed = done.done.saturating_sub(base);
    let measure = Measure::since(usize::try_from(resealed)?, start, cpu);
    if deadline.is_some_and(|d| wall > d) {
        println!(
            "  (the load stopped after {:.0} s, before the rotation ended)",
            sizes.load_max.as_secs_f64()
        );
    }
    let progress_rate = match samples.last() {
        Some(&(t, n)) if t > 0.0 => n as f64 / t,
        _ => 0.0,
    };
    Ok(RotationRun {
        resealed,
        wall,
        measure,
        progress_rate,
        latency,
    })
}

/// Durable 1 KiB puts to the hot paths, `puts_per_s` a second, for `max` or
/// until `stop` is set. Each put is its own task, issued when its tick is
/// due whether or not earlier ones have finished; its latency runs from that
/// tick to the put's return.
async fn foreground_load(
    store: Store,
    data: Arc<Data>,
    puts_per_s: u32,
    max: Duration,
    stop: Arc<AtomicBool>,
) -> BenchResult<Vec<Duration>> {
    let value = Arc::new(data.value(0).clone());
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / puts_per_s);
    // Burst: ticks missed during a stall fire at once, as an app's writes
    // would, and each is timed from when it was due.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let due = ticker.tick().await;
        if due.duration_since(start) >= max {
            break;
        }
        let (store, value) = (store.clone(), value.clone());
        let path = hot_path(i);
        i += 1;
        tasks.push(tokio::spawn(async move {
            store
                .put(&path, value.as_ref())
                .await
                .map(|()| due.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        latencies.push(task.await??);
    }
    Ok(latencies)
}

// ---- report ----

fn print_rate(rate: &RateBest, sizes: &Sizes) {
    let Some(persist) = rate.persist else {
        if let (Some(slice), Some(big)) = (rate.redb_slice, rate.redb_big) {
            println!(
                "redb rewrite: {:.0}/s in commits of {SLICE}, {:.0}/s in commits of {BIG_COMMIT}",
                slice.per_s, big.per_s
            );
        }
        return;
    };
    println!(
        "{:<44} {:>10} {:>9} {:>7} {:>5} result",
        format!("rotation rate ({}k records)", sizes.records / 1000),
        "records/s",
        "cpu/rec",
        "ratio",
        "goal",
    );
    let line = |name: &str, m: Measure, tail: &str| {
        let text = format!(
            "{name:<44} {:>10.0} {:>7.1}us {tail}",
            m.per_s,
            us(m.cpu_per_record)
        );
        println!("{}", text.trim_end());
    };
    if let Some(m) = rate.redb_slice {
        line(&format!("redb rewrite, {SLICE}/commit"), m, "");
    }
    if let Some(m) = rate.redb_big {
        line(&format!("redb rewrite, {BIG_COMMIT}/commit"), m, "");
    }
    let verdict = |ratio: f64| if ratio >= GOAL_RATE { "PASS" } else { "MISS" };
    match rate.redb_slice {
        Some(base) => {
            let ratio = persist.per_s / base.per_s;
            line(
                "persist rotate_key + wait",
                persist,
                &format!(
                    "{ratio:>6.2}x {GOAL_RATE:>5.2} {}  (vs redb {SLICE}/commit)",
                    verdict(ratio)
                ),
            );
        }
        None => line("persist rotate_key + wait", persist, ""),
    }
    if let Some(big) = rate.redb_big {
        println!(
            "{:<44} {:>10} {:>9} {:>6.2}x {:>5} context",
            format!("  vs redb {BIG_COMMIT}/commit"),
            "",
            "",
            persist.per_s / big.per_s,
            "-"
        );
    }
    println!(
        "(redb rewrites the same number of 1 KiB values over existing keys in key order, durable commits;\n cpu = CPU time of all threads per record)"
    );
    println!();
}

fn print_fairness(
    sizes: &Sizes,
    quiet: Option<Latency>,
    loaded: Option<Latency>,
    idle_rate: Option<f64>,
    loaded_rate: Option<f64>,
) {
    println!(
        "{:<44} {:>7} {:>9} {:>9} {:>9} {:>7} {:>5} result",
        format!("fairness: durable put at {}/s", sizes.puts_per_s),
        "puts",
        "p50 ms",
        "p99 ms",
        "max ms",
        "ratio",
        "goal",
    );
    let row = |name: &str, l: Latency, tail: &str| {
        let text = format!(
            "{name:<44} {:>7} {:>9.2} {:>9.2} {:>9.2} {tail}",
            l.count,
            ms(l.p50),
            ms(l.p99),
            ms(l.max)
        );
        println!("{}", text.trim_end());
    };
    if let Some(q) = quiet {
        row("no rotation", q, "");
    }
    if let Some(l) = loaded {
        let tail = match quiet {
            Some(q) => {
                let ratio = l.p99.as_secs_f64() / q.p99.as_secs_f64().max(1e-9);
                let verdict = if ratio <= GOAL_P99 { "PASS" } else { "MISS" };
                format!("{ratio:>6.2}x {GOAL_P99:>5.2} {verdict}  (p99 vs no rotation)")
            }
            None => String::new(),
        };
        row("during a rotation", l, &tail);
    }
    if let (Some(idle), Some(under)) = (idle_rate, loaded_rate) {
        let fraction = under / idle.max(1e-9);
        let verdict = if fraction >= GOAL_PROGRESS {
            "PASS"
        } else {
            "MISS"
        };
        println!(
            "{:<44} {:>7} {:>9} {:>9} {:>9} {:>6.2}x {:>5.2} {verdict}  ({:.0}/s under load, {:.0}/s idle)",
            "rotation progress under load / idle",
            "",
            "",
            "",
            "",
            fraction,
            GOAL_PROGRESS,
            under,
            idle
        );
    } else if let Some(under) = loaded_rate {
        println!("rotation progress under load: {under:.0} records/s (no idle run to compare)");
    }
    println!(
        "(puts are issued open-loop on a {}/s tick and timed from the tick that was due;\n progress rates are the slope of Rotation::progress() sampled every {} ms)",
        sizes.puts_per_s,
        SAMPLE_EVERY.as_millis()
    );
    println!();
}

/// Latency percentiles of one run.
#[derive(Clone, Copy)]
struct Latency {
    count: usize,
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
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

fn keep_lower_p99(best: &mut Option<Latency>, latency: Latency) {
    if best.is_none_or(|b| latency.p99 < b.p99) {
        *best = Some(latency);
    }
}

// ---- environment ----

fn env_list(name: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
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
