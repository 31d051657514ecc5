//! PeerSession: keeps one store in sync with one remote (a relay, or a
//! device serving its store).
//!
//! **Role.** Connects through an injected [`Connector`], says `Hello`, then
//! pushes the local change log since the remote's acknowledged cursor (up
//! to [`PUSHES_INFLIGHT_MAX`] pushes unacknowledged at a time) and pulls
//! the remote log since its own cursor. Pulled envelopes go through
//! [`crate::ingest`] (signature, AEAD, pending) and are applied by the
//! StorageWriter together with the new pull cursor, so a crash never skips
//! or re-applies a batch unseen. Pulls are pipelined: when a batch that
//! says `more` arrives, the next pull goes out before the batch is
//! checked, so the remote reads and sends the next page meanwhile, and a
//! batch is checked while the one before it commits. It subscribes to the
//! remote's head, so a write elsewhere arrives live, and it learns of
//! local commits from the StorageWriter, so a local write is pushed at
//! once. Only envelopes this device signed are pushed (its own writes and
//! its reseals); what it pulled came from the remote.
//!
//! It presents the store's credential from the keyring at each connection.
//! When the remote refuses it and a revocation has chosen a next relay
//! token, it tries that one: if the remote takes it, the revoker has
//! switched the relay, and the KeyManager makes it the current token.
//!
//! On a lost connection it reconnects after a jittered exponential backoff,
//! drawn from the injected randomness and timed on the runtime's clock, so
//! a simulation replays it.
//!
//! **Messages.** [`PeerMsg::SyncNow`] (push and pull once, answered when
//! both are done), plus messages it sends itself: `Connect`, `Handshaken`
//! (a connection attempt, which runs beside the actor, ended), `Received`,
//! `Closed`, `LocalChange`.
//!
//! **Supervisor.** The store supervisor. **On failure** it is restarted;
//! it reloads its cursors, which only ever advance with the commits they
//! describe, and reconnects.
//!
//! # Invariants
//! - Every queue is bounded: [`PUSHES_INFLIGHT_MAX`] pushes and one pull
//!   in flight, one pulled batch committing while the next is checked, at
//!   most [`FRAMES_QUEUED_MAX`] received frames waiting for the actor (the
//!   reader stops reading, and QUIC flow control stops the remote), and at
//!   most [`PENDING_HELD_MAX`] (plus two batches) envelopes held pending.
//! - The pull cursor is committed in the same transaction as the batch it
//!   covers, and a batch is handed to the StorageWriter only after the
//!   batch before it is durable: the committed cursor only ever covers
//!   applied entries, even when a commit fails. The push cursor is
//!   committed only after the remote acknowledged.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use persist_core::env::{Clock, Entropy, FaultPoint, Faults, INJECTED_FAULT, RngStream};
use persist_core::envelope::Envelope;
use persist_core::protocol::{
    AccessKey, ENTRIES_PER_MESSAGE_MAX, ErrorCode, Hello, LogEntry, MESSAGE_PAYLOAD_BYTES_TARGET,
    Message, PROTOCOL_VERSION, PushEntry, Welcome,
};
use persist_core::{DeviceId, StoreId};
use persist_storage::LocalDb;
use persist_transport::frame::{RecvHalf, SendHalf};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand_core::Rng;
use tokio::sync::{Semaphore, watch};

use crate::blocking::run_blocking;
use crate::ingest::{self, Incoming, IngestContext, OnApplied, Submitted};
use crate::key_manager::KeyManagerMsg;
use crate::keys::KeyHandle;
use crate::meta;
use crate::routes::Routes;
use crate::storage_writer::{Marks, Priority, WriterMsg};

/// Pushes sent before the first is acknowledged: the remote appends one
/// while the next is on its way. Each is at most a frame of
/// [`MESSAGE_PAYLOAD_BYTES_TARGET`] bytes in the send buffer.
pub const PUSHES_INFLIGHT_MAX: usize = 2;
/// Frames read from the remote but not yet handled. Each may be a full
/// batch (up to a frame, 16 MiB), so this bounds the session's memory.
pub const FRAMES_QUEUED_MAX: usize = 2;
/// First reconnect delay.
pub const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(30);
/// How long the remote has to answer `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pending envelopes re-examined per ingest commit.
pub const PENDING_RETRY_PAGE: usize = 256;
/// How often held envelopes are looked at again even when no key or
/// member arrived: one stamped too far ahead applies once this device's
/// clock catches up.
pub const PENDING_RETRY_INTERVAL_MS: u64 = 60_000;
/// Envelopes held pending before the session stops pulling. Held envelopes
/// are never dropped, so a remote sending ones this device can never open
/// would otherwise grow the pending table without bound; past this, the
/// session stays at its cursor and says why, until keys or members arrive.
pub const PENDING_HELD_MAX: u64 = 65_536;

/// A conversation with the remote: the two halves of one stream, and
/// whatever keeps the connection under them open.
pub struct Link {
    /// Frames to the remote.
    pub send: SendHalf,
    /// Frames from the remote.
    pub recv: RecvHalf,
    /// Dropped when the link is: holds the connection open.
    pub guard: Box<dyn Send + Sync>,
}

/// The boxed future of [`Connector::connect`].
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Link, String>> + Send + 'a>>;

