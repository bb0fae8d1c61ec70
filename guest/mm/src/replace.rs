//! Page replacement: which resident page to evict when a fault finds no free
//! frame (FIFO, Clock, aging LRU), as pure code over frame indices.
//!
//! A [`Replacer`] knows frames only by index `0..frames`; it never touches
//! page tables. The hardware Accessed bit reaches it through a
//! `test_and_clear(frame) -> bool` closure, which the guest kernel
//! implements by reading and clearing the A bit of the PTE that maps the
//! frame (and `invlpg`-ing it: a TLB entry that survived the clear would let
//! later accesses go unrecorded, SDM Vol. 3A §4.8 and §4.10.4.2), and which
//! the tests and the VMM's simulation implement with a plain bit array.
//!
//! Frames are filled in index order until all are used; after that a newly
//! loaded page always goes into the frame just chosen as victim. So FIFO is
//! a hand moving round the frames, and Clock is the same hand that skips
//! (and clears) referenced frames. LRU keeps one 64-bit aging counter per
//! frame (Tanenbaum's "aging" algorithm): at every fault, before choosing,
//! each used frame's counter shifts right and gets its A bit on top; the
//! victim has the smallest counter, ties going to the page loaded earliest.
//! With ticks at faults, 64 bits of history order the last 64 faults'
//! references exactly.
//!
//! [`Sim`] replays a trace against a policy the way the guest kernel runs
//! it, so the VMM can predict the guest's counters exactly.

use memvisor_abi::paging::Policy;

/// Chooses victims among `frames` frames.
#[derive(Debug)]
pub struct Replacer<'a> {
    policy: Policy,
    hand: usize,
    used: usize,
    loads: u64,
    /// Aging counters (LRU), one per frame.
    age: &'a mut [u64],
    /// Load sequence number per frame (LRU tie-break).
    loaded: &'a mut [u64],
}

impl<'a> Replacer<'a> {
    /// A replacer over `age.len()` frames (`loaded` at least as long);
    /// the caller's storage may hold anything.
    #[must_use]
    pub fn new(policy: Policy, age: &'a mut [u64], loaded: &'a mut [u64]) -> Self {
        let n = age.len().min(loaded.len());
        Replacer { policy, hand: 0, used: 0, loads: 0, age: &mut age[..n], loaded: &mut loaded[..n] }
    }

    /// The policy.
    #[must_use]
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Number of frames.
    #[must_use]
    pub fn frames(&self) -> usize {
        self.age.len()
    }

    /// A fault happened: LRU ages every used frame from its A bit (the
    /// others need nothing). Call once per fault, before [`Self::frame_for_fault`].
    pub fn tick(&mut self, mut test_and_clear: impl FnMut(usize) -> bool) {
        if self.policy != Policy::Lru {
            return;
        }
        for f in 0..self.used {
            let referenced = test_and_clear(f);
            if let Some(a) = self.age.get_mut(f) {
                *a = (*a >> 1) | (u64::from(referenced) << 63);
            }
        }
    }

    /// The frame the faulting page goes into: a never-used frame while
    /// there is one (`evict` false), else the policy's victim (`evict`
    /// true: the caller must unmap and maybe write back its page first).
    /// `None` only for a replacer with no frames.
    pub fn frame_for_fault(&mut self, test_and_clear: impl FnMut(usize) -> bool) -> Option<(usize, bool)> {
        let n = self.frames();
        if n == 0 {
            return None;
        }
        let (frame, evict) = if self.used < n {
            self.used += 1;
            (self.used - 1, false)
        } else {
            (self.victim(test_and_clear), true)
        };
        if let (Some(a), Some(l)) = (self.age.get_mut(frame), self.loaded.get_mut(frame)) {
            *a = 0;
            *l = self.loads;
        }
        self.loads += 1;
        Some((frame, evict))
    }

