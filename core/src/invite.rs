//! Invites and the pairing handshake (DESIGN.md, "Pairing").
//!
//! An inviter makes an [`Invite`]: one copyable code holding the relay's
//! address and certificate pin, the store id, a random invite id, the
//! inviter's X25519 public key, a 32-byte one-time secret and an expiry.
//! The joining device runs `Noise_IKpsk2_25519_AESGCM_SHA256` with the
//! inviter through two relay mailboxes named after the invite id:
//!
//! ```text
//! joiner                                      inviter
//! msg1 = -> e, es, s, ss   {Join: Ed25519 key, name}       (to-inviter)
//!        <- e, ee, se, psk {Accepted | Refused(why)}       msg2 (to-joiner)
//! confirm = transport{Confirm}                             (to-inviter)
//!        transport{Grant chunk 1/n} … {Grant n/n}          (to-joiner)
//!     or transport{Abort(why)}
//! ```
//!
//! The joiner knows the inviter's static key from the code, so `es` and
//! `ss` authenticate the inviter; the psk, derived from the one-time
//! secret, is mixed into the second message, so neither side finishes the
//! handshake with anyone who lacks the code. The inviter hands out keys
//! only after the joiner's `Confirm` decrypts, which proves the joiner
//! completed the handshake with the psk: a relay that replays the first
//! message, or substitutes its own keys, gets nothing. The grant is the
//! store's key export plus the member list, encrypted under the transport
//! keys of this one handshake.
//!
//! The relay sees the invite id (as the name of a mailbox store), the
//! access credential derived from the secret, and opaque Noise bytes. It
//! never sees the secret, the psk or any key.
//!
//! # Attempts
//!
//! A joiner whose inviter is offline may give up and try again later with
//! the same code: a new attempt, with a new handshake. The inviter answers
//! the first messages it finds in order, so the joiner's mailbox can hold
//! answers (and aborts) for attempts nobody waits on any more. Everything
//! the inviter sends is therefore framed with the attempt it belongs to
//! (a hash of that attempt's first message) and a MAC under a key derived
//! from the invite secret:
//!
//! ```text
//! attempt (16) | HMAC-SHA256(route key, attempt | noise) (32) | noise
//! ```
//!
//! A joiner skips a frame whose MAC holds but whose attempt is another
//! ([`Received::Stale`]): only a holder of the code made it, for a
//! handshake that is not this one. Anything else that does not open (a bad
//! MAC, or this attempt's frame failing Noise) is tampering and ends the
//! pairing with [`PairingError::Handshake`]. The frame adds no trust: the
//! Noise handshake alone decides what is accepted; the MAC only tells an
//! honest leftover from a forgery.
//!
//! # Invariants
//! - The invite secret is used only through domain-separated derivations
//!   ([`Invite::relay_access`], the psk); it never leaves the code or the
//!   inviter's sealed keyring.
//! - Randomness comes from the caller's stream (the injected environment),
//!   never from the OS: snow draws its ephemeral keys through [`Resolver`].
//! - Every message is bounded: a Noise message by [`NOISE_MESSAGE_BYTES_MAX`],
//!   a framed one by [`crate::protocol::MAILBOX_ITEM_BYTES_MAX`], a grant by
//!   [`GRANT_CHUNKS_MAX`] chunks.
//! - The joiner acts only on frames of its own attempt; a frame of another
//!   attempt is skipped only if its MAC proves it came from a holder of the
//!   code.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{HandshakeState, TransportState};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::env::RngStream;
use crate::export::{self, ExportError, ExportedKeys};
use crate::ids::{DeviceId, InviteId, StoreId};
use crate::keyring::{Keyring, Member};
use crate::keys::{DeviceIdentity, Secret32};
use crate::protocol::AccessKey;

/// What every invite code starts with.
pub const PREFIX: &str = "persist-invite-v1:";
/// The Noise protocol of the handshake.
pub const NOISE_PARAMS: &str = "Noise_IKpsk2_25519_AESGCM_SHA256";
/// How long an invite lasts unless the inviter says otherwise.
pub const TTL_DEFAULT_MS: u64 = 24 * 60 * 60 * 1000;
/// The longest an invite may last.
pub const TTL_MAX_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// Invites a device keeps open at once; more is a mistake or an attack.
pub const OPEN_INVITES_MAX: usize = 64;
/// Bytes of a relay address in a code.
pub const RELAY_BYTES_MAX: usize = 256;
/// Bytes of an invite code's text.
pub const CODE_BYTES_MAX: usize = 2048;
/// Bytes of a Noise message (the Noise specification's limit).
pub const NOISE_MESSAGE_BYTES_MAX: usize = 65_535;
/// Plaintext bytes of one grant chunk: a chunk with its framing and tag
/// stays under [`NOISE_MESSAGE_BYTES_MAX`].
const GRANT_CHUNK_BYTES: usize = 60_000;
/// Chunks in one grant: bounds what a joiner buffers (3.8 MB).
pub const GRANT_CHUNKS_MAX: usize = 64;
/// Bytes of a device name in the handshake.
pub const NAME_BYTES_MAX: usize = 256;

const DOMAIN_RELAY_TOKEN: &[u8] = b"persist/invite-relay-token/v1";
const DOMAIN_PSK: &[u8] = b"persist/invite-psk/v1";
const DOMAIN_JOINER_MAILBOX: &[u8] = b"persist/invite-joiner-mailbox/v1";
const DOMAIN_PROLOGUE: &[u8] = b"persist/pairing/v1";
const DOMAIN_ROUTE_KEY: &[u8] = b"persist/invite-route-key/v1";
const DOMAIN_ATTEMPT: &[u8] = b"persist/invite-attempt/v1";

/// Bytes naming an attempt: a hash of its first message.
const ATTEMPT_BYTES: usize = 16;
/// Bytes of a frame's MAC (HMAC-SHA256).
const FRAME_MAC_BYTES: usize = 32;
/// Bytes a frame adds to what the inviter sends.
const FRAME_HEADER_BYTES: usize = ATTEMPT_BYTES + FRAME_MAC_BYTES;

