//! The simulator of DESIGN §9 over many seeds and fault mixes: every
//! invariant must hold for every seed, and a failing seed names itself.

use std::time::{Duration, Instant};

mod common;

use cellnet::sim::{
    self, CrashSpec, Invariant, KillAt, KillSpec, PartitionSpec, SimConfig, SimViolation,
};

const SEEDS: u64 = 500;

/// A small job whose shape varies with the seed: 2-3 nodes × 2-4 instances.
fn small(seed: u64) -> SimConfig {
    SimConfig {
        nodes: 2 + (seed % 2) as u32,
        per_node: 2 + ((seed / 2) % 3) as u32,
        frames: 3,
        seed,
        ..SimConfig::default()
    }
}

fn all_seeds(mix: &str, make: impl Fn(u64) -> SimConfig) {
    let t = Instant::now();
    for seed in 0..SEEDS {
        let cfg = make(seed);
        if let Err(e) = sim::run(&cfg) {
            panic!("{mix}: {e}\nconfig: {cfg:?}");
        }
    }
    eprintln!("{mix}: {SEEDS} seeds in {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn no_faults_every_invariant_holds() {
    all_seeds("no faults", small);
}

#[test]
fn five_percent_loss_every_invariant_holds() {
    all_seeds("5% loss", |seed| SimConfig {
        loss: 0.05,
        ..small(seed)
    });
}

#[test]
fn thirty_percent_loss_with_duplication_and_reordering_every_invariant_holds() {
    all_seeds("30% loss + dup + reorder", |seed| {
        let mut cfg = SimConfig {
            loss: 0.3,
            dup: 0.1,
            reorder: 0.2,
            ..small(seed)
        };
        // Generous for 30% loss: every TimedOut is a violation.
        cfg.reliable.deadline = Duration::from_secs(60);
        // And a failure detector that does not take ten lost heartbeats
        // in a row for a death (at 30% loss, 5 s does: seed 83 splits a
        // node's leadership, a false verdict being final).
        cfg.liveness.suspect_after = Duration::from_secs(10);
        cfg.liveness.dead_after = Duration::from_secs(30);
        assert!(!cfg.loss_justifies_timeouts(), "{}", cfg.timeout_odds());
        cfg
    });
}

#[test]
fn crash_and_restart_every_invariant_holds() {
    all_seeds("crash + restart", |seed| {
        let cfg = SimConfig {
            loss: 0.02,
            dup: 0.02,
            reorder: 0.1,
            ..small(seed)
        };
        // Any rank but node 0's leader, which runs the coordinator (its
        // registry does not survive a restart: see the sim docs).
        let victim = 1 + (seed / 6) as u32 % (cfg.size() - 1);
        SimConfig {
            crash: Some(CrashSpec {
                rank: victim,
                after_frame: seed % cfg.frames,
                down_for: Duration::from_millis(10 + seed % 500),
            }),
            ..cfg
        }
    });
}

#[test]
fn a_healing_partition_every_invariant_holds() {
    all_seeds("partition", |seed| {
        let cfg = SimConfig {
            loss: 0.02,
            ..small(seed)
        };
        SimConfig {
            partition: Some(PartitionSpec {
                node: (seed % cfg.nodes as u64) as u32,
                start: Duration::from_millis(seed % 40),
                duration: Duration::from_millis(100 + (seed * 37) % 3000),
            }),
            ..cfg
        }
    });
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let cfg = SimConfig {
        nodes: 3,
        per_node: 3,
        loss: 0.2,
        dup: 0.1,
        reorder: 0.3,
        frames: 4,
        seed: 42,
        crash: Some(CrashSpec {
            rank: 4,
            after_frame: 1,
            down_for: Duration::from_millis(100),
        }),
        ..SimConfig::default()
    };
    let a = sim::run(&cfg).unwrap();
    let b = sim::run(&cfg).unwrap();
    assert_eq!(a.stats, b.stats);
    let c = sim::run(&SimConfig { seed: 43, ..cfg }).unwrap();
    assert_ne!(a.stats.trace, c.stats.trace, "another seed, another run");
}

#[test]
fn global_join_messages_grow_linearly_with_nodes() {
    let global = |nodes| {
        let r = sim::run(&SimConfig {
            nodes,
            per_node: 4,
            frames: 1,
            seed: 7,
            ..SimConfig::default()
        })
        .unwrap();
        r.stats.messages.global() as f64
    };
    let (g1, g4, g16) = (global(1), global(4), global(16));
    eprintln!("global-phase messages: 1 node {g1}, 4 nodes {g4}, 16 nodes {g16}");
    let per_node_4 = g4 / 4.0;
    let per_node_16 = g16 / 16.0;
    assert!(
        per_node_16 <= 2.0 * per_node_4 && per_node_16 >= 0.5 * per_node_4,
        "per node: {per_node_4} at 4 nodes, {per_node_16} at 16 nodes"
    );
    assert!(g1 <= g4, "{g1} > {g4}");
}

#[test]
fn bad_configs_are_typed_errors_not_panics() {
    for cfg in [
        SimConfig {
            nodes: 0,
            ..SimConfig::default()
        },
        SimConfig {
            per_node: 0,
            ..SimConfig::default()
        },
        SimConfig {
            loss: 1.0,
            ..SimConfig::default()
        },
        SimConfig {
            dup: f64::NAN,
            ..SimConfig::default()
        },
        SimConfig {
            reorder: -0.1,
            ..SimConfig::default()
        },
        SimConfig {
            crash: Some(CrashSpec {
                rank: 4,
                after_frame: 0,
                down_for: Duration::ZERO,
            }),
            ..SimConfig::default()
        },
        SimConfig {
            nodes: u32::MAX,
            per_node: u32::MAX,
            ..SimConfig::default()
        },
    ] {
        assert!(
            matches!(sim::run(&cfg), Err(SimViolation::InvalidConfig(_))),
            "{cfg:?}"
        );
    }
}

#[test]
fn a_violation_names_the_invariant_and_the_seed() {
    // The coordinator dies for good, but the structure is checked before
    // anybody can have declared it dead.
    let cfg = SimConfig {
        nodes: 2,
        per_node: 2,
        seed: 9,
        kill: Some(KillSpec {
            rank: 0,
            at: KillAt::Frame(0),
        }),
        heal_within: Duration::from_secs(1),
        ..SimConfig::default()
    };
    let e = sim::run(&cfg).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("seed 9"), "{text}");
    assert!(
        matches!(
            e,
            SimViolation::Broken {
                invariant: Invariant::Failover,
                seed: 9,
                ..
            }
        ),
        "{text}"
    );
}

