//! Reliable channel: SEND → ACK / ERR with retransmission, deduplication and
//! coalesced feedback, per ordered pair of instances (DESIGN §5).
//!
//! Owns the per-peer send window (tickets, retransmission timers, deadlines)
//! and the per-sender receive state (watermark, dedup window, cached ERRs,
//! answers waiting to be sent). Sans-IO like the rest of `proto`: no sockets,
//! no threads, no clock; randomness (retransmission jitter) comes from a
//! seeded [`SmallRng`] so a simulator run replays exactly.
//!
//! Bounds, all per peer:
//! - in flight: at most `window` unresolved messages, and never an id more
//!   than `dedup_window` above the oldest unresolved one, so the receiver's
//!   dedup window always covers what the sender may still send;
//! - receive slots: ids above the watermark, at most `dedup_window` of them
//!   (ids further ahead are dropped and counted);
//! - cached ERRs: only ids above `watermark - dedup_window`, so at most
//!   `2 · dedup_window`. A sender only retransmits unresolved ids, which the
//!   span limit keeps inside that range, so a duplicate of an ERR id is always
//!   answered with the same ERR.
//!
//! Ticket ids (returned by [`ReliableEndpoint::send`], reported in
//! [`ReliableEvent::Resolved`]) are stable for the life of the endpoint. The
//! id on the wire ([`DataMsg::id`]) equals the ticket until the peer is reset:
//! [`ReliableEndpoint::reset_peer`] renumbers the unanswered messages from 1,
//! so the restarted peer's receive state starts without a gap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use rand::{rngs::SmallRng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::backoff::{BackoffPolicy, RetryTimer};
use super::ring::IdRing;
use super::wire::{DataKind, DataMsg};
use super::{Now, Rank};

/// Tuning of the reliable channel. Both ends of a pair should use the same
/// values (the receiver derives its hole timeout from `deadline`).
#[derive(Clone, Debug, PartialEq)]
pub struct ReliableConfig {
    /// Spacing of retransmissions of an unanswered message.
    pub retransmit: BackoffPolicy,
    /// A message unanswered this long resolves [`Outcome::TimedOut`].
    pub deadline: Duration,
    /// Most unanswered messages in flight towards one peer (at least 1).
    pub window: u32,
    /// Feedback is flushed this long after the first answer became pending…
    pub ack_delay: Duration,
    /// …or as soon as this many answers are pending (at least 1).
    pub ack_batch: u32,
    /// Ids tracked above the watermark per sender (at least 1).
    pub dedup_window: u64,
    /// Cells and frame ends of this many of the latest frames sent to a
    /// peer are kept after they are answered, and sent again if the peer
    /// restarts: its new life resumes from a checkpoint at most this many
    /// frames back and needs them again (0: keep nothing).
    pub replay_frames: u64,
}

impl Default for ReliableConfig {
    fn default() -> Self {
        Self {
            retransmit: BackoffPolicy::new(
                Duration::from_millis(200),
                2.0,
                Duration::from_secs(2),
                0.1,
            ),
            deadline: Duration::from_secs(30),
            window: 4096,
            ack_delay: Duration::ZERO,
            ack_batch: 64,
            // Room above the window for answers that come out of order.
            dedup_window: 16384,
            replay_frames: 2,
        }
    }
}

/// Coalesced ACK/ERR from a receiver to a sender.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// Every id `<= cumulative` has been answered (ACK unless listed in `errors`).
    pub cumulative: u64,
    /// Selectively answered ranges above `cumulative`, inclusive `(lo, hi)`.
    pub ranges: Vec<(u64, u64)>,
    /// Ids answered with ERR (within `cumulative` or `ranges`).
    pub errors: Vec<ErrReport>,
}

/// One message answered with ERR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrReport {
    /// Wire id of the refused message (per (sender, receiver), from 1).
    pub id: u64,
    /// The handler's error code (application-defined).
    pub code: u32,
    /// The handler's error message, for humans.
    pub text: String,
}

/// How a ticket ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver got the message and its handler accepted it.
    Ack,
    /// The receiver got the message but its handler could not process it.
    Err {
        /// The handler's error code (application-defined).
        code: u32,
        /// The handler's error message.
        text: String,
    },
    /// No answer within the deadline; the message may or may not have arrived.
    TimedOut,
}

impl Outcome {
    /// The receiver's handler accepted the message.
    pub fn is_ack(&self) -> bool {
        matches!(self, Outcome::Ack)
    }
}

/// What the endpoint tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReliableEvent {
    /// A new message from `from` for the handler; never emitted twice for one id.
    Deliver {
        /// The sender's rank.
        from: Rank,
        /// The message; answer it with [`ReliableEndpoint::complete`].
        msg: DataMsg,
    },
    /// The ticket `(to, id)` is resolved.
    Resolved {
        /// The receiver's rank.
        to: Rank,
        /// The ticket id returned by [`ReliableEndpoint::send`].
        id: u64,
        /// How it ended.
        outcome: Outcome,
    },
}

/// What the driver must put on the wire towards a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReliableTransmit {
    /// A data message (first send, retransmission or resend after a reset).
    Data(DataMsg),
    /// Coalesced answers to the peer's data messages.
    Feedback(Feedback),
}

/// Why [`ReliableEndpoint::send`] refused a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// Too many messages to this peer are unanswered; wait for a
    /// [`ReliableEvent::Resolved`] (backpressure).
    #[error("window to rank {to} is full ({window} messages unanswered)")]
    WindowFull {
        /// The receiver's rank.
        to: Rank,
        /// The window size ([`ReliableConfig::window`]).
        window: u32,
    },
}

/// Counters, for status output and tests. Everything odd that came off the
/// network is counted here instead of being acted on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReliableStats {
    /// Messages accepted by `send`.
    pub sent: u64,
    /// Retransmissions after a backoff expired.
    pub retransmitted: u64,
    /// Messages sent again because their receiver restarted.
    pub resent_after_reset: u64,
    /// Messages handed to the handler (`Deliver` events).
    pub delivered: u64,
    /// Data messages seen before (answered again, or ignored while running).
    pub duplicates_dropped: u64,
    /// Data messages too far above the watermark, dropped.
    pub beyond_window: u64,
    /// Data messages with an impossible id (0), dropped.
    pub bad_data: u64,
    /// Tickets resolved with ACK.
    pub acks_received: u64,
    /// Tickets resolved with ERR.
    pub errs_received: u64,
    /// Tickets resolved with TimedOut.
    pub timeouts: u64,
    /// Feedback messages ignored: unknown peer, ids never sent, reversed ranges.
    pub bogus_feedback: u64,
    /// Feedback messages produced.
    pub feedback_sent: u64,
    /// `complete` calls for messages not running (already completed, reset, never delivered).
    pub stale_completions: u64,
    /// Ids the receiver gave up waiting for (the sender's deadline has passed).
    pub holes_skipped: u64,
    /// `reset_peer` calls.
    pub peer_resets: u64,
    /// Answered messages of the latest frames sent again to a restarted peer.
    pub replayed_after_reset: u64,
}

struct Outgoing {
    ticket: u64,
    /// Sent again to a restarted peer after it was answered: its ticket is
    /// resolved already, so its outcome is not reported again.
    replay: bool,
    msg: DataMsg,
    retry: RetryTimer,
    deadline: Now,
}

/// Unresolved messages by wire id: ids are handed out in sequence, so a
/// ring from the oldest unresolved id (at most a dedup window long).
type Inflight = IdRing<Outgoing>;

