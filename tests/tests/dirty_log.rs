//! Dirty tracking against a real KVM guest: a hand-assembled micro guest
//! (memvisor's `bench::page_writer`) writes known pages and stops, and the
//! tracker must report exactly those pages, under every mechanism the kernel
//! offers; a forced mechanism the kernel lacks must fail clearly.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use memvisor::page_writer::{PARAMS, PageWriter, scatter_step, scattered_order};
use memvisor::config::Backing;
use memvisor::dirty::{DirtyCaps, DirtyMode, PageRange, ring_pages};
use memvisor::vm::open_kvm;
use vm_memory::{Bytes, GuestAddress};

fn pages_of(ranges: &[PageRange]) -> Vec<u64> {
    ranges.iter().flat_map(|r| r.first..r.end()).collect()
}

fn offered(mode: DirtyMode) -> bool {
    let vm = open_kvm().unwrap().create_vm().unwrap();
    DirtyCaps::probe(&vm).check(mode).is_ok()
}

/// A micro guest of `mem` bytes tracked with `mode`, or `None` when the
/// kernel lacks the mode, after asserting that forcing it then fails with
/// a clear "not available" error (what a test checks on such a kernel).
fn writer(mem: u64, mode: DirtyMode) -> Option<PageWriter> {
    if offered(mode) {
        return Some(PageWriter::new(mem, Backing::Anon, mode).unwrap());
    }
    let e = PageWriter::new(mem, Backing::Anon, mode).unwrap_err();
    assert!(e.to_string().contains("not available"), "{e}");
    eprintln!("{mode} is not offered here: {e}");
    None
}

fn guest_writes_are_harvested_exactly(mode: DirtyMode) {
    let Some(mut w) = writer(16 << 20, mode) else { return };
    w.tracker.start(w.vm.fd(), w.vm.ram()).unwrap();
    // A VMM write must show up as a VMM page, never as a guest one.
    w.vm.ram().memory().write_obj(0xabcdu32, GuestAddress(3000 << 12)).unwrap();

    let rounds = [(64u64, 40u32, 1u64), (300, 50, 3), (2000, 1, 1), (2000, 1, 1)];
    for (round, &(first, count, stride)) in rounds.iter().enumerate() {
        w.pass(first, count, stride).unwrap();
        let h = w.tracker.harvest(w.vm.fd(), w.vm.ram()).unwrap();
        let guest = pages_of(&h.guest);
        let want: Vec<u64> = (0..u64::from(count)).map(|i| first + i * stride).collect();
        for p in &want {
            assert!(guest.contains(p), "{mode}: round {round} missed page {p}");
        }
        assert_eq!(guest, want, "{mode}: round {round} harvested pages the guest did not write");
        let vmm = pages_of(&h.vmm);
        // The parameter block changes every round but the last (a repeat); round 0 also
        // carries the extra VMM write.
        let mut want_vmm = if round < 3 { vec![PARAMS >> 12] } else { vec![] };
        if round == 0 {
            want_vmm.push(3000);
        }
        assert_eq!(vmm, want_vmm, "{mode}: round {round} VMM writes");
        let all = pages_of(h.all());
        assert!(want.iter().chain(&want_vmm).all(|p| all.contains(p)), "{mode}: the union holds both");
        assert_eq!(h.bad_ring_entries, 0);
    }
    w.tracker.stop(w.vm.fd(), w.vm.ram()).unwrap();
}

#[test]
fn bitmap_mode_reports_exactly_the_pages_the_guest_wrote() {
    guest_writes_are_harvested_exactly(DirtyMode::Bitmap);
}

#[test]
fn clear_mode_reports_exactly_the_pages_the_guest_wrote() {
    guest_writes_are_harvested_exactly(DirtyMode::Clear);
}

#[test]
fn ring_mode_reports_exactly_the_pages_the_guest_wrote() {
    guest_writes_are_harvested_exactly(DirtyMode::Ring);
}

