//! When pre-copy stops: the decision after each round, as a pure function
//! of what the rounds measured.
//!
//! After every round the source knows how many bytes the guest dirtied
//! while it was sent (what the next round must send) and how fast the
//! link took the bytes sent so far. The expected downtime is what remains
//! divided by that bandwidth; once it is within the maximum the guest is
//! stopped and the rest copied. A guest that dirties memory about as fast
//! as the link sends it never gets there; QEMU's rule names that case (its
//! `migration_trigger_throttle`: the bytes dirtied in a period exceed half
//! the bytes sent in it, twice in a row), and then, as configured, the
//! source either throttles the vCPU (auto-converge: 20 % of its time at
//! first, 10 points more each round it still does not converge, at most
//! 99 %, as QEMU's `cpu-throttle-initial`/`-increment`/`max-cpu-throttle`
//! defaults) or switches to post-copy.

use std::time::Duration;

use serde::Serialize;

/// When post-copy may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyPolicy {
    /// Never: a guest that does not converge is throttled instead.
    Never,
    /// When pre-copy does not converge.
    Auto,
    /// After this many pre-copy rounds (round 0 included), converged or not.
    After(u32),
}

impl std::str::FromStr for PostcopyPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(PostcopyPolicy::Never),
            "auto" => Ok(PostcopyPolicy::Auto),
            _ => s
                .strip_prefix("after:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n >= 1)
                .map(PostcopyPolicy::After)
                .ok_or_else(|| format!("invalid post-copy policy {s:?}: expected auto, never or after:N (N ≥ 1 rounds)")),
        }
    }
}

impl std::fmt::Display for PostcopyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostcopyPolicy::Never => f.write_str("never"),
            PostcopyPolicy::Auto => f.write_str("auto"),
            PostcopyPolicy::After(n) => write!(f, "after:{n}"),
        }
    }
}

/// The first throttle, in percent of the vCPU's time.
pub const THROTTLE_INITIAL: u8 = 20;
/// Added each round the guest still does not converge.
pub const THROTTLE_STEP: u8 = 10;
/// The most the vCPU is throttled.
pub const THROTTLE_MAX: u8 = 99;
/// Rounds after which the source stops the guest whatever the expected
/// downtime (a guest throttled to 99 % that still outruns the link).
pub const MAX_ROUNDS: u32 = 100;

/// What one pre-copy round measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Round {
    /// Its number (0: all of memory).
    pub index: u32,
    /// Bytes it put on the link (frames, headers included).
    pub sent_bytes: u64,
    /// Time spent sending them.
    pub send_secs: f64,
    /// Bytes the guest dirtied meanwhile: what the next round sends.
    pub dirty_bytes: u64,
    /// Time from the previous harvest to this round's.
    pub interval_secs: f64,
}

/// What the source does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Another pre-copy round.
    Continue,
    /// Another round, with the vCPU throttled to this percentage.
    Throttle(u8),
    /// Stop the guest and copy the rest.
    StopAndCopy,
    /// Start the guest on the destination and send the rest after.
    Postcopy,
}

/// The rounds so far and the throttle in force.
#[derive(Debug, Clone)]
pub struct Convergence {
    max_downtime: Duration,
    limit: Option<f64>,
    policy: PostcopyPolicy,
    rounds: Vec<Round>,
    throttle: u8,
    /// Consecutive rounds that dirtied more than half of what they sent.
    outrun: u32,
}

impl Convergence {
    /// For a migration with this maximum downtime, bandwidth limit (bytes
    /// per second) and post-copy policy.
    #[must_use]
    pub fn new(max_downtime: Duration, limit: Option<u64>, policy: PostcopyPolicy) -> Self {
        Convergence { max_downtime, limit: limit.map(|l| l as f64), policy, rounds: Vec::new(), throttle: 0, outrun: 0 }
    }

