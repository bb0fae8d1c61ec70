//! Host mappings that back guest RAM, one per RAM range.
//!
//! Owns the `mmap`, the optional memfd and the `munmap` on drop. Each
//! [`Backing`] kind is really what it says: private anonymous memory,
//! a memfd mapped `MAP_SHARED`, anonymous memory with `MADV_HUGEPAGE`, or a
//! hugetlbfs memfd (`MFD_HUGETLB` with the page size encoded as in
//! memfd_create(2)). Placement (mbind) happens before the first touch;
//! prefaulting and mlock after it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::config::Backing;
use crate::memory::MemoryError;

/// Alignment of every mapping's start: 2 MiB so THP and 2 MiB guest pages
/// line up with host huge pages; hugetlb mappings are aligned by the kernel
/// to their own page size.
const MAPPING_ALIGN: usize = 2 << 20;

/// `MFD_HUGE_SHIFT`: memfd_create(2) encodes log2(page size) at bit 26.
const MFD_HUGE_SHIFT: u32 = 26;

/// A host mapping backing one guest RAM range.
#[derive(Debug)]
pub struct HostMapping {
    addr: NonNull<u8>,
    size: usize,
    backing: Backing,
    /// The memfd for memfd and hugetlb backings (hole punching needs it).
    fd: Option<OwnedFd>,
    /// A private mapping of a snapshot image (lazy restore): pages the
    /// guest has not touched live in the file, not in this process.
    from_image: bool,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointer
// is only an address. Concurrent access is governed by vm-memory's volatile
// accessors and by KVM, as for any guest memory.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `&HostMapping` exposes only the address and metadata.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `size` bytes of the given backing. Nothing is touched yet.
    ///
    /// # Errors
    /// [`MemoryError::Map`] (or [`MemoryError::Memfd`]) when the kernel refuses.
    pub fn new(backing: Backing, size: u64) -> Result<Self, MemoryError> {
        let size = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
        match backing {
            Backing::Anon | Backing::Thp => {
                let addr = map_aligned(size, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1)?;
                let mapping = HostMapping { addr, size, backing, fd: None, from_image: false };
                let advice = if backing == Backing::Thp { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
                mapping.madvise(advice).map_err(|source| MemoryError::Madvise { what: "MADV_(NO)HUGEPAGE", source })?;
                Ok(mapping)
            }
            Backing::Memfd => {
                let fd = memfd("memvisor-ram", libc::MFD_CLOEXEC, size)?;
                let addr = map_aligned(size, libc::MAP_SHARED, fd.as_raw_fd())?;
                Ok(HostMapping { addr, size, backing, fd: Some(fd), from_image: false })
            }
            Backing::Hugetlb2M | Backing::Hugetlb1G => {
                let page = backing.hugetlb_page_size().expect("hugetlb backings have a page size");
                let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (page.trailing_zeros() << MFD_HUGE_SHIFT);
                let fd = memfd("memvisor-ram-hugetlb", flags, size)?;
                // SAFETY: a fresh shared mapping of our own memfd; the kernel
                // picks an address aligned to the huge page size.
                let ptr = unsafe {
                    libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
                };
                if ptr == libc::MAP_FAILED {
                    return Err(MemoryError::Map { size: size as u64, source: std::io::Error::last_os_error() });
                }
                let addr = NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::Map { size: size as u64, source: std::io::Error::other("null mapping") })?;
                Ok(HostMapping { addr, size, backing, fd: Some(fd), from_image: false })
            }
        }
    }

