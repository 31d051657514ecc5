//! Envelope v1: what Persist stores and syncs for one record version.
//!
//! ```text
//! header (85 bytes, clear, bound as AAD and signed)
//!   0  format      u8   = 1
//!   1  algorithm   u8   1 = AES-256-GCM + HKDF-SHA256 + Ed25519, 0 = plain (encrypt(false))
//!   2  flags       u8   bit 0 tombstone, bit 1 resealed; other bits must be 0
//!   3  epoch       u32 BE
//!   7  hlc         u64 BE ms ‖ u16 BE counter     ┐ the version (origin's),
//!  17  origin      [16] device id of the writer    ┘ kept across reseals
//!  33  signer      [16] device id that sealed this copy
//!  49  signer_seq  u64 BE, the signer's sequence number
//!  57  seed        [16] per-write HKDF salt
//!  73  nonce       [12] AES-GCM nonce
//! body
//!  85  body_len    u32 BE
//!  89  body        body_len bytes: AES-256-GCM(padded record) ‖ 16-byte tag
//! tail
//!      signature   [64] Ed25519 over DOMAIN_SIG ‖ store_id ‖ locator ‖ header ‖ body_len ‖ body
//! ```
//!
//! The message key is `HKDF-SHA256(ikm = DEK_epoch, salt = seed,
//! info = "persist/rec/v1" ‖ store_id ‖ epoch)`. DESIGN.md explains why the
//! seed and nonce are fresh per write rather than derived from the path.
//!
//! The tag's associated data is `DOMAIN_AAD ‖ store_id ‖ locator ‖ header`,
//! and the signature covers every byte before it, the tag included. So
//! anyone can check who wrote an envelope, and that not one byte of it was
//! altered, without its key: a receiver before it holds the epoch key can
//! tell a member's envelope from one a relay edited, and holds only the
//! former. (An earlier layout signed the ciphertext without its tag and
//! bound the signature into the tag; a relay could then flip a tag bit and
//! hand out a signed envelope that no key opens, which a receiver without
//! the key had to hold in place of the genuine one.) A key holder's AEAD
//! check covers everything but the signature, so a local read, which skips
//! the costly Ed25519 verification, still rejects any altered header or
//! body byte; an altered signature only makes receivers refuse the copy.
//!
//! The header carries both the `origin` (whose write this is) and the
//! `signer` (who sealed this copy): after a rotation a member reseals other
//! members' records, and the version a relay orders by must stay the
//! origin's so that a reseal never wins a conflict.
//!
//! Plain envelopes (algorithm 0) have the same header with zero seed and
//! nonce, the unpadded record as body, and no signature. They exist for
//! stores opened with `encrypt(false)`.
//!
//! # Invariants
//! - [`Envelope::parse`] reads only within the buffer, checks every length
//!   against its bound before use, and rejects trailing bytes.
//! - [`open`] returns a record only if the tag verifies under the
//!   epoch's key *and* the record's path hashes to the locator it was
//!   stored under *and* its version equals the header's.
//! - A seal uses a (message key, nonce) pair once: the key is derived from
//!   a fresh 128-bit seed and the nonce is a fresh 96-bit value.
//! - Every byte of an encrypted envelope before its signature is covered by
//!   its AEAD tag and by its signature.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use ed25519_dalek::ed25519::signature::{MultipartSigner, MultipartVerifier};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use rand_core::CryptoRng;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::hlc::Hlc;
use crate::ids::{DeviceId, Epoch, Locator, StoreId};
use crate::keys::Secret32;
use crate::lww::{Precedence, Version};
use crate::record::{PATH_BYTES_MAX, Record, RecordError, VALUE_BYTES_MAX};

/// Envelope format version this build writes and reads.
pub const FORMAT_V1: u8 = 1;
/// Domain separation for envelope signatures.
pub const DOMAIN_SIG: &[u8] = b"persist/envelope-sig/v1";
/// Domain separation for envelope AEAD associated data.
pub const DOMAIN_AAD: &[u8] = b"persist/envelope-aad/v1";
/// HKDF info prefix for per-record message keys.
pub const INFO_RECORD: &[u8] = b"persist/rec/v1";

