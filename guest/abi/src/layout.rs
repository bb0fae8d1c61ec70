//! The guest-physical memory map, in address order.
//!
//! This is the single source of every guest-physical constant. The VMM wraps
//! these in `GuestAddress` (vmm/src/layout.rs) and derives the RAM regions
//! from them; the guest reads them to know where its boot data is.
//!
//! ```text
//! 0x0000_0000  ┌───────────────────────┐
//!              │ null page (unused)    │
//! 0x0000_6000  │ PVH start info        │  hvm_start_info, Xen PVH ABI
//! 0x0000_7000  │ PVH memory map        │  hvm_memmap_table_entry[]
//! 0x0000_8000  │ memvisor boot config  │  abi::boot::BootConfig
//! 0x0000_9000  │ kernel command line   │
//! 0x0000_a000  │ Linux boot GDT        │  Linux 64-bit boot protocol only:
//! 0x0000_b000  │ Linux zero page       │  boot_params (zero-page.rst)
//! 0x0000_c000  │ boot page tables      │  PML4, PDPT, 4 PDs: first 4 GiB
//! 0x0001_2000  │ …                     │
//! 0x0009_fc00  ├───────────────────────┤  EBDA / VGA / BIOS: reserved (e820)
//! 0x000e_0000  │ ACPI RSDP             │  in the BIOS area OSPM scans
//! 0x000e_1000  │ ACPI tables           │  XSDT, FADT, FACS, DSDT, MADT:
//! 0x000e_6000  │ …                     │  "ACPI data" in the e820 map
//! 0x0010_0000  ├───────────────────────┤
//!              │ kernel image (ELF)    │
//!              │ free RAM …            │
//! 0xc000_0000  ├───────────────────────┤  32-bit MMIO hole (1 GiB)
//!              │ virtio-mmio devices   │  0xd000_0000   } reserved in the
//!              │ IOAPIC, LAPIC         │  0xfec0_0000,  } memory map
//!              │                       │  0xfee0_0000   } (DEVICE_RANGES)
//!              │ KVM identity map, TSS │  0xfffb_c000   }
//! 0x1_0000_0000├───────────────────────┤
//!              │ RAM above 4 GiB …     │
//!              └───────────────────────┘
//! ```

/// Size of a base page (SDM Vol. 3A §4.5).
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a 2 MiB large page (a PDE with PS=1).
pub const PAGE_SIZE_2M: u64 = 0x20_0000;
/// Size of a 1 GiB huge page (a PDPTE with PS=1).
pub const PAGE_SIZE_1G: u64 = 0x4000_0000;

