//! A buddy allocator of physical frames.
//!
//! Owns the free lists of blocks of 2^order 4 KiB frames (order 0..=
//! [`MAX_ORDER`], i.e. 4 KiB to 1 GiB), each block aligned to its size in
//! *physical* address, so an order-9 block can back a 2 MiB page and an
//! order-18 block a 1 GiB page. It does not own the frames' contents: its
//! metadata lives in a caller-provided [`FrameMeta`] array (one entry per
//! frame, indexed by frame number) and the allocator never writes into free
//! memory, so free RAM stays exactly as the last owner left it (the guest
//! keeps it zero).
//!
//! Cost model: the guest runs this at ring 0, where every instruction is
//! expensive on an emulating host, so nothing is O(frames): the metadata
//! must start zeroed (the guest takes it from never-used RAM, which the VMM
//! guarantees is zero) and [`Buddy::add_range`] is O(blocks).

/// Largest order: 2^18 frames = 1 GiB.
pub const MAX_ORDER: usize = 18;
/// Number of orders.
pub const ORDERS: usize = MAX_ORDER + 1;
/// Size of a frame.
pub const FRAME_SIZE: u64 = 4096;
const FRAME_SHIFT: u32 = 12;
const NIL: u32 = u32::MAX;

/// Per-frame metadata. Only the first frame of a free block is meaningful;
/// all-zero means "not the head of a free block".
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameMeta {
    next: u32,
    prev: u32,
    /// 0: not a free block head; k + 1: head of a free block of order k.
    free_order: u8,
}

impl FrameMeta {
    /// Bytes of metadata per frame of RAM, for sizing the storage.
    pub const SIZE: usize = size_of::<Self>();
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuddyError {
    /// The order is above [`MAX_ORDER`].
    BadOrder,
    /// The address is not aligned to the block size.
    Misaligned,
    /// The block lies (partly) beyond the metadata's frames.
    OutOfRange,
    /// The block is already free.
    DoubleFree,
}

impl core::fmt::Display for BuddyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            BuddyError::BadOrder => "order too large",
            BuddyError::Misaligned => "block not aligned to its size",
            BuddyError::OutOfRange => "block beyond the managed frames",
            BuddyError::DoubleFree => "block already free",
        })
    }
}

/// The allocator. Frame `i` of the metadata is the frame at physical
/// address `i * 4096`.
#[derive(Debug)]
pub struct Buddy<'a> {
    meta: &'a mut [FrameMeta],
    heads: [u32; ORDERS],
    free_blocks: [u32; ORDERS],
    free_frames: u64,
    managed_frames: u64,
}

impl<'a> Buddy<'a> {
    /// An allocator with no free memory, managing frames `0..meta.len()`.
    ///
    /// `meta` must be all zero (not checked: that would be O(frames)).
    /// Frame numbers are `u32`, so at most 16 TiB.
    pub fn new(meta: &'a mut [FrameMeta]) -> Self {
        let len = meta.len().min(NIL as usize);
        Self { meta: &mut meta[..len], heads: [NIL; ORDERS], free_blocks: [0; ORDERS], free_frames: 0, managed_frames: 0 }
    }

    /// Frames the storage can describe.
    #[must_use]
    pub fn capacity_frames(&self) -> u64 {
        self.meta.len() as u64
    }

    /// Bytes handed to the allocator with [`Buddy::add_range`].
    #[must_use]
    pub fn managed_bytes(&self) -> u64 {
        self.managed_frames << FRAME_SHIFT
    }

    /// Bytes free now.
    #[must_use]
    pub fn free_bytes(&self) -> u64 {
        self.free_frames << FRAME_SHIFT
    }

    /// Free blocks per order.
    #[must_use]
    pub fn free_blocks(&self) -> [u32; ORDERS] {
        self.free_blocks
    }

