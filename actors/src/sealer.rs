//! Sealer: turns plain writes into sealed envelopes, in order.
//!
//! **Role.** Assigns each write its HLC stamp and the device's sequence
//! number, seals it under the current epoch (or frames it plainly for an
//! `encrypt(false)` store) and forwards the sealed batch to the
//! StorageWriter with the caller's reply port. Sealing and forwarding
//! happen in one handler, so commit order is stamp order. CPU-only: it
//! never sees the KEK, only the [`KeySet`] that KeyManager handed it.
//!
//! **Messages.** [`SealerMsg::Seal`] with a batch of [`WriteOp`]s;
//! [`SealerMsg::Observe`] with the stamp of an applied remote write;
//! [`SealerMsg::Barrier`].
//!
//! **Supervisor.** The store supervisor. **On failure** it is restarted;
//! it resumes its clock and sequence from the high-water marks the
//! StorageWriter persists with every commit, so no stamp is reissued.

use std::sync::Arc;

use persist_core::env::{Clock, Entropy, RngStream};
use persist_core::envelope::{self, Flags, SealError};
use persist_core::hlc::{Hlc, HlcState};
use persist_core::lww::Precedence;
use persist_core::record::Record;
use persist_storage::Row;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand_core::Rng;

use crate::keys::{KeyHandle, KeySet};
use crate::routes::Routes;
use crate::storage_writer::{CommitReport, Marks, Priority, SealedWrite, WriteError, WriterMsg};

/// One write as the app asked for it.
#[derive(Clone, Debug)]
pub enum WriteOp {
    /// Set `path` to the encoded `value`.
    Put {
        /// The record path.
        path: String,
        /// The encoded value.
        value: Vec<u8>,
    },
    /// Delete `path` (writes a tombstone).
    Delete {
        /// The record path.
        path: String,
    },
    /// Write `value` (or a tombstone, for `None`) at `path` again as a new
    /// write of this device, only if the record there still has exactly
    /// the precedence `over` (so a write made since is never replaced).
    /// Sync uses it to put a value back in front of a revoked device's
    /// refused write.
    Restate {
        /// The record path.
        path: String,
        /// The encoded value, or `None` for a delete.
        value: Option<Vec<u8>>,
        /// The precedence of the record read at `path`.
        over: Precedence,
    },
}

/// Messages to the Sealer.
pub enum SealerMsg {
    /// Answered once every batch received before it has been handed to the
    /// StorageWriter (KeyManager uses it before retiring an epoch, so no
    /// write sealed under the old key is still on its way).
    Barrier(RpcReplyPort<()>),
    /// A remote write stamped `Hlc` was applied: later local stamps must
    /// exceed it, so a write made after seeing it wins over it.
    Observe(Hlc),
    /// Seal `ops` and commit them as one atomic batch.
    Seal {
        /// The writes, applied in order.
        ops: Vec<WriteOp>,
        /// Answered once the batch is durable, or failed.
        reply: RpcReplyPort<Result<CommitReport, WriteError>>,
    },
}

/// What the Sealer starts from.
#[derive(Clone)]
pub struct SealerArgs {
    /// The keys to seal with (read at each batch, so a rotation takes
    /// effect for the next batch).
    pub keys: KeyHandle,
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// The clock's persisted high-water mark.
    pub hlc_mark: Hlc,
    /// The last sequence number used.
    pub seq_mark: u64,
    /// The largest accepted drift of remote stamps, in ms.
    pub max_drift_ms: u64,
    /// Where to find the StorageWriter.
    pub routes: Routes,
    /// Randomness for seeds and nonces: the Sealer draws its own stream
    /// at each start, so a restarted Sealer never repeats one.
    pub entropy: Arc<dyn Entropy>,
}

/// The Sealer actor.
pub struct Sealer;

/// The Sealer's state.
pub struct SealerState {
    keys: KeyHandle,
    clock: Arc<dyn Clock>,
    hlc: HlcState,
    seq: u64,
    rng: RngStream,
    routes: Routes,
}

