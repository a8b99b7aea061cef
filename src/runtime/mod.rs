//! `runtime`: drives `proto` over `net` and hands the application a
//! [`Communicator`].
//!
//! Owns the threads and the clock: one I/O thread per instance runs every
//! state machine and every socket, a rayon pool bound inside the instance's
//! cpuset runs the cell handler, and the application's threads talk to the
//! I/O thread through bounded channels plus an eventfd that wakes it. The
//! state machines and sockets sit behind one lock (ZeroMQ sockets may be
//! used by one thread at a time): a thread that sends while the I/O thread
//! sleeps takes the lock and puts the cell on the wire itself.
//!
//! Latency: an idle I/O thread polls for up to `CELLNET_SPIN` before it
//! sleeps, and so does [`Ticket::wait`]; without a handler
//! ([`Builder::handler`]) received cells are accepted by the I/O thread
//! directly, with no hop through the pool.
//!
//! ```no_run
//! use cellnet::runtime::Communicator;
//! let comm = Communicator::builder().start()?;        // launch, pin, discover, join
//! let right = (comm.rank() + 1) % comm.size();
//! let left = (comm.rank() + comm.size() - 1) % comm.size();
//! comm.expect_from([left])?;                           // who sends to us every frame
//! let ticket = comm.send(right, 0, vec![1u8, 2, 3])?;  // SEND ...
//! comm.end_frame(0, &[right])?;
//! let frame = comm.recv_frame(std::time::Duration::from_secs(10))?; // frame 0, in order
//! assert!(ticket.wait()?.is_ack());                    // ... → ACK
//! comm.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod collective;
mod driver;
pub mod faults;
mod shared;

pub use self::collective::CollectiveError;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};

use self::shared::{CreditGate, Metrics, StatusCell, Waker};
pub use self::shared::{MetricsSnapshot, Status};
use crate::config::{Config, ConfigError};
use crate::launch::{self, LaunchError, LaunchInfo, MpiSession};
use crate::net::{self, NetError};
use crate::place::{self, Binding, PlaceError, PlacementPolicy};
use crate::proto::{
    frames::{CompleteFrame, FrameMissing},
    reliable::Outcome,
    wire::DataKind,
    Endpoints, PeerInfo, Rank,
};

/// A cell handed to the handler: `payload` from rank `from`, for `frame`.
#[derive(Clone, Debug)]
pub struct Cell {
    /// Rank of the sender.
    pub from: Rank,
    /// The frame the sender put the cell in.
    pub frame: u64,
    /// Per (sender, receiver) sequence number, from 1.
    pub id: u64,
    /// The sender's bytes, as sent.
    pub payload: Bytes,
}

/// The handler's refusal of a cell; the sender's ticket resolves to
/// `Outcome::Err { code, text }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    /// Application-defined code, reported to the sender in [`Outcome::Err`].
    pub code: u32,
    /// Human-readable reason, reported with `code`.
    pub text: String,
}

impl HandlerError {
    /// A refusal with `code` and `text`.
    pub fn new(code: u32, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }
}

/// Runs on the rayon pool for every received cell; `Ok` acknowledges it.
pub type Handler = Arc<dyn Fn(&Cell) -> Result<(), HandlerError> + Send + Sync>;

/// Error codes cellnet itself answers with (handlers use their own).
pub mod codes {
    use crate::proto::frames::FrameError;

    /// The cell or frame end does not fit frame ordering: its frame was
    /// already handed over, or more cells came than the frame end said.
    pub const FRAME_REFUSED: u32 = 0xCE00_0001;
    /// The sender is not expected in that frame.
    pub const UNEXPECTED_SENDER: u32 = 0xCE00_0002;

    /// The code a receiver answers a frame-ordering error with.
    pub fn for_frame_error(e: &FrameError) -> u32 {
        match e {
            FrameError::UnexpectedPeer { .. } => UNEXPECTED_SENDER,
            _ => FRAME_REFUSED,
        }
    }
}

/// Why a communicator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// This instance's identity (rank, size, node) could not be determined.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// Pinning or building the handler pool failed.
    #[error("placement: {0}")]
    Place(#[from] PlaceError),
    /// A socket could not be created, bound or used.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The eventfd that wakes the I/O thread could not be created.
    #[error("cannot create the wake-up eventfd: {0}")]
    Waker(std::io::Error),
    /// The I/O thread could not be spawned.
    #[error("cannot start the I/O thread: {0}")]
    Thread(std::io::Error),
    /// The job did not become globally ready (the reason, with a diagnosis).
    #[error("{0}")]
    Join(String),
    /// The I/O thread failed or panicked (the reason).
    #[error("the I/O thread stopped: {0}")]
    Stopped(String),
}

