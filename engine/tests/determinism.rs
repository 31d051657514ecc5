//! Determinism: with the clock and randomness injected, a store is a pure
//! function of its inputs, down to the bytes of its database file.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers as well as tests: a failed unwrap is a failed test"
)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use persist::{Config, Env, ManualClock, Store};

const SEED: u64 = 0x5eed_0001;
const START_MS: u64 = 1_750_000_000_000;

/// Opens a deterministic store in `tmp` (store and keyfile at the same
/// relative layout as every other test).
async fn open_seeded(tmp: &Path, seed: u64) -> (Store, ManualClock) {
    let (env, clock) = Env::deterministic(seed, START_MS);
    let config: Config = common::config(tmp).dangerous().env(env).done();
    let store = Store::open(config).await.expect("open a seeded store");
    (store, clock)
}

/// The same sequence of writes, awaited one by one, with the clock moving
/// between them. Returns the records it leaves, as a model.
async fn workload(store: &Store, clock: &ManualClock) -> BTreeMap<String, Value> {
    let mut model = BTreeMap::new();
    for i in 0..40u64 {
        let path = format!("items/{:03}", i % 25);
        if i % 7 == 3 {
            store.delete(&path).await.expect("delete");
            model.remove(&path);
        } else {
            let value = Value::Item(i, format!("v{i}"), vec![i as u8; (i as usize) * 3]);
            store.put(&path, &value).await.expect("put");
            model.insert(path, value);
        }
        clock.advance(1 + i % 3);
    }
    let mut batch = store.batch();
    batch
        .put("batch/a", &Value::Number(1))
        .put("batch/b", &Value::Number(2))
        .delete("items/000");
    batch.commit().await.expect("batch");
    model.insert("batch/a".into(), Value::Number(1));
    model.insert("batch/b".into(), Value::Number(2));
    model.remove("items/000");
    model
}

/// Runs the workload on a fresh seeded store in `tmp` and returns its live
/// content.
async fn run(tmp: &Path, seed: u64) -> Vec<(String, Value)> {
    let (store, clock) = open_seeded(tmp, seed).await;
    let model = workload(&store, &clock).await;
    let content: Vec<(String, Value)> = store.list("").await.expect("list");
    store.close().await.expect("close");
    // Let the closed store's database handle go, so the file is final.
    common::wait_released(tmp).await;
    assert_eq!(
        content,
        model.into_iter().collect::<Vec<_>>(),
        "the store holds what the workload wrote"
    );
    content
}

/// Either shape the workload stores.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Value {
    /// `items/*`.
    Item(u64, String, Vec<u8>),
    /// `batch/*`.
    Number(u32),
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The first differing byte of two buffers, for the failure message.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "first difference at byte {i} of {} / {}; a: {:02x?} b: {:02x?}",
            a.len(),
            b.len(),
            &a[i.saturating_sub(16)..(i + 48).min(a.len())],
            &b[i.saturating_sub(16)..(i + 48).min(b.len())]
        ),
        None => format!("lengths differ: {} vs {}", a.len(), b.len()),
    }
}

/// Two stores in two temp dirs, same seed, same clock, same writes: their
/// database files and keyfiles are byte-identical, and they hold the same
/// records.
#[tokio::test(flavor = "multi_thread")]
async fn same_seed_gives_byte_identical_files() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let content_a = run(a.path(), SEED).await;
    let content_b = run(b.path(), SEED).await;
    assert_eq!(content_a, content_b, "same logical content");
    assert!(content_a.len() > 20, "the workload leaves records");

    let key_a = read(&common::key_file(a.path()));
    let key_b = read(&common::key_file(b.path()));
    assert_eq!(key_a, key_b, "same seed, same device key");

    let db_a = read(&common::db_file(a.path()));
    let db_b = read(&common::db_file(b.path()));
    assert!(
        db_a == db_b,
        "database files differ: {}",
        first_difference(&db_a, &db_b)
    );
}

/// The same run twice at the very same path (the first moved away before
/// the second starts): byte-identical database files. This isolates the
/// engine and redb from anything path-dependent.
#[tokio::test(flavor = "multi_thread")]
async fn same_seed_same_path_gives_byte_identical_files() {
    let tmp = tempfile::tempdir().unwrap();
    let content_a = run(tmp.path(), SEED).await;
    let db_a = read(&common::db_file(tmp.path()));
    let key_a = read(&common::key_file(tmp.path()));
    std::fs::rename(
        common::store_dir(tmp.path()),
        tmp.path().join("first-store"),
    )
    .unwrap();
    std::fs::rename(tmp.path().join("keys"), tmp.path().join("first-keys")).unwrap();

    let content_b = run(tmp.path(), SEED).await;
    let db_b = read(&common::db_file(tmp.path()));
    let key_b = read(&common::key_file(tmp.path()));
    assert_eq!(content_a, content_b, "same logical content");
    assert_eq!(key_a, key_b, "same seed, same device key");
    assert!(
        db_a == db_b,
        "database files differ: {}",
        first_difference(&db_a, &db_b)
    );
}

/// A different seed gives a different store: other keys, other bytes, same
/// logical content.
#[tokio::test(flavor = "multi_thread")]
async fn different_seed_gives_different_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let content_a = run(a.path(), SEED).await;
    let content_b = run(b.path(), SEED + 1).await;
    assert_eq!(content_a, content_b, "the same writes, so the same content");
    assert_ne!(
        read(&common::key_file(a.path())),
        read(&common::key_file(b.path())),
        "another seed, another device key"
    );
    assert_ne!(
        read(&common::db_file(a.path())),
        read(&common::db_file(b.path())),
        "another seed, other database bytes"
    );
}
