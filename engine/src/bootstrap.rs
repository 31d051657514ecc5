//! Creating a store, loading one, and re-keying one from an export.
//!
//! Runs before the actor tree starts, so it writes the database directly:
//! the StorageWriter is the only writer *while the store is open*. Every
//! path checks everything it can (key, passphrase, store id) before it
//! writes, so a failed open leaves the store exactly as it was.

use std::path::PathBuf;

use persist_actors::{KeySet, meta};
use persist_core::env::Env;
use persist_core::export::ExportedKeys;
use persist_core::hlc::Hlc;
use persist_core::keyring::{Keyring, Member};
use persist_core::keys::{DeviceIdentity, Secret32};
use persist_core::membership;
use persist_core::{DeviceId, StoreId};
use persist_storage::{LocalDb, StorageError};
use rand_core::Rng;

use crate::error::OpenError;
use crate::kek::{self, KeySource};
use crate::store::StoreInfo;

/// The parts of the config bootstrap reads.
pub(crate) struct BootConfig {
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    pub(crate) encrypt: bool,
    pub(crate) key_source: KeySource,
    pub(crate) key_dir: PathBuf,
    /// Keys from an export, already unwrapped (before the database was
    /// opened, so a wrong passphrase or damaged export touches nothing).
    pub(crate) import: Option<ExportedKeys>,
    pub(crate) may_create: bool,
    /// What pairing with an invite brought: this device's identity (the
    /// one the handshake authenticated), the keys and the members.
    pub(crate) joined: Option<Joined>,
}

/// The outcome of pairing, for a new store.
pub(crate) struct Joined {
    pub(crate) identity: DeviceIdentity,
    pub(crate) keys: ExportedKeys,
    pub(crate) members: Vec<Member>,
    /// The invite's relay and pin ([`meta::JOINED_VIA`]).
    pub(crate) via: Vec<u8>,
}

/// What an open store starts from.
pub(crate) struct Boot {
    pub(crate) kek: Option<Secret32>,
    pub(crate) keys: KeySet,
    pub(crate) info: StoreInfo,
}

/// Creates, loads or re-keys the store in `db`.
pub(crate) fn bootstrap(db: &LocalDb, mut cfg: BootConfig, env: &Env) -> Result<Boot, OpenError> {
    let existing = read_existing(db, &cfg)?;
    if let Some(joined) = cfg.joined.take() {
        return match existing {
            None => create_joined(db, &cfg, env, joined),
            Some(found) => Err(OpenError::InviteIntoExistingStore {
                path: cfg.path.clone(),
                store: found.store_id,
                invite_store: joined.keys.store_id,
            }),
        };
    }
    let import = cfg.import.take();
    let cfg = &cfg;
    match (existing, import) {
        (None, _) if !cfg.may_create => Err(OpenError::NoStore {
            path: cfg.path.clone(),
        }),
        (None, import) => create(db, cfg, env, import),
        (Some(found), None) => load(cfg, found),
        (Some(found), Some(keys)) => {
            if keys.store_id != found.store_id {
                return Err(OpenError::ImportForOtherStore {
                    path: cfg.path.clone(),
                    store: found.store_id,
                    export: keys.store_id,
                });
            }
            // This device may already hold the store's keys (it imported
            // before, or created the store): then it takes from the export
            // only the epochs it lacks (a rotation made elsewhere).
            match open_keyring(cfg, &found) {
                Ok((ring, kek, location)) => merge(db, cfg, env, found, ring, kek, location, keys),
                Err(OpenError::Key(_) | OpenError::WrongKey { .. }) => {
                    rekey(db, cfg, env, found, keys)
                }
                Err(e) => Err(e),
            }
        }
    }
}

#[derive(Clone)]
struct Existing {
    store_id: StoreId,
    device_id: DeviceId,
    encrypted: bool,
    name: String,
    sealed_keyring: Option<Vec<u8>>,
}

fn corrupted(cfg: &BootConfig, detail: impl Into<String>) -> OpenError {
    OpenError::Corrupted {
        path: cfg.path.clone(),
        detail: detail.into(),
    }
}

fn storage(cfg: &BootConfig) -> impl Fn(StorageError) -> OpenError + '_ {
    move |e| corrupted(cfg, e.to_string())
}

