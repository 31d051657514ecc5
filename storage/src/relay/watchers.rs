//! Per-store head channels: how an append tells the sessions subscribed to
//! its store that the log grew.
//!
//! Every subscriber gets a `watch` channel of its own, and a publish sends
//! to a store's subscribers in the order they subscribed. One channel
//! shared by all of a store's sessions would not do: tokio files the tasks
//! waiting on a `watch` channel under eight `Notify` shards picked by its
//! runtime RNG, which is seeded from the OS, and a send wakes them shard by
//! shard. The order the sessions wake in, and so the order they send their
//! `Notify` frames and their devices pull, would differ from one process to
//! the next, and a simulation, which runs every device and the relay on
//! one paused thread, would not replay its seed (DESIGN.md,
//! "Determinism"). A channel with one receiver has one waiter; the wake
//! order is then this module's.
//!
//! A store's entry is made on the first [`Watchers::subscribe`] for it.
//! Subscriptions whose receiver is gone are dropped at the next publish to
//! their store, or by a sweep when the store's list has doubled since its
//! last sweep; a store left without subscriptions is dropped at its next
//! publish, or by a sweep when the map has doubled since its last one. So
//! the map holds at most about twice as many stores as stores with a live
//! subscriber (and at least [`WATCH_SWEEP_LEN_MIN`] before sweeping), and a
//! store's list about twice its live subscriptions (at least
//! [`SUBSCRIBERS_SWEEP_LEN_MIN`]), at amortised O(1) cost per subscribe.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use persist_core::StoreId;
use tokio::sync::watch;

/// Stores the map holds before the first sweep for unused ones: sweeping
/// a handful is not worth the walk.
const WATCH_SWEEP_LEN_MIN: usize = 64;

/// Subscriptions a store's list holds before the first sweep for closed
/// ones: a store has about one live subscription per connected device.
const SUBSCRIBERS_SWEEP_LEN_MIN: usize = 16;

/// The head channels of every store someone watches.
#[derive(Debug)]
pub(super) struct Watchers {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    stores: BTreeMap<StoreId, Subscribers>,
    /// Sweep `stores` when it reaches this length.
    sweep_at: usize,
}

/// One store's subscriptions.
#[derive(Debug)]
struct Subscribers {
    /// The last value sent: a new subscriber starts at it, marked seen.
    value: u64,
    /// One sender per receiver handed out, in subscription order, which is
    /// the order a send wakes them in.
    senders: Vec<watch::Sender<u64>>,
    /// Sweep `senders` when it reaches this length.
    sweep_at: usize,
}

impl Watchers {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                stores: BTreeMap::new(),
                sweep_at: WATCH_SWEEP_LEN_MIN,
            }),
        }
    }

    /// A receiver of `store`'s head. If the store has no entry yet, one
    /// is made starting at `head()`, which is read under the same lock that
    /// [`Watchers::publish`] takes: an append that commits after the read
    /// publishes to the new receiver, so no growth is missed.
    pub(super) fn subscribe(
        &self,
        store: &StoreId,
        head: impl FnOnce() -> u64,
    ) -> watch::Receiver<u64> {
        let mut state = self.lock();
        if let Some(subscribers) = state.stores.get_mut(store) {
            return subscribers.subscribe();
        }
        if state.stores.len() >= state.sweep_at {
            state.stores.retain(|_, subscribers| subscribers.sweep());
            state.sweep_at = (state.stores.len() * 2).max(WATCH_SWEEP_LEN_MIN);
        }
        state
            .stores
            .entry(*store)
            .or_insert(Subscribers::new(head()))
            .subscribe()
    }

    /// Tells `store`'s subscribers its head is now `head`, unless they have
    /// seen as high already (two appends may publish out of commit order).
    pub(super) fn publish(&self, store: &StoreId, head: u64) {
        self.send(store, |current| (head > current).then_some(head));
    }

    /// Moves `store`'s channel on by one, for channels that count events
    /// rather than carry a head (a store's credential changed).
    pub(super) fn bump(&self, store: &StoreId) {
        self.send(store, |count| Some(count.wrapping_add(1)));
    }

    /// [`Watchers::bump`] for every store someone watches, when events may
    /// have been missed.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) fn bump_all(&self) {
        let mut state = self.lock();
        state.stores.retain(|_, subscribers| {
            let count = subscribers.value.wrapping_add(1);
            subscribers.send(count)
        });
    }

    /// Sends `next(value)`, if any, to `store`'s live subscribers; drops the
    /// store's entry if it has none left.
    fn send(&self, store: &StoreId, next: impl FnOnce(u64) -> Option<u64>) {
        let mut state = self.lock();
        let Some(subscribers) = state.stores.get_mut(store) else {
            return;
        };
        let live = match next(subscribers.value) {
            Some(value) => subscribers.send(value),
            None => subscribers.sweep(),
        };
        if !live {
            state.stores.remove(store);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every operation leaves the map whole: a panic elsewhere while
        // the lock was held cannot have left it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().stores.len()
    }

    #[cfg(test)]
    fn subscriptions(&self, store: &StoreId) -> usize {
        self.lock()
            .stores
            .get(store)
            .map_or(0, |subscribers| subscribers.senders.len())
    }
}

