//! Sync throughput: 100k × 1 KiB records from device A through a relay to
//! device B, durable on B, against raw QUIC relaying of the same bytes plus
//! a plain redb ingest of them, measured in one run on the same disk.
//!
//! ```text
//! cargo bench -p persist --bench sync                        # full run
//! PERSIST_BENCH_QUICK=1 cargo bench -p persist --bench sync  # smoke run, seconds
//! ```
//!
//! **Persist.** A relay node (`persist_relay::start` over `RedbRelay`, on
//! disk) on loopback. Device A is created syncing with it (so its member
//! announcement reaches the relay first, as for any device that syncs from
//! the start), exported, and closed; device B joins from the export and
//! syncs once. Then, untimed, A is reopened *without* sync and loaded with
//! the records in batched puts of [`WRITE_BATCH`] (one commit each), and
//! closed. The clock starts just before A is reopened *with* sync: opening
//! it starts its session, which connects and pushes the change log. It stops
//! when B has applied every record (its `sync_status().pulled` has grown by
//! the record count), B's `sync_now()` has returned and a `get` of the last
//! path on B succeeds. B applies what it pulls in durable commits. Both
//! devices and the relay share one tokio runtime. For context, a third
//! device C then joins and catches up alone from the relay, which already
//! holds everything: the pull-and-apply path without a concurrent push.
//!
//! **Baseline.** A minimal relay built directly on persist-transport (quinn,
//! rustls, the same `persist/1` framing) with no storage: client A sends the
//! same number of opaque blobs, each as long as Persist's envelope of one
//! record, with 32-byte random keys, in `Push` frames packed like Persist's
//! (at most `ENTRIES_PER_MESSAGE_MAX` entries, `MESSAGE_PAYLOAD_BYTES_TARGET`
//! bytes), streamed without waiting for acknowledgements; the relay forwards
//! each as a `Batch` to client B. Timed from before A connects until B holds
//! every blob. Then B's blobs are ingested into one plain redb database (one
//! table `[u8; 32] → &[u8]`, the page cache Persist gives redb) in commits of
//! [`INGEST_BATCH`] with default (`Durability::Immediate`) durability,
//! timed on their own. Baseline time = relay time + ingest time.
//!
//! Goal: Persist's time ≤ 1.5 × the baseline's. Rounds alternate which side
//! goes first; the best round of each side counts. CPU time (user + system,
//! all threads, from `/proc/self/stat`) per record is given beside the
//! times.
//!
//! Environment:
//!
//! - `PERSIST_BENCH_QUICK=1` shrinks the run to 5k records (a smoke run);
//! - `PERSIST_BENCH_RECORDS=n` sets the record count;
//! - `PERSIST_BENCH_ROUNDS=n` sets the rounds per side (default 1);
//! - `PERSIST_BENCH_SIDES=baseline,persist` runs only those sides (for
//!   profiling one of them);
//! - `PERSIST_BENCH_DIR` picks the directory the databases live in (default:
//!   the system temp dir, or `target/persist-bench` when that is a tmpfs, on
//!   which fsync would cost nothing).
//!
//! The bench exits 0 even when the goal is missed: the numbers are for
//! people; CI only checks that it still runs.

// allow-nondeterminism: a benchmark measures wall-clock time, which is
// exactly what the determinism rules keep out of engine logic.
#![allow(clippy::disallowed_methods)]

#[allow(dead_code)]
mod common;

use common::{bench_root, env_usize, fs_type, ms, proc_status_kib, process_cpu, us};
use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use persist::{Config, KdfParams, Remote, Store, SyncConfig};
use persist_core::Locator;
use persist_core::env::{Entropy, SeededEntropy};
use persist_core::envelope::{self, Flags, SealContext};
use persist_core::hlc::Hlc;
use persist_core::keyring::Keyring;
use persist_core::keys::DeviceIdentity;
use persist_core::protocol::{
    ENTRIES_PER_MESSAGE_MAX, LogEntry, MESSAGE_PAYLOAD_BYTES_TARGET, Message, PushEntry,
};
use persist_core::record::Record;
use persist_relay::RelayConfig;
use persist_storage::relay::RedbRelay;
use persist_transport::tls::{DEFAULT_SERVER_NAME, ServerIdentity};
use persist_transport::{Server, Trust};
use redb::TableDefinition;
use serde_bytes::ByteBuf;

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The baseline's one table.
const TABLE: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("bench");

