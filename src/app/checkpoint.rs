//! Checkpoints of the main job: after each frame an instance writes its
//! tile and the next frame to run to `DIR/rank-R` (a temporary file, then
//! a rename, so a crash leaves the previous checkpoint or the new one, never
//! half of one). A restarted instance reads it back and resumes there.
//!
//! Owns the file format and its checks; the run itself is in
//! [`crate::app::life`]. Nothing read from a file is trusted: a short,
//! corrupt or foreign file is a [`CheckpointError`] naming the rank, grid
//! shape and seed it was expected to match.
//!
//! Format (little-endian): the magic `CNLIFE01`, rank and size (u32 each),
//! grid rows, grid columns, seed, next frame, block rows, block columns
//! (u64 each), the block's cells (one byte each, 0 or 1), then an FNV-1a
//! checksum (u64) of everything before it.

use std::path::{Path, PathBuf};

use super::life::checksum;

const MAGIC: &[u8; 8] = b"CNLIFE01";
const HEADER: usize = 8 + 4 + 4 + 6 * 8;

/// Which run a checkpoint belongs to: it only resumes the same instance of
/// the same job (grid, seed and instance count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointId {
    /// The instance's rank.
    pub rank: u32,
    /// Instances in the job.
    pub size: u32,
    /// Rows of the global grid.
    pub rows: u64,
    /// Columns of the global grid.
    pub cols: u64,
    /// Seed of the initial soup.
    pub seed: u64,
}

impl std::fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} of {}, {}x{} grid, seed {}",
            self.rank, self.size, self.rows, self.cols, self.seed
        )
    }
}

/// An instance's state after `frame` frames: where it resumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The run it belongs to.
    pub id: CheckpointId,
    /// The next frame to run (frames `0..frame` are done).
    pub frame: u64,
    /// Rows of the instance's block.
    pub block_rows: usize,
    /// Columns of the instance's block.
    pub block_cols: usize,
    /// The block's cells, row-major, 0 or 1.
    pub cells: Vec<u8>,
}

/// A checkpoint that cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file or its folder could not be read.
    #[error("checkpoint {path} for {id}: cannot read it: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What it should belong to.
        id: CheckpointId,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file or its folder could not be written.
    #[error("checkpoint {path} for {id}: cannot write it: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What it belongs to.
        id: CheckpointId,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a usable checkpoint of this instance of this run.
    #[error("checkpoint {path} cannot resume {id}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What it should belong to.
        id: CheckpointId,
        /// What is wrong with it.
        reason: String,
    },
}

/// Where rank `rank` keeps its checkpoint in `dir`.
pub fn path(dir: &Path, rank: u32) -> PathBuf {
    dir.join(format!("rank-{rank}"))
}