const _: () = assert!(GRANT_CHUNK_BYTES + 64 < NOISE_MESSAGE_BYTES_MAX);
const _: () = assert!(NOISE_MESSAGE_BYTES_MAX <= crate::protocol::MAILBOX_ITEM_BYTES_MAX);
// The largest framed message (a grant chunk) fits in one mailbox item.
const _: () =
    assert!(GRANT_CHUNK_BYTES + 64 + FRAME_HEADER_BYTES <= crate::protocol::MAILBOX_ITEM_BYTES_MAX);

/// An invite code that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InviteError {
    /// The text does not start with [`PREFIX`].
    #[error("this is not a Persist invite (it should start with \"{PREFIX}\")")]
    NotAnInvite,
    /// The code was made by a newer Persist.
    #[error("this invite uses a newer format than this build reads: upgrade Persist")]
    UnsupportedVersion,
    /// Truncated, edited or badly copied.
    #[error("the invite code is damaged (truncated, edited or badly copied); copy it again")]
    Damaged,
    /// Past its expiry.
    #[error(
        "the invite expired {ago_minutes} minute(s) ago; ask for a new one \
         (`persist invite create` on a device of the store)"
    )]
    Expired {
        /// How long ago.
        ago_minutes: u64,
    },
    /// The code decoded but holds something impossible.
    #[error("the invite code is invalid: {0}")]
    Invalid(&'static str),
}

/// Why an inviter turned a joiner away. Sent inside the authenticated
/// handshake, so a relay cannot forge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Another device already joined with this invite.
    #[error("this invite was already used by another device; ask for a new one")]
    Used,
    /// The inviter's clock says the invite has expired.
    #[error("the inviter says this invite has expired; ask for a new one")]
    Expired,
}

/// A pairing that did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PairingError {
    /// A handshake message did not authenticate: the other side does not
    /// hold the invite's secret or the inviter's key, or a relay altered,
    /// replayed or replaced it.
    #[error(
        "the pairing handshake did not authenticate ({0}): the code does not match \
         this inviter, or the relay tampered with the exchange"
    )]
    Handshake(&'static str),
    /// The inviter refused.
    #[error("{0}")]
    Refused(Refusal),
    /// The other side gave up, and said why.
    #[error("the other device stopped the pairing: {0}")]
    Aborted(String),
    /// A message arrived that the protocol does not allow here.
    #[error("unexpected pairing message: {0}")]
    Protocol(&'static str),
    /// The keys received do not open.
    #[error("the keys received do not fit the invite: {0}")]
    Keys(String),
}

/// The content of an invite code. Holds the one-time secret: whoever has
/// the code can join the store until it is used or expires.
pub struct Invite {
    /// The relay both devices reach (`quic://host:port`).
    pub relay: String,
    /// SHA-256 of the relay's certificate, when it is trusted by pin.
    pub pin: Option<[u8; 32]>,
    /// The store to join.
    pub store_id: StoreId,
    /// The invite.
    pub id: InviteId,
    /// The inviting device.
    pub inviter: DeviceId,
    /// The inviter's X25519 public key (its Noise static key).
    pub inviter_x25519: [u8; 32],
    /// The one-time secret.
    pub secret: Secret32,
    /// When it expires (ms since the Unix epoch, by the inviter's clock).
    pub expires_ms: u64,
}

impl std::fmt::Debug for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invite")
            .field("relay", &self.relay)
            .field("store_id", &self.store_id)
            .field("id", &self.id)
            .field("inviter", &self.inviter)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

/// What an inviter keeps of an invite it made, sealed in its keyring.
pub struct OpenInvite {
    /// The invite.
    pub id: InviteId,
    /// Its one-time secret (kept after use, to refuse a second joiner
    /// inside the authenticated handshake, until it expires).
    pub secret: Secret32,
    /// When it expires.
    pub expires_ms: u64,
    /// The device that joined with it, once one has.
    pub used_by: Option<DeviceId>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct InviteWire {
    relay: String,
    pin: Option<[u8; 32]>,
    store: [u8; 16],
    id: [u8; 16],
    inviter: [u8; 16],
    inviter_x25519: [u8; 32],
    secret: [u8; 32],
    expires_ms: u64,
}

impl Invite {
    /// A new invite into `ring`'s store, by `ring`'s device, reached through
    /// `relay`; and what the inviter keeps of it.
    pub fn create(
        ring: &Keyring,
        relay: &str,
        pin: Option<[u8; 32]>,
        expires_ms: u64,
        rng: &mut (impl rand_core::CryptoRng + ?Sized),
    ) -> Result<(Invite, OpenInvite), InviteError> {
        if relay.len() > RELAY_BYTES_MAX {
            return Err(InviteError::Invalid("the relay address is too long"));
        }
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let secret = Secret32::random(rng);
        let invite = Invite {
            relay: relay.to_owned(),
            pin,
            store_id: ring.store_id,
            id: InviteId(id),
            inviter: ring.device_id(),
            inviter_x25519: ring.device.x25519_public(),
            secret: secret.duplicate(),
            expires_ms,
        };
        let open = OpenInvite {
            id: InviteId(id),
            secret,
            expires_ms,
            used_by: None,
        };
        Ok((invite, open))
    }

    /// The code: [`PREFIX`] then base64url of the content and a checksum.
    pub fn encode(&self) -> Zeroizing<String> {
        let wire = InviteWire {
            relay: self.relay.clone(),
            pin: self.pin,
            store: self.store_id.0,
            id: self.id.0,
            inviter: self.inviter.0,
            inviter_x25519: self.inviter_x25519,
            secret: *self.secret.expose(),
            expires_ms: self.expires_ms,
        };
        let body = Zeroizing::new(
            postcard::to_stdvec(&wire)
                .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}")),
        );
        Zeroizing::new(export::finish(PREFIX, body.to_vec()))
    }

    /// Reads a code made by [`Invite::encode`]. Whitespace inside it (from
    /// line wrapping) is ignored. Does not check expiry: see
    /// [`Invite::check_fresh`].
    pub fn decode(code: &str) -> Result<Invite, InviteError> {
        let code = code.trim();
        if code.len() > CODE_BYTES_MAX {
            return Err(InviteError::Damaged);
        }
        let rest = code.strip_prefix(PREFIX).ok_or_else(|| {
            if code.starts_with("persist-invite-") {
                InviteError::UnsupportedVersion
            } else {
                InviteError::NotAnInvite
            }
        })?;
        let body = export::unframe(PREFIX, rest).map_err(|_| InviteError::Damaged)?;
        let wire: InviteWire = postcard::from_bytes(&body).map_err(|_| InviteError::Damaged)?;
        // The address is checked where it is used (a QUIC remote parses
        // it); a simulation's relay has a name, not an address.
        if wire.relay.len() > RELAY_BYTES_MAX {
            return Err(InviteError::Invalid("the relay address is too long"));
        }
        Ok(Invite {
            relay: wire.relay.clone(),
            pin: wire.pin,
            store_id: StoreId(wire.store),
            id: InviteId(wire.id),
            inviter: DeviceId(wire.inviter),
            inviter_x25519: wire.inviter_x25519,
            secret: Secret32::from_bytes(wire.secret),
            expires_ms: wire.expires_ms,
        })
    }

    /// Refuses an invite past its expiry at `now_ms`.
    pub fn check_fresh(&self, now_ms: u64) -> Result<(), InviteError> {
        if now_ms >= self.expires_ms {
            return Err(InviteError::Expired {
                ago_minutes: (now_ms - self.expires_ms) / 60_000,
            });
        }
        Ok(())
    }

    /// The relay store that holds the pairing mailboxes: named by the invite
    /// id, unrelated to the store being joined.
    pub fn relay_store(&self) -> StoreId {
        relay_store(self.id)
    }

    /// The credential for [`Invite::relay_store`].
    pub fn relay_access(&self) -> AccessKey {
        relay_access(self.id, &self.secret)
    }
}

/// The relay store of invite `id`'s mailboxes.
pub fn relay_store(id: InviteId) -> StoreId {
    StoreId(id.0)
}

/// The credential for invite `id`'s relay store, from its secret.
pub fn relay_access(id: InviteId, secret: &Secret32) -> AccessKey {
    let token = Secret32::from_bytes(derive(secret, DOMAIN_RELAY_TOKEN, id));
    AccessKey::derive(&token, &relay_store(id))
}

/// The mailbox the joiner writes to and the inviter reads.
pub fn inviter_mailbox(id: InviteId) -> DeviceId {
    DeviceId(id.0)
}

/// The mailbox the inviter writes to and the joiner reads.
pub fn joiner_mailbox(id: InviteId) -> DeviceId {
    let digest = Sha256::new()
        .chain_update(DOMAIN_JOINER_MAILBOX)
        .chain_update(id.0)
        .finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    DeviceId(out)
}

fn derive(secret: &Secret32, domain: &[u8], id: InviteId) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.expose())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(domain);
    mac.update(&id.0);
    mac.finalize().into_bytes().into()
}

