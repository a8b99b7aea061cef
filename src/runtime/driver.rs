//! The engine: every `proto` state machine over the sockets, run by
//! whichever thread holds its lock.
//!
//! The I/O thread runs rounds: take commands and handler outcomes, fire
//! timers, read the sockets, flush what the state machines want to send;
//! then it lets go of the lock and sleeps in `poll(2)` until a socket's
//! signal fd, the wake-up eventfd or the next timer. An application thread
//! that finds the lock free after queueing a send runs a short round itself
//! ([`Engine::assist`]): the cell goes out and answers already there are
//! taken in without a hand-off to the I/O thread and back.

// Keys are ranks (validated against the job size): a fast hash is safe.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use super::faults::{Dest, FaultInjector};
use super::shared::{lock, Commands, CreditGate, Metrics, StatusCell, Waker};
use super::{codes, Cell, Command, Handler, HandlerError, PeerEvent, ShutdownReport};
use crate::config::Config;
use crate::launch::LaunchInfo;
use crate::net::{
    udp::UdpEndpoint,
    zmq_transport::{Inbound, ZmqTransport},
    NetError,
};
use crate::proto::{
    discovery::{DiscoveryEvent, DiscoveryTransmit, LocalDiscovery},
    frames::{CompleteFrame, FrameAssembler, FrameMissing},
    global::{Coordinator, GlobalEvent, GlobalJoin, GlobalTransmit},
    liveness::{Liveness, LivenessEvent},
    reliable::{Outcome, ReliableEndpoint, ReliableEvent, ReliableTransmit, Verdict},
    ring::IdRing,
    wire::{self, Control, DataKind, DataMsg, Datagram, JobSecret, PeerMsg, WireError},
    Incarnation, Now, PeerInfo, Rank,
};

/// Everything the driver is built from.
pub(crate) struct Parts {
    pub config: Config,
    pub info: LaunchInfo,
    pub me: PeerInfo,
    pub coordinator: SocketAddrV4,
    pub transport: ZmqTransport,
    pub udp: UdpEndpoint,
    pub pool: rayon::ThreadPool,
    /// `None`: no handler was given; cells are accepted by the I/O thread
    /// itself (there is nothing to run on the pool).
    pub handler: Option<Handler>,
    pub commands: Arc<Commands>,
    pub frames: Sender<Result<CompleteFrame, FrameMissing>>,
    pub events: Sender<PeerEvent>,
    pub collectives: Sender<(Rank, u64, Bytes)>,
    pub waker: Arc<Waker>,
    pub credits: Arc<CreditGate>,
    pub status: Arc<StatusCell>,
    pub metrics: Arc<Metrics>,
    /// The first frame of this life (later than 0 when resuming a checkpoint).
    pub first_frame: u64,
}

/// Data messages with payloads up to this size are gathered into batches.
const BATCH_PAYLOAD_MAX: usize = 4 * 1024;
/// A batch is sent once its body reaches this size.
const BATCH_BYTES: usize = 64 * 1024;

/// Small data messages for one peer, gathered during one round.
#[derive(Default)]
struct Batch {
    /// The first message, until a second one comes (alone it is sent as is).
    first: Option<DataMsg>,
    /// Entries of the messages once there are two or more (`first`
    /// included), `count` of them.
    body: Vec<u8>,
    count: u32,
}

/// A handler's verdict on a cell, on its way back to the I/O thread.
struct HandlerDone {
    cell: Cell,
    /// The sender's life the cell came from.
    life: Incarnation,
    result: Result<(), HandlerError>,
}

pub(crate) struct Driver {
    p: Parts,
    epoch: Instant,
    secret: JobSecret,
    discovery: LocalDiscovery,
    global: Option<GlobalJoin>,
    coordinator: Option<(Coordinator, UdpEndpoint)>,
    reliable: ReliableEndpoint,
    assembler: FrameAssembler,
    /// Where peers receive: node-mates from discovery, others resolved.
    peers: HashMap<Rank, PeerInfo>,
    /// Latest routing id seen per sender, for replies on the ROUTER.
    routes: HashMap<Rank, Vec<u8>>,
    /// Data for peers not resolved yet (bounded by the credit window).
    parked: HashMap<Rank, Vec<DataMsg>>,
    /// Open tickets per peer, by ticket id (handed out in sequence).
    tickets: HashMap<Rank, IdRing<OpenTicket>>,
    /// Messages the reliable channel cannot take yet, per peer, in order:
    /// the receiver tracks at most `dedup_window` ids above the oldest
    /// unanswered one, so an old cell still unanswered (a slow handler, a
    /// loss) stops later ones even while the credit window has room.
    backlog: HashMap<Rank, std::collections::VecDeque<Queued>>,
    /// Cells sent per (peer, frame), for the frame-end count.
    frame_counts: HashMap<(Rank, u64), u32>,
    /// A complete (or missing) frame waiting for room in the application's channel.
    ready_frame: Option<Result<CompleteFrame, FrameMissing>>,
    /// The latest incarnation seen of every peer that sent us anything.
    incarnations: HashMap<Rank, Incarnation>,
    /// The highest frame this instance ended towards each peer.
    ended: HashMap<Rank, u64>,
    done_tx: Sender<Vec<HandlerDone>>,
    done_rx: Receiver<Vec<HandlerDone>>,
    /// Cells delivered in this round, for the handler pool.
    to_handle: Vec<(Cell, Incarnation)>,
    /// Cells given to the handler so far.
    handled: u64,
    liveness: Liveness,
    /// Injected delay/duplication of everything sent (tests only).
    faults: Option<FaultInjector>,
    /// Peers declared dead (until they come back with a new incarnation).
    dead: std::collections::BTreeSet<Rank>,
    /// When a shutdown found everything answered (and said goodbye).
    drained_at: Option<Now>,
    /// Peers that left cleanly.
    goodbyes: HashSet<Rank>,
    handlers_running: usize,
    shutdown_since: Option<Now>,
    /// Reused buffer of received messages.
    inbox: Vec<Inbound>,
    /// Small data messages gathered per peer in this round.
    outbox: HashMap<Rank, Batch>,
    /// Credits (messages, payload bytes) of tickets resolved in this
    /// round, per peer.
    freed_credits: HashMap<Rank, (u32, u64)>,
    /// When the I/O thread, sleeping, wakes next for a timer.
    io_wake_at: Now,
    /// The transport's socket generation the I/O thread sleeps on.
    io_generation: u64,
    /// An error met by an application thread's round, for the I/O thread
    /// to stop on.
    failure: Option<String>,
    /// Reused buffer of commands taken in one round.
    command_buf: Vec<Command>,
    /// Reused buffer of the tickets of cells handed to the reliable
    /// channel together.
    opened: Vec<OpenTicket>,
    /// Reused buffer of consecutive single cells of one frame to one peer.
    sent_run: Vec<OpenCell>,
    /// Reused buffers of accepted cells `(id, payload)` of one frame from
    /// one peer, and of their answers.
    accepted: Vec<(u64, Bytes)>,
    answers: Vec<(u64, Verdict)>,
    /// Reused buffer of received datagrams.
    datagram_buf: Vec<u8>,
}

/// A cell from the application, with its ticket.
type OpenCell = (Bytes, super::shared::Resolver);

/// A message sent and not answered yet: its ticket, and the payload bytes
/// it holds of the credit window.
struct OpenTicket {
    resolver: super::shared::Resolver,
    bytes: u64,
}

/// A message waiting for room in the reliable channel.
struct Queued {
    frame: u64,
    kind: DataKind,
    payload: Bytes,
    ticket: super::shared::Resolver,
}

/// The [`Driver`] shared by the I/O thread and the application's threads.
pub(crate) struct Engine {
    driver: Mutex<Driver>,
    waker: Arc<Waker>,
    /// The I/O thread has finished; nothing runs the driver any more.
    stopped: AtomicBool,
}

