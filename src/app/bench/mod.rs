//! `cellnet bench`: the benchmark suite (latency, throughput, discovery,
//! halo) with its baselines (raw ZeroMQ, raw TCP, MPI), reports as tables,
//! JSON and PNG plots.
//!
//! Owns the measurement harness only: it drives the public
//! [`Communicator`](crate::runtime::Communicator) API and the baselines'
//! own crates, and never reaches into `runtime`, `net` or `proto`.
//!
//! Shape of a run: `cellnet bench <name>` started by hand (no MPI) is the
//! *driver*: it starts `mpirun` jobs of this same binary for the parts that
//! need two or more MPI ranks, spawns plain processes for discovery, shows
//! a progress bar, and writes the reports. `latency` and `throughput` may
//! also be started directly under `mpirun -n 2`; they then run in place.

pub mod discovery;
pub mod halo;
pub mod pair;
pub mod plot;
pub mod summary;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// What `cellnet bench` was asked to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchName {
    /// Round-trip latency of one cell between two ranks, beside raw ZeroMQ, TCP and MPI.
    Latency,
    /// Cells per second one way between two ranks, beside the same baselines.
    Throughput,
    /// Time from start to all-ready for 2…64 instances on this host.
    Discovery,
    /// The main job's frame time at 2, 4 and 8 instances, beside the same
    /// halo exchange written directly with MPI.
    Halo,
    /// Every benchmark above, in turn.
    All,
    /// Hidden: one instance of a discovery run (spawned by the driver).
    DiscoveryWorker,
    /// Hidden: the ranks of one halo run (under `mpirun -n N`).
    HaloWorker,
}

impl std::str::FromStr for BenchName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "latency" => BenchName::Latency,
            "throughput" => BenchName::Throughput,
            "discovery" => BenchName::Discovery,
            "halo" => BenchName::Halo,
            "all" => BenchName::All,
            "discovery-worker" => BenchName::DiscoveryWorker,
            "halo-worker" => BenchName::HaloWorker,
            _ => {
                return Err(format!(
                    "unknown benchmark {s:?} (latency, throughput, discovery, halo, all)"
                ))
            }
        })
    }
}

/// Options shared by every benchmark.
#[derive(Clone, Debug)]
pub struct BenchOpts {
    /// Tiny counts (CI's smoke test), not for measuring.
    pub quick: bool,
    /// Directory for the JSON results and PNG plots.
    pub out: PathBuf,
    /// Repetitions per measurement (at least 1); numbers are their median.
    pub reps: u32,
    /// halo-worker: frames, grid side.
    pub frames: u64,
    /// halo-worker: cells per side of the square grid.
    pub grid: usize,
}

/// Why a benchmark could not run; bad input is [`BenchError::Usage`].
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Wrong invocation (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The run itself failed (exit code 1).
    #[error("{0}")]
    Failed(String),
}

impl BenchError {
    /// A [`BenchError::Failed`] from any error message.
    pub fn failed(e: impl std::fmt::Display) -> Self {
        BenchError::Failed(e.to_string())
    }
    /// Whether this is bad input (exit code 2) rather than a failed run.
    pub fn is_usage(&self) -> bool {
        matches!(self, BenchError::Usage(_))
    }
}

type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Entry point of `cellnet bench`.
pub fn run(name: BenchName, config: Config, opts: &BenchOpts) -> Result<()> {
    if opts.reps == 0 {
        return Err(BenchError::Usage("--reps must be at least 1".into()));
    }
    match name {
        BenchName::DiscoveryWorker => return discovery::worker(config),
        BenchName::HaloWorker => return halo::worker(config, opts),
        _ => {}
    }
    let mpi = under_mpi();
    match (name, mpi) {
        (BenchName::Latency | BenchName::Throughput, true) => {
            return pair::run_in_place(name, config, opts)
        }
        (_, true) => {
            return Err(BenchError::Usage(format!(
                "run `cellnet bench {}` without mpirun: it starts its own mpirun jobs",
                name_str(name)
            )))
        }
        _ => {}
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| {
        BenchError::Usage(format!("cannot create --out {}: {e}", opts.out.display()))
    })?;
    match name {
        BenchName::Latency | BenchName::Throughput => pair::drive(name, opts),
        BenchName::Discovery => discovery::drive(config, opts).map(|_| ()),
        BenchName::Halo => halo::drive(opts).map(|_| ()),
        BenchName::All => {
            // One failed benchmark does not hide the others' results.
            let mut errors = Vec::new();
            for (what, r) in [
                ("latency", pair::drive(BenchName::Latency, opts)),
                ("throughput", pair::drive(BenchName::Throughput, opts)),
                ("discovery", discovery::drive(config, opts).map(|_| ())),
                ("halo", halo::drive(opts).map(|_| ())),
            ] {
                if let Err(e) = r {
                    eprintln!("cellnet: bench {what}: {e}");
                    errors.push(what);
                }
            }
            summary::write(opts)?;
            if errors.is_empty() {
                Ok(())
            } else {
                Err(BenchError::Failed(format!(
                    "benchmarks failed: {}",
                    errors.join(", ")
                )))
            }
        }
        BenchName::DiscoveryWorker | BenchName::HaloWorker => Ok(()),
    }
}

/// The name as typed on the command line (`discovery-worker` for the hidden ones).
pub fn name_str(name: BenchName) -> &'static str {
    match name {
        BenchName::Latency => "latency",
        BenchName::Throughput => "throughput",
        BenchName::Discovery => "discovery",
        BenchName::Halo => "halo",
        BenchName::All => "all",
        BenchName::DiscoveryWorker => "discovery-worker",
        BenchName::HaloWorker => "halo-worker",
    }
}

