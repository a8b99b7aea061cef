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
    let (nodes, node_index) = node_counts(&leaders, leader_world_rank as usize);

    let node_name = mpi::environment::processor_name()
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(super::hostname);

    // Names of all nodes in node-index order (each node leader contributes
    // its name), so the coordinator default (first node) works under
    // mpirun and `srun --mpi=pmix` across nodes as it does under Slurm.
    let mine: &[u8] = if local_rank == 0 {
        node_name.as_bytes()
    } else {
        &[]
    };
    let mut lengths = vec![0 as mpi::Count; size as usize];
    world.all_gather_into(&(mine.len() as mpi::Count), &mut lengths[..]);
    let displs: Vec<mpi::Count> = lengths
        .iter()
        .scan(0, |acc, &n| {
            let at = *acc;
            *acc += n;
            Some(at)
        })
        .collect();
    let total: usize = lengths.iter().map(|&n| n.max(0) as usize).sum();
    let mut names = vec![0u8; total];
    {
        let mut partition =
            mpi::datatype::PartitionMut::new(&mut names[..], lengths.clone(), &displs[..]);
        world.all_gather_varcount_into(mine, &mut partition);
    }
    let node_list = split_names(&names, &lengths);

    let mut key = match key_override {
        Some(JobKey(k)) => k,
        None if rank == 0 => rand::random::<u64>(),
        None => 0,
    };
    world.process_at_rank(0).broadcast_into(&mut key);

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
        node_list,
    };
    Ok((info, session))
}

/// Number of nodes and this rank's node index from the world-wide "is node
/// leader" flags (local rank 0 of a `split_shared` group) and the world rank
/// of this rank's node leader: nodes are numbered in the order of their
/// leaders' world ranks.
pub fn node_counts(leaders: &[u8], leader_world_rank: usize) -> (u32, u32) {
    let nodes = leaders.iter().filter(|&&l| l == 1).count() as u32;
    let index = leaders[..leader_world_rank.min(leaders.len())]
        .iter()
        .filter(|&&l| l == 1)
        .count() as u32;
    (nodes, index)
}

/// Splits the gathered node names (`lengths[r]` bytes from world rank `r`;
/// non-leaders contribute none) into one name per node, in node-index order.
pub fn split_names(bytes: &[u8], lengths: &[mpi::Count]) -> Vec<String> {
    let mut at = 0usize;
    let mut names = Vec::new();
    for &n in lengths {
        let n = n.max(0) as usize;
        if n > 0 {
            let end = (at + n).min(bytes.len());
            names.push(String::from_utf8_lossy(&bytes[at..end]).into_owned());
        }
        at += n;
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_numbered_by_their_leaders_world_rank() {
        // 4 nodes x 4 ranks, block mapping: leaders at 0, 4, 8, 12.
        let mut leaders = vec![0u8; 16];
        for l in [0, 4, 8, 12] {
            leaders[l] = 1;
        }
        for rank in 0..16 {
            assert_eq!(node_counts(&leaders, rank / 4 * 4), (4, rank as u32 / 4));
        }
        // Round-robin mapping: leaders are world ranks 0..3, node of rank r is r % 4.
        let leaders = [1, 1, 1, 1, 0, 0, 0, 0];
        for rank in 0..8 {
            assert_eq!(node_counts(&leaders, rank % 4), (4, rank as u32 % 4));
        }
    }

    #[test]
    fn gathered_names_come_back_in_node_order() {
        let bytes = b"n1n22n333";
        let lengths = [2, 0, 3, 0, 0, 4];
        assert_eq!(split_names(bytes, &lengths), ["n1", "n22", "n333"]);
        assert!(split_names(b"", &[0, 0]).is_empty());
    }
}
