//! The sealed record: what an envelope's body decrypts to.
//!
//! `Record { path, value, origin, hlc }` is postcard-encoded, then padded
//! with zero bytes to its PADMÉ bucket so that a ciphertext's length says
//! little about the path and value it hides.
//!
//! # Invariants
//! - [`Record::decode`] accepts exactly what [`Record::encode_padded`]
//!   produces: the padding must be all zeros and the total length must be
//!   the PADMÉ bucket of the encoded length; anything else is an error.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::hlc::Hlc;
use crate::ids::DeviceId;
use crate::padding::padme;

/// Longest record path, in bytes of UTF-8.
pub const PATH_BYTES_MAX: usize = 1024;

/// Largest value, in bytes of its encoding. Half the largest sync frame, so
/// that one record always fits in a frame with room for its envelope.
pub const VALUE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// A path, a value, and the version it was written with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The path the app wrote to.
    pub path: String,
    /// The encoded value; empty for a tombstone. (`serde_bytes` only
    /// speeds the codec up: postcard writes the same bytes either way.)
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// The device that made the write (kept across reseals).
    pub origin: DeviceId,
    /// The write's HLC stamp (kept across reseals).
    pub hlc: Hlc,
}

/// A record body that did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The postcard encoding is malformed.
    #[error("record body is malformed: {0}")]
    Malformed(String),
    /// The padding is not zeros of the right length.
    #[error("record padding is malformed")]
    BadPadding,
    /// The path is empty, too long or not allowed.
    #[error(transparent)]
    Path(#[from] PathError),
}

/// A path that cannot name a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is the empty string.
    #[error("a record path must not be empty")]
    Empty,
    /// The path is longer than [`PATH_BYTES_MAX`].
    #[error("a record path may be at most {max} bytes of UTF-8, this one is {len}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The path contains a NUL or another control character.
    #[error("a record path must not contain control characters (found {found:?} at byte {at})")]
    ControlCharacter {
        /// The character found.
        found: char,
        /// Its byte offset.
        at: usize,
    },
}

/// Checks that `path` may name a record.
pub fn validate_path(path: &str) -> Result<(), PathError> {
    validate_path_body(path, 0)
}

/// The first character of a path the store itself writes (member
/// announcements, see [`crate::membership`]). A control character, so no
/// app path can start with it and apps never see these records.
pub const SYSTEM_PATH_PREFIX: char = '\u{1}';

/// Whether `path` is one the store itself writes.
pub fn is_system_path(path: &str) -> bool {
    path.starts_with(SYSTEM_PATH_PREFIX)
}

/// Checks a path as stored in a record: an app path (see
/// [`validate_path`]), or [`SYSTEM_PATH_PREFIX`] followed by one.
pub fn validate_stored_path(path: &str) -> Result<(), PathError> {
    match path.strip_prefix(SYSTEM_PATH_PREFIX) {
        Some(rest) if !rest.is_empty() => validate_path_body(path, SYSTEM_PATH_PREFIX.len_utf8()),
        _ => validate_path(path),
    }
}

/// Checks `path` from byte `from` on for control characters, and its
/// whole length.
fn validate_path_body(path: &str, from: usize) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > PATH_BYTES_MAX {
        return Err(PathError::TooLong {
            len: path.len(),
            max: PATH_BYTES_MAX,
        });
    }
    if let Some((at, found)) = path
        .char_indices()
        .skip_while(|(at, _)| *at < from)
        .find(|(_, c)| c.is_control())
    {
        return Err(PathError::ControlCharacter { found, at });
    }
    Ok(())
}

impl Record {
    /// The postcard encoding, zero-padded to its PADMÉ bucket. The buffer
    /// zeroizes on drop since it holds plaintext.
    pub fn encode_padded(&self) -> Zeroizing<Vec<u8>> {
        // Serializing a struct of strings, byte vectors and integers into a
        // Vec cannot fail.
        let mut out = Zeroizing::new(
            postcard::to_stdvec(self)
                .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}")),
        );
        let padded = padme(out.len());
        out.resize(padded, 0);
        out
    }

    /// Inverse of [`Record::encode_padded`].
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        let (record, rest): (Record, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        let used = bytes.len() - rest.len();
        if padme(used) != bytes.len() || rest.iter().any(|&b| b != 0) {
            return Err(RecordError::BadPadding);
        }
        validate_stored_path(&record.path)?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_are_validated() {
        assert_eq!(validate_path(""), Err(PathError::Empty));
        assert!(matches!(
            validate_path(&"a".repeat(PATH_BYTES_MAX + 1)),
            Err(PathError::TooLong { len: 1025, .. })
        ));
        assert!(validate_path(&"é".repeat(PATH_BYTES_MAX / 2)).is_ok());
        assert!(matches!(
            validate_path("a\0b"),
            Err(PathError::ControlCharacter { at: 1, .. })
        ));
        assert!(validate_path("users/42/profile").is_ok());
        assert!(
            validate_path("\u{1}member/ab").is_err(),
            "apps cannot write system paths"
        );
        assert!(validate_stored_path("\u{1}member/ab").is_ok());
        assert!(validate_stored_path("\u{1}").is_err());
        assert!(validate_stored_path("\u{1}a\u{1}").is_err());
        assert!(is_system_path("\u{1}member/ab") && !is_system_path("member/ab"));
    }

    #[test]
    fn bad_padding_is_refused() {
        let r = Record {
            path: "p".into(),
            value: vec![1; 100],
            origin: DeviceId([1; 16]),
            hlc: Hlc { ms: 1, counter: 2 },
        };
        let mut enc = r.encode_padded().to_vec();
        assert_eq!(Record::decode(&enc), Ok(r));
        let last = enc.len() - 1;
        enc[last] = 1;
        assert_eq!(Record::decode(&enc), Err(RecordError::BadPadding));
        enc[last] = 0;
        enc.push(0);
        assert_eq!(Record::decode(&enc), Err(RecordError::BadPadding));
        assert!(Record::decode(&[0xff; 3]).is_err());
    }

    /// `serde_bytes` on `value` must not change the encoding: records
    /// sealed before it was added must still open.
    #[test]
    fn value_encoding_is_unchanged_by_serde_bytes() {
        #[derive(Serialize)]
        struct Plain<'a> {
            path: &'a str,
            value: &'a Vec<u8>,
            origin: DeviceId,
            hlc: Hlc,
        }
        let r = Record {
            path: "a/b".into(),
            value: vec![0, 1, 2, 255, 128],
            origin: DeviceId([7; 16]),
            hlc: Hlc { ms: 99, counter: 1 },
        };
        let plain = Plain {
            path: &r.path,
            value: &r.value,
            origin: r.origin,
            hlc: r.hlc,
        };
        assert_eq!(
            postcard::to_stdvec(&r).unwrap(),
            postcard::to_stdvec(&plain).unwrap()
        );
    }

    proptest! {
        #[test]
        fn round_trip(path in "[a-z/]{1,40}", value in proptest::collection::vec(any::<u8>(), 0..3000),
                      origin in any::<[u8; 16]>(), ms in any::<u64>(), counter in any::<u16>()) {
            let r = Record { path, value, origin: DeviceId(origin), hlc: Hlc { ms, counter } };
            let enc = r.encode_padded();
            prop_assert_eq!(enc.len(), padme(enc.len()));
            prop_assert_eq!(Record::decode(&enc), Ok(r));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&bytes);
        }
    }
}
