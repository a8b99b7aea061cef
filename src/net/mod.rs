//! `net`: drivers that move bytes for `proto`.
//!
//! Owns sockets: UDP for node-local broadcast and registrations
//! ([`udp::UdpEndpoint`]), ZeroMQ for everything between instances
//! ([`zmq_transport::ZmqTransport`]). Knows nothing of protocol state; it
//! sends what it is given and returns what arrives, as bytes.

pub mod udp;
pub mod zmq_transport;

use std::io;

/// Why a socket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A UDP socket could not be created or bound.
    #[error("cannot bind UDP {addr}: {source}")]
    UdpBind {
        /// The address asked for, `ip:port`.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// A datagram could not be sent (a full buffer is not an error: it is loss).
    #[error("UDP send to {addr} failed: {source}")]
    UdpSend {
        /// The destination, `ip:port`.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// Receiving a datagram failed for another reason than "nothing there".
    #[error("UDP receive failed: {0}")]
    UdpRecv(io::Error),
    /// A `host:port` did not resolve to an IPv4 address.
    #[error("cannot resolve address {addr}: {reason}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// A ZeroMQ call failed.
    #[error("ZeroMQ {op} on {endpoint}: {source}")]
    Zmq {
        /// The operation: `socket`, `setsockopt`, `bind`, `connect`, `send`, ….
        op: &'static str,
        /// The endpoint (or socket type) it was for.
        endpoint: String,
        /// The ZeroMQ error.
        source: zmq::Error,
    },
    /// Sending to a rank no sending socket was opened for.
    #[error("no sending socket to rank {0}")]
    NoRoute(u32),
    /// The peer's queue is at the high-water mark; the caller retries later.
    #[error("peer {0} cannot take more messages now (high-water mark)")]
    WouldBlock(u32),
}

/// Resolve `host:port` to one IPv4 socket address.
pub fn resolve_v4(addr: &str) -> Result<std::net::SocketAddrV4, NetError> {
    use std::net::{SocketAddr, ToSocketAddrs};
    let err = |reason: String| NetError::Resolve {
        addr: addr.to_string(),
        reason,
    };
    let candidates = addr.to_socket_addrs().map_err(|e| err(e.to_string()))?;
    candidates
        .filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| err("no IPv4 address".into()))
}
