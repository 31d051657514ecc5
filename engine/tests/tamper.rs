//! Tampering at rest: a record whose stored bytes were changed by someone
//! with access to the disk reads as a typed integrity error, never as a
//! value and never as a panic, and no other record is affected.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers as well as tests: a failed unwrap is a failed test"
)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use persist::ReadError;
use persist_core::Locator;
use persist_core::envelope::{HEADER_LEN, SIGNATURE_LEN, TAG_LEN};
use persist_storage::Row;

/// Records besides the target.
const OTHERS: usize = 19;
/// The record whose bytes are tampered with.
const TARGET: &str = "target/small";

fn other_path(i: usize) -> String {
    format!("others/{i:02}")
}

/// Every locator stored in the database at `tmp`.
async fn locators(tmp: &Path) -> BTreeSet<Locator> {
    let db = common::open_db(tmp).await;
    let read = db.begin_read().unwrap();
    let page = read.records_page(None, 10_000).unwrap();
    drop(read);
    db.close().unwrap();
    page.into_iter().map(|(locator, _)| locator).collect()
}

/// Fills a store with [`OTHERS`] records and the target, and returns the
/// target's locator (the one row its put added).
async fn fill(tmp: &Path) -> Locator {
    let store = common::reopen(tmp).await;
    for i in 0..OTHERS {
        let path = other_path(i);
        store.put(&path, &common::value_for(&path)).await.unwrap();
    }
    store.close().await.unwrap();
    let before = locators(tmp).await;
    assert_eq!(before.len(), OTHERS);

    let store = common::reopen(tmp).await;
    store.put(TARGET, &common::value_for(TARGET)).await.unwrap();
    store.close().await.unwrap();
    let after = locators(tmp).await;
    let added: Vec<Locator> = after.difference(&before).copied().collect();
    assert_eq!(added.len(), 1, "the target's put adds one row");
    added[0]
}

/// The stored row at `locator`.
async fn read_row(tmp: &Path, locator: &Locator) -> Row {
    let db = common::open_db(tmp).await;
    let read = db.begin_read().unwrap();
    let row = read.record(locator).unwrap().expect("the row exists");
    drop(read);
    db.close().unwrap();
    row
}

/// Stores `row` at `locator` through the storage layer, as a disk attacker
/// who knows the row format would: the row checksum is valid, only the
/// crypto layer can notice.
async fn write_row(tmp: &Path, locator: &Locator, row: &Row) {
    let db = common::open_db(tmp).await;
    let mut txn = db.begin_write().unwrap();
    txn.put_record(locator, row).unwrap();
    txn.commit().unwrap();
    db.close().unwrap();
}

/// Which part of an envelope of `len` bytes position `i` lies in.
fn region(i: usize, len: usize) -> &'static str {
    if i < HEADER_LEN {
        "header"
    } else if i < HEADER_LEN + 4 {
        "body length"
    } else if i < len - SIGNATURE_LEN - TAG_LEN {
        "ciphertext"
    } else if i < len - SIGNATURE_LEN {
        "tag"
    } else {
        "signature"
    }
}

/// Opens the store; reads the target, which must fail its integrity check
/// (or, if `target_reads`, read back), and every other record, which must
/// read back. Returns what went wrong.
async fn check_store(tmp: &Path, target_reads: bool) -> Result<(), String> {
    let store = common::open_when_released(|| common::config(tmp))
        .await
        .map_err(|e| format!("open failed: {e}"))?;
    let target = store.get::<String>(TARGET).await;
    let mut problems = Vec::new();
    match &target {
        Err(ReadError::Integrity { what, .. }) if what == TARGET && !target_reads => {}
        Ok(Some(v)) if target_reads && *v == common::value_for(TARGET) => {}
        other => problems.push(format!("target read as {other:?}")),
    }
    for i in 0..OTHERS {
        let path = other_path(i);
        match store.get::<String>(&path).await {
            Ok(Some(v)) if v == common::value_for(&path) => {}
            other => problems.push(format!("{path} read as {other:?}")),
        }
    }
    store
        .close()
        .await
        .map_err(|e| format!("close failed: {e}"))?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Every byte of a stored envelope before its signature, changed one at a
/// time (one bit, a different bit per position) behind the crypto layer's
/// back, makes the record fail with `ReadError::Integrity`: header, body
/// length, ciphertext and tag alike. A changed signature byte does not:
/// the tag proves a key holder sealed every other byte, and a local read
/// does not check the signature (it covers the tag, so the tag cannot
/// cover it); receivers refuse that copy. The other records keep reading
/// back, and restoring the original row heals the record.
#[tokio::test(flavor = "multi_thread")]
async fn every_flipped_envelope_byte_is_an_integrity_error() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let locator = fill(tmp).await;
    let original = read_row(tmp, &locator).await;
    let len = original.envelope.len();
    assert!(
        len > HEADER_LEN + 4 + TAG_LEN + SIGNATURE_LEN,
        "a sealed envelope: {len} bytes"
    );

    let mut failures = Vec::new();
    for i in 0..len {
        let mut tampered = original.clone();
        tampered.envelope[i] ^= 1 << (i % 8);
        write_row(tmp, &locator, &tampered).await;
        let signature = region(i, len) == "signature";
        if let Err(problem) = check_store(tmp, signature).await {
            failures.push(format!("byte {i} ({}): {problem}", region(i, len)));
        }
    }
    write_row(tmp, &locator, &original).await;
    let store = common::reopen(tmp).await;
    assert_eq!(
        store.get::<String>(TARGET).await.unwrap(),
        Some(common::value_for(TARGET)),
        "the restored row reads back"
    );
    store.close().await.unwrap();

    assert!(
        failures.is_empty(),
        "{} of {len} tampered positions were not refused:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A byte of a row changed in the raw database file (so the storage
/// layer's row checksum no longer matches) makes that record fail with
/// `ReadError::Integrity`, while every other record reads back.
#[tokio::test(flavor = "multi_thread")]
async fn flipped_byte_in_the_raw_file_is_an_integrity_error() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let locator = fill(tmp).await;
    let row = read_row(tmp, &locator).await;
    let signature = &row.envelope[row.envelope.len() - SIGNATURE_LEN..];

    common::wait_released(tmp).await;
    let db_path = common::db_file(tmp);
    let mut file = std::fs::read(&db_path).unwrap();
    let at: Vec<usize> = file
        .windows(SIGNATURE_LEN)
        .enumerate()
        .filter(|(_, w)| *w == signature)
        .map(|(i, _)| i)
        .collect();
    assert!(!at.is_empty(), "the row's signature is in the file");
    // Stale copies of the page may exist; change the byte in every copy so
    // that the live one is changed whichever it is.
    for &start in &at {
        file[start + SIGNATURE_LEN / 2] ^= 0x40;
    }
    std::fs::write(&db_path, &file).unwrap();

    if let Err(problem) = check_store(tmp, false).await {
        panic!(
            "{problem} (signature found at {} place(s) in the file)",
            at.len()
        );
    }
}
