//! The store: open, read, write, watch, close.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use persist_actors::ingest::{IngestContext, OnApplied};
use persist_actors::peer_session::{PeerMsg, SessionArgs, SyncState};
use persist_actors::rotator::RotationProgress;
use persist_actors::sealer::SealerMsg;
use persist_actors::{
    CommitReport, KeyHandle, KeySet, OpenRecordError, Routes, StoreArgs, StoreSupervisor,
    SupervisorMsg, WriteOp,
};
use persist_core::env::Env;
use persist_core::export::{ExportedKeys, KdfParams};
use persist_core::keyring::EpochState;
use persist_core::membership;
use persist_core::record::{VALUE_BYTES_MAX, is_system_path, validate_path};
use persist_core::{DeviceId, Epoch, Locator, StoreId};
use persist_storage::{LocalDb, Row};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::bootstrap::{BootConfig, Joined, bootstrap, stored_store, unfinished_join};
use crate::config::Config;
use crate::courier::{Courier, CourierArgs};
use crate::error::{OpenError, ReadError, SyncError, WriteError};
use crate::pairing::{self, Responders};
use crate::serve::{ServeError, ServeHandle, ServeParts};
use crate::sync::{Remote, SyncConfig};
use crate::sync::{SyncReport, SyncStatus};
use crate::{codec, env};
use persist_core::invite::{Invite, InviteError};
use persist_core::keys::DeviceIdentity;
use persist_transport::tls::CertPin;

/// File name of the database inside a store directory.
pub const DB_FILE: &str = "persist.redb";

/// Most writes in flight (sent, not yet acknowledged) per store. Past it,
/// writers wait: this bounds the actors' mailboxes.
pub const WRITES_IN_FLIGHT_MAX: usize = 4096;

/// How long an open that failed after its actors started waits for the
/// last of their tasks to let go of the database, so that opening again
/// at once finds it free; tasks end within a scheduling round or two.
const DB_RELEASE_WAIT_MAX: Duration = Duration::from_secs(5);
/// The poll interval of that wait.
const DB_RELEASE_POLL: Duration = Duration::from_millis(10);

/// Most changes buffered for a slow watcher before it is told it lagged.
pub const WATCH_BUFFER_MAX: usize = 1024;

/// Records read per page when listing.
const LIST_PAGE_RECORDS: usize = 1024;

/// How long [`Store::sync_now`] waits for the key courier's round after
/// the sync itself: long enough for a relay switch's exchange, short
/// enough that an unanswering relay does not hold the call.
pub const COURIER_ROUND_WAIT: Duration = Duration::from_secs(30);

/// An open store. Cheap to clone; all clones share one actor tree.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<LocalDb>,
    keys: KeyHandle,
    progress: Arc<watch::Sender<RotationProgress>>,
    export_kdf: KdfParams,
    read_only: bool,
    routes: Routes,
    supervisor: ActorRef<SupervisorMsg>,
    supervisor_done: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    changes: broadcast::Sender<Change>,
    writes_in_flight: Semaphore,
    info: StoreInfo,
    sync: Option<Arc<watch::Sender<SyncState>>>,
    committed: Arc<watch::Sender<u64>>,
    ingest: IngestContext,
    /// The answerers of this device's open invites (with sync only).
    responders: Option<Responders>,
    /// Carries epoch keys to and from the other members (with sync only).
    courier: Option<Courier>,
    /// See [`SyncConfig::relay_switch_grace`] (with sync only).
    relay_switch_grace: Option<Duration>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("info", &self.inner.info)
            .field("read_only", &self.inner.read_only)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A store dropped without `close`: acknowledged writes are already
        // durable; stop the actors so they do not outlive it.
        if let Some(r) = &self.responders {
            r.stop();
        }
        if let Some(c) = &self.courier {
            c.stop();
        }
        self.supervisor.stop_children(None);
        self.supervisor.stop(None);
    }
}

/// Facts about an open store.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreInfo {
    /// The store.
    pub store_id: StoreId,
    /// This device.
    pub device_id: DeviceId,
    /// This device's name.
    pub name: String,
    /// The store directory.
    pub path: PathBuf,
    /// Whether records are encrypted.
    pub encrypted: bool,
    /// Where the device key lives (`None` for stores that do not encrypt).
    pub key_location: Option<String>,
}

/// A snapshot of a store's state, as `persist status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// The store id, hex.
    pub store_id: String,
    /// This device's id, hex.
    pub device_id: String,
    /// This device's name.
    pub name: String,
    /// Live (not deleted) records the app wrote (the store's own member
    /// records are not counted).
    pub records: u64,
    /// Whether records are encrypted.
    pub encrypted: bool,
    /// The epoch new writes use.
    pub current_epoch: u32,
    /// Every epoch with its state and how many stored records (deletions
    /// included) it seals.
    pub epochs: Vec<EpochStatus>,
    /// Where the device key lives.
    pub key_source: Option<String>,
    /// Background re-encryption after a rotation.
    pub rotation: RotationStatus,
    /// The switch of the relay to the access token a revocation chose,
    /// while it is pending.
    pub relay_switch: Option<RelaySwitchStatus>,
}