/// Header length in bytes.
pub const HEADER_LEN: usize = 85;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Ed25519 signature length.
pub const SIGNATURE_LEN: usize = 64;
/// Largest body accepted: a maximal record (path, value, version and
/// postcard overhead), padded, plus the tag.
pub const BODY_BYTES_MAX: usize = VALUE_BYTES_MAX + VALUE_BYTES_MAX / 8 + PATH_BYTES_MAX + 1024;
/// Largest envelope accepted.
pub const ENVELOPE_BYTES_MAX: usize = HEADER_LEN + 4 + BODY_BYTES_MAX + SIGNATURE_LEN;

const _: () = assert!(
    ENVELOPE_BYTES_MAX < 16 * 1024 * 1024,
    "one envelope must fit in one sync frame"
);

/// Which primitives sealed an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Algorithm {
    /// No encryption (`encrypt(false)` stores).
    Plain,
    /// AES-256-GCM under an HKDF-SHA256 per-record key, signed with Ed25519.
    Aes256GcmEd25519,
}

impl Algorithm {
    fn code(self) -> u8 {
        match self {
            Algorithm::Plain => 0,
            Algorithm::Aes256GcmEd25519 => 1,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Algorithm::Plain),
            1 => Some(Algorithm::Aes256GcmEd25519),
            _ => None,
        }
    }
}

/// Header flag bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    /// The record was deleted; its value is empty.
    pub tombstone: bool,
    /// This copy was resealed under a newer epoch by a rotation.
    pub resealed: bool,
}

impl Flags {
    const TOMBSTONE: u8 = 1;
    const RESEALED: u8 = 2;

    fn bits(self) -> u8 {
        (if self.tombstone { Self::TOMBSTONE } else { 0 })
            | (if self.resealed { Self::RESEALED } else { 0 })
    }

    fn from_bits(bits: u8) -> Option<Self> {
        if bits & !(Self::TOMBSTONE | Self::RESEALED) != 0 {
            return None;
        }
        Some(Self {
            tombstone: bits & Self::TOMBSTONE != 0,
            resealed: bits & Self::RESEALED != 0,
        })
    }
}

/// The clear header of an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Which primitives sealed it.
    pub algorithm: Algorithm,
    /// Tombstone / resealed.
    pub flags: Flags,
    /// The epoch whose data key sealed it.
    pub epoch: Epoch,
    /// The write's version (origin's HLC and device).
    pub version: Version,
    /// The device that sealed and signed this copy.
    pub signer: DeviceId,
    /// The signer's sequence number for this seal.
    pub signer_seq: u64,
    /// HKDF salt for the message key.
    pub seed: [u8; 16],
    /// AES-GCM nonce.
    pub nonce: [u8; 12],
}

impl Header {
    /// The LWW precedence of this copy.
    pub fn precedence(&self) -> Precedence {
        Precedence {
            version: self.version,
            epoch: self.epoch,
        }
    }

