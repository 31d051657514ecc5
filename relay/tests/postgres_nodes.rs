//! Several `persist-relay` processes over one PostgreSQL database, with
//! real devices (the `persist` engine):
//!
//! - two nodes that share a schema and a TLS identity serve one store to
//!   a device on each; writes on both converge, and a write accepted by
//!   one node reaches the other node's device live, through LISTEN/NOTIFY;
//! - a node SIGKILLed while a device pushes thousands of records: the
//!   device fails over to the other address of its remote by itself, and
//!   the store ends with every record once — on the other device and in
//!   the relay's log;
//! - zero knowledge: no table of the schema, no line of the database's
//!   log (statement logging switched on for the relay's role) and no line
//!   of either node's output carries a canary path or value or a byte of
//!   the store's keys, in any common encoding.
//!
//! Needs a PostgreSQL server: set `PERSIST_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`; `.ci/run` sets it). Without it
//! every test prints `skipped: PERSIST_TEST_POSTGRES_URL is not set` and
//! passes. Each test works in a schema of its own and drops it at the end.
//!
//! Run: `cargo nextest run -p persist-relay --test postgres_nodes`.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// allow-nondeterminism: real processes on a real clock; the test bounds its
// waits and reports how long the failover took.
#![allow(clippy::disallowed_methods)]

mod common;

use common::devices::{converge, converge_bytes, pair, pull_until_applied};
use common::scan::{Corpus, needles, poll};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use persist::{Change, Remote, Store};
use persist_core::export::ExportedKeys;
use persist_core::keys::IndexKey;
use persist_core::protocol::AccessKey;
use persist_transport::tls::{CERT_FILE, KEY_FILE};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use tokio_postgres::{AsyncMessage, NoTls};

const BIN: &str = env!("CARGO_BIN_EXE_persist-relay");
/// Where the test server is, from the environment.
const URL_VAR: &str = "PERSIST_TEST_POSTGRES_URL";
/// How long a test waits for something sync does in the background, or
/// for a relay process to start or stop.
const SETTLE: Duration = Duration::from_secs(20);
/// How long a write accepted by one node may take to reach a device
/// connected to the other: a NOTIFY, a `Notify`, a pull.
const LIVE: Duration = Duration::from_secs(10);
/// How long a device may take to push again after the node it pushes to
/// is SIGKILLed. That node sends nothing, so the device notices only when
/// the connection idles out: 30 s after the first packet it sends once the
/// node went quiet, which, if it was only waiting for an answer, is the
/// next keep-alive, up to 10 s later. It then tries the dead address again
/// (10 s connect timeout) before the next one. About 50 s; plus slack.
const FAILOVER: Duration = Duration::from_secs(70);
/// Records device A writes in the failover test, and per local commit.
const BULK_RECORDS: usize = 5000;
const BULK_BATCH: usize = 250;
/// Node 1 dies once it has acknowledged this many of A's records: well
/// into the push, far from its end.
const KILL_AFTER_PUSHED: u64 = 500;

