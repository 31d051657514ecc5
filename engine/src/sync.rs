//! Sync: where a store syncs to, and what it reports.
//!
//! [`Config::sync`](crate::Config::sync) with a [`SyncConfig`] starts a
//! background session (the PeerSession actor) that keeps the store in step
//! with one remote: a relay node, or another device serving its store
//! ([`Store::serve`](crate::Store::serve)). Everything that crosses the wire
//! is an envelope (ciphertext) under a locator; the remote never holds a
//! key. The remote is named by a `quic://HOST:PORT` URL and trusted by the
//! SHA-256 pin of its certificate (printed by `persist-relay` when it
//! starts) or, for an operator's CA-signed certificate, by that CA.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use persist_actors::peer_session::{ConnectFuture, Connector, Link, SyncReport as Report};
use persist_transport::{CertPin, FrameReceiver, FrameSender, Trust};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

/// The default port of a relay node.
pub const DEFAULT_PORT: u16 = 7443;

/// How a store syncs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SyncConfig {
    /// The relay or serving device.
    pub remote: Remote,
    /// How concurrent writes to one path resolve.
    pub strategy: Strategy,
    /// How long a device that revoked another waits for the remaining
    /// members to acknowledge the new keys before it switches the relay to
    /// the new access token anyway (default [`RELAY_SWITCH_GRACE`]). The
    /// revoked device keeps the old token until the switch; a member that
    /// had not connected by then holds only the old token too, and must be
    /// paired again.
    pub relay_switch_grace: Duration,
    /// How long an old epoch, once none of this device's records uses it,
    /// waits for every other member to acknowledge a newer epoch's key
    /// before it retires anyway (default [`RETIRE_GRACE`]). Until then a
    /// member that missed the newer key may still write under the old one;
    /// a retired key can be purged, and what is sealed under a purged key
    /// is unreadable.
    pub retire_grace: Duration,
}

/// How long, by default, an old epoch waits for members to acknowledge a
/// newer one before it retires.
pub const RETIRE_GRACE: Duration = Duration::from_secs(14 * 24 * 60 * 60);

/// How long, by default, a revoker waits for members to acknowledge a
/// revocation's keys before switching the relay to its new access token.
pub const RELAY_SWITCH_GRACE: Duration = Duration::from_secs(14 * 24 * 60 * 60);

impl SyncConfig {
    /// Sync with `remote`, last write wins.
    pub fn new(remote: Remote) -> Self {
        Self {
            remote,
            strategy: Strategy::LastWriteWins,
            relay_switch_grace: RELAY_SWITCH_GRACE,
            retire_grace: RETIRE_GRACE,
        }
    }

    /// Sets [`SyncConfig::retire_grace`].
    #[must_use]
    pub fn retire_grace(mut self, grace: Duration) -> Self {
        self.retire_grace = grace;
        self
    }

    /// Sets [`SyncConfig::relay_switch_grace`].
    #[must_use]
    pub fn relay_switch_grace(mut self, grace: Duration) -> Self {
        self.relay_switch_grace = grace;
        self
    }
}

/// How concurrent writes to one path resolve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// The write with the higher version (hybrid logical clock, then
    /// device id) wins, on every device alike.
    #[default]
    LastWriteWins,
}

/// A relay node or a device serving its store, and how to trust it.
#[derive(Clone)]
pub struct Remote {
    url: String,
    target: Target,
    admission: Option<Arc<Zeroizing<String>>>,
}

#[derive(Clone)]
enum Target {
    Quic {
        /// Tried in turn, from the one that last answered.
        endpoints: Vec<Endpoint>,
        trust: Arc<Trust>,
        /// Whether each endpoint's certificate must name its host (CA
        /// trust) rather than be the pinned one.
        by_name: bool,
    },
    Dial(Arc<dyn Dial>),
}

/// One address of a remote.
#[derive(Clone, Debug)]
struct Endpoint {
    host: String,
    port: u16,
}

/// The two byte streams of one conversation with a remote.
pub struct Conversation {
    /// Bytes from the remote.
    pub read: Box<dyn AsyncRead + Send + Unpin>,
    /// Bytes to the remote.
    pub write: Box<dyn AsyncWrite + Send + Unpin>,
}

/// The future [`Dial::dial`] returns.
pub type DialFuture<'a> = Pin<Box<dyn Future<Output = Result<Conversation, String>> + Send + 'a>>;

/// Reaches a remote without QUIC and TLS, for simulations and tests: the
/// other end runs `persist_relay::serve` on the matching streams. Given to
/// a store only through
/// [`DangerousConfig::sync_via`](crate::DangerousConfig::sync_via).
pub trait Dial: Send + Sync + 'static {
    /// Opens a conversation, or says why not.
    fn dial(&self) -> DialFuture<'_>;
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("admission", &self.admission.as_ref().map(|_| "<secret>"))
            .finish_non_exhaustive()
    }
}

