//! Who owns what: block decomposition of a D-dimensional grid over all
//! instances and the neighbour sets derived from it. Pure and identical on
//! every instance, so no application computes neighbours by hand.

use crate::proto::Rank;

/// Why a grid cannot be split as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    /// Some axis has fewer cells than instances along it in every factorization.
    #[error("a grid of shape {shape:?} cannot be split over {parts} instances: every instance needs at least one cell along every axis")]
    TooSmall {
        /// The grid's cells per axis.
        shape: Vec<usize>,
        /// The instances asked for.
        parts: u32,
    },
    /// Zero instances were asked for.
    #[error("cannot partition over zero instances")]
    NoInstances,
}

/// The cells one instance owns: `start[d] .. start[d] + len[d]` on axis `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block<const D: usize> {
    /// First cell of the block on each axis.
    pub start: [usize; D],
    /// Cells of the block on each axis (at least 1).
    pub len: [usize; D],
}

impl<const D: usize> Block<D> {
    /// Number of cells in the block.
    pub fn cells(&self) -> usize {
        self.len.iter().product()
    }
}

/// A neighbour of an instance: its rank and the direction (each component
/// in `-1..=1`) from the instance's block to the neighbour's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour<const D: usize> {
    /// The neighbour's rank.
    pub rank: Rank,
    /// Direction from this block to the neighbour's, each component in `-1..=1`.
    pub offset: [i32; D],
}

/// A grid of `shape` split into a `procs` grid of blocks, row-major (the
/// last axis varies fastest). Block sizes along an axis differ by at most
/// one when the grid does not divide evenly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPartition<const D: usize> {
    /// Cells of the grid per axis.
    pub shape: [usize; D],
    /// Blocks per axis; their product is the number of instances.
    pub procs: [u32; D],
    /// Axes that wrap around (a torus along them).
    pub periodic: [bool; D],
}

/// A 2-D grid split into blocks.
pub type Partition2d = BlockPartition<2>;
/// A 3-D grid split into blocks.
pub type Partition3d = BlockPartition<3>;

/// Start and length of part `i` of `parts` over `len` cells.
fn split(len: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = len / parts;
    let extra = len % parts;
    (i * base + i.min(extra), base + usize::from(i < extra))
}

/// Which part of `parts` over `len` cells holds cell `x` (the inverse of
/// [`split`]; needs `parts <= len`).
fn part_of(len: usize, parts: usize, x: usize) -> usize {
    let base = len / parts;
    let extra = len % parts;
    let big = extra * (base + 1);
    if x < big {
        x / (base + 1)
    } else {
        extra + (x - big) / base
    }
}

