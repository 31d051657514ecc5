//! KeyManager: the owner of the device KEK and the store keyring.
//!
//! **Role.** Holds the unsealed [`Keyring`] and the KEK that seals it. It
//! publishes the store's [`KeySet`] (data keys and index key, never the
//! KEK) through a [`KeyHandle`], and performs the key lifecycle: rotation
//! (a new epoch, current for new writes, made durable in one commit before
//! it is used), retirement of epochs the Rotator has emptied once every
//! member holds a newer key (or after a grace period), purging of retired
//! keys, exports, and the sweep that forgets what revoked devices wrote
//! after their revocation (see [`forget`](crate::forget)).
//!
//! **Messages.** [`KeyManagerMsg`]: `Opened`, `Describe`, `Rotate`,
//! `RotationDone`, `PurgeRetired`, `AddMembers`, `OwnMember`, `Members`,
//! `Export`, revocation (`Revoke`, `LearnRevocations`, `Revocations`, and
//! the switch of the relay to a new token: `RelaySwitch`,
//! `PromoteAccess`), the key parcels of rotation (`Parcels`, `TakeParcel`,
//! `Acks`, `RetireWaits`), and the
//! inviter's side of pairing: `CreateInvite`, `OpenInvites`,
//! `AnswerInvite`, `RedeemInvite`. The Noise handshake runs here, beside the
//! keys it uses, and only its session (never a key) leaves.
//!
//! **Supervisor.** The store supervisor. **On failure** it is restarted and
//! reloads the keyring from the database, where every change it made was
//! committed before it was acknowledged; a change whose commit failed is
//! rolled back the same way.

use std::sync::Arc;

use persist_core::Epoch;
use persist_core::StoreId;
use persist_core::env::{Clock, Entropy, RngStream};
use persist_core::export::{ExportedKeys, KdfParams, generate_passphrase};
use persist_core::hlc::Hlc;
use persist_core::invite::{self, Host, Invite, Joining, Opened};
use persist_core::keyring::{
    EPOCH_KEYS_MAX, EpochEntry, EpochState, Keyring, Member, NextRelayToken, Revocation,
    RevokeError,
};
use persist_core::keys::Secret32;
use persist_core::keywrap::{self, Parcel};
use persist_core::protocol::AccessKey;
use persist_core::{DeviceId, InviteId};
use persist_storage::LocalDb;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::blocking::run_blocking;
use crate::forget;
use crate::keys::{KeyHandle, KeySet};
use crate::meta;
use crate::rotator::{RotationProgress, RotatorMsg};
use crate::routes::Routes;
use crate::sealer::SealerMsg;
use crate::storage_writer::{Marks, Priority, WriteError, WriterMsg};

/// A key operation that did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The store does not encrypt, so it has no keys.
    #[error("this store was created with encrypt(false): it has no keys")]
    NotEncrypted,
    /// Epoch numbers are exhausted (after 4 billion rotations).
    #[error("no epoch numbers are left")]
    EpochsExhausted,
    /// The keyring change could not be made durable; the key manager
    /// holds the keyring as the disk has it (without the change, unless
    /// the failed commit reached the disk after all).
    #[error("the keyring change could not be stored: {0}")]
    Storage(String),
    /// The export could not be made.
    #[error("export failed: {0}")]
    Export(String),
    /// The invite cannot be made or used.
    #[error("{0}")]
    Invite(String),
    /// A key parcel was refused.
    #[error("key parcel refused: {0}")]
    Parcel(String),
    /// The device cannot be revoked; nothing changed.
    #[error(transparent)]
    Revoke(#[from] RevokeError),
}

/// A finished export.
pub struct Export {
    /// The export text.
    pub text: String,
    /// The generated passphrase, if the caller supplied none.
    pub generated_passphrase: Option<Zeroizing<String>>,
}

