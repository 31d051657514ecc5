//! Identifiers: stores, devices, record locators and key epochs.
//!
//! All are fixed-size byte strings or integers with a stable binary form;
//! none carries a secret. `Display` renders lowercase hex so that ids can be
//! copied from a terminal and parsed back with [`std::str::FromStr`].

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Error parsing an id from its hex form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdParseError {
    /// The text is not hex of the expected length.
    #[error("expected {expected} hex characters for a {kind}, got {got:?}")]
    BadHex {
        /// Which id was being parsed.
        kind: &'static str,
        /// How many hex characters it takes.
        expected: usize,
        /// The text received (ids are not secret).
        got: String,
    },
}

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length of the id in bytes.
            pub const LEN: usize = $len;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($kind, "({})"), hex::encode(self.0))
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; $len];
                hex::decode_to_slice(s.trim(), &mut out).map_err(|_| IdParseError::BadHex {
                    kind: $kind,
                    expected: 2 * $len,
                    got: s.chars().take(2 * $len + 8).collect(),
                })?;
                Ok(Self(out))
            }
        }
    };
}

byte_id!(
    /// A store: 16 random bytes chosen when the store is created, shared by
    /// every device of the store and visible to a relay.
    StoreId,
    16,
    "StoreId"
);

byte_id!(
    /// A device: the first 16 bytes of SHA-256 of its Ed25519 public key.
    DeviceId,
    16,
    "DeviceId"
);

byte_id!(
    /// An invite: 16 random bytes in its code. It names the pairing
    /// mailbox on the relay, which is all a relay learns of an invite.
    InviteId,
    16,
    "InviteId"
);

byte_id!(
    /// Where a record lives: `HMAC-SHA256(K_index, store_id ‖ path)`.
    ///
    /// A relay sees locators, never paths; without `K_index` a locator says
    /// nothing about the path it stands for.
    Locator,
    32,
    "Locator"
);

impl DeviceId {
    /// The device id of an Ed25519 public key.
    pub fn from_public_key(ed25519_public: &[u8; 32]) -> Self {
        let digest = Sha256::digest(ed25519_public);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }
}

/// A key epoch: the number of the data key `DEK_e` that sealed a record.
///
/// Epochs start at 1 when a store is created and grow by one per rotation.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Epoch(pub u32);

impl Epoch {
    /// The epoch of a new store.
    pub const FIRST: Epoch = Epoch(1);

    /// The epoch after this one, or `None` at `u32::MAX`.
    pub fn next(self) -> Option<Epoch> {
        self.0.checked_add(1).map(Epoch)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_is_sha256_prefix() {
        let pk = [7u8; 32];
        let id = DeviceId::from_public_key(&pk);
        assert_eq!(&id.0[..], &Sha256::digest(pk)[..16]);
    }

    #[test]
    fn hex_round_trip_and_bad_input() {
        let id = StoreId([0xab; 16]);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<StoreId>(), Ok(id));
        let err = "zz".parse::<StoreId>().unwrap_err();
        assert!(err.to_string().contains("32 hex characters"), "{err}");
        assert!("ab".repeat(17).parse::<StoreId>().is_err());
    }
}