/// Two nodes over one schema with one certificate: device A on node 1,
/// device B on node 2. Writes on both converge to the same full state, and
/// each device's `watch` hears the other's write without syncing by hand,
/// which only the database's NOTIFY can have carried across.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_nodes_converge_and_hear_each_other_live() {
    let Some(url) = url() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = TestDb::new(&url, "converge");
    let (node1, node2) = Node::pair(tmp.path(), &db.relay_url, &db.schema, "debug");
    let (a, b) = pair(tmp.path(), &node1.remote(), &node2.remote()).await;

    for i in 0..6 {
        a.put(&format!("a/{i}"), &format!("a wrote {i}"))
            .await
            .unwrap();
        b.put(&format!("b/{i}"), &format!("b wrote {i}"))
            .await
            .unwrap();
    }
    a.delete("a/1").await.unwrap();
    b.delete("b/2").await.unwrap();
    converge(&a, &b).await;
    a.delete("b/3").await.unwrap();
    b.put("a/5", "b rewrote a's record").await.unwrap();
    converge(&a, &b).await;

    // Live, both ways: each device watches, the other writes, and no one
    // calls sync_now. The test listens on the relays' channel too, to see
    // what crossed between the nodes: a store id and a head, nothing else.
    let (_listening, mut notifications) = db.listen().await;
    let store_hex = a.info().store_id.to_string();
    for (writer, watcher, path) in [(&a, &b, "live/from-a"), (&b, &a, "live/from-b")] {
        let mut changes = std::pin::pin!(watcher.watch("live/"));
        let value = format!("{path}, live");
        let started = Instant::now();
        writer.put(path, &value).await.unwrap();
        let change = tokio::time::timeout(LIVE, changes.next())
            .await
            .unwrap_or_else(|_| panic!("{path} reached the other node's device within {LIVE:?}"))
            .expect("the change stream is open")
            .expect("no change was missed");
        assert!(
            matches!(&change, Change::Put { path: p, .. } if p == path),
            "{change:?}"
        );
        assert_eq!(change.value::<String>().unwrap(), Some(value));
        println!("{path}: on the other device after {:?}", started.elapsed());
        let payload = tokio::time::timeout(LIVE, notifications.recv())
            .await
            .expect("a NOTIFY for the append")
            .expect("the listening connection is up");
        let (store, head) = payload.split_once(':').expect("store:head");
        assert_eq!(store, store_hex, "{payload}");
        assert!(head.parse::<u64>().is_ok(), "{payload}");
        // The append of the write itself is the one that matters here.
        while notifications.try_recv().is_ok() {}
    }

    let mut expected: BTreeMap<String, String> = (0..6)
        .flat_map(|i| {
            [
                (format!("a/{i}"), format!("a wrote {i}")),
                (format!("b/{i}"), format!("b wrote {i}")),
            ]
        })
        .collect();
    for gone in ["a/1", "b/2", "b/3"] {
        expected.remove(gone);
    }
    expected.insert("a/5".into(), "b rewrote a's record".into());
    expected.insert("live/from-a".into(), "live/from-a, live".into());
    expected.insert("live/from-b".into(), "live/from-b, live".into());
    assert_eq!(converge(&a, &b).await, expected);
    for store in [&a, &b] {
        assert_eq!(store.sync_status().unwrap().refused, 0);
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
    for mut node in [node1, node2] {
        node.stop();
        node.assert_quiet();
    }
}