fn prologue(store: StoreId, id: InviteId, inviter: DeviceId) -> Vec<u8> {
    [DOMAIN_PROLOGUE, &store.0, &id.0, &inviter.0].concat()
}

/// How the inviter's messages of one attempt are framed: the attempt, and
/// a MAC under the invite's route key (see "Attempts" above).
struct Route {
    key: Zeroizing<[u8; 32]>,
    attempt: [u8; ATTEMPT_BYTES],
}

/// A frame as the joiner of one attempt sees it.
enum Framed<'m> {
    /// This attempt's: the Noise bytes inside.
    Ours(&'m [u8]),
    /// Another attempt's, made by a holder of the code.
    Other,
}

impl Route {
    /// The route of the attempt that starts with `msg1`.
    fn new(secret: &Secret32, id: InviteId, msg1: &[u8]) -> Route {
        let digest = Sha256::new()
            .chain_update(DOMAIN_ATTEMPT)
            .chain_update(msg1)
            .finalize();
        let mut attempt = [0u8; ATTEMPT_BYTES];
        attempt.copy_from_slice(&digest[..ATTEMPT_BYTES]);
        Route {
            key: Zeroizing::new(derive(secret, DOMAIN_ROUTE_KEY, id)),
            attempt,
        }
    }

    fn mac(&self, attempt: &[u8], noise: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.key.as_slice())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(attempt);
        mac.update(noise);
        mac
    }

    /// `noise`, framed for this attempt.
    fn frame(&self, noise: Vec<u8>) -> Vec<u8> {
        let tag = self.mac(&self.attempt, &noise).finalize().into_bytes();
        let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + noise.len());
        out.extend_from_slice(&self.attempt);
        out.extend_from_slice(&tag);
        out.extend_from_slice(&noise);
        out
    }

    /// Reads a frame: whose it is, once its MAC holds.
    fn unframe<'m>(&self, msg: &'m [u8], which: &'static str) -> Result<Framed<'m>, PairingError> {
        if msg.len() > crate::protocol::MAILBOX_ITEM_BYTES_MAX {
            return Err(PairingError::Protocol("framed message too large"));
        }
        if msg.len() < FRAME_HEADER_BYTES {
            return Err(PairingError::Handshake(which));
        }
        let (attempt, rest) = msg.split_at(ATTEMPT_BYTES);
        let (tag, noise) = rest.split_at(FRAME_MAC_BYTES);
        self.mac(attempt, noise)
            .verify_slice(tag)
            .map_err(|_| PairingError::Handshake(which))?;
        // Not secret (the relay sees both): a plain comparison is enough.
        if attempt == self.attempt {
            Ok(Framed::Ours(noise))
        } else {
            Ok(Framed::Other)
        }
    }
}

/// A snow resolver whose randomness is the caller's stream; the primitives
/// are snow's own.
struct Resolver {
    rng: std::sync::Mutex<Option<RngStream>>,
}

struct StreamRandom(RngStream);

impl Random for StreamRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        let stream = self.rng.lock().ok()?.take()?;
        Some(Box::new(StreamRandom(stream)))
    }

    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &snow::params::HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &snow::params::CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

fn builder<'a>(
    rng: RngStream,
    local: &'a [u8; 32],
    psk: &'a [u8; 32],
    prologue: &'a [u8],
) -> Result<snow::Builder<'a>, PairingError> {
    let params = NOISE_PARAMS
        .parse()
        .map_err(|_| PairingError::Protocol("Noise parameters"))?;
    let resolver = Resolver {
        rng: std::sync::Mutex::new(Some(rng)),
    };
    let bad = |_| PairingError::Protocol("Noise setup");
    snow::Builder::with_resolver(params, Box::new(resolver))
        .local_private_key(local)
        .map_err(bad)?
        .psk(2, psk)
        .map_err(bad)?
        .prologue(prologue)
        .map_err(bad)
}

