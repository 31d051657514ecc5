//! A database file damaged by something other than redb (garbled 4 KiB
//! pages) never makes Persist's API panic: every operation returns `Ok` or a
//! typed error, a failed open leaves the file as it was, and a write
//! transaction that met the damage does not commit.
//!
//! redb itself may panic on such a file; its panic message can show on
//! stderr (the panic hook is global and left alone), but the panic never
//! leaves this crate. Run in debug and release: redb behaves differently.

// Test helpers unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use persist_core::{Epoch, Locator};
use persist_storage::{LocalDb, MemoryBackend, OpenError, Row, StorageError};

const PAGE: usize = 4096;
const ROWS: u32 = 300;

fn loc(i: u32) -> Locator {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&i.to_be_bytes());
    bytes[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
    Locator(bytes)
}

/// An envelope unique to row `i`, findable in the file.
fn envelope(i: u32) -> Vec<u8> {
    let mut envelope = format!("envelope-{i:08}-").into_bytes();
    envelope.resize(200, b'0' + (i % 10) as u8);
    envelope
}

fn row(i: u32) -> Row {
    Row {
        epoch: Epoch(1 + i % 3),
        tombstone: i.is_multiple_of(7),
        envelope: envelope(i),
    }
}

/// The bytes of a cleanly closed database with [`ROWS`] rows, written over
/// several transactions so redb has freed pages too.
fn pristine(dir: &Path) -> Vec<u8> {
    let path = dir.join("pristine.redb");
    let db = LocalDb::open(&path, None).unwrap();
    for chunk in (0..ROWS).collect::<Vec<_>>().chunks(100) {
        let mut txn = db.begin_write().unwrap();
        {
            let mut records = txn.records().unwrap();
            for &i in chunk {
                records.put(&loc(i), &row(i)).unwrap();
            }
        }
        txn.set_meta("engine", b"state").unwrap();
        txn.commit().unwrap();
    }
    db.close().unwrap();
    std::fs::read(&path).unwrap()
}

/// Offsets of every occurrence of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| *window == needle)
        .map(|(at, _)| at)
        .collect()
}

/// The pages holding row `i`'s envelope.
fn row_pages(image: &[u8], i: u32) -> Vec<usize> {
    let mut pages: Vec<usize> = find(image, &envelope(i)[..16])
        .into_iter()
        .map(|at| at / PAGE)
        .collect();
    pages.dedup();
    pages
}

#[derive(Clone, Copy, Debug)]
enum Garbage {
    /// The byte pattern the engine's tests use (starts with 0x3b).
    Pattern,
    /// Pseudo-random bytes.
    Random(u64),
}

/// Overwrites `len` bytes at `start` with garbage.
fn garble(image: &mut [u8], start: usize, len: usize, garbage: Garbage) {
    let end = (start + len).min(image.len());
    let mut state = match garbage {
        Garbage::Random(seed) => seed | 1,
        Garbage::Pattern => 0,
    };
    for (k, byte) in image[start..end].iter_mut().enumerate() {
        *byte = match garbage {
            Garbage::Pattern => (k as u8).wrapping_mul(151).wrapping_add(0x3b),
            Garbage::Random(_) => {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            }
        };
    }
}

/// Runs one call of Persist's API, failing the test if a panic escapes it.
fn no_panic<T>(what: &str, call: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(value) => value,
        Err(_) => panic!("{what}: a panic escaped Persist's API"),
    }
}

/// What the sweep over a damaged database saw.
#[derive(Debug, Default)]
struct Seen {
    refused_at_open: bool,
    /// Damage met: a typed error from some read or write.
    errors: usize,
    /// Of which `StorageError::Damaged` (a contained redb panic).
    damaged: usize,
    /// Write transactions that met `Damaged` and were refused at commit.
    refused_commits: usize,
}

impl Seen {
    fn saw<T>(&mut self, result: &Result<T, StorageError>) {
        if let Err(err) = result {
            self.errors += 1;
            if matches!(err, StorageError::Damaged { .. }) {
                self.damaged += 1;
                let message = err.to_string();
                assert!(
                    message.contains("is damaged") && message.contains("backup"),
                    "{message}"
                );
            }
        }
    }
}

