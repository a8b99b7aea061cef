//! `sim`: the deterministic simulator of DESIGN §9.
//!
//! Runs the real sans-IO machines of [`crate::proto`] — [`LocalDiscovery`],
//! [`GlobalJoin`], [`Coordinator`], [`ReliableEndpoint`], [`FrameAssembler`] —
//! for every instance of a job in one process, over an in-memory network
//! with virtual time and seeded faults (loss, duplication, reordering,
//! delay and jitter, a healing partition, crash and restart of an
//! instance). The same [`SimConfig`] (seed included) replays the same run
//! event for event, so a failing seed is a reproducible bug report.
//!
//! The model, per message: lost with probability `loss`, delivered twice
//! with probability `dup`, delayed by `delay` + up to `jitter` (+ up to
//! `reorder_delay` for a `reorder` fraction); a partition drops what
//! crosses its cut. Pings reach only the sender's node-mates;
//! registrations go to whoever runs the coordinator (node 0's leader);
//! a ZeroMQ message addressed to a life its receiver has left is lost
//! (its endpoint is gone), one from a sender's past life is dropped.
//! The workload after global ready is lock-step neighbour exchange on a
//! block partition: one cell and a frame end to every neighbour per
//! frame, the next frame sent once the previous one was handed over.
//!
//! A crashed instance comes back (same rank, next incarnation, empty
//! state) and rejoins discovery and the global join, but not the frame
//! workload: the application state it would resume from is not modelled,
//! so its neighbours' frames stop at the crash (reported as
//! `FrameMissing`, not as a violation).
//!
//! Failure detection runs as in `runtime::driver`: members watch their
//! leader, leaders their members and each other, heartbeats travel the
//! simulated network, and a death repairs the structure (the next lowest
//! live rank leads and registers; node 0's new leader runs the
//! coordinator, resumed if the job was globally ready; leaders register
//! again when the coordinator's leader died). A *kill* (no restart) checks
//! that within `heal_within` the survivors agree on the new leader, the
//! coordinator lists it and every leader has the same node-leader list.
//! Known gaps, reported as violations: an instance lost before global
//! ready leaves the coordinator waiting for it; a node-mate still in the
//! discovery handshake with the dead never completes; a lost
//! announcement of a changed directory is never repeated.
//!
//! With `collectives`, every instance then runs barrier, broadcast,
//! all_gather and all_reduce (sum) exactly like `runtime::collective`
//! (tree from [`crate::proto::collective::collective_tree`], UP/DOWN steps
//! as reliable `Collective` messages), survivors only after a kill.
//!
//! Owns the simulated network, the per-instance driver (a copy of what
//! `runtime::driver` does with sockets, done with an event queue) and the
//! invariant checks. Must not touch sockets, threads or the clock, except
//! for measuring its own wall time.
//!
//! [`LocalDiscovery`]: crate::proto::discovery::LocalDiscovery
//! [`GlobalJoin`]: crate::proto::global::GlobalJoin
//! [`Coordinator`]: crate::proto::global::Coordinator
//! [`ReliableEndpoint`]: crate::proto::reliable::ReliableEndpoint
//! [`FrameAssembler`]: crate::proto::frames::FrameAssembler

use std::fmt;
use std::time::Duration;

use crate::proto::{
    discovery::DiscoveryConfig, global::GlobalConfig, liveness::LivenessConfig,
    reliable::ReliableConfig, Rank,
};

mod engine;

/// Crash one instance and restart it (same rank, next incarnation, empty
/// state) `down_for` later.
#[derive(Clone, Debug, PartialEq)]
pub struct CrashSpec {
    /// The instance that crashes.
    pub rank: Rank,
    /// The crash happens as soon as `rank` has handed over this frame.
    pub after_frame: u64,
    /// Virtual time between the crash and the restart.
    pub down_for: Duration,
}

/// When a killed instance dies (for good).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillAt {
    /// As soon as every instance of its node completed local discovery
    /// (other nodes may still be discovering; nobody is registered yet).
    Discovery,
    /// As soon as the coordinator holds its node's registration (before
    /// the job is globally ready, unless its node came last).
    Join,
    /// As soon as it has handed over this frame.
    Frame(u64),
}

