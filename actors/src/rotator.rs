//! Rotator: re-encrypts records sealed under old epochs, in the background.
//!
//! **Role.** After a rotation, walks the records table in locator order in
//! slices of [`ROTATION_SLICE_RECORDS`], reseals every record under an
//! older epoch with the current key (keeping its origin version, so a
//! reseal never wins a conflict) and submits each slice to the
//! StorageWriter as background work with compare-and-swap on
//! (locator, version, epoch): a put or delete that lands in between always
//! wins. The slice and the cursor commit together, so after a crash the
//! Rotator resumes where the last durable slice ended. When a pass ends and
//! no record under a rotating epoch remains (writes sealed under the old
//! key just before the switch can appear behind the cursor, so it checks
//! the per-epoch counts and runs another pass if needed), it asks
//! KeyManager to retire those epochs.
//!
//! A member that takes a newer epoch's key from another member's parcel
//! reseals only what it signed itself, and what revoked devices signed
//! ([`RotatorMsg::ResealOwn`]): the rotating member reseals everything it
//! holds, and every other member what it wrote (perhaps while the rotating
//! member could not see it), so no record is resealed by every member.
//!
//! **Messages.** [`RotatorMsg::Start`] (from KeyManager after a rotation,
//! and at every start, to resume); [`RotatorMsg::ResealOwn`] (from
//! KeyManager after it took a newer key from a member);
//! [`RotatorMsg::Step`], sent to itself.
//!
//! **Supervisor.** The store supervisor. **On failure** it is restarted
//! and resumes from the persisted cursor.

use std::sync::Arc;
use std::time::Duration;

use persist_core::env::{Entropy, FaultPoint, Faults, INJECTED_FAULT, RngStream};
use persist_core::envelope::{self, Envelope, Flags};
use persist_core::{Epoch, Locator};
use persist_storage::{LocalDb, Row};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::watch;

use crate::key_manager::KeyManagerMsg;
use crate::keys::{KeyHandle, KeySet};
use crate::meta;
use crate::routes::Routes;
use crate::storage_writer::{BACKGROUND_SLICE_WRITES_MAX, Marks, Priority, SealedWrite, WriterMsg};

/// Records examined per slice. One slice is one background write batch, so
/// it must fit in the writer's background share of a commit.
pub const ROTATION_SLICE_RECORDS: usize = BACKGROUND_SLICE_WRITES_MAX;

/// Records resealed between yields to the runtime (about half a
/// millisecond of CPU), so foreground puts are not stuck behind a slice.
pub const RESEAL_YIELD_RECORDS: usize = 16;

/// Longest wait between two slices that [`FaultPoint::RotationPause`]
/// adds.
const FAULT_PAUSE_MAX: Duration = Duration::from_secs(2);

/// How far a rotation has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RotationProgress {
    /// Whether records remain to be resealed.
    pub active: bool,
    /// The newest epoch a rotation was started to. The Rotator clears
    /// `active` only for the epoch it finished, so a rotation started while
    /// another ends is never reported done.
    pub epoch: Epoch,
    /// Records resealed since the store opened.
    pub done: u64,
    /// `done` plus the records still under older epochs it holds keys for.
    pub total: u64,
}

/// Messages to the Rotator.
pub enum RotatorMsg {
    /// Begin (or continue) resealing.
    Start,
    /// Begin a pass that reseals only the records this device signed,
    /// unless a pass is running already.
    ResealOwn,
    /// Reseal the next slice.
    Step,
}

/// What the Rotator starts from.
#[derive(Clone)]
pub struct RotatorArgs {
    /// The database (read only: writes go through the StorageWriter).
    pub db: Arc<LocalDb>,
    /// The current keys.
    pub keys: KeyHandle,
    /// Where the writer and KeyManager are.
    pub routes: Routes,
    /// Randomness for seals.
    pub entropy: Arc<dyn Entropy>,
    /// Where progress is published.
    pub progress: Arc<watch::Sender<RotationProgress>>,
    /// Fault points (simulations only).
    pub faults: Faults,
}

/// The Rotator actor.
pub struct Rotator;

/// The Rotator's state.
pub struct RotatorState {
    args: RotatorArgs,
    rng: RngStream,
    running: bool,
    cursor: Option<Locator>,
    done: u64,
    pass: Pass,
    /// Whether the running pass reseals only what this device signed.
    own_only: bool,
}

/// What the current pass over the records table has seen.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    /// The current epoch when the pass began.
    epoch: Epoch,
    /// Whether it began at the first record (not at a persisted cursor).
    from_start: bool,
    /// Records it resealed.
    applied: u64,
    /// Records per slice, when a fault point made them few.
    slice: Option<usize>,
}

