//! Key rotation under random interleavings, what a purge leaves on disk,
//! and bad key exports.
//!
//! - [`random_interleavings_converge_to_the_model`]: for fixed seeds, 2-4
//!   tasks write (puts, deletes, batches) while 1-3 rotations start, some
//!   back to back; afterwards every path matches a model of the last
//!   acknowledged write, no record is under an old epoch, and a purge and
//!   a reopen change nothing readable.
//! - [`no_canary_or_purged_key_on_disk_after_rotation`]: after a rotation
//!   and a purge, neither a plaintext canary nor a byte of the purged key
//!   is in any file, raw, hex or base64.
//! - [`bad_exports_are_refused_and_change_nothing`]: a truncated or edited
//!   export and a wrong passphrase are typed import errors that write
//!   nothing.

// Integration tests: a panic in a helper is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use persist::{Config, KdfParams, OpenError, Rotation, Status, Store};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng as _, SeedableRng as _};
use serde_bytes::ByteBuf;

fn config(tmp: &Path) -> Config {
    Config::new(common::store_dir(tmp))
        .key_file(common::key_file(tmp))
        .dangerous()
        .export_kdf(KdfParams::insecure_for_tests())
        .done()
}

/// Records under every epoch but the current one.
fn old_records(status: &Status) -> u64 {
    status
        .epochs
        .iter()
        .filter(|e| e.epoch != status.current_epoch)
        .map(|e| e.records)
        .sum()
}

/// Whether every epoch but the current one is in `state` with no record.
fn old_epochs_are(status: &Status, state: &str) -> bool {
    status
        .epochs
        .iter()
        .all(|e| e.epoch == status.current_epoch || (e.state == state && e.records == 0))
}

