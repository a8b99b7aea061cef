//! State shared between the I/O thread and the application's threads: the
//! wake-up fd, the credit gate (backpressure), status and counters.

use std::os::fd::RawFd;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst},
};

// Keys are ranks (validated against the job size): a fast hash is safe.
use rustc_hash::FxHashMap as HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

/// The answers to the cells of one send (one cell for
/// [`super::Communicator::send`], many for
/// [`super::Communicator::send_many`]), passed from the I/O thread
/// ([`Resolver`], one per cell) to the application's ticket: one allocation
/// per send, an ACK costs one atomic decrement, and no system call unless
/// the ticket's owner is asleep waiting.
pub(crate) struct Answer {
    /// Cells not answered yet, plus one while the sender is still queueing
    /// cells of this send; answered once it reaches 0.
    open: AtomicUsize,
    /// Cells answered other than ACK, by index in the send (`None`: no
    /// answer will come). Rare, so behind a lock.
    others: Mutex<Vec<(usize, Option<Outcome>)>>,
    /// Entries in `others` (read without the lock: usually none).
    other_count: AtomicUsize,
    /// The ticket's owner sleeps on `answered` (the last resolver then
    /// takes `sleep` to wake it; otherwise it takes no lock at all).
    waiting: AtomicBool,
    sleep: Mutex<()>,
    answered: Condvar,
}

/// The I/O thread's end of one cell's answer; dropping it unanswered tells
/// the ticket that no answer will come for that cell.
pub(crate) struct Resolver {
    answer: Option<Arc<Answer>>,
    index: usize,
}

impl Answer {
    /// The answer to a send of one cell, and its resolver.
    pub fn new() -> (Resolver, Arc<Answer>) {
        let a = Self::counting(1);
        (a.resolver(0), a)
    }

    /// The answer to a send of cells still to be counted in with
    /// [`Self::add`]; answered once [`Self::seal`]ed and all resolved.
    pub fn open() -> Arc<Answer> {
        // The one for the sender still queueing.
        Self::counting(1)
    }

    fn counting(open: usize) -> Arc<Answer> {
        Arc::new(Answer {
            open: AtomicUsize::new(open),
            others: Mutex::new(Vec::new()),
            other_count: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            sleep: Mutex::new(()),
            answered: Condvar::new(),
        })
    }

    /// `n` more cells are queued (before their resolvers can run).
    pub fn add(&self, n: usize) {
        self.open.fetch_add(n, AcqRel);
    }

    /// Every cell of the send is queued.
    pub fn seal(&self) {
        self.done_one();
    }

    /// The resolver of cell `index`.
    pub fn resolver(self: &Arc<Self>, index: usize) -> Resolver {
        Resolver {
            answer: Some(self.clone()),
            index,
        }
    }

    /// Whether every cell is answered (or will never be).
    pub fn is_done(&self) -> bool {
        self.open.load(Acquire) == 0
    }

    /// Once done: the cells not answered ACK, by index (`None`: no answer
    /// will come), in index order.
    pub fn others(&self) -> Vec<(usize, Option<Outcome>)> {
        if self.other_count.load(Acquire) == 0 {
            return Vec::new();
        }
        let mut v = lock(&self.others).clone();
        v.sort_unstable_by_key(|(i, _)| *i);
        v
    }

