//! Dirty bitmaps and page ranges: the pure core of dirty tracking.
//!
//! A dirty bitmap has one bit per 4 KiB guest page of a memslot, bit `i` of
//! word `i / 64` (KVM api.rst, KVM_GET_DIRTY_LOG: "one bit per page, starting
//! at the first page of the slot", little-endian u64 words). Everything here
//! works on plain `&[u64]` so it is tested without KVM.

use serde::{Deserialize, Serialize};

/// A run of consecutive guest pages, in guest-physical page numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageRange {
    /// First guest page frame number (guest-physical address >> 12).
    pub first: u64,
    /// Number of pages (never zero).
    pub count: u64,
}

impl PageRange {
    /// One past the last page.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// Converts a bitmap whose bit 0 is page `base` into maximal runs of set
/// bits, in ascending order. Runs that cross word boundaries are merged.
#[must_use]
pub fn bitmap_to_ranges(bitmap: &[u64], base: u64) -> Vec<PageRange> {
    let mut ranges = Vec::new();
    bitmap_to_ranges_into(bitmap, base, &mut ranges);
    ranges
}

/// [`bitmap_to_ranges`], appending to `out` (whose earlier runs are left
/// alone, never extended), so a caller can reuse one buffer.
pub fn bitmap_to_ranges_into(bitmap: &[u64], base: u64, out: &mut Vec<PageRange>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("bmi1") {
        // SAFETY: the CPU has AVX2 and BMI1 (checked just above), the only
        // requirement of a `target_feature(enable = "avx2,bmi1")` function.
        unsafe { scan_avx2(bitmap, base, out) };
        return;
    }
    scan(bitmap, base, out, nonzero_words);
}

/// Bitmap words looked at together: 4096 pages. A sparse harvest pays
/// about one mispredicted branch per block that holds dirty pages (where
/// its loop over them ends), so larger blocks cost less; 64 words keep the
/// nonzero mask one `u64`.
const BLOCK: usize = 64;
/// Most runs one bitmap word holds (every other bit set).
const RUNS_PER_WORD: usize = 32;

/// Bit `i` set when word `i` of the block is nonzero.
fn nonzero_words(block: &[u64; BLOCK]) -> u64 {
    block.iter().enumerate().fold(0, |mask, (i, w)| mask | (u64::from(*w != 0) << i))
}

/// [`nonzero_words`] with sixteen 256-bit compares: a harvest of a sparsely
/// dirty GiB is one pass over its 32 KiB bitmap, and that pass is much of
/// what memvisor adds to KVM's ioctl (the release profile optimises for
/// size, so the compiler would not vectorise the plain loop; measured on
/// the reference host: 0.7 µs instead of 2.4 µs per empty GiB).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn nonzero_words_avx2(block: &[u64; BLOCK]) -> u64 {
    use std::arch::x86_64::{__m256i, _mm256_castsi256_pd, _mm256_cmpeq_epi64, _mm256_loadu_si256, _mm256_movemask_pd, _mm256_setzero_si256};
    let p = block.as_ptr().cast::<__m256i>();
    let zero = _mm256_setzero_si256();
    let mut zero_mask = 0u64;
    for lane in 0..BLOCK / 4 {
        // SAFETY: `block` is 512 readable bytes and lane < 16, so the
        // unaligned 32-byte load at 32 * lane stays inside it.
        let v = unsafe { _mm256_loadu_si256(p.add(lane)) };
        // One bit per 64-bit element that equals zero.
        let z = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(v, zero))) as u64;
        zero_mask |= z << (4 * lane);
    }
    !zero_mask
}

/// [`scan`] with the AVX2 word test and BMI1's `tzcnt`, compiled for both
/// as a whole.
///
/// # Safety
/// The CPU must support AVX2 and BMI1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,bmi1")]
unsafe fn scan_avx2(bitmap: &[u64], base: u64, ranges: &mut Vec<PageRange>) {
    scan(bitmap, base, ranges, |b| nonzero_words_avx2(b));
}