/// Device A's remote is node 1 or node 2. Node 1 is SIGKILLed while A
/// pushes 5000 records, with one of A's pushes inside its append
/// transaction; A reconnects to node 2 by itself, and device B (on node 2)
/// ends with exactly A's records. In the database: one log row per
/// locator, unique seqs, and a head equal to the row count, so no record
/// was appended twice when A re-sent what node 1 never acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_fails_over_when_its_node_dies_mid_push() {
    let Some(url) = url() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = TestDb::new(&url, "failover");
    let (mut node1, mut node2) = Node::pair(tmp.path(), &db.relay_url, &db.schema, "info");
    let both = Remote::pinned(&node1.url(), &node1.pin)
        .unwrap()
        .or(&node2.url())
        .unwrap();
    let (a, b) = pair(tmp.path(), &both, &node2.remote()).await;
    converge(&a, &b).await;

    let expected: BTreeMap<String, String> = (0..BULK_RECORDS)
        .map(|i| {
            (
                format!("bulk/{i:05}"),
                format!("value {i} of {BULK_RECORDS}"),
            )
        })
        .collect();
    let writer = {
        let a = a.clone();
        let records: Vec<(String, String)> = expected.clone().into_iter().collect();
        tokio::spawn(async move {
            for chunk in records.chunks(BULK_BATCH) {
                let mut batch = a.batch();
                for (path, value) in chunk {
                    batch.put(path, value);
                }
                batch.commit().await.unwrap();
            }
        })
    };
    let deadline = Instant::now() + SETTLE;
    while a.sync_status().unwrap().pushed < KILL_AFTER_PUSHED {
        assert!(Instant::now() < deadline, "a pushes: {:?}", a.sync_status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Node 1 has acknowledged part of the push. The test now takes the
    // store's row lock, so that node 1's next append of A's records waits
    // inside its transaction, and kills node 1 there: A's envelopes die
    // uncommitted with it, and A never hears back.
    let schema = &db.schema;
    let store_id = a.info().store_id.0.to_vec();
    let blocker = db.admin().await;
    blocker.batch_execute("BEGIN").await.unwrap();
    blocker
        .execute(
            &format!("SELECT 1 FROM {schema}.relay_stores WHERE store_id = $1 FOR UPDATE"),
            &[&store_id],
        )
        .await
        .unwrap();
    // A backend of the relays that waits for the test's transaction.
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'persist-relay {schema}' \
             AND pg_backend_pid() = ANY(pg_blocking_pids(pid))"
    );
    while blocker
        .query_one(&waiting, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "an append of a's push waits for the lock: {:?}",
            a.sync_status()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pushed_at_kill = a.sync_status().unwrap().pushed;
    node1.kill();
    let killed = Instant::now();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        pushed_at_kill < BULK_RECORDS as u64,
        "node 1 died mid-push ({pushed_at_kill} records acknowledged)"
    );
    println!(
        "node 1 killed inside an append, {pushed_at_kill} records acknowledged, {} rows in the log",
        db.log_rows(&a).await
    );
    writer.await.unwrap();
    println!(
        "a wrote its records locally {:?} after the kill",
        killed.elapsed()
    );

    // A pushes the rest to node 2 on its own: no sync_now until it did.
    let deadline = killed + FAILOVER;
    let (mut lost, mut back) = (None, None);
    loop {
        let status = a.sync_status().unwrap();
        if !status.connected && lost.is_none() {
            lost = Some(killed.elapsed());
        }
        if status.connected && lost.is_some() && back.is_none() {
            back = Some(killed.elapsed());
        }
        if status.synced && back.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a did not fail over to node 2 within {FAILOVER:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "after the kill: a noticed at {lost:?}, was connected to node 2 at {back:?}, had pushed \
         everything at {:?}",
        killed.elapsed()
    );

    let state = converge(&a, &b).await;
    let bulk: BTreeMap<String, String> = state
        .into_iter()
        .filter(|(path, _)| path.starts_with("bulk/"))
        .collect();
    assert_eq!(bulk.len(), BULK_RECORDS, "every record, once");
    assert!(bulk == expected, "every record with its value");
    for store in [&a, &b] {
        assert_eq!(store.sync_status().unwrap().refused, 0);
    }

    // The relay's log: A's 5000 locators each exactly once, among the
    // store's few system records; seqs unique; and the head, which counts
    // every accepted append, equal to the rows, so nothing was appended
    // twice (a re-sent envelope node 1 had already stored came back stale).
    let raw = a.crypto().dangerous().export_raw().await.unwrap();
    let keys = ExportedKeys::unwrap(&raw, "").unwrap();
    let index = IndexKey::new(keys.index_key.duplicate());
    let wanted: BTreeSet<Vec<u8>> = expected
        .keys()
        .map(|path| index.locator(&keys.store_id, path).0.to_vec())
        .collect();
    let admin = db.admin().await;
    let rows = admin
        .query(
            &format!("SELECT locator, seq FROM {schema}.relay_log WHERE store_id = $1"),
            &[&store_id],
        )
        .await
        .unwrap();
    let locators: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
    let seqs: BTreeSet<i64> = rows.iter().map(|r| r.get(1)).collect();
    let distinct: BTreeSet<Vec<u8>> = locators.iter().cloned().collect();
    assert_eq!(distinct.len(), locators.len(), "one row per locator");
    assert_eq!(seqs.len(), locators.len(), "unique seqs");
    assert!(wanted.is_subset(&distinct), "every record of A in the log");
    let others = locators.len() - wanted.len();
    assert!(others < 10, "{others} rows besides A's records");
    println!(
        "the log: {} rows, {others} of them not A's records",
        locators.len()
    );
    let head: i64 = admin
        .query_one(
            &format!("SELECT head FROM {schema}.relay_stores WHERE store_id = $1"),
            &[&store_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        head,
        i64::try_from(locators.len()).unwrap(),
        "every accepted append took a new locator: none was appended twice"
    );
    assert!(
        seqs.iter().copied().eq(1..=head),
        "the rows' seqs are 1..=head: no append lost or taken twice"
    );

    a.close().await.unwrap();
    b.close().await.unwrap();
    node2.stop();
    node2.assert_quiet();
}

/// After the two-node scenario with canaries in paths and values, written
/// on both devices, deleted, resealed under a new epoch: no table of the
/// schema, no line the database logged for the relays' role (every
/// statement with its parameters) and no line of either node's output
/// holds a canary or a key byte. Positive controls: the same scans find
/// the canary's locator and the credential's fingerprint where they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_table_and_no_database_log_holds_a_canary_or_a_key() {
    let Some(url) = url() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut db = TestDb::new(&url, "zero_knowledge");
    let logged = db.log_every_statement().await;
    if let Err(why) = &logged {
        println!("statement logging not switched on ({why}): the log scan sees errors only");
    }
    let log_marks = database_logs(&db.admin().await).await;
    let (mut node1, mut node2) = Node::pair(tmp.path(), &db.relay_url, &db.schema, "trace");
    let (a, b) = pair(tmp.path(), &node1.remote(), &node2.remote()).await;

    // A canary random per run (the temp dir's name is), in paths and
    // values, on both devices, through both nodes.
    let canary: [u8; 32] = Sha256::digest(tmp.path().as_os_str().as_encoded_bytes()).into();
    let hex = hex::encode(canary);
    for i in 0..4 {
        a.put(
            &format!("canary/{hex}/{i}"),
            &ByteBuf::from(canary.to_vec()),
        )
        .await
        .unwrap();
        let note = format!("the canary is {hex}");
        a.put(&format!("notes/{i}"), &ByteBuf::from(note.into_bytes()))
            .await
            .unwrap();
    }
    a.delete(&format!("canary/{hex}/0")).await.unwrap();
    b.put(&format!("from-b/{hex}"), &ByteBuf::from(canary.to_vec()))
        .await
        .unwrap();
    converge_bytes(&a, &b).await;
    // A's reseals under a new epoch reach node 1; B pulls them from node 2,
    // and the key courier brings it the new epoch key in a sealed parcel
    // (through the nodes' mailboxes), so B ends with nothing held. The
    // scans below then cover the parcel.
    let pulled_before = b.sync_status().unwrap().pulled;
    a.crypto().rotate_key().await.unwrap().wait().await.unwrap();
    push_all(&a).await;
    pull_until_applied(&b, pulled_before).await;
    let got: Option<ByteBuf> = b.get(&format!("canary/{hex}/1")).await.unwrap();
    assert_eq!(got.map(ByteBuf::into_vec), Some(canary.to_vec()));
    let got: Option<ByteBuf> = a.get(&format!("from-b/{hex}")).await.unwrap();
    assert_eq!(got.map(ByteBuf::into_vec), Some(canary.to_vec()));

    let raw = a.crypto().dangerous().export_raw().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
    node1.stop();
    node2.stop();

    let keys = ExportedKeys::unwrap(&raw, "").unwrap();
    assert!(keys.epochs.len() >= 2, "the rotation added an epoch");
    let access = AccessKey::derive(&keys.relay_token, &keys.store_id);
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("canary".into(), canary.to_vec()),
        ("index key".into(), keys.index_key.expose().to_vec()),
        ("relay token".into(), keys.relay_token.expose().to_vec()),
        // The relay keeps only the credential's fingerprint.
        ("access credential".into(), access.0.to_vec()),
    ];
    for (epoch, entry) in &keys.epochs {
        let key = entry.key.as_ref().expect("an unpurged epoch has its key");
        secrets.push((format!("key of epoch {epoch}"), key.expose().to_vec()));
    }

    let admin = db.admin().await;
    let tables = dump_tables(&admin, &db.schema).await;
    let names: BTreeSet<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
    for table in [
        "relay_stores",
        "relay_log",
        "relay_mailboxes",
        "relay_migrations",
    ] {
        assert!(names.contains(table), "{table} dumped: {names:?}");
    }
    let database_log = read_appended(&log_marks);
    let outputs = Corpus::files_under(&tmp.path().join("nodes"));
    let mut corpora = vec![
        ("the nodes' data and output".to_owned(), &outputs),
        ("the database's log".to_owned(), &database_log),
    ];
    for (table, corpus) in &tables {
        corpora.push((format!("table {table}"), corpus));
    }
    for (name, secret) in &secrets {
        let needles = needles(secret);
        for (place, corpus) in &corpora {
            let found = corpus.hits(&needles);
            assert!(found.is_empty(), "{name} in {place}: {found:?}");
        }
    }
    println!(
        "scanned {} tables ({} bytes), {} bytes of the database's log, {} bytes of node output",
        tables.len(),
        tables.iter().map(|(_, c)| c.bytes).sum::<usize>(),
        database_log.bytes,
        outputs.bytes
    );

    // Positive controls: the scans find what the relay may hold.
    let locator = IndexKey::new(keys.index_key.duplicate())
        .locator(&keys.store_id, &format!("canary/{hex}/1"));
    let raw_only = |bytes: &[u8]| vec![("raw".to_owned(), bytes.to_vec())];
    let hex_only = |bytes: &[u8]| vec![("hex".to_owned(), hex::encode(bytes).into_bytes())];
    let table = |name: &str| &tables.iter().find(|(t, _)| t == name).unwrap().1;
    assert_eq!(
        table("relay_log").hits(&raw_only(&locator.0)),
        ["raw"],
        "the canary's locator in relay_log"
    );
    assert_eq!(
        table("relay_stores").hits(&raw_only(&access.fingerprint())),
        ["raw"],
        "the credential's fingerprint in relay_stores"
    );
    match (&logged, log_marks.is_empty()) {
        (Ok(()), false) => assert_eq!(
            database_log.hits(&hex_only(&locator.0)),
            ["hex"],
            "the relays' statements, with the canary's locator as a bound parameter, are in \
             the database's log"
        ),
        (_, true) => println!("the database's log is not readable here: tables scanned only"),
        (Err(_), false) => {}
    }
}

