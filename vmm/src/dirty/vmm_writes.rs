//! Pages the VMM itself wrote into guest memory.
//!
//! KVM's dirty log sees only the guest's writes. Every write the VMM makes
//! goes through vm-memory, whose `AtomicBitmap` (one bit per 4 KiB page,
//! per region) records it; this module reads and resets those bitmaps.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, MmapRegion};

use crate::memory::GuestRam;

/// Takes (reads and resets) the VMM-write bitmap of every region, in region
/// order; bit 0 of each is the region's first page.
#[must_use]
pub fn take(ram: &GuestRam) -> Vec<Vec<u64>> {
    ram.memory()
        .iter()
        .map(|region| {
            let mapping: &MmapRegion<AtomicBitmap> = region;
            mapping.bitmap().get_and_reset()
        })
        .collect()
}
