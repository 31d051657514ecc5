//! Scanning what a relay stored or logged for secrets: a corpus of
//! haystacks and every encoding a secret could show up under; and polling.

// Test code: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};

/// Bytes to search, as text with one char per byte (Latin-1), so that the
/// standard library's substring search does the work: a byte string occurs
/// in a haystack exactly when its Latin-1 text occurs in the haystack's.
#[derive(Default)]
pub struct Corpus {
    /// The haystacks, one char per byte, separated by U+0100.
    pub text: String,
    /// Bytes read in all.
    pub bytes: usize,
}

impl Corpus {
    /// Every regular file at or under `path`, recursively.
    pub fn files_under(path: &Path) -> Corpus {
        let mut corpus = Corpus::default();
        let mut todo = vec![path.to_path_buf()];
        while let Some(p) = todo.pop() {
            let meta = std::fs::metadata(&p).unwrap();
            if meta.is_dir() {
                for entry in std::fs::read_dir(&p).unwrap() {
                    todo.push(entry.unwrap().path());
                }
            } else if meta.is_file() {
                corpus.add(&std::fs::read(&p).unwrap());
            }
        }
        corpus
    }

    /// One more haystack: no match spans two of them.
    pub fn add(&mut self, content: &[u8]) {
        self.bytes += content.len();
        self.text.extend(content.iter().map(|&b| char::from(b)));
        self.text.push('\u{100}');
    }

    /// Which needles occur.
    pub fn hits(&self, needles: &[(String, Vec<u8>)]) -> Vec<String> {
        needles
            .iter()
            .filter(|(_, needle)| {
                let needle: String = needle.iter().map(|&b| char::from(b)).collect();
                self.text.contains(&needle)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// Every needle under which `secret` could show up: raw, hex in both cases,
/// and the part of its standard and URL-safe base64 that does not depend on
/// the bytes around it, at each of the three alignments.
pub fn needles(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("raw".to_owned(), secret.to_vec()),
        ("hex".to_owned(), hex::encode(secret).into_bytes()),
        ("HEX".to_owned(), hex::encode_upper(secret).into_bytes()),
    ];
    for (name, engine) in [("base64", &STANDARD), ("base64url", &URL_SAFE)] {
        for prefix in 0..3usize {
            let mut input = vec![0u8; prefix];
            input.extend_from_slice(secret);
            let text = engine.encode(&input);
            let first_group = prefix.div_ceil(3);
            let end_group = (prefix + secret.len()) / 3;
            assert!(end_group > first_group + 8, "a long enough needle");
            let middle = &text.as_bytes()[4 * first_group..4 * end_group];
            out.push((format!("{name}@{prefix}"), middle.to_vec()));
        }
    }
    out
}

/// Polls `check` every 20 ms until it gives a value, for at most `limit`.
pub fn poll<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    const POLL: Duration = Duration::from_millis(20);
    for _ in 0..limit.as_millis() / POLL.as_millis() {
        if let Some(value) = check() {
            return Some(value);
        }
        std::thread::sleep(POLL);
    }
    None
}
