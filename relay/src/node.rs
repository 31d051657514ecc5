//! A running relay node: the QUIC server, one task per connection, one
//! session per conversation, and the metrics endpoint.
//!
//! ```text
//! start ──▶ accept loop ──▶ connection task (per QUIC connection)
//!                 │                 └──▶ session::serve (per stream)
//!                 └── metrics endpoint (optional, its own TCP port)
//! ```
//!
//! # Failure
//! A session's failure closes only its own connection; a connection's
//! failure ends only its task. Nothing a client sends stops the node.
//!
//! # Shutdown
//! [`RelayHandle::shutdown`] stops accepting connections, tells every
//! session (each sends `Error{ShuttingDown}`), waits for them at most
//! [`SHUTDOWN_GRACE`], then closes what is left. Dropping the handle
//! without calling it closes everything at once.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use persist_storage::relay::RelayBackend;
use persist_transport::quic::{BindError, close_code};
use persist_transport::tls::{CertPin, IdentityError, ServerIdentity};
use persist_transport::{Connection, Server};
use tokio::task::{JoinHandle, JoinSet};

use crate::metrics::{Metrics, serve_http};
use crate::session::{
    self, Admission, SessionContext, SessionEnd, ShutdownSignal, ShutdownTrigger, shutdown_signal,
};

/// How long a shutdown waits for sessions to say goodbye before it closes
/// their connections anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connections served at once. Each holds at most a few conversations,
/// each at most one frame and one page in memory; beyond this a new
/// connection is closed at once with a reason, and the client retries.
pub const CONNECTIONS_MAX: usize = 10_000;
/// How long a shutdown waits for the closes to reach the peers.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a relay's TLS identity comes from.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum IdentitySource {
    /// A self-signed certificate made on first start and kept in the data
    /// directory (see [`ServerIdentity::load_or_create`]).
    #[default]
    SelfSigned,
    /// An operator's certificate chain and key, as PEM files.
    Pem {
        /// The certificate chain, the relay's own certificate first.
        cert: PathBuf,
        /// Its private key.
        key: PathBuf,
    },
}

/// How to run a relay node.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The UDP address to serve QUIC on (port 0: any free port).
    pub listen: SocketAddr,
    /// The directory for the relay's own files (its TLS identity).
    pub data_dir: PathBuf,
    /// The TLS identity.
    pub identity: IdentitySource,
    /// Who may create stores.
    pub admission: Admission,
    /// The TCP address of the metrics and health endpoint, if any.
    pub metrics: Option<SocketAddr>,
}

impl RelayConfig {
    /// A relay on `listen` keeping its files in `data_dir`, with a
    /// self-signed identity, open admission and no metrics endpoint.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            identity: IdentitySource::SelfSigned,
            admission: Admission::Open,
            metrics: None,
        }
    }
}

/// Starting a relay node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The TLS identity could not be loaded or made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The QUIC socket could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The metrics endpoint could not be bound.
    #[error("cannot listen for metrics on {addr} (TCP): {source}: pick a free port")]
    Metrics {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// Starts a relay node serving `backend`. Must run inside a tokio runtime
/// (multi-threaded for a backend that blocks on disk, such as redb).
pub async fn start<B: RelayBackend>(
    config: RelayConfig,
    backend: B,
) -> Result<RelayHandle, StartError> {
    let identity = match &config.identity {
        IdentitySource::SelfSigned => ServerIdentity::load_or_create(&config.data_dir)?,
        IdentitySource::Pem { cert, key } => ServerIdentity::from_pem_files(cert, key)?,
    };
    let backend = Arc::new(backend);
    let metrics = Arc::new(Metrics::default());
    let (trigger, signal) = shutdown_signal();

    // Bind both sockets before spawning anything, so a failure leaves
    // nothing running.
    let http = match config.metrics {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Metrics { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| StartError::Metrics { addr, source })?;
            Some((listener, bound))
        }
        None => None,
    };
    let server = Arc::new(Server::bind(config.listen, &identity)?);

    let (http_task, metrics_addr) = match http {
        Some((listener, bound)) => (
            Some(tokio::spawn(serve_http(
                listener,
                backend.clone(),
                metrics.clone(),
                signal.clone(),
            ))),
            Some(bound),
        ),
        None => (None, None),
    };
    let ctx = SessionContext {
        admission: config.admission,
        metrics: metrics.clone(),
        shutdown: signal.clone(),
    };
    let accept_task = tokio::spawn(accept_loop(server.clone(), backend, ctx, signal));
    tracing::info!(addr = %server.local_addr(), pin = %identity.pin(), "relay started");
    Ok(RelayHandle {
        addr: server.local_addr(),
        pin: identity.pin(),
        metrics_addr,
        metrics,
        trigger,
        server,
        accept_task,
        http_task,
    })
}

