//! The simulated network: every device reaches one in-memory relay through
//! a seeded, faulty, tapped pipe.
//!
//! A device's store dials through [`DeviceDial`] (given to it with
//! `Config::dangerous().sync_via`). Each dial, if the device is not
//! partitioned and the relay is up, makes two in-memory pipes joined by two
//! pump tasks (one per direction) and starts the relay's own session code
//! (`persist_relay::serve`) on the far end, over a shared
//! [`MemoryRelay`]. The pumps are where faults happen and where every byte
//! is tapped for the checkers.
//!
//! # Faults (drawn from the seed, per connection)
//! - **dial delay**: the dial sleeps on the paused clock before answering.
//! - **latency**: each chunk a pump moves waits before it is delivered.
//! - **cut**: after a seeded number of bytes (both ways together) the
//!   connection is killed mid-stream: the pumps and the relay session stop
//!   and both ends see the pipe close, exactly as a dropped connection.
//! - **partition**: a partitioned device's dials fail and its open
//!   connections are killed, until healed.
//! - **relay down**: the relay's sessions are all killed and dials fail
//!   until it is up again; its stored state (the [`MemoryRelay`]) is kept,
//!   as a relay restarting on its database.
//!
//! # A forging relay
//! In half the runs (drawn from the seed, on its own stream) the relay
//! also forges while the run's faults are on: in front of or right after a
//! seeded share of the entries it serves, it puts one it made up for the
//! same locator and sequence number — the genuine envelope with one bit flipped
//! (header, ciphertext, tag or signature alike), cut short, another
//! locator's envelope moved here, or an older envelope of this locator
//! replayed. The genuine entries are all served too, so a device that
//! refuses every forgery still converges. The forgeries (all but replays, which are
//! genuine bytes that last-write-wins must order) are kept for the
//! `tampered_never_applied` checker, which looks for them among every
//! device's stored and held rows at the end.
//!
//! Within a stream bytes stay in order (the protocol needs it, as QUIC
//! gives it). Duplication happens the way it does in the product: a push
//! cut before its acknowledgement is pushed again after the reconnect.
//!
//! # Profiles
//! The in-memory profile ([`SimNet::new`]) is the pipes above. The quic
//! profile ([`SimNet::quic`]) carries each dial over a real QUIC
//! connection on a simulated UDP network instead ([`crate::quicnet`]):
//! the same draws per dial, the dial delay the same, the latency a delay
//! of every datagram of that connection, the cut the death of its link
//! after that many datagram bytes, partitions and a down relay dropped
//! datagrams (and refused dials, as here), and datagrams lost, duplicated
//! and reordered besides ([`crate::udp`]). Connections then end as QUIC
//! ends them: by idle timeout, or by the peer's close or stateless reset.
//!
//! # Invariants
//! - The state lock is never held across an `.await`.
//! - Every draw from the network's RNG happens in an order fixed by the
//!   (single-threaded, paused) runtime, so a seed replays the same faults.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use persist::{DeviceId, StoreId};
use persist_core::Locator;
use persist_core::protocol::{LogEntry, MailboxItem};
use persist_storage::relay::{
    Appended, Incoming, MemoryRelay, Page, RelayBackend, RelayError, RelayStats, StoreAccess,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::task::AbortHandle;

use crate::quicnet::QuicNet;
use crate::udp::UdpFaults;

/// Bytes each in-memory pipe buffers per direction.
const PIPE_BYTES: usize = 64 * 1024;
/// Bytes a pump moves per chunk.
const CHUNK_BYTES: usize = 16 * 1024;

/// How often and how hard the network misbehaves while faults are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetFaults {
    /// Percent of dials that are delayed.
    pub dial_delay_percent: u32,
    /// Longest dial delay, ms.
    pub dial_delay_ms_max: u64,
    /// Percent of connections with per-chunk latency.
    pub latency_percent: u32,
    /// Longest per-chunk latency, ms.
    pub latency_ms_max: u64,
    /// Percent of connections cut mid-stream.
    pub cut_percent: u32,
    /// Most bytes a cut connection carries before it is cut.
    pub cut_after_bytes_max: u64,
    /// Datagram faults (quic profile only).
    pub udp: UdpFaults,
}

