//! `all`: the targets of issue 5 as ratios cellnet / baseline, read back
//! from the JSON the benchmarks wrote, printed with PASS/MISS and written
//! as `summary.json`.

use serde::{Deserialize, Serialize};

use super::discovery::DiscoveryReport;
use super::halo::HaloReport;
use super::pair::{series_name, LatencyReport, ThroughputReport};
use super::{BenchError, BenchOpts, Spread};

/// One row: what was compared, the two medians with spread, the ratio.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// What is compared, e.g. "64 B SEND->ACK round trip, ipc (same node)".
    pub target: String,
    /// The cellnet series compared.
    pub cellnet: String,
    /// The baseline series it is compared with.
    pub baseline: String,
    /// Unit of the two values (`us`, `ms`, …).
    pub unit: String,
    /// cellnet's value over the repetitions.
    pub cellnet_value: Spread,
    /// The baseline's value; `None` for targets without a baseline.
    pub baseline_value: Option<Spread>,
    /// cellnet / baseline: median of each, and the extreme ratios of the
    /// spreads (min/max over min/max).
    pub ratio: Option<Spread>,
    /// The limit, e.g. "<= 1.3x" or "<= 200 ms".
    pub limit: String,
    /// None: informative row, or the data is missing.
    pub pass: Option<bool>,
}

/// What `bench all` prints and writes to `summary.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// Whether the results came from a `--quick` run (not to be judged).
    pub quick: bool,
    /// Repetitions behind every value.
    pub reps: u32,
    /// One row per target.
    pub rows: Vec<Row>,
    /// Results files or data that were not found, as messages.
    pub missing: Vec<String>,
    /// `/proc/loadavg` when the summary was made: other work on the machine
    /// shows up in every number, most in the blocking transports' latency.
    #[serde(default)]
    pub loadavg: String,
}

fn ratio(c: Spread, b: Spread) -> Spread {
    let d = |x: f64| if x > 0.0 { x } else { f64::MIN_POSITIVE };
    Spread {
        median: c.median / d(b.median),
        min: c.min / d(b.max),
        max: c.max / d(b.min),
    }
}

fn lat(r: &LatencyReport, name: &str, size: usize) -> Option<Spread> {
    r.series
        .iter()
        .find(|s| s.name == name)?
        .points
        .iter()
        .find(|p| p.size == size)
        .map(|p| p.rtt_us)
}

fn thr(r: &ThroughputReport, name: &str, size: usize, bw: bool) -> Option<Spread> {
    r.series
        .iter()
        .find(|s| s.name == name)?
        .points
        .iter()
        .find(|p| p.size == size)
        .map(|p| if bw { p.mib_per_s } else { p.msgs_per_s })
}

#[allow(clippy::too_many_arguments)]
fn compare(
    target: &str,
    (cn, c): (&str, Option<Spread>),
    (bn, b): (&str, Option<Spread>),
    unit: &str,
    limit: f64,
    at_most: bool,
    informative: bool,
) -> Option<Row> {
    let (c, b) = (c?, b?);
    let r = ratio(c, b);
    let ok = if at_most {
        r.median <= limit
    } else {
        r.median >= limit
    };
    Some(Row {
        target: target.into(),
        cellnet: cn.into(),
        baseline: bn.into(),
        unit: unit.into(),
        cellnet_value: c,
        baseline_value: Some(b),
        ratio: Some(r),
        limit: if informative {
            "-".into()
        } else {
            format!("{} {limit}x", if at_most { "<=" } else { ">=" })
        },
        pass: (!informative).then_some(ok),
    })
}

