//! Read and write transactions over the local schema.
//!
//! A [`WriteTxn`] keeps the derived bookkeeping (live-row counter, per-epoch
//! counts, change log appends) in memory and writes it once, at commit, so a
//! put touches only the `records` table. [`WriteTxn::records`] opens that
//! table once for a whole batch of puts.
//!
//! Every method that calls into redb runs that work under
//! [`crate::contain::contain`], so a damaged file is an error, never a panic.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use persist_core::{Epoch, Locator};
use redb::{ReadableTable, ReadableTableMetadata};
use sha2::{Digest, Sha256};

use crate::contain::{Guarded, contain};
use crate::error::StorageError;
use crate::row::{self, Row, RowFacts};
use crate::schema::{
    CHANGES, EPOCH_COUNTS, LAST_CHANGE_SEQ_KEY, LIVE_ROWS_KEY, META, PENDING, RECORDS,
    is_reserved_meta_key, meta_u64,
};

/// The largest envelope the local database stores: a record must fit in one
/// sync frame (16 MiB), envelope and framing included.
pub const ENVELOPE_BYTES_MAX: usize = 16 * 1024 * 1024;
// redb refuses values over 3 GiB; ours must always fit.
const _: () = assert!(ENVELOPE_BYTES_MAX + row::HEADER_BYTES < 3 * 1024 * 1024 * 1024);

/// A pending envelope, as [`ReadTxn::pending_page`] and
/// [`WriteTxn::parked`] return it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parked {
    /// Its name.
    pub held: Held,
    /// The envelope.
    pub envelope: Vec<u8>,
    /// Whether its signature was checked when it was parked.
    pub verified: bool,
}

impl Parked {
    fn decode(key: [u8; 64], value: &[u8]) -> Result<Self, StorageError> {
        let held = Held::from_key(key);
        let (verified, envelope) = match value.split_first() {
            Some((0, envelope)) => (false, envelope),
            Some((1, envelope)) => (true, envelope),
            _ => {
                return Err(StorageError::CorruptRow {
                    locator: held.locator,
                });
            }
        };
        Ok(Self {
            held,
            envelope: envelope.to_vec(),
            verified,
        })
    }
}

/// Names one pending envelope: the locator it arrived for and the SHA-256
/// of its bytes. Several envelopes may be pending at one locator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Held {
    /// The locator the envelope arrived for.
    pub locator: Locator,
    digest: [u8; 32],
}

impl Held {
    /// The name `envelope` is (or would be) pending under at `locator`.
    pub fn of(locator: &Locator, envelope: &[u8]) -> Self {
        Self {
            locator: *locator,
            digest: Sha256::digest(envelope).into(),
        }
    }

    fn key(&self) -> [u8; 64] {
        let mut key = [0; 64];
        key[..32].copy_from_slice(&self.locator.0);
        key[32..].copy_from_slice(&self.digest);
        key
    }

    fn from_key(key: [u8; 64]) -> Self {
        let (locator, digest) = key.split_at(32);
        Self {
            locator: Locator(arr32(locator)),
            digest: arr32(digest),
        }
    }

    /// The first and last keys at `locator`.
    fn range(locator: &Locator) -> ([u8; 64], [u8; 64]) {
        let first = Held {
            locator: *locator,
            digest: [0; 32],
        };
        let last = Held {
            locator: *locator,
            digest: [0xff; 32],
        };
        (first.key(), last.key())
    }
}

/// A 32-byte half of a pending key as an array (only ever given one).
fn arr32(s: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(s);
    out
}

type RecordsTable = redb::ReadOnlyTable<[u8; 32], &'static [u8]>;

/// A snapshot of the database as of its last commit.
///
/// Methods open the tables they need; the `records` table is opened once, on
/// first use, and kept for the life of the transaction.
pub struct ReadTxn {
    // Dropped in this order: the table before the transaction it reads.
    records: OnceCell<Guarded<RecordsTable>>,
    txn: Guarded<redb::ReadTransaction>,
    path: Arc<Path>,
}

impl std::fmt::Debug for ReadTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadTxn").finish_non_exhaustive()
    }
}

impl ReadTxn {
    pub(crate) fn new(txn: redb::ReadTransaction, path: Arc<Path>) -> Self {
        Self {
            records: OnceCell::new(),
            txn: Guarded::new(txn),
            path,
        }
    }

