//! `proto`: the sans-IO state machines of cellnet.
//!
//! Owns the protocol logic: the local discovery handshake, leader election,
//! the global join, the reliable channel and frame assembly. It must not
//! touch sockets, threads or the clock: time comes in as an argument (`now`,
//! a [`Duration`] since an epoch chosen by the driver) and output is polled
//! (`poll_transmit`, `poll_event`, `poll_timeout`). That makes every state
//! machine testable with plain values and drivable by the simulator.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod backoff;
pub mod collective;
pub mod discovery;
pub mod frames;
pub mod global;
pub mod liveness;
pub mod reliable;
pub(crate) mod ring;
pub mod wire;

/// Global index of an instance in the job (MPI world rank / Slurm task id).
pub type Rank = u32;

/// Time since the driver's epoch. The driver decides what the epoch is
/// (process start for the runtime, zero for the simulator).
pub type Now = Duration;

/// Distinguishes two lives of the same rank: a restarted instance comes back
/// with a larger incarnation, and peers reset their state for it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Incarnation(pub u64);

/// Separates jobs that share a node (and a discovery port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobKey(pub u64);

/// Where an instance's receiving socket (ZeroMQ ROUTER) can be reached.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoints {
    /// `ipc://…`, usable by instances on the same node.
    pub ipc: Option<String>,
    /// `tcp://ip:port`, usable from anywhere in the job.
    pub tcp: String,
}

impl Endpoints {
    /// The endpoint a peer should connect to: `ipc` when on the same node.
    pub fn for_peer(&self, same_node: bool) -> &str {
        match (&self.ipc, same_node) {
            (Some(ipc), true) => ipc,
            _ => &self.tcp,
        }
    }
}

/// What an instance says about itself in discovery messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Global rank of the instance.
    pub rank: Rank,
    /// Index of its node in the job (same for all instances of a node).
    pub node_index: u32,
    /// Which life of `rank` this is; larger after a restart.
    pub incarnation: Incarnation,
    /// Where its receiving socket can be reached.
    pub endpoints: Endpoints,
}
