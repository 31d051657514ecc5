//! Helpers shared by the acceptance tests: every store lives in its own
//! temp dir, with its device key in a keyfile beside it (never the OS
//! keychain, never the home directory).

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub(crate) mod devices;

use std::path::{Path, PathBuf};
use std::time::Duration;

use persist::{Config, OpenError, Store};

/// The store directory inside a test's temp dir.
pub(crate) fn store_dir(tmp: &Path) -> PathBuf {
    tmp.join("store")
}

/// The keyfile inside a test's temp dir.
pub(crate) fn key_file(tmp: &Path) -> PathBuf {
    tmp.join("keys").join("k.key")
}

/// The database file of the store in `tmp`.
pub(crate) fn db_file(tmp: &Path) -> PathBuf {
    store_dir(tmp).join(persist::DB_FILE)
}

/// An encrypted store in `tmp/store` keyed by `tmp/keys/k.key`.
pub(crate) fn config(tmp: &Path) -> Config {
    Config::new(store_dir(tmp)).key_file(key_file(tmp))
}

/// Opens (or creates) the store in `tmp`, at once: a store closed just
/// before must have released its database.
pub(crate) async fn open(tmp: &Path) -> Store {
    Store::open(config(tmp)).await.expect("open the store")
}

/// Pause between attempts while a just-closed database is still locked.
pub(crate) const RELEASE_POLL: Duration = Duration::from_millis(10);
/// Attempts before giving up: 5 s in all.
pub(crate) const RELEASE_ATTEMPTS: u32 = 500;

/// Opens a store made by `config`, waiting up to 5 s while the database is
/// still locked by a store closed just before.
///
/// `Store::close` ought to release the database before it returns, and
/// `api.rs` (`close_releases_the_database_at_once`) checks exactly that.
/// Tests of other properties (tampering, bad input, crashes, determinism)
/// open through here so that each checks its own property.
pub(crate) async fn open_when_released(config: impl Fn() -> Config) -> Result<Store, OpenError> {
    let mut attempts = 0;
    loop {
        match Store::open(config()).await {
            Err(OpenError::Storage(persist_storage::OpenError::Locked { .. }))
                if attempts < RELEASE_ATTEMPTS =>
            {
                attempts += 1;
                tokio::time::sleep(RELEASE_POLL).await;
            }
            other => return other,
        }
    }
}

/// Opens (or creates) the store in `tmp`, waiting for a just-closed store
/// to release it (see [`open_when_released`]).
pub(crate) async fn reopen(tmp: &Path) -> Store {
    open_when_released(|| config(tmp))
        .await
        .expect("open the store")
}

/// The value written at `path` by tests that fill a store.
pub(crate) fn value_for(path: &str) -> String {
    format!("value of {path}")
}

/// Opens the database of the store in `tmp` directly, through the storage
/// layer, waiting for a just-closed store to release it.
pub(crate) async fn open_db(tmp: &Path) -> persist_storage::LocalDb {
    let path = db_file(tmp);
    for _ in 0..RELEASE_ATTEMPTS {
        match persist_storage::LocalDb::open(&path, None) {
            Ok(db) => return db,
            Err(persist_storage::OpenError::Locked { .. }) => {
                tokio::time::sleep(RELEASE_POLL).await;
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        }
    }
    panic!("{} still locked after 5 s", path.display());
}

/// Waits until no handle holds the database of the store in `tmp` any
/// more, so that its file no longer changes: opens it directly and closes
/// it.
pub(crate) async fn wait_released(tmp: &Path) {
    open_db(tmp).await.close().expect("close the database");
}
