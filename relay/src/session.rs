//! One `persist/1` conversation, served from a [`RelayBackend`].
//!
//! [`serve`] runs the server side of one conversation on a
//! ([`SendHalf`], [`RecvHalf`]) pair, whatever carries it (a QUIC stream,
//! an in-memory pipe), over any backend: the relay's database, or a
//! device's own change log when a device serves its store (`persist
//! serve`). It never decrypts: it reads each pushed envelope's clear header
//! ([`Envelope::parse`]) for its precedence, and nothing else.
//!
//! # Conversation
//!
//! 1. The first frame is read raw and its version peeked
//!    ([`peek_hello_version`]): a version other than [`PROTOCOL_VERSION`]
//!    is answered `Error{VersionMismatch}` naming both versions, a first
//!    frame that is not a `Hello` with `Error{Protocol}`.
//! 2. The `Hello` opens the store by the credential's fingerprint; it may
//!    create the store when [`Admission`] allows. `Welcome`, or the
//!    backend's refusal (`Unauthorized` says nothing else about the store).
//! 3. Then, one request at a time: `Push` → `PushAck`, `Pull` → `Batch`,
//!    `Subscribe` (then `Notify` whenever the head passes what the client
//!    was last told), mailbox put / fetch / ack, `Rekey` → `Rekeyed`.
//!
//! # Credential changes
//!
//! `Rekey{access}` swaps the store's fingerprint from the one this session
//! was admitted with to `access`'s ([`RelayBackend::rekey`], a
//! compare-and-swap); the session goes on under the new one. Every other
//! session of the store holding the old one must stop: each session
//! subscribes to [`RelayBackend::access_changes`] before its `Hello` is
//! checked, and once that channel moves, it re-checks its credential
//! ([`RelayBackend::open_store`] without creating) before it answers its
//! next request or sends its next `Notify`. A credential that no longer
//! opens the store gets `Error{Unauthorized}` and the session ends. So the
//! cost is one read per session per rekey, and nothing per request. On
//! this node the channel moves before the rekey's `Rekeyed` is sent; on
//! other PostgreSQL nodes when the rekey's NOTIFY arrives (see
//! `PostgresRelay`'s docs for that window). If the re-check cannot be made
//! (storage down), a request is answered `Unavailable` and a `Notify` is
//! held back, until a re-check succeeds.
//!
//! # Failure
//!
//! Anything the peer gets wrong (an undecodable or oversize frame, a
//! message out of place, an envelope that does not parse) is answered with
//! one `Error` and ends the session with [`SessionEnd::Refused`]: the
//! caller closes that connection only. A retryable backend failure
//! (`Unavailable`, `MailboxFull`) is answered with an `Error` and the
//! session goes on. No peer byte can make it panic.
//!
//! # Invariants
//! - At most one request is being handled at a time, so a session holds at
//!   most one frame and one backend page in memory.
//! - A frame is never half-read when the session waits for something else:
//!   the pending read survives across the select loop (`Reader`).
//! - `Notify{head}` is sent only for `head` above every head the client was
//!   told (Welcome, PushAck, Notify), so a client is never told of its own
//!   push twice, and heads it hears only grow.
//! - No request is answered, and no `Notify` sent, while the store's
//!   credential may have changed since this session's was last checked.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use persist_core::StoreId;
use persist_core::envelope::Envelope;
use persist_core::protocol::{
    ADMISSION_BYTES_MAX, AccessKey, ENTRIES_PER_MESSAGE_MAX, ErrorCode, Hello, MAILBOX_ITEMS_MAX,
    MESSAGE_PAYLOAD_BYTES_TARGET, Message, PROTOCOL_VERSION, PushEntry, Welcome,
    peek_hello_version,
};
use persist_storage::relay::{Incoming, RelayBackend, RelayError};
use persist_transport::frame::{self, FrameError, LENGTH_PREFIX_BYTES};
use persist_transport::{RecvHalf, SendHalf};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// How long a new conversation may take to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one answer may take to reach the client (it waits for QUIC
/// flow-control credit as the client reads) before the relay drops the
/// client. An answer is at most one frame of a page of
/// [`MESSAGE_PAYLOAD_BYTES_TARGET`] bytes, which this leaves over 64 KiB/s
/// to carry; without a deadline a client that stops reading would hold its
/// page in the relay's memory for as long as keep-alives keep the
/// connection open.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the last words of a refused conversation (one `Error`, then the
/// end of the stream) may take to reach the peer before the session gives up
/// on them.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(3);

