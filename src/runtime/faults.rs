//! Fault injection on the wire, for tests of the whole system: every
//! ZeroMQ message this instance sends is held for a delay with jitter, and
//! a fraction is sent twice. Loss comes from the network itself (nftables
//! in the virtual cluster); delay and duplication need this, as the kernel
//! here has no netem.

use std::collections::BinaryHeap;
use std::time::Duration;

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::proto::{Now, Rank};

/// What to inject; off unless configured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultConfig {
    /// Mean added delay of every message.
    pub delay: Duration,
    /// The delay varies uniformly by up to this much either way.
    pub jitter: Duration,
    /// Probability in `[0, 1)` that a message is sent a second time.
    pub dup: f64,
}

/// Where a held message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Dest {
    /// Through our sending socket to this rank.
    Peer(Rank),
    /// Back on the receiving socket, to this routing id.
    Back(Vec<u8>),
}

#[derive(Debug, PartialEq, Eq)]
struct Held {
    due: Now,
    seq: u64,
    dest: Dest,
    frames: [Vec<u8>; 2],
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Earliest first (BinaryHeap is a max-heap).
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Messages held back by the injected delay.
pub(crate) struct FaultInjector {
    config: FaultConfig,
    rng: SmallRng,
    held: BinaryHeap<Held>,
    seq: u64,
}

impl FaultInjector {
    pub fn new(config: FaultConfig, seed: u64) -> Self {
        Self {
            config,
            rng: SmallRng::seed_from_u64(seed),
            held: BinaryHeap::new(),
            seq: 0,
        }
    }

    fn delay(&mut self) -> Duration {
        let (d, j) = (
            self.config.delay.as_secs_f64(),
            self.config.jitter.as_secs_f64(),
        );
        let x = if j > 0.0 {
            self.rng.gen_range(-j..=j)
        } else {
            0.0
        };
        Duration::from_secs_f64((d + x).max(0.0))
    }

    /// Hold a message (and maybe a duplicate) until its delay passes.
    pub fn hold(&mut self, now: Now, dest: Dest, frames: [&[u8]; 2]) {
        let copies = if self.rng.gen_bool(self.config.dup.clamp(0.0, 0.999)) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.seq += 1;
            let due = now + self.delay();
            self.held.push(Held {
                due,
                seq: self.seq,
                dest: dest.clone(),
                frames: [frames[0].to_vec(), frames[1].to_vec()],
            });
        }
    }

    /// The next message whose delay has passed.
    pub fn pop_due(&mut self, now: Now) -> Option<(Dest, [Vec<u8>; 2])> {
        if self.held.peek().is_some_and(|h| h.due <= now) {
            self.held.pop().map(|h| (h.dest, h.frames))
        } else {
            None
        }
    }

    pub fn next_due(&self) -> Option<Now> {
        self.held.peek().map(|h| h.due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_out_after_their_delay_some_twice() {
        let cfg = FaultConfig {
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(2),
            dup: 0.2,
        };
        let mut f = FaultInjector::new(cfg, 1);
        for i in 0..1000u32 {
            f.hold(Duration::ZERO, Dest::Peer(i), [b"h", b"b"]);
        }
        assert_eq!(
            f.pop_due(Duration::from_millis(2)),
            None,
            "nothing before delay - jitter"
        );
        let mut out = 0;
        while f.pop_due(Duration::from_millis(7)).is_some() {
            out += 1;
        }
        assert_eq!(f.next_due(), None);
        assert!((1150..1250).contains(&out), "about 20% duplicated: {out}");
    }
}
