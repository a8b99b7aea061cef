//! Global join: node leaders register with the coordinator, leaders learn
//! each other (a full mesh in one round), the coordinator announces *global
//! ready*, and members resolve remote peers lazily through their leader.
//!
//! Owns the coordinator's registry, each leader's directory and each
//! member's cache of resolved peers. Must not touch sockets or the clock.
//!
//! Message flow (every step idempotent, every request repeated with backoff
//! until answered, so any message may be lost or duplicated):
//! - leader → coordinator (UDP): `Register { node, leader, members, lost }`
//!   (`lost`: node-mates declared dead, which count towards the job's size
//!   before the first global ready, so a death during start-up does not
//!   leave the coordinator waiting);
//! - coordinator → leader (ZeroMQ): `Welcome` while nodes are missing, then
//!   `GlobalReady { directory }` to every leader at once when the last node
//!   is in; a leader stops registering when it has the directory;
//! - leader → members: `GlobalReady` (no directory); members also ask with
//!   `AwaitGlobal` until they have it;
//! - member → leader: `Resolve { ranks }` → `Resolved { peers }`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use rand::{rngs::SmallRng, SeedableRng};

use super::{
    backoff::{Backoff, BackoffPolicy},
    wire::{Control, NodeEntry, Register},
    Now, PeerInfo, Rank,
};

/// Timing of the global join.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GlobalConfig {
    /// Spacing of a leader's registrations until it has the directory.
    pub register: BackoffPolicy,
    /// Spacing of a member's requests to its leader (AwaitGlobal, Resolve).
    pub request: BackoffPolicy,
}

impl Default for GlobalConfig {
    fn default() -> Self {
        Self {
            register: BackoffPolicy::new(
                Duration::from_millis(20),
                2.0,
                Duration::from_secs(1),
                0.2,
            ),
            request: BackoffPolicy::new(
                Duration::from_millis(20),
                2.0,
                Duration::from_millis(500),
                0.2,
            ),
        }
    }
}

/// What the driver must send.
#[derive(Clone, Debug, PartialEq)]
pub enum GlobalTransmit {
    /// A UDP registration to the coordinator's known address.
    Register(Register),
    /// A ZeroMQ message to `to`.
    ToPeer {
        /// The recipient, with the endpoints to connect to.
        to: PeerInfo,
        /// The message.
        msg: Control,
    },
}

/// What the global join tells its driver.
#[derive(Clone, Debug, PartialEq)]
pub enum GlobalEvent {
    /// Every node of the job is in.
    Ready {
        /// Number of nodes in the job.
        nodes: u32,
        /// Number of instances in the job (ranks are `0..size`).
        size: u32,
    },
    /// Where a remote instance receives (answer to [`GlobalJoin::resolve`]).
    Resolved(PeerInfo),
    /// Leader: the coordinator announced a changed directory (a node's
    /// membership or leader changed) after global ready.
    DirectoryChanged,
}

/// Registrations the coordinator refused, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoordinatorStats {
    /// Registrations received, valid or not (repeats included).
    pub registrations: u64,
    /// Node index outside the job, or inconsistent member list.
    pub invalid: u64,
    /// From an older incarnation of a node's leader than the one we hold.
    pub stale: u64,
}

/// The coordinator's registry (runs on the leader of the coordinator node).
pub struct Coordinator {
    expected_nodes: u32,
    size: u32,
    nodes: BTreeMap<u32, NodeEntry>,
    /// Per node, the ranks its leader reported dead.
    lost: BTreeMap<u32, Vec<Rank>>,
    announced: bool,
    /// The job was globally ready once: from then on instances may be
    /// missing (lost), and every change of a node is announced.
    was_ready: bool,
    /// Epoch of the directory: grows with every change of a node (and
    /// continues from what registering leaders have seen).
    epoch: u64,
    transmits: VecDeque<GlobalTransmit>,
    stats: CoordinatorStats,
}

impl Coordinator {
    /// A registry waiting for `expected_nodes` nodes holding `size` instances in all.
    pub fn new(expected_nodes: u32, size: u32) -> Self {
        Self {
            expected_nodes,
            size,
            nodes: BTreeMap::new(),
            lost: BTreeMap::new(),
            announced: false,
            was_ready: false,
            epoch: 0,
            transmits: VecDeque::new(),
            stats: CoordinatorStats::default(),
        }
    }

