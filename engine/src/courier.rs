//! The key courier: carries epoch keys between members through their relay
//! mailboxes (DESIGN.md, "Rotation and revocation", step 2).
//!
//! While a store is open with sync, the courier keeps one conversation
//! with the relay, in the store's own relay store. Each round it
//!
//! 1. posts, to every member that has not acknowledged it, a parcel with
//!    each live epoch key (sealed to that member, signed by this device:
//!    see [`persist_core::keywrap`]), once per member and epoch, and again
//!    every [`REPOST_ROUNDS`] rounds until the member acknowledges it;
//! 2. takes the parcels in this device's mailbox: a key new to this device
//!    goes into its keyring (durably, by the KeyManager), is acknowledged
//!    to its sender, and the sync session is asked for a round, which
//!    retries the envelopes held for want of that key; an
//!    acknowledgement is noted.
//!
//! 3. on the device that revoked another, switches the relay to the new
//!    access token the revocation chose ([`crate::rekey`]), once every
//!    remaining member has acknowledged the revocation's key (and with it
//!    the token), or once [`SyncConfig::relay_switch_grace`] has passed
//!    since the revocation. The revoked device never received the token:
//!    from then on the relay refuses it.
//!
//! A round runs when the store opens, after a rotation, when the sync
//! session parks envelopes (a sign that a key is on its way), and every
//! [`ROUND_INTERVAL`]; so an offline member gets the key when it next
//! connects. While a switch waits for acknowledgements, rounds run sooner.
//!
//! The courier reads the store's credential from the keyring each time it
//! connects, and, like the sync session, tries the pending token when the
//! relay refuses the current one (another member switched it).
//!
//! [`SyncConfig::relay_switch_grace`]: crate::SyncConfig::relay_switch_grace

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use persist_actors::key_manager::{KeyError, KeyManagerMsg, OutParcel, RelaySwitch, Taken};
use persist_actors::keys::KeyHandle;
use persist_actors::peer_session::{Connector, PeerMsg, SyncState};
use persist_actors::routes::Routes;
use persist_core::env::Clock;
use persist_core::protocol::{AccessKey, ErrorCode};
use persist_core::{DeviceId, Epoch, StoreId};
use ractor::ActorRef;
use ractor::rpc::CallResult;
use tokio::sync::{Notify, watch};

use crate::pairing::{LinkError, Mailboxes, backoff};
use crate::rekey::rekey;
use crate::sync::Remote;

/// How often the courier looks for parcels without being asked.
pub(crate) const ROUND_INTERVAL: Duration = Duration::from_secs(30);
/// Rounds after which a parcel still unacknowledged is posted again (the
/// relay may have lost it: a restored database, a full mailbox).
const REPOST_ROUNDS: u64 = 10;

/// The courier of one open store.
pub(crate) struct Courier {
    kick: Arc<Notify>,
    stop: watch::Sender<bool>,
    rounds: Arc<Rounds>,
}

/// How many rounds have started, and how many ended (done or failed).
struct Rounds {
    started: AtomicU64,
    ended: watch::Sender<u64>,
}

/// What the courier needs to reach the relay and the keys.
pub(crate) struct CourierArgs {
    pub(crate) remote: Remote,
    pub(crate) store: StoreId,
    pub(crate) device: DeviceId,
    /// The store's keys, for its relay credential.
    pub(crate) keys: KeyHandle,
    pub(crate) routes: Routes,
    /// Wall clock, for the grace of a relay switch.
    pub(crate) clock: Arc<dyn Clock>,
    /// See [`SyncConfig::relay_switch_grace`](crate::SyncConfig::relay_switch_grace).
    pub(crate) relay_switch_grace: Duration,
    /// The sync session's state: envelopes parked for want of a key are
    /// the sign that a parcel is waiting.
    pub(crate) sync: watch::Receiver<SyncState>,
}

impl Courier {
    /// Starts the courier; its first round runs at once.
    pub(crate) fn start(args: CourierArgs) -> Self {
        let kick = Arc::new(Notify::new());
        let stop = watch::channel(false).0;
        let rounds = Arc::new(Rounds {
            started: AtomicU64::new(0),
            ended: watch::channel(0).0,
        });
        let run = Run {
            connector: args.remote.connector(),
            admission: args.remote.admission_secret(),
            store: args.store,
            device: args.device,
            keys: args.keys,
            routes: args.routes,
            clock: args.clock,
            grace_ms: u64::try_from(args.relay_switch_grace.as_millis()).unwrap_or(u64::MAX),
            posted: BTreeMap::new(),
            rounds: 0,
            link: None,
            told_refused: None,
        };
        tokio::spawn(run.run(kick.clone(), stop.subscribe(), args.sync, rounds.clone()));
        Self { kick, stop, rounds }
    }

    /// Asks for a round now (after a rotation).
    pub(crate) fn kick(&self) {
        self.kick.notify_one();
    }