/// Polls `status` until the background re-encryption is over and every
/// old epoch is retired (or `timeout` passes: `None`).
async fn settled(store: &Store, timeout: Duration) -> Option<Status> {
    tokio::time::timeout(timeout, async {
        loop {
            let s = store.status().await.unwrap();
            if !s.rotation.active && old_epochs_are(&s, "retired") {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .ok()
}

// ---------------------------------------------------------------------
// Random interleavings
// ---------------------------------------------------------------------

/// Seeds of the interleaving property.
const SEEDS: std::ops::RangeInclusive<u64> = 1..=8;
/// Records in the store before the tasks start.
const INITIAL_RECORDS: u32 = 1_000;

fn below(rng: &mut ChaCha8Rng, n: u32) -> u32 {
    rng.next_u32() % n
}

/// The last acknowledged write per path (`None`: deleted).
type Model = BTreeMap<String, Option<String>>;

/// One writer task: `ops` random operations on its own paths (those in
/// `model`), starting the rotations planned at each op index first.
async fn writer_task(
    store: Store,
    seed: u64,
    task: u32,
    ops: u32,
    rotations_at: Vec<u32>,
    mut model: Model,
) -> (Model, Vec<Rotation>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed * 1_000 + u64::from(task));
    let mut paths: Vec<String> = model.keys().cloned().collect();
    let mut rotations = Vec::new();
    let mut fresh = 0u32;
    for op in 0..ops {
        for _ in rotations_at.iter().filter(|&&at| at == op) {
            let rotation = store
                .crypto()
                .rotate_key()
                .await
                .unwrap_or_else(|e| panic!("seed {seed} task {task} op {op}: rotate: {e}"));
            rotations.push(rotation);
        }
        let value = format!(
            "seed {seed} task {task} op {op} {}",
            "v".repeat(op as usize % 7)
        );
        let ctx = format!("seed {seed} task {task} op {op}");
        match below(&mut rng, 100) {
            0..35 => {
                let path = paths[below(&mut rng, paths.len() as u32) as usize].clone();
                store
                    .put(&path, &value)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: put {path}: {e}"));
                model.insert(path, Some(value));
            }
            35..47 => {
                let path = format!("t{task}/new{fresh:04}");
                fresh += 1;
                store
                    .put(&path, &value)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: put {path}: {e}"));
                paths.push(path.clone());
                model.insert(path, Some(value));
            }
            47..62 => {
                let path = paths[below(&mut rng, paths.len() as u32) as usize].clone();
                store
                    .delete(&path)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: delete {path}: {e}"));
                model.insert(path, None);
            }
            62..74 => {
                let n = 2 + below(&mut rng, 12) as usize;
                let mut chosen: BTreeMap<String, Option<String>> = BTreeMap::new();
                while chosen.len() < n {
                    let path = if below(&mut rng, 5) == 0 {
                        fresh += 1;
                        format!("t{task}/new{:04}", fresh - 1)
                    } else {
                        paths[below(&mut rng, paths.len() as u32) as usize].clone()
                    };
                    let v = (below(&mut rng, 3) != 0).then(|| format!("{value} #{}", chosen.len()));
                    chosen.insert(path, v);
                }
                let mut batch = store.batch();
                for (path, v) in &chosen {
                    match v {
                        Some(v) => batch.put(path, v),
                        None => batch.delete(path),
                    };
                }
                batch
                    .commit()
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: batch: {e}"));
                for (path, v) in chosen {
                    if !model.contains_key(&path) {
                        paths.push(path.clone());
                    }
                    model.insert(path, v);
                }
            }
            74..88 => tokio::task::yield_now().await,
            _ => tokio::time::sleep(Duration::from_millis(u64::from(below(&mut rng, 4)))).await,
        }
    }
    (model, rotations)
}

/// Every path of `model` reads back as modelled, and nothing else is there.
async fn check_model(store: &Store, model: &Model, when: &str) {
    let mut wrong = Vec::new();
    for (path, want) in model {
        match store.get::<String>(path).await {
            Ok(got) if &got == want => {}
            other => wrong.push(format!("{path}: got {other:?}, want {want:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{when}: {} paths differ from the model: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    let listed: Vec<(String, String)> = store
        .list("")
        .await
        .unwrap_or_else(|e| panic!("{when}: list: {e}"));
    let live: Vec<(String, String)> = model
        .iter()
        .filter_map(|(p, v)| v.clone().map(|v| (p.clone(), v)))
        .collect();
    assert!(
        listed == live,
        "{when}: list differs from the model ({} listed, {} modelled)",
        listed.len(),
        live.len()
    );
    let status = store.status().await.unwrap();
    assert_eq!(status.records, live.len() as u64, "{when}: live count");
}

async fn run_seed(seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tasks = 2 + below(&mut rng, 3);
    let ops_per_task = 40 + below(&mut rng, 40);
    // 1-3 rotations at random points of random tasks; sometimes two back
    // to back in one task.
    let mut plan: Vec<Vec<u32>> = vec![Vec::new(); tasks as usize];
    let rotations = 1 + below(&mut rng, 3);
    let mut planned = 0;
    while planned < rotations {
        let task = below(&mut rng, tasks) as usize;
        let at = below(&mut rng, ops_per_task);
        let n = if planned + 2 <= rotations && below(&mut rng, 2) == 0 {
            2
        } else {
            1
        };
        for _ in 0..n {
            plan[task].push(at);
        }
        planned += n;
    }
    let ctx = format!("seed {seed} ({tasks} tasks x {ops_per_task} ops, rotations at {plan:?})");

    let store = Store::open(config(dir)).await.unwrap();
    let mut models: Vec<Model> = vec![Model::new(); tasks as usize];
    let mut batch = store.batch();
    for i in 0..INITIAL_RECORDS {
        let task = i % tasks;
        let path = format!("t{task}/{i:05}");
        let value = format!("seed {seed} initial {i}");
        batch.put(&path, &value);
        models[task as usize].insert(path, Some(value));
    }
    batch.commit().await.unwrap();

    let handles: Vec<_> = models
        .into_iter()
        .enumerate()
        .map(|(task, model)| {
            tokio::spawn(writer_task(
                store.clone(),
                seed,
                task as u32,
                ops_per_task,
                plan[task].clone(),
                model,
            ))
        })
        .collect();
    let mut model = Model::new();
    let mut all_rotations: Vec<Rotation> = Vec::new();
    for handle in handles {
        let (m, r) = handle
            .await
            .unwrap_or_else(|e| panic!("{ctx}: a writer task failed: {e}"));
        model.extend(m);
        all_rotations.extend(r);
    }
    let mut epochs: Vec<u32> = all_rotations.iter().map(Rotation::epoch).collect();
    epochs.sort_unstable();
    let expected_epochs: Vec<u32> = (2..=1 + rotations).collect();
    assert_eq!(epochs, expected_epochs, "{ctx}: rotation epochs");
    let current = 1 + rotations;

    // `Rotation::wait` on the newest rotation promises: no record under an
    // older epoch, and the old epochs retired. Checked after the rest, so
    // that a broken promise does not hide the other findings.
    let newest = all_rotations
        .into_iter()
        .max_by_key(Rotation::epoch)
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(30), newest.wait())
        .await
        .unwrap_or_else(|_| panic!("{ctx}: Rotation::wait did not return in 30 s"))
        .unwrap();
    let after_wait = store.status().await.unwrap();

    let status = settled(&store, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("{ctx}: the rotation did not finish in 30 s"));
    assert_eq!(status.current_epoch, current, "{ctx}");
    assert_eq!(old_records(&status), 0, "{ctx}: {:?}", status.epochs);
    check_model(&store, &model, &format!("{ctx}, after rotation")).await;
    assert!(
        !waited.active && old_records(&after_wait) == 0 && old_epochs_are(&after_wait, "retired"),
        "{ctx}: Rotation::wait returned ({waited:?}) before the rotation was over: {:?}",
        after_wait.epochs
    );

    let mut purged = store.crypto().purge_retired_keys().await.unwrap();
    purged.sort_unstable();
    assert_eq!(purged, (1..current).collect::<Vec<_>>(), "{ctx}: purged");
    store.close().await.unwrap();

    let store = common::open_when_released(|| config(dir)).await.unwrap();
    let status = store.status().await.unwrap();
    assert_eq!(status.current_epoch, current, "{ctx}: after reopen");
    assert!(
        old_epochs_are(&status, "purged"),
        "{ctx}: after purge and reopen: {:?}",
        status.epochs
    );
    check_model(&store, &model, &format!("{ctx}, after purge and reopen")).await;
    store.close().await.unwrap();
}

/// For each seed: 1000 records, 2-4 concurrent writer tasks with their own
/// paths doing puts, deletes, batches, yields and sleeps, and 1-3
/// rotations at seeded points (sometimes back to back). When all is done
/// every path matches the model, no record is under an old epoch, and
/// after a purge and a reopen still every path matches.
#[tokio::test(flavor = "multi_thread")]
async fn random_interleavings_converge_to_the_model() {
    for seed in SEEDS {
        run_seed(seed).await;
    }
}

// ---------------------------------------------------------------------
// Canary and purged key on disk
// ---------------------------------------------------------------------

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
fn needles(what: &str, secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        (format!("{what} raw"), secret.to_vec()),
        (format!("{what} hex"), hex::encode(secret).into_bytes()),
        (
            format!("{what} HEX"),
            hex::encode_upper(secret).into_bytes(),
        ),
    ];
    for (name, engine) in [("base64", &STANDARD), ("base64url", &URL_SAFE)] {
        for prefix in 0..3usize {
            let mut input = vec![0u8; prefix];
            input.extend_from_slice(secret);
            let text = engine.encode(&input);
            let first_group = prefix.div_ceil(3);
            let end_group = (prefix + secret.len()) / 3;
            let middle = &text.as_bytes()[4 * first_group..4 * end_group];
            out.push((format!("{what} {name}@{prefix}"), middle.to_vec()));
        }
    }
    out
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
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

/// `(file, needle)` for every needle found in a file under `dir`.
fn scan(dir: &Path, needles: &[(String, Vec<u8>)]) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut scanned = 0;
    for file in files_under(dir) {
        let bytes = std::fs::read(&file).unwrap();
        scanned += bytes.len();
        for (name, needle) in needles {
            if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                found.push((file.clone(), name.clone()));
            }
        }
    }
    assert!(scanned > 0, "the scan read something");
    found
}

/// Records whose paths (hex) and values (raw bytes) hold a random canary;
/// then a rotation, a purge and a close. No file under the test's directory
/// holds the canary or the purged epoch's key, raw, hex or base64.
#[tokio::test(flavor = "multi_thread")]
async fn no_canary_or_purged_key_on_disk_after_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let canary = random_canary();
    let canary_hex = hex::encode(canary);
    let value = |i: u32| {
        let mut v = canary.to_vec();
        v.extend_from_slice(&i.to_be_bytes());
        ByteBuf::from(v)
    };

    let store = Store::open(config(dir)).await.unwrap();
    let mut batch = store.batch();
    for i in 0..600u32 {
        batch.put(&format!("canary/{canary_hex}/{i}"), &value(i));
    }
    batch.commit().await.unwrap();
    // Some churn under the old key: overwritten and deleted canary records.
    for i in 0..50u32 {
        store
            .put(&format!("canary/{canary_hex}/{i}"), &value(i + 1_000))
            .await
            .unwrap();
    }
    for i in 50..80u32 {
        store
            .delete(&format!("canary/{canary_hex}/{i}"))
            .await
            .unwrap();
    }
    let raw = store.crypto().dangerous().export_raw().await.unwrap();
    let old = persist_core::export::ExportedKeys::unwrap(&raw, "").unwrap();
    assert_eq!(old.epochs.len(), 1);
    assert_eq!(old.epochs[0].0.0, 1);
    let old_key = *old.epochs[0].1.key.as_ref().unwrap().expose();

    let rotation = store.crypto().rotate_key().await.unwrap();
    assert_eq!(rotation.epoch(), 2);
    rotation.wait().await.unwrap();
    settled(&store, Duration::from_secs(30))
        .await
        .expect("the rotation finishes");
    assert_eq!(store.crypto().purge_retired_keys().await.unwrap(), vec![1]);
    let got: ByteBuf = store
        .get(&format!("canary/{canary_hex}/7"))
        .await
        .unwrap()
        .unwrap();
    assert!(got == value(1_007));
    store.close().await.unwrap();
    common::wait_released(dir).await;

    let mut all = needles("canary", &canary);
    all.extend(needles("purged key", &old_key));
    let found = scan(dir, &all);
    assert!(found.is_empty(), "found on disk: {found:?}");

    // Still readable after all that.
    let store = common::open_when_released(|| config(dir)).await.unwrap();
    let listed: Vec<(String, ByteBuf)> = store.list("canary/").await.unwrap();
    assert_eq!(listed.len(), 570);
    let status = store.status().await.unwrap();
    assert!(old_epochs_are(&status, "purged"), "{:?}", status.epochs);
    store.close().await.unwrap();
}

// ---------------------------------------------------------------------
// Bad exports
// ---------------------------------------------------------------------

const PASSPHRASE: &str = "correct horse battery staple";

/// `(what, export text, passphrase, word the error must say)`.
fn bad_imports(export: &str) -> Vec<(&'static str, String, &'static str, &'static str)> {
    let prefix = persist_core::export::PREFIX.len();
    let body = export.len() - prefix;
    // One character of the body replaced by another base64url character.
    let mut edited = export.as_bytes().to_vec();
    let at = prefix + body / 2;
    edited[at] = if edited[at] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    let mut edited_end = export.as_bytes().to_vec();
    let last = edited_end.len() - 1;
    edited_end[last] = if edited_end[last] == b'A' { b'B' } else { b'A' };
    let edited_end = String::from_utf8(edited_end).unwrap();
    vec![
        (
            "truncated by 10",
            export[..export.len() - 10].to_owned(),
            PASSPHRASE,
            "damaged",
        ),
        (
            "truncated by 1",
            export[..export.len() - 1].to_owned(),
            PASSPHRASE,
            "damaged",
        ),
        (
            "cut in half",
            export[..prefix + body / 2].to_owned(),
            PASSPHRASE,
            "damaged",
        ),
        ("one character changed", edited, PASSPHRASE, "damaged"),
        ("last character changed", edited_end, PASSPHRASE, "damaged"),
        (
            "wrong passphrase",
            export.to_owned(),
            "correct horse battery stapler",
            "wrong passphrase",
        ),
    ]
}

/// `Store::open` with a bad import: an `OpenError::Import` saying `word`.
async fn open_refused(config: Config, what: &str, word: &str) {
    match Store::open(config).await {
        Err(e @ OpenError::Import(_)) => {
            let message = e.to_string();
            assert!(
                message.contains(word),
                "{what}: the message {message:?} does not say {word:?}"
            );
        }
        Err(other) => panic!("{what}: expected OpenError::Import, got {other:?}: {other}"),
        Ok(store) => {
            store.close().await.unwrap();
            panic!("{what}: the store opened");
        }
    }
}

/// The byte ranges where `after` differs from `before`, for messages.
fn changed_ranges(before: &[u8], after: &[u8]) -> String {
    let mut ranges = Vec::new();
    let mut i = 0;
    let common_len = before.len().min(after.len());
    while i < common_len && ranges.len() < 16 {
        if before[i] != after[i] {
            let start = i;
            while i < common_len && before[i] != after[i] {
                i += 1;
            }
            ranges.push(format!("{start}..{i}"));
        }
        i += 1;
    }
    format!(
        "{} bytes before, {} after; differing ranges (first 16): {}",
        before.len(),
        after.len(),
        ranges.join(" ")
    )
}

/// All records of a store, with the epoch summary.
async fn snapshot(store: &Store) -> (Vec<(String, String)>, u32, u64) {
    let listed: Vec<(String, String)> = store.list("").await.unwrap();
    let status = store.status().await.unwrap();
    (listed, status.current_epoch, status.records)
}

/// A truncated export, an export with one character changed and a wrong
/// passphrase are refused with `OpenError::Import` saying "damaged" or
/// "wrong passphrase": in an empty directory no database (or key) is left
/// behind; on a copied database, before and after the device has imported
/// the keys, every record and the device key stay as they were, and the
/// database file is not written (`Config::key`: "nothing is written").
#[tokio::test(flavor = "multi_thread")]
async fn bad_exports_are_refused_and_change_nothing() {
    // The source store: records under two epochs (the second rotation
    // leaves epoch 1 retired, not purged, so the export holds both).
    let a = tempfile::tempdir().unwrap();
    let store = Store::open(config(a.path())).await.unwrap();
    let mut batch = store.batch();
    for i in 0..200u32 {
        batch.put(&format!("r/{i:03}"), &format!("value {i}"));
    }
    batch.commit().await.unwrap();
    store
        .crypto()
        .rotate_key()
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    store.put("after/rotation", &"yes").await.unwrap();
    let export = store
        .crypto()
        .export_key_with(PASSPHRASE)
        .await
        .unwrap()
        .export;
    assert!(export.starts_with(persist_core::export::PREFIX));
    let source = snapshot(&store).await;
    store.close().await.unwrap();
    common::wait_released(a.path()).await;

    // An empty target directory: nothing is left in it.
    for (what, text, pass, word) in bad_imports(&export) {
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(common::store_dir(b.path())).unwrap();
        open_refused(config(b.path()).key(&text, pass), what, word).await;
        let left: Vec<_> = files_under(b.path());
        assert!(
            left.is_empty(),
            "{what}: a refused import into an empty directory left {left:?}"
        );
        assert!(!common::db_file(b.path()).exists(), "{what}");
    }

    // A copied database on a device without the store's keys.
    let b = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(common::store_dir(b.path())).unwrap();
    std::fs::copy(common::db_file(a.path()), common::db_file(b.path())).unwrap();
    // Byte changes to a database by a refused open, reported at the end so
    // that the checks of what is readable run first.
    let mut rewritten = Vec::new();
    for (what, text, pass, word) in bad_imports(&export) {
        let before = std::fs::read(common::db_file(b.path())).unwrap();
        open_refused(config(b.path()).key(&text, pass), what, word).await;
        let after = std::fs::read(common::db_file(b.path())).unwrap();
        if after != before {
            rewritten.push(format!(
                "copy without keys, {what}: {}",
                changed_ranges(&before, &after)
            ));
        }
        assert!(
            !common::key_file(b.path()).exists(),
            "{what}: a refused import made a device key"
        );
    }
    let store = common::open_when_released(|| config(b.path()).key(&export, PASSPHRASE))
        .await
        .unwrap();
    assert!(
        snapshot(&store).await == source,
        "the copy with the right export"
    );
    store.close().await.unwrap();
    common::wait_released(b.path()).await;

    // The same device, now holding the keys: a bad export is still refused
    // and changes nothing.
    let key_before = std::fs::read(common::key_file(b.path())).unwrap();
    for (what, text, pass, word) in bad_imports(&export) {
        let before = std::fs::read(common::db_file(b.path())).unwrap();
        open_refused(config(b.path()).key(&text, pass), what, word).await;
        let after = std::fs::read(common::db_file(b.path())).unwrap();
        if after != before {
            rewritten.push(format!(
                "copy with keys, {what}: {}",
                changed_ranges(&before, &after)
            ));
        }
        assert!(
            std::fs::read(common::key_file(b.path())).unwrap() == key_before,
            "{what}: a refused import changed the device key"
        );
    }
    let store = common::open_when_released(|| config(b.path()))
        .await
        .unwrap();
    assert!(
        snapshot(&store).await == source,
        "after the refused imports"
    );
    store.close().await.unwrap();
    // `Config::key`: "a wrong passphrase or a damaged export is an error,
    // and nothing is written".
    assert!(
        rewritten.is_empty(),
        "refused imports wrote to the database ({} of {}): {rewritten:#?}",
        rewritten.len(),
        2 * bad_imports(&export).len()
    );
}
