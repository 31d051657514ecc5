//! Devices of one store syncing through relay processes: two of them, and
//! waiting until they agree.

// Test code: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use persist::{Config, KdfParams, Remote, Store, SyncConfig};
use serde_bytes::ByteBuf;

/// How long devices get to agree.
const SETTLE: Duration = Duration::from_secs(20);

pub fn device(tmp: &Path, name: &str) -> Config {
    Config::new(tmp.join(name).join("store"))
        .key_file(tmp.join(name).join("keys").join("k.key"))
        .name(name)
        .dangerous()
        .export_kdf(KdfParams::insecure_for_tests())
        .done()
}

/// Device A (creating the store) on `remote_a`, and device B (joining from
/// A's export) on `remote_b`.
pub async fn pair(tmp: &Path, remote_a: &Remote, remote_b: &Remote) -> (Store, Store) {
    let a = Store::open(device(tmp, "a").sync(SyncConfig::new(remote_a.clone())))
        .await
        .expect("open a");
    let export = a.crypto().export_key_with("pw").await.expect("export");
    let b = Store::open(
        device(tmp, "b")
            .key(&export.export, "pw")
            .sync(SyncConfig::new(remote_b.clone())),
    )
    .await
    .expect("open b");
    (a, b)
}

/// Syncs both devices until both report synced with the same full
/// `list("")` (values as text); returns it.
pub async fn converge(a: &Store, b: &Store) -> BTreeMap<String, String> {
    let mut last = None;
    for _ in 0..SETTLE.as_millis() / 50 {
        let _ = a.sync_now().await;
        let _ = b.sync_now().await;
        let la: BTreeMap<String, String> = a.list("").await.unwrap().into_iter().collect();
        let lb: BTreeMap<String, String> = b.list("").await.unwrap().into_iter().collect();
        let synced = a.sync_status().unwrap().synced && b.sync_status().unwrap().synced;
        if synced && la == lb {
            return la;
        }
        last = Some((la.len(), lb.len(), a.sync_status(), b.sync_status()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the devices did not converge: {last:#?}");
}

/// [`converge`] for stores whose values are bytes.
pub async fn converge_bytes(a: &Store, b: &Store) {
    for _ in 0..SETTLE.as_millis() / 50 {
        let _ = a.sync_now().await;
        let _ = b.sync_now().await;
        let la: Vec<(String, ByteBuf)> = a.list("").await.unwrap();
        let lb: Vec<(String, ByteBuf)> = b.list("").await.unwrap();
        if a.sync_status().unwrap().synced && b.sync_status().unwrap().synced && la == lb {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the devices did not converge");
}

/// Syncs `b` until it has applied remote writes beyond `pulled_before`
/// (its status count before the writes were made) and holds nothing:
/// every envelope it pulled opened, its keys included.
pub async fn pull_until_applied(b: &Store, pulled_before: u64) {
    for _ in 0..SETTLE.as_millis() / 50 {
        let _ = b.sync_now().await;
        let status = b.sync_status().unwrap();
        if status.pulled > pulled_before && status.synced && status.held == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "b pulled the new writes and holds nothing: {:?}",
        b.sync_status()
    );
}
