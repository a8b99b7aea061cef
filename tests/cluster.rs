//! A virtual cluster on this host: 4 simulated nodes (network namespaces on a
//! bridge, `scripts/cluster.sh`) × 4 instances each, launched with explicit
//! `CELLNET_*` variables and under `mpirun` with the namespaces as hosts.
//! Every node has its own loopback, so node-local discovery
//! (127.255.255.255) only sees the node's own instances, and leaders join
//! through the coordinator on node 1's bridge address as on a real cluster.
//!
//! Needs root (network namespaces). Not being root fails the test: CI runs
//! as root, and a skipped cluster test would hide a broken cluster.

mod common;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
const NODES: u32 = 4;
const PER_NODE: u32 = 4;

/// A running virtual cluster; torn down (namespaces, veths, bridge) on drop,
/// also when the test panics.
struct Cluster {
    prefix: String,
    net: String,
    rsh: String,
}

fn script(prefix: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "60", SCRIPT])
        .args(args)
        .env("CLUSTER_PREFIX", prefix)
        .env(
            "CLUSTER_SUBNET",
            std::env::var("CELLNET_TEST_SUBNET").unwrap_or_else(|_| "auto".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn scripts/cluster.sh");
    wait(
        child,
        Duration::from_secs(70),
        &format!("cluster.sh {args:?}"),
    )
}

impl Cluster {
    fn up(tag: &str) -> Cluster {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the virtual-cluster tests need root (network namespaces); CI runs them as root"
        );
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        // Leftovers of an earlier run killed before its drop ran.
        script(&prefix, &["down"]);
        let up = script(&prefix, &["up", &NODES.to_string()]);
        assert_eq!(
            up.code,
            Some(0),
            "cluster.sh up failed:\n{}{}",
            up.stdout,
            up.stderr
        );
        let info = script(&prefix, &["info"]);
        assert_eq!(info.code, Some(0), "cluster.sh info: {}", info.stderr);
        let get = |k: &str| {
            info.stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in cluster.sh info: {}", info.stdout))
                .to_string()
        };
        Cluster {
            net: get("NET"),
            rsh: get("RSH"),
            prefix,
        }
    }

    /// Namespace (and host) name of node `k` in 1..=NODES.
    fn name(&self, k: u32) -> String {
        format!("cn-{}-n{k}", self.prefix)
    }

    fn addr(&self, k: u32) -> String {
        format!("{}.{k}", self.net)
    }

    /// `cellnet args…` inside node `k`. The script execs all the way down,
    /// so the child's PID is cellnet's and a kill on timeout reaches it.
    fn spawn(&self, k: u32, args: &[&str], env: &[(&str, String)]) -> Child {
        let mut cmd = Command::new(SCRIPT);
        cmd.arg("exec")
            .arg(k.to_string())
            .arg(BIN)
            .args(args)
            .env("CLUSTER_PREFIX", &self.prefix)
            .env("CELLNET_PLACEMENT", "none")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn cluster.sh exec")
    }

    /// 16 plain processes, 4 per node, explicit identity; coordinator on
    /// node 1 (cellnet node index 0).
    fn launch_explicit(&self, args: &[&str], extra: &[(&str, String)]) -> Vec<Output> {
        let key = job_key();
        let size = NODES * PER_NODE;
        let coordinator = format!("{}:47401", self.addr(1));
        let mut children = Vec::new();
        for node in 0..NODES {
            for local in 0..PER_NODE {
                let rank = node * PER_NODE + local;
                let mut env = vec![
                    ("CELLNET_RANK", rank.to_string()),
                    ("CELLNET_SIZE", size.to_string()),
                    ("CELLNET_NODES", NODES.to_string()),
                    ("CELLNET_NODE", self.name(node + 1)),
                    ("CELLNET_NODE_INDEX", node.to_string()),
                    ("CELLNET_LOCAL_RANK", local.to_string()),
                    ("CELLNET_LOCAL_SIZE", PER_NODE.to_string()),
                    ("CELLNET_DISCOVERY_PORT", "47400".to_string()),
                    ("CELLNET_COORDINATOR", coordinator.clone()),
                    ("CELLNET_BIND_IP", self.addr(node + 1)),
                    ("CELLNET_JOB_KEY", key.clone()),
                    ("CELLNET_JOIN_TIMEOUT", "60s".to_string()),
                ];
                env.extend(extra.iter().cloned());
                // Debugging a failure: CELLNET_TEST_LOG=cellnet=debug.
                if let Ok(log) = std::env::var("CELLNET_TEST_LOG") {
                    env.push(("CELLNET_LOG", log));
                }
                children.push(self.spawn(node + 1, args, &env));
            }
        }
        let outs = children
            .into_iter()
            .enumerate()
            .map(|(i, c)| wait(c, Duration::from_secs(120), &format!("instance {i}")))
            .collect::<Vec<_>>();
        if let Ok(dir) = std::env::var("CELLNET_TEST_LOG_DIR") {
            for (rank, out) in outs.iter().enumerate() {
                let path = format!("{dir}/{}-rank{rank}.log", args[0]);
                let _ = std::fs::write(path, format!("{}\n{}", out.stdout, out.stderr));
            }
        }
        outs
    }

    /// `mpirun -n 16` with the 4 namespaces as hosts (4 slots each): one
    /// orted per namespace, started by the cluster's rsh launcher in place
    /// of ssh; MPI's own TCP confined to the cluster subnet.
    fn mpirun(&self, args: &[&str], limit: Duration) -> Output {
        let hostfile = std::env::temp_dir().join(format!("cellnet-hosts-{}", self.prefix));
        let hosts: String = (1..=NODES)
            .map(|k| format!("{} slots={PER_NODE}\n", self.name(k)))
            .collect();
        std::fs::write(&hostfile, hosts).expect("write hostfile");
        let subnet = format!("{}.0/24", self.net);
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=5")
            .arg(limit.as_secs().to_string())
            .arg("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--bind-to",
                "none",
            ])
            .args(["--map-by", "slot", "-n"])
            .arg((NODES * PER_NODE).to_string())
            .arg("--hostfile")
            .arg(&hostfile)
            .args(["--mca", "plm_rsh_agent", &self.rsh])
            .args(["--mca", "plm_rsh_no_tree_spawn", "1"])
            .args(["--mca", "oob_tcp_if_include", &subnet])
            .args(["--mca", "btl_tcp_if_include", &subnet])
            .args(["--mca", "btl", "self,vader,tcp"])
            .args(["-x", "CELLNET_PLACEMENT=none"])
            .args(["-x", "CELLNET_JOIN_TIMEOUT=60s"])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("CLUSTER_PREFIX", &self.prefix)
            .env_remove("OMPI_MCA_btl_tcp_if_include")
            .env_remove("OMPI_MCA_oob_tcp_if_include")
            .arg(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .expect("spawn mpirun (is openmpi-bin installed?)");
        let out = wait(child, limit + Duration::from_secs(10), "mpirun");
        let _ = std::fs::remove_file(&hostfile);
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let down = script(&self.prefix, &["down"]);
        let left = Command::new("ip").args(["netns", "list"]).output();
        let leftover = left
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("cn-{}-", self.prefix)))
            .unwrap_or(false);
        if (down.code != Some(0) || leftover) && !std::thread::panicking() {
            panic!(
                "cluster.sh down failed or left namespaces behind: {}{}",
                down.stdout, down.stderr
            );
        }
    }
}

