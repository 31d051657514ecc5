//! Load: one `persist-relay` process, 200 devices connected at once over
//! loopback, every one pushing real envelopes and pulling its store's whole
//! log; every device of a store ends with the same log, and the relay's
//! memory stays bounded.
//!
//! ```text
//! cargo test -p persist-relay --test load -- --nocapture   # prints the figures
//! ```
//!
//! 20 stores × 10 devices. Each device pushes [`ENVELOPES_PER_DEVICE`]
//! envelopes in pushes of [`ENVELOPES_PER_PUSH`] to paths that overlap its
//! neighbours' (so the relay must pick the highest precedence per locator),
//! then, once every device has pushed, pulls its store's log in pages of
//! [`PULL_LIMIT`] until `more == false`. The relay's VmRSS and VmHWM are read
//! from `/proc/<pid>/status`.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// allow-nondeterminism: the test reports how long each phase took.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use persist_core::env::{Entropy, SeededEntropy};
use persist_core::envelope::{self, Envelope, Flags, SealContext};
use persist_core::hlc::Hlc;
use persist_core::keyring::Keyring;
use persist_core::keys::DeviceIdentity;
use persist_core::protocol::{AccessKey, Hello, LogEntry, Message, PROTOCOL_VERSION, PushEntry};
use persist_core::record::Record;
use persist_core::{DeviceId, Locator, StoreId};
use persist_transport::quic::close_code;
use persist_transport::tls::DEFAULT_SERVER_NAME;
use persist_transport::{CertPin, RecvHalf, SendHalf, Trust};
use tokio::sync::Barrier;

const BIN: &str = env!("CARGO_BIN_EXE_persist-relay");

/// Stores on the relay.
const STORES: usize = 20;
/// Devices (connections) per store.
const DEVICES_PER_STORE: usize = 10;
/// Envelopes each device pushes.
const ENVELOPES_PER_DEVICE: usize = 25;
/// Envelopes per `Push`.
const ENVELOPES_PER_PUSH: usize = 5;
/// Distinct paths per store. Device `d` writes paths `10·d .. 10·d + 25`
/// (mod this), so each path is written by two or three devices.
const PATHS_PER_STORE: usize = 100;
/// Path stride between neighbouring devices.
const PATH_STRIDE: usize = 10;
/// Bytes of each record's value.
const VALUE_BYTES: usize = 256;
/// Entries asked for per `Pull`: small, so every device pages.
const PULL_LIMIT: u32 = 16;
/// The relay's resident memory may not exceed this at any time: a leak per
/// connection or per envelope would cross it.
const RELAY_RSS_MAX_KIB: u64 = 512 * 1024;
/// Longest any phase may take before the test fails instead of hanging.
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

