//! The store supervisor: starts, restarts and stops a store's actors.
//!
//! **Role.** Spawns KeyManager, StorageWriter, Sealer and Rotator (in that
//! order: each depends only on those before it), publishes their addresses
//! in [`Routes`], restarts a child that fails, and shuts them down in the
//! reverse order: the Rotator and the Sealer first so no new write enters,
//! then the StorageWriter after it has committed everything queued, then
//! KeyManager.
//!
//! **Messages.** [`SupervisorMsg::Shutdown`].
//!
//! **Supervisor.** None: the engine's `Store` owns it. **On failure** of a
//! child it restarts that child, at most [`RESTARTS_MAX`] times within
//! [`RESTART_WINDOW_MS`] of the store's clock; past that it stops the store
//! rather than loop, and the engine reports the store closed. A store that
//! lives for months survives the odd failure; one that fails over and over
//! stops.

use std::collections::VecDeque;
use std::sync::Arc;

use persist_core::StoreId;
use persist_core::env::Env;
use persist_core::hlc::Hlc;
use persist_core::keys::Secret32;
use persist_storage::LocalDb;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;

use crate::key_manager::{KeyManager, KeyManagerArgs, KeyManagerMsg};
use crate::keys::KeyHandle;
use crate::peer_session::{PeerSession, SessionArgs};
use crate::rotator::{RotationProgress, Rotator, RotatorArgs};
use crate::routes::Routes;
use crate::sealer::{Sealer, SealerArgs};
use crate::storage_writer::{StorageWriter, WriterArgs};

/// Most child restarts within [`RESTART_WINDOW_MS`] before the supervisor
/// gives up on the store.
pub const RESTARTS_MAX: usize = 16;

/// The window over which restarts are counted, in ms.
pub const RESTART_WINDOW_MS: u64 = 60_000;

/// Everything a store's actor tree starts from.
#[derive(Clone)]
pub struct StoreArgs {
    /// The database.
    pub db: Arc<LocalDb>,
    /// Time and randomness.
    pub env: Env,
    /// The store.
    pub store_id: StoreId,
    /// The device KEK (`None` for a store that does not encrypt).
    pub kek: Option<Arc<Secret32>>,
    /// Where the current key set is published.
    pub keys: KeyHandle,
    /// Where rotation progress is published.
    pub progress: Arc<watch::Sender<RotationProgress>>,
    /// The HLC high-water mark read from the database.
    pub hlc_mark: Hlc,
    /// The last sequence number read from the database.
    pub seq_mark: u64,
    /// Largest accepted drift of remote stamps, in ms.
    pub max_drift_ms: u64,
    /// Where the children's addresses are published.
    pub routes: Routes,
    /// A read-only store runs no Rotator: it never writes.
    pub read_only: bool,
    /// The last local change sequence number, published by the
    /// StorageWriter after every commit.
    pub committed: Arc<watch::Sender<u64>>,
    /// How to sync, for a store that does.
    pub sync: Option<SessionArgs>,
    /// How long an old epoch waits for members' acknowledgements before
    /// it retires anyway, in ms.
    pub retire_grace_ms: u64,
}

/// Messages to the supervisor.
pub enum SupervisorMsg {
    /// Stop every child in order, then stop; answered when done.
    Shutdown(RpcReplyPort<()>),
}

/// The store supervisor actor.
pub struct StoreSupervisor;

