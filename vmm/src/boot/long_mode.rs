//! The CPU state of Linux's 64-bit entry, as pure values.
//!
//! boot.rst, "64-bit Boot Protocol": the CPU is in 64-bit mode with paging
//! on; the kernel, the zero page and the command line are identity mapped;
//! a GDT holds flat descriptors for `__BOOT_CS` (0x10, execute/read) and
//! `__BOOT_DS` (0x18, read/write); CS is `__BOOT_CS`, DS/ES/SS are
//! `__BOOT_DS`; interrupts are off; `rsi` holds the zero page's address.
//! Everything here builds bytes and register values; [`crate::vcpu`] hands
//! them to KVM.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::layout::abi::{BOOT_PD, BOOT_PD_COUNT, BOOT_PDPT, BOOT_PML4, LINUX_GDT, PAGE_SIZE, PAGE_SIZE_2M};
use crate::x86::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_RESERVED};

/// Page-table entry bits (SDM Vol. 3A §4.5, Tables 4-15 to 4-18).
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
/// PS: in a PD entry, maps a 2 MiB page.
const PTE_PAGE_SIZE: u64 = 1 << 7;
/// Entries per table (SDM Vol. 3A §4.5: 512 eight-byte entries per 4 KiB).
const ENTRIES: u64 = 512;