/// A remote that cannot be used as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The URL is not `quic://HOST:PORT`.
    #[error(
        "{url:?} is not a remote address: {why} (expected quic://HOST:PORT, e.g. quic://relay.example.com:7443)"
    )]
    BadUrl {
        /// What was given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The pin is not `sha256:` and 64 hex digits.
    #[error(
        "{pin:?} is not a certificate pin: {detail} (persist-relay prints its pin when it starts: sha256:<64 hex digits>)"
    )]
    BadPin {
        /// What was given.
        pin: String,
        /// Why.
        detail: String,
    },
    /// The CA certificate file cannot be used.
    #[error("{0}")]
    BadCa(String),
}

impl Remote {
    /// The remote at `url` (`quic://HOST:PORT`; the port defaults to
    /// [`DEFAULT_PORT`]) whose certificate has SHA-256 pin `pin`
    /// (`sha256:<hex>`).
    pub fn pinned(url: &str, pin: &str) -> Result<Remote, RemoteError> {
        let pin: CertPin = pin.parse().map_err(|e| RemoteError::BadPin {
            pin: pin.to_owned(),
            detail: format!("{e}"),
        })?;
        let (host, port) = parse_url(url)?;
        Ok(Remote {
            url: format!("quic://{host}:{port}"),
            target: Target::Quic {
                endpoints: vec![Endpoint { host, port }],
                trust: Arc::new(Trust::Pin(pin)),
                by_name: false,
            },
            admission: None,
        })
    }

    /// The remote at `url` whose certificate is signed by a CA in the PEM
    /// file `ca` and names the URL's host.
    pub fn with_ca(url: &str, ca: impl Into<PathBuf>) -> Result<Remote, RemoteError> {
        let ca = ca.into();
        let trust =
            Trust::roots_from_pem_file(&ca).map_err(|e| RemoteError::BadCa(e.to_string()))?;
        let (host, port) = parse_url(url)?;
        Ok(Remote {
            url: format!("quic://{host}:{port}"),
            target: Target::Quic {
                endpoints: vec![Endpoint { host, port }],
                trust: Arc::new(trust),
                by_name: true,
            },
            admission: None,
        })
    }

    /// Another address of the same remote: a relay node that shares this
    /// remote's database and presents a certificate the same pin or CA
    /// accepts. A device tries the addresses in turn; after it loses a
    /// connection it starts with the address after the one it lost, so it
    /// fails over when a node goes down.
    pub fn or(mut self, url: &str) -> Result<Remote, RemoteError> {
        let (host, port) = parse_url(url)?;
        match &mut self.target {
            Target::Quic { endpoints, .. } => endpoints.push(Endpoint { host, port }),
            Target::Dial(_) => {}
        }
        Ok(self)
    }

    /// A remote reached through `dial`, named `name` (cursors are kept per
    /// name). No TLS: see [`Dial`].
    pub(crate) fn dialed(name: &str, dial: Arc<dyn Dial>) -> Remote {
        Remote {
            url: name.to_owned(),
            target: Target::Dial(dial),
            admission: None,
        }
    }

    /// The operator's admission secret, for a relay that requires one to
    /// create a store (later connections do not need it).
    pub fn admission(mut self, secret: impl Into<String>) -> Self {
        self.admission = Some(Arc::new(Zeroizing::new(secret.into())));
        self
    }

    /// The remote's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The SHA-256 pin of the remote's certificate, when it is trusted by
    /// pin (it goes into invite codes).
    pub(crate) fn pin(&self) -> Option<[u8; 32]> {
        match &self.target {
            Target::Quic { trust, .. } => match trust.as_ref() {
                Trust::Pin(pin) => Some(pin.0),
                _ => None,
            },
            Target::Dial(_) => None,
        }
    }

    pub(crate) fn admission_secret(&self) -> Option<String> {
        self.admission.as_ref().map(|s| s.as_str().to_owned())
    }

    pub(crate) fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(RemoteConnector {
            remote: self.clone(),
            next: AtomicUsize::new(0),
        })
    }
}

