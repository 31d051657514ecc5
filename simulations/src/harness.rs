//! One simulation run: a paused runtime, a seeded store, a workload.
//!
//! [`run`] builds a current-thread tokio runtime whose clock is paused (it
//! moves only when every task is idle, and then straight to the next
//! timer), opens a store whose clock and randomness come from the seed,
//! drives a [`Workload`] through setup, run and check, and returns the
//! trace hash. Any failure carries the command that replays it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use persist::{Config, Env, MemoryBackend, Store};
use persist_core::env::FaultPoint;

use crate::cluster::{Cluster, derive};
use crate::net::SimNet;
use crate::sync::{self, SyncFault, SyncOptions, SyncRunError, SyncWorkload};
use crate::trace::{Event, Trace, TraceHash};
use crate::workload::{Ctx, KvWorkload, ModelFault, Workload, WorkloadError};

/// Operations per run unless told otherwise.
pub const OPS_DEFAULT: usize = 500;

/// Where every run's clock starts (2026-05-28T20:26:40Z): a fixed, plausible
/// present, so that HLC values look like real ones.
pub const START_MS: u64 = 1_780_000_000_000;

/// Where the store keeps its database.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum BackendKind {
    /// A redb file in a temporary directory, as on a device.
    #[default]
    File,
    /// A [`MemoryBackend`]; the final database bytes join the trace hash.
    Memory,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::File => "file",
            BackendKind::Memory => "memory",
        })
    }
}

/// Which workload a run drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum WorkloadKind {
    /// One device: puts, deletes, gets against a model.
    #[default]
    Kv,
    /// Several devices syncing through a faulty network and relay, with
    /// rotations, crashes and partitions (see [`crate::sync`]).
    Sync,
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkloadKind::Kv => "kv",
            WorkloadKind::Sync => "sync",
        })
    }
}

/// What carries the sync workload's connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum NetProfile {
    /// In-memory byte pipes with seeded faults (fast).
    #[default]
    Memory,
    /// Real quinn connections, every secret seeded, over a simulated UDP
    /// network that loses, duplicates and reorders datagrams (slower; see
    /// [`crate::quicnet`]).
    Quic,
}

impl fmt::Display for NetProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetProfile::Memory => "memory",
            NetProfile::Quic => "quic",
        })
    }
}

/// Which of the product's fault points (`persist_core::env::FaultPoint`)
/// a `sync` run lets fire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FaultPoints {
    /// Each on or off for the whole run, as the seed draws (the default).
    #[default]
    Seeded,
    /// None.
    Off,
    /// Exactly these, each firing as often as a seeded one that is on.
    Only(Vec<FaultPoint>),
}

impl std::str::FromStr for FaultPoints {
    type Err = String;