/// Why a send did not go out.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// The destination is not a rank of the job.
    #[error("rank {to} does not exist (job size {size})")]
    NoSuchRank {
        /// The rank asked for.
        to: Rank,
        /// The job size; ranks are `0..size`.
        size: u32,
    },
    /// The destination is this instance's own rank.
    #[error("cannot send to myself (rank {0})")]
    ToSelf(Rank),
    /// The window to the destination is full and the caller would not wait
    /// (or its timeout passed).
    #[error(
        "window to rank {to} is full (at most {window} cells or {window_bytes} bytes unanswered)"
    )]
    WouldBlock {
        /// The destination.
        to: Rank,
        /// Cells that may be unanswered per destination (`CELLNET_WINDOW`).
        window: u32,
        /// Payload bytes that may be unanswered per destination
        /// (`CELLNET_WINDOW_BYTES`).
        window_bytes: u64,
    },
    /// The I/O thread has stopped; nothing can be sent any more.
    #[error("the communicator is shut down")]
    Closed,
}

/// Why no frame was received.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecvError {
    /// The frame's deadline passed; `missing` never completed their part
    /// (they were queried and asked to resend before that).
    #[error("frame {frame} missing after {waited:?}: no complete part from ranks {missing:?}")]
    FrameMissing {
        /// The frame waited for.
        frame: u64,
        /// How long [`Communicator::recv_frame`] waited.
        waited: Duration,
        /// Expected senders whose part never completed, by rank.
        missing: Vec<Rank>,
    },
    /// The I/O thread has stopped; no more frames will come.
    #[error("the communicator is shut down")]
    Closed,
}

/// Something that happened to a peer, for the application to react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The peer came back with a new incarnation: cells it had received but
    /// not answered were resent to its new life, with the answered cells of
    /// the latest `CELLNET_REPLAY_FRAMES` frames (it may resume from a
    /// checkpoint and need them again); what it sends again for frames
    /// already received is acknowledged and dropped.
    Restarted {
        /// The peer's rank.
        rank: Rank,
        /// Its new incarnation (larger than the previous one).
        incarnation: u64,
    },
    /// The peer shut down cleanly (it said goodbye).
    Left {
        /// The peer's rank.
        rank: Rank,
    },
    /// Nothing heard from the peer for a while (it may be dead or slow).
    Suspect {
        /// The peer's rank.
        rank: Rank,
    },
    /// A suspect peer was heard from again.
    Recovered {
        /// The peer's rank.
        rank: Rank,
    },
    /// The peer is declared dead (until it returns with a new incarnation).
    Lost {
        /// The peer's rank.
        rank: Rank,
    },
    /// This node has a new leader (the old one was lost).
    LeaderChanged {
        /// This node's index in the job.
        node: u32,
        /// The new leader's rank.
        leader: Rank,
    },
}

/// An answer being waited for, and how: what both kinds of ticket hold.
struct Awaited {
    answer: Arc<shared::Answer>,
    /// How long a wait checks before it sleeps (`CELLNET_SPIN`).
    spin: Duration,
    /// Where the answer comes in: a wait takes it in itself while it
    /// checks, when no other thread is at it.
    engine: Arc<driver::Engine>,
}

impl Awaited {
    /// Until every cell is answered (or never will be). A quick answer is
    /// picked up without sleeping (and so without the I/O thread having to
    /// wake a sleeping core to deliver it).
    fn wait(&self) -> &shared::Answer {
        self.answer.wait(self.spin, || self.engine.poll_input());
        &self.answer
    }

    /// The answer if it is complete already.
    fn done(&self) -> Option<&shared::Answer> {
        self.answer.is_done().then_some(&*self.answer)
    }
}

/// The promise of an answer to one sent cell.
#[must_use = "a ticket tells whether the cell was acknowledged"]
pub struct Ticket {
    to: Rank,
    awaited: Awaited,
}

impl Ticket {
    /// The rank the cell was sent to.
    pub fn to(&self) -> Rank {
        self.to
    }

