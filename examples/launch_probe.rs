//! Prints who this instance is and where it runs: a smoke check for
//! `launch` and `place` under mpirun, srun or explicit `CELLNET_*` variables.
//!
//! ```text
//! timeout 60 mpirun --allow-run-as-root --oversubscribe --bind-to none -n 4 \
//!     target/debug/examples/launch_probe
//! CELLNET_RANK=1 CELLNET_SIZE=2 target/debug/examples/launch_probe
//! ```
//! `CELLNET_LAUNCH` picks the launch mode (default `auto`), `CELLNET_PLACEMENT`
//! the placement policy (default `none`: report the binding, change nothing).
//! `CELLNET_PROBE_PANIC_RANK=N` makes rank N panic before the final barrier,
//! to check that the panic hook aborts the whole MPI job.

use std::process::ExitCode;

use cellnet::launch::{detect, LaunchMode};
use cellnet::place::{apply, PlacementPolicy};

fn main() -> ExitCode {
    let mode = match std::env::var("CELLNET_LAUNCH").map(|m| m.parse::<LaunchMode>()) {
        Ok(Ok(mode)) => mode,
        Ok(Err(e)) => return fail(&e),
        Err(_) => LaunchMode::Auto,
    };
    let policy = match std::env::var("CELLNET_PLACEMENT").map(|p| p.parse::<PlacementPolicy>()) {
        Ok(Ok(policy)) => policy,
        Ok(Err(e)) => return fail(&e),
        Err(_) => PlacementPolicy::None,
    };
    let (info, mpi) = match detect(mode) {
        Ok(found) => found,
        Err(e) => return fail(&e),
    };
    let binding = match apply(policy, info.local_rank, info.local_size) {
        Ok(b) => b.to_string(),
        Err(e) => format!("not bound: {e}"),
    };
    println!("{info} binding {binding}");
    if !info.node_list.is_empty() {
        println!("rank {} node list {}", info.rank, info.node_list.join(","));
    }
    if let Some(session) = mpi {
        let keys = session.all_gather_u64(info.job_key.0);
        let nodes = session.all_reduce_sum_u64(u64::from(info.local_rank == 0));
        if info.rank == 0 {
            let agree = keys.iter().all(|&k| k == info.job_key.0);
            println!(
                "rank 0: job keys agree on all {} ranks: {agree}; node leaders: {nodes}",
                keys.len()
            );
        }
        if std::env::var("CELLNET_PROBE_PANIC_RANK").ok() == Some(info.rank.to_string()) {
            panic!("rank {} panics on purpose", info.rank);
        }
        session.barrier();
    }
    ExitCode::SUCCESS
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("launch_probe: {e}");
    ExitCode::FAILURE
}
