//! The device key-encryption key (KEK): where it lives, and how it is made.
//!
//! The KEK is 32 random bytes that seal this device's copy of a store's
//! keyring (AES-256-GCM-SIV, done by the caller). It never leaves the device.
//! It lives in one of two places:
//!
//! - **The OS keychain**, through the keyring 4.x ecosystem: `keyring-core`
//!   plus one store crate per platform (macOS legacy keychain, iOS protected
//!   data, Windows Credential Manager, Linux Secret Service over zbus). The
//!   entry is service [`KEYCHAIN_SERVICE`], account = the store id in hex.
//!   Linux keyutils is deliberately not used: it does not survive a reboot.
//! - **A keyfile**, when configured ([`KeySource::KeyFile`]) or when no
//!   keychain answers ([`KeySource::Auto`] on a headless machine):
//!   `default_dir/<store id>.key`.
//!
//! [`load`] opens the key of an existing store and never creates one: a
//! missing key is [`KekError::NotFound`], so a lost or replaced key is an
//! error rather than a silent new key that cannot open the keyring.
//! [`create`] makes the key of a new store and never overwrites an existing
//! one.
//!
//! # Format
//!
//! In both places the KEK is stored as ASCII text: exactly 64 lowercase hex
//! digits. The keyfile adds one `\n`; on load, trailing ASCII whitespace is
//! ignored (an editor may add a line ending) and upper-case digits are
//! accepted. Text rather than raw bytes because some Secret Service backends
//! (KDE Wallet) store only UTF-8, and so that a person can back the key up
//! or move it by copy and paste.
//!
//! # Invariants
//!
//! - A keyfile is created mode 0600 (unix) in a directory that is created
//!   0700 if missing; the default key directory is also tightened to 0700.
//!   It is written to a temp file in the same directory, fsynced, renamed
//!   into place without replacing anything (`renameat2(RENAME_NOREPLACE)` or
//!   `link`, via `tempfile`), and the directory is fsynced.
//! - A keyfile is loaded only if it is a regular file, not a symlink, and
//!   (unix) neither group nor world may read or write it.
//! - Key bytes never reach a log line, an error message or a `Debug` output;
//!   [`Kek`] zeroizes on drop, as do the buffers that held its hex text.
//!
//! # Headless Linux and hangs
//!
//! The Secret Service is reached over the D-Bus session bus. Before touching
//! D-Bus at all, [`KeySource::Auto`] checks that a session bus can exist
//! (`DBUS_SESSION_BUS_ADDRESS` set, or `$XDG_RUNTIME_DIR/bus` present — the
//! same places zbus looks); on a headless machine neither is, and the keyfile
//! is used at once. Every keychain call also runs on a helper thread with a
//! deadline ([`KEYCHAIN_OPEN_WITHIN`], [`KEYCHAIN_ACCESS_WITHIN`]), because a
//! D-Bus service that is activatable but never answers, or an unlock prompt
//! nobody can see, would otherwise block the caller forever. A thread that
//! misses its deadline is abandoned (it holds no lock of ours and exits when
//! D-Bus finally answers).

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use keyring_core::{CredentialStore, Entry};
use zeroize::Zeroizing;

/// Length of the KEK in bytes (AES-256).
pub(crate) const KEK_BYTES: usize = 32;

/// Length of the KEK as hex text, without any line ending.
const KEK_HEX_BYTES: usize = 2 * KEK_BYTES;

/// The most bytes a keyfile may hold: the hex text plus room for whatever
/// line ending or trailing whitespace an editor adds. Anything longer is not
/// a keyfile, and is not read into memory.
const KEYFILE_BYTES_MAX: usize = 128;
const _: () = assert!(
    KEYFILE_BYTES_MAX > KEK_HEX_BYTES,
    "a keyfile must fit the hex key and a line ending"
);

/// The keychain service name under which every store's KEK is filed.
pub(crate) const KEYCHAIN_SERVICE: &str = "persist";

/// The longest a store id (the keychain account, and the keyfile's stem) may
/// be, in hex digits. Store ids are 16 bytes (32 digits); this leaves room to
/// grow while keeping file names short.
const ACCOUNT_HEX_MAX: usize = 64;

/// How long opening the OS keychain may take. A running Secret Service
/// answers in milliseconds and no person is involved at this step, so a slow
/// answer means none is coming (for example an activatable service that
/// cannot start without a display).
pub(crate) const KEYCHAIN_OPEN_WITHIN: Duration = Duration::from_secs(3);

/// How long one read or write of the keychain entry may take. It can show an
/// unlock prompt that a person has to answer, so this is generous; it exists
/// so that a prompt nobody can see does not hang the process forever.
pub(crate) const KEYCHAIN_ACCESS_WITHIN: Duration = Duration::from_secs(120);

/// Where the device key lives, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// The OS keychain if one answers, else a keyfile at the default path
    /// (`default_dir/<store id>.key`).
    #[default]
    Auto,
    /// Only the OS keychain; fail if none answers.
    Keychain,
    /// A keyfile at this path (the CLI's `--key-file` / `PERSIST_KEY_FILE`).
    KeyFile(PathBuf),
}

/// Where the KEK was found or put; `persist status` shows it as `key_source`.
///
/// Displays as `keychain (service persist, account <store id>)` or
/// `keyfile <path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    /// An OS keychain entry.
    Keychain {
        /// The keychain service name, always [`KEYCHAIN_SERVICE`].
        service: String,
        /// The keychain account: the store id in hex.
        account: String,
    },
    /// A keyfile at this path.
    KeyFile(PathBuf),
}

impl KeyLocation {
    /// The keychain entry of the store `account`.
    fn keychain(account: &str) -> Self {
        KeyLocation::Keychain {
            service: KEYCHAIN_SERVICE.to_owned(),
            account: account.to_owned(),
        }
    }
}

