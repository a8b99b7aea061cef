//! `cellnet collectives`: run every collective through cellnet on
//! rank-dependent inputs, check the results against what they must be, and
//! under MPI compare each with the same operation done by MPI.

use std::time::Duration;

use mpi::collective::SystemOperation;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};

use crate::runtime::Communicator;

fn input(rank: u32) -> u64 {
    (rank as u64) * 7919 + 13
}

/// Run the checks; returns a summary line or what differed.
pub fn run(comm: &Communicator, timeout: Duration) -> Result<String, String> {
    let (rank, size) = (comm.rank(), comm.size());
    let e = |op: &str, err: crate::runtime::CollectiveError| format!("{op}: {err}");
    comm.barrier(timeout).map_err(|x| e("barrier", x))?;
    // The last rank is a member on the last node: its values travel the
    // whole tree (member → leader → coordinator and back).
    let root = size - 1;
    let b: u64 = comm
        .broadcast(root, (rank == root).then(|| input(root) * 3), timeout)
        .map_err(|x| e("broadcast", x))?;
    let g = comm
        .gather(root, &input(rank), timeout)
        .map_err(|x| e("gather", x))?;
    let ag: Vec<u64> = comm
        .all_gather(&input(rank), timeout)
        .map_err(|x| e("all_gather", x))?;
    let sum = comm
        .all_reduce_sum(input(rank), timeout)
        .map_err(|x| e("all_reduce sum", x))?;
    let min = comm
        .all_reduce_min(input(rank), timeout)
        .map_err(|x| e("all_reduce min", x))?;
    let max = comm
        .all_reduce_max(input(rank), timeout)
        .map_err(|x| e("all_reduce max", x))?;
    let fsum = comm
        .all_reduce_sum(rank as f64 * 0.5, timeout)
        .map_err(|x| e("all_reduce f64", x))?;
    comm.barrier(timeout).map_err(|x| e("barrier", x))?;

    // What the results must be, from first principles.
    let want: Vec<u64> = (0..size).map(input).collect();
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!("rank {rank}: {what} is wrong"))
        }
    };
    check(b == input(root) * 3, "broadcast")?;
    check(g == (rank == root).then(|| want.clone()), "gather")?;
    check(ag == want, "all_gather")?;
    check(sum == want.iter().sum::<u64>(), "all_reduce sum")?;
    check(
        min == want[0] && max == want[size as usize - 1],
        "all_reduce min/max",
    )?;
    check(
        fsum == (0..size).map(|r| r as f64 * 0.5).sum::<f64>(),
        "all_reduce f64 sum",
    )?;

    let Some(mpi) = comm.mpi() else {
        return Ok(format!(
            "cellnet collectives: rank {rank} ok on {size} instances (no MPI to compare with)"
        ));
    };
    // The same operations done by MPI, on the same inputs.
    let world = mpi.world();
    let mine = input(rank);
    let mut m_sum = 0u64;
    world.all_reduce_into(&mine, &mut m_sum, SystemOperation::sum());
    let mut m_min = 0u64;
    world.all_reduce_into(&mine, &mut m_min, SystemOperation::min());
    let mut m_max = 0u64;
    world.all_reduce_into(&mine, &mut m_max, SystemOperation::max());
    let mut m_ag = vec![0u64; size as usize];
    world.all_gather_into(&mine, &mut m_ag[..]);
    let mut m_b = if rank == root { input(root) * 3 } else { 0 };
    world.process_at_rank(root as i32).broadcast_into(&mut m_b);
    let mut m_f = 0f64;
    world.all_reduce_into(&(rank as f64 * 0.5), &mut m_f, SystemOperation::sum());
    let r = world.process_at_rank(root as i32);
    let m_g = if rank == root {
        let mut all = vec![0u64; size as usize];
        r.gather_into_root(&mine, &mut all[..]);
        Some(all)
    } else {
        r.gather_into(&mine);
        None
    };
    let same = [
        (sum == m_sum, "all_reduce sum"),
        (min == m_min, "all_reduce min"),
        (max == m_max, "all_reduce max"),
        (ag == m_ag, "all_gather"),
        (b == m_b, "broadcast"),
        (fsum == m_f, "all_reduce f64 sum"),
        (g == m_g, "gather"),
    ];
    if let Some((_, what)) = same.iter().find(|(ok, _)| !ok) {
        return Err(format!("rank {rank}: {what} differs from MPI"));
    }
    Ok(format!(
        "cellnet collectives: rank {rank} ok on {size} instances, equal to MPI (barrier, broadcast, gather, all_gather, all_reduce sum/min/max/f64)"
    ))
}
