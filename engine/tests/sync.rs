//! Sync through a real relay node over QUIC: two devices of one store,
//! last write wins, live updates, held envelopes, and what the relay sees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use persist::{Change, Config, KdfParams, Remote, Store, SyncConfig, SyncError};
use persist_relay::{RelayConfig, RelayHandle};
use persist_storage::relay::RedbRelay;

use common::devices::until;

/// How long a test waits for something sync does in the background.
const SETTLE: Duration = Duration::from_secs(20);

struct Relay {
    handle: RelayHandle,
    dir: PathBuf,
}

async fn relay(dir: &Path) -> Relay {
    std::fs::create_dir_all(dir).unwrap();
    let backend = RedbRelay::open(&dir.join("relay.redb")).expect("relay db");
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let handle = persist_relay::start(RelayConfig::new(listen, dir), backend)
        .await
        .expect("relay starts");
    Relay {
        handle,
        dir: dir.to_owned(),
    }
}

fn remote(relay: &Relay) -> Remote {
    let url = format!("quic://{}", relay.handle.addr());
    Remote::pinned(&url, &relay.handle.pin().to_string()).expect("remote")
}

fn device(tmp: &Path, name: &str) -> Config {
    Config::new(tmp.join(name).join("store"))
        .key_file(tmp.join(name).join("keys").join("k.key"))
        .name(name)
        .dangerous()
        .export_kdf(KdfParams::insecure_for_tests())
        .done()
}