fn read_existing(db: &LocalDb, cfg: &BootConfig) -> Result<Option<Existing>, OpenError> {
    let txn = db.begin_read().map_err(storage(cfg))?;
    let meta_of = |k: &str| txn.meta(k).map_err(storage(cfg));
    let Some(store_id) = meta_of(meta::STORE_ID)? else {
        return Ok(None);
    };
    let store_id = StoreId(
        store_id
            .try_into()
            .map_err(|_| corrupted(cfg, "store id is not 16 bytes"))?,
    );
    let device_id = DeviceId(
        meta_of(meta::DEVICE_ID)?
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupted(cfg, "device id missing"))?,
    );
    let encrypted = meta_of(meta::ENCRYPTED)?.as_deref() != Some(&[0]);
    if encrypted != cfg.encrypt {
        return Err(OpenError::EncryptionMismatch {
            path: cfg.path.clone(),
            stored: encrypted,
        });
    }
    let name = meta_of(meta::NAME)?
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    let sealed_keyring = meta_of(meta::KEYRING)?;
    if encrypted && sealed_keyring.is_none() {
        return Err(corrupted(cfg, "keyring missing"));
    }
    Ok(Some(Existing {
        store_id,
        device_id,
        encrypted,
        name,
        sealed_keyring,
    }))
}

fn load(cfg: &BootConfig, found: Existing) -> Result<Boot, OpenError> {
    let info = |key_location| StoreInfo {
        store_id: found.store_id,
        device_id: found.device_id,
        name: found.name.clone(),
        path: cfg.path.clone(),
        encrypted: found.encrypted,
        key_location,
    };
    if found.sealed_keyring.is_none() {
        return Ok(Boot {
            kek: None,
            keys: KeySet::plain(found.store_id, found.device_id),
            info: info(None),
        });
    }
    let (keyring, kek, location) = open_keyring(cfg, &found)?;
    Ok(Boot {
        kek: Some(kek),
        keys: KeySet::from_keyring(&keyring),
        info: info(Some(location)),
    })
}

/// Loads the device KEK and unseals the keyring of an encrypted store;
/// returns them with where the KEK lives.
fn open_keyring(
    cfg: &BootConfig,
    found: &Existing,
) -> Result<(Keyring, Secret32, String), OpenError> {
    let sealed = found
        .sealed_keyring
        .as_ref()
        .ok_or_else(|| corrupted(cfg, "keyring missing"))?;
    let (kek, location) = kek::load(&cfg.key_source, &cfg.key_dir, &found.store_id.to_string())?;
    let kek = Secret32::from_bytes(*kek.as_bytes());
    let keyring =
        Keyring::open(sealed, &found.store_id, &kek).map_err(|_| OpenError::WrongKey {
            path: cfg.path.clone(),
            location: location.to_string(),
        })?;
    if keyring.device_id() != found.device_id {
        return Err(corrupted(cfg, "keyring belongs to another device"));
    }
    Ok((keyring, kek, location.to_string()))
}

/// Adds the epochs of an export that this device's keyring lacks, and
/// stores the keyring if that changed it.
#[allow(clippy::too_many_arguments, reason = "one call site, all of it state")]
fn merge(
    db: &LocalDb,
    cfg: &BootConfig,
    env: &Env,
    found: Existing,
    mut ring: Keyring,
    kek: Secret32,
    location: String,
    keys: ExportedKeys,
) -> Result<Boot, OpenError> {
    let merge = ring.merge_export(keys).map_err(|e| {
        OpenError::Import(persist_core::export::ExportError::Invalid(match e {
            persist_core::keyring::KeyringError::Invalid(why) => why,
            _ => "inconsistent with this store's keyring",
        }))
    })?;
    if !merge.concurrent.is_empty() {
        tracing::info!(epochs = ?merge.concurrent,
            "the export holds keys of concurrent rotations to epochs this device has; kept them beside this device's");
    }
    if !merge.added.is_empty() || !merge.concurrent.is_empty() {
        let mut rng = env.entropy.stream("bootstrap");
        let mut txn = db.begin_write().map_err(storage(cfg))?;
        txn.set_meta(meta::KEYRING, &ring.seal(&kek, &mut rng))
            .map_err(storage(cfg))?;
        txn.commit().map_err(storage(cfg))?;
        tracing::info!(epochs = ?merge.added, concurrent = ?merge.concurrent,
            "took new epoch keys from the export");
    }
    Ok(Boot {
        kek: Some(kek),
        keys: KeySet::from_keyring(&ring),
        info: StoreInfo {
            store_id: found.store_id,
            device_id: found.device_id,
            name: found.name,
            path: cfg.path.clone(),
            encrypted: true,
            key_location: Some(location),
        },
    })
}

