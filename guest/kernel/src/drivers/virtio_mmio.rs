//! A polling virtio-mmio driver core (virtio 1.2 §4.2.2, §3.1.1) and split
//! virtqueues (§2.7), for modern (version 2) and legacy (version 1, §4.2.4:
//! QEMU's default for virtio-mmio) devices alike.
//!
//! Each queue lives in one page of the kernel's arena (identity-mapped, so
//! its virtual address is its guest-physical one): descriptor table at 0,
//! available ring at 1 KiB, used ring at 2 KiB, for [`QUEUE_SIZE`] entries
//! (which is also the legacy layout with a used-ring alignment of 2 KiB).
//! Buffers are always posted from descriptor 0 with one chain in flight per
//! queue, so the driver never has to track free descriptors: a driver path
//! that reuses its buffers waits for the device to use the chain first
//! ([`Virtqueue::submit_and_wait`]). memvisor's device completes a chain
//! inside the notifying MMIO write, so that wait costs one read there;
//! QEMU's completes it later, on its I/O thread. Ring-0 code is slow here
//! (every instruction emulated), so this stays minimal.

use memvisor_abi::cmdline::VirtioMmioDevice;
use memvisor_abi::layout::PAGE_SIZE;
use memvisor_abi::virtio::{desc, mmio, status};
use memvisor_guest_mm::paging::{FrameSource, MapError, PageSize, PageTableEntry as Pte, PhysAddr, VirtAddr};

use crate::Kernel;

/// Entries per queue (a power of two no larger than the device's maximum).
pub const QUEUE_SIZE: u16 = 64;
const AVAIL_OFFSET: u64 = 1024;
const USED_OFFSET: u64 = 2048;
// The legacy interface places the rings itself (virtio 1.2 §2.7.2, legacy
// note): the available ring right after the descriptors, the used ring at
// the next multiple of `QueueAlign` after the available ring (6 + 2 * size
// bytes). With `QueueAlign` = USED_OFFSET that is this page's layout.
const _: () = assert!(AVAIL_OFFSET == 16 * QUEUE_SIZE as u64);
const _: () = assert!(USED_OFFSET.is_power_of_two() && AVAIL_OFFSET + 6 + 2 * QUEUE_SIZE as u64 <= USED_OFFSET);
const _: () = assert!(USED_OFFSET + 6 + 8 * QUEUE_SIZE as u64 <= PAGE_SIZE);

/// Why the driver could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupError {
    /// No virtio-mmio device of the expected type at the address.
    NoDevice,
    /// The device refused the features (FEATURES_OK stayed clear).
    FeaturesRefused,
    /// No frames for the rings or the mapping.
    NoMemory,
    /// A queue the driver needs does not exist or is too small.
    NoQueue,
    /// The device's IRQ is not an input of the IOAPIC the kernel knows.
    NoIrqRoute,
}

/// A virtio-mmio register window.
#[derive(Debug, Clone, Copy)]
pub struct Mmio {
    base: u64,
    /// A version 1 (legacy) device: queues by page number, no FEATURES_OK.
    legacy: bool,
}

impl Mmio {
    /// Maps the start of `window` (uncached, kernel-only; up to a page of
    /// registers, page by page, since windows need not be page-aligned:
    /// QEMU's are 512 bytes apart) into the kernel's identity map and
    /// checks the magic, version and device type.
    ///
    /// # Errors
    /// [`SetupError::NoMemory`], or [`SetupError::NoDevice`] when no such
    /// device answers there (or the window cannot be mapped: it is not
    /// addressable, or lies in the kernel's own memory).
    pub fn probe(k: &mut Kernel, window: &VirtioMmioDevice, device_id: u32) -> Result<Self, SetupError> {
        let first = window.base & !(PAGE_SIZE - 1);
        PhysAddr::new(window.base).ok_or(SetupError::NoDevice)?;
        // Below 2^52 (checked above), so none of this overflows.
        let end = (window.base + window.size.min(PAGE_SIZE)).next_multiple_of(PAGE_SIZE);
        for page in (first..end).step_by(PAGE_SIZE as usize) {
            let va = VirtAddr::new(page).ok_or(SetupError::NoDevice)?;
            let pa = PhysAddr::new(page).ok_or(SetupError::NoDevice)?;
            match k.mapper.map_range(k.root, va, pa, PAGE_SIZE, PageSize::Size4K, Pte::WRITABLE | Pte::NO_EXECUTE | Pte::CACHE_DISABLE) {
                // Another window in the same page mapped it already.
                Ok(()) | Err(MapError::AlreadyMapped(_)) => {}
                Err(MapError::OutOfFrames) => return Err(SetupError::NoMemory),
                Err(_) => return Err(SetupError::NoDevice),
            }
        }
        let mut m = Mmio { base: window.base, legacy: false };
        let version = m.read(mmio::VERSION);
        if m.read(mmio::MAGIC_VALUE) != mmio::MAGIC || !(1..=2).contains(&version) || m.read(mmio::DEVICE_ID) != device_id {
            return Err(SetupError::NoDevice);
        }
        m.legacy = version == 1;
        Ok(m)
    }

