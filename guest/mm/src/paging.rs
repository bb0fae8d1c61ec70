//! x86-64 4-level paging: addresses, entries, building and walking tables.
//!
//! Owns the encoding of page-table entries (SDM Vol. 3A §4.5, Tables 4-15 to
//! 4-20), a [`Mapper`] that builds 4-level hierarchies with 4 KiB, 2 MiB and
//! 1 GiB leaves through the [`FrameMemory`] and [`FrameSource`] traits, and
//! [`walk`], which decodes one translation level by level through a
//! `read_u64` closure and says where and why it stops. It does not own
//! physical memory (the caller's frame source does) nor TLB maintenance (the
//! caller invalidates after changing live tables).

/// Entries per table at every level (SDM Vol. 3A §4.5: 512 8-byte entries).
pub const ENTRIES: usize = 512;
/// Size of a page-table page.
pub const TABLE_SIZE: u64 = 4096;

/// A guest-physical address (at most 52 bits, SDM Vol. 3A §4.1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysAddr(u64);

impl PhysAddr {
    /// The architectural maximum physical-address width.
    pub const MAX_BITS: u32 = 52;

    /// `addr` as a physical address, or `None` when it has bits above bit 51.
    #[must_use]
    pub const fn new(addr: u64) -> Option<Self> {
        if addr >> Self::MAX_BITS == 0 { Some(Self(addr)) } else { None }
    }

    /// `addr` with the bits above bit 51 cleared.
    #[must_use]
    pub const fn new_truncate(addr: u64) -> Self {
        Self(addr & ((1 << Self::MAX_BITS) - 1))
    }

    /// The raw value.
    #[must_use]
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Whether the address is a multiple of `align` (a power of two).
    #[must_use]
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

/// A canonical 48-bit virtual address: bits 63:47 all equal (SDM Vol. 1 §3.3.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(u64);

impl VirtAddr {
    /// `addr` as a virtual address, or `None` when it is not canonical.
    #[must_use]
    pub const fn new(addr: u64) -> Option<Self> {
        let top = addr >> 47;
        if top == 0 || top == 0x1_ffff { Some(Self(addr)) } else { None }
    }

    /// The raw value.
    #[must_use]
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The index into the table at `level` that translates this address.
    #[must_use]
    pub const fn index(self, level: Level) -> usize {
        ((self.0 >> level.shift()) & (ENTRIES as u64 - 1)) as usize
    }

    /// Whether the address is a multiple of `align` (a power of two).
    #[must_use]
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

/// A paging-structure level, named after the table it indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Page table: maps 4 KiB pages (VA bits 20:12).
    Pt = 1,
    /// Page directory: 2 MiB pages or page tables (VA bits 29:21).
    Pd = 2,
    /// Page-directory-pointer table: 1 GiB pages or directories (VA bits 38:30).
    Pdpt = 3,
    /// PML4: always points at a PDPT (VA bits 47:39).
    Pml4 = 4,
}

impl Level {
    /// Levels from the root down.
    pub const FROM_ROOT: [Level; 4] = [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt];

    /// The lowest VA bit this level's index uses.
    #[must_use]
    pub const fn shift(self) -> u32 {
        12 + 9 * (self as u32 - 1)
    }

    /// The level below, `None` for [`Level::Pt`].
    #[must_use]
    pub const fn next_down(self) -> Option<Level> {
        match self {
            Level::Pml4 => Some(Level::Pdpt),
            Level::Pdpt => Some(Level::Pd),
            Level::Pd => Some(Level::Pt),
            Level::Pt => None,
        }
    }
}

/// The three leaf sizes of 4-level paging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB: a PTE.
    Size4K,
    /// 2 MiB: a PDE with PS=1.
    Size2M,
    /// 1 GiB: a PDPTE with PS=1 (only if CPUID 8000_0001h EDX bit 26).
    Size1G,
}

impl PageSize {
    /// Sizes from the largest down.
    pub const LARGEST_FIRST: [PageSize; 3] = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K];

    /// Bytes in one page.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// log2 of [`PageSize::bytes`].
    #[must_use]
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// The size whose shift is `shift` (12, 21 or 30).
    #[must_use]
    pub const fn from_shift(shift: u32) -> Option<Self> {
        match shift {
            12 => Some(PageSize::Size4K),
            21 => Some(PageSize::Size2M),
            30 => Some(PageSize::Size1G),
            _ => None,
        }
    }

    /// The level whose entries are leaves of this size.
    #[must_use]
    pub const fn leaf_level(self) -> Level {
        match self {
            PageSize::Size4K => Level::Pt,
            PageSize::Size2M => Level::Pd,
            PageSize::Size1G => Level::Pdpt,
        }
    }

    /// Index of this size in per-size counters (`[4K, 2M, 1G]`).
    #[must_use]
    pub const fn counter_index(self) -> usize {
        match self {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size1G => 2,
        }
    }
}

