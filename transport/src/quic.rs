//! QUIC endpoints for `persist/1` (quinn over rustls with ring).
//!
//! A [`Server`] binds a UDP socket with a [`ServerIdentity`] and yields
//! handshaken [`Connection`]s; [`connect`] (or a reusable [`Client`])
//! reaches a server with a [`Trust`]. A conversation is one bidirectional
//! stream, framed as ([`SendHalf`], [`RecvHalf`]) — the same types the
//! in-memory transport gives.
//!
//! # Invariants
//! - Handshakes run concurrently (at most [`HANDSHAKES_IN_FLIGHT_MAX`],
//!   each bounded by [`HANDSHAKE_TIMEOUT`]); a failed one is logged and
//!   skipped, never fatal to the server, and never blocks another.
//! - Every connection idles out after [`IDLE_TIMEOUT`]; clients keep it
//!   alive with a ping every [`KEEP_ALIVE_INTERVAL`] while it is open.
//! - A peer has at most [`STREAMS_PER_CONNECTION_MAX`] conversations open
//!   on one connection, and no unidirectional streams.
//! - [`FrameSender::finish`](crate::frame::FrameSender::finish) on a QUIC
//!   half resolves only once the peer has received every byte, so a server
//!   can send a final `Error`, finish, and then close without losing it.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::frame::{FrameReceiver, FrameSender, RecvHalf, SendHalf};
use crate::tls::{self, CertPin, Refusal, RefusalSlot, ServerIdentity, TlsBasis, Trust};

/// How long a connection may go without any packet before it is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an otherwise idle connection pings, well inside [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a client waits for a server to complete the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server gives a client to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes a server runs at once; more clients wait in quinn's queue.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 64;
/// Handshaken connections waiting for [`Server::accept`] before the
/// server stops completing handshakes (backpressure).
pub const ACCEPTED_QUEUE_MAX: usize = 64;
/// Concurrent conversations (bidirectional streams) a peer may open on one
/// connection. A device needs one; a few more allow a mailbox exchange
/// beside a long-lived sync conversation.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 8;

const _: () = assert!(KEEP_ALIVE_INTERVAL.as_secs() * 2 < IDLE_TIMEOUT.as_secs());

/// Application close codes (QUIC `APPLICATION_CLOSE`).
pub mod close_code {
    /// The conversation ended normally.
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 1;
    /// The server is shutting down.
    pub const SHUTTING_DOWN: u32 = 2;
    /// The peer was refused (bad credential, wrong version).
    pub const REFUSED: u32 = 3;
}

// ---------------------------------------------------------------------------
// Server

/// Binding a server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr} (UDP): {source}: pick a free port or an address of this host")]
    Socket {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The identity could not be turned into a TLS config.
    #[error("cannot use the TLS identity: {0}")]
    Tls(String),
}

/// A QUIC server endpoint speaking `persist/1`.
pub struct Server {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    accepted: tokio::sync::Mutex<mpsc::Receiver<Connection>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Listens on `addr` (port 0 picks a free one; see [`Server::local_addr`])
    /// presenting `identity`. Must run inside a tokio runtime.
    pub fn bind(addr: SocketAddr, identity: &ServerIdentity) -> Result<Server, BindError> {
        let crypto = server_crypto(identity, &TlsBasis::product())?;
        let mut config = quinn::ServerConfig::with_crypto(crypto);
        config.transport_config(Arc::new(transport_config()));
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|source| BindError::Socket { addr, source })?;
        Self::serve(endpoint, addr)
    }

    /// Accepts on `endpoint`, a server endpoint bound at `addr`.
    pub(crate) fn serve(endpoint: quinn::Endpoint, addr: SocketAddr) -> Result<Server, BindError> {
        let addr = endpoint
            .local_addr()
            .map_err(|source| BindError::Socket { addr, source })?;
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE_MAX);
        let acceptor = tokio::spawn(accept_loop(endpoint.clone(), tx));
        Ok(Server {
            endpoint,
            addr,
            accepted: tokio::sync::Mutex::new(rx),
            acceptor,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next handshaken connection; `None` once the server is closed.
    pub async fn accept(&self) -> Option<Connection> {
        self.accepted.lock().await.recv().await
    }

    /// Refuses new connections from now on; open ones continue.
    pub fn stop_accepting(&self) {
        self.endpoint.set_server_config(None);
        self.acceptor.abort();
    }

    /// Closes every connection at once and stops accepting.
    pub fn close(&self) {
        self.stop_accepting();
        self.endpoint.close(
            quinn::VarInt::from_u32(close_code::SHUTTING_DOWN),
            b"server closed",
        );
    }

    /// Resolves once every connection is gone and its close has been sent.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The QUIC server crypto presenting `identity` over `basis`.
pub(crate) fn server_crypto(
    identity: &ServerIdentity,
    basis: &TlsBasis,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, BindError> {
    let crypto = identity
        .server_config(basis)
        .map_err(|e| BindError::Tls(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| BindError::Tls(e.to_string()))?;
    Ok(Arc::new(crypto))
}

/// Accepts incoming connections, runs their handshakes concurrently and
/// queues the ones that succeed.
async fn accept_loop(endpoint: quinn::Endpoint, accepted: mpsc::Sender<Connection>) {
    let mut handshakes: JoinSet<Option<Connection>> = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // Finished handshakes first: they free a slot for the next one.
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                if let Ok(Some(conn)) = done
                    && accepted.send(conn).await.is_err()
                {
                    return; // The server was dropped.
                }
            }
            incoming = endpoint.accept(), if handshakes.len() < HANDSHAKES_IN_FLIGHT_MAX => {
                let Some(incoming) = incoming else { return };
                handshakes.spawn(handshake(incoming));
            }
        }
    }
}

async fn handshake(incoming: quinn::Incoming) -> Option<Connection> {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "refused an incoming connection");
            return None;
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(inner)) => {
            tracing::debug!(%remote, "connection established");
            Some(Connection {
                inner,
                _endpoint: None,
            })
        }
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%remote, timeout = ?HANDSHAKE_TIMEOUT, "handshake timed out");
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Client