// ---------------------------------------------------------------------------
// The database

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

/// The test's own schema (and, for the log scan, its own role), dropped
/// when the test ends, passed or failed.
struct TestDb {
    url: String,
    /// What the relays connect with: `url`, or `url` as the test's role.
    relay_url: String,
    schema: String,
    role: Option<String>,
}

impl TestDb {
    fn new(url: &str, test: &str) -> TestDb {
        TestDb {
            url: url.to_owned(),
            relay_url: url.to_owned(),
            schema: unique_name(test),
            role: None,
        }
    }

    /// An ordinary connection to the server, its driver spawned.
    async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// Makes the relays log in as a role of this test's own whose every
    /// statement the server logs with its parameters in full (a setting of
    /// that role only, gone when the role is dropped). `Err` says why not.
    async fn log_every_statement(&mut self) -> Result<(), String> {
        let role = self.schema.clone();
        let admin = self.admin().await;
        let database: String = admin
            .query_one("SELECT quote_ident(current_database())", &[])
            .await
            .unwrap()
            .get(0);
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {database} TO {role};"
            ))
            .await
            .map_err(|e| format!("cannot create a role: {e}"))?;
        self.role = Some(role.clone());
        let separator = if self.url.contains('?') { '&' } else { '?' };
        self.relay_url = format!("{}{separator}user={role}", self.url);
        // Superuser-only settings: the test's user may not be one.
        admin
            .batch_execute(&format!(
                "ALTER ROLE {role} SET log_statement = 'all'; \
                 ALTER ROLE {role} SET log_parameter_max_length = -1;"
            ))
            .await
            .map_err(|e| format!("cannot set log_statement for the role: {e}"))
    }

    /// Notification payloads on the relays' channel (`persist_<schema>`),
    /// as long as the client returned with them lives.
    async fn listen(
        &self,
    ) -> (
        tokio_postgres::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let (client, mut connection) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = sender.send(n.payload().to_owned());
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN persist_{}", self.schema))
            .await
            .unwrap();
        (client, receiver)
    }

    /// Rows `store`'s log holds now.
    async fn log_rows(&self, store: &Store) -> i64 {
        let store_id = store.info().store_id.0.to_vec();
        self.admin()
            .await
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}.relay_log WHERE store_id = $1",
                    self.schema
                ),
                &[&store_id],
            )
            .await
            .unwrap()
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await: the cleanup runs on a thread of its own with
        // its own runtime. A relay still connected (a failed test) is cut
        // off first, and no lock is waited for long.
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
                    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
                    tokio::spawn(connection);
                    if let Err(err) = client.batch_execute(&sql).await {
                        eprintln!("cleanup failed ({sql}): {err}");
                    }
                });
            });
        });
    }
}