impl Actor for Rotator {
    type Msg = RotatorMsg;
    type State = RotatorState;
    type Arguments = RotatorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RotatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cursor = args
            .db
            .begin_read()?
            .meta(meta::ROTATION_CURSOR)?
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .map(Locator);
        let rng = args.entropy.stream("rotator");
        // A restarted Rotator goes on counting where its predecessor was.
        let done = args.progress.borrow().done;
        Ok(RotatorState {
            args,
            rng,
            running: false,
            cursor,
            done,
            pass: Pass::default(),
            own_only: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Resume an interrupted rotation (a no-op pass check otherwise).
        myself.cast(RotatorMsg::Start)?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RotatorMsg::Start => {
                // A full pass's work includes an own-only pass's: one
                // running goes on as a full pass.
                state.own_only = false;
                if !state.running {
                    if state.idle().await? {
                        return Ok(());
                    }
                    state.running = true;
                    state.begin_pass();
                    myself.cast(RotatorMsg::Step)?;
                }
            }
            RotatorMsg::ResealOwn => {
                if !state.running && state.args.keys.current().crypto.is_some() {
                    state.own_only = true;
                    state.running = true;
                    state.begin_pass();
                    myself.cast(RotatorMsg::Step)?;
                }
            }
            RotatorMsg::Step => {
                if state.step().await? {
                    let faults = &state.args.faults;
                    if faults.fire(FaultPoint::RotationStop) {
                        return Err(format!(
                            "{INJECTED_FAULT}: the rotator stopped between two slices"
                        )
                        .into());
                    }
                    match faults.delay(FaultPoint::RotationPause, FAULT_PAUSE_MAX) {
                        Some(pause) => drop(myself.send_after(pause, || RotatorMsg::Step)),
                        None => myself.cast(RotatorMsg::Step)?,
                    }
                } else {
                    state.running = false;
                }
            }
        }
        Ok(())
    }
}

impl RotatorState {
    /// Whether there is nothing to reseal. With nothing left and no
    /// cursor, a start only makes sure finished epochs are retired (a crash
    /// may have come between the last slice and the retirement), without
    /// walking the table.
    async fn idle(&mut self) -> Result<bool, ActorProcessingErr> {
        let keys = self.args.keys.current();
        if keys.crypto.is_none() {
            return Ok(true);
        }
        if self.cursor.is_some() || self.remaining(&keys)? > 0 {
            return Ok(false);
        }
        let epoch = keys.current_epoch();
        self.finish(epoch).await?;
        // A Rotator restarted after the last slice of a pass (whose
        // predecessor failed before it could say so) ends the rotation
        // here.
        self.finish_progress(epoch, 0);
        Ok(true)
    }

    fn begin_pass(&mut self) {
        self.pass = Pass {
            epoch: self.args.keys.current().current_epoch(),
            from_start: self.cursor.is_none(),
            applied: 0,
            slice: None,
        };
    }

    /// Reseals one slice. Returns whether there is more to do.
    async fn step(&mut self) -> Result<bool, ActorProcessingErr> {
        let keys = self.args.keys.current();
        if keys.crypto.is_none() {
            return Ok(false);
        }
        if let Some(n) = self.args.faults.draw(FaultPoint::RotationSmallSlice, 4) {
            self.pass.slice = Some(1 + n as usize);
        }
        let slice = self.pass.slice.unwrap_or(ROTATION_SLICE_RECORDS);
        let page = self
            .args
            .db
            .begin_read()?
            .records_page(self.cursor.as_ref(), slice)?;
        let end_of_pass = page.len() < slice;
        let next_cursor = page.last().map(|(l, _)| *l);
        let writes = self.reseal(&keys, &page).await;
        let cursor_meta = match (end_of_pass, next_cursor) {
            (false, Some(c)) => Some(c.0.to_vec()),
            _ => None,
        };
        if !writes.is_empty() || self.cursor.is_some() || cursor_meta.is_some() {
            let applied = self.submit(writes, cursor_meta).await?;
            self.done += applied;
            self.pass.applied += applied;
        }
        self.cursor = if end_of_pass { None } else { next_cursor };
        // Counted against the keys as they are now: a rotation may have
        // begun while this slice was sealed under the previous ones.
        let keys = self.args.keys.current();
        let remaining = self.remaining(&keys)?;
        if !end_of_pass {
            self.publish(remaining);
            return Ok(true);
        }
        let pass = self.pass;
        if self.own_only {
            // Others' records are for their signers to reseal; only a key
            // that came during the pass calls for another.
            if keys.current_epoch() != pass.epoch {
                self.begin_pass();
                return Ok(true);
            }
            self.own_only = false;
            self.finish(keys.current_epoch()).await?;
            self.finish_progress(keys.current_epoch(), 0);
            return Ok(false);
        }
        if remaining > 0 {
            let stuck = pass.from_start && pass.applied == 0 && pass.epoch == keys.current_epoch();
            if !stuck {
                // Records behind the cursor (sealed under an old key just
                // before the switch, or a newer rotation): another pass.
                self.begin_pass();
                self.publish(remaining);
                return Ok(true);
            }
            // A whole pass under unchanged keys resealed nothing: what is
            // left cannot be opened (damaged records, logged above). Keep
            // the old keys rather than loop.
            tracing::warn!(
                remaining,
                "rotation cannot reseal the remaining records; old epochs stay"
            );
            self.finish_progress(keys.current_epoch(), remaining);
            return Ok(false);
        }
        let finished = keys.current_epoch();
        self.finish(finished).await?;
        // A rotation that began during the retirement needs another pass.
        let keys = self.args.keys.current();
        if keys.current_epoch() != finished || self.remaining(&keys)? > 0 {
            self.begin_pass();
            return Ok(true);
        }
        // Published last, so that whoever waits for the end sees the old
        // epochs already retired.
        self.finish_progress(finished, 0);
        Ok(false)
    }

