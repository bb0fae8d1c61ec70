//! Which guest pages are in the balloon, and which host pages that frees.
//!
//! Pure bookkeeping, no system calls: pages are 4 KiB units of *RAM
//! offset* (guest RAM regions concatenated in guest-physical order, the
//! offset the host mappings use). A host page of `host_page` bytes (4 KiB
//! for anonymous and memfd backings, 2 MiB or 1 GiB for huge-page ones) is
//! released only when every 4 KiB piece of it is in the balloon; until
//! then its pieces are *pending*. Taking a piece out of a released host page
//! makes the whole host page resident again on the guest's next touch, so
//! the host page counts as not released from then on.

/// 4 KiB: the balloon's page (virtio 1.2 §5.5.6: PFNs are 4 KiB frames).
pub const PAGE: u64 = 4096;

/// Why a page was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageReject {
    /// Beyond guest RAM.
    OutOfRange,
    /// Inflate of a page already in the balloon.
    Duplicate,
    /// Deflate of a page not in the balloon.
    NotInBalloon,
}

/// What inflating one page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inflated {
    /// The page completed its host page: release host page `n` (index in
    /// units of the host page size).
    Release(u64),
    /// The host page is still partly outside the balloon.
    Pending,
}

/// What inflating a run of pages did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOutcome {
    /// Pages that entered the balloon.
    pub accepted: u64,
    /// Of those, pages whose host page is still partly outside the balloon
    /// after them (as [`Inflated::Pending`]).
    pub pending: u64,
    /// Pages already in the balloon (refused, as [`PageReject::Duplicate`]).
    pub duplicates: u64,
}

/// The balloon's page set.
#[derive(Debug, Clone)]
pub struct BalloonPages {
    /// One bit per 4 KiB page of RAM.
    bits: Vec<u64>,
    /// Pieces in the balloon per host page (empty when host pages are 4 KiB).
    counts: Vec<u32>,
    ram_pages: u64,
    pieces_per_host_page: u64,
    /// Pages in the balloon.
    in_balloon: u64,
    /// Host pages released (all pieces in the balloon).
    released_host_pages: u64,
}

impl BalloonPages {
    /// An empty balloon over `ram_bytes` of RAM backed by `host_page`-byte
    /// pages (a power of two, at least 4 KiB).
    #[must_use]
    pub fn new(ram_bytes: u64, host_page: u64) -> Self {
        let pages = ram_bytes / PAGE;
        let per = (host_page / PAGE).max(1);
        let counts = if per > 1 { vec![0; pages.div_ceil(per) as usize] } else { Vec::new() };
        BalloonPages { bits: vec![0; pages.div_ceil(64) as usize], counts, ram_pages: pages, pieces_per_host_page: per, in_balloon: 0, released_host_pages: 0 }
    }