    /// The window's guest-physical base.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads a 32-bit register.
    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: the window is mapped by `probe`; MMIO reads have no
        // memory-safety effect.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    /// Writes a 32-bit register.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    /// Negotiates features (§3.1.1 steps 1-6): resets, acknowledges, offers
    /// `wanted & offered`; returns what was accepted. A legacy device has
    /// only 32 feature bits and no FEATURES_OK step (§3.1.2), and is told
    /// the page size its queue addresses count in (§4.2.4).
    ///
    /// # Errors
    /// [`SetupError::FeaturesRefused`].
    pub fn negotiate(&self, wanted: u64) -> Result<u64, SetupError> {
        self.write(mmio::STATUS, 0);
        if self.legacy {
            self.write(mmio::GUEST_PAGE_SIZE, PAGE_SIZE as u32);
        }
        self.write(mmio::STATUS, status::ACKNOWLEDGE);
        self.write(mmio::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(mmio::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(mmio::DEVICE_FEATURES));
        let hi = if self.legacy {
            0
        } else {
            self.write(mmio::DEVICE_FEATURES_SEL, 1);
            u64::from(self.read(mmio::DEVICE_FEATURES))
        };
        let accepted = ((hi << 32) | lo) & wanted;
        self.write(mmio::DRIVER_FEATURES_SEL, 0);
        self.write(mmio::DRIVER_FEATURES, accepted as u32);
        if self.legacy {
            return Ok(accepted);
        }
        self.write(mmio::DRIVER_FEATURES_SEL, 1);
        self.write(mmio::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.write(mmio::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.read(mmio::STATUS) & status::FEATURES_OK == 0 {
            // Add FAILED; clearing the other bits is not allowed (§2.1.1).
            self.write(mmio::STATUS, self.read(mmio::STATUS) | status::FAILED);
            return Err(SetupError::FeaturesRefused);
        }
        Ok(accepted)
    }

    /// Sets `DRIVER_OK` (§3.1.1 step 8).
    pub fn driver_ok(&self) {
        let features_ok = if self.legacy { 0 } else { status::FEATURES_OK };
        self.write(mmio::STATUS, status::ACKNOWLEDGE | status::DRIVER | features_ok | status::DRIVER_OK);
    }

    /// Reads a 32-bit field of the configuration space.
    pub fn config_read(&self, offset: u64) -> u32 {
        self.read(mmio::CONFIG + offset)
    }

    /// Writes a 32-bit field of the configuration space.
    pub fn config_write(&self, offset: u64, value: u32) {
        self.write(mmio::CONFIG + offset, value);
    }

    /// Reads and acknowledges the interrupt status (the polling loop's
    /// one exit when there is nothing to do).
    pub fn take_interrupts(&self) -> u32 {
        let isr = self.read(mmio::INTERRUPT_STATUS);
        if isr != 0 {
            self.write(mmio::INTERRUPT_ACK, isr);
        }
        isr
    }
}

/// One split virtqueue in one arena page.
#[derive(Debug)]
pub struct Virtqueue {
    index: u16,
    page: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Virtqueue {
    /// Sets up queue `index` (§4.2.3.2; legacy: §4.2.4) with
    /// [`QUEUE_SIZE`] entries; with `size_first`, first writes that size to
    /// `QueueNum` (the hostile workload uses it to try a bad size).
    ///
    /// # Errors
    /// [`SetupError::NoQueue`] or [`SetupError::NoMemory`].
    pub fn new(k: &mut Kernel, m: &Mmio, index: u16, size_first: Option<u32>) -> Result<Self, SetupError> {
        m.write(mmio::QUEUE_SEL, u32::from(index));
        let max = m.read(mmio::QUEUE_NUM_MAX);
        let in_use = m.read(if m.legacy { mmio::QUEUE_PFN } else { mmio::QUEUE_READY }) != 0;
        if max < u32::from(QUEUE_SIZE) || in_use {
            return Err(SetupError::NoQueue);
        }
        // Fresh pool frames are zero (or cleared by the pool).
        let page = k.mapper.frames.alloc_table().ok_or(SetupError::NoMemory)?.as_u64();
        if let Some(n) = size_first {
            m.write(mmio::QUEUE_NUM, n);
        }
        m.write(mmio::QUEUE_NUM, u32::from(QUEUE_SIZE));
        if m.legacy {
            // The page number of the whole queue; the rings follow from it
            // and the alignment (checked against this layout above).
            m.write(mmio::QUEUE_ALIGN, USED_OFFSET as u32);
            m.write(mmio::QUEUE_PFN, (page / PAGE_SIZE) as u32);
            return Ok(Virtqueue { index, page, avail_idx: 0, used_seen: 0 });
        }
        let parts = [(mmio::QUEUE_DESC_LOW, page), (mmio::QUEUE_AVAIL_LOW, page + AVAIL_OFFSET), (mmio::QUEUE_USED_LOW, page + USED_OFFSET)];
        for (reg, addr) in parts {
            m.write(reg, addr as u32);
            m.write(reg + 4, (addr >> 32) as u32);
        }
        m.write(mmio::QUEUE_READY, 1);
        Ok(Virtqueue { index, page, avail_idx: 0, used_seen: 0 })
    }

    /// Writes descriptor `i` (§2.7.5).
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = (self.page + 16 * u64::from(i % QUEUE_SIZE)) as *mut u64;
        // SAFETY: descriptor i lies in this queue's arena page
        // (identity-mapped RW); the device reads it only after `publish`.
        unsafe {
            d.write_volatile(addr);
            d.add(1).write_volatile(u64::from(len) | (u64::from(flags) << 32) | (u64::from(next) << 48));
        }
    }

    /// Makes the chain starting at descriptor `head` available and notifies
    /// the device through `m` (§2.7.13). Returns whether the device used
    /// it by the time the notification returned.
    pub fn publish(&mut self, m: &Mmio, head: u16) -> bool {
        let avail = self.page + AVAIL_OFFSET;
        let slot = avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the ring is in this queue's page. x86 keeps stores in
        // order; the compiler fence keeps the index store after the entry.
        unsafe {
            (slot as *mut u16).write_volatile(head);
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
            ((avail + 2) as *mut u16).write_volatile(self.avail_idx);
        }
        m.write(mmio::QUEUE_NOTIFY, u32::from(self.index));
        self.poll_used()
    }

    /// Whether a new used entry arrived since the last call.
    pub fn poll_used(&mut self) -> bool {
        // SAFETY: the used ring is in this queue's page; the device writes it.
        let idx = unsafe { ((self.page + USED_OFFSET + 2) as *const u16).read_volatile() };
        if idx != self.used_seen {
            self.used_seen = idx;
            true
        } else {
            false
        }
    }

    /// Posts `bufs` like [`Self::submit`], then waits until the device has
    /// used the chain, after which its buffers and descriptor 0 may be
    /// reused. No timeout, as in Linux's virtio_balloon (`tell_host` waits
    /// for the buffer to come back): a device that never answers leaves the
    /// driver waiting rather than reusing memory the device may still read.
    pub fn submit_and_wait(&mut self, m: &Mmio, bufs: &[(u64, u32, bool)]) {
        if !self.submit(m, bufs) {
            while !self.poll_used() {
                core::hint::spin_loop();
            }
        }
    }

    /// Posts `bufs` as one chain (`(address, length, device-writable)`, at
    /// most [`QUEUE_SIZE`]) and notifies; whether the device used it.
    pub fn submit(&mut self, m: &Mmio, bufs: &[(u64, u32, bool)]) -> bool {
        let n = bufs.len().min(QUEUE_SIZE as usize);
        for (i, &(addr, len, write)) in bufs.iter().take(n).enumerate() {
            let mut flags = if write { desc::F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= desc::F_NEXT;
            }
            self.set_desc(i as u16, addr, len, flags, (i + 1) as u16);
        }
        self.publish(m, 0)
    }
}
