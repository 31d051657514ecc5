//! Where a store syncs to: the remote kept in `<store dir>/remote.json`,
//! the `persist remote set / show / clear` commands, and the admission
//! secret read for one command.
//!
//! # The file
//!
//! ```json
//! {"url":"quic://relay.example.com:7443","pin":"sha256:<64 hex digits>"}
//! {"url":"quic://relay.example.com:7443","ca":"/etc/persist/relay-ca.pem"}
//! {"url":"quic://relay1:7443","also":["quic://relay2:7443"],"pin":"sha256:<hex>"}
//! ```
//!
//! `also` lists more nodes of the same remote (relay nodes over one
//! PostgreSQL, with one certificate); a device fails over between them.
//!
//! ## Invariants
//! - It names exactly one way to trust the remote: a certificate pin, or a
//!   CA file (an absolute path, so that the file means the same from any
//!   working directory).
//! - It is replaced atomically (a temporary file in the same directory,
//!   synced, then renamed over it), so a reader sees the old remote or the
//!   new one, never a mix.
//! - It never holds the admission secret: that is read from a file for the
//!   one command that needs it (`--admission-secret-file`), and the relay
//!   asks for it only when a store is first created there.
//! - It holds nothing secret at all: the URL and pin only say where the
//!   ciphertext goes and how to recognise the relay.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use persist::Remote;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::commands::Target;
use crate::failure::CliError;
use crate::keys;

/// The remote's file name inside a store directory.
pub(crate) const REMOTE_FILE: &str = "remote.json";

/// Most bytes read from `remote.json`: a URL, a pin and a path.
const REMOTE_FILE_BYTES_MAX: u64 = 64 * 1024;

/// Most bytes read from an admission secret file. The relay accepts a
/// secret of at most 256 bytes; the file may hold a trailing newline or
/// a comment line after it.
const SECRET_FILE_BYTES_MAX: u64 = 4096;

/// A remote as the user gave it, or as `remote.json` holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RemoteSpec {
    /// `quic://HOST:PORT`.
    pub(crate) url: String,
    /// More addresses of the same remote, tried in turn.
    pub(crate) also: Vec<String>,
    /// How the remote's certificate is trusted.
    pub(crate) trust: Trust,
}

/// How a remote's certificate is trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Trust {
    /// Its SHA-256 pin, `sha256:<hex>` (printed by `persist-relay`).
    Pin(String),
    /// A CA whose PEM certificate is in this file.
    Ca(PathBuf),
}

/// `remote.json` as it is stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteFile {
    url: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    also: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,
}

impl RemoteFile {
    fn from_spec(spec: &RemoteSpec) -> RemoteFile {
        let (pin, ca) = match &spec.trust {
            Trust::Pin(pin) => (Some(pin.clone()), None),
            Trust::Ca(ca) => (None, Some(ca.clone())),
        };
        RemoteFile {
            url: spec.url.clone(),
            also: spec.also.clone(),
            pin,
            ca,
        }
    }

    fn into_spec(self) -> Option<RemoteSpec> {
        let trust = match (self.pin, self.ca) {
            (Some(pin), None) => Trust::Pin(pin),
            (None, Some(ca)) if ca.is_absolute() => Trust::Ca(ca),
            _ => return None,
        };
        Some(RemoteSpec {
            url: self.url,
            also: self.also,
            trust,
        })
    }
}

impl RemoteSpec {
    /// The spec given on the command line: `pin` or `ca` (clap makes sure
    /// exactly one is there). A CA path is made absolute.
    pub(crate) fn from_args(
        url: String,
        also: Vec<String>,
        pin: Option<String>,
        ca: Option<PathBuf>,
    ) -> anyhow::Result<RemoteSpec> {
        let trust = match (pin, ca) {
            (Some(pin), None) => Trust::Pin(pin),
            (None, Some(ca)) => {
                Trust::Ca(
                    std::path::absolute(&ca).map_err(|source| CliError::ReadInput {
                        what: "CA certificate",
                        from: ca.display().to_string(),
                        source,
                    })?,
                )
            }
            _ => return Err(CliError::RemoteTrust.into()),
        };
        Ok(RemoteSpec { url, also, trust })
    }

