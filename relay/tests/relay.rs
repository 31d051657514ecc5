//! The relay node over real QUIC on loopback, on both backends.

mod common;

use std::time::Duration;

use common::{Client, Writer, expect_error, hello, start_relay};
use persist_core::protocol::{AccessKey, ErrorCode, FRAME_BYTES_MAX, Hello, Message, PushEntry};
use persist_core::{DeviceId, Locator, StoreId};
use persist_relay::{Admission, AdmissionSecret};
use persist_storage::relay::{MemoryRelay, RedbRelay, RelayBackend};
use tokio::io::AsyncWriteExt;

/// Runs a test body on a MemoryRelay, on a RedbRelay and, when
/// `PERSIST_TEST_POSTGRES_URL` is set, on a PostgresRelay in a schema of
/// its own (dropped afterwards).
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(persist_storage::relay::MemoryRelay::new()).await;
                }
            )*
        }
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let backend = persist_storage::relay::RedbRelay::open(&dir.path().join("relay.redb"))
                        .expect("opens");
                    super::$name(backend).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Ok(url) = std::env::var("PERSIST_TEST_POSTGRES_URL") else {
                        eprintln!("skipped: PERSIST_TEST_POSTGRES_URL is not set");
                        return;
                    };
                    let schema = super::schema_for(stringify!($name));
                    let backend =
                        persist_storage::relay::PostgresRelay::connect(&url, Some(&schema))
                            .await
                            .expect("connects to PostgreSQL");
                    super::$name(backend).await;
                    super::drop_schema(&url, &schema);
                }
            )*
        }
    };
}

/// A schema name for one test in this process: short, and distinct from
/// every other test's and run's.
fn schema_for(test: &str) -> String {
    // FNV-1a: a stable short tag for the test name.
    let tag = test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("relay_t_{tag:016x}_{}", std::process::id())
}

/// Drops a test's schema with psql (the relay that used it has stopped).
fn drop_schema(url: &str, schema: &str) {
    let status = std::process::Command::new("psql")
        .args([
            url,
            "-qAtc",
            &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        ])
        .status()
        .expect("psql runs");
    assert!(status.success(), "dropping schema {schema}");
}

on_every_backend!(
    hello_creates_then_welcomes,
    wrong_access_is_unauthorized_and_reveals_nothing,
    admission_secret_gates_creation_only,
    version_mismatch_is_named,
    push_then_pull_pages_in_seq_order,
    stale_push_is_not_stored,
    subscribers_are_notified_of_other_pushes,
    mailbox_put_fetch_ack,
    bad_frames_close_only_their_connection,
    unparsable_envelope_is_bad_envelope,
);

async fn hello_creates_then_welcomes<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let writer = Writer::new(1);

    let mut first = Client::to(&relay).await;
    match first.ask(&writer.hello()).await {
        Message::Welcome(w) => assert_eq!((w.created, w.head), (true, 0)),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let mut second = Client::to(&relay).await;
    match second.ask(&writer.hello()).await {
        Message::Welcome(w) => assert_eq!((w.created, w.head), (false, 0)),
        other => panic!("expected Welcome, got {other:?}"),
    }
    first.close();
    second.close();
    relay.shutdown().await;
}

