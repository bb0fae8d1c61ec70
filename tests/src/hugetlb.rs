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

    /// Raises the pool to `target` pages, as far as the host allows.
    ///
    /// A huge page needs physically contiguous free memory. After a build
    /// the host's free memory is mostly clean page cache, and dentry and
    /// inode slabs sit in pageblocks across every 1 GiB range; the kernel's
    /// allocation of a 1 GiB page (alloc_contig_range) cannot move slab out
    /// of the way. So when the pool falls short, this drops the clean cache
    /// and the reclaimable slab, compacts, and asks again
    /// (admin-guide/sysctl/vm.rst: drop_caches = 3, compact_memory); both
    /// only discard or move reclaimable memory. Seen on the reference host:
    /// with only the cache dropped (1) a 1 GiB page still failed, with the
    /// slab dropped too (3) it was granted.
    fn grow_pool(self, target: u64) -> Result<(), String> {
        for attempt in 0..=RETRIES {
            if attempt > 0 {
                // Pages in flight (freed by a VM that just exited, or being
                // reported to this machine's own hypervisor) settle within a
                // second or so.
                std::thread::sleep(std::time::Duration::from_secs(1));
                make_contiguous_memory();
            }
            self.set_pool(target)?;
            if self.pool()? >= target {
                break;
            }
        }
        Ok(())
    }

    fn set_pool(self, pages: u64) -> Result<(), String> {
        let p = self.sysfs_dir().join("nr_hugepages");
        std::fs::write(&p, format!("{pages}\n")).map_err(|e| format!("cannot write {pages} to {}: {e}", p.display()))
    }
}

/// How many times a pool increase drops caches and compacts before it gives
/// up.
const RETRIES: u32 = 5;

/// Writes back dirty data, drops the clean page cache and the reclaimable
/// slab, and compacts memory, so that a following hugetlb pool increase finds
/// contiguous free memory.
/// Failures are reported and otherwise ignored: the retry then says whether
/// the pool grew.
fn make_contiguous_memory() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    for (knob, value) in [("/proc/sys/vm/drop_caches", "3\n"), ("/proc/sys/vm/compact_memory", "1\n")] {
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
    /// Free pages held by `none_available`, unmapped (back to the pool)
    /// before the pool's size is restored.
    held: Option<HeldPages>,
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
        let r = Reservation { held: None, size, previous, _lock: lock };
        let missing = pages.saturating_sub(size.available()?);
        if missing > 0 {
            size.grow_pool(previous + missing)?;
        }
        let now = size.available()?;
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
    /// error test) by holding every free page in a mapping of this process,
    /// so the pool itself never shrinks: growing it back is what can fail on
    /// a busy host (see [`PageSize::grow_pool`]).
    ///
    /// # Errors
    /// When the free pages cannot be mapped; the message says what is left.
    pub fn none_available(size: PageSize) -> Result<Self, String> {
        let lock = PoolLock::acquire();
        let previous = size.pool()?;
        let available = size.available()?;
        let held = if available > 0 { Some(HeldPages::map(size, available)?) } else { None };
        let r = Reservation { held, size, previous, _lock: lock };
        let now = size.available()?;
        if now > 0 {
            return Err(format!("cannot hold the {} KiB hugetlb pool's free pages: {now} pages still free", size.bytes() >> 10));
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
        // Fields drop only after this body: give the held pages back first.
        drop(self.held.take());
        // A reservation only grows the pool, so this shrinks it, which
        // always succeeds (pages still mapped somewhere are freed when
        // their mapping goes).
        if let Err(e) = self.size.set_pool(self.previous) {
            eprintln!("memvisor-tests: could not give back hugetlb pages: {e}");
        }
    }
}

/// Free hugetlb pages taken out of the pool by mapping and touching them in
/// this process (MAP_HUGETLB with the size in the MAP_HUGE_* bits, mmap(2));
/// unmapped on drop.
#[derive(Debug)]
struct HeldPages {
    addr: *mut libc::c_void,
    len: usize,
}

impl HeldPages {
    fn map(size: PageSize, pages: u64) -> Result<Self, String> {
        let len = usize::try_from(pages * size.bytes()).map_err(|e| format!("{pages} pages do not fit in memory: {e}"))?;
        let huge = match size {
            PageSize::M2 => libc::MAP_HUGE_2MB,
            PageSize::G1 => libc::MAP_HUGE_1GB,
        };
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_POPULATE | huge;
        // SAFETY: a new anonymous mapping at an address the kernel picks;
        // no existing memory is affected.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if addr == libc::MAP_FAILED {
            return Err(format!("cannot map {pages} hugetlb pages of {} KiB: {}", size.bytes() >> 10, std::io::Error::last_os_error()));
        }
        Ok(HeldPages { addr, len })
    }
}

impl Drop for HeldPages {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` is the mapping `map` made; nothing else
        // refers to it.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
