//! The conformance suite of [`RelayBackend`]: what every relay backend
//! (memory, redb, PostgreSQL) must do, written once.
//!
//! Compiled with the `conformance` cargo feature, for tests only. A backend
//! crate enables it in its dev-dependencies and runs the suite:
//!
//! ```ignore
//! // tests/relay_backend.rs of a backend crate, with `tokio` (macros, rt)
//! // among its dev-dependencies.
//! async fn fresh() -> (MyBackend, impl Sized) {
//!     // An empty backend, and whatever must live as long as it (a temp
//!     // dir, a database schema guard); `()` if nothing.
//! }
//! persist_storage::relay_conformance_tests!(fresh);
//!
//! #[tokio::test]
//! async fn random_appends() {
//!     // a proptest feeding `random_appends_match_model`, and
//!     // `reopen_keeps_data_and_sequence` for a durable backend
//! }
//! ```
//!
//! [`relay_conformance_tests!`](crate::relay_conformance_tests) makes one
//! `#[tokio::test]` per check that takes a fresh, empty backend; the checks
//! that take more ([`random_appends_match_model`],
//! [`reopen_keeps_data_and_sequence`], [`reopen_keeps_a_rekeyed_credential`],
//! [`concurrent_rekeys_from_one_credential`]) are called by hand. Each check
//! panics, with a message naming what broke, on the first violation.
//!
//! Envelopes here are opaque bytes, as they are to a backend: precedence
//! travels beside them in [`Incoming`].

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use persist_core::hlc::Hlc;
use persist_core::lww::{Precedence, Version, wins};
use persist_core::protocol::{LogEntry, MAILBOX_ITEM_BYTES_MAX, MAILBOX_ITEMS_MAX};
use persist_core::{DeviceId, Epoch, Locator, StoreId};

use super::{
    APPEND_ENTRIES_MAX, Appended, Incoming, RelayBackend, RelayError, RelayStats, StoreAccess,
};

/// Makes one `#[tokio::test]` per check of this suite that takes a fresh
/// backend, named after the check.
///
/// `$fresh` names an `async fn() -> (B, G)` returning an empty backend `B`
/// and a guard `G` kept alive for the test (a temporary directory, say).
/// The calling crate needs `tokio` with the `macros` and `rt` features.
///
/// `relay_conformance_tests!(skippable $fresh)` is the form for a backend
/// that needs an outside service (PostgreSQL): `$fresh` is then an
/// `async fn(&'static str) -> Option<(B, G)>` that is given the check's name
/// (to name the test's own database schema, say) and returns `None`, after
/// printing why, when the service is not configured; the test then passes
/// without running the check.
#[macro_export]
macro_rules! relay_conformance_tests {
    (skippable $fresh:path) => {
        $crate::relay_conformance_tests!(@list skippable $fresh);
    };
    ($fresh:path) => {
        $crate::relay_conformance_tests!(@list always $fresh);
    };
    (@list $mode:ident $fresh:path) => {
        $crate::relay_conformance_tests!(@each $mode $fresh;
            open_store_admits_and_authorizes,
            append_keeps_the_highest_precedence,
            superseded_entries_leave_the_log,
            pull_pages_by_limit_and_bytes,
            unknown_store_is_refused,
            oversize_input_is_refused,
            watch_publishes_growth,
            mailboxes_put_fetch_and_ack,
            mailbox_refuses_items_when_full,
            stats_count_what_is_held,
            stores_are_isolated,
            rekey_swaps_the_credential_and_keeps_the_store,
            rekey_from_a_stale_credential_changes_nothing,
            rekey_moves_access_changes,
        );
    };
    (@each always $fresh:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let (relay, _guard) = $fresh().await;
                $crate::relay::conformance::$check(&relay).await;
            }
        )*
    };
    (@each skippable $fresh:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let Some((relay, _guard)) = $fresh(stringify!($check)).await else {
                    return;
                };
                $crate::relay::conformance::$check(&relay).await;
            }
        )*
    };
}

/// Store `n`.
pub fn store(n: u8) -> StoreId {
    StoreId([n; 16])
}

/// The access fingerprint of credential `n`.
pub fn fingerprint(n: u8) -> [u8; 32] {
    [n; 32]
}

/// Locator `n`.
pub fn locator(n: u8) -> Locator {
    let mut bytes = [0xA5; 32];
    bytes[0] = n;
    Locator(bytes)
}

/// The precedence of a write at `ms` by device `origin`, sealed under `epoch`.
pub fn precedence(ms: u64, origin: u8, epoch: u32) -> Precedence {
    Precedence {
        version: Version {
            hlc: Hlc { ms, counter: 0 },
            origin: DeviceId([origin; 16]),
        },
        epoch: Epoch(epoch),
    }
}

/// An incoming entry.
pub fn incoming(locator: Locator, precedence: Precedence, envelope: &[u8]) -> Incoming {
    Incoming {
        locator,
        precedence,
        envelope: envelope.to_vec(),
    }
}

/// The value of `result`, or a panic naming `what` and the error.
fn must<T, E: Debug>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|err| panic!("{what}: {err:?}"))
}

/// Creates store `n` with credential `n`.
async fn create<B: RelayBackend>(relay: &B, n: u8) {
    let access = must(
        relay.open_store(&store(n), &fingerprint(n), true).await,
        "creating a store",
    );
    assert_eq!(
        access,
        StoreAccess {
            created: true,
            head: 0
        },
        "a new store"
    );
}

async fn append<B: RelayBackend>(relay: &B, n: u8, entries: Vec<Incoming>) -> Appended {
    must(relay.append(&store(n), entries).await, "append")
}

