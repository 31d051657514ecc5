//! `persist`: drive a Persist store from a shell.
//!
//! Every command names its store with `--store DIR` (or `PERSIST_STORE`)
//! and, optionally, the device keyfile with `--key-file PATH` (or
//! `PERSIST_KEY_FILE`; without it the key lives in the OS keychain, or in a
//! keyfile under `$XDG_CONFIG_HOME/persist/keys` where there is none).
//!
//! ```text
//! persist init --store ./s                   # create the store, print its ids
//! persist put  --store ./s notes/1 '{"text":"buy milk"}'
//! persist put  --store ./s notes/2 - < value.json
//! persist get  --store ./s notes/1           # {"text":"buy milk"}
//! persist ls   --store ./s notes/            # notes/1<TAB>{"text":"buy milk"}
//! persist rm   --store ./s notes/1
//! persist status --store ./s --json
//!
//! persist key export --store ./s --out s.key # prints the passphrase once
//! persist init --store ./t --key-file t.key --import s.key   # asks for it
//! persist key rotate --store ./s --wait      # new data key, re-encrypt all
//! persist key purge-retired --store ./s      # delete keys no record uses
//!
//! persist init --store ./s --relay quic://relay:7443 --pin sha256:…
//! persist remote set --store ./s quic://relay:7443 --pin sha256:…
//! persist sync --store ./s                   # pushed 2, pulled 0, held 0, refused 0
//! persist sync --store ./s --watch           # then PATH<TAB>JSON per remote change
//! persist serve --store ./s --listen 0.0.0.0:7443  # others sync with this device
//!
//! persist invite create --store ./s          # prints a one-time code, waits for the device
//! persist invite accept --store ./t --key-file t.key CODE   # on the new device
//! persist device list --store ./s            # ID<TAB>NAME<TAB>added by ID at TIME
//! persist device revoke --store ./s ID       # a new epoch ID never gets
//! ```
//!
//! Only `sync`, `status` (when a remote is set), `serve` and the `invite`
//! commands connect to the remote; the other commands stay local, and
//! their writes are pushed by the next `persist sync` (see [`sync`] for
//! why).
//!
//! Output is made for scripts: values are compact JSON, one per line, on
//! stdout; errors (`error: ...` and their causes) and logs (`warn` and
//! above unless `RUST_LOG` says otherwise) go to stderr.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | unexpected error (storage, damaged store, keychain...) |
//! | 2 | usage or bad input: bad arguments or JSON, invalid path, no store (or one already there for `init` and `invite accept`), wrong or unusable device key, wrong passphrase or damaged key export, an output file that exists, a bad remote URL, pin or CA file, no remote set (`sync`, `invite create`), an invite code that is damaged, edited, expired, already used or for another relay |
//! | 3 | `get` / `rm`: nothing at that path |
//! | 4 | `sync` (and `init` with an admission secret, and `invite accept`): the remote could not be reached or refused; `invite accept`: the inviting device did not answer in time; `invite create`: no device joined before the invite expired |
//!
//! # Layout
//!
//! This file holds the command line (clap) and the process edges: logging,
//! the runtime, printing and the exit code. [`commands`] runs one command
//! against a store and returns what to print; [`keys`] holds the key
//! commands (`key export`, `key rotate`, `key purge-retired`) and reads
//! passphrases; [`remote`] keeps the store's remote (`remote.json`, the
//! `remote` commands); [`sync`] holds the commands that talk to it;
//! [`pairing`] adds devices with invites and lists them; [`failure`]
//! turns an error into its message and exit code; [`json`] shows stored
//! values as JSON.

mod commands;
mod failure;
mod json;
mod keys;
mod pairing;
mod remote;
mod sync;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::commands::{InitRemote, Target};
use crate::failure::Exit;
use crate::pairing::{AfterCreate, Qr};
use crate::remote::RemoteSpec;

