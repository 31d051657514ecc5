//! Member announcements: how devices of a store learn each other's public
//! keys through sync.
//!
//! A receiver checks every synced envelope's signature against its signer's
//! Ed25519 key, so it must know the keys of the store's members. Each
//! device writes one record about itself, at the system path
//! [`member_path`]`(device_id)`, whose value is its [`Member`] entry. The
//! record is sealed under the store's data key like any other, so only key
//! holders can read it or write one that opens, and it syncs, rotates and
//! conflicts like any other record.
//!
//! Until pairing exists, holding the store's keys (from an export) is what
//! makes a device a member; so an announcement is accepted from an unknown
//! signer exactly when it opens under a store key, is the signer's own
//! (the path, the record's origin, the header's signer and the announced
//! key's device id all agree) and its signature verifies under the key it
//! announces. See [`check_self_announcement`].
//!
//! A revocation travels the same way: the revoking member writes a record
//! at [`revocation_path`]`(device_id)` whose value is the [`Revocation`],
//! sealed under the epoch the revocation started (which the revoked device
//! never receives). A receiver takes it from a known, unrevoked signer
//! when the record's origin is the revoker it names; see
//! [`announced_revocation`]. Devices that join later learn revocations
//! this way.
//!
//! # Invariants
//! - A [`Member`] is only ever learned with its `device_id` equal to the
//!   id derived from its Ed25519 key ([`DeviceId::from_public_key`]).

use ed25519_dalek::VerifyingKey;

use crate::ids::DeviceId;
use crate::keyring::{Member, Revocation};
use crate::record::{Record, SYSTEM_PATH_PREFIX};

/// The system path prefix of member announcements.
const MEMBER_PATH: &str = "member/";
/// The system path prefix of revocations.
const REVOCATION_PATH: &str = "revoked/";

/// The path of `device`'s revocation record.
pub fn revocation_path(device: &DeviceId) -> String {
    format!(
        "{SYSTEM_PATH_PREFIX}{REVOCATION_PATH}{}",
        hex::encode(device.0)
    )
}

/// The value of the record of `revocation`.
pub fn encode_revocation(revocation: &Revocation) -> Vec<u8> {
    // A struct of fixed arrays and integers into a Vec cannot fail.
    postcard::to_stdvec(revocation)
        .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}"))
}

/// If `record` is a revocation record, the revocation it states, checked
/// for consistency between its path, its value and its origin (the
/// revoker wrote it); `None` for other records. The caller checks that
/// the envelope's signer is a member it trusts.
pub fn announced_revocation(record: &Record) -> Option<Result<Revocation, AnnouncementError>> {
    let id_hex = record
        .path
        .strip_prefix(SYSTEM_PATH_PREFIX)?
        .strip_prefix(REVOCATION_PATH)?;
    let decoded = postcard::from_bytes::<Revocation>(&record.value)
        .map_err(|e| AnnouncementError::Malformed(e.to_string()))
        .and_then(|r| {
            if hex::encode(r.device_id.0) != id_hex {
                Err(AnnouncementError::Inconsistent(
                    "revocation path names another device than its value",
                ))
            } else if r.by != record.origin {
                Err(AnnouncementError::Inconsistent(
                    "revocation was not written by the member it names as revoker",
                ))
            } else if r.by == r.device_id {
                Err(AnnouncementError::Inconsistent("a device revoking itself"))
            } else {
                Ok(r)
            }
        });
    Some(decoded)
}

/// The path of `device`'s announcement.
pub fn member_path(device: &DeviceId) -> String {
    format!("{SYSTEM_PATH_PREFIX}{MEMBER_PATH}{}", hex::encode(device.0))
}

/// The value of an announcement of `member`.
pub fn encode_member(member: &Member) -> Vec<u8> {
    // Serializing a struct of fixed arrays, a string and integers into a
    // Vec cannot fail.
    postcard::to_stdvec(member).unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}"))
}

/// An announcement that is not a valid member entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnouncementError {
    /// The value does not decode.
    #[error("member announcement does not decode: {0}")]
    Malformed(String),
    /// The ids in path, key and record disagree.
    #[error("member announcement is inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// If `record` is a member announcement, the member it announces, checked
/// for consistency between its path and its key; `None` for other records.
pub fn announced_member(record: &Record) -> Option<Result<Member, AnnouncementError>> {
    let id_hex = record
        .path
        .strip_prefix(SYSTEM_PATH_PREFIX)?
        .strip_prefix(MEMBER_PATH)?;
    Some(decode_member(id_hex, &record.value))
}

fn decode_member(id_hex: &str, value: &[u8]) -> Result<Member, AnnouncementError> {
    let member: Member =
        postcard::from_bytes(value).map_err(|e| AnnouncementError::Malformed(e.to_string()))?;
    if hex::encode(member.device_id.0) != id_hex {
        return Err(AnnouncementError::Inconsistent(
            "path names another device than the entry",
        ));
    }
    if DeviceId::from_public_key(&member.ed25519_public) != member.device_id {
        return Err(AnnouncementError::Inconsistent(
            "device id is not derived from the announced key",
        ));
    }
    VerifyingKey::from_bytes(&member.ed25519_public)
        .map_err(|_| AnnouncementError::Inconsistent("announced key is not an Ed25519 point"))?;
    Ok(member)
}

