//! The guest-paging workloads' shared definitions (issue 6): replacement
//! policies, access patterns, the paravirtual swap device's request, and the
//! deterministic access generator both sides run.
//!
//! The VMM never needs the guest to report its access trace: the ring-3
//! task draws access `i` with [`access`]`(pattern, seed, i, pages)` and
//! decides whether it writes with [`is_write`], and the VMM calls the same
//! functions to regenerate the trace for Belady's OPT and for simulating
//! the guest's policies. Both are `inline(always)` so that the copy the
//! ring-3 task runs lands in the user-accessible code section.

use crate::Pod;

/// Page-replacement policies (`paging:policy=...`).
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// First in, first out: evict the page loaded longest ago.
    Fifo = 0,
    /// Second chance: a hand sweeps the frames, sparing (and clearing) a
    /// page whose hardware Accessed bit is set.
    Clock = 1,
    /// LRU approximated by aging counters: at every fault each resident
    /// page's counter shifts right and takes its A bit as the top bit; the
    /// smallest counter is evicted.
    Lru = 2,
}

impl Policy {
    /// All policies.
    pub const ALL: [Policy; 3] = [Self::Fifo, Self::Clock, Self::Lru];

    /// Decodes a raw policy.
    #[must_use]
    pub fn from_raw(raw: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|p| *p as u64 == raw)
    }

    /// The name used on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Fifo => "fifo",
            Self::Clock => "clock",
            Self::Lru => "lru",
        }
    }
}

/// Access patterns (`paging:pattern=...`).
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Page `i % pages`: a loop over all pages.
    Seq = 0,
    /// Uniformly random pages.
    Random = 1,
    /// 90 % of accesses go to the first 10 % of pages (the hot set).
    HotCold = 2,
}

impl Pattern {
    /// All patterns.
    pub const ALL: [Pattern; 3] = [Self::Seq, Self::Random, Self::HotCold];

    /// Decodes a raw pattern.
    #[must_use]
    pub fn from_raw(raw: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|p| *p as u64 == raw)
    }

    /// The name used on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Seq => "seq",
            Self::Random => "random",
            Self::HotCold => "hotcold",
        }
    }
}

/// SplitMix64's output function (Steele, Lea and Flood, OOPSLA 2014) of
/// `seed` and `i`.
#[inline(always)]
#[must_use]
pub const fn mix(seed: u64, i: u64) -> u64 {
    let z = seed ^ i.wrapping_mul(crate::splitmix::GOLDEN_GAMMA);
    crate::splitmix::finalise(z.wrapping_add(crate::splitmix::GOLDEN_GAMMA))
}

/// The page (`0..pages`) access `i` touches. `pattern` is a raw
/// [`Pattern`]; unknown values behave as [`Pattern::Seq`]. `pages` of 0
/// yields 0.
#[inline(always)]
#[must_use]
pub const fn access(pattern: u64, seed: u64, i: u64, pages: u64) -> u64 {
    if pages == 0 {
        return 0;
    }
    if pattern == Pattern::Random as u64 {
        mix(seed, i) % pages
    } else if pattern == Pattern::HotCold as u64 {
        let r = mix(seed, i);
        // Hot set: the first tenth of the pages (at least one page).
        let hot = if pages / 10 == 0 { 1 } else { pages / 10 };
        // Low bits pick hot or cold (9 in 10), the rest pick the page.
        if r % 10 < 9 || hot == pages { (r >> 8) % hot } else { hot + (r >> 8) % (pages - hot) }
    } else {
        i % pages
    }
}

/// Whether access `i` writes (else it only reads): `write_pct` percent of
/// accesses, drawn independently of the page.
#[inline(always)]
#[must_use]
pub const fn is_write(seed: u64, i: u64, write_pct: u64) -> bool {
    mix(seed ^ 0x5752_4954_4521_2121, i) % 100 < write_pct
}

/// The tag of a page after its `version`-th write, from which each word's
/// value is made ([`word_tag`]; version 0: never written, so zero like
/// fresh memory).
#[inline(always)]
#[must_use]
pub const fn page_tag(page: u64, version: u64) -> u64 {
    if version == 0 { 0 } else { mix(page, version) | 1 }
}

/// The value word `word` (0..512) of a page holds after its `version`-th
/// write: [`page_tag`] with the word index folded in above bit 0, so every
/// word differs and a word from another page, version or offset shows up
/// (version 0: zero, like fresh memory).
#[inline(always)]
#[must_use]
pub const fn word_tag(page: u64, version: u64, word: u64) -> u64 {
    if version == 0 { 0 } else { page_tag(page, version) ^ (word << 1) }
}

