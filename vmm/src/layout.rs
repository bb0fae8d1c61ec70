//! The guest-physical layout, typed for the VMM.
//!
//! The constants themselves live once, in `memvisor_abi::layout`, because
//! the guest needs them too; this module wraps them in [`GuestAddress`] and
//! derives what only the VMM needs: the RAM regions and the E820 memory map
//! handed to the guest.

use vm_memory::GuestAddress;

pub use memvisor_abi::layout as abi;
use memvisor_abi::boot::{E820_ACPI, E820_RAM, E820_RESERVED, HvmMemmapEntry};

/// Where the PVH start info goes.
pub const PVH_START_INFO: GuestAddress = GuestAddress(abi::PVH_START_INFO);
/// Where the PVH memory map goes.
pub const PVH_MEMMAP: GuestAddress = GuestAddress(abi::PVH_MEMMAP);
/// Where memvisor's boot configuration goes.
pub const BOOT_CONFIG: GuestAddress = GuestAddress(abi::BOOT_CONFIG);
/// Where the command line goes.
pub const CMDLINE: GuestAddress = GuestAddress(abi::CMDLINE);
/// Where kernels are loaded.
pub const HIGH_MEMORY: GuestAddress = GuestAddress(abi::HIGH_MEMORY);
/// The 32-bit MMIO hole.
pub const MMIO_HOLE_START: GuestAddress = GuestAddress(abi::MMIO_HOLE_START);
/// RAM above 4 GiB.
pub const MMIO_HOLE_END: GuestAddress = GuestAddress(abi::MMIO_HOLE_END);
/// The GDT of the Linux 64-bit entry.
pub const LINUX_GDT: GuestAddress = GuestAddress(abi::LINUX_GDT);
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE: GuestAddress = GuestAddress(abi::ZERO_PAGE);
/// The boot page tables' root (PML4).
pub const BOOT_PML4: GuestAddress = GuestAddress(abi::BOOT_PML4);
/// The ACPI RSDP, in the BIOS area OSPM scans.
pub const ACPI_RSDP: GuestAddress = GuestAddress(abi::ACPI_RSDP);
/// The ACPI XSDT.
pub const ACPI_XSDT: GuestAddress = GuestAddress(abi::ACPI_XSDT);
/// The ACPI FADT.
pub const ACPI_FADT: GuestAddress = GuestAddress(abi::ACPI_FADT);
/// The ACPI FACS.
pub const ACPI_FACS: GuestAddress = GuestAddress(abi::ACPI_FACS);
/// The ACPI DSDT.
pub const ACPI_DSDT: GuestAddress = GuestAddress(abi::ACPI_DSDT);
/// The ACPI MADT.
pub const ACPI_MADT: GuestAddress = GuestAddress(abi::ACPI_MADT);

/// The legacy hole from the EBDA to 1 MiB as the memory map gives it, as
/// `(start, end, E820 type)` in address order: reserved, except the ACPI
/// tables after the RSDP, which are "ACPI data" (the RSDP itself stays in
/// the reserved BIOS area, where OSPM scans for it).
const LEGACY_HOLE: [(u64, u64, u32); 3] = [
    (abi::EBDA_START, abi::ACPI_XSDT, E820_RESERVED),
    (abi::ACPI_XSDT, abi::ACPI_TABLES_END, E820_ACPI),
    (abi::ACPI_TABLES_END, abi::HIGH_MEMORY, E820_RESERVED),
];

/// Where a virtio-mmio device sits: its register window and the GSI (the
/// in-kernel IOAPIC's input) its interrupt raises. The guest learns both
/// from the command line (`crate::boot::cmdline`), never from a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Base of the register window.
    pub base: GuestAddress,
    /// Size of the window.
    pub size: u64,
    /// The GSI of its interrupt.
    pub gsi: u32,
}

/// The balloon: the first virtio-mmio window, on GSI 5. GSIs below 24 are
/// the IOAPIC's pins in KVM's default routing (`KVM_CREATE_IRQCHIP`, KVM
/// api.rst); 5 is the first ISA IRQ a PC without a second parallel port
/// leaves free, where Firecracker starts its virtio IRQs too
/// (`arch::x86_64::layout::IRQ_BASE`).
pub const BALLOON: VirtioMmioSlot = VirtioMmioSlot { base: GuestAddress(abi::VIRTIO_MMIO_BASE), size: abi::VIRTIO_MMIO_SIZE, gsi: 5 };

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// First guest-physical address.
    pub start: GuestAddress,
    /// Length in bytes (never zero).
    pub size: u64,
}