    /// The engine's remote, checked: a bad URL or pin, or a CA file that
    /// cannot be used, is the engine's `RemoteError`.
    pub(crate) fn remote(&self, admission: Option<&AdmissionSecret>) -> anyhow::Result<Remote> {
        let mut remote = match &self.trust {
            Trust::Pin(pin) => Remote::pinned(&self.url, pin)?,
            Trust::Ca(ca) => Remote::with_ca(&self.url, ca)?,
        };
        for url in &self.also {
            remote = remote.or(url)?;
        }
        Ok(match admission {
            // The engine keeps it in memory that is wiped on drop.
            Some(secret) => remote.admission(secret.0.as_str()),
            None => remote,
        })
    }

    /// `url (pin …)` or `url (CA …)`, for messages.
    pub(crate) fn describe(&self) -> String {
        let urls = std::iter::once(&self.url)
            .chain(&self.also)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        match &self.trust {
            Trust::Pin(pin) => format!("{urls} (pin {pin})"),
            Trust::Ca(ca) => format!("{urls} (CA {})", ca.display()),
        }
    }
}

/// An operator's admission secret, read from a file for one command.
pub(crate) struct AdmissionSecret(Zeroizing<String>);

impl AdmissionSecret {
    /// The first line of `path`, without surrounding whitespace (as the
    /// relay reads its own copy).
    pub(crate) fn read(path: &Path) -> anyhow::Result<AdmissionSecret> {
        let bytes = Zeroizing::new(keys::read_capped(
            path,
            SECRET_FILE_BYTES_MAX,
            "admission secret",
        )?);
        let text = std::str::from_utf8(&bytes).map_err(|_| CliError::SecretNotText {
            path: path.to_owned(),
        })?;
        let secret = text.lines().next().unwrap_or_default().trim();
        if secret.is_empty() {
            return Err(CliError::EmptySecret {
                path: path.to_owned(),
            }
            .into());
        }
        Ok(AdmissionSecret(Zeroizing::new(secret.to_owned())))
    }
}

