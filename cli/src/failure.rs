//! How a failed command is reported: its message with every cause, and its
//! exit code.
//!
//! The exit code is chosen from the first error in the chain that says
//! what went wrong: the CLI's own [`CliError`], or one of the engine's
//! typed errors. Anything unrecognised is [`Exit::Unexpected`].

use std::path::PathBuf;

use persist::{
    InviteError, JoinError, KekError, KeyError, OpenError, PairingError, PathError, ReadError,
    RemoteError, ServeError, SyncError, WriteError,
};

/// The process exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Exit {
    /// Success.
    Ok = 0,
    /// Something failed that the user's input did not cause.
    Unexpected = 1,
    /// Bad arguments or input: JSON, path, store directory, device key.
    Usage = 2,
    /// Nothing at the path asked for.
    NotFound = 3,
    /// The remote could not be reached, or refused this store or device;
    /// or the other device of a pairing did not answer in time.
    Remote = 4,
}

/// Failures found by the CLI itself.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// A command other than `init` was pointed at a directory with no store.
    #[error("no store at {dir}: run `persist init --store {dir}`", dir = .dir.display())]
    NoStore {
        /// The store directory given.
        dir: PathBuf,
    },
    /// `init` was pointed at a directory that already holds a store.
    #[error(
        "a store already exists at {dir} ({file} is there): use it, or pass another --store directory",
        dir = .dir.display(),
        file = persist::DB_FILE
    )]
    StoreExists {
        /// The store directory given.
        dir: PathBuf,
    },
    /// The store path names something that is not a directory.
    #[error("{} is not a directory: pass a directory to --store", .dir.display())]
    NotADirectory {
        /// The store path given.
        dir: PathBuf,
    },
    /// The value given to `put` is not JSON.
    #[error("the value for {path:?} is not valid JSON (a string needs its quotes: '\"text\"')")]
    BadJson {
        /// The path being written.
        path: String,
        /// The parser's message.
        source: serde_json::Error,
    },
    /// The JSON on stdin is longer than any storable value could be.
    #[error("the value on stdin is longer than {max} bytes, more than a record can hold")]
    InputTooLarge {
        /// The most bytes read.
        max: u64,
    },
    /// `get` or `rm` found nothing at the path.
    #[error("no record at {path:?}")]
    NotFound {
        /// The path asked for.
        path: String,
    },
    /// `key export --out` was given a file that exists.
    #[error("{} already exists; it is left as it is: pass another --out file", .path.display())]
    OutputExists {
        /// The file given.
        path: PathBuf,
    },
    /// A file (or stdin) given as input could not be read.
    #[error("cannot read the {what} from {from}")]
    ReadInput {
        /// What was to be read: "key export", "passphrase".
        what: &'static str,
        /// The file, or "stdin".
        from: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An input file is far larger than what it should hold.
    #[error("{} is larger than {max} bytes: it is not a {what} file", .path.display())]
    InputFileTooLarge {
        /// What it should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The most bytes read.
        max: u64,
    },
    /// The passphrase is not UTF-8 text.
    #[error("the passphrase in {from} is not UTF-8 text")]
    PassphraseNotText {
        /// Where it was read from.
        from: String,
    },
    /// The passphrase line on stdin is too long to be one.
    #[error("the passphrase on stdin is longer than {max} bytes")]
    PassphraseTooLong {
        /// The most bytes read.
        max: u64,
    },
    /// An empty passphrase was given.
    #[error("the passphrase from {from} is empty")]
    EmptyPassphrase {
        /// Where it was read from: a file, or "stdin".
        from: String,
    },
    /// The key export could not be written to its file.
    #[error("cannot write the key export to {}", .path.display())]
    WriteOutput {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key export could not be written to stdout.
    #[error("cannot write the key export to stdout; no passphrase was shown")]
    WriteStdout {
        /// The cause.
        source: std::io::Error,
    },
    /// The generated passphrase could not be shown: the export is useless.
    #[error("cannot show the generated passphrase on stderr; export again")]
    ShowPassphrase {
        /// The cause.
        source: std::io::Error,
    },
    /// A command that syncs found no remote configured for the store.
    #[error(
        "no remote for the store at {dir}: use `persist remote set quic://HOST:PORT --pin sha256:…` \
         (or --ca FILE)",
        dir = .dir.display()
    )]
    NoRemote {
        /// The store directory.
        dir: PathBuf,
    },
    /// The sync session could not connect: the engine's own message
    /// ("cannot reach …", "… refused the connection …").
    #[error("{message}")]
    SyncFailed {
        /// What the session reported.
        message: String,
    },
    /// Neither or both of --pin and --ca were given.
    #[error(
        "give the remote's certificate pin (--pin sha256:…) or its CA (--ca FILE), one of them"
    )]
    RemoteTrust,
    /// The store's `remote.json` cannot be read as a remote.
    #[error(
        "{} is damaged ({detail}): set the remote again with `persist remote set`, \
         or remove it with `persist remote clear`",
        .path.display()
    )]
    BadRemoteFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The store's `remote.json` could not be written or removed.
    #[error("cannot update {}", .path.display())]
    WriteRemote {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The admission secret file is not text.
    #[error("the admission secret file {} is not UTF-8 text", .path.display())]
    SecretNotText {
        /// The file.
        path: PathBuf,
    },
    /// The admission secret file's first line is empty.
    #[error("the admission secret file {} is empty: put the secret on its first line", .path.display())]
    EmptySecret {
        /// The file.
        path: PathBuf,
    },
    /// `key rotate --wait` ended with records it could not re-encrypt.
    #[error(
        "rotated to epoch {epoch}, but {remaining} records could not be re-encrypted \
         (they are damaged: see the warnings above); epochs {epochs} keep their keys"
    )]
    RotationIncomplete {
        /// The new epoch.
        epoch: u32,
        /// Records still under older epochs.
        remaining: u64,
        /// The old epochs that still seal records.
        epochs: String,
    },
    /// `invite create` waited until its invite expired, and no device
    /// joined with it.
    #[error(
        "the invite expired at {expired} and no device joined with it: make a new one \
         (`persist invite create`)"
    )]
    InviteUnused {
        /// When it expired, as shown to the user.
        expired: String,
    },
    /// `invite accept` got a code whose relay is trusted through a CA,
    /// which a code does not carry.
    #[error(
        "the invite's relay {relay} is trusted through a CA, not a pin: give its CA \
         certificate with --ca FILE"
    )]
    InviteNeedsCa {
        /// The code's relay.
        relay: String,
    },
    /// `key purge-retired` found records still sealed under retired epochs.
    #[error(
        "epochs {epochs} are retired but still seal {records} records; nothing was purged, \
         since those records would become unreadable"
    )]
    RetiredKeysInUse {
        /// Records under retired epochs.
        records: u64,
        /// The retired epochs that seal them.
        epochs: String,
    },
}

