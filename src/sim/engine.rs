//! The event loop: a heap of `(deliver_at, seq)` events (messages, timers,
//! handler completions, crash and restart), one driver per instance that
//! does what `runtime::driver` does with sockets, and the checks.
//!
//! Determinism: one seeded RNG draws every network fate in event order;
//! instances, peers and records live in `Vec`s and `BTreeMap`s (the only
//! `HashMap` counts handler calls and is never iterated).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::{CollectiveTime, Invariant, KillAt, SimConfig, SimStats, SimViolation};
use crate::partition::Partition2d;
use crate::proto::{
    collective::collective_tree,
    discovery::{DiscoveryConfig, DiscoveryEvent, DiscoveryTransmit, LocalDiscovery},
    frames::{CompleteFrame, FrameAssembler},
    global::{Coordinator, GlobalEvent, GlobalJoin, GlobalTransmit},
    liveness::{Liveness, LivenessEvent},
    reliable::{Outcome, ReliableEndpoint, ReliableEvent, ReliableTransmit},
    wire::{Control, DataKind, DataMsg, Ping, Register},
    Endpoints, Incarnation, Now, PeerInfo, Rank,
};
use crate::runtime::codes;

/// ERR code of the simulated handler.
const HANDLER_ERR: u32 = 7;
/// A wake-up at the same instant this often means a timer never advances.
const LIVELOCK_WAKES: u32 = 10_000;
const FIRST_LIFE: Incarnation = Incarnation(1);

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The simulated handler's verdict: ERR for a deterministic subset.
fn handler_refuses(cfg: &SimConfig, from: Rank, to: Rank, frame: u64) -> bool {
    cfg.err_one_in > 0
        && mix(mix(mix(from as u64) ^ to as u64) ^ frame) % cfg.err_one_in as u64 == 0
}

/// A cell says who sent it, in which life, for which frame.
fn cell_payload(from: Rank, inc: Incarnation, frame: u64) -> Bytes {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&from.to_le_bytes());
    b.extend_from_slice(&inc.0.to_le_bytes());
    b.extend_from_slice(&frame.to_le_bytes());
    Bytes::from(b)
}

fn parse_payload(b: &[u8]) -> Option<(Rank, Incarnation, u64)> {
    if b.len() != 20 {
        return None;
    }
    Some((
        u32::from_le_bytes(b[0..4].try_into().ok()?),
        Incarnation(u64::from_le_bytes(b[4..12].try_into().ok()?)),
        u64::from_le_bytes(b[12..20].try_into().ok()?),
    ))
}

fn peer_info(rank: Rank, node: u32, inc: Incarnation) -> PeerInfo {
    PeerInfo {
        rank,
        node_index: node,
        incarnation: inc,
        endpoints: Endpoints {
            ipc: Some(format!("ipc://sim/{rank}.{}", inc.0)),
            tcp: format!("tcp://n{node}:{rank}.{}", inc.0),
        },
    }
}

/// What travels between instances.
#[derive(Debug)]
enum Wire {
    Ping(Ping),
    Register(Register),
    /// A ZeroMQ message; `to_inc` is the receiver's life the sender
    /// addressed (a restarted instance has a new endpoint: the old one's
    /// messages never reach it).
    Peer {
        from: Rank,
        from_inc: Incarnation,
        to_inc: Incarnation,
        body: Body,
    },
}

#[derive(Debug)]
enum Body {
    Control(Control),
    Data(DataMsg),
}

#[derive(Debug)]
enum EvKind {
    Start(Rank),
    Timer(Rank),
    /// `to: None` is the coordinator's UDP address (node 0's leader).
    Msg {
        to: Option<Rank>,
        wire: Box<Wire>,
    },
    HandlerDone {
        rank: Rank,
        inc: Incarnation,
        from: Rank,
        msg: Box<DataMsg>,
    },
    Crash(Rank),
    Restart(Rank),
    /// Dies for good.
    Kill(Rank),
    /// `heal_within` after a kill: the structure must have healed.
    CheckHealed,
}

struct Ev {
    at: Now,
    seq: u64,
    kind: EvKind,
}

impl PartialEq for Ev {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    DiscoveryUdp,
    DiscoveryZmq,
    GlobalUdp,
    GlobalZmq,
    GlobalResolve,
    Data,
    Feedback,
    FrameQuery,
    Heartbeat,
    Collective,
}

fn phase_of(c: &Control) -> Phase {
    match c {
        Control::Pong(_) | Control::Ready => Phase::DiscoveryZmq,
        Control::Feedback(_) => Phase::Feedback,
        Control::Resolve { .. } | Control::Resolved { .. } => Phase::GlobalResolve,
        Control::FrameQuery { .. } | Control::FrameReport { .. } => Phase::FrameQuery,
        Control::Heartbeat => Phase::Heartbeat,
        _ => Phase::GlobalZmq,
    }
}

/// The simulated network: virtual clock, event heap, fates.
struct Net {
    now: Now,
    seq: u64,
    queue: BinaryHeap<Reverse<Ev>>,
    rng: SmallRng,
    in_flight: u64,
}

impl Net {
    fn push(&mut self, at: Now, kind: EvKind) {
        self.seq += 1;
        if matches!(kind, EvKind::Msg { .. }) {
            self.in_flight += 1;
        }
        self.queue.push(Reverse(Ev {
            at,
            seq: self.seq,
            kind,
        }));
    }
}

/// One life of one instance: the proto machines and the driver's state.
struct Inst {
    me: PeerInfo,
    discovery: LocalDiscovery,
    global: Option<GlobalJoin>,
    coordinator: Option<Coordinator>,
    reliable: ReliableEndpoint,
    assembler: FrameAssembler,
    /// Where peers receive (node-mates from discovery, others resolved).
    peers: BTreeMap<Rank, PeerInfo>,
    /// Newest life heard of per peer: older messages are dropped, a newer
    /// one resets the pair exactly once.
    lives: BTreeMap<Rank, Incarnation>,
    /// Data for peers not resolved yet (bounded by the window).
    parked: BTreeMap<Rank, Vec<DataMsg>>,
    /// Runs the frame workload (a restarted life only answers).
    works: bool,
    next_send: u64,
    frames_done: u64,
    /// The earliest pending timer event (later ones are stale).
    timer_at: Option<Now>,
    wakes: (Now, u32),
    /// `discovery.poll_timeout()` (O(node size)) as of the last call that
    /// could change it; `None`: ask again.
    discovery_timeout: Option<Option<Now>>,
    /// Failure detection, and what the runtime keeps in its status: the
    /// node's leader and members, the node-leader list, who was declared
    /// dead, whether the job was globally ready once.
    liveness: Liveness,
    leader: Option<Rank>,
    members: Vec<PeerInfo>,
    node_leaders: Vec<Rank>,
    dead: BTreeSet<Rank>,
    was_ready: bool,
    /// A frame went missing: the lock-step workload cannot go on.
    stuck: bool,
    coll: Coll,
    /// Counted in `Book::finished`.
    finished: bool,
}

/// The collectives every instance calls, in this order (sequence 1..=4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CollOp {
    Barrier,
    Broadcast,
    AllGather,
    AllReduceSum,
}

const COLL_OPS: [CollOp; 4] = [
    CollOp::Barrier,
    CollOp::Broadcast,
    CollOp::AllGather,
    CollOp::AllReduceSum,
];
const UP: u8 = 0;
const DOWN: u8 = 1;

impl CollOp {
    fn name(self) -> &'static str {
        match self {
            CollOp::Barrier => "barrier",
            CollOp::Broadcast => "broadcast",
            CollOp::AllGather => "all_gather",
            CollOp::AllReduceSum => "all_reduce (sum)",
        }
    }
}

/// One instance's collectives: what `runtime::collective` does, as events.
#[derive(Default)]
struct Coll {
    /// Index into `COLL_OPS` of the next call.
    next: usize,
    call: Option<CollCall>,
    /// Steps that arrived before their call waited for them, by
    /// `(sequence, phase)`.
    stash: BTreeMap<(u64, u8), BTreeMap<Rank, Bytes>>,
}

struct CollCall {
    seq: u64,
    op: CollOp,
    parent: Option<Rank>,
    children: Vec<Rank>,
    /// Sent UP, waiting for the result from the parent.
    waiting_down: bool,
}

/// What rank `r` contributes to all_gather.
fn gather_value(r: Rank) -> u32 {
    r.wrapping_mul(2_654_435_761) ^ 0xC0FFEE
}

