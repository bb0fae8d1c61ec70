//! What the VMM left in memory for us: the PVH start info with its memory
//! map and command line, and memvisor's [`BootConfig`].
//!
//! Read once, at entry, while the boot page tables still identity-map the
//! low memory they live in; everything is copied into a [`BootInfo`] value.
//! The command line is read in one pass over its words: test hooks, and
//! the virtio-mmio devices it announces (`virtio_mmio.device=`, parsed by
//! `memvisor_abi::cmdline`), which is how drivers find their devices.

use memvisor_abi::boot::{BootConfig, E820_RAM, HVM_START_MAGIC, HvmMemmapEntry, HvmStartInfo};
use memvisor_abi::cmdline::{self, VirtioMmioDevice};
use memvisor_abi::layout;

/// Most RAM ranges the kernel keeps track of.
pub const MAX_RAM_RANGES: usize = 8;
/// Most announced virtio-mmio devices the kernel keeps (QEMU's `microvm`
/// announces one per device plugged in); later ones are ignored.
pub const MAX_VIRTIO_MMIO: usize = 8;

/// Command-line word: triple-fault at boot (tests the VMM's triple-fault path).
const TRIPLE_FAULT_HOOK: &[u8] = b"memvisor.test=triple-fault";
/// Command-line word: take a page fault in the kernel once the IDT is up
/// (tests the kernel's own fault report and nonzero exit).
const KERNEL_FAULT_HOOK: &[u8] = b"memvisor.test=kernel-fault";
/// Command-line word: put two broken entries in the kernel's PML4 before
/// Ready, for `vmm translate`'s error tests (see `crate::paging::plant_bad_entries`).
const BAD_TABLES_HOOK: &[u8] = b"memvisor.test=bad-tables";

/// A deliberate failure asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestHook {
    /// None: boot normally.
    None,
    /// `memvisor.test=triple-fault`.
    TripleFault,
    /// `memvisor.test=kernel-fault`.
    KernelFault,
    /// `memvisor.test=bad-tables`.
    BadTables,
}

/// The virtio-mmio devices the command line announced, in its order.
#[derive(Debug, Clone, Copy, Default)]
pub struct VirtioMmioList {
    devices: [VirtioMmioDevice; MAX_VIRTIO_MMIO],
    len: usize,
}

impl VirtioMmioList {
    /// The devices.
    pub fn as_slice(&self) -> &[VirtioMmioDevice] {
        &self.devices[..self.len]
    }

    fn push(&mut self, device: VirtioMmioDevice) {
        if let Some(slot) = self.devices.get_mut(self.len) {
            *slot = device;
            self.len += 1;
        }
    }
}

/// The boot information the kernel uses.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// RAM ranges `[start, end)` from the memory map, in map order.
    pub ram: [(u64, u64); MAX_RAM_RANGES],
    /// Valid entries of `ram`.
    pub ram_count: usize,
    /// memvisor's boot configuration (defaults when missing or invalid).
    pub config: BootConfig,
    /// The test hook the command line asks for.
    pub test_hook: TestHook,
    /// The virtio-mmio devices the command line announces.
    pub virtio_mmio: VirtioMmioList,
}

impl BootInfo {
    /// The RAM ranges.
    pub fn ram(&self) -> &[(u64, u64)] {
        &self.ram[..self.ram_count]
    }

    /// Sum of the RAM ranges' sizes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().iter().map(|(s, e)| e - s).sum()
    }
}

/// Reads the boot data the VMM wrote.
///
/// # Safety
/// `start_info` must be the address the PVH entry received in `ebx`, and the
/// boot data it points to must be identity-mapped (it is below 1 MiB).
pub unsafe fn read(start_info: u64) -> BootInfo {
    let mut info = BootInfo { ram: [(0, 0); MAX_RAM_RANGES], ram_count: 0, config: BootConfig::default(), test_hook: TestHook::None, virtio_mmio: VirtioMmioList::default() };
    // SAFETY: the caller guarantees the start info is mapped; read_volatile
    // copes with whatever bytes the VMM wrote (the struct is Pod).
    let si = unsafe { (start_info as *const HvmStartInfo).read_volatile() };
    if si.magic == HVM_START_MAGIC {
        let entries = si.memmap_entries.min(layout::PVH_MEMMAP_MAX_ENTRIES as u32) as usize;
        for i in 0..entries {
            // SAFETY: i is below the entry count the VMM wrote, within the
            // one-page map (PVH_MEMMAP_MAX_ENTRIES), which is identity-mapped.
            let e = unsafe { (si.memmap_paddr as *const HvmMemmapEntry).add(i).read_volatile() };
            if e.kind == E820_RAM && e.size != 0 && info.ram_count < MAX_RAM_RANGES {
                info.ram[info.ram_count] = (e.addr, e.addr + e.size);
                info.ram_count += 1;
            }
        }
        if si.cmdline_paddr != 0 {
            // SAFETY: the VMM writes a NUL-terminated line of at most
            // CMDLINE_MAX bytes at cmdline_paddr, identity-mapped.
            let line = unsafe { cmdline_bytes(si.cmdline_paddr as *const u8) };
            read_cmdline(line, &mut info);
        }
    }
    // SAFETY: the VMM writes the boot configuration at BOOT_CONFIG, below
    // 1 MiB and identity-mapped.
    let config = unsafe { (layout::BOOT_CONFIG as *const BootConfig).read_volatile() };
    if config.is_valid() {
        info.config = config;
    } else {
        info.config.guest_page_shift = 21;
    }
    info
}

/// The command line at `line`, up to its NUL (at most CMDLINE_MAX bytes).
/// Costs one read for an empty line, the common case.
///
/// # Safety
/// `line` must point at a NUL-terminated string within CMDLINE_MAX bytes,
/// mapped and unwritten for the lifetime `'a` the caller picks (here: until
/// the switch away from the boot page tables).
unsafe fn cmdline_bytes<'a>(line: *const u8) -> &'a [u8] {
    let mut len = 0usize;
    // SAFETY: len < CMDLINE_MAX and the line is NUL-terminated within it.
    while len < layout::CMDLINE_MAX as usize && unsafe { line.add(len).read_volatile() } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes before the NUL were just read; the caller
    // guarantees they stay mapped and unwritten for 'a.
    unsafe { core::slice::from_raw_parts(line, len) }
}

/// The test hook (the first one named) and the announced virtio-mmio
/// devices of `line`, in one pass over its words.
fn read_cmdline(line: &[u8], info: &mut BootInfo) {
    for word in cmdline::words(line) {
        let hook = match word {
            TRIPLE_FAULT_HOOK => TestHook::TripleFault,
            KERNEL_FAULT_HOOK => TestHook::KernelFault,
            BAD_TABLES_HOOK => TestHook::BadTables,
            _ => {
                if let Some(Ok(device)) = VirtioMmioDevice::from_word(word) {
                    info.virtio_mmio.push(device);
                }
                continue;
            }
        };
        if info.test_hook == TestHook::None {
            info.test_hook = hook;
        }
    }
}
