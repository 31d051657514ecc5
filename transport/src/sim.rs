//! Seeded QUIC for simulations (feature `sim`): the product's endpoints,
//! TLS configs, ALPN, framing and pinning, over a caller's in-memory UDP
//! socket, with every source of randomness drawn from one seed.
//!
//! What is seeded, and where it would otherwise come from:
//! - quinn's endpoint RNG (packet number skips, padding, tokens, each
//!   connection's RNG): [`quinn::EndpointConfig::rng_seed`];
//! - local connection ids: a seeded [`quinn::ConnectionIdGenerator`];
//! - a client's first destination connection id:
//!   `ClientConfig::initial_dst_cid_provider`;
//! - the stateless reset key: `EndpointConfig::new` with a seeded HMAC key;
//! - the address-validation token key: `ServerConfig::new` with a seeded
//!   HKDF key;
//! - rustls' randomness (hello randoms, session ticket nonces and ages):
//!   the provider's `secure_random` is a seeded ChaCha20;
//! - TLS key exchange: the provider's only group is X25519 whose
//!   ephemeral secrets come from a seeded ChaCha20 (x25519-dalek);
//! - rustls' wall clock, and quinn's for address-validation tokens: a
//!   fixed instant ([`SIM_UNIX_TIME_SECS`]);
//! - the server certificate: Ed25519 (deterministic signatures) from a
//!   seeded key, by rcgen, whose serial is a hash of the public key.
//!
//! # Invariants
//! - This module exists only in builds with debug assertions: a release
//!   build with the feature does not compile, so no shipped binary can
//!   hold a seeded secret. `persist-sim` is built with the dev profile
//!   (its dependencies optimised, see the root `Cargo.toml`).
//! - Draws from the shared generators happen in the order the
//!   (single-threaded, paused) runtime polls, so a seed replays them.

#[cfg(not(debug_assertions))]
compile_error!(
    "persist-transport's `sim` feature seeds every QUIC and TLS secret: it is for simulations \
     only and cannot be built without debug assertions (build persist-sim with the dev profile, \
     and release binaries with -p persist-relay -p persist-cli)"
);

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::{NamedGroup, PeerMisbehaved};
use sha2::{Digest, Sha256};

pub use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
pub use quinn::{AsyncUdpSocket, UdpPoller};

use crate::quic::{self, BindError, Client, ConnectError, Server};
use crate::tls::{self, IdentityError, ServerIdentity, TlsBasis};

/// The wall-clock time rustls sees in a simulation (2026-01-01T00:00:00Z):
/// pinned certificates ignore dates, and no ticket outlives a run.
pub const SIM_UNIX_TIME_SECS: u64 = 1_767_225_600;

/// Bytes of a local connection id the seeded generator makes (quinn's
/// default length).
const CID_BYTES: usize = 8;
/// Bytes of a client's first destination connection id (at least 8, as
/// RFC 9000 §7.2 requires).
const INITIAL_DST_CID_BYTES: usize = 16;

/// Every seeded secret source of one simulation run's QUIC endpoints.
/// Cheap to clone; all clones share the generators.
#[derive(Clone)]
pub struct SimQuic {
    seed: [u8; 32],
    /// Draws seeds for each new endpoint (its RNG, reset key, token key,
    /// connection ids).
    endpoints: Arc<Mutex<ChaCha20Rng>>,
    tls: TlsBasis,
}

impl std::fmt::Debug for SimQuic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimQuic").finish_non_exhaustive()
    }
}

