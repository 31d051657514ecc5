//! Changing a store's access credential (`Rekey`) on a relay node over
//! real QUIC, on every backend: the old credential stops working for new
//! conversations and for open ones (their next request, their next
//! `Notify`), the new one is admitted, a stale credential cannot rekey, and
//! `Rekey` before `Welcome` is a protocol error. With
//! `PERSIST_TEST_POSTGRES_URL` set, also across two relay nodes sharing a
//! PostgreSQL schema.

mod common;

use std::time::Duration;

use common::{Client, Writer, expect_error, hello, start_relay};
use persist_core::protocol::{AccessKey, ErrorCode, Message};
use persist_relay::Admission;
use persist_storage::relay::RelayBackend;
use tokio::io::AsyncWriteExt;

/// Runs a test body on a MemoryRelay, a RedbRelay and, when
/// `PERSIST_TEST_POSTGRES_URL` is set, a PostgresRelay in a schema of its
/// own (dropped afterwards).
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
                    let Some(url) = super::postgres_url() else { return };
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

on_every_backend!(
    the_old_credential_stops_working_everywhere,
    a_stale_credential_cannot_rekey,
    rekey_before_welcome_is_a_protocol_error,
);

fn postgres_url() -> Option<String> {
    match std::env::var("PERSIST_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!("skipped: PERSIST_TEST_POSTGRES_URL is not set");
            None
        }
    }
}

/// A schema name for one test in this process.
fn schema_for(test: &str) -> String {
    // FNV-1a: a stable short tag for the test name.
    let tag = test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("relay_k_{tag:016x}_{}", std::process::id())
}

/// Drops a test's schema with psql (the relays that used it have stopped).
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

