//! Warnings a guest can cause, logged without letting it flood the log.
//!
//! A guest that repeats a bad request (an invalid message, a refused swap
//! or AP-start request, an unexpected exit) would otherwise write one log
//! line per request, growing the host's logs without bound. Each call site
//! of [`warn_limited!`](crate::warn_limited) logs its first
//! [`FIRST`] occurrences, then one in every [`EVERY`] with how many it
//! skipped.

use std::sync::atomic::{AtomicU64, Ordering};

/// Occurrences logged in full at each call site.
pub const FIRST: u64 = 10;
/// After those, one in this many is logged.
pub const EVERY: u64 = 1000;

/// The occurrence count of one call site.
#[derive(Debug, Default)]
pub struct LogLimit(AtomicU64);

impl LogLimit {
    /// A fresh count (for statics).
    #[must_use]
    pub const fn new() -> Self {
        LogLimit(AtomicU64::new(0))
    }

    /// Counts one occurrence: `Some(skipped)` when this one is to be
    /// logged, `skipped` being how many were not since the last logged one.
    pub fn allow(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        if n < FIRST {
            Some(0)
        } else if (n - FIRST + 1).is_multiple_of(EVERY) {
            Some(EVERY - 1)
        } else {
            None
        }
    }
}

/// `log::warn!` limited per call site ([`LogLimit`]).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        if let Some(skipped) = LIMIT.allow() {
            if skipped == 0 {
                log::warn!($($arg)*);
            } else {
                log::warn!("{} ({skipped} more like this not logged)", format_args!($($arg)*));
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_logs_its_first_ten_then_one_in_a_thousand() {
        let l = LogLimit::new();
        let logged: Vec<(u64, u64)> = (0..5010u64).filter_map(|i| l.allow().map(|s| (i, s))).collect();
        assert_eq!(logged.len(), 10 + 5);
        assert!(logged[..10].iter().all(|&(_, s)| s == 0));
        assert_eq!(logged[10], (1009, 999));
        assert_eq!(logged[14], (5009, 999));
    }
}