/// Kill one instance without restart: failure detection must notice and
/// the structure heal around it (DESIGN §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KillSpec {
    /// The instance that dies.
    pub rank: Rank,
    /// When.
    pub at: KillAt,
}

/// Cut `node` off from every other node (both directions) for an interval
/// of virtual time; messages within the node still flow.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionSpec {
    /// The node cut off (node index).
    pub node: u32,
    /// Virtual time the cut begins.
    pub start: Duration,
    /// How long the cut lasts before it heals.
    pub duration: Duration,
}

/// One simulated job and its network. Every probability is per message.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: u32,
    /// Instances per node (ranks are contiguous per node).
    pub per_node: u32,
    /// Probability that a message is lost, in `[0, 1)`.
    pub loss: f64,
    /// Probability that a message arrives twice, in `[0, 1)`.
    pub dup: f64,
    /// Fraction of messages delayed by up to `reorder_delay` more, in `[0, 1]`.
    pub reorder: f64,
    /// Extra delay, uniform up to this, of a reordered message.
    pub reorder_delay: Duration,
    /// Base one-way delay of every message…
    pub delay: Duration,
    /// …plus a uniform random part up to this.
    pub jitter: Duration,
    /// Instances start within this interval (launch skew).
    pub start_skew: Duration,
    /// Frames of neighbour exchange after global ready.
    pub frames: u64,
    /// Seed of every random choice of the run (faults, jitter, skew).
    pub seed: u64,
    /// At most one instance to crash and restart.
    pub crash: Option<CrashSpec>,
    /// Kill an instance for good (not together with `crash`).
    pub kill: Option<KillSpec>,
    /// At most one node to cut off for a while.
    pub partition: Option<PartitionSpec>,
    /// After global ready (and the frames, or once the structure healed
    /// after a kill), every instance runs barrier, broadcast, all_gather
    /// and all_reduce (sum) over the reliable channel.
    pub collectives: bool,
    /// The structure must have healed this long after a kill.
    pub heal_within: Duration,
    /// A handler runs up to this long (virtual) before its outcome is known.
    pub handler_time: Duration,
    /// The handler answers ERR for one cell in this many (by a hash of
    /// sender, receiver and frame); 0: never.
    pub err_one_in: u32,
    /// How long an instance waits for a frame before it is reported missing.
    pub frame_timeout: Duration,
    /// The run fails if work is still pending at this virtual time.
    pub time_limit: Duration,
    /// Frames each assembler buffers ahead of the next one handed over.
    pub frames_ahead: u64,
    /// Timing of the discovery handshake.
    pub discovery: DiscoveryConfig,
    /// Timing of the global join.
    pub global: GlobalConfig,
    /// Tuning of the reliable channel.
    pub reliable: ReliableConfig,
    /// Failure detection timing (heartbeat, suspect, dead).
    pub liveness: LivenessConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 2,
            per_node: 2,
            loss: 0.0,
            dup: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(5),
            delay: Duration::from_micros(50),
            jitter: Duration::from_micros(50),
            start_skew: Duration::from_millis(20),
            frames: 3,
            seed: 1,
            crash: None,
            kill: None,
            partition: None,
            collectives: false,
            heal_within: Duration::from_secs(20),
            handler_time: Duration::from_micros(200),
            err_one_in: 50,
            frame_timeout: Duration::from_secs(60),
            time_limit: Duration::from_secs(600),
            frames_ahead: 64,
            discovery: DiscoveryConfig::default(),
            global: GlobalConfig::default(),
            reliable: ReliableConfig::default(),
            liveness: LivenessConfig::default(),
        }
    }
}