/// Connecting to a server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No local UDP socket could be opened.
    #[error("cannot open a local UDP socket: {0}")]
    Socket(#[source] io::Error),
    /// The TLS configuration could not be built.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// The server name is not a valid DNS name or IP address.
    #[error("{name:?} is not a valid server name: give a DNS name or an IP address")]
    InvalidServerName {
        /// The name given.
        name: String,
    },
    /// The server presented a certificate other than the pinned one.
    #[error(
        "the relay's certificate at {addr} does not match the pin {expected} (it presents \
         {found}); check --pin or the relay's data directory"
    )]
    PinMismatch {
        /// The server.
        addr: SocketAddr,
        /// The pin the client trusts.
        expected: CertPin,
        /// The pin of the certificate presented.
        found: CertPin,
    },
    /// The server's certificate does not verify against the trusted CAs.
    #[error(
        "the server at {addr} presented a certificate the trusted CAs do not vouch for \
         ({reason}); check the CA file and the server name"
    )]
    Untrusted {
        /// The server.
        addr: SocketAddr,
        /// rustls' verdict.
        reason: String,
    },
    /// The server did not complete a handshake in time.
    #[error(
        "no answer from {addr} within {}s: check that the relay is running and reachable over UDP",
        after.as_secs()
    )]
    TimedOut {
        /// The server.
        addr: SocketAddr,
        /// How long the client waited.
        after: Duration,
    },
    /// The handshake failed otherwise (refused, wrong protocol, reset).
    #[error("connection to {addr} failed: {reason}")]
    Failed {
        /// The server.
        addr: SocketAddr,
        /// quinn's description.
        reason: String,
    },
}

/// A client endpoint: one local UDP socket for any number of connections.
#[derive(Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    tls: TlsBasis,
    /// Where the destination connection id of a first packet comes from;
    /// `None`: quinn's random one. Seeded in simulations.
    initial_dst_cid: Option<InitialDstCid>,
}

/// Makes the destination connection id of a connection's first packet.
pub(crate) type InitialDstCid = Arc<dyn Fn() -> quinn::ConnectionId + Send + Sync>;

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client on an ephemeral local port of the given address family.
    /// Must run inside a tokio runtime.
    pub fn new(ipv6: bool) -> Result<Self, ConnectError> {
        let local: SocketAddr = if ipv6 {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(local).map_err(ConnectError::Socket)?;
        Ok(Self {
            endpoint,
            tls: TlsBasis::product(),
            initial_dst_cid: None,
        })
    }

    /// A client on `endpoint`, its TLS built on `tls`.
    #[cfg(feature = "sim")]
    pub(crate) fn on(
        endpoint: quinn::Endpoint,
        tls: TlsBasis,
        initial_dst_cid: Option<InitialDstCid>,
    ) -> Self {
        Self {
            endpoint,
            tls,
            initial_dst_cid,
        }
    }

    /// Connects to `addr`, which must present a certificate that `trust`
    /// accepts for `server_name` (any name does for [`Trust::Pin`]; see
    /// [`tls::DEFAULT_SERVER_NAME`]). Waits at most [`CONNECT_TIMEOUT`].
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        trust: &Trust,
    ) -> Result<Connection, ConnectError> {
        let refusal: RefusalSlot = Arc::new(Mutex::new(None));
        let crypto = tls::client_config(&self.tls, trust, refusal.clone())
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport_config()));
        if let Some(cids) = &self.initial_dst_cid {
            config.initial_dst_cid_provider(cids.clone());
        }
        let connecting = self
            .endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| match e {
                quinn::ConnectError::InvalidServerName(name) => {
                    ConnectError::InvalidServerName { name }
                }
                other => ConnectError::Failed {
                    addr,
                    reason: other.to_string(),
                },
            })?;
        let result = tokio::time::timeout(CONNECT_TIMEOUT, connecting).await;
        let refused = refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match (result, refused) {
            (Ok(Ok(inner)), _) => Ok(Connection {
                inner,
                _endpoint: Some(self.endpoint.clone()),
            }),
            (_, Some(Refusal::PinMismatch { expected, found })) => Err(ConnectError::PinMismatch {
                addr,
                expected,
                found,
            }),
            (_, Some(Refusal::Untrusted(reason))) => Err(ConnectError::Untrusted { addr, reason }),
            (Ok(Err(e)), None) => Err(ConnectError::Failed {
                addr,
                reason: e.to_string(),
            }),
            (Err(_), None) => Err(ConnectError::TimedOut {
                addr,
                after: CONNECT_TIMEOUT,
            }),
        }
    }
}

