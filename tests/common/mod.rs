//! Helpers for tests that run the real `cellnet` binary: free ports, a
//! unique job key per test, and child processes under a hard deadline.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cellnet");

/// A port nobody uses right now (bound to 0 and released).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind udp 0");
    s.local_addr().expect("local addr").port()
}

/// A job key no other concurrent test uses.
pub fn job_key() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!("{}", t ^ ((std::process::id() as u64) << 40))
}

/// What a finished child printed.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Fail the test, showing both streams, unless the process exited 0.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
    }
}

/// Wait for `child`, killing it (and failing the test) after `limit`.
pub fn wait(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => {
                let mut stdout = String::new();
                let mut stderr = String::new();
                if let Some(mut o) = child.stdout.take() {
                    o.read_to_string(&mut stdout).ok();
                }
                if let Some(mut e) = child.stderr.take() {
                    e.read_to_string(&mut stderr).ok();
                }
                return Output {
                    code: status.code(),
                    stdout,
                    stderr,
                };
            }
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {limit:?}: killed");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Run `cellnet args…` with `env`, under a deadline.
pub fn run(args: &[&str], env: &[(&str, String)], limit: Duration) -> Output {
    let child = spawn(args, env);
    wait(child, limit, &format!("cellnet {}", args.join(" ")))
}

pub fn spawn(args: &[&str], env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("CELLNET_PLACEMENT", "none");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn cellnet")
}

/// `mpirun` as root on loopback, under `timeout`.
pub fn mpirun(n: u32, args: &[&str], env: &[(&str, String)], limit: Duration) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=5")
        .arg(format!("{}", limit.as_secs()))
        .arg("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
            "-n",
        ])
        .arg(n.to_string())
        .args(["--mca", "btl", "self,vader,tcp"])
        .env("OMPI_MCA_btl_tcp_if_include", "lo")
        .env("OMPI_MCA_oob_tcp_if_include", "lo")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (k, v) in env {
        cmd.arg("-x").arg(format!("{k}={v}"));
    }
    cmd.arg(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .expect("spawn mpirun (is openmpi-bin installed?)");
    wait(child, limit + Duration::from_secs(10), "mpirun")
}

/// Identity of instance `rank` of `size`, all on one node.
pub fn one_node_info(rank: u32, size: u32, key: u64) -> cellnet::launch::LaunchInfo {
    cellnet::launch::LaunchInfo {
        rank,
        size,
        node_name: "n0".into(),
        node_index: 0,
        local_rank: rank,
        local_size: size,
        nodes: 1,
        job_key: cellnet::proto::JobKey(key),
        source: cellnet::launch::LaunchSource::Explicit,
        node_list: Vec::new(),
    }
}

/// A configuration for in-process instances of one test job: fresh ports,
/// no core binding (tests share one process), one handler thread.
pub fn test_config() -> cellnet::config::Config {
    cellnet::config::Config {
        placement: cellnet::place::PlacementPolicy::None,
        threads: 1,
        discovery_port: free_udp_port(),
        coordinator: Some(format!("127.0.0.1:{}", free_udp_port())),
        join_timeout: Duration::from_secs(30),
        ..cellnet::config::Config::default()
    }
}

/// Start `size` communicators of one job in this process (in parallel:
/// each start waits for the others).
pub fn start_local(
    size: u32,
    config: &cellnet::config::Config,
    handler: impl Fn(u32) -> Option<cellnet::runtime::Handler>,
) -> Vec<cellnet::runtime::Communicator> {
    let key = job_key().parse::<u64>().unwrap_or(7);
    let handles: Vec<_> = (0..size)
        .map(|r| {
            let mut b = cellnet::runtime::Communicator::builder()
                .config(config.clone())
                .launch_info(one_node_info(r, size, key));
            if let Some(h) = handler(r) {
                b = b.handler_arc(h);
            }
            std::thread::spawn(move || b.start())
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .expect("start thread")
                .expect("communicator starts")
        })
        .collect()
}

/// Shut every communicator down at once, as separate processes would (a
/// sequential shutdown makes each wait for the goodbyes of the next).
pub fn shutdown_all(
    comms: Vec<cellnet::runtime::Communicator>,
) -> Vec<cellnet::runtime::ShutdownReport> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || c.shutdown().expect("clean shutdown")))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("shutdown thread"))
            .collect()
    })
}

/// `(rank, node_index, local_rank, local_size)` of `nodes` nodes with
/// `per_node` instances each, ranks filling node 0 first.
pub fn even_layout(nodes: u32, per_node: u32) -> Vec<(u32, u32, u32, u32)> {
    (0..nodes * per_node)
        .map(|r| (r, r / per_node, r % per_node, per_node))
        .collect()
}

