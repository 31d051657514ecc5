//! Several devices of one store, each in its own directory under a test's
//! temp dir, syncing through a relay node run in the test process over
//! real QUIC on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use persist::{Config, KdfParams, Remote};
use persist_relay::{Admission, RelayConfig, RelayHandle};
use persist_storage::relay::{RedbRelay, RelayBackend};

/// How long a test waits for something sync does in the background.
pub(crate) const SETTLE: Duration = Duration::from_secs(20);

/// A relay node on `backend`, its files in `dir`, admitting as `admission`.
pub(crate) async fn relay_on<B: RelayBackend + 'static>(
    dir: &Path,
    backend: B,
    admission: Admission,
) -> RelayHandle {
    std::fs::create_dir_all(dir).unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = RelayConfig::new(listen, dir);
    config.admission = admission;
    persist_relay::start(config, backend)
        .await
        .expect("relay starts")
}

/// A relay node on redb in `dir`, admitting as `admission`.
pub(crate) async fn relay_with(dir: &Path, admission: Admission) -> RelayHandle {
    std::fs::create_dir_all(dir).unwrap();
    let backend = RedbRelay::open(&dir.join("relay.redb")).expect("relay db");
    relay_on(dir, backend, admission).await
}

/// A relay node on redb in `dir` that admits any new store.
pub(crate) async fn relay(dir: &Path) -> RelayHandle {
    relay_with(dir, Admission::default()).await
}

/// The relay as a pinned remote.
pub(crate) fn remote(relay: &RelayHandle) -> Remote {
    let url = format!("quic://{}", relay.addr());
    Remote::pinned(&url, &relay.pin().to_string()).expect("remote")
}

/// Device `name`: its store in `tmp/name/store`, its key in a keyfile
/// beside it, cheap export costs.
pub(crate) fn device(tmp: &Path, name: &str) -> Config {
    Config::new(tmp.join(name).join("store"))
        .key_file(tmp.join(name).join("keys").join("k.key"))
        .name(name)
        .dangerous()
        .export_kdf(KdfParams::insecure_for_tests())
        .done()
}

/// Asserts that a failed join left neither a database nor a device key.
pub(crate) fn nothing_written(tmp: &Path, name: &str) {
    let db = tmp.join(name).join("store").join(persist::DB_FILE);
    assert!(!db.exists(), "a failed join left {}", db.display());
    assert!(
        !tmp.join(name).join("keys").join("k.key").exists(),
        "a failed join left a device key"
    );
}

/// Polls `check` every 20 ms until it holds, failing after [`SETTLE`].
pub(crate) async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    const POLL: Duration = Duration::from_millis(20);
    for _ in 0..SETTLE.as_millis() / POLL.as_millis() {
        if check().await {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out: {what}");
}
