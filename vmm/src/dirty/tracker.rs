//! The dirty tracker of one VM: one mechanism, per-slot bitmaps, and the
//! merge with the VMM's own writes.
//!
//! Life cycle: [`DirtyTracker::prepare`] right after the VM is created
//! (the ring must be enabled before any vCPU exists), [`attach_vcpu`] for
//! each vCPU, [`start`] to switch logging on, [`harvest`] as often as
//! needed, [`collect_rings`] when a vCPU exits with a full ring, [`stop`].
//!
//! [`attach_vcpu`]: DirtyTracker::attach_vcpu
//! [`start`]: DirtyTracker::start
//! [`harvest`]: DirtyTracker::harvest
//! [`collect_rings`]: DirtyTracker::collect_rings

use kvm_ioctls::{VcpuFd, VmFd};
use serde::Serialize;

use crate::dirty::caps::{INITIALLY_SET, MANUAL_PROTECT_ENABLE};
use crate::dirty::ranges::{self, PageRange};
use crate::dirty::ring::{self, DirtyRing, RingEntry};
use crate::dirty::ring_pages::RingPages;
use crate::dirty::{DirtyCaps, DirtyError, DirtyMode, log};
use crate::memory::vmm_writes;
use crate::memory::{GuestRam, slots};

/// Largest ring memvisor asks for: 65,536 entries (1 MiB) per vCPU, which
/// holds 256 MiB of dirty pages between harvests.
pub const MAX_RING_BYTES: u64 = 1 << 20;

/// One memslot as the tracker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotInfo {
    /// KVM slot number.
    pub slot: u32,
    /// First guest page frame number of the slot.
    pub first_pfn: u64,
    /// Pages in the slot.
    pub pages: u64,
}

impl Harvest {
    /// Every page written, by the guest or the VMM: what a snapshot must
    /// save.
    #[must_use]
    pub fn all(&self) -> &[PageRange] {
        if self.vmm.is_empty() { &self.guest } else { &self.union }
    }
}

/// What one harvest found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Harvest {
    /// Pages the guest wrote (from KVM), as guest page ranges.
    pub guest: Vec<PageRange>,
    /// Pages the VMM wrote through vm-memory.
    pub vmm: Vec<PageRange>,
    /// Union of both when the VMM wrote anything (else empty: the union
    /// is `guest`); read it through [`Harvest::all`].
    union: Vec<PageRange>,
    /// Ring entries that named a slot or page outside guest RAM (ignored).
    pub bad_ring_entries: u64,
    /// A dirty ring was found completely full, so KVM may have overwritten
    /// entries: every page was reported dirty to lose nothing.
    pub ring_overflowed: bool,
}

#[derive(Debug)]
struct SlotState {
    info: SlotInfo,
    /// Reused buffer for KVM's bitmap.
    kvm: Vec<u64>,
    /// Accumulated guest-dirty bits (ring mode collects here between harvests).
    acc: Vec<u64>,
    /// Whether KVM logs this slot's dirty pages.
    logging: bool,
    /// Ring mode: the pages dirtied since the last harvest, held as runs,
    /// as a key list or in `acc` (see [`RingPages`]).
    ring: RingPages,
}

/// Routes a batch of ring entries (`slot` as KVM writes it: address space
/// << 16 | slot id) to their slots' records, each stretch of entries of one
/// slot in one call ([`RingPages::note_all`]); `last` is the index of the
/// slot the previous entry hit, tried first since entries come in runs
/// from one slot. Returns how many entries it dropped, recording nothing
/// for them: those naming no page of a tracked slot in address space 0
/// (slot and offset come from KVM but are still checked before they index
/// anything).
fn note_ring_entries(slots: &mut [SlotState], last: &mut usize, batch: &[RingEntry]) -> u64 {
    let mut bad = 0;
    let mut rest = batch;
    while let Some(e) = rest.first() {
        let hit = match slots.get(*last) {
            Some(s) if s.info.slot == e.slot => Some(*last),
            _ => slots.iter().position(|s| s.info.slot == e.slot),
        };
        let Some(i) = hit.filter(|_| e.slot >> 16 == 0) else {
            bad += 1;
            rest = &rest[1..];
            continue;
        };
        *last = i;
        let s = &mut slots[i];
        // The stretch of entries of this slot that lie inside it.
        let n = rest.iter().take_while(|x| x.slot == e.slot && x.offset < s.info.pages).count();
        if n == 0 {
            bad += 1;
            rest = &rest[1..];
            continue;
        }
        s.ring.note_all(&rest[..n], s.info.first_pfn, &mut s.acc);
        rest = &rest[n..];
    }
    bad
}

