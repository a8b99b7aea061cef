//! Failure detection and leader failover with real processes: kill a
//! node's leader (and, separately, the coordinator's node leader) with
//! SIGKILL mid-run, or a node's leader before the job is globally ready;
//! the survivors detect it, the next lowest rank leads the node and
//! registers, and a barrier plus an all_reduce over the survivors still
//! work.

mod common;
use common::*;

use std::time::Duration;

/// `layout`'s instances of a job on one discovery port, with fast failure
/// detection; `job` adds (or overrides) variables, e.g. to start one job
/// in several parts.
fn start(
    layout: &[(u32, u32, u32, u32)],
    nodes: u32,
    port: &str,
    job: &[(&'static str, String)],
) -> Vec<Instance> {
    let mut env = fast_liveness();
    env.extend(job.iter().cloned());
    spawn_job(layout, nodes, &["probe", "--hold", "5s"], port, &env)
        .into_iter()
        .map(Instance::new)
        .collect()
}

/// Two nodes of three instances: ranks 0-2 on node 0, 3-5 on node 1.
fn layout() -> Vec<(u32, u32, u32, u32)> {
    even_layout(2, 3)
}

fn run_killing(victim: usize) -> Vec<(Option<i32>, Vec<String>)> {
    let mut all = start(&layout(), 2, &free_udp_port().to_string(), &[]);
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
    assert_node_1_led_by_rank_4(&outs);
    for ((_, lines), rank) in outs.iter().zip([0, 1, 2, 4, 5]) {
        if rank >= 4 {
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("LeaderChanged { node: 1, leader: 4 }")),
                "rank {rank}: {lines:?}"
            );
        }
    }
}

/// Each of the five survivors (`ranks`, in the order of `outs`) exited 0
/// after a barrier and an all_reduce counting 5: its rank and final line.
fn survivors_final_lines(outs: &[(Option<i32>, Vec<String>)], ranks: [u32; 5]) -> Vec<(u32, &str)> {
    outs.iter()
        .zip(ranks)
        .map(|((code, lines), rank)| {
            assert_eq!(*code, Some(0), "rank {rank}: {lines:?}");
            let last = lines
                .iter()
                .find(|l| l.contains("after hold"))
                .expect("final line");
            assert!(last.contains("survivors 5"), "rank {rank}: {last}");
            (rank, last.as_str())
        })
        .collect()
}

/// Rank 3 (node 1's leader) died: ranks 0, 1, 2, 4, 5 (in that order in
/// `outs`) exit 0 after a barrier and an all_reduce over the 5 survivors,
/// node 1 follows rank 4, and the leaders list rank 4 for node 1.
fn assert_node_1_led_by_rank_4(outs: &[(Option<i32>, Vec<String>)]) {
    for (rank, last) in survivors_final_lines(outs, [0, 1, 2, 4, 5]) {
        if rank >= 4 {
            assert!(last.contains("leader 4 "), "rank {rank}: {last}");
        }
        if rank == 0 || rank == 4 {
            assert!(last.contains("node-leaders [0, 4]"), "rank {rank}: {last}");
        }
    }
}

#[test]
fn a_killed_coordinator_moves_to_node_zeros_next_leader() {
    let outs = run_killing(0);
    for (rank, last) in survivors_final_lines(&outs, [1, 2, 3, 4, 5]) {
        if rank == 1 || rank == 3 {
            assert!(last.contains("node-leaders [1, 3]"), "rank {rank}: {last}");
        }
        if rank <= 2 {
            assert!(last.contains("leader 1 "), "rank {rank}: {last}");
        }
    }
}

/// Node 1 starts alone and its leader (rank 3) is killed before node 0
/// exists, so before the job can be globally ready; then node 0 starts.
/// Rank 4 leads node 1 and registers rank 3 as lost, so the coordinator
/// does not wait for it: the five survivors become ready and work.
#[test]
fn a_node_leader_killed_before_global_ready_is_replaced_and_the_job_becomes_ready() {
    let port = free_udp_port().to_string();
    let job = [
        ("CELLNET_SIZE", "6".to_string()),
        ("CELLNET_JOB_KEY", job_key()),
        (
            "CELLNET_COORDINATOR",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
    ];
    let mut node1 = start(&layout()[3..], 2, &port, &job);
    // Node 1's handshake takes milliseconds; node 0 is not there, so
    // nobody can be globally ready yet.
    std::thread::sleep(Duration::from_millis(1500));
    let mut victim = node1.remove(0);
    victim.kill();
    assert!(
        !victim.lines().iter().any(|l| l.contains("probe: rank")),
        "rank 3 was globally ready before it was killed"
    );
    let node0 = start(&layout()[..3], 2, &port, &job);
    let outs: Vec<_> = node0
        .into_iter()
        .chain(node1)
        .map(|i| i.finish(Duration::from_secs(60)))
        .collect();
    assert_node_1_led_by_rank_4(&outs);
}