/// Everything a check needs that outlives one instance's life.
#[derive(Default)]
struct Book {
    /// `(from, from_inc, to, ticket)` → what was sent and how it ended.
    tickets: BTreeMap<(Rank, Incarnation, Rank, u64), Ticket>,
    /// `(from, from_inc, to, to_inc, frame, is_end)` → handler calls.
    handled: HashMap<(Rank, Incarnation, Rank, Incarnation, u64, bool), u32>,
    first_complete: BTreeMap<Rank, Now>,
    first_ready: BTreeMap<Rank, Now>,
    coordinator: Option<Rank>,
    /// `(rank, crashed at, restarted at)`.
    crashed: Option<(Rank, Now, Option<Now>)>,
    stats: SimStats,
    last_frame_at: Now,
    /// Last time an instance had something to do (superseded timers and
    /// messages to nobody do not count).
    last_work_at: Now,
    /// The kill of the config has not happened yet.
    kill_armed: bool,
    killed: Option<Rank>,
    heal_checked: bool,
    /// Instances whose workload is over (counted while they live).
    finished: u32,
    /// Every living instance finished: the run ends (the job shuts down)
    /// once every ticket resolved; failure detection would go on forever.
    quiesced: bool,
    /// Tickets of living senders not resolved yet.
    open_tickets: u64,
    /// `(from, from_inc, to, to_inc, seq, phase)` → collective steps handed over.
    coll_handled: HashMap<(Rank, Incarnation, Rank, Incarnation, u64, u8), u32>,
}

struct Ticket {
    frame: u64,
    end: bool,
    sent: Now,
    /// A collective step (`frame` is its sequence), with its phase.
    coll: Option<u8>,
}

pub(super) struct Sim<'a> {
    cfg: &'a SimConfig,
    size: u32,
    neighbours: Vec<Vec<Rank>>,
    insts: Vec<Option<Inst>>,
    lives: Vec<Incarnation>,
    net: Net,
    book: Book,
}

type Check = Result<(), SimViolation>;

impl<'a> Sim<'a> {
    pub(super) fn new(cfg: &'a SimConfig) -> Self {
        let size = cfg.size();
        // A square grid as wide as the job always splits (one row and
        // column per instance at least).
        let neighbours = match Partition2d::new([size as usize, size as usize], size) {
            Ok(p) => (0..size)
                .map(|r| p.neighbours(r).into_iter().map(|n| n.rank).collect())
                .collect(),
            Err(_) => vec![Vec::new(); size as usize],
        };
        Self {
            cfg,
            size,
            neighbours,
            insts: (0..size).map(|_| None).collect(),
            lives: vec![FIRST_LIFE; size as usize],
            net: Net {
                now: Duration::ZERO,
                seq: 0,
                queue: BinaryHeap::new(),
                rng: SmallRng::seed_from_u64(mix(cfg.seed)),
                in_flight: 0,
            },
            book: Book::default(),
        }
    }

    fn node_of(&self, rank: Rank) -> u32 {
        rank / self.cfg.per_node
    }

    fn violation(&self, invariant: Invariant, detail: impl Into<String>) -> SimViolation {
        SimViolation::Broken {
            invariant,
            detail: detail.into(),
            seed: self.cfg.seed,
            at: self.net.now,
        }
    }

    pub(super) fn run(mut self) -> Result<SimStats, SimViolation> {
        self.book.stats.nodes = self.cfg.nodes;
        self.book.stats.instances = self.size;
        self.book.kill_armed = self.cfg.kill.is_some();
        if self.cfg.collectives {
            self.book.stats.collectives = COLL_OPS
                .iter()
                .map(|op| CollectiveTime {
                    op: op.name(),
                    participants: 0,
                    last_call: Duration::ZERO,
                    last_return: Duration::ZERO,
                })
                .collect();
        }
        for r in 0..self.size {
            let skew = self.cfg.start_skew.as_nanos() as u64;
            let at = Duration::from_nanos(if skew > 0 {
                self.net.rng.gen_range(0..=skew)
            } else {
                0
            });
            self.net.push(at, EvKind::Start(r));
        }
        while let Some(Reverse(ev)) = self.net.queue.pop() {
            if self.book.quiesced && self.book.open_tickets == 0 {
                // The job is over: every instance finished its workload
                // and every ticket resolved; what is left is background.
                break;
            }
            if ev.at > self.cfg.time_limit {
                self.net.now = self.cfg.time_limit;
                return Err(self.violation(
                    Invariant::TimeLimit,
                    format!("events still pending at {:?}", self.cfg.time_limit),
                ));
            }
            self.net.now = ev.at;
            let st = &mut self.book.stats;
            st.events += 1;
            st.trace = mix(st.trace ^ ev.at.as_nanos() as u64 ^ (ev.seq << 1));
            self.step(ev.kind)?;
        }
        self.final_checks()?;
        let mut stats = std::mem::take(&mut self.book.stats);
        stats.end = self.book.last_work_at;
        stats.last_frame = (stats.frames_handed > 0).then_some(self.book.last_frame_at);
        stats.local_complete = self.book.first_complete.values().max().copied();
        stats.global_ready = self.book.first_ready.values().max().copied();
        for inst in self.insts.iter().flatten() {
            let r = inst.reliable.stats();
            stats.retransmissions += r.retransmitted;
            stats.peer_resets += r.peer_resets;
        }
        Ok(stats)
    }

    fn step(&mut self, kind: EvKind) -> Check {
        let now = self.net.now;
        match kind {
            EvKind::Start(r) => {
                self.insts[r as usize] = Some(self.new_inst(r, FIRST_LIFE, true));
                self.pump(r)
            }
            EvKind::Timer(r) => {
                let Some(inst) = self.insts[r as usize].as_mut() else {
                    return Ok(());
                };
                if inst.timer_at != Some(now) {
                    return Ok(()); // superseded
                }
                inst.timer_at = None;
                if inst.wakes.0 == now {
                    inst.wakes.1 += 1;
                    if inst.wakes.1 > LIVELOCK_WAKES {
                        return Err(self.violation(
                            Invariant::Livelock,
                            format!("rank {r} woken {LIVELOCK_WAKES} times at one instant"),
                        ));
                    }
                } else {
                    inst.wakes = (now, 1);
                }
                inst.discovery.handle_timeout(now);
                inst.discovery_timeout = None;
                if let Some(g) = &mut inst.global {
                    g.handle_timeout(now);
                }
                inst.reliable.handle_timeout(now);
                inst.assembler.handle_timeout(now);
                self.fire_liveness(r)?;
                self.pump(r)
            }
            EvKind::Msg { to, wire } => {
                self.net.in_flight -= 1;
                self.deliver(to, *wire)
            }
            EvKind::HandlerDone {
                rank,
                inc,
                from,
                msg,
            } => {
                let Some(inst) = self.insts[rank as usize].as_mut() else {
                    return Ok(());
                };
                if inst.me.incarnation != inc {
                    return Ok(()); // its life ended while the handler ran
                }
                if handler_refuses(self.cfg, from, rank, msg.frame) {
                    inst.assembler.handle_rejected(from, msg.id, msg.frame).ok();
                    let text = format!("sim handler refuses frame {} from {from}", msg.frame);
                    inst.reliable
                        .complete(now, from, msg.id, Err((HANDLER_ERR, text)));
                } else {
                    let answer = inst
                        .assembler
                        .handle_cell(from, msg.id, msg.frame, msg.payload)
                        .map_err(|e| (codes::FRAME_REFUSED, e.to_string()));
                    inst.reliable.complete(now, from, msg.id, answer);
                }
                self.pump(rank)
            }
            EvKind::Kill(r) => {
                if let Some(inst) = self.insts[r as usize].take() {
                    self.end_life(r, &inst);
                    self.book.kill_armed = false;
                    self.book.killed = Some(r);
                    self.book.crashed = Some((r, now, None));
                    self.book.stats.killed_at = Some(now);
                    if self.book.coordinator == Some(r) {
                        self.book.coordinator = None;
                    }
                    self.net
                        .push(now + self.cfg.heal_within, EvKind::CheckHealed);
                }
                Ok(())
            }
            EvKind::CheckHealed => {
                self.check_healed()?;
                self.book.heal_checked = true;
                // Survivors may start their collectives now.
                for r in 0..self.size {
                    self.pump(r)?;
                }
                // Everybody may have finished before (a kill after the
                // last frame): no instance changes state to notice it.
                self.check_quiesced();
                Ok(())
            }
            EvKind::Crash(r) => {
                if let Some(inst) = self.insts[r as usize].take() {
                    self.end_life(r, &inst);
                    let down = self
                        .cfg
                        .crash
                        .as_ref()
                        .map_or(Duration::ZERO, |c| c.down_for);
                    self.book.crashed = Some((r, now, None));
                    if self.book.coordinator == Some(r) {
                        self.book.coordinator = None;
                    }
                    self.net.push(now + down, EvKind::Restart(r));
                }
                Ok(())
            }
            EvKind::Restart(r) => {
                let inc = Incarnation(self.lives[r as usize].0 + 1);
                self.lives[r as usize] = inc;
                if let Some(c) = &mut self.book.crashed {
                    c.2 = Some(now);
                }
                self.insts[r as usize] = Some(self.new_inst(r, inc, false));
                self.pump(r)
            }
        }
    }

    /// As `Config::from_env` does: a node-mate silent in the handshake is
    /// given up on after the failure detector's dead-after time.
    fn discovery_config(&self) -> DiscoveryConfig {
        DiscoveryConfig {
            give_up_after: self.cfg.liveness.dead_after,
            ..self.cfg.discovery
        }
    }

