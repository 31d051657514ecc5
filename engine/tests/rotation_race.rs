//! Rotations that start while the Rotator is already busy: right after an
//! open (the Rotator walks the table at every start, to resume an
//! interrupted rotation) and right after another rotation. `Rotation::wait`
//! must not return, and no epoch may be retired, while records are still
//! sealed under it; a purge after `wait` must lose nothing.

// Integration tests: a panic in a helper is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use persist::{Config, KdfParams, Status, Store};

fn config(tmp: &Path) -> Config {
    Config::new(common::store_dir(tmp))
        .key_file(common::key_file(tmp))
        .dangerous()
        .export_kdf(KdfParams::insecure_for_tests())
        .done()
}

/// `(epoch, state, records)` of every epoch that is not current but still
/// seals records, or is retired while sealing records.
fn misplaced(status: &Status) -> Vec<(u32, &'static str, u64)> {
    status
        .epochs
        .iter()
        .filter(|e| e.epoch != status.current_epoch && e.records > 0)
        .map(|e| (e.epoch, e.state, e.records))
        .collect()
}

/// Writes `n` records, then runs `rotate` on a store reopened just before,
/// waits for the newest rotation, purges, and checks that every record
/// still reads back. Returns a description of each trial that went wrong.
async fn trial(n: u32, reopen: bool, rotations: u32) -> Option<String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut store = Store::open(config(dir)).await.unwrap();
    let mut batch = store.batch();
    for i in 0..n {
        batch.put(&format!("r/{i:05}"), &i);
    }
    batch.commit().await.unwrap();
    if reopen {
        store.close().await.unwrap();
        store = common::open_when_released(|| config(dir)).await.unwrap();
    }
    let mut last = None;
    for _ in 0..rotations {
        last = Some(store.crypto().rotate_key().await.unwrap());
    }
    let waited = last.unwrap().wait().await.unwrap();
    let after_wait = store.status().await.unwrap();
    let purged = store.crypto().purge_retired_keys().await.unwrap();
    let mut unreadable = 0;
    for i in 0..n {
        if store.get::<u32>(&format!("r/{i:05}")).await.map_err(|_| ()) != Ok(Some(i)) {
            unreadable += 1;
        }
    }
    let after_purge = store.status().await.unwrap();
    store.close().await.unwrap();
    let wrong_after_wait = misplaced(&after_wait);
    if wrong_after_wait.is_empty() && unreadable == 0 {
        return None;
    }
    Some(format!(
        "wait returned {waited:?} with records under old epochs {wrong_after_wait:?}; \
         purged {purged:?}; then {unreadable} of {n} records unreadable; epochs after \
         the purge: {:?}",
        after_purge.epochs
    ))
}

/// A rotation started just after an open, while the Rotator's start-up
/// walk of the table is still running.
#[tokio::test(flavor = "multi_thread")]
async fn rotating_right_after_open_retires_nothing_in_use() {
    let mut failures = Vec::new();
    for t in 0..20 {
        if let Some(f) = trial(100 + t * 17, true, 1).await {
            failures.push(format!("trial {t}: {f}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 20 trials went wrong: {failures:#?}",
        failures.len()
    );
}

/// Two rotations back to back on a small store: the second starts while
/// the first one's only pass is finishing.
#[tokio::test(flavor = "multi_thread")]
async fn rotating_twice_quickly_retires_nothing_in_use() {
    let mut failures = Vec::new();
    for t in 0..20 {
        if let Some(f) = trial(100 + t * 17, false, 2).await {
            failures.push(format!("trial {t}: {f}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 20 trials went wrong: {failures:#?}",
        failures.len()
    );
}

/// As above, on stores of whole Rotator slices (a multiple of 256
/// records): a rotation that starts during the start-up walk's last full
/// slice leaves a final pass step that sees an empty page.
#[tokio::test(flavor = "multi_thread")]
async fn rotating_right_after_open_of_whole_slices_finishes() {
    let mut failures = Vec::new();
    for t in 0..12u32 {
        if let Some(f) = trial(256 * (1 + t % 3), true, 1).await {
            failures.push(format!("trial {t}: {f}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 12 trials went wrong: {failures:#?}",
        failures.len()
    );
}
