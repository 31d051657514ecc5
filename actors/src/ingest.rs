//! Sync ingest: deciding what to do with envelopes that arrive from a peer.
//!
//! [`plan`] is pure: given the store's keys, the wall clock's reading and a
//! batch of `(locator, envelope)` pairs, it returns what to apply, what to
//! keep pending and what to refuse. The PeerSession (as a client) and a
//! serving device (as a server) both hand the plan to the StorageWriter,
//! which applies the writes with last-write-wins in one commit.
//!
//! Checks, in order (DESIGN.md, "Envelope v1"): bounded parse → signer is a
//! known member and the signature verifies → the epoch key is held (else
//! pending) → the stamp is not too far in the future (else pending) →
//! decrypt, locator and version checks → LWW apply (by the writer).
//!
//! An envelope whose signer is not known yet is opened first and accepted
//! only if it is that signer's own member announcement, verified under the
//! key it announces (see [`persist_core::membership`]); the member is then
//! known for the rest of the batch. Anything else from an unknown signer is
//! kept pending until its announcement arrives.
//!
//! # Invariants
//! - Nothing is applied without a verified signature (encrypted stores) and
//!   a verified AEAD tag.
//! - Nothing that may become applicable later (unknown epoch, unknown
//!   signer, a stamp ahead of the clock) is dropped: it is kept pending.
//! - A refused envelope changes nothing; it is reported with its locator and
//!   reason, never its content.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use persist_core::envelope::{Algorithm, Envelope, OpenError, ParseError};
use persist_core::hlc::Hlc;
use persist_core::keyring::Member;
use persist_core::lww::Precedence;
use persist_core::membership::{self, AnnouncementError};
use persist_core::record::Record;
use persist_core::{DeviceId, Epoch, Locator};
use persist_storage::Row;

use crate::keys::{KeySet, OpenRecordError};
use crate::storage_writer::{Park, SealedWrite};

/// One envelope to ingest.
#[derive(Debug)]
pub struct Incoming {
    /// Where it belongs.
    pub locator: Locator,
    /// Its bytes.
    pub envelope: Vec<u8>,
    /// Whether it comes from the pending table (so that applying or
    /// refusing it releases it there).
    pub from_pending: bool,
}

/// Why an envelope is kept pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingReason {
    /// Its epoch key is not held here (yet).
    UnknownEpoch(Epoch),
    /// Its signer is not a known member (yet).
    UnknownSigner(DeviceId),
    /// Its stamp is further ahead of this device's clock than allowed.
    FromTheFuture,
}