/// All ways to write `n` as an ordered product of `D` factors.
fn factorizations<const D: usize>(n: u32) -> Vec<[u32; D]> {
    fn go(n: u32, axis: usize, cur: &mut Vec<u32>, d: usize, out: &mut Vec<Vec<u32>>) {
        if axis + 1 == d {
            cur.push(n);
            out.push(cur.clone());
            cur.pop();
            return;
        }
        for f in (1..=n).filter(|f| n % f == 0) {
            cur.push(f);
            go(n / f, axis + 1, cur, d, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    if D > 0 {
        go(n, 0, &mut Vec::new(), D, &mut out);
    }
    out.into_iter().filter_map(|v| v.try_into().ok()).collect()
}

impl<const D: usize> BlockPartition<D> {
    /// Split `shape` over `parts` instances, choosing the process grid
    /// that fits (no axis split finer than its cells) and exchanges the
    /// fewest halo cells; non-periodic.
    pub fn new(shape: [usize; D], parts: u32) -> Result<Self, PartitionError> {
        if parts == 0 {
            return Err(PartitionError::NoInstances);
        }
        let halo = |procs: &[u32; D]| -> f64 {
            // Surface of one block, summed over axes.
            let sides: Vec<f64> = (0..D).map(|d| shape[d] as f64 / procs[d] as f64).collect();
            (0..D)
                .map(|d| {
                    (0..D)
                        .filter(|&e| e != d)
                        .map(|e| sides[e])
                        .product::<f64>()
                })
                .sum()
        };
        let best = factorizations::<D>(parts)
            .into_iter()
            .filter(|p| (0..D).all(|d| p[d] as usize <= shape[d]))
            .min_by(|a, b| halo(a).total_cmp(&halo(b)).then(b.cmp(a)));
        match best {
            Some(procs) => Ok(Self {
                shape,
                procs,
                periodic: [false; D],
            }),
            None => Err(PartitionError::TooSmall {
                shape: shape.to_vec(),
                parts,
            }),
        }
    }

    /// The same partition with wrap-around along the given axes.
    pub fn with_periodic(mut self, periodic: [bool; D]) -> Self {
        self.periodic = periodic;
        self
    }

    /// Number of blocks (instances), the product of `procs`.
    pub fn parts(&self) -> u32 {
        self.procs.iter().product()
    }

    /// Position of `rank` in the process grid.
    pub fn coords(&self, rank: Rank) -> [u32; D] {
        let mut c = [0u32; D];
        let mut r = rank;
        for d in (0..D).rev() {
            c[d] = r % self.procs[d];
            r /= self.procs[d];
        }
        c
    }

    /// The rank at position `coords` of the process grid (inverse of [`Self::coords`]).
    pub fn rank_at(&self, coords: [u32; D]) -> Rank {
        coords
            .iter()
            .zip(self.procs.iter())
            .fold(0, |r, (c, p)| r * p + c)
    }

    /// The cells `rank` owns.
    pub fn block(&self, rank: Rank) -> Block<D> {
        let c = self.coords(rank);
        let parts: [(usize, usize); D] =
            std::array::from_fn(|d| split(self.shape[d], self.procs[d] as usize, c[d] as usize));
        Block {
            start: parts.map(|p| p.0),
            len: parts.map(|p| p.1),
        }
    }

    /// The instance owning `cell`, or `None` outside the grid.
    pub fn owner_of(&self, cell: [usize; D]) -> Option<Rank> {
        let mut c = [0u32; D];
        for d in 0..D {
            if cell[d] >= self.shape[d] {
                return None;
            }
            c[d] = part_of(self.shape[d], self.procs[d] as usize, cell[d]) as u32;
        }
        Some(self.rank_at(c))
    }

    /// The instances whose blocks touch `rank`'s block (faces, edges and
    /// corners: up to 3^D - 1), one entry per direction. With periodic axes
    /// a rank can appear in several directions; `rank` itself never does.
    pub fn neighbours(&self, rank: Rank) -> Vec<Neighbour<D>> {
        let c = self.coords(rank);
        let mut out = Vec::new();
        let total = 3usize.pow(D as u32);
        'dirs: for k in 0..total {
            let mut offset = [0i32; D];
            let mut kk = k;
            for d in (0..D).rev() {
                offset[d] = (kk % 3) as i32 - 1;
                kk /= 3;
            }
            if offset.iter().all(|&o| o == 0) {
                continue;
            }
            let mut n = [0u32; D];
            for d in 0..D {
                let p = self.procs[d] as i64;
                let mut x = c[d] as i64 + offset[d] as i64;
                if x < 0 || x >= p {
                    if !self.periodic[d] {
                        continue 'dirs;
                    }
                    x = x.rem_euclid(p);
                }
                n[d] = x as u32;
            }
            let r = self.rank_at(n);
            if r != rank {
                out.push(Neighbour { rank: r, offset });
            }
        }
        out
    }

    /// Distinct neighbour ranks, sorted: whom `rank` sends to and expects
    /// from every frame.
    pub fn neighbour_ranks(&self, rank: Rank) -> Vec<Rank> {
        let mut v: Vec<Rank> = self.neighbours(rank).iter().map(|n| n.rank).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn four_instances_on_a_square_grid_are_two_by_two() {
        let p = Partition2d::new([512, 512], 4).unwrap();
        assert_eq!(p.procs, [2, 2]);
        let n: Vec<_> = p.neighbours(0).iter().map(|n| (n.rank, n.offset)).collect();
        assert_eq!(n, vec![(1, [0, 1]), (2, [1, 0]), (3, [1, 1])]);
        assert_eq!(
            p.block(3),
            Block {
                start: [256, 256],
                len: [256, 256]
            }
        );
    }

    #[test]
    fn more_instances_than_rows_split_the_other_axis() {
        let p = Partition2d::new([3, 100], 7).unwrap();
        assert_eq!(p.procs, [1, 7]);
        assert!(matches!(
            Partition2d::new([2, 2], 5),
            Err(PartitionError::TooSmall { .. })
        ));
        assert_eq!(
            Partition2d::new([2, 2], 0),
            Err(PartitionError::NoInstances)
        );
    }

    #[test]
    fn periodic_axes_wrap_and_never_list_self() {
        let p = Partition2d::new([4, 8], 2)
            .unwrap()
            .with_periodic([true, true]);
        assert_eq!(p.procs, [1, 2]);
        assert_eq!(p.neighbour_ranks(0), vec![1]);
        // Along the axis of two blocks, both sides are the same neighbour.
        assert!(
            p.neighbours(0)
                .iter()
                .filter(|n| n.offset == [0, 1] || n.offset == [0, -1])
                .count()
                == 2
        );
        let q = Partition3d::new([30, 30, 30], 27)
            .unwrap()
            .with_periodic([true; 3]);
        assert_eq!(q.procs, [3, 3, 3]);
        assert_eq!(q.neighbours(13).len(), 26);
        assert_eq!(q.neighbour_ranks(0).len(), 26);
    }

    fn check<const D: usize>(p: &BlockPartition<D>) -> Result<(), TestCaseError> {
        // Every cell exactly one owner, and owner_of agrees with block().
        let total: usize = (0..p.parts()).map(|r| p.block(r).cells()).sum();
        prop_assert_eq!(total, p.shape.iter().product::<usize>());
        for r in 0..p.parts() {
            let b = p.block(r);
            prop_assert!(b.len.iter().all(|&l| l >= 1));
            prop_assert_eq!(p.owner_of(b.start), Some(r));
            let corner: [usize; D] = std::array::from_fn(|d| b.start[d] + b.len[d] - 1);
            prop_assert_eq!(p.owner_of(corner), Some(r));
            // Neighbour relations are symmetric, with opposite directions.
            for n in p.neighbours(r) {
                let back = n.offset.map(|o| -o);
                prop_assert!(
                    p.neighbours(n.rank)
                        .iter()
                        .any(|m| m.rank == r && m.offset == back),
                    "{} -> {} {:?} not mirrored",
                    r,
                    n.rank,
                    n.offset
                );
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn two_d_partitions_cover_exactly_and_neighbours_are_symmetric(
            rows in 1usize..60, cols in 1usize..60, parts in 1u32..40, pr in any::<bool>(), pc in any::<bool>()
        ) {
            if let Ok(p) = Partition2d::new([rows, cols], parts) {
                prop_assert_eq!(p.parts(), parts);
                check(&p.with_periodic([pr, pc]))?;
            } else {
                prop_assert!(parts as usize > rows * cols || factorizations::<2>(parts).iter().all(|f| f[0] as usize > rows || f[1] as usize > cols));
            }
        }

        #[test]
        fn three_d_partitions_cover_exactly_and_neighbours_are_symmetric(
            x in 1usize..12, y in 1usize..12, z in 1usize..12, parts in 1u32..30, periodic in any::<[bool; 3]>()
        ) {
            if let Ok(p) = Partition3d::new([x, y, z], parts) {
                check(&p.with_periodic(periodic))?;
            }
        }
    }

    #[test]
    fn every_cell_has_one_owner_exhaustively_for_primes() {
        for parts in [2u32, 3, 5, 7, 11, 13] {
            let p = Partition2d::new([29, 31], parts).unwrap();
            let mut owned = vec![0u32; 29 * 31];
            for r in 0..parts {
                let b = p.block(r);
                for i in b.start[0]..b.start[0] + b.len[0] {
                    for j in b.start[1]..b.start[1] + b.len[1] {
                        owned[i * 31 + j] += 1;
                        assert_eq!(p.owner_of([i, j]), Some(r));
                    }
                }
            }
            assert!(owned.iter().all(|&c| c == 1), "parts {parts}");
        }
    }
}
