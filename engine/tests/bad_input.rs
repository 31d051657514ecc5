//! Bad input: a wrong, missing or exposed key, a damaged or newer database,
//! a bad path, a value of the wrong type, the wrong `encrypt` setting. Each
//! is a typed error whose message says what to do, and none changes what
//! the store holds.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers as well as tests: a failed unwrap is a failed test"
)]

mod common;

use std::path::Path;

use persist::{KekError, OpenError, PATH_BYTES_MAX, PathError, ReadError, WriteError};

const RECORDS: usize = 30;

fn path(i: usize) -> String {
    format!("data/{i:02}")
}

/// A store in `tmp` holding [`RECORDS`] records, closed and released.
async fn filled(tmp: &Path) {
    let store = common::reopen(tmp).await;
    for i in 0..RECORDS {
        store
            .put(&path(i), &common::value_for(&path(i)))
            .await
            .unwrap();
    }
    store.close().await.unwrap();
    common::wait_released(tmp).await;
}

/// Opens the store in `tmp` with its right key and checks every record.
async fn assert_intact(tmp: &Path) {
    let store = common::open_when_released(|| common::config(tmp))
        .await
        .expect("the store opens with its own key");
    let all: Vec<(String, String)> = store.list("").await.unwrap();
    let expected: Vec<(String, String)> = (0..RECORDS)
        .map(|i| (path(i), common::value_for(&path(i))))
        .collect();
    assert_eq!(all, expected, "every record is still there");
    store.close().await.unwrap();
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The byte ranges where `after` differs from `before`, for messages.
fn changed_ranges(before: &[u8], after: &[u8]) -> String {
    let mut ranges = Vec::new();
    let mut i = 0;
    let common_len = before.len().min(after.len());
    while i < common_len && ranges.len() < 16 {
        if before[i] != after[i] {
            let start = i;
            while i < common_len && before[i] != after[i] {
                i += 1;
            }
            ranges.push(format!("{start}..{i}"));
        }
        i += 1;
    }
    format!(
        "{} bytes before, {} after; differing ranges (first 16): {}",
        before.len(),
        after.len(),
        ranges.join(" ")
    )
}

/// Whether a path error is the one a case expects.
type IsExpected = fn(&PathError) -> bool;

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A keyfile replaced by another valid key is `OpenError::WrongKey`, naming
/// where the key was read; putting the right key back opens the store with
/// all its data.
#[tokio::test(flavor = "multi_thread")]
async fn replaced_key_is_wrong_key() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    let key_path = common::key_file(tmp);
    let original = read(&key_path);
    let other = format!("{}\n", hex::encode([0x42u8; 32]));
    assert_ne!(original, other.as_bytes());
    std::fs::write(&key_path, &other).unwrap();

    let error = common::open_when_released(|| common::config(tmp))
        .await
        .expect_err("refused");
    assert!(matches!(&error, OpenError::WrongKey { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains(&key_path.display().to_string()),
        "the message names the key's location: {message}"
    );
    assert!(
        read(&key_path) == other.as_bytes(),
        "the key was not replaced"
    );

    std::fs::write(&key_path, &original).unwrap();
    assert_intact(tmp).await;
}

/// A missing keyfile is `KekError::NotFound` naming the keyfile, and no
/// new key is made in its place.
#[tokio::test(flavor = "multi_thread")]
async fn missing_key_is_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    let key_path = common::key_file(tmp);
    let moved = tmp.join("moved.key");
    std::fs::rename(&key_path, &moved).unwrap();

    let error = common::open_when_released(|| common::config(tmp))
        .await
        .expect_err("refused");
    assert!(
        matches!(&error, OpenError::Key(KekError::NotFound { .. })),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&key_path.display().to_string()),
        "the message names where the key was looked for: {message}"
    );
    assert!(!key_path.exists(), "no new key was made");

    std::fs::rename(&moved, &key_path).unwrap();
    assert_intact(tmp).await;
}

