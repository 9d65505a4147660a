//! Inbound rate limit per session: a fixed window with strikes, so a burst
//! gets an error frame and persistent abuse gets the socket closed.

use std::time::Duration;

use tokio::time::Instant;

/// What to do with one inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow,
    /// Drop it; tell the client once per window.
    Reject {
        first_in_window: bool,
    },
    /// Too many windows in a row over the limit.
    Disconnect,
}

pub(crate) struct RateLimiter {
    limit: u32,
    window: Duration,
    max_strikes: u32,
    window_start: Option<Instant>,
    count: u32,
    strikes: u32,
    struck_this_window: bool,
}

impl RateLimiter {
    pub(crate) fn new(limit: u32, window: Duration, max_strikes: u32) -> Self {
        Self {
            limit,
            window,
            max_strikes,
            window_start: None,
            count: 0,
            strikes: 0,
            struck_this_window: false,
        }
    }

    pub(crate) fn check(&mut self, now: Instant) -> Verdict {
        match self.window_start {
            Some(start) if now.duration_since(start) < self.window => {}
            Some(start) => {
                // A clean window (or more than one elapsed) forgives past strikes.
                if !self.struck_this_window || now.duration_since(start) >= self.window * 2 {
                    self.strikes = 0;
                }
                self.window_start = Some(now);
                self.count = 0;
                self.struck_this_window = false;
            }
            None => self.window_start = Some(now),
        }
        self.count += 1;
        if self.count <= self.limit {
            return Verdict::Allow;
        }
        if !self.struck_this_window {
            self.struck_this_window = true;
            self.strikes += 1;
            if self.strikes >= self.max_strikes {
                return Verdict::Disconnect;
            }
            return Verdict::Reject {
                first_in_window: true,
            };
        }
        // Flooding far past the limit within one window is abuse too.
        if self.count > self.limit.saturating_mul(4).max(self.limit + 20) {
            return Verdict::Disconnect;
        }
        Verdict::Reject {
            first_in_window: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_rejected_then_persistent_abuse_disconnects() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut rl = RateLimiter::new(3, w, 2);
        for _ in 0..3 {
            assert_eq!(rl.check(t0), Verdict::Allow);
        }
        assert_eq!(
            rl.check(t0),
            Verdict::Reject {
                first_in_window: true
            }
        );
        assert_eq!(
            rl.check(t0),
            Verdict::Reject {
                first_in_window: false
            }
        );
        // next window, over again: second strike
        let t1 = t0 + w;
        for _ in 0..3 {
            assert_eq!(rl.check(t1), Verdict::Allow);
        }
        assert_eq!(rl.check(t1), Verdict::Disconnect);
    }

    #[test]
    fn a_clean_window_forgives() {
        let t0 = Instant::now();
        let w = Duration::from_secs(1);
        let mut rl = RateLimiter::new(1, w, 2);
        assert_eq!(rl.check(t0), Verdict::Allow);
        assert!(matches!(rl.check(t0), Verdict::Reject { .. }));
        assert_eq!(rl.check(t0 + w), Verdict::Allow);
        assert_eq!(rl.check(t0 + w * 2), Verdict::Allow);
        assert!(
            matches!(rl.check(t0 + w * 2), Verdict::Reject { .. }),
            "strikes were reset"
        );
    }

    #[test]
    fn flooding_within_one_window_disconnects() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(5, Duration::from_secs(10), 3);
        let verdicts: Vec<_> = (0..100).map(|_| rl.check(t0)).collect();
        assert!(verdicts.contains(&Verdict::Disconnect));
    }
}
