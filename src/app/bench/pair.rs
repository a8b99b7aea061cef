//! `latency` and `throughput`: two ranks of one `mpirun -n 2` job measure
//! MPI, raw ZeroMQ, raw TCP and cellnet taking turns, in the same processes
//! with the same core binding.
//!
//! Latency is a round trip shaped like SEND→ACK for every transport: the
//! payload one way, an 8-byte answer back. Throughput is sustained one-way
//! streaming: cellnet with ACKs and a credit window, ZeroMQ PUSH/PULL, and
//! std TCP writes of the same bytes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use serde::{Deserialize, Serialize};

use super::{plot, BenchError, BenchName, BenchOpts, Progress, Spread};
use crate::config::Config;
use crate::launch::{self, LaunchInfo};
use crate::place::{self, PlacementPolicy};
use crate::proto::JobKey;
use crate::runtime::Communicator;

type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Payload sizes of the latency series (bytes).
pub const LATENCY_SIZES: [usize; 7] = [8, 64, 512, 4096, 32768, 262_144, 1 << 20];
/// Payload sizes of the throughput series (bytes).
pub const THROUGHPUT_SIZES: [usize; 4] = [64, 1024, 65536, 1 << 20];
/// Credit windows of the cellnet throughput series (cells per peer; the
/// last is the default, which the summary compares).
pub const WINDOWS: [u32; 3] = [16, 256, 4096];

/// The name of a cellnet throughput series: transport, window, and whether
/// cells go with one ticket per frame (`send_many`) or one each (`send`).
pub fn series_name(transport: &str, window: u32, many: bool) -> String {
    let api = if many { " send_many" } else { "" };
    format!("cellnet {transport} w{window}{api}")
}
/// Bytes of cells one frame may hold on the receiver (bounds its memory).
const FRAME_BYTES: usize = 16 << 20;

/// One size of one latency series.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyPoint {
    /// Payload bytes one way.
    pub size: usize,
    /// Median round trip of each repetition: their median, min, max (µs).
    pub rtt_us: Spread,
    /// Over every round trip of every repetition (hdrhistogram).
    pub p50_us: f64,
    /// 99th percentile round trip (µs).
    pub p99_us: f64,
    /// 99.9th percentile round trip (µs).
    pub p999_us: f64,
    /// Round trips measured, over every repetition.
    pub samples: u64,
}

/// One size of one throughput series.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThroughputPoint {
    /// Payload bytes per message.
    pub size: usize,
    /// Messages per repetition.
    pub count: u64,
    /// Messages per second, over the repetitions.
    pub msgs_per_s: Spread,
    /// Payload MiB per second, over the repetitions.
    pub mib_per_s: Spread,
}

/// One transport's points over every size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Series<P> {
    /// Label in tables and plot legends.
    pub name: String,
    /// cellnet, zeromq, mpi or tcp.
    pub kind: String,
    /// ipc, tcp (loopback) or mpi (whatever OpenMPI picked: shared memory).
    pub transport: String,
    /// Credit window (cellnet throughput only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
    /// One point per size, ascending.
    pub points: Vec<P>,
}

/// What `bench latency` / `bench throughput` write to `<bench>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairReport<P> {
    /// `latency` or `throughput`.
    pub bench: String,
    /// Whether this was a `--quick` run (tiny counts, not a measurement).
    pub quick: bool,
    /// Repetitions per point.
    pub reps: u32,
    /// Core binding of rank 0 and rank 1.
    pub placement: Vec<String>,
    /// Conditions worth knowing when reading the numbers.
    pub notes: Vec<String>,
    /// Every transport measured.
    pub series: Vec<Series<P>>,
}

/// What `bench latency` writes.
pub type LatencyReport = PairReport<LatencyPoint>;
/// What `bench throughput` writes.
pub type ThroughputReport = PairReport<ThroughputPoint>;