/// How a session reaches its remote: QUIC in the product, an in-memory pipe
/// in tests and simulations.
pub trait Connector: Send + Sync + 'static {
    /// Opens a conversation; the error says why not, for people.
    fn connect(&self) -> ConnectFuture<'_>;
    /// The remote, for status and logs (e.g. `quic://relay:7443`). Cursors
    /// are kept per remote: naming another remote starts them over.
    fn remote(&self) -> String;
}

/// What a session starts from.
#[derive(Clone)]
pub struct SessionArgs {
    /// The database (read for pushes and pending envelopes).
    pub db: Arc<LocalDb>,
    /// The store.
    pub store_id: StoreId,
    /// This device.
    pub device_id: DeviceId,
    /// The operator's admission secret, if the remote needs one.
    pub admission: Option<String>,
    /// Keys for ingest.
    pub keys: KeyHandle,
    /// The other actors.
    pub routes: Routes,
    /// The remote.
    pub connector: Arc<dyn Connector>,
    /// Wall clock, for the drift check of remote stamps.
    pub clock: Arc<dyn Clock>,
    /// Randomness for reconnect jitter.
    pub entropy: Arc<dyn Entropy>,
    /// Fault points (simulations only).
    pub faults: Faults,
    /// Largest accepted drift of remote stamps, in ms.
    pub max_drift_ms: u64,
    /// The StorageWriter's last change sequence number.
    pub committed: Arc<watch::Sender<u64>>,
    /// Where applied remote changes are reported.
    pub on_applied: OnApplied,
    /// Where the session's state is published.
    pub status: Arc<watch::Sender<SyncState>>,
}

/// The session's state, as `sync_status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncState {
    /// The remote.
    pub remote: String,
    /// Whether a conversation is open.
    pub connected: bool,
    /// Local changes not yet acknowledged by the remote (an upper bound:
    /// changes this device did not sign are skipped when reached).
    pub pending_up: u64,
    /// Remote log entries not yet pulled (an upper bound).
    pub pending_down: u64,
    /// Envelopes held pending (unknown epoch key or signer).
    pub parked: u64,
    /// Entries pushed and acknowledged since the session started.
    pub pushed: u64,
    /// Remote writes applied since the session started.
    pub pulled: u64,
    /// Envelopes refused (tampered, malformed) since the session started.
    pub refused: u64,
    /// The last error, for people; cleared by a successful `Hello`.
    pub last_error: Option<String>,
}

/// What one `sync_now` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries pushed and acknowledged.
    pub pushed: u64,
    /// Remote writes applied.
    pub pulled: u64,
    /// Envelopes refused.
    pub refused: u64,
    /// Envelopes held pending afterwards.
    pub parked: u64,
}

/// Why `sync_now` did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The remote could not be reached or dropped the conversation.
    #[error("cannot reach {remote}: {detail}")]
    Unreachable {
        /// The remote.
        remote: String,
        /// Why.
        detail: String,
    },
    /// The remote refused this store or device.
    #[error("{remote} refused the connection ({code:?}): {text}")]
    Refused {
        /// The remote.
        remote: String,
        /// Its code.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
    /// Applying pulled envelopes failed locally.
    #[error("applying synced records failed: {0}")]
    Storage(String),
}

/// Messages to the PeerSession.
pub enum PeerMsg {
    /// Push everything local and pull everything remote, once; answered
    /// when both are done (or failed).
    SyncNow(RpcReplyPort<Result<SyncReport, SyncError>>),
    /// (Re)connect now.
    Connect,
    /// A connection attempt ended.
    Handshaken(Box<Result<Handshake, SyncError>>),
    /// A frame arrived on connection `generation`.
    Received {
        /// Which connection.
        generation: u64,
        /// The message.
        msg: Message,
    },
    /// Connection `generation` ended.
    Closed {
        /// Which connection.
        generation: u64,
        /// Why, for people.
        error: String,
    },
    /// The StorageWriter committed local changes.
    LocalChange,
}

/// An open conversation whose `Hello` the remote welcomed.
pub struct Handshake {
    send: SendHalf,
    recv: RecvHalf,
    guard: Box<dyn Send + Sync>,
    welcome: Welcome,
    /// The credential the remote admitted.
    access: AccessKey,
}

/// The PeerSession actor.
pub struct PeerSession;

struct Conn {
    send: SendHalf,
    generation: u64,
    _guard: Box<dyn Send + Sync>,
    reader: tokio::task::JoinHandle<()>,
    /// The credential the remote admitted this connection with.
    access: AccessKey,
    /// Frames this connection's reader may read ahead of the actor. Each
    /// connection has its own: a reader that ends or is aborted holding a
    /// permit takes it with it, and the next connection starts whole.
    frames: Arc<Semaphore>,
}

struct Waiter {
    push_target: u64,
    round: u64,
    start: SyncState,
    reply: RpcReplyPort<Result<SyncReport, SyncError>>,
}

/// Why a push did not go out.
enum PushError {
    /// The local change log could not be read.
    Local(String),
    /// The connection failed (or a fault point dropped it).
    Link(String),
}

/// A pulled batch handed to the StorageWriter, and the cursor it moves to.
struct Committing {
    submitted: Submitted,
    cursor: u64,
}