/// A pending switch of the relay to a revocation's new access token (see
/// [`SyncConfig::relay_switch_grace`]). Until it happens the relay still
/// admits the revoked device, though it reads nothing new and what it
/// writes is refused by every member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RelaySwitchStatus {
    /// The revocation's epoch.
    pub epoch: u32,
    /// Whether this device made the revocation, and so switches the relay.
    /// Another member takes the new token when it finds the relay switched.
    pub by_this_device: bool,
    /// The members (device ids) that have not acknowledged the
    /// revocation's keys to this device since it opened.
    pub waiting_for: Vec<String>,
    /// When the switch happens at the latest (ms since the epoch), on the
    /// revoking device with sync configured: acknowledged or not.
    pub due_ms: Option<u64>,
}

/// Progress of the background re-encryption after a rotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RotationStatus {
    /// Whether records under older epochs remain to be resealed.
    pub active: bool,
    /// Records resealed since the store was opened.
    pub done: u64,
    /// `done` plus the records still to reseal.
    pub total: u64,
}

impl From<RotationProgress> for RotationStatus {
    fn from(p: RotationProgress) -> Self {
        Self {
            active: p.active,
            done: p.done,
            total: p.total,
        }
    }
}

/// One epoch in a [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EpochStatus {
    /// The epoch number.
    pub epoch: u32,
    /// `current`, `rotating`, `retired` or `purged`.
    pub state: &'static str,
    /// Records sealed under it.
    pub records: u64,
    /// Its announcement hash (hex), public: of the keys concurrent
    /// rotations on several devices made for this number, the one new
    /// writes use, the same on every member.
    pub announcement: String,
    /// How many keys of this number the device holds: 1, or more after
    /// concurrent rotations (each opens what was sealed under it).
    pub keys: usize,
    /// The other members that acknowledged holding its key to this device
    /// (device ids): key parcels go out until each member has.
    pub acknowledged_by: Vec<String>,
    /// For a rotating epoch: the members whose acknowledgement of a newer
    /// epoch its retirement waits for, besides its records being resealed
    /// (device ids; empty otherwise).
    pub retire_waits_for: Vec<String>,
    /// When it retires without them (ms since the Unix epoch), if known
    /// (see [`SyncConfig::retire_grace`](crate::SyncConfig::retire_grace)).
    pub retire_due_ms: Option<u64>,
}

/// A change seen by [`Store::watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// `path` was set.
    Put {
        /// The path.
        path: String,
        /// The encoded value; decode with [`Change::value`].
        value: Vec<u8>,
    },
    /// `path` was deleted.
    Delete {
        /// The path.
        path: String,
    },
}

impl Change {
    /// The path that changed.
    pub fn path(&self) -> &str {
        match self {
            Change::Put { path, .. } | Change::Delete { path } => path,
        }
    }

    /// The new value decoded as `T`, or `None` for a delete.
    pub fn value<T: DeserializeOwned>(&self) -> Result<Option<T>, ReadError> {
        match self {
            Change::Put { path, value } => decode_value(path, value).map(Some),
            Change::Delete { .. } => Ok(None),
        }
    }
}

/// A watcher fell behind and missed changes; re-read what it cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the watcher fell behind and missed {missed} changes; re-read the paths it watches")]
pub struct Lagged {
    /// How many changes were missed.
    pub missed: u64,
}

/// Writes applied together, atomically: all or none become durable.
#[must_use = "a batch does nothing until committed"]
pub struct Batch {
    store: Store,
    ops: Vec<WriteOp>,
    error: Option<WriteError>,
}

impl Batch {
    /// Adds a put.
    pub fn put<T: Serialize + ?Sized>(&mut self, path: &str, value: &T) -> &mut Self {
        if self.error.is_none() {
            match encode_op(path, value) {
                Ok(op) => self.ops.push(op),
                Err(e) => self.error = Some(e),
            }
        }
        self
    }

    /// Adds a delete.
    pub fn delete(&mut self, path: &str) -> &mut Self {
        if self.error.is_none() {
            match validate_path(path) {
                Ok(()) => self.ops.push(WriteOp::Delete {
                    path: path.to_owned(),
                }),
                Err(e) => self.error = Some(e.into()),
            }
        }
        self
    }

    /// How many writes the batch holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Commits every write in one durable transaction.
    pub async fn commit(self) -> Result<(), WriteError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.ops.is_empty() {
            return Ok(());
        }
        self.store.write(self.ops).await
    }
}