    /// `seeded`, `none`, or a comma-separated list of point names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "seeded" => return Ok(FaultPoints::Seeded),
            "none" => return Ok(FaultPoints::Off),
            _ => {}
        }
        let names: Vec<&str> = FaultPoint::ALL.iter().map(|p| p.name()).collect();
        s.split(',')
            .map(|name| {
                FaultPoint::ALL
                    .into_iter()
                    .find(|p| p.name() == name.trim())
                    .ok_or_else(|| {
                        format!(
                            "no fault point {name:?}: say seeded, none, or a comma-separated \
                             list of {}",
                            names.join(", ")
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(FaultPoints::Only)
    }
}

impl std::fmt::Display for FaultPoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultPoints::Seeded => f.write_str("seeded"),
            FaultPoints::Off => f.write_str("none"),
            FaultPoints::Only(points) => {
                let names: Vec<&str> = points.iter().map(|p| p.name()).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimConfig {
    /// The seed every choice of the run derives from.
    pub seed: u64,
    /// Operations (steps) in the workload's run phase.
    pub ops: usize,
    /// Where the database lives (`kv` only; `sync` devices use simulated
    /// disks that lose unsynced writes on a crash).
    pub backend: BackendKind,
    /// A deliberate model error, to test the checkers (never from the CLI).
    pub model_fault: Option<ModelFault>,
    /// The workload.
    pub workload: WorkloadKind,
    /// Devices (`sync` only).
    pub devices: usize,
    /// One device's clock runs beyond the drift limit (`sync` only).
    pub far_skew: bool,
    /// Lets a run's revocation race the members' learning of it (`sync`
    /// only; see [`SyncOptions::revocation_races`]).
    pub revocation_races: bool,
    /// Lets the last device join mid-run in most runs (`sync` with
    /// [`NetProfile::Memory`] only; see [`sync::JoinPlan`]).
    pub late_joins: bool,
    /// Which of the product's fault points ("buggify") may fire in the run
    /// phase (`sync` only).
    pub fault_points: FaultPoints,
    /// A deliberate break of a sync property (tests only).
    pub sync_fault: Option<SyncFault>,
    /// Keep a readable line per trace event (for `replay --trace`).
    pub keep_trace: bool,
    /// What carries connections (`sync` only).
    pub net: NetProfile,
}

impl SimConfig {
    /// A run of [`OPS_DEFAULT`] operations from `seed`, on a file.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ops: OPS_DEFAULT,
            backend: BackendKind::File,
            model_fault: None,
            workload: WorkloadKind::Kv,
            devices: sync::DEVICES_DEFAULT,
            far_skew: false,
            revocation_races: false,
            late_joins: true,
            fault_points: FaultPoints::Seeded,
            sync_fault: None,
            keep_trace: false,
            net: NetProfile::Memory,
        }
    }

    /// A `sync` run of [`sync::STEPS_DEFAULT`] steps on
    /// [`sync::DEVICES_DEFAULT`] devices from `seed`.
    pub fn sync(seed: u64) -> Self {
        Self {
            ops: sync::STEPS_DEFAULT,
            workload: WorkloadKind::Sync,
            ..Self::new(seed)
        }
    }

    /// Sets the number of devices.
    pub fn devices(mut self, devices: usize) -> Self {
        self.devices = devices;
        self
    }

    /// Runs one device's clock far ahead.
    pub fn far_skew(mut self, far: bool) -> Self {
        self.far_skew = far;
        self
    }

    /// Lets the revocation race the members' learning of it (see
    /// [`SyncOptions::revocation_races`]).
    pub fn revocation_races(mut self, races: bool) -> Self {
        self.revocation_races = races;
        self
    }

    /// Lets the last device join mid-run, or has every device join at
    /// setup (see [`sync::JoinPlan`]).
    pub fn late_joins(mut self, late: bool) -> Self {
        self.late_joins = late;
        self
    }

    /// Sets which of the product's fault points may fire.
    pub fn fault_points(mut self, points: FaultPoints) -> Self {
        self.fault_points = points;
        self
    }

    /// Breaks a sync property on purpose, to prove its checker fails.
    pub fn sync_fault(mut self, fault: SyncFault) -> Self {
        self.sync_fault = Some(fault);
        self
    }

    /// Sets what carries connections (`sync` only).
    pub fn net(mut self, net: NetProfile) -> Self {
        self.net = net;
        self
    }

    /// Keeps the readable trace.
    pub fn keep_trace(mut self, keep: bool) -> Self {
        self.keep_trace = keep;
        self
    }

    /// Sets the number of operations.
    pub fn ops(mut self, ops: usize) -> Self {
        self.ops = ops;
        self
    }

    /// Sets where the database lives.
    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.backend = backend;
        self
    }

    /// Sabotages the reference model, to prove a checker fails.
    pub fn model_fault(mut self, fault: ModelFault) -> Self {
        self.model_fault = Some(fault);
        self
    }

    /// The shell command that replays this run from a checkout.
    pub fn replay_command(&self) -> String {
        let mut cmd = match self.workload {
            WorkloadKind::Kv => format!(
                "cargo run -p persist-sim -- run --seed {} --ops {} --backend {}",
                self.seed, self.ops, self.backend
            ),
            WorkloadKind::Sync => {
                format!(
                    "cargo run -p persist-sim -- run --workload sync --seed {} --steps {} --devices {}{}{}{}{}{}",
                    self.seed,
                    self.ops,
                    self.devices,
                    if self.net == NetProfile::Quic {
                        " --net quic"
                    } else {
                        ""
                    },
                    if self.far_skew { " --far-skew" } else { "" },
                    if self.revocation_races {
                        " --revocation-races"
                    } else {
                        ""
                    },
                    if self.late_joins {
                        ""
                    } else {
                        " --no-late-joins"
                    },
                    match &self.fault_points {
                        FaultPoints::Seeded => String::new(),
                        other => format!(" --faults {other}"),
                    }
                )
            }
        };
        if let Some(fault) = self.sync_fault {
            cmd.push_str(&format!("  # plus sync fault {fault:?}, set only by tests"));
        }
        if let Some(fault) = self.model_fault {
            cmd.push_str(&format!(
                "  # plus model fault {fault:?}, set only by tests"
            ));
        }
        cmd
    }
}

/// What a successful run produced.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome {
    /// The hash of every operation and observed result (and, for
    /// [`BackendKind::Memory`], the final database bytes).
    pub trace_hash: TraceHash,
    /// Events in the trace.
    pub events: u64,
    /// Live records at the end.
    pub records: usize,
    /// Size of the final database image ([`BackendKind::Memory`] only).
    pub db_bytes: Option<usize>,
    /// Faults that fired, by kind (`sync` only).
    pub faults: BTreeMap<String, u64>,
    /// Invariant checks that ran, by invariant (`sync` only).
    pub checks: BTreeMap<&'static str, u64>,
    /// The readable trace, if [`SimConfig::keep_trace`].
    pub trace: Vec<String>,
}

