//! The `sync` workload: several devices of one store write, read, sync,
//! rotate keys, crash and lose their network, then calm down and must
//! agree.
//!
//! **Setup.** Device 0 creates the store and writes a few records; device
//! 1 joins by pairing with an invite from device 0 (through the simulated
//! relay's mailboxes), the others from its key export (all but the late
//! joiner, below); everyone syncs once, with no faults.
//!
//! **Late join.** In four runs in five ([`JoinPlan`], drawn apart from the
//! rest of the run; off with [`SyncOptions::late_joins`]) the last device
//! joins in the run phase instead: device 0 makes an invite at a seeded
//! step, and the device joins with it up to a dozen steps later, while
//! device 0 may have rotated or revoked meanwhile. Through the faults a
//! join may time out or fail at a fault point; it is tried again eight
//! steps later with a new invite (a store whose join stored its keys and
//! then failed resumes it), and in the quiet phase, with every fault off,
//! it must go through. Until it joins, the device is no member: no step
//! writes, reads, syncs, crashes or rekeys it, a revocation of it waits,
//! and the revoked device's isolation does not wait for it to learn of
//! the revocation (it joins with the revocation in its keys). Once joined
//! it is a device like the others, and the end-state checks hold it to
//! the whole history.
//!
//! **Run.** The seed switches whole classes of faults on or off for the
//! run ("buggify"): network faults at an intensity, device crashes,
//! partitions, relay restarts, key rotations. Then each step moves the
//! clock and does one thing: a put, delete or read on a random device, a
//! `sync_now`, a rotation on device 0 (whose key courier also posts the
//! new key to every member's mailbox), a key delivery to another device
//! (reopened with a fresh export of device 0), a crash (the power failing,
//! in most crashes a few disk writes into a put) and reboot, a clean
//! restart, a partition or heal, the relay going down or up. Reads are
//! checked at once (no phantom values); epochs and held counts are sampled.
//!
//! **Revocation.** In most runs (drawn from the seed, apart from the
//! fault switches so that a run is the same up to that step with it or
//! without it), device 0 revokes another member at a seeded step of the
//! run phase (later if device 0 is down then, or does not know the
//! member yet). The revoked device is the adversary: it keeps running
//! with its old keys and database, writes, reads, syncs, crashes and
//! reboots like the others, but never receives a key again. Device 0's
//! key courier sends the revocation's key (with the relay's next access
//! token) to the remaining members and, once they all acknowledge it,
//! switches the relay to the new token, after which the relay refuses
//! the revoked device. The reference leaves out what the revoked device
//! signed after its revocation (stamped after it, by its HLC), and the
//! end-state checks compare only the remaining members, plus two
//! invariants of their own: the revoked device never reads a value a
//! member wrote under the revocation's epoch or later, and no member
//! that knows of the revocation reads, and none at the end holds, a value
//! the revoked device wrote after its revocation. Unless the run lets the
//! revocation race ([`SyncOptions::revocation_races`]), the revoked
//! device is partitioned from the relay until every member knows of its
//! revocation, and a member that does not know yet gets no key export.
//!
//! **Quiesce, then check.** Faults stop, every device boots, gets the
//! newest keys (the revoked device excepted), and syncs until the
//! members are synced and agree; then every invariant of
//! [`crate::checkers`] runs.
//!
//! Rotations start on any device, so two devices often rotate to the same
//! epoch number under different keys before they hear of each other;
//! every member must end with both keys and seal under the same one.
//! Revocations start only on device 0, and in a run with a revocation
//! only device 0 rotates: a member that has not heard of a revocation yet
//! and rotates gives its new key to the revoked device too, and members
//! that take that key do not rotate again yet (an open gap in Persist).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use persist::{DeviceId, JoinError, KeyError, OpenError, RevokeError};
use persist_core::Epoch;
use persist_core::env::INJECTED_FAULT;
use persist_core::export::ExportedKeys;
use persist_storage::relay::RelayBackend;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use crate::checkers::{self, AckWrite, RevokedDevice, Violation, violation};
use crate::cluster::{Cluster, Keys, Shutdown};
use crate::net::NetFaults;
use crate::trace::{Event, Trace};

/// Devices unless told otherwise.
pub const DEVICES_DEFAULT: usize = 3;
/// Run-phase steps unless told otherwise.
pub const STEPS_DEFAULT: usize = 300;
/// Largest skew between a device's clock and the simulated wall clock in
/// an ordinary run: twice it stays under the HLC's default drift limit
/// (10 minutes), so no device's writes look like they come from the
/// future to another.
pub const SKEW_MS_MAX: u64 = 4 * 60 * 1000;
/// The skew of the far-ahead device in a skew run: past the drift limit
/// (so its writes are held elsewhere) and within the ±1 h the design
/// promises to survive.
pub const FAR_SKEW_MS: (u64, u64) = (15 * 60 * 1000, 60 * 60 * 1000);
/// A path that must never appear in the clear.
pub const CANARY_PATH: &str = "canary/path-c4n4ry-7e1d93a0";
/// Every value carries this; it must never appear in the clear.
pub const CANARY_VALUE: &str = "c4n4ry-v4lue-5b0e2f61";
/// The paths the workload writes: few, so devices collide.
pub const SYNC_PATHS: &[&str] = &["a/0", "a/1", "a/2", "b/0", "b/1", "c", CANARY_PATH];
/// Records device 0 writes in setup.
const SETUP_RECORDS: usize = 3;
/// Simulated time a `sync_now` gets before it counts as hung.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Steps between a late join that failed and its next try.
const JOIN_RETRY_STEPS: usize = 8;
/// The most steps between device 0 making the first invite of a late join
/// and the joiner using it: device 0 may rotate or revoke meanwhile.
const INVITE_AGE_STEPS_MAX: u64 = 12;
/// Rounds of "everyone syncs" the quiet phase allows before it checks
/// anyway.
const QUIESCE_ROUNDS_MAX: usize = 12;
/// Genuine held envelopes a device may have. Per locator (a path, a
/// device's announcement, a revocation's record) one verified envelope (it
/// replaces those it outranks and keeps out those it does not), and some
/// it cannot check yet (from a signer it does not know, under a key it
/// lacks), which replace nothing: as many as there are devices besides.
/// A forgery whose signer no member knows may be held besides (see
/// [`crate::net::SimNet::forged_signers`]).
fn held_bound(devices: usize, revocations: usize) -> u64 {
    ((SYNC_PATHS.len() + devices + revocations) * devices) as u64
}

/// Which fault classes a run switches on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Switches {
    /// Network fault intensity, 0 (off) to 3.
    pub net: u32,
    /// Device crashes (with power loss) and clean restarts.
    pub crashes: bool,
    /// Devices partitioned from the relay.
    pub partitions: bool,
    /// The relay going down and coming back.
    pub relay_restarts: bool,
    /// Key rotations on device 0, and key deliveries.
    pub rotations: bool,
    /// Device 0 revokes another member during the run (drawn apart from
    /// the others: see [`RevokePlan`]).
    pub revocation: bool,
}

/// When a run's revocation happens, and of whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevokePlan {
    /// The first run-phase step at which device 0 tries to revoke.
    pub at_step: usize,
    /// The device it revokes (never 0).
    pub victim: usize,
}

impl RevokePlan {
    /// The plan of a run without a sabotage, from its own stream of the
    /// seed (so drawing it changes none of the run's other choices), or
    /// `None` in runs without a revocation (two in five).
    pub fn draw(opts: &SyncOptions) -> Option<RevokePlan> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(crate::cluster::derive(opts.seed, "revocation", 0, 0));
        if rng.next_u32() % 5 >= 3 || opts.devices < 2 {
            return None;
        }
        let victim = 1 + (rng.next_u64() % (opts.devices as u64 - 1)) as usize;
        // In the first three fifths of the run: time enough afterwards for
        // the adversary to write and the relay switch to happen.
        let first = opts.steps / 5;
        let span = (opts.steps * 2 / 5).max(1) as u64;
        let at_step = first + (rng.next_u64() % span) as usize;
        Some(RevokePlan { at_step, victim })
    }
}