    /// Asks for a round now and resolves once a round that began after
    /// this call has ended, whether it reached the relay or not (or once
    /// the courier has stopped).
    pub(crate) fn round(&self) -> impl Future<Output = ()> + Send + 'static {
        // A round counts itself started before it reads anything, so the
        // next one to start sees everything done before this call.
        let target = self.rounds.started.load(Ordering::SeqCst) + 1;
        let mut ended = self.rounds.ended.subscribe();
        self.kick.notify_one();
        async move {
            let _ = ended.wait_for(|n| *n >= target).await;
        }
    }

    /// Stops the courier (the store is closing).
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// Resolves when the session parks more envelopes than `parked` (then
/// the new count); never if the session is gone.
async fn more_parked(sync: &mut watch::Receiver<SyncState>, parked: &mut u64) {
    loop {
        if sync.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = sync.borrow_and_update().parked;
        let grew = now > *parked;
        *parked = now;
        if grew {
            return;
        }
    }
}

struct Run {
    connector: Arc<dyn Connector>,
    admission: Option<String>,
    store: StoreId,
    device: DeviceId,
    keys: KeyHandle,
    routes: Routes,
    clock: Arc<dyn Clock>,
    grace_ms: u64,
    /// Parcels posted while the store has been open: `(recipient, epoch,
    /// announcement)` and the round they were posted in.
    posted: BTreeMap<(DeviceId, Epoch, [u8; 32]), u64>,
    /// Rounds run so far.
    rounds: u64,
    link: Option<Mailboxes>,
    /// The epoch whose relay switch the relay refused, once told.
    told_refused: Option<Epoch>,
}

/// What a round found.
enum Found {
    /// Nothing to wait for.
    Idle,
    /// Envelopes parked for want of a key, or a relay switch waiting for
    /// members' acknowledgements: look again soon.
    Waiting,
}