/// Device A (creating the store) and device B (joining from A's export),
/// both syncing with `remote`.
async fn pair(tmp: &Path, remote: &Remote) -> (Store, Store) {
    let a = Store::open(device(tmp, "a").sync(SyncConfig::new(remote.clone())))
        .await
        .expect("open a");
    let export = a
        .crypto()
        .export_key_with("correct horse")
        .await
        .expect("export");
    let b = Store::open(
        device(tmp, "b")
            .key(&export.export, "correct horse")
            .sync(SyncConfig::new(remote.clone())),
    )
    .await
    .expect("open b");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_sync_through_a_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let remote = remote(&relay);
    let (a, b) = pair(tmp.path(), &remote).await;

    a.put("notes/1", "from a").await.unwrap();
    b.put("notes/2", "from b").await.unwrap();
    a.sync_now().await.expect("a syncs");
    b.sync_now().await.expect("b syncs");
    a.sync_now().await.expect("a syncs again");

    for store in [&a, &b] {
        assert_eq!(
            store.get::<String>("notes/1").await.unwrap().as_deref(),
            Some("from a")
        );
        assert_eq!(
            store.get::<String>("notes/2").await.unwrap().as_deref(),
            Some("from b")
        );
        let listed: Vec<String> = store
            .list::<String>("")
            .await
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(listed, ["notes/1", "notes/2"], "member records stay hidden");
        let status = store.sync_status().expect("syncing");
        assert!(status.connected, "{status:?}");
        assert_eq!(status.refused, 0);
    }
    let status = b.sync_status().unwrap();
    assert!(status.synced, "b has nothing pending: {status:?}");
    assert_eq!(
        b.status().await.unwrap().records,
        2,
        "member records are not counted"
    );

    // Deletes sync too, and the later write wins on both.
    b.delete("notes/1").await.unwrap();
    b.sync_now().await.unwrap();
    a.sync_now().await.unwrap();
    assert_eq!(a.get::<String>("notes/1").await.unwrap(), None);

    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_arrives_live_without_sync_now() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let remote = remote(&relay);
    let (a, b) = pair(tmp.path(), &remote).await;
    b.sync_now().await.unwrap();
    let mut changes = b.watch("live/");

    a.put("live/x", &42u32).await.unwrap();
    let change = tokio::time::timeout(SETTLE, changes.next())
        .await
        .expect("the change arrives")
        .expect("stream open")
        .expect("no lag");
    assert_eq!(change.path(), "live/x");
    assert!(matches!(change, Change::Put { .. }));
    assert_eq!(change.value::<u32>().unwrap(), Some(42));
    assert_eq!(b.get::<u32>("live/x").await.unwrap(), Some(42));

    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_converge_on_the_later_one() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let remote = remote(&relay);
    let (a, b) = pair(tmp.path(), &remote).await;
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();

    for i in 0..50u32 {
        a.put(&format!("k/{}", i % 7), &format!("a{i}"))
            .await
            .unwrap();
        b.put(&format!("k/{}", i % 5), &format!("b{i}"))
            .await
            .unwrap();
    }
    until("both devices agree", async || {
        let _ = a.sync_now().await;
        let _ = b.sync_now().await;
        let (la, lb) = (
            a.list::<String>("k/").await.unwrap(),
            b.list::<String>("k/").await.unwrap(),
        );
        la == lb && la.len() == 7
    })
    .await;

    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_under_an_unknown_epoch_are_held_then_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let attack = std::sync::Arc::new(std::sync::Mutex::new(Attack::Honest));
    let backend = Malicious {
        inner: persist_storage::relay::MemoryRelay::new(),
        attack: attack.clone(),
        first_seen: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        seen: std::sync::Arc::default(),
    };
    let handle = persist_relay::start(
        RelayConfig::new("127.0.0.1:0".parse().unwrap(), tmp.path().join("relay")),
        backend,
    )
    .await
    .unwrap();
    let remote = Remote::pinned(
        &format!("quic://{}", handle.addr()),
        &handle.pin().to_string(),
    )
    .unwrap();
    let (a, b) = pair(tmp.path(), &remote).await;
    for i in 0..20 {
        a.put(&format!("a/{i}"), &format!("from a {i}"))
            .await
            .unwrap();
        b.put(&format!("b/{i}"), &format!("from b {i}"))
            .await
            .unwrap();
    }
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    a.sync_now().await.unwrap();

    // A rotates and reseals everything, B's records included. The relay
    // drops every mailbox item, so the key parcel for B never arrives: the
    // reseals and what A writes now are held on B, not dropped.
    *attack.lock().unwrap() = Attack::NoMail;
    a.crypto().rotate_key().await.unwrap().wait().await.unwrap();
    a.put("after/rotation", "secret").await.unwrap();
    a.sync_now().await.unwrap();
    let report = b.sync_now().await.unwrap();
    assert!(report.held >= 1, "{report:?}");
    assert_eq!(b.get::<String>("after/rotation").await.unwrap(), None);
    assert_eq!(
        b.get::<String>("a/3").await.unwrap().as_deref(),
        Some("from a 3"),
        "a held reseal leaves the record as it was"
    );
    assert!(!b.sync_status().unwrap().synced);

    // B imports a fresh export from A (it carries the new epoch key): the
    // held records apply. (With the mailboxes working, the key courier
    // brings the key instead: tests/pairing.rs.)
    let export = a.crypto().export_key_with("pw").await.unwrap();
    b.close().await.unwrap();
    let b = common::open_when_released(|| {
        device(tmp.path(), "b")
            .key(&export.export, "pw")
            .sync(SyncConfig::new(remote.clone()))
    })
    .await
    .expect("reopen b with the new keys");
    until("the held records apply", async || {
        let _ = b.sync_now().await;
        b.get::<String>("after/rotation").await.unwrap().as_deref() == Some("secret")
            && b.sync_status().unwrap().held == 0
    })
    .await;

    // Both end with every record under the new epoch, and agree.
    until(
        "no record under the old epoch on either device",
        async || {
            let _ = a.sync_now().await;
            let _ = b.sync_now().await;
            let mut clean = true;
            for store in [&a, &b] {
                let status = store.status().await.unwrap();
                clean &= status.current_epoch == 2
                    && status.epochs.iter().all(|e| e.epoch == 2 || e.records == 0);
            }
            clean
        },
    )
    .await;
    let (la, lb) = (
        a.list::<String>("").await.unwrap(),
        b.list::<String>("").await.unwrap(),
    );
    assert_eq!(la, lb);
    assert_eq!(la.len(), 41);

    a.close().await.unwrap();
    b.close().await.unwrap();
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_wrong_remote_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    // Right address, wrong pin.
    let wrong_pin = Remote::pinned(
        &format!("quic://{}", relay.handle.addr()),
        &format!("sha256:{}", "00".repeat(32)),
    )
    .unwrap();
    let a = Store::open(device(tmp.path(), "a").sync(SyncConfig::new(wrong_pin)))
        .await
        .unwrap();
    a.put("x", "still written locally").await.unwrap();
    let err = a.sync_now().await.expect_err("pin mismatch");
    assert!(matches!(err, SyncError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("pin"), "{err}");
    let status = a.sync_status().unwrap();
    assert!(!status.connected && !status.synced);
    assert!(status.last_error.is_some());
    assert_eq!(
        a.get::<String>("x").await.unwrap().as_deref(),
        Some("still written locally")
    );
    a.close().await.unwrap();

    // A store without sync says so.
    let plain = common::open(&tmp.path().join("nosync")).await;
    assert_eq!(plain.sync_now().await, Err(SyncError::NotConfigured));
    assert!(plain.sync_status().is_none());
    plain.close().await.unwrap();
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_holds_no_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let remote = remote(&relay);
    let (a, b) = pair(tmp.path(), &remote).await;
    let canary_path = "canary/path-4f1c2a9e77d3";
    let canary_value = "canary-value-8b2e61d04c95";
    a.put(canary_path, canary_value).await.unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    assert_eq!(
        b.get::<String>(canary_path).await.unwrap().as_deref(),
        Some(canary_value)
    );
    let export = a.crypto().dangerous().export_raw().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.handle.shutdown().await;

    let keys = persist_core::export::ExportedKeys::unwrap(&export, "").expect("raw export");
    let mut secrets: Vec<Vec<u8>> = vec![
        keys.index_key.expose().to_vec(),
        keys.relay_token.expose().to_vec(),
    ];
    secrets.extend(
        keys.epochs
            .iter()
            .map(|(_, e)| e.key.as_ref().unwrap().expose().to_vec()),
    );
    let mut needles: Vec<Vec<u8>> = vec![canary_path.into(), canary_value.into()];
    for secret in secrets {
        needles.push(hex::encode(&secret).into_bytes());
        needles.push(secret);
    }
    let mut scanned = 0;
    for entry in std::fs::read_dir(&relay.dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        scanned += bytes.len();
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{} holds a plaintext or key string",
                path.display()
            );
        }
    }
    assert!(scanned > 0, "the relay stored something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_sync_directly_without_a_relay() {
    let tmp = tempfile::tempdir().unwrap();
    // A serves its own store; B names A as its remote.
    let a = Store::open(device(tmp.path(), "a")).await.unwrap();
    a.put("shared/from-a", "hello b").await.unwrap();
    let served = a
        .serve("127.0.0.1:0".parse().unwrap())
        .await
        .expect("serve");
    let direct = Remote::pinned(&format!("quic://{}", served.addr()), &served.pin()).unwrap();
    let export = a.crypto().export_key_with("pw").await.unwrap();
    let b = Store::open(
        device(tmp.path(), "b")
            .key(&export.export, "pw")
            .sync(SyncConfig::new(direct)),
    )
    .await
    .unwrap();

    // The background session may have pulled before sync_now: the
    // report counts only what this call did, so check the data.
    b.sync_now().await.expect("b syncs with a");
    assert_eq!(
        b.get::<String>("shared/from-a").await.unwrap().as_deref(),
        Some("hello b")
    );

    b.put("shared/from-b", "hello a").await.unwrap();
    b.sync_now().await.unwrap();
    assert_eq!(
        a.get::<String>("shared/from-b").await.unwrap().as_deref(),
        Some("hello a")
    );

    // Another store's device is turned away.
    let stranger = Store::open(device(tmp.path(), "c").sync(SyncConfig::new(
        Remote::pinned(&format!("quic://{}", served.addr()), &served.pin()).unwrap(),
    )))
    .await
    .unwrap();
    let err = stranger
        .sync_now()
        .await
        .expect_err("not this store's device");
    assert!(matches!(err, SyncError::Refused { .. }), "{err}");

    stranger.close().await.unwrap();
    b.close().await.unwrap();
    served.stop().await;
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_reconnect_after_the_relay_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let relay_dir = tmp.path().join("relay");
    let first = relay(&relay_dir).await;
    let addr = first.handle.addr();
    let pin = first.handle.pin();
    let remote = remote(&first);
    let (a, b) = pair(tmp.path(), &remote).await;
    a.put("before", "outage").await.unwrap();
    a.sync_now().await.unwrap();
    first.handle.shutdown().await;

    // Writes during the outage stay local and say why they cannot sync.
    a.put("during", "outage").await.unwrap();
    let err = a.sync_now().await.expect_err("the relay is down");
    assert!(matches!(err, SyncError::Unreachable { .. }), "{err}");

    // The relay comes back on the same address with the same data and
    // certificate: the devices reconnect by themselves.
    let backend = RedbRelay::open(&relay_dir.join("relay.redb")).unwrap();
    let second = persist_relay::start(RelayConfig::new(addr, &relay_dir), backend)
        .await
        .expect("relay restarts");
    assert_eq!(second.pin(), pin, "same certificate after a restart");
    until("b sees both writes", async || {
        let _ = a.sync_now().await;
        let _ = b.sync_now().await;
        b.get::<String>("before").await.unwrap().is_some()
            && b.get::<String>("during").await.unwrap().is_some()
    })
    .await;
    until("both report synced", async || {
        let _ = a.sync_now().await;
        let _ = b.sync_now().await;
        a.sync_status().unwrap().synced && b.sync_status().unwrap().synced
    })
    .await;

    a.close().await.unwrap();
    b.close().await.unwrap();
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_the_relay_receives_is_ciphertext() {
    let tmp = tempfile::tempdir().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = Malicious {
        inner: persist_storage::relay::MemoryRelay::new(),
        attack: std::sync::Arc::new(std::sync::Mutex::new(Attack::Honest)),
        first_seen: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        seen: seen.clone(),
    };
    let relay_dir = tmp.path().join("relay");
    let handle = persist_relay::start(
        RelayConfig::new("127.0.0.1:0".parse().unwrap(), &relay_dir),
        backend,
    )
    .await
    .unwrap();
    let remote = Remote::pinned(
        &format!("quic://{}", handle.addr()),
        &handle.pin().to_string(),
    )
    .unwrap();
    let (a, b) = pair(tmp.path(), &remote).await;
    let canary_path = "canary/path-93d0c1b7e2aa";
    let canary_value = "canary-value-5e17a0c3f9b8";
    a.put(canary_path, canary_value).await.unwrap();
    b.put("canary/other-path-0d4e", canary_value).await.unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    a.crypto().rotate_key().await.unwrap().wait().await.unwrap();
    a.sync_now().await.unwrap();
    let export = a.crypto().dangerous().export_raw().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
    handle.shutdown().await;

    let keys = persist_core::export::ExportedKeys::unwrap(&export, "").unwrap();
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("path".into(), canary_path.into()),
        ("value".into(), canary_value.into()),
        ("index key".into(), keys.index_key.expose().to_vec()),
        ("relay token".into(), keys.relay_token.expose().to_vec()),
    ];
    for (epoch, entry) in &keys.epochs {
        needles.push((
            format!("key of epoch {epoch}"),
            entry.key.as_ref().unwrap().expose().to_vec(),
        ));
    }
    let hex_needles: Vec<(String, Vec<u8>)> = needles
        .iter()
        .map(|(name, n)| (format!("{name} (hex)"), hex::encode(n).into_bytes()))
        .collect();
    needles.extend(hex_needles);
    let seen = seen.lock().unwrap();
    // The tap works: it holds the canary record's locator, which is what
    // the relay may see of it.
    let index = persist_core::keys::IndexKey::new(keys.index_key.duplicate());
    let locator = index.locator(&keys.store_id, canary_path);
    assert!(
        seen.windows(32).any(|w| w == locator.0),
        "the relay received the canary record, under its locator"
    );
    for (name, needle) in &needles {
        assert!(
            !seen.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the relay received the {name}"
        );
    }
}