impl Store {
    /// Opens the store at `config.path`, creating it if the directory holds
    /// none.
    ///
    /// A new encrypted store gets a fresh device identity, store id, data
    /// key and index key, and a new device key (KEK) in the OS keychain or
    /// a keyfile; an existing one loads its KEK and unseals its keyring.
    pub async fn open(config: Config) -> Result<Store, OpenError> {
        let mut env = config.env.clone().unwrap_or_else(env::system);
        if let Some(faults) = &config.faults {
            env.faults = faults.clone();
        }
        let dir = config.path.clone();
        let key_dir = config.default_key_dir();
        let Config {
            backend,
            name,
            encrypt,
            key_source,
            max_clock_drift,
            import,
            export_kdf,
            read_only,
            create_if_missing,
            mut sync,
            invite,
            invite_timeout,
            ..
        } = config;
        if read_only && import.is_some() {
            return Err(OpenError::ReadOnly(
                "importing keys writes to the store; open it without read_only()".into(),
            ));
        }
        let may_create = create_if_missing && !read_only;
        let db_path = dir.join(DB_FILE);
        let file_existed = backend.is_some() || db_path.exists();
        if !may_create && !file_existed {
            return Err(OpenError::NoStore { path: dir });
        }
        // Read and checked first, like an export: a damaged or expired
        // code must not touch the database.
        let invite = match invite {
            None => None,
            Some(code) => Some(prepare_invite(
                &code,
                read_only,
                import.is_some(),
                &mut sync,
                &env,
            )?),
        };
        // Unwrapped first: a wrong passphrase or a damaged export must not
        // even open (and so touch) the database.
        let import = match import {
            Some((text, pass)) => {
                Some(ExportedKeys::unwrap(&text, &pass).map_err(OpenError::Import)?)
            }
            None => None,
        };
        ensure_dir(&dir)?;
        let db = Arc::new(LocalDb::open(&db_path, backend)?);
        let booted = async {
            let mut boot_config = BootConfig {
                path: dir.clone(),
                name,
                encrypt,
                key_source,
                key_dir,
                import,
                may_create,
                joined: None,
            };
            if let Some((invite, remote)) = &invite {
                boot_config.joined =
                    join(&db, &boot_config, invite, remote, &env, invite_timeout).await?;
            }
            bootstrap(&db, boot_config, &env)
        };
        let boot = match booted.await {
            Ok(boot) => boot,
            Err(e) => {
                if !file_existed {
                    // A store that failed to come into being leaves no file
                    // behind that a later open would take for an empty store.
                    drop(db);
                    if let Err(rm) = std::fs::remove_file(&db_path) {
                        tracing::warn!(path = %db_path.display(), error = %rm,
                            "could not remove the database of a failed create");
                    }
                }
                return Err(e);
            }
        };
        let (hlc_mark, seq_mark) =
            persist_actors::read_marks(&db).map_err(|e| OpenError::Corrupted {
                path: dir.clone(),
                detail: e.to_string(),
            })?;
        let last_change = db
            .begin_read()
            .and_then(|t| t.last_change_seq())
            .map_err(|e| OpenError::Corrupted {
                path: dir.clone(),
                detail: e.to_string(),
            })?;
        let committed = Arc::new(watch::channel(last_change).0);
        let (changes, _) = broadcast::channel(WATCH_BUFFER_MAX);
        let routes = Routes::default();
        let max_drift_ms = u64::try_from(max_clock_drift.as_millis()).unwrap_or(u64::MAX);
        let keys = KeyHandle::new(boot.keys);
        let ingest = IngestContext {
            db: db.clone(),
            keys: keys.clone(),
            routes: routes.clone(),
            clock: env.clock.clone(),
            max_drift_ms,
            on_applied: watch_feed(changes.clone()),
        };
        let encrypted = keys.current().access.is_some();
        let session = match &sync {
            None => None,
            Some(_) if read_only => None,
            Some(_) if !encrypted => return Err(OpenError::SyncNeedsEncryption),
            Some(sync) => Some(SessionArgs {
                db: db.clone(),
                store_id: boot.info.store_id,
                device_id: boot.info.device_id,
                admission: sync.remote.admission_secret(),
                keys: keys.clone(),
                routes: routes.clone(),
                connector: sync.remote.connector(),
                clock: env.clock.clone(),
                entropy: env.entropy.clone(),
                faults: env.faults.clone(),
                max_drift_ms,
                committed: committed.clone(),
                on_applied: ingest.on_applied.clone(),
                status: Arc::new(watch::channel(SyncState::default()).0),
            }),
        };
        let sync_status = session.as_ref().map(|s| s.status.clone());
        let responders = match (&sync, &session) {
            (Some(sync), Some(_)) => {
                Some(Responders::new(&sync.remote, routes.clone(), env.clone()))
            }
            _ => None,
        };
        let courier_args = match (&sync, &session) {
            (Some(sync), Some(session)) => Some(CourierArgs {
                remote: sync.remote.clone(),
                store: session.store_id,
                device: session.device_id,
                keys: keys.clone(),
                routes: routes.clone(),
                clock: session.clock.clone(),
                relay_switch_grace: sync.relay_switch_grace,
                sync: session.status.subscribe(),
            }),
            _ => None,
        };
        let (progress, _) = watch::channel(RotationProgress::default());
        let progress = Arc::new(progress);
        let args = StoreArgs {
            db: db.clone(),
            env,
            store_id: boot.info.store_id,
            kek: boot.kek.map(Arc::new),
            keys: keys.clone(),
            progress: progress.clone(),
            hlc_mark,
            seq_mark,
            max_drift_ms,
            routes: routes.clone(),
            read_only,
            committed: committed.clone(),
            sync: session,
            retire_grace_ms: u64::try_from(
                sync.as_ref()
                    .map_or(crate::sync::RETIRE_GRACE, |s| s.retire_grace)
                    .as_millis(),
            )
            .unwrap_or(u64::MAX),
        };
        let (supervisor, supervisor_done) = match Actor::spawn(None, StoreSupervisor, args).await {
            Ok(spawned) => spawned,
            Err(e) => {
                // Children that started before one failed still hold the
                // database for a moment.
                drop(ingest);
                await_release(&db).await;
                return Err(OpenError::Start(e.to_string()));
            }
        };
        let courier = courier_args.map(Courier::start);
        tracing::info!(
            store = %boot.info.store_id,
            device = %boot.info.device_id,
            key = boot.info.key_location.as_deref().unwrap_or("none (not encrypted)"),
            "store open"
        );
        let store = Store {
            inner: Arc::new(Inner {
                db,
                keys,
                progress,
                routes,
                supervisor,
                supervisor_done: std::sync::Mutex::new(Some(supervisor_done)),
                changes,
                writes_in_flight: Semaphore::new(WRITES_IN_FLIGHT_MAX),
                info: boot.info,
                export_kdf,
                read_only,
                sync: sync_status,
                committed,
                ingest,
                responders,
                courier,
                relay_switch_grace: sync.as_ref().map(|s| s.relay_switch_grace),
            }),
        };
        if store.inner.sync.is_some()
            && let Err(e) = store.announce().await
        {
            // Stopped before the error returns, so that a retry finds the
            // database free; the next open writes the entry (a join
            // resumes: see `join`).
            let db = store.inner.db.clone();
            let _ = store.close().await;
            await_release(&db).await;
            return Err(OpenError::Start(format!(
                "could not record this device's member entry for sync: {e}; opening again \
                 retries it"
            )));
        }
        if let Some(responders) = &store.inner.responders {
            responders.resume().await;
        }
        Ok(store)
    }