impl fmt::Display for KeyLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyLocation::Keychain { service, account } => {
                write!(f, "keychain (service {service}, account {account})")
            }
            KeyLocation::KeyFile(path) => write!(f, "keyfile {}", path.display()),
        }
    }
}

/// The device key-encryption key.
///
/// Zeroized on drop; deliberately has no `Debug`, `Display`, `Clone` or
/// `Serialize`, so that it cannot end up in a log or a message by accident.
pub(crate) struct Kek(Zeroizing<[u8; KEK_BYTES]>);

impl Kek {
    /// The key bytes, to seal or open the keyring with.
    pub(crate) fn as_bytes(&self) -> &[u8; KEK_BYTES] {
        &self.0
    }

    /// Draws a new KEK from `rng`, straight into zeroizing memory.
    fn generate(rng: &mut dyn rand_core::CryptoRng) -> Kek {
        let mut bytes = Zeroizing::new([0u8; KEK_BYTES]);
        rng.fill_bytes(bytes.as_mut_slice());
        Kek(bytes)
    }

    /// The storage form: 64 lowercase hex digits and a `\n`.
    fn to_hex_line(&self) -> Zeroizing<[u8; KEK_HEX_BYTES + 1]> {
        let mut text = Zeroizing::new([b'\n'; KEK_HEX_BYTES + 1]);
        // Cannot fail: the output slice is exactly twice the input's length.
        let encoded = hex::encode_to_slice(self.0.as_slice(), &mut text[..KEK_HEX_BYTES]);
        debug_assert!(encoded.is_ok(), "hex output sized 2 * KEK_BYTES");
        text
    }

    /// Parses the storage form. `Err` is a description of what is wrong that
    /// never quotes the content (it may be a key in the wrong format).
    fn parse(text: &[u8]) -> Result<Kek, String> {
        let text = text.trim_ascii_end();
        if text.len() != KEK_HEX_BYTES {
            return Err(format!(
                "expected {KEK_HEX_BYTES} hex digits, found {} bytes",
                text.len()
            ));
        }
        let mut bytes = Zeroizing::new([0u8; KEK_BYTES]);
        hex::decode_to_slice(text, bytes.as_mut_slice())
            .map_err(|_| format!("expected {KEK_HEX_BYTES} hex digits, found other characters"))?;
        Ok(Kek(bytes))
    }
}

/// Why the KEK could not be loaded or created. Every message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KekError {
    /// No key for this store where it was looked for. A store's key is never
    /// silently recreated: a new key could not open the existing keyring.
    #[error(
        "no device key for this store in {}: restore the key there, or point \
         --key-file / PERSIST_KEY_FILE at where it is",
        join_locations(.looked_in)
    )]
    NotFound {
        /// Every place that was searched, in order.
        looked_in: Vec<KeyLocation>,
    },
    /// `create` found a key already there, and left it untouched.
    #[error(
        "a device key already exists in {location}; it was left untouched \
         (a new store never replaces an existing key)"
    )]
    AlreadyExists {
        /// The existing key.
        location: KeyLocation,
    },
    /// The keyfile may be read or written by users other than its owner.
    #[error(
        "keyfile {} is accessible to other users (mode {:03o}); fix it with: chmod 600 {}",
        .path.display(),
        .mode & 0o777,
        shell_quote(.path)
    )]
    #[cfg_attr(not(unix), allow(dead_code, reason = "modes are only checked on unix"))]
    InsecurePermissions {
        /// The keyfile.
        path: PathBuf,
        /// Its `st_mode` bits.
        mode: u32,
    },
    /// The keyfile is a symbolic link; it is not followed, so that nobody
    /// can point the store at a key of their choosing.
    #[error(
        "keyfile {} is a symbolic link, which is refused: put the key file itself at this path, \
         or pass its real path with --key-file",
        .path.display()
    )]
    Symlink {
        /// The keyfile path.
        path: PathBuf,
    },
    /// Something other than a regular file (a directory, a fifo...) is at
    /// the keyfile path.
    #[error("keyfile {} is not a regular file", .path.display())]
    NotAFile {
        /// The keyfile path.
        path: PathBuf,
    },
    /// The stored key is not 64 hex digits.
    #[error(
        "the device key in {location} is malformed ({detail}); it must be 64 hex digits. \
         Restore the original key: a new key cannot open this store"
    )]
    Malformed {
        /// Where the bad key is.
        location: KeyLocation,
        /// What is wrong with it (never its content).
        detail: String,
    },
    /// `KeySource::Keychain` was asked for, and no OS keychain answered.
    #[error(
        "no OS keychain is available ({detail}); use a keyfile instead \
         (--key-file / PERSIST_KEY_FILE)"
    )]
    NoKeychain {
        /// Why there is none.
        detail: String,
    },
    /// The OS keychain answered but refused, failed or timed out.
    #[error(
        "the OS keychain failed for {location}: {detail} (unlock the keychain and retry, \
         or use a keyfile with --key-file / PERSIST_KEY_FILE)"
    )]
    Keychain {
        /// The entry concerned.
        location: KeyLocation,
        /// What went wrong.
        detail: String,
    },
    /// The store id is not a hex string, so it cannot name a key.
    #[error(
        "store id {account:?} is not 1 to {ACCOUNT_HEX_MAX} hex digits, \
         so it cannot name a device key"
    )]
    InvalidAccount {
        /// The rejected store id.
        account: String,
    },
    /// Reading or writing the keyfile or its directory failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Loads the KEK of a store that already exists.
///
/// Never creates a key: a missing one is [`KekError::NotFound`] naming every
/// place searched. With [`KeySource::Auto`] the keychain is searched first,
/// then the keyfile `default_dir/<account>.key`; if the keychain failed
/// (rather than simply not having the entry) and there is no keyfile either,
/// the keychain's error is returned, since it says more.
///
/// `account` is the store id in hex. Blocks for at most
/// [`KEYCHAIN_OPEN_WITHIN`] + [`KEYCHAIN_ACCESS_WITHIN`] on the keychain
/// (the latter only if the keychain shows an unlock prompt).
pub(crate) fn load(
    source: &KeySource,
    default_dir: &Path,
    account: &str,
) -> Result<(Kek, KeyLocation), KekError> {
    load_with(&Keychain::os(), source, default_dir, account)
}

