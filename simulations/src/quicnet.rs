//! The quic profile of the simulated network: devices reach the relay
//! over real quinn connections — the product's own endpoints, TLS configs,
//! ALPN and certificate pinning from `persist_transport` — on the seeded
//! UDP network of [`crate::udp`], every QUIC and TLS secret seeded
//! (`persist_transport::sim`).
//!
//! The relay is a quinn server endpoint at [`RELAY_ADDR`] whose
//! connections each serve their streams with the relay's own session code
//! (`persist_relay::serve`) over the run's relay storage, as
//! `persist-relay`'s node does. A relay restart drops its endpoint (and
//! every connection with it, silently: the relay is down, so even its
//! close packets are lost) and binds a new one on the same address with
//! the same seeded certificate, on the same storage.
//!
//! A device's dial opens a fresh client endpoint (a new port, as the
//! product's `persist_transport::connect` does), connects with the
//! relay's pin, opens one stream and hands its bytes to the engine, which
//! frames them itself. The stream's bytes are tapped in the clear for the
//! frame checkers where they arrive — device to relay as the relay reads
//! them, relay to device as the device reads them — so the tap holds what
//! crossed, as the in-memory profile's pumps record it (bytes written
//! into a connection that then died never arrived, and a checker must not
//! count them as pushed). The datagrams themselves are tapped by the UDP
//! network.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use persist_storage::relay::RelayBackend;
use persist_transport::frame::{BoxRead, BoxWrite};
use persist_transport::sim::SimQuic;
use persist_transport::tls::{CertPin, DEFAULT_SERVER_NAME};
use persist_transport::{Connection, Server, Trust};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::{AbortHandle, JoinSet};

pub use crate::udp::RELAY_ADDR;
use crate::udp::{Owner, UdpNet};

/// The quic profile's half of a `SimNet`: the UDP network, the seeded
/// QUIC secrets and the relay's endpoint.
pub(crate) struct QuicNet {
    pub(crate) udp: UdpNet,
    sim: SimQuic,
    identity: persist_transport::ServerIdentity,
    pin: CertPin,
    /// The running relay endpoint's accept task; `None` while down.
    relay: Mutex<Option<AbortHandle>>,
    /// Per dial, by the device socket's address (unique: one per dial),
    /// where the relay side taps what it reads.
    taps: Arc<Mutex<BTreeMap<SocketAddr, Tap>>>,
}