/// Messages to the KeyManager.
pub enum KeyManagerMsg {
    /// Every actor of the store is up (sent by the supervisor of a
    /// writable store): finish what an earlier run left undone, such as a
    /// sweep for revoked writes.
    Opened,
    /// The epochs and their states.
    Describe(RpcReplyPort<Vec<EpochSummary>>),
    /// Start a new epoch and make it current; answers with its number.
    Rotate(RpcReplyPort<Result<Epoch, KeyError>>),
    /// The Rotator finished a pass under `epoch`: retire the older rotating
    /// epochs that no record uses any more (re-checked here, after every
    /// write sealed before the check has been committed).
    RotationDone {
        /// The current epoch the Rotator's last pass resealed to.
        epoch: Epoch,
        /// The epochs retired.
        reply: RpcReplyPort<Result<Vec<Epoch>, KeyError>>,
    },
    /// Delete the keys of retired epochs; answers with the epochs purged.
    PurgeRetired(RpcReplyPort<Result<Vec<Epoch>, KeyError>>),
    /// Remember `members` (checked by the caller, see
    /// [`persist_core::membership`]); answers with how many were new.
    AddMembers {
        /// The members learned.
        members: Vec<Member>,
        /// Added count.
        reply: RpcReplyPort<Result<usize, KeyError>>,
    },
    /// Revoke member `device` at `at` (this device's clock): start a new
    /// epoch it will never receive, durably, and start resealing every
    /// record under it. Answers with the revocation, whose record the
    /// caller writes.
    Revoke {
        /// The device.
        device: DeviceId,
        /// The stamp after which what it signs is refused.
        at: Hlc,
        /// The revocation.
        reply: RpcReplyPort<Result<Revocation, KeyError>>,
    },
    /// Remember `revocations` (from records of trusted members), durably;
    /// answers with how many were new.
    LearnRevocations {
        /// The revocations learned.
        revocations: Vec<Revocation>,
        /// New count.
        reply: RpcReplyPort<Result<usize, KeyError>>,
    },
    /// The revocations this device knows.
    Revocations(RpcReplyPort<Vec<Revocation>>),
    /// This device's own member entry, which it announces to the others.
    OwnMember(RpcReplyPort<Option<Member>>),
    /// Every member this device knows, itself included.
    Members(RpcReplyPort<Vec<Member>>),
    /// Make an invite reached through `relay`, expiring at `expires_ms`,
    /// kept durably (sealed in the keyring) before it is returned.
    CreateInvite {
        /// The relay's address, for the code.
        relay: String,
        /// The relay's certificate pin, for the code.
        pin: Option<[u8; 32]>,
        /// The wall clock now (expired invites are dropped).
        now_ms: u64,
        /// When it expires.
        expires_ms: u64,
        /// The code, and what a responder needs.
        reply: RpcReplyPort<Result<(NewInvite, InviteRoute), KeyError>>,
    },
    /// The invites that have not expired, used or not, for their
    /// responders.
    OpenInvites {
        /// The wall clock now.
        now_ms: u64,
        /// The open invites.
        reply: RpcReplyPort<Vec<InviteRoute>>,
    },
    /// Answer a joiner's first handshake message for invite `id`: `None`
    /// when this device holds no such invite (it expired and was dropped).
    AnswerInvite {
        /// The invite.
        id: InviteId,
        /// The joiner's first message.
        first: Vec<u8>,
        /// The wall clock now.
        now_ms: u64,
        /// The answer.
        reply: RpcReplyPort<Result<Option<Opened>, KeyError>>,
    },
    /// A joiner completed the handshake for invite `id`: mark the invite
    /// used and the device a member, durably, then hand over the grant.
    RedeemInvite {
        /// The invite.
        id: InviteId,
        /// Who joins.
        joining: Joining,
        /// The wall clock now.
        now_ms: u64,
        /// The store's keys and members, for the grant.
        reply: RpcReplyPort<Result<Redeemed, KeyError>>,
    },
    /// Parcels carrying the live epoch keys to the members that have not
    /// acknowledged them to this device.
    Parcels(RpcReplyPort<Vec<OutParcel>>),
    /// A parcel from this device's mailbox: a key is taken into the
    /// keyring (durably) and answered with an acknowledgement for its
    /// sender; an acknowledgement is noted. `Ok(None)`: nothing to answer.
    TakeParcel {
        /// The parcel.
        bytes: Vec<u8>,
        /// The acknowledgement to send, and to whom.
        reply: RpcReplyPort<Result<Taken, KeyError>>,
    },
    /// Which members acknowledged which epochs to this device.
    Acks(RpcReplyPort<BTreeMap<Epoch, BTreeSet<DeviceId>>>),
    /// What the retirement of each rotating epoch waits for.
    RetireWaits(RpcReplyPort<BTreeMap<Epoch, RetireWait>>),
    /// Where the switch of the relay to a revocation's new token stands:
    /// `None` when none is pending.
    RelaySwitch(RpcReplyPort<Option<RelaySwitch>>),
    /// The relay took the pending token whose credential is `access` (this
    /// device switched it, or found it switched): make it the current
    /// token, durably. Answers whether anything changed.
    PromoteAccess {
        /// The credential the relay took.
        access: AccessKey,
        /// Whether the keyring changed.
        reply: RpcReplyPort<Result<bool, KeyError>>,
    },
    /// Export the store's keys.
    Export {
        /// The passphrase to wrap under; `None` generates one.
        passphrase: Option<Zeroizing<String>>,
        /// Argon2id costs.
        params: KdfParams,
        /// `true` for an unwrapped export (the engine's `dangerous()` door).
        raw: bool,
        /// The export.
        reply: RpcReplyPort<Result<Export, KeyError>>,
    },
}

/// An invite just made.
pub struct NewInvite {
    /// The code to give the joining device.
    pub code: Zeroizing<String>,
    /// The invite.
    pub id: InviteId,
    /// When it expires.
    pub expires_ms: u64,
}

/// What an invite's responder needs to reach its mailboxes: no secret.
#[derive(Clone, Debug)]
pub struct InviteRoute {
    /// The invite.
    pub id: InviteId,
    /// The credential for its relay store.
    pub access: AccessKey,
    /// When it expires.
    pub expires_ms: u64,
    /// Whether a device joined with it already (its responder then only
    /// refuses, inside the handshake, until it expires).
    pub used: bool,
}

/// What a redeemed invite grants.
pub struct Redeemed {
    /// The store's keys.
    pub keys: ExportedKeys,
    /// The members, the new one included.
    pub members: Vec<Member>,
}

/// A pending switch of the relay to a new token (see
/// [`persist_core::keyring::NextRelayToken`]).
#[derive(Clone, Debug)]
pub struct RelaySwitch {
    /// The epoch of the revocation that chose the token.
    pub epoch: Epoch,
    /// Whether this device made that revocation: only the revoker switches
    /// the relay.
    pub by_this_device: bool,
    /// When the revocation was made (the revoker's clock, ms).
    pub since_ms: u64,
    /// The members (other than this device and the revoked) that have not
    /// acknowledged the epoch's key to this device since the store opened.
    pub waiting_for: Vec<DeviceId>,
    /// The credential the relay holds now.
    pub from: AccessKey,
    /// The credential to switch it to.
    pub to: AccessKey,
}

/// One epoch as [`KeyManagerMsg::Describe`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochSummary {
    /// The epoch.
    pub epoch: Epoch,
    /// Its state.
    pub state: EpochState,
    /// The announcement of the key new writes use when it is current.
    pub announcement: [u8; 32],
    /// Keys of it held, purged or not: more than one after concurrent
    /// rotations.
    pub keys: usize,
}

/// A key parcel for a member's mailbox.
#[derive(Debug)]
pub struct OutParcel {
    /// The member.
    pub to: DeviceId,
    /// The epoch whose key it carries.
    pub epoch: Epoch,
    /// That key's announcement (an epoch has several after concurrent
    /// rotations).
    pub announcement: [u8; 32],
    /// The sealed parcel.
    pub bytes: Vec<u8>,
}

/// What taking a parcel did.
#[derive(Debug, Default)]
pub struct Taken {
    /// An epoch key new to this device, now in its keyring.
    pub new_epoch: Option<Epoch>,
    /// The acknowledgement to send back: `(recipient, parcel)`.
    pub answer: Option<(DeviceId, Vec<u8>)>,
}