/// The indices of a mask's set bits, lowest first.
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = usize;
    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let i = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(i)
    }
}

/// The range being built: it grows while runs touch, and goes to the output
/// when one does not. Empty (`first == end`) until the first page. Its two
/// fields stay in registers in the loops that use it.
#[derive(Debug, Default)]
pub struct OpenRange {
    first: u64,
    end: u64,
}

impl OpenRange {
    /// Adds `page`, which is no lower than any page added before (a repeat
    /// of the last one counts once): it extends the open range, or the open
    /// range goes to `out` and a new one starts at `page`. Costs a compare
    /// or two per page.
    #[inline(always)]
    pub fn add_page(&mut self, page: u64, out: &mut Vec<PageRange>) {
        if page == self.end {
            // Also the first page of an empty range at page 0.
            self.end += 1;
        } else if page > self.end {
            self.finish(out);
            (self.first, self.end) = (page, page + 1);
        }
        // else page == end - 1: a repeat, already in the open range.
    }

    /// Writes the open range, if any, to `out` and empties it.
    #[inline(always)]
    pub fn finish(&mut self, out: &mut Vec<PageRange>) {
        if self.end != self.first {
            out.push(PageRange { first: self.first, count: self.end - self.first });
            self.first = self.end;
        }
    }
}

/// Appends the runs of `bitmap` (bit 0 = page `base`) to `ranges`, looking
/// only at the words `nonzero` marks in each block.
///
/// Each block's ranges are written into spare capacity reserved for the
/// block's worst case, so the loop over its runs makes no call and no
/// capacity check; the open range lives in registers and is written out
/// only when the next run does not touch it.
#[inline(always)]
fn scan(bitmap: &[u64], base: u64, ranges: &mut Vec<PageRange>, nonzero: impl Fn(&[u64; BLOCK]) -> u64) {
    let mut open = OpenRange::default();
    let blocks = bitmap.chunks_exact(BLOCK);
    let tail = blocks.remainder();
    for (b, block) in blocks.enumerate() {
        let block: &[u64; BLOCK] = block.try_into().expect("chunks_exact yields BLOCK words");
        let mask = nonzero(block);
        if mask != 0 {
            block_runs(SetBits(mask).map(|i| (block[i], base + ((b * BLOCK + i) as u64) * 64)), BLOCK, ranges, &mut open);
        }
    }
    let tail_start = bitmap.len() - tail.len();
    block_runs(tail.iter().enumerate().map(|(i, &bits)| (bits, base + ((tail_start + i) as u64) * 64)), tail.len(), ranges, &mut open);
    open.finish(ranges);
}

/// Adds the runs of at most `max_words` words, each `(bits, page of bit
/// 0)` in ascending page order, to `open`, writing finished ranges to
/// `ranges`.
#[inline(always)]
fn block_runs(words: impl Iterator<Item = (u64, u64)>, max_words: usize, ranges: &mut Vec<PageRange>, open: &mut OpenRange) {
    // Each range written here is finished by a run that starts here, so
    // the block writes at most that many.
    ranges.reserve(max_words * RUNS_PER_WORD);
    let spare = ranges.spare_capacity_mut();
    let mut n = 0;
    for (mut bits, first_page) in words {
        while bits != 0 {
            let start = bits.trailing_zeros();
            // Adding the lowest set bit clears the lowest run of ones and
            // sets the bit just above it (or overflows to 0 when the run
            // reaches bit 63, where trailing_zeros gives 64).
            let above = bits.wrapping_add(bits & bits.wrapping_neg());
            let end = above.trailing_zeros();
            bits &= above;
            let page = first_page + u64::from(start);
            if page != open.end {
                if open.end != open.first {
                    spare[n].write(PageRange { first: open.first, count: open.end - open.first });
                    n += 1;
                }
                open.first = page;
            }
            open.end = first_page + u64::from(end);
        }
    }
    let len = ranges.len() + n;
    // SAFETY: the first `n` elements of the spare capacity were written
    // just above, and `len` is within the capacity reserved.
    unsafe { ranges.set_len(len) };
}