    /// The 85-byte encoding.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = FORMAT_V1;
        out[1] = self.algorithm.code();
        out[2] = self.flags.bits();
        out[3..7].copy_from_slice(&self.epoch.0.to_be_bytes());
        out[7..17].copy_from_slice(&self.version.hlc.to_bytes());
        out[17..33].copy_from_slice(&self.version.origin.0);
        out[33..49].copy_from_slice(&self.signer.0);
        out[49..57].copy_from_slice(&self.signer_seq.to_be_bytes());
        out[57..73].copy_from_slice(&self.seed);
        out[73..85].copy_from_slice(&self.nonce);
        out
    }

    /// Parses the 85-byte encoding.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Result<Self, ParseError> {
        if b[0] != FORMAT_V1 {
            return Err(ParseError::UnknownFormat(b[0]));
        }
        let algorithm = Algorithm::from_code(b[1]).ok_or(ParseError::UnknownAlgorithm(b[1]))?;
        let flags = Flags::from_bits(b[2]).ok_or(ParseError::UnknownFlags(b[2]))?;
        Ok(Self {
            algorithm,
            flags,
            epoch: Epoch(u32::from_be_bytes(arr(&b[3..7]))),
            version: Version {
                hlc: Hlc::from_bytes(arr(&b[7..17])),
                origin: DeviceId(arr(&b[17..33])),
            },
            signer: DeviceId(arr(&b[33..49])),
            signer_seq: u64::from_be_bytes(arr(&b[49..57])),
            seed: arr(&b[57..73]),
            nonce: arr(&b[73..85]),
        })
    }
}

/// Copies a slice whose length the caller fixed into an array.
fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    out
}

/// An envelope that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Fewer bytes than the fixed parts need.
    #[error("envelope is truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        min: usize,
    },
    /// The format byte is not one this build knows.
    #[error(
        "envelope format {0} is not supported by this build (it reads format 1): upgrade Persist"
    )]
    UnknownFormat(u8),
    /// The algorithm byte is not one this build knows.
    #[error("envelope algorithm {0} is not supported by this build")]
    UnknownAlgorithm(u8),
    /// Reserved flag bits are set.
    #[error("envelope has unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    /// The declared body length is over the bound.
    #[error("envelope body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge {
        /// Declared length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The declared lengths do not add up to the buffer's length.
    #[error("envelope length mismatch: {len} bytes present, {expected} declared")]
    LengthMismatch {
        /// Bytes present.
        len: usize,
        /// Bytes the header and body length declare.
        expected: usize,
    },
}

/// An envelope that parsed but did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The bytes are not an envelope.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The AEAD tag did not verify: the envelope was altered, or the key is wrong.
    #[error("envelope failed authentication: it was altered or sealed under another key")]
    Integrity,
    /// The signature did not verify against the signer's key.
    #[error("envelope signature does not verify for signer {signer}")]
    BadSignature {
        /// Claimed signer.
        signer: DeviceId,
    },
    /// The decrypted record belongs at another locator (an envelope was moved).
    #[error("envelope was stored under the wrong locator (moved or swapped)")]
    WrongLocator,
    /// The decrypted record's version differs from its header's.
    #[error("envelope header version does not match its sealed record")]
    VersionMismatch,
    /// The decrypted body is not a valid record.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// An encrypted envelope was offered to a plain store, or the reverse.
    #[error("envelope algorithm {found:?} does not match this store ({expected:?})")]
    WrongAlgorithm {
        /// Found in the header.
        found: Algorithm,
        /// What the store uses.
        expected: Algorithm,
    },
}

/// A record that cannot be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The value is over [`VALUE_BYTES_MAX`].
    #[error("value is {len} bytes, the limit is {max}")]
    ValueTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The path is not valid.
    #[error(transparent)]
    Path(#[from] crate::record::PathError),
}

/// A parsed envelope borrowing its bytes.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// The decoded header.
    pub header: Header,
    header_bytes: &'a [u8; HEADER_LEN],
    /// `header ‖ body_len ‖ body` (the tag included): what the signature
    /// covers after the prefix.
    signed: &'a [u8],
    body: &'a [u8],
    signature: Option<&'a [u8; SIGNATURE_LEN]>,
}

