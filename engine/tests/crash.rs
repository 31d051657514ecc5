//! Crashes that really crash: a child process writing concurrently is
//! SIGKILLed, repeatedly, and every put it was told had succeeded is there
//! after reopening, with its exact value.
//!
//! The parent test re-runs this test binary, asking for the ignored test
//! [`child_writer`] only; that test does nothing unless [`CHILD_ENV`] is set.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers as well as tests: a failed unwrap is a failed test"
)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use persist::Store;

/// Set (to the test's temp dir) in the child's environment.
const CHILD_ENV: &str = "PERSIST_CRASH_CHILD";
/// The crash round, so that each round writes its own paths.
const ROUND_ENV: &str = "PERSIST_CRASH_ROUND";
/// Concurrent writers in the child.
const TASKS: usize = 8;
/// Puts per writer; far more than the parent waits for.
const PUTS_PER_TASK: usize = 1_000_000;

fn record_path(round: u32, task: usize, i: usize) -> String {
    format!("r{round}/task{task}/{i:07}")
}

/// The value written at a path: names the put and carries some bulk.
fn value(round: u32, task: usize, i: usize) -> String {
    format!("round {round} task {task} put {i} {}", "x".repeat(i % 97))
}

/// Child mode: opens the store named by [`CHILD_ENV`] and writes from
/// [`TASKS`] tasks at once, printing `ACK <round> <task> <i>` after each
/// put returns, until killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs only as the child process of crashes_lose_no_acknowledged_write"]
async fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let round: u32 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let store = common::reopen(Path::new(&dir)).await;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PUTS_PER_TASK {
                store
                    .put(&record_path(round, task, i), &value(round, task, i))
                    .await
                    .expect("put");
                let mut out = std::io::stdout().lock();
                writeln!(out, "ACK {round} {task} {i}").unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Runs one child until it has acknowledged `kill_after` puts, SIGKILLs it,
/// and returns the puts it acknowledged.
fn crash_child(dir: &Path, round: u32, kill_after: usize) -> Vec<(u32, usize, usize)> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--ignored"])
        .env(CHILD_ENV, dir)
        .env(ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().unwrap();
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read the child's output");
        let Some(ack) = line.strip_prefix("ACK ") else {
            continue;
        };
        let fields: Vec<usize> = ack.split(' ').map(|f| f.parse().unwrap()).collect();
        let [r, task, i] = fields[..] else {
            panic!("bad ACK line {line:?}")
        };
        acked.push((r as u32, task, i));
        if acked.len() == kill_after {
            // SIGKILL on unix: no destructor, no flush, no clean shutdown.
            child.kill().expect("kill the child");
            break;
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        acked.len(),
        kill_after,
        "the child stopped on its own ({status}) before {kill_after} acks"
    );
    assert!(!status.success(), "the child was killed, not finished");
    acked
}

/// Three rounds on one store, each killing a child of concurrent writers
/// after 50, 200 and 500 acknowledged puts: after every crash the store
/// reopens without error and holds every acknowledged put of every round,
/// with its exact value.
#[tokio::test(flavor = "multi_thread")]
async fn crashes_lose_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().to_path_buf();
    let mut acked_all: BTreeMap<String, String> = BTreeMap::new();
    for (round, kill_after) in [(1u32, 50usize), (2, 200), (3, 500)] {
        let acked = crash_child(&dir, round, kill_after);
        for (r, task, i) in acked {
            assert_eq!(r, round);
            acked_all.insert(record_path(r, task, i), value(r, task, i));
        }

        let store = Store::open(common::config(&dir))
            .await
            .unwrap_or_else(|e| panic!("reopen after crash {round}: {e}"));
        let mut missing = Vec::new();
        for (path, expected) in &acked_all {
            match store.get::<String>(path).await {
                Ok(Some(v)) if &v == expected => {}
                other => missing.push(format!("{path}: {other:?}")),
            }
        }
        assert!(
            missing.is_empty(),
            "after crash {round}, {} of {} acknowledged puts are not intact: {:?}",
            missing.len(),
            acked_all.len(),
            &missing[..missing.len().min(10)]
        );
        // Whatever else the child committed before dying also decrypts.
        let listed: Vec<(String, String)> = store.list("").await.expect("list after crash");
        assert!(listed.len() >= acked_all.len());
        for (path, v) in &listed {
            assert!(v.starts_with("round "), "{path} holds {v:?}");
        }
        let status = store.status().await.unwrap();
        assert_eq!(status.records, listed.len() as u64);
        store.close().await.unwrap();
        // The next child must find the database free.
        common::wait_released(&dir).await;
    }
}