impl Subscribers {
    fn new(value: u64) -> Self {
        Self {
            value,
            senders: Vec::new(),
            sweep_at: SUBSCRIBERS_SWEEP_LEN_MIN,
        }
    }

    fn subscribe(&mut self) -> watch::Receiver<u64> {
        if self.senders.len() >= self.sweep_at {
            self.sweep();
            self.sweep_at = (self.senders.len() * 2).max(SUBSCRIBERS_SWEEP_LEN_MIN);
        }
        let (sender, receiver) = watch::channel(self.value);
        self.senders.push(sender);
        receiver
    }

    /// Drops the subscriptions whose receiver is gone; whether any is left.
    fn sweep(&mut self) -> bool {
        self.senders.retain(|sender| !sender.is_closed());
        !self.senders.is_empty()
    }

    /// Sends `value` to every live subscriber, in subscription order;
    /// whether any is left.
    fn send(&mut self, value: u64) -> bool {
        self.value = value;
        let live = self.sweep();
        for sender in &self.senders {
            sender.send_replace(value);
        }
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(i: u32) -> StoreId {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        StoreId(id)
    }

    #[test]
    fn heads_only_grow_and_reach_every_subscriber() {
        let watchers = Watchers::new();
        let mut a = watchers.subscribe(&store(1), || 5);
        let mut b = watchers.subscribe(&store(1), || unreachable!("channel exists"));
        assert_eq!(*a.borrow_and_update(), 5);
        watchers.publish(&store(1), 7);
        watchers.publish(&store(1), 6);
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
        assert_eq!(*a.borrow_and_update(), 7);
        assert_eq!(*b.borrow_and_update(), 7);
        watchers.publish(&store(2), 9);
        assert!(!a.has_changed().unwrap(), "other stores do not wake it");
    }

    #[test]
    fn bumps_reach_only_their_store_and_bump_all_reaches_all() {
        let watchers = Watchers::new();
        let mut a = watchers.subscribe(&store(1), || 0);
        let b = watchers.subscribe(&store(2), || 0);
        watchers.bump(&store(1));
        assert!(a.has_changed().unwrap());
        assert!(!b.has_changed().unwrap(), "other stores do not wake it");
        a.borrow_and_update();
        watchers.bump(&store(9));
        watchers.bump_all();
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
        drop(b);
        watchers.bump_all();
        assert_eq!(watchers.len(), 1, "unwatched channels are dropped");
    }

    #[test]
    fn channels_without_receivers_are_dropped() {
        let watchers = Watchers::new();
        drop(watchers.subscribe(&store(1), || 0));
        watchers.publish(&store(1), 1);
        assert_eq!(watchers.len(), 0, "dropped at publish");

        let kept: Vec<_> = (0..10)
            .map(|i| watchers.subscribe(&store(i), || 0))
            .collect();
        for i in 10..10_000 {
            drop(watchers.subscribe(&store(i), || 0));
            assert!(watchers.len() <= 2 * kept.len() + WATCH_SWEEP_LEN_MIN + 1);
        }
        let mut again = watchers.subscribe(&store(3), || unreachable!("kept"));
        watchers.publish(&store(3), 4);
        assert_eq!(*again.borrow_and_update(), 4);
    }

    #[test]
    fn closed_subscriptions_of_a_store_are_dropped() {
        let watchers = Watchers::new();
        let kept: Vec<_> = (0..3)
            .map(|_| watchers.subscribe(&store(1), || 0))
            .collect();
        for _ in 0..10_000 {
            drop(watchers.subscribe(&store(1), || unreachable!("kept")));
            assert!(
                watchers.subscriptions(&store(1)) <= 2 * kept.len() + SUBSCRIBERS_SWEEP_LEN_MIN + 1
            );
        }
        watchers.publish(&store(1), 1);
        assert_eq!(
            watchers.subscriptions(&store(1)),
            kept.len(),
            "swept at publish"
        );
        drop(kept);
        watchers.bump(&store(1));
        assert_eq!(watchers.len(), 0, "a store without subscribers is dropped");
    }

    /// The property the module exists for: on one thread, a publish wakes
    /// the waiting subscribers in the order they subscribed, in every
    /// process. (A shared `watch` channel wakes them in an order drawn from
    /// tokio's OS-seeded RNG: 32 waiters would not come out in order.)
    #[test]
    fn a_publish_wakes_subscribers_in_subscription_order() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let watchers = Watchers::new();
            let woke = std::sync::Arc::new(Mutex::new(Vec::new()));
            let tasks: Vec<_> = (0..32)
                .map(|i| {
                    let mut receiver = watchers.subscribe(&store(1), || 0);
                    let woke = woke.clone();
                    tokio::spawn(async move {
                        receiver.changed().await.unwrap();
                        woke.lock().unwrap().push(i);
                    })
                })
                .collect();
            // Let every task start waiting.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            assert!(woke.lock().unwrap().is_empty());
            watchers.publish(&store(1), 1);
            for task in tasks {
                task.await.unwrap();
            }
            assert_eq!(*woke.lock().unwrap(), (0..32).collect::<Vec<_>>());
        });
    }
}
