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
//!
//! When the run revoked a device ([`RevokedDevice`]), the reference leaves
//! out what that device signed after its revocation (every member must
//! refuse it), convergence compares only the current members, and two
//! more invariants hold: the revoked device reads nothing the members
//! wrote after the revocation, and no member holds what it wrote later.

use std::collections::{BTreeMap, BTreeSet};

use persist_core::envelope::{self, Envelope};
use persist_core::export::ExportedKeys;
use persist_core::keys::IndexKey;
use persist_core::lww::{Precedence, Version};
use persist_core::protocol::Message;
use persist_core::record::is_system_path;
use persist_core::{DeviceId, Epoch, Locator};

use crate::cluster::StoredRow;
use crate::net::{Forged, TappedConn};

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
    REVOKED_READS_NOTHING_NEW,
    REVOKED_WRITES_REFUSED,
    TAMPERED_NEVER_APPLIED,
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
/// A revoked device never reads a value a member wrote after the member
/// learned of the revocation (under the revocation's epoch or later).
pub const REVOKED_READS_NOTHING_NEW: &str = "revoked_reads_nothing_new";
/// What a revoked device writes stamped after its revocation is in no
/// member's state.
pub const REVOKED_WRITES_REFUSED: &str = "revoked_writes_refused";

/// No envelope a relay forged (altered, cut short or moved to another
/// locator) is ever stored or held by a device.
pub const TAMPERED_NEVER_APPLIED: &str = "tampered_never_applied";

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
    /// The device that sealed and signed this copy.
    pub signer: DeviceId,
}

/// A device the run revoked, as the checkers need it: what members refuse
/// from it, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedDevice {
    /// Its index in the run.
    pub device: usize,
    /// Its id.
    pub id: DeviceId,
    /// The epoch the revocation started.
    pub epoch: Epoch,
    /// The revoker's clock when it revoked: the revocation is stamped
    /// `(at_ms, u16::MAX)`, so a write of the revoked device is later
    /// exactly when its HLC's milliseconds exceed this.
    pub at_ms: u64,
}

impl RevokedDevice {
    /// Whether every member must refuse `o`: a write the revoked device
    /// stamped after its revocation (whoever resealed it since), or a copy
    /// it signed under the revocation's epoch or later.
    pub fn refuses(&self, o: &Opened) -> bool {
        let later = o.precedence.version.hlc.ms > self.at_ms;
        (o.precedence.version.origin == self.id && later)
            || (o.signer == self.id && (later || o.precedence.epoch >= self.epoch))
    }
}

/// The envelopes of `opened` that members accept: all of them, less what
/// a revoked device signed after its revocation.
pub fn accepted(opened: &[Opened], revoked: Option<&RevokedDevice>) -> Vec<Opened> {
    opened
        .iter()
        .filter(|o| revoked.is_none_or(|r| !r.refuses(o)))
        .cloned()
        .collect()
}