/// A [`SimConfig`] that cannot be simulated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SimConfigError {
    /// No nodes, or no instances per node.
    #[error("a job needs at least one node and one instance per node (got {nodes} x {per_node})")]
    Empty {
        /// Nodes asked for.
        nodes: u32,
        /// Instances per node asked for.
        per_node: u32,
    },
    /// More instances than the simulator takes.
    #[error("{nodes} x {per_node} instances do not fit in a 32-bit rank")]
    TooLarge {
        /// Nodes asked for.
        nodes: u32,
        /// Instances per node asked for.
        per_node: u32,
    },
    /// A probability outside its range.
    #[error("{name} must be in [0, 1){} (got {value})", if *.upper_inclusive { " or 1" } else { "" })]
    Probability {
        /// The field: `loss`, `dup` or `reorder`.
        name: &'static str,
        /// Its value.
        value: String,
        /// Whether 1 is allowed.
        upper_inclusive: bool,
    },
    /// The crash names a rank outside the job.
    #[error("crash of rank {rank}, but the job has {size} instances")]
    CrashRank {
        /// The rank asked for.
        rank: Rank,
        /// Instances in the job.
        size: u32,
    },
    /// The partition names a node outside the job.
    #[error("partition of node {node}, but the job has {nodes} nodes")]
    PartitionNode {
        /// The node asked for.
        node: u32,
        /// Nodes in the job.
        nodes: u32,
    },
    /// A zero time limit.
    #[error("time limit must be positive")]
    NoTime,
    /// The rank to kill is not in the job.
    #[error("kill of rank {rank}, but the job has {size} instances")]
    KillRank {
        /// The rank asked for.
        rank: Rank,
        /// Instances in the job.
        size: u32,
    },
    /// The frame to kill after is never handed over.
    #[error("kill after frame {frame}, but the job runs {frames} frames")]
    KillFrame {
        /// The frame asked for.
        frame: u64,
        /// Frames in the run.
        frames: u64,
    },
    /// A kill or collectives together with a crash and restart.
    #[error("{0} cannot be combined with a crash and restart (the restarted life does not rejoin the workload)")]
    WithRestart(&'static str),
}

impl SimConfig {
    /// Instances in the job (`nodes · per_node`).
    pub fn size(&self) -> u32 {
        self.nodes.saturating_mul(self.per_node)
    }

    /// The chance that every round trip of one message within the reliable
    /// deadline is lost (data or its answer), at the configured loss rate.
    pub fn timeout_odds(&self) -> f64 {
        let q = 1.0 - (1.0 - self.loss) * (1.0 - self.loss);
        let r = &self.reliable;
        let mut rng = rand::rngs::mock::StepRng::new(0, 0);
        let nominal = crate::proto::backoff::BackoffPolicy {
            jitter: 0.0,
            ..r.retransmit
        };
        let (mut t, mut tries) = (Duration::ZERO, 1i32);
        while tries < 10_000 {
            t += nominal
                .delay(tries as u32 - 1, &mut rng)
                .max(Duration::from_micros(1));
            if t >= r.deadline {
                break;
            }
            tries += 1;
        }
        q.powi(tries)
    }

    /// Whether the deadline is *not* generous for this loss rate: a cell
    /// times out by bad luck alone with odds above one in 10^9, so a
    /// TimedOut is no violation.
    pub fn loss_justifies_timeouts(&self) -> bool {
        self.timeout_odds() > 1e-9
    }

    /// Every field within its domain; [`run`] calls this first.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        if self.nodes == 0 || self.per_node == 0 {
            return Err(SimConfigError::Empty {
                nodes: self.nodes,
                per_node: self.per_node,
            });
        }
        if self
            .nodes
            .checked_mul(self.per_node)
            .is_none_or(|n| n > 1 << 24)
        {
            return Err(SimConfigError::TooLarge {
                nodes: self.nodes,
                per_node: self.per_node,
            });
        }
        for (name, value, upper_inclusive) in [
            ("loss", self.loss, false),
            ("dup", self.dup, false),
            ("reorder", self.reorder, true),
        ] {
            let ok = value >= 0.0 && (value < 1.0 || (upper_inclusive && value == 1.0));
            if !ok {
                return Err(SimConfigError::Probability {
                    name,
                    value: value.to_string(),
                    upper_inclusive,
                });
            }
        }
        if let Some(c) = &self.crash {
            if c.rank >= self.size() {
                return Err(SimConfigError::CrashRank {
                    rank: c.rank,
                    size: self.size(),
                });
            }
        }
        if let Some(k) = &self.kill {
            if k.rank >= self.size() {
                return Err(SimConfigError::KillRank {
                    rank: k.rank,
                    size: self.size(),
                });
            }
            if let KillAt::Frame(frame) = k.at {
                if frame >= self.frames {
                    return Err(SimConfigError::KillFrame {
                        frame,
                        frames: self.frames,
                    });
                }
            }
        }
        if self.crash.is_some() {
            if self.kill.is_some() {
                return Err(SimConfigError::WithRestart("a kill"));
            }
            if self.collectives {
                return Err(SimConfigError::WithRestart("collectives"));
            }
        }
        if let Some(p) = &self.partition {
            if p.node >= self.nodes {
                return Err(SimConfigError::PartitionNode {
                    node: p.node,
                    nodes: self.nodes,
                });
            }
        }
        if self.time_limit.is_zero() {
            return Err(SimConfigError::NoTime);
        }
        Ok(())
    }
}