/// Every entry of store `n`'s log, pulled a few at a time, checking the
/// paging contract on the way.
pub async fn pull_all<B: RelayBackend>(relay: &B, n: u8) -> Vec<LogEntry> {
    let mut all: Vec<LogEntry> = Vec::new();
    let mut since = 0;
    loop {
        let page = must(relay.pull(&store(n), since, 3, 64).await, "pull");
        assert!(
            page.entries.len() <= 3,
            "a page holds at most `limit` entries"
        );
        let mut previous = since;
        for entry in &page.entries {
            assert!(entry.seq > previous, "pulled seqs strictly increase");
            previous = entry.seq;
        }
        assert_eq!(page.cursor, previous, "the cursor is the last seq pulled");
        all.extend(page.entries.iter().cloned());
        if !page.more {
            assert_eq!(
                relay
                    .pull(&store(n), page.cursor, 3, 64)
                    .await
                    .map(|p| p.entries),
                Ok(Vec::new()),
                "`more: false` means nothing follows the cursor"
            );
            return all;
        }
        assert!(
            !page.entries.is_empty(),
            "a page with more to come is not empty"
        );
        since = page.cursor;
    }
}

/// A client is admitted by its fingerprint; a wrong one is refused without
/// changing anything; an absent store is created only when allowed.
pub async fn open_store_admits_and_authorizes<B: RelayBackend>(relay: &B) {
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(1), false).await,
        Err(RelayError::AdmissionRequired),
        "an absent store without the right to create"
    );
    assert_eq!(
        relay.head(&store(1)).await,
        Err(RelayError::UnknownStore),
        "a refused open creates nothing"
    );
    create(relay, 1).await;
    append(
        relay,
        1,
        vec![incoming(locator(1), precedence(1, 1, 1), b"x")],
    )
    .await;
    for may_create in [false, true] {
        assert_eq!(
            relay
                .open_store(&store(1), &fingerprint(1), may_create)
                .await,
            Ok(StoreAccess {
                created: false,
                head: 1
            }),
            "the right credential reopens, may_create or not"
        );
        assert_eq!(
            relay
                .open_store(&store(1), &fingerprint(2), may_create)
                .await,
            Err(RelayError::Unauthorized),
            "a wrong credential is refused, may_create or not"
        );
    }
    let mut almost = fingerprint(1);
    almost[31] ^= 1;
    assert_eq!(
        relay.open_store(&store(1), &almost, true).await,
        Err(RelayError::Unauthorized),
        "one bit off is wrong"
    );
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(1), false).await,
        Ok(StoreAccess {
            created: false,
            head: 1
        }),
        "refusals changed nothing"
    );
    assert_eq!(
        must(relay.stats().await, "stats").stores,
        1,
        "a refused open creates no store"
    );
}

/// Newer versions are accepted, older and equal ones are stale; equal
/// versions go to the higher epoch; duplicates within a call are handled
/// in order.
pub async fn append_keeps_the_highest_precedence<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    let a = locator(1);
    let appended = append(
        relay,
        1,
        vec![
            incoming(a, precedence(10, 1, 1), b"v10"),
            incoming(locator(2), precedence(5, 1, 1), b"other"),
        ],
    )
    .await;
    assert_eq!(
        appended,
        Appended {
            accepted: 2,
            stale: 0,
            head: 2
        }
    );

    let appended = append(
        relay,
        1,
        vec![
            incoming(a, precedence(9, 9, 9), b"older version, newer epoch"),
            incoming(a, precedence(10, 1, 1), b"equal"),
            incoming(a, precedence(10, 0, 5), b"same ms, lower device"),
        ],
    )
    .await;
    assert_eq!(
        appended,
        Appended {
            accepted: 0,
            stale: 3,
            head: 2
        },
        "nothing at or below the held precedence is stored"
    );

    let appended = append(
        relay,
        1,
        vec![
            incoming(a, precedence(10, 1, 2), b"reseal"),
            incoming(a, precedence(10, 1, 1), b"old epoch again"),
            incoming(a, precedence(10, 2, 1), b"higher device"),
            incoming(a, precedence(11, 0, 1), b"v11"),
            incoming(a, precedence(11, 0, 1), b"v11 duplicate"),
        ],
    )
    .await;
    assert_eq!(
        appended,
        Appended {
            accepted: 3,
            stale: 2,
            head: 5
        },
        "in order: the reseal wins by epoch, a higher device by version, v11 by time"
    );
    let log = pull_all(relay, 1).await;
    let held: Vec<_> = log
        .iter()
        .map(|e| (e.seq, e.locator, e.envelope.as_slice()))
        .collect();
    assert_eq!(
        held,
        vec![(2, locator(2), &b"other"[..]), (5, a, &b"v11"[..])],
        "one entry per locator, the highest"
    );
    assert_eq!(must(relay.head(&store(1)).await, "head"), 5);

    let appended = append(relay, 1, Vec::new()).await;
    assert_eq!(
        appended,
        Appended {
            accepted: 0,
            stale: 0,
            head: 5
        },
        "an empty append"
    );
}

