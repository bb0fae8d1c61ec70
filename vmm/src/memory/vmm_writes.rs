//! Pages the VMM itself wrote into guest memory.
//!
//! KVM's dirty log sees only the guest's writes. Every write the VMM makes
//! goes through vm-memory, which marks it in the region's bitmap: here a
//! [`VmmWriteBitmap`], which implements vm-memory's `Bitmap` trait. Its page
//! bits are one flat array of atomic words, grouped in 16 MiB blocks of 64
//! words, and a summary word per 64 blocks says which blocks were written at
//! all. A harvest then costs an atomic swap per summary word plus one per
//! bitmap word of the blocks actually written, not a pass over the whole
//! region's bitmap: the VMM writes a few pages (a device's used ring, a boot
//! parameter page) while a harvest of sparsely dirty memory has to stay
//! within 1.2× the cost of KVM's own ioctls (`vmm bench dirty`).
//!
//! A range is marked a word at a time (one `fetch_or` per 64 pages), not a
//! bit at a time as vm-memory's `AtomicBitmap` does: the balloon marks every
//! range it releases, and 512 MiB bit by bit took ~0.35 ms of a reclaim
//! whose system call takes ~0.5 ms (`vmm bench balloon`, hugetlb-2m).
//!
//! Above the summaries, one [`WriteFlag`] per guest RAM says whether any of
//! its regions was written at all. A harvest with no VMM write (the usual
//! case between two device notifications) then reads that one word instead
//! of chasing each region's bitmap through vm-memory (the region list, the
//! region, its summary: a chain of dependent cache misses after a guest
//! run, up to ~1 µs on the reference host at load 4 by `rdtsc` around the
//! call), and a harvest after a write reuses its word buffers instead of
//! allocating one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, MmapRegion};

use crate::memory::GuestRam;

/// Granularity of the bitmap: the x86 base page.
const PAGE: usize = 4096;
/// Bytes per block: 4096 pages, so a block's bitmap is 64 words.
const BLOCK_BYTES: usize = 16 << 20;
/// Bitmap words per block.
const WORDS_PER_BLOCK: usize = BLOCK_BYTES / PAGE / 64;

/// Bitmap words the VMM wrote: `(word index, bits)`, ascending, bit `b` of
/// word `w` standing for the region's page `64 w + b`.
pub type SparseWords = Vec<(usize, u64)>;

/// Whether any region of one guest RAM was written since the last take:
/// shared by the regions' bitmaps (set after their page and summary bits)
/// and read by [`take_into`].
#[derive(Debug, Clone, Default)]
pub struct WriteFlag(Arc<AtomicBool>);

impl WriteFlag {
    /// Clears the flag and says whether it was set. A plain load first, so
    /// the common "nothing written" case does not write the shared line.
    fn take(&self) -> bool {
        self.0.load(Ordering::Acquire) && self.0.swap(false, Ordering::AcqRel)
    }
}

/// A dirty bitmap of one region, in blocks with a summary.
#[derive(Debug)]
pub struct VmmWriteBitmap {
    /// Page bits: bit `p % 64` of word `p / 64` is the region's page `p`.
    /// Bits past the region's last page are never set.
    words: Vec<AtomicU64>,
    /// Bit `b % 64` of word `b / 64`: block `b` may have bits set.
    touched: Vec<AtomicU64>,
    /// Bytes covered.
    len: usize,
    /// Set after every write, below the summary bits: see [`take_into`].
    any: WriteFlag,
}

impl VmmWriteBitmap {
    /// A bitmap for `len` bytes of memory, with a flag of its own.
    #[must_use]
    pub fn new(len: usize) -> Self {
        Self::with_flag(len, WriteFlag::default())
    }

