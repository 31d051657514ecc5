//! The sync wire protocol `persist/1`: message types, limits and the access
//! credential. Transport frames these (u32 length + postcard); this module
//! decides what a frame may contain.
//!
//! # Conversation
//!
//! A client (a device) opens one bidirectional stream and speaks first:
//!
//! ```text
//! client                              server (relay, or a serving device)
//! Hello{version, store, access, ..} →
//!                                   ← Welcome{head}        or Error + close
//! Push{id, entries}                 →
//!                                   ← PushAck{id, accepted, stale, head}
//! Pull{since, limit}                →
//!                                   ← Batch{entries, cursor, more}
//! Subscribe                         →
//!                                   ← Notify{head}   (whenever the log grows)
//! MailboxPut / MailboxFetch / MailboxAck → MailboxStored / Mailbox / MailboxAcked
//! Rekey{access}                     →
//!                                   ← Rekeyed              or Error + close
//! ```
//!
//! Pulls are client-driven and one at a time, so a client's cursor only ever
//! advances over entries it has applied; `Notify` carries only a sequence
//! number (no data), telling the client there is something to pull. Pushes
//! carry an id that the acknowledgement echoes. A server answers a bad
//! message with [`Message::Error`] and closes that connection only.
//!
//! `Rekey` replaces the store's credential on the server with `access`
//! (device revocation hands the remaining members a new relay token): the
//! session that asks must hold the current credential, it goes on under
//! the new one, and every other conversation still holding the old one is
//! refused `Error{Unauthorized}` at its next request.
//!
//! # Invariants
//! - Every collection in a message is bounded by a named constant here, and
//!   [`Message::check_bounds`] enforces them after decoding.
//! - No message carries a plaintext path, value or key: entries are
//!   envelopes (ciphertext) under locators; the access credential is derived
//!   from the relay token one-way, so the token itself never leaves a device.
//! - `Hello` is the first message of every conversation and starts with the
//!   protocol version, so [`peek_hello_version`] reads it from any future
//!   version's `Hello` before the rest is decoded.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{DeviceId, Locator, StoreId};
use crate::keys::Secret32;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The QUIC ALPN identifier.
pub const ALPN: &[u8] = b"persist/1";
/// The largest frame either side sends or accepts: one envelope of the
/// largest record (8 MiB value, padded) plus framing fits with room to spare.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Envelopes per `Push` or `Batch`: large enough to amortise a round trip
/// and a commit, small enough that one frame is applied in one slice.
pub const ENTRIES_PER_MESSAGE_MAX: usize = 1024;
/// Envelope bytes a sender packs into one `Push` or `Batch` before starting
/// another. A single larger envelope still travels alone.
pub const MESSAGE_PAYLOAD_BYTES_TARGET: usize = 4 * 1024 * 1024;
/// Bytes of one mailbox item: key wraps and handshake messages are small.
pub const MAILBOX_ITEM_BYTES_MAX: usize = 64 * 1024;
/// Items a device's mailbox holds before the relay refuses more.
pub const MAILBOX_ITEMS_MAX: usize = 1024;
/// Bytes of an error's text.
pub const ERROR_TEXT_BYTES_MAX: usize = 1024;
/// Bytes of an admission secret.
pub const ADMISSION_BYTES_MAX: usize = 256;

const _: () = assert!(crate::envelope::ENVELOPE_BYTES_MAX + 1024 < FRAME_BYTES_MAX);
const _: () = assert!(MESSAGE_PAYLOAD_BYTES_TARGET + 1024 * 64 < FRAME_BYTES_MAX);

/// Domain separating the access credential from every other use of the token.
const DOMAIN_ACCESS: &[u8] = b"persist/relay-access/v1";

/// What a device presents to a relay to reach a store: HMAC-SHA256 of the
/// store id under the store's relay token. The relay keeps only
/// [`AccessKey::fingerprint`]; the token never leaves a device.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKey(pub [u8; 32]);

impl AccessKey {
    /// The credential for `store` under `relay_token`.
    pub fn derive(relay_token: &Secret32, store: &StoreId) -> Self {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(relay_token.expose())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(DOMAIN_ACCESS);
        mac.update(store.as_bytes());
        Self(mac.finalize().into_bytes().into())
    }

    /// SHA-256 of the credential: what a relay stores and compares.
    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(self.0).into()
    }
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessKey(..)")
    }
}

/// An envelope as pushed: where it is stored and its bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEntry {
    /// `HMAC(K_index, store ‖ path)`.
    pub locator: Locator,
    /// The sealed envelope.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

