//! Key exports: a store's data keys wrapped under a passphrase.
//!
//! An export lets a second device (or a restore) open a store's records.
//! It holds the store id, `K_index`, the relay token and every epoch key
//! that has not been purged — never the exporting device's identity, which
//! stays on that device.
//!
//! ```text
//! text   = "persist-key-v1:" base64url( header ‖ ciphertext ‖ tag ‖ check )
//! header = version u8 (1) ‖ kdf u8 (1 = Argon2id v19)
//!          ‖ m_cost KiB u32 BE ‖ t_cost u32 BE ‖ p_cost u32 BE
//!          ‖ salt [16] ‖ nonce [12]                                  (42 bytes)
//! key    = Argon2id(passphrase, salt, m_cost, t_cost, p_cost) → 32 bytes
//! body   = AES-256-GCM-SIV(key, nonce, aad = DOMAIN_EXPORT ‖ header,
//!                          postcard(ExportWire))
//! check  = first 4 bytes of SHA-256(DOMAIN_CHECK ‖ everything before it)
//! ```
//!
//! The unkeyed `check` tells a damaged export (truncated, edited, badly
//! copied) from a wrong passphrase, which only the AEAD tag can reveal.
//! A raw export (`persist-key-raw-v1:`, no passphrase) exists for tests and
//! migrations behind the engine's `dangerous()` door.
//!
//! # Invariants
//! - Parsing bounds every KDF parameter before any work, so a hostile
//!   export cannot make the importer allocate more than
//!   [`ARGON2_M_COST_KIB_MAX`] KiB or spin for long.
//! - Plaintext key material exists only in zeroizing buffers.

use aes_gcm_siv::aead::AeadInOut;
use aes_gcm_siv::{Aes256GcmSiv, KeyInit};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::ids::{Epoch, StoreId};
use crate::keyring::{
    EpochEntry, EpochState, KeyTaken, Keyring, NextRelayToken, Revocation, RevocationWire,
};
use crate::keys::Secret32;

/// Prefix of a passphrase-wrapped export.
pub const PREFIX: &str = "persist-key-v1:";
/// Prefix of a raw (unwrapped) export.
pub const RAW_PREFIX: &str = "persist-key-raw-v1:";
/// Associated-data domain of the wrapped body.
pub const DOMAIN_EXPORT: &[u8] = b"persist/export/v1";
const DOMAIN_CHECK: &[u8] = b"persist/export-check/v1";

const HEADER_LEN: usize = 42;
const TAG_LEN: usize = 16;
const CHECK_LEN: usize = 4;

/// Default Argon2id memory cost: 64 MiB.
pub const ARGON2_M_COST_KIB_DEFAULT: u32 = 64 * 1024;
/// Default Argon2id passes.
pub const ARGON2_T_COST_DEFAULT: u32 = 3;
/// Default Argon2id lanes.
pub const ARGON2_P_COST_DEFAULT: u32 = 1;
/// Largest memory cost an importer accepts (1 GiB): bounds what a hostile
/// export can make a device allocate.
pub const ARGON2_M_COST_KIB_MAX: u32 = 1024 * 1024;
/// Largest pass count an importer accepts.
pub const ARGON2_T_COST_MAX: u32 = 16;
/// Largest lane count an importer accepts.
pub const ARGON2_P_COST_MAX: u32 = 16;
/// Longest export text accepted (a store with thousands of epochs fits).
pub const EXPORT_TEXT_BYTES_MAX: usize = 1024 * 1024;