/// Why an envelope was refused for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The bytes are not an envelope.
    #[error("malformed envelope: {0}")]
    Malformed(#[from] ParseError),
    /// The signature does not verify under the signer's key.
    #[error("bad signature from device {0}")]
    BadSignature(DeviceId),
    /// The envelope does not open under its epoch key (tampered, or moved
    /// to another locator).
    #[error("envelope failed its integrity check: {0}")]
    Integrity(String),
    /// An encrypted store received an unencrypted envelope, or the reverse.
    #[error("envelope uses {found:?}, this store uses another algorithm")]
    WrongAlgorithm {
        /// What the envelope uses.
        found: Algorithm,
    },
    /// A member announcement that contradicts itself.
    #[error(transparent)]
    Announcement(#[from] AnnouncementError),
}

/// What to do with a batch.
#[derive(Debug, Default)]
pub struct Plan {
    /// Verified, opened writes for the StorageWriter (LWW applies there).
    pub writes: Vec<SealedWrite>,
    /// Changes to the pending table.
    pub parks: Vec<Park>,
    /// Members learned from announcements in the batch.
    pub learned: Vec<Member>,
    /// Envelopes kept pending, with why.
    pub pending: Vec<(Locator, PendingReason)>,
    /// Envelopes refused, with why.
    pub refused: Vec<(Locator, Refusal)>,
    /// The newest stamp among the writes, for the Sealer to observe.
    pub newest: Option<Hlc>,
}

/// Decides what to do with `batch`; see the module docs.
pub fn plan(keys: &KeySet, batch: Vec<Incoming>, now_ms: u64, max_drift_ms: u64) -> Plan {
    let mut members = keys.members.clone();
    let mut plan = Plan::default();
    let mut deferred = Vec::new();
    let mut work = batch;
    loop {
        let learned_before = plan.learned.len();
        for item in work.drain(..) {
            match decide(keys, &members, &item, now_ms, max_drift_ms) {
                Decision::Apply {
                    record,
                    row,
                    precedence,
                    member,
                } => {
                    if let Some(member) = member.map(|m| *m) {
                        if let Ok(key) = VerifyingKey::from_bytes(&member.ed25519_public) {
                            members.insert(member.device_id, key);
                        }
                        plan.learned.push(member);
                    }
                    plan.newest = plan.newest.max(Some(record.hlc));
                    if item.from_pending {
                        plan.parks.push(Park::Release {
                            locator: item.locator,
                            precedence,
                        });
                    }
                    plan.writes.push(SealedWrite {
                        locator: item.locator,
                        path: record.path,
                        value: record.value,
                        row,
                        expect: None,
                    });
                }
                Decision::Defer(reason @ PendingReason::UnknownSigner(_)) => {
                    deferred.push((item, reason));
                }
                Decision::Defer(reason) => park(&mut plan, item, reason),
                Decision::Refuse(refusal, precedence) => {
                    if let (true, Some(precedence)) = (item.from_pending, precedence) {
                        plan.parks.push(Park::Release {
                            locator: item.locator,
                            precedence,
                        });
                    }
                    plan.refused.push((item.locator, refusal));
                }
            }
        }
        // A signer announced later in the batch is known now: retry what
        // waited for it.
        if plan.learned.len() == learned_before || deferred.is_empty() {
            break;
        }
        work = deferred.drain(..).map(|(item, _)| item).collect();
    }
    for (item, reason) in deferred {
        park(&mut plan, item, reason);
    }
    plan
}

enum Decision {
    Apply {
        record: Record,
        row: Row,
        precedence: Precedence,
        // Boxed: a member entry is large and rarely present.
        member: Option<Box<Member>>,
    },
    Defer(PendingReason),
    Refuse(Refusal, Option<Precedence>),
}

fn park(plan: &mut Plan, item: Incoming, reason: PendingReason) {
    plan.pending.push((item.locator, reason));
    if item.from_pending {
        return;
    }
    if let Ok(envelope) = Envelope::parse(&item.envelope) {
        let precedence = envelope.header.precedence();
        plan.parks.push(Park::Keep {
            locator: item.locator,
            precedence,
            envelope: item.envelope,
        });
    }
}

fn decide(
    keys: &KeySet,
    members: &BTreeMap<DeviceId, VerifyingKey>,
    item: &Incoming,
    now_ms: u64,
    max_drift_ms: u64,
) -> Decision {
    let envelope = match Envelope::parse(&item.envelope) {
        Ok(envelope) => envelope,
        Err(e) => return Decision::Refuse(e.into(), None),
    };
    let header = envelope.header;
    let precedence = header.precedence();
    let refuse = |refusal| Decision::Refuse(refusal, Some(precedence));
    let encrypted = keys.crypto.is_some();
    match (encrypted, header.algorithm) {
        (true, Algorithm::Aes256GcmEd25519) | (false, Algorithm::Plain) => {}
        (_, found) => return refuse(Refusal::WrongAlgorithm { found }),
    }
    let signer_key = members.get(&header.signer);
    if let Some(key) = signer_key
        && encrypted
        && envelope
            .verify_signature(&keys.store_id, &item.locator, key)
            .is_err()
    {
        return refuse(Refusal::BadSignature(header.signer));
    }
    if encrypted && !keys.has_epoch(header.epoch) {
        return Decision::Defer(PendingReason::UnknownEpoch(header.epoch));
    }
    if header.version.hlc.ms > now_ms.saturating_add(max_drift_ms) {
        return Decision::Defer(PendingReason::FromTheFuture);
    }
    let record = match keys.open(&item.locator, &item.envelope) {
        Ok(record) => record,
        Err(OpenRecordError::UnknownEpoch(epoch)) => {
            return Decision::Defer(PendingReason::UnknownEpoch(epoch));
        }
        Err(OpenRecordError::Envelope(e)) => return refuse(integrity(e)),
    };
    let member = if !encrypted {
        None
    } else if signer_key.is_none() {
        match membership::check_self_announcement(&record, header.signer) {
            Ok((member, key)) => {
                if envelope
                    .verify_signature(&keys.store_id, &item.locator, &key)
                    .is_err()
                {
                    return refuse(Refusal::BadSignature(header.signer));
                }
                Some(Box::new(member))
            }
            Err(_) => return Decision::Defer(PendingReason::UnknownSigner(header.signer)),
        }
    } else {
        match membership::announced_member(&record) {
            Some(Ok(member)) if !members.contains_key(&member.device_id) => Some(Box::new(member)),
            Some(Err(e)) => return refuse(e.into()),
            _ => None,
        }
    };
    let row = Row {
        epoch: header.epoch,
        tombstone: header.flags.tombstone,
        envelope: item.envelope.clone(),
    };
    Decision::Apply {
        record,
        row,
        precedence,
        member,
    }
}

fn integrity(e: OpenError) -> Refusal {
    Refusal::Integrity(e.to_string())
}