#[test]
fn a_deadline_shorter_than_the_retransmission_is_caught_as_an_unjustified_timeout() {
    // The checker must be able to fail: handlers take up to 5 ms, the
    // deadline is 1 ms, nothing is lost: some ticket times out although
    // no fault justifies it.
    let mut cfg = SimConfig {
        handler_time: Duration::from_millis(5),
        frames: 3,
        seed: 3,
        ..SimConfig::default()
    };
    cfg.reliable.deadline = Duration::from_millis(1);
    match sim::run(&cfg) {
        Err(SimViolation::Broken {
            invariant: Invariant::NoUnjustifiedTimeout,
            seed: 3,
            ..
        }) => {}
        other => panic!("expected an unjustified timeout, got {other:?}"),
    }
}

#[test]
fn the_default_deadline_is_generous_up_to_fifteen_percent_loss() {
    let at = |loss| SimConfig {
        loss,
        ..SimConfig::default()
    };
    assert!(!at(0.0).loss_justifies_timeouts());
    assert!(!at(0.05).loss_justifies_timeouts());
    assert!(!at(0.15).loss_justifies_timeouts());
    assert!(
        at(0.4).loss_justifies_timeouts(),
        "{}",
        at(0.4).timeout_odds()
    );
}

#[test]
fn cellnet_sim_reports_invariants_hold_and_refuses_bad_flags_with_exit_2() {
    let limit = Duration::from_secs(60);
    let out = common::run(
        &[
            "sim",
            "--nodes",
            "2",
            "--per-node",
            "3",
            "--loss",
            "0.05",
            "--seed",
            "4",
        ],
        &[],
        limit,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("global ready (virtual)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.trim_end().ends_with("invariants hold"),
        "{}",
        out.stdout
    );
    for bad in [
        &["sim", "--loss", "1"][..],
        &["sim", "--crash", "5"],
        &["sim", "--nodes", "0"],
        &["sim", "--nodes", "2", "--crash", "9@0+1s"],
    ] {
        let out = common::run(bad, &[], limit);
        assert_eq!(out.code, Some(2), "{bad:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{bad:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn cellnet_sim_violation_exits_1_and_says_how_to_replay() {
    // The coordinator (rank 0) crashes: its registry is gone for good.
    let out = common::run(
        &[
            "sim",
            "--nodes",
            "2",
            "--per-node",
            "2",
            "--seed",
            "9",
            "--crash",
            "0@0+50ms",
            "--time-limit",
            "60s",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("violation: "), "{}", out.stderr);
    assert!(
        out.stderr.contains("(replay with --seed 9)"),
        "{}",
        out.stderr
    );
}

/// A small job for failover: 2-3 nodes × 2-4 instances, collectives on.
fn failover(seed: u64, loss: f64, victim: impl Fn(&SimConfig) -> u32) -> SimConfig {
    let cfg = SimConfig {
        loss,
        collectives: true,
        ..small(seed)
    };
    let rank = victim(&cfg);
    SimConfig {
        kill: Some(KillSpec {
            rank,
            at: KillAt::Frame(seed % cfg.frames),
        }),
        ..cfg
    }
}

const FAILOVER_SEEDS: u64 = 150;

fn failover_seeds(mix: &str, make: impl Fn(u64) -> SimConfig) {
    let t = Instant::now();
    for seed in 0..FAILOVER_SEEDS {
        let cfg = make(seed);
        match sim::run(&cfg) {
            Ok(r) => assert!(
                r.stats.healed_at.is_some()
                    && r.stats
                        .collectives
                        .iter()
                        .all(|c| c.participants == cfg.size() - 1),
                "{mix} seed {seed}: {r}"
            ),
            Err(e) => panic!("{mix}: {e}\nconfig: {cfg:?}"),
        }
    }
    eprintln!(
        "{mix}: {FAILOVER_SEEDS} seeds in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn leader_victim(seed: u64, cfg: &SimConfig) -> u32 {
    let node = 1 + (seed / 3) as u32 % (cfg.nodes - 1);
    node * cfg.per_node
}

#[test]
fn a_node_leader_killed_mid_frames_is_replaced_and_survivors_collectives_complete() {
    failover_seeds("leader killed", |seed| {
        failover(seed, 0.0, |cfg| leader_victim(seed, cfg))
    });
}

/// Under 5% loss a leader that missed the one announcement of the changed
/// directory (or got a delayed older one after it) used to keep the dead
/// leader in its list for good (seeds 1, 6, 11, 36). Leaders now register
/// until the directory drops the dead leader, and directories carry an
/// epoch.
#[test]
fn a_node_leader_killed_mid_frames_under_loss_is_replaced() {
    failover_seeds("leader killed, 5% loss, 3x2", |seed| {
        let cfg = SimConfig {
            nodes: 3,
            per_node: 2,
            loss: 0.05,
            collectives: true,
            frames: 3,
            seed,
            ..SimConfig::default()
        };
        let rank = 2 * (1 + (seed / 3) as u32 % 2);
        SimConfig {
            kill: Some(KillSpec {
                rank,
                at: KillAt::Frame(seed % 3),
            }),
            ..cfg
        }
    });
}

/// A member killed mid-frames: its leader drops it and tells the other
/// members, the coordinator's directory follows, and the survivors'
/// collectives complete. A kill after the last frame used to leave the
/// simulation running to its time limit (`--kill 5@2`, 3 frames, seed 3):
/// everybody had finished before the healing was checked.
#[test]
fn a_member_killed_mid_frames_is_dropped_and_survivors_collectives_complete() {
    failover_seeds("member killed", |seed| {
        failover(seed, 0.0, |cfg| leader_victim(seed, cfg) + 1)
    });
    // Without collectives nobody has anything left to do after the kill.
    for seed in 0..50 {
        let cfg = small(seed);
        let cfg = SimConfig {
            kill: Some(KillSpec {
                rank: leader_victim(seed, &cfg) + 1,
                at: KillAt::Frame(cfg.frames - 1),
            }),
            ..cfg
        };
        if let Err(e) = sim::run(&cfg) {
            panic!("member killed after the last frame: {e}\nconfig: {cfg:?}");
        }
    }
}

#[test]
fn the_coordinator_killed_mid_frames_moves_to_node_0s_next_rank() {
    failover_seeds("coordinator killed", |seed| failover(seed, 0.0, |_| 0));
}

/// Under loss a node-mate could still be in the handshake with the
/// coordinator's leader when it died, and never complete (seed 3). Node-
/// mates that completed now answer its pings with the live membership.
#[test]
fn the_coordinator_killed_mid_frames_under_loss_moves() {
    failover_seeds("coordinator killed, 5% loss", |seed| {
        failover(seed, 0.05, |_| 0)
    });
}

/// The same for any node's leader, on every small shape (seed 57).
#[test]
fn a_node_leader_killed_mid_frames_under_loss_on_every_shape_is_replaced() {
    failover_seeds("leader killed, 5% loss", |seed| {
        failover(seed, 0.05, |cfg| leader_victim(seed, cfg))
    });
}

#[test]
fn collectives_under_five_percent_loss_return_the_right_values() {
    let t = Instant::now();
    for seed in 0..200 {
        let cfg = SimConfig {
            loss: 0.05,
            collectives: true,
            ..small(seed)
        };
        let r = sim::run(&cfg).unwrap_or_else(|e| panic!("{e}\nconfig: {cfg:?}"));
        let names: Vec<_> = r.stats.collectives.iter().map(|c| c.op).collect();
        assert_eq!(
            names,
            ["barrier", "broadcast", "all_gather", "all_reduce (sum)"]
        );
        assert!(r
            .stats
            .collectives
            .iter()
            .all(|c| c.participants == cfg.size() && c.last_return >= c.last_call));
    }
    eprintln!(
        "collectives 5% loss: 200 seeds in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn kill_and_collectives_replay_exactly() {
    let cfg = SimConfig {
        nodes: 3,
        per_node: 3,
        loss: 0.05,
        dup: 0.05,
        reorder: 0.2,
        frames: 3,
        seed: 17,
        collectives: true,
        kill: Some(KillSpec {
            rank: 3,
            at: KillAt::Frame(1),
        }),
        ..SimConfig::default()
    };
    let a = sim::run(&cfg).unwrap();
    assert_eq!(a.stats, sim::run(&cfg).unwrap().stats);
    let c = sim::run(&SimConfig { seed: 18, ..cfg }).unwrap();
    assert_ne!(a.stats.trace, c.stats.trace);
}

/// Known gap (see the sim docs): an instance that dies before global
/// ready is never declared lost to the coordinator, which waits for every
/// instance of the job; the node fails over locally but the job never
/// becomes globally ready. Flip this test when `Register` carries the
/// ranks a leader declared dead.
/// Deaths before global ready, at both phases (right after the victim's
/// node completed discovery, and when its node registered): the
/// coordinator (rank 0), another node's leader, or a member. Node-mates
/// report the dead rank as lost in their registration, so the coordinator
/// stops waiting for it, and the 5% loss runs show it survives lost
/// announcements. Before this fix the coordinator waited for the dead
/// rank for good (`--kill 0@join`, `--kill 4@discovery`, seed 3).
fn killed_before_ready(seed: u64, loss: f64) -> SimConfig {
    let cfg = SimConfig {
        loss,
        collectives: true,
        ..small(seed)
    };
    let rank = match seed % 3 {
        0 => 0,
        1 => leader_victim(seed, &cfg),
        _ => leader_victim(seed, &cfg) + 1,
    };
    let at = if (seed / 3) % 2 == 0 {
        KillAt::Discovery
    } else {
        KillAt::Join
    };
    SimConfig {
        kill: Some(KillSpec { rank, at }),
        ..cfg
    }
}

#[test]
fn an_instance_killed_before_global_ready_is_healed_around() {
    failover_seeds("killed before global ready", |seed| {
        killed_before_ready(seed, 0.0)
    });
}

#[test]
fn an_instance_killed_before_global_ready_under_loss_is_healed_around() {
    failover_seeds("killed before global ready, 5% loss", |seed| {
        killed_before_ready(seed, 0.05)
    });
}
