//! Fan-out across relay nodes: the heads this node knows, and the one
//! LISTEN connection that keeps them current.
//!
//! Every committed append that grows a store's log sends
//! `NOTIFY <channel>, '<store hex>:<head>'` inside its transaction, so
//! PostgreSQL delivers it when, and only if, the append commits, and in
//! commit order. Each node keeps one dedicated connection that LISTENs on
//! the channel and raises the matching [`Heads`] channel; the node that
//! appended also publishes directly, without waiting for the round trip.
//!
//! When the LISTEN connection is lost, notifications sent meanwhile are
//! lost with it: on every (re)connect, once LISTEN is in place, the node
//! reads the heads of every store someone watches and publishes them. A
//! watcher may so see a head late, never lower than before, and never miss
//! the last one. Reconnects back off from [`LISTEN_BACKOFF_MIN`] to
//! [`LISTEN_BACKOFF_MAX`], without jitter: there is one such connection per
//! node, too few for a thundering herd.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use persist_core::StoreId;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use super::Shared;

/// First wait before reconnecting the LISTEN connection.
pub(super) const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnects: how late, at worst, cross-node fan-out
/// resumes after the database returns.
pub(super) const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Head channels kept before the first sweep of unwatched ones. A channel
/// without receivers is kept as a cache of the store's head, so that a
/// new watcher starts at the head without a query; sweeping drops those.
const HEADS_SWEEP_LEN_MIN: usize = 4096;

/// The heads this node knows, one watch channel per store.
///
/// Holds at most about twice as many channels as stores with a live
/// watcher, or [`HEADS_SWEEP_LEN_MIN`], whichever is more: when the map
/// reaches its sweep length, channels without receivers are dropped.
#[derive(Debug)]
pub(super) struct Heads {
    state: Mutex<HeadsState>,
}

#[derive(Debug)]
struct HeadsState {
    senders: BTreeMap<StoreId, watch::Sender<u64>>,
    sweep_at: usize,
}

impl Heads {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(HeadsState {
                senders: BTreeMap::new(),
                sweep_at: HEADS_SWEEP_LEN_MIN,
            }),
        }
    }

    /// A receiver of `store`'s head, marked seen, and whether its value is
    /// known (else it starts at 0 until someone publishes).
    pub(super) fn subscribe(&self, store: &StoreId) -> (watch::Receiver<u64>, bool) {
        let mut state = self.lock();
        if let Some(sender) = state.senders.get(store) {
            return (sender.subscribe(), true);
        }
        let (sender, receiver) = watch::channel(0);
        state.insert(*store, sender);
        (receiver, false)
    }

    /// Raises `store`'s head to `head` (never lowers it). `remember` keeps
    /// the head even if no one watches the store yet: for heads this node
    /// read or wrote itself, the likeliest to be watched next.
    pub(super) fn publish(&self, store: &StoreId, head: u64, remember: bool) {
        let mut state = self.lock();
        match state.senders.get(store) {
            Some(sender) => {
                sender.send_if_modified(|current| {
                    let grows = head > *current;
                    if grows {
                        *current = head;
                    }
                    grows
                });
            }
            None if remember => {
                let (sender, _) = watch::channel(head);
                state.insert(*store, sender);
            }
            None => {}
        }
    }

    /// The stores someone watches now.
    pub(super) fn watched(&self) -> Vec<StoreId> {
        let state = self.lock();
        state
            .senders
            .iter()
            .filter(|(_, sender)| sender.receiver_count() > 0)
            .map(|(store, _)| *store)
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, HeadsState> {
        // Every operation leaves the map whole: a panic elsewhere while the
        // lock was held cannot have left it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl HeadsState {
    fn insert(&mut self, store: StoreId, sender: watch::Sender<u64>) {
        if self.senders.len() >= self.sweep_at {
            self.senders.retain(|_, sender| sender.receiver_count() > 0);
            self.sweep_at = (self.senders.len() * 2).max(HEADS_SWEEP_LEN_MIN);
        }
        self.senders.insert(store, sender);
    }
}

/// The NOTIFY payload of `store` at `head`: `<store hex>:<head>`, nothing else.
pub(super) fn payload(store: &StoreId, head: u64) -> String {
    format!("{store}:{head}")
}

/// The NOTIFY payload of a rekey of `store`: `<store hex>:rekey`. It
/// carries no fingerprint: a node only learns that it must re-check.
pub(super) fn rekey_payload(store: &StoreId) -> String {
    format!("{store}:{REKEY_MARK}")
}

/// What follows the store in a rekey's payload. Not a number, so a node
/// that knows only head payloads ignores it.
const REKEY_MARK: &str = "rekey";

/// What a notification on our channel says.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    /// The store's log grew to this head.
    Head(StoreId, u64),
    /// The store's credential changed.
    Rekey(StoreId),
}

/// The inverse of [`payload`] and [`rekey_payload`]; `None` for anything
/// else.
fn parse_payload(payload: &str) -> Option<Notice> {
    let (store, rest) = payload.split_once(':')?;
    let store = store.parse().ok()?;
    if rest == REKEY_MARK {
        return Some(Notice::Rekey(store));
    }
    Some(Notice::Head(store, rest.parse().ok()?))
}

