//! The tables and reserved meta keys of the local database (format v1).
//!
//! The format itself, with its invariants, is described in the crate docs.

use redb::{ReadableTable, TableDefinition};

use crate::error::StorageError;

/// Locator → row ([`crate::row`] format).
pub(crate) const RECORDS: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("records");
/// Local change sequence number → locator.
pub(crate) const CHANGES: TableDefinition<'_, u64, [u8; 32]> = TableDefinition::new("changes");
/// Epoch → number of rows sealed under it.
pub(crate) const EPOCH_COUNTS: TableDefinition<'_, u32, u64> = TableDefinition::new("epoch_counts");
/// Locator ‖ SHA-256(envelope) → whether its signature was checked (one
/// byte, 0 or 1) ‖ envelope that arrived by sync but cannot be applied yet (its epoch key or its signer is not known here), several
/// per locator: one whose signature could not be checked yet must not
/// displace another. Created on first use, so a database made before it
/// existed has none. (It replaces the `pending` table of earlier builds,
/// which held one envelope per locator; their envelopes do not open in
/// this build.)
pub(crate) const PENDING: TableDefinition<'_, [u8; 64], &[u8]> = TableDefinition::new("held");
/// Name → bytes: the format version, this crate's counters, and the engine's
/// own entries.
pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

/// Meta key of the format version (u32 LE).
pub(crate) const FORMAT_KEY: &str = "format";
/// Meta key of the number of non-tombstone rows (u64 LE).
pub(crate) const LIVE_ROWS_KEY: &str = "\0live_rows";
/// Meta key of the last change sequence number handed out (u64 LE).
pub(crate) const LAST_CHANGE_SEQ_KEY: &str = "\0last_change_seq";

/// Whether `key` is kept by this crate and may not be written by others.
pub(crate) fn is_reserved_meta_key(key: &str) -> bool {
    key == FORMAT_KEY || key.starts_with('\0')
}

/// Reads one of this crate's u64 counters from the meta table.
pub(crate) fn meta_u64(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<u64, StorageError> {
    let guard = meta
        .get(key)?
        .ok_or_else(|| StorageError::corrupted(format!("meta entry {key:?} is missing")))?;
    let bytes: [u8; 8] = guard.value().try_into().map_err(|_| {
        StorageError::corrupted(format!(
            "meta entry {key:?} holds {} bytes, not 8",
            guard.value().len()
        ))
    })?;
    Ok(u64::from_le_bytes(bytes))
}
