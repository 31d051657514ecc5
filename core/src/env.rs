//! The injected environment: time and randomness reach logic only through
//! these traits.
//!
//! `persist-core` never reads a clock or an OS random source itself. The
//! engine passes a [`Clock`] and an [`Entropy`] source down; production uses
//! the system clock and the OS CSPRNG (in the `persist` crate's `env`
//! module, the one place allowed to touch them), while tests and simulations
//! pass a [`ManualClock`] and [`SeededEntropy`] and get byte-identical
//! results from identical inputs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hkdf::Hkdf;
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, Rng, SeedableRng};
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
    /// The fault points; off everywhere but in simulations.
    pub faults: Faults,
}

impl Env {
    /// A fully deterministic environment: a [`ManualClock`] at `now_ms`
    /// and [`SeededEntropy`] from `seed`. For tests and simulations only.
    pub fn deterministic(seed: u64, now_ms: u64) -> (Self, ManualClock) {
        let clock = ManualClock::new(now_ms);
        let env = Self {
            clock: Arc::new(clock.clone()),
            entropy: Arc::new(SeededEntropy::from_u64(seed)),
            faults: Faults::OFF,
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

/// Every error a fault point makes says this, so that a simulation can
/// tell an injected failure from a real one.
pub const INJECTED_FAULT: &str = "injected fault";

/// A place in the product where a simulation may make a rare but legal
/// event happen ("buggify", after FoundationDB): a slow or failing commit,
/// long work stopping between two steps, a connection dropping at an
/// awkward moment. The product must come through each of them; in
/// production they never happen ([`Faults::OFF`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum FaultPoint {
    /// The StorageWriter waits before a commit, as on a slow disk; what
    /// arrives meanwhile waits for the next commit.
    CommitDelay,
    /// The StorageWriter fails a commit before it writes anything, as on
    /// a transient disk error: every write of the group gets the error.
    CommitFail,
    /// The slices of a rotation pass take only a few records from here
    /// on, so that even a small store's rotation has several slices (and
    /// the points between them).
    RotationSmallSlice,
    /// The Rotator waits between two slices.
    RotationPause,
    /// The Rotator stops between two slices as if it had crashed; its
    /// supervisor restarts it and it resumes at its persisted cursor.
    RotationStop,
    /// A sync connection drops after its `Hello` is sent, before the
    /// `Welcome` is read.
    HandshakeDrop,
    /// A sync connection drops just after a push is sent, before the
    /// remote acknowledges it.
    PushDrop,
    /// A reconnect waits much longer than its backoff.
    ReconnectDelay,
}

impl FaultPoint {
    /// Every fault point. [`SeededFaults::new`] draws one "on" flag per
    /// entry in this order from the stream it then fires from, so adding
    /// a point changes which faults every seed's run sees.
    pub const ALL: [FaultPoint; 8] = [
        FaultPoint::CommitDelay,
        FaultPoint::CommitFail,
        FaultPoint::RotationSmallSlice,
        FaultPoint::RotationPause,
        FaultPoint::RotationStop,
        FaultPoint::HandshakeDrop,
        FaultPoint::PushDrop,
        FaultPoint::ReconnectDelay,
    ];

    /// Its name, for summaries and traces.
    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::CommitDelay => "commit_delay",
            FaultPoint::CommitFail => "commit_fail",
            FaultPoint::RotationSmallSlice => "rotation_small_slice",
            FaultPoint::RotationPause => "rotation_pause",
            FaultPoint::RotationStop => "rotation_stop",
            FaultPoint::HandshakeDrop => "handshake_drop",
            FaultPoint::PushDrop => "push_drop",
            FaultPoint::ReconnectDelay => "reconnect_delay",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Decides, each time a fault point is reached, whether its fault happens.
pub trait FaultPlan: Send + Sync + 'static {
    /// `Some(n)` if the fault at `point` happens now, with `n` a random
    /// number that sizes it (a delay, say); `None` if it does not.
    fn fire(&self, point: FaultPoint) -> Option<u64>;
}

/// The fault points as the product sees them: off, or driven by a plan.
#[derive(Clone, Default)]
pub struct Faults(Option<Arc<dyn FaultPlan>>);

impl Faults {
    /// No fault ever happens: production.
    pub const OFF: Faults = Faults(None);

    /// Faults as `plan` decides.
    pub fn new(plan: Arc<dyn FaultPlan>) -> Self {
        Self(Some(plan))
    }

    /// Whether the fault at `point` happens now.
    pub fn fire(&self, point: FaultPoint) -> bool {
        self.0.as_ref().is_some_and(|p| p.fire(point).is_some())
    }

    /// A number below `bound` (at least 1) if the fault at `point`
    /// happens now.
    pub fn draw(&self, point: FaultPoint, bound: u64) -> Option<u64> {
        let draw = self.0.as_ref()?.fire(point)?;
        Some(draw % bound.max(1))
    }

    /// A delay between 1 ms and `max` if the fault at `point` happens now.
    pub fn delay(&self, point: FaultPoint, max: Duration) -> Option<Duration> {
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        self.draw(point, max_ms)
            .map(|ms| Duration::from_millis(1 + ms))
    }
}

impl core::fmt::Debug for Faults {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Faults(plan)"
        } else {
            "Faults(off)"
        })
    }
}

