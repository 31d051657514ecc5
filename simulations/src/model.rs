//! The reference model a store must agree with, and the checkers that
//! compare the two.
//!
//! The model is the simplest thing that can be right: a sorted map from
//! path to value, changed only by acknowledged writes. Each checker returns
//! a [`Mismatch`] that names what was compared and shows both sides.

use std::collections::BTreeMap;
use std::fmt;

/// The values the workloads store: text, so that a mismatch reads well.
pub type Value = String;

/// What a single store must hold after a sequence of acknowledged writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    records: BTreeMap<String, Value>,
}

impl Model {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies an acknowledged put.
    pub fn put(&mut self, path: &str, value: Value) {
        self.records.insert(path.to_owned(), value);
    }

    /// Applies an acknowledged delete.
    pub fn delete(&mut self, path: &str) {
        self.records.remove(path);
    }

    /// The value at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Value> {
        self.records.get(path)
    }

    /// Every record whose path starts with `prefix`, sorted by path (the
    /// order `Store::list` promises).
    pub fn list(&self, prefix: &str) -> Vec<(String, Value)> {
        self.records
            .range(prefix.to_owned()..)
            .take_while(|(path, _)| path.starts_with(prefix))
            .map(|(path, value)| (path.clone(), value.clone()))
            .collect()
    }

    /// How many records the model holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the model holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The store disagreed with the model.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: the model expects {expected}, the store returned {observed}")]
#[non_exhaustive]
pub struct Mismatch {
    /// What was compared, e.g. `get("a/1")`.
    pub what: String,
    /// The model's answer.
    pub expected: String,
    /// The store's answer.
    pub observed: String,
}

/// Checks a `get(path)` against the model.
pub fn check_get(model: &Model, path: &str, observed: Option<&str>) -> Result<(), Mismatch> {
    let expected = model.get(path).map(String::as_str);
    if expected == observed {
        return Ok(());
    }
    Err(Mismatch {
        what: format!("get({path:?})"),
        expected: Shown(expected).to_string(),
        observed: Shown(observed).to_string(),
    })
}

/// Checks a `list(prefix)` against the model, naming the first entry where
/// the two differ.
pub fn check_list(
    model: &Model,
    prefix: &str,
    observed: &[(String, Value)],
) -> Result<(), Mismatch> {
    let expected = model.list(prefix);
    if expected == observed {
        return Ok(());
    }
    let at = expected
        .iter()
        .zip(observed)
        .position(|(e, o)| e != o)
        .unwrap_or(expected.len().min(observed.len()));
    let entry = |list: &[(String, Value)]| match list.get(at) {
        Some((path, value)) => format!("{path:?} = {}", Shown(Some(value))),
        None => "no entry".to_owned(),
    };
    Err(Mismatch {
        what: format!(
            "list({prefix:?}) ({} entries expected, {} returned; first difference at entry {at})",
            expected.len(),
            observed.len()
        ),
        expected: entry(&expected),
        observed: entry(observed),
    })
}

/// Characters of a value a mismatch shows; the rest is summarised by
/// length (workload values end in long filler).
const SHOWN_CHARS_MAX: usize = 40;

/// An optional value as a mismatch shows it.
struct Shown<'a>(Option<&'a str>);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("nothing"),
            Some(value) => match value.char_indices().nth(SHOWN_CHARS_MAX) {
                None => write!(f, "{value:?}"),
                Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &value[..cut], value.len()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let mut m = Model::new();
        m.put("a/1", "one".into());
        m.put("a/2", "two".into());
        m.put("b", "bee".into());
        m
    }

    #[test]
    fn list_is_sorted_and_prefix_bounded() {
        let m = model();
        let a: Vec<_> = m.list("a/").into_iter().map(|(p, _)| p).collect();
        assert_eq!(a, ["a/1", "a/2"]);
        assert_eq!(m.list("").len(), 3);
        assert!(m.list("c").is_empty());
    }

    #[test]
    fn check_get_accepts_agreement_and_rejects_disagreement() {
        let m = model();
        assert!(check_get(&m, "a/1", Some("one")).is_ok());
        assert!(check_get(&m, "zz", None).is_ok());
        let err = check_get(&m, "a/1", None).expect_err("a lost record must be caught");
        assert_eq!(err.expected, "\"one\"");
        assert_eq!(err.observed, "nothing");
        assert!(
            check_get(&m, "zz", Some("x")).is_err(),
            "a resurrected record must be caught"
        );
    }

    #[test]
    fn long_values_are_shown_cut() {
        let long = "x".repeat(100);
        assert_eq!(
            Shown(Some(long.as_str())).to_string(),
            format!("{:?}… (100 bytes)", "x".repeat(40))
        );
        assert_eq!(Shown(Some("short")).to_string(), "\"short\"");
    }

    #[test]
    fn check_list_names_the_first_difference() {
        let m = model();
        let mut seen = m.list("");
        assert!(check_list(&m, "", &seen).is_ok());
        seen[1].1 = "TWO".into();
        let err = check_list(&m, "", &seen).expect_err("a changed value must be caught");
        assert!(err.what.contains("entry 1"), "{err}");
        seen.truncate(1);
        assert!(
            check_list(&m, "", &seen).is_err(),
            "a missing entry must be caught"
        );
    }
}
