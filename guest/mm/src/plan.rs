//! Where the guest kernel puts its arena, and which RAM is left for the
//! buddy allocator: pure arithmetic over the memory map.
//!
//! ```text
//! 0        1 MiB         image end   2 MiB-aligned           arena end
//! │ boot data, │ kernel image │ free   │ arena: buddy metadata, │ free RAM …
//! │ BIOS areas │              │        │ page-table pool        │
//! ```
//!
//! The arena holds one [`crate::buddy::FrameMeta`] per frame up to the end of
//! RAM, then a pool of page-table frames big enough to map all RAM twice
//! with 4 KiB leaves (a direct map and a task window) plus the frames its
//! caller asks for (the application processors' stacks), rounded up to
//! 2 MiB so the kernel can map it with 2 MiB leaves.

use crate::buddy::{FRAME_SIZE, FrameMeta};

const SIZE_2M: u64 = 2 << 20;
/// Below this, RAM is the PC's low memory: boot data and BIOS areas.
pub const LOW_MEMORY_END: u64 = 1 << 20;

/// The arena's place and parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaPlan {
    /// First byte (2 MiB-aligned).
    pub start: u64,
    /// End (2 MiB-aligned).
    pub end: u64,
    /// Frames the buddy metadata describes (`0..frames`).
    pub frames: u64,
    /// Where the page-table pool starts (after the metadata).
    pub pool_start: u64,
}

/// Plans the arena right after the kernel image (`image_end`), for RAM
/// `ram` (`[start, end)` ranges), with `extra_frames` more pool frames;
/// `None` when no RAM range holds it.
#[must_use]
pub fn plan_arena(ram: &[(u64, u64)], image_end: u64, extra_frames: u64) -> Option<ArenaPlan> {
    let ram_end = ram.iter().map(|r| r.1).max()?;
    let frames = ram_end / FRAME_SIZE;
    let meta_bytes = (frames * FrameMeta::SIZE as u64).next_multiple_of(FRAME_SIZE);
    let ram_pages: u64 = ram.iter().map(|(s, e)| e.saturating_sub(*s) / FRAME_SIZE).sum();
    // One PT per 2 MiB and one PD per 1 GiB, twice, plus slack for the
    // kernel's own tables and small task mappings.
    let pool_frames = 2 * (ram_pages.div_ceil(512) + ram_pages.div_ceil(512 * 512)) + 64 + extra_frames;
    let start = image_end.next_multiple_of(SIZE_2M);
    let end = (start + meta_bytes + pool_frames * FRAME_SIZE).next_multiple_of(SIZE_2M);
    let fits = ram.iter().any(|(s, e)| *s <= start && end <= *e);
    fits.then_some(ArenaPlan { start, end, frames, pool_start: start + meta_bytes })
}

/// The parts of the RAM range `range` the buddy allocator gets: above low
/// memory, outside the kernel `image` and the `arena`. Empty parts have
/// `start >= end`.
#[must_use]
pub fn free_parts(range: (u64, u64), image: (u64, u64), arena: (u64, u64)) -> [(u64, u64); 3] {
    let (start, end) = (range.0.max(LOW_MEMORY_END), range.1);
    // The image lies below the arena; the three gaps around them, clipped.
    [(start, end.min(image.0)), (start.max(image.1), end.min(arena.0)), (start.max(arena.1), end)]
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn arena_follows_the_image_on_a_2m_boundary() {
        let ram = [(0, 0x9fc00), (MIB, 256 * MIB)];
        let p = plan_arena(&ram, 0x12f000, 0).unwrap();
        assert_eq!(p.start, 2 * MIB);
        assert_eq!(p.end % (2 * MIB), 0);
        assert_eq!(p.frames, 256 * MIB / FRAME_SIZE);
        assert_eq!(p.pool_start, p.start + (p.frames * FrameMeta::SIZE as u64).next_multiple_of(FRAME_SIZE));
        // Room for two 4K mappings of all RAM: 2 * (128 PTs + 1 PD) + 64.
        assert!((p.end - p.pool_start) / FRAME_SIZE >= 2 * 129 + 64);
    }

    #[test]
    fn arena_covers_the_hole_in_its_metadata_and_stays_small() {
        // 5 GiB split around the 3 GiB..4 GiB MMIO hole.
        let ram = [(0, 0x9fc00), (MIB, 3 * GIB), (4 * GIB, 6 * GIB)];
        let p = plan_arena(&ram, 0x12f000, 0).unwrap();
        assert_eq!(p.frames, 6 * GIB / FRAME_SIZE);
        assert!(p.end < 64 * MIB, "arena {:#x}", p.end);
    }

    #[test]
    fn extra_frames_grow_the_pool() {
        let ram = [(0, 0x9fc00), (MIB, 256 * MIB)];
        let (a, b) = (plan_arena(&ram, 0x12f000, 0).unwrap(), plan_arena(&ram, 0x12f000, 63 * 12).unwrap());
        assert_eq!(a.pool_start, b.pool_start);
        assert!((b.end - b.pool_start) - (a.end - a.pool_start) >= 63 * 12 * FRAME_SIZE - 2 * MIB);
        assert!((b.end - b.pool_start) / FRAME_SIZE >= 2 * 129 + 64 + 63 * 12);
    }

    #[test]
    fn no_arena_when_ram_is_too_small() {
        assert_eq!(plan_arena(&[(0, 0x9fc00), (MIB, 3 * MIB)], 0x12f000, 0), None);
        assert_eq!(plan_arena(&[], 0x12f000, 0), None);
    }

    #[test]
    fn free_parts_skip_low_memory_image_and_arena() {
        let image = (MIB, 0x130000);
        let arena = (2 * MIB, 4 * MIB);
        let parts = free_parts((MIB, 256 * MIB), image, arena);
        let nonempty: Vec<_> = parts.into_iter().filter(|(s, e)| s < e).collect();
        assert_eq!(nonempty, [(0x130000, 2 * MIB), (4 * MIB, 256 * MIB)]);
        // Low memory gives nothing.
        assert!(free_parts((0, 0x9fc00), image, arena).iter().all(|(s, e)| s >= e));
        // A range above 4 GiB is whole.
        let high = free_parts((4 * GIB, 6 * GIB), image, arena);
        assert_eq!(high.into_iter().filter(|(s, e)| s < e).collect::<Vec<_>>(), [(4 * GIB, 6 * GIB)]);
    }
}
