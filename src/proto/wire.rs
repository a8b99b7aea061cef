//! Wire formats: what travels in UDP datagrams and in ZeroMQ frames.
//!
//! Everything that comes off the network is decoded here into typed values or
//! a [`WireError`]; nothing in this module panics on input. Datagrams carry a
//! job key and an HMAC-SHA256 tag over the whole datagram, so beacons from
//! another job, or from anyone without the job's secret, are dropped (and
//! counted by the caller). Without `CELLNET_SECRET` the secret is derived
//! from the job key, which travels in the clear: that separates jobs but
//! does not stop a deliberate forger on the node — set a secret for that.
//!
//! ZeroMQ messages are multipart: a fixed little-endian [`Header`] frame,
//! then, for control messages, a bincode body, or, for cells, the user's
//! payload as its own frame (never copied into a bigger buffer). Small data
//! messages (a few KiB) that go to the same peer in the same round of the
//! I/O thread travel together as one [`MsgKind::Batch`]: their entries are
//! copied into one body (ZeroMQ would have copied each anyway), and the
//! receiver hands out slices of it, so one ZeroMQ message carries many
//! cells.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;

use super::{reliable::Feedback, Incarnation, JobKey, PeerInfo, Rank};

type HmacSha256 = Hmac<Sha256>;

const DATAGRAM_MAGIC: &[u8; 4] = b"CNET";
const HEADER_MAGIC: u16 = 0xCE11;
/// Protocol version; bumped on any incompatible change of these formats.
pub const VERSION: u8 = 1;
const TAG_LEN: usize = 32;
/// Largest datagram cellnet sends or accepts (fits one UDP datagram).
pub const MAX_DATAGRAM: usize = 65_000;
/// Largest control body accepted from a ZeroMQ peer.
pub const MAX_CONTROL: usize = 64 << 20;

/// Why bytes from the network were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the fixed part of the format (or a header of the wrong length).
    #[error("message too short: {len} bytes")]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// Larger than the format allows.
    #[error("message too large: {len} bytes (limit {limit})")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// The largest size accepted ([`MAX_DATAGRAM`] or [`MAX_CONTROL`]).
        limit: usize,
    },
    /// The magic bytes are not cellnet's.
    #[error("not a cellnet message (bad magic)")]
    BadMagic,
    /// A cellnet message of another protocol [`VERSION`] (the one received).
    #[error("protocol version {0} is not supported (this build speaks {VERSION})")]
    BadVersion(u8),
    /// A datagram carrying another job's key (the key received).
    #[error("message from another job (key {0:#x})")]
    ForeignJob(u64),
    /// The HMAC tag does not verify: another job's secret, or tampering.
    #[error("authentication tag does not match (wrong job secret or forged)")]
    BadTag,
    /// A header whose message kind byte is not a [`MsgKind`] (the byte received).
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A ZeroMQ message without exactly two frames (the count received).
    #[error("wrong number of frames: {0}")]
    FrameCount(usize),
    /// A body that bincode cannot decode, or with trailing bytes (the reason).
    #[error("malformed body: {0}")]
    Malformed(String),
}

/// The secret that authenticates datagrams of one job.
#[derive(Clone)]
pub struct JobSecret(Vec<u8>);

impl JobSecret {
    /// A secret from raw key bytes (any length).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }
    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length.
        HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobSecret(..)")
    }
}

/// A discovery beacon, broadcast on the node-local address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Who sends the beacon and where it receives.
    pub info: PeerInfo,
    /// How many instances the sender expects on its node (itself included).
    pub local_size: u32,
}

/// A node leader's registration with the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Index of the leader's node in the job.
    pub node_index: u32,
    /// Name of the node (Slurm node name, MPI processor name or hostname).
    pub node_name: String,
    /// The node leader that registers (it is also in `members`).
    pub leader: PeerInfo,
    /// Every instance of the node, the leader included, sorted by rank.
    pub members: Vec<PeerInfo>,
    /// Ranks of the node declared dead (not in `members`). Before the
    /// first global ready the coordinator counts them towards the job's
    /// size, so a death during start-up does not leave it waiting.
    pub lost: Vec<Rank>,
    /// The newest directory epoch this leader has seen (0: none), so a
    /// coordinator that takes over numbers its directories after it.
    pub epoch: u64,
}

