//! The `cellnet` binary: the main job, the probe, the simulator, and
//! (later) benchmarks. Every bad input ends in one line on stderr and exit
//! code 2; a failed run ends with exit code 1.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use cellnet::app::checkpoint::{self, Checkpoint, CheckpointError};
use cellnet::app::{bench, collectives, life, probe, stress};
use cellnet::config::{parse_duration, Config, VARIABLES};
use cellnet::launch::{self, LaunchMode};
use cellnet::place::PlacementPolicy;
use cellnet::runtime::{Communicator, RuntimeError};

#[derive(Parser, Debug)]
#[command(
    name = "cellnet",
    version,
    about = "Communication layer for HPC jobs: discovery, node leaders, confirmed in-order cell exchange",
    after_help = env_help()
)]
struct Cli {
    #[command(flatten)]
    opts: CommonOpts,
    #[command(subcommand)]
    cmd: Cmd,
}

fn env_help() -> String {
    let mut s = String::from("Environment (flags win over variables):\n");
    for (var, default, meaning) in VARIABLES {
        s.push_str(&format!("  {var}\n      {meaning} [default: {default}]\n"));
    }
    s.push_str(
        "\nExamples:\n  mpirun -n 4 --bind-to none cellnet life\n  srun --mpi=pmix cellnet life --frames 1000\n  \
         CELLNET_RANK=0 CELLNET_SIZE=2 cellnet probe & CELLNET_RANK=1 CELLNET_SIZE=2 cellnet probe\n",
    );
    s
}

/// Settings shared by every command; each overrides its CELLNET_* variable.
#[derive(Args, Debug)]
struct CommonOpts {
    /// Where identity comes from: auto, mpi, slurm, explicit, single
    #[arg(long, global = true, value_name = "MODE")]
    launch: Option<LaunchMode>,
    /// Core binding: compact, scatter, none
    #[arg(long, global = true, value_name = "POLICY")]
    placement: Option<PlacementPolicy>,
    /// Rayon workers for the cell handler (0 = one per bound PU)
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// UDP port of node-local discovery
    #[arg(long, global = true, value_name = "PORT")]
    discovery_port: Option<u16>,
    /// host:port where node leaders register
    #[arg(long, global = true, value_name = "HOST:PORT")]
    coordinator: Option<String>,
    /// IP address of this instance's tcp:// receiving socket
    #[arg(long, global = true, value_name = "IP")]
    bind_ip: Option<std::net::IpAddr>,
    /// Give up if the job is not globally ready after this long (e.g. 30s)
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    join_timeout: Option<Duration>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The main job: Game of Life, halos through cellnet, verified against a serial run
    Life(LifeArgs),
    /// Print each instance's rank, node, leader, binding and endpoints; optionally exchange cells
    Probe(ProbeArgs),
    /// Run the proto state machines of a whole job over a simulated, faulty network and check the invariants
    Sim(SimArgs),
    /// Many cells between all instances, a subset refused by the handler; checks every ticket
    Stress(StressArgs),
    /// Benchmarks against raw ZeroMQ, TCP and MPI: latency, throughput, discovery, halo, all
    Bench(BenchArgs),
    /// Run every collective through cellnet; under MPI compare each with MPI's result
    Collectives(CollectivesArgs),
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// latency, throughput, discovery, halo or all
    #[arg(value_name = "NAME")]
    name: bench::BenchName,
    /// Small counts, for a smoke test (numbers not meaningful)
    #[arg(long)]
    quick: bool,
    /// Folder for the JSON files and PNG plots
    #[arg(long, default_value = "results")]
    out: std::path::PathBuf,
    /// Repetitions; medians and spread are taken over them
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    reps: u32,
    /// halo-worker: frames per repetition
    #[arg(long, default_value_t = 100, hide = true, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    frames: u64,
    /// halo-worker: grid side
    #[arg(long, default_value_t = 512, hide = true, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    grid: u64,
}

#[derive(Args, Debug)]
struct CollectivesArgs {
    /// Deadline of each collective
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args, Debug)]
struct StressArgs {
    /// Cells each instance sends to each other instance
    #[arg(long, default_value_t = 100_000)]
    cells: u64,
    /// Cells per frame
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    per_frame: u64,
    /// Payload bytes per cell (at least 8)
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(8..=(64 << 20)))]
    payload: u64,
    /// The handler refuses (ERR 7) every cell whose sequence number is a multiple of this (0: none)
    #[arg(long, default_value_t = 97)]
    err_every: u64,
    /// Longest wait for one frame
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    frame_timeout: Duration,
    /// Send each frame's cells to each peer with one send_many (one ticket
    /// per frame and peer) instead of a send and a ticket per cell
    #[arg(long)]
    many: bool,
}