/// Creates and stores the KEK of a new store, drawing its 32 bytes from
/// `rng` (the caller's injected entropy).
///
/// With [`KeySource::Auto`] the key goes to the keychain if one answers,
/// else to the keyfile `default_dir/<account>.key`. Refuses to replace an
/// existing key with [`KekError::AlreadyExists`]; under `Auto` an existing
/// default keyfile also counts, since `load` would otherwise find two keys.
/// A keychain that answers but then fails is an error, not a reason to fall
/// back: the user should know their keychain is not holding the key.
pub(crate) fn create(
    source: &KeySource,
    default_dir: &Path,
    account: &str,
    rng: &mut dyn rand_core::CryptoRng,
) -> Result<(Kek, KeyLocation), KekError> {
    create_with(&Keychain::os(), source, default_dir, account, rng)
}

/// [`load`] against a given keychain.
fn load_with(
    keychain: &Keychain,
    source: &KeySource,
    default_dir: &Path,
    account: &str,
) -> Result<(Kek, KeyLocation), KekError> {
    check_account(account)?;
    match source {
        KeySource::KeyFile(path) => load_keyfile(path),
        KeySource::Keychain => {
            let store = keychain
                .open()
                .map_err(|detail| KekError::NoKeychain { detail })?;
            match keychain.read(store, account)? {
                Some(kek) => Ok((kek, KeyLocation::keychain(account))),
                None => Err(KekError::NotFound {
                    looked_in: vec![KeyLocation::keychain(account)],
                }),
            }
        }
        KeySource::Auto => {
            let path = default_keyfile(default_dir, account);
            let store = match keychain.open() {
                Ok(store) => store,
                Err(detail) => {
                    tracing::info!(
                        "no OS keychain ({detail}); loading the device key from keyfile {}",
                        path.display()
                    );
                    return load_keyfile(&path);
                }
            };
            let keychain_error = match keychain.read(store, account) {
                Ok(Some(kek)) => return Ok((kek, KeyLocation::keychain(account))),
                Ok(None) => None,
                Err(error) => {
                    tracing::warn!("{error}; trying keyfile {}", path.display());
                    Some(error)
                }
            };
            match (load_keyfile(&path), keychain_error) {
                (Err(KekError::NotFound { .. }), Some(error)) => Err(error),
                (Err(KekError::NotFound { .. }), None) => Err(KekError::NotFound {
                    looked_in: vec![KeyLocation::keychain(account), KeyLocation::KeyFile(path)],
                }),
                (found, _) => found,
            }
        }
    }
}

/// [`create`] against a given keychain.
fn create_with(
    keychain: &Keychain,
    source: &KeySource,
    default_dir: &Path,
    account: &str,
    rng: &mut dyn rand_core::CryptoRng,
) -> Result<(Kek, KeyLocation), KekError> {
    check_account(account)?;
    match source {
        KeySource::KeyFile(path) => {
            let kek = Kek::generate(rng);
            write_keyfile(path, &kek, DirPolicy::CreateMissing)?;
            Ok((kek, KeyLocation::KeyFile(path.clone())))
        }
        KeySource::Keychain => {
            let store = keychain
                .open()
                .map_err(|detail| KekError::NoKeychain { detail })?;
            let kek = Kek::generate(rng);
            keychain.write_new(store, account, &kek)?;
            Ok((kek, KeyLocation::keychain(account)))
        }
        KeySource::Auto => {
            let path = default_keyfile(default_dir, account);
            match keychain.open() {
                Ok(store) => {
                    if path_exists(&path)? {
                        return Err(KekError::AlreadyExists {
                            location: KeyLocation::KeyFile(path),
                        });
                    }
                    let kek = Kek::generate(rng);
                    keychain.write_new(store, account, &kek)?;
                    Ok((kek, KeyLocation::keychain(account)))
                }
                Err(detail) => {
                    tracing::info!(
                        "no OS keychain ({detail}); keeping the device key in keyfile {} instead",
                        path.display()
                    );
                    let kek = Kek::generate(rng);
                    write_keyfile(&path, &kek, DirPolicy::CreatePrivate)?;
                    Ok((kek, KeyLocation::KeyFile(path)))
                }
            }
        }
    }
}

/// Refuses store ids that are not short hex strings: the id becomes a file
/// name, so anything else (`..`, `/`) could escape the key directory.
fn check_account(account: &str) -> Result<(), KekError> {
    let valid = (1..=ACCOUNT_HEX_MAX).contains(&account.len())
        && account.bytes().all(|b| b.is_ascii_hexdigit());
    if valid {
        Ok(())
    } else {
        Err(KekError::InvalidAccount {
            account: account.to_owned(),
        })
    }
}

/// The keyfile used by [`KeySource::Auto`] when there is no keychain.
fn default_keyfile(default_dir: &Path, account: &str) -> PathBuf {
    default_dir.join(format!("{account}.key"))
}

/// Joins locations for [`KekError::NotFound`]'s message.
fn join_locations(locations: &[KeyLocation]) -> String {
    let names: Vec<String> = locations.iter().map(ToString::to_string).collect();
    names.join(" or ")
}

/// Quotes `path` for a POSIX shell, so the suggested command can be pasted.
fn shell_quote(path: &Path) -> String {
    let text = path.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,%".contains(&b));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------
// Keyfile

/// What to do about the keyfile's directory before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirPolicy {
    /// Create it 0700 if missing; leave an existing one alone (a path the
    /// user chose may sit in a directory they share on purpose).
    CreateMissing,
    /// Create it 0700 if missing, and tighten it to 0700 if it exists: it is
    /// Persist's own key directory.
    CreatePrivate,
}

