//! The `persist-relay` binary: start line, a real client, graceful stop,
//! and configuration errors.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Client, Writer};
use persist_core::protocol::Message;
use persist_transport::CertPin;

const BIN: &str = env!("CARGO_BIN_EXE_persist-relay");

/// Parses `persist-relay listening on <addr> pin sha256:<hex>`.
fn parse_start_line(line: &str) -> (SocketAddr, CertPin) {
    let rest = line
        .trim_end()
        .strip_prefix("persist-relay listening on ")
        .unwrap_or_else(|| panic!("unexpected start line {line:?}"));
    let (addr, pin) = rest.split_once(" pin ").expect("a pin");
    (
        addr.parse().expect("an address"),
        pin.parse().expect("a pin"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_announces_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("a start line");
    let (addr, pin) = parse_start_line(&line);
    assert_ne!(addr.port(), 0);
    assert!(data.join("relay.redb").exists());

    let mut writer = Writer::new(21);
    let mut client = Client::connect(addr, pin).await;
    assert!(matches!(
        client.ask(&writer.hello()).await,
        Message::Welcome(_)
    ));
    let entry = writer.entry("p", b"v", 1);
    assert!(matches!(
        client
            .ask(&Message::Push {
                id: 1,
                entries: vec![entry]
            })
            .await,
        Message::PushAck { accepted: 1, .. }
    ));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    // The open session is told, then the process exits cleanly.
    assert!(matches!(client.next().await, Message::Error { .. }));
    let exit = tokio::time::timeout(Duration::from_secs(20), async move {
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("exits in time");
    assert_eq!(exit.code(), Some(0));

    // Same identity, same data after a restart.
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns again");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("a start line");
    let (addr, again) = parse_start_line(&line);
    assert_eq!(again, pin, "the pin survives a restart");
    let mut client = Client::connect(addr, pin).await;
    match client.ask(&writer.hello()).await {
        Message::Welcome(w) => assert_eq!((w.created, w.head), (false, 1)),
        other => panic!("expected Welcome, got {other:?}"),
    }
    child.kill().expect("kill");
    let _ = child.wait();
}

fn run_expecting_failure(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).args(args).output().expect("runs");
    assert!(out.stdout.is_empty(), "no start line on failure");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn configuration_errors_exit_2_and_say_what_to_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");

    let (code, err) = run_expecting_failure(&[
        "--listen",
        "127.0.0.1:0",
        "--data",
        file.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("data directory") || err.contains("not a directory"),
        "{err}"
    );

    let (code, err) =
        run_expecting_failure(&["--listen", "127.0.0.1:0", "--data", data, "--cert", "c.pem"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--key"), "{err}");

    let junk = file.to_str().expect("utf-8");
    let (code, err) = run_expecting_failure(&[
        "--listen",
        "127.0.0.1:0",
        "--data",
        data,
        "--cert",
        junk,
        "--key",
        junk,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no PEM certificate"), "{err}");

    let empty = dir.path().join("empty-secret");
    std::fs::write(&empty, "\n").expect("write");
    let (code, err) = run_expecting_failure(&[
        "--listen",
        "127.0.0.1:0",
        "--data",
        data,
        "--admission-secret-file",
        empty.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("admission secret is empty"), "{err}");

    let (code, err) = run_expecting_failure(&["--data", data, "--listen", "not-an-address"]);
    assert_eq!(code, Some(2), "{err}");
}