    /// Runs `work` contained (see [`crate::contain`]).
    fn contained<T>(
        &self,
        work: impl FnOnce() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        contain(&self.path, work)
    }

    /// The `records` table. Call only within [`Self::contained`].
    fn records(&self) -> Result<&RecordsTable, StorageError> {
        if let Some(table) = self.records.get() {
            return Ok(table);
        }
        let table = Guarded::new(self.txn.open_table(RECORDS)?);
        Ok(self.records.get_or_init(|| table))
    }

    /// The row at `locator`, or `None` if there is none.
    ///
    /// A row whose checksum fails is [`StorageError::CorruptRow`].
    pub fn record(&self, locator: &Locator) -> Result<Option<Row>, StorageError> {
        self.contained(|| {
            let Some(guard) = self.records()?.get(&locator.0)? else {
                return Ok(None);
            };
            row::decode(guard.value())
                .map(Some)
                .ok_or(StorageError::CorruptRow { locator: *locator })
        })
    }

    /// Up to `limit` rows in locator order, strictly after `after` (from the
    /// first row if `None`). An empty page means there are no more rows.
    ///
    /// A damaged row ends a page early; when it would come first, the call
    /// fails with [`StorageError::CorruptRow`] instead. Continuing after the
    /// last locator returned, or after the damaged one, visits every row
    /// exactly once.
    pub fn records_page(
        &self,
        after: Option<&Locator>,
        limit: usize,
    ) -> Result<Vec<(Locator, Row)>, StorageError> {
        let mut page = Vec::new();
        if limit == 0 {
            return Ok(page);
        }
        let start = after.map_or(Bound::Unbounded, |after| Bound::Excluded(after.0));
        self.contained(|| {
            for entry in self.records()?.range((start, Bound::Unbounded))? {
                let (key, value) = entry?;
                let locator = Locator(key.value());
                match row::decode(value.value()) {
                    Some(row) => page.push((locator, row)),
                    None if page.is_empty() => return Err(StorageError::CorruptRow { locator }),
                    None => break,
                }
                if page.len() == limit {
                    break;
                }
            }
            Ok(page)
        })
    }

    /// The number of rows that are not tombstones. O(1): kept as a counter.
    pub fn live_count(&self) -> Result<u64, StorageError> {
        self.contained(|| meta_u64(&self.txn.open_table(META)?, LIVE_ROWS_KEY))
    }

    /// The number of rows, tombstones included. O(1).
    pub fn row_count(&self) -> Result<u64, StorageError> {
        self.contained(|| Ok(self.records()?.len()?))
    }

    /// For every epoch that seals at least one row, how many rows it seals
    /// (tombstones included).
    pub fn epoch_counts(&self) -> Result<BTreeMap<Epoch, u64>, StorageError> {
        self.contained(|| {
            let table = self.txn.open_table(EPOCH_COUNTS)?;
            let mut counts = BTreeMap::new();
            for entry in table.iter()? {
                let (epoch, count) = entry?;
                counts.insert(Epoch(epoch.value()), count.value());
            }
            Ok(counts)
        })
    }

    /// The meta entry under `key`.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.contained(|| {
            let table = self.txn.open_table(META)?;
            Ok(table.get(key)?.map(|value| value.value().to_vec()))
        })
    }

    /// Up to `limit` change log entries with a sequence number above
    /// `after_seq`, in order. An empty result means the caller is caught up.
    pub fn changes_since(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Locator)>, StorageError> {
        let mut changes = Vec::new();
        if limit == 0 {
            return Ok(changes);
        }
        self.contained(|| {
            let table = self.txn.open_table(CHANGES)?;
            for entry in table.range((Bound::Excluded(after_seq), Bound::Unbounded))? {
                let (seq, locator) = entry?;
                changes.push((seq.value(), Locator(locator.value())));
                if changes.len() == limit {
                    break;
                }
            }
            Ok(changes)
        })
    }

    /// The sequence number of the last change, 0 if there was none.
    pub fn last_change_seq(&self) -> Result<u64, StorageError> {
        self.contained(|| meta_u64(&self.txn.open_table(META)?, LAST_CHANGE_SEQ_KEY))
    }

    /// Up to `limit` pending envelopes (see [`WriteTxn::park`]) after
    /// `after`, in key order (by locator, then digest). Continuing after
    /// the last one returned visits every pending envelope once.
    pub fn pending_page(
        &self,
        after: Option<&Held>,
        limit: usize,
    ) -> Result<Vec<Parked>, StorageError> {
        let mut page = Vec::new();
        if limit == 0 {
            return Ok(page);
        }
        let start = after.map_or(Bound::Unbounded, |after| Bound::Excluded(after.key()));
        self.contained(|| {
            let table = match self.txn.open_table(PENDING) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            for entry in table.range((start, Bound::Unbounded))? {
                let (key, value) = entry?;
                page.push(Parked::decode(key.value(), value.value())?);
                if page.len() == limit {
                    break;
                }
            }
            Ok(())
        })?;
        Ok(page)
    }

    /// The number of pending envelopes.
    pub fn pending_count(&self) -> Result<u64, StorageError> {
        self.contained(|| match self.txn.open_table(PENDING) {
            Ok(table) => Ok(table.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        })
    }
}