/// What KeyManager starts from.
#[derive(Clone)]
pub struct KeyManagerArgs {
    /// The database holding the sealed keyring.
    pub db: Arc<LocalDb>,
    /// The store.
    pub store_id: StoreId,
    /// The device KEK, or `None` for a store that does not encrypt.
    pub kek: Option<Arc<Secret32>>,
    /// Where the current key set is published.
    pub keys: KeyHandle,
    /// Where the writer and the Rotator are.
    pub routes: Routes,
    /// Randomness for new keys and seals.
    pub entropy: Arc<dyn Entropy>,
    /// Rotation progress: marked active as soon as a rotation is durable,
    /// so that a waiter never sees the state from before it.
    pub progress: Arc<watch::Sender<RotationProgress>>,
    /// The wall clock: when an epoch became current, for the grace period.
    pub clock: Arc<dyn Clock>,
    /// How long an old epoch waits for every member to acknowledge a newer
    /// one before it retires anyway, in ms (see [`RetireWait`]).
    pub retire_grace_ms: u64,
}

/// What a rotating epoch's retirement waits for besides its records being
/// resealed: members that may still write under it. It retires once each of them
/// has acknowledged a newer epoch's key, or at `due_ms` (the grace period
/// after the next epoch became current on this device) without them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetireWait {
    /// The members that have acknowledged no newer epoch yet.
    pub waiting_for: Vec<DeviceId>,
    /// When the grace period ends (wall clock, ms), if known.
    pub due_ms: Option<u64>,
}

/// The KeyManager actor.
pub struct KeyManager;

/// KeyManager's state.
pub struct KeyManagerState {
    args: KeyManagerArgs,
    keyring: Option<Keyring>,
    rng: RngStream,
    /// Epoch acknowledgements received, by epoch; kept in the database
    /// ([`meta::EPOCH_ACKS`]), since the relay forgets them once taken.
    acks: BTreeMap<Epoch, BTreeSet<DeviceId>>,
    /// Acknowledgements of the keys of concurrent rotations beside an
    /// epoch's own, kept only in memory: they only stop those parcels
    /// from going out again, and after a restart they go out once more.
    concurrent_acks: BTreeSet<(Epoch, [u8; 32], DeviceId)>,
    /// When each epoch became current on this device (wall clock, ms);
    /// kept in the database ([`meta::EPOCH_SINCE`]) with the keyring.
    since: BTreeMap<Epoch, u64>,
    /// How many of the keyring's revocations the database has been swept
    /// for (see [`forget`](crate::forget)).
    swept: u64,
}

