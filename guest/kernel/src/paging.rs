//! The kernel's address space.
//!
//! PML4 slot 0 is an identity map of exactly what the kernel uses, each
//! part with its own permissions (4 KiB leaves, so section boundaries hold):
//! kernel text (R-X), the `.user` section (R-X and user-accessible: ring-3
//! tasks run it), rodata (R, NX), data and bss (RW, NX), and the arena (RW,
//! NX, 2 MiB leaves). Everything else in the low region is unmapped: page 0,
//! and the boot data below 1 MiB, which [`crate::bootinfo`] has copied out
//! before the switch (one map call less on the path to `Ready`).
//!
//! PML4 slot 256 ([`DIRECT_MAP_BASE`]) maps all RAM, supervisor-only, RW,
//! NX, with the leaf size the VMM asked for (`BootConfig.guest_page_shift`),
//! 1 GiB falling back to 2 MiB on a CPU without 1 GiB pages. With 4 KiB
//! leaves nothing is mapped there eagerly: the kernel reaches its own data
//! through the identity map, and mapping all RAM page by page at ring 0
//! (one emulated store per 4 KiB) would dominate boot.
//!
//! Tasks' address spaces share slots 0 and 256 and add a private slot 1
//! (see [`crate::task`]).

use memvisor_abi::layout::{PAGE_SIZE, PAGE_SIZE_2M};
use memvisor_guest_mm::paging::{Level, MapError, Mapper, PageSize, PageTableEntry as Pte, PhysAddr, VirtAddr};

use crate::bootinfo::BootInfo;
use crate::frames::{IdentityTables, TablePool};

/// Base of the kernel's direct map of RAM: PML4 slot 256, the first
/// higher-half slot (physical address `p` is at `DIRECT_MAP_BASE + p`).
pub const DIRECT_MAP_BASE: u64 = 0xffff_8000_0000_0000;
/// PML4 slots the kernel owns and every address space shares.
pub const KERNEL_SLOTS: [usize; 2] = [0, 256];

/// The kernel's mapper: tables from the pool, reached by identity.
pub type KernelMapper = Mapper<IdentityTables, TablePool>;

unsafe extern "C" {
    static __user_start: u8;
    static __user_end: u8;
    static __text_start: u8;
    static __rodata_start: u8;
    static __data_start: u8;
    static __bss_end: u8;
}

/// The section boundaries, in address order (resources/guest-kernel.ld).
fn sections() -> [u64; 6] {
    // Only the addresses of the linker symbols are taken (safe in Rust 2024).
    [
        &raw const __user_start as u64,
        &raw const __user_end as u64,
        &raw const __text_start as u64,
        &raw const __rodata_start as u64,
        &raw const __data_start as u64,
        (&raw const __bss_end as u64).next_multiple_of(PAGE_SIZE),
    ]
}

fn va(a: u64) -> VirtAddr {
    VirtAddr::new(a).expect("kernel addresses are canonical by construction")
}

fn pa(a: u64) -> PhysAddr {
    PhysAddr::new(a).expect("RAM addresses are below 2^52")
}

/// Identity-maps `[start, end)` with 4 KiB leaves (or `size` where aligned).
fn identity(m: &mut KernelMapper, root: PhysAddr, start: u64, end: u64, size: PageSize, flags: u64) -> Result<(), MapError> {
    if start >= end {
        return Ok(());
    }
    m.map_range(root, va(start), pa(start), end - start, size, flags)
}

/// Builds the kernel's tables; returns the root. `leaf` is the direct-map
/// leaf size (already checked against the CPU).
///
/// # Errors
/// [`MapError`] when the pool runs out (it is sized for this).
pub fn build_kernel_space(m: &mut KernelMapper, info: &BootInfo, arena: (u64, u64), leaf: PageSize) -> Result<PhysAddr, MapError> {
    let root = m.new_root()?;
    let [user, user_end, text, rodata, data, data_end] = sections();
    let image = [
        (user, user_end, Pte::USER),
        (text, rodata, 0),
        (rodata, data, Pte::NO_EXECUTE),
        (data, data_end, Pte::WRITABLE | Pte::NO_EXECUTE),
    ];
    if user & !(PAGE_SIZE_2M - 1) == (data_end - 1) & !(PAGE_SIZE_2M - 1) {
        // The whole image in one page table (the usual case): one walk,
        // then four runs of entries. Fewer ring-0 instructions than four
        // map_range calls, on the path to Ready.
        let pt = m.leaf_table(root, va(user), PageSize::Size4K, true)?;
        for (start, end, flags) in image {
            let first = va(start).index(Level::Pt);
            m.fill(pt, first, ((end - start) / PAGE_SIZE) as usize, pa(start), PageSize::Size4K, flags);
        }
    } else {
        for (start, end, flags) in image {
            identity(m, root, start, end, PageSize::Size4K, flags)?;
        }
    }
    identity(m, root, arena.0, arena.1, PageSize::Size2M, Pte::WRITABLE | Pte::NO_EXECUTE)?;
    if leaf != PageSize::Size4K {
        for &(start, end) in info.ram() {
            // Whole 2 MiB units only: the edges below 2 MiB are the kernel's
            // and reached through the identity map.
            let (s, e) = (start.next_multiple_of(PAGE_SIZE_2M), end & !(PAGE_SIZE_2M - 1));
            if s < e {
                m.map_range(root, va(DIRECT_MAP_BASE + s), pa(s), e - s, leaf, Pte::WRITABLE | Pte::NO_EXECUTE)?;
            }
        }
    }
    Ok(root)
}

/// PML4 slot whose entry points at a "table" in the MMIO hole (outside RAM).
pub const BAD_SLOT_OUTSIDE_RAM: usize = 3;
/// PML4 slot whose entry has PS set (reserved in a PML4E, SDM Vol. 3A
/// §4.5, Table 4-15).
pub const BAD_SLOT_RESERVED: usize = 4;

/// The `memvisor.test=bad-tables` hook: two PML4 entries no walk may
/// follow, for the VMM's translation error tests. Nothing ever accesses
/// these addresses, and tasks copy only [`KERNEL_SLOTS`].
pub fn plant_bad_entries(m: &mut KernelMapper, root: PhysAddr) {
    use memvisor_guest_mm::paging::FrameMemory;
    let t = m.mem.table(root);
    t[BAD_SLOT_OUTSIDE_RAM] = memvisor_abi::layout::MMIO_HOLE_START | Pte::PRESENT | Pte::WRITABLE;
    t[BAD_SLOT_RESERVED] = root.as_u64() | Pte::PRESENT | Pte::WRITABLE | Pte::HUGE;
}

/// Maps the 4 KiB MMIO page at physical `addr` at the same virtual address
/// in the kernel's tables (slot 0, so every task's space sees it too),
/// supervisor-only, uncached; a page mapped already is fine.
///
/// # Errors
/// [`MapError`] when the pool runs out.
pub fn map_mmio(m: &mut KernelMapper, root: PhysAddr, addr: u64) -> Result<(), MapError> {
    match m.map_range(root, va(addr), pa(addr), PAGE_SIZE, PageSize::Size4K, Pte::WRITABLE | Pte::NO_EXECUTE | Pte::CACHE_DISABLE) {
        Ok(()) | Err(MapError::AlreadyMapped(_)) => Ok(()),
        Err(e) => Err(e),
    }
}
