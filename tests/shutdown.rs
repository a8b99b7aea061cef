//! Shutdown drains and loses nothing: every instance sends without
//! waiting, then all shut down at once; afterwards, on every side, sent =
//! acknowledged + refused (nothing timed out or left open), and the
//! handlers ran exactly once per cell sent.

mod common;
use common::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cellnet::runtime::{Handler, HandlerError};

#[test]
fn shutdown_right_after_sending_loses_nothing() {
    const N: u32 = 3;
    const CELLS: u32 = 400;
    let config = test_config();
    let counts: Vec<Arc<AtomicU64>> = (0..N).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let handlers: Vec<Handler> = counts
        .iter()
        .map(|c| {
            let c = c.clone();
            let h: Handler = Arc::new(move |cell| {
                c.fetch_add(1, Ordering::SeqCst);
                if cell.payload[0] % 10 == 0 {
                    Err(HandlerError::new(3, "every tenth refused"))
                } else {
                    Ok(())
                }
            });
            h
        })
        .collect();
    let comms = start_local(N, &config, |r| Some(handlers[r as usize].clone()));
    for c in &comms {
        c.expect_from((0..N).filter(|&r| r != c.rank())).unwrap();
        for to in (0..N).filter(|&r| r != c.rank()) {
            for i in 0..CELLS {
                // Tickets dropped unread: shutdown must still drain them.
                let _ = c.send(to, 0, vec![(i % 250) as u8]).unwrap();
            }
        }
    }
    let reports: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || c.shutdown().unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused_per_peer = (0..CELLS).filter(|i| (i % 250) % 10 == 0).count() as u64;
    for (r, rep) in reports.iter().enumerate() {
        assert_eq!(rep.unanswered, 0, "rank {r}: {rep:?}");
        assert_eq!(rep.unacknowledged, 0, "rank {r}: {rep:?}");
        assert_eq!(rep.timed_out, 0, "rank {r}: {rep:?}");
        assert_eq!(
            rep.sent,
            rep.acknowledged + rep.refused,
            "rank {r}: {rep:?}"
        );
        assert_eq!(rep.sent, ((N - 1) * CELLS) as u64, "rank {r}: {rep:?}");
        assert_eq!(
            rep.refused,
            (N - 1) as u64 * refused_per_peer,
            "rank {r}: {rep:?}"
        );
        assert_eq!(rep.handled, ((N - 1) * CELLS) as u64, "rank {r}: {rep:?}");
        assert_eq!(
            counts[r].load(Ordering::SeqCst),
            rep.handled,
            "rank {r}: handler count"
        );
    }
}
