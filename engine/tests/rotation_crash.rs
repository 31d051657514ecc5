//! Crashes in the middle of a key rotation: a child process rotating a
//! store of [`RECORDS`] records while it writes in the foreground is
//! SIGKILLed at several points of the re-encryption (one child per point,
//! same store). After the last crash the parent reopens the store, the
//! rotation resumes from its persisted cursor and finishes, and:
//! no record is left under an old epoch, every original record and every
//! acknowledged write reads back exactly, the old epoch is retired, and
//! after a purge and a reopen everything is still readable.
//!
//! The parent test re-runs this test binary, asking for the ignored test
//! [`rotation_crash_child`] only; that test does nothing unless
//! [`CHILD_ENV`] is set.

// Integration tests: a panic in a helper is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use persist::{Config, KdfParams, Status, Store};
use persist_core::{Epoch, Locator};

/// Set (to the test's temp dir) in the child's environment.
const CHILD_ENV: &str = "PERSIST_ROTATION_CRASH_CHILD";
/// The crash round, so that each round writes its own paths.
const ROUND_ENV: &str = "PERSIST_ROTATION_CRASH_ROUND";
/// `1` if the child starts the rotation; otherwise it only lets the
/// interrupted one resume.
const ROTATE_ENV: &str = "PERSIST_ROTATION_CRASH_ROTATE";

/// Records in the store before the rotation.
const RECORDS: u32 = 20_000;
/// Foreground writer tasks in the child: task 0 overwrites original
/// records and puts new ones, task 1 deletes original records.
const TASKS: u32 = 2;
/// Original records each task of each round may touch (a range of its
/// own, so that every original path is written at most once in all).
const TOUCH_PER_TASK: u32 = 2_000;
/// How often the child reports progress.
const POLL: Duration = Duration::from_millis(3);
/// Progress lines the parent reads before it gives up on a round (about
/// a minute of polling).
const PROGRESS_LINES_MAX: usize = 15_000;
/// How long the parent waits for the resumed rotation.
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);

fn config(tmp: &Path) -> Config {
    Config::new(common::store_dir(tmp))
        .key_file(common::key_file(tmp))
        .dangerous()
        .export_kdf(KdfParams::insecure_for_tests())
        .done()
}

fn original_path(k: u32) -> String {
    format!("rec/{k:06}")
}

/// The value of an original record: names it and carries some bulk.
fn original_value(k: u32) -> String {
    format!("original {k} {}", "o".repeat((k % 61) as usize))
}

/// The value a child writes over original record `k` (at most once ever).
fn overwrite_value(k: u32) -> String {
    format!("overwritten {k} {}", "w".repeat((k % 13) as usize))
}

/// The first original record that task `task` of round `round` touches.
fn touch_base(round: u32, task: u32) -> u32 {
    ((round - 1) * TASKS + task) * TOUCH_PER_TASK
}

fn new_path(round: u32, i: u32) -> String {
    format!("new/r{round}/{i:06}")
}

