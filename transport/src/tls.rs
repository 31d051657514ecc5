//! TLS for `persist/1`: server identities, certificate pins, and how a
//! client decides to trust a server.
//!
//! A relay (or a serving device) presents a [`ServerIdentity`]: by default
//! a self-signed certificate made on first start and kept in its data
//! directory ([`ServerIdentity::load_or_create`]), or an operator's
//! CA-signed certificate ([`ServerIdentity::from_pem_files`]). Its
//! [`CertPin`] — SHA-256 of the end-entity certificate — is printed at start
//! and travels in invites.
//!
//! A client trusts a server through [`Trust`]:
//! - [`Trust::Pin`] accepts exactly the pinned end-entity certificate,
//!   whatever its names and dates, and still verifies the handshake
//!   signatures with the crypto provider's algorithms, so only the holder of
//!   that certificate's key can complete a handshake. This is pinning, not
//!   skipped verification.
//! - [`Trust::Roots`] is ordinary WebPKI verification (chain, names, dates)
//!   against the CA certificates given.
//!
//! There is no way to skip verification in this crate's non-test code.
//!
//! # Invariants
//! - ring is the only crypto provider ([`provider`]); TLS 1.3 only (QUIC
//!   requires it); ALPN is [`persist_core::protocol::ALPN`] on both sides.
//! - An identity's key always matches its certificate: every constructor
//!   checks it before returning.
//! - A persisted identity is written key first, certificate last, each via
//!   temp file + fsync + rename (+ directory fsync): a certificate on disk
//!   implies its key is on disk. The key file is 0600 and its directory
//!   0700 (on Unix).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use persist_core::protocol::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// The names a self-signed identity's certificate carries. Pinned clients
/// ignore names; these make the certificate usable by ordinary tools too.
pub const SELF_SIGNED_NAMES: [&str; 2] = ["persist-relay", "localhost"];
/// The name clients send by default when they trust by pin.
pub const DEFAULT_SERVER_NAME: &str = SELF_SIGNED_NAMES[0];
/// File, in an identity directory, holding the certificate (PEM).
pub const CERT_FILE: &str = "tls-cert.pem";
/// File, in an identity directory, holding the private key (PEM, 0600).
pub const KEY_FILE: &str = "tls-key.pem";
/// Bytes of a PEM file this crate reads: certificates and keys are a few
/// KiB; a chain of a dozen is still far below this.
pub const PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// The crypto provider for every TLS config of this crate: ring, which
/// builds with a C compiler alone.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What every TLS config of an endpoint is built on: the crypto provider
/// (its randomness and key exchange) and the wall clock rustls reads.
/// [`TlsBasis::product`] everywhere but in simulations, which seed both
/// (`sim` feature).
#[derive(Clone, Debug)]
pub(crate) struct TlsBasis {
    pub(crate) provider: Arc<CryptoProvider>,
    pub(crate) time: Arc<dyn rustls::time_provider::TimeProvider>,
}

impl TlsBasis {
    /// ring with the OS's randomness, and the system clock.
    pub(crate) fn product() -> Self {
        Self {
            provider: provider(),
            time: Arc::new(rustls::time_provider::DefaultTimeProvider),
        }
    }
}

// ---------------------------------------------------------------------------
// Pins

/// SHA-256 of a server's end-entity certificate (DER). Shown and parsed as
/// `sha256:<64 lowercase hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertPin(pub [u8; 32]);

impl CertPin {
    /// The text before the digest.
    pub const PREFIX: &'static str = "sha256:";

    /// The pin of a DER-encoded certificate.
    pub fn of_certificate(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }
}

impl fmt::Display for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, hex::encode(self.0))
    }
}

impl fmt::Debug for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertPin({self})")
    }
}

/// A certificate pin that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PinParseError {
    /// The text does not start with `sha256:`.
    #[error(
        "a certificate pin starts with \"sha256:\" followed by 64 hex digits (as persist-relay \
         prints at start)"
    )]
    MissingPrefix,
    /// The digest is not 64 characters.
    #[error("a certificate pin has 64 hex digits after \"sha256:\", this one has {len}")]
    WrongLength {
        /// Characters after the prefix.
        len: usize,
    },
    /// The digest has a character that is not a lowercase hex digit.
    #[error("a certificate pin has only lowercase hex digits (0-9, a-f) after \"sha256:\"")]
    NotHex,
}

