//! `discovery`: time from start to all-ready for 2…64 instances on this
//! host, each a process of this binary with explicit `CELLNET_*` identity
//! (hidden subcommand `bench discovery-worker`), each reporting its own
//! timings as one `@ready` line.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{plot, BenchError, BenchOpts, Spread};
use crate::config::Config;
use crate::launch;
use crate::runtime::Communicator;

type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Instance counts measured (the quick run stops at 16).
pub const INSTANCES: [u32; 6] = [2, 4, 8, 16, 32, 64];
const QUICK_INSTANCES: [u32; 4] = [2, 4, 8, 16];

/// What one instance reports (µs since the Unix epoch).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerTimes {
    /// The reporting instance's rank.
    pub rank: u32,
    /// Just before `Communicator::start` (which binds the sockets first).
    pub start_call_us: u64,
    /// `start` returned: globally ready.
    pub ready_us: u64,
}

/// Timings at one instance count, over the repetitions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiscoveryPoint {
    /// Instances started on this host.
    pub instances: u32,
    /// First process spawned → last instance globally ready (ms).
    pub spawn_to_all_ready_ms: Spread,
    /// Last instance entered `start` (sockets bound right there) → last
    /// instance globally ready (ms): the discovery + join time proper.
    pub bound_to_all_ready_ms: Spread,
    /// Per instance `start` → ready, median over instances (ms).
    pub instance_start_to_ready_ms: Spread,
}

/// What `bench discovery` writes to `discovery.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiscoveryReport {
    /// Always `discovery`.
    pub bench: String,
    /// Whether this was a `--quick` run (tiny counts, not a measurement).
    pub quick: bool,
    /// Repetitions per point.
    pub reps: u32,
    /// Conditions worth knowing when reading the numbers.
    pub notes: Vec<String>,
    /// One point per instance count, ascending.
    pub points: Vec<DiscoveryPoint>,
    /// Simulated nodes (`cellnet::sim`), when that module exists.
    #[serde(default)]
    pub sim: Vec<serde_json::Value>,
}

