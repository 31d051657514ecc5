//! The PostgreSQL relay backend: the conformance suite (written once, in
//! `persist_storage::relay::conformance`) against [`PostgresRelay`], and
//! what only several nodes over one database can show: sequence numbers
//! under concurrent nodes, fan-out across nodes, what the tables hold, and
//! losing and regaining the database.
//!
//! Needs a PostgreSQL server: set `PERSIST_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`; `.ci/run` sets it). Without it
//! every test prints `skipped: PERSIST_TEST_POSTGRES_URL is not set` and
//! passes. Each test works in a schema of its own, named after the test,
//! the process and a counter, and drops it at the end, so runs in parallel
//! (and on a shared server) never collide.
//!
//! Run: `cargo nextest run -p persist-storage --features postgres --test relay_postgres`.

// Test helpers unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use persist_core::Locator;
use persist_storage::relay::conformance::{
    self, AppendOp, fingerprint, incoming, locator, precedence, store,
};
use persist_storage::relay::{
    Appended, Incoming, POSTGRES_SCHEMA_VERSION, PostgresOpenError, PostgresRelay, RelayBackend,
    RelayError,
};
use proptest::prelude::*;
use tokio_postgres::{AsyncMessage, NoTls};

/// Where the test server is, from the environment.
const URL_VAR: &str = "PERSIST_TEST_POSTGRES_URL";

/// The server's URL, or `None` after saying the test is skipped.
fn url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            println!("skipped: {URL_VAR} is not set");
            None
        }
    }
}

/// A name for this test's schema (or role): `pt_<test>_<pid>_<n>`, at most
/// 48 bytes, unique among concurrent test processes on one machine.
fn unique_name(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("_{}_{n}", std::process::id());
    let room = 48 - "pt_".len() - suffix.len();
    let test: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(room)
        .collect();
    format!("pt_{test}{suffix}")
}

/// An ordinary connection to the test server, its driver spawned.
async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Drops the test's schema (and role, if it made one) when the test ends,
/// passed or failed. Drop cannot await, so it runs the cleanup on a thread
/// of its own with its own runtime.
struct Cleanup {
    url: String,
    schema: String,
    role: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // The relays' connections may still be open (this runtime's thread
        // is blocked here, so they cannot close): end them first, and never
        // wait long for a lock.
        let schema = &self.schema;
        let mut sql = format!(
            "SET lock_timeout = '10s'; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'persist-relay {schema}' AND pid <> pg_backend_pid(); \
             DROP SCHEMA IF EXISTS {schema} CASCADE;"
        );
        if let Some(role) = &self.role {
            sql.push_str(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'; \
                 DROP OWNED BY {role}; DROP ROLE {role};"
            ));
        }
        let url = self.url.clone();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let client = admin(&url).await;
                    if let Err(err) = client.batch_execute(&sql).await {
                        eprintln!("cleanup failed ({sql}): {err}");
                    }
                });
            });
        });
    }
}

/// A relay on a fresh schema of its own, and what drops it.
async fn fresh_named(test: &str) -> Option<(PostgresRelay, Cleanup)> {
    let url = url()?;
    let schema = unique_name(test);
    let cleanup = Cleanup {
        url: url.clone(),
        schema: schema.clone(),
        role: None,
    };
    let relay = PostgresRelay::connect(&url, Some(&schema)).await.unwrap();
    Some((relay, cleanup))
}

mod suite {
    use super::*;

    async fn fresh(test: &'static str) -> Option<(PostgresRelay, Cleanup)> {
        fresh_named(test).await
    }

    persist_storage::relay_conformance_tests!(skippable fresh);

