//! A device's disk: the database in memory, and power loss that keeps what
//! was fsynced plus a seeded subset of later writes, torn at sector
//! boundaries.
//!
//! [`SimDisk`] hands each open store a [`DiskHandle`] (a storage
//! [`Backend`]). Every write and resize since the last `sync_data` is
//! remembered in a log, with the bytes it replaced and the bytes it wrote.
//! [`SimDisk::power_loss`] rolls the log back to the image the last fsync
//! left, then, in a [`PowerLoss::Torn`] loss, replays the log in order,
//! deciding from the seed for each entry what reached the platter:
//!
//! - a write survives whole, is lost, or is torn: only a seeded prefix of
//!   it, cut at a sector boundary of the disk ([`SECTOR_BYTES`], counted
//!   from offset 0, not from the write's start), landed, and the rest of
//!   its range keeps what was there before it. A write within one sector
//!   is never torn: a sector is written atomically.
//! - a resize survives or is lost as a whole. What a surviving write put
//!   beyond the length the disk comes back with is lost with the resize
//!   that made room for it (the file's size is metadata).
//!
//! Replaying in order resolves overlaps as the disk would: a later
//! surviving write over an earlier lost one keeps the later bytes where it
//! wrote. A [`PowerLoss::Clean`] loss keeps exactly what was fsynced.
//! Nothing written before the last fsync is ever touched.
//!
//! The power fails before the loss is resolved, at a point of the
//! caller's choosing: at once ([`SimDisk::cut_power`]), or a given number
//! of writes, resizes and fsyncs from now ([`SimDisk::cut_power_after`]),
//! which lets a crash land inside a commit (the simulation runs commits
//! inline, so a crash between its steps never does). From then on every
//! write, resize and fsync fails and changes nothing, so what a dropped
//! store does on its way down (redb's clean shutdown, which fsyncs) never
//! lands either; a crash is a crash, not a close.
//!
//! The disk also knows whether a database still has it open, so that a
//! "crashed" store's actors are gone before the device boots again (two
//! databases on one disk would corrupt it, which is no fault of the
//! product).
//!
//! **Invariants.** After a power loss, every byte of the disk is either as
//! the last fsync left it or as some write since then left it; a byte of a
//! torn write is new only if every byte of that write before it (in the
//! write's order) is new too; the same log and seed give the same bytes.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use persist::{Backend, MemoryBackend};
use rand_core::Rng;

/// The unit a disk writes atomically: a power loss tears a write only
/// between sectors. 512 bytes is the smallest sector disks report, so the
/// finest tearing a real disk can show.
pub const SECTOR_BYTES: u64 = 512;

/// Of 8 power losses, how many keep exactly what was fsynced; the rest
/// are torn. Most are torn because that is the harder case; the clean
/// ones keep the plain "lose everything unsynced" case in every sweep.
const CLEAN_LOSSES_IN_8: u64 = 2;
/// Of 8 unsynced writes in a torn loss, how many survive whole (the
/// rest are lost or, if they span a sector boundary, torn).
const KEPT_WRITES_IN_8: u64 = 3;
/// Of 8 unsynced writes in a torn loss, how many are torn if they can
/// be (one within a sector cannot, and is lost instead).
const TORN_WRITES_IN_8: u64 = 3;
const _: () = assert!(
    KEPT_WRITES_IN_8 + TORN_WRITES_IN_8 < 8,
    "some unsynced writes must be lost"
);

/// What a power loss keeps of the writes since the last fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerLoss {
    /// Exactly what was fsynced: every later write and resize is lost.
    Clean,
    /// What was fsynced plus a seeded subset of later writes and
    /// resizes, some writes torn at sector boundaries.
    Torn,
}

impl PowerLoss {
    /// Draws the kind of a power loss: most are torn.
    pub fn draw<R: Rng + ?Sized>(rng: &mut R) -> Self {
        if rng.next_u64() % 8 < CLEAN_LOSSES_IN_8 {
            PowerLoss::Clean
        } else {
            PowerLoss::Torn
        }
    }
}

