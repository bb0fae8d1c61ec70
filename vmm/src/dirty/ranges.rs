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
    let mut ranges: Vec<PageRange> = Vec::new();
    // Sparse bitmaps are the common case: skip 256 pages at a time while
    // all four words are zero.
    let mut next = 0;
    while next < bitmap.len() {
        if next + 4 <= bitmap.len() && (bitmap[next] | bitmap[next + 1] | bitmap[next + 2] | bitmap[next + 3]) == 0 {
            next += 4;
            continue;
        }
        let w = next;
        next += 1;
        let mut bits = bitmap[w];
        while bits != 0 {
            let start = bits.trailing_zeros();
            // Length of the run of ones starting at `start`.
            let len = (!(bits >> start)).trailing_zeros().min(64 - start);
            let first = base + (w as u64) * 64 + u64::from(start);
            match ranges.last_mut() {
                Some(last) if last.end() == first => last.count += u64::from(len),
                _ => ranges.push(PageRange { first, count: u64::from(len) }),
            }
            bits = if start + len >= 64 { 0 } else { bits & !(((1u64 << len) - 1) << start) };
        }
    }
    ranges
}

/// Converts sorted, distinct page offsets into runs starting at `base`.
#[must_use]
pub fn pages_to_ranges(sorted: &[u64], base: u64) -> Vec<PageRange> {
    let mut ranges: Vec<PageRange> = Vec::new();
    for &p in sorted {
        match ranges.last_mut() {
            Some(last) if last.end() == base + p => last.count += 1,
            _ => ranges.push(PageRange { first: base + p, count: 1 }),
        }
    }
    ranges
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

/// ORs `other` into `acc` (word by word; `acc` grows if shorter).
pub fn merge_into(acc: &mut Vec<u64>, other: &[u64]) {
    if acc.len() < other.len() {
        acc.resize(other.len(), 0);
    }
    for (a, b) in acc.iter_mut().zip(other) {
        *a |= *b;
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
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x & (x >> 3)
                })
                .collect();
            assert_eq!(bitmap_to_ranges(&bm, 1000), slow(&bm, 1000));
        }
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

    #[test]
    fn merge_ors_and_grows() {
        let mut acc = vec![0b01];
        merge_into(&mut acc, &[0b10, 0b1]);
        assert_eq!(acc, vec![0b11, 0b1]);
    }
}