/// A keyfile readable by others is refused with the `chmod 600` that fixes
/// it; after the fix the store opens with all its data.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn group_readable_key_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    let key_path = common::key_file(tmp);
    set_mode(&key_path, 0o644);

    let error = common::open_when_released(|| common::config(tmp))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            &error,
            OpenError::Key(KekError::InsecurePermissions { path, .. }) if *path == key_path
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("chmod 600"), "{message}");
    assert!(
        message.contains(&key_path.display().to_string()),
        "{message}"
    );

    set_mode(&key_path, 0o600);
    assert_intact(tmp).await;
}

/// Opens a damaged db: a typed `OpenError` (never a panic), the file left
/// byte for byte as it was; restoring the file restores the store.
async fn assert_damaged_db_refused(tmp: &Path, damage: impl FnOnce(&mut Vec<u8>)) {
    let db_path = common::db_file(tmp);
    let original = read(&db_path);
    let mut damaged = original.clone();
    damage(&mut damaged);
    std::fs::write(&db_path, &damaged).unwrap();

    let dir = tmp.to_path_buf();
    let opened =
        tokio::spawn(async move { common::open_when_released(|| common::config(&dir)).await })
            .await
            .expect("opening a damaged db must not panic");
    let error = match opened {
        Ok(store) => {
            let all = store.list::<String>("").await;
            panic!("a damaged db opened; list gave {all:?}");
        }
        Err(error) => error,
    };
    assert!(
        matches!(
            &error,
            OpenError::Storage(
                persist_storage::OpenError::Corrupted { .. }
                    | persist_storage::OpenError::Storage { .. }
            ) | OpenError::Corrupted { .. }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&db_path.display().to_string()) || message.contains("store at"),
        "the message says which store: {message}"
    );
    let after = read(&db_path);
    assert!(
        after == damaged,
        "the failed open ({error}) changed the damaged file: {}",
        changed_ranges(&damaged, &after)
    );

    std::fs::write(&db_path, &original).unwrap();
    assert_intact(tmp).await;
}

/// A db whose middle 4 KiB were overwritten with garbage never makes the
/// store panic or lie. Where the garbage lands varies with the file's layout:
/// on a live page the open is refused with a typed error and the file left
/// unchanged; on a page no tree uses, or deep in a row page, the open
/// succeeds and every record reads back intact or fails with a typed error,
/// never a wrong value and never a silent absence.
#[tokio::test(flavor = "multi_thread")]
async fn garbled_db_is_refused_or_read_truthfully() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    let db_path = common::db_file(tmp);
    let mut bytes = read(&db_path);
    let mid = bytes.len() / 2;
    let start = mid.saturating_sub(2048);
    let end = (start + 4096).min(bytes.len());
    for (k, b) in bytes[start..end].iter_mut().enumerate() {
        *b = (k as u8).wrapping_mul(151).wrapping_add(0x3b);
    }
    std::fs::write(&db_path, &bytes).unwrap();

    let dir = tmp.to_path_buf();
    let opened =
        tokio::spawn(async move { common::open_when_released(|| common::config(&dir)).await })
            .await
            .expect("opening a damaged db must not panic");
    let store = match opened {
        Ok(store) => store,
        Err(error) => {
            assert!(
                matches!(&error, OpenError::Storage(_) | OpenError::Corrupted { .. }),
                "{error:?}"
            );
            assert!(
                read(&db_path) == bytes,
                "a refused open leaves the file as it was"
            );
            return;
        }
    };
    for i in 0..RECORDS {
        let store = store.clone();
        let got = tokio::spawn(async move { store.get::<String>(&path(i)).await })
            .await
            .unwrap_or_else(|e| panic!("reading {} panicked: {e}", path(i)));
        match got {
            Ok(Some(v)) => assert_eq!(v, common::value_for(&path(i))),
            Ok(None) => panic!("{} silently vanished", path(i)),
            Err(ReadError::Integrity { .. } | ReadError::Storage(_)) => {}
            Err(other) => panic!("{}: {other:?}", path(i)),
        }
    }
    store.close().await.unwrap();
}