/// Sending half towards one peer.
struct Outbound {
    next_wire: u64,
    next_ticket: u64,
    /// Unresolved messages by wire id.
    inflight: Inflight,
    /// Answered cells and frame ends of the latest frames, with their
    /// tickets, for a restart of the peer (see [`ReliableConfig::replay_frames`]).
    recent: VecDeque<(u64, DataMsg)>,
    /// The highest frame of a cell or frame end sent.
    top_frame: Option<u64>,
    /// Replays in `inflight`: they take no credit from the window.
    replaying: usize,
}

impl Default for Outbound {
    fn default() -> Self {
        Self {
            next_wire: 1,
            next_ticket: 1,
            inflight: Inflight::default(),
            recent: VecDeque::new(),
            top_frame: None,
            replaying: 0,
        }
    }
}

/// Frame messages, the ones a restarted peer may need again.
fn replayable(kind: DataKind) -> bool {
    matches!(kind, DataKind::Cell | DataKind::FrameEnd { .. })
}

impl Outbound {
    /// Drop kept messages older than the latest `keep` frames from the
    /// front (they are kept in the order they were answered, which is by
    /// frame but for stragglers: [`Self::take_recent`] filters those).
    fn prune_recent(&mut self, keep: u64) {
        while self
            .recent
            .front()
            .is_some_and(|(_, m)| !self.is_recent(m, keep))
        {
            self.recent.pop_front();
        }
    }

    fn is_recent(&self, m: &DataMsg, keep: u64) -> bool {
        keep > 0 && m.frame.saturating_add(keep) > self.top_frame.unwrap_or(0)
    }

    /// The kept messages of the latest `keep` frames, for a replay.
    fn take_recent(&mut self, keep: u64) -> Vec<(u64, DataMsg)> {
        let recent = std::mem::take(&mut self.recent);
        recent
            .into_iter()
            .filter(|(_, m)| self.is_recent(m, keep))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Delivered, the handler has not completed yet.
    Running,
    /// Answered (outcome in `Inbound::errors` if ERR).
    Done,
}

/// Receiving half from one peer.
#[derive(Default)]
struct Inbound {
    /// Every id `<= watermark` is answered (or given up as a hole).
    watermark: u64,
    /// Ids above the watermark, at most `dedup_window` ahead of it: entry
    /// `i` is id `watermark + 1 + i` (ids are dense, so a ring, not a map);
    /// `None` = not received. The last entry, if any, is `Some`.
    slots: VecDeque<Option<Slot>>,
    /// ERR outcomes for ids above `watermark - dedup_window`.
    errors: BTreeMap<u64, (u32, String)>,
    /// Answered ids whose answer is not sent yet (unsorted, maybe repeated).
    pending: Vec<u64>,
    pending_since: Option<Now>,
    /// Since when `watermark + 1` is missing while later ids are present.
    hole_since: Option<Now>,
    running: usize,
}

impl Inbound {
    fn answer(&mut self, now: Now, id: u64) {
        self.pending.push(id);
        self.pending_since.get_or_insert(now);
    }

    /// The slot of `id`, if it is above the watermark and was received.
    fn slot(&self, id: u64) -> Option<Slot> {
        let i = id.checked_sub(self.watermark + 1)?;
        self.slots.get(usize::try_from(i).ok()?).copied().flatten()
    }

    /// Mark `id` (above the watermark, within the dedup window) running.
    fn start(&mut self, id: u64) {
        let i = (id - self.watermark - 1) as usize;
        if i >= self.slots.len() {
            self.slots.resize(i, None);
            self.slots.push_back(Some(Slot::Running));
        } else {
            self.slots[i] = Some(Slot::Running);
        }
    }

    /// Ids between the watermark and the first received one.
    fn gap(&self) -> u64 {
        self.slots.iter().take_while(|s| s.is_none()).count() as u64
    }

    fn update_hole(&mut self, now: Now) {
        let hole = self.slots.front().is_some_and(|s| s.is_none());
        if !hole {
            self.hole_since = None;
        } else if self.hole_since.is_none() {
            self.hole_since = Some(now);
        }
    }

    /// Move the watermark over answered ids and prune what it left behind.
    fn advance(&mut self, now: Now, dedup_window: u64) {
        let before = self.watermark;
        while self.slots.front() == Some(&Some(Slot::Done)) {
            self.slots.pop_front();
            self.watermark += 1;
        }
        let floor = self.watermark.saturating_sub(dedup_window);
        if self
            .errors
            .first_key_value()
            .is_some_and(|(&id, _)| id <= floor)
        {
            self.errors = self.errors.split_off(&(floor + 1));
        }
        if self.watermark != before {
            // A new hole starts counting now: later than its true start, so
            // it is given up late rather than early.
            self.hole_since = None;
        }
        self.update_hole(now);
    }

    /// The pending answers as one feedback, once `ack_batch` of them wait.
    fn full_feedback(&mut self, ack_batch: u32) -> Option<Feedback> {
        (self.pending.len() >= ack_batch as usize).then(|| self.feedback())
    }

    fn feedback(&mut self) -> Feedback {
        // An ERR the sender may not know yet must not hide under `cumulative`.
        let cumulative = match self.errors.first_key_value() {
            Some((&e, _)) => self.watermark.min(e - 1),
            None => self.watermark,
        };
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut errors = Vec::new();
        self.pending.sort_unstable();
        self.pending.dedup();
        for &id in self.pending.iter().filter(|&&id| id > cumulative) {
            match ranges.last_mut() {
                Some((_, hi)) if *hi + 1 == id => *hi = id,
                _ => ranges.push((id, id)),
            }
            if let Some((code, text)) = self.errors.get(&id) {
                errors.push(ErrReport {
                    id,
                    code: *code,
                    text: text.clone(),
                });
            }
        }
        self.pending.clear();
        self.pending_since = None;
        Feedback {
            cumulative,
            ranges,
            errors,
        }
    }
}

/// What the receiver answers to a message it handled: ACK, or ERR with
/// a code and a text.
pub type Verdict = Result<(), (u32, String)>;

#[derive(Default)]
struct PeerState {
    out: Outbound,
    inb: Inbound,
}

/// The reliable channel of one instance, with state for every peer it talks to.
pub struct ReliableEndpoint {
    config: ReliableConfig,
    rng: SmallRng,
    /// Ordered so that timers fire in the same order on every run.
    peers: BTreeMap<Rank, PeerState>,
    transmits: VecDeque<(Rank, ReliableTransmit)>,
    events: VecDeque<ReliableEvent>,
    stats: ReliableStats,
    /// No retransmission or deadline of any in-flight message is due
    /// before this (a lower bound, exact after each scan): the in-flight
    /// messages are scanned only when it passes, not on every call.
    timers_due: Option<Now>,
    /// The first retransmission time drawn at a given `now`: every message
    /// sent in one round shares it (and one draw of the jitter).
    first_retry: Option<(Now, Now)>,
    /// Reused buffer of the ids one feedback answers.
    answered: Vec<u64>,
}

impl ReliableEndpoint {
    /// `seed` drives the retransmission jitter. Zero `window`, `ack_batch` or
    /// `dedup_window` are raised to 1.
    pub fn new(mut config: ReliableConfig, seed: u64) -> Self {
        config.window = config.window.max(1);
        config.ack_batch = config.ack_batch.max(1);
        config.dedup_window = config.dedup_window.max(1);
        Self {
            config,
            rng: SmallRng::seed_from_u64(seed),
            peers: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: ReliableStats::default(),
            timers_due: None,
            first_retry: None,
            answered: Vec::new(),
        }
    }

    /// The configuration in force (zero bounds already raised to 1).
    pub fn config(&self) -> &ReliableConfig {
        &self.config
    }