/// [`note_ring_entries`] for one entry: whether it was recorded.
#[cfg(test)]
fn note_ring_entry(slots: &mut [SlotState], last: &mut usize, slot: u32, offset: u64) -> bool {
    note_ring_entries(slots, last, &[RingEntry { slot, offset }]) == 0
}

/// The dirty tracker.
#[derive(Debug)]
pub struct DirtyTracker {
    mode: DirtyMode,
    caps: DirtyCaps,
    ring_bytes: u64,
    initially_set: bool,
    slots: Vec<SlotState>,
    rings: Vec<DirtyRing>,
    /// Entries collected from each ring so far (index: the vCPU's, rings
    /// being attached in vCPU order).
    ring_entries: Vec<u64>,
    scratch: Vec<RingEntry>,
    /// Reused buffers for the VMM's writes, one per slot.
    vmm_scratch: Vec<vmm_writes::SparseWords>,
    bad_ring_entries: u64,
    /// Report every page at the next harvest: a ring overflowed, or a
    /// reset failed after its entries' pages were handed out.
    ring_overflowed: bool,
    /// Consecutive ring-full exits that found nothing to collect.
    empty_full_exits: u32,
    logging: bool,
    /// Bumped by every start, stop, per-slot switch and harvest: whoever
    /// needs "everything since my last harvest" (a snapshot chain) checks
    /// that nobody else consumed or paused the log in between.
    generation: u64,
}