impl FromStr for CertPin {
    type Err = PinParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .trim()
            .strip_prefix(Self::PREFIX)
            .ok_or(PinParseError::MissingPrefix)?;
        if digits.len() != 64 {
            return Err(PinParseError::WrongLength {
                len: digits.chars().count(),
            });
        }
        if !digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(PinParseError::NotHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits, &mut out).map_err(|_| PinParseError::NotHex)?;
        Ok(Self(out))
    }
}

// ---------------------------------------------------------------------------
// Server identity

/// A server's certificate chain and private key, checked to match.
pub struct ServerIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pin: CertPin,
}

/// Loading or creating a [`ServerIdentity`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file or directory could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A PEM file is larger than any certificate or key.
    #[error(
        "{} is {len} bytes, more than the {max} a certificate or key file can be: is it the right \
         file?",
        path.display()
    )]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// [`PEM_FILE_BYTES_MAX`].
        max: u64,
    },
    /// A certificate file holds no readable certificate.
    #[error(
        "{} holds no PEM certificate ({detail}): give a file with \"-----BEGIN CERTIFICATE-----\" \
         blocks, the server's own certificate first",
        path.display()
    )]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM reader found wrong.
        detail: String,
    },
    /// A key file holds no readable private key.
    #[error(
        "{} holds no PEM private key ({detail}): give a PKCS#8, PKCS#1 or SEC1 key in PEM",
        path.display()
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What the PEM reader found wrong.
        detail: String,
    },
    /// The key does not belong to the certificate, or the crypto provider
    /// cannot use it.
    #[error(
        "the key in {} does not fit the certificate in {} ({detail}): give the key the \
         certificate was issued for",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls found wrong.
        detail: String,
    },
    /// A certificate is on disk but its key is missing.
    #[error(
        "{} exists but {} does not: restore the key from a backup, or delete the certificate to \
         make a new identity (clients must then be given the new pin)",
        dir.join(CERT_FILE).display(),
        dir.join(KEY_FILE).display()
    )]
    MissingKey {
        /// The identity directory.
        dir: PathBuf,
    },
    /// Generating a self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