    /// Adds the frames wholly inside `[start, end)` (rounded inwards to
    /// 4 KiB) as free memory, cut into the largest aligned blocks. Frames
    /// beyond the metadata are ignored. The range must not overlap one
    /// added before (not checked: that would cost a lookup per frame).
    /// Returns the bytes added.
    pub fn add_range(&mut self, start: u64, end: u64) -> u64 {
        let begin = start.div_ceil(FRAME_SIZE);
        let last = (end >> FRAME_SHIFT).min(self.meta.len() as u64);
        let mut first = begin;
        let mut added = 0;
        let mut edges = [None; 2];
        while first < last {
            let align_order = if first == 0 { MAX_ORDER as u32 } else { first.trailing_zeros().min(MAX_ORDER as u32) };
            let fit_order = 63 - (last - first).leading_zeros();
            let order = align_order.min(fit_order) as usize;
            let next = first + (1 << order);
            // Greedy maximal blocks never have their buddy inside the same
            // range (else the pair would have been one larger block), so
            // only the first and last block can merge, with free memory
            // outside the range. The others go straight onto the lists; the
            // two edge blocks are freed afterwards with merging, so a merge
            // that grows an edge block into an inner block's buddy is seen.
            if first == begin {
                edges[0] = Some((first, order));
            } else if next == last {
                edges[1] = Some((first, order));
            } else if self.meta[first as usize].free_order == 0 {
                self.free_frames += 1 << order;
                self.push(first as u32, order);
                self.managed_frames += 1 << order;
                added += FRAME_SIZE << order;
            }
            first = next;
        }
        for (frame, order) in edges.into_iter().flatten() {
            if self.free(frame << FRAME_SHIFT, order).is_ok() {
                self.managed_frames += 1 << order;
                added += FRAME_SIZE << order;
            }
        }
        added
    }

    /// Allocates a block of 2^`order` frames; its physical address.
    pub fn alloc(&mut self, order: usize) -> Option<u64> {
        if order > MAX_ORDER {
            return None;
        }
        let from = (order..ORDERS).find(|o| self.heads[*o] != NIL)?;
        let frame = self.heads[from];
        self.unlink(frame, from);
        // Split: give back the upper halves until the block has the order asked.
        let mut o = from;
        while o > order {
            o -= 1;
            self.push(frame + (1 << o), o);
        }
        self.free_frames -= 1 << order;
        Some(u64::from(frame) << FRAME_SHIFT)
    }

    /// Allocates the largest free block; its address and order.
    pub fn alloc_largest(&mut self) -> Option<(u64, usize)> {
        let order = (0..ORDERS).rev().find(|o| self.heads[*o] != NIL)?;
        self.alloc(order).map(|addr| (addr, order))
    }

    /// Frees the block of 2^`order` frames at `addr`, merging it with its
    /// buddy while the buddy is free too.
    ///
    /// # Errors
    /// [`BuddyError`] for a bad order, a misaligned or out-of-range block,
    /// or a block whose head is already free.
    pub fn free(&mut self, addr: u64, order: usize) -> Result<(), BuddyError> {
        if order > MAX_ORDER {
            return Err(BuddyError::BadOrder);
        }
        let frame = addr >> FRAME_SHIFT;
        if addr & ((FRAME_SIZE << order) - 1) != 0 {
            return Err(BuddyError::Misaligned);
        }
        if frame + (1 << order) > self.meta.len() as u64 {
            return Err(BuddyError::OutOfRange);
        }
        let mut frame = frame as u32;
        if self.meta[frame as usize].free_order != 0 {
            return Err(BuddyError::DoubleFree);
        }
        self.free_frames += 1 << order;
        let mut o = order;
        while o < MAX_ORDER {
            let buddy = frame ^ (1 << o);
            match self.meta.get(buddy as usize) {
                Some(m) if usize::from(m.free_order) == o + 1 => {}
                _ => break,
            }
            self.unlink(buddy, o);
            frame &= !(1 << o);
            o += 1;
        }
        self.push(frame, o);
        Ok(())
    }