/// Driver side: run the benchmark under `mpirun -n 2` and forward its output.
pub fn drive(name: BenchName, opts: &BenchOpts) -> Result<()> {
    let mut args = vec![
        "bench".to_string(),
        super::name_str(name).to_string(),
        "--out".into(),
        opts.out.display().to_string(),
        "--reps".into(),
        opts.reps.to_string(),
    ];
    if opts.quick {
        args.push("--quick".into());
    }
    let limit = Duration::from_secs(if opts.quick { 240 } else { 1800 });
    let bar = super::bar(1, super::name_str(name));
    let res = super::stream(
        super::mpirun(2, &args, limit),
        &bar,
        &format!("mpirun -n 2 cellnet bench {}", super::name_str(name)),
        |l| bar.suspend(|| println!("{l}")),
    );
    bar.finish_and_clear();
    res
}

/// The two ranks, their MPI world and the settings of the run.
struct Pair<'a> {
    world: SimpleCommunicator,
    rank: i32,
    info: LaunchInfo,
    config: Config,
    opts: &'a BenchOpts,
    phase: u64,
}

impl Pair<'_> {
    fn peer(&self) -> mpi::topology::Process<'_> {
        self.world.process_at_rank(1 - self.rank)
    }

    fn bcast_u64(&self, root: i32, v: u64) -> u64 {
        let mut v = v;
        self.world.process_at_rank(root).broadcast_into(&mut v);
        v
    }

    fn bcast_string(&self, root: i32, s: &str) -> String {
        let len = self.bcast_u64(root, s.len() as u64) as usize;
        let mut buf = if self.rank == root {
            s.as_bytes().to_vec()
        } else {
            vec![0u8; len]
        };
        self.world
            .process_at_rank(root)
            .broadcast_into(&mut buf[..]);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// A fresh communicator of this pair: its own ports and job key, ipc or
    /// tcp only, credit window `window`.
    fn communicator(&mut self, ipc: bool, window: u32) -> Result<Communicator> {
        self.phase += 1;
        let (a, b) = if self.rank == 0 {
            (super::free_udp_port()?, super::free_udp_port()?)
        } else {
            (0, 0)
        };
        let a = self.bcast_u64(0, a as u64) as u16;
        let b = self.bcast_u64(0, b as u64) as u16;
        let mut c = self.config.clone();
        c.discovery_port = a;
        c.coordinator = Some(format!("127.0.0.1:{b}"));
        c.bind_ip = Some(std::net::Ipv4Addr::LOCALHOST.into());
        if !ipc {
            c.ipc_dir = None;
        }
        c.reliable.window = window;
        let mut info = self.info.clone();
        info.job_key = JobKey(info.job_key.0 ^ self.phase.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let comm = Communicator::builder()
            .config(c)
            .launch_info(info)
            .start()
            .map_err(|e| BenchError::Failed(format!("cellnet start: {e}")))?;
        if self.rank == 1 {
            comm.expect_from([0])
                .map_err(|e| BenchError::Failed(e.to_string()))?;
        }
        self.world.barrier();
        Ok(comm)
    }
}

fn lat_count(size: usize, quick: bool) -> usize {
    match (quick, size) {
        (true, s) if s <= 4096 => 40,
        (true, _) => 10,
        (false, s) if s <= 4096 => 2000,
        (false, s) if s <= 32768 => 1000,
        (false, s) if s <= 262_144 => 300,
        (false, _) => 150,
    }
}

/// Messages per throughput measurement: 128 MiB of payload, between 100
/// and 200,000 messages (at 64 B that is ~0.1-0.2 s: long enough to be
/// sustained, where 20,000 measured little more than the start).
fn thr_count(size: usize, quick: bool) -> usize {
    let n = ((128usize << 20) / size).clamp(100, 200_000);
    if quick {
        (n / 50).max(10)
    } else {
        n
    }
}

fn warmup(n: usize) -> usize {
    (n / 20).max(3)
}

/// Cells per frame for `total` cells of `size` bytes.
fn per_frame(size: usize, total: usize) -> usize {
    (FRAME_BYTES / size.max(1)).clamp(1, total.max(1))
}

/// Under mpirun: run the benchmark on these two ranks.
pub fn run_in_place(name: BenchName, config: Config, opts: &BenchOpts) -> Result<()> {
    let (info, mpi) =
        launch::detect(config.launch).map_err(|e| BenchError::Usage(e.to_string()))?;
    let Some(mpi) = mpi else {
        return Err(BenchError::Usage(
            "latency and throughput need MPI identity (mpirun -n 2)".into(),
        ));
    };
    if info.size != 2 {
        return Err(BenchError::Usage(format!(
            "latency and throughput run on exactly 2 ranks (mpirun -n 2), not {}",
            info.size
        )));
    }
    // Bind now, so that the baselines run with the binding cellnet uses.
    let binding = match config.placement {
        PlacementPolicy::None => place::current_binding(PlacementPolicy::None),
        p => place::apply(p, info.local_rank, info.local_size),
    }
    .map_err(|e| BenchError::Failed(e.to_string()))?;
    // Every series runs with the allocator settings cellnet runs with.
    if config.malloc_tune {
        crate::runtime::tune_malloc();
    }
    let _ipc_files = IpcFiles;
    let mut pair = Pair {
        world: mpi.world(),
        rank: info.rank as i32,
        info,
        config,
        opts,
        phase: 0,
    };
    let mine = format!("rank {}: {}", pair.rank, binding);
    let theirs = pair.bcast_string(1, &mine);
    let placement = vec![pair.bcast_string(0, &mine), theirs];
    if name == BenchName::Throughput {
        let series = throughput(&mut pair);
        pair.world.barrier();
        let report = report("throughput", opts, placement, series?, throughput_notes());
        if pair.rank == 0 {
            super::write_json(&opts.out, "throughput.json", &report)?;
            print_throughput(&report);
            plot_throughput(opts, &report)?;
        }
    } else {
        let series = latency(&mut pair);
        pair.world.barrier();
        let report = report("latency", opts, placement, series?, latency_notes());
        if pair.rank == 0 {
            super::write_json(&opts.out, "latency.json", &report)?;
            print_latency(&report);
            plot_latency(opts, &report)?;
        }
    }
    drop(pair);
    drop(mpi);
    Ok(())
}

/// Removes the baselines' `ipc://` files of this process when dropped
/// (ZeroMQ leaves one behind when a socket outlives its series).
struct IpcFiles;

impl Drop for IpcFiles {
    fn drop(&mut self) {
        let prefix = format!("cellnet-bench-{}-", std::process::id());
        let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn report<P>(
    bench: &str,
    opts: &BenchOpts,
    placement: Vec<String>,
    series: Vec<Series<P>>,
    notes: Vec<String>,
) -> PairReport<P> {
    PairReport {
        bench: bench.into(),
        quick: opts.quick,
        reps: opts.reps,
        placement,
        notes,
        series,
    }
}

fn latency_notes() -> Vec<String> {
    vec![
        "round trip = payload one way, 8-byte answer back (the shape of SEND->ACK), for every transport".into(),
        "tcp = loopback on this host (CELLNET_IPC_DIR=none for cellnet); not across real nodes".into(),
        "every series runs in the same processes with the same malloc settings (CELLNET_MALLOC_TUNE)".into(),
        TURNS_NOTE.into(),
        "ZeroMQ and TCP block in poll/recv (wake-up cost included); cellnet polls for CELLNET_SPIN (default 50us) before it blocks; MPI busy-polls".into(),
        "cellnet runs without a cell handler: the I/O thread accepts each cell (no trip through the rayon pool)".into(),
        "rtt_us = median/min/max over repetitions of each repetition's median; p50/p99/p99.9 over all samples".into(),
    ]
}

fn throughput_notes() -> Vec<String> {
    vec![
        "cellnet: every cell acknowledged (sender waits for all tickets); window = credits per peer".into(),
        "ZeroMQ PUSH/PULL and raw TCP: one-way, receiver answers once at the end".into(),
        "tcp = loopback on this host".into(),
        "every series runs in the same processes with the same malloc settings (CELLNET_MALLOC_TUNE)".into(),
        TURNS_NOTE.into(),
    ]
}

/// How the series share the run (see [`take_turns`]).
const TURNS_NOTE: &str = "series take turns: each repetition measures every series at one size, then the next size, so a drift of the machine's speed falls on all series alike";

fn failed(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

/// A series' labels: name, kind, transport, credit window.
struct Meta {
    name: String,
    kind: &'static str,
    transport: &'static str,
    window: Option<u32>,
}

impl Meta {
    fn new(name: impl Into<String>, kind: &'static str, transport: &'static str) -> Self {
        Self {
            name: name.into(),
            kind,
            transport,
            window: None,
        }
    }

    fn series<P>(self, points: Vec<P>) -> Series<P> {
        Series {
            name: self.name,
            kind: self.kind.into(),
            transport: self.transport.into(),
            window: self.window,
            points,
        }
    }
}

/// One measurement of one size of a series, on both ranks (rank 0's result
/// counts).
type Measure<'a, T> = Box<dyn FnMut(usize) -> Result<T> + 'a>;

/// Measure every series once per repetition and size, the series taking
/// turns at each size: a drift of the machine's speed during the run
/// (common on shared VMs) falls on the baselines and on cellnet alike,
/// instead of on whichever series ran in a slow minute. Each series' labels
/// with its results by size and repetition; a progress bar (`what`) on
/// rank 0 meanwhile.
fn take_turns<T>(
    pair: &Pair,
    what: &str,
    sizes: &[usize],
    mut series: Vec<(Meta, Measure<'_, T>)>,
) -> Result<Vec<(Meta, Vec<Vec<T>>)>> {
    let steps = (sizes.len() * series.len()) as u64 * pair.opts.reps as u64;
    let mut progress = if pair.rank == 0 {
        Progress::new(steps, what)
    } else {
        Progress::hidden()
    };
    let mut out: Vec<Vec<Vec<T>>> = series
        .iter()
        .map(|_| sizes.iter().map(|_| Vec::new()).collect())
        .collect();
    let mut measure_all = || {
        for rep in 0..pair.opts.reps {
            for (i, &size) in sizes.iter().enumerate() {
                for (k, (meta, measure)) in series.iter_mut().enumerate() {
                    out[k][i].push(measure(size)?);
                    progress.step(&format!(
                        "{} {} rep {}",
                        meta.name,
                        super::size_label(size),
                        rep + 1
                    ));
                }
            }
        }
        Ok(())
    };
    let done = measure_all();
    progress.finish();
    done?;
    Ok(series.into_iter().map(|(meta, _)| meta).zip(out).collect())
}

/// Latency points from the round trips (ns) of every repetition of every size.
fn latency_points(reps_by_size: Vec<Vec<Vec<u64>>>) -> Result<Vec<LatencyPoint>> {
    LATENCY_SIZES
        .iter()
        .zip(reps_by_size)
        .map(|(&size, reps)| {
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(failed)?;
            let mut medians = Vec::new();
            for mut ns in reps {
                for &v in &ns {
                    h.saturating_record(v.max(1));
                }
                medians.push(super::median_u64(&mut ns) as f64 / 1e3);
            }
            let q = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
            Ok(LatencyPoint {
                size,
                rtt_us: Spread::of(&medians),
                p50_us: q(0.5),
                p99_us: q(0.99),
                p999_us: q(0.999),
                samples: h.len(),
            })
        })
        .collect()
}

/// Throughput points from the elapsed time of every repetition of every size.
fn throughput_points(reps_by_size: Vec<Vec<Duration>>, quick: bool) -> Vec<ThroughputPoint> {
    THROUGHPUT_SIZES
        .iter()
        .zip(reps_by_size)
        .map(|(&size, reps)| {
            let n = thr_count(size, quick);
            let secs = |d: &Duration| d.as_secs_f64().max(1e-9);
            let rates: Vec<f64> = reps.iter().map(|d| n as f64 / secs(d)).collect();
            let bws: Vec<f64> = reps
                .iter()
                .map(|d| (n * size) as f64 / secs(d) / (1 << 20) as f64)
                .collect();
            ThroughputPoint {
                size,
                count: n as u64,
                msgs_per_s: Spread::of(&rates),
                mib_per_s: Spread::of(&bws),
            }
        })
        .collect()
}

fn zmq_err(e: zmq::Error) -> BenchError {
    BenchError::Failed(format!("zeromq: {e}"))
}

/// Bind on rank `binder` (ipc or tcp loopback), share the endpoint.
fn zmq_endpoint(
    pair: &Pair,
    binder: i32,
    sock: Option<&zmq::Socket>,
    ipc: bool,
    tag: &str,
) -> Result<String> {
    let mine = match sock {
        Some(s) if pair.rank == binder => {
            let ep = if ipc {
                format!(
                    "ipc://{}/cellnet-bench-{}-{tag}",
                    std::env::temp_dir().display(),
                    std::process::id()
                )
            } else {
                "tcp://127.0.0.1:*".to_string()
            };
            s.bind(&ep).map_err(zmq_err)?;
            s.get_last_endpoint()
                .map_err(zmq_err)?
                .map_err(|_| failed("endpoint is not UTF-8"))?
        }
        _ => String::new(),
    };
    Ok(pair.bcast_string(binder, &mine))
}

fn latency(pair: &mut Pair) -> Result<Vec<Series<LatencyPoint>>> {
    let rank = pair.rank;
    let quick = pair.opts.quick;
    let counts = move |size| {
        let n = lat_count(size, quick);
        (warmup(n), n)
    };
    // Every socket and communicator first; then the series take turns.
    let mut zmq_pairs = Vec::new();
    for ipc in [true, false] {
        let ctx = zmq::Context::new();
        let kind = if rank == 0 { zmq::DEALER } else { zmq::ROUTER };
        let sock = ctx.socket(kind).map_err(zmq_err)?;
        sock.set_linger(0).map_err(zmq_err)?;
        let tr = if ipc { "ipc" } else { "tcp" };
        let ep = zmq_endpoint(pair, 1, Some(&sock), ipc, &format!("lat-{tr}"))?;
        if rank == 0 {
            sock.connect(&ep).map_err(zmq_err)?;
        }
        zmq_pairs.push((tr, ctx, sock));
    }
    let default_window = crate::proto::reliable::ReliableConfig::default().window;
    let mut comms = Vec::new();
    for ipc in [true, false] {
        let tr = if ipc { "ipc" } else { "tcp" };
        comms.push((tr, pair.communicator(ipc, default_window)?));
    }
    let p = &*pair;
    let mut series: Vec<(Meta, Measure<'_, Vec<u64>>)> = Vec::new();

    // MPI ping-pong (payload one way, 8 bytes back).
    series.push((
        Meta::new("MPI", "mpi", "mpi"),
        Box::new(move |size| {
            let (warm, n) = counts(size);
            let peer = p.peer();
            let mut buf = vec![0u8; size];
            let mut ack = [0u8; 8];
            let mut out = Vec::with_capacity(n);
            p.world.barrier();
            for i in 0..warm + n {
                if rank == 0 {
                    let t = Instant::now();
                    peer.send(&buf[..]);
                    peer.receive_into(&mut ack[..]);
                    if i >= warm {
                        out.push(t.elapsed().as_nanos() as u64);
                    }
                } else {
                    peer.receive_into(&mut buf[..]);
                    peer.send(&ack[..]);
                }
            }
            Ok(out)
        }),
    ));

    // Raw ZeroMQ DEALER (rank 0) / ROUTER (rank 1).
    for (tr, _, sock) in &zmq_pairs {
        series.push((
            Meta::new(format!("ZeroMQ {tr}"), "zeromq", tr),
            Box::new(move |size| {
                let (warm, n) = counts(size);
                let buf = vec![0u8; size];
                let ack = [0u8; 8];
                let mut out = Vec::with_capacity(n);
                let mut id = zmq::Message::new();
                let mut msg = zmq::Message::new();
                p.world.barrier();
                for i in 0..warm + n {
                    if rank == 0 {
                        let t = Instant::now();
                        sock.send(&buf[..], 0).map_err(zmq_err)?;
                        sock.recv(&mut msg, 0).map_err(zmq_err)?;
                        if i >= warm {
                            out.push(t.elapsed().as_nanos() as u64);
                        }
                    } else {
                        sock.recv(&mut id, 0).map_err(zmq_err)?;
                        sock.recv(&mut msg, 0).map_err(zmq_err)?;
                        sock.send(&id[..], zmq::SNDMORE).map_err(zmq_err)?;
                        sock.send(&ack[..], 0).map_err(zmq_err)?;
                    }
                }
                Ok(out)
            }),
        ));
    }

    // cellnet SEND→ACK: send one cell, wait for its ticket.
    for (tr, comm) in &comms {
        let mut frame = 0u64;
        series.push((
            Meta::new(format!("cellnet {tr}"), "cellnet", tr),
            Box::new(move |size| {
                let (warm, n) = counts(size);
                let total = warm + n;
                let k = per_frame(size, total);
                let mut out = Vec::with_capacity(n);
                p.world.barrier();
                if rank == 1 {
                    for _ in 0..total.div_ceil(k) {
                        comm.recv_frame(Duration::from_secs(120)).map_err(failed)?;
                        frame += 1;
                    }
                    return Ok(out);
                }
                let payload = Bytes::from(vec![0u8; size]);
                let mut in_frame = 0;
                for i in 0..total {
                    let t = Instant::now();
                    let ticket = comm.send(1, frame, payload.clone()).map_err(failed)?;
                    let outcome = ticket.wait().map_err(failed)?;
                    let dt = t.elapsed().as_nanos() as u64;
                    if !outcome.is_ack() {
                        return Err(failed(format!("cell not acknowledged: {outcome:?}")));
                    }
                    if i >= warm {
                        out.push(dt);
                    }
                    in_frame += 1;
                    if in_frame == k || i + 1 == total {
                        for t in comm.end_frame(frame, &[1]).map_err(failed)? {
                            t.wait().map_err(failed)?;
                        }
                        frame += 1;
                        in_frame = 0;
                    }
                }
                Ok(out)
            }),
        ));
    }

    let measured = take_turns(p, "latency", &LATENCY_SIZES, series);
    for (_, comm) in comms {
        comm.shutdown().map_err(failed)?;
    }
    measured?
        .into_iter()
        .map(|(meta, reps)| Ok(meta.series(latency_points(reps)?)))
        .collect()
}

fn io_err(e: std::io::Error) -> BenchError {
    BenchError::Failed(format!("tcp: {e}"))
}

fn throughput(pair: &mut Pair) -> Result<Vec<Series<ThroughputPoint>>> {
    let rank = pair.rank;
    let quick = pair.opts.quick;
    // Every socket and communicator first; then the series take turns.
    // Raw ZeroMQ PUSH (rank 0) → PULL (rank 1), and a "done" pair back.
    let mut zmq_pairs = Vec::new();
    for ipc in [true, false] {
        let tr = if ipc { "ipc" } else { "tcp" };
        let ctx = zmq::Context::new();
        let (data, done) = if rank == 0 {
            (ctx.socket(zmq::PUSH), ctx.socket(zmq::PULL))
        } else {
            (ctx.socket(zmq::PULL), ctx.socket(zmq::PUSH))
        };
        let (data, done) = (data.map_err(zmq_err)?, done.map_err(zmq_err)?);
        data.set_linger(0).map_err(zmq_err)?;
        done.set_linger(0).map_err(zmq_err)?;
        let data_ep = zmq_endpoint(pair, 1, Some(&data), ipc, &format!("thr-{tr}"))?;
        let done_ep = zmq_endpoint(pair, 0, Some(&done), ipc, &format!("done-{tr}"))?;
        if rank == 0 {
            data.connect(&data_ep).map_err(zmq_err)?;
        } else {
            done.connect(&done_ep).map_err(zmq_err)?;
        }
        zmq_pairs.push((tr, ctx, data, done));
    }
    // Raw TCP streaming over loopback: the same bytes as write() calls.
    let listener = if rank == 1 {
        Some(TcpListener::bind("127.0.0.1:0").map_err(io_err)?)
    } else {
        None
    };
    let port = listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or(0, |a| a.port());
    let port = pair.bcast_u64(1, port as u64) as u16;
    let mut stream = match &listener {
        Some(l) => l.accept().map_err(io_err)?.0,
        None => TcpStream::connect(("127.0.0.1", port)).map_err(io_err)?,
    };
    stream.set_nodelay(true).map_err(io_err)?;
    // cellnet, every cell acknowledged, for each transport and window: a
    // ticket per cell (`send`), and at the default window also a ticket
    // per frame (`send_many`).
    let default_window = crate::proto::reliable::ReliableConfig::default().window;
    let variants = WINDOWS
        .iter()
        .map(|&w| (w, false))
        .chain([(default_window, true)]);
    let mut comms = Vec::new();
    for ipc in [true, false] {
        let tr = if ipc { "ipc" } else { "tcp" };
        for (w, many) in variants.clone() {
            comms.push((tr, w, many, pair.communicator(ipc, w)?));
        }
    }
    let p = &*pair;
    let mut series: Vec<(Meta, Measure<'_, Duration>)> = Vec::new();

    for (tr, _, data, done) in &zmq_pairs {
        series.push((
            Meta::new(format!("ZeroMQ PUSH/PULL {tr}"), "zeromq", tr),
            Box::new(move |size| {
                let n = thr_count(size, quick);
                let buf = vec![0u8; size];
                let mut msg = zmq::Message::new();
                p.world.barrier();
                let t = Instant::now();
                if rank == 0 {
                    for _ in 0..n {
                        data.send(&buf[..], 0).map_err(zmq_err)?;
                    }
                    done.recv(&mut msg, 0).map_err(zmq_err)?;
                } else {
                    for _ in 0..n {
                        data.recv(&mut msg, 0).map_err(zmq_err)?;
                    }
                    done.send(&b"done"[..], 0).map_err(zmq_err)?;
                }
                Ok(t.elapsed())
            }),
        ));
    }

    series.push((
        Meta::new("raw TCP", "tcp", "tcp"),
        Box::new(move |size| {
            let n = thr_count(size, quick);
            let mut buf = vec![0u8; size];
            let mut one = [0u8; 1];
            p.world.barrier();
            let t = Instant::now();
            if rank == 0 {
                for _ in 0..n {
                    stream.write_all(&buf).map_err(io_err)?;
                }
                stream.read_exact(&mut one).map_err(io_err)?;
            } else {
                for _ in 0..n {
                    stream.read_exact(&mut buf).map_err(io_err)?;
                }
                stream.write_all(&one).map_err(io_err)?;
            }
            Ok(t.elapsed())
        }),
    ));

    for (tr, w, many, comm) in &comms {
        let (w, many) = (*w, *many);
        let mut frame = 0u64;
        let mut meta = Meta::new(series_name(tr, w, many), "cellnet", tr);
        meta.window = Some(w);
        series.push((
            meta,
            Box::new(move |size| {
                let n = thr_count(size, quick);
                let k = per_frame(size, n);
                p.world.barrier();
                let t = Instant::now();
                if rank == 1 {
                    for _ in 0..n.div_ceil(k) {
                        comm.recv_frame(Duration::from_secs(120)).map_err(failed)?;
                        frame += 1;
                    }
                    return Ok(t.elapsed());
                }
                let payload = Bytes::from(vec![0u8; size]);
                let mut tickets = std::collections::VecDeque::new();
                let mut batches = std::collections::VecDeque::new();
                let check = |o: crate::proto::reliable::Outcome| {
                    if o.is_ack() {
                        Ok(())
                    } else {
                        Err(failed(format!("cell not acknowledged: {o:?}")))
                    }
                };
                let check_all = |o: crate::runtime::BatchOutcome| {
                    o.not_acked.into_iter().try_for_each(|(_, o)| check(o))
                };
                let mut sent = 0;
                while sent < n {
                    let cells = k.min(n - sent);
                    if many {
                        let cells = std::iter::repeat_n(payload.clone(), cells);
                        batches.push_back(comm.send_many(1, frame, cells).map_err(failed)?);
                    } else {
                        for _ in 0..cells {
                            let ticket = comm.send(1, frame, payload.clone());
                            tickets.push_back(ticket.map_err(failed)?);
                            while let Some(o) = tickets.front().and_then(|t| t.try_outcome()) {
                                check(o)?;
                                tickets.pop_front();
                            }
                        }
                    }
                    while let Some(o) = batches.front().and_then(|t| t.try_outcome()) {
                        check_all(o)?;
                        batches.pop_front();
                    }
                    tickets.extend(comm.end_frame(frame, &[1]).map_err(failed)?);
                    frame += 1;
                    sent += cells;
                }
                for t in tickets {
                    check(t.wait().map_err(failed)?)?;
                }
                for t in batches {
                    check_all(t.wait().map_err(failed)?)?;
                }
                Ok(t.elapsed())
            }),
        ));
    }

    let measured = take_turns(p, "throughput", &THROUGHPUT_SIZES, series);
    for (.., comm) in comms {
        comm.shutdown().map_err(failed)?;
    }
    Ok(measured?
        .into_iter()
        .map(|(meta, reps)| meta.series(throughput_points(reps, quick)))
        .collect())
}

fn print_latency(r: &LatencyReport) {
    println!(
        "\nlatency: round trip, payload one way + 8-byte answer, {} (µs; median of rep medians [min–max], p99, p99.9 over all samples)",
        super::reps_label(r.reps, r.quick)
    );
    println!("placement: {}", r.placement.join("; "));
    println!(
        "{:<14} {:>8} {:>10} {:>21} {:>10} {:>10}",
        "series", "size", "median", "[min – max]", "p99", "p99.9"
    );
    for s in &r.series {
        for p in &s.points {
            println!(
                "{:<14} {:>8} {:>10.2} {:>21} {:>10.2} {:>10.2}",
                s.name,
                super::size_label(p.size),
                p.rtt_us.median,
                format!("[{:.2} – {:.2}]", p.rtt_us.min, p.rtt_us.max),
                p.p99_us,
                p.p999_us
            );
        }
    }
}

fn print_throughput(r: &ThroughputReport) {
    println!(
        "\nthroughput: sustained, {} (median [min–max])",
        super::reps_label(r.reps, r.quick)
    );
    println!("placement: {}", r.placement.join("; "));
    println!(
        "{:<24} {:>8} {:>7} {:>12} {:>25} {:>10}",
        "series", "size", "count", "msgs/s", "[min – max]", "MiB/s"
    );
    for s in &r.series {
        for p in &s.points {
            println!(
                "{:<24} {:>8} {:>7} {:>12.0} {:>25} {:>10.1}",
                s.name,
                super::size_label(p.size),
                p.count,
                p.msgs_per_s.median,
                format!("[{:.0} – {:.0}]", p.msgs_per_s.min, p.msgs_per_s.max),
                p.mib_per_s.median
            );
        }
    }
}

fn plot_latency(opts: &BenchOpts, r: &LatencyReport) -> Result<()> {
    let lines = |pick: fn(&LatencyPoint) -> Spread| -> Vec<plot::Line> {
        r.series
            .iter()
            .map(|s| plot::Line {
                name: s.name.clone(),
                points: s.points.iter().map(|p| (p.size as f64, pick(p))).collect(),
            })
            .collect()
    };
    plot::draw(
        &opts.out.join("latency.png"),
        &plot::Axes {
            title: "Round trip (payload + 8 B answer), median of reps, bars min-max",
            x: "payload bytes",
            y: "round trip (µs)",
            log_x: true,
            log_y: true,
            x_bytes: true,
        },
        &lines(|p| p.rtt_us),
    )?;
    plot::draw(
        &opts.out.join("latency_p99.png"),
        &plot::Axes {
            title: "Round trip tail: p99 (bars p50 - p99.9), all samples",
            x: "payload bytes",
            y: "round trip (µs)",
            log_x: true,
            log_y: true,
            x_bytes: true,
        },
        &lines(|p| Spread {
            median: p.p99_us,
            min: p.p50_us,
            max: p.p999_us,
        }),
    )
}

fn plot_throughput(opts: &BenchOpts, r: &ThroughputReport) -> Result<()> {
    let lines = |pick: fn(&ThroughputPoint) -> Spread| -> Vec<plot::Line> {
        r.series
            .iter()
            .map(|s| plot::Line {
                name: s.name.clone(),
                points: s.points.iter().map(|p| (p.size as f64, pick(p))).collect(),
            })
            .collect()
    };
    plot::draw(
        &opts.out.join("throughput_msgs.png"),
        &plot::Axes {
            title: "Sustained messages/s (cellnet with ACKs), median, bars min-max",
            x: "message bytes",
            y: "messages per second",
            log_x: true,
            log_y: true,
            x_bytes: true,
        },
        &lines(|p| p.msgs_per_s),
    )?;
    plot::draw(
        &opts.out.join("throughput_bw.png"),
        &plot::Axes {
            title: "Sustained bandwidth, median, bars min-max",
            x: "message bytes",
            y: "MiB/s",
            log_x: true,
            log_y: true,
            x_bytes: true,
        },
        &lines(|p| p.mib_per_s),
    )
}
