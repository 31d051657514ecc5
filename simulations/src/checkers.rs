//! The invariants of a multi-device run (DESIGN.md, "Simulation
//! invariants"), each a function from what the run observed to `Ok` or a
//! [`Violation`].
//!
//! The reference model of the sync workload is built from the wire: every
//! envelope a device pushed is decrypted with device 0's keys (it holds
//! every epoch), and per path the write with the highest LWW precedence is
//! what every device must end up with. Writes that never reached the wire
//! (overwritten before they were pushed) are checked by their bound: the
//! write that replaced them must carry a version at least as late as the
//! writer's clock when it wrote.

use std::collections::{BTreeMap, BTreeSet};

use persist_core::envelope::{self, Envelope};
use persist_core::export::ExportedKeys;
use persist_core::keys::IndexKey;
use persist_core::lww::Precedence;
use persist_core::protocol::Message;
use persist_core::record::is_system_path;
use persist_core::{Epoch, Locator};

use crate::net::TappedConn;

/// An invariant that did not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invariant {invariant} violated: {detail}")]
#[non_exhaustive]
pub struct Violation {
    /// Which invariant (see [`INVARIANTS`]).
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
}

/// Every invariant the sync workload checks, by name.
pub const INVARIANTS: &[&str] = &[
    CONVERGENCE,
    NO_LOST_WRITE,
    NO_PLAINTEXT,
    NO_NONCE_REUSE,
    EPOCHS_MONOTONE,
    ROTATION_FINISHES,
    HELD_APPLIED,
    HELD_BOUNDED,
    NO_PHANTOM_READ,
    LIVENESS,
];

/// All devices hold the reference state once faults stop.
pub const CONVERGENCE: &str = "convergence";
/// Every acknowledged write is present or superseded by a later one.
pub const NO_LOST_WRITE: &str = "no_lost_write";
/// No canary path or value, and no key byte, in any frame or relay row.
pub const NO_PLAINTEXT: &str = "no_plaintext";
/// No two different envelopes under one (epoch key, seed, nonce).
pub const NO_NONCE_REUSE: &str = "no_nonce_reuse";
/// A device's current epoch never goes back, across restarts.
pub const EPOCHS_MONOTONE: &str = "epochs_monotone";
/// Re-encryption ends, and no record stays under an older epoch.
pub const ROTATION_FINISHES: &str = "rotation_finishes";
/// Held envelopes apply once keys are delivered and clocks caught up.
pub const HELD_APPLIED: &str = "held_applied";
/// Held envelopes never outnumber the records that could be held.
pub const HELD_BOUNDED: &str = "held_bounded";
/// A read returns nothing or a value some device wrote to that path.
pub const NO_PHANTOM_READ: &str = "no_phantom_read";
/// With faults off, a sync finishes in bounded simulated time.
pub const LIVENESS: &str = "liveness";

pub(crate) fn violation(invariant: &'static str, detail: impl Into<String>) -> Violation {
    Violation {
        invariant,
        detail: detail.into(),
    }
}

/// An acknowledged write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckWrite {
    /// The device that wrote.
    pub device: usize,
    /// The run-phase step (or `None` in setup).
    pub step: Option<usize>,
    /// The path.
    pub path: String,
    /// The value, or `None` for a delete.
    pub value: Option<String>,
    /// The writer's clock when it wrote: a lower bound of its HLC.
    pub at_ms: u64,
}

/// An envelope seen on the wire or in the relay, decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// Its locator.
    pub locator: Locator,
    /// The record's path.
    pub path: String,
    /// The value, or `None` for a tombstone.
    pub value: Option<String>,
    /// Its LWW precedence.
    pub precedence: Precedence,
}

/// The frames of one direction of a tapped connection, up to the first
/// incomplete one (a cut connection ends mid-frame).
pub fn frames(bytes: &[u8]) -> Result<Vec<Message>, Violation> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(payload) = rest.get(4..4 + len) else {
            break;
        };
        let msg = persist_transport::frame::decode(payload)
            .map_err(|e| violation(NO_PLAINTEXT, format!("a tapped frame does not decode: {e}")))?;
        out.push(msg);
        rest = &rest[4 + len..];
    }
    Ok(out)
}

/// Every (locator, envelope) pushed by a device in `tapped`, in order.
pub fn pushed(tapped: &[TappedConn]) -> Result<Vec<(Locator, Vec<u8>)>, Violation> {
    let mut out = Vec::new();
    for conn in tapped {
        for msg in frames(&conn.up)? {
            if let Message::Push { entries, .. } = msg {
                out.extend(entries.into_iter().map(|e| (e.locator, e.envelope)));
            }
        }
    }
    Ok(out)
}

