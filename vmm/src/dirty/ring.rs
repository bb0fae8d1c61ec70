//! Per-vCPU dirty rings (KVM api.rst 8.29, KVM_CAP_DIRTY_LOG_RING).
//!
//! Each vCPU has a ring of `struct kvm_dirty_gfn { u32 flags; u32 slot;
//! u64 offset; }` mapped from the vCPU fd at page offset
//! `KVM_DIRTY_LOG_PAGE_OFFSET`. KVM publishes an entry by setting
//! `KVM_DIRTY_GFN_F_DIRTY`; we collect it and mark it
//! `KVM_DIRTY_GFN_F_RESET`; `KVM_RESET_DIRTY_RINGS` then re-protects those
//! pages and frees the entries. The flags are read with acquire and written
//! with release ordering, as the ACQ_REL variant of the capability requires.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::dirty::DirtyError;

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page.
const GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: userspace has collected the entry.
const GFN_F_RESET: u32 = 2;
/// Size of one `kvm_dirty_gfn`.
pub const ENTRY_SIZE: u64 = 16;
/// Entries [`DirtyRing::drain`] reads before handing them over: 64 of 16
/// bytes, 1 KiB of stack.
pub const DRAIN_BATCH: usize = 64;
/// Host page size the ring offset is expressed in.
const PAGE_SIZE: u64 = 4096;

/// Enables rings of `bytes` per vCPU; must happen before any vCPU exists.
///
/// # Errors
/// [`DirtyError::Kvm`].
pub fn enable(vm: &VmFd, bytes: u64, acq_rel: bool) -> Result<(), DirtyError> {
    let cap = if acq_rel { KVM_CAP_DIRTY_LOG_RING_ACQ_REL } else { KVM_CAP_DIRTY_LOG_RING };
    let req = kvm_enable_cap { cap, args: [bytes, 0, 0, 0], ..Default::default() };
    vm.enable_cap(&req).map_err(|e| DirtyError::Kvm { what: "KVM_ENABLE_CAP(DIRTY_LOG_RING)", source: std::io::Error::from_raw_os_error(e.errno()) })
}

/// One vCPU's mapped ring.
#[derive(Debug)]
pub struct DirtyRing {
    base: NonNull<u8>,
    entries: u32,
    /// Next entry to look at (free-running; index = fetch % entries).
    fetch: u32,
}

// SAFETY: the ring is shared memory with KVM accessed only through atomics
// and volatile reads; moving the owner between threads is fine.
unsafe impl Send for DirtyRing {}

/// A dirty page from a ring: memslot (address space in the high 16 bits)
/// and page offset within the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingEntry {
    /// `slot` field: as_id << 16 | slot id.
    pub slot: u32,
    /// Page offset inside the slot.
    pub offset: u64,
}

impl DirtyRing {
    /// Maps vCPU `vcpu`'s ring of `bytes`.
    ///
    /// # Errors
    /// [`DirtyError::MapRing`].
    pub fn map(vcpu_fd: &VcpuFd, vcpu: usize, bytes: u64) -> Result<Self, DirtyError> {
        let len = usize::try_from(bytes).map_err(|_| DirtyError::MapRing { vcpu, source: std::io::Error::other("ring too large") })?;
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET as i32) * PAGE_SIZE as libc::off_t;
        // SAFETY: mapping KVM's ring for this vCPU fd, as api.rst describes;
        // the mapping is released in Drop.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, vcpu_fd.as_raw_fd(), offset) };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyError::MapRing { vcpu, source: std::io::Error::last_os_error() });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(DirtyError::MapRing { vcpu, source: std::io::Error::other("null mapping") })?;
        let ring = DirtyRing { base, entries: (bytes / ENTRY_SIZE) as u32, fetch: 0 };
        // KVM api.rst (KVM_CAP_DIRTY_LOG_RING) requires a power-of-two ring
        // size, and `drain` indexes with a mask that relies on it.
        if !ring.entries.is_power_of_two() {
            return Err(DirtyError::MapRing { vcpu, source: std::io::Error::other(format!("a ring of {bytes} bytes is not a power of two of entries")) });
        }
        Ok(ring)
    }

    /// Collects every published entry into `out`, marking each collected.
    /// Returns how many were collected.
    pub fn harvest(&mut self, out: &mut Vec<RingEntry>) -> usize {
        self.drain(|batch| out.extend_from_slice(batch))
    }

    /// Hands every published entry to `f`, in ring order and in batches of
    /// at most [`DRAIN_BATCH`], marking each collected; returns how many
    /// there were.
    ///
    /// The batches keep the atomics out of the caller's loop: the flags
    /// are read with acquire and written with release ordering, and the
    /// compiler may keep nothing in registers across those, so a caller
    /// routing entry by entry between them reloaded its own state (vectors,
    /// slot table) for every entry. A batch is 1 KiB on the stack, read
    /// back from L1.
    pub fn drain(&mut self, mut f: impl FnMut(&[RingEntry])) -> usize {
        let mask = self.entries - 1;
        let base = self.base.as_ptr();
        let mut fetch = self.fetch;
        let mut batch = [RingEntry { slot: 0, offset: 0 }; DRAIN_BATCH];
        let mut n = 0;
        loop {
            let mut k = 0;
            while k < DRAIN_BATCH {
                let index = (fetch & mask) as usize;
                // SAFETY: index < entries (a power of two, checked in
                // `map`), so the entry lies inside the mapping; `flags` is
                // a naturally aligned u32 KVM updates atomically.
                let entry = unsafe { base.add(index * ENTRY_SIZE as usize) };
                // SAFETY: as above; AtomicU32 has the layout of u32.
                let flags = unsafe { &*entry.cast::<AtomicU32>() };
                if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                    break;
                }
                // SAFETY: the entry is published (DIRTY seen with acquire),
                // so its slot and offset fields are stable until we reset it.
                let (slot, offset) = unsafe { (entry.add(4).cast::<u32>().read_volatile(), entry.add(8).cast::<u64>().read_volatile()) };
                batch[k] = RingEntry { slot, offset };
                // KVM frees collected entries only at KVM_RESET_DIRTY_RINGS,
                // which the caller issues after handling them.
                flags.store(GFN_F_RESET, Ordering::Release);
                fetch = fetch.wrapping_add(1);
                k += 1;
            }
            if k > 0 {
                f(&batch[..k]);
                n += k;
            }
            if k < DRAIN_BATCH {
                break;
            }
        }
        self.fetch = fetch;
        n
    }

    /// Ring capacity in entries.
    #[must_use]
    pub fn entries(&self) -> u32 {
        self.entries
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: our own mapping of exactly this length.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.entries as usize * ENTRY_SIZE as usize) };
    }
}