impl QuicNet {
    /// The network and secrets of a run from `seed`; the relay is not
    /// started yet.
    pub(crate) fn new(seed: u64) -> Result<Self, String> {
        let mut quic_seed = [0u8; 32];
        quic_seed[..8].copy_from_slice(&seed.to_le_bytes());
        quic_seed[8..16].copy_from_slice(b"quic sim");
        let sim = SimQuic::new(quic_seed);
        let identity = sim
            .identity()
            .map_err(|e| format!("simulated relay identity: {e}"))?;
        Ok(Self {
            udp: UdpNet::new(seed ^ 0x7564_705f_6e65_7473),
            pin: identity.pin(),
            identity,
            sim,
            relay: Mutex::new(None),
            taps: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<AbortHandle>> {
        lock(&self.relay)
    }

    /// Starts the relay's endpoint on `backend` if it is not running.
    /// Must run inside the run's runtime.
    pub(crate) fn start_relay<B: RelayBackend>(&self, backend: Arc<B>) -> Result<(), String> {
        let mut relay = self.lock();
        if relay.is_some() {
            return Ok(());
        }
        self.udp.set_relay_down(false);
        let socket = self.udp.bind(Owner::Relay, Duration::ZERO, None);
        let server = self
            .sim
            .server(socket, &self.identity)
            .map_err(|e| format!("simulated relay endpoint: {e}"))?;
        *relay = Some(tokio::spawn(accept(server, backend, self.taps.clone())).abort_handle());
        Ok(())
    }

    /// Stops the relay: its datagrams are dropped from now on, and its
    /// endpoint and every connection go away.
    pub(crate) fn stop_relay(&self) {
        self.udp.set_relay_down(true);
        if let Some(task) = self.lock().take() {
            task.abort();
        }
    }

    /// One QUIC connection and stream from `device` to the relay, its
    /// link delayed by `latency` and cut after `cut_after` bytes. The
    /// stream's bytes are handed to `tap` as they pass.
    pub(crate) async fn dial(
        &self,
        device: usize,
        latency: Duration,
        cut_after: Option<u64>,
        tap: Tap,
    ) -> Result<persist::Conversation, String> {
        let socket = self.udp.bind(Owner::Device(device), latency, cut_after);
        lock(&self.taps).insert(socket.addr(), tap.clone());
        let addr = socket.addr();
        let connected = async {
            let client = self.sim.client(socket).map_err(|e| e.to_string())?;
            client
                .connect(RELAY_ADDR, DEFAULT_SERVER_NAME, &Trust::Pin(self.pin))
                .await
                .map_err(|e| e.to_string())
        };
        let conn = match connected.await {
            Ok(conn) => conn,
            Err(e) => {
                // The relay never accepted it: nothing will take its tap.
                lock(&self.taps).remove(&addr);
                return Err(e);
            }
        };
        let (write, read) = conn.open_byte_stream().await.map_err(|e| e.to_string())?;
        Ok(persist::Conversation {
            read: Box::new(TapRead {
                inner: read,
                tap,
                up: false,
            }),
            write: Box::new(KeepOpen {
                inner: write,
                _conn: conn,
            }),
        })
    }
}

/// Where a connection's decrypted bytes go: called with (up, bytes) for
/// what the device writes and (down, bytes) for what it reads.
pub(crate) type Tap = Arc<dyn Fn(bool, &[u8]) + Send + Sync>;

/// The relay endpoint: each connection served on its own task, each of
/// its streams by `persist_relay::serve`. Aborting it drops the endpoint
/// and, with the task set, every connection.
async fn accept<B: RelayBackend>(
    server: Server,
    backend: Arc<B>,
    taps: Arc<Mutex<BTreeMap<SocketAddr, Tap>>>,
) {
    let mut connections = JoinSet::new();
    while let Some(conn) = server.accept().await {
        while connections.try_join_next().is_some() {}
        let tap = lock(&taps).remove(&conn.remote_addr());
        connections.spawn(serve_connection(conn, backend.clone(), tap));
    }
}

/// Serves each stream of `conn` with the relay's session code, framing it
/// as `Connection::accept_stream` does, what the relay reads tapped.
async fn serve_connection<B: RelayBackend>(conn: Connection, backend: Arc<B>, tap: Option<Tap>) {
    let mut sessions = JoinSet::new();
    while let Ok((write, read)) = conn.accept_byte_stream().await {
        while sessions.try_join_next().is_some() {}
        let backend = backend.clone();
        let read: BoxRead = match &tap {
            Some(tap) => Box::new(TapRead {
                inner: read,
                tap: tap.clone(),
                up: true,
            }),
            None => read,
        };
        sessions.spawn(async move {
            let ctx = persist_relay::SessionContext::new(persist_relay::Admission::Open);
            let tx = persist_transport::FrameSender::new(write).boxed();
            let rx = persist_transport::FrameReceiver::new(read).boxed();
            persist_relay::serve(&*backend, &ctx, tx, rx).await;
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A read half whose bytes are tapped as they arrive: the device's
/// (`up: false`) or the relay's (`up: true`).
struct TapRead {
    inner: BoxRead,
    tap: Tap,
    up: bool,
}

impl AsyncRead for TapRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            (self.tap)(self.up, &buf.filled()[before..]);
        }
        result
    }
}

/// The device's write half; it keeps the connection open.
struct KeepOpen {
    inner: BoxWrite,
    _conn: Connection,
}

impl AsyncWrite for KeepOpen {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use crate::net::SimNet;

    #[test]
    fn the_stream_is_tapped_in_the_clear_and_the_datagrams_are_not() {
        let rt = crate::harness::paused_runtime().expect("runtime");
        rt.block_on(async {
            let net = SimNet::quic(1, 1).expect("quic net");
            let mut conv = net.dial_for(0).dial().await.expect("dial");
            let canary = b"canary-7c1e-in-the-clear";
            // One frame's worth (length prefix, payload): the relay reads
            // it whole before it finds the payload is no message.
            let len = u32::try_from(canary.len()).expect("short");
            conv.write
                .write_all(&len.to_be_bytes())
                .await
                .expect("write");
            conv.write.write_all(canary).await.expect("write");
            conv.write.flush().await.expect("flush");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let tapped = net.tapped();
            assert_eq!(tapped.len(), 1);
            assert!(
                tapped[0].up.ends_with(canary),
                "the stream tap sees the bytes the relay read: {:?}",
                tapped[0].up
            );
            let wire = net.wire();
            let up = &wire
                .iter()
                .find(|(name, _)| name.ends_with("(up)"))
                .expect("device 0 sent datagrams")
                .1;
            assert!(up.len() > 1200, "at least a padded Initial went out");
            assert!(
                !up.windows(canary.len()).any(|w| w == canary),
                "QUIC encrypts the datagrams"
            );
        });
    }
}
