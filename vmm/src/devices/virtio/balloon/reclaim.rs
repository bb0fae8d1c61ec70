//! Giving guest RAM back to the host: the only code that drops host pages.
//!
//! Anonymous and THP backings: `MADV_DONTNEED` (the next touch faults in a
//! zero page). memfd and hugetlbfs backings: `fallocate(PUNCH_HOLE |
//! KEEP_SIZE)` on the backing file, because `MADV_DONTNEED` on a shared
//! mapping only unmaps and leaves the file's pages (host-facts.md). Either
//! way KVM's MMU notifier drops its mappings, and the guest reads zeros
//! next time. Ranges are in RAM offsets (see [`super::pages`]) and are split
//! at region boundaries; nothing outside guest RAM can be named.
//!
//! A lazily restored VM maps a snapshot image privately
//! (`HostMapping::file_private`); `MADV_DONTNEED` there frees the guest's
//! private copies, and a released page reads the image's bytes again rather
//! than zeros. The balloon makes no promise about a page's contents once it
//! is back with the guest (virtio 1.2 §5.5.6: only
//! `VIRTIO_BALLOON_F_PAGE_POISON`, which memvisor does not offer, would
//! constrain them), so both are correct.
//!
//! A released range changes the guest's memory without a guest write, so
//! it is marked in the VMM-write bitmap (`memory::vmm_writes`), as every
//! device write is: dirty tracking then sees the page as changed.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use vm_memory::GuestMemoryBackend;
use vm_memory::bitmap::Bitmap;

use crate::config::Backing;
use crate::memory::{GuestMemory, GuestRam};

/// The largest host page size among the regions: the unit in which the
/// balloon releases memory (a THP-backed region releases whole 2 MiB so
/// that huge pages are not split).
#[must_use]
pub fn host_page_size(ram: &GuestRam) -> u64 {
    ram.regions()
        .iter()
        .map(|r| match r.mapping.backing() {
            Backing::Anon | Backing::Memfd => super::pages::PAGE,
            Backing::Thp => memvisor_abi::layout::PAGE_SIZE_2M,
            b => b.hugetlb_page_size().unwrap_or(super::pages::PAGE),
        })
        .max()
        .unwrap_or(super::pages::PAGE)
}

/// What one release did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Bytes released.
    pub bytes: u64,
    /// System calls made.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Bytes of the calls that failed.
    pub failed_bytes: u64,
    /// Time spent in the calls.
    pub ns: u64,
}

impl Released {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: Released) {
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.calls = self.calls.saturating_add(other.calls);
        self.errors = self.errors.saturating_add(other.errors);
        self.failed_bytes = self.failed_bytes.saturating_add(other.failed_bytes);
        self.ns = self.ns.saturating_add(other.ns);
    }
}

/// Releases `len` bytes of RAM from RAM offset `start`; parts beyond RAM
/// are ignored (callers pass validated ranges).
#[must_use]
pub fn release(ram: &GuestRam, start: u64, len: u64) -> Released {
    let view = RamView::of(ram);
    // SAFETY: `ram` is borrowed for the call, so its mappings are live.
    unsafe { view.release(start, len, |_, _, _| {}) }
}

/// One region as a release needs it.
#[derive(Debug)]
struct ViewRegion {
    /// Host address of the mapping's first byte (an address only: used
    /// as a pointer under `release`'s contract).
    host: usize,
    /// Its length.
    size: u64,
    /// The backing file (memfd, hugetlbfs), whose holes are punched.
    fd: Option<RawFd>,
}

/// What a release needs of guest RAM, in a form the balloon's worker
/// thread can hold: each region's host address, size and backing file,
/// and vm-memory's view of the regions (their VMM-write bitmaps).
///
/// It borrows nothing: the mappings and files stay owned by the
/// [`GuestRam`] it was made from, so every use must happen while that
/// RAM is alive ([`RamView::release`]'s contract).
#[derive(Debug)]
pub struct RamView {
    regions: Vec<ViewRegion>,
    memory: GuestMemory,
}

impl RamView {
    /// The view of `ram`.
    #[must_use]
    pub fn of(ram: &GuestRam) -> Self {
        let regions = ram
            .regions()
            .iter()
            .map(|r| ViewRegion { host: r.mapping.as_ptr() as usize, size: r.mapping.size() as u64, fd: r.mapping.fd().map(AsRawFd::as_raw_fd) })
            .collect();
        RamView { regions, memory: ram.memory().clone() }
    }

