//! Bad input ends with one line naming the problem and exit code 2: no
//! panic, no backtrace.

mod common;
use common::*;
use std::time::Duration;

fn assert_one_line_error(out: &Output, needle: &str) {
    assert_eq!(out.code, Some(2), "exit code; stderr: {}", out.stderr);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {:?}", out.stderr);
    assert!(
        lines[0].contains(needle),
        "{:?} does not mention {needle:?}",
        lines[0]
    );
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("backtrace"));
}

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn unknown_flag_is_one_line_and_exit_2() {
    let out = run(&["life", "--no-such-flag"], &[], LIMIT);
    assert_one_line_error(&out, "--no-such-flag");
}

#[test]
fn non_numeric_rank_is_named() {
    let env = [
        ("CELLNET_RANK", "abc".to_string()),
        ("CELLNET_SIZE", "2".to_string()),
    ];
    let out = run(&["probe"], &env, LIMIT);
    assert_one_line_error(&out, "CELLNET_RANK=abc");
}

#[test]
fn rank_not_below_size_is_named() {
    let env = [
        ("CELLNET_RANK", "4".to_string()),
        ("CELLNET_SIZE", "4".to_string()),
    ];
    let out = run(&["probe"], &env, LIMIT);
    assert_one_line_error(&out, "CELLNET_RANK=4");
}

#[test]
fn bad_config_variable_is_named() {
    let out = run(&["probe"], &[("CELLNET_WINDOW", "0".to_string())], LIMIT);
    assert_one_line_error(&out, "CELLNET_WINDOW");
}

#[test]
fn unresolvable_coordinator_is_named() {
    let out = run(
        &["--coordinator", "no-such-host.invalid:4000", "probe"],
        &[],
        LIMIT,
    );
    assert_one_line_error(&out, "no-such-host.invalid:4000");
}

#[test]
fn coordinator_address_not_on_this_node_is_an_error_not_a_hang() {
    // 198.18.255.254 belongs to no interface here: the leader of node 0
    // cannot run the coordinator there and must say so at once.
    let port = free_udp_port();
    let out = run(
        &[
            "--coordinator",
            "198.18.255.254:4000",
            "--discovery-port",
            &port.to_string(),
            "probe",
        ],
        &[("CELLNET_JOB_KEY", job_key())],
        LIMIT,
    );
    assert_one_line_error(&out, "198.18.255.254:4000");
}

#[test]
fn unreachable_coordinator_times_out_with_a_clear_error() {
    // Node 1's leader registers with a coordinator nobody runs.
    let port = free_udp_port();
    let coord = free_udp_port();
    let env = [
        ("CELLNET_RANK", "1".to_string()),
        ("CELLNET_SIZE", "2".to_string()),
        ("CELLNET_NODES", "2".to_string()),
        ("CELLNET_NODE_INDEX", "1".to_string()),
        ("CELLNET_LOCAL_RANK", "0".to_string()),
        ("CELLNET_LOCAL_SIZE", "1".to_string()),
        ("CELLNET_BIND_IP", "127.0.0.1".to_string()),
        ("CELLNET_JOB_KEY", job_key()),
    ];
    let out = run(
        &[
            "--coordinator",
            &format!("127.0.0.1:{coord}"),
            "--discovery-port",
            &port.to_string(),
            "--join-timeout",
            "2s",
            "probe",
        ],
        &env,
        LIMIT,
    );
    assert_one_line_error(&out, &format!("127.0.0.1:{coord}"));
}

#[test]
fn help_lists_commands_and_variables() {
    let out = run(&["--help"], &[], LIMIT);
    assert_eq!(out.code, Some(0));
    for needle in [
        "life",
        "probe",
        "CELLNET_DISCOVERY_PORT",
        "CELLNET_COORDINATOR",
        "mpirun",
    ] {
        assert!(out.stdout.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn a_corrupt_or_foreign_checkpoint_is_refused_naming_rank_grid_and_seed() {
    let dir = std::env::temp_dir().join(format!("cellnet-cli-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let env = [
        ("CELLNET_RANK", "1".to_string()),
        ("CELLNET_SIZE", "2".to_string()),
    ];
    let d = dir.display().to_string();
    let args = [
        "life",
        "--rows",
        "16",
        "--cols",
        "8",
        "--seed",
        "5",
        "--checkpoint",
        &d,
        "--resume",
    ];
    std::fs::write(dir.join("rank-1"), b"CNLIFE01 and then garbage").unwrap();
    let out = run(&args, &env, LIMIT);
    assert_one_line_error(&out, "rank 1 of 2, 16x8 grid, seed 5");

    // A checkpoint of another seed (written by a real run's code path).
    let other = cellnet::app::checkpoint::Checkpoint {
        id: cellnet::app::checkpoint::CheckpointId {
            rank: 1,
            size: 2,
            rows: 16,
            cols: 8,
            seed: 6,
        },
        frame: 3,
        block_rows: 8,
        block_cols: 8,
        cells: vec![0; 64],
    };
    other.save(&dir).unwrap();
    let out = run(&args, &env, LIMIT);
    assert_one_line_error(&out, "written by rank 1 of 2, 16x8 grid, seed 6");

    let out = run(&["life", "--resume"], &[], LIMIT);
    assert_one_line_error(&out, "--checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
}
