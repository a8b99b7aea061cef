//! ZeroMQ sockets: one ROUTER per instance (its *receiving socket*) and one
//! DEALER per peer it sends to (its *sending sockets*).
//!
//! Nothing here drops silently: the ROUTER is `ROUTER_MANDATORY` (a reply
//! to a vanished peer is an error, not a void), high-water marks are set far
//! above the credit window, and a full queue is reported as
//! [`NetError::WouldBlock`] so the reliable channel retries.
//!
//! Payloads of [`ZERO_COPY_MIN`] bytes or more are not copied on either
//! side: a sent payload is lent to ZeroMQ (which drops its reference once
//! the bytes are written to the socket), and a received one keeps the
//! buffer of its ZeroMQ message. Smaller ones are copied, which is cheaper
//! than the bookkeeping.

use std::os::raw::c_void;

// Keys are ranks: a fast hash is safe (the map is looked up per message).
use rustc_hash::FxHashMap as HashMap;

use bytes::Bytes;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::NetError;
use crate::proto::{Endpoints, Incarnation, Rank};

/// High-water mark for every socket, in messages: far above any credit
/// window, so it is only reached when a peer stopped reading.
const HWM: i32 = 1_000_000;
/// Kernel socket buffers (SO_SNDBUF/SO_RCVBUF) of every connection: a
/// 1 MiB cell goes out in a few writes rather than many.
const SOCKET_BUFFER: i32 = 4 << 20;
/// How long closing a socket may wait for queued messages. Delivery rests on
/// acknowledgements, never on linger, so this only has to be short.
const LINGER_MS: i32 = 200;

/// Payloads at least this large travel without a copy into or out of
/// ZeroMQ (smaller ones are cheaper to copy).
pub const ZERO_COPY_MIN: usize = 8 * 1024;

/// A message received on one of the sockets.
#[derive(Debug)]
pub enum Inbound {
    /// On the receiving socket; `routing_id` addresses a reply to the sender.
    Router {
        /// ZeroMQ identity of the sender's connection, for [`ZmqTransport::reply`].
        routing_id: Vec<u8>,
        /// The message parts after the routing id.
        frames: Vec<Bytes>,
    },
    /// On the sending socket to `rank` (a reply from that peer).
    Dealer {
        /// The peer the sending socket goes to.
        rank: Rank,
        /// The message parts.
        frames: Vec<Bytes>,
    },
}

struct Dealer {
    socket: zmq::Socket,
    incarnation: Incarnation,
}

/// The instance's ZeroMQ sockets.
pub struct ZmqTransport {
    ctx: zmq::Context,
    router: zmq::Socket,
    endpoints: Endpoints,
    ipc_path: Option<PathBuf>,
    dealers: HashMap<Rank, Dealer>,
    /// Changes whenever a socket is opened or closed (the set of
    /// [`Self::signal_fds`] changed).
    generation: u64,
    /// Sockets sent on since the last [`Self::settle`]: `None` is the
    /// receiving socket.
    touched: Vec<Option<Rank>>,
    /// [`Self::drain`] stopped at its budget with messages left.
    input_left: bool,
    /// Sockets [`Self::settle`] found readable (their signal taken in).
    must_read: Vec<Option<Rank>>,
    /// Every socket, and its signal fd (-1: none) at the same index, for
    /// [`Self::drain`]; rebuilt when `generation` moves past
    /// `scan_generation`.
    scan: Vec<Option<Rank>>,
    scan_fds: Vec<libc::pollfd>,
    scan_generation: Option<u64>,
}

fn zerr<'a>(op: &'static str, endpoint: &'a str) -> impl FnOnce(zmq::Error) -> NetError + 'a {
    move |source| NetError::Zmq {
        op,
        endpoint: endpoint.to_string(),
        source,
    }
}

