//! The checksum workload's page contents: in round `r` (from 1) a
//! pseudo-random eighth of the buffer's pages is rewritten, and every word
//! of a page is a function of the seed, the page, the word and the round
//! that last wrote the page (its *version*). So the guest can recompute
//! exactly what its whole buffer must hold after any round, with no table
//! in memory: a snapshot that lost a write, or restored a page from an
//! older snapshot, shows up as pages that differ.
//!
//! Pure functions, also run natively by the VMM's tests.

/// Words per 4 KiB page.
pub const PAGE_WORDS: u64 = 512;

/// One in `REWRITE_ONE_IN` pages is rewritten per round (a power of two,
/// so selection is a mask: ring-3 code must not divide).
pub const REWRITE_ONE_IN: u64 = 8;

use memvisor_abi::splitmix::{GOLDEN_GAMMA, finalise};

// The odd multipliers below only spread their inputs before SplitMix64's
// output function ([`finalise`]): [`GOLDEN_GAMMA`] is its increment, and
// 0xd1b5_4a32_d192_ed03 and 0xc2b2_ae3d_27d4_eb4f are the
// `memvisor_abi::workload::dirty_page` and xxHash64 (PRIME64_2) constants.

/// Whether round `round` (≥ 1) rewrites `page`. Round 0 is the initial
/// fill, which writes every page.
#[inline(always)]
#[must_use]
pub const fn rewritten(seed: u64, round: u64, page: u64) -> bool {
    if round == 0 {
        return true;
    }
    let h = finalise(seed ^ round.wrapping_mul(GOLDEN_GAMMA) ^ page.wrapping_mul(0xd1b5_4a32_d192_ed03));
    h & (REWRITE_ONE_IN - 1) == 0
}

/// The round that last wrote `page` by the end of round `round`.
#[inline(always)]
#[must_use]
pub const fn version(seed: u64, round: u64, page: u64) -> u64 {
    let mut r = round;
    while r > 0 {
        if rewritten(seed, r, page) {
            return r;
        }
        r -= 1;
    }
    0
}

/// The seed of `page`'s words at `version`.
#[inline(always)]
#[must_use]
pub const fn page_key(seed: u64, page: u64, version: u64) -> u64 {
    finalise(seed.wrapping_add(page.wrapping_mul(GOLDEN_GAMMA)) ^ version.wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
}

/// Word `word` of a page whose [`page_key`] is `key`.
#[inline(always)]
#[must_use]
pub const fn word(key: u64, word: u64) -> u64 {
    finalise(key ^ word.wrapping_mul(GOLDEN_GAMMA))
}

/// Writes `page`'s contents at `version` to `p`.
///
/// # Safety
/// `p` must be a writable, 8-byte aligned page ([`PAGE_WORDS`] words).
#[inline(always)]
pub unsafe fn write_page(p: *mut u64, seed: u64, page: u64, version: u64) {
    let key = page_key(seed, page, version);
    let mut j = 0;
    while j < PAGE_WORDS {
        // SAFETY: j < PAGE_WORDS, inside the caller's page.
        unsafe { p.add(j as usize).write_volatile(word(key, j)) };
        j += 1;
    }
}

/// Whether the page at `p` holds `page`'s contents at `version`.
///
/// # Safety
/// As [`write_page`], readable.
#[inline(always)]
pub unsafe fn page_matches(p: *const u64, seed: u64, page: u64, version: u64) -> bool {
    let key = page_key(seed, page, version);
    let mut same = true;
    let mut j = 0;
    while j < PAGE_WORDS {
        // SAFETY: j < PAGE_WORDS, inside the caller's page.
        same &= unsafe { p.add(j as usize).read_volatile() } == word(key, j);
        j += 1;
    }
    same
}

/// How many of the `pages` pages at `buf` differ from what they must hold
/// after round `round`.
///
/// # Safety
/// `buf` must be readable for `pages` pages, 8-byte aligned.
#[inline(always)]
pub unsafe fn differing_pages(buf: *const u64, pages: u64, seed: u64, round: u64) -> u64 {
    let mut bad = 0u64;
    let mut p = 0;
    while p < pages {
        // SAFETY: p < pages, inside the caller's buffer.
        let ok = unsafe { page_matches(buf.add((p * PAGE_WORDS) as usize), seed, p, version(seed, round, p)) };
        bad = bad.wrapping_add(u64::from(!ok));
        p += 1;
    }
    bad
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;

    #[test]
    fn about_an_eighth_of_the_pages_is_rewritten_each_round() {
        let n = (0..8192).filter(|&p| rewritten(3, 5, p)).count();
        assert!((800..1250).contains(&n), "{n} of 8192");
        assert!((0..64).all(|p| rewritten(3, 0, p)), "round 0 fills every page");
        assert_ne!((0..64).filter(|&p| rewritten(3, 1, p)).collect::<vec::Vec<_>>(), (0..64).filter(|&p| rewritten(3, 2, p)).collect::<vec::Vec<_>>());
    }

    #[test]
    fn a_page_s_version_is_the_last_round_that_rewrote_it() {
        for p in 0..200 {
            let v = version(9, 30, p);
            assert!(v == 0 || rewritten(9, v, p));
            assert!((v + 1..=30).all(|r| !rewritten(9, r, p)));
        }
    }

    #[test]
    fn a_stale_or_damaged_page_is_counted() {
        let pages = 16u64;
        let mut buf = vec![0u64; (pages * PAGE_WORDS) as usize];
        let seed = 5;
        for round in 0..=6 {
            for p in 0..pages {
                if rewritten(seed, round, p) {
                    // SAFETY: page p of our own buffer.
                    unsafe { write_page(buf.as_mut_ptr().add((p * PAGE_WORDS) as usize), seed, p, round) };
                }
            }
        }
        // SAFETY: our own buffer of `pages` pages.
        assert_eq!(unsafe { differing_pages(buf.as_ptr(), pages, seed, 6) }, 0);
        // A page put back to an older version (a dropped diff) differs.
        let p = (0..pages).find(|&p| version(seed, 6, p) > 0).unwrap();
        // SAFETY: as above.
        unsafe { write_page(buf.as_mut_ptr().add((p * PAGE_WORDS) as usize), seed, p, 0) };
        // SAFETY: as above.
        assert_eq!(unsafe { differing_pages(buf.as_ptr(), pages, seed, 6) }, 1);
        buf[3] ^= 1;
        // SAFETY: as above.
        assert_eq!(unsafe { differing_pages(buf.as_ptr(), pages, seed, 6) }, 2 - u64::from(p == 0));
    }
}
