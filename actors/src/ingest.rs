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

use std::sync::Arc;

use persist_core::env::Clock;
use ractor::rpc::CallResult;

use crate::key_manager::KeyManagerMsg;
use crate::keys::{KeyHandle, KeySet, OpenRecordError};
use crate::routes::Routes;
use crate::sealer::SealerMsg;
use crate::storage_writer::{AppliedChange, CommitReport, Park, SealedWrite, WriterMsg};

/// Called with the changes an ingest applied, for the store's watchers.
pub type OnApplied = Arc<dyn Fn(Vec<AppliedChange>) + Send + Sync>;

/// What applying a batch needs besides the batch.
#[derive(Clone)]
pub struct IngestContext {
    /// The store's keys (read at each batch).
    pub keys: KeyHandle,
    /// The KeyManager, Sealer and StorageWriter.
    pub routes: Routes,
    /// Wall clock, for the drift check.
    pub clock: Arc<dyn Clock>,
    /// Largest accepted drift of remote stamps, in ms.
    pub max_drift_ms: u64,
    /// Where applied changes are reported.
    pub on_applied: OnApplied,
}

/// What applying a batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Writes that took effect.
    pub applied: u64,
    /// Writes that lost to a version already stored.
    pub superseded: u64,
    /// Envelopes kept pending.
    pub held: u64,
    /// Envelopes refused.
    pub refused: u64,
}

