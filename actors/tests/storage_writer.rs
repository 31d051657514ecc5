//! The StorageWriter's contract: group commit, last-write-wins, and
//! acknowledgement only after a durable commit.

// Integration tests: a panic in a helper is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use persist_actors::storage_writer::{
    CommitReport, Forget, Marks, Park, Priority, SealedWrite, StorageWriter, WriteError,
    WriterArgs, WriterMsg,
};
use persist_core::env::{Entropy, SeededEntropy};
use persist_core::envelope::Envelope;
use persist_core::envelope::{self, Flags, SealContext};
use persist_core::hlc::Hlc;
use persist_core::keyring::Keyring;
use persist_core::keys::DeviceIdentity;
use persist_core::record::Record;
use persist_storage::{Held, LocalDb, Row};
use ractor::concurrency::{OneshotReceiver, oneshot};
use ractor::{Actor, ActorRef, RpcReplyPort};

struct Fixture {
    ring: Keyring,
    _dir: tempfile::TempDir,
    db: Arc<LocalDb>,
    writer: ActorRef<WriterMsg>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(LocalDb::open(&dir.path().join("db.redb"), None).unwrap());
    let mut rng = SeededEntropy::from_u64(1).stream("test");
    let ring = Keyring::create(
        DeviceIdentity::generate(&mut rng),
        "t",
        Hlc::default(),
        &mut rng,
    );
    let (writer, _) = Actor::spawn(
        None,
        StorageWriter,
        WriterArgs {
            db: db.clone(),
            committed: Arc::new(tokio::sync::watch::channel(0).0),
            faults: persist_core::env::Faults::OFF,
        },
    )
    .await
    .unwrap();
    Fixture {
        ring,
        _dir: dir,
        db,
        writer,
    }
}

fn sealed(f: &Fixture, path: &str, value: &[u8], ms: u64, seed: u64) -> SealedWrite {
    let record = Record {
        path: path.into(),
        value: value.to_vec(),
        origin: f.ring.device_id(),
        hlc: Hlc { ms, counter: 0 },
    };
    let locator = f.ring.index_key.locator(&f.ring.store_id, path);
    let ctx = SealContext {
        store_id: f.ring.store_id,
        epoch: f.ring.current,
        data_key: f.ring.current_key(),
        signing_key: f.ring.device.signing_key(),
        signer: f.ring.device_id(),
    };
    let mut rng = SeededEntropy::from_u64(seed).stream("seal");
    let envelope =
        envelope::seal(&ctx, &locator, &record, Flags::default(), seed, &mut rng).unwrap();
    SealedWrite {
        locator,
        path: path.into(),
        value: value.to_vec(),
        row: Row {
            epoch: f.ring.current,
            tombstone: false,
            envelope,
        },
        expect: None,
    }
}

fn send(
    f: &Fixture,
    writes: Vec<SealedWrite>,
) -> OneshotReceiver<Result<CommitReport, WriteError>> {
    let (tx, rx) = oneshot();
    let reply: RpcReplyPort<_> = tx.into();
    f.writer
        .cast(WriterMsg::Commit {
            writes,
            marks: Marks {
                hlc: Hlc::default(),
                seq: 1,
            },
            meta: Vec::new(),
            priority: Priority::Foreground,
            reply,
        })
        .unwrap();
    rx
}

/// Writes queued while a commit is prepared share it: 200 concurrent
/// single-write batches take far fewer than 200 commits, and every one is
/// readable once acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writes_share_commits() {
    let f = fixture().await;
    // Sealed first, then queued back to back: sealing inside the loop
    // spread the queueing out over the commits it was meant to overlap.
    let writes: Vec<_> = (0..200u64)
        .map(|i| sealed(&f, &format!("p/{i}"), b"v", 1_000 + i, i))
        .collect();
    let receivers: Vec<_> = writes.into_iter().map(|w| send(&f, vec![w])).collect();
    let mut commits = std::collections::BTreeSet::new();
    for rx in receivers {
        let report = rx.await.unwrap().unwrap();
        assert_eq!(report.applied.len(), 1);
        commits.insert(report.commit);
    }
    assert!(
        commits.len() < 50,
        "200 queued writes took {} commits; group commit is not grouping",
        commits.len()
    );
    let txn = f.db.begin_read().unwrap();
    assert_eq!(txn.live_count().unwrap(), 200);
}