    /// Counters since the start.
    pub fn stats(&self) -> &CoordinatorStats {
        &self.stats
    }

    /// How many distinct nodes have registered.
    pub fn registered(&self) -> u32 {
        self.nodes.len() as u32
    }

    /// The registered leader of every node, by node index (what the next
    /// `GlobalReady` announces as the node-leader list).
    pub fn node_leaders(&self) -> Vec<Rank> {
        self.nodes.values().map(|n| n.leader.rank).collect()
    }

    /// A coordinator that takes over after the job was globally ready (its
    /// predecessor died): lost instances are not waited for.
    pub fn resume(expected_nodes: u32, size: u32) -> Self {
        Self {
            was_ready: true,
            ..Self::new(expected_nodes, size)
        }
    }

    /// Whether every node has registered and, before the first global ready,
    /// every one of the `size` instances is accounted for: in some node's
    /// member list, or reported lost by its node's leader.
    pub fn is_ready(&self) -> bool {
        if self.registered() != self.expected_nodes {
            return false;
        }
        if self.was_ready {
            return true;
        }
        let members = self
            .nodes
            .values()
            .flat_map(|n| n.members.iter().map(|m| m.rank));
        let lost = self.lost.values().flatten().copied();
        members.chain(lost).collect::<BTreeSet<Rank>>().len() == self.size as usize
    }

    /// A registration that arrived over UDP (already authenticated).
    pub fn handle_register(&mut self, reg: Register) {
        self.stats.registrations += 1;
        let consistent = reg.node_index < self.expected_nodes
            && reg.leader.node_index == reg.node_index
            && reg
                .members
                .iter()
                .any(|m| m.rank == reg.leader.rank && m.incarnation == reg.leader.incarnation)
            && reg
                .members
                .iter()
                .all(|m| m.node_index == reg.node_index && m.rank < self.size)
            && reg
                .lost
                .iter()
                .all(|&r| r < self.size && !reg.members.iter().any(|m| m.rank == r));
        if !consistent {
            self.stats.invalid += 1;
            return;
        }
        self.epoch = self.epoch.max(reg.epoch);
        let lost = reg.lost;
        let entry = NodeEntry {
            node_index: reg.node_index,
            node_name: reg.node_name,
            leader: reg.leader.clone(),
            members: reg.members,
        };
        match self.nodes.get(&reg.node_index) {
            Some(old)
                if old.leader.rank == entry.leader.rank
                    && old.leader.incarnation > entry.leader.incarnation =>
            {
                self.stats.stale += 1;
                return;
            }
            Some(old) if *old == entry => {
                self.lost.insert(reg.node_index, lost);
            }
            _ => {
                self.lost.insert(reg.node_index, lost);
                self.nodes.insert(reg.node_index, entry);
                self.epoch += 1;
                // A changed node (new leader or incarnation) after global
                // ready: everybody needs the new directory.
                if self.announced {
                    self.announced = false;
                }
            }
        }
        if self.is_ready() {
            if !self.announced {
                self.announced = true;
                self.was_ready = true;
                let msg = self.global_ready();
                for node in self.nodes.values() {
                    self.transmits.push_back(GlobalTransmit::ToPeer {
                        to: node.leader.clone(),
                        msg: msg.clone(),
                    });
                }
            } else {
                // A repeated registration: its leader missed the announcement.
                let msg = self.global_ready();
                self.transmits.push_back(GlobalTransmit::ToPeer {
                    to: reg.leader,
                    msg,
                });
            }
        } else {
            let msg = Control::Welcome {
                registered: self.registered(),
                expected_nodes: self.expected_nodes,
            };
            self.transmits.push_back(GlobalTransmit::ToPeer {
                to: reg.leader,
                msg,
            });
        }
    }

    fn global_ready(&self) -> Control {
        Control::GlobalReady {
            nodes: self.expected_nodes,
            size: self.size,
            directory: self.nodes.values().cloned().collect(),
            epoch: self.epoch,
        }
    }