/// Converts sorted page offsets (repeats allowed) into runs starting at
/// `base`, like [`sorted_pages_to_ranges_into`].
#[must_use]
pub fn pages_to_ranges(sorted: &[u64], base: u64) -> Vec<PageRange> {
    let mut ranges = Vec::new();
    sorted_pages_to_ranges_into(sorted, base, &mut ranges);
    ranges
}

/// Appends the maximal runs of `sorted` (page offsets from `base`, in
/// ascending order, repeats allowed: a page a ring reported twice counts
/// once) to `out`, whose earlier runs are left alone, never extended.
///
/// The open run is an [`OpenRange`], written out only when the next page
/// does not continue it. Offsets out of order would give overlapping or
/// unordered runs; debug builds check the order.
pub fn sorted_pages_to_ranges_into(sorted: &[u64], base: u64, out: &mut Vec<PageRange>) {
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "pages must be sorted");
    let mut open = OpenRange::default();
    for &p in sorted {
        open.add_page(base + p, out);
    }
    open.finish(out);
}

/// Sets the bits of `ranges` (relative to `base`) in `bitmap`; pages outside
/// the bitmap are ignored and counted in the return value.
pub fn set_ranges(bitmap: &mut [u64], base: u64, ranges: &[PageRange]) -> u64 {
    let capacity = bitmap.len() as u64 * 64;
    let mut outside = 0;
    for r in ranges {
        for page in r.first..r.end() {
            match page.checked_sub(base).filter(|&i| i < capacity) {
                Some(i) => bitmap[(i / 64) as usize] |= 1 << (i % 64),
                None => outside += 1,
            }
        }
    }
    outside
}

/// Zeroes the words of `bitmap` (bit 0 = page `base`) that hold any page
/// of `ranges`; pages outside the bitmap are ignored. After
/// [`bitmap_to_ranges_into`] this empties the bitmap in time proportional
/// to what it held.
pub fn clear_ranges(bitmap: &mut [u64], base: u64, ranges: &[PageRange]) {
    for r in ranges {
        let Some(first) = r.first.checked_sub(base) else { continue };
        let (w0, w1) = ((first / 64) as usize, ((first + r.count.max(1) - 1) / 64) as usize);
        if let Some(words) = bitmap.get_mut(w0..=w1.min(bitmap.len().saturating_sub(1))) {
            words.fill(0);
        }
    }
}

/// Converts sparse bitmap words — `(word index, bits)` in ascending word
/// order, bit `b` of word `w` being page `base + 64 w + b` — into maximal
/// runs, like [`bitmap_to_ranges`] over the same words laid out densely.
#[must_use]
pub fn sparse_words_to_ranges(words: &[(usize, u64)], base: u64) -> Vec<PageRange> {
    let mut ranges = Vec::new();
    sparse_words_to_ranges_into(words, base, &mut ranges);
    ranges
}

/// [`sparse_words_to_ranges`], appending to `out` like
/// [`bitmap_to_ranges_into`].
pub fn sparse_words_to_ranges_into(words: &[(usize, u64)], base: u64, out: &mut Vec<PageRange>) {
    // The same run kernel as a dense scan, fed the listed words only; its
    // open range starts empty, so nothing already in `out` is extended.
    let mut open = OpenRange::default();
    block_runs(words.iter().map(|&(w, bits)| (bits, base + (w as u64) * 64)), words.len(), out, &mut open);
    open.finish(out);
}

/// The union of two ascending lists of disjoint, non-adjacent runs, as one
/// such list (touching or overlapping runs are joined). Linear in the
/// number of runs, so merging the VMM's few writes into a harvest costs
/// nothing like a pass over the slot's bitmap.
#[must_use]
pub fn union(a: &[PageRange], b: &[PageRange]) -> Vec<PageRange> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    union_into(a, b, &mut out);
    out
}

