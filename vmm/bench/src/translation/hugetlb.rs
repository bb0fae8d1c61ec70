//! Reserving hugetlb pages for the benchmark's hugetlb backings, and giving
//! them back.
//!
//! The pools are host-wide (`/sys/kernel/mm/hugepages/hugepages-<kB>/
//! nr_hugepages`, kernel admin-guide/mm/hugetlbpage.rst). A [`PoolGuard`]
//! takes the same flock as memvisor's tests (`/tmp/memvisor-hugetlb.lock`,
//! tests/src/hugetlb.rs) for its whole life, so a benchmark and tests on the
//! same machine never resize a pool under each other, raises the pool to
//! the pages needed and writes the old size back on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// The lock file shared with the tests.
const LOCK_PATH: &str = "/tmp/memvisor-hugetlb.lock";

/// How many times a pool increase that fell short compacts memory and tries
/// again.
const RETRIES: u32 = 3;

/// A raised hugetlb pool; the previous size comes back on drop.
#[derive(Debug)]
pub struct PoolGuard {
    knob: PathBuf,
    previous: u64,
    _lock: File,
}

fn read(dir: &std::path::Path, f: &str) -> Result<u64, String> {
    let p = dir.join(f);
    let t = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    t.trim().parse().map_err(|e| format!("{} holds {t:?}: {e}", p.display()))
}

impl PoolGuard {
    /// Makes at least `pages` free pages of `page_bytes` available.
    ///
    /// # Errors
    /// A message when the pool cannot be read, raised or does not grow
    /// enough (not enough contiguous free memory); the pool is restored.
    pub fn reserve(page_bytes: u64, pages: u64) -> Result<Self, String> {
        let lock = File::options().create(true).truncate(false).write(true).open(LOCK_PATH).map_err(|e| format!("cannot open {LOCK_PATH}: {e}"))?;
        // SAFETY: flock on a file we own; blocks until other holders finish.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("cannot lock {LOCK_PATH}: {}", std::io::Error::last_os_error()));
        }
        let dir = PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_bytes >> 10));
        let previous = read(&dir, "nr_hugepages")?;
        let guard = PoolGuard { knob: dir.join("nr_hugepages"), previous, _lock: lock };
        let available = || Ok::<u64, String>(read(&dir, "free_hugepages")?.saturating_sub(read(&dir, "resv_hugepages")?));
        let mut now = available()?;
        for attempt in 0..=RETRIES {
            if now >= pages {
                return Ok(guard);
            }
            if attempt > 0 {
                // Memory freed by a VM that just exited settles within a
                // second or so; compaction then moves movable pages out of
                // the way. (The page cache is left alone: dropping it is the
                // host owner's call, not a benchmark's.)
                std::thread::sleep(std::time::Duration::from_secs(1));
                if let Err(e) = std::fs::write("/proc/sys/vm/compact_memory", "1\n") {
                    log::warn!("cannot compact memory: {e}");
                }
            }
            let total = read(&dir, "nr_hugepages")?;
            std::fs::write(&guard.knob, (total + pages - now).to_string()).map_err(|e| format!("cannot write {}: {e}", guard.knob.display()))?;
            now = available()?;
        }
        Err(format!("the host gave only {now} of {pages} hugetlb pages of {} KiB after {RETRIES} compactions (not enough contiguous free memory)", page_bytes >> 10))
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.knob, self.previous.to_string()) {
            log::warn!("cannot give hugetlb pages back ({}): {e}", self.knob.display());
        }
    }
}