/// What travels over UDP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Datagram {
    /// A discovery beacon on the node.
    Ping(Ping),
    /// A node leader's registration, sent to the coordinator.
    Register(Register),
}

/// One node as the coordinator knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Index of the node in the job.
    pub node_index: u32,
    /// Name of the node (Slurm node name, MPI processor name or hostname).
    pub node_name: String,
    /// The node's leader, which answers [`Control::Resolve`] for its members.
    pub leader: PeerInfo,
    /// Every instance of the node, the leader included, sorted by rank.
    pub members: Vec<PeerInfo>,
}

/// Control messages between instances over ZeroMQ (bincode body).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// Discovery: "here I am, this is where I receive".
    Pong(PeerInfo),
    /// Discovery: "I received from you, your sending path to me works".
    Ready,
    /// Discovery, from a node-mate that completed to one still pinging,
    /// and from a leader to its members when it declared one dead
    /// (members do not watch each other): the node's live members, and
    /// those declared dead since start (a node-mate that died while we
    /// handshook with it must not keep us incomplete for ever).
    Members {
        /// Live instances of the node, the sender included.
        members: Vec<PeerInfo>,
        /// Instances of the node declared dead, with the life that died.
        removed: Vec<(Rank, Incarnation)>,
        /// The sender's membership version (grows with every announcement).
        version: u64,
    },
    /// Discovery: `Members` of this version applied (a leader repeats its
    /// announcement to each member until it has this).
    MembersAck {
        /// The version applied.
        version: u64,
    },
    /// Coordinator → leader: registration seen, waiting for `expected_nodes`.
    Welcome {
        /// How many nodes have registered so far.
        registered: u32,
        /// How many nodes the coordinator waits for.
        expected_nodes: u32,
    },
    /// Coordinator → leaders, leader → members: every node is in. Leaders
    /// get the whole directory; members get it empty and resolve lazily.
    GlobalReady {
        /// Number of nodes in the job.
        nodes: u32,
        /// Number of instances in the job (ranks are `0..size`).
        size: u32,
        /// Every node with its members; empty in leader → member messages.
        directory: Vec<NodeEntry>,
        /// Grows with every change of the directory: a delayed or
        /// duplicated older announcement is recognised and ignored.
        epoch: u64,
    },
    /// Member → leader: "is the job globally ready?" (repeated until answered).
    AwaitGlobal,
    /// Member → leader: resolve where these instances receive.
    Resolve {
        /// The ranks whose [`PeerInfo`] the member needs.
        ranks: Vec<Rank>,
    },
    /// Leader → member: the answer to [`Control::Resolve`] (unknown ranks omitted).
    Resolved {
        /// The known ones among the asked ranks.
        peers: Vec<PeerInfo>,
    },
    /// Reliable channel acknowledgements and errors.
    Feedback(Feedback),
    /// Receiver → laggard: "I have not heard all of `frame` from you".
    FrameQuery {
        /// The frame the receiver is still waiting on.
        frame: u64,
    },
    /// "I am shutting down cleanly; everything I sent is answered."
    Goodbye,
    /// "Still here" to a watched peer we have sent nothing to lately.
    Heartbeat,
    /// Laggard → receiver: whether it has ended `frame` towards the asker
    /// (it resends everything unanswered at the same time).
    FrameReport {
        /// The frame asked about in [`Control::FrameQuery`].
        frame: u64,
        /// Whether the laggard has sent its frame end for `frame` to the asker.
        ended: bool,
    },
}

/// What a data message carries besides its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataKind {
    /// A cell of `frame`; the payload is the user's bytes.
    Cell,
    /// The sender's part of `frame` is over; it sent `count` cells of it.
    FrameEnd {
        /// Cells of this frame the sender sent to this receiver.
        count: u32,
    },
    /// A step of a collective operation (`frame` holds its sequence number);
    /// never handed to the cell handler or to frame assembly.
    Collective,
}

/// A reliable data message: a cell or a frame-end marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataMsg {
    /// Per (sender, receiver) sequence number, from 1.
    pub id: u64,
    /// The frame this message belongs to (collectives: the operation's sequence number).
    pub frame: u64,
    /// What the message is; decides who consumes it.
    pub kind: DataKind,
    /// The user's bytes for a cell; empty for a frame end.
    pub payload: Bytes,
}