/// One 8-byte paging-structure entry (SDM Vol. 3A §4.5, Tables 4-15..4-20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageTableEntry(pub u64);

impl PageTableEntry {
    /// Bit 0, P: present. When clear the CPU ignores every other bit.
    pub const PRESENT: u64 = 1 << 0;
    /// Bit 1, R/W: writes allowed (enforced at CPL0 too when CR0.WP=1).
    pub const WRITABLE: u64 = 1 << 1;
    /// Bit 2, U/S: user (CPL3) accesses allowed. Must be set at every level
    /// of a translation for CPL3 to use it.
    pub const USER: u64 = 1 << 2;
    /// Bit 3, PWT: page-level write-through (memory type, with PAT/PCD).
    pub const WRITE_THROUGH: u64 = 1 << 3;
    /// Bit 4, PCD: page-level cache disable.
    pub const CACHE_DISABLE: u64 = 1 << 4;
    /// Bit 5, A: accessed; set by the CPU on any use of the entry.
    pub const ACCESSED: u64 = 1 << 5;
    /// Bit 6, D: dirty; set by the CPU on a write through a leaf entry.
    pub const DIRTY: u64 = 1 << 6;
    /// Bit 7, PS: page size. Only in PDPT and PD entries, where it makes the
    /// entry a 1 GiB or 2 MiB leaf; reserved in PML4 entries; in a PTE the
    /// same bit is PAT.
    pub const HUGE: u64 = 1 << 7;
    /// Bit 8, G: global; only in leaves, effective with CR4.PGE.
    pub const GLOBAL: u64 = 1 << 8;
    /// Bit 63, XD/NX: instruction fetches not allowed (with EFER.NXE=1).
    pub const NO_EXECUTE: u64 = 1 << 63;
    /// Bits 51:12: the physical address of the next table or 4 KiB page.
    /// Leaves of 2 MiB / 1 GiB use bits 51:21 / 51:30; the bits below are
    /// PAT (bit 12) and reserved.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

    /// A present entry pointing at `phys` with `flags`.
    #[must_use]
    pub const fn new(phys: PhysAddr, flags: u64) -> Self {
        Self((phys.0 & Self::ADDR_MASK) | flags | Self::PRESENT)
    }

    /// Whether P is set.
    #[must_use]
    pub const fn is_present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }

    /// Whether PS is set (meaningful in PDPT and PD entries only).
    #[must_use]
    pub const fn is_huge(self) -> bool {
        self.0 & Self::HUGE != 0
    }

    /// The address field (bits 51:12).
    #[must_use]
    pub const fn addr(self) -> PhysAddr {
        PhysAddr(self.0 & Self::ADDR_MASK)
    }

    /// Whether every bit of `flags` is set.
    #[must_use]
    pub const fn has(self, flags: u64) -> bool {
        self.0 & flags == flags
    }
}

/// Access to page-table pages by physical address.
pub trait FrameMemory {
    /// The table stored in the 4 KiB frame at `phys`.
    fn table(&mut self, phys: PhysAddr) -> &mut [u64; ENTRIES];
}

/// Where new page-table pages come from.
pub trait FrameSource {
    /// A 4 KiB-aligned frame whose 512 entries are all zero, or `None` when
    /// out of frames. (The guest takes them from never-used RAM, which the
    /// VMM guarantees is zero, so it never has to clear them.)
    fn alloc_table(&mut self) -> Option<PhysAddr>;
}

/// What a [`Mapper`] has built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapStats {
    /// Page-table pages taken from the frame source.
    pub table_pages: u64,
    /// Leaf entries written, by size: `[4K, 2M, 1G]`.
    pub leaves: [u64; 3],
}

/// Why a mapping could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// Address or length is not a multiple of the page size.
    Misaligned,
    /// The frame source is exhausted.
    OutOfFrames,
    /// A larger leaf already covers part of the range.
    HugePageInTheWay(VirtAddr),
    /// A leaf is already present where a new one was asked for.
    AlreadyMapped(VirtAddr),
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MapError::Misaligned => f.write_str("address or length not page-aligned"),
            MapError::OutOfFrames => f.write_str("no frames left for page tables"),
            MapError::HugePageInTheWay(va) => write!(f, "a huge page already maps {:#x}", va.0),
            MapError::AlreadyMapped(va) => write!(f, "{:#x} is already mapped", va.0),
        }
    }
}

