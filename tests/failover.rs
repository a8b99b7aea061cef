//! Failure detection and leader failover with real processes: kill a
//! node's leader (and, separately, the coordinator's node leader) with
//! SIGKILL mid-run; the survivors detect it, the next lowest rank leads the
//! node and registers, and a barrier plus an all_reduce over the survivors
//! still work.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Instance {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn start(layout: &[(u32, u32, u32, u32)], nodes: u32) -> Vec<Instance> {
    let fast = [
        ("CELLNET_HEARTBEAT", "100ms".to_string()),
        ("CELLNET_SUSPECT_AFTER", "400ms".to_string()),
        ("CELLNET_DEAD_AFTER", "1s".to_string()),
        ("CELLNET_LINGER", "300ms".to_string()),
    ];
    let port = free_udp_port().to_string();
    spawn_job(layout, nodes, &["probe", "--hold", "5s"], &port, &fast)
        .into_iter()
        .map(|mut child| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let out = child.stdout.take().expect("stdout");
            let l = lines.clone();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    l.lock().unwrap().push(line);
                }
            });
            Instance {
                child,
                lines,
                reader: Some(reader),
            }
        })
        .collect()
}

fn wait_for_line(i: &Instance, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !i.lines.lock().unwrap().iter().any(|l| l.contains(needle)) {
        assert!(
            Instant::now() < deadline,
            "no line with {needle:?}: {:?}",
            i.lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish(mut i: Instance) -> (Option<i32>, Vec<String>) {
    let out = std::mem::replace(
        &mut i.child,
        std::process::Command::new("true").spawn().unwrap(),
    );
    let code = wait(out, Duration::from_secs(60), "survivor").code;
    if let Some(r) = i.reader.take() {
        r.join().unwrap();
    }
    let lines = i.lines.lock().unwrap().clone();
    (code, lines)
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
        wait_for_line(i, "cellnet probe: rank", Duration::from_secs(30));
    }
    all[victim].child.kill().expect("kill");
    let _ = all[victim].child.wait();
    all.into_iter()
        .enumerate()
        .filter(|(r, _)| *r != victim)
        .map(|(_, i)| finish(i))
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
