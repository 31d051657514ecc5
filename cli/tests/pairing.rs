//! Pairing through the binary: `invite create`, `invite accept` and
//! `device list`, against a relay node run in this test process (see
//! `common/relay.rs`).

// Helpers outside `#[test]` functions are test code too.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use persist_relay::{Admission, AdmissionSecret};
use serde_json::{Value, json};

use common::relay::{Relay, interrupt, lines};
use common::{OK, Out, REMOTE, Sandbox, USAGE};

/// How long a test waits for something that happens in the background.
const SETTLE: Duration = Duration::from_secs(60);

/// What every code starts with.
const PREFIX: &str = "persist-invite-v1:";

/// `persist invite create ARGS` started on `sb`'s store, and the first line
/// it prints (the code, or its JSON).
fn create_invite(sb: &Sandbox, args: &[&str]) -> (Child, String) {
    let mut child = sb.spawn("invite create", args);
    let first = lines(&mut child).recv_timeout(SETTLE);
    match first {
        Ok(line) => (child, line),
        Err(error) => {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no code from invite create ({error}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }
    }
}

/// Waits for a child that ends by itself, and returns what it printed on
/// stderr (its stdout was taken by `lines`).
fn finished(child: Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The value of a `label:   value` line of `init` or `invite accept`.
fn field<'a>(out: &'a Out, label: &str) -> &'a str {
    out.stdout
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} line: {out:#?}"))
        .trim()
}

/// The id in `device id:  ID (NAME)`.
fn device_id(out: &Out) -> String {
    field(out, "device id:")
        .split(' ')
        .next()
        .unwrap()
        .to_owned()
}

