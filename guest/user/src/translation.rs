//! The translation benchmark's workloads: one source, run natively by the
//! VMM (`vmm bench translation`) and as a ring-3 task in the guest.
//!
//! Four access patterns over a buffer whose size is a power of two:
//! - [`Workload::ChasePage`]: a dependent pointer chase with one node per
//!   4 KiB page, pages in one random cycle — nearly every step misses the
//!   TLB once the buffer outgrows it (TLB-bound);
//! - [`Workload::ChaseLine`]: one node per 64-byte cache line; all 64 lines
//!   of a page are visited (in a scrambled order) before a random jump to
//!   the next page, so one TLB miss is shared by 64 cache misses
//!   (cache-bound);
//! - [`Workload::Gups`]: GUPS-style random read-modify-write of 8-byte
//!   words (independent accesses: memory-level parallelism hides latency);
//! - [`Workload::SeqRead`]: a sequential read of every word.
//!
//! Node placement: the page chase puts its node in page `p` at line
//! [`line_of`]`(p)`, so nodes do not all fall in the same cache sets. The
//! random page cycle comes from Sattolo's algorithm (a uniformly random
//! single cycle), run in place in a scratch word of each page (byte 8: never
//! a node, which sit at multiples of 64). Random numbers come from
//! SplitMix64 and are reduced with a multiply-high, never a division (which
//! would call compiler-builtins code the kernel keeps supervisor-only).
//!
//! Like the rest of this crate: raw pointers, wrapping arithmetic, no
//! panics, no calls out; `match` on small integers is avoided where a jump
//! table would do (its table would still be in `.user` rodata, but if-chains
//! keep the code obvious).

use core::arch::asm;

/// Bytes per page the chases treat as one unit.
pub const PAGE: u64 = 4096;
/// Bytes per cache line.
pub const LINE: u64 = 64;
/// Byte offset of the Sattolo scratch word in each page.
const SCRATCH: u64 = 8;

/// The access patterns (their index is the bit in the workload mask).
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Pointer chase, one node per page.
    ChasePage = 0,
    /// Pointer chase, one node per cache line.
    ChaseLine = 1,
    /// Random read-modify-write.
    Gups = 2,
    /// Sequential read.
    SeqRead = 3,
}

impl Workload {
    /// Every workload, in mask-bit order.
    pub const ALL: [Workload; 4] = [Workload::ChasePage, Workload::ChaseLine, Workload::Gups, Workload::SeqRead];

    /// The workload of mask bit `i`.
    #[must_use]
    pub fn from_index(i: u64) -> Option<Self> {
        if i == 0 {
            Some(Self::ChasePage)
        } else if i == 1 {
            Some(Self::ChaseLine)
        } else if i == 2 {
            Some(Self::Gups)
        } else if i == 3 {
            Some(Self::SeqRead)
        } else {
            None
        }
    }

    /// A short name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ChasePage => "chase-page",
            Self::ChaseLine => "chase-line",
            Self::Gups => "gups",
            Self::SeqRead => "seq-read",
        }
    }

    /// Units the workload works on in `bytes`: nodes or words.
    #[must_use]
    pub fn units(self, bytes: u64) -> u64 {
        if self as u64 == 0 {
            bytes >> 12
        } else if self as u64 == 1 {
            bytes >> 6
        } else {
            bytes >> 3
        }
    }
}

/// The time-stamp counter (not serialising; the intervals timed are
/// milliseconds long). Allowed at CPL 3 unless CR4.TSD, which no one sets.
#[inline(always)]
#[must_use]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}


