//! Device-to-device sync: a device serves its own store over `persist/1`.
//!
//! [`Store::serve`](crate::Store::serve) runs the relay node's server code
//! (the same sessions, framing and TLS) over a backend that is this store
//! itself: a pull reads the local change log, a push is ingested exactly
//! as a pull from a relay is (signature, AEAD, pending, last write wins).
//! Another device syncs with it by naming it as its remote, so two devices
//! on a LAN sync without a relay. Only the store's own devices get in: a
//! `Hello` must carry this store's id and its current access credential.
//! That credential follows this device's keyring: when a revocation
//! switches the store to a new one (through the relay this device syncs
//! with), the devices it serves that hold the old one are refused at their
//! next request, and members reconnect with the new one. A device serving
//! its store does not take `Rekey` itself: it keeps no mailboxes, so key
//! parcels, and with them the new token, reach it only through a relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use persist_actors::ingest::{self, Incoming as Ingested, IngestContext};
use persist_actors::keys::KeyHandle;
use persist_core::protocol::{LogEntry, MailboxItem};
use persist_core::{DeviceId, StoreId};
use persist_relay::{RelayConfig, RelayHandle};
use persist_storage::LocalDb;
use persist_storage::relay::{
    Appended, Incoming, PULL_BYTES_TARGET_MAX, PULL_ENTRIES_MAX, Page, RelayBackend, RelayError,
    RelayStats, StoreAccess,
};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

/// Directory, inside the store directory, of the serving TLS identity.
pub(crate) const SERVE_DIR: &str = "serve";

/// A store being served to other devices; see [`Store::serve`](crate::Store::serve).
pub struct ServeHandle {
    relay: RelayHandle,
}

impl std::fmt::Debug for ServeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeHandle")
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}

impl ServeHandle {
    /// The address other devices connect to.
    pub fn addr(&self) -> SocketAddr {
        self.relay.addr()
    }

    /// The SHA-256 pin of this device's serving certificate
    /// (`sha256:<hex>`), which the other devices give with the address.
    pub fn pin(&self) -> String {
        self.relay.pin().to_string()
    }

    /// Stops serving: no new connections, open ones are told to go.
    pub async fn stop(self) {
        self.relay.shutdown().await;
    }
}

/// Serving could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Only encrypted stores sync.
    #[error("only encrypted stores sync: this store was created with encrypt(false)")]
    NotEncrypted,
    /// A read-only store cannot take pushes.
    #[error("the store was opened read-only; reopen it without read_only() to serve it")]
    ReadOnly,
    /// The address or identity could not be used.
    #[error("cannot serve on {addr}: {detail}")]
    Start {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        detail: String,
    },
}

/// What serving needs from the store.
pub(crate) struct ServeParts {
    pub(crate) dir: PathBuf,
    pub(crate) db: Arc<LocalDb>,
    pub(crate) store_id: StoreId,
    pub(crate) keys: KeyHandle,
    pub(crate) committed: Arc<watch::Sender<u64>>,
    pub(crate) ingest: IngestContext,
}

pub(crate) async fn start(
    parts: ServeParts,
    listen: SocketAddr,
) -> Result<ServeHandle, ServeError> {
    let identity_dir = parts.dir.join(SERVE_DIR);
    let backend = DeviceLog {
        db: parts.db,
        store_id: parts.store_id,
        keys: parts.keys,
        committed: parts.committed,
        ingest: parts.ingest,
    };
    let relay = persist_relay::start(RelayConfig::new(listen, identity_dir), backend)
        .await
        .map_err(|e| ServeError::Start {
            addr: listen,
            detail: e.to_string(),
        })?;
    Ok(ServeHandle { relay })
}

/// This store, as the relay server code sees it.
struct DeviceLog {
    db: Arc<LocalDb>,
    store_id: StoreId,
    /// Whose current relay credential admits a client.
    keys: KeyHandle,
    committed: Arc<watch::Sender<u64>>,
    ingest: IngestContext,
}

impl DeviceLog {
    fn check(&self, store: &StoreId) -> Result<(), RelayError> {
        if *store == self.store_id {
            Ok(())
        } else {
            Err(RelayError::UnknownStore)
        }
    }

