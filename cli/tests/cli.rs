//! The `persist` binary, driven as a user's shell would: arguments in,
//! stdout, stderr and the exit code out.
//!
//! Every run gets its own temp dir as store, key directory, `HOME` and
//! `XDG_CONFIG_HOME`, and passes `--key-file` inside it, so nothing reaches
//! the real home directory or the OS keychain.

// Helpers outside `#[test]` functions are test code too.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;

use serde_json::json;

use common::{NOT_FOUND, OK, Sandbox, USAGE, is_hex_id, output};

#[test]
fn init_prints_the_ids_and_where_the_key_lives() {
    let sb = Sandbox::new();
    let out = sb.run("init", &["--name", "laptop"]).expect(OK);
    let field = |label: &str| -> String {
        let line = out.stdout.lines().find(|l| l.starts_with(label));
        line.unwrap_or_else(|| panic!("no {label} in {out:#?}"))[label.len()..]
            .trim()
            .to_owned()
    };
    let store_id = field("store id:");
    let device = field("device id:");
    let device_id = device.split(' ').next().unwrap();
    assert!(is_hex_id(&store_id), "{out:#?}");
    assert!(is_hex_id(device_id), "{out:#?}");
    assert!(device.ends_with("(laptop)"), "{out:#?}");
    assert_eq!(
        field("device key:"),
        format!("keyfile {}", sb.key().display())
    );
    assert!(sb.key().is_file(), "the keyfile was made where asked");
    assert!(sb.store().join("persist.redb").is_file());

    let status = sb.status();
    assert_eq!(status["store_id"], json!(store_id));
    assert_eq!(status["device_id"], json!(device_id));
    assert_eq!(status["name"], json!("laptop"));
}

#[test]
fn init_twice_is_refused_and_keeps_the_store() {
    let sb = Sandbox::new();
    sb.init();
    sb.put("kept", "1");
    let out = sb.run("init", &[]).expect(USAGE);
    assert!(out.stderr.contains("already exists"), "{out:#?}");
    assert!(
        out.stderr.contains(&sb.store().display().to_string()),
        "{out:#?}"
    );
    // Even with another keyfile, which would otherwise be created.
    let other_key = sb.path().join("other.key");
    sb.run_with("init", &sb.store(), &other_key, &[])
        .expect(USAGE);
    assert!(!other_key.exists());
    assert_eq!(sb.run("get", &["kept"]).expect(OK).stdout, "1\n");
}

#[test]
fn failed_init_leaves_no_store_behind() {
    let sb = Sandbox::new();
    sb.init();
    // The keyfile is taken by the first store: the second init must fail
    // without leaving a database that later commands would treat as a store.
    let second = sb.path().join("second");
    let out = sb.run_with("init", &second, &sb.key(), &[]).expect(USAGE);
    assert!(out.stderr.contains("already exists"), "{out:#?}");
    assert!(!second.join("persist.redb").exists());
    let out = sb.run_with("get", &second, &sb.key(), &["x"]).expect(USAGE);
    assert!(out.stderr.contains("no store at"), "{out:#?}");
}

#[test]
fn put_then_get_round_trips_json_values() {
    let sb = Sandbox::new();
    sb.init();
    let values = [
        json!({"name": "Ada", "tags": ["math", "engines"], "nested": {"deep": {"x": null}}}),
        json!([1, "two", 3.5, false, null, [], {}]),
        json!("plain string"),
        json!(""),
        json!(0),
        json!(-42),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(6.02e23),
        json!(-0.125),
        json!(true),
        json!(null),
        json!({"émoji": "🎉 ✓ 日本語", "ключ": "значение"}),
    ];
    for (i, value) in values.iter().enumerate() {
        let path = format!("values/{i}");
        sb.put(&path, &value.to_string());
        let out = sb.run("get", &[&path]).expect(OK);
        assert_eq!(out.json(), *value, "{path}");
        assert_eq!(out.stdout.lines().count(), 1, "one line: {out:#?}");
        assert_eq!(out.stdout, format!("{value}\n"), "compact JSON");
    }
    // Overwrite, unicode in the path, a value starting with '-'.
    sb.put("values/0", "\"second\"");
    assert_eq!(
        sb.run("get", &["values/0"]).expect(OK).stdout,
        "\"second\"\n"
    );
    sb.put("ünïcode/パス", "-7");
    assert_eq!(sb.run("get", &["ünïcode/パス"]).expect(OK).stdout, "-7\n");
    // Pretty input is accepted and printed compact.
    sb.put("pretty", "{\n  \"a\": [\n    1,\n    2\n  ]\n}\n");
    assert_eq!(
        sb.run("get", &["pretty"]).expect(OK).stdout,
        "{\"a\":[1,2]}\n"
    );
}