/// A running relay node.
pub struct RelayHandle {
    addr: SocketAddr,
    pin: CertPin,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    trigger: ShutdownTrigger,
    server: Arc<Server>,
    accept_task: JoinHandle<()>,
    http_task: Option<JoinHandle<()>>,
}

impl RelayHandle {
    /// The QUIC address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The pin of the relay's certificate.
    pub fn pin(&self) -> CertPin {
        self.pin
    }

    /// The metrics endpoint's address actually bound, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The node's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops gracefully: no new connections, every session told
    /// `ShuttingDown`, at most [`SHUTDOWN_GRACE`] for them to finish, then
    /// every connection closed.
    pub async fn shutdown(mut self) {
        self.server.stop_accepting();
        self.trigger.trigger();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.accept_task)
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "sessions did not finish in time; closing their connections"
            );
            self.accept_task.abort();
        }
        self.server.close();
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, self.server.wait_idle()).await;
        if let Some(http) = self.http_task.as_mut() {
            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, http).await;
        }
        tracing::info!("relay stopped");
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.trigger.trigger();
        self.server.close();
        self.accept_task.abort();
        if let Some(http) = &self.http_task {
            http.abort();
        }
    }
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("addr", &self.addr)
            .field("pin", &self.pin)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

/// Accepts connections until shutdown, then waits for their tasks.
async fn accept_loop<B: RelayBackend>(
    server: Arc<Server>,
    backend: Arc<B>,
    ctx: SessionContext,
    mut shutdown: ShutdownSignal,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = shutdown.requested() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            conn = server.accept() => match conn {
                Some(conn) if connections.len() >= CONNECTIONS_MAX => {
                    tracing::warn!(remote = %conn.remote_addr(), max = CONNECTIONS_MAX, "at capacity: connection refused");
                    conn.close(close_code::REFUSED, "relay at capacity: retry later");
                }
                Some(conn) => {
                    connections.spawn(serve_connection(conn, backend.clone(), ctx.clone()));
                }
                None => break,
            },
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Serves every conversation of one connection; closes it when a session
/// was refused or the node shuts down.
async fn serve_connection<B: RelayBackend>(conn: Connection, backend: Arc<B>, ctx: SessionContext) {
    let _open = ctx.metrics.connection_opened();
    let remote = conn.remote_addr();
    tracing::debug!(%remote, id = conn.id(), "connection open");
    let mut shutdown = ctx.shutdown.clone();
    let mut sessions = JoinSet::new();
    let mut close: Option<(u32, &str)> = None;
    loop {
        tokio::select! {
            biased;
            () = shutdown.requested() => break,
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                match done {
                    Ok(SessionEnd::Finished) => {}
                    Ok(SessionEnd::ShuttingDown) => {
                        close = Some((close_code::SHUTTING_DOWN, "relay shutting down"));
                        break;
                    }
                    Ok(SessionEnd::Stalled) => {
                        close = Some((close_code::REFUSED, "the client stopped reading"));
                        break;
                    }
                    Ok(SessionEnd::Refused(code)) => {
                        close = Some(match code {
                            persist_core::protocol::ErrorCode::Protocol
                            | persist_core::protocol::ErrorCode::BadEnvelope => {
                                (close_code::PROTOCOL, "protocol error")
                            }
                            _ => (close_code::REFUSED, "refused"),
                        });
                        break;
                    }
                    Err(e) => {
                        // A session task panicked or was cancelled: that is
                        // a bug, not the peer's doing; drop the connection.
                        tracing::error!(%remote, error = %e, "session task failed");
                        close = Some((close_code::PROTOCOL, "internal error"));
                        break;
                    }
                }
            }
            stream = conn.accept_stream() => match stream {
                Ok((tx, rx)) => {
                    ctx.metrics.session_started();
                    let backend = backend.clone();
                    let ctx = ctx.clone();
                    sessions.spawn(async move { session::serve(&*backend, &ctx, tx, rx).await });
                }
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "connection ended");
                    break;
                }
            },
        }
    }
    if close.is_some() {
        // One conversation broke the rules: the whole connection goes.
        sessions.abort_all();
    }
    // On shutdown the sessions say goodbye themselves; the node bounds the wait.
    while sessions.join_next().await.is_some() {}
    let (code, reason) = close.unwrap_or(if shutdown.is_requested() {
        (close_code::SHUTTING_DOWN, "relay shutting down")
    } else {
        (close_code::NORMAL, "")
    });
    conn.close(code, reason);
    tracing::debug!(%remote, "connection closed");
}
