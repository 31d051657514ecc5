//! The store keyring and its seal under the device KEK.
//!
//! A keyring holds everything secret a device knows about one store: its
//! own identity, `K_index`, the relay token, and one data key per epoch,
//! plus the member list. On disk it exists only sealed:
//!
//! ```text
//! sealed keyring v1 = version u8 (=1) ‖ nonce [12] ‖ AES-256-GCM-SIV(KEK, nonce,
//!                     aad = "persist/keyring/v1" ‖ store_id, postcard(KeyringWire))
//! ```
//!
//! GCM-SIV is used because the KEK seals many keyrings over a device's life
//! with random nonces; misuse resistance makes a nonce collision harmless
//! beyond revealing equality.
//!
//! # Invariants
//! - `current` names an epoch present in `epochs` with its key.
//! - Epoch numbers only grow: [`Keyring::add_epoch`] refuses a number not
//!   above the current one.
//! - The plaintext encoding exists only in zeroizing buffers.

use std::collections::BTreeMap;

use aes_gcm_siv::aead::AeadInOut;
use aes_gcm_siv::{Aes256GcmSiv, KeyInit};
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::hlc::Hlc;
use crate::ids::{DeviceId, Epoch, StoreId};
use crate::invite::{OPEN_INVITES_MAX, OpenInvite};
use crate::keys::{DeviceIdentity, IndexKey, Secret32};

/// Sealed keyring format version.
pub const SEALED_KEYRING_V1: u8 = 1;
/// Domain separation for the sealed keyring's associated data.
pub const DOMAIN_KEYRING: &[u8] = b"persist/keyring/v1";
/// Domain separation for epoch announcement hashes.
pub const DOMAIN_EPOCH: &[u8] = b"persist/epoch/v1";

/// Most member devices a store has: far above any one person's or team's
/// devices, and it bounds the keyring and what a receiver keeps in memory.
pub const MEMBERS_MAX: usize = 1024;

/// Most revocations a keyring keeps: one per member at most.
pub const REVOCATIONS_MAX: usize = MEMBERS_MAX;

/// Where an epoch is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EpochState {
    /// New writes are sealed under it.
    Current = 0,
    /// Superseded; records under it are being resealed.
    Rotating = 1,
    /// No record uses it; its key is kept for history.
    Retired = 2,
    /// Its key has been deleted.
    Purged = 3,
}

/// Most keys one epoch number holds: its own and those of concurrent
/// rotations on other devices that chose the same number. Two devices
/// rotating at once make two; more is rare, and the bound keeps a keyring
/// (and what a parcel can add to it) small.
pub const EPOCH_KEYS_MAX: usize = 8;

/// What started an epoch, marked in the top bit of its announcement hash.
///
/// Concurrent epochs of one number are ordered by announcement (see
/// [`EpochEntry`]). A revocation's key never reaches the revoked device,
/// while a plain rotation made concurrently, by a member that had not
/// heard of the revocation yet, may have: so a revocation's announcement
/// has its top bit set and a plain rotation's has it clear, and a
/// revocation always wins. (Two concurrent revocations each may have sent
/// their key to the device the other revoked; that is not resolved yet.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// `rotate_key()`.
    Plain,
    /// `revoke_device(id)`.
    Revocation,
}

impl Rotation {
    const BIT: u8 = 0x80;

    fn mark(self, announcement: &mut [u8; 32]) {
        match self {
            Self::Plain => announcement[0] &= !Self::BIT,
            Self::Revocation => announcement[0] |= Self::BIT,
        }
    }

    /// What started the epoch announced as `announcement`.
    pub fn of(announcement: &[u8; 32]) -> Self {
        if announcement[0] & Self::BIT == 0 {
            Self::Plain
        } else {
            Self::Revocation
        }
    }
}

/// One epoch's entry.
///
/// Two devices that rotate before either hears of the other both make
/// epoch `e + 1`, under different keys (DESIGN.md, "Rotation and
/// revocation", step 5). The envelope header names only the number, so a
/// device keeps every key of a number it is given: the one whose
/// announcement hash is highest is the entry's own ([`EpochEntry::key`]),
/// under which new writes are sealed when the number is current; the others
/// are [`EpochEntry::concurrent`], which only open what was sealed under
/// them. Every device that holds the same keys so picks the same one, which
/// is how concurrent rotations converge on one current epoch.
pub struct EpochEntry {
    /// Its state.
    pub state: EpochState,
    /// `DEK_e`, or `None` once purged.
    pub key: Option<Secret32>,
    /// SHA-256 of its announcement; orders concurrent epochs of one number.
    pub announcement: [u8; 32],
    /// Keys of concurrent rotations to the same number, whose announcements
    /// are lower than [`EpochEntry::announcement`]. They share the entry's
    /// state and are purged with it.
    pub concurrent: Vec<ConcurrentKey>,
}

/// A key another device made for the same epoch number as its entry's.
pub struct ConcurrentKey {
    /// Its announcement hash.
    pub announcement: [u8; 32],
    /// The key, or `None` once purged.
    pub key: Option<Secret32>,
}

/// What [`EpochEntry::take`] did with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyTaken {
    /// The entry held it already.
    Known,
    /// Kept beside the entry's key, which stays the one new writes use.
    Concurrent,
    /// Kept, and it is now the entry's key: its announcement is highest.
    Superseding,
    /// Not kept: the entry holds [`EPOCH_KEYS_MAX`] keys, or was purged.
    Refused,
}

impl EpochEntry {
    /// An entry holding one key.
    pub fn new(state: EpochState, key: Option<Secret32>, announcement: [u8; 32]) -> Self {
        Self {
            state,
            key,
            announcement,
            concurrent: Vec::new(),
        }
    }

    /// Whether the entry holds the key announced as `announcement`.
    pub fn holds(&self, announcement: &[u8; 32]) -> bool {
        self.announcement == *announcement
            || self
                .concurrent
                .iter()
                .any(|c| c.announcement == *announcement)
    }

    /// Every key the entry holds with its announcement, its own first.
    pub fn keys(&self) -> impl Iterator<Item = (&[u8; 32], &Secret32)> {
        let own = self.key.as_ref().map(|k| (&self.announcement, k));
        let concurrent = self
            .concurrent
            .iter()
            .filter_map(|c| c.key.as_ref().map(|k| (&c.announcement, k)));
        own.into_iter().chain(concurrent)
    }

    /// Takes `key`, announced as `announcement`, made by a concurrent
    /// rotation to this entry's number: kept beside the entry's key, and
    /// the entry's own if its announcement is the highest.
    pub fn take(&mut self, announcement: [u8; 32], key: Secret32) -> KeyTaken {
        if self.holds(&announcement) {
            return KeyTaken::Known;
        }
        if self.key.is_none() || 1 + self.concurrent.len() >= EPOCH_KEYS_MAX {
            return KeyTaken::Refused;
        }
        let taken = if announcement > self.announcement {
            let old_key = self.key.replace(key);
            let old = std::mem::replace(&mut self.announcement, announcement);
            self.concurrent.push(ConcurrentKey {
                announcement: old,
                key: old_key,
            });
            KeyTaken::Superseding
        } else {
            self.concurrent.push(ConcurrentKey {
                announcement,
                key: Some(key),
            });
            KeyTaken::Concurrent
        };
        self.concurrent
            .sort_by_key(|c| std::cmp::Reverse(c.announcement));
        taken
    }