/// Superseding removes the old log entry: no pull, from any cursor, ever
/// returns it, and the head entry stays in the log.
pub async fn superseded_entries_leave_the_log<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    for ms in 1..=4 {
        let envelope = format!("version {ms}");
        append(
            relay,
            1,
            vec![incoming(
                locator(1),
                precedence(ms, 1, 1),
                envelope.as_bytes(),
            )],
        )
        .await;
    }
    append(
        relay,
        1,
        vec![incoming(locator(2), precedence(1, 1, 1), b"two")],
    )
    .await;
    for since in 0..=5 {
        let page = must(relay.pull(&store(1), since, 100, usize::MAX).await, "pull");
        for entry in &page.entries {
            assert!(entry.seq > since, "only entries after the cursor");
            if entry.locator == locator(1) {
                assert_eq!(entry.seq, 4, "only the newest entry of locator 1 remains");
                assert_eq!(entry.envelope, b"version 4");
            }
        }
        let expected: Vec<u64> = [4, 5].into_iter().filter(|&seq| seq > since).collect();
        let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, expected, "pull since {since}");
        assert!(!page.more, "everything fit");
    }
    let stats = must(relay.stats().await, "stats");
    assert_eq!(stats.entries, 2, "superseded entries are gone");
    assert_eq!(
        stats.envelope_bytes,
        (b"version 4".len() + b"two".len()) as u64
    );
}

/// A page stops at `limit` entries, and before the entry that would take it
/// over `bytes_target`, but always holds the first entry; `more` and the
/// cursor tell the rest.
pub async fn pull_pages_by_limit_and_bytes<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    let empty = must(relay.pull(&store(1), 0, 10, 100).await, "pull an empty log");
    assert!(empty.entries.is_empty() && !empty.more && empty.cursor == 0);
    let sizes = [10usize, 10, 30, 5, 100, 1];
    let entries = sizes
        .iter()
        .zip(1u8..)
        .map(|(&size, n)| incoming(locator(n), precedence(1, 1, 1), &vec![n; size]))
        .collect();
    append(relay, 1, entries).await;

    let seqs = |page: &super::Page| page.entries.iter().map(|e| e.seq).collect::<Vec<_>>();
    let page = must(relay.pull(&store(1), 0, 2, usize::MAX).await, "pull");
    assert_eq!(
        (seqs(&page), page.cursor, page.more),
        (vec![1, 2], 2, true),
        "limit"
    );

    let page = must(relay.pull(&store(1), 0, 100, 25).await, "pull");
    assert_eq!(
        (seqs(&page), page.cursor, page.more),
        (vec![1, 2], 2, true),
        "10 + 10 fit 25 bytes; the 30-byte entry would not"
    );
    let page = must(relay.pull(&store(1), 0, 100, 20).await, "pull");
    assert_eq!(seqs(&page), vec![1, 2], "exactly reaching the target fits");

    let page = must(relay.pull(&store(1), 2, 100, 1).await, "pull");
    assert_eq!(
        (seqs(&page), page.cursor, page.more),
        (vec![3], 3, true),
        "a first entry over the target still comes, alone"
    );
    let page = must(relay.pull(&store(1), 3, 100, 0).await, "pull");
    assert_eq!(
        seqs(&page),
        vec![4],
        "a zero target pulls one entry at a time"
    );

    let page = must(relay.pull(&store(1), 4, 100, 1000).await, "pull");
    assert_eq!(
        (seqs(&page), page.cursor, page.more),
        (vec![5, 6], 6, false),
        "the tail"
    );
    let page = must(relay.pull(&store(1), 6, 100, 1000).await, "pull");
    assert!(
        page.entries.is_empty() && page.cursor == 6 && !page.more,
        "caught up"
    );
    let page = must(relay.pull(&store(1), 1000, 100, 1000).await, "pull");
    assert!(
        page.entries.is_empty() && page.cursor == 1000 && !page.more,
        "past the head"
    );

    let page = must(relay.pull(&store(1), 0, 0, 1000).await, "pull");
    assert!(
        page.entries.is_empty() && page.cursor == 0 && page.more,
        "limit 0"
    );

    let page = must(
        relay.pull(&store(1), 0, usize::MAX, usize::MAX).await,
        "pull",
    );
    assert_eq!(
        seqs(&page),
        vec![1, 2, 3, 4, 5, 6],
        "huge bounds are capped, not refused"
    );
    assert_eq!(
        page.entries[4].envelope,
        vec![5u8; 100],
        "envelopes come back whole"
    );
    assert_eq!(page.entries[4].locator, locator(5));
    assert_eq!(pull_all(relay, 1).await.len(), 6);
}

/// Every per-store operation refuses a store that does not exist.
pub async fn unknown_store_is_refused<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    let absent = store(2);
    let unknown = Err::<(), _>(RelayError::UnknownStore);
    assert_eq!(relay.head(&absent).await.map(drop), unknown);
    assert_eq!(relay.pull(&absent, 0, 10, 100).await.map(drop), unknown);
    let entry = incoming(locator(1), precedence(1, 1, 1), b"x");
    assert_eq!(relay.append(&absent, vec![entry]).await.map(drop), unknown);
    let device = DeviceId([1; 16]);
    assert_eq!(
        relay.mailbox_put(&absent, &device, vec![1]).await.map(drop),
        unknown
    );
    assert_eq!(
        relay.mailbox_fetch(&absent, &device, 0, 10).await.map(drop),
        unknown
    );
    assert_eq!(relay.mailbox_ack(&absent, &device, 10).await, unknown);
    assert_eq!(
        *relay.watch(&absent).borrow(),
        0,
        "watching an absent store starts at 0"
    );
    let stats = must(relay.stats().await, "stats");
    assert_eq!(
        stats,
        RelayStats {
            stores: 1,
            entries: 0,
            envelope_bytes: 0
        }
    );
    assert_eq!(
        RelayError::UnknownStore.code(),
        RelayError::Unauthorized.code()
    );
}