impl DirtyTracker {
    /// Chooses the mode and enables what must be enabled before vCPUs exist.
    ///
    /// # Errors
    /// [`DirtyError`] when a forced mode is missing or KVM refuses.
    pub fn prepare(vm: &VmFd, ram: &GuestRam, forced: Option<DirtyMode>) -> Result<Self, DirtyError> {
        let caps = DirtyCaps::probe(vm);
        let mode = crate::dirty::choose_mode(&caps, forced, crate::host::detect().is_pvm())?;
        let mut ring_bytes = 0;
        let mut initially_set = false;
        match mode {
            DirtyMode::Ring => {
                ring_bytes = caps.ring_bytes.min(MAX_RING_BYTES);
                ring::enable(vm, ring_bytes, caps.ring_acq_rel)?;
            }
            DirtyMode::Clear => {
                initially_set = caps.manual_protect & INITIALLY_SET != 0;
                let flags = MANUAL_PROTECT_ENABLE | if initially_set { INITIALLY_SET } else { 0 };
                log::enable_manual_protect(vm, flags)?;
            }
            DirtyMode::Bitmap => {}
        }
        let slots = ram
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let pages = r.range.size / 4096;
                let words = ranges::words_for(pages);
                SlotState {
                    info: SlotInfo { slot: i as u32, first_pfn: r.range.start.0 >> 12, pages },
                    kvm: vec![0; words],
                    acc: vec![0; words],
                    ring: RingPages::default(),
                    logging: false,
                }
            })
            .collect();
        Ok(DirtyTracker { mode, caps, ring_bytes, initially_set, slots, rings: Vec::new(), ring_entries: Vec::new(), scratch: Vec::new(), vmm_scratch: Vec::new(), bad_ring_entries: 0, ring_overflowed: false, empty_full_exits: 0, logging: false, generation: 0 })
    }

    /// The mechanism in use.
    #[must_use]
    pub fn mode(&self) -> DirtyMode {
        self.mode
    }

    /// What the kernel offered.
    #[must_use]
    pub fn caps(&self) -> &DirtyCaps {
        &self.caps
    }

    /// The slots tracked.
    #[must_use]
    pub fn slots(&self) -> Vec<SlotInfo> {
        self.slots.iter().map(|s| s.info).collect()
    }

    /// Maps vCPU `index`'s ring (ring mode only; a no-op otherwise).
    ///
    /// # Errors
    /// [`DirtyError::MapRing`].
    pub fn attach_vcpu(&mut self, vcpu: &VcpuFd, index: usize) -> Result<(), DirtyError> {
        if self.mode == DirtyMode::Ring {
            self.rings.push(DirtyRing::map(vcpu, index, self.ring_bytes)?);
            self.ring_entries.push(0);
        }
        Ok(())
    }

    /// Switches logging on for every slot and starts from a clean slate
    /// (nothing counts as dirty from before this call).
    ///
    /// # Errors
    /// [`DirtyError`] when KVM refuses.
    pub fn start(&mut self, vm: &VmFd, ram: &GuestRam) -> Result<(), DirtyError> {
        self.generation += 1;
        slots::register(vm, ram, slots::KVM_MEM_LOG_DIRTY_PAGES)?;
        self.logging = true;
        for s in &mut self.slots {
            s.logging = true;
        }
        if self.mode == DirtyMode::Clear && self.initially_set {
            // Every bit starts set and nothing is write-protected yet:
            // clearing everything arms tracking from now on.
            for s in &mut self.slots {
                s.kvm.fill(u64::MAX);
                log::clear(vm, s.info.slot, 0, s.info.pages as u32, &mut s.kvm)?;
            }
        }
        // Drop whatever was logged or written so far.
        self.harvest(vm, ram)?;
        Ok(())
    }

    /// Switches logging for one memslot on or off at run time, leaving the
    /// others as they are. Turning it on starts that slot from a clean slate
    /// at the next harvest; pages dirtied while it was off are not reported.
    ///
    /// # Errors
    /// [`DirtyError::NoSuchSlot`], or KVM refusing.
    pub fn set_slot_logging(&mut self, vm: &VmFd, ram: &GuestRam, slot: u32, on: bool) -> Result<(), DirtyError> {
        self.generation += 1;
        let state = self.slots.iter_mut().find(|s| s.info.slot == slot).ok_or(DirtyError::NoSuchSlot(slot))?;
        slots::register_one(vm, ram, slot, if on { slots::KVM_MEM_LOG_DIRTY_PAGES } else { 0 })?;
        state.logging = on;
        if on && self.mode == DirtyMode::Clear && self.initially_set {
            state.kvm.fill(u64::MAX);
            log::clear(vm, slot, 0, state.info.pages as u32, &mut state.kvm)?;
        }
        self.logging = self.slots.iter().any(|s| s.logging);
        Ok(())
    }

    /// Which slots log dirty pages.
    #[must_use]
    pub fn slot_logging(&self) -> Vec<(SlotInfo, bool)> {
        self.slots.iter().map(|s| (s.info, s.logging)).collect()
    }

    /// Switches logging off (huge pages may then be rebuilt by KVM).
    ///
    /// # Errors
    /// [`DirtyError`] when KVM refuses.
    pub fn stop(&mut self, vm: &VmFd, ram: &GuestRam) -> Result<(), DirtyError> {
        self.generation += 1;
        slots::register(vm, ram, 0)?;
        self.logging = false;
        for s in &mut self.slots {
            s.logging = false;
        }
        Ok(())
    }

    /// See the field: changes whenever the log is consumed or switched.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether every slot logs (a diff snapshot needs all of them).
    #[must_use]
    pub fn logging_everywhere(&self) -> bool {
        self.slots.iter().all(|s| s.logging)
    }

    /// Entries collected from each vCPU's dirty ring so far, in vCPU order
    /// (empty unless the mechanism is the ring). Every vCPU has its own
    /// ring (`attach_vcpu`); a harvest drains them all while the other
    /// vCPUs keep running (KVM's ring protocol lets the VMM collect
    /// published entries of a running vCPU; KVM_RESET_DIRTY_RINGS re-arms
    /// the collected ones VM-wide).
    #[must_use]
    pub fn ring_entries(&self) -> &[u64] {
        &self.ring_entries
    }

    /// Whether logging is on.
    #[must_use]
    pub fn logging(&self) -> bool {
        self.logging
    }

    /// Handles `KVM_EXIT_DIRTY_RING_FULL`: collects the rings, and fails
    /// with [`DirtyError::RingStuck`] when exits keep coming with nothing to
    /// collect (the vCPU could never run again).
    ///
    /// # Errors
    /// [`DirtyError::RingStuck`], or what [`collect_rings`](Self::collect_rings) fails with.
    pub fn on_ring_full(&mut self, vm: &VmFd) -> Result<(), DirtyError> {
        /// Exits without progress tolerated before giving up.
        const STUCK_AFTER: u32 = 1000;
        if self.collect_rings(vm)? == 0 {
            self.empty_full_exits += 1;
            // An overrun ring is also an overflow: report everything.
            self.ring_overflowed = true;
            if self.empty_full_exits >= STUCK_AFTER {
                return Err(DirtyError::RingStuck);
            }
        } else {
            self.empty_full_exits = 0;
        }
        Ok(())
    }

    /// Collects published ring entries into the per-slot accumulators and
    /// re-arms them. Called on `KVM_EXIT_DIRTY_RING_FULL` and by
    /// [`harvest`](Self::harvest).
    ///
    /// # Errors
    /// [`DirtyError::Kvm`] from `KVM_RESET_DIRTY_RINGS`.
    pub fn collect_rings(&mut self, vm: &VmFd) -> Result<usize, DirtyError> {
        let n = self.drain_rings();
        if n > 0 {
            log::reset_rings(vm)?;
        }
        Ok(n)
    }

    /// Routes every published ring entry to its slot's record and marks it
    /// collected, without `KVM_RESET_DIRTY_RINGS`: the caller resets (the
    /// entries stay reserved until then). Returns how many were collected.
    fn drain_rings(&mut self) -> usize {
        let mut n = 0;
        let mut bad = 0;
        let slots = &mut self.slots;
        // Entries come in runs from the same slot: remember the last one.
        let mut last = 0usize;
        for (r, total) in self.rings.iter_mut().zip(self.ring_entries.iter_mut()) {
            let got = r.drain(|batch| bad += note_ring_entries(slots, &mut last, batch));
            *total += got as u64;
            // KVM exits with KVM_EXIT_DIRTY_RING_FULL while some reserved
            // entries are still free, so a correct ring is never found
            // completely full. A full one means KVM kept pushing past the
            // soft limit (seen on the PVM flavour, whose instruction
            // emulator dirties many pages between two checks) and may have
            // overwritten entries: lose nothing by reporting every page.
            if got >= r.entries() as usize {
                self.ring_overflowed = true;
            }
            n += got;
        }
        self.bad_ring_entries += bad;
        n
    }

    /// Only the kernel side of a harvest, into the tracker's buffers: the
    /// ioctls (and, for rings, reading the entries), with no conversion to
    /// ranges and no merge with VMM writes. `vmm bench dirty` measures
    /// [`harvest`](Self::harvest) against this.
    ///
    /// # Errors
    /// [`DirtyError`] when KVM refuses.
    pub fn harvest_raw(&mut self, vm: &VmFd) -> Result<(), DirtyError> {
        match self.mode {
            DirtyMode::Ring => {
                self.scratch.clear();
                for (r, total) in self.rings.iter_mut().zip(self.ring_entries.iter_mut()) {
                    *total += r.harvest(&mut self.scratch) as u64;
                }
                if !self.scratch.is_empty() {
                    log::reset_rings(vm)?;
                }
            }
            DirtyMode::Bitmap | DirtyMode::Clear => {
                for s in &mut self.slots {
                    log::get(vm, s.info.slot, &mut s.kvm)?;
                    if self.mode == DirtyMode::Clear {
                        log::clear(vm, s.info.slot, 0, s.info.pages as u32, &mut s.kvm)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Harvests everything written since the previous harvest (or `start`),
    /// by the guest and by the VMM.
    ///
    /// # Errors
    /// [`DirtyError`] when KVM refuses.
    pub fn harvest(&mut self, vm: &VmFd, ram: &GuestRam) -> Result<Harvest, DirtyError> {
        let mut out = Harvest::default();
        self.harvest_into(vm, ram, &mut out)?;
        Ok(out)
    }

    /// [`harvest`](Self::harvest) into `out`, replacing its contents but
    /// keeping its buffers: a caller that harvests in a loop (rounds,
    /// migration passes, `vmm bench dirty`) allocates nothing per harvest.
    ///
    /// # Errors
    /// [`DirtyError`] when KVM refuses; `out` then holds no pages.
    pub fn harvest_into(&mut self, vm: &VmFd, ram: &GuestRam, out: &mut Harvest) -> Result<(), DirtyError> {
        let result = self.fill_harvest(vm, ram, out);
        if result.is_err() {
            out.guest.clear();
            out.vmm.clear();
            out.union.clear();
        }
        result
    }

    fn fill_harvest(&mut self, vm: &VmFd, ram: &GuestRam, out: &mut Harvest) -> Result<(), DirtyError> {
        out.guest.clear();
        out.vmm.clear();
        out.union.clear();
        self.generation += 1;
        // Ring entries drained here and not yet given back to KVM.
        let mut drained = 0;
        match self.mode {
            DirtyMode::Ring => {
                // KVM_RESET_DIRTY_RINGS waits until the pages are ranges
                // (below): the reset re-protects every page harvested, and
                // that much kernel work evicts the just-written key list
                // from the caches, which the harvest would then read back
                // from memory. Order does not matter to KVM: it frees only
                // entries already marked collected.
                for s in &self.slots {
                    s.ring.prefetch_for_write();
                }
                drained = self.drain_rings();
            }
            DirtyMode::Bitmap | DirtyMode::Clear => {
                // Outside ring mode the accumulator is empty between
                // harvests (cleared below), so KVM's bitmap goes straight
                // into it: no copy, one scan.
                for s in &mut self.slots {
                    if s.logging {
                        log::get(vm, s.info.slot, &mut s.acc)?;
                    } else {
                        s.acc.fill(0);
                    }
                }
            }
        }
        let ring_overflowed = std::mem::take(&mut self.ring_overflowed);
        if ring_overflowed {
            ::log::warn!("a dirty ring overflowed; reporting every page as dirty so none is missed");
            for s in &mut self.slots {
                s.acc.fill(u64::MAX);
                if s.info.pages % 64 != 0
                    && let Some(last) = s.acc.last_mut() {
                        *last = (1u64 << (s.info.pages % 64)) - 1;
                    }
            }
        }
        let any_vmm = vmm_writes::take_into(ram, &mut self.vmm_scratch);
        out.bad_ring_entries = std::mem::take(&mut self.bad_ring_entries);
        out.ring_overflowed = ring_overflowed;
        for (s, vmm_words) in self.slots.iter_mut().zip(&self.vmm_scratch) {
            let start = out.guest.len();
            if self.mode == DirtyMode::Ring {
                s.ring.take(&mut out.guest, ring_overflowed, s.info.first_pfn, &mut s.acc);
            } else {
                ranges::bitmap_to_ranges_into(&s.acc, s.info.first_pfn, &mut out.guest);
            }
            let guest = &out.guest[start..];
            if self.mode == DirtyMode::Clear && s.logging && !guest.is_empty() && !ring_overflowed {
                // Re-protect exactly what was harvested (KVM reads the
                // bitmap and leaves it as it is).
                log::clear(vm, s.info.slot, 0, s.info.pages as u32, &mut s.acc)?;
            }
            // The VMM's writes are merged as ranges (linear in the number
            // of runs), never through a second pass over the slot bitmap.
            if !vmm_words.is_empty() {
                let v = out.vmm.len();
                ranges::sparse_words_to_ranges_into(vmm_words, s.info.first_pfn, &mut out.vmm);
                ranges::union_into(guest, &out.vmm[v..], &mut out.union);
            } else if any_vmm {
                out.union.extend_from_slice(guest);
            }
        }
        if drained > 0
            && let Err(e) = log::reset_rings(vm) {
                // The entries' pages already left their records for `out`,
                // which the caller clears on error: report every page at the
                // next harvest so none of them is lost.
                self.ring_overflowed = true;
                return Err(e);
            }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(pages: u64) -> SlotState {
        SlotState { info: SlotInfo { slot: 0, first_pfn: 1000, pages }, kvm: Vec::new(), acc: vec![0; ranges::words_for(pages)], logging: true, ring: RingPages::default() }
    }

    /// Feeds `pages` (offsets in slot 0) through the ring-entry path and
    /// harvests the slots as `fill_harvest` does in ring mode.
    fn ring_round(slots: &mut [SlotState], pages: &[u64]) -> Vec<u64> {
        let mut last = 0;
        for &p in pages {
            assert!(note_ring_entry(slots, &mut last, 0, p));
        }
        let mut out = Vec::new();
        for s in slots.iter_mut() {
            s.ring.take(&mut out, false, s.info.first_pfn, &mut s.acc);
        }
        out.iter().flat_map(|r| r.first..r.end()).map(|p| p - 1000).collect()
    }

    #[test]
    fn a_scattered_harvest_after_list_harvests_reports_only_its_own_pages() {
        let mut slots = [slot(64 * 64)];
        // Two ascending rounds: harvested from the run list.
        assert_eq!(ring_round(&mut slots, &[3, 4, 5, 100, 2000]), vec![3, 4, 5, 100, 2000]);
        assert_eq!(ring_round(&mut slots, &[7, 8, 900]), vec![7, 8, 900]);
        // Out of order: harvested from the key list, which must not still
        // hold the earlier rounds' pages.
        assert_eq!(ring_round(&mut slots, &[50, 10, 4000, 9]), vec![9, 10, 50, 4000]);
        // Many out of order: through the bitmap, likewise.
        let many: Vec<u64> = (0..2000).rev().map(|i| i * 2).collect();
        assert_eq!(ring_round(&mut slots, &many), (0..2000).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(ranges::count_pages(&slots[0].acc), 0, "a harvest leaves the bitmap empty");
        // And back to the list, again with nothing from before.
        assert_eq!(ring_round(&mut slots, &[1, 2]), vec![1, 2]);
        assert!(ring_round(&mut slots, &[]).is_empty(), "nothing written, nothing reported");
    }

    #[test]
    fn ring_entries_outside_tracked_slots_are_refused() {
        let mut slots = [slot(64), SlotState { info: SlotInfo { slot: 3, first_pfn: 5000, pages: 64 }, ..slot(64) }];
        let mut last = 0;
        assert!(!note_ring_entry(&mut slots, &mut last, 0, 64), "offset past the slot");
        assert!(!note_ring_entry(&mut slots, &mut last, 1, 0), "unknown slot");
        assert!(!note_ring_entry(&mut slots, &mut last, 1 << 16, 0), "address space 1");
        assert!(note_ring_entry(&mut slots, &mut last, 3, 63));
        assert_eq!(last, 1, "the slot hit is remembered");
        let mut out = Vec::new();
        for s in &mut slots {
            s.ring.take(&mut out, false, s.info.first_pfn, &mut s.acc);
        }
        assert_eq!(out, vec![PageRange { first: 5063, count: 1 }]);
    }

    #[test]
    fn entries_of_two_slots_interleaved_come_out_per_slot_in_order() {
        let mut slots = [slot(256), SlotState { info: SlotInfo { slot: 1, first_pfn: 5000, pages: 256 }, ..slot(256) }];
        let mut last = 0;
        for (slot, offset) in [(0, 9), (1, 200), (0, 3), (1, 4), (0, 9), (1, 5), (0, 255)] {
            assert!(note_ring_entry(&mut slots, &mut last, slot, offset));
        }
        let mut out = Vec::new();
        for s in &mut slots {
            s.ring.take(&mut out, false, s.info.first_pfn, &mut s.acc);
        }
        let r = |first, count| PageRange { first, count };
        assert_eq!(out, vec![r(1003, 1), r(1009, 1), r(1255, 1), r(5004, 2), r(5200, 1)]);
    }
}
