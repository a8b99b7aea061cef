//! Frame assembly: cells carry a frame number, each sender ends its part of
//! a frame with a frame-end marker carrying its cell count, and complete
//! frames are handed over strictly in order.
//!
//! Owns the per-frame, per-sender bookkeeping and the bound on how far
//! ahead of the application frames may be buffered. Must not touch sockets
//! or the clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use rand::{rngs::SmallRng, SeedableRng};

use super::backoff::{Backoff, BackoffPolicy};
use super::{Now, Rank};

/// How a receiver hunts for a frame the application waits for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameTimers {
    /// Ask the laggards after waiting this long ...
    pub query_after: Duration,
    /// ... and again on this schedule until the frame completes.
    pub query: BackoffPolicy,
}

impl Default for FrameTimers {
    fn default() -> Self {
        Self {
            query_after: Duration::from_millis(500),
            query: BackoffPolicy::new(Duration::from_millis(500), 2.0, Duration::from_secs(5), 0.0),
        }
    }
}

/// The application waited for `frame` past its deadline; `peers` never
/// completed their part of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameMissing {
    /// The frame waited for.
    pub frame: u64,
    /// Expected senders whose part of `frame` was still incomplete, by rank.
    pub peers: Vec<Rank>,
}

#[derive(Debug)]
struct Watch {
    frame: u64,
    since: Now,
    deadline: Now,
    queries: BTreeMap<Rank, Backoff>,
    reported: bool,
}

/// A cell or marker that does not fit the frame bookkeeping.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A cell or marker for a frame already handed over.
    #[error("frame {frame} was already handed over (next is {next})")]
    Stale {
        /// The frame of the cell or marker.
        frame: u64,
        /// The next frame to be handed over.
        next: u64,
    },
    /// A frame beyond the buffering bound; the sender retries later.
    #[error("frame {frame} is too far ahead (next is {next}, at most {max_ahead} buffered)")]
    TooFarAhead {
        /// The frame of the cell or marker.
        frame: u64,
        /// The next frame to be handed over.
        next: u64,
        /// How many frames from `next` on may be buffered.
        max_ahead: u64,
    },
    /// A sender not in the expected set of that frame.
    #[error("rank {from} is not expected to send in frame {frame}")]
    UnexpectedPeer {
        /// The sender.
        from: Rank,
        /// The frame it sent in.
        frame: u64,
    },
    /// More cells than the sender's frame end announced.
    #[error("rank {from} sent more cells in frame {frame} than its frame end announced ({count})")]
    CountExceeded {
        /// The sender.
        from: Rank,
        /// The frame concerned.
        frame: u64,
        /// The cell count in the sender's frame end.
        count: u32,
    },
}

/// A frame with every expected sender's part complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompleteFrame {
    /// The frame number.
    pub frame: u64,
    /// Accepted cells of each sender, in the order they were sent.
    pub cells: BTreeMap<Rank, Vec<Bytes>>,
}

#[derive(Debug, Default)]
struct Part {
    /// Accepted cells sorted by message id (ids grow in send order, so
    /// they nearly always come in order: appended, not inserted).
    cells: Vec<(u64, Bytes)>,
    /// Cells the handler refused: received, counted, not handed over.
    rejected: BTreeSet<u64>,
    end: Option<u32>,
}

impl Part {
    /// Where cell `id` is or would go in `cells`.
    fn slot(&self, id: u64) -> Result<usize, usize> {
        match self.cells.last() {
            Some(&(last, _)) if last < id => Err(self.cells.len()),
            None => Err(0),
            _ => self.cells.binary_search_by_key(&id, |(i, _)| *i),
        }
    }

    fn has(&self, id: u64) -> bool {
        self.slot(id).is_ok() || self.rejected.contains(&id)
    }

    fn received(&self) -> usize {
        self.cells.len() + self.rejected.len()
    }

    fn complete(&self) -> bool {
        self.end.is_some_and(|n| n as usize == self.received())
    }
}