/// Over-bound input is refused whole, before anything is stored.
pub async fn oversize_input_is_refused<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    let max = persist_core::envelope::ENVELOPE_BYTES_MAX;
    let entries = vec![
        incoming(locator(1), precedence(1, 1, 1), b"fine"),
        incoming(locator(2), precedence(1, 1, 1), &vec![0; max + 1]),
    ];
    assert_eq!(
        relay.append(&store(1), entries).await,
        Err(RelayError::EnvelopeTooLarge {
            bytes: max + 1,
            max
        })
    );
    let many = (0..=APPEND_ENTRIES_MAX)
        .map(|i| incoming(locator(i as u8), precedence(i as u64, 1, 1), b"x"))
        .collect();
    assert_eq!(
        relay.append(&store(1), many).await,
        Err(RelayError::TooManyEntries {
            count: APPEND_ENTRIES_MAX + 1,
            max: APPEND_ENTRIES_MAX
        })
    );
    let device = DeviceId([1; 16]);
    assert_eq!(
        relay
            .mailbox_put(&store(1), &device, vec![0; MAILBOX_ITEM_BYTES_MAX + 1])
            .await,
        Err(RelayError::MailboxItemTooLarge {
            bytes: MAILBOX_ITEM_BYTES_MAX + 1,
            max: MAILBOX_ITEM_BYTES_MAX
        })
    );
    assert_eq!(
        must(relay.head(&store(1)).await, "head"),
        0,
        "nothing was stored"
    );
    assert_eq!(
        must(
            relay.mailbox_fetch(&store(1), &device, 0, 10).await,
            "fetch"
        ),
        Vec::new()
    );
    let exactly = vec![incoming(locator(1), precedence(1, 1, 1), &vec![7; max])];
    assert_eq!(
        append(relay, 1, exactly).await.accepted,
        1,
        "the largest envelope fits"
    );
    let item = vec![7; MAILBOX_ITEM_BYTES_MAX];
    must(
        relay.mailbox_put(&store(1), &device, item).await,
        "the largest item fits",
    );
}

/// Watchers see the head as of subscribing, then every growth, only ever
/// upwards, and nothing for appends that change nothing or for other stores.
pub async fn watch_publishes_growth<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    create(relay, 2).await;
    append(
        relay,
        1,
        vec![incoming(locator(1), precedence(1, 1, 1), b"a")],
    )
    .await;
    let mut first = relay.watch(&store(1));
    assert_eq!(*first.borrow_and_update(), 1, "starts at the head");
    assert!(!must(first.has_changed(), "channel open"), "marked seen");

    append(
        relay,
        1,
        vec![incoming(locator(2), precedence(1, 1, 1), b"b")],
    )
    .await;
    let mut second = relay.watch(&store(1));
    assert!(
        must(first.has_changed(), "channel open"),
        "growth is announced"
    );
    assert_eq!(*first.borrow_and_update(), 2);
    assert_eq!(
        *second.borrow_and_update(),
        2,
        "a later subscriber starts at the head"
    );

    append(
        relay,
        1,
        vec![incoming(locator(1), precedence(1, 1, 1), b"stale")],
    )
    .await;
    append(
        relay,
        2,
        vec![incoming(locator(1), precedence(1, 1, 1), b"elsewhere")],
    )
    .await;
    assert!(
        !must(first.has_changed(), "channel open"),
        "stale appends and other stores are silent"
    );

    let entries = (3..6)
        .map(|n| incoming(locator(n), precedence(1, 1, 1), b"c"))
        .collect();
    append(relay, 1, entries).await;
    assert!(must(second.has_changed(), "channel open"));
    assert_eq!(
        *second.borrow_and_update(),
        5,
        "one notification per append, at its head"
    );

    drop(first);
    drop(second);
    append(
        relay,
        1,
        vec![incoming(locator(9), precedence(1, 1, 1), b"d")],
    )
    .await;
    let mut again = relay.watch(&store(1));
    assert_eq!(
        *again.borrow_and_update(),
        6,
        "resubscribing after everyone left"
    );
    append(
        relay,
        1,
        vec![incoming(locator(10), precedence(1, 1, 1), b"e")],
    )
    .await;
    assert!(must(again.has_changed(), "channel open"));
    assert_eq!(*again.borrow_and_update(), 7);
}

