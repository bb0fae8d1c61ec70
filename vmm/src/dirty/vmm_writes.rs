//! Pages the VMM itself wrote into guest memory.
//!
//! KVM's dirty log sees only the guest's writes. Every write the VMM makes
//! goes through vm-memory, which marks it in the region's bitmap: here a
//! [`VmmWriteBitmap`]. Its page bits live in vm-memory `AtomicBitmap`s, one
//! per 16 MiB block of the region, and a summary word per 64 blocks says
//! which blocks were written at all. A harvest then costs an atomic swap per
//! summary word plus one per bitmap word of the blocks actually written,
//! not a pass over the whole region's bitmap: the VMM writes a few pages
//! (a device's used ring, a boot parameter page) while a harvest of
//! sparsely dirty memory has to stay within 1.2× the cost of KVM's own
//! ioctls (`vmm bench dirty`).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, MmapRegion};

use crate::memory::GuestRam;

/// Granularity of the bitmap: the x86 base page.
const PAGE: NonZeroUsize = NonZeroUsize::new(4096).expect("nonzero");
/// Bytes per block: 4096 pages, so a block's bitmap is 64 words.
const BLOCK_BYTES: usize = 16 << 20;
/// Bitmap words per block.
const WORDS_PER_BLOCK: usize = BLOCK_BYTES / 4096 / 64;

/// Bitmap words the VMM wrote: `(word index, bits)`, ascending, bit `b` of
/// word `w` standing for the region's page `64 w + b`.
pub type SparseWords = Vec<(usize, u64)>;

/// vm-memory's dirty bitmap, split into blocks with a summary.
#[derive(Debug)]
pub struct VmmWriteBitmap {
    /// Page bits, one `AtomicBitmap` per [`BLOCK_BYTES`] of the region.
    blocks: Vec<AtomicBitmap>,
    /// Bit `b % 64` of word `b / 64`: block `b` may have bits set.
    touched: Vec<AtomicU64>,
    /// Bytes covered.
    len: usize,
}

impl VmmWriteBitmap {
    /// A bitmap for `len` bytes of memory.
    #[must_use]
    pub fn new(len: usize) -> Self {
        let nblocks = len.div_ceil(BLOCK_BYTES);
        let blocks = (0..nblocks).map(|b| AtomicBitmap::new((len - b * BLOCK_BYTES).min(BLOCK_BYTES), PAGE)).collect();
        let touched = (0..nblocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        VmmWriteBitmap { blocks, touched, len }
    }

    /// Takes the bits written since the last call, or `None` when nothing
    /// was written.
    ///
    /// No write is lost: a writer sets its page bits before its block's
    /// summary bit (release), and this call clears a summary bit (acquire)
    /// before it swaps that block's words out, so a write racing with this
    /// call is seen now or leaves its summary bit for the next call.
    pub fn take(&self) -> Option<SparseWords> {
        let mut out = Vec::new();
        for (i, word) in self.touched.iter().enumerate() {
            let mut summary = word.swap(0, Ordering::AcqRel);
            while summary != 0 {
                let b = i * 64 + summary.trailing_zeros() as usize;
                summary &= summary - 1;
                let Some(block) = self.blocks.get(b) else { continue };
                let bits = block.get_and_reset();
                out.extend(bits.into_iter().enumerate().filter(|&(_, w)| w != 0).map(|(w, bits)| (b * WORDS_PER_BLOCK + w, bits)));
            }
        }
        (!out.is_empty()).then_some(out)
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
        // vm-memory passes offsets inside the region; anything past its end
        // is ignored rather than trusted.
        let end = offset.saturating_add(len).min(self.len);
        let mut at = offset;
        while at < end {
            let b = at / BLOCK_BYTES;
            let block_end = ((b + 1) * BLOCK_BYTES).min(end);
            self.blocks[b].set_addr_range(at - b * BLOCK_BYTES, block_end - at);
            self.touched[b / 64].fetch_or(1 << (b % 64), Ordering::Release);
            at = block_end;
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.blocks.get(offset / BLOCK_BYTES).is_some_and(|b| b.is_addr_set(offset % BLOCK_BYTES))
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

/// Takes the VMM-write bits of every region, in region order: `None` for
/// regions the VMM did not write.
#[must_use]
pub fn take(ram: &GuestRam) -> Vec<Option<SparseWords>> {
    let mut out = Vec::new();
    take_into(ram, &mut out);
    out
}

/// [`take`] into `out`, replacing its contents but keeping its buffer (a
/// harvest allocates nothing when the VMM wrote nothing).
pub fn take_into(ram: &GuestRam, out: &mut Vec<Option<SparseWords>>) {
    out.clear();
    out.extend(ram.memory().iter().map(|region| {
        let mapping: &MmapRegion<VmmWriteBitmap> = region;
        mapping.bitmap().take()
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_taken_once() {
        let b = VmmWriteBitmap::new(64 * 4096);
        assert!(b.take().is_none());
        b.mark_dirty(4096 * 3 + 10, 5000);
        assert_eq!(b.take().unwrap(), vec![(0, 0b11000)]);
        assert!(b.take().is_none(), "taken bits are reset");
        b.mark_dirty(0, 0);
        assert!(b.take().is_none(), "empty writes mark nothing");
    }

    #[test]
    fn writes_across_blocks_land_in_the_right_words() {
        let b = VmmWriteBitmap::new(3 * BLOCK_BYTES + 8192);
        // The last page of block 0 and the first of block 1, one write.
        b.mark_dirty(BLOCK_BYTES - 4096, 8192);
        // The last page of the region (in the short fourth block).
        b.mark_dirty(3 * BLOCK_BYTES + 4096, 1);
        assert!(b.dirty_at(BLOCK_BYTES) && !b.dirty_at(2 * BLOCK_BYTES));
        let last_word = (3 * BLOCK_BYTES + 4096) / 4096 / 64;
        assert_eq!(b.take().unwrap(), vec![(WORDS_PER_BLOCK - 1, 1 << 63), (WORDS_PER_BLOCK, 1), (last_word, 0b10)]);
    }

    #[test]
    fn writes_past_the_end_are_ignored() {
        let b = VmmWriteBitmap::new(8192);
        b.mark_dirty(4096, 1 << 30);
        b.mark_dirty(1 << 40, 10);
        assert_eq!(b.take().unwrap(), vec![(0, 0b10)]);
    }
}
