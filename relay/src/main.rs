//! `persist-relay`: the relay node binary.
//!
//! ```text
//! persist-relay --listen 127.0.0.1:7443 --data DIR [--metrics 127.0.0.1:7444]
//!               [--admission-secret-file F] [--cert PEM --key PEM]
//!               [--postgres URL [--postgres-schema NAME]]
//! ```
//!
//! Stores ciphertext in `DIR/relay.redb` — or, with `--postgres`, in a
//! PostgreSQL database that several relay nodes share — keeps its self-signed TLS
//! identity in `DIR` (unless `--cert`/`--key` give one), prints exactly one
//! line on standard output once it serves —
//! `persist-relay listening on <addr> pin sha256:<hex>` — and logs to
//! standard error (`RUST_LOG`, default `info`). SIGTERM or Ctrl-C stop it
//! gracefully.
//!
//! Exit codes: 0 after a clean stop; 1 if the runtime cannot start; 2 for a
//! usage or configuration error (the message says what to fix).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use persist_relay::{Admission, AdmissionSecret, IdentitySource, RelayConfig};
use persist_storage::relay::{RedbRelay, RelayBackend};

/// The relay database's file name inside the data directory.
const DATABASE_FILE: &str = "relay.redb";
/// Bytes of an admission secret file: the secret itself is at most 256.
const SECRET_FILE_BYTES_MAX: u64 = 4096;

/// Persist relay node: stores and forwards end-to-end-encrypted envelopes.
#[derive(Parser, Debug)]
#[command(name = "persist-relay", version)]
struct Args {
    /// UDP address to serve QUIC on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Directory for the relay database and its TLS identity (created if
    /// missing).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// TCP address for GET /metrics and GET /healthz.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// File whose first line is the secret a client must present to create
    /// a store (existing stores admit their members without it).
    #[arg(long, value_name = "FILE")]
    admission_secret_file: Option<PathBuf>,
    /// PEM certificate chain to present instead of the self-signed one.
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
    /// Keep the relay's data in this PostgreSQL database (postgres://…)
    /// instead of DIR/relay.redb, so several relay nodes serve the same
    /// stores. The relay creates and migrates its own schema.
    #[cfg(feature = "postgres")]
    #[arg(
        long,
        value_name = "URL",
        env = "PERSIST_RELAY_POSTGRES",
        hide_env_values = true
    )]
    postgres: Option<String>,
    /// The schema of --postgres (default `persist_relay`); nodes that share
    /// stores use the same one.
    #[cfg(feature = "postgres")]
    #[arg(long, value_name = "NAME", requires = "postgres")]
    postgres_schema: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("persist-relay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("persist-relay: {message}");
            ExitCode::from(2)
        }
    }
}

/// Runs until a signal; `Err` is a configuration problem, said for a person.
async fn serve(args: Args) -> Result<(), String> {
    let config = configure(&args)?;
    #[cfg(feature = "postgres")]
    if let Some(url) = &args.postgres {
        let backend =
            persist_storage::relay::PostgresRelay::connect(url, args.postgres_schema.as_deref())
                .await
                .map_err(|e| e.to_string())?;
        return run_node(config, backend).await;
    }
    let database = args.data.join(DATABASE_FILE);
    let backend = RedbRelay::open(&database).map_err(|e| e.to_string())?;
    run_node(config, backend).await
}

/// Serves `backend` until a signal.
async fn run_node<B: RelayBackend>(config: RelayConfig, backend: B) -> Result<(), String> {
    // Listen for signals before announcing, so a signal sent right after
    // the announcement is never missed.
    let mut signals = Signals::new().map_err(|e| format!("cannot listen for signals: {e}"))?;
    let relay = persist_relay::start(config, backend)
        .await
        .map_err(|e| e.to_string())?;

    let mut stdout = std::io::stdout().lock();
    let announced = writeln!(
        stdout,
        "persist-relay listening on {} pin {}",
        relay.addr(),
        relay.pin()
    )
    .and_then(|()| stdout.flush());
    drop(stdout);
    if let Err(e) = announced {
        // Whoever started us cannot learn the address; keep serving anyway.
        tracing::warn!(error = %e, "could not write the start line to standard output");
    }

    signals.wait().await;
    tracing::info!("signal received, shutting down");
    relay.shutdown().await;
    Ok(())
}

fn configure(args: &Args) -> Result<RelayConfig, String> {
    create_data_dir(&args.data)?;
    let mut config = RelayConfig::new(args.listen, &args.data);
    config.metrics = args.metrics;
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        config.identity = IdentitySource::Pem {
            cert: cert.clone(),
            key: key.clone(),
        };
    }
    if let Some(path) = &args.admission_secret_file {
        config.admission = Admission::Secret(read_secret(path)?);
    }
    Ok(config)
}

fn create_data_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| {
        format!(
            "cannot create the data directory {}: {e}: give --data a directory this user can write",
            dir.display()
        )
    })?;
    let meta = std::fs::metadata(dir)
        .map_err(|e| format!("cannot read the data directory {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "--data {} is not a directory: give a directory",
            dir.display()
        ));
    }
    Ok(())
}

fn read_secret(path: &Path) -> Result<AdmissionSecret, String> {
    let unreadable = |e: std::io::Error| {
        format!(
            "cannot read the admission secret file {}: {e}",
            path.display()
        )
    };
    let len = std::fs::metadata(path).map_err(unreadable)?.len();
    if len > SECRET_FILE_BYTES_MAX {
        return Err(format!(
            "the admission secret file {} is {len} bytes: it should hold only the secret",
            path.display()
        ));
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(unreadable)?);
    let first_line = text.lines().next().unwrap_or_default();
    AdmissionSecret::new(first_line).map_err(|e| format!("{}: {e}", path.display()))
}

/// SIGTERM and Ctrl-C (SIGINT).
struct Signals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn wait(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            biased;
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
