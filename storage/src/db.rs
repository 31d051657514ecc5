//! Opening the local database: creation, format check, and the probe that
//! leaves a file it refuses untouched.
//!
//! # Opening a damaged file
//!
//! An existing file is first opened read-only, which never writes, and
//! checked there: its format marker, and a cheap structural check that reads
//! the root of every table and the pages down to its first and last entry
//! (a few pages per table, whatever the size of the store). A file that
//! fails, or on which redb panics, is refused with [`OpenError::Corrupted`]
//! and left byte for byte as it was. Only then is it opened for writing (in
//! debug builds redb walks every page there, and a panic is again refused
//! before anything is written).
//!
//! Damage deeper in a large tree is not looked for at open: that would read
//! the whole file every time. It surfaces at the read or write that meets
//! it, as a typed error ([`StorageError::CorruptRow`] for a row,
//! [`StorageError::Damaged`] where redb fails), and
//! [`LocalDb::check_integrity`] verifies every page on request.

use std::io;
use std::path::Path;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable};

use crate::backend::{Backend, RedbBackend};
use crate::contain::{Guarded, contain};
use crate::error::{OpenError, StorageError};
use crate::schema::{
    CHANGES, EPOCH_COUNTS, FORMAT_KEY, LAST_CHANGE_SEQ_KEY, LIVE_ROWS_KEY, META, RECORDS,
};
use crate::txn::{ReadTxn, WriteTxn};

/// The database format this build writes, and the newest it reads. Stored
/// in `meta` under `"format"` as u32 LE.
pub const FORMAT_VERSION: u32 = 1;

/// Upper bound of redb's page cache. Memory is taken only as pages are read,
/// so this caps rather than reserves. 256 MiB holds the working set of a
/// store of a few hundred thousand 1 KiB records, which is what an
/// interactive app touches, while staying modest on a phone.
pub const CACHE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// The local database of one store.
///
/// Any number of [`ReadTxn`]s may run at once, and alongside one [`WriteTxn`];
/// a second `begin_write` waits for the first transaction to end.
///
/// No operation panics on a damaged file: where redb would, the operation
/// fails with [`StorageError::Damaged`] (see the crate docs, "Limits").
#[derive(Debug)]
pub struct LocalDb {
    db: Guarded<redb::Database>,
    /// Shared with every transaction, to name the file in their errors.
    path: Arc<Path>,
}

impl LocalDb {
    /// Opens the database at `path`, creating it (format marker and every
    /// table) if there is none yet or the file is empty.
    ///
    /// If `backend` is `Some`, it holds the bytes and `path` only names the
    /// database in messages. A file written by a newer Persist, or one that
    /// is not a Persist database, is refused without being changed: see the
    /// module docs for what is checked. (A file left by a crash is first
    /// recovered by redb, which writes to it.)
    pub fn open(path: &Path, backend: Option<Box<dyn Backend>>) -> Result<LocalDb, OpenError> {
        match backend {
            Some(backend) => Self::open_backend(path, Arc::from(backend)),
            None => Self::open_file(path, true),
        }
    }

    /// Opens the database at `path`, failing with [`OpenError::Missing`] if
    /// there is none (no file, or an empty one). For read-only commands.
    pub fn open_existing(path: &Path) -> Result<LocalDb, OpenError> {
        Self::open_file(path, false)
    }

    /// Where the database lives (for a backend, the name it was opened with).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a read transaction: a snapshot of the last commit.
    pub fn begin_read(&self) -> Result<ReadTxn, StorageError> {
        let txn = contain(&self.path, || {
            self.db.begin_read().map_err(StorageError::from)
        })?;
        Ok(ReadTxn::new(txn, self.path.clone()))
    }

    /// Starts the write transaction, waiting for the current one to end.
    pub fn begin_write(&self) -> Result<WriteTxn, StorageError> {
        let txn = contain(&self.path, || {
            self.db.begin_write().map_err(StorageError::from)
        })?;
        WriteTxn::new(txn, self.path.clone())
    }

    /// Closes the database, reporting what dropping it would ignore.
    pub fn close(self) -> Result<(), StorageError> {
        let db = self.db.into_inner();
        contain(&self.path, || db.close().map_err(StorageError::from))
    }

    /// Verifies the checksum of every page of the database, in O(size of the
    /// file): for a `verify` command, not for every open. No transaction of
    /// this database may be open ([`StorageError::Internal`] otherwise).
    ///
    /// `Ok(true)`: the file is intact. `Ok(false)`: redb found damage and
    /// repaired it, writing to the file; the repair rebuilds redb's own
    /// bookkeeping, and if the last commit is damaged it falls back to the
    /// one before, so that commit is lost. A file it cannot repair is
    /// [`StorageError::Corrupted`] (or [`StorageError::Damaged`]), and the
    /// handle then refuses writes until the database is reopened.
    pub fn check_integrity(&mut self) -> Result<bool, StorageError> {
        contain(&self.path, || {
            self.db.check_integrity().map_err(StorageError::from)
        })
    }

