//! Parcels: how a new epoch key reaches the other members (DESIGN.md,
//! "Rotation and revocation", step 2), and how they acknowledge it.
//!
//! A parcel travels through the recipient's relay mailbox. It is signed by
//! its sender's Ed25519 key, so a receiver takes it only from a member it
//! knows; a key parcel's key is sealed to the recipient's X25519 key:
//!
//! ```text
//! shared = X25519(ephemeral, recipient)
//! kek    = HKDF-SHA256(ikm = shared, salt = ephemeral_pub ‖ recipient_pub,
//!                      info = "persist/epoch-wrap/v1" ‖ store ‖ epoch ‖ announcement)
//! sealed = AES-256-GCM(kek, nonce, DEK_e, aad = the parcel's header)
//! parcel = postcard(ParcelWire) ‖ Ed25519(sender, "persist/parcel/v1" ‖ postcard(ParcelWire))
//! ```
//!
//! A key parcel also carries the revocations its sender knows (the
//! newest [`REVOCATIONS_PER_PARCEL_MAX`]), under its signature: a member
//! learns that a device is revoked no later than it learns the key of the
//! epoch that revocation started, so it never passes that key on to the
//! revoked device, and refuses what that device signs afterwards.
//!
//! The wrap is bound to the epoch's announcement hash, so a key cannot be
//! replayed as another epoch's. The relay sees the store, the two device
//! ids and the epoch number: the same metadata envelopes show it.
//!
//! # Invariants
//! - A parcel opens only for its recipient, in its store, from a known
//!   member whose signature verifies.
//! - The wrapped key exists in the clear only in zeroizing buffers.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use hkdf::Hkdf;
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::ids::{DeviceId, Epoch, StoreId};
use crate::keyring::{Member, Revocation};
use crate::keys::{DeviceIdentity, Secret32};

const FORMAT: u8 = 1;
const DOMAIN_SIGN: &[u8] = b"persist/parcel/v1";
const DOMAIN_WRAP: &[u8] = b"persist/epoch-wrap/v1";
/// Revocations a key parcel carries at most (the newest ones; devices
/// also learn every revocation from its record).
pub const REVOCATIONS_PER_PARCEL_MAX: usize = 256;
/// Bytes of a sealed key with its GCM tag.
const SEALED_KEY_BYTES: usize = 32 + 16;
/// Bytes of a sealed key and relay token with its GCM tag.
const SEALED_WITH_TOKEN_BYTES: usize = 64 + 16;
/// Bytes of a parcel: above any real one (a revocation encodes in under
/// 64 bytes), far below a mailbox item.
pub const PARCEL_BYTES_MAX: usize = 1024 + REVOCATIONS_PER_PARCEL_MAX * 64;

/// What a parcel says.
pub enum Parcel {
    /// The key of an epoch.
    Key {
        /// The epoch.
        epoch: Epoch,
        /// Its announcement hash.
        announcement: [u8; 32],
        /// `DEK_e`.
        key: Secret32,
        /// The revocations the sender knows.
        revocations: Vec<Revocation>,
        /// The relay token of the revocation that started `epoch`, while
        /// the relay has not been switched to it.
        relay_token: Option<Secret32>,
    },
    /// The sender holds this epoch's key now.
    Ack {
        /// The epoch.
        epoch: Epoch,
        /// Its announcement hash.
        announcement: [u8; 32],
    },
}

impl std::fmt::Debug for Parcel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Parcel::Key { epoch, .. } => write!(f, "Parcel::Key({epoch:?}, ..)"),
            Parcel::Ack { epoch, .. } => write!(f, "Parcel::Ack({epoch:?}, ..)"),
        }
    }
}

/// A parcel that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParcelError {
    /// It does not decode, or is of an unknown format.
    #[error("parcel is malformed")]
    Malformed,
    /// It is for another store or another device.
    #[error("parcel is addressed to another store or device")]
    Misaddressed,
    /// Its sender is not a known member.
    #[error("parcel is from {0}, which is not a known member")]
    UnknownSender(DeviceId),
    /// The signature or the sealed key does not verify.
    #[error("parcel does not authenticate")]
    Forged,
}

