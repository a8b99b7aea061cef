//! The main job: Conway's Game of Life on a block-partitioned grid, halos
//! exchanged through cellnet every frame, the final grid gathered on rank 0
//! and compared bit for bit with a serial run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::checkpoint::{Checkpoint, CheckpointError, CheckpointId};
use crate::partition::Partition2d;
use crate::proto::{reliable::Outcome, Rank};
use crate::runtime::{Communicator, HandlerError, PeerEvent, Ticket};

/// Parameters of a run (the same on every instance).
#[derive(Clone, Debug)]
pub struct LifeParams {
    /// Rows of the global grid.
    pub rows: usize,
    /// Columns of the global grid.
    pub cols: usize,
    /// Generations to run (one frame each).
    pub frames: u64,
    /// Seed of the initial soup (see [`initial`]).
    pub seed: u64,
    /// How long to wait for a frame before declaring it missing.
    pub frame_timeout: Duration,
    /// No per-frame lines on rank 0.
    pub quiet: bool,
    /// Write this instance's checkpoint to `DIR/rank-R` after every frame.
    pub checkpoint: Option<PathBuf>,
    /// Sleep this long after every frame (stands in for compute time).
    pub frame_delay: Duration,
}

impl LifeParams {
    /// What a checkpoint of `rank` in `size` instances must match.
    pub fn checkpoint_id(&self, rank: Rank, size: u32) -> CheckpointId {
        CheckpointId {
            rank,
            size,
            rows: self.rows as u64,
            cols: self.cols as u64,
            seed: self.seed,
        }
    }
}

