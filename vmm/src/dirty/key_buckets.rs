//! A ring harvest's out-of-order page offsets, sorted as they arrive: each
//! offset goes straight into one of 64 buckets by its top bits, so at the
//! harvest only the few offsets of each bucket are sorted, and the ranges
//! are built in the same pass.
//!
//! The key list this replaces pushed offsets in arrival order and, at the
//! harvest, counted them into buckets, scattered them into a second buffer,
//! sorted each bucket and then made ranges in one more pass: four passes
//! over the keys and three buffers (keys, scratch, ranges) to bring back
//! into the cache after the guest's run. Here the note does the bucketing
//! it would have done anyway (one shift, one byte-sized fill count), and the
//! harvest reads each bucket once. With 16 `u32` keys per bucket a bucket is
//! one 64-byte cache line, and 262 offsets spread over a slot fill about
//! four keys of each.
//!
//! A bucket that is full refuses the next offset; the caller then moves
//! everything into the slot's bitmap (`ring_pages`). That happens when
//! offsets bunch: more than 16 in one sixty-fourth of the slot, where the
//! bitmap costs little because bunched pages share its cache lines.

use crate::dirty::ranges::{OpenRange, PageRange};

/// log2 of the number of buckets.
const BUCKET_BITS: u32 = 6;
/// Buckets: one per sixty-fourth of the slot.
pub const BUCKETS: usize = 1 << BUCKET_BITS;
/// Keys per bucket: 16 `u32` fill one 64-byte cache line (the CLFLUSH line
/// size of CPUID leaf 1, EBX bits 15:8 times 8, is 64 on current x86-64
/// parts; `/proc/cpuinfo` reads `clflush size : 64` on the reference host).
pub const CAP: usize = 16;

/// One bucket's keys, aligned so that a bucket is exactly one cache line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Bucket([u32; CAP]);
const _: () = assert!(std::mem::size_of::<Bucket>() == 64);

/// Page offsets of one slot, bucketed by their top bits.
///
/// Invariant: bucket `b` holds `fill[b]` offsets in
/// `buckets[b].0[..fill[b]]`, each below the slot's page count and with
/// `offset >> shift == b`, in arrival order (repeats allowed).
#[derive(Debug, Clone)]
pub struct KeyBuckets {
    /// [`BUCKETS`] buckets, allocated at the first use and kept (4 KiB).
    buckets: Vec<Bucket>,
    /// Offsets held per bucket.
    fill: [u8; BUCKETS],
    /// Offsets held in all.
    len: usize,
    /// An offset's bucket is `offset >> shift`.
    shift: u32,
}

impl Default for KeyBuckets {
    fn default() -> Self {
        KeyBuckets { buckets: Vec::new(), fill: [0; BUCKETS], len: 0, shift: 0 }
    }
}

impl KeyBuckets {
    /// Whether a slot of `pages` pages can be held here: its offsets must
    /// fit a `u32` (16 TiB of 4 KiB pages; guest RAM is far smaller).
    #[must_use]
    pub fn fits(pages: u64) -> bool {
        pages <= u64::from(u32::MAX) + 1
    }

    /// Empties the buckets and sizes them for a slot of `pages` pages
    /// (which [`fits`](Self::fits)): bucket `b` takes the offsets whose top
    /// [`BUCKET_BITS`] bits below the slot's size are `b`.
    pub fn reset_for(&mut self, pages: u64) {
        debug_assert!(Self::fits(pages));
        if self.buckets.is_empty() {
            self.buckets = vec![Bucket([0; CAP]); BUCKETS];
        }
        self.clear();
        let bits = u64::BITS - pages.saturating_sub(1).leading_zeros();
        self.shift = bits.saturating_sub(BUCKET_BITS);
    }

    /// Prefetches the buckets for writing, once they exist ([`prefetch`]).
    ///
    /// [`prefetch`]: crate::dirty::prefetch
    pub fn prefetch_for_write(&self) {
        crate::dirty::prefetch::for_write(self.buckets.as_ptr().cast(), std::mem::size_of_val(self.buckets.as_slice()));
    }

    /// Offsets held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no offset is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `offset` (below the page count given to
    /// [`reset_for`](Self::reset_for)); false, adding nothing, when its
    /// bucket is full.
    #[inline(always)]
    pub fn push(&mut self, offset: u64) -> bool {
        // Offsets below the slot's size land in 0..BUCKETS; the `min` only
        // keeps a caller's mistake from indexing out of bounds.
        let b = usize::try_from(offset >> self.shift).map_or(BUCKETS - 1, |b| b.min(BUCKETS - 1));
        let f = usize::from(self.fill[b]);
        if f >= CAP {
            return false;
        }
        // `offset` fits a u32: the slot's size does (`fits`).
        match self.buckets.get_mut(b) {
            Some(bucket) => bucket.0[f] = offset as u32,
            None => return false,
        }
        self.fill[b] = (f + 1) as u8;
        self.len += 1;
        true
    }