/// A seeded [`FaultPlan`], for simulations.
///
/// The seed switches each point on for the whole run with probability
/// one in [`SeededFaults::ON_ONE_IN`], so that runs differ in which
/// faults they combine; a point that is on fires at one in
/// [`SeededFaults::FIRE_ONE_IN`] of the times it is reached, while the
/// plan is active (a simulation deactivates it to set up and to let the
/// devices calm down at the end).
#[derive(Debug)]
pub struct SeededFaults {
    on: [bool; FaultPoint::ALL.len()],
    active: AtomicBool,
    state: Mutex<SeededState>,
}

#[derive(Debug)]
struct SeededState {
    rng: ChaCha20Rng,
    fired: BTreeMap<FaultPoint, u64>,
}

impl SeededFaults {
    /// A point is on in one run in this many.
    pub const ON_ONE_IN: u32 = 3;
    /// A point that is on fires at one in this many of its reaches.
    pub const FIRE_ONE_IN: u32 = 8;

    /// A plan whose points and firings are drawn from `seed`; active.
    pub fn new(seed: [u8; 32]) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let on = core::array::from_fn(|_| rng.next_u32().is_multiple_of(Self::ON_ONE_IN));
        Self::with_on(on, rng)
    }

    /// A plan with exactly `points` on, firing as drawn from `seed`; for
    /// tests that need one fault.
    pub fn with_points(seed: [u8; 32], points: &[FaultPoint]) -> Self {
        let on = core::array::from_fn(|i| points.iter().any(|p| p.index() == i));
        Self::with_on(on, ChaCha20Rng::from_seed(seed))
    }

    fn with_on(on: [bool; FaultPoint::ALL.len()], rng: ChaCha20Rng) -> Self {
        Self {
            on,
            active: AtomicBool::new(true),
            state: Mutex::new(SeededState {
                rng,
                fired: BTreeMap::new(),
            }),
        }
    }

    /// Turns every fault off (`false`) or back on as planned (`true`).
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
    }

    /// The points this plan switched on.
    pub fn enabled(&self) -> Vec<FaultPoint> {
        FaultPoint::ALL
            .into_iter()
            .filter(|p| self.on[p.index()])
            .collect()
    }

    /// How often each point fired so far.
    pub fn fired(&self) -> BTreeMap<FaultPoint, u64> {
        self.lock().fired.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeededState> {
        // A panic elsewhere while holding the lock leaves a usable state:
        // an RNG and counters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FaultPlan for SeededFaults {
    fn fire(&self, point: FaultPoint) -> Option<u64> {
        if !self.on[point.index()] || !self.active.load(Ordering::SeqCst) {
            return None;
        }
        let mut state = self.lock();
        if !state.rng.next_u32().is_multiple_of(Self::FIRE_ONE_IN) {
            return None;
        }
        *state.fired.entry(point).or_default() += 1;
        Some(state.rng.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

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
    fn seeded_faults_fire_only_where_on_and_while_active() {
        let plan = SeededFaults::with_points([7; 32], &[FaultPoint::PushDrop]);
        let faults = Faults::new(Arc::new(plan));
        let fired = (0..800)
            .filter(|_| faults.fire(FaultPoint::PushDrop))
            .count();
        assert!(
            (50..150).contains(&fired),
            "about one in {} reaches fire, got {fired} of 800",
            SeededFaults::FIRE_ONE_IN
        );
        assert!(
            (0..800).all(|_| !faults.fire(FaultPoint::CommitFail)),
            "a point that is off never fires"
        );
        assert!(!Faults::OFF.fire(FaultPoint::PushDrop));
        assert_eq!(
            Faults::OFF.delay(FaultPoint::CommitDelay, Duration::from_secs(1)),
            None
        );

        let plan = Arc::new(SeededFaults::with_points(
            [7; 32],
            &[FaultPoint::CommitDelay],
        ));
        let faults = Faults::new(plan.clone());
        plan.set_active(false);
        assert!((0..200).all(|_| !faults.fire(FaultPoint::CommitDelay)));
        plan.set_active(true);
        let max = Duration::from_millis(40);
        let delays: Vec<_> = (0..400)
            .filter_map(|_| faults.delay(FaultPoint::CommitDelay, max))
            .collect();
        assert!(!delays.is_empty());
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(1) && *d <= max)
        );
        assert_eq!(plan.fired()[&FaultPoint::CommitDelay], delays.len() as u64);
    }

    #[test]
    fn seeded_faults_replay_from_their_seed() {
        let run = |seed: [u8; 32]| {
            let plan = Arc::new(SeededFaults::new(seed));
            let faults = Faults::new(plan.clone());
            let hits: Vec<bool> = (0..400)
                .map(|i| faults.fire(FaultPoint::ALL[i % FaultPoint::ALL.len()]))
                .collect();
            (plan.enabled(), hits)
        };
        assert_eq!(run([1; 32]), run([1; 32]), "same seed, same faults");
        let plans: BTreeSet<Vec<FaultPoint>> = (0..32u8).map(|b| run([b; 32]).0).collect();
        assert!(
            plans.len() > 8,
            "seeds switch different points on: {plans:?}"
        );
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
