//! The one seam through which the embedded backends run blocking work (a
//! durable commit, page reads).
//!
//! On a multi-threaded runtime the call moves this worker's other tasks
//! away (`block_in_place`), so one store's fsync never stalls other
//! sessions; on a current-thread runtime — what simulations use — and
//! outside any runtime it runs inline, which keeps a run deterministic.
//! Tokio's blocking thread pool is not used: a simulation cannot control
//! its scheduling.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `f`, which may block on IO.
pub(super) fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
    match Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