    /// The same checks on a multi-threaded runtime, as a relay node runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_pass_on_a_multi_threaded_runtime() {
        let Some((relay, _cleanup)) = fresh("multi_append").await else {
            return;
        };
        conformance::append_keeps_the_highest_precedence(&relay).await;
        let (relay, _cleanup) = fresh("multi_watch").await.unwrap();
        conformance::watch_publishes_growth(&relay).await;
        let (relay, _cleanup) = fresh("multi_mailbox").await.unwrap();
        conformance::mailboxes_put_fetch_and_ack(&relay).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_on_one_node() {
    let Some((relay, _cleanup)) = fresh_named("concurrent_one").await else {
        return;
    };
    conformance::concurrent_appends_share_one_sequence(Arc::new(relay)).await;
}

#[tokio::test]
async fn reconnecting_keeps_data_and_sequence() {
    let Some(url) = url() else { return };
    let schema = unique_name("reopen");
    let _cleanup = Cleanup {
        url: url.clone(),
        schema: schema.clone(),
        role: None,
    };
    conformance::reopen_keeps_data_and_sequence(|| {
        let (url, schema) = (url.clone(), schema.clone());
        async move { PostgresRelay::connect(&url, Some(&schema)).await.unwrap() }
    })
    .await;
}

#[tokio::test]
async fn reconnecting_keeps_a_rekeyed_credential() {
    let Some(url) = url() else { return };
    let schema = unique_name("reopen_rekey");
    let _cleanup = Cleanup {
        url: url.clone(),
        schema: schema.clone(),
        role: None,
    };
    conformance::reopen_keeps_a_rekeyed_credential(|| {
        let (url, schema) = (url.clone(), schema.clone());
        async move { PostgresRelay::connect(&url, Some(&schema)).await.unwrap() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rekeys_on_one_node() {
    let Some((relay, _cleanup)) = fresh_named("concurrent_rekeys").await else {
        return;
    };
    conformance::concurrent_rekeys_from_one_credential(Arc::new(relay)).await;
}

/// A rekey on one node moves the store's access channel on the other (via
/// NOTIFY), and two nodes racing to rekey from one credential leave
/// exactly one winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_on_one_node_reaches_the_other() {
    let Some((one, two, _cleanup)) = two_nodes("cross_node_rekey").await else {
        return;
    };
    one.open_store(&store(1), &fingerprint(1), true)
        .await
        .unwrap();
    let mut on_two = two.access_changes(&store(1));
    on_two.borrow_and_update();
    one.rekey(&store(1), &fingerprint(1), &fingerprint(2))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), on_two.changed())
        .await
        .expect("node 2 hears of the rekey within 10 s")
        .unwrap();
    assert_eq!(
        two.open_store(&store(1), &fingerprint(1), false).await,
        Err(RelayError::Unauthorized)
    );
    assert!(
        two.open_store(&store(1), &fingerprint(2), false)
            .await
            .is_ok()
    );

    let (s, old, three, four) = (store(1), fingerprint(2), fingerprint(3), fingerprint(4));
    let (a, b) = tokio::join!(one.rekey(&s, &old, &three), two.rekey(&s, &old, &four),);
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one of two racing rekeys wins: {a:?} {b:?}"
    );
    let winner = if a.is_ok() { 3 } else { 4 };
    for node in [&one, &two] {
        assert!(
            node.open_store(&store(1), &fingerprint(winner), false)
                .await
                .is_ok()
        );
        assert_eq!(
            node.open_store(&store(1), &fingerprint(7 - winner), false)
                .await,
            Err(RelayError::Unauthorized)
        );
    }
}

#[tokio::test]
async fn a_newer_schema_is_refused_and_left_alone() {
    let Some((relay, _cleanup)) = fresh_named("newer").await else {
        return;
    };
    let url = url().unwrap();
    let schema = relay.schema().to_owned();
    drop(relay);
    let client = admin(&url).await;
    let newer = POSTGRES_SCHEMA_VERSION as i32 + 1;
    client
        .execute(
            &format!("INSERT INTO {schema}.relay_migrations (version, name) VALUES ($1, 'future')"),
            &[&newer],
        )
        .await
        .unwrap();
    let err = PostgresRelay::connect(&url, Some(&schema))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            PostgresOpenError::NewerSchema { found, supported, .. }
                if *found == newer as u32 && *supported == POSTGRES_SCHEMA_VERSION
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("upgrade the relay"), "{err}");
    let versions: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.relay_migrations"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        versions,
        i64::from(POSTGRES_SCHEMA_VERSION) + 1,
        "unchanged"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_a_connect_error() {
    // Port 1 on localhost: nothing listens, the connection is refused.
    let err = PostgresRelay::connect("postgres://postgres@127.0.0.1:1/test", Some("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, PostgresOpenError::Connect { .. }), "{err:?}");
}

fn append_ops() -> impl Strategy<Value = Vec<AppendOp>> {
    let op = (
        0u8..3,
        0u8..6,
        0u64..4,
        0u8..2,
        1u32..3,
        any::<u8>(),
        proptest::bool::weighted(0.3),
    )
        .prop_map(
            |(store, locator, ms, origin, epoch, padding, ends_call)| AppendOp {
                store,
                locator,
                ms,
                origin,
                epoch,
                padding,
                ends_call,
            },
        );
    proptest::collection::vec(op, 0..60)
}

proptest! {
    // Each case makes and drops a schema: few cases.
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn postgres_keeps_the_highest_precedence_per_locator(ops in append_ops()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let Some((relay, _cleanup)) = fresh_named("random_appends").await else {
                return;
            };
            conformance::random_appends_match_model(&relay, &ops).await;
        });
    }
}

/// Locator number `n` of node `node`, beyond the suite's 256.
fn wide_locator(node: u8, n: u32) -> Locator {
    let mut bytes = [0x5A; 32];
    bytes[0] = node;
    bytes[1..5].copy_from_slice(&n.to_be_bytes());
    Locator(bytes)
}

/// Two relay nodes over one schema, as two relay processes would be.
async fn two_nodes(test: &str) -> Option<(Arc<PostgresRelay>, Arc<PostgresRelay>, Cleanup)> {
    let (one, cleanup) = fresh_named(test).await?;
    let two = PostgresRelay::connect(&cleanup.url, Some(one.schema()))
        .await
        .unwrap();
    Some((Arc::new(one), Arc::new(two), cleanup))
}

/// Appends racing from two nodes to one store: every accepted entry gets
/// its own seq, assigned without gaps; each append's seqs are the
/// `accepted` numbers ending at its head, and together they are exactly
/// `1..=head`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_gap_free_sequence() {
    const TASKS_PER_NODE: u8 = 3;
    const CALLS: u32 = 15;
    const ENTRIES: u32 = 7;
    let Some((one, two, _cleanup)) = two_nodes("two_nodes_seq").await else {
        return;
    };
    one.open_store(&store(1), &fingerprint(1), true)
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (node, relay) in [(1u8, &one), (2u8, &two)] {
        for task in 0..TASKS_PER_NODE {
            let relay = relay.clone();
            tasks.spawn(async move {
                let mut results = Vec::new();
                for call in 0..CALLS {
                    let entries = (0..ENTRIES)
                        .map(|k| {
                            let n = (u32::from(task) * CALLS + call) * ENTRIES + k;
                            incoming(
                                wide_locator(node, n),
                                precedence(1, node, 1),
                                &n.to_be_bytes(),
                            )
                        })
                        .collect();
                    let appended = relay.append(&store(1), entries).await.unwrap();
                    assert_eq!(appended.accepted, ENTRIES, "distinct locators are all new");
                    results.push(appended);
                }
                results
            });
        }
    }
    let mut assigned = Vec::new();
    while let Some(results) = tasks.join_next().await {
        for appended in results.unwrap() {
            let first = appended.head + 1 - u64::from(appended.accepted);
            assigned.extend(first..=appended.head);
        }
    }
    let total = 2 * u64::from(TASKS_PER_NODE) * u64::from(CALLS) * u64::from(ENTRIES);
    assigned.sort_unstable();
    assert_eq!(
        assigned,
        (1..=total).collect::<Vec<_>>(),
        "the appends' seq ranges tile 1..=head: no gap, no seq twice"
    );
    for relay in [&one, &two] {
        assert_eq!(relay.head(&store(1)).await.unwrap(), total);
        let seqs: Vec<u64> = conformance::pull_all(&**relay, 1)
            .await
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "both nodes read one log"
        );
    }
    let stats = one.stats().await.unwrap();
    assert_eq!((stats.stores, stats.entries), (1, total));
}

