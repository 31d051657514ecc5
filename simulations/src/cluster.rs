//! The devices of one simulated store: their clocks, disks and lives.
//!
//! Device 0 creates the store; every other device joins from its key
//! export or with an invite from it ([`Keys`]). Each device has its own skewed view of one simulated wall clock
//! ([`SkewedClock`]), its own disk ([`SimDisk`]) and, for each time it boots,
//! fresh randomness derived from the seed (a rebooted device draws new
//! nonces, as a real one does). A device can be closed and reopened, crash
//! (its power cut, at once or a seeded few disk writes ahead, then dropped
//! without closing: its disk keeps what was fsynced and a seeded subset of
//! later writes, some torn) and reboot, or be reopened with a fresh export from device 0 to receive keys of epochs
//! made since it last imported ("key delivery": until pairing lands, that
//! is how a new epoch reaches another device).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use persist::{Config, Env, KdfParams, ManualClock, OpenError, SeededEntropy, Store};
use persist_core::Locator;
use persist_core::env::{Clock, FaultPoint, Faults, SeededFaults};
use persist_storage::LocalDb;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::disk::{PowerLoss, PowerLossReport, SimDisk};
use crate::net::SimNet;

/// The passphrase of every export in a run (the KDF is cheap under test).
const EXPORT_PASSPHRASE: &str = "simulated export passphrase";
/// How long, in simulated time, a device joining with an invite waits
/// for its inviter: long enough for a reconnect or two through the faults
/// of a run, short enough that a join cut off by a partition fails and is
/// retried at a later step.
pub const JOIN_WAIT_MAX: Duration = Duration::from_secs(120);
/// How long a crashed device waits, in simulated time, for its old
/// actors to let go of the disk before it gives up.
const RELEASE_WAIT_MAX: Duration = Duration::from_secs(60);
/// The poll interval of that wait.
const RELEASE_POLL: Duration = Duration::from_millis(10);
/// An armed power cut comes within this many writes, resizes and fsyncs:
/// about what one put's commit asks of redb, so that the cut lands before,
/// inside and after it.
const POWER_CUT_OPS_MAX: u64 = 24;

/// One device's wall clock: the run's clock plus a fixed skew.
#[derive(Clone, Debug)]
pub struct SkewedClock {
    base: ManualClock,
    skew_ms: i64,
}

impl SkewedClock {
    /// The reading of `base` shifted by `skew_ms`.
    pub fn new(base: ManualClock, skew_ms: i64) -> Self {
        Self { base, skew_ms }
    }

    /// The skew, ms.
    pub fn skew_ms(&self) -> i64 {
        self.skew_ms
    }
}

impl Clock for SkewedClock {
    fn now_ms(&self) -> u64 {
        self.base.now_ms().saturating_add_signed(self.skew_ms)
    }
}

/// A device of the store.
pub struct Device {
    /// Its index in the run (0 created the store).
    pub index: usize,
    store: Option<Store>,
    dir: PathBuf,
    disk: SimDisk,
    clock: SkewedClock,
    /// Boots so far; each draws fresh randomness.
    boots: u64,
    /// Crashes so far; each loses power with its own randomness.
    crashes: u64,
    /// The highest epoch this device holds keys for, as far as the
    /// workload delivered them.
    pub keys_epoch: u32,
}

impl Device {
    /// The skew of this device's clock, ms.
    pub fn clock_skew_ms(&self) -> i64 {
        self.clock.skew_ms()
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("index", &self.index)
            .field("open", &self.store.is_some())
            .field("skew_ms", &self.clock.skew_ms)
            .field("boots", &self.boots)
            .finish_non_exhaustive()
    }
}

/// How a device's reboot goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// `close()`: every accepted write committed, actors stopped.
    Clean,
    /// The power cut, then dropped without closing: fsynced bytes stay,
    /// and of later writes what the seed lets survive, some torn (see
    /// [`crate::disk`]).
    Crash,
}

/// Where a booting device's keys come from.
#[derive(Clone, Copy, Debug)]
pub enum Keys<'a> {
    /// Its own store: a new one, or the one on its disk.
    Held,
    /// A key export from device 0 (joins, or takes new epochs).
    Export(&'a str),
    /// An invite code from device 0 (joins by pairing).
    Invite(&'a str),
}

/// Rows read per page by [`Cluster::rows`].
const ROWS_PAGE: usize = 256;

/// One row of a device's database, as [`Cluster::rows`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRow {
    /// Its locator.
    pub locator: Locator,
    /// The envelope.
    pub envelope: Vec<u8>,
    /// Held for later (a key or signer it waits for), not stored.
    pub held: bool,
}