#[derive(Serialize, Deserialize)]
struct ParcelWire {
    format: u8,
    store: [u8; 16],
    sender: [u8; 16],
    recipient: [u8; 16],
    epoch: u32,
    announcement: [u8; 32],
    /// Empty for an acknowledgement.
    ephemeral: Option<[u8; 32]>,
    nonce: [u8; 12],
    #[serde(with = "serde_bytes")]
    sealed: Vec<u8>,
    /// Empty for an acknowledgement.
    revocations: Vec<Revocation>,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signature: Vec<u8>,
}

fn header(w: &ParcelWire) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 * 3 + 4 + 32 + 32);
    h.extend_from_slice(DOMAIN_WRAP);
    h.extend_from_slice(&w.store);
    h.extend_from_slice(&w.sender);
    h.extend_from_slice(&w.recipient);
    h.extend_from_slice(&w.epoch.to_be_bytes());
    h.extend_from_slice(&w.announcement);
    h
}

fn wrap_key(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    recipient: &[u8; 32],
    w: &ParcelWire,
) -> Zeroizing<[u8; 32]> {
    let salt = [ephemeral.as_slice(), recipient.as_slice()].concat();
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(&header(w), out.as_mut())
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 length"));
    out
}

fn sign(sender: &DeviceIdentity, wire: &ParcelWire) -> Vec<u8> {
    let body = postcard::to_stdvec(wire)
        .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}"));
    let signature = sender
        .signing_key()
        .sign(&[DOMAIN_SIGN, &body].concat())
        .to_bytes()
        .to_vec();
    postcard::to_stdvec(&Signed { body, signature })
        .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}"))
}

/// What a key parcel carries.
pub struct KeyParcel<'a> {
    /// The epoch.
    pub epoch: Epoch,
    /// Its announcement hash.
    pub announcement: [u8; 32],
    /// `DEK_e`.
    pub key: &'a Secret32,
    /// The revocations the sender knows (the newest
    /// [`REVOCATIONS_PER_PARCEL_MAX`] go in).
    pub revocations: &'a [Revocation],
    /// The relay token the revocation that started `epoch` chose, while
    /// the switch to it is pending: sealed beside the key.
    pub relay_token: Option<&'a Secret32>,
}

/// A parcel carrying `what` from `sender` to `recipient`.
pub fn seal_key(
    store: StoreId,
    sender: &DeviceIdentity,
    recipient: &Member,
    what: KeyParcel<'_>,
    rng: &mut (impl CryptoRng + ?Sized),
) -> Vec<u8> {
    let KeyParcel {
        epoch,
        announcement,
        key,
        revocations,
        relay_token,
    } = what;
    let eph = x25519_dalek::StaticSecret::random_from_rng(&mut *rng);
    let eph_pub = x25519_dalek::PublicKey::from(&eph).to_bytes();
    let shared = Zeroizing::new(
        eph.diffie_hellman(&x25519_dalek::PublicKey::from(recipient.x25519_public))
            .to_bytes(),
    );
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let mut wire = ParcelWire {
        format: FORMAT,
        store: store.0,
        sender: sender.device_id().0,
        recipient: recipient.device_id.0,
        epoch: epoch.0,
        announcement,
        ephemeral: Some(eph_pub),
        nonce,
        sealed: Vec::new(),
        revocations: revocations[revocations.len().saturating_sub(REVOCATIONS_PER_PARCEL_MAX)..]
            .to_vec(),
    };
    let kek = wrap_key(&shared, &eph_pub, &recipient.x25519_public, &wire);
    let mut buf = Zeroizing::new(Vec::with_capacity(SEALED_WITH_TOKEN_BYTES));
    buf.extend_from_slice(key.expose());
    if let Some(token) = relay_token {
        buf.extend_from_slice(token.expose());
    }
    let tag = Aes256Gcm::new((&*kek).into())
        .encrypt_inout_detached(&nonce.into(), &header(&wire), buf.as_mut_slice().into())
        .unwrap_or_else(|_| unreachable!("64 bytes is far below GCM's limit"));
    buf.extend_from_slice(&tag);
    wire.sealed = buf.to_vec();
    sign(sender, &wire)
}

/// A parcel telling `recipient` that `sender` holds `epoch`'s key.
pub fn seal_ack(
    store: StoreId,
    sender: &DeviceIdentity,
    recipient: DeviceId,
    epoch: Epoch,
    announcement: [u8; 32],
) -> Vec<u8> {
    let wire = ParcelWire {
        format: FORMAT,
        store: store.0,
        sender: sender.device_id().0,
        recipient: recipient.0,
        epoch: epoch.0,
        announcement,
        ephemeral: None,
        nonce: [0; 12],
        sealed: Vec::new(),
        revocations: Vec::new(),
    };
    sign(sender, &wire)
}

