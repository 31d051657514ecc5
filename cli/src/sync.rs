//! The commands that talk to other devices: `persist sync [--watch]`,
//! `persist serve`, the sync section of `persist status`, and the signal
//! handling of the commands that run until stopped.
//!
//! # Which commands sync
//!
//! Only `sync`, `status` (when a remote is configured), `serve` and the
//! `invite` commands (which pair through the remote, see
//! [`crate::pairing`]) open the store with a sync session. `put`, `rm`,
//! `get`, `ls` and the `key` commands stay local: a process that lives
//! for one write would connect for nothing (the QUIC handshake and
//! `Hello` cost more than the write), and a relay that is down would slow
//! down or fail a command that does not need it. Their writes are recorded
//! in the store's change log and pushed by the next `persist sync` (or by
//! any app that opens the store with sync). Nothing is lost meanwhile:
//! pending work stays pending across closes.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use persist::{Change, Store, SyncReport, SyncStatus};
use serde::Serialize;

use crate::commands::{Access, Target, finish, open_existing, open_syncing};
use crate::failure::CliError;
use crate::json;
use crate::remote::{self, AdmissionSecret};

/// How often the progress spinner and `status` look at the session.
const POLL: Duration = Duration::from_millis(50);

/// How many polls (30 s) `sync` waits for the session's first connection
/// attempt: longer than the engine's connect and `Hello` timeouts (10 s
/// each), so that it is their verdict that counts.
const FIRST_ATTEMPT_POLLS: u32 = 600;

/// How many polls (2 s) `status` gives a new session to connect, or fail
/// to, before it reports what it has. Counted in polls: the CLI reads no
/// clock.
const STATUS_SETTLE_POLLS: u32 = 40;

/// `persist sync [--watch] [--admission-secret-file F] [--json]`.
///
/// Runs one full push and pull and prints what it did. With `--watch` it
/// then keeps the session open and prints every change the remote sends
/// (`PATH<TAB>JSON`, or `PATH<TAB>(deleted)`) as it arrives, until SIGINT
/// or SIGTERM.
pub(crate) async fn sync(
    target: Target,
    watch: bool,
    admission_file: Option<&Path>,
    as_json: bool,
) -> anyhow::Result<String> {
    target.require_store()?;
    let spec = remote::require(&target.dir)?;
    let admission = admission_file.map(AdmissionSecret::read).transpose()?;
    let remote = spec.remote(admission.as_ref())?;
    drop(admission);
    // Listening before the first sync: a signal sent at any point after the
    // summary is printed stops the watch cleanly.
    let mut shutdown = if watch {
        Some(Shutdown::listen()?)
    } else {
        None
    };
    let store = open_syncing(&target, remote).await?;
    let result = sync_with_progress(&store).await;
    let result = result.map(|report| Summary::new(&report, store.sync_status().as_ref()));
    let Some(shutdown) = shutdown.as_mut() else {
        return Ok(finish(store, result).await?.line(as_json));
    };
    let summary = match result {
        Ok(summary) => summary,
        Err(error) => return finish(store, Err(error)).await,
    };
    // Subscribed before the summary is printed, so that whoever reads the
    // summary knows every later change will be printed. The changes the
    // first sync pulled are counted in the summary, not listed.
    let changes = store.watch("");
    let result = match print_line(&summary.line(as_json)) {
        Ok(()) => watch_changes(changes, shutdown, as_json).await,
        Err(error) => Err(error),
    };
    finish(store, result).await?;
    Ok(String::new())
}

/// `persist serve --listen ADDR`: serves the store to its other devices
/// (they name it as their remote with the address and pin it prints) until
/// SIGINT or SIGTERM. With a remote configured, the store also syncs with
/// it meanwhile.
pub(crate) async fn serve(target: Target, listen: SocketAddr) -> anyhow::Result<String> {
    target.require_store()?;
    let remote = remote::load(&target.dir)?
        .map(|spec| spec.remote(None))
        .transpose()?;
    // Listening before announcing: a signal sent as soon as the line is
    // read stops the server cleanly.
    let mut shutdown = Shutdown::listen()?;
    let store = match remote {
        Some(remote) => open_syncing(&target, remote).await?,
        None => open_existing(&target, Access::Write).await?,
    };
    let served = match store.serve(listen).await {
        Ok(served) => served,
        Err(error) => return finish(store, Err(error)).await,
    };
    let line = format!(
        "persist serve listening on {} pin {}\n",
        served.addr(),
        served.pin()
    );
    let result = match print_line(&line) {
        Ok(()) => {
            shutdown.wait().await;
            Ok(())
        }
        Err(error) => Err(error),
    };
    served.stop().await;
    finish(store, result).await?;
    Ok(String::new())
}