    /// A copy (keys are not `Clone`, so copies are deliberate).
    pub fn duplicate(&self) -> Self {
        Self {
            state: self.state,
            key: self.key.as_ref().map(Secret32::duplicate),
            announcement: self.announcement,
            concurrent: self
                .concurrent
                .iter()
                .map(|c| ConcurrentKey {
                    announcement: c.announcement,
                    key: c.key.as_ref().map(Secret32::duplicate),
                })
                .collect(),
        }
    }
}

/// A member device of the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub device_id: DeviceId,
    /// Its Ed25519 public key (verifies its envelopes).
    pub ed25519_public: [u8; 32],
    /// Its X25519 public key (receives wrapped keys).
    pub x25519_public: [u8; 32],
    /// A name for people.
    pub name: String,
    /// Who added it (itself for the store's creator).
    pub added_by: DeviceId,
    /// When, by the adder's HLC.
    pub added_at: Hlc,
}

/// A member the store no longer trusts (DESIGN.md, "Rotation and
/// revocation", step 6). It stays in the member list, so that what it
/// signed before stays verifiable, but:
///
/// - it never receives the key of [`Revocation::epoch`] or of any later
///   epoch (the revocation started that epoch, and every record is resealed
///   under it);
/// - envelopes it signed under that epoch or later, or stamped after
///   [`Revocation::at`], are refused by every member that knows of the
///   revocation.
///
/// Revocations are final: there is no way back for a device id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The revoked device.
    pub device_id: DeviceId,
    /// The member that revoked it.
    pub by: DeviceId,
    /// The epoch the revocation started.
    pub epoch: Epoch,
    /// The revoker's clock when it revoked.
    pub at: Hlc,
}

impl Revocation {
    /// Whether an envelope `device` signed under `epoch`, stamped `hlc`,
    /// falls after this revocation (so must be refused).
    pub fn refuses(&self, epoch: Epoch, hlc: Hlc) -> bool {
        epoch >= self.epoch || hlc > self.at
    }

    /// Whether a write its device stamped `hlc` (whoever sealed the copy:
    /// members reseal and pass writes on, keeping their stamp) was made
    /// after this revocation, so no member may keep it.
    pub fn disowns(&self, hlc: Hlc) -> bool {
        hlc > self.at
    }
}

/// The relay token a revocation chose, before the relay is switched to it
/// (DESIGN.md, "Rotation and revocation", step 6).
///
/// The revoked device knows the current token, so a revocation makes a
/// new one. It travels to the other members sealed beside the key of the
/// revocation's epoch, which the revoked device never receives. The relay
/// is switched only once every remaining member has acknowledged that key
/// (or a grace period has passed): a member that found the old token
/// refused could no longer reach its mailbox to learn the new one. Until
/// the switch, a device holds both and presents the current one first.
pub struct NextRelayToken {
    /// The epoch of the revocation that made it.
    pub epoch: Epoch,
    /// The token.
    pub token: Secret32,
}

impl NextRelayToken {
    /// A copy (the token is not `Clone`, so copies are deliberate).
    pub fn duplicate(&self) -> Self {
        Self {
            epoch: self.epoch,
            token: self.token.duplicate(),
        }
    }
}

impl std::fmt::Debug for NextRelayToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NextRelayToken")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Why a device cannot be revoked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeError {
    /// No member has that id.
    #[error("no member of this store has device id {0}; `persist device list` shows them")]
    UnknownDevice(DeviceId),
    /// A device cannot revoke itself.
    #[error("a device cannot revoke itself; revoke it from another member")]
    Itself,
    /// The device is revoked already.
    #[error("device {0} is already revoked")]
    AlreadyRevoked(DeviceId),
    /// This device is revoked itself.
    #[error("this device was revoked; it cannot revoke others")]
    Revoked,
    /// Epoch numbers are exhausted.
    #[error("no epoch numbers are left")]
    EpochsExhausted,
}

impl Member {
    /// `device` as a member that added itself: the store's creator, or a
    /// device joining from a key export.
    fn founding(device: &DeviceIdentity, name: &str, now: Hlc) -> Self {
        let device_id = device.device_id();
        Self {
            device_id,
            ed25519_public: device.verifying_key().to_bytes(),
            x25519_public: device.x25519_public(),
            name: name.to_owned(),
            added_by: device_id,
            added_at: now,
        }
    }
}

/// Everything secret a device holds for one store.
pub struct Keyring {
    /// The store.
    pub store_id: StoreId,
    /// This device's identity.
    pub device: DeviceIdentity,
    /// `K_index`.
    pub index_key: IndexKey,
    /// The relay access token (the relay keeps only its SHA-256).
    pub relay_token: Secret32,
    /// The token a revocation will switch the relay to, while the switch
    /// is pending (see [`NextRelayToken`]).
    pub relay_token_next: Option<NextRelayToken>,
    /// Data keys by epoch.
    pub epochs: BTreeMap<Epoch, EpochEntry>,
    /// The epoch new writes use.
    pub current: Epoch,
    /// Member devices.
    pub members: Vec<Member>,
    /// Invites this device made that have not expired.
    pub invites: Vec<OpenInvite>,
    /// Devices revoked (members, or devices this one has not met yet), in
    /// the order this device learned of them.
    pub revoked: Vec<Revocation>,
}

/// What [`Keyring::merge_export`] took.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Merge {
    /// Epochs added.
    pub added: Vec<Epoch>,
    /// Epochs held here that gained a concurrent rotation's key.
    pub concurrent: Vec<Epoch>,
    /// Of those, the epochs whose own key is now the gained one (its
    /// announcement is higher): what was acknowledged for them no longer
    /// holds.
    pub superseded: Vec<Epoch>,
    /// Epochs whose concurrent key was not kept: [`EPOCH_KEYS_MAX`] keys
    /// held already, or the epoch purged here.
    pub refused: Vec<Epoch>,
}

/// A keyring that cannot be unsealed or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The blob is too short or has an unknown version.
    #[error("sealed keyring is malformed ({0})")]
    Malformed(&'static str),
    /// Authentication failed: wrong KEK, or the blob was altered or belongs to another store.
    #[error(
        "cannot unseal the keyring: the device key does not match this store \
         (was the key file or keychain entry replaced?) or the keyring is corrupted"
    )]
    WrongKeyOrCorrupt,
    /// The decrypted keyring is inconsistent.
    #[error("keyring content is invalid: {0}")]
    Invalid(&'static str),
}

impl Keyring {
    /// A keyring for a brand-new store, created by `device`.
    pub fn create(
        device: DeviceIdentity,
        name: &str,
        now: Hlc,
        rng: &mut (impl CryptoRng + ?Sized),
    ) -> Self {
        let mut store = [0u8; 16];
        rng.fill_bytes(&mut store);
        let store_id = StoreId(store);
        let device_id = device.device_id();
        let me = Member::founding(&device, name, now);
        let mut ring = Self {
            store_id,
            device,
            index_key: IndexKey::new(Secret32::random(rng)),
            relay_token: Secret32::random(rng),
            relay_token_next: None,
            epochs: BTreeMap::new(),
            current: Epoch::FIRST,
            members: vec![me],
            invites: Vec::new(),
            revoked: Vec::new(),
        };
        let key = Secret32::random(rng);
        let announcement = ring.announcement(Epoch::FIRST, device_id, rng);
        ring.epochs.insert(
            Epoch::FIRST,
            EpochEntry::new(EpochState::Current, Some(key), announcement),
        );
        ring
    }

