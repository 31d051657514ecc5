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
//! - [`sync`]: the multi-device workload — several devices of one store
//!   syncing through [`net`] (a seeded, faulty, tapped in-memory network
//!   around the relay's own session code), on [`disk`]s that lose unsynced
//!   writes when a device crashes, arranged by [`cluster`], and judged by
//!   [`checkers`] (convergence, no lost write, no plaintext, no nonce
//!   reuse, epochs, rotation, held envelopes, liveness).
//!
//! # Bugs the simulations found
//!
//! - **A sync session wedged after two lost connections** (seed 12 of the
//!   sync workload, kept as a regression test): each reader that ended or
//!   was aborted kept a frame permit of a semaphore shared by all of a
//!   session's connections, so after two no permit was left. Fixed by a
//!   semaphore per connection.
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

pub mod checkers;
pub mod cluster;
pub mod disk;
pub mod harness;
pub mod model;
pub mod net;
pub mod sync;
pub mod trace;
pub mod workload;
