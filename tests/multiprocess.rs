//! Several `cellnet` processes on this host, launched with explicit
//! `CELLNET_*` variables (no MPI): discovery, one leader per node, global
//! ready, cells exchanged with ACKs in both directions.

mod common;
use common::*;
use std::time::Duration;

/// Start one process per `(rank, node_index, local_rank, local_size)`.
fn launch(layout: &[(u32, u32, u32, u32)], nodes: u32, args: &[&str]) -> Vec<Output> {
    launch_with(layout, nodes, args, &free_udp_port().to_string(), &[])
}

fn launch_with(
    layout: &[(u32, u32, u32, u32)],
    nodes: u32,
    args: &[&str],
    port: &str,
    extra: &[(&'static str, String)],
) -> Vec<Output> {
    spawn_job(layout, nodes, args, port, extra)
        .into_iter()
        .enumerate()
        .map(|(i, c)| wait(c, Duration::from_secs(90), &format!("instance {i}")))
        .collect()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("{key} missing in {line}"))
        + key.len()..];
    rest.split_whitespace().next().unwrap_or("")
}

#[test]
fn four_instances_on_one_node_discover_elect_one_leader_and_exchange() {
    let layout: Vec<_> = (0..4).map(|r| (r, 0, r, 4)).collect();
    let outs = launch(&layout, 1, &["probe", "--exchange", "25"]);
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank} failed: {}", out.stderr);
        let probe = out
            .stdout
            .lines()
            .find(|l| l.contains("leader"))
            .expect("probe line");
        assert_eq!(field(probe, "leader "), "0", "rank {rank}: {probe}");
        assert_eq!(field(probe, "peers-on-node "), "4", "rank {rank}: {probe}");
        assert!(field(probe, "ipc ").starts_with("ipc://"), "{probe}");
        let ex = out
            .stdout
            .lines()
            .find(|l| l.contains("exchange ok"))
            .expect("exchange line");
        assert!(
            ex.contains("sent 75 cells to 3 peers, 75 acked, received 75 cells"),
            "{ex}"
        );
    }
}

#[test]
fn two_nodes_on_one_host_join_through_the_coordinator() {
    // Nodes 0 and 1 share the loopback broadcast domain here; discovery
    // must keep them apart by node index, and cells between nodes go
    // over tcp:// through the directory their leaders hold.
    let outs = launch(&even_layout(2, 2), 2, &["probe", "--exchange", "10"]);
    let mut leaders = Vec::new();
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank} failed: {}", out.stderr);
        let probe = out
            .stdout
            .lines()
            .find(|l| l.contains("leader"))
            .expect("probe line");
        leaders.push(field(probe, "leader ").to_string());
        assert_eq!(field(probe, "peers-on-node "), "2", "{probe}");
        assert!(
            out.stdout
                .contains("sent 30 cells to 3 peers, 30 acked, received 30 cells"),
            "{}",
            out.stdout
        );
    }
    assert_eq!(
        leaders,
        vec!["0", "0", "2", "2"],
        "one leader per node, the lowest rank"
    );
}

#[test]
fn life_across_four_plain_processes_is_verified() {
    let layout: Vec<_> = (0..4).map(|r| (r, 0, r, 4)).collect();
    let outs = launch(
        &layout,
        1,
        &["life", "--rows", "96", "--cols", "80", "--frames", "30"],
    );
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank} failed: {}", out.stderr);
    }
    assert!(outs[0].stdout.contains("verified"), "{}", outs[0].stdout);
    assert_eq!(
        outs[0]
            .stdout
            .lines()
            .filter(|l| l.starts_with("frame"))
            .count(),
        30
    );
}

#[test]
fn stress_100k_cells_each_way_every_ticket_right_and_handled_once() {
    let outs = launch(
        &even_layout(1, 2),
        1,
        &["stress", "--cells", "100000", "--err-every", "97"],
    );
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank} failed: {}", out.stderr);
        assert!(
            out.stdout.contains("100000 cells sent, every ticket right (98969 ACK, 1031 ERR), each received cell handled exactly once, 100 frames in order"),
            "{}",
            out.stdout
        );
    }
}