    /// Whether page `p` is in the balloon.
    #[must_use]
    pub fn contains(&self, p: u64) -> bool {
        p < self.ram_pages && self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Puts page `p` into the balloon.
    ///
    /// # Errors
    /// [`PageReject::OutOfRange`] or [`PageReject::Duplicate`]; nothing changes.
    pub fn inflate(&mut self, p: u64) -> Result<Inflated, PageReject> {
        if p >= self.ram_pages {
            return Err(PageReject::OutOfRange);
        }
        if self.contains(p) {
            return Err(PageReject::Duplicate);
        }
        self.bits[(p / 64) as usize] |= 1 << (p % 64);
        self.in_balloon += 1;
        let host = p / self.pieces_per_host_page;
        if self.counts.is_empty() {
            self.released_host_pages += 1;
            return Ok(Inflated::Release(host));
        }
        let c = &mut self.counts[host as usize];
        *c += 1;
        // The last host page may be cut short by the end of RAM: it is
        // complete when every piece that exists is in.
        let existing = self.pieces_per_host_page.min(self.ram_pages - host * self.pieces_per_host_page);
        if u64::from(*c) == existing {
            self.released_host_pages += 1;
            Ok(Inflated::Release(host))
        } else {
            Ok(Inflated::Pending)
        }
    }

    /// Takes page `p` out of the balloon.
    ///
    /// # Errors
    /// [`PageReject::OutOfRange`] or [`PageReject::NotInBalloon`].
    pub fn deflate(&mut self, p: u64) -> Result<(), PageReject> {
        if p >= self.ram_pages {
            return Err(PageReject::OutOfRange);
        }
        if !self.contains(p) {
            return Err(PageReject::NotInBalloon);
        }
        self.bits[(p / 64) as usize] &= !(1 << (p % 64));
        self.in_balloon -= 1;
        let host = p / self.pieces_per_host_page;
        if self.counts.is_empty() {
            self.released_host_pages -= 1;
            return Ok(());
        }
        let existing = self.pieces_per_host_page.min(self.ram_pages - host * self.pieces_per_host_page);
        let c = &mut self.counts[host as usize];
        if u64::from(*c) == existing {
            self.released_host_pages -= 1;
        }
        *c -= 1;
        Ok(())
    }

    /// Puts the run of pages `[first, first + count)` into the balloon, a
    /// bitmap word and a host page at a time; the same outcome as
    /// [`Self::inflate`] on each page in order. `release` is called with
    /// `(first host page, count)` for host pages the run completed, in
    /// ascending order.
    ///
    /// # Errors
    /// [`PageReject::OutOfRange`] when the run ends beyond RAM; nothing changes.
    pub fn inflate_run(&mut self, first: u64, count: u64, mut release: impl FnMut(u64, u64)) -> Result<RunOutcome, PageReject> {
        let end = first.checked_add(count).filter(|&e| e <= self.ram_pages).ok_or(PageReject::OutOfRange)?;
        let mut out = RunOutcome::default();
        let per = self.pieces_per_host_page;
        let mut p = first;
        while p < end {
            // One segment: inside one bitmap word and one host page.
            let seg_end = end.min((p / 64 + 1) * 64).min(self.host_page_end(p));
            let (w, shift, n) = ((p / 64) as usize, p % 64, seg_end - p);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << shift };
            let fresh = mask & !self.bits[w];
            self.bits[w] |= mask;
            let added = u64::from(fresh.count_ones());
            out.duplicates += n - added;
            out.accepted += added;
            self.in_balloon += added;
            if self.counts.is_empty() {
                // 4 KiB host pages: every fresh page is released, in runs
                // of consecutive fresh bits.
                let mut bits = fresh;
                while bits != 0 {
                    let lo = u64::from(bits.trailing_zeros());
                    let len = u64::from((bits >> lo).trailing_ones());
                    release(w as u64 * 64 + lo, len);
                    self.released_host_pages += len;
                    bits &= if lo + len == 64 { 0 } else { !0u64 << (lo + len) };
                }
            } else if added > 0 {
                let host = p / per;
                let existing = per.min(self.ram_pages - host * per);
                let c = &mut self.counts[host as usize];
                *c += added as u32;
                if u64::from(*c) == existing {
                    self.released_host_pages += 1;
                    out.pending += added - 1;
                    release(host, 1);
                } else {
                    out.pending += added;
                }
            }
            p = seg_end;
        }
        Ok(out)
    }