/// The invariants of DESIGN §9 (and a few of the simulator's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invariant {
    /// Every instance discovers exactly the peers of its node.
    DiscoveryPeers,
    /// Exactly one leader per node, the lowest rank.
    OneLeaderPerNode,
    /// Every node's leader is registered with the coordinator.
    LeaderRegistered,
    /// Every instance reaches global ready.
    GlobalReady,
    /// Every cell is handed to a handler exactly once.
    ExactlyOnce,
    /// Frames are handed over strictly in order, each with every expected
    /// neighbour's cells (minus those the handler refused).
    FramesInOrder,
    /// Every instance hands over every frame (runs without a crash).
    AllFrames,
    /// Every ticket resolves, as the receiver's handler said.
    TicketResolved,
    /// No TimedOut without a fault that justifies it.
    NoUnjustifiedTimeout,
    /// Frame buffer, send window and parked data stay within their bounds.
    BuffersBounded,
    /// A state machine asks to be woken at the same instant forever.
    Livelock,
    /// Work still pending at the time limit.
    TimeLimit,
    /// Within `heal_within` of a kill, the survivors of its node agree on
    /// the lowest live rank as leader, the coordinator lists it, and every
    /// leader has the coordinator's node-leader list.
    Failover,
    /// Every (surviving) instance completes every collective with the
    /// right result.
    Collectives,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::DiscoveryPeers => "every instance discovers exactly its node's peers",
            Invariant::OneLeaderPerNode => "one leader per node, the lowest rank",
            Invariant::LeaderRegistered => "every leader registered with the coordinator",
            Invariant::GlobalReady => "every instance reaches global ready",
            Invariant::ExactlyOnce => "each cell handed to a handler exactly once",
            Invariant::FramesInOrder => "frames handed over in order and complete",
            Invariant::AllFrames => "every instance hands over every frame",
            Invariant::TicketResolved => "every ticket resolves as the handler said",
            Invariant::NoUnjustifiedTimeout => "no ticket times out without a fault",
            Invariant::BuffersBounded => "buffers bounded",
            Invariant::Livelock => "no livelock",
            Invariant::TimeLimit => "work done before the time limit",
            Invariant::Failover => "the structure heals after a leader dies",
            Invariant::Collectives => "every collective completes with the right result",
        })
    }
}

/// Why a run failed: a config that cannot run, or the first broken invariant.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SimViolation {
    /// The config was rejected before the run.
    #[error("invalid simulation config: {0}")]
    InvalidConfig(#[from] SimConfigError),
    /// An invariant broke during (or at the end of) the run.
    #[error("{invariant}: {detail} (seed {seed}, virtual time {at:?})")]
    Broken {
        /// Which one.
        invariant: Invariant,
        /// What was seen, naming ranks and frames.
        detail: String,
        /// The seed that replays it.
        seed: u64,
        /// Virtual time of the violation.
        at: Duration,
    },
}

/// Messages put on the simulated wire, by phase (before loss and duplication).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseCounts {
    /// Ping beacons, one per receiving node-mate.
    pub discovery_udp: u64,
    /// Pong and Ready.
    pub discovery_zmq: u64,
    /// Registrations to the coordinator.
    pub global_udp: u64,
    /// Welcome, GlobalReady, AwaitGlobal.
    pub global_zmq: u64,
    /// Resolve and Resolved (members asking their leader for remote peers).
    pub global_resolve: u64,
    /// Cells and frame ends, retransmissions included.
    pub data: u64,
    /// Coalesced ACK/ERR.
    pub feedback: u64,
    /// FrameQuery to laggards and their FrameReport answers.
    pub frame_queries: u64,
    /// Heartbeats of failure detection.
    pub heartbeats: u64,
    /// Collective steps (UP/DOWN), retransmissions included.
    pub collective: u64,
}