/// Builds 4-level hierarchies. Intermediate entries are P|RW, plus U/S when
/// a user leaf is mapped beneath them: permissions are decided by the leaves.
#[derive(Debug)]
pub struct Mapper<M, S> {
    /// Table memory.
    pub mem: M,
    /// Source of new tables.
    pub frames: S,
    /// Running totals.
    pub stats: MapStats,
}

impl<M: FrameMemory, S: FrameSource> Mapper<M, S> {
    /// A mapper over `mem` that takes new tables from `frames`.
    pub const fn new(mem: M, frames: S) -> Self {
        Self { mem, frames, stats: MapStats { table_pages: 0, leaves: [0; 3] } }
    }

    /// A new, empty root table (PML4).
    ///
    /// # Errors
    /// [`MapError::OutOfFrames`].
    pub fn new_root(&mut self) -> Result<PhysAddr, MapError> {
        let root = self.frames.alloc_table().ok_or(MapError::OutOfFrames)?;
        self.stats.table_pages += 1;
        Ok(root)
    }

    /// The table for `va` at `level` (below the root), created if missing.
    fn table_for(&mut self, root: PhysAddr, va: VirtAddr, level: Level, user: bool) -> Result<PhysAddr, MapError> {
        let mut table = root;
        let mut at = Level::Pml4;
        let up = if user { PageTableEntry::USER } else { 0 };
        while at != level {
            let index = va.index(at);
            let raw = self.mem.table(table)[index];
            let entry = PageTableEntry(raw);
            let next = if !entry.is_present() {
                let new = self.frames.alloc_table().ok_or(MapError::OutOfFrames)?;
                self.stats.table_pages += 1;
                self.mem.table(table)[index] = PageTableEntry::new(new, PageTableEntry::WRITABLE | up).0;
                new
            } else if at != Level::Pml4 && entry.is_huge() {
                return Err(MapError::HugePageInTheWay(va));
            } else {
                if user && raw & PageTableEntry::USER == 0 {
                    self.mem.table(table)[index] = raw | PageTableEntry::USER;
                }
                entry.addr()
            };
            table = next;
            at = match at.next_down() {
                Some(l) => l,
                None => break,
            };
        }
        Ok(table)
    }

    /// Maps one page of `size` at `va` to `phys` with `flags` (P is added;
    /// PS is added for 2 MiB and 1 GiB leaves).
    ///
    /// # Errors
    /// [`MapError`]: misaligned addresses, no frames, or something already there.
    pub fn map(&mut self, root: PhysAddr, va: VirtAddr, phys: PhysAddr, size: PageSize, flags: u64) -> Result<(), MapError> {
        if !va.is_aligned(size.bytes()) || !phys.is_aligned(size.bytes()) {
            return Err(MapError::Misaligned);
        }
        let level = size.leaf_level();
        let table = self.table_for(root, va, level, flags & PageTableEntry::USER != 0)?;
        let slot = &mut self.mem.table(table)[va.index(level)];
        if PageTableEntry(*slot).is_present() {
            return Err(MapError::AlreadyMapped(va));
        }
        let ps = if size == PageSize::Size4K { 0 } else { PageTableEntry::HUGE };
        *slot = PageTableEntry::new(phys, flags | ps).0;
        self.stats.leaves[size.counter_index()] += 1;
        Ok(())
    }

    /// The table that holds `size` leaves for `va` (a PT for 4 KiB, a PD for
    /// 2 MiB, a PDPT for 1 GiB), created with its parents if missing; with
    /// `user`, U/S is set on every entry leading to it.
    ///
    /// # Errors
    /// [`MapError::OutOfFrames`], or [`MapError::HugePageInTheWay`].
    pub fn leaf_table(&mut self, root: PhysAddr, va: VirtAddr, size: PageSize, user: bool) -> Result<PhysAddr, MapError> {
        self.table_for(root, va, size.leaf_level(), user)
    }