impl ServerIdentity {
    /// The identity kept in `dir`: loaded if [`CERT_FILE`] is there,
    /// otherwise made (self-signed, names [`SELF_SIGNED_NAMES`]) and
    /// written there, so the pin stays the same across restarts.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        if exists(&cert_path)? {
            if !exists(&key_path)? {
                return Err(IdentityError::MissingKey {
                    dir: dir.to_path_buf(),
                });
            }
            warn_if_key_is_readable_by_others(&key_path);
            return Self::from_pem_files(&cert_path, &key_path);
        }
        // A key without a certificate is left over from a first start that
        // crashed before it finished; nothing can have used its pin yet.
        let identity = Self::self_signed()?;
        create_private_dir(dir)?;
        let key_pem = pem_of_key(&identity.key);
        write_atomically(dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
        let cert_pem = identity
            .chain
            .iter()
            .map(|c| pem_of("CERTIFICATE", c.as_ref()))
            .collect::<String>();
        write_atomically(dir, CERT_FILE, cert_pem.as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), pin = %identity.pin, "created a self-signed TLS identity");
        Ok(identity)
    }

    /// A fresh self-signed identity that lives only in memory (tests, and
    /// short-lived servers whose pin is handed over in the same process).
    pub fn self_signed() -> Result<Self, IdentityError> {
        let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| (*s).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, DEFAULT_SERVER_NAME);
        // The key comes from ring's system randomness inside rcgen: a TLS
        // identity is operational state, never an input to replayable logic.
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let generated = Path::new("(generated)");
        Self::checked(vec![cert.der().clone()], key, generated, generated)
    }

    /// An operator's certificate chain (end-entity first) and its key, from
    /// PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        let cert_pem = read_bounded(cert)?;
        let key_pem = read_bounded(key)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::BadCertificate {
                path: cert.to_path_buf(),
                detail: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(IdentityError::BadCertificate {
                path: cert.to_path_buf(),
                detail: "no CERTIFICATE block".into(),
            });
        }
        let key_der =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| IdentityError::BadKey {
                path: key.to_path_buf(),
                detail: e.to_string(),
            })?;
        Self::checked(chain, key_der, cert, key)
    }

    /// A certificate chain (end-entity first) and its key, already in DER
    /// (simulations make them from their seed).
    #[cfg(feature = "sim")]
    pub(crate) fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, IdentityError> {
        let seeded = Path::new("(seeded)");
        Self::checked(chain, key, seeded, seeded)
    }

    /// The pin clients use to trust this identity.
    pub fn pin(&self) -> CertPin {
        self.pin
    }

    /// The certificate chain, end-entity first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A rustls server config for `persist/1` presenting this identity,
    /// with the crypto and clock of `basis`.
    pub(crate) fn server_config(
        &self,
        basis: &TlsBasis,
    ) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut config =
            rustls::ServerConfig::builder_with_details(basis.provider.clone(), basis.time.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_no_client_auth()
                .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    fn checked(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, IdentityError> {
        let mismatch = |detail: String| IdentityError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            detail,
        };
        // `from_der` loads the key with the provider and checks that it is
        // the certificate's.
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(|e| mismatch(e.to_string()))?;
        let pin = chain
            .first()
            .map(|c| CertPin::of_certificate(c.as_ref()))
            .ok_or_else(|| mismatch("no certificate".into()))?;
        Ok(Self { chain, key, pin })
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("pin", &self.pin)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Client trust

/// How a client decides that it reached the right server.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Trust {
    /// Exactly the certificate with this pin (names and dates ignored; the
    /// handshake signature is verified).
    Pin(CertPin),
    /// Any certificate that chains to one of these CAs and names the server.
    Roots(Roots),
}

impl Trust {
    /// WebPKI trust in the CA certificates of a PEM file.
    pub fn roots_from_pem_file(path: &Path) -> Result<Self, TrustError> {
        Roots::from_pem_file(path).map(Trust::Roots)
    }
}

/// CA certificates a client trusts.
#[derive(Clone)]
pub struct Roots(Arc<RootCertStore>);

impl Roots {
    /// The CA certificates of a PEM file.
    pub fn from_pem_file(path: &Path) -> Result<Self, TrustError> {
        let pem = read_bounded(path).map_err(|e| TrustError::Read {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TrustError::BadRoots {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        Self::from_der(certs).map_err(|detail| TrustError::BadRoots {
            path: path.to_path_buf(),
            detail,
        })
    }

    /// CA certificates in DER.
    pub fn from_der(certs: Vec<CertificateDer<'static>>) -> Result<Self, String> {
        let mut store = RootCertStore::empty();
        for cert in certs {
            store.add(cert).map_err(|e| e.to_string())?;
        }
        if store.is_empty() {
            return Err("no CERTIFICATE block".into());
        }
        Ok(Self(Arc::new(store)))
    }
}

impl fmt::Debug for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roots({} CAs)", self.0.len())
    }
}

/// A [`Trust`] could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The CA file could not be read.
    #[error("cannot read CA certificates from {}: {detail}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The CA file holds no usable CA certificate.
    #[error(
        "{} holds no usable CA certificate ({detail}): give the PEM certificate of the CA that \
         signed the server's certificate",
        path.display()
    )]
    BadRoots {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// Why a server's certificate was refused during one connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The pinned certificate was not the one presented.
    PinMismatch { expected: CertPin, found: CertPin },
    /// WebPKI verification against the roots failed.
    Untrusted(String),
}

/// Where a verifier records why it refused a certificate, so a connect
/// error can say so instead of quoting a TLS alert.
pub(crate) type RefusalSlot = Arc<Mutex<Option<Refusal>>>;

/// A rustls client config for `persist/1` with `trust`, recording any
/// certificate refusal in `refusal`, with the crypto and clock of `basis`.
pub(crate) fn client_config(
    basis: &TlsBasis,
    trust: &Trust,
    refusal: RefusalSlot,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = basis.provider.clone();
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        Trust::Pin(pin) => Arc::new(PinVerifier {
            pin: *pin,
            algorithms: provider.signature_verification_algorithms,
            refusal,
        }),
        Trust::Roots(roots) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots.0.clone(),
                provider.clone(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            Arc::new(RecordingVerifier { inner, refusal })
        }
    };
    let mut config = rustls::ClientConfig::builder_with_details(provider, basis.time.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        // Not skip-verification: both verifiers check the certificate
        // (by pin, or by WebPKI) and the handshake signatures.
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Accepts exactly one end-entity certificate, by its SHA-256.
#[derive(Debug)]
struct PinVerifier {
    pin: CertPin,
    algorithms: WebPkiSupportedAlgorithms,
    refusal: RefusalSlot,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = CertPin::of_certificate(end_entity.as_ref());
        if found == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        record(
            &self.refusal,
            Refusal::PinMismatch {
                expected: self.pin,
                found,
            },
        );
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// WebPKI verification that remembers why it refused.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    refusal: RefusalSlot,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| record(&self.refusal, Refusal::Untrusted(e.to_string())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn record(slot: &RefusalSlot, refusal: Refusal) {
    let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
    slot.get_or_insert(refusal);
}

// ---------------------------------------------------------------------------
// Files

fn exists(path: &Path) -> Result<bool, IdentityError> {
    path.try_exists().map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let io_err = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(io_err)?.len();
    if len > PEM_FILE_BYTES_MAX {
        return Err(IdentityError::FileTooLarge {
            path: path.to_path_buf(),
            len,
            max: PEM_FILE_BYTES_MAX,
        });
    }
    fs::read(path).map_err(io_err)
}

fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    let io_err = |source| IdentityError::Io {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(io_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    }
    Ok(())
}

/// Writes `dir/name` so that a crash leaves either the old file or the new
/// one: temp file, fsync, rename, fsync of the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io { path, source }
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

fn warn_if_key_is_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "the TLS private key is readable by other users: chmod 600 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn pem_of_key(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    pem_of(label, key.secret_der())
}

