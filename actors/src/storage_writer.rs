//! StorageWriter: the only writer to the local database.
//!
//! **Role.** Applies sealed writes with last-write-wins and makes them
//! durable. It group-commits: every write that arrives while a commit is
//! being prepared joins it, so concurrent puts share one fsync, and a write
//! is acknowledged only after the commit that holds it is durable.
//! Foreground writes go first; background work (rotation, sync ingest, as
//! they land) joins a commit only in slices of at most
//! [`BACKGROUND_SLICE_WRITES_MAX`], so no foreground write waits behind more
//! than about one commit.
//!
//! **Messages.** [`WriterMsg::Commit`] queues a batch; [`WriterMsg::Ingest`]
//! queues envelopes received by sync, with changes to the pending table and
//! the sync cursor; [`WriterMsg::Flush`], which the writer sends itself,
//! commits what is queued. After each commit the writer publishes the last
//! change sequence number, which tells sync there is something to push.
//!
//! **Supervisor.** The store supervisor. **On failure** (a panic while
//! committing) the requests of the failed commit see their reply port
//! dropped, which callers report as "storage unavailable"; the supervisor
//! restarts the writer over the same database, in which redb has rolled the
//! failed transaction back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use persist_core::env::{FaultPoint, Faults, INJECTED_FAULT};
use persist_core::envelope::Envelope;
use persist_core::hlc::Hlc;
use persist_core::lww::{self, Precedence};
use persist_core::record::PathError;
use persist_core::{DeviceId, Locator};
use persist_storage::{Held, LocalDb, Parked, Row, StorageError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;

use crate::blocking::run_blocking;
use crate::meta;

/// Most writes one commit takes. Bounds a commit's memory and latency; a
/// burst larger than this spreads over several commits.
pub const COMMIT_WRITES_MAX: usize = 16 * 1024;

/// Longest wait before a commit that [`FaultPoint::CommitDelay`] adds.
const FAULT_COMMIT_DELAY_MAX: Duration = Duration::from_millis(200);

/// Most background writes added to one commit while foreground writes wait.
pub const BACKGROUND_SLICE_WRITES_MAX: usize = 256;

const _: () = assert!(
    BACKGROUND_SLICE_WRITES_MAX < COMMIT_WRITES_MAX,
    "a background slice must leave room for foreground writes"
);

/// A sealed write, ready to apply.
#[derive(Debug)]
pub struct SealedWrite {
    /// Where it goes.
    pub locator: Locator,
    /// The plaintext path, kept in memory only to report the change.
    pub path: String,
    /// The plaintext value, kept in memory only to report the change.
    pub value: Vec<u8>,
    /// The row to store.
    pub row: Row,
    /// Compare-and-swap: apply only if the stored row has exactly this
    /// precedence (a rotation reseal must not replace a newer write).
    pub expect: Option<Precedence>,
}

/// A record to forget: the row at `locator`, if the write it holds was
/// made by `origin` after `after`. Such a write was taken from a device
/// before this one learned of that device's revocation at `after`; members
/// that knew refused it. The condition is checked against the row the
/// commit sees, so a newer write that replaced it since is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forget {
    /// Where the row is.
    pub locator: Locator,
    /// The revoked device.
    pub origin: DeviceId,
    /// Its revocation's stamp: writes it stamped later are forgotten.
    pub after: Hlc,
}

/// High-water marks persisted with a commit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Marks {
    /// The sealer's HLC high-water mark.
    pub hlc: Hlc,
    /// The sealer's last sequence number.
    pub seq: u64,
}

/// Who is waiting for a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// An app's put or delete.
    Foreground,
    /// Rotation or sync ingest.
    Background,
}

/// One applied change, reported back for watchers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedChange {
    /// The path.
    pub path: String,
    /// The new value, or `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// The outcome of a committed batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Writes that took effect, in order.
    pub applied: Vec<AppliedChange>,
    /// Writes that lost to a newer version already stored.
    pub superseded: usize,
    /// Rows removed by [`WriterMsg::Forget`].
    pub forgotten: usize,
    /// Which of this writer's commits made the batch durable; batches that
    /// shared one group commit share this number.
    pub commit: u64,
}

/// A write that did not become durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The path is not valid.
    #[error(transparent)]
    InvalidPath(#[from] PathError),
    /// The write was refused before it reached storage.
    #[error("write refused: {0}")]
    Rejected(String),
    /// The commit failed. Whether the batch is stored is unknown: a
    /// commit that fails while being made durable (its fsync) may have
    /// reached the disk anyway, and be there after a restart.
    #[error("commit failed, so this write may or may not be stored (read it back to know): {0}")]
    Storage(String),
    /// The store is closing or an actor it needs is restarting.
    #[error("the store is closed or restarting; retry")]
    Unavailable,
}