    fn new_inst(&self, rank: Rank, inc: Incarnation, works: bool) -> Inst {
        let now = self.net.now;
        let node = self.node_of(rank);
        let me = peer_info(rank, node, inc);
        let seed = mix(self.cfg.seed ^ mix(((rank as u64) << 20) ^ inc.0));
        let discovery = LocalDiscovery::new(
            me.clone(),
            self.cfg.per_node,
            self.discovery_config(),
            now,
            seed,
        );
        let mut assembler = FrameAssembler::new(0, self.cfg.frames_ahead);
        assembler.set_expected(self.neighbours[rank as usize].iter().copied());
        Inst {
            me,
            discovery,
            global: None,
            coordinator: None,
            reliable: ReliableEndpoint::new(self.cfg.reliable.clone(), seed.rotate_left(17)),
            assembler,
            peers: BTreeMap::new(),
            lives: BTreeMap::new(),
            parked: BTreeMap::new(),
            works,
            next_send: 0,
            frames_done: 0,
            timer_at: None,
            wakes: (now, 0),
            discovery_timeout: None,
            liveness: Liveness::new(self.cfg.liveness),
            leader: None,
            members: Vec::new(),
            node_leaders: Vec::new(),
            dead: BTreeSet::new(),
            was_ready: false,
            stuck: false,
            coll: Coll::default(),
            finished: false,
        }
    }

    /// A life ended (crash or kill): its tickets will never resolve, it no
    /// longer counts as finished.
    fn end_life(&mut self, rank: Rank, inst: &Inst) {
        if inst.finished {
            self.book.finished -= 1;
        }
        let inc = inst.me.incarnation;
        let open = self
            .book
            .tickets
            .range((rank, inc, 0, 0)..=(rank, inc, Rank::MAX, u64::MAX))
            .count() as u64;
        self.book.open_tickets -= open;
    }

    /// Put a message on the wire: count it, then loss, partition,
    /// duplication and delay decide what arrives when.
    fn send(&mut self, from: Rank, to: Option<Rank>, phase: Phase, wire: Wire) {
        let cfg = self.cfg;
        let now = self.net.now;
        let m = &mut self.book.stats.messages;
        match phase {
            Phase::DiscoveryUdp => m.discovery_udp += 1,
            Phase::DiscoveryZmq => m.discovery_zmq += 1,
            Phase::GlobalUdp => m.global_udp += 1,
            Phase::GlobalZmq => m.global_zmq += 1,
            Phase::GlobalResolve => m.global_resolve += 1,
            Phase::Data => m.data += 1,
            Phase::Feedback => m.feedback += 1,
            Phase::FrameQuery => m.frame_queries += 1,
            Phase::Heartbeat => m.heartbeats += 1,
            Phase::Collective => m.collective += 1,
        }
        if let Some(p) = &cfg.partition {
            let (a, b) = (self.node_of(from), to.map_or(0, |t| self.node_of(t)));
            if (a == p.node) != (b == p.node) && now >= p.start && now < p.start + p.duration {
                self.book.stats.cut += 1;
                return;
            }
        }
        let rng = &mut self.net.rng;
        if cfg.loss > 0.0 && rng.gen_bool(cfg.loss) {
            self.book.stats.lost += 1;
            return;
        }
        let copies = if cfg.dup > 0.0 && rng.gen_bool(cfg.dup) {
            self.book.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut delays = [Duration::ZERO; 2];
        for d in delays.iter_mut().take(copies) {
            let mut t = cfg.delay;
            if !cfg.jitter.is_zero() {
                t += Duration::from_nanos(rng.gen_range(0..=cfg.jitter.as_nanos() as u64));
            }
            if cfg.reorder > 0.0 && rng.gen_bool(cfg.reorder) && !cfg.reorder_delay.is_zero() {
                t += Duration::from_nanos(rng.gen_range(0..=cfg.reorder_delay.as_nanos() as u64));
            }
            *d = t;
        }
        if copies == 2 {
            let twin = match &wire {
                Wire::Ping(p) => Wire::Ping(p.clone()),
                Wire::Register(r) => Wire::Register(r.clone()),
                Wire::Peer {
                    from,
                    from_inc,
                    to_inc,
                    body,
                } => Wire::Peer {
                    from: *from,
                    from_inc: *from_inc,
                    to_inc: *to_inc,
                    body: match body {
                        Body::Control(c) => Body::Control(c.clone()),
                        Body::Data(d) => Body::Data(d.clone()),
                    },
                },
            };
            self.net.push(
                now + delays[1],
                EvKind::Msg {
                    to,
                    wire: Box::new(twin),
                },
            );
        }
        self.net.push(
            now + delays[0],
            EvKind::Msg {
                to,
                wire: Box::new(wire),
            },
        );
        let st = &mut self.book.stats;
        st.max_in_flight = st.max_in_flight.max(self.net.in_flight);
    }

    fn send_peer(&mut self, from: Me, to: Rank, to_inc: Incarnation, body: Body) {
        let phase = match &body {
            Body::Control(c) => phase_of(c),
            Body::Data(d) => data_phase(d),
        };
        let wire = Wire::Peer {
            from: from.rank,
            from_inc: from.incarnation,
            to_inc,
            body,
        };
        self.send(from.rank, Some(to), phase, wire);
    }

    fn deliver(&mut self, to: Option<Rank>, wire: Wire) -> Check {
        let now = self.net.now;
        let Some(to) = to.or(self.book.coordinator) else {
            self.book.stats.to_dead += 1;
            return Ok(());
        };
        let Some(inst) = self.insts[to as usize].as_mut() else {
            self.book.stats.to_dead += 1;
            return Ok(());
        };
        match wire {
            Wire::Ping(ping) => {
                let (from, inc) = (ping.info.rank, ping.info.incarnation);
                if note_life(inst, now, from, inc) {
                    inst.discovery.handle_ping(now, ping);
                    inst.discovery_timeout = None;
                } else {
                    self.book.stats.from_old_life += 1;
                }
            }
            Wire::Register(reg) => match &mut inst.coordinator {
                Some(c) => {
                    let node = reg.node_index;
                    c.handle_register(reg);
                    if let (true, Some(k)) = (self.book.kill_armed, self.cfg.kill) {
                        if k.at == KillAt::Join && node == k.rank / self.cfg.per_node {
                            self.book.kill_armed = false;
                            self.net.push(now, EvKind::Kill(k.rank));
                        }
                    }
                }
                None => self.book.stats.to_dead += 1,
            },
            Wire::Peer {
                from,
                from_inc,
                to_inc,
                body,
            } => {
                if to_inc != inst.me.incarnation {
                    self.book.stats.to_dead += 1;
                    return Ok(());
                }
                if !note_life(inst, now, from, from_inc) {
                    self.book.stats.from_old_life += 1;
                    return Ok(());
                }
                inst.liveness.heard(now, from);
                match body {
                    Body::Control(Control::Heartbeat) => {}
                    Body::Data(d)
                        if d.kind != DataKind::Collective
                            && d.frame >= inst.assembler.next_frame()
                            && !inst.assembler.accepts(d.frame) =>
                    {
                        // Like the runtime: the frame buffer is full, the
                        // answer (and so the sender's credit) is withheld.
                        self.book.stats.deferred += 1;
                    }
                    Body::Data(d) => inst.reliable.handle_data(now, from, d),
                    Body::Control(Control::Feedback(fb)) => {
                        inst.reliable.handle_feedback(now, from, fb)
                    }
                    Body::Control(Control::FrameQuery { frame }) => {
                        // Like the runtime: resend what is unanswered, say
                        // whether the frame was ended towards the asker.
                        inst.reliable.resend_now(now, from);
                        let ended = inst.works && inst.next_send > frame;
                        let me = Me::of(inst);
                        self.send_peer(
                            me,
                            from,
                            from_inc,
                            Body::Control(Control::FrameReport { frame, ended }),
                        );
                    }
                    Body::Control(Control::FrameReport { .. }) => {}
                    Body::Control(c) => {
                        inst.discovery_timeout = None;
                        if !inst.discovery.handle_control(now, from, from_inc, &c) {
                            let answer =
                                inst.global.as_mut().and_then(|g| g.handle_control(now, &c));
                            if let Some(answer) = answer {
                                let me = Me::of(inst);
                                self.send_peer(me, from, from_inc, Body::Control(answer));
                            }
                        }
                    }
                }
            }
        }
        self.pump(to)
    }

    /// Send everything the machines of `rank` queued, act on their events,
    /// run the workload, and schedule the next timer.
    fn pump(&mut self, rank: Rank) -> Check {
        let now = self.net.now;
        let r = rank as usize;
        self.book.last_work_at = now;
        for round in 0.. {
            if round > 1000 {
                return Err(self.violation(
                    Invariant::Livelock,
                    format!("rank {rank}'s machines keep producing output at one instant"),
                ));
            }
            let Some(inst) = self.insts[r].as_mut() else {
                return Ok(());
            };
            let me = Me::of(inst);
            let mut out: Vec<Out> = Vec::new();
            let mut progressed = false;
            while let Some(t) = inst.discovery.poll_transmit() {
                match t {
                    DiscoveryTransmit::Broadcast(ping) => {
                        let node = rank / self.cfg.per_node;
                        let per = self.cfg.per_node;
                        for mate in node * per..(node + 1) * per {
                            if mate != rank {
                                out.push((
                                    Some(mate),
                                    Phase::DiscoveryUdp,
                                    Wire::Ping(ping.clone()),
                                ));
                            }
                        }
                    }
                    DiscoveryTransmit::ToPeer { to, msg } => out.push(control(me, to, msg)),
                }
            }
            let mut devents = Vec::new();
            while let Some(e) = inst.discovery.poll_event() {
                devents.push(e);
            }
            for e in devents {
                progressed = true;
                self.on_discovery_event(rank, e);
            }
            let Some(inst) = self.insts[r].as_mut() else {
                return Ok(());
            };
            if let Some(c) = &mut inst.coordinator {
                while let Some(t) = c.poll_transmit() {
                    if let GlobalTransmit::ToPeer { to, msg } = t {
                        out.push(control(me, to, msg));
                    }
                }
            }
            let mut gevents = Vec::new();
            if let Some(g) = &mut inst.global {
                while let Some(t) = g.poll_transmit() {
                    out.push(match t {
                        GlobalTransmit::Register(reg) => {
                            (None, Phase::GlobalUdp, Wire::Register(reg))
                        }
                        GlobalTransmit::ToPeer { to, msg } => control(me, to, msg),
                    });
                }
                while let Some(e) = g.poll_event() {
                    gevents.push(e);
                }
            }
            for e in gevents {
                progressed = true;
                self.on_global_event(rank, e)?;
            }
            let Some(inst) = self.insts[r].as_mut() else {
                return Ok(());
            };
            let mut rout = Vec::new();
            while let Some(t) = inst.reliable.poll_transmit(now) {
                rout.push(t);
            }
            for (to, t) in rout {
                match t {
                    ReliableTransmit::Data(msg) => {
                        if let Some(w) = route_data(inst, now, to, msg) {
                            out.push(w);
                        }
                    }
                    ReliableTransmit::Feedback(fb) => {
                        // Answer on the connection the data came from.
                        let life = inst.lives.get(&to).copied().unwrap_or(FIRST_LIFE);
                        out.push((
                            Some(to),
                            Phase::Feedback,
                            Wire::Peer {
                                from: rank,
                                from_inc: me.incarnation,
                                to_inc: life,
                                body: Body::Control(Control::Feedback(fb)),
                            },
                        ));
                    }
                }
            }
            // Members' resolutions queued by `route_data`.
            if let Some(g) = &mut inst.global {
                while let Some(t) = g.poll_transmit() {
                    if let GlobalTransmit::ToPeer { to, msg } = t {
                        out.push(control(me, to, msg));
                    }
                }
            }
            while let Some((peer, frame)) = inst.assembler.poll_query() {
                let life = inst.lives.get(&peer).copied().unwrap_or(FIRST_LIFE);
                out.push((
                    Some(peer),
                    Phase::FrameQuery,
                    Wire::Peer {
                        from: rank,
                        from_inc: me.incarnation,
                        to_inc: life,
                        body: Body::Control(Control::FrameQuery { frame }),
                    },
                ));
            }
            let mut missing = Vec::new();
            while let Some(m) = inst.assembler.poll_missing() {
                missing.push(m);
            }
            let mut revents = Vec::new();
            while let Some(e) = inst.reliable.poll_event() {
                revents.push(e);
            }
            progressed |= !out.is_empty();
            for (to, phase, wire) in out {
                self.send(rank, to, phase, wire);
            }
            for e in revents {
                progressed = true;
                self.on_reliable_event(rank, e)?;
            }
            for m in missing {
                progressed = true;
                if let Some(inst) = self.insts[r].as_mut() {
                    inst.stuck = true;
                }
                self.book.stats.frames_missing += 1;
                if self.book.crashed.is_none()
                    && self.cfg.partition.is_none()
                    && !self.book.kill_armed
                {
                    return Err(self.violation(
                        Invariant::AllFrames,
                        format!(
                            "rank {rank}: frame {} missing from {:?} at its deadline",
                            m.frame, m.peers
                        ),
                    ));
                }
            }
            progressed |= self.work(rank)?;
            progressed |= self.collectives(rank)?;
            if !progressed {
                break;
            }
        }
        self.check_bounds(rank)?;
        self.note_finished(rank);
        self.schedule(rank);
        Ok(())
    }

    /// Count `rank` as finished once its workload is over; when every
    /// living instance is, the job shuts down.
    fn note_finished(&mut self, rank: Rank) {
        let cfg = self.cfg;
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return;
        };
        let ready = inst.global.as_ref().is_some_and(|g| g.ready().is_some());
        let frames = !inst.works || inst.stuck || inst.frames_done == cfg.frames;
        let colls = !cfg.collectives || !inst.works || inst.coll.next == COLL_OPS.len();
        // A node-mate's restart makes discovery incomplete again.
        let done = ready && frames && colls && inst.discovery.is_complete();
        if done == inst.finished {
            return;
        }
        inst.finished = done;
        if !done {
            self.book.finished -= 1;
            self.book.quiesced = false;
            return;
        }
        self.book.finished += 1;
        self.check_quiesced();
    }