/// Opens the damaged file at `path` and calls every read and write of the
/// API on it, none of which may panic.
fn sweep(path: &Path) -> Seen {
    let mut seen = Seen::default();
    let before = std::fs::read(path).unwrap();
    let db = match no_panic("open", || LocalDb::open(path, None)) {
        Ok(db) => db,
        Err(err) => {
            assert!(matches!(err, OpenError::Corrupted { .. }), "{err:?}");
            let message = err.to_string();
            assert!(
                message.contains(&path.display().to_string()) && message.contains("backup"),
                "{message}"
            );
            assert!(
                std::fs::read(path).unwrap() == before,
                "a failed open changed the damaged file"
            );
            seen.refused_at_open = true;
            return seen;
        }
    };
    sweep_reads(&db, &mut seen);
    sweep_writes(&db, &mut seen);
    let mut db = db;
    let checked = no_panic("check_integrity", || db.check_integrity());
    seen.saw(&checked);
    let closed = no_panic("close", || db.close());
    seen.saw(&closed);
    seen
}

fn sweep_reads(db: &LocalDb, seen: &mut Seen) {
    let read = no_panic("begin_read", || db.begin_read());
    seen.saw(&read);
    let Ok(read) = read else { return };
    for i in (0..ROWS).step_by(7) {
        let got = no_panic("record", || read.record(&loc(i)));
        if let Ok(Some(got)) = &got {
            assert_eq!(*got, row(i), "a damaged file returned a wrong row");
        }
        seen.saw(&got);
    }
    // Page through every row, resuming after damaged rows, as callers do.
    let mut after: Option<Locator> = None;
    for _ in 0..2 * ROWS {
        let page = no_panic("records_page", || read.records_page(after.as_ref(), 32));
        seen.saw(&page);
        match page {
            Ok(page) if page.is_empty() => break,
            Ok(page) => after = Some(page[page.len() - 1].0),
            Err(StorageError::CorruptRow { locator }) => after = Some(locator),
            Err(_) => break,
        }
    }
    let results = [
        no_panic("live_count", || read.live_count().map(drop)),
        no_panic("row_count", || read.row_count().map(drop)),
        no_panic("epoch_counts", || read.epoch_counts().map(drop)),
        no_panic("meta", || read.meta("engine").map(drop)),
        no_panic("changes_since", || read.changes_since(0, 1000).map(drop)),
        no_panic("changes_since", || read.changes_since(150, 10).map(drop)),
        no_panic("last_change_seq", || read.last_change_seq().map(drop)),
    ];
    for result in &results {
        seen.saw(result);
    }
    no_panic("drop ReadTxn", || drop(read));
}

