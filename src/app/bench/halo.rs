//! `halo`: the main job's frame time (`cellnet life`) at 2, 4 and 8
//! instances beside the same halo exchange written directly with MPI
//! non-blocking send/receive into the same [`Tile`] code. Each N is one
//! `mpirun -n N cellnet bench halo-worker` job that runs both, alternating,
//! in the same processes with the same binding.

use std::time::{Duration, Instant};

use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use serde::{Deserialize, Serialize};

use super::{plot, BenchError, BenchOpts, Spread};
use crate::app::life::{self, initial, LifeParams, Tile};
use crate::config::Config;
use crate::launch;
use crate::partition::Partition2d;
use crate::place::{self, PlacementPolicy};
use crate::proto::JobKey;
use crate::runtime::Communicator;

type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Instance counts measured, each one `mpirun -n N` job.
pub const INSTANCES: [u32; 3] = [2, 4, 8];

/// What rank 0 of one halo-worker job reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaloRun {
    /// Ranks in the job.
    pub instances: u32,
    /// Cells per side of the square grid.
    pub grid: usize,
    /// Frames per run.
    pub frames: u64,
    /// Mean frame time through cellnet per repetition (ms).
    pub cellnet_frame_ms: Vec<f64>,
    /// Mean frame time through MPI per repetition (ms).
    pub mpi_frame_ms: Vec<f64>,
    /// Rank 0's binding, as printed.
    pub placement: String,
}

/// Frame times at one instance count, over the repetitions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaloPoint {
    /// Ranks in the job.
    pub instances: u32,
    /// Cells per side of the square grid.
    pub grid: usize,
    /// Frames per run.
    pub frames: u64,
    /// Mean frame time through cellnet (ms).
    pub cellnet_frame_ms: Spread,
    /// Mean frame time through MPI (ms).
    pub mpi_frame_ms: Spread,
    /// Rank 0's binding, as printed.
    pub placement: String,
}

/// What `bench halo` writes to `halo.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaloReport {
    /// Always `halo`.
    pub bench: String,
    /// Whether this was a `--quick` run (tiny counts, not a measurement).
    pub quick: bool,
    /// Repetitions per point.
    pub reps: u32,
    /// Conditions worth knowing when reading the numbers.
    pub notes: Vec<String>,
    /// One point per instance count, ascending.
    pub points: Vec<HaloPoint>,
}

fn failed(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

/// Direction code of `(di, dj)` for MPI tags.
fn tag(di: i32, dj: i32) -> i32 {
    (di + 1) * 3 + (dj + 1)
}

/// The halo exchange with MPI `Isend`/`Irecv`; returns the mean frame time
/// and this rank's block at the end.
fn mpi_life(world: &SimpleCommunicator, part: &Partition2d, p: &LifeParams) -> (Duration, Tile) {
    let rank = world.rank() as u32;
    let b = part.block(rank);
    let ([row0, col0], [rows, cols]) = (b.start, b.len);
    let neighbours: Vec<(u32, i32, i32)> = part
        .neighbours(rank)
        .iter()
        .map(|n| (n.rank, n.offset[0], n.offset[1]))
        .collect();
    let mut tile = Tile::new(rows, cols, |i, j| initial(p.seed, row0 + i, col0 + j));
    let mut bufs: Vec<Vec<u8>> = neighbours
        .iter()
        .map(|&(_, di, dj)| vec![0u8; tile.halo_len(di, dj)])
        .collect();
    world.barrier();
    let start = Instant::now();
    for _ in 0..p.frames {
        let edges: Vec<Vec<u8>> = neighbours
            .iter()
            .map(|&(_, di, dj)| tile.edge_bytes(di, dj))
            .collect();
        mpi::request::scope(|scope| {
            let recvs: Vec<_> = neighbours
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&(n, di, dj), buf)| {
                    // The neighbour sent its edge facing us: direction (-di, -dj).
                    world
                        .process_at_rank(n as i32)
                        .immediate_receive_into_with_tag(scope, &mut buf[..], tag(-di, -dj))
                })
                .collect();
            let sends: Vec<_> = neighbours
                .iter()
                .zip(edges.iter())
                .map(|(&(n, di, dj), e)| {
                    world.process_at_rank(n as i32).immediate_send_with_tag(
                        scope,
                        &e[..],
                        tag(di, dj),
                    )
                })
                .collect();
            for r in recvs {
                r.wait();
            }
            for s in sends {
                s.wait();
            }
        });
        for (&(_, di, dj), buf) in neighbours.iter().zip(&bufs) {
            tile.set_halo(di, dj, buf);
        }
        tile.step();
    }
    (start.elapsed() / p.frames.max(1) as u32, tile)
}