/// A name for a test's schema and role: `pn_<test>_<pid>_<n>`, at most 48
/// bytes (the relay's limit), unique among concurrent test processes.
fn unique_name(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("_{}_{n}", std::process::id());
    let room = 48 - "pn_".len() - suffix.len();
    let test: String = test.chars().take(room).collect();
    format!("pn_{test}{suffix}")
}

/// Every table of `schema`, each dumped twice into one corpus: `COPY` in
/// text format (bytea as hex) and in binary format (bytea raw).
async fn dump_tables(admin: &tokio_postgres::Client, schema: &str) -> Vec<(String, Corpus)> {
    let tables = admin
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename",
            &[&schema],
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    for row in tables {
        let table: String = row.get(0);
        let mut corpus = Corpus::default();
        for format in ["", " (FORMAT binary)"] {
            let copy = admin
                .copy_out(&format!("COPY {schema}.{table} TO STDOUT{format}"))
                .await
                .unwrap();
            let mut copy = std::pin::pin!(copy);
            let mut bytes = Vec::new();
            while let Some(chunk) = copy.next().await {
                bytes.extend_from_slice(&chunk.unwrap());
            }
            corpus.add(&bytes);
        }
        out.push((table, corpus));
    }
    out
}

/// The server's log files this process can read, each with its length
/// now, so that the scan reads only what the test adds: the logging
/// collector's current file if it runs, and otherwise where Debian's
/// `pg_ctlcluster` sends the server's stderr.
async fn database_logs(admin: &tokio_postgres::Client) -> Vec<(PathBuf, u64)> {
    let mut candidates = Vec::new();
    if let Ok(row) = admin
        .query_one(
            "SELECT pg_current_logfile(), current_setting('data_directory')",
            &[],
        )
        .await
        && let Some(file) = row.get::<_, Option<String>>(0)
    {
        let data: String = row.get(1);
        candidates.push(Path::new(&data).join(file));
    }
    if let Ok(dir) = std::fs::read_dir("/var/log/postgresql") {
        candidates.extend(
            dir.filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|e| e == "log")),
        );
    }
    candidates
        .into_iter()
        .filter_map(|path| {
            let len = File::open(&path).ok()?.metadata().ok()?.len();
            Some((path, len))
        })
        .collect()
}