/// Both nodes write the same locators, racing: per locator exactly the
/// highest precedence survives, the accepted counts add up to the head,
/// and the log's seqs strictly increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_on_the_same_locators_keep_the_highest() {
    const LOCATORS: u8 = 16;
    const ROUNDS: u64 = 20;
    let Some((one, two, _cleanup)) = two_nodes("two_nodes_race").await else {
        return;
    };
    one.open_store(&store(1), &fingerprint(1), true)
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (node, relay) in [(1u8, &one), (2u8, &two)] {
        let relay = relay.clone();
        tasks.spawn(async move {
            let mut accepted = 0u64;
            for round in 0..ROUNDS {
                let entries = (0..LOCATORS)
                    .map(|n| {
                        let envelope = format!("node {node} round {round}");
                        incoming(locator(n), precedence(round, node, 1), envelope.as_bytes())
                    })
                    .collect();
                accepted += u64::from(relay.append(&store(1), entries).await.unwrap().accepted);
            }
            accepted
        });
    }
    let mut accepted = 0;
    while let Some(count) = tasks.join_next().await {
        accepted += count.unwrap();
    }
    let head = one.head(&store(1)).await.unwrap();
    assert_eq!(
        accepted, head,
        "every accepted entry took one seq, and only those"
    );
    let log = conformance::pull_all(&*two, 1).await;
    assert_eq!(log.len(), usize::from(LOCATORS), "one entry per locator");
    assert_eq!(log.last().unwrap().seq, head, "the head entry is live");
    let last_round = ROUNDS - 1;
    for entry in &log {
        assert_eq!(
            entry.envelope,
            format!("node 2 round {last_round}").into_bytes(),
            "the highest precedence (last round, higher device) wins every locator"
        );
    }
}