impl<'a> Envelope<'a> {
    /// Bounded parse of an envelope's bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        let min = HEADER_LEN + 4;
        if bytes.len() < min {
            return Err(ParseError::Truncated {
                len: bytes.len(),
                min,
            });
        }
        let header_bytes: &[u8; HEADER_LEN] =
            bytes[..HEADER_LEN]
                .try_into()
                .map_err(|_| ParseError::Truncated {
                    len: bytes.len(),
                    min,
                })?;
        let header = Header::from_bytes(header_bytes)?;
        let body_len = u32::from_be_bytes(arr(&bytes[HEADER_LEN..min])) as usize;
        if body_len > BODY_BYTES_MAX {
            return Err(ParseError::BodyTooLarge {
                len: body_len,
                max: BODY_BYTES_MAX,
            });
        }
        let sig_len = match header.algorithm {
            Algorithm::Plain => 0,
            Algorithm::Aes256GcmEd25519 => SIGNATURE_LEN,
        };
        let expected = min + body_len + sig_len;
        if bytes.len() != expected {
            return Err(ParseError::LengthMismatch {
                len: bytes.len(),
                expected,
            });
        }
        let signed = &bytes[..min + body_len];
        let body = &bytes[min..min + body_len];
        let signature = match header.algorithm {
            Algorithm::Plain => None,
            Algorithm::Aes256GcmEd25519 => bytes[min + body_len..].try_into().ok(),
        };
        Ok(Self {
            header,
            header_bytes,
            signed,
            body,
            signature,
        })
    }

    /// Verifies the signature against the signer's public key.
    ///
    /// The signature covers every byte before it, the AEAD tag included. A
    /// local read skips this (the tag already proves a key holder sealed
    /// it); sync ingest does it before anything else.
    pub fn verify_signature(
        &self,
        store_id: &StoreId,
        locator: &Locator,
        signer_key: &VerifyingKey,
    ) -> Result<(), OpenError> {
        let bad = OpenError::BadSignature {
            signer: self.header.signer,
        };
        let sig = self.signature.ok_or(bad.clone())?;
        let sig = Signature::from_bytes(sig);
        signer_key
            .multipart_verify(
                &[DOMAIN_SIG, store_id.as_bytes(), &locator.0, self.signed],
                &sig,
            )
            .map_err(|_| bad)
    }
}

/// What a seal needs to know about the store and the sealing device.
pub struct SealContext<'k> {
    /// The store.
    pub store_id: StoreId,
    /// The epoch of `data_key`.
    pub epoch: Epoch,
    /// `DEK_epoch`.
    pub data_key: &'k Secret32,
    /// The sealing device's signing key.
    pub signing_key: &'k SigningKey,
    /// The sealing device's id.
    pub signer: DeviceId,
}

/// Seals `record` at `locator` into an encrypted envelope.
///
/// `signer_seq` numbers this seal among the signer's; `flags` marks
/// tombstones and reseals. The record's origin and HLC become the header's
/// version.
pub fn seal(
    ctx: &SealContext<'_>,
    locator: &Locator,
    record: &Record,
    flags: Flags,
    signer_seq: u64,
    rng: &mut (impl CryptoRng + ?Sized),
) -> Result<Vec<u8>, SealError> {
    let mut seed = [0u8; 16];
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut seed);
    rng.fill_bytes(&mut nonce);
    seal_with_randomness(ctx, locator, record, flags, signer_seq, seed, nonce)
}

