//! Where one memslot's dirty-ring entries wait between two harvests.
//!
//! A ring entry names one page; a harvest must hand over every page named
//! since the previous harvest, exactly once, as ascending page ranges. The
//! cheapest way to hold them depends on how they arrive, so a slot's record
//! moves through three forms, each entry going to exactly one of them:
//!
//! 1. **Runs**: while entries ascend (a guest writing memory in address
//!    order fills the ring that way), they are appended to a list of page
//!    runs, and the harvest hands that list over as it is.
//! 2. **Keys**: after the first entry out of order, the following ones go,
//!    as page offsets, into buckets by their top bits ([`key_buckets`]; a
//!    short ascending prefix moves there too); the harvest sorts each
//!    bucket's few offsets and builds the ranges in the same pass, joined
//!    with the runs collected before. For a few hundred entries scattered
//!    over a large slot this costs less than the bitmap: each bit set there
//!    is a cache miss in a bitmap the guest has evicted, and the harvest
//!    then scans the whole bitmap (32 KiB per GiB of slot), where the
//!    buckets are 4 KiB written and read once.
//! 3. **Bitmap**: past [`MAX_KEYS`] keys (or [`MAX_RUNS`] runs), or when a
//!    bucket is full (more than 16 offsets in one sixty-fourth of the slot:
//!    bunched entries, which share the bitmap's cache lines), everything
//!    moves into the slot's bitmap, whose cost no longer grows with the
//!    number of entries.
//!
//! The module does not own the bitmap (the tracker's other modes use the
//! same buffer for KVM's log) and never reads a ring: the tracker routes
//! each checked entry here.

use crate::dirty::key_buckets::KeyBuckets;
use crate::dirty::ring::RingEntry;
use crate::dirty::ranges::{self, PageRange};

/// Most runs a slot keeps as a list between two harvests: one full ring's
/// worth (KVM api.rst, KVM_CAP_DIRTY_LOG_RING: 64 Ki 16-byte entries fill
/// the 1 MiB ring memvisor asks for per vCPU), at most 1 MiB of runs.
pub const MAX_RUNS: usize = 65_536;

/// Most out-of-order entries a slot keeps as keys before the bitmap takes
/// over. Chosen by measurement (`vmm bench dirty --kernels`, release build,
/// reference host, 1 GiB slot; medians). First with the sorted key list
/// the buckets replaced (load ~5):
///
/// | entries | bitmap, hot | keys, hot | bitmap, caches evicted | keys, evicted |
/// |---|---|---|---|---|
/// | 262 | 3.8 µs | 3.5 µs | 16.2 µs | 8.8 µs |
/// | 512 | 6.2 µs | 6.6 µs | 16.5 µs | 12.6 µs |
/// | 1,024 | 10.4 µs | 15.2 µs | 34.0 µs | 24.3 µs |
/// | 2,621 | 26.4 µs | 40.7 µs | 44.8 µs | 54.1 µs |
///
/// and with the buckets (two runs at load ~1): 262 entries 4.4 / 3.1 µs
/// hot, 15–17 / 7.3–8.0 µs evicted; 512 entries 4.8–5.5 / 4.4–4.8 hot,
/// 15–17 / 9.9–11.5 evicted (past 512 both columns are the bitmap). A
/// harvest follows a guest run, so its caches are closer to evicted than
/// hot (the test evicts them harder than a guest does: a 32 MiB walk); 512
/// is where the key list stopped winning with hot caches, and the buckets
/// still win there.
pub const MAX_KEYS: usize = 512;

/// Run pages moved into the keys at most, at the first entry out of order
/// (see [`RingPages::runs_to_keys`]): a few cache lines of keys. The keys
/// hold them and the entry that moved them without spilling, unless they
/// bunch into one bucket, in which case they stay runs.
const MOVE_AT_MOST: u64 = 64;
const _: () = assert!(MOVE_AT_MOST < MAX_KEYS as u64);