#[derive(Args, Debug)]
struct SimArgs {
    /// Nodes of the simulated job
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    nodes: u32,
    /// Instances per node
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    per_node: u32,
    /// Probability that a message is lost, in [0, 1)
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    loss: f64,
    /// Probability that a message is duplicated, in [0, 1)
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    dup: f64,
    /// Fraction of messages delayed by up to --reorder-delay more (reordered), in [0, 1)
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    reorder: f64,
    /// Largest extra delay of a reordered message
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    reorder_delay: Duration,
    /// Base one-way delay of every message
    #[arg(long, default_value = "50us", value_parser = parse_micros)]
    delay: Duration,
    /// Uniform random extra delay up to this
    #[arg(long, default_value = "50us", value_parser = parse_micros)]
    jitter: Duration,
    /// Frames of neighbour exchange after global ready
    #[arg(long, default_value_t = 3)]
    frames: u64,
    /// Seed of every random choice: the same seed replays the same run
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Crash RANK once it handed over FRAME, restart it DOWN later: RANK@FRAME+DOWN, e.g. 5@1+300ms
    #[arg(long, value_name = "RANK@FRAME+DOWN", value_parser = parse_crash)]
    crash: Option<cellnet::sim::CrashSpec>,
    /// Kill RANK for good at PHASE (discovery, join, or a frame number): RANK@PHASE, e.g. 100@join, 0@2
    #[arg(long, value_name = "RANK@PHASE", value_parser = parse_kill)]
    kill: Option<cellnet::sim::KillSpec>,
    /// After global ready and the frames, run barrier, broadcast, all_gather and all_reduce and check them
    #[arg(long)]
    collectives: bool,
    /// Cut NODE off from the other nodes from START for DURATION: NODE@START+DURATION, e.g. 1@10ms+2s
    #[arg(long, value_name = "NODE@START+DURATION", value_parser = parse_partition)]
    partition: Option<cellnet::sim::PartitionSpec>,
    /// Fail if work is still pending at this virtual time
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    time_limit: Duration,
}

fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err("must be a number in [0, 1)".into()),
    }
}

/// A duration that may also be given in microseconds (`50us`).
fn parse_micros(s: &str) -> Result<Duration, String> {
    match s.trim().strip_suffix("us") {
        Some(n) => n
            .trim()
            .parse::<u64>()
            .map(Duration::from_micros)
            .map_err(|_| "not a duration (try 50us, 2ms, 1s)".into()),
        None => parse_duration(s),
    }
}

/// `A@B+C` → (A, B, C).
fn split_spec(s: &str) -> Result<(&str, &str, &str), String> {
    let (a, rest) = s.split_once('@').ok_or("expected A@B+C")?;
    let (b, c) = rest.split_once('+').ok_or("expected A@B+C")?;
    Ok((a.trim(), b.trim(), c.trim()))
}

fn parse_crash(s: &str) -> Result<cellnet::sim::CrashSpec, String> {
    let (rank, frame, down) = split_spec(s)?;
    Ok(cellnet::sim::CrashSpec {
        rank: rank.parse().map_err(|_| format!("bad rank {rank:?}"))?,
        after_frame: frame.parse().map_err(|_| format!("bad frame {frame:?}"))?,
        down_for: parse_duration(down)?,
    })
}

fn parse_kill(s: &str) -> Result<cellnet::sim::KillSpec, String> {
    let (rank, phase) = s.split_once('@').ok_or("expected RANK@PHASE")?;
    let at = match phase.trim() {
        "discovery" => cellnet::sim::KillAt::Discovery,
        "join" => cellnet::sim::KillAt::Join,
        f => cellnet::sim::KillAt::Frame(
            f.parse()
                .map_err(|_| format!("bad phase {f:?} (discovery, join or a frame number)"))?,
        ),
    };
    Ok(cellnet::sim::KillSpec {
        rank: rank
            .trim()
            .parse()
            .map_err(|_| format!("bad rank {rank:?}"))?,
        at,
    })
}

fn parse_partition(s: &str) -> Result<cellnet::sim::PartitionSpec, String> {
    let (node, start, duration) = split_spec(s)?;
    Ok(cellnet::sim::PartitionSpec {
        node: node.parse().map_err(|_| format!("bad node {node:?}"))?,
        start: parse_duration(start)?,
        duration: parse_duration(duration)?,
    })
}

