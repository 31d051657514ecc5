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

use ed25519_dalek::{Signature, VerifyingKey};
use persist_core::envelope::{
    Algorithm, DOMAIN_SIG, Envelope, HEADER_LEN, OpenError, ParseError, SIGNATURE_LEN, TAG_LEN,
};
use persist_core::hlc::Hlc;
use persist_core::keyring::{Member, Revocation};
use persist_core::lww::{self, Precedence, Version};
use persist_core::membership::{self, AnnouncementError};
use persist_core::record::{Record, is_system_path};
use persist_core::{DeviceId, Epoch, Locator, StoreId};
use persist_storage::{Held, LocalDb, Row};

use std::sync::Arc;

use persist_core::env::Clock;
use ractor::rpc::CallResult;

use crate::blocking::run_blocking;
use crate::forget;
use crate::key_manager::KeyManagerMsg;
use crate::keys::{KeyHandle, KeySet, OpenRecordError};
use crate::rotator::RotatorMsg;
use crate::routes::Routes;
use crate::sealer::{SealerMsg, WriteOp};
use crate::storage_writer::{
    AppliedChange, CommitReport, Forget, Park, SealedWrite, WriteError, WriterMsg,
};

/// Called with the changes an ingest applied, for the store's watchers.
pub type OnApplied = Arc<dyn Fn(Vec<AppliedChange>) + Send + Sync>;

