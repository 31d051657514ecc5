//! Nondeterminism outside the environment seam fails the build's tests.
//!
//! `clippy.toml` bans these calls by path; this scan is the belt to its
//! braces: it also catches code clippy does not lint (e.g. a crate built
//! without clippy, a macro body) and calls made through a re-export.
//!
//! Allowed places: files named `env.rs`, `clock.rs`, `rng.rs`, `entropy.rs`
//! (the seam itself); anything under `tests/`, `benches/` or `examples/`;
//! and a line carrying, or preceded within two lines by, a
//! `// allow-nondeterminism: why` comment. Comment lines are not code and
//! are not scanned.

use std::fs;
use std::path::{Path, PathBuf};

/// What nondeterminism looks like in source.
const BANNED: &[&str] = &[
    "Instant::now(",
    "SystemTime::now(",
    "thread_rng(",
    "rand::rng(",
    "OsRng",
    "SysRng",
    "getrandom::fill",
    "spawn_blocking",
    "std::thread::spawn",
    "thread::Builder",
];

/// The marker that justifies an exception.
const ALLOW_MARKER: &str = "// allow-nondeterminism:";

/// How many lines above a hit an allow marker still covers.
const ALLOW_LINES_ABOVE: usize = 2;

/// Files that implement the environment seam.
const SEAM_FILES: &[&str] = &["env.rs", "clock.rs", "rng.rs", "entropy.rs"];

/// Folders whose code never runs in production.
const EXEMPT_DIRS: &[&str] = &["/tests/", "/benches/", "/examples/"];

/// One banned call in a file.
#[derive(Debug, PartialEq, Eq)]
struct Hit {
    line: usize,
    pattern: &'static str,
    text: String,
}

/// Whether the file at `rel` (relative to the workspace root, `/`-separated)
/// may use banned calls at all.
fn path_allowed(rel: &str) -> bool {
    let rooted = format!("/{rel}");
    let file_name = rooted.rsplit('/').next().unwrap_or_default();
    SEAM_FILES.contains(&file_name) || EXEMPT_DIRS.iter().any(|d| rooted.contains(d))
}

/// The banned calls in `source` that no allow marker covers.
fn offending_lines(source: &str) -> Vec<Hit> {
    let lines: Vec<&str> = source.lines().collect();
    let mut hits = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let Some(pattern) = BANNED.iter().find(|p| line.contains(*p)) else {
            continue;
        };
        let covered = lines[i.saturating_sub(ALLOW_LINES_ABOVE)..=i]
            .iter()
            .any(|l| l.contains(ALLOW_MARKER));
        if !covered {
            hits.push(Hit {
                line: i + 1,
                pattern,
                text: line.trim().to_owned(),
            });
        }
    }
    hits
}

/// Every `.rs` file under `dir`, skipping build output and hidden folders.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("directory entry");
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if kind.is_file() && name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_nondeterminism_outside_the_environment_seam() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the simulations crate lives inside the workspace");
    let mut files = Vec::new();
    rust_files(root, &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("core/src/lib.rs")),
        "the walk must reach the workspace's crates (root {})",
        root.display()
    );

    let mut report = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(root)
            .expect("walked from root")
            .to_string_lossy()
            .replace('\\', "/");
        if path_allowed(&rel) {
            continue;
        }
        let source = fs::read_to_string(file).unwrap_or_else(|e| panic!("read {rel}: {e}"));
        for hit in offending_lines(&source) {
            report.push(format!(
                "{rel}:{}: `{}` in: {}",
                hit.line, hit.pattern, hit.text
            ));
        }
    }
    assert!(
        report.is_empty(),
        "nondeterminism outside the environment seam (inject it through Env, or justify it \
         with `{ALLOW_MARKER} why` on the line or the {ALLOW_LINES_ABOVE} above):\n{}",
        report.join("\n")
    );
}

#[test]
fn the_matcher_catches_an_offending_snippet() {
    let snippet = "\
fn tick() -> u64 {
    let started = std::time::Instant::now();
    let mut rng = rand::thread_rng();
    std::thread::spawn(|| ());
    0
}
";
    let hits = offending_lines(snippet);
    let found: Vec<(usize, &str)> = hits.iter().map(|h| (h.line, h.pattern)).collect();
    assert_eq!(
        found,
        [
            (2, "Instant::now("),
            (3, "thread_rng("),
            (4, "std::thread::spawn")
        ]
    );
}

#[test]
fn the_matcher_honours_allow_markers_within_two_lines_only() {
    let snippet = "\
// allow-nondeterminism: covers the next two lines
let a = SystemTime::now();
let b = OsRng;
let c = tokio::task::spawn_blocking(f);
let d = Instant::now(); // allow-nondeterminism: on the line itself
// Instant::now() in a comment is not a call
";
    let hits = offending_lines(snippet);
    let found: Vec<(usize, &str)> = hits.iter().map(|h| (h.line, h.pattern)).collect();
    assert_eq!(
        found,
        [(4, "spawn_blocking")],
        "line 4 is three lines below the marker"
    );
}

#[test]
fn seam_files_and_test_folders_are_exempt_and_nothing_else() {
    for ok in [
        "engine/src/env.rs",
        "core/src/clock.rs",
        "x/src/rng.rs",
        "x/src/entropy.rs",
        "engine/tests/open.rs",
        "engine/benches/store.rs",
        "cli/examples/demo.rs",
        "tests/top_level.rs",
    ] {
        assert!(path_allowed(ok), "{ok} should be exempt");
    }
    for banned in [
        "engine/src/store.rs",
        "actors/src/environment.rs",
        "core/src/env.rs.bak.rs",
        "simulations/src/tests_helpers.rs",
    ] {
        assert!(!path_allowed(banned), "{banned} should be scanned");
    }
}
