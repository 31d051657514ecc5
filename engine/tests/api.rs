//! The public API end to end: watch, batches, listing, large values, the
//! value size limit, concurrent writers, reopening, and status.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers as well as tests: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use futures::StreamExt as _;
use persist::{Change, Store, VALUE_BYTES_MAX, WriteError};
use serde_bytes::ByteBuf;

/// The next change from a watch, or a failure after a generous wait.
async fn next_change(
    watch: &mut (impl futures::Stream<Item = Result<Change, persist::Lagged>> + Unpin),
) -> Change {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a change arrives")
        .expect("the watch is open")
        .expect("the watcher did not lag")
}

/// A watch on a prefix sees the puts and deletes under it, in the order
/// they happened, with their values, and nothing outside it.
#[tokio::test(flavor = "multi_thread")]
async fn watch_sees_changes_under_its_prefix_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let store = common::open(tmp.path()).await;
    let mut watch = Box::pin(store.watch("a/"));
    store.put("a/1", &"one").await.unwrap();
    store.put("b/1", &"elsewhere").await.unwrap();
    store.put("ab", &"not under a/").await.unwrap();
    store.put("a/2", &2u32).await.unwrap();
    store.delete("a/1").await.unwrap();
    store.delete("b/1").await.unwrap();
    let mut batch = store.batch();
    batch.put("a/3", &"three").put("b/2", &"elsewhere");
    batch.commit().await.unwrap();
    store.put("a/end", &"end").await.unwrap();

    let mut seen = Vec::new();
    loop {
        let change = next_change(&mut watch).await;
        let done = change.path() == "a/end";
        seen.push(change);
        if done {
            break;
        }
    }
    let summary: Vec<(String, Option<String>)> = seen
        .iter()
        .map(|c| {
            let value = match c {
                Change::Put { .. } if c.path() == "a/2" => {
                    c.value::<u32>().unwrap().map(|v| v.to_string())
                }
                _ => c.value::<String>().unwrap(),
            };
            (c.path().to_owned(), value)
        })
        .collect();
    let expected: Vec<(String, Option<String>)> = vec![
        ("a/1".into(), Some("one".into())),
        ("a/2".into(), Some("2".into())),
        ("a/1".into(), None),
        ("a/3".into(), Some("three".into())),
        ("a/end".into(), Some("end".into())),
    ];
    assert_eq!(summary, expected);
    assert!(matches!(seen[2], Change::Delete { .. }));
    store.close().await.unwrap();
}

/// A batch's writes become visible together at commit, and a batch with one
/// bad write stores none of them.
#[tokio::test(flavor = "multi_thread")]
async fn batch_commits_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let store = common::open(tmp.path()).await;
    store.put("batch/old", &"old").await.unwrap();

    let mut batch = store.batch();
    for i in 0..50 {
        batch.put(&format!("batch/{i:02}"), &i);
    }
    batch.delete("batch/old");
    assert_eq!(batch.len(), 51);
    assert_eq!(
        store.get::<i32>("batch/00").await.unwrap(),
        None,
        "nothing before commit"
    );
    assert_eq!(
        store.get::<String>("batch/old").await.unwrap().as_deref(),
        Some("old")
    );
    batch.commit().await.unwrap();
    let all: Vec<(String, i32)> = store.list("batch/").await.unwrap();
    assert_eq!(
        all,
        (0..50)
            .map(|i| (format!("batch/{i:02}"), i))
            .collect::<Vec<_>>(),
        "every put visible, the delete applied"
    );

    let mut bad = store.batch();
    bad.put("batch/new", &1).put("batch/00", &100).put("", &2);
    assert!(matches!(
        bad.commit().await,
        Err(WriteError::InvalidPath(_))
    ));
    let mut too_big = store.batch();
    too_big
        .put("batch/new", &1)
        .put("batch/big", &ByteBuf::from(vec![0u8; VALUE_BYTES_MAX]));
    assert!(matches!(
        too_big.commit().await,
        Err(WriteError::TooLarge { .. })
    ));
    assert_eq!(store.get::<i32>("batch/new").await.unwrap(), None);
    assert_eq!(store.get::<i32>("batch/00").await.unwrap(), Some(0));
    assert!(store.batch().is_empty());
    store.batch().commit().await.unwrap();
    store.close().await.unwrap();
}

