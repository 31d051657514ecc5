//! The production environment: the system clock and the OS CSPRNG.
//!
//! This is the one module of the engine allowed to read the wall clock
//! and the OS random source (DESIGN.md, "Determinism"); everything else
//! receives them through [`Env`]. Tests and simulations pass
//! [`Env::deterministic`] instead, via [`crate::Config::dangerous`].

// allow-nondeterminism: this module is the injected environment itself.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use getrandom::SysRng;
use persist_core::env::{Clock, Entropy, Env, Faults, RngStream};
use rand_chacha::ChaCha20Rng;
use rand_core::{SeedableRng, TryRng};

/// The environment of a real device.
pub(crate) fn system() -> Env {
    Env {
        clock: Arc::new(SystemClock),
        entropy: Arc::new(OsEntropy),
        faults: Faults::OFF,
    }
}

/// Wall-clock time from the operating system.
#[derive(Debug, Clone, Copy)]
struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // allow-nondeterminism: this is the injected production clock.
        let now = SystemTime::now();
        // A clock set before 1970 reads as 0; the HLC still moves forward.
        now.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Randomness from the OS: each stream is ChaCha20 keyed with 32 fresh
/// bytes from the OS CSPRNG, as `rand`'s thread RNG does.
#[derive(Debug, Clone, Copy)]
struct OsEntropy;

impl Entropy for OsEntropy {
    fn stream(&self, _label: &str) -> RngStream {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        // allow-nondeterminism: this is the injected production entropy.
        if let Err(e) = SysRng.try_fill_bytes(seed.as_mut()) {
            // Without OS randomness no key Persist makes would be safe;
            // continuing would be worse than stopping.
            panic!("the operating system's random source failed: {e}");
        }
        Box::new(ChaCha20Rng::from_seed(*seed))
    }
}