    /// Writes this device's member announcement (its public keys, for the
    /// other devices to check its signatures) unless it is stored already.
    async fn announce(&self) -> Result<(), WriteError> {
        let keys = self.inner.keys.current();
        let path = membership::member_path(&self.inner.info.device_id);
        let stored = self
            .inner
            .db
            .begin_read()
            .and_then(|t| t.record(&keys.locator(&path)))
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        if stored.is_some() {
            return Ok(());
        }
        let Some(km) = self.inner.routes.key_manager() else {
            return Err(WriteError::Closed);
        };
        let own = km
            .call(persist_actors::key_manager::KeyManagerMsg::OwnMember, None)
            .await
            .map_err(|_| WriteError::Closed)?;
        let CallResult::Success(Some(member)) = own else {
            return Err(WriteError::Closed);
        };
        self.write(vec![WriteOp::Put {
            path,
            value: membership::encode_member(&member),
        }])
        .await
    }

    /// Writes the record of `revocation`, made by this device, for the
    /// other members and those that join later (see
    /// [`persist_core::membership`]).
    pub(crate) async fn record_revocation(
        &self,
        revocation: &persist_core::keyring::Revocation,
    ) -> Result<(), WriteError> {
        self.write(vec![WriteOp::Put {
            path: membership::revocation_path(&revocation.device_id),
            value: membership::encode_revocation(revocation),
        }])
        .await
    }

    /// The revocation of `device`, if this device made it and the store
    /// lacks its record (writing the record failed after the revocation).
    /// A revocation learned from another member is that member's to
    /// record: members refuse a record whose signer is not its revoker.
    pub(crate) fn unrecorded_revocation(
        &self,
        device: DeviceId,
    ) -> Result<Option<persist_core::keyring::Revocation>, ReadError> {
        let keys = self.inner.keys.current();
        let Some(revocation) = keys.revoked.get(&device).filter(|r| r.by == keys.device_id) else {
            return Ok(None);
        };
        let locator = keys.locator(&membership::revocation_path(&device));
        let txn = self.inner.db.begin_read().map_err(storage_read_error)?;
        let recorded = txn
            .record(&locator)
            .map_err(storage_read_error)?
            .is_some_and(|row| !row.tombstone);
        Ok((!recorded).then_some(*revocation))
    }

    /// Pushes every local change and pulls every remote one, once, and
    /// says how many went each way. Sync also runs in the background; this
    /// is for when the caller wants to know it is done. It also has the key
    /// courier run a round (key parcels to and from the other members, and
    /// a pending relay switch) and waits for it, at most
    /// [`COURIER_ROUND_WAIT`]; a round that fails is retried in the
    /// background and does not fail the sync.
    pub async fn sync_now(&self) -> Result<SyncReport, SyncError> {
        if self.inner.sync.is_none() {
            return Err(SyncError::NotConfigured);
        }
        let session = self.inner.routes.peer_session().ok_or(SyncError::Closed)?;
        // Key parcels and acknowledgements are exchanged too, in a round
        // that runs beside the sync and is waited for after it (bounded:
        // the round's own conversation with the relay may hang).
        let keys_round = self.inner.courier.as_ref().map(Courier::round);
        let outcome = session
            .call(PeerMsg::SyncNow, None)
            .await
            .map_err(|_| SyncError::Closed)?;
        if let Some(round) = keys_round
            && tokio::time::timeout(COURIER_ROUND_WAIT, round)
                .await
                .is_err()
        {
            tracing::debug!("sync_now: the key courier's round is still running");
        }
        match outcome {
            CallResult::Success(Ok(report)) => Ok(report.into()),
            CallResult::Success(Err(e)) => Err(map_sync_error(e)),
            CallResult::Timeout | CallResult::SenderError => Err(SyncError::Closed),
        }
    }