/// [`seal`] with its per-write randomness drawn by the caller, so that a
/// batch can draw in order and then seal in parallel.
///
/// `seed` and `nonce` must be fresh random values, never reused: reusing
/// them reuses a (key, nonce) pair, which breaks AES-GCM.
pub fn seal_with_randomness(
    ctx: &SealContext<'_>,
    locator: &Locator,
    record: &Record,
    flags: Flags,
    signer_seq: u64,
    seed: [u8; 16],
    nonce: [u8; 12],
) -> Result<Vec<u8>, SealError> {
    check_sealable(record)?;
    let header = Header {
        algorithm: Algorithm::Aes256GcmEd25519,
        flags,
        epoch: ctx.epoch,
        version: Version {
            hlc: record.hlc,
            origin: record.origin,
        },
        signer: ctx.signer,
        signer_seq,
        seed,
        nonce,
    };
    let header_bytes = header.to_bytes();
    let plain = record.encode_padded();
    let body_len = plain.len() + TAG_LEN;

    let mut out = Vec::with_capacity(HEADER_LEN + 4 + body_len + SIGNATURE_LEN);
    out.extend_from_slice(&header_bytes);
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    let body_start = out.len();
    out.extend_from_slice(&plain);

    let cipher = message_cipher(ctx.data_key, &ctx.store_id, ctx.epoch, &seed);
    let aad = aad(&ctx.store_id, locator, &header_bytes);
    let tag = cipher
        .encrypt_inout_detached(&nonce.into(), &aad, out[body_start..].as_mut().into())
        // Only inputs over ~64 GiB make AES-GCM refuse; the body is bounded far below.
        .unwrap_or_else(|_| unreachable!("body is within AES-GCM's length limit"));
    out.extend_from_slice(&tag);
    let signature = ctx
        .signing_key
        .multipart_sign(&[DOMAIN_SIG, ctx.store_id.as_bytes(), &locator.0, &out])
        .to_bytes();
    out.extend_from_slice(&signature);
    debug_assert!(
        out.len() <= ENVELOPE_BYTES_MAX,
        "sealed envelope within bound"
    );
    Ok(out)
}

/// Opens an encrypted envelope stored at `locator`, checking the tag, the
/// locator and the version. Does not check the signature (see
/// [`Envelope::verify_signature`]).
///
/// `locator_of` maps the decrypted path back to a locator (the store's
/// `K_index`), so an envelope moved to another locator is refused.
pub fn open(
    envelope: &Envelope<'_>,
    store_id: &StoreId,
    locator: &Locator,
    data_key: &Secret32,
    locator_of: impl Fn(&str) -> Locator,
) -> Result<Record, OpenError> {
    let h = &envelope.header;
    if h.algorithm != Algorithm::Aes256GcmEd25519 {
        return Err(OpenError::WrongAlgorithm {
            found: h.algorithm,
            expected: Algorithm::Aes256GcmEd25519,
        });
    }
    let ct_len = envelope
        .body
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(OpenError::Integrity)?;
    let (ct, tag) = envelope.body.split_at(ct_len);
    let mut plain = Zeroizing::new(ct.to_vec());
    let cipher = message_cipher(data_key, store_id, h.epoch, &h.seed);
    let aad = aad(store_id, locator, envelope.header_bytes);
    let tag: [u8; TAG_LEN] = arr(tag);
    cipher
        .decrypt_inout_detached(
            &h.nonce.into(),
            &aad,
            plain.as_mut_slice().into(),
            &tag.into(),
        )
        .map_err(|_| OpenError::Integrity)?;
    let record = Record::decode(&plain)?;
    check_opened(envelope, locator, record, locator_of)
}

/// Builds a plain (unencrypted, unsigned) envelope: `encrypt(false)` stores.
pub fn seal_plain(
    record: &Record,
    flags: Flags,
    signer: DeviceId,
    signer_seq: u64,
) -> Result<Vec<u8>, SealError> {
    check_sealable(record)?;
    let header = Header {
        algorithm: Algorithm::Plain,
        flags,
        epoch: Epoch(0),
        version: Version {
            hlc: record.hlc,
            origin: record.origin,
        },
        signer,
        signer_seq,
        seed: [0; 16],
        nonce: [0; 12],
    };
    let body = postcard::to_stdvec(record)
        .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}"));
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + body.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens a plain envelope.
pub fn open_plain(
    envelope: &Envelope<'_>,
    locator: &Locator,
    locator_of: impl Fn(&str) -> Locator,
) -> Result<Record, OpenError> {
    if envelope.header.algorithm != Algorithm::Plain {
        return Err(OpenError::WrongAlgorithm {
            found: envelope.header.algorithm,
            expected: Algorithm::Plain,
        });
    }
    let record: Record = postcard::from_bytes(envelope.body)
        .map_err(|e| OpenError::Record(RecordError::Malformed(e.to_string())))?;
    crate::record::validate_stored_path(&record.path).map_err(RecordError::from)?;
    check_opened(envelope, locator, record, locator_of)
}