/// Copies every byte that passes through a stream into a shared buffer.
struct Tap<S> {
    inner: S,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tap<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let fresh = buf.filled()[before..].to_vec();
        self.seen.lock().unwrap().extend_from_slice(&fresh);
        poll
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            self.seen.lock().unwrap().extend_from_slice(&buf[..*n]);
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reaches an in-process relay session over an in-memory pipe, tapping
/// every frame both ways.
struct MemoryDial {
    relay: std::sync::Arc<persist_storage::relay::MemoryRelay>,
    frames: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl persist::Dial for MemoryDial {
    fn dial(&self) -> persist::DialFuture<'_> {
        Box::pin(async move {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (server_read, server_write) = tokio::io::split(server);
            let relay = self.relay.clone();
            tokio::spawn(async move {
                let ctx = persist_relay::SessionContext::new(persist_relay::Admission::Open);
                let tx = persist_transport::FrameSender::new(
                    Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>
                );
                let rx = persist_transport::FrameReceiver::new(
                    Box::new(server_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>
                );
                persist_relay::serve(&*relay, &ctx, tx, rx).await;
            });
            let (read, write) = tokio::io::split(client);
            Ok(persist::Conversation {
                read: Box::new(Tap {
                    inner: read,
                    seen: self.frames.clone(),
                }),
                write: Box::new(Tap {
                    inner: write,
                    seen: self.frames.clone(),
                }),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_frame_carries_a_path_a_value_or_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = std::sync::Arc::new(persist_storage::relay::MemoryRelay::new());
    let frames = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let dial = || -> std::sync::Arc<dyn persist::Dial> {
        std::sync::Arc::new(MemoryDial {
            relay: relay.clone(),
            frames: frames.clone(),
        })
    };
    let with_dial = |config: Config| config.dangerous().sync_via("memory", dial()).done();
    let a = Store::open(with_dial(device(tmp.path(), "a")))
        .await
        .unwrap();
    let export = a.crypto().export_key_with("pw").await.unwrap();
    let b = Store::open(with_dial(device(tmp.path(), "b").key(&export.export, "pw")))
        .await
        .unwrap();
    let canary_path = "canary/frame-path-7c41d2";
    let canary_value = "canary-frame-value-e09b3f";
    a.put(canary_path, canary_value).await.unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    assert_eq!(
        b.get::<String>(canary_path).await.unwrap().as_deref(),
        Some(canary_value)
    );
    let raw = a.crypto().dangerous().export_raw().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();

    let keys = persist_core::export::ExportedKeys::unwrap(&raw, "").unwrap();
    let index = persist_core::keys::IndexKey::new(keys.index_key.duplicate());
    let frames = frames.lock().unwrap();
    assert!(
        frames
            .windows(32)
            .any(|w| w == index.locator(&keys.store_id, canary_path).0),
        "the tap saw the canary record's frames"
    );
    let mut needles: Vec<Vec<u8>> = vec![
        canary_path.into(),
        canary_value.into(),
        keys.index_key.expose().to_vec(),
        keys.relay_token.expose().to_vec(),
    ];
    needles.extend(
        keys.epochs
            .iter()
            .map(|(_, e)| e.key.as_ref().unwrap().expose().to_vec()),
    );
    for needle in needles {
        for form in [needle.clone(), hex::encode(&needle).into_bytes()] {
            assert!(
                !frames.windows(form.len()).any(|w| w == form.as_slice()),
                "a frame carried a plaintext or key string"
            );
        }
    }
}

/// What a [`Malicious`] relay does to the pages it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    Honest,
    /// Flip a bit in every envelope's ciphertext.
    Flip,
    /// Swap the envelopes of the first two entries of a page.
    Swap,
    /// Serve the oldest envelope it ever received for each locator.
    Replay,
    /// Leave every entry out.
    Withhold,
    /// Drop every mailbox item (key parcels never arrive).
    NoMail,
}

/// A relay backend that keeps a copy of every byte it is handed, and lies
/// to its clients when told to.
struct Malicious {
    inner: persist_storage::relay::MemoryRelay,
    attack: std::sync::Arc<std::sync::Mutex<Attack>>,
    first_seen: std::sync::Mutex<std::collections::BTreeMap<[u8; 32], Vec<u8>>>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Malicious {
    fn record(&self, bytes: &[u8]) {
        self.seen.lock().unwrap().extend_from_slice(bytes);
    }
}

impl persist_storage::relay::RelayBackend for Malicious {
    async fn open_store(
        &self,
        store: &persist::StoreId,
        fingerprint: &[u8; 32],
        may_create: bool,
    ) -> Result<persist_storage::relay::StoreAccess, persist_storage::relay::RelayError> {
        self.record(fingerprint);
        self.inner.open_store(store, fingerprint, may_create).await
    }

    async fn append(
        &self,
        store: &persist::StoreId,
        entries: Vec<persist_storage::relay::Incoming>,
    ) -> Result<persist_storage::relay::Appended, persist_storage::relay::RelayError> {
        for e in &entries {
            self.record(&e.locator.0);
            self.record(&e.envelope);
        }
        {
            let mut first = self.first_seen.lock().unwrap();
            for e in &entries {
                first
                    .entry(e.locator.0)
                    .or_insert_with(|| e.envelope.clone());
            }
        }
        self.inner.append(store, entries).await
    }

    async fn pull(
        &self,
        store: &persist::StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> Result<persist_storage::relay::Page, persist_storage::relay::RelayError> {
        let mut page = self.inner.pull(store, since, limit, bytes_target).await?;
        let attack = *self.attack.lock().unwrap();
        match attack {
            Attack::Honest => {}
            Attack::Flip => {
                for e in &mut page.entries {
                    let at = e.envelope.len() / 2;
                    e.envelope[at] ^= 0x01;
                }
            }
            Attack::Swap => {
                if page.entries.len() >= 2 {
                    let (a, b) = page.entries.split_at_mut(1);
                    std::mem::swap(&mut a[0].envelope, &mut b[0].envelope);
                }
            }
            Attack::Replay => {
                let first = self.first_seen.lock().unwrap();
                for e in &mut page.entries {
                    if let Some(old) = first.get(&e.locator.0) {
                        e.envelope = old.clone();
                    }
                }
            }
            Attack::Withhold => page.entries.clear(),
            Attack::NoMail => {}
        }
        Ok(page)
    }

    async fn head(
        &self,
        store: &persist::StoreId,
    ) -> Result<u64, persist_storage::relay::RelayError> {
        self.inner.head(store).await
    }

    fn watch(&self, store: &persist::StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch(store)
    }

    async fn mailbox_put(
        &self,
        store: &persist::StoreId,
        mailbox: &persist::DeviceId,
        payload: Vec<u8>,
    ) -> Result<u64, persist_storage::relay::RelayError> {
        self.record(&payload);
        if *self.attack.lock().unwrap() == Attack::NoMail {
            return Ok(0);
        }
        self.inner.mailbox_put(store, mailbox, payload).await
    }

    async fn mailbox_fetch(
        &self,
        store: &persist::StoreId,
        mailbox: &persist::DeviceId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<persist_core::protocol::MailboxItem>, persist_storage::relay::RelayError> {
        self.inner.mailbox_fetch(store, mailbox, since, limit).await
    }

    async fn mailbox_ack(
        &self,
        store: &persist::StoreId,
        mailbox: &persist::DeviceId,
        upto: u64,
    ) -> Result<(), persist_storage::relay::RelayError> {
        self.inner.mailbox_ack(store, mailbox, upto).await
    }

    async fn stats(
        &self,
    ) -> Result<persist_storage::relay::RelayStats, persist_storage::relay::RelayError> {
        self.inner.stats().await
    }

    async fn rekey(
        &self,
        store: &persist::StoreId,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> Result<(), persist_storage::relay::RelayError> {
        self.record(old);
        self.record(new);
        self.inner.rekey(store, old, new).await
    }

    fn access_changes(&self, store: &persist::StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.inner.access_changes(store)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_parcel_the_relay_lost_is_posted_again() {
    let tmp = tempfile::tempdir().unwrap();
    let attack = std::sync::Arc::new(std::sync::Mutex::new(Attack::Honest));
    let backend = Malicious {
        inner: persist_storage::relay::MemoryRelay::new(),
        attack: attack.clone(),
        first_seen: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        seen: std::sync::Arc::default(),
    };
    let handle = persist_relay::start(
        RelayConfig::new("127.0.0.1:0".parse().unwrap(), tmp.path().join("relay")),
        backend,
    )
    .await
    .unwrap();
    let remote = Remote::pinned(
        &format!("quic://{}", handle.addr()),
        &handle.pin().to_string(),
    )
    .unwrap();
    let (a, b) = pair(tmp.path(), &remote).await;
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    a.sync_now().await.unwrap();

    // The parcel carrying the new key is lost by the relay.
    *attack.lock().unwrap() = Attack::NoMail;
    a.crypto().rotate_key().await.unwrap().wait().await.unwrap();
    a.put("after/rotation", "secret").await.unwrap();
    a.sync_now().await.unwrap();
    let report = b.sync_now().await.unwrap();
    assert!(report.held >= 1, "{report:?}");

    // The relay keeps mail again: A posts the key again, unasked, since B
    // never acknowledged it.
    *attack.lock().unwrap() = Attack::Honest;
    until(
        "b gets the key again and applies what it held",
        async || {
            let _ = a.sync_now().await;
            let _ = b.sync_now().await;
            b.get::<String>("after/rotation").await.unwrap().as_deref() == Some("secret")
                && b.sync_status().unwrap().held == 0
        },
    )
    .await;
    a.close().await.unwrap();
    b.close().await.unwrap();
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_relay_cannot_corrupt_or_roll_back_records() {
    let tmp = tempfile::tempdir().unwrap();
    let attack = std::sync::Arc::new(std::sync::Mutex::new(Attack::Honest));
    let backend = Malicious {
        inner: persist_storage::relay::MemoryRelay::new(),
        attack: attack.clone(),
        first_seen: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        seen: std::sync::Arc::default(),
    };
    let handle = persist_relay::start(
        RelayConfig::new("127.0.0.1:0".parse().unwrap(), tmp.path().join("relay")),
        backend,
    )
    .await
    .unwrap();
    let remote = Remote::pinned(
        &format!("quic://{}", handle.addr()),
        &handle.pin().to_string(),
    )
    .unwrap();
    let (a, b) = pair(tmp.path(), &remote).await;
    let set = |mode| *attack.lock().unwrap() = mode;

    // Honest start: both hold version 1 of every record.
    for path in ["flip", "swap/1", "swap/2", "replay", "withheld"] {
        a.put(path, &format!("{path} v1")).await.unwrap();
    }
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    assert_eq!(
        b.get::<String>("replay").await.unwrap().as_deref(),
        Some("replay v1")
    );
    let refused_before = b.sync_status().unwrap().refused;

    // Flipped bytes: refused and counted, the old value stays.
    // (Each attack starts before the write, since B pulls live.)
    set(Attack::Flip);
    a.put("flip", "flip v2").await.unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    set(Attack::Honest);
    assert_eq!(
        b.get::<String>("flip").await.unwrap().as_deref(),
        Some("flip v1")
    );
    let after_flip = b.sync_status().unwrap().refused;
    assert!(
        after_flip > refused_before,
        "the flipped envelope was counted"
    );

    // Envelopes swapped between locators: both refused.
    set(Attack::Swap);
    let mut batch = a.batch();
    batch.put("swap/1", "swap/1 v2").put("swap/2", "swap/2 v2");
    batch.commit().await.unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    set(Attack::Honest);
    assert_eq!(
        b.get::<String>("swap/1").await.unwrap().as_deref(),
        Some("swap/1 v1")
    );
    assert_eq!(
        b.get::<String>("swap/2").await.unwrap().as_deref(),
        Some("swap/2 v1")
    );
    assert!(
        b.sync_status().unwrap().refused >= after_flip + 2,
        "both swapped envelopes counted"
    );

    // An honest relay delivers later writes; then a replay of the oldest
    // version never rolls a record back.
    a.put("replay", "replay v2").await.unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    assert_eq!(
        b.get::<String>("replay").await.unwrap().as_deref(),
        Some("replay v2")
    );
    set(Attack::Replay);
    a.put("replay", "replay v3").await.unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    set(Attack::Honest);
    assert_eq!(
        b.get::<String>("replay").await.unwrap().as_deref(),
        Some("replay v2"),
        "the replayed v1 lost to the v2 already held"
    );

    // Withholding: the device holds what it had and goes on working.
    set(Attack::Withhold);
    a.put("withheld", "withheld v2").await.unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    set(Attack::Honest);
    assert_eq!(
        b.get::<String>("withheld").await.unwrap().as_deref(),
        Some("withheld v1")
    );
    b.put("after/attacks", "after/attacks from b")
        .await
        .unwrap();
    b.sync_now().await.unwrap();
    a.sync_now().await.unwrap();
    assert_eq!(
        a.get::<String>("after/attacks").await.unwrap().as_deref(),
        Some("after/attacks from b"),
        "the sessions went on after refusing envelopes"
    );
    // Every value either device holds is one a device wrote.
    for (path, value) in b.list::<String>("").await.unwrap() {
        assert!(value.starts_with(&path), "{path} = {value}");
    }

    a.close().await.unwrap();
    b.close().await.unwrap();
    handle.shutdown().await;
}