fn sweep_writes(db: &LocalDb, seen: &mut Seen) {
    const MARKER: &str = "sweep-marker";
    // One transaction through every write, then commit.
    let txn = no_panic("begin_write", || db.begin_write());
    seen.saw(&txn);
    let Ok(mut txn) = txn else { return };
    let before = seen.damaged;
    let marked = no_panic("set_meta", || txn.set_meta(MARKER, b"1"));
    seen.saw(&marked);
    let results = [
        no_panic("put_record new", || {
            txn.put_record(&loc(ROWS + 1), &row(1)).map(drop)
        }),
        no_panic("put_record over", || {
            txn.put_record(&loc(3), &row(4)).map(drop)
        }),
        no_panic("remove_record", || txn.remove_record(&loc(8)).map(drop)),
        no_panic("record", || txn.record(&loc(10)).map(drop)),
        no_panic("meta", || txn.meta("engine").map(drop)),
        no_panic("remove_meta", || txn.remove_meta("engine").map(drop)),
    ];
    for result in &results {
        seen.saw(result);
    }
    {
        let records = no_panic("records", || txn.records());
        seen.saw(&records);
        if let Ok(mut records) = records {
            for i in (0..ROWS).step_by(11) {
                let put = no_panic("RecordsMut::put", || records.put(&loc(i), &row(i + 1)));
                seen.saw(&put);
                let got = no_panic("RecordsMut::get", || records.get(&loc(i + 1)));
                seen.saw(&got);
            }
            let removed = no_panic("RecordsMut::remove", || records.remove(&loc(12)));
            seen.saw(&removed);
            let recounted = no_panic("RecordsMut::recount", || records.recount());
            seen.saw(&recounted);
            no_panic("drop RecordsMut", || drop(records));
        }
    }
    let _ = (txn.live_count(), txn.last_change_seq());
    let met_damage = seen.damaged > before;
    let committed = no_panic("commit", || txn.commit());
    if met_damage {
        assert!(
            committed.is_err(),
            "a transaction that met a contained panic committed"
        );
        seen.refused_commits += 1;
        let read = no_panic("begin_read", || db.begin_read());
        if let Ok(read) = read {
            let marker = no_panic("meta", || read.meta(MARKER));
            assert!(
                !matches!(marker, Ok(Some(_))),
                "the refused transaction's writes are visible"
            );
        }
    }
    seen.saw(&committed);

    // A transaction aborted after touching the damage.
    let txn = no_panic("begin_write", || db.begin_write());
    seen.saw(&txn);
    if let Ok(mut txn) = txn {
        let put = no_panic("put_record", || txn.put_record(&loc(5), &row(5)));
        seen.saw(&put);
        let aborted = no_panic("abort", || txn.abort());
        seen.saw(&aborted);
    }
    // And one dropped without commit or abort.
    let txn = no_panic("begin_write", || db.begin_write());
    seen.saw(&txn);
    if let Ok(mut txn) = txn {
        let put = no_panic("put_record", || txn.put_record(&loc(6), &row(6)));
        seen.saw(&put);
        no_panic("drop WriteTxn", || drop(txn));
    }
}

/// Writes `image` with its `pages` garbled and sweeps it.
fn sweep_garbled(
    dir: &Path,
    name: &str,
    pristine: &[u8],
    pages: &[usize],
    garbage: Garbage,
) -> Seen {
    let mut image = pristine.to_vec();
    for &page in pages {
        garble(&mut image, page * PAGE, PAGE, garbage);
    }
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, &image).unwrap();
    sweep(&path)
}

#[test]
fn garbled_row_page_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = pristine(dir.path());
    let mut total = Seen::default();
    for i in [0, ROWS / 2, ROWS - 1] {
        let pages = row_pages(&pristine, i);
        assert!(!pages.is_empty(), "row {i} is in the file");
        for garbage in [Garbage::Pattern, Garbage::Random(u64::from(i) + 1)] {
            let seen = sweep_garbled(dir.path(), "row.redb", &pristine, &pages, garbage);
            assert!(
                seen.refused_at_open || seen.errors > 0,
                "row {i}'s page garbled ({garbage:?}) went unnoticed: {seen:?}"
            );
            total.damaged += seen.damaged;
            total.refused_commits += seen.refused_commits;
        }
    }
    eprintln!("garbled row pages: {total:?}");
}

#[test]
fn garbled_branch_page_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = pristine(dir.path());
    // A branch page (type byte 2) holding locators as separator keys: one
    // of `records`, live or left from an earlier commit.
    let locators: BTreeSet<[u8; 32]> = (0..ROWS).map(|i| loc(i).0).collect();
    let branches: Vec<usize> = (0..pristine.len() / PAGE)
        .filter(|&page| {
            let bytes = &pristine[page * PAGE..(page + 1) * PAGE];
            bytes[0] == 2
                && bytes
                    .windows(32)
                    .any(|window| locators.contains(<&[u8; 32]>::try_from(window).unwrap()))
        })
        .collect();
    assert!(!branches.is_empty(), "300 rows need a branch page");
    let mut noticed = 0;
    for (n, &page) in branches.iter().enumerate() {
        for garbage in [Garbage::Pattern, Garbage::Random(n as u64 + 7)] {
            let seen = sweep_garbled(dir.path(), "branch.redb", &pristine, &[page], garbage);
            eprintln!("branch page {page} ({garbage:?}): {seen:?}");
            noticed += usize::from(seen.refused_at_open || seen.errors > 0);
        }
    }
    assert!(noticed > 0, "the live branch page's damage went unnoticed");
}