/// Keeps one LISTEN connection up for the life of the node (the task is
/// aborted when the [`super::PostgresRelay`] is dropped), reconnecting with
/// a bounded backoff.
pub(super) async fn listen(shared: Arc<Shared>, listening: watch::Sender<bool>) {
    let mut backoff = LISTEN_BACKOFF_MIN;
    loop {
        let was_listening = listen_once(&shared, &listening).await;
        listening.send_replace(false);
        if was_listening {
            backoff = LISTEN_BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

/// One LISTEN connection, from connect to loss. Returns whether it got as
/// far as listening (then the next attempt starts from the shortest wait).
async fn listen_once(shared: &Shared, listening: &watch::Sender<bool>) -> bool {
    let Ok((client, mut connection)) = shared.pg_config.connect(NoTls).await else {
        return false;
    };
    // The connection's messages: notifications come out here, and polling
    // this stream is also what drives the client's queries.
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let setup = async {
        client
            .batch_execute(&format!("LISTEN {}", shared.channel))
            .await?;
        // Notifications sent before LISTEN took effect are lost: read the
        // heads of every watched store now, after it.
        let stores = shared.heads.watched();
        let watched: Vec<&[u8]> = stores.iter().map(|store| store.0.as_slice()).collect();
        client
            .query(
                "SELECT store_id, head FROM relay_stores WHERE store_id = ANY($1)",
                &[&watched],
            )
            .await
    };
    tokio::pin!(setup);
    let rows = loop {
        tokio::select! {
            biased;
            message = messages.next() => match message {
                Some(Ok(message)) => shared.deliver(&message),
                Some(Err(_)) | None => return false,
            },
            rows = &mut setup => match rows {
                Ok(rows) => break rows,
                Err(_) => return false,
            },
        }
    };
    for row in rows {
        let (Ok(store), Ok(head)) = (row.try_get::<_, &[u8]>(0), row.try_get::<_, i64>(1)) else {
            continue;
        };
        if let (Ok(store), Ok(head)) = (<[u8; 16]>::try_from(store), u64::try_from(head)) {
            shared.heads.publish(&StoreId(store), head, false);
        }
    }
    // Rekeys while this connection was down were not heard: every watched
    // store's sessions re-check their credential.
    shared.access.bump_all();
    listening.send_replace(true);
    while let Some(Ok(message)) = messages.next().await {
        shared.deliver(&message);
    }
    true
}

impl Shared {
    /// Publishes the head a notification on our channel carries.
    fn deliver(&self, message: &AsyncMessage) {
        let AsyncMessage::Notification(notification) = message else {
            return;
        };
        if notification.channel() != self.channel {
            return;
        }
        match parse_payload(notification.payload()) {
            Some(Notice::Head(store, head)) => self.heads.publish(&store, head, false),
            Some(Notice::Rekey(store)) => self.access.bump(&store),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_rejects_garbage() {
        let store = StoreId([0xAB; 16]);
        let text = payload(&store, 42);
        assert_eq!(text, format!("{}:42", "ab".repeat(16)));
        assert_eq!(parse_payload(&text), Some(Notice::Head(store, 42)));
        let rekey = rekey_payload(&store);
        assert_eq!(rekey, format!("{}:rekey", "ab".repeat(16)));
        assert_eq!(parse_payload(&rekey), Some(Notice::Rekey(store)));
        for bad in [
            "",
            "ab:1",
            "x:y",
            &format!("{store}:-1"),
            &format!("{store}"),
            &format!("{store}:rekeyed"),
            &format!("{store}:rekey:1"),
        ] {
            assert_eq!(parse_payload(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn heads_grow_and_remember() {
        let heads = Heads::new();
        let store = StoreId([1; 16]);
        heads.publish(&store, 3, false);
        let (mut rx, known) = heads.subscribe(&store);
        assert!(!known, "a notification alone does not create a channel");
        assert_eq!(*rx.borrow_and_update(), 0);
        heads.publish(&store, 5, false);
        heads.publish(&store, 4, false);
        assert_eq!(*rx.borrow_and_update(), 5, "heads only grow");
        drop(rx);
        let other = StoreId([2; 16]);
        heads.publish(&other, 7, true);
        let (rx, known) = heads.subscribe(&other);
        assert!(known);
        assert_eq!(*rx.borrow(), 7, "remembered without a watcher");
        assert_eq!(heads.watched(), vec![other]);
    }

    #[test]
    fn unwatched_heads_are_swept() {
        let heads = Heads::new();
        let kept: Vec<_> = (0..10u32)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_be_bytes());
                heads.subscribe(&StoreId(id)).0
            })
            .collect();
        for i in 10..20_000u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            heads.publish(&StoreId(id), 1, true);
            assert!(heads.lock().senders.len() <= 2 * kept.len() + HEADS_SWEEP_LEN_MIN + 1);
        }
        assert_eq!(heads.watched().len(), kept.len());
    }
}