/// What applying a batch needs besides the batch.
#[derive(Clone)]
pub struct IngestContext {
    /// The store's database (read to restate what a revoked device's
    /// refused write overtook, see [`Submitted::finish`]).
    pub db: Arc<LocalDb>,
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
/// [`prepare`], [`submit`] and [`Submitted::finish`] in one.
pub async fn apply(
    ctx: &IngestContext,
    batch: Vec<Incoming>,
    meta: Vec<(&'static str, Option<Vec<u8>>)>,
) -> Result<Applied, String> {
    let prepared = prepare(ctx, batch).await?;
    submit(ctx, prepared, meta)?.finish(ctx).await
}

/// A planned batch, ready for the StorageWriter.
pub struct Prepared {
    writes: Vec<SealedWrite>,
    parks: Vec<Park>,
    overtakers: Vec<(Locator, Precedence)>,
    versions: Vec<(Locator, Version)>,
    reseal_revoked: bool,
    held: u64,
    refused: u64,
}

/// Plans `batch` and does what the plan needs before its commit: the
/// KeyManager learns the members it announced (so the next batch is
/// checked against them), the Sealer observes its newest stamp.
pub async fn prepare(ctx: &IngestContext, batch: Vec<Incoming>) -> Result<Prepared, String> {
    let keys = ctx.keys.current();
    let plan = plan_parallel(keys, batch, ctx.clock.now_ms(), ctx.max_drift_ms).await?;
    for (locator, refusal) in &plan.refused {
        tracing::warn!(%locator, %refusal, "sync: refused an envelope");
    }
    if !plan.revocations.is_empty()
        && let Some(km) = ctx.routes.key_manager()
    {
        let revocations = plan.revocations.clone();
        let learned = km
            .call(
                |reply| KeyManagerMsg::LearnRevocations { revocations, reply },
                None,
            )
            .await
            .map_err(|e| e.to_string())?;
        if let CallResult::Success(Err(e)) = learned {
            return Err(e.to_string());
        }
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
    Ok(Prepared {
        held: plan.pending.len() as u64,
        refused: plan.refused.len() as u64,
        versions: plan.versions,
        writes: plan.writes,
        parks: plan.parks,
        overtakers: plan.overtakers,
        reseal_revoked: plan.reseal_revoked,
    })
}

/// Hands a prepared batch and `meta` to the StorageWriter, which commits
/// them in one transaction, after every batch handed to it before.
pub fn submit(
    ctx: &IngestContext,
    prepared: Prepared,
    meta: Vec<(&'static str, Option<Vec<u8>>)>,
) -> Result<Submitted, String> {
    let writer = ctx.routes.writer().ok_or("the store is closing")?;
    let (reply, outcome) = ractor::concurrency::oneshot();
    writer
        .cast(WriterMsg::Ingest {
            writes: prepared.writes,
            parks: prepared.parks,
            meta,
            reply: reply.into(),
        })
        .map_err(|_| "the store is closing".to_string())?;
    Ok(Submitted {
        outcome,
        overtakers: prepared.overtakers,
        versions: prepared.versions,
        reseal_revoked: prepared.reseal_revoked,
        held: prepared.held,
        refused: prepared.refused,
    })
}

/// A batch the StorageWriter is committing.
pub struct Submitted {
    outcome: ractor::concurrency::OneshotReceiver<Result<CommitReport, WriteError>>,
    overtakers: Vec<(Locator, Precedence)>,
    /// The version of each write handed to the writer.
    versions: Vec<(Locator, Version)>,
    /// See [`Plan::reseal_revoked`].
    reseal_revoked: bool,
    held: u64,
    refused: u64,
}

impl Submitted {
    /// Waits for the commit and reports what changed to the watchers; then
    /// restates what refused writes of revoked devices overtook (see
    /// [`restate_overtaken`]).
    pub async fn finish(self, ctx: &IngestContext) -> Result<Applied, String> {
        let report = match self.outcome.await {
            Ok(r) => r.map_err(|e| e.to_string())?,
            // The writer stopped before answering: nothing was committed
            // that this batch's caller counts on.
            Err(_) => return Err("the store is closing".into()),
        };
        let applied = Applied {
            applied: report.applied.len() as u64,
            superseded: report.superseded as u64,
            held: self.held,
            refused: self.refused,
        };
        if !report.applied.is_empty() {
            (ctx.on_applied)(report.applied);
        }
        forget_disowned(ctx, &self.versions).await?;
        if self.reseal_revoked
            && applied.applied > 0
            && let Some(rotator) = ctx.routes.rotator()
        {
            // Its signer never reseals it, and this device's rotation pass
            // may have ended before it came (regression: simulation seed
            // 14 with `--revocation-races`, a device revoked just after it
            // joined, its member entry pushed after the revoker's pass).
            let _ = rotator.cast(RotatorMsg::ResealOwn);
        }
        if !self.overtakers.is_empty() {
            restate_overtaken(ctx, &self.overtakers).await?;
        }
        Ok(applied)
    }
}

/// Forgets the writes of a committed batch that a revocation learned since
/// it was planned disowns: one carried earlier in the same batch as the
/// revocation's record, or in a batch planned before the revocation was
/// known. The KeyManager's sweep, which ran when it learned, may have come
/// before their commit.
async fn forget_disowned(
    ctx: &IngestContext,
    versions: &[(Locator, Version)],
) -> Result<(), String> {
    let keys = ctx.keys.current();
    if keys.revoked.is_empty() {
        return Ok(());
    }
    let forget: Vec<Forget> = versions
        .iter()
        .filter_map(|(locator, v)| {
            let r = keys.revoked.get(&v.origin).filter(|r| r.disowns(v.hlc))?;
            Some(Forget {
                locator: *locator,
                origin: v.origin,
                after: r.at,
            })
        })
        .collect();
    if forget.is_empty() {
        return Ok(());
    }
    forget::submit(&ctx.routes, forget, Vec::new())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Writes again, stamped after the refused write, each record of this
/// device that a revoked device's refused write outranks.
///
/// A remote keeps one version per locator, the highest, and cannot tell a
/// revoked signer: such a write, pushed after the revocation, takes the
/// place of the members' version there, and a member that had not pulled
/// that version yet never gets it (and drops the refused write it may have
/// taken before it knew, see [`forget`](crate::forget)). Restating the
/// record as a new write of this device makes the members' value the
/// highest version again everywhere. A member that holds nothing at the
/// locator, or a newer version, restates nothing; each member that holds an
/// older one restates it once, and those copies settle by last-write-wins.
/// A refused write stamped further ahead than the drift allows is not
/// outranked (the clock never jumps there).
async fn restate_overtaken(
    ctx: &IngestContext,
    overtakers: &[(Locator, Precedence)],
) -> Result<(), String> {
    let keys = ctx.keys.current();
    let db = ctx.db.clone();
    let ops = run_blocking(|| {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let mut ops = Vec::new();
        for (locator, refused) in overtakers {
            let Ok(Some(row)) = txn.record(locator) else {
                continue;
            };
            let Ok(envelope) = Envelope::parse(&row.envelope) else {
                continue;
            };
            if !lww::wins(*refused, envelope.header.precedence()) {
                continue;
            }
            let Ok(record) = keys.open(locator, &row.envelope) else {
                continue;
            };
            // A member announcement or revocation record must stay its
            // author's: a copy restated under this device's name is refused.
            if keys.revoked_write(&record.origin, record.hlc) || is_system_path(&record.path) {
                continue;
            }
            ops.push(WriteOp::Restate {
                path: record.path,
                value: (!row.tombstone).then_some(record.value),
                over: envelope.header.precedence(),
            });
        }
        Ok::<_, String>(ops)
    })?;
    if ops.is_empty() {
        return Ok(());
    }
    let sealer = ctx.routes.sealer().ok_or("the store is closing")?;
    let newest = overtakers.iter().map(|(_, p)| p.version.hlc).max();
    if let Some(newest) = newest {
        sealer
            .cast(SealerMsg::Observe(newest))
            .map_err(|_| "the store is closing".to_string())?;
    }
    let count = ops.len();
    match sealer
        .call(|reply| SealerMsg::Seal { ops, reply }, None)
        .await
        .map_err(|e| e.to_string())?
    {
        CallResult::Success(Ok(_)) => {
            tracing::info!(
                count,
                "sync: wrote again records a revoked device's refused writes overtook"
            );
            Ok(())
        }
        CallResult::Success(Err(e)) => Err(e.to_string()),
        _ => Err("the store is closing".into()),
    }
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
    /// Signed by a revoked device after its revocation, or a copy of a
    /// write it made after its revocation.
    #[error("device {0} was revoked before it made or signed this write")]
    Revoked(DeviceId),
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
    /// Revocations learned from records in the batch.
    pub revocations: Vec<Revocation>,
    /// Envelopes kept pending, with why.
    pub pending: Vec<(Locator, PendingReason)>,
    /// Envelopes refused, with why.
    pub refused: Vec<(Locator, Refusal)>,
    /// The version of each write in `writes`, in order.
    pub versions: Vec<(Locator, Version)>,
    /// Refused writes of revoked devices, stamped no further ahead than
    /// the drift allows: where they outrank this device's record, it is
    /// written again after the commit (see [`Submitted::finish`]).
    pub overtakers: Vec<(Locator, Precedence)>,
    /// Whether a write signed by a revoked device (before its revocation,
    /// or it would be refused) comes sealed under an epoch other than the
    /// current one: no one reseals what a revoked device signed but the
    /// members holding it, so after the commit the Rotator reseals it
    /// here ([`crate::rotator::RotatorMsg::ResealOwn`]).
    pub reseal_revoked: bool,
    /// The newest stamp among the writes, for the Sealer to observe.
    pub newest: Option<Hlc>,
}

/// Decides what to do with `batch`; see the module docs.
pub fn plan(keys: &KeySet, batch: Vec<Incoming>, now_ms: u64, max_drift_ms: u64) -> Plan {
    let checked = batch
        .into_iter()
        .map(|item| (item, Checked::default()))
        .collect();
    plan_checked(keys, checked, now_ms, max_drift_ms)
}

/// Batches of at least this many envelopes are checked on two workers
/// first (on a multi-threaded runtime): signatures and AEAD are most of an
/// ingest's CPU.
pub const PARALLEL_VERIFY_MIN: usize = 64;

/// Most signatures checked by one batch verification. A failed batch is
/// checked again one signature at a time, so this also bounds the work a
/// forged signature adds (twice the batch); 128 keeps most of the batch
/// speed-up, which flattens out past a few dozen signatures.
pub const VERIFY_BATCH_MAX: usize = 128;

/// What was found out about an item ahead of [`plan_checked`], with the
/// same [`KeySet`] it plans with.
#[derive(Default)]
struct Checked {
    /// Whether its signature verifies under its signer's key, when `keys`
    /// knows the signer.
    verified: Option<bool>,
    /// The outcome of opening it, for an item whose signature verified.
    opened: Option<Result<Record, OpenRecordError>>,
}

/// Checks the signatures of the items whose signer `keys` knows, and opens
/// those that verify: the costly, independent part of planning, done ahead
/// so that it can run on several workers.
///
/// Signatures are checked in batches (`ed25519_dalek::verify_batch`), and a
/// batch that fails is checked again one by one with
/// [`Envelope::verify_signature`], so what verifies is decided by single
/// verification except in one case: batch verification checks the
/// cofactored equation `[8][s]B = [8]R + [8][k]A`, single verification the
/// cofactorless `[s]B = R + [k]A`. A signature whose `R` or key carries a
/// small-order (torsion) component can pass the first and fail the second.
/// Honest signers never make one, and making one takes the signer's
/// private key (the key is a known member's, and the relay holds no key),
/// so a member could at worst get an envelope accepted here that a device
/// verifying singly refuses; the AEAD tag, checked next under the epoch
/// key, still covers every byte. Batch verification draws its per-signature
/// weights from a transcript of everything it checks, not from an RNG,
/// so it is deterministic (simulations replay it).
fn precheck(keys: &KeySet, batch: &[Incoming]) -> Vec<Checked> {
    let mut checked: Vec<Checked> = batch.iter().map(|_| Checked::default()).collect();
    let mut signed: Vec<(usize, SignedParts)> = Vec::new();
    for (index, item) in batch.iter().enumerate() {
        let Ok(envelope) = Envelope::parse(&item.envelope) else {
            continue;
        };
        if envelope.header.algorithm != Algorithm::Aes256GcmEd25519 {
            continue;
        }
        let Some(key) = keys.member_key(&envelope.header.signer) else {
            continue;
        };
        match signed_parts(&keys.store_id, item, *key) {
            Some(parts) => signed.push((index, parts)),
            None => {
                checked[index].verified = Some(
                    envelope
                        .verify_signature(&keys.store_id, &item.locator, key)
                        .is_ok(),
                );
            }
        }
    }
    for chunk in signed.chunks(VERIFY_BATCH_MAX) {
        let messages: Vec<&[u8]> = chunk.iter().map(|(_, p)| p.message.as_slice()).collect();
        let signatures: Vec<Signature> = chunk.iter().map(|(_, p)| p.signature).collect();
        let signers: Vec<VerifyingKey> = chunk.iter().map(|(_, p)| p.key).collect();
        let all_good = ed25519_dalek::verify_batch(&messages, &signatures, &signers).is_ok();
        for (index, parts) in chunk {
            let good = all_good || {
                // One or more is bad: find which, as a single check would.
                let item = &batch[*index];
                Envelope::parse(&item.envelope).is_ok_and(|e| {
                    e.verify_signature(&keys.store_id, &item.locator, &parts.key)
                        .is_ok()
                })
            };
            checked[*index].verified = Some(good);
        }
    }
    for (item, check) in batch.iter().zip(checked.iter_mut()) {
        if check.verified == Some(true) {
            check.opened = Some(keys.open(&item.locator, &item.envelope));
        }
    }
    checked
}

/// What an encrypted envelope's signature covers, as
/// [`Envelope::verify_signature`] checks it (see the layout in
/// [`persist_core::envelope`]): `DOMAIN_SIG ‖ store_id ‖ locator ‖ header ‖
/// body_len ‖ body`, the tag included; the signature is the last
/// [`SIGNATURE_LEN`] bytes.
struct SignedParts {
    message: Vec<u8>,
    signature: Signature,
    key: VerifyingKey,
}

/// The [`SignedParts`] of a parsed encrypted envelope, or `None` if its
/// length does not leave room for them (then it is checked singly).
fn signed_parts(store_id: &StoreId, item: &Incoming, key: VerifyingKey) -> Option<SignedParts> {
    let bytes = item.envelope.as_slice();
    let signed_end = bytes.len().checked_sub(SIGNATURE_LEN)?;
    if signed_end < HEADER_LEN + 4 + TAG_LEN {
        return None;
    }
    let signature: [u8; SIGNATURE_LEN] = bytes[bytes.len() - SIGNATURE_LEN..].try_into().ok()?;
    let signed = &bytes[..signed_end];
    let mut message =
        Vec::with_capacity(DOMAIN_SIG.len() + store_id.as_bytes().len() + 32 + signed.len());
    message.extend_from_slice(DOMAIN_SIG);
    message.extend_from_slice(store_id.as_bytes());
    message.extend_from_slice(&item.locator.0);
    message.extend_from_slice(signed);
    Some(SignedParts {
        message,
        signature: Signature::from_bytes(&signature),
        key,
    })
}

/// [`plan`], with a large batch checked ([`precheck`]) on two workers.
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
        let checked = precheck(&keys, &batch);
        let checked = batch.into_iter().zip(checked).collect();
        return Ok(plan_checked(&keys, checked, now_ms, max_drift_ms));
    }
    // Both halves are spawned, as in the Sealer: a task spawned from a
    // worker waits in its LIFO slot, where no idle worker steals it.
    let second = batch.split_off(batch.len() / 2);
    let (k1, k2) = (keys.clone(), keys.clone());
    let first = tokio::spawn(async move {
        let checked = precheck(&k1, &batch);
        (batch, checked)
    });
    let second = tokio::spawn(async move {
        let checked = precheck(&k2, &second);
        (second, checked)
    });
    let mut checked = Vec::new();
    for half in [first, second] {
        match half.await {
            Ok((items, found)) => checked.extend(items.into_iter().zip(found)),
            // Only a panic fails a checking task. Nothing of the batch is
            // applied then, and the caller's cursor does not move past it.
            Err(e) => return Err(format!("checking the batch's signatures failed: {e}")),
        }
    }
    Ok(plan_checked(&keys, checked, now_ms, max_drift_ms))
}

/// [`plan`] over items whose signature may already be checked.
fn plan_checked(
    keys: &KeySet,
    batch: Vec<(Incoming, Checked)>,
    now_ms: u64,
    max_drift_ms: u64,
) -> Plan {
    let mut members = keys.members.clone();
    let mut revoked = keys.revoked.clone();
    let mut plan = Plan::default();
    let mut deferred = Vec::new();
    let mut work = batch;
    loop {
        let learned_before = plan.learned.len();
        for (mut item, checked) in work.drain(..) {
            // A retried pending envelope is named by its bytes, which an
            // applied one gives to its row.
            let held = item
                .from_pending
                .then(|| Held::of(&item.locator, &item.envelope));
            let known = Known {
                members: &members,
                revoked: &revoked,
            };
            match decide(keys, known, &mut item, checked, now_ms, max_drift_ms) {
                Decision::Apply {
                    record,
                    row,
                    precedence,
                    member,
                    revocation,
                } => {
                    if let Some(revocation) = revocation {
                        // Later envelopes of the batch are checked against it.
                        revoked.entry(revocation.device_id).or_insert(revocation);
                        plan.revocations.push(revocation);
                    }
                    if let Some(member) = member.map(|m| *m) {
                        if let Ok(key) = VerifyingKey::from_bytes(&member.ed25519_public) {
                            members.insert(member.device_id, key);
                        }
                        plan.learned.push(member);
                    }
                    plan.newest = plan.newest.max(Some(record.hlc));
                    if let Some(held) = held {
                        plan.parks.push(Park::Release { held });
                    }
                    plan.versions.push((item.locator, precedence.version));
                    if row.epoch != keys.current_epoch()
                        && Envelope::parse(&row.envelope)
                            .is_ok_and(|e| revoked.contains_key(&e.header.signer))
                    {
                        plan.reseal_revoked = true;
                    }
                    plan.writes.push(SealedWrite {
                        locator: item.locator,
                        path: record.path,
                        value: record.value,
                        row,
                        expect: None,
                    });
                }
                Decision::Defer {
                    reason: reason @ PendingReason::UnknownSigner(_),
                    verified,
                } => {
                    deferred.push((item, reason, verified));
                }
                Decision::Defer { reason, verified } => park(&mut plan, item, reason, verified),
                Decision::Refuse(refusal) => {
                    if let Some(held) = held {
                        plan.parks.push(Park::Release { held });
                    }
                    plan.refused.push((item.locator, refusal));
                }
                Decision::Overtaker(refusal, precedence) => {
                    if let Some(held) = held {
                        plan.parks.push(Park::Release { held });
                    }
                    let known = plan.overtakers.iter().any(|(l, _)| *l == item.locator);
                    if !known && precedence.version.hlc.ms <= now_ms.saturating_add(max_drift_ms) {
                        plan.overtakers.push((item.locator, precedence));
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
        work = deferred
            .drain(..)
            .map(|(item, _, _)| (item, Checked::default()))
            .collect();
    }
    for (item, reason, verified) in deferred {
        park(&mut plan, item, reason, verified);
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
        revocation: Option<Revocation>,
    },
    /// Held: it may apply later. `verified`: a known member's signature
    /// on it checked, or it opened under a key held here (or the store
    /// does not sign): a relay did not make it.
    Defer {
        reason: PendingReason,
        verified: bool,
    },
    Refuse(Refusal),
    /// Refused, and signed by a member: a revoked device's write, which
    /// may have taken its locator's place at the remote.
    Overtaker(Refusal, Precedence),
}

fn park(plan: &mut Plan, item: Incoming, reason: PendingReason, verified: bool) {
    tracing::debug!(locator = %item.locator, ?reason, again = item.from_pending,
        "sync: holding an envelope");
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
            verified,
        });
    }
}

/// The members and revocations known while planning a batch: those of the
/// key set, and those the batch announced before the item at hand.
#[derive(Clone, Copy)]
struct Known<'a> {
    members: &'a BTreeMap<DeviceId, VerifyingKey>,
    revoked: &'a BTreeMap<DeviceId, Revocation>,
}

/// Decides on `item`, using what [`precheck`] found with the same `keys`.
/// An item that applies gives its envelope bytes to the row it becomes.
fn decide(
    keys: &KeySet,
    known: Known<'_>,
    item: &mut Incoming,
    checked: Checked,
    now_ms: u64,
    max_drift_ms: u64,
) -> Decision {
    let envelope = match Envelope::parse(&item.envelope) {
        Ok(envelope) => envelope,
        Err(e) => return Decision::Refuse(e.into()),
    };
    let header = envelope.header;
    let precedence = header.precedence();
    let refuse = |refusal| Decision::Refuse(refusal);
    let encrypted = keys.crypto.is_some();
    match (encrypted, header.algorithm) {
        (true, Algorithm::Aes256GcmEd25519) | (false, Algorithm::Plain) => {}
        (_, found) => return refuse(Refusal::WrongAlgorithm { found }),
    }
    let members = known.members;
    let signer_key = members.get(&header.signer);
    if let Some(key) = signer_key
        && encrypted
    {
        let good = checked.verified.unwrap_or_else(|| {
            envelope
                .verify_signature(&keys.store_id, &item.locator, key)
                .is_ok()
        });
        if !good {
            return refuse(Refusal::BadSignature(header.signer));
        }
    }
    // A revoked device's refused write can take a locator's place at the
    // remote (see `restate_overtaken`); only one whose signature verified
    // under a member's key counts, or a remote could forge them at will.
    let overtaker = |refusal| Decision::Overtaker(refusal, precedence);
    // Past the check above, a known signer's signature verified; an
    // envelope that opens under a key held here is a key holder's too.
    let verified = !encrypted || signer_key.is_some();
    let defer = |reason| Decision::Defer { reason, verified };
    let defer_opened = |reason| Decision::Defer {
        reason,
        verified: true,
    };
    if known
        .revoked
        .get(&header.signer)
        .is_some_and(|r| r.refuses(header.epoch, header.version.hlc))
    {
        return match signer_key {
            Some(_) if encrypted => overtaker(Refusal::Revoked(header.signer)),
            _ => refuse(Refusal::Revoked(header.signer)),
        };
    }
    // A member's copy of a write the revoked device made after its
    // revocation (resealed, or passed on by a member that took it before
    // it knew) is refused as the write itself would be. What it wrote
    // before stays valid under any epoch: members reseal it.
    if known
        .revoked
        .get(&header.version.origin)
        .is_some_and(|r| r.disowns(header.version.hlc))
    {
        return match signer_key {
            Some(_) if encrypted => overtaker(Refusal::Revoked(header.version.origin)),
            _ => refuse(Refusal::Revoked(header.version.origin)),
        };
    }
    if encrypted && !keys.has_epoch(header.epoch) {
        return defer(PendingReason::UnknownEpoch(header.epoch));
    }
    let opened = match checked.opened {
        Some(opened) => opened,
        None => keys.open(&item.locator, &item.envelope),
    };
    let record = match opened {
        Ok(record) => record,
        Err(OpenRecordError::UnknownEpoch(epoch)) => {
            return defer(PendingReason::UnknownEpoch(epoch));
        }
        // A member that is not revoked signed every byte (checked above),
        // so no relay made this copy. If none of the epoch's keys held here
        // opens it, it is sealed under a concurrent rotation's key still on
        // its way: held, not refused. A revoked device's are refused, or it
        // could fill pending at locators of its choosing.
        Err(OpenRecordError::Envelope(OpenError::Integrity))
            if signer_key.is_some() && !known.revoked.contains_key(&header.signer) =>
        {
            return defer(PendingReason::UnknownEpoch(header.epoch));
        }
        Err(OpenRecordError::Envelope(e)) => return refuse(integrity(e)),
    };
    // Checked once opened, so that what is held for its stamp is known to
    // be a key holder's, whoever signed it.
    if header.version.hlc.ms > now_ms.saturating_add(max_drift_ms) {
        return defer_opened(PendingReason::FromTheFuture);
    }
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
            Err(_) => return defer_opened(PendingReason::UnknownSigner(header.signer)),
        }
    } else {
        match membership::announced_member(&record) {
            Some(Ok(member)) if !members.contains_key(&member.device_id) => Some(Box::new(member)),
            Some(Err(e)) => return refuse(e.into()),
            _ => None,
        }
    };
    // Only a known member's record can revoke: an unknown signer's
    // record is at most its own announcement.
    let revocation = if signer_key.is_some() {
        match membership::announced_revocation(&record) {
            Some(Ok(r)) if !known.revoked.contains_key(&r.device_id) => Some(r),
            Some(Err(e)) => return refuse(e.into()),
            _ => None,
        }
    } else {
        None
    };
    let row = Row {
        epoch: header.epoch,
        tombstone: header.flags.tombstone,
        envelope: std::mem::take(&mut item.envelope),
    };
    Decision::Apply {
        record,
        row,
        precedence,
        member,
        revocation,
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
            self.seal_from(self.ring.device_id(), path, value, ms)
        }

        /// Seals, with this device's key and signature, a write `origin`
        /// made at `ms` (a reseal, when `origin` is another device).
        fn seal_from(&self, origin: DeviceId, path: &str, value: &[u8], ms: u64) -> Incoming {
            let mut rng = SeededEntropy::from_u64(ms).stream("seal");
            let record = Record {
                path: path.into(),
                value: value.to_vec(),
                origin,
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
    fn a_revocation_refuses_what_its_device_signs_afterwards_in_the_same_batch_too() {
        let (mut a, mut b) = two_devices();
        let a_member = a.ring.own_member().unwrap().clone();
        let b_member = b.ring.own_member().unwrap().clone();
        a.ring.add_member(b_member.clone());
        b.ring.add_member(a_member);
        let mut rng = SeededEntropy::from_u64(2).stream("t");
        let at = Hlc {
            ms: NOW - 5,
            counter: u16::MAX,
        };
        let revocation = a.ring.revoke(b_member.device_id, at, &mut rng).unwrap();
        let record = a.seal(
            &membership::revocation_path(&b_member.device_id),
            &membership::encode_revocation(&revocation),
            NOW - 4,
        );
        // A third member holds the new epoch but not yet the revocation,
        // and sees B's writes from before and after it beside its record.
        let mut keys = ExportedKeys::from_keyring(&a.ring);
        keys.revocations.clear();
        let mut c = Keyring::from_export(
            DeviceIdentity::generate(&mut rng),
            keys,
            "c",
            Hlc::default(),
        );
        c.add_member(a.ring.own_member().unwrap().clone());
        c.add_member(b_member.clone());
        let c = Device { ring: c };
        let before = b.seal("notes/before", b"b, before", NOW - 10);
        let after = b.seal("notes/after", b"b, after", NOW);
        let plan = super::plan(&c.keys(), vec![before, record, after], NOW, DRIFT);
        assert_eq!(plan.revocations, [revocation]);
        assert_eq!(plan.writes.len(), 2, "the earlier write and the record");
        assert_eq!(
            plan.refused
                .iter()
                .map(|(_, r)| r.clone())
                .collect::<Vec<_>>(),
            [Refusal::Revoked(b_member.device_id)]
        );
        // Once known, the revocation is checked from the key set.
        let mut known = c;
        known.ring.learn_revocations(&[revocation]);
        let late = b.seal("notes/late", b"b, later still", NOW);
        let late_locator = late.locator;
        let plan = super::plan(&known.keys(), vec![late], NOW, DRIFT);
        assert!(plan.writes.is_empty());
        assert_eq!(plan.refused.len(), 1);
        // Refused, it is kept as an overtaker (what it outranks here is
        // written again after the commit), unless stamped beyond the drift,
        // which no local stamp may follow.
        assert_eq!(
            plan.overtakers
                .iter()
                .map(|(l, p)| (*l, p.version.origin))
                .collect::<Vec<_>>(),
            [(late_locator, b_member.device_id)]
        );
        let ahead = b.seal("notes/ahead", b"b, far ahead", NOW + DRIFT + 1);
        let plan = super::plan(&known.keys(), vec![ahead], NOW, DRIFT);
        assert_eq!(plan.refused.len(), 1);
        assert!(plan.overtakers.is_empty(), "{plan:?}");

        // A member that resealed B's writes, under its own key and
        // signature: the one from after the revocation is refused still,
        // the one from before is taken.
        let b_id = b_member.device_id;
        let laundered = a.seal_from(b_id, "notes/after", b"b, after", NOW);
        let resealed = a.seal_from(b_id, "notes/before", b"b, before", NOW - 10);
        // A device no member knows, passing off a write as B's later one:
        // refused, and not taken as an overtaker (its signature is not
        // checked, so a remote could forge any number of them).
        let stranger = Device {
            ring: Keyring::from_export(
                DeviceIdentity::generate(&mut rng),
                ExportedKeys::from_keyring(&a.ring),
                "stranger",
                Hlc::default(),
            ),
        };
        let forged = stranger.seal_from(b_id, "notes/forged", b"forged", NOW);
        let plan = super::plan(&known.keys(), vec![forged], NOW, DRIFT);
        assert!(plan.writes.is_empty(), "{plan:?}");
        assert_eq!(plan.refused.len(), 1, "{plan:?}");
        assert!(plan.overtakers.is_empty(), "{plan:?}");

        let plan = super::plan(&known.keys(), vec![laundered, resealed], NOW, DRIFT);
        assert_eq!(plan.writes.len(), 1, "{plan:?}");
        assert_eq!(
            plan.refused
                .iter()
                .map(|(_, r)| r.clone())
                .collect::<Vec<_>>(),
            [Refusal::Revoked(b_id)]
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
            // In the tag, then in the signature.
            good.envelope.len() - SIGNATURE_LEN - 5,
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
            // The signature covers every byte before it, the tag included,
            // so any altered byte is refused, and none is held in place of
            // the genuine copy.
            assert_eq!(plan.refused.len(), 1, "byte {at}: {plan:?}");
            assert!(
                plan.pending.is_empty() && plan.parks.is_empty(),
                "byte {at}"
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
        // A revoked device's envelope that no key opens is refused: held,
        // it could fill pending with junk at locators of its choosing. (It
        // signs it: both rotate to an epoch 2 of their own, and a seals
        // under its key, which b never gets.)
        let (mut a, mut b) = (a, b);
        let announcement = a.announcement();
        let mut rng = SeededEntropy::from_u64(5).stream("rot");
        a.ring.rotate(&mut rng);
        b.ring.rotate(&mut rng);
        let mut revoked = b.keys();
        let revocation = persist_core::keyring::Revocation {
            device_id: a.ring.device_id(),
            by: b.ring.device_id(),
            epoch: Epoch(9),
            at: Hlc {
                ms: NOW + DRIFT,
                counter: 0,
            },
        };
        revoked.revoked.insert(a.ring.device_id(), revocation);
        let copy = |i: &Incoming| Incoming {
            locator: i.locator,
            envelope: i.envelope.clone(),
            from_pending: i.from_pending,
        };
        let junk = a.seal("notes/junk", b"x", NOW);
        let plan = super::plan(
            &b.keys(),
            vec![copy(&announcement), copy(&junk)],
            NOW,
            DRIFT,
        );
        assert_eq!(
            plan.pending.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
            [PendingReason::UnknownEpoch(Epoch(2))],
            "a member's is held: {plan:?}"
        );
        let plan = super::plan(&revoked, vec![announcement, junk], NOW, DRIFT);
        assert_eq!(plan.refused.len(), 1, "{plan:?}");
        assert!(plan.pending.is_empty() && plan.parks.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_write_under_a_concurrent_rotations_key_waits_for_that_key() {
        let (mut a, mut b) = two_devices();
        let announcement = a.announcement();
        // Both rotate to epoch 2 on their own; A writes under its key.
        let mut rng = SeededEntropy::from_u64(4).stream("rot");
        a.ring.rotate(&mut rng);
        b.ring.rotate(&mut rng);
        let write = a.seal("notes/1", b"under a's epoch 2", NOW);
        let again = Incoming {
            locator: write.locator,
            envelope: write.envelope.clone(),
            from_pending: true,
        };
        let plan = super::plan(&b.keys(), vec![announcement, write], NOW, DRIFT);
        assert_eq!(plan.writes.len(), 1, "only the announcement: {plan:?}");
        assert!(plan.refused.is_empty(), "{plan:?}");
        let reasons: Vec<PendingReason> = plan.pending.iter().map(|(_, r)| *r).collect();
        assert_eq!(reasons, [PendingReason::UnknownEpoch(Epoch(2))]);
        // With A's key beside its own, B opens it.
        b.ring
            .merge_export(ExportedKeys::from_keyring(&a.ring))
            .unwrap();
        assert_eq!(b.ring.epochs[&Epoch(2)].keys().count(), 2);
        let mut known = b.keys();
        known
            .members
            .insert(a.ring.device_id(), a.ring.device.verifying_key());
        let plan = super::plan(&known, vec![again], NOW, DRIFT);
        assert!(
            plan.pending.is_empty() && plan.refused.is_empty(),
            "{plan:?}"
        );
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].path, "notes/1");
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
    fn honest_signatures_pass_as_one_batch_and_a_forgery_is_found_singly() {
        let (a, b) = two_devices();
        let mut known = b.keys();
        known
            .members
            .insert(a.ring.device_id(), a.ring.device.verifying_key());
        let mut batch: Vec<Incoming> = (0..VERIFY_BATCH_MAX + 3)
            .map(|i| a.seal(&format!("notes/{i}"), b"v", NOW - i as u64))
            .collect();
        // What the batch checks is exactly what a single check covers.
        let key = a.ring.device.verifying_key();
        let parts: Vec<SignedParts> = batch
            .iter()
            .map(|i| signed_parts(&known.store_id, i, key).expect("room for a signature"))
            .collect();
        let messages: Vec<&[u8]> = parts.iter().map(|p| p.message.as_slice()).collect();
        let signatures: Vec<Signature> = parts.iter().map(|p| p.signature).collect();
        let keys: Vec<VerifyingKey> = parts.iter().map(|p| p.key).collect();
        assert!(ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok());
        let checked = precheck(&known, &batch);
        assert!(checked.iter().all(|c| c.verified == Some(true)));
        assert!(checked.iter().all(|c| matches!(c.opened, Some(Ok(_)))));
        // A forged byte of the signed part fails its batch; the single
        // checks then refuse only the forgery.
        batch[VERIFY_BATCH_MAX + 1].envelope[HEADER_LEN + 10] ^= 1;
        let checked = precheck(&known, &batch);
        for (i, c) in checked.iter().enumerate() {
            assert_eq!(c.verified, Some(i != VERIFY_BATCH_MAX + 1), "item {i}");
            assert_eq!(c.opened.is_some(), i != VERIFY_BATCH_MAX + 1, "item {i}");
        }
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