/// The values members must refuse: those whose original write (the
/// earliest version in `opened` carrying the value; every put writes a
/// value of its own) is one `revoked` made after its revocation. A copy
/// the revoked device signs of a member's write, stamped anew or not, does
/// not make the member's value refused (seed 107); a member's copy of the
/// revoked device's later write does not make it accepted.
pub fn refused_values(opened: &[Opened], revoked: &RevokedDevice) -> BTreeSet<String> {
    let mut originals: BTreeMap<&str, (Version, bool)> = BTreeMap::new();
    for o in opened {
        let Some(value) = o.value.as_deref() else {
            continue;
        };
        let (version, refused) = (o.precedence.version, revoked.refuses(o));
        let entry = originals.entry(value).or_insert((version, refused));
        if version < entry.0 {
            *entry = (version, refused);
        } else if version == entry.0 {
            // Copies of one write: refused only if every one is.
            entry.1 &= refused;
        }
    }
    originals
        .into_iter()
        .filter(|(_, (_, refused))| *refused)
        .map(|(value, _)| value.to_owned())
        .collect()
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
    // Every key of each epoch: concurrent rotations make several.
    let epoch_keys: BTreeMap<Epoch, Vec<_>> = keys
        .epochs
        .iter()
        .map(|(epoch, entry)| (*epoch, entry.keys().map(|(_, k)| k).collect()))
        .collect();
    let mut out = Vec::new();
    for (locator, bytes) in envelopes {
        let env = Envelope::parse(bytes)
            .map_err(|e| violation(CONVERGENCE, format!("an envelope does not parse: {e}")))?;
        let Some(epoch_keys) = epoch_keys.get(&env.header.epoch).filter(|k| !k.is_empty()) else {
            return Err(violation(
                ROTATION_FINISHES,
                format!(
                    "an envelope is sealed under epoch {}, which device 0 has no key for",
                    env.header.epoch.0
                ),
            ));
        };
        let open = |key| {
            envelope::open(&env, &keys.store_id, locator, key, |p| {
                index.locator(&keys.store_id, p)
            })
        };
        let record = epoch_keys
            .iter()
            .map(|k| open(k))
            .find(|opened| !matches!(opened, Err(envelope::OpenError::Integrity)))
            .unwrap_or(Err(envelope::OpenError::Integrity))
            .map_err(|e| {
                violation(
                    CONVERGENCE,
                    format!(
                        "an envelope signed by {} under epoch {} ({} keys held) does not open: {e}",
                        env.header.signer,
                        env.header.epoch.0,
                        epoch_keys.len()
                    ),
                )
            })?;
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
            signer: env.header.signer,
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

/// Paths overtaken at the relay by a revoked device: the newest envelope
/// the relay keeps for them is one members refuse, each with the values
/// members accepted for it from the wire.
///
/// The relay keeps one envelope per locator and cannot tell a revoked
/// signer, so until it refuses the revoked device (the relay switch) a
/// later write of that device replaces the members' newest one there. A
/// member holding an older value restates it when it refuses that write,
/// which puts an accepted value back in front; but a member that crashes
/// between the two, or whose value was the one it replaced, leaves the
/// path overtaken, and a member that had not pulled the value yet never
/// gets it (README, "Not there yet": the new `K_index` closes this).
/// Convergence asks of these paths only that every member holds an
/// accepted value or nothing.
pub type Overtaken = BTreeMap<String, BTreeSet<String>>;

/// The paths `revoked` overtook at the relay (see [`Overtaken`]), from the
/// relay's entries and the accepted envelopes seen on the wire.
pub fn overtaken(relay: &[Opened], accepted: &[Opened], revoked: &RevokedDevice) -> Overtaken {
    reference(relay)
        .into_iter()
        .filter(|(_, winner)| revoked.refuses(winner))
        .map(|(path, _)| {
            let values = accepted
                .iter()
                .filter(|o| o.path == path)
                .filter_map(|o| o.value.clone())
                .collect();
            (path, values)
        })
        .collect()
}

/// Every member lists exactly the reference (on paths a revoked device
/// overtook at the relay, an accepted value or nothing), and the relay
/// keeps, per path not overtaken, the reference's version.
pub fn check_convergence(
    reference: &BTreeMap<String, Opened>,
    listings: &[(usize, Vec<(String, String)>)],
    relay: &[Opened],
    overtaken: &Overtaken,
) -> Result<(), Violation> {
    let expected: Vec<(String, String)> = expected_listing(reference)
        .into_iter()
        .filter(|(p, _)| !overtaken.contains_key(p))
        .collect();
    for (device, full) in listings {
        let mut listing = Vec::with_capacity(full.len());
        for (path, value) in full {
            match overtaken.get(path) {
                None => listing.push((path.clone(), value.clone())),
                Some(values) if values.contains(value) => {}
                Some(_) => {
                    return Err(violation(
                        CONVERGENCE,
                        format!(
                            "device {device} holds {path:?} = {:?}, which no member wrote \
                             there (the revoked device overtook the path at the relay)",
                            short(value)
                        ),
                    ));
                }
            }
        }
        if listing != expected {
            let first = expected
                .iter()
                .zip(&listing)
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
    for (path, want) in reference
        .iter()
        .filter(|(p, _)| !overtaken.contains_key(*p))
    {
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

/// The revoked device (listing `listing`) holds no value of `written_after`
/// (what members wrote after they learned of its revocation).
pub fn check_revoked_reads_nothing_new(
    revoked: &RevokedDevice,
    written_after: &BTreeSet<String>,
    listing: &[(String, String)],
) -> Result<(), Violation> {
    match listing.iter().find(|(_, v)| written_after.contains(v)) {
        None => Ok(()),
        Some((path, v)) => Err(violation(
            REVOKED_READS_NOTHING_NEW,
            format!(
                "revoked device {} reads {path:?} = {:?}, which a member wrote after the \
                 revocation (epoch {}, at {} ms)",
                revoked.device,
                short(v),
                revoked.epoch.0,
                revoked.at_ms
            ),
        )),
    }
}

/// No member's listing holds a value of `later` (what the revoked device
/// wrote after its revocation).
pub fn check_revoked_writes_refused(
    revoked: &RevokedDevice,
    later: &BTreeSet<String>,
    members: &[(usize, Vec<(String, String)>)],
) -> Result<(), Violation> {
    for (device, listing) in members {
        if let Some((path, v)) = listing.iter().find(|(_, v)| later.contains(v)) {
            return Err(violation(
                REVOKED_WRITES_REFUSED,
                format!(
                    "member {device} holds {path:?} = {:?}, which revoked device {} wrote \
                     after its revocation (epoch {}, at {} ms)",
                    short(v),
                    revoked.device,
                    revoked.epoch.0,
                    revoked.at_ms
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
        for (i, (_, key)) in entry.keys().enumerate() {
            raw.push((
                format!("key {i} of epoch {}", epoch.0),
                key.expose().to_vec(),
            ));
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

/// Checks that no device stores or holds one of the relay's `forged`
/// envelopes at the locator it was forged for; `rows` are each device's,
/// read after the run.
pub fn check_tampered_never_applied(
    forged: &[Forged],
    rows: &[(usize, Vec<StoredRow>)],
) -> Result<(), Violation> {
    let forged: BTreeMap<(&Locator, &[u8]), &str> = forged
        .iter()
        .map(|f| ((&f.locator, f.envelope.as_slice()), f.kind))
        .collect();
    for (device, rows) in rows {
        for row in rows {
            if let Some(kind) = forged.get(&(&row.locator, row.envelope.as_slice())) {
                let how = if row.held { "holds" } else { "stores" };
                return Err(violation(
                    TAMPERED_NEVER_APPLIED,
                    format!(
                        "device {device} {how} an envelope the relay forged ({kind}) at \
                         locator {}",
                        row.locator
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_envelope_stored_or_held_is_caught_at_its_locator_only() {
        let forged = vec![Forged {
            locator: Locator([1; 32]),
            envelope: b"forged".to_vec(),
            kind: "forged_flip",
        }];
        let row = |locator: u8, envelope: &[u8], held: bool| StoredRow {
            locator: Locator([locator; 32]),
            envelope: envelope.to_vec(),
            held,
        };
        let clean = vec![(0, vec![row(1, b"genuine", false), row(2, b"forged", false)])];
        assert!(check_tampered_never_applied(&forged, &clean).is_ok());
        for held in [false, true] {
            let rows = vec![(0, vec![]), (1, vec![row(1, b"forged", held)])];
            let err = check_tampered_never_applied(&forged, &rows).unwrap_err();
            assert_eq!(err.invariant, TAMPERED_NEVER_APPLIED);
            assert!(err.detail.contains("device 1"), "{}", err.detail);
        }
    }

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

    const ALICE: DeviceId = DeviceId([1; 16]);
    const MALLORY: DeviceId = DeviceId([2; 16]);

    fn opened(signer: DeviceId, epoch: u32, ms: u64, value: &str) -> Opened {
        resealed(signer, signer, epoch, ms, value)
    }

    /// A copy of `origin`'s write, sealed and signed by `signer`.
    fn resealed(signer: DeviceId, origin: DeviceId, epoch: u32, ms: u64, value: &str) -> Opened {
        Opened {
            locator: Locator([0; 32]),
            path: "a/0".into(),
            value: Some(value.into()),
            precedence: Precedence {
                version: persist_core::lww::Version {
                    hlc: persist_core::hlc::Hlc { ms, counter: 0 },
                    origin,
                },
                epoch: Epoch(epoch),
            },
            signer,
        }
    }

    /// Mallory revoked at 1000 ms, starting epoch 3.
    fn mallory_revoked() -> RevokedDevice {
        RevokedDevice {
            device: 2,
            id: MALLORY,
            epoch: Epoch(3),
            at_ms: 1_000,
        }
    }

    #[test]
    fn members_refuse_what_the_revoked_device_signs_later_and_only_that() {
        let r = mallory_revoked();
        let all = vec![
            opened(MALLORY, 2, 1_000, "mallory, in time"),
            opened(MALLORY, 2, 1_001, "mallory, stamped after"),
            opened(MALLORY, 3, 900, "mallory, under the new epoch"),
            opened(ALICE, 3, 5_000, "alice, after"),
            resealed(ALICE, MALLORY, 3, 900, "mallory, in time, resealed"),
            resealed(ALICE, MALLORY, 3, 1_002, "mallory, later, resealed"),
            resealed(MALLORY, ALICE, 2, 800, "alice, resealed by mallory"),
        ];
        let kept: Vec<_> = accepted(&all, Some(&r))
            .into_iter()
            .filter_map(|o| o.value)
            .collect();
        assert_eq!(
            kept,
            [
                "mallory, in time",
                "alice, after",
                "mallory, in time, resealed",
                "alice, resealed by mallory"
            ]
        );
        assert_eq!(accepted(&all, None).len(), 7, "no revocation, no refusal");
        let refused: Vec<_> = refused_values(&all, &r).into_iter().collect();
        assert_eq!(
            refused,
            [
                "mallory, later, resealed",
                "mallory, stamped after",
                "mallory, under the new epoch"
            ]
        );
        // Mallory signs a copy of Alice's write, stamped anew (seed 107):
        // that copy is refused, but the value is Alice's, which members
        // may hold. Alice's copy of Mallory's later write, stamped anew,
        // does not make Mallory's value hers.
        let mut copied = all.clone();
        copied.push(resealed(MALLORY, ALICE, 2, 6_000, "alice, after"));
        copied.push(resealed(ALICE, ALICE, 3, 7_000, "mallory, stamped after"));
        let refused: Vec<_> = refused_values(&copied, &r).into_iter().collect();
        assert_eq!(
            refused,
            [
                "mallory, later, resealed",
                "mallory, stamped after",
                "mallory, under the new epoch"
            ]
        );
    }

    #[test]
    fn a_revoked_device_reading_a_later_member_write_is_caught() {
        let r = mallory_revoked();
        let after: BTreeSet<String> = ["alice, after".to_owned()].into();
        let old = vec![("a/0".to_owned(), "alice, before".to_owned())];
        assert!(check_revoked_reads_nothing_new(&r, &after, &old).is_ok());
        let new = vec![("a/0".to_owned(), "alice, after".to_owned())];
        let err = check_revoked_reads_nothing_new(&r, &after, &new).unwrap_err();
        assert_eq!(err.invariant, REVOKED_READS_NOTHING_NEW);
    }

    #[test]
    fn a_member_holding_a_later_revoked_write_is_caught() {
        let r = mallory_revoked();
        let later: BTreeSet<String> = ["mallory, later".to_owned()].into();
        let clean = vec![(0, vec![("a/0".to_owned(), "alice".to_owned())])];
        assert!(check_revoked_writes_refused(&r, &later, &clean).is_ok());
        let mut dirty = clean.clone();
        dirty.push((1, vec![("b/0".to_owned(), "mallory, later".to_owned())]));
        let err = check_revoked_writes_refused(&r, &later, &dirty).unwrap_err();
        assert_eq!(err.invariant, REVOKED_WRITES_REFUSED);
        assert!(err.detail.contains("member 1"), "{err}");
    }

    #[test]
    fn a_path_overtaken_at_the_relay_may_hold_any_accepted_value_and_nothing_else() {
        let r = mallory_revoked();
        let older = opened(ALICE, 3, 2_000, "alice, older");
        let newest = opened(ALICE, 3, 3_000, "alice, newest");
        let accepted_all = vec![older.clone(), newest.clone()];
        // The relay keeps Mallory's later write in front of Alice's.
        let relay = vec![opened(MALLORY, 2, 4_000, "mallory, later")];
        let overtaken = overtaken(&relay, &accepted_all, &r);
        assert_eq!(overtaken.len(), 1);
        let reference = reference(&accepted_all);
        let accepted_relay = accepted(&relay, Some(&r));
        let holds = |v: &str| vec![(0, vec![("a/0".to_owned(), v.to_owned())])];
        for ok in ["alice, older", "alice, newest"] {
            assert!(
                check_convergence(&reference, &holds(ok), &accepted_relay, &overtaken).is_ok(),
                "{ok}"
            );
        }
        assert!(check_convergence(&reference, &[(0, vec![])], &accepted_relay, &overtaken).is_ok());
        let err = check_convergence(
            &reference,
            &holds("mallory, later"),
            &accepted_relay,
            &overtaken,
        )
        .unwrap_err();
        assert_eq!(err.invariant, CONVERGENCE);
        // Not overtaken, the same listings must match the reference.
        let none = Overtaken::new();
        let relay_ok = vec![newest];
        assert!(check_convergence(&reference, &holds("alice, newest"), &relay_ok, &none).is_ok());
        assert!(check_convergence(&reference, &holds("alice, older"), &relay_ok, &none).is_err());
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