impl RamRange {
    /// One past the last address.
    #[must_use]
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.start.0 + self.size)
    }
}

/// The RAM ranges for `mem_size` bytes, empty ranges left out.
#[must_use]
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    abi::ram_regions(mem_size)
        .into_iter()
        .filter(|&(_, size)| size > 0)
        .map(|(start, size)| RamRange { start: GuestAddress(start), size })
        .collect()
}

/// The E820-style memory map the guest gets, in address order: RAM below
/// the EBDA, the legacy hole reserved but for the ACPI tables
/// ([`LEGACY_HOLE`]), RAM from 1 MiB, the device ranges in
/// the MMIO hole reserved ([`abi::DEVICE_RANGES`]), then RAM above 4 GiB.
/// Both boot paths hand it over: the PVH start info's memory map and the
/// Linux zero page's `e820_table`.
#[must_use]
pub fn e820_map(mem_size: u64) -> Vec<HvmMemmapEntry> {
    let entry = |addr: u64, size: u64, kind: u32| HvmMemmapEntry { addr, size, kind, reserved: 0 };
    let mut map = Vec::new();
    for range in ram_ranges(mem_size) {
        let (start, end) = (range.start.0, range.end().0);
        if start < abi::HIGH_MEMORY {
            let low_end = end.min(abi::EBDA_START);
            map.push(entry(start, low_end - start, E820_RAM));
            for &(hole_start, hole_end, kind) in &LEGACY_HOLE {
                if end > hole_start {
                    map.push(entry(hole_start, end.min(hole_end) - hole_start, kind));
                }
            }
            if end > abi::HIGH_MEMORY {
                map.push(entry(abi::HIGH_MEMORY, end - abi::HIGH_MEMORY, E820_RAM));
            }
        } else {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map.extend(abi::DEVICE_RANGES.iter().map(|&(start, len)| entry(start, len, E820_RESERVED)));
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_legacy_hole_and_marks_the_acpi_tables() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 5 + abi::DEVICE_RANGES.len());
        assert_eq!((map[0].addr, map[0].size, map[0].kind), (0, abi::EBDA_START, E820_RAM));
        assert_eq!((map[1].addr, map[1].kind), (abi::EBDA_START, E820_RESERVED));
        assert!(map[1].addr < abi::ACPI_RSDP && abi::ACPI_RSDP < map[1].addr + map[1].size, "the RSDP stays in the reserved BIOS area");
        assert_eq!((map[2].addr, map[2].addr + map[2].size, map[2].kind), (abi::ACPI_XSDT, abi::ACPI_TABLES_END, E820_ACPI));
        assert_eq!((map[3].addr, map[3].addr + map[3].size, map[3].kind), (abi::ACPI_TABLES_END, abi::HIGH_MEMORY, E820_RESERVED));
        assert_eq!(map[4].addr, abi::HIGH_MEMORY);
        assert_eq!(map[4].addr + map[4].size, 256 << 20);
        for table in [abi::ACPI_XSDT, abi::ACPI_FADT, abi::ACPI_FACS, abi::ACPI_DSDT, abi::ACPI_MADT] {
            assert!(table >= map[2].addr && table + abi::ACPI_TABLE_MAX <= map[2].addr + map[2].size);
        }
    }

    #[test]
    fn e820_reserves_the_device_ranges_in_address_order_without_overlap() {
        for mem in [256 << 20, 3 << 30, 6 << 30] {
            let map = e820_map(mem);
            assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr), "{mem:#x}: {map:x?}");
            for &(start, len) in &abi::DEVICE_RANGES {
                assert!(map.iter().any(|e| (e.addr, e.size, e.kind) == (start, len, E820_RESERVED)));
            }
        }
    }

    #[test]
    fn e820_covers_ram_above_4g() {
        let map = e820_map(6 << 30);
        let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        let legacy: u64 = map.iter().filter(|e| e.kind != E820_RAM && e.addr < abi::HIGH_MEMORY).map(|e| e.size).sum();
        assert_eq!(ram + legacy, 6 << 30);
        let last = map.last().unwrap();
        assert_eq!(last.addr, abi::MMIO_HOLE_END);
        assert_eq!(last.addr + last.size, abi::MMIO_HOLE_END + (6 << 30) - abi::MMIO_HOLE_START);
    }

    #[test]
    fn ram_ranges_skip_empty_high_range() {
        assert_eq!(ram_ranges(1 << 30).len(), 1);
        assert_eq!(ram_ranges(abi::MMIO_HOLE_START + 4096).len(), 2);
    }
}
