//! Revoking a device through a relay node over QUIC: the revoked device,
//! which keeps its old keys and database, reads nothing written after its
//! revocation, and what it writes afterwards is refused by every member,
//! including one that joins later. Once every remaining member holds the
//! new keys (or the grace period is over), the revoker switches the relay
//! to a new access token the revoked device never saw, and the relay
//! refuses it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use persist::{KeyError, RelaySwitchStatus, Remote, RevokeError, Store, SyncConfig, SyncError};

use common::devices::{SETTLE, device, relay, remote, until};
use persist_relay::RelayHandle;

/// Syncs every store until all are synced (nothing pending either way).
async fn converge(stores: &[&Store]) {
    until("the stores sync", async || {
        let mut all = true;
        for s in stores {
            let _ = s.sync_now().await;
            all &= s.sync_status().is_some_and(|st| st.synced);
        }
        all
    })
    .await;
}

/// `store` joins by an invite made on `inviter`.
async fn join(tmp: &Path, inviter: &Store, name: &str) -> Store {
    let invite = inviter.crypto().create_invite().await.unwrap();
    let joined = Store::open(device(tmp, name).invite(invite.code()))
        .await
        .expect("joins");
    tokio::time::timeout(SETTLE, inviter.crypto().invite_used(&invite))
        .await
        .expect("the inviter sees the join")
        .unwrap();
    joined
}