/// Opens a parcel for `me` in `store`, from one of `members`; returns the
/// sender and what it says.
pub fn open(
    store: StoreId,
    me: &DeviceIdentity,
    members: &[Member],
    bytes: &[u8],
) -> Result<(DeviceId, Parcel), ParcelError> {
    if bytes.len() > PARCEL_BYTES_MAX {
        return Err(ParcelError::Malformed);
    }
    let signed: Signed = postcard::from_bytes(bytes).map_err(|_| ParcelError::Malformed)?;
    let wire: ParcelWire =
        postcard::from_bytes(&signed.body).map_err(|_| ParcelError::Malformed)?;
    if wire.format != FORMAT || wire.revocations.len() > REVOCATIONS_PER_PARCEL_MAX {
        return Err(ParcelError::Malformed);
    }
    if wire.store != store.0 || wire.recipient != me.device_id().0 {
        return Err(ParcelError::Misaddressed);
    }
    let sender = DeviceId(wire.sender);
    let member = members
        .iter()
        .find(|m| m.device_id == sender)
        .ok_or(ParcelError::UnknownSender(sender))?;
    let key = VerifyingKey::from_bytes(&member.ed25519_public).map_err(|_| ParcelError::Forged)?;
    let signature = Signature::from_slice(&signed.signature).map_err(|_| ParcelError::Forged)?;
    key.verify_strict(&[DOMAIN_SIGN, signed.body.as_slice()].concat(), &signature)
        .map_err(|_| ParcelError::Forged)?;
    let epoch = Epoch(wire.epoch);
    let Some(eph_pub) = wire.ephemeral else {
        return Ok((
            sender,
            Parcel::Ack {
                epoch,
                announcement: wire.announcement,
            },
        ));
    };
    let with_token = match wire.sealed.len() {
        SEALED_KEY_BYTES => false,
        SEALED_WITH_TOKEN_BYTES => true,
        _ => return Err(ParcelError::Malformed),
    };
    let secret = me.x25519_secret();
    let shared = Zeroizing::new(
        x25519_dalek::StaticSecret::from(*secret.expose())
            .diffie_hellman(&x25519_dalek::PublicKey::from(eph_pub))
            .to_bytes(),
    );
    let kek = wrap_key(&shared, &eph_pub, &me.x25519_public(), &wire);
    let (ct, tag) = wire.sealed.split_at(wire.sealed.len() - 16);
    let mut buf = Zeroizing::new([0u8; 64]);
    let plain = &mut buf[..ct.len()];
    plain.copy_from_slice(ct);
    let tag: [u8; 16] = tag.try_into().map_err(|_| ParcelError::Malformed)?;
    Aes256Gcm::new((&*kek).into())
        .decrypt_inout_detached(
            &wire.nonce.into(),
            &header(&wire),
            plain.into(),
            &tag.into(),
        )
        .map_err(|_| ParcelError::Forged)?;
    let half = |at: usize| {
        let mut k = [0u8; 32];
        k.copy_from_slice(&buf[at..at + 32]);
        Secret32::from_bytes(k)
    };
    Ok((
        sender,
        Parcel::Key {
            epoch,
            announcement: wire.announcement,
            key: half(0),
            revocations: wire.revocations,
            relay_token: with_token.then(|| half(32)),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Entropy, SeededEntropy};
    use crate::hlc::Hlc;
    use crate::keyring::Keyring;

    fn setup() -> (Keyring, Keyring, crate::env::RngStream) {
        let entropy = SeededEntropy::from_u64(7);
        let mut rng = entropy.stream("t");
        let a = Keyring::create(
            DeviceIdentity::generate(&mut rng),
            "a",
            Hlc::default(),
            &mut rng,
        );
        let mut b = Keyring::create(
            DeviceIdentity::generate(&mut rng),
            "b",
            Hlc::default(),
            &mut rng,
        );
        b.store_id = a.store_id;
        (a, b, rng)
    }

    #[test]
    fn a_key_parcel_opens_for_its_recipient_only() {
        let (a, b, mut rng) = setup();
        let b_member = b.own_member().unwrap().clone();
        let a_member = a.own_member().unwrap().clone();
        let key = Secret32::from_bytes([0x42; 32]);
        let token = Secret32::from_bytes([0x24; 32]);
        let revoked = Revocation {
            device_id: DeviceId([7; 16]),
            by: a.device_id(),
            epoch: Epoch(2),
            at: Hlc { ms: 3, counter: 4 },
        };
        for relay_token in [None, Some(&token)] {
            let parcel = seal_key(
                a.store_id,
                &a.device,
                &b_member,
                KeyParcel {
                    epoch: Epoch(2),
                    announcement: [9; 32],
                    key: &key,
                    revocations: &[revoked],
                    relay_token,
                },
                &mut rng,
            );
            for secret in [[0x42; 8], [0x24; 8]] {
                assert!(
                    !parcel.windows(8).any(|w| w == secret),
                    "the key and the token are sealed"
                );
            }
            let (sender, opened) = open(
                a.store_id,
                &b.device,
                std::slice::from_ref(&a_member),
                &parcel,
            )
            .unwrap();
            assert_eq!(sender, a.device_id());
            match opened {
                Parcel::Key {
                    epoch,
                    announcement,
                    key: got,
                    revocations,
                    relay_token: got_token,
                } => {
                    assert_eq!(epoch, Epoch(2));
                    assert_eq!(announcement, [9; 32]);
                    assert!(got == key);
                    assert_eq!(revocations, [revoked]);
                    assert!(got_token.as_ref() == relay_token, "the token as sealed");
                }
                other => panic!("{other:?}"),
            }
            // Not for a: misaddressed.
            assert_eq!(
                open(
                    a.store_id,
                    &a.device,
                    std::slice::from_ref(&a_member),
                    &parcel
                )
                .unwrap_err(),
                ParcelError::Misaddressed
            );
            // From someone b does not know.
            assert_eq!(
                open(a.store_id, &b.device, &[], &parcel).unwrap_err(),
                ParcelError::UnknownSender(a.device_id())
            );
            // Every flipped byte is caught.
            for i in 0..parcel.len() {
                let mut bad = parcel.clone();
                bad[i] ^= 0x01;
                assert!(
                    open(a.store_id, &b.device, std::slice::from_ref(&a_member), &bad).is_err(),
                    "flip at {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_parcel_carries_the_newest_revocations_within_its_bound() {
        let (a, b, mut rng) = setup();
        let b_member = b.own_member().unwrap().clone();
        let a_member = a.own_member().unwrap().clone();
        let many: Vec<Revocation> = (0..REVOCATIONS_PER_PARCEL_MAX + 10)
            .map(|i| Revocation {
                device_id: DeviceId([(i % 251) as u8; 16]),
                by: a.device_id(),
                epoch: Epoch(i as u32 + 1),
                at: Hlc {
                    ms: u64::MAX,
                    counter: u16::MAX,
                },
            })
            .collect();
        let key = Secret32::from_bytes([1; 32]);
        let parcel = seal_key(
            a.store_id,
            &a.device,
            &b_member,
            KeyParcel {
                epoch: Epoch(9),
                announcement: [9; 32],
                key: &key,
                revocations: &many,
                relay_token: Some(&key),
            },
            &mut rng,
        );
        assert!(parcel.len() <= PARCEL_BYTES_MAX, "{} bytes", parcel.len());
        let (_, opened) = open(a.store_id, &b.device, &[a_member], &parcel).unwrap();
        let Parcel::Key { revocations, .. } = opened else {
            panic!("a key parcel")
        };
        assert_eq!(revocations, many[10..]);
    }

    #[test]
    fn an_ack_is_signed() {
        let (a, b, _) = setup();
        let b_member = b.own_member().unwrap().clone();
        let ack = seal_ack(a.store_id, &b.device, a.device_id(), Epoch(3), [1; 32]);
        let (sender, parcel) =
            open(a.store_id, &a.device, std::slice::from_ref(&b_member), &ack).unwrap();
        assert_eq!(sender, b.device_id());
        assert!(matches!(
            parcel,
            Parcel::Ack {
                epoch: Epoch(3),
                ..
            }
        ));
        let mut forged = ack.clone();
        let last = forged.len() - 1;
        forged[last] ^= 0x80;
        assert_eq!(
            open(a.store_id, &a.device, &[b_member], &forged).unwrap_err(),
            ParcelError::Forged
        );
    }
}