/// Plans `batch` (see [`plan`]) and commits it through the StorageWriter
/// together with `meta`: remembers the members it announced (KeyManager),
/// lets the Sealer observe its newest stamp, and reports what changed.
pub async fn apply(
    ctx: &IngestContext,
    batch: Vec<Incoming>,
    meta: Vec<(&'static str, Option<Vec<u8>>)>,
) -> Result<Applied, String> {
    let keys = ctx.keys.current();
    let plan = plan_parallel(keys, batch, ctx.clock.now_ms(), ctx.max_drift_ms).await?;
    for (locator, refusal) in &plan.refused {
        tracing::warn!(%locator, %refusal, "sync: refused an envelope");
    }
    if !plan.learned.is_empty()
        && let Some(km) = ctx.routes.key_manager()
    {
        let members = plan.learned.clone();
        let added = km
            .call(|reply| KeyManagerMsg::AddMembers { members, reply }, None)
            .await
            .map_err(|e| e.to_string())?;
        if let CallResult::Success(Err(e)) = added {
            return Err(e.to_string());
        }
    }
    if let (Some(newest), Some(sealer)) = (plan.newest, ctx.routes.sealer()) {
        let _ = sealer.cast(SealerMsg::Observe(newest));
    }
    let refused = plan.refused.len() as u64;
    let held = plan.pending.len() as u64;
    let writer = ctx.routes.writer().ok_or("the store is closing")?;
    let outcome = writer
        .call(
            |reply| WriterMsg::Ingest {
                writes: plan.writes,
                parks: plan.parks,
                meta,
                reply,
            },
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    let report: CommitReport = match outcome {
        CallResult::Success(r) => r.map_err(|e| e.to_string())?,
        _ => return Err("the store is closing".into()),
    };
    let applied = Applied {
        applied: report.applied.len() as u64,
        superseded: report.superseded as u64,
        held,
        refused,
    };
    if !report.applied.is_empty() {
        (ctx.on_applied)(report.applied);
    }
    Ok(applied)
}

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
    let checked = batch.into_iter().map(|item| (item, None)).collect();
    plan_checked(keys, checked, now_ms, max_drift_ms)
}

/// Batches of at least this many envelopes have their signatures checked
/// on two workers first (on a multi-threaded runtime): Ed25519
/// verification is most of an ingest's CPU.
pub const PARALLEL_VERIFY_MIN: usize = 64;

/// Whether each item's signature verifies under its signer's key, for the
/// items whose signer `keys` knows; `None` for the others.
fn verify_known(keys: &KeySet, batch: &[Incoming]) -> Vec<Option<bool>> {
    batch
        .iter()
        .map(|item| {
            let envelope = Envelope::parse(&item.envelope).ok()?;
            if envelope.header.algorithm != Algorithm::Aes256GcmEd25519 {
                return None;
            }
            let key = keys.member_key(&envelope.header.signer)?;
            Some(
                envelope
                    .verify_signature(&keys.store_id, &item.locator, key)
                    .is_ok(),
            )
        })
        .collect()
}

/// [`plan`], with the signatures of a large batch checked on two workers.
async fn plan_parallel(
    keys: Arc<KeySet>,
    mut batch: Vec<Incoming>,
    now_ms: u64,
    max_drift_ms: u64,
) -> Result<Plan, String> {
    let parallel = batch.len() >= PARALLEL_VERIFY_MIN
        && matches!(
            tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(tokio::runtime::RuntimeFlavor::MultiThread)
        );
    if !parallel {
        return Ok(plan(&keys, batch, now_ms, max_drift_ms));
    }
    // Both halves are spawned, as in the Sealer: a task spawned from a
    // worker waits in its LIFO slot, where no idle worker steals it.
    let second = batch.split_off(batch.len() / 2);
    let (k1, k2) = (keys.clone(), keys.clone());
    let first = tokio::spawn(async move {
        let verified = verify_known(&k1, &batch);
        (batch, verified)
    });
    let second = tokio::spawn(async move {
        let verified = verify_known(&k2, &second);
        (second, verified)
    });
    let mut checked = Vec::new();
    for half in [first, second] {
        match half.await {
            Ok((items, verified)) => checked.extend(items.into_iter().zip(verified)),
            // Only a panic fails a verifying task. Nothing of the batch is
            // applied then, and the caller's cursor does not move past it.
            Err(e) => return Err(format!("checking the batch's signatures failed: {e}")),
        }
    }
    Ok(plan_checked(&keys, checked, now_ms, max_drift_ms))
}

/// [`plan`] over items whose signature may already be checked.
fn plan_checked(
    keys: &KeySet,
    batch: Vec<(Incoming, Option<bool>)>,
    now_ms: u64,
    max_drift_ms: u64,
) -> Plan {
    let mut members = keys.members.clone();
    let mut plan = Plan::default();
    let mut deferred = Vec::new();
    let mut work = batch;
    loop {
        let learned_before = plan.learned.len();
        for (item, verified) in work.drain(..) {
            match decide(keys, &members, &item, verified, now_ms, max_drift_ms) {
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
        work = deferred.drain(..).map(|(item, _)| (item, None)).collect();
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
    verified: Option<bool>,
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
    {
        let good = verified.unwrap_or_else(|| {
            envelope
                .verify_signature(&keys.store_id, &item.locator, key)
                .is_ok()
        });
        if !good {
            return refuse(Refusal::BadSignature(header.signer));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use persist_core::env::{Entropy, SeededEntropy};
    use persist_core::envelope::{self, Flags, SealContext};
    use persist_core::export::ExportedKeys;
    use persist_core::keyring::Keyring;
    use persist_core::keys::DeviceIdentity;

    const NOW: u64 = 1_000_000;
    const DRIFT: u64 = 600_000;

    struct Device {
        ring: Keyring,
    }

    impl Device {
        fn seal(&self, path: &str, value: &[u8], ms: u64) -> Incoming {
            let mut rng = SeededEntropy::from_u64(ms).stream("seal");
            let record = Record {
                path: path.into(),
                value: value.to_vec(),
                origin: self.ring.device_id(),
                hlc: Hlc { ms, counter: 0 },
            };
            let locator = self.ring.index_key.locator(&self.ring.store_id, path);
            let ctx = SealContext {
                store_id: self.ring.store_id,
                epoch: self.ring.current,
                data_key: self.ring.current_key(),
                signing_key: self.ring.device.signing_key(),
                signer: self.ring.device_id(),
            };
            let envelope =
                envelope::seal(&ctx, &locator, &record, Flags::default(), 1, &mut rng).unwrap();
            Incoming {
                locator,
                envelope,
                from_pending: false,
            }
        }

        fn announcement(&self) -> Incoming {
            let me = self.ring.own_member().unwrap().clone();
            self.seal(
                &membership::member_path(&me.device_id),
                &membership::encode_member(&me),
                NOW - 10,
            )
        }

        fn keys(&self) -> KeySet {
            KeySet::from_keyring(&self.ring)
        }
    }

    /// Device `a` creates a store; `b` joins it from an export.
    fn two_devices() -> (Device, Device) {
        let mut rng = SeededEntropy::from_u64(1).stream("t");
        let a = Keyring::create(
            DeviceIdentity::generate(&mut rng),
            "a",
            Hlc::default(),
            &mut rng,
        );
        let b = Keyring::from_export(
            DeviceIdentity::generate(&mut rng),
            ExportedKeys::from_keyring(&a),
            "b",
            Hlc::default(),
        );
        (Device { ring: a }, Device { ring: b })
    }

    #[test]
    fn an_unknown_signer_is_learned_from_its_announcement_in_any_order() {
        let (a, b) = two_devices();
        // The record comes before the announcement that makes it checkable.
        let plan = super::plan(
            &b.keys(),
            vec![a.seal("notes/1", b"hi", NOW), a.announcement()],
            NOW,
            DRIFT,
        );
        assert_eq!(plan.learned.len(), 1);
        assert_eq!(plan.learned[0].device_id, a.ring.device_id());
        assert_eq!(plan.writes.len(), 2, "{plan:?}");
        assert!(plan.pending.is_empty() && plan.refused.is_empty());
        assert_eq!(
            plan.newest,
            Some(Hlc {
                ms: NOW,
                counter: 0
            })
        );
    }

    #[test]
    fn without_an_announcement_an_unknown_signer_waits() {
        let (a, b) = two_devices();
        let plan = super::plan(&b.keys(), vec![a.seal("notes/1", b"hi", NOW)], NOW, DRIFT);
        assert!(plan.writes.is_empty());
        assert_eq!(
            plan.pending,
            vec![(
                plan.pending[0].0,
                PendingReason::UnknownSigner(a.ring.device_id())
            )]
        );
        assert!(matches!(plan.parks.as_slice(), [Park::Keep { .. }]));
    }

    #[test]
    fn tampered_bytes_are_refused_and_never_applied() {
        let (a, b) = two_devices();
        let good = a.seal("notes/1", b"hi", NOW);
        for at in [
            0,
            3,
            40,
            90,
            good.envelope.len() - 70,
            good.envelope.len() - 1,
        ] {
            let mut bad = Incoming {
                locator: good.locator,
                envelope: good.envelope.clone(),
                from_pending: false,
            };
            bad.envelope[at] ^= 0x20;
            let plan = super::plan(&b.keys(), vec![a.announcement(), bad], NOW, DRIFT);
            assert_eq!(
                plan.writes.len(),
                1,
                "only the announcement applies (byte {at})"
            );
            assert!(
                plan.parks.is_empty(),
                "a refused envelope is not kept (byte {at})"
            );
            assert_eq!(
                plan.refused.len() + plan.pending.len(),
                1,
                "byte {at}: {plan:?}"
            );
        }
        // Moved to another locator: refused too.
        let mut moved = a.seal("notes/1", b"hi", NOW);
        moved.locator = a.ring.index_key.locator(&a.ring.store_id, "notes/2");
        let plan = super::plan(&b.keys(), vec![a.announcement(), moved], NOW, DRIFT);
        assert_eq!(plan.refused.len(), 1, "{plan:?}");
        // A forged announcement (another device's key under a's id) is refused.
        let mut forged = a.ring.own_member().unwrap().clone();
        forged.ed25519_public = b.ring.own_member().unwrap().ed25519_public;
        let forged = a.seal(
            &membership::member_path(&forged.device_id),
            &membership::encode_member(&forged),
            NOW,
        );
        let plan = super::plan(&b.keys(), vec![forged], NOW, DRIFT);
        assert!(
            plan.writes.is_empty() && plan.learned.is_empty(),
            "{plan:?}"
        );
    }

    #[test]
    fn unknown_epochs_and_future_stamps_are_held() {
        let (mut a, b) = two_devices();
        let ahead = a.seal("notes/later", b"x", NOW + DRIFT + 1);
        let announcement = a.announcement();
        let mut rng = SeededEntropy::from_u64(3).stream("rot");
        a.ring.rotate(&mut rng);
        let rotated = a.seal("notes/1", b"y", NOW);
        let plan = super::plan(&b.keys(), vec![announcement, ahead, rotated], NOW, DRIFT);
        let reasons: Vec<PendingReason> = plan.pending.iter().map(|(_, r)| *r).collect();
        assert!(
            reasons.contains(&PendingReason::FromTheFuture),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&PendingReason::UnknownEpoch(a.ring.current)),
            "{reasons:?}"
        );
        assert_eq!(plan.parks.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_batch_checked_on_two_workers_plans_the_same() {
        let (a, b) = two_devices();
        let mut batch = vec![a.announcement()];
        for i in 0..PARALLEL_VERIFY_MIN * 2 {
            batch.push(a.seal(&format!("notes/{i}"), b"v", NOW - i as u64));
        }
        // A forged signature in each half.
        for at in [5, PARALLEL_VERIFY_MIN + 7] {
            let n = batch[at].envelope.len();
            batch[at].envelope[n - 1] ^= 1;
        }
        let copy = |batch: &[Incoming]| -> Vec<Incoming> {
            batch
                .iter()
                .map(|i| Incoming {
                    locator: i.locator,
                    envelope: i.envelope.clone(),
                    from_pending: false,
                })
                .collect()
        };
        // B already knows A (its announcement applied before).
        let mut known = b.keys();
        known
            .members
            .insert(a.ring.device_id(), a.ring.device.verifying_key());
        let serial = super::plan(&known, copy(&batch), NOW, DRIFT);
        let parallel = plan_parallel(Arc::new(known), copy(&batch), NOW, DRIFT)
            .await
            .expect("plans");
        let paths = |p: &Plan| p.writes.iter().map(|w| w.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&serial), paths(&parallel));
        assert_eq!(serial.refused, parallel.refused);
        assert_eq!(parallel.refused.len(), 2, "{:?}", parallel.refused);
        assert_eq!(parallel.writes.len(), batch.len() - 2);
    }

    #[test]
    fn a_pending_envelope_that_applies_is_released() {
        let (a, b) = two_devices();
        let mut held = a.seal("notes/1", b"hi", NOW);
        held.from_pending = true;
        let plan = super::plan(&b.keys(), vec![a.announcement(), held], NOW, DRIFT);
        assert_eq!(plan.writes.len(), 2);
        assert!(matches!(plan.parks.as_slice(), [Park::Release { .. }]));
    }
}