    /// Wait for the answer: ACK, ERR, or timed out after the send deadline.
    /// Asking again returns the same answer.
    pub fn wait(&self) -> Result<Outcome, SendError> {
        Self::outcome(self.awaited.wait()).ok_or(SendError::Closed)
    }

    /// The answer if it is there already.
    pub fn try_outcome(&self) -> Option<Outcome> {
        self.awaited.done().and_then(Self::outcome)
    }

    /// The outcome of an answered cell (`None`: no answer will come).
    fn outcome(answer: &shared::Answer) -> Option<Outcome> {
        match answer.others().pop() {
            None => Some(Outcome::Ack),
            Some((_, other)) => other,
        }
    }
}

/// How the cells of one [`Communicator::send_many`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Cells in the batch.
    pub cells: usize,
    /// The cells not acknowledged (ERR or timed out), by index in the
    /// batch, in index order.
    pub not_acked: Vec<(usize, Outcome)>,
}

impl BatchOutcome {
    /// Every cell of the batch was acknowledged.
    pub fn all_acked(&self) -> bool {
        self.not_acked.is_empty()
    }

    /// How many cells were acknowledged.
    pub fn acked(&self) -> usize {
        self.cells - self.not_acked.len()
    }
}

/// The promise of the answers to the cells of one
/// [`Communicator::send_many`]: each cell is sequenced, deduplicated and
/// answered on its own, and this one ticket stands for all of them.
#[must_use = "a ticket tells whether the cells were acknowledged"]
pub struct BatchTicket {
    to: Rank,
    cells: usize,
    awaited: Awaited,
}

impl BatchTicket {
    /// The rank the cells were sent to.
    pub fn to(&self) -> Rank {
        self.to
    }

    /// How many cells the batch holds.
    pub fn cells(&self) -> usize {
        self.cells
    }

    /// Wait until every cell is answered (ACK, ERR, or timed out after the
    /// send deadline); [`SendError::Closed`] if the communicator stopped
    /// before some of them were sent.
    pub fn wait(&self) -> Result<BatchOutcome, SendError> {
        self.outcome(self.awaited.wait()).ok_or(SendError::Closed)
    }

    /// The answers if they are all there already.
    pub fn try_outcome(&self) -> Option<BatchOutcome> {
        self.awaited.done().and_then(|a| self.outcome(a))
    }

    fn outcome(&self, answer: &shared::Answer) -> Option<BatchOutcome> {
        let not_acked = answer
            .others()
            .into_iter()
            .map(|(i, o)| o.map(|o| (i, o)))
            .collect::<Option<Vec<_>>>()?;
        Some(BatchOutcome {
            cells: self.cells,
            not_acked,
        })
    }
}

/// Most cells queued to the I/O thread in one command of
/// [`Communicator::send_many`].
const MANY_CHUNK: usize = 1024;

pub(crate) enum Command {
    Send {
        to: Rank,
        frame: u64,
        kind: DataKind,
        payload: Bytes,
        ticket: shared::Resolver,
    },
    /// Cells of one frame to one peer, each with its resolver.
    SendMany {
        to: Rank,
        frame: u64,
        cells: Vec<(Bytes, shared::Resolver)>,
    },
    Expect {
        from_frame: Option<u64>,
        peers: Vec<Rank>,
    },
    /// The application waits for `frame` for at most `timeout`.
    Await {
        frame: u64,
        timeout: Duration,
    },
    Shutdown,
}

/// The books of an instance when it stopped, for
/// [`Communicator::shutdown`]. Messages count cells, frame ends and
/// collective steps. After a clean drain `sent == acknowledged + refused +
/// timed_out`, and `unanswered == unacknowledged == 0`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Reliable messages sent.
    pub sent: u64,
    /// ... answered ACK.
    pub acknowledged: u64,
    /// ... answered ERR.
    pub refused: u64,
    /// ... that timed out (including any still open when the I/O thread stopped).
    pub timed_out: u64,
    /// Reliable messages received (each once, duplicates not counted).
    pub delivered: u64,
    /// Cells the handler ran on.
    pub handled: u64,
    /// Sent messages unanswered when the drain ended (0 on a clean drain).
    pub unanswered: usize,
    /// Received messages whose answer was not sent.
    pub unacknowledged: usize,
}

/// Builds a [`Communicator`].
#[derive(Default)]
pub struct Builder {
    config: Option<Config>,
    launch: Option<LaunchInfo>,
    handler: Option<Handler>,
    mpi: Option<MpiSession>,
    first_frame: u64,
}

