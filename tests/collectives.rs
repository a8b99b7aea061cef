//! Collectives in one process: barrier, broadcast, gather, all_gather and
//! all_reduce across 5 instances on one node, and errors naming who is
//! missing when a participant never calls.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[test]
fn collectives_agree_on_five_instances() {
    let config = test_config();
    let comms = start_local(5, &config, |_| None);
    std::thread::scope(|s| {
        for c in &comms {
            s.spawn(move || {
                let r = c.rank();
                c.barrier(T).unwrap();
                let b: String = c
                    .broadcast(3, (r == 3).then(|| "from three".to_string()), T)
                    .unwrap();
                assert_eq!(b, "from three");
                let g = c.gather(2, &(r * 10), T).unwrap();
                if r == 2 {
                    assert_eq!(g, Some(vec![0, 10, 20, 30, 40]));
                } else {
                    assert_eq!(g, None);
                }
                let all: Vec<String> = c.all_gather(&format!("r{r}"), T).unwrap();
                assert_eq!(all, vec!["r0", "r1", "r2", "r3", "r4"]);
                assert_eq!(c.all_reduce_sum(r as u64 + 1, T).unwrap(), 15);
                assert_eq!(c.all_reduce_min(r as i64 - 2, T).unwrap(), -2);
                assert_eq!(c.all_reduce_max(r as f64 * 0.5, T).unwrap(), 2.0);
                // A user-defined reduction over a serde type.
                let (lo, hi) = c
                    .all_reduce((r, r), |a, b| (a.0.min(b.0), a.1.max(b.1)), T)
                    .unwrap();
                assert_eq!((lo, hi), (0, 4));
                c.barrier(T).unwrap();
            });
        }
    });
    shutdown_all(comms);
}

#[test]
fn a_participant_that_never_calls_is_named() {
    let config = test_config();
    let comms = start_local(3, &config, |_| None);
    // Ranks 0 and 1 call barrier; rank 2 (a member) never does.
    let errs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms[..2]
            .iter()
            .map(|c| s.spawn(move || c.barrier(Duration::from_millis(800))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The leader (rank 0) waits for rank 2; rank 1 waits for its leader.
    match &errs[0] {
        Err(cellnet::runtime::CollectiveError::Timeout { missing, .. }) => {
            assert_eq!(missing, &vec![2])
        }
        other => panic!("rank 0: {other:?}"),
    }
    match &errs[1] {
        Err(cellnet::runtime::CollectiveError::Timeout { missing, .. }) => {
            assert_eq!(missing, &vec![0])
        }
        other => panic!("rank 1: {other:?}"),
    }
    shutdown_all(comms);
}
