//! Reliable channel: SEND → ACK / ERR with retransmission and deduplication.

use serde::{Deserialize, Serialize};

/// Acknowledgements and errors from a receiver to a sender (coalesced).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    pub acked: Vec<(u64, u64)>,
}