/// A failed run, with the command that replays it.
#[derive(Debug, thiserror::Error)]
#[error("simulation failed (seed {seed}): {kind}\nreplay with: {replay}")]
#[non_exhaustive]
pub struct Failure {
    /// The run's seed.
    pub seed: u64,
    /// What went wrong (boxed: it can be large, and failures are rare).
    pub kind: Box<FailureKind>,
    /// The command that replays the run.
    pub replay: String,
    /// The readable trace up to the failure, if [`SimConfig::keep_trace`].
    pub trace: Vec<String>,
}

/// What went wrong in a failed run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FailureKind {
    /// The harness could not build the runtime, directory or store.
    #[error("setup: {0}")]
    Setup(String),
    /// A workload phase failed: a mismatch with the model or a store error.
    #[error("workload {workload}: {source}")]
    Workload {
        /// The workload's name.
        workload: &'static str,
        /// Its error.
        source: WorkloadError,
    },
    /// The store did not close cleanly.
    #[error("close: {0}")]
    Close(String),
    /// The sync workload failed: an invariant, or an engine error.
    #[error("workload sync: {0}")]
    Sync(SyncRunError),
}

/// Runs `config` to completion on a fresh paused runtime.
pub fn run(config: &SimConfig) -> Result<Outcome, Failure> {
    if config.workload == WorkloadKind::Sync {
        return run_sync(config);
    }
    let fail = |kind| Failure {
        seed: config.seed,
        kind: Box::new(kind),
        replay: config.replay_command(),
        trace: Vec::new(),
    };
    // Declared before the runtime so that it outlives every task.
    let dir = tempfile::Builder::new()
        .prefix("persist-sim-")
        .tempdir()
        .map_err(|e| fail(FailureKind::Setup(format!("temporary directory: {e}"))))?;
    // The key's path is not part of the database, so a fresh directory
    // per run keeps runs independent without changing the hash.
    let key_file = dir.path().join("keys").join("device.key");
    let runtime = crate::harness::paused_runtime()
        .map_err(|e| fail(FailureKind::Setup(format!("tokio runtime: {e}"))))?;
    runtime
        .block_on(run_on(config, dir.path(), key_file))
        .map_err(fail)
}

async fn run_on(config: &SimConfig, dir: &Path, key_file: PathBuf) -> Result<Outcome, FailureKind> {
    let (env, clock) = Env::deterministic(config.seed, START_MS);
    let mut store_config = Config::new(dir.join("store"))
        .key_file(key_file)
        .dangerous()
        .env(env)
        .done();
    let memory = match config.backend {
        BackendKind::File => None,
        BackendKind::Memory => {
            let backend = MemoryBackend::default();
            store_config = store_config.storage_backend(Box::new(backend.clone()));
            Some(backend)
        }
    };
    let store = Store::open(store_config)
        .await
        .map_err(|e| FailureKind::Setup(format!("open store: {e}")))?;

    let mut trace = Trace::new();
    let mut workload = KvWorkload::new(config.seed, config.ops).with_fault(config.model_fault);
    let phases = async {
        let mut ctx = Ctx {
            store: &store,
            clock: &clock,
            trace: &mut trace,
        };
        workload.setup(&mut ctx).await?;
        workload.run(&mut ctx).await?;
        workload.check(&mut ctx).await
    };
    if let Err(source) = phases.await {
        return Err(FailureKind::Workload {
            workload: workload.name(),
            source,
        });
    }
    let records = workload.model().len();
    store
        .close()
        .await
        .map_err(|e| FailureKind::Close(e.to_string()))?;

    let db_bytes = memory.map(|backend| {
        let image = backend.snapshot();
        trace.record(Event::Database, &[&image]);
        image.len()
    });
    Ok(Outcome {
        events: trace.events(),
        trace_hash: trace.finish(),
        records,
        db_bytes,
        faults: BTreeMap::new(),
        checks: BTreeMap::new(),
        trace: Vec::new(),
    })
}