/// Runs prefetched at most before a harvest ([`RingPages::prefetch_for_write`]):
/// 4 KiB, what a few hundred pages fill. Larger harvests spread the misses
/// the prefetch hides over more entries.
const PREFETCH_RUNS: usize = 256;

/// Which form holds the entries (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Form {
    #[default]
    Runs,
    Keys,
    Bitmap,
}

/// One slot's ring entries since the last harvest.
///
/// Invariants between calls: in `Runs`, `keys` is empty and the bitmap is
/// all zero; in `Keys`, the bitmap is all zero, `runs` holds the entries
/// before the first one out of order (unless they moved into `keys`) and
/// `keys` (at most [`MAX_KEYS`]) the rest; in `Bitmap`, `runs` and `keys`
/// are empty and the bitmap holds every entry.
#[derive(Debug, Default)]
pub struct RingPages {
    form: Form,
    /// Ascending, disjoint, non-adjacent guest page runs.
    runs: Vec<PageRange>,
    /// Page offsets inside the slot, bucketed (repeats allowed).
    keys: KeyBuckets,
    /// Reused buffer: the keys' ranges, before they are joined with `runs`.
    key_ranges: Vec<PageRange>,
}

impl RingPages {
    /// Records the entry for page `offset` of a slot whose first page is
    /// `first_pfn` and whose bitmap is `bitmap` (the caller has checked
    /// that `offset` lies inside the slot).
    ///
    /// The one-entry path: [`note_all`](Self::note_all) takes the common
    /// steps in its own loops and comes here for the entry at which the
    /// form changes; changes of form are out of line.
    fn note(&mut self, offset: u64, first_pfn: u64, bitmap: &mut [u64]) {
        match self.form {
            Form::Runs => {
                let pfn = first_pfn + offset;
                let len = self.runs.len();
                match self.runs.last_mut() {
                    Some(last) if last.end() == pfn => last.count += 1,
                    // A page before the last run's end: out of order (or
                    // seen twice, from two vCPUs' rings).
                    Some(last) if last.end() > pfn => self.start_keys(offset, first_pfn, bitmap),
                    _ if len < MAX_RUNS => self.runs.push(PageRange { first: pfn, count: 1 }),
                    _ => self.spill(offset, first_pfn, bitmap),
                }
            }
            Form::Keys => {
                if self.keys.len() >= MAX_KEYS || !self.keys.push(offset) {
                    self.spill(offset, first_pfn, bitmap);
                }
            }
            Form::Bitmap => set_bit(bitmap, offset),
        }
    }

    /// Records `batch`, entries of this slot that all lie inside it (the
    /// caller checked), exactly as [`note`](Self::note) would one by one,
    /// but with the common forms in loops of their own: an ascending
    /// stretch extends the run list with the open run held in registers,
    /// and keys go straight into their buckets, so an entry costs a few
    /// instructions instead of a trip through the form's dispatch.
    pub fn note_all(&mut self, batch: &[RingEntry], first_pfn: u64, bitmap: &mut [u64]) {
        let mut rest = batch;
        while let Some(e) = rest.first() {
            let taken = match self.form {
                Form::Runs => self.append_ascending(rest, first_pfn),
                Form::Keys => {
                    let keys = &mut self.keys;
                    rest.iter().take_while(|x| keys.len() < MAX_KEYS && keys.push(x.offset)).count()
                }
                Form::Bitmap => {
                    for x in rest {
                        set_bit(bitmap, x.offset);
                    }
                    rest.len()
                }
            };
            if taken == 0 {
                // The form changes at this entry (out of order, or a list
                // is full): the one-entry path handles that.
                self.note(e.offset, first_pfn, bitmap);
                rest = &rest[1..];
            } else {
                rest = &rest[taken..];
            }
        }
    }