    fn victim(&mut self, mut test_and_clear: impl FnMut(usize) -> bool) -> usize {
        let n = self.frames();
        match self.policy {
            Policy::Fifo => {
                let v = self.hand;
                self.hand = (self.hand + 1) % n;
                v
            }
            Policy::Clock => loop {
                // Terminates: a referenced frame is cleared as it is passed,
                // so at most one full turn finds a victim.
                let f = self.hand;
                self.hand = (self.hand + 1) % n;
                if !test_and_clear(f) {
                    return f;
                }
            },
            Policy::Lru => {
                let mut best = 0;
                for f in 1..n {
                    if (self.age[f], self.loaded[f]) < (self.age[best], self.loaded[best]) {
                        best = f;
                    }
                }
                best
            }
        }
    }
}

/// What a replay counts (the same counters the guest reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Faults on never-touched pages (zero-filled, no I/O).
    pub minor: u64,
    /// Faults on pages whose data is in swap.
    pub major: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Evicted pages that were dirty and written to swap.
    pub writebacks: u64,
}

impl Counters {
    /// All faults.
    #[must_use]
    pub fn faults(&self) -> u64 {
        self.minor + self.major
    }
}

/// Per-page state of a [`Sim`] (and of the guest's region).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimPage {
    /// The frame holding the page, if resident.
    pub frame: Option<usize>,
    /// Swap holds the page's data (it was written back at least once).
    pub in_swap: bool,
    /// Accessed bit (while resident).
    pub accessed: bool,
    /// Dirty bit (while resident).
    pub dirty: bool,
}

/// Replays accesses the way the guest kernel handles them: an access to a
/// resident page sets A (and D when it writes); an access to a non-resident
/// page faults, ticks the policy, takes a frame (evicting, and writing back
/// a dirty victim), and then sets A (and D) as the retried access does.
#[derive(Debug)]
pub struct Sim<'a> {
    replacer: Replacer<'a>,
    pages: &'a mut [SimPage],
    owner: &'a mut [Option<usize>],
    /// The counters so far.
    pub counters: Counters,
}

impl<'a> Sim<'a> {
    /// A replay over `pages.len()` pages and `owner.len()` frames (the
    /// replacer must have as many frames); all storage must start empty.
    #[must_use]
    pub fn new(replacer: Replacer<'a>, pages: &'a mut [SimPage], owner: &'a mut [Option<usize>]) -> Self {
        Sim { replacer, pages, owner, counters: Counters::default() }
    }

    /// One access to `page` (ignored when out of range).
    pub fn access(&mut self, page: usize, write: bool) {
        if page >= self.pages.len() {
            return;
        }
        if self.pages[page].frame.is_none() {
            self.fault(page);
        }
        let p = &mut self.pages[page];
        p.accessed = true;
        p.dirty |= write;
    }

