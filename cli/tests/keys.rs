//! The key commands, driven through the binary: `key export`,
//! `init --import`, `key rotate` and `key purge-retired`.
//!
//! Exports and imports run Argon2id at its default cost (64 MiB, 3 passes),
//! a fraction of a second each: each test makes only a few.

// Helpers outside `#[test]` functions are test code too.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use common::{OK, Out, Sandbox, USAGE};

const EXPORT_PREFIX: &str = "persist-key-v1:";

/// Writes `text` to a file in the sandbox and returns its path.
fn write_file(sb: &Sandbox, name: &str, text: &str) -> PathBuf {
    let path = sb.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The passphrase `key export` printed on stderr: the indented line after
/// the one that announces it.
fn shown_passphrase(out: &Out) -> String {
    let mut lines = out.stderr.lines();
    lines
        .find(|l| l.contains("protected by this passphrase"))
        .unwrap_or_else(|| panic!("no passphrase shown: {out:#?}"));
    let line = lines.find(|l| !l.trim().is_empty()).unwrap();
    assert!(line.starts_with("    "), "{out:#?}");
    line.trim().to_owned()
}

/// `records` records `r/NNNN` = `{"i": N}`, written through the engine in
/// one batch (500 runs of `persist put` would take seconds).
fn fill(sb: &Sandbox, records: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = persist::Config::new(sb.store())
            .key_file(sb.key())
            .create_if_missing(false);
        let store = persist::Store::open(config).await.unwrap();
        let mut batch = store.batch();
        for i in 0..records {
            batch.put(&format!("r/{i:04}"), &json!({ "i": i }));
        }
        batch.commit().await.unwrap();
        store.close().await.unwrap();
    });
}

/// Every record `fill` wrote reads back through `ls`, and a few by `get`.
fn assert_filled(sb: &Sandbox, store: &Path, key: &Path, records: usize) {
    let ls = sb.run_with("ls", store, key, &["r/"]).expect(OK).stdout;
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), records);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("r/{i:04}\t{{\"i\":{i}}}"));
    }
    for i in [0, records / 2, records - 1] {
        let out = sb.run_with("get", store, key, &[&format!("r/{i:04}")]);
        assert_eq!(out.expect(OK).json(), json!({ "i": i }));
    }
}

fn epoch(status: &Value, epoch: u64) -> &Value {
    let epochs = status["epochs"].as_array().unwrap();
    epochs
        .iter()
        .find(|e| e["epoch"] == json!(epoch))
        .unwrap_or_else(|| panic!("no epoch {epoch}: {status}"))
}

#[test]
fn export_prints_the_export_on_stdout_and_a_generated_passphrase_once_on_stderr() {
    let sb = Sandbox::new();
    sb.init();
    sb.put("a", "1");
    let out = sb.run("key export", &[]).expect(OK);
    let export = out.stdout.trim_end();
    assert!(export.starts_with(EXPORT_PREFIX), "{out:#?}");
    assert_eq!(out.stdout.lines().count(), 1, "{out:#?}");
    let passphrase = shown_passphrase(&out);
    assert_eq!(out.stderr.matches(&passphrase).count(), 1, "{out:#?}");
    assert!(!out.stdout.contains(&passphrase));
    for note in [
        "Write this down",
        "only way to open the export",
        "not stored anywhere",
    ] {
        assert!(out.stderr.contains(note), "{note}: {out:#?}");
    }

    // The passphrase on stdin (a pipe: no prompt) joins the store.
    let joined = sb.path().join("joined");
    let joined_key = sb.path().join("joined.key");
    let export_file = write_file(&sb, "export.txt", &out.stdout);
    let out = sb
        .run_with_stdin(
            "init",
            &joined,
            &joined_key,
            &["--import", export_file.to_str().unwrap()],
            format!("{passphrase}\n").as_bytes(),
        )
        .expect(OK);
    assert!(out.stdout.contains("joined store"), "{out:#?}");
    assert!(out.stdout.contains("records:    0"), "{out:#?}");
    assert!(out.stdout.contains("arrive by sync"), "{out:#?}");
    assert!(!out.stderr.contains("passphrase"), "no prompt: {out:#?}");
    let original = sb.status();
    let status = sb
        .run_with("status", &joined, &joined_key, &["--json"])
        .expect(OK)
        .json();
    assert_eq!(status["store_id"], original["store_id"]);
    assert_ne!(status["device_id"], original["device_id"]);
    assert_eq!(status["records"], json!(0));
    assert_eq!(status["current_epoch"], original["current_epoch"]);
}

