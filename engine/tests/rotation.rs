//! Key rotation: background re-encryption that loses nothing and never
//! overwrites a concurrent write.

use std::collections::BTreeMap;

use persist::{Config, KdfParams, Store};

fn config(dir: &std::path::Path) -> Config {
    Config::new(dir.join("store"))
        .key_file(dir.join("keys/device.key"))
        .dangerous()
        .export_kdf(KdfParams::insecure_for_tests())
        .done()
}

fn epochs(status: &persist::Status) -> BTreeMap<u32, (&'static str, u64)> {
    status
        .epochs
        .iter()
        .map(|e| (e.epoch, (e.state, e.records)))
        .collect()
}

/// After a rotation finishes, every record is under the new epoch, reads
/// back byte-identical, and the old epoch is retired with no records.
#[tokio::test(flavor = "multi_thread")]
async fn rotation_reseals_everything_and_retires_the_old_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let n = 3_000u32;
    let mut batch = store.batch();
    for i in 0..n {
        batch.put(&format!("r/{i}"), &format!("value {i}"));
    }
    batch.commit().await.unwrap();
    store.delete("r/0").await.unwrap();

    let rotation = store.crypto().rotate_key().await.unwrap();
    assert_eq!(rotation.epoch(), 2);
    let done = rotation.wait().await.unwrap();
    assert!(!done.active);

    let status = store.status().await.unwrap();
    assert_eq!(status.current_epoch, 2);
    let e = epochs(&status);
    assert_eq!(e[&1], ("retired", 0), "{e:?}");
    assert_eq!(
        e[&2],
        ("current", u64::from(n)),
        "tombstone included: {e:?}"
    );
    assert_eq!(status.records, u64::from(n - 1));
    for i in 1..n {
        let v: Option<String> = store.get(&format!("r/{i}")).await.unwrap();
        assert_eq!(v.as_deref(), Some(format!("value {i}").as_str()));
    }
    assert_eq!(store.get::<String>("r/0").await.unwrap(), None);

    assert_eq!(store.crypto().purge_retired_keys().await.unwrap(), vec![1]);
    let status = store.status().await.unwrap();
    assert_eq!(epochs(&status)[&1].0, "purged");
    store.close().await.unwrap();

    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(
        store.get::<String>("r/7").await.unwrap().as_deref(),
        Some("value 7")
    );
    assert_eq!(store.status().await.unwrap().current_epoch, 2);
    store.close().await.unwrap();
}

/// Puts and deletes issued while a rotation runs all survive: a reseal
/// never replaces a newer write.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writes_win_over_reseals() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let n = 4_000u32;
    let mut batch = store.batch();
    for i in 0..n {
        batch.put(&format!("k/{i}"), &0u32);
    }
    batch.commit().await.unwrap();
    let rotation = store.crypto().rotate_key().await.unwrap();
    // Overwrite every third record and delete every seventh while the
    // Rotator walks the table.
    for i in (0..n).step_by(3) {
        store.put(&format!("k/{i}"), &1u32).await.unwrap();
    }
    for i in (0..n).step_by(7) {
        store.delete(&format!("k/{i}")).await.unwrap();
    }
    rotation.wait().await.unwrap();
    for i in 0..n {
        let got: Option<u32> = store.get(&format!("k/{i}")).await.unwrap();
        let want = if i % 7 == 0 {
            None
        } else if i % 3 == 0 {
            Some(1)
        } else {
            Some(0)
        };
        assert_eq!(got, want, "k/{i}");
    }
    let e = epochs(&store.status().await.unwrap());
    assert_eq!(e[&1], ("retired", 0), "{e:?}");
    store.close().await.unwrap();
}

/// Rotating again while a rotation runs moves two epochs on and one pass
/// finishes both.
#[tokio::test(flavor = "multi_thread")]
async fn rotating_twice_in_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let mut batch = store.batch();
    for i in 0..2_000u32 {
        batch.put(&format!("k/{i}"), &i);
    }
    batch.commit().await.unwrap();
    let first = store.crypto().rotate_key().await.unwrap();
    let second = store.crypto().rotate_key().await.unwrap();
    assert_eq!((first.epoch(), second.epoch()), (2, 3));
    second.wait().await.unwrap();
    let e = epochs(&store.status().await.unwrap());
    assert_eq!(e[&1], ("retired", 0), "{e:?}");
    assert_eq!(e[&2], ("retired", 0), "{e:?}");
    assert_eq!(e[&3], ("current", 2_000), "{e:?}");
    assert_eq!(store.get::<u32>("k/1999").await.unwrap(), Some(1999));
    store.close().await.unwrap();
}

