//! Opening: creation, reopening, and refusing files this build must not touch.

// Test helpers unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use persist_core::{Epoch, Locator};
use persist_storage::{Backend, LocalDb, MemoryBackend, OpenError, Row, StorageError};

fn loc(i: u32) -> Locator {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&i.to_be_bytes());
    Locator(bytes)
}

fn row(epoch: u32, tombstone: bool, envelope: &[u8]) -> Row {
    Row {
        epoch: Epoch(epoch),
        tombstone,
        envelope: envelope.to_vec(),
    }
}

/// A database file with `n` 1 KiB rows, closed cleanly.
fn populated_file(dir: &Path, n: u32) -> PathBuf {
    let path = dir.join("store.redb");
    let db = LocalDb::open(&path, None).unwrap();
    let mut txn = db.begin_write().unwrap();
    {
        let mut records = txn.records().unwrap();
        for i in 0..n {
            records
                .put(&loc(i), &row(1, false, &[i as u8; 1024]))
                .unwrap();
        }
    }
    txn.commit().unwrap();
    db.close().unwrap();
    path
}

#[test]
fn create_and_reopen_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let db = LocalDb::open(&path, None).unwrap();
        assert_eq!(db.path(), path);
        let read = db.begin_read().unwrap();
        assert_eq!(read.live_count().unwrap(), 0);
        assert_eq!(read.last_change_seq().unwrap(), 0);
        drop(read);
        let mut txn = db.begin_write().unwrap();
        assert_eq!(txn.put_record(&loc(1), &row(1, false, b"one")).unwrap(), 1);
        assert_eq!(txn.put_record(&loc(2), &row(2, true, b"two")).unwrap(), 2);
        txn.set_meta("hlc", &[9, 9]).unwrap();
        assert_eq!(txn.record(&loc(1)).unwrap(), Some(row(1, false, b"one")));
        assert_eq!(txn.meta("hlc").unwrap(), Some(vec![9, 9]));
        txn.commit().unwrap();
    }
    let db = LocalDb::open_existing(&path).unwrap();
    let read = db.begin_read().unwrap();
    assert_eq!(read.record(&loc(1)).unwrap(), Some(row(1, false, b"one")));
    assert_eq!(read.record(&loc(2)).unwrap(), Some(row(2, true, b"two")));
    assert_eq!(read.record(&loc(3)).unwrap(), None);
    assert_eq!(read.meta("hlc").unwrap(), Some(vec![9, 9]));
    assert_eq!(
        read.meta("format").unwrap(),
        Some(1u32.to_le_bytes().to_vec())
    );
    assert_eq!(read.live_count().unwrap(), 1);
    assert_eq!(read.row_count().unwrap(), 2);
    assert_eq!(
        read.epoch_counts().unwrap().into_iter().collect::<Vec<_>>(),
        vec![(Epoch(1), 1), (Epoch(2), 1)]
    );
    assert_eq!(
        read.changes_since(0, 10).unwrap(),
        vec![(1, loc(1)), (2, loc(2))]
    );
    assert_eq!(read.last_change_seq().unwrap(), 2);
}

#[test]
fn memory_backend_reopens_the_same_bytes() {
    let memory = MemoryBackend::default();
    let name = Path::new("memory:test");
    {
        let db = LocalDb::open(name, Some(Box::new(memory.clone()))).unwrap();
        let mut txn = db.begin_write().unwrap();
        txn.put_record(&loc(5), &row(1, false, b"canary-5"))
            .unwrap();
        txn.commit().unwrap();
    }
    assert!(!memory.snapshot().is_empty());
    let db = LocalDb::open(name, Some(Box::new(memory.clone()))).unwrap();
    assert_eq!(db.path(), name);
    let read = db.begin_read().unwrap();
    assert_eq!(
        read.record(&loc(5)).unwrap(),
        Some(row(1, false, b"canary-5"))
    );
    assert_eq!(read.last_change_seq().unwrap(), 1);
}

#[test]
fn open_existing_reports_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.redb");
    let err = LocalDb::open_existing(&path).unwrap_err();
    assert!(
        matches!(&err, OpenError::Missing { path: p } if *p == path),
        "{err:?}"
    );
    assert!(!path.exists(), "open_existing must not create the file");
    std::fs::write(&path, b"").unwrap();
    let err = LocalDb::open_existing(&path).unwrap_err();
    assert!(matches!(err, OpenError::Missing { .. }), "{err:?}");
    // `open` initializes an empty file (what a crash during creation leaves).
    LocalDb::open(&path, None).unwrap();
}

#[test]
fn second_open_reports_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _db = LocalDb::open(&path, None).unwrap();
    let err = LocalDb::open(&path, None).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
}

/// Rewrites the format marker with redb directly, as a newer Persist would.
fn set_format(db: redb::Database, format: u32) {
    const META: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("meta");
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("format", format.to_le_bytes().as_slice())
        .unwrap();
    txn.commit().unwrap();
}