async fn wrong_access_is_unauthorized_and_reveals_nothing<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let mut writer = Writer::new(2);
    let mut owner = Client::to(&relay).await;
    assert!(matches!(
        owner.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let entry = writer.entry("a", b"1", 1);
    assert!(matches!(
        owner
            .ask(&Message::Push {
                id: 1,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { .. }
    ));

    let mut intruder = Client::to(&relay).await;
    let answer = intruder
        .ask(&hello(writer.store(), AccessKey([0x55; 32]), None))
        .await;
    let text = expect_error(answer, ErrorCode::Unauthorized);
    assert!(!text.contains(&writer.store().to_string()), "{text}");
    assert!(!text.contains("head") && !text.contains('1'), "{text}");
    intruder.expect_end().await;

    // The owner's connection is unaffected.
    assert!(matches!(
        owner
            .ask(&Message::Pull {
                since: 0,
                limit: 10
            })
            .await,
        Message::Batch { .. }
    ));
    relay.shutdown().await;
}

async fn admission_secret_gates_creation_only<B: RelayBackend>(backend: B) {
    let secret = AdmissionSecret::new("open sesame\n").expect("secret");
    let (relay, _dir) = start_relay(backend, Admission::Secret(secret), false).await;
    let writer = Writer::new(3);

    let mut none = Client::to(&relay).await;
    let text = expect_error(
        none.ask(&writer.hello()).await,
        ErrorCode::AdmissionRequired,
    );
    assert!(text.contains("admission secret"), "{text}");
    none.expect_end().await;

    let mut wrong = Client::to(&relay).await;
    expect_error(
        wrong
            .ask(&hello(
                writer.store(),
                writer.access(),
                Some("open says me"),
            ))
            .await,
        ErrorCode::AdmissionRequired,
    );
    wrong.expect_end().await;

    let mut right = Client::to(&relay).await;
    match right
        .ask(&hello(writer.store(), writer.access(), Some("open sesame")))
        .await
    {
        Message::Welcome(w) => assert!(w.created),
        other => panic!("expected Welcome, got {other:?}"),
    }
    // A member of an existing store needs no secret.
    let mut member = Client::to(&relay).await;
    match member.ask(&writer.hello()).await {
        Message::Welcome(w) => assert!(!w.created),
        other => panic!("expected Welcome, got {other:?}"),
    }
    relay.shutdown().await;
}

async fn version_mismatch_is_named<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let writer = Writer::new(4);
    let mut client = Client::to(&relay).await;
    let future = Message::Hello(Hello {
        version: 2,
        store: writer.store(),
        access: writer.access(),
        device: DeviceId([1; 16]),
        admission: None,
    });
    let text = expect_error(client.ask(&future).await, ErrorCode::VersionMismatch);
    assert!(
        text.contains("version 1") && text.contains("version 2"),
        "{text}"
    );
    assert!(text.contains("upgrade"), "{text}");
    client.expect_end().await;

    let mut rude = Client::to(&relay).await;
    expect_error(rude.ask(&Message::Subscribe).await, ErrorCode::Protocol);
    rude.expect_end().await;
    relay.shutdown().await;
}

async fn push_then_pull_pages_in_seq_order<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let mut writer = Writer::new(5);
    let mut client = Client::to(&relay).await;
    assert!(matches!(
        client.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));

    let entries: Vec<PushEntry> = (0..7)
        .map(|i| {
            writer.entry(
                &format!("notes/{i}"),
                format!("value {i}").as_bytes(),
                10 + i,
            )
        })
        .collect();
    match client
        .ask(&Message::Push {
            id: 9,
            entries: entries.clone(),
        })
        .await
    {
        Message::PushAck {
            id,
            accepted,
            stale,
            head,
        } => {
            assert_eq!((id, accepted, stale, head), (9, 7, 0, 7));
        }
        other => panic!("expected PushAck, got {other:?}"),
    }

    let mut since = 0;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let Message::Batch {
            entries: page,
            cursor,
            more,
        } = client.ask(&Message::Pull { since, limit: 3 }).await
        else {
            panic!("expected Batch");
        };
        pages += 1;
        assert!(page.len() <= 3);
        for entry in &page {
            assert!(entry.seq > since, "seq order");
            since = entry.seq;
        }
        assert_eq!(cursor, since);
        seen.extend(page);
        if !more {
            break;
        }
    }
    assert_eq!(pages, 3, "7 entries in pages of 3");
    assert_eq!(seen.len(), 7);
    for (entry, pushed) in seen.iter().zip(&entries) {
        assert_eq!(entry.locator, pushed.locator);
        assert_eq!(
            entry.envelope, pushed.envelope,
            "the relay returns the bytes pushed"
        );
    }
    // Nothing after the end.
    match client.ask(&Message::Pull { since, limit: 100 }).await {
        Message::Batch {
            entries,
            cursor,
            more,
        } => {
            assert!(entries.is_empty());
            assert_eq!((cursor, more), (since, false));
        }
        other => panic!("expected Batch, got {other:?}"),
    }
    relay.shutdown().await;
}