impl Builder {
    /// Start at frame `frame` instead of 0: an instance restarted from a
    /// checkpoint of its state after `frame - 1`. [`Communicator::recv_frame`]
    /// begins there, and cells of earlier frames (its neighbours replay
    /// their latest frames when they see it restart) are acknowledged and
    /// dropped.
    pub fn first_frame(mut self, frame: u64) -> Self {
        self.first_frame = frame;
        self
    }

    /// Keep this MPI session alive as long as the communicator (use with
    /// [`Self::launch_info`] when the identity came from MPI).
    pub fn mpi_session(mut self, mpi: MpiSession) -> Self {
        self.mpi = Some(mpi);
        self
    }

    /// Like [`Self::handler`], for a handler already shared.
    pub fn handler_arc(mut self, handler: Handler) -> Self {
        self.handler = Some(handler);
        self
    }

    /// Use this configuration instead of `Config::from_env()`.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Use this identity instead of detecting it from MPI/Slurm/variables.
    pub fn launch_info(mut self, info: LaunchInfo) -> Self {
        self.launch = Some(info);
        self
    }

    /// Run `handler` on the rayon pool for every received cell. Without
    /// one, every cell is accepted (ACK) as it arrives, by the I/O thread.
    pub fn handler(
        mut self,
        handler: impl Fn(&Cell) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Launch detection, pinning, socket binding, local discovery, leader
    /// election and global join; returns once the job is globally ready.
    pub fn start(self) -> Result<Communicator, RuntimeError> {
        let config = match self.config {
            Some(c) => c,
            None => Config::from_env()?,
        };
        let (info, mpi) = match self.launch {
            Some(info) => (info, self.mpi),
            None => launch::detect(config.launch)?,
        };
        Communicator::start(config, info, mpi, self.handler, self.first_frame)
    }
}

/// One instance's handle on the job.
pub struct Communicator {
    info: LaunchInfo,
    config: Config,
    binding: Binding,
    me: PeerInfo,
    coordinator: SocketAddrV4,
    commands: Arc<shared::Commands>,
    /// The I/O state; a sending thread runs a round itself when it is free.
    engine: Arc<driver::Engine>,
    frames: Receiver<Result<CompleteFrame, FrameMissing>>,
    events: Receiver<PeerEvent>,
    mailbox: collective::Mailbox,
    waker: Arc<Waker>,
    credits: Arc<CreditGate>,
    status: Arc<StatusCell>,
    metrics: Arc<Metrics>,
    io: Option<JoinHandle<ShutdownReport>>,
    next_frame: std::sync::atomic::AtomicU64,
    // Dropped last: MPI is finalized after our sockets are closed.
    mpi: Option<MpiSession>,
}

impl Communicator {
    /// Start building a communicator (configuration from the environment
    /// unless [`Builder::config`] is given).
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn start(
        config: Config,
        info: LaunchInfo,
        mpi: Option<MpiSession>,
        handler: Option<Handler>,
        first_frame: u64,
    ) -> Result<Self, RuntimeError> {
        let binding = match config.placement {
            PlacementPolicy::None => place::current_binding(PlacementPolicy::None)?,
            policy => place::apply(policy, info.local_rank, info.local_size)?,
        };
        // Without placement the workers keep the inherited affinity: pinned
        // one per PU, every instance's first worker would share the first PU.
        let pin = config.placement != PlacementPolicy::None;
        let pool = place::build_pool(config.threads, &binding, pin)?;
        if config.malloc_tune {
            tune_malloc();
        }
        let incarnation = crate::proto::Incarnation(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1),
        );
        let bind_ip = match config.bind_ip {
            Some(ip) => ip,
            None => default_bind_ip(&info)?,
        };
        let coordinator = coordinator_addr(&config, &info)?;
        let name = format!(
            "cellnet-{:x}-{}-{:x}",
            info.job_key.0, info.rank, incarnation.0
        );
        let transport =
            net::zmq_transport::ZmqTransport::bind(bind_ip, config.ipc_dir.as_deref(), &name)?;
        let udp = net::udp::UdpEndpoint::discovery(config.discovery_port)?;
        let me = PeerInfo {
            rank: info.rank,
            node_index: info.node_index,
            incarnation,
            endpoints: transport.endpoints().clone(),
        };
        let waker = Arc::new(Waker::new().map_err(RuntimeError::Waker)?);
        let credits = Arc::new(CreditGate::new(config.reliable.window, config.window_bytes));
        let status = Arc::new(StatusCell::new(Status {
            endpoints: me.endpoints.clone(),
            ..Status::default()
        }));
        let metrics = Arc::new(Metrics::default());
        // Bounded by the credit window: every queued send holds a credit.
        let commands = Arc::new(shared::Commands::new());
        let (frame_tx, frame_rx) = bounded(config.frames_ahead as usize);
        let (event_tx, event_rx) = bounded(1024);
        // Collective messages: bounded by the participants of the calls in
        // progress (each sends one message per phase).
        let (coll_tx, coll_rx) = crossbeam_channel::unbounded();
        let driver = driver::Driver::new(driver::Parts {
            config: config.clone(),
            info: info.clone(),
            me: me.clone(),
            coordinator,
            transport,
            udp,
            pool,
            handler,
            commands: commands.clone(),
            frames: frame_tx,
            events: event_tx,
            collectives: coll_tx,
            waker: waker.clone(),
            credits: credits.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            first_frame,
        });
        let engine = driver::Engine::new(driver);
        let io_engine = engine.clone();
        let io = std::thread::Builder::new()
            .name(format!("cellnet-io-{}", info.rank))
            .spawn(move || io_engine.run())
            .map_err(RuntimeError::Thread)?;
        let comm = Communicator {
            info,
            binding,
            me,
            coordinator,
            commands,
            engine,
            frames: frame_rx,
            events: event_rx,
            mailbox: collective::Mailbox::new(coll_rx),
            waker,
            credits,
            status,
            metrics,
            io: Some(io),
            next_frame: std::sync::atomic::AtomicU64::new(first_frame),
            mpi,
            config,
        };
        let deadline = Instant::now() + comm.config.join_timeout;
        let s = comm.status.wait_until(deadline, |s| {
            s.global.is_some() || s.failed.is_some() || s.stopped
        });
        if let Some(why) = s.failed {
            return Err(RuntimeError::Join(why));
        }
        if s.global.is_none() {
            return Err(RuntimeError::Join(comm.join_diagnosis(&s)));
        }
        Ok(comm)
    }