/// Drive a Persist store (end-to-end-encrypted, local-first) from a shell.
#[derive(Debug, Parser)]
#[command(name = "persist", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a store and its device key; prints the store id, the device id
    /// and where the key lives.
    ///
    /// With --import, opens the store with the keys of a key export (from
    /// `persist key export` on another device) instead: on an empty
    /// directory this device joins the store (its records arrive by sync);
    /// on a directory holding a copy of the store's persist.redb, the copy
    /// is re-keyed for this device.
    ///
    /// With --relay, the store syncs with that relay (or serving device):
    /// it is kept in the store directory, and `persist sync` uses it.
    Init {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        remote: InitRemoteArgs,
        /// This device's name, shown to other members.
        #[arg(long, value_name = "N", default_value = "device")]
        name: String,
        /// A key export file to open the store with.
        #[arg(long, value_name = "FILE")]
        import: Option<PathBuf>,
        /// Read the export's passphrase from this file (its content, less
        /// one trailing newline); without it, one line is read from stdin.
        #[arg(long, value_name = "F", requires = "import")]
        passphrase_file: Option<PathBuf>,
    },
    /// Set PATH to a JSON value.
    Put {
        #[command(flatten)]
        target: TargetArgs,
        /// The record path.
        path: String,
        /// The value, as JSON text (a string needs its quotes: '"text"'),
        /// or `-` to read it from stdin.
        #[arg(allow_hyphen_values = true)]
        json: String,
    },
    /// Print the value at PATH as one line of JSON (exit 3 if there is none).
    Get {
        #[command(flatten)]
        target: TargetArgs,
        /// The record path.
        path: String,
    },
    /// Delete PATH (exit 3 if there is nothing there).
    Rm {
        #[command(flatten)]
        target: TargetArgs,
        /// The record path.
        path: String,
    },
    /// List records as `PATH<TAB>JSON` lines, sorted by path.
    Ls {
        #[command(flatten)]
        target: TargetArgs,
        /// Only paths that start with this.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Show the store's ids, record counts, key epochs and key location.
    ///
    /// With a remote set, also where sync stands: the store is opened with
    /// sync, and the session is given up to 2 s to connect first.
    Status {
        #[command(flatten)]
        target: TargetArgs,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export, rotate and purge the store's keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Set, show or clear the relay (or serving device) the store syncs with.
    Remote {
        #[command(subcommand)]
        command: RemoteCommand,
    },
    /// Push this device's changes to the remote and pull the others',
    /// once; prints `pushed N, pulled M, held H, refused R`.
    ///
    /// Exits 4 if the remote cannot be reached or refuses; nothing is lost
    /// then, and the next sync resumes where this one stopped.
    Sync {
        #[command(flatten)]
        target: TargetArgs,
        /// Then keep syncing, printing each change from the remote as
        /// `PATH<TAB>JSON` (or `PATH<TAB>(deleted)`), until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// The relay operator's admission secret (the file's first line),
        /// which a relay may ask for when a store first syncs to it. It is
        /// never stored.
        #[arg(long, value_name = "F")]
        admission_secret_file: Option<PathBuf>,
        /// Print the summary (and, with --watch, each change) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the store to its other devices, so that they sync with this
    /// one directly, without a relay; runs until Ctrl-C or SIGTERM.
    ///
    /// Prints one line, `persist serve listening on ADDR pin sha256:…`:
    /// another device syncs with this one after
    /// `persist remote set quic://ADDR --pin sha256:…`. Only devices of
    /// this store get in. The pin stays the same from one run to the next
    /// (the serving identity is kept in the store directory).
    Serve {
        #[command(flatten)]
        target: TargetArgs,
        /// The UDP address to serve QUIC on: 127.0.0.1:PORT for this
        /// machine only, 0.0.0.0:PORT for the local network; port 0 picks
        /// a free one.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
    },
    /// Add a device to the store with a one-time invite: `invite create`
    /// on a device of the store, `invite accept CODE` on the new one.
    Invite {
        #[command(subcommand)]
        command: InviteCommand,
    },
    /// List the store's devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
}

#[derive(Debug, Subcommand)]
enum InviteCommand {
    /// Make a one-time invite for a new device; prints its code on stdout.
    ///
    /// The store needs a remote (the invite travels through it). The code
    /// is a secret: whoever has it can join the store until it is used or
    /// expires. On a terminal, stderr also shows it as a QR code.
    ///
    /// Then waits, with the store open, until the new device has joined
    /// (`device ID joined` on stderr). Ctrl-C stops the wait, not the
    /// invite: any later `persist sync --watch` or `persist serve` on this
    /// device answers it while it is valid. Exits 4 if the invite expires
    /// unused meanwhile.
    Create {
        #[command(flatten)]
        target: TargetArgs,
        /// How long the invite stays valid: a number and s, m, h or d
        /// (30m, 24h, 7d), at most 30d.
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "24h",
            value_parser = pairing::parse_expiry
        )]
        expires: Duration,
        /// Return once the code is printed instead of waiting for the new
        /// device; a later `persist sync --watch` or `persist serve`
        /// answers it.
        #[arg(long)]
        no_wait: bool,
        /// Print {"code","id","expires_ms"} instead of the bare code.
        #[arg(long)]
        json: bool,
        /// Show the QR code on stderr even when it is not a terminal.
        #[arg(long, conflicts_with = "no_qr")]
        qr: bool,
        /// Never show the QR code.
        #[arg(long)]
        no_qr: bool,
        /// The relay operator's admission secret (the file's first line),
        /// for a relay that admits only its operator's devices: the invite
        /// travels through a store of its own there, which needs it. It is
        /// never stored.
        #[arg(long, value_name = "F")]
        admission_secret_file: Option<PathBuf>,
    },
    /// Join a store with an invite code, from an empty --store directory;
    /// prints the store id, the device id and where the key lives.
    ///
    /// The inviting device must be online with sync (waiting in `persist
    /// invite create`, or running `persist sync --watch` or `persist
    /// serve`). The code names the relay and its pin, which become this
    /// store's remote. Exits 2 for a code that is damaged, edited, expired
    /// or already used, and 4 if the relay cannot be reached or the
    /// inviter does not answer in time; nothing is written then.
    Accept {
        #[command(flatten)]
        target: TargetArgs,
        /// This device's name, shown to other members.
        #[arg(long, value_name = "N", default_value = "device")]
        name: String,
        /// How long to wait for the inviting device: a number and s, m, h
        /// or d (30s, 10m, 2h).
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "10m",
            value_parser = pairing::parse_timeout
        )]
        timeout: Duration,
        /// Trust the relay's certificate if a CA in this PEM file signed
        /// it, for an invite whose relay has an operator's certificate
        /// (such codes carry no pin).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// The invite code (persist-invite-v1:…), or `-` to read it from
        /// stdin, which keeps it out of the process list and the shell
        /// history.
        #[arg(value_name = "CODE", allow_hyphen_values = true)]
        code: String,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// One line per device of the store, oldest first:
    /// `ID<TAB>NAME<TAB>added by ID at TIME`, and `<TAB>(this device)` on
    /// this device's line. Times are UTC (RFC 3339).
    List {
        #[command(flatten)]
        target: TargetArgs,
        /// Print a JSON array of {"id","name","added_by","added_at_ms",
        /// "added_at","this_device","revoked"}.
        #[arg(long)]
        json: bool,
    },
    /// Revoke device ID (from `device list`): start a new key epoch that it
    /// never receives and re-encrypt every record under it, as `key rotate`
    /// does. It can read nothing written afterwards, and the other members
    /// refuse what it writes afterwards. They get the new key, and learn of
    /// the revocation, the next time this store syncs. Once they all hold
    /// it, this device switches the relay to a new access token and the
    /// relay refuses the revoked device. Final.
    Revoke {
        #[command(flatten)]
        target: TargetArgs,
        /// The device id (32 hex digits).
        #[arg(value_name = "ID")]
        id: persist::DeviceId,
        /// Re-encrypt every record now, with a progress bar; then, with a
        /// remote, sync and switch the relay to the new access token if
        /// no other member must take the new key first.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RemoteCommand {
    /// Sync with the relay (or serving device) at URL from now on.
    Set {
        #[command(flatten)]
        target: TargetArgs,
        /// quic://HOST:PORT
        #[arg(value_name = "URL")]
        url: String,
        /// Another node of the same remote (relay nodes over one
        /// PostgreSQL, with one certificate), tried when URL cannot be
        /// reached; may be repeated.
        #[arg(long, value_name = "URL")]
        also: Vec<String>,
        /// The SHA-256 pin of its certificate, as `persist-relay` prints it
        /// when it starts: sha256:<64 hex digits>.
        #[arg(
            long,
            value_name = "PIN",
            required_unless_present = "ca",
            conflicts_with = "ca"
        )]
        pin: Option<String>,
        /// Trust its certificate if a CA in this PEM file signed it (for a
        /// relay with an operator's certificate), instead of a pin.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Print the remote: its URL, and its pin or CA file.
    Show {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Stop syncing: forget the remote (records stay, here and there).
    Clear {
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// The remote of `persist init`.
#[derive(Debug, Args)]
struct InitRemoteArgs {
    /// Sync with the relay (or serving device) at this URL,
    /// quic://HOST:PORT; kept in the store directory (remote.json).
    #[arg(long, value_name = "URL", requires = "trust")]
    relay: Option<String>,
    /// Another node of the same relay (relay nodes over one PostgreSQL,
    /// with one certificate), tried when --relay cannot be reached; may be
    /// repeated.
    #[arg(long, value_name = "URL", requires = "relay")]
    also: Vec<String>,
    /// The SHA-256 pin of the relay's certificate, as `persist-relay`
    /// prints it when it starts: sha256:<64 hex digits>.
    #[arg(long, value_name = "PIN", group = "trust", requires = "relay")]
    pin: Option<String>,
    /// Trust the relay's certificate if a CA in this PEM file signed it,
    /// instead of a pin.
    #[arg(long, value_name = "FILE", group = "trust", requires = "relay")]
    ca: Option<PathBuf>,
    /// The relay operator's admission secret (the file's first line): with
    /// it, init syncs once, which creates the store on the relay. It is
    /// never stored.
    #[arg(long, value_name = "F", requires = "relay")]
    admission_secret_file: Option<PathBuf>,
}

impl InitRemoteArgs {
    fn into_remote(self) -> anyhow::Result<Option<InitRemote>> {
        let Some(url) = self.relay else {
            return Ok(None);
        };
        Ok(Some(InitRemote {
            spec: RemoteSpec::from_args(url, self.also, self.pin, self.ca)?,
            admission_file: self.admission_secret_file,
        }))
    }
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Export the store's keys, wrapped under a passphrase, for another
    /// device (`persist init --import`) or a backup.
    ///
    /// Without --passphrase-file, Persist generates the passphrase and
    /// prints it once, on stderr: write it down, it is stored nowhere.
    Export {
        #[command(flatten)]
        target: TargetArgs,
        /// Write the export to FILE (created with mode 0600; an existing
        /// file is never overwritten) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Wrap the export under the passphrase in this file (its content,
        /// less one trailing newline) instead of a generated one.
        #[arg(long, value_name = "F")]
        passphrase_file: Option<PathBuf>,
    },
    /// Start a new key epoch: new writes use a new data key, and every
    /// record is re-encrypted under it in the background.
    ///
    /// The rotation is durable: without --wait, the re-encryption goes on
    /// the next time the store is opened read-write (by `put`, `rm` or a
    /// `key` command), until no record is left under an old epoch.
    Rotate {
        #[command(flatten)]
        target: TargetArgs,
        /// Re-encrypt every record now, with a progress bar, and retire the
        /// old epochs before exiting.
        #[arg(long)]
        wait: bool,
    },
    /// Delete the keys of retired epochs (those no record uses any more).
    PurgeRetired {
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// Which store, and where its device key is.
#[derive(Debug, Args)]
struct TargetArgs {
    /// The store directory.
    #[arg(long = "store", env = "PERSIST_STORE", value_name = "DIR")]
    dir: PathBuf,
    /// The device keyfile (default: the OS keychain, or a keyfile in
    /// $XDG_CONFIG_HOME/persist/keys where there is no keychain).
    #[arg(long, env = "PERSIST_KEY_FILE", value_name = "PATH")]
    key_file: Option<PathBuf>,
}

impl From<TargetArgs> for Target {
    fn from(args: TargetArgs) -> Self {
        Target {
            dir: args.dir,
            key_file: args.key_file,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    // Bad arguments exit 2 with clap's message; --help and --version exit 0.
    let cli = Cli::parse();
    let exit = match run(cli.command).await {
        Ok(output) => print_stdout(&output),
        Err(error) => {
            eprintln!("{}", failure::render(&error));
            failure::exit_code(&error)
        }
    };
    ExitCode::from(exit as u8)
}

async fn run(command: Command) -> anyhow::Result<String> {
    match command {
        Command::Init {
            target,
            remote,
            name,
            import: None,
            passphrase_file: _,
        } => commands::init(target.into(), &name, remote.into_remote()?).await,
        Command::Init {
            target,
            remote,
            name,
            import: Some(export_file),
            passphrase_file,
        } => {
            commands::init_import(
                target.into(),
                &name,
                &export_file,
                passphrase_file.as_deref(),
                remote.into_remote()?,
            )
            .await
        }
        Command::Put { target, path, json } => commands::put(target.into(), &path, &json).await,
        Command::Get { target, path } => commands::get(target.into(), &path).await,
        Command::Rm { target, path } => commands::rm(target.into(), &path).await,
        Command::Ls { target, prefix } => commands::ls(target.into(), &prefix).await,
        Command::Status { target, json } => commands::status(target.into(), json).await,
        Command::Key { command } => match command {
            KeyCommand::Export {
                target,
                out,
                passphrase_file,
            } => keys::export(target.into(), out.as_deref(), passphrase_file.as_deref()).await,
            KeyCommand::Rotate { target, wait } => keys::rotate(target.into(), wait).await,
            KeyCommand::PurgeRetired { target } => keys::purge_retired(target.into()).await,
        },
        Command::Remote { command } => match command {
            RemoteCommand::Set {
                target,
                url,
                also,
                pin,
                ca,
            } => remote::set(&target.into(), &RemoteSpec::from_args(url, also, pin, ca)?),
            RemoteCommand::Show { target } => remote::show(&target.into()),
            RemoteCommand::Clear { target } => remote::clear(&target.into()),
        },
        Command::Sync {
            target,
            watch,
            admission_secret_file,
            json,
        } => sync::sync(target.into(), watch, admission_secret_file.as_deref(), json).await,
        Command::Serve { target, listen } => sync::serve(target.into(), listen).await,
        Command::Invite { command } => match command {
            InviteCommand::Create {
                target,
                expires,
                no_wait,
                json,
                qr,
                no_qr,
                admission_secret_file,
            } => {
                let after = if no_wait {
                    AfterCreate::Return
                } else {
                    AfterCreate::Wait
                };
                let qr = match (qr, no_qr) {
                    (true, _) => Qr::Always,
                    (_, true) => Qr::Never,
                    _ => Qr::Auto,
                };
                let options = pairing::CreateOptions {
                    expires,
                    after,
                    qr,
                    as_json: json,
                    admission_file: admission_secret_file,
                };
                pairing::create(target.into(), options).await
            }
            InviteCommand::Accept {
                target,
                name,
                timeout,
                ca,
                code,
            } => {
                // The code is a secret: the copy clap made is wiped after use.
                let code = zeroize::Zeroizing::new(code);
                pairing::accept(target.into(), &name, code, timeout, ca).await
            }
        },
        Command::Device { command } => match command {
            DeviceCommand::List { target, json } => pairing::list(target.into(), json).await,
            DeviceCommand::Revoke { target, id, wait } => {
                pairing::revoke(target.into(), id, wait).await
            }
        },
    }
}

/// Logs go to stderr, so that stdout holds only a command's output.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    // Fails only if a subscriber is already set, which nothing else does.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Prints a command's output. A reader that went away (`persist ls | head`)
/// is not an error: the command itself succeeded.
fn print_stdout(output: &str) -> Exit {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Exit::Ok,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Exit::Ok,
        Err(error) => {
            eprintln!("error: cannot write to stdout: {error}");
            Exit::Unexpected
        }
    }
}
