//! How a store is opened.

use std::path::{Path, PathBuf};
use std::time::Duration;

use persist_core::env::{Env, Faults};
use persist_core::export::KdfParams;
use persist_core::hlc::MAX_DRIFT_MS_DEFAULT;
use persist_storage::Backend;
use zeroize::Zeroizing;

use crate::kek::KeySource;
use crate::sync::SyncConfig;

/// Options for [`Store::open`](crate::Store::open).
///
/// ```no_run
/// # async fn demo() -> Result<(), persist::Error> {
/// let store = persist::Store::open(
///     persist::Config::new("/var/lib/myapp/store").name("laptop"),
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub struct Config {
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    pub(crate) encrypt: bool,
    pub(crate) key_source: KeySource,
    pub(crate) key_dir: Option<PathBuf>,
    pub(crate) max_clock_drift: Duration,
    pub(crate) backend: Option<Box<dyn Backend>>,
    pub(crate) env: Option<Env>,
    pub(crate) faults: Option<Faults>,
    pub(crate) import: Option<(Zeroizing<String>, Zeroizing<String>)>,
    pub(crate) invite: Option<Zeroizing<String>>,
    pub(crate) invite_timeout: Duration,
    pub(crate) export_kdf: KdfParams,
    pub(crate) read_only: bool,
    pub(crate) create_if_missing: bool,
    pub(crate) sync: Option<SyncConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("encrypt", &self.encrypt)
            .field("key_source", &self.key_source)
            .field("key_dir", &self.key_dir)
            .field("max_clock_drift", &self.max_clock_drift)
            .field("backend", &self.backend)
            .field("import", &self.import.as_ref().map(|_| "<key export>"))
            .field("invite", &self.invite.as_ref().map(|_| "<invite code>"))
            .field("read_only", &self.read_only)
            .field("create_if_missing", &self.create_if_missing)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// A store in directory `path` (created if missing), encrypted, with
    /// its device key in the OS keychain or, where there is none, a keyfile.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            name: String::from("device"),
            encrypt: true,
            key_source: KeySource::Auto,
            key_dir: None,
            max_clock_drift: Duration::from_millis(MAX_DRIFT_MS_DEFAULT),
            backend: None,
            env: None,
            faults: None,
            import: None,
            invite: None,
            invite_timeout: crate::pairing::JOIN_TIMEOUT_DEFAULT,
            export_kdf: KdfParams::default(),
            read_only: false,
            create_if_missing: true,
            sync: None,
        }
    }

    /// This device's name, shown to other members (default `"device"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Whether records are encrypted (default `true`). A store keeps the
    /// choice it was created with; opening it with the other is an error.
    /// `encrypt(false)` stores plain records and exists for baselines and
    /// debugging.
    pub fn encrypt(mut self, encrypt: bool) -> Self {
        self.encrypt = encrypt;
        self
    }

    /// Where the device key lives (default [`KeySource::Auto`]).
    pub fn key_source(mut self, source: KeySource) -> Self {
        self.key_source = source;
        self
    }

    /// Keeps the device key in the keyfile at `path` (created 0600 in a
    /// 0700 directory). Shorthand for `key_source(KeySource::KeyFile(path))`.
    pub fn key_file(self, path: impl Into<PathBuf>) -> Self {
        self.key_source(KeySource::KeyFile(path.into()))
    }

    /// Where [`KeySource::Auto`] puts keyfiles when there is no keychain
    /// (default `$XDG_CONFIG_HOME/persist/keys`, else
    /// `~/.config/persist/keys`).
    pub fn key_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.key_dir = Some(dir.into());
        self
    }

    /// How far ahead of this device's clock a remote version may be before
    /// it is refused (default 10 minutes).
    pub fn max_clock_drift(mut self, drift: Duration) -> Self {
        self.max_clock_drift = drift;
        self
    }

    /// Opens an existing store for reading only: writes, rotations and
    /// purges are refused with a typed error, and no background
    /// re-encryption runs. Opening a directory with no store fails instead
    /// of creating one.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Keeps the store in sync with a relay or a serving device, in the
    /// background, while it is open. Only encrypted stores sync.
    pub fn sync(mut self, sync: SyncConfig) -> Self {
        self.sync = Some(sync);
        self
    }

    /// Whether opening a directory with no store creates one (default
    /// `true`). With `false`, such an open fails with
    /// [`OpenError::NoStore`](crate::OpenError::NoStore) and writes nothing.
    pub fn create_if_missing(mut self, create: bool) -> Self {
        self.create_if_missing = create;
        self
    }

    /// Opens the store with the keys of an export (from
    /// `store.crypto().export_key()` on another device), unwrapped with
    /// `passphrase`.
    ///
    /// On an empty directory this joins the store: the device makes its own
    /// identity and device key, the data keys come from the export, and the
    /// records arrive by sync. On a directory holding a copy of the store's
    /// database it re-keys the copy for this device. An export of another
    /// store, a wrong passphrase or a damaged export is an error, and
    /// nothing is written.
    pub fn key(mut self, exported: &str, passphrase: &str) -> Self {
        self.import = Some((
            Zeroizing::new(exported.to_owned()),
            Zeroizing::new(passphrase.to_owned()),
        ));
        self
    }

    /// Joins a store with an invite code from `store.crypto().create_invite()`
    /// on one of its devices.
    ///
    /// The directory must not hold a store yet. Opening runs the pairing
    /// handshake with the inviting device through the relay the code names
    /// (or, with [`Config::sync`], that remote, which must be the code's
    /// relay), waiting up to [`Config::invite_timeout`] for the inviter to
    /// answer: it answers while its store is open with sync. The device
    /// then holds the store's keys and syncs with the relay; without
    /// [`Config::sync`] it syncs with the code's relay, trusted by the pin
    /// in the code. A damaged, expired or already used code, a code for
    /// another store or relay, or a handshake the relay tampered with is an
    /// error, and nothing is written.
    ///
    /// A join can fail after pairing, once it stored the store's keys
    /// (the device key goes first, then the keyring): opening again with
    /// any invite to the same store then completes it. A directory that
    /// holds the keys but never finished opening resumes without pairing
    /// again (the inviter made this device a member already, and the new
    /// invite stays unused); a device key left without a keyring seals the
    /// keys a new pairing brings.
    pub fn invite(mut self, code: &str) -> Self {
        self.invite = Some(Zeroizing::new(code.to_owned()));
        self
    }

    /// How long opening with [`Config::invite`] waits for the inviter
    /// (default 10 minutes).
    pub fn invite_timeout(mut self, timeout: Duration) -> Self {
        self.invite_timeout = timeout;
        self
    }

    /// Keeps the database in `backend` instead of a file (for tests and
    /// simulations: an in-memory or fault-injecting byte store).
    pub fn storage_backend(mut self, backend: Box<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Options that weaken security; for tests and simulations.
    pub fn dangerous(self) -> DangerousConfig {
        DangerousConfig(self)
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn default_key_dir(&self) -> PathBuf {
        if let Some(d) = &self.key_dir {
            return d.clone();
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| self.path.join(".."));
        base.join("persist").join("keys")
    }
}

/// Options that weaken security. Reached only through
/// [`Config::dangerous`], so that they stand out in review.
#[derive(Debug)]
pub struct DangerousConfig(Config);

impl DangerousConfig {
    /// Replaces the system clock and OS randomness with `env`. With a
    /// seeded environment every key this store makes is predictable from
    /// the seed: only for tests and simulations.
    pub fn env(mut self, env: Env) -> Self {
        self.0.env = Some(env);
        self
    }

    /// Lets `faults` inject failures at the product's fault points
    /// ([`crate::FaultPoint`]: commits failing or slow, the Rotator
    /// stopping, connections dropping), into the system environment or
    /// the one [`Self::env`] gave: only for tests and simulations.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.0.faults = Some(faults);
        self
    }

    /// Argon2id costs for key exports made by this store (default 64 MiB,
    /// 3 passes). Lower costs make a stolen export cheaper to brute-force:
    /// only for tests.
    pub fn export_kdf(mut self, params: KdfParams) -> Self {
        self.0.export_kdf = params;
        self
    }

    /// Syncs through `dial` instead of QUIC: no TLS, no certificate
    /// check; whatever `dial` connects to is trusted as the remote named
    /// `name`. For simulations and tests, which run the relay's sessions
    /// over in-memory streams.
    pub fn sync_via(mut self, name: &str, dial: std::sync::Arc<dyn crate::sync::Dial>) -> Self {
        self.0.sync = Some(SyncConfig::new(crate::sync::Remote::dialed(name, dial)));
        self
    }

    /// Back to the ordinary options.
    pub fn done(self) -> Config {
        self.0
    }
}
