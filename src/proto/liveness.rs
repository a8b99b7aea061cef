//! Failure detection: every watched peer is alive → suspect → dead, driven
//! by traffic (any message counts as a heartbeat) and by heartbeats sent to
//! peers we have been quiet towards.
//!
//! Owns the per-peer timers; must not touch sockets or the clock. A dead
//! peer stays dead: a restart is a new incarnation, which the driver
//! reports separately and re-watches.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::{Now, Rank};

/// Timing of failure detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Send a heartbeat to a watched peer we sent nothing to for this long.
    pub heartbeat: Duration,
    /// Suspect a peer we heard nothing from for this long ...
    pub suspect_after: Duration,
    /// ... and declare it dead after this long.
    pub dead_after: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            suspect_after: Duration::from_secs(2),
            dead_after: Duration::from_secs(5),
        }
    }
}

/// What the detector believes about a watched peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Heard from within [`LivenessConfig::suspect_after`].
    Alive,
    /// Quiet for [`LivenessConfig::suspect_after`]; any message makes it alive again.
    Suspect,
    /// Quiet for [`LivenessConfig::dead_after`]; final for this incarnation.
    Dead,
}

/// A change of a watched peer's [`Health`], for the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessEvent {
    /// The peer became suspect.
    Suspect(Rank),
    /// A suspect peer was heard from again.
    Recovered(Rank),
    /// The peer is declared dead (reported once).
    Dead(Rank),
}

#[derive(Clone, Copy, Debug)]
struct Watch {
    last_heard: Now,
    last_sent: Now,
    health: Health,
}

/// The failure detector of one instance.
#[derive(Debug, Default)]
pub struct Liveness {
    config: LivenessConfig,
    peers: BTreeMap<Rank, Watch>,
    heartbeats: VecDeque<Rank>,
    events: VecDeque<LivenessEvent>,
}

impl Liveness {
    /// A detector watching nobody yet.
    pub fn new(config: LivenessConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Start watching `rank` (no effect if already watched).
    pub fn watch(&mut self, now: Now, rank: Rank) {
        self.peers.entry(rank).or_insert(Watch {
            last_heard: now,
            last_sent: now,
            health: Health::Alive,
        });
    }

    /// Stop watching `rank` and forget its timers.
    pub fn unwatch(&mut self, rank: Rank) {
        self.peers.remove(&rank);
    }

    /// What we believe about `rank`; `None` if it is not watched.
    pub fn health(&self, rank: Rank) -> Option<Health> {
        self.peers.get(&rank).map(|w| w.health)
    }

    /// Anything arrived from `rank`.
    pub fn heard(&mut self, now: Now, rank: Rank) {
        if let Some(w) = self.peers.get_mut(&rank) {
            w.last_heard = now;
            if w.health == Health::Suspect {
                w.health = Health::Alive;
                self.events.push_back(LivenessEvent::Recovered(rank));
            }
        }
    }

    /// Anything was sent to `rank` (no heartbeat needed for a while).
    pub fn sent(&mut self, now: Now, rank: Rank) {
        if let Some(w) = self.peers.get_mut(&rank) {
            w.last_sent = now;
        }
    }

    /// Move quiet peers to suspect or dead and queue heartbeats to peers we
    /// have sent nothing to for [`LivenessConfig::heartbeat`].
    pub fn handle_timeout(&mut self, now: Now) {
        let c = self.config;
        for (&rank, w) in self.peers.iter_mut() {
            if w.health == Health::Dead {
                continue;
            }
            let quiet = now.saturating_sub(w.last_heard);
            if quiet >= c.dead_after {
                w.health = Health::Dead;
                self.events.push_back(LivenessEvent::Dead(rank));
                continue;
            }
            if quiet >= c.suspect_after && w.health == Health::Alive {
                w.health = Health::Suspect;
                self.events.push_back(LivenessEvent::Suspect(rank));
            }
            if now.saturating_sub(w.last_sent) >= c.heartbeat {
                w.last_sent = now;
                self.heartbeats.push_back(rank);
            }
        }
    }

    /// When [`Self::handle_timeout`] should next run; `None` when no live peer is watched.
    pub fn poll_timeout(&self) -> Option<Now> {
        let c = self.config;
        self.peers
            .values()
            .filter(|w| w.health != Health::Dead)
            .map(|w| {
                let next_state = if w.health == Health::Alive {
                    w.last_heard + c.suspect_after
                } else {
                    w.last_heard + c.dead_after
                };
                next_state.min(w.last_sent + c.heartbeat)
            })
            .min()
    }

    /// A peer to send a heartbeat to.
    pub fn poll_heartbeat(&mut self) -> Option<Rank> {
        self.heartbeats.pop_front()
    }

    /// The next health change.
    pub fn poll_event(&mut self) -> Option<LivenessEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Now {
        Duration::from_millis(n)
    }

    #[test]
    fn quiet_peer_goes_suspect_then_dead_and_heartbeats_flow_meanwhile() {
        let mut l = Liveness::new(LivenessConfig::default());
        l.watch(ms(0), 4);
        l.handle_timeout(ms(499));
        assert_eq!(l.poll_heartbeat(), None);
        l.handle_timeout(ms(500));
        assert_eq!(l.poll_heartbeat(), Some(4));
        l.handle_timeout(ms(2000));
        assert_eq!(l.poll_event(), Some(LivenessEvent::Suspect(4)));
        assert_eq!(l.health(4), Some(Health::Suspect));
        l.handle_timeout(ms(5000));
        assert_eq!(l.poll_event(), Some(LivenessEvent::Dead(4)));
        l.heard(ms(5001), 4);
        assert_eq!(l.health(4), Some(Health::Dead), "dead stays dead");
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn traffic_keeps_a_peer_alive_and_recovers_a_suspect() {
        let mut l = Liveness::new(LivenessConfig::default());
        l.watch(ms(0), 1);
        for t in (0..10_000).step_by(400) {
            l.heard(ms(t), 1);
            l.sent(ms(t), 1);
            l.handle_timeout(ms(t));
        }
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.poll_heartbeat(), None, "traffic stands in for heartbeats");
        l.handle_timeout(ms(12_500));
        assert_eq!(l.poll_event(), Some(LivenessEvent::Suspect(1)));
        l.heard(ms(12_600), 1);
        assert_eq!(l.poll_event(), Some(LivenessEvent::Recovered(1)));
        assert_eq!(l.health(1), Some(Health::Alive));
    }
}
