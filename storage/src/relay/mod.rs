//! The relay's storage: per store, a log of envelopes it cannot read, and
//! per device, a mailbox of opaque items.
//!
//! A relay node keeps, for every store it serves, a log with its own
//! sequence numbers and, per record locator, only the envelope of highest
//! precedence ([`persist_core::lww`]); clients pull the log since a cursor
//! and are told when it grows. It never decrypts: an envelope is opaque
//! bytes, and its precedence (read by the relay from the clear header)
//! comes in with it ([`Incoming`]).
//!
//! [`RelayBackend`] is the one interface a relay session talks to. Its
//! implementations live here: [`RedbRelay`], file-backed and durable (the
//! default relay database), [`MemoryRelay`], for tests and simulations, and
//! `PostgresRelay` (cargo feature `postgres`), for several relay nodes over
//! one PostgreSQL database. Every backend must pass the same conformance
//! suite (`conformance` module, behind the `conformance` cargo feature).
//!
//! # Operations
//!
//! - [`RelayBackend::open_store`]: an existing store admits a client whose
//!   access fingerprint (SHA-256 of its credential) matches the stored one,
//!   compared in constant time; a mismatch is [`RelayError::Unauthorized`]
//!   and says nothing else. An absent store is created (head 0) if the
//!   caller allows it, and is otherwise [`RelayError::AdmissionRequired`].
//! - [`RelayBackend::rekey`]: compare-and-swap of a store's access
//!   fingerprint, durable before it returns: it replaces the fingerprint
//!   only if the stored one is the caller's `old` (compared in constant
//!   time), else [`RelayError::Unauthorized`] and nothing changes. The log,
//!   head and mailboxes stay as they were. After the commit the store's
//!   [`RelayBackend::access_changes`] channel moves on, on this node and
//!   (PostgreSQL) on every node sharing the database.
//! - [`RelayBackend::append`]: one durable transaction per call. Entries are
//!   taken in order; one whose locator already holds an entry of equal or
//!   higher precedence is counted stale, any other gets the next sequence
//!   number and replaces the locator's previous entry in the log. Later
//!   entries of the same call see earlier ones. After the commit, the new
//!   head is published to the store's [`RelayBackend::watch`] channel.
//! - [`RelayBackend::pull`]: entries after a cursor, in sequence order. A
//!   page holds at most `limit` entries (capped at [`PULL_ENTRIES_MAX`]) and
//!   stops before the entry that would take its envelope bytes over
//!   `bytes_target` (capped at [`PULL_BYTES_TARGET_MAX`]), except that a
//!   page always holds the first entry there is, however large.
//! - Mailboxes, keyed by (store, mailbox device id): a put gets the
//!   mailbox's next sequence number and is refused with
//!   [`RelayError::MailboxFull`] once [`MAILBOX_ITEMS_MAX`] items wait;
//!   fetch returns items after a cursor; ack deletes items up to a sequence
//!   number. Sequence numbers of a mailbox are never reused, even once it
//!   is empty.
//! - [`RelayBackend::stats`]: counts of stores, live log entries and their
//!   envelope bytes, in O(1).
//!
//! Every per-store operation refuses a store that does not exist with
//! [`RelayError::UnknownStore`], which a session answers as
//! [`ErrorCode::Unauthorized`]: to a client, a store it may not see and one
//! that is not there look the same. (A session always opens the store
//! first, so it only meets this if the store vanished.)
//!
//! Storage failures are [`RelayError::Unavailable`]: retryable, never a
//! panic, and nothing of the failed call is applied.
//!
//! # Invariants
//!
//! For every store, after every call:
//!
//! 1. Each locator has at most one log entry, and it is the one of highest
//!    precedence ever accepted for that locator: an accepted entry is never
//!    lost except by being superseded by a higher one.
//! 2. Sequence numbers are assigned `head + 1, head + 2, ...` without gaps
//!    at assignment, never reused, and `head` never decreases (across
//!    restarts of a durable backend too). The log itself has gaps where
//!    entries were superseded.
//! 3. The entry at `head` (if `head > 0`) is in the log: only a higher
//!    sequence number can supersede it. So entries remain after a cursor
//!    exactly when the cursor is below `head`.
//! 4. A published head is at least every head published before for that
//!    store: a watcher sees heads only grow.
//! 5. A mailbox holds at most [`MAILBOX_ITEMS_MAX`] items, each at most
//!    [`MAILBOX_ITEM_BYTES_MAX`] bytes; its sequence numbers only grow.
//! 6. `stats` equals the sum over stores of live entries and their bytes.
//! 7. A store has exactly one access fingerprint at a time: of two
//!    [`RelayBackend::rekey`] calls from the same `old`, at most one
//!    succeeds.
//!
//! # The redb relay database, format 1
//!
//! [`RedbRelay`] keeps one redb 4 file with these tables (store ids,
//! locators and mailbox ids as their raw bytes):
//!
//! | table | key | value |
//! |---|---|---|
//! | `relay_meta` | `&str` | `&[u8]` |
//! | `relay_stores` | store id `[u8; 16]` | (access fingerprint `[u8; 32]`, head `u64`) |
//! | `relay_log` | (store id, seq `u64`) | (locator `[u8; 32]`, envelope `&[u8]`) |
//! | `relay_index` | (store id, locator) | (seq `u64`, precedence `[u8; 30]`) |
//! | `relay_mailboxes` | (store id, mailbox `[u8; 16]`) | (last seq `u64`, items held `u64`) |
//! | `relay_mailbox_items` | (store id, mailbox, seq `u64`) | payload `&[u8]` |
//!
//! `relay_meta` holds `"format"` ([`RELAY_FORMAT_VERSION`], u32 LE) and
//! `"envelope_bytes"` (u64 LE). A precedence is stored as HLC ms (u64 BE),
//! HLC counter (u16 BE), origin device (16 bytes), epoch (u32 BE), so its
//! bytes sort like [`Precedence`]. Tuple keys sort field by field, so one
//! store's log is one contiguous range in seq order, and so is a mailbox.
//!
//! Besides the invariants above, after every commit:
//!
//! - `relay_index` and `relay_log` are in bijection within a store: the
//!   index entry `(s, l) → (q, p)` exists exactly when the log entry
//!   `(s, q) → (l, _)` does.
//! - `relay_stores[s].head` is at least every seq of store `s` in the log
//!   and in the index.
//! - `relay_mailboxes[(s, m)]` counts the items of `(s, m)` and is at least
//!   each of their seqs; the row stays when the mailbox empties, so seqs are
//!   never reused.
//! - `"envelope_bytes"` is the sum of the envelope lengths in `relay_log`;
//!   `stats` reads it and the tables' lengths (which redb keeps), in O(1).
//!
//! The table names all start with `relay_`, so a device's local database
//! is refused as foreign rather than misread. A file whose format is above
//! [`RELAY_FORMAT_VERSION`] is refused ([`RelayOpenError::NewerFormat`]) and
//! left byte for byte as it was, as is a garbled, truncated or foreign file
//! ([`RelayOpenError::Corrupted`]); redb's panics on a damaged file are
//! caught as the local database catches them (see the crate docs, "Limits"),
//! so a damaged page deeper in the file fails the operation that meets it
//! with [`RelayError::Unavailable`].
//!
//! # Limits
//!
//! - A store is never deleted, and a mailbox's row (two counters) outlives
//!   its items: both grow with the stores and mailboxes ever used.
//! - [`MemoryRelay`] keeps everything in memory and loses it on drop.

