//! Workloads: what a simulation does to the system, in three phases.
//!
//! Following FoundationDB's workloads, each has a **setup** (bring the
//! system to a known starting state), a **run** (the seeded operations) and
//! a **check** (compare the end state with the reference model). Every call
//! a workload makes and every answer it sees goes into the [`Trace`].

use std::time::Duration;

use persist::{ManualClock, Store};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use crate::model::{self, Mismatch, Model, Value};
use crate::trace::{Event, Trace};

/// What a workload acts on.
pub struct Ctx<'a> {
    /// The store under test.
    pub store: &'a Store,
    /// The store's wall clock; only the workload moves it.
    pub clock: &'a ManualClock,
    /// The run's trace.
    pub trace: &'a mut Trace,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Store` has no `Debug`; its id is what a report needs.
        f.debug_struct("Ctx")
            .field("store", &self.store.info().store_id)
            .field("clock", &self.clock)
            .field("trace", &self.trace)
            .finish()
    }
}

impl Ctx<'_> {
    /// Moves the store's clock and the runtime's paused clock forward by
    /// `ms`, so that timers in the engine see the same passage of time as
    /// the HLC does.
    pub async fn advance(&mut self, ms: u64) {
        self.trace.record(Event::Advance, &[&ms.to_be_bytes()]);
        self.clock.advance(ms);
        // On a paused runtime this returns as soon as every task is idle,
        // with tokio's clock moved forward by exactly `ms`.
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// A simulation workload.
// Runs are single-threaded (one current-thread runtime), so the futures
// need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Workload {
    /// A short name for reports.
    fn name(&self) -> &'static str;
    /// Brings the system to the workload's starting state.
    async fn setup(&mut self, ctx: &mut Ctx<'_>) -> Result<(), WorkloadError>;
    /// Performs the seeded operations, checking answers as they come.
    async fn run(&mut self, ctx: &mut Ctx<'_>) -> Result<(), WorkloadError>;
    /// Compares the final state with the reference model.
    async fn check(&mut self, ctx: &mut Ctx<'_>) -> Result<(), WorkloadError>;
}

/// Why a workload phase failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The store disagreed with the reference model.
    #[error("{phase}{}: {mismatch}", step_suffix(*.step))]
    Mismatch {
        /// The phase: `setup`, `run` or `check`.
        phase: &'static str,
        /// The operation's index in the run phase, if any.
        step: Option<usize>,
        /// What differed.
        mismatch: Mismatch,
    },
    /// The store returned an error where the workload expected none.
    #[error("{phase}{}: {operation} failed: {detail}", step_suffix(*.step))]
    Engine {
        /// The phase: `setup`, `run` or `check`.
        phase: &'static str,
        /// The operation's index in the run phase, if any.
        step: Option<usize>,
        /// The operation, e.g. `put("a/1")`.
        operation: String,
        /// The store's error.
        detail: String,
    },
}

fn step_suffix(step: Option<usize>) -> String {
    step.map(|s| format!(" (operation {s})"))
        .unwrap_or_default()
}

/// A deliberate error in the reference model, to prove the checkers can
/// fail. Never set in a real run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelFault {
    /// The model ignores the first put at or after operation `from_step` of
    /// the run phase.
    DropPut {
        /// The first operation index at which a put may be dropped.
        from_step: usize,
    },
    /// At operation `at_step` of the run phase the model gains a record
    /// that was never written (at [`PHANTOM_PATH`], outside the paths the
    /// workload touches), so the final listing must disagree.
    Phantom {
        /// The operation index at which the record appears.
        at_step: usize,
    },
}

/// Where [`ModelFault::Phantom`] puts its record.
pub const PHANTOM_PATH: &str = "phantom";

/// The paths the key-value workload uses: few, so that operations collide,
/// and nested, so that prefix listings have something to separate.
pub const KV_PATHS: &[&str] = &[
    "a/0", "a/1", "a/2", "a/3", "a/x/0", "a/x/1", "b/0", "b/1", "b/2", "c", "c/d/e", "z",
];

/// Records written during setup.
const KV_SETUP_RECORDS: usize = 4;

/// The longest value the workload writes, in filler characters: past a few
/// PADMÉ buckets, far below `persist::VALUE_BYTES_MAX`.
const KV_VALUE_FILLER_MAX: u64 = 300;

/// Puts, deletes and gets on a small path space of one store, checked
/// against a [`Model`] after every read and at the end.
#[derive(Debug)]
pub struct KvWorkload {
    rng: ChaCha8Rng,
    ops: usize,
    model: Model,
    fault: Option<ModelFault>,
}

/// One operation of the run phase.
#[derive(Clone, Debug, PartialEq, Eq)]
enum KvOp {
    Put { path: &'static str, value: Value },
    Delete { path: &'static str },
    Get { path: &'static str },
}

impl KvWorkload {
    /// A workload of `ops` operations drawn from `seed`.
    pub fn new(seed: u64, ops: usize) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            ops,
            model: Model::new(),
            fault: None,
        }
    }

    /// Sabotages the model (see [`ModelFault`]).
    pub fn with_fault(mut self, fault: Option<ModelFault>) -> Self {
        self.fault = fault;
        self
    }

    /// The reference model as it stands.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// A number in `0..n` (n > 0). The slight modulo bias is irrelevant for
    /// choosing operations, and keeps the mapping from seed obvious.
    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0, "an empty range has no member");
        self.rng.next_u64() % n
    }

    fn path(&mut self) -> &'static str {
        KV_PATHS[self.below(KV_PATHS.len() as u64) as usize]
    }

    /// A value unique to `tag` (so that every put is visible), of seeded
    /// length.
    fn value(&mut self, tag: &str) -> Value {
        let filler = self.below(KV_VALUE_FILLER_MAX + 1) as usize;
        let mut value = format!("{tag}:{:08x}:", self.rng.next_u32());
        value.extend(std::iter::repeat_n('.', filler));
        value
    }

    /// Milliseconds to move the clock before the next operation: mostly
    /// small steps, sometimes seconds, rarely an hour.
    fn delay_ms(&mut self) -> u64 {
        match self.below(100) {
            0..80 => self.below(50),
            80..98 => self.below(5_000),
            _ => self.below(3_600_000),
        }
    }

    fn next_op(&mut self, step: usize) -> KvOp {
        let path = self.path();
        match self.below(100) {
            0..45 => {
                let value = self.value(&format!("op{step}"));
                KvOp::Put { path, value }
            }
            45..65 => KvOp::Delete { path },
            _ => KvOp::Get { path },
        }
    }

    /// Whether the model should drop the put of operation `step`: the
    /// first put at or after the fault's step. Consumes the fault.
    fn drops_put(&mut self, step: usize) -> bool {
        match self.fault {
            Some(ModelFault::DropPut { from_step }) if step >= from_step => {
                self.fault = None;
                true
            }
            _ => false,
        }
    }

    /// Applies a [`ModelFault::Phantom`] due at operation `step`.
    fn maybe_add_phantom(&mut self, step: usize) {
        if let Some(ModelFault::Phantom { at_step }) = self.fault
            && step == at_step
        {
            self.fault = None;
            self.model.put(PHANTOM_PATH, "never written".to_owned());
        }
    }
}

