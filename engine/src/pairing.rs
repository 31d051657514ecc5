//! Pairing through a relay's mailboxes (DESIGN.md, "Pairing").
//!
//! Both sides speak `persist/1` to the relay store named by the invite id
//! (see [`persist_core::invite`]), with a credential derived from the
//! invite secret: the relay keeps that store like any other and learns
//! nothing about the store being joined. Mailboxes have no live
//! notification, so each side polls its mailbox every
//! [`POLL_INTERVAL`].
//!
//! - **Joiner** ([`join`]), run by [`Store::open`](crate::Store::open) with
//!   [`Config::invite`](crate::Config::invite) before anything is written:
//!   posts the first handshake message, then waits for the answer and the
//!   grant, reconnecting as needed, until [`Config::invite_timeout`]
//!   (crate::Config::invite_timeout).
//! - **Inviter** ([`Responders`]): one task per open invite while the store
//!   is open with sync. It answers through the KeyManager, which holds the
//!   keys and runs the handshake; it grants only after the joiner's
//!   confirmation decrypts, and only after the KeyManager has durably
//!   marked the invite used and the joiner a member.

use std::sync::Arc;
use std::time::Duration;

use persist_actors::key_manager::{InviteRoute, KeyManagerMsg, Redeemed};
use persist_actors::peer_session::{Connector, Link};
use persist_actors::routes::Routes;
use persist_core::env::Env;
use persist_core::invite::{self, Grant, Host, Invite, Joiner, Opened, PairingError, Received};
use persist_core::keys::DeviceIdentity;
use persist_core::protocol::{AccessKey, ErrorCode, Hello, MailboxItem, Message, PROTOCOL_VERSION};
use persist_core::{DeviceId, InviteId, StoreId};
use ractor::rpc::CallResult;
use tokio::sync::watch;

/// How often a side of a pairing looks in its mailbox.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often the responder of a used invite looks: it is there only to
/// tell a second joiner, authenticated, that the invite was used.
const USED_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// How long a joiner waits for its inviter unless told otherwise.
pub const JOIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10 * 60);
/// The longest wait between reconnects to the relay.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// How long the relay has to answer one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a joiner could not pair.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The handshake failed, or the inviter refused or stopped.
    #[error(transparent)]
    Pairing(#[from] PairingError),
    /// The inviter did not answer in time.
    #[error(
        "the inviter did not answer within {waited_secs} s{}: it answers while its store is \
         open with sync (e.g. `persist sync --watch` or `persist serve` on the inviting \
         device); nothing was written",
        match .last_error { Some(e) => format!(" ({e})"), None => String::new() }
    )]
    TimedOut {
        /// How long it waited.
        waited_secs: u64,
        /// The relay.
        relay: String,
        /// What went wrong with the relay last, if the relay was a
        /// problem: unreachable, or it admits only its operator's devices
        /// and the inviter has not opened the pairing there.
        last_error: Option<String>,
    },
    /// The relay refused the pairing store.
    #[error("the relay {relay} refused the pairing: {text}")]
    Refused {
        /// The relay.
        relay: String,
        /// Its words.
        text: String,
    },
}

/// A failure talking to the relay.
#[derive(Debug)]
pub(crate) enum LinkError {
    /// Unreachable or dropped; worth retrying.
    Down(String),
    /// The relay refused, with a code that retrying will not change.
    Refused(ErrorCode, String),
}

/// One conversation with a relay store's mailboxes (a pairing store, or
/// the store itself for the key courier).
pub(crate) struct Mailboxes {
    link: Link,
}