    /// In the runs form: appends the ascending prefix of `batch` to the run
    /// list as [`note`](Self::note) would, and returns how many entries it
    /// took; it stops before an entry out of order and before the list
    /// would pass [`MAX_RUNS`], leaving that entry to `note`.
    fn append_ascending(&mut self, batch: &[RingEntry], first_pfn: u64) -> usize {
        // The last run stays open outside the list while the loop runs and
        // goes back at the end; the list holds only closed runs meanwhile.
        let mut open = self.runs.pop();
        let mut taken = 0;
        for e in batch {
            let pfn = first_pfn + e.offset;
            match open.as_mut() {
                Some(r) if r.end() == pfn => r.count += 1,
                // Before the open run's end: out of order (or a repeat).
                Some(r) if r.end() > pfn => break,
                Some(r) => {
                    // Closing `r` and opening a new run makes len + 2 runs.
                    if self.runs.len() + 2 > MAX_RUNS {
                        break;
                    }
                    self.runs.push(*r);
                    *r = PageRange { first: pfn, count: 1 };
                }
                None => open = Some(PageRange { first: pfn, count: 1 }),
            }
            taken += 1;
        }
        if let Some(r) = open {
            self.runs.push(r);
        }
        taken
    }

    /// Before the ring entries are routed here: prefetches, for writing,
    /// the start of the run list and the key buckets, which the guest's
    /// run has evicted ([`prefetch`](crate::dirty::prefetch)).
    pub fn prefetch_for_write(&self) {
        let runs = self.runs.capacity().min(PREFETCH_RUNS) * std::mem::size_of::<PageRange>();
        crate::dirty::prefetch::for_write(self.runs.as_ptr().cast(), runs);
        self.keys.prefetch_for_write();
    }

    /// From runs to keys, at the first entry out of order (`offset`).
    #[cold]
    #[inline(never)]
    fn start_keys(&mut self, offset: u64, first_pfn: u64, bitmap: &mut [u64]) {
        // The bitmap covers the slot's pages: every offset lies below its
        // size, which sizes the buckets.
        let bound = bitmap.len() as u64 * 64;
        if !KeyBuckets::fits(bound) {
            self.spill(offset, first_pfn, bitmap);
            return;
        }
        self.keys.reset_for(bound);
        self.form = Form::Keys;
        self.runs_to_keys(first_pfn);
        if !self.keys.push(offset) {
            self.spill(offset, first_pfn, bitmap);
        }
    }

    /// At the first entry out of order: when the runs so far hold only a
    /// few pages (the usual case for scattered writes, whose first entries
    /// ascend only by chance), their pages become keys too, so the harvest
    /// builds ranges from the keys alone instead of also joining them with
    /// the runs (one more pass over every range). Longer runs, and runs
    /// whose pages bunch into one bucket, stay as they are and are joined.
    fn runs_to_keys(&mut self, first_pfn: u64) {
        if self.runs.len() as u64 > MOVE_AT_MOST || ranges::pages_in(&self.runs) > MOVE_AT_MOST {
            return;
        }
        let keys = &mut self.keys;
        if self.runs.iter().flat_map(|r| r.first - first_pfn..r.end() - first_pfn).all(|o| keys.push(o)) {
            self.runs.clear();
        } else {
            // A bucket filled up: the pages stay runs, and only runs.
            keys.clear();
        }
    }

    /// Moves the runs, the keys and the entry for `offset` into `bitmap`;
    /// from now on it holds them all.
    #[cold]
    #[inline(never)]
    fn spill(&mut self, offset: u64, first_pfn: u64, bitmap: &mut [u64]) {
        ranges::set_ranges(bitmap, first_pfn, &self.runs);
        for k in self.keys.iter() {
            set_bit(bitmap, k);
        }
        set_bit(bitmap, offset);
        self.runs.clear();
        self.keys.clear();
        self.form = Form::Bitmap;
    }