    fn join_diagnosis(&self, s: &Status) -> String {
        let waited = self.config.join_timeout;
        if !s.local_complete {
            format!(
                "not globally ready after {waited:?}: local discovery found {} of {} instances of node {} \
                 (discovery port {}, broadcast {})",
                s.members.len().max(1),
                self.info.local_size,
                self.info.node_name,
                self.config.discovery_port,
                self.config.broadcast
            )
        } else {
            format!(
                "not globally ready after {waited:?}: the coordinator at {} did not announce all {} nodes \
                 (is it reachable, and are all nodes started?)",
                self.coordinator, self.info.nodes
            )
        }
    }

    /// This instance's global rank, in `0..size()`.
    pub fn rank(&self) -> Rank {
        self.info.rank
    }

    /// Number of instances in the job.
    pub fn size(&self) -> u32 {
        self.info.size
    }

    /// Who this instance is: rank, size, node, local rank, job key.
    pub fn launch_info(&self) -> &LaunchInfo {
        &self.info
    }

    /// The cpuset this instance is bound to (PUs, OS indices).
    pub fn binding(&self) -> &Binding {
        &self.binding
    }

    /// Where this instance receives.
    pub fn endpoints(&self) -> &Endpoints {
        &self.me.endpoints
    }

    /// The coordinator's UDP address leaders register with.
    pub fn coordinator(&self) -> SocketAddrV4 {
        self.coordinator
    }

    /// The MPI session, if the identity came from MPI (for MPI calls beside cellnet).
    pub fn mpi(&self) -> Option<&MpiSession> {
        self.mpi.as_ref()
    }

    /// Status as of now (leader, node members, global readiness).
    pub fn status(&self) -> Status {
        self.status.get()
    }

    /// This node's leader, once discovery is complete.
    pub fn leader(&self) -> Option<Rank> {
        self.status.get().leader
    }

