//! Telling all-zero 4 KiB pages of guest memory apart.
//!
//! A guest that touched its memory and zeroed it again (every guest that
//! returns freed memory to its allocator zeroed: memvisor's own self-test
//! does) holds pages that are resident on the host but carry nothing.
//! Full snapshots leave them as holes and migration sends them as a
//! marker, so both need a cheap test. Pure functions over byte slices; the
//! callers hand in memory they read while the vCPU is stopped, or a copy.

/// The page size these functions work in (the guest's smallest page).
pub const PAGE: u64 = 4096;

/// What a page is compared with. Comparing slices of bytes calls the C
/// library's `bcmp` (vectorised, stops at the first difference) in every
/// build profile: in an unoptimised test build a hand-written loop over
/// words moved a migration's pages at ~6 MB/s, `bcmp` at memory speed.
static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];

/// Whether every byte of `bytes` is zero.
#[must_use]
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Appends to `out` the runs `(offset, length)` of the pages of `bytes`
/// that are not all zero, where `bytes` starts at `offset` (both page
/// multiples; a partial last page counts as a page). Adjacent pages merge
/// into one run, also with the last run already in `out`.
pub fn data_runs(bytes: &[u8], offset: u64, out: &mut Vec<(u64, u64)>) {
    for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
        if is_zero(page) {
            continue;
        }
        let at = offset + i as u64 * PAGE;
        let len = page.len() as u64;
        match out.last_mut() {
            Some(last) if last.0 + last.1 == at => last.1 += len,
            _ => out.push((at, len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_set_bit_anywhere_makes_a_page_data() {
        let mut page = vec![0u8; PAGE as usize];
        assert!(is_zero(&page));
        for at in [0, 7, 63, 64, 2048, 4095] {
            page[at] = 0x10;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 1]), "a tail shorter than a block is checked too");
    }

    #[test]
    fn data_runs_skip_zero_pages_and_merge_neighbours() {
        let p = PAGE as usize;
        let mut mem = vec![0u8; 8 * p];
        for page in [1, 2, 3, 6] {
            mem[page * p + 100] = 1;
        }
        let mut out = vec![(0, PAGE)];
        data_runs(&mem, 10 * PAGE, &mut out);
        assert_eq!(out, [(0, PAGE), (11 * PAGE, 3 * PAGE), (16 * PAGE, PAGE)]);
        // A run continuing the previous one merges with it.
        let mut out = vec![(0, 10 * PAGE)];
        data_runs(&mem[p..2 * p], 10 * PAGE, &mut out);
        assert_eq!(out, [(0, 11 * PAGE)]);
        let mut out = Vec::new();
        data_runs(&vec![0u8; 4 * p], 0, &mut out);
        assert!(out.is_empty());
    }
}