/// Loads and checks the keyfile at `path`.
fn load_keyfile(path: &Path) -> Result<(Kek, KeyLocation), KekError> {
    let location = || KeyLocation::KeyFile(path.to_path_buf());
    let io_error = |source| KekError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(KekError::NotFound {
                looked_in: vec![location()],
            });
        }
        Err(error) => return Err(io_error(error)),
    };
    check_keyfile_meta(path, &meta)?;
    if meta.len() > KEYFILE_BYTES_MAX as u64 {
        return Err(KekError::Malformed {
            location: location(),
            detail: format!("the file holds {} bytes", meta.len()),
        });
    }

    let mut file = fs::File::open(path).map_err(io_error)?;
    // The path was checked, then opened: make sure the checked file is the
    // one that was opened, not a symlink swapped in between.
    let opened = file.metadata().map_err(io_error)?;
    if !same_file(&meta, &opened) {
        return Err(io_error(io::Error::other(
            "the keyfile was replaced while it was being opened; try again",
        )));
    }

    let mut text = Zeroizing::new([0u8; KEYFILE_BYTES_MAX + 1]);
    let len = read_up_to(&mut file, text.as_mut_slice()).map_err(io_error)?;
    if len > KEYFILE_BYTES_MAX {
        return Err(KekError::Malformed {
            location: location(),
            detail: format!("the file holds more than {KEYFILE_BYTES_MAX} bytes"),
        });
    }
    let kek = Kek::parse(&text[..len]).map_err(|detail| KekError::Malformed {
        location: location(),
        detail,
    })?;
    Ok((kek, location()))
}

/// Refuses a keyfile that is a symlink, not a regular file, or (unix)
/// accessible to anyone but its owner.
fn check_keyfile_meta(path: &Path, meta: &fs::Metadata) -> Result<(), KekError> {
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        return Err(KekError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !file_type.is_file() {
        return Err(KekError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KekError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// Whether two metadata describe the same file (unix: device and inode;
/// elsewhere the check is skipped).
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        a.dev() == b.dev() && a.ino() == b.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (a, b);
        true
    }
}

/// Reads until `buf` is full or the file ends, into `buf` only (no growing
/// buffer leaves unzeroized copies of the key behind). Returns the length.
fn read_up_to(file: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(len)
}

/// Whether anything (even a dangling symlink) is at `path`.
fn path_exists(path: &Path) -> Result<bool, KekError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(KekError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a new keyfile durably, never replacing an existing one: temp file
/// (0600) in the same directory, fsync, rename-without-replace, fsync of the
/// directory.
fn write_keyfile(path: &Path, kek: &Kek, policy: DirPolicy) -> Result<(), KekError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let io_at = |at: &Path| {
        let at = at.to_path_buf();
        move |source| KekError::Io { path: at, source }
    };
    // Checked first so that an existing key is reported before any write.
    if path_exists(path)? {
        return Err(KekError::AlreadyExists {
            location: KeyLocation::KeyFile(path.to_path_buf()),
        });
    }
    let created = ensure_dir(dir, policy)?;

    let mut builder = tempfile::Builder::new();
    builder.prefix(".persist-key-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        builder.permissions(fs::Permissions::from_mode(0o600));
    }
    let mut temp = builder.tempfile_in(dir).map_err(io_at(dir))?;
    let temp_path = temp.path().to_path_buf();
    temp.write_all(kek.to_hex_line().as_slice())
        .map_err(io_at(&temp_path))?;
    temp.as_file().sync_all().map_err(io_at(&temp_path))?;
    // On failure the temp file is dropped with the error, which deletes it.
    temp.persist_noclobber(path).map_err(|error| {
        if error.error.kind() == io::ErrorKind::AlreadyExists {
            KekError::AlreadyExists {
                location: KeyLocation::KeyFile(path.to_path_buf()),
            }
        } else {
            KekError::Io {
                path: path.to_path_buf(),
                source: error.error,
            }
        }
    })?;

    // The rename is durable once the directory is; a directory we created is
    // durable once its own parent is.
    sync_dir(dir)?;
    for new_dir in created {
        if let Some(parent) = new_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Makes sure `dir` exists, creating missing levels 0700. Returns the
/// directories it created, deepest first, so their parents can be fsynced.
fn ensure_dir(dir: &Path, policy: DirPolicy) -> Result<Vec<PathBuf>, KekError> {
    let io_error = |source| KekError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut created = Vec::new();
    let mut probe = Some(dir);
    while let Some(level) = probe.filter(|p| !p.as_os_str().is_empty()) {
        match fs::metadata(level) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                created.push(level.to_path_buf());
            }
            _ => break,
        }
        probe = level.parent();
    }

    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_error)?;

    #[cfg(unix)]
    if policy == DirPolicy::CreatePrivate {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(dir).map_err(io_error)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::info!(
                "tightening key directory {} from mode {:03o} to 700",
                dir.display(),
                mode & 0o777
            );
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error)?;
        }
    }
    #[cfg(not(unix))]
    let _ = policy;
    Ok(created)
}

/// Fsyncs a directory so that entries created or renamed in it survive a
/// crash. Windows cannot open a directory as a file, and NTFS journals the
/// rename itself, so there it is a no-op.
fn sync_dir(dir: &Path) -> Result<(), KekError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| KekError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

// ---------------------------------------------------------------------------
// Keychain

/// How this process reaches a keychain: the OS one, or in tests a stand-in.
struct Keychain {
    /// Which keychain.
    backend: Backend,
    /// Deadline for opening it.
    open_within: Duration,
    /// Deadline for one read or write of an entry.
    access_within: Duration,
}

