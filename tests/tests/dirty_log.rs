//! Dirty tracking against a real KVM guest: a few hand-assembled 32-bit
//! instructions write known pages, stop at an I/O port, and the tracker must
//! report exactly those pages, under every mechanism the kernel offers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kvm_ioctls::VcpuExit;
use memvisor::config::VmConfig;
use memvisor::dirty::{DirtyCaps, DirtyMode, DirtyTracker, PageRange};
use memvisor::memory::GuestRam;
use memvisor::vm::{Vm, open_kvm};
use vm_memory::{Bytes, GuestAddress};

/// Where the test code lives (guest-physical).
const CODE: u64 = 0x1000;
/// The port the code writes to between rounds.
const ROUND_PORT: u16 = 0x80;

/// Code that writes one dword to each of `count` pages starting at `first`
/// (page numbers), stepping `stride` pages, then `out 0x80, al`.
fn write_pages(first: u64, count: u32, stride: u64) -> Vec<u8> {
    let mut c = vec![0xB8]; // mov eax, imm32
    c.extend_from_slice(&((first << 12) as u32).to_le_bytes());
    c.push(0xB9); // mov ecx, imm32
    c.extend_from_slice(&count.to_le_bytes());
    c.extend_from_slice(&[0x89, 0x00]); // loop: mov [eax], eax
    c.push(0x05); // add eax, imm32
    c.extend_from_slice(&((stride << 12) as u32).to_le_bytes());
    c.extend_from_slice(&[0x49, 0x75, 0xF6]); // dec ecx; jnz loop (-10)
    c.extend_from_slice(&[0xE6, ROUND_PORT as u8]); // out 0x80, al
    c
}

fn expected(first: u64, count: u64, stride: u64) -> Vec<u64> {
    (0..count).map(|i| first + i * stride).collect()
}

fn pages_of(ranges: &[PageRange]) -> Vec<u64> {
    ranges.iter().flat_map(|r| r.first..r.end()).collect()
}

fn run_rounds(mode: DirtyMode) {
    let config = VmConfig { mem_size: 16 << 20, ..VmConfig::default() };
    let ram = GuestRam::new(&config).unwrap();
    let vm = Vm::new(open_kvm().unwrap(), ram).unwrap();
    let mut tracker = DirtyTracker::prepare(vm.fd(), vm.ram(), Some(mode)).unwrap();
    assert_eq!(tracker.mode(), mode);
    let mut vcpu = memvisor::vcpu::create_pvh(&vm, 0, CODE, 0).unwrap();
    tracker.attach_vcpu(&vcpu, 0).unwrap();

    let rounds = [(64u64, 40u64, 1u64), (300, 50, 3), (2000, 1, 1)];
    let mut code = Vec::new();
    for &(first, count, stride) in &rounds {
        code.extend(write_pages(first, count as u32, stride));
    }
    code.push(0xF4); // hlt
    vm.ram().memory().write_slice(&code, GuestAddress(CODE)).unwrap();
    tracker.start(vm.fd(), vm.ram()).unwrap();

    // A VMM write between rounds must show up as a VMM page, not a guest one.
    vm.ram().memory().write_obj(0xabcdu32, GuestAddress(3000 << 12)).unwrap();

    for (round, &(first, count, stride)) in rounds.iter().enumerate() {
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(ROUND_PORT, _) => break,
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
                other => panic!("unexpected exit {other:?} in round {round}"),
            }
        }
        let h = tracker.harvest(vm.fd(), vm.ram()).unwrap();
        let guest = pages_of(&h.guest);
        let want = expected(first, count, stride);
        for p in &want {
            assert!(guest.contains(p), "{mode}: round {round} missed page {p} (harvested {guest:?})");
        }
        assert_eq!(guest.len(), want.len(), "{mode}: round {round} harvested extra pages: {guest:?}");
        if round == 0 {
            assert_eq!(pages_of(&h.vmm), vec![3000], "{mode}: the VMM's own write is reported separately");
            assert!(pages_of(&h.all).contains(&3000));
        } else {
            assert!(h.vmm.is_empty());
        }
        assert_eq!(h.bad_ring_entries, 0);
    }
    tracker.stop(vm.fd(), vm.ram()).unwrap();
}

fn offered(mode: DirtyMode) -> bool {
    let kvm = open_kvm().unwrap();
    let vm = kvm.create_vm().unwrap();
    let caps = DirtyCaps::probe(&vm);
    match caps.check(mode) {
        Ok(()) => true,
        Err(e) => {
            // Not offered by this kernel: then forcing it must fail clearly.
            eprintln!("{e}");
            false
        }
    }
}

#[test]
fn bitmap_mode_reports_exactly_the_pages_the_guest_wrote() {
    run_rounds(DirtyMode::Bitmap);
}

#[test]
fn clear_mode_reports_exactly_the_pages_the_guest_wrote() {
    if offered(DirtyMode::Clear) {
        run_rounds(DirtyMode::Clear);
    } else {
        let ram = GuestRam::new(&VmConfig { mem_size: 2 << 20, ..VmConfig::default() }).unwrap();
        let vm = Vm::new(open_kvm().unwrap(), ram).unwrap();
        assert!(DirtyTracker::prepare(vm.fd(), vm.ram(), Some(DirtyMode::Clear)).is_err());
    }
}

#[test]
fn ring_mode_reports_exactly_the_pages_the_guest_wrote() {
    if offered(DirtyMode::Ring) {
        run_rounds(DirtyMode::Ring);
    } else {
        let ram = GuestRam::new(&VmConfig { mem_size: 2 << 20, ..VmConfig::default() }).unwrap();
        let vm = Vm::new(open_kvm().unwrap(), ram).unwrap();
        assert!(DirtyTracker::prepare(vm.fd(), vm.ram(), Some(DirtyMode::Ring)).is_err());
    }
}