    /// Serves this store to its other devices on `listen` (UDP, QUIC), so
    /// they sync with it directly, without a relay: a device names it as
    /// its remote with [`ServeHandle::addr`] and [`ServeHandle::pin`].
    /// Serving stops with [`ServeHandle::stop`] or when the runtime ends.
    pub async fn serve(&self, listen: SocketAddr) -> Result<ServeHandle, ServeError> {
        if self.inner.read_only {
            return Err(ServeError::ReadOnly);
        }
        if self.inner.keys.current().access.is_none() {
            return Err(ServeError::NotEncrypted);
        }
        // The devices it serves check its signatures against its announcement.
        self.announce().await.map_err(|e| ServeError::Start {
            addr: listen,
            detail: format!("could not record this device's member entry: {e}"),
        })?;
        let parts = ServeParts {
            dir: self.inner.info.path.clone(),
            db: self.inner.db.clone(),
            store_id: self.inner.info.store_id,
            keys: self.inner.keys.clone(),
            committed: self.inner.committed.clone(),
            ingest: self.inner.ingest.clone(),
        };
        crate::serve::start(parts, listen).await
    }

    /// Where sync stands, or `None` for a store opened without
    /// [`Config::sync`](crate::Config::sync).
    pub fn sync_status(&self) -> Option<SyncStatus> {
        self.inner
            .sync
            .as_ref()
            .map(|s| SyncStatus::from(s.borrow().clone()))
    }