/// Items get increasing seqs per mailbox; fetch pages after a cursor; ack
/// deletes up to a seq; seqs are never reused, even once empty.
pub async fn mailboxes_put_fetch_and_ack<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    create(relay, 2).await;
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let put = async |n: u8, device: &DeviceId, payload: &[u8]| {
        must(
            relay.mailbox_put(&store(n), device, payload.to_vec()).await,
            "mailbox put",
        )
    };
    assert_eq!(put(1, &alice, b"a1").await, 1);
    assert_eq!(put(1, &alice, b"a2").await, 2);
    assert_eq!(
        put(1, &bob, b"b1").await,
        1,
        "each mailbox counts on its own"
    );
    assert_eq!(put(2, &alice, b"other store").await, 1, "and per store");
    assert_eq!(put(1, &alice, b"a3").await, 3);

    let fetch = async |n: u8, device: &DeviceId, since: u64, limit: usize| {
        must(
            relay.mailbox_fetch(&store(n), device, since, limit).await,
            "mailbox fetch",
        )
        .into_iter()
        .map(|item| (item.seq, item.payload))
        .collect::<Vec<_>>()
    };
    let a = |seq: u64| (seq, format!("a{seq}").into_bytes());
    assert_eq!(fetch(1, &alice, 0, 10).await, vec![a(1), a(2), a(3)]);
    assert_eq!(
        fetch(1, &alice, 1, 1).await,
        vec![a(2)],
        "after a cursor, up to a limit"
    );
    assert_eq!(fetch(1, &alice, 3, 10).await, Vec::new());
    assert_eq!(fetch(1, &alice, 0, 0).await, Vec::new(), "limit 0");
    assert_eq!(
        fetch(1, &DeviceId([9; 16]), 0, 10).await,
        Vec::new(),
        "a mailbox never used"
    );

    must(relay.mailbox_ack(&store(1), &alice, 2).await, "ack");
    assert_eq!(
        fetch(1, &alice, 0, 10).await,
        vec![a(3)],
        "acked items are gone"
    );
    assert_eq!(
        fetch(1, &bob, 0, 10).await,
        vec![(1, b"b1".to_vec())],
        "others untouched"
    );
    assert_eq!(
        fetch(2, &alice, 0, 10).await,
        vec![(1, b"other store".to_vec())]
    );
    must(
        relay.mailbox_ack(&store(1), &alice, 2).await,
        "acking again is fine",
    );
    must(
        relay.mailbox_ack(&store(1), &DeviceId([9; 16]), 5).await,
        "acking nothing is fine",
    );
    must(
        relay.mailbox_ack(&store(1), &alice, u64::MAX).await,
        "ack everything",
    );
    assert_eq!(fetch(1, &alice, 0, 10).await, Vec::new());
    assert_eq!(
        put(1, &alice, b"a4").await,
        4,
        "an emptied mailbox does not reuse seqs"
    );
    assert_eq!(fetch(1, &alice, 0, 10).await, vec![a(4)]);
}

/// A mailbox holding [`MAILBOX_ITEMS_MAX`] items refuses more until some are
/// acknowledged; fetches page by bytes.
pub async fn mailbox_refuses_items_when_full<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    let device = DeviceId([1; 16]);
    // Large enough that a fetch of all of them pages by bytes.
    let payload = vec![3u8; 8 * 1024];
    for expected in 1..=MAILBOX_ITEMS_MAX as u64 {
        let seq = must(
            relay.mailbox_put(&store(1), &device, payload.clone()).await,
            "filling the mailbox",
        );
        assert_eq!(seq, expected);
    }
    assert_eq!(
        relay.mailbox_put(&store(1), &device, vec![1]).await,
        Err(RelayError::MailboxFull {
            max: MAILBOX_ITEMS_MAX
        })
    );
    must(
        relay
            .mailbox_put(&store(1), &DeviceId([2; 16]), vec![1])
            .await,
        "another mailbox",
    );

    let mut since = 0;
    let mut fetched = 0;
    let mut pages = 0;
    loop {
        let items = must(
            relay
                .mailbox_fetch(&store(1), &device, since, usize::MAX)
                .await,
            "fetch",
        );
        let Some(last) = items.last() else { break };
        let bytes: usize = items.iter().map(|item| item.payload.len()).sum();
        assert!(
            bytes <= super::MAILBOX_FETCH_BYTES_TARGET,
            "a fetch pages by bytes"
        );
        since = last.seq;
        fetched += items.len();
        pages += 1;
    }
    assert_eq!(fetched, MAILBOX_ITEMS_MAX);
    assert!(
        pages > 1,
        "{MAILBOX_ITEMS_MAX} items of 8 KiB take more than one fetch"
    );

    must(relay.mailbox_ack(&store(1), &device, 1).await, "ack one");
    let seq = must(
        relay.mailbox_put(&store(1), &device, vec![1]).await,
        "room for one",
    );
    assert_eq!(seq, MAILBOX_ITEMS_MAX as u64 + 1);
    assert_eq!(
        relay.mailbox_put(&store(1), &device, vec![1]).await,
        Err(RelayError::MailboxFull {
            max: MAILBOX_ITEMS_MAX
        }),
        "and only one"
    );
}

/// Stats count stores, live entries and their envelope bytes.
pub async fn stats_count_what_is_held<B: RelayBackend>(relay: &B) {
    assert_eq!(
        must(relay.stats().await, "stats"),
        RelayStats::default(),
        "empty"
    );
    create(relay, 1).await;
    create(relay, 2).await;
    append(
        relay,
        1,
        vec![
            incoming(locator(1), precedence(1, 1, 1), &[0; 100]),
            incoming(locator(2), precedence(1, 1, 1), &[0; 50]),
        ],
    )
    .await;
    append(
        relay,
        2,
        vec![incoming(locator(1), precedence(1, 1, 1), &[0; 7])],
    )
    .await;
    assert_eq!(
        must(relay.stats().await, "stats"),
        RelayStats {
            stores: 2,
            entries: 3,
            envelope_bytes: 157
        }
    );
    append(
        relay,
        1,
        vec![
            incoming(locator(1), precedence(2, 1, 1), &[0; 10]),
            incoming(locator(2), precedence(0, 1, 1), &[0; 1000]),
        ],
    )
    .await;
    assert_eq!(
        must(relay.stats().await, "stats"),
        RelayStats {
            stores: 2,
            entries: 3,
            envelope_bytes: 67
        },
        "a superseded envelope's bytes leave, a stale one's never come"
    );
    must(
        relay
            .mailbox_put(&store(1), &DeviceId([1; 16]), vec![0; 500])
            .await,
        "put",
    );
    assert_eq!(
        must(relay.stats().await, "stats").envelope_bytes,
        67,
        "mailbox items are not log entries"
    );
}