/// The `CELLNET_*` variables of one job, per `(rank, node_index,
/// local_rank, local_size)` of `layout`: explicit identity, all on loopback
/// with the given discovery port, a fresh coordinator port and job key;
/// `extra` variables are added. Keep them to start an instance again.
pub fn job_env(
    layout: &[(u32, u32, u32, u32)],
    nodes: u32,
    port: &str,
    extra: &[(&'static str, String)],
) -> Vec<Vec<(&'static str, String)>> {
    let coord = format!("127.0.0.1:{}", free_udp_port());
    let key = job_key();
    let size = layout.len().to_string();
    layout
        .iter()
        .map(|&(rank, node, local_rank, local_size)| {
            let mut env = vec![
                ("CELLNET_RANK", rank.to_string()),
                ("CELLNET_SIZE", size.clone()),
                ("CELLNET_NODES", nodes.to_string()),
                ("CELLNET_NODE", format!("node{node}")),
                ("CELLNET_NODE_INDEX", node.to_string()),
                ("CELLNET_LOCAL_RANK", local_rank.to_string()),
                ("CELLNET_LOCAL_SIZE", local_size.to_string()),
                ("CELLNET_DISCOVERY_PORT", port.to_string()),
                ("CELLNET_COORDINATOR", coord.clone()),
                ("CELLNET_BIND_IP", "127.0.0.1".to_string()),
                ("CELLNET_JOB_KEY", key.clone()),
                ("CELLNET_JOIN_TIMEOUT", "30s".to_string()),
            ];
            env.extend(extra.iter().cloned());
            env
        })
        .collect()
}

/// One `cellnet args…` process per entry of `layout` (see [`job_env`]).
/// Returns the running children.
pub fn spawn_job(
    layout: &[(u32, u32, u32, u32)],
    nodes: u32,
    args: &[&str],
    port: &str,
    extra: &[(&'static str, String)],
) -> Vec<std::process::Child> {
    job_env(layout, nodes, port, extra)
        .iter()
        .map(|env| spawn(args, env))
        .collect()
}

/// A `cellnet life` run with checkpoints in which one instance is killed
/// (SIGKILL) in the middle and started again with `--resume`: the same
/// logic for one host and for the namespace cluster.
pub struct LifeRestart {
    /// Checkpoint folder (removed on drop).
    pub dir: std::path::PathBuf,
    pub rows: usize,
    pub cols: usize,
    pub frames: u64,
    pub size: u32,
    /// Sleep after each frame, so that the kill lands mid-run.
    pub frame_delay: &'static str,
    /// How long the victim stays dead before it is started again.
    pub down_for: Duration,
}

impl LifeRestart {
    pub fn new(tag: &str, rows: usize, cols: usize, frames: u64, size: u32) -> Self {
        let dir =
            std::env::temp_dir().join(format!("cellnet-restart-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self {
            dir,
            rows,
            cols,
            frames,
            size,
            frame_delay: "40ms",
            down_for: Duration::ZERO,
        }
    }

    /// The life command line, without and with `--resume`.
    pub fn args(&self, resume: bool) -> Vec<String> {
        let mut a: Vec<String> = [
            "life",
            "--quiet",
            "--rows",
            &self.rows.to_string(),
            "--cols",
            &self.cols.to_string(),
            "--frames",
            &self.frames.to_string(),
            "--frame-delay",
            self.frame_delay,
            "--frame-timeout",
            "20s",
            "--checkpoint",
            &self.dir.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if resume {
            a.push("--resume".into());
        }
        a
    }

    /// The next frame in `rank`'s checkpoint, if it has written one.
    pub fn checkpoint_frame(&self, rank: u32) -> Option<u64> {
        use cellnet::app::checkpoint::{Checkpoint, CheckpointId};
        let part = cellnet::partition::Partition2d::new([self.rows, self.cols], self.size).ok()?;
        let id = CheckpointId {
            rank,
            size: self.size,
            rows: self.rows as u64,
            cols: self.cols as u64,
            seed: 1,
        };
        // A missing or (never: the write is atomic) unreadable file: none yet.
        Checkpoint::load(&self.dir, id, part.block(rank).len, self.frames)
            .ok()
            .flatten()
            .map(|c| c.frame)
    }

    /// Kill `children[victim]` once its checkpoint is past frame `after`,
    /// start it again with `respawn(args with --resume)`, and wait for all.
    pub fn kill_and_resume(
        &self,
        mut children: Vec<Child>,
        victim: u32,
        after: u64,
        respawn: impl FnOnce(&[&str]) -> Child,
        limit: Duration,
    ) -> Vec<Output> {
        let deadline = Instant::now() + limit;
        while self.checkpoint_frame(victim).is_none_or(|f| f <= after) {
            if Instant::now() > deadline || self.checkpoint_frame(victim) == Some(self.frames) {
                for c in &mut children {
                    let _ = c.kill();
                }
                panic!(
                    "rank {victim}'s checkpoint never passed frame {after} in time ({:?})",
                    self.checkpoint_frame(victim)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let c = &mut children[victim as usize];
        c.kill().expect("SIGKILL the victim");
        let _ = c.wait();
        std::thread::sleep(self.down_for);
        let killed_at = self.checkpoint_frame(victim);
        assert!(
            killed_at.is_some_and(|f| f < self.frames),
            "killed too late to test a restart: checkpoint {killed_at:?}"
        );
        let args = self.args(true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        children[victim as usize] = respawn(&args);
        children
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let left = deadline.saturating_duration_since(Instant::now());
                wait(
                    c,
                    left.max(Duration::from_secs(5)),
                    &format!("instance {i}"),
                )
            })
            .collect()
    }

    /// Every instance exits 0, rank 0 verifies the grid, the restarted
    /// instance resumed from a checkpoint past `after`, and each of its
    /// neighbours saw it restart.
    pub fn check(&self, outs: &[Output], victim: u32, after: u64) {
        for (rank, out) in outs.iter().enumerate() {
            assert_eq!(
                out.code,
                Some(0),
                "rank {rank} failed: {}\n{}",
                out.stdout,
                out.stderr
            );
        }
        assert!(outs[0].stdout.contains("verified"), "{}", outs[0].stdout);
        let resumed = &outs[victim as usize].stdout;
        let at: u64 = resumed
            .lines()
            .find_map(|l| l.split(" resumes at frame ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("rank {victim} did not resume: {resumed}"));
        assert!(at > after && at < self.frames, "resumed at {at}");
        let part = cellnet::partition::Partition2d::new([self.rows, self.cols], self.size)
            .expect("partition");
        let line = format!("sees rank {victim} restarted");
        for n in part.neighbours(victim) {
            assert!(
                outs[n.rank as usize].stdout.contains(&line),
                "neighbour {} did not see rank {victim} restart:\n{}",
                n.rank,
                outs[n.rank as usize].stdout
            );
        }
    }
}

impl Drop for LifeRestart {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Failure detection fast enough for a test: dead after 1 s of silence.
pub fn fast_liveness() -> Vec<(&'static str, String)> {
    vec![
        ("CELLNET_HEARTBEAT", "100ms".to_string()),
        ("CELLNET_SUSPECT_AFTER", "400ms".to_string()),
        ("CELLNET_DEAD_AFTER", "1s".to_string()),
        ("CELLNET_LINGER", "300ms".to_string()),
    ]
}

/// A running instance whose stdout lines are collected as they come, so a
/// test can act when one appears (kill a leader once everybody is up).
pub struct Instance {
    pub child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Instance {
    pub fn new(mut child: Child) -> Self {
        use std::io::BufRead;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout piped");
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Instance {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Wait until a line contains `needle`; fail after `limit`.
    pub fn wait_for_line(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
        {
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {limit:?}: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL it (by its PID) and reap it.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// Wait for the exit (killing it after `limit`); exit code and all lines.
    pub fn finish(mut self, limit: Duration) -> (Option<i32>, Vec<String>) {
        let out = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("spawn true"),
        );
        let code = wait(out, limit, "instance").code;
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let lines = self.lines();
        (code, lines)
    }
}

/// Datagrams discovery and the coordinator must drop and count, by kind,
/// against a job with `key` and `secret`: junk, a truncated beacon, a
/// beacon with a wrong HMAC tag, another job's beacon, an oversized
/// datagram, and a registration from another job.
pub fn junk_datagrams(key: cellnet::proto::JobKey, secret: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    use cellnet::proto::wire::{self, Datagram, JobSecret, Ping, Register};
    use cellnet::proto::{Endpoints, Incarnation, JobKey, PeerInfo};
    let info = PeerInfo {
        rank: 1,
        node_index: 0,
        incarnation: Incarnation(1),
        endpoints: Endpoints {
            ipc: None,
            tcp: "tcp://127.0.0.1:1".into(),
        },
    };
    let ping = Datagram::Ping(Ping {
        info: info.clone(),
        local_size: 2,
    });
    let register = Datagram::Register(Register {
        node_index: 0,
        node_name: "intruder".into(),
        leader: info.clone(),
        members: vec![info],
        lost: Vec::new(),
        epoch: 0,
    });
    let secret = JobSecret::new(secret.to_vec());
    let other = JobKey(key.0 ^ 0x5a5a);
    let good = wire::encode_datagram(key, &secret, &ping);
    vec![
        ("malformed", b"hello".to_vec()),
        // Cut into its tag: the tag check refuses it.
        ("bad-tag", good[..good.len() - 3].to_vec()),
        (
            "bad-tag",
            wire::encode_datagram(key, &JobSecret::new(b"guess".to_vec()), &ping),
        ),
        ("foreign-job", wire::encode_datagram(other, &secret, &ping)),
        ("malformed", vec![0xff; wire::MAX_DATAGRAM + 100]),
        (
            "foreign-job",
            wire::encode_datagram(other, &secret, &register),
        ),
    ]
}