    /// Free window slots towards `to`.
    pub fn credits(&self, to: Rank) -> u32 {
        let Some(out) = self.peers.get(&to).map(|p| &p.out) else {
            return self.config.window;
        };
        // Replays to a restarted peer ride on top of the window: the
        // application's credits (its own messages) stay what it was told.
        let own = out.inflight.len() - out.replaying;
        let by_count = (self.config.window as usize).saturating_sub(own);
        let by_span = match out.inflight.first_id() {
            Some(oldest) => {
                (oldest.saturating_add(self.config.dedup_window)).saturating_sub(out.next_wire)
            }
            None => u64::MAX,
        };
        (by_count as u64).min(by_span) as u32
    }

    /// Queue a message to `to`; returns its ticket id (per receiver, from 1).
    pub fn send(
        &mut self,
        now: Now,
        to: Rank,
        frame: u64,
        kind: DataKind,
        payload: Bytes,
    ) -> Result<u64, SendError> {
        match self.send_many(now, to, frame, kind, std::iter::once(payload)) {
            (first, 1) => Ok(first),
            _ => Err(SendError::WindowFull {
                to,
                window: self.config.window,
            }),
        }
    }

    /// Queue messages of one frame to `to`, as many of `payloads` as its
    /// window has room for (the rest are not taken from the iterator).
    /// Returns the first ticket and how many were queued: their tickets
    /// are consecutive. The same as that many [`Self::send`] calls, at the
    /// cost of one.
    pub fn send_many(
        &mut self,
        now: Now,
        to: Rank,
        frame: u64,
        kind: DataKind,
        payloads: impl IntoIterator<Item = Bytes>,
    ) -> (u64, usize) {
        let room = self.credits(to) as usize;
        let out = &mut self.peers.entry(to).or_default().out;
        let first = out.next_ticket;
        if room == 0 {
            return (first, 0);
        }
        if replayable(kind) && out.top_frame.is_none_or(|t| t < frame) {
            out.top_frame = Some(frame);
            out.prune_recent(self.config.replay_frames);
        }
        // Every message sent at one `now` shares its first retransmission
        // time (one draw of the jitter).
        let retry_at = match self.first_retry {
            Some((at, due)) if at == now => due,
            _ => {
                let due = now + self.config.retransmit.delay(0, &mut self.rng);
                self.first_retry = Some((now, due));
                due
            }
        };
        let deadline = now + self.config.deadline;
        let mut n = 0;
        for payload in payloads.into_iter().take(room) {
            let msg = DataMsg {
                id: out.next_wire,
                frame,
                kind,
                payload,
            };
            self.transmits
                .push_back((to, ReliableTransmit::Data(msg.clone())));
            out.inflight.insert(
                msg.id,
                Outgoing {
                    ticket: out.next_ticket,
                    replay: false,
                    msg,
                    retry: RetryTimer::tried_once(retry_at),
                    deadline,
                },
            );
            out.next_wire += 1;
            out.next_ticket += 1;
            n += 1;
        }
        if n > 0 {
            self.stats.sent += n as u64;
            self.arm(retry_at.min(deadline));
        }
        (first, n)
    }

    /// A data message from `from`: new → `Deliver`; already answered → answer
    /// again with the cached outcome; handler still running → ignored.
    pub fn handle_data(&mut self, now: Now, from: Rank, msg: DataMsg) {
        self.handle_data_many(now, from, [msg]);
    }

    /// Data messages from `from`, each taken as [`Self::handle_data`] takes
    /// it, `from`'s state looked up once.
    pub fn handle_data_many(
        &mut self,
        now: Now,
        from: Rank,
        msgs: impl IntoIterator<Item = DataMsg>,
    ) {
        let dedup_window = self.config.dedup_window;
        let inb = &mut self.peers.entry(from).or_default().inb;
        for msg in msgs {
            let id = msg.id;
            if id == 0 {
                self.stats.bad_data += 1;
                continue;
            }
            let slot = inb.slot(id);
            if id <= inb.watermark || slot == Some(Slot::Done) {
                self.stats.duplicates_dropped += 1;
                inb.answer(now, id);
                if let Some(fb) = inb.full_feedback(self.config.ack_batch) {
                    self.stats.feedback_sent += 1;
                    self.transmits
                        .push_back((from, ReliableTransmit::Feedback(fb)));
                }
                continue;
            }
            if slot == Some(Slot::Running) {
                self.stats.duplicates_dropped += 1;
                continue;
            }
            if id - inb.watermark > dedup_window {
                self.stats.beyond_window += 1;
                continue;
            }
            inb.start(id);
            inb.running += 1;
            inb.update_hole(now);
            self.stats.delivered += 1;
            self.events.push_back(ReliableEvent::Deliver { from, msg });
        }
    }

    /// The handler's outcome for message `id` delivered from `from`.
    /// Calls for messages not running (completed twice, or delivered before
    /// `reset_peer(from)`) are ignored and counted.
    pub fn complete(&mut self, now: Now, from: Rank, id: u64, result: Verdict) {
        self.complete_many(now, from, [(id, result)]);
    }

    /// The outcomes of messages delivered from `from`, `(id, result)`, each
    /// taken as [`Self::complete`] takes it, `from`'s state looked up once.
    pub fn complete_many(
        &mut self,
        now: Now,
        from: Rank,
        results: impl IntoIterator<Item = (u64, Verdict)>,
    ) {
        let dedup_window = self.config.dedup_window;
        let ack_batch = self.config.ack_batch;
        let Some(inb) = self.peers.get_mut(&from).map(|p| &mut p.inb) else {
            self.stats.stale_completions += results.into_iter().count() as u64;
            return;
        };
        for (id, result) in results {
            let at = id
                .checked_sub(inb.watermark + 1)
                .and_then(|i| usize::try_from(i).ok());
            match at.and_then(|i| inb.slots.get_mut(i)) {
                Some(slot @ Some(Slot::Running)) => *slot = Some(Slot::Done),
                _ => {
                    self.stats.stale_completions += 1;
                    continue;
                }
            }
            inb.running -= 1;
            if let Err((code, text)) = result {
                inb.errors.insert(id, (code, text));
            }
            inb.answer(now, id);
            inb.advance(now, dedup_window);
            if let Some(fb) = inb.full_feedback(ack_batch) {
                self.stats.feedback_sent += 1;
                self.transmits
                    .push_back((from, ReliableTransmit::Feedback(fb)));
            }
        }
    }

    /// Feedback from `to`'s receiver: resolves the tickets it covers. Repeats
    /// are harmless; feedback about ids never sent is ignored and counted.
    pub fn handle_feedback(&mut self, _now: Now, from: Rank, fb: Feedback) {
        let Some(out) = self.peers.get_mut(&from).map(|p| &mut p.out) else {
            self.stats.bogus_feedback += 1;
            return;
        };
        let last_sent = out.next_wire - 1;
        let valid = fb.cumulative <= last_sent
            && fb
                .ranges
                .iter()
                .all(|&(lo, hi)| 1 <= lo && lo <= hi && hi <= last_sent)
            && fb.errors.iter().all(|e| 1 <= e.id && e.id <= last_sent);
        if !valid {
            self.stats.bogus_feedback += 1;
            return;
        }
        let mut answered = std::mem::take(&mut self.answered);
        answered.clear();
        answered.extend(out.inflight.ids_in(0, fb.cumulative));
        for &(lo, hi) in &fb.ranges {
            answered.extend(out.inflight.ids_in(lo, hi));
        }
        let errors: HashMap<u64, &ErrReport> = fb.errors.iter().map(|e| (e.id, e)).collect();
        let keep = self.config.replay_frames;
        for &id in &answered {
            let Some(o) = out.inflight.remove(id) else {
                continue; // listed twice
            };
            let replay = o.replay;
            if replayable(o.msg.kind) && out.is_recent(&o.msg, keep) {
                out.recent.push_back((o.ticket, o.msg));
            }
            if replay {
                out.replaying -= 1;
                continue;
            }
            let outcome = match errors.get(&id) {
                Some(e) => {
                    self.stats.errs_received += 1;
                    Outcome::Err {
                        code: e.code,
                        text: e.text.clone(),
                    }
                }
                None => {
                    self.stats.acks_received += 1;
                    Outcome::Ack
                }
            };
            self.events.push_back(ReliableEvent::Resolved {
                to: from,
                id: o.ticket,
                outcome,
            });
        }
        self.answered = answered;
    }

