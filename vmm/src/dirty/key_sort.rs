//! Sorting a ring harvest's page offsets: one bucket pass by the top bits,
//! then a small sort per bucket.
//!
//! A scattered ring harvest sorts at most a few hundred offsets spread over
//! a slot (`ring_pages::MAX_KEYS`). `sort_unstable` took ~1.9 µs for 262 of
//! them on the reference host (release profile, which optimises for size),
//! as much as everything else memvisor adds to the kernel calls; an LSD
//! radix sort with 8-bit digits took 5.0 µs (its 256 counters per pass cost
//! as much as the keys). Here 64 buckets by the offsets' top bits — the
//! slot's size says which bits those are — take one counting and one
//! scattering pass, and the buckets (about n / 64 keys each when the
//! offsets are spread, as scattered writes spread them) are sorted in
//! place. Offsets bunched into few buckets lose nothing but speed: a long
//! bucket goes to `sort_unstable`.

/// log2 of the number of buckets.
const BUCKET_BITS: u32 = 6;
/// Buckets: 64 counters, half a KiB.
const BUCKETS: usize = 1 << BUCKET_BITS;
/// Below this many keys the counters cost more than they save.
const SMALL: usize = 32;
/// Longest bucket sorted by insertion; longer ones by `sort_unstable`.
const INSERTION_MAX: usize = 16;

/// Sorts `keys` ascending (repeats kept, adjacent). The keys should lie
/// below `bound` (a slot's page count) for speed; any key sorts correctly.
/// `scratch` is the second buffer, reused across calls: its contents are
/// overwritten and the two buffers are swapped.
pub fn sort_below(keys: &mut Vec<u64>, scratch: &mut Vec<u64>, bound: u64) {
    let n = keys.len();
    if n < SMALL {
        keys.sort_unstable();
        return;
    }
    // The bucket is the key's top BUCKET_BITS below `bound`'s highest bit.
    // It never decreases as the key grows (keys at or above `bound` all go
    // to the last bucket), so sorting each bucket sorts the whole.
    let bits = u64::BITS - bound.saturating_sub(1).leading_zeros();
    let shift = bits.saturating_sub(BUCKET_BITS);
    let bucket = |k: u64| usize::try_from(k >> shift).map_or(BUCKETS - 1, |b| b.min(BUCKETS - 1));
    // start[b]..start[b + 1] will be bucket b's part of `scratch`.
    let mut start = [0usize; BUCKETS + 1];
    for &k in keys.iter() {
        start[bucket(k) + 1] += 1;
    }
    for b in 0..BUCKETS {
        start[b + 1] += start[b];
    }
    let mut next = start;
    scratch.clear();
    scratch.resize(n, 0);
    for &k in keys.iter() {
        let b = bucket(k);
        scratch[next[b]] = k;
        next[b] += 1;
    }
    for b in 0..BUCKETS {
        let part = &mut scratch[start[b]..start[b + 1]];
        if part.len() <= INSERTION_MAX {
            insertion_sort(part);
        } else {
            part.sort_unstable();
        }
    }
    std::mem::swap(keys, scratch);
}

/// Sorts a few keys: for a handful, fewer moves than any general sort.
fn insertion_sort(v: &mut [u64]) {
    for i in 1..v.len() {
        let k = v[i];
        let mut j = i;
        while j > 0 && v[j - 1] > k {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn sorts_like_the_standard_sort_for_any_bound_and_size() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut scratch = Vec::new();
        for bound in [1u64, 2, 63, 64, 65, 1 << 18, (1 << 18) + 5, 1 << 40, u64::MAX] {
            for n in [0usize, 1, 2, SMALL - 1, SMALL, SMALL + 1, 262, 512, 3000] {
                let mut keys: Vec<u64> = (0..n)
                    .map(|i| match i % 5 {
                        // Repeats, and both ends of the range.
                        0 => bound - 1,
                        1 => 0,
                        _ => next(&mut x) % bound,
                    })
                    .collect();
                let mut want = keys.clone();
                want.sort_unstable();
                sort_below(&mut keys, &mut scratch, bound);
                assert_eq!(keys, want, "bound {bound}, {n} keys");
            }
        }
    }

    #[test]
    fn bunched_keys_and_keys_past_the_bound_still_sort() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut scratch = vec![7; 3];
        // All in one bucket (longer than an insertion sort takes), a few
        // buckets, and keys at or above the bound (the last bucket).
        let cases: [Vec<u64>; 3] = [
            (0..500).map(|_| next(&mut x) % 1000).collect(),
            (0..500).map(|i| (i % 3) * 100_000 + next(&mut x) % 50).collect(),
            (0..500).map(|i| if i % 2 == 0 { next(&mut x) } else { next(&mut x) % (1 << 18) }).collect(),
        ];
        for (i, mut keys) in cases.into_iter().enumerate() {
            let mut want = keys.clone();
            want.sort_unstable();
            sort_below(&mut keys, &mut scratch, 1 << 18);
            assert_eq!(keys, want, "case {i}");
        }
    }
}