/// The keychains [`Keychain`] can reach.
#[derive(Clone)]
enum Backend {
    /// The platform's keychain, through its keyring-core store.
    Os,
    /// An in-memory store (keyring-core's mock).
    #[cfg(test)]
    Store(Arc<CredentialStore>),
    /// No keychain at all, like a headless machine.
    #[cfg(test)]
    Absent,
    /// A keychain that never answers, like a D-Bus service that hangs.
    #[cfg(test)]
    Hangs,
}

impl Keychain {
    /// The OS keychain with the production deadlines.
    fn os() -> Self {
        Keychain {
            backend: Backend::Os,
            open_within: KEYCHAIN_OPEN_WITHIN,
            access_within: KEYCHAIN_ACCESS_WITHIN,
        }
    }

    /// Opens the keychain. `Err` says why there is none: it is either absent
    /// or did not answer in time, and either way the caller may fall back.
    fn open(&self) -> Result<Arc<CredentialStore>, String> {
        let backend = self.backend.clone();
        bounded("opening the OS keychain", self.open_within, move || {
            backend.open()
        })?
    }

    /// Reads the KEK of `account`; `Ok(None)` if the keychain has no entry.
    fn read(&self, store: Arc<CredentialStore>, account: &str) -> Result<Option<Kek>, KekError> {
        let location = KeyLocation::keychain(account);
        let keychain_error = |detail| KekError::Keychain {
            location: location.clone(),
            detail,
        };
        let owned_account = account.to_owned();
        let secret = bounded("reading the keychain", self.access_within, move || {
            let entry = Entry::new_in_store(&store, KEYCHAIN_SERVICE, &owned_account)?;
            entry.get_secret().map(Zeroizing::new)
        })
        .map_err(keychain_error)?;
        match secret {
            Ok(text) => Kek::parse(&text)
                .map(Some)
                .map_err(|detail| KekError::Malformed {
                    location: location.clone(),
                    detail,
                }),
            Err(keyring_core::Error::NoEntry) => Ok(None),
            Err(error) => Err(keychain_error(describe(&error))),
        }
    }

    /// Stores `kek` as a new entry for `account`, then reads it back, so
    /// that a key the keychain mangled is caught before anything is sealed
    /// under it.
    fn write_new(
        &self,
        store: Arc<CredentialStore>,
        account: &str,
        kek: &Kek,
    ) -> Result<(), KekError> {
        let location = KeyLocation::keychain(account);
        let keychain_error = |detail| KekError::Keychain {
            location: location.clone(),
            detail,
        };
        let owned_account = account.to_owned();
        let text = kek.to_hex_line();
        let outcome = bounded("writing the keychain", self.access_within, move || {
            let entry = Entry::new_in_store(&store, KEYCHAIN_SERVICE, &owned_account)?;
            match entry.get_secret() {
                Ok(_) => return Ok(WriteOutcome::AlreadyExists),
                Err(keyring_core::Error::NoEntry) => {}
                Err(error) => return Err(error),
            }
            let hex = &text[..KEK_HEX_BYTES];
            entry.set_secret(hex)?;
            let back = Zeroizing::new(entry.get_secret()?);
            Ok(if back.as_slice() == hex {
                WriteOutcome::Written
            } else {
                WriteOutcome::ReadBackDiffers
            })
        })
        .map_err(|detail| {
            keychain_error(format!(
                "{detail}; the entry may have been written anyway, and will be refused by a new \
                 store until it is deleted"
            ))
        })?;
        match outcome {
            Ok(WriteOutcome::Written) => Ok(()),
            Ok(WriteOutcome::AlreadyExists) => Err(KekError::AlreadyExists { location }),
            Ok(WriteOutcome::ReadBackDiffers) => Err(keychain_error(
                "the keychain returned a different key than was stored".to_owned(),
            )),
            Err(error) => Err(keychain_error(describe(&error))),
        }
    }
}

/// What the keychain write job found.
enum WriteOutcome {
    /// The key is stored and reads back the same.
    Written,
    /// An entry was already there; nothing was written.
    AlreadyExists,
    /// The key was stored but reads back different.
    ReadBackDiffers,
}

impl Backend {
    /// Opens the keychain store (on the helper thread).
    fn open(self) -> Result<Arc<CredentialStore>, String> {
        match self {
            Backend::Os => open_os_store(),
            #[cfg(test)]
            Backend::Store(store) => Ok(store),
            #[cfg(test)]
            Backend::Absent => Err("no keychain in this test".to_owned()),
            #[cfg(test)]
            Backend::Hangs => loop {
                std::thread::park();
            },
        }
    }
}

/// Opens the platform's keyring-core store.
fn open_os_store() -> Result<Arc<CredentialStore>, String> {
    #[cfg(target_os = "linux")]
    {
        if let Some(why) = no_session_bus() {
            return Err(why);
        }
        // Connects to the session bus and opens a Secret Service session:
        // this fails if no Secret Service is running.
        let store: Arc<CredentialStore> =
            zbus_secret_service_keyring_store::Store::new().map_err(|e| describe(&e))?;
        Ok(store)
    }
    #[cfg(target_os = "macos")]
    {
        let store: Arc<CredentialStore> =
            apple_native_keyring_store::keychain::Store::new().map_err(|e| describe(&e))?;
        Ok(store)
    }
    #[cfg(target_os = "ios")]
    {
        let store: Arc<CredentialStore> =
            apple_native_keyring_store::protected::Store::new().map_err(|e| describe(&e))?;
        Ok(store)
    }
    #[cfg(target_os = "windows")]
    {
        let store: Arc<CredentialStore> =
            windows_native_keyring_store::Store::new().map_err(|e| describe(&e))?;
        Ok(store)
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "ios",
        target_os = "windows"
    )))]
    {
        Err("this platform has no supported OS keychain".to_owned())
    }
}