/// Msg1's payload.
#[derive(Serialize, Deserialize)]
struct Join {
    ed25519_public: [u8; 32],
    name: String,
}

/// Msg2's payload.
#[derive(Serialize, Deserialize)]
enum Answer {
    Accepted,
    Refused(Refusal),
}

/// Transport messages after the handshake.
#[derive(Serialize, Deserialize)]
enum After {
    Confirm,
    Grant {
        index: u16,
        total: u16,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Abort(String),
}

impl Drop for After {
    fn drop(&mut self) {
        if let After::Grant { bytes, .. } = self {
            bytes.zeroize();
        }
    }
}

/// The grant: the store's keys and who its members are.
#[derive(Serialize, Deserialize)]
struct GrantWire {
    #[serde(with = "serde_bytes")]
    keys: Vec<u8>,
    members: Vec<Member>,
}

impl Drop for GrantWire {
    fn drop(&mut self) {
        self.keys.zeroize();
    }
}

fn encode<T: Serialize>(value: &T) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(
        postcard::to_stdvec(value)
            .unwrap_or_else(|e| unreachable!("postcard to Vec cannot fail: {e}")),
    )
}

fn write_hs(hs: &mut HandshakeState, payload: &[u8]) -> Result<Vec<u8>, PairingError> {
    let mut out = vec![0u8; NOISE_MESSAGE_BYTES_MAX];
    let n = hs
        .write_message(payload, &mut out)
        .map_err(|_| PairingError::Protocol("handshake message too large"))?;
    out.truncate(n);
    Ok(out)
}

fn read_hs(
    hs: &mut HandshakeState,
    msg: &[u8],
    which: &'static str,
) -> Result<Zeroizing<Vec<u8>>, PairingError> {
    if msg.len() > NOISE_MESSAGE_BYTES_MAX {
        return Err(PairingError::Protocol("handshake message too large"));
    }
    let mut out = Zeroizing::new(vec![0u8; NOISE_MESSAGE_BYTES_MAX]);
    let n = hs
        .read_message(msg, &mut out)
        .map_err(|_| PairingError::Handshake(which))?;
    out.truncate(n);
    Ok(out)
}

fn seal(ts: &mut TransportState, after: &After) -> Result<Vec<u8>, PairingError> {
    let plain = encode(after);
    let mut out = vec![0u8; NOISE_MESSAGE_BYTES_MAX];
    let n = ts
        .write_message(&plain, &mut out)
        .map_err(|_| PairingError::Protocol("transport message too large"))?;
    out.truncate(n);
    Ok(out)
}

fn open(ts: &mut TransportState, msg: &[u8], which: &'static str) -> Result<After, PairingError> {
    if msg.len() > NOISE_MESSAGE_BYTES_MAX {
        return Err(PairingError::Protocol("transport message too large"));
    }
    let mut out = Zeroizing::new(vec![0u8; NOISE_MESSAGE_BYTES_MAX]);
    let n = ts
        .read_message(msg, &mut out)
        .map_err(|_| PairingError::Handshake(which))?;
    postcard::from_bytes(&out[..n]).map_err(|_| PairingError::Protocol("undecodable message"))
}

/// What a joiner receives.
pub struct Grant {
    /// The store's keys.
    pub keys: ExportedKeys,
    /// The store's members as the inviter knows them, the inviter included.
    pub members: Vec<Member>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("store_id", &self.keys.store_id)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// The joining side of a pairing: one attempt.
pub struct Joiner {
    stage: JoinerStage,
    store_id: StoreId,
    inviter: DeviceId,
    route: Route,
}

/// What a joiner makes of a message from the inviter's mailbox, from
/// [`Joiner::receive`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Received {
    /// The answer was taken: send this confirmation to the inviter.
    Reply(Vec<u8>),
    /// A part of the grant; more is to come.
    Pending,
    /// The whole grant.
    Granted(Grant),
    /// An honest message for an earlier attempt with the same code (a
    /// retried join): nothing to do with this one, skip it.
    Stale,
}

enum JoinerStage {
    AwaitingAnswer(Box<HandshakeState>),
    AwaitingGrant {
        transport: Box<TransportState>,
        chunks: Vec<Zeroizing<Vec<u8>>>,
        total: Option<u16>,
    },
    Done,
}

impl Joiner {
    /// Starts pairing with `invite`'s inviter as `me`, named `name`;
    /// returns the joiner and the first message (for the inviter's
    /// mailbox).
    pub fn start(
        invite: &Invite,
        me: &DeviceIdentity,
        name: &str,
        rng: RngStream,
    ) -> Result<(Joiner, Vec<u8>), PairingError> {
        let local = me.x25519_secret();
        let psk = Zeroizing::new(derive(&invite.secret, DOMAIN_PSK, invite.id));
        let prologue = prologue(invite.store_id, invite.id, invite.inviter);
        let mut hs = builder(rng, local.expose(), &psk, &prologue)?
            .remote_public_key(&invite.inviter_x25519)
            .map_err(|_| PairingError::Protocol("Noise setup"))?
            .build_initiator()
            .map_err(|_| PairingError::Protocol("Noise setup"))?;
        let name: String = name.chars().take(NAME_BYTES_MAX / 4).collect();
        let join = encode(&Join {
            ed25519_public: me.verifying_key().to_bytes(),
            name,
        });
        let msg1 = write_hs(&mut hs, &join)?;
        Ok((
            Joiner {
                stage: JoinerStage::AwaitingAnswer(Box::new(hs)),
                store_id: invite.store_id,
                inviter: invite.inviter,
                route: Route::new(&invite.secret, invite.id, &msg1),
            },
            msg1,
        ))
    }

