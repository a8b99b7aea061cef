//! A real Slurm on a virtual cluster (`slurm/vcluster.sh`): munged,
//! slurmctld and one slurmd per network-namespace node, then `sbatch --wait`
//! of `slurm/vcluster-life.sbatch` (`srun --mpi=pmix cellnet probe` and
//! `cellnet life` over 4 nodes × 4 tasks) must end `verified`.
//!
//! Needs root, slurm-wlm and munge (scripts/setup-debian.sh). Missing any of
//! them fails the test: CI has them, and a skipped test would hide a break.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/vcluster.sh");

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("0.0.0.0:0").expect("bind tcp 0");
    l.local_addr().expect("local addr").port()
}

#[test]
fn sbatch_srun_pmix_life_on_four_namespace_nodes_is_verified() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the Slurm test needs root (namespaces, munged, slurmd); CI runs it as root"
    );
    let prefix = format!("s{}", std::process::id() % 100_000);
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=10", "400", SCRIPT])
        .env("CLUSTER_PREFIX", &prefix)
        .env("CLUSTER_SUBNET", "auto")
        .env("VC_CTLD_PORT", free_tcp_port().to_string())
        .env("VC_JOB_TIMEOUT", "300")
        .env("CELLNET", BIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn slurm/vcluster.sh");
    let out = wait(child, Duration::from_secs(420), "slurm/vcluster.sh");
    assert_eq!(
        out.code,
        Some(0),
        "slurm/vcluster.sh failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("verified: sbatch --wait took"),
        "{}",
        out.stdout
    );
    let leaders: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("cellnet probe: rank") && l.contains(" leader "))
        .map(|l| {
            l.split(" leader ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(leaders.len(), 16, "{}", out.stdout);
    let mut distinct: Vec<&str> = leaders.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct,
        ["0", "12", "4", "8"],
        "one leader per node: {leaders:?}"
    );
    println!("{}", out.stdout);
}