mod blocking;
#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod memory;
mod page;
#[cfg(feature = "postgres")]
mod postgres;
mod precedence;
mod redb_relay;
mod schema;
mod watchers;

use std::future::Future;

use persist_core::envelope::ENVELOPE_BYTES_MAX;
use persist_core::lww::Precedence;
use persist_core::protocol::{
    ENTRIES_PER_MESSAGE_MAX, FRAME_BYTES_MAX, LogEntry, MAILBOX_ITEM_BYTES_MAX, MAILBOX_ITEMS_MAX,
    MESSAGE_PAYLOAD_BYTES_TARGET, MailboxItem,
};
use persist_core::{DeviceId, Locator, StoreId};

pub use error::{RelayError, RelayOpenError};
pub use memory::MemoryRelay;
#[cfg(feature = "postgres")]
pub use postgres::{
    POOL_CONNECTIONS_MAX, POSTGRES_DEFAULT_SCHEMA, POSTGRES_SCHEMA_NAME_BYTES_MAX,
    POSTGRES_SCHEMA_VERSION, PostgresOpenError, PostgresRelay,
};
pub use redb_relay::{RELAY_CACHE_BYTES_MAX, RELAY_FORMAT_VERSION, RedbRelay};

#[cfg(doc)]
use persist_core::protocol::ErrorCode;

