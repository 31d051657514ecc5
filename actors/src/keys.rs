//! The key material the Sealer and readers need, handed out by KeyManager.
//!
//! A [`KeySet`] holds the store's data keys and index key but never the
//! device KEK, which stays inside KeyManager. It is immutable: a change
//! (rotation, later) publishes a new one.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use ed25519_dalek::{SigningKey, VerifyingKey};
use persist_core::envelope::{self, Algorithm, Envelope, OpenError, SealContext};
use persist_core::hlc::Hlc;
use persist_core::keyring::{Keyring, Revocation};
use persist_core::keys::{IndexKey, Secret32, plain_locator};
use persist_core::protocol::AccessKey;
use persist_core::record::Record;
use persist_core::{DeviceId, Epoch, Locator, StoreId};

/// The current [`KeySet`], swapped by KeyManager when keys change and read
/// by the Sealer, the Rotator and the engine's readers.
#[derive(Clone)]
pub struct KeyHandle {
    keys: Arc<RwLock<Arc<KeySet>>>,
    /// Moves on (a counter) at every swap.
    changes: Arc<watch::Sender<u64>>,
}

impl KeyHandle {
    /// A handle holding `keys`.
    pub fn new(keys: KeySet) -> Self {
        Self {
            keys: Arc::new(RwLock::new(Arc::new(keys))),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    /// The current keys.
    pub fn current(&self) -> Arc<KeySet> {
        // A poisoned lock still holds a whole Arc: the writer only swaps it.
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A channel that moves on whenever the keys are swapped, for whoever
    /// must re-check something derived from them (a device serving its
    /// store re-checks its clients' credential).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(crate) fn set(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What a store needs to seal and open records.
pub struct KeySet {
    /// The store.
    pub store_id: StoreId,
    /// This device.
    pub device_id: DeviceId,
    /// Encryption keys, or `None` for an `encrypt(false)` store.
    pub crypto: Option<CryptoKeys>,
    /// The Ed25519 keys of the store's known members, which sync ingest
    /// checks envelope signatures against.
    pub members: BTreeMap<DeviceId, VerifyingKey>,
    /// The revoked members: ingest refuses what they signed after their
    /// revocation.
    pub revoked: BTreeMap<DeviceId, Revocation>,
    /// The credential a remote checks (derived from the relay token), or
    /// `None` for a store that does not encrypt.
    pub access: Option<AccessKey>,
    /// The credential of the relay token a revocation chose, while the
    /// relay has not been switched to it: presented when `access` is
    /// refused (the switch happened since).
    pub access_next: Option<AccessKey>,
}

/// Secret keys of an encrypted store.
pub struct CryptoKeys {
    index: IndexKey,
    /// Every key of each epoch, the one new writes use first (more than one
    /// after concurrent rotations: see `persist_core::keyring::EpochEntry`).
    epochs: BTreeMap<Epoch, Vec<Secret32>>,
    current: Epoch,
    signing: SigningKey,
}

impl KeySet {
    /// The keys of an encrypted store, copied out of its keyring.
    pub fn from_keyring(ring: &Keyring) -> Self {
        let epochs = ring
            .epochs
            .iter()
            .filter(|(_, entry)| entry.key.is_some())
            .map(|(e, entry)| (*e, entry.keys().map(|(_, k)| k.duplicate()).collect()))
            .collect();
        let members = ring
            .members
            .iter()
            .filter_map(|m| {
                let key = VerifyingKey::from_bytes(&m.ed25519_public).ok()?;
                Some((m.device_id, key))
            })
            .collect();
        Self {
            store_id: ring.store_id,
            device_id: ring.device_id(),
            members,
            revoked: ring.revoked.iter().map(|r| (r.device_id, *r)).collect(),
            access: Some(AccessKey::derive(&ring.relay_token, &ring.store_id)),
            access_next: ring
                .relay_token_next
                .as_ref()
                .map(|next| AccessKey::derive(&next.token, &ring.store_id)),
            crypto: Some(CryptoKeys {
                index: IndexKey::new(ring.index_key.secret().duplicate()),
                epochs,
                current: ring.current,
                signing: SigningKey::from_bytes(ring.device.ed25519_secret().expose()),
            }),
        }
    }

    /// The keys of a store that does not encrypt.
    pub fn plain(store_id: StoreId, device_id: DeviceId) -> Self {
        Self {
            store_id,
            device_id,
            crypto: None,
            members: BTreeMap::new(),
            revoked: BTreeMap::new(),
            access: None,
            access_next: None,
        }
    }

    /// The locator of `path`.
    pub fn locator(&self, path: &str) -> Locator {
        match &self.crypto {
            Some(c) => c.index.locator(&self.store_id, path),
            None => plain_locator(&self.store_id, path),
        }
    }

    /// Whether this device holds the key of `epoch`.
    pub fn has_epoch(&self, epoch: Epoch) -> bool {
        self.crypto
            .as_ref()
            .is_some_and(|c| c.epochs.contains_key(&epoch))
    }

    /// Whether a write `origin` stamped `hlc` came after `origin`'s
    /// revocation: such a write is refused on ingest, hidden from reads,
    /// and forgotten where it was taken before the revocation was known.
    pub fn revoked_write(&self, origin: &DeviceId, hlc: Hlc) -> bool {
        self.revoked.get(origin).is_some_and(|r| r.disowns(hlc))
    }

    /// The verifying key of member `device`, if known.
    pub fn member_key(&self, device: &DeviceId) -> Option<&VerifyingKey> {
        self.members.get(device)
    }

    /// The epochs whose keys this device holds, oldest first.
    pub fn epochs(&self) -> Vec<Epoch> {
        self.crypto
            .as_ref()
            .map(|c| c.epochs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// How many data keys this device holds: epochs, and the keys of
    /// concurrent rotations beside them.
    pub fn key_count(&self) -> usize {
        self.crypto
            .as_ref()
            .map_or(0, |c| c.epochs.values().map(Vec::len).sum())
    }

    /// Keys held beyond one per epoch: those of concurrent rotations to an
    /// epoch number this device also holds a key of.
    pub fn concurrent_key_count(&self) -> usize {
        self.crypto.as_ref().map_or(0, |c| {
            c.epochs
                .values()
                .map(|keys| keys.len().saturating_sub(1))
                .sum()
        })
    }

    /// The epoch new writes are sealed under (0 for plain stores).
    pub fn current_epoch(&self) -> Epoch {
        self.crypto.as_ref().map_or(Epoch(0), |c| c.current)
    }

    /// The sealing context for the current epoch, if the store encrypts.
    pub fn seal_context(&self) -> Option<SealContext<'_>> {
        self.crypto.as_ref().map(|c| SealContext {
            store_id: self.store_id,
            epoch: c.current,
            // `from_keyring` copies every keyed epoch, its own key first,
            // and the keyring guarantees the current one has a key.
            data_key: &c.epochs[&c.current][0],
            signing_key: &c.signing,
            signer: self.device_id,
        })
    }

    /// Opens an envelope stored at `locator`: checks the AEAD tag (or, for
    /// plain stores, the format), the locator and the version.
    pub fn open(&self, locator: &Locator, bytes: &[u8]) -> Result<Record, OpenRecordError> {
        self.open_inner(locator, bytes, None)
    }

    /// Like [`KeySet::open`], for a read of `path` whose locator the caller
    /// just computed from it: the record's path is compared with `path`
    /// instead of hashed again.
    pub fn open_path(
        &self,
        path: &str,
        locator: &Locator,
        bytes: &[u8],
    ) -> Result<Record, OpenRecordError> {
        self.open_inner(locator, bytes, Some(path))
    }

    fn open_inner(
        &self,
        locator: &Locator,
        bytes: &[u8],
        path: Option<&str>,
    ) -> Result<Record, OpenRecordError> {
        let env = Envelope::parse(bytes).map_err(OpenError::from)?;
        // With the path known, the record belongs here exactly when its
        // path is that path; anything else maps to a locator that differs.
        let locator_of = |p: &str| match path {
            Some(known) if p == known => *locator,
            Some(_) => Locator(locator.0.map(|b| !b)),
            None => self.locator(p),
        };
        match (&self.crypto, env.header.algorithm) {
            (Some(c), Algorithm::Aes256GcmEd25519) => {
                let epoch = env.header.epoch;
                let keys = c
                    .epochs
                    .get(&epoch)
                    .ok_or(OpenRecordError::UnknownEpoch(epoch))?;
                // Most epochs have one key. After concurrent rotations the
                // header's number names several, and only the right one
                // authenticates the envelope.
                let mut opened = Err(OpenError::Integrity);
                for key in keys {
                    opened = envelope::open(&env, &self.store_id, locator, key, locator_of);
                    if !matches!(opened, Err(OpenError::Integrity)) {
                        break;
                    }
                }
                Ok(opened?)
            }
            (None, _) => Ok(envelope::open_plain(&env, locator, locator_of)?),
            (Some(_), found) => Err(OpenError::WrongAlgorithm {
                found,
                expected: Algorithm::Aes256GcmEd25519,
            }
            .into()),
        }
    }
}

/// A stored envelope that could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenRecordError {
    /// Sealed under an epoch whose key this device does not hold.
    #[error("record is sealed under epoch {0}, whose key this device does not hold")]
    UnknownEpoch(Epoch),
    /// The envelope failed a check.
    #[error(transparent)]
    Envelope(#[from] OpenError),
}