/// The MPI version computes what the serial run computes (checked once,
/// so the baseline is known to do the same work).
fn check_against_serial(part: &Partition2d, rank: u32, p: &LifeParams, tile: &Tile) -> Result<()> {
    let reference = life::serial(p.rows, p.cols, p.frames, p.seed);
    let b = part.block(rank);
    let ([row0, col0], [rows, cols]) = (b.start, b.len);
    for i in 0..rows {
        for j in 0..cols {
            if tile.get(i, j) != reference[(row0 + i) * p.cols + col0 + j] {
                return Err(BenchError::Failed(format!(
                    "MPI halo baseline differs from the serial run on rank {rank} at ({}, {})",
                    row0 + i,
                    col0 + j
                )));
            }
        }
    }
    Ok(())
}

/// Under `mpirun -n N`: alternate cellnet life and the MPI version.
pub fn worker(config: Config, opts: &BenchOpts) -> Result<()> {
    let (info, mpi) =
        launch::detect(config.launch).map_err(|e| BenchError::Usage(e.to_string()))?;
    let Some(mpi) = mpi else {
        return Err(BenchError::Usage("halo-worker runs under mpirun".into()));
    };
    let binding = match config.placement {
        PlacementPolicy::None => place::current_binding(PlacementPolicy::None),
        p => place::apply(p, info.local_rank, info.local_size),
    }
    .map_err(failed)?;
    // Both versions run with the allocator settings cellnet runs with.
    if config.malloc_tune {
        crate::runtime::tune_malloc();
    }
    let world = mpi.world();
    let rank = info.rank;
    let part = Partition2d::new([opts.grid, opts.grid], info.size)
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    let params = LifeParams {
        rows: opts.grid,
        cols: opts.grid,
        frames: opts.frames,
        seed: 1,
        frame_timeout: Duration::from_secs(60),
        quiet: true,
        checkpoint: None,
        frame_delay: Duration::ZERO,
    };
    let mut run = HaloRun {
        instances: info.size,
        grid: opts.grid,
        frames: opts.frames,
        cellnet_frame_ms: Vec::new(),
        mpi_frame_ms: Vec::new(),
        placement: format!("rank 0: {binding}"),
    };
    for rep in 0..opts.reps {
        let mut ports = [0u64; 2];
        if rank == 0 {
            ports = [
                super::free_udp_port()? as u64,
                super::free_udp_port()? as u64,
            ];
        }
        world.process_at_rank(0).broadcast_into(&mut ports[..]);
        let mut c = config.clone();
        c.discovery_port = ports[0] as u16;
        c.coordinator = Some(format!("127.0.0.1:{}", ports[1]));
        c.bind_ip = Some(std::net::Ipv4Addr::LOCALHOST.into());
        let mut i = info.clone();
        i.job_key = JobKey(info.job_key.0 ^ (rep as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let comm = Communicator::builder()
            .config(c)
            .launch_info(i)
            .handler(life::handler(part.clone(), rank, params.frames))
            .start()
            .map_err(|e| BenchError::Failed(format!("cellnet start: {e}")))?;
        world.barrier();
        let report = life::run(&comm, &params, None).map_err(failed)?;
        comm.shutdown().map_err(failed)?;
        run.cellnet_frame_ms
            .push(report.elapsed.as_secs_f64() * 1e3 / params.frames.max(1) as f64);
        world.barrier();
        let (frame_time, tile) = mpi_life(&world, &part, &params);
        run.mpi_frame_ms.push(frame_time.as_secs_f64() * 1e3);
        if rep == 0 {
            check_against_serial(&part, rank, &params, &tile)?;
        }
        world.barrier();
        if rank == 0 {
            println!(
                "@progress {} {} {} instances rep {}",
                rep + 1,
                opts.reps,
                info.size,
                rep + 1
            );
        }
    }
    if rank == 0 {
        println!("@halo {}", serde_json::to_string(&run).map_err(failed)?);
    }
    Ok(())
}

/// Driver: one mpirun job per instance count; table, JSON and plot.
pub fn drive(opts: &BenchOpts) -> Result<HaloReport> {
    let (grid, frames) = if opts.quick { (64, 10) } else { (512, 100) };
    let bar = super::bar(opts.reps as u64, "halo");
    let mut points = Vec::new();
    for &n in &INSTANCES {
        let args: Vec<String> = [
            "bench",
            "halo-worker",
            "--reps",
            &opts.reps.to_string(),
            "--grid",
            &grid.to_string(),
            "--frames",
            &frames.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let limit = Duration::from_secs(if opts.quick { 240 } else { 1200 });
        let mut got = None;
        bar.set_prefix(format!("halo n={n}"));
        super::stream(
            super::mpirun(n, &args, limit),
            &bar,
            &format!("mpirun -n {n} cellnet bench halo-worker"),
            |l| match l.strip_prefix("@halo ") {
                Some(j) => got = serde_json::from_str::<HaloRun>(j).ok(),
                None => bar.suspend(|| println!("{l}")),
            },
        )?;
        let run = got.ok_or_else(|| {
            BenchError::Failed(format!("halo with {n} instances reported nothing"))
        })?;
        points.push(HaloPoint {
            instances: n,
            grid: run.grid,
            frames: run.frames,
            cellnet_frame_ms: Spread::of(&run.cellnet_frame_ms),
            mpi_frame_ms: Spread::of(&run.mpi_frame_ms),
            placement: run.placement,
        });
    }
    bar.finish_and_clear();
    let report = HaloReport {
        bench: "halo".into(),
        quick: opts.quick,
        reps: opts.reps,
        notes: vec![
            format!("Game of Life {grid}x{grid}, {frames} frames per repetition; frame time = elapsed / frames on rank 0"),
            "cellnet: cellnet life (send halos, end_frame, recv_frame, wait ACKs); MPI: Isend/Irecv of the same edges into the same Tile code".into(),
            "both in the same mpirun job, alternating per repetition, same binding; ranks > cores are oversubscribed".into(),
            "MPI waits busy-poll (OpenMPI yields only when oversubscribed), cellnet waits block: on a machine shared with other work the spinning ranks lose CPU to it, so compare at a quiet moment".into(),
        ],
        points,
    };
    super::write_json(&opts.out, "halo.json", &report)?;
    println!(
        "\nhalo: frame time, {} (ms; median [min–max])",
        super::reps_label(report.reps, report.quick)
    );
    println!(
        "{:>9} {:>26} {:>26} {:>8}",
        "instances", "cellnet life", "MPI Isend/Irecv", "ratio"
    );
    for p in &report.points {
        println!(
            "{:>9} {:>26} {:>26} {:>8.2}",
            p.instances,
            p.cellnet_frame_ms.label(3),
            p.mpi_frame_ms.label(3),
            p.cellnet_frame_ms.median / p.mpi_frame_ms.median.max(1e-12)
        );
    }
    let line = |name: &str, pick: fn(&HaloPoint) -> Spread| plot::Line {
        name: name.into(),
        points: report
            .points
            .iter()
            .map(|p| (p.instances as f64, pick(p)))
            .collect(),
    };
    plot::draw(
        &opts.out.join("halo.png"),
        &plot::Axes {
            title: "Halo exchange frame time (Game of Life), median, bars min-max",
            x: "instances",
            y: "ms per frame",
            log_x: true,
            log_y: false,
            x_bytes: false,
        },
        &[
            line("cellnet life", |p| p.cellnet_frame_ms),
            line("MPI Isend/Irecv", |p| p.mpi_frame_ms),
        ],
    )?;
    Ok(report)
}
