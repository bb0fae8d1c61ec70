//! The `balloon-hostile` workload: feeds the balloon one kind of bad input
//! (`memvisor_abi::workload::HostileMode`), then checks that the device
//! still answers a well-formed inflate and deflate of one page.

use memvisor_abi::layout::{MMIO_HOLE_START, PAGE_SIZE};
use memvisor_abi::msg::Report;
use memvisor_abi::virtio::desc;
use memvisor_abi::workload::{Event, HostileMode};

use super::balloon::{Balloon, failed};
use crate::Kernel;
use crate::report;

/// A PFN far beyond any guest RAM (2^32 - 16 frames: 16 TiB).
const FAR_PFN: u32 = 0xffff_fff0;
/// A head index beyond every queue the driver sets up (virtio 1.2 §2.7.6:
/// ring entries are indices into the descriptor table of queue-size entries).
const BAD_HEAD: u16 = 300;
/// Exit status for an unknown mode.
const EXIT_BAD_MODE: u32 = 4;

/// Writes `pfns` into the scratch page and inflates (or deflates) them.
fn send_pfns(b: &mut Balloon, pfns: &[u32], inflate: bool) -> bool {
    let out = b.scratch as *mut u32;
    for (i, p) in pfns.iter().enumerate() {
        // SAFETY: a handful of entries in the scratch arena page.
        unsafe { out.add(i).write_volatile(*p) };
    }
    let buf = [(b.scratch, (pfns.len() * 4) as u32, false)];
    if inflate { b.inflate.submit(&b.m, &buf) } else { b.deflate.submit(&b.m, &buf) }
}

/// Runs mode `raw`; the status to end with.
pub fn run(k: &mut Kernel, raw: u64) -> u32 {
    let Some(mode) = HostileMode::from_raw(raw) else {
        crate::println!("guest: unknown balloon-hostile mode");
        return EXIT_BAD_MODE;
    };
    let bad_size = (mode == HostileMode::QueueSizeNotPowerOfTwo).then_some(100);
    let mut b = match Balloon::start(k, mode == HostileMode::OtherQueues, bad_size) {
        Ok(b) => b,
        Err(e) => return failed(e),
    };
    match mode {
        HostileMode::PfnOutsideRam => {
            send_pfns(&mut b, &[FAR_PFN], true);
        }
        HostileMode::PfnInHole => {
            send_pfns(&mut b, &[(MMIO_HOLE_START / PAGE_SIZE) as u32 + 0x1_0000], true);
        }
        HostileMode::DuplicatePfn => {
            if let Some(a) = k.frames_alloc(0) {
                let p = (a / PAGE_SIZE) as u32;
                send_pfns(&mut b, &[p, p], true);
                send_pfns(&mut b, &[p], false);
                let _ = k.buddy().free(a, 0);
            }
        }
        HostileMode::PartialHugePage => {
            if let Some(a) = k.frames_alloc(9) {
                let first = (a / PAGE_SIZE) as u32;
                let half: [u32; 256] = core::array::from_fn(|i| first + i as u32);
                send_pfns(&mut b, &half, true);
                send_pfns(&mut b, &half, false);
                let _ = k.buddy().free(a, 9);
            }
        }
        HostileMode::DescriptorOutsideRam => {
            // The device's own registers: not RAM.
            b.inflate.submit(&b.m, &[(b.m.base(), 4096, false)]);
        }
        HostileMode::LoopingChain => {
            b.inflate.set_desc(0, b.scratch, 4, desc::F_NEXT, 1);
            b.inflate.set_desc(1, b.scratch, 4, desc::F_NEXT, 0);
            b.inflate.publish(&b.m, 0);
        }
        HostileMode::QueueSizeNotPowerOfTwo => {}
        HostileMode::BadHeadIndex => {
            b.inflate.publish(&b.m, BAD_HEAD);
        }
        HostileMode::OtherQueues => {
            send_pfns(&mut b, &[FAR_PFN], false);
            if let Some(a) = k.frames_alloc(0) {
                send_pfns(&mut b, &[(a / PAGE_SIZE) as u32], false);
                let _ = k.buddy().free(a, 0);
            }
            let outside = b.m.base();
            if let Some(q) = b.reporting.as_mut() {
                q.submit(&b.m, &[(outside, 2 << 20, true)]);
            }
            if let Some(q) = b.stats.as_mut() {
                q.submit(&b.m, &[(outside, 40, false)]);
            }
        }
    }
    // Still alive? One well-formed page in and out.
    let alive = match k.frames_alloc(0) {
        Some(a) => {
            let p = (a / PAGE_SIZE) as u32;
            let ok = send_pfns(&mut b, &[p], true) && send_pfns(&mut b, &[p], false);
            let _ = k.buddy().free(a, 0);
            ok
        }
        None => false,
    };
    report::send(&Report::Workload { event: Event::BalloonHostileDone, a: raw, b: u64::from(alive) });
    b.stop(k);
    0
}