/// Gives a session opened for `status` a moment to connect (or fail to),
/// so that what it reports means something; then returns where it stands.
pub(crate) async fn settled_status(store: &Store) -> Option<SyncStatus> {
    for _ in 0..STATUS_SETTLE_POLLS {
        let status = store.sync_status()?;
        if status.connected || status.last_error.is_some() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    store.sync_status()
}

/// The `sync` lines of `persist status`.
pub(crate) fn status_text(out: &mut String, sync: &SyncStatus) {
    use std::fmt::Write as _;
    let state = match (sync.connected, sync.synced) {
        (true, true) => "connected, in sync",
        (true, false) => "connected, syncing",
        (false, _) => "not connected",
    };
    let _ = writeln!(out, "remote:     {} ({state})", sync.remote);
    let _ = writeln!(
        out,
        "pending:    {} up, {} down",
        sync.pending_up, sync.pending_down
    );
    if sync.held > 0 {
        let _ = writeln!(
            out,
            "held:       {} (waiting for a key or a member this device does not know yet)",
            sync.held
        );
    }
    if sync.refused > 0 {
        let _ = writeln!(
            out,
            "refused:    {} (tampered or malformed envelopes)",
            sync.refused
        );
    }
    if let Some(error) = &sync.last_error {
        let _ = writeln!(out, "last error: {error}");
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, for the commands that run until stopped.
pub(crate) struct Shutdown {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    /// Starts listening; from now on the signals no longer kill the
    /// process, they wake [`Shutdown::wait`].
    pub(crate) fn listen() -> anyhow::Result<Shutdown> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Shutdown {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Shutdown {})
    }

    /// Returns once a signal arrives.
    pub(crate) async fn wait(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Waits for the session's first connection attempt (which starts when
/// the store opens), then runs `sync_now`; a spinner on stderr, when it is
/// a terminal, counts the records pulled (a long first pull takes a while).
///
/// A first attempt that failed is the answer: `sync_now` would make a
/// second one, and a remote that is down would cost the user another
/// connect timeout before they hear about it.
async fn sync_with_progress(store: &Store) -> anyhow::Result<SyncReport> {
    let spinner = spinner();
    let started = store.sync_status().map_or(0, |s| s.pulled);
    let show = |s: &SyncStatus| {
        let message = if s.connected {
            format!(
                "syncing with {}: {} records pulled, {} to pull, {} to push",
                s.remote,
                s.pulled.saturating_sub(started),
                s.pending_down,
                s.pending_up
            )
        } else {
            format!("connecting to {}", s.remote)
        };
        spinner.set_message(message);
    };
    for _ in 0..FIRST_ATTEMPT_POLLS {
        let Some(status) = store.sync_status() else {
            break;
        };
        if status.connected {
            break;
        }
        if let Some(error) = status.last_error {
            spinner.finish_and_clear();
            return Err(CliError::SyncFailed { message: error }.into());
        }
        show(&status);
        tokio::time::sleep(POLL).await;
    }
    let sync = store.sync_now();
    let mut sync = std::pin::pin!(sync);
    let mut poll = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            result = &mut sync => {
                spinner.finish_and_clear();
                return Ok(result?);
            }
            _ = poll.tick() => {
                if let Some(status) = store.sync_status() {
                    show(&status);
                }
            }
        }
    }
}

fn spinner() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    // The template is fixed and valid; a spinner without style still works.
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
        spinner.set_style(style);
    }
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}

/// What a `persist sync` did, counted over the whole session: the session
/// starts pushing and pulling as soon as the store opens, before
/// `sync_now` is called, so its report alone would miss that part.
#[derive(Debug, Serialize)]
struct Summary {
    pushed: u64,
    pulled: u64,
    held: u64,
    refused: u64,
}

impl Summary {
    fn new(report: &SyncReport, status: Option<&SyncStatus>) -> Summary {
        let since_open = |f: fn(&SyncStatus) -> u64| status.map_or(0, f);
        Summary {
            pushed: report.pushed.max(since_open(|s| s.pushed)),
            pulled: report.pulled.max(since_open(|s| s.pulled)),
            // Held is a state, not a count: the report's is the latest.
            held: report.held,
            refused: report.refused.max(since_open(|s| s.refused)),
        }
    }

    /// `pushed N, pulled M, held H, refused R`, or one JSON object.
    fn line(&self, as_json: bool) -> String {
        if as_json {
            return format!("{}\n", serde_json::json!(self));
        }
        format!(
            "pushed {}, pulled {}, held {}, refused {}\n",
            self.pushed, self.pulled, self.held, self.refused
        )
    }
}

/// Prints each change until a signal, the store closing, or stdout going
/// away (`persist sync --watch | head -3`).
async fn watch_changes(
    changes: impl futures::Stream<Item = Result<Change, persist::Lagged>>,
    shutdown: &mut Shutdown,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut changes = std::pin::pin!(changes);
    loop {
        let change = tokio::select! {
            () = shutdown.wait() => return Ok(()),
            change = changes.next() => change,
        };
        let line = match change {
            None => return Ok(()),
            Some(Err(lagged)) => {
                tracing::warn!("{lagged}; run `persist ls` to see the current records");
                continue;
            }
            Some(Ok(change)) => match change_line(&change, as_json) {
                Ok(line) => line,
                Err(error) => {
                    tracing::warn!("cannot show the change to {:?}: {error}", change.path());
                    continue;
                }
            },
        };
        match print_line(&line) {
            Ok(()) => {}
            Err(error) if is_broken_pipe(&error) => return Ok(()),
            Err(error) => return Err(error),
        }
    }
}

/// `PATH<TAB>JSON` or `PATH<TAB>(deleted)`; with `--json`, one object.
fn change_line(change: &Change, as_json: bool) -> Result<String, persist::ReadError> {
    let value = change.value::<ciborium::Value>()?.map(json::from_cbor);
    let path = change.path();
    Ok(match (as_json, value) {
        (false, Some(value)) => format!("{path}\t{value}\n"),
        // Paths hold no control characters (the engine refuses them).
        (false, None) => format!("{path}\t(deleted)\n"),
        (true, Some(value)) => format!("{}\n", serde_json::json!({"path": path, "value": value})),
        (true, None) => format!("{}\n", serde_json::json!({"path": path, "deleted": true})),
    })
}

/// Writes and flushes one line, so that a reader sees it at once.
pub(crate) fn print_line(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
