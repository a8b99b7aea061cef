//! State shared between the I/O thread and the application's threads: the
//! wake-up fd, the credit gate (backpressure), status and counters.

use std::os::fd::RawFd;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicU8, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release, SeqCst},
};

// Keys are ranks (validated against the job size): a fast hash is safe.
use rustc_hash::FxHashMap as HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::proto::{reliable::Outcome, PeerInfo, Rank};

/// Lock a mutex, surviving a panicked holder (the data is plain counters
/// and status that stay consistent at every await point).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An eventfd that wakes the I/O thread out of `poll(2)`. It is written
/// only while the I/O thread is parked (about to sleep or sleeping): a busy
/// I/O thread finds new work in its queues without a syscall per message.
pub(crate) struct Waker {
    fd: RawFd,
    parked: std::sync::atomic::AtomicBool,
    /// Set by every [`Self::wake`]: the I/O thread must run a round before
    /// it sleeps (new work, or its plan for the sleep is out of date).
    kicked: std::sync::atomic::AtomicBool,
}

impl Waker {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned by this struct.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            parked: std::sync::atomic::AtomicBool::new(false),
            kicked: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The I/O thread is going to sleep; it must check its queues after
    /// this and before sleeping.
    pub fn park(&self) {
        self.parked.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn unpark(&self) {
        self.parked
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Call after queueing work for the I/O thread (or changing what it
    /// must wait for).
    pub fn wake(&self) {
        self.kicked.store(true, std::sync::atomic::Ordering::SeqCst);
        if !self.parked.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd. A full
        // counter (EAGAIN) means a wake-up is pending anyway.
        unsafe { libc::write(self.fd, &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Whether [`Self::wake`] was called since the last time this was asked.
    pub fn take_kick(&self) -> bool {
        self.kicked.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our own eventfd.
        unsafe { libc::read(self.fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: closing the fd we own, once.
        unsafe { libc::close(self.fd) };
    }
}

/// The application's commands to the I/O state: pushed under a short lock
/// and taken all at once by whichever thread runs a round. Bounded by the
/// credit window (every queued send holds a credit).
pub(crate) struct Commands {
    queue: Mutex<Vec<super::Command>>,
    /// Commands queued (read without the lock by a polling I/O thread).
    queued: AtomicUsize,
    /// The I/O thread has finished: nothing will take commands any more.
    closed: AtomicBool,
}

impl Commands {
    pub fn new() -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            queued: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Queue `command`; given back if the I/O thread has finished.
    pub fn push(&self, command: super::Command) -> Result<(), super::Command> {
        let mut q = lock(&self.queue);
        if self.closed.load(Acquire) {
            return Err(command);
        }
        q.push(command);
        self.queued.store(q.len(), Release);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.queued.load(Acquire) == 0
    }

    /// Swap everything queued, oldest first, into `out` (which is empty,
    /// and whose buffer the queue keeps for reuse).
    pub fn take_into(&self, out: &mut Vec<super::Command>) {
        if self.is_empty() {
            return;
        }
        let mut q = lock(&self.queue);
        std::mem::swap(&mut *q, out);
        self.queued.store(0, Release);
    }

    /// Refuse further commands and drop the queued ones (their tickets
    /// learn that no answer will come).
    pub fn close(&self) {
        let mut q = lock(&self.queue);
        self.closed.store(true, Release);
        q.clear();
        self.queued.store(0, Release);
    }
}

/// The answer to one sent message, passed once from the I/O thread
/// ([`Resolver`]) to the application's [`super::Ticket`]: one allocation,
/// and no system call unless the ticket's owner is asleep waiting for it.
pub(crate) struct Answer {
    /// `PENDING`, then `ACK`, `OTHER` (the outcome is in `other`) or
    /// `CLOSED` (the resolver is gone without an answer); set once.
    state: AtomicU8,
    /// An outcome other than ACK (an ACK needs no more than `state`).
    other: OnceLock<Outcome>,
    /// The ticket's owner sleeps on `answered` (the resolver then takes
    /// `sleep` to wake it; otherwise it takes no lock at all).
    waiting: AtomicBool,
    sleep: Mutex<()>,
    answered: Condvar,
}

const PENDING: u8 = 0;
const ACK: u8 = 1;
const OTHER: u8 = 2;
const CLOSED: u8 = 3;

/// The I/O thread's end of an [`Answer`]; dropping it unanswered tells the
/// ticket that no answer will come.
pub(crate) struct Resolver(Option<Arc<Answer>>);

impl Answer {
    pub fn new() -> (Resolver, Arc<Answer>) {
        let a = Arc::new(Answer {
            state: AtomicU8::new(PENDING),
            other: OnceLock::new(),
            waiting: AtomicBool::new(false),
            sleep: Mutex::new(()),
            answered: Condvar::new(),
        });
        (Resolver(Some(a.clone())), a)
    }

    /// `None` until answered; `Some(None)` if no answer will come.
    pub fn try_get(&self) -> Option<Option<Outcome>> {
        match self.state.load(Acquire) {
            PENDING => None,
            ACK => Some(Some(Outcome::Ack)),
            OTHER => Some(self.other.get().cloned()),
            _ => Some(None),
        }
    }

    /// Wait for the answer, checking without sleeping for `spin` first
    /// (calling `check` between looks); `None` if no answer will come.
    pub fn wait(&self, spin: Duration, check: impl Fn()) -> Option<Outcome> {
        let start = Instant::now();
        while self.state.load(Acquire) == PENDING && start.elapsed() < spin {
            check();
            if self.state.load(Acquire) != PENDING {
                break;
            }
            std::thread::yield_now();
        }
        if let Some(answer) = self.try_get() {
            return answer;
        }
        let mut g = lock(&self.sleep);
        // SeqCst with `finish`: either it sees `waiting` and wakes us, or
        // we see its state.
        self.waiting.store(true, SeqCst);
        while self.state.load(SeqCst) == PENDING {
            g = self.answered.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        self.try_get().flatten()
    }

    fn finish(&self, outcome: Option<Outcome>) {
        let state = match outcome {
            Some(Outcome::Ack) => ACK,
            Some(o) => {
                let _ = self.other.set(o);
                OTHER
            }
            None => CLOSED,
        };
        self.state.store(state, SeqCst);
        if self.waiting.load(SeqCst) {
            // The waiter holds `sleep` from its last look at `state` until
            // it sleeps: taking it here means the wake-up cannot be lost.
            drop(lock(&self.sleep));
            self.answered.notify_all();
        }
    }
}

impl Resolver {
    /// Hand the ticket its outcome.
    pub fn resolve(mut self, outcome: Outcome) {
        if let Some(a) = self.0.take() {
            a.finish(Some(outcome));
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.finish(None);
        }
    }
}

/// Per-peer send credits: at most `window` unanswered messages and
/// `window_bytes` of their payloads per peer (a message larger than that
/// goes alone). The application takes a credit before a message is
/// queued; the I/O thread returns it when the ticket resolves. This is what
/// bounds every queue between the user and the socket.
pub(crate) struct CreditGate {
    window: u32,
    window_bytes: u64,
    in_use: Mutex<Credits>,
    freed: Condvar,
}

#[derive(Default)]
struct Credits {
    /// Messages and payload bytes unanswered, per peer.
    used: HashMap<Rank, (u32, u64)>,
    /// Senders asleep on `freed` (a release wakes them only if any).
    waiting: usize,
}

impl CreditGate {
    pub fn new(window: u32, window_bytes: u64) -> Self {
        Self {
            window: window.max(1),
            window_bytes,
            in_use: Mutex::new(Credits::default()),
            freed: Condvar::new(),
        }
    }

    /// Unanswered messages allowed per peer.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Unanswered payload bytes allowed per peer.
    pub fn window_bytes(&self) -> u64 {
        self.window_bytes
    }

    /// Take a credit for a message of `bytes` to `to`, waiting until
    /// `deadline` (`None`: don't wait): the credits now in use for `to`,
    /// this one included.
    pub fn acquire(&self, to: Rank, bytes: u64, deadline: Option<Instant>) -> Option<u32> {
        let mut in_use = lock(&self.in_use);
        loop {
            let (count, used) = in_use.used.entry(to).or_insert((0, 0));
            if *count == 0
                || (*count < self.window && used.saturating_add(bytes) <= self.window_bytes)
            {
                *count += 1;
                *used = used.saturating_add(bytes);
                return Some(*count);
            }
            let deadline = deadline?;
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            in_use.waiting += 1;
            in_use = self
                .freed
                .wait_timeout(in_use, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            in_use.waiting -= 1;
        }
    }

    /// Return the credit of one message of `bytes` to `to`.
    pub fn release(&self, to: Rank, bytes: u64) {
        self.release_many(to, 1, bytes);
    }

    /// Return `n` credits for `to`, of `bytes` together, at once (one
    /// lock, at most one wake-up).
    pub fn release_many(&self, to: Rank, n: u32, bytes: u64) {
        let mut in_use = lock(&self.in_use);
        if let Some((count, used)) = in_use.used.get_mut(&to) {
            *count = count.saturating_sub(n);
            *used = used.saturating_sub(bytes);
        }
        let wake = in_use.waiting > 0;
        drop(in_use);
        if wake {
            self.freed.notify_all();
        }
    }
}

/// Where the instance is in its life, for the application's queries.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Where this instance receives.
    pub endpoints: crate::proto::Endpoints,
    /// Local discovery complete: every node-mate is ready.
    pub local_complete: bool,
    /// This node's leader, once local discovery is complete.
    pub leader: Option<Rank>,
    /// This node's instances, this one included, by rank.
    pub members: Vec<PeerInfo>,
    /// `(nodes, size)` once the job is globally ready.
    pub global: Option<(u32, u32)>,
    /// On leaders: the leader of every node, by node index (the first runs
    /// the coordinator). Empty on members.
    pub node_leaders: Vec<Rank>,
    /// Why the I/O thread stopped, if it failed.
    pub failed: Option<String>,
    /// The I/O thread has stopped (cleanly or not); nothing more will happen.
    pub stopped: bool,
}

pub(crate) struct StatusCell {
    status: Mutex<Status>,
    changed: Condvar,
}

impl StatusCell {
    pub fn new(status: Status) -> Self {
        Self {
            status: Mutex::new(status),
            changed: Condvar::new(),
        }
    }

    pub fn get(&self) -> Status {
        lock(&self.status).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.status));
        self.changed.notify_all();
    }

    /// Wait until `done(status)` holds, or the deadline passes.
    pub fn wait_until(&self, deadline: Instant, done: impl Fn(&Status) -> bool) -> Status {
        let mut s = lock(&self.status);
        while !done(&s) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.clone()
    }
}

macro_rules! metrics {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of what this instance did and dropped.
        #[derive(Default)]
        pub struct Metrics { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A copy of the instance's counters at one moment.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct MetricsSnapshot { $($(#[$doc])* pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl MetricsSnapshot {
            /// `(name, value)` of every counter, for reports.
            pub fn entries(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

metrics! {
    /// Datagrams received on the discovery or coordinator port.
    datagrams_received,
    /// Datagrams that did not parse (junk, truncated, oversized, bad version).
    datagrams_malformed,
    /// Datagrams carrying another job's key.
    datagrams_foreign_job,
    /// Datagrams whose HMAC tag did not verify.
    datagrams_bad_tag,
    /// ZeroMQ messages that did not parse.
    zmq_malformed,
    /// Registrations the coordinator refused as inconsistent.
    registrations_refused,
    /// Cells queued for sending by the application (not frame ends or collective steps).
    cells_sent,
    /// Cells received from peers, each once (duplicates not counted).
    cells_delivered,
    /// Sent messages answered ACK.
    acks_received,
    /// Sent messages answered ERR.
    errs_received,
    /// Sent messages unanswered within the send deadline.
    timeouts,
    /// Replies that could not be sent (peer gone).
    replies_failed,
    /// Cells refused by frame ordering (stale frame, unexpected sender).
    cells_refused,
    /// Cells left unanswered because the frame buffer was full (resent later).
    cells_deferred,
    /// Messages from an earlier life of a peer, or for an earlier life of us.
    stale_messages,
    /// Cells and frame ends replayed after a restart (ours or the sender's)
    /// for frames already here or past: acknowledged and dropped.
    frame_replays_dropped,
    /// Peer events dropped because the application did not read them.
    events_dropped,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}