/// Stores share nothing: the same locator in two stores is two entries,
/// each store numbers its own log.
pub async fn stores_are_isolated<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    create(relay, 2).await;
    append(
        relay,
        1,
        vec![incoming(locator(1), precedence(5, 1, 1), b"one")],
    )
    .await;
    let appended = append(
        relay,
        2,
        vec![incoming(locator(1), precedence(1, 1, 1), b"two")],
    )
    .await;
    assert_eq!(
        appended,
        Appended {
            accepted: 1,
            stale: 0,
            head: 1
        },
        "not stale against store 1"
    );
    append(
        relay,
        1,
        vec![incoming(locator(2), precedence(5, 1, 1), b"one more")],
    )
    .await;
    assert_eq!(must(relay.head(&store(1)).await, "head"), 2);
    assert_eq!(must(relay.head(&store(2)).await, "head"), 1);
    let two = pull_all(relay, 2).await;
    assert_eq!(two.len(), 1);
    assert_eq!((two[0].seq, two[0].envelope.as_slice()), (1, &b"two"[..]));
    assert_eq!(
        relay.open_store(&store(2), &fingerprint(1), false).await,
        Err(RelayError::Unauthorized),
        "store 1's credential does not open store 2"
    );
}

/// One append in a random workload for [`random_appends_match_model`].
#[derive(Clone, Debug)]
pub struct AppendOp {
    /// Which store (taken modulo 3).
    pub store: u8,
    /// Which locator.
    pub locator: u8,
    /// HLC milliseconds of the write.
    pub ms: u64,
    /// Origin device of the write.
    pub origin: u8,
    /// Sealing epoch.
    pub epoch: u32,
    /// Envelope size beyond its unique 4-byte prefix.
    pub padding: u8,
    /// Whether this op ends the current append call.
    pub ends_call: bool,
}

/// Applies `ops` in calls and checks the backend against a model: per
/// locator exactly the highest precedence survives, accepted/stale counts
/// and heads match, the log's seqs strictly increase and end at the head,
/// stats agree, and replaying the survivors is all stale.
pub async fn random_appends_match_model<B: RelayBackend>(relay: &B, ops: &[AppendOp]) {
    const STORES: u8 = 3;
    let mut model: BTreeMap<(u8, Locator), (Precedence, Vec<u8>)> = BTreeMap::new();
    let mut heads = [0u64; STORES as usize];
    for n in 0..STORES {
        create(relay, n).await;
    }
    let mut call: Vec<(usize, &AppendOp)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        call.push((i, op));
        let last = i + 1 == ops.len();
        if !(op.ends_call || last || call.len() == APPEND_ENTRIES_MAX) {
            continue;
        }
        // One call per store among the gathered ops, in op order.
        for n in 0..STORES {
            let mut entries = Vec::new();
            let (mut accepted, mut stale) = (0, 0);
            for &(i, op) in call.iter().filter(|(_, op)| op.store % STORES == n) {
                let mut envelope = (i as u32).to_be_bytes().to_vec();
                envelope.resize(4 + usize::from(op.padding), op.padding);
                let entry = incoming(
                    locator(op.locator),
                    precedence(op.ms, op.origin, op.epoch),
                    &envelope,
                );
                let slot = model.get(&(n, entry.locator));
                if slot.is_none_or(|(held, _)| wins(entry.precedence, *held)) {
                    model.insert((n, entry.locator), (entry.precedence, envelope));
                    accepted += 1;
                } else {
                    stale += 1;
                }
                entries.push(entry);
            }
            if entries.is_empty() {
                continue;
            }
            heads[usize::from(n)] += accepted;
            let appended = append(relay, n, entries).await;
            assert_eq!(
                appended,
                Appended {
                    accepted: accepted as u32,
                    stale,
                    head: heads[usize::from(n)]
                },
                "append to store {n} before op {i}"
            );
        }
        call.clear();
    }

    let mut stats = RelayStats {
        stores: STORES.into(),
        ..RelayStats::default()
    };
    for n in 0..STORES {
        let log = pull_all(relay, n).await;
        let head = heads[usize::from(n)];
        assert_eq!(must(relay.head(&store(n)).await, "head"), head);
        assert_eq!(
            log.last().map_or(0, |e| e.seq),
            head,
            "the head entry is live"
        );
        let held: BTreeMap<Locator, Vec<u8>> = log
            .iter()
            .map(|e| (e.locator, e.envelope.clone()))
            .collect();
        assert_eq!(held.len(), log.len(), "one entry per locator in store {n}");
        let expected: BTreeMap<Locator, Vec<u8>> = model
            .iter()
            .filter(|((m, _), _)| *m == n)
            .map(|((_, locator), (_, envelope))| (*locator, envelope.clone()))
            .collect();
        assert_eq!(
            held, expected,
            "store {n} holds exactly the highest precedence per locator"
        );
        stats.entries += log.len() as u64;
        stats.envelope_bytes += log.iter().map(|e| e.envelope.len() as u64).sum::<u64>();

        let replay: Vec<Incoming> = model
            .iter()
            .filter(|((m, _), _)| *m == n)
            .map(|((_, locator), (precedence, envelope))| incoming(*locator, *precedence, envelope))
            .collect();
        let count = replay.len() as u32;
        if count > 0 {
            assert_eq!(
                append(relay, n, replay).await,
                Appended {
                    accepted: 0,
                    stale: count,
                    head
                },
                "replaying the survivors changes nothing"
            );
        }
    }
    assert_eq!(must(relay.stats().await, "stats"), stats);
}