    /// Writes `count` consecutive leaves of `size` into `table` from entry
    /// `first`, mapping consecutive pages from `phys` with `flags` (P, and
    /// PS for large leaves, are added). A bulk write without checks: the
    /// entries must be free and `first + count` at most [`ENTRIES`]
    /// (indices beyond the table are ignored).
    pub fn fill(&mut self, table: PhysAddr, first: usize, count: usize, phys: PhysAddr, size: PageSize, flags: u64) {
        let ps = if size == PageSize::Size4K { 0 } else { PageTableEntry::HUGE };
        let end = (first + count).min(ENTRIES);
        let Some(entries) = self.mem.table(table).get_mut(first..end) else { return };
        let step = size.bytes();
        let mut value = PageTableEntry::new(phys, flags | ps).0;
        // Eight entries per iteration: ~2 instructions per entry, which is
        // what a ring-0 bulk mapping costs on a host that emulates ring 0.
        let mut chunks = entries.chunks_exact_mut(8);
        for c in &mut chunks {
            for (k, e) in c.iter_mut().enumerate() {
                *e = value + k as u64 * step;
            }
            value += 8 * step;
        }
        for e in chunks.into_remainder() {
            *e = value;
            value += step;
        }
        self.stats.leaves[size.counter_index()] += (end - first) as u64;
    }

    /// Maps `len` bytes at `va` to `phys`, using the largest leaf up to
    /// `max_size` that alignment and the remaining length allow (so 1 GiB
    /// leaves only where both addresses are 1 GiB-aligned).
    ///
    /// Built for ring 0 on hosts that emulate it: one walk per table, then a
    /// tight loop over that table's entries. The range must not be mapped
    /// yet; the bulk loop overwrites without checking.
    ///
    /// # Errors
    /// [`MapError`]: `va`, `phys` or `len` not 4 KiB-aligned, or no frames.
    pub fn map_range(&mut self, root: PhysAddr, va: VirtAddr, phys: PhysAddr, len: u64, max_size: PageSize, flags: u64) -> Result<(), MapError> {
        if !va.is_aligned(TABLE_SIZE) || !phys.is_aligned(TABLE_SIZE) || !len.is_multiple_of(TABLE_SIZE) {
            return Err(MapError::Misaligned);
        }
        let user = flags & PageTableEntry::USER != 0;
        let (mut v, mut p, end) = (va.0, phys.0, va.0 + len);
        while v < end {
            let size = PageSize::LARGEST_FIRST
                .into_iter()
                .find(|s| *s <= max_size && (v | p) & (s.bytes() - 1) == 0 && end - v >= s.bytes())
                .unwrap_or(PageSize::Size4K);
            let level = size.leaf_level();
            let vaddr = VirtAddr::new(v).ok_or(MapError::Misaligned)?;
            let table = self.table_for(root, vaddr, level, user)?;
            let step = size.bytes();
            // Entries of this table we can fill with this size.
            let first = vaddr.index(level);
            let room = (ENTRIES - first) as u64;
            let mut n = ((end - v) / step).min(room);
            // A larger leaf may become possible further on (e.g. 4K leaves up
            // to the next 2M boundary): stop there.
            if size != max_size {
                let bigger = step << 9;
                let to_boundary = (bigger - (v & (bigger - 1))) / step;
                if (v ^ p) & (bigger - 1) == 0 {
                    n = n.min(to_boundary);
                }
            }
            self.fill(table, first, n as usize, PhysAddr(p), size, flags);
            v += n * step;
            p += n * step;
        }
        Ok(())
    }
}

/// Why a [`walk`] stopped before reaching a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkStop {
    /// The entry at this level has P=0.
    NotPresent,
    /// The entry has reserved bits set (the CPU would raise #PF with RSVD);
    /// `bits` are the offending ones.
    ReservedBits {
        /// The reserved bits that were set.
        bits: u64,
    },
    /// The table this level should read lies outside memory: `read_u64` said no.
    TableOutsideMemory,
}

/// One level of a [`walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkStep {
    /// Which table.
    pub level: Level,
    /// Physical address of the table.
    pub table: PhysAddr,
    /// Index used in it.
    pub index: usize,
    /// The entry read, `None` when the table could not be read.
    pub entry: Option<PageTableEntry>,
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The physical address `va` translates to.
    pub phys: PhysAddr,
    /// Size of the leaf.
    pub size: PageSize,
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// NX set at some level.
    pub no_execute: bool,
}

/// The result of [`walk`]: the steps taken and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Steps from the root; only the first `len` are meaningful.
    pub steps: [Option<WalkStep>; 4],
    /// The translation, or the level and reason it stopped.
    pub result: Result<Translation, (Level, WalkStop)>,
}