    /// Retransmissions, deadlines, hole give-ups and feedback flushes due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        let hole_timeout = self.hole_timeout();
        let scan = self.timers_due.is_some_and(|t| t <= now);
        let Self {
            config,
            rng,
            peers,
            transmits,
            events,
            stats,
            timers_due,
            ..
        } = self;
        if scan {
            *timers_due = None;
        }
        for (&rank, peer) in peers.iter_mut() {
            let out = &mut peer.out;
            if scan {
                let expired: Vec<u64> = out
                    .inflight
                    .iter()
                    .filter(|(_, o)| o.deadline <= now)
                    .map(|(id, _)| id)
                    .collect();
                for id in expired {
                    let Some(o) = out.inflight.remove(id) else {
                        continue;
                    };
                    if o.replay {
                        out.replaying -= 1;
                    } else {
                        stats.timeouts += 1;
                        events.push_back(ReliableEvent::Resolved {
                            to: rank,
                            id: o.ticket,
                            outcome: Outcome::TimedOut,
                        });
                    }
                }
                for o in out.inflight.values_mut() {
                    if o.retry.is_due(now) {
                        o.retry.fire(&config.retransmit, now, rng);
                        stats.retransmitted += 1;
                        transmits.push_back((rank, ReliableTransmit::Data(o.msg.clone())));
                    }
                    let due = o.retry.next().min(o.deadline);
                    *timers_due = Some(timers_due.map_or(due, |t| t.min(due)));
                }
            }

            let inb = &mut peer.inb;
            if inb.hole_since.is_some_and(|t| t + hole_timeout <= now) && !inb.slots.is_empty() {
                let gap = inb.gap();
                stats.holes_skipped += gap;
                inb.slots.drain(..gap as usize);
                inb.watermark += gap;
                inb.advance(now, config.dedup_window);
            }
            if inb
                .pending_since
                .is_some_and(|t| t + config.ack_delay <= now)
            {
                stats.feedback_sent += 1;
                transmits.push_back((rank, ReliableTransmit::Feedback(inb.feedback())));
            }
        }
    }

    /// Send the feedback that is due at `now` (answers pending for
    /// `ack_delay`), without waiting for [`Self::handle_timeout`]: with no
    /// delay, the answers completed in one round go out together at its end.
    pub fn flush_feedback(&mut self, now: Now) {
        for (&rank, peer) in self.peers.iter_mut() {
            let inb = &mut peer.inb;
            if inb
                .pending_since
                .is_some_and(|t| t + self.config.ack_delay <= now)
            {
                self.stats.feedback_sent += 1;
                self.transmits
                    .push_back((rank, ReliableTransmit::Feedback(inb.feedback())));
            }
        }
    }

    /// A retransmission timer or deadline at `due` was (re)armed.
    fn arm(&mut self, due: Now) {
        self.timers_due = Some(self.timers_due.map_or(due, |t| t.min(due)));
    }