/// Every device of a run, and what they share.
pub struct Cluster {
    /// The devices, by index.
    pub devices: Vec<Device>,
    /// The network.
    pub net: SimNet,
    /// The simulated wall clock devices skew from.
    pub clock: ManualClock,
    seed: u64,
    /// The product's fault points ("buggify"), shared by every device and
    /// drawn from the seed; inactive until a workload turns them on.
    pub faults: Arc<SeededFaults>,
    /// Whether a reboot draws fresh randomness (only a negative test
    /// turns this off, to prove the nonce checker catches reuse).
    pub fresh_entropy_on_boot: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("devices", &self.devices)
            .field("net", &self.net)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// `skews.len()` devices under `root`, none open yet.
    pub fn new(seed: u64, root: &Path, start_ms: u64, skews: &[i64]) -> Self {
        let clock = ManualClock::new(start_ms);
        let devices = skews
            .iter()
            .enumerate()
            .map(|(index, &skew)| Device {
                index,
                store: None,
                dir: root.join(format!("device-{index}")),
                disk: SimDisk::new(),
                clock: SkewedClock::new(clock.clone(), skew),
                boots: 0,
                crashes: 0,
                keys_epoch: 0,
            })
            .collect();
        Self {
            devices,
            net: SimNet::new(derive(seed, "net", 0, 0), skews.len()),
            clock,
            seed,
            faults: inactive(SeededFaults::new(derive_bytes(seed, "buggify", 0, 0))),
            fresh_entropy_on_boot: true,
        }
    }

    /// Switches on exactly `points` of the product's fault points (instead
    /// of those the seed draws; none if empty); before any device boots.
    pub fn only_fault_points(&mut self, points: &[FaultPoint]) {
        let seed = derive_bytes(self.seed, "buggify", 0, 0);
        self.faults = inactive(SeededFaults::with_points(seed, points));
    }

    /// The open store of device `index`, if it is up.
    pub fn store(&self, index: usize) -> Option<&Store> {
        self.devices[index].store.as_ref()
    }

    /// Device `index`'s clock reading now.
    pub fn device_now_ms(&self, index: usize) -> u64 {
        self.devices[index].clock.now_ms()
    }

    /// Boots device `index`, importing `export` (an export of device 0)
    /// if given.
    pub async fn boot(&mut self, index: usize, keys: Keys<'_>) -> Result<(), OpenError> {
        let device = &mut self.devices[index];
        debug_assert!(device.store.is_none(), "boot of a running device");
        // Actors of a crashed store may still be winding down.
        let mut waited = Duration::ZERO;
        while device.disk.in_use() && waited < RELEASE_WAIT_MAX {
            tokio::time::sleep(RELEASE_POLL).await;
            waited += RELEASE_POLL;
        }
        if device.disk.in_use() {
            return Err(OpenError::Start(format!(
                "simulation: device {index}'s previous store still holds its disk after {}s",
                RELEASE_WAIT_MAX.as_secs()
            )));
        }
        if self.fresh_entropy_on_boot {
            device.boots += 1;
        }
        let entropy = SeededEntropy::new(derive_bytes(self.seed, "device", index, device.boots));
        let env = Env {
            clock: Arc::new(device.clock.clone()),
            entropy: Arc::new(entropy),
            faults: Faults::new(self.faults.clone()),
        };
        let mut config = Config::new(device.dir.join("store"))
            .key_file(device.dir.join("keys").join("device.key"))
            .name(format!("device-{index}"))
            .storage_backend(device.disk.handle());
        match keys {
            Keys::Held => {}
            Keys::Export(export) => config = config.key(export, EXPORT_PASSPHRASE),
            Keys::Invite(code) => config = config.invite(code).invite_timeout(JOIN_WAIT_MAX),
        }
        let config = config
            .dangerous()
            .env(env)
            .export_kdf(KdfParams::insecure_for_tests())
            .sync_via("sim-relay", self.net.dial_for(index))
            .done();
        device.store = Some(Store::open(config).await?);
        Ok(())
    }