impl Actor for Sealer {
    type Msg = SealerMsg;
    type State = SealerState;
    type Arguments = SealerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SealerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let rng = args.entropy.stream("sealer");
        Ok(SealerState {
            keys: args.keys,
            clock: args.clock,
            hlc: HlcState::new(args.hlc_mark, args.max_drift_ms),
            seq: args.seq_mark,
            rng,
            routes: args.routes,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (ops, reply) = match msg {
            SealerMsg::Barrier(reply) => {
                let _ = reply.send(());
                return Ok(());
            }
            SealerMsg::Observe(remote) => {
                // Ingest parks envelopes stamped too far ahead, so a drift
                // error here means the clock stepped back since; the stamp
                // is still taken only if within bounds.
                if let Err(e) = state.hlc.observe(remote, state.clock.now_ms()) {
                    tracing::debug!(error = %e, "remote stamp not observed");
                }
                return Ok(());
            }
            SealerMsg::Seal { ops, reply } => (ops, reply),
        };
        let writes = match state.seal_all(ops).await {
            Ok(w) => w,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        let marks = Marks {
            hlc: state.hlc.high_water(),
            seq: state.seq,
        };
        match state.routes.writer() {
            Some(writer) => {
                let msg = WriterMsg::Commit {
                    writes,
                    marks,
                    meta: Vec::new(),
                    priority: Priority::Foreground,
                    reply,
                };
                if let Err(ractor::MessagingErr::SendErr(WriterMsg::Commit { reply, .. })) =
                    writer.cast(msg)
                {
                    let _ = reply.send(Err(WriteError::Unavailable));
                }
            }
            None => {
                let _ = reply.send(Err(WriteError::Unavailable));
            }
        }
        Ok(())
    }
}

/// Batches at least this large are sealed on two workers at once: the
/// Ed25519 signature dominates a seal, and a big batch is the one an app
/// waits longest for.
pub const PARALLEL_SEAL_OPS_MIN: usize = 64;

/// A write stamped and numbered, with its randomness drawn, ready to seal.
struct Prepared {
    record: Record,
    locator: persist_core::Locator,
    tombstone: bool,
    /// Apply only over a record of exactly this precedence.
    expect: Option<Precedence>,
    seq: u64,
    seed: [u8; 16],
    nonce: [u8; 12],
}

impl SealerState {
    /// Stamps, numbers and seals `ops`, in order.
    ///
    /// Everything that must happen in order (HLC stamps, sequence numbers,
    /// drawing randomness) happens here on the actor; the seals themselves
    /// are pure functions of what was drawn, so a large batch is split over
    /// two workers and the result is the same bytes either way.
    async fn seal_all(&mut self, ops: Vec<WriteOp>) -> Result<Vec<SealedWrite>, WriteError> {
        let keys: Arc<KeySet> = self.keys.current();
        let mut prepared = Vec::with_capacity(ops.len());
        for op in ops {
            let (path, value, tombstone, expect) = match op {
                WriteOp::Put { path, value } => (path, value, false, None),
                WriteOp::Delete { path } => (path, Vec::new(), true, None),
                WriteOp::Restate { path, value, over } => match value {
                    Some(value) => (path, value, false, Some(over)),
                    None => (path, Vec::new(), true, Some(over)),
                },
            };
            let hlc = self.hlc.tick(self.clock.now_ms());
            self.seq += 1;
            let locator = keys.locator(&path);
            let mut seed = [0u8; 16];
            let mut nonce = [0u8; 12];
            if keys.crypto.is_some() {
                self.rng.fill_bytes(&mut seed);
                self.rng.fill_bytes(&mut nonce);
            }
            prepared.push(Prepared {
                record: Record {
                    path,
                    value,
                    origin: keys.device_id,
                    hlc,
                },
                locator,
                tombstone,
                expect,
                seq: self.seq,
                seed,
                nonce,
            });
        }
        let parallel = prepared.len() >= PARALLEL_SEAL_OPS_MIN
            && matches!(
                tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
                Ok(tokio::runtime::RuntimeFlavor::MultiThread)
            );
        if !parallel {
            return seal_prepared(&keys, prepared);
        }
        // Both halves are spawned: a task spawned from a worker waits in
        // that worker's LIFO slot, where no idle worker steals it, so
        // sealing one half inline would run the halves one after the other.
        let second = prepared.split_off(prepared.len() / 2);
        let (k1, k2) = (keys.clone(), keys);
        let first = tokio::spawn(async move { seal_prepared(&k1, prepared) });
        let second = tokio::spawn(async move { seal_prepared(&k2, second) });
        let joined = |r: Result<_, tokio::task::JoinError>| {
            r.map_err(|e| WriteError::Rejected(format!("sealing task failed: {e}")))
        };
        let mut out = joined(first.await)??;
        out.extend(joined(second.await)??);
        Ok(out)
    }
}

/// Seals prepared writes under the keys' current epoch.
fn seal_prepared(keys: &KeySet, prepared: Vec<Prepared>) -> Result<Vec<SealedWrite>, WriteError> {
    let ctx = keys.seal_context();
    let mut out = Vec::with_capacity(prepared.len());
    for p in prepared {
        let flags = Flags {
            tombstone: p.tombstone,
            resealed: false,
        };
        let envelope = match &ctx {
            Some(ctx) => envelope::seal_with_randomness(
                ctx, &p.locator, &p.record, flags, p.seq, p.seed, p.nonce,
            ),
            None => envelope::seal_plain(&p.record, flags, keys.device_id, p.seq),
        }
        .map_err(|e| match e {
            SealError::Path(p) => WriteError::InvalidPath(p),
            other => WriteError::Rejected(other.to_string()),
        })?;
        out.push(SealedWrite {
            locator: p.locator,
            path: p.record.path,
            value: p.record.value,
            row: Row {
                epoch: keys.current_epoch(),
                tombstone: p.tombstone,
                envelope,
            },
            expect: p.expect,
        });
    }
    Ok(out)
}
