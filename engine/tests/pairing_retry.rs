//! Pairing when things go wrong the ordinary way: a joiner that timed out
//! while its inviter was offline tries again with the same code, and a
//! relay that admits only its operator's devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use persist::{JoinError, OpenError, Store, SyncConfig};
use persist_relay::{Admission, AdmissionSecret};

use common::devices::{SETTLE, device, nothing_written, relay_with, remote};

/// A join attempt meant to time out: the inviter is offline.
const SHORT: Duration = Duration::from_millis(1500);

async fn converge(stores: &[&Store]) {
    for _ in 0..2 {
        for s in stores {
            s.sync_now().await.expect("sync");
        }
    }
}

/// B writes, A writes, and each reads the other's write.
async fn both_read_each_other(a: &Store, b: &Store) {
    a.put("from-a", "written on a").await.unwrap();
    b.put("from-b", "written on b").await.unwrap();
    converge(&[a, b]).await;
    assert_eq!(
        b.get::<String>("from-a").await.unwrap().as_deref(),
        Some("written on a")
    );
    assert_eq!(
        a.get::<String>("from-b").await.unwrap().as_deref(),
        Some("written on b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_retried_after_timing_out_succeeds_once_the_inviter_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay_with(&tmp.path().join("relay"), Admission::Open).await;
    let a_config = || device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay)));
    let a = Store::open(a_config()).await.unwrap();
    let invite = a.crypto().create_invite().await.unwrap();
    let code = invite.code().to_owned();
    a.close().await.unwrap();

    // A is offline: two attempts time out, each leaving a first message
    // in A's mailbox.
    for attempt in 1..=2 {
        let err = Store::open(device(tmp.path(), "b").invite(&code).invite_timeout(SHORT))
            .await
            .unwrap_err();
        assert!(
            matches!(err, OpenError::Join(JoinError::TimedOut { .. })),
            "attempt {attempt}: {err}"
        );
        nothing_written(tmp.path(), "b");
    }

    // A comes back and answers the first messages of attempts nobody is
    // waiting on any more.
    let a = Store::open(a_config()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The same code again: the stale answers must not spoil this attempt.
    let b = Store::open(device(tmp.path(), "b").invite(&code).invite_timeout(SETTLE))
        .await
        .expect("b joins on the retry");
    assert_eq!(b.info().store_id, a.info().store_id);
    let joined = tokio::time::timeout(SETTLE, a.crypto().invite_used(&invite))
        .await
        .expect("a learns the invite was used")
        .unwrap();
    assert_eq!(joined, b.info().device_id);
    both_read_each_other(&a, &b).await;
    let devices = a.crypto().devices().await.unwrap();
    assert_eq!(devices.len(), 2, "only b joined, once: {devices:?}");
    a.close().await.unwrap();
    b.close().await.unwrap();
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_admits_only_its_operators_devices_pairs_through_the_inviters_secret() {
    const SECRET: &str = "operator's secret";
    let tmp = tempfile::tempdir().unwrap();
    let relay = relay_with(
        &tmp.path().join("relay"),
        Admission::Secret(AdmissionSecret::new(SECRET).unwrap()),
    )
    .await;
    let with_secret =
        || device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay).admission(SECRET)));
    // The store is on the relay now; later opens need no secret.
    let a = Store::open(with_secret()).await.unwrap();
    a.put("before", "written before b joined").await.unwrap();
    a.sync_now().await.unwrap();

    // With the secret, the inviter makes the pairing store, and the new
    // device, which holds nothing but the code, pairs through it.
    let invite = a.crypto().create_invite().await.unwrap();
    let b = Store::open(
        device(tmp.path(), "b")
            .invite(invite.code())
            .invite_timeout(SETTLE),
    )
    .await
    .expect("b joins through the closed relay");
    b.sync_now().await.unwrap();
    assert_eq!(
        b.get::<String>("before").await.unwrap().as_deref(),
        Some("written before b joined")
    );
    both_read_each_other(&a, &b).await;
    a.close().await.unwrap();

    // Without the secret, the inviter syncs its store but cannot make an
    // invite's pairing store: the joiner times out and says why.
    let a = Store::open(device(tmp.path(), "a").sync(SyncConfig::new(remote(&relay))))
        .await
        .unwrap();
    a.sync_now()
        .await
        .expect("an existing store needs no secret");
    let invite = a.crypto().create_invite().await.unwrap();
    let err = Store::open(
        device(tmp.path(), "c")
            .invite(invite.code())
            .invite_timeout(Duration::from_secs(3)),
    )
    .await
    .unwrap_err();
    let OpenError::Join(JoinError::TimedOut { last_error, .. }) = &err else {
        panic!("expected a timeout: {err}");
    };
    assert!(
        last_error
            .as_deref()
            .is_some_and(|e| e.contains("admission secret")),
        "{err}"
    );
    assert!(err.to_string().contains("--admission-secret-file"), "{err}");
    nothing_written(tmp.path(), "c");
    a.close().await.unwrap();

    // Reopened with the secret, the inviter answers that same invite.
    let a = Store::open(with_secret()).await.unwrap();
    let c = Store::open(
        device(tmp.path(), "c")
            .invite(invite.code())
            .invite_timeout(SETTLE),
    )
    .await
    .expect("c joins once the inviter has the secret");
    both_read_each_other(&a, &c).await;
    assert_eq!(a.crypto().devices().await.unwrap().len(), 3);
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
    relay.shutdown().await;
}