/// An append through node 1 reaches a watcher on node 2 through
/// LISTEN/NOTIFY, and only heads ever come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_one_node_wakes_a_watcher_on_another() {
    let Some((one, two, _cleanup)) = two_nodes("cross_node_notify").await else {
        return;
    };
    one.open_store(&store(1), &fingerprint(1), true)
        .await
        .unwrap();
    one.append(
        &store(1),
        vec![incoming(locator(1), precedence(1, 1, 1), b"a")],
    )
    .await
    .unwrap();
    assert!(one.is_listening() && two.is_listening());

    let mut watcher = two.watch(&store(1));
    // Node 2 never saw the store: the channel starts low and rises to the
    // head read in the background.
    wait_for_head(&mut watcher, 1).await;
    for head in 2..=4u8 {
        one.append(
            &store(1),
            vec![incoming(locator(head), precedence(1, 1, 1), b"b")],
        )
        .await
        .unwrap();
        wait_for_head(&mut watcher, u64::from(head)).await;
    }
    // And the other way round, with a watcher node 1 already knows.
    let mut watcher_one = one.watch(&store(1));
    assert_eq!(*watcher_one.borrow_and_update(), 4, "node 1 knows the head");
    two.append(
        &store(1),
        vec![incoming(locator(9), precedence(1, 2, 1), b"c")],
    )
    .await
    .unwrap();
    wait_for_head(&mut watcher_one, 5).await;
}

/// Waits (bounded) until `watcher` shows at least `head`.
async fn wait_for_head(watcher: &mut tokio::sync::watch::Receiver<u64>, head: u64) {
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher.wait_for(|&h| h >= head))
        .await
        .unwrap_or_else(|_| panic!("no head {head} within 10 s"))
        .map(|h| *h)
        .unwrap();
    assert_eq!(seen, head, "heads arrive one per append");
}