/// The fixed first frame of every ZeroMQ message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the rest of the message is.
    pub kind: MsgKind,
    /// Rank of the sender.
    pub from: Rank,
    /// The sender's incarnation.
    pub incarnation: Incarnation,
    /// Per (sender, receiver) sequence number of a data message, from 1; 0 for control.
    pub id: u64,
    /// Frame (or collective sequence number) of a data message; 0 for control.
    pub frame: u64,
    /// Kind-specific: the cell count of a frame end, otherwise 0.
    pub aux: u32,
    /// The receiver's incarnation as the sender knows it (0: unknown). A
    /// receiver drops data meant for an earlier life of itself.
    pub to_incarnation: Incarnation,
}

/// The message kind byte of a [`Header`] (values are on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgKind {
    /// A bincode [`Control`] body follows.
    Control = 1,
    /// A cell's payload follows.
    Cell = 2,
    /// A frame-end marker; `aux` holds the cell count.
    FrameEnd = 3,
    /// A step of a collective operation; the payload follows.
    Collective = 4,
    /// Several small data messages in one ZeroMQ message (`aux` holds how
    /// many): the body is their entries, see [`push_batch_entry`].
    Batch = 5,
}

/// Size of the encoded [`Header`].
pub const HEADER_LEN: usize = 2 + 1 + 1 + 4 + 8 + 8 + 8 + 4 + 8;

impl Header {
    /// The fixed little-endian encoding, [`HEADER_LEN`] bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        b[2] = VERSION;
        b[3] = self.kind as u8;
        b[4..8].copy_from_slice(&self.from.to_le_bytes());
        b[8..16].copy_from_slice(&self.incarnation.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.id.to_le_bytes());
        b[24..32].copy_from_slice(&self.frame.to_le_bytes());
        b[32..36].copy_from_slice(&self.aux.to_le_bytes());
        b[36..44].copy_from_slice(&self.to_incarnation.0.to_le_bytes());
        b
    }

    /// Decode exactly [`HEADER_LEN`] bytes, checking magic, version and kind.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != HEADER_LEN {
            return Err(WireError::TooShort { len: b.len() });
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        if u16_at(0) != HEADER_MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[2] != VERSION {
            return Err(WireError::BadVersion(b[2]));
        }
        let kind = match b[3] {
            1 => MsgKind::Control,
            2 => MsgKind::Cell,
            3 => MsgKind::FrameEnd,
            4 => MsgKind::Collective,
            5 => MsgKind::Batch,
            k => return Err(WireError::UnknownKind(k)),
        };
        Ok(Header {
            kind,
            from: u32_at(4),
            incarnation: Incarnation(u64_at(8)),
            id: u64_at(16),
            frame: u64_at(24),
            aux: u32_at(32),
            to_incarnation: Incarnation(u64_at(36)),
        })
    }
}

/// A decoded ZeroMQ message.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerMsg {
    /// A control message.
    Control(Control),
    /// A cell, frame end or collective step.
    Data(DataMsg),
    /// Several of them, in the order they were sent.
    Batch(Vec<DataMsg>),
}

/// Bytes of a batch entry before its payload: kind, id, frame, aux, length.
pub const BATCH_ENTRY_LEN: usize = 1 + 8 + 8 + 4 + 4;

/// The header frame of a batch of `count` data messages (their entries,
/// appended with [`push_batch_entry`], are the body).
pub fn batch_header(
    from: Rank,
    incarnation: Incarnation,
    to_incarnation: Incarnation,
    count: u32,
) -> [u8; HEADER_LEN] {
    Header {
        kind: MsgKind::Batch,
        from,
        incarnation,
        id: 0,
        frame: 0,
        aux: count,
        to_incarnation,
    }
    .encode()
}

