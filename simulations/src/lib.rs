//! `persist-sim`: seeded, deterministic simulation runs of Persist.
//!
//! A run is one `u64` seed. From it come the workload's choices (which
//! operation, which path, which value, how far the clock moves) and, through
//! [`Env::deterministic`](persist::Env::deterministic), every key and nonce
//! the store draws. The store runs on a paused, current-thread tokio runtime,
//! so its actors interleave the same way every time. The same seed therefore
//! gives the same [trace hash](trace::TraceHash), and a failing seed replays
//! exactly from the command it prints.
//!
//! # Layout
//!
//! - [`harness`]: builds the runtime, opens the store, runs a workload through
//!   its phases and reports an [`Outcome`](harness::Outcome) or a
//!   [`Failure`](harness::Failure) with its replay command.
//! - [`workload`]: workloads in three phases — setup, run, check (the shape
//!   of FoundationDB's workloads) — starting with
//!   [`KvWorkload`](workload::KvWorkload): puts, deletes and gets on one store.
//! - [`model`]: the reference model a store must agree with, and the
//!   checkers that compare them.
//! - [`trace`]: the SHA-256 trace of everything a run did and observed.
//!
//! # Example
//!
//! ```
//! use persist_sim::harness::{self, BackendKind, SimConfig};
//!
//! let config = SimConfig::new(7).ops(50).backend(BackendKind::Memory);
//! let first = harness::run(&config)?;
//! let again = harness::run(&config)?;
//! assert_eq!(first.trace_hash, again.trace_hash);
//! # Ok::<(), persist_sim::harness::Failure>(())
//! ```

pub mod harness;
pub mod model;
pub mod trace;
pub mod workload;