/// The tables hold no byte of an envelope outside the envelope column, and
/// the schema has no place for a path; notifications carry only a store id
/// and a head.
#[tokio::test]
async fn canaries_stay_inside_envelopes() {
    const CANARY: &[u8] = b"persist-zero-knowledge-canary/plaintext/path/Q7XK";
    let Some((relay, _cleanup)) = fresh_named("zero_knowledge").await else {
        return;
    };
    let url = url().unwrap();
    let schema = relay.schema().to_owned();

    // Listen as the relays do, to read the notifications' payloads.
    let (listener, mut connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let (sender, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = sender.send(n.payload().to_owned());
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN persist_{schema}"))
        .await
        .unwrap();

    relay
        .open_store(&store(1), &fingerprint(1), true)
        .await
        .unwrap();
    let canary_envelope = |n: u8| {
        let mut envelope = vec![n; 40];
        envelope.extend_from_slice(CANARY);
        envelope.extend_from_slice(&[n; 24]);
        envelope
    };
    let entries: Vec<Incoming> = (0..8)
        .map(|n| incoming(locator(n), precedence(1, 1, 1), &canary_envelope(n)))
        .collect();
    relay.append(&store(1), entries).await.unwrap();
    relay
        .append(
            &store(1),
            vec![incoming(
                locator(0),
                precedence(2, 1, 1),
                &canary_envelope(99),
            )],
        )
        .await
        .unwrap();
    relay
        .mailbox_put(
            &store(1),
            &persist_core::DeviceId([3; 16]),
            b"opaque wrap".to_vec(),
        )
        .await
        .unwrap();

    let admin = admin(&url).await;
    let columns = admin
        .query(
            "SELECT table_name::text, column_name::text, data_type::text \
             FROM information_schema.columns WHERE table_schema = $1 \
             ORDER BY table_name, ordinal_position",
            &[&schema],
        )
        .await
        .unwrap();
    assert!(columns.len() > 10, "the scan sees the relay's tables");
    let canary_text = String::from_utf8(CANARY.to_vec()).unwrap();
    let canary_hex: String = CANARY.iter().map(|b| format!("{b:02x}")).collect();
    let mut found_in_envelopes = 0;
    for column in &columns {
        let (table, name, data_type): (String, String, String) =
            (column.get(0), column.get(1), column.get(2));
        for word in ["path", "plain", "secret", "key", "token"] {
            assert!(
                !name.contains(word),
                "{table}.{name}: the relay has no column for a {word}"
            );
        }
        assert!(
            matches!(
                data_type.as_str(),
                "bytea" | "bigint" | "integer" | "timestamp with time zone"
            ) || (table.as_str(), name.as_str()) == ("relay_migrations", "name"),
            "{table}.{name} is {data_type}: no free-form text in relay tables"
        );
        let hits: i64 = if data_type == "bytea" {
            admin
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {schema}.{table} WHERE position($1::bytea IN {name}) > 0"
                    ),
                    &[&CANARY],
                )
                .await
                .unwrap()
                .get(0)
        } else {
            admin
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {schema}.{table} \
                         WHERE position($1 IN {name}::text) > 0 OR position($2 IN {name}::text) > 0"
                    ),
                    &[&canary_text, &canary_hex],
                )
                .await
                .unwrap()
                .get(0)
        };
        if (table.as_str(), name.as_str()) == ("relay_log", "envelope") {
            found_in_envelopes = hits;
        } else {
            assert_eq!(hits, 0, "the canary is in {table}.{name}");
        }
    }
    assert_eq!(
        found_in_envelopes, 8,
        "the scan finds the canary where it is"
    );

    let store_hex: String = store(1).0.iter().map(|b| format!("{b:02x}")).collect();
    for head in ["8", "9"] {
        let payload = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
            .await
            .expect("a notification per append")
            .unwrap();
        assert_eq!(
            payload,
            format!("{store_hex}:{head}"),
            "store id and head only"
        );
    }
}

