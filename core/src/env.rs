//! The injected environment: time and randomness reach logic only through
//! these traits.
//!
//! `persist-core` never reads a clock or an OS random source itself. The
//! engine passes a [`Clock`] and an [`Entropy`] source down; production uses
//! the system clock and the OS CSPRNG (in the `persist` crate's `env`
//! module, the one place allowed to touch them), while tests and simulations
//! pass a [`ManualClock`] and [`SeededEntropy`] and get byte-identical
//! results from identical inputs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hkdf::Hkdf;
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, SeedableRng};
use sha2::Sha256;

/// Wall-clock milliseconds since the Unix epoch, as some clock sees them.
///
/// Clocks may jump backwards; the hybrid logical clock
/// ([`crate::hlc::HlcState`]) absorbs that.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn now_ms(&self) -> u64;
}

/// A cryptographically secure random stream, boxed so that actors can own
/// one without generics.
pub type RngStream = Box<dyn CryptoRng + Send + Sync>;

/// A source of independent random streams, one per consumer.
///
/// Each actor asks for its own stream by a stable label, so that in a
/// simulation adding a consumer does not shift the bytes another one sees.
pub trait Entropy: Send + Sync + 'static {
    /// A new stream for the consumer named `label`.
    ///
    /// Asking twice for the same label yields two different streams (the
    /// second continues a per-source counter), never a repeated one.
    fn stream(&self, label: &str) -> RngStream;
}

/// The environment handed down to every actor: where time and randomness
/// come from.
#[derive(Clone)]
pub struct Env {
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// The randomness source.
    pub entropy: Arc<dyn Entropy>,
}

impl Env {
    /// A fully deterministic environment: a [`ManualClock`] at `now_ms`
    /// and [`SeededEntropy`] from `seed`. For tests and simulations only.
    pub fn deterministic(seed: u64, now_ms: u64) -> (Self, ManualClock) {
        let clock = ManualClock::new(now_ms);
        let env = Self {
            clock: Arc::new(clock.clone()),
            entropy: Arc::new(SeededEntropy::from_u64(seed)),
        };
        (env, clock)
    }
}

impl core::fmt::Debug for Env {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Env")
            .field("now_ms", &self.clock.now_ms())
            .finish_non_exhaustive()
    }
}

/// A clock that moves only when told to. For tests and simulations.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self {
            now_ms: Arc::new(AtomicU64::new(now_ms)),
        }
    }

    /// Sets the reading (it may go backwards, as real clocks do).
    pub fn set(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the reading forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// Deterministic entropy: ChaCha20 streams derived from one seed.
///
/// Stream `n` for label `l` is keyed by
/// `HKDF-SHA256(ikm = seed, info = "persist/entropy/v1" ‖ l ‖ n)`.
/// Never use it outside tests and simulations: anyone who knows the seed
/// knows every key it produced.
#[derive(Debug)]
pub struct SeededEntropy {
    seed: [u8; 32],
    counter: AtomicU64,
}

impl SeededEntropy {
    /// Entropy derived from a 64-bit simulation seed.
    pub fn from_u64(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Self::new(bytes)
    }

    /// Entropy derived from a 32-byte seed.
    pub fn new(seed: [u8; 32]) -> Self {
        Self {
            seed,
            counter: AtomicU64::new(0),
        }
    }
}

impl Entropy for SeededEntropy {
    fn stream(&self, label: &str) -> RngStream {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let hk = Hkdf::<Sha256>::new(None, &self.seed);
        let mut key = [0u8; 32];
        let info: [&[u8]; 3] = [b"persist/entropy/v1", label.as_bytes(), &n.to_be_bytes()];
        // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
        hk.expand_multi_info(&info, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Box::new(ChaCha20Rng::from_seed(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_streams_are_reproducible_and_distinct() {
        let a = SeededEntropy::from_u64(42);
        let b = SeededEntropy::from_u64(42);
        let mut x = [0u8; 32];
        let mut y = [0u8; 32];
        a.stream("sealer").fill_bytes(&mut x);
        b.stream("sealer").fill_bytes(&mut y);
        assert_eq!(x, y, "same seed, same label, same order: same bytes");
        let mut z = [0u8; 32];
        a.stream("sealer").fill_bytes(&mut z);
        assert_ne!(x, z, "a second stream for one label must differ");
        let mut w = [0u8; 32];
        SeededEntropy::from_u64(43)
            .stream("sealer")
            .fill_bytes(&mut w);
        assert_ne!(x, w, "different seeds must differ");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.advance(5);
        assert_eq!(c.now_ms(), 1_005);
        c.set(10);
        assert_eq!(c.now_ms(), 10);
    }
}