    /// A private, copy-on-write mapping of `size` bytes of `file` from
    /// `offset`: pages are read from the file on first touch and copied on
    /// first write (lazy snapshot restore). `backing` is what the VM was
    /// configured with, kept for the report.
    ///
    /// # Errors
    /// [`MemoryError::Map`].
    pub fn file_private(backing: Backing, file: &std::fs::File, offset: u64, size: u64) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
        let off = libc::off_t::try_from(offset).map_err(|_| MemoryError::TooLarge(offset))?;
        // SAFETY: a fresh private mapping of a file we hold open; writes go
        // to private copies, never to the file.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, file.as_raw_fd(), off) };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Map { size, source: std::io::Error::last_os_error() });
        }
        let addr = NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::Map { size, source: std::io::Error::other("null mapping") })?;
        let mapping = HostMapping { addr, size: len, backing, fd: None, from_image: true };
        if backing == Backing::Thp {
            // Pages the guest writes become private anonymous copies, which
            // THP can back like any anonymous memory.
            mapping.madvise(libc::MADV_HUGEPAGE).map_err(|source| MemoryError::Madvise { what: "MADV_HUGEPAGE", source })?;
        }
        Ok(mapping)
    }

    /// Host virtual address of the first byte.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Length in bytes.
    #[must_use]
    pub fn size(&self) -> usize {
        self.size
    }

    /// The backing kind.
    #[must_use]
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Whether this maps a snapshot image privately (lazy restore).
    #[must_use]
    pub fn from_image(&self) -> bool {
        self.from_image
    }

    /// The memfd, for memfd and hugetlb backings.
    #[must_use]
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }

    /// Populates every page writable (`MADV_POPULATE_WRITE`, Linux 5.14),
    /// so the guest never takes a host fault on first touch.
    ///
    /// # Errors
    /// [`MemoryError::Madvise`], e.g. when hugetlb pages run out.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        self.madvise(libc::MADV_POPULATE_WRITE).map_err(|source| MemoryError::Madvise { what: "MADV_POPULATE_WRITE", source })
    }

    /// Locks the mapping in memory (mlock(2)).
    ///
    /// # Errors
    /// [`MemoryError::Mlock`] (RLIMIT_MEMLOCK, or not enough memory).
    pub fn mlock(&self) -> Result<(), MemoryError> {
        // SAFETY: locking our own mapping has no memory-safety effect.
        if unsafe { libc::mlock(self.as_ptr().cast(), self.size) } != 0 {
            return Err(MemoryError::Mlock(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// madvise(2) over the whole mapping.
    fn madvise(&self, advice: libc::c_int) -> std::io::Result<()> {
        // SAFETY: the range is exactly our mapping; the advice values used
        // here do not invalidate memory Rust holds references to.
        if unsafe { libc::madvise(self.as_ptr().cast(), self.size, advice) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing refers to it any more
        // (KVM memslots and vm-memory regions are dropped before us).
        unsafe { libc::munmap(self.as_ptr().cast(), self.size) };
    }
}

/// Creates a memfd of `size` bytes.
fn memfd(name: &str, flags: libc::c_uint, size: usize) -> Result<OwnedFd, MemoryError> {
    let cname = std::ffi::CString::new(name).expect("memfd names have no NUL");
    // SAFETY: valid NUL-terminated name; returns a new fd or -1.
    let raw = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if raw < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = libc::off_t::try_from(size).map_err(|_| MemoryError::TooLarge(size as u64))?;
    // SAFETY: ftruncate on our own fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    Ok(fd)
}

/// Maps `size` bytes at a [`MAPPING_ALIGN`]-aligned address by
/// over-reserving and trimming.
fn map_aligned(size: usize, flags: libc::c_int, fd: libc::c_int) -> Result<NonNull<u8>, MemoryError> {
    let err = |source| MemoryError::Map { size: size as u64, source };
    let reserve = size.checked_add(MAPPING_ALIGN).ok_or(MemoryError::TooLarge(size as u64))?;
    // SAFETY: a fresh PROT_NONE reservation; nothing else refers to it.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), reserve, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    };
    if base == libc::MAP_FAILED {
        return Err(err(std::io::Error::last_os_error()));
    }
    let start = (base as usize).next_multiple_of(MAPPING_ALIGN);
    // SAFETY: MAP_FIXED over a range inside our own reservation.
    let ptr = unsafe {
        libc::mmap(start as *mut libc::c_void, size, libc::PROT_READ | libc::PROT_WRITE, flags | libc::MAP_FIXED, fd, 0)
    };
    if ptr == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: releasing our own reservation.
        unsafe { libc::munmap(base, reserve) };
        return Err(err(e));
    }
    // Trim the unused head and tail of the reservation.
    let head = start - base as usize;
    let tail = reserve - head - size;
    // SAFETY: both ranges are parts of our reservation outside the mapping.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| err(std::io::Error::other("null mapping")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anon_mapping_is_aligned_and_writable() {
        let m = HostMapping::new(Backing::Anon, 4 << 20).unwrap();
        assert_eq!(m.as_ptr() as usize % MAPPING_ALIGN, 0);
        // SAFETY: inside our own fresh mapping.
        unsafe { m.as_ptr().add(4095).write(7) };
        assert!(m.fd().is_none());
    }

    #[test]
    fn memfd_mapping_has_a_file() {
        let m = HostMapping::new(Backing::Memfd, 2 << 20).unwrap();
        assert!(m.fd().is_some());
        m.prefault().unwrap();
    }
}