/// Decrypts `envelopes` with `keys`; member announcements are left out.
pub fn open_all(
    keys: &ExportedKeys,
    envelopes: &[(Locator, Vec<u8>)],
) -> Result<Vec<Opened>, Violation> {
    let index = IndexKey::new(keys.index_key.duplicate());
    let epoch_keys: BTreeMap<Epoch, _> = keys
        .epochs
        .iter()
        .filter_map(|(epoch, entry)| entry.key.as_ref().map(|k| (*epoch, k)))
        .collect();
    let mut out = Vec::new();
    for (locator, bytes) in envelopes {
        let env = Envelope::parse(bytes)
            .map_err(|e| violation(CONVERGENCE, format!("an envelope does not parse: {e}")))?;
        let Some(key) = epoch_keys.get(&env.header.epoch) else {
            return Err(violation(
                ROTATION_FINISHES,
                format!(
                    "an envelope is sealed under epoch {}, which device 0 has no key for",
                    env.header.epoch.0
                ),
            ));
        };
        let record = envelope::open(&env, &keys.store_id, locator, key, |p| {
            index.locator(&keys.store_id, p)
        })
        .map_err(|e| violation(CONVERGENCE, format!("an envelope does not open: {e}")))?;
        if is_system_path(&record.path) {
            continue;
        }
        let value = if env.header.flags.tombstone {
            None
        } else {
            Some(
                ciborium::from_reader::<String, _>(record.value.as_slice()).map_err(|e| {
                    violation(CONVERGENCE, format!("a value is not a CBOR string: {e}"))
                })?,
            )
        };
        out.push(Opened {
            locator: *locator,
            path: record.path,
            value,
            precedence: env.header.precedence(),
        });
    }
    Ok(out)
}

/// Per path, the write with the highest precedence: what every device must
/// hold (a `None` value: the path is deleted).
pub fn reference(opened: &[Opened]) -> BTreeMap<String, Opened> {
    let mut winners: BTreeMap<String, Opened> = BTreeMap::new();
    for o in opened {
        match winners.get(&o.path) {
            Some(w) if w.precedence >= o.precedence => {}
            _ => {
                winners.insert(o.path.clone(), o.clone());
            }
        }
    }
    winners
}

/// What `reference` says a listing of everything must return.
pub fn expected_listing(reference: &BTreeMap<String, Opened>) -> Vec<(String, String)> {
    reference
        .values()
        .filter_map(|o| o.value.clone().map(|v| (o.path.clone(), v)))
        .collect()
}

