//! Keeping redb's panics inside this crate.
//!
//! redb trusts the pages it reads: a page changed by something other than
//! redb (a disk fault, another program, a bad restore) can make it panic
//! (`unreachable!`, a bad page type byte) instead of returning an error. In
//! debug builds a writable open walks every page and panics at open; in
//! release builds the open succeeds and a later read or write panics.
//!
//! Every public operation that calls into redb runs that work through
//! [`contain`], which turns a panic into an error naming the file
//! ([`crate::StorageError::Damaged`], or [`crate::OpenError::Corrupted`] at open).
//! Dropping a redb handle calls into redb too (an abort, a table's root
//! update), so each one is held in a [`Guarded`], whose drop is contained.
//!
//! # Limits
//!
//! - The panic hook is process-global and belongs to the application, so it
//!   is left alone: redb's panic message may still be printed to stderr (by
//!   the default hook) while the caller gets a typed error.
//! - A panic is caught where it would leave Persist's API. Values redb drops
//!   while the panic unwinds run their own `Drop`, and a second panic there
//!   aborts the process, as Rust does for any panic during unwinding.
//! - Catching needs `panic = "unwind"`; with `panic = "abort"` a damaged
//!   file still aborts the process.
//! - After a caught panic inside a write transaction, redb may have leaked
//!   that transaction's pages; it then skips the clean-shutdown mark, and the
//!   next open runs redb's crash recovery, which verifies every page.

use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// redb panicked on the database at `path`: its file is damaged.
#[derive(Debug)]
pub(crate) struct Panicked {
    pub(crate) path: PathBuf,
    pub(crate) detail: String,
}

/// Runs `work`, which calls into redb on the database at `path`, turning a
/// panic into an error.
///
/// Costs nothing measurable when nothing panics. Values `work` owns are
/// dropped while the panic unwinds, so a redb write transaction must be
/// owned outside it (redb marks a write transaction dropped during a panic
/// as leaked, and then skips the clean-shutdown mark).
pub(crate) fn contain<T, E: From<Panicked>>(
    path: &Path,
    work: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(result) => result,
        Err(payload) => Err(Panicked {
            path: path.to_owned(),
            detail: format!(
                "redb failed reading it: {}",
                panic_message(payload.as_ref())
            ),
        }
        .into()),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// A redb handle whose drop runs contained: dropping it calls back into
/// redb, which may panic on a damaged file, or on a lock an earlier caught
/// panic poisoned. A panic there is dropped with the handle: the operation
/// that failed first has already reported the damage.
pub(crate) struct Guarded<T>(Option<T>);

// The `Option` is `Some` from `new` until `into_inner` or `drop` takes it,
// and both consume the `Guarded`: no method that `expect`s it can see `None`.

impl<T> Guarded<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self(Some(inner))
    }

    /// The handle, to consume it (commit, abort, close) under [`contain`].
    pub(crate) fn into_inner(mut self) -> T {
        self.0
            .take()
            .expect("a Guarded holds its handle until consumed")
    }
}

impl<T> Deref for Guarded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0
            .as_ref()
            .expect("a Guarded holds its handle until consumed")
    }
}

impl<T> DerefMut for Guarded<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0
            .as_mut()
            .expect("a Guarded holds its handle until consumed")
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            // Not while already unwinding: a second panic aborts either way.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(inner)));
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Guarded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(inner) => inner.fmt(f),
            None => f.write_str("<consumed>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorageError;

    #[test]
    fn a_panic_becomes_an_error_naming_the_file() {
        let path = Path::new("/data/store.redb");
        let err = contain(path, || -> Result<(), StorageError> {
            panic!("Invalid page type byte 59")
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, StorageError::Damaged { path: p, .. } if p == path),
            "{err:?}"
        );
        assert!(message.contains("/data/store.redb"), "{message}");
        assert!(message.contains("Invalid page type byte 59"), "{message}");
        assert!(message.contains("backup"), "{message}");

        let formatted = contain(path, || -> Result<(), StorageError> {
            panic!("page {}", 9)
        })
        .unwrap_err();
        assert!(formatted.to_string().contains("page 9"), "{formatted}");
        assert_eq!(contain::<_, StorageError>(path, || Ok(7)).unwrap(), 7);
    }

    #[test]
    fn a_panicking_drop_is_contained() {
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("boom");
            }
        }
        drop(Guarded::new(Bomb));
        let consumed = Guarded::new(5).into_inner();
        assert_eq!(consumed, 5);
    }
}
