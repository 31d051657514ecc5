//! A relay database damaged by something other than redb (one garbled 4 KiB
//! page at a time) never makes the relay backend panic: the open is refused
//! with a typed error and leaves the file as it was, or every operation
//! returns `Ok` or a typed error.
//!
//! redb itself may panic on such a file; its panic message can show on
//! stderr (the panic hook is global and left alone), but the panic never
//! leaves this crate.

// Test helpers unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use persist_core::DeviceId;
use persist_storage::relay::conformance::{fingerprint, incoming, locator, precedence, store};
use persist_storage::relay::{RedbRelay, RelayBackend, RelayError, RelayOpenError};

const PAGE: usize = 4096;

/// A cleanly closed relay database: three stores with superseded and live
/// entries and a mailbox, written over several commits so redb has freed
/// pages too.
fn pristine(dir: &Path) -> Vec<u8> {
    let path = dir.join("pristine.redb");
    let relay = RedbRelay::open(&path).unwrap();
    block_on(async {
        for n in 1..=3 {
            relay
                .open_store(&store(n), &fingerprint(n), true)
                .await
                .unwrap();
            for round in 0..4u64 {
                let entries = (0..40)
                    .map(|i| incoming(locator(i), precedence(round, 1, 1), &[i; 200]))
                    .collect();
                relay.append(&store(n), entries).await.unwrap();
            }
            for k in 0..5u8 {
                relay
                    .mailbox_put(&store(n), &DeviceId([k; 16]), vec![k; 300])
                    .await
                    .unwrap();
            }
        }
    });
    drop(relay);
    std::fs::read(&path).unwrap()
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

/// Runs one call of the backend, failing the test if a panic escapes it.
fn no_panic<T>(what: &str, call: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(value) => value,
        Err(_) => panic!("{what}: a panic escaped the relay backend"),
    }
}

/// What one damaged file did.
#[derive(Debug, Default)]
struct Seen {
    refused_at_open: bool,
    errors: usize,
}

impl Seen {
    fn saw<T>(&mut self, result: &Result<T, RelayError>) {
        if let Err(err) = result {
            self.errors += 1;
            if let RelayError::Unavailable(text) = err {
                assert!(text.contains("relay database"), "{text}");
            }
        }
    }
}

/// Opens the damaged file and calls every operation on it.
fn sweep(path: &Path) -> Seen {
    let mut seen = Seen::default();
    let before = std::fs::read(path).unwrap();
    let relay = match no_panic("open", || RedbRelay::open(path)) {
        Ok(relay) => relay,
        Err(err) => {
            assert!(matches!(err, RelayOpenError::Corrupted { .. }), "{err:?}");
            assert!(
                std::fs::read(path).unwrap() == before,
                "a refused open changed the damaged file"
            );
            seen.refused_at_open = true;
            return seen;
        }
    };
    for n in 1..=3 {
        let opened = no_panic("open_store", || {
            block_on(relay.open_store(&store(n), &fingerprint(n), false))
        });
        seen.saw(&opened);
        let mut since = 0;
        for _ in 0..200 {
            let page = no_panic("pull", || block_on(relay.pull(&store(n), since, 16, 4096)));
            seen.saw(&page);
            match page {
                Ok(page) if page.more && page.cursor > since => since = page.cursor,
                _ => break,
            }
        }
        let head = no_panic("head", || block_on(relay.head(&store(n))));
        seen.saw(&head);
        let entries = vec![incoming(locator(7), precedence(9, 1, 1), b"new")];
        let appended = no_panic("append", || block_on(relay.append(&store(n), entries)));
        seen.saw(&appended);
        let mailbox = DeviceId([1; 16]);
        let put = no_panic("mailbox_put", || {
            block_on(relay.mailbox_put(&store(n), &mailbox, vec![1; 10]))
        });
        seen.saw(&put);
        let fetched = no_panic("mailbox_fetch", || {
            block_on(relay.mailbox_fetch(&store(n), &mailbox, 0, 100))
        });
        seen.saw(&fetched);
        let acked = no_panic("mailbox_ack", || {
            block_on(relay.mailbox_ack(&store(n), &mailbox, 1))
        });
        seen.saw(&acked);
        drop(no_panic("watch", || relay.watch(&store(n))));
    }
    let stats = no_panic("stats", || block_on(relay.stats()));
    seen.saw(&stats);
    no_panic("drop", || drop(relay));
    seen
}

#[test]
fn no_damaged_page_makes_the_backend_panic() {
    let dir = tempfile::tempdir().unwrap();
    let image = pristine(dir.path());
    let path = dir.path().join("damaged.redb");
    let (mut refused, mut erred) = (0, 0);
    for page in 0..image.len().div_ceil(PAGE) {
        let mut damaged = image.clone();
        let end = ((page + 1) * PAGE).min(damaged.len());
        for (k, byte) in damaged[page * PAGE..end].iter_mut().enumerate() {
            *byte = (k as u8).wrapping_mul(151).wrapping_add(0x3b);
        }
        std::fs::write(&path, &damaged).unwrap();
        let seen = sweep(&path);
        refused += usize::from(seen.refused_at_open);
        erred += usize::from(seen.errors > 0);
    }
    eprintln!(
        "DBG pages={} refused={refused} erred={erred}",
        image.len().div_ceil(PAGE)
    );
    assert!(
        refused + erred > 0,
        "some damage must be noticed, at open or by an operation"
    );
}
