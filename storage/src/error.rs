//! Errors: one enum per operation family, each convertible into [`Error`].
//!
//! redb's error types stay inside this crate: every redb error is mapped here,
//! once, to a variant that says what happened and what a person can do.

use std::io;
use std::path::PathBuf;

use persist_core::Locator;

use crate::contain::Panicked;

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening the local database failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Reading or writing an open database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Opening a local database failed ([`crate::LocalDb::open`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// There is no database at the path (only from [`crate::LocalDb::open_existing`]).
    #[error("no Persist database at {}: create the store first", path.display())]
    Missing {
        /// Where the database was looked for.
        path: PathBuf,
    },
    /// The database was written by a newer Persist. The file is left untouched.
    #[error(
        "database at {} was written by a newer Persist (format {found}, this build reads up to \
         {supported}): upgrade Persist",
        path.display()
    )]
    NewerFormat {
        /// The database.
        path: PathBuf,
        /// The format version stored in the database.
        found: u32,
        /// The highest format version this build reads ([`crate::FORMAT_VERSION`]).
        supported: u32,
    },
    /// The file is not a readable Persist database: garbled, truncated, or
    /// something else entirely. The file is left untouched.
    #[error(
        "database at {} is damaged or is not a Persist database ({detail}): restore it from a \
         backup, or move it away and re-sync this device",
        path.display()
    )]
    Corrupted {
        /// The database.
        path: PathBuf,
        /// What was found wrong.
        detail: String,
    },
    /// Another process (or another handle in this one) has the database open.
    #[error(
        "database at {} is in use by another process: close the other Persist instance and retry",
        path.display()
    )]
    Locked {
        /// The database.
        path: PathBuf,
    },
    /// The file could not be read or written.
    #[error("cannot open database at {}: {source}", path.display())]
    Io {
        /// The database.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The database opened but could not be read or initialized.
    #[error("cannot open database at {}: {source}", path.display())]
    Storage {
        /// The database.
        path: PathBuf,
        /// What failed.
        #[source]
        source: StorageError,
    },
}

/// Reading or writing an open local database failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The storage device failed.
    #[error("I/O error in the local database: {source}")]
    Io {
        /// The operating system's (or backend's) error.
        #[source]
        source: io::Error,
    },
    /// The database's structure is damaged.
    #[error(
        "local database is damaged ({detail}): restore it from a backup, or move it away and \
         re-sync this device"
    )]
    Corrupted {
        /// What was found wrong.
        detail: String,
    },
    /// The database file is damaged where redb does not check it: redb
    /// failed (panicked) reading it, and this crate caught the failure.
    ///
    /// Nothing of the failed operation was committed. A write transaction
    /// that met it refuses to commit; other reads may still succeed.
    #[error(
        "database file {} is damaged ({detail}): restore it from a backup, or move it away and \
         re-sync this device from another device or the relay",
        path.display()
    )]
    Damaged {
        /// The database (for a backend, the name it was opened with).
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// A stored row failed its checksum: its bytes changed after they were written.
    #[error(
        "record {locator} is damaged in the local database (checksum mismatch): re-sync it from \
         another device or the relay"
    )]
    CorruptRow {
        /// The record whose row is damaged.
        locator: Locator,
    },
    /// An envelope larger than [`crate::ENVELOPE_BYTES_MAX`] was offered.
    #[error("envelope of {bytes} bytes exceeds the local limit of {max} bytes")]
    EnvelopeTooLarge {
        /// Size of the envelope offered.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A meta key reserved for this crate's own bookkeeping was written.
    #[error("meta key {key:?} is reserved by the storage layer: use another key")]
    ReservedMetaKey {
        /// The key.
        key: String,
    },
    /// An earlier failure left the database handle unusable.
    #[error("local database is unusable after an earlier failure ({detail}): reopen it")]
    Unusable {
        /// What the earlier failure left behind.
        detail: String,
    },
    /// A bug in Persist: the schema was used in a way it does not allow.
    #[error("internal storage error ({detail}): please report this bug")]
    Internal {
        /// What went wrong.
        detail: String,
    },
}

impl StorageError {
    pub(crate) fn corrupted(detail: impl Into<String>) -> Self {
        Self::Corrupted {
            detail: detail.into(),
        }
    }
}

