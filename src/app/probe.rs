//! `cellnet probe`: one line per instance with its identity, binding,
//! leader and endpoints, like `mpirun --report-bindings`.

use crate::runtime::Communicator;

/// What this instance dropped off the wire so far, as printed at the end
/// of the probe lines.
pub fn dropped(comm: &Communicator) -> String {
    let m = comm.metrics();
    format!(
        "dropped: datagrams malformed={} foreign-job={} bad-tag={} zmq-malformed={} registrations-refused={}",
        m.datagrams_malformed,
        m.datagrams_foreign_job,
        m.datagrams_bad_tag,
        m.zmq_malformed,
        m.registrations_refused,
    )
}

/// The probe line of this instance.
pub fn line(comm: &Communicator) -> String {
    let info = comm.launch_info();
    let status = comm.status();
    format!(
        "cellnet probe: rank {}/{} node {} ({}/{}) local {}/{} leader {} cpuset {} ({}) tcp {} ipc {} \
         coordinator {} peers-on-node {} {}",
        info.rank,
        info.size,
        info.node_name,
        info.node_index,
        info.nodes,
        info.local_rank,
        info.local_size,
        status.leader.map_or("-".to_string(), |l| l.to_string()),
        comm.binding().cpuset_string,
        comm.binding().policy,
        comm.endpoints().tcp,
        comm.endpoints().ipc.as_deref().unwrap_or("-"),
        comm.coordinator(),
        status.members.len(),
        dropped(comm),
    )
}

/// Send `count` cells to each of `peers` (frame 0), expect as many from each
/// of them, and check that every ticket resolved ACK and every cell arrived.
pub fn exchange(
    comm: &Communicator,
    peers: &[crate::proto::Rank],
    count: u32,
) -> Result<String, String> {
    use crate::proto::reliable::Outcome;
    let timeout = std::time::Duration::from_secs(60);
    comm.expect_from(peers.iter().copied())
        .map_err(|e| e.to_string())?;
    let mut tickets = Vec::new();
    for &p in peers {
        for i in 0..count {
            let payload = [comm.rank().to_le_bytes(), i.to_le_bytes()].concat();
            tickets.push(comm.send(p, 0, payload).map_err(|e| e.to_string())?);
        }
    }
    let cells = tickets.len();
    tickets.extend(comm.end_frame(0, peers).map_err(|e| e.to_string())?);
    let frame = comm.recv_frame(timeout).map_err(|e| e.to_string())?;
    for &p in peers {
        let got = frame.get(&p).map_or(0, |v| v.len());
        if got != count as usize {
            return Err(format!(
                "received {got} cells from rank {p}, expected {count}"
            ));
        }
        for (i, cell) in frame[&p].iter().enumerate() {
            let want = [p.to_le_bytes(), (i as u32).to_le_bytes()].concat();
            if cell.as_ref() != want.as_slice() {
                return Err(format!("cell {i} from rank {p} is out of order or corrupt"));
            }
        }
    }
    let mut acked = 0;
    for (i, t) in tickets.iter().enumerate() {
        match t.wait().map_err(|e| e.to_string())? {
            Outcome::Ack => acked += usize::from(i < cells),
            other => return Err(format!("cell to rank {} resolved {other:?}", t.to())),
        }
    }
    Ok(format!(
        "cellnet probe: rank {} exchange ok: sent {} cells to {} peers, {} acked, received {} cells",
        comm.rank(),
        count as usize * peers.len(),
        peers.len(),
        acked,
        count as usize * peers.len()
    ))
}

/// Stay `hold`, printing peer events as they come; then a barrier and an
/// all_reduce over the survivors show the structure still works. The line
/// ends with what was dropped off the wire meanwhile.
pub fn hold(comm: &Communicator, hold: std::time::Duration) -> Result<String, String> {
    use std::io::Write;
    let until = std::time::Instant::now() + hold;
    while std::time::Instant::now() < until {
        for e in comm.events() {
            println!("cellnet event: rank {}: {e:?}", comm.rank());
            let _ = std::io::stdout().flush();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let t = std::time::Duration::from_secs(20);
    comm.barrier(t).map_err(|e| e.to_string())?;
    let survivors = comm.all_reduce_sum(1u64, t).map_err(|e| e.to_string())?;
    let s = comm.status();
    Ok(format!(
        "cellnet probe: rank {} after hold: leader {} node-leaders {:?} survivors {survivors} {}",
        comm.rank(),
        s.leader.map_or("-".into(), |l| l.to_string()),
        s.node_leaders,
        dropped(comm)
    ))
}
