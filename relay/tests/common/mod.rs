//! Helpers shared by the relay tests: a node on loopback, a client that
//! speaks persist/1 over QUIC, real envelopes from persist-core, and the
//! secret scanner ([`scan`]).

#![allow(dead_code, unreachable_pub)]

pub mod devices;
pub mod scan;

use std::net::SocketAddr;

use persist_core::env::{Entropy, RngStream, SeededEntropy};
use persist_core::envelope::{self, Flags, SealContext};
use persist_core::hlc::Hlc;
use persist_core::keyring::Keyring;
use persist_core::keys::DeviceIdentity;
use persist_core::protocol::{AccessKey, ErrorCode, Hello, Message, PROTOCOL_VERSION, PushEntry};
use persist_core::record::Record;
use persist_core::{DeviceId, StoreId};
use persist_relay::{Admission, RelayConfig, RelayHandle};
use persist_storage::relay::RelayBackend;
use persist_transport::quic::{self, close_code};
use persist_transport::tls::DEFAULT_SERVER_NAME;
use persist_transport::{CertPin, RecvHalf, SendHalf, Trust};

/// A relay on a free loopback port, its identity in a temp dir.
pub async fn start_relay<B: RelayBackend>(
    backend: B,
    admission: Admission,
    metrics: bool,
) -> (RelayHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = RelayConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path());
    config.admission = admission;
    if metrics {
        config.metrics = Some("127.0.0.1:0".parse().expect("addr"));
    }
    let relay = persist_relay::start(config, backend)
        .await
        .expect("relay starts");
    (relay, dir)
}

/// One conversation with a relay.
pub struct Client {
    pub conn: quic::Connection,
    pub tx: SendHalf,
    pub rx: RecvHalf,
}

impl Client {
    pub async fn connect(addr: SocketAddr, pin: CertPin) -> Client {
        let conn = quic::connect(addr, DEFAULT_SERVER_NAME, &Trust::Pin(pin))
            .await
            .expect("connects");
        let (tx, rx) = conn.open_stream().await.expect("stream");
        Client { conn, tx, rx }
    }

    pub async fn to(relay: &RelayHandle) -> Client {
        Self::connect(relay.addr(), relay.pin()).await
    }

    /// Sends `msg` and returns the answer.
    pub async fn ask(&mut self, msg: &Message) -> Message {
        self.tx.send(msg).await.expect("send");
        self.next().await
    }

    /// The next message, within a few seconds.
    pub async fn next(&mut self) -> Message {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.rx.recv())
            .await
            .expect("an answer in time")
            .expect("a readable answer")
            .expect("an answer, not the end")
    }

    /// Asserts that the relay ended this conversation (after an Error).
    pub async fn expect_end(&mut self) {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), self.rx.recv())
            .await
            .expect("the end in time");
        assert!(
            !matches!(next, Ok(Some(_))),
            "expected the conversation to end, got {next:?}"
        );
    }

    pub fn close(&self) {
        self.conn.close(close_code::NORMAL, "test done");
    }
}

pub fn hello(store: StoreId, access: AccessKey, admission: Option<&str>) -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        store,
        access,
        device: DeviceId([9; 16]),
        admission: admission.map(str::to_owned),
    })
}

pub fn expect_error(msg: Message, code: ErrorCode) -> String {
    match msg {
        Message::Error { code: got, text } => {
            assert_eq!(got, code, "error text: {text}");
            text
        }
        other => panic!("expected Error {code:?}, got {other:?}"),
    }
}

/// A device of one store that seals real envelopes.
pub struct Writer {
    pub ring: Keyring,
    rng: RngStream,
    seq: u64,
}

impl Writer {
    pub fn new(seed: u64) -> Writer {
        let entropy = SeededEntropy::from_u64(seed);
        let mut rng = entropy.stream("relay-test");
        let device = DeviceIdentity::generate(&mut rng);
        let ring = Keyring::create(device, "test device", Hlc::default(), &mut rng);
        Writer { ring, rng, seq: 0 }
    }

    pub fn store(&self) -> StoreId {
        self.ring.store_id
    }

    pub fn access(&self) -> AccessKey {
        AccessKey::derive(&self.ring.relay_token, &self.ring.store_id)
    }

    pub fn hello(&self) -> Message {
        hello(self.store(), self.access(), None)
    }

    /// An envelope of `value` at `path`, written at `ms`.
    pub fn entry(&mut self, path: &str, value: &[u8], ms: u64) -> PushEntry {
        self.seq += 1;
        let record = Record {
            path: path.into(),
            value: value.to_vec(),
            origin: self.ring.device_id(),
            hlc: Hlc { ms, counter: 0 },
        };
        let locator = self
            .ring
            .index_key
            .locator(&self.ring.store_id, &record.path);
        let ctx = SealContext {
            store_id: self.ring.store_id,
            epoch: self.ring.current,
            data_key: self.ring.current_key(),
            signing_key: self.ring.device.signing_key(),
            signer: self.ring.device_id(),
        };
        let envelope = envelope::seal(
            &ctx,
            &locator,
            &record,
            Flags::default(),
            self.seq,
            &mut self.rng,
        )
        .expect("seals");
        PushEntry { locator, envelope }
    }
}