impl Mailboxes {
    pub(crate) async fn open(
        connector: &dyn Connector,
        store: StoreId,
        access: AccessKey,
        device: DeviceId,
        admission: Option<String>,
    ) -> Result<Self, LinkError> {
        let mut link = connector.connect().await.map_err(LinkError::Down)?;
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            store,
            access,
            device,
            admission,
        });
        link.send
            .send(&hello)
            .await
            .map_err(|e| LinkError::Down(e.to_string()))?;
        let mut me = Self { link };
        match me.answer().await? {
            Message::Welcome(_) => Ok(me),
            other => Err(LinkError::Down(format!(
                "expected Welcome, got {}",
                other.kind()
            ))),
        }
    }

    async fn answer(&mut self) -> Result<Message, LinkError> {
        let msg = tokio::time::timeout(REQUEST_TIMEOUT, self.link.recv.recv())
            .await
            .map_err(|_| LinkError::Down("the relay did not answer".into()))?
            .map_err(|e| LinkError::Down(e.to_string()))?
            .ok_or_else(|| LinkError::Down("the relay closed the connection".into()))?;
        match msg {
            Message::Error { code, text } if code.is_retryable() => Err(LinkError::Down(text)),
            Message::Error { code, text } => Err(LinkError::Refused(code, text)),
            other => Ok(other),
        }
    }

    async fn request(&mut self, msg: &Message) -> Result<Message, LinkError> {
        self.link
            .send
            .send(msg)
            .await
            .map_err(|e| LinkError::Down(e.to_string()))?;
        self.answer().await
    }

    pub(crate) async fn put(&mut self, to: DeviceId, payload: Vec<u8>) -> Result<(), LinkError> {
        match self.request(&Message::MailboxPut { to, payload }).await? {
            Message::MailboxStored { .. } => Ok(()),
            other => Err(LinkError::Down(format!(
                "expected MailboxStored, got {}",
                other.kind()
            ))),
        }
    }

    pub(crate) async fn fetch(
        &mut self,
        mailbox: DeviceId,
        since: u64,
    ) -> Result<Vec<MailboxItem>, LinkError> {
        match self
            .request(&Message::MailboxFetch { mailbox, since })
            .await?
        {
            Message::Mailbox { items } => Ok(items),
            other => Err(LinkError::Down(format!(
                "expected Mailbox, got {}",
                other.kind()
            ))),
        }
    }

    pub(crate) async fn ack(&mut self, mailbox: DeviceId, upto: u64) -> Result<(), LinkError> {
        match self.request(&Message::MailboxAck { mailbox, upto }).await? {
            Message::MailboxAcked => Ok(()),
            other => Err(LinkError::Down(format!(
                "expected MailboxAcked, got {}",
                other.kind()
            ))),
        }
    }
}

/// The backoff after the `failures`-th failure in a row: doubling from
/// the poll interval up to [`RECONNECT_MAX`].
pub(crate) fn backoff(failures: u32) -> Duration {
    POLL_INTERVAL
        .saturating_mul(1u32 << failures.min(6))
        .min(RECONNECT_MAX)
}

/// Joins `invite`'s store as `me`: runs the handshake through the relay
/// behind `connector` and returns the grant. Gives up after `timeout`.
pub(crate) async fn join(
    invite: &Invite,
    me: &DeviceIdentity,
    name: &str,
    connector: &dyn Connector,
    env: &Env,
    timeout: Duration,
) -> Result<Grant, JoinError> {
    let relay = connector.remote();
    let last_error = std::sync::Mutex::new(None);
    let outcome = tokio::time::timeout(
        timeout,
        join_inner(invite, me, name, connector, env, &last_error),
    )
    .await;
    match outcome {
        Ok(Ok(grant)) => Ok(grant),
        Ok(Err(JoinFailure::Pairing(e))) => Err(JoinError::Pairing(e)),
        Ok(Err(JoinFailure::Refused(text))) => Err(JoinError::Refused { relay, text }),
        Err(_) => Err(JoinError::TimedOut {
            waited_secs: timeout.as_secs(),
            relay,
            last_error: last_error.lock().ok().and_then(|mut e| e.take()),
        }),
    }
}

enum JoinFailure {
    Pairing(PairingError),
    Refused(String),
}