    /// Key export, rotation and purge.
    pub fn crypto(&self) -> crate::crypto::Crypto<'_> {
        crate::crypto::Crypto { store: self }
    }

    pub(crate) fn key_manager(
        &self,
    ) -> Option<ractor::ActorRef<persist_actors::key_manager::KeyManagerMsg>> {
        self.inner.routes.key_manager()
    }

    pub(crate) fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    pub(crate) fn export_kdf(&self) -> KdfParams {
        self.inner.export_kdf
    }

    pub(crate) fn rotation_progress(&self) -> watch::Receiver<RotationProgress> {
        self.inner.progress.subscribe()
    }

    /// Facts about this store.
    pub fn info(&self) -> &StoreInfo {
        &self.inner.info
    }

    /// Sets `path` to `value`. Returns once the write is durable.
    pub async fn put<T: Serialize + ?Sized>(
        &self,
        path: &str,
        value: &T,
    ) -> Result<(), WriteError> {
        let op = encode_op(path, value)?;
        self.write(vec![op]).await
    }

    /// Deletes `path` (a no-op for a path that holds nothing, apart from
    /// recording the deletion). Returns once the deletion is durable.
    pub async fn delete(&self, path: &str) -> Result<(), WriteError> {
        validate_path(path)?;
        self.write(vec![WriteOp::Delete {
            path: path.to_owned(),
        }])
        .await
    }

    /// A batch of writes committed atomically by [`Batch::commit`].
    pub fn batch(&self) -> Batch {
        Batch {
            store: self.clone(),
            ops: Vec::new(),
            error: None,
        }
    }

    /// The value at `path` decoded as `T`, or `None` if there is none.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, ReadError> {
        validate_path(path)?;
        let keys = self.inner.keys.current();
        let locator = keys.locator(path);
        let txn = self.inner.db.begin_read().map_err(storage_read_error)?;
        let Some(row) = txn
            .record(&locator)
            .map_err(|e| integrity_or_storage(path, e))?
        else {
            return Ok(None);
        };
        if row.tombstone {
            return Ok(None);
        }
        let record =
            keys.open_path(path, &locator, &row.envelope)
                .map_err(|e| ReadError::Integrity {
                    what: path.to_owned(),
                    detail: e.to_string(),
                })?;
        // Taken before this device learned of its writer's revocation; the
        // KeyManager forgets it, and until then it is not there.
        if keys.revoked_write(&record.origin, record.hlc) {
            return Ok(None);
        }
        decode_value(path, &record.value).map(Some)
    }

    /// Every live record whose path starts with `prefix`, sorted by path,
    /// decoded as `T`.
    ///
    /// Paths are hidden behind locators, so listing opens every record;
    /// it costs one decryption per record in the store.
    pub async fn list<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, ReadError> {
        let keys = self.inner.keys.current();
        let txn = self.inner.db.begin_read().map_err(storage_read_error)?;
        let mut out = Vec::new();
        let mut after: Option<Locator> = None;
        loop {
            let page = txn
                .records_page(after.as_ref(), LIST_PAGE_RECORDS)
                .map_err(storage_read_error)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            for (locator, row) in &page {
                if row.tombstone {
                    continue;
                }
                let record = open_row(&keys, locator, row).map_err(|e| ReadError::Integrity {
                    what: format!("locator {locator}"),
                    detail: e.to_string(),
                })?;
                if record.path.starts_with(prefix)
                    && !is_system_path(&record.path)
                    && !keys.revoked_write(&record.origin, record.hlc)
                {
                    let value = decode_value(&record.path, &record.value)?;
                    out.push((record.path, value));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// A stream of the changes to paths under `prefix`, from now on.
    ///
    /// A watcher that falls more than [`WATCH_BUFFER_MAX`] changes behind
    /// receives `Err(Lagged)` and then continues with newer changes.
    pub fn watch(
        &self,
        prefix: &str,
    ) -> impl Stream<Item = Result<Change, Lagged>> + Send + 'static {
        let prefix = prefix.to_owned();
        BroadcastStream::new(self.inner.changes.subscribe()).filter_map(move |item| match item {
            Ok(change) if change.path().starts_with(&prefix) => Some(Ok(change)),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Err(Lagged { missed })),
        })
    }

    /// Counts, epochs and key location.
    pub async fn status(&self) -> Result<Status, ReadError> {
        let txn = self.inner.db.begin_read().map_err(storage_read_error)?;
        let keys = self.inner.keys.current();
        // Member announcements and revocations are the store's own
        // records, not the app's.
        let own = keys
            .members
            .keys()
            .map(membership::member_path)
            .chain(keys.revoked.keys().map(membership::revocation_path));
        let mut announcements = 0;
        for path in own {
            let locator = keys.locator(&path);
            if let Some(row) = txn.record(&locator).map_err(storage_read_error)?
                && !row.tombstone
            {
                announcements += 1;
            }
        }
        let records = txn
            .live_count()
            .map_err(storage_read_error)?
            .saturating_sub(announcements);
        let counts = txn.epoch_counts().map_err(storage_read_error)?;
        let states = self.epoch_states().await;
        let acks = self.epoch_acks().await;
        let waits = self.retire_waits().await;
        let info = &self.inner.info;
        let mut epochs: Vec<EpochStatus> = states
            .iter()
            .map(|summary| {
                let e = &summary.epoch;
                let wait = waits.get(e);
                EpochStatus {
                    epoch: e.0,
                    state: state_name(summary.state),
                    records: counts.get(e).copied().unwrap_or(0),
                    announcement: hex::encode(summary.announcement),
                    keys: summary.keys,
                    acknowledged_by: acks
                        .get(e)
                        .map(|a| a.iter().map(ToString::to_string).collect())
                        .unwrap_or_default(),
                    retire_waits_for: wait
                        .map(|w| w.waiting_for.iter().map(ToString::to_string).collect())
                        .unwrap_or_default(),
                    retire_due_ms: wait.and_then(|w| w.due_ms),
                }
            })
            .collect();
        if !info.encrypted {
            epochs.push(EpochStatus {
                epoch: 0,
                state: "plain",
                records: counts.get(&Epoch(0)).copied().unwrap_or(0),
                announcement: String::new(),
                keys: 0,
                acknowledged_by: Vec::new(),
                retire_waits_for: Vec::new(),
                retire_due_ms: None,
            });
        }
        // Read before the await below, and as a statement of its own: a
        // watch `Ref` held across an await blocks the Rotator's and
        // KeyManager's progress updates (a deadlock on one thread).
        let rotation = RotationStatus::from(*self.inner.progress.borrow());
        let relay_switch = self.relay_switch().await;
        Ok(Status {
            store_id: info.store_id.to_string(),
            device_id: info.device_id.to_string(),
            name: info.name.clone(),
            records,
            encrypted: info.encrypted,
            current_epoch: keys.current_epoch().0,
            rotation,
            epochs,
            key_source: info.key_location.clone(),
            relay_switch,
        })
    }

    async fn relay_switch(&self) -> Option<RelaySwitchStatus> {
        let km = self.inner.routes.key_manager()?;
        let switch = match km
            .call(
                persist_actors::key_manager::KeyManagerMsg::RelaySwitch,
                None,
            )
            .await
        {
            Ok(CallResult::Success(switch)) => switch?,
            _ => return None,
        };
        let due_ms = match self.inner.relay_switch_grace {
            Some(grace) if switch.by_this_device => Some(
                switch
                    .since_ms
                    .saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)),
            ),
            _ => None,
        };
        Some(RelaySwitchStatus {
            epoch: switch.epoch.0,
            by_this_device: switch.by_this_device,
            waiting_for: switch.waiting_for.iter().map(ToString::to_string).collect(),
            due_ms,
        })
    }

    /// Stops the store's actors after every accepted write is committed.
    ///
    /// When it returns, the actors have stopped and released the database;
    /// once the last clone of this `Store` is dropped too, the store can be
    /// opened again (by this process or another).
    pub async fn close(self) -> Result<(), WriteError> {
        if let Some(r) = &self.inner.responders {
            r.stop();
        }
        if let Some(c) = &self.inner.courier {
            c.stop();
        }
        let supervisor = self.inner.supervisor.clone();
        let outcome = match supervisor.call(SupervisorMsg::Shutdown, None).await {
            Ok(CallResult::Success(())) => Ok(()),
            _ => Err(WriteError::Closed),
        };
        let done = self
            .inner
            .supervisor_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(done) = done {
            // The supervisor's task ends after its state, which holds the
            // database, is dropped. A panic in it is already reported by
            // the outcome above.
            let _ = done.await;
        }
        outcome
    }

    /// The store's wall clock (the injected one).
    pub(crate) fn now_ms(&self) -> u64 {
        self.inner.ingest.clock.now_ms()
    }

    /// Asks the key courier to deliver keys now (after a rotation).
    pub(crate) fn kick_courier(&self) {
        if let Some(c) = &self.inner.courier {
            c.kick();
        }
    }

    pub(crate) fn responders(&self) -> Option<&Responders> {
        self.inner.responders.as_ref()
    }

    async fn epoch_acks(
        &self,
    ) -> std::collections::BTreeMap<Epoch, std::collections::BTreeSet<DeviceId>> {
        let Some(km) = self.inner.routes.key_manager() else {
            return Default::default();
        };
        match km
            .call(persist_actors::key_manager::KeyManagerMsg::Acks, None)
            .await
        {
            Ok(CallResult::Success(acks)) => acks,
            _ => Default::default(),
        }
    }

    async fn retire_waits(
        &self,
    ) -> std::collections::BTreeMap<Epoch, persist_actors::key_manager::RetireWait> {
        let Some(km) = self.inner.routes.key_manager() else {
            return Default::default();
        };
        match km
            .call(
                persist_actors::key_manager::KeyManagerMsg::RetireWaits,
                None,
            )
            .await
        {
            Ok(CallResult::Success(waits)) => waits,
            _ => Default::default(),
        }
    }

    async fn epoch_states(&self) -> Vec<persist_actors::key_manager::EpochSummary> {
        let Some(km) = self.inner.routes.key_manager() else {
            return Vec::new();
        };
        match km
            .call(persist_actors::key_manager::KeyManagerMsg::Describe, None)
            .await
        {
            Ok(CallResult::Success(v)) => v,
            _ => Vec::new(),
        }
    }

    async fn write(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        if self.inner.read_only {
            return Err(WriteError::ReadOnly);
        }
        // The semaphore lives as long as the store and is never closed.
        let n = u32::try_from(ops.len())
            .unwrap_or(u32::MAX)
            .min(WRITES_IN_FLIGHT_MAX as u32);
        let _permit = self
            .inner
            .writes_in_flight
            .acquire_many(n)
            .await
            .map_err(|_| WriteError::Closed)?;
        let sealer = self.inner.routes.sealer().ok_or(WriteError::Closed)?;
        let outcome = sealer
            .call(|reply| SealerMsg::Seal { ops, reply }, None)
            .await
            .map_err(|_| WriteError::Closed)?;
        let report: CommitReport = match outcome {
            CallResult::Success(Ok(report)) => report,
            CallResult::Success(Err(e)) => return Err(map_write_error(e)),
            CallResult::Timeout | CallResult::SenderError => return Err(WriteError::Closed),
        };
        for change in report.applied {
            let change = match change.value {
                Some(value) => Change::Put {
                    path: change.path,
                    value,
                },
                None => Change::Delete { path: change.path },
            };
            // No watcher is not an error.
            let _ = self.inner.changes.send(change);
        }
        Ok(())
    }
}