const _: () = assert!(ENTRIES_PER_MESSAGE_MAX <= u32::MAX as usize);

/// Who may create a store on this server.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Admission {
    /// Any client with a `Hello` creates the store it names.
    #[default]
    Open,
    /// Only a client that presents this secret creates a store; existing
    /// stores admit their members without it.
    Secret(AdmissionSecret),
    /// No store is ever created here (a device serving its own store).
    Never,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Admission::Open => "Admission::Open",
            Admission::Secret(_) => "Admission::Secret(..)",
            Admission::Never => "Admission::Never",
        })
    }
}

/// An operator's admission secret. Compared in constant time; zeroed on
/// drop; never printed.
#[derive(Clone)]
pub struct AdmissionSecret(zeroize::Zeroizing<String>);

/// An admission secret that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdmissionSecretError {
    /// Empty (after trimming surrounding whitespace).
    #[error("the admission secret is empty: put the secret on the file's first line")]
    Empty,
    /// Longer than a `Hello` can carry.
    #[error("the admission secret is {len} bytes; at most {max} fit in a Hello")]
    TooLong {
        /// Its length.
        len: usize,
        /// [`ADMISSION_BYTES_MAX`].
        max: usize,
    },
}

impl AdmissionSecret {
    /// The secret, with surrounding whitespace (a file's newline) removed.
    pub fn new(secret: &str) -> Result<Self, AdmissionSecretError> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(AdmissionSecretError::Empty);
        }
        if secret.len() > ADMISSION_BYTES_MAX {
            return Err(AdmissionSecretError::TooLong {
                len: secret.len(),
                max: ADMISSION_BYTES_MAX,
            });
        }
        Ok(Self(zeroize::Zeroizing::new(secret.to_owned())))
    }

    /// Whether `presented` is this secret. Both are hashed first, so the
    /// time taken does not depend on where (or whether, by length) they
    /// differ.
    pub fn matches(&self, presented: &str) -> bool {
        let ours: [u8; 32] = Sha256::digest(self.0.as_bytes()).into();
        let theirs: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(ours.ct_eq(&theirs))
    }
}

impl Admission {
    fn may_create(&self, hello: &Hello) -> bool {
        match self {
            Admission::Open => true,
            Admission::Secret(secret) => hello
                .admission
                .as_deref()
                .is_some_and(|presented| secret.matches(presented)),
            Admission::Never => false,
        }
    }
}

/// The sending side of a shutdown signal ([`shutdown_signal`]).
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl ShutdownTrigger {
    /// Tells every session holding the matching signal to say
    /// `ShuttingDown` and end.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// Tells sessions that the server is shutting down.
#[derive(Clone, Debug)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// A signal that never fires.
    pub fn never() -> Self {
        let (_trigger, signal) = shutdown_signal();
        signal
    }

    /// Resolves once shutdown is triggered. Pends forever if the trigger
    /// was dropped without firing.
    pub async fn requested(&mut self) {
        if self.0.wait_for(|down| *down).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether shutdown has been triggered.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }
}

/// A connected trigger and signal.
pub fn shutdown_signal() -> (ShutdownTrigger, ShutdownSignal) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), ShutdownSignal(rx))
}

/// What every session of a server shares.
#[derive(Clone, Debug)]
pub struct SessionContext {
    /// Who may create stores.
    pub admission: Admission,
    /// Where the session counts what it does.
    pub metrics: Arc<Metrics>,
    /// When to stop.
    pub shutdown: ShutdownSignal,
}

impl SessionContext {
    /// A context with `admission`, fresh metrics, and no shutdown.
    pub fn new(admission: Admission) -> Self {
        Self {
            admission,
            metrics: Arc::new(Metrics::default()),
            shutdown: ShutdownSignal::never(),
        }
    }
}

/// How a session ended, and so what the caller does with its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The peer ended the conversation or went away. The connection may
    /// carry other conversations.
    Finished,
    /// The session sent an `Error` with this code and ended: close the
    /// connection.
    Refused(ErrorCode),
    /// The server is shutting down; the peer was told. Close the connection.
    ShuttingDown,
    /// The peer stopped reading: an answer waited [`SEND_TIMEOUT`]. Close
    /// the connection.
    Stalled,
}

