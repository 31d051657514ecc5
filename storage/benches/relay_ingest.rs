//! Relay ingest: how fast a relay backend stores pushed envelopes, on redb
//! and on PostgreSQL with one node and with two, measured in one run so
//! every side sees the same machine.
//!
//! ```text
//! PERSIST_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p persist-storage --features postgres --bench relay_ingest
//! PERSIST_BENCH_QUICK=1 ...   # smoke run: 5k envelopes, seconds
//! ```
//!
//! Workload: 100k envelopes of 1 KiB (random bytes, so nothing compresses),
//! each at a new locator, in appends of 1024 — one full `Push` each, one
//! durable transaction each, as a relay session would run them. Sides:
//!
//! 1. `redb`: [`RedbRelay`] on a file under the target directory, one store;
//! 2. `redb, 2 stores`: the same file, two stores appended concurrently
//!    (redb has one writer, so this shows it cannot scale within a node);
//! 3. `postgres, 1 node`: one [`PostgresRelay`], one store;
//! 4. `postgres, 2 nodes`: two [`PostgresRelay`]s over one schema, each
//!    appending half the envelopes to a store of its own, concurrently.
//!    Two stores, because that is what scale-out serves: many stores over
//!    many nodes. Appends to one store take turns on its row lock by
//!    design (gap-free seqs), so
//! 5. `postgres, 2 nodes, 1 store` is shown for contrast: the same halves,
//!    both into one store.
//!
//! Ratios are against `redb` of the same run. The PostgreSQL sides are
//! skipped, with a line saying so, when `PERSIST_TEST_POSTGRES_URL` is
//! unset. Each side runs once on an empty store; the schema is dropped at
//! the end. The bench exits 0 whatever the figures: they are for people.

// allow-nondeterminism: a benchmark measures wall-clock time, which is
// exactly what the determinism rules keep out of relay logic.
#![allow(clippy::disallowed_methods)]

use std::error::Error;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use persist_core::hlc::Hlc;
use persist_core::lww::{Precedence, Version};
use persist_core::{DeviceId, Epoch, Locator, StoreId};
use persist_storage::relay::{Incoming, PostgresRelay, RedbRelay, RelayBackend};

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Envelopes in a full run.
const ENVELOPES_FULL: usize = 100_000;
/// Envelopes in a smoke run (`PERSIST_BENCH_QUICK=1`).
const ENVELOPES_QUICK: usize = 5_000;
/// Bytes per envelope.
const ENVELOPE_BYTES: usize = 1024;
/// Envelopes per append: one full push.
const APPEND_ENTRIES: usize = 1024;

const URL_VAR: &str = "PERSIST_TEST_POSTGRES_URL";

fn main() -> BenchResult<()> {
    let quick = std::env::var("PERSIST_BENCH_QUICK").is_ok_and(|v| v == "1");
    let envelopes = if quick {
        ENVELOPES_QUICK
    } else {
        ENVELOPES_FULL
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(envelopes))
}