/// For an envelope signed by `signer`, whom the receiver does not know yet:
/// the key to verify it with, if `record` (its opened content) is `signer`'s
/// own announcement. The caller must then verify the envelope's signature
/// with that key before trusting anything in it.
pub fn check_self_announcement(
    record: &Record,
    signer: DeviceId,
) -> Result<(Member, VerifyingKey), AnnouncementError> {
    let member = announced_member(record)
        .ok_or(AnnouncementError::Inconsistent("not a member announcement"))??;
    if member.device_id != signer || record.origin != signer {
        return Err(AnnouncementError::Inconsistent(
            "announcement is not the signer's own",
        ));
    }
    let key = VerifyingKey::from_bytes(&member.ed25519_public)
        .map_err(|_| AnnouncementError::Inconsistent("announced key is not an Ed25519 point"))?;
    Ok((member, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Entropy, SeededEntropy};
    use crate::hlc::Hlc;
    use crate::keyring::Keyring;
    use crate::keys::DeviceIdentity;
    use crate::record::{is_system_path, validate_path, validate_stored_path};

    fn ring(seed: u64) -> Keyring {
        let entropy = SeededEntropy::from_u64(seed);
        let mut rng = entropy.stream("t");
        Keyring::create(
            DeviceIdentity::generate(&mut rng),
            "d",
            Hlc::default(),
            &mut rng,
        )
    }

    fn announcement(member: &Member, origin: DeviceId) -> Record {
        Record {
            path: member_path(&member.device_id),
            value: encode_member(member),
            origin,
            hlc: Hlc { ms: 1, counter: 0 },
        }
    }

    #[test]
    fn revocation_records_name_their_device_and_revoker() {
        let a = ring(1).members[0].device_id;
        let b = ring(2).members[0].device_id;
        let c = ring(3).members[0].device_id;
        let revocation = Revocation {
            device_id: b,
            by: a,
            epoch: crate::Epoch(2),
            at: Hlc { ms: 5, counter: 1 },
        };
        let record = |path: String, value: Vec<u8>, origin| Record {
            path,
            value,
            origin,
            hlc: Hlc { ms: 6, counter: 0 },
        };
        let good = record(revocation_path(&b), encode_revocation(&revocation), a);
        assert!(is_system_path(&good.path) && validate_path(&good.path).is_err());
        assert_eq!(announced_revocation(&good), Some(Ok(revocation)));
        // Path naming another device.
        let moved = record(revocation_path(&c), encode_revocation(&revocation), a);
        assert!(matches!(
            announced_revocation(&moved),
            Some(Err(AnnouncementError::Inconsistent(_)))
        ));
        // Written by someone else than the revoker it names.
        let forged = record(revocation_path(&b), encode_revocation(&revocation), c);
        assert!(matches!(
            announced_revocation(&forged),
            Some(Err(AnnouncementError::Inconsistent(_)))
        ));
        // A device revoking itself.
        let own = Revocation {
            by: b,
            ..revocation
        };
        let own = record(revocation_path(&b), encode_revocation(&own), b);
        assert!(announced_revocation(&own).is_some_and(|r| r.is_err()));
        // Garbage, and records of other kinds.
        let garbage = record(revocation_path(&b), vec![0xff; 3], a);
        assert!(matches!(
            announced_revocation(&garbage),
            Some(Err(AnnouncementError::Malformed(_)))
        ));
        let note = record("notes/1".into(), encode_revocation(&revocation), a);
        assert_eq!(announced_revocation(&note), None);
        let member = record(member_path(&b), encode_revocation(&revocation), a);
        assert_eq!(announced_revocation(&member), None);
    }

    #[test]
    fn member_paths_are_system_paths_apps_cannot_write() {
        let path = member_path(&DeviceId([0xab; 16]));
        assert!(is_system_path(&path));
        assert!(validate_stored_path(&path).is_ok());
        assert!(validate_path(&path).is_err());
    }

    #[test]
    fn a_self_announcement_yields_its_key() {
        let ring = ring(1);
        let me = ring.members[0].clone();
        let record = announcement(&me, me.device_id);
        let (member, key) = check_self_announcement(&record, me.device_id).expect("valid");
        assert_eq!(member, me);
        assert_eq!(key, ring.device.verifying_key());
    }

    #[test]
    fn inconsistent_announcements_are_refused() {
        let me = ring(1).members[0].clone();
        let other = ring(2).members[0].clone();
        // Signed by someone else than the announced device.
        let record = announcement(&me, me.device_id);
        assert!(check_self_announcement(&record, other.device_id).is_err());
        // Another device's key under my id.
        let mut forged = me.clone();
        forged.ed25519_public = other.ed25519_public;
        let record = announcement(&forged, me.device_id);
        assert!(check_self_announcement(&record, me.device_id).is_err());
        // Path naming another device.
        let mut record = announcement(&me, me.device_id);
        record.path = member_path(&other.device_id);
        assert!(check_self_announcement(&record, me.device_id).is_err());
        // Garbage value.
        let mut record = announcement(&me, me.device_id);
        record.value = vec![0xff; 3];
        assert!(matches!(
            check_self_announcement(&record, me.device_id),
            Err(AnnouncementError::Malformed(_))
        ));
        // Not an announcement at all.
        let mut record = announcement(&me, me.device_id);
        record.path = "notes/1".into();
        assert!(announced_member(&record).is_none());
    }
}
