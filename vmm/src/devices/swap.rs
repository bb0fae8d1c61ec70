//! The paravirtual swap device of the guest-paging workloads (issue 6).
//!
//! The guest writes the guest-physical address of a
//! [`memvisor_abi::paging::SwapRequest`] to [`memvisor_abi::ports::SWAP`];
//! the VMM performs it before the guest's `out` completes and writes the
//! status back into the request. The store is host memory: one 4 KiB
//! buffer per swap slot ever written, bounded by [`MAX_SLOTS`].
//!
//! Why a device rather than a guest-physical swap region the guest copies
//! into itself: on a host that emulates guest ring 0 instruction by
//! instruction, a 4 KiB copy at ring 0 costs ~580 µs and zeroing ~350 µs,
//! while one exit costs ~30 µs and the copy here is a native `memcpy`
//! (docs/guest-paging.md has the measurements). The same device zeroes
//! recycled frames and makes the copy-on-write copies.
//!
//! Everything in a request is guest-controlled: a bad operation, a frame
//! outside RAM or not 4 KiB-aligned, or a slot beyond the bound is refused
//! with `SWAP_STATUS_ERROR` and counted, never a panic.

use std::collections::HashMap;

use memvisor_abi::Pod as _;
use memvisor_abi::paging::{SWAP_STATUS_ERROR, SWAP_STATUS_OK, SwapOp, SwapRequest};
use vm_memory::{Bytes, GuestAddress};

/// Size of a frame and of a swap slot.
const PAGE: usize = 4096;
/// Most swap slots: 64 MiB of swapped pages. The guest's paging region is
/// at most 4096 pages (`workload::MAX_PAGING_PAGES`, slot = page index), so
/// this is four times what it can use; the bound is what a guest that
/// writes every slot makes the VMM allocate, so it is kept small (the VMM's
/// own footprint beyond guest RAM is ~1 MiB otherwise).
pub const MAX_SLOTS: u64 = 1 << 14;

/// Why a swap request was refused (each answered with `SWAP_STATUS_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SwapError {
    /// The request itself does not lie in guest RAM.
    #[error("request at {0:#x} is outside guest RAM")]
    RequestOutsideRam(u64),
    /// `op` is no [`SwapOp`].
    #[error("unknown operation {0}")]
    UnknownOp(u32),
    /// The frame (or a copy's source) is not 4 KiB-aligned.
    #[error("frame {0:#x} is not 4 KiB-aligned")]
    Misaligned(u64),
    /// The frame (or a copy's source) is not wholly in guest RAM.
    #[error("frame {0:#x} is outside guest RAM")]
    FrameOutsideRam(u64),
    /// The slot is beyond the swap area.
    #[error("slot {0} is beyond the swap area ({MAX_SLOTS} slots)")]
    SlotOutOfRange(u64),
}

/// What the device did in a run.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SwapStats {
    /// Frames written to swap.
    pub writes: u64,
    /// Frames read back from swap.
    pub reads: u64,
    /// Frames zeroed.
    pub zeroes: u64,
    /// Frames copied (copy-on-write).
    pub copies: u64,
    /// Requests refused.
    pub errors: u64,
    /// Swap slots holding data at the end.
    pub slots_used: u64,
}

/// The device: its host-side store and counters.
#[derive(Debug, Default)]
pub struct SwapDevice {
    slots: HashMap<u64, Box<[u8; PAGE]>>,
    stats: SwapStats,
}

impl SwapDevice {
    /// The counters.
    #[must_use]
    pub fn stats(&self) -> SwapStats {
        SwapStats { slots_used: self.slots.len() as u64, ..self.stats.clone() }
    }

    /// Swap slots holding data (pages a guest evicted and may read back).
    #[must_use]
    pub fn slots_used(&self) -> usize {
        self.slots.len()
    }

