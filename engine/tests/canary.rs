//! No plaintext at rest: a random canary written into paths and values
//! never reaches a file of the store, its key directory, or the logs, in any
//! common encoding; nor do the device key's bytes reach the database.
//!
//! This binary installs a global tracing subscriber (TRACE, into a buffer),
//! so it holds only the canary tests.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers as well as tests: a failed unwrap is a failed test"
)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use persist::{Config, Store};
use serde_bytes::ByteBuf;

/// Everything logged by this test binary, at every level.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = SharedWriter(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("this binary installs the only global subscriber");
        buffer
    })
}

/// A `MakeWriter` target appending to a shared buffer.
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 32 fresh random bytes.
#[allow(
    clippy::disallowed_methods,
    reason = "a canary must be unpredictable to the code under test"
)]
fn random_canary() -> [u8; 32] {
    let mut canary = [0u8; 32];
    getrandom::fill(&mut canary).expect("OS randomness"); // allow-nondeterminism: test canary
    canary
}

/// Every needle under which `secret` could show up: raw, hex in both cases,
/// and the part of its standard and URL-safe base64 that does not depend on
/// the bytes around it, at each of the three alignments.
fn needles(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("raw".to_owned(), secret.to_vec()),
        ("hex".to_owned(), hex::encode(secret).into_bytes()),
        ("HEX".to_owned(), hex::encode_upper(secret).into_bytes()),
    ];
    for (name, engine) in [("base64", &STANDARD), ("base64url", &URL_SAFE)] {
        for prefix in 0..3usize {
            let mut input = vec![0u8; prefix];
            input.extend_from_slice(secret);
            let text = engine.encode(&input);
            // 3-byte group g covers input bytes 3g..3g+3 and text chars
            // 4g..4g+4; keep the groups made of secret bytes only.
            let first_group = prefix.div_ceil(3);
            let end_group = (prefix + secret.len()) / 3;
            assert!(end_group > first_group + 8, "a long enough needle");
            let middle = &text.as_bytes()[4 * first_group..4 * end_group];
            out.push((format!("{name}@{prefix}"), middle.to_vec()));
        }
    }
    out
}