impl NetFaults {
    /// No faults: what the quiet phase at the end of a run uses.
    pub const NONE: NetFaults = NetFaults {
        dial_delay_percent: 0,
        dial_delay_ms_max: 0,
        latency_percent: 0,
        latency_ms_max: 0,
        cut_percent: 0,
        cut_after_bytes_max: 0,
        udp: UdpFaults::NONE,
    };

    /// The faults of a run's busy phase, scaled by the seed's `intensity`
    /// (0..=3, 0 meaning none): FoundationDB's "buggify" switches whole
    /// classes of faults on per run rather than sprinkling all of them
    /// into every run.
    pub fn from_intensity(intensity: u32) -> NetFaults {
        if intensity == 0 {
            return NetFaults::NONE;
        }
        NetFaults {
            dial_delay_percent: 10 * intensity,
            dial_delay_ms_max: 2_000,
            latency_percent: 10 * intensity,
            latency_ms_max: 300,
            cut_percent: 10 * intensity,
            cut_after_bytes_max: 20_000,
            udp: UdpFaults::from_intensity(intensity),
        }
    }
}

/// Everything that crossed one connection, each direction in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TappedConn {
    /// The device that dialled.
    pub device: usize,
    /// Device → relay bytes.
    pub up: Vec<u8>,
    /// Relay → device bytes.
    pub down: Vec<u8>,
}

/// The network every device of a run shares. Cheap to clone.
#[derive(Clone)]
pub struct SimNet {
    inner: Arc<Mutex<NetState>>,
    relay: Arc<SimRelay>,
    /// The quic profile's network; `None` in the in-memory profile.
    quic: Option<Arc<QuicNet>>,
}

/// The relay's storage, with a switch that drops every mailbox item (so
/// that key parcels never arrive: a sabotage the checkers must catch), and
/// the forger in front of what it serves.
struct SimRelay {
    store: MemoryRelay,
    drop_mail: std::sync::atomic::AtomicBool,
    forger: Mutex<Forger>,
}

/// Where an envelope's header names its signer (see
/// `persist_core::envelope`).
const SIGNER_BYTES: std::ops::Range<usize> = 33..49;

/// Most genuine envelopes kept per locator for replays.
const SERVED_KEPT: usize = 2;

/// A forgery the relay served.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forged {
    /// The locator it was served for.
    pub locator: Locator,
    /// Its bytes.
    pub envelope: Vec<u8>,
    /// How it was made (`forged_flip`, `forged_signer` for a flip in the
    /// signer's id, `forged_cut`, `forged_moved`, or `forged_copy` under
    /// the sabotage).
    pub kind: &'static str,
}

/// What the relay forges (see "A forging relay" in the module docs).
struct Forger {
    rng: ChaCha8Rng,
    /// Percent of served entries that get a forgery in front, when active.
    percent: u32,
    /// Whether the run's faults are on (forgeries are one of them).
    active: bool,
    /// The sabotage: forgeries are exact copies of the genuine entry, as
    /// a forgery the product could not detect would be.
    copies: bool,
    /// Per locator, the last genuine envelopes served (for replays).
    served: BTreeMap<Locator, Vec<Vec<u8>>>,
    forged: BTreeSet<Forged>,
    fired: BTreeMap<&'static str, u64>,
}