/// What one power loss did to the writes and resizes since the last
/// fsync. A write counts as kept or torn by what was drawn for it, even if
/// a lost resize then cut it off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerLossReport {
    /// The kind of loss.
    pub kind: Option<PowerLoss>,
    /// Writes that reached the disk whole.
    pub kept_writes: u64,
    /// Writes of which only a sector-aligned prefix reached the disk.
    pub torn_writes: u64,
    /// Writes of which nothing reached the disk.
    pub lost_writes: u64,
    /// Resizes that reached the disk.
    pub kept_resizes: u64,
    /// Resizes that did not.
    pub lost_resizes: u64,
}

impl PowerLossReport {
    /// The counts by fault kind, for a run's "faults fired" summary (zero
    /// counts left out).
    pub fn fired(&self) -> Vec<(&'static str, u64)> {
        let kind = match self.kind {
            Some(PowerLoss::Clean) => Some("power_loss_clean"),
            Some(PowerLoss::Torn) => Some("power_loss_torn"),
            None => None,
        };
        kind.map(|k| (k, 1))
            .into_iter()
            .chain([
                ("unsynced_write_kept", self.kept_writes),
                ("unsynced_write_torn", self.torn_writes),
                ("unsynced_write_lost", self.lost_writes),
                ("unsynced_resize_kept", self.kept_resizes),
                ("unsynced_resize_lost", self.lost_resizes),
            ])
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// One device's disk. Cheap to clone; clones share it.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    bytes: MemoryBackend,
    state: Arc<Mutex<DiskState>>,
}

#[derive(Debug, Default)]
struct DiskState {
    /// Handles alive (held by an open database).
    open: usize,
    /// Writes and resizes since the last fsync, oldest first.
    unsynced: Vec<Unsynced>,
    power: Power,
}

/// Whether the disk still takes writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Power {
    #[default]
    On,
    /// Fails when this many more writes, resizes or fsyncs were asked for.
    CutAfter(u64),
    /// Failed: every write, resize and fsync fails until the power loss
    /// is resolved ([`SimDisk::power_loss`]).
    Off,
}

impl DiskState {
    /// Spends one write, resize or fsync of the power left; fails if none
    /// is left.
    fn spend(&mut self) -> io::Result<()> {
        self.power = match self.power {
            Power::On => Power::On,
            Power::CutAfter(0) | Power::Off => Power::Off,
            Power::CutAfter(n) => Power::CutAfter(n - 1),
        };
        if self.power == Power::Off {
            return Err(io::Error::other("simulated power loss: the disk is gone"));
        }
        Ok(())
    }
}

/// A write or resize since the last fsync: what it did, and what it
/// replaced (to roll it back).
#[derive(Debug)]
enum Unsynced {
    Write {
        offset: u64,
        old: Vec<u8>,
        new: Vec<u8>,
    },
    SetLen {
        /// The length before.
        old_len: u64,
        /// The bytes a shrink cut off (empty for a growth).
        tail: Vec<u8>,
        /// The length after.
        len: u64,
    },
}