impl PhaseCounts {
    /// Messages of the global join (registration, announcements, resolves).
    pub fn global(&self) -> u64 {
        self.global_udp + self.global_zmq + self.global_resolve
    }
    /// Messages of local discovery (pings, pongs, readies).
    pub fn discovery(&self) -> u64 {
        self.discovery_udp + self.discovery_zmq
    }
}

/// What a run did, all in virtual time except `wall`. Everything but `wall`
/// is a function of the config: equal configs give equal stats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Nodes in the job.
    pub nodes: u32,
    /// Instances in the job.
    pub instances: u32,
    /// When the last instance first saw its node complete.
    pub local_complete: Option<Duration>,
    /// When the last instance first became globally ready.
    pub global_ready: Option<Duration>,
    /// When the last frame was handed over.
    pub last_frame: Option<Duration>,
    /// When an instance last had work (retransmissions and timeouts included).
    pub end: Duration,
    /// Messages put on the wire, by phase.
    pub messages: PhaseCounts,
    /// Messages dropped by the loss model.
    pub lost: u64,
    /// Messages delivered twice by the duplication model.
    pub duplicated: u64,
    /// Dropped because a partition cut the path.
    pub cut: u64,
    /// Dropped because the receiver was not running (not started yet, or
    /// down) or was addressed in a life it has left.
    pub to_dead: u64,
    /// Dropped because the sender has restarted since it was sent.
    pub from_old_life: u64,
    /// Cells of frames too far ahead, left unanswered (backpressure).
    pub deferred: u64,
    /// Frames handed over, summed over instances.
    pub frames_handed: u64,
    /// FrameMissing reports (a frame incomplete at its deadline).
    pub frames_missing: u64,
    /// Cells the handlers ran on, summed over instances.
    pub cells_handled: u64,
    /// Tickets resolved ACK.
    pub acks: u64,
    /// Tickets resolved ERR.
    pub errs: u64,
    /// Tickets resolved TimedOut.
    pub timeouts: u64,
    /// Retransmissions of data messages, summed over instances.
    pub retransmissions: u64,
    /// Times an instance reset its state for a restarted peer.
    pub peer_resets: u64,
    /// Most messages on the simulated wire at one moment.
    pub max_in_flight: u64,
    /// Most cells one frame assembler held at one moment.
    pub max_buffered_cells: u64,
    /// Events taken off the virtual-time queue.
    pub events: u64,
    /// Hash over every processed event: equal traces, equal hashes.
    pub trace: u64,
    /// When the killed instance died.
    pub killed_at: Option<Duration>,
    /// When the last survivor changed its view of the structure (leader,
    /// members or node-leader list) after the kill.
    pub healed_at: Option<Duration>,
    /// Leaders declared dead by someone (a kill, or a false suspicion).
    pub declared_dead: u64,
    /// Per collective, in call order: its name, when the last participant
    /// called it and when the last one returned.
    pub collectives: Vec<CollectiveTime>,
}

/// The virtual time one collective took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectiveTime {
    /// Which collective.
    pub op: &'static str,
    /// How many instances returned from it.
    pub participants: u32,
    /// The last participant called it…
    pub last_call: Duration,
    /// …and the last one returned.
    pub last_return: Duration,
}

impl CollectiveTime {
    /// From the last call to the last return.
    pub fn took(&self) -> Duration {
        self.last_return.saturating_sub(self.last_call)
    }
}