/// The PeerSession's state.
pub struct SessionState {
    args: SessionArgs,
    rng: RngStream,
    conn: Option<Conn>,
    generation: u64,
    attempts: u32,
    reconnect_scheduled: bool,
    /// Whether the last connection ended because the relay's credential
    /// changed under it and a new one was started at once; cleared by a
    /// completed round. A second such end before that waits its backoff.
    credential_retried: bool,
    push_cursor: u64,
    /// Pushes sent and not yet acknowledged, oldest first: (id, the change
    /// sequence number it reaches).
    push_inflight: VecDeque<(u64, u64)>,
    next_push_id: u64,
    /// The cursor of the last pulled batch that is durable.
    pull_cursor: u64,
    pull_inflight: bool,
    /// The pulled batch the StorageWriter is committing, if any.
    committing: Option<Committing>,
    remote_head: u64,
    /// Pull rounds started and completed (a round ends with `more: false`).
    rounds_started: u64,
    rounds_done: u64,
    waiters: Vec<Waiter>,
    /// Members and epochs known when pending envelopes were last retried,
    /// and the wall-clock time then.
    retried_with: (usize, usize),
    retried_at_ms: u64,
    /// Concurrent rotations' keys held when this session last looked (see
    /// [`SessionState::retry_pending`]).
    concurrent_keys: usize,
    forwarder: Option<tokio::task::JoinHandle<()>>,
    /// The connection attempt in progress, if any.
    connecting: Option<tokio::task::JoinHandle<()>>,
}

impl Actor for PeerSession {
    type Msg = PeerMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SessionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (push_cursor, pull_cursor) = match load_cursors(&args)? {
            Some(cursors) => cursors,
            None => {
                // Another remote (or the first): its cursors start over.
                forget_cursors(&args).await?;
                (0, 0)
            }
        };
        let rng = args.entropy.stream("peer-session");
        let mut local = args.committed.subscribe();
        let me = myself.clone();
        // Turns the writer's commits into pushes; ends with the store.
        let forwarder = tokio::spawn(async move {
            while local.changed().await.is_ok() {
                if me.cast(PeerMsg::LocalChange).is_err() {
                    break;
                }
            }
        });
        args.status.send_modify(|s| {
            *s = SyncState {
                remote: args.connector.remote(),
                ..SyncState::default()
            }
        });
        myself.cast(PeerMsg::Connect)?;
        let concurrent_keys = args.keys.current().concurrent_key_count();
        Ok(SessionState {
            args,
            rng,
            conn: None,
            generation: 0,
            attempts: 0,
            reconnect_scheduled: false,
            credential_retried: false,
            push_cursor,
            push_inflight: VecDeque::new(),
            next_push_id: 1,
            pull_cursor,
            pull_inflight: false,
            committing: None,
            remote_head: 0,
            rounds_started: 0,
            rounds_done: 0,
            waiters: Vec::new(),
            retried_with: (0, 0),
            retried_at_ms: 0,
            concurrent_keys,
            forwarder: Some(forwarder),
            connecting: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PeerMsg::Connect => {
                state.reconnect_scheduled = false;
                state.start_connect(&myself);
            }
            PeerMsg::Handshaken(outcome) => {
                state.connecting = None;
                state.connected(&myself, *outcome).await;
            }
            PeerMsg::SyncNow(reply) => {
                let target = *state.args.committed.borrow();
                let waiter = Waiter {
                    push_target: target,
                    // The round after any in flight: it starts after now.
                    round: state.rounds_started + 1,
                    start: state.args.status.borrow().clone(),
                    reply,
                };
                state.waiters.push(waiter);
                if state.conn.is_none() {
                    // Joins the attempt in progress, or starts one now.
                    state.start_connect(&myself);
                } else if let Err(error) = state.pump().await {
                    state.disconnect(&myself, error);
                }
            }
            PeerMsg::Received { generation, msg } => {
                let current = match state.conn.as_ref() {
                    Some(conn) if conn.generation == generation => {
                        conn.frames.add_permits(1);
                        true
                    }
                    _ => false,
                };
                match msg {
                    // A frame of a connection that already ended.
                    _ if !current => {}
                    Message::Error {
                        code: ErrorCode::Unauthorized,
                        text,
                    } => state.credential_changed(&myself, text),
                    msg => {
                        if let Err(error) = state.on_message(msg).await {
                            state.disconnect(&myself, error);
                        }
                    }
                }
            }
            PeerMsg::Closed { generation, error } => {
                if state
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.generation == generation)
                {
                    state.disconnect(&myself, error);
                }
            }
            PeerMsg::LocalChange => {
                state.publish();
                if state.conn.is_some()
                    && let Err(error) = state.pump().await
                {
                    state.disconnect(&myself, error);
                }
            }
        }
        state.answer_waiters();
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(conn) = state.conn.take() {
            conn.reader.abort();
        }
        if let Some(forwarder) = state.forwarder.take() {
            forwarder.abort();
        }
        if let Some(attempt) = state.connecting.take() {
            attempt.abort();
        }
        let remote = state.args.connector.remote();
        for w in state.waiters.drain(..) {
            let _ = w.reply.send(Err(SyncError::Unreachable {
                remote: remote.clone(),
                detail: "the store is closing".into(),
            }));
        }
        state.args.status.send_modify(|s| s.connected = false);
        Ok(())
    }
}

