//! Persist's local database: the redb schema under one store.
//!
//! This crate stores envelopes it cannot read: it never decrypts. It keeps
//! one row per record locator, a gap-free local change log that sync pushes
//! from, per-epoch row counts that tell rotation when an epoch is retired,
//! and a `meta` table for the engine's own state (sealed keyring, HLC
//! high-water mark, store id, cursors).
//!
//! [`LocalDb`] opens (or creates) a database on a file or on an injected
//! [`Backend`]; [`ReadTxn`] reads a snapshot; [`WriteTxn`] is the single
//! writer, durable on commit. No redb type appears in this API.
//!
//! ```
//! use persist_core::{Epoch, Locator};
//! use persist_storage::{LocalDb, Row};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let db = LocalDb::open(&dir.path().join("store.redb"), None)?;
//!
//! let mut txn = db.begin_write()?;
//! let row = Row { epoch: Epoch::FIRST, tombstone: false, envelope: b"sealed".to_vec() };
//! let seq = txn.put_record(&Locator([7; 32]), &row)?;
//! txn.commit()?;
//!
//! let read = db.begin_read()?;
//! assert_eq!(read.record(&Locator([7; 32]))?, Some(row));
//! assert_eq!(read.changes_since(0, 10)?, vec![(seq, Locator([7; 32]))]);
//! assert_eq!(read.live_count()?, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # On-disk format, version 1
//!
//! A redb 4 database with four tables, and a fifth made on first use:
//!
//! | table | key | value |
//! |---|---|---|
//! | `records` | locator `[u8; 32]` | row, see below |
//! | `changes` | local change sequence `u64` | locator `[u8; 32]` |
//! | `epoch_counts` | epoch `u32` | number of rows sealed under it, `u64` |
//! | `meta` | `&str` | `&[u8]` |
//! | `held` | locator ‖ SHA-256(envelope) `[u8; 64]` | `[verified u8]` ‖ an envelope sync could not apply yet ([`Held`]) |
//!
//! A row is `[row_version u8 = 1][flags u8][epoch u32 LE][crc32c u32 LE][envelope]`,
//! flags bit 0 marking a tombstone, the CRC-32C taken over the first six bytes
//! and the envelope. The envelope is authenticated by the crypto layer too,
//! but the CRC is what makes a local read of a damaged row fail
//! ([`StorageError::CorruptRow`]) before anything acts on it.
//!
//! `meta` keys kept by this crate: `"format"` ([`FORMAT_VERSION`], u32 LE),
//! `"\0live_rows"` and `"\0last_change_seq"` (u64 LE). Every other key
//! belongs to the engine; keys starting with `'\0'` are reserved.
//!
//! ## Invariants
//!
//! Each holds after every commit:
//!
//! 1. `meta["format"]` exists from the first commit on and is never
//!    rewritten by this build. A database whose format is above
//!    [`FORMAT_VERSION`] is refused, and left byte-for-byte as it was.
//! 2. Every row verifies: its version is 1, no unknown flag is set, its CRC
//!    matches, and its envelope is at most [`ENVELOPE_BYTES_MAX`] bytes.
//! 3. `changes` holds the keys `1..=last_change_seq` without gaps (until a
//!    future compaction drops a prefix), and `"\0last_change_seq"` never
//!    decreases, so a sequence number is never reused. Each put and each
//!    removal of an existing row appends exactly one entry, in the order
//!    they happened, naming the locator written.
//! 4. For every epoch `e`, `epoch_counts[e]` equals the number of rows with
//!    epoch `e`, tombstones included; an epoch with no row has no entry.
//! 5. `"\0live_rows"` equals the number of rows that are not tombstones.
//!
//! Counters and the change log are written in the same transaction as the
//! rows they describe, so a crash cannot separate them. A write that
//! replaces a damaged row heals it, and recounts every row rather than trust
//! the damaged header.
//!
//! # Limits
//!
//! redb checks page checksums when it recovers from a crash, not on every
//! open. A file changed by something other than redb after a clean shutdown:
//!
//! - Garbage, foreign and truncated files are refused at open, and so is
//!   damage to the root of any table or to the pages down to its first and
//!   last entry (a read-only check of a few pages per table). A refused file
//!   is left byte for byte as it was.
//! - Damage deeper in a large table is not looked for at open (that would
//!   read the whole file on every open). A changed byte in a row fails that
//!   row's read ([`StorageError::CorruptRow`]); a damaged B-tree page can make
//!   redb panic, which this crate catches: the operation fails with
//!   [`StorageError::Damaged`] naming the file, and a write transaction that
//!   met it refuses to commit. No operation of this API panics on a damaged
//!   file. [`LocalDb::check_integrity`] verifies every page, on request.
//! - The panic hook is global and left to the application, so redb's panic
//!   message may still be printed to stderr (by the default hook) while the
//!   caller gets the typed error. Containment needs `panic = "unwind"`.
//! - In debug builds redb walks every page of the trees on a writable open,
//!   so more damage is refused at open there than in release builds.

mod backend;
mod contain;
mod db;
mod error;
pub mod relay;
mod row;
mod schema;
mod txn;

pub use backend::{Backend, MemoryBackend};
pub use db::{CACHE_BYTES_MAX, FORMAT_VERSION, LocalDb};
pub use error::{Error, OpenError, StorageError};
pub use row::Row;
pub use txn::{ENVELOPE_BYTES_MAX, Held, Parked, ReadTxn, RecordsMut, WriteTxn};