    /// The job is over once every living instance finished and, after a
    /// kill, the healing was checked.
    fn check_quiesced(&mut self) {
        let living = self.size - u32::from(self.book.killed.is_some());
        if self.book.finished == living
            && !self.book.kill_armed
            && (self.book.killed.is_none() || self.book.heal_checked)
        {
            self.book.quiesced = true;
        }
    }

    fn schedule(&mut self, rank: Rank) {
        let now = self.net.now;
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return;
        };
        let discovery = *inst
            .discovery_timeout
            .get_or_insert_with(|| inst.discovery.poll_timeout());
        let next = [
            discovery,
            inst.liveness.poll_timeout(),
            inst.global.as_ref().and_then(|g| g.poll_timeout()),
            inst.reliable.poll_timeout(),
            inst.assembler.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.max(now));
        // Only an earlier wake-up needs a new event: a pending earlier one
        // fires harmlessly (nothing is due yet) and schedules again. That
        // keeps the heap small while every ACK moves a retransmission timer.
        if let Some(t) = next {
            if inst.timer_at.is_none_or(|pending| t < pending) {
                inst.timer_at = Some(t);
                self.net.push(t, EvKind::Timer(rank));
            }
        }
    }

    fn on_discovery_event(&mut self, rank: Rank, e: DiscoveryEvent) {
        let now = self.net.now;
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return;
        };
        match e {
            DiscoveryEvent::PeerReady(info) | DiscoveryEvent::PeerRestarted(info) => {
                note_life(inst, now, info.rank, info.incarnation);
                if inst.lives.get(&info.rank) == Some(&info.incarnation) {
                    inst.peers.insert(info.rank, info);
                }
            }
            DiscoveryEvent::PeerLost(info) => self.on_peer_dead(rank, info.rank),
            DiscoveryEvent::Complete { leader, members } => {
                self.book.first_complete.entry(rank).or_insert(now);
                if let Some(g) = &mut inst.global {
                    // The node completed again after a restart: a leader
                    // registers the new membership, a member follows its
                    // leader's new life.
                    if let Some(l) = members.iter().find(|m| m.rank == leader) {
                        g.follow_leader(now, l.clone());
                    }
                    g.update_members(now, members.clone(), inst.discovery.lost());
                    inst.members = members;
                    return;
                }
                self.take_role(rank, leader, members);
                if let (true, Some(k)) = (self.book.kill_armed, self.cfg.kill) {
                    let per = self.cfg.per_node;
                    let node = k.rank / per;
                    if k.at == KillAt::Discovery
                        && (node * per..(node + 1) * per)
                            .all(|r| self.book.first_complete.contains_key(&r))
                    {
                        self.book.kill_armed = false;
                        self.net.push(now, EvKind::Kill(k.rank));
                    }
                }
            }
        }
    }

    /// What `runtime::driver::take_role` does: lead the node (and run the
    /// coordinator on node 0, resumed if the job was globally ready once)
    /// or follow `leader`, watching whom the role says.
    fn take_role(&mut self, rank: Rank, leader: Rank, members: Vec<PeerInfo>) {
        let now = self.net.now;
        let (nodes, size, gcfg) = (self.cfg.nodes, self.size, self.cfg.global);
        let killed = self.book.killed.is_some();
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return;
        };
        let seed = mix(mix(self.cfg.seed ^ 0x5EED ^ rank as u64) ^ inst.me.incarnation.0)
            ^ ((leader as u64) << 32);
        inst.leader = Some(leader);
        inst.members = members.clone();
        if killed {
            self.book.stats.healed_at = Some(now);
        }
        if leader == rank {
            if inst.me.node_index == 0 && inst.coordinator.is_none() {
                inst.coordinator = Some(if inst.was_ready {
                    Coordinator::resume(nodes, size)
                } else {
                    Coordinator::new(nodes, size)
                });
                self.book.coordinator = Some(rank);
            }
            for m in members.iter().filter(|m| m.rank != rank) {
                inst.liveness.watch(now, m.rank);
            }
            inst.global = Some(GlobalJoin::leader(
                inst.me.clone(),
                format!("n{}", inst.me.node_index),
                members,
                inst.discovery.lost(),
                gcfg,
                now,
                seed,
            ));
        } else if let Some(l) = members.iter().find(|m| m.rank == leader) {
            inst.liveness.watch(now, leader);
            inst.global = Some(GlobalJoin::member(rank, l.clone(), gcfg, now, seed));
        }
    }

    /// What `runtime::driver::fire_timers` does with failure detection:
    /// heartbeats to quiet watched peers, and a dead peer repairs the
    /// structure.
    fn fire_liveness(&mut self, rank: Rank) -> Check {
        let now = self.net.now;
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return Ok(());
        };
        inst.liveness.handle_timeout(now);
        let me = Me::of(inst);
        let mut beats = Vec::new();
        while let Some(peer) = inst.liveness.poll_heartbeat() {
            if let Some(life) = life_of(inst, peer) {
                beats.push((peer, life));
            }
        }
        let mut dead = Vec::new();
        while let Some(e) = inst.liveness.poll_event() {
            if let LivenessEvent::Dead(r) = e {
                dead.push(r);
            }
        }
        for (peer, life) in beats {
            self.send_peer(me, peer, life, Body::Control(Control::Heartbeat));
        }
        for r in dead {
            self.on_peer_dead(rank, r);
        }
        Ok(())
    }

    /// What `runtime::driver::on_peer_dead` does: the next lowest live
    /// rank leads a node whose leader died; a leader drops a dead member;
    /// leaders register again when the coordinator's node leader died.
    fn on_peer_dead(&mut self, rank: Rank, dead: Rank) {
        let now = self.net.now;
        self.book.stats.declared_dead += 1;
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return;
        };
        inst.dead.insert(dead);
        inst.discovery.remove_member(dead);
        inst.discovery_timeout = None;
        let old_leader = inst.leader;
        let alive: Vec<PeerInfo> = inst
            .members
            .iter()
            .filter(|m| !inst.dead.contains(&m.rank))
            .cloned()
            .collect();
        if old_leader == Some(dead) {
            let Some(new_leader) = alive.iter().map(|m| m.rank).min() else {
                return;
            };
            inst.liveness.unwatch(dead);
            self.take_role(rank, new_leader, alive);
        } else if old_leader == Some(rank) && inst.members.iter().any(|m| m.rank == dead) {
            if self.book.killed.is_some() {
                self.book.stats.healed_at = Some(now);
            }
            inst.members = alive.clone();
            inst.discovery.announce_members(now);
            if let Some(g) = &mut inst.global {
                g.update_members(now, alive, inst.discovery.lost());
            }
        }
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return;
        };
        if old_leader == Some(rank) && inst.node_leaders.contains(&dead) {
            if let Some(g) = &mut inst.global {
                g.await_leader_change(now, dead);
            }
        }
    }

    /// What `runtime::driver::directory_changed` does: leaders watch each
    /// other (the coordinator's failure moves it).
    fn directory_changed(&mut self, rank: Rank) {
        let now = self.net.now;
        let killed = self.book.killed.is_some();
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return;
        };
        let leaders = inst
            .global
            .as_ref()
            .map(|g| g.node_leaders().to_vec())
            .unwrap_or_default();
        for &l in leaders.iter().filter(|&&l| l != rank) {
            inst.liveness.watch(now, l);
        }
        if inst.node_leaders != leaders {
            if killed {
                self.book.stats.healed_at = Some(now);
            }
            inst.node_leaders = leaders;
        }
    }

    fn on_global_event(&mut self, rank: Rank, e: GlobalEvent) -> Check {
        let now = self.net.now;
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return Ok(());
        };
        match e {
            GlobalEvent::Ready { nodes, size } => {
                if (nodes, size) != (self.cfg.nodes, self.size) {
                    return Err(self.violation(
                        Invariant::GlobalReady,
                        format!("rank {rank} ready for {nodes} nodes / {size} instances"),
                    ));
                }
                self.book.first_ready.entry(rank).or_insert(now);
                inst.was_ready = true;
                self.directory_changed(rank);
            }
            GlobalEvent::DirectoryChanged => self.directory_changed(rank),
            GlobalEvent::Resolved(info) => {
                let to = info.rank;
                if inst.lives.get(&to).is_none_or(|l| *l <= info.incarnation) {
                    inst.lives.insert(to, info.incarnation);
                    inst.peers.insert(to, info);
                }
                let me = Me::of(inst);
                let parked = inst.parked.remove(&to).unwrap_or_default();
                let life = inst.peers.get(&to).map(|p| p.incarnation);
                if let Some(life) = life {
                    for msg in parked {
                        self.send_peer(me, to, life, Body::Data(msg));
                    }
                }
            }
        }
        Ok(())
    }

    fn on_reliable_event(&mut self, rank: Rank, e: ReliableEvent) -> Check {
        let now = self.net.now;
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return Ok(());
        };
        let me = inst.me.incarnation;
        match e {
            ReliableEvent::Deliver { from, msg } => {
                let from_inc = inst.lives.get(&from).copied().unwrap_or(FIRST_LIFE);
                let end = matches!(msg.kind, DataKind::FrameEnd { .. });
                let handed = match msg.kind {
                    // Answered like the runtime does, then waits in the
                    // mailbox for its call.
                    DataKind::Collective => {
                        inst.reliable.complete(now, from, msg.id, Ok(()));
                        let Some(&phase) = msg.payload.first() else {
                            return Err(self.violation(
                                Invariant::Collectives,
                                format!("rank {rank}: empty collective step from {from}"),
                            ));
                        };
                        inst.coll
                            .stash
                            .entry((msg.frame, phase))
                            .or_default()
                            .insert(from, msg.payload.slice(1..));
                        let n = self
                            .book
                            .coll_handled
                            .entry((from, from_inc, rank, me, msg.frame, phase))
                            .or_insert(0);
                        *n += 1;
                        if *n > 1 {
                            let n = *n;
                            return Err(self.violation(
                                Invariant::ExactlyOnce,
                                format!(
                                    "collective #{} phase {phase} from {from} handed to {rank} {n} times",
                                    msg.frame
                                ),
                            ));
                        }
                        false
                    }
                    DataKind::FrameEnd { count } => {
                        let answer = inst
                            .assembler
                            .handle_frame_end(from, msg.frame, count)
                            .map_err(|e| (codes::UNEXPECTED_SENDER, e.to_string()));
                        inst.reliable.complete(now, from, msg.id, answer);
                        true
                    }
                    DataKind::Cell => {
                        if parse_payload(&msg.payload)
                            .is_none_or(|(f, _, fr)| f != from || fr != msg.frame)
                        {
                            return Err(self.violation(
                                Invariant::ExactlyOnce,
                                format!("rank {rank} got a corrupted cell from {from}"),
                            ));
                        }
                        if !inst.assembler.accepts(msg.frame) {
                            let text = format!("frame {} is not accepted now", msg.frame);
                            inst.reliable.complete(
                                now,
                                from,
                                msg.id,
                                Err((codes::FRAME_REFUSED, text)),
                            );
                            false
                        } else {
                            let run = self.cfg.handler_time.as_nanos() as u64;
                            let at = now
                                + Duration::from_nanos(if run > 0 {
                                    self.net.rng.gen_range(0..=run)
                                } else {
                                    0
                                });
                            self.net.push(
                                at,
                                EvKind::HandlerDone {
                                    rank,
                                    inc: me,
                                    from,
                                    msg: Box::new(msg.clone()),
                                },
                            );
                            self.book.stats.cells_handled += 1;
                            true
                        }
                    }
                };
                if handed {
                    let n = self
                        .book
                        .handled
                        .entry((from, from_inc, rank, me, msg.frame, end))
                        .or_insert(0);
                    *n += 1;
                    let n = *n;
                    if n > 1 {
                        return Err(self.violation(
                            Invariant::ExactlyOnce,
                            format!(
                                "{} of frame {} from rank {from} handed to rank {rank} {} times",
                                if end { "frame end" } else { "cell" },
                                msg.frame,
                                n
                            ),
                        ));
                    }
                }
            }
            ReliableEvent::Resolved { to, id, outcome } => {
                let st = &mut self.book.stats;
                match &outcome {
                    Outcome::Ack => st.acks += 1,
                    Outcome::Err { .. } => st.errs += 1,
                    Outcome::TimedOut => st.timeouts += 1,
                }
                let key = (rank, me, to, id);
                // Checked and forgotten: memory stays proportional to
                // what is in flight, not to the whole run.
                let Some(t) = self.book.tickets.remove(&key).inspect(|_| {
                    self.book.open_tickets -= 1;
                }) else {
                    return Err(self.violation(
                        Invariant::TicketResolved,
                        format!("rank {rank}: ticket {id} to {to} resolved twice or never issued"),
                    ));
                };
                self.check_resolution(key, &t, now, &outcome)?;
            }
        }
        Ok(())
    }

    /// Hand over complete frames, then send the next frame (lock-step:
    /// frame f goes out once frame f-1 was handed over).
    fn work(&mut self, rank: Rank) -> Result<bool, SimViolation> {
        let now = self.net.now;
        let mut progressed = false;
        loop {
            let Some(inst) = self.insts[rank as usize].as_mut() else {
                return Ok(progressed);
            };
            if let Some(frame) = inst.assembler.poll_frame() {
                progressed = true;
                inst.frames_done += 1;
                let done = inst.frames_done;
                let works = inst.works;
                self.book.stats.frames_handed += 1;
                self.book.last_frame_at = now;
                self.check_frame(rank, done - 1, &frame)?;
                if let Some(c) = &self.cfg.crash {
                    if works && c.rank == rank && c.after_frame + 1 == done {
                        self.net.push(now, EvKind::Crash(rank));
                    }
                }
                if let (true, Some(k)) = (self.book.kill_armed, self.cfg.kill) {
                    if k.rank == rank && k.at == KillAt::Frame(done - 1) {
                        self.book.kill_armed = false;
                        self.net.push(now, EvKind::Kill(rank));
                    }
                }
                continue;
            }
            let ready = inst.global.as_ref().is_some_and(|g| g.ready().is_some());
            if !(inst.works
                && ready
                && inst.next_send < self.cfg.frames
                && inst.next_send <= inst.frames_done)
            {
                return Ok(progressed);
            }
            progressed = true;
            let frame = inst.next_send;
            inst.next_send += 1;
            // Lock-step: the application now waits for this frame.
            inst.assembler
                .await_frame(now, frame, now + self.cfg.frame_timeout);
            let me = Me::of(inst);
            for &n in &self.neighbours[rank as usize] {
                let cell = cell_payload(rank, me.incarnation, frame);
                for (kind, payload) in [
                    (DataKind::Cell, cell),
                    (DataKind::FrameEnd { count: 1 }, Bytes::new()),
                ] {
                    let end = !matches!(kind, DataKind::Cell);
                    match inst.reliable.send(now, n, frame, kind, payload) {
                        Ok(id) => {
                            self.book.tickets.insert(
                                (rank, me.incarnation, n, id),
                                Ticket {
                                    frame,
                                    end,
                                    sent: now,
                                    coll: None,
                                },
                            );
                            self.book.open_tickets += 1;
                        }
                        Err(e) => {
                            return Err(SimViolation::Broken {
                                invariant: Invariant::BuffersBounded,
                                detail: format!("rank {rank}: {e} in lock-step"),
                                seed: self.cfg.seed,
                                at: now,
                            })
                        }
                    }
                }
            }
        }
    }

    /// The ranks still alive at the end (all but the killed one).
    fn survivors(&self) -> impl Iterator<Item = Rank> + '_ {
        let killed = self.cfg.kill.map(|k| k.rank);
        (0..self.size).filter(move |&r| Some(r) != killed)
    }

    fn broadcast_root(&self) -> Rank {
        self.survivors().last().unwrap_or(0)
    }

    fn broadcast_value(&self) -> u64 {
        mix(self.cfg.seed ^ 0xB0AD_CA57)
    }

    fn contribution(&self, op: CollOp, rank: Rank) -> Bytes {
        let mut b = Vec::new();
        match op {
            CollOp::Barrier => {}
            CollOp::Broadcast if rank == self.broadcast_root() => {
                b.push(1);
                b.extend_from_slice(&self.broadcast_value().to_le_bytes());
            }
            CollOp::Broadcast => b.push(0),
            CollOp::AllGather => {
                b.extend_from_slice(&rank.to_le_bytes());
                b.extend_from_slice(&gather_value(rank).to_le_bytes());
            }
            CollOp::AllReduceSum => b.extend_from_slice(&(rank as u64).to_le_bytes()),
        }
        Bytes::from(b)
    }

    /// Send one step of collective `seq` (the phase byte, then the body).
    fn coll_send(&mut self, rank: Rank, to: Rank, seq: u64, phase: u8, body: &[u8]) -> Check {
        let now = self.net.now;
        let Some(inst) = self.insts[rank as usize].as_mut() else {
            return Ok(());
        };
        let mut payload = Vec::with_capacity(body.len() + 1);
        payload.push(phase);
        payload.extend_from_slice(body);
        let inc = inst.me.incarnation;
        match inst
            .reliable
            .send(now, to, seq, DataKind::Collective, Bytes::from(payload))
        {
            Ok(id) => {
                self.book.tickets.insert(
                    (rank, inc, to, id),
                    Ticket {
                        frame: seq,
                        end: false,
                        sent: now,
                        coll: Some(phase),
                    },
                );
                self.book.open_tickets += 1;
                Ok(())
            }
            Err(e) => Err(self.violation(
                Invariant::BuffersBounded,
                format!("rank {rank}: {e} sending collective #{seq} to {to}"),
            )),
        }
    }

    /// Call, advance and finish this instance's collectives, like
    /// `runtime::collective`: contributions combined up the tree, the
    /// result spread down.
    fn collectives(&mut self, rank: Rank) -> Result<bool, SimViolation> {
        let cfg = self.cfg;
        if !cfg.collectives {
            return Ok(false);
        }
        let now = self.net.now;
        let mut progressed = false;
        loop {
            let heal_checked = self.book.heal_checked;
            let Some(inst) = self.insts[rank as usize].as_mut() else {
                return Ok(progressed);
            };
            if inst.coll.call.is_none() {
                let idx = inst.coll.next;
                let ready = inst.global.as_ref().is_some_and(|g| g.ready().is_some());
                let leads = inst.leader == Some(rank);
                let workload_over = if cfg.kill.is_some() {
                    heal_checked
                } else {
                    inst.stuck || inst.frames_done == cfg.frames
                };
                if !(inst.works
                    && idx < COLL_OPS.len()
                    && ready
                    && inst.leader.is_some()
                    && (!leads || !inst.node_leaders.is_empty())
                    && workload_over)
                {
                    return Ok(progressed);
                }
                let tree = collective_tree(
                    rank,
                    inst.leader,
                    inst.members.iter().map(|m| m.rank),
                    &inst.node_leaders,
                );
                inst.coll.call = Some(CollCall {
                    seq: idx as u64 + 1,
                    op: COLL_OPS[idx],
                    parent: tree.parent,
                    children: tree.children,
                    waiting_down: false,
                });
                let t = &mut self.book.stats.collectives[idx];
                t.last_call = t.last_call.max(now);
                progressed = true;
                continue;
            }
            let Some(call) = inst.coll.call.as_mut() else {
                return Ok(progressed);
            };
            let (seq, op, parent) = (call.seq, call.op, call.parent);
            let value = if !call.waiting_down {
                let have = inst.coll.stash.get(&(seq, UP));
                if !call
                    .children
                    .iter()
                    .all(|c| have.is_some_and(|h| h.contains_key(c)))
                {
                    return Ok(progressed);
                }
                // Like the runtime: whatever arrived for this step counts.
                let got = inst.coll.stash.remove(&(seq, UP)).unwrap_or_default();
                let mut parts = vec![(rank, self.contribution(op, rank))];
                parts.extend(got);
                let total = combine(op, parts);
                if let Some(p) = parent {
                    if let Some(call) = self.insts[rank as usize]
                        .as_mut()
                        .and_then(|i| i.coll.call.as_mut())
                    {
                        call.waiting_down = true;
                    }
                    self.coll_send(rank, p, seq, UP, &total)?;
                    progressed = true;
                    continue;
                }
                total
            } else {
                let p = parent.unwrap_or(rank);
                let Some(v) = inst
                    .coll
                    .stash
                    .get_mut(&(seq, DOWN))
                    .and_then(|m| m.remove(&p))
                else {
                    return Ok(progressed);
                };
                v
            };
            let children = self.insts[rank as usize]
                .as_mut()
                .and_then(|i| i.coll.call.take())
                .map(|c| c.children)
                .unwrap_or_default();
            for c in children {
                self.coll_send(rank, c, seq, DOWN, &value)?;
            }
            self.check_collective(rank, op, seq, &value)?;
            if let Some(inst) = self.insts[rank as usize].as_mut() {
                inst.coll.next += 1;
                inst.coll.stash.remove(&(seq, DOWN));
            }
            let t = &mut self.book.stats.collectives[seq as usize - 1];
            t.last_return = t.last_return.max(now);
            t.participants += 1;
            progressed = true;
        }
    }

    fn check_collective(&self, rank: Rank, op: CollOp, seq: u64, value: &[u8]) -> Check {
        let wrong = |what: String| {
            Err(self.violation(
                Invariant::Collectives,
                format!("rank {rank}: {} #{seq} {what}", op.name()),
            ))
        };
        match op {
            CollOp::Barrier if !value.is_empty() => {
                wrong(format!("returned {} bytes", value.len()))
            }
            CollOp::Barrier => Ok(()),
            CollOp::Broadcast => {
                let mut want = vec![1];
                want.extend_from_slice(&self.broadcast_value().to_le_bytes());
                if value == want.as_slice() {
                    Ok(())
                } else {
                    wrong(format!(
                        "returned {value:?}, root {} sent {want:?}",
                        self.broadcast_root()
                    ))
                }
            }
            CollOp::AllGather => {
                let got = value.chunks(8);
                let mut n = 0usize;
                for (c, want) in got.zip(self.survivors()) {
                    n += 1;
                    let r = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    let v = c
                        .get(4..8)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    if r != want || v != Some(gather_value(want)) {
                        return wrong(format!("has rank {r} (value {v:?}) where {want} belongs"));
                    }
                }
                let want = self.survivors().count();
                if n != want || value.len() != want * 8 {
                    return wrong(format!("has {} bytes, {want} survivors", value.len()));
                }
                Ok(())
            }
            CollOp::AllReduceSum => {
                let want: u64 = self.survivors().map(u64::from).sum();
                let got = value.try_into().ok().map(u64::from_le_bytes);
                if got == Some(want) {
                    Ok(())
                } else {
                    wrong(format!("returned {got:?}, the sum is {want}"))
                }
            }
        }
    }

    /// `heal_within` after a kill: the survivors of its node follow the
    /// lowest live rank, the coordinator lists it, and every leader has
    /// the coordinator's node-leader list.
    fn check_healed(&self) -> Check {
        let Some(k) = self.cfg.kill else {
            return Ok(());
        };
        let per = self.cfg.per_node;
        let node = k.rank / per;
        let Some(lowest) = (node * per..(node + 1) * per).find(|&r| r != k.rank) else {
            return Ok(()); // the node died with it
        };
        for r in (node * per..(node + 1) * per).filter(|&r| r != k.rank) {
            let leader = self.insts[r as usize].as_ref().and_then(|i| i.leader);
            if leader != Some(lowest) {
                return Err(self.violation(
                    Invariant::Failover,
                    format!(
                        "rank {r} follows {leader:?}, not {lowest}, after rank {} died",
                        k.rank
                    ),
                ));
            }
        }
        let coordinator = self
            .book
            .coordinator
            .and_then(|c| self.insts[c as usize].as_ref())
            .and_then(|i| i.coordinator.as_ref());
        let Some(c) = coordinator else {
            return Err(self.violation(Invariant::Failover, "no coordinator"));
        };
        let list = c.node_leaders();
        if !c.is_ready() || list.get(node as usize) != Some(&lowest) {
            return Err(self.violation(
                Invariant::Failover,
                format!(
                    "coordinator (rank {:?}, {} of {} nodes, ready {}) lists leaders {list:?}; node {node} should be led by {lowest}",
                    self.book.coordinator,
                    c.registered(),
                    self.cfg.nodes,
                    c.is_ready()
                ),
            ));
        }
        for inst in self.insts.iter().flatten() {
            let leads = inst.global.as_ref().is_some_and(|g| g.is_leader());
            if leads && inst.node_leaders != list {
                return Err(self.violation(
                    Invariant::Failover,
                    format!(
                        "leader {} has node leaders {:?}, the coordinator {list:?}",
                        inst.me.rank, inst.node_leaders
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_frame(&self, rank: Rank, expect: u64, f: &CompleteFrame) -> Check {
        if f.frame != expect {
            return Err(self.violation(
                Invariant::FramesInOrder,
                format!("rank {rank} got frame {} when {expect} was next", f.frame),
            ));
        }
        let nb = &self.neighbours[rank as usize];
        for from in f.cells.keys() {
            if !nb.contains(from) {
                return Err(self.violation(
                    Invariant::FramesInOrder,
                    format!("rank {rank} frame {expect} has cells of non-neighbour {from}"),
                ));
            }
        }
        for &n in nb {
            let cells = f.cells.get(&n).map_or(&[][..], |v| v.as_slice());
            let want = usize::from(!handler_refuses(self.cfg, n, rank, expect));
            let ok = cells.len() == want
                && cells
                    .iter()
                    .all(|c| parse_payload(c).is_some_and(|(s, _, fr)| s == n && fr == expect));
            if !ok {
                return Err(self.violation(
                    Invariant::FramesInOrder,
                    format!(
                        "rank {rank} frame {expect}: {} cell(s) from {n}, expected {want}",
                        cells.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The crashed rank and whether the crash justifies odd outcomes for
    /// tickets towards it.
    fn crashed_rank(&self) -> Option<Rank> {
        self.book.crashed.map(|c| c.0)
    }

    fn partition_cuts(&self, a: Rank, b: Rank, from: Now, to: Now) -> bool {
        self.cfg.partition.as_ref().is_some_and(|p| {
            (self.node_of(a) == p.node) != (self.node_of(b) == p.node)
                && from < p.start + p.duration
                && to >= p.start
        })
    }

    /// The outcome is what the receiver's handler said (or a justified
    /// TimedOut), and a handled cell was handed over exactly once.
    fn check_resolution(
        &self,
        key: (Rank, Incarnation, Rank, u64),
        t: &Ticket,
        at: Now,
        outcome: &Outcome,
    ) -> Check {
        let (from, from_inc, to, id) = key;
        let to_crashed = self.crashed_rank() == Some(to);
        if let Some(phase) = t.coll {
            return match outcome {
                Outcome::Ack => {
                    let n = self
                        .book
                        .coll_handled
                        .get(&(from, from_inc, to, self.lives[to as usize], t.frame, phase))
                        .copied()
                        .unwrap_or(0);
                    if n == 1 || to_crashed {
                        Ok(())
                    } else {
                        Err(self.violation(
                            Invariant::ExactlyOnce,
                            format!("collective #{} step from {from} to {to} acknowledged, handed over {n} times", t.frame),
                        ))
                    }
                }
                Outcome::TimedOut
                    if to_crashed
                        || self.partition_cuts(from, to, t.sent, at)
                        || self.cfg.loss_justifies_timeouts() =>
                {
                    Ok(())
                }
                _ => Err(self.violation(
                    Invariant::TicketResolved,
                    format!(
                        "collective #{} step from {from} to {to} resolved {outcome:?}",
                        t.frame
                    ),
                )),
            };
        }
        let refuse = !t.end && handler_refuses(self.cfg, from, to, t.frame);
        let fine = match outcome {
            Outcome::TimedOut => {
                if !(to_crashed
                    || self.partition_cuts(from, to, t.sent, at)
                    || self.cfg.loss_justifies_timeouts())
                {
                    return Err(self.violation(
                        Invariant::NoUnjustifiedTimeout,
                        format!(
                            "ticket {id} from {from} to {to} (frame {}) timed out",
                            t.frame
                        ),
                    ));
                }
                true
            }
            // A restarted receiver has no frame state: it may refuse.
            _ if to_crashed => true,
            Outcome::Ack => !refuse,
            Outcome::Err { code, .. } => refuse && *code == HANDLER_ERR,
        };
        if !fine {
            return Err(self.violation(
                Invariant::TicketResolved,
                format!(
                    "ticket {id} from {from} to {to} (frame {}, {}) resolved {outcome:?}, handler said {}",
                    t.frame,
                    if t.end { "frame end" } else { "cell" },
                    if refuse { "ERR" } else { "ACK" }
                ),
            ));
        }
        // An answer means the receiver's handler (or frame assembly, for
        // frame ends) took the message, once. A crashed receiver's new
        // life may legitimately take it again.
        if !matches!(outcome, Outcome::TimedOut) && !to_crashed {
            let n = self
                .book
                .handled
                .get(&(from, from_inc, to, FIRST_LIFE, t.frame, t.end))
                .copied()
                .unwrap_or(0);
            if n != 1 {
                return Err(self.violation(
                    Invariant::ExactlyOnce,
                    format!(
                        "ticket {id} from {from} to {to} (frame {}) answered, but handed over {n} times",
                        t.frame
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_bounds(&mut self, rank: Rank) -> Check {
        let Some(inst) = self.insts[rank as usize].as_ref() else {
            return Ok(());
        };
        let nb = self.neighbours[rank as usize].len().max(1);
        let buffered = inst.assembler.buffered_cells();
        let cap = self.cfg.frames_ahead as usize * nb;
        let window = self.cfg.reliable.window.max(1) as usize;
        let detail = if buffered > cap {
            Some(format!(
                "rank {rank} buffers {buffered} cells (bound {cap})"
            ))
        } else if inst.reliable.unanswered() > window * nb {
            Some(format!(
                "rank {rank} has {} unanswered (bound {})",
                inst.reliable.unanswered(),
                window * nb
            ))
        } else {
            inst.parked
                .iter()
                .find(|(_, v)| v.len() > window)
                .map(|(to, v)| format!("rank {rank} parks {} messages for {to}", v.len()))
        };
        self.book.stats.max_buffered_cells =
            self.book.stats.max_buffered_cells.max(buffered as u64);
        match detail {
            Some(d) => Err(self.violation(Invariant::BuffersBounded, d)),
            None => Ok(()),
        }
    }

    fn final_checks(&self) -> Check {
        let per = self.cfg.per_node;
        let coordinator = self
            .book
            .coordinator
            .and_then(|c| self.insts[c as usize].as_ref())
            .and_then(|i| i.coordinator.as_ref());
        match coordinator {
            Some(c) if c.registered() == self.cfg.nodes && c.is_ready() => {}
            Some(c) => {
                return Err(self.violation(
                    Invariant::LeaderRegistered,
                    format!(
                        "coordinator has {} of {} nodes",
                        c.registered(),
                        self.cfg.nodes
                    ),
                ))
            }
            None => return Err(self.violation(Invariant::LeaderRegistered, "no coordinator")),
        }
        for node in 0..self.cfg.nodes {
            let ranks: Vec<Rank> = (node * per..(node + 1) * per).collect();
            let mut leaders = 0;
            let killed = self.cfg.kill.map(|k| k.rank);
            let lowest_live = ranks.iter().copied().find(|&r| Some(r) != killed);
            for &r in ranks.iter().filter(|&&r| Some(r) != killed) {
                let Some(inst) = self.insts[r as usize].as_ref() else {
                    return Err(self
                        .violation(Invariant::DiscoveryPeers, format!("rank {r} never started")));
                };
                let members: Vec<(Rank, Incarnation)> = inst
                    .discovery
                    .members()
                    .iter()
                    .map(|p| (p.rank, p.incarnation))
                    .collect();
                // A killed node-mate is dropped from discovery's view once
                // declared dead (LocalDiscovery::remove_member).
                let want: Vec<(Rank, Incarnation)> = ranks
                    .iter()
                    .filter(|&&m| Some(m) != killed)
                    .map(|&m| (m, self.lives[m as usize]))
                    .collect();
                if !inst.discovery.is_complete() || members != want {
                    return Err(self.violation(
                        Invariant::DiscoveryPeers,
                        format!("rank {r} knows {members:?}, node {node} is {want:?}"),
                    ));
                }
                if inst.discovery.leader() != lowest_live {
                    return Err(self.violation(
                        Invariant::OneLeaderPerNode,
                        format!(
                            "rank {r} elected {:?}, lowest is {}",
                            inst.discovery.leader(),
                            ranks[0]
                        ),
                    ));
                }
                if inst.leader != lowest_live {
                    return Err(self.violation(
                        Invariant::OneLeaderPerNode,
                        format!(
                            "rank {r} follows {:?}, lowest live is {lowest_live:?}",
                            inst.leader
                        ),
                    ));
                }
                let Some(g) = &inst.global else {
                    return Err(self.violation(
                        Invariant::GlobalReady,
                        format!("rank {r} never joined globally"),
                    ));
                };
                if self.cfg.collectives && inst.works && inst.coll.next != COLL_OPS.len() {
                    let step = inst.coll.call.as_ref().map(|c| {
                        let seq = c.seq;
                        let phase = if c.waiting_down { DOWN } else { UP };
                        let have: Vec<Rank> = inst
                            .coll
                            .stash
                            .get(&(seq, phase))
                            .map(|m| m.keys().copied().collect())
                            .unwrap_or_default();
                        format!(
                            "in {} #{seq} waiting for {} from parent {:?} / children {:?}, has {have:?}",
                            c.op.name(),
                            if c.waiting_down { "DOWN" } else { "UP" },
                            c.parent,
                            c.children
                        )
                    });
                    return Err(self.violation(
                        Invariant::Collectives,
                        format!(
                            "rank {r} completed {} of {} collectives ({})",
                            inst.coll.next,
                            COLL_OPS.len(),
                            step.unwrap_or_else(|| "never called the next".into())
                        ),
                    ));
                }
                leaders += usize::from(g.is_leader());
                if g.ready().is_none() {
                    return Err(self.violation(
                        Invariant::GlobalReady,
                        format!("rank {r} is not globally ready"),
                    ));
                }
                if self.book.crashed.is_none() && inst.frames_done != self.cfg.frames {
                    return Err(self.violation(
                        Invariant::AllFrames,
                        format!(
                            "rank {r} handed over {} of {} frames (missing from {:?})",
                            inst.frames_done,
                            self.cfg.frames,
                            inst.assembler.missing(inst.frames_done)
                        ),
                    ));
                }
            }
            if leaders != 1 {
                return Err(self.violation(
                    Invariant::OneLeaderPerNode,
                    format!("node {node} has {leaders} leaders"),
                ));
            }
        }
        let killed = self.cfg.kill.map(|k| k.rank);
        for (&(from, from_inc, to, id), t) in &self.book.tickets {
            if self.lives[from as usize] == from_inc && Some(from) != killed {
                return Err(self.violation(
                    Invariant::TicketResolved,
                    format!(
                        "ticket {id} from {from} to {to} (frame {}) never resolved",
                        t.frame
                    ),
                ));
            }
            // Otherwise the sender's life ended with its tickets.
        }
        Ok(())
    }
}

/// Who sends: rank and life (cheap to copy, unlike a `PeerInfo`).
#[derive(Clone, Copy)]
struct Me {
    rank: Rank,
    incarnation: Incarnation,
}

impl Me {
    fn of(inst: &Inst) -> Self {
        Self {
            rank: inst.me.rank,
            incarnation: inst.me.incarnation,
        }
    }
}

fn control(me: Me, to: PeerInfo, msg: Control) -> Out {
    (
        Some(to.rank),
        phase_of(&msg),
        Wire::Peer {
            from: me.rank,
            from_inc: me.incarnation,
            to_inc: to.incarnation,
            body: Body::Control(msg),
        },
    )
}

/// A message to put on the wire: destination (None: the coordinator), phase, message.
type Out = (Option<Rank>, Phase, Wire);

/// Record that `from` is in life `inc`. False if that life is over (the
/// message is stale); a newer life resets the pair's channel exactly once.
fn note_life(inst: &mut Inst, now: Now, from: Rank, inc: Incarnation) -> bool {
    match inst.lives.get(&from).copied() {
        Some(known) if inc < known => false,
        Some(known) if inc > known => {
            inst.lives.insert(from, inc);
            inst.reliable.reset_peer(now, from);
            inst.parked.remove(&from);
            // Like the runtime: a new life is watched afresh, if it was
            // watched (watching is mutual).
            inst.dead.remove(&from);
            if inst.liveness.health(from).is_some() {
                inst.liveness.unwatch(from);
                inst.liveness.watch(now, from);
            }
            if let Some(p) = inst.peers.get_mut(&from) {
                *p = peer_info(from, p.node_index, inc);
            }
            true
        }
        Some(_) => true,
        None => {
            inst.lives.insert(from, inc);
            true
        }
    }
}

fn data_phase(d: &DataMsg) -> Phase {
    match d.kind {
        DataKind::Collective => Phase::Collective,
        _ => Phase::Data,
    }
}

/// A collective's contributions combined at one level of the tree.
fn combine(op: CollOp, parts: Vec<(Rank, Bytes)>) -> Bytes {
    match op {
        CollOp::Barrier => Bytes::new(),
        CollOp::Broadcast => parts
            .into_iter()
            .map(|p| p.1)
            .find(|b| b.first() == Some(&1))
            .unwrap_or_else(|| Bytes::from_static(&[0])),
        CollOp::AllGather => {
            let mut all: Vec<&[u8]> = parts.iter().flat_map(|p| p.1.chunks(8)).collect();
            all.sort_by_key(|c| {
                c.get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            });
            Bytes::from(all.concat())
        }
        CollOp::AllReduceSum => {
            let sum: u64 = parts
                .iter()
                .filter_map(|p| <[u8; 8]>::try_from(&p.1[..]).ok())
                .map(u64::from_le_bytes)
                .sum();
            Bytes::copy_from_slice(&sum.to_le_bytes())
        }
    }
}

/// The life of `to` a message should address: the newest heard of, the
/// endpoint known, or (leaders) the directory's.
fn life_of(inst: &Inst, to: Rank) -> Option<Incarnation> {
    inst.lives
        .get(&to)
        .copied()
        .or_else(|| inst.peers.get(&to).map(|p| p.incarnation))
        .or_else(|| {
            inst.global
                .as_ref()
                .filter(|g| g.is_leader())
                .and_then(|g| g.directory_entry(to))
                .map(|p| p.incarnation)
        })
}

/// Where data for `to` goes: to its known endpoint, or parked until a
/// resolution (asked of the leader here) answers.
fn route_data(inst: &mut Inst, now: Now, to: Rank, msg: DataMsg) -> Option<Out> {
    let life = match inst.peers.get(&to) {
        Some(p) => Some(p.incarnation),
        None => match inst.global.as_mut().and_then(|g| g.resolve(now, to)) {
            Some(info) => {
                let life = *inst.lives.entry(to).or_insert(info.incarnation);
                let life = life.max(info.incarnation);
                inst.peers.insert(to, peer_info(to, info.node_index, life));
                Some(life)
            }
            None => None,
        },
    };
    match life {
        Some(life) => Some((
            Some(to),
            data_phase(&msg),
            Wire::Peer {
                from: inst.me.rank,
                from_inc: inst.me.incarnation,
                to_inc: life,
                body: Body::Data(msg),
            },
        )),
        None => {
            let window = inst.reliable.config().window as usize;
            let parked = inst.parked.entry(to).or_default();
            if parked.len() < window {
                parked.push(msg);
            }
            None
        }
    }
}