    /// Takes the next message from the inviter's side, in the order the
    /// relay keeps them. An error ends this attempt: the message was
    /// forged or altered, or the inviter refused or stopped.
    pub fn receive(&mut self, msg: &[u8]) -> Result<Received, PairingError> {
        let which = match self.stage {
            JoinerStage::AwaitingAnswer(_) => "the inviter's answer",
            JoinerStage::AwaitingGrant { .. } | JoinerStage::Done => "a grant message",
        };
        let noise = match self.route.unframe(msg, which)? {
            Framed::Ours(noise) => noise,
            Framed::Other => return Ok(Received::Stale),
        };
        match self.stage {
            JoinerStage::AwaitingAnswer(_) => self.on_answer(noise).map(Received::Reply),
            JoinerStage::AwaitingGrant { .. } | JoinerStage::Done => {
                Ok(match self.on_message(noise)? {
                    Some(grant) => Received::Granted(grant),
                    None => Received::Pending,
                })
            }
        }
    }

    /// Takes the inviter's answer; returns the confirmation to send back.
    fn on_answer(&mut self, msg2: &[u8]) -> Result<Vec<u8>, PairingError> {
        let JoinerStage::AwaitingAnswer(hs) = &mut self.stage else {
            return Err(PairingError::Protocol("an answer arrived twice"));
        };
        let payload = read_hs(hs, msg2, "the inviter's answer")?;
        let answer: Answer = postcard::from_bytes(&payload)
            .map_err(|_| PairingError::Protocol("undecodable answer"))?;
        let stage = std::mem::replace(&mut self.stage, JoinerStage::Done);
        let JoinerStage::AwaitingAnswer(hs) = stage else {
            unreachable!("matched above")
        };
        if let Answer::Refused(why) = answer {
            return Err(PairingError::Refused(why));
        }
        let mut transport = Box::new(
            hs.into_transport_mode()
                .map_err(|_| PairingError::Protocol("handshake incomplete"))?,
        );
        let confirm = seal(&mut transport, &After::Confirm)?;
        self.stage = JoinerStage::AwaitingGrant {
            transport,
            chunks: Vec::new(),
            total: None,
        };
        Ok(confirm)
    }

    /// Takes one message after the confirmation: `Some` once the whole
    /// grant is in.
    fn on_message(&mut self, msg: &[u8]) -> Result<Option<Grant>, PairingError> {
        let JoinerStage::AwaitingGrant {
            transport,
            chunks,
            total,
        } = &mut self.stage
        else {
            return Err(PairingError::Protocol("a grant arrived before the answer"));
        };
        let after = open(transport, msg, "a grant message")?;
        let (index, count, bytes) = match &after {
            After::Grant {
                index,
                total,
                bytes,
            } => (*index, *total, bytes),
            After::Abort(why) => {
                let why: String = why.chars().take(256).collect();
                return Err(PairingError::Aborted(why));
            }
            After::Confirm => {
                return Err(PairingError::Protocol("a confirmation from the inviter"));
            }
        };
        if count == 0 || usize::from(count) > GRANT_CHUNKS_MAX {
            return Err(PairingError::Protocol("grant chunk count out of range"));
        }
        if *total.get_or_insert(count) != count || usize::from(index) != chunks.len() {
            return Err(PairingError::Protocol("grant chunks out of order"));
        }
        chunks.push(Zeroizing::new(bytes.clone()));
        if chunks.len() < usize::from(count) {
            return Ok(None);
        }
        let whole: Zeroizing<Vec<u8>> =
            Zeroizing::new(chunks.iter().flat_map(|c| c.iter().copied()).collect());
        self.stage = JoinerStage::Done;
        let grant: GrantWire = postcard::from_bytes(&whole)
            .map_err(|_| PairingError::Protocol("undecodable grant"))?;
        let keys = ExportedKeys::decode(&grant.keys)
            .map_err(|e: ExportError| PairingError::Keys(e.to_string()))?;
        if keys.store_id != self.store_id {
            return Err(PairingError::Keys("they are another store's".into()));
        }
        if grant.members.len() > crate::keyring::MEMBERS_MAX {
            return Err(PairingError::Protocol("too many members"));
        }
        let members = grant.members.clone();
        if !members.iter().any(|m| m.device_id == self.inviter) {
            return Err(PairingError::Protocol(
                "the inviter is not among the members",
            ));
        }
        for m in &members {
            if DeviceId::from_public_key(&m.ed25519_public) != m.device_id {
                return Err(PairingError::Protocol(
                    "a member's id does not match its key",
                ));
            }
        }
        Ok(Some(Grant { keys, members }))
    }
}

/// The device that asks to join, as the inviter learns it from an
/// authenticated first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joining {
    /// Its id.
    pub device_id: DeviceId,
    /// Its Ed25519 public key.
    pub ed25519_public: [u8; 32],
    /// Its X25519 public key (the handshake's static key).
    pub x25519_public: [u8; 32],
    /// The name it gave.
    pub name: String,
}

/// The inviting side of one pairing attempt.
pub struct Host {
    transport: Box<TransportState>,
    confirmed: bool,
    joining: Joining,
    route: Route,
}

/// The inviter's reaction to a first message.
pub enum Opened {
    /// The handshake goes on: send the answer, then wait for the
    /// confirmation.
    Accepted {
        /// The pairing state.
        host: Host,
        /// The answer to send.
        answer: Vec<u8>,
    },
    /// The invite cannot be used; send the answer (an authenticated
    /// refusal) and stop.
    Refused {
        /// The answer to send.
        answer: Vec<u8>,
        /// Why.
        why: Refusal,
    },
}