fn new_value(round: u32, i: u32) -> String {
    format!("new in round {round}, put {i}")
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// Records under every epoch but the current one.
fn old_records(status: &Status) -> u64 {
    status
        .epochs
        .iter()
        .filter(|e| e.epoch != status.current_epoch)
        .map(|e| e.records)
        .sum()
}

/// Child mode: opens the store named by [`CHILD_ENV`], starts a rotation
/// if [`ROTATE_ENV`] asks for one (printing `ROTATED <epoch>`), then,
/// until killed, writes from [`TASKS`] tasks (printing `ACK <kind> <n>`
/// after each write returns) and prints
/// `PROGRESS <done> <total> <old records>` every [`POLL`].
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs only as the child process of a_rotation_survives_crashes_at_every_stage"]
async fn rotation_crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let round: u32 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let rotate = std::env::var(ROTATE_ENV).as_deref() == Ok("1");
    let store = common::open_when_released(|| config(&dir))
        .await
        .expect("child: open the store");
    let rotation = if rotate {
        let rotation = store.crypto().rotate_key().await.expect("rotate");
        say(&format!("ROTATED {}", rotation.epoch()));
        Some(rotation)
    } else {
        None
    };

    let overwriter = {
        let store = store.clone();
        tokio::spawn(async move {
            let base = touch_base(round, 0);
            for i in 0..TOUCH_PER_TASK {
                let k = base + i;
                store
                    .put(&original_path(k), &overwrite_value(k))
                    .await
                    .expect("overwrite");
                say(&format!("ACK overwrite {k}"));
                store
                    .put(&new_path(round, i), &new_value(round, i))
                    .await
                    .expect("put new");
                say(&format!("ACK new {i}"));
            }
        })
    };
    let deleter = {
        let store = store.clone();
        tokio::spawn(async move {
            let base = touch_base(round, 1);
            for i in 0..TOUCH_PER_TASK {
                let k = base + i;
                store.delete(&original_path(k)).await.expect("delete");
                say(&format!("ACK delete {k}"));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    loop {
        let status = store.status().await.expect("status");
        let progress = match &rotation {
            Some(r) => r.progress(),
            None => status.rotation,
        };
        say(&format!(
            "PROGRESS {} {} {}",
            progress.done,
            progress.total,
            old_records(&status)
        ));
        if overwriter.is_finished() && deleter.is_finished() {
            // Both tasks ran out of work (or panicked): wait to be killed.
            overwriter.abort();
            deleter.abort();
        }
        tokio::time::sleep(POLL).await;
    }
}

/// When a round's child is killed.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// At the first progress line after the rotation started.
    FirstProgress,
    /// Once at most this fraction of the original records is left under
    /// the old epoch.
    Fraction(f64),
}

/// What a round's child acknowledged, and where it was when killed.
#[derive(Debug, Default)]
struct Round {
    overwritten: Vec<u32>,
    deleted: Vec<u32>,
    new: Vec<u32>,
    rotated_to: Option<u32>,
    progress_lines: usize,
    /// `(done, total, old records)` of the last progress line read.
    last_progress: (u64, u64, u64),
}

/// Runs one child until `kill_at`, SIGKILLs it, and returns what it
/// acknowledged.
fn crash_child(dir: &Path, round: u32, rotate: bool, kill_at: KillAt) -> Round {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "rotation_crash_child",
            "--nocapture",
            "--ignored",
        ])
        .env(CHILD_ENV, dir)
        .env(ROUND_ENV, round.to_string())
        .env(ROTATE_ENV, if rotate { "1" } else { "0" })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().unwrap();
    let mut r = Round::default();
    let mut killed = false;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("read the child's output");
        let fields: Vec<&str> = line.split(' ').collect();
        if r.ack(&fields) {
            continue;
        }
        match fields[..] {
            ["ROTATED", e] => r.rotated_to = Some(e.parse().unwrap()),
            ["PROGRESS", done, total, old] => {
                r.progress_lines += 1;
                let old: u64 = old.parse().unwrap();
                r.last_progress = (done.parse().unwrap(), total.parse().unwrap(), old);
                let kill = match kill_at {
                    KillAt::FirstProgress => true,
                    KillAt::Fraction(f) => (old as f64) <= f * f64::from(RECORDS),
                };
                if !kill && r.progress_lines > PROGRESS_LINES_MAX {
                    child.kill().expect("kill the child");
                    let _ = child.wait();
                    panic!(
                        "round {round}: the rotation did not reach {kill_at:?} in \
                         {PROGRESS_LINES_MAX} progress lines; last (done, total, old) = {:?}",
                        r.last_progress
                    );
                }
                if kill {
                    // SIGKILL on unix: no destructor, no flush, no clean shutdown.
                    child.kill().expect("kill the child");
                    killed = true;
                    break;
                }
            }
            _ => {}
        }
    }
    // The child went on writing until the signal landed: acknowledgements
    // it printed meanwhile are still in the pipe, and they count.
    for line in lines {
        let Ok(line) = line else { break };
        r.ack(&line.split(' ').collect::<Vec<_>>());
    }
    let status = child.wait().unwrap();
    assert!(
        killed,
        "round {round}: the child stopped on its own ({status}) before {kill_at:?}"
    );
    assert!(!status.success(), "the child was killed, not finished");
    r
}

impl Round {
    /// Records an `ACK` line; returns whether `fields` was one.
    fn ack(&mut self, fields: &[&str]) -> bool {
        match fields {
            ["ACK", "overwrite", k] => self.overwritten.push(k.parse().unwrap()),
            ["ACK", "delete", k] => self.deleted.push(k.parse().unwrap()),
            ["ACK", "new", i] => self.new.push(i.parse().unwrap()),
            _ => return false,
        }
        true
    }
}