    /// Takes the run `[first, first + count)` out of the balloon, as
    /// [`Self::deflate`] on each page; returns how many were in it (the
    /// rest are counted as not in the balloon by the caller).
    ///
    /// # Errors
    /// [`PageReject::OutOfRange`] when the run ends beyond RAM; nothing changes.
    pub fn deflate_run(&mut self, first: u64, count: u64) -> Result<u64, PageReject> {
        let end = first.checked_add(count).filter(|&e| e <= self.ram_pages).ok_or(PageReject::OutOfRange)?;
        let per = self.pieces_per_host_page;
        let mut taken = 0;
        let mut p = first;
        while p < end {
            let seg_end = end.min((p / 64 + 1) * 64).min(self.host_page_end(p));
            let (w, shift, n) = ((p / 64) as usize, p % 64, seg_end - p);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << shift };
            let held = mask & self.bits[w];
            self.bits[w] &= !mask;
            let removed = u64::from(held.count_ones());
            taken += removed;
            self.in_balloon -= removed;
            if self.counts.is_empty() {
                self.released_host_pages -= removed;
            } else if removed > 0 {
                let host = p / per;
                let existing = per.min(self.ram_pages - host * per);
                let c = &mut self.counts[host as usize];
                if u64::from(*c) == existing {
                    self.released_host_pages -= 1;
                }
                *c -= removed as u32;
            }
            p = seg_end;
        }
        Ok(taken)
    }

    /// The first page past page `p`'s host page; with 4 KiB host pages
    /// (no per-host-page counts) segments need not stop at each page.
    fn host_page_end(&self, p: u64) -> u64 {
        if self.counts.is_empty() { u64::MAX } else { (p / self.pieces_per_host_page + 1) * self.pieces_per_host_page }
    }

    /// Pages in the balloon.
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.in_balloon
    }

    /// Pages in the balloon whose host page is released.
    #[must_use]
    pub fn released_pages(&self) -> u64 {
        // The short last host page counts its existing pieces only; it is
        // at most one host page, so bound by what is in the balloon.
        (self.released_host_pages * self.pieces_per_host_page).min(self.in_balloon)
    }

    /// Pages in the balloon still waiting for the rest of their host page.
    #[must_use]
    pub fn pending_pages(&self) -> u64 {
        self.in_balloon - self.released_pages()
    }

    /// 4 KiB pages per host page.
    #[must_use]
    pub fn pieces_per_host_page(&self) -> u64 {
        self.pieces_per_host_page
    }

    /// Pages of RAM this set covers.
    #[must_use]
    pub fn ram_pages(&self) -> u64 {
        self.ram_pages
    }

    /// The pages in the balloon as ascending, disjoint, non-adjacent runs
    /// `(first page, count)`: what a snapshot saves. Whole zero and
    /// all-ones words are skipped or taken at once, so a balloon of large
    /// blocks costs one step per 64 pages.
    #[must_use]
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut add = |first: u64, count: u64| match out.last_mut() {
            Some((f, c)) if *f + *c == first => *c += count,
            _ => out.push((first, count)),
        };
        for (w, &word) in self.bits.iter().enumerate() {
            let base = w as u64 * 64;
            if word == u64::MAX {
                add(base, 64);
                continue;
            }
            let mut bits = word;
            while bits != 0 {
                let lo = u64::from(bits.trailing_zeros());
                let len = u64::from((bits >> lo).trailing_ones());
                add(base + lo, len);
                bits &= if lo + len == 64 { 0 } else { !0u64 << (lo + len) };
            }
        }
        out
    }

    /// The host pages whose every piece is in the balloon (the released
    /// ones), as ascending runs `(first host page, count)` in host-page
    /// units: what a snapshot need not save and a restore releases again.
    #[must_use]
    pub fn released_host_runs(&self) -> Vec<(u64, u64)> {
        if self.counts.is_empty() {
            return self.runs();
        }
        let per = self.pieces_per_host_page;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (host, &c) in self.counts.iter().enumerate() {
            let host = host as u64;
            let existing = per.min(self.ram_pages - host * per);
            if c == 0 || u64::from(c) != existing {
                continue;
            }
            match out.last_mut() {
                Some((f, n)) if *f + *n == host => *n += 1,
                _ => out.push((host, 1)),
            }
        }
        out
    }
}

/// Sorts `(first, count)` runs and merges neighbours and overlaps, so
/// each merged run is one system call.
#[must_use]
pub fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    // PFN arrays usually come in ascending runs: skip the sort then.
    if !runs.is_sorted() {
        runs.sort_unstable();
    }
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (u, n) in runs {
        match out.last_mut() {
            Some((first, count)) if u <= *first + *count => *count = (*count).max(u + n - *first),
            _ => out.push((u, n)),
        }
    }
    out
}

