//! The tables of the redb relay database (format 1). The format, with its
//! invariants, is described in the `relay` module docs.
//!
//! Every table name starts with `relay_`, so a device's local store opened
//! as a relay database (or the reverse) is refused as foreign, not misread.

use redb::TableDefinition;

use super::precedence::PRECEDENCE_LEN;

/// A store id.
pub(super) type StoreKey = [u8; 16];
/// A store's row: (access fingerprint, head).
pub(super) type StoreRow = ([u8; 32], u64);
/// (store id, seq).
pub(super) type LogKey = (StoreKey, u64);
/// (locator, envelope).
pub(super) type LogValue = ([u8; 32], &'static [u8]);
/// (store id, locator).
pub(super) type IndexKey = (StoreKey, [u8; 32]);
/// (seq of the locator's log entry, its precedence).
pub(super) type IndexValue = (u64, [u8; PRECEDENCE_LEN]);
/// (store id, mailbox).
pub(super) type MailboxKey = (StoreKey, [u8; 16]);
/// (last seq handed out, items held).
pub(super) type MailboxRow = (u64, u64);
/// (store id, mailbox, seq).
pub(super) type ItemKey = (StoreKey, [u8; 16], u64);

/// Name → bytes: the format version (u32 LE) and the counters (u64 LE).
pub(super) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("relay_meta");
/// Store id → (access fingerprint, head).
pub(super) const STORES: TableDefinition<'_, StoreKey, StoreRow> =
    TableDefinition::new("relay_stores");
/// (store id, seq) → (locator, envelope): the log.
pub(super) const LOG: TableDefinition<'_, LogKey, LogValue> = TableDefinition::new("relay_log");
/// (store id, locator) → (seq of its log entry, its precedence).
pub(super) const INDEX: TableDefinition<'_, IndexKey, IndexValue> =
    TableDefinition::new("relay_index");
/// (store id, mailbox) → (last seq handed out, items held).
pub(super) const MAILBOXES: TableDefinition<'_, MailboxKey, MailboxRow> =
    TableDefinition::new("relay_mailboxes");
/// (store id, mailbox, seq) → payload.
pub(super) const MAILBOX_ITEMS: TableDefinition<'_, ItemKey, &[u8]> =
    TableDefinition::new("relay_mailbox_items");

/// Meta key of the format version (u32 LE).
pub(super) const FORMAT_KEY: &str = "format";
/// Meta key of the total envelope bytes of the log (u64 LE).
pub(super) const ENVELOPE_BYTES_KEY: &str = "envelope_bytes";