const _: () = assert!(ENVELOPES_PER_DEVICE.is_multiple_of(ENVELOPES_PER_PUSH));
const _: () = assert!(PATH_STRIDE * DEVICES_PER_STORE >= PATHS_PER_STORE);
const _: () = assert!(ENVELOPES_PER_DEVICE > PATH_STRIDE, "writes must overlap");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_push_pull_and_converge() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::spawn(&dir.path().join("data"));
    let rss_idle = relay.status_kib("VmRSS");

    let stores: Vec<StorePlan> = (0..STORES).map(StorePlan::new).collect();
    let sealed_in = started.elapsed();
    let devices = stores.iter().flat_map(|s| s.devices.iter()).count();
    let envelopes = devices * ENVELOPES_PER_DEVICE;

    // Every device connects, pushes, waits for all the others, pulls, and
    // waits again, so all 200 connections are open at the same time.
    let pushed = Arc::new(Barrier::new(devices + 1));
    let pulled = Arc::new(Barrier::new(devices + 1));
    let done = Arc::new(Barrier::new(devices + 1));
    let mut tasks = Vec::new();
    for store in &stores {
        for device in &store.devices {
            let device = device.clone();
            let hello = store.hello(device.id);
            let (pushed, pulled, done) = (pushed.clone(), pulled.clone(), done.clone());
            let (addr, pin) = (relay.addr, relay.pin);
            tasks.push(tokio::spawn(async move {
                run_device(addr, pin, hello, device, &pushed, &pulled, &done).await
            }));
        }
    }
    let t0 = Instant::now();
    within("every device pushes", pushed.wait()).await;
    let push_phase = t0.elapsed();
    let rss_pushed = relay.status_kib("VmRSS");
    let t1 = Instant::now();
    within("every device pulls", pulled.wait()).await;
    let pull_phase = t1.elapsed();
    let rss_pulled = relay.status_kib("VmRSS");
    within("every device is done", done.wait()).await;

    let mut results = Vec::new();
    for task in tasks {
        results.push(within("a device ends", task).await.expect("device task"));
    }
    // Give the relay a moment to drop the closed connections' state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = relay.status_kib("VmRSS");
    let hwm = relay.status_kib("VmHWM");

    // Convergence: every device of a store holds exactly its store's
    // expected log — one envelope per path, the highest precedence.
    let mut accepted = 0u64;
    let mut stale = 0u64;
    for (store_index, store) in stores.iter().enumerate() {
        let expected = store.expected();
        assert_eq!(expected.len(), PATHS_PER_STORE, "every path was written");
        let of_store = &results[store_index * DEVICES_PER_STORE..][..DEVICES_PER_STORE];
        for (d, result) in of_store.iter().enumerate() {
            accepted += result.accepted;
            stale += result.stale;
            assert_eq!(
                result.log.len(),
                PATHS_PER_STORE,
                "store {store_index} device {d}: one log entry per path"
            );
            assert!(
                result.log == expected,
                "store {store_index} device {d} pulled a log other than the expected one"
            );
        }
    }
    let superseded = (ENVELOPES_PER_DEVICE * DEVICES_PER_STORE - PATHS_PER_STORE) * STORES;
    assert_eq!(
        accepted + stale,
        envelopes as u64,
        "every push was acknowledged"
    );
    assert!(
        stale as usize <= superseded,
        "stale pushes ({stale}) are at most the superseded writes ({superseded})"
    );

    let mib =
        |kib: Option<u64>| kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    println!(
        "load: {devices} connections ({STORES} stores x {DEVICES_PER_STORE} devices), \
         {envelopes} envelopes of a {VALUE_BYTES} B value pushed ({accepted} accepted, {stale} stale), \
         {} pulled in pages of {PULL_LIMIT}",
        devices * PATHS_PER_STORE
    );
    println!(
        "load: sealing {:.2} s, connect + push {:.2} s, pull {:.2} s, whole test {:.2} s",
        sealed_in.as_secs_f64(),
        push_phase.as_secs_f64(),
        pull_phase.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "load: relay VmRSS idle {}, after pushes {}, after pulls {}, after all closed {}; peak (VmHWM) {}",
        mib(rss_idle),
        mib(rss_pushed),
        mib(rss_pulled),
        mib(rss_end),
        mib(hwm)
    );
    let peak = hwm.expect("the relay's /proc status is readable");
    assert!(
        peak < RELAY_RSS_MAX_KIB,
        "relay peak RSS {} exceeds {}",
        mib(Some(peak)),
        mib(Some(RELAY_RSS_MAX_KIB))
    );

    relay.stop_gracefully().await;
}

/// What one device saw.
struct DeviceResult {
    accepted: u64,
    stale: u64,
    /// Its store's log as pulled: locator → envelope.
    log: BTreeMap<Locator, Vec<u8>>,
}