/// [`union`], appending to `out` like [`bitmap_to_ranges_into`].
pub fn union_into(a: &[PageRange], b: &[PageRange], out: &mut Vec<PageRange>) {
    let floor = out.len();
    let (mut i, mut j) = (0, 0);
    loop {
        let next = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x.first <= y.first => {
                i += 1;
                *x
            }
            (_, Some(y)) => {
                j += 1;
                *y
            }
            (Some(x), None) => {
                i += 1;
                *x
            }
            (None, None) => break,
        };
        match out.get_mut(floor..).and_then(<[PageRange]>::last_mut) {
            Some(last) if next.first <= last.end() => {
                let end = last.end().max(next.end());
                last.count = end - last.first;
            }
            _ => out.push(next),
        }
    }
}

/// Number of set bits.
#[must_use]
pub fn count_pages(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Number of u64 words needed for `pages` bits.
#[must_use]
pub fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// Total pages in a list of ranges.
#[must_use]
pub fn pages_in(ranges: &[PageRange]) -> u64 {
    ranges.iter().map(|r| r.count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_abi::splitmix;

    /// The obvious bit-by-bit conversion, to check the fast one against.
    fn slow(bitmap: &[u64], base: u64) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = Vec::new();
        for i in 0..bitmap.len() as u64 * 64 {
            if bitmap[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                match out.last_mut() {
                    Some(l) if l.end() == base + i => l.count += 1,
                    _ => out.push(PageRange { first: base + i, count: 1 }),
                }
            }
        }
        out
    }

    #[test]
    fn sorted_pages_make_the_same_ranges_as_their_bitmap() {
        let pages = [0u64, 1, 2, 5, 63, 64, 65, 200];
        let mut bm = vec![0; words_for(256)];
        for p in pages {
            bm[(p / 64) as usize] |= 1 << (p % 64);
        }
        assert_eq!(pages_to_ranges(&pages, 7), bitmap_to_ranges(&bm, 7));
        assert!(pages_to_ranges(&[], 0).is_empty());
    }

    #[test]
    fn sorted_pages_with_repeats_make_one_range_per_run() {
        let r = |first, count| PageRange { first, count };
        // Repeats inside and at the ends of runs, adjacent runs, a lone page.
        assert_eq!(pages_to_ranges(&[0, 0, 1, 2, 2, 4, 5, 5, 5, 9], 100), vec![r(100, 3), r(104, 2), r(109, 1)]);
        assert_eq!(pages_to_ranges(&[7, 7, 7], 0), vec![r(7, 1)]);
        // The last page of a slot whose last word is partial.
        assert_eq!(pages_to_ranges(&[130, 131, 131], 0), vec![r(130, 2)]);
        // Appending after a range that ends where the first page is: a new
        // range, the old one untouched (it may belong to another slot).
        let mut out = vec![r(50, 50)];
        sorted_pages_to_ranges_into(&[0, 1, 3], 100, &mut out);
        assert_eq!(out, vec![r(50, 50), r(100, 2), r(103, 1)]);
        let mut out = vec![r(5, 1)];
        sorted_pages_to_ranges_into(&[], 100, &mut out);
        assert_eq!(out, vec![r(5, 1)], "no pages, nothing appended");
    }

    #[test]
    fn sorted_pages_match_their_bitmap_on_pseudo_random_sets() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || splitmix::next(&mut x);
        for trial in 0..300 {
            let pages = 64 * (1 + next() % 40) + next() % 64;
            let n = (next() % 700) as usize;
            let mut sorted: Vec<u64> = (0..n)
                .map(|_| match next() % 6 {
                    // Clusters near the slot's ends and page 0.
                    0 => pages - 1 - next() % 4,
                    1 => next() % 4,
                    _ => next() % pages,
                })
                .collect();
            sorted.sort_unstable();
            let mut bm = vec![0u64; words_for(pages)];
            for &p in &sorted {
                bm[(p / 64) as usize] |= 1 << (p % 64);
            }
            assert_eq!(pages_to_ranges(&sorted, 4242), slow(&bm, 4242), "trial {trial}");
        }
    }

    #[test]
    fn sparse_words_match_the_dense_scan_at_word_edges() {
        // Bit 63 of one word joined to bit 0 of the next, full words, gaps
        // of one word, and a range before them that must not be extended.
        let words = [(0usize, 1u64 << 63), (1, 0b1), (2, u64::MAX), (3, 1), (5, 1 << 63), (6, 0b1010), (9, u64::MAX)];
        let mut dense = vec![0u64; 10];
        for &(w, bits) in &words {
            dense[w] = bits;
        }
        assert_eq!(sparse_words_to_ranges(&words, 64), slow(&dense, 64));
        let mut out = vec![PageRange { first: 0, count: 64 + 63 }];
        sparse_words_to_ranges_into(&words, 64, &mut out);
        assert_eq!(out[0], PageRange { first: 0, count: 127 });
        assert_eq!(&out[1..], &slow(&dense, 64)[..]);
        assert!(sparse_words_to_ranges(&[], 0).is_empty());
    }

    #[test]
    fn empty_and_full_bitmaps() {
        assert!(bitmap_to_ranges(&[0, 0], 0).is_empty());
        assert_eq!(bitmap_to_ranges(&[u64::MAX, u64::MAX], 10), vec![PageRange { first: 10, count: 128 }]);
    }

    #[test]
    fn runs_across_word_boundaries_merge() {
        let bm = [1u64 << 63, 0b111, 0, 1];
        assert_eq!(
            bitmap_to_ranges(&bm, 0),
            vec![PageRange { first: 63, count: 4 }, PageRange { first: 192, count: 1 }]
        );
    }

    #[test]
    fn fast_conversion_matches_bit_by_bit_on_pseudo_random_bitmaps() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let bm: Vec<u64> = (0..5)
                .map(|_| {
                    let v = splitmix::next(&mut x);
                    v & (v >> 3)
                })
                .collect();
            assert_eq!(bitmap_to_ranges(&bm, 1000), slow(&bm, 1000));
        }
    }

    #[test]
    fn fast_conversion_matches_bit_by_bit_across_blocks() {
        // Several 64-word blocks and a tail: sparse, dense, full words and
        // runs that cross word and block boundaries.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || splitmix::next(&mut x);
        for density in 0..6 {
            let bm: Vec<u64> = (0..3 * 64 + 21)
                .map(|i| match density {
                    0 => next() & next() & next() & next() & next(),
                    1 => next() & next(),
                    2 => next(),
                    3 if i % 7 == 0 => 0,
                    3 => u64::MAX,
                    4 if i % 64 == 63 => 1 << 63,
                    4 if i % 64 == 0 => 1,
                    _ => next() | next(),
                })
                .collect();
            assert_eq!(bitmap_to_ranges(&bm, 77), slow(&bm, 77), "density {density}");
            let mut portable = Vec::new();
            scan(&bm, 77, &mut portable, nonzero_words);
            assert_eq!(portable, slow(&bm, 77), "density {density}, without AVX2");
            // Appending after an unrelated range never extends it.
            let mut out = vec![PageRange { first: 70, count: 7 }];
            bitmap_to_ranges_into(&bm, 77, &mut out);
            assert_eq!(out[0], PageRange { first: 70, count: 7 });
            assert_eq!(&out[1..], &slow(&bm, 77)[..]);
        }
        let full = vec![u64::MAX; 64 * 4];
        assert_eq!(bitmap_to_ranges(&full, 0), vec![PageRange { first: 0, count: 64 * 64 * 4 }]);
        assert_eq!(bitmap_to_ranges(&vec![0; 64 * 4 + 3], 0), vec![]);
        let mut edge = vec![0u64; 130];
        edge[63] = 1 << 63;
        edge[64] = 0b11;
        edge[129] = 1 << 63;
        assert_eq!(bitmap_to_ranges(&edge, 0), vec![PageRange { first: 64 * 63 + 63, count: 3 }, PageRange { first: 129 * 64 + 63, count: 1 }]);
    }

    #[test]
    fn clearing_the_ranges_found_empties_the_bitmap() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for density in 0..4 {
            let mut bm: Vec<u64> = (0..150)
                .map(|_| {
                    let v = splitmix::next(&mut x);
                    match density {
                        0 => v & (v >> 5) & (v >> 11) & (v >> 17),
                        1 => v & (v >> 3),
                        2 => v,
                        _ => u64::MAX,
                    }
                })
                .collect();
            let found = bitmap_to_ranges(&bm, 500);
            clear_ranges(&mut bm, 500, &found);
            assert_eq!(count_pages(&bm), 0, "density {density}");
        }
        // Ranges outside the bitmap change nothing and do not panic.
        let mut bm = vec![u64::MAX; 2];
        clear_ranges(&mut bm, 500, &[PageRange { first: 10, count: 5 }, PageRange { first: 500 + 128, count: 3 }, PageRange { first: 500 + 100, count: 1000 }]);
        assert_eq!(bm, vec![u64::MAX, 0]);
    }

    #[test]
    fn ranges_round_trip_through_a_bitmap() {
        let ranges = vec![PageRange { first: 3, count: 70 }, PageRange { first: 100, count: 1 }];
        let mut bm = vec![0; words_for(128)];
        assert_eq!(set_ranges(&mut bm, 0, &ranges), 0);
        assert_eq!(bitmap_to_ranges(&bm, 0), ranges);
        assert_eq!(count_pages(&bm), 71);
        assert_eq!(pages_in(&ranges), 71);
    }

    #[test]
    fn pages_outside_the_bitmap_are_counted_not_written() {
        let mut bm = vec![0; 1];
        // Pages 5..15 against a bitmap covering pages 10..74: 5..10 fall outside.
        assert_eq!(set_ranges(&mut bm, 10, &[PageRange { first: 5, count: 10 }, PageRange { first: 74, count: 2 }]), 5 + 2);
        assert_eq!(count_pages(&bm), 5);
    }
}