/// Fails naming every instance that did not exit 0, with its stderr.
fn assert_all_ok(what: &str, outs: &[Output]) {
    let failed: Vec<String> = outs
        .iter()
        .enumerate()
        .filter(|(_, o)| o.code != Some(0))
        .map(|(r, o)| format!("rank {r} exit {:?}: {}", o.code, o.stderr.trim()))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} instances failed:\n{}",
        failed.len(),
        outs.len(),
        failed.join("\n")
    );
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("{key} missing in {line}"))
        + key.len()..];
    rest.split_whitespace().next().unwrap_or("")
}

/// Probe lines by rank, from any number of outputs.
fn probe_lines(stdout: &str) -> Vec<(u32, String)> {
    let mut lines: Vec<(u32, String)> = stdout
        .lines()
        .filter(|l| l.starts_with("cellnet probe: rank") && l.contains(" leader "))
        .map(|l| {
            let rank = field(l, "rank ")
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (rank, l.to_string())
        })
        .collect();
    lines.sort();
    lines
}

/// Every rank: on node r/4 of 4 (named after its namespace), local r%4 of 4,
/// 4 peers on its node, leader = lowest rank of the node.
fn check_probe(cluster: &Cluster, lines: &[(u32, String)]) {
    assert_eq!(
        lines.len() as u32,
        NODES * PER_NODE,
        "probe lines: {lines:#?}"
    );
    for (rank, line) in lines {
        let node = rank / PER_NODE;
        assert_eq!(field(line, "node "), cluster.name(node + 1), "{line}");
        let mut it = line.split(" node ").nth(1).unwrap().split_whitespace();
        it.next();
        assert_eq!(
            it.next(),
            Some(format!("({node}/{NODES})").as_str()),
            "node index/nodes: {line}"
        );
        assert_eq!(
            field(line, "local "),
            format!("{}/{PER_NODE}", rank % PER_NODE),
            "{line}"
        );
        assert_eq!(field(line, "peers-on-node "), "4", "{line}");
        assert_eq!(
            field(line, "leader "),
            (node * PER_NODE).to_string(),
            "{line}"
        );
        assert!(
            field(line, "coordinator ").starts_with(&format!("{}:", cluster.addr(1))),
            "coordinator must be node 1's address: {line}"
        );
        assert!(
            field(line, "tcp ").starts_with(&format!("tcp://{}:", cluster.addr(node + 1))),
            "tcp endpoint on the node's own address: {line}"
        );
    }
}

