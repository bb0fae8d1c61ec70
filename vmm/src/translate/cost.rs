//! How many memory references a translation costs: natively, under a
//! two-dimensional (nested) walk, and under shadow paging. Pure arithmetic.
//!
//! A native 4-level walk reads one entry per level it visits: `n` (4 for a
//! 4 KiB leaf, 3 for 2 MiB, 2 for 1 GiB). Under nested paging (EPT/NPT)
//! every guest-physical address the guest walk produces — each of the `n`
//! table pointers and the final page — must itself be translated by an
//! `m`-level host walk, so the count is `n·(m+1) + m = (n+1)(m+1) − 1`
//! (Bhargava et al., "Accelerating two-dimensional page walks for
//! virtualized systems", ASPLOS 2008: 24 for n = m = 4). With real host
//! page sizes, `m` differs per guest-physical address; [`nested`] sums
//! them exactly, and [`nested_uniform`] is the textbook formula.
//!
//! Under shadow paging the hardware walks one table that maps guest-virtual
//! straight to host-physical; its leaf can be no larger than the smaller of
//! the guest leaf and the host page, so the walk is [`levels_for`] that size.

use serde::Serialize;

/// Levels of a 4-level walk that ends in a leaf of `bytes` (4 KiB: 4,
/// 2 MiB: 3, 1 GiB: 2); anything else counts as 4 KiB.
#[must_use]
pub const fn levels_for(bytes: u64) -> u32 {
    match bytes {
        0x4000_0000 => 2,
        0x20_0000 => 3,
        _ => 4,
    }
}

/// `(n+1)(m+1) − 1`.
#[must_use]
pub const fn nested_uniform(n: u32, m: u32) -> u32 {
    (n + 1) * (m + 1) - 1
}

/// The nested count with a host walk of `host_levels[i]` levels for the
/// i-th guest-physical address touched (the `n` tables, then the page):
/// each table costs its host walk plus the read of the guest entry, and the
/// final page costs its host walk.
#[must_use]
pub fn nested(host_levels: &[u32]) -> u32 {
    match host_levels.split_last() {
        Some((page, tables)) => tables.iter().map(|m| m + 1).sum::<u32>() + page,
        None => 0,
    }
}

/// What a translation costs in memory references, three ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefCounts {
    /// Guest levels walked (`n`).
    pub guest_levels: u32,
    /// Host levels for each guest-physical address touched (tables, then
    /// the page), from the host page size backing it.
    pub host_levels: Vec<u32>,
    /// References if the guest's tables were walked natively: `n`.
    pub native: u32,
    /// References of a 2D walk with the actual host levels.
    pub nested: u32,
    /// `(n+1)(m+1) − 1` with `m` the host levels of the final page.
    pub nested_formula: u32,
    /// References of the shadow table's walk.
    pub shadow: u32,
}

/// The counts for a guest walk of `host_levels.len() - 1` levels ending in
/// a `guest_leaf`-byte page whose host page is `host_page` bytes.
#[must_use]
pub fn counts(host_levels: &[u32], guest_leaf: u64, host_page: u64) -> RefCounts {
    let n = u32::try_from(host_levels.len().saturating_sub(1)).unwrap_or(u32::MAX);
    let m = host_levels.last().copied().unwrap_or(4);
    RefCounts {
        guest_levels: n,
        host_levels: host_levels.to_vec(),
        native: n,
        nested: nested(host_levels),
        nested_formula: nested_uniform(n, m),
        shadow: levels_for(guest_leaf.min(host_page)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_textbook_case_is_24_references() {
        assert_eq!(nested_uniform(4, 4), 24);
        assert_eq!(nested(&[4, 4, 4, 4, 4]), 24);
    }

    #[test]
    fn large_pages_shorten_both_dimensions() {
        // 2 MiB guest leaf (3 levels), 2 MiB host pages (3 levels).
        assert_eq!(nested_uniform(3, 3), 15);
        assert_eq!(nested(&[3, 3, 3, 3]), 15);
        // Tables on 4 KiB host pages, the data page on a 2 MiB one.
        assert_eq!(nested(&[4, 4, 4, 3]), 5 + 5 + 5 + 3);
        let c = counts(&[4, 4, 4, 3], 0x20_0000, 0x20_0000);
        assert_eq!((c.native, c.nested, c.nested_formula, c.shadow), (3, 18, 15, 3));
    }

    #[test]
    fn shadow_leaf_is_the_smaller_page() {
        assert_eq!(counts(&[4; 5], 0x1000, 0x20_0000).shadow, 4);
        assert_eq!(counts(&[3; 4], 0x20_0000, 0x1000).shadow, 4);
        assert_eq!(counts(&[2; 3], 0x4000_0000, 0x4000_0000).shadow, 2);
        assert_eq!(levels_for(12345), 4);
        assert_eq!(nested(&[]), 0);
    }
}
