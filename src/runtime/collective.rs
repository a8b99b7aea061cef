//! Collectives over the reliable channel, hierarchical: member → node
//! leader → coordinator (the leader of node 0) and back, so the coordinator
//! handles one message per node, not one per instance.
//!
//! Every instance calls the same collectives in the same order (as with
//! MPI); each call gets the next sequence number. Contributions travel up
//! the tree, combined at every level, and the result travels down. A
//! deadline bounds every wait: a missing participant is named in the
//! error, never waited for forever.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use serde::{de::DeserializeOwned, Serialize};

use super::{Communicator, SendError};
use crate::proto::collective::{collective_tree, CollectiveTree};
use crate::proto::{wire, Rank};

/// Why a collective did not complete.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CollectiveError {
    /// A participant's contribution or the result did not arrive before the deadline.
    #[error("{op} #{seq} timed out after {waited:?} waiting for ranks {missing:?}")]
    Timeout {
        /// The collective: `barrier`, `broadcast`, `gather`, `all_reduce`, ….
        op: &'static str,
        /// The call's sequence number (every instance numbers its calls alike, from 1).
        seq: u64,
        /// How long the call waited.
        waited: Duration,
        /// Ranks this instance was waiting for (its children or parent in the tree).
        missing: Vec<Rank>,
    },
    /// The root is not a rank of the job.
    #[error("{op}: root {root} is not a rank of this job")]
    BadRoot {
        /// The collective.
        op: &'static str,
        /// The root asked for.
        root: Rank,
    },
    /// A peer's message for this call could not be decoded.
    #[error("{op} #{seq}: rank {from} sent a value that does not decode: {reason}")]
    Malformed {
        /// The collective.
        op: &'static str,
        /// The call's sequence number.
        seq: u64,
        /// The rank that sent it.
        from: Rank,
        /// The decoding error.
        reason: String,
    },
    /// A step could not be sent (typically: the communicator is shut down).
    #[error("{0}")]
    Send(#[from] SendError),
    /// The communicator's I/O thread stopped while the collective waited.
    #[error("{op} #{seq}: the communicator is shut down")]
    Closed {
        /// The operation (`"barrier"`, `"all_reduce"`, ...).
        op: &'static str,
        /// Its sequence number.
        seq: u64,
    },
}

const UP: u8 = 0;
const DOWN: u8 = 1;
const TO_ROOT: u8 = 2;

/// Messages of collectives that arrived before their call asked for them.
pub(crate) struct Mailbox {
    rx: Receiver<(Rank, u64, Bytes)>,
    state: Mutex<MailboxState>,
}

#[derive(Default)]
struct MailboxState {
    next_seq: u64,
    stash: HashMap<(u64, u8), BTreeMap<Rank, Bytes>>,
}

impl Mailbox {
    pub fn new(rx: Receiver<(Rank, u64, Bytes)>) -> Self {
        Self {
            rx,
            state: Mutex::new(MailboxState::default()),
        }
    }

    /// Move one arrived message into the stash; false at the deadline.
    fn receive(&self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok((sender, seq, payload)) => {
                if let Some(&phase) = payload.first() {
                    super::shared::lock(&self.state)
                        .stash
                        .entry((seq, phase))
                        .or_default()
                        .insert(sender, payload.slice(1..));
                }
                true
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => false,
        }
    }
}

/// One collective call in progress.
struct Call<'a> {
    comm: &'a Communicator,
    op: &'static str,
    seq: u64,
    deadline: Instant,
    timeout: Duration,
    tree: CollectiveTree,
}