#[test]
fn get_of_a_missing_path_exits_3() {
    let sb = Sandbox::new();
    sb.init();
    let out = sb.run("get", &["nothing/here"]).expect(NOT_FOUND);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.contains("no record at \"nothing/here\""),
        "{out:#?}"
    );
}

#[test]
fn rm_deletes_and_a_missing_path_exits_3() {
    let sb = Sandbox::new();
    sb.init();
    sb.put("a", "1");
    sb.put("b", "2");
    let out = sb.run("rm", &["a"]).expect(OK);
    assert_eq!(out.stdout, "");
    sb.run("get", &["a"]).expect(NOT_FOUND);
    assert_eq!(sb.run("get", &["b"]).expect(OK).stdout, "2\n");
    let out = sb.run("rm", &["a"]).expect(NOT_FOUND);
    assert!(out.stderr.contains("no record at \"a\""), "{out:#?}");
    sb.run("rm", &["never"]).expect(NOT_FOUND);
    // A deleted path can be written again.
    sb.put("a", "3");
    assert_eq!(sb.run("get", &["a"]).expect(OK).stdout, "3\n");
}

#[test]
fn ls_prints_sorted_path_tab_json_lines() {
    let sb = Sandbox::new();
    sb.init();
    assert_eq!(sb.run("ls", &[]).expect(OK).stdout, "");
    sb.put("users/2", r#"{"name":"Bo"}"#);
    sb.put("notes/b", r#""second""#);
    sb.put("users/10", "[1, 2]");
    sb.put("notes/a", r#"{ "text" : "first" }"#);
    sb.put("users/1", "null");
    sb.put("gone", "0");
    sb.run("rm", &["gone"]).expect(OK);

    let all = sb.run("ls", &[]).expect(OK).stdout;
    assert_eq!(
        all,
        "notes/a\t{\"text\":\"first\"}\n\
         notes/b\t\"second\"\n\
         users/1\tnull\n\
         users/10\t[1,2]\n\
         users/2\t{\"name\":\"Bo\"}\n"
    );
    let users = sb.run("ls", &["users/"]).expect(OK).stdout;
    assert_eq!(
        users,
        "users/1\tnull\nusers/10\t[1,2]\nusers/2\t{\"name\":\"Bo\"}\n"
    );
    let users_1 = sb.run("ls", &["users/1"]).expect(OK).stdout;
    assert_eq!(users_1, "users/1\tnull\nusers/10\t[1,2]\n");
    assert_eq!(sb.run("ls", &["zzz"]).expect(OK).stdout, "");
}

#[test]
fn status_json_counts_records_through_puts_and_deletes() {
    let sb = Sandbox::new();
    sb.init();
    let check = |records: u64, sealed: u64| {
        let status = sb.status();
        for field in ["store_id", "device_id"] {
            assert!(is_hex_id(status[field].as_str().unwrap()), "{status}");
        }
        assert_eq!(status["records"], json!(records), "{status}");
        assert_eq!(status["encrypted"], json!(true), "{status}");
        assert_eq!(
            status["key_source"],
            json!(format!("keyfile {}", sb.key().display())),
            "{status}"
        );
        let current = status["current_epoch"].as_u64().unwrap();
        let epochs = status["epochs"].as_array().unwrap();
        assert_eq!(epochs.len(), 1, "{status}");
        assert_eq!(epochs[0]["epoch"], json!(current), "{status}");
        assert_eq!(epochs[0]["state"], json!("current"), "{status}");
        // Epoch counts include deletions: a deleted record is still sealed.
        assert_eq!(epochs[0]["records"], json!(sealed), "{status}");
    };
    check(0, 0);
    sb.put("a", "1");
    sb.put("b", "2");
    sb.put("c", "3");
    check(3, 3);
    sb.put("a", "4");
    check(3, 3);
    sb.run("rm", &["a"]).expect(OK);
    check(2, 3);
    sb.run("rm", &["b"]).expect(OK);
    check(1, 3);

    let text = sb.run("status", &[]).expect(OK).stdout;
    let store_id = sb.status()["store_id"].as_str().unwrap().to_owned();
    assert!(text.contains(&store_id), "{text}");
    assert!(text.contains("records:    1"), "{text}");
    assert!(text.contains(&sb.key().display().to_string()), "{text}");
}

#[test]
fn bad_json_exits_2_and_stores_nothing() {
    let sb = Sandbox::new();
    sb.init();
    for bad in [
        "{",
        "not json",
        "'single'",
        "[1,]",
        "",
        "{\"a\":1} trailing",
        "NaN",
    ] {
        let out = sb.run("put", &["p", bad]).expect(USAGE);
        assert!(out.stderr.contains("not valid JSON"), "{bad:?}: {out:#?}");
        assert!(out.stderr.contains("caused by:"), "parser detail: {out:#?}");
    }
    sb.run("get", &["p"]).expect(NOT_FOUND);
    assert_eq!(sb.status()["records"], json!(0));
}

#[test]
fn invalid_paths_exit_2_with_the_engine_message() {
    let sb = Sandbox::new();
    sb.init();
    let too_long = "x".repeat(1025);
    // A NUL cannot cross argv (exec takes C strings: `Command` refuses it),
    // so other control characters stand in for it; the engine refuses all.
    let cases = [
        ("", "must not be empty"),
        (
            too_long.as_str(),
            "at most 1024 bytes of UTF-8, this one is 1025",
        ),
        ("a\u{1}b", "must not contain control characters"),
        ("tab\there", "must not contain control characters"),
        ("line\nbreak", "must not contain control characters"),
    ];
    for (path, message) in cases {
        for (command, args) in [
            ("put", vec![path, "1"]),
            ("get", vec![path]),
            ("rm", vec![path]),
        ] {
            let out = sb.run(command, &args).expect(USAGE);
            assert!(
                out.stderr.contains("invalid path"),
                "{command} {path:?}: {out:#?}"
            );
            assert!(out.stderr.contains(message), "{command} {path:?}: {out:#?}");
        }
    }
    // 1024 bytes is allowed.
    let longest = "y".repeat(1024);
    sb.put(&longest, "true");
    assert_eq!(sb.run("get", &[&longest]).expect(OK).stdout, "true\n");
    assert!(sb.bare().arg("get").arg("a\0b").output().is_err());
}

#[test]
fn commands_on_a_dir_without_a_store_exit_2_and_create_nothing() {
    let sb = Sandbox::new();
    let empty = sb.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let missing = sb.path().join("missing");
    for dir in [&empty, &missing] {
        for (command, args) in [
            ("get", vec!["a"]),
            ("put", vec!["a", "1"]),
            ("rm", vec!["a"]),
            ("ls", vec![]),
            ("status", vec![]),
            ("status", vec!["--json"]),
        ] {
            let out = sb.run_with(command, dir, &sb.key(), &args).expect(USAGE);
            let expected = format!(
                "no store at {0}: run `persist init --store {0}`",
                dir.display()
            );
            assert!(out.stderr.contains(&expected), "{command}: {out:#?}");
            assert_eq!(out.stdout, "");
        }
    }
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    assert!(!missing.exists());
    assert!(!sb.key().exists(), "no key was made");
}

#[test]
fn another_stores_key_exits_2_naming_the_key() {
    let sb = Sandbox::new();
    sb.init();
    sb.put("secret", "\"s\"");
    let other_store = sb.path().join("other-store");
    let other_key = sb.path().join("other.key");
    sb.run_with("init", &other_store, &other_key, &[])
        .expect(OK);

    let out = sb
        .run_with("get", &sb.store(), &other_key, &["secret"])
        .expect(USAGE);
    assert!(out.stderr.contains("device key"), "{out:#?}");
    assert!(
        out.stderr.contains(&other_key.display().to_string()),
        "{out:#?}"
    );
    assert!(out.stderr.contains("does not open the store"), "{out:#?}");
    assert_eq!(out.stdout, "");
    // Writes are refused the same way, and the data is untouched.
    sb.run_with("put", &sb.store(), &other_key, &["secret", "1"])
        .expect(USAGE);
    assert_eq!(sb.run("get", &["secret"]).expect(OK).stdout, "\"s\"\n");

    let missing_key = sb.path().join("nowhere.key");
    let out = sb
        .run_with("get", &sb.store(), &missing_key, &["secret"])
        .expect(USAGE);
    assert!(out.stderr.contains("no device key"), "{out:#?}");
}

#[test]
fn a_keyfile_others_can_read_exits_2_with_the_chmod_fix() {
    let sb = Sandbox::new();
    sb.init();
    std::fs::set_permissions(sb.key(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = sb.run("get", &["a"]).expect(USAGE);
    assert!(out.stderr.contains("chmod 600"), "{out:#?}");
    assert!(out.stderr.contains("mode 644"), "{out:#?}");
    std::fs::set_permissions(sb.key(), std::fs::Permissions::from_mode(0o600)).unwrap();
    sb.run("get", &["a"]).expect(NOT_FOUND);
}

#[test]
fn env_vars_stand_in_for_the_flags() {
    let sb = Sandbox::new();
    let with_env = |args: &[&str]| {
        let mut cmd = sb.bare();
        cmd.env("PERSIST_STORE", sb.store())
            .env("PERSIST_KEY_FILE", sb.key())
            .args(args);
        output(&mut cmd)
    };
    let out = with_env(&["init"]).expect(OK);
    assert!(
        out.stdout.contains(&sb.key().display().to_string()),
        "{out:#?}"
    );
    with_env(&["put", "k", "{\"v\":1}"]).expect(OK);
    assert_eq!(with_env(&["get", "k"]).expect(OK).stdout, "{\"v\":1}\n");
    assert_eq!(with_env(&["ls"]).expect(OK).stdout, "k\t{\"v\":1}\n");
    assert_eq!(
        with_env(&["status", "--json"]).expect(OK).json()["records"],
        json!(1)
    );
    with_env(&["rm", "k"]).expect(OK);
    with_env(&["get", "k"]).expect(NOT_FOUND);
    // A flag wins over the environment.
    let elsewhere = sb.path().join("elsewhere");
    let mut cmd = sb.bare();
    cmd.env("PERSIST_STORE", sb.store())
        .env("PERSIST_KEY_FILE", sb.key())
        .arg("get")
        .arg("--store")
        .arg(&elsewhere)
        .arg("k");
    let out = output(&mut cmd).expect(USAGE);
    assert!(
        out.stderr.contains(&elsewhere.display().to_string()),
        "{out:#?}"
    );
}

#[test]
fn missing_store_argument_is_a_usage_error() {
    let sb = Sandbox::new();
    let out = output(sb.bare().args(["get", "k"]));
    assert_eq!(out.code, USAGE, "{out:#?}");
    assert!(out.stderr.contains("--store"), "{out:#?}");
    let help = output(sb.bare().args(["get", "--help"]));
    assert_eq!(help.code, OK, "{help:#?}");
    assert!(help.stdout.contains("PERSIST_STORE"), "{help:#?}");
    assert!(help.stdout.contains("PERSIST_KEY_FILE"), "{help:#?}");
}

#[test]
fn logs_stay_off_stdout() {
    let sb = Sandbox::new();
    sb.init();
    sb.put("k", "[1]");
    let mut cmd = sb.bare();
    cmd.env("RUST_LOG", "debug")
        .arg("get")
        .arg("--store")
        .arg(sb.store())
        .arg("--key-file")
        .arg(sb.key())
        .arg("k");
    let out = output(&mut cmd).expect(OK);
    assert_eq!(out.stdout, "[1]\n");
    assert!(
        out.stderr.contains("store open"),
        "logs reach stderr: {out:#?}"
    );
}

#[test]
fn put_reads_the_value_from_stdin_with_a_dash() {
    let sb = Sandbox::new();
    sb.init();
    let put_stdin = |path: &str, input: &[u8]| {
        sb.run_with_stdin("put", &sb.store(), &sb.key(), &[path, "-"], input)
    };
    // Larger than one command-line argument may be (128 KiB on Linux).
    let big = json!({ "blob": "x".repeat(1 << 20) });
    put_stdin("big", big.to_string().as_bytes()).expect(OK);
    assert_eq!(sb.run("get", &["big"]).expect(OK).json(), big);

    let too_big = json!("y".repeat(9 << 20)).to_string();
    let out = put_stdin("too-big", too_big.as_bytes()).expect(USAGE);
    assert!(out.stderr.contains("the limit is 8388608"), "{out:#?}");
    let out = put_stdin("bad", b"{").expect(USAGE);
    assert!(out.stderr.contains("not valid JSON"), "{out:#?}");
    sb.run("get", &["too-big"]).expect(NOT_FOUND);
}