/// `list` returns the live records under a prefix sorted by path, whatever
/// order they were written in.
#[tokio::test(flavor = "multi_thread")]
async fn list_is_sorted_and_filtered() {
    let tmp = tempfile::tempdir().unwrap();
    let store = common::open(tmp.path()).await;
    let mut order: Vec<u32> = (0..200).collect();
    // A fixed shuffle: the write order has nothing to do with path order.
    for i in 0..order.len() {
        order.swap(i, (i * 7919 + 13) % 200);
    }
    for &n in &order {
        store.put(&format!("list/{n}"), &n).await.unwrap();
    }
    store.put("lisp", &0u32).await.unwrap();
    store.put("other/1", &1u32).await.unwrap();
    store.delete("list/42").await.unwrap();

    let listed: Vec<(String, u32)> = store.list("list/").await.unwrap();
    let mut expected: Vec<(String, u32)> = (0..200)
        .filter(|&n| n != 42)
        .map(|n| (format!("list/{n}"), n))
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(listed[0].0, "list/0");
    assert_eq!(listed[1].0, "list/1");
    assert_eq!(listed[2].0, "list/10", "byte order, not numeric order");
    let everything: Vec<(String, u32)> = store.list("").await.unwrap();
    assert_eq!(everything.len(), 199 + 2);
    assert!(everything.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(store.list::<u32>("nothing/").await.unwrap().is_empty());
    store.close().await.unwrap();
}

/// A 1 MiB value round trips, also after reopening; a value whose encoding
/// is exactly `VALUE_BYTES_MAX` is stored, one byte more is `TooLarge`.
#[tokio::test(flavor = "multi_thread")]
async fn large_values_and_the_size_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let store = common::open(tmp.path()).await;
    let mib: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    store
        .put("big/1mib", &ByteBuf::from(mib.clone()))
        .await
        .unwrap();
    let got: ByteBuf = store.get("big/1mib").await.unwrap().unwrap();
    assert!(got.as_slice() == mib.as_slice(), "1 MiB round trip");

    // A CBOR byte string of n >= 65536 bytes has a 5-byte head.
    let at_limit = ByteBuf::from(vec![7u8; VALUE_BYTES_MAX - 5]);
    store.put("big/limit", &at_limit).await.unwrap();
    let over = ByteBuf::from(vec![7u8; VALUE_BYTES_MAX - 4]);
    match store.put("big/over", &over).await {
        Err(WriteError::TooLarge { path, len, max }) => {
            assert_eq!(path, "big/over");
            assert_eq!(len, VALUE_BYTES_MAX + 1);
            assert_eq!(max, VALUE_BYTES_MAX);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get::<ByteBuf>("big/over").await.unwrap(), None);
    store.close().await.unwrap();

    let store = common::open(tmp.path()).await;
    let got: ByteBuf = store.get("big/1mib").await.unwrap().unwrap();
    assert!(got.as_slice() == mib.as_slice(), "1 MiB after reopen");
    let got: ByteBuf = store.get("big/limit").await.unwrap().unwrap();
    assert!(got == at_limit, "the largest value after reopen");
    store.close().await.unwrap();
}

/// 32 tasks writing 50 records each at once: every write is readable
/// afterwards, and again after reopening.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = common::open(tmp.path()).await;
    let mut tasks = Vec::new();
    for t in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let path = format!("c/{t:02}/{i:02}");
                store.put(&path, &common::value_for(&path)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let check = |store: Store| async move {
        for t in 0..32 {
            for i in 0..50 {
                let path = format!("c/{t:02}/{i:02}");
                assert_eq!(
                    store.get::<String>(&path).await.unwrap(),
                    Some(common::value_for(&path)),
                    "{path}"
                );
            }
        }
        assert_eq!(store.list::<String>("c/").await.unwrap().len(), 32 * 50);
        assert_eq!(store.status().await.unwrap().records, 32 * 50);
        store.close().await.unwrap();
    };
    check(store).await;
    check(common::open(tmp.path()).await).await;
}

/// `close` returns only once the database is released: the store can be
/// opened again at once, every time.
#[tokio::test(flavor = "multi_thread")]
async fn close_releases_the_database_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..20u32 {
        let store = Store::open(common::config(tmp.path()))
            .await
            .unwrap_or_else(|e| panic!("open {i} right after close {}: {e}", i.wrapping_sub(1)));
        if i > 0 {
            assert_eq!(
                store.get::<u32>(&format!("cycle/{}", i - 1)).await.unwrap(),
                Some(i - 1)
            );
        }
        store.put(&format!("cycle/{i}"), &i).await.unwrap();
        store.close().await.unwrap();
    }
}