    /// Releases `len` bytes of RAM from RAM offset `start` (parts beyond
    /// RAM are ignored), calling `done(RAM offset, length, succeeded)` for
    /// each system call, in order. A released piece is marked in the
    /// VMM-write bitmap before `done` sees it.
    ///
    /// # Safety
    /// The [`GuestRam`] this view was made of must be alive (mapped, its
    /// files open) for the whole call.
    #[must_use]
    pub unsafe fn release(&self, start: u64, len: u64, mut done: impl FnMut(u64, u64, bool)) -> Released {
        let mut out = Released::default();
        let end = start.saturating_add(len);
        let mut base = 0u64;
        for (region, mapping) in self.regions.iter().zip(self.memory.iter()) {
            let (s, e) = (start.max(base), end.min(base + region.size));
            if s < e {
                let (off, n) = (s - base, e - s);
                let t = Instant::now();
                // SAFETY: the caller keeps the RAM alive (this function's
                // contract); `off + n` is inside the region.
                let result = unsafe { release_in(region, off, n) };
                out.ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                out.calls += 1;
                let ok = result.is_ok();
                match result {
                    Ok(()) => {
                        out.bytes += n;
                        mapping.bitmap().mark_dirty(off as usize, n as usize);
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.failed_bytes += n;
                        log::warn!("releasing {n} bytes of guest RAM at RAM offset {s:#x} failed: {e}");
                    }
                }
                done(s, n, ok);
            }
            base += region.size;
        }
        out
    }
}

/// Marks `len` bytes of RAM from RAM offset `start` as changed by the VMM
/// (parts beyond RAM are ignored): a deflated page that had been released
/// reads as zeros, not as the copy a snapshot may hold, so the next diff
/// must save it ([`super::state`]: snapshots skip released pages).
pub fn mark_changed(ram: &GuestRam, start: u64, len: u64) {
    let end = start.saturating_add(len);
    let mut base = 0u64;
    for (region, mapping) in ram.regions().iter().zip(ram.memory().iter()) {
        let size = region.range.size;
        let (s, e) = (start.max(base), end.min(base + size));
        if s < e {
            mapping.bitmap().mark_dirty((s - base) as usize, (e - s) as usize);
        }
        base += size;
    }
}

