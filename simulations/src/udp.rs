//! A simulated UDP network for the quic profile: sockets that quinn drives
//! through [`AsyncUdpSocket`], and seeded datagram faults between them.
//!
//! Every datagram a socket sends is decided on at once, under the
//! network's lock, with draws from the network's seeded RNG:
//! - **blocked**: the sender or the receiver is a partitioned device, or
//!   the relay while it is down, or a socket whose connection was cut;
//!   the datagram is dropped (as a dead link drops it: no error, no ICMP);
//! - **lost**: dropped with [`UdpFaults::loss_percent`] chance;
//! - **duplicated**: delivered twice with [`UdpFaults::duplicate_percent`];
//! - **delayed**: each copy waits a seeded 1..=[`UdpFaults::delay_ms_max`]
//!   ms with [`UdpFaults::delay_percent`] chance, on top of its socket's
//!   latency; datagrams overtake each other that way (reordering).
//!
//! A datagram due now goes straight into its receiver's queue; a delayed
//! one is carried by a task that sleeps on the paused clock. Each socket
//! has one reader (its quinn endpoint), so one waker.
//!
//! # Invariants
//! - The lock is never held across an `.await` or while waking a task.
//! - Draws happen in the order sends happen, which the single-threaded,
//!   paused runtime fixes: a seed replays the same fate for every
//!   datagram.
//! - A receive queue holds at most [`QUEUE_DATAGRAMS_MAX`] datagrams;
//!   more are dropped, as a full socket buffer drops them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use persist_transport::sim::{AsyncUdpSocket, RecvMeta, Transmit, UdpPoller};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Datagrams a socket's receive queue holds before it drops more (a
/// socket buffer's worth at QUIC's ~1200-byte packets).
pub const QUEUE_DATAGRAMS_MAX: usize = 1024;
/// The relay's address on the simulated network.
pub const RELAY_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 255, 1)), 7443);
/// The first port a device's sockets get (one socket per dial, as the
/// product's `persist_transport::connect` opens one per connect).
const DEVICE_PORT_FIRST: u16 = 40_000;

/// How often datagrams go astray while faults are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UdpFaults {
    /// Percent of datagrams lost.
    pub loss_percent: u32,
    /// Percent of datagrams delivered twice.
    pub duplicate_percent: u32,
    /// Percent of datagrams (each copy) delayed.
    pub delay_percent: u32,
    /// Longest extra delay, ms.
    pub delay_ms_max: u64,
}

impl UdpFaults {
    /// A clean network.
    pub const NONE: UdpFaults = UdpFaults {
        loss_percent: 0,
        duplicate_percent: 0,
        delay_percent: 0,
        delay_ms_max: 0,
    };

    /// The faults of a run's busy phase at the seed's `intensity` (0..=3,
    /// as `NetFaults::from_intensity`).
    pub fn from_intensity(intensity: u32) -> UdpFaults {
        if intensity == 0 {
            return UdpFaults::NONE;
        }
        UdpFaults {
            loss_percent: 3 * intensity,
            duplicate_percent: 2 * intensity,
            delay_percent: 10 * intensity,
            delay_ms_max: 200,
        }
    }

    /// These faults with only `loss_percent` set (tests).
    pub fn loss(percent: u32) -> UdpFaults {
        UdpFaults {
            loss_percent: percent,
            ..UdpFaults::NONE
        }
    }

    /// Every copy delayed by up to `ms_max` (tests).
    pub fn jitter(ms_max: u64) -> UdpFaults {
        UdpFaults {
            delay_percent: 100,
            delay_ms_max: ms_max,
            ..UdpFaults::NONE
        }
    }
}

/// Who owns a socket: what partitions and relay restarts act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// Device `n`.
    Device(usize),
    /// The relay.
    Relay,
}

/// The network. Cheap to clone.
#[derive(Clone)]
pub struct UdpNet {
    inner: Arc<Mutex<UdpState>>,
}

impl std::fmt::Debug for UdpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("UdpNet")
            .field("sockets", &state.sockets.len())
            .finish_non_exhaustive()
    }
}

struct UdpState {
    rng: ChaCha8Rng,
    faults: UdpFaults,
    sockets: BTreeMap<SocketAddr, Port>,
    next_id: u64,
    next_port: u16,
    partitioned: BTreeSet<usize>,
    relay_down: bool,
    /// Per device, every datagram's bytes it sent (up) and was sent
    /// (down), for the plaintext checker.
    wire: BTreeMap<usize, (Vec<u8>, Vec<u8>)>,
    fired: BTreeMap<&'static str, u64>,
    /// Datagrams delivered, by sender, in delivery order (tests).
    delivered: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    record_deliveries: bool,
}

