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
//! A round runs when the store opens, after a rotation, when the sync
//! session parks envelopes (a sign that a key is on its way), and every
//! [`ROUND_INTERVAL`]; so an offline member gets the key when it next
//! connects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use persist_actors::key_manager::{KeyManagerMsg, Taken};
use persist_actors::peer_session::{Connector, PeerMsg, SyncState};
use persist_actors::routes::Routes;
use persist_core::protocol::AccessKey;
use persist_core::{DeviceId, Epoch, StoreId};
use ractor::rpc::CallResult;
use tokio::sync::{Notify, watch};

use crate::pairing::{LinkError, Mailboxes, backoff};
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
}

/// What the courier needs to reach the relay and the keys.
pub(crate) struct CourierArgs {
    pub(crate) remote: Remote,
    pub(crate) store: StoreId,
    pub(crate) device: DeviceId,
    pub(crate) access: AccessKey,
    pub(crate) routes: Routes,
    /// The sync session's state: envelopes parked for want of a key are
    /// the sign that a parcel is waiting.
    pub(crate) sync: watch::Receiver<SyncState>,
}

impl Courier {
    /// Starts the courier; its first round runs at once.
    pub(crate) fn start(args: CourierArgs) -> Self {
        let kick = Arc::new(Notify::new());
        let stop = watch::channel(false).0;
        let run = Run {
            connector: args.remote.connector(),
            admission: args.remote.admission_secret(),
            store: args.store,
            device: args.device,
            access: args.access,
            routes: args.routes,
            posted: BTreeMap::new(),
            rounds: 0,
            link: None,
        };
        tokio::spawn(run.run(kick.clone(), stop.subscribe(), args.sync));
        Self { kick, stop }
    }

    /// Asks for a round now (after a rotation).
    pub(crate) fn kick(&self) {
        self.kick.notify_one();
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
    access: AccessKey,
    routes: Routes,
    /// Parcels posted while the store has been open: `(recipient, epoch)`
    /// and the round they were posted in.
    posted: BTreeMap<(DeviceId, Epoch), u64>,
    /// Rounds run so far.
    rounds: u64,
    link: Option<Mailboxes>,
}

impl Run {
    async fn run(
        mut self,
        kick: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
        mut sync: watch::Receiver<SyncState>,
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
            let wait = match self.round().await {
                Ok(()) => {
                    failures = 0;
                    if sync.borrow().parked > 0 {
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

    async fn round(&mut self) -> Result<(), LinkError> {
        let Some(km) = self.routes.key_manager() else {
            return Ok(());
        };
        let parcels = match km.call(KeyManagerMsg::Parcels, None).await {
            Ok(CallResult::Success(p)) => p,
            _ => return Ok(()),
        };
        if self.link.is_none() {
            self.link = Some(
                Mailboxes::open(
                    self.connector.as_ref(),
                    self.store,
                    self.access.clone(),
                    self.device,
                    self.admission.clone(),
                )
                .await?,
            );
        }
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        self.rounds += 1;
        for (to, epoch, parcel) in parcels {
            // Parcels come only for members that have not acknowledged.
            let due = self
                .posted
                .get(&(to, epoch))
                .is_none_or(|at| self.rounds >= at + REPOST_ROUNDS);
            if !due {
                continue;
            }
            link.put(to, parcel).await?;
            self.posted.insert((to, epoch), self.rounds);
            tracing::debug!(%to, ?epoch, "posted an epoch key");
        }
        let items = link.fetch(self.device, 0).await?;
        let mut new_key = false;
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
                Ok(CallResult::Success(Err(e))) => {
                    tracing::warn!(error = %e, "ignored a parcel in this device's mailbox");
                }
                // The key manager is restarting: leave the parcel for the
                // next round.
                _ => return Ok(()),
            }
        }
        if let Some(last) = items.last() {
            link.ack(self.device, last.seq).await?;
        }
        if new_key && let Some(session) = self.routes.peer_session() {
            // A round retries the envelopes held for want of the key.
            let _ = session.call(PeerMsg::SyncNow, None).await;
        }
        Ok(())
    }
}