/// An ascending pass (the ring's run-list path) followed by scattered ones,
/// a short one (its key list) and one past `ring_pages::MAX_KEYS` (its
/// bitmap): each harvest must hold exactly its own pass's pages, none left
/// over from an earlier one, with the VMM's one write (the new parameter
/// block) listed apart.
fn an_out_of_order_harvest_after_an_ascending_one_is_exact(mode: DirtyMode) {
    let Some(mut w) = writer(16 << 20, mode) else { return };
    w.tracker.start(w.vm.fd(), w.vm.ram()).unwrap();
    for round in 0..3u64 {
        let first = 100 + round * 1000;
        w.pass(first, 64, 2).unwrap();
        let h = w.tracker.harvest(w.vm.fd(), w.vm.ram()).unwrap();
        assert_eq!(pages_of(&h.guest), (0..64).map(|i| first + 2 * i).collect::<Vec<_>>(), "{mode}: ascending round {round}");

        let past_keys = u32::try_from(ring_pages::MAX_KEYS).unwrap() + 88;
        for (sfirst, count, stride) in [(150 + round * 1000, 200u32, 3u64), (120 + round * 1000, past_keys, 1)] {
            let step = scatter_step(u64::from(count));
            let order = scattered_order(sfirst, u64::from(count), stride, step);
            assert!(order.windows(2).any(|p| p[1] < p[0]), "the pass really is out of order");
            w.pass_scattered(sfirst, count, stride, step).unwrap();
            let h = w.tracker.harvest(w.vm.fd(), w.vm.ram()).unwrap();
            let mut want = order;
            want.sort_unstable();
            assert_eq!(pages_of(&h.guest), want, "{mode}: round {round}, {count} pages: the scattered pass's pages and nothing else");
            assert_eq!(pages_of(&h.vmm), vec![PARAMS >> 12], "{mode}: round {round}, {count} pages: the VMM's parameter write, listed apart");
            assert!(!h.ring_overflowed);
            assert_eq!(h.bad_ring_entries, 0);
        }
    }
    w.tracker.stop(w.vm.fd(), w.vm.ram()).unwrap();
}

#[test]
fn ring_mode_reports_only_new_pages_when_an_out_of_order_harvest_follows_an_ascending_one() {
    an_out_of_order_harvest_after_an_ascending_one_is_exact(DirtyMode::Ring);
}

#[test]
fn clear_mode_reports_only_new_pages_when_an_out_of_order_harvest_follows_an_ascending_one() {
    an_out_of_order_harvest_after_an_ascending_one_is_exact(DirtyMode::Clear);
}

#[test]
fn bitmap_mode_reports_only_new_pages_when_an_out_of_order_harvest_follows_an_ascending_one() {
    an_out_of_order_harvest_after_an_ascending_one_is_exact(DirtyMode::Bitmap);
}

#[test]
fn ring_mode_survives_a_full_ring() {
    // 100,000 pages overflow a 65,536-entry ring: the vCPU exits with
    // KVM_EXIT_DIRTY_RING_FULL mid-pass and the tracker collects the ring.
    let Some(mut w) = writer(512 << 20, DirtyMode::Ring) else { return };
    w.tracker.start(w.vm.fd(), w.vm.ram()).unwrap();
    // KVM's PVM flavour may overrun the ring (its emulator dirties pages
    // between two soft-limit checks); the tracker then reports everything.
    w.pass(16, 100_000, 1).unwrap();
    let h = w.tracker.harvest(w.vm.fd(), w.vm.ram()).unwrap();
    let guest = pages_of(&h.guest);
    assert!((16..16 + 100_000).all(|p| guest.binary_search(&p).is_ok()), "every written page is reported");
    if !h.ring_overflowed {
        assert_eq!(guest.len(), 100_000, "without an overflow nothing else is");
    }
}

#[test]
fn logging_switches_per_memslot_at_run_time() {
    let mode = if offered(DirtyMode::Clear) { DirtyMode::Clear } else { DirtyMode::Bitmap };
    let mut w = PageWriter::new(16 << 20, Backing::Anon, mode).unwrap();
    w.tracker.start(w.vm.fd(), w.vm.ram()).unwrap();
    w.tracker.set_slot_logging(w.vm.fd(), w.vm.ram(), 0, false).unwrap();
    assert!(!w.tracker.logging());
    w.pass(100, 10, 1).unwrap();
    let h = w.tracker.harvest(w.vm.fd(), w.vm.ram()).unwrap();
    assert!(h.guest.is_empty(), "nothing is logged while the slot's logging is off");
    w.tracker.set_slot_logging(w.vm.fd(), w.vm.ram(), 0, true).unwrap();
    w.pass(200, 10, 1).unwrap();
    let h = w.tracker.harvest(w.vm.fd(), w.vm.ram()).unwrap();
    assert_eq!(pages_of(&h.guest), (200..210).collect::<Vec<_>>(), "switched back on, it logs exactly what follows");
    assert!(w.tracker.set_slot_logging(w.vm.fd(), w.vm.ram(), 9, true).is_err(), "unknown slots are refused");
}
