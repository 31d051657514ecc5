//! The relay backend's errors: one for operations, one for opening the
//! redb relay database.

use std::io;
use std::path::PathBuf;

use persist_core::protocol::ErrorCode;

use crate::error::{OpenError, StorageError};

/// A [`super::RelayBackend`] operation failed. Nothing of the failed call
/// was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The access credential does not match the store's. Says nothing else
    /// about the store.
    #[error("the access credential does not match this store's")]
    Unauthorized,
    /// The store does not exist and this client may not create it.
    #[error("this relay creates a store only for a client that presents its admission secret")]
    AdmissionRequired,
    /// The store does not exist (an operation other than `open_store`).
    /// A session answers it as [`ErrorCode::Unauthorized`], so that a
    /// client cannot tell an absent store from one it may not see.
    #[error("no such store on this relay")]
    UnknownStore,
    /// The mailbox holds `max` items already; retry once its owner has
    /// fetched and acknowledged some.
    #[error("the mailbox is full ({max} items wait): retry after its owner has fetched them")]
    MailboxFull {
        /// [`persist_core::protocol::MAILBOX_ITEMS_MAX`].
        max: usize,
    },
    /// An append carried more entries than one call takes.
    #[error("an append of {count} entries; at most {max} per call")]
    TooManyEntries {
        /// Entries offered.
        count: usize,
        /// [`super::APPEND_ENTRIES_MAX`].
        max: usize,
    },
    /// An envelope is larger than any valid one.
    #[error("an envelope of {bytes} bytes; at most {max} allowed")]
    EnvelopeTooLarge {
        /// Its size.
        bytes: usize,
        /// [`persist_core::envelope::ENVELOPE_BYTES_MAX`].
        max: usize,
    },
    /// A mailbox item is larger than allowed.
    #[error("a mailbox item of {bytes} bytes; at most {max} allowed")]
    MailboxItemTooLarge {
        /// Its size.
        bytes: usize,
        /// [`persist_core::protocol::MAILBOX_ITEM_BYTES_MAX`].
        max: usize,
    },
    /// This backend does not do what was asked (a device serving its own
    /// store has no credential of its own to change).
    #[error("this server does not {0}")]
    Unsupported(&'static str),
    /// The relay's storage failed (I/O, a damaged or unreachable database).
    /// Retryable: the same call may succeed later. The text is for the
    /// operator's log.
    #[error("relay storage is unavailable: {0}")]
    Unavailable(String),
}

impl RelayError {
    /// The wire code a session answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            RelayError::Unauthorized | RelayError::UnknownStore => ErrorCode::Unauthorized,
            RelayError::AdmissionRequired => ErrorCode::AdmissionRequired,
            RelayError::MailboxFull { .. } => ErrorCode::MailboxFull,
            RelayError::TooManyEntries { .. }
            | RelayError::EnvelopeTooLarge { .. }
            | RelayError::MailboxItemTooLarge { .. }
            | RelayError::Unsupported(_) => ErrorCode::Protocol,
            RelayError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// A storage failure, described for the operator without this crate's
    /// advice for local databases (re-syncing a device).
    pub(crate) fn from_storage(err: StorageError) -> Self {
        let text = match err {
            StorageError::Io { source } => format!("I/O error in the relay database: {source}"),
            StorageError::Corrupted { detail } | StorageError::Damaged { detail, .. } => {
                format!("the relay database is damaged ({detail}): restore it from a backup")
            }
            StorageError::Unusable { detail } => format!(
                "the relay database is unusable after an earlier failure ({detail}): restart the \
                 relay"
            ),
            other => other.to_string(),
        };
        RelayError::Unavailable(text)
    }
}

/// Opening the relay database failed ([`super::RedbRelay::open`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayOpenError {
    /// The database was written by a newer relay. The file is left untouched.
    #[error(
        "relay database at {} was written by a newer Persist relay (format {found}, this build \
         reads up to {supported}): upgrade the relay",
        path.display()
    )]
    NewerFormat {
        /// The database.
        path: PathBuf,
        /// The format version stored in it.
        found: u32,
        /// [`super::RELAY_FORMAT_VERSION`].
        supported: u32,
    },
    /// The file is not a readable relay database: garbled, truncated, a
    /// device's local store, or something else entirely. The file is left
    /// untouched.
    #[error(
        "relay database at {} is damaged or is not a Persist relay database ({detail}): restore \
         it from a backup, or point the relay at another path",
        path.display()
    )]
    Corrupted {
        /// The database.
        path: PathBuf,
        /// What was found wrong.
        detail: String,
    },
    /// Another process (or another handle in this one) has it open.
    #[error(
        "relay database at {} is in use by another process: stop the other relay and retry",
        path.display()
    )]
    Locked {
        /// The database.
        path: PathBuf,
    },
    /// The file could not be read or written.
    #[error("cannot open relay database at {}: {source}", path.display())]
    Io {
        /// The database.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The database opened but could not be read or initialized.
    #[error("cannot open relay database at {}: {source}", path.display())]
    Storage {
        /// The database.
        path: PathBuf,
        /// What failed.
        #[source]
        source: StorageError,
    },
}

impl From<OpenError> for RelayOpenError {
    /// The local database's open errors, which this crate maps from redb's
    /// once, reworded for a relay.
    fn from(err: OpenError) -> Self {
        match err {
            OpenError::NewerFormat {
                path,
                found,
                supported,
            } => RelayOpenError::NewerFormat {
                path,
                found,
                supported,
            },
            OpenError::Corrupted { path, detail } => RelayOpenError::Corrupted { path, detail },
            OpenError::Locked { path } => RelayOpenError::Locked { path },
            OpenError::Io { path, source } => RelayOpenError::Io { path, source },
            OpenError::Missing { path } => RelayOpenError::Io {
                path,
                source: io::ErrorKind::NotFound.into(),
            },
            OpenError::Storage { path, source } => RelayOpenError::Storage { path, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_retryability() {
        assert_eq!(RelayError::Unauthorized.code(), ErrorCode::Unauthorized);
        assert_eq!(
            RelayError::UnknownStore.code(),
            ErrorCode::Unauthorized,
            "an absent store looks like a forbidden one"
        );
        assert_eq!(
            RelayError::AdmissionRequired.code(),
            ErrorCode::AdmissionRequired
        );
        assert!(RelayError::Unavailable("disk".into()).code().is_retryable());
        assert!(RelayError::MailboxFull { max: 1 }.code().is_retryable());
        assert!(
            !RelayError::EnvelopeTooLarge { bytes: 2, max: 1 }
                .code()
                .is_retryable()
        );
    }

    #[test]
    fn storage_failures_speak_of_the_relay() {
        let err = RelayError::from_storage(StorageError::Corrupted {
            detail: "bad page".into(),
        });
        let text = err.to_string();
        assert!(
            text.contains("relay database") && text.contains("bad page"),
            "{text}"
        );
        assert!(!text.contains("re-sync"), "{text}");
    }
}