    /// Shuts device `index` down, cleanly or by crashing; a crash reports
    /// what its power loss did to the writes not yet fsynced.
    pub async fn shutdown(
        &mut self,
        index: usize,
        how: Shutdown,
    ) -> Result<PowerLossReport, String> {
        let seed = self.seed;
        let device = &mut self.devices[index];
        let Some(store) = device.store.take() else {
            return Ok(PowerLossReport::default());
        };
        match how {
            Shutdown::Clean => {
                store.close().await.map_err(|e| e.to_string())?;
                Ok(PowerLossReport::default())
            }
            Shutdown::Crash => {
                // The power goes now (if a cut armed by `arm_power_cut` did
                // not already take it): what the dropped store does on its
                // way down, redb's clean shutdown included, never lands.
                device.disk.cut_power();
                drop(store);
                let mut waited = Duration::ZERO;
                while device.disk.in_use() && waited < RELEASE_WAIT_MAX {
                    tokio::time::sleep(RELEASE_POLL).await;
                    waited += RELEASE_POLL;
                }
                if device.disk.in_use() {
                    return Err(format!(
                        "device {index}: a dropped store still holds its disk after {}s",
                        RELEASE_WAIT_MAX.as_secs()
                    ));
                }
                // Drawn once the old store let go of the disk, from a
                // stream of this device's own crash: what survives depends
                // on the seed and on what the store wrote, never on when
                // other tasks ran.
                device.crashes += 1;
                let mut rng = crash_rng(seed, "power-loss", index, device.crashes);
                let kind = PowerLoss::draw(&mut rng);
                Ok(device.disk.power_loss(kind, &mut rng))
            }
        }
    }

    /// Arms device `index`'s disk to lose power a seeded few writes,
    /// resizes or fsyncs from now, so that its next crash can land in the
    /// middle of whatever it does next (a commit, most likely). Returns a
    /// further draw of that crash's stream, for the caller's own choices.
    pub fn arm_power_cut(&self, index: usize) -> u64 {
        let device = &self.devices[index];
        // The coming crash's; its power loss draws from another stream,
        // so arming or not shifts nothing there.
        let mut rng = crash_rng(self.seed, "power-cut", index, device.crashes + 1);
        device
            .disk
            .cut_power_after(rng.next_u64() % POWER_CUT_OPS_MAX);
        rng.next_u64()
    }

    /// A fresh export of device 0's keys (every epoch it holds).
    pub async fn export_from_zero(&self) -> Result<String, String> {
        let store = self.store(0).ok_or("device 0 is down")?;
        let export = store
            .crypto()
            .export_key_with(EXPORT_PASSPHRASE)
            .await
            .map_err(|e| e.to_string())?;
        Ok(export.export)
    }

    /// An invite from device 0, answered while device 0 stays up.
    pub async fn invite_from_zero(&self) -> Result<String, String> {
        let store = self.store(0).ok_or("device 0 is down")?;
        let invite = store
            .crypto()
            .create_invite()
            .await
            .map_err(|e| e.to_string())?;
        Ok(invite.code().to_owned())
    }

    /// Every row device `index` stores (`held` false) or holds for later
    /// (`held` true), read from its disk; the device must be shut down.
    pub fn rows(&self, index: usize) -> Result<Vec<StoredRow>, String> {
        let device = &self.devices[index];
        if device.store.is_some() || device.disk.in_use() {
            return Err(format!("device {index} is still running"));
        }
        let path = device.dir.join("store").join(persist::DB_FILE);
        let db = LocalDb::open(&path, Some(device.disk.handle()))
            .map_err(|e| format!("device {index}'s database: {e}"))?;
        let read = db
            .begin_read()
            .map_err(|e| format!("device {index}'s database: {e}"))?;
        let failed = |e: persist_storage::StorageError| format!("device {index}'s rows: {e}");
        let mut rows = Vec::new();
        let mut after = None;
        loop {
            let page = read
                .records_page(after.as_ref(), ROWS_PAGE)
                .map_err(failed)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            rows.extend(page.into_iter().map(|(locator, row)| StoredRow {
                locator,
                envelope: row.envelope,
                held: false,
            }));
        }
        let mut after = None;
        loop {
            let page = read
                .pending_page(after.as_ref(), ROWS_PAGE)
                .map_err(failed)?;
            let Some(last) = page.last() else { break };
            after = Some(last.held);
            rows.extend(page.into_iter().map(|p| StoredRow {
                locator: p.held.locator,
                envelope: p.envelope,
                held: true,
            }));
        }
        drop(read);
        db.close()
            .map_err(|e| format!("device {index}'s database: {e}"))?;
        Ok(rows)
    }

    /// Closes every device that is up.
    pub async fn close_all(&mut self) -> Result<(), String> {
        for index in 0..self.devices.len() {
            self.shutdown(index, Shutdown::Clean).await?;
        }
        Ok(())
    }
}

