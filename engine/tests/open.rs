//! Opening: a failed create leaves nothing behind, and opens that must not
//! create a store do not.

use persist::{Config, OpenError, Store};

/// A create that fails at its key step (the keyfile exists already) leaves
/// no database file that a later open would take for an empty store.
#[tokio::test(flavor = "multi_thread")]
async fn failed_create_leaves_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("keys/shared.key");
    let first = Store::open(Config::new(dir.path().join("a")).key_file(&key))
        .await
        .unwrap();
    first.close().await.unwrap();
    let key_before = std::fs::read(&key).unwrap();

    let second = Store::open(Config::new(dir.path().join("b")).key_file(&key)).await;
    assert!(
        matches!(second, Err(OpenError::Key(_))),
        "{:?}",
        second.err()
    );
    assert!(!dir.path().join("b").join(persist::DB_FILE).exists());
    assert!(
        std::fs::read(&key).unwrap() == key_before,
        "the existing key is untouched"
    );
}

/// `create_if_missing(false)` and `read_only()` refuse a directory with no
/// store and create nothing.
#[tokio::test(flavor = "multi_thread")]
async fn opens_that_must_not_create() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none");
    let cfg = || Config::new(&path).key_file(dir.path().join("k.key"));
    assert!(matches!(
        Store::open(cfg().create_if_missing(false)).await,
        Err(OpenError::NoStore { .. })
    ));
    assert!(matches!(
        Store::open(cfg().read_only()).await,
        Err(OpenError::NoStore { .. })
    ));
    assert!(!path.exists());
    assert!(!dir.path().join("k.key").exists());

    let store = Store::open(cfg()).await.unwrap();
    store.put("x", &1u8).await.unwrap();
    store.close().await.unwrap();
    let store = Store::open(cfg().create_if_missing(false)).await.unwrap();
    assert_eq!(store.get::<u8>("x").await.unwrap(), Some(1));
    store.close().await.unwrap();
}