    fn open_file(path: &Path, create: bool) -> Result<LocalDb, OpenError> {
        let io_err = |source| OpenError::Io {
            path: path.to_owned(),
            source,
        };
        let fresh = match std::fs::metadata(path) {
            Ok(meta) => meta.len() == 0,
            Err(err) if err.kind() == io::ErrorKind::NotFound => true,
            Err(err) => return Err(io_err(err)),
        };
        if fresh && !create {
            return Err(OpenError::Missing {
                path: path.to_owned(),
            });
        }
        let builder = builder();
        if !fresh {
            contain(path, || probe(path, builder.open_read_only(path), &LOCAL))?;
        }
        let db = contain(path, || {
            let db = if create {
                builder.create(path)
            } else {
                builder.open(path)
            };
            db.map_err(|err| OpenError::from_redb(path.to_owned(), err))
        })?;
        Self::finish(path, db)
    }

    fn open_backend(path: &Path, backend: Arc<dyn Backend>) -> Result<LocalDb, OpenError> {
        let fresh = backend.len().map_err(|source| OpenError::Io {
            path: path.to_owned(),
            source,
        })? == 0;
        let builder = builder();
        if !fresh {
            contain(path, || {
                probe(
                    path,
                    builder.open_read_only_with_backend(RedbBackend(backend.clone())),
                    &LOCAL,
                )
            })?;
        }
        let db = contain(path, || {
            builder
                .create_with_backend(RedbBackend(backend))
                .map_err(|err| OpenError::from_redb(path.to_owned(), err))
        })?;
        Self::finish(path, db)
    }

    /// Checks the format of an opened database, initializing it if it was
    /// never initialized.
    fn finish(path: &Path, db: redb::Database) -> Result<LocalDb, OpenError> {
        // Owned out here, so that a panic below is caught before the
        // database is dropped: dropped cleanly, it records a clean shutdown,
        // leaving a refused file as it was.
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
        Ok(LocalDb {
            db,
            path: Arc::from(path),
        })
    }
}

fn builder() -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(CACHE_BYTES_MAX);
    builder
}

/// The format and structure checks of one kind of database file: the
/// local store's (here) or the relay's.
pub(crate) struct Checks {
    /// Reads the format marker.
    pub(crate) format: fn(&Path, &redb::ReadTransaction) -> Result<Format, OpenError>,
    /// Reads the ends of every table of a current-format file.
    pub(crate) structure: fn(&redb::ReadTransaction) -> Result<(), StorageError>,
}

/// The local store's checks.
const LOCAL: Checks = Checks {
    format: check_format,
    structure: check_structure,
};

/// Checks the format and structure through a read-only open, which never
/// writes, so that a database this build refuses is left exactly as it was.
pub(crate) fn probe(
    path: &Path,
    opened: Result<redb::ReadOnlyDatabase, redb::DatabaseError>,
    checks: &Checks,
) -> Result<(), OpenError> {
    match opened {
        Ok(db) => {
            let read = db
                .begin_read()
                .map_err(|err| OpenError::from_storage(path.to_owned(), err.into()))?;
            match (checks.format)(path, &read)? {
                Format::Uninitialized => Ok(()),
                Format::Current => (checks.structure)(&read)
                    .map_err(|err| OpenError::from_storage(path.to_owned(), err)),
            }
        }
        // A crash left the file needing recovery, which only a writable open
        // runs; the format is checked after it.
        Err(redb::DatabaseError::RepairAborted) => Ok(()),
        Err(err) => Err(OpenError::from_redb(path.to_owned(), err)),
    }
}

/// What a format marker said.
pub(crate) enum Format {
    /// No table at all: created, but the initializing commit never landed.
    Uninitialized,
    /// This build's format version.
    Current,
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
            return Err(corrupted("it has no meta table".into()));
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
        FORMAT_VERSION => Ok(Format::Current),
        found if found > FORMAT_VERSION => Err(OpenError::NewerFormat {
            path: path.to_owned(),
            found,
            supported: FORMAT_VERSION,
        }),
        found => Err(corrupted(format!("unknown format {found}"))),
    }
}

/// Opens every table with its types, so a file whose tables differ fails at
/// open rather than at the first write, and reads each one's first and last
/// entry: the root page and the pages down to both ends, so a damaged root
/// (all of a small table) is refused at open. O(tables × tree depth).
fn check_structure(read: &redb::ReadTransaction) -> Result<(), StorageError> {
    fn ends<K: redb::Key + 'static, V: redb::Value + 'static>(
        table: &impl ReadableTable<K, V>,
    ) -> Result<(), StorageError> {
        table.len()?;
        table.first()?;
        table.last()?;
        Ok(())
    }
    ends(&read.open_table(RECORDS)?)?;
    ends(&read.open_table(CHANGES)?)?;
    ends(&read.open_table(EPOCH_COUNTS)?)?;
    let meta = read.open_table(META)?;
    ends(&meta)?;
    crate::schema::meta_u64(&meta, LIVE_ROWS_KEY)?;
    crate::schema::meta_u64(&meta, LAST_CHANGE_SEQ_KEY)?;
    Ok(())
}

/// Writes format v1 into a database with no tables, in one commit.
fn initialize(db: &redb::Database) -> Result<(), StorageError> {
    let txn = db.begin_write()?;
    txn.open_table(RECORDS)?;
    txn.open_table(CHANGES)?;
    txn.open_table(EPOCH_COUNTS)?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(FORMAT_KEY, FORMAT_VERSION.to_le_bytes().as_slice())?;
        meta.insert(LIVE_ROWS_KEY, 0u64.to_le_bytes().as_slice())?;
        meta.insert(LAST_CHANGE_SEQ_KEY, 0u64.to_le_bytes().as_slice())?;
    }
    txn.commit()?;
    Ok(())
}