/// In-order frame delivery for one receiving instance.
///
/// Restarts: an instance that resumes from a checkpoint starts at a later
/// `first_frame`, and its neighbours replay their last frames to it; a
/// neighbour that restarted replays frames from its checkpoint, which may
/// be frames already handed over here. Such replays are acknowledged and
/// dropped (counted by [`Self::replays_dropped`]), never refused: the
/// restarted sender would see an ERR and fail. A stale frame from a peer
/// that did not restart is still an error ([`FrameError::Stale`]).
#[derive(Debug)]
pub struct FrameAssembler {
    next: u64,
    /// The first frame of this instance's life: earlier ones are replays.
    first: u64,
    /// Peers seen restarting: their frames already here are replays.
    restarted: BTreeSet<Rank>,
    replays: u64,
    max_ahead: u64,
    /// Expected senders from a frame on (the last entry at or below a frame
    /// applies to it).
    expected: BTreeMap<u64, BTreeSet<Rank>>,
    parts: BTreeMap<u64, BTreeMap<Rank, Part>>,
    timers: FrameTimers,
    watch: Option<Watch>,
    queries: VecDeque<(Rank, u64)>,
    missing_frames: VecDeque<FrameMissing>,
    rng: SmallRng,
}

impl FrameAssembler {
    /// `first_frame` is the first frame of this life (0, or the frame a
    /// restarted instance resumes at). Frames `>= next + max_ahead` are refused until the application
    /// catches up: the buffer is bounded.
    pub fn new(first_frame: u64, max_ahead: u64) -> Self {
        Self {
            next: first_frame,
            first: first_frame,
            restarted: BTreeSet::new(),
            replays: 0,
            max_ahead: max_ahead.max(1),
            expected: BTreeMap::new(),
            parts: BTreeMap::new(),
            timers: FrameTimers::default(),
            watch: None,
            queries: VecDeque::new(),
            missing_frames: VecDeque::new(),
            rng: SmallRng::seed_from_u64(0),
        }
    }

    /// Replace the default [`FrameTimers`].
    pub fn with_timers(mut self, timers: FrameTimers) -> Self {
        self.timers = timers;
        self
    }

    /// The application waits for `frame` until `deadline`: laggards are
    /// queried after [`FrameTimers::query_after`], and at the deadline a
    /// [`FrameMissing`] comes out of [`Self::poll_missing`].
    pub fn await_frame(&mut self, now: Now, frame: u64, deadline: Now) {
        self.watch = Some(Watch {
            frame,
            since: now,
            deadline,
            queries: BTreeMap::new(),
            reported: false,
        });
    }

    /// Advance the watch on the awaited frame: queue queries to laggards when
    /// their timers are due, and a [`FrameMissing`] at the deadline (once).
    pub fn handle_timeout(&mut self, now: Now) {
        let Some(frame) = self.watch.as_ref().map(|w| w.frame) else {
            return;
        };
        if frame < self.next || self.watch.as_ref().is_some_and(|w| w.reported) {
            self.watch = None;
            return;
        }
        let missing = self.missing(frame);
        let Some(w) = &mut self.watch else {
            return;
        };
        if now >= w.deadline {
            w.reported = true;
            self.missing_frames.push_back(FrameMissing {
                frame: w.frame,
                peers: missing,
            });
            return;
        }
        if now < w.since + self.timers.query_after {
            return;
        }
        for peer in missing {
            let timer = w
                .queries
                .entry(peer)
                .or_insert_with(|| Backoff::start(self.timers.query, now));
            if timer.is_due(now) {
                timer.fire(now, &mut self.rng);
                self.queries.push_back((peer, w.frame));
            }
        }
    }

    /// When [`Self::handle_timeout`] should next run; `None` when no frame is
    /// awaited, it was already reported, or nobody is missing.
    pub fn poll_timeout(&self) -> Option<Now> {
        let w = self
            .watch
            .as_ref()
            .filter(|w| !w.reported && w.frame >= self.next)?;
        // Only peers still missing count: a queried laggard that caught up
        // keeps a timer `handle_timeout` never fires again, and a past
        // time here would wake the driver at once, forever. A frame with
        // nobody missing is complete and waits only for `poll_frame`.
        let first_query = w.since + self.timers.query_after;
        let next_query = self
            .missing(w.frame)
            .iter()
            .map(|p| w.queries.get(p).map_or(first_query, |t| t.next()))
            .min()?;
        Some(next_query.min(w.deadline))
    }