/// Build the summary from the JSON files in `opts.out`.
pub fn build(opts: &BenchOpts) -> Summary {
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    let lat_r: Option<LatencyReport> = super::read_json(&opts.out, "latency.json")
        .map_err(|e| missing.push(e.to_string()))
        .ok();
    let thr_r: Option<ThroughputReport> = super::read_json(&opts.out, "throughput.json")
        .map_err(|e| missing.push(e.to_string()))
        .ok();
    let disc_r: Option<DiscoveryReport> = super::read_json(&opts.out, "discovery.json")
        .map_err(|e| missing.push(e.to_string()))
        .ok();
    let halo_r: Option<HaloReport> = super::read_json(&opts.out, "halo.json")
        .map_err(|e| missing.push(e.to_string()))
        .ok();
    let mut push = |row: Option<Row>, what: &str| match row {
        Some(r) => rows.push(r),
        None => missing.push(format!("no data for: {what}")),
    };
    if let Some(r) = &lat_r {
        for (tr, informative) in [("ipc", false), ("tcp", false)] {
            let cn = format!("cellnet {tr}");
            let bn = format!("ZeroMQ {tr}");
            let t = format!(
                "64 B SEND->ACK round trip, {tr} (same node{})",
                if tr == "tcp" { ", loopback" } else { "" }
            );
            push(
                compare(
                    &t,
                    (&cn, lat(r, &cn, 64)),
                    (&bn, lat(r, &bn, 64)),
                    "us",
                    1.3,
                    true,
                    informative,
                ),
                &t,
            );
        }
        let t = "64 B round trip vs MPI (busy-polling)";
        push(
            compare(
                t,
                ("cellnet ipc", lat(r, "cellnet ipc", 64)),
                ("MPI", lat(r, "MPI", 64)),
                "us",
                1.0,
                true,
                true,
            ),
            t,
        );
        let t = "1 MiB round trip, ipc";
        push(
            compare(
                t,
                ("cellnet ipc", lat(r, "cellnet ipc", 1 << 20)),
                ("ZeroMQ ipc", lat(r, "ZeroMQ ipc", 1 << 20)),
                "us",
                1.3,
                true,
                true,
            ),
            t,
        );
    }
    if let Some(r) = &thr_r {
        // cellnet with its default credit window.
        let w = crate::proto::reliable::ReliableConfig::default().window;
        let (ipc_w, tcp_w) = (series_name("ipc", w, false), series_name("tcp", w, false));
        let ipc_many = series_name("ipc", w, true);
        let zmq = "ZeroMQ PUSH/PULL ipc";
        for (t, cn, informative) in [
            (
                "64 B cells/s with ACKs vs one-way ZeroMQ (ipc), send_many",
                &ipc_many,
                false,
            ),
            (
                "64 B cells/s with ACKs vs one-way ZeroMQ (ipc), send",
                &ipc_w,
                true,
            ),
        ] {
            push(
                compare(
                    t,
                    (cn, thr(r, cn, 64, false)),
                    (zmq, thr(r, zmq, 64, false)),
                    "msgs/s",
                    0.7,
                    false,
                    informative,
                ),
                t,
            );
        }
        let t = "1 MiB bandwidth vs raw TCP (tcp loopback)";
        push(
            compare(
                t,
                (&tcp_w, thr(r, &tcp_w, 1 << 20, true)),
                ("raw TCP", thr(r, "raw TCP", 1 << 20, true)),
                "MiB/s",
                0.8,
                false,
                false,
            ),
            t,
        );
        let t = "1 MiB bandwidth, cellnet ipc vs raw TCP";
        push(
            compare(
                t,
                (&ipc_w, thr(r, &ipc_w, 1 << 20, true)),
                ("raw TCP", thr(r, "raw TCP", 1 << 20, true)),
                "MiB/s",
                0.8,
                false,
                true,
            ),
            t,
        );
    }
    if let Some(r) = &disc_r {
        let t = "local discovery of 32 instances after sockets bound";
        let row = r.points.iter().find(|p| p.instances == 32).map(|p| Row {
            target: t.into(),
            cellnet: "last bound -> all ready".into(),
            baseline: "-".into(),
            unit: "ms".into(),
            cellnet_value: p.bound_to_all_ready_ms,
            baseline_value: None,
            ratio: None,
            limit: "<= 200 ms".into(),
            pass: Some(p.bound_to_all_ready_ms.median <= 200.0),
        });
        push(
            row,
            "local discovery of 32 instances (not run with --quick)",
        );
    }
    if let Some(r) = &halo_r {
        let t = "halo frame time at 4 instances vs MPI";
        push(
            r.points.iter().find(|p| p.instances == 4).and_then(|p| {
                compare(
                    t,
                    ("cellnet life", Some(p.cellnet_frame_ms)),
                    ("MPI Isend/Irecv", Some(p.mpi_frame_ms)),
                    "ms",
                    3.0,
                    true,
                    false,
                )
            }),
            t,
        );
    }
    Summary {
        quick: opts.quick,
        reps: opts.reps,
        rows,
        missing,
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

/// Build, print and write `summary.json`.
pub fn write(opts: &BenchOpts) -> Result<(), BenchError> {
    let s = build(opts);
    super::write_json(&opts.out, "summary.json", &s)?;
    print(&s);
    Ok(())
}

/// Print the summary as a table on stdout.
pub fn print(s: &Summary) {
    println!(
        "\nsummary: cellnet / baseline, medians over {} reps [spread]{}",
        s.reps,
        if s.quick {
            " (QUICK: counts too small to judge)"
        } else {
            ""
        }
    );
    println!(
        "{:<54} {:>18} {:>18} {:>24} {:>9} {:>5}",
        "target", "cellnet", "baseline", "ratio [min–max]", "limit", ""
    );
    let f = |v: &Spread, u: &str| format!("{} {u}", fmt(v.median));
    for r in &s.rows {
        println!(
            "{:<54} {:>18} {:>18} {:>24} {:>9} {:>5}",
            r.target,
            f(&r.cellnet_value, &r.unit),
            r.baseline_value.map_or("-".into(), |b| f(&b, &r.unit)),
            r.ratio.map_or("-".into(), |x| format!(
                "{:.2} [{:.2}–{:.2}]",
                x.median, x.min, x.max
            )),
            r.limit,
            match r.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "info",
            }
        );
    }
    for m in &s.missing {
        println!("missing: {m}");
    }
    if !s.loadavg.is_empty() {
        println!("machine load (/proc/loadavg) at the end: {}", s.loadavg);
    }
}

fn fmt(v: f64) -> String {
    if v >= 1e5 {
        format!("{v:.3e}")
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
