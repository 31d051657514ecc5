//! The harness's promises: a seed replays exactly, seeds differ, and the
//! checkers fail when the model and the store disagree.

use persist_sim::harness::{self, BackendKind, FailureKind, SimConfig};
use persist_sim::workload::{ModelFault, WorkloadError};

/// Enough operations to cover every kind of step and path, few enough to
/// keep a debug-build test quick.
const OPS: usize = 200;

fn hash(config: &SimConfig) -> String {
    match harness::run(config) {
        Ok(outcome) => outcome.trace_hash.to_string(),
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn same_seed_same_hash_on_a_file() {
    let config = SimConfig::new(11).ops(OPS);
    assert_eq!(hash(&config), hash(&config));
}

#[test]
fn same_seed_same_hash_in_memory_including_the_database_image() {
    let config = SimConfig::new(12).ops(OPS).backend(BackendKind::Memory);
    let first = harness::run(&config).expect("run 1");
    let second = harness::run(&config).expect("run 2");
    assert!(
        first.db_bytes.is_some_and(|n| n > 0),
        "the image must be hashed"
    );
    assert_eq!(first, second);
}

#[test]
fn different_seeds_different_hashes() {
    for backend in [BackendKind::File, BackendKind::Memory] {
        let a = hash(&SimConfig::new(13).ops(OPS).backend(backend));
        let b = hash(&SimConfig::new(14).ops(OPS).backend(backend));
        assert_ne!(a, b, "{backend}: seeds 13 and 14 gave one hash");
    }
}

fn mismatch_phase(config: &SimConfig) -> &'static str {
    let failure = harness::run(config).expect_err("a sabotaged model must fail the run");
    let shown = failure.to_string();
    assert!(
        shown.contains(&format!(
            "--seed {} --ops {} --backend {}",
            config.seed, config.ops, config.backend
        )),
        "the report must carry the replay command: {shown}"
    );
    match *failure.kind {
        FailureKind::Workload {
            source: WorkloadError::Mismatch { phase, .. },
            ..
        } => phase,
        other => panic!(
            "seed {}: expected a model mismatch, got {other}",
            config.seed
        ),
    }
}

#[test]
fn a_phantom_record_in_the_model_fails_the_final_listing() {
    for seed in [21, 22, 23] {
        let config = SimConfig::new(seed)
            .ops(OPS)
            .backend(BackendKind::Memory)
            .model_fault(ModelFault::Phantom { at_step: OPS / 2 });
        assert_eq!(mismatch_phase(&config), "check", "seed {seed}");
    }
}

#[test]
fn a_dropped_put_in_the_model_fails_a_later_get() {
    // A later write to the same path can legitimately heal a dropped put
    // before anyone reads it; for these seeds a get comes first (seeds 24,
    // 25 and 28 heal, which is why they are not listed).
    for seed in [20, 21, 22, 23] {
        let config = SimConfig::new(seed)
            .ops(OPS)
            .backend(BackendKind::Memory)
            .model_fault(ModelFault::DropPut { from_step: 0 });
        assert_eq!(mismatch_phase(&config), "run", "seed {seed}");
    }
}

#[test]
fn an_empty_run_passes() {
    let outcome = harness::run(&SimConfig::new(1).ops(0)).expect("no operations, no mismatch");
    assert_eq!(outcome.records, 4, "setup writes four records");
}