    /// For a destination that cannot take post-copy: a guest that does not
    /// converge is throttled instead.
    pub fn without_postcopy(&mut self) {
        self.policy = PostcopyPolicy::Never;
    }

    /// The measured bandwidth, bytes per second: everything sent over the
    /// time spent sending it (round 0, the largest, weighs most), at most
    /// the limit; `None` before anything was sent.
    #[must_use]
    pub fn bandwidth(&self) -> Option<f64> {
        let (bytes, secs) = self.rounds.iter().fold((0u64, 0f64), |(b, s), r| (b + r.sent_bytes, s + r.send_secs));
        if bytes == 0 || secs <= 0.0 {
            return None;
        }
        let measured = bytes as f64 / secs;
        Some(self.limit.map_or(measured, |l| measured.min(l)))
    }

    /// How long copying `remaining` bytes with the guest stopped would take.
    #[must_use]
    pub fn expected_downtime(&self, remaining: u64) -> Option<Duration> {
        if remaining == 0 {
            return Some(Duration::ZERO);
        }
        self.bandwidth().map(|bw| Duration::from_secs_f64(remaining as f64 / bw))
    }

    /// The dirty rate of the last round, bytes per second.
    #[must_use]
    pub fn dirty_rate(&self) -> Option<f64> {
        self.rounds.last().filter(|r| r.interval_secs > 0.0).map(|r| r.dirty_bytes as f64 / r.interval_secs)
    }

    /// The throttle in force, percent.
    #[must_use]
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// The rounds so far.
    #[must_use]
    pub fn rounds(&self) -> &[Round] {
        &self.rounds
    }