impl SimQuic {
    /// The secret sources of a run, all derived from `seed`.
    ///
    /// rustls keeps its provider's randomness and key-exchange groups as
    /// `&'static`, so each call leaks two small generators: a run makes
    /// one `SimQuic`.
    pub fn new(seed: [u8; 32]) -> Self {
        let random: &'static SeededRandom = Box::leak(Box::new(SeededRandom(Mutex::new(
            ChaCha20Rng::from_seed(derive(&seed, "tls random")),
        ))));
        let x25519: &'static SeededX25519 = Box::leak(Box::new(SeededX25519(Mutex::new(
            ChaCha20Rng::from_seed(derive(&seed, "tls x25519")),
        ))));
        let provider = CryptoProvider {
            kx_groups: vec![x25519],
            secure_random: random,
            ..rustls::crypto::ring::default_provider()
        };
        Self {
            seed,
            endpoints: Arc::new(Mutex::new(ChaCha20Rng::from_seed(derive(
                &seed,
                "quic endpoints",
            )))),
            tls: TlsBasis {
                provider: Arc::new(provider),
                time: Arc::new(FixedTime),
            },
        }
    }

    /// The relay's identity: the same certificate (and pin) for the same
    /// seed, an Ed25519 key drawn from it.
    pub fn identity(&self) -> Result<ServerIdentity, IdentityError> {
        let key = ed25519_pkcs8(&derive(&self.seed, "relay identity"));
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let pair =
            rcgen::KeyPair::try_from(&key).map_err(|e| IdentityError::Generate(e.to_string()))?;
        let names: Vec<String> = tls::SELF_SIGNED_NAMES
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut params = rcgen::CertificateParams::new(names)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, tls::DEFAULT_SERVER_NAME);
        let cert = params
            .self_signed(&pair)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        ServerIdentity::from_der(vec![cert.der().clone()], key)
    }

    /// A QUIC server presenting `identity` on `socket`, every secret
    /// seeded; otherwise exactly [`Server::bind`]'s.
    pub fn server(
        &self,
        socket: Arc<dyn AsyncUdpSocket>,
        identity: &ServerIdentity,
    ) -> Result<Server, BindError> {
        let addr = socket.local_addr().map_err(|source| BindError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let seeds = self.draw();
        let crypto = quic::server_crypto(identity, &self.tls)?;
        let token_key =
            ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&seeds.token_key);
        let mut config = quinn::ServerConfig::new(crypto, Arc::new(token_key));
        config.transport_config(Arc::new(quic::transport_config()));
        config.time_source(Arc::new(FixedTime));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            seeds.endpoint_config(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| BindError::Socket { addr, source })?;
        Server::serve(endpoint, addr)
    }

    /// A QUIC client on `socket`, every secret seeded; otherwise exactly
    /// [`Client::new`]'s.
    pub fn client(&self, socket: Arc<dyn AsyncUdpSocket>) -> Result<Client, ConnectError> {
        let seeds = self.draw();
        let cids = Mutex::new(ChaCha20Rng::from_seed(seeds.initial_dst_cids));
        let initial_dst_cid: quic::InitialDstCid = Arc::new(move || {
            let mut bytes = [0u8; INITIAL_DST_CID_BYTES];
            lock(&cids).fill_bytes(&mut bytes);
            quinn::ConnectionId::new(&bytes)
        });
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            seeds.endpoint_config(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(ConnectError::Socket)?;
        Ok(Client::on(
            endpoint,
            self.tls.clone(),
            Some(initial_dst_cid),
        ))
    }

    fn draw(&self) -> EndpointSeeds {
        let mut rng = lock(&self.endpoints);
        let mut seeds = EndpointSeeds {
            rng: [0; 32],
            reset_key: [0; 64],
            token_key: [0; 64],
            cids: [0; 32],
            initial_dst_cids: [0; 32],
        };
        rng.fill_bytes(&mut seeds.rng);
        rng.fill_bytes(&mut seeds.reset_key);
        rng.fill_bytes(&mut seeds.token_key);
        rng.fill_bytes(&mut seeds.cids);
        rng.fill_bytes(&mut seeds.initial_dst_cids);
        seeds
    }
}

/// The seeds of one endpoint.
struct EndpointSeeds {
    rng: [u8; 32],
    reset_key: [u8; 64],
    token_key: [u8; 64],
    cids: [u8; 32],
    initial_dst_cids: [u8; 32],
}