/// On Linux, says why there cannot be a session bus, without touching D-Bus:
/// zbus connects to `DBUS_SESSION_BUS_ADDRESS`, else to
/// `$XDG_RUNTIME_DIR/bus`; with neither there is nothing to connect to.
/// (zbus also tries `/run/user/<uid>/bus` when `XDG_RUNTIME_DIR` is unset;
/// a login session that has a bus always sets it.)
#[cfg(target_os = "linux")]
fn no_session_bus() -> Option<String> {
    if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|a| !a.is_empty()) {
        return None;
    }
    let socket = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(&dir).join("bus"));
    match socket {
        Some(socket) if socket.exists() => None,
        _ => Some(
            "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is unset and there is no \
             $XDG_RUNTIME_DIR/bus), so no Secret Service"
                .to_owned(),
        ),
    }
}

/// Describes a keyring error without the secret bytes some variants carry
/// (their `Debug` output, and `Ambiguous`'s `Display`, would print them).
fn describe(error: &keyring_core::Error) -> String {
    use keyring_core::Error as E;
    match error {
        E::BadEncoding(_) | E::BadDataFormat(..) => "the stored secret is malformed".to_owned(),
        E::Ambiguous(entries) => format!(
            "{} keychain entries match; delete all but one",
            entries.len()
        ),
        other => other.to_string(),
    }
}