impl Engine {
    pub fn new(driver: Driver) -> Arc<Self> {
        let waker = driver.p.waker.clone();
        Arc::new(Self {
            driver: Mutex::new(driver),
            waker,
            stopped: AtomicBool::new(false),
        })
    }

    /// Whether the I/O thread has finished (sends are refused).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(SeqCst)
    }

    /// On an application thread, after queueing a command: run a round
    /// right here when no other thread is in one, else wake the I/O thread.
    pub fn assist(&self) {
        if !self.try_round(false) {
            self.waker.wake();
        }
    }

    /// While an application thread waits for an answer: take in what the
    /// sockets hold, if no other thread is at it.
    pub fn poll_input(&self) {
        self.try_round(true);
    }

    /// A short round on this thread (`read`: every socket first) unless
    /// another thread is in one (then false).
    fn try_round(&self, read: bool) -> bool {
        let Ok(mut d) = self.driver.try_lock() else {
            return false;
        };
        if !self.is_stopped() {
            let kick = d.assist(read);
            drop(d);
            if kick {
                self.waker.wake();
            }
        }
        true
    }

    /// The I/O thread's life: rounds, and sleeps without the lock between
    /// them; then the books.
    pub fn run(&self) -> ShutdownReport {
        let result = self.io_loop();
        let mut d = lock(&self.driver);
        self.stopped.store(true, SeqCst);
        d.finish(result)
    }

    fn io_loop(&self) -> Result<(), String> {
        let mut sleeper = Sleeper::new(&lock(&self.driver));
        let mut woke = Woke::default();
        loop {
            let (wait_ms, spin) = {
                let mut d = lock(&self.driver);
                if d.round(woke)? {
                    return Ok(());
                }
                d.plan_sleep(&mut sleeper)?
            };
            woke = sleeper.sleep(wait_ms, spin)?;
        }
    }
}

/// Which of the I/O thread's UDP sockets woke it.
#[derive(Clone, Copy, Debug, Default)]
struct Woke {
    udp: bool,
    coordinator: bool,
}

/// What the I/O thread sleeps on, and how.
struct Sleeper {
    waker: Arc<Waker>,
    commands: Arc<Commands>,
    done: Receiver<Vec<HandlerDone>>,
    /// The eventfd, the discovery socket, the coordinator's socket if this
    /// instance runs it, then every ZeroMQ socket's signal fd.
    fds: Vec<libc::pollfd>,
    /// `(socket generation, coordinator)` `fds` was built for.
    built_for: Option<(u64, bool)>,
}

impl Sleeper {
    fn new(d: &Driver) -> Self {
        Self {
            waker: d.p.waker.clone(),
            commands: d.p.commands.clone(),
            done: d.done_rx.clone(),
            fds: Vec::new(),
            built_for: None,
        }
    }

    fn queues_busy(&self) -> bool {
        !self.commands.is_empty() || !self.done.is_empty()
    }

    /// `poll(2)` on every fd for up to `timeout_ms`; whether any is ready.
    fn poll(&mut self, timeout_ms: i64) -> Result<bool, String> {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                timeout_ms.clamp(-1, i32::MAX as i64) as i32,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        Ok(n != 0)
    }

    fn woke(&self) -> Woke {
        let readable = |i: usize| self.fds.get(i).is_some_and(|f| f.revents != 0);
        if readable(0) {
            self.waker.clear();
        }
        Woke {
            udp: readable(1),
            coordinator: self.fds.len() > 2 && readable(2),
        }
    }

    /// Wait for work: first polling without sleeping for up to `spin`
    /// (work that comes soon, such as the answer to what was just sent, is
    /// found without the cost of waking a sleeping core), then asleep for
    /// up to `wait_ms`.
    fn sleep(&mut self, wait_ms: i64, spin: Duration) -> Result<Woke, String> {
        if wait_ms == 0 {
            return Ok(Woke::default());
        }
        if !spin.is_zero() {
            let start = Instant::now();
            let budget = spin.min(Duration::from_millis(wait_ms as u64));
            loop {
                if self.queues_busy() {
                    return Ok(Woke::default());
                }
                if self.poll(0)? {
                    return Ok(self.woke());
                }
                if start.elapsed() >= budget {
                    break;
                }
                std::thread::yield_now();
            }
        }
        self.waker.park();
        let wait_ms = if self.waker.take_kick() || self.queues_busy() {
            0
        } else {
            wait_ms
        };
        let polled = self.poll(wait_ms);
        self.waker.unpark();
        polled?;
        Ok(self.woke())
    }
}

impl Driver {
    pub fn new(p: Parts) -> Self {
        let epoch = Instant::now();
        let seed = p.me.incarnation.0 ^ ((p.me.rank as u64) << 32);
        let secret = JobSecret::new(
            p.config
                .secret
                .clone()
                .unwrap_or_else(|| format!("cellnet-job-{:016x}", p.info.job_key.0).into_bytes()),
        );
        let discovery = LocalDiscovery::new(
            p.me.clone(),
            p.info.local_size,
            p.config.discovery,
            Duration::ZERO,
            seed,
        );
        let reliable = ReliableEndpoint::new(p.config.reliable.clone(), seed.rotate_left(17));
        let assembler = FrameAssembler::new(p.first_frame, p.config.frames_ahead);
        let p_liveness = p.config.liveness;
        let p_faults = p
            .config
            .faults
            .map(|f| FaultInjector::new(f, seed.rotate_left(29)));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        Self {
            p,
            epoch,
            secret,
            discovery,
            global: None,
            coordinator: None,
            reliable,
            assembler,
            peers: HashMap::default(),
            routes: HashMap::default(),
            parked: HashMap::default(),
            tickets: HashMap::default(),
            backlog: HashMap::default(),
            frame_counts: HashMap::default(),
            ready_frame: None,
            incarnations: HashMap::default(),
            ended: HashMap::default(),
            done_tx,
            done_rx,
            handlers_running: 0,
            to_handle: Vec::new(),
            handled: 0,
            drained_at: None,
            liveness: Liveness::new(p_liveness),
            faults: p_faults,
            dead: std::collections::BTreeSet::new(),
            goodbyes: HashSet::default(),
            shutdown_since: None,
            inbox: Vec::new(),
            outbox: HashMap::default(),
            freed_credits: HashMap::default(),
            io_wake_at: Duration::MAX,
            io_generation: 0,
            failure: None,
            command_buf: Vec::new(),
            opened: Vec::new(),
            sent_run: Vec::new(),
            accepted: Vec::new(),
            answers: Vec::new(),
            datagram_buf: Vec::new(),
        }
    }

    fn now(&self) -> Now {
        self.epoch.elapsed()
    }

    /// The books once the I/O thread's loop ended with `result`; open
    /// tickets resolve as timed out.
    fn finish(&mut self, result: Result<(), String>) -> ShutdownReport {
        if result.is_ok() && self.drained_at.is_none() {
            self.say_goodbye();
        }
        // Nothing more will be taken or delivered: the application's ends
        // see the channels disconnected (once drained) instead of waiting.
        self.p.commands.close();
        self.p.frames = crossbeam_channel::bounded(1).0;
        self.p.events = crossbeam_channel::bounded(1).0;
        self.p.collectives = crossbeam_channel::bounded(1).0;
        let backlog = self.backlog.drain().flat_map(|(to, q)| {
            q.into_iter()
                .map(move |m| (to, m.payload.len() as u64, m.ticket))
        });
        let open: Vec<_> = self
            .tickets
            .drain()
            .flat_map(|(to, mut ring)| {
                ring.take_all()
                    .into_iter()
                    .map(move |t| (to, t.bytes, t.resolver))
            })
            .chain(backlog)
            .collect();
        let open_count = open.len() as u64;
        // Tickets still open resolve now: nothing waits forever.
        for (to, bytes, tx) in open {
            tx.resolve(Outcome::TimedOut);
            self.p.credits.release(to, bytes);
        }
        let st = self.reliable.stats();
        let report = ShutdownReport {
            sent: st.sent,
            acknowledged: st.acks_received,
            refused: st.errs_received,
            timed_out: st.timeouts + open_count,
            delivered: st.delivered,
            handled: self.handled,
            unanswered: self.reliable.unanswered(),
            unacknowledged: self.reliable.pending_answers() + self.handlers_running,
        };
        self.p.status.update(|s| {
            s.stopped = true;
            if let Err(e) = result {
                s.failed = Some(e);
            }
        });
        report
    }

