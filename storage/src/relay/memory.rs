//! [`MemoryRelay`]: the relay backend in memory, for tests and simulations.
//!
//! Every operation takes one lock over the whole state and never blocks on
//! IO, so it runs inline on any runtime; an operation that fails changes
//! nothing. Nothing survives the value: a "restart" of a memory relay is a
//! new, empty one.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::{Mutex, MutexGuard, PoisonError};

use persist_core::lww::{Precedence, wins};
use persist_core::protocol::{LogEntry, MAILBOX_ITEMS_MAX, MailboxItem};
use persist_core::{DeviceId, Locator, StoreId};

use super::page::Pager;
use super::watchers::Watchers;
use super::{
    Appended, Incoming, MAILBOX_FETCH_BYTES_TARGET, MAILBOX_FETCH_ITEMS_MAX, PULL_BYTES_TARGET_MAX,
    PULL_ENTRIES_MAX, Page, RelayBackend, RelayError, RelayStats, StoreAccess, check_append,
    check_mailbox_payload, fingerprints_match,
};

/// The relay backend in memory. See the `relay` module docs for the
/// semantics it shares with [`super::RedbRelay`].
pub struct MemoryRelay {
    state: Mutex<State>,
    watchers: Watchers,
    /// Per store, moved on by every rekey.
    access: Watchers,
}

#[derive(Default)]
struct State {
    stores: BTreeMap<StoreId, Store>,
    /// Live log entries over all stores.
    entries: u64,
    /// Their envelope bytes.
    envelope_bytes: u64,
}

struct Store {
    fingerprint: [u8; 32],
    head: u64,
    /// seq → (locator, envelope).
    log: BTreeMap<u64, (Locator, Vec<u8>)>,
    /// locator → (seq of its log entry, its precedence).
    index: BTreeMap<Locator, (u64, Precedence)>,
    mailboxes: BTreeMap<DeviceId, Mailbox>,
}

#[derive(Default)]
struct Mailbox {
    /// The last seq handed out; kept when the mailbox empties.
    last: u64,
    items: BTreeMap<u64, Vec<u8>>,
}

impl MemoryRelay {
    /// An empty relay.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            watchers: Watchers::new(),
            access: Watchers::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Operations check everything that can fail before they change
        // anything, so a panic while the lock was held (a bug) cannot have
        // left the state half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryRelay {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryRelay")
            .field("stores", &state.stores.len())
            .field("entries", &state.entries)
            .field("envelope_bytes", &state.envelope_bytes)
            .finish_non_exhaustive()
    }
}

impl State {
    fn store(&self, store: &StoreId) -> Result<&Store, RelayError> {
        self.stores.get(store).ok_or(RelayError::UnknownStore)
    }

    fn store_mut(&mut self, store: &StoreId) -> Result<&mut Store, RelayError> {
        self.stores.get_mut(store).ok_or(RelayError::UnknownStore)
    }
}

impl RelayBackend for MemoryRelay {
    async fn open_store(
        &self,
        store: &StoreId,
        access_fingerprint: &[u8; 32],
        may_create: bool,
    ) -> Result<StoreAccess, RelayError> {
        let mut state = self.lock();
        match state.stores.get(store) {
            Some(found) if fingerprints_match(&found.fingerprint, access_fingerprint) => {
                Ok(StoreAccess {
                    created: false,
                    head: found.head,
                })
            }
            Some(_) => Err(RelayError::Unauthorized),
            None if may_create => {
                state.stores.insert(
                    *store,
                    Store {
                        fingerprint: *access_fingerprint,
                        head: 0,
                        log: BTreeMap::new(),
                        index: BTreeMap::new(),
                        mailboxes: BTreeMap::new(),
                    },
                );
                Ok(StoreAccess {
                    created: true,
                    head: 0,
                })
            }
            None => Err(RelayError::AdmissionRequired),
        }
    }

