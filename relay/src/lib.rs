//! The Persist relay node: stores and forwards ciphertext for many stores.
//!
//! A relay keeps, per store, a log of envelopes with its own sequence
//! numbers (only the highest-precedence envelope per locator), and per
//! device a mailbox of opaque items. Devices reach it over QUIC with
//! pinned TLS ([`persist_transport`]) and speak `persist/1`
//! ([`persist_core::protocol`]). It never decrypts: from an envelope it
//! reads only the clear header, for the precedence that decides which
//! copy of a record it keeps.
//!
//! - [`session`]: one conversation over any backend and any transport —
//!   also what a device uses to serve its own store to a peer.
//! - [`node`]: the running node (QUIC server, connection and session
//!   tasks, graceful shutdown).
//! - [`metrics`]: counters, Prometheus text, `/healthz` and `/metrics`.
//!
//! Storage is a [`persist_storage::relay::RelayBackend`]: redb by default
//! (the `persist-relay` binary), in memory for tests and simulations.
//!
//! ```
//! use persist_core::protocol::{AccessKey, Hello, Message, PROTOCOL_VERSION};
//! use persist_core::{DeviceId, StoreId};
//! use persist_relay::session::{self, Admission, SessionContext};
//! use persist_storage::relay::MemoryRelay;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = MemoryRelay::new();
//! let ctx = SessionContext::new(Admission::Open);
//! let ((mut client_tx, mut client_rx), (server_tx, server_rx)) = persist_transport::memory::pair();
//! let server = async { session::serve(&backend, &ctx, server_tx, server_rx).await };
//! let client = async {
//!     let hello = Hello {
//!         version: PROTOCOL_VERSION,
//!         store: StoreId([1; 16]),
//!         access: AccessKey([2; 32]),
//!         device: DeviceId([3; 16]),
//!         admission: None,
//!     };
//!     client_tx.send(&Message::Hello(hello)).await?;
//!     let welcome = client_rx.recv().await?;
//!     assert!(matches!(welcome, Some(Message::Welcome(w)) if w.created && w.head == 0));
//!     client_tx.finish().await?; // ends the conversation
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! };
//! let (end, client) = tokio::join!(server, client);
//! client?;
//! assert_eq!(end, session::SessionEnd::Finished);
//! # Ok(())
//! # }
//! ```

pub mod metrics;
pub mod node;
pub mod session;

pub use metrics::Metrics;
pub use node::{IdentitySource, RelayConfig, RelayHandle, StartError, start};
pub use session::{Admission, AdmissionSecret, SessionContext, SessionEnd, serve};