    /// A keyring for an existing store whose keys come from an export:
    /// `device` is this (new) device's own identity.
    pub fn from_export(
        device: DeviceIdentity,
        keys: crate::export::ExportedKeys,
        name: &str,
        now: Hlc,
    ) -> Self {
        let me = Member::founding(&device, name, now);
        Self {
            store_id: keys.store_id,
            device,
            index_key: IndexKey::new(keys.index_key),
            relay_token: keys.relay_token,
            relay_token_next: keys.relay_token_next,
            epochs: keys.epochs.into_iter().collect(),
            current: keys.current,
            members: vec![me],
            invites: Vec::new(),
            revoked: Vec::new(),
        }
        .with_revocations(&keys.revocations)
    }

    /// `self` after [`Keyring::adopt_revocations`].
    fn with_revocations(mut self, revocations: &[Revocation]) -> Self {
        self.adopt_revocations(revocations);
        self
    }

    /// Records the revocations of an export that are new here, of members
    /// known or not (an export is trusted as the keys are; the members are
    /// learned later), up to [`REVOCATIONS_MAX`]. Returns those recorded.
    pub fn adopt_revocations(&mut self, revocations: &[Revocation]) -> Vec<Revocation> {
        let mut added = Vec::new();
        for r in revocations {
            if self.revocation(&r.device_id).is_none() && self.revoked.len() < REVOCATIONS_MAX {
                self.revoked.push(*r);
                added.push(*r);
            }
        }
        added
    }

    /// Starts epoch `current + 1` with a fresh data key and makes it
    /// current; every older epoch that still has records to reseal becomes
    /// [`EpochState::Rotating`]. Returns the new epoch, or `None` if the
    /// epoch numbers are exhausted.
    pub fn rotate(&mut self, rng: &mut (impl CryptoRng + ?Sized)) -> Option<Epoch> {
        self.rotate_as(Rotation::Plain, rng)
    }

    fn rotate_as(&mut self, kind: Rotation, rng: &mut (impl CryptoRng + ?Sized)) -> Option<Epoch> {
        let next = self.current.next()?;
        let mut announcement = self.announcement(next, self.device_id(), rng);
        kind.mark(&mut announcement);
        for entry in self.epochs.values_mut() {
            if entry.state == EpochState::Current {
                entry.state = EpochState::Rotating;
            }
        }
        self.epochs.insert(
            next,
            EpochEntry::new(
                EpochState::Current,
                Some(Secret32::random(rng)),
                announcement,
            ),
        );
        debug_assert!(next > self.current, "epochs never go backwards");
        self.current = next;
        Some(next)
    }

    /// Takes from `keys`, an export of this store made on another device,
    /// the epochs this keyring lacks. If the export's current epoch is
    /// newer than this keyring's, it becomes current here too and the old
    /// current epoch starts rotating, as after a local rotation. Returns
    /// the epochs added. A key of an epoch number held here under another
    /// key (concurrent rotations) is kept beside it, and becomes the
    /// entry's own if its announcement is higher (see [`EpochEntry`]).
    pub fn merge_export(
        &mut self,
        keys: crate::export::ExportedKeys,
    ) -> Result<Merge, KeyringError> {
        if keys.store_id != self.store_id {
            return Err(KeyringError::Invalid("the export belongs to another store"));
        }
        // The relay tokens agree, or one side has switched to the token the
        // other holds as its next.
        let they_switched = self
            .relay_token_next
            .as_ref()
            .is_some_and(|n| n.token == keys.relay_token);
        let we_switched = keys
            .relay_token_next
            .as_ref()
            .is_some_and(|n| n.token == self.relay_token);
        if keys.index_key.expose() != self.index_key.secret().expose()
            || !(keys.relay_token == self.relay_token || they_switched || we_switched)
        {
            return Err(KeyringError::Invalid(
                "the export's index key or relay token differ from this store's",
            ));
        }
        if they_switched {
            if let Some(next) = self.relay_token_next.take() {
                self.relay_token = next.token;
            }
        } else if !we_switched && let Some(next) = keys.relay_token_next {
            self.learn_relay_token(next);
        }
        self.adopt_revocations(&keys.revocations);
        let mut merge = Merge::default();
        let newer = keys.current > self.current;
        for (epoch, mut entry) in keys.epochs {
            match self.epochs.get_mut(&epoch) {
                Some(ours) => {
                    let push = |list: &mut Vec<Epoch>| {
                        if !list.contains(&epoch) {
                            list.push(epoch);
                        }
                    };
                    for (announcement, key) in entry.keys() {
                        match ours.take(*announcement, key.duplicate()) {
                            KeyTaken::Known => {}
                            KeyTaken::Concurrent => push(&mut merge.concurrent),
                            KeyTaken::Superseding => {
                                push(&mut merge.concurrent);
                                push(&mut merge.superseded);
                            }
                            KeyTaken::Refused => push(&mut merge.refused),
                        }
                    }
                }
                None if entry.key.is_none() => {}
                None => {
                    if entry.state == EpochState::Current && !(newer && epoch == keys.current) {
                        entry.state = EpochState::Rotating;
                    }
                    self.epochs.insert(epoch, entry);
                    merge.added.push(epoch);
                }
            }
        }
        if newer && merge.added.contains(&keys.current) {
            for (n, entry) in self.epochs.iter_mut() {
                if *n != keys.current && entry.state == EpochState::Current {
                    entry.state = EpochState::Rotating;
                }
            }
            self.current = keys.current;
        }
        Ok(merge)
    }

    /// Marks the rotating epochs for which `unused` holds retired: the
    /// caller has checked that no local record uses them any more. Returns
    /// the epochs retired.
    pub fn retire(&mut self, unused: impl Fn(Epoch) -> bool) -> Vec<Epoch> {
        let mut retired = Vec::new();
        for (n, entry) in self.epochs.iter_mut() {
            if entry.state == EpochState::Rotating && *n != self.current && unused(*n) {
                entry.state = EpochState::Retired;
                retired.push(*n);
            }
        }
        retired
    }

    /// Deletes the keys of the retired epochs for which `unused` holds.
    /// Returns the epochs purged.
    pub fn purge_retired(&mut self, unused: impl Fn(Epoch) -> bool) -> Vec<Epoch> {
        let mut purged = Vec::new();
        for (n, entry) in self.epochs.iter_mut() {
            if entry.state == EpochState::Retired && unused(*n) {
                entry.state = EpochState::Purged;
                entry.key = None;
                for c in &mut entry.concurrent {
                    c.key = None;
                }
                purged.push(*n);
            }
        }
        purged
    }

    /// Adds `member` unless a member with its device id is already known
    /// or the list holds [`MEMBERS_MAX`]; returns whether it was added. The caller has checked the entry (see
    /// [`crate::membership`]).
    pub fn add_member(&mut self, member: Member) -> bool {
        if self.members.len() >= MEMBERS_MAX
            || self.members.iter().any(|m| m.device_id == member.device_id)
        {
            return false;
        }
        self.members.push(member);
        true
    }

    /// The revocation of `device`, if it is revoked.
    pub fn revocation(&self, device: &DeviceId) -> Option<&Revocation> {
        self.revoked.iter().find(|r| r.device_id == *device)
    }