/// The one write transaction. Nothing it does is visible to readers, or
/// durable, before [`WriteTxn::commit`]; dropping it aborts.
///
/// After an error other than [`StorageError::EnvelopeTooLarge`] or
/// [`StorageError::ReservedMetaKey`] from a write, or any error from a read
/// (which change nothing), the transaction refuses to commit.
///
/// After a [`StorageError::Damaged`] from any method, reads included, it
/// refuses to commit: redb failed part-way through.
pub struct WriteTxn {
    txn: Guarded<redb::WriteTransaction>,
    book: Bookkeeping,
    /// Reused buffer for encoding rows, so a put does not allocate.
    scratch: Vec<u8>,
    /// Set when an operation failed half-way: committing would store a
    /// state the counters do not describe. Atomic only to be settable
    /// from `&self` while `WriteTxn` stays `Sync`.
    failed: AtomicBool,
    path: Arc<Path>,
}

impl std::fmt::Debug for WriteTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTxn")
            .field("live_rows", &self.book.live_rows)
            .field("last_change_seq", &self.book.last_change_seq())
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl WriteTxn {
    pub(crate) fn new(txn: redb::WriteTransaction, path: Arc<Path>) -> Result<Self, StorageError> {
        // Owned outside the contained read, so that a panic there drops it
        // (an abort) after the panic is caught, not while it unwinds.
        let txn = Guarded::new(txn);
        let (live_rows, committed_seq) = contain(&path, || -> Result<_, StorageError> {
            let meta = txn.open_table(META)?;
            Ok((
                meta_u64(&meta, LIVE_ROWS_KEY)?,
                meta_u64(&meta, LAST_CHANGE_SEQ_KEY)?,
            ))
        })?;
        Ok(Self {
            txn,
            book: Bookkeeping {
                live_rows,
                committed_seq,
                appended: Vec::new(),
                recounted: None,
                epoch_deltas: BTreeMap::new(),
            },
            scratch: Vec::new(),
            failed: AtomicBool::new(false),
            path,
        })
    }

    /// Runs `work` contained (see [`crate::contain`]); a panic marks the
    /// transaction failed.
    fn contained<T>(
        &self,
        work: impl FnOnce() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        contained(&self.path, &self.failed, work)
    }

    /// Opens the `records` table for a batch of puts and removes.
    pub fn records(&mut self) -> Result<RecordsMut<'_>, StorageError> {
        let table = contained(&self.path, &self.failed, || {
            Ok(self.txn.open_table(RECORDS)?)
        })?;
        Ok(RecordsMut {
            table: Guarded::new(table),
            book: &mut self.book,
            scratch: &mut self.scratch,
            failed: &self.failed,
            path: &self.path,
        })
    }

    /// The row at `locator` as this transaction sees it.
    pub fn record(&self, locator: &Locator) -> Result<Option<Row>, StorageError> {
        self.contained(|| {
            let table = self.txn.open_table(RECORDS)?;
            get_row(&table, locator)
        })
    }

    /// Stores `row` at `locator`, replacing any row there, and returns the
    /// change sequence number it was logged under. See [`RecordsMut::put`].
    pub fn put_record(&mut self, locator: &Locator, row: &Row) -> Result<u64, StorageError> {
        self.records()?.put(locator, row)
    }

    /// Physically removes the row at `locator`. See [`RecordsMut::remove`].
    pub fn remove_record(&mut self, locator: &Locator) -> Result<Option<u64>, StorageError> {
        self.records()?.remove(locator)
    }

    /// The meta entry under `key` as this transaction sees it.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.contained(|| {
            let table = self.txn.open_table(META)?;
            Ok(table.get(key)?.map(|value| value.value().to_vec()))
        })
    }

    /// Sets the meta entry `key`. Keys starting with `'\0'`, and `"format"`,
    /// are reserved for this crate.
    pub fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        if is_reserved_meta_key(key) {
            return Err(StorageError::ReservedMetaKey { key: key.into() });
        }
        self.contained(|| {
            let mut table = self.txn.open_table(META)?;
            table
                .insert(key, value)
                .map_err(|err| failed(&self.failed, err))?;
            Ok(())
        })
    }

    /// Removes the meta entry `key`; returns whether there was one.
    pub fn remove_meta(&mut self, key: &str) -> Result<bool, StorageError> {
        if is_reserved_meta_key(key) {
            return Err(StorageError::ReservedMetaKey { key: key.into() });
        }
        self.contained(|| {
            let mut table = self.txn.open_table(META)?;
            let removed = table.remove(key).map_err(|err| failed(&self.failed, err))?;
            Ok(removed.is_some())
        })
    }

    /// Keeps `envelope`, which arrived by sync for `locator` but cannot be
    /// applied yet, beside any others pending there (the same bytes twice
    /// are kept once), noting whether its signature was `verified`. The
    /// caller decides which pending envelopes to drop.
    pub fn park(
        &mut self,
        locator: &Locator,
        envelope: &[u8],
        verified: bool,
    ) -> Result<Held, StorageError> {
        if envelope.len() > ENVELOPE_BYTES_MAX {
            return Err(StorageError::EnvelopeTooLarge {
                bytes: envelope.len(),
                max: ENVELOPE_BYTES_MAX,
            });
        }
        let held = Held::of(locator, envelope);
        self.contained(|| {
            let mut value = Vec::with_capacity(1 + envelope.len());
            value.push(u8::from(verified));
            value.extend_from_slice(envelope);
            let mut table = self.txn.open_table(PENDING)?;
            table
                .insert(&held.key(), value.as_slice())
                .map_err(|err| failed(&self.failed, err))?;
            Ok(())
        })?;
        Ok(held)
    }

    /// The envelopes pending at `locator`, as this transaction sees them.
    pub fn parked(&self, locator: &Locator) -> Result<Vec<Parked>, StorageError> {
        self.contained(|| {
            let table = self.txn.open_table(PENDING)?;
            let (first, last) = Held::range(locator);
            let mut found = Vec::new();
            for entry in table.range(first..=last)? {
                let (key, value) = entry?;
                found.push(Parked::decode(key.value(), value.value())?);
            }
            Ok(found)
        })
    }

    /// Drops the pending envelope `held`; returns whether it was there.
    pub fn unpark(&mut self, held: &Held) -> Result<bool, StorageError> {
        self.contained(|| {
            let mut table = self.txn.open_table(PENDING)?;
            let removed = table
                .remove(&held.key())
                .map_err(|err| failed(&self.failed, err))?;
            Ok(removed.is_some())
        })
    }

    /// The number of non-tombstone rows as this transaction sees it.
    pub fn live_count(&self) -> u64 {
        self.book.live_rows
    }

    /// The last change sequence number handed out, this transaction included.
    pub fn last_change_seq(&self) -> u64 {
        self.book.last_change_seq()
    }

    /// Makes everything this transaction did durable (redb
    /// `Durability::Immediate`), or nothing of it.
    pub fn commit(self) -> Result<(), StorageError> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(StorageError::Unusable {
                detail: "an earlier operation of this transaction failed half-way".into(),
            });
        }
        // A failure here drops the transaction, uncommitted.
        self.contained(|| write_bookkeeping(&self.txn, &self.book))?;
        let txn = self.txn.into_inner();
        contain(&self.path, || Ok(txn.commit()?))
    }

    /// Discards everything this transaction did.
    pub fn abort(self) -> Result<(), StorageError> {
        let txn = self.txn.into_inner();
        contain(&self.path, || Ok(txn.abort()?))
    }
}