impl ZmqTransport {
    /// Bind the receiving socket on `tcp://bind_ip:*` and, if `ipc_dir` is
    /// given, on `ipc://<ipc_dir>/<name>.sock` too.
    pub fn bind(bind_ip: IpAddr, ipc_dir: Option<&Path>, name: &str) -> Result<Self, NetError> {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).map_err(zerr("socket", "ROUTER"))?;
        let tcp_wanted = format!("tcp://{bind_ip}:*");
        router
            .set_router_mandatory(true)
            .map_err(zerr("setsockopt", &tcp_wanted))?;
        set_limits(&router).map_err(zerr("setsockopt", &tcp_wanted))?;
        router
            .bind(&tcp_wanted)
            .map_err(zerr("bind", &tcp_wanted))?;
        let tcp = match router.get_last_endpoint() {
            Ok(Ok(e)) => e,
            Ok(Err(_)) | Err(_) => {
                return Err(NetError::Zmq {
                    op: "get_last_endpoint",
                    endpoint: tcp_wanted,
                    source: zmq::Error::EINVAL,
                })
            }
        };
        let (ipc, ipc_path) = match ipc_dir {
            Some(dir) => {
                let path = dir.join(format!("{name}.sock"));
                let endpoint = format!("ipc://{}", path.display());
                let _ = std::fs::remove_file(&path);
                router.bind(&endpoint).map_err(zerr("bind", &endpoint))?;
                (Some(endpoint), Some(path))
            }
            None => (None, None),
        };
        Ok(Self {
            ctx,
            router,
            endpoints: Endpoints { ipc, tcp },
            ipc_path,
            dealers: HashMap::default(),
            generation: 0,
            touched: Vec::new(),
            input_left: false,
            must_read: Vec::new(),
            scan: Vec::new(),
            scan_fds: Vec::new(),
            scan_generation: None,
        })
    }

    /// Where this instance receives (the actual TCP port, and the IPC path if bound).
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The context, for sockets outside this transport (tests, tools).
    pub fn context(&self) -> &zmq::Context {
        &self.ctx
    }

    /// Whether a sending socket to `rank` is open.
    pub fn has_route(&self, rank: Rank) -> bool {
        self.dealers.contains_key(&rank)
    }

    /// Make sure a sending socket to `rank` (incarnation `inc`) exists and
    /// is connected to `endpoint`; a new incarnation gets a new socket.
    pub fn connect(
        &mut self,
        rank: Rank,
        inc: Incarnation,
        endpoint: &str,
    ) -> Result<(), NetError> {
        if let Some(d) = self.dealers.get(&rank) {
            if d.incarnation >= inc {
                return Ok(());
            }
        }
        let socket = self
            .ctx
            .socket(zmq::DEALER)
            .map_err(zerr("socket", endpoint))?;
        set_limits(&socket)
            .and_then(|()| socket.set_reconnect_ivl(20))
            .and_then(|()| socket.set_reconnect_ivl_max(500))
            .map_err(zerr("setsockopt", endpoint))?;
        socket
            .connect(endpoint)
            .map_err(zerr("connect", endpoint))?;
        self.dealers.insert(
            rank,
            Dealer {
                socket,
                incarnation: inc,
            },
        );
        self.generation += 1;
        Ok(())
    }

    /// Ranks this instance has a sending socket to.
    pub fn routes(&self) -> Vec<Rank> {
        self.dealers.keys().copied().collect()
    }

    /// Close the sending socket to `rank` (peer gone or no longer needed).
    pub fn disconnect(&mut self, rank: Rank) {
        if self.dealers.remove(&rank).is_some() {
            self.generation += 1;
        }
    }

    /// Changes whenever a socket is opened or closed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Send a multipart message to `rank` through its sending socket.
    pub fn send(&mut self, rank: Rank, frames: &[&[u8]]) -> Result<(), NetError> {
        self.on_dealer(rank, |socket| send_parts(socket, frames))
    }

    /// Send the message `head` + `body` to `rank` through its sending
    /// socket, as one frame when the two are under 8 KiB together.
    pub fn send_pair(&mut self, rank: Rank, head: &[u8], body: &[u8]) -> Result<(), NetError> {
        self.on_dealer(rank, |socket| send_pair(socket, head, body, zmq::DONTWAIT))
    }

    /// Run `send` on `rank`'s sending socket (marking it sent on, for
    /// [`Self::settle`]); a full queue is [`NetError::WouldBlock`].
    fn on_dealer(
        &mut self,
        rank: Rank,
        send: impl FnOnce(&mut zmq::Socket) -> Result<(), zmq::Error>,
    ) -> Result<(), NetError> {
        let dealer = self.dealers.get_mut(&rank).ok_or(NetError::NoRoute(rank))?;
        let sent = send(&mut dealer.socket);
        self.touch(Some(rank));
        sent.map_err(|e| match e {
            zmq::Error::EAGAIN => NetError::WouldBlock(rank),
            source => NetError::Zmq {
                op: "send",
                endpoint: format!("rank {rank}"),
                source,
            },
        })
    }

    /// Reply `head` + `body` on the receiving socket to whoever has
    /// `routing_id`, as one frame when it is small.
    pub fn reply_pair(
        &mut self,
        routing_id: &[u8],
        head: &[u8],
        body: &[u8],
    ) -> Result<(), NetError> {
        self.touch(None);
        self.router
            .send(routing_id, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| send_pair(&self.router, head, body, zmq::DONTWAIT))
            .map_err(|source| NetError::Zmq {
                op: "reply",
                endpoint: "ROUTER".into(),
                source,
            })
    }

    /// Send `head` + `payload` to `rank` through its sending socket; a
    /// large payload is lent to ZeroMQ, not copied (a small one travels in
    /// one frame with its header).
    pub fn send_data(&mut self, rank: Rank, head: &[u8], payload: &Bytes) -> Result<(), NetError> {
        if payload.len() < ZERO_COPY_MIN {
            return self.send_pair(rank, head, payload);
        }
        self.on_dealer(rank, |socket| {
            socket.send(head, zmq::SNDMORE | zmq::DONTWAIT)?;
            lend_bytes(socket, payload, zmq::DONTWAIT)
        })
    }

    /// Reply on the receiving socket to whoever has `routing_id`.
    pub fn reply(&mut self, routing_id: &[u8], frames: &[&[u8]]) -> Result<(), NetError> {
        self.touch(None);
        let res = self
            .router
            .send(routing_id, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| send_parts(&self.router, frames));
        res.map_err(|source| NetError::Zmq {
            op: "reply",
            endpoint: "ROUTER".into(),
            source,
        })
    }

    /// The file descriptors ZeroMQ signals its sockets' activity on (they
    /// become readable when a message arrives at a socket that was read
    /// until empty; see `ZMQ_FD`).
    pub fn signal_fds(&self) -> Vec<RawFd> {
        std::iter::once(&self.router)
            .chain(self.dealers.values().map(|d| &d.socket))
            .filter_map(|s| s.get_fd().ok())
            .collect()
    }

    fn touch(&mut self, which: Option<Rank>) {
        if self.touched.last() != Some(&which) {
            self.touched.push(which);
        }
    }

    fn socket(&self, which: Option<Rank>) -> Option<&zmq::Socket> {
        match which {
            None => Some(&self.router),
            Some(rank) => self.dealers.get(&rank).map(|d| &d.socket),
        }
    }

    /// Whether a message waits that no signal fd will announce: on a
    /// socket sent on since the last call (a send may take in the signal of
    /// an arrival, so its fd stays quiet), or left by a [`Self::drain`]
    /// that hit its budget. When this is false, every socket was read
    /// until empty or its fd becomes readable on the next arrival: a thread
    /// may sleep in `poll(2)` on [`Self::signal_fds`].
    pub fn settle(&mut self) -> Result<bool, NetError> {
        let mut pending = std::mem::take(&mut self.input_left);
        self.touched.sort_unstable();
        self.touched.dedup();
        for which in std::mem::take(&mut self.touched) {
            let Some(socket) = self.socket(which) else {
                continue;
            };
            let events = socket.get_events().map_err(|source| NetError::Zmq {
                op: "getsockopt(ZMQ_EVENTS)",
                endpoint: which.map_or("ROUTER".into(), |r| format!("rank {r}")),
                source,
            })?;
            if events.contains(zmq::POLLIN) {
                pending = true;
                self.must_read.push(which);
            }
        }
        Ok(pending)
    }

    /// Everything that is waiting on any socket, up to `budget` messages
    /// (each socket is read until empty, unless the budget ends first).
    ///
    /// Only sockets that may hold messages are read (reading an empty one
    /// costs a system call): those whose signal fd is readable, those sent
    /// on or found readable by [`Self::settle`] since, and all of them after
    /// a drain that hit its budget.
    pub fn drain(&mut self, budget: usize, out: &mut Vec<Inbound>) -> Result<(), NetError> {
        let start = out.len();
        if self.scan_generation != Some(self.generation) {
            self.scan = std::iter::once(None)
                .chain(self.dealers.keys().map(|&r| Some(r)))
                .collect();
            self.scan_fds = self
                .scan
                .iter()
                .map(|&which| libc::pollfd {
                    fd: self
                        .socket(which)
                        .and_then(|s| s.get_fd().ok())
                        .unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            self.scan_generation = Some(self.generation);
        }
        let fds = &mut self.scan_fds;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs; a
        // zero timeout never blocks.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        let read_all = std::mem::take(&mut self.input_left) || n < 0;
        let must_read = std::mem::take(&mut self.must_read);
        for (which, pfd) in self.scan.iter().zip(&self.scan_fds) {
            let may_hold = read_all
                // Without a signal fd: read it anyway.
                || pfd.fd < 0
                || pfd.revents != 0
                || must_read.contains(which)
                || self.touched.contains(which);
            if may_hold {
                self.read_socket(*which, start + budget, out)?;
            }
        }
        self.input_left = out.len() - start >= budget;
        Ok(())
    }

    /// Read `which` until it is empty or `out` holds `limit` messages.
    fn read_socket(
        &self,
        which: Option<Rank>,
        limit: usize,
        out: &mut Vec<Inbound>,
    ) -> Result<(), NetError> {
        let Some(socket) = self.socket(which) else {
            return Ok(());
        };
        while out.len() < limit {
            match (recv_frames(socket), which) {
                (Ok(mut frames), None) if !frames.is_empty() => {
                    let routing_id = frames.remove(0).to_vec();
                    out.push(Inbound::Router { routing_id, frames });
                }
                (Ok(_), None) => {}
                (Ok(frames), Some(rank)) => out.push(Inbound::Dealer { rank, frames }),
                (Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR), _) => break,
                (Err(source), None) => {
                    return Err(NetError::Zmq {
                        op: "recv",
                        endpoint: "ROUTER".into(),
                        source,
                    })
                }
                // A sending socket that fails is closed or replaced by the
                // driver; nothing more to read from it now.
                (Err(_), Some(_)) => break,
            }
        }
        Ok(())
    }
}