impl EndpointSeeds {
    fn endpoint_config(&self) -> quinn::EndpointConfig {
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.reset_key);
        let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
        config.rng_seed(Some(self.rng));
        // quinn calls the factory once per endpoint; each generator it
        // makes continues the same stream.
        let cids = Arc::new(Mutex::new(ChaCha20Rng::from_seed(self.cids)));
        config.cid_generator(move || {
            Box::new(SeededCids(cids.clone())) as Box<dyn quinn::ConnectionIdGenerator>
        });
        config
    }
}

/// Local connection ids from a seeded stream.
struct SeededCids(Arc<Mutex<ChaCha20Rng>>);

impl quinn::ConnectionIdGenerator for SeededCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; CID_BYTES];
        lock(&self.0).fill_bytes(&mut bytes);
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_BYTES
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// rustls' randomness, seeded.
#[derive(Debug)]
struct SeededRandom(Mutex<ChaCha20Rng>);

impl rustls::crypto::SecureRandom for SeededRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        lock(&self.0).fill_bytes(buf);
        Ok(())
    }
}

/// X25519 key exchange whose ephemeral secrets come from a seeded stream.
#[derive(Debug)]
struct SeededX25519(Mutex<ChaCha20Rng>);

impl SupportedKxGroup for SeededX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let mut bytes = [0u8; 32];
        lock(&self.0).fill_bytes(&mut bytes);
        let secret = x25519_dalek::StaticSecret::from(bytes);
        let public = x25519_dalek::PublicKey::from(&secret);
        Ok(Box::new(X25519Exchange { secret, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

struct X25519Exchange {
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
}

impl ActiveKeyExchange for X25519Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let peer: [u8; 32] = peer_pub_key
            .try_into()
            .map_err(|_| rustls::Error::from(PeerMisbehaved::InvalidKeyShare))?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        if !shared.was_contributory() {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        Ok(SharedSecret::from(&shared.as_bytes()[..]))
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_bytes()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// rustls' and quinn's wall clock in a simulation: always
/// [`SIM_UNIX_TIME_SECS`].
#[derive(Debug)]
struct FixedTime;

impl quinn::TimeSource for FixedTime {
    fn now(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(SIM_UNIX_TIME_SECS)
    }
}

impl rustls::time_provider::TimeProvider for FixedTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(
            SIM_UNIX_TIME_SECS,
        )))
    }
}

/// A PKCS#8 v1 document holding the Ed25519 private key `seed`
/// (RFC 8410 §7: the fixed prefix, then the 32-byte seed).
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(seed);
    der
}

/// A sub-seed of `seed` for one purpose.
fn derive(seed: &[u8; 32], label: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"persist-transport sim v1\0");
    h.update(label.as_bytes());
    h.update([0]);
    h.update(seed);
    h.finalize().into()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_a_function_of_the_seed() {
        let a = SimQuic::new([1; 32]).identity().expect("identity");
        let b = SimQuic::new([1; 32]).identity().expect("identity");
        let c = SimQuic::new([2; 32]).identity().expect("identity");
        assert_eq!(a.pin(), b.pin());
        assert_ne!(a.pin(), c.pin());
    }

    #[test]
    fn key_exchange_is_seeded_and_agrees() {
        let a = SimQuic::new([3; 32]);
        let b = SimQuic::new([3; 32]);
        let ka = a.tls.provider.kx_groups[0].start().expect("start");
        let kb = b.tls.provider.kx_groups[0].start().expect("start");
        assert_eq!(ka.pub_key(), kb.pub_key(), "same seed, same ephemeral key");
        let kc = a.tls.provider.kx_groups[0].start().expect("start");
        let (pa, pc) = (ka.pub_key().to_vec(), kc.pub_key().to_vec());
        assert_ne!(pa, pc, "the stream moves on");
        let s1 = ka.complete(&pc).expect("complete");
        let s2 = kc.complete(&pa).expect("complete");
        assert_eq!(s1.secret_bytes(), s2.secret_bytes());
    }
}