/// Serves one conversation on `tx`/`rx` from `backend` until the peer ends
/// it, breaks the protocol, or the server shuts down.
pub async fn serve<B: RelayBackend>(
    backend: &B,
    ctx: &SessionContext,
    tx: SendHalf,
    rx: RecvHalf,
) -> SessionEnd {
    let mut session = Session {
        backend,
        metrics: &ctx.metrics,
        tx,
        store: StoreId([0; 16]),
        fingerprint: [0; 32],
        told: 0,
        watch: None,
        access: None,
        recheck: false,
    };
    let mut shutdown = ctx.shutdown.clone();
    let mut reader = Reader::new(rx);

    // The Hello, bounded in time; shutdown ends the wait.
    let first = tokio::select! {
        biased;
        () = shutdown.requested() => return session.shutting_down().await,
        first = tokio::time::timeout(HELLO_TIMEOUT, reader.next()) => first,
    };
    let first = match first {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return SessionEnd::Finished,
        Ok(Err(e)) => return session.frame_failed(e).await,
        Err(_) => {
            return session
                .refuse(
                    ErrorCode::Protocol,
                    format!("no Hello within {}s", HELLO_TIMEOUT.as_secs()),
                )
                .await;
        }
    };
    if let Some(end) = session.hello(&ctx.admission, &first).await {
        return end;
    }

    loop {
        let event = tokio::select! {
            biased;
            () = shutdown.requested() => Event::Shutdown,
            moved = access_moved(&mut session.access) => Event::Access(moved),
            frame = reader.next() => Event::Frame(frame),
            head = next_head(&mut session.watch) => Event::Head(head),
        };
        let end = match event {
            Event::Shutdown => Some(session.shutting_down().await),
            Event::Access(moved) => {
                session.access_moved(moved);
                None
            }
            Event::Frame(Ok(Some(frame))) => session.request(&frame).await,
            Event::Frame(Ok(None)) => Some(SessionEnd::Finished),
            Event::Frame(Err(e)) => Some(session.frame_failed(e).await),
            Event::Head(head) => session.notify(head).await,
        };
        if let Some(end) = end {
            return end;
        }
    }
}

enum Event {
    Shutdown,
    /// The store's credential may have changed (`true`), or the backend
    /// dropped the channel (`false`).
    Access(bool),
    Frame(Result<Option<Vec<u8>>, FrameError>),
    Head(Option<u64>),
}