/// A fault plan that fires nothing until a workload activates it.
fn inactive(faults: SeededFaults) -> Arc<SeededFaults> {
    faults.set_active(false);
    Arc::new(faults)
}

/// The `label` stream of device `index`'s `crash`-th crash (from 1).
fn crash_rng(seed: u64, label: &str, index: usize, crash: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive(seed, label, index, crash))
}

/// A `u64` for `label`'s `a`-th/`b`-th use, derived from the run's seed.
pub fn derive(seed: u64, label: &str, a: usize, b: u64) -> u64 {
    let bytes = derive_bytes(seed, label, a, b);
    u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

fn derive_bytes(seed: u64, label: &str, a: usize, b: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"persist-sim/derive/v1");
    h.update(seed.to_le_bytes());
    h.update((label.len() as u64).to_le_bytes());
    h.update(label.as_bytes());
    h.update((a as u64).to_le_bytes());
    h.update(b.to_le_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use rand_core::TryRng;

    use super::*;

    /// Draws only zeros: a torn power loss then keeps every write whole.
    struct Zeros;

    impl TryRng for Zeros {
        type Error = Infallible;

        fn try_next_u32(&mut self) -> Result<u32, Infallible> {
            Ok(0)
        }

        fn try_next_u64(&mut self) -> Result<u64, Infallible> {
            Ok(0)
        }

        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
            dst.fill(0);
            Ok(())
        }
    }

    /// Cuts device 0's power `ops` disk operations into a put of "new"
    /// over an acknowledged "old", loses power of `kind` (drawing from
    /// `rng`), reboots, and returns the put's outcome and what `p` holds.
    async fn put_across_power_cut(
        ops: u64,
        kind: PowerLoss,
        rng: &mut impl Rng,
    ) -> (Result<(), persist::WriteError>, Option<String>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::new(1, dir.path(), 1_700_000_000_000, &[0]);
        cluster.boot(0, Keys::Held).await.unwrap();
        cluster.store(0).unwrap().put("p", "old").await.unwrap();
        cluster.devices[0].disk.cut_power_after(ops);
        let put = cluster.store(0).unwrap().put("p", "new").await;
        let device = &mut cluster.devices[0];
        device.disk.cut_power();
        drop(device.store.take());
        while device.disk.in_use() {
            tokio::time::sleep(RELEASE_POLL).await;
        }
        device.disk.power_loss(kind, rng);
        cluster.boot(0, Keys::Held).await.unwrap();
        let held = cluster.store(0).unwrap().get("p").await.unwrap();
        cluster.close_all().await.unwrap();
        (put, held)
    }

    /// A power cut at every point of a put's commit: an acknowledged put
    /// survives; a failed one is gone after a clean loss, and may survive a
    /// torn one (a commit cut off at its fsync, with every write landed),
    /// so its error must not say it was not stored. Regression: the error
    /// said "commit failed, nothing of this write was stored", and the
    /// write was there after the reboot.
    #[test]
    fn a_put_cut_off_at_any_point_is_all_or_nothing_and_its_error_says_so() {
        let runtime = crate::harness::paused_runtime().unwrap();
        let (mut failed, mut failed_yet_stored) = (0, 0);
        runtime.block_on(async {
            for ops in 0..POWER_CUT_OPS_MAX {
                let (put, held) = put_across_power_cut(ops, PowerLoss::Clean, &mut Zeros).await;
                let want = if put.is_ok() { "new" } else { "old" };
                assert_eq!(
                    held.as_deref(),
                    Some(want),
                    "clean loss {ops} ops in: {put:?}"
                );

                let (put, held) = put_across_power_cut(ops, PowerLoss::Torn, &mut Zeros).await;
                match put {
                    Ok(()) => assert_eq!(held.as_deref(), Some("new"), "acknowledged, then lost"),
                    Err(e) => {
                        failed += 1;
                        let message = e.to_string();
                        assert!(
                            message.contains("may or may not be stored")
                                && !message.contains("not stored:"),
                            "{message}"
                        );
                        if held.as_deref() == Some("new") {
                            failed_yet_stored += 1;
                        } else {
                            assert_eq!(held.as_deref(), Some("old"), "{ops} ops in");
                        }
                    }
                }
            }
        });
        assert!(failed > 0, "no cut landed inside the commit");
        assert!(failed_yet_stored > 0, "no failed commit landed whole");
    }
}