    /// One round of the I/O thread; true once the shutdown is complete.
    fn round(&mut self, woke: Woke) -> Result<bool, String> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        let now = self.now();
        if woke.udp {
            self.read_datagrams(now, false)?;
        }
        if woke.coordinator {
            self.read_datagrams(now, true)?;
        }
        self.take_commands(now);
        self.take_handler_results(now);
        self.fire_timers(now);
        self.read_zmq(now)?;
        self.flush(now)?;
        if let Some(since) = self.shutdown_since {
            // Drain: our messages answered, then goodbye ("no more from
            // me"), then stay until every peer that sent to us has said
            // goodbye too (answering it meanwhile), or the deadline.
            let drained = self.reliable.unanswered() == 0
                && self.backlog.is_empty()
                && self.reliable.pending_answers() == 0
                && self.handlers_running == 0;
            if drained && self.drained_at.is_none() {
                self.drained_at = Some(now);
                self.say_goodbye();
            }
            let peers_done = self.incarnations.keys().all(|r| self.goodbyes.contains(r));
            // A leader serves its node (resolutions, collectives): it
            // waits for its members' goodbyes up to the send deadline,
            // for everybody else's up to the linger time.
            let status = self.p.status.get();
            let me = self.p.me.rank;
            let members_done = status.leader != Some(me)
                || status.members.iter().all(|m| {
                    m.rank == me || self.goodbyes.contains(&m.rank) || self.dead.contains(&m.rank)
                });
            let lingered = members_done
                && self
                    .drained_at
                    .is_some_and(|t| now >= t + self.p.config.linger);
            let deadline = since + self.p.config.reliable.deadline + self.p.config.linger;
            if (drained && (peers_done || lingered)) || now >= deadline {
                return Ok(true);
            }
        }
        if self.global.as_ref().and_then(|g| g.ready()).is_none()
            && now >= self.p.config.join_timeout
        {
            return Err(self.join_failure());
        }
        Ok(false)
    }

    /// Before the I/O thread lets go of the lock to sleep: how long it may
    /// sleep (0 when input waits that no fd would announce) and spin, with
    /// `sleeper`'s fds brought up to date.
    fn plan_sleep(&mut self, sleeper: &mut Sleeper) -> Result<(i64, Duration), String> {
        let pending = self.p.transport.settle().map_err(|e| e.to_string())?;
        let now = self.now();
        let wait = if pending {
            0
        } else {
            self.next_deadline().map_or(100, |t| {
                let d = t.saturating_sub(now);
                d.as_micros().div_ceil(1000).min(100) as i64
            })
        };
        let generation = self.p.transport.generation();
        let built_for = Some((generation, self.coordinator.is_some()));
        if sleeper.built_for != built_for {
            let mut fds = vec![self.p.waker.fd(), self.p.udp.raw_fd()];
            if let Some((_, udp)) = &self.coordinator {
                fds.push(udp.raw_fd());
            }
            fds.extend(self.p.transport.signal_fds());
            sleeper.fds = fds
                .into_iter()
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            sleeper.built_for = built_for;
        }
        self.io_generation = generation;
        self.io_wake_at = now + Duration::from_millis(wait as u64);
        // Not while starting: then many instances may share few cores, and
        // the handshake does not need microseconds.
        let spin = if self.global.as_ref().and_then(|g| g.ready()).is_some() {
            self.p.config.spin
        } else {
            Duration::ZERO
        };
        Ok((wait, spin))
    }

    /// A round on an application thread that just queued a command (or
    /// waits for an answer: `read` every socket first): send what is
    /// queued, take in what came on the sockets it sent on, and
    /// tell whether the I/O thread must wake (input left, new sockets to
    /// watch, or a timer earlier than it planned for).
    fn assist(&mut self, read: bool) -> bool {
        let now = self.now();
        self.take_commands(now);
        self.take_handler_results(now);
        let mut result = if read {
            self.read_zmq(now).and_then(|()| self.flush(now))
        } else {
            self.flush(now)
        };
        let mut pending = false;
        for _ in 0..4 {
            if result.is_err() {
                break;
            }
            match self.p.transport.settle() {
                Ok(p) => pending = p,
                Err(e) => result = Err(e.to_string()),
            }
            if !pending || result.is_err() {
                break;
            }
            result = self.read_zmq(now).and_then(|()| self.flush(now));
        }
        if let Err(e) = result {
            self.failure.get_or_insert(e);
            return true;
        }
        pending
            || self.p.transport.generation() != self.io_generation
            || self.next_deadline().is_some_and(|t| t < self.io_wake_at)
    }

    /// Put a message on the wire (through the fault injector when one is
    /// configured: then it goes out later, and failures are counted there).
    fn put(&mut self, dest: Dest, frames: [&[u8]; 2]) -> Result<(), NetError> {
        if let Some(f) = &mut self.faults {
            let now = self.epoch.elapsed();
            f.hold(now, dest, frames);
            return Ok(());
        }
        match dest {
            Dest::Peer(rank) => self.p.transport.send_pair(rank, frames[0], frames[1]),
            Dest::Back(route) => self.p.transport.reply_pair(&route, frames[0], frames[1]),
        }
    }

    /// Send what the fault injector held and is now due.
    fn release_held(&mut self, now: Now) {
        let Some(f) = &mut self.faults else { return };
        while let Some((dest, [head, body])) = f.pop_due(now) {
            let sent = match dest {
                Dest::Peer(rank) => self.p.transport.send_pair(rank, &head, &body),
                Dest::Back(route) => self.p.transport.reply_pair(&route, &head, &body),
            };
            if sent.is_err() {
                Metrics::add(&self.p.metrics.replies_failed, 1);
            }
        }
    }

    /// Tell every peer we talked with that we leave cleanly: over our
    /// sending socket to it, or back on the connection it used to reach us.
    fn say_goodbye(&mut self) {
        let [head, body] =
            wire::encode_control(self.p.me.rank, self.p.me.incarnation, &Control::Goodbye);
        let mut peers: std::collections::BTreeSet<Rank> =
            self.p.transport.routes().into_iter().collect();
        peers.extend(self.incarnations.keys());
        for rank in peers {
            let dest = if self.p.transport.has_route(rank) {
                Dest::Peer(rank)
            } else if let Some(r) = self.routes.get(&rank) {
                Dest::Back(r.clone())
            } else {
                continue;
            };
            if self.put(dest, [&head, &body]).is_err() {
                Metrics::add(&self.p.metrics.replies_failed, 1);
            }
        }
    }

    fn join_failure(&self) -> String {
        if !self.discovery.is_complete() {
            let missing = self.p.info.local_size as usize - self.discovery.members().len();
            format!(
                "not globally ready after {:?}: local discovery is missing {missing} of {} instances on node {} \
                 (discovery port {}, broadcast {})",
                self.p.config.join_timeout,
                self.p.info.local_size,
                self.p.info.node_name,
                self.p.config.discovery_port,
                self.p.config.broadcast
            )
        } else {
            format!(
                "not globally ready after {:?}: no answer from the coordinator at {} for all {} nodes \
                 (unreachable, or not every node started?)",
                self.p.config.join_timeout, self.p.coordinator, self.p.info.nodes
            )
        }
    }

    fn next_deadline(&self) -> Option<Now> {
        let global = self.global.as_ref().and_then(|g| g.poll_timeout());
        [
            self.discovery.poll_timeout(),
            global,
            self.reliable.poll_timeout(),
            self.assembler.poll_timeout(),
            self.liveness.poll_timeout(),
            self.faults.as_ref().and_then(|f| f.next_due()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn take_commands(&mut self, now: Now) {
        let mut commands = std::mem::take(&mut self.command_buf);
        self.p.commands.take_into(&mut commands);
        // Consecutive single cells of one frame to one peer (a stream of
        // `send`s) are taken together, like a `send_many` chunk.
        let mut run = std::mem::take(&mut self.sent_run);
        let mut run_of = None;
        for command in commands.drain(..) {
            if let Command::Send {
                to,
                frame,
                kind: DataKind::Cell,
                payload,
                ticket,
            } = command
            {
                if run_of != Some((to, frame)) {
                    self.take_run(now, run_of, &mut run);
                    run_of = Some((to, frame));
                }
                run.push((payload, ticket));
                continue;
            }
            // In order: the cells before it first.
            self.take_run(now, run_of.take(), &mut run);
            match command {
                Command::Send {
                    to,
                    frame,
                    kind,
                    payload,
                    ticket,
                } => {
                    let kind = self.count_send(to, frame, kind, 1);
                    self.take_send(now, to, frame, kind, payload, ticket)
                }
                Command::SendMany { to, frame, cells } => {
                    // At most `MANY_CHUNK` cells.
                    let kind = self.count_send(to, frame, DataKind::Cell, cells.len() as u32);
                    self.take_many(now, to, frame, kind, cells);
                }
                Command::Expect { from_frame, peers } => {
                    let from = from_frame.unwrap_or_else(|| self.assembler.next_frame());
                    self.assembler.set_expected_from(from, peers);
                }
                Command::Await { frame, timeout } => {
                    self.assembler.await_frame(now, frame, now + timeout)
                }
                Command::Shutdown => {
                    self.shutdown_since.get_or_insert(now);
                }
            }
        }
        self.take_run(now, run_of, &mut run);
        self.sent_run = run;
        self.command_buf = commands;
    }

    /// The cells `run` (drained) of `run_of`'s (peer, frame), if any.
    fn take_run(&mut self, now: Now, run_of: Option<(Rank, u64)>, run: &mut Vec<OpenCell>) {
        if let Some((to, frame)) = run_of {
            let kind = self.count_send(to, frame, DataKind::Cell, run.len() as u32);
            self.take_many(now, to, frame, kind, run.drain(..));
        }
    }

    /// `n` messages of `kind` from the application to `to`: cells are
    /// counted in their frame; a frame end learns how many cells its frame
    /// had (the kind to send).
    fn count_send(&mut self, to: Rank, frame: u64, kind: DataKind, n: u32) -> DataKind {
        match kind {
            DataKind::Collective => DataKind::Collective,
            DataKind::Cell => {
                let count = self.frame_counts.entry((to, frame)).or_insert(0);
                *count = count.saturating_add(n);
                Metrics::add(&self.p.metrics.cells_sent, n.into());
                DataKind::Cell
            }
            DataKind::FrameEnd { .. } => {
                let ended = self.ended.entry(to).or_insert(frame);
                *ended = (*ended).max(frame);
                DataKind::FrameEnd {
                    count: self.frame_counts.remove(&(to, frame)).unwrap_or(0),
                }
            }
        }
    }

    /// A message from the application (counted already): handed to the
    /// reliable channel, or queued behind the backlog to `to`.
    fn take_send(
        &mut self,
        now: Now,
        to: Rank,
        frame: u64,
        kind: DataKind,
        payload: Bytes,
        ticket: super::shared::Resolver,
    ) {
        let msg = Queued {
            frame,
            kind,
            payload,
            ticket,
        };
        match self.backlog.get_mut(&to) {
            // Behind a backlog: in order, after it.
            Some(q) if !q.is_empty() => q.push_back(msg),
            _ => {
                if let Some(msg) = self.send_reliable(now, to, msg) {
                    self.backlog.entry(to).or_default().push_back(msg);
                }
            }
        }
    }

    /// Cells of one frame from the application (counted already): as many
    /// as the reliable channel has room for are handed to it together,
    /// the rest wait in the backlog to `to`, in order.
    fn take_many(
        &mut self,
        now: Now,
        to: Rank,
        frame: u64,
        kind: DataKind,
        cells: impl IntoIterator<Item = OpenCell>,
    ) {
        let mut cells = cells.into_iter();
        if self.backlog.get(&to).is_none_or(|q| q.is_empty()) {
            let mut opened = std::mem::take(&mut self.opened);
            let (first, n) = self.reliable.send_many(
                now,
                to,
                frame,
                kind,
                // Taken from `cells` only as the channel has room.
                cells.by_ref().map(|(payload, resolver)| {
                    let bytes = payload.len() as u64;
                    opened.push(OpenTicket { resolver, bytes });
                    payload
                }),
            );
            debug_assert_eq!(opened.len(), n);
            let tickets = self.tickets.entry(to).or_default();
            for (id, open) in (first..).zip(opened.drain(..)) {
                tickets.insert(id, open);
            }
            self.opened = opened;
        }
        for (payload, ticket) in cells {
            self.take_send(now, to, frame, kind, payload, ticket);
        }
    }

    /// Hand `msg` to the reliable channel; gives it back if the channel
    /// has no room towards `to` yet.
    fn send_reliable(&mut self, now: Now, to: Rank, msg: Queued) -> Option<Queued> {
        let Queued {
            frame,
            kind,
            payload,
            ticket,
        } = msg;
        let bytes = payload.len() as u64;
        let mut offered = Some(payload);
        let (id, _) =
            self.reliable
                .send_many(now, to, frame, kind, std::iter::from_fn(|| offered.take()));
        if let Some(payload) = offered {
            // Not taken: no room yet.
            return Some(Queued {
                frame,
                kind,
                payload,
                ticket,
            });
        }
        let open = OpenTicket {
            resolver: ticket,
            bytes,
        };
        self.tickets.entry(to).or_default().insert(id, open);
        None
    }

    /// Send what the backlog has room for now in the reliable channel.
    fn send_backlog(&mut self, now: Now) {
        if self.backlog.is_empty() {
            return;
        }
        let mut backlog = std::mem::take(&mut self.backlog);
        for (&to, q) in backlog.iter_mut() {
            while let Some(msg) = q.pop_front() {
                if let Some(msg) = self.send_reliable(now, to, msg) {
                    q.push_front(msg);
                    break;
                }
            }
        }
        backlog.retain(|_, q| !q.is_empty());
        self.backlog = backlog;
    }

    fn take_handler_results(&mut self, now: Now) {
        while let Ok(batch) = self.done_rx.try_recv() {
            self.handlers_running -= batch.len();
            self.on_handled(now, batch);
        }
        self.pump_frames();
    }

    /// Handlers' verdicts, in order: cells into their frames (or refused),
    /// and answered. Accepted cells of one frame from one peer (most of a
    /// round's, usually) go to the frame and to the reliable channel
    /// together.
    fn on_handled(&mut self, now: Now, done: impl IntoIterator<Item = HandlerDone>) {
        let mut run = std::mem::take(&mut self.accepted);
        // The (sender, frame) of the cells in `run`.
        let mut run_of = None;
        // The last sender whose life was checked, and that life.
        let mut current: Option<(Rank, Incarnation)> = None;
        for HandlerDone { cell, life, result } in done {
            if current != Some((cell.from, life)) {
                if self.incarnations.get(&cell.from) != Some(&life) {
                    // From a life of the sender that has since restarted:
                    // its id may now name a message of the new life.
                    Metrics::add(&self.p.metrics.stale_messages, 1);
                    continue;
                }
                current = Some((cell.from, life));
            }
            match result {
                Ok(()) => {
                    if run_of != Some((cell.from, cell.frame)) {
                        if let Some((from, frame)) = run_of {
                            self.accept(now, from, frame, &mut run);
                        }
                        run_of = Some((cell.from, cell.frame));
                    }
                    run.push((cell.id, cell.payload));
                }
                Err(HandlerError { code, text }) => {
                    // The cells before it first, in order.
                    if let Some((from, frame)) = run_of.take() {
                        self.accept(now, from, frame, &mut run);
                    }
                    self.assembler
                        .handle_rejected(cell.from, cell.id, cell.frame)
                        .ok();
                    self.reliable
                        .complete(now, cell.from, cell.id, Err((code, text)));
                }
            }
        }
        if let Some((from, frame)) = run_of {
            self.accept(now, from, frame, &mut run);
        }
        self.accepted = run;
    }

    /// Accepted cells `(id, payload)` of `frame` from `from` (drained):
    /// into the frame, and answered (ERR if the frame refuses them).
    fn accept(&mut self, now: Now, from: Rank, frame: u64, cells: &mut Vec<(u64, Bytes)>) {
        let answers = &mut self.answers;
        let metrics = &self.p.metrics;
        self.assembler
            .handle_cells(from, frame, cells.drain(..), |id, result| {
                let result = result.map_err(|e| {
                    Metrics::add(&metrics.cells_refused, 1);
                    (codes::for_frame_error(&e), e.to_string())
                });
                answers.push((id, result));
            });
        self.reliable.complete_many(now, from, answers.drain(..));
    }

    /// Move complete frames to the application, one at a time, only while
    /// its channel has room: frames (even empty ones) never pile up.
    fn pump_frames(&mut self) {
        loop {
            let frame = match self.ready_frame.take() {
                Some(f) => f,
                None => match self.assembler.poll_frame() {
                    Some(f) => Ok(f),
                    None => match self.assembler.poll_missing() {
                        Some(m) => Err(m),
                        None => return,
                    },
                },
            };
            if let Err(e) = self.p.frames.try_send(frame) {
                self.ready_frame = Some(e.into_inner());
                return;
            }
        }
    }

    fn fire_timers(&mut self, now: Now) {
        self.release_held(now);
        self.discovery.handle_timeout(now);
        if let Some(g) = &mut self.global {
            g.handle_timeout(now);
        }
        self.reliable.handle_timeout(now);
        self.assembler.handle_timeout(now);
        while let Some((peer, frame)) = self.assembler.poll_query() {
            self.reply(peer, &Control::FrameQuery { frame });
        }
        self.liveness.handle_timeout(now);
        while let Some(peer) = self.liveness.poll_heartbeat() {
            self.reply(peer, &Control::Heartbeat);
        }
        while let Some(e) = self.liveness.poll_event() {
            let result = match e {
                LivenessEvent::Suspect(rank) => {
                    self.emit(PeerEvent::Suspect { rank });
                    Ok(())
                }
                LivenessEvent::Recovered(rank) => {
                    self.emit(PeerEvent::Recovered { rank });
                    Ok(())
                }
                LivenessEvent::Dead(rank) => self.on_peer_dead(now, rank),
            };
            if let Err(e) = result {
                tracing::warn!("after a peer died: {e}");
            }
        }
    }

    /// Send everything the state machines queued and act on their events.
    fn flush(&mut self, now: Now) -> Result<(), String> {
        // Answers taken in since may have made room for the backlog.
        self.send_backlog(now);
        for _ in 0..4 {
            let mut progressed = false;
            while let Some(t) = self.discovery.poll_transmit() {
                progressed = true;
                match t {
                    DiscoveryTransmit::Broadcast(ping) => {
                        let bytes = wire::encode_datagram(
                            self.p.info.job_key,
                            &self.secret,
                            &Datagram::Ping(ping),
                        );
                        let to = SocketAddrV4::new(
                            self.p.config.broadcast,
                            self.p.config.discovery_port,
                        );
                        self.p.udp.send_to(&bytes, to).map_err(|e| e.to_string())?;
                    }
                    DiscoveryTransmit::ToPeer { to, msg } => self.send_control(&to, &msg),
                }
            }
            while let Some(e) = self.discovery.poll_event() {
                progressed = true;
                self.on_discovery_event(now, e)?;
            }
            let mut coordinator_out = Vec::new();
            if let Some((c, _)) = &mut self.coordinator {
                while let Some(t) = c.poll_transmit() {
                    if let GlobalTransmit::ToPeer { to, msg } = t {
                        coordinator_out.push((to, msg));
                    }
                }
            }
            progressed |= !coordinator_out.is_empty();
            for (to, msg) in coordinator_out {
                let me = &self.p.me;
                if to.rank == me.rank && to.incarnation == me.incarnation {
                    // To this instance's own leader role: no trip through
                    // ZeroMQ to itself.
                    if let Some(g) = &mut self.global {
                        if let Some(answer) = g.handle_control(now, &msg) {
                            tracing::debug!("coordinator answered itself with {answer:?}");
                        }
                    }
                } else {
                    self.send_control(&to, &msg);
                }
            }
            if let Some(g) = &mut self.global {
                let mut out = Vec::new();
                while let Some(t) = g.poll_transmit() {
                    out.push(t);
                }
                let mut events = Vec::new();
                while let Some(e) = g.poll_event() {
                    events.push(e);
                }
                progressed |= !out.is_empty() || !events.is_empty();
                for t in out {
                    match t {
                        GlobalTransmit::Register(reg) => {
                            let bytes = wire::encode_datagram(
                                self.p.info.job_key,
                                &self.secret,
                                &Datagram::Register(reg),
                            );
                            self.p
                                .udp
                                .send_to(&bytes, self.p.coordinator)
                                .map_err(|e| e.to_string())?;
                        }
                        GlobalTransmit::ToPeer { to, msg } => self.send_control(&to, &msg),
                    }
                }
                for e in events {
                    self.on_global_event(e);
                }
            }
            while let Some(t) = self.reliable.poll_transmit(now) {
                progressed = true;
                match t {
                    (to, ReliableTransmit::Data(msg)) => self.queue_data(now, to, msg),
                    (to, ReliableTransmit::Feedback(fb)) => self.reply(to, &Control::Feedback(fb)),
                }
            }
            self.send_batches(now);
            let mut event = self.reliable.poll_event();
            while let Some(e) = event.take() {
                progressed = true;
                event = self.on_reliable_event(now, e);
            }
            // One wake-up of a sender blocked on the window per round, not
            // one per answered cell.
            for (to, (n, bytes)) in self.freed_credits.drain() {
                self.p.credits.release_many(to, n, bytes);
            }
            self.dispatch_handlers(now);
            self.pump_frames();
            if !progressed {
                // Answers completed in this round go out now, together.
                self.reliable.flush_feedback(now);
                if !self.reliable.has_transmits() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn on_discovery_event(&mut self, now: Now, e: DiscoveryEvent) -> Result<(), String> {
        match e {
            DiscoveryEvent::PeerReady(info) => {
                self.peers.insert(info.rank, info);
            }
            DiscoveryEvent::PeerRestarted(info) => {
                self.observe_incarnation(now, info.rank, info.incarnation);
                self.peers.insert(info.rank, info);
            }
            // Went silent in the handshake: dead like a watched peer.
            DiscoveryEvent::PeerLost(info) => self.on_peer_dead(now, info.rank)?,
            DiscoveryEvent::Complete { leader, members } => {
                self.p.status.update(|s| s.local_complete = true);
                match &mut self.global {
                    // Complete again after a node-mate restarted.
                    Some(g) => {
                        g.update_members(now, members.clone(), self.discovery.lost());
                        // A member whose leader restarted asks its new life.
                        if let Some(l) = members.iter().find(|m| m.rank == leader) {
                            g.follow_leader(now, l.clone());
                        }
                        self.p.status.update(|s| s.members = members);
                    }
                    None => self.take_role(now, leader, members)?,
                }
            }
        }
        Ok(())
    }

    /// Take the role `leader` gives this instance on its node: lead it (and
    /// run the coordinator on node 0) or follow `leader`.
    fn take_role(&mut self, now: Now, leader: Rank, members: Vec<PeerInfo>) -> Result<(), String> {
        let me = self.p.me.rank;
        let seed = self.p.me.incarnation.0.rotate_left(7) ^ leader as u64;
        let cfg = self.p.config.global;
        self.p.status.update(|s| {
            s.leader = Some(leader);
            s.members = members.clone();
        });
        if leader == me {
            if self.p.me.node_index == 0 && self.coordinator.is_none() {
                let udp = UdpEndpoint::bind_exclusive(self.p.coordinator).map_err(|e| {
                    format!(
                        "this instance leads node 0 and so must run the coordinator, but {e} \
                         (CELLNET_COORDINATOR must be an address of the first node, and its port free)"
                    )
                })?;
                // Port 0 (single-node jobs, tests): register where it landed.
                if let Some(bound) = udp.local_addr().filter(|_| self.p.coordinator.port() == 0) {
                    self.p.coordinator = bound;
                }
                let (nodes, size) = (self.p.info.nodes, self.p.info.size);
                let coordinator = if self.p.status.get().global.is_some() {
                    Coordinator::resume(nodes, size)
                } else {
                    Coordinator::new(nodes, size)
                };
                self.coordinator = Some((coordinator, udp));
            }
            for m in members.iter().filter(|m| m.rank != me) {
                self.liveness.watch(now, m.rank);
            }
            self.global = Some(GlobalJoin::leader(
                self.p.me.clone(),
                self.p.info.node_name.clone(),
                members,
                self.discovery.lost(),
                cfg,
                now,
                seed,
            ));
        } else if let Some(l) = members.iter().find(|m| m.rank == leader) {
            self.liveness.watch(now, leader);
            self.global = Some(GlobalJoin::member(me, l.clone(), cfg, now, seed));
        }
        Ok(())
    }

    /// A watched peer is dead: tell the application, and if it led this
    /// node (or was a member this instance leads, or ran the coordinator),
    /// repair the structure: the next lowest live rank leads the node and
    /// registers; leaders register again with a moved coordinator.
    fn on_peer_dead(&mut self, now: Now, rank: Rank) -> Result<(), String> {
        self.dead.insert(rank);
        self.emit(PeerEvent::Lost { rank });
        // A dead node-mate no longer counts towards the node; node-mates
        // still in the handshake with it learn that from our answers.
        self.discovery.remove_member(rank);
        let status = self.p.status.get();
        let me = self.p.me.rank;
        let alive: Vec<PeerInfo> = status
            .members
            .iter()
            .filter(|m| !self.dead.contains(&m.rank))
            .cloned()
            .collect();
        if status.leader == Some(rank) {
            let Some(new_leader) = alive.iter().map(|m| m.rank).min() else {
                return Ok(());
            };
            self.liveness.unwatch(rank);
            self.take_role(now, new_leader, alive)?;
            self.emit(PeerEvent::LeaderChanged {
                node: self.p.me.node_index,
                leader: new_leader,
            });
        } else if status.leader == Some(me) && status.members.iter().any(|m| m.rank == rank) {
            self.p.status.update(|s| s.members = alive.clone());
            // Members do not watch each other: tell them who is left.
            self.discovery.announce_members(now);
            if let Some(g) = &mut self.global {
                g.update_members(now, alive, self.discovery.lost());
            }
        }
        if status.leader == Some(me) && status.node_leaders.contains(&rank) {
            // Another node's leader died (node 0's: the coordinator moves
            // to the same address with an empty registry): register until
            // the directory names its successor.
            if let Some(g) = &mut self.global {
                g.await_leader_change(now, rank);
            }
        }
        Ok(())
    }

    fn emit(&self, event: PeerEvent) {
        if self.p.events.try_send(event).is_err() {
            Metrics::add(&self.p.metrics.events_dropped, 1);
        }
    }

    /// Leaders watch each other (the coordinator's failure moves it).
    fn directory_changed(&mut self) {
        let leaders = self
            .global
            .as_ref()
            .map(|g| g.node_leaders().to_vec())
            .unwrap_or_default();
        let now = self.now();
        for &l in leaders.iter().filter(|&&l| l != self.p.me.rank) {
            self.liveness.watch(now, l);
        }
        self.p.status.update(|s| s.node_leaders = leaders);
    }

    fn on_global_event(&mut self, e: GlobalEvent) {
        match e {
            GlobalEvent::Ready { nodes, size } => {
                // The node leaders first: the application may start a
                // collective the moment it sees `global`.
                self.directory_changed();
                self.p.status.update(|s| s.global = Some((nodes, size)));
            }
            GlobalEvent::DirectoryChanged => self.directory_changed(),
            GlobalEvent::Resolved(info) => {
                let rank = info.rank;
                self.peers.insert(rank, info);
                for msg in self.parked.remove(&rank).unwrap_or_default() {
                    let now = self.now();
                    self.send_data(now, rank, msg);
                }
            }
        }
    }

    /// Hand the cells delivered in this round to the pool, in as many
    /// batches as it has workers: one task and one wake-up per batch, not
    /// per cell.
    fn dispatch_handlers(&mut self, now: Now) {
        if self.to_handle.is_empty() {
            return;
        }
        let mut cells = std::mem::take(&mut self.to_handle);
        self.handled += cells.len() as u64;
        let Some(handler) = self.p.handler.clone() else {
            // No handler: every cell is accepted here, without a round trip
            // through the pool (it would run nothing).
            let done = cells.drain(..).map(|(cell, life)| HandlerDone {
                cell,
                life,
                result: Ok(()),
            });
            self.on_handled(now, done);
            self.to_handle = cells;
            return;
        };
        self.handlers_running += cells.len();
        let workers = self.p.pool.current_num_threads().max(1);
        let chunk = cells.len().div_ceil(workers);
        let mut cells = cells.into_iter().peekable();
        while cells.peek().is_some() {
            let batch: Vec<(Cell, Incarnation)> = cells.by_ref().take(chunk).collect();
            let handler = handler.clone();
            let done = self.done_tx.clone();
            let waker = self.p.waker.clone();
            self.p.pool.spawn(move || {
                let results = batch
                    .into_iter()
                    .map(|(cell, life)| {
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            handler(&cell)
                        }))
                        .unwrap_or_else(|_| {
                            Err(HandlerError::new(u32::MAX, "the cell handler panicked"))
                        });
                        HandlerDone { cell, life, result }
                    })
                    .collect();
                let _ = done.send(results);
                waker.wake();
            });
        }
    }

    /// Act on `e`; returns the next event of the reliable channel (a run
    /// of resolutions is taken at once, see [`Self::resolve_run`]).
    fn on_reliable_event(&mut self, now: Now, e: ReliableEvent) -> Option<ReliableEvent> {
        match e {
            ReliableEvent::Resolved { to, id, outcome } => self.resolve_run(to, id, outcome),
            ReliableEvent::Deliver { from, msg } => {
                self.on_deliver(now, from, msg);
                self.reliable.poll_event()
            }
        }
    }

    /// A new message from `from`: answered at once, or (a cell) queued for
    /// the handler.
    fn on_deliver(&mut self, now: Now, from: Rank, msg: DataMsg) {
        if msg.kind != DataKind::Collective && self.assembler.is_replay(from, msg.frame) {
            // A restart replays frames already here: received, so ACK.
            Metrics::add(&self.p.metrics.frame_replays_dropped, 1);
            self.reliable.complete(now, from, msg.id, Ok(()));
            return;
        }
        match msg.kind {
            DataKind::Collective => {
                self.reliable.complete(now, from, msg.id, Ok(()));
                let _ = self.p.collectives.send((from, msg.frame, msg.payload));
            }
            DataKind::FrameEnd { count } => {
                let answer = self
                    .assembler
                    .handle_frame_end(from, msg.frame, count)
                    .map_err(|e| (codes::for_frame_error(&e), e.to_string()));
                if answer.is_err() {
                    Metrics::add(&self.p.metrics.cells_refused, 1);
                }
                self.reliable.complete(now, from, msg.id, answer);
            }
            DataKind::Cell => {
                Metrics::add(&self.p.metrics.cells_delivered, 1);
                if !self.assembler.accepts(msg.frame) {
                    Metrics::add(&self.p.metrics.cells_refused, 1);
                    let text = format!("frame {} is not accepted now", msg.frame);
                    self.reliable
                        .complete(now, from, msg.id, Err((codes::FRAME_REFUSED, text)));
                    return;
                }
                let life = self.incarnations.get(&from).copied().unwrap_or_default();
                self.to_handle.push((
                    Cell {
                        from,
                        frame: msg.frame,
                        id: msg.id,
                        payload: msg.payload,
                    },
                    life,
                ));
            }
        }
    }

    /// Hand ticket `id` to `to` its outcome, and the tickets of the
    /// resolutions that follow it for the same peer (the answers of one
    /// feedback, usually); returns the first other event.
    fn resolve_run(&mut self, to: Rank, id: u64, outcome: Outcome) -> Option<ReliableEvent> {
        let mut tickets = self.tickets.get_mut(&to);
        let (mut freed, mut bytes, mut acks) = (0u32, 0u64, 0u64);
        let mut next = Some((id, outcome));
        let event = loop {
            let Some((id, outcome)) = next.take() else {
                break None;
            };
            match &outcome {
                Outcome::Ack => acks += 1,
                Outcome::Err { .. } => Metrics::add(&self.p.metrics.errs_received, 1),
                Outcome::TimedOut => Metrics::add(&self.p.metrics.timeouts, 1),
            }
            if let Some(t) = tickets.as_mut().and_then(|r| r.remove(id)) {
                t.resolver.resolve(outcome);
                freed += 1;
                bytes += t.bytes;
            }
            match self.reliable.poll_event() {
                Some(ReliableEvent::Resolved { to: t, id, outcome }) if t == to => {
                    next = Some((id, outcome))
                }
                other => break other,
            }
        };
        Metrics::add(&self.p.metrics.acks_received, acks);
        if freed > 0 {
            // Returned together at the end of the round.
            let (n, b) = self.freed_credits.entry(to).or_insert((0, 0));
            *n += freed;
            *b += bytes;
        }
        event
    }

    /// Make sure there is a sending socket to `rank`; false if its endpoint
    /// is unknown yet (a resolution is then under way).
    fn route(&mut self, now: Now, rank: Rank) -> bool {
        if self.p.transport.has_route(rank) {
            return true;
        }
        let info = match self.peers.get(&rank) {
            Some(i) => i.clone(),
            None => match self.global.as_mut().and_then(|g| g.resolve(now, rank)) {
                Some(i) => {
                    self.peers.insert(rank, i.clone());
                    i
                }
                None => return false,
            },
        };
        self.connect(&info)
    }

    fn connect(&mut self, info: &PeerInfo) -> bool {
        let same_node = info.node_index == self.p.me.node_index;
        let endpoint = info.endpoints.for_peer(same_node).to_string();
        match self
            .p
            .transport
            .connect(info.rank, info.incarnation, &endpoint)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot connect to rank {} at {endpoint}: {e}", info.rank);
                false
            }
        }
    }

    fn send_control(&mut self, to: &PeerInfo, msg: &Control) {
        if !self.connect(to) {
            return;
        }
        let [head, body] = wire::encode_control(self.p.me.rank, self.p.me.incarnation, msg);
        if let Err(e) = self.put(Dest::Peer(to.rank), [&head, &body]) {
            tracing::debug!("control message to rank {} not sent: {e}", to.rank);
        }
    }

    /// Send `msg` to `to`, gathering small ones into one batch per peer
    /// (sent by [`Self::send_batches`] at the end of the round): one
    /// ZeroMQ message for many cells instead of two frames per cell.
    fn queue_data(&mut self, now: Now, to: Rank, msg: DataMsg) {
        if self.faults.is_some() || msg.payload.len() > BATCH_PAYLOAD_MAX || !self.route(now, to) {
            if let Some(b) = self.outbox.remove(&to) {
                self.send_batch(now, to, b);
            }
            return self.send_data(now, to, msg);
        }
        let b = self.outbox.entry(to).or_default();
        if b.first.is_none() && b.count == 0 {
            b.first = Some(msg);
        } else {
            if let Some(f) = b.first.take() {
                // Room for the largest batch: no copies while it grows.
                b.body
                    .reserve(BATCH_BYTES + BATCH_PAYLOAD_MAX + wire::BATCH_ENTRY_LEN);
                wire::push_batch_entry(&mut b.body, &f);
                b.count += 1;
            }
            wire::push_batch_entry(&mut b.body, &msg);
            b.count += 1;
        }
        if b.body.len() >= BATCH_BYTES {
            if let Some(b) = self.outbox.remove(&to) {
                self.send_batch(now, to, b);
            }
        }
    }

    /// Send every batch gathered by [`Self::queue_data`].
    fn send_batches(&mut self, now: Now) {
        let outbox = std::mem::take(&mut self.outbox);
        for (to, b) in outbox {
            self.send_batch(now, to, b);
        }
    }

    fn send_batch(&mut self, now: Now, to: Rank, b: Batch) {
        if let Some(msg) = b.first {
            // Alone: the plain two-frame message.
            return self.send_data(now, to, msg);
        }
        if b.count == 0 {
            return;
        }
        let to_incarnation = self
            .peers
            .get(&to)
            .map_or(Incarnation(0), |p| p.incarnation);
        let head = wire::batch_header(
            self.p.me.rank,
            self.p.me.incarnation,
            to_incarnation,
            b.count,
        );
        match self.p.transport.send_data(to, &head, &Bytes::from(b.body)) {
            Ok(()) | Err(NetError::WouldBlock(_)) => {}
            Err(e) => tracing::debug!("data to rank {to} not sent: {e}"),
        }
    }

    fn send_data(&mut self, now: Now, to: Rank, msg: DataMsg) {
        if !self.route(now, to) {
            let parked = self.parked.entry(to).or_default();
            if parked.len() < self.p.credits.window() as usize {
                parked.push(msg);
            }
            return;
        }
        let to_incarnation = self
            .peers
            .get(&to)
            .map_or(Incarnation(0), |p| p.incarnation);
        let head = wire::data_header(self.p.me.rank, self.p.me.incarnation, to_incarnation, &msg);
        let sent = if self.faults.is_some() {
            self.put(Dest::Peer(to), [&head, &msg.payload])
        } else {
            self.p.transport.send_data(to, &head, &msg.payload)
        };
        match sent {
            Ok(()) => {}
            // Lost like on a lossy wire: the reliable channel retransmits.
            Err(NetError::WouldBlock(_)) => {}
            Err(e) => tracing::debug!("data to rank {to} not sent: {e}"),
        }
    }

    /// Answer `to` on the connection its messages came from (ROUTER), or
    /// through our own sending socket if we have never heard from it.
    fn reply(&mut self, to: Rank, msg: &Control) {
        let [head, body] = wire::encode_control(self.p.me.rank, self.p.me.incarnation, msg);
        if let Some(route) = self.routes.get(&to).cloned() {
            if self.put(Dest::Back(route), [&head, &body]).is_ok() {
                return;
            }
        }
        let now = self.now();
        if !(self.route(now, to) && self.put(Dest::Peer(to), [&head, &body]).is_ok()) {
            Metrics::add(&self.p.metrics.replies_failed, 1);
        }
    }

    /// Track `rank`'s incarnation; a newer one means it restarted: its pair
    /// state is reset and unanswered cells go to its new life. Returns false
    /// for a message from an older life (to be dropped).
    fn observe_incarnation(&mut self, now: Now, rank: Rank, inc: Incarnation) -> bool {
        match self.incarnations.get(&rank).copied() {
            Some(known) if inc < known => false,
            Some(known) if inc == known => true,
            known => {
                self.incarnations.insert(rank, inc);
                if known.is_some() {
                    // Parked copies carry ids of the old numbering; the
                    // reset resends everything unanswered anyway.
                    self.parked.remove(&rank);
                    self.reliable.reset_peer(now, rank);
                    self.assembler.peer_restarted(rank);
                    self.routes.remove(&rank);
                    if self.peers.get(&rank).is_some_and(|p| p.incarnation < inc) {
                        // Its old endpoint is void; resolve it again.
                        self.peers.remove(&rank);
                        self.p.transport.disconnect(rank);
                        if let Some(g) = &mut self.global {
                            g.forget(rank);
                        }
                    }
                    self.emit(PeerEvent::Restarted {
                        rank,
                        incarnation: inc.0,
                    });
                    // A new life is watched afresh, if it was watched:
                    // watching is mutual, a one-sided watch would see
                    // silence and declare it dead.
                    self.dead.remove(&rank);
                    if self.liveness.health(rank).is_some() {
                        self.liveness.unwatch(rank);
                        self.liveness.watch(now, rank);
                    }
                }
                true
            }
        }
    }

    fn read_datagrams(&mut self, now: Now, coordinator: bool) -> Result<(), String> {
        // Reused: zeroing 64 KiB per wake-up showed in start-up profiles.
        let mut buf = std::mem::take(&mut self.datagram_buf);
        buf.resize(wire::MAX_DATAGRAM + 1, 0);
        let result = self.read_datagrams_into(now, coordinator, &mut buf);
        self.datagram_buf = buf;
        result
    }

    fn read_datagrams_into(
        &mut self,
        now: Now,
        coordinator: bool,
        buf: &mut [u8],
    ) -> Result<(), String> {
        for _ in 0..1024 {
            let socket = match (&self.coordinator, coordinator) {
                (Some((_, udp)), true) => udp,
                _ => &self.p.udp,
            };
            let Some(bytes) = socket.try_recv(buf).map_err(|e| e.to_string())? else {
                break;
            };
            Metrics::add(&self.p.metrics.datagrams_received, 1);
            match wire::decode_datagram(self.p.info.job_key, &self.secret, bytes) {
                Ok(Datagram::Ping(ping)) if !coordinator => self.discovery.handle_ping(now, ping),
                Ok(Datagram::Register(reg)) if coordinator => {
                    if let Some((c, _)) = &mut self.coordinator {
                        let before = c.stats().invalid;
                        c.handle_register(reg);
                        if c.stats().invalid > before {
                            Metrics::add(&self.p.metrics.registrations_refused, 1);
                        }
                    }
                }
                Ok(_) => Metrics::add(&self.p.metrics.datagrams_malformed, 1),
                Err(e) => self.count_wire_error(&e),
            }
        }
        Ok(())
    }

    fn count_wire_error(&self, e: &WireError) {
        let m = &self.p.metrics;
        let counter: &AtomicU64 = match e {
            WireError::ForeignJob(_) => &m.datagrams_foreign_job,
            WireError::BadTag => &m.datagrams_bad_tag,
            _ => &m.datagrams_malformed,
        };
        counter.fetch_add(1, Relaxed);
        tracing::debug!("dropped datagram: {e}");
    }

    /// A data message (alone or out of a batch) from `header.from`.
    /// Data messages from one sender (one ZeroMQ message's worth).
    fn on_data(
        &mut self,
        now: Now,
        header: &wire::Header,
        msgs: impl IntoIterator<Item = DataMsg>,
    ) {
        let to = header.to_incarnation;
        if to != Incarnation(0) && to != self.p.me.incarnation {
            // Meant for an earlier life of this rank.
            let n = msgs.into_iter().count() as u64;
            Metrics::add(&self.p.metrics.stale_messages, n);
            return;
        }
        let assembler = &self.assembler;
        let metrics = &self.p.metrics;
        let msgs = msgs.into_iter().filter(|data| {
            // The frame buffer is full: withhold the answer (and so the
            // sender's credit); it is resent later.
            let defer = data.kind != DataKind::Collective
                && data.frame >= assembler.next_frame()
                && !assembler.accepts(data.frame);
            if defer {
                Metrics::add(&metrics.cells_deferred, 1);
            }
            !defer
        });
        self.reliable.handle_data_many(now, header.from, msgs)
    }

    fn read_zmq(&mut self, now: Now) -> Result<(), String> {
        let mut inbox = std::mem::take(&mut self.inbox);
        self.p
            .transport
            .drain(4096, &mut inbox)
            .map_err(|e| e.to_string())?;
        for inbound in inbox.drain(..) {
            let (routing_id, frames) = match inbound {
                Inbound::Router { routing_id, frames } => (Some(routing_id), frames),
                Inbound::Dealer { frames, .. } => (None, frames),
            };
            let (header, msg) = match wire::decode_peer_msg(frames) {
                Ok(m) => m,
                Err(e) => {
                    Metrics::add(&self.p.metrics.zmq_malformed, 1);
                    tracing::debug!("dropped ZeroMQ message: {e}");
                    continue;
                }
            };
            if header.from >= self.p.info.size {
                Metrics::add(&self.p.metrics.zmq_malformed, 1);
                continue;
            }
            if !self.observe_incarnation(now, header.from, header.incarnation) {
                Metrics::add(&self.p.metrics.stale_messages, 1);
                continue;
            }
            self.liveness.heard(now, header.from);
            if let Some(rid) = &routing_id {
                if self.routes.get(&header.from) != Some(rid) {
                    self.routes.insert(header.from, rid.clone());
                }
            }
            match msg {
                PeerMsg::Data(data) => self.on_data(now, &header, [data]),
                PeerMsg::Batch(batch) => self.on_data(now, &header, batch),
                PeerMsg::Control(Control::FrameQuery { frame }) => {
                    let ended = self.ended.get(&header.from).is_some_and(|&e| e >= frame);
                    self.reliable.resend_now(now, header.from);
                    self.reply(header.from, &Control::FrameReport { frame, ended });
                }
                PeerMsg::Control(Control::Heartbeat) => {}
                PeerMsg::Control(Control::Goodbye) => {
                    // Gone on purpose: not a failure to detect.
                    self.liveness.unwatch(header.from);
                    self.goodbyes.insert(header.from);
                    if self
                        .p
                        .events
                        .try_send(PeerEvent::Left { rank: header.from })
                        .is_err()
                    {
                        Metrics::add(&self.p.metrics.events_dropped, 1);
                    }
                }
                PeerMsg::Control(Control::FrameReport { frame, ended }) => {
                    tracing::debug!("rank {} reports frame {frame}: ended={ended}", header.from);
                }
                PeerMsg::Control(Control::Feedback(fb)) => {
                    self.reliable.handle_feedback(now, header.from, fb)
                }
                PeerMsg::Control(c) => {
                    if self
                        .discovery
                        .handle_control(now, header.from, header.incarnation, &c)
                    {
                        continue;
                    }
                    let answer = self.global.as_mut().and_then(|g| g.handle_control(now, &c));
                    if let Some(answer) = answer {
                        self.reply(header.from, &answer);
                    }
                }
            }
        }
        self.inbox = inbox;
        Ok(())
    }
}
