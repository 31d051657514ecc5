//! Row format v1: how one record is laid out in the `records` table.
//!
//! ```text
//! [row_version u8 = 1][flags u8][epoch u32 LE][crc32c u32 LE][envelope ...]
//!  0                   1         2             6              10
//! ```
//!
//! # Invariants
//!
//! - `row_version` is [`ROW_VERSION`]; any other value is a damaged row (a new
//!   row version comes with a new database format version).
//! - `flags` has only bit 0 (tombstone) possibly set.
//! - `crc32c` is CRC-32C over bytes `0..6` followed by the envelope, so any
//!   changed byte of the row, header or envelope, fails the check.
//! - The envelope is at most [`crate::ENVELOPE_BYTES_MAX`] bytes.

use persist_core::Epoch;

/// The row format this build writes and reads.
pub(crate) const ROW_VERSION: u8 = 1;
/// Flag bit: the row is a tombstone (a delete that still syncs).
const FLAG_TOMBSTONE: u8 = 0b0000_0001;
/// Bytes before the envelope.
pub(crate) const HEADER_BYTES: usize = 10;
/// Bytes of the header covered by the checksum (all but the checksum itself).
const CHECKED_HEADER_BYTES: usize = 6;

/// One record as stored locally: the envelope and the facts about it the
/// storage layer keeps counts of.
#[derive(Clone, PartialEq, Eq)]
pub struct Row {
    /// The key epoch that sealed the envelope.
    pub epoch: Epoch,
    /// Whether the envelope is a tombstone (a delete).
    pub tombstone: bool,
    /// The sealed envelope, opaque to this crate.
    pub envelope: Vec<u8>,
}

impl std::fmt::Debug for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Envelopes are ciphertext, but long: show their size only.
        f.debug_struct("Row")
            .field("epoch", &self.epoch)
            .field("tombstone", &self.tombstone)
            .field("envelope_bytes", &self.envelope.len())
            .finish()
    }
}

/// The counted facts of a stored row, read from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowFacts {
    pub(crate) epoch: Epoch,
    pub(crate) tombstone: bool,
}

impl Row {
    pub(crate) fn facts(&self) -> RowFacts {
        RowFacts {
            epoch: self.epoch,
            tombstone: self.tombstone,
        }
    }
}

/// Appends the v1 encoding of a row to `out`.
pub(crate) fn encode(epoch: Epoch, tombstone: bool, envelope: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(HEADER_BYTES + envelope.len());
    out.push(ROW_VERSION);
    out.push(if tombstone { FLAG_TOMBSTONE } else { 0 });
    out.extend_from_slice(&epoch.0.to_le_bytes());
    let crc = checksum(&out[start..start + CHECKED_HEADER_BYTES], envelope);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(envelope);
}

/// The row in `bytes`, or `None` if it is damaged.
pub(crate) fn decode(bytes: &[u8]) -> Option<Row> {
    let facts = verify(bytes)?;
    Some(Row {
        epoch: facts.epoch,
        tombstone: facts.tombstone,
        envelope: bytes[HEADER_BYTES..].to_vec(),
    })
}

/// Checks the whole row and returns its counted facts, or `None` if it is
/// damaged.
pub(crate) fn verify(bytes: &[u8]) -> Option<RowFacts> {
    let (header, envelope) = bytes.split_first_chunk::<HEADER_BYTES>()?;
    let [version, flags, e0, e1, e2, e3, c0, c1, c2, c3] = *header;
    if version != ROW_VERSION || flags & !FLAG_TOMBSTONE != 0 {
        return None;
    }
    let stored = u32::from_le_bytes([c0, c1, c2, c3]);
    if stored != checksum(&header[..CHECKED_HEADER_BYTES], envelope) {
        return None;
    }
    Some(RowFacts {
        epoch: Epoch(u32::from_le_bytes([e0, e1, e2, e3])),
        tombstone: flags & FLAG_TOMBSTONE != 0,
    })
}

/// The facts a damaged row's header claims, if it is shaped like a v1
/// header. Unverified: only for recounting when nothing better exists.
pub(crate) fn claimed_facts(bytes: &[u8]) -> Option<RowFacts> {
    let (header, _) = bytes.split_first_chunk::<HEADER_BYTES>()?;
    let [version, flags, e0, e1, e2, e3, ..] = *header;
    (version == ROW_VERSION && flags & !FLAG_TOMBSTONE == 0).then(|| RowFacts {
        epoch: Epoch(u32::from_le_bytes([e0, e1, e2, e3])),
        tombstone: flags & FLAG_TOMBSTONE != 0,
    })
}

fn checksum(header: &[u8], envelope: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header), envelope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row_strategy() -> impl Strategy<Value = Row> {
        (
            any::<u32>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..512),
        )
            .prop_map(|(epoch, tombstone, envelope)| Row {
                epoch: Epoch(epoch),
                tombstone,
                envelope,
            })
    }

    fn encoded(row: &Row) -> Vec<u8> {
        let mut out = Vec::new();
        encode(row.epoch, row.tombstone, &row.envelope, &mut out);
        out
    }

    proptest! {
        #[test]
        fn round_trip(row in row_strategy()) {
            let bytes = encoded(&row);
            prop_assert_eq!(bytes.len(), HEADER_BYTES + row.envelope.len());
            prop_assert_eq!(decode(&bytes), Some(row.clone()));
            prop_assert_eq!(verify(&bytes), Some(row.facts()));
            prop_assert_eq!(claimed_facts(&bytes), Some(row.facts()));
        }

        #[test]
        fn any_flipped_bit_is_detected(row in row_strategy(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encoded(&row);
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert_eq!(decode(&bytes), None);
        }

        #[test]
        fn truncation_and_garbage_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn known_layout() {
        let bytes = encoded(&Row {
            epoch: Epoch(0x0403_0201),
            tombstone: true,
            envelope: b"env".to_vec(),
        });
        assert_eq!(&bytes[..6], &[1, 1, 1, 2, 3, 4]);
        let crc = crc32c::crc32c(&[1, 1, 1, 2, 3, 4, b'e', b'n', b'v']);
        assert_eq!(&bytes[6..10], &crc.to_le_bytes());
        assert_eq!(&bytes[10..], b"env");
        assert_eq!(decode(&bytes[..9]), None, "shorter than a header");
    }
}