fn check_sealable(record: &Record) -> Result<(), SealError> {
    crate::record::validate_stored_path(&record.path)?;
    if record.value.len() > VALUE_BYTES_MAX {
        return Err(SealError::ValueTooLarge {
            len: record.value.len(),
            max: VALUE_BYTES_MAX,
        });
    }
    Ok(())
}

fn check_opened(
    envelope: &Envelope<'_>,
    locator: &Locator,
    record: Record,
    locator_of: impl Fn(&str) -> Locator,
) -> Result<Record, OpenError> {
    if locator_of(&record.path) != *locator {
        return Err(OpenError::WrongLocator);
    }
    let h = &envelope.header;
    if record.hlc != h.version.hlc || record.origin != h.version.origin {
        return Err(OpenError::VersionMismatch);
    }
    if h.flags.tombstone && !record.value.is_empty() {
        return Err(OpenError::VersionMismatch);
    }
    Ok(record)
}

fn message_cipher(
    data_key: &Secret32,
    store_id: &StoreId,
    epoch: Epoch,
    seed: &[u8; 16],
) -> Aes256Gcm {
    let hk = Hkdf::<Sha256>::new(Some(seed), data_key.expose());
    let mut key = Zeroizing::new([0u8; 32]);
    hk.expand_multi_info(
        &[INFO_RECORD, store_id.as_bytes(), &epoch.0.to_be_bytes()],
        key.as_mut(),
    )
    .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 output length"));
    Aes256Gcm::new(&(*key).into())
}