fn is_empty_or_missing(dir: &Path) -> bool {
    !dir.exists() || std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Accepts `code` on `sb` (read from stdin, as `-`), a code that decodes:
/// the command says first where it waits, and that line is taken off
/// `stderr`, so that an error is its first line as for any command.
fn accept(sb: &Sandbox, code: &str, args: &[&str]) -> Out {
    let mut all = args.to_vec();
    all.push("-");
    let mut out = sb.run_with_stdin(
        "invite accept",
        &sb.store(),
        &sb.key(),
        &all,
        format!("{code}\n").as_bytes(),
    );
    let (first, rest) = out.stderr.split_once('\n').unwrap_or((&out.stderr, ""));
    assert!(
        first.starts_with("waiting for the inviting device to answer through quic://")
            && first.ends_with("(it must be online with sync)"),
        "{out:#?}"
    );
    out.stderr = rest.to_owned();
    out
}

#[test]
fn an_invite_pairs_a_new_device_which_then_syncs_both_ways() {
    let relay = Relay::start();
    let a = Sandbox::new();
    let mut args = relay.args().to_vec();
    args.extend(["--name", "laptop"]);
    let a_init = a.run("init", &args).expect(OK);
    let a_id = device_id(&a_init);
    a.put("notes/1", r#"{"text":"from a"}"#);

    let (inviter, code) = create_invite(&a, &[]);
    assert!(code.starts_with(PREFIX), "{code}");
    assert!(code.len() < 1000, "one short line: {code}");

    let b = Sandbox::new();
    let joined = accept(&b, &code, &["--name", "phone"]).expect(OK);
    assert_eq!(
        field(&joined, "store id:"),
        field(&a_init, "store id:"),
        "{joined:#?}"
    );
    let b_id = device_id(&joined);
    assert_ne!(a_id, b_id);
    assert_eq!(joined.stderr, "", "{joined:#?}");
    assert!(!joined.stderr.contains(&code), "the code is never logged");
    assert!(b.key().exists(), "b has its own device key");
    let remote: Value =
        serde_json::from_slice(&std::fs::read(b.store().join("remote.json")).unwrap()).unwrap();
    assert_eq!(remote, json!({"url": relay.url, "pin": relay.pin}));

    let (code_a, stderr) = finished(inviter);
    assert_eq!(code_a, OK, "{stderr}");
    assert!(
        stderr.contains("waiting for the new device to accept the invite (Ctrl-C to stop"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("device {b_id} joined")),
        "{stderr}"
    );
    assert!(!stderr.contains(&code), "the code is never logged");
    assert!(!stderr.contains('\u{2588}'), "no QR code off a terminal");

    // The new device reads what A wrote, and A what it writes.
    a.run("sync", &[]).expect(OK);
    b.run("sync", &[]).expect(OK);
    assert_eq!(
        b.run("get", &["notes/1"]).expect(OK).json(),
        json!({"text": "from a"})
    );
    b.put("notes/2", r#""from b""#);
    b.run("sync", &[]).expect(OK);
    a.run("sync", &[]).expect(OK);
    assert_eq!(a.run("get", &["notes/2"]).expect(OK).stdout, "\"from b\"\n");

    // Both devices know both members; B was added by A.
    let list = a.run("device list", &[]).expect(OK).stdout;
    let rows: Vec<Vec<&str>> = list.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2, "{list}");
    let a_row = rows.iter().find(|r| r[0] == a_id).unwrap();
    let b_row = rows.iter().find(|r| r[0] == b_id).unwrap();
    assert_eq!(a_row[1], "laptop", "{list}");
    assert_eq!(a_row.get(3), Some(&"(this device)"), "{list}");
    assert_eq!(b_row[1], "phone", "{list}");
    assert!(
        b_row[2].starts_with(&format!("added by {a_id} at 20")) && b_row[2].ends_with('Z'),
        "{list}"
    );
    assert_eq!(b_row.len(), 3, "{list}");
    let listed = b.run("device list", &["--json"]).expect(OK).json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let me = listed
        .iter()
        .find(|d| d["this_device"] == json!(true))
        .unwrap();
    assert_eq!(me["id"], json!(b_id));
    assert_eq!(me["name"], json!("phone"));
    assert_eq!(me["added_by"], json!(a_id));
    assert!(me["added_at_ms"].as_u64().unwrap() > 0);

    // The code works once: a third device is turned away, by A itself
    // (online through `sync --watch`), and nothing is left behind.
    let (watch, _lines) = online(&a);
    let c = Sandbox::new();
    let out = accept(&c, &code, &["--timeout", "2m"]).expect(USAGE);
    assert!(out.stderr.contains("already used"), "{out:#?}");
    assert!(is_empty_or_missing(&c.store()), "{out:#?}");
    assert!(!c.key().exists(), "{out:#?}");
    interrupt(&watch);
    let (code_watch, stderr) = finished(watch);
    assert_eq!(code_watch, OK, "{stderr}");
}

#[test]
fn an_invite_made_without_waiting_is_answered_by_a_later_sync_watch() {
    let relay = Relay::start();
    let a = Sandbox::new();
    a.run("init", &relay.args()).expect(OK);
    a.put("k", "1");

    // Nobody answers an invite while the inviter is offline: the wait ends
    // with exit 4, and nothing is written.
    let out = a.run("invite create", &["--no-wait", "--qr"]).expect(OK);
    let unanswered = out.stdout.trim_end();
    assert!(unanswered.starts_with(PREFIX), "{out:#?}");
    let qr_rows = out
        .stderr
        .lines()
        .filter(|l| l.contains('\u{2588}'))
        .count();
    assert!(qr_rows > 20, "--qr draws the code on stderr: {out:#?}");
    let b = Sandbox::new();
    let out = accept(&b, unanswered, &["--timeout", "2s"]).expect(REMOTE);
    assert!(out.stderr.contains("did not answer within 2 s"), "{out:#?}");
    assert!(is_empty_or_missing(&b.store()), "{out:#?}");
    assert!(!b.key().exists());

    let out = a
        .run(
            "invite create",
            &["--no-wait", "--json", "--expires", "30m"],
        )
        .expect(OK);
    let made = out.json();
    let code = made["code"].as_str().unwrap();
    assert!(code.starts_with(PREFIX), "{made}");
    assert!(made["id"].as_str().is_some_and(common::is_hex_id), "{made}");
    assert!(made["expires_ms"].as_u64().unwrap() > 0, "{made}");
    assert!(!out.stderr.contains(code), "{out:#?}");

    // A sync --watch on the inviter answers it.
    let (watch, _lines) = online(&a);
    accept(&b, code, &["--name", "tablet"]).expect(OK);
    interrupt(&watch);
    let (code_watch, stderr) = finished(watch);
    assert_eq!(code_watch, OK, "{stderr}");
    b.run("sync", &[]).expect(OK);
    assert_eq!(b.run("get", &["k"]).expect(OK).stdout, "1\n");
}

#[test]
fn bad_codes_and_options_exit_2_and_leave_nothing() {
    let relay = Relay::start();
    let a = Sandbox::new();
    a.run("init", &relay.args()).expect(OK);

    let out = a
        .run("invite create", &["--no-wait", "--expires", "40d"])
        .expect(USAGE);
    assert!(out.stderr.contains("at most 30d"), "{out:#?}");
    let out = a
        .run("invite create", &["--no-wait", "--expires", "12"])
        .expect(USAGE);
    assert!(out.stderr.contains("30m, 24h, 7d"), "{out:#?}");

    // An invite nobody takes: the wait ends when it expires, exit 4.
    let out = a.run("invite create", &["--expires", "1s"]);
    let (waiting, error) = out.stderr.split_once('\n').unwrap_or_default();
    assert!(
        out.code == REMOTE
            && waiting.starts_with("waiting for the new device")
            && error.starts_with("error: the invite expired at")
            && error.contains("no device joined"),
        "{out:#?}"
    );

    let out = a.run("invite create", &["--no-wait"]).expect(OK);
    let code = out.stdout.trim_end();
    assert!(code.starts_with(PREFIX) && !code.contains('\n'), "{out:#?}");

    // One character changed in the middle of the code.
    let middle = code.len() / 2;
    let flipped = if &code[middle..=middle] == "A" {
        "B"
    } else {
        "A"
    };
    let edited = format!("{}{flipped}{}", &code[..middle], &code[middle + 1..]);
    let b = Sandbox::new();
    let out = b
        .run_with_stdin(
            "invite accept",
            &b.store(),
            &b.key(),
            &["-"],
            edited.as_bytes(),
        )
        .expect(USAGE);
    assert!(out.stderr.contains("damaged"), "{out:#?}");
    assert!(is_empty_or_missing(b.path().join("store").as_path()));
    assert!(!b.key().exists());
    // As an argument too, and the text of something else entirely.
    let out = b.run("invite accept", &["hello"]).expect(USAGE);
    assert!(out.stderr.contains("not a Persist invite"), "{out:#?}");
    let names: Vec<_> = std::fs::read_dir(b.path()).unwrap().collect();
    assert!(names.is_empty(), "nothing written: {names:?}");

    // A directory that already holds a store.
    let out = a.run("invite accept", &[code]).expect(USAGE);
    assert!(out.stderr.contains("already exists"), "{out:#?}");

    // No remote, no invite.
    let local = Sandbox::new();
    local.init();
    let out = local.run("invite create", &["--no-wait"]).expect(USAGE);
    assert!(out.stderr.contains("no remote"), "{out:#?}");
    local.run("invite create", &[]).expect(USAGE);
    // No store at all.
    let out = Sandbox::new()
        .run("invite create", &["--no-wait"])
        .expect(USAGE);
    assert!(out.stderr.contains("no store"), "{out:#?}");
    Sandbox::new().run("device list", &[]).expect(USAGE);
}

#[test]
fn an_invite_pairs_through_a_relay_that_admits_only_its_operators_devices() {
    let secret = "operator's secret";
    let relay = Relay::start_with(Admission::Secret(AdmissionSecret::new(secret).unwrap()));
    let a = Sandbox::new();
    let file = a.path().join("admission");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let file = file.to_str().unwrap();
    let mut args = relay.args().to_vec();
    args.extend(["--admission-secret-file", file]);
    let a_init = a.run("init", &args).expect(OK);
    a.put("notes/1", r#""from a""#);
    a.run("sync", &[]).expect(OK);

    let (inviter, code) = create_invite(&a, &["--admission-secret-file", file]);
    assert!(code.starts_with(PREFIX), "{code}");
    let b = Sandbox::new();
    let joined = accept(&b, &code, &["--name", "phone", "--timeout", "1m"]).expect(OK);
    assert_eq!(
        field(&joined, "store id:"),
        field(&a_init, "store id:"),
        "{joined:#?}"
    );
    let (code_a, stderr) = finished(inviter);
    assert_eq!(code_a, OK, "{stderr}");
    assert!(
        stderr.contains(&format!("device {} joined", device_id(&joined))),
        "{stderr}"
    );
    b.run("sync", &[]).expect(OK);
    assert_eq!(b.run("get", &["notes/1"]).expect(OK).stdout, "\"from a\"\n");
    let kept = std::fs::read_to_string(a.store().join("remote.json")).unwrap();
    assert!(!kept.contains(secret), "the secret is never kept: {kept}");
}

#[test]
fn device_revoke_cuts_a_device_off_and_refuses_bad_ids() {
    let relay = Relay::start();
    let a = Sandbox::new();
    let a_id = device_id(&a.run("init", &relay.args()).expect(OK));
    a.put("notes/1", r#""before""#);
    let (inviter, code) = create_invite(&a, &[]);
    let b = Sandbox::new();
    let b_id = device_id(&accept(&b, &code, &["--name", "phone"]).expect(OK));
    assert_eq!(finished(inviter).0, OK);
    b.run("sync", &[]).expect(OK);
    a.run("sync", &[]).expect(OK);

    // Bad ids are usage errors that change nothing.
    for (id, says) in [
        ("not-hex", "hex"),
        (a_id.as_str(), "cannot revoke itself"),
        ("00112233445566778899aabbccddeeff", "no member"),
    ] {
        let out = a.run("device revoke", &[id]).expect(USAGE);
        assert!(out.stderr.contains(says), "{id}: {out:#?}");
    }
    let list = a.run("device list", &["--json"]).expect(OK).json();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|d| d["revoked"] == json!(false)),
        "{list}"
    );

    // No other member must take the new key first: --wait sees the relay
    // switched to the new access token.
    let out = a.run("device revoke", &[&b_id, "--wait"]).expect(OK);
    assert!(
        out.stdout
            .starts_with(&format!("revoked device {b_id}: new key epoch 2")),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .contains("switched the relay to a new access token"),
        "{out:#?}"
    );
    let list = a.run("device list", &[]).expect(OK).stdout;
    let b_row = list.lines().find(|l| l.starts_with(&b_id)).unwrap();
    assert!(b_row.ends_with("\t(revoked)"), "{list}");
    let out = a.run("device revoke", &[&b_id]).expect(USAGE);
    assert!(out.stderr.contains("already revoked"), "{out:#?}");

    // The relay refuses B, which reads nothing written after its
    // revocation; A syncs on under the new token.
    a.put("notes/2", r#""after""#);
    a.run("sync", &[]).expect(OK);
    let out = b.run("sync", &[]).expect(REMOTE);
    assert!(out.stderr.contains("Unauthorized"), "{out:#?}");
    assert_eq!(b.run("get", &["notes/1"]).expect(OK).stdout, "\"before\"\n");
    let out = b.run("get", &["notes/2"]);
    assert!(out.stderr.contains("no record"), "{out:#?}");
}

#[test]
fn device_revoke_wait_names_whom_the_relay_switch_waits_for_and_their_syncs_release_it() {
    let relay = Relay::start();
    let a = Sandbox::new();
    a.run("init", &relay.args()).expect(OK);
    a.put("notes/1", r#""before""#);
    let mut joined = Vec::new();
    for name in ["phone", "laptop"] {
        let (inviter, code) = create_invite(&a, &[]);
        let sb = Sandbox::new();
        let id = device_id(&accept(&sb, &code, &["--name", name]).expect(OK));
        assert_eq!(finished(inviter).0, OK);
        joined.push((sb, id));
    }
    let [(b, b_id), (c, c_id)] = <[_; 2]>::try_from(joined).ok().unwrap();
    b.run("sync", &[]).expect(OK);

    // C has not taken the new key: the relay keeps the old token for now,
    // and --wait says whom it waits for instead of waiting.
    let out = a.run("device revoke", &[&b_id, "--wait"]).expect(OK);
    assert!(
        out.stdout
            .contains("once these members have synced and acknowledged the new key"),
        "{out:#?}"
    );
    assert!(out.stdout.contains(&c_id), "{out:#?}");
    assert!(!out.stdout.contains("switched the relay"), "{out:#?}");
    let status = a.status();
    assert_eq!(
        status["relay_switch"]["by_this_device"],
        json!(true),
        "{status}"
    );
    // Nor does the old epoch retire, though no record of A's uses it: C
    // may still write under it.
    let old = &status["epochs"][0];
    assert_eq!(old["state"], json!("rotating"), "{status}");
    assert_eq!(old["retire_waits_for"], json!([c_id]), "{status}");
    let text = a.run("status", &[]).expect(OK).stdout;
    assert!(
        text.contains("retires once these members hold a newer key, or without them at")
            && text.contains(&c_id),
        "{text}"
    );
    a.put("notes/2", r#""after""#);
    a.run("sync", &[]).expect(OK);
    b.run("sync", &[]).expect(OK);

    // C's sync takes the new key and acknowledges it; A's next sync sees
    // that and switches the relay, which then refuses B.
    c.run("sync", &[]).expect(OK);
    a.run("sync", &[]).expect(OK);
    let status = a.status();
    assert_eq!(status["relay_switch"], Value::Null);
    assert_eq!(status["epochs"][0]["state"], json!("retired"), "{status}");
    let out = b.run("sync", &[]).expect(REMOTE);
    assert!(out.stderr.contains("Unauthorized"), "{out:#?}");
    assert_eq!(b.run("get", &["notes/1"]).expect(OK).stdout, "\"before\"\n");
    assert!(b.run("get", &["notes/2"]).stderr.contains("no record"));
    c.run("sync", &[]).expect(OK);
    assert_eq!(c.run("get", &["notes/2"]).expect(OK).stdout, "\"after\"\n");
}

/// Fails every commit: the joining store's startup or its member entry.
struct FailCommits;

impl persist::FaultPlan for FailCommits {
    fn fire(&self, point: persist::FaultPoint) -> Option<u64> {
        (point == persist::FaultPoint::CommitFail).then_some(0)
    }
}

/// A join that failed after it stored the store's keys (here in process,
/// its commits failing) is completed by `invite accept` with a new code,
/// without pairing again: the inviter lists the device once. The command
/// used to refuse the directory ("a store already exists"), and had the
/// database been removed, a retry stopped at "a device key already
/// exists".
#[test]
fn invite_accept_completes_a_join_that_failed_after_storing_its_keys() {
    let relay = Relay::start();
    let a = Sandbox::new();
    a.run("init", &relay.args()).expect(OK);
    a.put("k", "1");
    a.run("sync", &[]).expect(OK);
    let mut codes = Vec::new();
    for _ in 0..2 {
        let out = a.run("invite create", &["--no-wait", "--json"]).expect(OK);
        codes.push(out.json()["code"].as_str().unwrap().to_owned());
    }
    let (watch, _lines) = online(&a);

    let b = Sandbox::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let failed = runtime.block_on(persist::Store::open(
        persist::Config::new(b.store())
            .key_file(b.key())
            .invite(&codes[0])
            .dangerous()
            .faults(persist::Faults::new(std::sync::Arc::new(FailCommits)))
            .done(),
    ));
    let Err(err) = failed else {
        panic!("b joined although every commit fails");
    };
    assert!(err.to_string().contains("injected fault"), "{err}");

    let out = b.run_with_stdin(
        "invite accept",
        &b.store(),
        &b.key(),
        &["-"],
        format!("{}\n", codes[1]).as_bytes(),
    );
    let out = out.expect(OK);
    assert!(out.stdout.contains("joined store"), "{out:#?}");
    b.run("sync", &[]).expect(OK);
    assert_eq!(b.run("get", &["k"]).expect(OK).stdout, "1\n");
    interrupt(&watch);
    let (code_watch, stderr) = finished(watch);
    assert_eq!(code_watch, OK, "{stderr}");
    let list = a.run("device list", &[]).expect(OK).stdout;
    assert_eq!(list.lines().count(), 2, "b is a member once: {list}");
}

/// Keeps `device` online to answer invites (`sync --watch`), once its
/// first round has pushed; interrupt the child to stop it. Its output
/// goes on arriving on the receiver, which must live as long.
fn online(device: &Sandbox) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut watch = device.spawn("sync", &["--watch"]);
    let watch_lines = lines(&mut watch);
    assert!(
        watch_lines
            .recv_timeout(SETTLE)
            .unwrap()
            .starts_with("pushed ")
    );
    (watch, watch_lines)
}