    /// The earliest time [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Now> {
        let hole_timeout = self.hole_timeout();
        let mut earliest: Option<Now> = None;
        let mut consider = |t: Now| {
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        };
        if let Some(t) = self.timers_due {
            consider(t);
        }
        for peer in self.peers.values() {
            if let Some(t) = peer.inb.pending_since {
                consider(t + self.config.ack_delay);
            }
            if let Some(t) = peer.inb.hole_since {
                consider(t + hole_timeout);
            }
        }
        earliest
    }

    /// Whether [`Self::poll_transmit`] has something.
    pub fn has_transmits(&self) -> bool {
        !self.transmits.is_empty()
    }

    /// The next message to put on the wire, with its destination.
    pub fn poll_transmit(&mut self, _now: Now) -> Option<(Rank, ReliableTransmit)> {
        self.transmits.pop_front()
    }

    /// The next delivery or resolved ticket for the driver.
    pub fn poll_event(&mut self) -> Option<ReliableEvent> {
        self.events.pop_front()
    }

    /// `peer` restarted (new incarnation): what we received from its old life
    /// is forgotten (completions still running for it are ignored), and what
    /// we sent it and is unanswered is sent again, renumbered from 1, keeping
    /// its ticket and deadline. Answered cells and frame ends of the latest
    /// [`ReliableConfig::replay_frames`] frames go with them, in their
    /// original order: the new life resumes from a checkpoint and needs
    /// them again. Their tickets are resolved already: no second
    /// [`ReliableEvent::Resolved`] comes for them.
    pub fn reset_peer(&mut self, now: Now, peer: Rank) {
        self.stats.peer_resets += 1;
        self.transmits.retain(|(to, _)| *to != peer);
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.inb = Inbound::default();
        let deadline = now + self.config.deadline;
        let mut all: Vec<Outgoing> = state.out.inflight.take_all();
        let recent = state.out.take_recent(self.config.replay_frames);
        all.extend(recent.into_iter().map(|(ticket, msg)| Outgoing {
            ticket,
            replay: true,
            msg,
            retry: RetryTimer::start(now),
            deadline,
        }));
        all.sort_by_key(|o| o.ticket);
        let mut wire = 1;
        let mut replaying = 0;
        let mut earliest: Option<Now> = None;
        for mut o in all {
            o.msg.id = wire;
            o.retry = RetryTimer::start(now);
            o.retry.fire(&self.config.retransmit, now, &mut self.rng);
            earliest = Some(earliest.map_or(o.retry.next(), |e| e.min(o.retry.next())));
            self.transmits
                .push_back((peer, ReliableTransmit::Data(o.msg.clone())));
            if o.replay {
                replaying += 1;
                self.stats.replayed_after_reset += 1;
            } else {
                self.stats.resent_after_reset += 1;
            }
            state.out.inflight.insert(wire, o);
            wire += 1;
        }
        state.out.next_wire = wire;
        state.out.replaying = replaying;
        if let Some(t) = earliest {
            self.arm(t);
        }
    }

    /// `peer` asked for what it misses (a frame query): resend everything
    /// unanswered to it now and restart those backoffs. Returns how many.
    pub fn resend_now(&mut self, now: Now, peer: Rank) -> usize {
        let Some(state) = self.peers.get_mut(&peer) else {
            return 0;
        };
        let mut earliest: Option<Now> = None;
        for o in state.out.inflight.values_mut() {
            o.retry = RetryTimer::start(now);
            o.retry.fire(&self.config.retransmit, now, &mut self.rng);
            earliest = Some(earliest.map_or(o.retry.next(), |e| e.min(o.retry.next())));
            self.stats.retransmitted += 1;
            self.transmits
                .push_back((peer, ReliableTransmit::Data(o.msg.clone())));
        }
        let n = state.out.inflight.len();
        if let Some(t) = earliest {
            self.arm(t);
        }
        n
    }

    /// Unanswered messages towards `peer`.
    pub fn unanswered_to(&self, peer: Rank) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.out.inflight.len())
    }

    /// Outgoing messages not yet resolved (a draining shutdown waits for 0).
    pub fn unanswered(&self) -> usize {
        self.peers.values().map(|p| p.out.inflight.len()).sum()
    }

    /// Delivered messages whose outcome is not sent yet: handlers still
    /// running plus answers waiting in the feedback coalescer.
    pub fn pending_answers(&self) -> usize {
        self.peers
            .values()
            .map(|p| p.inb.running + p.inb.pending.len())
            .sum()
    }

    /// Counters since the endpoint was created.
    pub fn stats(&self) -> &ReliableStats {
        &self.stats
    }

    /// How long a receiver waits for a missing id before giving it up: by
    /// then the sender has resolved it TimedOut and stopped retransmitting.
    fn hole_timeout(&self) -> Duration {
        self.config.deadline + self.config.retransmit.ceiling
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{seq::SliceRandom, Rng};

    const A: Rank = 0;
    const B: Rank = 1;
    type HandlerResult = Result<(), (u32, String)>;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn no_jitter() -> ReliableConfig {
        ReliableConfig {
            retransmit: BackoffPolicy::new(ms(200), 2.0, Duration::from_secs(2), 0.0),
            ..ReliableConfig::default()
        }
    }

    /// Two endpoints, ranks 0 and 1, wired through in-memory queues with a
    /// manual clock. Tests drop or duplicate packets by editing the queues.
    struct Pair {
        now: Now,
        ep: [ReliableEndpoint; 2],
        /// Packets on the way to endpoint `i`.
        wire: [Vec<ReliableTransmit>; 2],
        /// Delivered messages whose handler has not completed, per endpoint.
        running: [Vec<(Rank, DataMsg)>; 2],
        delivered: [Vec<DataMsg>; 2],
        resolved: [Vec<(u64, Outcome)>; 2],
        feedback_count: [usize; 2],
    }

    impl Pair {
        fn new(config: ReliableConfig) -> Self {
            Self {
                now: Duration::ZERO,
                ep: [
                    ReliableEndpoint::new(config.clone(), 1),
                    ReliableEndpoint::new(config, 2),
                ],
                wire: [Vec::new(), Vec::new()],
                running: [Vec::new(), Vec::new()],
                delivered: [Vec::new(), Vec::new()],
                resolved: [Vec::new(), Vec::new()],
                feedback_count: [0, 0],
            }
        }

        fn send(&mut self, from: usize, payload: &str) -> u64 {
            let to = 1 - from as Rank;
            self.ep[from]
                .send(
                    self.now,
                    to,
                    0,
                    DataKind::Cell,
                    Bytes::copy_from_slice(payload.as_bytes()),
                )
                .unwrap()
        }

        /// Move everything the endpoints want to transmit onto the wire.
        fn transmit(&mut self) {
            for i in 0..2 {
                while let Some((to, t)) = self.ep[i].poll_transmit(self.now) {
                    assert_eq!(to as usize, 1 - i);
                    if matches!(t, ReliableTransmit::Feedback(_)) {
                        self.feedback_count[i] += 1;
                    }
                    self.wire[to as usize].push(t);
                }
            }
        }

        /// Hand every packet on the wire to its endpoint and collect events.
        fn receive(&mut self) {
            for i in 0..2 {
                let from = 1 - i as Rank;
                for t in std::mem::take(&mut self.wire[i]) {
                    match t {
                        ReliableTransmit::Data(m) => self.ep[i].handle_data(self.now, from, m),
                        ReliableTransmit::Feedback(f) => {
                            self.ep[i].handle_feedback(self.now, from, f)
                        }
                    }
                }
            }
            self.collect();
        }

        fn collect(&mut self) {
            for i in 0..2 {
                while let Some(ev) = self.ep[i].poll_event() {
                    match ev {
                        ReliableEvent::Deliver { from, msg } => {
                            self.delivered[i].push(msg.clone());
                            self.running[i].push((from, msg));
                        }
                        ReliableEvent::Resolved { id, outcome, .. } => {
                            self.resolved[i].push((id, outcome))
                        }
                    }
                }
            }
        }

        /// Complete every running handler at endpoint `i` with `f`.
        fn complete_all(&mut self, i: usize, f: impl Fn(&DataMsg) -> HandlerResult) {
            for (from, msg) in std::mem::take(&mut self.running[i]) {
                self.ep[i].complete(self.now, from, msg.id, f(&msg));
            }
            self.collect();
        }

        /// Advance the clock to `t` and run timers.
        fn advance_to(&mut self, t: Now) {
            self.now = self.now.max(t);
            for ep in &mut self.ep {
                ep.handle_timeout(self.now);
            }
            self.collect();
        }

        /// Jump to the next timer of either endpoint.
        fn next_timer(&mut self) -> bool {
            let next = self.ep.iter().filter_map(|e| e.poll_timeout()).min();
            match next {
                Some(t) => {
                    self.advance_to(t);
                    true
                }
                None => false,
            }
        }

        /// Exchange packets, completing handlers with `f`, until nothing is left to do.
        fn run(&mut self, f: impl Fn(&DataMsg) -> HandlerResult) {
            for _ in 0..10_000 {
                self.transmit();
                self.receive();
                self.complete_all(0, &f);
                self.complete_all(1, &f);
                self.transmit();
                if self.wire.iter().all(Vec::is_empty) && !self.next_timer() {
                    return;
                }
            }
            panic!("pair did not settle");
        }
    }

    fn ok(_: &DataMsg) -> HandlerResult {
        Ok(())
    }

    #[test]
    fn send_deliver_complete_resolves_ack() {
        let mut p = Pair::new(ReliableConfig::default());
        let t = p.send(0, "cell");
        assert_eq!(t, 1);
        assert_eq!(p.ep[0].credits(B), p.ep[0].config().window - 1);
        p.transmit();
        p.receive();
        assert_eq!(p.delivered[1].len(), 1);
        assert_eq!(&p.delivered[1][0].payload[..], b"cell");
        assert_eq!(p.ep[1].pending_answers(), 1);
        p.complete_all(1, ok);
        p.run(ok);
        assert_eq!(p.resolved[0], vec![(1, Outcome::Ack)]);
        assert_eq!(p.ep[0].credits(B), p.ep[0].config().window);
        assert_eq!(p.ep[0].unanswered(), 0);
        assert_eq!(p.ep[1].pending_answers(), 0);
    }

    #[test]
    fn flush_feedback_sends_the_answers_of_a_round_in_one_message() {
        let mut p = Pair::new(ReliableConfig::default());
        for i in 0..3 {
            p.send(0, &format!("cell {i}"));
        }
        p.transmit();
        p.receive();
        p.complete_all(1, ok);
        assert!(!p.ep[1].has_transmits(), "answers wait for the flush");
        p.ep[1].flush_feedback(p.now);
        p.transmit();
        assert_eq!(p.feedback_count[1], 1);
        p.receive();
        assert_eq!(p.resolved[0].len(), 3);
        p.ep[1].flush_feedback(p.now);
        assert!(!p.ep[1].has_transmits(), "nothing left to answer");
    }

    #[test]
    fn handler_err_resolves_err_with_its_code_and_text() {
        let mut p = Pair::new(ReliableConfig::default());
        p.send(0, "bad");
        p.run(|_| Err((7, "cell out of domain".into())));
        assert_eq!(
            p.resolved[0],
            vec![(
                1,
                Outcome::Err {
                    code: 7,
                    text: "cell out of domain".into()
                }
            )]
        );
        assert_eq!(p.ep[0].stats().errs_received, 1);
    }

    #[test]
    fn lost_data_is_retransmitted_and_delivered_once() {
        let mut p = Pair::new(no_jitter());
        p.send(0, "x");
        p.transmit();
        p.wire[1].clear(); // lost
        p.receive();
        assert!(p.delivered[1].is_empty());
        assert_eq!(p.ep[0].poll_timeout(), Some(ms(200)));
        p.run(ok);
        assert_eq!(p.delivered[1].len(), 1);
        assert_eq!(p.resolved[0], vec![(1, Outcome::Ack)]);
        assert_eq!(p.ep[0].stats().retransmitted, 1);
    }

    #[test]
    fn lost_feedback_is_answered_again_from_cache_without_calling_the_handler() {
        let mut p = Pair::new(no_jitter());
        p.send(0, "x");
        p.transmit();
        p.receive();
        p.complete_all(1, ok);
        p.advance_to(ms(1));
        p.transmit();
        assert!(matches!(p.wire[0][..], [ReliableTransmit::Feedback(_)]));
        p.wire[0].clear(); // feedback lost
        p.run(ok);
        assert_eq!(p.delivered[1].len(), 1, "handler must not run twice");
        assert_eq!(p.ep[1].stats().duplicates_dropped, 1);
        assert_eq!(p.resolved[0], vec![(1, Outcome::Ack)]);
    }

    #[test]
    fn duplicate_of_an_err_id_is_answered_with_the_same_err_after_the_watermark_passed_it() {
        let mut p = Pair::new(no_jitter());
        p.send(0, "bad");
        p.transmit();
        p.receive();
        p.complete_all(1, |_| Err((3, "nope".into())));
        p.advance_to(ms(1));
        p.transmit();
        p.wire[0].clear(); // the ERR is lost
        for i in 0..10 {
            p.send(0, &format!("good {i}"));
        }
        p.transmit();
        p.receive();
        p.complete_all(1, ok);
        p.advance_to(ms(2));
        p.transmit();
        p.receive();
        // 2..=11 resolved, the cumulative answer must not claim 1 as ACK.
        assert_eq!(p.resolved[0].len(), 10);
        assert!(p.resolved[0]
            .iter()
            .all(|(id, o)| *id > 1 && *o == Outcome::Ack));
        p.run(ok);
        assert_eq!(
            p.resolved[0].last(),
            Some(&(
                1,
                Outcome::Err {
                    code: 3,
                    text: "nope".into()
                }
            ))
        );
        assert_eq!(p.delivered[1].len(), 11);
    }

    #[test]
    fn duplicate_while_the_handler_runs_is_neither_delivered_nor_answered() {
        let mut p = Pair::new(no_jitter());
        p.send(0, "slow");
        p.transmit();
        p.receive();
        assert_eq!(p.running[1].len(), 1);
        let held = std::mem::take(&mut p.running[1]);
        for _ in 0..3 {
            p.next_timer(); // retransmissions
            p.transmit();
            p.receive();
            assert!(p.wire[0].is_empty());
            p.transmit();
            assert!(p.wire[0].is_empty(), "nothing answered while running");
        }
        assert_eq!(p.delivered[1].len(), 1);
        assert_eq!(p.ep[1].stats().duplicates_dropped, 3);
        p.running[1] = held;
        p.run(ok);
        assert_eq!(p.resolved[0], vec![(1, Outcome::Ack)]);
        assert_eq!(p.delivered[1].len(), 1);
    }

    #[test]
    fn deadline_resolves_timed_out_and_returns_the_credit() {
        let cfg = ReliableConfig {
            window: 2,
            deadline: Duration::from_secs(5),
            ..no_jitter()
        };
        let mut ep = ReliableEndpoint::new(cfg, 9);
        let now = Duration::ZERO;
        ep.send(now, B, 0, DataKind::Cell, Bytes::new()).unwrap();
        ep.send(now, B, 0, DataKind::Cell, Bytes::new()).unwrap();
        assert_eq!(ep.credits(B), 0);
        assert_eq!(
            ep.send(now, B, 0, DataKind::Cell, Bytes::new()),
            Err(SendError::WindowFull { to: B, window: 2 })
        );
        let mut t = now;
        while let Some(next) = ep.poll_timeout() {
            assert!(
                next <= Duration::from_secs(5),
                "nothing waits past the deadline"
            );
            t = next;
            ep.handle_timeout(t);
        }
        assert_eq!(t, Duration::from_secs(5));
        let outcomes: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
        assert_eq!(
            outcomes,
            vec![
                ReliableEvent::Resolved {
                    to: B,
                    id: 1,
                    outcome: Outcome::TimedOut
                },
                ReliableEvent::Resolved {
                    to: B,
                    id: 2,
                    outcome: Outcome::TimedOut
                },
            ]
        );
        assert_eq!(ep.credits(B), 2);
        assert_eq!(ep.stats().timeouts, 2);
        assert!(ep.stats().retransmitted >= 4);
    }

    #[test]
    fn full_window_refuses_until_feedback_returns_credits() {
        let cfg = ReliableConfig {
            window: 4,
            ..ReliableConfig::default()
        };
        let mut p = Pair::new(cfg);
        for i in 0..4 {
            p.send(0, &i.to_string());
        }
        let err = p.ep[0].send(p.now, B, 0, DataKind::Cell, Bytes::new());
        assert_eq!(err, Err(SendError::WindowFull { to: B, window: 4 }));
        assert_eq!(
            err.unwrap_err().to_string(),
            "window to rank 1 is full (4 messages unanswered)"
        );
        p.run(ok);
        assert_eq!(p.ep[0].credits(B), 4);
        assert_eq!(p.send(0, "next"), 5);
    }

    #[test]
    fn send_many_takes_what_the_window_holds_with_consecutive_tickets() {
        let cfg = ReliableConfig {
            window: 4,
            ..ReliableConfig::default()
        };
        let mut p = Pair::new(cfg);
        p.send(0, "single");
        let mut pulled = 0;
        let payloads = (0..10).map(|i| {
            pulled += 1;
            Bytes::from(format!("many {i}"))
        });
        let (first, n) = p.ep[0].send_many(p.now, B, 0, DataKind::Cell, payloads);
        assert_eq!((first, n), (2, 3), "three more fit in a window of four");
        assert_eq!(pulled, 3, "payloads beyond the window stay in the iterator");
        let none = p.ep[0].send_many(p.now, B, 0, DataKind::Cell, [Bytes::new()]);
        assert_eq!(none, (5, 0), "a full window takes nothing");
        p.run(ok);
        let got: Vec<_> = p.delivered[1].iter().map(|m| m.payload.clone()).collect();
        assert_eq!(got, ["single", "many 0", "many 1", "many 2"]);
        let tickets: Vec<_> = p.resolved[0].iter().map(|(t, _)| *t).collect();
        assert_eq!(tickets, [1, 2, 3, 4]);
        assert!(p.resolved[0].iter().all(|(_, o)| o.is_ack()));
    }

    #[test]
    fn runs_of_data_and_completions_are_taken_as_one_at_a_time() {
        let cfg = ReliableConfig {
            ack_batch: 2,
            ..ReliableConfig::default()
        };
        let mut ep = ReliableEndpoint::new(cfg, 1);
        let now = Duration::ZERO;
        let msg = |id: u64| DataMsg {
            id,
            frame: 0,
            kind: DataKind::Cell,
            payload: Bytes::new(),
        };
        // A repeat within the run, and an id 0, are not delivered.
        ep.handle_data_many(now, A, [msg(1), msg(2), msg(1), msg(0), msg(3)]);
        let delivered: Vec<u64> = std::iter::from_fn(|| ep.poll_event())
            .map(|e| match e {
                ReliableEvent::Deliver { msg, .. } => msg.id,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(delivered, [1, 2, 3]);
        assert_eq!(ep.stats().duplicates_dropped, 1);
        assert_eq!(ep.stats().bad_data, 1);
        // Completing 2 twice counts one stale completion; feedback goes out
        // every `ack_batch` answers, as with single completions.
        let err = Err((7, "no".to_string()));
        ep.complete_many(now, A, [(1, Ok(())), (2, err), (2, Ok(())), (3, Ok(()))]);
        assert_eq!(ep.stats().stale_completions, 1);
        let feedback: Vec<Feedback> = std::iter::from_fn(|| ep.poll_transmit(now))
            .map(|(to, t)| match t {
                ReliableTransmit::Feedback(fb) if to == A => fb,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            feedback.len(),
            1,
            "3 answers, a batch of 2 sent: {feedback:?}"
        );
        assert_eq!(feedback[0].cumulative, 1, "the ERR of 2 is not hidden");
        assert_eq!(feedback[0].errors[0].id, 2);
        assert_eq!(ep.pending_answers(), 1);
    }

    #[test]
    fn out_of_order_completions_are_coalesced_into_few_feedbacks() {
        let mut p = Pair::new(ReliableConfig::default());
        for i in 0..100 {
            p.send(0, &i.to_string());
        }
        p.transmit();
        p.receive();
        let mut running = std::mem::take(&mut p.running[1]);
        running.shuffle(&mut SmallRng::seed_from_u64(5));
        for (from, msg) in running {
            let result = if msg.id % 10 == 0 {
                Err((1, format!("e{}", msg.id)))
            } else {
                Ok(())
            };
            p.ep[1].complete(p.now, from, msg.id, result);
        }
        p.run(ok);
        assert!(
            p.feedback_count[1] <= 5,
            "{} feedbacks for 100 answers",
            p.feedback_count[1]
        );
        assert_eq!(p.resolved[0].len(), 100);
        for (id, outcome) in &p.resolved[0] {
            let want = if id % 10 == 0 {
                Outcome::Err {
                    code: 1,
                    text: format!("e{id}"),
                }
            } else {
                Outcome::Ack
            };
            assert_eq!(outcome, &want, "ticket {id}");
        }
        assert_eq!(p.ep[0].stats().retransmitted, 0);
    }

    #[test]
    fn bogus_feedback_and_data_are_ignored_and_counted() {
        let mut ep = ReliableEndpoint::new(ReliableConfig::default(), 1);
        let now = Duration::ZERO;
        ep.handle_feedback(
            now,
            42,
            Feedback {
                cumulative: 5,
                ..Feedback::default()
            },
        );
        for _ in 0..3 {
            ep.send(now, B, 0, DataKind::Cell, Bytes::new()).unwrap();
        }
        let err = |id| ErrReport {
            id,
            code: 1,
            text: "x".into(),
        };
        let bogus = [
            Feedback {
                cumulative: u64::MAX,
                ..Feedback::default()
            },
            Feedback {
                cumulative: 4,
                ..Feedback::default()
            },
            Feedback {
                ranges: vec![(3, 2)],
                ..Feedback::default()
            },
            Feedback {
                ranges: vec![(0, u64::MAX)],
                ..Feedback::default()
            },
            Feedback {
                ranges: vec![(2, 1 << 40)],
                ..Feedback::default()
            },
            Feedback {
                ranges: vec![(0, 0)],
                ..Feedback::default()
            },
            Feedback {
                cumulative: 3,
                errors: vec![err(99)],
                ..Feedback::default()
            },
        ];
        for fb in bogus {
            ep.handle_feedback(now, B, fb);
        }
        assert_eq!(ep.stats().bogus_feedback, 8);
        assert_eq!(ep.unanswered(), 3);
        assert!(std::iter::from_fn(|| ep.poll_event()).next().is_none());
        // A valid answer still works afterwards, and repeating it is harmless.
        let fb = Feedback {
            cumulative: 1,
            ranges: vec![(3, 3)],
            errors: vec![err(3)],
        };
        ep.handle_feedback(now, B, fb.clone());
        ep.handle_feedback(now, B, fb);
        let events: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
        assert_eq!(events.len(), 2);
        assert_eq!(ep.unanswered(), 1);

        ep.handle_data(
            now,
            A,
            DataMsg {
                id: 0,
                frame: 0,
                kind: DataKind::Cell,
                payload: Bytes::new(),
            },
        );
        ep.handle_data(
            now,
            A,
            DataMsg {
                id: u64::MAX,
                frame: 0,
                kind: DataKind::Cell,
                payload: Bytes::new(),
            },
        );
        ep.complete(now, A, 77, Ok(()));
        ep.complete(now, 99, 1, Err((1, "x".into())));
        assert_eq!(ep.stats().bad_data, 1);
        assert_eq!(ep.stats().beyond_window, 1);
        assert_eq!(ep.stats().stale_completions, 2);
        assert!(ep.poll_event().is_none());
    }

    #[test]
    fn reset_peer_resends_unanswered_messages_renumbered_with_their_tickets() {
        let mut p = Pair::new(ReliableConfig {
            replay_frames: 0,
            ..no_jitter()
        });
        p.send(0, "one");
        p.run(ok);
        assert_eq!(p.resolved[0], vec![(1, Outcome::Ack)]);
        p.send(0, "two");
        p.send(0, "three");
        p.transmit();
        p.wire[1].clear(); // lost with the old incarnation of B
                           // B restarts: a fresh endpoint; A learns of the new incarnation.
        p.ep[1] = ReliableEndpoint::new(no_jitter(), 3);
        p.delivered[1].clear();
        p.ep[0].reset_peer(p.now, B);
        assert_eq!(p.ep[0].stats().resent_after_reset, 2);
        p.run(ok);
        let got: Vec<_> = p.delivered[1]
            .iter()
            .map(|m| (m.id, m.payload.clone()))
            .collect();
        assert_eq!(
            got,
            vec![(1, Bytes::from("two")), (2, Bytes::from("three"))]
        );
        assert_eq!(&p.resolved[0][1..], &[(2, Outcome::Ack), (3, Outcome::Ack)]);
        assert_eq!(p.ep[0].stats().retransmitted, 0);
    }

    /// A neighbour restarted from a checkpoint: the answered cells and
    /// frame ends of the last two frames go to its new life again, with the
    /// unanswered ones, in the order they were first sent; older frames and
    /// collective messages do not.
    #[test]
    fn reset_peer_replays_the_latest_frames_in_send_order() {
        let mut p = Pair::new(no_jitter());
        let send = |p: &mut Pair, frame: u64, kind: DataKind, what: &str| {
            p.ep[0]
                .send(
                    p.now,
                    B,
                    frame,
                    kind,
                    Bytes::copy_from_slice(what.as_bytes()),
                )
                .unwrap()
        };
        let end = DataKind::FrameEnd { count: 1 };
        for f in 0..3 {
            send(&mut p, f, DataKind::Cell, &format!("cell {f}"));
            send(&mut p, f, end, &format!("end {f}"));
        }
        send(&mut p, 2, DataKind::Collective, "collective");
        p.run(ok);
        assert_eq!(p.resolved[0].len(), 7);
        send(&mut p, 3, DataKind::Cell, "cell 3");
        p.transmit();
        p.wire[1].clear(); // lost with B's old life

        p.ep[1] = ReliableEndpoint::new(no_jitter(), 3);
        p.delivered[1].clear();
        p.ep[0].reset_peer(p.now, B);
        assert_eq!(p.ep[0].stats().resent_after_reset, 1);
        assert_eq!(p.ep[0].stats().replayed_after_reset, 2);
        assert_eq!(
            p.ep[0].credits(B),
            p.ep[0].config().window - 1,
            "replays take no credit"
        );
        p.run(ok);
        let got: Vec<_> = p.delivered[1]
            .iter()
            .map(|m| (m.id, String::from_utf8_lossy(&m.payload).to_string()))
            .collect();
        let want: Vec<_> = ["cell 2", "end 2", "cell 3"]
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64 + 1, s.to_string()))
            .collect();
        assert_eq!(got, want, "frame 1 is older than the last two frames sent");
        assert_eq!(p.resolved[0].len(), 8, "replays resolve no ticket twice");
        assert_eq!(p.resolved[0].last(), Some(&(8, Outcome::Ack)));
    }

    #[test]
    fn reset_peer_forgets_receive_state_and_ignores_old_completions() {
        let mut p = Pair::new(no_jitter());
        p.send(0, "old life");
        p.transmit();
        p.receive();
        let stale = std::mem::take(&mut p.running[1]);
        p.ep[1].reset_peer(p.now, A);
        assert_eq!(p.ep[1].pending_answers(), 0);
        for (from, msg) in stale {
            p.ep[1].complete(p.now, from, msg.id, Ok(()));
        }
        assert_eq!(p.ep[1].stats().stale_completions, 1);
        // A restarted too: its new life numbers from 1 again and is delivered.
        p.ep[0] = ReliableEndpoint::new(no_jitter(), 4);
        p.send(0, "new life");
        p.run(ok);
        assert_eq!(p.delivered[1].len(), 2);
        assert_eq!(p.resolved[0], vec![(1, Outcome::Ack)]);
    }

    #[test]
    fn timed_out_message_does_not_wedge_the_receivers_dedup_window() {
        let cfg = ReliableConfig {
            window: 8,
            dedup_window: 8,
            deadline: Duration::from_secs(3),
            // Retries every 200 ms: messages refused while the receiver still
            // waits for the hole (deadline + ceiling) get through in time.
            retransmit: BackoffPolicy::new(ms(200), 1.0, ms(200), 0.0),
            ..ReliableConfig::default()
        };
        let mut p = Pair::new(cfg);
        p.send(0, "lost forever");
        let mut sent = 1;
        for _ in 0..200 {
            p.transmit();
            p.wire[1].retain(
                |t| !matches!(t, ReliableTransmit::Data(m) if &m.payload[..] == b"lost forever"),
            );
            p.receive();
            p.complete_all(1, ok);
            p.transmit();
            while sent < 40 && p.ep[0].credits(B) > 0 {
                p.send(0, "later");
                sent += 1;
            }
            if p.wire.iter().all(Vec::is_empty) && !p.next_timer() {
                break;
            }
        }
        assert_eq!(sent, 40);
        assert_eq!(p.resolved[0].len(), 40);
        assert_eq!(
            p.resolved[0]
                .iter()
                .filter(|(_, o)| *o == Outcome::TimedOut)
                .count(),
            1
        );
        assert_eq!(p.delivered[1].len(), 39);
        assert_eq!(p.ep[1].stats().holes_skipped, 1);
    }

    /// Both directions carry data; packets are lost, duplicated and
    /// reordered; handlers complete in random order, some with ERR.
    fn lossy_run(seed: u64, per_side: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let cfg = ReliableConfig {
            deadline: Duration::from_secs(3600),
            window: 16,
            ack_batch: 8,
            ..ReliableConfig::default()
        };
        let mut ep = [
            ReliableEndpoint::new(cfg.clone(), seed),
            ReliableEndpoint::new(cfg, !seed),
        ];
        let mut now = Duration::ZERO;
        let mut wire: [Vec<ReliableTransmit>; 2] = [Vec::new(), Vec::new()];
        let mut running: [Vec<(Rank, u64, u64)>; 2] = [Vec::new(), Vec::new()];
        let mut delivered: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        let mut tickets: [BTreeMap<u64, u64>; 2] = [BTreeMap::new(), BTreeMap::new()];
        let mut outcomes: [BTreeMap<u64, Outcome>; 2] = [BTreeMap::new(), BTreeMap::new()];
        let mut next_payload = [0u64; 2];
        let expected = |n: u64| {
            if n % 7 == 0 {
                Err((7, format!("p{n}")))
            } else {
                Ok(())
            }
        };
        for _round in 0..100_000 {
            for i in 0..2 {
                while next_payload[i] < per_side
                    && ep[i].credits(1 - i as Rank) > 0
                    && rng.gen_bool(0.5)
                {
                    let n = next_payload[i];
                    let t = ep[i]
                        .send(
                            now,
                            1 - i as Rank,
                            0,
                            DataKind::Cell,
                            Bytes::copy_from_slice(&n.to_le_bytes()),
                        )
                        .unwrap();
                    tickets[i].insert(t, n);
                    next_payload[i] += 1;
                }
                while let Some((to, t)) = ep[i].poll_transmit(now) {
                    let q = &mut wire[to as usize];
                    if rng.gen_bool(0.2) {
                        continue; // lost
                    }
                    let copies = if rng.gen_bool(0.1) { 2 } else { 1 };
                    for _ in 0..copies {
                        let at = rng.gen_range(0..=q.len());
                        q.insert(at, t.clone()); // reordered
                    }
                }
            }
            for i in 0..2 {
                let from = 1 - i as Rank;
                let take = rng.gen_range(0..=wire[i].len());
                for t in wire[i].drain(..take).collect::<Vec<_>>() {
                    match t {
                        ReliableTransmit::Data(m) => ep[i].handle_data(now, from, m),
                        ReliableTransmit::Feedback(f) => ep[i].handle_feedback(now, from, f),
                    }
                }
                while let Some(ev) = ep[i].poll_event() {
                    match ev {
                        ReliableEvent::Deliver { from, msg } => {
                            let n = u64::from_le_bytes(msg.payload[..].try_into().unwrap());
                            delivered[i].push(n);
                            running[i].push((from, msg.id, n));
                        }
                        ReliableEvent::Resolved { id, outcome, .. } => {
                            assert!(
                                outcomes[i].insert(id, outcome).is_none(),
                                "ticket resolved twice"
                            );
                        }
                    }
                }
                running[i].shuffle(&mut rng);
                let done = rng.gen_range(0..=running[i].len());
                for (from, id, n) in running[i].drain(..done).collect::<Vec<_>>() {
                    ep[i].complete(now, from, id, expected(n));
                }
            }
            let finished = (0..2)
                .all(|i| outcomes[i].len() as u64 == per_side && ep[i].pending_answers() == 0);
            if finished {
                break;
            }
            now += ms(rng.gen_range(0..50));
            for e in &mut ep {
                e.handle_timeout(now);
            }
        }
        for i in 0..2 {
            let j = 1 - i;
            assert_eq!(
                outcomes[i].len() as u64,
                per_side,
                "seed {seed}: every ticket resolves"
            );
            for (t, outcome) in &outcomes[i] {
                let n = tickets[i][t];
                let want = match expected(n) {
                    Ok(()) => Outcome::Ack,
                    Err((code, text)) => Outcome::Err { code, text },
                };
                assert_eq!(outcome, &want, "seed {seed}: ticket {t}");
            }
            let mut got = delivered[j].clone();
            got.sort_unstable();
            assert_eq!(
                got,
                (0..per_side).collect::<Vec<_>>(),
                "seed {seed}: exactly once"
            );
            assert_eq!(ep[i].unanswered(), 0);
        }
    }

    #[test]
    fn lossy_duplicating_reordering_network_delivers_exactly_once_and_resolves_every_ticket() {
        for seed in 0..30 {
            lossy_run(seed, 100);
        }
    }
}