/// Reports changes applied by sync to the store's watchers (not the
/// store's own system records).
fn watch_feed(changes: broadcast::Sender<Change>) -> OnApplied {
    Arc::new(move |applied| {
        for change in applied {
            if is_system_path(&change.path) {
                continue;
            }
            let change = match change.value {
                Some(value) => Change::Put {
                    path: change.path,
                    value,
                },
                None => Change::Delete { path: change.path },
            };
            // No watcher is not an error.
            let _ = changes.send(change);
        }
    })
}

fn map_sync_error(e: persist_actors::peer_session::SyncError) -> SyncError {
    use persist_actors::peer_session::SyncError as E;
    match e {
        E::Unreachable { remote, detail } => SyncError::Unreachable { remote, detail },
        E::Refused { remote, code, text } => SyncError::Refused {
            remote,
            detail: format!("{text} ({code:?})"),
        },
        E::Storage(detail) => SyncError::Storage(detail),
        _ => SyncError::Closed,
    }
}

/// Reads an invite code and settles the remote to pair (and then sync)
/// through: the configured one, which must be the code's relay, or the
/// code's relay trusted by the code's pin.
fn prepare_invite(
    code: &str,
    read_only: bool,
    importing: bool,
    sync: &mut Option<SyncConfig>,
    env: &Env,
) -> Result<(Invite, Remote), OpenError> {
    if read_only {
        return Err(OpenError::ReadOnly(
            "joining with an invite writes the store; open it without read_only()".into(),
        ));
    }
    if importing {
        return Err(OpenError::ReadOnly(
            "give either an invite or a key export, not both".into(),
        ));
    }
    let invite = Invite::decode(code)?;
    invite.check_fresh(env.clock.now_ms())?;
    let remote = match sync.as_ref() {
        Some(configured) if configured.remote.url() != invite.relay => {
            return Err(OpenError::InviteForOtherRelay {
                invite: invite.relay.clone(),
                configured: configured.remote.url().to_owned(),
            });
        }
        Some(configured) => configured.remote.clone(),
        None => {
            let pin = invite.pin.ok_or_else(|| OpenError::InviteNeedsTrust {
                relay: invite.relay.clone(),
            })?;
            let remote =
                Remote::pinned(&invite.relay, &CertPin(pin).to_string()).map_err(|_| {
                    OpenError::Invite(InviteError::Invalid("its relay address is not usable"))
                })?;
            *sync = Some(SyncConfig::new(remote.clone()));
            remote
        }
    };
    Ok((invite, remote))
}