/// What became of one write in a torn loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Kept,
    Lost,
    /// Only the bytes before this disk offset (a sector boundary inside
    /// the write) landed.
    TornAt(u64),
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A backend for one open of the store.
    pub fn handle(&self) -> Box<dyn Backend> {
        self.lock().open += 1;
        Box::new(DiskHandle { disk: self.clone() })
    }

    /// Whether a database still holds this disk.
    pub fn in_use(&self) -> bool {
        self.lock().open > 0
    }

    /// Makes the power fail once `ops` more writes, resizes or fsyncs
    /// were asked for (0: the next one fails): the one that finds no power
    /// left, and every later one, fails with an IO error and changes
    /// nothing, as if the machine had stopped there. Reads still see what
    /// was written (the dying process's page cache). Lets a crash land in
    /// the middle of a commit, which a crash between the simulation's
    /// steps never does (a commit runs inline on its runtime).
    pub fn cut_power_after(&self, ops: u64) {
        let mut state = self.lock();
        if state.power != Power::Off {
            state.power = Power::CutAfter(ops);
        }
    }

    /// Makes the power fail now (see [`SimDisk::cut_power_after`]), so
    /// that nothing a dropped store does on its way down, such as redb's
    /// clean shutdown, reaches the disk.
    pub fn cut_power(&self) {
        self.lock().power = Power::Off;
    }

    /// Whether the power failed.
    pub fn power_failed(&self) -> bool {
        self.lock().power == Power::Off
    }

    /// Loses power: keeps what was fsynced and, if `kind` is
    /// [`PowerLoss::Torn`], the writes and resizes since then that `rng`
    /// lets survive, some writes torn (see the module docs); then the
    /// power is back on. Only when no database holds the disk.
    pub fn power_loss<R: Rng + ?Sized>(&self, kind: PowerLoss, rng: &mut R) -> PowerLossReport {
        let mut state = self.lock();
        assert_eq!(state.open, 0, "power loss while a database is open");
        state.power = Power::On;
        let unsynced = std::mem::take(&mut state.unsynced);
        for entry in unsynced.iter().rev() {
            // Each entry restores bytes that were in range when it was made.
            let restored = match entry {
                Unsynced::Write { offset, old, .. } => self.bytes.write(*offset, old),
                Unsynced::SetLen { old_len, tail, .. } => {
                    self.bytes.set_len(*old_len).and_then(|()| {
                        self.bytes
                            .write(old_len - tail.len() as u64, tail.as_slice())
                    })
                }
            };
            assert!(restored.is_ok(), "undo stays within the disk: {restored:?}");
        }
        let mut report = PowerLossReport {
            kind: Some(kind),
            ..PowerLossReport::default()
        };
        if kind == PowerLoss::Clean {
            report.lost_writes = unsynced
                .iter()
                .filter(|e| matches!(e, Unsynced::Write { .. }))
                .count() as u64;
            report.lost_resizes = unsynced.len() as u64 - report.lost_writes;
            return report;
        }
        // The disk is as the last fsync left it; replay what survives, in
        // order, so that overlaps resolve as they did before the loss.
        for entry in &unsynced {
            let replayed = match entry {
                Unsynced::SetLen { len, .. } => {
                    if rng.next_u64().is_multiple_of(2) {
                        report.kept_resizes += 1;
                        self.bytes.set_len(*len)
                    } else {
                        report.lost_resizes += 1;
                        Ok(())
                    }
                }
                Unsynced::Write { offset, new, .. } => {
                    let landed = match fate(*offset, new.len() as u64, rng) {
                        Fate::Kept => {
                            report.kept_writes += 1;
                            new.as_slice()
                        }
                        Fate::Lost => {
                            report.lost_writes += 1;
                            &[]
                        }
                        Fate::TornAt(cut) => {
                            report.torn_writes += 1;
                            &new[..(cut - offset) as usize]
                        }
                    };
                    self.land(*offset, landed)
                }
            };
            assert!(
                replayed.is_ok(),
                "replay stays within the disk: {replayed:?}"
            );
        }
        report
    }

    /// Writes what of `data` at `offset` lies within the disk's length.
    fn land(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = self.bytes.len()?;
        let within = len.saturating_sub(offset).min(data.len() as u64) as usize;
        if within == 0 {
            return Ok(());
        }
        self.bytes.write(offset, &data[..within])
    }

    /// The disk's bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.snapshot()
    }
}

/// Draws what became of a write of `len` bytes at `offset`.
fn fate<R: Rng + ?Sized>(offset: u64, len: u64, rng: &mut R) -> Fate {
    // Sector boundaries strictly inside the write: where it can tear.
    let end = offset + len;
    let first_cut = (offset / SECTOR_BYTES + 1) * SECTOR_BYTES;
    let cuts = if first_cut < end {
        (end - 1 - first_cut) / SECTOR_BYTES + 1
    } else {
        0
    };
    let draw = rng.next_u64() % 8;
    if draw < KEPT_WRITES_IN_8 {
        Fate::Kept
    } else if draw < KEPT_WRITES_IN_8 + TORN_WRITES_IN_8 && cuts > 0 {
        Fate::TornAt(first_cut + (rng.next_u64() % cuts) * SECTOR_BYTES)
    } else {
        Fate::Lost
    }
}

