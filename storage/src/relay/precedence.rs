//! A fixed-width encoding of [`Precedence`] whose byte order is its order,
//! for the redb index.

use persist_core::hlc::Hlc;
use persist_core::lww::{Precedence, Version};
use persist_core::{DeviceId, Epoch};

/// Encoded size: HLC ms (u64 BE), HLC counter (u16 BE), origin device
/// (16 bytes), epoch (u32 BE).
pub(super) const PRECEDENCE_LEN: usize = 8 + 2 + DeviceId::LEN + 4;

/// Big-endian fields in [`Precedence`]'s comparison order, so comparing
/// encodings bytewise compares precedences.
pub(super) fn encode(precedence: Precedence) -> [u8; PRECEDENCE_LEN] {
    let Precedence {
        version: Version { hlc, origin },
        epoch,
    } = precedence;
    let mut out = [0u8; PRECEDENCE_LEN];
    out[..8].copy_from_slice(&hlc.ms.to_be_bytes());
    out[8..10].copy_from_slice(&hlc.counter.to_be_bytes());
    out[10..26].copy_from_slice(&origin.0);
    out[26..].copy_from_slice(&epoch.0.to_be_bytes());
    out
}

/// The inverse of [`encode`]. Every byte string of this length decodes.
pub(super) fn decode(bytes: &[u8; PRECEDENCE_LEN]) -> Precedence {
    Precedence {
        version: Version {
            hlc: Hlc {
                ms: u64::from_be_bytes(field(bytes, 0)),
                counter: u16::from_be_bytes(field(bytes, 8)),
            },
            origin: DeviceId(field(bytes, 10)),
        },
        epoch: Epoch(u32::from_be_bytes(field(bytes, 26))),
    }
}

/// The `N` bytes at `at`; the callers' constant offsets lie within
/// [`PRECEDENCE_LEN`], so the slice is always in bounds.
fn field<const N: usize>(bytes: &[u8; PRECEDENCE_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn precedence() -> impl Strategy<Value = Precedence> {
        (any::<u64>(), any::<u16>(), any::<[u8; 16]>(), any::<u32>()).prop_map(
            |(ms, counter, origin, epoch)| Precedence {
                version: Version {
                    hlc: Hlc { ms, counter },
                    origin: DeviceId(origin),
                },
                epoch: Epoch(epoch),
            },
        )
    }

    proptest! {
        #[test]
        fn round_trips_and_sorts_like_precedence(a in precedence(), b in precedence()) {
            prop_assert_eq!(decode(&encode(a)), a);
            prop_assert_eq!(encode(a).cmp(&encode(b)), a.cmp(&b));
        }
    }
}