    /// Revokes member `device` at `at` (this device's clock): starts a new
    /// epoch, as [`Keyring::rotate`] does, which the revoked device will
    /// never receive, and records the revocation. Nothing changes on error.
    pub fn revoke(
        &mut self,
        device: DeviceId,
        at: Hlc,
        rng: &mut (impl CryptoRng + ?Sized),
    ) -> Result<Revocation, RevokeError> {
        let me = self.device_id();
        if self.revocation(&me).is_some() {
            return Err(RevokeError::Revoked);
        }
        if device == me {
            return Err(RevokeError::Itself);
        }
        if !self.members.iter().any(|m| m.device_id == device) {
            return Err(RevokeError::UnknownDevice(device));
        }
        if self.revocation(&device).is_some() {
            return Err(RevokeError::AlreadyRevoked(device));
        }
        let epoch = self
            .rotate_as(Rotation::Revocation, rng)
            .ok_or(RevokeError::EpochsExhausted)?;
        let revocation = Revocation {
            device_id: device,
            by: me,
            epoch,
            at,
        };
        self.revoked.push(revocation);
        // A later revocation's token supersedes an earlier one not yet
        // switched to: the relay moves straight to the newest.
        self.relay_token_next = Some(NextRelayToken {
            epoch,
            token: Secret32::random(rng),
        });
        Ok(revocation)
    }

    /// Keeps `next`, a relay token a member sent with the key of
    /// `next.epoch`, unless this keyring already holds that token or a
    /// token of a later revocation. Returns whether it was kept.
    pub fn learn_relay_token(&mut self, next: NextRelayToken) -> bool {
        if next.token == self.relay_token {
            return false;
        }
        if self
            .relay_token_next
            .as_ref()
            .is_some_and(|held| held.epoch >= next.epoch)
        {
            return false;
        }
        self.relay_token_next = Some(next);
        true
    }

    /// The relay now takes the pending token whose credential for this
    /// store is `access`: it becomes the current token. Returns whether
    /// anything changed (`false` when no pending token has that credential,
    /// e.g. it was promoted already).
    pub fn promote_relay_token(&mut self, access: &crate::protocol::AccessKey) -> bool {
        let matches = self.relay_token_next.as_ref().is_some_and(|next| {
            crate::protocol::AccessKey::derive(&next.token, &self.store_id) == *access
        });
        if !matches {
            return false;
        }
        if let Some(next) = self.relay_token_next.take() {
            self.relay_token = next.token;
        }
        true
    }

    /// Records the revocations among `learned` that are new here, of
    /// members known or not, up to [`REVOCATIONS_MAX`]. Returns those
    /// recorded.
    ///
    /// Not only of known members: a member that was away while a device
    /// joined and was revoked may get the revocation's record before the
    /// device's own announcement, and must know the device as revoked once
    /// it learns of it (regression: simulation seed 236, a late joiner
    /// revoked while another member was partitioned, whose announcement
    /// that member then kept under the old epoch, and whose revocation it
    /// never learned).
    ///
    /// Made-up revocations of devices nobody knows must not crowd out a
    /// member's: at the cap, a member's revocation takes the place of one
    /// of a device that is not a member, and one of a device that is not a
    /// member takes no place.
    pub fn learn_revocations(&mut self, learned: &[Revocation]) -> Vec<Revocation> {
        let mut added = Vec::new();
        for r in learned {
            if self.revocation(&r.device_id).is_some() {
                continue;
            }
            if self.revoked.len() >= REVOCATIONS_MAX {
                let is_member = |id: &DeviceId| self.members.iter().any(|m| m.device_id == *id);
                if !is_member(&r.device_id) {
                    continue;
                }
                let Some(stranger) = self.revoked.iter().position(|x| !is_member(&x.device_id))
                else {
                    continue;
                };
                self.revoked.remove(stranger);
            }
            self.revoked.push(*r);
            added.push(*r);
        }
        added
    }

    /// Keeps `invite` open, after dropping those expired at `now_ms`.
    /// Refuses (returns `false`) past [`OPEN_INVITES_MAX`] open invites.
    pub fn add_invite(&mut self, invite: OpenInvite, now_ms: u64) -> bool {
        self.forget_expired_invites(now_ms);
        if self.invites.len() >= OPEN_INVITES_MAX {
            return false;
        }
        self.invites.push(invite);
        true
    }

    /// Drops the invites expired at `now_ms`; returns whether any was.
    pub fn forget_expired_invites(&mut self, now_ms: u64) -> bool {
        let before = self.invites.len();
        self.invites.retain(|i| i.expires_ms > now_ms);
        self.invites.len() != before
    }

    /// This device's own member entry.
    pub fn own_member(&self) -> Option<&Member> {
        let me = self.device_id();
        self.members.iter().find(|m| m.device_id == me)
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.device.device_id()
    }

    /// The current epoch's data key.
    pub fn current_key(&self) -> &Secret32 {
        match self.epochs.get(&self.current).and_then(|e| e.key.as_ref()) {
            Some(k) => k,
            // `open` and every mutation keep the invariant that the current
            // epoch has its key; a violation is a bug, not bad input.
            None => unreachable!("keyring invariant: current epoch has its key"),
        }
    }

    /// The data key of `epoch`, if held and not purged.
    pub fn key(&self, epoch: Epoch) -> Option<&Secret32> {
        self.epochs.get(&epoch).and_then(|e| e.key.as_ref())
    }

    /// The announcement hash of an epoch made by `creator`:
    /// `SHA-256(DOMAIN_EPOCH ‖ store_id ‖ epoch ‖ creator ‖ 16 random bytes)`.
    pub fn announcement(
        &self,
        epoch: Epoch,
        creator: DeviceId,
        rng: &mut (impl CryptoRng + ?Sized),
    ) -> [u8; 32] {
        let mut salt = [0u8; 16];
        rng.fill_bytes(&mut salt);
        let mut h = Sha256::new();
        h.update(DOMAIN_EPOCH);
        h.update(self.store_id.as_bytes());
        h.update(epoch.0.to_be_bytes());
        h.update(creator.0);
        h.update(salt);
        h.finalize().into()
    }

    /// Seals the keyring under `kek`.
    pub fn seal(&self, kek: &Secret32, rng: &mut (impl CryptoRng + ?Sized)) -> Vec<u8> {
        let wire = self.to_wire();
        let mut buf = Zeroizing::new(
            postcard::to_stdvec(&wire)
                .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}")),
        );
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let cipher = Aes256GcmSiv::new(kek.expose().into());
        let aad = [DOMAIN_KEYRING, self.store_id.as_bytes()].concat();
        let tag = cipher
            .encrypt_inout_detached(&nonce.into(), &aad, buf.as_mut_slice().into())
            .unwrap_or_else(|_| unreachable!("keyring is far below GCM-SIV's length limit"));
        let mut out = Vec::with_capacity(1 + 12 + buf.len() + 16);
        out.push(SEALED_KEYRING_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out.extend_from_slice(&tag);
        out
    }