/// What was written before `close` reads back after reopening, deletes
/// included, and the store keeps its identity.
#[tokio::test(flavor = "multi_thread")]
async fn reopen_reads_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let store = common::open(tmp.path()).await;
    let info = store.info().clone();
    for i in 0..100 {
        store.put(&format!("r/{i:03}"), &i).await.unwrap();
    }
    for i in (0..100).step_by(10) {
        store.delete(&format!("r/{i:03}")).await.unwrap();
    }
    store.put("r/050", &-50).await.unwrap();
    store.close().await.unwrap();

    let store = common::open(tmp.path()).await;
    assert_eq!(store.info(), &info, "same store, same device");
    let all: Vec<(String, i32)> = store.list("r/").await.unwrap();
    let expected: Vec<(String, i32)> = (0..100)
        .filter(|i| i % 10 != 0 || *i == 50)
        .map(|i| (format!("r/{i:03}"), if i == 50 { -50 } else { i }))
        .collect();
    assert_eq!(all, expected);
    assert_eq!(store.get::<i32>("r/010").await.unwrap(), None);
    store.close().await.unwrap();
}

/// `status` counts live records, shows epoch 1 current sealing every stored
/// row (tombstones included), and names the keyfile as the key source.
#[tokio::test(flavor = "multi_thread")]
async fn status_reports_counts_epoch_and_key_source() {
    let tmp = tempfile::tempdir().unwrap();
    let store = common::open(tmp.path()).await;
    let empty = store.status().await.unwrap();
    assert_eq!(empty.records, 0);
    for i in 0..25 {
        store.put(&format!("s/{i}"), &i).await.unwrap();
    }
    for i in 0..5 {
        store.delete(&format!("s/{i}")).await.unwrap();
    }
    let status = store.status().await.unwrap();
    assert_eq!(status.records, 20, "live records");
    assert!(status.encrypted);
    assert_eq!(status.current_epoch, 1);
    assert_eq!(status.epochs.len(), 1, "{:?}", status.epochs);
    assert_eq!(status.epochs[0].epoch, 1);
    assert_eq!(status.epochs[0].state, "current");
    assert_eq!(status.epochs[0].records, 25, "rows, tombstones included");
    let key_source = status
        .key_source
        .clone()
        .expect("an encrypted store has a key");
    let key_file = common::key_file(tmp.path()).display().to_string();
    assert!(key_source.contains(&key_file), "{key_source}");
    assert_eq!(status.store_id, store.info().store_id.to_string());
    assert_eq!(status.device_id, store.info().device_id.to_string());
    assert_eq!(status.name, "device");
    store.close().await.unwrap();

    let store = common::open(tmp.path()).await;
    let reopened = store.status().await.unwrap();
    assert_eq!(reopened, status, "status survives reopening");
    store.close().await.unwrap();
}