#[test]
fn newer_format_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated_file(dir.path(), 10);
    set_format(redb::Database::open(&path).unwrap(), 7);
    let before = std::fs::read(&path).unwrap();

    for result in [LocalDb::open(&path, None), LocalDb::open_existing(&path)] {
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                OpenError::NewerFormat {
                    found: 7,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("written by a newer Persist (format 7, this build reads up to 1)")
                && message.contains("upgrade Persist"),
            "{message}"
        );
    }
    assert!(std::fs::read(&path).unwrap() == before, "file changed");
}

#[test]
fn newer_format_on_a_backend_is_left_untouched() {
    let memory = MemoryBackend::default();
    let name = Path::new("memory:newer");
    LocalDb::open(name, Some(Box::new(memory.clone()))).unwrap();
    // Stand in for a newer Persist by editing the image with redb.
    let image = memory.snapshot();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image.redb");
    std::fs::write(&file, &image).unwrap();
    set_format(redb::Database::open(&file).unwrap(), 2);
    let newer = MemoryBackend::from_bytes(std::fs::read(&file).unwrap());
    let before = newer.snapshot();

    let err = LocalDb::open(name, Some(Box::new(newer.clone()))).unwrap_err();
    assert!(
        matches!(err, OpenError::NewerFormat { found: 2, .. }),
        "{err:?}"
    );
    assert!(newer.snapshot() == before, "backend bytes changed");
}

fn assert_refused_untouched(path: &Path) {
    let before = std::fs::read(path).unwrap();
    for result in [LocalDb::open(path, None), LocalDb::open_existing(path)] {
        let err = result.unwrap_err();
        assert!(matches!(err, OpenError::Corrupted { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("is damaged or is not a Persist database"),
            "{err}"
        );
    }
    assert!(std::fs::read(path).unwrap() == before, "file changed");
}

#[test]
fn garbage_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.redb");
    let garbage: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    assert_refused_untouched(&path);

    let memory = MemoryBackend::from_bytes(garbage.clone());
    let err =
        LocalDb::open(Path::new("memory:garbage"), Some(Box::new(memory.clone()))).unwrap_err();
    assert!(matches!(err, OpenError::Corrupted { .. }), "{err:?}");
    assert!(memory.snapshot() == garbage);
}

#[test]
fn truncated_file_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated_file(dir.path(), 2000);
    let whole = std::fs::read(&path).unwrap();
    for len in [whole.len() / 2, whole.len() / 4, 4096, 100] {
        std::fs::write(&path, &whole[..len]).unwrap();
        assert_refused_untouched(&path);
    }
}

#[test]
fn foreign_redb_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.redb");
    {
        const OTHER: redb::TableDefinition<'_, u64, u64> = redb::TableDefinition::new("other");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(OTHER).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
    }
    assert_refused_untouched(&path);
}

/// A [`MemoryBackend`] whose writes and syncs can be made to fail.
#[derive(Debug, Clone, Default)]
struct FlakyBackend {
    inner: MemoryBackend,
    failing: Arc<AtomicBool>,
}

impl FlakyBackend {
    fn check(&self) -> std::io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected failure"));
        }
        Ok(())
    }
}

impl Backend for FlakyBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

#[test]
fn failed_commit_leaves_nothing_behind() {
    let backend = FlakyBackend::default();
    let name = Path::new("memory:flaky");
    {
        let db = LocalDb::open(name, Some(Box::new(backend.clone()))).unwrap();
        let mut txn = db.begin_write().unwrap();
        txn.put_record(&loc(1), &row(1, false, b"kept")).unwrap();
        txn.commit().unwrap();

        let mut txn = db.begin_write().unwrap();
        txn.put_record(&loc(2), &row(2, false, b"lost")).unwrap();
        txn.put_record(&loc(1), &row(2, true, b"")).unwrap();
        backend.failing.store(true, Ordering::SeqCst);
        let err = txn.commit().unwrap_err();
        assert!(
            matches!(err, StorageError::Io { .. } | StorageError::Unusable { .. }),
            "{err:?}"
        );
        // Later use reports the failure instead of panicking.
        assert!(db.begin_write().is_err());
    }
    backend.failing.store(false, Ordering::SeqCst);
    let db = LocalDb::open(name, Some(Box::new(backend))).unwrap();
    let read = db.begin_read().unwrap();
    assert_eq!(read.record(&loc(1)).unwrap(), Some(row(1, false, b"kept")));
    assert_eq!(read.record(&loc(2)).unwrap(), None);
    assert_eq!(read.live_count().unwrap(), 1);
    assert_eq!(read.last_change_seq().unwrap(), 1);
    assert_eq!(
        read.epoch_counts().unwrap().into_iter().collect::<Vec<_>>(),
        vec![(Epoch(1), 1)]
    );
}