/// One bound socket.
struct Port {
    id: u64,
    owner: Owner,
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
    /// Extra delay of everything this socket sends.
    latency: Duration,
    /// Bytes (both ways) after which this socket's link dies.
    cut_after: Option<u64>,
    moved: u64,
    cut: bool,
}

impl UdpNet {
    /// An empty network whose faults draw from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(UdpState {
                rng: ChaCha8Rng::seed_from_u64(seed),
                faults: UdpFaults::NONE,
                sockets: BTreeMap::new(),
                next_id: 0,
                next_port: DEVICE_PORT_FIRST,
                partitioned: BTreeSet::new(),
                relay_down: false,
                wire: BTreeMap::new(),
                fired: BTreeMap::new(),
                delivered: Vec::new(),
                record_deliveries: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, UdpState> {
        // Nothing panics while holding the lock.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Binds a socket for `owner`: the relay at [`RELAY_ADDR`] (replacing
    /// a previous incarnation's), a device at a fresh port of its own
    /// address. `latency` delays all it sends; after `cut_after` bytes
    /// its link dies.
    pub fn bind(&self, owner: Owner, latency: Duration, cut_after: Option<u64>) -> Arc<SimSocket> {
        let mut state = self.lock();
        let addr = match owner {
            Owner::Relay => RELAY_ADDR,
            Owner::Device(d) => {
                let port = state.next_port;
                state.next_port = state.next_port.checked_add(1).unwrap_or(DEVICE_PORT_FIRST);
                let d = u8::try_from(d + 1).unwrap_or(u8::MAX);
                SocketAddr::from(([10, 0, 0, d], port))
            }
        };
        let id = state.next_id;
        state.next_id += 1;
        state.sockets.insert(
            addr,
            Port {
                id,
                owner,
                queue: VecDeque::new(),
                waker: None,
                latency,
                cut_after,
                moved: 0,
                cut: false,
            },
        );
        Arc::new(SimSocket {
            net: self.clone(),
            addr,
            id,
        })
    }

    /// Sets the datagram faults from now on.
    pub fn set_faults(&self, faults: UdpFaults) {
        self.lock().faults = faults;
    }

    /// Drops every datagram from or to `device` (or lets them through).
    pub fn set_partitioned(&self, device: usize, partitioned: bool) {
        let mut state = self.lock();
        if partitioned {
            state.partitioned.insert(device);
        } else {
            state.partitioned.remove(&device);
        }
    }

    /// Drops every datagram from or to the relay (or lets them through).
    pub fn set_relay_down(&self, down: bool) {
        self.lock().relay_down = down;
    }

    /// Per device, the bytes of every datagram it sent and was sent.
    pub fn wire(&self) -> BTreeMap<usize, (Vec<u8>, Vec<u8>)> {
        self.lock().wire.clone()
    }

    /// Datagram fates so far, by kind.
    pub fn fired(&self) -> BTreeMap<&'static str, u64> {
        self.lock().fired.clone()
    }

    /// Records every delivered datagram from now on (tests).
    pub fn record_deliveries(&self) {
        self.lock().record_deliveries = true;
    }

