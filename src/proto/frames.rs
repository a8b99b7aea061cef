//! Frame assembly: cells and `FrameEnd` markers from the expected peers,
//! handed to the application strictly in frame order (DESIGN §5 "Frames").
//!
//! Owns the buffer of frames not yet handed over, bounded to `max_ahead`
//! frames past the next one. It sits after the reliable channel (which has
//! removed duplicates) and must not touch sockets, threads or the clock.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::Rank;

/// A frame with every expected peer's cells, ready for the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompleteFrame {
    pub frame: u64,
    /// Cells of each expected peer ordered by message id (empty if it sent none).
    pub cells: BTreeMap<Rank, Vec<Bytes>>,
}

/// Why a cell or frame end was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The frame was already handed to the application.
    #[error("rank {from} sent for frame {frame}, already handed over (next is {next})")]
    Stale { from: Rank, frame: u64, next: u64 },
    /// The frame is beyond the buffer; the sender must wait (backpressure).
    #[error("rank {from} sent for frame {frame}, too far ahead (frames below {limit} accepted)")]
    TooFarAhead { from: Rank, frame: u64, limit: u64 },
    /// The sender is not among the peers expected to send to us.
    #[error("rank {from} is not expected to send frames here (frame {frame})")]
    UnexpectedPeer { from: Rank, frame: u64 },
    /// More cells than the sender announced in its `FrameEnd`.
    #[error("rank {from} sent {received} cells for frame {frame} but announced {count}")]
    CountExceeded {
        from: Rank,
        frame: u64,
        count: u32,
        received: usize,
    },
    /// Two `FrameEnd` markers for one frame with different counts.
    #[error("rank {from} ended frame {frame} twice with different counts ({first} then {second})")]
    ConflictingEnd {
        from: Rank,
        frame: u64,
        first: u32,
        second: u32,
    },
}

#[derive(Default)]
struct Part {
    cells: BTreeMap<u64, Bytes>,
    end: Option<u32>,
}

impl Part {
    fn complete(&self) -> bool {
        self.end.is_some_and(|c| c as usize == self.cells.len())
    }
}

/// Buffers frames until every expected peer's part is in, then hands them over in order.
pub struct FrameAssembler {
    next: u64,
    max_ahead: u64,
    expected: BTreeSet<Rank>,
    frames: BTreeMap<u64, BTreeMap<Rank, Part>>,
}

impl FrameAssembler {
    /// Frames `>= first_frame + max_ahead` are refused (`max_ahead` at least 1).
    pub fn new(first_frame: u64, max_ahead: u64) -> Self {
        Self {
            next: first_frame,
            max_ahead: max_ahead.max(1),
            expected: BTreeSet::new(),
            frames: BTreeMap::new(),
        }
    }

    /// Who sends to us every frame (our neighbours). With nobody expected,
    /// no frame is ever complete.
    pub fn set_expected(&mut self, peers: impl IntoIterator<Item = Rank>) {
        self.expected = peers.into_iter().collect();
    }

    fn limit(&self) -> u64 {
        self.next.saturating_add(self.max_ahead)
    }

    /// False when `frame` is too far ahead or already handed over.
    pub fn accepts(&self, frame: u64) -> bool {
        frame >= self.next && frame < self.limit()
    }

    fn part(&mut self, from: Rank, frame: u64) -> Result<&mut Part, FrameError> {
        if frame < self.next {
            return Err(FrameError::Stale {
                from,
                frame,
                next: self.next,
            });
        }
        if frame >= self.limit() {
            return Err(FrameError::TooFarAhead {
                from,
                frame,
                limit: self.limit(),
            });
        }
        if !self.expected.contains(&from) {
            return Err(FrameError::UnexpectedPeer { from, frame });
        }
        Ok(self
            .frames
            .entry(frame)
            .or_default()
            .entry(from)
            .or_default())
    }