/// One call on one region: `[off, off + len)` lies inside it.
///
/// A lazily restored region maps the snapshot image privately; there
/// `MADV_DONTNEED` drops the private copy, and the page reads the image's
/// bytes again, not zeros, on its next touch. That is enough for the
/// balloon: its pages are not the guest's to read, their contents after a
/// deflate are undefined without `VIRTIO_BALLOON_F_PAGE_POISON` (virtio 1.2
/// §5.5.6.1; not offered), and snapshots save what the page then holds.
///
/// # Safety
/// The region's mapping and file must be alive.
unsafe fn release_in(region: &ViewRegion, off: u64, len: u64) -> std::io::Result<()> {
    if off.checked_add(len).is_none_or(|e| e > region.size) {
        return Err(std::io::Error::other("range outside the mapping"));
    }
    let (ioff, ilen) = (usize::try_from(off).map_err(std::io::Error::other)?, usize::try_from(len).map_err(std::io::Error::other)?);
    match region.fd {
        Some(fd) => {
            let (o, l) = (libc::off_t::try_from(off).map_err(std::io::Error::other)?, libc::off_t::try_from(len).map_err(std::io::Error::other)?);
            // SAFETY: fallocate on our own memfd (open: the caller's
            // contract); punching a hole frees the file's pages and our
            // mapping reads zeros there afterwards, which is what the guest
            // agreed to by ballooning them. No Rust reference points into
            // guest RAM.
            let rc = unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, o, l) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        None => {
            // SAFETY: the range is inside our private mapping (checked
            // above; mapped: the caller's contract): anonymous, or a lazily
            // restored snapshot image. No Rust reference points into guest
            // RAM. MADV_DONTNEED drops the range's page-table entries:
            // anonymous pages are freed and read zero on next touch; in an
            // image mapping the guest's private copies are freed and the
            // next touch reads the image's page again (clean page cache the
            // host can drop at will).
            let rc = unsafe { libc::madvise((region.host + ioff) as *mut libc::c_void, ilen, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

    fn resident(ram: &GuestRam) -> u64 {
        let m = &ram.regions()[0].mapping;
        let pages = m.size() / 4096;
        let mut vec = vec![0u8; pages];
        // SAFETY: mincore on our own mapping into a buffer of one byte per page.
        assert_eq!(unsafe { libc::mincore(m.as_ptr().cast(), m.size(), vec.as_mut_ptr()) }, 0);
        vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096
    }

    fn filled(backing: Backing) -> GuestRam {
        let config = VmConfig { mem_size: 8 << 20, backing, prefault: true, ..VmConfig::default() };
        let ram = GuestRam::new(&config).unwrap();
        let m = &ram.regions()[0].mapping;
        // SAFETY: writing our own fresh mapping.
        unsafe { m.as_ptr().write_bytes(0x5a, m.size()) };
        ram
    }

    #[test]
    fn anon_release_drops_pages_and_reads_zero() {
        let ram = filled(Backing::Anon);
        let r = release(&ram, 1 << 20, 2 << 20);
        assert_eq!((r.bytes, r.errors), (2 << 20, 0));
        assert_eq!(resident(&ram), 6 << 20);
        // SAFETY: reading our own mapping.
        let b = unsafe { *ram.regions()[0].mapping.as_ptr().add(1 << 20) };
        assert_eq!(b, 0);
        assert!(crate::memory::vmm_writes::take(&ram)[0].is_some(), "released pages count as VMM writes");
    }

    #[test]
    fn memfd_release_punches_holes() {
        let ram = filled(Backing::Memfd);
        let r = release(&ram, 0, 4 << 20);
        assert_eq!((r.bytes, r.errors), (4 << 20, 0));
        // SAFETY: reading our own mapping.
        let b = unsafe { *ram.regions()[0].mapping.as_ptr().add(4095) };
        assert_eq!(b, 0);
    }

    /// Whether each page of `[addr, addr + len)` is mapped in this
    /// process (the pagemap present bit, Documentation/admin-guide/mm/pagemap.rst).
    fn mapped_pages(addr: *const u8, len: usize) -> usize {
        use std::os::unix::fs::FileExt;
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut buf = vec![0u8; len / 4096 * 8];
        pagemap.read_exact_at(&mut buf, addr as u64 / 4096 * 8).unwrap();
        buf.chunks_exact(8).filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) & (1 << 63) != 0).count()
    }

    #[test]
    fn image_release_frees_private_copies_and_reads_the_image_again() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("memvisor-reclaim-image-{}", std::process::id()));
        let mut image = std::fs::File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        image.write_all(&vec![0x77u8; 8 << 20]).unwrap();
        let config = VmConfig { mem_size: 8 << 20, backing: crate::config::Backing::Anon, ..VmConfig::default() };
        let ram = GuestRam::from_image(&config, &image).unwrap();
        let m = &ram.regions()[0].mapping;
        // SAFETY: writing our own private mapping (copies on write; the
        // file is not changed).
        unsafe { m.as_ptr().write_bytes(0x5a, m.size()) };
        assert_eq!(mapped_pages(m.as_ptr(), m.size()), 2048);
        let r = release(&ram, 1 << 20, 2 << 20);
        assert_eq!((r.bytes, r.errors), (2 << 20, 0));
        // SAFETY: the range lies inside the mapping.
        let released = unsafe { m.as_ptr().add(1 << 20) };
        assert_eq!(mapped_pages(released, 2 << 20), 0, "the guest's copies are gone");
        assert_eq!(mapped_pages(m.as_ptr(), m.size()), 2048 - 512);
        // SAFETY: reading our own mapping.
        let (inside, outside) = unsafe { (*released, *m.as_ptr()) };
        assert_eq!((inside, outside), (0x77, 0x5a), "released pages read the image, the rest the guest's writes");
        assert!(crate::memory::vmm_writes::take(&ram)[0].is_some(), "released pages count as VMM writes");
    }

    #[test]
    fn ranges_beyond_ram_are_cut() {
        let ram = filled(Backing::Anon);
        assert_eq!(release(&ram, 6 << 20, 100 << 20).bytes, 2 << 20);
        assert_eq!(release(&ram, 100 << 20, 4096).calls, 0);
        assert_eq!(host_page_size(&ram), 4096);
    }
}