/// A run in which every invariant held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimReport {
    /// The seed of the run.
    pub seed: u64,
    /// What the run did, in virtual time.
    pub stats: SimStats,
    /// Wall-clock time the run took.
    pub wall: Duration,
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| {
        format!("{:.3} ms", d.as_secs_f64() * 1e3)
    })
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        let m = &s.messages;
        writeln!(
            f,
            "cellnet sim: {} instances on {} nodes, seed {}",
            s.instances, s.nodes, self.seed
        )?;
        writeln!(
            f,
            "  {:<28} {:>14}",
            "local complete (virtual)",
            opt_ms(s.local_complete)
        )?;
        writeln!(
            f,
            "  {:<28} {:>14}",
            "global ready (virtual)",
            opt_ms(s.global_ready)
        )?;
        writeln!(
            f,
            "  {:<28} {:>14}",
            "last frame (virtual)",
            opt_ms(s.last_frame)
        )?;
        writeln!(
            f,
            "  {:<28} {:>14}",
            "last work (virtual)",
            opt_ms(Some(s.end))
        )?;
        if let Some(k) = s.killed_at {
            writeln!(f, "  {:<28} {:>14}", "killed at (virtual)", opt_ms(Some(k)))?;
            writeln!(
                f,
                "  {:<28} {:>14}",
                "healed at (virtual)",
                opt_ms(s.healed_at)
            )?;
        }
        for c in &s.collectives {
            writeln!(
                f,
                "  {:<28} {:>14}   ({} instances, last call at {})",
                format!("{} (virtual)", c.op),
                opt_ms(Some(c.took())),
                c.participants,
                opt_ms(Some(c.last_call)),
            )?;
        }
        writeln!(f, "  {:<28} {:>14}", "messages by phase", "")?;
        for (name, n) in [
            ("  discovery udp (ping)", m.discovery_udp),
            ("  discovery zmq (pong/ready)", m.discovery_zmq),
            ("  global udp (register)", m.global_udp),
            ("  global zmq (join)", m.global_zmq),
            ("  global zmq (resolve)", m.global_resolve),
            ("  reliable data", m.data),
            ("  feedback (ack/err)", m.feedback),
            ("  frame query/report", m.frame_queries),
            ("  heartbeats", m.heartbeats),
            ("  collective steps", m.collective),
        ] {
            writeln!(f, "  {name:<28} {n:>14}")?;
        }
        for (name, n) in [
            (
                "lost / duplicated",
                format!("{} / {}", s.lost, s.duplicated),
            ),
            ("cut by partition", s.cut.to_string()),
            (
                "to dead / from old life",
                format!("{} / {}", s.to_dead, s.from_old_life),
            ),
            ("deferred (frame buffer full)", s.deferred.to_string()),
            (
                "frames handed over / missing",
                format!("{} / {}", s.frames_handed, s.frames_missing),
            ),
            ("cells handled", s.cells_handled.to_string()),
            (
                "ack / err / timed out",
                format!("{} / {} / {}", s.acks, s.errs, s.timeouts),
            ),
            ("retransmissions", s.retransmissions.to_string()),
            ("peer resets", s.peer_resets.to_string()),
            ("declared dead", s.declared_dead.to_string()),
            ("max in flight", s.max_in_flight.to_string()),
            ("max buffered cells", s.max_buffered_cells.to_string()),
            ("events", s.events.to_string()),
            ("wall time", format!("{:.3} s", self.wall.as_secs_f64())),
        ] {
            writeln!(f, "  {name:<28} {n:>14}")?;
        }
        write!(f, "invariants hold")
    }
}

/// Simulate the job of `cfg` and check the invariants of DESIGN §9.
pub fn run(cfg: &SimConfig) -> Result<SimReport, SimViolation> {
    cfg.validate()?;
    let started = std::time::Instant::now();
    let stats = engine::Sim::new(cfg).run()?;
    Ok(SimReport {
        seed: cfg.seed,
        stats,
        wall: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_lossy_job_holds_every_invariant_and_replays_exactly() {
        let cfg = SimConfig {
            nodes: 2,
            per_node: 3,
            loss: 0.1,
            dup: 0.05,
            reorder: 0.2,
            seed: 11,
            ..SimConfig::default()
        };
        let a = run(&cfg).unwrap();
        assert_eq!(a.stats.instances, 6);
        assert_eq!(a.stats.frames_handed, 6 * cfg.frames);
        assert!(a.stats.global_ready.is_some() && a.stats.lost > 0);
        assert_eq!(run(&cfg).unwrap().stats, a.stats);
        assert!(a.to_string().ends_with("invariants hold"));
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let bad = SimConfig {
            loss: 1.0,
            ..SimConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(SimConfigError::Probability { name: "loss", .. })
        ));
        let bad = SimConfig {
            partition: Some(PartitionSpec {
                node: 2,
                start: Duration::ZERO,
                duration: Duration::ZERO,
            }),
            ..SimConfig::default()
        };
        assert_eq!(
            bad.validate(),
            Err(SimConfigError::PartitionNode { node: 2, nodes: 2 })
        );
    }
}