    /// Wait until done, checking without sleeping for `spin` first
    /// (calling `check` between looks).
    pub fn wait(&self, spin: Duration, check: impl Fn()) {
        let start = Instant::now();
        while !self.is_done() && start.elapsed() < spin {
            check();
            if self.is_done() {
                return;
            }
            std::thread::yield_now();
        }
        if self.is_done() {
            return;
        }
        let mut g = lock(&self.sleep);
        // SeqCst with `done_one`: either it sees `waiting` and wakes us, or
        // we see its count.
        self.waiting.store(true, SeqCst);
        while self.open.load(SeqCst) != 0 {
            g = self.answered.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self, index: usize, outcome: Option<Outcome>) {
        if !matches!(outcome, Some(Outcome::Ack)) {
            lock(&self.others).push((index, outcome));
            self.other_count.fetch_add(1, Release);
        }
        self.done_one();
    }

    fn done_one(&self) {
        if self.open.fetch_sub(1, SeqCst) == 1 && self.waiting.load(SeqCst) {
            // The waiter holds `sleep` from its last look at `open` until
            // it sleeps: taking it here means the wake-up cannot be lost.
            drop(lock(&self.sleep));
            self.answered.notify_all();
        }
    }
}

impl Resolver {
    /// Hand the cell its outcome.
    pub fn resolve(mut self, outcome: Outcome) {
        if let Some(a) = self.answer.take() {
            a.finish(self.index, Some(outcome));
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        if let Some(a) = self.answer.take() {
            a.finish(self.index, None);
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

    /// Take credits for as many of `sizes` (payload bytes of messages to
    /// `to`, in order) as fit, at least one, waiting until `deadline`
    /// (`None`: don't wait) for the first: how many were taken, and the
    /// credits now in use for `to`, these included. No sizes: none taken.
    pub fn acquire(
        &self,
        to: Rank,
        sizes: impl Iterator<Item = u64>,
        deadline: Option<Instant>,
    ) -> Option<(usize, u32)> {
        let mut sizes = sizes.peekable();
        let mut in_use = lock(&self.in_use);
        let Some(&first) = sizes.peek() else {
            return Some((0, in_use.used.get(&to).map_or(0, |u| u.0)));
        };
        loop {
            let (count, used) = in_use.used.entry(to).or_insert((0, 0));
            if *count == 0
                || (*count < self.window && used.saturating_add(first) <= self.window_bytes)
            {
                let mut taken = 0;
                while let Some(&bytes) = sizes.peek() {
                    let fits = *count == 0
                        || (*count < self.window
                            && used.saturating_add(bytes) <= self.window_bytes);
                    if !fits {
                        break;
                    }
                    *count += 1;
                    *used = used.saturating_add(bytes);
                    taken += 1;
                    sizes.next();
                }
                return Some((taken, *count));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_done_once_sealed_and_every_cell_resolved_or_dropped() {
        let a = Answer::open();
        a.add(3);
        let r: Vec<Resolver> = (0..3).map(|i| a.resolver(i)).collect();
        let mut r = r.into_iter();
        r.next().unwrap().resolve(Outcome::Ack);
        let err = Outcome::Err {
            code: 2,
            text: "no".into(),
        };
        r.next().unwrap().resolve(err.clone());
        assert!(!a.is_done(), "one cell open");
        // Dropped unresolved: the command never reached the I/O thread.
        drop(r.next());
        assert!(!a.is_done(), "not sealed yet: more cells may come");
        a.seal();
        assert!(a.is_done());
        assert_eq!(a.others(), vec![(1, Some(err)), (2, None)]);
        // Done: a wait returns at once.
        a.wait(Duration::ZERO, || {});
    }

    #[test]
    fn a_sleeping_waiter_is_woken_by_the_last_answer() {
        let (r, a) = Answer::new();
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || a.wait(Duration::ZERO, || {}))
        };
        std::thread::sleep(Duration::from_millis(50));
        r.resolve(Outcome::TimedOut);
        waiter.join().unwrap();
        assert_eq!(a.others(), vec![(0, Some(Outcome::TimedOut))]);
    }

    #[test]
    fn credits_are_taken_for_the_longest_prefix_that_fits() {
        let gate = CreditGate::new(4, 100);
        // The byte bound stops at the third (40 + 50 + 20 > 100).
        let taken = gate.acquire(1, [40u64, 50, 20, 1].into_iter(), None);
        assert_eq!(taken, Some((2, 2)));
        assert_eq!(gate.acquire(1, [20u64, 1, 1].into_iter(), None), None);
        gate.release_many(1, 2, 90);
        // Now the count bound: 4 per peer.
        let taken = gate.acquire(1, std::iter::repeat_n(1u64, 9), None);
        assert_eq!(taken, Some((4, 4)));
        // A message larger than the byte window goes alone.
        assert_eq!(gate.acquire(2, [500u64, 1].into_iter(), None), Some((1, 1)));
        // Nothing asked, nothing taken (and no wait).
        let deadline = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            gate.acquire(1, std::iter::empty(), Some(deadline)),
            Some((0, 4))
        );
    }
}
