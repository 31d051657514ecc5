//! QUIC over loopback: pinned and CA-rooted trust, refusals with clear
//! errors, and framed conversations.

use std::net::SocketAddr;
use std::path::Path;

use persist_core::protocol::{AccessKey, Hello, Message, PROTOCOL_VERSION, Welcome};
use persist_core::{DeviceId, StoreId};
use persist_transport::quic::{self, close_code};
use persist_transport::tls::{self, CertPin, DEFAULT_SERVER_NAME, ServerIdentity, Trust};
use persist_transport::{ConnectError, Server};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

fn hello() -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        store: StoreId([1; 16]),
        access: AccessKey([2; 32]),
        device: DeviceId([3; 16]),
        admission: None,
    })
}

/// Serves every conversation of every connection: answers a Hello with a
/// Welcome.
fn spawn_welcomer(server: Server) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(conn) = server.accept().await {
            tokio::spawn(async move {
                // The connection stays open while this loop holds it.
                while let Ok((tx, rx)) = conn.accept_stream().await {
                    tokio::spawn(welcome(tx, rx));
                }
            });
        }
    })
}

async fn welcome(mut tx: persist_transport::SendHalf, mut rx: persist_transport::RecvHalf) {
    while let Ok(Some(msg)) = rx.recv().await {
        if let Message::Hello(_) = msg {
            let welcome = Message::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                head: 42,
                created: true,
            });
            if tx.send(&welcome).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.finish().await;
}

async fn exchange(conn: &quic::Connection) -> Message {
    let (mut tx, mut rx) = conn.open_stream().await.expect("stream");
    tx.send(&hello()).await.expect("send hello");
    rx.recv().await.expect("recv").expect("an answer")
}

#[tokio::test]
async fn pinned_client_exchanges_hello_and_welcome() {
    let identity = ServerIdentity::self_signed().expect("identity");
    let server = Server::bind(loopback(), &identity).expect("bind");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0, "the real port is reported");
    spawn_welcomer(server);

    let conn = quic::connect(addr, DEFAULT_SERVER_NAME, &Trust::Pin(identity.pin()))
        .await
        .expect("connects");
    assert_eq!(conn.remote_addr(), addr);
    match exchange(&conn).await {
        Message::Welcome(w) => assert_eq!((w.head, w.created), (42, true)),
        other => panic!("expected Welcome, got {other:?}"),
    }
    // A second conversation on the same connection works too.
    assert!(matches!(exchange(&conn).await, Message::Welcome(_)));
    conn.close(close_code::NORMAL, "done");
}