/// What each log file gained since its mark (all of it if it shrank: it
/// was rotated).
fn read_appended(marks: &[(PathBuf, u64)]) -> Corpus {
    let mut corpus = Corpus::default();
    for (path, mark) in marks {
        let mut file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        file.seek(SeekFrom::Start(if len < *mark { 0 } else { *mark }))
            .unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        corpus.add(&bytes);
    }
    corpus
}

// ---------------------------------------------------------------------------
// Relay nodes and devices

/// One `persist-relay --postgres` process, its stdout and stderr in files
/// beside its data directory.
struct Node {
    child: Option<Child>,
    addr: SocketAddr,
    pin: String,
    stderr: PathBuf,
}

impl Node {
    /// Node 1, then node 2 with node 1's TLS identity (so the same pin),
    /// both on `schema` of the database at `postgres`.
    fn pair(tmp: &Path, postgres: &str, schema: &str, log: &str) -> (Node, Node) {
        let dir = tmp.join("nodes");
        let node1 = Node::start(&dir.join("1"), postgres, schema, log);
        std::fs::create_dir_all(dir.join("2/data")).unwrap();
        for file in [CERT_FILE, KEY_FILE] {
            std::fs::copy(dir.join("1/data").join(file), dir.join("2/data").join(file)).unwrap();
        }
        let node2 = Node::start(&dir.join("2"), postgres, schema, log);
        assert_eq!(node1.pin, node2.pin, "one certificate, one pin");
        assert_ne!(node1.addr, node2.addr);
        (node1, node2)
    }