    /// Records `round` and decides what comes next.
    pub fn after(&mut self, round: Round) -> Decision {
        // QEMU's trigger: dirtied more than half of what was sent. Round 0
        // sends all of memory and says nothing about the guest's rate.
        if round.index > 0 && round.dirty_bytes.saturating_mul(2) > round.sent_bytes {
            self.outrun += 1;
        } else {
            self.outrun = 0;
        }
        let remaining = round.dirty_bytes;
        self.rounds.push(round);
        if self.expected_downtime(remaining).is_some_and(|d| d <= self.max_downtime) {
            return Decision::StopAndCopy;
        }
        let done = self.rounds.len() as u32;
        if let PostcopyPolicy::After(n) = self.policy
            && done >= n
        {
            return Decision::Postcopy;
        }
        if done >= MAX_ROUNDS {
            return Decision::StopAndCopy;
        }
        if self.outrun >= 2 {
            if self.policy == PostcopyPolicy::Auto {
                return Decision::Postcopy;
            }
            self.throttle = if self.throttle == 0 { THROTTLE_INITIAL } else { self.throttle.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX) };
            return Decision::Throttle(self.throttle);
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn round(index: u32, sent: u64, secs: f64, dirty: u64) -> Round {
        Round { index, sent_bytes: sent, send_secs: secs, dirty_bytes: dirty, interval_secs: secs }
    }

    #[test]
    fn an_idle_guest_stops_after_the_first_round() {
        let mut c = Convergence::new(Duration::from_millis(5), None, PostcopyPolicy::Never);
        // 1 GiB at 1 GiB/s, 4 KiB dirtied meanwhile: 4 µs of downtime.
        assert_eq!(c.after(round(0, 1024 * MIB, 1.0, 4096)), Decision::StopAndCopy);
        assert_eq!(c.expected_downtime(4096), Some(Duration::from_nanos(3815)));
    }

    #[test]
    fn a_guest_that_slows_down_converges_in_a_few_rounds() {
        let mut c = Convergence::new(Duration::from_millis(10), None, PostcopyPolicy::Never);
        // 100 MiB/s: 50 MiB left needs 0.5 s, 5 MiB 50 ms, 0.5 MiB 5 ms.
        assert_eq!(c.after(round(0, 100 * MIB, 1.0, 50 * MIB)), Decision::Continue);
        assert_eq!(c.after(round(1, 50 * MIB, 0.5, 5 * MIB)), Decision::Continue);
        assert_eq!(c.after(round(2, 5 * MIB, 0.05, MIB / 2)), Decision::StopAndCopy);
    }

    #[test]
    fn a_guest_that_outruns_the_link_is_throttled_more_each_round() {
        let mut c = Convergence::new(Duration::from_millis(5), None, PostcopyPolicy::Never);
        assert_eq!(c.after(round(0, 100 * MIB, 1.0, 80 * MIB)), Decision::Continue);
        assert_eq!(c.after(round(1, 80 * MIB, 0.8, 70 * MIB)), Decision::Continue, "one round over half is not yet a trend");
        assert_eq!(c.after(round(2, 70 * MIB, 0.7, 60 * MIB)), Decision::Throttle(20));
        assert_eq!(c.after(round(3, 60 * MIB, 0.6, 50 * MIB)), Decision::Throttle(30));
        for _ in 0..20 {
            c.after(round(4, 50 * MIB, 0.5, 40 * MIB));
        }
        assert_eq!(c.throttle(), THROTTLE_MAX);
        // Once it dirties less than half of what is sent it is left alone.
        assert_eq!(c.after(round(30, 40 * MIB, 0.4, 10 * MIB)), Decision::Continue);
    }

    #[test]
    fn post_copy_starts_when_asked_or_when_pre_copy_cannot_converge() {
        let mut auto = Convergence::new(Duration::from_millis(5), None, PostcopyPolicy::Auto);
        assert_eq!(auto.after(round(0, 100 * MIB, 1.0, 80 * MIB)), Decision::Continue);
        assert_eq!(auto.after(round(1, 80 * MIB, 0.8, 70 * MIB)), Decision::Continue);
        assert_eq!(auto.after(round(2, 70 * MIB, 0.7, 60 * MIB)), Decision::Postcopy);
        let mut after = Convergence::new(Duration::from_millis(5), None, PostcopyPolicy::After(2));
        assert_eq!(after.after(round(0, 100 * MIB, 1.0, 10 * MIB)), Decision::Continue);
        assert_eq!(after.after(round(1, 10 * MIB, 0.1, 5 * MIB)), Decision::Postcopy);
        // Converging first wins.
        let mut after = Convergence::new(Duration::from_millis(5), None, PostcopyPolicy::After(1));
        assert_eq!(after.after(round(0, 100 * MIB, 1.0, 4096)), Decision::StopAndCopy);
    }

    #[test]
    fn the_bandwidth_limit_caps_the_estimate_and_the_round_count_ends_it() {
        let mut c = Convergence::new(Duration::from_millis(1), Some(10 * MIB), PostcopyPolicy::Never);
        c.after(round(0, 100 * MIB, 1.0, 2 * MIB));
        assert_eq!(c.bandwidth(), Some((10 * MIB) as f64));
        assert_eq!(c.expected_downtime(MIB), Some(Duration::from_millis(100)));
        let mut stuck = Convergence::new(Duration::ZERO, None, PostcopyPolicy::Never);
        let mut last = Decision::Continue;
        for i in 0..MAX_ROUNDS {
            last = stuck.after(round(i, MIB, 0.01, MIB / 4));
        }
        assert_eq!(last, Decision::StopAndCopy, "after {MAX_ROUNDS} rounds the guest is stopped whatever it costs");
    }

    #[test]
    fn policies_parse() {
        assert_eq!("auto".parse(), Ok(PostcopyPolicy::Auto));
        assert_eq!("never".parse(), Ok(PostcopyPolicy::Never));
        assert_eq!("after:3".parse(), Ok(PostcopyPolicy::After(3)));
        assert!("after:0".parse::<PostcopyPolicy>().is_err());
        assert!("sometimes".parse::<PostcopyPolicy>().is_err());
        assert_eq!(PostcopyPolicy::After(4).to_string(), "after:4");
    }
}
