//! Timestamps relative to process start, on CLOCK_MONOTONIC.
//!
//! "Process start" is the moment the parent spawned us when it says so
//! (`MEMVISOR_SPAWN_NS`, a CLOCK_MONOTONIC reading in nanoseconds, set by
//! `vmm bench boot`), otherwise the first call to [`process_start_ns`]
//! (early in `main`). CLOCK_MONOTONIC is shared by all processes, so the
//! parent's and our readings compare.

use std::sync::OnceLock;

/// Environment variable carrying the spawn time.
pub const SPAWN_NS_ENV: &str = "MEMVISOR_SPAWN_NS";

/// CLOCK_MONOTONIC now, in nanoseconds.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The process start time in CLOCK_MONOTONIC nanoseconds.
pub fn process_start_ns() -> u64 {
    static START: OnceLock<u64> = OnceLock::new();
    *START.get_or_init(|| std::env::var(SPAWN_NS_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or_else(monotonic_ns))
}

/// Microseconds since process start.
#[must_use]
pub fn since_start_us() -> f64 {
    monotonic_ns().saturating_sub(process_start_ns()) as f64 / 1000.0
}

/// Named boot milestones, in the order they were reached: (name, µs since
/// process start). Recorded by [`mark`]; the run report and `vmm bench boot`
/// show them so that start-up time can be attributed.
static MARKS: std::sync::Mutex<Vec<(&'static str, f64)>> = std::sync::Mutex::new(Vec::new());

/// Records that milestone `name` was reached now.
pub fn mark(name: &'static str) {
    let at = since_start_us();
    if let Ok(mut m) = MARKS.lock() {
        m.push((name, at));
    }
}

/// The milestones recorded so far, which are forgotten: a process that
/// runs VM after VM (`vmm bench soak`) gets each run's own, and the list
/// does not grow without end.
#[must_use]
pub fn take_marks() -> Vec<(&'static str, f64)> {
    MARKS.lock().map(|mut m| std::mem::take(&mut *m)).unwrap_or_default()
}