#[test]
fn export_to_a_file_is_private_and_never_overwrites() {
    let sb = Sandbox::new();
    sb.init();
    let pass = write_file(&sb, "pass", "correct horse battery staple\n");
    let file = sb.path().join("store.key-export");
    let file_arg = file.to_str().unwrap();
    let pass_arg = pass.to_str().unwrap();
    let out = sb
        .run(
            "key export",
            &["--out", file_arg, "--passphrase-file", pass_arg],
        )
        .expect(OK);
    assert!(out.stdout.contains("key export written to"), "{out:#?}");
    assert!(!out.stderr.contains("passphrase"), "{out:#?}");
    assert!(!out.stderr.contains("correct horse"), "{out:#?}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.starts_with(EXPORT_PREFIX), "{written}");

    let out = sb
        .run(
            "key export",
            &["--out", file_arg, "--passphrase-file", pass_arg],
        )
        .expect(USAGE);
    assert!(out.stderr.contains("already exists"), "{out:#?}");
    let out = sb.run("key export", &["--out", file_arg]).expect(USAGE);
    assert!(!out.stderr.contains("protected by"), "{out:#?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written);

    // An empty passphrase, or none to read, is refused before any work.
    let empty = write_file(&sb, "empty", "\n");
    let out = sb
        .run(
            "key export",
            &["--passphrase-file", empty.to_str().unwrap()],
        )
        .expect(USAGE);
    assert!(out.stderr.contains("is empty"), "{out:#?}");
    let missing = sb.path().join("missing");
    let out = sb
        .run(
            "key export",
            &["--passphrase-file", missing.to_str().unwrap()],
        )
        .expect(USAGE);
    assert!(
        out.stderr.contains("cannot read the passphrase"),
        "{out:#?}"
    );
}

#[test]
fn import_joins_an_empty_dir_and_rekeys_a_copied_store() {
    let sb = Sandbox::new();
    sb.init();
    fill(&sb, 20);
    let pass = write_file(&sb, "pass", "correct horse battery staple");
    let file = sb.path().join("export");
    let import = |store: &Path, key: &Path| {
        let args = [
            "--import",
            file.to_str().unwrap(),
            "--passphrase-file",
            pass.to_str().unwrap(),
            "--name",
            "phone",
        ];
        sb.run_with("init", store, key, &args)
    };
    sb.run(
        "key export",
        &[
            "--out",
            file.to_str().unwrap(),
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
    )
    .expect(OK);
    let original = sb.status();

    // An empty directory: this device joins, with no records yet.
    let empty = sb.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let empty_key = sb.path().join("empty.key");
    let out = import(&empty, &empty_key).expect(OK);
    assert!(out.stdout.contains("joined store"), "{out:#?}");
    assert!(out.stdout.contains("records:    0"), "{out:#?}");
    let status = sb
        .run_with("status", &empty, &empty_key, &["--json"])
        .expect(OK)
        .json();
    assert_eq!(status["store_id"], original["store_id"]);
    assert_eq!(status["records"], json!(0));
    assert_eq!(status["name"], json!("phone"));

    // A copy of the database: re-keyed for this device, every value there.
    let copy = sb.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(sb.store().join("persist.redb"), copy.join("persist.redb")).unwrap();
    let copy_key = sb.path().join("copy.key");
    // Without the export, the copy does not open on this device.
    sb.run_with("get", &copy, &copy_key, &["r/0000"])
        .expect(USAGE);
    let out = import(&copy, &copy_key).expect(OK);
    assert!(out.stdout.contains("opened the copied store"), "{out:#?}");
    assert!(out.stdout.contains("records:    20"), "{out:#?}");
    let status = sb
        .run_with("status", &copy, &copy_key, &["--json"])
        .expect(OK)
        .json();
    assert_eq!(status["store_id"], original["store_id"]);
    assert_ne!(status["device_id"], original["device_id"]);
    assert_eq!(status["records"], json!(20));
    assert_filled(&sb, &copy, &copy_key, 20);
    // The copy takes writes, and the original is untouched.
    sb.run_with("put", &copy, &copy_key, &["new", "true"])
        .expect(OK);
    assert_filled(&sb, &sb.store(), &sb.key(), 20);
    assert_eq!(sb.status(), original);
}

#[test]
fn bad_imports_exit_2_and_change_nothing() {
    let sb = Sandbox::new();
    sb.init();
    sb.put("a", "1");
    let pass = write_file(&sb, "pass", "right");
    let wrong = write_file(&sb, "wrong", "wrong\n");
    let file = sb.path().join("export");
    let file_arg = file.to_str().unwrap();
    sb.run(
        "key export",
        &[
            "--out",
            file_arg,
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
    )
    .expect(OK);
    let target = sb.path().join("target");
    let target_key = sb.path().join("target.key");
    let import = |store: &Path, export: &str, pass: &Path| {
        let args = [
            "--import",
            export,
            "--passphrase-file",
            pass.to_str().unwrap(),
        ];
        sb.run_with("init", store, &target_key, &args)
    };

    // A wrong passphrase: nothing is created, not even the directory.
    let out = import(&target, file_arg, &wrong).expect(USAGE);
    assert!(out.stderr.contains("wrong passphrase"), "{out:#?}");
    assert!(!target.exists(), "{out:#?}");
    assert!(!target_key.exists(), "{out:#?}");
    // ... nor in a directory that was already there.
    std::fs::create_dir(&target).unwrap();
    import(&target, file_arg, &wrong).expect(USAGE);
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    // Also with the passphrase on stdin.
    let out = sb
        .run_with_stdin(
            "init",
            &target,
            &target_key,
            &["--import", file_arg],
            b"nope\n",
        )
        .expect(USAGE);
    assert!(out.stderr.contains("wrong passphrase"), "{out:#?}");
    assert!(!target.join("persist.redb").exists());

    // A truncated export.
    let text = std::fs::read_to_string(&file).unwrap();
    let truncated = write_file(&sb, "truncated", &text[..text.len() / 2]);
    let out = import(&target, truncated.to_str().unwrap(), &pass).expect(USAGE);
    assert!(out.stderr.contains("damaged"), "{out:#?}");
    // Not an export at all, a missing file, and no passphrase on stdin.
    let out = import(&target, pass.to_str().unwrap(), &pass).expect(USAGE);
    assert!(out.stderr.contains("not a Persist key export"), "{out:#?}");
    let missing = sb.path().join("missing");
    let out = import(&target, missing.to_str().unwrap(), &pass).expect(USAGE);
    assert!(
        out.stderr.contains("cannot read the key export"),
        "{out:#?}"
    );
    let out = sb
        .run_with("init", &target, &target_key, &["--import", file_arg])
        .expect(USAGE);
    assert!(out.stderr.contains("passphrase"), "{out:#?}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    assert!(!target_key.exists());

    // The export of one store over a copy of another.
    let other = Sandbox::new();
    other.init();
    other.put("theirs", "2");
    std::fs::copy(
        other.store().join("persist.redb"),
        target.join("persist.redb"),
    )
    .unwrap();
    let out = import(&target, file_arg, &pass).expect(USAGE);
    assert!(
        out.stderr.contains("the key export is for store"),
        "{out:#?}"
    );
    // The copy is still the other store, opened by the other store's key.
    let copy = sb
        .run_with("status", &target, &other.key(), &["--json"])
        .expect(OK)
        .json();
    assert_eq!(copy["store_id"], other.status()["store_id"]);
    let out = sb.run_with("get", &target, &other.key(), &["theirs"]);
    assert_eq!(out.expect(OK).stdout, "2\n");
    assert!(!target_key.exists());

    // --passphrase-file means nothing without --import.
    let out = sb.run("init", &["--passphrase-file", pass.to_str().unwrap()]);
    assert_eq!(out.code, USAGE, "{out:#?}");
}

#[test]
fn rotate_wait_reseals_every_record_and_purge_deletes_the_old_key() {
    let sb = Sandbox::new();
    sb.init();
    fill(&sb, 500);
    let out = sb.run("key rotate", &["--wait"]).expect(OK);
    assert_eq!(
        out.stdout,
        "rotated to epoch 2: 500 records resealed; retired epoch 1 \
         (`persist key purge-retired` deletes their keys)\n"
    );
    // No terminal: no progress bar.
    assert_eq!(out.stderr, "", "{out:#?}");
    let mut status = sb.status();
    assert_eq!(status["current_epoch"], json!(2), "{status}");
    // Each epoch's announcement hash is random; the rest is exact.
    for e in status["epochs"].as_array_mut().unwrap() {
        let announcement = e.as_object_mut().unwrap().remove("announcement");
        let hex = announcement.as_ref().and_then(|a| a.as_str()).unwrap_or("");
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{announcement:?}"
        );
    }
    assert_eq!(
        epoch(&status, 1),
        &json!({
            "epoch": 1, "state": "retired", "records": 0, "keys": 1, "acknowledged_by": [],
            "retire_waits_for": [], "retire_due_ms": null
        })
    );
    assert_eq!(
        epoch(&status, 2),
        &json!({
            "epoch": 2, "state": "current", "records": 500, "keys": 1, "acknowledged_by": [],
            "retire_waits_for": [], "retire_due_ms": null
        })
    );
    assert_eq!(
        status["rotation"]["active"],
        json!(false),
        "the rotation shows in the JSON: {status}"
    );
    let text = sb.run("status", &[]).expect(OK).stdout;
    assert!(text.contains("epoch:      2 (current)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["epoch", "1", "retired", "0", "records"]),
        "{text}"
    );
    assert!(!text.contains("rotation:"), "nothing pending: {text}");

    let out = sb.run("key purge-retired", &[]).expect(OK);
    assert_eq!(out.stdout, "purged the keys of epoch 1\n");
    let status = sb.status();
    assert_eq!(epoch(&status, 1)["state"], json!("purged"), "{status}");
    let out = sb.run("key purge-retired", &[]).expect(OK);
    assert_eq!(out.stdout, "no retired epochs\n");
    assert_filled(&sb, &sb.store(), &sb.key(), 500);
}

#[test]
fn rotate_without_wait_resumes_on_the_next_read_write_open() {
    let sb = Sandbox::new();
    sb.init();
    fill(&sb, 500);
    let out = sb.run("key rotate", &[]).expect(OK);
    assert!(
        out.stdout
            .starts_with("rotation to epoch 2 started; re-encryption continues"),
        "{out:#?}"
    );
    let status = sb.status();
    assert_eq!(status["current_epoch"], json!(2), "{status}");
    assert_eq!(epoch(&status, 2)["state"], json!("current"), "{status}");
    let old = epoch(&status, 1).clone();
    if old["records"] != json!(0) {
        let text = sb.run("status", &[]).expect(OK).stdout;
        assert!(text.contains("rotation:   pending"), "{text}");
    }

    sb.put("after", "\"rotation\"");
    let status = sb.status();
    let state = epoch(&status, 1)["state"].clone();
    assert!(
        state == json!("rotating") || state == json!("retired"),
        "{status}"
    );
    let sealed: u64 = status["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["records"].as_u64().unwrap())
        .sum();
    assert_eq!(sealed, 501, "{status}");
    assert_filled(&sb, &sb.store(), &sb.key(), 500);
    assert_eq!(
        sb.run("get", &["after"]).expect(OK).stdout,
        "\"rotation\"\n"
    );
}

#[test]
fn key_commands_need_a_store() {
    let sb = Sandbox::new();
    let missing = sb.path().join("missing");
    for (command, args) in [
        ("key export", vec![]),
        ("key rotate", vec![]),
        ("key rotate", vec!["--wait"]),
        ("key purge-retired", vec![]),
    ] {
        let out = sb
            .run_with(command, &missing, &sb.key(), &args)
            .expect(USAGE);
        assert!(out.stderr.contains("no store at"), "{command}: {out:#?}");
        assert!(!out.stderr.contains("protected by"), "{out:#?}");
    }
    assert!(!missing.exists());
    assert!(!sb.key().exists());
}