    /// Reports the rotation to `epoch` no longer active, unless a newer one
    /// has started meanwhile.
    fn finish_progress(&self, epoch: Epoch, remaining: u64) {
        let done = self.done;
        self.args.progress.send_if_modified(|p| {
            if p.epoch > epoch {
                return false;
            }
            p.active = false;
            p.done = done;
            p.total = done + remaining;
            true
        });
    }

    /// Reseals the records of `page` under older epochs. Yields to the
    /// runtime every [`RESEAL_YIELD_RECORDS`] records, so that a slice's
    /// CPU work does not hold a worker that foreground writes need.
    async fn reseal(&mut self, keys: &KeySet, page: &[(Locator, Row)]) -> Vec<SealedWrite> {
        let Some(ctx) = keys.seal_context() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, (locator, row)) in page.iter().enumerate() {
            if i % RESEAL_YIELD_RECORDS == RESEAL_YIELD_RECORDS - 1 {
                tokio::task::yield_now().await;
            }
            if row.epoch == ctx.epoch || !keys.has_epoch(row.epoch) {
                continue;
            }
            let expected = match Envelope::parse(&row.envelope) {
                // Own only: what this device signed, and what a device no
                // longer a member signed (no one else reseals that).
                Ok(e)
                    if self.own_only
                        && e.header.signer != keys.device_id
                        && keys.member_key(&e.header.signer).is_some()
                        && !keys.revoked.contains_key(&e.header.signer) =>
                {
                    continue;
                }
                Ok(e) => e.header.precedence(),
                Err(e) => {
                    tracing::warn!(%locator, error = %e, "cannot reseal a damaged record; left as is");
                    continue;
                }
            };
            let record = match keys.open(locator, &row.envelope) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%locator, error = %e, "cannot reseal a damaged record; left as is");
                    continue;
                }
            };
            let flags = Flags {
                tombstone: row.tombstone,
                resealed: true,
            };
            // Reseals are not new writes: they carry no sequence number.
            let sealed = match envelope::seal(&ctx, locator, &record, flags, 0, &mut self.rng) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%locator, error = %e, "cannot reseal a record; left as is");
                    continue;
                }
            };
            out.push(SealedWrite {
                locator: *locator,
                path: record.path,
                value: Vec::new(),
                row: Row {
                    epoch: ctx.epoch,
                    tombstone: row.tombstone,
                    envelope: sealed,
                },
                expect: Some(expected),
            });
        }
        out
    }

    async fn submit(
        &self,
        writes: Vec<SealedWrite>,
        cursor: Option<Vec<u8>>,
    ) -> Result<u64, ActorProcessingErr> {
        let writer = self
            .args
            .routes
            .writer()
            .ok_or("storage writer is not running")?;
        let outcome = writer
            .call(
                |reply| WriterMsg::Commit {
                    writes,
                    marks: Marks::default(),
                    meta: vec![(meta::ROTATION_CURSOR, cursor)],
                    priority: Priority::Background,
                    reply,
                },
                None,
            )
            .await?;
        match outcome {
            CallResult::Success(Ok(report)) => Ok(report.applied.len() as u64),
            CallResult::Success(Err(e)) => Err(e.into()),
            _ => Err("storage writer stopped".into()),
        }
    }

    /// Records still under an epoch older than the current one, that this
    /// device could reseal.
    fn remaining(&self, keys: &KeySet) -> Result<u64, ActorProcessingErr> {
        let current = keys.current_epoch();
        let counts = self.args.db.begin_read()?.epoch_counts()?;
        Ok(counts
            .iter()
            .filter(|(e, _)| **e != current && keys.has_epoch(**e))
            .map(|(_, n)| *n)
            .sum())
    }

    fn publish(&self, remaining: u64) {
        let done = self.done;
        self.args.progress.send_modify(|p| {
            p.active = true;
            p.done = done;
            p.total = done + remaining;
        });
    }

    /// Asks KeyManager to retire the epochs older than `epoch` that hold no
    /// record any more.
    async fn finish(&mut self, epoch: Epoch) -> Result<(), ActorProcessingErr> {
        let km = self
            .args
            .routes
            .key_manager()
            .ok_or("key manager is not running")?;
        match km
            .call(|reply| KeyManagerMsg::RotationDone { epoch, reply }, None)
            .await?
        {
            CallResult::Success(Ok(retired)) => {
                if !retired.is_empty() {
                    tracing::info!(?retired, resealed = self.done, "rotation finished");
                }
                Ok(())
            }
            CallResult::Success(Err(e)) => Err(e.into()),
            _ => Err("key manager stopped".into()),
        }
    }
}