/// Swap-device operations ([`SwapRequest::op`]).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapOp {
    /// Copy the 4 KiB frame at `gpa` into swap slot `slot`.
    Write = 1,
    /// Copy swap slot `slot` into the frame at `gpa` (zeros if the slot was
    /// never written).
    Read = 2,
    /// Fill the frame at `gpa` with zeros.
    Zero = 3,
    /// Copy the frame at `slot` (a guest-physical address here) to `gpa`:
    /// the copy-on-write copy, done natively by the VMM.
    Copy = 4,
}

impl SwapOp {
    /// Decodes a raw operation.
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        [Self::Write, Self::Read, Self::Zero, Self::Copy].into_iter().find(|o| *o as u32 == raw)
    }
}

/// [`SwapRequest::status`] after the VMM performed the request.
pub const SWAP_STATUS_OK: u32 = 0;
/// [`SwapRequest::status`] when the request was refused (bad address,
/// slot or operation); the guest treats it as an I/O error.
pub const SWAP_STATUS_ERROR: u32 = 1;
/// What the guest stores in [`SwapRequest::status`] before the port
/// write, so a VMM that did not answer is noticed.
pub const SWAP_STATUS_PENDING: u32 = u32::MAX;

/// One request to the paravirtual swap device: the guest stores it in its
/// memory and writes its guest-physical address to
/// [`crate::ports::SWAP`]; the VMM performs it before the `out`
/// instruction completes and writes `status` back.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwapRequest {
    /// A [`SwapOp`] as `u32`.
    pub op: u32,
    /// Written by the VMM: [`SWAP_STATUS_OK`] or [`SWAP_STATUS_ERROR`].
    pub status: u32,
    /// Guest-physical address of the 4 KiB-aligned frame.
    pub gpa: u64,
    /// Swap slot (or the source frame for [`SwapOp::Copy`]).
    pub slot: u64,
}
// SAFETY: repr(C), integer fields only, 24 bytes with no padding.
unsafe impl Pod for SwapRequest {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_loops_over_every_page() {
        let got: [u64; 7] = core::array::from_fn(|i| access(Pattern::Seq as u64, 1, i as u64, 3));
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn hotcold_sends_nine_in_ten_accesses_to_the_hot_tenth() {
        let pages = 100;
        let n = 20_000;
        let hot = (0..n).filter(|&i| access(Pattern::HotCold as u64, 3, i, pages) < pages / 10).count();
        assert!((17_000..19_000).contains(&hot), "{hot} of {n} hot");
        assert!((0..n).all(|i| access(Pattern::HotCold as u64, 3, i, pages) < pages));
    }

    #[test]
    fn random_covers_the_pages_and_writes_follow_the_ratio() {
        let mut seen = [false; 50];
        for i in 0..2000 {
            seen[access(Pattern::Random as u64, 9, i, 50) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        let writes = (0..10_000).filter(|&i| is_write(9, i, 30)).count();
        assert!((2_700..3_300).contains(&writes));
        assert!((0..100).all(|i| is_write(9, i, 100) && !is_write(9, i, 0)));
    }

    #[test]
    fn tags_are_zero_only_for_unwritten_pages() {
        assert_eq!(page_tag(5, 0), 0);
        assert_ne!(page_tag(5, 1), 0);
        assert_ne!(page_tag(5, 1), page_tag(5, 2));
        assert_ne!(page_tag(5, 1), page_tag(6, 1));
        assert_eq!(word_tag(5, 0, 7), 0);
        assert_eq!(word_tag(5, 1, 0), page_tag(5, 1));
        assert_ne!(word_tag(5, 1, 1), word_tag(5, 1, 2));
        assert!((0..512).all(|w| word_tag(5, 1, w) != 0));
    }

    #[test]
    fn names_and_raw_values_round_trip() {
        for p in Policy::ALL {
            assert_eq!(Policy::from_raw(p as u64), Some(p));
        }
        for p in Pattern::ALL {
            assert_eq!(Pattern::from_raw(p as u64), Some(p));
        }
        assert_eq!(SwapOp::from_raw(4), Some(SwapOp::Copy));
        assert_eq!(SwapOp::from_raw(0), None);
        assert_eq!(size_of::<SwapRequest>(), 24);
    }
}