#[tokio::test]
async fn a_wrong_pin_is_refused_with_a_clear_error() {
    let identity = ServerIdentity::self_signed().expect("identity");
    let server = Server::bind(loopback(), &identity).expect("bind");
    let addr = server.local_addr();
    spawn_welcomer(server);

    let wrong = CertPin([0xab; 32]);
    let err = quic::connect(addr, DEFAULT_SERVER_NAME, &Trust::Pin(wrong))
        .await
        .expect_err("refused");
    match &err {
        ConnectError::PinMismatch {
            expected, found, ..
        } => {
            assert_eq!(*expected, wrong);
            assert_eq!(*found, identity.pin());
        }
        other => panic!("expected PinMismatch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&wrong.to_string()), "{text}");
    assert!(text.contains("check --pin"), "{text}");

    // The server survived the failed handshake and still serves others.
    let conn = quic::connect(addr, DEFAULT_SERVER_NAME, &Trust::Pin(identity.pin()))
        .await
        .expect("connects after a refused client");
    assert!(matches!(exchange(&conn).await, Message::Welcome(_)));
}

/// A CA, a leaf for `names` signed by it, written as PEM files in `dir`.
/// Returns (ca.pem, leaf.pem, leaf-key.pem).
fn make_ca_and_leaf(
    dir: &Path,
    names: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Persist test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");

    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf_params =
        rcgen::CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("leaf params");
    let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf cert");

    let ca_path = dir.join("ca.pem");
    let leaf_path = dir.join("leaf.pem");
    let key_path = dir.join("leaf-key.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write ca");
    std::fs::write(&leaf_path, leaf.pem()).expect("write leaf");
    std::fs::write(&key_path, leaf_key.serialize_pem()).expect("write key");
    (ca_path, leaf_path, key_path)
}

#[tokio::test]
async fn ca_rooted_trust_verifies_chain_and_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, leaf, key) = make_ca_and_leaf(dir.path(), &["relay.test", "localhost"]);
    let identity = ServerIdentity::from_pem_files(&leaf, &key).expect("operator identity");
    let server = Server::bind(loopback(), &identity).expect("bind");
    let addr = server.local_addr();
    spawn_welcomer(server);

    let trust = Trust::roots_from_pem_file(&ca).expect("roots");
    let conn = quic::connect(addr, "relay.test", &trust)
        .await
        .expect("a CA-signed certificate for the name is trusted");
    assert!(matches!(exchange(&conn).await, Message::Welcome(_)));

    // The wrong name is refused by WebPKI.
    let err = quic::connect(addr, "elsewhere.test", &trust)
        .await
        .expect_err("wrong name");
    assert!(matches!(err, ConnectError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("server name"), "{err}");

    // Another CA does not vouch for this server.
    let other = tempfile::tempdir().expect("tempdir");
    let (other_ca, _, _) = make_ca_and_leaf(other.path(), &["relay.test"]);
    let err = quic::connect(
        addr,
        "relay.test",
        &Trust::roots_from_pem_file(&other_ca).expect("roots"),
    )
    .await
    .expect_err("unknown CA");
    assert!(matches!(err, ConnectError::Untrusted { .. }), "{err}");

    // The operator's certificate can still be pinned.
    let pin = CertPin::of_certificate(identity.chain()[0].as_ref());
    let conn = quic::connect(addr, "anything", &Trust::Pin(pin))
        .await
        .expect("pinned");
    assert!(matches!(exchange(&conn).await, Message::Welcome(_)));
}

#[tokio::test]
async fn a_non_ca_file_is_not_accepted_as_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "nothing here").expect("write");
    let err = Trust::roots_from_pem_file(&junk).expect_err("no roots");
    assert!(matches!(err, tls::TrustError::BadRoots { .. }), "{err}");
}

#[tokio::test]
async fn an_identity_kept_on_disk_serves_the_same_pin_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pin = {
        let identity = ServerIdentity::load_or_create(dir.path()).expect("create");
        let server = Server::bind(loopback(), &identity).expect("bind");
        server.close();
        identity.pin()
    };
    let identity = ServerIdentity::load_or_create(dir.path()).expect("reload");
    assert_eq!(identity.pin(), pin);
    let server = Server::bind(loopback(), &identity).expect("bind again");
    let addr = server.local_addr();
    spawn_welcomer(server);
    let conn = quic::connect(addr, DEFAULT_SERVER_NAME, &Trust::Pin(pin))
        .await
        .expect("the old pin still works");
    assert!(matches!(exchange(&conn).await, Message::Welcome(_)));
}

#[tokio::test]
async fn finish_delivers_a_last_frame_before_close() {
    let identity = ServerIdentity::self_signed().expect("identity");
    let server = Server::bind(loopback(), &identity).expect("bind");
    let addr = server.local_addr();
    let serve = tokio::spawn(async move {
        let conn = server.accept().await.expect("a connection");
        let (mut tx, mut rx) = conn.accept_stream().await.expect("stream");
        let _ = rx.recv().await;
        tx.send(&Message::error(
            persist_core::protocol::ErrorCode::Unauthorized,
            "no",
        ))
        .await
        .expect("send");
        tokio::time::timeout(std::time::Duration::from_secs(5), tx.finish())
            .await
            .expect("finish resolves")
            .expect("finished");
        // Closing right after finish loses nothing.
        conn.close(close_code::REFUSED, "refused");
    });
    let conn = quic::connect(addr, DEFAULT_SERVER_NAME, &Trust::Pin(identity.pin()))
        .await
        .expect("connects");
    let (mut tx, mut rx) = conn.open_stream().await.expect("stream");
    tx.send(&hello()).await.expect("send");
    assert!(matches!(
        rx.recv().await.expect("recv"),
        Some(Message::Error { .. })
    ));
    serve.await.expect("server task");
}
