//! Hybrid logical clock.
//!
//! A version stamp is `(wall milliseconds, counter)`: it follows the wall
//! clock when that moves forward and counts within a millisecond (or while
//! the wall clock stands still or goes back), so stamps from one device
//! strictly increase even across clock jumps. The state's high-water mark is
//! persisted with every commit, so a restart never reissues a stamp.
//!
//! # Invariants
//! - Every stamp [`HlcState::tick`] returns is greater than every stamp it
//!   returned or [`observed`](HlcState::observe) before.
//! - A remote stamp more than `max_drift_ms` ahead of the local wall clock
//!   is refused, so one device with a broken clock cannot drag every other
//!   device's versions into the future.

use core::fmt;

use serde::{Deserialize, Serialize};

/// Default bound on how far ahead of our clock a remote stamp may be.
pub const MAX_DRIFT_MS_DEFAULT: u64 = 10 * 60 * 1000;

/// One hybrid-logical-clock stamp. Ordered by `(ms, counter)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Wall-clock milliseconds since the Unix epoch (as the issuing device saw them).
    pub ms: u64,
    /// Logical counter within `ms`.
    pub counter: u16,
}

impl Hlc {
    /// Encoded size: `ms` (u64 BE) then `counter` (u16 BE).
    pub const LEN: usize = 10;

    /// Big-endian encoding, which sorts like the stamp.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.ms.to_be_bytes());
        out[8..].copy_from_slice(&self.counter.to_be_bytes());
        out
    }

    /// Inverse of [`Hlc::to_bytes`].
    pub fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&bytes[..8]);
        Self {
            ms: u64::from_be_bytes(ms),
            counter: u16::from_be_bytes([bytes[8], bytes[9]]),
        }
    }

    /// The smallest stamp greater than `self`.
    fn successor(self) -> Self {
        match self.counter.checked_add(1) {
            Some(counter) => Self {
                ms: self.ms,
                counter,
            },
            // 65,536 stamps in one millisecond: borrow the next millisecond.
            None => Self {
                ms: self.ms.saturating_add(1),
                counter: 0,
            },
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ms, self.counter)
    }
}

/// A remote stamp was too far in the future.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote clock is {ahead_ms} ms ahead of ours (limit {max_drift_ms} ms): \
     check the clock of the device that wrote it"
)]
pub struct ClockDrift {
    /// How far ahead the remote stamp was.
    pub ahead_ms: u64,
    /// The configured limit.
    pub max_drift_ms: u64,
}

/// The clock's state: the last stamp issued or observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HlcState {
    last: Hlc,
    max_drift_ms: u64,
}

impl HlcState {
    /// Resumes from a persisted high-water mark.
    pub fn new(high_water: Hlc, max_drift_ms: u64) -> Self {
        Self {
            last: high_water,
            max_drift_ms,
        }
    }

    /// The high-water mark to persist.
    pub fn high_water(&self) -> Hlc {
        self.last
    }

    /// A new stamp for a local event at wall time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let next = if now_ms > self.last.ms {
            Hlc {
                ms: now_ms,
                counter: 0,
            }
        } else {
            self.last.successor()
        };
        debug_assert!(next > self.last, "HLC stamps must strictly increase");
        self.last = next;
        next
    }

    /// Takes a remote stamp into account, so later local stamps exceed it.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Result<(), ClockDrift> {
        let limit = now_ms.saturating_add(self.max_drift_ms);
        if remote.ms > limit {
            return Err(ClockDrift {
                ahead_ms: remote.ms - now_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follows_wall_clock_and_counts_when_it_stalls() {
        let mut h = HlcState::new(Hlc::default(), MAX_DRIFT_MS_DEFAULT);
        assert_eq!(
            h.tick(100),
            Hlc {
                ms: 100,
                counter: 0
            }
        );
        assert_eq!(
            h.tick(100),
            Hlc {
                ms: 100,
                counter: 1
            }
        );
        // The wall clock goes back: the stamp does not.
        assert_eq!(
            h.tick(50),
            Hlc {
                ms: 100,
                counter: 2
            }
        );
        assert_eq!(
            h.tick(101),
            Hlc {
                ms: 101,
                counter: 0
            }
        );
    }

    #[test]
    fn counter_overflow_borrows_the_next_millisecond() {
        let mut h = HlcState::new(
            Hlc {
                ms: 7,
                counter: u16::MAX,
            },
            MAX_DRIFT_MS_DEFAULT,
        );
        assert_eq!(h.tick(7), Hlc { ms: 8, counter: 0 });
    }

    #[test]
    fn refuses_stamps_too_far_ahead() {
        let mut h = HlcState::new(Hlc::default(), 1_000);
        let err = h
            .observe(
                Hlc {
                    ms: 5_001,
                    counter: 0,
                },
                4_000,
            )
            .unwrap_err();
        assert_eq!(err.ahead_ms, 1_001);
        assert_eq!(
            h.high_water(),
            Hlc::default(),
            "a refused stamp changes nothing"
        );
        h.observe(
            Hlc {
                ms: 5_000,
                counter: 3,
            },
            4_000,
        )
        .unwrap();
        assert_eq!(
            h.tick(4_000),
            Hlc {
                ms: 5_000,
                counter: 4
            }
        );
    }

    proptest! {
        #[test]
        fn stamps_strictly_increase(walls in proptest::collection::vec(0u64..1_000, 1..200)) {
            let mut h = HlcState::new(Hlc::default(), MAX_DRIFT_MS_DEFAULT);
            let mut prev = Hlc::default();
            for w in walls {
                let s = h.tick(w);
                prop_assert!(s > prev);
                prev = s;
            }
        }

        #[test]
        fn bytes_round_trip_and_sort_like_stamps(a in any::<(u64, u16)>(), b in any::<(u64, u16)>()) {
            let (x, y) = (Hlc { ms: a.0, counter: a.1 }, Hlc { ms: b.0, counter: b.1 });
            prop_assert_eq!(Hlc::from_bytes(x.to_bytes()), x);
            prop_assert_eq!(x.cmp(&y), x.to_bytes().cmp(&y.to_bytes()));
        }
    }
}
