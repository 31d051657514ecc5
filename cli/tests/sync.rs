//! Sync through the binary: `init --relay`, `remote`, `sync [--watch]`
//! and the `sync` section of `status`, against a relay node run in this
//! test process (the `persist-relay` library on its own runtime, see
//! `common/relay.rs`).

// Helpers outside `#[test]` functions are test code too.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use persist_relay::{Admission, AdmissionSecret};
use serde_json::json;

use common::relay::{Relay, interrupt, lines, terminate};
use common::{OK, Out, REMOTE, Sandbox, USAGE};

/// How long a test waits for something that happens in the background.
const SETTLE: Duration = Duration::from_secs(30);

fn write_file(sb: &Sandbox, name: &str, text: &str) -> PathBuf {
    let path = sb.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Device A creates the store with `relay` as its remote; device B joins
/// it from A's key export, with the same remote.
fn pair(relay: &Relay) -> (Sandbox, Sandbox) {
    let a = Sandbox::new();
    let out = a.run("init", &relay.args()).expect(OK);
    assert!(
        out.stdout
            .contains(&format!("remote:     {} (pin {})", relay.url, relay.pin)),
        "{out:#?}"
    );
    let b = Sandbox::new();
    let pass = write_file(&a, "pass", "correct horse\n");
    let export = a.path().join("a.export");
    let pass = pass.to_str().unwrap();
    let export_arg = export.to_str().unwrap();
    a.run(
        "key export",
        &["--out", export_arg, "--passphrase-file", pass],
    )
    .expect(OK);
    let mut args = vec!["--import", export_arg, "--passphrase-file", pass];
    args.extend(relay.args());
    let out = b.run("init", &args).expect(OK);
    assert!(out.stdout.contains("run `persist sync`"), "{out:#?}");
    (a, b)
}

/// `pushed N, pulled M, held H, refused R` as numbers.
fn summary(out: &Out) -> [u64; 4] {
    let line = out.stdout.trim_end();
    let numbers: Vec<u64> = line
        .split(", ")
        .map(|part| part.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        line.starts_with("pushed ") && line.contains(", pulled ") && numbers.len() == 4,
        "{out:#?}"
    );
    numbers.try_into().unwrap()
}

#[test]
fn two_devices_sync_through_a_relay() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);

    a.put("notes/1", r#"{"text":"from a"}"#);
    let [pushed, ..] = summary(&a.run("sync", &[]).expect(OK));
    assert!(pushed >= 1, "a pushed its note");
    let [_, pulled, held, refused] = summary(&b.run("sync", &[]).expect(OK));
    assert!(pulled >= 1, "b pulled a's note");
    assert_eq!((held, refused), (0, 0));
    let out = b.run("get", &["notes/1"]).expect(OK);
    assert_eq!(out.json(), json!({"text": "from a"}));

    b.put("notes/2", r#""from b""#);
    b.run("rm", &["notes/1"]).expect(OK);
    let out = b.run("sync", &["--json"]).expect(OK);
    let report = out.json();
    assert!(report["pushed"].as_u64().unwrap() >= 2, "{out:#?}");
    a.run("sync", &[]).expect(OK);
    assert_eq!(a.run("get", &["notes/2"]).expect(OK).stdout, "\"from b\"\n");
    a.run("get", &["notes/1"]).expect(common::NOT_FOUND);
    assert_eq!(a.run("ls", &[]).expect(OK).stdout, "notes/2\t\"from b\"\n");

    let status = a.status();
    let sync = &status["sync"];
    assert_eq!(sync["remote"], json!(relay.url), "{status}");
    assert_eq!(sync["connected"], json!(true), "{status}");
    assert_eq!(sync["pending_up"], json!(0), "{status}");
    assert_eq!(sync["last_error"], json!(null), "{status}");
    let text = a.run("status", &[]).expect(OK).stdout;
    assert!(
        text.contains(&format!("remote:     {} (connected", relay.url)),
        "{text}"
    );
}

#[test]
fn remote_set_show_and_clear() {
    let relay = Relay::start();
    let sb = Sandbox::new();
    sb.init();
    let out = sb.run("sync", &[]).expect(USAGE);
    assert!(out.stderr.contains("no remote"), "{out:#?}");
    assert!(out.stderr.contains("persist remote set"), "{out:#?}");
    sb.run("remote show", &[]).expect(USAGE);
    assert!(
        sb.status().get("sync").is_none(),
        "no remote, no sync section"
    );

    let out = sb
        .run("remote set", &[&relay.url, "--pin", &relay.pin])
        .expect(OK);
    assert!(out.stdout.contains(&relay.url), "{out:#?}");
    let show = sb.run("remote show", &[]).expect(OK).stdout;
    assert_eq!(show, format!("url: {}\npin: {}\n", relay.url, relay.pin));
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.store().join("remote.json")).unwrap()).unwrap();
    assert_eq!(file, json!({"url": relay.url, "pin": relay.pin}));

    sb.put("k", "1");
    let [pushed, ..] = summary(&sb.run("sync", &[]).expect(OK));
    assert!(pushed >= 1);

    sb.run("remote clear", &[]).expect(OK);
    assert!(!sb.store().join("remote.json").exists());
    sb.run("sync", &[]).expect(USAGE);
    let out = sb.run("remote clear", &[]).expect(OK);
    assert!(out.stdout.contains("no remote was set"), "{out:#?}");
    sb.run("remote set", &[&relay.url]).expect(USAGE);
    let out = sb
        .run(
            "remote set",
            &[&relay.url, "--pin", &relay.pin, "--ca", "x.pem"],
        )
        .expect(USAGE);
    assert!(out.stderr.contains("cannot be used with"), "{out:#?}");
}

