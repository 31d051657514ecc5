//! The trace hash: SHA-256 over everything a run did and observed.
//!
//! Every event is fed to the hash as a tag byte followed by its fields, each
//! prefixed by its length, so that no two different event sequences feed the
//! same bytes. The seed itself is deliberately not hashed: two seeds must
//! differ because their runs differ, not because their inputs were labelled.

use std::fmt;

use sha2::{Digest, Sha256};

/// Domain separation for the trace format; bump it when events change.
const TRACE_DOMAIN: &[u8] = b"persist-sim/trace/v1";

/// What kind of event a trace entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The clock moved forward; one field: milliseconds (u64, big-endian).
    Advance,
    /// A put; fields: path, value.
    Put,
    /// A delete; field: path.
    Delete,
    /// A get; fields: path, then the value seen (absent: no field).
    Get,
    /// A listing; fields: prefix, then path and value of each entry.
    List,
    /// The final database image (in-memory runs only); field: its bytes.
    Database,
    /// Something a multi-device workload did or saw, as one line of text
    /// (which device, which operation, what came back).
    Note,
}

impl Event {
    fn tag(self) -> u8 {
        match self {
            Event::Advance => 1,
            Event::Put => 2,
            Event::Delete => 3,
            Event::Get => 4,
            Event::List => 5,
            Event::Database => 6,
            Event::Note => 7,
        }
    }
}

/// A running trace.
#[derive(Clone)]
pub struct Trace {
    hasher: Sha256,
    events: u64,
    /// One readable line per event, when asked for (`replay --trace`).
    log: Option<Vec<String>>,
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Trace {
    /// An empty trace.
    pub fn new() -> Self {
        let mut hasher = Sha256::new();
        hasher.update(TRACE_DOMAIN);
        Self {
            hasher,
            events: 0,
            log: None,
        }
    }

    /// An empty trace that also keeps a readable line per event.
    pub fn logging() -> Self {
        Self {
            log: Some(Vec::new()),
            ..Self::new()
        }
    }

    /// Adds a [`Event::Note`].
    pub fn note(&mut self, line: impl Into<String>) {
        let line = line.into();
        self.record(Event::Note, &[line.as_bytes()]);
    }

    /// The readable lines so far (empty unless made with [`Trace::logging`]).
    pub fn lines(&self) -> &[String] {
        self.log.as_deref().unwrap_or_default()
    }

    /// Adds one event with its fields.
    pub fn record(&mut self, event: Event, fields: &[&[u8]]) {
        self.hasher.update([event.tag()]);
        self.hasher.update((fields.len() as u64).to_be_bytes());
        for field in fields {
            self.hasher.update((field.len() as u64).to_be_bytes());
            self.hasher.update(field);
        }
        self.events += 1;
        if let Some(log) = &mut self.log {
            let line = match (event, fields) {
                (Event::Note, [text]) => String::from_utf8_lossy(text).into_owned(),
                (Event::Advance, [ms]) if ms.len() == 8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(ms);
                    format!("+{}ms", u64::from_be_bytes(b))
                }
                _ => {
                    let shown: Vec<String> = fields
                        .iter()
                        .map(|f| {
                            let text = String::from_utf8_lossy(f);
                            text.chars().take(64).collect()
                        })
                        .collect();
                    format!("{event:?} {}", shown.join(" "))
                }
            };
            log.push(format!("{:>6} {line}", self.events));
        }
    }

    /// How many events were recorded.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The hash of every event so far.
    pub fn finish(self) -> TraceHash {
        TraceHash(self.hasher.finalize().into())
    }
}

/// The SHA-256 of a run's trace; displays as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceHash(pub [u8; 32]);

impl fmt::Display for TraceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TraceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_boundaries_matter() {
        let mut a = Trace::new();
        a.record(Event::Put, &[b"ab", b"c"]);
        let mut b = Trace::new();
        b.record(Event::Put, &[b"a", b"bc"]);
        assert_ne!(
            a.finish(),
            b.finish(),
            "length prefixes must separate fields"
        );
    }

    #[test]
    fn event_kinds_matter() {
        let mut a = Trace::new();
        a.record(Event::Put, &[b"p"]);
        let mut b = Trace::new();
        b.record(Event::Delete, &[b"p"]);
        assert_ne!(a.finish(), b.finish(), "tags must separate event kinds");
    }
}
