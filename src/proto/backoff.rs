//! Exponential backoff with a ceiling and jitter, shared by every retrying
//! state machine (discovery pings, registrations, retransmissions).

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::Now;

/// How retries are spaced: `initial · factor^attempt`, capped at `ceiling`,
/// each delay scaled by a random factor in `[1 - jitter, 1 + jitter]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackoffPolicy {
    /// Delay before the first retry (attempt 0).
    pub initial: Duration,
    /// Growth per attempt; values below 1 are treated as 1 (no shrinking).
    pub factor: f64,
    /// Upper bound on the delay before jitter is applied.
    pub ceiling: Duration,
    /// Fraction in `[0, 1)`; 0 disables jitter.
    pub jitter: f64,
}

impl BackoffPolicy {
    /// A policy from its four parameters (usable in `const` defaults).
    pub const fn new(initial: Duration, factor: f64, ceiling: Duration, jitter: f64) -> Self {
        Self {
            initial,
            factor,
            ceiling,
            jitter,
        }
    }

    /// The delay before retry number `attempt` (0 = the first retry).
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        // In nanoseconds: this runs once per cell sent, and Duration's
        // float conversions are slow.
        let initial = nanos(self.initial);
        let base = match attempt {
            0 => initial,
            a => initial * self.factor.max(1.0).powi(a.min(64) as i32),
        };
        self.jittered(base.min(nanos(self.ceiling)), rng)
    }

    /// The ceiling, jittered: the slowest spacing of this policy.
    pub fn ceiling_delay(&self, rng: &mut impl Rng) -> Duration {
        self.jittered(nanos(self.ceiling), rng)
    }

    /// `capped` nanoseconds, scaled by the jitter.
    fn jittered(&self, capped: f64, rng: &mut impl Rng) -> Duration {
        let jitter = self.jitter.clamp(0.0, 0.99);
        let scale = if jitter > 0.0 {
            rng.gen_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        Duration::from_nanos((capped * scale).max(0.0) as u64)
    }
}

/// `d` in nanoseconds, as a float (through u64: u128 to float is slow).
fn nanos(d: Duration) -> f64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX) as f64
}

/// A retry timer driven by [`BackoffPolicy`].
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    timer: RetryTimer,
}

impl Backoff {
    /// A timer that is due at `now` (the first try goes out at once).
    pub fn start(policy: BackoffPolicy, now: Now) -> Self {
        Self {
            policy,
            timer: RetryTimer::start(now),
        }
    }

    /// When the next try is due.
    pub fn next(&self) -> Now {
        self.timer.next()
    }

    /// How many tries were made so far.
    pub fn attempts(&self) -> u32 {
        self.timer.attempts()
    }

    /// Whether the next try is due at `now` (inclusive).
    pub fn is_due(&self, now: Now) -> bool {
        self.timer.is_due(now)
    }

    /// Record a try made at `now` and schedule the next one.
    pub fn fire(&mut self, now: Now, rng: &mut impl Rng) {
        self.timer.fire(&self.policy, now, rng);
    }

    /// Record a try made at `now` and schedule the next one at the
    /// ceiling's spacing, whatever the attempt (for a timer whose tries
    /// are now only a safety net).
    pub fn fire_at_ceiling(&mut self, now: Now, rng: &mut impl Rng) {
        self.timer.fire_at_ceiling(&self.policy, now, rng);
    }

    /// Start over from the initial delay, due at `now`.
    pub fn reset(&mut self, now: Now) {
        self.timer = RetryTimer::start(now);
    }
}

/// The state of a [`Backoff`] without its policy (24 bytes instead of
/// 72), for the many timers that share one policy: the reliable channel
/// keeps one per message in flight.
#[derive(Clone, Copy, Debug)]
pub struct RetryTimer {
    attempt: u32,
    next: Now,
}

impl RetryTimer {
    /// A timer that is due at `now` (the first try goes out at once).
    pub fn start(now: Now) -> Self {
        Self {
            attempt: 0,
            next: now,
        }
    }

    /// A timer whose first try was made, the next due at `next` (drawn
    /// by the caller with [`BackoffPolicy::delay`] for attempt 0).
    pub fn tried_once(next: Now) -> Self {
        Self { attempt: 1, next }
    }

    /// When the next try is due.
    pub fn next(&self) -> Now {
        self.next
    }

    /// How many tries were made so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Whether the next try is due at `now` (inclusive).
    pub fn is_due(&self, now: Now) -> bool {
        now >= self.next
    }

    /// Record a try made at `now` and schedule the next one by `policy`.
    pub fn fire(&mut self, policy: &BackoffPolicy, now: Now, rng: &mut impl Rng) {
        self.next = now + policy.delay(self.attempt, rng);
        self.attempt = self.attempt.saturating_add(1);
    }

    /// Like [`Self::fire`], at the ceiling's spacing whatever the attempt.
    pub fn fire_at_ceiling(&mut self, policy: &BackoffPolicy, now: Now, rng: &mut impl Rng) {
        self.next = now + policy.ceiling_delay(rng);
        self.attempt = self.attempt.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, SeedableRng};

    #[test]
    fn delays_grow_then_stop_at_the_ceiling() {
        let p = BackoffPolicy::new(
            Duration::from_millis(10),
            2.0,
            Duration::from_millis(100),
            0.0,
        );
        let mut rng = SmallRng::seed_from_u64(1);
        let d: Vec<u64> = (0..6)
            .map(|a| p.delay(a, &mut rng).as_millis() as u64)
            .collect();
        assert_eq!(d, vec![10, 20, 40, 80, 100, 100]);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let p = BackoffPolicy::new(
            Duration::from_millis(100),
            2.0,
            Duration::from_secs(1),
            0.25,
        );
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..1000 {
            let d = p.delay(0, &mut rng);
            assert!(
                d >= Duration::from_millis(75) && d <= Duration::from_millis(125),
                "{d:?}"
            );
        }
    }

    #[test]
    fn timer_is_due_at_once_then_after_the_delay() {
        let p = BackoffPolicy::new(Duration::from_millis(10), 2.0, Duration::from_secs(1), 0.0);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut b = Backoff::start(p, Duration::ZERO);
        assert!(b.is_due(Duration::ZERO));
        b.fire(Duration::ZERO, &mut rng);
        assert!(!b.is_due(Duration::from_millis(9)));
        assert!(b.is_due(Duration::from_millis(10)));
        b.fire(Duration::from_millis(10), &mut rng);
        assert_eq!(b.next(), Duration::from_millis(30));
    }
}