    fn push(&mut self, frame: u32, order: usize) {
        let head = self.heads[order];
        if head != NIL {
            self.meta[head as usize].prev = frame;
        }
        self.meta[frame as usize] = FrameMeta { next: head, prev: NIL, free_order: order as u8 + 1 };
        self.heads[order] = frame;
        self.free_blocks[order] += 1;
    }

    fn unlink(&mut self, frame: u32, order: usize) {
        let FrameMeta { next, prev, .. } = self.meta[frame as usize];
        if prev == NIL {
            self.heads[order] = next;
        } else {
            self.meta[prev as usize].next = next;
        }
        if next != NIL {
            self.meta[next as usize].prev = prev;
        }
        self.meta[frame as usize] = FrameMeta::default();
        self.free_blocks[order] -= 1;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn storage(bytes: u64) -> Vec<FrameMeta> {
        vec![FrameMeta::default(); (bytes / FRAME_SIZE) as usize]
    }

    #[test]
    fn an_aligned_range_becomes_one_block() {
        let mut meta = storage(4 * MIB);
        let mut b = Buddy::new(&mut meta);
        assert_eq!(b.add_range(2 * MIB, 4 * MIB), 2 * MIB);
        assert_eq!(b.free_blocks()[9], 1);
        assert_eq!(b.free_bytes(), 2 * MIB);
        assert_eq!(b.alloc(9), Some(2 * MIB));
        assert_eq!(b.alloc(0), None);
    }

    #[test]
    fn unaligned_ranges_are_cut_into_aligned_blocks_and_rounded_inwards() {
        let mut meta = storage(4 * MIB);
        let mut b = Buddy::new(&mut meta);
        let added = b.add_range(0x1_0800, 0x20_1800);
        // 0x11000..0x201000: frames 0x11..0x201.
        assert_eq!(added, 0x201000 - 0x11000);
        assert_eq!(b.managed_bytes(), added);
        // Every block handed out is aligned to its size and inside the range.
        let mut got = 0;
        while let Some((addr, order)) = b.alloc_largest() {
            assert_eq!(addr % (FRAME_SIZE << order), 0);
            assert!(addr >= 0x11000 && addr + (FRAME_SIZE << order) <= 0x201000);
            got += FRAME_SIZE << order;
        }
        assert_eq!(got, added);
        assert_eq!(b.free_bytes(), 0);
    }

    #[test]
    fn init_is_o_blocks_not_o_frames() {
        // 4 GiB: four 1 GiB blocks, not a million frames.
        let mut meta = storage(4 * GIB);
        let mut b = Buddy::new(&mut meta);
        b.add_range(0, 4 * GIB);
        assert_eq!(b.free_blocks()[MAX_ORDER], 4);
        assert_eq!(b.free_blocks().iter().sum::<u32>(), 4);
    }

    #[test]
    fn high_orders_are_aligned_to_their_size() {
        let mut meta = storage(3 * GIB);
        let mut b = Buddy::new(&mut meta);
        b.add_range(3 * MIB, 3 * GIB);
        let gib = b.alloc(MAX_ORDER).unwrap();
        assert_eq!(gib % GIB, 0);
        let two_mib = b.alloc(9).unwrap();
        assert_eq!(two_mib % (2 * MIB), 0);
    }

    #[test]
    fn splitting_then_freeing_merges_back_to_one_block() {
        let mut meta = storage(2 * MIB);
        let mut b = Buddy::new(&mut meta);
        b.add_range(0, 2 * MIB);
        let pages: Vec<u64> = (0..512).map(|_| b.alloc(0).unwrap()).collect();
        assert_eq!(b.alloc(0), None);
        assert_eq!(b.free_bytes(), 0);
        let mut sorted = pages.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 512, "no frame handed out twice");
        for p in pages.iter().rev() {
            b.free(*p, 0).unwrap();
        }
        assert_eq!(b.free_blocks()[9], 1);
        assert_eq!(b.free_blocks().iter().sum::<u32>(), 1);
        assert_eq!(b.alloc(9), Some(0));
    }