async fn run(envelopes: usize) -> BenchResult<()> {
    println!(
        "relay ingest: {envelopes} envelopes of {ENVELOPE_BYTES} B in appends of \
         {APPEND_ENTRIES}, {} cpus",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut report = Report::new(envelopes);

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    {
        let relay = RedbRelay::open(&dir.path().join("one.redb"))?;
        let elapsed = ingest(&[(&relay, 1)], envelopes).await?;
        report.line("redb", elapsed);
    }
    {
        let relay = RedbRelay::open(&dir.path().join("two.redb"))?;
        let elapsed = ingest(&[(&relay, 1), (&relay, 2)], envelopes).await?;
        report.line("redb, 2 stores", elapsed);
    }

    let Some(url) = std::env::var(URL_VAR).ok().filter(|u| !u.trim().is_empty()) else {
        println!("postgres: skipped: {URL_VAR} is not set");
        return Ok(());
    };
    let admin = admin(&url).await?;
    let settings = admin
        .query_one(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'), \
             current_setting('fsync')",
            &[],
        )
        .await?;
    println!(
        "postgres {} (synchronous_commit={}, fsync={})",
        settings.get::<_, String>(0),
        settings.get::<_, String>(1),
        settings.get::<_, String>(2)
    );
    let schema = format!("bench_ingest_{}", std::process::id());
    let result = postgres_sides(&url, &schema, envelopes, &mut report).await;
    admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await?;
    result
}

async fn postgres_sides(
    url: &str,
    schema: &str,
    envelopes: usize,
    report: &mut Report,
) -> BenchResult<()> {
    let one = Arc::new(PostgresRelay::connect(url, Some(schema)).await?);
    let two = Arc::new(PostgresRelay::connect(url, Some(schema)).await?);
    let elapsed = ingest(&[(&*one, 11)], envelopes).await?;
    report.line("postgres, 1 node", elapsed);
    let elapsed = ingest_two_nodes(&one, &two, (21, 22), envelopes).await?;
    report.line("postgres, 2 nodes", elapsed);
    let elapsed = ingest_two_nodes(&one, &two, (31, 31), envelopes).await?;
    report.line("postgres, 2 nodes, 1 store", elapsed);
    Ok(())
}

/// Appends `envelopes` in total, split evenly over `(relay, store)` pairs
/// that run concurrently (on one task each, as sessions would).
async fn ingest<B: RelayBackend>(sides: &[(&B, u8)], envelopes: usize) -> BenchResult<Duration> {
    for (relay, store) in sides {
        relay
            .open_store(&store_id(*store), &[*store; 32], true)
            .await?;
    }
    let share = envelopes / sides.len();
    let start = Instant::now();
    let runs = sides
        .iter()
        .enumerate()
        .map(|(i, (relay, store))| append_all(*relay, *store, i as u8, share));
    for result in join_all(runs).await {
        result?;
    }
    Ok(start.elapsed())
}

/// Two nodes, each on a task of its own, into stores `stores.0` and
/// `stores.1` (the same store if equal).
async fn ingest_two_nodes(
    one: &Arc<PostgresRelay>,
    two: &Arc<PostgresRelay>,
    stores: (u8, u8),
    envelopes: usize,
) -> BenchResult<Duration> {
    one.open_store(&store_id(stores.0), &[stores.0; 32], true)
        .await?;
    two.open_store(&store_id(stores.1), &[stores.1; 32], true)
        .await?;
    let share = envelopes / 2;
    let start = Instant::now();
    let first = tokio::spawn({
        let one = one.clone();
        async move { append_all(&*one, stores.0, 0, share).await }
    });
    let second = tokio::spawn({
        let two = two.clone();
        async move { append_all(&*two, stores.1, 1, share).await }
    });
    first.await??;
    second.await??;
    Ok(start.elapsed())
}

/// `count` envelopes into `store`, in full appends, each at a new locator
/// (`writer` keeps two writers into one store apart).
async fn append_all<B: RelayBackend>(
    relay: &B,
    store: u8,
    writer: u8,
    count: usize,
) -> BenchResult<()> {
    let mut noise = Noise(u64::from(store) << 8 | u64::from(writer) | 1);
    let mut sent = 0;
    while sent < count {
        let batch: Vec<Incoming> = (sent..count.min(sent + APPEND_ENTRIES))
            .map(|n| {
                let mut locator = [0u8; 32];
                locator[0] = writer;
                locator[1..9].copy_from_slice(&(n as u64).to_be_bytes());
                Incoming {
                    locator: Locator(locator),
                    precedence: Precedence {
                        version: Version {
                            hlc: Hlc {
                                ms: n as u64 + 1,
                                counter: 0,
                            },
                            origin: DeviceId([writer; 16]),
                        },
                        epoch: Epoch(1),
                    },
                    envelope: noise.bytes(ENVELOPE_BYTES),
                }
            })
            .collect();
        let len = batch.len();
        let appended = relay.append(&store_id(store), batch).await?;
        assert_eq!(appended.accepted as usize, len, "every envelope is new");
        sent += len;
    }
    Ok(())
}

/// Runs futures concurrently on this task and collects their outputs.
async fn join_all<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

fn store_id(n: u8) -> StoreId {
    StoreId([n; 16])
}

async fn admin(url: &str) -> BenchResult<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Incompressible filler: xorshift64*, seeded per writer.
struct Noise(u64);

impl Noise {
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            out.extend_from_slice(&self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// The figures, with ratios against the first line (redb).
struct Report {
    envelopes: usize,
    baseline: Option<f64>,
}

impl Report {
    fn new(envelopes: usize) -> Self {
        Self {
            envelopes,
            baseline: None,
        }
    }

    fn line(&mut self, side: &str, elapsed: Duration) {
        let rate = self.envelopes as f64 / elapsed.as_secs_f64();
        let mib = rate * ENVELOPE_BYTES as f64 / (1024.0 * 1024.0);
        let baseline = *self.baseline.get_or_insert(rate);
        println!(
            "{side:<28} {:>9.2} s  {rate:>9.0} envelopes/s  {mib:>7.1} MiB/s  {:>5.2}x redb",
            elapsed.as_secs_f64(),
            rate / baseline
        );
    }
}