/// Resolves when the store's access channel moves (`true`) or closes
/// (`false`). Pends forever without one.
async fn access_moved(access: &mut Option<watch::Receiver<u64>>) -> bool {
    match access {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The next head a subscription reports; `None` once the backend dropped
/// the channel. Pends forever without a subscription.
async fn next_head(watch: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    match watch {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

type PendingRead =
    Pin<Box<dyn Future<Output = (RecvHalf, Result<Option<Vec<u8>>, FrameError>)> + Send>>;

/// A frame read that survives being raced against other events: reading
/// a frame is not cancel-safe, so the read future is kept, not dropped,
/// when another branch of the select wins.
struct Reader {
    pending: Option<PendingRead>,
    rx: Option<RecvHalf>,
}

impl Reader {
    fn new(rx: RecvHalf) -> Self {
        Self {
            pending: None,
            rx: Some(rx),
        }
    }

    /// The next raw frame. Cancel-safe: a read cut short by another select
    /// branch continues on the next call.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.pending.is_none() {
            let Some(mut rx) = self.rx.take() else {
                // A previous read's future was lost, which `next` never
                // does; report the stream as ended rather than panic.
                return Ok(None);
            };
            self.pending = Some(Box::pin(async move {
                let frame = rx.recv_frame().await;
                (rx, frame)
            }));
        }
        let Some(pending) = self.pending.as_mut() else {
            return Ok(None);
        };
        let (rx, frame) = pending.await;
        self.pending = None;
        self.rx = Some(rx);
        frame
    }
}

struct Session<'a, B> {
    backend: &'a B,
    metrics: &'a Metrics,
    tx: SendHalf,
    store: StoreId,
    /// The fingerprint of the credential this session was admitted with,
    /// or rekeyed to. Never logged.
    fingerprint: [u8; 32],
    /// The highest head the client was told of.
    told: u64,
    watch: Option<watch::Receiver<u64>>,
    /// The store's [`RelayBackend::access_changes`], from before the Hello
    /// was checked; `None` once the backend dropped it.
    access: Option<watch::Receiver<u64>>,
    /// The store's credential may have changed since `fingerprint` was last
    /// checked: check it before answering anything.
    recheck: bool,
}

/// Whether a session's credential still opens its store.
enum Access {
    Current,
    /// It does not: the store was rekeyed (or is gone).
    Revoked,
    /// The check failed; retryable.
    Unknown(RelayError),
}

impl<B: RelayBackend> Session<'_, B> {
    /// Handles the first frame. `None`: the client is welcome.
    async fn hello(&mut self, admission: &Admission, frame: &[u8]) -> Option<SessionEnd> {
        self.metrics.frame_in(frame.len());
        match peek_hello_version(frame) {
            Some(PROTOCOL_VERSION) => {}
            Some(version) => {
                let text = format!(
                    "this relay speaks persist/1 version {PROTOCOL_VERSION}, the client sent \
                     version {version}: upgrade {}",
                    if version < PROTOCOL_VERSION {
                        "the client"
                    } else {
                        "the relay"
                    }
                );
                return Some(self.refuse(ErrorCode::VersionMismatch, text).await);
            }
            None => {
                return Some(
                    self.refuse(
                        ErrorCode::Protocol,
                        "the first message of a conversation must be Hello",
                    )
                    .await,
                );
            }
        }
        let hello = match frame::decode(frame) {
            Ok(Message::Hello(hello)) => hello,
            Ok(other) => {
                let text = format!("expected Hello, got {}", other.kind());
                return Some(self.refuse(ErrorCode::Protocol, text).await);
            }
            Err(e) => return Some(self.frame_failed(e).await),
        };
        let may_create = admission.may_create(&hello);
        let fingerprint = hello.access.fingerprint();
        // Subscribed (and marked seen) before the check: a rekey that
        // commits after the check moves it, and is re-checked.
        let mut changes = self.backend.access_changes(&hello.store);
        changes.borrow_and_update();
        match self
            .backend
            .open_store(&hello.store, &fingerprint, may_create)
            .await
        {
            Ok(access) => {
                self.store = hello.store;
                self.fingerprint = fingerprint;
                self.access = Some(changes);
                self.told = access.head;
                tracing::debug!(store = %hello.store, device = %hello.device, created = access.created, "welcome");
                let welcome = Message::Welcome(Welcome {
                    version: PROTOCOL_VERSION,
                    head: access.head,
                    created: access.created,
                });
                self.send(&welcome).await
            }
            // There is no store to go on with: every refusal ends it.
            Err(e) => {
                tracing::debug!(store = %hello.store, error = %e, "hello refused");
                Some(self.refuse(e.code(), e.to_string()).await)
            }
        }
    }

    /// Handles one request after the Hello. `None`: go on.
    async fn request(&mut self, frame: &[u8]) -> Option<SessionEnd> {
        self.metrics.frame_in(frame.len());
        let message = match frame::decode(frame) {
            Ok(message) => message,
            Err(e) => return Some(self.frame_failed(e).await),
        };
        match self.check_access().await {
            Access::Current => {}
            Access::Revoked => return Some(self.revoked().await),
            Access::Unknown(e) => return self.backend_failed(e).await,
        }
        match message {
            Message::Rekey { access } => self.rekey(access).await,
            Message::Push { id, entries } => self.push(id, entries).await,
            Message::Pull { since, limit } => self.pull(since, limit).await,
            Message::Subscribe => self.subscribe().await,
            Message::MailboxPut { to, payload } => {
                let reply = self
                    .backend
                    .mailbox_put(&self.store, &to, payload)
                    .await
                    .map(|seq| Message::MailboxStored { seq });
                self.reply(reply).await
            }
            Message::MailboxFetch { mailbox, since } => {
                let reply = self
                    .backend
                    .mailbox_fetch(&self.store, &mailbox, since, MAILBOX_ITEMS_MAX)
                    .await
                    .map(|items| Message::Mailbox { items });
                self.reply(reply).await
            }
            Message::MailboxAck { mailbox, upto } => {
                let reply = self
                    .backend
                    .mailbox_ack(&self.store, &mailbox, upto)
                    .await
                    .map(|()| Message::MailboxAcked);
                self.reply(reply).await
            }
            other => {
                let text = format!("a client does not send {} after Hello", other.kind());
                Some(self.refuse(ErrorCode::Protocol, text).await)
            }
        }
    }

    async fn push(&mut self, id: u64, entries: Vec<PushEntry>) -> Option<SessionEnd> {
        let count = entries.len();
        let mut incoming = Vec::with_capacity(count);
        for (index, entry) in entries.into_iter().enumerate() {
            let precedence = match Envelope::parse(&entry.envelope) {
                Ok(envelope) => envelope.header.precedence(),
                Err(e) => {
                    let text = format!("entry {index} of push {id} is not a valid envelope: {e}");
                    return Some(self.refuse(ErrorCode::BadEnvelope, text).await);
                }
            };
            incoming.push(Incoming {
                locator: entry.locator,
                precedence,
                envelope: entry.envelope,
            });
        }
        match self.backend.append(&self.store, incoming).await {
            Ok(appended) => {
                self.metrics.envelopes_in(count);
                self.told = self.told.max(appended.head);
                let ack = Message::PushAck {
                    id,
                    accepted: appended.accepted,
                    stale: appended.stale,
                    head: appended.head,
                };
                self.send(&ack).await
            }
            Err(e) => self.backend_failed(e).await,
        }
    }

    async fn pull(&mut self, since: u64, limit: u32) -> Option<SessionEnd> {
        // At least one entry, so a pull always makes progress.
        let limit = (limit as usize).clamp(1, ENTRIES_PER_MESSAGE_MAX);
        match self
            .backend
            .pull(&self.store, since, limit, MESSAGE_PAYLOAD_BYTES_TARGET)
            .await
        {
            Ok(page) => {
                self.metrics.envelopes_out(page.entries.len());
                let batch = Message::Batch {
                    entries: page.entries,
                    cursor: page.cursor,
                    more: page.more,
                };
                self.send(&batch).await
            }
            Err(e) => self.backend_failed(e).await,
        }
    }

    async fn subscribe(&mut self) -> Option<SessionEnd> {
        if self.watch.is_none() {
            self.watch = Some(self.backend.watch(&self.store));
        }
        // The head may have grown between the Welcome and the subscription.
        match self.backend.head(&self.store).await {
            Ok(head) => self.notify(Some(head)).await,
            Err(e) => self.backend_failed(e).await,
        }
    }

    async fn notify(&mut self, head: Option<u64>) -> Option<SessionEnd> {
        let Some(head) = head else {
            // The backend dropped the channel; stop listening rather than
            // spin on a closed one.
            self.watch = None;
            return None;
        };
        if head <= self.told {
            return None;
        }
        match self.check_access().await {
            Access::Current => {}
            Access::Revoked => return Some(self.revoked().await),
            // Held back, `told` unchanged: the next head tries again.
            Access::Unknown(e) => {
                tracing::warn!(store = %self.store, error = %e,
                    "cannot re-check a subscriber's credential; holding its Notify back");
                return None;
            }
        }
        self.told = head;
        self.send(&Message::Notify { head }).await
    }

    async fn rekey(&mut self, access: AccessKey) -> Option<SessionEnd> {
        let new = access.fingerprint();
        match self
            .backend
            .rekey(&self.store, &self.fingerprint, &new)
            .await
        {
            Ok(()) => {
                self.fingerprint = new;
                self.metrics.rekeyed();
                tracing::info!(store = %self.store, "store access credential changed");
                self.send(&Message::Rekeyed).await
            }
            // Someone else rekeyed first: this session's credential is
            // the old one.
            Err(RelayError::Unauthorized) => Some(self.revoked().await),
            Err(e) => self.backend_failed(e).await,
        }
    }

    /// Notes a move of the store's access channel: re-check before the
    /// next answer. A closed channel means no more moves.
    fn access_moved(&mut self, moved: bool) {
        if moved {
            self.recheck = true;
        } else {
            self.access = None;
        }
    }

    /// Whether this session's credential still opens its store, asking the
    /// backend only if the store's credential may have changed since the
    /// last check.
    async fn check_access(&mut self) -> Access {
        // The select loop may not have seen a move yet (a rekey on this
        // node moves the channel before its Rekeyed is sent).
        if let Some(changes) = &mut self.access {
            match changes.has_changed() {
                Ok(true) => {
                    changes.borrow_and_update();
                    self.recheck = true;
                }
                Ok(false) => {}
                Err(_) => self.access = None,
            }
        }
        if !self.recheck {
            return Access::Current;
        }
        match self
            .backend
            .open_store(&self.store, &self.fingerprint, false)
            .await
        {
            Ok(_) => {
                self.recheck = false;
                Access::Current
            }
            Err(e) if e.code().is_retryable() => Access::Unknown(e),
            Err(_) => Access::Revoked,
        }
    }

    /// Ends a session whose credential no longer opens its store.
    async fn revoked(&mut self) -> SessionEnd {
        self.refuse(
            ErrorCode::Unauthorized,
            "the store's access credential was changed: this credential is no longer valid",
        )
        .await
    }

    async fn reply(&mut self, reply: Result<Message, RelayError>) -> Option<SessionEnd> {
        match reply {
            Ok(message) => self.send(&message).await,
            Err(e) => self.backend_failed(e).await,
        }
    }

    /// A backend error: retryable ones are answered and the session goes
    /// on; any other ends it.
    async fn backend_failed(&mut self, e: RelayError) -> Option<SessionEnd> {
        let code = e.code();
        if code.is_retryable() {
            if let RelayError::Unavailable(detail) = &e {
                tracing::warn!(store = %self.store, %detail, "relay storage failed");
            }
            self.metrics.error(code);
            return self.send(&Message::error(code, e.to_string())).await;
        }
        Some(self.refuse(code, e.to_string()).await)
    }

    /// A frame that could not be read: a disconnect ends quietly, anything
    /// else is the peer's fault and refused.
    async fn frame_failed(&mut self, e: FrameError) -> SessionEnd {
        if e.is_disconnect() {
            tracing::debug!(error = %e, "peer went away");
            return SessionEnd::Finished;
        }
        self.refuse(ErrorCode::Protocol, e.to_string()).await
    }

    /// Sends `message`. `Some` if the peer is gone.
    async fn send(&mut self, message: &Message) -> Option<SessionEnd> {
        let before = self.tx.bytes_sent();
        let Ok(sent) = tokio::time::timeout(SEND_TIMEOUT, self.tx.send(message)).await else {
            tracing::info!(store = %self.store, kind = message.kind(),
                "dropping a client that stopped reading");
            return Some(SessionEnd::Stalled);
        };
        match sent {
            Ok(()) => {
                self.metrics
                    .bytes_out(self.tx.bytes_sent().saturating_sub(before));
                None
            }
            Err(e) if e.is_disconnect() => {
                tracing::debug!(error = %e, "could not answer the peer");
                Some(SessionEnd::Finished)
            }
            Err(e) => {
                // Only this build can make an answer unsendable (over a
                // bound): a bug, but the peer's session is all it costs.
                tracing::error!(error = %e, kind = message.kind(), "could not encode an answer");
                Some(SessionEnd::Finished)
            }
        }
    }

    /// Sends one `Error`, ends the stream, and ends the session.
    async fn refuse(&mut self, code: ErrorCode, text: impl Into<String>) -> SessionEnd {
        let text = text.into();
        tracing::info!(store = %self.store, ?code, %text, "refusing a client");
        self.metrics.error(code);
        self.farewell(&Message::error(code, text)).await;
        SessionEnd::Refused(code)
    }

    async fn shutting_down(&mut self) -> SessionEnd {
        self.metrics.error(ErrorCode::ShuttingDown);
        let bye = Message::error(
            ErrorCode::ShuttingDown,
            "the relay is shutting down: reconnect later",
        );
        self.farewell(&bye).await;
        SessionEnd::ShuttingDown
    }

    /// Last words, bounded in time: the peer may not be reading.
    async fn farewell(&mut self, message: &Message) {
        let said = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            if self.send(message).await.is_none() {
                let _ = self.tx.finish().await;
            }
        })
        .await;
        if said.is_err() {
            tracing::debug!("the peer did not take the last message in time");
        }
    }
}

impl Metrics {
    fn frame_in(&self, payload_len: usize) {
        self.bytes_in((payload_len + LENGTH_PREFIX_BYTES) as u64);
    }
}