/// A new store: fresh keys, or the keys of an export on an empty directory.
fn create(
    db: &LocalDb,
    cfg: &BootConfig,
    env: &Env,
    import: Option<ExportedKeys>,
) -> Result<Boot, OpenError> {
    let mut rng = env.entropy.stream("bootstrap");
    let identity = DeviceIdentity::generate(&mut rng);
    let device_id = identity.device_id();
    let now = Hlc {
        ms: env.clock.now_ms(),
        counter: 0,
    };
    if !cfg.encrypt {
        if import.is_some() {
            return Err(OpenError::EncryptionMismatch {
                path: cfg.path.clone(),
                stored: false,
            });
        }
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let store_id = StoreId(id);
        let mut txn = db.begin_write().map_err(storage(cfg))?;
        write_identity(&mut txn, store_id, device_id, false, &cfg.name).map_err(storage(cfg))?;
        txn.commit().map_err(storage(cfg))?;
        return Ok(Boot {
            kek: None,
            keys: KeySet::plain(store_id, device_id),
            info: new_info(cfg, store_id, device_id, false, None),
        });
    }
    let imported = import.is_some();
    let ring = match import {
        Some(keys) => Keyring::from_export(identity, keys, &cfg.name, now),
        None => Keyring::create(identity, &cfg.name, now, &mut rng),
    };
    // A new store's id is new: a key already under it was not made for it.
    let kek = if imported {
        KekChoice::AdoptLeftover
    } else {
        KekChoice::New
    };
    let boot = seal_and_write(db, cfg, &ring, kek, None, &mut rng)?;
    if imported {
        tracing::info!(store = %ring.store_id, device = %device_id,
            "joined a store from a key export; its records arrive with sync");
    } else {
        tracing::info!(store = %ring.store_id, device = %device_id, "created a new store");
    }
    Ok(boot)
}

/// The id of the store in `db`, if it holds one.
pub(crate) fn stored_store(
    db: &LocalDb,
    path: &std::path::Path,
) -> Result<Option<StoreId>, OpenError> {
    let bad = |detail: String| OpenError::Corrupted {
        path: path.to_path_buf(),
        detail,
    };
    let txn = db.begin_read().map_err(|e| bad(e.to_string()))?;
    let Some(id) = txn.meta(meta::STORE_ID).map_err(|e| bad(e.to_string()))? else {
        return Ok(None);
    };
    let id: [u8; 16] = id
        .try_into()
        .map_err(|_| bad("store id is not 16 bytes".into()))?;
    Ok(Some(StoreId(id)))
}

/// Where `db`'s store was joined by invite ([`meta::JOINED_VIA`]), if it
/// is a join whose first open stopped before it wrote this device's member
/// announcement: the keys are stored and this device's key opens them, but
/// the store never came up. Such a join is resumed by opening the store
/// (with an invite naming the same relay); anything else the directory
/// holds is left to its error.
pub(crate) fn unfinished_join(
    db: &LocalDb,
    cfg: &BootConfig,
) -> Result<Option<Vec<u8>>, OpenError> {
    let Some(found) = read_existing(db, cfg)? else {
        return Ok(None);
    };
    let txn = db.begin_read().map_err(storage(cfg))?;
    let Some(via) = txn.meta(meta::JOINED_VIA).map_err(storage(cfg))? else {
        return Ok(None);
    };
    if !found.encrypted {
        return Ok(None);
    }
    let (ring, _, _) = open_keyring(cfg, &found)?;
    // A device announces itself at every open until the announcement is
    // stored, and nothing else writes at its path.
    let locator = KeySet::from_keyring(&ring).locator(&membership::member_path(&found.device_id));
    let announced = txn.record(&locator).map_err(storage(cfg))?.is_some();
    Ok((!announced).then_some(via))
}

/// A new store joined with an invite: this device's identity, the
/// store's keys and its members from the grant.
fn create_joined(
    db: &LocalDb,
    cfg: &BootConfig,
    env: &Env,
    joined: Joined,
) -> Result<Boot, OpenError> {
    if !cfg.encrypt {
        return Err(OpenError::EncryptionMismatch {
            path: cfg.path.clone(),
            stored: true,
        });
    }
    let mut rng = env.entropy.stream("bootstrap");
    let now = Hlc {
        ms: env.clock.now_ms(),
        counter: 0,
    };
    let mut ring = Keyring::from_export(joined.identity, joined.keys, &cfg.name, now);
    // This device's entry as its inviter recorded it (added by the inviter).
    if let Some(me) = joined
        .members
        .iter()
        .find(|m| m.device_id == ring.device_id())
    {
        ring.members = vec![me.clone()];
    }
    for member in joined.members {
        ring.add_member(member);
    }
    let via = Some(joined.via.as_slice());
    let boot = seal_and_write(db, cfg, &ring, KekChoice::AdoptLeftover, via, &mut rng)?;
    tracing::info!(store = %ring.store_id, device = %ring.device_id(),
        "joined a store with an invite; its records arrive with sync");
    Ok(boot)
}