/// A number in `0..n` from a 64-bit random `r` (Lemire's multiply-high).
#[inline(always)]
#[must_use]
pub fn below(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

/// The cache line holding page `p`'s node in the page chase.
#[inline(always)]
#[must_use]
pub fn line_of(p: u64) -> u64 {
    p.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58
}

/// The `k`-th line (0..64) the line chase visits in page `p`: a bijection
/// of `k` for each page (multiplications by odd numbers and xors are
/// bijections on 6 bits), scrambled so that no constant stride shows.
#[inline(always)]
#[must_use]
pub fn line_order(p: u64, k: u64) -> u64 {
    let salt = line_of(p);
    let mut x = k.wrapping_mul(37) & 63;
    x ^= salt;
    x = x.wrapping_mul(29) & 63;
    x ^ (x >> 3)
}

/// Builds the random cycle of pages in the scratch words: afterwards page
/// `p`'s scratch word holds the page that follows it.
///
/// # Safety
/// `base` must be valid for writes of `pages * PAGE` bytes.
unsafe fn page_cycle(base: *mut u8, pages: u64, seed: u64) {
    let scratch = |p: u64| base.wrapping_add((p * PAGE + SCRATCH) as usize) as *mut u64;
    let mut p = 0;
    while p < pages {
        // SAFETY: p < pages: inside the buffer.
        unsafe { scratch(p).write_volatile(p) };
        p += 1;
    }
    // Sattolo: swap each slot with a strictly earlier one.
    let mut rng = seed;
    let mut i = pages;
    while i > 1 {
        i -= 1;
        let j = below(memvisor_abi::splitmix::next(&mut rng), i);
        // SAFETY: i, j < pages.
        unsafe {
            let (a, b) = (scratch(i).read_volatile(), scratch(j).read_volatile());
            scratch(i).write_volatile(b);
            scratch(j).write_volatile(a);
        }
    }
}

/// Builds `w`'s data over `bytes` at `base` and returns its start state
/// (the first node for chases, the random state for GUPS, 0 otherwise).
/// Writes every page of the buffer (so the buffer is also touched).
///
/// # Safety
/// `base` must be valid for reads and writes of `bytes` bytes, 4 KiB
/// aligned, and `bytes` a power of two of at least two pages.
pub unsafe fn prepare(w: Workload, base: *mut u8, bytes: u64, seed: u64) -> u64 {
    let pages = bytes / PAGE;
    let node = |p: u64, line: u64| base.wrapping_add((p * PAGE + line * LINE) as usize) as *mut u64;
    if matches!(w, Workload::ChasePage | Workload::ChaseLine) {
        // SAFETY: the caller's contract.
        unsafe { page_cycle(base, pages, seed) };
    }
    let mut p = 0;
    while p < pages {
        // SAFETY: p < pages; every address below is inside page p or the
        // page its scratch word names (also < pages).
        unsafe {
            let next = base.wrapping_add((p * PAGE + SCRATCH) as usize).cast::<u64>().read_volatile();
            if w as u64 == Workload::ChasePage as u64 {
                node(p, line_of(p)).write_volatile(node(next, line_of(next)) as u64);
            } else if w as u64 == Workload::ChaseLine as u64 {
                let mut k = 0;
                while k < 63 {
                    node(p, line_order(p, k)).write_volatile(node(p, line_order(p, k + 1)) as u64);
                    k += 1;
                }
                node(p, line_order(p, 63)).write_volatile(node(next, line_order(next, 0)) as u64);
            } else {
                // GUPS and the sequential read: a known pattern in every word.
                let words = base.wrapping_add((p * PAGE) as usize).cast::<u64>();
                let mut i = 0;
                while i < PAGE / 8 {
                    words.add(i as usize).write_volatile(p ^ i);
                    i += 1;
                }
            }
        }
        p += 1;
    }
    if w as u64 == Workload::ChasePage as u64 {
        node(0, line_of(0)) as u64
    } else if w as u64 == Workload::ChaseLine as u64 {
        node(0, line_order(0, 0)) as u64
    } else {
        seed | 1
    }
}

/// Accesses one repetition of `w` makes with `steps` asked for: the steps
/// for chases and GUPS; whole passes over the buffer, at least one and
/// about `steps` words, for the sequential read.
#[must_use]
pub fn accesses(w: Workload, bytes: u64, steps: u64) -> u64 {
    if w as u64 == Workload::SeqRead as u64 {
        let words = bytes / 8;
        let passes = if steps > words { (steps >> words.trailing_zeros()).max(1) } else { 1 };
        passes * words
    } else {
        steps
    }
}

/// One repetition: [`accesses`]`(w, bytes, steps)` accesses from `state`;
/// returns the new state (the chase position, the random state, or a sum).
///
/// # Safety
/// As [`prepare`], after [`prepare`] built `w`'s data and returned `state`.
#[inline(never)]
pub unsafe fn run(w: Workload, base: *mut u8, bytes: u64, steps: u64, state: u64) -> u64 {
    let n = accesses(w, bytes, steps);
    if matches!(w, Workload::ChasePage | Workload::ChaseLine) {
        let mut p = state as *const u64;
        let mut i = 0;
        while i < n {
            // SAFETY: every node holds the address of another node.
            p = unsafe { p.read_volatile() } as *const u64;
            i += 1;
        }
        p as u64
    } else if w as u64 == Workload::Gups as u64 {
        let words = base.cast::<u64>();
        let mask = bytes / 8 - 1;
        let mut x = state;
        let mut i = 0;
        while i < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // SAFETY: the index is masked into the buffer (a power of two).
            unsafe {
                let q = words.add((x & mask) as usize);
                q.write_volatile(q.read_volatile() ^ x);
            }
            i += 1;
        }
        x
    } else {
        let words = base.cast::<u64>();
        let len = bytes / 8;
        let mut sum = state;
        let mut done = 0;
        while done < n {
            let mut i = 0;
            // Four independent sums keep the loop load-bound, not add-bound.
            let (mut a, mut b, mut c, mut d) = (0u64, 0u64, 0u64, 0u64);
            while i < len {
                // SAFETY: i + 3 < len (len is a multiple of 4).
                unsafe {
                    a = a.wrapping_add(words.add(i as usize).read_volatile());
                    b = b.wrapping_add(words.add(i as usize + 1).read_volatile());
                    c = c.wrapping_add(words.add(i as usize + 2).read_volatile());
                    d = d.wrapping_add(words.add(i as usize + 3).read_volatile());
                }
                i += 4;
            }
            sum = sum.wrapping_add(a ^ b ^ c ^ d);
            done += len;
        }
        sum
    }
}