/// Which needles occur in `haystack`.
fn hits(haystack: &[u8], needles: &[(String, Vec<u8>)]) -> Vec<String> {
    needles
        .iter()
        .filter(|(_, needle)| {
            haystack
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

/// `(file, needle)` for every hit in every file under `dirs`.
fn scan_files(dirs: &[PathBuf], needles: &[(String, Vec<u8>)]) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut scanned = 0;
    for dir in dirs {
        for file in files_under(dir) {
            let bytes = std::fs::read(&file).unwrap();
            scanned += bytes.len();
            found.extend(hits(&bytes, needles).into_iter().map(|n| (file.clone(), n)));
        }
    }
    assert!(scanned > 0, "the scan read something");
    found
}

/// Writes records carrying the canary in their paths and values, then
/// closes the store.
async fn write_canary_records(config: Config, canary: &[u8; 32]) {
    let dir = config.path().to_path_buf();
    let hex = hex::encode(canary);
    let store = Store::open(config).await.expect("open");
    for i in 0..8 {
        let path = format!("secret/{hex}/{i}");
        store
            .put(&path, &ByteBuf::from(canary.to_vec()))
            .await
            .expect("put bytes");
        store
            .put(&format!("notes/{i}"), &format!("the canary is {hex}"))
            .await
            .expect("put text");
        store
            .put(
                &format!("mixed/{hex}"),
                &(ByteBuf::from(canary.to_vec()), hex.clone()),
            )
            .await
            .expect("put both");
    }
    store
        .delete(&format!("secret/{hex}/0"))
        .await
        .expect("delete");
    let mut batch = store.batch();
    batch
        .put(&format!("batch/{hex}"), &ByteBuf::from(canary.to_vec()))
        .put("batch/plain", &hex);
    batch.commit().await.expect("batch");
    // Read back through the API, so that the read paths log too.
    let got: Option<ByteBuf> = store.get(&format!("secret/{hex}/1")).await.expect("get");
    assert_eq!(got.map(ByteBuf::into_vec), Some(canary.to_vec()));
    let listed: Vec<(String, ByteBuf)> = store.list("secret/").await.expect("list");
    assert_eq!(listed.len(), 7);
    store.close().await.expect("close");
    // Let the closed store's database handle go, so the files are final.
    wait_released(&dir).await;
}

/// Waits until the database in store directory `dir` is no longer held.
async fn wait_released(dir: &Path) {
    let tmp = dir.parent().expect("a store dir inside a temp dir");
    assert_eq!(common::store_dir(tmp), dir);
    common::wait_released(tmp).await;
}

/// An encrypted store leaves no trace of the canary in any file under its
/// directory or its key directory, in any encoding; the device key's bytes
/// do not appear in the database, nor its hex text anywhere in the store
/// directory; and nothing logged at any level carries the canary.
#[tokio::test(flavor = "multi_thread")]
async fn encrypted_store_leaks_no_canary_or_key() {
    let logs = logs();
    let tmp = tempfile::tempdir().unwrap();
    let canary = random_canary();
    write_canary_records(common::config(tmp.path()), &canary).await;

    let canary_needles = needles(&canary);
    let dirs = [
        common::store_dir(tmp.path()),
        common::key_file(tmp.path()).parent().unwrap().to_path_buf(),
    ];
    let found = scan_files(&dirs, &canary_needles);
    assert!(found.is_empty(), "canary found on disk: {found:?}");

    // The device key: the keyfile holds it as 64 hex digits.
    let key_text = std::fs::read_to_string(common::key_file(tmp.path())).unwrap();
    let key_hex = key_text.trim_end();
    assert_eq!(key_hex.len(), 64, "a keyfile is 64 hex digits");
    let key = hex::decode(key_hex).expect("hex keyfile");
    let db = std::fs::read(common::db_file(tmp.path())).unwrap();
    let key_hits = hits(&db, &needles(&key));
    assert!(
        key_hits.is_empty(),
        "device key in the database: {key_hits:?}"
    );
    let key_text_hits = scan_files(&[common::store_dir(tmp.path())], &needles(&key));
    assert!(
        key_text_hits.is_empty(),
        "device key in the store directory: {key_text_hits:?}"
    );

    let logged = logs.lock().unwrap().clone();
    assert!(
        !logged.is_empty(),
        "the subscriber saw the store's log lines (the scan below means something)"
    );
    let log_hits = hits(&logged, &canary_needles);
    assert!(log_hits.is_empty(), "canary in the logs: {log_hits:?}");
    let key_log_hits = hits(&logged, &needles(&key));
    assert!(
        key_log_hits.is_empty(),
        "device key in the logs: {key_log_hits:?}"
    );
}

/// The same writes to an `encrypt(false)` store do leave the canary on disk,
/// raw and as hex: the scanner of the test above finds what is there.
#[tokio::test(flavor = "multi_thread")]
async fn plain_store_shows_the_canary_so_the_scanner_works() {
    let _ = logs();
    let tmp = tempfile::tempdir().unwrap();
    let canary = random_canary();
    write_canary_records(common::config(tmp.path()).encrypt(false), &canary).await;

    let found = scan_files(&[common::store_dir(tmp.path())], &needles(&canary));
    let kinds: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
    assert!(
        kinds.contains(&"raw"),
        "raw canary bytes in the plain db: {found:?}"
    );
    assert!(
        kinds.contains(&"hex"),
        "hex canary paths in the plain db: {found:?}"
    );
}

/// The needle builder finds a secret under every encoding it claims,
/// whatever bytes surround it.
#[tokio::test(flavor = "multi_thread")]
async fn needles_match_every_encoding_at_every_alignment() {
    let secret = random_canary();
    let all = needles(&secret);
    assert_eq!(all.len(), 3 + 2 * 3);
    for prefix in 0..3 {
        for suffix in 0..3 {
            let mut input = vec![0xa5u8; prefix];
            input.extend_from_slice(&secret);
            input.extend(std::iter::repeat_n(0x5a, suffix));
            for (name, engine) in [("base64", &STANDARD), ("base64url", &URL_SAFE)] {
                let text = format!("junk {} junk", engine.encode(&input));
                let found = hits(text.as_bytes(), &all);
                assert!(
                    found.contains(&format!("{name}@{prefix}")),
                    "{name} with {prefix} prefix bytes: {found:?}"
                );
            }
        }
    }
    let text = format!("x{}y{}z", hex::encode(secret), hex::encode_upper(secret));
    assert_eq!(hits(text.as_bytes(), &all), vec!["hex", "HEX"]);
    assert!(hits(&[0u8; 4096], &all).is_empty());
}