/// Messages whose header and body together are smaller than this travel
/// as one ZeroMQ frame (the receiver splits it at
/// [`crate::proto::wire::HEADER_LEN`]): one allocation, one queue slot and
/// one copy out instead of two of each.
const JOIN_MAX: usize = ZERO_COPY_MIN;

/// Send `head` and `body` as one message: one frame if small, else two.
fn send_pair(socket: &zmq::Socket, head: &[u8], body: &[u8], flags: i32) -> Result<(), zmq::Error> {
    if head.len() + body.len() > JOIN_MAX {
        socket.send(head, zmq::SNDMORE | flags)?;
        return socket.send(body, flags);
    }
    let mut msg = zmq::Message::with_size(head.len() + body.len());
    msg[..head.len()].copy_from_slice(head);
    msg[head.len()..].copy_from_slice(body);
    socket.send(msg, flags)
}

fn send_parts(socket: &zmq::Socket, frames: &[&[u8]]) -> Result<(), zmq::Error> {
    let last = frames.len().saturating_sub(1);
    for (i, f) in frames.iter().enumerate() {
        let more = if i < last { zmq::SNDMORE } else { 0 };
        socket.send(*f, more | zmq::DONTWAIT)?;
    }
    Ok(())
}

/// Options every socket gets: high-water marks, a short linger and large
/// kernel buffers.
fn set_limits(socket: &zmq::Socket) -> Result<(), zmq::Error> {
    socket.set_sndhwm(HWM)?;
    socket.set_rcvhwm(HWM)?;
    socket.set_linger(LINGER_MS)?;
    socket.set_sndbuf(SOCKET_BUFFER)?;
    socket.set_rcvbuf(SOCKET_BUFFER)
}