/// The guest task: `params` = [workload mask, working-set bytes, reps,
/// steps, seed]; `ranges[0]` is the buffer. For each workload in the mask:
/// reports `TranslationBegin`, builds and warms its data (one untimed
/// repetition), reports `TranslationTimed`, then times `reps` repetitions
/// with [`rdtsc`] and reports each, and ends with `TranslationEnd`. Exits 0.
///
/// # Safety
/// Entered only by the kernel, with `args` valid and `ranges[0]` the
/// task's own writable buffer of `params[1]` bytes.
#[inline(never)]
pub unsafe extern "C" fn entry(args: *const crate::args::TaskArgs) -> ! {
    use memvisor_abi::workload::Event;
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let sys = a.syscall_insn != 0;
    // SAFETY: nranges >= 1 for this workload (the kernel sets it).
    let base = unsafe { (*a.ranges.as_ptr()).start } as *mut u8;
    let (mask, bytes, reps, steps, seed) = (a.params[0], a.params[1], a.params[2], a.params[3], a.params[4]);
    let mut bit = 0;
    while bit < 4 {
        if mask & (1 << bit) != 0
            && let Some(w) = Workload::from_index(bit)
        {
                crate::sys::event(Event::TranslationBegin as u64, bit, w.units(bytes), sys);
                // SAFETY: the buffer is ours, `bytes` long, page aligned.
                let mut state = unsafe { prepare(w, base, bytes, seed) };
                // SAFETY: as above; the warm-up repetition is not timed.
                state = unsafe { run(w, base, bytes, steps, state) };
                crate::sys::event(Event::TranslationTimed as u64, bit, 0, sys);
                let n = accesses(w, bytes, steps);
                let mut r = 0;
                while r < reps {
                    let t0 = rdtsc();
                    // SAFETY: as above.
                    state = unsafe { run(w, base, bytes, steps, state) };
                    let t1 = rdtsc();
                    crate::sys::event(Event::TranslationRep as u64, t1.wrapping_sub(t0), n, sys);
                    r += 1;
                }
                crate::sys::event(Event::TranslationEnd as u64, bit, state, sys);
        }
        bit += 1;
    }
    crate::sys::exit(0, sys)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;

    fn buffer(bytes: usize) -> std::vec::Vec<u64> {
        vec![0u64; bytes / 8]
    }

    #[test]
    fn line_order_is_a_permutation_for_every_page() {
        for p in 0..100 {
            let mut seen = [false; 64];
            for k in 0..64 {
                seen[line_order(p, k) as usize] = true;
            }
            assert!(seen.iter().all(|s| *s), "page {p}");
        }
    }

    #[test]
    fn below_stays_in_range() {
        for r in [0, 1, u64::MAX, 0x8000_0000_0000_0000] {
            assert!(below(r, 7) < 7);
        }
        assert_eq!(below(u64::MAX, 1), 0);
    }

    #[test]
    fn page_chase_visits_every_page_once_per_cycle() {
        let bytes = 64 * 4096;
        let mut buf = buffer(bytes);
        let base = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: the vector is `bytes` long (alignment: page offsets are
        // only relative here).
        unsafe {
            let start = prepare(Workload::ChasePage, base, bytes as u64, 42);
            let mut seen = std::collections::BTreeSet::new();
            let mut p = start;
            for _ in 0..64 {
                assert!(seen.insert((p - base as u64) / 4096), "a page twice before the cycle closed");
                p = run(Workload::ChasePage, base, bytes as u64, 1, p);
            }
            assert_eq!(p, start, "one cycle through all 64 pages");
        }
    }

    #[test]
    fn line_chase_visits_every_line_once_per_cycle() {
        let bytes = 8 * 4096;
        let mut buf = buffer(bytes);
        let base = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: as above.
        unsafe {
            let start = prepare(Workload::ChaseLine, base, bytes as u64, 7);
            let lines = (bytes / 64) as u64;
            let end = run(Workload::ChaseLine, base, bytes as u64, lines, start);
            assert_eq!(end, start);
            let mut seen = std::collections::BTreeSet::new();
            let mut p = start;
            for _ in 0..lines {
                assert!(seen.insert(p));
                p = run(Workload::ChaseLine, base, bytes as u64, 1, p);
            }
        }
    }

    #[test]
    fn gups_and_sequential_read_are_deterministic() {
        let bytes = 16 * 4096;
        let mut a = buffer(bytes);
        let mut b = buffer(bytes);
        // SAFETY: as above.
        unsafe {
            let (pa, pb) = (a.as_mut_ptr().cast::<u8>(), b.as_mut_ptr().cast::<u8>());
            let sa = prepare(Workload::Gups, pa, bytes as u64, 3);
            let sb = prepare(Workload::Gups, pb, bytes as u64, 3);
            assert_eq!(run(Workload::Gups, pa, bytes as u64, 1000, sa), run(Workload::Gups, pb, bytes as u64, 1000, sb));
            assert_eq!(a, b);
            let s = prepare(Workload::SeqRead, pa, bytes as u64, 3);
            assert_eq!(run(Workload::SeqRead, pa, bytes as u64, 10, s), run(Workload::SeqRead, pa, bytes as u64, 10, s));
        }
        assert_eq!(accesses(Workload::SeqRead, 4096, 10), 512);
        assert_eq!(accesses(Workload::SeqRead, 4096, 2048), 2048);
        assert_eq!(accesses(Workload::Gups, 4096, 99), 99);
    }
}