/// An older version never overwrites a newer one, whatever the order of
/// arrival; the loser is reported as superseded.
#[tokio::test(flavor = "multi_thread")]
async fn older_version_loses() {
    let f = fixture().await;
    let newer = sealed(&f, "k", b"new", 2_000, 1);
    let older = sealed(&f, "k", b"old", 1_000, 2);
    let locator = newer.locator;
    let newer_envelope = newer.row.envelope.clone();
    assert_eq!(
        send(&f, vec![newer]).await.unwrap().unwrap().applied.len(),
        1
    );
    let report = send(&f, vec![older]).await.unwrap().unwrap();
    assert_eq!(report.superseded, 1);
    assert!(report.applied.is_empty());
    let row =
        f.db.begin_read()
            .unwrap()
            .record(&locator)
            .unwrap()
            .unwrap();
    assert_eq!(row.envelope, newer_envelope);
}

/// A compare-and-swap write (a rotation reseal) applies only over exactly
/// the version it expects; after a newer write it is dropped.
#[tokio::test(flavor = "multi_thread")]
async fn compare_and_swap_loses_to_a_newer_write() {
    let f = fixture().await;
    let first = sealed(&f, "k", b"v1", 1_000, 1);
    let expected = persist_core::envelope::Envelope::parse(&first.row.envelope)
        .unwrap()
        .header
        .precedence();
    send(&f, vec![first]).await.unwrap().unwrap();
    // A newer write lands before the reseal.
    send(&f, vec![sealed(&f, "k", b"v2", 2_000, 2)])
        .await
        .unwrap()
        .unwrap();
    let mut reseal = sealed(&f, "k", b"v1", 1_000, 3);
    reseal.expect = Some(expected);
    let report = send(&f, vec![reseal]).await.unwrap().unwrap();
    assert_eq!(report.superseded, 1, "the reseal must lose");
    // And with the right expectation it applies.
    let current =
        f.db.begin_read()
            .unwrap()
            .record(&f.ring.index_key.locator(&f.ring.store_id, "k"))
            .unwrap()
            .unwrap();
    let mut reseal = sealed(&f, "k", b"v2", 2_000, 4);
    reseal.expect = Some(
        persist_core::envelope::Envelope::parse(&current.envelope)
            .unwrap()
            .header
            .precedence(),
    );
    assert_eq!(
        send(&f, vec![reseal]).await.unwrap().unwrap().applied.len(),
        1
    );
}

fn forget(f: &Fixture, forget: Vec<Forget>) -> OneshotReceiver<Result<CommitReport, WriteError>> {
    let (tx, rx) = oneshot();
    f.writer
        .cast(WriterMsg::Forget {
            forget,
            meta: Vec::new(),
            reply: tx.into(),
        })
        .unwrap();
    rx
}