/// The exit code for `error`.
pub(crate) fn exit_code(error: &anyhow::Error) -> Exit {
    error.chain().find_map(classify).unwrap_or(Exit::Unexpected)
}

/// `error: <message>`, then one `  caused by: <cause>` line per cause that
/// its parent's message does not already include.
pub(crate) fn render(error: &anyhow::Error) -> String {
    let mut chain = error.chain();
    let Some(top) = chain.next() else {
        return String::from("error: unknown error");
    };
    let mut parent = top.to_string();
    let mut out = format!("error: {parent}");
    for cause in chain {
        let text = cause.to_string();
        // Many errors embed their source's text in their own message (and
        // `#[error(transparent)]` ones forward it): say each thing once.
        if !parent.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text);
        }
        parent = text;
    }
    out
}

/// The exit code this error decides, if it is one that decides.
fn classify(error: &(dyn std::error::Error + 'static)) -> Option<Exit> {
    if let Some(e) = error.downcast_ref::<CliError>() {
        return Some(match e {
            CliError::NotFound { .. } => Exit::NotFound,
            CliError::SyncFailed { .. } | CliError::InviteUnused { .. } => Exit::Remote,
            CliError::NoStore { .. }
            | CliError::StoreExists { .. }
            | CliError::NotADirectory { .. }
            | CliError::BadJson { .. }
            | CliError::InputTooLarge { .. }
            | CliError::OutputExists { .. }
            | CliError::ReadInput { .. }
            | CliError::InputFileTooLarge { .. }
            | CliError::PassphraseNotText { .. }
            | CliError::PassphraseTooLong { .. }
            | CliError::EmptyPassphrase { .. }
            | CliError::NoRemote { .. }
            | CliError::RemoteTrust
            | CliError::BadRemoteFile { .. }
            | CliError::SecretNotText { .. }
            | CliError::EmptySecret { .. }
            | CliError::InviteNeedsCa { .. } => Exit::Usage,
            CliError::WriteOutput { .. }
            | CliError::WriteStdout { .. }
            | CliError::ShowPassphrase { .. }
            | CliError::WriteRemote { .. }
            | CliError::RotationIncomplete { .. }
            | CliError::RetiredKeysInUse { .. } => Exit::Unexpected,
        });
    }
    if let Some(e) = error.downcast_ref::<persist::Error>() {
        return Some(match e {
            persist::Error::Open(e) => open_exit(e),
            persist::Error::Write(e) => write_exit(e),
            persist::Error::Read(e) => read_exit(e),
            persist::Error::Key(e) => key_op_exit(e),
            persist::Error::Sync(e) => sync_exit(e),
            _ => Exit::Unexpected,
        });
    }
    if let Some(e) = error.downcast_ref::<OpenError>() {
        return Some(open_exit(e));
    }
    if let Some(e) = error.downcast_ref::<WriteError>() {
        return Some(write_exit(e));
    }
    if let Some(e) = error.downcast_ref::<ReadError>() {
        return Some(read_exit(e));
    }
    if let Some(e) = error.downcast_ref::<KeyError>() {
        return Some(key_op_exit(e));
    }
    if let Some(e) = error.downcast_ref::<KekError>() {
        return Some(key_exit(e));
    }
    if let Some(e) = error.downcast_ref::<SyncError>() {
        return Some(sync_exit(e));
    }
    if let Some(e) = error.downcast_ref::<ServeError>() {
        return Some(serve_exit(e));
    }
    if let Some(e) = error.downcast_ref::<JoinError>() {
        return Some(join_exit(e));
    }
    if error.downcast_ref::<InviteError>().is_some() {
        return Some(Exit::Usage);
    }
    if error.downcast_ref::<PathError>().is_some() || error.downcast_ref::<RemoteError>().is_some()
    {
        return Some(Exit::Usage);
    }
    None
}

/// A remote that cannot be reached or says no is its own code, so that a
/// script can retry later; a store opened without a remote is bad usage.
fn sync_exit(error: &SyncError) -> Exit {
    match error {
        SyncError::Unreachable { .. } | SyncError::Refused { .. } => Exit::Remote,
        SyncError::NotConfigured => Exit::Usage,
        _ => Exit::Unexpected,
    }
}

/// An address that cannot be served on (taken, not local) is the user's
/// to change.
fn serve_exit(error: &ServeError) -> Exit {
    match error {
        ServeError::Start { .. } | ServeError::NotEncrypted => Exit::Usage,
        _ => Exit::Unexpected,
    }
}

fn open_exit(error: &OpenError) -> Exit {
    match error {
        OpenError::WrongKey { .. }
        | OpenError::EncryptionMismatch { .. }
        // A wrong passphrase, a damaged export, or one of another store.
        | OpenError::Import(_)
        | OpenError::ImportForOtherStore { .. }
        | OpenError::ReadOnly(_)
        | OpenError::NoStore { .. }
        | OpenError::SyncNeedsEncryption
        // A code that is damaged, expired, edited, for a directory that
        // already holds a store, or for another relay than the one given.
        | OpenError::Invite(_)
        | OpenError::InviteIntoExistingStore { .. }
        | OpenError::ResumeThroughOtherRelay { .. }
        | OpenError::InviteForOtherRelay { .. }
        | OpenError::InviteNeedsTrust { .. } => Exit::Usage,
        OpenError::Join(e) => join_exit(e),
        OpenError::Key(e) => key_exit(e),
        _ => Exit::Unexpected,
    }
}

/// A code the inviter turns away (used, expired) or that does not match
/// it (edited) will never work: bad input. An inviter that does not answer
/// in time or stops, or a relay that cannot be reached or refuses, may
/// work later: the remote's code, like `sync`'s.
fn join_exit(error: &JoinError) -> Exit {
    match error {
        JoinError::Pairing(PairingError::Refused(_) | PairingError::Handshake(_)) => Exit::Usage,
        JoinError::Pairing(PairingError::Aborted(_))
        | JoinError::TimedOut { .. }
        | JoinError::Refused { .. } => Exit::Remote,
        _ => Exit::Unexpected,
    }
}

/// A key operation refused for what the store is (read-only, without
/// keys, or without a relay for an invite) is bad input; a store that
/// closed under it is not.
fn key_op_exit(error: &KeyError) -> Exit {
    match error {
        KeyError::ReadOnly
        | KeyError::NotEncrypted
        | KeyError::NoRelay
        | KeyError::InviteLifetime { .. }
        | KeyError::CannotRevoke(_) => Exit::Usage,
        _ => Exit::Unexpected,
    }
}

/// A key the user pointed at, or left in a state Persist refuses, is bad
/// input; a keychain or filesystem that fails is not.
fn key_exit(error: &KekError) -> Exit {
    match error {
        KekError::Keychain { .. } | KekError::Io { .. } => Exit::Unexpected,
        _ => Exit::Usage,
    }
}

fn write_exit(error: &WriteError) -> Exit {
    match error {
        WriteError::InvalidPath(_) | WriteError::Encode { .. } | WriteError::TooLarge { .. } => {
            Exit::Usage
        }
        _ => Exit::Unexpected,
    }
}

fn read_exit(error: &ReadError) -> Exit {
    match error {
        ReadError::InvalidPath(_) => Exit::Usage,
        _ => Exit::Unexpected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::other("disk on fire");
        let error = anyhow::Error::new(OpenError::Directory {
            path: PathBuf::from("/s"),
            source: io,
        })
        .context("cannot open");
        assert_eq!(
            render(&error),
            "error: cannot open\n  caused by: cannot use store directory /s: disk on fire"
        );
        assert_eq!(exit_code(&error), Exit::Unexpected);
    }

    #[test]
    fn bad_json_shows_the_parser_message_and_is_usage() {
        let source = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let error = anyhow::Error::new(CliError::BadJson {
            path: "a".into(),
            source,
        });
        let text = render(&error);
        assert!(
            text.starts_with("error: the value for \"a\" is not valid JSON"),
            "{text}"
        );
        assert!(text.contains("caused by: EOF while parsing"), "{text}");
        assert_eq!(exit_code(&error), Exit::Usage);
    }

    #[test]
    fn engine_errors_map_to_their_codes() {
        let path = anyhow::Error::new(ReadError::InvalidPath(PathError::Empty));
        assert_eq!(exit_code(&path), Exit::Usage);
        let closed = anyhow::Error::new(WriteError::Closed);
        assert_eq!(exit_code(&closed), Exit::Unexpected);
        let wrong = anyhow::Error::new(OpenError::WrongKey {
            path: "/s".into(),
            location: "keyfile /k".into(),
        });
        assert_eq!(exit_code(&wrong), Exit::Usage);
        let missing = anyhow::Error::new(OpenError::Key(KekError::NotFound { looked_in: vec![] }));
        assert_eq!(exit_code(&missing), Exit::Usage);
        let not_found = anyhow::Error::new(CliError::NotFound { path: "p".into() });
        assert_eq!(exit_code(&not_found), Exit::NotFound);
    }

    #[test]
    fn key_and_import_errors_map_to_their_codes() {
        for (error, code) in [
            (persist::Error::Key(KeyError::ReadOnly), Exit::Usage),
            (persist::Error::Key(KeyError::NotEncrypted), Exit::Usage),
            (persist::Error::Key(KeyError::Closed), Exit::Unexpected),
            (
                persist::Error::Open(OpenError::Import(persist::ExportError::WrongPassphrase)),
                Exit::Usage,
            ),
            (
                persist::Error::Open(OpenError::ReadOnly("no".into())),
                Exit::Usage,
            ),
            (
                persist::Error::Open(OpenError::NoStore { path: "/s".into() }),
                Exit::Usage,
            ),
        ] {
            let text = error.to_string();
            assert_eq!(exit_code(&anyhow::Error::new(error)), code, "{text}");
        }
        let damaged = anyhow::Error::new(OpenError::Import(persist::ExportError::Damaged));
        assert_eq!(exit_code(&damaged), Exit::Usage);
        let text = render(&damaged);
        assert!(text.contains("damaged"), "{text}");
        assert!(!text.contains("caused by"), "said once: {text}");
        let purge = anyhow::Error::new(KeyError::Failed("disk".into()));
        assert_eq!(exit_code(&purge), Exit::Unexpected);
    }

    #[test]
    fn pairing_errors_map_to_their_codes() {
        use persist::Refusal;
        let relay = || String::from("quic://relay:7443");
        for (error, code) in [
            (OpenError::Invite(InviteError::Damaged), Exit::Usage),
            (
                OpenError::Invite(InviteError::Expired { ago_minutes: 3 }),
                Exit::Usage,
            ),
            (
                OpenError::Join(JoinError::Pairing(PairingError::Refused(Refusal::Used))),
                Exit::Usage,
            ),
            (
                OpenError::Join(JoinError::Pairing(PairingError::Handshake("psk"))),
                Exit::Usage,
            ),
            (
                OpenError::InviteForOtherRelay {
                    invite: relay(),
                    configured: String::from("quic://other:1"),
                },
                Exit::Usage,
            ),
            (
                OpenError::Join(JoinError::TimedOut {
                    waited_secs: 600,
                    relay: relay(),
                    last_error: None,
                }),
                Exit::Remote,
            ),
            (
                OpenError::Join(JoinError::Refused {
                    relay: relay(),
                    text: String::from("no"),
                }),
                Exit::Remote,
            ),
            (
                OpenError::Join(JoinError::Pairing(PairingError::Aborted("closing".into()))),
                Exit::Remote,
            ),
            (
                OpenError::Join(JoinError::Pairing(PairingError::Keys("bad".into()))),
                Exit::Unexpected,
            ),
        ] {
            let text = error.to_string();
            assert_eq!(exit_code(&anyhow::Error::new(error)), code, "{text}");
        }
        let decoded = anyhow::Error::new(InviteError::NotAnInvite);
        assert_eq!(exit_code(&decoded), Exit::Usage);
        let no_relay = anyhow::Error::new(KeyError::NoRelay);
        assert_eq!(exit_code(&no_relay), Exit::Usage);
        let unused = anyhow::Error::new(CliError::InviteUnused {
            expired: "2025-01-01T00:00:00Z".into(),
        });
        assert_eq!(exit_code(&unused), Exit::Remote);
    }
}