/// Hidden subcommand: start, report, wait for the driver to close stdin.
pub fn worker(config: Config) -> Result<()> {
    let (info, _mpi) =
        launch::detect(config.launch).map_err(|e| BenchError::Usage(e.to_string()))?;
    let rank = info.rank;
    let start_call_us = super::epoch_us();
    let comm = Communicator::builder()
        .config(config)
        .launch_info(info)
        .start()
        .map_err(BenchError::failed)?;
    let times = WorkerTimes {
        rank,
        start_call_us,
        ready_us: super::epoch_us(),
    };
    println!(
        "@ready {}",
        serde_json::to_string(&times).map_err(BenchError::failed)?
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // Stay up until every instance is ready (the driver closes stdin).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    comm.shutdown().map_err(BenchError::failed)?;
    Ok(())
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// One run of `n` instances: their timings and the spawn time.
fn run_once(n: u32, base: &Config) -> Result<(u64, Vec<WorkerTimes>)> {
    let port = super::free_udp_port()?.to_string();
    let coord = format!("127.0.0.1:{}", super::free_udp_port()?);
    let key = (super::epoch_us() ^ ((std::process::id() as u64) << 40)).to_string();
    let exe = super::self_exe();
    let spawned_us = super::epoch_us();
    let mut children = Vec::new();
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "discovery-worker"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for m in launch::MPI_MARKERS {
            cmd.env_remove(m);
        }
        let env = [
            ("CELLNET_LAUNCH", "explicit".to_string()),
            ("CELLNET_RANK", rank.to_string()),
            ("CELLNET_SIZE", n.to_string()),
            ("CELLNET_NODES", "1".into()),
            ("CELLNET_NODE", "bench".into()),
            ("CELLNET_NODE_INDEX", "0".into()),
            ("CELLNET_LOCAL_RANK", rank.to_string()),
            ("CELLNET_LOCAL_SIZE", n.to_string()),
            ("CELLNET_DISCOVERY_PORT", port.clone()),
            ("CELLNET_COORDINATOR", coord.clone()),
            ("CELLNET_BIND_IP", "127.0.0.1".into()),
            ("CELLNET_JOB_KEY", key.clone()),
            ("CELLNET_JOIN_TIMEOUT", "60s".into()),
            ("CELLNET_PLACEMENT", "none".into()),
            ("CELLNET_THREADS", "1".into()),
        ];
        cmd.envs(env);
        if let Some(dir) = &base.ipc_dir {
            cmd.env("CELLNET_IPC_DIR", dir);
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(&mut children);
                return Err(BenchError::Failed(format!("cannot spawn an instance: {e}")));
            }
        }
    }
    let mut times = Vec::new();
    for c in children.iter_mut() {
        let Some(out) = c.stdout.take() else { continue };
        let ready = BufReader::new(out)
            .lines()
            .map_while(|l| l.ok())
            .find_map(|l| {
                l.strip_prefix("@ready ")
                    .and_then(|j| serde_json::from_str::<WorkerTimes>(j).ok())
            });
        match ready {
            Some(t) => times.push(t),
            None => {
                kill_all(&mut children);
                return Err(BenchError::Failed(format!(
                    "discovery of {n} instances: an instance ended without becoming ready"
                )));
            }
        }
    }
    // Everybody is ready: let them shut down (stdin EOF), under a deadline.
    for c in children.iter_mut() {
        drop(c.stdin.take());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for c in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
    Ok((spawned_us, times))
}

/// Driver: every size, every repetition; table, JSON and plot.
pub fn drive(config: Config, opts: &BenchOpts) -> Result<DiscoveryReport> {
    let sizes: &[u32] = if opts.quick {
        &QUICK_INSTANCES
    } else {
        &INSTANCES
    };
    let bar = super::bar(sizes.len() as u64 * opts.reps as u64, "discovery");
    let mut points = Vec::new();
    for &n in sizes {
        let (mut spawn, mut bound, mut inst) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..opts.reps {
            bar.set_message(format!("{n} instances, rep {}", rep + 1));
            let (spawned, times) = run_once(n, &config)?;
            let ready = times.iter().map(|t| t.ready_us).max().unwrap_or(0);
            let last_call = times.iter().map(|t| t.start_call_us).max().unwrap_or(0);
            let mut each: Vec<u64> = times
                .iter()
                .map(|t| t.ready_us.saturating_sub(t.start_call_us))
                .collect();
            spawn.push(ready.saturating_sub(spawned) as f64 / 1e3);
            bound.push(ready.saturating_sub(last_call) as f64 / 1e3);
            inst.push(super::median_u64(&mut each) as f64 / 1e3);
            bar.inc(1);
        }
        points.push(DiscoveryPoint {
            instances: n,
            spawn_to_all_ready_ms: Spread::of(&spawn),
            bound_to_all_ready_ms: Spread::of(&bound),
            instance_start_to_ready_ms: Spread::of(&inst),
        });
    }
    bar.finish_and_clear();
    let sim = simulated(opts.reps)?;
    let report = DiscoveryReport {
        bench: "discovery".into(),
        quick: opts.quick,
        reps: opts.reps,
        notes: vec![
            "one host, one node: processes of this binary with explicit CELLNET_* identity, placement none, 1 handler thread".into(),
            "bound = the moment the last instance entered Communicator::start, which binds its ZeroMQ and UDP sockets first".into(),
            "simulated nodes: cellnet::sim runs the real protocol machines of every instance in one process, virtual time, no faults; times are virtual".into(),
        ],
        points,
        sim,
    };
    super::write_json(&opts.out, "discovery.json", &report)?;
    print(&report);
    plot::draw(
        &opts.out.join("discovery.png"),
        &plot::Axes {
            title: "Discovery on one host: time to all globally ready, median, bars min-max",
            x: "instances",
            y: "ms",
            log_x: true,
            log_y: false,
            x_bytes: false,
        },
        &[
            plot::Line {
                name: "first spawn -> all ready".into(),
                points: report
                    .points
                    .iter()
                    .map(|p| (p.instances as f64, p.spawn_to_all_ready_ms))
                    .collect(),
            },
            plot::Line {
                name: "last sockets bound -> all ready".into(),
                points: report
                    .points
                    .iter()
                    .map(|p| (p.instances as f64, p.bound_to_all_ready_ms))
                    .collect(),
            },
        ],
    )?;
    Ok(report)
}

/// Discovery and global join of 4 x 4 and 8 x 8 simulated nodes (virtual
/// time, message counts), one run per repetition with its own seed.
fn simulated(reps: u32) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for (nodes, per_node) in [(4u32, 4u32), (8, 8)] {
        let (mut local, mut global) = (Vec::new(), Vec::new());
        let mut last = None;
        for seed in 1..=u64::from(reps.max(1)) {
            let cfg = crate::sim::SimConfig {
                nodes,
                per_node,
                frames: 1,
                seed,
                ..crate::sim::SimConfig::default()
            };
            let r = crate::sim::run(&cfg).map_err(|e| BenchError::failed(e.to_string()))?;
            let ms = |d: Option<std::time::Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
            local.push(ms(r.stats.local_complete));
            global.push(ms(r.stats.global_ready));
            last = Some(r.stats.messages);
        }
        let m = last.unwrap_or_default();
        out.push(serde_json::json!({
            "nodes": nodes,
            "per_node": per_node,
            "local_complete_ms": Spread::of(&local),
            "global_ready_ms": Spread::of(&global),
            "messages": {
                "discovery_udp": m.discovery_udp,
                "discovery_zmq": m.discovery_zmq,
                "global": m.global(),
            },
        }));
    }
    Ok(out)
}

fn print(r: &DiscoveryReport) {
    println!(
        "\ndiscovery: one host, {} (ms; median [min–max])",
        super::reps_label(r.reps, r.quick)
    );
    println!(
        "{:>9} {:>28} {:>28} {:>16}",
        "instances", "spawn → all ready", "last bound → all ready", "per instance"
    );
    for p in &r.points {
        println!(
            "{:>9} {:>28} {:>28} {:>16.1}",
            p.instances,
            p.spawn_to_all_ready_ms.label(1),
            p.bound_to_all_ready_ms.label(1),
            p.instance_start_to_ready_ms.median
        );
    }
    for v in &r.sim {
        println!(
            "simulated {} x {}: global ready at {} ms virtual (median), messages {}",
            v["nodes"], v["per_node"], v["global_ready_ms"]["median"], v["messages"]
        );
    }
}