/// An envelope in a server's log, with the server's sequence number.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The server's sequence number for it; strictly increasing in a log.
    pub seq: u64,
    /// Where it is stored.
    pub locator: Locator,
    /// The sealed envelope.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

macro_rules! debug_by_size {
    ($t:ty) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    .field("locator", &self.locator)
                    .field("envelope_bytes", &self.envelope.len())
                    .finish_non_exhaustive()
            }
        }
    };
}
debug_by_size!(PushEntry);
debug_by_size!(LogEntry);

/// One opaque item in a device's mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxItem {
    /// The relay's sequence number for it within the mailbox.
    pub seq: u64,
    /// Opaque bytes (a key wrap, a handshake message).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// The opening message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender. Must stay the first field.
    pub version: u16,
    /// The store the client wants.
    pub store: StoreId,
    /// Its credential for the store.
    pub access: AccessKey,
    /// The client device.
    pub device: DeviceId,
    /// The operator's admission secret, when the relay requires one to
    /// create stores.
    pub admission: Option<String>,
}

/// The server's answer to an accepted `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the server.
    pub version: u16,
    /// The sequence number of the newest entry in the store's log (0: empty).
    pub head: u64,
    /// Whether this `Hello` created the store on the server.
    pub created: bool,
}

/// Why a server refused something. Stable codes; the text is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The access credential does not match the store's.
    Unauthorized,
    /// The relay requires an admission secret to create a store, and the
    /// one given (if any) is wrong.
    AdmissionRequired,
    /// A message broke the protocol (wrong order, over a bound, undecodable).
    Protocol,
    /// An envelope in a push did not parse.
    BadEnvelope,
    /// A mailbox is full.
    MailboxFull,
    /// The server's storage failed; retry later.
    Unavailable,
    /// The server is shutting down; reconnect later.
    ShuttingDown,
}

impl ErrorCode {
    /// Whether retrying later (the same request, unchanged) can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::ShuttingDown | ErrorCode::MailboxFull
        )
    }
}

/// Every message of `persist/1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Client → server, first.
    Hello(Hello),
    /// Server → client: the `Hello` was accepted.
    Welcome(Welcome),
    /// Client → server: envelopes to store.
    Push {
        /// Echoed by the acknowledgement.
        id: u64,
        /// At most [`ENTRIES_PER_MESSAGE_MAX`].
        entries: Vec<PushEntry>,
    },
    /// Server → client: a push is durable.
    PushAck {
        /// The push's id.
        id: u64,
        /// Entries stored (they were newer than what the server had).
        accepted: u32,
        /// Entries the server already had at this or a higher precedence.
        stale: u32,
        /// The server log's head after the push.
        head: u64,
    },
    /// Client → server: log entries after `since`.
    Pull {
        /// The client's cursor (0: from the start).
        since: u64,
        /// At most this many entries (capped at [`ENTRIES_PER_MESSAGE_MAX`]).
        limit: u32,
    },
    /// Server → client: the answer to a `Pull`.
    Batch {
        /// Entries in increasing `seq`.
        entries: Vec<LogEntry>,
        /// The cursor to pull from next: the last entry's seq, or the
        /// request's `since` if there were none.
        cursor: u64,
        /// Whether more entries follow `cursor` right now.
        more: bool,
    },
    /// Client → server: send `Notify` whenever the log grows.
    Subscribe,
    /// Server → client: the log's head is now `head`.
    Notify {
        /// The newest sequence number.
        head: u64,
    },
    /// Client → server: leave `payload` in `to`'s mailbox.
    MailboxPut {
        /// The recipient device (or a mailbox name such as an invite id).
        to: DeviceId,
        /// At most [`MAILBOX_ITEM_BYTES_MAX`] bytes.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Server → client: the item is stored.
    MailboxStored {
        /// Its sequence number in that mailbox.
        seq: u64,
    },
    /// Client → server: items of `mailbox` after `since`.
    MailboxFetch {
        /// Whose mailbox.
        mailbox: DeviceId,
        /// Cursor within the mailbox.
        since: u64,
    },
    /// Server → client: the answer to `MailboxFetch`.
    Mailbox {
        /// Items in increasing `seq`.
        items: Vec<MailboxItem>,
    },
    /// Client → server: delete items of `mailbox` up to and including `upto`.
    MailboxAck {
        /// Whose mailbox.
        mailbox: DeviceId,
        /// Last item to delete.
        upto: u64,
    },
    /// Server → client: the acknowledged items are deleted.
    MailboxAcked,
    /// Either way: a refusal. The server closes the connection after
    /// sending one, unless the code is retryable.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// For people; at most [`ERROR_TEXT_BYTES_MAX`] bytes.
        text: String,
    },
    // Variants below came after the first release of `persist/1`: they are
    // appended, so every earlier variant keeps its encoding (postcard
    // encodes a variant by its index). A server that predates them answers
    // one with `Error{Protocol}`, as it does any message it cannot decode.
    /// Client → server, after `Welcome` only: from now on the store's
    /// credential is `access` (the server keeps its fingerprint). The
    /// conversation goes on under it; every other conversation with the
    /// old credential is refused at its next request.
    Rekey {
        /// The new credential.
        access: AccessKey,
    },
    /// Server → client: the store's credential is now the one the `Rekey`
    /// carried, durably.
    Rekeyed,
}