/// The database goes away (logins refused, every connection killed): the
/// relay answers `Unavailable`, never panics, and recovers by itself when
/// the database returns, LISTEN included; no acknowledged append is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_is_unavailable_then_recovers() {
    let Some(url) = url() else { return };
    let name = unique_name("unavailable");
    let admin = admin(&url).await;
    let database: String = admin
        .query_one("SELECT quote_ident(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    // The relay logs in as a role of its own, which the test can lock out:
    // a cheap stand-in for a database that is down.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {name} LOGIN; GRANT CREATE ON DATABASE {database} TO {name};"
        ))
        .await
        .unwrap();
    let _cleanup = Cleanup {
        url: url.clone(),
        schema: name.clone(),
        role: Some(name.clone()),
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    let relay_url = format!("{url}{separator}user={name}");
    let one = PostgresRelay::connect(&relay_url, Some(&name))
        .await
        .unwrap();
    let two = PostgresRelay::connect(&url, Some(&name)).await.unwrap();
    one.open_store(&store(1), &fingerprint(1), true)
        .await
        .unwrap();
    let batch = |n: u8| vec![incoming(locator(n), precedence(1, 1, 1), &[n; 100])];
    assert_eq!(one.append(&store(1), batch(1)).await.unwrap().head, 1);

    admin
        .batch_execute(&format!(
            "ALTER ROLE {name} NOLOGIN; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';"
        ))
        .await
        .unwrap();
    let mut refused = 0;
    for n in 2..40u8 {
        match one.append(&store(1), batch(n)).await {
            Err(RelayError::Unavailable(text)) => {
                assert!(text.contains("PostgreSQL"), "{text}");
                assert!(RelayError::Unavailable(text).code().is_retryable());
                refused += 1;
                break;
            }
            Err(other) => panic!("expected Unavailable, got {other:?}"),
            // A connection not yet seen closed may serve one more call.
            Ok(_) => continue,
        }
    }
    assert_eq!(refused, 1, "appends fail while the database is gone");
    assert!(
        matches!(one.stats().await, Err(RelayError::Unavailable(_))),
        "so does stats, which /healthz reads"
    );
    assert!(matches!(
        one.open_store(&store(1), &fingerprint(1), false).await,
        Err(RelayError::Unavailable(_))
    ));
    tokio::time::timeout(Duration::from_secs(10), async {
        while one.is_listening() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the LISTEN connection notices it was cut");
    let acknowledged = two.head(&store(1)).await.unwrap();

    admin
        .batch_execute(&format!("ALTER ROLE {name} LOGIN"))
        .await
        .unwrap();
    let appended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match one.append(&store(1), batch(200)).await {
                Ok(appended) => break appended,
                Err(RelayError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("the pool reconnects once the database is back");
    assert_eq!(
        appended,
        Appended {
            accepted: 1,
            stale: 0,
            head: acknowledged + 1
        },
        "the sequence continues from what was acknowledged"
    );
    let log = conformance::pull_all(&one, 1).await;
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=acknowledged + 1).collect::<Vec<_>>(),
        "nothing lost"
    );

    tokio::time::timeout(Duration::from_secs(15), async {
        while !one.is_listening() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the LISTEN connection comes back by itself");
    let mut watcher = one.watch(&store(1));
    two.append(&store(1), batch(201)).await.unwrap();
    wait_for_head(&mut watcher, acknowledged + 2).await;
    drop((one, two));
}

/// Schemas never meet: the same store id in two schemas is two stores.
#[tokio::test]
async fn schemas_are_isolated() {
    let Some((a, _cleanup_a)) = fresh_named("isolated_a").await else {
        return;
    };
    let (b, _cleanup_b) = fresh_named("isolated_b").await.unwrap();
    a.open_store(&store(1), &fingerprint(1), true)
        .await
        .unwrap();
    a.append(
        &store(1),
        vec![incoming(locator(1), precedence(1, 1, 1), b"x")],
    )
    .await
    .unwrap();
    assert_eq!(b.head(&store(1)).await, Err(RelayError::UnknownStore));
    let access = b
        .open_store(&store(1), &fingerprint(2), true)
        .await
        .unwrap();
    assert!(access.created && access.head == 0);
    let counts: BTreeMap<&str, u64> = [
        ("a", a.stats().await.unwrap().entries),
        ("b", b.stats().await.unwrap().entries),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts, BTreeMap::from([("a", 1), ("b", 0)]));
}
