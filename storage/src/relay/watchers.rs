//! Per-store head channels: how an append tells the sessions subscribed to
//! its store that the log grew.
//!
//! A channel is made on the first [`Watchers::subscribe`] for a store and
//! dropped once it has no receiver: at the next publish for that store, or
//! by a sweep that runs when the map has doubled since the last one. So
//! the map holds at most about twice as many channels as stores with a
//! live subscriber (and at least [`WATCH_SWEEP_LEN_MIN`] before sweeping),
//! at amortised O(1) cost per subscribe.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use persist_core::StoreId;
use tokio::sync::watch;

/// Channels the map holds before the first sweep for unused ones: sweeping
/// a handful is not worth the walk.
const WATCH_SWEEP_LEN_MIN: usize = 64;

/// The head channels of every store someone watches.
#[derive(Debug)]
pub(super) struct Watchers {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    senders: BTreeMap<StoreId, watch::Sender<u64>>,
    /// Sweep when `senders` reaches this length.
    sweep_at: usize,
}

impl Watchers {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                senders: BTreeMap::new(),
                sweep_at: WATCH_SWEEP_LEN_MIN,
            }),
        }
    }

    /// A receiver of `store`'s head. If the store has no channel yet, one
    /// is made starting at `head()`, which is read under the same lock that
    /// [`Watchers::publish`] takes: an append that commits after the read
    /// publishes to the new channel, so no growth is missed.
    pub(super) fn subscribe(
        &self,
        store: &StoreId,
        head: impl FnOnce() -> u64,
    ) -> watch::Receiver<u64> {
        let mut state = self.lock();
        if let Some(sender) = state.senders.get(store) {
            return sender.subscribe();
        }
        if state.senders.len() >= state.sweep_at {
            state
                .senders
                .retain(|_, sender| sender.receiver_count() > 0);
            state.sweep_at = (state.senders.len() * 2).max(WATCH_SWEEP_LEN_MIN);
        }
        let (sender, receiver) = watch::channel(head());
        state.senders.insert(*store, sender);
        receiver
    }

    /// Tells `store`'s subscribers its head is now `head`, unless they have
    /// seen as high already (two appends may publish out of commit order).
    pub(super) fn publish(&self, store: &StoreId, head: u64) {
        let mut state = self.lock();
        let Some(sender) = state.senders.get(store) else {
            return;
        };
        if sender.receiver_count() == 0 {
            state.senders.remove(store);
            return;
        }
        sender.send_if_modified(|current| {
            let grows = head > *current;
            if grows {
                *current = head;
            }
            grows
        });
    }

    /// Moves `store`'s channel on by one, for channels that count events
    /// rather than carry a head (a store's credential changed).
    pub(super) fn bump(&self, store: &StoreId) {
        let mut state = self.lock();
        let Some(sender) = state.senders.get(store) else {
            return;
        };
        if sender.receiver_count() == 0 {
            state.senders.remove(store);
            return;
        }
        sender.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// [`Watchers::bump`] for every store someone watches, when events may
    /// have been missed.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) fn bump_all(&self) {
        let mut state = self.lock();
        state
            .senders
            .retain(|_, sender| sender.receiver_count() > 0);
        for sender in state.senders.values() {
            sender.send_modify(|count| *count = count.wrapping_add(1));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every operation leaves the map whole: a panic elsewhere while
        // the lock was held cannot have left it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().senders.len()
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
}