/// For a durable backend: what one instance stored, the next one opened on
/// the same storage holds, and it continues each store's and mailbox's
/// sequence numbers without reusing any.
///
/// `open` opens the backend on the same storage each time; the first call
/// finds it empty.
pub async fn reopen_keeps_data_and_sequence<B, F, Fut>(mut open: F)
where
    B: RelayBackend,
    F: FnMut() -> Fut,
    Fut: Future<Output = B>,
{
    let device = DeviceId([1; 16]);
    let before = {
        let relay = open().await;
        create(&relay, 1).await;
        append(
            &relay,
            1,
            vec![
                incoming(locator(1), precedence(1, 1, 1), b"first"),
                incoming(locator(2), precedence(1, 1, 1), b"second"),
            ],
        )
        .await;
        append(
            &relay,
            1,
            vec![incoming(locator(1), precedence(2, 1, 1), b"first again")],
        )
        .await;
        for payload in [b"m1", b"m2"] {
            must(
                relay
                    .mailbox_put(&store(1), &device, payload.to_vec())
                    .await,
                "put",
            );
        }
        must(relay.mailbox_ack(&store(1), &device, 2).await, "ack both");
        let log = pull_all(&relay, 1).await;
        let stats = must(relay.stats().await, "stats");
        (log, stats)
    };

    let relay = open().await;
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(1), true).await,
        Ok(StoreAccess {
            created: false,
            head: 3
        }),
        "the store and its head survive"
    );
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(2), true).await,
        Err(RelayError::Unauthorized),
        "and so does its fingerprint"
    );
    assert_eq!(pull_all(&relay, 1).await, before.0, "the log survives");
    assert_eq!(
        must(relay.stats().await, "stats"),
        before.1,
        "the counters survive"
    );
    let appended = append(
        &relay,
        1,
        vec![
            incoming(locator(1), precedence(1, 1, 1), b"stale after reopen"),
            incoming(locator(3), precedence(1, 1, 1), b"third"),
        ],
    )
    .await;
    assert_eq!(
        appended,
        Appended {
            accepted: 1,
            stale: 1,
            head: 4
        },
        "precedence survives, and seqs continue"
    );
    assert_eq!(
        must(
            relay.mailbox_put(&store(1), &device, b"m3".to_vec()).await,
            "put"
        ),
        3,
        "mailbox seqs continue"
    );
    let fetched = must(
        relay.mailbox_fetch(&store(1), &device, 0, 10).await,
        "fetch",
    );
    assert_eq!(fetched.len(), 1, "acknowledged items stay deleted");
}

/// Appends racing from several tasks (run it on a multi-threaded runtime)
/// share one gap-free sequence: every accepted entry gets its own seq, and
/// the head counts them all.
pub async fn concurrent_appends_share_one_sequence<B: RelayBackend>(relay: Arc<B>) {
    const TASKS: u8 = 4;
    const CALLS: u8 = 10;
    create(&*relay, 1).await;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let relay = relay.clone();
        tasks.spawn(async move {
            for call in 0..CALLS {
                let entries = (0..2)
                    .map(|k| {
                        let n = task * 2 * CALLS + call * 2 + k;
                        incoming(locator(n), precedence(1, task, 1), &[n])
                    })
                    .collect();
                let appended = must(relay.append(&store(1), entries).await, "append");
                assert_eq!(appended.accepted, 2, "distinct locators are all new");
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        must(joined, "an appending task");
    }
    let total = u64::from(TASKS) * u64::from(CALLS) * 2;
    assert_eq!(must(relay.head(&store(1)).await, "head"), total);
    let seqs: Vec<u64> = pull_all(&*relay, 1).await.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "no seq lost or shared"
    );
}

/// A rekey replaces the credential: the old one is refused from then on,
/// the new one admits to the same store (log, head, mailboxes), and other
/// stores are untouched.
pub async fn rekey_swaps_the_credential_and_keeps_the_store<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    create(relay, 2).await;
    append(
        relay,
        1,
        vec![incoming(locator(1), precedence(1, 1, 1), b"kept")],
    )
    .await;
    let device = DeviceId([4; 16]);
    must(
        relay
            .mailbox_put(&store(1), &device, b"mail".to_vec())
            .await,
        "put",
    );
    let log = pull_all(relay, 1).await;

    must(
        relay
            .rekey(&store(1), &fingerprint(1), &fingerprint(3))
            .await,
        "rekey",
    );
    for may_create in [false, true] {
        assert_eq!(
            relay
                .open_store(&store(1), &fingerprint(1), may_create)
                .await,
            Err(RelayError::Unauthorized),
            "the old credential is refused after a rekey"
        );
    }
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(3), false).await,
        Ok(StoreAccess {
            created: false,
            head: 1
        }),
        "the new credential admits to the same store"
    );
    assert_eq!(pull_all(relay, 1).await, log, "the log is unchanged");
    let mail = must(
        relay.mailbox_fetch(&store(1), &device, 0, 10).await,
        "fetch",
    );
    assert_eq!(mail.len(), 1, "mailboxes are unchanged");
    assert_eq!(
        relay.open_store(&store(2), &fingerprint(2), false).await,
        Ok(StoreAccess {
            created: false,
            head: 0
        }),
        "other stores keep their credentials"
    );
    assert_eq!(
        relay.open_store(&store(2), &fingerprint(3), false).await,
        Err(RelayError::Unauthorized),
        "a rekey of one store opens no other"
    );

    // Rekeying to the same credential, and onwards again.
    must(
        relay
            .rekey(&store(1), &fingerprint(3), &fingerprint(3))
            .await,
        "rekey to itself",
    );
    must(
        relay
            .rekey(&store(1), &fingerprint(3), &fingerprint(4))
            .await,
        "rekey again",
    );
    assert!(
        relay
            .open_store(&store(1), &fingerprint(4), false)
            .await
            .is_ok()
    );
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(3), false).await,
        Err(RelayError::Unauthorized)
    );
    assert_eq!(
        relay
            .rekey(&store(9), &fingerprint(9), &fingerprint(1))
            .await,
        Err(RelayError::UnknownStore),
        "a rekey creates no store"
    );
    assert_eq!(
        relay.head(&store(9)).await,
        Err(RelayError::UnknownStore),
        "a refused rekey creates nothing"
    );
    assert_eq!(must(relay.stats().await, "stats").stores, 2);
}