/// Entries one [`RelayBackend::append`] takes: what one `Push` carries, so
/// a push is one transaction.
pub const APPEND_ENTRIES_MAX: usize = ENTRIES_PER_MESSAGE_MAX;
/// Entries one [`RelayBackend::pull`] returns at most, whatever `limit`
/// asks: what one `Batch` may carry.
pub const PULL_ENTRIES_MAX: usize = ENTRIES_PER_MESSAGE_MAX;
/// The largest `bytes_target` a pull honours: one `Batch` of this many
/// envelope bytes still fits a frame, and a relay holds no more than this
/// per pull in memory (plus one envelope, when that alone is larger).
pub const PULL_BYTES_TARGET_MAX: usize = MESSAGE_PAYLOAD_BYTES_TARGET;
/// Items one [`RelayBackend::mailbox_fetch`] returns at most, whatever
/// `limit` asks: what one `Mailbox` message may carry.
pub const MAILBOX_FETCH_ITEMS_MAX: usize = MAILBOX_ITEMS_MAX;
/// Payload bytes one [`RelayBackend::mailbox_fetch`] returns before it
/// stops (it always returns the first item there is): a full mailbox is
/// far larger than a frame (1024 × 64 KiB), so fetches page by bytes too.
pub const MAILBOX_FETCH_BYTES_TARGET: usize = MESSAGE_PAYLOAD_BYTES_TARGET;

/// Framing room a page or fetch keeps in a frame beside its payload: per
/// entry a seq, a locator and two length prefixes, 1024 entries at most.
const FRAMING_BYTES_ROOM: usize = 64 * 1024;
// A page of several entries stays within its target, a single entry within
// ENVELOPE_BYTES_MAX (which core relates to FRAME_BYTES_MAX itself): either
// fits one frame with its framing. Likewise a mailbox fetch.
const _: () = assert!(PULL_BYTES_TARGET_MAX + FRAMING_BYTES_ROOM < FRAME_BYTES_MAX);
const _: () = assert!(
    MAILBOX_FETCH_BYTES_TARGET + MAILBOX_ITEM_BYTES_MAX + FRAMING_BYTES_ROOM < FRAME_BYTES_MAX
);

/// An envelope a client pushed, with what the relay read from its header.
#[derive(Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Where it is stored.
    pub locator: Locator,
    /// Its LWW precedence: version, then sealing epoch.
    pub precedence: Precedence,
    /// The sealed envelope, at most [`ENVELOPE_BYTES_MAX`] bytes. Opaque here.
    pub envelope: Vec<u8>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("locator", &self.locator)
            .field("precedence", &self.precedence)
            .field("envelope_bytes", &self.envelope.len())
            .finish()
    }
}

/// A client was admitted to a store ([`RelayBackend::open_store`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreAccess {
    /// Whether this call created the store.
    pub created: bool,
    /// The store's head: the newest sequence number, 0 for an empty log.
    pub head: u64,
}

/// What an [`RelayBackend::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Entries stored: each was above what its locator held.
    pub accepted: u32,
    /// Entries dropped: their locator already held equal or higher precedence.
    pub stale: u32,
    /// The store's head after the append.
    pub head: u64,
}

/// One page of a store's log ([`RelayBackend::pull`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Entries in increasing `seq`, all above the pull's `since`.
    pub entries: Vec<LogEntry>,
    /// Where to pull from next: the last entry's seq, or `since` if none.
    pub cursor: u64,
    /// Whether entries after `cursor` remained when the page was read.
    pub more: bool,
}

/// What a relay holds ([`RelayBackend::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Stores.
    pub stores: u64,
    /// Live log entries, over all stores (superseded ones are gone).
    pub entries: u64,
    /// Bytes of those entries' envelopes.
    pub envelope_bytes: u64,
}