impl From<StorageError> for WriteError {
    fn from(e: StorageError) -> Self {
        WriteError::Storage(e.to_string())
    }
}

/// Messages to the StorageWriter.
pub enum WriterMsg {
    /// Apply `writes` atomically and durably.
    Commit {
        /// The writes.
        writes: Vec<SealedWrite>,
        /// Marks to persist with them.
        marks: Marks,
        /// Meta entries to set (`Some`) or remove (`None`) in the same
        /// transaction.
        meta: Vec<(&'static str, Option<Vec<u8>>)>,
        /// Foreground or background.
        priority: Priority,
        /// Answered after the commit.
        reply: RpcReplyPort<Result<CommitReport, WriteError>>,
    },
    /// Apply envelopes received by sync (background priority): `writes`
    /// with last-write-wins, `parks` to the pending table, and `meta` (the
    /// sync cursor) in the same transaction.
    Ingest {
        /// Opened, verified remote writes.
        writes: Vec<SealedWrite>,
        /// Envelopes to keep pending or to release.
        parks: Vec<Park>,
        /// Meta entries to set or remove with them.
        meta: Vec<(&'static str, Option<Vec<u8>>)>,
        /// Answered after the commit.
        reply: RpcReplyPort<Result<CommitReport, WriteError>>,
    },
    /// Remove the rows `forget` names that still hold what it describes,
    /// and set `meta` (background priority). A removal is logged as a
    /// purge's is: a remote pulling this device's log finds no row there.
    Forget {
        /// The rows to check and remove.
        forget: Vec<Forget>,
        /// Meta entries to set or remove with them.
        meta: Vec<(&'static str, Option<Vec<u8>>)>,
        /// Answered after the commit.
        reply: RpcReplyPort<Result<CommitReport, WriteError>>,
    },
    /// Commit what is queued (sent by the writer to itself).
    Flush,
}

/// A change to the pending table, applied with an ingest.
#[derive(Debug)]
pub enum Park {
    /// Keep `envelope` pending at `locator`, unless the stored record there
    /// or a verified envelope pending there has an equal or higher
    /// precedence. A `verified` envelope replaces the ones pending there
    /// that it outranks; one that could not be checked yet (its signer is
    /// not known here and its epoch key is not held) is kept beside them
    /// and replaces nothing: it may be a forgery, and must not displace a
    /// genuine one.
    Keep {
        /// Where it belongs.
        locator: Locator,
        /// Its precedence (read from its header).
        precedence: Precedence,
        /// The envelope.
        envelope: Vec<u8>,
        /// Whether a known member's signature on it was checked, or it
        /// opened under a key held here (or the store does not sign).
        verified: bool,
    },
    /// The pending envelope `held` was applied (or refused for good): drop
    /// it, if it is still there.
    Release {
        /// The envelope.
        held: Held,
    },
}

/// What the StorageWriter starts from.
#[derive(Clone)]
pub struct WriterArgs {
    /// The database.
    pub db: Arc<LocalDb>,
    /// Set to the last local change sequence number after every commit,
    /// so sync learns there is something to push.
    pub committed: Arc<watch::Sender<u64>>,
    /// Fault points (simulations only).
    pub faults: Faults,
}

/// The StorageWriter actor.
pub struct StorageWriter;

struct Pending {
    writes: Vec<SealedWrite>,
    parks: Vec<Park>,
    forget: Vec<Forget>,
    marks: Marks,
    meta: Vec<(&'static str, Option<Vec<u8>>)>,
    reply: RpcReplyPort<Result<CommitReport, WriteError>>,
}

/// The StorageWriter's state.
pub struct WriterState {
    db: Arc<LocalDb>,
    committed: Arc<watch::Sender<u64>>,
    faults: Faults,
    foreground: VecDeque<Pending>,
    background: VecDeque<Pending>,
    flush_scheduled: bool,
    commits: u64,
}

impl Actor for StorageWriter {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = WriterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: WriterArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WriterState {
            db: args.db,
            committed: args.committed,
            faults: args.faults,
            foreground: VecDeque::new(),
            background: VecDeque::new(),
            flush_scheduled: false,
            commits: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WriterMsg::Commit {
                writes,
                marks,
                meta,
                priority,
                reply,
            } => {
                let pending = Pending {
                    writes,
                    parks: Vec::new(),
                    forget: Vec::new(),
                    marks,
                    meta,
                    reply,
                };
                state.enqueue(&myself, pending, priority)?;
            }
            WriterMsg::Ingest {
                writes,
                parks,
                meta,
                reply,
            } => {
                let pending = Pending {
                    writes,
                    parks,
                    forget: Vec::new(),
                    marks: Marks::default(),
                    meta,
                    reply,
                };
                state.enqueue(&myself, pending, Priority::Background)?;
            }
            WriterMsg::Forget {
                forget,
                meta,
                reply,
            } => {
                let pending = Pending {
                    writes: Vec::new(),
                    parks: Vec::new(),
                    forget,
                    marks: Marks::default(),
                    meta,
                    reply,
                };
                state.enqueue(&myself, pending, Priority::Background)?;
            }
            WriterMsg::Flush => {
                if let Some(delay) = state
                    .faults
                    .delay(FaultPoint::CommitDelay, FAULT_COMMIT_DELAY_MAX)
                {
                    // A slow disk: the commit starts late, and what arrives
                    // meanwhile waits for the next one.
                    tokio::time::sleep(delay).await;
                }
                state.flush_scheduled = false;
                state.flush();
                if !(state.foreground.is_empty() && state.background.is_empty()) {
                    myself.cast(WriterMsg::Flush)?;
                    state.flush_scheduled = true;
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for p in state.foreground.drain(..).chain(state.background.drain(..)) {
            let _ = p.reply.send(Err(WriteError::Unavailable));
        }
        Ok(())
    }
}

impl WriterState {
    fn enqueue(
        &mut self,
        myself: &ActorRef<WriterMsg>,
        pending: Pending,
        priority: Priority,
    ) -> Result<(), ActorProcessingErr> {
        match priority {
            Priority::Foreground => self.foreground.push_back(pending),
            Priority::Background => self.background.push_back(pending),
        }
        if !self.flush_scheduled {
            // The Flush lands behind every message already queued, so all
            // of them join the next commit.
            myself.cast(WriterMsg::Flush)?;
            self.flush_scheduled = true;
        }
        Ok(())
    }

    /// Takes a commit's worth of queued batches and commits them.
    fn flush(&mut self) {
        let mut batch = Vec::new();
        let mut writes = 0usize;
        take_batches(
            &mut self.foreground,
            &mut batch,
            &mut writes,
            COMMIT_WRITES_MAX,
        );
        let background_room = if batch.is_empty() {
            COMMIT_WRITES_MAX
        } else {
            BACKGROUND_SLICE_WRITES_MAX
        };
        let mut bg_writes = 0usize;
        take_batches(
            &mut self.background,
            &mut batch,
            &mut bg_writes,
            background_room,
        );
        if batch.is_empty() {
            return;
        }
        let db = self.db.clone();
        let outcome = if self.faults.fire(FaultPoint::CommitFail) {
            Err(WriteError::Storage(format!(
                "{INJECTED_FAULT}: the disk refused the transaction"
            )))
        } else {
            run_blocking(|| commit(&db, &mut batch))
        };
        self.commits += 1;
        match outcome {
            Ok((reports, last_change_seq)) => {
                self.committed.send_if_modified(|seq| {
                    let grew = last_change_seq > *seq;
                    *seq = (*seq).max(last_change_seq);
                    grew
                });
                for (p, mut report) in batch.into_iter().zip(reports) {
                    report.commit = self.commits;
                    let _ = p.reply.send(Ok(report));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; its writes may or may not be stored");
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Moves whole batches from `queue` to `out` while they fit in `room`
/// writes; always takes at least one so an oversized batch cannot starve.
fn take_batches(
    queue: &mut VecDeque<Pending>,
    out: &mut Vec<Pending>,
    taken: &mut usize,
    room: usize,
) {
    while let Some(front) = queue.front() {
        let n = front.writes.len() + front.forget.len();
        if *taken > 0 && *taken + n > room {
            break;
        }
        *taken += n;
        if let Some(p) = queue.pop_front() {
            out.push(p);
        }
        if *taken >= room {
            break;
        }
    }
}

/// Applies `batch` in one durable transaction; returns each batch's report
/// and the last change sequence number after it.
fn commit(db: &LocalDb, batch: &mut [Pending]) -> Result<(Vec<CommitReport>, u64), WriteError> {
    let mut txn = db.begin_write()?;
    let mut reports = Vec::with_capacity(batch.len());
    {
        // One open of the records table for the whole commit.
        let mut records = txn.records()?;
        for p in batch.iter_mut() {
            let mut report = CommitReport::default();
            for w in p.writes.drain(..) {
                let existing = match records.get(&w.locator) {
                    Ok(row) => row,
                    // A damaged row loses to any valid write, which heals it.
                    Err(StorageError::CorruptRow { .. }) => None,
                    Err(e) => return Err(e.into()),
                };
                let applies = match (&w.expect, &existing) {
                    (Some(expected), Some(row)) => precedence(row) == Some(*expected),
                    (Some(_), None) => false,
                    (None, Some(row)) => newer_than(&w.row, row),
                    (None, None) => true,
                };
                if !applies {
                    report.superseded += 1;
                    continue;
                }
                records.put(&w.locator, &w.row)?;
                report.applied.push(AppliedChange {
                    path: w.path,
                    value: (!w.row.tombstone).then_some(w.value),
                });
            }
            for f in p.forget.drain(..) {
                let row = match records.get(&f.locator) {
                    Ok(row) => row,
                    // A damaged row says nothing about whose it is.
                    Err(StorageError::CorruptRow { .. }) => None,
                    Err(e) => return Err(e.into()),
                };
                let disowned = row
                    .and_then(|row| {
                        Envelope::parse(&row.envelope)
                            .ok()
                            .map(|e| e.header.version)
                    })
                    .is_some_and(|v| v.origin == f.origin && v.hlc > f.after);
                if disowned {
                    records.remove(&f.locator)?;
                    report.forgotten += 1;
                }
            }
            reports.push(report);
        }
    }
    for p in batch.iter_mut() {
        for park in p.parks.drain(..) {
            apply_park(&mut txn, park)?;
        }
    }
    let mut marks = Marks::default();
    for p in batch.iter_mut() {
        for (key, value) in p.meta.drain(..) {
            match value {
                Some(v) => txn.set_meta(key, &v)?,
                None => {
                    txn.remove_meta(key)?;
                }
            }
        }
        marks.hlc = marks.hlc.max(p.marks.hlc);
        marks.seq = marks.seq.max(p.marks.seq);
    }
    // Background batches carry no marks; the sealer's marks only grow, so
    // the largest in this commit is the one to keep.
    if marks.seq > 0 {
        txn.set_meta(meta::HLC, &marks.hlc.to_bytes())?;
        txn.set_meta(meta::SEQ, &marks.seq.to_be_bytes())?;
    }
    let last_change_seq = txn.last_change_seq();
    txn.commit()?;
    Ok((reports, last_change_seq))
}

/// Applies one change to the pending table.
fn apply_park(txn: &mut persist_storage::WriteTxn, park: Park) -> Result<(), WriteError> {
    match park {
        Park::Keep {
            locator,
            precedence,
            envelope,
            verified,
        } => {
            let stored = match txn.record(&locator) {
                Ok(row) => row.as_ref().and_then(self::precedence),
                Err(StorageError::CorruptRow { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            if stored.is_some_and(|stored| !lww::wins(precedence, stored)) {
                return Ok(());
            }
            // A verified envelope held here that this one does not outrank
            // makes it redundant; a verified one replaces what it outranks.
            let parked = txn.parked(&locator)?;
            let precedence_of =
                |p: &Parked| Envelope::parse(&p.envelope).map(|e| e.header.precedence());
            let covered = parked.iter().any(|p| {
                p.verified && precedence_of(p).is_ok_and(|other| !lww::wins(precedence, other))
            });
            if covered {
                return Ok(());
            }
            // A verified one replaces what it outranks. An unverified one
            // replaces nothing: it may be a forgery.
            if verified {
                for p in &parked {
                    if precedence_of(p).map_or(true, |other| lww::wins(precedence, other)) {
                        txn.unpark(&p.held)?;
                    }
                }
            }
            txn.park(&locator, &envelope, verified)?;
        }
        Park::Release { held } => {
            txn.unpark(&held)?;
        }
    }
    Ok(())
}

/// The LWW precedence of a stored row, if its header parses.
fn precedence(row: &Row) -> Option<Precedence> {
    Envelope::parse(&row.envelope)
        .ok()
        .map(|e| e.header.precedence())
}

/// Whether `candidate` replaces `existing` under last-write-wins. A stored
/// row whose header does not parse loses to any valid write, so a corrupt
/// record can be repaired by writing it again.
fn newer_than(candidate: &Row, existing: &Row) -> bool {
    let Ok(new) = Envelope::parse(&candidate.envelope) else {
        return false;
    };
    match Envelope::parse(&existing.envelope) {
        Ok(old) => lww::wins(new.header.precedence(), old.header.precedence()),
        Err(_) => true,
    }
}