/// Append `msg` to a batch body: kind byte, id, frame, aux (little endian),
/// payload length (u32) and the payload.
pub fn push_batch_entry(body: &mut Vec<u8>, msg: &DataMsg) {
    let (kind, aux) = data_kind_aux(msg.kind);
    body.push(kind as u8);
    body.extend_from_slice(&msg.id.to_le_bytes());
    body.extend_from_slice(&msg.frame.to_le_bytes());
    body.extend_from_slice(&aux.to_le_bytes());
    body.extend_from_slice(&(msg.payload.len() as u32).to_le_bytes());
    body.extend_from_slice(&msg.payload);
}

fn data_kind_aux(kind: DataKind) -> (MsgKind, u32) {
    match kind {
        DataKind::Cell => (MsgKind::Cell, 0),
        DataKind::FrameEnd { count } => (MsgKind::FrameEnd, count),
        DataKind::Collective => (MsgKind::Collective, 0),
    }
}

/// The entries of a batch body; payloads are slices of `body` (no copy).
fn decode_batch(body: Bytes, count: u32) -> Result<Vec<DataMsg>, WireError> {
    let bad = |why: &str| WireError::Malformed(format!("batch: {why}"));
    if count as usize > body.len() / BATCH_ENTRY_LEN {
        return Err(bad("more entries announced than fit"));
    }
    let mut msgs = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap_or_default());
    let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().unwrap_or_default());
    for _ in 0..count {
        if body.len() - at < BATCH_ENTRY_LEN {
            return Err(bad("truncated entry"));
        }
        let kind = match body[at] {
            2 => DataKind::Cell,
            3 => DataKind::FrameEnd {
                count: u32_at(at + 17),
            },
            4 => DataKind::Collective,
            k => return Err(WireError::UnknownKind(k)),
        };
        let id = u64_at(at + 1);
        let frame = u64_at(at + 9);
        let len = u32_at(at + 21) as usize;
        at += BATCH_ENTRY_LEN;
        if body.len() - at < len {
            return Err(bad("truncated payload"));
        }
        msgs.push(DataMsg {
            id,
            frame,
            kind,
            payload: body.slice(at..at + len),
        });
        at += len;
    }
    if at != body.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(msgs)
}

/// Encode a control message as `[header, body]`.
pub fn encode_control(from: Rank, incarnation: Incarnation, msg: &Control) -> [Vec<u8>; 2] {
    let header = Header {
        kind: MsgKind::Control,
        from,
        incarnation,
        id: 0,
        frame: 0,
        aux: 0,
        to_incarnation: Incarnation(0),
    };
    [header.encode().to_vec(), encode_body(msg)]
}

/// The header frame of a data message (the payload goes in the next frame)
/// from `(from, incarnation)` to a receiver in its life `to_incarnation`.
pub fn data_header(
    from: Rank,
    incarnation: Incarnation,
    to_incarnation: Incarnation,
    msg: &DataMsg,
) -> [u8; HEADER_LEN] {
    let (kind, aux) = data_kind_aux(msg.kind);
    Header {
        kind,
        from,
        incarnation,
        id: msg.id,
        frame: msg.frame,
        aux,
        to_incarnation,
    }
    .encode()
}

/// Decode a multipart ZeroMQ message (routing frames already removed).
///
/// Takes the frames by value: a cell's payload becomes the `Bytes` of its
/// frame without another copy.
///
/// A message is `[header, body]`, or one frame holding both (small
/// messages travel so): split after [`HEADER_LEN`] bytes.
pub fn decode_peer_msg(mut frames: Vec<Bytes>) -> Result<(Header, PeerMsg), WireError> {
    let count = frames.len();
    if count == 1 && frames[0].len() >= HEADER_LEN {
        let body = frames[0].split_off(HEADER_LEN);
        frames.push(body);
    }
    let Ok([head, body]) = <[Bytes; 2]>::try_from(frames) else {
        return Err(WireError::FrameCount(count));
    };
    let header = Header::decode(&head)?;
    let msg = match header.kind {
        MsgKind::Control => {
            if body.len() > MAX_CONTROL {
                return Err(WireError::TooLarge {
                    len: body.len(),
                    limit: MAX_CONTROL,
                });
            }
            PeerMsg::Control(decode_body(&body)?)
        }
        MsgKind::Batch => PeerMsg::Batch(decode_batch(body, header.aux)?),
        MsgKind::Cell | MsgKind::FrameEnd | MsgKind::Collective => PeerMsg::Data(DataMsg {
            id: header.id,
            frame: header.frame,
            kind: match header.kind {
                MsgKind::Cell => DataKind::Cell,
                MsgKind::FrameEnd => DataKind::FrameEnd { count: header.aux },
                _ => DataKind::Collective,
            },
            payload: body,
        }),
    };
    Ok((header, msg))
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_CONTROL }>()
}

