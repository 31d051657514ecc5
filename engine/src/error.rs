//! Errors: one enum per operation, each convertible into [`Error`].

use std::path::PathBuf;

use persist_core::record::PathError;

use crate::kek::KekError;

/// Any Persist error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening a store failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A write failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A read failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A key operation failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A sync failed.
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// A sync did not complete. Nothing local was lost: what was not pushed or
/// pulled is pushed or pulled by the next attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The store was opened without [`Config::sync`](crate::Config::sync).
    #[error("this store was opened without a sync remote (Config::sync, or `persist remote set`)")]
    NotConfigured,
    /// The remote could not be reached, or the connection broke.
    #[error("cannot reach {remote}: {detail}")]
    Unreachable {
        /// The remote's URL.
        remote: String,
        /// Why.
        detail: String,
    },
    /// The remote refused this store or device (wrong access token,
    /// admission secret needed, protocol version mismatch).
    #[error("{remote} refused the connection: {detail}")]
    Refused {
        /// The remote's URL.
        remote: String,
        /// Its reason.
        detail: String,
    },
    /// Applying what was pulled failed locally.
    #[error("applying synced records failed: {0}")]
    Storage(String),
    /// The store is closed.
    #[error("the store is closed")]
    Closed,
}

/// A key operation (export, rotation, purge) failed; nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The store was created with `encrypt(false)` and has no keys.
    #[error("this store does not encrypt, so it has no keys")]
    NotEncrypted,
    /// The store is closed or its key manager is restarting.
    #[error("the store is closed")]
    Closed,
    /// The store was opened read-only.
    #[error("the store was opened read-only; reopen it without read_only() to change keys")]
    ReadOnly,
    /// Invites travel through a relay, and the store has none.
    #[error(
        "invites travel through a relay: open the store with sync (Config::sync) to create one"
    )]
    NoRelay,
    /// The device cannot be revoked; nothing changed.
    #[error(transparent)]
    CannotRevoke(#[from] persist_core::keyring::RevokeError),
    /// An invite's lifetime is out of range; no invite was made.
    #[error("an invite lasts from 1 ms to {max_days} days, not {asked:?}")]
    InviteLifetime {
        /// The lifetime asked for.
        asked: std::time::Duration,
        /// The longest an invite lasts, in days.
        max_days: u64,
    },
    /// The invite expired before any device joined with it.
    #[error("the invite expired before any device joined with it")]
    InviteExpired,
    /// The operation failed.
    #[error("{0}")]
    Failed(String),
}