impl SessionState {
    /// Starts a connection attempt unless one is running or a connection
    /// is open. The attempt runs beside the actor, so `SyncNow` and a
    /// shutdown are never stuck behind a slow or unreachable remote.
    fn start_connect(&mut self, myself: &ActorRef<PeerMsg>) {
        if self.conn.is_some() || self.connecting.is_some() {
            return;
        }
        let connector = self.args.connector.clone();
        let keys = self.args.keys.current();
        let (access, next) = (keys.access.clone(), keys.access_next.clone());
        let (store, device) = (self.args.store_id, self.args.device_id);
        let admission = self.args.admission.clone();
        let hello = move |access| {
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                store,
                access,
                device,
                admission: admission.clone(),
            })
        };
        let routes = self.args.routes.clone();
        let faults = self.args.faults.clone();
        let me = myself.clone();
        self.connecting = Some(tokio::spawn(async move {
            let outcome = match access {
                Some(access) => {
                    connect(connector.as_ref(), hello, access, next, &routes, &faults).await
                }
                None => Err(SyncError::Refused {
                    remote: connector.remote(),
                    code: ErrorCode::Unauthorized,
                    text: "this store does not encrypt, so it has no relay credential".into(),
                }),
            };
            let _ = me.cast(PeerMsg::Handshaken(Box::new(outcome)));
        }));
    }

    /// Takes over a welcomed conversation, or fails the waiters and
    /// schedules another attempt.
    async fn connected(
        &mut self,
        myself: &ActorRef<PeerMsg>,
        outcome: Result<Handshake, SyncError>,
    ) {
        match outcome {
            Ok(Handshake {
                send,
                recv,
                guard,
                welcome,
                access,
            }) => {
                self.generation += 1;
                let generation = self.generation;
                self.remote_head = welcome.head;
                self.push_inflight.clear();
                self.pull_inflight = false;
                let frames = Arc::new(Semaphore::new(FRAMES_QUEUED_MAX));
                let reader = spawn_reader(recv, generation, frames.clone(), myself.clone());
                self.conn = Some(Conn {
                    send,
                    generation,
                    _guard: guard,
                    reader,
                    access,
                    frames,
                });
                tracing::info!(remote = %self.args.connector.remote(), head = welcome.head,
                    created = welcome.created, "sync: connected");
                self.attempts = 0;
                self.args.status.send_modify(|s| {
                    s.connected = true;
                    s.last_error = None;
                });
                // A batch of the last connection may still be committing:
                // the next pull starts from its cursor if it commits.
                if let Err(error) = self.settle().await {
                    self.disconnect(myself, error);
                    return;
                }
                if let Err(error) = self.pump().await {
                    self.disconnect(myself, error);
                }
            }
            Err(error) => {
                tracing::info!(remote = %self.args.connector.remote(), %error, "sync: not connected");
                self.fail_waiters(&error);
                self.args.status.send_modify(|s| {
                    s.connected = false;
                    s.last_error = Some(error.to_string());
                });
                self.schedule_reconnect(myself);
            }
        }
    }

    fn disconnect(&mut self, myself: &ActorRef<PeerMsg>, error: impl std::fmt::Display) {
        let error = error.to_string();
        self.drop_conn(&error);
        self.fail_waiters(&SyncError::Unreachable {
            remote: self.args.connector.remote(),
            detail: error,
        });
        self.schedule_reconnect(myself);
    }

    /// The relay stopped honouring the credential this connection was
    /// admitted with: a revocation switched the store to a new one. When
    /// this device holds another credential (it switched meanwhile, or
    /// holds the revocation's pending one), it reconnects at once and the
    /// waiting `SyncNow` calls carry over; otherwise it was revoked, or
    /// someone else changed the credential, and they fail as refused.
    fn credential_changed(&mut self, myself: &ActorRef<PeerMsg>, text: String) {
        let admitted = self.conn.as_ref().map(|c| c.access.clone());
        let keys = self.args.keys.current();
        let another = keys.access_next.is_some() || keys.access != admitted;
        self.drop_conn(&text);
        if another && !self.credential_retried {
            self.credential_retried = true;
            tracing::info!(remote = %self.args.connector.remote(),
                "sync: the relay switched this store's access credential; reconnecting");
            self.start_connect(myself);
            return;
        }
        self.fail_waiters(&SyncError::Refused {
            remote: self.args.connector.remote(),
            code: ErrorCode::Unauthorized,
            text,
        });
        self.schedule_reconnect(myself);
    }

    /// Closes the connection, if any, and says why in the status.
    fn drop_conn(&mut self, error: &str) {
        if let Some(conn) = self.conn.take() {
            conn.reader.abort();
        }
        tracing::info!(remote = %self.args.connector.remote(), %error, "sync: disconnected");
        self.push_inflight.clear();
        self.pull_inflight = false;
        // A round in flight is lost with the connection; the next one
        // starts over, so that waiters carried over get a whole round.
        self.rounds_started = self.rounds_done;
        self.args.status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(error.to_owned());
        });
    }

    fn schedule_reconnect(&mut self, myself: &ActorRef<PeerMsg>) {
        if self.reconnect_scheduled {
            return;
        }
        self.reconnect_scheduled = true;
        let mut delay = backoff(self.attempts, &mut self.rng);
        if let Some(extra) = self
            .args
            .faults
            .delay(FaultPoint::ReconnectDelay, RECONNECT_DELAY_MAX)
        {
            delay += extra;
        }
        self.attempts = self.attempts.saturating_add(1);
        myself.send_after(delay, || PeerMsg::Connect);
    }

    /// Starts a push and a pull if there is something to do and none is in
    /// flight. A push that cannot be sent ends the connection; one that
    /// cannot be read from the local database is tried again on the next
    /// pump (the connection is fine).
    async fn pump(&mut self) -> Result<(), String> {
        match self.start_push().await {
            Ok(()) => {}
            Err(PushError::Local(error)) => {
                tracing::warn!(%error, "sync: could not read local changes to push");
            }
            Err(PushError::Link(error)) => {
                self.publish();
                return Err(format!("push failed: {error}"));
            }
        }
        let want_round = self.waiters.iter().any(|w| w.round > self.rounds_started)
            || self.pull_cursor < self.remote_head
            || self.rounds_started == 0;
        // While a batch commits, its next page is already asked for (or
        // the connection broke): the cursor to pull from is not known yet.
        if !self.pull_inflight && self.committing.is_none() && want_round {
            self.rounds_started += 1;
            self.send_pull(self.pull_cursor).await;
        }
        self.publish();
        Ok(())
    }

    /// Asks for the page after `since`.
    async fn send_pull(&mut self, since: u64) {
        if let Some(conn) = self.conn.as_mut() {
            let msg = Message::Pull {
                since,
                limit: ENTRIES_PER_MESSAGE_MAX as u32,
            };
            if conn.send.send(&msg).await.is_ok() {
                self.pull_inflight = true;
            }
        }
    }

    /// Sends pushes until [`PUSHES_INFLIGHT_MAX`] are unacknowledged or
    /// the change log is all sent.
    async fn start_push(&mut self) -> Result<(), PushError> {
        while self.push_inflight.len() < PUSHES_INFLIGHT_MAX && self.conn.is_some() {
            let after = self.push_sent();
            let (entries, upto) = self.next_push(after).map_err(PushError::Local)?;
            if upto == after {
                return Ok(());
            }
            if entries.is_empty() {
                if !self.push_inflight.is_empty() {
                    // The cursor cannot pass unacknowledged pushes: look
                    // again once they are.
                    return Ok(());
                }
                // Only changes this device did not sign (what it pulled):
                // nothing to send. The cursor is made durable with the next
                // commit that carries it; until then a restart only scans
                // these changes again.
                self.push_cursor = upto;
                continue;
            }
            let id = self.next_push_id;
            self.next_push_id += 1;
            let Some(conn) = self.conn.as_mut() else {
                return Ok(());
            };
            conn.send
                .send(&Message::Push { id, entries })
                .await
                .map_err(|e| PushError::Link(e.to_string()))?;
            self.push_inflight.push_back((id, upto));
            if self.args.faults.fire(FaultPoint::PushDrop) {
                return Err(PushError::Link(format!(
                    "{INJECTED_FAULT}: the connection dropped after push {id} was sent"
                )));
            }
        }
        Ok(())
    }

    /// The change sequence number the pushes sent so far reach.
    fn push_sent(&self) -> u64 {
        self.push_inflight
            .back()
            .map_or(self.push_cursor, |&(_, upto)| upto)
    }

    /// The next push: entries signed by this device among the changes after
    /// `after`, and the change sequence number they reach.
    fn next_push(&self, after: u64) -> Result<(Vec<PushEntry>, u64), String> {
        let db = self.args.db.clone();
        let me = self.args.device_id;
        run_blocking(move || {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            let changes = txn
                .changes_since(after, ENTRIES_PER_MESSAGE_MAX)
                .map_err(|e| e.to_string())?;
            let mut entries: Vec<PushEntry> = Vec::new();
            let mut upto = after;
            let mut bytes = 0usize;
            for (seq, locator) in changes {
                if bytes >= MESSAGE_PAYLOAD_BYTES_TARGET {
                    break;
                }
                upto = seq;
                if entries.iter().any(|e| e.locator == locator) {
                    continue;
                }
                let row = match txn.record(&locator) {
                    Ok(Some(row)) => row,
                    // Removed since (a purge), or damaged: nothing to send.
                    Ok(None) | Err(_) => continue,
                };
                let signed_here = Envelope::parse(&row.envelope)
                    .map(|e| e.header.signer == me)
                    .unwrap_or(false);
                if signed_here {
                    bytes += row.envelope.len();
                    entries.push(PushEntry {
                        locator,
                        envelope: row.envelope,
                    });
                }
            }
            Ok((entries, upto))
        })
    }

    /// Handles one message on the open connection; an error ends it.
    async fn on_message(&mut self, msg: Message) -> Result<(), String> {
        match msg {
            Message::PushAck {
                id,
                accepted,
                stale,
                head,
            } => {
                let Some(&(inflight, upto)) = self.push_inflight.front() else {
                    return Err("unexpected PushAck".into());
                };
                // The pull cursor below must be the durable one.
                self.settle().await?;
                if inflight != id {
                    return Err(format!("PushAck for push {id}, expected {inflight}"));
                }
                self.push_inflight.pop_front();
                // If the remote's log grew by exactly what it accepted of
                // this push since this device's last pull, the new entries
                // are all this device's own: it holds them, so its pull
                // cursor moves past them instead of pulling them back.
                let mut meta = vec![(meta::SYNC_PUSH_CURSOR, Some(upto.to_be_bytes().to_vec()))];
                let own_only = !self.pull_inflight
                    && self.pull_cursor == self.remote_head
                    && head == self.pull_cursor.saturating_add(u64::from(accepted));
                if own_only {
                    meta.push((meta::SYNC_PULL_CURSOR, Some(head.to_be_bytes().to_vec())));
                }
                let routes = self.args.routes.clone();
                commit_meta(&routes, meta).await?;
                self.push_cursor = upto;
                if own_only {
                    self.pull_cursor = head;
                }
                self.remote_head = self.remote_head.max(head);
                let acked = u64::from(accepted) + u64::from(stale);
                self.args.status.send_modify(|s| s.pushed += acked);
                self.pump().await?;
            }
            Message::Batch {
                entries,
                cursor,
                more,
            } => {
                if !self.pull_inflight {
                    return Err("unexpected Batch".into());
                }
                self.pull_inflight = false;
                if more {
                    // The remote reads and sends the next page while this
                    // one is checked and committed.
                    self.send_pull(cursor).await;
                }
                self.apply_batch(entries, cursor).await?;
                if !more {
                    self.settle().await?;
                    self.rounds_done = self.rounds_started;
                    self.credential_retried = false;
                    self.remote_head = self.remote_head.max(cursor);
                    self.retry_pending().await?;
                    self.pump().await?;
                }
            }
            Message::Notify { head } => {
                self.remote_head = self.remote_head.max(head);
                self.settle().await?;
                self.pump().await?;
            }
            Message::Error { code, text } => {
                return Err(format!("remote error {code:?}: {text}"));
            }
            other => return Err(format!("unexpected {} from the remote", other.kind())),
        }
        self.publish();
        Ok(())
    }

    /// Checks one pulled batch, waits for the batch before it to commit,
    /// and hands this one to the StorageWriter with the new cursor; see
    /// [`SessionState::settle`].
    async fn apply_batch(&mut self, entries: Vec<LogEntry>, cursor: u64) -> Result<(), String> {
        let taken = self
            .committing
            .as_ref()
            .map_or(self.pull_cursor, |c| c.cursor);
        if entries.iter().any(|e| e.seq <= taken) || cursor < taken {
            return Err("the remote sent entries behind the cursor".into());
        }
        let db = self.args.db.clone();
        let held = run_blocking(|| db.begin_read().and_then(|t| t.pending_count()))
            .map_err(|e| e.to_string())?;
        if held >= PENDING_HELD_MAX {
            return Err(format!(
                "{held} envelopes are held for keys or members this device lacks; \
                 not pulling more until they arrive (import a fresh key export)"
            ));
        }
        let db = self.args.db.clone();
        let me = self.args.device_id;
        // The remote's log holds this device's own pushes too: skip those it
        // still holds as they are (no signature check or decryption for an
        // echo), but ingest any it lost, e.g. after restoring a backup.
        let batch = run_blocking(|| {
            let txn = db.begin_read()?;
            let mut batch = Vec::with_capacity(entries.len());
            for e in entries {
                let echo = match Envelope::parse(&e.envelope) {
                    Ok(env) if env.header.signer == me => {
                        let held = txn.record(&e.locator).ok().flatten();
                        held.and_then(|row| Envelope::parse(&row.envelope).ok().map(|r| r.header))
                            .is_some_and(|h| h.precedence() >= env.header.precedence())
                    }
                    _ => false,
                };
                if !echo {
                    batch.push(Incoming {
                        locator: e.locator,
                        envelope: e.envelope,
                        from_pending: false,
                    });
                }
            }
            Ok::<_, persist_storage::StorageError>(batch)
        })
        .map_err(|e| e.to_string())?;
        let meta = vec![
            (meta::SYNC_PULL_CURSOR, Some(cursor.to_be_bytes().to_vec())),
            (
                meta::SYNC_PUSH_CURSOR,
                Some(self.push_cursor.to_be_bytes().to_vec()),
            ),
        ];
        let ctx = self.ingest_context();
        let prepared = ingest::prepare(&ctx, batch).await?;
        // Only after the batch before is durable: had its commit failed,
        // this one's cursor would cover entries never applied.
        self.settle().await?;
        let submitted = ingest::submit(&ctx, prepared, meta)?;
        self.committing = Some(Committing { submitted, cursor });
        Ok(())
    }

    /// Waits for the pulled batch being committed, if any, and moves the
    /// pull cursor to it.
    async fn settle(&mut self) -> Result<(), String> {
        let Some(Committing { submitted, cursor }) = self.committing.take() else {
            return Ok(());
        };
        let outcome = submitted.finish(&self.ingest_context()).await?;
        self.pull_cursor = cursor;
        self.args.status.send_modify(|s| {
            s.pulled += outcome.applied;
            s.refused += outcome.refused;
        });
        Ok(())
    }

    fn ingest_context(&self) -> IngestContext {
        IngestContext {
            db: self.args.db.clone(),
            keys: self.args.keys.clone(),
            routes: self.args.routes.clone(),
            clock: self.args.clock.clone(),
            max_drift_ms: self.args.max_drift_ms,
            on_applied: self.args.on_applied.clone(),
        }
    }

    /// Plans and commits `batch` with `meta`, then tells the Sealer, the
    /// KeyManager and the watchers what it learned.
    async fn ingest(
        &mut self,
        batch: Vec<Incoming>,
        meta: Vec<(&'static str, Option<Vec<u8>>)>,
    ) -> Result<(), String> {
        let ctx = self.ingest_context();
        let outcome = ingest::apply(&ctx, batch, meta).await?;
        self.args.status.send_modify(|s| {
            s.pulled += outcome.applied;
            s.refused += outcome.refused;
        });
        Ok(())
    }

    /// Re-examines pending envelopes if keys or members changed since the
    /// last look, or [`PENDING_RETRY_INTERVAL_MS`] passed.
    ///
    /// A concurrent rotation's key that arrived since the last look also
    /// starts the log over: an envelope from a signer this device did not
    /// know yet that no key held here opened was refused, and may be under
    /// that key. A new member's announcement sealed under its own
    /// concurrent key is one, and without it this device would never learn
    /// the member (simulation seed 56, a late joiner rotating at the same
    /// time as another member).
    async fn retry_pending(&mut self) -> Result<(), String> {
        let keys = self.args.keys.current();
        let concurrent = keys.concurrent_key_count();
        if concurrent > self.concurrent_keys && self.committing.is_none() && !self.pull_inflight {
            self.concurrent_keys = concurrent;
            if self.pull_cursor > 0 {
                tracing::info!(
                    from = self.pull_cursor,
                    "sync: a concurrent rotation's key arrived; pulling the whole log again \
                     for envelopes no key here opened before"
                );
                self.pull_cursor = 0;
            }
        }
        let known = (keys.members.len(), keys.key_count());
        let now = self.args.clock.now_ms();
        let due = now >= self.retried_at_ms.saturating_add(PENDING_RETRY_INTERVAL_MS);
        if known == self.retried_with && !due {
            return Ok(());
        }
        let mut after = None;
        loop {
            let db = self.args.db.clone();
            let page = run_blocking(|| {
                db.begin_read()
                    .and_then(|t| t.pending_page(after.as_ref(), PENDING_RETRY_PAGE))
            })
            .map_err(|e| e.to_string())?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.held);
            let full = page.len() == PENDING_RETRY_PAGE;
            let batch = page
                .into_iter()
                .map(|p| Incoming {
                    locator: p.held.locator,
                    envelope: p.envelope,
                    from_pending: true,
                })
                .collect();
            // A failed ingest leaves the marks as they were: the next
            // round retries, not the one after the interval.
            self.ingest(batch, Vec::new()).await?;
            if !full {
                break;
            }
        }
        self.retried_with = known;
        self.retried_at_ms = now;
        Ok(())
    }

    fn publish(&self) {
        let committed = *self.args.committed.borrow();
        let pending_up = committed.saturating_sub(self.push_cursor);
        let pending_down = self.remote_head.saturating_sub(self.pull_cursor);
        let db = self.args.db.clone();
        let parked = db
            .begin_read()
            .and_then(|t| t.pending_count())
            .unwrap_or_default();
        self.args.status.send_modify(|s| {
            s.pending_up = pending_up;
            s.pending_down = pending_down;
            s.parked = parked;
        });
    }

    fn answer_waiters(&mut self) {
        if self.conn.is_none() {
            return;
        }
        let push_idle = self.push_inflight.is_empty();
        let now = self.args.status.borrow().clone();
        let (done, waiting): (Vec<_>, Vec<_>) = self.waiters.drain(..).partition(|w| {
            push_idle && self.push_cursor >= w.push_target && self.rounds_done >= w.round
        });
        self.waiters = waiting;
        for w in done {
            let _ = w.reply.send(Ok(SyncReport {
                pushed: now.pushed - w.start.pushed,
                pulled: now.pulled - w.start.pulled,
                refused: now.refused - w.start.refused,
                parked: now.parked,
            }));
        }
    }

    fn fail_waiters(&mut self, error: &SyncError) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(error.clone()));
        }
    }
}