async fn stale_push_is_not_stored<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let mut writer = Writer::new(6);
    let mut client = Client::to(&relay).await;
    assert!(matches!(
        client.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));

    let newer = writer.entry("doc", b"newer", 200);
    let older = writer.entry("doc", b"older", 100);
    assert!(matches!(
        client
            .ask(&Message::Push {
                id: 1,
                entries: vec![newer.clone()]
            })
            .await,
        Message::PushAck {
            accepted: 1,
            stale: 0,
            head: 1,
            ..
        }
    ));
    match client
        .ask(&Message::Push {
            id: 2,
            entries: vec![older],
        })
        .await
    {
        Message::PushAck {
            accepted,
            stale,
            head,
            ..
        } => {
            assert_eq!((accepted, stale, head), (0, 1, 1));
        }
        other => panic!("expected PushAck, got {other:?}"),
    }
    let Message::Batch { entries, .. } = client
        .ask(&Message::Pull {
            since: 0,
            limit: 10,
        })
        .await
    else {
        panic!("expected Batch");
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].envelope, newer.envelope);
    relay.shutdown().await;
}

async fn subscribers_are_notified_of_other_pushes<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let mut writer = Writer::new(7);
    let mut watcher = Client::to(&relay).await;
    assert!(matches!(
        watcher.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    watcher
        .tx
        .send(&Message::Subscribe)
        .await
        .expect("subscribe");

    let mut pusher = Client::to(&relay).await;
    assert!(matches!(
        pusher.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let entry = writer.entry("x", b"1", 1);
    assert!(matches!(
        pusher
            .ask(&Message::Push {
                id: 1,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { head: 1, .. }
    ));
    assert_eq!(watcher.next().await, Message::Notify { head: 1 });

    // The watcher still answers requests while subscribed.
    assert!(matches!(
        watcher
            .ask(&Message::Pull {
                since: 0,
                limit: 10
            })
            .await,
        Message::Batch { .. }
    ));
    let entry = writer.entry("y", b"2", 2);
    assert!(matches!(
        pusher
            .ask(&Message::Push {
                id: 2,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { head: 2, .. }
    ));
    assert_eq!(watcher.next().await, Message::Notify { head: 2 });

    // A subscriber is not told of its own push (its PushAck says it).
    let entry = writer.entry("z", b"3", 3);
    assert!(matches!(
        watcher
            .ask(&Message::Push {
                id: 3,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { head: 3, .. }
    ));
    let quiet = tokio::time::timeout(Duration::from_millis(200), watcher.rx.recv()).await;
    assert!(quiet.is_err(), "no Notify for its own push: {quiet:?}");
    relay.shutdown().await;
}

async fn mailbox_put_fetch_ack<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let writer = Writer::new(8);
    let mut client = Client::to(&relay).await;
    assert!(matches!(
        client.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let bob = DeviceId([0xb0; 16]);

    let mut seqs = Vec::new();
    for payload in [b"wrap 1".to_vec(), b"wrap 2".to_vec()] {
        match client.ask(&Message::MailboxPut { to: bob, payload }).await {
            Message::MailboxStored { seq } => seqs.push(seq),
            other => panic!("expected MailboxStored, got {other:?}"),
        }
    }
    assert!(seqs[0] < seqs[1]);
    let Message::Mailbox { items } = client
        .ask(&Message::MailboxFetch {
            mailbox: bob,
            since: 0,
        })
        .await
    else {
        panic!("expected Mailbox");
    };
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].payload, b"wrap 1");
    assert_eq!(
        client
            .ask(&Message::MailboxAck {
                mailbox: bob,
                upto: seqs[0]
            })
            .await,
        Message::MailboxAcked
    );
    let Message::Mailbox { items } = client
        .ask(&Message::MailboxFetch {
            mailbox: bob,
            since: 0,
        })
        .await
    else {
        panic!("expected Mailbox");
    };
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].payload, b"wrap 2");
    relay.shutdown().await;
}

async fn bad_frames_close_only_their_connection<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let mut writer = Writer::new(9);
    let mut good = Client::to(&relay).await;
    assert!(matches!(
        good.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));

    // An oversize length prefix, after a proper Hello.
    let mut oversize = Client::to(&relay).await;
    assert!(matches!(
        oversize.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let Client { conn, tx, mut rx } = oversize;
    let mut raw = tx.into_inner();
    raw.write_all(&(FRAME_BYTES_MAX as u32 + 1).to_be_bytes())
        .await
        .expect("write");
    let answer = rx.recv().await.expect("readable").expect("an Error");
    let text = expect_error(answer, ErrorCode::Protocol);
    assert!(text.contains("exceeds"), "{text}");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .is_ok(),
        "the offending connection is closed"
    );

    // Garbage as the payload of a frame of legal size.
    let mut garbage = Client::to(&relay).await;
    assert!(matches!(
        garbage.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let Client { conn, tx, mut rx } = garbage;
    let mut raw = tx.into_inner();
    let mut frame = 10u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0xff; 10]);
    raw.write_all(&frame).await.expect("write");
    let answer = rx.recv().await.expect("readable").expect("an Error");
    expect_error(answer, ErrorCode::Protocol);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .is_ok()
    );

    // A message over a bound (as a raw frame, since senders refuse it).
    let mut bounded = Client::to(&relay).await;
    assert!(matches!(
        bounded.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let over = Message::MailboxPut {
        to: DeviceId([1; 16]),
        payload: vec![0; persist_core::protocol::MAILBOX_ITEM_BYTES_MAX + 1],
    };
    let payload = postcard::to_stdvec(&over).expect("encodes");
    let Client {
        conn: _conn,
        tx,
        mut rx,
    } = bounded;
    let mut raw = tx.into_inner();
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    raw.write_all(&frame).await.expect("write");
    let text = expect_error(
        rx.recv().await.expect("readable").expect("an Error"),
        ErrorCode::Protocol,
    );
    assert!(text.contains("mailbox item bytes"), "{text}");

    // The well-behaved connection keeps working.
    let entry = writer.entry("still", b"here", 5);
    assert!(matches!(
        good.ask(&Message::Push {
            id: 1,
            entries: vec![entry]
        })
        .await,
        Message::PushAck { accepted: 1, .. }
    ));
    let snapshot = relay.metrics().snapshot();
    assert!(
        snapshot.errors.get("protocol").copied().unwrap_or(0) >= 3,
        "{snapshot:?}"
    );
    relay.shutdown().await;
}

async fn unparsable_envelope_is_bad_envelope<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let mut writer = Writer::new(10);
    let mut client = Client::to(&relay).await;
    assert!(matches!(
        client.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let good = writer.entry("ok", b"fine", 1);
    let bad = PushEntry {
        locator: Locator([3; 32]),
        envelope: b"definitely not an envelope".to_vec(),
    };
    let text = expect_error(
        client
            .ask(&Message::Push {
                id: 4,
                entries: vec![good, bad],
            })
            .await,
        ErrorCode::BadEnvelope,
    );
    assert!(text.contains("entry 1 of push 4"), "{text}");
    client.expect_end().await;

    // Nothing of the refused push was stored.
    let mut again = Client::to(&relay).await;
    match again.ask(&writer.hello()).await {
        Message::Welcome(w) => assert_eq!(w.head, 0),
        other => panic!("expected Welcome, got {other:?}"),
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_sessions_and_stops() {
    let (relay, _dir) = start_relay(MemoryRelay::new(), Admission::Open, false).await;
    let writer = Writer::new(11);
    let mut client = Client::to(&relay).await;
    assert!(matches!(
        client.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let addr = relay.addr();
    let pin = relay.pin();
    let stop = tokio::spawn(relay.shutdown());
    expect_error(client.next().await, ErrorCode::ShuttingDown);
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("shutdown finishes in time")
        .expect("joins");
    let refused = tokio::time::timeout(
        Duration::from_secs(15),
        persist_transport::quic::connect(
            addr,
            "persist-relay",
            &persist_transport::Trust::Pin(pin),
        ),
    )
    .await
    .expect("connect gives up in time");
    assert!(refused.is_err(), "no new connections after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_relay_keeps_entries_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.redb");
    let mut writer = Writer::new(12);
    {
        let (relay, _d) = start_relay(
            RedbRelay::open(&path).expect("opens"),
            Admission::Open,
            false,
        )
        .await;
        let mut client = Client::to(&relay).await;
        assert!(matches!(
            client.ask(&writer.hello()).await,
            Message::Welcome(_)
        ));
        let entry = writer.entry("kept", b"1", 1);
        assert!(matches!(
            client
                .ask(&Message::Push {
                    id: 1,
                    entries: vec![entry]
                })
                .await,
            Message::PushAck { accepted: 1, .. }
        ));
        client.close();
        relay.shutdown().await;
    }
    let (relay, _d) = start_relay(
        RedbRelay::open(&path).expect("reopens"),
        Admission::Open,
        false,
    )
    .await;
    let mut client = Client::to(&relay).await;
    match client.ask(&writer.hello()).await {
        Message::Welcome(w) => assert_eq!((w.created, w.head), (false, 1)),
        other => panic!("expected Welcome, got {other:?}"),
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_over_http() {
    let (relay, _dir) = start_relay(MemoryRelay::new(), Admission::Open, true).await;
    let metrics_addr = relay.metrics_addr().expect("metrics endpoint");
    let mut writer = Writer::new(13);
    let mut client = Client::to(&relay).await;
    assert!(matches!(
        client.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let entry = writer.entry("m", b"1", 1);
    assert!(matches!(
        client
            .ask(&Message::Push {
                id: 1,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { .. }
    ));
    let mut intruder = Client::to(&relay).await;
    expect_error(
        intruder
            .ask(&hello(writer.store(), AccessKey([1; 32]), None))
            .await,
        ErrorCode::Unauthorized,
    );

    let (status, body) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let value = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing in\n{body}"))
            .parse()
            .expect("a number")
    };
    assert!(value("persist_relay_envelopes_in_total") >= 1);
    assert!(value("persist_relay_bytes_in_total") > 0);
    assert!(value("persist_relay_connections_total") >= 2);
    assert_eq!(value("persist_relay_stores"), 1);
    assert_eq!(value("persist_relay_log_entries"), 1);
    assert!(
        body.contains("persist_relay_errors_total{code=\"unauthorized\"} 1"),
        "{body}"
    );

    let (status, body) = http_get(metrics_addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = http_get(metrics_addr, "/nope").await;
    assert_eq!(status, 404);
    relay.shutdown().await;
}

/// A minimal HTTP/1.1 GET: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, body.to_owned())
}

#[tokio::test]
async fn sessions_serve_any_backend_over_memory_pipes() {
    // What `persist serve` does: the same session over another transport.
    let backend = MemoryRelay::new();
    let ctx = persist_relay::SessionContext::new(Admission::Never);
    let ((mut tx, mut rx), (server_tx, server_rx)) = persist_transport::memory::pair();
    let server = persist_relay::serve(&backend, &ctx, server_tx, server_rx);
    let client = async {
        tx.send(&hello(StoreId([4; 16]), AccessKey([4; 32]), Some("x")))
            .await
            .expect("send");
        rx.recv().await.expect("recv").expect("answer")
    };
    let (end, answer) = tokio::join!(server, client);
    expect_error(answer, ErrorCode::AdmissionRequired);
    assert_eq!(
        end,
        persist_relay::SessionEnd::Refused(ErrorCode::AdmissionRequired)
    );
}

/// A backend whose storage can be switched off: every operation but
/// `open_store` and `watch` then fails as `Unavailable`.
struct FlakyRelay {
    inner: MemoryRelay,
    down: std::sync::atomic::AtomicBool,
}

impl FlakyRelay {
    fn check(&self) -> Result<(), persist_storage::relay::RelayError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(persist_storage::relay::RelayError::Unavailable(
                "disk unplugged".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl RelayBackend for FlakyRelay {
    async fn open_store(
        &self,
        store: &StoreId,
        access_fingerprint: &[u8; 32],
        may_create: bool,
    ) -> Result<persist_storage::relay::StoreAccess, persist_storage::relay::RelayError> {
        self.inner
            .open_store(store, access_fingerprint, may_create)
            .await
    }
    async fn append(
        &self,
        store: &StoreId,
        entries: Vec<persist_storage::relay::Incoming>,
    ) -> Result<persist_storage::relay::Appended, persist_storage::relay::RelayError> {
        self.check()?;
        self.inner.append(store, entries).await
    }
    async fn pull(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> Result<persist_storage::relay::Page, persist_storage::relay::RelayError> {
        self.check()?;
        self.inner.pull(store, since, limit, bytes_target).await
    }
    async fn head(&self, store: &StoreId) -> Result<u64, persist_storage::relay::RelayError> {
        self.check()?;
        self.inner.head(store).await
    }
    fn watch(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch(store)
    }
    async fn mailbox_put(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        payload: Vec<u8>,
    ) -> Result<u64, persist_storage::relay::RelayError> {
        self.check()?;
        self.inner.mailbox_put(store, mailbox, payload).await
    }
    async fn mailbox_fetch(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<persist_core::protocol::MailboxItem>, persist_storage::relay::RelayError> {
        self.check()?;
        self.inner.mailbox_fetch(store, mailbox, since, limit).await
    }
    async fn mailbox_ack(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        upto: u64,
    ) -> Result<(), persist_storage::relay::RelayError> {
        self.check()?;
        self.inner.mailbox_ack(store, mailbox, upto).await
    }
    async fn stats(
        &self,
    ) -> Result<persist_storage::relay::RelayStats, persist_storage::relay::RelayError> {
        self.check()?;
        self.inner.stats().await
    }
    async fn rekey(
        &self,
        store: &StoreId,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> Result<(), persist_storage::relay::RelayError> {
        self.check()?;
        self.inner.rekey(store, old, new).await
    }
    fn access_changes(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.inner.access_changes(store)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_storage_is_retryable_and_keeps_the_session() {
    let flaky = std::sync::Arc::new(FlakyRelay {
        inner: MemoryRelay::new(),
        down: std::sync::atomic::AtomicBool::new(false),
    });
    // The node owns its backend; the test keeps the switch through an Arc.
    let (relay, _dir) = start_relay(SharedBackend(flaky.clone()), Admission::Open, true).await;
    let metrics_addr = relay.metrics_addr().expect("metrics");
    let mut writer = Writer::new(14);
    let mut client = Client::to(&relay).await;
    assert!(matches!(
        client.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));

    flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let entry = writer.entry("later", b"1", 1);
    let text = expect_error(
        client
            .ask(&Message::Push {
                id: 1,
                entries: vec![entry.clone()],
            })
            .await,
        ErrorCode::Unavailable,
    );
    assert!(text.contains("disk unplugged"), "{text}");
    let (status, body) = http_get(metrics_addr, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("disk unplugged"), "{body}");

    // Same session, storage back: the retry succeeds.
    flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        client
            .ask(&Message::Push {
                id: 1,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { accepted: 1, .. }
    ));
    let (status, _) = http_get(metrics_addr, "/healthz").await;
    assert_eq!(status, 200);
    relay.shutdown().await;
}

/// A backend shared with the test through an `Arc`.
struct SharedBackend(std::sync::Arc<FlakyRelay>);

impl RelayBackend for SharedBackend {
    fn open_store(
        &self,
        store: &StoreId,
        access_fingerprint: &[u8; 32],
        may_create: bool,
    ) -> impl Future<
        Output = Result<persist_storage::relay::StoreAccess, persist_storage::relay::RelayError>,
    > + Send {
        self.0.open_store(store, access_fingerprint, may_create)
    }
    fn append(
        &self,
        store: &StoreId,
        entries: Vec<persist_storage::relay::Incoming>,
    ) -> impl Future<
        Output = Result<persist_storage::relay::Appended, persist_storage::relay::RelayError>,
    > + Send {
        self.0.append(store, entries)
    }
    fn pull(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> impl Future<
        Output = Result<persist_storage::relay::Page, persist_storage::relay::RelayError>,
    > + Send {
        self.0.pull(store, since, limit, bytes_target)
    }
    fn head(
        &self,
        store: &StoreId,
    ) -> impl Future<Output = Result<u64, persist_storage::relay::RelayError>> + Send {
        self.0.head(store)
    }
    fn watch(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.0.watch(store)
    }
    fn mailbox_put(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<u64, persist_storage::relay::RelayError>> + Send {
        self.0.mailbox_put(store, mailbox, payload)
    }
    fn mailbox_fetch(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        since: u64,
        limit: usize,
    ) -> impl Future<
        Output = Result<
            Vec<persist_core::protocol::MailboxItem>,
            persist_storage::relay::RelayError,
        >,
    > + Send {
        self.0.mailbox_fetch(store, mailbox, since, limit)
    }
    fn mailbox_ack(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        upto: u64,
    ) -> impl Future<Output = Result<(), persist_storage::relay::RelayError>> + Send {
        self.0.mailbox_ack(store, mailbox, upto)
    }
    fn stats(
        &self,
    ) -> impl Future<
        Output = Result<persist_storage::relay::RelayStats, persist_storage::relay::RelayError>,
    > + Send {
        self.0.stats()
    }
    fn rekey(
        &self,
        store: &StoreId,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> impl Future<Output = Result<(), persist_storage::relay::RelayError>> + Send {
        self.0.rekey(store, old, new)
    }
    fn access_changes(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.0.access_changes(store)
    }
}