/// A decoded message broke a bound of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} has {len}, at most {max} allowed")]
pub struct BoundError {
    /// Which field.
    pub what: &'static str,
    /// Its size.
    pub len: usize,
    /// Its bound.
    pub max: usize,
}

impl Message {
    /// Checks every collection against its bound. Decoders call this on
    /// each received message; a violation is a protocol error.
    pub fn check_bounds(&self) -> Result<(), BoundError> {
        let check = |what, len, max| {
            if len > max {
                Err(BoundError { what, len, max })
            } else {
                Ok(())
            }
        };
        match self {
            Message::Hello(hello) => check(
                "admission secret bytes",
                hello.admission.as_ref().map_or(0, String::len),
                ADMISSION_BYTES_MAX,
            ),
            Message::Push { entries, .. } => {
                check("push entries", entries.len(), ENTRIES_PER_MESSAGE_MAX)
            }
            Message::Batch { entries, .. } => {
                check("batch entries", entries.len(), ENTRIES_PER_MESSAGE_MAX)
            }
            Message::MailboxPut { payload, .. } => {
                check("mailbox item bytes", payload.len(), MAILBOX_ITEM_BYTES_MAX)
            }
            Message::Mailbox { items } => {
                check("mailbox items", items.len(), MAILBOX_ITEMS_MAX)?;
                items.iter().try_for_each(|item| {
                    check(
                        "mailbox item bytes",
                        item.payload.len(),
                        MAILBOX_ITEM_BYTES_MAX,
                    )
                })
            }
            Message::Error { text, .. } => {
                check("error text bytes", text.len(), ERROR_TEXT_BYTES_MAX)
            }
            Message::Welcome(_)
            | Message::PushAck { .. }
            | Message::Pull { .. }
            | Message::Subscribe
            | Message::Notify { .. }
            | Message::MailboxStored { .. }
            | Message::MailboxFetch { .. }
            | Message::MailboxAck { .. }
            | Message::MailboxAcked
            | Message::Rekey { .. }
            | Message::Rekeyed => Ok(()),
        }
    }

    /// An error message, its text cut to [`ERROR_TEXT_BYTES_MAX`] bytes at
    /// a character boundary.
    pub fn error(code: ErrorCode, text: impl Into<String>) -> Self {
        let mut text = text.into();
        if text.len() > ERROR_TEXT_BYTES_MAX {
            let mut end = ERROR_TEXT_BYTES_MAX;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        Message::Error { code, text }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Push { .. } => "push",
            Message::PushAck { .. } => "push_ack",
            Message::Pull { .. } => "pull",
            Message::Batch { .. } => "batch",
            Message::Subscribe => "subscribe",
            Message::Notify { .. } => "notify",
            Message::MailboxPut { .. } => "mailbox_put",
            Message::MailboxStored { .. } => "mailbox_stored",
            Message::MailboxFetch { .. } => "mailbox_fetch",
            Message::Mailbox { .. } => "mailbox",
            Message::MailboxAck { .. } => "mailbox_ack",
            Message::MailboxAcked => "mailbox_acked",
            Message::Error { .. } => "error",
            Message::Rekey { .. } => "rekey",
            Message::Rekeyed => "rekeyed",
        }
    }
}

