//! A row whose bytes changed after they were written fails its read; a
//! write over it heals it without miscounting.

// Test helpers unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use persist_core::{Epoch, Locator};
use persist_storage::{LocalDb, MemoryBackend, ReadTxn, Row, StorageError};
use redb::ReadableTable;

const RECORDS: redb::TableDefinition<'_, [u8; 32], &[u8]> = redb::TableDefinition::new("records");

fn loc(i: u8) -> Locator {
    Locator([i; 32])
}

fn row(i: u8) -> Row {
    Row {
        epoch: Epoch(1 + u32::from(i % 2)),
        tombstone: false,
        envelope: vec![i; 40],
    }
}

/// Flips byte `at` of the stored row of `locator`, with redb directly.
fn flip_row_byte(path: &Path, locator: &Locator, at: usize) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(RECORDS).unwrap();
        let mut bytes = table.get(&locator.0).unwrap().unwrap().value().to_vec();
        bytes[at] ^= 0x01;
        table.insert(&locator.0, bytes.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

/// Pages through every row as a caller should: resuming after a damaged one.
fn walk(read: &ReadTxn, limit: usize) -> (Vec<Locator>, Vec<Locator>) {
    let (mut good, mut damaged) = (Vec::new(), Vec::new());
    let mut after: Option<Locator> = None;
    loop {
        match read.records_page(after.as_ref(), limit) {
            Ok(page) if page.is_empty() => return (good, damaged),
            Ok(page) => {
                good.extend(page.iter().map(|(locator, _)| *locator));
                after = Some(page[page.len() - 1].0);
            }
            Err(StorageError::CorruptRow { locator }) => {
                damaged.push(locator);
                after = Some(locator);
            }
            Err(err) => panic!("{err}"),
        }
    }
}

#[test]
fn flipped_bytes_fail_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let db = LocalDb::open(&path, None).unwrap();
        let mut txn = db.begin_write().unwrap();
        for i in 0..10 {
            txn.put_record(&loc(i), &row(i)).unwrap();
        }
        txn.commit().unwrap();
    }
    flip_row_byte(&path, &loc(3), 10 + 39); // last envelope byte (a signature's)
    flip_row_byte(&path, &loc(5), 2); // epoch
    flip_row_byte(&path, &loc(6), 7); // the checksum itself

    let db = LocalDb::open(&path, None).unwrap();
    let read = db.begin_read().unwrap();
    for damaged in [3, 5, 6] {
        let err = read.record(&loc(damaged)).unwrap_err();
        assert!(
            matches!(err, StorageError::CorruptRow { locator } if locator == loc(damaged)),
            "{err:?}"
        );
        assert!(err.to_string().contains("re-sync"), "{err}");
    }
    assert_eq!(read.record(&loc(4)).unwrap(), Some(row(4)));
    for limit in [1, 2, 3, 100] {
        let (good, damaged) = walk(&read, limit);
        assert_eq!(good, [0, 1, 2, 4, 7, 8, 9].map(loc));
        assert_eq!(damaged, [3, 5, 6].map(loc));
    }
    drop(read);

    // Writes over damaged rows heal them and recount; the other damaged rows
    // count by what their headers claim, which for these is right.
    let mut txn = db.begin_write().unwrap();
    assert_eq!(txn.put_record(&loc(5), &row(5)).unwrap(), 11);
    assert_eq!(txn.remove_record(&loc(3)).unwrap(), Some(12));
    assert_eq!(txn.put_record(&loc(20), &row(20)).unwrap(), 13);
    txn.commit().unwrap();

    let read = db.begin_read().unwrap();
    assert_eq!(read.record(&loc(5)).unwrap(), Some(row(5)));
    assert_eq!(read.record(&loc(3)).unwrap(), None);
    assert!(
        read.record(&loc(6)).is_err(),
        "untouched damaged row stays damaged"
    );
    assert_eq!(read.last_change_seq().unwrap(), 13);
    assert_eq!(read.live_count().unwrap(), 10);
    assert_eq!(
        read.epoch_counts().unwrap().into_iter().collect::<Vec<_>>(),
        vec![(Epoch(1), 6), (Epoch(2), 4)]
    );
}

#[test]
fn unreadable_header_blocks_recount_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let db = LocalDb::open(&path, None).unwrap();
        let mut txn = db.begin_write().unwrap();
        for i in 0..4 {
            txn.put_record(&loc(i), &row(i)).unwrap();
        }
        txn.commit().unwrap();
    }
    flip_row_byte(&path, &loc(1), 12);
    flip_row_byte(&path, &loc(2), 0); // row version: the header says nothing

    let db = LocalDb::open(&path, None).unwrap();
    let mut txn = db.begin_write().unwrap();
    let err = txn.put_record(&loc(1), &row(1)).unwrap_err();
    assert!(
        matches!(err, StorageError::CorruptRow { locator } if locator == loc(2)),
        "{err:?}"
    );
    let err = txn.commit().unwrap_err();
    assert!(matches!(err, StorageError::Unusable { .. }), "{err:?}");
    assert!(
        db.begin_read().unwrap().record(&loc(1)).is_err(),
        "nothing committed"
    );

    let mut txn = db.begin_write().unwrap();
    txn.remove_record(&loc(2)).unwrap();
    txn.put_record(&loc(1), &row(1)).unwrap();
    txn.commit().unwrap();
    let read = db.begin_read().unwrap();
    assert_eq!(read.record(&loc(1)).unwrap(), Some(row(1)));
    assert_eq!(read.live_count().unwrap(), 3);
    assert_eq!(
        read.epoch_counts().unwrap().into_iter().collect::<Vec<_>>(),
        vec![(Epoch(1), 1), (Epoch(2), 2)]
    );
}

#[test]
fn flipped_byte_in_a_backend_image_is_caught() {
    const CANARY: &[u8] = b"canary:d3c1f9e2a7b64c58";
    let memory = MemoryBackend::default();
    let name = Path::new("memory:canary");
    {
        let db = LocalDb::open(name, Some(Box::new(memory.clone()))).unwrap();
        let mut txn = db.begin_write().unwrap();
        let row = Row {
            epoch: Epoch(1),
            tombstone: false,
            envelope: CANARY.to_vec(),
        };
        txn.put_record(&loc(1), &row).unwrap();
        txn.commit().unwrap();
    }
    let mut image = memory.snapshot();
    let hits: Vec<usize> = image
        .windows(CANARY.len())
        .enumerate()
        .filter(|(_, window)| *window == CANARY)
        .map(|(at, _)| at)
        .collect();
    assert!(!hits.is_empty(), "envelope bytes not found in the image");
    for at in hits {
        image[at + CANARY.len() - 1] ^= 0x80;
    }

    let damaged = MemoryBackend::from_bytes(image);
    let db = LocalDb::open(name, Some(Box::new(damaged))).unwrap();
    let err = db.begin_read().unwrap().record(&loc(1)).unwrap_err();
    assert!(matches!(err, StorageError::CorruptRow { .. }), "{err:?}");
}