#[test]
fn bad_urls_pins_and_ca_files_exit_2_with_the_engine_message() {
    let good_pin = format!("sha256:{}", "ab".repeat(32));
    let sb = Sandbox::new();
    for (url, pin, says) in [
        (
            "relay.example.com:7443",
            good_pin.as_str(),
            "quic://HOST:PORT",
        ),
        ("quic://relay:0", good_pin.as_str(), "port"),
        (
            "quic://relay:7443",
            "sha256:abc",
            "persist-relay prints its pin",
        ),
        ("quic://relay:7443", "md5:00", "not a certificate pin"),
    ] {
        let out = sb
            .run("init", &["--relay", url, "--pin", pin])
            .expect(USAGE);
        assert!(out.stderr.contains(says), "{url} {pin}: {out:#?}");
        assert!(!sb.store().exists(), "a refused init leaves no store");
        assert!(!sb.key().exists(), "nor a key");
    }
    let out = sb
        .run(
            "init",
            &["--relay", "quic://relay:7443", "--ca", "/nonexistent.pem"],
        )
        .expect(USAGE);
    assert!(out.stderr.contains("nonexistent.pem"), "{out:#?}");
    sb.run("init", &["--pin", &good_pin]).expect(USAGE);
    sb.run("init", &["--relay", "quic://relay:7443"])
        .expect(USAGE);
    assert!(!sb.store().exists());

    // A bad remote set keeps the remote that was there.
    sb.run(
        "init",
        &["--relay", "quic://relay:7443", "--pin", &good_pin],
    )
    .expect(OK);
    let before = std::fs::read(sb.store().join("remote.json")).unwrap();
    let out = sb
        .run("remote set", &["quic://other:1", "--pin", "sha256:zz"])
        .expect(USAGE);
    assert!(out.stderr.contains("not a certificate pin"), "{out:#?}");
    assert_eq!(
        std::fs::read(sb.store().join("remote.json")).unwrap(),
        before
    );

    // More nodes of one relay: a bad one is refused like the first, good
    // ones are kept and shown.
    let out = sb
        .run(
            "remote set",
            &[
                "quic://relay:7443",
                "--also",
                "relay2:7443",
                "--pin",
                &good_pin,
            ],
        )
        .expect(USAGE);
    assert!(out.stderr.contains("quic://HOST:PORT"), "{out:#?}");
    assert_eq!(
        std::fs::read(sb.store().join("remote.json")).unwrap(),
        before
    );
    sb.run(
        "remote set",
        &[
            "quic://relay1:7443",
            "--also",
            "quic://relay2:7443",
            "--also",
            "quic://relay3:7443",
            "--pin",
            &good_pin,
        ],
    )
    .expect(OK);
    let out = sb.run("remote show", &[]).expect(OK);
    assert!(
        out.stdout.starts_with(
            "url: quic://relay1:7443\nalso: quic://relay2:7443\nalso: quic://relay3:7443\n"
        ),
        "{out:#?}"
    );

    // A damaged remote.json says how to fix it.
    std::fs::write(sb.store().join("remote.json"), "{").unwrap();
    let out = sb.run("sync", &[]).expect(USAGE);
    assert!(out.stderr.contains("remote.json is damaged"), "{out:#?}");
}

