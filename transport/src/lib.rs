//! Persist's transport: how `persist/1` messages travel between a device
//! and a relay (or another device).
//!
//! ```text
//!   caller ── Message ──▶ frame::FrameSender ──▶ bytes ──▶ frame::FrameReceiver ──▶ Message
//!                             │                                   ▲
//!                             └──── quic (QUIC stream, TLS 1.3) ──┤
//!                             └──── memory (in-process pipe) ─────┘
//! ```
//!
//! - [`frame`]: u32 length + postcard framing over any byte stream, with
//!   the protocol's size limit enforced before allocation and every
//!   message's bounds checked. [`SendHalf`] / [`RecvHalf`] are the boxed,
//!   non-generic halves every conversation uses.
//! - [`tls`]: server identities (self-signed on first start and kept, or an
//!   operator's CA-signed certificate), [`CertPin`]s, and client [`Trust`]
//!   (exact pin, or WebPKI roots).
//! - [`quic`]: a QUIC [`Server`] and [`connect`], yielding [`Connection`]s
//!   whose streams are conversations.
//! - [`memory`]: two connected ends in one process, for tests and
//!   simulations.
//! - `sim` (feature `sim`, debug builds only): the QUIC endpoints over a
//!   simulation's in-memory UDP socket, every secret seeded.
//!
//! This crate moves bytes; it never looks inside an envelope and never
//! decides what a conversation means (that is the relay's and the
//! engine's job).
//!
//! ```
//! use persist_core::protocol::Message;
//! use persist_transport::memory;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ((mut client_tx, _client_rx), (_server_tx, mut server_rx)) = memory::pair();
//! client_tx.send(&Message::Subscribe).await?;
//! assert_eq!(server_rx.recv().await?, Some(Message::Subscribe));
//! # Ok(())
//! # }
//! ```

pub mod frame;
pub mod memory;
pub mod quic;
#[cfg(feature = "sim")]
pub mod sim;
pub mod tls;

pub use frame::{FrameError, FrameReceiver, FrameSender, RecvHalf, SendHalf};
pub use quic::{Client, ConnectError, Connection, Server, connect};
pub use tls::{CertPin, ServerIdentity, Trust};