#[cfg(test)]
mod union_tests {
    use super::*;

    fn r(first: u64, count: u64) -> PageRange {
        PageRange { first, count }
    }

    #[test]
    fn union_joins_overlapping_and_touching_runs() {
        let a = [r(0, 2), r(10, 5), r(30, 1)];
        let b = [r(2, 1), r(12, 10), r(40, 2)];
        assert_eq!(union(&a, &b), vec![r(0, 3), r(10, 12), r(30, 1), r(40, 2)]);
        assert_eq!(union(&a, &[]), a.to_vec());
        assert_eq!(union(&[], &b), b.to_vec());
    }

    #[test]
    fn union_matches_the_bitmap_of_both() {
        // Pseudo-random bitmaps: the union of their ranges equals the
        // ranges of their OR.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50 {
            let mut a = vec![0u64; 20];
            let mut b = vec![0u64; 20];
            for w in 0..20 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                a[w] = x & (x >> 7);
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                b[w] = if w % 3 == 0 { x } else { 0 };
            }
            let or: Vec<u64> = a.iter().zip(&b).map(|(p, q)| p | q).collect();
            let sparse_b: Vec<(usize, u64)> = b.iter().enumerate().filter(|(_, w)| **w != 0).map(|(i, w)| (i, *w)).collect();
            assert_eq!(sparse_words_to_ranges(&sparse_b, 100), bitmap_to_ranges(&b, 100));
            assert_eq!(union(&bitmap_to_ranges(&a, 100), &sparse_words_to_ranges(&sparse_b, 100)), bitmap_to_ranges(&or, 100));
            // Appending never extends what was already there.
            let mut out = vec![PageRange { first: 90, count: 10 }];
            bitmap_to_ranges_into(&or, 100, &mut out);
            assert_eq!(out[0], PageRange { first: 90, count: 10 });
            assert_eq!(&out[1..], &bitmap_to_ranges(&or, 100)[..]);
        }
    }
}