/// Encode a control body or datagram body with bincode (size limit [`MAX_CONTROL`]).
pub fn encode_body<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain data types into a Vec cannot fail.
    bincode::serde::encode_to_vec(value, bincode_config()).unwrap_or_default()
}

/// Decode a bincode body; trailing bytes are an error.
pub fn decode_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode_config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// `magic | version | job key | body | HMAC(all before)`.
pub fn encode_datagram(job: JobKey, secret: &JobSecret, msg: &Datagram) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(DATAGRAM_MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&job.0.to_le_bytes());
    out.extend_from_slice(&encode_body(msg));
    let mut mac = secret.mac();
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

/// Check and decode a datagram made by [`encode_datagram`]: size, magic,
/// version, job key and HMAC tag, in that order, before the body is parsed.
pub fn decode_datagram(
    job: JobKey,
    secret: &JobSecret,
    bytes: &[u8],
) -> Result<Datagram, WireError> {
    const FIXED: usize = 4 + 1 + 8;
    if bytes.len() > MAX_DATAGRAM {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            limit: MAX_DATAGRAM,
        });
    }
    if bytes.len() < FIXED + TAG_LEN + 1 {
        return Err(WireError::TooShort { len: bytes.len() });
    }
    if &bytes[0..4] != DATAGRAM_MAGIC {
        return Err(WireError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(WireError::BadVersion(bytes[4]));
    }
    let key = u64::from_le_bytes(bytes[5..13].try_into().unwrap_or_default());
    if key != job.0 {
        return Err(WireError::ForeignJob(key));
    }
    let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    let mut mac = secret.mac();
    mac.update(signed);
    mac.verify_slice(tag).map_err(|_| WireError::BadTag)?;
    decode_body(&signed[FIXED..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Endpoints;

    fn info(rank: Rank) -> PeerInfo {
        PeerInfo {
            rank,
            node_index: 0,
            incarnation: Incarnation(7),
            endpoints: Endpoints {
                ipc: Some(format!("ipc:///tmp/x-{rank}")),
                tcp: "tcp://127.0.0.1:5555".into(),
            },
        }
    }

    #[test]
    fn datagram_round_trips() {
        let secret = JobSecret::new(b"s3cret".to_vec());
        let msg = Datagram::Ping(Ping {
            info: info(3),
            local_size: 4,
        });
        let bytes = encode_datagram(JobKey(42), &secret, &msg);
        assert_eq!(decode_datagram(JobKey(42), &secret, &bytes), Ok(msg));
    }

    #[test]
    fn datagram_from_other_job_wrong_secret_or_tampered_is_rejected() {
        let secret = JobSecret::new(b"s3cret".to_vec());
        let msg = Datagram::Ping(Ping {
            info: info(3),
            local_size: 4,
        });
        let bytes = encode_datagram(JobKey(42), &secret, &msg);
        assert_eq!(
            decode_datagram(JobKey(43), &secret, &bytes),
            Err(WireError::ForeignJob(42))
        );
        let other = JobSecret::new(b"other".to_vec());
        assert_eq!(
            decode_datagram(JobKey(42), &other, &bytes),
            Err(WireError::BadTag)
        );
        let mut tampered = bytes.clone();
        tampered[20] ^= 1;
        assert_eq!(
            decode_datagram(JobKey(42), &secret, &tampered),
            Err(WireError::BadTag)
        );
    }

    #[test]
    fn junk_datagrams_are_errors_not_panics() {
        let secret = JobSecret::new(b"k".to_vec());
        for junk in [
            &b""[..],
            b"hello",
            b"CNET\x01",
            &[0xff; 200][..],
            &[0u8; 70_000][..],
        ] {
            assert!(decode_datagram(JobKey(1), &secret, junk).is_err());
        }
        let mut truncated = encode_datagram(
            JobKey(1),
            &secret,
            &Datagram::Ping(Ping {
                info: info(1),
                local_size: 1,
            }),
        );
        truncated.truncate(truncated.len() - 1);
        assert!(decode_datagram(JobKey(1), &secret, &truncated).is_err());
    }

    #[test]
    fn header_round_trips_and_garbage_is_rejected() {
        let h = Header {
            kind: MsgKind::FrameEnd,
            from: 9,
            incarnation: Incarnation(3),
            id: 12,
            frame: 99,
            aux: 5,
            to_incarnation: Incarnation(11),
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        assert!(Header::decode(b"garbage").is_err());
        let mut bad = h.encode();
        bad[3] = 200;
        assert_eq!(Header::decode(&bad), Err(WireError::UnknownKind(200)));
    }

    #[test]
    fn peer_messages_round_trip() {
        let [h, b] = encode_control(1, Incarnation(2), &Control::Pong(info(1)));
        let frames = |parts: &[&[u8]]| {
            parts
                .iter()
                .map(|p| Bytes::copy_from_slice(p))
                .collect::<Vec<_>>()
        };
        let (header, msg) = decode_peer_msg(frames(&[&h, &b])).unwrap();
        assert_eq!(header.from, 1);
        assert_eq!(msg, PeerMsg::Control(Control::Pong(info(1))));
        // The same message joined into one frame (how small ones travel).
        let joined = [h.as_slice(), b.as_slice()].concat();
        let (one_header, one_msg) = decode_peer_msg(frames(&[&joined])).unwrap();
        assert_eq!((one_header, one_msg), (header, msg));
        // One frame shorter than a header is not a message.
        assert!(matches!(
            decode_peer_msg(frames(&[&joined[..HEADER_LEN - 1]])),
            Err(WireError::FrameCount(1))
        ));

        let data = DataMsg {
            id: 5,
            frame: 2,
            kind: DataKind::FrameEnd { count: 8 },
            payload: Bytes::new(),
        };
        let h = data_header(4, Incarnation(1), Incarnation(0), &data);
        let (_, msg) = decode_peer_msg(frames(&[&h, &[]])).unwrap();
        assert_eq!(msg, PeerMsg::Data(data));
        assert!(decode_peer_msg(frames(&[b"x"])).is_err());
        assert!(decode_peer_msg(frames(&[&h, &[], &[]])).is_err());
        let [h, _] = encode_control(1, Incarnation(2), &Control::Ready);
        assert!(decode_peer_msg(frames(&[&h, b"\xff\xff\xff\xff"])).is_err());
    }

    #[test]
    fn batches_round_trip_and_malformed_ones_are_errors_not_panics() {
        let msgs = vec![
            DataMsg {
                id: 1,
                frame: 3,
                kind: DataKind::Cell,
                payload: Bytes::from_static(b"first cell"),
            },
            DataMsg {
                id: 2,
                frame: 3,
                kind: DataKind::Collective,
                payload: Bytes::new(),
            },
            DataMsg {
                id: 3,
                frame: 3,
                kind: DataKind::FrameEnd { count: 1 },
                payload: Bytes::new(),
            },
        ];
        let mut body = Vec::new();
        for m in &msgs {
            push_batch_entry(&mut body, m);
        }
        let h = batch_header(4, Incarnation(1), Incarnation(9), msgs.len() as u32);
        let decode = |h: &[u8], body: &[u8]| {
            decode_peer_msg(vec![
                Bytes::copy_from_slice(h),
                Bytes::copy_from_slice(body),
            ])
        };
        let (header, msg) = decode(&h, &body).unwrap();
        assert_eq!((header.from, header.to_incarnation), (4, Incarnation(9)));
        assert_eq!(msg, PeerMsg::Batch(msgs.clone()));
        // Every truncation, a trailing byte, a count too large and a bad kind
        // are refused.
        for cut in 0..body.len() {
            assert!(decode(&h, &body[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode(&h, &longer).is_err());
        let h_many = batch_header(4, Incarnation(1), Incarnation(9), u32::MAX);
        assert!(decode(&h_many, &body).is_err());
        let mut bad_kind = body.clone();
        bad_kind[0] = 9;
        assert!(decode(&h, &bad_kind).is_err());
    }
}
