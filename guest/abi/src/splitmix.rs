//! SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
//! generators", OOPSLA 2014), once for every generator the guest and the
//! VMM must agree on: the dirty workload's pages, the paging workload's
//! accesses, the versioned page contents and the translation benchmark's
//! chains all derive their numbers from [`finalise`].

/// 2^64 / φ, rounded to odd: SplitMix64's increment ("golden gamma").
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function: a cheap bijective mix of `z`.
#[inline(always)]
#[must_use]
pub const fn finalise(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator's next value: advances `state` by [`GOLDEN_GAMMA`] and
/// mixes it.
#[inline(always)]
pub const fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN_GAMMA);
    finalise(*state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // The first outputs of SplitMix64 seeded with 0, from the paper's
        // reference implementation.
        let mut s = 0;
        assert_eq!(next(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(next(&mut s), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(next(&mut s), 0x06c4_5d18_8009_454f);
    }
}