    /// Starts the binary on a free port and waits for its start line.
    fn start(dir: &Path, postgres: &str, schema: &str, log: &str) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let stdout_path = dir.join("stdout.log");
        let stderr = dir.join("stderr.log");
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(dir.join("data"))
            .args(["--postgres", postgres, "--postgres-schema", schema])
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawns persist-relay");
        let line = poll(SETTLE, || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "persist-relay exited with {status} before serving:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            let out = std::fs::read_to_string(&stdout_path).unwrap();
            out.ends_with('\n').then_some(out)
        })
        .expect("persist-relay prints its start line");
        let rest = line
            .trim_end()
            .strip_prefix("persist-relay listening on ")
            .unwrap_or_else(|| panic!("unexpected start line {line:?}"));
        let (addr, pin) = rest.split_once(" pin ").expect("a pin");
        Node {
            child: Some(child),
            addr: addr.parse().expect("an address"),
            pin: pin.to_owned(),
            stderr,
        }
    }

    fn url(&self) -> String {
        format!("quic://{}", self.addr)
    }

    fn remote(&self) -> Remote {
        Remote::pinned(&self.url(), &self.pin).expect("a remote")
    }

    /// SIGKILL: no shutdown, no goodbye to anyone, a transaction cut off.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// SIGTERM, and a clean exit.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM");
        let status = poll(SETTLE, || child.try_wait().unwrap()).expect("exits after SIGTERM");
        assert_eq!(status.code(), Some(0), "a clean stop");
    }

    /// No relay log line at WARN or above: nothing went wrong on its side.
    fn assert_quiet(&self) {
        let text = std::fs::read_to_string(&self.stderr).unwrap();
        let loud: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" persist_relay") || l.contains(" persist_storage"))
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        assert!(loud.is_empty(), "the relay complained: {loud:#?}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A failed test must not leave a relay behind.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Syncs `a` until it has pushed everything.
async fn push_all(a: &Store) {
    for _ in 0..SETTLE.as_millis() / 50 {
        let _ = a.sync_now().await;
        if a.sync_status().unwrap().synced {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("a did not push: {:?}", a.sync_status());
}