/// Runs `job` on a helper thread and waits at most `limit` for it. `Err`
/// says which step (`what`) did not finish; the thread is then abandoned.
///
/// Keychain crates block on IPC (D-Bus, XPC, RPC) that can wait forever on a
/// service or a prompt that never answers; a thread is the only way to put a
/// deadline on a blocking call we do not own.
fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    // Capacity 1: an abandoned job's send never blocks, it just fails.
    let (sender, receiver) = mpsc::sync_channel(1);
    // allow-nondeterminism: the keychain is OS IO reached only at store open,
    // never in a simulation; a thread puts a deadline on its blocking calls.
    std::thread::Builder::new()
        .name("persist-keychain".to_owned())
        .spawn(move || {
            // The receiver is gone if we timed out; nobody needs the result.
            let _ = sender.send(job());
        })
        .map_err(|error| format!("{what}: could not start a thread: {error}"))?;
    match receiver.recv_timeout(limit) {
        Ok(value) => Ok(value),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "{what} got no answer within {} s",
            limit.as_secs_f32()
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(format!("{what} failed: the keychain library panicked"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::Rng as _;

    /// A predictable "RNG" so tests can name the bytes they expect. Not
    /// random: tests only.
    struct CountingRng(u8);

    impl rand_core::TryRng for CountingRng {
        type Error = core::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            let mut b = [0; 4];
            self.try_fill_bytes(&mut b)?;
            Ok(u32::from_le_bytes(b))
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            let mut b = [0; 8];
            self.try_fill_bytes(&mut b)?;
            Ok(u64::from_le_bytes(b))
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            for byte in dst {
                self.0 = self.0.wrapping_add(1);
                *byte = self.0;
            }
            Ok(())
        }
    }
    impl rand_core::TryCryptoRng for CountingRng {}

    const ACCOUNT: &str = "00112233445566778899aabbccddeeff";

    fn expected_bytes() -> [u8; KEK_BYTES] {
        let mut bytes = [0u8; KEK_BYTES];
        CountingRng(0).fill_bytes(&mut bytes);
        bytes
    }

    fn keychain(backend: Backend) -> Keychain {
        Keychain {
            backend,
            open_within: Duration::from_millis(200),
            access_within: Duration::from_millis(200),
        }
    }

    fn mock() -> Keychain {
        let store: Arc<CredentialStore> = keyring_core::mock::Store::new().unwrap();
        keychain(Backend::Store(store))
    }

    fn store_of(keychain: &Keychain) -> Arc<CredentialStore> {
        match &keychain.backend {
            Backend::Store(store) => store.clone(),
            _ => panic!("not a mock keychain"),
        }
    }

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keyfile_create_then_load_gives_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("k.key");
        let source = KeySource::KeyFile(path.clone());
        let (made, at) = create(&source, dir.path(), ACCOUNT, &mut CountingRng(0)).unwrap();
        assert_eq!(made.as_bytes(), &expected_bytes());
        assert_eq!(at, KeyLocation::KeyFile(path.clone()));
        let (loaded, at) = load(&source, dir.path(), ACCOUNT).unwrap();
        assert_eq!(loaded.as_bytes(), made.as_bytes());
        assert_eq!(at.to_string(), format!("keyfile {}", path.display()));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", hex::encode(expected_bytes())));
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left behind");
    }

    #[cfg(unix)]
    #[test]
    fn keyfile_is_0600_in_a_0700_dir() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("a").join("keys");
        let path = keys.join("k.key");
        create(
            &KeySource::KeyFile(path.clone()),
            dir.path(),
            ACCOUNT,
            &mut CountingRng(0),
        )
        .unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(mode_of(&keys), 0o700);
        assert_eq!(mode_of(&dir.path().join("a")), 0o700);
    }

    #[cfg(unix)]
    #[test]
    fn auto_tightens_the_default_key_dir() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        fs::create_dir(&keys).unwrap();
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o755)).unwrap();
        let (_, at) = create_with(
            &keychain(Backend::Absent),
            &KeySource::Auto,
            &keys,
            ACCOUNT,
            &mut CountingRng(0),
        )
        .unwrap();
        assert_eq!(
            at,
            KeyLocation::KeyFile(keys.join(format!("{ACCOUNT}.key")))
        );
        assert_eq!(mode_of(&keys), 0o700);
    }

    #[cfg(unix)]
    #[test]
    fn group_readable_keyfile_is_refused_with_the_chmod_fix() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my keys").join("k.key");
        let source = KeySource::KeyFile(path.clone());
        create(&source, dir.path(), ACCOUNT, &mut CountingRng(0)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = load(&source, dir.path(), ACCOUNT).err().unwrap();
        assert!(
            matches!(&error, KekError::InsecurePermissions { path: p, mode } if *p == path && mode & 0o777 == 0o644),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("mode 644"), "{message}");
        assert!(
            message.contains(&format!("chmod 600 '{}'", path.display())),
            "{message}"
        );
    }

    #[test]
    fn shell_quote_leaves_plain_paths_alone() {
        assert_eq!(
            shell_quote(Path::new("/home/a/.config/k.key")),
            "/home/a/.config/k.key"
        );
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_keyfile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.key");
        create(
            &KeySource::KeyFile(real.clone()),
            dir.path(),
            ACCOUNT,
            &mut CountingRng(0),
        )
        .unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let error = load(&KeySource::KeyFile(link.clone()), dir.path(), ACCOUNT)
            .err()
            .unwrap();
        assert!(
            matches!(&error, KekError::Symlink { path } if *path == link),
            "{error:?}"
        );
    }

    #[test]
    fn directory_at_keyfile_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = load(
            &KeySource::KeyFile(dir.path().to_path_buf()),
            dir.path(),
            ACCOUNT,
        )
        .err()
        .unwrap();
        assert!(matches!(error, KekError::NotAFile { .. }), "{error:?}");
    }

    /// Writes `content` as a private keyfile and loads it.
    fn load_content(content: &[u8]) -> Result<(Kek, KeyLocation), KekError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        fs::write(&path, content).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        load(&KeySource::KeyFile(path), dir.path(), ACCOUNT)
    }

    #[test]
    fn garbage_keyfile_is_malformed() {
        let too_short = hex::encode([7u8; 31]);
        let not_hex = "zz".repeat(KEK_BYTES);
        for content in [
            b"".as_slice(),
            b"hello".as_slice(),
            too_short.as_bytes(),
            not_hex.as_bytes(),
            [0xffu8; 64].as_slice(),
            [b'a'; KEYFILE_BYTES_MAX + 1].as_slice(),
        ] {
            let error = load_content(content).err().unwrap();
            assert!(matches!(error, KekError::Malformed { .. }), "{error:?}");
            assert!(error.to_string().contains("64 hex digits"), "{error}");
        }
    }

    #[test]
    fn malformed_message_never_quotes_the_content() {
        let secretish = format!("{}x", hex::encode([0xabu8; 31]));
        let error = load_content(secretish.as_bytes()).err().unwrap();
        assert!(!error.to_string().contains("abab"), "{error}");
        assert!(!format!("{error:?}").contains("abab"), "{error:?}");
    }

    #[test]
    fn keyfile_tolerates_upper_case_and_crlf() {
        let text = format!("{}\r\n", hex::encode_upper(expected_bytes()));
        let (kek, _) = load_content(text.as_bytes()).unwrap();
        assert_eq!(kek.as_bytes(), &expected_bytes());
    }

    #[test]
    fn missing_keyfile_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.key");
        let error = load(&KeySource::KeyFile(path.clone()), dir.path(), ACCOUNT)
            .err()
            .unwrap();
        match &error {
            KekError::NotFound { looked_in } => {
                assert_eq!(looked_in, &vec![KeyLocation::KeyFile(path.clone())]);
            }
            other => panic!("{other:?}"),
        }
        assert!(error.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn create_over_an_existing_keyfile_is_refused_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let source = KeySource::KeyFile(path.clone());
        create(&source, dir.path(), ACCOUNT, &mut CountingRng(0)).unwrap();
        let before = fs::read(&path).unwrap();
        let error = create(&source, dir.path(), ACCOUNT, &mut CountingRng(100))
            .err()
            .unwrap();
        assert!(
            matches!(&error, KekError::AlreadyExists { location } if *location == KeyLocation::KeyFile(path.clone())),
            "{error:?}"
        );
        assert_eq!(fs::read(&path).unwrap(), before);
        let (kek, _) = load(&source, dir.path(), ACCOUNT).unwrap();
        assert_eq!(kek.as_bytes(), &expected_bytes());
    }

    #[test]
    fn bad_account_cannot_escape_the_key_dir() {
        let dir = tempfile::tempdir().unwrap();
        for account in [
            "",
            "../x",
            "ab/cd",
            "not-hex",
            &"a".repeat(ACCOUNT_HEX_MAX + 1),
        ] {
            let error = create(&KeySource::Auto, dir.path(), account, &mut CountingRng(0))
                .err()
                .unwrap();
            assert!(
                matches!(error, KekError::InvalidAccount { .. }),
                "{error:?}"
            );
        }
    }

    #[test]
    fn auto_uses_the_keychain_when_it_answers() {
        let dir = tempfile::tempdir().unwrap();
        let keychain = mock();
        let (made, at) = create_with(
            &keychain,
            &KeySource::Auto,
            dir.path(),
            ACCOUNT,
            &mut CountingRng(0),
        )
        .unwrap();
        assert_eq!(at, KeyLocation::keychain(ACCOUNT));
        assert_eq!(
            at.to_string(),
            format!("keychain (service persist, account {ACCOUNT})")
        );
        assert!(
            !default_keyfile(dir.path(), ACCOUNT).exists(),
            "no keyfile written"
        );
        let (loaded, at) = load_with(&keychain, &KeySource::Auto, dir.path(), ACCOUNT).unwrap();
        assert_eq!(at, KeyLocation::keychain(ACCOUNT));
        assert_eq!(loaded.as_bytes(), made.as_bytes());
        let (loaded, _) = load_with(&keychain, &KeySource::Keychain, dir.path(), ACCOUNT).unwrap();
        assert_eq!(loaded.as_bytes(), &expected_bytes());

        let error = create_with(
            &keychain,
            &KeySource::Auto,
            dir.path(),
            ACCOUNT,
            &mut CountingRng(9),
        )
        .err()
        .unwrap();
        assert!(matches!(error, KekError::AlreadyExists { .. }), "{error:?}");
        let (loaded, _) = load_with(&keychain, &KeySource::Auto, dir.path(), ACCOUNT).unwrap();
        assert_eq!(loaded.as_bytes(), &expected_bytes(), "old key kept");
    }

    #[test]
    fn auto_create_refuses_to_shadow_an_existing_default_keyfile() {
        let dir = tempfile::tempdir().unwrap();
        create_with(
            &keychain(Backend::Absent),
            &KeySource::Auto,
            dir.path(),
            ACCOUNT,
            &mut CountingRng(0),
        )
        .unwrap();
        let error = create_with(
            &mock(),
            &KeySource::Auto,
            dir.path(),
            ACCOUNT,
            &mut CountingRng(0),
        )
        .err()
        .unwrap();
        assert!(matches!(error, KekError::AlreadyExists { .. }), "{error:?}");
    }

    #[test]
    fn auto_load_falls_back_to_the_keyfile_when_the_keychain_lacks_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (made, _) = create_with(
            &keychain(Backend::Absent),
            &KeySource::Auto,
            dir.path(),
            ACCOUNT,
            &mut CountingRng(0),
        )
        .unwrap();
        let (loaded, at) = load_with(&mock(), &KeySource::Auto, dir.path(), ACCOUNT).unwrap();
        assert_eq!(
            at,
            KeyLocation::KeyFile(default_keyfile(dir.path(), ACCOUNT))
        );
        assert_eq!(loaded.as_bytes(), made.as_bytes());
    }

    #[test]
    fn auto_load_with_no_key_anywhere_names_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let error = load_with(&mock(), &KeySource::Auto, dir.path(), ACCOUNT)
            .err()
            .unwrap();
        match &error {
            KekError::NotFound { looked_in } => assert_eq!(
                looked_in,
                &vec![
                    KeyLocation::keychain(ACCOUNT),
                    KeyLocation::KeyFile(default_keyfile(dir.path(), ACCOUNT)),
                ]
            ),
            other => panic!("{other:?}"),
        }
        let message = error.to_string();
        assert!(message.contains("keychain (service persist"), "{message}");
        assert!(message.contains(&format!("{ACCOUNT}.key")), "{message}");
    }

    #[test]
    fn failing_keychain_read_reports_the_keychain_error_if_no_keyfile() {
        let dir = tempfile::tempdir().unwrap();
        let keychain = mock();
        let entry = Entry::new_in_store(&store_of(&keychain), KEYCHAIN_SERVICE, ACCOUNT).unwrap();
        let cred: &keyring_core::mock::Cred = entry.as_any().downcast_ref().unwrap();
        cred.set_error(keyring_core::Error::NoStorageAccess("locked".into()));
        let error = load_with(&keychain, &KeySource::Auto, dir.path(), ACCOUNT)
            .err()
            .unwrap();
        assert!(matches!(error, KekError::Keychain { .. }), "{error:?}");
        assert!(error.to_string().contains("locked"), "{error}");
    }

    #[test]
    fn malformed_keychain_entry_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let keychain = mock();
        let entry = Entry::new_in_store(&store_of(&keychain), KEYCHAIN_SERVICE, ACCOUNT).unwrap();
        entry.set_secret(b"not a key").unwrap();
        let error = load_with(&keychain, &KeySource::Auto, dir.path(), ACCOUNT)
            .err()
            .unwrap();
        assert!(
            matches!(&error, KekError::Malformed { location, .. } if *location == KeyLocation::keychain(ACCOUNT)),
            "{error:?}"
        );
    }

    #[test]
    fn keychain_source_without_a_keychain_is_no_keychain() {
        let dir = tempfile::tempdir().unwrap();
        let none = keychain(Backend::Absent);
        let error = load_with(&none, &KeySource::Keychain, dir.path(), ACCOUNT)
            .err()
            .unwrap();
        assert!(matches!(error, KekError::NoKeychain { .. }), "{error:?}");
        let error = create_with(
            &none,
            &KeySource::Keychain,
            dir.path(),
            ACCOUNT,
            &mut CountingRng(0),
        )
        .err()
        .unwrap();
        assert!(matches!(error, KekError::NoKeychain { .. }), "{error:?}");
        assert!(!default_keyfile(dir.path(), ACCOUNT).exists());
    }

    #[test]
    fn hanging_keychain_is_bounded_and_auto_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let hangs = keychain(Backend::Hangs);
        let (made, at) = create_with(
            &hangs,
            &KeySource::Auto,
            dir.path(),
            ACCOUNT,
            &mut CountingRng(0),
        )
        .unwrap();
        assert_eq!(
            at,
            KeyLocation::KeyFile(default_keyfile(dir.path(), ACCOUNT))
        );
        let (loaded, _) = load_with(&hangs, &KeySource::Auto, dir.path(), ACCOUNT).unwrap();
        assert_eq!(loaded.as_bytes(), made.as_bytes());
        let error = load_with(&hangs, &KeySource::Keychain, dir.path(), ACCOUNT)
            .err()
            .unwrap();
        assert!(error.to_string().contains("no answer within"), "{error}");
    }

    /// The real OS path on a machine without a session bus (CI, this
    /// container): `Auto` must not wait on D-Bus. Skipped where a session
    /// bus exists, so that it never writes into a developer's keychain.
    #[cfg(target_os = "linux")]
    #[test]
    #[allow(clippy::disallowed_methods, reason = "a test measuring wall time")]
    fn auto_on_headless_linux_falls_back_to_a_keyfile_quickly() {
        if no_session_bus().is_none() {
            eprintln!("skipped: a D-Bus session bus may exist here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now(); // allow-nondeterminism: test timing
        let (made, at) =
            create(&KeySource::Auto, dir.path(), ACCOUNT, &mut CountingRng(0)).unwrap();
        let (loaded, at_loaded) = load(&KeySource::Auto, dir.path(), ACCOUNT).unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
        assert_eq!(
            at,
            KeyLocation::KeyFile(default_keyfile(dir.path(), ACCOUNT))
        );
        assert_eq!(at_loaded, at);
        assert_eq!(loaded.as_bytes(), made.as_bytes());
    }
}