    /// Unseals a keyring of `store_id` under `kek`.
    pub fn open(sealed: &[u8], store_id: &StoreId, kek: &Secret32) -> Result<Self, KeyringError> {
        if sealed.len() < 1 + 12 + 16 {
            return Err(KeyringError::Malformed("too short"));
        }
        if sealed[0] != SEALED_KEYRING_V1 {
            return Err(KeyringError::Malformed("unknown version"));
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&sealed[1..13]);
        let body = &sealed[13..];
        let (ct, tag) = body.split_at(body.len() - 16);
        let mut tag_arr = [0u8; 16];
        tag_arr.copy_from_slice(tag);
        let mut buf = Zeroizing::new(ct.to_vec());
        let cipher = Aes256GcmSiv::new(kek.expose().into());
        let aad = [DOMAIN_KEYRING, store_id.as_bytes()].concat();
        cipher
            .decrypt_inout_detached(
                &nonce.into(),
                &aad,
                buf.as_mut_slice().into(),
                &tag_arr.into(),
            )
            .map_err(|_| KeyringError::WrongKeyOrCorrupt)?;
        let wire: KeyringWire =
            postcard::from_bytes(&buf).map_err(|_| KeyringError::Invalid("undecodable"))?;
        let ring = Self::from_wire(&wire)?;
        if ring.store_id != *store_id {
            return Err(KeyringError::Invalid("store id differs"));
        }
        Ok(ring)
    }

    fn to_wire(&self) -> KeyringWire {
        KeyringWire {
            store_id: self.store_id.0,
            ed25519: *self.device.ed25519_secret().expose(),
            x25519: *self.device.x25519_secret().expose(),
            index_key: *self.index_key.secret().expose(),
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
                .flat_map(|(e, entry)| {
                    let own = EpochWire {
                        epoch: e.0,
                        state: entry.state as u8,
                        key: entry.key.as_ref().map(|k| *k.expose()),
                        announcement: entry.announcement,
                    };
                    let concurrent = entry.concurrent.iter().map(|c| EpochWire {
                        epoch: e.0,
                        state: entry.state as u8,
                        key: c.key.as_ref().map(|k| *k.expose()),
                        announcement: c.announcement,
                    });
                    std::iter::once(own).chain(concurrent)
                })
                .collect(),
            members: self.members.iter().map(MemberWire::from).collect(),
            invites: self
                .invites
                .iter()
                .map(|i| InviteWire {
                    id: i.id.0,
                    secret: *i.secret.expose(),
                    expires_ms: i.expires_ms,
                    used_by: i.used_by.map(|d| d.0),
                })
                .collect(),
            revoked: self.revoked.iter().map(RevocationWire::from).collect(),
        }
    }

    fn from_wire(w: &KeyringWire) -> Result<Self, KeyringError> {
        let mut epochs = BTreeMap::new();
        for e in &w.epochs {
            let state = match e.state {
                0 => EpochState::Current,
                1 => EpochState::Rotating,
                2 => EpochState::Retired,
                3 => EpochState::Purged,
                _ => return Err(KeyringError::Invalid("unknown epoch state")),
            };
            if (state == EpochState::Purged) != e.key.is_none() {
                return Err(KeyringError::Invalid(
                    "purged epochs, and only they, lack keys",
                ));
            }
            let key = e.key.map(Secret32::from_bytes);
            match epochs.get_mut(&Epoch(e.epoch)) {
                None => {
                    epochs.insert(Epoch(e.epoch), EpochEntry::new(state, key, e.announcement));
                }
                // A concurrent key: written after its entry's own, with a
                // lower announcement than the key before it, same state.
                Some(entry) => {
                    let below = entry
                        .concurrent
                        .last()
                        .map_or(entry.announcement, |c| c.announcement);
                    if entry.state != state
                        || e.announcement >= below
                        || 1 + entry.concurrent.len() >= EPOCH_KEYS_MAX
                    {
                        return Err(KeyringError::Invalid(
                            "an epoch's concurrent keys are out of order",
                        ));
                    }
                    entry.concurrent.push(ConcurrentKey {
                        announcement: e.announcement,
                        key,
                    });
                }
            }
        }
        let current = Epoch(w.current);
        if epochs.get(&current).is_none_or(|e| e.key.is_none()) {
            return Err(KeyringError::Invalid("current epoch has no key"));
        }
        Ok(Self {
            store_id: StoreId(w.store_id),
            device: DeviceIdentity::from_secrets(
                &Secret32::from_bytes(w.ed25519),
                &Secret32::from_bytes(w.x25519),
            ),
            index_key: IndexKey::new(Secret32::from_bytes(w.index_key)),
            relay_token: Secret32::from_bytes(w.relay_token),
            relay_token_next: w.relay_token_next.map(|(epoch, token)| NextRelayToken {
                epoch: Epoch(epoch),
                token: Secret32::from_bytes(token),
            }),
            epochs,
            current,
            members: w.members.iter().map(Member::from).collect(),
            invites: w
                .invites
                .iter()
                .map(|i| OpenInvite {
                    id: crate::ids::InviteId(i.id),
                    secret: Secret32::from_bytes(i.secret),
                    expires_ms: i.expires_ms,
                    used_by: i.used_by.map(DeviceId),
                })
                .collect(),
            revoked: w.revoked.iter().map(Revocation::from).collect(),
        })
    }
}

/// The keyring's plaintext encoding. Private, zeroized on drop.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct KeyringWire {
    store_id: [u8; 16],
    ed25519: [u8; 32],
    x25519: [u8; 32],
    index_key: [u8; 32],
    relay_token: [u8; 32],
    relay_token_next: Option<(u32, [u8; 32])>,
    current: u32,
    epochs: Vec<EpochWire>,
    members: Vec<MemberWire>,
    invites: Vec<InviteWire>,
    revoked: Vec<RevocationWire>,
}

#[derive(Serialize, Deserialize, Zeroize)]
pub(crate) struct RevocationWire {
    device_id: [u8; 16],
    by: [u8; 16],
    epoch: u32,
    at_ms: u64,
    at_counter: u16,
}

impl From<&Revocation> for RevocationWire {
    fn from(r: &Revocation) -> Self {
        Self {
            device_id: r.device_id.0,
            by: r.by.0,
            epoch: r.epoch.0,
            at_ms: r.at.ms,
            at_counter: r.at.counter,
        }
    }
}