    /// A cell (message `id`) of `frame` from `from`. A repeated id is ignored.
    pub fn handle_cell(
        &mut self,
        from: Rank,
        id: u64,
        frame: u64,
        payload: Bytes,
    ) -> Result<(), FrameError> {
        let part = self.part(from, frame)?;
        if part.cells.contains_key(&id) {
            return Ok(());
        }
        if let Some(count) = part.end {
            if part.cells.len() >= count as usize {
                return Err(FrameError::CountExceeded {
                    from,
                    frame,
                    count,
                    received: part.cells.len() + 1,
                });
            }
        }
        part.cells.insert(id, payload);
        Ok(())
    }

    /// `from` sent `count` cells of `frame` (0 when it had nothing to send).
    pub fn handle_frame_end(
        &mut self,
        from: Rank,
        frame: u64,
        count: u32,
    ) -> Result<(), FrameError> {
        let part = self.part(from, frame)?;
        match part.end {
            Some(first) if first != count => {
                return Err(FrameError::ConflictingEnd {
                    from,
                    frame,
                    first,
                    second: count,
                })
            }
            _ => {}
        }
        if part.cells.len() > count as usize {
            return Err(FrameError::CountExceeded {
                from,
                frame,
                count,
                received: part.cells.len(),
            });
        }
        part.end = Some(count);
        Ok(())
    }

    /// The next frame, once every expected peer's part of it is complete.
    pub fn poll_frame(&mut self) -> Option<CompleteFrame> {
        if self.expected.is_empty() {
            return None;
        }
        let parts = self.frames.get(&self.next)?;
        let done = self
            .expected
            .iter()
            .all(|r| parts.get(r).is_some_and(Part::complete));
        if !done {
            return None;
        }
        let frame = self.next;
        let mut parts = self.frames.remove(&frame).unwrap_or_default();
        self.next += 1;
        let cells = self
            .expected
            .iter()
            .map(|&r| {
                let part = parts.remove(&r).unwrap_or_default();
                (r, part.cells.into_values().collect())
            })
            .collect();
        Some(CompleteFrame { frame, cells })
    }

    /// The frame [`poll_frame`](Self::poll_frame) hands over next.
    pub fn next_frame(&self) -> u64 {
        self.next
    }

    /// Expected peers whose part of `frame` is incomplete (empty for frames
    /// already handed over).
    pub fn missing(&self, frame: u64) -> Vec<Rank> {
        if frame < self.next {
            return Vec::new();
        }
        let parts = self.frames.get(&frame);
        self.expected
            .iter()
            .copied()
            .filter(|r| !parts.and_then(|p| p.get(r)).is_some_and(Part::complete))
            .collect()
    }

