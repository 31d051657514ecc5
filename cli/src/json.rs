//! Stored values shown as JSON.
//!
//! The engine encodes values as CBOR, which can hold more than JSON: byte
//! strings, map keys that are not text, tags, integers beyond 64 bits,
//! non-finite floats. Values are read back as a dynamic CBOR value and
//! mapped here, so that anything an app stored prints, instead of failing
//! as decoding straight into `serde_json::Value` would. Values written by
//! `persist put` are plain JSON and come back unchanged.
//!
//! The mapping follows what `serde_json` itself does when an app's type is
//! serialized as JSON:
//!
//! | CBOR | JSON |
//! |---|---|
//! | byte string | array of numbers 0–255 (as a `Vec<u8>`) |
//! | map key that is not text | its JSON text, as a string (`1` → `"1"`) |
//! | tagged value | the value, without its tag |
//! | NaN or ±infinity | `null` |
//! | integer outside `i64`/`u64` | a JSON number from its `f64` approximation |

use ciborium::Value as Cbor;
use serde_json::{Map, Number, Value as Json};

/// `value` as JSON.
pub(crate) fn from_cbor(value: Cbor) -> Json {
    match value {
        Cbor::Null => Json::Null,
        Cbor::Bool(b) => Json::Bool(b),
        Cbor::Integer(i) => integer(i128::from(i)),
        Cbor::Float(f) => Number::from_f64(f).map_or(Json::Null, Json::Number),
        Cbor::Text(s) => Json::String(s),
        Cbor::Bytes(bytes) => Json::Array(bytes.into_iter().map(Json::from).collect()),
        Cbor::Array(items) => Json::Array(items.into_iter().map(from_cbor).collect()),
        Cbor::Map(entries) => {
            let mut map = Map::new();
            for (key, value) in entries {
                map.insert(key_text(key), from_cbor(value));
            }
            Json::Object(map)
        }
        Cbor::Tag(_, inner) => from_cbor(*inner),
        // `ciborium::Value` is non-exhaustive; no other kind exists today.
        _ => Json::Null,
    }
}

fn integer(i: i128) -> Json {
    if let Ok(n) = u64::try_from(i) {
        Json::from(n)
    } else if let Ok(n) = i64::try_from(i) {
        Json::from(n)
    } else {
        // CBOR integers reach ±2^64: beyond both ranges, but within f64's.
        #[allow(clippy::cast_precision_loss, reason = "documented approximation")]
        let f = i as f64;
        Number::from_f64(f).map_or(Json::Null, Json::Number)
    }
}

fn key_text(key: Cbor) -> String {
    match key {
        Cbor::Text(s) => s,
        other => from_cbor(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn via_cbor(value: &Json) -> Json {
        let mut bytes = Vec::new();
        ciborium::into_writer(value, &mut bytes).unwrap();
        from_cbor(ciborium::from_reader(bytes.as_slice()).unwrap())
    }

    #[test]
    fn json_values_come_back_unchanged() {
        let value = json!({
            "s": "héllo ✓ 🎉", "i": -7, "u": u64::MAX, "f": 1.5, "z": 0.0,
            "b": true, "n": null, "a": [1, "two", [3.25], {"k": {}}], "e": []
        });
        assert_eq!(via_cbor(&value), value);
    }

    #[test]
    fn cbor_only_values_still_print() {
        let bytes = Cbor::Bytes(vec![0, 255]);
        assert_eq!(from_cbor(bytes), json!([0, 255]));
        let map = Cbor::Map(vec![
            (Cbor::Integer(1.into()), Cbor::Text("one".into())),
            (Cbor::Bool(true), Cbor::Null),
        ]);
        assert_eq!(from_cbor(map), json!({"1": "one", "true": null}));
        let tagged = Cbor::Tag(1, Box::new(Cbor::Integer(1_700_000_000.into())));
        assert_eq!(from_cbor(tagged), json!(1_700_000_000));
        assert_eq!(from_cbor(Cbor::Float(f64::NAN)), Json::Null);
        let huge = Cbor::Integer(ciborium::value::Integer::try_from(-(1i128 << 64)).unwrap());
        assert_eq!(from_cbor(huge), json!(-18_446_744_073_709_551_616.0));
    }
}
