//! MPI launch: identity from the MPI world (rsmpi). Owns MPI initialization
//! and finalization ([`MpiSession`]) and the panic hook that aborts the MPI
//! job. Cells never travel over MPI; the world communicator is exposed only
//! for identity and for benchmark baselines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use super::{job_key_override, LaunchError, LaunchInfo, LaunchSource};
use crate::proto::JobKey;

/// True while an [`MpiSession`] exists: MPI is initialized and not finalized,
/// so the panic hook may call `MPI_Abort`.
static MPI_LIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// Keeps MPI initialized. Hold it for the life of the process; dropping it
/// finalizes MPI (after which no MPI call may be made, ever).
pub struct MpiSession {
    universe: Universe,
    threading: Threading,
}

impl MpiSession {
    /// The world communicator (for barriers and MPI benchmark baselines).
    pub fn world(&self) -> SimpleCommunicator {
        self.universe.world()
    }

    /// The thread support level MPI granted. cellnet calls MPI only from
    /// the thread that called [`detect`](super::detect).
    pub fn threading(&self) -> Threading {
        self.threading
    }

    /// Blocks until every rank of the world has called it.
    pub fn barrier(&self) {
        self.world().barrier();
    }

    /// Sum of `value` over all ranks of the world.
    pub fn all_reduce_sum_u64(&self, value: u64) -> u64 {
        let mut sum = 0u64;
        self.world()
            .all_reduce_into(&value, &mut sum, SystemOperation::sum());
        sum
    }

    /// `value` of every rank of the world, indexed by world rank.
    pub fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        let world = self.world();
        let mut all = vec![0u64; world.size() as usize];
        world.all_gather_into(&value, &mut all[..]);
        all
    }
}

impl Drop for MpiSession {
    fn drop(&mut self) {
        // Before `universe` drops and finalizes: a later panic must not
        // call MPI_Abort on a finalized MPI.
        MPI_LIVE.store(false, Ordering::SeqCst);
    }
}

/// Installs (once) a panic hook that prints the panic as usual and then
/// aborts the whole MPI job, so the other ranks do not wait forever in a
/// collective for the rank that died.
fn install_abort_on_panic() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |panic| {
            previous(panic);
            if MPI_LIVE.swap(false, Ordering::SeqCst) {
                eprintln!("cellnet: panic under MPI, aborting the MPI job");
                SimpleCommunicator::world().abort(101);
            }
        }));
    });
}

fn to_u32(what: &str, value: i32) -> Result<u32, LaunchError> {
    u32::try_from(value).map_err(|_| LaunchError::MpiValue(format!("{what} = {value}")))
}

/// Initializes MPI and derives this instance's identity from the world:
/// node-local group by `MPI_Comm_split_type(SHARED)`, node count and node
/// index from the node leaders (local rank 0), job key chosen by world rank
/// 0 (random, or `CELLNET_JOB_KEY`) and broadcast.
pub fn from_mpi(vars: &HashMap<String, String>) -> Result<(LaunchInfo, MpiSession), LaunchError> {
    // Validate the override on every rank before any collective, so a bad
    // value fails everywhere instead of hanging the ranks that parsed fine.
    let key_override = job_key_override(vars)?;

    // Funneled is all cellnet needs (only the main thread calls MPI).
    let (universe, threading) = mpi::initialize_with_threading(Threading::Funneled)
        .ok_or(LaunchError::MpiAlreadyInitialized)?;
    let session = MpiSession {
        universe,
        threading,
    };
    MPI_LIVE.store(true, Ordering::SeqCst);
    install_abort_on_panic();

    let world = session.world();
    let world_rank = world.rank();
    let rank = to_u32("world rank", world_rank)?;
    let size = to_u32("world size", world.size())?;

    let local = world.split_shared(world_rank);
    let local_rank = to_u32("node-local rank", local.rank())?;
    let local_size = to_u32("node-local size", local.size())?;

    // Node index: order nodes by the world rank of their leader.
    let mut leader_world_rank = world_rank;
    local
        .process_at_rank(0)
        .broadcast_into(&mut leader_world_rank);
    let is_leader = u8::from(local_rank == 0);
    let mut leaders = vec![0u8; size as usize];
    world.all_gather_into(&is_leader, &mut leaders[..]);
    let nodes = leaders.iter().filter(|&&l| l == 1).count() as u32;
    let node_index = leaders[..leader_world_rank as usize]
        .iter()
        .filter(|&&l| l == 1)
        .count() as u32;

    let mut key = match key_override {
        Some(JobKey(k)) => k,
        None if rank == 0 => rand::random::<u64>(),
        None => 0,
    };
    world.process_at_rank(0).broadcast_into(&mut key);

    let node_name = mpi::environment::processor_name()
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(super::hostname);

    let info = LaunchInfo {
        rank,
        size,
        node_name,
        node_index,
        local_rank,
        local_size,
        nodes,
        job_key: JobKey(key),
        source: LaunchSource::Mpi,
        node_list: Vec::new(),
    };
    Ok((info, session))
}
