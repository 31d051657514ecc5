//! Pairing with invites through a relay node over QUIC: a new device joins
//! with a one-time code, bad codes fail before anything is written, and a
//! relay that tampers with the handshake gets no keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use persist::{
    DeviceId, Entropy, FaultPlan, FaultPoint, Faults, InviteError, JoinError, KeyError, OpenError,
    PairingError, Refusal, Store, SyncConfig,
};
use persist_relay::{Admission, RelayHandle};
use persist_storage::relay::{MemoryRelay, RelayBackend};

use common::devices::{SETTLE, device, nothing_written, relay, relay_on, remote, until};

async fn converge(stores: &[&Store]) {
    for _ in 0..2 {
        for s in stores {
            s.sync_now().await.expect("sync");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_pairs_a_new_device_and_a_third_reads_the_whole_history() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let a = Store::open(device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    for i in 0..20 {
        a.put(&format!("notes/{i:02}"), &format!("written on a, #{i}"))
            .await
            .unwrap();
    }
    let invite = a.crypto().create_invite().await.expect("invite");
    assert!(invite.code().starts_with("persist-invite-v1:"));

    // B has no sync config: the code names the relay and its pin.
    let b = Store::open(device(tmp.path(), "b").invite(invite.code()))
        .await
        .expect("b joins");
    assert_eq!(b.info().store_id, a.info().store_id);
    assert_ne!(b.info().device_id, a.info().device_id);
    let joined = tokio::time::timeout(SETTLE, a.crypto().invite_used(&invite))
        .await
        .expect("a learns the invite was used")
        .unwrap();
    assert_eq!(joined, b.info().device_id);
    b.put("notes/from-b", "hello from b").await.unwrap();
    converge(&[&a, &b]).await;
    assert_eq!(b.list::<String>("notes/").await.unwrap().len(), 21);
    assert_eq!(
        a.get::<String>("notes/from-b").await.unwrap().as_deref(),
        Some("hello from b")
    );
    let devices = a.crypto().devices().await.unwrap();
    let b_entry = devices
        .iter()
        .find(|d| d.id == b.info().device_id)
        .expect("a lists b");
    assert_eq!(b_entry.added_by, a.info().device_id, "a added b");
    assert_eq!(b_entry.name, "b");
    assert!(
        devices
            .iter()
            .any(|d| d.this_device && d.id == a.info().device_id)
    );

    // A third device, invited by B, reads everything written before.
    let invite = b.crypto().create_invite().await.unwrap();
    let c = Store::open(device(tmp.path(), "c").invite(invite.code()))
        .await
        .expect("c joins");
    c.sync_now().await.unwrap();
    let all = c.list::<String>("notes/").await.unwrap();
    assert_eq!(all.len(), 21, "c reads the full history");
    assert_eq!(
        all[0],
        ("notes/00".to_owned(), "written on a, #0".to_owned())
    );
    c.put("notes/from-c", "hello from c").await.unwrap();
    converge(&[&c, &a, &b]).await;
    until("a reads c's write", async || {
        a.get::<String>("notes/from-c").await.unwrap().is_some()
    })
    .await;
    let c_entry_on_b = b
        .crypto()
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.id == c.info().device_id)
        .expect("b lists c");
    assert_eq!(c_entry_on_b.added_by, b.info().device_id);

    for s in [a, b, c] {
        s.close().await.unwrap();
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_works_once_and_bad_codes_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let a = Store::open(device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    let invite = a.crypto().create_invite().await.unwrap();
    let code = invite.code().to_owned();

    // Lifetimes out of range make no invite.
    for ttl in [Duration::ZERO, Duration::from_secs(31 * 86_400)] {
        assert!(
            matches!(
                a.crypto().create_invite_for(ttl).await,
                Err(KeyError::InviteLifetime { asked, max_days: 30 }) if asked == ttl
            ),
            "{ttl:?}"
        );
    }
    // Waiting on an invite nobody takes ends when it expires.
    let short = a
        .crypto()
        .create_invite_for(Duration::from_millis(300))
        .await
        .unwrap();
    assert!(matches!(
        a.crypto().invite_used(&short).await,
        Err(KeyError::InviteExpired)
    ));

    // Truncated and edited codes.
    let truncated = &code[..code.len() - 5];
    let err = Store::open(device(tmp.path(), "t").invite(truncated))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpenError::Invite(InviteError::Damaged)),
        "{err}"
    );
    nothing_written(tmp.path(), "t");
    let mut edited = code.clone().into_bytes();
    let at = edited.len() - 10;
    edited[at] = if edited[at] == b'x' { b'y' } else { b'x' };
    let edited = String::from_utf8(edited).unwrap();
    let err = Store::open(device(tmp.path(), "e").invite(&edited))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpenError::Invite(InviteError::Damaged)),
        "{err}"
    );
    assert!(err.to_string().contains("copy it again"), "{err}");
    nothing_written(tmp.path(), "e");
    let err = Store::open(device(tmp.path(), "n").invite("hello"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpenError::Invite(InviteError::NotAnInvite)),
        "{err}"
    );

    // The code works once.
    let b = Store::open(device(tmp.path(), "b").invite(&code))
        .await
        .expect("b joins");
    let err = Store::open(device(tmp.path(), "c").invite(&code).invite_timeout(SETTLE))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Join(JoinError::Pairing(PairingError::Refused(Refusal::Used)))
        ),
        "{err}"
    );
    assert!(err.to_string().contains("already used"), "{err}");
    nothing_written(tmp.path(), "c");
    let devices = a.crypto().devices().await.unwrap();
    assert_eq!(devices.len(), 2, "only b joined: {devices:?}");

    // An invite into a directory that already holds a store.
    let invite = a.crypto().create_invite().await.unwrap();
    let b_dir = device(tmp.path(), "b").path().to_owned();
    b.close().await.unwrap();
    let err = Store::open(device(tmp.path(), "b").invite(invite.code()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpenError::InviteIntoExistingStore { .. }),
        "{err}"
    );
    assert!(b_dir.join(persist::DB_FILE).exists());

    // An expired invite.
    let short = a
        .crypto()
        .create_invite_for(Duration::from_millis(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let err = Store::open(device(tmp.path(), "x").invite(short.code()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpenError::Invite(InviteError::Expired { .. })),
        "{err}"
    );
    nothing_written(tmp.path(), "x");
    assert!(
        a.crypto()
            .create_invite_for(Duration::from_secs(365 * 86_400))
            .await
            .is_err(),
        "a year is over the limit"
    );

    // A code for another relay than the one configured.
    let other = relay_on(
        &tmp.path().join("other"),
        MemoryRelay::new(),
        Admission::Open,
    )
    .await;
    let err = Store::open(
        device(tmp.path(), "o")
            .invite(invite.code())
            .sync(SyncConfig::new(remote(&other))),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, OpenError::InviteForOtherRelay { .. }),
        "{err}"
    );
    nothing_written(tmp.path(), "o");

    a.close().await.unwrap();
    other.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_waits_for_an_offline_inviter_or_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let a_config = || device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay)));
    let a = Store::open(a_config()).await.unwrap();
    a.put("before", "written before b joined").await.unwrap();
    let late = a.crypto().create_invite().await.unwrap();
    let never = a.crypto().create_invite().await.unwrap();
    a.sync_now().await.unwrap();
    a.close().await.unwrap();

    // Nobody answers: a clear timeout, nothing written.
    let err = Store::open(
        device(tmp.path(), "n")
            .invite(never.code())
            .invite_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, OpenError::Join(JoinError::TimedOut { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("did not answer"), "{err}");
    nothing_written(tmp.path(), "n");

    // B waits; A comes back online and answers the invite it made before
    // closing.
    let b_config = device(tmp.path(), "b").invite(late.code());
    let joining = tokio::spawn(Store::open(b_config));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!joining.is_finished(), "b cannot join while a is offline");
    let a = Store::open(a_config()).await.unwrap();
    let b = joining.await.unwrap().expect("b joins once a is back");
    b.sync_now().await.unwrap();
    assert_eq!(
        b.get::<String>("before").await.unwrap().as_deref(),
        Some("written before b joined")
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.shutdown().await;
}

/// Device A, syncing with `sync`, writes `before`, pairs B by invite and
/// syncs with it; B closes, and A rotates and reseals everything. Returns
/// A, B's id and the new epoch.
async fn rotate_while_b_is_away(tmp: &Path, sync: SyncConfig) -> (Store, DeviceId, u32) {
    let a = Store::open(device(tmp, "a").sync(sync)).await.unwrap();
    a.put("before", "written under the first epoch")
        .await
        .unwrap();
    let invite = a.crypto().create_invite().await.unwrap();
    let b = Store::open(device(tmp, "b").invite(invite.code()))
        .await
        .unwrap();
    let b_id = b.info().device_id;
    converge(&[&a, &b]).await;
    b.close().await.unwrap();
    let rotation = a.crypto().rotate_key().await.unwrap();
    let new_epoch = rotation.epoch();
    rotation.wait().await.unwrap();
    (a, b_id, new_epoch)
}

/// The status of the epoch before `current` on `store`.
async fn old_epoch(store: &Store, current: u32) -> persist::EpochStatus {
    store
        .status()
        .await
        .unwrap()
        .epochs
        .into_iter()
        .find(|e| e.epoch + 1 == current)
        .expect("the epoch before the rotation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_offline_during_a_rotation_gets_the_key_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    // B is offline: A rotates, re-encrypts everything, and writes more.
    let (a, b_id, new_epoch) =
        rotate_while_b_is_away(tmp.path(), SyncConfig::new(remote(&relay))).await;
    // Every record of A's is resealed, but the old epoch does not retire
    // while B, which may still write under it, has not taken the new key.
    let old = old_epoch(&a, new_epoch).await;
    assert_eq!((old.state, old.records), ("rotating", 0), "{old:?}");
    assert_eq!(old.retire_waits_for, [b_id.to_string()]);
    assert!(old.retire_due_ms.is_some(), "{old:?}");
    assert!(matches!(
        a.crypto().purge_retired_keys().await.as_deref(),
        Ok([])
    ));
    a.put("after", "written under the new epoch").await.unwrap();
    a.sync_now().await.unwrap();

    // B comes back: the key waits in its mailbox.
    let b = Store::open(device(tmp.path(), "b").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    until("b reads what was written after the rotation", async || {
        let _ = b.sync_now().await;
        b.get::<String>("after").await.unwrap().is_some()
    })
    .await;
    assert_eq!(
        b.get::<String>("before").await.unwrap().as_deref(),
        Some("written under the first epoch")
    );
    let status = b.status().await.unwrap();
    assert_eq!(
        status.current_epoch, new_epoch,
        "b writes under the new key"
    );
    assert_eq!(b.sync_status().unwrap().held, 0, "nothing stays held");
    // B's acknowledgement reaches A.
    until("a hears that b holds the new key", async || {
        let _ = a.sync_now().await;
        a.status()
            .await
            .unwrap()
            .epochs
            .iter()
            .any(|e| e.epoch == new_epoch && e.acknowledged_by.contains(&b_id.to_string()))
    })
    .await;
    // With it, the old epoch retires.
    let old = old_epoch(&a, new_epoch).await;
    assert_eq!(old.state, "retired", "{old:?}");
    assert!(old.retire_waits_for.is_empty(), "{old:?}");
    // And B's new writes are readable on A.
    b.put("from-b", "after the rotation").await.unwrap();
    converge(&[&b, &a]).await;
    assert_eq!(
        a.get::<String>("from-b").await.unwrap().as_deref(),
        Some("after the rotation")
    );
    // A keeps the acknowledgement, which the relay no longer holds: after
    // a reopen without sync, nothing could have brought it again.
    a.close().await.unwrap();
    let a = Store::open(device(tmp.path(), "a")).await.unwrap();
    let acked = a.status().await.unwrap().epochs;
    assert!(
        acked
            .iter()
            .any(|e| e.epoch == new_epoch && e.acknowledged_by == [b_id.to_string()]),
        "{acked:?}"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.shutdown().await;
}

/// What a [`Tampering`] relay does to pairing mailboxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    Honest,
    /// Store the joiner's first message twice.
    ReplayFirst,
    /// Replace the joiner's first message by one the relay made with its
    /// own keys.
    SubstituteFirst,
    /// Replace the inviter's answer by bytes of the relay's choosing.
    SubstituteAnswer,
}

/// A relay backend that keeps every byte it is handed and attacks the
/// pairing mailboxes when told to.
struct Tampering {
    inner: MemoryRelay,
    attack: Arc<Mutex<Attack>>,
    puts: Mutex<u32>,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Tampering {
    fn record(&self, bytes: &[u8]) {
        self.seen.lock().unwrap().extend_from_slice(bytes);
    }
}

impl RelayBackend for Tampering {
    async fn open_store(
        &self,
        store: &persist::StoreId,
        fingerprint: &[u8; 32],
        may_create: bool,
    ) -> Result<persist_storage::relay::StoreAccess, persist_storage::relay::RelayError> {
        self.record(fingerprint);
        self.inner.open_store(store, fingerprint, may_create).await
    }

    async fn append(
        &self,
        store: &persist::StoreId,
        entries: Vec<persist_storage::relay::Incoming>,
    ) -> Result<persist_storage::relay::Appended, persist_storage::relay::RelayError> {
        for e in &entries {
            self.record(&e.locator.0);
            self.record(&e.envelope);
        }
        self.inner.append(store, entries).await
    }

    async fn pull(
        &self,
        store: &persist::StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> Result<persist_storage::relay::Page, persist_storage::relay::RelayError> {
        self.inner.pull(store, since, limit, bytes_target).await
    }

    async fn head(
        &self,
        store: &persist::StoreId,
    ) -> Result<u64, persist_storage::relay::RelayError> {
        self.inner.head(store).await
    }

    fn watch(&self, store: &persist::StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch(store)
    }

    async fn mailbox_put(
        &self,
        store: &persist::StoreId,
        mailbox: &persist::DeviceId,
        payload: Vec<u8>,
    ) -> Result<u64, persist_storage::relay::RelayError> {
        self.record(&payload);
        let n = {
            let mut puts = self.puts.lock().unwrap();
            *puts += 1;
            *puts
        };
        let attack = *self.attack.lock().unwrap();
        match (attack, n) {
            (Attack::ReplayFirst, 1) => {
                self.inner
                    .mailbox_put(store, mailbox, payload.clone())
                    .await?;
                self.inner.mailbox_put(store, mailbox, payload).await
            }
            (Attack::SubstituteFirst, 1) => {
                // The relay knows the invite id (the store it serves) but
                // neither the secret nor the inviter's key.
                let mut rng = persist::SeededEntropy::from_u64(99).stream("mitm");
                let forged = persist_core::invite::Invite {
                    relay: "quic://mitm:1".into(),
                    pin: None,
                    store_id: persist::StoreId([0; 16]),
                    id: persist::InviteId(store.0),
                    inviter: persist::DeviceId([0; 16]),
                    inviter_x25519: persist_core::keys::DeviceIdentity::generate(&mut rng)
                        .x25519_public(),
                    secret: persist_core::keys::Secret32::random(&mut rng),
                    expires_ms: u64::MAX,
                };
                let me = persist_core::keys::DeviceIdentity::generate(&mut rng);
                let (_, first) =
                    persist_core::invite::Joiner::start(&forged, &me, "mitm", Box::new(rng))
                        .unwrap();
                self.inner.mailbox_put(store, mailbox, first).await
            }
            (Attack::SubstituteAnswer, 2) => {
                let forged = vec![0x5a; payload.len()];
                self.inner.mailbox_put(store, mailbox, forged).await
            }
            _ => self.inner.mailbox_put(store, mailbox, payload).await,
        }
    }

    async fn mailbox_fetch(
        &self,
        store: &persist::StoreId,
        mailbox: &persist::DeviceId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<persist_core::protocol::MailboxItem>, persist_storage::relay::RelayError> {
        self.inner.mailbox_fetch(store, mailbox, since, limit).await
    }

    async fn mailbox_ack(
        &self,
        store: &persist::StoreId,
        mailbox: &persist::DeviceId,
        upto: u64,
    ) -> Result<(), persist_storage::relay::RelayError> {
        self.inner.mailbox_ack(store, mailbox, upto).await
    }

    async fn stats(
        &self,
    ) -> Result<persist_storage::relay::RelayStats, persist_storage::relay::RelayError> {
        self.inner.stats().await
    }
}

/// Pairs a new device through a relay that mounts `attack`; returns the
/// outcome, the inviter, and everything the relay was handed.
async fn pair_through(
    tmp: &Path,
    attack: Attack,
) -> (
    Result<Store, OpenError>,
    Store,
    Arc<Mutex<Vec<u8>>>,
    RelayHandle,
    String,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend = Tampering {
        inner: MemoryRelay::new(),
        attack: Arc::new(Mutex::new(attack)),
        puts: Mutex::new(0),
        seen: seen.clone(),
    };
    let relay = relay_on(&tmp.join("relay"), backend, Admission::Open).await;
    let a = Store::open(device(tmp, "a").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    a.put("canary/pairing-path-5d1e", "canary-pairing-value-77a2")
        .await
        .unwrap();
    a.sync_now().await.unwrap();
    let invite = a.crypto().create_invite().await.unwrap();
    let code = invite.code().to_owned();
    let joined = Store::open(
        device(tmp, "b")
            .invite(&code)
            .invite_timeout(Duration::from_secs(4)),
    )
    .await;
    (joined, a, seen, relay, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sees_no_key_during_a_pairing() {
    let tmp = tempfile::tempdir().unwrap();
    let (joined, a, seen, relay, code) = pair_through(tmp.path(), Attack::Honest).await;
    let b = joined.expect("an honest relay pairs");
    b.sync_now().await.unwrap();
    assert_eq!(
        b.get::<String>("canary/pairing-path-5d1e")
            .await
            .unwrap()
            .as_deref(),
        Some("canary-pairing-value-77a2")
    );
    // A rotation sends the new key to b through its mailbox.
    let rotation = a.crypto().rotate_key().await.unwrap();
    let new_epoch = rotation.epoch();
    rotation.wait().await.unwrap();
    until("b receives the new key", async || {
        b.status().await.unwrap().current_epoch == new_epoch
    })
    .await;
    let raw = a.crypto().dangerous().export_raw().await.unwrap();
    let keys = persist_core::export::ExportedKeys::unwrap(&raw, "").unwrap();
    assert!(
        keys.epochs.len() >= 2,
        "the scan covers the rotated key too"
    );
    let invite = persist_core::invite::Invite::decode(&code).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.windows(32)
            .any(|w| w == invite.relay_access().fingerprint()),
        "the recorder saw the pairing store being opened"
    );
    let mut needles: Vec<(&str, Vec<u8>)> = vec![
        ("path", b"canary/pairing-path-5d1e".to_vec()),
        ("value", b"canary-pairing-value-77a2".to_vec()),
        ("index key", keys.index_key.expose().to_vec()),
        ("relay token", keys.relay_token.expose().to_vec()),
        ("invite secret", invite.secret.expose().to_vec()),
        ("invite code", code.as_bytes()[20..60].to_vec()),
    ];
    for (_, e) in &keys.epochs {
        needles.push(("data key", e.key.as_ref().unwrap().expose().to_vec()));
    }
    for (name, needle) in needles {
        for form in [needle.clone(), hex::encode(&needle).into_bytes()] {
            assert!(
                !seen.windows(form.len()).any(|w| w == form.as_slice()),
                "the relay was handed the {name}"
            );
        }
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_replays_or_substitutes_handshake_messages_gets_nothing() {
    for attack in [
        Attack::ReplayFirst,
        Attack::SubstituteFirst,
        Attack::SubstituteAnswer,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (joined, a, _, relay, _) = pair_through(tmp.path(), attack).await;
        let err = joined.expect_err("a tampered pairing must fail");
        match attack {
            Attack::ReplayFirst => assert!(
                matches!(
                    err,
                    OpenError::Join(JoinError::Pairing(PairingError::Aborted(_)))
                ),
                "{attack:?}: {err}"
            ),
            Attack::SubstituteFirst => assert!(
                matches!(err, OpenError::Join(JoinError::TimedOut { .. })),
                "{attack:?}: {err}"
            ),
            Attack::SubstituteAnswer => assert!(
                matches!(
                    err,
                    OpenError::Join(JoinError::Pairing(PairingError::Handshake(_)))
                ),
                "{attack:?}: {err}"
            ),
            Attack::Honest => unreachable!(),
        }
        nothing_written(tmp.path(), "b");
        let devices = a.crypto().devices().await.unwrap();
        assert_eq!(devices.len(), 1, "{attack:?}: nobody joined: {devices:?}");
        a.close().await.unwrap();
        relay.shutdown().await;
    }
}

/// Past the grace period, an old epoch retires without the acknowledgement
/// of a member that stays away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_epoch_retires_without_an_absent_member_after_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let sync = SyncConfig::new(remote(&relay)).retire_grace(Duration::ZERO);
    let (a, _, new_epoch) = rotate_while_b_is_away(tmp.path(), sync).await;
    let old = old_epoch(&a, new_epoch).await;
    assert_eq!((old.state, old.records), ("retired", 0), "{old:?}");
    a.close().await.unwrap();
    relay.shutdown().await;
}

/// The status of `epoch` on `store`.
async fn epoch_status(store: &Store, epoch: u32) -> persist::EpochStatus {
    let status = store.status().await.unwrap();
    status
        .epochs
        .into_iter()
        .find(|e| e.epoch == epoch)
        .unwrap_or_else(|| panic!("epoch {epoch} on {}", store.info().device_id))
}

/// A and B each rotate while the other is away, so both make epoch 2
/// under keys of their own (DESIGN.md, "Rotation and revocation", step 5).
/// Once they sync, each holds both keys, reads what the other sealed under
/// its own, and both seal under the same one; nothing is refused or left
/// held. A device paired afterwards gets both keys and reads everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_on_two_devices_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let sync = || SyncConfig::new(remote(&relay));
    let a = Store::open(device(tmp.path(), "a").sync(sync()))
        .await
        .unwrap();
    a.put("before", "under the first epoch").await.unwrap();
    let invite = a.crypto().create_invite().await.unwrap();
    let b = Store::open(device(tmp.path(), "b").invite(invite.code()))
        .await
        .unwrap();
    converge(&[&a, &b]).await;
    a.close().await.unwrap();
    b.close().await.unwrap();

    // Offline (no sync), each rotates to epoch 2 and writes under it.
    let mut announcements = Vec::new();
    for name in ["a", "b"] {
        let s = Store::open(device(tmp.path(), name)).await.unwrap();
        let rotation = s.crypto().rotate_key().await.unwrap();
        assert_eq!(rotation.epoch(), 2);
        rotation.wait().await.unwrap();
        s.put(&format!("from-{name}"), &format!("{name}'s own epoch 2"))
            .await
            .unwrap();
        let e2 = epoch_status(&s, 2).await;
        assert_eq!(e2.keys, 1);
        announcements.push(e2.announcement);
        s.close().await.unwrap();
    }
    assert_ne!(announcements[0], announcements[1], "two keys of epoch 2");
    let winner = announcements.iter().max().unwrap().clone();

    let a = Store::open(device(tmp.path(), "a").sync(sync()))
        .await
        .unwrap();
    let b = Store::open(device(tmp.path(), "b").sync(sync()))
        .await
        .unwrap();
    until(
        "each reads what the other sealed under its own key",
        async || {
            let _ = a.sync_now().await;
            let _ = b.sync_now().await;
            a.get::<String>("from-b").await.unwrap().is_some()
                && b.get::<String>("from-a").await.unwrap().is_some()
        },
    )
    .await;
    for s in [&a, &b] {
        let e2 = epoch_status(s, 2).await;
        assert_eq!(s.status().await.unwrap().current_epoch, 2);
        assert_eq!(e2.keys, 2, "{e2:?}");
        assert_eq!(e2.announcement, winner, "both seal under the same key");
        let sync = s.sync_status().unwrap();
        assert_eq!((sync.held, sync.refused), (0, 0), "{sync:?}");
        assert_eq!(
            s.get::<String>("before").await.unwrap().as_deref(),
            Some("under the first epoch")
        );
    }
    assert_eq!(
        a.get::<String>("from-b").await.unwrap().as_deref(),
        Some("b's own epoch 2")
    );
    b.put("after", "written once both agree").await.unwrap();
    until("a reads b's write under the agreed key", async || {
        let _ = b.sync_now().await;
        let _ = a.sync_now().await;
        a.get::<String>("after").await.unwrap().is_some()
    })
    .await;

    // A device paired now takes both keys with the keyring.
    let invite = a.crypto().create_invite().await.unwrap();
    let c = Store::open(device(tmp.path(), "c").invite(invite.code()))
        .await
        .unwrap();
    until("c reads everything", async || {
        let _ = c.sync_now().await;
        c.list::<String>("").await.unwrap().len() == 4
    })
    .await;
    let e2 = epoch_status(&c, 2).await;
    assert_eq!((e2.keys, e2.announcement), (2, winner));
    assert_eq!(
        c.get::<String>("from-a").await.unwrap().as_deref(),
        Some("a's own epoch 2")
    );
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
    relay.shutdown().await;
}

/// Fails every commit while `failing` is set, and counts the failures.
#[derive(Default)]
struct FailCommits {
    failing: AtomicBool,
    failed: AtomicU64,
}

impl FaultPlan for FailCommits {
    fn fire(&self, point: FaultPoint) -> Option<u64> {
        let fire = point == FaultPoint::CommitFail && self.failing.load(Ordering::SeqCst);
        if fire {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
        fire.then_some(0)
    }
}

/// Regression (simulation seed 33): a key parcel whose key could not be
/// stored was acknowledged to the mailbox anyway, so the device lost the
/// epoch's key until the sender happened to post it again. It now stays
/// in the mailbox for the next round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_parcel_that_cannot_be_stored_stays_in_the_mailbox() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let (a, _, new_epoch) =
        rotate_while_b_is_away(tmp.path(), SyncConfig::new(remote(&relay))).await;
    // A posts the new key to B's mailbox, then leaves: nobody posts it
    // again.
    a.sync_now().await.unwrap();
    a.close().await.unwrap();

    let plan = Arc::new(FailCommits::default());
    plan.failing.store(true, Ordering::SeqCst);
    let b = Store::open(
        device(tmp.path(), "b")
            .dangerous()
            .faults(Faults::new(plan.clone()))
            .done()
            .sync(SyncConfig::new(remote(&relay))),
    )
    .await
    .unwrap();
    // Each sync_now runs a courier round: B fetches the parcel and cannot
    // store its key.
    for _ in 0..3 {
        let _ = b.sync_now().await;
    }
    assert!(plan.failed.load(Ordering::SeqCst) > 0, "no commit failed");
    assert_ne!(
        b.status().await.unwrap().current_epoch,
        new_epoch,
        "b took the key although every commit failed"
    );

    plan.failing.store(false, Ordering::SeqCst);
    until("b takes the key it could not store before", async || {
        let _ = b.sync_now().await;
        b.status().await.unwrap().current_epoch == new_epoch
    })
    .await;
    assert_eq!(
        b.get::<String>("before").await.unwrap().as_deref(),
        Some("written under the first epoch")
    );
}

/// Device A, syncing through `relay`, writes `before`, makes an invite
/// and closes, so that a joiner waits for it; returns the invite's code.
async fn offline_inviter(tmp: &Path, relay: &RelayHandle) -> String {
    let a = Store::open(device(tmp, "a").sync(SyncConfig::new(remote(relay))))
        .await
        .unwrap();
    a.put("before", "written before b joined").await.unwrap();
    let invite = a.crypto().create_invite().await.unwrap();
    a.sync_now().await.unwrap();
    a.close().await.unwrap();
    invite.code().to_owned()
}

/// Regression (simulation, a join at a mid-run step): a join whose open
/// failed after it stored the store's keys (here, writing this device's
/// member entry) left a store that any retry refused ("the directory
/// already holds a store"). A retry with a new invite now resumes it,
/// without pairing again: the inviter lists the device once, and the
/// new invite stays unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_that_failed_after_storing_its_keys_resumes_on_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let a = Store::open(device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    a.put("before", "written before b joined").await.unwrap();
    a.sync_now().await.unwrap();
    let first = a.crypto().create_invite().await.unwrap();

    let plan = Arc::new(FailCommits::default());
    plan.failing.store(true, Ordering::SeqCst);
    let b_config = |code: &str| {
        device(tmp.path(), "b")
            .invite(code)
            .dangerous()
            .faults(Faults::new(plan.clone()))
            .done()
    };
    let err = Store::open(b_config(first.code())).await.unwrap_err();
    assert!(matches!(err, OpenError::Start(_)), "{err}");
    assert!(plan.failed.load(Ordering::SeqCst) > 0, "no commit failed");
    let joined = tokio::time::timeout(SETTLE, a.crypto().invite_used(&first))
        .await
        .expect("a granted the first invite")
        .unwrap();

    plan.failing.store(false, Ordering::SeqCst);
    let second = a.crypto().create_invite().await.unwrap();
    // A made-up invite for the same (public) store id through another
    // relay must not resume: resuming syncs, and would hand that relay
    // this device's credential.
    let mut forged = persist_core::invite::Invite::decode(second.code()).unwrap();
    forged.relay = "quic://127.0.0.1:9".into();
    let err = Store::open(b_config(&forged.encode())).await.unwrap_err();
    assert!(
        matches!(err, OpenError::ResumeThroughOtherRelay { .. }),
        "{err}"
    );
    let b = Store::open(b_config(second.code()))
        .await
        .expect("the retry resumes the join");
    assert_eq!(b.info().device_id, joined, "the device a made a member");
    let devices = a.crypto().devices().await.unwrap();
    assert_eq!(devices.len(), 2, "b is a member once: {devices:?}");
    until("b reads what a wrote before it joined", async || {
        let _ = b.sync_now().await;
        b.get::<String>("before").await.unwrap().as_deref() == Some("written before b joined")
    })
    .await;
    b.put("from-b", "b writes after resuming").await.unwrap();
    until("a reads what b wrote", async || {
        let _ = b.sync_now().await;
        let _ = a.sync_now().await;
        a.get::<String>("from-b").await.unwrap().is_some()
    })
    .await;

    // A store that opened is joined: an invite into it is still refused.
    b.close().await.unwrap();
    let err = Store::open(device(tmp.path(), "b").invite(second.code()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpenError::InviteIntoExistingStore { .. }),
        "{err}"
    );
    a.close().await.unwrap();
    relay.shutdown().await;
}

/// A database whose writes fail while `failing` is set.
#[derive(Debug, Clone, Default)]
struct FailingDisk {
    bytes: persist::MemoryBackend,
    failing: Arc<AtomicBool>,
}

impl FailingDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected disk failure"));
        }
        Ok(())
    }
}

impl persist::Backend for FailingDisk {
    fn len(&self) -> std::io::Result<u64> {
        persist::Backend::len(&self.bytes)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        persist::Backend::read(&self.bytes, offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        persist::Backend::set_len(&self.bytes, len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        persist::Backend::sync_data(&self.bytes)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        persist::Backend::write(&self.bytes, offset, data)
    }
}

/// Regression: a join whose keyring could not be written after its
/// device key was stored (the key goes first) left the key behind, and
/// every retry failed with "a device key already exists". A retry now
/// seals the keys under the key that join left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_that_failed_after_storing_its_device_key_can_be_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let code = offline_inviter(tmp.path(), &relay).await;
    let a_config = || device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay)));
    let disk = FailingDisk::default();
    let b_config = |code: &str| {
        device(tmp.path(), "b")
            .invite(code)
            .storage_backend(Box::new(disk.clone()))
    };

    // B waits for A; its disk fails before A answers, so the keyring B is
    // granted cannot be written.
    let joining = tokio::spawn(Store::open(b_config(&code)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!joining.is_finished(), "b cannot join while a is offline");
    disk.failing.store(true, Ordering::SeqCst);
    let a = Store::open(a_config()).await.unwrap();
    let err = joining.await.unwrap().expect_err("b's disk fails");
    assert!(err.to_string().contains("injected disk failure"), "{err}");
    assert!(
        tmp.path().join("b").join("keys").join("k.key").exists(),
        "the failed join stored its device key first"
    );

    disk.failing.store(false, Ordering::SeqCst);
    let invite = a.crypto().create_invite().await.unwrap();
    let b = Store::open(b_config(invite.code()))
        .await
        .expect("the retry joins");
    until("b reads what a wrote before it joined", async || {
        let _ = b.sync_now().await;
        b.get::<String>("before").await.unwrap().as_deref() == Some("written before b joined")
    })
    .await;
    b.close().await.unwrap();
    // Reopened as it is: its keyring opens with the key it adopted.
    let b = Store::open(
        device(tmp.path(), "b")
            .storage_backend(Box::new(disk.clone()))
            .sync(SyncConfig::new(remote(&relay))),
    )
    .await
    .expect("b reopens");
    b.close().await.unwrap();
    a.close().await.unwrap();
    relay.shutdown().await;
}