/// Where the VMM writes the PVH `hvm_start_info` (Xen `arch-x86/hvm/start_info.h`).
pub const PVH_START_INFO: u64 = 0x6000;
/// Where the VMM writes the PVH memory map the start info points to.
pub const PVH_MEMMAP: u64 = 0x7000;
/// Maximum entries of the PVH memory map (one page of 24-byte entries).
pub const PVH_MEMMAP_MAX_ENTRIES: u64 = PAGE_SIZE / 24;
/// Where the VMM writes [`crate::boot::BootConfig`].
pub const BOOT_CONFIG: u64 = 0x8000;
/// Where the VMM writes the NUL-terminated kernel command line.
pub const CMDLINE: u64 = 0x9000;
/// Longest command line, including its NUL.
pub const CMDLINE_MAX: u64 = PAGE_SIZE;
/// The GDT a Linux kernel is entered with (64-bit boot protocol,
/// Documentation/arch/x86/boot.rst: `__BOOT_CS` 0x10 and `__BOOT_DS` 0x18).
pub const LINUX_GDT: u64 = 0xa000;
/// The Linux zero page, `struct boot_params` (Documentation/arch/x86/zero-page.rst).
pub const ZERO_PAGE: u64 = 0xb000;
/// Root of the page tables a Linux kernel is entered with (PML4).
pub const BOOT_PML4: u64 = 0xc000;
/// The PML4's first entry points here (one PDPT covers 512 GiB).
pub const BOOT_PDPT: u64 = 0xd000;
/// [`BOOT_PD_COUNT`] page directories of 2 MiB pages, one per GiB.
pub const BOOT_PD: u64 = 0xe000;
/// Page directories at [`BOOT_PD`]: the first 4 GiB are identity mapped,
/// which covers the kernel, the zero page, the command line and the
/// initrd wherever they are in RAM below the MMIO hole (boot.rst, 64-bit
/// boot protocol: they must be identity mapped at entry).
pub const BOOT_PD_COUNT: u64 = 4;
/// One past the boot page tables.
pub const BOOT_PAGE_TABLES_END: u64 = BOOT_PD + BOOT_PD_COUNT * PAGE_SIZE;
/// Start of the Extended BIOS Data Area; from here to [`HIGH_MEMORY`] is
/// reserved in the memory map, as on a PC.
pub const EBDA_START: u64 = 0x9_fc00;
/// The ACPI Root System Description Pointer. On IA-PC systems OSPM finds
/// it on a 16-byte boundary in the BIOS read-only area 0xe0000..0xfffff
/// (ACPI 6.5 §5.2.5.1), so a kernel that is not told where it is (through
/// the zero page's `acpi_rsdp_addr` or the PVH start info's `rsdp_paddr`)
/// still finds it. It stays in the reserved legacy hole.
pub const ACPI_RSDP: u64 = 0xe_0000;
/// The Extended System Description Table (ACPI 6.5 §5.2.8), the first of
/// the tables the RSDP leads to. Each table has a page of its own (the
/// largest, the MADT of 64 CPUs, is under 600 bytes); from here to
/// [`ACPI_TABLES_END`] the memory map says "ACPI data" (E820 type 3, ACPI
/// 6.5 §15.1, Table 15.1).
pub const ACPI_XSDT: u64 = 0xe_1000;
/// The Fixed ACPI Description Table, signature "FACP" (ACPI 6.5 §5.2.9).
pub const ACPI_FADT: u64 = 0xe_2000;
/// The Firmware ACPI Control Structure; 64-byte aligned (ACPI 6.5 §5.2.10).
pub const ACPI_FACS: u64 = 0xe_3000;
/// The Differentiated System Description Table (ACPI 6.5 §5.2.11.1).
pub const ACPI_DSDT: u64 = 0xe_4000;
/// The Multiple APIC Description Table, signature "APIC" (ACPI 6.5 §5.2.12).
pub const ACPI_MADT: u64 = 0xe_5000;
/// Room for each ACPI table at the addresses above.
pub const ACPI_TABLE_MAX: u64 = PAGE_SIZE;
/// One past the ACPI tables.
pub const ACPI_TABLES_END: u64 = ACPI_MADT + ACPI_TABLE_MAX;
/// The 1 MiB mark: kernels are loaded here (PVH and Linux convention).
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole. 1 GiB-aligned so that RAM below it can be
/// backed by 1 GiB huge pages.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window (virtio 1.x §4.2.2 registers fit in 4 KiB).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Number of virtio-mmio windows reserved from [`VIRTIO_MMIO_BASE`].
pub const VIRTIO_MMIO_SLOTS: u64 = 8;
/// IOAPIC (Intel 82093AA datasheet; default PC address).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// The IOAPIC's register window (its index/data registers decode within one page).
pub const IOAPIC_SIZE: u64 = PAGE_SIZE;
/// Local APIC (SDM Vol. 3A §11.4.1, default IA32_APIC_BASE).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The local APIC's register page (SDM Vol. 3A §11.4.1: a 4 KiB region).
pub const LAPIC_SIZE: u64 = PAGE_SIZE;
/// KVM's identity-map page for real-mode emulation on Intel hosts without
/// unrestricted guest (KVM api.rst, KVM_SET_IDENTITY_MAP_ADDR); one page.
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// KVM's TSS for the same purpose (KVM_SET_TSS_ADDR); three pages.
pub const KVM_TSS: u64 = 0xfffb_d000;
/// Size of the TSS KVM_SET_TSS_ADDR takes (KVM api.rst: three pages).
pub const KVM_TSS_SIZE: u64 = 3 * PAGE_SIZE;
/// End of the 32-bit MMIO hole and start of RAM above 4 GiB.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = MMIO_HOLE_END - MMIO_HOLE_START;

/// Device ranges in the MMIO hole, as `(start, length)` in address order:
/// the memory map marks them reserved, so that nothing (a guest's PCI
/// allocator, say) puts anything else there.
pub const DEVICE_RANGES: [(u64, u64); 4] = [
    (VIRTIO_MMIO_BASE, VIRTIO_MMIO_SLOTS * VIRTIO_MMIO_SIZE),
    (IOAPIC_BASE, IOAPIC_SIZE),
    (LAPIC_BASE, LAPIC_SIZE),
    (KVM_IDENTITY_MAP, KVM_TSS + KVM_TSS_SIZE - KVM_IDENTITY_MAP),
];