    /// A laggard to ask about a frame: `(peer, frame)`.
    pub fn poll_query(&mut self) -> Option<(Rank, u64)> {
        self.queries.pop_front()
    }

    /// An awaited frame that passed its deadline incomplete.
    pub fn poll_missing(&mut self) -> Option<FrameMissing> {
        self.missing_frames.pop_front()
    }

    /// Who sends to us every frame from the next one on.
    pub fn set_expected(&mut self, peers: impl IntoIterator<Item = Rank>) {
        self.set_expected_from(self.next, peers);
    }

    /// Who sends to us from `frame` on (later settings stay in force).
    pub fn set_expected_from(&mut self, frame: u64, peers: impl IntoIterator<Item = Rank>) {
        self.expected
            .insert(frame.max(self.next), peers.into_iter().collect());
    }

    fn expected_in(&self, frame: u64) -> Option<&BTreeSet<Rank>> {
        self.expected.range(..=frame).next_back().map(|(_, s)| s)
    }

    /// The next frame to be handed over by [`Self::poll_frame`].
    pub fn next_frame(&self) -> u64 {
        self.next
    }

    /// Whether a cell of `frame` would be taken now.
    pub fn accepts(&self, frame: u64) -> bool {
        frame >= self.next && frame - self.next < self.max_ahead
    }

    /// `rank` restarted (new incarnation): it resends from its checkpoint.
    /// Its parts not complete here are dropped (its old life may have died
    /// half-way through them; the new life sends them whole), complete ones
    /// are kept, and what it sends again for them, or for frames already
    /// handed over, is a replay.
    pub fn peer_restarted(&mut self, rank: Rank) {
        self.restarted.insert(rank);
        for parts in self.parts.values_mut() {
            if parts.get(&rank).is_some_and(|p| !p.complete()) {
                parts.remove(&rank);
            }
        }
    }

    /// Whether a cell or frame end of `frame` from `from` repeats what is
    /// already here or past (see [`FrameAssembler`]): acknowledge and drop it.
    pub fn is_replay(&self, from: Rank, frame: u64) -> bool {
        frame < self.first
            || (self.restarted.contains(&from)
                && (frame < self.next
                    || self
                        .parts
                        .get(&frame)
                        .and_then(|p| p.get(&from))
                        .is_some_and(Part::complete)))
    }

    /// Replayed cells and frame ends dropped so far.
    pub fn replays_dropped(&self) -> u64 {
        self.replays
    }

    /// Count and drop a replay; true if it was one.
    fn drop_replay(&mut self, from: Rank, frame: u64) -> bool {
        let replay = self.is_replay(from, frame);
        self.replays += u64::from(replay);
        replay
    }

    fn part(&mut self, from: Rank, frame: u64) -> Result<&mut Part, FrameError> {
        if frame < self.next {
            return Err(FrameError::Stale {
                frame,
                next: self.next,
            });
        }
        if !self.accepts(frame) {
            return Err(FrameError::TooFarAhead {
                frame,
                next: self.next,
                max_ahead: self.max_ahead,
            });
        }
        // Before the application says whom it expects (start-up races its
        // first `set_expected`), cells are held, not refused.
        if self.expected_in(frame).is_some_and(|s| !s.contains(&from)) {
            return Err(FrameError::UnexpectedPeer { from, frame });
        }
        Ok(self
            .parts
            .entry(frame)
            .or_default()
            .entry(from)
            .or_default())
    }

    fn check_count(part: &Part, from: Rank, frame: u64, extra: usize) -> Result<(), FrameError> {
        match part.end {
            Some(count) if part.received() + extra > count as usize => {
                Err(FrameError::CountExceeded { from, frame, count })
            }
            _ => Ok(()),
        }
    }

