//! Failure detection and leader failover with real processes: kill a
//! node's leader (and, separately, the coordinator's node leader) with
//! SIGKILL mid-run; the survivors detect it, the next lowest rank leads the
//! node and registers, and a barrier plus an all_reduce over the survivors
//! still work.

mod common;
use common::*;

use std::time::Duration;

fn start(layout: &[(u32, u32, u32, u32)], nodes: u32) -> Vec<Instance> {
    let port = free_udp_port().to_string();
    spawn_job(
        layout,
        nodes,
        &["probe", "--hold", "5s"],
        &port,
        &fast_liveness(),
    )
    .into_iter()
    .map(Instance::new)
    .collect()
}

fn run_killing(victim: usize) -> Vec<(Option<i32>, Vec<String>)> {
    let layout = [
        (0, 0, 0, 3),
        (1, 0, 1, 3),
        (2, 0, 2, 3),
        (3, 1, 0, 3),
        (4, 1, 1, 3),
        (5, 1, 2, 3),
    ];
    let mut all = start(&layout, 2);
    for i in &all {
        i.wait_for_line("cellnet probe: rank", Duration::from_secs(30));
    }
    all[victim].kill();
    all.into_iter()
        .enumerate()
        .filter(|(r, _)| *r != victim)
        .map(|(_, i)| i.finish(Duration::from_secs(60)))
        .collect()
}

#[test]
fn a_killed_node_leader_is_replaced_and_the_job_goes_on() {
    let outs = run_killing(3);
    let survivors = [0, 1, 2, 4, 5];
    for ((code, lines), rank) in outs.iter().zip(survivors) {
        assert_eq!(*code, Some(0), "rank {rank}: {lines:?}");
        let last = lines
            .iter()
            .find(|l| l.contains("after hold"))
            .expect("final line");
        assert!(last.contains("survivors 5"), "rank {rank}: {last}");
        if rank >= 4 {
            assert!(last.contains("leader 4 "), "rank {rank}: {last}");
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("LeaderChanged { node: 1, leader: 4 }")),
                "rank {rank}: {lines:?}"
            );
        }
        if rank == 0 || rank == 4 {
            assert!(last.contains("node-leaders [0, 4]"), "rank {rank}: {last}");
        }
    }
}

#[test]
fn a_killed_coordinator_moves_to_node_zeros_next_leader() {
    let outs = run_killing(0);
    let survivors = [1, 2, 3, 4, 5];
    for ((code, lines), rank) in outs.iter().zip(survivors) {
        assert_eq!(*code, Some(0), "rank {rank}: {lines:?}");
        let last = lines
            .iter()
            .find(|l| l.contains("after hold"))
            .expect("final line");
        assert!(last.contains("survivors 5"), "rank {rank}: {last}");
        if rank == 1 || rank == 3 {
            assert!(last.contains("node-leaders [1, 3]"), "rank {rank}: {last}");
        }
        if rank <= 2 {
            assert!(last.contains("leader 1 "), "rank {rank}: {last}");
        }
    }
}