/// What the database of a killed child holds, read directly: records per
/// epoch, the rotation cursor, and how many records at or before the
/// cursor are still under an old epoch (a rotation that started while the
/// Rotator was already walking the table, as it does at every open,
/// leaves some behind its cursor for a later pass).
async fn inspect_after_crash(
    dir: &Path,
    current: Epoch,
) -> (BTreeMap<Epoch, u64>, Option<Locator>, usize) {
    let db = common::open_db(dir).await;
    let found = {
        let txn = db.begin_read().unwrap();
        let counts = txn.epoch_counts().unwrap();
        let cursor = txn
            .meta(persist_actors::meta::ROTATION_CURSOR)
            .unwrap()
            .map(|b| Locator(<[u8; 32]>::try_from(b.as_slice()).expect("a 32-byte cursor")));
        let mut behind_old = 0usize;
        if let Some(cursor) = cursor {
            let mut after: Option<Locator> = None;
            'pages: loop {
                let page = txn.records_page(after.as_ref(), 1024).unwrap();
                let Some((last, _)) = page.last() else { break };
                after = Some(*last);
                for (locator, row) in &page {
                    if locator.0 > cursor.0 {
                        break 'pages;
                    }
                    if row.epoch != current {
                        behind_old += 1;
                    }
                }
            }
        }
        (counts, cursor, behind_old)
    };
    db.close().unwrap();
    found
}