impl From<Panicked> for StorageError {
    fn from(Panicked { path, detail }: Panicked) -> Self {
        Self::Damaged { path, detail }
    }
}

impl From<Panicked> for OpenError {
    fn from(Panicked { path, detail }: Panicked) -> Self {
        Self::Corrupted { path, detail }
    }
}

impl From<redb::StorageError> for StorageError {
    fn from(err: redb::StorageError) -> Self {
        match err {
            redb::StorageError::Corrupted(detail) => Self::Corrupted { detail },
            redb::StorageError::Io(source) => Self::Io { source },
            redb::StorageError::ValueTooLarge(bytes) => Self::EnvelopeTooLarge {
                bytes,
                max: crate::ENVELOPE_BYTES_MAX,
            },
            redb::StorageError::PreviousIo => Self::Unusable {
                detail: "a previous I/O error".into(),
            },
            redb::StorageError::DatabaseClosed => Self::Unusable {
                detail: "the database was closed".into(),
            },
            other => Self::Unusable {
                detail: other.to_string(),
            },
        }
    }
}

impl From<redb::TableError> for StorageError {
    fn from(err: redb::TableError) -> Self {
        match err {
            redb::TableError::Storage(err) => err.into(),
            // Every table is created with the database, with these types: a
            // missing or differently typed table means the file is not ours.
            err @ (redb::TableError::TableDoesNotExist(_)
            | redb::TableError::TableTypeMismatch { .. }
            | redb::TableError::TypeDefinitionChanged { .. }
            | redb::TableError::TableIsMultimap(_)
            | redb::TableError::TableIsNotMultimap(_)) => Self::corrupted(err.to_string()),
            other => Self::Internal {
                detail: other.to_string(),
            },
        }
    }
}

impl From<redb::TransactionError> for StorageError {
    fn from(err: redb::TransactionError) -> Self {
        match err {
            redb::TransactionError::Storage(err) => err.into(),
            other => Self::Internal {
                detail: other.to_string(),
            },
        }
    }
}

impl From<redb::CommitError> for StorageError {
    fn from(err: redb::CommitError) -> Self {
        match err {
            redb::CommitError::Storage(err) => err.into(),
            other => Self::Unusable {
                detail: other.to_string(),
            },
        }
    }
}

impl From<redb::DatabaseError> for StorageError {
    fn from(err: redb::DatabaseError) -> Self {
        match err {
            redb::DatabaseError::Storage(err) => err.into(),
            redb::DatabaseError::TransactionInProgress => Self::Internal {
                detail: "a transaction of this database is still open".into(),
            },
            other => Self::Internal {
                detail: other.to_string(),
            },
        }
    }
}

impl OpenError {
    /// Maps a redb open error for the database at `path`.
    pub(crate) fn from_redb(path: PathBuf, err: redb::DatabaseError) -> Self {
        match err {
            redb::DatabaseError::DatabaseAlreadyOpen
            | redb::DatabaseError::LockProtocolMismatch => Self::Locked { path },
            redb::DatabaseError::UpgradeRequired(version) => Self::Corrupted {
                path,
                detail: format!("redb file format {version}, which this build does not read"),
            },
            redb::DatabaseError::RepairAborted => Self::Corrupted {
                path,
                detail: "it needs a repair that could not be run".into(),
            },
            redb::DatabaseError::Storage(err) => Self::from_storage(path, err.into()),
            other => Self::Storage {
                path,
                source: StorageError::Internal {
                    detail: other.to_string(),
                },
            },
        }
    }

    /// Maps a failure reading an opened database at `path`.
    pub(crate) fn from_storage(path: PathBuf, err: StorageError) -> Self {
        match err {
            StorageError::Corrupted { detail } => Self::Corrupted { path, detail },
            // The path it names is the one being opened.
            StorageError::Damaged { detail, .. } => Self::Corrupted { path, detail },
            // redb reads the header and layout with read_exact and validates
            // them: at open, a short or malformed file is damage, not a device
            // failure.
            StorageError::Io { source }
                if matches!(
                    source.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
                ) =>
            {
                Self::Corrupted {
                    path,
                    detail: source.to_string(),
                }
            }
            StorageError::Io { source } => Self::Io { path, source },
            other => Self::Storage {
                path,
                source: other,
            },
        }
    }
}