impl Forger {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(FORGER_STREAM);
        let percent = if rng.next_u32().is_multiple_of(2) {
            5 + rng.next_u32() % 21
        } else {
            0
        };
        Self {
            rng,
            percent,
            active: false,
            copies: false,
            served: BTreeMap::new(),
            forged: BTreeSet::new(),
            fired: BTreeMap::new(),
        }
    }

    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n.max(1) as u64) as usize
    }

    /// `entries` with forgeries put beside some, as served now.
    fn serve(&mut self, entries: Vec<LogEntry>) -> Vec<LogEntry> {
        let on = self.active && self.percent > 0;
        let mut out = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            if on && (self.rng.next_u32() % 100) < self.percent {
                let other = (entries.len() > 1).then(|| {
                    let j = (i + 1 + self.below(entries.len() - 1)) % entries.len();
                    &entries[j].envelope
                });
                // In front of the genuine entry or right after it: a
                // forgery must neither keep it out nor replace it.
                let after = self.rng.next_u32().is_multiple_of(2);
                if let Some(forgery) = self.forge(entry, other) {
                    if after {
                        out.push(entry.clone());
                        out.push(forgery);
                    } else {
                        out.push(forgery);
                        out.push(entry.clone());
                    }
                } else {
                    out.push(entry.clone());
                }
            } else {
                out.push(entry.clone());
            }
            let kept = self.served.entry(entry.locator).or_default();
            if kept.last() != Some(&entry.envelope) {
                kept.push(entry.envelope.clone());
                if kept.len() > SERVED_KEPT {
                    kept.remove(0);
                }
            }
        }
        out
    }

    /// One forgery for `entry`, `other` another entry's envelope of the
    /// same page.
    fn forge(&mut self, entry: &LogEntry, other: Option<&Vec<u8>>) -> Option<LogEntry> {
        let genuine = &entry.envelope;
        let (kind, envelope) = if self.copies {
            ("forged_copy", genuine.clone())
        } else {
            match self.below(4) {
                1 if genuine.len() > 1 => {
                    let len = self.below(genuine.len());
                    ("forged_cut", genuine[..len].to_vec())
                }
                2 if other.is_some_and(|o| o != genuine) => {
                    ("forged_moved", other.cloned().unwrap_or_default())
                }
                3 => {
                    let older = self
                        .served
                        .get(&entry.locator)
                        .and_then(|kept| kept.iter().find(|e| *e != genuine))
                        .cloned()?;
                    *self.fired.entry("relay_replayed").or_default() += 1;
                    return Some(LogEntry {
                        seq: entry.seq,
                        locator: entry.locator,
                        envelope: older,
                    });
                }
                _ => {
                    let bit = self.below(genuine.len() * 8);
                    let mut flipped = genuine.clone();
                    flipped[bit / 8] ^= 1 << (bit % 8);
                    // A flip in the signer's id names a device no member
                    // knows, whose signature cannot be checked: the one
                    // forgery a device holds (while it lacks the epoch's
                    // key, whose tag then refuses it) rather than refuses
                    // at once.
                    let kind = if SIGNER_BYTES.contains(&(bit / 8)) {
                        "forged_signer"
                    } else {
                        "forged_flip"
                    };
                    (kind, flipped)
                }
            }
        };
        *self.fired.entry(kind).or_default() += 1;
        self.forged.insert(Forged {
            locator: entry.locator,
            envelope: envelope.clone(),
            kind,
        });
        Some(LogEntry {
            seq: entry.seq,
            locator: entry.locator,
            envelope,
        })
    }
}

/// The forger's ChaCha stream of the network's seed (the faults draw from
/// stream 0), so that it draws nothing the rest of the network does.
const FORGER_STREAM: u64 = 1;

impl RelayBackend for SimRelay {
    async fn open_store(
        &self,
        store: &StoreId,
        fingerprint: &[u8; 32],
        may_create: bool,
    ) -> Result<StoreAccess, RelayError> {
        self.store.open_store(store, fingerprint, may_create).await
    }

    async fn append(
        &self,
        store: &StoreId,
        entries: Vec<Incoming>,
    ) -> Result<Appended, RelayError> {
        self.store.append(store, entries).await
    }

    async fn pull(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> Result<Page, RelayError> {
        let mut page = self.store.pull(store, since, limit, bytes_target).await?;
        page.entries = lock(&self.forger).serve(page.entries);
        Ok(page)
    }

    async fn head(&self, store: &StoreId) -> Result<u64, RelayError> {
        self.store.head(store).await
    }

    fn watch(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.store.watch(store)
    }

    async fn mailbox_put(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        payload: Vec<u8>,
    ) -> Result<u64, RelayError> {
        if self.drop_mail.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(0);
        }
        self.store.mailbox_put(store, mailbox, payload).await
    }