impl Workload for KvWorkload {
    fn name(&self) -> &'static str {
        "kv"
    }

    async fn setup(&mut self, ctx: &mut Ctx<'_>) -> Result<(), WorkloadError> {
        for path in KV_PATHS.iter().take(KV_SETUP_RECORDS) {
            let value = self.value("setup");
            put(ctx, "setup", None, path, &value).await?;
            self.model.put(path, value);
        }
        Ok(())
    }

    async fn run(&mut self, ctx: &mut Ctx<'_>) -> Result<(), WorkloadError> {
        for step in 0..self.ops {
            self.maybe_add_phantom(step);
            let delay = self.delay_ms();
            ctx.advance(delay).await;
            match self.next_op(step) {
                KvOp::Put { path, value } => {
                    put(ctx, "run", Some(step), path, &value).await?;
                    if !self.drops_put(step) {
                        self.model.put(path, value);
                    }
                }
                KvOp::Delete { path } => {
                    ctx.trace.record(Event::Delete, &[path.as_bytes()]);
                    ctx.store
                        .delete(path)
                        .await
                        .map_err(|e| engine("run", Some(step), format!("delete({path:?})"), e))?;
                    self.model.delete(path);
                }
                KvOp::Get { path } => {
                    get_checked(ctx, &self.model, "run", Some(step), path).await?
                }
            }
        }
        Ok(())
    }

    async fn check(&mut self, ctx: &mut Ctx<'_>) -> Result<(), WorkloadError> {
        for prefix in ["", "a/"] {
            list_checked(ctx, &self.model, prefix).await?;
        }
        for path in KV_PATHS {
            get_checked(ctx, &self.model, "check", None, path).await?;
        }
        Ok(())
    }
}

async fn put(
    ctx: &mut Ctx<'_>,
    phase: &'static str,
    step: Option<usize>,
    path: &str,
    value: &Value,
) -> Result<(), WorkloadError> {
    ctx.trace
        .record(Event::Put, &[path.as_bytes(), value.as_bytes()]);
    ctx.store
        .put(path, value)
        .await
        .map_err(|e| engine(phase, step, format!("put({path:?})"), e))
}

async fn get_checked(
    ctx: &mut Ctx<'_>,
    model: &Model,
    phase: &'static str,
    step: Option<usize>,
    path: &str,
) -> Result<(), WorkloadError> {
    let observed: Option<Value> = ctx
        .store
        .get(path)
        .await
        .map_err(|e| engine(phase, step, format!("get({path:?})"), e))?;
    let mut fields: Vec<&[u8]> = vec![path.as_bytes()];
    if let Some(v) = &observed {
        fields.push(v.as_bytes());
    }
    ctx.trace.record(Event::Get, &fields);
    model::check_get(model, path, observed.as_deref()).map_err(|mismatch| WorkloadError::Mismatch {
        phase,
        step,
        mismatch,
    })
}

async fn list_checked(ctx: &mut Ctx<'_>, model: &Model, prefix: &str) -> Result<(), WorkloadError> {
    let observed: Vec<(String, Value)> = ctx
        .store
        .list(prefix)
        .await
        .map_err(|e| engine("check", None, format!("list({prefix:?})"), e))?;
    let mut fields: Vec<&[u8]> = vec![prefix.as_bytes()];
    for (path, value) in &observed {
        fields.push(path.as_bytes());
        fields.push(value.as_bytes());
    }
    ctx.trace.record(Event::List, &fields);
    model::check_list(model, prefix, &observed).map_err(|mismatch| WorkloadError::Mismatch {
        phase: "check",
        step: None,
        mismatch,
    })
}

fn engine(
    phase: &'static str,
    step: Option<usize>,
    operation: String,
    error: impl std::fmt::Display,
) -> WorkloadError {
    WorkloadError::Engine {
        phase,
        step,
        operation,
        detail: error.to_string(),
    }
}