/// True when an MPI launcher started this process.
pub fn under_mpi() -> bool {
    let vars = crate::launch::env_vars();
    crate::launch::MPI_MARKERS
        .iter()
        .any(|m| vars.contains_key(*m))
}

/// Median, min and max over repetitions.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Spread {
    /// Median over the repetitions (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`, ignoring non-finite ones; all zero when none is left.
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    /// `median [min – max]` with `decimals` digits after the point.
    pub fn label(&self, decimals: usize) -> String {
        let d = decimals;
        format!("{:.d$} [{:.d$} – {:.d$}]", self.median, self.min, self.max)
    }
}

/// How a table header names the repetitions: `5 reps` or `5 reps, quick`.
pub fn reps_label(reps: u32, quick: bool) -> String {
    format!("{reps} reps{}", if quick { ", quick" } else { "" })
}

/// Median of a list of integers (0 when empty).
pub fn median_u64(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[values.len() / 2]
}

/// Progress, shown as a bar on stderr, or as `@progress` lines on stdout
/// when a driver reads them (`CELLNET_BENCH_PROGRESS=lines`), or not at all.
pub enum Progress {
    /// An indicatif bar on stderr.
    Bar(indicatif::ProgressBar),
    /// `@progress <done> <total> <msg>` lines on stdout, for a driving process.
    Lines {
        /// Steps done so far.
        done: u64,
        /// Steps in all.
        total: u64,
    },
    /// No progress output.
    Hidden,
}

impl Progress {
    /// Lines when `CELLNET_BENCH_PROGRESS=lines`, else a bar titled `what`, for `total` steps.
    pub fn new(total: u64, what: &str) -> Self {
        if std::env::var("CELLNET_BENCH_PROGRESS").as_deref() == Ok("lines") {
            return Progress::Lines { done: 0, total };
        }
        Progress::Bar(bar(total, what))
    }

    /// No progress output (workers, tests).
    pub fn hidden() -> Self {
        Progress::Hidden
    }

    /// One step done; `msg` describes it.
    pub fn step(&mut self, msg: &str) {
        match self {
            Progress::Bar(b) => {
                b.set_message(msg.to_string());
                b.inc(1);
            }
            Progress::Lines { done, total } => {
                *done += 1;
                println!("@progress {done} {total} {msg}");
                let _ = std::io::stdout().flush();
            }
            Progress::Hidden => {}
        }
    }

    /// Remove the bar, if any.
    pub fn finish(&self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// An indicatif bar on stderr (hidden when stderr is not a terminal).
pub fn bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_prefix(what.to_string());
    b
}

/// `mpirun` as this machine needs it: root flags, oversubscription, no
/// binding by mpirun (cellnet binds with hwloc), MPI kept on loopback,
/// under `timeout` so a hung rank cannot block the suite.
pub fn mpirun(n: u32, args: &[String], limit: Duration) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=10")
        .arg(limit.as_secs().max(1).to_string())
        .arg("mpirun");
    // SAFETY-free check: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.arg("--allow-run-as-root");
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    cmd.args(["--oversubscribe", "--bind-to", "none", "-n"])
        .arg(n.to_string())
        .env("OMPI_MCA_btl_tcp_if_include", "lo")
        .env("OMPI_MCA_oob_tcp_if_include", "lo")
        .env("CELLNET_BENCH_PROGRESS", "lines")
        .arg(self_exe())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

/// This binary.
pub fn self_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cellnet"))
}

/// Run `cmd`, moving `bar` on its `@progress` lines and handing every other
/// stdout line to `line` (the bar prints around it). Fails on a non-zero exit.
pub fn stream(
    mut cmd: Command,
    bar: &indicatif::ProgressBar,
    what: &str,
    mut line: impl FnMut(&str),
) -> Result<()> {
    let mut child = cmd.spawn().map_err(|e| {
        BenchError::Failed(format!(
            "cannot start {what}: {e} (is openmpi-bin installed?)"
        ))
    })?;
    if let Some(out) = child.stdout.take() {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if let Some(rest) = l.strip_prefix("@progress ") {
                let mut it = rest.splitn(3, ' ');
                let done = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let total = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(it.next().unwrap_or("").to_string());
            } else {
                line(&l);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| BenchError::Failed(format!("{what}: {e}")))?;
    if !status.success() {
        return Err(BenchError::Failed(format!(
            "{what} failed ({status}){}",
            if status.code() == Some(124) {
                ": timed out"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// Write `value` as pretty JSON to `dir/name`.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BenchError::Failed(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).map_err(BenchError::failed)?;
    std::fs::write(&path, text + "\n")
        .map_err(|e| BenchError::Failed(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

/// Read `dir/name` back.
pub fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BenchError::Failed(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| BenchError::Failed(format!("{}: {e}", path.display())))
}

/// A free UDP port (bound to 0 and released).
pub fn free_udp_port() -> Result<u16> {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Failed(format!("no free UDP port: {e}")))
}

/// Microseconds since the Unix epoch (comparable across processes of a host).
pub fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Human size: 8 B, 64 KiB, 1 MiB.
pub fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_and_even_counts() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn unknown_bench_name_is_an_error_not_a_panic() {
        assert!("nope".parse::<BenchName>().is_err());
        assert_eq!("halo".parse::<BenchName>(), Ok(BenchName::Halo));
    }

    #[test]
    fn the_summary_s_default_window_is_measured() {
        let w = crate::proto::reliable::ReliableConfig::default().window;
        assert!(pair::WINDOWS.contains(&w), "{w} not in {:?}", pair::WINDOWS);
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(8), "8 B");
        assert_eq!(size_label(65536), "64 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
    }
}