fn parse_url(url: &str) -> Result<(String, u16), RemoteError> {
    let bad = |why| RemoteError::BadUrl {
        url: url.to_owned(),
        why,
    };
    let rest = url
        .strip_prefix("quic://")
        .ok_or(bad("it must start with quic://"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(bad("the host is missing"));
    }
    if rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(bad("only a host and a port may follow quic://"));
    }
    // [v6]:port, host:port, or a host alone.
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or(bad("an IPv6 address needs a closing ]"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("unexpected characters after the IPv6 address")),
        };
        (host.to_owned(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (rest.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("the host is missing"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or(bad("the port must be a number from 1 to 65535"))?,
        None => DEFAULT_PORT,
    };
    Ok((host, port))
}

/// Reaches a remote over QUIC, or through its [`Dial`].
struct RemoteConnector {
    remote: Remote,
    /// The endpoint to try first. A connect is asked for only when there
    /// is no connection, so after a success the next one to try first is
    /// the following endpoint: the one that answered may be the one that
    /// went down.
    next: AtomicUsize,
}

impl Connector for RemoteConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            match &self.remote.target {
                Target::Quic {
                    endpoints,
                    trust,
                    by_name,
                } => {
                    let first = self.next.load(Ordering::Relaxed);
                    let mut failures = Vec::new();
                    for i in (0..endpoints.len()).map(|k| (first + k) % endpoints.len()) {
                        let Endpoint { host, port } = &endpoints[i];
                        let server_name = if *by_name {
                            host.as_str()
                        } else {
                            persist_transport::tls::DEFAULT_SERVER_NAME
                        };
                        match connect_quic(host, *port, trust, server_name).await {
                            Ok(link) => {
                                self.next
                                    .store((i + 1) % endpoints.len(), Ordering::Relaxed);
                                return Ok(link);
                            }
                            Err(e) => failures.push(e),
                        }
                    }
                    Err(failures.join("; "))
                }
                Target::Dial(dial) => {
                    let Conversation { read, write } = dial.dial().await?;
                    Ok(Link {
                        send: FrameSender::new(write).boxed(),
                        recv: FrameReceiver::new(read).boxed(),
                        guard: Box::new(()),
                    })
                }
            }
        })
    }

    fn remote(&self) -> String {
        self.remote.url.clone()
    }
}

async fn connect_quic(
    host: &str,
    port: u16,
    trust: &Trust,
    server_name: &str,
) -> Result<Link, String> {
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let addr = tokio::net::lookup_host(&target)
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))?;
    let conn = persist_transport::connect(addr, server_name, trust)
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_stream().await.map_err(|e| e.to_string())?;
    Ok(Link {
        send,
        recv,
        guard: Box::new(conn),
    })
}

/// Where sync stands, as [`Store::sync_status`](crate::Store::sync_status)
/// reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SyncStatus {
    /// The remote's URL.
    pub remote: String,
    /// Whether a conversation with it is open.
    pub connected: bool,
    /// Local changes the remote has not acknowledged yet (at most).
    pub pending_up: u64,
    /// Remote changes not pulled yet (at most).
    pub pending_down: u64,
    /// Envelopes held back because this device lacks their epoch key or
    /// does not know their author yet; applied when it learns them.
    pub held: u64,
    /// Entries pushed since the store was opened.
    pub pushed: u64,
    /// Remote writes applied since the store was opened.
    pub pulled: u64,
    /// Envelopes refused (tampered or malformed) since the store was opened.
    pub refused: u64,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Connected, and nothing is pending either way or held.
    pub synced: bool,
}

impl From<persist_actors::peer_session::SyncState> for SyncStatus {
    fn from(s: persist_actors::peer_session::SyncState) -> Self {
        let synced = s.connected && s.pending_up == 0 && s.pending_down == 0 && s.parked == 0;
        Self {
            remote: s.remote,
            connected: s.connected,
            pending_up: s.pending_up,
            pending_down: s.pending_down,
            held: s.parked,
            pushed: s.pushed,
            pulled: s.pulled,
            refused: s.refused,
            last_error: s.last_error,
            synced,
        }
    }
}

/// What one [`Store::sync_now`](crate::Store::sync_now) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SyncReport {
    /// Local entries the remote acknowledged.
    pub pushed: u64,
    /// Remote writes applied here.
    pub pulled: u64,
    /// Envelopes refused (tampered or malformed).
    pub refused: u64,
    /// Envelopes held back afterwards (see [`SyncStatus::held`]).
    pub held: u64,
}

impl From<Report> for SyncReport {
    fn from(r: Report) -> Self {
        Self {
            pushed: r.pushed,
            pulled: r.pulled,
            refused: r.refused,
            held: r.parked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_clear_errors() {
        assert_eq!(
            parse_url("quic://relay.example.com:7443"),
            Ok(("relay.example.com".into(), 7443))
        );
        assert_eq!(
            parse_url("quic://relay"),
            Ok(("relay".into(), DEFAULT_PORT))
        );
        assert_eq!(parse_url("quic://[::1]:9000/"), Ok(("::1".into(), 9000)));
        assert_eq!(parse_url("quic://127.0.0.1:1"), Ok(("127.0.0.1".into(), 1)));
        for bad in [
            "relay:7443",
            "https://relay",
            "quic://",
            "quic://relay:0",
            "quic://relay:70000",
            "quic://relay:port",
            "quic://user@relay",
            "quic://relay/path",
            "quic://[::1",
            "quic://:7443",
        ] {
            let err = parse_url(bad).expect_err(bad);
            assert!(err.to_string().contains("quic://HOST:PORT"), "{err}");
        }
    }

    #[test]
    fn pins_are_checked() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert!(Remote::pinned("quic://r:1", &good).is_ok());
        let err = Remote::pinned("quic://r:1", "sha256:abc").expect_err("short pin");
        assert!(matches!(err, RemoteError::BadPin { .. }), "{err}");
        assert!(err.to_string().contains("persist-relay prints its pin"));
    }
}