/// An export opens the store's records on a new device (a copied
/// database), and an empty directory joins the store with no records.
#[tokio::test(flavor = "multi_thread")]
async fn export_import_on_a_copy_and_on_an_empty_dir() {
    let a = tempfile::tempdir().unwrap();
    let store = Store::open(config(a.path())).await.unwrap();
    store.put("x", &"one").await.unwrap();
    store
        .crypto()
        .rotate_key()
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    store.put("y", &"two").await.unwrap();
    let export = store.crypto().export_key().await.unwrap();
    let pass = export.passphrase.as_ref().unwrap().expose().to_owned();
    let store_id = store.info().store_id;
    let device_a = store.info().device_id;
    store.close().await.unwrap();

    // A copy of the database, new key directory.
    let b = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(b.path().join("store")).unwrap();
    std::fs::copy(
        a.path().join("store").join(persist::DB_FILE),
        b.path().join("store").join(persist::DB_FILE),
    )
    .unwrap();
    let wrong = Store::open(config(b.path()).key(&export.export, "not it")).await;
    assert!(
        matches!(wrong, Err(persist::OpenError::Import(_))),
        "wrong passphrase"
    );
    let copy = Store::open(config(b.path()).key(&export.export, &pass))
        .await
        .unwrap();
    assert_eq!(copy.info().store_id, store_id);
    assert_ne!(
        copy.info().device_id,
        device_a,
        "a new device makes its own identity"
    );
    assert_eq!(
        copy.get::<String>("x").await.unwrap().as_deref(),
        Some("one")
    );
    assert_eq!(
        copy.get::<String>("y").await.unwrap().as_deref(),
        Some("two")
    );
    copy.close().await.unwrap();
    // Reopening needs no export any more.
    let copy = Store::open(config(b.path())).await.unwrap();
    assert_eq!(
        copy.get::<String>("y").await.unwrap().as_deref(),
        Some("two")
    );
    copy.close().await.unwrap();

    // An empty directory joins the store; records arrive with sync.
    let c = tempfile::tempdir().unwrap();
    let joined = Store::open(config(c.path()).key(&export.export, &pass))
        .await
        .unwrap();
    assert_eq!(joined.info().store_id, store_id);
    assert_eq!(joined.status().await.unwrap().records, 0);
    assert_eq!(joined.status().await.unwrap().current_epoch, 2);
    joined.close().await.unwrap();

    // An export of another store for an existing store: refused, untouched.
    let other = tempfile::tempdir().unwrap();
    let other_store = Store::open(config(other.path())).await.unwrap();
    let other_export = other_store.crypto().export_key_with("pw").await.unwrap();
    other_store.close().await.unwrap();
    let key_before = std::fs::read(b.path().join("keys/device.key")).unwrap();
    let refused = Store::open(config(b.path()).key(&other_export.export, "pw")).await;
    assert!(matches!(
        refused,
        Err(persist::OpenError::ImportForOtherStore { .. })
    ));
    assert!(
        std::fs::read(b.path().join("keys/device.key")).unwrap() == key_before,
        "a refused import leaves the device key alone"
    );
    let copy = Store::open(config(b.path())).await.unwrap();
    assert_eq!(
        copy.info().store_id,
        store_id,
        "a refused import leaves the store alone"
    );
    assert_eq!(
        copy.get::<String>("x").await.unwrap().as_deref(),
        Some("one")
    );
    copy.close().await.unwrap();
}

/// A store opened read-only refuses writes and key changes with typed
/// errors, runs no re-encryption, and is left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn read_only_refuses_rotation_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    store.put("a", &1u8).await.unwrap();
    store.close().await.unwrap();

    let ro = Store::open(config(dir.path()).read_only()).await.unwrap();
    assert!(matches!(
        ro.crypto().rotate_key().await,
        Err(persist::KeyError::ReadOnly)
    ));
    assert!(matches!(
        ro.crypto().purge_retired_keys().await,
        Err(persist::KeyError::ReadOnly)
    ));
    assert!(matches!(
        ro.put("b", &2u8).await,
        Err(persist::WriteError::ReadOnly)
    ));
    assert!(matches!(
        ro.delete("a").await,
        Err(persist::WriteError::ReadOnly)
    ));
    assert_eq!(ro.get::<u8>("a").await.unwrap(), Some(1));
    let status = ro.status().await.unwrap();
    assert_eq!((status.current_epoch, status.records), (1, 1));
    ro.close().await.unwrap();

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::open(config(empty.path()).read_only()).await,
        Err(persist::OpenError::NoStore { .. })
    ));
    assert!(
        !empty.path().join("store").exists(),
        "a read-only open creates nothing"
    );
}