async fn join_inner(
    invite: &Invite,
    me: &DeviceIdentity,
    name: &str,
    connector: &dyn Connector,
    env: &Env,
    last_error: &std::sync::Mutex<Option<String>>,
) -> Result<Grant, JoinFailure> {
    let note = |e: Option<String>| {
        if let Ok(mut last) = last_error.lock() {
            *last = e;
        }
    };
    let (mut joiner, first) = Joiner::start(invite, me, name, env.entropy.stream("pairing"))
        .map_err(JoinFailure::Pairing)?;
    let to_inviter = invite::inviter_mailbox(invite.id);
    let to_me = invite::joiner_mailbox(invite.id);
    // The relay sees this random id, not the device's.
    let mut rng = env.entropy.stream("pairing-id");
    let mut hello_id = [0u8; 16];
    rng.fill_bytes(&mut hello_id);
    // What is still to send, in order; and how far this side has read.
    let mut outbox: Vec<Vec<u8>> = vec![first];
    let mut since = 0;
    let mut failures = 0u32;
    loop {
        let mut link = match Mailboxes::open(
            connector,
            invite.relay_store(),
            invite.relay_access(),
            DeviceId(hello_id),
            None,
        )
        .await
        {
            Ok(link) => {
                note(None);
                link
            }
            // The inviter has not yet made the pairing store on a relay
            // that admits only its operator's devices: wait for it.
            Err(LinkError::Refused(ErrorCode::AdmissionRequired, _)) => {
                note(Some(admission_note(connector)));
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
            Err(LinkError::Down(e)) => {
                note(Some(unreachable_note(connector, &e)));
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
            Err(LinkError::Refused(_, text)) => return Err(JoinFailure::Refused(text)),
        };
        match converse(
            &mut link,
            &mut joiner,
            &mut outbox,
            &mut since,
            to_inviter,
            to_me,
        )
        .await
        {
            Ok(grant) => {
                // Best effort: leave the pairing mailbox empty.
                let _ = link.ack(to_me, since).await;
                return Ok(grant);
            }
            Err(Step::Pairing(e)) => return Err(JoinFailure::Pairing(e)),
            Err(Step::Link(LinkError::Refused(_, text))) => return Err(JoinFailure::Refused(text)),
            Err(Step::Link(LinkError::Down(e))) => {
                tracing::debug!(error = %e, "pairing: relay connection lost; reconnecting");
                note(Some(unreachable_note(connector, &e)));
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}

/// What a timed-out joiner says of an unreachable relay.
fn unreachable_note(connector: &dyn Connector, error: &str) -> String {
    format!("the relay {} was unreachable: {error}", connector.remote())
}

/// What a timed-out joiner says of a relay that refused to make the
/// pairing store: only the inviter, with the operator's secret, can.
fn admission_note(connector: &dyn Connector) -> String {
    format!(
        "the relay {} admits only its operator's devices, and the inviting device has not \
         opened the pairing there: it answers only with the relay's admission secret \
         (`persist invite create --admission-secret-file F`, or `persist sync --watch \
         --admission-secret-file F`)",
        connector.remote()
    )
}

enum Step {
    Pairing(PairingError),
    Link(LinkError),
}

impl From<LinkError> for Step {
    fn from(e: LinkError) -> Self {
        Step::Link(e)
    }
}

/// The joiner's conversation over one connection.
///
/// The joiner's mailbox may hold what the inviter sent for earlier
/// attempts with the same code (a join retried after a timeout): the
/// joiner skips those ([`Received::Stale`]) and acknowledges them away
/// with the rest. What fails to open is tampering, or the inviter's
/// refusal, and ends the attempt.
async fn converse(
    link: &mut Mailboxes,
    joiner: &mut Joiner,
    outbox: &mut Vec<Vec<u8>>,
    since: &mut u64,
    to_inviter: DeviceId,
    to_me: DeviceId,
) -> Result<Grant, Step> {
    loop {
        while let Some(next) = outbox.first() {
            link.put(to_inviter, next.clone()).await?;
            outbox.remove(0);
        }
        let items = link.fetch(to_me, *since).await?;
        let any = !items.is_empty();
        for item in items {
            *since = item.seq;
            match joiner.receive(&item.payload).map_err(Step::Pairing)? {
                Received::Reply(confirm) => outbox.push(confirm),
                Received::Pending => {}
                Received::Granted(grant) => return Ok(grant),
                Received::Stale => {
                    tracing::debug!(
                        seq = item.seq,
                        "pairing: skipped an answer to an earlier attempt"
                    );
                }
                // A newer core may say more; nothing to do here for it.
                _ => {}
            }
        }
        if any {
            link.ack(to_me, *since).await?;
        }
        if outbox.is_empty() {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// The inviter's responders: one task per open invite, for as long as
/// the store is open.
pub(crate) struct Responders {
    connector: Arc<dyn Connector>,
    admission: Option<String>,
    routes: Routes,
    env: Env,
    /// The relay and its pin, for codes.
    relay: String,
    pin: Option<[u8; 32]>,
    stop: watch::Sender<bool>,
    /// The invites used while the store has been open, and by whom.
    joined: Arc<watch::Sender<Vec<(InviteId, DeviceId)>>>,
    /// The invites being served; a task removes its own when it ends.
    serving: Arc<std::sync::Mutex<std::collections::BTreeSet<InviteId>>>,
}

impl Responders {
    pub(crate) fn new(remote: &crate::sync::Remote, routes: Routes, env: Env) -> Self {
        Self {
            connector: remote.connector(),
            admission: remote.admission_secret(),
            routes,
            env,
            relay: remote.url().to_owned(),
            pin: remote.pin(),
            stop: watch::channel(false).0,
            joined: Arc::new(watch::channel(Vec::new()).0),
            serving: Arc::default(),
        }
    }

    /// The relay invites name, and its pin.
    pub(crate) fn relay(&self) -> (&str, Option<[u8; 32]>) {
        (&self.relay, self.pin)
    }

    /// The device that joined with invite `id`, once one has (while this
    /// store is open); `None` if the store closes first.
    pub(crate) async fn joined(&self, id: InviteId) -> Option<DeviceId> {
        let mut joined = self.joined.subscribe();
        let mut stop = self.stop.subscribe();
        loop {
            if let Some((_, device)) = joined.borrow_and_update().iter().find(|(i, _)| *i == id) {
                return Some(*device);
            }
            if *stop.borrow_and_update() {
                return None;
            }
            // Biased: a close is noticed before another round.
            tokio::select! {
                biased;
                r = stop.changed() => if r.is_err() { return None; },
                r = joined.changed() => if r.is_err() { return None; },
            }
        }
    }

    /// Stops every responder (the store is closing).
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Serves every invite the keyring holds open (after a reopen).
    pub(crate) async fn resume(&self) {
        let Some(km) = self.routes.key_manager() else {
            return;
        };
        let now_ms = self.env.clock.now_ms();
        let open = km
            .call(|reply| KeyManagerMsg::OpenInvites { now_ms, reply }, None)
            .await;
        if let Ok(CallResult::Success(routes)) = open {
            for route in routes {
                self.serve(route);
            }
        }
    }

    /// Starts answering joiners of `route`'s invite, unless already doing so.
    pub(crate) fn serve(&self, route: InviteRoute) {
        let Ok(mut serving) = self.serving.lock() else {
            return;
        };
        if !serving.insert(route.id) {
            return;
        }
        drop(serving);
        let responder = Responder {
            route,
            connector: self.connector.clone(),
            admission: self.admission.clone(),
            routes: self.routes.clone(),
            env: self.env.clone(),
            stop: self.stop.subscribe(),
            joined: self.joined.clone(),
            hello_id: {
                let mut id = [0u8; 16];
                self.env.entropy.stream("pairing-id").fill_bytes(&mut id);
                DeviceId(id)
            },
            outbox: Vec::new(),
        };
        let serving = self.serving.clone();
        tokio::spawn(async move {
            let id = responder.route.id;
            responder.run().await;
            if let Ok(mut s) = serving.lock() {
                s.remove(&id);
            }
        });
    }
}

struct Responder {
    route: InviteRoute,
    connector: Arc<dyn Connector>,
    admission: Option<String>,
    routes: Routes,
    env: Env,
    stop: watch::Receiver<bool>,
    joined: Arc<watch::Sender<Vec<(InviteId, DeviceId)>>>,
    hello_id: DeviceId,
    /// Messages for the joiner not yet stored by the relay.
    outbox: Vec<Vec<u8>>,
}

/// Where a responder is with the current joiner.
enum Serving {
    /// Waiting for a first message.
    Idle,
    /// Answered; waiting for the confirmation.
    Answered(Box<Host>),
    /// Granted to this device: the invite is used; what remains is to
    /// deliver the grant.
    Done(DeviceId),
}

impl Responder {
    async fn run(mut self) {
        let id = self.route.id;
        let mut state = Serving::Idle;
        let mut failures = 0u32;
        let mut since = 0;
        let mut told_admission = false;
        if !self.route.used {
            tracing::info!(invite = %id, "waiting for a device to accept the invite");
        }
        loop {
            if self.stopped() || self.env.clock.now_ms() >= self.route.expires_ms {
                tracing::info!(invite = %id, "stopped answering the invite (closed or expired)");
                return;
            }
            let outcome = match Mailboxes::open(
                self.connector.as_ref(),
                invite::relay_store(id),
                self.route.access.clone(),
                self.hello_id,
                self.admission.clone(),
            )
            .await
            {
                Ok(mut link) => {
                    failures = 0;
                    self.serve(&mut link, &mut state, &mut since).await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => return,
                // No admission secret (or a wrong one) for a relay that
                // admits only its operator's devices. Kept trying: a
                // joiner holding the secret may make the pairing store,
                // which this side may then open without one.
                Err(LinkError::Refused(ErrorCode::AdmissionRequired, text)) => {
                    if !told_admission {
                        tracing::warn!(invite = %id, %text,
                            "the relay admits only its operator's devices: the invite is answered \
                             once the store is opened with the relay's admission secret");
                        told_admission = true;
                    }
                    failures += 1;
                    self.pause(backoff(failures)).await;
                }
                Err(LinkError::Refused(code, text)) => {
                    tracing::warn!(invite = %id, ?code, %text,
                        "the relay refused the invite's mailbox; the invite cannot be answered");
                    return;
                }
                Err(LinkError::Down(e)) => {
                    failures += 1;
                    tracing::debug!(invite = %id, error = %e, "invite responder: relay unreachable");
                    self.pause(backoff(failures)).await;
                }
            }
        }
    }

    /// Whether the store is closing (or gone).
    fn stopped(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Sleeps `d`, or less if the store closes.
    async fn pause(&mut self, d: Duration) {
        // Biased: a close is seen before a timer that fires at once.
        tokio::select! {
            biased;
            _ = self.stop.changed() => {}
            () = tokio::time::sleep(d) => {}
        }
    }

    /// Serves over one connection until the invite expires or the store
    /// closes (`Ok`), or the connection fails.
    async fn serve(
        &mut self,
        link: &mut Mailboxes,
        state: &mut Serving,
        since: &mut u64,
    ) -> Result<(), LinkError> {
        let id = self.route.id;
        let to_me = invite::inviter_mailbox(id);
        let to_joiner = invite::joiner_mailbox(id);
        loop {
            while let Some(next) = self.outbox.first() {
                link.put(to_joiner, next.clone()).await?;
                self.outbox.remove(0);
            }
            if let Serving::Done(device) = state {
                tracing::info!(invite = %id, %device, "a device joined with the invite");
                let device = *device;
                self.joined.send_modify(|j| j.push((id, device)));
                self.route.used = true;
                *state = Serving::Idle;
            }
            if self.stopped() || self.env.clock.now_ms() >= self.route.expires_ms {
                return Ok(());
            }
            let items = link.fetch(to_me, *since).await?;
            let any = !items.is_empty();
            for item in items {
                *since = item.seq;
                let replies = self.step(state, &item.payload).await;
                self.outbox.extend(replies);
                if matches!(state, Serving::Done(_)) {
                    break;
                }
            }
            if any {
                link.ack(to_me, *since).await?;
            } else if self.route.used {
                self.pause(USED_POLL_INTERVAL).await;
            } else {
                self.pause(POLL_INTERVAL).await;
            }
        }
    }

    /// Takes one message from a joiner; returns what to send back.
    async fn step(&self, state: &mut Serving, payload: &[u8]) -> Vec<Vec<u8>> {
        let id = self.route.id;
        let mut out = Vec::new();
        if let Serving::Answered(host) = state {
            match host.on_confirm(payload) {
                Ok(()) => {
                    let joining = host.joining().clone();
                    match self.redeem(joining).await {
                        Ok(Redeemed { keys, members }) => match host.grant(&keys, &members) {
                            Ok(grant) => {
                                *state = Serving::Done(host.joining().device_id);
                                return grant;
                            }
                            Err(e) => {
                                tracing::warn!(invite = %id, error = %e, "could not make the grant");
                                out.extend(host.abort(&e.to_string()).ok());
                            }
                        },
                        Err(why) => {
                            tracing::warn!(invite = %id, %why, "could not admit the joining device");
                            out.extend(host.abort(&why).ok());
                        }
                    }
                    *state = Serving::Idle;
                    return out;
                }
                Err(e) => {
                    // Not the confirmation: a replayed or new first message,
                    // or tampering. This attempt is over either way; the
                    // joiner is told, under the keys only it holds.
                    tracing::warn!(invite = %id, error = %e,
                        "pairing attempt failed: expected the joiner's confirmation");
                    out.extend(host.abort("the inviter received an unexpected message; the relay may be tampering, try again").ok());
                    *state = Serving::Idle;
                }
            }
        }
        let now_ms = self.env.clock.now_ms();
        let Some(km) = self.routes.key_manager() else {
            tracing::warn!(invite = %id, "the key manager is not running");
            return out;
        };
        let answered = km
            .call(
                |reply| KeyManagerMsg::AnswerInvite {
                    id,
                    first: payload.to_vec(),
                    now_ms,
                    reply,
                },
                None,
            )
            .await;
        match answered {
            Ok(CallResult::Success(Ok(Some(Opened::Accepted { host, answer })))) => {
                tracing::info!(invite = %id, device = %host.joining().device_id,
                    "a device is accepting the invite");
                out.push(answer);
                *state = Serving::Answered(Box::new(host));
            }
            Ok(CallResult::Success(Ok(Some(Opened::Refused { answer, why })))) => {
                tracing::info!(invite = %id, %why, "refused a device");
                out.push(answer);
            }
            Ok(CallResult::Success(Ok(None))) => {
                tracing::info!(invite = %id, "the invite is no longer held");
            }
            Ok(CallResult::Success(Err(e))) => {
                tracing::warn!(invite = %id, error = %e,
                    "ignored a message that is not a valid first handshake message");
            }
            _ => tracing::warn!(invite = %id, "the key manager did not answer"),
        }
        out
    }

    async fn redeem(&self, joining: invite::Joining) -> Result<Redeemed, String> {
        let id = self.route.id;
        let now_ms = self.env.clock.now_ms();
        let Some(km) = self.routes.key_manager() else {
            return Err("the inviter's key manager is not running".into());
        };
        match km
            .call(
                |reply| KeyManagerMsg::RedeemInvite {
                    id,
                    joining,
                    now_ms,
                    reply,
                },
                None,
            )
            .await
        {
            Ok(CallResult::Success(Ok(r))) => Ok(r),
            Ok(CallResult::Success(Err(e))) => Err(e.to_string()),
            _ => Err("the inviter's key manager is not running".into()),
        }
    }
}