/// Bytes of each value before encoding.
const VALUE_BYTES: usize = 1024;
/// Distinct random values (and baseline blobs) cycled through, so data is
/// incompressible without holding one per record in memory.
const VALUE_POOL_LEN: usize = 256;
/// Records per batched put while loading device A (untimed), as an app
/// importing data would write them.
const WRITE_BATCH: usize = 1000;
/// Blobs per durable commit of the baseline's ingest.
const INGEST_BATCH: usize = 1024;
/// The goal: Persist's time at most this multiple of the baseline's.
const GOAL_RATIO: f64 = 1.5;
/// How often the clock side polls sync status while waiting.
const POLL: Duration = Duration::from_millis(2);
/// Longest wait for a sync to finish before the bench gives up.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// The passphrase of A's key export (a bench, not a secret).
const PASSPHRASE: &str = "bench passphrase";
/// Seed of the bench's own PRNG.
const SEED: u64 = 0x5_0C5E_ED5E_ED00;

fn main() -> BenchResult<()> {
    let opts = Options::from_env();
    let root = bench_root()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let envelope_len = envelope_len()?;
    let data = Data::new(opts.records, envelope_len);
    println!(
        "persist sync bench{}: {} records of {} B values ({} B envelopes), dir {} ({}), {} round(s) per side, best counts",
        if opts.quick { " (quick)" } else { "" },
        opts.records,
        VALUE_BYTES,
        envelope_len,
        root.display(),
        fs_type(&root).unwrap_or_else(|| "unknown fs".into()),
        opts.rounds,
    );

    let mut baseline: Option<Baseline> = None;
    let mut persist: Option<PersistRun> = None;
    for round in 0..opts.rounds {
        for side in opts.order(round) {
            let dir = tempfile::tempdir_in(&root)?;
            match side {
                Side::Baseline => {
                    let b = rt.block_on(baseline_round(dir.path(), &data))?;
                    println!(
                        "  round {round} baseline: relay {:.0} ms + ingest {:.0} ms = {:.0} ms",
                        ms(b.relay.wall),
                        ms(b.ingest.wall),
                        ms(b.total())
                    );
                    baseline = Some(match baseline {
                        Some(best) if best.total() <= b.total() => best,
                        _ => b,
                    });
                }
                Side::Persist => {
                    let p = rt.block_on(persist_round(dir.path(), &data))?;
                    println!(
                        "  round {round} persist: A pushed all at {:.0} ms, B applied all at {:.0} ms (load of A, untimed: {:.0} ms)",
                        ms(p.pushed_at),
                        ms(p.sync.wall),
                        ms(p.load)
                    );
                    persist = Some(match persist {
                        Some(best) if best.sync.wall <= p.sync.wall => best,
                        _ => p,
                    });
                }
            }
        }
    }
    print_report(opts.records, baseline.as_ref(), persist.as_ref());
    if let Some(kib) = proc_status_kib("VmHWM") {
        println!(
            "peak memory: VmHWM {:.1} MiB (whole process: relay, both devices, baseline's received blobs)",
            kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// What to run, from the environment (see the crate docs).
struct Options {
    quick: bool,
    records: usize,
    rounds: usize,
    sides: Vec<Side>,
}

impl Options {
    fn from_env() -> Self {
        let quick =
            std::env::var_os("PERSIST_BENCH_QUICK").is_some_and(|v| !v.is_empty() && v != "0");
        let records = env_usize("PERSIST_BENCH_RECORDS")
            .unwrap_or(if quick { 5_000 } else { 100_000 })
            .max(1);
        let rounds = env_usize("PERSIST_BENCH_ROUNDS").unwrap_or(1).max(1);
        let names: Vec<String> = std::env::var("PERSIST_BENCH_SIDES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let sides = Side::ALL
            .into_iter()
            .filter(|s| names.is_empty() || names.iter().any(|n| n == s.name()))
            .collect();
        Options {
            quick,
            records,
            rounds,
            sides,
        }
    }

    /// The sides in the order round `round` runs them: alternating.
    fn order(&self, round: usize) -> Vec<Side> {
        let mut sides = self.sides.clone();
        if round % 2 == 1 {
            sides.reverse();
        }
        sides
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Baseline,
    Persist,
}

impl Side {
    const ALL: [Side; 2] = [Side::Baseline, Side::Persist];

    fn name(self) -> &'static str {
        match self {
            Side::Baseline => "baseline",
            Side::Persist => "persist",
        }
    }
}

/// Wall and CPU time of one timed phase.
#[derive(Clone, Copy, Default)]
struct Timed {
    wall: Duration,
    cpu: Duration,
}

impl Timed {
    fn since(start: Instant, cpu_before: Duration) -> Timed {
        Timed {
            wall: start.elapsed(),
            cpu: process_cpu().saturating_sub(cpu_before),
        }
    }
}

/// The bench's data: Persist's values and paths, the baseline's keys and
/// blobs.
struct Data {
    values: Vec<ByteBuf>,
    paths: Vec<String>,
    keys: Vec<[u8; 32]>,
    blobs: Vec<Vec<u8>>,
}

impl Data {
    fn new(records: usize, envelope_len: usize) -> Self {
        let mut rng = SplitMix64(SEED);
        let mut random = |len: usize| {
            let mut v = vec![0u8; len];
            rng.fill(&mut v);
            v
        };
        let values = (0..VALUE_POOL_LEN)
            .map(|_| ByteBuf::from(random(VALUE_BYTES)))
            .collect();
        let blobs = (0..VALUE_POOL_LEN).map(|_| random(envelope_len)).collect();
        let keys = (0..records)
            .map(|_| random(32).try_into().unwrap_or([0; 32]))
            .collect();
        let paths = (0..records).map(|i| format!("bench/{i:08}")).collect();
        Data {
            values,
            paths,
            keys,
            blobs,
        }
    }

    fn records(&self) -> usize {
        self.paths.len()
    }

    fn value(&self, i: usize) -> &ByteBuf {
        &self.values[i % VALUE_POOL_LEN]
    }

    fn blob(&self, i: usize) -> &[u8] {
        &self.blobs[i % VALUE_POOL_LEN]
    }
}

/// The length of Persist's envelope of one bench record: a 1 KiB value as
/// the engine encodes it (CBOR byte string), at a path of the bench's
/// length, sealed as the engine seals it.
fn envelope_len() -> BenchResult<usize> {
    let entropy = SeededEntropy::from_u64(SEED);
    let mut rng = entropy.stream("sync-bench");
    let device = DeviceIdentity::generate(&mut rng);
    let ring = Keyring::create(device, "bench", Hlc::default(), &mut rng);
    let mut value = Vec::new();
    ciborium::into_writer(&ByteBuf::from(vec![0u8; VALUE_BYTES]), &mut value)?;
    let record = Record {
        path: format!("bench/{:08}", 0),
        value,
        origin: ring.device_id(),
        hlc: Hlc {
            ms: 1_700_000_000_000,
            counter: 0,
        },
    };
    let locator = ring.index_key.locator(&ring.store_id, &record.path);
    let ctx = SealContext {
        store_id: ring.store_id,
        epoch: ring.current,
        data_key: ring.current_key(),
        signing_key: ring.device.signing_key(),
        signer: ring.device_id(),
    };
    Ok(envelope::seal(&ctx, &locator, &record, Flags::default(), 1, &mut rng)?.len())
}

// ---- baseline: raw relay, then plain ingest ----

struct Baseline {
    relay: Timed,
    ingest: Timed,
}

impl Baseline {
    fn total(&self) -> Duration {
        self.relay.wall + self.ingest.wall
    }
}

async fn baseline_round(dir: &Path, data: &Data) -> BenchResult<Baseline> {
    let (relay, received) = raw_relay(data).await?;
    let db = redb_open(dir)?;
    let ingest = tokio::task::block_in_place(|| plain_ingest(&db, &received))?;
    let stored = {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        db.begin_read()?.open_table(TABLE)?.len()?
    };
    if stored != data.records() as u64 {
        return Err(format!("baseline stored {stored} of {} blobs", data.records()).into());
    }
    Ok(Baseline { relay, ingest })
}

/// Relays every blob from client A to client B through a storage-less
/// relay; returns the time and what B received.
async fn raw_relay(data: &Data) -> BenchResult<(Timed, Vec<LogEntry>)> {
    let identity = ServerIdentity::self_signed()?;
    let server = Server::bind("127.0.0.1:0".parse()?, &identity)?;
    let addr = server.local_addr();
    let trust = Trust::Pin(identity.pin());
    let records = data.records();

    // The relay: the first connection is the receiver (it speaks first, so
    // its stream is seen), the second the sender, whose pushes become
    // batches for the receiver as they arrive.
    let relay = tokio::spawn(async move {
        let receiver = server.accept().await.ok_or("no receiver")?;
        let (mut to_b, mut from_b) = receiver.accept_stream().await?;
        from_b.recv().await?.ok_or("receiver said nothing")?;
        let sender = server.accept().await.ok_or("no sender")?;
        let (_to_a, mut from_a) = sender.accept_stream().await?;
        let mut seq = 0u64;
        while let Some(msg) = from_a.recv().await? {
            let Message::Push { entries, .. } = msg else {
                return Err("the sender sent something other than a push".into());
            };
            let entries: Vec<LogEntry> = entries
                .into_iter()
                .map(|e| {
                    seq += 1;
                    LogEntry {
                        seq,
                        locator: e.locator,
                        envelope: e.envelope,
                    }
                })
                .collect();
            to_b.send(&Message::Batch {
                entries,
                cursor: seq,
                more: false,
            })
            .await?;
        }
        to_b.finish().await?;
        // Keep the connections open until the receiver has read everything.
        let _ = from_b.recv().await;
        drop((sender, receiver));
        Ok::<_, Box<dyn Error + Send + Sync>>(())
    });

    let b_conn = persist_transport::connect(addr, DEFAULT_SERVER_NAME, &trust).await?;
    let (mut b_tx, mut b_rx) = b_conn.open_stream().await?;
    b_tx.send(&Message::Subscribe).await?;
    let receive = tokio::spawn(async move {
        let mut received: Vec<LogEntry> = Vec::with_capacity(records);
        while received.len() < records {
            match b_rx.recv().await? {
                Some(Message::Batch { entries, .. }) => received.extend(entries),
                Some(other) => return Err(format!("unexpected {}", other.kind()).into()),
                None => break,
            }
        }
        Ok::<_, Box<dyn Error + Send + Sync>>((received, Instant::now()))
    });
    // Let the relay take B's connection and stream first.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let cpu = process_cpu();
    let start = Instant::now();
    let a_conn = persist_transport::connect(addr, DEFAULT_SERVER_NAME, &trust).await?;
    let (mut a_tx, _a_rx) = a_conn.open_stream().await?;
    let mut id = 0;
    let mut entries = Vec::new();
    let mut bytes = 0;
    for i in 0..records {
        entries.push(PushEntry {
            locator: Locator(data.keys[i]),
            envelope: data.blob(i).to_vec(),
        });
        bytes += data.blob(i).len();
        if entries.len() == ENTRIES_PER_MESSAGE_MAX
            || bytes >= MESSAGE_PAYLOAD_BYTES_TARGET
            || i + 1 == records
        {
            id += 1;
            a_tx.send(&Message::Push {
                id,
                entries: std::mem::take(&mut entries),
            })
            .await?;
            bytes = 0;
        }
    }
    a_tx.finish().await?;
    let (received, end) = receive.await??;
    let relay_time = Timed {
        wall: end.duration_since(start),
        cpu: process_cpu().saturating_sub(cpu),
    };
    b_tx.finish().await?;
    relay.await??;
    drop((a_conn, b_conn));
    if received.len() != records {
        return Err(format!("B received {} of {records} blobs", received.len()).into());
    }
    Ok((relay_time, received))
}

fn redb_open(dir: &Path) -> BenchResult<redb::Database> {
    let mut builder = redb::Builder::new();
    // The cache Persist configures, so neither side has a bigger one.
    builder.set_cache_size(persist_storage::CACHE_BYTES_MAX);
    Ok(builder.create(dir.join("plain.redb"))?)
}

/// Inserts every received blob under its key, [`INGEST_BATCH`] per durable
/// commit.
fn plain_ingest(db: &redb::Database, received: &[LogEntry]) -> BenchResult<Timed> {
    let cpu = process_cpu();
    let start = Instant::now();
    for batch in received.chunks(INGEST_BATCH) {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            for entry in batch {
                table.insert(&entry.locator.0, entry.envelope.as_slice())?;
            }
        }
        txn.commit()?;
    }
    Ok(Timed::since(start, cpu))
}

// ---- Persist: device A → relay → device B ----

struct PersistRun {
    /// Loading A, untimed (for context).
    load: Duration,
    /// From A's reopen with sync until A's session had every record
    /// acknowledged by the relay.
    pushed_at: Duration,
    /// From A's reopen with sync until B had applied every record.
    sync: Timed,
    /// A third device's catch-up alone, from its open until it holds
    /// everything.
    catch_up: Timed,
}

async fn persist_round(dir: &Path, data: &Data) -> BenchResult<PersistRun> {
    let relay_dir = dir.join("relay");
    std::fs::create_dir_all(&relay_dir)?;
    let backend = RedbRelay::open(&relay_dir.join("relay.redb"))?;
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    let relay = persist_relay::start(RelayConfig::new(listen, &relay_dir), backend).await?;
    let remote = Remote::pinned(
        &format!("quic://{}", relay.addr()),
        &relay.pin().to_string(),
    )?;
    let sync_to = || SyncConfig::new(remote.clone());

    // A: created syncing (its member announcement reaches the relay),
    // exported for B, then loaded offline.
    let a = Store::open(device(dir, "a").sync(sync_to())).await?;
    a.sync_now().await?;
    let export = a.crypto().export_key_with(PASSPHRASE).await?;
    a.close().await?;
    let a = Store::open(device(dir, "a")).await?;
    let load_start = Instant::now();
    for (b, chunk) in data.paths.chunks(WRITE_BATCH).enumerate() {
        let mut batch = a.batch();
        for (j, path) in chunk.iter().enumerate() {
            batch.put(path, data.value(b * WRITE_BATCH + j));
        }
        batch.commit().await?;
    }
    let load = load_start.elapsed();
    a.close().await?;

    // B: joins from the export and catches up (A's announcement).
    let b = Store::open(
        device(dir, "b")
            .key(&export.export, PASSPHRASE)
            .sync(sync_to()),
    )
    .await?;
    b.sync_now().await?;
    let pulled_before = b.sync_status().ok_or("b syncs")?.pulled;
    let records = data.records() as u64;
    let last = data.paths.last().ok_or("no records")?;

    let cpu = process_cpu();
    let start = Instant::now();
    let a = Store::open(device(dir, "a").sync(sync_to())).await?;
    let mut pushed_at = None;
    loop {
        if start.elapsed() > SYNC_TIMEOUT {
            return Err(format!(
                "no sync within {SYNC_TIMEOUT:?}: A {:?}, B {:?}",
                a.sync_status(),
                b.sync_status()
            )
            .into());
        }
        let a_status = a.sync_status().ok_or("a syncs")?;
        if pushed_at.is_none() && a_status.pushed >= records {
            pushed_at = Some(start.elapsed());
        }
        let b_status = b.sync_status().ok_or("b syncs")?;
        if b_status.pulled - pulled_before >= records {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    b.sync_now().await?;
    let got: Option<ByteBuf> = b.get(last).await?;
    let sync = Timed::since(start, cpu);
    if got.as_ref() != Some(data.value(data.records() - 1)) {
        return Err("B does not hold A's last record".into());
    }
    let pushed_at = match pushed_at {
        Some(t) => t,
        None => {
            // B had everything before A's status said so: wait for A.
            while a.sync_status().ok_or("a syncs")?.pushed < records {
                tokio::time::sleep(POLL).await;
            }
            start.elapsed()
        }
    };
    let refused = b.sync_status().ok_or("b syncs")?.refused;
    if refused != 0 {
        return Err(format!("B refused {refused} envelopes").into());
    }

    a.close().await?;
    b.close().await?;

    // Context: a third device catching up alone from a relay that already
    // holds everything, so the pull-and-apply path is timed without a
    // concurrent push.
    let cpu = process_cpu();
    let start = Instant::now();
    let c = Store::open(
        device(dir, "c")
            .key(&export.export, PASSPHRASE)
            .sync(sync_to()),
    )
    .await?;
    c.sync_now().await?;
    let got: Option<ByteBuf> = c.get(last).await?;
    let catch_up = Timed::since(start, cpu);
    if got.is_none() || c.sync_status().ok_or("c syncs")?.pulled < records {
        return Err("C did not catch up".into());
    }
    c.close().await?;
    relay.shutdown().await;
    Ok(PersistRun {
        load,
        pushed_at,
        sync,
        catch_up,
    })
}

fn device(dir: &Path, name: &str) -> Config {
    Config::new(dir.join(name).join("store"))
        .key_file(dir.join(name).join("keys").join("device.key"))
        .name(name)
        .dangerous()
        // Only the (untimed) export for B derives a key from a passphrase.
        .export_kdf(KdfParams::insecure_for_tests())
        .done()
}

// ---- report ----

fn print_report(records: usize, baseline: Option<&Baseline>, persist: Option<&PersistRun>) {
    let n = records.max(1) as f64;
    let per_record = |d: Duration| us(d) / n;
    let rate = |d: Duration| n / d.as_secs_f64();
    println!();
    println!(
        "{:<44} {:>10} {:>12} {:>14}",
        "phase", "wall ms", "records/s", "cpu/record"
    );
    let row = |name: &str, t: Timed| {
        println!(
            "{name:<44} {:>10.0} {:>12.0} {:>12.1}us",
            ms(t.wall),
            rate(t.wall),
            per_record(t.cpu)
        );
    };
    if let Some(b) = baseline {
        row("baseline: raw QUIC relay A -> B", b.relay);
        row("baseline: plain redb ingest (1024/commit)", b.ingest);
        row(
            "baseline: total",
            Timed {
                wall: b.total(),
                cpu: b.relay.cpu + b.ingest.cpu,
            },
        );
    }
    if let Some(p) = persist {
        row("persist: A -> relay (redb) -> B, durable", p.sync);
        println!(
            "{:<44} {:>10.0}",
            "  (A's last push acknowledged at)",
            ms(p.pushed_at)
        );
        row("  (context: catch-up alone, relay -> C)", p.catch_up);
    }
    if let (Some(b), Some(p)) = (baseline, persist) {
        let ratio = p.sync.wall.as_secs_f64() / b.total().as_secs_f64();
        println!();
        println!(
            "ratio persist / (raw relay + plain ingest) = {ratio:.2}x  goal <= {GOAL_RATIO:.1}x  {}",
            if ratio <= GOAL_RATIO { "PASS" } else { "MISS" }
        );
    }
    println!(
        "(cpu = CPU time of all threads of the process per record; the baseline's relay, A and B share the process like Persist's)"
    );
    println!();
}

// ---- environment ----

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