    /// Cells held for frames not yet handed over.
    pub fn buffered_cells(&self) -> usize {
        self.frames
            .values()
            .flat_map(|f| f.values())
            .map(|p| p.cells.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn assembler() -> FrameAssembler {
        let mut fa = FrameAssembler::new(3, 8);
        fa.set_expected([1, 2]);
        fa
    }

    /// Peer `from` sends one cell and its frame end for `frame`.
    fn one_cell_frame(fa: &mut FrameAssembler, from: Rank, frame: u64) {
        fa.handle_cell(from, frame * 10, frame, cell(&format!("{from}@{frame}")))
            .unwrap();
        fa.handle_frame_end(from, frame, 1).unwrap();
    }

    #[test]
    fn frames_completed_out_of_order_are_handed_over_in_order() {
        let mut fa = assembler();
        for frame in [4, 5, 6] {
            one_cell_frame(&mut fa, 1, frame);
            one_cell_frame(&mut fa, 2, frame);
        }
        assert_eq!(fa.poll_frame(), None, "frame 3 is not complete");
        assert_eq!(fa.buffered_cells(), 6);
        one_cell_frame(&mut fa, 2, 3);
        assert_eq!(fa.poll_frame(), None);
        one_cell_frame(&mut fa, 1, 3);
        let order: Vec<u64> = std::iter::from_fn(|| fa.poll_frame())
            .map(|f| f.frame)
            .collect();
        assert_eq!(order, vec![3, 4, 5, 6]);
        assert_eq!(fa.next_frame(), 7);
        assert_eq!(fa.buffered_cells(), 0);
    }

    #[test]
    fn cells_after_their_frame_end_complete_the_frame_ordered_by_id() {
        let mut fa = assembler();
        fa.handle_frame_end(1, 3, 2).unwrap();
        fa.handle_frame_end(2, 3, 0).unwrap();
        fa.handle_cell(1, 9, 3, cell("second")).unwrap();
        assert_eq!(fa.poll_frame(), None);
        assert_eq!(fa.missing(3), vec![1]);
        fa.handle_cell(1, 8, 3, cell("first")).unwrap();
        let f = fa.poll_frame().unwrap();
        assert_eq!(f.frame, 3);
        assert_eq!(f.cells[&1], vec![cell("first"), cell("second")]);
        assert_eq!(f.cells[&2], Vec::<Bytes>::new());
    }

    #[test]
    fn more_cells_than_announced_is_an_error_in_either_order() {
        let mut fa = assembler();
        fa.handle_frame_end(1, 3, 1).unwrap();
        fa.handle_cell(1, 1, 3, cell("a")).unwrap();
        fa.handle_cell(1, 1, 3, cell("a")).unwrap(); // repeat of the same id
        assert_eq!(
            fa.handle_cell(1, 2, 3, cell("b")),
            Err(FrameError::CountExceeded {
                from: 1,
                frame: 3,
                count: 1,
                received: 2
            })
        );
        fa.handle_cell(2, 1, 4, cell("a")).unwrap();
        fa.handle_cell(2, 2, 4, cell("b")).unwrap();
        assert_eq!(
            fa.handle_frame_end(2, 4, 1),
            Err(FrameError::CountExceeded {
                from: 2,
                frame: 4,
                count: 1,
                received: 2
            })
        );
        assert!(matches!(
            fa.handle_frame_end(1, 3, 5),
            Err(FrameError::ConflictingEnd {
                first: 1,
                second: 5,
                ..
            })
        ));
    }

    #[test]
    fn frames_too_far_ahead_stale_or_from_strangers_are_refused() {
        let mut fa = assembler();
        assert!(fa.accepts(10));
        assert!(!fa.accepts(11));
        assert_eq!(
            fa.handle_cell(1, 1, 11, cell("x")),
            Err(FrameError::TooFarAhead {
                from: 1,
                frame: 11,
                limit: 11
            })
        );
        assert!(fa.handle_frame_end(1, u64::MAX, 0).is_err());
        assert_eq!(
            fa.handle_frame_end(7, 3, 0),
            Err(FrameError::UnexpectedPeer { from: 7, frame: 3 })
        );
        fa.handle_frame_end(1, 3, 0).unwrap();
        fa.handle_frame_end(2, 3, 0).unwrap();
        assert!(fa.poll_frame().is_some());
        assert!(!fa.accepts(3));
        assert!(fa.accepts(11), "the window slides with the next frame");
        assert_eq!(
            fa.handle_cell(1, 5, 3, cell("late")),
            Err(FrameError::Stale {
                from: 1,
                frame: 3,
                next: 4
            })
        );
        assert_eq!(fa.buffered_cells(), 0);
    }

    #[test]
    fn missing_names_the_laggard() {
        let mut fa = FrameAssembler::new(0, 4);
        fa.set_expected([1, 2, 3]);
        assert_eq!(fa.missing(0), vec![1, 2, 3]);
        one_cell_frame(&mut fa, 1, 0);
        fa.handle_frame_end(3, 0, 0).unwrap();
        fa.handle_frame_end(2, 0, 1).unwrap(); // its cell is still on the way
        assert_eq!(fa.missing(0), vec![2]);
        assert_eq!(fa.poll_frame(), None);
        fa.handle_cell(2, 4, 0, cell("late")).unwrap();
        assert_eq!(fa.poll_frame().map(|f| f.frame), Some(0));
        assert!(fa.missing(0).is_empty());
    }

    #[test]
    fn nothing_expected_means_no_frame_is_ever_complete() {
        let mut fa = FrameAssembler::new(0, 0);
        assert!(fa.accepts(0), "max_ahead 0 is raised to 1");
        assert_eq!(fa.poll_frame(), None);
        assert_eq!(
            fa.handle_frame_end(1, 0, 0),
            Err(FrameError::UnexpectedPeer { from: 1, frame: 0 })
        );
    }
}
