//! The last-write-wins rule.
//!
//! A record's version is `(HLC stamp, origin device)`. The higher version
//! wins; equal versions mean the same write sealed twice (a rotation reseal),
//! and then the higher epoch wins so that re-encryption makes progress. A
//! reseal keeps the origin version, so re-encryption never wins a conflict
//! against a real write.
//!
//! # Invariants
//! - [`wins`] is a strict total order on `(version, epoch)`: for two
//!   different candidates exactly one wins, so every device that sees the
//!   same set of envelopes keeps the same one, in any order of arrival.

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::ids::{DeviceId, Epoch};

/// The version of a write: its HLC stamp, then its origin device as tie-break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// When the write happened, by its origin device's HLC.
    pub hlc: Hlc,
    /// The device that made the write.
    pub origin: DeviceId,
}

/// What LWW compares: the version, then the epoch that sealed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Precedence {
    /// The write's version.
    pub version: Version,
    /// The epoch of the key that sealed this copy.
    pub epoch: Epoch,
}

/// Whether `candidate` replaces `current`.
pub fn wins(candidate: Precedence, current: Precedence) -> bool {
    candidate > current
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(ms: u64, dev: u8, epoch: u32) -> Precedence {
        Precedence {
            version: Version {
                hlc: Hlc { ms, counter: 0 },
                origin: DeviceId([dev; 16]),
            },
            epoch: Epoch(epoch),
        }
    }

    #[test]
    fn later_write_wins_and_device_breaks_ties() {
        assert!(wins(p(2, 0, 1), p(1, 9, 9)));
        assert!(!wins(p(1, 9, 9), p(2, 0, 1)));
        assert!(wins(p(1, 2, 1), p(1, 1, 1)));
    }

    #[test]
    fn reseal_wins_only_against_its_own_older_copy() {
        assert!(wins(p(1, 1, 2), p(1, 1, 1)), "same write, newer epoch");
        assert!(
            !wins(p(1, 1, 9), p(2, 1, 1)),
            "a reseal never beats a newer write"
        );
        assert!(!wins(p(1, 1, 1), p(1, 1, 1)), "nothing replaces itself");
    }

    proptest! {
        #[test]
        fn order_of_arrival_does_not_matter(mut xs in proptest::collection::vec((0u64..4, 0u8..3, 1u32..3), 1..20)) {
            let fold = |xs: &[(u64, u8, u32)]| {
                let mut best: Option<Precedence> = None;
                for &(ms, d, e) in xs {
                    let c = p(ms, d, e);
                    if best.is_none_or(|b| wins(c, b)) {
                        best = Some(c);
                    }
                }
                best
            };
            let forward = fold(&xs);
            xs.reverse();
            prop_assert_eq!(forward, fold(&xs));
        }
    }
}