impl Actor for KeyManager {
    type Msg = KeyManagerMsg;
    type State = KeyManagerState;
    type Arguments = KeyManagerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: KeyManagerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let keyring = load_keyring(&args)?;
        if let Some(ring) = &keyring {
            args.keys.set(KeySet::from_keyring(ring));
        }
        let acks = load_acks(&args)?;
        let mut since = load_since(&args)?;
        // A current epoch with no start on record (its record was damaged,
        // or it came before there was one) starts its grace period now.
        if let Some(ring) = &keyring {
            since
                .entry(ring.current)
                .or_insert_with(|| args.clock.now_ms());
        }
        let rng = args.entropy.stream("key-manager");
        let swept = forget::swept(&args.db)?;
        Ok(KeyManagerState {
            args,
            keyring,
            rng,
            acks,
            concurrent_acks: BTreeSet::new(),
            since,
            swept,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Replies go to callers that may have given up waiting; a closed
        // reply port is not an error here.
        match msg {
            KeyManagerMsg::Opened => state.forget_revoked().await,
            KeyManagerMsg::Describe(reply) => {
                let epochs = state
                    .keyring
                    .as_ref()
                    .map(|r| {
                        r.epochs
                            .iter()
                            .map(|(e, entry)| EpochSummary {
                                epoch: *e,
                                state: entry.state,
                                announcement: entry.announcement,
                                keys: 1 + entry.concurrent.len(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = reply.send(epochs);
            }
            KeyManagerMsg::Rotate(reply) => {
                let outcome = state.rotate().await;
                if let Ok(epoch) = outcome {
                    state.started_rotation(epoch);
                }
                let _ = reply.send(outcome);
            }
            KeyManagerMsg::RotationDone { epoch, reply } => {
                let outcome = state.retire(epoch).await;
                let _ = reply.send(outcome);
            }
            KeyManagerMsg::PurgeRetired(reply) => {
                let outcome = state.purge().await;
                let _ = reply.send(outcome);
            }
            KeyManagerMsg::AddMembers { members, reply } => {
                let _ = reply.send(state.add_members(members).await);
            }
            KeyManagerMsg::Revoke { device, at, reply } => {
                let outcome = state
                    .change(|ring, rng| Ok(ring.revoke(device, at, rng)?))
                    .await;
                if let Ok(revocation) = &outcome {
                    tracing::info!(device = %revocation.device_id, epoch = ?revocation.epoch,
                        "revoked a device; resealing every record under a new epoch");
                    state.started_rotation(revocation.epoch);
                }
                let _ = reply.send(outcome);
            }
            KeyManagerMsg::LearnRevocations { revocations, reply } => {
                let _ = reply.send(state.learn_revocations(&revocations).await);
            }
            KeyManagerMsg::Revocations(reply) => {
                let known = state
                    .keyring
                    .as_ref()
                    .map(|r| r.revoked.clone())
                    .unwrap_or_default();
                let _ = reply.send(known);
            }
            KeyManagerMsg::OwnMember(reply) => {
                let own = state.keyring.as_ref().and_then(|r| r.own_member().cloned());
                let _ = reply.send(own);
            }
            KeyManagerMsg::Members(reply) => {
                let members = state
                    .keyring
                    .as_ref()
                    .map(|r| r.members.clone())
                    .unwrap_or_default();
                let _ = reply.send(members);
            }
            KeyManagerMsg::CreateInvite {
                relay,
                pin,
                now_ms,
                expires_ms,
                reply,
            } => {
                let _ = reply.send(state.create_invite(&relay, pin, now_ms, expires_ms).await);
            }
            KeyManagerMsg::OpenInvites { now_ms, reply } => {
                let open = state
                    .keyring
                    .as_ref()
                    .map(|r| {
                        r.invites
                            .iter()
                            .filter(|i| i.expires_ms > now_ms)
                            .map(route)
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = reply.send(open);
            }
            KeyManagerMsg::AnswerInvite {
                id,
                first,
                now_ms,
                reply,
            } => {
                let _ = reply.send(state.answer_invite(id, &first, now_ms));
            }
            KeyManagerMsg::RedeemInvite {
                id,
                joining,
                now_ms,
                reply,
            } => {
                let _ = reply.send(state.redeem_invite(id, joining, now_ms).await);
            }
            KeyManagerMsg::Parcels(reply) => {
                // Asked once per key courier round: also when a grace
                // period may have ended.
                state.retire_if_due().await;
                let _ = reply.send(state.parcels());
            }
            KeyManagerMsg::TakeParcel { bytes, reply } => {
                let _ = reply.send(state.take_parcel(&bytes).await);
            }
            KeyManagerMsg::Acks(reply) => {
                let _ = reply.send(state.acks.clone());
            }
            KeyManagerMsg::RetireWaits(reply) => {
                let _ = reply.send(state.retire_waits());
            }
            KeyManagerMsg::RelaySwitch(reply) => {
                let _ = reply.send(state.relay_switch());
            }
            KeyManagerMsg::PromoteAccess { access, reply } => {
                let promoted = match &state.keyring {
                    Some(ring) if ring.relay_token_next.is_some() => {
                        state
                            .change(|ring, _| Ok(ring.promote_relay_token(&access)))
                            .await
                    }
                    _ => Ok(false),
                };
                if let Ok(true) = promoted {
                    tracing::info!("the relay now takes this store's new access token");
                }
                let _ = reply.send(promoted);
            }
            KeyManagerMsg::Export {
                passphrase,
                params,
                raw,
                reply,
            } => {
                let _ = reply.send(state.export(passphrase, params, raw));
            }
        }
        Ok(())
    }
}

impl KeyManagerState {
    async fn rotate(&mut self) -> Result<Epoch, KeyError> {
        self.change(|ring, rng| ring.rotate(rng).ok_or(KeyError::EpochsExhausted))
            .await
    }

    /// Retires the rotating epochs older than `finished` that hold no record.
    async fn retire(&mut self, finished: Epoch) -> Result<Vec<Epoch>, KeyError> {
        let rotating = self
            .keyring
            .as_ref()
            .is_some_and(|r| r.epochs.values().any(|e| e.state == EpochState::Rotating));
        if !rotating {
            return Ok(Vec::new());
        }
        // Every write sealed under an old key before now reaches the
        // database before the counts are read: the Sealer forwards what it
        // holds, and an empty foreground commit queues behind it.
        if let Some(sealer) = self.args.routes.sealer() {
            sealer
                .call(SealerMsg::Barrier, None)
                .await
                .map_err(|e| KeyError::Storage(e.to_string()))?;
        }
        commit_meta(&self.args.routes, Vec::new())
            .await
            .map_err(|e| KeyError::Storage(e.to_string()))?;
        let counts = self.epoch_counts()?;
        let waits = self.retire_waits();
        let now = self.args.clock.now_ms();
        let unused = |e: Epoch| {
            e < finished
                && counts.get(&e).copied().unwrap_or(0) == 0
                && waits
                    .get(&e)
                    .is_none_or(|w| w.waiting_for.is_empty() || w.due_ms.is_some_and(|d| now >= d))
        };
        let any = self.keyring.as_ref().is_some_and(|r| {
            r.epochs
                .iter()
                .any(|(n, e)| e.state == EpochState::Rotating && unused(*n))
        });
        if !any {
            return Ok(Vec::new());
        }
        self.change(|ring, _| Ok(ring.retire(unused))).await
    }

    /// Adds the members not known yet, in one durable keyring change.
    async fn add_members(&mut self, members: Vec<Member>) -> Result<usize, KeyError> {
        let known = |m: &Member| {
            self.keyring
                .as_ref()
                .is_some_and(|r| r.members.iter().any(|k| k.device_id == m.device_id))
        };
        let new: Vec<Member> = members.into_iter().filter(|m| !known(m)).collect();
        if new.is_empty() {
            return Ok(0);
        }
        self.change(|ring, _| {
            Ok(new
                .into_iter()
                .filter(|m| ring.add_member(m.clone()))
                .count())
        })
        .await
    }

    /// Records the revocations not known yet, in one durable change.
    async fn learn_revocations(&mut self, learned: &[Revocation]) -> Result<usize, KeyError> {
        let Some(ring) = self.keyring.as_ref() else {
            return Ok(0);
        };
        let new: Vec<Revocation> = learned
            .iter()
            .filter(|r| ring.revocation(&r.device_id).is_none())
            .copied()
            .collect();
        if new.is_empty() {
            return Ok(0);
        }
        let added = self
            .change(|ring, _| Ok(ring.learn_revocations(&new)))
            .await?;
        for r in &added {
            tracing::info!(device = %r.device_id, by = %r.by, "learned that a device was revoked");
        }
        Ok(added.len())
    }

    async fn create_invite(
        &mut self,
        relay: &str,
        pin: Option<[u8; 32]>,
        now_ms: u64,
        expires_ms: u64,
    ) -> Result<(NewInvite, InviteRoute), KeyError> {
        let ring = self.keyring.as_ref().ok_or(KeyError::NotEncrypted)?;
        let (invite, open) = Invite::create(ring, relay, pin, expires_ms, &mut self.rng)
            .map_err(|e| KeyError::Invite(e.to_string()))?;
        let route = route(&open);
        self.change(|ring, _| {
            if ring.add_invite(open, now_ms) {
                Ok(())
            } else {
                Err(KeyError::Invite(format!(
                    "this device already has {} open invites; let some expire or be used first",
                    invite::OPEN_INVITES_MAX
                )))
            }
        })
        .await?;
        Ok((
            NewInvite {
                code: invite.encode(),
                id: invite.id,
                expires_ms,
            },
            route,
        ))
    }

    fn answer_invite(
        &mut self,
        id: InviteId,
        first: &[u8],
        now_ms: u64,
    ) -> Result<Option<Opened>, KeyError> {
        let ring = self.keyring.as_ref().ok_or(KeyError::NotEncrypted)?;
        let Some(open) = ring.invites.iter().find(|i| i.id == id) else {
            return Ok(None);
        };
        let rng = self.args.entropy.stream("pairing");
        Host::answer(open, ring.store_id, &ring.device, first, now_ms, rng)
            .map(Some)
            .map_err(|e| KeyError::Invite(e.to_string()))
    }

    async fn redeem_invite(
        &mut self,
        id: InviteId,
        joining: Joining,
        now_ms: u64,
    ) -> Result<Redeemed, KeyError> {
        // Every check comes before the first change: `change` commits only
        // what `f` returns Ok from.
        self.change(|ring, _| {
            let me = ring.device_id();
            let known = ring
                .members
                .iter()
                .any(|m| m.device_id == joining.device_id);
            if !known && ring.members.len() >= persist_core::keyring::MEMBERS_MAX {
                return Err(KeyError::Invite(format!(
                    "the store already has {} members",
                    persist_core::keyring::MEMBERS_MAX
                )));
            }
            let invite = ring
                .invites
                .iter_mut()
                .find(|i| i.id == id)
                .ok_or_else(|| KeyError::Invite("the invite is no longer open".into()))?;
            if invite.used_by.is_some() {
                return Err(KeyError::Invite("the invite was already used".into()));
            }
            if now_ms >= invite.expires_ms {
                return Err(KeyError::Invite("the invite has expired".into()));
            }
            invite.used_by = Some(joining.device_id);
            ring.add_member(Member {
                device_id: joining.device_id,
                ed25519_public: joining.ed25519_public,
                x25519_public: joining.x25519_public,
                name: joining.name.clone(),
                added_by: me,
                added_at: Hlc {
                    ms: now_ms,
                    counter: 0,
                },
            });
            Ok(Redeemed {
                keys: ExportedKeys::from_keyring(ring),
                members: ring.members.clone(),
            })
        })
        .await
    }

    fn parcels(&mut self) -> Vec<OutParcel> {
        let Some(ring) = self.keyring.as_ref() else {
            return Vec::new();
        };
        // Acknowledgements of keys no longer sent out are forgotten.
        self.concurrent_acks.retain(|(e, a, _)| {
            ring.epochs.get(e).is_some_and(|entry| {
                matches!(entry.state, EpochState::Current | EpochState::Rotating)
                    && entry.holds(a)
                    && entry.announcement != *a
            })
        });
        let me = ring.device_id();
        let mut out = Vec::new();
        for (epoch, entry) in &ring.epochs {
            let live = matches!(entry.state, EpochState::Current | EpochState::Rotating);
            if !live {
                continue;
            }
            let acked = self.acks.get(epoch);
            // A revoked device gets no key, not even of the epochs it held:
            // it has those already, and nothing is sealed under them for
            // long once the reseal runs.
            let recipients = ring
                .members
                .iter()
                .filter(|m| m.device_id != me && ring.revocation(&m.device_id).is_none());
            for member in recipients {
                // Each key goes out until the member acknowledges it: the
                // epoch's own, and those of concurrent rotations.
                let own_acked = acked.is_some_and(|a| a.contains(&member.device_id));
                for (announcement, key) in entry.keys() {
                    let is_acked = if *announcement == entry.announcement {
                        own_acked
                    } else {
                        self.concurrent_acks
                            .contains(&(*epoch, *announcement, member.device_id))
                    };
                    if is_acked {
                        continue;
                    }
                    let bytes = keywrap::seal_key(
                        ring.store_id,
                        &ring.device,
                        member,
                        keywrap::KeyParcel {
                            epoch: *epoch,
                            announcement: *announcement,
                            key,
                            revocations: &ring.revoked,
                            relay_token: ring
                                .relay_token_next
                                .as_ref()
                                .filter(|next| next.epoch == *epoch)
                                .map(|next| &next.token),
                        },
                        &mut self.rng,
                    );
                    out.push(OutParcel {
                        to: member.device_id,
                        epoch: *epoch,
                        announcement: *announcement,
                        bytes,
                    });
                }
            }
        }
        out
    }

    async fn take_parcel(&mut self, bytes: &[u8]) -> Result<Taken, KeyError> {
        let ring = self.keyring.as_ref().ok_or(KeyError::NotEncrypted)?;
        // Parcels from a revoked device are refused as from a stranger.
        let trusted: Vec<Member> = ring
            .members
            .iter()
            .filter(|m| ring.revocation(&m.device_id).is_none())
            .cloned()
            .collect();
        let (sender, parcel) = keywrap::open(ring.store_id, &ring.device, &trusted, bytes)
            .map_err(|e| KeyError::Parcel(e.to_string()))?;
        match parcel {
            Parcel::Ack {
                epoch,
                announcement,
            } => {
                let entry = ring.epochs.get(&epoch);
                if entry.is_some_and(|e| e.announcement == announcement) {
                    if self.acks.entry(epoch).or_default().insert(sender) {
                        self.save_acks().await;
                        self.retire_if_due().await;
                    }
                } else if entry.is_some_and(|e| e.holds(&announcement)) {
                    self.concurrent_acks.insert((epoch, announcement, sender));
                }
                Ok(Taken::default())
            }
            Parcel::Key {
                epoch,
                announcement,
                key,
                revocations,
                relay_token,
            } => {
                // The revocations first, durably: once the key is here the
                // courier may pass it on, and never to a revoked device.
                self.learn_revocations(&revocations).await?;
                let ring = self.keyring.as_ref().ok_or(KeyError::NotEncrypted)?;
                if ring.revocation(&ring.device_id()).is_some() {
                    tracing::warn!(%sender, "this device was revoked; refused an epoch key");
                    return Ok(Taken::default());
                }
                let store = ring.store_id;
                let known = ring
                    .epochs
                    .get(&epoch)
                    .is_some_and(|e| e.holds(&announcement));
                let new_epoch = if known {
                    None
                } else {
                    let ring = self.keyring.as_ref().ok_or(KeyError::NotEncrypted)?;
                    let keys = ExportedKeys {
                        store_id: store,
                        index_key: ring.index_key.secret().duplicate(),
                        relay_token: ring.relay_token.duplicate(),
                        relay_token_next: None,
                        current: epoch,
                        epochs: vec![(
                            epoch,
                            EpochEntry::new(EpochState::Current, Some(key), announcement),
                        )],
                        // Learned from the parcel above.
                        revocations: Vec::new(),
                    };
                    let merge = self
                        .change(|ring, _| {
                            ring.merge_export(keys)
                                .map_err(|e| KeyError::Parcel(e.to_string()))
                        })
                        .await?;
                    if merge.refused.contains(&epoch) {
                        // Acknowledged all the same, or it comes again.
                        tracing::warn!(?epoch, %sender, max = EPOCH_KEYS_MAX,
                            "a member sent another key of an epoch this device purged, or that \
                             holds all the keys it may; not kept");
                    }
                    if merge.concurrent.contains(&epoch) {
                        self.took_concurrent(epoch, merge.superseded.contains(&epoch))
                            .await;
                        tracing::info!(?epoch, %sender,
                            "received the key of a concurrent rotation to an epoch this device holds; both are kept");
                    } else {
                        tracing::info!(?epoch, %sender, "received an epoch key from a member");
                    }
                    // A newer current epoch: what this device signed under
                    // the older ones (written before the key came, perhaps
                    // where the rotating member could not see it) is
                    // resealed here; the rotating member reseals the rest.
                    if merge.added.contains(&epoch)
                        && self.keyring.as_ref().is_some_and(|r| r.current == epoch)
                    {
                        self.args.progress.send_modify(|p| {
                            p.active = true;
                            p.epoch = epoch;
                        });
                        if let Some(rotator) = self.args.routes.rotator() {
                            let _ = rotator.cast(RotatorMsg::ResealOwn);
                        }
                    }
                    Some(epoch)
                };
                // The relay token travels with the revocation's key: taken
                // only with the key the epoch now seals under (a revocation's
                // outranks a concurrent plain rotation's), never with one
                // kept beside it.
                let own = self
                    .keyring
                    .as_ref()
                    .and_then(|r| r.epochs.get(&epoch))
                    .is_some_and(|e| e.announcement == announcement);
                if own && let Some(token) = relay_token {
                    self.learn_relay_token(epoch, token).await?;
                }
                let ring = self.keyring.as_ref().ok_or(KeyError::NotEncrypted)?;
                let ack = keywrap::seal_ack(store, &ring.device, sender, epoch, announcement);
                Ok(Taken {
                    new_epoch,
                    answer: Some((sender, ack)),
                })
            }
        }
    }

    /// After a key of a concurrent rotation to `epoch` was kept beside this
    /// device's: if it `superseded` this device's own (its announcement is
    /// higher, so every member now seals under it), the members'
    /// acknowledgements of the old one no longer count.
    async fn took_concurrent(&mut self, epoch: Epoch, superseded: bool) {
        if superseded && self.acks.remove(&epoch).is_some() {
            self.save_acks().await;
        }
    }

    /// Reports rotation to `epoch` under way and sets the Rotator going.
    fn started_rotation(&self, epoch: Epoch) {
        self.args.progress.send_modify(|p| {
            p.active = true;
            p.epoch = epoch;
        });
        if let Some(rotator) = self.args.routes.rotator() {
            let _ = rotator.cast(RotatorMsg::Start);
        }
    }

    /// Keeps the relay token a member sent with `epoch`'s key, durably,
    /// unless this device holds it or a later one already.
    async fn learn_relay_token(&mut self, epoch: Epoch, token: Secret32) -> Result<(), KeyError> {
        let next = NextRelayToken { epoch, token };
        let Some(ring) = self.keyring.as_ref() else {
            return Ok(());
        };
        let known = next.token == ring.relay_token
            || ring
                .relay_token_next
                .as_ref()
                .is_some_and(|held| held.epoch >= epoch);
        if known {
            return Ok(());
        }
        if self
            .change(|ring, _| Ok(ring.learn_relay_token(next)))
            .await?
        {
            tracing::info!(
                ?epoch,
                "received the relay token a revocation chose; the relay switches to it soon"
            );
        }
        Ok(())
    }

    fn relay_switch(&self) -> Option<RelaySwitch> {
        let ring = self.keyring.as_ref()?;
        let next = ring.relay_token_next.as_ref()?;
        let me = ring.device_id();
        let revocation = ring.revoked.iter().find(|r| r.epoch == next.epoch);
        let acked = self.acks.get(&next.epoch);
        let waiting_for = ring
            .members
            .iter()
            .map(|m| m.device_id)
            .filter(|d| *d != me && ring.revocation(d).is_none())
            .filter(|d| acked.is_none_or(|a| !a.contains(d)))
            .collect();
        Some(RelaySwitch {
            epoch: next.epoch,
            by_this_device: revocation.is_some_and(|r| r.by == me),
            since_ms: revocation.map_or(0, |r| r.at.ms),
            waiting_for,
            from: AccessKey::derive(&ring.relay_token, &ring.store_id),
            to: AccessKey::derive(&next.token, &ring.store_id),
        })
    }

    /// What each rotating epoch's retirement waits for (see
    /// [`RetireWait`]); an epoch with nothing to wait for is left out.
    ///
    /// A member that holds no newer epoch may still write under an old
    /// one, and a key once purged is gone: so an old epoch retires only
    /// once every other member (not revoked) has acknowledged a newer
    /// epoch's key, or after the grace period.
    fn retire_waits(&self) -> BTreeMap<Epoch, RetireWait> {
        let Some(ring) = self.keyring.as_ref() else {
            return BTreeMap::new();
        };
        let me = ring.device_id();
        let mut out = BTreeMap::new();
        for (epoch, entry) in &ring.epochs {
            if entry.state != EpochState::Rotating {
                continue;
            }
            let waiting_for: Vec<DeviceId> = ring
                .members
                .iter()
                .map(|m| m.device_id)
                .filter(|d| *d != me && ring.revocation(d).is_none())
                .filter(|d| {
                    !self
                        .acks
                        .range(Epoch(epoch.0.saturating_add(1))..)
                        .any(|(_, by)| by.contains(d))
                })
                .collect();
            if waiting_for.is_empty() {
                continue;
            }
            // From when the first newer epoch this device holds became
            // current here (a newer epoch can arrive before the next one).
            let due_ms = self
                .since
                .range(Epoch(epoch.0.saturating_add(1))..)
                .map(|(_, ms)| *ms)
                .min()
                .map(|s| s.saturating_add(self.args.retire_grace_ms));
            out.insert(
                *epoch,
                RetireWait {
                    waiting_for,
                    due_ms,
                },
            );
        }
        out
    }

    /// Retires what an acknowledgement or the end of a grace period let
    /// retire: rotating epochs that hold no record and whose wait is over,
    /// while no rotation pass runs (a pass asks for retirement itself when
    /// it ends, and records under an old epoch wait for the next pass).
    async fn retire_if_due(&mut self) {
        if self.args.progress.borrow().active {
            return;
        }
        let Some(ring) = self.keyring.as_ref() else {
            return;
        };
        let current = ring.current;
        let rotating: Vec<Epoch> = ring
            .epochs
            .iter()
            .filter(|(e, entry)| entry.state == EpochState::Rotating && **e < current)
            .map(|(e, _)| *e)
            .collect();
        if rotating.is_empty() {
            return;
        }
        let counts = match self.epoch_counts() {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the epochs' record counts");
                return;
            }
        };
        let waits = self.retire_waits();
        let now = self.args.clock.now_ms();
        let due = rotating.iter().any(|e| {
            counts.get(e).copied().unwrap_or(0) == 0
                && waits
                    .get(e)
                    .is_none_or(|w| w.due_ms.is_some_and(|d| now >= d))
        });
        if !due {
            return;
        }
        match self.retire(current).await {
            Ok(retired) if !retired.is_empty() => {
                tracing::info!(?retired, "retired epochs every member has moved past");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not retire old epochs; retrying later"),
        }
    }

    /// Keeps the acknowledgements durably, for the epochs that still have
    /// a key and the devices still members. A failure costs only time: the
    /// member acknowledges again after the key courier posts the key again.
    async fn save_acks(&mut self) {
        if let Some(ring) = &self.keyring {
            self.acks
                .retain(|e, _| ring.epochs.get(e).is_some_and(|entry| entry.key.is_some()));
            for devices in self.acks.values_mut() {
                devices.retain(|d| ring.members.iter().any(|m| m.device_id == *d));
            }
        }
        let bytes = encode_acks(&self.acks);
        if let Err(e) = commit_meta(&self.args.routes, vec![(meta::EPOCH_ACKS, Some(bytes))]).await
        {
            tracing::warn!(error = %e, "could not keep a key acknowledgement; the member \
                acknowledges again when the key is posted again");
        }
    }

    /// Purges retired epochs, re-checking that none holds a record.
    async fn purge(&mut self) -> Result<Vec<Epoch>, KeyError> {
        let counts = self.epoch_counts()?;
        let unused = |e: Epoch| counts.get(&e).copied().unwrap_or(0) == 0;
        self.change(|ring, _| Ok(ring.purge_retired(unused))).await
    }

    fn epoch_counts(&self) -> Result<std::collections::BTreeMap<Epoch, u64>, KeyError> {
        self.args
            .db
            .begin_read()
            .and_then(|t| t.epoch_counts())
            .map_err(|e| KeyError::Storage(e.to_string()))
    }

    /// Applies `f` to the keyring, commits the sealed result, then publishes
    /// the new key set. If the commit fails the keyring is reloaded from
    /// the database, undoing `f`.
    async fn change<T>(
        &mut self,
        f: impl FnOnce(&mut Keyring, &mut RngStream) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let (Some(ring), Some(kek)) = (self.keyring.as_mut(), self.args.kek.as_ref()) else {
            return Err(KeyError::NotEncrypted);
        };
        let current_before = ring.current;
        let out = f(ring, &mut self.rng)?;
        let sealed = ring.seal(kek, &mut self.rng);
        let mut meta = vec![(meta::KEYRING, Some(sealed))];
        if ring.current != current_before {
            self.since.insert(ring.current, self.args.clock.now_ms());
            self.since
                .retain(|e, _| ring.epochs.get(e).is_some_and(|entry| entry.key.is_some()));
            meta.push((meta::EPOCH_SINCE, Some(encode_since(&self.since))));
        }
        if let Err(e) = commit_meta(&self.args.routes, meta).await {
            self.keyring =
                load_keyring(&self.args).map_err(|e| KeyError::Storage(e.to_string()))?;
            return Err(KeyError::Storage(e.to_string()));
        }
        self.args.keys.set(KeySet::from_keyring(ring));
        self.forget_revoked().await;
        Ok(out)
    }

    /// Removes what revoked devices wrote after their revocation, if the
    /// keyring knows revocations the database has not been swept for. A
    /// failure is logged: reads hide such writes anyway, and the next open
    /// sweeps again.
    async fn forget_revoked(&mut self) {
        let Some(ring) = self.keyring.as_ref() else {
            return;
        };
        let known = ring.revoked.len() as u64;
        if known <= self.swept {
            return;
        }
        let revoked = ring.revoked.clone();
        match forget::forget_revoked_writes(&self.args.db, &self.args.routes, &revoked).await {
            Ok(forgotten) => {
                self.swept = known;
                if forgotten > 0 {
                    tracing::info!(
                        forgotten,
                        "forgot writes that revoked devices made after their revocation"
                    );
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "could not forget what revoked devices wrote after their revocation; \
                 reads hide it, and the store sweeps again when it next opens"
            ),
        }
    }

    fn export(
        &mut self,
        passphrase: Option<Zeroizing<String>>,
        params: KdfParams,
        raw: bool,
    ) -> Result<Export, KeyError> {
        let ring = self.keyring.as_ref().ok_or(KeyError::NotEncrypted)?;
        let keys = ExportedKeys::from_keyring(ring);
        if raw {
            return Ok(Export {
                text: keys.raw().to_string(),
                generated_passphrase: None,
            });
        }
        let (pass, generated) = match passphrase {
            Some(p) => (p, false),
            None => (generate_passphrase(&mut self.rng), true),
        };
        let rng = &mut self.rng;
        // Argon2id at its default costs takes a noticeable fraction of a
        // second; keep it off the async workers.
        let text = run_blocking(|| keys.wrap(&pass, params, rng))
            .map_err(|e| KeyError::Export(e.to_string()))?;
        Ok(Export {
            text,
            generated_passphrase: generated.then_some(pass),
        })
    }
}

fn route(open: &persist_core::invite::OpenInvite) -> InviteRoute {
    InviteRoute {
        id: open.id,
        access: invite::relay_access(open.id, &open.secret),
        expires_ms: open.expires_ms,
        used: open.used_by.is_some(),
    }
}

/// The acknowledgements kept by [`KeyManagerState::save_acks`]. Damaged
/// ones are dropped with a warning: members acknowledge again when the key
/// courier posts the key again.
fn load_acks(
    args: &KeyManagerArgs,
) -> Result<BTreeMap<Epoch, BTreeSet<DeviceId>>, ActorProcessingErr> {
    let Some(bytes) = args.db.begin_read()?.meta(meta::EPOCH_ACKS)? else {
        return Ok(BTreeMap::new());
    };
    Ok(decode_acks(&bytes).unwrap_or_else(|| {
        tracing::warn!("dropped this device's record of key acknowledgements: it is damaged");
        BTreeMap::new()
    }))
}

/// When each epoch became current here, kept by [`KeyManagerState::change`].
/// A damaged record is dropped: an epoch without one waits for every
/// member's acknowledgement, with no grace period.
fn load_since(args: &KeyManagerArgs) -> Result<BTreeMap<Epoch, u64>, ActorProcessingErr> {
    let Some(bytes) = args.db.begin_read()?.meta(meta::EPOCH_SINCE)? else {
        return Ok(BTreeMap::new());
    };
    Ok(decode_since(&bytes).unwrap_or_else(|| {
        tracing::warn!("dropped this device's record of when its epochs began: it is damaged");
        BTreeMap::new()
    }))
}

/// One epoch's start on disk: epoch (u32 BE), then ms (u64 BE).
const SINCE_BYTES: usize = 4 + 8;

fn encode_since(since: &BTreeMap<Epoch, u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(since.len() * SINCE_BYTES);
    for (epoch, ms) in since {
        out.extend_from_slice(&epoch.0.to_be_bytes());
        out.extend_from_slice(&ms.to_be_bytes());
    }
    out
}

fn decode_since(bytes: &[u8]) -> Option<BTreeMap<Epoch, u64>> {
    if !bytes.len().is_multiple_of(SINCE_BYTES) {
        return None;
    }
    let mut since = BTreeMap::new();
    for pair in bytes.chunks_exact(SINCE_BYTES) {
        let (epoch, ms) = pair.split_at(4);
        since.insert(
            Epoch(u32::from_be_bytes(epoch.try_into().ok()?)),
            u64::from_be_bytes(ms.try_into().ok()?),
        );
    }
    Some(since)
}

/// One acknowledgement on disk: epoch (u32 BE), then the device id.
const ACK_BYTES: usize = 4 + 16;

fn encode_acks(acks: &BTreeMap<Epoch, BTreeSet<DeviceId>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (epoch, devices) in acks {
        for device in devices {
            out.extend_from_slice(&epoch.0.to_be_bytes());
            out.extend_from_slice(&device.0);
        }
    }
    out
}

fn decode_acks(bytes: &[u8]) -> Option<BTreeMap<Epoch, BTreeSet<DeviceId>>> {
    if !bytes.len().is_multiple_of(ACK_BYTES) {
        return None;
    }
    let mut acks: BTreeMap<Epoch, BTreeSet<DeviceId>> = BTreeMap::new();
    for pair in bytes.chunks_exact(ACK_BYTES) {
        let (epoch, device) = pair.split_at(4);
        let epoch = Epoch(u32::from_be_bytes(epoch.try_into().ok()?));
        acks.entry(epoch)
            .or_default()
            .insert(DeviceId(device.try_into().ok()?));
    }
    Some(acks)
}

fn load_keyring(args: &KeyManagerArgs) -> Result<Option<Keyring>, ActorProcessingErr> {
    let Some(kek) = &args.kek else {
        return Ok(None);
    };
    let txn = args.db.begin_read()?;
    let sealed = txn
        .meta(meta::KEYRING)?
        .ok_or("the store's keyring is missing")?;
    Ok(Some(Keyring::open(&sealed, &args.store_id, kek)?))
}

/// Commits meta entries through the StorageWriter, as a foreground write.
pub(crate) async fn commit_meta(
    routes: &Routes,
    meta: Vec<(&'static str, Option<Vec<u8>>)>,
) -> Result<(), WriteError> {
    let writer = routes.writer().ok_or(WriteError::Unavailable)?;
    let outcome = writer
        .call(
            |reply| WriterMsg::Commit {
                writes: Vec::new(),
                marks: Marks::default(),
                meta,
                priority: Priority::Foreground,
                reply,
            },
            None,
        )
        .await
        .map_err(|_| WriteError::Unavailable)?;
    match outcome {
        CallResult::Success(r) => r.map(|_| ()),
        _ => Err(WriteError::Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_round_trip_and_damage_is_refused() {
        let mut acks: BTreeMap<Epoch, BTreeSet<DeviceId>> = BTreeMap::new();
        acks.entry(Epoch(2)).or_default().insert(DeviceId([1; 16]));
        acks.entry(Epoch(2)).or_default().insert(DeviceId([2; 16]));
        acks.entry(Epoch(7)).or_default().insert(DeviceId([1; 16]));
        let bytes = encode_acks(&acks);
        assert_eq!(bytes.len(), 3 * ACK_BYTES);
        assert_eq!(decode_acks(&bytes), Some(acks));
        assert_eq!(decode_acks(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_acks(&[]), Some(BTreeMap::new()));
    }
}