/// A rekey whose `old` is not the stored credential (a wrong one, the one
/// before the last rekey, one bit off) is refused and changes nothing.
pub async fn rekey_from_a_stale_credential_changes_nothing<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    let mut almost = fingerprint(1);
    almost[0] ^= 0x80;
    for wrong in [fingerprint(2), almost] {
        assert_eq!(
            relay.rekey(&store(1), &wrong, &fingerprint(5)).await,
            Err(RelayError::Unauthorized),
            "a rekey needs the current credential"
        );
    }
    assert!(
        relay
            .open_store(&store(1), &fingerprint(1), false)
            .await
            .is_ok(),
        "refused rekeys leave the credential"
    );
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(5), false).await,
        Err(RelayError::Unauthorized),
        "and install nothing"
    );
    must(
        relay
            .rekey(&store(1), &fingerprint(1), &fingerprint(2))
            .await,
        "rekey",
    );
    assert_eq!(
        relay
            .rekey(&store(1), &fingerprint(1), &fingerprint(6))
            .await,
        Err(RelayError::Unauthorized),
        "the credential before the rekey cannot rekey again"
    );
    assert!(
        relay
            .open_store(&store(1), &fingerprint(2), false)
            .await
            .is_ok()
    );
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(6), false).await,
        Err(RelayError::Unauthorized)
    );
}

/// Every successful rekey moves the store's access channel (for every
/// subscriber, new or old); refused rekeys and other stores' rekeys do not.
pub async fn rekey_moves_access_changes<B: RelayBackend>(relay: &B) {
    create(relay, 1).await;
    create(relay, 2).await;
    let mut first = relay.access_changes(&store(1));
    first.borrow_and_update();
    assert!(
        !must(first.has_changed(), "channel open"),
        "nothing changed yet"
    );
    must(
        relay
            .rekey(&store(2), &fingerprint(2), &fingerprint(7))
            .await,
        "rekey of another store",
    );
    let _ = relay
        .rekey(&store(1), &fingerprint(9), &fingerprint(8))
        .await;
    assert!(
        !must(first.has_changed(), "channel open"),
        "refused rekeys and other stores are silent"
    );
    let mut second = relay.access_changes(&store(1));
    second.borrow_and_update();
    must(
        relay
            .rekey(&store(1), &fingerprint(1), &fingerprint(3))
            .await,
        "rekey",
    );
    assert!(
        must(first.has_changed(), "channel open"),
        "a rekey is announced"
    );
    assert!(
        must(second.has_changed(), "channel open"),
        "to every subscriber"
    );
    first.borrow_and_update();
    drop(second);
    must(
        relay
            .rekey(&store(1), &fingerprint(3), &fingerprint(4))
            .await,
        "rekey again",
    );
    assert!(
        must(first.has_changed(), "channel open"),
        "each rekey is announced"
    );
}

/// Rekeys racing from one credential to different new ones (run it on a
/// multi-threaded runtime): exactly one wins, and its credential is the
/// store's.
pub async fn concurrent_rekeys_from_one_credential<B: RelayBackend>(relay: Arc<B>) {
    const RACERS: u8 = 4;
    create(&*relay, 1).await;
    let mut tasks = tokio::task::JoinSet::new();
    for racer in 0..RACERS {
        let relay = relay.clone();
        tasks.spawn(async move {
            let new = fingerprint(10 + racer);
            (racer, relay.rekey(&store(1), &fingerprint(1), &new).await)
        });
    }
    let mut winners = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (racer, result) = must(joined, "a rekeying task");
        match result {
            Ok(()) => winners.push(racer),
            Err(err) => assert_eq!(err, RelayError::Unauthorized, "a loser is refused"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one rekey wins: {winners:?}");
    for racer in 0..RACERS {
        let admitted = relay
            .open_store(&store(1), &fingerprint(10 + racer), false)
            .await
            .is_ok();
        assert_eq!(
            admitted,
            winners.contains(&racer),
            "only the winner's credential opens the store"
        );
    }
}

/// A durable backend keeps a rekeyed credential across reopening: the old
/// one stays refused, the new one admits.
pub async fn reopen_keeps_a_rekeyed_credential<B, F, Fut>(mut open: F)
where
    B: RelayBackend,
    F: FnMut() -> Fut,
    Fut: Future<Output = B>,
{
    {
        let relay = open().await;
        create(&relay, 1).await;
        append(
            &relay,
            1,
            vec![incoming(locator(1), precedence(1, 1, 1), b"x")],
        )
        .await;
        must(
            relay
                .rekey(&store(1), &fingerprint(1), &fingerprint(2))
                .await,
            "rekey",
        );
    }
    let relay = open().await;
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(1), true).await,
        Err(RelayError::Unauthorized),
        "the old credential stays refused"
    );
    assert_eq!(
        relay.open_store(&store(1), &fingerprint(2), false).await,
        Ok(StoreAccess {
            created: false,
            head: 1
        }),
        "the rekeyed credential survives"
    );
}