    /// Every offset held, bucket by bucket (not sorted inside a bucket).
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets.iter().zip(self.fill).flat_map(|(bucket, f)| bucket.0[..usize::from(f)].iter().map(|&k| u64::from(k)))
    }

    /// Appends the maximal runs of the offsets held (as pages from `base`;
    /// a repeat counts once) to `out` in ascending order, whose earlier
    /// runs are left alone, never extended; then empties the buckets.
    ///
    /// Buckets are ascending and disjoint, so sorting each one sorts the
    /// whole; the open run carries across buckets (a run may straddle two).
    pub fn take_ranges_into(&mut self, base: u64, out: &mut Vec<PageRange>) {
        let mut open = OpenRange::default();
        for (bucket, &f) in self.buckets.iter_mut().zip(&self.fill) {
            let part = &mut bucket.0[..usize::from(f)];
            insertion_sort(part);
            for &k in part.iter() {
                open.add_page(base + u64::from(k), out);
            }
        }
        open.finish(out);
        self.clear();
    }

    /// Drops every offset held.
    pub fn clear(&mut self) {
        self.fill = [0; BUCKETS];
        self.len = 0;
    }
}

/// Sorts one bucket: at most [`CAP`] keys, about four when a few hundred
/// offsets spread over the slot, where insertion moves the fewest.
fn insertion_sort(v: &mut [u32]) {
    for i in 1..v.len() {
        let k = v[i];
        let mut j = i;
        while j > 0 && v[j - 1] > k {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_abi::splitmix::next;
    use crate::dirty::ranges;


    /// What the bitmap of `offsets` gives, the reference.
    fn reference(offsets: &[u64], pages: u64, base: u64) -> Vec<PageRange> {
        let mut bm = vec![0u64; ranges::words_for(pages)];
        for &o in offsets {
            bm[(o / 64) as usize] |= 1 << (o % 64);
        }
        ranges::bitmap_to_ranges(&bm, base)
    }

    #[test]
    fn ranges_match_the_bitmap_for_any_slot_size_and_spread() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut b = KeyBuckets::default();
        for pages in [1u64, 2, 63, 64, 65, 1000, 4096, 1 << 18, (1 << 18) + 5, 1 << 22] {
            for trial in 0..40 {
                b.reset_for(pages);
                let n = (next(&mut x) % 700) as usize;
                let mut offsets = Vec::new();
                for _ in 0..n {
                    let o = match next(&mut x) % 6 {
                        // Repeats, both ends of the slot, neighbours across
                        // a bucket boundary.
                        0 => offsets.last().copied().unwrap_or(0),
                        1 => pages - 1 - next(&mut x) % pages.min(3),
                        2 => next(&mut x) % pages.min(3),
                        3 => ((pages / 64) * (1 + next(&mut x) % 63)).saturating_sub(next(&mut x) % 2).min(pages - 1),
                        _ => next(&mut x) % pages,
                    };
                    if !b.push(o) {
                        break;
                    }
                    offsets.push(o);
                }
                assert_eq!(b.len(), offsets.len());
                let mut held: Vec<u64> = b.iter().collect();
                held.sort_unstable();
                let mut want_keys = offsets.clone();
                want_keys.sort_unstable();
                assert_eq!(held, want_keys, "pages {pages}, trial {trial}: iter yields every offset");
                let mut out = vec![PageRange { first: 3, count: 4 }];
                b.take_ranges_into(1000, &mut out);
                assert_eq!(out[0], PageRange { first: 3, count: 4 }, "an earlier range is left alone");
                assert_eq!(&out[1..], &reference(&offsets, pages, 1000)[..], "pages {pages}, trial {trial}, {} offsets", offsets.len());
                assert!(b.is_empty());
                let mut again = Vec::new();
                b.take_ranges_into(1000, &mut again);
                assert!(again.is_empty(), "a take empties the buckets");
            }
        }
    }

    #[test]
    fn a_full_bucket_refuses_and_keeps_what_it_has() {
        let mut b = KeyBuckets::default();
        b.reset_for(1 << 18);
        // Bucket 5 spans offsets 5 << 12 .. 6 << 12.
        for i in 0..CAP as u64 {
            assert!(b.push((5 << 12) + 100 - i));
        }
        assert!(!b.push((5 << 12) + 7), "the seventeenth offset of a bucket is refused");
        assert!(b.push(6 << 12), "other buckets still take offsets");
        assert_eq!(b.len(), CAP + 1);
        let mut out = Vec::new();
        b.take_ranges_into(0, &mut out);
        assert_eq!(out, vec![PageRange { first: (5 << 12) + 100 - 15, count: 16 }, PageRange { first: 6 << 12, count: 1 }]);
    }

    #[test]
    fn a_run_straddling_buckets_comes_out_whole() {
        let mut b = KeyBuckets::default();
        b.reset_for(64 * 64);
        // 64 pages per bucket: 62..70 crosses from bucket 0 into bucket 1.
        for o in [66, 63, 69, 62, 64, 65, 68, 67, 66] {
            assert!(b.push(o));
        }
        let mut out = Vec::new();
        b.take_ranges_into(10, &mut out);
        assert_eq!(out, vec![PageRange { first: 72, count: 8 }]);
    }

    #[test]
    fn slots_too_large_for_u32_offsets_are_refused() {
        assert!(KeyBuckets::fits(1 << 32));
        assert!(!KeyBuckets::fits((1 << 32) + 1));
    }
}
