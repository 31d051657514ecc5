//! Secret key types.
//!
//! Every secret here zeroizes on drop and has no `Debug`, `Display`,
//! `Serialize` or `Clone` that could leak it into a log or a frame by
//! accident; bytes leave only through explicit, named accessors used by the
//! sealing code and the keyring codec.

use ed25519_dalek::{SigningKey, VerifyingKey};
use hmac::{KeyInit, Mac};
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use x25519_dalek::StaticSecret;
use zeroize::{Zeroize, Zeroizing};

use crate::ids::{DeviceId, Locator, StoreId};

type HmacSha256 = hmac::Hmac<Sha256>;

/// 32 secret bytes: a data key, an index key, a relay token, a KEK.
pub struct Secret32(Zeroizing<[u8; 32]>);

impl Secret32 {
    /// Wraps existing key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// 32 fresh random bytes.
    pub fn random(rng: &mut (impl CryptoRng + ?Sized)) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        Self(bytes)
    }

    /// The key bytes. Callers must not copy them anywhere that outlives use.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// An explicit copy, for the few places that need two owners.
    pub fn duplicate(&self) -> Self {
        Self(self.0.clone())
    }
}

impl PartialEq for Secret32 {
    /// Constant-time comparison.
    fn eq(&self, other: &Self) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

impl Eq for Secret32 {}

/// `K_index`: turns record paths into [`Locator`]s.
///
/// Holds a keyed HMAC state so that a locator costs two SHA-256 blocks.
pub struct IndexKey {
    mac: HmacSha256,
    key: Secret32,
}

impl IndexKey {
    /// An index key from its secret bytes.
    pub fn new(key: Secret32) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = <HmacSha256 as KeyInit>::new_from_slice(key.expose())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Self { mac, key }
    }

    /// `HMAC-SHA256(K_index, store_id ‖ path)`.
    pub fn locator(&self, store_id: &StoreId, path: &str) -> Locator {
        let mut mac = self.mac.clone();
        mac.update(store_id.as_bytes());
        mac.update(path.as_bytes());
        Locator(mac.finalize().into_bytes().into())
    }

    /// The secret bytes (for the keyring codec and exports).
    pub fn secret(&self) -> &Secret32 {
        &self.key
    }
}

/// The locator of a path in a store that does not encrypt
/// (`encrypt(false)`): a plain hash, since there is no secret to key it.
pub fn plain_locator(store_id: &StoreId, path: &str) -> Locator {
    let mut h = Sha256::new();
    h.update(b"persist/plain-locator/v1");
    h.update(store_id.as_bytes());
    h.update(path.as_bytes());
    Locator(h.finalize().into())
}

/// A device's long-term identity: Ed25519 for signatures and TLS, X25519
/// for key wrapping and pairing.
pub struct DeviceIdentity {
    signing: SigningKey,
    agreement: StaticSecret,
}

impl DeviceIdentity {
    /// A fresh identity.
    pub fn generate(rng: &mut (impl CryptoRng + ?Sized)) -> Self {
        let signing = SigningKey::generate(rng);
        let agreement = StaticSecret::random_from_rng(rng);
        Self { signing, agreement }
    }

    /// Rebuilds an identity from its two 32-byte secrets.
    pub fn from_secrets(ed25519: &Secret32, x25519: &Secret32) -> Self {
        Self {
            signing: SigningKey::from_bytes(ed25519.expose()),
            agreement: StaticSecret::from(*x25519.expose()),
        }
    }

    /// The Ed25519 secret seed.
    pub fn ed25519_secret(&self) -> Secret32 {
        Secret32::from_bytes(self.signing.to_bytes())
    }

    /// The X25519 secret scalar.
    pub fn x25519_secret(&self) -> Secret32 {
        Secret32::from_bytes(self.agreement.to_bytes())
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::from_public_key(self.signing.verifying_key().as_bytes())
    }

    /// The Ed25519 public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The X25519 public key.
    pub fn x25519_public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.agreement).to_bytes()
    }

    /// The Ed25519 signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

impl Drop for DeviceIdentity {
    fn drop(&mut self) {
        // SigningKey and StaticSecret zeroize themselves on drop (the
        // `zeroize` features are on); this keeps the intent visible.
        let mut scratch = self.signing.to_bytes();
        scratch.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Entropy, SeededEntropy};

    #[test]
    fn identity_round_trips_through_its_secrets() {
        let mut rng = SeededEntropy::from_u64(1).stream("t");
        let id = DeviceIdentity::generate(&mut rng);
        let back = DeviceIdentity::from_secrets(&id.ed25519_secret(), &id.x25519_secret());
        assert_eq!(id.device_id(), back.device_id());
        assert_eq!(id.x25519_public(), back.x25519_public());
    }

    #[test]
    fn locators_depend_on_key_store_and_path() {
        let k1 = IndexKey::new(Secret32::from_bytes([1; 32]));
        let k2 = IndexKey::new(Secret32::from_bytes([2; 32]));
        let s = StoreId([0; 16]);
        let a = k1.locator(&s, "a");
        assert_eq!(a, k1.locator(&s, "a"));
        assert_ne!(a, k1.locator(&s, "b"));
        assert_ne!(a, k2.locator(&s, "a"));
        assert_ne!(a, k1.locator(&StoreId([1; 16]), "a"));
        assert_ne!(a, plain_locator(&s, "a"));
    }

    #[test]
    fn locator_is_hmac_sha256_of_store_then_path() {
        let key = [0x0b; 32];
        let s = StoreId([0x11; 16]);
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&key).unwrap();
        mac.update(&[[0x11u8; 16].as_slice(), b"x/y"].concat());
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(
            IndexKey::new(Secret32::from_bytes(key))
                .locator(&s, "x/y")
                .0,
            expected
        );
    }
}
