//! What the CLI tests share: a sandbox per user, and runs of the binary.
//!
//! Every run gets its own temp dir as store, key directory, `HOME` and
//! `XDG_CONFIG_HOME`, and passes `--key-file` inside it, so nothing reaches
//! the real home directory or the OS keychain.

// Each test crate uses its own part of these helpers.
#![allow(dead_code)]

pub(crate) mod relay;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tempfile::TempDir;

pub(crate) const OK: i32 = 0;
pub(crate) const USAGE: i32 = 2;
pub(crate) const NOT_FOUND: i32 = 3;
pub(crate) const REMOTE: i32 = 4;

/// One user's sandbox: a temp dir holding the store and its keyfile.
pub(crate) struct Sandbox {
    dir: TempDir,
}

/// What a run of `persist` left.
#[derive(Debug)]
pub(crate) struct Out {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Out {
    /// Asserts the exit code, showing everything the run printed if wrong.
    #[track_caller]
    pub(crate) fn expect(self, code: i32) -> Out {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        if code != OK {
            assert!(
                self.stderr.starts_with("error: "),
                "no error line: {self:#?}"
            );
            assert!(!self.stderr.contains("panicked"), "panic: {self:#?}");
        }
        self
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

impl Sandbox {
    pub(crate) fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn store(&self) -> PathBuf {
        self.path().join("store")
    }

    pub(crate) fn key(&self) -> PathBuf {
        self.path().join("keys").join("device.key")
    }

    /// `persist` with a clean environment pointing into the sandbox, and
    /// neither --store nor --key-file.
    pub(crate) fn bare(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_persist"));
        cmd.env("HOME", self.path())
            .env("XDG_CONFIG_HOME", self.path())
            .env_remove("PERSIST_STORE")
            .env_remove("PERSIST_KEY_FILE")
            .env_remove("RUST_LOG")
            .env_remove("DBUS_SESSION_BUS_ADDRESS");
        cmd
    }

    /// `persist SUBCOMMAND --store S --key-file K ARGS...`; SUBCOMMAND may
    /// be several words (`"key export"`).
    pub(crate) fn run(&self, subcommand: &str, args: &[&str]) -> Out {
        self.run_with(subcommand, &self.store(), &self.key(), args)
    }

    pub(crate) fn run_with(
        &self,
        subcommand: &str,
        store: &Path,
        key: &Path,
        args: &[&str],
    ) -> Out {
        let mut cmd = self.bare();
        cmd.args(subcommand.split(' '))
            .arg("--store")
            .arg(store)
            .arg("--key-file")
            .arg(key)
            .args(args);
        output(&mut cmd)
    }

    /// Like [`Sandbox::run_with`], with `input` on stdin (a pipe, not a
    /// terminal).
    pub(crate) fn run_with_stdin(
        &self,
        subcommand: &str,
        store: &Path,
        key: &Path,
        args: &[&str],
        input: &[u8],
    ) -> Out {
        use std::io::Write as _;
        use std::process::Stdio;

        let mut cmd = self.bare();
        cmd.args(subcommand.split(' '))
            .arg("--store")
            .arg(store)
            .arg("--key-file")
            .arg(key)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // Errors are ignored: the child may refuse before reading it all.
        let _ = stdin.write_all(input);
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }

    /// `persist SUBCOMMAND --store S --key-file K ARGS...` started in the
    /// background, with stdout and stderr piped, for the commands that run
    /// until stopped (`sync --watch`, `serve`).
    pub(crate) fn spawn(&self, subcommand: &str, args: &[&str]) -> std::process::Child {
        use std::process::Stdio;

        let mut cmd = self.bare();
        cmd.args(subcommand.split(' '))
            .arg("--store")
            .arg(self.store())
            .arg("--key-file")
            .arg(self.key())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    }

    pub(crate) fn init(&self) -> Out {
        self.run("init", &[]).expect(OK)
    }

    pub(crate) fn put(&self, path: &str, json: &str) {
        let out = self.run("put", &[path, json]).expect(OK);
        assert_eq!(out.stdout, "", "put prints nothing");
    }

    pub(crate) fn status(&self) -> Value {
        self.run("status", &["--json"]).expect(OK).json()
    }
}

pub(crate) fn output(cmd: &mut Command) -> Out {
    let out = cmd.output().unwrap();
    Out {
        // A signal (no code) shows as -1 and fails every expectation.
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

pub(crate) fn is_hex_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}