/// Four children on one store, each SIGKILLed at a different stage of the
/// same rotation (just after it starts, at ~25%, ~50% and ~90% of the
/// records resealed), all while writing in the foreground. Then the
/// parent reopens the store and lets the rotation resume and finish.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_survives_crashes_at_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().to_path_buf();

    // The records to rotate, written and closed by the parent.
    let store = Store::open(config(&dir)).await.unwrap();
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(5_000) {
        let mut batch = store.batch();
        for &k in chunk {
            batch.put(&original_path(k), &original_value(k));
        }
        batch.commit().await.unwrap();
    }
    assert_eq!(store.status().await.unwrap().current_epoch, 1);
    store.close().await.unwrap();
    common::wait_released(&dir).await;

    let rounds = [
        (1u32, true, KillAt::FirstProgress),
        (2, false, KillAt::Fraction(0.75)),
        (3, false, KillAt::Fraction(0.50)),
        (4, false, KillAt::Fraction(0.10)),
    ];
    let mut acked: Vec<(u32, Round)> = Vec::new();
    let mut old_at_last_crash = 0u64;
    for (round, rotate, kill_at) in rounds {
        let r = crash_child(&dir, round, rotate, kill_at);
        if rotate {
            assert_eq!(r.rotated_to, Some(2), "round {round}: the rotation's epoch");
        }
        let (counts, cursor, behind_old) = inspect_after_crash(&dir, Epoch(2)).await;
        old_at_last_crash = counts
            .iter()
            .filter(|(e, _)| **e != Epoch(2))
            .map(|(_, n)| *n)
            .sum();
        eprintln!(
            "round {round} ({kill_at:?}): killed after {} progress lines at \
             (done, total, old) = {:?}; acked {} overwrites, {} deletes, {} new; \
             on disk: {counts:?}, cursor {} with {behind_old} old records behind it",
            r.progress_lines,
            r.last_progress,
            r.overwritten.len(),
            r.deleted.len(),
            r.new.len(),
            if cursor.is_some() { "set" } else { "none" },
        );
        acked.push((round, r));
    }

    // Reopen: the rotation resumes on its own; wait for it to finish.
    let store = common::open_when_released(|| config(&dir)).await.unwrap();
    let status = tokio::time::timeout(RESUME_TIMEOUT, async {
        loop {
            let s = store.status().await.unwrap();
            let old_retired = s
                .epochs
                .iter()
                .all(|e| e.epoch == s.current_epoch || e.state == "retired");
            if !s.rotation.active && old_retired {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the resumed rotation did not finish in {RESUME_TIMEOUT:?}"));
    eprintln!(
        "after reopen: {} records were under the old epoch; the resumed rotation \
         resealed {} (total {}); epochs {:?}",
        old_at_last_crash, status.rotation.done, status.rotation.total, status.epochs
    );
    assert_eq!(
        status.current_epoch, 2,
        "the acknowledged rotation is durable"
    );
    assert_eq!(
        old_records(&status),
        0,
        "records left under an old epoch: {:?}",
        status.epochs
    );
    for e in &status.epochs {
        if e.epoch != 2 {
            assert_eq!((e.state, e.records), ("retired", 0), "{:?}", status.epochs);
        }
    }
    // The resumed rotation did only what was left, not the whole store again.
    assert_eq!(
        status.rotation.done, old_at_last_crash,
        "the resumed rotation resealed exactly the records left under the old epoch"
    );
    assert!(
        status.rotation.done < u64::from(RECORDS) / 2,
        "killed at ~90%, the resumed rotation resealed {} of {RECORDS}",
        status.rotation.done
    );

    let expected = expected_records(&acked);
    check_records(&store, &expected, "after the resumed rotation").await;

    assert_eq!(
        store.crypto().purge_retired_keys().await.unwrap(),
        vec![1],
        "the old epoch is purged"
    );
    store.close().await.unwrap();

    let store = common::open_when_released(|| config(&dir)).await.unwrap();
    let status = store.status().await.unwrap();
    assert_eq!(status.current_epoch, 2);
    let e1 = status.epochs.iter().find(|e| e.epoch == 1).unwrap();
    assert_eq!((e1.state, e1.records), ("purged", 0), "{:?}", status.epochs);
    assert_eq!(old_records(&status), 0, "{:?}", status.epochs);
    check_records(&store, &expected, "after purge and reopen").await;
    store.close().await.unwrap();
}

/// What each path may hold: the values a read may return (`None`: absent).
/// An acknowledged write fixes the value; a write the child may have sent
/// but not acknowledged when killed leaves two possibilities.
fn expected_records(acked: &[(u32, Round)]) -> BTreeMap<String, Vec<Option<String>>> {
    let mut expected: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for k in 0..RECORDS {
        expected.insert(original_path(k), vec![Some(original_value(k))]);
    }
    for (round, r) in acked {
        let round = *round;
        // The first original each task did not acknowledge may have been
        // written durably before the kill.
        let next_over = touch_base(round, 0) + r.overwritten.len() as u32;
        let next_del = touch_base(round, 1) + r.deleted.len() as u32;
        for (i, k) in r.overwritten.iter().enumerate() {
            assert_eq!(*k, touch_base(round, 0) + i as u32, "acks in order");
            expected.insert(original_path(*k), vec![Some(overwrite_value(*k))]);
        }
        for (i, k) in r.deleted.iter().enumerate() {
            assert_eq!(*k, touch_base(round, 1) + i as u32, "acks in order");
            expected.insert(original_path(*k), vec![None]);
        }
        if next_over < touch_base(round, 0) + TOUCH_PER_TASK {
            expected.insert(
                original_path(next_over),
                vec![
                    Some(original_value(next_over)),
                    Some(overwrite_value(next_over)),
                ],
            );
        }
        if next_del < touch_base(round, 1) + TOUCH_PER_TASK {
            expected.insert(
                original_path(next_del),
                vec![Some(original_value(next_del)), None],
            );
        }
        for (i, n) in r.new.iter().enumerate() {
            assert_eq!(*n, i as u32, "acks in order");
            expected.insert(new_path(round, *n), vec![Some(new_value(round, *n))]);
        }
        let next_new = r.new.len() as u32;
        expected.insert(
            new_path(round, next_new),
            vec![None, Some(new_value(round, next_new))],
        );
    }
    expected
}

/// Every path of `expected` reads back as one of its allowed values, and
/// the store holds nothing else.
async fn check_records(
    store: &Store,
    expected: &BTreeMap<String, Vec<Option<String>>>,
    when: &str,
) {
    let listed: BTreeMap<String, String> = store
        .list::<String>("")
        .await
        .unwrap_or_else(|e| panic!("{when}: list: {e}"))
        .into_iter()
        .collect();
    let mut wrong = Vec::new();
    for (path, allowed) in expected {
        let got = listed.get(path).cloned();
        if !allowed.contains(&got) {
            wrong.push(format!("{path}: {got:?}, expected one of {allowed:?}"));
        }
    }
    for path in listed.keys() {
        if !expected.contains_key(path) {
            wrong.push(format!("{path}: unexpected record"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{when}: {} paths wrong: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    // A few point reads too (list and get take different paths).
    for (path, allowed) in expected.iter().step_by(997) {
        let got: Option<String> = store.get(path).await.unwrap();
        assert!(allowed.contains(&got), "{when}: get {path}: {got:?}");
    }
    let status = store.status().await.unwrap();
    assert_eq!(status.records, listed.len() as u64, "{when}: live count");
}