    /// An accepted cell (message `id`) of `frame` from `from`.
    pub fn handle_cell(
        &mut self,
        from: Rank,
        id: u64,
        frame: u64,
        payload: Bytes,
    ) -> Result<(), FrameError> {
        let mut result = Ok(());
        self.handle_cells(from, frame, [(id, payload)], |_, r| result = r);
        result
    }

    /// Cells of `frame` from `from` that the handler accepted, `(id,
    /// payload)`, each taken as [`Self::handle_cell`] takes it; `answer`
    /// gets each id's result, in order. The frame's bookkeeping is looked
    /// up once for them all.
    pub fn handle_cells(
        &mut self,
        from: Rank,
        frame: u64,
        cells: impl IntoIterator<Item = (u64, Bytes)>,
        mut answer: impl FnMut(u64, Result<(), FrameError>),
    ) {
        if self.is_replay(from, frame) {
            for (id, _) in cells {
                self.replays += 1;
                answer(id, Ok(()));
            }
            return;
        }
        let part = match self.part(from, frame) {
            Ok(part) => part,
            Err(e) => {
                for (id, _) in cells {
                    answer(id, Err(e.clone()));
                }
                return;
            }
        };
        let cells = cells.into_iter();
        part.cells.reserve(cells.size_hint().0);
        for (id, payload) in cells {
            let result = match part.slot(id) {
                // A duplicate (of an accepted or refused cell).
                Ok(_) => Ok(()),
                Err(_) if part.rejected.contains(&id) => Ok(()),
                Err(at) => Self::check_count(part, from, frame, 1)
                    .map(|()| part.cells.insert(at, (id, payload))),
            };
            answer(id, result);
        }
    }

    /// A cell the handler refused: it counts towards the frame's
    /// completeness but is not handed over.
    pub fn handle_rejected(&mut self, from: Rank, id: u64, frame: u64) -> Result<(), FrameError> {
        if self.drop_replay(from, frame) {
            return Ok(());
        }
        let part = self.part(from, frame)?;
        if part.has(id) {
            return Ok(());
        }
        Self::check_count(part, from, frame, 1)?;
        part.rejected.insert(id);
        Ok(())
    }

    /// `from` sent `count` cells in `frame`.
    pub fn handle_frame_end(
        &mut self,
        from: Rank,
        frame: u64,
        count: u32,
    ) -> Result<(), FrameError> {
        if self.drop_replay(from, frame) {
            return Ok(());
        }
        let part = self.part(from, frame)?;
        if part.received() > count as usize {
            return Err(FrameError::CountExceeded { from, frame, count });
        }
        part.end = Some(count);
        Ok(())
    }

    /// Expected senders whose part of `frame` is not complete yet.
    pub fn missing(&self, frame: u64) -> Vec<Rank> {
        let Some(expected) = self.expected_in(frame) else {
            return Vec::new();
        };
        let parts = self.parts.get(&frame);
        expected
            .iter()
            .filter(|r| !parts.and_then(|p| p.get(r)).is_some_and(Part::complete))
            .copied()
            .collect()
    }

    /// The next frame, if every expected sender's part of it is complete.
    /// Nothing comes out before the expected senders are set; with an empty
    /// set, frames are complete at once (an instance without neighbours).
    pub fn poll_frame(&mut self) -> Option<CompleteFrame> {
        if self.expected_in(self.next).is_none() || !self.missing(self.next).is_empty() {
            return None;
        }
        let frame = self.next;
        let parts = self.parts.remove(&frame).unwrap_or_default();
        self.next += 1;
        // Settings for frames now past are no longer needed (keep the one in force).
        while self.expected.range(..=self.next).count() > 1 {
            let Some((&k, _)) = self.expected.iter().next() else {
                break;
            };
            self.expected.remove(&k);
        }
        let cells = parts
            .into_iter()
            .map(|(rank, part)| (rank, part.cells.into_iter().map(|(_, c)| c).collect()))
            .collect();
        Some(CompleteFrame { frame, cells })
    }