    fn fault(&mut self, page: usize) {
        let (pages, owner) = (&mut *self.pages, &mut *self.owner);
        let mut tac = |f: usize| {
            let Some(Some(pg)) = owner.get(f).copied() else { return false };
            core::mem::replace(&mut pages[pg].accessed, false)
        };
        self.replacer.tick(&mut tac);
        let Some((frame, evict)) = self.replacer.frame_for_fault(&mut tac) else { return };
        if evict && let Some(Some(old)) = self.owner.get(frame).copied() {
            let o = &mut self.pages[old];
            self.counters.evictions += 1;
            if o.dirty {
                self.counters.writebacks += 1;
                o.in_swap = true;
            }
            *o = SimPage { in_swap: o.in_swap, ..SimPage::default() };
        }
        if self.pages[page].in_swap {
            self.counters.major += 1;
        } else {
            self.counters.minor += 1;
        }
        self.pages[page].frame = Some(frame);
        if let Some(o) = self.owner.get_mut(frame) {
            *o = Some(page);
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;

    fn replay(policy: Policy, frames: usize, pages: usize, trace: &[(usize, bool)]) -> Counters {
        let (mut age, mut loaded) = (vec![0; frames], vec![0; frames]);
        let mut state = vec![SimPage::default(); pages];
        let mut owner = vec![None; frames];
        let mut sim = Sim::new(Replacer::new(policy, &mut age, &mut loaded), &mut state, &mut owner);
        for &(p, w) in trace {
            sim.access(p, w);
        }
        sim.counters
    }

    fn seq(pages: usize, loops: usize, write: bool) -> Vec<(usize, bool)> {
        (0..pages * loops).map(|i| (i % pages, write)).collect()
    }

    #[test]
    fn a_loop_over_one_page_more_than_frames_faults_on_every_access_under_every_policy() {
        for policy in Policy::ALL {
            for frames in [1, 2, 7, 63, 64, 100] {
                let (pages, loops) = (frames + 1, 5);
                let c = replay(policy, frames, pages, &seq(pages, loops, true));
                let accesses = (pages * loops) as u64;
                assert_eq!(c.faults(), accesses, "{policy:?} with {frames} frames");
                assert_eq!(c.minor, pages as u64);
                assert_eq!(c.major, accesses - pages as u64);
                assert_eq!(c.evictions, accesses - frames as u64);
                assert_eq!(c.writebacks, c.evictions, "every page was written");
            }
        }
    }

    #[test]
    fn clean_pages_are_never_written_back() {
        for policy in Policy::ALL {
            let c = replay(policy, 4, 5, &seq(5, 3, false));
            assert_eq!(c.writebacks, 0);
            // Never written, so never in swap: every fault is a zero-fill.
            assert_eq!(c.major, 0);
            assert_eq!(c.minor, 15);
        }
    }

    #[test]
    fn a_loop_that_fits_faults_once_per_page() {
        for policy in Policy::ALL {
            let c = replay(policy, 8, 8, &seq(8, 10, true));
            assert_eq!(c, Counters { minor: 8, ..Counters::default() });
        }
    }

    #[test]
    fn clock_spares_a_referenced_page_that_fifo_evicts() {
        // Three frames: pages 0, 1, 2 fill them; 3 faults; 1 is touched
        // again; 4 faults; 1 is touched again.
        let trace = [(0, false), (1, false), (2, false), (3, false), (1, false), (4, false), (1, false)];
        // FIFO: 0,1,2 | 3 evicts 0 | 1 hit | 4 evicts 1 | 1 faults: 6 faults.
        assert_eq!(replay(Policy::Fifo, 3, 5, &trace).faults(), 6);
        // Clock: 3 sweeps all (clears A) and evicts 0, hand at 1 | 1 hit sets A |
        // 4: frame 1 referenced, spared; frame 2 evicted | 1 hit: 5 faults.
        assert_eq!(replay(Policy::Clock, 3, 5, &trace).faults(), 5);
        // LRU: at 4, page 2 is least recently used: 5 faults.
        assert_eq!(replay(Policy::Lru, 3, 5, &trace).faults(), 5);
    }

    #[test]
    fn lru_ages_from_a_bits_and_breaks_ties_by_load_order() {
        let (mut age, mut loaded) = (vec![0; 3], vec![0; 3]);
        let mut r = Replacer::new(Policy::Lru, &mut age, &mut loaded);
        for _ in 0..3 {
            r.tick(|_| false);
            assert!(!r.frame_for_fault(|_| false).unwrap().1);
        }
        // Frame 1 referenced: not the victim; 0 and 2 tie, 0 loaded first.
        r.tick(|f| f == 1);
        assert_eq!(r.frame_for_fault(|_| false), Some((0, true)));
        r.tick(|f| f == 0);
        // Now 2 is oldest-and-unreferenced (1 has an older reference bit).
        assert_eq!(r.frame_for_fault(|_| false), Some((2, true)));
    }

    #[test]
    fn no_frames_means_no_frame() {
        let mut r = Replacer::new(Policy::Fifo, &mut [], &mut []);
        assert_eq!(r.frame_for_fault(|_| false), None);
    }
}