/// PEM armour (RFC 7468): base64 lines of 64 characters.
fn pem_of(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_print_and_parse() {
        let pin = CertPin::of_certificate(b"a certificate");
        let text = pin.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<CertPin>(), Ok(pin));
        assert_eq!(format!(" {text}\n").parse::<CertPin>(), Ok(pin));
    }

    #[test]
    fn bad_pins_say_what_is_wrong() {
        assert_eq!("abcd".parse::<CertPin>(), Err(PinParseError::MissingPrefix));
        assert_eq!(
            "sha256:abcd".parse::<CertPin>(),
            Err(PinParseError::WrongLength { len: 4 })
        );
        let upper = format!("sha256:{}", "A".repeat(64));
        assert_eq!(upper.parse::<CertPin>(), Err(PinParseError::NotHex));
        let junk = format!("sha256:{}", "z".repeat(64));
        assert_eq!(junk.parse::<CertPin>(), Err(PinParseError::NotHex));
        let multibyte = format!("sha256:{}", "é".repeat(32));
        assert!(multibyte.parse::<CertPin>().is_err());
    }

    #[test]
    fn identity_persists_across_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("relay");
        let first = ServerIdentity::load_or_create(&home).expect("creates");
        let second = ServerIdentity::load_or_create(&home).expect("loads");
        assert_eq!(first.pin(), second.pin());
        assert_eq!(
            first.pin(),
            CertPin::of_certificate(second.chain()[0].as_ref())
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode(&home.join(KEY_FILE)), 0o600);
            assert_eq!(mode(&home), 0o700);
        }
        assert!(
            !home.join(format!(".{KEY_FILE}.tmp")).exists(),
            "no temp file is left behind"
        );
        // The files are ordinary PEM that from_pem_files reads too.
        let third = ServerIdentity::from_pem_files(&home.join(CERT_FILE), &home.join(KEY_FILE))
            .expect("pem");
        assert_eq!(third.pin(), first.pin());
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        ServerIdentity::load_or_create(dir.path()).expect("creates");
        fs::remove_file(dir.path().join(KEY_FILE)).expect("rm");
        let err = ServerIdentity::load_or_create(dir.path()).expect_err("refused");
        assert!(matches!(err, IdentityError::MissingKey { .. }), "{err}");
        assert!(err.to_string().contains("restore the key"));
    }

    #[test]
    fn a_leftover_key_without_certificate_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(KEY_FILE), b"half-finished").expect("write");
        let identity = ServerIdentity::load_or_create(dir.path()).expect("creates");
        let again = ServerIdentity::load_or_create(dir.path()).expect("loads");
        assert_eq!(identity.pin(), again.pin());
    }

    #[test]
    fn mismatched_and_garbage_files_are_typed_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        ServerIdentity::load_or_create(&a).expect("a");
        ServerIdentity::load_or_create(&b).expect("b");
        let err = ServerIdentity::from_pem_files(&a.join(CERT_FILE), &b.join(KEY_FILE))
            .expect_err("mismatch");
        assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err}");

        let junk = dir.path().join("junk.pem");
        fs::write(&junk, b"not pem at all").expect("write");
        let err = ServerIdentity::from_pem_files(&junk, &a.join(KEY_FILE)).expect_err("junk");
        assert!(matches!(err, IdentityError::BadCertificate { .. }), "{err}");
        let err = ServerIdentity::from_pem_files(&a.join(CERT_FILE), &junk).expect_err("junk");
        assert!(matches!(err, IdentityError::BadKey { .. }), "{err}");
        let err = ServerIdentity::from_pem_files(&dir.path().join("missing"), &junk)
            .expect_err("missing");
        assert!(matches!(err, IdentityError::Io { .. }), "{err}");
    }
}
