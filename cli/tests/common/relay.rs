//! A relay node run in the test process, and the helpers for commands
//! that run until stopped (`sync --watch`, `serve`, `invite create`).

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::mpsc;

use persist_relay::{Admission, RelayConfig, RelayHandle};
use persist_storage::relay::RedbRelay;
use tempfile::TempDir;

/// A relay node on 127.0.0.1, on its own runtime; shut down on drop.
pub(crate) struct Relay {
    runtime: tokio::runtime::Runtime,
    handle: Option<RelayHandle>,
    pub(crate) url: String,
    pub(crate) pin: String,
    _dir: TempDir,
}

impl Relay {
    pub(crate) fn start() -> Relay {
        Relay::start_with(Admission::Open)
    }

    pub(crate) fn start_with(admission: Admission) -> Relay {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut config = RelayConfig::new(listen, dir.path());
        config.admission = admission;
        let backend = RedbRelay::open(&dir.path().join("relay.redb")).unwrap();
        let handle = runtime
            .block_on(persist_relay::start(config, backend))
            .unwrap();
        Relay {
            url: format!("quic://{}", handle.addr()),
            pin: handle.pin().to_string(),
            handle: Some(handle),
            runtime,
            _dir: dir,
        }
    }

    /// `--relay URL --pin PIN`.
    pub(crate) fn args(&self) -> [&str; 4] {
        ["--relay", &self.url, "--pin", &self.pin]
    }

    pub(crate) fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.runtime.block_on(handle.shutdown());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lines of a child's stdout, read on a thread (a blocking read cannot
/// time out otherwise).
pub(crate) fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (send, receive) = mpsc::channel();
    // allow-nondeterminism: the thread only forwards a pipe's lines; it ends
    // when the child closes its stdout.
    #[allow(clippy::disallowed_methods)]
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if send.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    receive
}

/// SIGINT, as Ctrl-C sends it.
pub(crate) fn interrupt(child: &Child) {
    signal(child, "-INT");
}

/// SIGTERM, as a service manager sends it.
pub(crate) fn terminate(child: &Child) {
    signal(child, "-TERM");
}

fn signal(child: &Child, which: &str) {
    let status = std::process::Command::new("kill")
        .args([which, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
