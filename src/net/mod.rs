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
    #[error("cannot bind UDP {addr}: {source}")]
    UdpBind { addr: String, source: io::Error },
    #[error("UDP send to {addr} failed: {source}")]
    UdpSend { addr: String, source: io::Error },
    #[error("UDP receive failed: {0}")]
    UdpRecv(io::Error),
    #[error("cannot resolve address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("ZeroMQ {op} on {endpoint}: {source}")]
    Zmq {
        op: &'static str,
        endpoint: String,
        source: zmq::Error,
    },
    #[error("no sending socket to rank {0}")]
    NoRoute(u32),
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