    async fn mailbox_fetch(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<MailboxItem>, RelayError> {
        self.store.mailbox_fetch(store, mailbox, since, limit).await
    }

    async fn mailbox_ack(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        upto: u64,
    ) -> Result<(), RelayError> {
        self.store.mailbox_ack(store, mailbox, upto).await
    }

    async fn stats(&self) -> Result<RelayStats, RelayError> {
        self.store.stats().await
    }

    async fn rekey(
        &self,
        store: &StoreId,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> Result<(), RelayError> {
        self.store.rekey(store, old, new).await
    }

    fn access_changes(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
        self.store.access_changes(store)
    }
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("SimNet")
            .field("relay_up", &state.relay_up)
            .field("partitioned", &state.partitioned)
            .field("connections", &state.tapped.len())
            .finish_non_exhaustive()
    }
}

struct NetState {
    rng: ChaCha8Rng,
    faults: NetFaults,
    relay_up: bool,
    partitioned: Vec<bool>,
    /// Per connection (index = connection id): what crossed it.
    tapped: Vec<TappedConn>,
    /// Open connections: id → (device, the tasks that keep it alive).
    live: BTreeMap<usize, (usize, Vec<AbortHandle>)>,
    /// Faults that fired, by kind.
    fired: BTreeMap<&'static str, u64>,
}

impl SimNet {
    /// A network of `devices` devices around an empty relay, its faults
    /// drawn from `seed`.
    pub fn new(seed: u64, devices: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(NetState {
                rng: ChaCha8Rng::seed_from_u64(seed),
                faults: NetFaults::NONE,
                relay_up: true,
                partitioned: vec![false; devices],
                tapped: Vec::new(),
                live: BTreeMap::new(),
                fired: BTreeMap::new(),
            })),
            relay: Arc::new(SimRelay {
                store: MemoryRelay::new(),
                drop_mail: std::sync::atomic::AtomicBool::new(false),
                forger: Mutex::new(Forger::new(seed)),
            }),
            quic: None,
        }
    }

    /// The quic profile: as [`SimNet::new`], but each dial is a QUIC
    /// connection over a simulated UDP network (see "Profiles"). Starts
    /// the relay's endpoint, so it must run inside the run's runtime.
    pub fn quic(seed: u64, devices: usize) -> Result<Self, String> {
        let mut net = Self::new(seed, devices);
        let quic = Arc::new(QuicNet::new(seed)?);
        quic.start_relay(net.relay.clone())?;
        net.quic = Some(quic);
        Ok(net)
    }

    /// Per device, the bytes of every datagram it sent and was sent (quic
    /// profile; empty in memory): what the plaintext checker also scans.
    pub fn wire(&self) -> Vec<(String, Vec<u8>)> {
        let Some(quic) = &self.quic else {
            return Vec::new();
        };
        quic.udp
            .wire()
            .into_iter()
            .flat_map(|(d, (up, down))| {
                [
                    (format!("datagrams of device {d} (up)"), up),
                    (format!("datagrams of device {d} (down)"), down),
                ]
            })
            .collect()
    }

    /// Starts tapping a new connection of `device`; returns its index.
    fn new_tap(&self, device: usize) -> usize {
        let mut state = self.lock();
        state.tapped.push(TappedConn {
            device,
            ..TappedConn::default()
        });
        state.tapped.len() - 1
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        lock(&self.inner)
    }

    /// The dial device `device` syncs through.
    pub fn dial_for(&self, device: usize) -> Arc<dyn persist::Dial> {
        Arc::new(DeviceDial {
            net: self.clone(),
            device,
        })
    }

    /// The relay's storage, kept across relay restarts.
    pub fn relay(&self) -> &MemoryRelay {
        &self.relay.store
    }

    /// From now on the relay drops every mailbox item: no key parcel
    /// reaches a device, which then learns new keys only from exports.
    pub fn drop_mail(&self) {
        self.relay
            .drop_mail
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the relay forges this run (its share drawn from the seed).
    pub fn forges(&self) -> bool {
        lock(&self.relay.forger).percent > 0
    }

    /// Lets the relay forge (as the seed drew) while `on`: the run's
    /// faults are on.
    pub fn set_forging(&self, on: bool) {
        lock(&self.relay.forger).active = on;
    }

    /// The sabotage of the `tampered_never_applied` checker: from now on
    /// the relay puts an exact copy of every entry it serves in front of
    /// it and counts it as a forgery, as one the product could not tell
    /// from the genuine would be.
    pub fn forge_copies(&self) {
        let mut forger = lock(&self.relay.forger);
        forger.copies = true;
        forger.percent = 100;
        forger.active = true;
    }

    /// Forgeries served whose signer no member knows: a device may hold
    /// each (once) while it lacks the key of its epoch.
    pub fn forged_signers(&self) -> u64 {
        lock(&self.relay.forger)
            .fired
            .get("forged_signer")
            .copied()
            .unwrap_or(0)
    }

    /// Every forgery the relay served (not its replays).
    pub fn forgeries(&self) -> Vec<Forged> {
        lock(&self.relay.forger).forged.iter().cloned().collect()
    }

    /// Sets the per-connection faults for dials from now on.
    pub fn set_faults(&self, faults: NetFaults) {
        self.lock().faults = faults;
        if let Some(quic) = &self.quic {
            quic.udp.set_faults(faults.udp);
        }
    }

    /// Cuts `device` off: its dials fail and its connections die.
    pub fn partition(&self, device: usize) {
        let doomed = {
            let mut state = self.lock();
            state.partitioned[device] = true;
            state.count("partition");
            state.take_live(|d| d == device)
        };
        kill(doomed);
        if let Some(quic) = &self.quic {
            quic.udp.set_partitioned(device, true);
        }
    }

    /// Lets `device` reach the relay again.
    pub fn heal(&self, device: usize) {
        self.lock().partitioned[device] = false;
        if let Some(quic) = &self.quic {
            quic.udp.set_partitioned(device, false);
        }
    }

    /// Whether `device` is cut off.
    pub fn is_partitioned(&self, device: usize) -> bool {
        self.lock().partitioned[device]
    }

    /// Stops the relay: every session dies, dials fail. Its data stays.
    pub fn relay_down(&self) {
        let doomed = {
            let mut state = self.lock();
            state.relay_up = false;
            state.count("relay_restart");
            state.take_live(|_| true)
        };
        kill(doomed);
        if let Some(quic) = &self.quic {
            quic.stop_relay();
        }
    }

    /// Starts the relay again on the data it had.
    pub fn relay_up(&self) {
        self.lock().relay_up = true;
        self.start_quic_relay();
    }

    /// Binds the quic profile's relay endpoint again, if it is down.
    fn start_quic_relay(&self) {
        if let Some(quic) = &self.quic
            && let Err(e) = quic.start_relay(self.relay.clone())
        {
            // Binding on the simulated network cannot fail but for a
            // TLS config error, which the first start would have shown.
            self.lock().count("relay_start_failed");
            debug_assert!(false, "the simulated relay did not start again: {e}");
        }
    }

    /// Whether the relay is up.
    pub fn is_relay_up(&self) -> bool {
        self.lock().relay_up
    }

    /// Heals every partition and starts the relay; faults off.
    pub fn calm(&self) {
        let devices = {
            let mut state = self.lock();
            state.faults = NetFaults::NONE;
            state.relay_up = true;
            for p in &mut state.partitioned {
                *p = false;
            }
            state.partitioned.len()
        };
        if let Some(quic) = &self.quic {
            quic.udp.set_faults(UdpFaults::NONE);
            for d in 0..devices {
                quic.udp.set_partitioned(d, false);
            }
        }
        self.start_quic_relay();
    }

    /// Every connection's bytes so far.
    pub fn tapped(&self) -> Vec<TappedConn> {
        self.lock().tapped.clone()
    }

    /// Adds bytes to the tap as if a connection of `device` carried them
    /// up. Only for the negative tests of the checkers.
    pub fn inject_tapped(&self, device: usize, bytes: &[u8]) {
        self.lock().tapped.push(TappedConn {
            device,
            up: bytes.to_vec(),
            down: Vec::new(),
        });
    }

    /// Faults that fired, by kind.
    pub fn fired(&self) -> BTreeMap<&'static str, u64> {
        let mut fired = self.lock().fired.clone();
        for (kind, n) in &lock(&self.relay.forger).fired {
            *fired.entry(kind).or_default() += n;
        }
        if let Some(quic) = &self.quic {
            for (kind, n) in quic.udp.fired() {
                *fired.entry(kind).or_default() += n;
            }
        }
        fired
    }

    /// Connections made so far.
    pub fn connections(&self) -> usize {
        self.lock().tapped.len()
    }

    /// Opens one connection for `device`, or says why not.
    async fn dial(&self, device: usize) -> Result<persist::Conversation, String> {
        let (delay_ms, latency_ms, cut_after) = {
            let mut state = self.lock();
            if !state.relay_up {
                state.count("dial_refused_relay_down");
                return Err("simulated: the relay is down".into());
            }
            if state.partitioned[device] {
                state.count("dial_refused_partition");
                return Err("simulated: this device is partitioned from the relay".into());
            }
            let f = state.faults;
            let delay = state.draw(f.dial_delay_percent, f.dial_delay_ms_max);
            let latency = state.draw(f.latency_percent, f.latency_ms_max);
            let cut = state.draw(f.cut_percent, f.cut_after_bytes_max);
            if delay.is_some() {
                state.count("dial_delay");
            }
            if latency.is_some() {
                state.count("latency");
            }
            (delay, latency, cut)
        };
        if let Some(ms) = delay_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            // The world may have changed while the dial was in flight.
            let state = self.lock();
            if !state.relay_up || state.partitioned[device] {
                return Err("simulated: the relay went away during the dial".into());
            }
        }
        if let Some(quic) = &self.quic {
            return self.dial_quic(quic, device, latency_ms, cut_after).await;
        }
        let (client, client_far) = tokio::io::duplex(PIPE_BYTES);
        let (server_far, server) = tokio::io::duplex(PIPE_BYTES);
        let id = self.new_tap(device);
        let (server_read, server_write) = tokio::io::split(server);
        let relay = self.relay.clone();
        let session = tokio::spawn(async move {
            let ctx = persist_relay::SessionContext::new(persist_relay::Admission::Open);
            let tx = persist_transport::FrameSender::new(
                Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>
            );
            let rx = persist_transport::FrameReceiver::new(
                Box::new(server_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>
            );
            persist_relay::serve(&*relay, &ctx, tx, rx).await;
        });
        let (cf_read, cf_write) = tokio::io::split(client_far);
        let (sf_read, sf_write) = tokio::io::split(server_far);
        let shared = Pump {
            net: self.clone(),
            id,
            latency: latency_ms.map(Duration::from_millis),
            cut_after,
        };
        let up = tokio::spawn(shared.clone().run(cf_read, sf_write, Direction::Up));
        let down = tokio::spawn(shared.run(sf_read, cf_write, Direction::Down));
        self.lock().live.insert(
            id,
            (
                device,
                vec![
                    session.abort_handle(),
                    up.abort_handle(),
                    down.abort_handle(),
                ],
            ),
        );
        let (read, write) = tokio::io::split(client);
        Ok(persist::Conversation {
            read: Box::new(read),
            write: Box::new(write),
        })
    }
}

