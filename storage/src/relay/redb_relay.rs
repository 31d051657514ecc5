//! [`RedbRelay`]: the relay backend on one redb file, durable on commit.
//!
//! Each operation is one redb transaction, run through
//! [`super::blocking::run_blocking`] and under [`crate::contain`], so a
//! damaged file is a [`RelayError::Unavailable`], never a panic. Writes
//! that change nothing (an all-stale append, an ack of nothing) abort
//! instead of paying for a durable commit.
//!
//! Opening follows the local database ([`crate::LocalDb`]): a non-empty
//! file is first probed read-only (format marker, every table's root and
//! ends), so a refused file is left byte for byte as it was.

use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use persist_core::lww::wins;
use persist_core::protocol::{LogEntry, MAILBOX_ITEMS_MAX, MailboxItem};
use persist_core::{DeviceId, Locator, StoreId};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::blocking::run_blocking;
use super::page::Pager;
use super::precedence;
use super::schema::{
    ENVELOPE_BYTES_KEY, FORMAT_KEY, INDEX, LOG, MAILBOX_ITEMS, MAILBOXES, META, STORES, StoreKey,
    StoreRow,
};
use super::watchers::Watchers;
use super::{
    Appended, Incoming, MAILBOX_FETCH_BYTES_TARGET, MAILBOX_FETCH_ITEMS_MAX, PULL_BYTES_TARGET_MAX,
    PULL_ENTRIES_MAX, Page, RelayBackend, RelayError, RelayOpenError, RelayStats, StoreAccess,
    check_append, check_mailbox_payload, fingerprints_match,
};
use crate::contain::{Guarded, Panicked, contain};
use crate::db::{Checks, Format, probe};
use crate::error::{OpenError, StorageError};
use crate::schema::meta_u64;

/// The relay database format this build writes, and the newest it reads.
/// Stored in `relay_meta` under `"format"` as u32 LE.
pub const RELAY_FORMAT_VERSION: u32 = 1;

/// Upper bound of redb's page cache for the relay database. Memory is
/// taken only as pages are read, so this caps rather than reserves. A relay
/// serves many stores, and what it reads most is the recent tail of each
/// log: 1 GiB keeps the tails of thousands of active stores in memory on a
/// modest server.
pub const RELAY_CACHE_BYTES_MAX: usize = 1024 * 1024 * 1024;

/// The relay backend on a redb file. See the `relay` module docs for the
/// semantics, the schema and its invariants.
///
/// Dropping it closes the file; reopening the same path continues every
/// store's sequence numbers where they were.
#[derive(Debug)]
pub struct RedbRelay {
    db: Guarded<redb::Database>,
    path: Arc<Path>,
    watchers: Watchers,
    /// Per store, moved on by every rekey.
    access: Watchers,
}

