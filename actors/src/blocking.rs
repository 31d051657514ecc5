//! The one seam through which actors run blocking work (a durable commit).
//!
//! On a multi-threaded runtime the call moves this worker's other tasks
//! away (`block_in_place`) so a commit's fsync never stalls unrelated
//! actors; on a current-thread runtime — what simulations use — it runs
//! inline, which keeps the run deterministic.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `f`, which may block on IO.
pub(crate) fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
