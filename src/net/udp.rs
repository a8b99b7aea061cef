//! UDP sockets for discovery beacons and leader registrations (socket2).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use super::NetError;

/// A non-blocking UDP socket.
///
/// For node-local discovery every instance binds `0.0.0.0:port` with
/// `SO_REUSEADDR` and `SO_REUSEPORT`, so a datagram broadcast to the
/// node-local address (`127.255.255.255` by default) reaches all of them.
/// The coordinator binds its known `host:port` the same way.
#[derive(Debug)]
pub struct UdpEndpoint {
    socket: UdpSocket,
}

impl UdpEndpoint {
    /// Bind `addr` with address/port reuse and broadcast enabled.
    pub fn bind(addr: SocketAddrV4) -> Result<Self, NetError> {
        Self::bind_with(addr, true)
    }

    /// Bind `addr` for this process alone (no `SO_REUSEPORT`): the
    /// coordinator's port, where a second job must get an error rather
    /// than half of the registrations.
    pub fn bind_exclusive(addr: SocketAddrV4) -> Result<Self, NetError> {
        Self::bind_with(addr, false)
    }

    fn bind_with(addr: SocketAddrV4, shared: bool) -> Result<Self, NetError> {
        let err = |source| NetError::UdpBind {
            addr: addr.to_string(),
            source,
        };
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
        socket.set_reuse_address(shared).map_err(err)?;
        socket.set_reuse_port(shared).map_err(err)?;
        socket.set_broadcast(true).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        // Bursts of beacons from 100 instances must not overflow the queue.
        let _ = socket.set_recv_buffer_size(4 << 20);
        socket.bind(&SocketAddr::V4(addr).into()).map_err(err)?;
        Ok(Self {
            socket: socket.into(),
        })
    }

    /// The node-local discovery socket: `0.0.0.0:port`.
    pub fn discovery(port: u16) -> Result<Self, NetError> {
        Self::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    }

    /// The bound address (the actual port when bound to port 0).
    pub fn local_addr(&self) -> Option<SocketAddrV4> {
        match self.socket.local_addr() {
            Ok(SocketAddr::V4(a)) => Some(a),
            _ => None,
        }
    }

    /// Send one datagram without blocking; a full send buffer counts as loss
    /// and returns `Ok`.
    pub fn send_to(&self, bytes: &[u8], to: SocketAddrV4) -> Result<(), NetError> {
        match self.socket.send_to(bytes, to) {
            Ok(_) => Ok(()),
            // A full send buffer is loss, which every sender tolerates.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(source) => Err(NetError::UdpSend {
                addr: to.to_string(),
                source,
            }),
        }
    }

    /// One datagram if there is one; never blocks.
    pub fn try_recv<'b>(&self, buf: &'b mut [u8]) -> Result<Option<&'b [u8]>, NetError> {
        match self.socket.recv_from(buf) {
            Ok((n, _)) => Ok(Some(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(NetError::UdpRecv(e)),
        }
    }

    /// The file descriptor, for polling together with the ZeroMQ sockets.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_socket_on_the_port_hears_a_node_local_broadcast() {
        let a = UdpEndpoint::discovery(0).unwrap();
        let port = a.local_addr().unwrap().port();
        let b = UdpEndpoint::discovery(port).unwrap();
        let sender = UdpEndpoint::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        sender
            .send_to(
                b"hello",
                SocketAddrV4::new(Ipv4Addr::new(127, 255, 255, 255), port),
            )
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut got = [false, false];
        let mut buf = [0u8; 64];
        while got != [true, true] && std::time::Instant::now() < deadline {
            for (i, s) in [&a, &b].iter().enumerate() {
                if let Some(d) = s.try_recv(&mut buf).unwrap() {
                    assert_eq!(d, b"hello");
                    got[i] = true;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, [true, true]);
    }
}