    async fn append(
        &self,
        store: &StoreId,
        entries: Vec<Incoming>,
    ) -> Result<Appended, RelayError> {
        check_append(&entries)?;
        let appended = {
            let mut state = self.lock();
            let State {
                stores,
                entries: live,
                envelope_bytes,
            } = &mut *state;
            let target = stores.get_mut(store).ok_or(RelayError::UnknownStore)?;
            // Checked before anything changes: at most every entry is accepted.
            if target.head.checked_add(entries.len() as u64).is_none() {
                return Err(RelayError::Unavailable(
                    "the store's sequence numbers are exhausted".into(),
                ));
            }
            let (mut accepted, mut stale) = (0u32, 0u32);
            for entry in entries {
                let current = target.index.get(&entry.locator).copied();
                if let Some((_, held)) = current
                    && !wins(entry.precedence, held)
                {
                    stale += 1;
                    continue;
                }
                if let Some((old_seq, _)) = current
                    && let Some((_, old)) = target.log.remove(&old_seq)
                {
                    *live -= 1;
                    *envelope_bytes -= old.len() as u64;
                }
                target.head += 1;
                *live += 1;
                *envelope_bytes += entry.envelope.len() as u64;
                target
                    .index
                    .insert(entry.locator, (target.head, entry.precedence));
                target
                    .log
                    .insert(target.head, (entry.locator, entry.envelope));
                accepted += 1;
            }
            Appended {
                accepted,
                stale,
                head: target.head,
            }
        };
        if appended.accepted > 0 {
            self.watchers.publish(store, appended.head);
        }
        Ok(appended)
    }

    async fn pull(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> Result<Page, RelayError> {
        let state = self.lock();
        let found = state.store(store)?;
        let mut pager = Pager::new(
            limit.min(PULL_ENTRIES_MAX),
            bytes_target.min(PULL_BYTES_TARGET_MAX),
        );
        let mut entries = Vec::new();
        let mut more = false;
        for (&seq, (locator, envelope)) in found.log.range((Excluded(since), Unbounded)) {
            if !pager.admit(envelope.len()) {
                more = true;
                break;
            }
            entries.push(LogEntry {
                seq,
                locator: *locator,
                envelope: envelope.clone(),
            });
        }
        let cursor = entries.last().map_or(since, |entry| entry.seq);
        Ok(Page {
            entries,
            cursor,
            more,
        })
    }

    async fn head(&self, store: &StoreId) -> Result<u64, RelayError> {
        Ok(self.lock().store(store)?.head)
    }

    fn watch(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.watchers.subscribe(store, || {
            self.lock().store(store).map_or(0, |found| found.head)
        })
    }

    async fn mailbox_put(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        payload: Vec<u8>,
    ) -> Result<u64, RelayError> {
        check_mailbox_payload(&payload)?;
        let mut state = self.lock();
        let target = state
            .store_mut(store)?
            .mailboxes
            .entry(*mailbox)
            .or_default();
        if target.items.len() >= MAILBOX_ITEMS_MAX {
            return Err(RelayError::MailboxFull {
                max: MAILBOX_ITEMS_MAX,
            });
        }
        let seq = target.last.checked_add(1).ok_or_else(|| {
            RelayError::Unavailable("the mailbox's sequence numbers are exhausted".into())
        })?;
        target.last = seq;
        target.items.insert(seq, payload);
        Ok(seq)
    }

    async fn mailbox_fetch(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<MailboxItem>, RelayError> {
        let state = self.lock();
        let Some(found) = state.store(store)?.mailboxes.get(mailbox) else {
            return Ok(Vec::new());
        };
        let mut pager = Pager::new(
            limit.min(MAILBOX_FETCH_ITEMS_MAX),
            MAILBOX_FETCH_BYTES_TARGET,
        );
        Ok(found
            .items
            .range((Excluded(since), Unbounded))
            .take_while(|(_, payload)| pager.admit(payload.len()))
            .map(|(&seq, payload)| MailboxItem {
                seq,
                payload: payload.clone(),
            })
            .collect())
    }

    async fn mailbox_ack(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        upto: u64,
    ) -> Result<(), RelayError> {
        let mut state = self.lock();
        if let Some(found) = state.store_mut(store)?.mailboxes.get_mut(mailbox) {
            // At most MAILBOX_ITEMS_MAX items: a walk is cheap.
            found.items.retain(|&seq, _| seq > upto);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<RelayStats, RelayError> {
        let state = self.lock();
        Ok(RelayStats {
            stores: state.stores.len() as u64,
            entries: state.entries,
            envelope_bytes: state.envelope_bytes,
        })
    }

    async fn rekey(
        &self,
        store: &StoreId,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> Result<(), RelayError> {
        {
            let mut state = self.lock();
            let found = state.store_mut(store)?;
            if !fingerprints_match(&found.fingerprint, old) {
                return Err(RelayError::Unauthorized);
            }
            found.fingerprint = *new;
        }
        self.access.bump(store);
        Ok(())
    }

    fn access_changes(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.access.subscribe(store, || 0)
    }
}