/// A forget removes a row only while it holds a write its device made
/// after the given stamp: not an earlier write of that device, not
/// another device's, and not a newer write that replaced the one named.
#[tokio::test(flavor = "multi_thread")]
async fn forget_removes_only_what_the_device_wrote_after_the_stamp() {
    let f = fixture().await;
    let me = f.ring.device_id();
    let before = sealed(&f, "before", b"v", 1_000, 1);
    let after = sealed(&f, "after", b"v", 3_000, 2);
    let replaced = sealed(&f, "replaced", b"v", 3_000, 3);
    let locators = [before.locator, after.locator, replaced.locator];
    send(&f, vec![before, after, replaced])
        .await
        .unwrap()
        .unwrap();
    let at = Hlc {
        ms: 2_000,
        counter: 0,
    };
    // "replaced" gets a newer write before the forget lands: by another
    // device, which the forget must keep.
    let other = persist_core::DeviceId([7; 16]);
    let mut newer = sealed(&f, "replaced", b"w", 4_000, 4);
    newer.row.envelope = {
        let record = Record {
            path: "replaced".into(),
            value: b"w".to_vec(),
            origin: other,
            hlc: Hlc {
                ms: 4_000,
                counter: 0,
            },
        };
        let ctx = SealContext {
            store_id: f.ring.store_id,
            epoch: f.ring.current,
            data_key: f.ring.current_key(),
            signing_key: f.ring.device.signing_key(),
            signer: me,
        };
        let mut rng = SeededEntropy::from_u64(5).stream("seal");
        envelope::seal(&ctx, &locators[2], &record, Flags::default(), 5, &mut rng).unwrap()
    };
    send(&f, vec![newer]).await.unwrap().unwrap();

    let named = |locator, origin| Forget {
        locator,
        origin,
        after: at,
    };
    let report = forget(
        &f,
        vec![
            named(locators[0], me),
            named(locators[1], other),
            named(locators[2], me),
        ],
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(report.forgotten, 0, "nothing named matches its row");
    let report = forget(&f, vec![named(locators[1], me), named(locators[1], me)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.forgotten, 1);
    let txn = f.db.begin_read().unwrap();
    assert!(txn.record(&locators[0]).unwrap().is_some());
    assert!(txn.record(&locators[1]).unwrap().is_none());
    assert!(txn.record(&locators[2]).unwrap().is_some());
    assert_eq!(txn.live_count().unwrap(), 2);
}

fn park(f: &Fixture, parks: Vec<Park>) -> OneshotReceiver<Result<CommitReport, WriteError>> {
    let (tx, rx) = oneshot();
    f.writer
        .cast(WriterMsg::Ingest {
            writes: Vec::new(),
            parks,
            meta: Vec::new(),
            reply: tx.into(),
        })
        .unwrap();
    rx
}

fn keep(write: &SealedWrite, verified: bool) -> Park {
    Park::Keep {
        locator: write.locator,
        precedence: Envelope::parse(&write.row.envelope)
            .unwrap()
            .header
            .precedence(),
        envelope: write.row.envelope.clone(),
        verified,
    }
}

fn held(f: &Fixture) -> Vec<Vec<u8>> {
    let page = f.db.begin_read().unwrap().pending_page(None, 100).unwrap();
    page.into_iter().map(|p| p.envelope).collect()
}

/// An envelope held unverified (its signer not known yet, its epoch key
/// not held) may be a relay's forgery: it must not keep out or replace the
/// genuine one, whatever its precedence and whichever comes first. A
/// verified one replaces what it outranks.
#[tokio::test(flavor = "multi_thread")]
async fn an_unverified_held_envelope_never_displaces_a_verified_one() {
    let f = fixture().await;
    let genuine = sealed(&f, "k", b"genuine", 2_000, 1);
    // A forgery at the same locator claiming the same version, and one
    // claiming a later one (as an unknown signer's would, unchecked).
    let mut same = genuine.row.envelope.clone();
    let last = same.len() - 1;
    same[last] ^= 1;
    let later = sealed(&f, "k", b"forged", 3_000, 2);
    let forged = [same, later.row.envelope.clone()];
    let unverified = |bytes: &Vec<u8>| Park::Keep {
        locator: genuine.locator,
        precedence: Envelope::parse(bytes).unwrap().header.precedence(),
        envelope: bytes.clone(),
        verified: false,
    };

    // Forgeries first: the genuine one is held beside them.
    park(&f, forged.iter().map(unverified).collect())
        .await
        .unwrap()
        .unwrap();
    park(&f, vec![keep(&genuine, true)]).await.unwrap().unwrap();
    let now = held(&f);
    // Unverified ones replace nothing, not even each other.
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(now.contains(&genuine.row.envelope));

    // Released by bytes: dropping the forgeries leaves the genuine one.
    park(
        &f,
        forged
            .iter()
            .map(|bytes| Park::Release {
                held: Held::of(&genuine.locator, bytes),
            })
            .collect(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(held(&f), vec![genuine.row.envelope.clone()]);

    // Genuine first: forgeries arriving later never take its place; one it
    // outranks or equals is not even kept (it would lose to it), a later
    // one is held beside it.
    let f = fixture().await;
    park(&f, vec![keep(&genuine, true)]).await.unwrap().unwrap();
    park(&f, forged.iter().map(unverified).collect())
        .await
        .unwrap()
        .unwrap();
    let now = held(&f);
    assert_eq!(now.len(), 2, "the genuine one and the later forgery");
    assert!(now.contains(&genuine.row.envelope) && now.contains(&later.row.envelope));

    // A verified newer version replaces the held ones it outranks, forged
    // or not; the same bytes twice are held once.
    let newest = sealed(&f, "k", b"newest", 4_000, 3);
    park(&f, vec![keep(&newest, true), keep(&newest, true)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held(&f), vec![newest.row.envelope.clone()]);

    // Nothing is held behind a stored record it does not outrank.
    send(&f, vec![sealed(&f, "k", b"stored", 5_000, 4)])
        .await
        .unwrap()
        .unwrap();
    park(&f, vec![keep(&genuine, true), keep(&later, false)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held(&f), vec![newest.row.envelope.clone()]);
}