fn aad(store_id: &StoreId, locator: &Locator, header: &[u8; HEADER_LEN]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(DOMAIN_AAD.len() + 16 + 32 + HEADER_LEN);
    aad.extend_from_slice(DOMAIN_AAD);
    aad.extend_from_slice(store_id.as_bytes());
    aad.extend_from_slice(&locator.0);
    aad.extend_from_slice(header);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Entropy, SeededEntropy};
    use crate::keys::{DeviceIdentity, IndexKey};
    use proptest::prelude::*;

    struct Fixture {
        store_id: StoreId,
        dek: Secret32,
        index: IndexKey,
        device: DeviceIdentity,
    }

    fn fixture(seed: u64) -> Fixture {
        let mut rng = SeededEntropy::from_u64(seed).stream("fixture");
        Fixture {
            store_id: StoreId([3; 16]),
            dek: Secret32::random(&mut rng),
            index: IndexKey::new(Secret32::random(&mut rng)),
            device: DeviceIdentity::generate(&mut rng),
        }
    }

    fn record(f: &Fixture, path: &str, value: &[u8]) -> Record {
        Record {
            path: path.into(),
            value: value.to_vec(),
            origin: f.device.device_id(),
            hlc: Hlc {
                ms: 1_700_000_000_000,
                counter: 3,
            },
        }
    }

    fn seal_with(f: &Fixture, r: &Record, seed: u64) -> (Locator, Vec<u8>) {
        let ctx = SealContext {
            store_id: f.store_id,
            epoch: Epoch(4),
            data_key: &f.dek,
            signing_key: f.device.signing_key(),
            signer: f.device.device_id(),
        };
        let loc = f.index.locator(&f.store_id, &r.path);
        let mut rng = SeededEntropy::from_u64(seed).stream("sealer");
        (
            loc,
            seal(&ctx, &loc, r, Flags::default(), 9, &mut rng).unwrap(),
        )
    }

    fn open_with(f: &Fixture, loc: &Locator, bytes: &[u8]) -> Result<Record, OpenError> {
        let env = Envelope::parse(bytes)?;
        open(&env, &f.store_id, loc, &f.dek, |p| {
            f.index.locator(&f.store_id, p)
        })
    }

    #[test]
    fn seal_open_verify() {
        let f = fixture(1);
        let r = record(&f, "users/1", b"hello");
        let (loc, bytes) = seal_with(&f, &r, 7);
        assert_eq!(open_with(&f, &loc, &bytes), Ok(r.clone()));
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.header.epoch, Epoch(4));
        assert_eq!(env.header.signer_seq, 9);
        assert_eq!(env.header.version.hlc, r.hlc);
        env.verify_signature(&f.store_id, &loc, &f.device.verifying_key())
            .unwrap();
        let other = fixture(2).device.verifying_key();
        assert!(env.verify_signature(&f.store_id, &loc, &other).is_err());
    }

    #[test]
    fn same_inputs_same_bytes_fresh_seed_fresh_bytes() {
        let f = fixture(1);
        let r = record(&f, "a", b"v");
        assert_eq!(seal_with(&f, &r, 7).1, seal_with(&f, &r, 7).1);
        let (a, b) = (seal_with(&f, &r, 7).1, seal_with(&f, &r, 8).1);
        assert_ne!(a, b);
        let (ha, hb) = (
            Envelope::parse(&a).unwrap().header,
            Envelope::parse(&b).unwrap().header,
        );
        assert_ne!(ha.nonce, hb.nonce, "each write draws a fresh nonce");
        assert_ne!(ha.seed, hb.seed, "each write draws a fresh key seed");
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let f = fixture(1);
        let r = record(&f, "p", &[0xaa; 300]);
        let (loc, bytes) = seal_with(&f, &r, 1);
        let vk = f.device.verifying_key();
        let signature_at = bytes.len() - SIGNATURE_LEN;
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            let verified = Envelope::parse(&t)
                .map_err(OpenError::from)
                .and_then(|e| e.verify_signature(&f.store_id, &loc, &vk));
            assert!(
                verified.is_err(),
                "flip at byte {i} must fail the signature"
            );
            let opened = open_with(&f, &loc, &t);
            if i < signature_at {
                assert!(
                    opened.is_err(),
                    "flip at byte {i} must fail the AEAD or the parse"
                );
            } else {
                // The tag does not cover the signature (the signature covers
                // the tag): a key holder still reads the record, and only
                // the signature check refuses the copy.
                assert_eq!(opened, Ok(r.clone()), "flip at byte {i}");
            }
        }
    }

    #[test]
    fn a_relay_cannot_make_a_signed_envelope_that_no_key_opens() {
        // Without the epoch key a receiver can only check the signature; if
        // the signature left any byte out, a relay could alter that byte
        // and have the receiver hold a copy no key opens in place of the
        // genuine one. The tag is the part an AEAD-bound layout might leave
        // out, so check it byte by byte and bit by bit.
        let f = fixture(2);
        let (loc, bytes) = seal_with(&f, &record(&f, "q", b"v"), 2);
        let vk = f.device.verifying_key();
        let tag_at = bytes.len() - SIGNATURE_LEN - TAG_LEN;
        for i in tag_at..tag_at + TAG_LEN {
            for bit in 0..8 {
                let mut t = bytes.clone();
                t[i] ^= 1 << bit;
                let env = Envelope::parse(&t).unwrap();
                assert!(
                    matches!(
                        env.verify_signature(&f.store_id, &loc, &vk),
                        Err(OpenError::BadSignature { .. })
                    ),
                    "tag byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn moved_envelope_is_refused() {
        let f = fixture(1);
        let (_, bytes) = seal_with(&f, &record(&f, "a", b"1"), 1);
        let elsewhere = f.index.locator(&f.store_id, "b");
        // The AEAD binds the locator, so the tag fails before the path check.
        assert_eq!(open_with(&f, &elsewhere, &bytes), Err(OpenError::Integrity));
    }

    #[test]
    fn wrong_key_is_an_integrity_error() {
        let f = fixture(1);
        let (loc, bytes) = seal_with(&f, &record(&f, "a", b"1"), 1);
        let env = Envelope::parse(&bytes).unwrap();
        let wrong = Secret32::from_bytes([0; 32]);
        assert_eq!(
            open(&env, &f.store_id, &loc, &wrong, |p| f
                .index
                .locator(&f.store_id, p)),
            Err(OpenError::Integrity)
        );
    }

    #[test]
    fn plain_round_trip() {
        let f = fixture(1);
        let r = record(&f, "x", b"plain");
        let loc = crate::keys::plain_locator(&f.store_id, "x");
        let bytes = seal_plain(&r, Flags::default(), f.device.device_id(), 1).unwrap();
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(
            open_plain(&env, &loc, |p| crate::keys::plain_locator(&f.store_id, p)),
            Ok(r)
        );
        assert!(matches!(
            open(&env, &f.store_id, &loc, &f.dek, |p| f
                .index
                .locator(&f.store_id, p)),
            Err(OpenError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn bounds_are_checked_before_use() {
        let f = fixture(1);
        let (_, mut bytes) = seal_with(&f, &record(&f, "a", b"1"), 1);
        bytes[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Envelope::parse(&bytes),
            Err(ParseError::BodyTooLarge { .. })
        ));
        assert!(matches!(
            Envelope::parse(&bytes[..10]),
            Err(ParseError::Truncated { .. })
        ));
        let (_, mut bytes) = seal_with(&f, &record(&f, "a", b"1"), 1);
        bytes.push(0);
        assert!(matches!(
            Envelope::parse(&bytes),
            Err(ParseError::LengthMismatch { .. })
        ));
        bytes[0] = 2;
        assert_eq!(
            Envelope::parse(&bytes).err(),
            Some(ParseError::UnknownFormat(2))
        );
    }

    #[test]
    fn oversize_values_and_bad_paths_do_not_seal() {
        let f = fixture(1);
        let ctx = SealContext {
            store_id: f.store_id,
            epoch: Epoch(1),
            data_key: &f.dek,
            signing_key: f.device.signing_key(),
            signer: f.device.device_id(),
        };
        let mut rng = SeededEntropy::from_u64(1).stream("s");
        let big = record(&f, "a", &vec![0; VALUE_BYTES_MAX + 1]);
        assert!(matches!(
            seal(&ctx, &Locator([0; 32]), &big, Flags::default(), 1, &mut rng),
            Err(SealError::ValueTooLarge { .. })
        ));
        let empty = record(&f, "", b"");
        assert!(
            seal(
                &ctx,
                &Locator([0; 32]),
                &empty,
                Flags::default(),
                1,
                &mut rng
            )
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn header_round_trip(flags in 0u8..4, epoch in any::<u32>(), ms in any::<u64>(), c in any::<u16>(),
                             origin in any::<[u8; 16]>(), signer in any::<[u8; 16]>(), seq in any::<u64>(),
                             seed in any::<[u8; 16]>(), nonce in any::<[u8; 12]>(), plain in any::<bool>()) {
            let h = Header {
                algorithm: if plain { Algorithm::Plain } else { Algorithm::Aes256GcmEd25519 },
                flags: Flags::from_bits(flags).unwrap(),
                epoch: Epoch(epoch),
                version: Version { hlc: Hlc { ms, counter: c }, origin: DeviceId(origin) },
                signer: DeviceId(signer),
                signer_seq: seq,
                seed,
                nonce,
            };
            prop_assert_eq!(Header::from_bytes(&h.to_bytes()), Ok(h));
        }

        #[test]
        fn envelope_round_trip(path in "[a-z0-9/]{1,64}", value in proptest::collection::vec(any::<u8>(), 0..2048), seed in any::<u64>()) {
            let f = fixture(5);
            let r = record(&f, &path, &value);
            let (loc, bytes) = seal_with(&f, &r, seed);
            prop_assert_eq!(open_with(&f, &loc, &bytes), Ok(r));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Envelope::parse(&bytes);
        }
    }
}