#[test]
fn garbled_middle_of_the_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = pristine(dir.path());
    let mid = pristine.len() / 2;
    let mut image = pristine.clone();
    garble(&mut image, mid - PAGE / 2, PAGE, Garbage::Pattern);
    let path = dir.path().join("middle.redb");
    std::fs::write(&path, &image).unwrap();
    eprintln!("middle: {:?}", sweep(&path));
}

/// Every page of the file in turn, header included: the strongest check
/// that no damaged page makes the API panic.
#[test]
fn every_garbled_page_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = pristine(dir.path());
    let mut total = Seen::default();
    let mut refused = 0;
    let pages = pristine.len() / PAGE;
    for page in 0..pages {
        let garbage = if page.is_multiple_of(2) {
            Garbage::Pattern
        } else {
            Garbage::Random(page as u64)
        };
        let seen = sweep_garbled(dir.path(), "page.redb", &pristine, &[page], garbage);
        refused += usize::from(seen.refused_at_open);
        total.errors += seen.errors;
        total.damaged += seen.damaged;
        total.refused_commits += seen.refused_commits;
    }
    eprintln!("{pages} pages: {refused} refused at open, {total:?}");
    assert!(refused > 0, "the header page at least is refused at open");
}

/// A transaction that met a contained panic refuses to commit, and nothing
/// of it is stored: checked where the damage is certain to be met, by
/// writing over the rows of a garbled leaf page.
#[test]
fn a_write_that_met_a_panic_does_not_commit() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = pristine(dir.path());
    let target = ROWS / 2;
    let mut image = pristine.clone();
    for page in row_pages(&pristine, target) {
        // Keep the page's first 16 bytes (its type and entry count), so that
        // a debug build's walk at open passes, and garble its offsets and rows.
        garble(&mut image, page * PAGE + 16, PAGE - 16, Garbage::Pattern);
    }
    let path = dir.path().join("leaf.redb");
    std::fs::write(&path, &image).unwrap();

    // The damage lies below what the open checks, in both build modes.
    let db = no_panic("open", || LocalDb::open(&path, None)).unwrap();
    let mut txn = no_panic("begin_write", || db.begin_write()).unwrap();
    txn.set_meta("marker", b"1").unwrap();
    let mut errors = Vec::new();
    for i in 0..ROWS {
        if let Err(err) = no_panic("put_record", || txn.put_record(&loc(i), &row(i))) {
            errors.push(err);
        }
    }
    assert!(
        errors
            .iter()
            .any(|err| matches!(err, StorageError::Damaged { .. })),
        "writing over a garbled leaf makes redb panic: {errors:?}"
    );
    eprintln!("first error: {}", errors[0]);
    let err = no_panic("commit", || txn.commit()).unwrap_err();
    assert!(matches!(err, StorageError::Unusable { .. }), "{err:?}");
    let read = no_panic("begin_read", || db.begin_read());
    if let Ok(read) = read {
        let marker = no_panic("meta", || read.meta("marker"));
        assert!(!matches!(marker, Ok(Some(_))), "nothing was committed");
    }
}

/// The same containment on an injected backend: a damaged image is refused
/// or reports errors, and a refused one is left as it was.
#[test]
fn garbled_backend_image_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = pristine(dir.path());
    let name = Path::new("memory:damaged");
    for page in row_pages(&pristine, 0)
        .into_iter()
        .chain([pristine.len() / PAGE / 2, 1, 2])
    {
        let mut image = pristine.clone();
        garble(&mut image, page * PAGE, PAGE, Garbage::Pattern);
        let memory = MemoryBackend::from_bytes(image.clone());
        match no_panic("open", || {
            LocalDb::open(name, Some(Box::new(memory.clone())))
        }) {
            Err(err) => {
                assert!(matches!(err, OpenError::Corrupted { .. }), "{err:?}");
                assert!(err.to_string().contains("memory:damaged"), "{err}");
                assert!(memory.snapshot() == image, "backend bytes changed");
            }
            Ok(db) => {
                let mut seen = Seen::default();
                sweep_reads(&db, &mut seen);
                sweep_writes(&db, &mut seen);
                no_panic("drop LocalDb", || drop(db));
            }
        }
    }
}