/// The same contract with one `send_many` ticket per frame and peer: each
/// batch's outcome names exactly the refused cells, across three instances
/// on two nodes, with a window smaller than a frame.
#[test]
fn stress_with_send_many_names_exactly_the_refused_cells() {
    let layout = [(0, 0, 0, 2), (1, 0, 1, 2), (2, 1, 0, 1)];
    let args = [
        "stress",
        "--many",
        "--cells",
        "30000",
        "--per-frame",
        "3000",
        "--err-every",
        "89",
    ];
    let window = [("CELLNET_WINDOW", "512".to_string())];
    let outs = launch_with(&layout, 2, &args, &free_udp_port().to_string(), &window);
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank} failed: {}", out.stderr);
        // 30000 cells to each of 2 peers; 338 of every 30000 refused.
        assert!(
            out.stdout.contains("60000 cells sent with send_many, every ticket right (59324 ACK, 676 ERR), each received cell handled exactly once, 10 frames in order"),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn collectives_across_three_nodes_through_leaders_and_coordinator() {
    let outs = launch(&even_layout(3, 2), 3, &["collectives", "--timeout", "20s"]);
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank} failed: {}", out.stderr);
        assert!(
            out.stdout
                .contains(&format!("rank {rank} ok on 6 instances")),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn two_jobs_on_one_discovery_port_never_see_each_other() {
    // Same host, same discovery port, different job keys: each job must
    // complete with exactly its own peers (and count the other's beacons
    // as foreign, never as members).
    let port = free_udp_port().to_string();
    let layout: Vec<_> = (0..3).map(|r| (r, 0, r, 3)).collect();
    let a = spawn_job(&layout, 1, &["probe", "--exchange", "10"], &port, &[]);
    let b = spawn_job(&layout, 1, &["probe", "--exchange", "10"], &port, &[]);
    for (job, children) in [("a", a), ("b", b)] {
        for (rank, c) in children.into_iter().enumerate() {
            let out = wait(
                c,
                Duration::from_secs(90),
                &format!("job {job} rank {rank}"),
            );
            assert_eq!(out.code, Some(0), "job {job} rank {rank}: {}", out.stderr);
            let probe = out
                .stdout
                .lines()
                .find(|l| l.contains("leader"))
                .expect("probe line");
            assert_eq!(field(probe, "peers-on-node "), "3", "job {job}: {probe}");
            assert!(
                out.stdout
                    .contains("sent 20 cells to 2 peers, 20 acked, received 20 cells"),
                "job {job}: {}",
                out.stdout
            );
        }
    }
}

#[test]
fn life_survives_injected_delay_jitter_and_duplicates() {
    let layout: Vec<_> = (0..4).map(|r| (r, 0, r, 4)).collect();
    let faults = [
        ("CELLNET_FAULT_DELAY", "5ms".to_string()),
        ("CELLNET_FAULT_JITTER", "2ms".to_string()),
        ("CELLNET_FAULT_DUP", "0.05".to_string()),
    ];
    let args = ["life", "--rows", "64", "--cols", "64", "--frames", "20"];
    let outs = launch_with(&layout, 1, &args, &free_udp_port().to_string(), &faults);
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank} failed: {}", out.stderr);
    }
    assert!(outs[0].stdout.contains("verified"), "{}", outs[0].stdout);
}

/// Six instances on one node run `run`; rank 4 (not the leader) is
/// killed after frame 15 and started again with --resume, and the run is
/// checked (`LifeRestart::check`).
fn kill_rank_4_and_resume(run: &LifeRestart, extra: &[(&'static str, String)]) -> Vec<Output> {
    let layout: Vec<_> = (0..6).map(|r| (r, 0, r, 6)).collect();
    let env = job_env(&layout, 1, &free_udp_port().to_string(), extra);
    let args = run.args(false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let children = env.iter().map(|e| spawn(&args, e)).collect();
    let outs = run.kill_and_resume(
        children,
        4,
        15,
        |args| spawn(args, &env[4]),
        Duration::from_secs(90),
    );
    run.check(&outs, 4, 15);
    outs
}

#[test]
fn a_killed_instance_restarted_from_its_checkpoint_completes_life() {
    // 6 instances on one node: rank 4 (not the leader) is killed after
    // frame 15 of 60 and started again with --resume.
    kill_rank_4_and_resume(&LifeRestart::new("mp", 60, 90, 60, 6), &[]);
}

#[test]
fn an_instance_restarted_after_it_was_declared_dead_completes_life() {
    // Failure detection declares rank 4 dead after 1 s; it comes back 2.5 s
    // after the kill: its node-mates dropped it from the node and must take
    // the new life back in.
    let mut run = LifeRestart::new("mp-dead", 60, 90, 60, 6);
    run.down_for = Duration::from_millis(2500);
    let outs = kill_rank_4_and_resume(&run, &fast_liveness());
    assert!(
        outs[0].stdout.contains("rank 0 lost rank 4"),
        "not declared dead before its restart: {}",
        outs[0].stdout
    );
}