impl SimNet {
    /// The quic profile's dial: a tapped QUIC connection (see
    /// [`crate::quicnet`]).
    async fn dial_quic(
        &self,
        quic: &QuicNet,
        device: usize,
        latency_ms: Option<u64>,
        cut_after: Option<u64>,
    ) -> Result<persist::Conversation, String> {
        let id = self.new_tap(device);
        let net = self.clone();
        let tap: crate::quicnet::Tap = Arc::new(move |up: bool, bytes: &[u8]| {
            let mut state = net.lock();
            let conn = &mut state.tapped[id];
            if up {
                conn.up.extend_from_slice(bytes);
            } else {
                conn.down.extend_from_slice(bytes);
            }
        });
        let latency = Duration::from_millis(latency_ms.unwrap_or(0));
        quic.dial(device, latency, cut_after, tap).await
    }
}

impl NetState {
    fn count(&mut self, kind: &'static str) {
        *self.fired.entry(kind).or_default() += 1;
    }

    /// With `percent` chance, a value in `1..=max`.
    fn draw(&mut self, percent: u32, max: u64) -> Option<u64> {
        if percent == 0 || max == 0 || self.rng.next_u32() % 100 >= percent {
            return None;
        }
        Some(1 + self.rng.next_u64() % max)
    }