/// A 4 KiB page holding records, overwritten with garbage, never makes the
/// store panic: either the open is refused with a typed error, or the open
/// succeeds and each record reads back intact or fails with a typed error
/// (at least one fails: its page is gone), and none silently vanishes.
#[tokio::test(flavor = "multi_thread")]
async fn garbled_records_page_is_a_typed_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    let db_path = common::db_file(tmp);
    let signature = {
        let db = common::open_db(tmp).await;
        let rows = db.begin_read().unwrap().records_page(None, 1).unwrap();
        let envelope = &rows[0].1.envelope;
        let signature = envelope[envelope.len() - 64..].to_vec();
        db.close().unwrap();
        signature
    };
    let mut bytes = read(&db_path);
    let pages: Vec<usize> = bytes
        .windows(signature.len())
        .enumerate()
        .filter(|(_, w)| *w == signature.as_slice())
        .map(|(at, _)| at / 4096 * 4096)
        .collect();
    assert!(!pages.is_empty(), "the row is in the file");
    for &page in &pages {
        let end = (page + 4096).min(bytes.len());
        for (k, b) in bytes[page..end].iter_mut().enumerate() {
            *b = (k as u8).wrapping_mul(151).wrapping_add(0x3b);
        }
    }
    std::fs::write(&db_path, &bytes).unwrap();

    let dir = tmp.to_path_buf();
    let opened =
        tokio::spawn(async move { common::open_when_released(|| common::config(&dir)).await })
            .await
            .expect("opening a db with a garbled page must not panic");
    let store = match opened {
        Ok(store) => store,
        Err(error) => {
            assert!(
                matches!(&error, OpenError::Storage(_) | OpenError::Corrupted { .. }),
                "{error:?}"
            );
            return;
        }
    };
    let mut failed = 0;
    for i in 0..RECORDS {
        let store = store.clone();
        let got = tokio::spawn(async move { store.get::<String>(&path(i)).await })
            .await
            .unwrap_or_else(|e| panic!("reading {} panicked: {e}", path(i)));
        match got {
            Ok(Some(v)) => assert_eq!(v, common::value_for(&path(i))),
            Ok(None) => panic!("{} silently vanished", path(i)),
            Err(ReadError::Integrity { .. } | ReadError::Storage(_)) => failed += 1,
            Err(other) => panic!("{}: {other:?}", path(i)),
        }
    }
    assert!(failed > 0, "a garbled page of rows fails some read");
    let listed = {
        let store = store.clone();
        tokio::spawn(async move { store.list::<String>("").await })
            .await
            .expect("listing must not panic")
    };
    assert!(
        listed.is_err(),
        "listing meets the garbled page: {listed:?}"
    );
    store.close().await.unwrap();
}

/// A db truncated to half its length is refused at open with a typed
/// error, and left unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_db_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    assert_damaged_db_refused(tmp, |bytes| bytes.truncate(bytes.len() / 2)).await;
}