    /// Every datagram delivered since [`UdpNet::record_deliveries`]:
    /// (from, to, bytes), in delivery order.
    pub fn delivered(&self) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        self.lock().delivered.clone()
    }

    /// Sends one datagram from socket `id` at `from`, deciding its fate.
    fn send(&self, id: u64, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        let mut deliveries: Vec<(Duration, Vec<u8>)> = Vec::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            let Some(src) = state.sockets.get(&from).filter(|p| p.id == id) else {
                count(&mut state.fired, "udp_from_closed_socket");
                return;
            };
            let (src_owner, latency) = (src.owner, src.latency);
            let dst_owner = state.sockets.get(&to).map(|p| p.owner);
            let blocked = |o: Option<Owner>| match o {
                Some(Owner::Device(d)) => state.partitioned.contains(&d),
                Some(Owner::Relay) => state.relay_down,
                None => false,
            };
            if blocked(Some(src_owner)) || blocked(dst_owner) {
                count(&mut state.fired, "udp_blocked");
                return;
            }
            // A cut link: the device's socket carried its share of bytes.
            let len = bytes.len() as u64;
            for addr in [from, to] {
                if let Some(port) = state.sockets.get_mut(&addr) {
                    if port.cut {
                        count(&mut state.fired, "udp_cut_link");
                        return;
                    }
                    port.moved += len;
                    if port.cut_after.is_some_and(|limit| port.moved >= limit) {
                        port.cut = true;
                        count(&mut state.fired, "connection_cut");
                        return;
                    }
                }
            }
            match (src_owner, dst_owner) {
                (Owner::Device(d), _) => state.wire.entry(d).or_default().0.extend(bytes),
                (_, Some(Owner::Device(d))) => state.wire.entry(d).or_default().1.extend(bytes),
                _ => {}
            }
            let f = state.faults;
            if chance(&mut state.rng, f.loss_percent) {
                count(&mut state.fired, "udp_lost");
                return;
            }
            let copies = if chance(&mut state.rng, f.duplicate_percent) {
                count(&mut state.fired, "udp_duplicated");
                2
            } else {
                1
            };
            for _ in 0..copies {
                let mut delay = latency;
                if f.delay_ms_max > 0 && chance(&mut state.rng, f.delay_percent) {
                    count(&mut state.fired, "udp_delayed");
                    delay += Duration::from_millis(1 + state.rng.next_u64() % f.delay_ms_max);
                }
                deliveries.push((delay, bytes.to_vec()));
            }
        }
        for (delay, bytes) in deliveries {
            if delay.is_zero() {
                self.deliver(from, to, bytes);
            } else {
                let net = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    net.deliver(from, to, bytes);
                });
            }
        }
    }

    /// Puts a datagram in `to`'s queue (if it is still bound and the link
    /// still up) and wakes its reader.
    fn deliver(&self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let waker = {
            let mut state = self.lock();
            let state = &mut *state;
            let blocked = |o: Owner| match o {
                Owner::Device(d) => state.partitioned.contains(&d),
                Owner::Relay => state.relay_down,
            };
            let Some(port) = state.sockets.get(&to) else {
                count(&mut state.fired, "udp_unreachable");
                return;
            };
            // The world may have changed while the datagram was in flight.
            let src_blocked = state.sockets.get(&from).is_some_and(|p| blocked(p.owner));
            if blocked(port.owner) || src_blocked || port.cut {
                count(&mut state.fired, "udp_blocked");
                return;
            }
            if port.queue.len() >= QUEUE_DATAGRAMS_MAX {
                count(&mut state.fired, "udp_queue_full");
                return;
            }
            if state.record_deliveries {
                state.delivered.push((from, to, bytes.clone()));
            }
            let Some(port) = state.sockets.get_mut(&to) else {
                return;
            };
            port.queue.push_back((from, bytes));
            port.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn unbind(&self, addr: SocketAddr, id: u64) {
        let mut state = self.lock();
        if state.sockets.get(&addr).is_some_and(|p| p.id == id) {
            state.sockets.remove(&addr);
        }
    }
}

fn count(fired: &mut BTreeMap<&'static str, u64>, kind: &'static str) {
    *fired.entry(kind).or_default() += 1;
}

fn chance(rng: &mut ChaCha8Rng, percent: u32) -> bool {
    percent > 0 && rng.next_u32() % 100 < percent
}

/// One socket of the simulated network, as quinn sees it.
#[derive(Debug)]
pub struct SimSocket {
    net: UdpNet,
    addr: SocketAddr,
    id: u64,
}

impl SimSocket {
    /// The socket's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one datagram (tests; quinn sends through `try_send`).
    pub fn send_to(&self, to: SocketAddr, bytes: &[u8]) {
        self.net.send(self.id, self.addr, to, bytes);
    }

    /// The next queued datagram, if any (tests; quinn reads through
    /// `poll_recv`).
    pub fn try_recv(&self) -> Option<(SocketAddr, Vec<u8>)> {
        let mut state = self.net.lock();
        state
            .sockets
            .get_mut(&self.addr)
            .filter(|p| p.id == self.id)
            .and_then(|p| p.queue.pop_front())
    }
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        self.net.unbind(self.addr, self.id);
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // One datagram per transmit (max_transmit_segments is 1), but
        // split by segment size should quinn ever batch.
        let size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for datagram in transmit.contents.chunks(size) {
            self.net
                .send(self.id, self.addr, transmit.destination, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.net.lock();
        let Some(port) = state
            .sockets
            .get_mut(&self.addr)
            .filter(|p| p.id == self.id)
        else {
            // Replaced by a newer incarnation: it hears nothing more.
            return Poll::Pending;
        };
        let mut n = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some((from, bytes)) = port.queue.pop_front() else {
                break;
            };
            let len = bytes.len().min(buf.len());
            buf[..len].copy_from_slice(&bytes[..len]);
            *meta = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n == 0 {
            port.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn may_fragment(&self) -> bool {
        // Datagrams arrive whole: quinn may probe for a larger MTU.
        false
    }
}

/// Sending never blocks: a full receive queue drops, as UDP does.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(seed: u64, faults: UdpFaults, n: usize) -> (UdpNet, Vec<Vec<u8>>) {
        let rt = crate::harness::paused_runtime().expect("runtime");
        rt.block_on(async {
            let net = UdpNet::new(seed);
            net.set_faults(faults);
            net.record_deliveries();
            let a = net.bind(Owner::Device(0), Duration::ZERO, None);
            let b = net.bind(Owner::Relay, Duration::ZERO, None);
            for i in 0..n {
                a.send_to(b.addr(), &(i as u32).to_be_bytes());
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
            let mut got = Vec::new();
            while let Some((from, bytes)) = b.try_recv() {
                assert_eq!(from, a.addr());
                got.push(bytes);
            }
            (net, got)
        })
    }

    #[test]
    fn a_clean_network_delivers_everything_in_order() {
        let (_, got) = exchange(1, UdpFaults::NONE, 100);
        let want: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn loss_drawn_from_the_seed_drops_datagrams() {
        let (net, got) = exchange(2, UdpFaults::loss(30), 1000);
        let lost = net.fired().get("udp_lost").copied().unwrap_or(0);
        assert!((200..400).contains(&lost), "30% of 1000 lost, got {lost}");
        assert_eq!(got.len() as u64, 1000 - lost, "every lost one is missing");
    }

    #[test]
    fn jitter_reorders_and_the_seed_fixes_the_order() {
        let (_, first) = exchange(3, UdpFaults::jitter(50), 200);
        let (_, again) = exchange(3, UdpFaults::jitter(50), 200);
        let (_, other) = exchange(4, UdpFaults::jitter(50), 200);
        assert_eq!(first.len(), 200, "delay loses nothing");
        let mut sorted = first.clone();
        sorted.sort();
        assert_ne!(first, sorted, "datagrams overtook each other");
        assert_eq!(first, again, "the same seed, the same delivery order");
        assert_ne!(first, other, "another seed, another order");
    }

    #[test]
    fn duplication_delivers_twice() {
        let faults = UdpFaults {
            duplicate_percent: 50,
            ..UdpFaults::NONE
        };
        let (net, got) = exchange(5, faults, 200);
        let dups = net.fired().get("udp_duplicated").copied().unwrap_or(0);
        assert!(dups > 50, "about half duplicated, got {dups}");
        assert_eq!(got.len() as u64, 200 + dups);
    }

    #[test]
    fn partitions_and_a_down_relay_drop_everything() {
        let rt = crate::harness::paused_runtime().expect("runtime");
        rt.block_on(async {
            let net = UdpNet::new(6);
            let a = net.bind(Owner::Device(0), Duration::ZERO, None);
            let r = net.bind(Owner::Relay, Duration::ZERO, None);
            net.set_partitioned(0, true);
            a.send_to(r.addr(), b"x");
            assert!(r.try_recv().is_none(), "partitioned device reaches no one");
            net.set_partitioned(0, false);
            net.set_relay_down(true);
            a.send_to(r.addr(), b"y");
            r.send_to(a.addr(), b"z");
            assert!(r.try_recv().is_none() && a.try_recv().is_none());
            net.set_relay_down(false);
            a.send_to(r.addr(), b"w");
            assert_eq!(r.try_recv().map(|(_, b)| b), Some(b"w".to_vec()));
        });
    }

    #[test]
    fn a_cut_link_dies_after_its_bytes() {
        let rt = crate::harness::paused_runtime().expect("runtime");
        rt.block_on(async {
            let net = UdpNet::new(7);
            let a = net.bind(Owner::Device(0), Duration::ZERO, Some(10));
            let r = net.bind(Owner::Relay, Duration::ZERO, None);
            a.send_to(r.addr(), b"1234");
            a.send_to(r.addr(), b"5678");
            a.send_to(r.addr(), b"9abc");
            r.send_to(a.addr(), b"back");
            assert_eq!(r.try_recv().map(|(_, b)| b), Some(b"1234".to_vec()));
            assert_eq!(r.try_recv().map(|(_, b)| b), Some(b"5678".to_vec()));
            assert!(r.try_recv().is_none() && a.try_recv().is_none());
        });
    }
}
