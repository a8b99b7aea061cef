//! The same under `mpirun -n 4`: identity from MPI, discovery, one leader,
//! global ready, ACKed exchange, and the main job verified.

mod common;
use common::*;
use std::time::Duration;

fn env() -> Vec<(&'static str, String)> {
    vec![
        ("CELLNET_DISCOVERY_PORT", free_udp_port().to_string()),
        (
            "CELLNET_COORDINATOR",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
        ("CELLNET_PLACEMENT", "compact".to_string()),
        ("CELLNET_JOIN_TIMEOUT", "60s".to_string()),
    ]
}

#[test]
fn mpirun_four_ranks_probe_and_exchange() {
    let out = mpirun(
        4,
        &["probe", "--exchange", "50"],
        &env(),
        Duration::from_secs(120),
    );
    out.assert_ok();
    let probes: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains(" leader "))
        .collect();
    assert_eq!(probes.len(), 4, "{}", out.stdout);
    for p in &probes {
        assert!(p.contains(" leader 0 "), "{p}");
        assert!(p.contains("node ") && p.contains("local "), "{p}");
        assert!(p.contains("(compact)"), "{p}");
    }
    let ok = out
        .stdout
        .lines()
        .filter(|l| l.contains("sent 150 cells to 3 peers, 150 acked, received 150 cells"))
        .count();
    assert_eq!(ok, 4, "{}", out.stdout);
}

#[test]
fn mpirun_four_ranks_life_is_verified() {
    let out = mpirun(4, &["life"], &env(), Duration::from_secs(240));
    out.assert_ok();
    assert!(
        out.stdout.contains("512x512 grid, 100 frames, 4 instances"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("verified"), "{}", out.stdout);
    assert_eq!(
        out.stdout
            .lines()
            .filter(|l| l.starts_with("frame"))
            .count(),
        100
    );
}

#[test]
fn mpirun_eight_ranks_collectives_equal_mpi() {
    let out = mpirun(8, &["collectives"], &env(), Duration::from_secs(120));
    out.assert_ok();
    let ok = out
        .stdout
        .lines()
        .filter(|l| l.contains("ok on 8 instances, equal to MPI"))
        .count();
    assert_eq!(ok, 8, "{}", out.stdout);
}