/// Guest-virtual base of a ring-3 task's private address space: PML4 slot 1
/// (512 GiB), so that slot 0 can stay the kernel's identity map.
pub const USER_BASE: u64 = 0x0000_0080_0000_0000;
/// Guest-virtual top of a ring-3 task's stack (grows down).
pub const USER_STACK_TOP: u64 = USER_BASE + 0x10_0000;
/// Size of a ring-3 task's stack.
pub const USER_STACK_SIZE: u64 = 0x4000;
/// Guest-virtual base of the window where a task sees the RAM it works on.
pub const USER_HEAP_BASE: u64 = USER_BASE + PAGE_SIZE_1G;

/// The RAM regions for `mem_size` bytes of guest memory, as
/// `(guest-physical start, length)`: one region below the MMIO hole, and a
/// second one from 4 GiB once the memory does not fit below the hole.
#[must_use]
pub const fn ram_regions(mem_size: u64) -> [(u64, u64); 2] {
    if mem_size <= MMIO_HOLE_START {
        [(0, mem_size), (MMIO_HOLE_END, 0)]
    } else {
        [(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem_size - MMIO_HOLE_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region_below_the_hole() {
        assert_eq!(ram_regions(256 << 20), [(0, 256 << 20), (MMIO_HOLE_END, 0)]);
        assert_eq!(ram_regions(MMIO_HOLE_START)[1].1, 0);
    }

    #[test]
    fn large_ram_splits_around_the_hole() {
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (0, MMIO_HOLE_START));
        assert_eq!(r[1], (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn layout_is_in_address_order() {
        let order = [
            PVH_START_INFO, PVH_MEMMAP, BOOT_CONFIG, CMDLINE, LINUX_GDT, ZERO_PAGE, BOOT_PML4, BOOT_PDPT, BOOT_PD,
            BOOT_PAGE_TABLES_END, EBDA_START, ACPI_RSDP, ACPI_XSDT, ACPI_FADT, ACPI_FACS, ACPI_DSDT, ACPI_MADT, ACPI_TABLES_END,
            HIGH_MEMORY,
            MMIO_HOLE_START, VIRTIO_MMIO_BASE, IOAPIC_BASE, LAPIC_BASE, KVM_IDENTITY_MAP, KVM_TSS, MMIO_HOLE_END,
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(MMIO_HOLE_START % PAGE_SIZE_1G, 0);
        const { assert!(CMDLINE + CMDLINE_MAX <= LINUX_GDT) };
    }

    #[test]
    fn acpi_tables_sit_in_the_legacy_hole_each_in_its_own_room() {
        const { assert!(EBDA_START <= ACPI_RSDP && ACPI_TABLES_END <= HIGH_MEMORY) };
        // The RSDP in the area OSPM scans, on a 16-byte boundary (ACPI 6.5 §5.2.5.1).
        const { assert!(ACPI_RSDP >= 0xe_0000 && ACPI_RSDP + 36 <= 0x10_0000 && ACPI_RSDP.is_multiple_of(16)) };
        const { assert!(ACPI_RSDP + ACPI_TABLE_MAX <= ACPI_XSDT) };
        let tables = [ACPI_XSDT, ACPI_FADT, ACPI_FACS, ACPI_DSDT, ACPI_MADT, ACPI_TABLES_END];
        assert!(tables.windows(2).all(|w| w[0] + ACPI_TABLE_MAX <= w[1]));
        assert_eq!(ACPI_FACS % 64, 0, "the FACS is 64-byte aligned (ACPI 6.5 §5.2.10)");
    }

    #[test]
    fn device_ranges_are_ordered_disjoint_and_inside_the_hole() {
        assert!(DEVICE_RANGES.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        assert!(DEVICE_RANGES.iter().all(|&(start, len)| start >= MMIO_HOLE_START && start + len <= MMIO_HOLE_END && len > 0));
    }

    #[test]
    fn boot_page_tables_map_all_ram_below_the_hole() {
        const { assert!(BOOT_PD_COUNT * PAGE_SIZE_1G >= MMIO_HOLE_START) };
    }
}