/// Runs a `sync` workload on a fresh paused runtime.
fn run_sync(config: &SimConfig) -> Result<Outcome, Failure> {
    let fail = |kind, trace: Vec<String>| Failure {
        seed: config.seed,
        kind: Box::new(kind),
        replay: config.replay_command(),
        trace,
    };
    let dir = tempfile::Builder::new()
        .prefix("persist-sim-")
        .tempdir()
        .map_err(|e| {
            fail(
                FailureKind::Setup(format!("temporary directory: {e}")),
                Vec::new(),
            )
        })?;
    let runtime = crate::harness::paused_runtime().map_err(|e| {
        fail(
            FailureKind::Setup(format!("tokio runtime: {e}")),
            Vec::new(),
        )
    })?;
    let mut trace = if config.keep_trace {
        Trace::logging()
    } else {
        Trace::new()
    };
    let result = runtime.block_on(run_sync_on(config, dir.path(), &mut trace));
    // Tasks left on the runtime (relay sessions, pumps) end with it,
    // before the directory goes.
    drop(runtime);
    match result {
        Ok(summary) => Ok(Outcome {
            events: trace.events(),
            trace: trace.lines().to_vec(),
            trace_hash: trace.finish(),
            records: summary.records,
            db_bytes: None,
            faults: summary.faults,
            checks: summary.checks,
        }),
        Err(kind) => {
            let lines = trace.lines().to_vec();
            Err(fail(kind, lines))
        }
    }
}

async fn run_sync_on(
    config: &SimConfig,
    dir: &Path,
    trace: &mut Trace,
) -> Result<sync::SyncSummary, FailureKind> {
    if config.devices < 2 {
        return Err(FailureKind::Setup(
            "the sync workload needs at least 2 devices".into(),
        ));
    }
    let opts = SyncOptions {
        seed: config.seed,
        devices: config.devices,
        steps: config.ops,
        far_skew: config.far_skew,
        revocation_races: config.revocation_races,
        // Not over QUIC yet: with them on there, a run whose join timed
        // out dialling a relay that was down (`--net quic --seed 1 --steps
        // 60`, three runs, three trace hashes) replays differently. Tasks
        // waiting on one tokio `watch` wake in an order tokio's own RNG
        // picks, seeded from the OS unless the runtime gets `rng_seed`
        // (`--cfg tokio_unstable`): the relay sessions then pull, and the
        // network draws, in another order.
        late_joins: config.late_joins && config.net == NetProfile::Memory,
        fault: config.sync_fault,
    };
    let skews = sync::skews(&opts);
    let mut cluster = Cluster::new(config.seed, dir, START_MS, &skews);
    match &config.fault_points {
        FaultPoints::Seeded => {}
        FaultPoints::Off => cluster.only_fault_points(&[]),
        FaultPoints::Only(points) => cluster.only_fault_points(points),
    }
    if config.net == NetProfile::Quic {
        trace.note("net quic");
        cluster.net = SimNet::quic(derive(config.seed, "quic net", 0, 0), skews.len())
            .map_err(FailureKind::Setup)?;
    }
    let mut workload = SyncWorkload::new(opts);
    let phases = async {
        workload.setup(&mut cluster, trace).await?;
        workload.run(&mut cluster, trace).await?;
        workload.quiesce(&mut cluster, trace).await?;
        workload.check(&mut cluster, trace).await
    };
    let outcome = phases.await;
    let closed = cluster.close_all().await;
    let mut summary = outcome.map_err(FailureKind::Sync)?;
    closed.map_err(FailureKind::Close)?;
    sync::check_closed(&workload, &cluster, &mut summary).map_err(FailureKind::Sync)?;
    Ok(summary)
}

/// The runtime every simulation runs on: one thread, its clock paused (it
/// jumps to the next timer whenever every task waits), so a seed replays.
pub fn paused_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
}