#[test]
fn a_relay_that_is_down_fails_sync_with_4_and_never_blocks_local_writes() {
    let mut relay = Relay::start();
    let sb = Sandbox::new();
    sb.run("init", &relay.args()).expect(OK);
    relay.stop();

    sb.put("offline/1", r#""written while the relay is down""#);
    assert_eq!(
        sb.run("get", &["offline/1"]).expect(OK).stdout,
        "\"written while the relay is down\"\n"
    );
    let out = sb.run("sync", &[]).expect(REMOTE);
    assert!(
        out.stderr
            .starts_with(&format!("error: cannot reach {}", relay.url)),
        "{out:#?}"
    );
    // Status still works, and says the session is not connected.
    let status = sb.status();
    assert_eq!(status["sync"]["connected"], json!(false), "{status}");
    assert_eq!(status["sync"]["remote"], json!(relay.url), "{status}");
    assert_eq!(
        sb.run("get", &["offline/1"]).expect(OK).stdout,
        "\"written while the relay is down\"\n",
        "the local write is intact"
    );
}

#[test]
fn an_admission_secret_creates_the_store_on_a_closed_relay_and_is_never_kept() {
    let secret = "let me in";
    let relay = Relay::start_with(Admission::Secret(AdmissionSecret::new(secret).unwrap()));

    // Without the secret the relay refuses a store it does not know.
    let refused = Sandbox::new();
    refused.run("init", &relay.args()).expect(OK);
    let out = refused.run("sync", &[]).expect(REMOTE);
    assert!(out.stderr.contains("refused"), "{out:#?}");

    let sb = Sandbox::new();
    let file = write_file(&sb, "admission", &format!("{secret}\n"));
    let mut args = relay.args().to_vec();
    args.extend(["--admission-secret-file", file.to_str().unwrap()]);
    let out = sb.run("init", &args).expect(OK);
    assert!(out.stdout.contains("first sync: pushed"), "{out:#?}");
    let kept = std::fs::read_to_string(sb.store().join("remote.json")).unwrap();
    assert!(!kept.contains(secret), "{kept}");
    // Known to the relay now: later syncs need no secret.
    sb.put("k", "1");
    sb.run("sync", &[]).expect(OK);

    // The refused device can still join with the secret on its sync.
    let file = file.to_str().unwrap();
    refused
        .run("sync", &["--admission-secret-file", file])
        .expect(OK);
}

#[test]
fn sync_watch_prints_remote_changes_until_interrupted() {
    let relay = Relay::start();
    let (a, b) = pair(&relay);
    a.put("live/0", "0");
    a.run("sync", &[]).expect(OK);

    let mut watch = b.spawn("sync", &["--watch"]);
    let lines = lines(&mut watch);
    let first = lines.recv_timeout(SETTLE).unwrap();
    assert!(
        first.starts_with("pushed "),
        "the summary comes first: {first}"
    );

    a.put("live/1", r#"{"n":1}"#);
    a.put("live/2", "2");
    a.run("sync", &[]).expect(OK);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(lines.recv_timeout(SETTLE).unwrap());
    }
    seen.sort();
    assert_eq!(seen, ["live/1\t{\"n\":1}", "live/2\t2"]);

    a.run("rm", &["live/2"]).expect(OK);
    a.run("sync", &[]).expect(OK);
    assert_eq!(lines.recv_timeout(SETTLE).unwrap(), "live/2\t(deleted)");

    interrupt(&watch);
    let out = watch.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(OK), "{stderr}");

    // With --json, the summary and each change are JSON objects.
    let mut watch = b.spawn("sync", &["--watch", "--json"]);
    let lines = self::lines(&mut watch);
    let first: serde_json::Value =
        serde_json::from_str(&lines.recv_timeout(SETTLE).unwrap()).unwrap();
    assert!(first["pulled"].is_u64(), "{first}");
    a.put("live/3", "[3]");
    a.run("rm", &["live/1"]).expect(OK);
    a.run("sync", &[]).expect(OK);
    let mut seen: Vec<serde_json::Value> = (0..2)
        .map(|_| serde_json::from_str(&lines.recv_timeout(SETTLE).unwrap()).unwrap())
        .collect();
    seen.sort_by_key(|v| v["path"].as_str().unwrap().to_owned());
    assert_eq!(
        seen,
        [
            json!({"path": "live/1", "deleted": true}),
            json!({"path": "live/3", "value": [3]}),
        ]
    );
    interrupt(&watch);
    let out = watch.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(OK), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    // The store was closed cleanly: it opens at once, with what was pulled.
    assert_eq!(b.run("get", &["live/3"]).expect(OK).stdout, "[3]\n");
    b.run("get", &["live/1"]).expect(common::NOT_FOUND);
}