    /// At a harvest: appends the pages recorded since the last one to `out`
    /// as ascending ranges and starts over empty, leaving `bitmap` all
    /// zero. With `overflowed` the caller has set every page of the slot in
    /// `bitmap` (a ring overflowed, so entries may be lost) and the bitmap
    /// is reported whatever the form.
    pub fn take(&mut self, out: &mut Vec<PageRange>, overflowed: bool, first_pfn: u64, bitmap: &mut [u64]) {
        let form = if overflowed { Form::Bitmap } else { self.form };
        match form {
            Form::Runs => {
                if out.is_empty() {
                    // The first slot's runs become the output as they are;
                    // the output's old (empty) buffer comes back here.
                    std::mem::swap(out, &mut self.runs);
                } else {
                    out.extend_from_slice(&self.runs);
                }
            }
            Form::Keys => {
                if self.runs.is_empty() {
                    self.keys.take_ranges_into(first_pfn, out);
                } else {
                    self.key_ranges.clear();
                    self.keys.take_ranges_into(first_pfn, &mut self.key_ranges);
                    ranges::union_into(&self.runs, &self.key_ranges, out);
                }
            }
            Form::Bitmap => {
                let start = out.len();
                ranges::bitmap_to_ranges_into(bitmap, first_pfn, out);
                // Every set bit is in one of these ranges: zeroing their
                // words empties the bitmap at a cost that follows the pages
                // found, not the slot's size.
                ranges::clear_ranges(bitmap, first_pfn, &out[start..]);
            }
        }
        self.runs.clear();
        self.keys.clear();
        self.form = Form::Runs;
    }
}