/// A conversation admitted with `access` to `writer`'s store.
async fn admitted(
    relay: &persist_relay::RelayHandle,
    writer: &Writer,
    access: &AccessKey,
) -> Client {
    let mut client = Client::to(relay).await;
    match client
        .ask(&hello(writer.store(), access.clone(), None))
        .await
    {
        Message::Welcome(_) => client,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

fn pull() -> Message {
    Message::Pull {
        since: 0,
        limit: 10,
    }
}

/// Expects `answer` to be the refusal of a revoked credential, then the
/// end of the conversation.
async fn expect_revoked(client: &mut Client, answer: Message) {
    let text = expect_error(answer, ErrorCode::Unauthorized);
    assert!(text.contains("credential"), "{text}");
    client.expect_end().await;
}

async fn the_old_credential_stops_working_everywhere<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let mut writer = Writer::new(31);
    let old = writer.access();
    let new = AccessKey([0x42; 32]);

    let mut subscriber = admitted(&relay, &writer, &old).await;
    subscriber
        .tx
        .send(&Message::Subscribe)
        .await
        .expect("subscribe");
    let mut idle = admitted(&relay, &writer, &old).await;
    let mut rekeyer = admitted(&relay, &writer, &old).await;
    let entry = writer.entry("a", b"1", 1);
    assert!(matches!(
        rekeyer
            .ask(&Message::Push {
                id: 1,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { head: 1, .. }
    ));
    assert_eq!(subscriber.next().await, Message::Notify { head: 1 });

    assert_eq!(
        rekeyer
            .ask(&Message::Rekey {
                access: new.clone()
            })
            .await,
        Message::Rekeyed
    );
    assert_eq!(relay.metrics().snapshot().rekeys, 1);
    // The rekeying conversation goes on under the new credential.
    assert!(matches!(rekeyer.ask(&pull()).await, Message::Batch { .. }));

    // An open conversation with the old credential: refused at its next
    // request, then closed.
    let answer = idle.ask(&pull()).await;
    expect_revoked(&mut idle, answer).await;

    // New conversations: the old credential is refused, the new admitted
    // to the same store.
    let mut late = Client::to(&relay).await;
    let answer = late.ask(&hello(writer.store(), old.clone(), None)).await;
    expect_error(answer, ErrorCode::Unauthorized);
    late.expect_end().await;
    let mut member = Client::to(&relay).await;
    match member.ask(&hello(writer.store(), new.clone(), None)).await {
        Message::Welcome(welcome) => assert_eq!((welcome.created, welcome.head), (false, 1)),
        other => panic!("expected Welcome, got {other:?}"),
    }

    // A live subscription with the old credential hears no more: the next
    // head brings it the refusal instead of a Notify.
    let entry = writer.entry("b", b"2", 2);
    assert!(matches!(
        member
            .ask(&Message::Push {
                id: 2,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { head: 2, .. }
    ));
    let answer = subscriber.next().await;
    expect_revoked(&mut subscriber, answer).await;
    assert!(matches!(rekeyer.ask(&pull()).await, Message::Batch { .. }));
    relay.shutdown().await;
}

async fn a_stale_credential_cannot_rekey<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let writer = Writer::new(32);
    let old = writer.access();
    let (first, second) = (AccessKey([0x51; 32]), AccessKey([0x52; 32]));
    let mut winner = admitted(&relay, &writer, &old).await;
    let mut loser = admitted(&relay, &writer, &old).await;
    assert_eq!(
        winner
            .ask(&Message::Rekey {
                access: first.clone()
            })
            .await,
        Message::Rekeyed
    );
    let answer = loser
        .ask(&Message::Rekey {
            access: second.clone(),
        })
        .await;
    expect_revoked(&mut loser, answer).await;

    // Nothing of the refused rekey took effect.
    let mut refused = Client::to(&relay).await;
    let answer = refused.ask(&hello(writer.store(), second, None)).await;
    expect_error(answer, ErrorCode::Unauthorized);
    admitted(&relay, &writer, &first).await.close();
    assert_eq!(relay.metrics().snapshot().rekeys, 1);
    relay.shutdown().await;
}

async fn rekey_before_welcome_is_a_protocol_error<B: RelayBackend>(backend: B) {
    let (relay, _dir) = start_relay(backend, Admission::Open, false).await;
    let writer = Writer::new(33);
    let old = writer.access();
    admitted(&relay, &writer, &old).await.close();

    let mut early = Client::to(&relay).await;
    let answer = early
        .ask(&Message::Rekey {
            access: AccessKey([0x61; 32]),
        })
        .await;
    let text = expect_error(answer, ErrorCode::Protocol);
    assert!(text.contains("Hello"), "{text}");
    early.expect_end().await;

    // A client's Rekeyed, and a truncated Rekey, after the Welcome.
    let mut confused = admitted(&relay, &writer, &old).await;
    let answer = confused.ask(&Message::Rekeyed).await;
    expect_error(answer, ErrorCode::Protocol);
    confused.expect_end().await;
    let Client { conn, tx, mut rx } = admitted(&relay, &writer, &old).await;
    let mut raw = tx.into_inner();
    let rekey = postcard::to_stdvec(&Message::Rekey {
        access: AccessKey([0x62; 32]),
    })
    .expect("encodes");
    let cut = &rekey[..rekey.len() - 5];
    let mut frame = u32::try_from(cut.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    frame.extend_from_slice(cut);
    raw.write_all(&frame).await.expect("write");
    let answer = rx.recv().await.expect("readable").expect("an Error");
    expect_error(answer, ErrorCode::Protocol);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .is_ok(),
        "the offending connection is closed"
    );

    // None of it changed the credential.
    admitted(&relay, &writer, &old).await.close();
    let mut other = Client::to(&relay).await;
    let answer = other
        .ask(&hello(writer.store(), AccessKey([0x61; 32]), None))
        .await;
    expect_error(answer, ErrorCode::Unauthorized);
    assert_eq!(relay.metrics().snapshot().rekeys, 0);
    relay.shutdown().await;
}

/// Two relay nodes over one PostgreSQL schema: a rekey through node 1
/// refuses node 2's conversations with the old credential — a new Hello at
/// once (the database decides), an open conversation once node 2 has heard
/// the rekey's NOTIFY (normally milliseconds), and a live subscription at
/// the next head, which is announced after the rekey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_on_one_node_refuses_the_old_credential_on_another() {
    let Some(url) = postgres_url() else { return };
    let schema = schema_for("cross_node_rekey");
    let connect = || async {
        persist_storage::relay::PostgresRelay::connect(&url, Some(&schema))
            .await
            .expect("connects to PostgreSQL")
    };
    let (one, _dir_one) = start_relay(connect().await, Admission::Open, false).await;
    let (two, _dir_two) = start_relay(connect().await, Admission::Open, false).await;
    let mut writer = Writer::new(34);
    let old = writer.access();
    let new = AccessKey([0x71; 32]);

    let mut subscriber = admitted(&two, &writer, &old).await;
    subscriber
        .tx
        .send(&Message::Subscribe)
        .await
        .expect("subscribe");
    let mut open = admitted(&two, &writer, &old).await;
    assert!(matches!(open.ask(&pull()).await, Message::Batch { .. }));

    let mut rekeyer = admitted(&one, &writer, &old).await;
    assert_eq!(
        rekeyer
            .ask(&Message::Rekey {
                access: new.clone()
            })
            .await,
        Message::Rekeyed
    );

    let mut late = Client::to(&two).await;
    let answer = late.ask(&hello(writer.store(), old.clone(), None)).await;
    expect_error(answer, ErrorCode::Unauthorized);
    admitted(&two, &writer, &new).await.close();

    // Within the NOTIFY's delay a request may still be served; after it,
    // none is.
    let mut refused = None;
    for _ in 0..200 {
        match open.ask(&pull()).await {
            Message::Batch { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
            other => {
                refused = Some(other);
                break;
            }
        }
    }
    let answer = refused.expect("node 2 refuses the old credential within 10 s");
    expect_revoked(&mut open, answer).await;

    let entry = writer.entry("c", b"3", 3);
    assert!(matches!(
        rekeyer
            .ask(&Message::Push {
                id: 1,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { head: 1, .. }
    ));
    let answer = subscriber.next().await;
    expect_revoked(&mut subscriber, answer).await;

    one.shutdown().await;
    two.shutdown().await;
    drop_schema(&url, &schema);
}