/// When a run's last device joins, with an invite from device 0, in the
/// run phase rather than at setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinPlan {
    /// The device that joins late: the last one.
    pub device: usize,
    /// The step at which device 0 makes the invite of the first try.
    pub invite_step: usize,
    /// The step of the first try (later tries take new invites).
    pub at_step: usize,
}

impl JoinPlan {
    /// The plan of a run, from its own stream of the seed (so drawing it
    /// changes none of the run's other choices), or `None` in runs without
    /// a late join (one in five, and every sabotaged run).
    pub fn draw(opts: &SyncOptions) -> Option<JoinPlan> {
        if !opts.late_joins || opts.fault.is_some() || opts.devices < 2 {
            return None;
        }
        let mut rng =
            ChaCha8Rng::seed_from_u64(crate::cluster::derive(opts.seed, "late-join", 0, 0));
        if rng.next_u32().is_multiple_of(5) {
            return None;
        }
        // In the first half of the run: time enough afterwards for the
        // joiner to write, rotate, crash and be revoked like the others.
        let first = opts.steps / 10;
        let span = (opts.steps * 2 / 5).max(1) as u64;
        let invite_step = first + (rng.next_u64() % span) as usize;
        let at_step = invite_step + (rng.next_u64() % (INVITE_AGE_STEPS_MAX + 1)) as usize;
        Some(JoinPlan {
            device: opts.devices - 1,
            invite_step,
            at_step,
        })
    }
}

/// A deliberate break of a property, to prove its checker fails. Never set
/// in a real run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncFault {
    /// The model believes device 0 acknowledged a put that never happened,
    /// at the end of the run: a lost write.
    PhantomAck,
    /// After the devices agree, device 1 writes without syncing.
    WriteAfterQuiesce,
    /// A frame carrying the canary value is added to the tap.
    LeakCanary,
    /// A reading of device 0's epoch lower than the one before.
    EpochRegress,
    /// Device 0 rotates at the start and device 1 never receives the key.
    WithholdKeys,
    /// Device 0 reboots twice with the same randomness, writing after each.
    ReuseEntropy,
    /// Device 0 revokes device 1 at the start, device 1 is handed a fresh
    /// export of device 0's keys (the revocation's epoch included), and
    /// device 0 writes.
    RevokedGetsKeys,
    /// Device 0 revokes device 1 at the start; device 1 writes after its
    /// revocation; before the quiet phase device 0 writes that same value
    /// under its own signature, so the members take it.
    MemberAdoptsRevokedWrite,
    /// Device 0 writes at the start without the model knowing, then
    /// reads it back: to the model, a value no device wrote.
    UnrecordedWrite,
    /// Device 0 rotates at the start with key parcels dropped, and writes
    /// more paths than the workload's own; device 1, without the key,
    /// holds them all.
    HeldOverflow,
    /// After the devices agree, device 1 rotates without syncing.
    RotateAfterQuiesce,
    /// In the quiet phase the relay drops every connection and then takes
    /// a day to answer a dial.
    HangingRelay,
    /// During the run the relay puts an exact copy in front of every entry
    /// it serves and counts it as a forgery, as it would one the product
    /// could not tell from the genuine.
    ForgedCopies,
}

impl SyncFault {
    /// Whether the sabotage needs the start-of-run revocation of device 1.
    fn revokes(self) -> bool {
        matches!(
            self,
            SyncFault::RevokedGetsKeys | SyncFault::MemberAdoptsRevokedWrite
        )
    }
}

/// What the sync workload runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncOptions {
    /// The seed.
    pub seed: u64,
    /// Devices (at least 2).
    pub devices: usize,
    /// Run-phase steps.
    pub steps: usize,
    /// One device runs far ahead of the others (beyond the drift limit).
    pub far_skew: bool,
    /// Lets the revocation race the members' learning of it. Off, the
    /// revoked device is partitioned from the relay from its revocation
    /// until every remaining member knows of it, and a member that does
    /// not know of it yet gets no key export (keys reach it through its
    /// mailbox, with the revocation). On, neither holds, and two open
    /// product bugs show: a member that accepted the revoked device's
    /// later write before it learned of the revocation reseals it, and
    /// the other members take the reseal (ingest checks the signer's
    /// revocation, not the write's origin); and a member that takes the
    /// revocation's key from an export (which carries no revocations)
    /// passes it to the revoked device through its mailbox.
    pub revocation_races: bool,
    /// Lets the last device join mid-run in most runs (see [`JoinPlan`]);
    /// off, every device joins at setup.
    pub late_joins: bool,
    /// A deliberate break (tests only).
    pub fault: Option<SyncFault>,
}

/// What a finished sync run reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncSummary {
    /// Faults that fired, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Invariant checks that ran, by invariant.
    pub checks: BTreeMap<&'static str, u64>,
    /// Live records at the end.
    pub records: usize,
}

/// Why a sync run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncRunError {
    /// An invariant did not hold.
    #[error("{0}")]
    Violation(#[from] Violation),
    /// The store failed where nothing should have.
    #[error("{phase}: {what}")]
    Engine {
        /// `setup`, `run`, `quiesce` or `check`.
        phase: &'static str,
        /// What failed.
        what: String,
    },
}

fn engine(phase: &'static str, what: impl Into<String>) -> SyncRunError {
    SyncRunError::Engine {
        phase,
        what: what.into(),
    }
}

/// The workload's state across its phases.
pub struct SyncWorkload {
    opts: SyncOptions,
    rng: ChaCha8Rng,
    switches: Switches,
    acks: Vec<AckWrite>,
    /// Every value ever put (acknowledged or not), per path.
    written: BTreeMap<String, BTreeSet<String>>,
    /// The last current epoch seen per device.
    epochs: Vec<u32>,
    /// Each device's id, once it booted.
    ids: Vec<Option<DeviceId>>,
    /// The revocation this run makes, if any, until it is made.
    plan: Option<RevokePlan>,
    /// The run's late join, if any.
    join_plan: Option<JoinPlan>,
    /// The late joiner, until it joined: not a member yet, so no step
    /// touches it and no checker counts it.
    unjoined: Option<usize>,
    /// The invite device 0 made for the late join's first try, until used.
    join_invite: Option<String>,
    /// The step of the late join's next try.
    next_join_try: usize,
    /// The revocation made.
    revoked: Option<RevokedDevice>,
    /// When device 0 revoked, if writing the revocation's record failed
    /// after it (the revocation stands; the retry only writes the record).
    revoked_unrecorded_at: Option<u64>,
    /// Values members put once they held the revocation's epoch: the
    /// revoked device must never read one.
    written_after: BTreeSet<String>,
    /// Values the revoked device put stamped after its revocation (its
    /// clock, a lower bound of its HLC, past the revocation's): no member
    /// may ever read or hold one.
    revoked_later: BTreeSet<String>,
    /// The revoked device is kept from the relay until every member knows
    /// of its revocation (see [`SyncOptions::revocation_races`]).
    isolated: bool,
    summary: SyncSummary,
}

impl std::fmt::Debug for SyncWorkload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncWorkload")
            .field("opts", &self.opts)
            .field("switches", &self.switches)
            .finish_non_exhaustive()
    }
}

/// The skews of a run's devices, drawn from the seed.
pub fn skews(opts: &SyncOptions) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(crate::cluster::derive(opts.seed, "skew", 0, 0));
    (0..opts.devices)
        .map(|i| {
            if opts.far_skew && i + 1 == opts.devices {
                let (lo, hi) = FAR_SKEW_MS;
                (lo + rng.next_u64() % (hi - lo)) as i64
            } else {
                (rng.next_u64() % (2 * SKEW_MS_MAX + 1)) as i64 - SKEW_MS_MAX as i64
            }
        })
        .collect()
}