/// Commits meta entries through the StorageWriter, as background work.
async fn commit_meta(
    routes: &Routes,
    meta: Vec<(&'static str, Option<Vec<u8>>)>,
) -> Result<(), String> {
    let writer = routes.writer().ok_or("the store is closing")?;
    let outcome = writer
        .call(
            |reply| WriterMsg::Commit {
                writes: Vec::new(),
                marks: Marks::default(),
                meta,
                priority: Priority::Background,
                reply,
            },
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    match outcome {
        CallResult::Success(r) => r.map(|_| ()).map_err(|e| e.to_string()),
        _ => Err("the store is closing".into()),
    }
}

/// How long a connection attempt waits for the KeyManager to promote the
/// relay token the remote took.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes with `access`; when the remote refuses it and `next` is
/// pending, with `next`, which the KeyManager then makes current (the
/// relay was switched to it). A refusal of both reports the first.
async fn connect(
    connector: &dyn Connector,
    hello: impl Fn(AccessKey) -> Message,
    access: AccessKey,
    next: Option<AccessKey>,
    routes: &Routes,
    faults: &Faults,
) -> Result<Handshake, SyncError> {
    let refused = match handshake(connector, &hello, access, faults).await {
        Err(
            refused @ SyncError::Refused {
                code: ErrorCode::Unauthorized,
                ..
            },
        ) => refused,
        other => return other,
    };
    let Some(next) = next else {
        return Err(refused);
    };
    let handshake = match handshake(connector, &hello, next.clone(), faults).await {
        Ok(handshake) => handshake,
        Err(SyncError::Refused {
            code: ErrorCode::Unauthorized,
            ..
        }) => return Err(refused),
        Err(other) => return Err(other),
    };
    tracing::info!(remote = %connector.remote(), "sync: the relay was switched to the store's new access token");
    if let Some(km) = routes.key_manager() {
        let promoted = km
            .call(
                |reply| KeyManagerMsg::PromoteAccess {
                    access: next,
                    reply,
                },
                Some(PROMOTE_TIMEOUT),
            )
            .await;
        if !matches!(promoted, Ok(CallResult::Success(Ok(_)))) {
            // The next connection tries the old token first again, then
            // this one: nothing is lost but a round trip.
            tracing::warn!("could not record the relay's new access token yet");
        }
    }
    Ok(handshake)
}

/// Opens a conversation, says `hello` and waits for the `Welcome`, then
/// subscribes to the remote's head.
async fn handshake(
    connector: &dyn Connector,
    hello: impl Fn(AccessKey) -> Message,
    access: AccessKey,
    faults: &Faults,
) -> Result<Handshake, SyncError> {
    let remote = connector.remote();
    let unreachable = |detail: String| SyncError::Unreachable {
        remote: remote.clone(),
        detail,
    };
    let Link {
        mut send,
        mut recv,
        guard,
    } = connector.connect().await.map_err(unreachable)?;
    send.send(&hello(access.clone()))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if faults.fire(FaultPoint::HandshakeDrop) {
        return Err(unreachable(format!(
            "{INJECTED_FAULT}: the connection dropped after Hello was sent"
        )));
    }
    let answer = tokio::time::timeout(HELLO_TIMEOUT, recv.recv())
        .await
        .map_err(|_| unreachable("no answer to Hello".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let welcome = match answer {
        Some(Message::Welcome(w)) => w,
        Some(Message::Error { code, text }) => {
            return Err(SyncError::Refused { remote, code, text });
        }
        Some(other) => {
            return Err(unreachable(format!(
                "expected Welcome, got {}",
                other.kind()
            )));
        }
        None => return Err(unreachable("closed before answering Hello".into())),
    };
    send.send(&Message::Subscribe)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(Handshake {
        send,
        recv,
        guard,
        welcome,
        access,
    })
}

/// Reads frames into the actor's mailbox, at most [`FRAMES_QUEUED_MAX`]
/// ahead of it.
fn spawn_reader(
    mut recv: RecvHalf,
    generation: u64,
    frames: Arc<Semaphore>,
    actor: ActorRef<PeerMsg>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // The semaphore is never closed; a permit is returned by the
            // actor when it has handled the frame.
            let Ok(permit) = frames.acquire().await else {
                return;
            };
            permit.forget();
            let msg = match recv.recv().await {
                Ok(Some(msg)) => PeerMsg::Received { generation, msg },
                Ok(None) => PeerMsg::Closed {
                    generation,
                    error: "the remote closed the connection".into(),
                },
                Err(e) => PeerMsg::Closed {
                    generation,
                    error: e.to_string(),
                },
            };
            let last = matches!(msg, PeerMsg::Closed { .. });
            if actor.cast(msg).is_err() || last {
                return;
            }
        }
    })
}

/// The delay before reconnect attempt `attempt`: exponential from
/// [`RECONNECT_DELAY_MIN`] to [`RECONNECT_DELAY_MAX`], then scaled by a
/// random factor in [0.5, 1) so that devices cut off together do not
/// return together.
fn backoff(attempt: u32, rng: &mut RngStream) -> Duration {
    let base = RECONNECT_DELAY_MIN
        .saturating_mul(1u32 << attempt.min(16))
        .min(RECONNECT_DELAY_MAX);
    let jitter = 0.5 + (rng.next_u32() as f64 / u32::MAX as f64) / 2.0;
    base.mul_f64(jitter.min(0.999_999))
}

/// The (push, pull) cursors kept for this session's remote, or `None` if
/// the stored ones belong to another remote (or there are none).
fn load_cursors(args: &SessionArgs) -> Result<Option<(u64, u64)>, ActorProcessingErr> {
    let txn = args.db.begin_read()?;
    let remote = args.connector.remote();
    let same_remote = txn.meta(meta::SYNC_REMOTE)?.as_deref() == Some(remote.as_bytes());
    if !same_remote {
        return Ok(None);
    }
    let read = |key| -> Result<u64, ActorProcessingErr> {
        Ok(txn
            .meta(key)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    };
    Ok(Some((
        read(meta::SYNC_PUSH_CURSOR)?,
        read(meta::SYNC_PULL_CURSOR)?,
    )))
}

/// Records this session's remote with zeroed cursors.
async fn forget_cursors(args: &SessionArgs) -> Result<(), ActorProcessingErr> {
    let writer = args.routes.writer().ok_or("the store is closing")?;
    let meta = vec![
        (
            meta::SYNC_REMOTE,
            Some(args.connector.remote().into_bytes()),
        ),
        (meta::SYNC_PUSH_CURSOR, None),
        (meta::SYNC_PULL_CURSOR, None),
    ];
    let outcome = writer
        .call(
            |reply| WriterMsg::Commit {
                writes: Vec::new(),
                marks: Marks::default(),
                meta,
                priority: Priority::Background,
                reply,
            },
            None,
        )
        .await?;
    match outcome {
        CallResult::Success(r) => Ok(r.map(|_| ())?),
        _ => Err("the store is closing".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use persist_core::env::SeededEntropy;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut rng = SeededEntropy::from_u64(1).stream("t");
        let first = backoff(0, &mut rng);
        assert!(first >= RECONNECT_DELAY_MIN / 2 && first < RECONNECT_DELAY_MIN);
        let late = backoff(40, &mut rng);
        assert!(late >= RECONNECT_DELAY_MAX / 2 && late < RECONNECT_DELAY_MAX);
        let mut again = SeededEntropy::from_u64(1).stream("t");
        assert_eq!(backoff(0, &mut again), first, "jitter comes from the seed");
    }
}