fn run_sim(a: &SimArgs) -> Result<(), Failure> {
    let cfg = cellnet::sim::SimConfig {
        nodes: a.nodes,
        per_node: a.per_node,
        loss: a.loss,
        dup: a.dup,
        reorder: a.reorder,
        reorder_delay: a.reorder_delay,
        delay: a.delay,
        jitter: a.jitter,
        frames: a.frames,
        seed: a.seed,
        crash: a.crash.clone(),
        kill: a.kill,
        collectives: a.collectives,
        partition: a.partition.clone(),
        time_limit: a.time_limit,
        ..Default::default()
    };
    match cellnet::sim::run(&cfg) {
        Ok(report) => {
            // A closed stdout (`| head`) is not a failure of the simulation.
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{report}");
            Ok(())
        }
        Err(e @ cellnet::sim::SimViolation::InvalidConfig(_)) => Err(Failure {
            code: 2,
            message: e.to_string(),
        }),
        Err(e) => Err(fail(format!(
            "violation: {e} (replay with --seed {})",
            a.seed
        ))),
    }
}

#[derive(Args, Debug)]
struct LifeArgs {
    /// Grid rows
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rows: u32,
    /// Grid columns
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    cols: u32,
    /// Frames (generations) to run
    #[arg(long, default_value_t = 100)]
    frames: u64,
    /// Seed of the initial soup
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest wait for one frame's halos before failing
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    frame_timeout: Duration,
    /// No per-frame progress lines
    #[arg(long)]
    quiet: bool,
    /// After every frame, write this instance's tile and frame number to
    /// DIR/rank-R (a temporary file renamed over it); DIR is created
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<std::path::PathBuf>,
    /// Resume from DIR/rank-R of --checkpoint if it exists (else start at
    /// frame 0): restart a lost instance with its rank while the rest of the
    /// job runs; its neighbours resend their latest frames to it. A
    /// checkpoint of another rank, grid, seed or job size is refused
    #[arg(long, requires = "checkpoint")]
    resume: bool,
    /// Sleep this long after every frame, standing in for compute time
    /// (e.g. to have time to kill and restart an instance)
    #[arg(long, default_value = "0s", value_parser = parse_duration, value_name = "D")]
    frame_delay: Duration,
}

#[derive(Args, Debug)]
struct ProbeArgs {
    /// After probing, send this many cells to every other instance and check the ACKs
    #[arg(long, default_value_t = 0)]
    exchange: u32,
    /// Then stay this long printing peer events (restarts, losses, leader
    /// changes), and finish with a barrier, a count of the survivors and
    /// the dropped-traffic counters
    #[arg(long, value_parser = parse_duration)]
    hold: Option<Duration>,
}

fn config(opts: &CommonOpts) -> Result<Config, RuntimeError> {
    let mut c = Config::from_env()?;
    if let Some(v) = opts.launch {
        c.launch = v;
    }
    if let Some(v) = opts.placement {
        c.placement = v;
    }
    if let Some(v) = opts.threads {
        c.threads = v;
    }
    if let Some(v) = opts.discovery_port {
        c.discovery_port = v;
    }
    if let Some(v) = &opts.coordinator {
        c.coordinator = Some(v.clone());
    }
    if let Some(v) = opts.bind_ip {
        c.bind_ip = Some(v);
    }
    if let Some(v) = opts.join_timeout {
        c.join_timeout = v;
    }
    Ok(c)
}

/// A failure and the exit code it deserves.
struct Failure {
    code: u8,
    message: String,
}

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Self {
        Failure {
            code: 2,
            message: e.to_string(),
        }
    }
}

fn fail(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: message.to_string(),
    }
}

fn start(
    config: Config,
    handler: Option<cellnet::runtime::Handler>,
) -> Result<Communicator, Failure> {
    let (info, mpi) = launch::detect(config.launch).map_err(RuntimeError::from)?;
    let mut b = Communicator::builder().config(config).launch_info(info);
    if let Some(mpi) = mpi {
        b = b.mpi_session(mpi);
    }
    if let Some(h) = handler {
        b = b.handler_arc(h);
    }
    Ok(b.start()?)
}