    /// Whether this instance leads its node.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.rank())
    }

    /// Ranks of this node's instances, this one included.
    pub fn local_peers(&self) -> Vec<Rank> {
        self.status.get().members.iter().map(|p| p.rank).collect()
    }

    /// Traffic counters as of now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    fn check_target(&self, to: Rank) -> Result<(), SendError> {
        if to >= self.size() {
            return Err(SendError::NoSuchRank {
                to,
                size: self.size(),
            });
        }
        if to == self.rank() {
            return Err(SendError::ToSelf(to));
        }
        Ok(())
    }

    /// Queue the message. `alone`: nothing else is on its way to `to`, so
    /// it goes out at once on this thread if the I/O thread is not busy (no
    /// hand-off); behind others it waits for the I/O thread, which sends
    /// whatever has gathered in one batch.
    fn submit(
        &self,
        to: Rank,
        frame: u64,
        kind: DataKind,
        payload: Bytes,
        alone: bool,
    ) -> Result<Ticket, SendError> {
        let bytes = payload.len() as u64;
        let (tx, rx) = shared::Answer::new();
        let cmd = Command::Send {
            to,
            frame,
            kind,
            payload,
            ticket: tx,
        };
        self.queue(to, cmd, (1, bytes), alone)?;
        Ok(Ticket {
            to,
            awaited: self.awaited(rx),
        })
    }

    fn awaited(&self, answer: Arc<shared::Answer>) -> Awaited {
        Awaited {
            answer,
            spin: self.config.spin,
            engine: self.engine.clone(),
        }
    }

    /// Hand `cmd`, which holds `credits` (messages, bytes) to `to`, to the
    /// I/O thread (`alone`: see [`Self::submit`]); the credits come back if
    /// it has stopped.
    fn queue(
        &self,
        to: Rank,
        cmd: Command,
        credits: (u32, u64),
        alone: bool,
    ) -> Result<(), SendError> {
        if self.engine.is_stopped() || self.commands.push(cmd).is_err() {
            self.credits.release_many(to, credits.0, credits.1);
            return Err(SendError::Closed);
        }
        if alone {
            self.engine.assist();
        } else {
            self.waker.wake();
        }
        Ok(())
    }

    /// A step of a collective (sequence `seq`), over the reliable channel.
    pub(crate) fn send_collective(
        &self,
        to: Rank,
        seq: u64,
        payload: Bytes,
    ) -> Result<Ticket, SendError> {
        self.send_kind(to, seq, DataKind::Collective, payload, None)
    }

    /// Send a cell of `frame` to `to`; blocks while the window to `to` is
    /// full (backpressure). The ticket resolves to ACK, ERR or timed out.
    pub fn send(
        &self,
        to: Rank,
        frame: u64,
        payload: impl Into<Bytes>,
    ) -> Result<Ticket, SendError> {
        self.send_kind(to, frame, DataKind::Cell, payload.into(), None)
    }

    /// Send `cells` of `frame` to `to` with one ticket for all of them:
    /// each cell is sequenced, deduplicated, acknowledged and handed over
    /// on its own exactly as with [`Self::send`], but without a ticket,
    /// an allocation and a hand-off to the I/O thread per cell. Blocks while
    /// the window to `to` is full, like [`Self::send`], and takes cells from
    /// `cells` only as credits come (at most about a window's bytes ahead);
    /// returns once every cell is queued.
    pub fn send_many<I>(&self, to: Rank, frame: u64, cells: I) -> Result<BatchTicket, SendError>
    where
        I: IntoIterator,
        I::Item: Into<Bytes>,
    {
        self.check_target(to)?;
        let answer = shared::Answer::open();
        let mut cells = cells.into_iter().map(Into::into).peekable();
        let mut index = 0;
        while cells.peek().is_some() {
            // Taken from the iterator before credits are: at most a window's
            // bytes (or one larger cell), so large cells made on demand
            // stay bounded by the window as with `send`.
            let mut chunk: Vec<Bytes> = Vec::new();
            let mut taken = 0u64;
            while chunk.len() < MANY_CHUNK && taken < self.credits.window_bytes() {
                let Some(cell) = cells.next() else { break };
                taken += cell.len() as u64;
                chunk.push(cell);
            }
            while !chunk.is_empty() {
                let sizes = chunk.iter().map(|c| c.len() as u64);
                let (n, in_use) = self.acquire(to, sizes, None)?;
                let rest = chunk.split_off(n);
                let bytes = chunk.iter().map(|c| c.len() as u64).sum();
                answer.add(n);
                let cells = chunk
                    .into_iter()
                    .map(|c| {
                        index += 1;
                        (c, answer.resolver(index - 1))
                    })
                    .collect();
                let cmd = Command::SendMany { to, frame, cells };
                self.queue(to, cmd, (n as u32, bytes), in_use as usize == n)?;
                chunk = rest;
            }
        }
        answer.seal();
        Ok(BatchTicket {
            to,
            cells: index,
            awaited: self.awaited(answer),
        })
    }

    /// Like [`Self::send`], but fails with [`SendError::WouldBlock`] instead
    /// of waiting for a credit.
    pub fn try_send(
        &self,
        to: Rank,
        frame: u64,
        payload: impl Into<Bytes>,
    ) -> Result<Ticket, SendError> {
        self.send_kind(
            to,
            frame,
            DataKind::Cell,
            payload.into(),
            Some(Instant::now()),
        )
    }

    /// Like [`Self::send`], waiting at most `timeout` for a credit.
    pub fn send_timeout(
        &self,
        to: Rank,
        frame: u64,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Ticket, SendError> {
        let deadline = Some(Instant::now() + timeout);
        self.send_kind(to, frame, DataKind::Cell, payload.into(), deadline)
    }

    /// Check the target, take a credit (waiting until `deadline`, `None`:
    /// as long as it takes), queue the message.
    fn send_kind(
        &self,
        to: Rank,
        frame: u64,
        kind: DataKind,
        payload: Bytes,
        deadline: Option<Instant>,
    ) -> Result<Ticket, SendError> {
        self.check_target(to)?;
        let sizes = std::iter::once(payload.len() as u64);
        let (_, in_use) = self.acquire(to, sizes, deadline)?;
        self.submit(to, frame, kind, payload, in_use == 1)
    }

    /// Take credits for as many messages of `sizes` bytes to `to` as fit,
    /// at least one (waiting for it until `deadline`): how many were
    /// taken, and how many are in use now, these included.
    fn acquire(
        &self,
        to: Rank,
        sizes: impl Iterator<Item = u64> + Clone,
        deadline: Option<Instant>,
    ) -> Result<(usize, u32), SendError> {
        // A free credit is taken without reading the clock.
        if let Some(taken) = self.credits.acquire(to, sizes.clone(), None) {
            return Ok(taken);
        }
        // Without a deadline, wait in slices so a stopped I/O thread is noticed.
        loop {
            let slice = Instant::now() + Duration::from_millis(200);
            let until = deadline.map_or(slice, |d| d.min(slice));
            if let Some(taken) = self.credits.acquire(to, sizes.clone(), Some(until)) {
                return Ok(taken);
            }
            if self.status.get().stopped {
                return Err(SendError::Closed);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(SendError::WouldBlock {
                    to,
                    window: self.credits.window(),
                    window_bytes: self.credits.window_bytes(),
                });
            }
        }
    }

    /// End this instance's part of `frame` towards each of `to`: they learn
    /// how many cells of the frame to wait for.
    pub fn end_frame(&self, frame: u64, to: &[Rank]) -> Result<Vec<Ticket>, SendError> {
        to.iter()
            .map(|&t| {
                // The I/O thread fills in the count of cells sent.
                self.send_kind(
                    t,
                    frame,
                    DataKind::FrameEnd { count: 0 },
                    Bytes::new(),
                    None,
                )
            })
            .collect()
    }

    /// The instances that send to this one every frame (its neighbours),
    /// from the next frame to be received on.
    pub fn expect_from(&self, peers: impl IntoIterator<Item = Rank>) -> Result<(), SendError> {
        self.set_expected(None, peers)
    }

    /// The instances that send to this one from `frame` on (for example
    /// everybody, for a final gather frame).
    pub fn expect_from_frame(
        &self,
        frame: u64,
        peers: impl IntoIterator<Item = Rank>,
    ) -> Result<(), SendError> {
        self.set_expected(Some(frame), peers)
    }

    fn set_expected(
        &self,
        from_frame: Option<u64>,
        peers: impl IntoIterator<Item = Rank>,
    ) -> Result<(), SendError> {
        let peers: Vec<Rank> = peers.into_iter().collect();
        if let Some(&bad) = peers
            .iter()
            .find(|&&p| p >= self.size() || p == self.rank())
        {
            return self.check_target(bad);
        }
        self.commands
            .push(Command::Expect { from_frame, peers })
            .map_err(|_| SendError::Closed)?;
        self.waker.wake();
        Ok(())
    }

    /// The next frame, strictly in order, once every expected peer's part
    /// of it is complete. Laggards are asked to resend while we wait; after
    /// `timeout` the answer is [`RecvError::FrameMissing`] naming them.
    pub fn recv_frame(&self, timeout: Duration) -> Result<BTreeMap<Rank, Vec<Bytes>>, RecvError> {
        let frame = self.next_frame.load(std::sync::atomic::Ordering::Relaxed);
        self.commands
            .push(Command::Await { frame, timeout })
            .map_err(|_| RecvError::Closed)?;
        self.waker.wake();
        // The I/O thread reports a missing frame at the deadline; the grace
        // only covers a stopped I/O thread.
        let grace = Duration::from_secs(5);
        loop {
            match self.frames.recv_timeout(timeout + grace) {
                Ok(Ok(f)) if f.frame < frame => continue,
                Ok(Ok(f)) => {
                    self.next_frame
                        .store(f.frame + 1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(f.cells);
                }
                Ok(Err(m)) if m.frame < frame => continue,
                Ok(Err(m)) => {
                    return Err(RecvError::FrameMissing {
                        frame: m.frame,
                        waited: timeout,
                        missing: m.peers,
                    })
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(RecvError::Closed)
                }
            }
        }
    }

    /// Peer events (restarted, left, suspect, recovered, lost, leader
    /// changed) since the last call, oldest first.
    pub fn events(&self) -> Vec<PeerEvent> {
        self.events.try_iter().collect()
    }

    /// Drain: wait until every sent cell is answered (or timed out) and
    /// every received cell answered, then close the sockets.
    pub fn shutdown(mut self) -> Result<ShutdownReport, RuntimeError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<ShutdownReport, RuntimeError> {
        let Some(io) = self.io.take() else {
            return Ok(ShutdownReport::default());
        };
        let _ = self.commands.push(Command::Shutdown);
        self.waker.wake();
        let report = io
            .join()
            .map_err(|_| RuntimeError::Stopped("the I/O thread panicked".into()))?;
        match self.status.get().failed {
            Some(why) => Err(RuntimeError::Stopped(why)),
            None => Ok(report),
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Keep freed memory in the process for reuse: the mmap threshold at
/// glibc's maximum (32 MiB) and no trimming below 1 GiB free.
///
/// Large received cells live in buffers ZeroMQ allocates per message and
/// are freed when their frame is handed over. With glibc's defaults such a
/// buffer is often fresh memory (a new mapping, or heap trimmed back since),
/// whose pages fault in one at a time, each a trip through the kernel: for
/// 1 MiB cells that costs more than the copy from the socket. MPI libraries
/// make the same choice. Called once by [`Communicator`]s started with
/// `CELLNET_MALLOC_TUNE=1` (the default); process-wide, so opt out with 0.
pub fn tune_malloc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; it is
        // thread-safe and these values are within glibc's documented range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}

/// 127.0.0.1 when the whole job is on one node; otherwise the first IPv4
/// address the hostname resolves to that is not loopback.
fn default_bind_ip(info: &LaunchInfo) -> Result<IpAddr, RuntimeError> {
    if info.nodes <= 1 {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    use std::net::ToSocketAddrs;
    let host = launch::hostname();
    let addrs = (host.as_str(), 0)
        .to_socket_addrs()
        .map_err(|e| NetError::Resolve {
            addr: host.clone(),
            reason: format!("{e}; set CELLNET_BIND_IP to this node's address"),
        })?;
    addrs
        .map(|a| a.ip())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .ok_or_else(|| {
            RuntimeError::Net(NetError::Resolve {
                addr: host,
                reason: "no non-loopback IPv4 address; set CELLNET_BIND_IP".into(),
            })
        })
}

/// The coordinator's known `host:port`: configured, else the first node of
/// the job's node list, else loopback.
fn coordinator_addr(config: &Config, info: &LaunchInfo) -> Result<SocketAddrV4, RuntimeError> {
    let addr = match (&config.coordinator, info.node_list.first()) {
        (Some(a), _) => a.clone(),
        (None, Some(first)) if info.nodes > 1 => format!("{first}:{}", config.coordinator_port),
        _ => format!("127.0.0.1:{}", config.coordinator_port),
    };
    Ok(net::resolve_v4(&addr)?)
}