/// Sets page `offset`'s bit (bit `offset % 64` of word `offset / 64`, the
/// KVM_GET_DIRTY_LOG layout of api.rst); the caller has checked the bounds.
#[inline]
fn set_bit(bitmap: &mut [u64], offset: u64) {
    bitmap[(offset / 64) as usize] |= 1 << (offset % 64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_abi::splitmix::next;

    const BASE: u64 = 1000;

    /// A record and its bitmap for a slot of `pages` pages at [`BASE`].
    fn slot(pages: u64) -> (RingPages, Vec<u64>) {
        (RingPages::default(), vec![0; ranges::words_for(pages)])
    }

    /// Notes `offsets` and harvests them, as page offsets.
    fn round(r: &mut RingPages, bm: &mut [u64], offsets: &[u64]) -> Vec<u64> {
        for &o in offsets {
            r.note(o, BASE, bm);
        }
        let mut out = Vec::new();
        r.take(&mut out, false, BASE, bm);
        assert_eq!(ranges::count_pages(bm), 0, "a harvest leaves the bitmap empty");
        out.iter().flat_map(|r| r.first..r.end()).map(|p| p - BASE).collect()
    }

    #[test]
    fn ascending_pages_are_kept_as_runs_up_to_a_full_ring() {
        let (mut r, mut bm) = slot(1 << 20);
        for p in 0..MAX_RUNS as u64 {
            r.note(p * 4, BASE, &mut bm);
            r.note(p * 4 + 1, BASE, &mut bm);
        }
        assert_eq!((r.form, r.runs.len()), (Form::Runs, MAX_RUNS));
        assert_eq!(r.runs[1], PageRange { first: BASE + 4, count: 2 });
        assert_eq!(ranges::count_pages(&bm), 0, "the bitmap is untouched while runs last");
        r.note((1 << 20) - 1, BASE, &mut bm);
        assert_eq!(r.form, Form::Bitmap, "past a full ring the bitmap takes over");
        assert_eq!(ranges::count_pages(&bm), 2 * MAX_RUNS as u64 + 1, "with every page noted so far");
        assert!(r.runs.is_empty() && r.keys.is_empty(), "and nothing stays behind in the lists");
    }

    #[test]
    fn entries_out_of_order_go_to_the_key_list_and_come_out_sorted() {
        let (mut r, mut bm) = slot(64 * 100);
        r.note(10, BASE, &mut bm);
        r.note(11, BASE, &mut bm);
        r.note(5, BASE, &mut bm);
        assert_eq!(r.form, Form::Keys);
        assert!(r.runs.is_empty(), "a short run moves into the keys");
        r.note(200, BASE, &mut bm);
        r.note(11, BASE, &mut bm);
        assert_eq!(ranges::count_pages(&bm), 0, "the bitmap is untouched while keys last");
        let mut out = Vec::new();
        r.take(&mut out, false, BASE, &mut bm);
        assert_eq!(out, vec![PageRange { first: BASE + 5, count: 1 }, PageRange { first: BASE + 10, count: 2 }, PageRange { first: BASE + 200, count: 1 }]);
    }

    #[test]
    fn long_runs_stay_runs_and_are_joined_with_the_keys() {
        let (mut r, mut bm) = slot(1 << 12);
        for p in 100..300 {
            r.note(p, BASE, &mut bm);
        }
        // Out of order: inside the run, just before it, just after it and
        // far away; the run stays a run.
        for p in [150, 99, 300, 301, 4000, 10] {
            r.note(p, BASE, &mut bm);
        }
        assert_eq!((r.form, r.runs.len(), r.keys.len()), (Form::Keys, 1, 6));
        let mut out = Vec::new();
        r.take(&mut out, false, BASE, &mut bm);
        let p = |first, count| PageRange { first: BASE + first, count };
        assert_eq!(out, vec![p(10, 1), p(99, 203), p(4000, 1)]);
    }

    #[test]
    fn past_the_key_limit_the_bitmap_holds_everything() {
        let (mut r, mut bm) = slot(1 << 16);
        let mut pages: Vec<u64> = vec![100, 101, 102];
        // Descending from here: the first still ascends past 102 (a run),
        // the other MAX_KEYS + 1 are out of order.
        pages.extend((0..MAX_KEYS as u64 + 2).map(|i| 60_000 - 3 * i));
        for &p in &pages {
            r.note(p, BASE, &mut bm);
        }
        assert_eq!(r.form, Form::Bitmap);
        assert_eq!(ranges::count_pages(&bm), pages.len() as u64);
        pages.sort_unstable();
        assert_eq!(round(&mut r, &mut bm, &[]), pages);
    }

    #[test]
    fn spread_keys_past_the_key_limit_go_to_the_bitmap() {
        // One offset per 64 pages, out of order: MAX_KEYS fit in the
        // buckets (at most 16 per bucket), the next one spills.
        let pages = 64 * (MAX_KEYS as u64 + 1);
        let (mut r, mut bm) = slot(pages);
        let offsets: Vec<u64> = (0..=MAX_KEYS as u64).rev().map(|i| i * 64).collect();
        for &o in &offsets[..MAX_KEYS] {
            r.note(o, BASE, &mut bm);
        }
        assert_eq!((r.form, r.keys.len()), (Form::Keys, MAX_KEYS));
        r.note(offsets[MAX_KEYS], BASE, &mut bm);
        assert_eq!(r.form, Form::Bitmap);
        let mut want = offsets;
        want.sort_unstable();
        assert_eq!(round(&mut r, &mut bm, &[]), want);
    }

    #[test]
    fn a_full_bucket_sends_everything_to_the_bitmap() {
        // 1024 pages per bucket: seventeen offsets inside bucket 3, out of
        // order, after keys in other buckets and a short run.
        let (mut r, mut bm) = slot(1 << 16);
        let mut offsets = vec![10, 11, 5000, 9, 60_000];
        offsets.extend((0..17).map(|i| 3 * 1024 + 1000 - 7 * i));
        let (last, before) = offsets.split_last().unwrap();
        for &o in before {
            r.note(o, BASE, &mut bm);
        }
        assert_eq!((r.form, r.keys.len()), (Form::Keys, before.len()), "16 in bucket 3 still fit");
        r.note(*last, BASE, &mut bm);
        assert_eq!(r.form, Form::Bitmap, "the seventeenth does not");
        assert!(r.runs.is_empty() && r.keys.is_empty());
        offsets.sort_unstable();
        assert_eq!(round(&mut r, &mut bm, &[]), offsets);
    }

    #[test]
    fn a_short_run_bunched_in_one_bucket_stays_a_run() {
        // 40 pages in a row fill a 64-page bucket past its 16 keys: at the
        // first entry out of order they stay a run, joined at the harvest.
        let (mut r, mut bm) = slot(64 * 64);
        let mut offsets: Vec<u64> = (200..240).collect();
        offsets.extend([7, 3000, 239, 240]);
        for &o in &offsets {
            r.note(o, BASE, &mut bm);
        }
        assert_eq!((r.form, r.runs.len(), r.keys.len()), (Form::Keys, 1, 4));
        assert_eq!(round(&mut r, &mut bm, &[]), [7].into_iter().chain(200..241).chain([3000]).collect::<Vec<_>>());
    }

    #[test]
    fn each_harvest_reports_only_its_own_pages_whatever_the_form() {
        let (mut r, mut bm) = slot(64 * 64);
        // Runs, then runs again.
        assert_eq!(round(&mut r, &mut bm, &[3, 4, 5, 100, 2000]), vec![3, 4, 5, 100, 2000]);
        assert_eq!(round(&mut r, &mut bm, &[7, 8, 900]), vec![7, 8, 900]);
        // Keys: must not hold the earlier rounds' pages.
        assert_eq!(round(&mut r, &mut bm, &[50, 10, 4000, 9, 10]), vec![9, 10, 50, 4000]);
        // The bitmap: the same.
        let many: Vec<u64> = (0..=MAX_KEYS as u64 + 1).rev().map(|i| i * 3).collect();
        let mut want = many.clone();
        want.sort_unstable();
        assert_eq!(round(&mut r, &mut bm, &many), want);
        assert_eq!(r.form, Form::Runs);
        // And back to the list, again with nothing from before.
        assert_eq!(round(&mut r, &mut bm, &[1, 2]), vec![1, 2]);
        assert!(round(&mut r, &mut bm, &[]).is_empty(), "nothing written, nothing reported");
    }

    #[test]
    fn an_overflow_reports_the_filled_bitmap_and_starts_over() {
        let (mut r, mut bm) = slot(128);
        r.note(5, BASE, &mut bm);
        r.note(1, BASE, &mut bm);
        bm.fill(u64::MAX);
        let mut out = Vec::new();
        r.take(&mut out, true, BASE, &mut bm);
        assert_eq!(out, vec![PageRange { first: BASE, count: 128 }]);
        assert_eq!(ranges::count_pages(&bm), 0);
        assert_eq!((r.form, r.runs.len(), r.keys.len()), (Form::Runs, 0, 0), "the next harvest starts empty");
    }

    #[test]
    fn a_second_slot_appends_without_touching_the_first() {
        let (mut a, mut bma) = slot(256);
        let (mut b, mut bmb) = slot(256);
        a.note(3, BASE, &mut bma);
        b.note(9, 5000, &mut bmb);
        b.note(2, 5000, &mut bmb);
        let mut out = Vec::new();
        a.take(&mut out, false, BASE, &mut bma);
        b.take(&mut out, false, 5000, &mut bmb);
        assert_eq!(out, vec![PageRange { first: BASE + 3, count: 1 }, PageRange { first: 5002, count: 1 }, PageRange { first: 5009, count: 1 }]);
    }


    #[test]
    fn every_form_reports_what_the_bitmap_alone_would() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let pages = 64 * 70 + 13;
        let (mut r, mut bm) = slot(pages);
        for trial in 0..300 {
            // Sizes around the key limit, an ascending prefix of some
            // length, repeats, and offsets near both ends of the slot.
            let n = match trial % 4 {
                0 => (next(&mut x) % 20) as usize,
                1 => (next(&mut x) % 600) as usize,
                2 => MAX_KEYS - 5 + (next(&mut x) % 10) as usize,
                _ => (next(&mut x) % 3000) as usize,
            };
            // A prefix longer than the 64 run pages moved into the keys
            // sometimes: then the keys' ranges are joined with the runs.
            let prefix = (next(&mut x) % 200) * 3;
            let mut offsets: Vec<u64> = (0..prefix).step_by(3).collect();
            for _ in 0..n {
                let o = match next(&mut x) % 8 {
                    0 => pages - 1 - next(&mut x) % 3,
                    1 => next(&mut x) % 3,
                    2 => offsets.last().copied().unwrap_or(0),
                    _ => next(&mut x) % pages,
                };
                offsets.push(o);
            }
            let mut reference = vec![0u64; ranges::words_for(pages)];
            for &o in &offsets {
                set_bit(&mut reference, o);
            }
            let want = ranges::bitmap_to_ranges(&reference, BASE);
            for &o in &offsets {
                r.note(o, BASE, &mut bm);
            }
            let mut out = vec![PageRange { first: 1, count: 2 }];
            r.take(&mut out, false, BASE, &mut bm);
            assert_eq!(out[0], PageRange { first: 1, count: 2 }, "trial {trial}: an earlier range is left alone");
            assert_eq!(&out[1..], &want[..], "trial {trial}: {n} entries after a prefix of {prefix}");
            assert_eq!(ranges::count_pages(&bm), 0, "trial {trial}");
        }
    }

    #[test]
    fn noting_in_batches_matches_noting_one_by_one() {
        let mut x = 0x7f4a_7c15_9e37_79b9u64;
        let pages = 64 * 70 + 13;
        let (mut one, mut bm1) = slot(pages);
        let (mut all, mut bm2) = slot(pages);
        for trial in 0..400 {
            // Ascending stretches (some adjacent, some with gaps), a
            // descent, repeats, and enough entries to spill sometimes.
            let mut offsets = Vec::new();
            let mut at = next(&mut x) % 50;
            for _ in 0..next(&mut x) % 6 {
                for _ in 0..next(&mut x) % 300 {
                    offsets.push(at % pages);
                    at += 1 + next(&mut x) % 3 / 2 * (next(&mut x) % 9);
                }
                at = match next(&mut x) % 3 {
                    0 => at.saturating_sub(next(&mut x) % 40),
                    1 => next(&mut x) % pages,
                    _ => at,
                };
            }
            for &o in &offsets {
                one.note(o, BASE, &mut bm1);
            }
            let entries: Vec<RingEntry> = offsets.iter().map(|&offset| RingEntry { slot: 0, offset }).collect();
            let mut rest = &entries[..];
            while !rest.is_empty() {
                let n = (1 + next(&mut x) % 70).min(rest.len() as u64) as usize;
                all.note_all(&rest[..n], BASE, &mut bm2);
                rest = &rest[n..];
            }
            assert_eq!(one.form, all.form, "trial {trial}");
            let (mut a, mut b) = (Vec::new(), Vec::new());
            one.take(&mut a, false, BASE, &mut bm1);
            all.take(&mut b, false, BASE, &mut bm2);
            assert_eq!(a, b, "trial {trial}: {} entries", offsets.len());
        }
    }

    #[test]
    fn batches_stop_the_run_list_at_a_full_ring() {
        let (mut r, mut bm) = slot(1 << 20);
        let entries: Vec<RingEntry> = (0..MAX_RUNS as u64 + 10).map(|p| RingEntry { slot: 0, offset: p * 2 }).collect();
        r.note_all(&entries[..MAX_RUNS], BASE, &mut bm);
        assert_eq!((r.form, r.runs.len()), (Form::Runs, MAX_RUNS));
        r.note_all(&entries[MAX_RUNS..], BASE, &mut bm);
        assert_eq!(r.form, Form::Bitmap, "past a full ring the bitmap takes over");
        assert_eq!(ranges::count_pages(&bm), MAX_RUNS as u64 + 10);
    }

}