/// A copied database opened on a new device: this device takes its own
/// identity and KEK and the store's keys from the export.
fn rekey(
    db: &LocalDb,
    cfg: &BootConfig,
    env: &Env,
    found: Existing,
    keys: ExportedKeys,
) -> Result<Boot, OpenError> {
    let mut rng = env.entropy.stream("bootstrap");
    let identity = DeviceIdentity::generate(&mut rng);
    let now = Hlc {
        ms: env.clock.now_ms(),
        counter: 0,
    };
    let name = if cfg.name.is_empty() {
        found.name
    } else {
        cfg.name.clone()
    };
    let ring = Keyring::from_export(identity, keys, &name, now);
    let cfg_named = BootConfig {
        path: cfg.path.clone(),
        name,
        encrypt: true,
        key_source: cfg.key_source.clone(),
        key_dir: cfg.key_dir.clone(),
        import: None,
        may_create: false,
        joined: None,
    };
    let boot = seal_and_write(db, &cfg_named, &ring, KekChoice::New, None, &mut rng)?;
    tracing::info!(store = %ring.store_id, device = %ring.device_id(),
        "opened a copied store with imported keys under a new device identity");
    Ok(boot)
}

/// Whether [`seal_and_write`] may seal under a device key it finds
/// already stored for the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KekChoice {
    /// Only a key it makes; an existing one is an error.
    New,
    /// A key already where this store's key goes is, most likely, one an
    /// earlier join of this store made before it failed or crashed (the
    /// key is stored before the keyring, and the database holds no store):
    /// seal under it rather than refuse, so that the join can be retried.
    /// Nothing is replaced, so whatever else that key seals still opens.
    AdoptLeftover,
}

/// Makes a KEK (or, see [`KekChoice`], takes the one an unfinished join
/// left), seals `ring` under it, and writes the identity and keyring (and
/// for a join by invite, where it paired: `joined_via`).
/// The KEK is stored first, so a failure leaves at most a key that a retry
/// of a join adopts.
fn seal_and_write(
    db: &LocalDb,
    cfg: &BootConfig,
    ring: &Keyring,
    choice: KekChoice,
    joined_via: Option<&[u8]>,
    rng: &mut persist_core::env::RngStream,
) -> Result<Boot, OpenError> {
    let account = ring.store_id.to_string();
    let (kek, location) = match kek::create(&cfg.key_source, &cfg.key_dir, &account, rng) {
        Err(kek::KekError::AlreadyExists { location }) if choice == KekChoice::AdoptLeftover => {
            tracing::info!(%location,
                "a device key for this store is already there, left by an earlier join that \
                 did not finish; sealing the keys under it");
            kek::load(&cfg.key_source, &cfg.key_dir, &account)?
        }
        made => made?,
    };
    let kek = Secret32::from_bytes(*kek.as_bytes());
    let mut txn = db.begin_write().map_err(storage(cfg))?;
    txn.set_meta(meta::KEYRING, &ring.seal(&kek, rng))
        .map_err(storage(cfg))?;
    write_identity(&mut txn, ring.store_id, ring.device_id(), true, &cfg.name)
        .map_err(storage(cfg))?;
    if let Some(via) = joined_via {
        txn.set_meta(meta::JOINED_VIA, via).map_err(storage(cfg))?;
    }
    txn.commit().map_err(storage(cfg))?;
    Ok(Boot {
        keys: KeySet::from_keyring(ring),
        info: new_info(
            cfg,
            ring.store_id,
            ring.device_id(),
            true,
            Some(location.to_string()),
        ),
        kek: Some(kek),
    })
}

fn write_identity(
    txn: &mut persist_storage::WriteTxn,
    store_id: StoreId,
    device_id: DeviceId,
    encrypted: bool,
    name: &str,
) -> Result<(), StorageError> {
    txn.set_meta(meta::STORE_ID, store_id.as_bytes())?;
    txn.set_meta(meta::DEVICE_ID, device_id.as_bytes())?;
    txn.set_meta(meta::ENCRYPTED, &[u8::from(encrypted)])?;
    txn.set_meta(meta::NAME, name.as_bytes())
}

fn new_info(
    cfg: &BootConfig,
    store_id: StoreId,
    device_id: DeviceId,
    encrypted: bool,
    key_location: Option<String>,
) -> StoreInfo {
    StoreInfo {
        store_id,
        device_id,
        name: cfg.name.clone(),
        path: cfg.path.clone(),
        encrypted,
        key_location,
    }
}
