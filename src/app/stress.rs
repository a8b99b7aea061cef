//! `cellnet stress`: many cells between instances with a handler that
//! refuses a chosen subset, checking the delivery contract end to end:
//! every ticket resolves with the handler's verdict, the handler sees each
//! cell exactly once, frames come out in order with the accepted cells.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::{reliable::Outcome, Rank};
use crate::runtime::{BatchOutcome, Cell, Communicator, HandlerError};

/// Parameters, the same on every instance.
#[derive(Clone, Debug)]
pub struct StressParams {
    /// Cells each instance sends to each peer.
    pub cells: u64,
    /// Cells per frame towards each peer (at least 1).
    pub per_frame: u64,
    /// Bytes per cell (at least 8: the sequence number comes first).
    pub payload: usize,
    /// The handler answers ERR(7) for cells whose sequence number is a
    /// multiple of this (0: never).
    pub err_every: u64,
    /// How long to wait for each frame.
    pub timeout: Duration,
    /// Send each frame's cells to each peer with one
    /// [`Communicator::send_many`] instead of a ticket per cell.
    pub many: bool,
}

/// Code the stress handler refuses with.
pub const STRESS_ERR: u32 = 7;

fn refused(p: &StressParams, seq: u64) -> bool {
    p.err_every != 0 && seq % p.err_every == 0
}

fn seq_of(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
}

/// Per-sender counts of how often the handler saw each sequence number.
pub struct Seen {
    counts: Vec<Vec<AtomicU8>>,
}

impl Seen {
    /// Counts for `size` senders of `cells` sequence numbers each, all zero.
    pub fn new(size: u32, cells: u64) -> Arc<Self> {
        Arc::new(Self {
            counts: (0..size)
                .map(|_| (0..cells).map(|_| AtomicU8::new(0)).collect())
                .collect(),
        })
    }
}

/// The handler: checks the payload, counts the cell, refuses the subset.
pub fn handler(
    p: StressParams,
    seen: Arc<Seen>,
) -> impl Fn(&Cell) -> Result<(), HandlerError> + Send + Sync + 'static {
    move |cell| {
        let seq = seq_of(&cell.payload).ok_or_else(|| HandlerError::new(1, "short cell"))?;
        let slot = seen
            .counts
            .get(cell.from as usize)
            .and_then(|v| v.get(seq as usize))
            .ok_or_else(|| HandlerError::new(1, format!("sequence {seq} out of range")))?;
        slot.fetch_add(1, Relaxed);
        if refused(&p, seq) {
            Err(HandlerError::new(
                STRESS_ERR,
                format!("cell {seq} refused by request"),
            ))
        } else {
            Ok(())
        }
    }
}