async fn run_device(
    addr: SocketAddr,
    pin: CertPin,
    hello: Message,
    device: DevicePlan,
    pushed: &Barrier,
    pulled: &Barrier,
    done: &Barrier,
) -> DeviceResult {
    let conn = persist_transport::connect(addr, DEFAULT_SERVER_NAME, &Trust::Pin(pin))
        .await
        .expect("connects");
    let (tx, rx) = conn.open_stream().await.expect("a stream");
    let mut peer = Peer { tx, rx };
    match peer.ask(&hello).await {
        Message::Welcome(_) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    peer.tx.send(&Message::Subscribe).await.expect("subscribe");

    let (mut accepted, mut stale) = (0u64, 0u64);
    for (id, chunk) in device.entries.chunks(ENVELOPES_PER_PUSH).enumerate() {
        let id = id as u64 + 1;
        let push = Message::Push {
            id,
            entries: chunk.to_vec(),
        };
        match peer.ask(&push).await {
            Message::PushAck {
                id: acked,
                accepted: a,
                stale: s,
                ..
            } => {
                assert_eq!(acked, id, "acknowledgements come in order");
                accepted += u64::from(a);
                stale += u64::from(s);
            }
            other => panic!("expected PushAck, got {other:?}"),
        }
    }
    pushed.wait().await;

    let mut log = BTreeMap::new();
    let mut since = 0;
    loop {
        let pull = Message::Pull {
            since,
            limit: PULL_LIMIT,
        };
        let (entries, cursor, more) = match peer.ask(&pull).await {
            Message::Batch {
                entries,
                cursor,
                more,
            } => (entries, cursor, more),
            other => panic!("expected Batch, got {other:?}"),
        };
        assert!(
            entries.len() <= PULL_LIMIT as usize,
            "pages respect the limit"
        );
        for LogEntry {
            seq,
            locator,
            envelope,
        } in entries
        {
            assert!(seq > since && seq <= cursor, "entries follow the cursor");
            assert!(
                log.insert(locator, envelope).is_none(),
                "a locator appears once in a pull from the start"
            );
        }
        since = cursor;
        if !more {
            break;
        }
    }
    pulled.wait().await;
    done.wait().await;
    conn.close(close_code::NORMAL, "load test done");
    DeviceResult {
        accepted,
        stale,
        log,
    }
}

/// One conversation, skipping the `Notify`s a subscription brings.
struct Peer {
    tx: SendHalf,
    rx: RecvHalf,
}

impl Peer {
    async fn ask(&mut self, msg: &Message) -> Message {
        self.tx.send(msg).await.expect("send");
        loop {
            let answer = tokio::time::timeout(PHASE_TIMEOUT, self.rx.recv())
                .await
                .expect("an answer in time")
                .expect("a readable answer")
                .expect("an answer, not the end");
            if !matches!(answer, Message::Notify { .. }) {
                return answer;
            }
        }
    }
}

/// A store: its keyring (from its first device) and what each device pushes.
struct StorePlan {
    store: StoreId,
    access: AccessKey,
    devices: Vec<DevicePlan>,
}

/// One device of a store and the envelopes it pushes.
#[derive(Clone)]
struct DevicePlan {
    id: DeviceId,
    entries: Vec<PushEntry>,
}

impl StorePlan {
    /// Store `index`: a keyring, and envelopes sealed by each of its devices
    /// under the store's current epoch, each signed by its own device key.
    fn new(index: usize) -> StorePlan {
        let entropy = SeededEntropy::from_u64(0x10AD_0000 + index as u64);
        let mut rng = entropy.stream("load-test");
        let owner = DeviceIdentity::generate(&mut rng);
        let ring = Keyring::create(owner, "device 0", Hlc::default(), &mut rng);
        let mut devices = Vec::with_capacity(DEVICES_PER_STORE);
        for d in 0..DEVICES_PER_STORE {
            let identity = DeviceIdentity::generate(&mut rng);
            let id = identity.device_id();
            let ctx = SealContext {
                store_id: ring.store_id,
                epoch: ring.current,
                data_key: ring.current_key(),
                signing_key: identity.signing_key(),
                signer: id,
            };
            let entries = (0..ENVELOPES_PER_DEVICE)
                .map(|i| {
                    let path = format!("load/{:03}", (d * PATH_STRIDE + i) % PATHS_PER_STORE);
                    let mut value = vec![0u8; VALUE_BYTES];
                    value[..8].copy_from_slice(&((d * 1000 + i) as u64).to_le_bytes());
                    let record = Record {
                        path,
                        value,
                        origin: id,
                        // Clocks that disagree across devices, so the
                        // winner of a path is not always the same device.
                        hlc: Hlc {
                            ms: 1_000 + ((d * 7 + i * 3) % 11) as u64,
                            counter: 0,
                        },
                    };
                    let locator = ring.index_key.locator(&ring.store_id, &record.path);
                    let envelope = envelope::seal(
                        &ctx,
                        &locator,
                        &record,
                        Flags::default(),
                        i as u64 + 1,
                        &mut rng,
                    )
                    .expect("seals");
                    PushEntry { locator, envelope }
                })
                .collect();
            devices.push(DevicePlan { id, entries });
        }
        StorePlan {
            store: ring.store_id,
            access: AccessKey::derive(&ring.relay_token, &ring.store_id),
            devices,
        }
    }

    fn hello(&self, device: DeviceId) -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            store: self.store,
            access: self.access.clone(),
            device,
            admission: None,
        })
    }

    /// What the store's log must hold: per locator, the envelope of highest
    /// precedence among everything its devices pushed.
    fn expected(&self) -> BTreeMap<Locator, Vec<u8>> {
        let mut best: BTreeMap<Locator, Vec<u8>> = BTreeMap::new();
        for entry in self.devices.iter().flat_map(|d| d.entries.iter()) {
            let precedence =
                |bytes: &[u8]| Envelope::parse(bytes).expect("parses").header.precedence();
            let newer = best
                .get(&entry.locator)
                .is_none_or(|held| precedence(&entry.envelope) > precedence(held));
            if newer {
                best.insert(entry.locator, entry.envelope.clone());
            }
        }
        best
    }
}

/// The relay binary, killed if the test ends without stopping it.
struct RelayProcess {
    child: Option<Child>,
    addr: SocketAddr,
    pin: CertPin,
}

impl RelayProcess {
    /// Starts `persist-relay` on a free loopback port and reads its start
    /// line: `persist-relay listening on <addr> pin sha256:<hex>`.
    fn spawn(data: &std::path::Path) -> RelayProcess {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawns persist-relay");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("a start line");
        let rest = line
            .trim_end()
            .strip_prefix("persist-relay listening on ")
            .unwrap_or_else(|| panic!("unexpected start line {line:?}"));
        let (addr, pin) = rest.split_once(" pin ").expect("a pin");
        RelayProcess {
            addr: addr.parse().expect("an address"),
            pin: pin.parse().expect("a pin"),
            child: Some(child),
        }
    }

    /// A field of the relay's `/proc/<pid>/status`, in KiB.
    fn status_kib(&self, field: &str) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// SIGTERM, then the relay must exit 0 within its shutdown grace.
    async fn stop_gracefully(mut self) {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let exit = within("the relay exits", async move {
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(exit.code(), Some(0), "the relay stops cleanly");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Awaits `fut`, failing the test after [`PHASE_TIMEOUT`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PHASE_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}