impl From<&RevocationWire> for Revocation {
    fn from(r: &RevocationWire) -> Self {
        Self {
            device_id: DeviceId(r.device_id),
            by: DeviceId(r.by),
            epoch: Epoch(r.epoch),
            at: Hlc {
                ms: r.at_ms,
                counter: r.at_counter,
            },
        }
    }
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct InviteWire {
    id: [u8; 16],
    secret: [u8; 32],
    expires_ms: u64,
    used_by: Option<[u8; 16]>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct EpochWire {
    epoch: u32,
    state: u8,
    key: Option<[u8; 32]>,
    announcement: [u8; 32],
}

#[derive(Serialize, Deserialize, Zeroize)]
struct MemberWire {
    device_id: [u8; 16],
    ed25519_public: [u8; 32],
    x25519_public: [u8; 32],
    name: String,
    added_by: [u8; 16],
    added_at_ms: u64,
    added_at_counter: u16,
}

impl From<&Member> for MemberWire {
    fn from(m: &Member) -> Self {
        Self {
            device_id: m.device_id.0,
            ed25519_public: m.ed25519_public,
            x25519_public: m.x25519_public,
            name: m.name.clone(),
            added_by: m.added_by.0,
            added_at_ms: m.added_at.ms,
            added_at_counter: m.added_at.counter,
        }
    }
}

impl From<&MemberWire> for Member {
    fn from(m: &MemberWire) -> Self {
        Self {
            device_id: DeviceId(m.device_id),
            ed25519_public: m.ed25519_public,
            x25519_public: m.x25519_public,
            name: m.name.clone(),
            added_by: DeviceId(m.added_by),
            added_at: Hlc {
                ms: m.added_at_ms,
                counter: m.added_at_counter,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Entropy, SeededEntropy};
    use crate::export::ExportedKeys;

    fn ring(seed: u64) -> Keyring {
        let mut rng = SeededEntropy::from_u64(seed).stream("t");
        let id = DeviceIdentity::generate(&mut rng);
        Keyring::create(id, "laptop", Hlc { ms: 5, counter: 0 }, &mut rng)
    }

    #[test]
    fn seal_open_round_trip() {
        let r = ring(1);
        let kek = Secret32::from_bytes([9; 32]);
        let mut rng = SeededEntropy::from_u64(2).stream("seal");
        let sealed = r.seal(&kek, &mut rng);
        let back = Keyring::open(&sealed, &r.store_id, &kek).unwrap();
        assert_eq!(back.store_id, r.store_id);
        assert_eq!(back.device_id(), r.device_id());
        assert!(back.current_key() == r.current_key());
        assert!(back.relay_token == r.relay_token);
        assert!(back.index_key.secret() == r.index_key.secret());
        assert_eq!(back.members, r.members);
        assert_eq!(back.current, Epoch::FIRST);
    }

    #[test]
    fn wrong_kek_other_store_and_tampering_are_refused() {
        let r = ring(1);
        let kek = Secret32::from_bytes([9; 32]);
        let mut rng = SeededEntropy::from_u64(2).stream("seal");
        let sealed = r.seal(&kek, &mut rng);
        let wrong = Secret32::from_bytes([8; 32]);
        assert_eq!(
            Keyring::open(&sealed, &r.store_id, &wrong).err(),
            Some(KeyringError::WrongKeyOrCorrupt)
        );
        assert_eq!(
            Keyring::open(&sealed, &StoreId([0; 16]), &kek).err(),
            Some(KeyringError::WrongKeyOrCorrupt)
        );
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x40;
            assert!(Keyring::open(&t, &r.store_id, &kek).is_err(), "byte {i}");
        }
        assert!(Keyring::open(&sealed[..20], &r.store_id, &kek).is_err());
        assert!(Keyring::open(&[], &r.store_id, &kek).is_err());
    }

    #[test]
    fn merging_a_newer_export_adds_its_epochs_and_moves_current() {
        let mut a = ring(5);
        let mut rng = SeededEntropy::from_u64(6).stream("rot");
        let other = DeviceIdentity::generate(&mut rng);
        let export = |r: &Keyring| crate::export::ExportedKeys::from_keyring(r);
        let mut b = Keyring::from_export(other, export(&a), "b", Hlc::default());
        a.rotate(&mut rng);
        a.rotate(&mut rng);
        let merge = b.merge_export(export(&a)).expect("same store");
        assert_eq!(merge.added, vec![Epoch(2), Epoch(3)]);
        assert!(merge.concurrent.is_empty());
        assert_eq!(b.current, Epoch(3));
        assert!(b.current_key() == a.current_key());
        assert_eq!(b.epochs[&Epoch(1)].state, EpochState::Rotating);
        assert_eq!(b.epochs[&Epoch(2)].state, EpochState::Rotating);
        // Merging again, or an older export, changes nothing.
        assert_eq!(b.merge_export(export(&a)).unwrap(), Merge::default());
        // Another store's export is refused.
        assert!(b.merge_export(export(&ring(9))).is_err());
    }

    /// Two devices rotate to the same number before either hears of the
    /// other: `a` and `c` each hold their own key of epoch 2.
    fn concurrent_rotation(seed: u64) -> (Keyring, Keyring) {
        let mut a = ring(seed);
        let mut rng = SeededEntropy::from_u64(seed).stream("rot");
        let export = crate::export::ExportedKeys::from_keyring(&a);
        let mut c = Keyring::from_export(
            DeviceIdentity::generate(&mut rng),
            export,
            "c",
            Hlc::default(),
        );
        a.rotate(&mut rng);
        c.rotate(&mut rng);
        (a, c)
    }

    #[test]
    fn concurrent_rotations_keep_both_keys_and_agree_on_the_current_one() {
        // Over several seeds either side's announcement can be the higher.
        let mut superseded = [0; 2];
        for seed in 20..36 {
            let (mut a, mut c) = concurrent_rotation(seed);
            let key_a = a.current_key().duplicate();
            let key_c = c.current_key().duplicate();
            let (ann_a, ann_c) = (
                a.epochs[&a.current].announcement,
                c.epochs[&c.current].announcement,
            );
            assert!(key_a != key_c);
            let merge_c = c.merge_export(ExportedKeys::from_keyring(&a)).unwrap();
            let merge_a = a.merge_export(ExportedKeys::from_keyring(&c)).unwrap();
            for (merge, r) in [(&merge_a, &a), (&merge_c, &c)] {
                assert!(merge.added.is_empty());
                assert_eq!(merge.concurrent, vec![Epoch(2)]);
                assert!(merge.refused.is_empty());
                assert_eq!(r.current, Epoch(2));
                let entry = &r.epochs[&Epoch(2)];
                assert!(entry.holds(&ann_a) && entry.holds(&ann_c));
                assert_eq!(entry.keys().count(), 2);
            }
            // Both now seal under the key with the higher announcement.
            assert!(a.current_key() == c.current_key());
            let (winner, winning_key) = if ann_a > ann_c {
                (ann_a, &key_a)
            } else {
                (ann_c, &key_c)
            };
            assert!(a.current_key() == winning_key);
            assert_eq!(a.epochs[&Epoch(2)].announcement, winner);
            // Exactly one side's key was superseded.
            assert_eq!(merge_a.superseded.len() + merge_c.superseded.len(), 1);
            superseded[usize::from(merge_a.superseded.is_empty())] += 1;
            // Merging again changes nothing; the keys survive sealing.
            assert_eq!(
                a.merge_export(ExportedKeys::from_keyring(&c)).unwrap(),
                Merge::default()
            );
            let kek = Secret32::from_bytes([7; 32]);
            let mut rng = SeededEntropy::from_u64(seed).stream("seal");
            let back = Keyring::open(&a.seal(&kek, &mut rng), &a.store_id, &kek).unwrap();
            let entry = &back.epochs[&Epoch(2)];
            assert_eq!(entry.announcement, winner);
            assert!(entry.holds(&ann_a) && entry.holds(&ann_c));
            assert!(back.current_key() == winning_key);
            // An export carries both keys to a device that had neither.
            let mut d = Keyring::from_export(
                DeviceIdentity::generate(&mut rng),
                ExportedKeys::from_keyring(&a),
                "d",
                Hlc::default(),
            );
            assert_eq!(d.epochs[&Epoch(2)].keys().count(), 2);
            assert!(d.current_key() == winning_key);
            // Purging drops every key of the epoch.
            d.rotate(&mut rng);
            d.retire(|_| true);
            d.purge_retired(|_| true);
            assert_eq!(d.epochs[&Epoch(2)].keys().count(), 0);
            let back = Keyring::open(&d.seal(&kek, &mut rng), &d.store_id, &kek).unwrap();
            assert_eq!(back.epochs[&Epoch(2)].concurrent.len(), 1);
            assert_eq!(back.epochs[&Epoch(2)].keys().count(), 0);
        }
        assert!(superseded[0] > 0 && superseded[1] > 0, "{superseded:?}");
    }

    #[test]
    fn a_revocation_wins_over_a_concurrent_plain_rotation() {
        for seed in 50..66 {
            let mut a = ring(seed);
            let mut rng = SeededEntropy::from_u64(seed).stream("rev");
            let mut c = Keyring::from_export(
                DeviceIdentity::generate(&mut rng),
                ExportedKeys::from_keyring(&a),
                "c",
                Hlc::default(),
            );
            let x = ring(seed + 100).members[0].clone();
            a.add_member(x.clone());
            c.add_member(x.clone());
            // A revokes X; C, not knowing, rotates (and may give X its key).
            a.revoke(x.device_id, Hlc::default(), &mut rng).unwrap();
            c.rotate(&mut rng);
            let revocation_key = a.current_key().duplicate();
            let ann = |r: &Keyring| r.epochs[&r.current].announcement;
            assert_eq!(Rotation::of(&ann(&a)), Rotation::Revocation);
            assert_eq!(Rotation::of(&ann(&c)), Rotation::Plain);
            c.merge_export(ExportedKeys::from_keyring(&a)).unwrap();
            a.merge_export(ExportedKeys::from_keyring(&c)).unwrap();
            for r in [&a, &c] {
                assert!(r.current_key() == &revocation_key, "seed {seed}");
                assert_eq!(r.epochs[&Epoch(2)].keys().count(), 2);
            }
        }
    }

    #[test]
    fn concurrent_keys_out_of_order_are_refused_when_read() {
        let (mut a, c) = concurrent_rotation(70);
        a.merge_export(ExportedKeys::from_keyring(&c)).unwrap();
        let concurrent = |wire: &KeyringWire| {
            wire.epochs
                .iter()
                .rposition(|e| e.epoch == 2)
                .expect("epoch 2's second key")
        };
        assert!(Keyring::from_wire(&a.to_wire()).is_ok());
        // A concurrent key that ranks above its entry's own key.
        let mut wire = a.to_wire();
        let i = concurrent(&wire);
        wire.epochs[i].announcement = [0xff; 32];
        let out_of_order = Some(KeyringError::Invalid(
            "an epoch's concurrent keys are out of order",
        ));
        assert_eq!(Keyring::from_wire(&wire).err(), out_of_order);
        // One in another state than its entry.
        let mut wire = a.to_wire();
        let i = concurrent(&wire);
        wire.epochs[i].state = EpochState::Retired as u8;
        assert_eq!(Keyring::from_wire(&wire).err(), out_of_order);
        // The same, through an export: its concurrent key must follow the
        // epoch's own, lower.
        let mut export = ExportedKeys::from_keyring(&a);
        let (_, entry) = export
            .epochs
            .iter_mut()
            .find(|(n, _)| *n == Epoch(2))
            .unwrap();
        std::mem::swap(
            &mut entry.announcement,
            &mut entry.concurrent[0].announcement,
        );
        assert!(ExportedKeys::decode(&export.encode()).is_err());
    }

    #[test]
    fn an_epoch_keeps_a_bounded_number_of_concurrent_keys() {
        let (mut a, _) = concurrent_rotation(40);
        let mut rng = SeededEntropy::from_u64(41).stream("more");
        let entry = a.epochs.get_mut(&Epoch(2)).unwrap();
        let mut taken = Vec::new();
        for _ in 0..EPOCH_KEYS_MAX + 2 {
            let mut announcement = [0u8; 32];
            rng.fill_bytes(&mut announcement);
            taken.push(entry.take(announcement, Secret32::random(&mut rng)));
        }
        let kept = taken.iter().filter(|t| **t != KeyTaken::Refused).count();
        assert_eq!(kept, EPOCH_KEYS_MAX - 1);
        assert_eq!(entry.keys().count(), EPOCH_KEYS_MAX);
        assert_eq!(taken.last(), Some(&KeyTaken::Refused));
        // The entry's own key has the highest announcement.
        assert!(
            entry
                .concurrent
                .iter()
                .all(|c| c.announcement < entry.announcement)
        );
        // A full entry still seals and opens.
        let kek = Secret32::from_bytes([9; 32]);
        let back = Keyring::open(&a.seal(&kek, &mut rng), &a.store_id, &kek).unwrap();
        assert_eq!(back.epochs[&Epoch(2)].keys().count(), EPOCH_KEYS_MAX);
    }

    #[test]
    fn revoking_starts_an_epoch_and_is_kept_sealed() {
        let mut r = ring(1);
        let other = ring(2).members[0].clone();
        let me = r.device_id();
        let mut rng = SeededEntropy::from_u64(3).stream("t");
        let at = Hlc { ms: 9, counter: 2 };
        assert_eq!(
            r.revoke(other.device_id, at, &mut rng).unwrap_err(),
            RevokeError::UnknownDevice(other.device_id)
        );
        assert_eq!(r.revoke(me, at, &mut rng).unwrap_err(), RevokeError::Itself);
        assert_eq!(r.current, Epoch::FIRST, "failed revocations change nothing");
        assert!(r.add_member(other.clone()));
        let revocation = r.revoke(other.device_id, at, &mut rng).unwrap();
        assert_eq!(revocation.epoch, r.current);
        assert!(r.current > Epoch::FIRST);
        assert_eq!(revocation.by, me);
        assert_eq!(
            r.revoke(other.device_id, at, &mut rng).unwrap_err(),
            RevokeError::AlreadyRevoked(other.device_id)
        );
        // Refused: later epochs, or later stamps; earlier ones stand.
        assert!(revocation.refuses(r.current, Hlc { ms: 1, counter: 0 }));
        assert!(revocation.refuses(Epoch::FIRST, Hlc { ms: 9, counter: 3 }));
        assert!(!revocation.refuses(Epoch::FIRST, at));
        // Sealed and opened again, and learned once only elsewhere.
        let kek = Secret32::from_bytes([9; 32]);
        let back = Keyring::open(&r.seal(&kek, &mut rng), &r.store_id, &kek).unwrap();
        assert_eq!(back.revoked, [revocation]);
        // Before the revoked device is known there too: its announcement
        // may come later.
        let mut third = ring(3);
        assert_eq!(
            third.learn_revocations(&[revocation, revocation]),
            [revocation]
        );
        assert!(third.learn_revocations(&[revocation]).is_empty());
        third.add_member(other.clone());
        assert!(third.learn_revocations(&[revocation]).is_empty());
        assert_eq!(third.revocation(&other.device_id), Some(&revocation));

        // At the cap, revocations of strangers give way to a member's, and
        // take no place themselves.
        let mut full = ring(4);
        let stranger = |i: usize| {
            let mut id = [0xee; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Revocation {
                device_id: DeviceId(id),
                ..revocation
            }
        };
        let strangers: Vec<Revocation> = (0..REVOCATIONS_MAX).map(stranger).collect();
        assert_eq!(full.learn_revocations(&strangers).len(), REVOCATIONS_MAX);
        assert!(
            full.learn_revocations(&[stranger(REVOCATIONS_MAX)])
                .is_empty()
        );
        full.add_member(other.clone());
        assert_eq!(full.learn_revocations(&[revocation]), [revocation]);
        assert_eq!(full.revoked.len(), REVOCATIONS_MAX);
        assert_eq!(full.revocation(&other.device_id), Some(&revocation));
    }

    #[test]
    fn a_revocation_chooses_the_next_relay_token_which_travels_and_is_promoted() {
        use crate::protocol::AccessKey;
        let mut a = ring(1);
        let other = ring(2).members[0].clone();
        let mut rng = SeededEntropy::from_u64(3).stream("t");
        // b: another member holding a's store secrets.
        let mut b = Keyring::from_export(
            ring(4).device,
            crate::export::ExportedKeys::from_keyring(&a),
            "b",
            Hlc::default(),
        );
        assert!(a.add_member(other.clone()));
        let old = a.relay_token.duplicate();
        let revocation = a
            .revoke(other.device_id, Hlc { ms: 9, counter: 0 }, &mut rng)
            .unwrap();
        let next = a
            .relay_token_next
            .as_ref()
            .expect("a pending token")
            .duplicate();
        assert_eq!(next.epoch, revocation.epoch);
        assert!(
            next.token != old && a.relay_token == old,
            "not switched yet"
        );

        // Kept sealed, and carried by exports (and so by pairing grants).
        let kek = Secret32::from_bytes([9; 32]);
        let back = Keyring::open(&a.seal(&kek, &mut rng), &a.store_id, &kek).unwrap();
        assert!(back.relay_token_next.as_ref().unwrap().token == next.token);
        let exported = crate::export::ExportedKeys::from_keyring(&a);
        assert!(exported.relay_token_next.as_ref().unwrap().token == next.token);
        let decoded = crate::export::ExportedKeys::decode(&exported.encode()).unwrap();
        assert!(decoded.relay_token_next.as_ref().unwrap().token == next.token);

        // The revocation travels too: a device made from the export, or
        // holding the store already (b, which never knew the revoked
        // device as a member), knows of it and never keys that device.
        assert_eq!(decoded.revocations, [revocation]);
        let imported = Keyring::from_export(ring(7).device, decoded, "imported", Hlc::default());
        assert_eq!(imported.revocation(&other.device_id), Some(&revocation));
        let mut merged = Keyring::from_export(
            ring(8).device,
            crate::export::ExportedKeys::from_keyring(&b),
            "merged",
            Hlc::default(),
        );
        assert!(merged.revocation(&other.device_id).is_none());
        merged
            .merge_export(crate::export::ExportedKeys::from_keyring(&a))
            .unwrap();
        assert_eq!(merged.revocation(&other.device_id), Some(&revocation));

        // Learned once; an older revocation's token never replaces it.
        assert!(b.learn_relay_token(next.duplicate()));
        assert!(!b.learn_relay_token(next.duplicate()));
        let older = NextRelayToken {
            epoch: Epoch::FIRST,
            token: Secret32::from_bytes([5; 32]),
        };
        assert!(!b.learn_relay_token(older));
        assert!(b.relay_token_next.as_ref().unwrap().token == next.token);

        // Promoted only by the pending token's own credential.
        assert!(!b.promote_relay_token(&AccessKey::derive(&old, &b.store_id)));
        let new_access = AccessKey::derive(&next.token, &b.store_id);
        assert!(b.promote_relay_token(&new_access));
        assert!(b.relay_token == next.token && b.relay_token_next.is_none());
        assert!(!b.promote_relay_token(&new_access), "once");
        assert!(
            !b.learn_relay_token(next.duplicate()),
            "the current token is not next"
        );

        // An export across the switch merges either way, and the side that
        // had not switched switches.
        assert!(
            a.merge_export(crate::export::ExportedKeys::from_keyring(&b))
                .is_ok()
        );
        assert!(a.relay_token == next.token && a.relay_token_next.is_none());
        let mut c = Keyring::from_export(
            ring(5).device,
            crate::export::ExportedKeys::from_keyring(&ring(6)),
            "c",
            Hlc::default(),
        );
        c.store_id = a.store_id;
        assert!(
            c.merge_export(crate::export::ExportedKeys::from_keyring(&a))
                .is_err(),
            "an unrelated token is refused"
        );
    }

    #[test]
    fn rotation_retirement_and_purge() {
        let mut r = ring(5);
        let mut rng = SeededEntropy::from_u64(6).stream("rot");
        let first = r.current_key().duplicate();
        assert_eq!(r.rotate(&mut rng), Some(Epoch(2)));
        assert!(*r.current_key() != first, "a rotation makes a new key");
        assert_eq!(r.epochs[&Epoch(1)].state, EpochState::Rotating);
        assert_eq!(r.rotate(&mut rng), Some(Epoch(3)));
        assert_eq!(r.epochs[&Epoch(2)].state, EpochState::Rotating);
        assert!(r.key(Epoch(1)).is_some(), "old keys stay until purged");
        assert_eq!(
            r.retire(|e| e != Epoch(2)),
            vec![Epoch(1)],
            "epoch 2 still in use"
        );
        assert_eq!(r.retire(|_| true), vec![Epoch(2)]);
        assert_eq!(r.purge_retired(|e| e == Epoch(1)), vec![Epoch(1)]);
        assert_eq!(r.purge_retired(|_| true), vec![Epoch(2)]);
        assert!(r.key(Epoch(1)).is_none());
        let kek = Secret32::from_bytes([1; 32]);
        let back = Keyring::open(&r.seal(&kek, &mut rng), &r.store_id, &kek).unwrap();
        assert_eq!(back.current, Epoch(3));
        assert_eq!(back.epochs[&Epoch(1)].state, EpochState::Purged);
        assert!(back.key(Epoch(2)).is_none());
        assert!(back.key(Epoch(3)).is_some());
    }

    proptest::proptest! {
        /// Any keyring (rotated any number of times, partly retired and
        /// purged, with any member names) survives seal and open intact.
        #[test]
        fn seal_open_round_trips(seed in proptest::prelude::any::<u64>(), rotations in 0usize..6,
                                 retire in proptest::prelude::any::<bool>(), name in ".{0,40}") {
            let mut rng = SeededEntropy::from_u64(seed).stream("prop");
            let id = DeviceIdentity::generate(&mut rng);
            let mut r = Keyring::create(id, &name, Hlc { ms: seed, counter: 0 }, &mut rng);
            for _ in 0..rotations {
                r.rotate(&mut rng);
            }
            if retire {
                r.retire(|_| true);
                r.purge_retired(|e| e.0 % 2 == 1);
            }
            let kek = Secret32::random(&mut rng);
            let back = Keyring::open(&r.seal(&kek, &mut rng), &r.store_id, &kek).unwrap();
            proptest::prop_assert_eq!(back.current, r.current);
            proptest::prop_assert_eq!(&back.members, &r.members);
            proptest::prop_assert_eq!(back.epochs.len(), r.epochs.len());
            for (e, entry) in &r.epochs {
                let other = &back.epochs[e];
                proptest::prop_assert_eq!(other.state, entry.state);
                proptest::prop_assert_eq!(other.announcement, entry.announcement);
                proptest::prop_assert!(other.key == entry.key);
            }
        }
    }

    #[test]
    fn sealed_keyring_holds_no_key_bytes_in_clear() {
        let r = ring(3);
        let kek = Secret32::from_bytes([7; 32]);
        let mut rng = SeededEntropy::from_u64(4).stream("seal");
        let sealed = r.seal(&kek, &mut rng);
        for secret in [
            r.current_key().expose(),
            r.relay_token.expose(),
            r.index_key.secret().expose(),
        ] {
            assert!(!sealed.windows(32).any(|w| w == secret));
        }
    }
}
