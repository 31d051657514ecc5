//! How values are encoded inside records: CBOR (RFC 8949).
//!
//! CBOR is self-describing, so any value written by an app can be shown
//! by the CLI as JSON without knowing its Rust type, and it encodes byte
//! strings compactly (use `serde_bytes` for `Vec<u8>` fields).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes a value.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Decodes a value.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}
