//! Backpressure instead of unbounded queues: with the window to a peer
//! full, `try_send` says would-block, a timed send gives up, and a blocked
//! `send` resumes once ACKs return credits.

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cellnet::runtime::{Handler, SendError};

/// Holds the receiver's handler until opened.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    /// Wait here until [`Gate::open`].
    fn pass(&self) {
        let (open, cv) = &*self.0;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cv.wait(o).unwrap();
        }
    }

    fn open(&self) {
        let (open, cv) = &*self.0;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }

    /// A handler that holds every cell at the gate.
    fn handler(&self) -> Handler {
        let g = self.clone();
        Arc::new(move |_cell| {
            g.pass();
            Ok(())
        })
    }
}

#[test]
fn window_full_blocks_then_resumes_after_acks() {
    let mut config = test_config();
    config.reliable.window = 4;
    // The receiver's handler holds every cell until the gate opens.
    let gate = Gate::default();
    let handler = gate.handler();
    let comms = start_local(2, &config, |r| (r == 1).then(|| handler.clone()));
    let (a, b) = (&comms[0], &comms[1]);
    b.expect_from([0]).unwrap();

    let first: Vec<_> = (0..4u8).map(|i| a.send(1, 0, vec![i]).unwrap()).collect();
    assert_eq!(
        a.try_send(1, 0, vec![9u8]).err(),
        Some(SendError::WouldBlock {
            to: 1,
            window: 4,
            window_bytes: config.window_bytes
        })
    );
    assert!(matches!(
        a.send_timeout(1, 0, vec![9u8], Duration::from_millis(100)),
        Err(SendError::WouldBlock { .. })
    ));

    let resumed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let blocked = s.spawn(|| {
            let t = a.send(1, 0, vec![4u8]).unwrap();
            resumed.store(true, Ordering::SeqCst);
            t
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !resumed.load(Ordering::SeqCst),
            "send must block while the window is full"
        );
        gate.open();
        let fifth = blocked.join().unwrap();
        assert!(resumed.load(Ordering::SeqCst));
        for t in first.iter().chain(std::iter::once(&fifth)) {
            assert!(t.wait().unwrap().is_ack());
        }
    });
    a.end_frame(0, &[1]).unwrap();
    let frame = b.recv_frame(Duration::from_secs(10)).unwrap();
    assert_eq!(
        frame[&0].iter().map(|c| c[0]).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    shutdown_all(comms);
}

#[test]
fn a_frame_never_sent_is_reported_missing_with_the_laggard() {
    let config = test_config();
    let comms = start_local(3, &config, |_| None);
    let (a, b, c) = (&comms[0], &comms[1], &comms[2]);
    a.expect_from([1, 2]).unwrap();
    // Rank 1 sends its part of frame 0; rank 2 never does.
    let t = b.send(0, 0, vec![1u8]).unwrap();
    b.end_frame(0, &[0]).unwrap();
    assert!(t.wait().unwrap().is_ack());
    let err = a.recv_frame(Duration::from_millis(1500)).unwrap_err();
    assert_eq!(
        err,
        cellnet::runtime::RecvError::FrameMissing {
            frame: 0,
            waited: Duration::from_millis(1500),
            missing: vec![2]
        }
    );
    // Once rank 2 sends, the same frame completes.
    c.end_frame(0, &[0]).unwrap();
    let frame = a.recv_frame(Duration::from_secs(10)).unwrap();
    assert_eq!(frame[&1].len(), 1);
    assert!(frame[&2].is_empty());
    shutdown_all(comms);
}