/// Runs `work` contained (see [`crate::contain`]); a panic sets `failed`.
fn contained<T>(
    path: &Path,
    failed: &AtomicBool,
    work: impl FnOnce() -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    contain(path, work).map_err(|err| {
        if matches!(err, StorageError::Damaged { .. }) {
            failed.store(true, Ordering::Relaxed);
        }
        err
    })
}

/// Writes the change log appends, epoch counts and counters.
fn write_bookkeeping(txn: &redb::WriteTransaction, book: &Bookkeeping) -> Result<(), StorageError> {
    if book.appended.is_empty() && book.recounted.is_none() {
        debug_assert!(
            book.epoch_deltas.is_empty(),
            "every row change appends to the change log"
        );
        return Ok(());
    }
    {
        let mut changes = txn.open_table(CHANGES)?;
        for (seq, locator) in (book.committed_seq + 1..).zip(&book.appended) {
            changes.insert(seq, locator)?;
        }
    }
    {
        let mut counts = txn.open_table(EPOCH_COUNTS)?;
        if let Some(recounted) = &book.recounted {
            counts.retain(|_, _| false)?;
            for (&epoch, &count) in recounted {
                counts.insert(epoch, count)?;
            }
        }
        for (&epoch, &delta) in &book.epoch_deltas {
            let stored = counts.get(epoch)?.map_or(0, |count| count.value());
            let count = stored.checked_add_signed(delta).ok_or_else(|| {
                StorageError::corrupted(format!(
                    "count of epoch {epoch} would go from {stored} by {delta}"
                ))
            })?;
            if count == 0 {
                counts.remove(epoch)?;
            } else {
                counts.insert(epoch, count)?;
            }
        }
    }
    let mut meta = txn.open_table(META)?;
    meta.insert(LIVE_ROWS_KEY, book.live_rows.to_le_bytes().as_slice())?;
    meta.insert(
        LAST_CHANGE_SEQ_KEY,
        book.last_change_seq().to_le_bytes().as_slice(),
    )?;
    Ok(())
}