impl Run {
    async fn run(
        mut self,
        kick: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
        mut sync: watch::Receiver<SyncState>,
        rounds: Arc<Rounds>,
    ) {
        let mut failures = 0u32;
        let mut parked = sync.borrow_and_update().parked;
        // Rounds in a row that found envelopes parked: a key may still be
        // on its way (posted after the envelopes it opens), so look again
        // soon, less often each time.
        let mut waiting_rounds = 0u32;
        loop {
            if *stop.borrow() || stop.has_changed().is_err() {
                return;
            }
            rounds.started.fetch_add(1, Ordering::SeqCst);
            let outcome = self.round().await;
            rounds.ended.send_modify(|n| *n += 1);
            let wait = match outcome {
                Ok(found) => {
                    failures = 0;
                    if sync.borrow().parked > 0 || matches!(found, Found::Waiting) {
                        waiting_rounds += 1;
                        backoff(waiting_rounds).min(ROUND_INTERVAL)
                    } else {
                        waiting_rounds = 0;
                        ROUND_INTERVAL
                    }
                }
                Err(e) => {
                    self.link = None;
                    failures += 1;
                    tracing::debug!(error = ?e, "key courier: relay unreachable");
                    backoff(failures).min(ROUND_INTERVAL)
                }
            };
            // Biased: a close is seen before a kick or a timer.
            tokio::select! {
                biased;
                _ = stop.changed() => {}
                () = kick.notified() => {}
                () = more_parked(&mut sync, &mut parked) => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn round(&mut self) -> Result<Found, LinkError> {
        let Some(km) = self.routes.key_manager() else {
            return Ok(Found::Idle);
        };
        let parcels = match km.call(KeyManagerMsg::Parcels, None).await {
            Ok(CallResult::Success(p)) => p,
            _ => return Ok(Found::Idle),
        };
        if self.link.is_none() {
            let link = open(
                self.connector.as_ref(),
                self.store,
                self.device,
                self.admission.clone(),
                &self.keys,
                &km,
            );
            self.link = Some(link.await?);
        }
        let Some(link) = self.link.as_mut() else {
            return Ok(Found::Idle);
        };
        self.rounds += 1;
        for parcel in parcels {
            // Parcels come only for members that have not acknowledged.
            let OutParcel {
                to,
                epoch,
                announcement,
                bytes,
            } = parcel;
            let slot = (to, epoch, announcement);
            let due = self
                .posted
                .get(&slot)
                .is_none_or(|at| self.rounds >= at + REPOST_ROUNDS);
            if !due {
                continue;
            }
            link.put(to, bytes).await?;
            self.posted.insert(slot, self.rounds);
            tracing::debug!(%to, ?epoch, "posted an epoch key");
        }
        let items = link.fetch(self.device, 0).await?;
        let mut new_key = false;
        // The mailbox is acknowledged up to the last parcel dealt with: one
        // taken, or refused for good. A parcel this device could not store
        // stays, with those after it, for the next round.
        let mut done = None;
        for item in &items {
            let taken = km
                .call(
                    |reply| KeyManagerMsg::TakeParcel {
                        bytes: item.payload.clone(),
                        reply,
                    },
                    None,
                )
                .await;
            match taken {
                Ok(CallResult::Success(Ok(Taken { new_epoch, answer }))) => {
                    new_key |= new_epoch.is_some();
                    if let Some((to, ack)) = answer {
                        link.put(to, ack).await?;
                    }
                }
                Ok(CallResult::Success(Err(KeyError::Storage(e)))) => {
                    tracing::warn!(error = %e, "could not store a parcel's key yet; retrying");
                    break;
                }
                Ok(CallResult::Success(Err(e))) => {
                    tracing::warn!(error = %e, "ignored a parcel in this device's mailbox");
                }
                // The key manager is restarting: leave the parcel for the
                // next round.
                _ => break,
            }
            done = Some(item.seq);
        }
        if let Some(seq) = done {
            link.ack(self.device, seq).await?;
        }
        if new_key && let Some(session) = self.routes.peer_session() {
            // A round retries the envelopes held for want of the key.
            let _ = session.call(PeerMsg::SyncNow, None).await;
        }
        self.switch_relay(&km).await
    }

    /// Switches the relay to a revocation's new access token when this
    /// device made the revocation and the members are ready (or the grace
    /// is over).
    async fn switch_relay(&mut self, km: &ActorRef<KeyManagerMsg>) -> Result<Found, LinkError> {
        let switch = match km.call(KeyManagerMsg::RelaySwitch, None).await {
            Ok(CallResult::Success(Some(switch))) => switch,
            _ => return Ok(Found::Idle),
        };
        let RelaySwitch {
            epoch,
            by_this_device,
            since_ms,
            waiting_for,
            from,
            to,
        } = switch;
        if !by_this_device {
            return Ok(Found::Idle);
        }
        if !waiting_for.is_empty() {
            let due_ms = since_ms.saturating_add(self.grace_ms);
            if self.clock.now_ms() < due_ms {
                tracing::debug!(
                    ?epoch,
                    waiting = waiting_for.len(),
                    "relay switch waits for members to acknowledge the new keys"
                );
                return Ok(Found::Waiting);
            }
            tracing::warn!(?epoch, members = ?waiting_for,
                "switching the relay to the new access token although these members did not \
                 acknowledge the new keys within the grace period: they must be paired again");
        }
        // The mailbox conversation holds the old credential, which the
        // relay stops honouring.
        self.link = None;
        match rekey(
            self.connector.as_ref(),
            self.store,
            from,
            to.clone(),
            self.device,
            self.admission.clone(),
        )
        .await
        {
            Ok(()) => {
                tracing::info!(
                    ?epoch,
                    "switched the relay to the store's new access token; \
                    the revoked device's token no longer opens the store"
                );
                promote(km, to).await;
                Ok(Found::Idle)
            }
            // Neither token opens the store (another revocation switched
            // it), or the remote cannot switch (a serving device): retrying
            // will not help, so say it once and carry on with the keys.
            Err(LinkError::Refused(code, text)) => {
                if self.told_refused != Some(epoch) {
                    self.told_refused = Some(epoch);
                    tracing::warn!(?epoch, ?code, %text,
                        "the remote refused to switch to the store's new access token");
                }
                Ok(Found::Idle)
            }
            Err(down) => Err(down),
        }
    }
}

/// A conversation with the store's mailboxes, under its current relay
/// credential or, when the relay refuses that and a revocation chose
/// another, under that one (which then becomes current).
async fn open(
    connector: &dyn Connector,
    store: StoreId,
    device: DeviceId,
    admission: Option<String>,
    keys: &KeyHandle,
    km: &ActorRef<KeyManagerMsg>,
) -> Result<Mailboxes, LinkError> {
    let keys = keys.current();
    let Some(access) = keys.access.clone() else {
        return Err(LinkError::Refused(
            ErrorCode::Unauthorized,
            "this store does not encrypt, so it has no relay credential".into(),
        ));
    };
    let open = |access| Mailboxes::open(connector, store, access, device, admission.clone());
    match (open(access).await, keys.access_next.clone()) {
        (Err(LinkError::Refused(ErrorCode::Unauthorized, text)), Some(next)) => {
            match open(next.clone()).await {
                Ok(link) => {
                    promote(km, next).await;
                    Ok(link)
                }
                Err(LinkError::Refused(ErrorCode::Unauthorized, _)) => {
                    Err(LinkError::Refused(ErrorCode::Unauthorized, text))
                }
                Err(other) => Err(other),
            }
        }
        (outcome, _) => outcome,
    }
}

/// Asks the KeyManager to make `access`, which the relay took, the
/// store's current credential.
async fn promote(km: &ActorRef<KeyManagerMsg>, access: AccessKey) {
    let outcome = km
        .call(|reply| KeyManagerMsg::PromoteAccess { access, reply }, None)
        .await;
    if !matches!(outcome, Ok(CallResult::Success(Ok(_)))) {
        // Tried again at the next connection that finds the old one refused.
        tracing::warn!("could not record the relay's new access token yet");
    }
}
