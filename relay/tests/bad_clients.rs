//! Bad clients against the real `persist-relay` binary: random bytes,
//! oversize frames, unknown versions, a wrong credential, and a client
//! that stops reading. Each costs only its own connection, while a
//! well-behaved client of the same store, connected throughout, goes on
//! pushing and pulling; the process stays up and its memory bounded.
//!
//! `relay.rs` covers these refusals in process, after a valid `Hello`;
//! here they come first (before any `Hello`) as well as after one, from
//! random bytes rather than fixed ones, against the binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Client, Writer, expect_error, hello};
use persist_core::protocol::{
    AccessKey, ErrorCode, FRAME_BYTES_MAX, MESSAGE_PAYLOAD_BYTES_TARGET, Message, PROTOCOL_VERSION,
    peek_hello_version,
};
use persist_transport::CertPin;
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_persist-relay");
/// How long a refused connection may take to be closed.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_its_own_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(tmp.path());
    let mut writer = Writer::new(0xbad);
    let mut good = Good::connect(&relay, &mut writer).await;
    let mut rng = SplitMix(0x5eed_0bad_c0de);

    // Random bytes as the first frame: not a Hello (Protocol), or a Hello
    // of some other version (VersionMismatch).
    for _ in 0..8 {
        let payload = loop {
            let len = 1 + rng.below(300) as usize;
            let payload = rng.bytes(len);
            if peek_hello_version(&payload) != Some(PROTOCOL_VERSION) {
                break payload;
            }
        };
        let expected = match peek_hello_version(&payload) {
            Some(_) => ErrorCode::VersionMismatch,
            None => ErrorCode::Protocol,
        };
        let mut bad = Client::connect(relay.addr, relay.pin).await;
        bad.write_raw(&frame(&payload)).await;
        refused(&mut bad, expected).await;
        good.round(&mut writer).await;
    }

    // Random bytes as a frame after a valid Hello, up to 1 MiB of them. The
    // first byte names no message (`Message` has 17 variants, the last
    // `Rekeyed`), so the payload cannot decode.
    for len in [1, 100, 70_000, 1 << 20] {
        let mut payload = rng.bytes(len);
        payload[0] = 17 + (payload[0] % 100);
        let mut bad = Client::connect(relay.addr, relay.pin).await;
        assert!(matches!(
            bad.ask(&writer.hello()).await,
            Message::Welcome(_)
        ));
        bad.write_raw(&frame(&payload)).await;
        let text = refused(&mut bad, ErrorCode::Protocol).await;
        assert!(text.contains("not a persist/1 message"), "{text}");
        good.round(&mut writer).await;
    }

    // Unframed random bytes: their first four read as a length far over
    // the limit, refused from the prefix alone.
    let mut junk = rng.bytes(64 * 1024);
    junk[0] |= 0x80;
    let mut bad = Client::connect(relay.addr, relay.pin).await;
    bad.write_raw(&junk).await;
    let text = refused(&mut bad, ErrorCode::Protocol).await;
    assert!(text.contains("exceeds"), "{text}");
    good.round(&mut writer).await;

    // Oversize length prefixes: one over the limit before any Hello, the
    // largest a prefix can say after one. Nothing of the payload follows.
    for (after_hello, declared) in [(false, FRAME_BYTES_MAX as u32 + 1), (true, u32::MAX)] {
        let mut bad = Client::connect(relay.addr, relay.pin).await;
        if after_hello {
            assert!(matches!(
                bad.ask(&writer.hello()).await,
                Message::Welcome(_)
            ));
        }
        bad.write_raw(&declared.to_be_bytes()).await;
        let text = refused(&mut bad, ErrorCode::Protocol).await;
        assert!(
            text.contains(&declared.to_string()) && text.contains(&FRAME_BYTES_MAX.to_string()),
            "names the declared length and the limit: {text}"
        );
        good.round(&mut writer).await;
    }

    // Hellos of unknown versions, older and newer, the newer one with a
    // layout this build cannot decode: the version is read from the prefix
    // and both versions are named, with who must upgrade.
    for (version, tail, who) in [
        (0u16, hello_tail(&writer), "upgrade the client"),
        (PROTOCOL_VERSION + 1, rng.bytes(40), "upgrade the relay"),
        (u16::MAX, Vec::new(), "upgrade the relay"),
    ] {
        let mut payload = postcard::to_stdvec(&(0u8, version)).unwrap();
        payload.extend_from_slice(&tail);
        assert_eq!(peek_hello_version(&payload), Some(version));
        let mut bad = Client::connect(relay.addr, relay.pin).await;
        bad.write_raw(&frame(&payload)).await;
        let text = refused(&mut bad, ErrorCode::VersionMismatch).await;
        assert!(
            text.contains(&format!("version {PROTOCOL_VERSION}"))
                && text.contains(&format!("version {version}"))
                && text.contains(who),
            "{text}"
        );
        good.round(&mut writer).await;
    }

    // A wrong credential for the existing store: refused, and told nothing
    // of the store (not its id, not its head).
    let head = good.cursor;
    let mut intruder = Client::connect(relay.addr, relay.pin).await;
    let answer = intruder
        .ask(&hello(writer.store(), AccessKey([0x55; 32]), None))
        .await;
    let text = expect_error(answer, ErrorCode::Unauthorized);
    assert!(!text.contains(&writer.store().to_string()), "{text}");
    assert!(!text.contains(&head.to_string()), "{text}");
    closed(&intruder, "refused").await;
    good.round(&mut writer).await;
    // The store is not locked by the attempt: its members still get in.
    let mut member = Client::connect(relay.addr, relay.pin).await;
    match member.ask(&writer.hello()).await {
        Message::Welcome(w) => assert!(!w.created && w.head >= head, "{w:?}"),
        other => panic!("expected Welcome, got {other:?}"),
    }
    member.close();

    // Through all of it: one process, one good connection, every push and
    // pull answered, and one log line per refusal saying why.
    relay.assert_alive();
    let bad_clients = 8 + 4 + 1 + 2 + 3 + 1;
    assert_eq!(good.rounds, bad_clients, "one good round after each");
    let log = std::fs::read_to_string(&relay.stderr).unwrap();
    let refusals = log.matches("refusing a client").count();
    assert_eq!(refusals, bad_clients as usize, "refusals logged:\n{log}");
    good.client.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_costs_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(tmp.path());
    let mut writer = Writer::new(0x57a11);
    let mut good = Good::connect(&relay, &mut writer).await;

    // A store with two full pages of envelopes, pulled once by the good
    // client so that the relay's caches are warm before the baseline.
    good.fill(&mut writer, 2 * MESSAGE_PAYLOAD_BYTES_TARGET)
        .await;
    let baseline = relay.memory();

    // The stalled client subscribes, asks for the whole log again and
    // again (each answer a full page), and never reads a byte.
    const PULLS: usize = 100;
    let mut stalled = Client::connect(relay.addr, relay.pin).await;
    assert!(matches!(
        stalled.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let requests = std::iter::once(Message::Subscribe).chain(std::iter::repeat_n(
        Message::Pull {
            since: 0,
            limit: u32::MAX,
        },
        PULLS,
    ));
    for request in requests {
        tokio::time::timeout(Duration::from_secs(5), stalled.tx.send(&request))
            .await
            .expect("requests are small: they fit the relay's receive window")
            .expect("sent");
    }
    let asked = PULLS * MESSAGE_PAYLOAD_BYTES_TARGET;

    // The relay keeps serving the good client, whose pushes also wake the
    // stalled subscription.
    for _ in 0..20 {
        good.round(&mut writer).await;
    }
    let stalled_memory = relay.memory();
    relay.assert_alive();
    eprintln!(
        "relay memory: {baseline:?} before, {stalled_memory:?} with a stalled reader asked for \
         {} MiB",
        asked >> 20
    );
    // One page being sent, its frame and the stream's send window: a few
    // pages at most, far from what the client asked for.
    let bound_kib = 16 * (MESSAGE_PAYLOAD_BYTES_TARGET as u64 >> 10);
    assert!(
        stalled_memory.peak_kib < baseline.peak_kib + bound_kib
            && stalled_memory.rss_kib < baseline.rss_kib + bound_kib,
        "relay memory grew by more than {bound_kib} KiB for one stalled reader asked for {asked} \
         bytes: {baseline:?} → {stalled_memory:?}"
    );

    // It was held back, not dropped: once the client reads, the pages
    // it asked for arrive.
    good.round(&mut writer).await;
    match stalled.next().await {
        Message::Batch { entries, .. } => {
            let bytes: usize = entries.iter().map(|e| e.envelope.len()).sum();
            assert!(
                bytes >= MESSAGE_PAYLOAD_BYTES_TARGET / 2,
                "a full page: {bytes}"
            );
        }
        other => panic!("expected the first Batch, got {other:?}"),
    }
    stalled.close();
    good.client.close();
}

/// A relay must not keep a conversation whose peer never reads: its
/// session holds a page of envelopes while it waits. Once the peer's
/// stream has been full long enough, the relay should close that
/// connection (QUIC's close needs no stream credit), with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    /// The relay's send deadline, plus room for a loaded machine.
    const GIVE_UP_WITHIN: Duration =
        Duration::from_secs(persist_relay::session::SEND_TIMEOUT.as_secs() + 30);
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(tmp.path());
    let mut writer = Writer::new(0x57a12);
    let mut good = Good::connect(&relay, &mut writer).await;
    good.fill(&mut writer, 2 * MESSAGE_PAYLOAD_BYTES_TARGET)
        .await;

    let mut stalled = Client::connect(relay.addr, relay.pin).await;
    assert!(matches!(
        stalled.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    for _ in 0..4 {
        stalled
            .tx
            .send(&Message::Pull {
                since: 0,
                limit: u32::MAX,
            })
            .await
            .expect("sent");
    }
    let reason = tokio::time::timeout(GIVE_UP_WITHIN, stalled.conn.closed())
        .await
        .expect("the relay closes a connection that stopped reading");
    eprintln!("closed: {reason}");
    good.round(&mut writer).await;
    relay.assert_alive();
}

/// A well-behaved client of the store, connected throughout a test.
struct Good {
    client: Client,
    /// The relay log's head as far as this client pulled.
    cursor: u64,
    rounds: u32,
    pushes: u64,
}

impl Good {
    async fn connect(relay: &RelayProcess, writer: &mut Writer) -> Good {
        let mut client = Client::connect(relay.addr, relay.pin).await;
        assert!(matches!(
            client.ask(&writer.hello()).await,
            Message::Welcome(_)
        ));
        Good {
            client,
            cursor: 0,
            rounds: 0,
            pushes: 0,
        }
    }

    /// Pushes one entry and pulls it back: the connection works.
    async fn round(&mut self, writer: &mut Writer) {
        self.pushes += 1;
        let path = format!("good/{}", self.pushes);
        let entry = writer.entry(&path, b"still here", self.pushes);
        let pushed = self.push(vec![entry.clone()]).await;
        assert_eq!(pushed, 1, "the push is accepted");
        let pulled = self.pull_all().await;
        assert_eq!(pulled.last(), Some(&entry.envelope), "and pulled back");
        self.rounds += 1;
    }

    /// Pushes envelopes of about `bytes` in all, then pulls everything.
    async fn fill(&mut self, writer: &mut Writer, bytes: usize) {
        const VALUE_BYTES: usize = 64 * 1024;
        const PER_PUSH: usize = 16;
        let value = vec![0x42u8; VALUE_BYTES];
        let mut entries = Vec::new();
        for i in 0..bytes.div_ceil(VALUE_BYTES) {
            entries.push(writer.entry(&format!("fill/{i}"), &value, 1));
            if entries.len() == PER_PUSH {
                self.push(std::mem::take(&mut entries)).await;
            }
        }
        if !entries.is_empty() {
            self.push(entries).await;
        }
        let pulled = self.pull_all().await;
        assert!(pulled.iter().map(Vec::len).sum::<usize>() >= bytes);
    }

    async fn push(&mut self, entries: Vec<persist_core::protocol::PushEntry>) -> u32 {
        let count = entries.len() as u32;
        match self.client.ask(&Message::Push { id: 1, entries }).await {
            Message::PushAck {
                accepted, stale, ..
            } => {
                assert_eq!(accepted + stale, count);
                accepted
            }
            other => panic!("expected PushAck, got {other:?}"),
        }
    }

    /// Pulls from the cursor to the head; the envelopes pulled.
    async fn pull_all(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let answer = self
                .client
                .ask(&Message::Pull {
                    since: self.cursor,
                    limit: u32::MAX,
                })
                .await;
            let Message::Batch {
                entries,
                cursor,
                more,
            } = answer
            else {
                panic!("expected Batch, got {answer:?}");
            };
            self.cursor = cursor;
            out.extend(entries.into_iter().map(|e| e.envelope));
            if !more {
                return out;
            }
        }
    }
}

impl Client {
    /// Writes bytes on the stream as they are, framed or not.
    async fn write_raw(&mut self, bytes: &[u8]) {
        // A send half is boxed; reach the stream under it for raw bytes.
        let tx = std::mem::replace(
            &mut self.tx,
            persist_transport::FrameSender::new(Box::new(tokio::io::sink())).boxed(),
        );
        let mut raw = tx.into_inner();
        raw.write_all(bytes).await.expect("write");
        raw.flush().await.expect("flush");
        self.tx = persist_transport::FrameSender::new(raw);
    }
}

/// Expects one `Error` with `code`, then the end of the conversation and
/// the close of the connection; returns the error's text.
async fn refused(client: &mut Client, code: ErrorCode) -> String {
    let text = expect_error(client.next().await, code);
    client.expect_end().await;
    let reason = match code {
        ErrorCode::Protocol | ErrorCode::BadEnvelope => "protocol error",
        _ => "refused",
    };
    closed(client, reason).await;
    text
}

/// Expects the relay to close the connection, saying `reason`.
async fn closed(client: &Client, reason: &str) {
    let said = tokio::time::timeout(CLOSE_WITHIN, client.conn.closed())
        .await
        .expect("the relay closes the connection");
    assert!(
        said.contains(reason),
        "closed with {said:?}, not {reason:?}"
    );
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A valid Hello's encoding after its version: what a Hello of another
/// version with today's layout would carry.
fn hello_tail(writer: &Writer) -> Vec<u8> {
    let full = postcard::to_stdvec(&writer.hello()).unwrap();
    let prefix = postcard::to_stdvec(&(0u8, PROTOCOL_VERSION)).unwrap();
    full[prefix.len()..].to_vec()
}

/// A small deterministic generator for the random inputs (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Resident and peak memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    peak_kib: u64,
}

/// The `persist-relay` binary as a child process, its stderr in a file.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    pin: CertPin,
    stderr: PathBuf,
}

impl RelayProcess {
    fn start(tmp: &Path) -> RelayProcess {
        let stdout = tmp.join("relay-stdout.log");
        let stderr = tmp.join("relay-stderr.log");
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(tmp.join("relay-data"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawns persist-relay");
        let mut line = String::new();
        for _ in 0..1000 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "persist-relay exited with {status} before serving:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            line = std::fs::read_to_string(&stdout).unwrap();
            if line.ends_with('\n') {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let rest = line
            .trim_end()
            .strip_prefix("persist-relay listening on ")
            .unwrap_or_else(|| panic!("unexpected start line {line:?}"));
        let (addr, pin) = rest.split_once(" pin ").expect("a pin");
        RelayProcess {
            child,
            addr: addr.parse().expect("an address"),
            pin: pin.parse().expect("a pin"),
            stderr,
        }
    }

    fn assert_alive(&self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the relay process exists");
        assert!(
            !status.contains("State:\tZ"),
            "the relay process died:\n{}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }

    fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the relay process exists");
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{key} in /proc/<pid>/status"))
        };
        Memory {
            rss_kib: kib("VmRSS:"),
            peak_kib: kib("VmHWM:"),
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