/// The `records` table opened for writing within a [`WriteTxn`]: put and
/// remove many rows while opening the table once.
pub struct RecordsMut<'txn> {
    table: Guarded<redb::Table<'txn, [u8; 32], &'static [u8]>>,
    book: &'txn mut Bookkeeping,
    scratch: &'txn mut Vec<u8>,
    failed: &'txn AtomicBool,
    path: &'txn Path,
}

impl std::fmt::Debug for RecordsMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordsMut").finish_non_exhaustive()
    }
}

impl RecordsMut<'_> {
    /// The row at `locator` as this transaction sees it.
    pub fn get(&self, locator: &Locator) -> Result<Option<Row>, StorageError> {
        contained(self.path, self.failed, || get_row(&*self.table, locator))
    }

    /// Stores `row` at `locator`, replacing any row there; updates the epoch
    /// counts and live count and appends the locator to the change log.
    /// Returns the change's sequence number.
    ///
    /// Replacing a damaged row heals it. Its epoch and tombstone flag cannot
    /// be trusted, so the counts are then recounted from every row, in
    /// O(rows); see [`RecordsMut::recount`].
    pub fn put(&mut self, locator: &Locator, row: &Row) -> Result<u64, StorageError> {
        if row.envelope.len() > ENVELOPE_BYTES_MAX {
            return Err(StorageError::EnvelopeTooLarge {
                bytes: row.envelope.len(),
                max: ENVELOPE_BYTES_MAX,
            });
        }
        self.scratch.clear();
        row::encode(row.epoch, row.tombstone, &row.envelope, self.scratch);
        contained(self.path, self.failed, || {
            let replaced = self
                .table
                .insert(&locator.0, self.scratch.as_slice())
                .map_err(|err| failed(self.failed, err))?
                .map(|old| row::verify(old.value()));
            self.account(replaced, Some(row.facts()))?;
            Ok(self.book.append(locator))
        })
    }

    /// Physically removes the row at `locator` (for purges; a delete is a
    /// tombstone put). Returns the change sequence number, or `None` if there
    /// was no row, in which case nothing is logged.
    ///
    /// Removing a damaged row recounts, as [`RecordsMut::put`] does.
    pub fn remove(&mut self, locator: &Locator) -> Result<Option<u64>, StorageError> {
        contained(self.path, self.failed, || {
            let removed = self
                .table
                .remove(&locator.0)
                .map_err(|err| failed(self.failed, err))?
                .map(|old| row::verify(old.value()));
            if removed.is_none() {
                return Ok(None);
            }
            self.account(removed, None)?;
            Ok(Some(self.book.append(locator)))
        })
    }

    /// Recomputes the live count and epoch counts from every row, in
    /// O(rows). A damaged row counts as what its header claims; one whose
    /// header is unreadable fails with [`StorageError::CorruptRow`].
    ///
    /// Puts and removes call this themselves when they replace a damaged row.
    pub fn recount(&mut self) -> Result<(), StorageError> {
        let (path, failed) = (self.path, self.failed);
        contained(path, failed, || self.recount_within())
    }

    /// Accounts for a put or remove: `old` is the replaced row (`Some(None)`
    /// if it was damaged), `new` the row now stored.
    fn account(
        &mut self,
        old: Option<Option<RowFacts>>,
        new: Option<RowFacts>,
    ) -> Result<(), StorageError> {
        match old {
            // The damaged row is already replaced: failing now leaves rows
            // the counters do not describe.
            Some(None) => self
                .recount_within()
                .map_err(|err| failed(self.failed, err)),
            old => self
                .book
                .replace(old.flatten(), new)
                .map_err(|err| failed(self.failed, err)),
        }
    }

    /// [`Self::recount`] within a contained operation.
    fn recount_within(&mut self) -> Result<(), StorageError> {
        let (live_rows, counts) = self.count_rows()?;
        self.book.live_rows = live_rows;
        self.book.recounted = Some(counts);
        self.book.epoch_deltas.clear();
        Ok(())
    }

    fn count_rows(&self) -> Result<(u64, BTreeMap<u32, u64>), StorageError> {
        let mut live_rows = 0u64;
        let mut counts = BTreeMap::new();
        for entry in self.table.iter()? {
            let (key, value) = entry?;
            let facts = row::verify(value.value())
                .or_else(|| row::claimed_facts(value.value()))
                .ok_or(StorageError::CorruptRow {
                    locator: Locator(key.value()),
                })?;
            live_rows += u64::from(!facts.tombstone);
            *counts.entry(facts.epoch.0).or_insert(0u64) += 1;
        }
        Ok((live_rows, counts))
    }
}