impl Host {
    /// Answers a first message for `invite` of `store`, as `me`, at
    /// `now_ms`.
    pub fn answer(
        invite: &OpenInvite,
        store: StoreId,
        me: &DeviceIdentity,
        msg1: &[u8],
        now_ms: u64,
        rng: RngStream,
    ) -> Result<Opened, PairingError> {
        let local = me.x25519_secret();
        let psk = Zeroizing::new(derive(&invite.secret, DOMAIN_PSK, invite.id));
        let prologue = prologue(store, invite.id, me.device_id());
        let mut hs = builder(rng, local.expose(), &psk, &prologue)?
            .build_responder()
            .map_err(|_| PairingError::Protocol("Noise setup"))?;
        let payload = read_hs(&mut hs, msg1, "the joiner's first message")?;
        let join: Join = postcard::from_bytes(&payload)
            .map_err(|_| PairingError::Protocol("undecodable first message"))?;
        let x25519_public: [u8; 32] = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or(PairingError::Protocol("the joiner sent no static key"))?;
        if ed25519_dalek::VerifyingKey::from_bytes(&join.ed25519_public).is_err() {
            return Err(PairingError::Protocol(
                "the joiner's signing key is not a point",
            ));
        }
        let refusal = if invite.used_by.is_some() {
            Some(Refusal::Used)
        } else if now_ms >= invite.expires_ms {
            Some(Refusal::Expired)
        } else {
            None
        };
        let answer = match refusal {
            Some(why) => Answer::Refused(why),
            None => Answer::Accepted,
        };
        let route = Route::new(&invite.secret, invite.id, msg1);
        let answer = route.frame(write_hs(&mut hs, &encode(&answer))?);
        if let Some(why) = refusal {
            return Ok(Opened::Refused { answer, why });
        }
        let transport = Box::new(
            hs.into_transport_mode()
                .map_err(|_| PairingError::Protocol("handshake incomplete"))?,
        );
        let name: String = join.name.chars().take(NAME_BYTES_MAX / 4).collect();
        Ok(Opened::Accepted {
            host: Host {
                transport,
                route,
                confirmed: false,
                joining: Joining {
                    device_id: DeviceId::from_public_key(&join.ed25519_public),
                    ed25519_public: join.ed25519_public,
                    x25519_public,
                    name,
                },
            },
            answer,
        })
    }

    /// The device asking to join.
    pub fn joining(&self) -> &Joining {
        &self.joining
    }

    /// Takes the joiner's confirmation: once it decrypts, the joiner has
    /// proven it holds the invite secret and finished the handshake.
    pub fn on_confirm(&mut self, msg: &[u8]) -> Result<(), PairingError> {
        if self.confirmed {
            return Err(PairingError::Protocol("a second confirmation"));
        }
        match &open(&mut self.transport, msg, "the joiner's confirmation")? {
            After::Confirm => {
                self.confirmed = true;
                Ok(())
            }
            After::Abort(why) => Err(PairingError::Aborted(why.chars().take(256).collect())),
            After::Grant { .. } => Err(PairingError::Protocol("a grant from the joiner")),
        }
    }