    #[test]
    fn a_split_block_is_shared_out_without_overlap() {
        let mut meta = storage(MIB);
        let mut b = Buddy::new(&mut meta);
        b.add_range(0, 64 * 1024);
        let a = b.alloc(2).unwrap();
        let c = b.alloc(1).unwrap();
        let d = b.alloc(0).unwrap();
        let e = b.alloc(3).unwrap();
        let ranges = [(a, 4), (c, 2), (d, 1), (e, 8)];
        for (i, x) in ranges.iter().enumerate() {
            for y in &ranges[i + 1..] {
                let (xs, xe) = (x.0, x.0 + x.1 * FRAME_SIZE);
                let (ys, ye) = (y.0, y.0 + y.1 * FRAME_SIZE);
                assert!(xe <= ys || ye <= xs, "{x:?} overlaps {y:?}");
            }
        }
    }

    #[test]
    fn exhaustion_returns_none_and_freed_frames_are_reused() {
        let mut meta = storage(MIB);
        let mut b = Buddy::new(&mut meta);
        b.add_range(0, 16 * 1024);
        let all: Vec<u64> = core::iter::from_fn(|| b.alloc(0)).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(b.alloc(0), None);
        assert_eq!(b.alloc(1), None);
        b.free(all[2], 0).unwrap();
        assert_eq!(b.alloc(0), Some(all[2]));
    }

    #[test]
    fn bad_frees_are_refused() {
        let mut meta = storage(MIB);
        let mut b = Buddy::new(&mut meta);
        b.add_range(0, MIB);
        assert_eq!(b.free(0x1000, 1), Err(BuddyError::Misaligned));
        assert_eq!(b.free(2 * MIB, 0), Err(BuddyError::OutOfRange));
        assert_eq!(b.free(0, MAX_ORDER + 1), Err(BuddyError::BadOrder));
        assert_eq!(b.free(0, 8), Err(BuddyError::DoubleFree));
        let p = b.alloc(0).unwrap();
        b.free(p, 0).unwrap();
        assert_eq!(b.free(p, 0), Err(BuddyError::DoubleFree));
    }

    #[test]
    fn adjacent_ranges_merge_across_the_seam() {
        let mut meta = storage(4 * MIB);
        let mut b = Buddy::new(&mut meta);
        b.add_range(0, MIB);
        b.add_range(MIB, 2 * MIB);
        assert_eq!(b.free_blocks()[9], 1);
        assert_eq!(b.free_blocks().iter().sum::<u32>(), 1);
    }

    #[test]
    fn a_range_added_in_pieces_ends_as_the_same_blocks_as_whole() {
        let mut whole = storage(64 * MIB);
        let mut pieces = storage(64 * MIB);
        let mut a = Buddy::new(&mut whole);
        let mut b = Buddy::new(&mut pieces);
        a.add_range(0x13_5000, 0x3f0_0000);
        for (s, e) in [(0x13_5000, 0x20_0000), (0x20_0000, 0x123_4000), (0x123_4000, 0x3f0_0000)] {
            b.add_range(s, e);
        }
        assert_eq!(a.free_blocks(), b.free_blocks());
        assert_eq!(a.free_bytes(), b.free_bytes());
        // And they hand out the same memory.
        let drain = |x: &mut Buddy| {
            let mut v: Vec<(u64, usize)> = core::iter::from_fn(|| x.alloc_largest()).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(drain(&mut a), drain(&mut b));
    }

    #[test]
    fn frames_beyond_the_storage_are_ignored() {
        let mut meta = storage(MIB);
        let mut b = Buddy::new(&mut meta);
        assert_eq!(b.add_range(0, 4 * MIB), MIB);
        assert_eq!(b.capacity_frames(), 256);
    }
}