/// Calls `f(first, count)` for each run of consecutive values in `pfns`,
/// in order. An array that is one run (what our driver sends) is found by
/// one branch-free pass the compiler vectorises; any other is scanned value
/// by value. Every value is looked at either way.
pub fn pfn_runs(pfns: &[u32], mut f: impl FnMut(u32, u32)) {
    let Some(&first) = pfns.first() else { return };
    let Ok(len) = u32::try_from(pfns.len()) else { return };
    if first.checked_add(len - 1).is_some() {
        let off = pfns.iter().enumerate().fold(0u32, |acc, (i, &p)| acc | (p ^ first.wrapping_add(i as u32)));
        if off == 0 {
            f(first, len);
            return;
        }
    }
    let (mut first, mut count) = (first, 1u32);
    for &pfn in &pfns[1..] {
        if first.checked_add(count) == Some(pfn) {
            count += 1;
        } else {
            f(first, count);
            (first, count) = (pfn, 1);
        }
    }
    f(first, count);
}

/// The whole `align`-sized units inside `[start, start + len)`, as
/// `(first unit, count)`; `None` when none fits.
#[must_use]
pub fn inner_units(start: u64, len: u64, align: u64) -> Option<(u64, u64)> {
    let first = start.div_ceil(align);
    let end = start.checked_add(len)? / align;
    (end > first).then(|| (first, end - first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_k_host_pages_release_at_once() {
        let mut b = BalloonPages::new(1 << 20, PAGE);
        assert_eq!(b.inflate(3), Ok(Inflated::Release(3)));
        assert_eq!(b.inflate(3), Err(PageReject::Duplicate));
        assert_eq!(b.inflate(256), Err(PageReject::OutOfRange));
        assert_eq!((b.pages(), b.pending_pages()), (1, 0));
        assert_eq!(b.deflate(3), Ok(()));
        assert_eq!(b.deflate(3), Err(PageReject::NotInBalloon));
        assert_eq!(b.released_pages(), 0);
    }

    #[test]
    fn huge_host_page_is_released_only_when_complete() {
        let mut b = BalloonPages::new(8 << 20, 2 << 20);
        for p in 512..1023 {
            assert_eq!(b.inflate(p), Ok(Inflated::Pending));
        }
        assert_eq!(b.pending_pages(), 511);
        assert_eq!(b.inflate(1023), Ok(Inflated::Release(1)));
        assert_eq!((b.pending_pages(), b.released_pages()), (0, 512));
        // One piece out: the host page will be faulted back, the rest pend.
        b.deflate(600).unwrap();
        assert_eq!((b.pending_pages(), b.released_pages()), (511, 0));
        assert_eq!(b.inflate(600), Ok(Inflated::Release(1)));
    }

    #[test]
    fn a_short_last_host_page_completes_with_its_existing_pieces() {
        // 3 MiB of RAM over 2 MiB host pages: the second has 256 pieces.
        let mut b = BalloonPages::new(3 << 20, 2 << 20);
        for p in 512..767 {
            assert_eq!(b.inflate(p), Ok(Inflated::Pending));
        }
        assert_eq!(b.inflate(767), Ok(Inflated::Release(1)));
        assert_eq!(b.released_pages(), 256);
    }

    #[test]
    fn runs_and_released_host_runs_describe_the_set() {
        let mut b = BalloonPages::new(8 << 20, 2 << 20);
        // One whole host page (512..1024), 3 pieces of another, and two
        // neighbouring runs across a bitmap word that come out as one.
        b.inflate_run(512, 512, |_, _| {}).unwrap();
        b.inflate_run(1030, 3, |_, _| {}).unwrap();
        b.inflate_run(1100, 28, |_, _| {}).unwrap();
        b.inflate_run(1128, 40, |_, _| {}).unwrap();
        assert_eq!(b.runs(), [(512, 512), (1030, 3), (1100, 68)]);
        assert_eq!(b.released_host_runs(), [(1, 1)]);
        // 4 KiB host pages: every page is released.
        let mut small = BalloonPages::new(1 << 20, PAGE);
        small.inflate_run(0, 64, |_, _| {}).unwrap();
        small.inflate_run(64, 1, |_, _| {}).unwrap();
        small.inflate_run(255, 1, |_, _| {}).unwrap();
        assert_eq!(small.runs(), [(0, 65), (255, 1)]);
        assert_eq!(small.released_host_runs(), small.runs());
    }

    /// Run-wise and page-wise inflate and deflate agree on every outcome.
    #[test]
    fn runs_behave_like_their_pages_one_by_one() {
        for host_page in [PAGE, 64 * PAGE, 2 << 20] {
            let (mut by_run, mut by_page) = (BalloonPages::new(9 << 20, host_page), BalloonPages::new(9 << 20, host_page));
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for round in 0..400 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let first = x % 1600;
                let count = 1 + (x >> 20) % 700;
                let (mut run_rel, mut page_rel) = (Vec::new(), Vec::new());
                if round % 3 != 2 {
                    let o = by_run.inflate_run(first, count, |h, n| run_rel.push((h, n))).unwrap();
                    let mut expect = RunOutcome::default();
                    for p in first..first + count {
                        match by_page.inflate(p) {
                            Ok(Inflated::Release(h)) => {
                                expect.accepted += 1;
                                page_rel.push((h, 1));
                            }
                            Ok(Inflated::Pending) => {
                                expect.accepted += 1;
                                expect.pending += 1;
                            }
                            Err(_) => expect.duplicates += 1,
                        }
                    }
                    assert_eq!(o, expect, "host page {host_page}, run {first}+{count}");
                    assert_eq!(merge_runs(run_rel), merge_runs(page_rel));
                } else {
                    let taken = by_run.deflate_run(first, count).unwrap();
                    let expect = (first..first + count).filter(|&p| by_page.deflate(p).is_ok()).count() as u64;
                    assert_eq!(taken, expect);
                }
                assert_eq!((by_run.pages(), by_run.released_pages(), by_run.pending_pages()), (by_page.pages(), by_page.released_pages(), by_page.pending_pages()));
                assert_eq!((&by_run.bits, &by_run.counts), (&by_page.bits, &by_page.counts));
            }
        }
        let mut b = BalloonPages::new(1 << 20, PAGE);
        assert_eq!(b.inflate_run(250, 7, |_, _| {}), Err(PageReject::OutOfRange));
        assert_eq!(b.inflate_run(u64::MAX, 2, |_, _| {}), Err(PageReject::OutOfRange));
        assert_eq!(b.pages(), 0, "a refused run changes nothing");
    }

    #[test]
    fn runs_merge_neighbours_and_drop_duplicates() {
        let one = |v: &[u64]| v.iter().map(|&u| (u, 1)).collect::<Vec<_>>();
        assert_eq!(merge_runs(one(&[5, 1, 2, 3, 9, 2, 10])), vec![(1, 3), (5, 1), (9, 2)]);
        assert_eq!(merge_runs(vec![(8, 4), (0, 8), (10, 1)]), vec![(0, 12)]);
        assert!(merge_runs(Vec::new()).is_empty());
    }

    #[test]
    fn pfn_runs_split_where_values_stop_being_consecutive() {
        let runs = |v: &[u32]| {
            let mut out = Vec::new();
            pfn_runs(v, |a, n| out.push((a, n)));
            out
        };
        let long: Vec<u32> = (100..5000).collect();
        assert_eq!(runs(&long), vec![(100, 4900)]);
        let mut broken = long.clone();
        broken[3000] = 7;
        assert_eq!(runs(&broken), vec![(100, 3000), (7, 1), (3101, 1899)]);
        assert_eq!(runs(&[u32::MAX - 1, u32::MAX, 0, 1]), vec![(u32::MAX - 1, 2), (0, 2)], "no run wraps around");
        assert_eq!(runs(&[5, 5, 6]), vec![(5, 1), (5, 2)]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn inner_units_round_inwards() {
        let m2 = 2 << 20;
        assert_eq!(inner_units(0, 4 << 20, m2), Some((0, 2)));
        assert_eq!(inner_units(4096, 4 << 20, m2), Some((1, 1)));
        assert_eq!(inner_units(4096, m2, m2), None);
        assert_eq!(inner_units(u64::MAX - 10, 100, m2), None);
    }
}