/// The receiver tracks a bounded span of ids for duplicates; an old cell
/// still unanswered (here: a slow handler) while later ones are answered
/// uses that span up before the credit window. A send then waits for room
/// instead of failing, and everything is delivered once, in order.
#[test]
fn an_old_unanswered_cell_holds_later_sends_back_instead_of_failing_them() {
    let mut config = test_config();
    config.threads = 2;
    config.reliable.window = 8;
    config.reliable.dedup_window = 8;
    let gate = Gate::default();
    let g = gate.clone();
    let (started_tx, started) = std::sync::mpsc::channel();
    let started_tx = Mutex::new(started_tx);
    // Cell 0 waits for the gate; every other cell passes at once.
    let handler: Handler = Arc::new(move |cell| {
        if cell.payload[0] == 0 {
            started_tx.lock().unwrap().send(()).unwrap();
            g.pass();
        }
        Ok(())
    });
    let comms = start_local(2, &config, |r| (r == 1).then(|| handler.clone()));
    let (a, b) = (&comms[0], &comms[1]);
    b.expect_from([0]).unwrap();

    let mut tickets = vec![a.send(1, 0, vec![0u8]).unwrap()];
    started.recv_timeout(Duration::from_secs(10)).unwrap();
    tickets.extend((1..8u8).map(|i| a.send(1, 0, vec![i]).unwrap()));
    for t in &tickets[1..] {
        assert!(t.wait().unwrap().is_ack());
    }
    assert_eq!(
        tickets[0].try_outcome(),
        None,
        "cell 0 is still in its handler"
    );
    // Seven credits are free, but the receiver tracks ids 1..=8 only.
    let later: Vec<_> = (8..12u8).map(|i| a.send(1, 0, vec![i]).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        later.iter().all(|t| t.try_outcome().is_none()),
        "held back, not answered: {:?}",
        later.iter().map(|t| t.try_outcome()).collect::<Vec<_>>()
    );
    gate.open();
    tickets.extend(later);
    for t in &tickets {
        assert!(t.wait().unwrap().is_ack());
    }
    a.end_frame(0, &[1]).unwrap();
    let frame = b.recv_frame(Duration::from_secs(10)).unwrap();
    assert_eq!(
        frame[&0].iter().map(|c| c[0]).collect::<Vec<_>>(),
        (0..12).collect::<Vec<u8>>()
    );
    let reports = shutdown_all(comms);
    assert_eq!(reports[0].acknowledged, 13, "12 cells and a frame end");
    assert_eq!(reports[0].timed_out, 0);
}

/// The window also bounds unanswered payload bytes per peer
/// (`CELLNET_WINDOW_BYTES`); a cell larger than that goes alone.
#[test]
fn the_byte_window_blocks_until_answers_return_and_a_large_cell_goes_alone() {
    let mut config = test_config();
    config.window_bytes = 100;
    let gate = Gate::default();
    let handler = gate.handler();
    let comms = start_local(2, &config, |r| (r == 1).then(|| handler.clone()));
    let (a, b) = (&comms[0], &comms[1]);
    b.expect_from([0]).unwrap();

    let first = a.send(1, 0, vec![1u8; 60]).unwrap();
    let full = SendError::WouldBlock {
        to: 1,
        window: config.reliable.window,
        window_bytes: 100,
    };
    assert_eq!(a.try_send(1, 0, vec![2u8; 60]).err(), Some(full.clone()));
    assert!(
        a.try_send(1, 0, vec![2u8; 40]).is_ok(),
        "60 + 40 fit in 100"
    );
    assert_eq!(a.try_send(1, 0, vec![3u8; 1]).err(), Some(full.clone()));
    gate.open();
    assert!(first.wait().unwrap().is_ack());
    // Once nothing is unanswered, a cell above the byte window goes alone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let big = loop {
        match a.try_send(1, 0, vec![4u8; 1000]) {
            Ok(t) => break t,
            Err(e) => {
                assert_eq!(e, full);
                assert!(std::time::Instant::now() < deadline, "window never emptied");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    assert!(big.wait().unwrap().is_ack());
    a.end_frame(0, &[1]).unwrap();
    let frame = b.recv_frame(Duration::from_secs(10)).unwrap();
    let sizes: Vec<usize> = frame[&0].iter().map(|c| c.len()).collect();
    assert_eq!(sizes, vec![60, 40, 1000]);
    shutdown_all(comms);
}

/// `send_many` takes cells from its iterator as credits allow: with the
/// receiver holding every answer, a lazily made batch of large cells stops
/// being made at about one window's bytes, not at the whole batch.
#[test]
fn send_many_makes_cells_only_as_the_byte_window_allows() {
    const CELL: usize = 32 << 10;
    let mut config = test_config();
    config.window_bytes = 64 << 10; // two cells
    let gate = Gate::default();
    let handler = gate.handler();
    let comms = start_local(2, &config, |r| (r == 1).then(|| handler.clone()));
    let (a, b) = (&comms[0], &comms[1]);
    b.expect_from([0]).unwrap();

    let made = std::sync::atomic::AtomicUsize::new(0);
    let cells = (0..20u8).map(|i| {
        made.fetch_add(1, Ordering::SeqCst);
        vec![i; CELL]
    });
    std::thread::scope(|s| {
        let sender = s.spawn(|| a.send_many(1, 0, cells).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        // Two in flight (the byte window), two more waiting for credits.
        let so_far = made.load(Ordering::SeqCst);
        assert!(so_far <= 4, "{so_far} of 20 cells made while blocked");
        gate.open();
        let outcome = sender.join().unwrap().wait().unwrap();
        assert!(outcome.all_acked() && outcome.cells == 20, "{outcome:?}");
    });
    a.end_frame(0, &[1]).unwrap();
    let frame = b.recv_frame(Duration::from_secs(10)).unwrap();
    let firsts: Vec<u8> = frame[&0].iter().map(|c| c[0]).collect();
    assert_eq!(firsts, (0..20).collect::<Vec<u8>>());
    shutdown_all(comms);
}
