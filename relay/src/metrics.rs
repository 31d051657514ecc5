//! What a relay counts, and the HTTP endpoint that shows it.
//!
//! [`Metrics`] are plain atomic counters that sessions and the node bump;
//! [`Metrics::render`] writes them in the Prometheus text exposition format
//! (version 0.0.4). The endpoint answers two requests on its own port:
//!
//! - `GET /healthz`: `200 ok` while the backend answers
//!   [`RelayBackend::stats`], else `503` with the reason;
//! - `GET /metrics`: the counters, plus the backend's store, entry and byte
//!   counts.
//!
//! HTTP is hyper 1 (HTTP/1.1 only, one request per connection): a
//! hand-written responder would be shorter, but parsing requests from the
//! network correctly (partial reads, pipelining, oversize headers) is
//! exactly what a well-kept HTTP implementation is for. Connections are
//! bounded in number ([`HTTP_CONNECTIONS_MAX`]) and time
//! ([`HTTP_CONNECTION_TIMEOUT`]), so a scraper cannot hold the port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use persist_core::protocol::ErrorCode;
use persist_storage::relay::{RelayBackend, RelayStats};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::session::ShutdownSignal;

/// HTTP connections served at once; more are closed on arrival.
pub const HTTP_CONNECTIONS_MAX: usize = 16;
/// How long one HTTP connection may take, request and response together.
pub const HTTP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the endpoint waits before accepting again after the OS
/// refused a connection (out of file descriptors), instead of spinning.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The relay's counters. All are monotonic except `connections_open`.
#[derive(Debug, Default)]
pub struct Metrics {
    connections_total: AtomicU64,
    connections_open: AtomicU64,
    sessions_total: AtomicU64,
    envelopes_in: AtomicU64,
    envelopes_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    rekeys: AtomicU64,
    /// Errors sent to clients, by [`code_label`].
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// The counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Connections accepted.
    pub connections_total: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Conversations (streams) served.
    pub sessions_total: u64,
    /// Envelopes received in pushes that were stored or found stale.
    pub envelopes_in: u64,
    /// Envelopes sent in batches.
    pub envelopes_out: u64,
    /// Frame bytes received.
    pub bytes_in: u64,
    /// Frame bytes sent.
    pub bytes_out: u64,
    /// Store access credentials changed (`Rekey` answered `Rekeyed`).
    pub rekeys: u64,
    /// Errors sent to clients, by code label.
    pub errors: BTreeMap<&'static str, u64>,
}