/// The remote configured for the store in `dir`, if any.
pub(crate) fn load(dir: &Path) -> anyhow::Result<Option<RemoteSpec>> {
    let path = dir.join(REMOTE_FILE);
    let bytes = match keys::read_capped(&path, REMOTE_FILE_BYTES_MAX, "remote") {
        Ok(bytes) => bytes,
        Err(error) if is_not_found(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    let file: RemoteFile = serde_json::from_slice(&bytes).map_err(|e| CliError::BadRemoteFile {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    match file.into_spec() {
        Some(spec) => Ok(Some(spec)),
        None => Err(CliError::BadRemoteFile {
            path,
            detail: String::from("it must hold a pin or an absolute CA file path, not both"),
        }
        .into()),
    }
}

/// The remote configured for the store in `dir`; its absence is an error
/// that says how to set one.
pub(crate) fn require(dir: &Path) -> anyhow::Result<RemoteSpec> {
    load(dir)?.ok_or_else(|| {
        CliError::NoRemote {
            dir: dir.to_owned(),
        }
        .into()
    })
}

/// Replaces the store's remote with `spec`, atomically.
pub(crate) fn save(dir: &Path, spec: &RemoteSpec) -> anyhow::Result<()> {
    let path = dir.join(REMOTE_FILE);
    let write_error = |source| CliError::WriteRemote {
        path: path.clone(),
        source,
    };
    let mut text = serde_json::to_string(&RemoteFile::from_spec(spec))
        .map_err(|e| write_error(std::io::Error::other(e)))?;
    text.push('\n');
    // One writer per store directory is the CLI's contract; the process id
    // keeps two racing ones off each other's temporary file all the same.
    let temp = dir.join(format!(".{REMOTE_FILE}.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&temp)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, &path));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(write_error(source).into());
    }
    sync_dir(dir);
    Ok(())
}

/// `persist remote set URL (--pin P | --ca FILE)`.
pub(crate) fn set(target: &Target, spec: &RemoteSpec) -> anyhow::Result<String> {
    target.require_store()?;
    // Checked before anything is written: a bad URL, pin or CA file keeps
    // the remote that was there.
    spec.remote(None)?;
    let previous = load(&target.dir).ok().flatten();
    save(&target.dir, spec)?;
    let mut out = format!("remote set to {}\n", spec.describe());
    if let Some(previous) = previous
        && previous != *spec
    {
        let _ = writeln!(out, "(it was {})", previous.describe());
    }
    Ok(out)
}

/// `persist remote show`.
pub(crate) fn show(target: &Target) -> anyhow::Result<String> {
    target.require_store()?;
    let spec = require(&target.dir)?;
    let mut out = String::new();
    let _ = writeln!(out, "url: {}", spec.url);
    for url in &spec.also {
        let _ = writeln!(out, "also: {url}");
    }
    match &spec.trust {
        Trust::Pin(pin) => {
            let _ = writeln!(out, "pin: {pin}");
        }
        Trust::Ca(ca) => {
            let _ = writeln!(out, "ca:  {}", ca.display());
        }
    }
    Ok(out)
}

/// `persist remote clear`: the store stops syncing. Its records stay; the
/// relay keeps its ciphertext.
pub(crate) fn clear(target: &Target) -> anyhow::Result<String> {
    target.require_store()?;
    let path = target.dir.join(REMOTE_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            sync_dir(&target.dir);
            Ok(String::from("remote cleared; this store no longer syncs\n"))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Ok(String::from("no remote was set\n"))
        }
        Err(source) => Err(CliError::WriteRemote { path, source }.into()),
    }
}

fn is_not_found(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<CliError>(),
        Some(CliError::ReadInput { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
    )
}

/// Makes a rename or removal in `dir` durable. Best effort: the file
/// itself is already synced, and a crash can at worst bring the previous
/// remote back.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(error) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!("cannot sync {}: {error}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_holds_a_url_and_one_trust() {
        let pin = RemoteSpec {
            url: "quic://r:1".into(),
            also: Vec::new(),
            trust: Trust::Pin("sha256:ab".into()),
        };
        let text = serde_json::to_string(&RemoteFile::from_spec(&pin)).unwrap();
        assert_eq!(text, r#"{"url":"quic://r:1","pin":"sha256:ab"}"#);
        let parse = |text: &str| {
            serde_json::from_str::<RemoteFile>(text)
                .ok()
                .and_then(RemoteFile::into_spec)
        };
        assert_eq!(parse(&text), Some(pin));
        let ca = parse(r#"{"url":"quic://r:1","ca":"/ca.pem"}"#).unwrap();
        assert_eq!(ca.trust, Trust::Ca("/ca.pem".into()));
        let nodes = RemoteSpec {
            url: "quic://r1:1".into(),
            also: vec!["quic://r2:1".into(), "quic://r3:1".into()],
            trust: Trust::Pin("sha256:ab".into()),
        };
        let text = serde_json::to_string(&RemoteFile::from_spec(&nodes)).unwrap();
        assert_eq!(
            text,
            r#"{"url":"quic://r1:1","also":["quic://r2:1","quic://r3:1"],"pin":"sha256:ab"}"#
        );
        assert_eq!(parse(&text), Some(nodes));
        for bad in [
            r#"{"url":"quic://r:1"}"#,
            r#"{"url":"quic://r:1","pin":"p","ca":"/c"}"#,
            r#"{"url":"quic://r:1","ca":"relative.pem"}"#,
            r#"{"url":"quic://r:1","pin":"p","secret":"s"}"#,
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn save_replaces_and_load_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let first = RemoteSpec {
            url: "quic://a:1".into(),
            also: Vec::new(),
            trust: Trust::Pin("sha256:aa".into()),
        };
        save(dir.path(), &first).unwrap();
        let second = RemoteSpec {
            url: "quic://b:2".into(),
            also: vec!["quic://c:3".into()],
            trust: Trust::Ca("/ca.pem".into()),
        };
        save(dir.path(), &second).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(second));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [REMOTE_FILE], "no temporary file is left");
    }

    #[test]
    fn a_damaged_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(REMOTE_FILE), "{not json").unwrap();
        let error = load(dir.path()).unwrap_err();
        assert!(error.to_string().contains(REMOTE_FILE), "{error}");
    }

    #[test]
    fn the_secret_is_the_first_line_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "  s3cret \nsecond line\n").unwrap();
        assert_eq!(AdmissionSecret::read(&file).unwrap().0.as_str(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(AdmissionSecret::read(&file).is_err());
    }
}