    /// The next message the driver must send.
    pub fn poll_transmit(&mut self) -> Option<GlobalTransmit> {
        self.transmits.pop_front()
    }
}

enum Role {
    Leader {
        registration: Register,
        timer: Backoff,
    },
    Member {
        leader: PeerInfo,
        timer: Backoff,
    },
}

/// One instance's part of the global join, after its node is complete.
pub struct GlobalJoin {
    me: Rank,
    role: Role,
    config: GlobalConfig,
    ready: Option<(u32, u32)>,
    /// Leader: every instance of the job. Member: what it resolved so far.
    directory: HashMap<Rank, PeerInfo>,
    /// Member: ranks asked of the leader and not answered yet.
    pending: BTreeMap<Rank, Backoff>,
    /// Leader: the leader of every node, by node index.
    node_leaders: Vec<Rank>,
    /// Still repeating the registration (leader) or AwaitGlobal (member).
    waiting: bool,
    /// Leader: dead node leaders the directory must stop naming.
    superseded: std::collections::BTreeSet<Rank>,
    /// Leader: epoch of the newest directory taken (older ones are ignored).
    epoch: u64,
    rng: SmallRng,
    transmits: VecDeque<GlobalTransmit>,
    events: VecDeque<GlobalEvent>,
}

impl GlobalJoin {
    /// This instance leads its node: register `members` (and the node-mates
    /// declared dead, `lost`) with the coordinator.
    pub fn leader(
        me: PeerInfo,
        node_name: String,
        members: Vec<PeerInfo>,
        lost: Vec<Rank>,
        config: GlobalConfig,
        now: Now,
        seed: u64,
    ) -> Self {
        let registration = Register {
            node_index: me.node_index,
            node_name,
            leader: me.clone(),
            members,
            lost,
            epoch: 0,
        };
        Self::with_role(
            me.rank,
            Role::Leader {
                registration,
                timer: Backoff::start(config.register, now),
            },
            config,
            now,
            seed,
        )
    }

    /// This instance is a member of a node led by `leader`.
    pub fn member(me: Rank, leader: PeerInfo, config: GlobalConfig, now: Now, seed: u64) -> Self {
        Self::with_role(
            me,
            Role::Member {
                leader,
                timer: Backoff::start(config.request, now),
            },
            config,
            now,
            seed,
        )
    }

