//! The relay backends: the conformance suite (written once, in
//! `persist_storage::relay::conformance`) against [`MemoryRelay`] and
//! [`RedbRelay`], and what only the redb file can show: persistence across
//! reopening, and files it must refuse.

// Test helpers unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use persist_storage::relay::conformance::{
    self, AppendOp, fingerprint, incoming, locator, precedence, store,
};
use persist_storage::relay::{
    MemoryRelay, RELAY_FORMAT_VERSION, RedbRelay, RelayBackend, RelayOpenError,
};
use persist_storage::{LocalDb, Row};
use proptest::prelude::*;
use tempfile::TempDir;

mod memory {
    use super::*;

    async fn fresh() -> (MemoryRelay, ()) {
        (MemoryRelay::new(), ())
    }

    persist_storage::relay_conformance_tests!(fresh);
}

mod redb_file {
    use super::*;

    async fn fresh() -> (RedbRelay, TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let relay = RedbRelay::open(&dir.path().join("relay.redb")).unwrap();
        (relay, dir)
    }

    persist_storage::relay_conformance_tests!(fresh);

    /// The same checks where the blocking seam really moves work off the
    /// worker (`block_in_place`), not inline as on a current-thread runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_pass_on_a_multi_threaded_runtime() {
        let (relay, _dir) = fresh().await;
        conformance::append_keeps_the_highest_precedence(&relay).await;
        let (relay, _dir) = fresh().await;
        conformance::watch_publishes_growth(&relay).await;
        let (relay, _dir) = fresh().await;
        conformance::mailboxes_put_fetch_and_ack(&relay).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_on_memory() {
    conformance::concurrent_appends_share_one_sequence(Arc::new(MemoryRelay::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RedbRelay::open(&dir.path().join("relay.redb")).unwrap();
    conformance::concurrent_appends_share_one_sequence(Arc::new(relay)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rekeys_on_memory() {
    conformance::concurrent_rekeys_from_one_credential(Arc::new(MemoryRelay::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rekeys_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RedbRelay::open(&dir.path().join("relay.redb")).unwrap();
    conformance::concurrent_rekeys_from_one_credential(Arc::new(relay)).await;
}

#[tokio::test]
async fn redb_keeps_a_rekeyed_credential_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    conformance::reopen_keeps_a_rekeyed_credential(|| {
        let path = path.clone();
        async move { RedbRelay::open(&path).unwrap() }
    })
    .await;
}

#[tokio::test]
async fn redb_keeps_data_and_sequence_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    conformance::reopen_keeps_data_and_sequence(|| {
        let path = path.clone();
        async move { RedbRelay::open(&path).unwrap() }
    })
    .await;
}

fn append_ops() -> impl Strategy<Value = Vec<AppendOp>> {
    let op = (
        0u8..3,
        0u8..6,
        0u64..4,
        0u8..2,
        1u32..3,
        any::<u8>(),
        proptest::bool::weighted(0.3),
    )
        .prop_map(
            |(store, locator, ms, origin, epoch, padding, ends_call)| AppendOp {
                store,
                locator,
                ms,
                origin,
                epoch,
                padding,
                ends_call,
            },
        );
    proptest::collection::vec(op, 0..60)
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

proptest! {
    #[test]
    fn memory_keeps_the_highest_precedence_per_locator(ops in append_ops()) {
        current_thread().block_on(async {
            conformance::random_appends_match_model(&MemoryRelay::new(), &ops).await;
        });
    }
}

proptest! {
    // Every append call is a durable commit: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn redb_keeps_the_highest_precedence_per_locator(ops in append_ops()) {
        let dir = tempfile::tempdir().unwrap();
        let relay = RedbRelay::open(&dir.path().join("relay.redb")).unwrap();
        current_thread().block_on(async {
            conformance::random_appends_match_model(&relay, &ops).await;
        });
    }
}

/// A relay database with one store and a few entries, closed.
fn populated(dir: &Path) -> PathBuf {
    let path = dir.join("relay.redb");
    let relay = RedbRelay::open(&path).unwrap();
    current_thread().block_on(async {
        relay
            .open_store(&store(1), &fingerprint(1), true)
            .await
            .unwrap();
        let entries = (0..20)
            .map(|n| incoming(locator(n), precedence(1, 1, 1), &[n; 300]))
            .collect();
        relay.append(&store(1), entries).await.unwrap();
    });
    drop(relay);
    path
}

fn refused(path: &Path) -> RelayOpenError {
    let before = std::fs::read(path).unwrap();
    let err = RedbRelay::open(path).unwrap_err();
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "a refused file is left as it was"
    );
    err
}

#[test]
fn garbage_is_refused_as_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, garbage).unwrap();
    let err = refused(&path);
    assert!(
        matches!(&err, RelayOpenError::Corrupted { path: p, .. } if *p == path),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("relay database"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn a_truncated_file_is_refused_as_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let err = refused(&path);
    assert!(matches!(err, RelayOpenError::Corrupted { .. }), "{err:?}");
}

#[test]
fn a_devices_local_store_is_not_a_relay_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let db = LocalDb::open(&path, None).unwrap();
    let mut txn = db.begin_write().unwrap();
    let row = Row {
        epoch: persist_core::Epoch::FIRST,
        tombstone: false,
        envelope: b"sealed".to_vec(),
    };
    txn.put_record(&locator(1), &row).unwrap();
    txn.commit().unwrap();
    db.close().unwrap();
    let err = refused(&path);
    assert!(
        matches!(&err, RelayOpenError::Corrupted { detail, .. } if detail.contains("relay_meta")),
        "{err:?}"
    );

    // Nor is a relay database a local store.
    let relay_path = populated(dir.path());
    assert!(LocalDb::open(&relay_path, None).is_err());
}

#[test]
fn a_newer_format_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = populated(dir.path());
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<'_, &str, &[u8]> =
                redb::TableDefinition::new("relay_meta");
            let mut meta = txn.open_table(table).unwrap();
            let newer = RELAY_FORMAT_VERSION + 1;
            meta.insert("format", newer.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let err = refused(&path);
    assert!(
        matches!(
            err,
            RelayOpenError::NewerFormat { found, supported, .. }
                if found == RELAY_FORMAT_VERSION + 1 && supported == RELAY_FORMAT_VERSION
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("upgrade the relay"), "{err}");
}

#[test]
fn a_database_in_use_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    let _first = RedbRelay::open(&path).unwrap();
    let err = RedbRelay::open(&path).unwrap_err();
    assert!(matches!(err, RelayOpenError::Locked { .. }), "{err:?}");
}

#[test]
fn an_empty_file_is_initialized() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    std::fs::write(&path, b"").unwrap();
    let relay = RedbRelay::open(&path).unwrap();
    assert_eq!(relay.path(), path);
    let stats = current_thread().block_on(relay.stats()).unwrap();
    assert_eq!(stats, Default::default());
}