/// Characters of a generated passphrase (Crockford base32, no I L O U).
const PASSPHRASE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Symbols in a generated passphrase: 25 × 5 bits = 125 bits.
pub const PASSPHRASE_SYMBOLS: usize = 25;
const _: () = assert!(
    PASSPHRASE_SYMBOLS * 5 >= 120,
    "passphrases carry at least 120 bits"
);

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            m_cost_kib: ARGON2_M_COST_KIB_DEFAULT,
            t_cost: ARGON2_T_COST_DEFAULT,
            p_cost: ARGON2_P_COST_DEFAULT,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests (64 KiB, one pass). Never use them for a
    /// real export.
    pub fn insecure_for_tests() -> Self {
        Self {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

/// The keys an export carries.
pub struct ExportedKeys {
    /// The store.
    pub store_id: StoreId,
    /// `K_index`.
    pub index_key: Secret32,
    /// The relay token.
    pub relay_token: Secret32,
    /// The token a pending revocation will switch the relay to.
    pub relay_token_next: Option<NextRelayToken>,
    /// The epoch new writes use.
    pub current: Epoch,
    /// Every unpurged epoch.
    pub epochs: Vec<(Epoch, EpochEntry)>,
    /// The store's revocations: the importing device never passes a key
    /// on to a revoked device, and refuses what it signs afterwards.
    pub revocations: Vec<Revocation>,
}

/// An export that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The text does not start with a known prefix.
    #[error("this is not a Persist key export (it should start with \"{PREFIX}\")")]
    NotAnExport,
    /// The export is damaged: truncated, edited or badly copied.
    #[error("the key export is damaged (truncated, edited or badly copied); copy it again")]
    Damaged,
    /// The export was made by a newer Persist.
    #[error("the key export uses format {0}, which this build does not read: upgrade Persist")]
    UnsupportedVersion(u8),
    /// The KDF parameters are outside what an importer accepts.
    #[error("the key export asks for Argon2 costs beyond the limits ({0})")]
    CostTooHigh(&'static str),
    /// The passphrase does not open the export.
    #[error("wrong passphrase for this key export")]
    WrongPassphrase,
    /// The export decrypted but its content is inconsistent.
    #[error("the key export's content is invalid: {0}")]
    Invalid(&'static str),
}

/// A fresh passphrase of [`PASSPHRASE_SYMBOLS`] symbols (125 bits), in
/// groups of five: `7KQ2M-XW9PD-…`.
pub fn generate_passphrase(rng: &mut (impl CryptoRng + ?Sized)) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(PASSPHRASE_SYMBOLS + 4));
    for i in 0..PASSPHRASE_SYMBOLS {
        if i > 0 && i % 5 == 0 {
            out.push('-');
        }
        // 32 symbols: the low five bits of a uniform u32 are uniform.
        let symbol = PASSPHRASE_ALPHABET[(rng.next_u32() & 31) as usize];
        out.push(char::from(symbol));
    }
    out
}

impl ExportedKeys {
    /// The keys of `ring` that an export carries.
    pub fn from_keyring(ring: &Keyring) -> Self {
        Self {
            store_id: ring.store_id,
            index_key: ring.index_key.secret().duplicate(),
            relay_token: ring.relay_token.duplicate(),
            relay_token_next: ring
                .relay_token_next
                .as_ref()
                .map(NextRelayToken::duplicate),
            current: ring.current,
            epochs: ring
                .epochs
                .iter()
                .filter(|(_, e)| e.key.is_some())
                .map(|(n, e)| (*n, e.duplicate()))
                .collect(),
            revocations: ring.revoked.clone(),
        }
    }

    /// Wraps the keys under `passphrase`.
    pub fn wrap(
        &self,
        passphrase: &str,
        params: KdfParams,
        rng: &mut (impl CryptoRng + ?Sized),
    ) -> Result<String, ExportError> {
        check_params(params)?;
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut salt);
        rng.fill_bytes(&mut nonce);
        let mut header = [0u8; HEADER_LEN];
        header[0] = 1;
        header[1] = 1;
        header[2..6].copy_from_slice(&params.m_cost_kib.to_be_bytes());
        header[6..10].copy_from_slice(&params.t_cost.to_be_bytes());
        header[10..14].copy_from_slice(&params.p_cost.to_be_bytes());
        header[14..30].copy_from_slice(&salt);
        header[30..42].copy_from_slice(&nonce);
        let key = derive(passphrase, &salt, params)?;
        let mut body = self.encode();
        let cipher = Aes256GcmSiv::new(key.expose().into());
        let aad = [DOMAIN_EXPORT, &header].concat();
        let tag = cipher
            .encrypt_inout_detached(&nonce.into(), &aad, body.as_mut_slice().into())
            .map_err(|_| ExportError::Invalid("too large"))?;
        let mut blob = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN + CHECK_LEN);
        blob.extend_from_slice(&header);
        blob.extend_from_slice(&body);
        blob.extend_from_slice(&tag);
        Ok(finish(PREFIX, blob))
    }

    /// The keys in the clear, wrapped in nothing. Whoever holds the text
    /// holds the store's keys.
    pub fn raw(&self) -> Zeroizing<String> {
        Zeroizing::new(finish(RAW_PREFIX, self.encode().to_vec()))
    }

    /// Reads an export made by [`ExportedKeys::wrap`] or
    /// [`ExportedKeys::raw`] (which ignores the passphrase).
    pub fn unwrap(text: &str, passphrase: &str) -> Result<Self, ExportError> {
        let text = text.trim();
        if text.len() > EXPORT_TEXT_BYTES_MAX {
            return Err(ExportError::Damaged);
        }
        if let Some(rest) = text.strip_prefix(RAW_PREFIX) {
            let blob = unframe(RAW_PREFIX, rest)?;
            return Self::decode(&blob);
        }
        let rest = text.strip_prefix(PREFIX).ok_or_else(|| {
            if text.starts_with("persist-key-") {
                ExportError::UnsupportedVersion(0)
            } else {
                ExportError::NotAnExport
            }
        })?;
        let blob = unframe(PREFIX, rest)?;
        if blob.len() < HEADER_LEN + TAG_LEN {
            return Err(ExportError::Damaged);
        }
        let (header, body) = blob.split_at(HEADER_LEN);
        if header[0] != 1 {
            return Err(ExportError::UnsupportedVersion(header[0]));
        }
        if header[1] != 1 {
            return Err(ExportError::Invalid("unknown key derivation"));
        }
        let be = |r: core::ops::Range<usize>| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[r]);
            u32::from_be_bytes(b)
        };
        let params = KdfParams {
            m_cost_kib: be(2..6),
            t_cost: be(6..10),
            p_cost: be(10..14),
        };
        check_params(params)?;
        let key = derive(passphrase, &header[14..30], params)?;
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&header[30..42]);
        let (ct, tag) = body.split_at(body.len() - TAG_LEN);
        let mut tag_arr = [0u8; TAG_LEN];
        tag_arr.copy_from_slice(tag);
        let mut plain = Zeroizing::new(ct.to_vec());
        let cipher = Aes256GcmSiv::new(key.expose().into());
        let aad = [DOMAIN_EXPORT, header].concat();
        cipher
            .decrypt_inout_detached(
                &nonce.into(),
                &aad,
                plain.as_mut_slice().into(),
                &tag_arr.into(),
            )
            .map_err(|_| ExportError::WrongPassphrase)?;
        Self::decode(&plain)
    }

    /// The keys' binary encoding, in a zeroizing buffer.
    pub(crate) fn encode(&self) -> Zeroizing<Vec<u8>> {
        let wire = ExportWire {
            store_id: self.store_id.0,
            index_key: *self.index_key.expose(),
            relay_token: *self.relay_token.expose(),
            relay_token_next: self
                .relay_token_next
                .as_ref()
                .map(|n| (n.epoch.0, *n.token.expose())),
            current: self.current.0,
            // An epoch's concurrent keys follow its own, under its number.
            epochs: self
                .epochs
                .iter()
                .flat_map(|(n, e)| {
                    e.keys().map(|(announcement, k)| ExportEpoch {
                        epoch: n.0,
                        state: e.state as u8,
                        key: *k.expose(),
                        announcement: *announcement,
                    })
                })
                .collect(),
            revocations: self.revocations.iter().map(RevocationWire::from).collect(),
        };
        Zeroizing::new(
            postcard::to_stdvec(&wire)
                .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}")),
        )
    }

    /// Reads [`ExportedKeys::encode`]'s output.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, ExportError> {
        let wire: ExportWire =
            postcard::from_bytes(bytes).map_err(|_| ExportError::Invalid("undecodable"))?;
        let mut epochs: Vec<(Epoch, EpochEntry)> = Vec::with_capacity(wire.epochs.len());
        for e in &wire.epochs {
            let state = match e.state {
                0 => EpochState::Current,
                1 => EpochState::Rotating,
                2 => EpochState::Retired,
                _ => return Err(ExportError::Invalid("unknown epoch state")),
            };
            let key = Secret32::from_bytes(e.key);
            match epochs.last_mut() {
                Some((n, entry)) if *n == Epoch(e.epoch) => {
                    if entry.state != state
                        || entry.take(e.announcement, key) != KeyTaken::Concurrent
                    {
                        return Err(ExportError::Invalid(
                            "an epoch's concurrent keys are out of order",
                        ));
                    }
                }
                _ => epochs.push((
                    Epoch(e.epoch),
                    EpochEntry::new(state, Some(key), e.announcement),
                )),
            }
        }
        if epochs.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(ExportError::Invalid("the epochs are out of order"));
        }
        let current = Epoch(wire.current);
        if !epochs.iter().any(|(n, _)| *n == current) {
            return Err(ExportError::Invalid("the current epoch's key is missing"));
        }
        Ok(Self {
            store_id: StoreId(wire.store_id),
            index_key: Secret32::from_bytes(wire.index_key),
            relay_token: Secret32::from_bytes(wire.relay_token),
            relay_token_next: wire.relay_token_next.map(|(epoch, token)| NextRelayToken {
                epoch: Epoch(epoch),
                token: Secret32::from_bytes(token),
            }),
            current,
            epochs,
            revocations: wire.revocations.iter().map(Revocation::from).collect(),
        })
    }
}