/// The ZeroMQ message struct, aligned as libzmq declares it (the binding's
/// byte array is not).
#[repr(C, align(8))]
struct RawMsg(zmq_sys::zmq_msg_t);

/// ZeroMQ is done with a lent payload: drop our reference to it.
unsafe extern "C" fn release_lent(_data: *mut c_void, hint: *mut c_void) {
    // SAFETY: `hint` is the `Box<Bytes>` leaked by `lend_bytes` for this
    // message; ZeroMQ calls this exactly once, when the message is freed.
    drop(unsafe { Box::from_raw(hint as *mut Bytes) });
}

/// Send `payload` as one frame lent to ZeroMQ (a reference is kept alive
/// until ZeroMQ has written it); for payloads of at least
/// [`ZERO_COPY_MIN`] bytes, below which a copy is cheaper.
fn lend_bytes(socket: &mut zmq::Socket, payload: &Bytes, flags: i32) -> Result<(), zmq::Error> {
    let lent = Box::into_raw(Box::new(payload.clone()));
    let mut msg = RawMsg(zmq_sys::zmq_msg_t::default());
    // SAFETY: the data pointer and length describe the bytes owned by the
    // leaked `Bytes`, which stay valid and unmodified (Bytes is immutable)
    // until `release_lent` drops it. `msg` is initialised before it is
    // sent, and closed (which calls `release_lent`) if the send fails; on
    // success ZeroMQ owns it.
    unsafe {
        let rc = zmq_sys::zmq_msg_init_data(
            &mut msg.0,
            (*lent).as_ptr() as *mut c_void,
            (*lent).len(),
            Some(release_lent),
            lent as *mut c_void,
        );
        if rc == -1 {
            drop(Box::from_raw(lent));
            return Err(zmq::Error::from_raw(zmq_sys::zmq_errno()));
        }
        if zmq_sys::zmq_msg_send(&mut msg.0, socket.as_mut_ptr(), flags) == -1 {
            let e = zmq::Error::from_raw(zmq_sys::zmq_errno());
            zmq_sys::zmq_msg_close(&mut msg.0);
            return Err(e);
        }
    }
    Ok(())
}