    fn take_live(&mut self, which: impl Fn(usize) -> bool) -> Vec<AbortHandle> {
        let ids: Vec<usize> = self
            .live
            .iter()
            .filter(|(_, (device, _))| which(*device))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.live.remove(&id))
            .flat_map(|(_, handles)| handles)
            .collect()
    }
}

/// Stops a connection's tasks; dropping their pipe ends closes the pipes,
/// so the device sees the connection end.
fn kill(handles: Vec<AbortHandle>) {
    for handle in handles {
        handle.abort();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

/// One direction of one connection.
#[derive(Clone)]
struct Pump {
    net: SimNet,
    id: usize,
    latency: Option<Duration>,
    /// Bytes (both directions) after which the connection is cut.
    cut_after: Option<u64>,
}

impl Pump {
    async fn run(
        self,
        mut from: ReadHalf<DuplexStream>,
        mut to: WriteHalf<DuplexStream>,
        dir: Direction,
    ) {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    // A half-close travels on: the far end sees the end.
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            };
            let (keep, cut) = self.tap(dir, &buf[..n]);
            if let Some(latency) = self.latency {
                tokio::time::sleep(latency).await;
            }
            if to.write_all(&buf[..keep]).await.is_err() {
                return;
            }
            if cut {
                let doomed = {
                    let mut state = self.net.lock();
                    state.count("connection_cut");
                    state.take_live_id(self.id)
                };
                kill(doomed);
                return;
            }
        }
    }

    /// Records `chunk` and says how much of it passes, and whether the
    /// connection is cut after it.
    fn tap(&self, dir: Direction, chunk: &[u8]) -> (usize, bool) {
        let mut state = self.net.lock();
        let conn = &mut state.tapped[self.id];
        let moved = (conn.up.len() + conn.down.len()) as u64;
        let (keep, cut) = match self.cut_after {
            Some(limit) if moved + chunk.len() as u64 >= limit => (
                usize::try_from(limit.saturating_sub(moved)).unwrap_or(0),
                true,
            ),
            _ => (chunk.len(), false),
        };
        let keep = keep.min(chunk.len());
        match dir {
            Direction::Up => conn.up.extend_from_slice(&chunk[..keep]),
            Direction::Down => conn.down.extend_from_slice(&chunk[..keep]),
        }
        (keep, cut)
    }
}

impl NetState {
    fn take_live_id(&mut self, id: usize) -> Vec<AbortHandle> {
        self.live.remove(&id).map(|(_, h)| h).unwrap_or_default()
    }
}

/// How one device dials: through the shared [`SimNet`].
struct DeviceDial {
    net: SimNet,
    device: usize,
}

impl persist::Dial for DeviceDial {
    fn dial(&self) -> persist::DialFuture<'_> {
        Box::pin(self.net.dial(self.device))
    }
}

/// Locks `m`. No code panics while holding one of the network's locks, so
/// a poisoned lock still holds consistent state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