/// Every device lists exactly the reference, and the relay keeps, per
/// path, the reference's version.
pub fn check_convergence(
    reference: &BTreeMap<String, Opened>,
    listings: &[(usize, Vec<(String, String)>)],
    relay: &[Opened],
) -> Result<(), Violation> {
    let expected = expected_listing(reference);
    for (device, listing) in listings {
        if *listing != expected {
            let first = expected
                .iter()
                .zip(listing)
                .find(|(e, o)| e != o)
                .map(|(e, o)| format!("first difference: expected {e:?}, found {o:?}"))
                .unwrap_or_else(|| "one listing is a prefix of the other".into());
            return Err(violation(
                CONVERGENCE,
                format!(
                    "device {device} lists {} records, the reference {}; {first}",
                    listing.len(),
                    expected.len()
                ),
            ));
        }
    }
    let relay_ref = reference_versions(relay);
    for (path, want) in reference {
        match relay_ref.get(path) {
            Some(got) if got.version == want.precedence.version => {}
            got => {
                return Err(violation(
                    CONVERGENCE,
                    format!(
                        "the relay keeps {got:?} for {path:?}, the reference is {:?}",
                        want.precedence
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn reference_versions(opened: &[Opened]) -> BTreeMap<String, Precedence> {
    reference(opened)
        .into_iter()
        .map(|(p, o)| (p, o.precedence))
        .collect()
}

/// Every acknowledged write is in the reference, or lost to a write whose
/// version is at least as late as the acknowledged one's writer clock.
pub fn check_acks(
    acks: &[AckWrite],
    opened: &[Opened],
    reference: &BTreeMap<String, Opened>,
) -> Result<(), Violation> {
    let on_wire: BTreeSet<(&str, &str)> = opened
        .iter()
        .filter_map(|o| o.value.as_deref().map(|v| (o.path.as_str(), v)))
        .collect();
    for ack in acks {
        if let Some(value) = &ack.value
            && on_wire.contains(&(ack.path.as_str(), value.as_str()))
        {
            // Pushed: the reference is the highest of everything pushed.
            continue;
        }
        let winner = reference.get(&ack.path);
        let superseded = match (winner, &ack.value) {
            // A delete with nothing written to the path anywhere.
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(w), None) if w.value.is_none() => true,
            (Some(w), _) => w.precedence.version.hlc.ms >= ack.at_ms,
        };
        if !superseded {
            return Err(violation(
                NO_LOST_WRITE,
                format!(
                    "device {} acknowledged {} {:?}{} at its clock {} (step {:?}); it never \
                     reached the relay and the path ends as {:?}",
                    ack.device,
                    if ack.value.is_some() { "put" } else { "delete" },
                    ack.path,
                    ack.value
                        .as_deref()
                        .map(|v| format!(" = {:?}", short(v)))
                        .unwrap_or_default(),
                    ack.at_ms,
                    ack.step,
                    winner.map(|w| (w.value.as_deref().map(short), w.precedence.version.hlc)),
                ),
            ));
        }
    }
    Ok(())
}

fn short(v: &str) -> String {
    v.chars().take(48).collect()
}

/// No needle occurs in any haystack.
pub fn check_no_plaintext(
    needles: &[(String, Vec<u8>)],
    haystacks: &[(String, &[u8])],
) -> Result<(), Violation> {
    for (where_, bytes) in haystacks {
        for (name, needle) in needles {
            if !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                return Err(violation(
                    NO_PLAINTEXT,
                    format!("{where_} carries the {name} in the clear"),
                ));
            }
        }
    }
    Ok(())
}

/// The secrets of `keys`, raw and in hex, as named needles.
pub fn key_needles(keys: &ExportedKeys) -> Vec<(String, Vec<u8>)> {
    let mut raw: Vec<(String, Vec<u8>)> = vec![
        ("index key".into(), keys.index_key.expose().to_vec()),
        ("relay token".into(), keys.relay_token.expose().to_vec()),
    ];
    for (epoch, entry) in &keys.epochs {
        if let Some(key) = &entry.key {
            raw.push((format!("key of epoch {}", epoch.0), key.expose().to_vec()));
        }
    }
    let hexed: Vec<(String, Vec<u8>)> = raw
        .iter()
        .map(|(n, b)| (format!("{n} (hex)"), hex::encode(b).into_bytes()))
        .collect();
    raw.extend(hexed);
    raw
}

/// What must be unique per sealed message: (epoch, seed, nonce).
type NonceKey = (u32, [u8; 16], [u8; 12]);

/// No two different envelopes share an (epoch, seed, nonce): under one
/// epoch key that would be a nonce reuse.
pub fn check_nonce_reuse(envelopes: &[(Locator, Vec<u8>)]) -> Result<(), Violation> {
    let mut seen: BTreeMap<NonceKey, &[u8]> = BTreeMap::new();
    for (_, bytes) in envelopes {
        let Ok(env) = Envelope::parse(bytes) else {
            continue;
        };
        let h = env.header;
        let key = (h.epoch.0, h.seed, h.nonce);
        match seen.get(&key) {
            Some(first) if *first != bytes.as_slice() => {
                return Err(violation(
                    NO_NONCE_REUSE,
                    format!(
                        "two different envelopes under epoch {} share seed {} and nonce {} \
                         (signer {}, seq {})",
                        h.epoch.0,
                        hex::encode(h.seed),
                        hex::encode(h.nonce),
                        h.signer,
                        h.signer_seq
                    ),
                ));
            }
            Some(_) => {}
            None => {
                seen.insert(key, bytes);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_scan_finds_a_needle_anywhere() {
        let needles = vec![("canary".to_owned(), b"secret".to_vec())];
        let clean: &[u8] = b"nothing to see";
        let dirty: &[u8] = b"xxsecretxx";
        assert!(check_no_plaintext(&needles, &[("a".into(), clean)]).is_ok());
        let err = check_no_plaintext(&needles, &[("b".into(), dirty)]).unwrap_err();
        assert_eq!(err.invariant, NO_PLAINTEXT);
    }

    #[test]
    fn frames_stop_at_a_cut() {
        let mut bytes = Vec::new();
        let msg = Message::Subscribe;
        let payload = postcard_bytes(&msg);
        bytes.extend((payload.len() as u32).to_be_bytes());
        bytes.extend(&payload);
        bytes.extend(&[0, 0, 0, 9, 1]);
        assert_eq!(frames(&bytes).unwrap().len(), 1);
    }

    fn postcard_bytes(msg: &Message) -> Vec<u8> {
        // The frame codec's own encoder, through an in-memory writer.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut sender = persist_transport::FrameSender::new(Vec::new());
            sender.send(msg).await.unwrap();
            sender.into_inner()[4..].to_vec()
        })
    }
}
