//! `persist-sim`: run one seeded simulation and print its trace hash.
//!
//! ```text
//! persist-sim run --seed 42 [--ops 500] [--backend file|memory]
//! ```
//!
//! Exits 0 and prints the trace hash when the store agreed with the model
//! throughout; exits 1 and prints what differed and the replay command
//! otherwise.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use persist_sim::harness::{self, BackendKind, OPS_DEFAULT, SimConfig};

#[derive(Debug, Parser)]
#[command(
    name = "persist-sim",
    version,
    about = "Deterministic simulations of Persist"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one seeded simulation and print its trace hash.
    Run {
        /// The seed; the same seed replays the same run.
        #[arg(long)]
        seed: u64,
        /// Operations in the run phase.
        #[arg(long, default_value_t = OPS_DEFAULT)]
        ops: usize,
        /// Where the store keeps its database.
        #[arg(long, value_enum, default_value_t = BackendKind::File)]
        backend: BackendKind,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { seed, ops, backend } => {
            let config = SimConfig::new(seed).ops(ops).backend(backend);
            match harness::run(&config) {
                Ok(outcome) => {
                    let db = outcome
                        .db_bytes
                        .map(|n| format!(" db_bytes={n}"))
                        .unwrap_or_default();
                    println!(
                        "ok seed={seed} ops={ops} backend={backend} events={} records={}{db}",
                        outcome.events, outcome.records
                    );
                    println!("trace {}", outcome.trace_hash);
                    ExitCode::SUCCESS
                }
                Err(failure) => {
                    eprintln!("{failure}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
