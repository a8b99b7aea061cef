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
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
const NODES: u32 = 4;
const PER_NODE: u32 = 4;
/// Every job uses this discovery port on every node (jobs are told apart
/// by their keys).
const DISCOVERY_PORT: u16 = 47400;

/// One job on the cluster: its key and its coordinator's port on node 1.
struct Job {
    key: String,
    coordinator_port: u16,
}

impl Job {
    /// The `n`-th job started at once on the cluster (own key, own
    /// coordinator port).
    fn new(n: u16) -> Job {
        Job {
            key: job_key(),
            coordinator_port: 47401 + n,
        }
    }
}

/// Wait for every instance (120 s at most), keeping their output in
/// CELLNET_TEST_LOG_DIR if set.
fn wait_all(what: &str, children: Vec<Child>) -> Vec<Output> {
    let outs = children
        .into_iter()
        .enumerate()
        .map(|(i, c)| wait(c, Duration::from_secs(120), &format!("instance {i}")))
        .collect::<Vec<_>>();
    if let Ok(dir) = std::env::var("CELLNET_TEST_LOG_DIR") {
        for (rank, out) in outs.iter().enumerate() {
            let path = format!("{dir}/{what}-rank{rank}.log");
            let _ = std::fs::write(path, format!("{}\n{}", out.stdout, out.stderr));
        }
    }
    outs
}

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

    /// The variables of instance `rank` of a 16-instance job `job`
    /// (explicit identity; the job's coordinator on node 1), plus `extra`.
    fn explicit_env(
        &self,
        job: &Job,
        rank: u32,
        extra: &[(&'static str, String)],
    ) -> Vec<(&'static str, String)> {
        let (node, local) = (rank / PER_NODE, rank % PER_NODE);
        let mut env = vec![
            ("CELLNET_RANK", rank.to_string()),
            ("CELLNET_SIZE", (NODES * PER_NODE).to_string()),
            ("CELLNET_NODES", NODES.to_string()),
            ("CELLNET_NODE", self.name(node + 1)),
            ("CELLNET_NODE_INDEX", node.to_string()),
            ("CELLNET_LOCAL_RANK", local.to_string()),
            ("CELLNET_LOCAL_SIZE", PER_NODE.to_string()),
            ("CELLNET_DISCOVERY_PORT", DISCOVERY_PORT.to_string()),
            (
                "CELLNET_COORDINATOR",
                format!("{}:{}", self.addr(1), job.coordinator_port),
            ),
            ("CELLNET_BIND_IP", self.addr(node + 1)),
            ("CELLNET_JOB_KEY", job.key.clone()),
            ("CELLNET_JOIN_TIMEOUT", "60s".to_string()),
        ];
        env.extend(extra.iter().cloned());
        // Debugging a failure: CELLNET_TEST_LOG=cellnet=debug.
        if let Ok(log) = std::env::var("CELLNET_TEST_LOG") {
            env.push(("CELLNET_LOG", log));
        }
        env
    }

    /// Instance `rank` of `job` running `cellnet args…` in its node.
    fn spawn_rank(
        &self,
        job: &Job,
        rank: u32,
        args: &[&str],
        extra: &[(&'static str, String)],
    ) -> Child {
        self.spawn(
            rank / PER_NODE + 1,
            args,
            &self.explicit_env(job, rank, extra),
        )
    }

    /// 16 plain processes of `job`, 4 per node.
    fn spawn_explicit(
        &self,
        job: &Job,
        args: &[&str],
        extra: &[(&'static str, String)],
    ) -> Vec<Child> {
        (0..NODES * PER_NODE)
            .map(|rank| self.spawn_rank(job, rank, args, extra))
            .collect()
    }

    /// 16 plain processes, 4 per node, explicit identity; coordinator on
    /// node 1 (cellnet node index 0). Waits for all of them.
    fn launch_explicit(&self, args: &[&str], extra: &[(&'static str, String)]) -> Vec<Output> {
        let children = self.spawn_explicit(&Job::new(0), args, extra);
        wait_all(args[0], children)
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
        .filter(|l| {
            l.starts_with("cellnet probe: rank")
                && l.contains(" leader ")
                && !l.contains("after hold")
        })
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

/// Run `f` on a thread that entered node namespace `name` (setns affects
/// only the calling thread): sockets it opens live in that node.
fn in_node<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(format!("/run/netns/{name}"))
                .unwrap_or_else(|e| panic!("open /run/netns/{name}: {e}"));
            // SAFETY: a valid namespace fd; CLONE_NEWNET only moves this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {name}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .expect("thread inside the node")
    })
}

/// The number after `key=` in a probe line.
fn counter(line: &str, key: &str) -> u64 {
    field(line, &format!("{key}="))
        .parse()
        .unwrap_or_else(|_| panic!("{key}= in {line}"))
}

#[test]
fn a_killed_instance_restarted_from_its_checkpoint_completes_life_on_four_nodes() {
    let cluster = Cluster::up("r");
    let job = Job::new(0);
    let run = LifeRestart::new("cluster", 128, 128, 60, NODES * PER_NODE);
    let args = run.args(false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let children = cluster.spawn_explicit(&job, &args, &[]);
    // Rank 6: node 2, local rank 2 — neither a leader nor the coordinator.
    // Its 8 neighbours are on nodes 1, 2 and 3.
    let outs = run.kill_and_resume(
        children,
        6,
        15,
        |args| cluster.spawn_rank(&job, 6, args, &[]),
        Duration::from_secs(150),
    );
    run.check(&outs, 6, 15);
}

#[test]
fn a_killed_node_leader_in_the_cluster_is_replaced_and_its_node_stays_reachable() {
    let cluster = Cluster::up("l");
    let job = Job::new(0);
    let mut all: Vec<Instance> = cluster
        .spawn_explicit(&job, &["probe", "--hold", "8s"], &fast_liveness())
        .into_iter()
        .map(Instance::new)
        .collect();
    for i in &all {
        i.wait_for_line("cellnet probe: rank", Duration::from_secs(60));
    }
    // Rank 4 leads node 2 (cellnet node index 1); rank 5 is next.
    let killed = Instant::now();
    all[4].kill();
    for mate in &all[5..8] {
        mate.wait_for_line(
            "LeaderChanged { node: 1, leader: 5 }",
            Duration::from_secs(10),
        );
    }
    let took = killed.elapsed();
    let outs: Vec<_> = all
        .into_iter()
        .enumerate()
        .filter(|(r, _)| *r != 4)
        .map(|(r, i)| (r, i.finish(Duration::from_secs(60))))
        .collect();
    for (rank, (code, lines)) in &outs {
        assert_eq!(*code, Some(0), "rank {rank}: {lines:#?}");
        let last = lines
            .iter()
            .find(|l| l.contains("after hold"))
            .unwrap_or_else(|| panic!("rank {rank}: no final line: {lines:#?}"));
        // The barrier and all_reduce pass through every node's leader:
        // node 2's instances are reached through their new leader.
        assert!(last.contains("survivors 15"), "rank {rank}: {last}");
        let node_leader = if (4..8).contains(rank) {
            5
        } else {
            rank / 4 * 4
        };
        assert_eq!(field(last, "leader "), node_leader.to_string(), "{last}");
        if [0, 5, 8, 12].contains(rank) {
            assert!(
                last.contains("node-leaders [0, 5, 8, 12]"),
                "rank {rank}: {last}"
            );
        }
    }
    println!("node 2's leader replaced {took:?} after SIGKILL; 15 survivors passed a barrier and an all_reduce");
}

#[test]
fn two_jobs_on_the_same_nodes_and_discovery_port_each_see_only_their_own() {
    let cluster = Cluster::up("j");
    let jobs = [Job::new(0), Job::new(1)];
    let probe = ["probe", "--exchange", "3"];
    let running: Vec<_> = jobs
        .iter()
        .map(|j| cluster.spawn_explicit(j, &probe, &[]))
        .collect();
    let mut foreign = 0;
    for (n, children) in running.into_iter().enumerate() {
        let outs = wait_all(&format!("probe-job{n}"), children);
        assert_all_ok(&format!("job {n} probe"), &outs);
        let mut all = String::new();
        for (rank, out) in outs.iter().enumerate() {
            assert!(
                out.stdout.contains(
                    "exchange ok: sent 45 cells to 15 peers, 45 acked, received 45 cells"
                ),
                "job {n} rank {rank}: {}",
                out.stdout
            );
            all.push_str(&out.stdout);
        }
        // Exactly its own 4 instances per node, its own leaders.
        let lines = probe_lines(&all);
        check_probe(&cluster, &lines);
        foreign += lines
            .iter()
            .map(|(_, l)| counter(l, "foreign-job"))
            .sum::<u64>();
    }
    assert!(
        foreign > 0,
        "neither job heard the other: not a shared port"
    );

    let running: Vec<_> = jobs
        .iter()
        .map(|j| cluster.spawn_explicit(j, &LIFE, &[]))
        .collect();
    for (n, children) in running.into_iter().enumerate() {
        let outs = wait_all(&format!("life-job{n}"), children);
        assert_all_ok(&format!("job {n} life"), &outs);
        assert!(
            outs[0].stdout.contains("verified"),
            "job {n}: {}",
            outs[0].stdout
        );
    }
}

#[test]
fn forged_and_foreign_datagrams_inside_the_nodes_are_dropped_counted_and_discovery_completes() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let cluster = Cluster::up("f");
    let job = Job::new(0);
    let secret = "cluster-test-secret";
    let all: Vec<Instance> = cluster
        .spawn_explicit(
            &job,
            &["probe", "--hold", "2s"],
            &[("CELLNET_SECRET", secret.to_string())],
        )
        .into_iter()
        .map(Instance::new)
        .collect();
    let key = cellnet::proto::JobKey(job.key.parse().expect("numeric job key"));
    let junk = junk_datagrams(key, secret.as_bytes());
    let coordinator = std::net::SocketAddrV4::new(
        cluster.addr(1).parse().expect("node 1 address"),
        job.coordinator_port,
    );
    let discovery =
        std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(127, 255, 255, 255), DISCOVERY_PORT);
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        // From inside every node, while discovery runs: junk to the node's
        // discovery port (broadcast) and to the coordinator across the bridge.
        let senders: Vec<_> = (1..=NODES)
            .map(|k| {
                let (name, junk, stop) = (cluster.name(k), &junk, &stop);
                s.spawn(move || {
                    in_node(&name, || {
                        let any = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
                        let udp = cellnet::net::udp::UdpEndpoint::bind(any).expect("udp socket");
                        // Until everybody is up, and two rounds after.
                        let (mut rounds, mut after) = (0u32, 0);
                        while after < 2 {
                            if stop.load(Relaxed) {
                                after += 1;
                            }
                            for (_, bytes) in junk {
                                udp.send_to(bytes, discovery).expect("send to discovery");
                                std::thread::sleep(Duration::from_millis(5));
                                udp.send_to(bytes, coordinator)
                                    .expect("send to coordinator");
                            }
                            rounds += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        rounds
                    })
                })
            })
            .collect();
        for i in &all {
            i.wait_for_line("cellnet probe: rank", Duration::from_secs(60));
        }
        stop.store(true, Relaxed);
        senders
            .into_iter()
            .map(|h| h.join().expect("sender"))
            .collect::<Vec<_>>()
    });
    let mut text = String::new();
    let mut finals = Vec::new();
    for (rank, i) in all.into_iter().enumerate() {
        let (code, lines) = i.finish(Duration::from_secs(60));
        assert_eq!(code, Some(0), "rank {rank}: {lines:#?}");
        let last = lines
            .iter()
            .find(|l| l.contains("after hold"))
            .unwrap_or_else(|| panic!("rank {rank}: no final line: {lines:#?}"));
        assert!(last.contains("survivors 16"), "{last}");
        // Every instance heard at least one whole round of its node's
        // broadcasts (junk, oversized, truncated, wrong tag, another job's
        // beacon and registration); none of it made it a member of anything.
        for kind in ["malformed", "bad-tag", "foreign-job"] {
            let per_round = junk.iter().filter(|(k, _)| *k == kind).count() as u64;
            assert!(counter(last, kind) >= per_round, "{kind}: {last}");
        }
        if rank == 0 {
            // The coordinator's port got the same again across the bridge.
            assert!(counter(last, "foreign-job") >= 2 + NODES as u64, "{last}");
        }
        finals.push(last.clone());
        text.push_str(&lines.join("\n"));
        text.push('\n');
    }
    check_probe(&cluster, &probe_lines(&text));
    println!(
        "junk rounds per node: {sent:?}; discovery complete; {}",
        finals.join("\n")
    );
}