impl Call<'_> {
    fn send(&self, to: Rank, phase: u8, body: &[u8]) -> Result<(), CollectiveError> {
        let mut payload = Vec::with_capacity(body.len() + 1);
        payload.push(phase);
        payload.extend_from_slice(body);
        // Delivery is confirmed by the answer travelling back through the
        // tree; the ticket itself is not needed.
        let _ticket = self
            .comm
            .send_collective(to, self.seq, Bytes::from(payload))?;
        Ok(())
    }

    /// Wait until every rank of `from` has sent `phase` for this call.
    fn wait(&self, phase: u8, from: &[Rank]) -> Result<BTreeMap<Rank, Bytes>, CollectiveError> {
        let mailbox = &self.comm.mailbox;
        loop {
            {
                let mut st = super::shared::lock(&mailbox.state);
                let have = st.stash.get(&(self.seq, phase));
                if from.iter().all(|r| have.is_some_and(|h| h.contains_key(r))) {
                    return Ok(st.stash.remove(&(self.seq, phase)).unwrap_or_default());
                }
            }
            if !mailbox.receive(self.deadline) {
                self.closed()?;
                let st = super::shared::lock(&mailbox.state);
                let have = st.stash.get(&(self.seq, phase));
                let missing = from
                    .iter()
                    .filter(|r| !have.is_some_and(|h| h.contains_key(r)))
                    .copied()
                    .collect();
                return Err(self.timeout(missing));
            }
        }
    }

    /// A wait that ended because the I/O thread is gone is not a timeout.
    fn closed(&self) -> Result<(), CollectiveError> {
        if self.comm.status().stopped {
            return Err(CollectiveError::Closed {
                op: self.op,
                seq: self.seq,
            });
        }
        Ok(())
    }

    fn timeout(&self, missing: Vec<Rank>) -> CollectiveError {
        CollectiveError::Timeout {
            op: self.op,
            seq: self.seq,
            waited: self.timeout,
            missing,
        }
    }

    /// Wait for `phase` from whoever sends it (the root of a gather hears
    /// from the coordinator, whose rank a member need not know).
    fn wait_any(&self, phase: u8) -> Result<(Rank, Bytes), CollectiveError> {
        let mailbox = &self.comm.mailbox;
        loop {
            if let Some(m) = super::shared::lock(&mailbox.state)
                .stash
                .remove(&(self.seq, phase))
            {
                if let Some(x) = m.into_iter().next() {
                    return Ok(x);
                }
            }
            if !mailbox.receive(self.deadline) {
                self.closed()?;
                return Err(self.timeout(self.tree.parent.into_iter().collect()));
            }
        }
    }

    /// Combine contributions up the tree; the root gets `Some(total)`.
    fn up(
        &self,
        mine: Bytes,
        combine: &dyn Fn(Vec<(Rank, Bytes)>) -> Result<Bytes, CollectiveError>,
    ) -> Result<Option<Bytes>, CollectiveError> {
        let got = self.wait(UP, &self.tree.children)?;
        let mut parts = vec![(self.comm.rank(), mine)];
        parts.extend(got);
        let total = if parts.len() == 1 {
            parts.pop().map(|p| p.1).unwrap_or_default()
        } else {
            combine(parts)?
        };
        match self.tree.parent {
            Some(p) => {
                self.send(p, UP, &total)?;
                Ok(None)
            }
            None => Ok(Some(total)),
        }
    }

    /// Spread the root's result down the tree; everybody returns it.
    fn down(&self, at_root: Option<Bytes>) -> Result<Bytes, CollectiveError> {
        let value = match (at_root, self.tree.parent) {
            (Some(v), _) => v,
            (None, Some(p)) => self.wait(DOWN, &[p])?.remove(&p).unwrap_or_default(),
            (None, None) => Bytes::new(),
        };
        for &c in &self.tree.children {
            self.send(c, DOWN, &value)?;
        }
        Ok(value)
    }
}

fn decode<T: DeserializeOwned>(
    op: &'static str,
    seq: u64,
    from: Rank,
    b: &[u8],
) -> Result<T, CollectiveError> {
    wire::decode_body(b).map_err(|e| CollectiveError::Malformed {
        op,
        seq,
        from,
        reason: e.to_string(),
    })
}

/// Values gathered so far, in rank order.
type Gathered = Vec<(Rank, Vec<u8>)>;

impl Communicator {
    fn tree(&self) -> CollectiveTree {
        let s = self.status();
        collective_tree(
            self.rank(),
            s.leader,
            s.members.iter().map(|m| m.rank),
            &s.node_leaders,
        )
    }