/// A relay node, device A syncing through it with `path` = `value`
/// written, and a member per name joined by A's invites, all synced.
async fn a_and_members<const N: usize>(
    tmp: &Path,
    (path, value): (&str, &str),
    names: [&str; N],
) -> (RelayHandle, Store, [Store; N]) {
    let relay = relay(&tmp.join("relay")).await;
    let a = Store::open(device(tmp, "a").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    a.put(path, value).await.unwrap();
    let mut members = Vec::with_capacity(N);
    for name in names {
        members.push(join(tmp, &a, name).await);
    }
    let mut all = vec![&a];
    all.extend(members.iter());
    converge(&all).await;
    let Ok(members) = <[Store; N]>::try_from(members) else {
        unreachable!("one member per name");
    };
    (relay, a, members)
}

async fn epochs(store: &Store) -> Vec<u32> {
    store
        .status()
        .await
        .unwrap()
        .epochs
        .iter()
        .map(|e| e.epoch)
        .collect()
}

async fn relay_switch(store: &Store) -> Option<RelaySwitchStatus> {
    store.status().await.unwrap().relay_switch
}

/// Whether `store`'s sync is refused by the relay.
async fn refused(store: &Store) -> bool {
    matches!(store.sync_now().await, Err(SyncError::Refused { .. }))
}

async fn revoked(store: &Store, device: persist::DeviceId) -> bool {
    store
        .crypto()
        .devices()
        .await
        .unwrap()
        .iter()
        .any(|d| d.id == device && d.revoked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_reads_nothing_new_and_its_later_writes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let a = Store::open(device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    a.put("notes/shared", "before").await.unwrap();
    let b = join(tmp.path(), &a, "b").await;
    let c = join(tmp.path(), &a, "c").await;
    let c_id = c.info().device_id;
    // E is a member that is offline during the revocation: the relay
    // keeps the old token until it comes back and takes the new keys.
    let e = join(tmp.path(), &a, "e").await;
    let e_id = e.info().device_id;
    converge(&[&a, &e]).await;
    e.close().await.unwrap();
    c.put("notes/from-c", "c, before its revocation")
        .await
        .unwrap();
    converge(&[&a, &b, &c]).await;
    for s in [&a, &b] {
        until("c's write before its revocation arrives", async || {
            s.get::<String>("notes/from-c").await.unwrap().is_some()
        })
        .await;
    }

    // Bad revocations change nothing.
    let before = epochs(&a).await;
    let me = a.info().device_id;
    assert!(matches!(
        a.crypto().revoke_device(me).await,
        Err(KeyError::CannotRevoke(RevokeError::Itself))
    ));
    let stranger = persist::DeviceId([0x5a; 16]);
    assert!(matches!(
        a.crypto().revoke_device(stranger).await,
        Err(KeyError::CannotRevoke(RevokeError::UnknownDevice(d))) if d == stranger
    ));
    assert_eq!(
        epochs(&a).await,
        before,
        "failed revocations start no epoch"
    );
    assert!(!revoked(&a, c_id).await);

    let revocation = a.crypto().revoke_device(c_id).await.expect("revokes c");
    let new_epoch = revocation.epoch();
    assert!(before.iter().all(|e| *e < new_epoch));
    revocation.wait().await.unwrap();
    assert!(matches!(
        a.crypto().revoke_device(c_id).await,
        Err(KeyError::CannotRevoke(RevokeError::AlreadyRevoked(d))) if d == c_id
    ));
    assert!(revoked(&a, c_id).await);
    let switch = relay_switch(&a).await.expect("a relay switch is pending");
    assert_eq!(switch.epoch, new_epoch);
    assert!(switch.by_this_device);
    assert!(switch.due_ms.is_some());
    assert!(switch.waiting_for.contains(&e_id.to_string()), "{switch:?}");
    a.put("notes/after", "written after c's revocation")
        .await
        .unwrap();
    a.put("notes/shared", "after").await.unwrap();

    // B gets the new key (and the revocation with it) and reads on.
    until("b reads what a wrote after the revocation", async || {
        let _ = b.sync_now().await;
        let _ = a.sync_now().await;
        b.get::<String>("notes/after").await.unwrap().is_some()
            && b.get::<String>("notes/shared").await.unwrap().as_deref() == Some("after")
    })
    .await;
    assert!(revoked(&b, c_id).await, "b learned of the revocation");
    assert!(
        matches!(
            b.crypto().revoke_device(c_id).await,
            Err(KeyError::CannotRevoke(RevokeError::AlreadyRevoked(d))) if d == c_id
        ),
        "a revocation learned from a member is not this device's to record"
    );
    assert_eq!(
        b.get::<String>("notes/shared").await.unwrap().as_deref(),
        Some("after")
    );

    // C, with its old keys and database, pulls everything and reads none
    // of it: what it pulls waits for a key that never comes.
    until("c pulls the new writes and holds them", async || {
        let _ = c.sync_now().await;
        c.sync_status().is_some_and(|s| s.held >= 2)
    })
    .await;
    assert_eq!(c.get::<String>("notes/after").await.unwrap(), None);
    assert_eq!(
        c.get::<String>("notes/shared").await.unwrap().as_deref(),
        Some("before")
    );
    assert!(
        !epochs(&c).await.contains(&new_epoch),
        "no member sent c the new key"
    );

    // What C writes now is refused by A and B.
    let refused_before = [&a, &b].map(|s| s.sync_status().unwrap().refused);
    c.put("notes/shared", "c overwrites after its revocation")
        .await
        .unwrap();
    c.put("notes/c-after", "c writes after its revocation")
        .await
        .unwrap();
    until("c pushes its writes", async || {
        let _ = c.sync_now().await;
        c.sync_status().is_some_and(|s| s.pending_up == 0)
    })
    .await;
    for (s, refused_before) in [&a, &b].into_iter().zip(refused_before) {
        until("c's later writes are refused", async || {
            let _ = s.sync_now().await;
            s.sync_status().unwrap().refused >= refused_before + 2
        })
        .await;
        assert_eq!(s.get::<String>("notes/c-after").await.unwrap(), None);
        assert_eq!(
            s.get::<String>("notes/shared").await.unwrap().as_deref(),
            Some("after")
        );
        // What C wrote before its revocation stays, resealed.
        assert_eq!(
            s.get::<String>("notes/from-c").await.unwrap().as_deref(),
            Some("c, before its revocation")
        );
    }
    // notes/shared, notes/from-c and notes/after: the revocation record is
    // the store's own, not the app's.
    assert_eq!(a.status().await.unwrap().records, 3);
    assert_eq!(a.list::<String>("").await.unwrap().len(), 3);

    // A device that joins later learns the revocation from its record,
    // and refuses what C wrote after it too.
    let d = join(tmp.path(), &b, "d").await;
    until("d reads the history", async || {
        let _ = d.sync_now().await;
        d.get::<String>("notes/after").await.unwrap().is_some()
    })
    .await;
    assert!(revoked(&d, c_id).await, "d learned of the revocation");
    assert_eq!(d.get::<String>("notes/c-after").await.unwrap(), None);
    // notes/c-after at least; C's overwrite of notes/shared too, unless
    // A's or B's restatement (below) replaced it at the relay first.
    assert!(d.sync_status().unwrap().refused >= 1);
    // C's overwrite carries a newer stamp than A's, so the relay (which
    // keeps one envelope per locator and cannot tell a revoked signer)
    // kept C's in place of A's. A and B, refusing it, wrote their value
    // again after it, so D reads A's value, not nothing.
    until("d reads a's value of the path c overtook", async || {
        let _ = d.sync_now().await;
        d.get::<String>("notes/shared").await.unwrap().as_deref() == Some("after")
    })
    .await;

    // The switch waits for E alone: B and D hold the new keys.
    until("the relay switch waits only for e", async || {
        for s in [&d, &b, &a] {
            let _ = s.sync_now().await;
        }
        relay_switch(&a)
            .await
            .is_some_and(|s| s.waiting_for == [e_id.to_string()])
    })
    .await;
    assert!(
        !refused(&c).await,
        "the relay still admits c before the switch"
    );

    // E comes back, takes the keys and the token, and A switches the relay.
    let e = Store::open(device(tmp.path(), "e").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    until("a switches the relay", async || {
        let _ = e.sync_now().await;
        let _ = a.sync_now().await;
        relay_switch(&a).await.is_none()
    })
    .await;
    until("the relay refuses c", async || refused(&c).await).await;
    match c.sync_now().await {
        Err(SyncError::Refused { detail, .. }) => {
            assert!(detail.contains("Unauthorized"), "{detail}");
        }
        other => panic!("c's sync should be refused, got {other:?}"),
    }
    // The members find the relay switched, take the new token, and sync
    // on. Their connections were admitted with the old token: the relay
    // refuses their next request, and they reconnect with the new one
    // within the same sync call.
    a.put("notes/after-switch", "only members read this")
        .await
        .unwrap();
    c.put("notes/c-after-switch", "never leaves c")
        .await
        .unwrap();
    for s in [&a, &b, &d, &e] {
        s.sync_now()
            .await
            .expect("a member's sync carries over the relay switch");
    }
    for s in [&b, &d, &e] {
        until("a member syncs after the switch", async || {
            let _ = s.sync_now().await;
            s.get::<String>("notes/after-switch")
                .await
                .unwrap()
                .is_some()
        })
        .await;
        assert!(relay_switch(s).await.is_none(), "took the new token");
        assert_eq!(s.get::<String>("notes/c-after-switch").await.unwrap(), None);
    }
    assert!(c.sync_status().unwrap().pending_up > 0, "c cannot push");
    assert_eq!(c.get::<String>("notes/after-switch").await.unwrap(), None);

    // A read-only store revokes nothing.
    for s in [a, b, c, d, e] {
        s.close().await.unwrap();
    }
    let ro = Store::open(device(tmp.path(), "b").read_only())
        .await
        .unwrap();
    assert!(matches!(
        ro.crypto().revoke_device(me).await,
        Err(KeyError::ReadOnly)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_offline_past_the_grace_period_is_cut_off_with_the_revoked_device() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay(&tmp.path().join("relay")).await;
    let sync = SyncConfig::new(remote(&relay)).relay_switch_grace(Duration::ZERO);
    let a = Store::open(device(tmp.path(), "a").sync(sync))
        .await
        .unwrap();
    a.put("notes/before", "before").await.unwrap();
    let c = join(tmp.path(), &a, "c").await;
    let e = join(tmp.path(), &a, "e").await;
    converge(&[&a, &c, &e]).await;
    e.close().await.unwrap();

    let revocation = a.crypto().revoke_device(c.info().device_id).await.unwrap();
    revocation.wait().await.unwrap();
    // No grace: A switches without waiting for E's acknowledgement.
    until("a switches the relay", async || {
        let _ = a.sync_now().await;
        relay_switch(&a).await.is_none()
    })
    .await;
    until("the relay refuses c", async || refused(&c).await).await;
    a.put("notes/after", "after").await.unwrap();
    until("a syncs under the new token", async || {
        a.sync_now().await.is_ok() && a.sync_status().unwrap().synced
    })
    .await;

    // E never received the new token: the relay refuses it too, clearly,
    // and it keeps what it had.
    let e = Store::open(device(tmp.path(), "e").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    until("the relay refuses e", async || refused(&e).await).await;
    let status = e.sync_status().unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|t| t.contains("refused")),
        "{status:?}"
    );
    assert_eq!(
        e.get::<String>("notes/before").await.unwrap().as_deref(),
        Some("before")
    );
    assert_eq!(e.get::<String>("notes/after").await.unwrap(), None);
    for s in [a, c, e] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_admitted_with_the_old_token_carries_its_sync_over_the_switch() {
    let tmp = tempfile::tempdir().unwrap();
    let (_relay, a, [b, c]) =
        a_and_members(tmp.path(), ("notes/before", "before"), ["b", "c"]).await;

    // A revokes B and pushes the resealed records, all under the old
    // token; the switch waits for C.
    let revocation = a.crypto().revoke_device(b.info().device_id).await.unwrap();
    let new_epoch = revocation.epoch();
    revocation.wait().await.unwrap();
    a.sync_now().await.unwrap();
    assert!(relay_switch(&a).await.is_some());
    // C takes the new keys and acknowledges them; A's key courier then
    // switches the relay while A's sync connection, admitted with the old
    // token, stays open and idle.
    until("c takes the new keys", async || {
        let _ = c.sync_now().await;
        epochs(&c).await.contains(&new_epoch)
    })
    .await;
    until("a switches the relay", async || {
        relay_switch(&a).await.is_none()
    })
    .await;
    assert!(
        a.sync_status().unwrap().connected,
        "a's connection from before the switch is still open"
    );

    // The relay refuses that connection's next request; A reconnects with
    // the new token within the same call, and so does C.
    a.put("notes/after", "after").await.unwrap();
    a.sync_now()
        .await
        .expect("a's sync carries over its own relay switch");
    until("c reads what a wrote after the switch", async || {
        c.sync_now()
            .await
            .expect("c's sync carries over the relay switch");
        c.get::<String>("notes/after").await.unwrap().is_some()
    })
    .await;
    assert!(refused(&b).await, "the relay refuses b");
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_serving_its_store_refuses_the_revoked_device_once_the_relay_switched() {
    let tmp = tempfile::tempdir().unwrap();
    let (_relay, a, [b, c]) =
        a_and_members(tmp.path(), ("notes/before", "before"), ["b", "c"]).await;
    let c_id = c.info().device_id;
    // A also serves its store; C now syncs with A directly.
    let served = a.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let direct = Remote::pinned(&format!("quic://{}", served.addr()), &served.pin()).unwrap();
    c.close().await.unwrap();
    let c = Store::open(device(tmp.path(), "c").sync(SyncConfig::new(direct.clone())))
        .await
        .unwrap();
    c.sync_now()
        .await
        .expect("a admits c before its revocation");

    // A revokes C; B takes the new key and token through the relay; A
    // switches the relay, and its own credential with it.
    let revocation = a.crypto().revoke_device(c_id).await.unwrap();
    revocation.wait().await.unwrap();
    until("a switches the relay", async || {
        let _ = b.sync_now().await;
        let _ = a.sync_now().await;
        relay_switch(&a).await.is_none()
    })
    .await;

    // A, serving, now refuses C's old credential, on the connection C
    // already holds and on a new one.
    match c.sync_now().await {
        Err(SyncError::Refused { detail, .. }) => {
            assert!(detail.contains("Unauthorized"), "{detail}");
        }
        other => panic!("a should refuse c, got {other:?}"),
    }
    until("a refuses c again", async || refused(&c).await).await;

    // B, a member, syncs with A directly under the new token.
    until("b takes the new token", async || {
        let _ = b.sync_now().await;
        relay_switch(&b).await.is_none()
    })
    .await;
    b.close().await.unwrap();
    let b = Store::open(device(tmp.path(), "b").sync(SyncConfig::new(direct)))
        .await
        .unwrap();
    a.put("notes/after", "after").await.unwrap();
    b.sync_now().await.expect("a admits b, a member");
    assert_eq!(
        b.get::<String>("notes/after").await.unwrap().as_deref(),
        Some("after")
    );
    served.stop().await;
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

/// A member that takes the revoked device's later write before it learns
/// of the revocation hides it as soon as it learns, and removes it from
/// its database: it is neither read, listed nor counted. Where that write
/// overtook a member's value, the member's restated value comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_forgets_a_revoked_devices_later_write_it_took_before_it_knew() {
    let tmp = tempfile::tempdir().unwrap();
    let (relay, a, [c, m]) =
        a_and_members(tmp.path(), ("notes/shared", "before"), ["c", "m"]).await;
    let c_id = c.info().device_id;

    // A revokes C while it cannot reach the relay, so no member hears of
    // it; C then writes, and M takes C's writes.
    a.close().await.unwrap();
    let a = Store::open(device(tmp.path(), "a")).await.unwrap();
    a.crypto()
        .revoke_device(c_id)
        .await
        .expect("revokes c")
        .wait()
        .await
        .unwrap();
    c.put("notes/shared", "c overwrites after its revocation")
        .await
        .unwrap();
    c.put("notes/c-after", "c writes after its revocation")
        .await
        .unwrap();
    converge(&[&c, &m]).await;
    until("m takes c's later writes", async || {
        m.get::<String>("notes/c-after").await.unwrap().is_some()
    })
    .await;
    assert!(!revoked(&m, c_id).await);
    assert_eq!(m.status().await.unwrap().records, 2);

    // A comes back: M takes the new key with the revocation, and forgets
    // both of C's later writes.
    a.close().await.unwrap();
    let a = Store::open(device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    until("m learns of c's revocation", async || {
        let _ = a.sync_now().await;
        let _ = m.sync_now().await;
        revoked(&m, c_id).await
    })
    .await;
    assert_eq!(m.get::<String>("notes/c-after").await.unwrap(), None);
    assert_ne!(
        m.get::<String>("notes/shared").await.unwrap().as_deref(),
        Some("c overwrites after its revocation")
    );
    // C's overwrite outranks A's value at the relay: A, refusing it, wrote
    // its value again, and M takes that; C's own path is gone.
    until(
        "m holds a's value and nothing of c's later writes",
        async || {
            let _ = a.sync_now().await;
            let _ = m.sync_now().await;
            m.status().await.unwrap().records == 1
                && m.list::<String>("").await.unwrap()
                    == [("notes/shared".to_owned(), "before".to_owned())]
        },
    )
    .await;
    // Reopened, M holds none of C's later writes still.
    m.close().await.unwrap();
    let m = Store::open(device(tmp.path(), "m")).await.unwrap();
    assert_eq!(m.status().await.unwrap().records, 1);
    assert_eq!(m.get::<String>("notes/c-after").await.unwrap(), None);
    for s in [a, c, m] {
        s.close().await.unwrap();
    }
}