    /// A bitmap for `len` bytes of memory that also sets `any` on every
    /// write (one flag for all regions of a guest RAM).
    #[must_use]
    pub fn with_flag(len: usize, any: WriteFlag) -> Self {
        let pages = len.div_ceil(PAGE);
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let touched = (0..len.div_ceil(BLOCK_BYTES).div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        VmmWriteBitmap { words, touched, len, any }
    }

    /// Takes the bits written since the last call, or `None` when nothing
    /// was written.
    pub fn take(&self) -> Option<SparseWords> {
        let mut out = Vec::new();
        self.take_words_into(&mut out);
        (!out.is_empty()).then_some(out)
    }

    /// [`take`](Self::take) into `out` (cleared first, its buffer kept);
    /// empty when nothing was written.
    ///
    /// No write is lost: a writer sets its page bits before its block's
    /// summary bit (release), and this call clears a summary bit (acquire)
    /// before it swaps that block's words out, so a write racing with this
    /// call is seen now or leaves its summary bit for the next call.
    pub fn take_words_into(&self, out: &mut SparseWords) {
        out.clear();
        for (i, word) in self.touched.iter().enumerate() {
            let mut summary = word.swap(0, Ordering::AcqRel);
            while summary != 0 {
                let b = i * 64 + summary.trailing_zeros() as usize;
                summary &= summary - 1;
                let first = b * WORDS_PER_BLOCK;
                let Some(block) = self.words.get(first..(first + WORDS_PER_BLOCK).min(self.words.len())) else { continue };
                for (w, bits) in block.iter().enumerate() {
                    // A plain load first: most words of a touched block are
                    // zero, and a swap would write every one of them.
                    if bits.load(Ordering::Relaxed) != 0 {
                        out.push((first + w, bits.swap(0, Ordering::AcqRel)));
                    }
                }
            }
        }
    }

    /// Sets the bits of pages `first..=last` (both inside the bitmap).
    fn set_pages(&self, first: usize, last: usize) {
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            // Bits lo..=hi; hi - lo + 1 may be 64.
            let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
            if let Some(word) = self.words.get(w) {
                word.fetch_or(mask, Ordering::Release);
            }
        }
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
        if offset >= end {
            return;
        }
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        // Page bits before summary bits: see `take`.
        self.set_pages(first, last);
        for b in (first * PAGE / BLOCK_BYTES)..=((end - 1) / BLOCK_BYTES) {
            if let Some(word) = self.touched.get(b / 64) {
                word.fetch_or(1 << (b % 64), Ordering::Release);
            }
        }
        // Summary bits before the flag, as page bits before summary bits.
        self.any.0.store(true, Ordering::Release);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / PAGE;
        offset < self.len && self.words.get(page / 64).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
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
    out.into_iter().map(|w| (!w.is_empty()).then_some(w)).collect()
}

/// [`take`] into `out`, one entry per region (empty for a region the VMM
/// did not write), keeping every buffer: a harvest allocates nothing once
/// the buffers have grown. Returns whether any region was written.
///
/// When the RAM's [`WriteFlag`] is clear, no region is looked at. No write
/// is lost: a writer sets the flag after its page and summary bits
/// (release), and the flag is cleared (acquire) before the regions are
/// walked, so a write racing with this call is seen now or leaves the flag
/// set for the next call.
pub fn take_into(ram: &GuestRam, out: &mut Vec<SparseWords>) -> bool {
    let regions = ram.regions().len();
    out.truncate(regions);
    out.resize_with(regions, Vec::new);
    out.iter_mut().for_each(Vec::clear);
    if !ram.vmm_write_flag().take() {
        return false;
    }
    for (region, words) in ram.memory().iter().zip(out.iter_mut()) {
        let mapping: &MmapRegion<VmmWriteBitmap> = region;
        mapping.bitmap().take_words_into(words);
    }
    out.iter().any(|w| !w.is_empty())
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
    fn ranges_set_exactly_the_pages_they_touch() {
        // A region of 3 blocks and a bit, so ranges cross blocks, words and
        // the short last word; each range against a page-by-page model.
        let len = 3 * BLOCK_BYTES + 5 * PAGE;
        let pages = len / PAGE;
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let b = VmmWriteBitmap::new(len);
            let offset = (next() % (len as u64 + PAGE as u64)) as usize;
            let size = match next() % 3 {
                0 => (next() % 200) as usize,
                1 => (next() % (64 * PAGE as u64 * 3)) as usize,
                _ => (next() % len as u64) as usize,
            };
            b.mark_dirty(offset, size);
            let end = offset.saturating_add(size).min(len);
            let mut want = vec![0u64; pages.div_ceil(64)];
            if offset < end {
                for p in offset / PAGE..=(end - 1) / PAGE {
                    want[p / 64] |= 1 << (p % 64);
                }
            }
            let want: SparseWords = want.into_iter().enumerate().filter(|&(_, w)| w != 0).collect();
            assert_eq!(b.take().unwrap_or_default(), want, "offset {offset:#x} size {size:#x}");
            assert!(b.take().is_none());
        }
    }

    #[test]
    fn the_ram_flag_skips_unwritten_ram_and_loses_no_write() {
        use vm_memory::{Bytes, GuestAddress};
        // One region; `out` starts longer, with stale contents, to be trimmed.
        let config = crate::config::VmConfig { mem_size: 64 << 20, backing: crate::config::Backing::Anon, ..crate::config::VmConfig::default() };
        let ram = GuestRam::new(&config).unwrap();
        let mut out = vec![vec![(7, 7)]; 3];
        assert!(!take_into(&ram, &mut out), "nothing written");
        assert_eq!(out, vec![Vec::new(); ram.regions().len()], "one empty entry per region, stale contents gone");
        ram.memory().write_obj(1u32, GuestAddress(5 * 4096 + 8)).unwrap();
        assert!(take_into(&ram, &mut out));
        assert_eq!(out[0], vec![(0, 1 << 5)]);
        assert!(!take_into(&ram, &mut out), "taken once");
        assert!(out.iter().all(Vec::is_empty));
        // A bitmap's bits without the flag (a write racing with a take that
        // already cleared the flag) are still taken by its own take.
        let b = VmmWriteBitmap::new(8192);
        b.mark_dirty(0, 1);
        assert!(b.any.take(), "its own flag is set");
        assert_eq!(b.take().unwrap(), vec![(0, 1)]);
    }

    #[test]
    fn writes_past_the_end_are_ignored() {
        let b = VmmWriteBitmap::new(8192);
        b.mark_dirty(4096, 1 << 30);
        b.mark_dirty(1 << 40, 10);
        assert_eq!(b.take().unwrap(), vec![(0, 0b10)]);
    }
}
