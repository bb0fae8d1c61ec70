//! Reserving hugetlb pages for a test and giving them back.
//!
//! The pool of each size is a host-wide knob
//! (`/sys/kernel/mm/hugepages/hugepages-<size>kB/nr_hugepages`, see the
//! kernel's admin-guide/mm/hugetlbpage.rst). A [`Reservation`] holds an
//! exclusive flock(2) on one host-wide lock file for its whole life, so tests
//! in parallel threads, in other test binaries and in other checkouts on the
//! same machine never see each other's pools; on drop it writes the previous
//! value back.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// The lock file every memvisor test that changes a hugetlb pool takes.
pub const LOCK_PATH: &str = "/tmp/memvisor-hugetlb.lock";

/// A hugetlb page size the host may offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSize {
    /// 2 MiB pages.
    M2,
    /// 1 GiB pages.
    G1,
}

impl PageSize {
    /// Bytes per page.
    #[must_use]
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::M2 => 2 << 20,
            PageSize::G1 => 1 << 30,
        }
    }

    /// The pool's sysfs directory.
    #[must_use]
    pub fn sysfs_dir(self) -> PathBuf {
        PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB", self.bytes() >> 10))
    }

    fn read(self, counter: &str) -> Result<u64, String> {
        let p = self.sysfs_dir().join(counter);
        let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        text.trim().parse().map_err(|e| format!("{} holds {text:?}: {e}", p.display()))
    }

    /// `nr_hugepages`: the pool size.
    ///
    /// # Errors
    /// When the host has no such pool.
    pub fn pool(self) -> Result<u64, String> {
        self.read("nr_hugepages")
    }

    /// Pages free and not promised to a mapping (`free - resv`).
    ///
    /// # Errors
    /// When the host has no such pool.
    pub fn available(self) -> Result<u64, String> {
        Ok(self.read("free_hugepages")?.saturating_sub(self.read("resv_hugepages")?))
    }

    fn set_pool(self, pages: u64) -> Result<(), String> {
        let p = self.sysfs_dir().join("nr_hugepages");
        std::fs::write(&p, format!("{pages}\n")).map_err(|e| format!("cannot write {pages} to {}: {e}", p.display()))
    }
}

/// How many times [`Reservation::reserve`] drops caches and compacts before
/// it reports a shortfall.
const RETRIES: u32 = 3;

/// Writes back dirty data, drops the clean page cache and compacts memory, so
/// that a following hugetlb pool increase finds contiguous free memory.
/// Failures are reported and otherwise ignored: the retry then says whether
/// the pool grew.
fn make_contiguous_memory() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    for (knob, value) in [("/proc/sys/vm/drop_caches", "1\n"), ("/proc/sys/vm/compact_memory", "1\n")] {
        if let Err(e) = std::fs::write(knob, value) {
            eprintln!("memvisor-tests: cannot write {knob}: {e}");
        }
    }
}

/// An exclusive hold on [`LOCK_PATH`]; closing the file releases it.
#[derive(Debug)]
pub struct PoolLock {
    _file: File,
}

impl PoolLock {
    /// Blocks until this caller holds the lock.
    ///
    /// # Panics
    /// When the lock file cannot be opened or locked.
    #[must_use]
    pub fn acquire() -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o666)
            .open(LOCK_PATH)
            .unwrap_or_else(|e| panic!("cannot open {LOCK_PATH}: {e}"));
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "cannot lock {LOCK_PATH}: {e}");
        }
        PoolLock { _file: f }
    }
}

/// A hugetlb pool set up for one test; the old pool size comes back on drop.
#[derive(Debug)]
pub struct Reservation {
    size: PageSize,
    previous: u64,
    _lock: PoolLock,
}

impl Reservation {
    /// Makes at least `pages` pages of `size` available.
    ///
    /// # Errors
    /// When the host refuses (no such pool, no permission, or not enough
    /// contiguous memory): the message says what was asked and what the
    /// pool holds. The pool is restored before returning.
    pub fn reserve(size: PageSize, pages: u64) -> Result<Self, String> {
        let lock = PoolLock::acquire();
        let previous = size.pool()?;
        let r = Reservation { size, previous, _lock: lock };
        let target = previous + pages.saturating_sub(size.available()?);
        let mut now = size.available()?;
        // A huge page needs physically contiguous free memory. After a build
        // the host's free memory is mostly clean page cache, which the
        // kernel's allocation of a 1 GiB page (alloc_contig_range) cannot
        // always move out of the way: drop the clean cache, compact, and ask
        // again before giving up (admin-guide/sysctl/vm.rst, drop_caches and
        // compact_memory). Both only discard or move reclaimable memory.
        for attempt in 0..=RETRIES {
            if now >= pages {
                break;
            }
            if attempt > 0 {
                make_contiguous_memory();
            }
            size.set_pool(target)?;
            now = size.available()?;
        }
        if now < pages {
            return Err(format!(
                "the host refused to reserve {pages} hugetlb pages of {} KiB: after raising nr_hugepages from {previous} to {} only {now} are free \
                 (not enough contiguous free memory?)",
                size.bytes() >> 10,
                size.pool()?,
            ));
        }
        Ok(r)
    }

    /// Makes sure no page of `size` is available (for the "not reserved"
    /// error test): frees the pool's free pages.
    ///
    /// # Errors
    /// When the pool cannot be shrunk; the message says what is left.
    pub fn none_available(size: PageSize) -> Result<Self, String> {
        let lock = PoolLock::acquire();
        let previous = size.pool()?;
        let r = Reservation { size, previous, _lock: lock };
        let available = size.available()?;
        if available > 0 {
            size.set_pool(previous - available.min(previous))?;
        }
        let now = size.available()?;
        if now > 0 {
            return Err(format!("cannot empty the {} KiB hugetlb pool: {now} pages still free", size.bytes() >> 10));
        }
        Ok(r)
    }

    /// The page size.
    #[must_use]
    pub fn size(&self) -> PageSize {
        self.size
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Err(e) = self.size.set_pool(self.previous) {
            eprintln!("memvisor-tests: could not give back hugetlb pages: {e}");
        }
    }
}