#[test]
fn a_device_serves_its_store_to_another_directly() {
    let a = Sandbox::new();
    a.init();
    a.put("notes/1", r#""from a""#);
    let pass = write_file(&a, "pass", "correct horse\n");
    let export = a.path().join("a.export");
    let (pass, export) = (pass.to_str().unwrap(), export.to_str().unwrap());
    a.run("key export", &["--out", export, "--passphrase-file", pass])
        .expect(OK);

    let mut served = a.spawn("serve", &["--listen", "127.0.0.1:0"]);
    let lines = lines(&mut served);
    let line = lines.recv_timeout(SETTLE).unwrap();
    let words: Vec<&str> = line.split(' ').collect();
    let ["persist", "serve", "listening", "on", addr, "pin", pin] = words[..] else {
        panic!("not the serve line: {line}");
    };
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64, "{line}");
    let url = format!("quic://{addr}");

    // Device C joins and syncs with A itself: no relay anywhere.
    let c = Sandbox::new();
    let args = [
        "--import",
        export,
        "--passphrase-file",
        pass,
        "--relay",
        &url,
        "--pin",
        pin,
    ];
    c.run("init", &args).expect(OK);
    c.run("sync", &[]).expect(OK);
    assert_eq!(c.run("get", &["notes/1"]).expect(OK).stdout, "\"from a\"\n");
    c.put("notes/3", r#""from c""#);
    let [pushed, ..] = summary(&c.run("sync", &[]).expect(OK));
    assert!(pushed >= 1);

    // A server whose certificate does not match the pin is not trusted.
    let wrong = format!("sha256:{}", "00".repeat(32));
    c.run("remote set", &[&url, "--pin", &wrong]).expect(OK);
    let out = c.run("sync", &[]).expect(REMOTE);
    assert!(out.stderr.contains(&url), "{out:#?}");

    // The store is in use while served; SIGTERM stops serving cleanly.
    let out = a.run("serve", &["--listen", "127.0.0.1:0"]).expect(1);
    assert!(out.stderr.contains("in use"), "{out:#?}");
    terminate(&served);
    let out = served.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(OK), "{stderr}");
    assert_eq!(a.run("get", &["notes/3"]).expect(OK).stdout, "\"from c\"\n");
}