    /// The first registration (leader) or AwaitGlobal (member) is queued
    /// at once: the driver sends it with the discovery output that made
    /// this instance take its role, not one timer round later.
    fn with_role(me: Rank, role: Role, config: GlobalConfig, now: Now, seed: u64) -> Self {
        let mut join = Self {
            me,
            role,
            config,
            ready: None,
            directory: HashMap::new(),
            pending: BTreeMap::new(),
            node_leaders: Vec::new(),
            waiting: true,
            superseded: std::collections::BTreeSet::new(),
            epoch: 0,
            rng: SmallRng::seed_from_u64(seed),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        join.handle_timeout(now);
        join
    }

    /// Forget what is known about `rank` (it restarted elsewhere): the next
    /// [`Self::resolve`] asks the leader again.
    pub fn forget(&mut self, rank: Rank) {
        if !self.is_leader() {
            self.directory.remove(&rank);
        }
    }

    /// The node's membership changed (an instance restarted or died; `lost`
    /// are the node-mates declared dead): a leader registers the new list,
    /// so the coordinator re-announces the directory to every leader (or,
    /// before global ready, stops waiting for the lost).
    pub fn update_members(&mut self, now: Now, members: Vec<PeerInfo>, lost: Vec<Rank>) {
        if let Role::Leader {
            registration,
            timer,
        } = &mut self.role
        {
            if registration.members != members || registration.lost != lost {
                registration.members = members;
                registration.lost = lost;
                *timer = Backoff::start(self.config.register, now);
                self.waiting = true;
            }
        }
    }

    /// Leader: register again (the coordinator moved to a new leader of
    /// node 0, whose registry starts empty).
    pub fn reregister(&mut self, now: Now) {
        if let Role::Leader { timer, .. } = &mut self.role {
            *timer = Backoff::start(self.config.register, now);
            self.waiting = true;
        }
    }

    /// Leader: `dead` led a node (node 0's: the coordinator) and died.
    /// Register again, and keep registering until the coordinator's
    /// directory no longer names it: the one announcement of the change
    /// may be lost, and a repeated registration is answered with the
    /// current directory.
    pub fn await_leader_change(&mut self, now: Now, dead: Rank) {
        if self.is_leader() && dead != self.me {
            self.superseded.insert(dead);
            self.reregister(now);
        }
    }

    /// What this instance knows of `rank` without asking anybody (a
    /// leader: the whole directory; a member: what it resolved).
    pub fn directory_entry(&self, rank: Rank) -> Option<&PeerInfo> {
        self.directory.get(&rank)
    }

    /// Leader, once globally ready: the leader of every node by node index
    /// (the first one runs the coordinator). Empty on members.
    pub fn node_leaders(&self) -> &[Rank] {
        &self.node_leaders
    }

    /// Whether this instance leads its node.
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader { .. })
    }

    /// `(nodes, size)` once the job is globally ready.
    pub fn ready(&self) -> Option<(u32, u32)> {
        self.ready
    }

    /// Where `rank` receives, if known; otherwise a request goes to the
    /// leader and a [`GlobalEvent::Resolved`] follows.
    pub fn resolve(&mut self, now: Now, rank: Rank) -> Option<PeerInfo> {
        if let Some(p) = self.directory.get(&rank) {
            return Some(p.clone());
        }
        if let Role::Member { leader, .. } = &self.role {
            if !self.pending.contains_key(&rank) {
                let leader = leader.clone();
                let mut timer = Backoff::start(self.config.request, now);
                timer.fire(now, &mut self.rng);
                self.pending.insert(rank, timer);
                self.transmits.push_back(GlobalTransmit::ToPeer {
                    to: leader,
                    msg: Control::Resolve { ranks: vec![rank] },
                });
            }
        }
        None
    }

    /// A global-join message from a peer. Returns the answer to send back to
    /// the requester (leaders answer members' requests), if any.
    pub fn handle_control(&mut self, _now: Now, msg: &Control) -> Option<Control> {
        match msg {
            Control::Welcome { .. } => None,
            Control::GlobalReady {
                nodes,
                size,
                directory,
                epoch,
            } => {
                if let Role::Leader { registration, .. } = &mut self.role {
                    if directory.is_empty() {
                        return None;
                    }
                    if *epoch < self.epoch {
                        // A delayed or duplicated older announcement.
                        return None;
                    }
                    self.epoch = *epoch;
                    registration.epoch = *epoch;
                    let registration = &*registration;
                    self.directory = directory
                        .iter()
                        .flat_map(|n| n.members.iter())
                        .map(|p| (p.rank, p.clone()))
                        .collect();
                    self.node_leaders = directory.iter().map(|n| n.leader.rank).collect();
                    let leaders = &self.node_leaders;
                    self.superseded.retain(|r| leaders.contains(r));
                    self.waiting = !self.superseded.is_empty();
                    if self.ready.is_some() {
                        self.events.push_back(GlobalEvent::DirectoryChanged);
                    }
                    let announce = Control::GlobalReady {
                        nodes: *nodes,
                        size: *size,
                        directory: Vec::new(),
                        epoch: *epoch,
                    };
                    if self.ready.is_none() {
                        for m in registration.members.iter().filter(|m| m.rank != self.me) {
                            self.transmits.push_back(GlobalTransmit::ToPeer {
                                to: m.clone(),
                                msg: announce.clone(),
                            });
                        }
                    }
                }
                if !self.is_leader() {
                    self.waiting = false;
                }
                if self.ready.is_none() {
                    self.ready = Some((*nodes, *size));
                    self.events.push_back(GlobalEvent::Ready {
                        nodes: *nodes,
                        size: *size,
                    });
                }
                None
            }
            Control::AwaitGlobal => match (&self.role, self.ready) {
                (Role::Leader { .. }, Some((nodes, size))) => Some(Control::GlobalReady {
                    nodes,
                    size,
                    directory: Vec::new(),
                    epoch: self.epoch,
                }),
                _ => None,
            },
            Control::Resolve { ranks } if self.is_leader() && self.ready.is_some() => {
                Some(Control::Resolved {
                    peers: ranks
                        .iter()
                        .filter_map(|r| self.directory.get(r).cloned())
                        .collect(),
                })
            }
            Control::Resolved { peers } => {
                for p in peers {
                    if self.pending.remove(&p.rank).is_some() {
                        self.directory.insert(p.rank, p.clone());
                        self.events.push_back(GlobalEvent::Resolved(p.clone()));
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// When [`Self::handle_timeout`] should next run: the registration or
    /// AwaitGlobal timer while waiting, and unanswered resolve requests.
    pub fn poll_timeout(&self) -> Option<Now> {
        let role = match &self.role {
            Role::Leader { timer, .. } | Role::Member { timer, .. } if self.waiting => {
                Some(timer.next())
            }
            _ => None,
        };
        role.into_iter()
            .chain(self.pending.values().map(|t| t.next()))
            .min()
    }

    /// Repeat the registration (leader) or AwaitGlobal (member) while waiting,
    /// and unanswered Resolve requests, when their timers are due.
    pub fn handle_timeout(&mut self, now: Now) {
        if self.waiting {
            match &mut self.role {
                Role::Leader {
                    registration,
                    timer,
                } if timer.is_due(now) => {
                    timer.fire(now, &mut self.rng);
                    self.transmits
                        .push_back(GlobalTransmit::Register(registration.clone()));
                }
                Role::Member { leader, timer } if timer.is_due(now) => {
                    timer.fire(now, &mut self.rng);
                    self.transmits.push_back(GlobalTransmit::ToPeer {
                        to: leader.clone(),
                        msg: Control::AwaitGlobal,
                    });
                }
                _ => {}
            }
        }
        if let Role::Member { leader, .. } = &self.role {
            let mut due = Vec::new();
            for (rank, timer) in self.pending.iter_mut() {
                if timer.is_due(now) {
                    timer.fire(now, &mut self.rng);
                    due.push(*rank);
                }
            }
            if !due.is_empty() {
                self.transmits.push_back(GlobalTransmit::ToPeer {
                    to: leader.clone(),
                    msg: Control::Resolve { ranks: due },
                });
            }
        }
    }

    /// The next message the driver must send.
    pub fn poll_transmit(&mut self) -> Option<GlobalTransmit> {
        self.transmits.pop_front()
    }

    /// The next thing learned about the job.
    pub fn poll_event(&mut self) -> Option<GlobalEvent> {
        self.events.pop_front()
    }

    /// Member: the node's leader is now `leader` (typically the same rank
    /// in a new incarnation, after a restart: discovery reports it with
    /// `PeerRestarted` and a new `Complete`). Requests still unanswered go
    /// to it at once; without this they would be repeated forever to an
    /// endpoint that no longer exists. Leaders ignore it.
    pub fn follow_leader(&mut self, now: Now, new_leader: PeerInfo) {
        let Role::Member { leader, timer } = &mut self.role else {
            return;
        };
        if *leader == new_leader {
            return;
        }
        *leader = new_leader.clone();
        if self.waiting {
            timer.reset(now);
        }
        let ranks: Vec<Rank> = self.pending.keys().copied().collect();
        for t in self.pending.values_mut() {
            t.reset(now);
            t.fire(now, &mut self.rng);
        }
        if !ranks.is_empty() {
            self.transmits.push_back(GlobalTransmit::ToPeer {
                to: new_leader,
                msg: Control::Resolve { ranks },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Endpoints, Incarnation};

    fn info(rank: Rank, node: u32) -> PeerInfo {
        PeerInfo {
            rank,
            node_index: node,
            incarnation: Incarnation(1),
            endpoints: Endpoints {
                ipc: None,
                tcp: format!("tcp://198.18.0.{node}:{}", 2000 + rank),
            },
        }
    }

    fn ms(n: u64) -> Now {
        Duration::from_millis(n)
    }

    /// `nodes` nodes of `per` instances: joins for all, one coordinator.
    struct Job {
        coordinator: Coordinator,
        joins: Vec<GlobalJoin>,
        per: u32,
        messages: u64,
    }

    impl Job {
        fn new(nodes: u32, per: u32) -> Self {
            let mut joins = Vec::new();
            for n in 0..nodes {
                let members: Vec<_> = (0..per).map(|i| info(n * per + i, n)).collect();
                for i in 0..per {
                    let rank = n * per + i;
                    joins.push(if i == 0 {
                        GlobalJoin::leader(
                            info(rank, n),
                            format!("n{n}"),
                            members.clone(),
                            Vec::new(),
                            GlobalConfig::default(),
                            ms(0),
                            rank as u64,
                        )
                    } else {
                        GlobalJoin::member(
                            rank,
                            info(n * per, n),
                            GlobalConfig::default(),
                            ms(0),
                            rank as u64,
                        )
                    });
                }
            }
            Self {
                coordinator: Coordinator::new(nodes, nodes * per),
                joins,
                per,
                messages: 0,
            }
        }

        fn step(&mut self, now: Now, mut keep: impl FnMut(u64) -> bool) {
            let mut inbox: Vec<(Rank, Rank, Control)> = Vec::new();
            for j in self.joins.iter_mut() {
                j.handle_timeout(now);
            }
            for (i, j) in self.joins.iter_mut().enumerate() {
                while let Some(t) = j.poll_transmit() {
                    self.messages += 1;
                    if !keep(self.messages) {
                        continue;
                    }
                    match t {
                        GlobalTransmit::Register(r) => self.coordinator.handle_register(r),
                        GlobalTransmit::ToPeer { to, msg } => inbox.push((i as Rank, to.rank, msg)),
                    }
                }
            }
            while let Some(GlobalTransmit::ToPeer { to, msg }) = self.coordinator.poll_transmit() {
                self.messages += 1;
                if keep(self.messages) {
                    inbox.push((u32::MAX, to.rank, msg));
                }
            }
            for (from, to, msg) in inbox {
                if let Some(answer) = self.joins[to as usize].handle_control(now, &msg) {
                    if from != u32::MAX {
                        self.joins[from as usize].handle_control(now, &answer);
                    }
                }
            }
        }
    }

    #[test]
    fn four_nodes_reach_global_ready_and_members_resolve_remote_peers() {
        let mut job = Job::new(4, 3);
        for t in 0..50 {
            job.step(ms(t), |_| true);
        }
        assert!(job.coordinator.is_ready());
        for j in &job.joins {
            assert_eq!(j.ready(), Some((4, 12)));
        }
        // Rank 4 (member of node 1) resolves rank 11 (node 3) via its leader.
        assert_eq!(job.joins[4].resolve(ms(60), 11), None);
        job.step(ms(61), |_| true);
        let events: Vec<_> = std::iter::from_fn(|| job.joins[4].poll_event()).collect();
        assert!(events.contains(&GlobalEvent::Resolved(info(11, 3))));
        assert_eq!(job.joins[4].resolve(ms(62), 11), Some(info(11, 3)));
        assert_eq!(job.joins[4].directory_entry(11), Some(&info(11, 3)));
        assert_eq!(job.joins[0].directory_entry(10), Some(&info(10, 3)));
        assert_eq!(job.joins[4].directory_entry(10), None, "not resolved yet");
        assert!(job.per == 3);
    }

    #[test]
    fn global_ready_survives_heavy_loss() {
        for seed in 1..40u64 {
            let mut job = Job::new(5, 2);
            let mut s = seed;
            let mut t = 0;
            while job.joins.iter().any(|j| j.ready().is_none()) {
                t += 1;
                assert!(t < 100_000, "seed {seed}: no global ready");
                job.step(ms(t), |_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (s >> 33) % 10 >= 4 // 40% loss
                });
            }
        }
    }

    #[test]
    fn registrations_grow_linearly_with_nodes() {
        let mut counts = Vec::new();
        for nodes in [4u32, 16, 64] {
            let mut job = Job::new(nodes, 2);
            let mut t = 0;
            while job.joins.iter().any(|j| j.ready().is_none()) {
                t += 1;
                job.step(ms(t), |_| true);
            }
            counts.push(job.messages as f64 / nodes as f64);
        }
        // messages per node stay constant (not growing with the node count)
        assert!(counts[2] < counts[0] * 2.0, "{counts:?}");
    }

    #[test]
    fn after_global_ready_a_node_that_lost_an_instance_is_announced_again() {
        let mut c = Coordinator::new(2, 4);
        let reg = |node: u32, ranks: &[u32]| Register {
            node_index: node,
            node_name: format!("n{node}"),
            leader: info(ranks[0], node),
            members: ranks.iter().map(|&r| info(r, node)).collect(),
            lost: Vec::new(),
            epoch: 0,
        };
        c.handle_register(reg(0, &[0, 1]));
        c.handle_register(reg(1, &[2, 3]));
        while c.poll_transmit().is_some() {}
        // Rank 2 (node 1's leader) died; rank 3 leads and registers alone.
        c.handle_register(reg(1, &[3]));
        let out: Vec<_> = std::iter::from_fn(|| c.poll_transmit()).collect();
        assert_eq!(out.len(), 2, "both leaders get the new directory: {out:?}");
        assert!(out.iter().all(|t| matches!(
            t,
            GlobalTransmit::ToPeer {
                msg: Control::GlobalReady { .. },
                ..
            }
        )));
        assert_eq!(
            c.node_leaders(),
            vec![0, 3],
            "the failed-over leader is listed"
        );
        // A coordinator taking over after global ready does not wait for the lost.
        let mut r = Coordinator::resume(2, 4);
        r.handle_register(reg(0, &[1]));
        r.handle_register(reg(1, &[2, 3]));
        assert!(r.is_ready());
    }

    #[test]
    fn a_leader_keeps_registering_until_the_directory_drops_a_dead_leader() {
        let mut job = Job::new(3, 2);
        for t in 0..50 {
            job.step(ms(t), |_| true);
        }
        // Rank 2 (node 1's leader) dies; rank 0 (node 0's leader) notices.
        job.joins[0].await_leader_change(ms(100), 2);
        let mut registered = 0;
        for t in 101..3000 {
            // Every message to or from the coordinator is lost: rank 0
            // must keep registering, not give up after one try.
            job.joins[0].handle_timeout(ms(t));
            while let Some(m) = job.joins[0].poll_transmit() {
                registered += u32::from(matches!(m, GlobalTransmit::Register(_)));
            }
        }
        assert!(registered >= 3, "registrations repeated: {registered}");
        assert!(job.joins[0].poll_timeout().is_some(), "still waiting");
        // A directory that no longer names rank 2 ends the wait.
        let dir = |epoch: u64, leaders: &[(u32, u32)]| Control::GlobalReady {
            nodes: 3,
            size: 6,
            epoch,
            directory: leaders
                .iter()
                .map(|&(node, leader)| NodeEntry {
                    node_index: node,
                    node_name: format!("n{node}"),
                    leader: info(leader, node),
                    members: vec![info(leader, node)],
                })
                .collect(),
        };
        job.joins[0].handle_control(ms(3001), &dir(5, &[(0, 0), (1, 2), (2, 4)]));
        assert!(
            job.joins[0].poll_timeout().is_some(),
            "old directory: keep waiting"
        );
        job.joins[0].handle_control(ms(3002), &dir(6, &[(0, 0), (1, 3), (2, 4)]));
        assert_eq!(job.joins[0].node_leaders(), &[0, 3, 4]);
        assert_eq!(job.joins[0].poll_timeout(), None);
        // A delayed older announcement does not undo the newer directory
        // (found by the simulator, 3x2, 5% loss, kill 2@0, seed 6).
        job.joins[0].handle_control(ms(3003), &dir(5, &[(0, 0), (1, 2), (2, 4)]));
        assert_eq!(job.joins[0].node_leaders(), &[0, 3, 4]);
    }

    /// Found by `cellnet sim` (3x4, kill 0@join / 4@discovery, seed 3):
    /// before the first global ready the coordinator waited for every
    /// instance, also one that died during start-up.
    #[test]
    fn ranks_reported_lost_before_global_ready_count_towards_the_size() {
        let reg = |node: u32, ranks: &[u32], lost: Vec<Rank>| Register {
            node_index: node,
            node_name: format!("n{node}"),
            leader: info(ranks[0], node),
            members: ranks.iter().map(|&r| info(r, node)).collect(),
            lost,
            epoch: 0,
        };
        let mut c = Coordinator::new(2, 6);
        c.handle_register(reg(0, &[0, 1, 2], Vec::new()));
        c.handle_register(reg(1, &[4, 5], Vec::new()));
        assert!(!c.is_ready(), "rank 3 unaccounted for");
        // Node 1's leader declared rank 3 dead.
        c.handle_register(reg(1, &[4, 5], vec![3]));
        assert!(c.is_ready());
        let out: Vec<_> = std::iter::from_fn(|| c.poll_transmit()).collect();
        assert!(out.iter().any(|t| matches!(
            t,
            GlobalTransmit::ToPeer {
                msg: Control::GlobalReady { size: 6, .. },
                ..
            }
        )));
        // A rank reported lost twice, or lost and a member elsewhere, is
        // one instance, not two.
        let mut c = Coordinator::new(2, 6);
        c.handle_register(reg(0, &[0, 1], vec![3]));
        c.handle_register(reg(1, &[3, 4], vec![2]));
        assert!(!c.is_ready(), "rank 5 is missing");
    }

    #[test]
    fn inconsistent_or_foreign_registrations_are_refused() {
        let mut c = Coordinator::new(2, 4);
        c.handle_register(Register {
            node_index: 7,
            node_name: "x".into(),
            leader: info(0, 7),
            members: vec![info(0, 7)],
            lost: Vec::new(),
            epoch: 0,
        });
        c.handle_register(Register {
            node_index: 0,
            node_name: "x".into(),
            leader: info(0, 0),
            members: vec![info(1, 0)],
            lost: Vec::new(),
            epoch: 0,
        });
        // A lost rank outside the job, or one that is also a member.
        for lost in [vec![9], vec![0]] {
            c.handle_register(Register {
                node_index: 0,
                node_name: "x".into(),
                leader: info(0, 0),
                members: vec![info(0, 0)],
                lost,
                epoch: 0,
            });
        }
        assert_eq!(c.stats().invalid, 4);
        assert_eq!(c.registered(), 0);
        assert!(c.poll_transmit().is_none());
    }

    /// Found by `cellnet sim` (crash mix, seed 15: rank 3, leader of node 1,
    /// crashed while rank 4 waited for a resolution): the member kept asking
    /// the dead life of its leader and its cells to remote peers timed out.
    #[test]
    fn member_resolving_through_a_restarted_leader_asks_its_new_life() {
        let old = info(0, 0);
        let mut m = GlobalJoin::member(1, old.clone(), GlobalConfig::default(), ms(0), 1);
        // The first AwaitGlobal is queued at creation.
        assert_eq!(
            m.poll_transmit(),
            Some(GlobalTransmit::ToPeer {
                to: old.clone(),
                msg: Control::AwaitGlobal
            })
        );
        m.handle_control(
            ms(1),
            &Control::GlobalReady {
                nodes: 2,
                size: 4,
                directory: Vec::new(),
                epoch: 0,
            },
        );
        assert_eq!(m.resolve(ms(2), 3), None);
        let asked: Vec<_> = std::iter::from_fn(|| m.poll_transmit()).collect();
        assert!(matches!(&asked[..], [GlobalTransmit::ToPeer { to, .. }] if *to == old));
        let mut new = old.clone();
        new.incarnation = Incarnation(2);
        m.follow_leader(ms(3), new.clone());
        let asked: Vec<_> = std::iter::from_fn(|| m.poll_transmit()).collect();
        assert_eq!(
            asked,
            vec![GlobalTransmit::ToPeer {
                to: new.clone(),
                msg: Control::Resolve { ranks: vec![3] }
            }]
        );
        // Repeats go to the new life too.
        let t = m.poll_timeout().unwrap();
        m.handle_timeout(t);
        assert!(std::iter::from_fn(|| m.poll_transmit())
            .all(|x| matches!(x, GlobalTransmit::ToPeer { to, .. } if to == new)));
        m.handle_control(
            ms(9),
            &Control::Resolved {
                peers: vec![info(3, 1)],
            },
        );
        let events: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
        assert!(
            events.contains(&GlobalEvent::Resolved(info(3, 1))),
            "{events:?}"
        );
    }
}