    /// Performs the request at guest-physical `request` and writes its
    /// status back (when the request itself is readable).
    pub fn handle<M: Bytes<GuestAddress>>(&mut self, mem: &M, request: u64) {
        let mut bytes = [0u8; size_of::<SwapRequest>()];
        let Some(mut req) = mem.read_slice(&mut bytes, GuestAddress(request)).ok().and_then(|()| SwapRequest::from_bytes(&bytes)) else {
            self.stats.errors += 1;
            crate::warn_limited!("swap request ignored: {}", SwapError::RequestOutsideRam(request));
            return;
        };
        req.status = match self.perform(mem, &req) {
            Ok(()) => SWAP_STATUS_OK,
            Err(why) => {
                self.stats.errors += 1;
                crate::warn_limited!("swap request {req:?} refused: {why}");
                SWAP_STATUS_ERROR
            }
        };
        // The request was just read from here, so the write cannot fail.
        let _ = mem.write_slice(req.as_bytes(), GuestAddress(request));
    }

    fn perform<M: Bytes<GuestAddress>>(&mut self, mem: &M, req: &SwapRequest) -> Result<(), SwapError> {
        let op = SwapOp::from_raw(req.op).ok_or(SwapError::UnknownOp(req.op))?;
        if !req.gpa.is_multiple_of(PAGE as u64) {
            return Err(SwapError::Misaligned(req.gpa));
        }
        let frame = GuestAddress(req.gpa);
        let outside = |_| SwapError::FrameOutsideRam(req.gpa);
        let check_slot = || if req.slot < MAX_SLOTS { Ok(()) } else { Err(SwapError::SlotOutOfRange(req.slot)) };
        match op {
            SwapOp::Write => {
                check_slot()?;
                // Read first, so a refused write changes no slot; rewriting
                // a slot reuses its buffer.
                let mut page = [0u8; PAGE];
                mem.read_slice(&mut page, frame).map_err(outside)?;
                **self.slots.entry(req.slot).or_insert_with(|| Box::new([0u8; PAGE])) = page;
                self.stats.writes += 1;
            }
            SwapOp::Read => {
                check_slot()?;
                // A never-written slot reads as zeros, like a fresh disk.
                let zero = [0u8; PAGE];
                let page = self.slots.get(&req.slot).map_or(&zero, |p| &**p);
                mem.write_slice(page, frame).map_err(outside)?;
                self.stats.reads += 1;
            }
            SwapOp::Zero => {
                mem.write_slice(&[0u8; PAGE], frame).map_err(outside)?;
                self.stats.zeroes += 1;
            }
            SwapOp::Copy => {
                if !req.slot.is_multiple_of(PAGE as u64) {
                    return Err(SwapError::Misaligned(req.slot));
                }
                let mut page = [0u8; PAGE];
                mem.read_slice(&mut page, GuestAddress(req.slot)).map_err(|_| SwapError::FrameOutsideRam(req.slot))?;
                mem.write_slice(&page, frame).map_err(outside)?;
                self.stats.copies += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    type GuestMemory = GuestMemoryMmap;

    fn memory() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap()
    }

    fn request(dev: &mut SwapDevice, mem: &GuestMemory, op: u32, gpa: u64, slot: u64) -> u32 {
        let at = GuestAddress(15 * PAGE as u64);
        mem.write_slice(SwapRequest { op, status: u32::MAX, gpa, slot }.as_bytes(), at).unwrap();
        dev.handle(mem, at.0);
        let mut b = [0u8; 24];
        mem.read_slice(&mut b, at).unwrap();
        SwapRequest::from_bytes(&b).unwrap().status
    }

    #[test]
    fn a_frame_written_to_swap_reads_back_into_another_frame() {
        let (mem, mut dev) = (memory(), SwapDevice::default());
        mem.write_slice(&[0xab; PAGE], GuestAddress(0x1000)).unwrap();
        assert_eq!(request(&mut dev, &mem, SwapOp::Write as u32, 0x1000, 7), SWAP_STATUS_OK);
        assert_eq!(request(&mut dev, &mem, SwapOp::Read as u32, 0x3000, 7), SWAP_STATUS_OK);
        let mut back = [0u8; PAGE];
        mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        assert_eq!(request(&mut dev, &mem, SwapOp::Zero as u32, 0x3000, 0), SWAP_STATUS_OK);
        mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert_eq!(request(&mut dev, &mem, SwapOp::Copy as u32, 0x4000, 0x1000), SWAP_STATUS_OK);
        mem.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        let s = dev.stats();
        assert_eq!((s.writes, s.reads, s.zeroes, s.copies, s.errors, s.slots_used), (1, 1, 1, 1, 0, 1));
    }

    #[test]
    fn bad_requests_are_refused_and_counted() {
        let (mem, mut dev) = (memory(), SwapDevice::default());
        assert_eq!(request(&mut dev, &mem, 99, 0x1000, 0), SWAP_STATUS_ERROR);
        assert_eq!(request(&mut dev, &mem, SwapOp::Write as u32, 0x1001, 0), SWAP_STATUS_ERROR);
        assert_eq!(request(&mut dev, &mem, SwapOp::Write as u32, 0x1000, MAX_SLOTS), SWAP_STATUS_ERROR);
        assert_eq!(request(&mut dev, &mem, SwapOp::Read as u32, 1 << 30, 0), SWAP_STATUS_ERROR);
        assert_eq!(request(&mut dev, &mem, SwapOp::Copy as u32, 0x1000, 1 << 30), SWAP_STATUS_ERROR);
        dev.handle(&mem, 1 << 40);
        // A request straddling the end of RAM is outside it too.
        dev.handle(&mem, 16 * PAGE as u64 - 8);
        assert_eq!(dev.stats().errors, 7);
    }

    #[test]
    fn rewriting_a_slot_keeps_one_buffer_and_a_refused_write_changes_no_slot() {
        let (mem, mut dev) = (memory(), SwapDevice::default());
        for fill in [1u8, 2] {
            mem.write_slice(&[fill; PAGE], GuestAddress(0x1000)).unwrap();
            assert_eq!(request(&mut dev, &mem, SwapOp::Write as u32, 0x1000, 3), SWAP_STATUS_OK);
        }
        assert_eq!(request(&mut dev, &mem, SwapOp::Read as u32, 0x2000, 3), SWAP_STATUS_OK);
        let mut back = [0u8; PAGE];
        mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert!(back.iter().all(|&b| b == 2), "the last write wins");
        // A frame outside RAM: refused, slot 4 is not allocated and slot 3
        // keeps its data.
        assert_eq!(request(&mut dev, &mem, SwapOp::Write as u32, 1 << 30, 4), SWAP_STATUS_ERROR);
        assert_eq!(request(&mut dev, &mem, SwapOp::Write as u32, 1 << 30, 3), SWAP_STATUS_ERROR);
        assert_eq!(dev.slots_used(), 1);
        assert_eq!(request(&mut dev, &mem, SwapOp::Read as u32, 0x2000, 3), SWAP_STATUS_OK);
        mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert!(back.iter().all(|&b| b == 2));
    }

    #[test]
    fn every_refusal_names_its_reason() {
        let (mem, mut dev) = (memory(), SwapDevice::default());
        let req = |op, gpa, slot| SwapRequest { op, status: 0, gpa, slot };
        let cases = [
            (req(99, 0x1000, 0), SwapError::UnknownOp(99)),
            (req(SwapOp::Zero as u32, 0x1008, 0), SwapError::Misaligned(0x1008)),
            (req(SwapOp::Zero as u32, 16 * PAGE as u64, 0), SwapError::FrameOutsideRam(16 * PAGE as u64)),
            (req(SwapOp::Read as u32, 0x1000, MAX_SLOTS), SwapError::SlotOutOfRange(MAX_SLOTS)),
            (req(SwapOp::Write as u32, !0xfff, 0), SwapError::FrameOutsideRam(!0xfff)),
            (req(SwapOp::Copy as u32, 0x1000, 0x1010), SwapError::Misaligned(0x1010)),
            (req(SwapOp::Copy as u32, 0x1000, 1 << 30), SwapError::FrameOutsideRam(1 << 30)),
        ];
        for (r, want) in cases {
            assert_eq!(dev.perform(&mem, &r), Err(want), "{r:?}");
        }
        assert_eq!(SwapError::SlotOutOfRange(7).to_string(), format!("slot 7 is beyond the swap area ({MAX_SLOTS} slots)"));
    }
}
