//! `send_many`: many cells with one ticket. Each cell is still sequenced,
//! deduplicated, answered and handed over on its own: a batch larger than
//! the window waits for credits like `send`, arrives whole and in order,
//! and its ticket names every cell that was not acknowledged.

mod common;
use common::*;

use std::sync::Arc;
use std::time::Duration;

use cellnet::proto::reliable::Outcome;
use cellnet::runtime::{Handler, HandlerError, SendError};

fn cell(i: u32) -> Vec<u8> {
    i.to_le_bytes().to_vec()
}

fn index(c: &[u8]) -> u32 {
    u32::from_le_bytes(c[..4].try_into().unwrap())
}

#[test]
fn a_batch_larger_than_the_window_arrives_whole_and_in_order() {
    const CELLS: u32 = 1000;
    let mut config = test_config();
    // 1000 cells through a window of 16: the sender waits for credits
    // many times over, and the cells go out in many chunks.
    config.reliable.window = 16;
    let comms = start_local(2, &config, |_| None);
    let (a, b) = (&comms[0], &comms[1]);
    b.expect_from([0]).unwrap();

    let ticket = a.send_many(1, 0, (0..CELLS).map(cell)).unwrap();
    let end = a.end_frame(0, &[1]).unwrap();
    assert_eq!(ticket.to(), 1);
    assert_eq!(ticket.cells(), CELLS as usize);
    let outcome = ticket.wait().unwrap();
    assert!(outcome.all_acked(), "{outcome:?}");
    assert_eq!(outcome.acked(), CELLS as usize);
    assert_eq!(ticket.try_outcome(), Some(outcome), "asking again");
    for t in end {
        assert!(t.wait().unwrap().is_ack());
    }

    let frame = b.recv_frame(Duration::from_secs(20)).unwrap();
    let got: Vec<u32> = frame[&0].iter().map(|c| index(c)).collect();
    assert_eq!(got, (0..CELLS).collect::<Vec<_>>());

    let reports = shutdown_all(comms);
    // 1000 cells and one frame end, each answered once.
    assert_eq!(reports[0].sent, CELLS as u64 + 1);
    assert_eq!(reports[0].acknowledged, CELLS as u64 + 1);
    assert_eq!(reports[1].delivered, CELLS as u64 + 1);
}

#[test]
fn the_ticket_names_each_refused_cell_and_single_sends_see_their_err() {
    const CELLS: u32 = 50;
    let config = test_config();
    let refuse: Handler = Arc::new(|c| {
        if index(&c.payload) % 10 == 3 {
            Err(HandlerError::new(
                7,
                format!("cell {} refused", index(&c.payload)),
            ))
        } else {
            Ok(())
        }
    });
    let comms = start_local(2, &config, |r| (r == 1).then(|| refuse.clone()));
    let (a, b) = (&comms[0], &comms[1]);
    b.expect_from([0]).unwrap();

    let ticket = a.send_many(1, 0, (0..CELLS).map(cell)).unwrap();
    let single = a.send(1, 0, cell(13)).unwrap();
    let outcome = ticket.wait().unwrap();
    let refused: Vec<(usize, Outcome)> = [3usize, 13, 23, 33, 43]
        .into_iter()
        .map(|i| {
            let text = format!("cell {i} refused");
            (i, Outcome::Err { code: 7, text })
        })
        .collect();
    assert_eq!(outcome.not_acked, refused);
    assert_eq!(outcome.acked(), CELLS as usize - 5);
    assert!(!outcome.all_acked());
    let text = "cell 13 refused".to_string();
    assert_eq!(single.wait().unwrap(), Outcome::Err { code: 7, text });
    shutdown_all(comms);
}

#[test]
fn an_empty_batch_is_answered_at_once_and_bad_targets_are_refused() {
    let config = test_config();
    let comms = start_local(2, &config, |_| None);
    let a = &comms[0];
    let empty = a.send_many(1, 0, Vec::<Vec<u8>>::new()).unwrap();
    assert_eq!(empty.cells(), 0);
    let outcome = empty.try_outcome().expect("nothing to wait for");
    assert!(outcome.all_acked() && outcome.acked() == 0);
    assert_eq!(
        a.send_many(0, 0, [cell(1)]).err().map(|e| e.to_string()),
        Some(SendError::ToSelf(0).to_string())
    );
    assert!(matches!(
        a.send_many(9, 0, [cell(1)]),
        Err(SendError::NoSuchRank { to: 9, size: 2 })
    ));
    shutdown_all(comms);
}

#[test]
fn cells_nobody_answers_in_time_are_reported_timed_out() {
    let mut config = test_config();
    config.reliable.deadline = Duration::from_millis(600);
    // The receiver's handler never returns within the deadline.
    let slow: Handler = Arc::new(|_| {
        std::thread::sleep(Duration::from_millis(1200));
        Ok(())
    });
    let comms = start_local(2, &config, |r| (r == 1).then(|| slow.clone()));
    let a = &comms[0];
    let outcome = a.send_many(1, 0, (0..3).map(cell)).unwrap().wait().unwrap();
    assert_eq!(
        outcome.not_acked,
        (0..3).map(|i| (i, Outcome::TimedOut)).collect::<Vec<_>>()
    );
    drop(comms);
}