impl SyncWorkload {
    /// The workload of `opts`.
    pub fn new(opts: SyncOptions) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let plan = match opts.fault {
            None => RevokePlan::draw(&opts),
            Some(f) if f.revokes() => Some(RevokePlan {
                at_step: 0,
                victim: 1,
            }),
            Some(_) => None,
        };
        let switches = if opts.fault.is_some() {
            Switches {
                revocation: plan.is_some(),
                ..Switches::default()
            }
        } else {
            Switches {
                net: (rng.next_u32() % 4),
                crashes: rng.next_u32() % 2 == 0,
                partitions: rng.next_u32() % 2 == 0,
                relay_restarts: rng.next_u32() % 3 == 0,
                rotations: rng.next_u32() % 3 != 0,
                revocation: plan.is_some(),
            }
        };
        let epochs = vec![0; opts.devices];
        let ids = vec![None; opts.devices];
        let join_plan = JoinPlan::draw(&opts);
        Self {
            opts,
            rng,
            switches,
            join_plan,
            unjoined: join_plan.map(|p| p.device),
            join_invite: None,
            next_join_try: join_plan.map_or(0, |p| p.at_step),
            acks: Vec::new(),
            written: BTreeMap::new(),
            epochs,
            ids,
            plan,
            revoked: None,
            revoked_unrecorded_at: None,
            written_after: BTreeSet::new(),
            revoked_later: BTreeSet::new(),
            isolated: false,
            summary: SyncSummary::default(),
        }
    }

    /// The fault classes this run switched on.
    pub fn switches(&self) -> Switches {
        self.switches
    }

    /// The revocation this run made, once made.
    pub fn revoked(&self) -> Option<&RevokedDevice> {
        self.revoked.as_ref()
    }

    /// The run's late join, if it has one.
    pub fn join_plan(&self) -> Option<JoinPlan> {
        self.join_plan
    }

    /// Whether device `d` is the revoked one.
    fn is_revoked(&self, d: usize) -> bool {
        self.revoked.as_ref().is_some_and(|r| r.device == d)
    }

    /// Whether device `d` is the late joiner and has not joined yet.
    fn is_unjoined(&self, d: usize) -> bool {
        self.unjoined == Some(d)
    }

    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0, "an empty range has no member");
        self.rng.next_u64() % n
    }

    fn checked(&mut self, invariant: &'static str) {
        *self.summary.checks.entry(invariant).or_default() += 1;
    }

    fn fired(&mut self, kind: &str) {
        *self.summary.faults.entry(kind.to_owned()).or_default() += 1;
    }

    /// Moves the simulated wall clock and the runtime's clock together.
    async fn advance(&mut self, cluster: &Cluster, trace: &mut Trace, ms: u64) {
        trace.record(Event::Advance, &[&ms.to_be_bytes()]);
        cluster.clock.advance(ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn delay_ms(&mut self) -> u64 {
        match self.below(100) {
            0..70 => self.below(50),
            70..97 => self.below(3_000),
            _ => self.below(60_000),
        }
    }

    /// Brings up device 0 and the others from its export; all sync once.
    pub async fn setup(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
    ) -> Result<(), SyncRunError> {
        let skews: Vec<i64> = (0..self.opts.devices)
            .map(|i| cluster.devices[i].clock_skew_ms())
            .collect();
        trace.note(format!(
            "setup devices={} skews_ms={skews:?} switches={:?} fault={:?}",
            self.opts.devices, self.switches, self.opts.fault
        ));
        cluster
            .boot(0, Keys::Held)
            .await
            .map_err(|e| engine("setup", format!("boot device 0: {e}")))?;
        for path in SYNC_PATHS.iter().take(SETUP_RECORDS) {
            self.put(cluster, trace, 0, path, None).await?;
        }
        let export = cluster
            .export_from_zero()
            .await
            .map_err(|e| engine("setup", e))?;
        // Device 1 joins by pairing with device 0 through the relay, the
        // others from a key export: both ways in every run.
        for d in 1..self.opts.devices {
            if let Some(plan) = self.join_plan.filter(|p| p.device == d) {
                trace.note(format!(
                    "d{d} joins later: invite at step {}, first try at step {}",
                    plan.invite_step, plan.at_step
                ));
                continue;
            }
            let invite;
            let keys = if d == 1 {
                invite = cluster
                    .invite_from_zero()
                    .await
                    .map_err(|e| engine("setup", e))?;
                trace.note(format!("d{d} joins with an invite"));
                Keys::Invite(&invite)
            } else {
                Keys::Export(&export)
            };
            cluster
                .boot(d, keys)
                .await
                .map_err(|e| engine("setup", format!("boot device {d}: {e}")))?;
        }
        for d in 0..self.opts.devices {
            cluster.devices[d].keys_epoch = self.sample(cluster, d).await?;
            self.ids[d] = cluster.store(d).map(|s| s.info().device_id);
        }
        for d in 0..self.opts.devices {
            if self.is_unjoined(d) {
                continue;
            }
            let outcome = self.sync(cluster, trace, d).await?;
            outcome.map_err(|e| engine("setup", format!("device {d} syncs: {e}")))?;
        }
        Ok(())
    }

    /// The seeded steps, with the faults this run switched on.
    pub async fn run(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
    ) -> Result<(), SyncRunError> {
        cluster
            .net
            .set_faults(NetFaults::from_intensity(self.switches.net));
        // The product's own fault points (`persist_core::env::FaultPoint`),
        // as the seed or `SimConfig::fault_points` switched them on.
        let points: Vec<&str> = cluster.faults.enabled().iter().map(|p| p.name()).collect();
        trace.note(format!("fault points on: {points:?}"));
        cluster.faults.set_active(true);
        if cluster.net.forges() {
            trace.note("the relay forges");
        }
        cluster.net.set_forging(true);
        self.apply_fault_at_start(cluster, trace).await?;
        let n = self.opts.devices as u64;
        for step in 0..self.opts.steps {
            if let Some(plan) = self.join_plan
                && self.unjoined.is_some()
            {
                if step == plan.invite_step {
                    self.make_join_invite(cluster, trace).await?;
                }
                if step >= self.next_join_try {
                    self.late_join(cluster, trace, Some(step)).await?;
                }
            }
            if let Some(plan) = self.plan
                && step >= plan.at_step
            {
                self.revoke(cluster, trace, plan.victim).await?;
            }
            self.end_isolation_if_known(cluster, trace).await?;
            let delay = self.delay_ms();
            self.advance(cluster, trace, delay).await;
            let d = self.below(n) as usize;
            let path = SYNC_PATHS[self.below(SYNC_PATHS.len() as u64) as usize];
            let roll = self.below(100);
            let s = self.switches;
            match roll {
                0..30 => {
                    if cluster.store(d).is_some() {
                        self.put(cluster, trace, d, path, Some(step)).await?;
                    }
                }
                30..40 => {
                    if cluster.store(d).is_some() {
                        self.delete(cluster, trace, d, path, step).await?;
                    }
                }
                40..55 => self.read(cluster, trace, d, path).await?,
                55..75 => {
                    if cluster.store(d).is_some() {
                        let outcome = self.sync(cluster, trace, d).await?;
                        if let Err(e) = outcome
                            && e.contains("timed out")
                            && cluster.net.is_relay_up()
                            && !cluster.net.is_partitioned(d)
                        {
                            trace.note(format!("d{d} sync timed out with the relay reachable"));
                        }
                    }
                }
                75..79 if s.rotations => {
                    // See the module docs: with a revocation in the run,
                    // only device 0 rotates.
                    let who = if s.revocation { 0 } else { d };
                    self.rotate(cluster, trace, who).await?;
                }
                79..83 if s.rotations && d != 0 && !self.is_unjoined(d) => {
                    if self.may_export_to(cluster, trace, d).await? {
                        self.deliver_keys(cluster, trace, d).await?;
                    }
                }
                83..87 if s.crashes => self.crash(cluster, trace, d, path, step).await?,
                87..89 if s.crashes => self.reboot(cluster, trace, d, Shutdown::Clean).await?,
                89..95 if s.partitions => {
                    if self.isolated && self.is_revoked(d) {
                        trace.note(format!("d{d} stays isolated"));
                    } else if cluster.net.is_partitioned(d) {
                        trace.note(format!("heal d{d}"));
                        cluster.net.heal(d);
                    } else {
                        trace.note(format!("partition d{d}"));
                        cluster.net.partition(d);
                    }
                }
                95..98 if s.relay_restarts => {
                    if cluster.net.is_relay_up() {
                        trace.note("relay down");
                        cluster.net.relay_down();
                    } else {
                        trace.note("relay up");
                        cluster.net.relay_up();
                    }
                }
                _ => self.read(cluster, trace, d, path).await?,
            }
        }
        if self.opts.fault == Some(SyncFault::PhantomAck) {
            // The model "remembers" a put that the store never saw.
            self.acks.push(AckWrite {
                device: 0,
                step: Some(self.opts.steps),
                path: SYNC_PATHS[0].to_owned(),
                value: Some(format!("{CANARY_VALUE}|phantom")),
                // After anything any device stamped: no skew reaches it.
                at_ms: cluster.device_now_ms(0) + 2 * SKEW_MS_MAX + 1,
            });
        }
        Ok(())
    }

    async fn apply_fault_at_start(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
    ) -> Result<(), SyncRunError> {
        match self.opts.fault {
            Some(SyncFault::ForgedCopies) => cluster.net.forge_copies(),
            Some(SyncFault::WithholdKeys) => {
                // Key parcels would bring the key through the mailboxes.
                cluster.net.drop_mail();
                self.rotate(cluster, trace, 0).await?;
                self.put(cluster, trace, 0, SYNC_PATHS[3], None).await?;
            }
            Some(SyncFault::ReuseEntropy) => {
                // Two reboots of an existing store draw their streams in the
                // same order: with the same seed, the same nonces.
                cluster.fresh_entropy_on_boot = false;
                for _ in 0..2 {
                    self.reboot(cluster, trace, 0, Shutdown::Clean).await?;
                    for path in SYNC_PATHS.iter().take(SETUP_RECORDS) {
                        self.put(cluster, trace, 0, path, None).await?;
                    }
                    self.sync(cluster, trace, 0)
                        .await?
                        .map_err(|e| engine("run", e))?;
                }
            }
            Some(SyncFault::EpochRegress) => {
                self.epochs[0] += 1;
            }
            Some(SyncFault::RevokedGetsKeys) => {
                // Before device 0 switches the relay: an export made after
                // the switch no longer matches device 1's relay token.
                self.revoke(cluster, trace, 1).await?;
                self.deliver_keys(cluster, trace, 1).await?;
                self.put(cluster, trace, 0, SYNC_PATHS[3], None).await?;
                self.sync(cluster, trace, 0)
                    .await?
                    .map_err(|e| engine("run", e))?;
            }
            Some(SyncFault::MemberAdoptsRevokedWrite) => {
                self.revoke(cluster, trace, 1).await?;
                // Past any skew: device 1's clock is after the revocation.
                self.advance(cluster, trace, 2 * SKEW_MS_MAX + 1).await;
                self.put(cluster, trace, 1, SYNC_PATHS[4], None).await?;
            }
            Some(SyncFault::UnrecordedWrite) => {
                if let Some(store) = cluster.store(0) {
                    let value = format!("{CANARY_VALUE}|unrecorded");
                    store
                        .put(SYNC_PATHS[2], &value)
                        .await
                        .map_err(|e| engine("run", e.to_string()))?;
                }
                self.read(cluster, trace, 0, SYNC_PATHS[2]).await?;
            }
            Some(SyncFault::HeldOverflow) => {
                cluster.net.drop_mail();
                self.rotate(cluster, trace, 0).await?;
                let bound = held_bound(self.opts.devices, 0) as usize;
                for i in 0..=bound {
                    self.put(cluster, trace, 0, &format!("overflow/{i}"), None)
                        .await?;
                }
                for d in [0, 1] {
                    self.sync(cluster, trace, d)
                        .await?
                        .map_err(|e| engine("run", e))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Stops every fault, boots every device, delivers the newest keys and
    /// syncs until everyone agrees (or the rounds run out).
    pub async fn quiesce(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
    ) -> Result<(), SyncRunError> {
        trace.note("quiesce");
        cluster.faults.set_active(false);
        cluster.net.set_forging(false);
        cluster.net.calm();
        if self.opts.fault == Some(SyncFault::HangingRelay) {
            cluster.net.relay_down();
            cluster.net.relay_up();
            cluster.net.set_faults(NetFaults {
                dial_delay_percent: 100,
                dial_delay_ms_max: 24 * 3600 * 1000,
                ..NetFaults::NONE
            });
        }
        for d in 0..self.opts.devices {
            if cluster.store(d).is_none() && !self.is_unjoined(d) {
                cluster
                    .boot(d, Keys::Held)
                    .await
                    .map_err(|e| engine("quiesce", format!("boot device {d}: {e}")))?;
            }
        }
        if self.unjoined.is_some() {
            // Every try in the run failed (or came too late): with the
            // faults off, a join must go through.
            self.late_join(cluster, trace, None).await?;
        }
        if self.opts.far_skew {
            // Everyone's clock catches up with the device that ran ahead,
            // so what it wrote is no longer from the future.
            let ahead = FAR_SKEW_MS.1 + 60_000;
            self.advance(cluster, trace, ahead).await;
        }
        if let Some(plan) = self.plan {
            // Device 0 was down, or did not know the member, from the
            // planned step to the end of the run.
            self.revoke(cluster, trace, plan.victim).await?;
        }
        self.deliver_to_lagging(cluster, trace).await?;
        if self.opts.fault == Some(SyncFault::MemberAdoptsRevokedWrite) {
            self.adopt_revoked_write(cluster, trace).await?;
        }
        if self.isolated {
            // `calm` healed every partition; the isolation holds on.
            cluster
                .net
                .partition(self.revoked.as_ref().map_or(0, |r| r.device));
        }
        let mut agreed = false;
        for round in 0..QUIESCE_ROUNDS_MAX {
            if self.revoked.is_some() {
                // Members that did not know of the revocation learn of it
                // through their mailboxes, then take exports as the
                // others did.
                self.deliver_to_lagging(cluster, trace).await?;
                self.end_isolation_if_known(cluster, trace).await?;
            }
            for d in 0..self.opts.devices {
                if let Err(e) = self.sync(cluster, trace, d).await? {
                    trace.note(format!("quiesce round {round}: d{d} sync failed: {e}"));
                    if e.contains("timed out") {
                        self.checked(checkers::LIVENESS);
                        return Err(violation(
                            checkers::LIVENESS,
                            format!(
                                "device {d}'s sync_now did not finish within {}s of simulated \
                                 time with every fault off",
                                SYNC_TIMEOUT.as_secs()
                            ),
                        )
                        .into());
                    }
                }
            }
            self.advance(cluster, trace, 1_000).await;
            if self.all_quiet(cluster, trace).await? {
                agreed = true;
                break;
            }
        }
        trace.note(format!("quiet={agreed}"));
        if self.opts.fault == Some(SyncFault::WriteAfterQuiesce) {
            cluster.net.partition(1);
            self.put(cluster, trace, 1, SYNC_PATHS[1], None).await?;
        }
        if self.opts.fault == Some(SyncFault::RotateAfterQuiesce) {
            cluster.net.partition(1);
            self.rotate(cluster, trace, 1).await?;
        }
        Ok(())
    }

    /// Hands a fresh export of device 0 to every device whose keys the
    /// workload last delivered before device 0's current epoch (and that
    /// may take one: see [`Self::may_export_to`]).
    async fn deliver_to_lagging(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
    ) -> Result<(), SyncRunError> {
        let zero_epoch = self.sample(cluster, 0).await?;
        for d in 1..self.opts.devices {
            let withheld = self.opts.fault == Some(SyncFault::WithholdKeys) && d == 1;
            if cluster.devices[d].keys_epoch < zero_epoch
                && !self.is_unjoined(d)
                && !withheld
                && self.may_export_to(cluster, trace, d).await?
            {
                self.deliver_keys(cluster, trace, d).await?;
            }
        }
        Ok(())
    }

    /// Whether every member is synced, not rotating, and lists the same.
    async fn all_quiet(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
    ) -> Result<bool, SyncRunError> {
        let mut first: Option<Vec<(String, String)>> = None;
        let mut first_epoch: Option<(u32, String, usize)> = None;
        let mut quiet = true;
        for d in 0..self.opts.devices {
            if self.is_revoked(d) {
                continue;
            }
            let store = cluster
                .store(d)
                .ok_or_else(|| engine("quiesce", format!("device {d} is down")))?;
            let synced = store.sync_status().is_some_and(|s| s.synced);
            let status = store
                .status()
                .await
                .map_err(|e| engine("quiesce", format!("status of device {d}: {e}")))?;
            let held = store.sync_status().map_or(0, |s| s.held);
            // Keys may still be on their way through the mailboxes (those
            // of concurrent rotations too, which change the key in use,
            // and which open what was sealed under them).
            let sealing = (
                status.current_epoch,
                current_announcement(&status),
                status
                    .epochs
                    .iter()
                    .find(|e| e.epoch == status.current_epoch)
                    .map_or(0, |e| e.keys),
            );
            let behind = first_epoch.as_ref().is_some_and(|e| *e != sealing);
            first_epoch.get_or_insert(sealing);
            let old_records = status
                .epochs
                .iter()
                .any(|e| e.epoch != status.current_epoch && e.records > 0);
            if !synced || status.rotation.active || held > 0 || behind || old_records {
                trace.note(format!(
                    "d{d} not quiet: synced={synced} rotating={} held={held} epoch={} \
                     old_records={old_records}",
                    status.rotation.active, status.current_epoch
                ));
                quiet = false;
                continue;
            }
            let listing = store
                .list::<String>("")
                .await
                .map_err(|e| engine("quiesce", format!("list on device {d}: {e}")))?;
            match &first {
                None => first = Some(listing),
                Some(f) if *f != listing => {
                    trace.note(format!("d{d} not quiet: lists otherwise"));
                    quiet = false;
                }
                Some(_) => {}
            }
        }
        Ok(quiet)
    }

    /// Runs every checker on the end state.
    pub async fn check(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
    ) -> Result<SyncSummary, SyncRunError> {
        let zero = cluster
            .store(0)
            .ok_or_else(|| engine("check", "device 0 is down"))?;
        // Members device 0 lists that are no device of the run: a join
        // that timed out after device 0 granted it leaves one, which never
        // acknowledges a key (an open gap: see the README).
        let listed = zero
            .crypto()
            .devices()
            .await
            .map_err(|e| engine("check", format!("devices of device 0: {e}")))?;
        let ghosts = listed
            .iter()
            .filter(|m| !self.ids.contains(&Some(m.id)))
            .count() as u64;
        if ghosts > 0 {
            trace.note(format!("d0 lists {ghosts} members that are no device"));
            *self
                .summary
                .faults
                .entry("ghost_member".to_owned())
                .or_default() += ghosts;
        }
        let raw = zero
            .crypto()
            .dangerous()
            .export_raw()
            .await
            .map_err(|e| engine("check", format!("raw export: {e}")))?;
        let keys = ExportedKeys::unwrap(&raw, "")
            .map_err(|e| engine("check", format!("raw export does not read: {e}")))?;

        if self.opts.fault == Some(SyncFault::LeakCanary) {
            cluster
                .net
                .inject_tapped(0, format!("leak {CANARY_VALUE}").as_bytes());
        }
        let tapped = cluster.net.tapped();
        let relay_entries = relay_log(cluster, &keys).await?;

        // No plaintext on the wire or in the relay.
        self.checked(checkers::NO_PLAINTEXT);
        let mut needles = checkers::key_needles(&keys);
        needles.push(("canary path".into(), CANARY_PATH.as_bytes().to_vec()));
        needles.push(("canary value".into(), CANARY_VALUE.as_bytes().to_vec()));
        let mut haystacks: Vec<(String, &[u8])> = Vec::new();
        for (i, conn) in tapped.iter().enumerate() {
            haystacks.push((
                format!("connection {i} of device {} (up)", conn.device),
                &conn.up,
            ));
            haystacks.push((
                format!("connection {i} of device {} (down)", conn.device),
                &conn.down,
            ));
        }
        for (locator, envelope) in &relay_entries {
            haystacks.push((format!("relay row {locator}"), envelope));
        }
        // The quic profile's datagrams, as sent (QUIC encrypts them).
        let wire = cluster.net.wire();
        for (name, bytes) in &wire {
            haystacks.push((name.clone(), bytes));
        }
        checkers::check_no_plaintext(&needles, &haystacks)?;

        // No nonce reuse among everything pushed.
        let pushed = checkers::pushed(&tapped)?;
        self.checked(checkers::NO_NONCE_REUSE);
        checkers::check_nonce_reuse(&pushed)?;

        // Epochs, rotation, held envelopes.
        let current = self.sample(cluster, 0).await?;
        let sealing = current_announcement(
            &zero
                .status()
                .await
                .map_err(|e| engine("check", format!("status of device 0: {e}")))?,
        );
        let mut listings = Vec::new();
        let mut revoked_listing = None;
        for d in 0..self.opts.devices {
            let epoch = self.sample(cluster, d).await?;
            let store = cluster
                .store(d)
                .ok_or_else(|| engine("check", format!("device {d} is down")))?;
            if self.is_revoked(d) {
                // It holds what it pulled for want of keys it never gets,
                // and stays on its old epoch: only what it reads counts.
                let listing = store
                    .list::<String>("")
                    .await
                    .map_err(|e| engine("check", format!("list on device {d}: {e}")))?;
                revoked_listing = Some(listing);
                continue;
            }
            let status = store
                .status()
                .await
                .map_err(|e| engine("check", format!("status of device {d}: {e}")))?;
            let held = store.sync_status().map(|s| s.held).unwrap_or_default();
            self.checked(checkers::HELD_APPLIED);
            if held > 0 {
                return Err(violation(
                    checkers::HELD_APPLIED,
                    format!(
                        "device {d} still holds {held} envelopes after keys were delivered \
                         and clocks caught up"
                    ),
                )
                .into());
            }
            self.checked(checkers::ROTATION_FINISHES);
            if epoch != current {
                return Err(violation(
                    checkers::ROTATION_FINISHES,
                    format!("device {d} ends on epoch {epoch}, device 0 on {current}"),
                )
                .into());
            }
            if current_announcement(&status) != sealing {
                return Err(violation(
                    checkers::ROTATION_FINISHES,
                    format!(
                        "device {d} seals under another key of epoch {epoch} than device 0 \
                         (announcements {} and {sealing})",
                        current_announcement(&status)
                    ),
                )
                .into());
            }
            if status.rotation.active {
                return Err(violation(
                    checkers::ROTATION_FINISHES,
                    format!("device {d} is still re-encrypting: {:?}", status.rotation),
                )
                .into());
            }
            if let Some(old) = status
                .epochs
                .iter()
                .find(|e| e.epoch != status.current_epoch && e.records > 0)
            {
                return Err(violation(
                    checkers::ROTATION_FINISHES,
                    format!(
                        "device {d} keeps {} records under epoch {} ({}), current is {}",
                        old.records, old.epoch, old.state, status.current_epoch
                    ),
                )
                .into());
            }
            let listing = store
                .list::<String>("")
                .await
                .map_err(|e| engine("check", format!("list on device {d}: {e}")))?;
            listings.push((d, listing));
        }

        // What members accept: everything pushed, less what the revoked
        // device signed after its revocation.
        let revoked = self.revoked.clone();
        let all_opened = checkers::open_all(&keys, &pushed)?;
        let opened = checkers::accepted(&all_opened, revoked.as_ref());
        let relay_all = checkers::open_all(&keys, &relay_entries)?;
        let relay_opened = checkers::accepted(&relay_all, revoked.as_ref());
        if let Some(r) = &revoked {
            let mut later = checkers::refused_values(&all_opened, r);
            later.extend(self.revoked_later.iter().cloned());
            let refused = (all_opened.len() - opened.len()) as u64;
            let switched = zero_switched(cluster).await?;
            trace.note(format!(
                "revoked d{} ends on epoch {} (the revocation's: {}): later writes {} (refused \
                 on the wire {refused}), member writes it must not read {}, relay switched \
                 {switched}",
                r.device,
                self.epochs[r.device],
                r.epoch.0,
                later.len(),
                self.written_after.len()
            ));
            *self
                .summary
                .faults
                .entry("revoked_pushes_refused".to_owned())
                .or_default() += refused;
            if switched {
                self.fired("relay_switched");
            }
            self.checked(checkers::REVOKED_READS_NOTHING_NEW);
            let listing = revoked_listing
                .ok_or_else(|| engine("check", "the revoked device was not listed"))?;
            checkers::check_revoked_reads_nothing_new(r, &self.written_after, &listing)?;
            self.checked(checkers::REVOKED_WRITES_REFUSED);
            checkers::check_revoked_writes_refused(r, &later, &listings)?;
        }

        // Convergence of the members to the reference, and no
        // acknowledged write lost. A revoked device is promised neither:
        // the relay may refuse it before it pushes what it acknowledged.
        let reference = checkers::reference(&opened);
        let overtaken = match &revoked {
            Some(r) => checkers::overtaken(&relay_all, &opened, r),
            None => checkers::Overtaken::new(),
        };
        if !overtaken.is_empty() {
            trace.note(format!("overtaken at the relay: {:?}", overtaken.keys()));
            *self
                .summary
                .faults
                .entry("path_overtaken_by_revoked".to_owned())
                .or_default() += overtaken.len() as u64;
        }
        self.checked(checkers::CONVERGENCE);
        checkers::check_convergence(&reference, &listings, &relay_opened, &overtaken)?;
        self.checked(checkers::NO_LOST_WRITE);
        let acks: Vec<AckWrite> = self
            .acks
            .iter()
            .filter(|a| revoked.as_ref().is_none_or(|r| a.device != r.device))
            .cloned()
            .collect();
        checkers::check_acks(&acks, &opened, &reference)?;

        let expected = checkers::expected_listing(&reference);
        let mut fields: Vec<&[u8]> = Vec::new();
        for (p, v) in &expected {
            fields.push(p.as_bytes());
            fields.push(v.as_bytes());
        }
        trace.record(Event::List, &fields);
        self.summary.records = expected.len();
        let mut summary = std::mem::take(&mut self.summary);
        for (kind, n) in cluster.net.fired() {
            *summary.faults.entry(kind.to_owned()).or_default() += n;
        }
        for (point, n) in cluster.faults.fired() {
            *summary.faults.entry(point.name().to_owned()).or_default() += n;
        }
        trace.note(format!(
            "connections={} relay_rows={} pushed={} faults={:?}",
            cluster.net.connections(),
            relay_entries.len(),
            pushed.len(),
            summary.faults
        ));
        Ok(summary)
    }

    async fn put(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
        d: usize,
        path: &str,
        step: Option<usize>,
    ) -> Result<(), SyncRunError> {
        let filler = self.below(200) as usize;
        let mut value = format!(
            "{CANARY_VALUE}|d{d}|s{}|{:08x}|",
            step.map_or("setup".to_owned(), |s| s.to_string()),
            self.rng.next_u32()
        );
        value.extend(std::iter::repeat_n('.', filler));
        self.put_value(cluster, trace, d, path, step, value, false)
            .await
    }

    /// Puts `value`; a failed put fails the run unless `power_failing` or
    /// a fault point made it fail. Such a put is acknowledged only if it
    /// returned (it committed first), and may or may not survive otherwise.
    #[allow(clippy::too_many_arguments)]
    async fn put_value(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
        d: usize,
        path: &str,
        step: Option<usize>,
        value: String,
        power_failing: bool,
    ) -> Result<(), SyncRunError> {
        let Some(store) = cluster.store(d) else {
            return Ok(());
        };
        let at_ms = cluster.device_now_ms(d);
        if let Some(r) = self.revoked.clone() {
            if r.device == d {
                if at_ms > r.at_ms {
                    self.revoked_later.insert(value.clone());
                }
            } else if self.sample(cluster, d).await? >= r.epoch.0 {
                self.written_after.insert(value.clone());
            }
        }
        trace.note(format!("d{d} put {path} {}", &value[CANARY_VALUE.len()..]));
        self.written
            .entry(path.to_owned())
            .or_default()
            .insert(value.clone());
        match store.put(path, &value).await {
            Ok(()) => {
                self.acks.push(AckWrite {
                    device: d,
                    step,
                    path: path.to_owned(),
                    value: Some(value),
                    at_ms,
                });
                Ok(())
            }
            Err(e) if power_failing => {
                trace.note(format!("d{d} put {path} failed as the power went: {e}"));
                Ok(())
            }
            Err(e) if injected(&e) => {
                trace.note(format!("d{d} put {path} failed: {e}"));
                Ok(())
            }
            Err(e) => Err(engine("run", format!("device {d} put {path:?}: {e}"))),
        }
    }

    async fn delete(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
        d: usize,
        path: &str,
        step: usize,
    ) -> Result<(), SyncRunError> {
        let Some(store) = cluster.store(d) else {
            return Ok(());
        };
        let at_ms = cluster.device_now_ms(d);
        trace.note(format!("d{d} delete {path}"));
        match store.delete(path).await {
            Ok(()) => {}
            Err(e) if injected(&e) => {
                trace.note(format!("d{d} delete {path} failed: {e}"));
                return Ok(());
            }
            Err(e) => return Err(engine("run", format!("device {d} delete {path:?}: {e}"))),
        }
        self.acks.push(AckWrite {
            device: d,
            step: Some(step),
            path: path.to_owned(),
            value: None,
            at_ms,
        });
        Ok(())
    }

    async fn read(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
        d: usize,
        path: &str,
    ) -> Result<(), SyncRunError> {
        if cluster.store(d).is_none() {
            return Ok(());
        }
        // A member knows of the revocation once it holds the revocation's
        // epoch (the revocation comes with the key): from then on it must
        // refuse the revoked device's later writes. Sampled before the
        // read, so the member knew when it read.
        let member_knows = match self.revoked.clone() {
            Some(r) if r.device != d => self.sample(cluster, d).await? >= r.epoch.0,
            _ => false,
        };
        let Some(store) = cluster.store(d) else {
            return Ok(());
        };
        let seen: Option<String> = store
            .get(path)
            .await
            .map_err(|e| engine("run", format!("device {d} get {path:?}: {e}")))?;
        trace.note(format!(
            "d{d} get {path} -> {}",
            seen.as_deref()
                .map_or("nothing", |v| v.get(CANARY_VALUE.len()..).unwrap_or(v))
        ));
        self.checked(checkers::NO_PHANTOM_READ);
        if let Some(v) = &seen
            && !self.written.get(path).is_some_and(|w| w.contains(v))
        {
            return Err(violation(
                checkers::NO_PHANTOM_READ,
                format!("device {d} read {path:?} = {v:?}, which no device wrote there"),
            )
            .into());
        }
        if let (Some(r), Some(v)) = (&self.revoked, &seen) {
            let (invariant, broken, whose) = if r.device == d {
                (
                    checkers::REVOKED_READS_NOTHING_NEW,
                    self.written_after.contains(v),
                    "a member wrote after the revocation",
                )
            } else {
                (
                    checkers::REVOKED_WRITES_REFUSED,
                    member_knows && self.revoked_later.contains(v),
                    "the revoked device wrote after its revocation, and this member \
                     knows of the revocation",
                )
            };
            self.checked(invariant);
            if broken {
                return Err(violation(
                    invariant,
                    format!("device {d} read {path:?} = {v:?}, which {whose}"),
                )
                .into());
            }
        }
        Ok(())
    }

    /// One `sync_now` on device `d`, bounded in simulated time; the
    /// outcome goes into the trace.
    async fn sync(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
        d: usize,
    ) -> Result<Result<(), String>, SyncRunError> {
        let Some(store) = cluster.store(d) else {
            return Ok(Err("down".into()));
        };
        let outcome = match tokio::time::timeout(SYNC_TIMEOUT, store.sync_now()).await {
            Ok(Ok(report)) => {
                trace.note(format!(
                    "d{d} sync ok pushed={} pulled={} held={} refused={}",
                    report.pushed, report.pulled, report.held, report.refused
                ));
                Ok(())
            }
            Ok(Err(e)) => {
                trace.note(format!("d{d} sync failed: {e}"));
                Err(e.to_string())
            }
            Err(_) => {
                trace.note(format!(
                    "d{d} sync timed out; status {:?}",
                    store.sync_status()
                ));
                Err("timed out".to_owned())
            }
        };
        if let Some(status) = store.sync_status() {
            self.checked(checkers::HELD_BOUNDED);
            let bound = held_bound(self.opts.devices, usize::from(self.revoked.is_some()))
                + cluster.net.forged_signers();
            if status.held > bound {
                return Err(violation(
                    checkers::HELD_BOUNDED,
                    format!(
                        "device {d} holds {} envelopes, more than {bound}",
                        status.held
                    ),
                )
                .into());
            }
        }
        Ok(outcome)
    }

    /// Reads device `d`'s current epoch and checks it did not go back.
    async fn sample(&mut self, cluster: &Cluster, d: usize) -> Result<u32, SyncRunError> {
        let Some(store) = cluster.store(d) else {
            return Ok(self.epochs[d]);
        };
        let status = store
            .status()
            .await
            .map_err(|e| engine("run", format!("status of device {d}: {e}")))?;
        self.checked(checkers::EPOCHS_MONOTONE);
        let before = self.epochs[d];
        if status.current_epoch < before {
            return Err(violation(
                checkers::EPOCHS_MONOTONE,
                format!(
                    "device {d} is on epoch {} after epoch {before}",
                    status.current_epoch
                ),
            )
            .into());
        }
        self.epochs[d] = status.current_epoch;
        Ok(status.current_epoch)
    }

    /// Device 0 revokes `victim`, unless it is down or does not know
    /// `victim` as a member yet (then a later step tries again).
    async fn revoke(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
        victim: usize,
    ) -> Result<(), SyncRunError> {
        let Some(store) = cluster.store(0) else {
            return Ok(());
        };
        let Some(id) = self.ids[victim] else {
            debug_assert!(self.is_unjoined(victim), "only the late joiner has no id");
            trace.note(format!("d{victim} has not joined yet; d0 revokes it later"));
            return Ok(());
        };
        // The revocation is stamped with device 0's clock, which only the
        // workload moves.
        let at_ms = cluster.device_now_ms(0);
        let rotation = match store.crypto().revoke_device(id).await {
            Ok(rotation) => rotation,
            Err(KeyError::CannotRevoke(RevokeError::UnknownDevice(_))) => {
                trace.note(format!("d0 does not know d{victim} yet; revokes later"));
                return Ok(());
            }
            Err(e) if injected(&e) => {
                trace.note(format!("d0 revoking d{victim} failed: {e}; tries again"));
                if matches!(e, KeyError::Failed(_)) {
                    self.revoked_unrecorded_at.get_or_insert(at_ms);
                }
                return Ok(());
            }
            Err(e) => return Err(engine("run", format!("d0 revokes d{victim}: {e}"))),
        };
        let at_ms = self.revoked_unrecorded_at.take().unwrap_or(at_ms);
        let epoch = rotation.epoch();
        trace.note(format!("d0 revokes d{victim} at {at_ms} ms: epoch {epoch}"));
        self.plan = None;
        self.revoked = Some(RevokedDevice {
            device: victim,
            id,
            epoch: Epoch(epoch),
            at_ms,
        });
        if !self.opts.revocation_races {
            trace.note(format!("d{victim} isolated until the members know"));
            cluster.net.partition(victim);
            self.isolated = true;
        }
        cluster.devices[0].keys_epoch = epoch;
        self.fired("revocation");
        self.sample(cluster, 0).await?;
        Ok(())
    }

    /// Device 0 makes the invite of the late join's first try, which the
    /// joiner uses some steps later (device 0 may rotate or revoke in
    /// between); if it cannot, the try makes its own.
    async fn make_join_invite(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
    ) -> Result<(), SyncRunError> {
        if cluster.store(0).is_none() {
            return Ok(());
        }
        match cluster.invite_from_zero().await {
            Ok(code) => {
                trace.note("d0 makes an invite for the late joiner");
                self.join_invite = Some(code);
                Ok(())
            }
            Err(e) if injected(&e) => {
                trace.note(format!("d0 could not make an invite: {e}"));
                Ok(())
            }
            Err(e) => Err(engine("run", format!("d0 makes an invite: {e}"))),
        }
    }

    /// The late joiner tries to join with an invite from device 0: the one
    /// made for it, or a new one. In the run (`step` given) a try that the
    /// faults made fail is tried again [`JOIN_RETRY_STEPS`] later, with a
    /// new invite; in the quiet phase, with every fault off, a join must
    /// go through.
    async fn late_join(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
        step: Option<usize>,
    ) -> Result<(), SyncRunError> {
        let Some(d) = self.unjoined else {
            return Ok(());
        };
        let phase = if step.is_some() { "run" } else { "quiesce" };
        let code = match self.join_invite.take() {
            Some(code) => code,
            None if cluster.store(0).is_none() => {
                return self.join_later(trace, d, step, "device 0 is down");
            }
            None => match cluster.invite_from_zero().await {
                Ok(code) => code,
                Err(e) if step.is_some() && injected(&e) => {
                    return self.join_later(trace, d, step, &e);
                }
                Err(e) => return Err(engine(phase, format!("d0 invites d{d}: {e}"))),
            },
        };
        trace.note(format!("d{d} joins with an invite"));
        match cluster.boot(d, Keys::Invite(&code)).await {
            Ok(()) => {}
            Err(e) if step.is_some() && join_may_fail(&e) => {
                self.fired("late_join_failed");
                return self.join_later(trace, d, step, &e.to_string());
            }
            Err(e) => {
                return Err(engine(
                    phase,
                    format!("device {d} joins with an invite: {e}"),
                ));
            }
        }
        self.unjoined = None;
        self.ids[d] = cluster.store(d).map(|s| s.info().device_id);
        let zero_epoch = self.sample(cluster, 0).await?;
        let epoch = self.sample(cluster, d).await?;
        cluster.devices[d].keys_epoch = epoch;
        trace.note(format!(
            "d{d} joined on epoch {epoch} (device 0 is on {zero_epoch})"
        ));
        let newest = (0..self.opts.devices)
            .filter(|&o| o != d && !self.is_revoked(o))
            .map(|o| self.epochs[o])
            .max()
            .unwrap_or_default();
        if epoch < newest {
            // A member rotated concurrently and device 0 has not heard of
            // it yet: the joiner must get that key through its mailbox, as
            // any member does (the end-state checks see that it did).
            trace.note(format!("d{d} joined behind epoch {newest}"));
            self.fired("late_join_behind");
        }
        self.fired("late_join");
        Ok(())
    }

    /// Schedules the late join's next try, or fails the quiet phase.
    fn join_later(
        &mut self,
        trace: &mut Trace,
        d: usize,
        step: Option<usize>,
        why: &str,
    ) -> Result<(), SyncRunError> {
        let Some(step) = step else {
            return Err(engine(
                "quiesce",
                format!("device {d} cannot join with every fault off: {why}"),
            ));
        };
        self.next_join_try = step + JOIN_RETRY_STEPS;
        trace.note(format!(
            "d{d} did not join ({why}); tries again at step {}",
            self.next_join_try
        ));
        Ok(())
    }

    /// Whether member `d` knows that the revoked device is revoked (false
    /// while `d` is down).
    async fn knows_revocation(&self, cluster: &Cluster, d: usize) -> Result<bool, SyncRunError> {
        let (Some(r), Some(store)) = (&self.revoked, cluster.store(d)) else {
            return Ok(false);
        };
        let devices = store
            .crypto()
            .devices()
            .await
            .map_err(|e| engine("run", format!("devices of device {d}: {e}")))?;
        Ok(devices.iter().any(|m| m.id == r.id && m.revoked))
    }

    /// Ends the revoked device's isolation once every member knows of
    /// the revocation.
    async fn end_isolation_if_known(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
    ) -> Result<(), SyncRunError> {
        let Some(victim) = self.revoked.as_ref().map(|r| r.device) else {
            return Ok(());
        };
        if !self.isolated {
            return Ok(());
        }
        for d in 0..self.opts.devices {
            // A device that has not joined yet will learn of the
            // revocation from the keys it joins with.
            if d != victim && !self.is_unjoined(d) && !self.knows_revocation(cluster, d).await? {
                return Ok(());
            }
        }
        trace.note(format!("every member knows; d{victim} rejoins the network"));
        cluster.net.heal(victim);
        self.isolated = false;
        Ok(())
    }

    /// Whether device `d` may be handed a key export of device 0: never
    /// the revoked device, and (unless the run lets the revocation race)
    /// no member that does not know of the revocation yet, since an
    /// export carries no revocations.
    async fn may_export_to(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
        d: usize,
    ) -> Result<bool, SyncRunError> {
        if self.revoked_unrecorded_at.is_some() && self.plan.is_some_and(|p| p.victim == d) {
            // Device 0 revoked it, only the revocation's record is still
            // to write (regression: seed 40 at 120 steps handed it the
            // revocation's key, which it then read a later write with).
            trace.note(format!("no keys for d{d}, revoked but unrecorded"));
            return Ok(false);
        }
        if self.revoked.is_none() {
            return Ok(true);
        }
        if self.is_revoked(d) {
            trace.note(format!("no keys for revoked d{d}"));
            return Ok(false);
        }
        if self.opts.revocation_races || self.knows_revocation(cluster, d).await? {
            return Ok(true);
        }
        trace.note(format!("d{d} does not know of the revocation: no export"));
        Ok(false)
    }

    /// The sabotage [`SyncFault::MemberAdoptsRevokedWrite`]: device 0
    /// writes, under its own signature, a value the revoked device wrote
    /// after its revocation.
    async fn adopt_revoked_write(
        &mut self,
        cluster: &Cluster,
        trace: &mut Trace,
    ) -> Result<(), SyncRunError> {
        let Some(value) = self.revoked_later.iter().next().cloned() else {
            return Err(engine("quiesce", "the revoked device wrote nothing later"));
        };
        let store = cluster
            .store(0)
            .ok_or_else(|| engine("quiesce", "device 0 is down"))?;
        let path = SYNC_PATHS[4];
        trace.note(format!("d0 adopts the revoked device's {path}"));
        self.written
            .entry(path.to_owned())
            .or_default()
            .insert(value.clone());
        store
            .put(path, &value)
            .await
            .map_err(|e| engine("quiesce", format!("device 0 put {path:?}: {e}")))
    }

    async fn rotate(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
        d: usize,
    ) -> Result<(), SyncRunError> {
        let Some(store) = cluster.store(d) else {
            return Ok(());
        };
        let rotation = match store.crypto().rotate_key().await {
            Ok(rotation) => rotation,
            Err(e) if injected(&e) => {
                trace.note(format!("d{d} rotate failed: {e}"));
                return Ok(());
            }
            Err(e) => return Err(engine("run", format!("rotate on device {d}: {e}"))),
        };
        trace.note(format!("d{d} rotate to epoch {}", rotation.epoch()));
        cluster.devices[d].keys_epoch = rotation.epoch();
        self.fired("rotation");
        self.sample(cluster, d).await?;
        Ok(())
    }

    async fn deliver_keys(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
        d: usize,
    ) -> Result<(), SyncRunError> {
        if cluster.store(0).is_none() {
            return Ok(());
        }
        let epoch = self.sample(cluster, 0).await?;
        let export = cluster
            .export_from_zero()
            .await
            .map_err(|e| engine("run", format!("export on device 0: {e}")))?;
        trace.note(format!("deliver keys of epoch {epoch} to d{d}"));
        cluster
            .shutdown(d, Shutdown::Clean)
            .await
            .map_err(|e| engine("run", e))?;
        cluster
            .boot(d, Keys::Export(&export))
            .await
            .map_err(|e| engine("run", format!("device {d} imports fresh keys: {e}")))?;
        cluster.devices[d].keys_epoch = epoch;
        self.fired("key_delivery");
        self.sample(cluster, d).await?;
        Ok(())
    }

    /// Crashes device `d` and reboots it. In most crashes the power fails
    /// a seeded few disk writes into a put of `path`, so that the crash
    /// can land inside a commit; in the others, between two steps.
    async fn crash(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
        d: usize,
        path: &str,
        step: usize,
    ) -> Result<(), SyncRunError> {
        if cluster.store(d).is_none() {
            return Ok(());
        }
        // From the crash's own stream, not the run's, so that a crash
        // shifts none of the run's later draws.
        let draw = cluster.arm_power_cut(d);
        if !draw.is_multiple_of(4) {
            // Told apart from a put's by what follows the canary.
            let value = format!("{CANARY_VALUE}|d{d}|s{step}|crash|{draw:016x}|");
            self.put_value(cluster, trace, d, path, Some(step), value, true)
                .await?;
        }
        self.reboot(cluster, trace, d, Shutdown::Crash).await
    }

    async fn reboot(
        &mut self,
        cluster: &mut Cluster,
        trace: &mut Trace,
        d: usize,
        how: Shutdown,
    ) -> Result<(), SyncRunError> {
        if cluster.store(d).is_none() {
            return Ok(());
        }
        let loss = cluster
            .shutdown(d, how)
            .await
            .map_err(|e| engine("run", e))?;
        trace.note(format!("d{d} {how:?} (power loss: {loss:?})"));
        self.fired(match how {
            Shutdown::Crash => "crash",
            Shutdown::Clean => "restart",
        });
        for (kind, n) in loss.fired() {
            *self.summary.faults.entry(kind.to_owned()).or_default() += n;
        }
        let down_ms = self.below(5_000);
        self.advance(cluster, trace, down_ms).await;
        cluster
            .boot(d, Keys::Held)
            .await
            .map_err(|e| engine("run", format!("device {d} reboots: {e}")))?;
        self.sample(cluster, d).await?;
        Ok(())
    }
}

/// Whether device 0 has no relay switch pending (it switched the relay to
/// its revocation's token, or made none).
async fn zero_switched(cluster: &Cluster) -> Result<bool, SyncRunError> {
    let store = cluster
        .store(0)
        .ok_or_else(|| engine("check", "device 0 is down"))?;
    let status = store
        .status()
        .await
        .map_err(|e| engine("check", format!("status of device 0: {e}")))?;
    Ok(status.relay_switch.is_none())
}

/// Every live entry the relay keeps for the run's store.
/// The checks that read the devices' databases, once every device is shut
/// down (after [`SyncWorkload::check`]): no device stores an envelope the
/// relay forged, and no member holds one. (The revoked device never gets
/// the revocation's key, so it cannot tell a forgery under that epoch from
/// a genuine envelope it cannot open: it may hold either.)
pub fn check_closed(
    workload: &SyncWorkload,
    cluster: &Cluster,
    summary: &mut SyncSummary,
) -> Result<(), SyncRunError> {
    let forged = cluster.net.forgeries();
    let mut rows = Vec::with_capacity(cluster.devices.len());
    for d in 0..cluster.devices.len() {
        let mut device_rows = cluster.rows(d).map_err(|e| engine("check", e))?;
        if workload.is_revoked(d) {
            device_rows.retain(|row| !row.held);
        }
        rows.push((d, device_rows));
    }
    *summary
        .checks
        .entry(checkers::TAMPERED_NEVER_APPLIED)
        .or_default() += 1;
    checkers::check_tampered_never_applied(&forged, &rows)?;
    Ok(())
}

async fn relay_log(
    cluster: &Cluster,
    keys: &ExportedKeys,
) -> Result<Vec<(persist_core::Locator, Vec<u8>)>, SyncRunError> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = cluster
            .net
            .relay()
            .pull(&keys.store_id, since, 1024, 4 * 1024 * 1024)
            .await
            .map_err(|e| engine("check", format!("relay pull: {e}")))?;
        out.extend(page.entries.into_iter().map(|e| (e.locator, e.envelope)));
        since = page.cursor;
        if !page.more {
            return Ok(out);
        }
    }
}

/// The announcement of the key `status`'s device seals new writes under.
fn current_announcement(status: &persist::Status) -> String {
    status
        .epochs
        .iter()
        .find(|e| e.epoch == status.current_epoch)
        .map(|e| e.announcement.clone())
        .unwrap_or_default()
}

/// Whether a join may fail this way while faults are on: its inviter did
/// not answer in time through the faulty network, or a product fault point
/// failed the open. Anything else (a join that cannot be retried, say) is a
/// bug.
fn join_may_fail(e: &OpenError) -> bool {
    matches!(e, OpenError::Join(JoinError::TimedOut { .. })) || injected(e)
}

/// Whether `e` is a failure a product fault point made on purpose (see
/// `persist_core::env::FaultPoint`): the operation it ended did not
/// complete, and the run goes on.
fn injected(e: &impl std::fmt::Display) -> bool {
    e.to_string().contains(INJECTED_FAULT)
}