fn run_life(config: Config, a: &LifeArgs) -> Result<(), Failure> {
    let params = life::LifeParams {
        rows: a.rows as usize,
        cols: a.cols as usize,
        frames: a.frames,
        seed: a.seed,
        frame_timeout: a.frame_timeout,
        quiet: a.quiet,
        checkpoint: a.checkpoint.clone(),
        frame_delay: a.frame_delay,
    };
    // The partition depends on the job size, known only after launch
    // detection; the handler is built from it before the runtime starts.
    let (info, mpi) = launch::detect(config.launch).map_err(RuntimeError::from)?;
    let part = cellnet::partition::Partition2d::new([params.rows, params.cols], info.size)
        .map_err(|e| Failure {
            code: 2,
            message: e.to_string(),
        })?;
    let usage = |e: CheckpointError| Failure {
        code: 2,
        message: e.to_string(),
    };
    let id = params.checkpoint_id(info.rank, info.size);
    let mut resume = None;
    if let Some(dir) = &params.checkpoint {
        std::fs::create_dir_all(dir)
            .map_err(|source| CheckpointError::Write {
                path: dir.clone(),
                id,
                source,
            })
            .map_err(usage)?;
        if a.resume {
            let block = part.block(info.rank).len;
            resume = Checkpoint::load(dir, id, block, params.frames).map_err(usage)?;
            match &resume {
                Some(c) => println!(
                    "cellnet life: rank {} resumes at frame {} from {}",
                    info.rank,
                    c.frame,
                    checkpoint::path(dir, info.rank).display()
                ),
                None => println!(
                    "cellnet life: rank {} has no checkpoint in {}, starts at frame 0",
                    info.rank,
                    dir.display()
                ),
            }
        }
    }
    let handler = life::handler(part, info.rank, params.frames);
    let mut b = Communicator::builder()
        .config(config)
        .launch_info(info)
        .first_frame(resume.as_ref().map_or(0, |c| c.frame))
        .handler(handler);
    if let Some(mpi) = mpi {
        b = b.mpi_session(mpi);
    }
    let comm = b.start()?;
    if comm.rank() == 0 {
        let s = comm.status();
        println!(
            "cellnet life: {}x{} grid, {} frames, {} instances on {} node(s), global ready",
            params.rows,
            params.cols,
            params.frames,
            comm.size(),
            s.global.map_or(0, |g| g.0)
        );
    }
    let report = life::run(&comm, &params, resume.as_ref()).map_err(fail)?;
    comm.shutdown()?;
    if let Some(sum) = report.checksum {
        println!(
            "cellnet life: {} frames in {:.3} s, {:.3e} cells/s, checksum {sum:#018x} equals the serial run: verified",
            params.frames,
            report.elapsed.as_secs_f64(),
            report.cells_per_sec
        );
    }
    Ok(())
}

fn run_stress(config: Config, a: &StressArgs) -> Result<(), Failure> {
    let params = stress::StressParams {
        cells: a.cells,
        per_frame: a.per_frame,
        payload: a.payload as usize,
        err_every: a.err_every,
        timeout: a.frame_timeout,
        many: a.many,
    };
    let (info, mpi) = launch::detect(config.launch).map_err(RuntimeError::from)?;
    let seen = stress::Seen::new(info.size, params.cells);
    let mut b = Communicator::builder()
        .config(config)
        .launch_info(info)
        .handler(stress::handler(params.clone(), seen.clone()));
    if let Some(mpi) = mpi {
        b = b.mpi_session(mpi);
    }
    let comm = b.start()?;
    let line = stress::run(&comm, &params, &seen).map_err(fail)?;
    comm.shutdown()?;
    println!("{line}");
    Ok(())
}

fn run_collectives(config: Config, a: &CollectivesArgs) -> Result<(), Failure> {
    let comm = start(config, None)?;
    let line = collectives::run(&comm, a.timeout).map_err(fail)?;
    println!("{line}");
    comm.shutdown()?;
    Ok(())
}

fn run_probe(config: Config, a: &ProbeArgs) -> Result<(), Failure> {
    let comm = start(config, None)?;
    println!("{}", probe::line(&comm));
    if a.exchange > 0 {
        let others: Vec<u32> = (0..comm.size()).filter(|&r| r != comm.rank()).collect();
        let report = probe::exchange(&comm, &others, a.exchange).map_err(fail)?;
        println!("{report}");
    }
    if let Some(hold) = a.hold {
        println!("{}", probe::hold(&comm, hold).map_err(fail)?);
    }
    comm.shutdown()?;
    Ok(())
}

fn run_bench(config: Config, a: &BenchArgs) -> Result<(), Failure> {
    let opts = bench::BenchOpts {
        quick: a.quick,
        out: a.out.clone(),
        reps: a.reps,
        frames: a.frames,
        grid: a.grid as usize,
    };
    bench::run(a.name, config, &opts).map_err(|e| Failure {
        code: if e.is_usage() { 2 } else { 1 },
        message: e.to_string(),
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut first = lines
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_string();
            // "the following required arguments were not provided:" names
            // them on the next line: keep it on this one.
            if first.ends_with(':') {
                if let Some(next) = lines.next() {
                    first = format!("{first} {next}");
                }
            }
            eprintln!("cellnet: {first}");
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELLNET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let result = match &cli.cmd {
        // The simulator runs in this process only: no launch, no config.
        Cmd::Sim(a) => run_sim(a),
        cmd => config(&cli.opts)
            .map_err(Failure::from)
            .and_then(|config| match cmd {
                Cmd::Life(a) => run_life(config, a),
                Cmd::Probe(a) => run_probe(config, a),
                Cmd::Stress(a) => run_stress(config, a),
                Cmd::Bench(a) => run_bench(config, a),
                Cmd::Collectives(a) => run_collectives(config, a),
                Cmd::Sim(a) => run_sim(a),
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("cellnet: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