    /// The grant messages, in order: `keys` and `members`. Only after
    /// [`Host::on_confirm`] succeeded.
    pub fn grant(
        &mut self,
        keys: &ExportedKeys,
        members: &[Member],
    ) -> Result<Vec<Vec<u8>>, PairingError> {
        if !self.confirmed {
            return Err(PairingError::Protocol("grant before confirmation"));
        }
        let wire = GrantWire {
            keys: keys.encode().to_vec(),
            members: members.to_vec(),
        };
        let whole = encode(&wire);
        let chunks: Vec<&[u8]> = whole.chunks(GRANT_CHUNK_BYTES).collect();
        let total = u16::try_from(chunks.len())
            .ok()
            .filter(|n| usize::from(*n) <= GRANT_CHUNKS_MAX)
            .ok_or(PairingError::Protocol("the keyring is too large to grant"))?;
        chunks
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let index = u16::try_from(i).unwrap_or_else(|_| unreachable!("i < total"));
                let sealed = seal(
                    &mut self.transport,
                    &After::Grant {
                        index,
                        total,
                        bytes: bytes.to_vec(),
                    },
                )?;
                Ok(self.route.frame(sealed))
            })
            .collect()
    }

    /// A message telling the joiner the pairing stopped, and why.
    pub fn abort(&mut self, why: &str) -> Result<Vec<u8>, PairingError> {
        let sealed = seal(
            &mut self.transport,
            &After::Abort(why.chars().take(256).collect()),
        )?;
        Ok(self.route.frame(sealed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Entropy, SeededEntropy};
    use crate::hlc::Hlc;

    struct Setup {
        entropy: SeededEntropy,
        ring: Keyring,
        invite: Invite,
        open: OpenInvite,
        joiner: DeviceIdentity,
    }

    fn setup(seed: u64) -> Setup {
        let entropy = SeededEntropy::from_u64(seed);
        let mut rng = entropy.stream("setup");
        let ring = Keyring::create(
            DeviceIdentity::generate(&mut rng),
            "a",
            Hlc::default(),
            &mut rng,
        );
        let (invite, open) = Invite::create(
            &ring,
            "quic://relay.test:7443",
            Some([7; 32]),
            10_000,
            &mut rng,
        )
        .unwrap();
        let joiner = DeviceIdentity::generate(&mut rng);
        Setup {
            entropy,
            ring,
            invite,
            open,
            joiner,
        }
    }

    /// The confirmation a joiner sends back for an answer.
    fn reply(received: Received) -> Vec<u8> {
        match received {
            Received::Reply(confirm) => confirm,
            _ => panic!("the answer was not taken"),
        }
    }

    fn members(ring: &Keyring) -> Vec<Member> {
        ring.members.clone()
    }

    #[test]
    fn a_code_round_trips_and_edits_are_caught() {
        let s = setup(1);
        let code = s.invite.encode();
        assert!(code.starts_with(PREFIX));
        let back = Invite::decode(&code).unwrap();
        assert_eq!(back.store_id, s.invite.store_id);
        assert_eq!(back.id, s.invite.id);
        assert!(back.secret == s.invite.secret);
        assert_eq!(back.relay, "quic://relay.test:7443");
        assert_eq!(back.pin, Some([7; 32]));
        // Wrapped over lines, it still reads.
        let wrapped: String = code
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                (i > 0 && i % 40 == 0)
                    .then_some('\n')
                    .into_iter()
                    .chain([c])
            })
            .collect();
        assert!(Invite::decode(&wrapped).is_ok());
        // Truncated.
        assert_eq!(
            Invite::decode(&code[..code.len() - 3]).unwrap_err(),
            InviteError::Damaged
        );
        // Every single-character edit of the body is caught.
        let body_start = PREFIX.len();
        for i in (body_start..code.len()).step_by(7) {
            let mut edited = code.as_bytes().to_vec();
            edited[i] = if edited[i] == b'A' { b'B' } else { b'A' };
            let edited = String::from_utf8(edited).unwrap();
            assert!(
                Invite::decode(&edited).is_err(),
                "edit at {i} was not caught"
            );
        }
        assert_eq!(
            Invite::decode("persist-key-v1:abc").unwrap_err(),
            InviteError::NotAnInvite
        );
        assert_eq!(
            Invite::decode("persist-invite-v9:abc").unwrap_err(),
            InviteError::UnsupportedVersion
        );
    }

    #[test]
    fn expiry_is_checked() {
        let s = setup(2);
        assert!(s.invite.check_fresh(9_999).is_ok());
        assert!(matches!(
            s.invite.check_fresh(10_000 + 120_000),
            Err(InviteError::Expired { ago_minutes: 2 })
        ));
    }

    fn pair(s: &Setup) -> (Joiner, Host, Vec<u8>) {
        let (mut joiner, msg1) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("joiner")).unwrap();
        let opened = Host::answer(
            &s.open,
            s.ring.store_id,
            &s.ring.device,
            &msg1,
            5_000,
            s.entropy.stream("host"),
        )
        .unwrap();
        let Opened::Accepted { host, answer } = opened else {
            panic!("refused")
        };
        let confirm = reply(joiner.receive(&answer).unwrap());
        (joiner, host, confirm)
    }

    #[test]
    fn a_pairing_hands_over_the_keys_and_members() {
        let s = setup(3);
        let (mut joiner, mut host, confirm) = pair(&s);
        assert_eq!(host.joining().device_id, s.joiner.device_id());
        assert_eq!(host.joining().x25519_public, s.joiner.x25519_public());
        assert_eq!(host.joining().name, "b");
        host.on_confirm(&confirm).unwrap();
        let msgs = host
            .grant(&ExportedKeys::from_keyring(&s.ring), &members(&s.ring))
            .unwrap();
        assert_eq!(msgs.len(), 1);
        let Received::Granted(grant) = joiner.receive(&msgs[0]).unwrap() else {
            panic!("the grant is one message")
        };
        assert_eq!(grant.keys.store_id, s.ring.store_id);
        assert!(grant.keys.index_key == *s.ring.index_key.secret());
        assert_eq!(grant.members, s.ring.members);
    }

    #[test]
    fn a_large_grant_travels_in_chunks() {
        let mut s = setup(4);
        let mut rng = s.entropy.stream("members");
        for i in 0..900 {
            let d = DeviceIdentity::generate(&mut rng);
            let mut m = s.ring.members[0].clone();
            m.device_id = d.device_id();
            m.ed25519_public = d.verifying_key().to_bytes();
            m.name = format!("device {i} with a rather long name to fill the grant");
            s.ring.add_member(m);
        }
        let (mut joiner, mut host, confirm) = pair(&s);
        host.on_confirm(&confirm).unwrap();
        let msgs = host
            .grant(&ExportedKeys::from_keyring(&s.ring), &members(&s.ring))
            .unwrap();
        assert!(msgs.len() > 1, "{} chunk(s)", msgs.len());
        let last = msgs.len() - 1;
        for (i, m) in msgs.iter().enumerate() {
            match joiner.receive(m).unwrap() {
                Received::Pending => assert!(i < last, "chunk {i} of {last} completed it"),
                Received::Granted(g) => {
                    assert_eq!(i, last);
                    assert_eq!(g.members.len(), 901);
                }
                _ => panic!("chunk {i} was not taken as a grant chunk"),
            }
        }
    }

    #[test]
    fn a_wrong_secret_fails_both_sides() {
        let s = setup(5);
        let mut forged = Invite::decode(&s.invite.encode()).unwrap();
        forged.secret = Secret32::from_bytes([9; 32]);
        let (mut joiner, msg1) =
            Joiner::start(&forged, &s.joiner, "b", s.entropy.stream("j")).unwrap();
        // The inviter reads msg1 (the psk enters only in msg2), answers …
        let Opened::Accepted { host: _, answer } = Host::answer(
            &s.open,
            s.ring.store_id,
            &s.ring.device,
            &msg1,
            1,
            s.entropy.stream("h"),
        )
        .unwrap() else {
            panic!("refused")
        };
        // … and the joiner cannot authenticate the answer.
        assert!(matches!(
            joiner.receive(&answer),
            Err(PairingError::Handshake(_))
        ));
    }

    #[test]
    fn a_retried_attempt_skips_what_the_inviter_sent_for_earlier_ones() {
        let s = setup(11);
        let answer_to = |msg1: &[u8], stream: &str| {
            let Opened::Accepted { host, answer } = Host::answer(
                &s.open,
                s.ring.store_id,
                &s.ring.device,
                msg1,
                1,
                s.entropy.stream(stream),
            )
            .unwrap() else {
                panic!("refused")
            };
            (host, answer)
        };
        // The first attempt timed out: its answer and an abort are left in
        // the joiner's mailbox.
        let (_gone, first_a) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("j1")).unwrap();
        let (mut host_a, answer_a) = answer_to(&first_a, "h1");
        let abort_a = host_a.abort("a new attempt came").unwrap();
        // The retry.
        let (mut joiner, first_b) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("j2")).unwrap();
        let (mut host_b, answer_b) = answer_to(&first_b, "h2");
        assert!(matches!(joiner.receive(&answer_a), Ok(Received::Stale)));
        assert!(matches!(joiner.receive(&abort_a), Ok(Received::Stale)));
        let confirm = reply(joiner.receive(&answer_b).unwrap());
        // A leftover seen again later changes nothing either.
        assert!(matches!(joiner.receive(&answer_a), Ok(Received::Stale)));
        host_b.on_confirm(&confirm).unwrap();
        let grant = host_b
            .grant(&ExportedKeys::from_keyring(&s.ring), &members(&s.ring))
            .unwrap();
        assert!(matches!(
            joiner.receive(&grant[0]),
            Ok(Received::Granted(_))
        ));
    }

    #[test]
    fn only_a_holder_of_the_code_can_make_a_frame_the_joiner_skips() {
        let s = setup(12);
        let (mut joiner, msg1) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("j")).unwrap();
        let Opened::Accepted { answer, .. } = Host::answer(
            &s.open,
            s.ring.store_id,
            &s.ring.device,
            &msg1,
            1,
            s.entropy.stream("h"),
        )
        .unwrap() else {
            panic!("refused")
        };
        // The relay relabels the answer as another attempt's: the MAC
        // breaks, and the joiner stops instead of waiting.
        let mut relabelled = answer.clone();
        relabelled[0] ^= 1;
        assert!(matches!(
            joiner.receive(&relabelled),
            Err(PairingError::Handshake(_))
        ));
        // A frame made under another invite's secret.
        let other = Route::new(&Secret32::from_bytes([5; 32]), s.invite.id, b"elsewhere");
        assert!(matches!(
            joiner.receive(&other.frame(vec![0; 64])),
            Err(PairingError::Handshake(_))
        ));
        // Too short to be a frame.
        assert!(matches!(
            joiner.receive(&answer[..FRAME_HEADER_BYTES - 1]),
            Err(PairingError::Handshake(_))
        ));
        // This attempt's frame, with a valid MAC, whose Noise is altered
        // (only a holder of the code could do this): still no pairing.
        let route = Route::new(&s.invite.secret, s.invite.id, &msg1);
        let mut noise = answer[FRAME_HEADER_BYTES..].to_vec();
        let last = noise.len() - 1;
        noise[last] ^= 1;
        // (The frames above failed before reaching the handshake.)
        assert!(matches!(
            joiner.receive(&route.frame(noise)),
            Err(PairingError::Handshake(_))
        ));
    }

    #[test]
    fn a_replayed_first_message_gets_no_keys() {
        let s = setup(6);
        let (_joiner, msg1) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("j")).unwrap();
        // A relay replays msg1: the inviter answers, but the replayer holds
        // no ephemeral key, so its "confirmation" is noise.
        let Opened::Accepted { mut host, .. } = Host::answer(
            &s.open,
            s.ring.store_id,
            &s.ring.device,
            &msg1,
            1,
            s.entropy.stream("h2"),
        )
        .unwrap() else {
            panic!("refused")
        };
        let fake = vec![0x42; 48];
        assert!(matches!(
            host.on_confirm(&fake),
            Err(PairingError::Handshake(_))
        ));
        assert!(
            host.grant(&ExportedKeys::from_keyring(&s.ring), &[])
                .is_err()
        );
    }

    #[test]
    fn a_substituted_answer_is_rejected() {
        let s = setup(7);
        let (mut joiner, msg1) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("j")).unwrap();
        // A relay answers with its own keys, knowing the invite's public
        // parts but not its secret or the inviter's private key.
        let mut mitm_rng = s.entropy.stream("mitm");
        let mitm = DeviceIdentity::generate(&mut mitm_rng);
        let fake_open = OpenInvite {
            id: s.invite.id,
            secret: Secret32::from_bytes([1; 32]),
            expires_ms: u64::MAX,
            used_by: None,
        };
        match Host::answer(&fake_open, s.ring.store_id, &mitm, &msg1, 1, mitm_rng) {
            // It cannot even read msg1 (sealed to the inviter's key) …
            Err(PairingError::Handshake(_)) => {}
            Err(other) => panic!("unexpected {other}"),
            Ok(Opened::Accepted { answer, .. } | Opened::Refused { answer, .. }) => {
                // … and were it to answer, the joiner would not accept it.
                assert!(joiner.receive(&answer).is_err());
            }
        }
        // An answer of random bytes is rejected too.
        assert!(matches!(
            joiner.receive(&[0x17; 96]),
            Err(PairingError::Handshake(_))
        ));
    }

    #[test]
    fn used_and_expired_invites_are_refused_inside_the_handshake() {
        let mut s = setup(8);
        s.open.used_by = Some(DeviceId([3; 16]));
        let (mut joiner, msg1) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("j")).unwrap();
        let Opened::Refused { answer, why } = Host::answer(
            &s.open,
            s.ring.store_id,
            &s.ring.device,
            &msg1,
            1,
            s.entropy.stream("h"),
        )
        .unwrap() else {
            panic!("accepted a used invite")
        };
        assert_eq!(why, Refusal::Used);
        assert_eq!(
            joiner.receive(&answer).unwrap_err(),
            PairingError::Refused(Refusal::Used)
        );

        s.open.used_by = None;
        let (mut joiner, msg1) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("j")).unwrap();
        let Opened::Refused { answer, why } = Host::answer(
            &s.open,
            s.ring.store_id,
            &s.ring.device,
            &msg1,
            10_000,
            s.entropy.stream("h"),
        )
        .unwrap() else {
            panic!("accepted an expired invite")
        };
        assert_eq!(why, Refusal::Expired);
        assert_eq!(
            joiner.receive(&answer).unwrap_err(),
            PairingError::Refused(Refusal::Expired)
        );
    }

    #[test]
    fn an_abort_reaches_the_joiner() {
        let s = setup(9);
        let (mut joiner, mut host, confirm) = pair(&s);
        host.on_confirm(&confirm).unwrap();
        let abort = host.abort("the store is closing").unwrap();
        assert_eq!(
            joiner.receive(&abort).unwrap_err(),
            PairingError::Aborted("the store is closing".into())
        );
    }

    #[test]
    fn no_secret_appears_in_what_the_relay_carries() {
        let s = setup(10);
        let (mut joiner, msg1) =
            Joiner::start(&s.invite, &s.joiner, "b", s.entropy.stream("j")).unwrap();
        let Opened::Accepted { mut host, answer } = Host::answer(
            &s.open,
            s.ring.store_id,
            &s.ring.device,
            &msg1,
            1,
            s.entropy.stream("h"),
        )
        .unwrap() else {
            panic!("refused")
        };
        let confirm = reply(joiner.receive(&answer).unwrap());
        host.on_confirm(&confirm).unwrap();
        let grant = host
            .grant(&ExportedKeys::from_keyring(&s.ring), &members(&s.ring))
            .unwrap();
        let mut carried = vec![msg1, answer, confirm];
        carried.extend(grant);
        carried.push(s.invite.relay_access().0.to_vec());
        let secrets: Vec<[u8; 32]> = vec![
            *s.invite.secret.expose(),
            *s.ring.index_key.secret().expose(),
            *s.ring.relay_token.expose(),
            *s.ring.current_key().expose(),
            derive(&s.invite.secret, DOMAIN_PSK, s.invite.id),
            derive(&s.invite.secret, DOMAIN_ROUTE_KEY, s.invite.id),
        ];
        for bytes in &carried {
            for secret in &secrets {
                for window in secret.windows(8) {
                    assert!(
                        !bytes.windows(8).any(|w| w == window),
                        "8 bytes of a secret appear in a relayed message"
                    );
                }
            }
        }
    }
}
