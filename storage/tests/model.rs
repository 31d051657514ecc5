//! The counters, change log and paging against a `BTreeMap` model.

// Test helpers unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use persist_core::{Epoch, Locator};
use persist_storage::{LocalDb, MemoryBackend, ReadTxn, Row};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Put {
        key: u8,
        epoch: u32,
        tombstone: bool,
        len: usize,
    },
    Remove {
        key: u8,
    },
    /// Recount from every row: must agree with the maintained counts.
    Recount,
    /// End the transaction: commit, or abort.
    End {
        commit: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..24, 1u32..5, any::<bool>(), 0usize..64)
            .prop_map(|(key, epoch, tombstone, len)| Op::Put { key, epoch, tombstone, len }),
        2 => (0u8..24).prop_map(|key| Op::Remove { key }),
        1 => Just(Op::Recount),
        1 => any::<bool>().prop_map(|commit| Op::End { commit }),
    ]
}

fn loc(key: u8) -> Locator {
    // Spread keys so locator order differs from insertion order.
    Locator([key.wrapping_mul(151); 32])
}

#[derive(Clone, Default)]
struct Model {
    rows: BTreeMap<Locator, Row>,
    changes: Vec<Locator>,
}

fn all_rows(read: &ReadTxn, limit: usize) -> Vec<(Locator, Row)> {
    let mut out: Vec<(Locator, Row)> = Vec::new();
    loop {
        let page = read
            .records_page(out.last().map(|(locator, _)| locator), limit)
            .unwrap();
        assert!(page.len() <= limit);
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

fn check(db: &LocalDb, model: &Model, limit: usize) {
    let read = db.begin_read().unwrap();
    let rows: Vec<_> = model.rows.clone().into_iter().collect();
    assert_eq!(all_rows(&read, limit), rows, "paged rows");
    assert_eq!(read.row_count().unwrap(), rows.len() as u64);
    let live = model.rows.values().filter(|row| !row.tombstone).count() as u64;
    assert_eq!(read.live_count().unwrap(), live);
    let mut epochs = BTreeMap::new();
    for row in model.rows.values() {
        *epochs.entry(row.epoch).or_insert(0u64) += 1;
    }
    assert_eq!(read.epoch_counts().unwrap(), epochs);

    // The change log: 1..=n without gaps, in order, read in bounded slices.
    assert_eq!(read.last_change_seq().unwrap(), model.changes.len() as u64);
    let mut seen = Vec::new();
    loop {
        let after = seen.last().map_or(0, |(seq, _)| *seq);
        let slice = read.changes_since(after, limit).unwrap();
        if slice.is_empty() {
            break;
        }
        seen.extend(slice);
    }
    let expected: Vec<_> = (1..).zip(model.changes.iter().copied()).collect();
    assert_eq!(seen, expected, "change log");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn counters_and_log_match_the_model(ops in proptest::collection::vec(op(), 1..120), limit in 1usize..7) {
        let db = LocalDb::open(Path::new("memory:model"), Some(Box::new(MemoryBackend::default()))).unwrap();
        let mut committed = Model::default();
        let mut pending = committed.clone();
        let mut txn = db.begin_write().unwrap();
        for op in ops {
            match op {
                Op::Put { key, epoch, tombstone, len } => {
                    let row = Row { epoch: Epoch(epoch), tombstone, envelope: vec![key; len] };
                    let seq = txn.put_record(&loc(key), &row).unwrap();
                    pending.changes.push(loc(key));
                    prop_assert_eq!(seq, pending.changes.len() as u64);
                    pending.rows.insert(loc(key), row);
                }
                Op::Remove { key } => {
                    let seq = txn.remove_record(&loc(key)).unwrap();
                    if pending.rows.remove(&loc(key)).is_some() {
                        pending.changes.push(loc(key));
                        prop_assert_eq!(seq, Some(pending.changes.len() as u64));
                    } else {
                        prop_assert_eq!(seq, None);
                    }
                }
                Op::Recount => txn.records().unwrap().recount().unwrap(),
                Op::End { commit } => {
                    prop_assert_eq!(txn.last_change_seq(), pending.changes.len() as u64);
                    prop_assert_eq!(
                        txn.live_count(),
                        pending.rows.values().filter(|row| !row.tombstone).count() as u64
                    );
                    if commit {
                        txn.commit().unwrap();
                        committed = pending.clone();
                    } else {
                        txn.abort().unwrap();
                        pending = committed.clone();
                    }
                    check(&db, &committed, limit);
                    txn = db.begin_write().unwrap();
                }
            }
        }
        txn.commit().unwrap();
        check(&db, &pending, limit);
    }
}

#[test]
fn handles_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<LocalDb>();
    send_sync::<MemoryBackend>();
    send::<ReadTxn>();
    send::<persist_storage::WriteTxn>();
}

#[test]
fn batch_puts_through_one_table_handle() {
    let db = LocalDb::open(
        Path::new("memory:batch"),
        Some(Box::new(MemoryBackend::default())),
    )
    .unwrap();
    let mut txn = db.begin_write().unwrap();
    {
        let mut records = txn.records().unwrap();
        for key in 0..100u8 {
            let row = Row {
                epoch: Epoch(u32::from(key % 3) + 1),
                tombstone: key % 10 == 0,
                envelope: vec![key; 100],
            };
            assert_eq!(records.put(&loc(key), &row).unwrap(), u64::from(key) + 1);
            assert_eq!(records.get(&loc(key)).unwrap(), Some(row));
        }
    }
    txn.commit().unwrap();
    let read = db.begin_read().unwrap();
    assert_eq!(read.row_count().unwrap(), 100);
    assert_eq!(read.live_count().unwrap(), 90);
    assert_eq!(
        read.epoch_counts().unwrap().into_iter().collect::<Vec<_>>(),
        vec![(Epoch(1), 34), (Epoch(2), 33), (Epoch(3), 33)]
    );
    assert_eq!(
        read.changes_since(98, 10).unwrap(),
        vec![(99, loc(98)), (100, loc(99))]
    );
    assert!(read.records_page(None, 0).unwrap().is_empty());
    assert!(read.changes_since(0, 0).unwrap().is_empty());
}
