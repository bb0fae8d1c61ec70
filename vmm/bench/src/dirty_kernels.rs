//! `vmm bench dirty --kernels`: the harvest's pure kernels timed without a
//! VM, the figures behind two choices in `dirty/`:
//! - [`memvisor::dirty::ring_pages::MAX_KEYS`]: for ring entries arriving in a
//!   scattered order in a 1 GiB slot, the sorted key list against setting
//!   bits in the slot's bitmap and scanning it, with hot caches and with
//!   caches evicted (a 32 MiB walk) before each harvest, as after a guest's
//!   run;
//! - [`memvisor::dirty::key_buckets::KeyBuckets`]: offsets bucketed as they
//!   arrive and turned into ranges, against collecting them in a list,
//!   `sort_unstable` and making the ranges, for the key list's sizes.
//!
//! Medians (and minima) of many repetitions, in ns. Every harvest is checked
//! to hold exactly the pages noted.

use std::hint::black_box;
use std::time::Instant;

use memvisor::page_writer::{scatter_step, scattered_order};
use memvisor::dirty::key_buckets::KeyBuckets;
use memvisor::dirty::ranges::{self, PageRange};
use memvisor::dirty::ring::RingEntry;
use memvisor::dirty::ring_pages::RingPages;

/// Pages of a 1 GiB slot.
const SLOT_PAGES: u64 = 262_144;
/// Bytes walked to evict the caches (larger than this host's L2 and LLC).
const EVICT_BYTES: usize = 32 << 20;

/// Writes one word per 64-byte cache line of `buf`.
fn evict(buf: &mut [u64]) {
    for (i, w) in buf.iter_mut().enumerate().step_by(8) {
        *w = w.wrapping_add(i as u64);
    }
    black_box(buf);
}

/// (median, minimum) of `t`.
fn median_min(t: &mut [u128]) -> (u128, u128) {
    t.sort_unstable();
    (t.get(t.len() / 2).copied().unwrap_or(0), t.first().copied().unwrap_or(0))
}

/// One harvest timing: `(entries, caches evicted, bitmap ns, key list ns)`,
/// medians, with minima.
type Row = (u64, bool, (u128, u128), (u128, u128));

fn harvest_rows(reps: usize) -> Result<Vec<Row>, String> {
    let mut big = vec![0u64; EVICT_BYTES / 8];
    let mut rows = Vec::new();
    for count in [262u64, 512, 1024, 2621] {
        let order = scattered_order(0, count, SLOT_PAGES / count, scatter_step(count));
        // The ring's entries for those pages, as its drain hands them over.
        let entries: Vec<RingEntry> = order.iter().map(|&offset| RingEntry { slot: 0, offset }).collect();
        // The pages are at least a stride apart: one range each, ascending.
        let mut want: Vec<PageRange> = order.iter().map(|&first| PageRange { first, count: 1 }).collect();
        want.sort_unstable_by_key(|r| r.first);
        let mut bitmap = vec![0u64; ranges::words_for(SLOT_PAGES)];
        let mut out: Vec<PageRange> = Vec::with_capacity(70_000);
        let mut ring = RingPages::default();
        for cold in [false, true] {
            let (mut t_bitmap, mut t_keys) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
            for _ in 0..reps {
                if cold {
                    evict(&mut big);
                }
                out.clear();
                let t = Instant::now();
                for &o in &order {
                    if let Some(w) = bitmap.get_mut((o / 64) as usize) {
                        *w |= 1 << (o % 64);
                    }
                }
                ranges::bitmap_to_ranges_into(&bitmap, 0, &mut out);
                ranges::clear_ranges(&mut bitmap, 0, &out);
                t_bitmap.push(t.elapsed().as_nanos());
                if out != want {
                    return Err(format!("the bitmap harvest of {count} scattered pages is not exactly those pages"));
                }
                if cold {
                    evict(&mut big);
                }
                out.clear();
                let t = Instant::now();
                ring.note_all(&entries, 0, &mut bitmap);
                ring.take(&mut out, false, 0, &mut bitmap);
                t_keys.push(t.elapsed().as_nanos());
                if out != want {
                    return Err(format!("the ring harvest of {count} scattered pages is not exactly those pages"));
                }
            }
            rows.push((count, cold, median_min(&mut t_bitmap), median_min(&mut t_keys)));
        }
    }
    Ok(rows)
}

/// One sort timing: `(keys, list + sort_unstable + ranges ns, buckets +
/// ranges ns)`, medians with minima, from the first key noted to the last
/// range made.
type SortRow = (usize, (u128, u128), (u128, u128));

fn sort_rows(reps: usize) -> Result<Vec<SortRow>, String> {
    let mut x = memvisor_abi::splitmix::GOLDEN_GAMMA;
    let mut rows = Vec::new();
    let mut buckets = KeyBuckets::default();
    for n in [262usize, 512] {
        let keys: Vec<u64> = (0..n)
            .map(|_| memvisor_abi::splitmix::next(&mut x) % SLOT_PAGES)
            .collect();
        let (mut t_std, mut t_ours) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
        let mut list = Vec::with_capacity(n);
        let (mut want, mut got) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..reps {
            list.clear();
            want.clear();
            let t = Instant::now();
            list.extend(keys.iter().map(|&k| black_box(k)));
            list.sort_unstable();
            ranges::sorted_pages_to_ranges_into(&list, 0, &mut want);
            t_std.push(t.elapsed().as_nanos());
            got.clear();
            buckets.reset_for(SLOT_PAGES);
            let t = Instant::now();
            for &k in &keys {
                // Random offsets may bunch past a bucket's capacity; those
                // rows are then not comparable, and say so.
                if !buckets.push(black_box(k)) {
                    return Err(format!("{n} random offsets filled a bucket; pick another seed"));
                }
            }
            buckets.take_ranges_into(0, &mut got);
            t_ours.push(t.elapsed().as_nanos());
            if got != want {
                return Err(format!("the bucketed ranges of {n} offsets differ from the sorted list's"));
            }
        }
        rows.push((n, median_min(&mut t_std), median_min(&mut t_ours)));
    }
    Ok(rows)
}

/// Runs both timings and prints them.
///
/// # Errors
/// A message when a harvest does not hold exactly the pages noted.
pub fn run(reps: usize) -> Result<(), String> {
    let reps = reps.max(1);
    println!("ring harvest of scattered entries, 1 GiB slot, {reps} repetitions: median ns (min)");
    println!("{:>8} {:>8} {:>16} {:>16}", "entries", "caches", "bitmap", "key list");
    for (count, cold, (bm, bm_min), (k, k_min)) in harvest_rows(reps)? {
        println!("{count:>8} {:>8} {:>16} {:>16}", if cold { "evicted" } else { "hot" }, format!("{bm} ({bm_min})"), format!("{k} ({k_min})"));
    }
    println!("random offsets below 2^18 to ranges, hot: median ns (min)");
    println!("{:>8} {:>16} {:>16}", "keys", "list + sort", "buckets");
    for (n, (s, s_min), (o, o_min)) in sort_rows(reps)? {
        println!("{n:>8} {:>16} {:>16}", format!("{s} ({s_min})"), format!("{o} ({o_min})"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_timed_harvest_holds_exactly_the_pages_noted() {
        let rows = harvest_rows(2).unwrap();
        assert_eq!(rows.len(), 8, "four sizes, hot and evicted");
        assert_eq!(sort_rows(2).unwrap().len(), 2);
    }
}