/// Marks a write transaction as failed half-way and passes the error on.
fn failed(flag: &AtomicBool, err: impl Into<StorageError>) -> StorageError {
    flag.store(true, Ordering::Relaxed);
    err.into()
}

fn get_row(
    table: &impl ReadableTable<[u8; 32], &'static [u8]>,
    locator: &Locator,
) -> Result<Option<Row>, StorageError> {
    let Some(guard) = table.get(&locator.0)? else {
        return Ok(None);
    };
    row::decode(guard.value())
        .map(Some)
        .ok_or(StorageError::CorruptRow { locator: *locator })
}

/// What a write transaction has changed in the derived tables, written at
/// commit.
struct Bookkeeping {
    live_rows: u64,
    /// The last change sequence number committed before this transaction.
    committed_seq: u64,
    /// Locators logged by this transaction, at `committed_seq + 1..`.
    appended: Vec<[u8; 32]>,
    /// Every epoch's row count, if a recount replaced the stored ones.
    recounted: Option<BTreeMap<u32, u64>>,
    /// Change of each epoch's row count (since the recount, if any).
    epoch_deltas: BTreeMap<u32, i64>,
}

impl Bookkeeping {
    fn last_change_seq(&self) -> u64 {
        self.committed_seq + self.appended.len() as u64
    }

    fn append(&mut self, locator: &Locator) -> u64 {
        self.appended.push(locator.0);
        self.last_change_seq()
    }

    /// Accounts for the row `old` becoming `new` (`None`: no row).
    fn replace(
        &mut self,
        old: Option<RowFacts>,
        new: Option<RowFacts>,
    ) -> Result<(), StorageError> {
        let live = |facts: Option<RowFacts>| u64::from(facts.is_some_and(|f| !f.tombstone));
        self.live_rows = (self.live_rows + live(new))
            .checked_sub(live(old))
            .ok_or_else(|| StorageError::corrupted("live row counter is below the live rows"))?;
        if old.map(|f| f.epoch) != new.map(|f| f.epoch) {
            if let Some(old) = old {
                *self.epoch_deltas.entry(old.epoch.0).or_default() -= 1;
            }
            if let Some(new) = new {
                *self.epoch_deltas.entry(new.epoch.0).or_default() += 1;
            }
        }
        Ok(())
    }
}