/// The protocol version in an encoded `Hello`, read without decoding the
/// rest, so a server can name a version mismatch even when a future
/// `Hello` has a different layout. `None` if `frame` is not a `Hello`.
pub fn peek_hello_version(frame: &[u8]) -> Option<u16> {
    #[derive(Deserialize)]
    enum Prefix {
        Hello(u16),
    }
    // `Message::Hello` is variant 0 and `version` is the first field of
    // `Hello`, so the encoding starts with varint(0) ‖ varint(version):
    // exactly the encoding of `Prefix::Hello(version)`.
    match postcard::take_from_bytes::<Prefix>(frame) {
        Ok((Prefix::Hello(version), _)) => Some(version),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(version: u16) -> Message {
        Message::Hello(Hello {
            version,
            store: StoreId([7; 16]),
            access: AccessKey([9; 32]),
            device: DeviceId([3; 16]),
            admission: Some("let me in".into()),
        })
    }

    #[test]
    fn hello_version_is_readable_from_the_prefix() {
        for version in [0, 1, 2, 300, u16::MAX] {
            let bytes = postcard::to_stdvec(&hello(version)).expect("encodes");
            assert_eq!(peek_hello_version(&bytes), Some(version));
        }
        let other = postcard::to_stdvec(&Message::Subscribe).expect("encodes");
        assert_eq!(peek_hello_version(&other), None);
        assert_eq!(peek_hello_version(&[]), None);
    }

    #[test]
    fn messages_round_trip() {
        let messages = [
            hello(PROTOCOL_VERSION),
            Message::Push {
                id: 4,
                entries: vec![PushEntry {
                    locator: Locator([1; 32]),
                    envelope: vec![5; 300],
                }],
            },
            Message::Batch {
                entries: vec![LogEntry {
                    seq: 9,
                    locator: Locator([2; 32]),
                    envelope: vec![6; 10],
                }],
                cursor: 9,
                more: true,
            },
            Message::error(ErrorCode::Unauthorized, "no"),
            Message::Notify { head: u64::MAX },
            Message::Rekey {
                access: AccessKey([8; 32]),
            },
            Message::Rekeyed,
        ];
        for message in messages {
            let bytes = postcard::to_stdvec(&message).expect("encodes");
            let back: Message = postcard::from_bytes(&bytes).expect("decodes");
            assert_eq!(back, message);
        }
    }

    #[test]
    fn earlier_variants_keep_their_encoding() {
        // The first byte is the variant index: appending variants must not
        // move the ones that shipped.
        let first_byte = |m: &Message| postcard::to_stdvec(m).expect("encodes")[0];
        assert_eq!(first_byte(&hello(1)), 0);
        assert_eq!(first_byte(&Message::Subscribe), 6);
        assert_eq!(first_byte(&Message::MailboxAcked), 13);
        assert_eq!(first_byte(&Message::error(ErrorCode::Protocol, "")), 14);
        let rekey = Message::Rekey {
            access: AccessKey([1; 32]),
        };
        assert_eq!(first_byte(&rekey), 15);
        assert_eq!(first_byte(&Message::Rekeyed), 16);
        assert_eq!(
            peek_hello_version(&postcard::to_stdvec(&rekey).expect("encodes")),
            None
        );
        assert_eq!(rekey.kind(), "rekey");
        assert!(rekey.check_bounds().is_ok());
    }

    #[test]
    fn bounds_are_enforced() {
        let entry = PushEntry {
            locator: Locator([0; 32]),
            envelope: Vec::new(),
        };
        let push = Message::Push {
            id: 1,
            entries: vec![entry; ENTRIES_PER_MESSAGE_MAX + 1],
        };
        assert_eq!(
            push.check_bounds(),
            Err(BoundError {
                what: "push entries",
                len: ENTRIES_PER_MESSAGE_MAX + 1,
                max: ENTRIES_PER_MESSAGE_MAX
            })
        );
        let mail = Message::MailboxPut {
            to: DeviceId([0; 16]),
            payload: vec![0; MAILBOX_ITEM_BYTES_MAX + 1],
        };
        assert!(mail.check_bounds().is_err());
        assert!(hello(1).check_bounds().is_ok());
    }

    #[test]
    fn error_text_is_cut_at_a_char_boundary() {
        let Message::Error { text, .. } = Message::error(ErrorCode::Protocol, "é".repeat(2000))
        else {
            unreachable!("Message::error builds an Error")
        };
        assert!(text.len() <= ERROR_TEXT_BYTES_MAX);
        assert!(text.chars().all(|c| c == 'é'));
    }

    #[test]
    fn access_key_depends_on_token_and_store() {
        let token = Secret32::from_bytes([1; 32]);
        let a = AccessKey::derive(&token, &StoreId([1; 16]));
        let b = AccessKey::derive(&token, &StoreId([2; 16]));
        let c = AccessKey::derive(&Secret32::from_bytes([2; 32]), &StoreId([1; 16]));
        assert!(a != b && a != c && b != c);
        assert!(a.0 != *token.expose(), "the token itself is never sent");
        assert_eq!(a.fingerprint(), <[u8; 32]>::from(Sha256::digest(a.0)));
    }
}