/// A db whose format marker says a newer Persist wrote it is refused with
/// `NewerFormat` and an "upgrade" message, and left unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn newer_format_is_refused_with_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    let db_path = common::db_file(tmp);
    let original = read(&db_path);
    {
        // persist-storage refuses to write its own "format" key, so this
        // goes to redb directly, as a newer Persist would have.
        use redb::ReadableTable as _;
        const META: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("meta");
        let db = redb::Database::open(&db_path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let stored = meta.get("format").unwrap().map(|v| v.value().to_vec());
            assert_eq!(
                stored,
                Some(persist_storage::FORMAT_VERSION.to_le_bytes().to_vec()),
                "format is stored as u32 LE"
            );
            meta.insert("format", 99u32.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let newer = read(&db_path);

    let error = common::open_when_released(|| common::config(tmp))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            &error,
            OpenError::Storage(persist_storage::OpenError::NewerFormat { found: 99, .. })
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("upgrade"), "{message}");
    let after = read(&db_path);
    assert!(
        after == newer,
        "the refused open changed the file: {}",
        changed_ranges(&newer, &after)
    );

    std::fs::write(&db_path, &original).unwrap();
    assert_intact(tmp).await;
}

/// The empty path, a path over `PATH_BYTES_MAX` and a path with a NUL are
/// refused by put, get, delete and batch with `InvalidPath`, and nothing is
/// written.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    let store = common::reopen(tmp).await;
    let long = "p".repeat(PATH_BYTES_MAX + 1);
    let ok_long = "p".repeat(PATH_BYTES_MAX);
    let cases: [(&str, IsExpected); 3] = [
        ("", |e| matches!(e, PathError::Empty)),
        (
            &long,
            |e| matches!(e, PathError::TooLong { len, max } if *len == PATH_BYTES_MAX + 1 && *max == PATH_BYTES_MAX),
        ),
        ("a\0b", |e| {
            matches!(e, PathError::ControlCharacter { found: '\0', at: 1 })
        }),
    ];
    for (bad, expected) in cases {
        let shown = &bad[..bad.len().min(8)];
        match store.put(bad, &"x").await {
            Err(WriteError::InvalidPath(e)) if expected(&e) => {
                assert!(!e.to_string().is_empty())
            }
            other => panic!("put {shown:?}: {other:?}"),
        }
        match store.get::<String>(bad).await {
            Err(ReadError::InvalidPath(e)) if expected(&e) => {}
            other => panic!("get {shown:?}: {other:?}"),
        }
        match store.delete(bad).await {
            Err(WriteError::InvalidPath(e)) if expected(&e) => {}
            other => panic!("delete {shown:?}: {other:?}"),
        }
        let mut batch = store.batch();
        batch.put("data/batch", &"x").put(bad, &"x");
        match batch.commit().await {
            Err(WriteError::InvalidPath(e)) if expected(&e) => {}
            other => panic!("batch {shown:?}: {other:?}"),
        }
    }
    // The limit itself is allowed.
    store.put(&ok_long, &1u8).await.unwrap();
    assert_eq!(store.get::<u8>(&ok_long).await.unwrap(), Some(1));
    store.delete(&ok_long).await.unwrap();
    assert_eq!(store.get::<String>("data/batch").await.unwrap(), None);
    store.close().await.unwrap();
    assert_intact(tmp).await;
}

/// A value read as a type it does not decode into is `ReadError::Decode`,
/// naming the path and the type; the value stays readable as what it is.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_type_is_a_decode_error() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    filled(tmp).await;
    let store = common::reopen(tmp).await;
    let error = store
        .get::<u64>(&path(3))
        .await
        .expect_err("a string is not a u64");
    match &error {
        ReadError::Decode {
            path: p, type_name, ..
        } => {
            assert_eq!(p, &path(3));
            assert_eq!(*type_name, "u64");
        }
        other => panic!("{other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(&path(3)), "{message}");
    assert!(message.contains("u64"), "{message}");
    let error = store
        .list::<u64>("data/")
        .await
        .expect_err("list decodes too");
    assert!(matches!(error, ReadError::Decode { .. }), "{error:?}");
    store.close().await.unwrap();
    assert_intact(tmp).await;
}

/// An encrypted store opened with `encrypt(false)`, and a plain store opened
/// with `encrypt(true)`, are `EncryptionMismatch` naming the stored setting;
/// both still open with their own setting.
#[tokio::test(flavor = "multi_thread")]
async fn encryption_setting_mismatch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let encrypted = tmp.path().join("encrypted");
    filled(&encrypted).await;
    let error = common::open_when_released(|| common::config(&encrypted).encrypt(false))
        .await
        .expect_err("refused");
    assert!(
        matches!(&error, OpenError::EncryptionMismatch { stored: true, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("encrypt(true)"), "{error}");
    assert_intact(&encrypted).await;

    let plain = tmp.path().join("plain");
    let store = common::open_when_released(|| common::config(&plain).encrypt(false))
        .await
        .unwrap();
    store.put("p/1", &"plain").await.unwrap();
    store.close().await.unwrap();
    let error = common::open_when_released(|| common::config(&plain))
        .await
        .expect_err("refused");
    assert!(
        matches!(&error, OpenError::EncryptionMismatch { stored: false, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("encrypt(false)"), "{error}");
    assert!(
        !common::key_file(&plain).exists(),
        "no key was made for the plain store"
    );
    let store = common::open_when_released(|| common::config(&plain).encrypt(false))
        .await
        .unwrap();
    assert_eq!(
        store.get::<String>("p/1").await.unwrap().as_deref(),
        Some("plain")
    );
    store.close().await.unwrap();
}