/// The supervisor's state.
pub struct SupervisorState {
    args: StoreArgs,
    /// When recent restarts happened (store clock, ms), oldest first.
    restarts: VecDeque<u64>,
    shutting_down: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Child {
    KeyManager,
    Writer,
    Sealer,
    Rotator,
    PeerSession,
}

impl Actor for StoreSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = StoreArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: StoreArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let state = SupervisorState {
            args,
            restarts: VecDeque::new(),
            shutting_down: false,
        };
        for child in [
            Child::KeyManager,
            Child::Writer,
            Child::Sealer,
            Child::Rotator,
            Child::PeerSession,
        ] {
            let skip = match child {
                Child::Rotator => state.args.read_only,
                Child::PeerSession => state.args.read_only || state.args.sync.is_none(),
                _ => false,
            };
            if skip {
                continue;
            }
            state.start(myself.get_cell(), child).await?;
        }
        if !state.args.read_only
            && let Some(km) = state.args.routes.key_manager()
        {
            km.cast(KeyManagerMsg::Opened)?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisorMsg::Shutdown(reply) = msg;
        state.shutting_down = true;
        let routes = &state.args.routes;
        if let Some(session) = routes.peer_session() {
            routes.set_peer_session(None);
            // An ingest in flight is committed or not; the cursor says which.
            let _ = session.stop_and_wait(None, None).await;
        }
        if let Some(rotator) = routes.rotator() {
            routes.set_rotator(None);
            // A slice in flight is committed or not; the cursor says which.
            let _ = rotator.stop_and_wait(None, None).await;
        }
        if let Some(sealer) = routes.sealer() {
            routes.set_sealer(None);
            // Let the Sealer forward what it already accepted.
            let _ = sealer.drain_and_wait(None).await;
        }
        if let Some(writer) = routes.writer() {
            routes.set_writer(None);
            // Draining processes every queued Commit and the Flushes they
            // schedule, so every accepted write is answered.
            let _ = writer.drain_and_wait(None).await;
        }
        if let Some(km) = routes.key_manager() {
            routes.set_key_manager(None);
            let _ = km.stop_and_wait(None, None).await;
        }
        let _ = reply.send(());
        myself.stop(None);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, err) = event else {
            return Ok(());
        };
        if state.shutting_down {
            return Ok(());
        }
        let Some(child) = state.which(&cell) else {
            return Ok(());
        };
        // A clock that went back does not make the budget last longer.
        let now = state
            .args
            .env
            .clock
            .now_ms()
            .max(state.restarts.back().copied().unwrap_or(0));
        while state
            .restarts
            .front()
            .is_some_and(|&at| at.saturating_add(RESTART_WINDOW_MS) < now)
        {
            state.restarts.pop_front();
        }
        state.restarts.push_back(now);
        if state.restarts.len() > RESTARTS_MAX {
            tracing::error!(?child, %err, "actor failed too often; closing the store");
            myself.stop(Some("too many actor failures".into()));
            return Ok(());
        }
        tracing::warn!(?child, %err, recent_restarts = state.restarts.len(),
            "actor failed; restarting it");
        state.start(myself.get_cell(), child).await
    }
}

impl SupervisorState {
    fn which(&self, cell: &ActorCell) -> Option<Child> {
        let r = &self.args.routes;
        let id = cell.get_id();
        if r.key_manager().is_some_and(|a| a.get_id() == id) {
            Some(Child::KeyManager)
        } else if r.writer().is_some_and(|a| a.get_id() == id) {
            Some(Child::Writer)
        } else if r.sealer().is_some_and(|a| a.get_id() == id) {
            Some(Child::Sealer)
        } else if r.rotator().is_some_and(|a| a.get_id() == id) {
            Some(Child::Rotator)
        } else if r.peer_session().is_some_and(|a| a.get_id() == id) {
            Some(Child::PeerSession)
        } else {
            None
        }
    }

    async fn start(&self, supervisor: ActorCell, child: Child) -> Result<(), ActorProcessingErr> {
        let a = &self.args;
        match child {
            Child::KeyManager => {
                let args = KeyManagerArgs {
                    db: a.db.clone(),
                    store_id: a.store_id,
                    kek: a.kek.clone(),
                    keys: a.keys.clone(),
                    routes: a.routes.clone(),
                    entropy: a.env.entropy.clone(),
                    progress: a.progress.clone(),
                    clock: a.env.clock.clone(),
                    retire_grace_ms: a.retire_grace_ms,
                };
                let (r, _) = Actor::spawn_linked(None, KeyManager, args, supervisor).await?;
                a.routes.set_key_manager(Some(r));
            }
            Child::Writer => {
                let args = WriterArgs {
                    db: a.db.clone(),
                    committed: a.committed.clone(),
                    faults: a.env.faults.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, StorageWriter, args, supervisor).await?;
                a.routes.set_writer(Some(r));
            }
            Child::Sealer => {
                let (hlc_mark, seq_mark) = self.marks()?;
                let args = SealerArgs {
                    keys: a.keys.clone(),
                    clock: a.env.clock.clone(),
                    hlc_mark,
                    seq_mark,
                    max_drift_ms: a.max_drift_ms,
                    routes: a.routes.clone(),
                    entropy: a.env.entropy.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, Sealer, args, supervisor).await?;
                a.routes.set_sealer(Some(r));
            }
            Child::Rotator => {
                let args = RotatorArgs {
                    db: a.db.clone(),
                    keys: a.keys.clone(),
                    routes: a.routes.clone(),
                    entropy: a.env.entropy.clone(),
                    progress: a.progress.clone(),
                    faults: a.env.faults.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, Rotator, args, supervisor).await?;
                a.routes.set_rotator(Some(r));
            }
            Child::PeerSession => {
                let Some(args) = a.sync.clone() else {
                    return Ok(());
                };
                let (r, _) = Actor::spawn_linked(None, PeerSession, args, supervisor).await?;
                a.routes.set_peer_session(Some(r));
            }
        }
        Ok(())
    }

    /// The marks to (re)start the Sealer from: the larger of those given at
    /// open and those the writer has persisted since.
    fn marks(&self) -> Result<(Hlc, u64), ActorProcessingErr> {
        let (hlc, seq) = crate::read_marks(&self.args.db)?;
        Ok((hlc.max(self.args.hlc_mark), seq.max(self.args.seq_mark)))
    }
}
