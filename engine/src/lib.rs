//! Persist: an embedded, end-to-end-encrypted, local-first store.
//!
//! An app opens a [`Store`], then reads and writes plain Rust values by
//! path. Every byte that reaches disk or the network is ciphertext: each
//! write is sealed
//! in an envelope (AES-256-GCM under a per-write key derived from the
//! store's current data key, signed with the device's Ed25519 key), and
//! paths are stored only as keyed hashes. The data keys live in a keyring
//! sealed under a device key (KEK) kept in the OS keychain or a 0600
//! keyfile.
//!
//! # Architecture
//!
//! ```text
//!   app ──► Store (this crate)
//!              │ put/delete                 get/list (direct redb reads)
//!              ▼                                   │
//!   Sealer ──► StorageWriter ──► redb ◄────────────┘
//!     ▲   (HLC, seal)   (LWW, group commit)   ▲
//!     │                                        │ verified ingest, pending
//!     └── KeyManager (keyring, KEK)       PeerSession ◄──QUIC──► relay / device
//! ```
//!
//! With [`Config::sync`], a PeerSession keeps the store in step with a
//! relay node (`persist-relay`) or another device serving its store
//! ([`Store::serve`]): it pushes the envelopes this device sealed, pulls
//! the others', checks every signature and tag before applying them with
//! last-write-wins, and holds envelopes under a key or from a device it
//! does not know yet until it does. [`Store::sync_now`] and
//! [`Store::sync_status`] say where sync stands.
//!
//! A new device joins with an invite: [`Crypto::create_invite`] on a
//! device of the store gives a one-time code, and [`Config::invite`] on
//! the new device runs an authenticated Noise handshake (`IKpsk2`) with the
//! inviter through the relay, which sees only opaque bytes; the inviter
//! answers while its store is open with sync. Key exports
//! ([`Crypto::export_key`], [`Config::key`]) remain for backups. After
//! [`Crypto::rotate_key`], the new key reaches every member through its
//! relay mailbox, sealed to that member's key; a member that was offline
//! gets it when it next connects, and applies what it held meanwhile.
//!
//! The actors (`persist-actors`) are supervised by one store supervisor;
//! the decisions they make (envelope format, HLC, last-write-wins) live in
//! `persist-core`, which does no IO, so simulations can drive them with a
//! fixed clock and seeded randomness ([`Config::dangerous`]).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use persist::{Config, Store};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(
//!     Config::new(dir.path().join("store")).key_file(dir.path().join("keys/device.key")),
//! )
//! .await?;
//!
//! store.put("notes/1", &"buy milk").await?;
//! store.put("notes/2", &"call mum").await?;
//! assert_eq!(store.get::<String>("notes/1").await?.as_deref(), Some("buy milk"));
//!
//! store.delete("notes/1").await?;
//! let notes: Vec<(String, String)> = store.list("notes/").await?;
//! assert_eq!(notes, vec![("notes/2".to_string(), "call mum".to_string())]);
//!
//! store.close().await?;
//! # Ok(())
//! # }
//! ```

mod bootstrap;
mod codec;
mod config;
mod courier;
mod crypto;
mod env;
mod error;
mod kek;
mod pairing;
mod rekey;
mod serve;
mod store;
mod sync;

pub use config::{Config, DangerousConfig};
pub use crypto::{Crypto, DangerousCrypto, Device, InviteCode, KeyExport, Passphrase, Rotation};
pub use error::{Error, KeyError, OpenError, ReadError, SyncError, WriteError};
pub use kek::{KekError, KeySource};
pub use pairing::{JOIN_TIMEOUT_DEFAULT, JoinError};
pub use persist_core::env::{
    Clock, Entropy, Env, FaultPlan, FaultPoint, Faults, ManualClock, SeededEntropy, SeededFaults,
};
pub use persist_core::export::{ExportError, KdfParams};
pub use persist_core::invite::{InviteError, PairingError, Refusal};
pub use persist_core::keyring::RevokeError;
pub use persist_core::record::{PATH_BYTES_MAX, PathError, VALUE_BYTES_MAX};
pub use persist_core::{DeviceId, InviteId, StoreId};
pub use persist_storage::{Backend, MemoryBackend};
pub use serve::{ServeError, ServeHandle};
pub use store::{
    Batch, COURIER_ROUND_WAIT, Change, DB_FILE, EpochStatus, Lagged, RelaySwitchStatus,
    RotationStatus, Status, Store, StoreInfo, WATCH_BUFFER_MAX, WRITES_IN_FLIGHT_MAX,
};
pub use sync::{
    Conversation, DEFAULT_PORT, Dial, DialFuture, RELAY_SWITCH_GRACE, RETIRE_GRACE, Remote,
    RemoteError, Strategy, SyncConfig, SyncReport, SyncStatus,
};