const LIFE: [&str; 7] = ["life", "--rows", "128", "--cols", "128", "--frames", "20"];

#[test]
fn sixteen_plain_processes_on_four_namespace_nodes_probe_exchange_and_life() {
    let cluster = Cluster::up("a");
    let outs = cluster.launch_explicit(&["probe", "--exchange", "5"], &[]);
    let mut all = String::new();
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "rank {rank} failed: {}", out.stderr);
        assert!(
            out.stdout.contains(&format!(
                "rank {rank} exchange ok: sent 75 cells to 15 peers, 75 acked, received 75 cells"
            )),
            "rank {rank}: {}",
            out.stdout
        );
        all.push_str(&out.stdout);
    }
    check_probe(&cluster, &probe_lines(&all));

    let outs = cluster.launch_explicit(&LIFE, &[]);
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.code, Some(0), "life rank {rank} failed: {}", out.stderr);
    }
    assert!(outs[0].stdout.contains("verified"), "{}", outs[0].stdout);
}

#[test]
fn mpirun_with_namespaces_as_hosts_gives_node_identity_and_life_verified() {
    let cluster = Cluster::up("b");
    let out = cluster.mpirun(&["probe"], Duration::from_secs(120));
    assert_eq!(
        out.code,
        Some(0),
        "mpirun probe failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    check_probe(&cluster, &probe_lines(&out.stdout));

    let out = cluster.mpirun(&LIFE, Duration::from_secs(120));
    assert_eq!(
        out.code,
        Some(0),
        "mpirun life failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("verified"), "{}", out.stdout);
}

impl Cluster {
    /// Drop `pct` % of UDP and TCP arriving on every node's eth0 (nftables
    /// inside each namespace; loopback, so node-local traffic, is spared).
    fn loss(&self, pct: u32) {
        let out = script(&self.prefix, &["nft-loss", &pct.to_string()]);
        assert_eq!(out.code, Some(0), "cluster.sh nft-loss: {}", out.stderr);
    }

    /// Packets the loss rules dropped, summed over all nodes.
    fn dropped(&self) -> u64 {
        (1..=NODES)
            .map(|k| {
                let out = Command::new("timeout")
                    .args(["10", "ip", "netns", "exec", &self.name(k)])
                    .args(["nft", "list", "table", "inet", "cellnet_loss"])
                    .stdin(Stdio::null())
                    .output()
                    .expect("nft list");
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                field(&text, "packets ").parse::<u64>().unwrap_or(0)
            })
            .sum()
    }
}

// Failed about 1 run in 3 before main's draining shutdown (dcafbe1): one
// member's first cell to a remote non-neighbour (the final gather to rank
// 0) was never acknowledged and rank 0 reported "frame 20 missing ... no
// complete part from ranks [N]"; 9 of 9 runs pass since. To debug:
// CELLNET_TEST_LOG=cellnet=debug CELLNET_TEST_LOG_DIR=/tmp/x keeps logs.
#[test]
fn life_on_four_nodes_survives_ten_percent_loss_delay_and_duplicates() {
    let cluster = Cluster::up("c");
    cluster.loss(10);
    let outs = cluster.launch_explicit(&["probe", "--exchange", "5"], &[]);
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(
            out.code,
            Some(0),
            "rank {rank} failed under loss: {}",
            out.stderr
        );
        assert!(
            out.stdout.contains("exchange ok"),
            "rank {rank}: {}",
            out.stdout
        );
    }
    // On top of the loss: cellnet's own fault injection adds 5 ms +- 2 ms
    // to every message and sends 2% of them twice.
    let faults = [
        ("CELLNET_FAULT_DELAY", "5ms".to_string()),
        ("CELLNET_FAULT_JITTER", "2ms".to_string()),
        ("CELLNET_FAULT_DUP", "0.02".to_string()),
    ];
    let outs = cluster.launch_explicit(&LIFE, &faults);
    assert_all_ok("life under 10% loss, 5+-2 ms delay, 2% duplicates", &outs);
    assert!(outs[0].stdout.contains("verified"), "{}", outs[0].stdout);
    let dropped = cluster.dropped();
    assert!(
        dropped > 0,
        "the loss rules dropped nothing: not a fault test"
    );
    println!("10% loss + delay + duplicates: {dropped} packets dropped, life verified");
}