/// 100k records: after rotation none is under the old epoch, every value is
/// byte-identical, and the old epoch is retired. After a purge, no byte of
/// the purged key is anywhere in the store directory.
#[tokio::test(flavor = "multi_thread")]
async fn rotation_of_100k_records_then_purge() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let n = 100_000u32;
    let value = |i: u32| -> serde_bytes::ByteBuf {
        serde_bytes::ByteBuf::from(
            (0..64u32)
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect::<Vec<u8>>(),
        )
    };
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let mut batch = store.batch();
        for &i in chunk {
            batch.put(&format!("big/{i}"), &value(i));
        }
        batch.commit().await.unwrap();
    }
    let old_keys = persist_core::export::ExportedKeys::unwrap(
        &store.crypto().dangerous().export_raw().await.unwrap(),
        "",
    )
    .unwrap();
    let old_key = *old_keys.epochs[0].1.key.as_ref().unwrap().expose();

    store
        .crypto()
        .rotate_key()
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    let e = epochs(&store.status().await.unwrap());
    assert_eq!(e[&1], ("retired", 0), "{e:?}");
    assert_eq!(e[&2], ("current", u64::from(n)), "{e:?}");
    for i in (0..n).step_by(97).chain([n - 1]) {
        let got: serde_bytes::ByteBuf = store.get(&format!("big/{i}")).await.unwrap().unwrap();
        assert!(got == value(i), "big/{i} changed");
    }
    let listed: Vec<(String, serde_bytes::ByteBuf)> = store.list("big/").await.unwrap();
    assert_eq!(listed.len(), n as usize);

    assert_eq!(store.crypto().purge_retired_keys().await.unwrap(), vec![1]);
    store.close().await.unwrap();
    let mut hits = Vec::new();
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        if bytes.windows(32).any(|w| w == old_key) {
            hits.push(entry.clone());
        }
        let hex_key = hex::encode(old_key);
        if String::from_utf8_lossy(&bytes).contains(&hex_key) {
            hits.push(entry);
        }
    }
    assert!(hits.is_empty(), "purged key bytes found in {hits:?}");
    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(epochs(&store.status().await.unwrap())[&1].0, "purged");
    let got: serde_bytes::ByteBuf = store.get("big/5").await.unwrap().unwrap();
    assert!(got == value(5));
    store.close().await.unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for path in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
    {
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A fault plan that makes every rotation slice one record and stops the
/// Rotator between every two slices (its supervisor restarts it each
/// time), counting the stops.
#[derive(Default)]
struct StopRotator {
    stops: std::sync::atomic::AtomicU64,
}

impl persist::FaultPlan for StopRotator {
    fn fire(&self, point: persist::FaultPoint) -> Option<u64> {
        match point {
            persist::FaultPoint::RotationStop => {
                self.stops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Some(0)
            }
            persist::FaultPoint::RotationSmallSlice => Some(0),
            _ => None,
        }
    }
}

/// A Rotator that fails after every slice (its supervisor restarts it
/// each time, and it resumes from its persisted cursor) still reseals
/// everything, finishes, and says so: `wait` returns and status reports
/// no rotation running.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_finishes_when_the_rotator_restarts_after_every_slice() {
    let dir = tempfile::tempdir().unwrap();
    let plan = std::sync::Arc::new(StopRotator::default());
    let store = Store::open(
        config(dir.path())
            .dangerous()
            .faults(persist::Faults::new(plan.clone()))
            .done(),
    )
    .await
    .unwrap();
    for i in 0..10 {
        store
            .put(&format!("r/{i}"), &format!("value {i}"))
            .await
            .unwrap();
    }
    let rotation = store.crypto().rotate_key().await.unwrap();
    let done = tokio::time::timeout(std::time::Duration::from_secs(60), rotation.wait())
        .await
        .expect("the rotation never reported finishing")
        .unwrap();
    assert!(!done.active);
    assert!(
        plan.stops.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the Rotator was never stopped"
    );
    let status = store.status().await.unwrap();
    assert!(!status.rotation.active, "{:?}", status.rotation);
    assert_eq!(epochs(&status)[&1], ("retired", 0));
    for i in 0..10 {
        let v: Option<String> = store.get(&format!("r/{i}")).await.unwrap();
        assert_eq!(v.as_deref(), Some(format!("value {i}").as_str()));
    }
    store.close().await.unwrap();
}