/// `__BOOT_CS`: GDT entry 2 (arch/x86/include/asm/segment.h).
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`: GDT entry 3.
pub const BOOT_DS: u16 = 0x18;
/// A 64-bit TSS for TR (entry 4, two slots): VMX refuses to enter a guest
/// whose TR is unusable (SDM Vol. 3C §26.3.1.2), so TR gets a descriptor
/// even though Linux loads its own before it needs one.
pub const BOOT_TSS: u16 = 0x20;

/// The boot GDT: null, null, `__BOOT_CS`, `__BOOT_DS`, and a TSS.
///
/// Descriptors (SDM Vol. 3A §3.4.5): base 0, limit 0xfffff in 4 KiB units
/// (G=1). Code 0x00af9b000000ffff: present, DPL 0, code execute/read
/// accessed (type 0xb), L=1. Data 0x00cf93000000ffff: present, read/write
/// accessed (type 0x3), D/B=1. TSS 0x00008b0000000067: present, 64-bit busy
/// TSS (type 0xb), G=0 and limit 0x67 (the 104-byte TSS of §8.7), base 0; its
/// upper half (base 63:32) is zero.
pub const GDT: [u64; 6] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067, 0];

/// The KVM segment for the descriptor `entry` at `selector`.
#[must_use]
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    // With G=1 the limit counts 4 KiB units, the low 12 bits all ones.
    let limit = if g == 1 { (limit_raw << 12) | 0xfff } else { limit_raw };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// The GDT's bytes, for [`LINUX_GDT`].
#[must_use]
pub fn gdt_bytes() -> Vec<u8> {
    GDT.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The boot page tables' bytes, for [`BOOT_PML4`]: PML4, PDPT and
/// [`BOOT_PD_COUNT`] page directories, contiguous, identity mapping the
/// first `BOOT_PD_COUNT` GiB with 2 MiB pages (writable, supervisor).
#[must_use]
pub fn page_table_bytes() -> Vec<u8> {
    debug_assert_eq!(BOOT_PDPT, BOOT_PML4 + PAGE_SIZE);
    debug_assert_eq!(BOOT_PD, BOOT_PDPT + PAGE_SIZE);
    let mut entries = vec![0u64; ((2 + BOOT_PD_COUNT) * ENTRIES) as usize];
    entries[0] = BOOT_PDPT | PTE_PRESENT | PTE_WRITABLE;
    for gib in 0..BOOT_PD_COUNT {
        entries[(ENTRIES + gib) as usize] = (BOOT_PD + gib * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE;
    }
    for i in 0..BOOT_PD_COUNT * ENTRIES {
        entries[(2 * ENTRIES + i) as usize] = (i * PAGE_SIZE_2M) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE;
    }
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The special registers at the 64-bit entry, on top of `base` (KVM's
/// reset state, which keeps what this does not set: the APIC base, the
/// IDT limit).
#[must_use]
pub fn sregs(base: &kvm_sregs) -> kvm_sregs {
    let mut s = *base;
    s.gdt.base = LINUX_GDT;
    s.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    // No IDT: interrupts are off and Linux loads its own before enabling them.
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cs = segment(GDT[usize::from(BOOT_CS / 8)], BOOT_CS);
    let data = segment(GDT[usize::from(BOOT_DS / 8)], BOOT_DS);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(GDT[usize::from(BOOT_TSS / 8)], BOOT_TSS);
    // CR0: protection and paging; the reset value's CD and NW (caches
    // off) are cleared, ET kept (SDM Vol. 3A §9.1.1, Table 9-1).
    s.cr0 = CR0_PE | CR0_ET | CR0_PG;
    s.cr3 = BOOT_PML4;
    s.cr4 = CR4_PAE;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// The general registers at the 64-bit entry: `rip` at `entry`, `rsi` at
/// the zero page, interrupts off.
#[must_use]
pub fn regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs { rip: entry, rsi: zero_page, rflags: RFLAGS_RESERVED, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_at(bytes: &[u8], addr: u64) -> u64 {
        let off = (addr - BOOT_PML4) as usize;
        u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
    }

    /// Walks the tables as the MMU would for a 2 MiB page (SDM Vol. 3A §4.5).
    fn translate(bytes: &[u8], va: u64) -> Option<u64> {
        let pml4e = entry_at(bytes, BOOT_PML4 + ((va >> 39) & 0x1ff) * 8);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = entry_at(bytes, (pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde = entry_at(bytes, (pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
        (pde & PTE_PRESENT != 0 && pde & PTE_PAGE_SIZE != 0).then_some((pde & !0x1f_ffff & ((1 << 52) - 1)) | (va & 0x1f_ffff))
    }

    #[test]
    fn the_first_four_gib_are_identity_mapped() {
        let t = page_table_bytes();
        assert_eq!(t.len() as u64, (2 + BOOT_PD_COUNT) * PAGE_SIZE);
        for va in [0, 0x1000, 0x100_0000 + 0x200, 0xbfff_f000, 0xffff_ffff] {
            assert_eq!(translate(&t, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&t, 1 << 32), None);
    }

    #[test]
    fn boot_segments_are_flat_64_bit_code_and_data() {
        let cs = segment(GDT[2], BOOT_CS);
        assert_eq!((cs.base, cs.limit, cs.type_, cs.l, cs.db, cs.present, cs.s, cs.g), (0, 0xffff_ffff, 0xb, 1, 0, 1, 1, 1));
        let ds = segment(GDT[3], BOOT_DS);
        assert_eq!((ds.base, ds.limit, ds.type_, ds.l, ds.db, ds.present), (0, 0xffff_ffff, 0x3, 0, 1, 1));
        let tr = segment(GDT[4], BOOT_TSS);
        assert_eq!((tr.type_, tr.s, tr.present, tr.limit, tr.unusable), (0xb, 0, 1, 0x67, 0));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn sregs_are_long_mode_with_paging_on_the_boot_tables() {
        let s = sregs(&kvm_sregs::default());
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!((s.cr3, s.cr4 & CR4_PAE, s.efer), (BOOT_PML4, CR4_PAE, EFER_LME | EFER_LMA));
        assert_eq!((s.cs.selector, s.ds.selector, s.ss.selector), (0x10, 0x18, 0x18));
        assert_eq!(s.gdt.limit as usize + 1, gdt_bytes().len());
        let r = regs(0x100_0200, 0xb000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0200, 0xb000, 2));
    }
}
