//! Forgetting what a revoked device wrote after its revocation.
//!
//! Members refuse such writes once they know of the revocation (see
//! [`ingest`](crate::ingest)). A member that was offline, or had not taken
//! the revocation's key parcel yet, may have applied some before it knew.
//! Reads hide them from the moment the revocation is known
//! ([`KeySet::revoked_write`](crate::KeySet::revoked_write)); this sweep then
//! removes them from the database, so they are neither listed, resealed nor
//! counted. The write they replaced is not restored here: this device no
//! longer has it, and takes it again from a member that held it, which
//! wrote it anew when it refused the revoked write (see
//! `ingest::restate_overtaken`).
//!
//! The KeyManager runs the sweep whenever its keyring holds revocations
//! the database has not been swept for (the count is kept in
//! [`meta::REVOCATIONS_SWEPT`], written after the sweep), so a crash in
//! between sweeps again on the next open. It reads the records table one
//! page at a time and removes through the StorageWriter, which checks each
//! row again in its commit: a newer write that replaced one since is kept.

use std::collections::BTreeMap;
use std::sync::Arc;

use persist_core::envelope::Envelope;
use persist_core::hlc::Hlc;
use persist_core::keyring::Revocation;
use persist_core::{DeviceId, Locator};
use persist_storage::{LocalDb, StorageError};
use ractor::rpc::CallResult;

use crate::blocking::run_blocking;
use crate::meta;
use crate::routes::Routes;
use crate::storage_writer::{Forget, WriteError, WriterMsg};

/// Rows read per page of the sweep; one page's candidates go to the
/// StorageWriter as one background batch.
const FORGET_PAGE_ROWS: usize = 512;

/// How many revocations the database has been swept for.
pub(crate) fn swept(db: &LocalDb) -> Result<u64, StorageError> {
    let txn = db.begin_read()?;
    Ok(txn
        .meta(meta::REVOCATIONS_SWEPT)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Removes every row holding a write that one of `revoked` made after its
/// revocation, then records that the database is swept for all of them.
/// Returns how many rows it removed.
pub(crate) async fn forget_revoked_writes(
    db: &Arc<LocalDb>,
    routes: &Routes,
    revoked: &[Revocation],
) -> Result<usize, WriteError> {
    let after: BTreeMap<DeviceId, Hlc> = revoked.iter().map(|r| (r.device_id, r.at)).collect();
    let mut cursor: Option<Locator> = None;
    let mut forgotten = 0;
    loop {
        let db = db.clone();
        let (candidates, last) = run_blocking(|| {
            let txn = db.begin_read()?;
            let page = txn.records_page(cursor.as_ref(), FORGET_PAGE_ROWS)?;
            let last = page.last().map(|(locator, _)| *locator);
            let candidates: Vec<Forget> = page
                .iter()
                .filter_map(|(locator, row)| {
                    let version = Envelope::parse(&row.envelope).ok()?.header.version;
                    let at = *after.get(&version.origin)?;
                    (version.hlc > at).then_some(Forget {
                        locator: *locator,
                        origin: version.origin,
                        after: at,
                    })
                })
                .collect();
            Ok::<_, StorageError>((candidates, last))
        })?;
        if !candidates.is_empty() {
            forgotten += submit(routes, candidates, Vec::new()).await?;
        }
        match last {
            Some(last) => cursor = Some(last),
            None => break,
        }
    }
    let count = (revoked.len() as u64).to_be_bytes().to_vec();
    submit(
        routes,
        Vec::new(),
        vec![(meta::REVOCATIONS_SWEPT, Some(count))],
    )
    .await?;
    Ok(forgotten)
}

/// Hands `forget` and `meta` to the StorageWriter as one background
/// batch; answers with how many rows it removed.
pub(crate) async fn submit(
    routes: &Routes,
    forget: Vec<Forget>,
    meta: Vec<(&'static str, Option<Vec<u8>>)>,
) -> Result<usize, WriteError> {
    let writer = routes.writer().ok_or(WriteError::Unavailable)?;
    let outcome = writer
        .call(
            |reply| WriterMsg::Forget {
                forget,
                meta,
                reply,
            },
            None,
        )
        .await
        .map_err(|_| WriteError::Unavailable)?;
    match outcome {
        CallResult::Success(report) => report.map(|r| r.forgotten),
        _ => Err(WriteError::Unavailable),
    }
}
