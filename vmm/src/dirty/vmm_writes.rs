//! Pages the VMM itself wrote into guest memory.
//!
//! KVM's dirty log sees only the guest's writes. Every write the VMM makes
//! goes through vm-memory, which marks it in the region's bitmap: here a
//! [`VmmWriteBitmap`], vm-memory's `AtomicBitmap` (one bit per 4 KiB page)
//! plus one "anything written" flag, so that a harvest when the VMM wrote
//! nothing costs one atomic swap per region instead of a pass over the
//! whole bitmap (which would dominate harvests of sparsely dirty memory).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, MmapRegion};

use crate::memory::GuestRam;

/// Granularity of the bitmap: the x86 base page.
const PAGE: NonZeroUsize = NonZeroUsize::new(4096).expect("nonzero");

/// vm-memory's dirty bitmap with a summary flag.
#[derive(Debug)]
pub struct VmmWriteBitmap {
    bits: AtomicBitmap,
    any: AtomicBool,
}

impl VmmWriteBitmap {
    /// A bitmap for `len` bytes of memory.
    #[must_use]
    pub fn new(len: usize) -> Self {
        VmmWriteBitmap { bits: AtomicBitmap::new(len, PAGE), any: AtomicBool::new(false) }
    }

    /// Takes the bits written since the last call (bit 0 = the region's
    /// first page), or `None` when nothing was written.
    ///
    /// No write is lost: a writer sets its bits before raising the flag,
    /// and the flag is lowered before the bits are read, so a write racing
    /// with this call is seen now or by the next call.
    pub fn take(&self) -> Option<Vec<u64>> {
        if !self.any.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(self.bits.get_and_reset())
    }
}

impl Default for VmmWriteBitmap {
    fn default() -> Self {
        Self::new(0)
    }
}

impl<'a> WithBitmapSlice<'a> for VmmWriteBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for VmmWriteBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        self.bits.set_addr_range(offset, len);
        self.any.store(true, Ordering::Release);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.is_addr_set(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for VmmWriteBitmap {
    fn with_len(len: usize) -> Self {
        Self::new(len)
    }
}

/// Takes the VMM-write bitmap of every region, in region order: `None` for
/// regions the VMM did not write.
#[must_use]
pub fn take(ram: &GuestRam) -> Vec<Option<Vec<u64>>> {
    ram.memory()
        .iter()
        .map(|region| {
            let mapping: &MmapRegion<VmmWriteBitmap> = region;
            mapping.bitmap().take()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_taken_once() {
        let b = VmmWriteBitmap::new(64 * 4096);
        assert!(b.take().is_none());
        b.mark_dirty(4096 * 3 + 10, 5000);
        let bits = b.take().unwrap();
        assert_eq!(bits[0], 0b11000);
        assert!(b.take().is_none(), "taken bits are reset");
        b.mark_dirty(0, 0);
        assert!(b.take().is_none(), "empty writes mark nothing");
    }
}