/// Pairs through `remote` as a new device of `invite`'s store; `db` must
/// hold no store, or the unfinished join of this one (see
/// [`unfinished_join`]), which is resumed instead: `None`, nothing paired.
async fn join(
    db: &LocalDb,
    cfg: &BootConfig,
    invite: &Invite,
    remote: &Remote,
    env: &Env,
    timeout: Duration,
) -> Result<Option<Joined>, OpenError> {
    if let Some(store) = stored_store(db, &cfg.path)? {
        let unfinished = if store == invite.store_id {
            unfinished_join(db, cfg)?
        } else {
            None
        };
        if let Some(via) = unfinished {
            // Resuming sends this device's relay credential wherever the
            // invite points: only where the first attempt paired, or a
            // made-up invite with this store's (public) id would get it.
            if via != joined_via(invite) {
                return Err(OpenError::ResumeThroughOtherRelay {
                    path: cfg.path.clone(),
                    relay: invite.relay.clone(),
                });
            }
            // The inviter of that earlier join made this device a member
            // before it granted the keys stored here: pairing again would
            // only make a second member, and this invite stays unused.
            tracing::info!(store = %store, path = %cfg.path.display(),
                "this directory holds an earlier join of the invite's store that did not \
                 finish opening; resuming it without pairing again");
            return Ok(None);
        }
        return Err(OpenError::InviteIntoExistingStore {
            path: cfg.path.clone(),
            store,
            invite_store: invite.store_id,
        });
    }
    let identity = DeviceIdentity::generate(&mut env.entropy.stream("identity"));
    tracing::info!(relay = %remote.url(), inviter = %invite.inviter,
        "waiting for the inviting device to answer");
    let connector = remote.connector();
    let grant = pairing::join(
        invite,
        &identity,
        &cfg.name,
        connector.as_ref(),
        env,
        timeout,
    )
    .await?;
    Ok(Some(Joined {
        identity,
        keys: grant.keys,
        members: grant.members,
        via: joined_via(invite),
    }))
}

/// What a join by `invite` records of where it paired
/// ([`persist_actors::meta::JOINED_VIA`]): its relay address, then its pin.
fn joined_via(invite: &Invite) -> Vec<u8> {
    let mut via = invite.relay.as_bytes().to_vec();
    via.extend(invite.pin.iter().flatten());
    via
}

/// Waits, at most [`DB_RELEASE_WAIT_MAX`], until `db` is the last handle
/// on the database (the caller's, which it then drops), so that a failed
/// open returns with the database free for the next.
async fn await_release(db: &Arc<LocalDb>) {
    let mut waited = Duration::ZERO;
    while Arc::strong_count(db) > 1 && waited < DB_RELEASE_WAIT_MAX {
        tokio::time::sleep(DB_RELEASE_POLL).await;
        waited += DB_RELEASE_POLL;
    }
}

fn ensure_dir(dir: &Path) -> Result<(), OpenError> {
    let err = |source| OpenError::Directory {
        path: dir.to_owned(),
        source,
    };
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(err)
}

fn encode_op<T: Serialize + ?Sized>(path: &str, value: &T) -> Result<WriteOp, WriteError> {
    validate_path(path)?;
    let value = codec::encode(value).map_err(|detail| WriteError::Encode {
        path: path.to_owned(),
        detail,
    })?;
    if value.len() > VALUE_BYTES_MAX {
        return Err(WriteError::TooLarge {
            path: path.to_owned(),
            len: value.len(),
            max: VALUE_BYTES_MAX,
        });
    }
    Ok(WriteOp::Put {
        path: path.to_owned(),
        value,
    })
}

fn decode_value<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T, ReadError> {
    codec::decode(bytes).map_err(|detail| ReadError::Decode {
        path: path.to_owned(),
        type_name: std::any::type_name::<T>(),
        detail,
    })
}

fn open_row(
    keys: &KeySet,
    locator: &Locator,
    row: &Row,
) -> Result<persist_core::record::Record, OpenRecordError> {
    keys.open(locator, &row.envelope)
}

fn state_name(s: EpochState) -> &'static str {
    match s {
        EpochState::Current => "current",
        EpochState::Rotating => "rotating",
        EpochState::Retired => "retired",
        EpochState::Purged => "purged",
        _ => "unknown",
    }
}

fn storage_read_error(e: persist_storage::StorageError) -> ReadError {
    ReadError::Storage(e.to_string())
}

fn integrity_or_storage(path: &str, e: persist_storage::StorageError) -> ReadError {
    match e {
        persist_storage::StorageError::CorruptRow { .. } => ReadError::Integrity {
            what: path.to_owned(),
            detail: e.to_string(),
        },
        other => storage_read_error(other),
    }
}

fn map_write_error(e: persist_actors::WriteError) -> WriteError {
    match e {
        persist_actors::WriteError::InvalidPath(p) => WriteError::InvalidPath(p),
        persist_actors::WriteError::Unavailable => WriteError::Closed,
        other => WriteError::Storage(other.to_string()),
    }
}