impl Checkpoint {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.cells.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.id.rank.to_le_bytes());
        out.extend_from_slice(&self.id.size.to_le_bytes());
        for v in [
            self.id.rows,
            self.id.cols,
            self.id.seed,
            self.frame,
            self.block_rows as u64,
            self.block_cols as u64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.cells);
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Parse `bytes` as the checkpoint of `id` with a `block` (rows,
    /// columns) of cells and at most `frames` frames; the reason if it is not.
    pub fn decode(
        bytes: &[u8],
        id: CheckpointId,
        block: [usize; 2],
        frames: u64,
    ) -> Result<Checkpoint, String> {
        if bytes.len() < HEADER + 8 {
            return Err(format!("truncated ({} bytes)", bytes.len()));
        }
        if &bytes[..8] != MAGIC {
            return Err("not a cellnet life checkpoint (wrong magic)".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        let sum = u64::from_le_bytes(sum.try_into().map_err(|_| "truncated checksum")?);
        if checksum(body) != sum {
            return Err("checksum mismatch: the file is corrupt".into());
        }
        let u32_at =
            |k: usize| u32::from_le_bytes([body[k], body[k + 1], body[k + 2], body[k + 3]]);
        let u64_at = |k: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[k..k + 8]);
            u64::from_le_bytes(b)
        };
        let found = CheckpointId {
            rank: u32_at(8),
            size: u32_at(12),
            rows: u64_at(16),
            cols: u64_at(24),
            seed: u64_at(32),
        };
        if found != id {
            return Err(format!("it was written by {found}"));
        }
        let frame = u64_at(40);
        if frame > frames {
            return Err(format!(
                "its frame {frame} is beyond the run's {frames} frames"
            ));
        }
        let (block_rows, block_cols) = (u64_at(48), u64_at(56));
        if [block_rows, block_cols] != [block[0] as u64, block[1] as u64] {
            return Err(format!(
                "its block is {block_rows}x{block_cols}, this rank's is {}x{}",
                block[0], block[1]
            ));
        }
        let cells = &body[HEADER..];
        if cells.len() != block[0] * block[1] {
            return Err(format!(
                "{} cells for a {}x{} block",
                cells.len(),
                block[0],
                block[1]
            ));
        }
        if cells.iter().any(|&c| c > 1) {
            return Err("cells other than 0 and 1".into());
        }
        Ok(Checkpoint {
            id,
            frame,
            block_rows: block[0],
            block_cols: block[1],
            cells: cells.to_vec(),
        })
    }

    /// Write atomically to `dir/rank-R` (a temporary file renamed over it).
    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        let file = path(dir, self.id.rank);
        let tmp = dir.join(format!(".rank-{}.tmp", self.id.rank));
        let err = |source| CheckpointError::Write {
            path: file.clone(),
            id: self.id,
            source,
        };
        std::fs::write(&tmp, self.encode()).map_err(err)?;
        std::fs::rename(&tmp, &file).map_err(err)
    }

    /// The checkpoint of `id` in `dir`, `None` if there is none yet.
    pub fn load(
        dir: &Path,
        id: CheckpointId,
        block: [usize; 2],
        frames: u64,
    ) -> Result<Option<Checkpoint>, CheckpointError> {
        let file = path(dir, id.rank);
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CheckpointError::Read {
                    path: file,
                    id,
                    source,
                })
            }
        };
        Checkpoint::decode(&bytes, id, block, frames)
            .map(Some)
            .map_err(|reason| CheckpointError::Invalid {
                path: file,
                id,
                reason,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> CheckpointId {
        CheckpointId {
            rank: 3,
            size: 16,
            rows: 128,
            cols: 96,
            seed: 7,
        }
    }

    /// A fresh folder under the system's temporary one, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("cellnet-ckpt-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sample() -> Checkpoint {
        Checkpoint {
            id: id(),
            frame: 12,
            block_rows: 2,
            block_cols: 3,
            cells: vec![0, 1, 1, 0, 0, 1],
        }
    }

    #[test]
    fn a_saved_checkpoint_loads_back_and_a_missing_one_is_none() {
        let dir = TempDir::new("roundtrip");
        assert_eq!(
            Checkpoint::load(dir.path(), id(), [2, 3], 20).unwrap(),
            None
        );
        sample().save(dir.path()).unwrap();
        let mut later = sample();
        later.frame = 13;
        later.save(dir.path()).unwrap();
        assert_eq!(
            Checkpoint::load(dir.path(), id(), [2, 3], 20).unwrap(),
            Some(later)
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["rank-3"], "no temporary file left behind");
    }

    /// Every way a file can be wrong is an error naming the rank, grid and
    /// seed it should match, never a panic.
    #[test]
    fn corrupt_truncated_and_foreign_checkpoints_are_clear_errors() {
        let good = sample().encode();
        let decode = |b: &[u8]| Checkpoint::decode(b, id(), [2, 3], 20);
        assert!(decode(&good).is_ok());
        for cut in [0, 5, HEADER, good.len() - 1] {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = good.clone();
        flipped[HEADER + 1] ^= 1;
        assert!(decode(&flipped).unwrap_err().contains("corrupt"));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(decode(&magic).unwrap_err().contains("magic"));

        let mut other = sample();
        other.id.seed = 8;
        let e = decode(&other.encode()).unwrap_err();
        assert!(e.contains("seed 8"), "{e}");
        let mut other = sample();
        other.id.rank = 4;
        assert!(decode(&other.encode())
            .unwrap_err()
            .contains("rank 4 of 16"));
        assert!(Checkpoint::decode(&good, id(), [3, 2], 20)
            .unwrap_err()
            .contains("block"));
        assert!(Checkpoint::decode(&good, id(), [2, 3], 5)
            .unwrap_err()
            .contains("beyond"));
        let mut bad_cell = sample();
        bad_cell.cells[0] = 7;
        assert!(decode(&bad_cell.encode()).is_err());

        let dir = TempDir::new("junk");
        std::fs::write(path(dir.path(), 3), b"junk").unwrap();
        let msg = Checkpoint::load(dir.path(), id(), [2, 3], 20)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("rank 3 of 16, 128x96 grid, seed 7") && msg.contains("truncated"),
            "{msg}"
        );
    }
}