/// What an open database writes through.
#[derive(Debug)]
struct DiskHandle {
    disk: SimDisk,
}

impl Drop for DiskHandle {
    fn drop(&mut self) {
        self.disk.lock().open -= 1;
    }
}

impl Backend for DiskHandle {
    fn len(&self) -> io::Result<u64> {
        self.disk.bytes.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.disk.bytes.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.disk.lock();
        state.spend()?;
        let old_len = self.disk.bytes.len()?;
        // Shrinking loses a tail that a rollback must restore; growing adds
        // zeros that a rollback cuts off again.
        let tail = if len < old_len {
            let mut tail = vec![0u8; (old_len - len) as usize];
            self.disk.bytes.read(len, &mut tail)?;
            tail
        } else {
            Vec::new()
        };
        self.disk.bytes.set_len(len)?;
        state.unsynced.push(Unsynced::SetLen { old_len, tail, len });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.disk.lock();
        state.spend()?;
        state.unsynced.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.disk.lock();
        state.spend()?;
        let mut old = vec![0u8; data.len()];
        self.disk.bytes.read(offset, &mut old)?;
        self.disk.bytes.write(offset, data)?;
        state.unsynced.push(Unsynced::Write {
            offset,
            old,
            new: data.to_vec(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    use super::*;

    const S: usize = SECTOR_BYTES as usize;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// A disk of `sectors` sectors of `0xAA`, fsynced.
    fn synced_disk(sectors: usize) -> SimDisk {
        let disk = SimDisk::new();
        let h = disk.handle();
        h.set_len((sectors * S) as u64).unwrap();
        h.write(0, &vec![0xAA; sectors * S]).unwrap();
        h.sync_data().unwrap();
        disk
    }

    #[test]
    fn a_clean_loss_keeps_exactly_what_was_synced() {
        let disk = SimDisk::new();
        {
            let h = disk.handle();
            h.set_len(8).unwrap();
            h.write(0, b"abcdefgh").unwrap();
            h.sync_data().unwrap();
            h.write(2, b"XY").unwrap();
            h.set_len(4).unwrap();
            h.set_len(12).unwrap();
            h.write(10, b"zz").unwrap();
            assert!(disk.in_use());
        }
        assert!(!disk.in_use());
        let report = disk.power_loss(PowerLoss::Clean, &mut rng(0));
        assert_eq!((report.lost_writes, report.lost_resizes), (2, 2));
        assert_eq!(report.kept_writes + report.torn_writes, 0);
        assert_eq!(disk.snapshot(), b"abcdefgh");
    }

    #[test]
    fn synced_writes_survive_every_torn_loss() {
        for seed in 0..64 {
            let disk = synced_disk(4);
            {
                let h = disk.handle();
                h.write(100, &[1; 1000]).unwrap();
                h.sync_data().unwrap();
                // Unsynced writes elsewhere, and one shrink.
                h.write(3 * S as u64, &[2; S]).unwrap();
                h.set_len(3 * S as u64).unwrap();
            }
            disk.power_loss(PowerLoss::Torn, &mut rng(seed));
            let bytes = disk.snapshot();
            assert!(bytes.len() >= 3 * S, "seed {seed}: synced bytes cut off");
            assert_eq!(&bytes[..100], &[0xAA; 100][..], "seed {seed}");
            assert_eq!(&bytes[100..1100], &[1; 1000][..], "seed {seed}");
            assert_eq!(
                &bytes[1100..3 * S],
                &[0xAA; 3 * S - 1100][..],
                "seed {seed}"
            );
        }
    }

    /// Over many seeds, every write that spans sectors is kept, lost or
    /// torn at exactly a disk sector boundary; all three happen.
    #[test]
    fn torn_writes_keep_sector_aligned_prefixes_only() {
        let mut seen = [0u64; 3];
        for seed in 0..200 {
            let disk = synced_disk(8);
            // Starts and ends mid-sector: its sectors are those of the
            // disk, not of the write.
            let (offset, len) = (300usize, 5 * S);
            disk.handle()
                .write(offset as u64, &vec![0x55; len])
                .unwrap();
            let report = disk.power_loss(PowerLoss::Torn, &mut rng(seed));
            let bytes = disk.snapshot();
            assert_eq!(bytes.len(), 8 * S);
            let new = bytes[offset..offset + len]
                .iter()
                .take_while(|&&b| b == 0x55)
                .count();
            assert!(
                bytes[offset + new..].iter().all(|&b| b == 0xAA)
                    && bytes[..offset].iter().all(|&b| b == 0xAA),
                "seed {seed}: a new byte after an old one, or outside the write"
            );
            if report.kept_writes == 1 {
                assert_eq!(new, len, "seed {seed}");
                seen[0] += 1;
            } else if report.lost_writes == 1 {
                assert_eq!(new, 0, "seed {seed}");
                seen[1] += 1;
            } else {
                assert_eq!(report.torn_writes, 1);
                assert!(0 < new && new < len, "seed {seed}: torn to nothing or all");
                assert_eq!(
                    (offset + new) % S,
                    0,
                    "seed {seed}: cut off a sector boundary"
                );
                seen[2] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n > 0), "kept, lost, torn: {seen:?}");
    }

    /// Seed 0 tears a write of 300..2860 after the disk's sector
    /// boundary at 2048 (the fourth of the disk, the write's third): the
    /// bytes before it are new, every other byte is as synced. A change
    /// of the draw order shows here too.
    #[test]
    fn a_fixed_seed_tears_a_write_at_a_fixed_sector() {
        let disk = synced_disk(8);
        disk.handle().write(300, &[0x55; 5 * S]).unwrap();
        let report = disk.power_loss(PowerLoss::Torn, &mut rng(0));
        assert_eq!(report.torn_writes, 1, "the draw order changed");
        let mut expected = vec![0xAA; 8 * S];
        expected[300..4 * S].fill(0x55);
        assert_eq!(disk.snapshot(), expected);
    }

    #[test]
    fn a_write_within_one_sector_is_never_torn() {
        for seed in 0..64 {
            let disk = synced_disk(2);
            disk.handle().write(S as u64 + 10, &[7; 400]).unwrap();
            let report = disk.power_loss(PowerLoss::Torn, &mut rng(seed));
            assert_eq!(report.torn_writes, 0, "seed {seed}");
            let new = disk.snapshot().iter().filter(|&&b| b == 7).count();
            assert!(new == 0 || new == 400, "seed {seed}: {new} bytes landed");
        }
    }

    /// Two overlapping writes: three sectors of 1s (kept, lost or torn
    /// after one or two sectors), then one sector of 2s over the middle
    /// one (kept or lost: it cannot tear). The disk must show the image
    /// of one such pair of fates, applied in order, and the one the report
    /// counts.
    #[test]
    fn overlapping_writes_resolve_in_order() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let disk = synced_disk(4);
            {
                let h = disk.handle();
                h.write(0, &[1; 3 * S]).unwrap();
                h.write(S as u64, &[2; S]).unwrap();
            }
            let report = disk.power_loss(PowerLoss::Torn, &mut rng(seed));
            let bytes = disk.snapshot();
            // (sectors of the first write that landed, second kept)
            let fates = (0..=3).flat_map(|p| [(p, false), (p, true)]);
            let matching: Vec<_> = fates
                .filter(|&(p, second)| {
                    let mut image = vec![0xAA; 4 * S];
                    image[..p * S].fill(1);
                    if second {
                        image[S..2 * S].fill(2);
                    }
                    let counted = (
                        u64::from(p == 3) + u64::from(second),
                        u64::from(0 < p && p < 3),
                        u64::from(p == 0) + u64::from(!second),
                    );
                    image == bytes
                        && counted == (report.kept_writes, report.torn_writes, report.lost_writes)
                })
                .collect();
            assert!(
                !matching.is_empty(),
                "seed {seed}: {report:?} and an image no order gives"
            );
            seen.extend(matching);
        }
        // The later write kept over the earlier lost one, and lost over
        // the earlier kept one.
        assert!(seen.contains(&(0, true)), "{seen:?}");
        assert!(seen.contains(&(3, false)), "{seen:?}");
        assert!(seen.contains(&(1, false)), "{seen:?}");
    }

    /// A surviving write into room a lost growth made is cut off with it;
    /// after a surviving growth it lands.
    #[test]
    fn a_write_past_the_recovered_length_is_lost_with_its_resize() {
        let mut seen = [false; 2];
        for seed in 0..64 {
            let disk = synced_disk(1);
            {
                let h = disk.handle();
                h.set_len(2 * S as u64).unwrap();
                h.write(S as u64, &[9; S]).unwrap();
            }
            let report = disk.power_loss(PowerLoss::Torn, &mut rng(seed));
            let bytes = disk.snapshot();
            if report.kept_resizes == 1 {
                let expect = if report.kept_writes == 1 { 9 } else { 0 };
                assert_eq!(&bytes[S..], &[expect; S][..], "seed {seed}");
                seen[0] = true;
            } else {
                assert_eq!(bytes, vec![0xAA; S], "seed {seed}");
                seen[1] = true;
            }
        }
        assert_eq!(seen, [true; 2]);
    }

    /// Once the power is cut, nothing reaches the disk and an fsync
    /// makes nothing durable; the power loss then resolves what was
    /// written before the cut, and the power is back.
    #[test]
    fn a_power_cut_stops_every_later_write_and_fsync() {
        let disk = synced_disk(2);
        {
            let h = disk.handle();
            disk.cut_power_after(2);
            h.write(0, &[1; S]).unwrap();
            h.write(S as u64, &[2; S]).unwrap();
            assert!(!disk.power_failed());
            assert!(h.sync_data().is_err(), "an fsync after the cut");
            assert!(disk.power_failed());
            assert!(h.write(0, &[3; 1]).is_err());
            assert!(h.set_len(0).is_err());
            let mut out = [0u8; 1];
            h.read(S as u64, &mut out).unwrap();
            assert_eq!(out, [2], "reads see the page cache");
        }
        let report = disk.power_loss(PowerLoss::Clean, &mut rng(0));
        assert_eq!(
            report.lost_writes, 2,
            "the fsync after the cut did not count"
        );
        assert_eq!(disk.snapshot(), vec![0xAA; 2 * S]);
        assert!(!disk.power_failed());
        let h = disk.handle();
        h.write(0, &[4; 1]).unwrap();
        h.sync_data().unwrap();
        drop(h);
        disk.cut_power();
        disk.power_loss(PowerLoss::Torn, &mut rng(0));
        assert_eq!(disk.snapshot()[0], 4);
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        let run = |seed: u64| {
            let disk = synced_disk(16);
            {
                let h = disk.handle();
                for i in 0..40u64 {
                    let offset = (i * 977) % (12 * SECTOR_BYTES);
                    h.write(offset, &vec![i as u8; 1500]).unwrap();
                    if i % 13 == 0 {
                        h.set_len((16 + i) * SECTOR_BYTES).unwrap();
                    }
                }
            }
            let report = disk.power_loss(PowerLoss::Torn, &mut rng(seed));
            (report, disk.snapshot())
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7).1, run(8).1, "two seeds tore alike");
    }

    #[test]
    fn the_kind_of_loss_comes_from_the_seed_mostly_torn() {
        let mut r = rng(3);
        let torn = (0..1000)
            .filter(|_| PowerLoss::draw(&mut r) == PowerLoss::Torn)
            .count();
        assert!((650..850).contains(&torn), "{torn} of 1000 torn");
    }
}