/// The storage a relay node runs on. See the module docs for the semantics
/// every implementation keeps.
///
/// Methods are `async` so that a backend over the network (PostgreSQL) fits;
/// the embedded backends run their blocking work without holding up the
/// runtime's other tasks (`block_in_place` on a multi-threaded runtime,
/// inline on a current-thread one, which keeps simulations deterministic).
pub trait RelayBackend: Send + Sync + 'static {
    /// Admits a client to `store` by its access fingerprint, creating the
    /// store if it is absent and `may_create`.
    ///
    /// Errors: [`RelayError::Unauthorized`] on a fingerprint mismatch,
    /// [`RelayError::AdmissionRequired`] if absent and not `may_create`.
    fn open_store(
        &self,
        store: &StoreId,
        access_fingerprint: &[u8; 32],
        may_create: bool,
    ) -> impl Future<Output = Result<StoreAccess, RelayError>> + Send;

    /// Stores the entries that beat what their locators hold, in one
    /// durable transaction, and publishes the new head.
    ///
    /// Errors: [`RelayError::TooManyEntries`] beyond [`APPEND_ENTRIES_MAX`],
    /// [`RelayError::EnvelopeTooLarge`] beyond [`ENVELOPE_BYTES_MAX`] (then
    /// nothing of the call is stored).
    fn append(
        &self,
        store: &StoreId,
        entries: Vec<Incoming>,
    ) -> impl Future<Output = Result<Appended, RelayError>> + Send;

    /// Log entries with a sequence number above `since`, paged by `limit`
    /// entries and `bytes_target` envelope bytes (see the module docs).
    fn pull(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> impl Future<Output = Result<Page, RelayError>> + Send;

    /// The store's head: its newest sequence number, 0 for an empty log.
    fn head(&self, store: &StoreId) -> impl Future<Output = Result<u64, RelayError>> + Send;

    /// A channel of the store's head: its value is the head as of the call
    /// or later (marked seen), and every append that grows the log sends
    /// the new head. Values only increase.
    ///
    /// Cannot fail: if the head cannot be read (or the store does not
    /// exist), the channel starts at 0, which a subscriber treats as "pull
    /// to find out". Call [`RelayBackend::head`] after subscribing to close
    /// the race with an append in between.
    fn watch(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64>;

    /// Leaves `payload` (at most [`MAILBOX_ITEM_BYTES_MAX`] bytes) in the
    /// mailbox, returning its sequence number there.
    ///
    /// Errors: [`RelayError::MailboxFull`] when [`MAILBOX_ITEMS_MAX`] items
    /// wait; [`RelayError::MailboxItemTooLarge`].
    fn mailbox_put(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<u64, RelayError>> + Send;

    /// Items of the mailbox after `since`, in order: at most `limit`
    /// (capped at [`MAILBOX_FETCH_ITEMS_MAX`]) and stopping before the item
    /// that would take the payload bytes over
    /// [`MAILBOX_FETCH_BYTES_TARGET`] (the first item always comes).
    fn mailbox_fetch(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        since: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<MailboxItem>, RelayError>> + Send;

    /// Deletes the mailbox's items up to and including `upto`. Acking what
    /// is not there is not an error.
    fn mailbox_ack(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        upto: u64,
    ) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// Counts of what the relay holds, in O(1).
    fn stats(&self) -> impl Future<Output = Result<RelayStats, RelayError>> + Send;

    /// Replaces `store`'s access fingerprint `old` with `new`, durably,
    /// then moves the store's [`RelayBackend::access_changes`] on.
    ///
    /// Errors: [`RelayError::Unauthorized`] if the stored fingerprint is not
    /// `old` (then nothing changed), [`RelayError::UnknownStore`].
    ///
    /// The default refuses with [`RelayError::Unsupported`]: right for a
    /// server without credentials of its own (a device serving its store),
    /// wrong for a relay backend or a wrapper of one, which must implement
    /// or delegate it (with [`RelayBackend::access_changes`]).
    fn rekey(
        &self,
        store: &StoreId,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> impl Future<Output = Result<(), RelayError>> + Send {
        let _ = (store, old, new);
        std::future::ready(Err(RelayError::Unsupported(
            "change a store's access credential",
        )))
    }

    /// A channel that moves on (its value is a counter with no other
    /// meaning) whenever `store`'s access fingerprint may have changed: after
    /// every [`RelayBackend::rekey`] of the store, and whenever the backend
    /// may have missed one (a PostgreSQL node that lost its LISTEN
    /// connection, once it is back). Whoever admitted a client by its
    /// fingerprint re-checks it ([`RelayBackend::open_store`] without
    /// `may_create`) once the channel has moved.
    ///
    /// Subscribe before admitting: a rekey committed after the check is then
    /// seen as a change. Cannot fail. The default never moves (its sender is
    /// gone): right with the default [`RelayBackend::rekey`] when nothing
    /// else changes the credential.
    fn access_changes(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        let _ = store;
        tokio::sync::watch::channel(0).1
    }
}

/// Checks an append's bounds before anything is stored.
fn check_append(entries: &[Incoming]) -> Result<(), RelayError> {
    if entries.len() > APPEND_ENTRIES_MAX {
        return Err(RelayError::TooManyEntries {
            count: entries.len(),
            max: APPEND_ENTRIES_MAX,
        });
    }
    match entries
        .iter()
        .find(|entry| entry.envelope.len() > ENVELOPE_BYTES_MAX)
    {
        Some(entry) => Err(RelayError::EnvelopeTooLarge {
            bytes: entry.envelope.len(),
            max: ENVELOPE_BYTES_MAX,
        }),
        None => Ok(()),
    }
}

/// Checks a mailbox item's size before anything is stored.
fn check_mailbox_payload(payload: &[u8]) -> Result<(), RelayError> {
    if payload.len() > MAILBOX_ITEM_BYTES_MAX {
        return Err(RelayError::MailboxItemTooLarge {
            bytes: payload.len(),
            max: MAILBOX_ITEM_BYTES_MAX,
        });
    }
    Ok(())
}

/// Compares access fingerprints in time independent of where they differ.
fn fingerprints_match(stored: &[u8; 32], presented: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(stored.ct_eq(presented))
}