impl RedbRelay {
    /// Opens the relay database at `path`, creating it if there is no file
    /// or the file is empty.
    ///
    /// A file written by a newer relay ([`RelayOpenError::NewerFormat`]), or
    /// one that is not a relay database or is damaged where the open looks
    /// ([`RelayOpenError::Corrupted`]), is refused and left unchanged. (A
    /// file left by a crash is first recovered by redb, which writes to it.)
    pub fn open(path: &Path) -> Result<RedbRelay, RelayOpenError> {
        let db = open_db(path)?;
        Ok(RedbRelay {
            db,
            path: Arc::from(path),
            watchers: Watchers::new(),
            access: Watchers::new(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` in a read transaction, off the runtime's hot path and
    /// with redb's panics contained.
    fn read<T>(
        &self,
        work: impl FnOnce(&redb::ReadTransaction) -> Result<T, Failure>,
    ) -> Result<T, RelayError> {
        run_blocking(|| {
            // Owned outside the contained work, so a panic there drops it
            // after the panic is caught.
            let txn = Guarded::new(contain::<_, Failure>(&self.path, || {
                Ok(self.db.begin_read()?)
            })?);
            contain(&self.path, || work(&txn))
        })
        .map_err(Failure::into_relay)
    }

    /// Runs `work` in the write transaction, then commits durably (redb's
    /// default `Durability::Immediate`) if it reports a change, and aborts
    /// otherwise or on any error.
    fn write<T>(
        &self,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<(T, Finish), Failure>,
    ) -> Result<T, RelayError> {
        run_blocking(|| {
            let txn = Guarded::new(contain::<_, Failure>(&self.path, || {
                Ok(self.db.begin_write()?)
            })?);
            // On an error `txn` is dropped here: an abort.
            let (value, finish) = contain(&self.path, || work(&txn))?;
            let txn = txn.into_inner();
            match finish {
                Finish::Commit => contain::<_, Failure>(&self.path, || Ok(txn.commit()?))?,
                Finish::Abort => contain::<_, Failure>(&self.path, || Ok(txn.abort()?))?,
            }
            Ok(value)
        })
        .map_err(Failure::into_relay)
    }

    fn head_now(&self, store: &StoreId) -> Result<u64, RelayError> {
        self.read(|txn| Ok(store_row(&txn.open_table(STORES)?, store)?.1))
    }

    fn append_now(&self, store: &StoreId, entries: &[Incoming]) -> Result<Appended, RelayError> {
        self.write(|txn| {
            let mut stores = txn.open_table(STORES)?;
            let (fingerprint, mut head) = store_row(&stores, store)?;
            let mut log = txn.open_table(LOG)?;
            let mut index = txn.open_table(INDEX)?;
            let (mut accepted, mut stale) = (0u32, 0u32);
            let (mut added_bytes, mut removed_bytes) = (0u64, 0u64);
            for entry in entries {
                let key = (store.0, entry.locator.0);
                let current = index.get(key)?.map(|guard| guard.value());
                if let Some((_, held)) = current
                    && !wins(entry.precedence, precedence::decode(&held))
                {
                    stale += 1;
                    continue;
                }
                let seq = next_seq(head)?;
                if let Some((old_seq, _)) = current {
                    let old = log.remove((store.0, old_seq))?.ok_or_else(|| {
                        StorageError::corrupted(format!(
                            "the index of store {store} names log entry {old_seq}, which is missing"
                        ))
                    })?;
                    removed_bytes += old.value().1.len() as u64;
                }
                log.insert((store.0, seq), (entry.locator.0, entry.envelope.as_slice()))?;
                index.insert(key, (seq, precedence::encode(entry.precedence)))?;
                added_bytes += entry.envelope.len() as u64;
                head = seq;
                accepted += 1;
            }
            let appended = Appended {
                accepted,
                stale,
                head,
            };
            if accepted == 0 {
                return Ok((appended, Finish::Abort));
            }
            stores.insert(store.0, (fingerprint, head))?;
            let mut meta = txn.open_table(META)?;
            let bytes = (meta_u64(&meta, ENVELOPE_BYTES_KEY)? + added_bytes)
                .checked_sub(removed_bytes)
                .ok_or_else(|| StorageError::corrupted("the envelope byte counter is too low"))?;
            meta.insert(ENVELOPE_BYTES_KEY, bytes.to_le_bytes().as_slice())?;
            Ok((appended, Finish::Commit))
        })
    }
}

impl RelayBackend for RedbRelay {
    async fn open_store(
        &self,
        store: &StoreId,
        access_fingerprint: &[u8; 32],
        may_create: bool,
    ) -> Result<StoreAccess, RelayError> {
        let admit = |row: Option<StoreRow>| match row {
            Some((stored, head)) if fingerprints_match(&stored, access_fingerprint) => {
                Ok(Some(StoreAccess {
                    created: false,
                    head,
                }))
            }
            Some(_) => Err(RelayError::Unauthorized),
            None if may_create => Ok(None),
            None => Err(RelayError::AdmissionRequired),
        };
        // Most opens find the store: a read, which waits for no writer.
        let found =
            self.read(|txn| Ok(txn.open_table(STORES)?.get(store.0)?.map(|g| g.value())))?;
        if let Some(access) = admit(found)? {
            return Ok(access);
        }
        self.write(|txn| {
            let mut stores = txn.open_table(STORES)?;
            // Created by someone else since the read?
            let found = stores.get(store.0)?.map(|g| g.value());
            if let Some(access) = admit(found)? {
                return Ok((access, Finish::Abort));
            }
            stores.insert(store.0, (*access_fingerprint, 0))?;
            let access = StoreAccess {
                created: true,
                head: 0,
            };
            Ok((access, Finish::Commit))
        })
    }

    async fn append(
        &self,
        store: &StoreId,
        entries: Vec<Incoming>,
    ) -> Result<Appended, RelayError> {
        check_append(&entries)?;
        let appended = self.append_now(store, &entries)?;
        if appended.accepted > 0 {
            self.watchers.publish(store, appended.head);
        }
        Ok(appended)
    }

    async fn pull(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> Result<Page, RelayError> {
        let mut pager = Pager::new(
            limit.min(PULL_ENTRIES_MAX),
            bytes_target.min(PULL_BYTES_TARGET_MAX),
        );
        self.read(|txn| {
            store_row(&txn.open_table(STORES)?, store)?;
            let log = txn.open_table(LOG)?;
            let range = (
                Bound::Excluded((store.0, since)),
                Bound::Included((store.0, u64::MAX)),
            );
            let mut entries = Vec::new();
            let mut more = false;
            for item in log.range(range)? {
                let (key, value) = item?;
                let (locator, envelope) = value.value();
                if !pager.admit(envelope.len()) {
                    more = true;
                    break;
                }
                entries.push(LogEntry {
                    seq: key.value().1,
                    locator: Locator(locator),
                    envelope: envelope.to_vec(),
                });
            }
            let cursor = entries.last().map_or(since, |entry| entry.seq);
            Ok(Page {
                entries,
                cursor,
                more,
            })
        })
    }

    async fn head(&self, store: &StoreId) -> Result<u64, RelayError> {
        self.head_now(store)
    }

    fn watch(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        // Start at 0 if the head cannot be read: see the trait docs.
        self.watchers
            .subscribe(store, || self.head_now(store).unwrap_or(0))
    }

    async fn mailbox_put(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        payload: Vec<u8>,
    ) -> Result<u64, RelayError> {
        check_mailbox_payload(&payload)?;
        self.write(|txn| {
            store_row(&txn.open_table(STORES)?, store)?;
            let mut mailboxes = txn.open_table(MAILBOXES)?;
            let key = (store.0, mailbox.0);
            let (last, held) = mailboxes.get(key)?.map_or((0, 0), |g| g.value());
            if held >= MAILBOX_ITEMS_MAX as u64 {
                return Err(RelayError::MailboxFull {
                    max: MAILBOX_ITEMS_MAX,
                }
                .into());
            }
            let seq = next_seq(last)?;
            txn.open_table(MAILBOX_ITEMS)?
                .insert((store.0, mailbox.0, seq), payload.as_slice())?;
            mailboxes.insert(key, (seq, held + 1))?;
            Ok((seq, Finish::Commit))
        })
    }

    async fn mailbox_fetch(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<MailboxItem>, RelayError> {
        let mut pager = Pager::new(
            limit.min(MAILBOX_FETCH_ITEMS_MAX),
            MAILBOX_FETCH_BYTES_TARGET,
        );
        self.read(|txn| {
            store_row(&txn.open_table(STORES)?, store)?;
            let items = txn.open_table(MAILBOX_ITEMS)?;
            let range = (
                Bound::Excluded((store.0, mailbox.0, since)),
                Bound::Included((store.0, mailbox.0, u64::MAX)),
            );
            let mut fetched = Vec::new();
            for item in items.range(range)? {
                let (key, payload) = item?;
                if !pager.admit(payload.value().len()) {
                    break;
                }
                fetched.push(MailboxItem {
                    seq: key.value().2,
                    payload: payload.value().to_vec(),
                });
            }
            Ok(fetched)
        })
    }

    async fn mailbox_ack(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        upto: u64,
    ) -> Result<(), RelayError> {
        self.write(|txn| {
            store_row(&txn.open_table(STORES)?, store)?;
            let mut mailboxes = txn.open_table(MAILBOXES)?;
            let key = (store.0, mailbox.0);
            let Some((last, held)) = mailboxes.get(key)?.map(|g| g.value()) else {
                return Ok(((), Finish::Abort));
            };
            let mut removed = 0u64;
            txn.open_table(MAILBOX_ITEMS)?.retain_in(
                (store.0, mailbox.0, 0)..=(store.0, mailbox.0, upto),
                |_, _| {
                    removed += 1;
                    false
                },
            )?;
            if removed == 0 {
                return Ok(((), Finish::Abort));
            }
            let held = held.checked_sub(removed).ok_or_else(|| {
                StorageError::corrupted(format!(
                    "mailbox {mailbox} of store {store} counts {held} items but held {removed}"
                ))
            })?;
            // The row stays when empty: its last seq keeps numbers from
            // being reused.
            mailboxes.insert(key, (last, held))?;
            Ok(((), Finish::Commit))
        })
    }

    async fn stats(&self) -> Result<RelayStats, RelayError> {
        self.read(|txn| {
            Ok(RelayStats {
                stores: txn.open_table(STORES)?.len()?,
                entries: txn.open_table(LOG)?.len()?,
                envelope_bytes: meta_u64(&txn.open_table(META)?, ENVELOPE_BYTES_KEY)?,
            })
        })
    }

    async fn rekey(
        &self,
        store: &StoreId,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> Result<(), RelayError> {
        // One write transaction: redb has one writer at a time, so the
        // compare and the swap see no other change in between.
        self.write(|txn| {
            let mut stores = txn.open_table(STORES)?;
            let (stored, head) = store_row(&stores, store)?;
            if !fingerprints_match(&stored, old) {
                return Err(RelayError::Unauthorized.into());
            }
            stores.insert(store.0, (*new, head))?;
            Ok(((), Finish::Commit))
        })?;
        self.access.bump(store);
        Ok(())
    }

    fn access_changes(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.access.subscribe(store, || 0)
    }
}

/// How a write transaction ends: a durable commit, or an abort when it
/// changed nothing.
enum Finish {
    Commit,
    Abort,
}

/// `(access fingerprint, head)` of `store`, or [`RelayError::UnknownStore`].
fn store_row(
    stores: &impl ReadableTable<StoreKey, StoreRow>,
    store: &StoreId,
) -> Result<StoreRow, Failure> {
    match stores.get(store.0)? {
        Some(row) => Ok(row.value()),
        None => Err(RelayError::UnknownStore.into()),
    }
}

/// The sequence number after `last`. 2^64 appends cannot happen, but a
/// damaged counter could claim them: refuse rather than wrap.
fn next_seq(last: u64) -> Result<u64, Failure> {
    last.checked_add(1)
        .ok_or_else(|| StorageError::corrupted("a sequence counter is at its maximum").into())
}

/// Why an operation on the redb file failed: a refusal the caller is meant
/// to see, or a storage failure, which becomes [`RelayError::Unavailable`].
#[derive(Debug)]
enum Failure {
    Refused(RelayError),
    Storage(StorageError),
}

impl Failure {
    fn into_relay(self) -> RelayError {
        match self {
            Failure::Refused(err) => err,
            Failure::Storage(err) => RelayError::from_storage(err),
        }
    }
}

impl From<RelayError> for Failure {
    fn from(err: RelayError) -> Self {
        Failure::Refused(err)
    }
}

impl From<Panicked> for Failure {
    fn from(panicked: Panicked) -> Self {
        Failure::Storage(panicked.into())
    }
}

/// redb's errors reach [`Failure`] through this crate's one mapping of them.
macro_rules! storage_failure_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(err: $t) -> Self {
                Failure::Storage(err.into())
            }
        }
    )*};
}
storage_failure_from!(
    StorageError,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

/// Opens (creating or probing) the database and checks its format.
fn open_db(path: &Path) -> Result<Guarded<redb::Database>, OpenError> {
    let fresh = match std::fs::metadata(path) {
        Ok(meta) => meta.len() == 0,
        Err(err) if err.kind() == io::ErrorKind::NotFound => true,
        Err(source) => {
            return Err(OpenError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let builder = builder();
    if !fresh {
        contain(path, || probe(path, builder.open_read_only(path), &RELAY))?;
    }
    let db = contain(path, || {
        builder
            .create(path)
            .map_err(|err| OpenError::from_redb(path.to_owned(), err))
    })?;
    // Owned out here, so that a panic below is caught before the database
    // is dropped (see `LocalDb::open`).
    let db = Guarded::new(db);
    contain(path, || {
        let storage_err = |err: StorageError| OpenError::from_storage(path.to_owned(), err);
        let read = db.begin_read().map_err(|err| storage_err(err.into()))?;
        match check_format(path, &read)? {
            Format::Uninitialized => {
                drop(read);
                initialize(&db).map_err(storage_err)
            }
            Format::Current => check_structure(&read).map_err(storage_err),
        }
    })?;
    Ok(db)
}

/// The relay database's checks, for [`probe`].
const RELAY: Checks = Checks {
    format: check_format,
    structure: check_structure,
};

fn builder() -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(RELAY_CACHE_BYTES_MAX);
    builder
}

fn check_format(path: &Path, read: &redb::ReadTransaction) -> Result<Format, OpenError> {
    let corrupted = |detail: String| OpenError::Corrupted {
        path: path.to_owned(),
        detail,
    };
    let storage_err = |err: StorageError| OpenError::from_storage(path.to_owned(), err);
    let no_tables = read
        .list_tables()
        .map_err(|err| storage_err(err.into()))?
        .next()
        .is_none();
    if no_tables {
        return Ok(Format::Uninitialized);
    }
    let meta = match read.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Err(corrupted(
                "it has no relay_meta table; a device's local store is not a relay database".into(),
            ));
        }
        Err(err) => return Err(storage_err(err.into())),
    };
    let format = meta
        .get(FORMAT_KEY)
        .map_err(|err| storage_err(err.into()))?
        .ok_or_else(|| corrupted("it has no format marker".into()))?;
    let format: [u8; 4] = format
        .value()
        .try_into()
        .map_err(|_| corrupted(format!("format marker of {} bytes", format.value().len())))?;
    match u32::from_le_bytes(format) {
        RELAY_FORMAT_VERSION => Ok(Format::Current),
        found if found > RELAY_FORMAT_VERSION => Err(OpenError::NewerFormat {
            path: path.to_owned(),
            found,
            supported: RELAY_FORMAT_VERSION,
        }),
        found => Err(corrupted(format!("unknown relay format {found}"))),
    }
}

/// Opens every table with its types, so a file whose tables differ fails at
/// open rather than at the first write, and reads each one's first and last
/// entry: O(tables × tree depth), whatever the size of the database.
fn check_structure(read: &redb::ReadTransaction) -> Result<(), StorageError> {
    fn ends<K: redb::Key + 'static, V: redb::Value + 'static>(
        table: &impl ReadableTable<K, V>,
    ) -> Result<(), StorageError> {
        table.len()?;
        table.first()?;
        table.last()?;
        Ok(())
    }
    ends(&read.open_table(STORES)?)?;
    ends(&read.open_table(LOG)?)?;
    ends(&read.open_table(INDEX)?)?;
    ends(&read.open_table(MAILBOXES)?)?;
    ends(&read.open_table(MAILBOX_ITEMS)?)?;
    let meta = read.open_table(META)?;
    ends(&meta)?;
    meta_u64(&meta, ENVELOPE_BYTES_KEY)?;
    Ok(())
}

/// Writes relay format 1 into a database with no tables, in one commit.
fn initialize(db: &redb::Database) -> Result<(), StorageError> {
    let txn = db.begin_write()?;
    txn.open_table(STORES)?;
    txn.open_table(LOG)?;
    txn.open_table(INDEX)?;
    txn.open_table(MAILBOXES)?;
    txn.open_table(MAILBOX_ITEMS)?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(FORMAT_KEY, RELAY_FORMAT_VERSION.to_le_bytes().as_slice())?;
        meta.insert(ENVELOPE_BYTES_KEY, 0u64.to_le_bytes().as_slice())?;
    }
    txn.commit()?;
    Ok(())
}