/// Opening a store failed; nothing in the store was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The store directory could not be created or read.
    #[error("cannot use store directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The database could not be opened.
    #[error(transparent)]
    Storage(#[from] persist_storage::OpenError),
    /// The device key could not be loaded or created.
    #[error(transparent)]
    Key(#[from] KekError),
    /// The device key does not unseal this store's keyring.
    #[error(
        "the device key at {location} does not open the store at {path}: it was replaced, \
         or belongs to another store. Restore the original key (or import an export of \
         the store's keys) — the store's data is unchanged"
    )]
    WrongKey {
        /// The store directory.
        path: PathBuf,
        /// Where the key was found.
        location: String,
    },
    /// The store was created with the other `encrypt` setting.
    #[error(
        "the store at {path} was created with encrypt({stored}); open it with the same setting"
    )]
    EncryptionMismatch {
        /// The store directory.
        path: PathBuf,
        /// The setting it was created with.
        stored: bool,
    },
    /// The store's metadata is damaged.
    #[error("the store at {path} is damaged: {detail}")]
    Corrupted {
        /// The store directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A key export given with `Config::key` cannot be used.
    #[error("cannot use the key export: {0}")]
    Import(#[source] persist_core::export::ExportError),
    /// A key export of another store was given for an existing store.
    #[error(
        "the key export is for store {export}, but {path} holds store {store}; nothing was changed"
    )]
    ImportForOtherStore {
        /// The store directory.
        path: PathBuf,
        /// The store it holds.
        store: persist_core::StoreId,
        /// The store of the export.
        export: persist_core::StoreId,
    },
    /// A read-only open was asked to import keys.
    #[error("{0}")]
    ReadOnly(String),
    /// The invite code cannot be used.
    #[error(transparent)]
    Invite(#[from] persist_core::invite::InviteError),
    /// Pairing with the inviter failed or timed out; nothing was written.
    #[error(transparent)]
    Join(#[from] crate::pairing::JoinError),
    /// An invite was given for a directory that already holds a store.
    #[error(
        "{path} already holds store {store}, and an invite joins a store from an empty \
         directory (this invite is for store {invite_store}); nothing was changed"
    )]
    InviteIntoExistingStore {
        /// The store directory.
        path: PathBuf,
        /// The store it holds.
        store: persist_core::StoreId,
        /// The store of the invite.
        invite_store: persist_core::StoreId,
    },
    /// The directory holds a join by invite that did not finish, made
    /// through another relay (or certificate) than this invite names.
    #[error(
        "{path} holds a join of this invite's store that did not finish, made through another \
         relay or certificate than {relay}: retry with an invite from the same relay, or remove \
         the directory to pair again; nothing was changed"
    )]
    ResumeThroughOtherRelay {
        /// The store directory.
        path: PathBuf,
        /// The relay the invite names.
        relay: String,
    },
    /// The invite names another relay than the one [`Config::sync`](crate::Config::sync) gives.
    #[error(
        "the invite is for the relay {invite}, but this store is set to sync with {configured}: \
         give the invite's relay, or no sync config (the code names its relay)"
    )]
    InviteForOtherRelay {
        /// The code's relay.
        invite: String,
        /// The configured one.
        configured: String,
    },
    /// The invite's relay is trusted through a CA, which the code does not carry.
    #[error(
        "the invite's relay {relay} is trusted through a CA, not a pin: give Config::sync \
         with Remote::with_ca for it"
    )]
    InviteNeedsTrust {
        /// The code's relay.
        relay: String,
    },
    /// There is no store to open, and the config forbids creating one
    /// (`read_only()` or `create_if_missing(false)`).
    #[error("there is no store at {path}")]
    NoStore {
        /// The store directory.
        path: PathBuf,
    },
    /// Sync was asked of a store that does not encrypt.
    #[error("only encrypted stores sync: this store was created with encrypt(false)")]
    SyncNeedsEncryption,
    /// The actors could not start.
    #[error("the store could not start: {0}")]
    Start(String),
}

/// A write (put, delete, batch) failed: nothing of it was stored, except
/// that after [`WriteError::Storage`] it may be (see there).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The path cannot name a record.
    #[error("invalid path: {0}")]
    InvalidPath(#[from] PathError),
    /// The value could not be encoded.
    #[error("cannot encode the value for {path}: {detail}")]
    Encode {
        /// The path.
        path: String,
        /// The encoder's message.
        detail: String,
    },
    /// The value is larger than a record may be.
    #[error("the value for {path} is {len} bytes; the limit is {max}")]
    TooLarge {
        /// The path.
        path: String,
        /// Its encoded size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The write was refused, or its commit failed. A commit that failed
    /// while being made durable (its fsync) may have reached the disk
    /// anyway: after a restart the write may be there, whole.
    #[error("the write failed: {0}")]
    Storage(String),
    /// The store is closed.
    #[error("the store is closed")]
    Closed,
    /// The store was opened read-only.
    #[error("the store was opened read-only; reopen it without read_only() to write")]
    ReadOnly,
}

/// A read (get, list) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The path cannot name a record.
    #[error("invalid path: {0}")]
    InvalidPath(#[from] PathError),
    /// The stored value does not decode into the type asked for.
    #[error("the value at {path} does not decode as {type_name}: {detail}")]
    Decode {
        /// The path.
        path: String,
        /// The Rust type asked for.
        type_name: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// The stored record failed its integrity check: it was altered on
    /// disk, or sealed under a key this device lacks.
    #[error(
        "the record at {what} failed its integrity check ({detail}); other records are unaffected"
    )]
    Integrity {
        /// The path asked for, or the record's locator when listing.
        what: String,
        /// What failed.
        detail: String,
    },
    /// The database could not be read.
    #[error("cannot read the store: {0}")]
    Storage(String),
}