    /// Cells held for frames not handed over yet.
    pub fn buffered_cells(&self) -> usize {
        self.parts
            .values()
            .flat_map(|p| p.values())
            .map(|p| p.cells.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: u8) -> Bytes {
        Bytes::from(vec![x])
    }

    #[test]
    fn frames_complete_out_of_order_come_out_in_order() {
        let mut a = FrameAssembler::new(3, 8);
        a.set_expected([1, 2]);
        for f in [4u64, 5, 6] {
            for peer in [1, 2] {
                a.handle_cell(peer, f * 10, f, b(f as u8)).unwrap();
                a.handle_frame_end(peer, f, 1).unwrap();
            }
        }
        assert_eq!(a.poll_frame(), None, "frame 3 is not complete yet");
        assert_eq!(a.missing(3), vec![1, 2]);
        a.handle_frame_end(1, 3, 0).unwrap();
        assert_eq!(a.missing(3), vec![2]);
        a.handle_frame_end(2, 3, 1).unwrap();
        assert_eq!(a.poll_frame(), None);
        a.handle_cell(2, 1, 3, b(3)).unwrap(); // cell after its frame end
        let order: Vec<u64> = std::iter::from_fn(|| a.poll_frame())
            .map(|f| f.frame)
            .collect();
        assert_eq!(order, vec![3, 4, 5, 6]);
        assert_eq!(a.buffered_cells(), 0);
    }

    #[test]
    fn cells_of_a_sender_come_out_in_send_order_and_duplicates_once() {
        let mut a = FrameAssembler::new(0, 4);
        a.set_expected([7]);
        a.handle_cell(7, 3, 0, b(3)).unwrap();
        a.handle_cell(7, 3, 0, b(3)).unwrap();
        a.handle_cell(7, 1, 0, b(1)).unwrap();
        a.handle_cell(7, 1, 0, b(1)).unwrap();
        a.handle_rejected(7, 2, 0).unwrap();
        a.handle_frame_end(7, 0, 3).unwrap();
        let f = a.poll_frame().unwrap();
        assert_eq!(f.cells[&7], vec![b(1), b(3)]);
    }

    #[test]
    fn a_run_of_cells_is_taken_as_each_cell_alone_would_be() {
        let mut a = FrameAssembler::new(0, 2);
        a.set_expected([7]);
        a.handle_frame_end(7, 0, 4).unwrap();
        a.handle_rejected(7, 2, 0).unwrap();
        let mut results = Vec::new();
        let run = [
            (1, b(1)),
            (2, b(2)),
            (3, b(3)),
            (1, b(1)),
            (4, b(4)),
            (5, b(5)),
        ];
        a.handle_cells(7, 0, run, |id, r| results.push((id, r)));
        let count_exceeded = Err(FrameError::CountExceeded {
            from: 7,
            frame: 0,
            count: 4,
        });
        assert_eq!(
            results,
            [
                (1, Ok(())),
                (2, Ok(())), // refused before: a duplicate
                (3, Ok(())),
                (1, Ok(())), // a duplicate
                (4, Ok(())),
                (5, count_exceeded),
            ]
        );
        assert_eq!(a.poll_frame().unwrap().cells[&7], vec![b(1), b(3), b(4)]);

        // The whole run is refused when its frame is.
        results.clear();
        a.handle_cells(7, 9, [(6, b(6)), (7, b(7))], |id, r| results.push((id, r)));
        let too_far = FrameError::TooFarAhead {
            frame: 9,
            next: 1,
            max_ahead: 2,
        };
        assert_eq!(results, [(6, Err(too_far.clone())), (7, Err(too_far))]);
    }

    #[test]
    fn bounds_and_bad_senders_are_errors() {
        let mut a = FrameAssembler::new(0, 2);
        a.set_expected([1]);
        assert!(matches!(
            a.handle_cell(1, 1, 2, b(0)),
            Err(FrameError::TooFarAhead { .. })
        ));
        assert!(!a.accepts(2));
        assert!(matches!(
            a.handle_cell(9, 1, 0, b(0)),
            Err(FrameError::UnexpectedPeer { .. })
        ));
        a.handle_frame_end(1, 0, 1).unwrap();
        a.handle_cell(1, 1, 0, b(0)).unwrap();
        assert!(matches!(
            a.handle_cell(1, 2, 0, b(0)),
            Err(FrameError::CountExceeded { .. })
        ));
        assert!(a.poll_frame().is_some());
        assert!(matches!(
            a.handle_cell(1, 3, 0, b(0)),
            Err(FrameError::Stale { .. })
        ));
        assert!(a.accepts(2));
    }

    #[test]
    fn no_frame_before_senders_are_set_and_empty_frames_without_senders() {
        let mut a = FrameAssembler::new(0, 4);
        assert_eq!(a.poll_frame(), None);
        // A cell that arrives before the expectations are set is held.
        let mut early = FrameAssembler::new(0, 4);
        early.handle_cell(5, 1, 0, b(9)).unwrap();
        early.handle_frame_end(5, 0, 1).unwrap();
        early.set_expected([5]);
        assert_eq!(early.poll_frame().unwrap().cells[&5], vec![b(9)]);
        a.set_expected([]);
        assert_eq!(a.poll_frame().map(|f| f.frame), Some(0));
        assert_eq!(a.poll_frame().map(|f| f.frame), Some(1));
    }

    #[test]
    fn a_frame_never_sent_is_queried_then_reported_missing() {
        let ms = Duration::from_millis;
        let mut a = FrameAssembler::new(3, 8);
        a.set_expected([1, 2]);
        a.handle_frame_end(1, 3, 0).unwrap();
        a.await_frame(ms(0), 3, ms(10_000));
        a.handle_timeout(ms(100));
        assert_eq!(a.poll_query(), None, "not before query_after");
        let t = a.poll_timeout().unwrap();
        assert_eq!(t, ms(500));
        a.handle_timeout(t);
        assert_eq!(a.poll_query(), Some((2, 3)), "only the laggard is asked");
        assert_eq!(a.poll_query(), None);
        a.handle_timeout(ms(600));
        assert_eq!(a.poll_query(), None, "queries back off");
        a.handle_timeout(ms(1000));
        assert_eq!(a.poll_query(), Some((2, 3)));
        a.handle_timeout(ms(10_000));
        assert_eq!(
            a.poll_missing(),
            Some(FrameMissing {
                frame: 3,
                peers: vec![2]
            })
        );
        a.handle_timeout(ms(20_000));
        assert_eq!(a.poll_missing(), None, "reported once");
        assert_eq!(a.poll_timeout(), None);
    }

    /// Found by `cellnet sim --nodes 3 --per-node 4 --loss 0.3 --dup 0.1
    /// --reorder 0.2 --frames 4 --seed 1`: two laggards were queried, one
    /// caught up, and `poll_timeout` kept returning its stale query time,
    /// so the driver was woken at the same instant forever.
    #[test]
    fn a_queried_laggard_that_caught_up_does_not_wake_the_driver_in_a_loop() {
        let ms = Duration::from_millis;
        let mut a = FrameAssembler::new(0, 8);
        a.set_expected([1, 2]);
        a.await_frame(ms(0), 0, ms(10_000));
        a.handle_timeout(ms(500));
        assert_eq!(a.poll_query(), Some((1, 0)));
        assert_eq!(a.poll_query(), Some((2, 0)));
        a.handle_frame_end(1, 0, 0).unwrap();
        assert_eq!(a.poll_frame(), None, "2 is still missing");
        let t = a.poll_timeout().unwrap();
        assert!(t > ms(500));
        a.handle_timeout(t);
        assert_eq!(a.poll_query(), Some((2, 0)));
        let next = a.poll_timeout().unwrap();
        assert!(next > t, "woken again at {next:?}, already handled {t:?}");
        a.handle_frame_end(2, 0, 0).unwrap();
        assert_eq!(a.poll_timeout(), None, "complete: nothing to wait for");
        assert!(a.poll_frame().is_some());
    }

    #[test]
    fn a_frame_that_completes_stops_the_hunt() {
        let ms = Duration::from_millis;
        let mut a = FrameAssembler::new(0, 8);
        a.set_expected([1]);
        a.await_frame(ms(0), 0, ms(1000));
        a.handle_frame_end(1, 0, 0).unwrap();
        assert!(a.poll_frame().is_some());
        a.handle_timeout(ms(2000));
        assert_eq!(a.poll_missing(), None);
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn a_later_frame_can_expect_other_senders() {
        let mut a = FrameAssembler::new(0, 8);
        a.set_expected([1]);
        a.set_expected_from(2, [1, 2, 3]);
        // Rank 3 may send for frame 2 before frames 0 and 1 are done.
        a.handle_cell(3, 1, 2, b(3)).unwrap();
        assert!(matches!(
            a.handle_cell(3, 2, 1, b(3)),
            Err(FrameError::UnexpectedPeer { .. })
        ));
        for f in 0..2 {
            a.handle_frame_end(1, f, 0).unwrap();
            assert_eq!(a.poll_frame().unwrap().frame, f);
        }
        assert_eq!(a.missing(2), vec![1, 2, 3]);
    }

    /// The interleavings of a neighbour's crash and restart (it resends
    /// from its checkpoint at frame 3): frame 2 was handed over, its part
    /// of frame 3 was complete, its part of frame 4 half sent.
    #[test]
    fn a_restarted_peers_replays_are_dropped_and_its_half_sent_frame_taken_whole() {
        let mut a = FrameAssembler::new(0, 8);
        a.set_expected([1, 2]);
        for f in 0..3 {
            for p in [1, 2] {
                a.handle_cell(p, f + 1, f, b(f as u8)).unwrap();
                a.handle_frame_end(p, f, 1).unwrap();
            }
            assert_eq!(a.poll_frame().unwrap().frame, f);
        }
        a.handle_cell(1, 10, 3, b(3)).unwrap();
        a.handle_frame_end(1, 3, 1).unwrap();
        a.handle_cell(1, 11, 4, b(40)).unwrap(); // its old life died here
        assert!(!a.is_replay(1, 2), "no restart yet");
        assert!(matches!(
            a.handle_cell(1, 12, 2, b(2)),
            Err(FrameError::Stale { .. })
        ));

        a.peer_restarted(1);
        // The new life numbers from 1 again and starts at its checkpoint.
        assert!(a.is_replay(1, 2) && a.is_replay(1, 3) && !a.is_replay(1, 4));
        a.handle_cell(1, 1, 2, b(2)).unwrap();
        a.handle_frame_end(1, 2, 1).unwrap();
        a.handle_cell(1, 3, 3, b(33)).unwrap();
        a.handle_frame_end(1, 3, 1).unwrap();
        a.handle_cell(1, 5, 4, b(4)).unwrap();
        a.handle_frame_end(1, 4, 1).unwrap();
        assert_eq!(a.replays_dropped(), 4);
        for f in [3, 4] {
            a.handle_cell(2, 20 + f, f, b(f as u8)).unwrap();
            a.handle_frame_end(2, f, 1).unwrap();
        }
        let f3 = a.poll_frame().unwrap();
        assert_eq!(f3.cells[&1], vec![b(3)], "the first copy of frame 3 stays");
        let f4 = a.poll_frame().unwrap();
        assert_eq!(
            f4.cells[&1],
            vec![b(4)],
            "the half-sent frame 4 is taken whole"
        );
        // A peer that did not restart still may not send stale frames.
        assert!(matches!(
            a.handle_cell(2, 30, 1, b(1)),
            Err(FrameError::Stale { .. })
        ));
    }

    /// A restarted instance resumes at its checkpoint's frame; its
    /// neighbours replay their last frames, of which the older are done.
    #[test]
    fn an_instance_resumed_at_a_frame_drops_replays_of_earlier_frames() {
        let mut a = FrameAssembler::new(5, 4);
        a.set_expected([1]);
        assert!(a.is_replay(1, 4));
        a.handle_cell(1, 1, 4, b(4)).unwrap();
        a.handle_frame_end(1, 4, 1).unwrap();
        a.handle_cell(1, 3, 5, b(5)).unwrap();
        a.handle_frame_end(1, 5, 1).unwrap();
        assert_eq!(a.replays_dropped(), 2);
        let f = a.poll_frame().unwrap();
        assert_eq!((f.frame, f.cells[&1].clone()), (5, vec![b(5)]));
    }
}