/// Run the exchange between all instances; returns a summary line.
pub fn run(comm: &Communicator, p: &StressParams, seen: &Seen) -> Result<String, String> {
    let me = comm.rank();
    let peers: Vec<Rank> = (0..comm.size()).filter(|&r| r != me).collect();
    comm.expect_from(peers.iter().copied())
        .map_err(|e| e.to_string())?;
    let per_frame = p.per_frame.max(1);
    let frames = p.cells.div_ceil(per_frame);
    let start = Instant::now();
    let (sent, wrong) = std::thread::scope(|s| {
        let sender = s.spawn(|| -> Result<(u64, Vec<String>), String> {
            let mut wrong = Vec::new();
            let mut tickets = std::collections::VecDeque::new();
            let mut sent = 0;
            let check = |seq: u64, to: Rank, outcome: Outcome, wrong: &mut Vec<String>| {
                let ok = match &outcome {
                    Outcome::Ack => !refused(p, seq),
                    Outcome::Err { code, .. } => refused(p, seq) && *code == STRESS_ERR,
                    Outcome::TimedOut => false,
                };
                if !ok && wrong.len() < 5 {
                    wrong.push(format!("cell {seq} to rank {to} resolved {outcome:?}"));
                }
            };
            // send_many: (first sequence number, peer, ticket of the frame's cells).
            let mut batches = std::collections::VecDeque::new();
            let check_batch = |first: u64, to: Rank, o: BatchOutcome, wrong: &mut Vec<String>| {
                let mut not_acked = o.not_acked.into_iter().peekable();
                for i in 0..o.cells {
                    let seq = first + i as u64;
                    let outcome = match not_acked.next_if(|(j, _)| *j == i) {
                        Some((_, outcome)) => outcome,
                        None => Outcome::Ack,
                    };
                    check(seq, to, outcome, wrong);
                }
                if let Some((i, outcome)) = not_acked.next() {
                    wrong.push(format!(
                        "rank {to} answered cell {i} of a batch of {}: {outcome:?}",
                        o.cells
                    ));
                }
            };
            let make = |seq: u64| {
                let mut payload = vec![0u8; p.payload.max(8)];
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                bytes::Bytes::from(payload)
            };
            for frame in 0..frames {
                let seqs = frame * per_frame..((frame + 1) * per_frame).min(p.cells);
                if p.many {
                    for &to in &peers {
                        // Made as send_many takes them: memory stays bounded
                        // by the window, as with send.
                        let t = comm
                            .send_many(to, frame, seqs.clone().map(make))
                            .map_err(|e| e.to_string())?;
                        sent += t.cells() as u64;
                        batches.push_back((seqs.start, to, t));
                    }
                    while let Some(o) = batches.front().and_then(|t| t.2.try_outcome()) {
                        let (first, to, _) = batches.pop_front().unwrap_or_else(|| unreachable!());
                        check_batch(first, to, o, &mut wrong);
                    }
                }
                for seq in seqs.filter(|_| !p.many) {
                    let payload = make(seq);
                    for &to in &peers {
                        tickets.push_back((
                            seq,
                            to,
                            comm.send(to, frame, payload.clone())
                                .map_err(|e| e.to_string())?,
                        ));
                        sent += 1;
                    }
                    // Resolve as we go: tickets stay bounded by the window.
                    while tickets.front().is_some_and(|t| t.2.try_outcome().is_some())
                        || tickets.len() > 4096
                    {
                        let (seq, to, t) = tickets.pop_front().unwrap_or_else(|| unreachable!());
                        let outcome = t.wait().map_err(|e| e.to_string())?;
                        check(seq, to, outcome, &mut wrong);
                    }
                }
                for t in comm.end_frame(frame, &peers).map_err(|e| e.to_string())? {
                    if !t.wait().map_err(|e| e.to_string())?.is_ack() {
                        wrong.push(format!("frame end {frame} not acknowledged"));
                    }
                }
            }
            for (seq, to, t) in tickets {
                let outcome = t.wait().map_err(|e| e.to_string())?;
                check(seq, to, outcome, &mut wrong);
            }
            for (first, to, t) in batches {
                let outcome = t.wait().map_err(|e| e.to_string())?;
                check_batch(first, to, outcome, &mut wrong);
            }
            Ok((sent, wrong))
        });
        let mut problems = Vec::new();
        for frame in 0..frames {
            match comm.recv_frame(p.timeout) {
                Ok(cells) => {
                    for &from in &peers {
                        let want: Vec<u64> = (frame * per_frame
                            ..((frame + 1) * per_frame).min(p.cells))
                            .filter(|&s| !refused(p, s))
                            .collect();
                        let got: Vec<u64> = cells
                            .get(&from)
                            .map(|v| v.iter().filter_map(|c| seq_of(c)).collect())
                            .unwrap_or_default();
                        if got != want && problems.len() < 5 {
                            problems.push(format!(
                                "frame {frame} from rank {from}: got {} cells, expected {}",
                                got.len(),
                                want.len()
                            ));
                        }
                    }
                }
                Err(e) => {
                    problems.push(e.to_string());
                    break;
                }
            }
        }
        let (sent, mut wrong) = sender
            .join()
            .map_err(|_| "sender thread panicked".to_string())??;
        wrong.extend(problems);
        Ok::<_, String>((sent, wrong))
    })?;
    let mut dup = 0u64;
    let mut lost = 0u64;
    for &from in &peers {
        for c in &seen.counts[from as usize] {
            match c.load(Relaxed) {
                1 => {}
                0 => lost += 1,
                _ => dup += 1,
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if !wrong.is_empty() || dup > 0 || lost > 0 {
        return Err(format!(
            "stress failed on rank {me}: {dup} cells handled twice, {lost} never handled; {}",
            wrong.join("; ")
        ));
    }
    let refused_n = (0..p.cells).filter(|&s| refused(p, s)).count() as u64 * peers.len() as u64;
    Ok(format!(
        "cellnet stress: rank {me} ok: {sent} cells sent{}, every ticket right ({} ACK, {refused_n} ERR), \
         each received cell handled exactly once, {frames} frames in order, {:.0} cells/s",
        if p.many { " with send_many" } else { "" },
        sent - refused_n,
        sent as f64 / elapsed.max(1e-9)
    ))
}