/// What a run ended with.
#[derive(Debug, thiserror::Error)]
pub enum LifeError {
    /// The grid cannot be split over the instances.
    #[error(transparent)]
    Partition(#[from] crate::partition::PartitionError),
    /// A cell or frame end could not be sent.
    #[error("send failed: {0}")]
    Send(#[from] crate::runtime::SendError),
    /// A frame did not arrive (missing neighbours are named).
    #[error("receive failed: {0}")]
    Recv(#[from] crate::runtime::RecvError),
    /// A neighbour answered a halo cell with ERR or it timed out.
    #[error("cell to rank {to} was not acknowledged: {outcome:?}")]
    NotAcked {
        /// The neighbour.
        to: Rank,
        /// Its answer.
        outcome: Outcome,
    },
    /// A cell of the wrong size for the halo or block it should fill.
    #[error("rank {from} sent {got} bytes for frame {frame}, expected {want}")]
    BadCell {
        /// The sender.
        from: Rank,
        /// The frame it came in.
        frame: u64,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A checkpoint could not be written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The gathered grid differs from the serial run (the first differing cell).
    #[error("MISMATCH: distributed grid differs from the serial run at row {row}, column {col}")]
    Mismatch {
        /// Row in the global grid.
        row: usize,
        /// Column in the global grid.
        col: usize,
    },
}

/// The initial state: a deterministic pseudo-random soup, ~30% alive.
pub fn initial(seed: u64, row: usize, col: usize) -> u8 {
    let mut x = seed ^ ((row as u64) << 32 | col as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    u8::from(x % 100 < 30)
}

fn rule(alive: u8, n: u8) -> u8 {
    u8::from(n == 3 || (alive == 1 && n == 2))
}

/// A block of the grid with a one-cell halo all around (dead outside the
/// global grid).
pub struct Tile {
    /// Interior rows (the block's, halo excluded).
    pub rows: usize,
    /// Interior columns (the block's, halo excluded).
    pub cols: usize,
    cells: Vec<u8>,
    next: Vec<u8>,
}

impl Tile {
    /// A `rows × cols` interior with `init(i, j)` (0 or 1) per cell and dead halos.
    pub fn new(rows: usize, cols: usize, init: impl Fn(usize, usize) -> u8) -> Self {
        let mut cells = vec![0u8; (rows + 2) * (cols + 2)];
        for i in 0..rows {
            for j in 0..cols {
                cells[(i + 1) * (cols + 2) + j + 1] = init(i, j);
            }
        }
        let next = cells.clone();
        Self {
            rows,
            cols,
            cells,
            next,
        }
    }

    fn idx(&self, i: isize, j: isize) -> usize {
        ((i + 1) as usize) * (self.cols + 2) + (j + 1) as usize
    }

    /// Interior cell `(i, j)`: 1 alive, 0 dead.
    pub fn get(&self, i: usize, j: usize) -> u8 {
        self.cells[self.idx(i as isize, j as isize)]
    }

    /// Rows and columns of the interior that face direction `(di, dj)`.
    fn edge(&self, di: i32, dj: i32) -> (std::ops::Range<isize>, std::ops::Range<isize>) {
        let r = |d: i32, n: usize| match d {
            -1 => 0..1,
            1 => n as isize - 1..n as isize,
            _ => 0..n as isize,
        };
        (r(di, self.rows), r(dj, self.cols))
    }

    /// Halo cells on side `(di, dj)`, which a neighbour's edge fills.
    fn halo(&self, di: i32, dj: i32) -> (std::ops::Range<isize>, std::ops::Range<isize>) {
        let r = |d: i32, n: usize| match d {
            -1 => -1..0,
            1 => n as isize..n as isize + 1,
            _ => 0..n as isize,
        };
        (r(di, self.rows), r(dj, self.cols))
    }

    /// Cells in the halo on side `(di, dj)`: what that neighbour's cell must hold.
    pub fn halo_len(&self, di: i32, dj: i32) -> usize {
        let (a, b) = self.halo(di, dj);
        a.len() * b.len()
    }

    /// The cells this tile sends to its neighbour in direction `(di, dj)`.
    pub fn edge_bytes(&self, di: i32, dj: i32) -> Vec<u8> {
        let (rows, cols) = self.edge(di, dj);
        let mut out = Vec::with_capacity(rows.len() * cols.len());
        for i in rows {
            for j in cols.clone() {
                out.push(self.cells[self.idx(i, j)]);
            }
        }
        out
    }

    /// Fill the halo on side `(di, dj)` with what that neighbour sent.
    pub fn set_halo(&mut self, di: i32, dj: i32, bytes: &[u8]) {
        let (rows, cols) = self.halo(di, dj);
        let mut k = 0;
        for i in rows {
            for j in cols.clone() {
                let idx = self.idx(i, j);
                self.cells[idx] = bytes.get(k).copied().unwrap_or(0);
                k += 1;
            }
        }
    }

    /// One generation of the interior.
    pub fn step(&mut self) {
        let w = self.cols + 2;
        for i in 1..=self.rows {
            let (up, mid, down) = ((i - 1) * w, i * w, (i + 1) * w);
            for j in 1..=self.cols {
                let c = &self.cells;
                let n = c[up + j - 1]
                    + c[up + j]
                    + c[up + j + 1]
                    + c[mid + j - 1]
                    + c[mid + j + 1]
                    + c[down + j - 1]
                    + c[down + j]
                    + c[down + j + 1];
                self.next[mid + j] = rule(c[mid + j], n);
            }
        }
        std::mem::swap(&mut self.cells, &mut self.next);
    }

    /// The interior, row-major, halo excluded.
    pub fn interior(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.push(self.get(i, j));
            }
        }
        out
    }
}

/// The same simulation in one process: the reference.
pub fn serial(rows: usize, cols: usize, frames: u64, seed: u64) -> Vec<u8> {
    let mut t = Tile::new(rows, cols, |i, j| initial(seed, i, j));
    for _ in 0..frames {
        t.step();
    }
    t.interior()
}

/// FNV-1a, to print a short fingerprint of a grid.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Byte count each neighbour must send, for the cell handler to check.
pub fn expected_halo_sizes(part: &Partition2d, rank: Rank) -> HashMap<Rank, usize> {
    let b = part.block(rank);
    let t = Tile {
        rows: b.len[0],
        cols: b.len[1],
        cells: Vec::new(),
        next: Vec::new(),
    };
    part.neighbours(rank)
        .into_iter()
        .map(|n| (n.rank, t.halo_len(n.offset[0], n.offset[1])))
        .collect()
}

/// The cell handler of the main job: a halo of the wrong size is refused
/// with an ERR the sender sees; the final frame carries whole blocks.
pub fn handler(
    part: Partition2d,
    rank: Rank,
    frames: u64,
) -> impl Fn(&crate::runtime::Cell) -> Result<(), HandlerError> + Send + Sync + 'static {
    let halos = expected_halo_sizes(&part, rank);
    move |cell| {
        let want = if cell.frame == frames {
            part.block(cell.from).cells()
        } else {
            halos.get(&cell.from).copied().unwrap_or(usize::MAX)
        };
        if cell.payload.len() == want {
            Ok(())
        } else {
            Err(HandlerError::new(
                1,
                format!(
                    "expected {want} bytes from rank {}, got {}",
                    cell.from,
                    cell.payload.len()
                ),
            ))
        }
    }
}

/// Summary printed by rank 0.
#[derive(Debug)]
pub struct LifeReport {
    /// Wall time of the frames (the final gather excluded).
    pub elapsed: Duration,
    /// Cell updates per second of the whole grid over `elapsed`.
    pub cells_per_sec: f64,
    /// Rank 0 only: [`checksum`] of the gathered grid once it matched the serial run.
    pub checksum: Option<u64>,
}

fn wait_acks(tickets: Vec<Ticket>) -> Result<(), LifeError> {
    for t in tickets {
        match t.wait()? {
            Outcome::Ack => {}
            outcome => {
                return Err(LifeError::NotAcked {
                    to: t.to(),
                    outcome,
                })
            }
        }
    }
    Ok(())
}

/// Print the restarts and losses of peers `comm` has seen since the last
/// call (tests and operators look for these lines).
fn report_peer_events(comm: &Communicator) {
    for e in comm.events() {
        match e {
            PeerEvent::Restarted { rank, incarnation } => println!(
                "cellnet life: rank {} sees rank {rank} restarted (incarnation {incarnation:#x}); resent its latest frames",
                comm.rank()
            ),
            PeerEvent::Lost { rank } => println!(
                "cellnet life: rank {} lost rank {rank} (silent past CELLNET_DEAD_AFTER); waiting for it to restart",
                comm.rank()
            ),
            _ => {}
        }
    }
}

/// Run the distributed simulation on `comm` (whose handler must be
/// [`handler`] with the same parameters), from frame 0 or from `resume`
/// (then `comm` must have been built with
/// [`first_frame`](crate::runtime::Builder::first_frame)`(resume.frame)`).
///
/// With [`LifeParams::checkpoint`], the checkpoint of frame `f + 1` is
/// written only after every cell of frame `f` is acknowledged: a restart
/// from it never needs to send frame `f` again, and the neighbours, which
/// are at most one frame ahead, replay frames `f + 1` and `f + 2` to it.
pub fn run(
    comm: &Communicator,
    p: &LifeParams,
    resume: Option<&Checkpoint>,
) -> Result<LifeReport, LifeError> {
    let (rank, size) = (comm.rank(), comm.size());
    let part = Partition2d::new([p.rows, p.cols], size)?;
    let block = part.block(rank);
    let ([row0, col0], [rows, cols]) = (block.start, block.len);
    let neighbours: Vec<(Rank, i32, i32)> = part
        .neighbours(rank)
        .iter()
        .map(|n| (n.rank, n.offset[0], n.offset[1]))
        .collect();
    let peers: Vec<Rank> = neighbours.iter().map(|n| n.0).collect();
    comm.expect_from(peers.iter().copied())?;
    if rank == 0 {
        comm.expect_from_frame(p.frames, 1..size)?;
    }
    let (first, mut tile) = match resume {
        Some(c) => (
            c.frame,
            Tile::new(rows, cols, |i, j| {
                c.cells.get(i * cols + j).copied().unwrap_or(0)
            }),
        ),
        None => (
            0,
            Tile::new(rows, cols, |i, j| initial(p.seed, row0 + i, col0 + j)),
        ),
    };
    let id = p.checkpoint_id(rank, size);
    let start = Instant::now();
    let mut last = start;
    for frame in first..p.frames {
        let mut tickets = Vec::with_capacity(peers.len() * 2);
        for &(n, di, dj) in &neighbours {
            tickets.push(comm.send(n, frame, tile.edge_bytes(di, dj))?);
        }
        tickets.extend(comm.end_frame(frame, &peers)?);
        let received = comm.recv_frame(p.frame_timeout)?;
        for &(n, di, dj) in &neighbours {
            let cells = received.get(&n).map(|v| v.as_slice()).unwrap_or(&[]);
            let bytes = cells.first().map(|b| b.as_ref()).unwrap_or(&[]);
            let want = tile.halo_len(di, dj);
            if cells.len() != 1 || bytes.len() != want {
                return Err(LifeError::BadCell {
                    from: n,
                    frame,
                    got: bytes.len(),
                    want,
                });
            }
            tile.set_halo(di, dj, bytes);
        }
        tile.step();
        wait_acks(tickets)?;
        if !p.frame_delay.is_zero() {
            std::thread::sleep(p.frame_delay);
        }
        if let Some(dir) = &p.checkpoint {
            Checkpoint {
                id,
                frame: frame + 1,
                block_rows: rows,
                block_cols: cols,
                cells: tile.interior(),
            }
            .save(dir)?;
        }
        report_peer_events(comm);
        if rank == 0 && !p.quiet {
            let now = Instant::now();
            let dt = now - last;
            last = now;
            println!(
                "frame {:>5}/{}  {:>8.3} ms  {:>10.3e} cells/s",
                frame + 1,
                p.frames,
                dt.as_secs_f64() * 1e3,
                (p.rows * p.cols) as f64 / dt.as_secs_f64().max(1e-9)
            );
        }
    }
    let elapsed = start.elapsed();
    let cells_per_sec = (p.rows * p.cols) as f64 * (p.frames - first.min(p.frames)) as f64
        / elapsed.as_secs_f64().max(1e-9);
    // Gather: every block goes to rank 0 as a cell of frame `frames`.
    if rank != 0 {
        let t = comm.send(0, p.frames, tile.interior())?;
        let mut tickets = comm.end_frame(p.frames, &[0])?;
        tickets.insert(0, t);
        wait_acks(tickets)?;
        return Ok(LifeReport {
            elapsed,
            cells_per_sec,
            checksum: None,
        });
    }
    let mut grid = vec![0u8; p.rows * p.cols];
    let mut place = |r: Rank, block: &[u8]| {
        let b = part.block(r);
        let ([row0, col0], [rows, cols]) = (b.start, b.len);
        for i in 0..rows {
            let dst = (row0 + i) * p.cols + col0;
            grid[dst..dst + cols].copy_from_slice(&block[i * cols..(i + 1) * cols]);
        }
    };
    place(0, &tile.interior());
    if size > 1 {
        let gathered = comm.recv_frame(p.frame_timeout)?;
        for r in 1..size {
            let block = gathered
                .get(&r)
                .and_then(|v| v.first())
                .map(|b| b.as_ref())
                .unwrap_or(&[]);
            let want = part.block(r).cells();
            if block.len() != want {
                return Err(LifeError::BadCell {
                    from: r,
                    frame: p.frames,
                    got: block.len(),
                    want,
                });
            }
            place(r, block);
        }
    }
    let reference = serial(p.rows, p.cols, p.frames, p.seed);
    if let Some(k) = (0..grid.len()).find(|&k| grid[k] != reference[k]) {
        return Err(LifeError::Mismatch {
            row: k / p.cols,
            col: k % p.cols,
        });
    }
    Ok(LifeReport {
        elapsed,
        cells_per_sec,
        checksum: Some(checksum(&grid)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blinker_blinks() {
        let mut t = Tile::new(5, 5, |i, j| u8::from(i == 2 && (1..=3).contains(&j)));
        t.step();
        let v: Vec<_> = (0..5).map(|i| t.get(i, 2)).collect();
        assert_eq!(v, vec![0, 1, 1, 1, 0]);
        t.step();
        assert_eq!(
            (0..5).map(|j| t.get(2, j)).collect::<Vec<_>>(),
            vec![0, 1, 1, 1, 0]
        );
    }

    /// Halo exchange done by hand between tiles equals the serial run: the
    /// partition/halo geometry is right before any network is involved.
    #[test]
    fn tiles_with_exchanged_halos_match_the_serial_run() {
        let (rows, cols, frames, seed) = (23, 31, 12, 5);
        for parts in [1u32, 2, 3, 4, 6] {
            let part = Partition2d::new([rows, cols], parts).unwrap();
            let mut tiles: Vec<Tile> = (0..parts)
                .map(|r| {
                    let b = part.block(r);
                    Tile::new(b.len[0], b.len[1], |i, j| {
                        initial(seed, b.start[0] + i, b.start[1] + j)
                    })
                })
                .collect();
            for _ in 0..frames {
                let mut msgs = Vec::new();
                for r in 0..parts {
                    for n in part.neighbours(r) {
                        let [di, dj] = n.offset;
                        msgs.push((n.rank, -di, -dj, tiles[r as usize].edge_bytes(di, dj)));
                    }
                }
                for (n, di, dj, bytes) in msgs {
                    tiles[n as usize].set_halo(di, dj, &bytes);
                }
                tiles.iter_mut().for_each(Tile::step);
            }
            let reference = serial(rows, cols, frames, seed);
            for r in 0..parts {
                let b = part.block(r);
                for i in 0..b.len[0] {
                    for j in 0..b.len[1] {
                        assert_eq!(
                            tiles[r as usize].get(i, j),
                            reference[(b.start[0] + i) * cols + b.start[1] + j],
                            "parts {parts}"
                        );
                    }
                }
            }
        }
    }
}