fn check_params(p: KdfParams) -> Result<(), ExportError> {
    if p.m_cost_kib > ARGON2_M_COST_KIB_MAX {
        return Err(ExportError::CostTooHigh("memory"));
    }
    if p.t_cost > ARGON2_T_COST_MAX {
        return Err(ExportError::CostTooHigh("passes"));
    }
    if p.p_cost > ARGON2_P_COST_MAX {
        return Err(ExportError::CostTooHigh("lanes"));
    }
    Ok(())
}

fn derive(passphrase: &str, salt: &[u8], p: KdfParams) -> Result<Secret32, ExportError> {
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32))
        .map_err(|_| ExportError::Invalid("Argon2 parameters out of range"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, key.as_mut())
        .map_err(|_| ExportError::Invalid("Argon2 refused the inputs"))?;
    Ok(Secret32::from_bytes(*key))
}

fn check(prefix: &str, blob: &[u8]) -> [u8; CHECK_LEN] {
    let digest = Sha256::new()
        .chain_update(DOMAIN_CHECK)
        .chain_update(prefix.as_bytes())
        .chain_update(blob)
        .finalize();
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&digest[..CHECK_LEN]);
    out
}

pub(crate) fn finish(prefix: &str, mut blob: Vec<u8>) -> String {
    let c = check(prefix, &blob);
    blob.extend_from_slice(&c);
    let text = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&blob));
    blob.zeroize();
    text
}