impl Metrics {
    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            connections_total: get(&self.connections_total),
            connections_open: get(&self.connections_open),
            sessions_total: get(&self.sessions_total),
            envelopes_in: get(&self.envelopes_in),
            envelopes_out: get(&self.envelopes_out),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            rekeys: get(&self.rekeys),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// The Prometheus text exposition of the counters and, when the backend
    /// answered, of what it holds.
    pub fn render(&self, stats: Option<RelayStats>) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP persist_relay_{name} {help}\n# TYPE persist_relay_{name} {kind}\n\
                 persist_relay_{name} {value}\n"
            );
        };
        metric(
            "connections_total",
            "counter",
            "QUIC connections accepted.",
            s.connections_total,
        );
        metric(
            "connections_open",
            "gauge",
            "QUIC connections open now.",
            s.connections_open,
        );
        metric(
            "sessions_total",
            "counter",
            "Conversations (streams) served.",
            s.sessions_total,
        );
        metric(
            "envelopes_in_total",
            "counter",
            "Envelopes received in pushes.",
            s.envelopes_in,
        );
        metric(
            "envelopes_out_total",
            "counter",
            "Envelopes sent in batches.",
            s.envelopes_out,
        );
        metric(
            "bytes_in_total",
            "counter",
            "Frame bytes received.",
            s.bytes_in,
        );
        metric(
            "bytes_out_total",
            "counter",
            "Frame bytes sent.",
            s.bytes_out,
        );
        metric(
            "rekeys_total",
            "counter",
            "Store access credentials changed.",
            s.rekeys,
        );
        metric(
            "backend_up",
            "gauge",
            "1 if the storage backend answered this scrape.",
            u64::from(stats.is_some()),
        );
        if let Some(stats) = stats {
            metric("stores", "gauge", "Stores held.", stats.stores);
            metric(
                "log_entries",
                "gauge",
                "Live log entries over all stores.",
                stats.entries,
            );
            metric(
                "envelope_bytes",
                "gauge",
                "Bytes of the live entries' envelopes.",
                stats.envelope_bytes,
            );
        }
        let _ = write!(
            out,
            "# HELP persist_relay_errors_total Errors sent to clients, by code.\n\
             # TYPE persist_relay_errors_total counter\n"
        );
        for (code, count) in &s.errors {
            let _ = writeln!(out, "persist_relay_errors_total{{code=\"{code}\"}} {count}");
        }
        out
    }

    /// Counts a new connection, open until the guard drops.
    pub(crate) fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    pub(crate) fn session_started(&self) {
        self.sessions_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn envelopes_in(&self, n: usize) {
        self.envelopes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn envelopes_out(&self, n: usize) {
        self.envelopes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn rekeyed(&self) {
        self.rekeys.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn error(&self, code: ErrorCode) {
        *self
            .errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(code_label(code))
            .or_default() += 1;
    }
}

/// Keeps `connections_open` counted while a connection lives.
pub(crate) struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The label of an error code in metrics.
pub fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::VersionMismatch => "version_mismatch",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::AdmissionRequired => "admission_required",
        ErrorCode::Protocol => "protocol",
        ErrorCode::BadEnvelope => "bad_envelope",
        ErrorCode::MailboxFull => "mailbox_full",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::ShuttingDown => "shutting_down",
        _ => "other",
    }
}

/// Serves `/healthz` and `/metrics` on `listener` until `shutdown`.
pub(crate) async fn serve_http<B: RelayBackend>(
    listener: TcpListener,
    backend: Arc<B>,
    metrics: Arc<Metrics>,
    mut shutdown: ShutdownSignal,
) {
    let slots = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.requested() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint cannot accept");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics endpoint busy: connection dropped");
            continue;
        };
        let backend = backend.clone();
        let metrics = metrics.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                respond(request, backend.clone(), metrics.clone())
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(HTTP_CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                Err(_) => tracing::debug!("metrics request timed out"),
            }
            drop(slot);
        });
    }
}

async fn respond<B: RelayBackend>(
    request: Request<hyper::body::Incoming>,
    backend: Arc<B>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()));
    }
    let response = match request.uri().path() {
        "/healthz" => match backend.stats().await {
            Ok(_) => text(StatusCode::OK, "ok\n".into()),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unavailable: {e}\n"),
            ),
        },
        "/metrics" => {
            let stats = backend.stats().await.ok();
            let mut response = text(StatusCode::OK, metrics.render(stats));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "try /healthz or /metrics\n".into()),
    };
    Ok(response)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let metrics = Arc::new(Metrics::default());
        let open = metrics.connection_opened();
        metrics.envelopes_in(3);
        metrics.rekeyed();
        metrics.error(ErrorCode::Unauthorized);
        metrics.error(ErrorCode::Unauthorized);
        let text = metrics.render(Some(RelayStats {
            stores: 2,
            entries: 5,
            envelope_bytes: 700,
        }));
        for line in [
            "persist_relay_connections_total 1",
            "persist_relay_connections_open 1",
            "persist_relay_envelopes_in_total 3",
            "persist_relay_rekeys_total 1",
            "persist_relay_stores 2",
            "persist_relay_backend_up 1",
            "persist_relay_errors_total{code=\"unauthorized\"} 2",
            "# TYPE persist_relay_envelopes_in_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        drop(open);
        let text = metrics.render(None);
        assert!(text.contains("persist_relay_connections_open 0"));
        assert!(text.contains("persist_relay_backend_up 0"));
        assert!(!text.contains("persist_relay_stores"));
    }
}
