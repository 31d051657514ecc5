//! The actors of a Persist store, each a thin shell around `persist-core`.
//!
//! ```text
//!                               StoreSupervisor
//!          ┌───────────────┬───────────┴───┬──────────────┬──────────────┐
//!      KeyManager     StorageWriter       Sealer         Rotator       PeerSession
//!   (keyring, KEK)  (only redb writer)  (HLC, seal)  (background     (sync with one
//!                                                      reseal)        remote, if any)
//! ```
//!
//! A put travels engine → [`Sealer`](sealer) (stamp, seal) →
//! [`StorageWriter`](storage_writer) (LWW, group commit) → reply. Reads
//! do not pass through actors: the engine opens a redb read transaction
//! and opens the envelope with the [`KeySet`] that
//! [`KeyManager`](key_manager) hands out. Sync is the reverse path:
//! [`PeerSession`](peer_session) pulls envelopes, [`ingest`] checks them
//! (signature, tag, known epoch and signer) and the StorageWriter applies
//! them with LWW. Decisions live in `persist-core`;
//! these modules only move messages, so a simulation can drive the same
//! code on a paused, single-threaded runtime.

mod blocking;
mod forget;
pub mod ingest;
pub mod key_manager;
pub mod keys;
pub mod meta;
pub mod peer_session;
pub mod rotator;
pub mod routes;
pub mod sealer;
pub mod storage_writer;
pub mod supervisor;

use persist_core::hlc::Hlc;
use persist_storage::{LocalDb, StorageError};

pub use keys::{KeyHandle, KeySet, OpenRecordError};
pub use routes::Routes;
pub use sealer::WriteOp;
pub use storage_writer::{AppliedChange, CommitReport, WriteError};
pub use supervisor::{StoreArgs, StoreSupervisor, SupervisorMsg};

/// The HLC high-water mark and last sequence number persisted in `db`
/// (zero for a new store).
pub fn read_marks(db: &LocalDb) -> Result<(Hlc, u64), StorageError> {
    let txn = db.begin_read()?;
    let hlc = txn
        .meta(meta::HLC)?
        .and_then(|b| <[u8; Hlc::LEN]>::try_from(b.as_slice()).ok())
        .map(Hlc::from_bytes)
        .unwrap_or_default();
    let seq = txn
        .meta(meta::SEQ)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or_default();
    Ok((hlc, seq))
}