pub(crate) fn unframe(prefix: &str, rest: &str) -> Result<Zeroizing<Vec<u8>>, ExportError> {
    let compact: String = rest.chars().filter(|c| !c.is_whitespace()).collect();
    let blob = Zeroizing::new(
        URL_SAFE_NO_PAD
            .decode(compact.as_bytes())
            .map_err(|_| ExportError::Damaged)?,
    );
    if blob.len() < CHECK_LEN {
        return Err(ExportError::Damaged);
    }
    let (body, c) = blob.split_at(blob.len() - CHECK_LEN);
    if check(prefix, body) != c {
        return Err(ExportError::Damaged);
    }
    Ok(Zeroizing::new(body.to_vec()))
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct ExportWire {
    store_id: [u8; 16],
    index_key: [u8; 32],
    relay_token: [u8; 32],
    relay_token_next: Option<(u32, [u8; 32])>,
    current: u32,
    epochs: Vec<ExportEpoch>,
    revocations: Vec<RevocationWire>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct ExportEpoch {
    epoch: u32,
    state: u8,
    key: [u8; 32],
    announcement: [u8; 32],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Entropy, SeededEntropy};
    use crate::hlc::Hlc;
    use crate::keys::DeviceIdentity;

    fn ring() -> Keyring {
        let mut rng = SeededEntropy::from_u64(1).stream("t");
        Keyring::create(
            DeviceIdentity::generate(&mut rng),
            "a",
            Hlc::default(),
            &mut rng,
        )
    }

    fn wrapped(r: &Keyring, pass: &str) -> String {
        let mut rng = SeededEntropy::from_u64(2).stream("x");
        ExportedKeys::from_keyring(r)
            .wrap(pass, KdfParams::insecure_for_tests(), &mut rng)
            .unwrap()
    }

    #[test]
    fn round_trip() {
        let r = ring();
        let text = wrapped(&r, "correct horse");
        assert!(text.starts_with(PREFIX));
        let back = ExportedKeys::unwrap(&text, "correct horse").unwrap();
        assert_eq!(back.store_id, r.store_id);
        assert!(back.index_key == *r.index_key.secret());
        assert!(back.relay_token == r.relay_token);
        assert_eq!(back.current, r.current);
        assert_eq!(back.epochs.len(), 1);
        assert!(back.epochs[0].1.key.as_ref() == r.key(r.current));
        // Line breaks and surrounding space from copy and paste are fine.
        let (head, tail) = text.split_at(40);
        assert!(ExportedKeys::unwrap(&format!("  {head}\n{tail}\n"), "correct horse").is_ok());
    }

    #[test]
    fn wrong_passphrase_and_damage_are_told_apart() {
        let r = ring();
        let text = wrapped(&r, "pw");
        assert_eq!(
            ExportedKeys::unwrap(&text, "Pw").err(),
            Some(ExportError::WrongPassphrase)
        );
        assert_eq!(
            ExportedKeys::unwrap(&text[..text.len() - 10], "pw").err(),
            Some(ExportError::Damaged)
        );
        for i in PREFIX.len()..text.len() {
            let mut t = text.clone().into_bytes();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            assert!(
                matches!(ExportedKeys::unwrap(&t, "pw"), Err(ExportError::Damaged)),
                "edit at {i} must read as damage"
            );
        }
        assert_eq!(
            ExportedKeys::unwrap("hello", "pw").err(),
            Some(ExportError::NotAnExport)
        );
        assert_eq!(
            ExportedKeys::unwrap("", "pw").err(),
            Some(ExportError::NotAnExport)
        );
    }

    #[test]
    fn hostile_costs_are_refused_before_work() {
        let r = ring();
        let mut rng = SeededEntropy::from_u64(2).stream("x");
        let keys = ExportedKeys::from_keyring(&r);
        let huge = KdfParams {
            m_cost_kib: ARGON2_M_COST_KIB_MAX + 1,
            ..KdfParams::default()
        };
        assert_eq!(
            keys.wrap("pw", huge, &mut rng).err(),
            Some(ExportError::CostTooHigh("memory"))
        );
    }

    #[test]
    fn raw_export_needs_no_passphrase() {
        let r = ring();
        let raw = ExportedKeys::from_keyring(&r).raw();
        assert!(raw.starts_with(RAW_PREFIX));
        let back = ExportedKeys::unwrap(&raw, "").unwrap();
        assert_eq!(back.store_id, r.store_id);
    }

    proptest::proptest! {
        /// Raw exports of any keyring round-trip (the wrapped form adds
        /// Argon2id, too slow to run per case; `round_trip` covers it).
        #[test]
        fn raw_export_round_trips(seed in proptest::prelude::any::<u64>(), rotations in 0usize..5) {
            let mut rng = SeededEntropy::from_u64(seed).stream("p");
            let mut r = Keyring::create(DeviceIdentity::generate(&mut rng), "a", Hlc::default(), &mut rng);
            for _ in 0..rotations {
                r.rotate(&mut rng);
            }
            let back = ExportedKeys::unwrap(&ExportedKeys::from_keyring(&r).raw(), "").unwrap();
            proptest::prop_assert_eq!(back.store_id, r.store_id);
            proptest::prop_assert_eq!(back.current, r.current);
            proptest::prop_assert_eq!(back.epochs.len(), r.epochs.len());
            for (e, entry) in &back.epochs {
                proptest::prop_assert!(entry.key.as_ref() == r.key(*e));
            }
        }

        /// Arbitrary text never panics the export reader.
        #[test]
        fn unwrap_never_panics(text in ".{0,200}") {
            let _ = ExportedKeys::unwrap(&text, "pw");
            let _ = ExportedKeys::unwrap(&format!("{PREFIX}{text}"), "pw");
            let _ = ExportedKeys::unwrap(&format!("{RAW_PREFIX}{text}"), "");
        }
    }

    #[test]
    fn passphrases_are_grouped_and_fresh() {
        let mut rng = SeededEntropy::from_u64(3).stream("p");
        let a = generate_passphrase(&mut rng);
        let b = generate_passphrase(&mut rng);
        assert_ne!(*a, *b);
        assert_eq!(a.len(), PASSPHRASE_SYMBOLS + 4);
        assert_eq!(a.split('-').count(), 5);
        assert!(
            a.chars()
                .all(|c| c == '-' || PASSPHRASE_ALPHABET.contains(&(c as u8)))
        );
    }
}
