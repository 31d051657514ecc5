//! Two real devices (the `persist` engine) syncing through the real
//! `persist-relay` binary, run as a child process with `RUST_LOG=trace`:
//! they converge after puts and deletes on both, after concurrent writes
//! and delete-versus-write on one path (last write wins, the same way on
//! both), and after offline writes on both sides while the relay was
//! SIGKILLed and restarted. And zero knowledge: nothing the relay keeps in
//! its data directory or writes to its stdout/stderr carries a canary path
//! or value, or a byte of the store's keys, in any common encoding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::devices::{converge, converge_bytes, pair, pull_until_applied};
use common::scan::{Corpus, needles, poll};
use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use persist::{Remote, SyncError};
use persist_core::export::ExportedKeys;
use persist_core::keys::IndexKey;
use persist_core::protocol::AccessKey;
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_persist-relay");
/// How long a test waits for something sync does in the background, or
/// for the relay process to start or stop.
const SETTLE: Duration = Duration::from_secs(20);
/// Between the two writes of a conflict: on one machine's clock the second
/// write's hybrid logical clock is then certainly the higher one.
const APART: Duration = Duration::from_millis(50);
/// How long a device may take to notice that a SIGKILLed relay is gone:
/// it hears nothing, so at most the QUIC idle timeout, plus slack.
const NOTICE_DEAD: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_converge_through_the_relay_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(tmp.path(), "127.0.0.1:0");
    let (a, b) = pair(tmp.path(), &relay.remote(), &relay.remote()).await;

    // Puts and deletes on both, of their own and of each other's records.
    for i in 0..6 {
        a.put(&format!("a/{i}"), &format!("a wrote {i}"))
            .await
            .unwrap();
        b.put(&format!("b/{i}"), &format!("b wrote {i}"))
            .await
            .unwrap();
    }
    a.delete("a/1").await.unwrap();
    b.delete("b/2").await.unwrap();
    converge(&a, &b).await;
    a.delete("b/3").await.unwrap();
    b.delete("a/4").await.unwrap();
    b.put("a/5", "b rewrote a's record").await.unwrap();
    let mut expected: BTreeMap<String, String> = (0..6)
        .flat_map(|i| {
            [
                (format!("a/{i}"), format!("a wrote {i}")),
                (format!("b/{i}"), format!("b wrote {i}")),
            ]
        })
        .collect();
    for gone in ["a/1", "b/2", "b/3", "a/4"] {
        expected.remove(gone);
    }
    expected.insert("a/5".into(), "b rewrote a's record".into());
    assert_eq!(converge(&a, &b).await, expected);

    // Concurrent writes to one path: the relay is frozen (SIGSTOP), so
    // neither device can hear of the other's write before making its own.
    // Each path is written first by one device, then by the other, and on
    // both devices the later write wins.
    relay.freeze();
    a.put("conflict/b-last", "a, first").await.unwrap();
    b.put("conflict/a-last", "b, first").await.unwrap();
    tokio::time::sleep(APART).await;
    b.put("conflict/b-last", "b, last").await.unwrap();
    a.put("conflict/a-last", "a, last").await.unwrap();
    relay.thaw();
    let state = converge(&a, &b).await;
    assert_eq!(state["conflict/b-last"], "b, last", "{state:?}");
    assert_eq!(state["conflict/a-last"], "a, last", "{state:?}");

    // Delete versus write on one path, both ways round.
    a.put("race/write-last", "v0").await.unwrap();
    a.put("race/delete-last", "v0").await.unwrap();
    converge(&a, &b).await;
    relay.freeze();
    a.delete("race/write-last").await.unwrap();
    b.put("race/delete-last", "b rewrote it").await.unwrap();
    tokio::time::sleep(APART).await;
    b.put("race/write-last", "b wrote after a deleted")
        .await
        .unwrap();
    a.delete("race/delete-last").await.unwrap();
    relay.thaw();
    let state = converge(&a, &b).await;
    assert_eq!(
        state.get("race/write-last").map(String::as_str),
        Some("b wrote after a deleted"),
        "a write after a concurrent delete wins: {state:?}"
    );
    assert_eq!(
        state.get("race/delete-last"),
        None,
        "a delete after a concurrent write wins: {state:?}"
    );

    for store in [&a, &b] {
        let status = store.sync_status().unwrap();
        assert_eq!(status.refused, 0, "{status:?}");
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.stop();
    assert_quiet_logs(&relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_on_both_sides_converge_after_a_relay_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(tmp.path(), "127.0.0.1:0");
    let (a, b) = pair(tmp.path(), &relay.remote(), &relay.remote()).await;
    a.put("shared/1", "before").await.unwrap();
    a.put("shared/2", "before").await.unwrap();
    b.put("shared/3", "before").await.unwrap();
    converge(&a, &b).await;

    // The relay dies without a word; both devices go on writing.
    relay.kill();
    a.put("offline/a", "written by a alone").await.unwrap();
    b.put("offline/b", "written by b alone").await.unwrap();
    a.delete("shared/1").await.unwrap();
    b.put("shared/2", "b, while offline").await.unwrap();
    a.put("offline/both", "a, first").await.unwrap();
    tokio::time::sleep(APART).await;
    b.put("offline/both", "b, last").await.unwrap();
    b.delete("shared/3").await.unwrap();

    // Neither can sync, and each says why. A SIGKILLed relay sends no
    // close, so each device learns it is gone only when its connection
    // idles out (about 30 s on this build).
    let (ra, rb) = tokio::time::timeout(NOTICE_DEAD, async {
        tokio::join!(a.sync_now(), b.sync_now())
    })
    .await
    .expect("sync_now fails in time against a dead relay");
    for (who, result) in [("a", ra), ("b", rb)] {
        let err = result.expect_err("the relay is dead");
        assert!(matches!(err, SyncError::Unreachable { .. }), "{who}: {err}");
    }
    for store in [&a, &b] {
        let status = store.sync_status().unwrap();
        assert!(!status.synced && status.last_error.is_some(), "{status:?}");
        assert!(status.pending_up > 0, "{status:?}");
    }

    // Same binary, same address, same data directory: same pin, and both
    // devices reconnect by themselves.
    let pin = relay.pin.clone();
    relay.restart();
    assert_eq!(relay.pin, pin, "the pin survives a crash");
    let state = converge(&a, &b).await;
    let expected: BTreeMap<String, String> = [
        ("offline/a", "written by a alone"),
        ("offline/b", "written by b alone"),
        ("offline/both", "b, last"),
        ("shared/2", "b, while offline"),
    ]
    .into_iter()
    .map(|(p, v)| (p.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(state, expected);

    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.stop();
    assert_quiet_logs(&relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_process_keeps_and_logs_no_plaintext_and_no_key() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(tmp.path(), "127.0.0.1:0");
    let (a, b) = pair(tmp.path(), &relay.remote(), &relay.remote()).await;

    // A canary random per run (the temp dir's name is), in paths and
    // values, written on both devices, deleted, resealed under a new epoch,
    // and carried both ways.
    let canary: [u8; 32] = Sha256::digest(tmp.path().as_os_str().as_encoded_bytes()).into();
    let hex = hex::encode(canary);
    for i in 0..4 {
        a.put(
            &format!("canary/{hex}/{i}"),
            &ByteBuf::from(canary.to_vec()),
        )
        .await
        .unwrap();
        let note = format!("the canary is {hex}");
        a.put(&format!("notes/{i}"), &ByteBuf::from(note.into_bytes()))
            .await
            .unwrap();
    }
    a.delete(&format!("canary/{hex}/0")).await.unwrap();
    b.put(&format!("from-b/{hex}"), &ByteBuf::from(canary.to_vec()))
        .await
        .unwrap();
    converge_bytes(&a, &b).await;
    // A's reseals reach the relay; B pulls them, and the key courier
    // brings it the new epoch key through a sealed parcel in its mailbox,
    // so B ends with nothing held. The scans below then cover the parcel.
    let pulled_before = b.sync_status().unwrap().pulled;
    a.crypto().rotate_key().await.unwrap().wait().await.unwrap();
    let mut pushed = false;
    for _ in 0..SETTLE.as_millis() / 50 {
        let _ = a.sync_now().await;
        if a.sync_status().unwrap().synced {
            pushed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pushed, "a pushed its reseals: {:?}", a.sync_status());
    pull_until_applied(&b, pulled_before).await;
    let got: Option<ByteBuf> = b.get(&format!("canary/{hex}/1")).await.unwrap();
    assert_eq!(got.map(ByteBuf::into_vec), Some(canary.to_vec()));
    let got: Option<ByteBuf> = a.get(&format!("from-b/{hex}")).await.unwrap();
    assert_eq!(got.map(ByteBuf::into_vec), Some(canary.to_vec()));

    let raw = a.crypto().dangerous().export_raw().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.stop();

    let keys = ExportedKeys::unwrap(&raw, "").expect("a raw export");
    assert!(keys.epochs.len() >= 2, "the rotation added an epoch");
    let access = AccessKey::derive(&keys.relay_token, &keys.store_id);
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("canary".into(), canary.to_vec()),
        ("index key".into(), keys.index_key.expose().to_vec()),
        ("relay token".into(), keys.relay_token.expose().to_vec()),
        // The relay keeps only the credential's fingerprint.
        ("access credential".into(), access.0.to_vec()),
    ];
    for (epoch, entry) in &keys.epochs {
        let key = entry.key.as_ref().expect("an unpurged epoch has its key");
        secrets.push((format!("key of epoch {epoch}"), key.expose().to_vec()));
    }

    let data = Corpus::files_under(&relay.data);
    let logs = Corpus::files_under(&relay.logs);
    assert!(data.bytes > 0 && logs.bytes > 0, "the scans read something");
    for (name, secret) in &secrets {
        let needles = needles(secret);
        let found = data.hits(&needles);
        assert!(found.is_empty(), "{name} in the data directory: {found:?}");
        let found = logs.hits(&needles);
        assert!(found.is_empty(), "{name} in the relay's output: {found:?}");
    }

    // Positive controls: the scans find what the relay may hold. Its
    // database has the canary record under its locator and the store's
    // credential fingerprint, raw; its trace output names the store.
    let locator = IndexKey::new(keys.index_key.duplicate())
        .locator(&keys.store_id, &format!("canary/{hex}/1"));
    let raw_only = |bytes: &[u8]| vec![("raw".to_owned(), bytes.to_vec())];
    let db = Corpus::files_under(&relay.data.join("relay.redb"));
    assert_eq!(db.hits(&raw_only(&locator.0)), ["raw"], "the locator");
    assert_eq!(
        db.hits(&raw_only(&access.fingerprint())),
        ["raw"],
        "the credential's fingerprint"
    );
    let store_text = keys.store_id.to_string();
    assert_eq!(
        logs.hits(&raw_only(store_text.as_bytes())),
        ["raw"],
        "the store id in the relay's debug lines"
    );
    assert!(
        logs.text.contains("TRACE"),
        "RUST_LOG=trace reached the relay: its output has TRACE lines"
    );
}

/// The `persist-relay` binary as a child process, its stdout and stderr
/// in files (one pair per run) beside its data directory.
struct RelayProcess {
    child: Option<Child>,
    addr: SocketAddr,
    pin: String,
    data: PathBuf,
    logs: PathBuf,
    runs: u32,
}

impl RelayProcess {
    fn start(tmp: &Path, listen: &str) -> RelayProcess {
        let mut relay = RelayProcess {
            child: None,
            addr: listen.parse().unwrap(),
            pin: String::new(),
            data: tmp.join("relay-data"),
            logs: tmp.join("relay-logs"),
            runs: 0,
        };
        std::fs::create_dir_all(&relay.logs).unwrap();
        relay.spawn();
        relay
    }

    /// Starts the binary on `self.addr` and waits for its start line.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "one process at a time");
        self.runs += 1;
        let stdout_path = self.logs.join(format!("stdout-{}.log", self.runs));
        let stderr_path = self.logs.join(format!("stderr-{}.log", self.runs));
        let mut child = Command::new(BIN)
            .args(["--listen", &self.addr.to_string(), "--data"])
            .arg(&self.data)
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawns persist-relay");
        let line = poll(SETTLE, || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "persist-relay exited with {status} before serving:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            let out = std::fs::read_to_string(&stdout_path).unwrap();
            out.ends_with('\n').then_some(out)
        })
        .expect("persist-relay prints its start line");
        let rest = line
            .trim_end()
            .strip_prefix("persist-relay listening on ")
            .unwrap_or_else(|| panic!("unexpected start line {line:?}"));
        let (addr, pin) = rest.split_once(" pin ").expect("a pin");
        self.addr = addr.parse().expect("an address");
        self.pin = pin.to_owned();
        self.child = Some(child);
    }

    fn remote(&self) -> Remote {
        Remote::pinned(&format!("quic://{}", self.addr), &self.pin).expect("a remote")
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal}");
    }

    /// Stops the process in its tracks (SIGSTOP): it keeps its sockets but
    /// answers nothing until [`RelayProcess::thaw`].
    fn freeze(&self) {
        self.signal("-STOP");
    }

    fn thaw(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL: no shutdown, no goodbye to anyone.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// The same binary again, on the same address and data directory.
    fn restart(&mut self) {
        self.spawn();
    }

    /// SIGTERM, and a clean exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        let mut child = self.child.take().expect("running");
        let status = poll(SETTLE, || child.try_wait().unwrap()).expect("exits after SIGTERM");
        assert_eq!(status.code(), Some(0), "a clean stop");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A failed test must not leave a (possibly frozen) relay behind.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// No relay log line at WARN or above: nothing went wrong on its side.
fn assert_quiet_logs(relay: &RelayProcess) {
    let logs = Corpus::files_under(&relay.logs);
    let loud: Vec<&str> = logs
        .text
        .lines()
        .filter(|l| l.contains(" persist_relay") || l.contains(" persist_storage"))
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(loud.is_empty(), "the relay complained: {loud:#?}");
}

/// The needles and the corpus agree with each other: every encoding is
/// found wherever it sits among other bytes, and nothing in zeros.
#[test]
fn the_scanner_finds_every_encoding_at_every_alignment() {
    let secret: [u8; 32] = Sha256::digest(b"scanner self-test").into();
    let all = needles(&secret);
    let dir = tempfile::tempdir().unwrap();
    for prefix in 0..3 {
        for suffix in 0..3 {
            let mut input = vec![0xa5u8; prefix];
            input.extend_from_slice(&secret);
            input.extend(std::iter::repeat_n(0x5a, suffix));
            for (name, engine) in [("base64", &STANDARD), ("base64url", &URL_SAFE)] {
                let file = dir.path().join("f");
                std::fs::write(&file, format!("junk {} junk", engine.encode(&input))).unwrap();
                let found = Corpus::files_under(&file).hits(&all);
                assert!(
                    found.contains(&format!("{name}@{prefix}")),
                    "{name} with {prefix} prefix bytes: {found:?}"
                );
            }
        }
    }
    let file = dir.path().join("f");
    let mut raw = vec![0xffu8, 0x00];
    raw.extend_from_slice(&secret);
    raw.extend_from_slice(
        format!("x{}y{}z", hex::encode(secret), hex::encode_upper(secret)).as_bytes(),
    );
    std::fs::write(&file, raw).unwrap();
    assert_eq!(Corpus::files_under(&file).hits(&all), ["raw", "hex", "HEX"]);
    std::fs::write(&file, [0u8; 4096]).unwrap();
    assert!(Corpus::files_under(&file).hits(&all).is_empty());
}