/// A received ZeroMQ message as the owner of a `Bytes`.
struct Received(zmq::Message);

impl AsRef<[u8]> for Received {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Every part of the next message on `socket` (empty: none waiting). Large
/// parts keep their ZeroMQ buffer; small ones are copied out.
fn recv_frames(socket: &zmq::Socket) -> Result<Vec<Bytes>, zmq::Error> {
    let mut frames = Vec::with_capacity(3);
    loop {
        let msg = match socket.recv_msg(zmq::DONTWAIT) {
            Ok(m) => m,
            // Nothing waiting (parts of one message arrive together).
            Err(zmq::Error::EAGAIN) if frames.is_empty() => return Err(zmq::Error::EAGAIN),
            Err(e) => return Err(e),
        };
        let more = msg.get_more();
        frames.push(if msg.len() >= ZERO_COPY_MIN {
            Bytes::from_owner(Received(msg))
        } else {
            Bytes::copy_from_slice(&msg)
        });
        if !more {
            return Ok(frames);
        }
    }
}

impl Drop for ZmqTransport {
    fn drop(&mut self) {
        if let Some(path) = &self.ipc_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn recv_one(t: &mut ZmqTransport) -> Inbound {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = Vec::new();
        while out.is_empty() {
            assert!(Instant::now() < deadline, "nothing arrived");
            std::thread::sleep(Duration::from_millis(1));
            t.drain(16, &mut out).unwrap();
        }
        out.remove(0)
    }

    #[test]
    fn dealer_to_router_and_reply_over_ipc_and_tcp() {
        let dir = std::env::temp_dir();
        let mut a = ZmqTransport::bind(
            "127.0.0.1".parse().unwrap(),
            Some(&dir),
            &format!("cellnet-test-a-{}", std::process::id()),
        )
        .unwrap();
        let mut b = ZmqTransport::bind("127.0.0.1".parse().unwrap(), None, "b").unwrap();
        assert!(a.endpoints().tcp.starts_with("tcp://127.0.0.1:"));
        for endpoint in [
            a.endpoints().ipc.clone().unwrap(),
            a.endpoints().tcp.clone(),
        ] {
            b.disconnect(0);
            b.connect(0, Incarnation(1), &endpoint).unwrap();
            b.send(0, &[b"hello", b"world"]).unwrap();
            let Inbound::Router { routing_id, frames } = recv_one(&mut a) else {
                panic!("expected a router message")
            };
            assert_eq!(frames, vec![&b"hello"[..], &b"world"[..]]);
            a.reply(&routing_id, &[b"ack"]).unwrap();
            let Inbound::Dealer { rank, frames } = recv_one(&mut b) else {
                panic!("expected a dealer message")
            };
            assert_eq!(rank, 0);
            assert_eq!(frames, vec![&b"ack"[..]]);
        }
        // A small header and body travel as one frame.
        b.send_pair(0, b"head", b"body").unwrap();
        let Inbound::Router { frames, .. } = recv_one(&mut a) else {
            panic!("expected a router message")
        };
        assert_eq!(frames, vec![&b"headbody"[..]]);
        // Large payloads are lent to ZeroMQ and received without a copy:
        // the bytes arrive intact, also after the sender dropped its copy.
        let big: Bytes = (0..ZERO_COPY_MIN * 3).map(|i| (i % 251) as u8).collect();
        b.send_data(0, b"head", &big.clone()).unwrap();
        let sent = big.clone();
        drop(big);
        let Inbound::Router { frames, .. } = recv_one(&mut a) else {
            panic!("expected a router message")
        };
        assert_eq!(frames, vec![Bytes::from_static(b"head"), sent]);
        // A reply waiting on a socket sent on since is reported by settle
        // (its signal may have been taken in by the send); once read, the
        // sockets are settled.
        b.send(0, &[b"ping"]).unwrap();
        let Inbound::Router { routing_id, .. } = recv_one(&mut a) else {
            panic!("expected a router message")
        };
        assert!(!a.settle().unwrap(), "nothing more came to the router");
        a.reply(&routing_id, &[b"pong"]).unwrap();
        b.send(0, &[b"again"]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !b.settle().unwrap() {
            assert!(Instant::now() < deadline, "settle never saw the reply");
            b.send(0, &[b"again"]).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        b.drain(16, &mut out).unwrap();
        assert!(matches!(&out[0], Inbound::Dealer { rank: 0, frames } if frames[0] == b"pong"[..]));
        assert!(
            !b.settle().unwrap(),
            "read until empty and not sent on since"
        );
        // A reply to a routing id nobody has is an error, not a silent drop.
        assert!(a.reply(b"nobody", &[b"x"]).is_err());
        assert!(matches!(b.send(9, &[b"x"]), Err(NetError::NoRoute(9))));
    }
}