/// Connects to `addr` from a fresh local endpoint (see [`Client::connect`]).
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    trust: &Trust,
) -> Result<Connection, ConnectError> {
    Client::new(addr.is_ipv6())?
        .connect(addr, server_name, trust)
        .await
}

// ---------------------------------------------------------------------------
// Connections

/// Opening or accepting a conversation failed: the connection is gone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The connection closed or was lost.
    #[error("connection closed: {reason}")]
    Closed {
        /// Why, as quinn reports it.
        reason: String,
    },
}

impl From<quinn::ConnectionError> for StreamError {
    fn from(e: quinn::ConnectionError) -> Self {
        StreamError::Closed {
            reason: e.to_string(),
        }
    }
}

/// An established QUIC connection.
#[derive(Clone)]
pub struct Connection {
    inner: quinn::Connection,
    /// A client connection keeps its endpoint (and so its socket) alive.
    _endpoint: Option<quinn::Endpoint>,
}

impl Connection {
    /// Opens a conversation. The peer sees it once the first frame is sent.
    pub async fn open_stream(&self) -> Result<(SendHalf, RecvHalf), StreamError> {
        let (send, recv) = self.inner.open_bi().await?;
        Ok(halves(send, recv))
    }

    /// Opens a conversation as raw bytes (the caller frames them), for
    /// simulations whose devices dial through `persist::Dial`.
    #[cfg(feature = "sim")]
    pub async fn open_byte_stream(
        &self,
    ) -> Result<(crate::frame::BoxWrite, crate::frame::BoxRead), StreamError> {
        let (send, recv) = self.inner.open_bi().await?;
        Ok(byte_halves(send, recv))
    }

    /// The next conversation the peer opens, as raw bytes (the caller
    /// frames them), for simulations that tap what a relay receives.
    #[cfg(feature = "sim")]
    pub async fn accept_byte_stream(
        &self,
    ) -> Result<(crate::frame::BoxWrite, crate::frame::BoxRead), StreamError> {
        let (send, recv) = self.inner.accept_bi().await?;
        Ok(byte_halves(send, recv))
    }

    /// The next conversation the peer opens.
    pub async fn accept_stream(&self) -> Result<(SendHalf, RecvHalf), StreamError> {
        let (send, recv) = self.inner.accept_bi().await?;
        Ok(halves(send, recv))
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// A number identifying this connection among the endpoint's, for logs.
    pub fn id(&self) -> usize {
        self.inner.stable_id()
    }

    /// Closes the connection at once with an application `code` (see
    /// [`close_code`]) and a reason for the peer's logs. Unsent data is
    /// dropped: finish streams first to deliver it.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner
            .close(quinn::VarInt::from_u32(code), reason.as_bytes());
    }

    /// Resolves when the connection is closed, by either side or by a
    /// timeout, with the reason.
    pub async fn closed(&self) -> String {
        self.inner.closed().await.to_string()
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id())
            .field("remote", &self.remote_addr())
            .finish_non_exhaustive()
    }
}

/// A stream's halves as raw bytes, for simulations (see
/// [`Connection::open_byte_stream`]).
#[cfg(feature = "sim")]
fn byte_halves(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> (crate::frame::BoxWrite, crate::frame::BoxRead) {
    (
        Box::new(QuicSend {
            stream: send,
            stopped: None,
        }),
        Box::new(recv),
    )
}
fn halves(send: quinn::SendStream, recv: quinn::RecvStream) -> (SendHalf, RecvHalf) {
    (
        FrameSender::new(QuicSend {
            stream: send,
            stopped: None,
        })
        .boxed(),
        FrameReceiver::new(recv).boxed(),
    )
}

type Stopped =
    Pin<Box<dyn Future<Output = Result<Option<quinn::VarInt>, quinn::StoppedError>> + Send + Sync>>;

/// A QUIC send stream whose shutdown waits until the peer has every byte.
struct QuicSend {
    stream: quinn::SendStream,
    stopped: Option<Stopped>,
}

impl AsyncWrite for QuicSend {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.stream), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.stream), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let stopped = match &mut this.stopped {
            Some(stopped) => stopped,
            None => {
                // An error means the stream is already finished or reset;
                // `stopped` then reports how it ended.
                let _ = this.stream.finish();
                this.stopped.insert(Box::pin(this.stream.stopped()))
            }
        };
        stopped
            .as_mut()
            .poll(cx)
            .map(|r| r.map(|_| ()).map_err(io::Error::from))
    }
}

pub(crate) fn transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
                .unwrap_or_else(|_| unreachable!("30 s is a valid QUIC idle timeout")),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(STREAMS_PER_CONNECTION_MAX))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    config
}