    fn call(&self, op: &'static str, timeout: Duration) -> Call<'_> {
        let seq = {
            let mut st = super::shared::lock(&self.mailbox.state);
            st.next_seq += 1;
            st.next_seq
        };
        Call {
            comm: self,
            op,
            seq,
            deadline: Instant::now() + timeout,
            timeout,
            tree: self.tree(),
        }
    }

    /// Everybody's `(rank, value)` at the root of the tree, in rank order.
    fn gather_up(
        &self,
        call: &Call<'_>,
        mine: Vec<u8>,
    ) -> Result<Option<Gathered>, CollectiveError> {
        let (op, seq) = (call.op, call.seq);
        let mine = Bytes::from(wire::encode_body(&vec![(self.rank(), mine)]));
        let total = call.up(mine, &|parts| {
            let mut all: Gathered = Vec::new();
            for (from, b) in parts {
                all.extend(decode::<Gathered>(op, seq, from, &b)?);
            }
            all.sort_by_key(|p| p.0);
            Ok(Bytes::from(wire::encode_body(&all)))
        })?;
        total
            .map(|t| decode::<Gathered>(op, seq, self.rank(), &t))
            .transpose()
    }

    /// Wait until every instance of the job has called `barrier`.
    pub fn barrier(&self, timeout: Duration) -> Result<(), CollectiveError> {
        let call = self.call("barrier", timeout);
        let root = call.up(Bytes::new(), &|_| Ok(Bytes::new()))?;
        call.down(root)?;
        Ok(())
    }

    /// `root`'s value, on every instance (others pass `None`).
    pub fn broadcast<T: Serialize + DeserializeOwned>(
        &self,
        root: Rank,
        value: Option<T>,
        timeout: Duration,
    ) -> Result<T, CollectiveError> {
        if root >= self.size() {
            return Err(CollectiveError::BadRoot {
                op: "broadcast",
                root,
            });
        }
        let call = self.call("broadcast", timeout);
        let mine = if self.rank() == root {
            value.map(|v| wire::encode_body(&v)).unwrap_or_default()
        } else {
            Vec::new()
        };
        // Only the root contributes; the tree carries its value up once.
        let (op, seq) = (call.op, call.seq);
        let mine = Bytes::from(wire::encode_body(&(self.rank() == root, mine)));
        let at_root = call.up(mine, &|parts| {
            for (from, b) in parts {
                let (is_root, v): (bool, Vec<u8>) = decode(op, seq, from, &b)?;
                if is_root {
                    return Ok(Bytes::from(wire::encode_body(&(true, v))));
                }
            }
            Ok(Bytes::from(wire::encode_body(&(false, Vec::<u8>::new()))))
        })?;
        let result = call.down(at_root)?;
        let (_, v): (bool, Vec<u8>) = decode(op, seq, root, &result)?;
        decode(op, seq, root, &v)
    }

    /// Everybody's value, in rank order, on `root` (`None` elsewhere).
    pub fn gather<T: Serialize + DeserializeOwned>(
        &self,
        root: Rank,
        value: &T,
        timeout: Duration,
    ) -> Result<Option<Vec<T>>, CollectiveError> {
        if root >= self.size() {
            return Err(CollectiveError::BadRoot { op: "gather", root });
        }
        let call = self.call("gather", timeout);
        let all = self.gather_up(&call, wire::encode_body(value))?;
        let all = match (all, call.tree.parent.is_none(), self.rank() == root) {
            (Some(all), true, true) => all,
            (Some(all), true, false) => {
                call.send(root, TO_ROOT, &wire::encode_body(&all))?;
                return Ok(None);
            }
            (_, _, true) => {
                // The coordinator forwards the result to the root.
                let (from, b) = call.wait_any(TO_ROOT)?;
                decode::<Gathered>(call.op, call.seq, from, &b)?
            }
            _ => return Ok(None),
        };
        all.iter()
            .map(|(r, b)| decode(call.op, call.seq, *r, b))
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }

    /// Everybody's value, in rank order, on every instance.
    pub fn all_gather<T: Serialize + DeserializeOwned>(
        &self,
        value: &T,
        timeout: Duration,
    ) -> Result<Vec<T>, CollectiveError> {
        let call = self.call("all_gather", timeout);
        let all = self.gather_up(&call, wire::encode_body(value))?;
        let all = call.down(all.map(|a| Bytes::from(wire::encode_body(&a))))?;
        let all: Gathered = decode(call.op, call.seq, self.rank(), &all)?;
        all.iter()
            .map(|(r, b)| decode(call.op, call.seq, *r, b))
            .collect()
    }

    /// `op` folded over everybody's value (at each level in rank order),
    /// on every instance. `op` must be associative; for a result that does
    /// not depend on the tree shape it must also be commutative.
    pub fn all_reduce<T, F>(&self, value: T, op: F, timeout: Duration) -> Result<T, CollectiveError>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(T, T) -> T,
    {
        let call = self.call("all_reduce", timeout);
        let (name, seq) = (call.op, call.seq);
        let mine = Bytes::from(wire::encode_body(&value));
        let at_root = call.up(mine, &|parts| {
            let mut acc: Option<T> = None;
            for (from, b) in parts {
                let v: T = decode(name, seq, from, &b)?;
                acc = Some(match acc {
                    None => v,
                    Some(a) => op(a, v),
                });
            }
            Ok(acc
                .map(|a| Bytes::from(wire::encode_body(&a)))
                .unwrap_or_default())
        })?;
        let result = call.down(at_root)?;
        decode(name, seq, self.rank(), &result)
    }

    /// Sum of everybody's value.
    pub fn all_reduce_sum<T>(&self, value: T, timeout: Duration) -> Result<T, CollectiveError>
    where
        T: Serialize + DeserializeOwned + std::ops::Add<Output = T>,
    {
        self.all_reduce(value, |a, b| a + b, timeout)
    }

    /// Minimum of everybody's value.
    pub fn all_reduce_min<T: Serialize + DeserializeOwned + PartialOrd>(
        &self,
        value: T,
        timeout: Duration,
    ) -> Result<T, CollectiveError> {
        self.all_reduce(value, |a, b| if b < a { b } else { a }, timeout)
    }

    /// Maximum of everybody's value.
    pub fn all_reduce_max<T: Serialize + DeserializeOwned + PartialOrd>(
        &self,
        value: T,
        timeout: Duration,
    ) -> Result<T, CollectiveError> {
        self.all_reduce(value, |a, b| if b > a { b } else { a }, timeout)
    }
}