impl Walk {
    /// The steps taken, from the root down.
    pub fn steps(&self) -> impl Iterator<Item = &WalkStep> {
        self.steps.iter().flatten()
    }
}

/// The reserved bits of `entry` at `level` for a CPU with `phys_bits`
/// physical-address bits (SDM Vol. 3A §4.5, Tables 4-14..4-20; bits 62:52
/// are ignored or protection keys, so never reserved here; NXE assumed on).
#[must_use]
pub const fn reserved_bits(entry: PageTableEntry, level: Level, phys_bits: u32) -> u64 {
    let above_maxphy = if phys_bits >= 52 { 0 } else { ((1u64 << 52) - 1) & !((1u64 << phys_bits) - 1) };
    let huge_low = match level {
        Level::Pml4 => return entry.0 & (above_maxphy | PageTableEntry::HUGE),
        Level::Pdpt if entry.is_huge() => 0x3fff_e000,
        Level::Pd if entry.is_huge() => 0x001f_e000,
        _ => 0,
    };
    entry.0 & (above_maxphy | huge_low)
}

/// Decodes the translation of `va` under the tables at `root`, reading each
/// entry through `read_u64(phys)` (`None` when `phys` is not memory).
#[must_use]
pub fn walk(root: PhysAddr, va: VirtAddr, phys_bits: u32, mut read_u64: impl FnMut(PhysAddr) -> Option<u64>) -> Walk {
    let mut steps = [None; 4];
    let (mut writable, mut user, mut no_execute) = (true, true, false);
    let mut table = root;
    for (i, level) in Level::FROM_ROOT.into_iter().enumerate() {
        let index = va.index(level);
        let raw = read_u64(PhysAddr::new_truncate(table.0 + 8 * index as u64));
        steps[i] = Some(WalkStep { level, table, index, entry: raw.map(PageTableEntry) });
        let Some(raw) = raw else {
            return Walk { steps, result: Err((level, WalkStop::TableOutsideMemory)) };
        };
        let entry = PageTableEntry(raw);
        if !entry.is_present() {
            return Walk { steps, result: Err((level, WalkStop::NotPresent)) };
        }
        let bits = reserved_bits(entry, level, phys_bits);
        if bits != 0 {
            return Walk { steps, result: Err((level, WalkStop::ReservedBits { bits })) };
        }
        writable &= entry.has(PageTableEntry::WRITABLE);
        user &= entry.has(PageTableEntry::USER);
        no_execute |= entry.has(PageTableEntry::NO_EXECUTE);
        let leaf_size = match level {
            Level::Pt => Some(PageSize::Size4K),
            Level::Pd if entry.is_huge() => Some(PageSize::Size2M),
            Level::Pdpt if entry.is_huge() => Some(PageSize::Size1G),
            _ => None,
        };
        if let Some(size) = leaf_size {
            let base = entry.0 & PageTableEntry::ADDR_MASK & !(size.bytes() - 1);
            let phys = PhysAddr(base | (va.0 & (size.bytes() - 1)));
            return Walk { steps, result: Ok(Translation { phys, size, writable, user, no_execute }) };
        }
        table = entry.addr();
    }
    // Unreachable: a PT entry that is present is always a leaf.
    Walk { steps, result: Err((Level::Pt, WalkStop::NotPresent)) }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    use super::*;

    /// Fake RAM: tables by physical address, frames handed out upwards.
    #[derive(Default)]
    struct FakeMemory {
        tables: BTreeMap<u64, [u64; ENTRIES]>,
    }

    impl FrameMemory for &mut FakeMemory {
        fn table(&mut self, phys: PhysAddr) -> &mut [u64; ENTRIES] {
            self.tables.entry(phys.as_u64()).or_insert([0; ENTRIES])
        }
    }

    struct Bump {
        next: u64,
        end: u64,
    }

    impl FrameSource for Bump {
        fn alloc_table(&mut self) -> Option<PhysAddr> {
            if self.next >= self.end {
                return None;
            }
            self.next += TABLE_SIZE;
            PhysAddr::new(self.next - TABLE_SIZE)
        }
    }

    fn read(mem: &FakeMemory) -> impl FnMut(PhysAddr) -> Option<u64> + '_ {
        |p| mem.tables.get(&(p.as_u64() & !0xfff)).map(|t| t[(p.as_u64() as usize & 0xfff) / 8])
    }

    fn va(a: u64) -> VirtAddr {
        VirtAddr::new(a).unwrap()
    }

    fn pa(a: u64) -> PhysAddr {
        PhysAddr::new(a).unwrap()
    }

    #[test]
    fn virtual_addresses_must_be_canonical() {
        assert!(VirtAddr::new(0x0000_7fff_ffff_ffff).is_some());
        assert!(VirtAddr::new(0xffff_8000_0000_0000).is_some());
        assert!(VirtAddr::new(0x0000_8000_0000_0000).is_none());
        assert!(VirtAddr::new(0xfff0_0000_0000_0000).is_none());
        assert!(PhysAddr::new(1 << 52).is_none());
    }

    #[test]
    fn indices_come_from_the_right_bits() {
        let v = va((3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x123);
        assert_eq!(v.index(Level::Pml4), 3);
        assert_eq!(v.index(Level::Pdpt), 5);
        assert_eq!(v.index(Level::Pd), 7);
        assert_eq!(v.index(Level::Pt), 9);
    }

    #[test]
    fn entries_encode_address_and_flags() {
        let e = PageTableEntry::new(pa(0x1234_5000), PageTableEntry::WRITABLE | PageTableEntry::NO_EXECUTE);
        assert_eq!(e.0, 0x8000_0000_1234_5003);
        assert_eq!(e.addr(), pa(0x1234_5000));
        assert!(e.is_present() && !e.is_huge());
        // Stray low bits of the address do not leak into the flags.
        assert_eq!(PageTableEntry::new(pa(0x1fff), 0).0, 0x1001);
    }

    #[test]
    fn mapping_4k_builds_three_tables_below_the_root() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x20_0000 });
        let root = m.new_root().unwrap();
        m.map(root, va(0x40_1000), pa(0x9000), PageSize::Size4K, PageTableEntry::WRITABLE).unwrap();
        assert_eq!(m.stats, MapStats { table_pages: 4, leaves: [1, 0, 0] });
        let w = walk(root, va(0x40_1abc), 46, read(&mem));
        let t = w.result.unwrap();
        assert_eq!(t.phys, pa(0x9abc));
        assert_eq!(t.size, PageSize::Size4K);
        assert!(t.writable && !t.user && !t.no_execute);
        assert_eq!(w.steps().count(), 4);
    }

    #[test]
    fn user_leaves_set_user_at_every_level() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x20_0000 });
        let root = m.new_root().unwrap();
        m.map(root, va(0x1000), pa(0x1000), PageSize::Size4K, 0).unwrap();
        m.map(root, va(0x2000), pa(0x2000), PageSize::Size4K, PageTableEntry::USER).unwrap();
        let w = walk(root, va(0x2000), 46, read(&mem));
        assert!(w.steps().all(|s| s.entry.unwrap().has(PageTableEntry::USER)));
        assert!(w.result.unwrap().user);
        // The supervisor leaf beside it stays supervisor-only.
        assert!(!walk(root, va(0x1000), 46, read(&mem)).result.unwrap().user);
    }

    #[test]
    fn map_range_uses_the_largest_leaf_alignment_allows() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x40_0000 });
        let root = m.new_root().unwrap();
        // 4 KiB below the 2 MiB boundary, two 2 MiB pages, one 1 GiB page, 4 KiB tail.
        let start = (1u64 << 30) - 0x40_1000;
        let len = 0x1000 + 0x40_0000 + (1 << 30) + 0x1000;
        m.map_range(root, va(start), pa(start), len, PageSize::Size1G, 0).unwrap();
        assert_eq!(m.stats.leaves, [2, 2, 1]);
        // The 4K page just before the 2 MiB boundary.
        assert_eq!(walk(root, va(start), 46, read(&mem)).result.unwrap().size, PageSize::Size4K);
        let t = walk(root, va(start + 0x1000 + 0x12_3456), 46, read(&mem)).result.unwrap();
        assert_eq!((t.size, t.phys), (PageSize::Size2M, pa(start + 0x1000 + 0x12_3456)));
        let t = walk(root, va((1 << 30) + 0x3456_789a), 46, read(&mem)).result.unwrap();
        assert_eq!((t.size, t.phys), (PageSize::Size1G, pa((1 << 30) + 0x3456_789a)));
        let tail = start + len - 0x1000;
        assert_eq!(walk(root, va(tail), 46, read(&mem)).result.unwrap().phys, pa(tail));
    }

    #[test]
    fn map_range_caps_the_leaf_size() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x40_0000 });
        let root = m.new_root().unwrap();
        m.map_range(root, va(1 << 30), pa(1 << 30), 4 << 20, PageSize::Size4K, PageTableEntry::USER).unwrap();
        assert_eq!(m.stats.leaves, [1024, 0, 0]);
        // Root, PDPT, PD and two PTs.
        assert_eq!(m.stats.table_pages, 5);
        for off in (0..4 << 20).step_by(0x1000) {
            let t = walk(root, va((1 << 30) + off), 46, read(&*m.mem)).result.unwrap();
            assert_eq!(t.phys, pa((1 << 30) + off));
        }
        m.map_range(root, va(2 << 30), pa(8 << 20), 4 << 20, PageSize::Size2M, 0).unwrap();
        assert_eq!(m.stats.leaves, [1024, 2, 0]);
    }

    #[test]
    fn map_range_with_different_va_and_pa_alignment_falls_back_to_4k() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x40_0000 });
        let root = m.new_root().unwrap();
        m.map_range(root, va(0x20_0000), pa(0x20_1000), 0x40_0000, PageSize::Size2M, 0).unwrap();
        assert_eq!(m.stats.leaves, [1024, 0, 0]);
        assert_eq!(walk(root, va(0x5f_f000), 46, read(&mem)).result.unwrap().phys, pa(0x60_0000));
    }

    #[test]
    fn leaf_table_then_fill_maps_a_run_of_pages() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x20_0000 });
        let root = m.new_root().unwrap();
        let pt = m.leaf_table(root, va(0x40_0000), PageSize::Size4K, true).unwrap();
        m.fill(pt, 3, 2, pa(0x9000), PageSize::Size4K, PageTableEntry::WRITABLE);
        // Past the end of the table: clipped, not a panic.
        m.fill(pt, 511, 5, pa(0xa000), PageSize::Size4K, 0);
        assert_eq!(m.stats.leaves, [3, 0, 0]);
        let w = walk(root, va(0x40_4010), 46, read(&*m.mem));
        assert_eq!(w.result.unwrap().phys, pa(0xa010));
        // leaf_table(user) sets U on the way down; the leaf's U/S is the caller's.
        assert!(w.steps().take(3).all(|s| s.entry.unwrap().has(PageTableEntry::USER)));
        assert!(!w.result.unwrap().user);
        assert_eq!(walk(root, va(0x40_5000), 46, read(&*m.mem)).result, Err((Level::Pt, WalkStop::NotPresent)));
    }

    #[test]
    fn mapping_twice_or_under_a_huge_page_is_refused() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x20_0000 });
        let root = m.new_root().unwrap();
        m.map(root, va(0x20_0000), pa(0x20_0000), PageSize::Size2M, 0).unwrap();
        assert_eq!(m.map(root, va(0x20_0000), pa(0), PageSize::Size2M, 0), Err(MapError::AlreadyMapped(va(0x20_0000))));
        assert_eq!(m.map(root, va(0x20_1000), pa(0), PageSize::Size4K, 0), Err(MapError::HugePageInTheWay(va(0x20_1000))));
        assert_eq!(m.map(root, va(0x1000), pa(0x800), PageSize::Size4K, 0), Err(MapError::Misaligned));
    }

    #[test]
    fn running_out_of_table_frames_is_an_error() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x10_2000 });
        let root = m.new_root().unwrap();
        assert_eq!(m.map(root, va(0), pa(0), PageSize::Size4K, 0), Err(MapError::OutOfFrames));
    }

    #[test]
    fn walk_reports_where_and_why_it_stops() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x20_0000 });
        let root = m.new_root().unwrap();
        m.map(root, va(0x40_0000), pa(0x40_0000), PageSize::Size2M, 0).unwrap();
        let _ = m;
        // Not present at the PD level.
        let w = walk(root, va(0x80_0000), 46, read(&mem));
        assert_eq!(w.result, Err((Level::Pd, WalkStop::NotPresent)));
        assert_eq!(w.steps().count(), 3);
        // Not present at the root.
        assert_eq!(walk(root, va(1 << 39), 46, read(&mem)).result, Err((Level::Pml4, WalkStop::NotPresent)));
        // Reserved bits in a 2 MiB leaf (bit 13) and above MAXPHYADDR.
        let pd = walk(root, va(0x40_0000), 46, read(&mem)).steps[2].unwrap().table;
        mem.tables.get_mut(&pd.as_u64()).unwrap()[2] |= 1 << 13;
        let w = walk(root, va(0x40_0000), 46, read(&mem));
        assert_eq!(w.result, Err((Level::Pd, WalkStop::ReservedBits { bits: 1 << 13 })));
        mem.tables.get_mut(&pd.as_u64()).unwrap()[2] ^= (1 << 13) | (1 << 47);
        let w = walk(root, va(0x40_0000), 46, read(&mem));
        assert_eq!(w.result, Err((Level::Pd, WalkStop::ReservedBits { bits: 1 << 47 })));
        // A table outside memory.
        mem.tables.get_mut(&pd.as_u64()).unwrap()[3] = 0x7777_0000 | 1;
        let w = walk(root, va(0x60_0000), 46, read(&mem));
        assert_eq!(w.result, Err((Level::Pt, WalkStop::TableOutsideMemory)));
        assert_eq!(w.steps[3].unwrap().table, pa(0x7777_0000));
        assert_eq!(w.steps[3].unwrap().entry, None);
    }

    #[test]
    fn higher_half_addresses_map_and_walk() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x20_0000 });
        let root = m.new_root().unwrap();
        let base = 0xffff_8000_0000_0000;
        m.map_range(root, va(base), pa(0), 4 << 30, PageSize::Size1G, PageTableEntry::NO_EXECUTE).unwrap();
        assert_eq!(m.stats.leaves, [0, 0, 4]);
        let w = walk(root, va(base + (3 << 30) + 0x1234_5678), 46, read(&*m.mem));
        assert_eq!(w.steps[0].unwrap().index, 256);
        let t = w.result.unwrap();
        assert_eq!((t.phys, t.size, t.no_execute), (pa((3 << 30) + 0x1234_5678), PageSize::Size1G, true));
    }

    #[test]
    fn reserved_bits_depend_on_level_and_page_size() {
        let huge = PageTableEntry(PageTableEntry::PRESENT | PageTableEntry::HUGE | (1 << 20));
        // Bit 20 is reserved in both large leaves (29:13 and 20:13), bit 21 only in 1 GiB ones.
        assert_eq!(reserved_bits(huge, Level::Pdpt, 46), 1 << 20);
        assert_eq!(reserved_bits(huge, Level::Pd, 46), 1 << 20);
        let bit21 = PageTableEntry(PageTableEntry::PRESENT | PageTableEntry::HUGE | (1 << 21));
        assert_eq!(reserved_bits(bit21, Level::Pdpt, 46), 1 << 21);
        assert_eq!(reserved_bits(bit21, Level::Pd, 46), 0);
        // PS is reserved in a PML4 entry; the PAT bit (12) of a 2 MiB leaf is not.
        assert_eq!(reserved_bits(PageTableEntry(PageTableEntry::PRESENT | PageTableEntry::HUGE), Level::Pml4, 46), PageTableEntry::HUGE);
        assert_eq!(reserved_bits(PageTableEntry(PageTableEntry::PRESENT | PageTableEntry::HUGE | (1 << 12)), Level::Pd, 46), 0);
        // Address bits at or above MAXPHYADDR, at any level; none with 52 bits.
        let high = PageTableEntry(PageTableEntry::PRESENT | (1 << 40));
        assert_eq!(reserved_bits(high, Level::Pt, 39), 1 << 40);
        assert_eq!(reserved_bits(high, Level::Pt, 52), 0);
    }

    #[test]
    fn walk_combines_permissions_across_levels() {
        let mut mem = FakeMemory::default();
        let mut m = Mapper::new(&mut mem, Bump { next: 0x10_0000, end: 0x20_0000 });
        let root = m.new_root().unwrap();
        let flags = PageTableEntry::USER | PageTableEntry::WRITABLE;
        m.map(root, va(0x1000), pa(0x5000), PageSize::Size4K, flags).unwrap();
        let _ = m;
        let pt = walk(root, va(0x1000), 46, read(&mem)).steps[1].unwrap().table;
        // Clearing R/W or setting NX on an upper level applies to the leaf.
        mem.tables.get_mut(&pt.as_u64()).unwrap()[0] &= !PageTableEntry::WRITABLE;
        mem.tables.get_mut(&pt.as_u64()).unwrap()[0] |= PageTableEntry::NO_EXECUTE;
        let t = walk(root, va(0x1000), 46, read(&mem)).result.unwrap();
        assert!(!t.writable && t.user && t.no_execute);
        let levels: Vec<_> = walk(root, va(0x1000), 46, read(&mem)).steps().map(|s| s.level).collect();
        assert_eq!(levels, Level::FROM_ROOT);
    }
}
