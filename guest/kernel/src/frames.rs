//! Physical memory: the kernel arena, the page-table pool and the buddy
//! allocator over the rest of RAM.
//!
//! The layout is decided at boot from the PVH memory map by
//! [`memvisor_guest_mm::plan`] (a picture is there).
//!
//! The arena is identity-mapped with 2 MiB leaves, supervisor-only, so the
//! kernel reaches its metadata and every page table it builds without
//! mapping anything page by page. Everything else the memory map calls RAM,
//! above 1 MiB and outside the kernel image and the arena, goes to the
//! [`Buddy`] allocator. Fresh guest RAM is zero (the VMM's contract,
//! `memvisor_abi::boot`), so neither the metadata nor new page tables are
//! cleared at ring 0.

use memvisor_abi::layout::PAGE_SIZE;
use memvisor_guest_mm::buddy::{Buddy, FrameMeta};
use memvisor_guest_mm::paging::{ENTRIES, FrameMemory, FrameSource, PhysAddr};
use memvisor_guest_mm::plan;

use crate::bootinfo::BootInfo;

unsafe extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// Where the kernel image lies, `[start, end)`.
pub fn kernel_image() -> (u64, u64) {
    // Only the addresses of the linker symbols are taken (safe in Rust 2024).
    (&raw const __kernel_start as u64, &raw const __kernel_end as u64)
}

/// Pool frames each application processor's stacks take ([`crate::smp`]).
pub const AP_STACK_FRAMES: u64 = 12;

/// End of what the boot page tables identity-map (boot.rs: 512 × 2 MiB).
const BOOT_MAP_END: u64 = 1 << 30;

/// Why physical memory could not be set up.
#[derive(Debug, Clone, Copy)]
pub enum FramesError {
    /// No RAM range below 1 GiB holds the kernel arena.
    NoRoomForArena,
}

/// The page-table pool: 4 KiB frames in the arena handed out upwards.
/// Frames past `dirty_end` have never been used and are zero; frames below
/// it were given back with [`TablePool::release_to`] and are cleared when
/// handed out again (that costs a page of stores at ring 0, so the kernel
/// reuses the pool rarely).
#[derive(Debug)]
pub struct TablePool {
    next: u64,
    end: u64,
    dirty_end: u64,
}

impl TablePool {
    /// A mark to [`TablePool::release_to`] later.
    pub fn mark(&self) -> u64 {
        self.next
    }

    /// Gives back every frame handed out since `mark`.
    pub fn release_to(&mut self, mark: u64) {
        self.dirty_end = self.dirty_end.max(self.next);
        self.next = mark.min(self.next);
    }

    /// `frames` consecutive fresh frames (zero unless given back before),
    /// for memory the kernel keeps for good (stacks).
    pub fn alloc_contiguous(&mut self, frames: u64) -> Option<u64> {
        let start = self.next;
        let end = start.checked_add(frames * PAGE_SIZE)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }

    /// Frames left.
    pub fn remaining(&self) -> u64 {
        (self.end - self.next) / PAGE_SIZE
    }
}

impl FrameSource for TablePool {
    fn alloc_table(&mut self) -> Option<PhysAddr> {
        if self.next >= self.end {
            return None;
        }
        let frame = self.next;
        self.next += PAGE_SIZE;
        if frame < self.dirty_end {
            // SAFETY: the frame is in the arena, identity-mapped RW, and
            // was given back by its previous user.
            unsafe { (frame as *mut [u64; ENTRIES]).write_bytes(0, 1) };
        }
        PhysAddr::new(frame)
    }
}

/// Page tables as the kernel sees them: identity-mapped (the arena is).
#[derive(Debug, Clone, Copy)]
pub struct IdentityTables;

impl FrameMemory for IdentityTables {
    fn table(&mut self, phys: PhysAddr) -> &mut [u64; ENTRIES] {
        // SAFETY: every table the kernel builds comes from the table pool in
        // the arena, which is identity-mapped RW for ring 0 in every address
        // space (before the switch, by the boot tables' first GiB). The
        // kernel is single-threaded and uses one table reference at a time.
        unsafe { &mut *(phys.as_u64() as *mut [u64; ENTRIES]) }
    }
}

/// Physical memory after boot.
#[derive(Debug)]
pub struct Frames {
    /// The free-frame allocator.
    pub buddy: Buddy<'static>,
    /// The page-table pool.
    pub pool: TablePool,
    /// The arena `[start, end)`.
    pub arena: (u64, u64),
    /// RAM the memory map offered.
    pub ram_bytes: u64,
}

/// Lays out the arena and hands the remaining RAM to the buddy allocator.
/// O(memory-map ranges + buddy blocks).
///
/// # Errors
/// [`FramesError::NoRoomForArena`].
pub fn init(info: &BootInfo) -> Result<Frames, FramesError> {
    let image = kernel_image();
    let image = (image.0, image.1.next_multiple_of(PAGE_SIZE));
    // The application processors' stacks come from the pool (crate::smp).
    let ap_frames = u64::from(info.config.cpu_count() - 1) * AP_STACK_FRAMES;
    let plan = plan::plan_arena(info.ram(), image.1, ap_frames).ok_or(FramesError::NoRoomForArena)?;
    // The arena is written before the switch to the kernel's own tables,
    // through the boot tables, which map the first 1 GiB (boot.rs).
    if plan.end > BOOT_MAP_END {
        return Err(FramesError::NoRoomForArena);
    }
    // SAFETY: the arena is RAM (plan_arena checked), identity-mapped by the
    // boot tables (checked above; ~40 MiB at 5 GiB of RAM), used for nothing
    // else, and zero (fresh RAM). The metadata is its first `frames` entries.
    let meta = unsafe { core::slice::from_raw_parts_mut(plan.start as *mut FrameMeta, plan.frames as usize) };
    let mut buddy = Buddy::new(meta);
    for &range in info.ram() {
        for (s, e) in plan::free_parts(range, image, (plan.start, plan.end)) {
            if s < e {
                buddy.add_range(s, e);
            }
        }
    }
    let pool = TablePool { next: plan.pool_start, end: plan.end, dirty_end: 0 };
    Ok(Frames { buddy, pool, arena: (plan.start, plan.end), ram_bytes: info.ram_bytes() })
}