    fn head_now(&self) -> u64 {
        *self.committed.borrow()
    }
}

fn unavailable(e: impl std::fmt::Display) -> RelayError {
    RelayError::Unavailable(e.to_string())
}

impl RelayBackend for DeviceLog {
    async fn open_store(
        &self,
        store: &StoreId,
        access_fingerprint: &[u8; 32],
        _may_create: bool,
    ) -> Result<StoreAccess, RelayError> {
        self.check(store)?;
        let keys = self.keys.current();
        let admitted = keys
            .access
            .as_ref()
            .is_some_and(|access| bool::from(access.fingerprint().ct_eq(access_fingerprint)));
        if !admitted {
            return Err(RelayError::Unauthorized);
        }
        Ok(StoreAccess {
            created: false,
            head: self.head_now(),
        })
    }

    async fn append(
        &self,
        store: &StoreId,
        entries: Vec<Incoming>,
    ) -> Result<Appended, RelayError> {
        self.check(store)?;
        let count = entries.len() as u32;
        let batch = entries
            .into_iter()
            .map(|e| Ingested {
                locator: e.locator,
                envelope: e.envelope,
                from_pending: false,
            })
            .collect();
        let outcome = ingest::apply(&self.ingest, batch, Vec::new())
            .await
            .map_err(unavailable)?;
        let accepted = u32::try_from(outcome.applied).unwrap_or(u32::MAX);
        Ok(Appended {
            accepted,
            stale: count.saturating_sub(accepted),
            head: self.head_now(),
        })
    }

    async fn pull(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> Result<Page, RelayError> {
        self.check(store)?;
        let limit = limit.min(PULL_ENTRIES_MAX);
        let bytes_target = bytes_target.min(PULL_BYTES_TARGET_MAX);
        let txn = self.db.begin_read().map_err(unavailable)?;
        let changes = txn.changes_since(since, limit).map_err(unavailable)?;
        let mut entries: Vec<LogEntry> = Vec::new();
        let mut cursor = since;
        let mut bytes = 0usize;
        for (seq, locator) in changes {
            // Only the newest change of a locator carries its current row:
            // an older change of it reports nothing.
            let Some(row) = txn.record(&locator).map_err(unavailable)? else {
                cursor = seq;
                continue;
            };
            if !entries.is_empty() && bytes + row.envelope.len() > bytes_target {
                break;
            }
            cursor = seq;
            if entries.iter().any(|e| e.locator == locator) {
                continue;
            }
            bytes += row.envelope.len();
            entries.push(LogEntry {
                seq,
                locator,
                envelope: row.envelope,
            });
        }
        let last = txn.last_change_seq().map_err(unavailable)?;
        Ok(Page {
            entries,
            cursor,
            more: cursor < last,
        })
    }

    async fn head(&self, store: &StoreId) -> Result<u64, RelayError> {
        self.check(store)?;
        Ok(self.head_now())
    }

    fn watch(&self, _store: &StoreId) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    async fn mailbox_put(
        &self,
        _store: &StoreId,
        _mailbox: &DeviceId,
        _payload: Vec<u8>,
    ) -> Result<u64, RelayError> {
        Err(no_mailboxes())
    }

    async fn mailbox_fetch(
        &self,
        _store: &StoreId,
        _mailbox: &DeviceId,
        _since: u64,
        _limit: usize,
    ) -> Result<Vec<MailboxItem>, RelayError> {
        Err(no_mailboxes())
    }

    async fn mailbox_ack(
        &self,
        _store: &StoreId,
        _mailbox: &DeviceId,
        _upto: u64,
    ) -> Result<(), RelayError> {
        Err(no_mailboxes())
    }

    /// Moves whenever the keys change, the relay credential among them.
    fn access_changes(&self, _store: &StoreId) -> watch::Receiver<u64> {
        self.keys.changes()
    }

    async fn stats(&self) -> Result<RelayStats, RelayError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        Ok(RelayStats {
            stores: 1,
            entries: txn.row_count().map_err(unavailable)?,
            // Not tracked for a device's own store.
            envelope_bytes: 0,
        })
    }
}

fn no_mailboxes() -> RelayError {
    RelayError::Unavailable(
        "a device serving its store keeps no mailboxes: pairing needs a relay".into(),
    )
}
