//! Who owns what: block decomposition of a 2-D grid over all instances and
//! the neighbour sets derived from it. Pure and identical on every instance,
//! so nobody computes neighbours by hand.

use crate::proto::Rank;

/// Why a grid cannot be split as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    #[error("a {rows}x{cols} grid cannot be split over {parts} instances ({prows}x{pcols}): every instance needs at least one row and one column")]
    TooSmall {
        rows: usize,
        cols: usize,
        parts: u32,
        prows: u32,
        pcols: u32,
    },
    #[error("cannot partition over zero instances")]
    NoInstances,
}

/// A half-open range of rows and columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub row0: usize,
    pub rows: usize,
    pub col0: usize,
    pub cols: usize,
}

/// A `rows × cols` grid split into a `prows × pcols` grid of blocks, rank
/// `r` owning block `(r / pcols, r % pcols)`. Sizes differ by at most one
/// when the grid does not divide evenly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition2d {
    pub rows: usize,
    pub cols: usize,
    pub prows: u32,
    pub pcols: u32,
}

/// `(a, b)` with `a * b = n`, `a <= b`, as close to square as possible.
pub fn near_square(n: u32) -> (u32, u32) {
    let mut a = (n as f64).sqrt() as u32;
    while a > 1 && n % a != 0 {
        a -= 1;
    }
    let a = a.max(1);
    (a, n / a)
}

fn split(len: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = len / parts;
    let extra = len % parts;
    let start = i * base + i.min(extra);
    (start, base + usize::from(i < extra))
}

impl Partition2d {
    pub fn new(rows: usize, cols: usize, parts: u32) -> Result<Self, PartitionError> {
        if parts == 0 {
            return Err(PartitionError::NoInstances);
        }
        let (prows, pcols) = if rows <= cols {
            near_square(parts)
        } else {
            let (a, b) = near_square(parts);
            (b, a)
        };
        if rows < prows as usize || cols < pcols as usize {
            return Err(PartitionError::TooSmall {
                rows,
                cols,
                parts,
                prows,
                pcols,
            });
        }
        Ok(Self {
            rows,
            cols,
            prows,
            pcols,
        })
    }

    pub fn parts(&self) -> u32 {
        self.prows * self.pcols
    }

    pub fn block(&self, rank: Rank) -> Block {
        let (pi, pj) = ((rank / self.pcols) as usize, (rank % self.pcols) as usize);
        let (row0, rows) = split(self.rows, self.prows as usize, pi);
        let (col0, cols) = split(self.cols, self.pcols as usize, pj);
        Block {
            row0,
            rows,
            col0,
            cols,
        }
    }

    pub fn owner_of(&self, row: usize, col: usize) -> Option<Rank> {
        if row >= self.rows || col >= self.cols {
            return None;
        }
        let find = |len: usize, parts: u32, x: usize| {
            (0..parts).find(|&i| {
                let (s, n) = split(len, parts as usize, i as usize);
                x >= s && x < s + n
            })
        };
        Some(find(self.rows, self.prows, row)? * self.pcols + find(self.cols, self.pcols, col)?)
    }

    /// The (up to 8) instances whose blocks touch `rank`'s block, with the
    /// direction `(drow, dcol)` in `-1..=1` from `rank` to each.
    pub fn neighbours(&self, rank: Rank) -> Vec<(Rank, i32, i32)> {
        let (pi, pj) = ((rank / self.pcols) as i64, (rank % self.pcols) as i64);
        let mut out = Vec::with_capacity(8);
        for di in -1..=1i32 {
            for dj in -1..=1i32 {
                let (ni, nj) = (pi + di as i64, pj + dj as i64);
                if (di, dj) != (0, 0)
                    && ni >= 0
                    && nj >= 0
                    && ni < self.prows as i64
                    && nj < self.pcols as i64
                {
                    out.push(((ni as u32) * self.pcols + nj as u32, di, dj));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cell_has_exactly_one_owner_and_blocks_match() {
        for parts in [1u32, 2, 3, 4, 6, 7, 8, 12] {
            let p = Partition2d::new(37, 29, parts).unwrap();
            let mut owned = vec![0u32; 37 * 29];
            for r in 0..parts {
                let b = p.block(r);
                for i in b.row0..b.row0 + b.rows {
                    for j in b.col0..b.col0 + b.cols {
                        owned[i * 29 + j] += 1;
                        assert_eq!(p.owner_of(i, j), Some(r));
                    }
                }
            }
            assert!(owned.iter().all(|&c| c == 1), "parts {parts}");
        }
    }

    #[test]
    fn neighbours_are_symmetric_and_opposite() {
        let p = Partition2d::new(64, 64, 12).unwrap();
        for r in 0..12 {
            for (n, di, dj) in p.neighbours(r) {
                assert!(p.neighbours(n).contains(&(r, -di, -dj)));
            }
        }
        let q = Partition2d::new(512, 512, 4).unwrap();
        assert_eq!((q.prows, q.pcols), (2, 2));
        assert_eq!(q.neighbours(0), vec![(1, 0, 1), (2, 1, 0), (3, 1, 1)]);
    }

    #[test]
    fn too_many_instances_for_the_grid_is_an_error() {
        assert!(matches!(
            Partition2d::new(2, 2, 9),
            Err(PartitionError::TooSmall { .. })
        ));
        assert_eq!(Partition2d::new(2, 2, 0), Err(PartitionError::NoInstances));
    }
}
