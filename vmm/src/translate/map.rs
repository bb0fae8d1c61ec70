//! `vmm translate --map`: every mapping of an address space as merged
//! ranges, like `/proc/PID/maps`.
//!
//! A depth-first walk of the tables from CR3 (entries read through a
//! closure, so it is testable without KVM); consecutive leaves merge into
//! one range when they continue each other both virtually and physically
//! with the same effective permissions and leaf size. Tables are counted
//! so that a looping hierarchy ends with an error instead of running for
//! ever.

use serde::Serialize;

use memvisor_guest_mm::paging::{ENTRIES, Level, PageTableEntry as Pte, reserved_bits};

use super::TranslateError;

/// Most tables `--map` reads: a guest with 128 GiB mapped by 4 KiB
/// leaves has ~65k page tables.
pub const MAX_TABLES: usize = 1 << 16;

/// One merged range of mappings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapRange {
    /// First guest-virtual address.
    pub start: u64,
    /// Last guest-virtual address, inclusive: a range can end at the top of
    /// the address space, where "one past the last" does not fit in 64 bits.
    pub last: u64,
    /// Guest-physical address of `start`.
    pub gpa: u64,
    /// Leaf size in bytes.
    pub leaf_bytes: u64,
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// Not executable (NX at some level).
    pub no_execute: bool,
    /// Global (G in the leaf).
    pub global: bool,
}

impl MapRange {
    /// `rwx`-style permissions plus `u`/`s` and `g`.
    #[must_use]
    pub fn perms(&self) -> String {
        format!(
            "r{}{}{}{}",
            if self.writable { 'w' } else { '-' },
            if self.no_execute { '-' } else { 'x' },
            if self.user { 'u' } else { 's' },
            if self.global { 'g' } else { '-' }
        )
    }

    /// Bytes covered (at most 2^47 for one canonical half, so no overflow).
    #[must_use]
    pub const fn bytes(&self) -> u64 {
        self.last - self.start + 1
    }

    fn continues(&self, next: &MapRange) -> bool {
        self.last.checked_add(1) == Some(next.start)
            && self.gpa.checked_add(self.bytes()) == Some(next.gpa)
            && (self.leaf_bytes, self.writable, self.user, self.no_execute, self.global)
                == (next.leaf_bytes, next.writable, next.user, next.no_execute, next.global)
    }
}

/// Sign-extends a 48-bit address (the canonical form).
const fn canonical(va: u64) -> u64 {
    if va & (1 << 47) != 0 { va | 0xffff_0000_0000_0000 } else { va }
}

struct Walker<F> {
    read: F,
    tables: usize,
    max_tables: usize,
    phys_bits: u32,
    out: Vec<MapRange>,
}

impl<F: FnMut(u64) -> Option<u64>> Walker<F> {
    fn push(&mut self, r: MapRange) {
        match self.out.last_mut() {
            Some(prev) if prev.continues(&r) => prev.last = r.last,
            _ => self.out.push(r),
        }
    }

    fn table(&mut self, table: u64, level: Level, base: u64, perms: (bool, bool, bool)) -> Result<(), TranslateError> {
        self.tables += 1;
        if self.tables > self.max_tables {
            return Err(TranslateError::TooManyTables(self.max_tables));
        }
        for i in 0..ENTRIES {
            // A table outside RAM maps nothing we can show.
            let Some(raw) = (self.read)(table + 8 * i as u64) else { return Ok(()) };
            let e = Pte(raw);
            // The CPU would fault on reserved bits: nothing is mapped there.
            if !e.is_present() || reserved_bits(e, level, self.phys_bits) != 0 {
                continue;
            }
            let va = base | ((i as u64) << level.shift());
            let (w, u, nx) = (perms.0 && e.has(Pte::WRITABLE), perms.1 && e.has(Pte::USER), perms.2 || e.has(Pte::NO_EXECUTE));
            let leaf = level == Level::Pt || (e.is_huge() && matches!(level, Level::Pd | Level::Pdpt));
            if leaf {
                let size = 1u64 << level.shift();
                let gpa = raw & Pte::ADDR_MASK & !(size - 1);
                let start = canonical(va);
                // `start` is aligned to `size`, so this cannot wrap, even for
                // the last leaf of the address space.
                self.push(MapRange { start, last: start | (size - 1), gpa, leaf_bytes: size, writable: w, user: u, no_execute: nx, global: e.has(Pte::GLOBAL) });
            } else if let Some(down) = level.next_down() {
                self.table(e.addr().as_u64(), down, va, (w, u, nx))?;
            }
        }
        Ok(())
    }
}

/// Every mapping under the PML4 at `root`, merged, in address order;
/// entries with reserved bits for a CPU of `phys_bits` address bits are
/// skipped (the CPU would fault on them).
///
/// # Errors
/// [`TranslateError::TooManyTables`].
pub fn mappings(root: u64, phys_bits: u32, read: impl FnMut(u64) -> Option<u64>) -> Result<Vec<MapRange>, TranslateError> {
    mappings_up_to(root, phys_bits, read, MAX_TABLES)
}

/// [`mappings`] reading at most `max_tables` tables.
///
/// # Errors
/// [`TranslateError::TooManyTables`].
pub fn mappings_up_to(root: u64, phys_bits: u32, read: impl FnMut(u64) -> Option<u64>, max_tables: usize) -> Result<Vec<MapRange>, TranslateError> {
    let mut w = Walker { read, tables: 0, max_tables, phys_bits, out: Vec::new() };
    w.table(root & Pte::ADDR_MASK, Level::Pml4, 0, (true, true, false))?;
    Ok(w.out)
}

/// The ranges as text, one per line: `first-last` (both inclusive).
#[must_use]
pub fn to_text(ranges: &[MapRange]) -> String {
    let mut s = String::new();
    for r in ranges {
        let size = match r.leaf_bytes {
            0x4000_0000 => "1G",
            0x20_0000 => "2M",
            _ => "4K",
        };
        s.push_str(&format!(
            "{:016x}-{:016x} {} {size} gpa {:#014x} ({} pages)\n",
            r.start,
            r.last,
            r.perms(),
            r.gpa,
            r.bytes() / r.leaf_bytes
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use memvisor_guest_mm::paging::{FrameMemory, FrameSource, Mapper, PageSize, PhysAddr, VirtAddr};

    use super::*;

    #[derive(Default)]
    struct Mem(BTreeMap<u64, [u64; ENTRIES]>);
    impl FrameMemory for &mut Mem {
        fn table(&mut self, phys: PhysAddr) -> &mut [u64; ENTRIES] {
            self.0.entry(phys.as_u64()).or_insert([0; ENTRIES])
        }
    }
    struct Bump(u64);
    impl FrameSource for Bump {
        fn alloc_table(&mut self) -> Option<PhysAddr> {
            self.0 += 4096;
            PhysAddr::new(self.0)
        }
    }

    fn read(m: &Mem) -> impl FnMut(u64) -> Option<u64> + '_ {
        |p| m.0.get(&(p & !0xfff)).map(|t| t[(p as usize & 0xfff) / 8])
    }

    #[test]
    fn contiguous_leaves_merge_and_permission_changes_split() {
        let mut mem = Mem::default();
        let mut m = Mapper::new(&mut mem, Bump(0x100_0000));
        let root = m.new_root().unwrap();
        let va = |a| VirtAddr::new(a).unwrap();
        let pa = |a| PhysAddr::new(a).unwrap();
        m.map_range(root, va(0x40_0000), pa(0x80_0000), 0x4000, PageSize::Size4K, Pte::WRITABLE).unwrap();
        m.map_range(root, va(0x40_4000), pa(0x80_4000), 0x1000, PageSize::Size4K, 0).unwrap();
        m.map_range(root, va(0xffff_8000_0000_0000), pa(0), 4 << 20, PageSize::Size2M, Pte::WRITABLE | Pte::NO_EXECUTE).unwrap();
        let _ = m;
        let r = mappings(root.as_u64(), 46, read(&mem)).unwrap();
        assert_eq!(r.len(), 3, "{r:#?}");
        assert_eq!((r[0].start, r[0].last, r[0].gpa, r[0].perms().as_str()), (0x40_0000, 0x40_3fff, 0x80_0000, "rwxs-"));
        assert_eq!((r[1].start, r[1].last, r[1].perms().as_str()), (0x40_4000, 0x40_4fff, "r-xs-"));
        assert_eq!((r[2].start, r[2].last, r[2].leaf_bytes), (0xffff_8000_0000_0000, 0xffff_8000_003f_ffff, 2 << 20));
        assert!(to_text(&r).contains("ffff800000000000-ffff8000003fffff rw-s- 2M"));
        // A PML4E with PS set (reserved) maps nothing.
        mem.0.get_mut(&root.as_u64()).unwrap()[7] = root.as_u64() | Pte::PRESENT | Pte::HUGE;
        assert_eq!(mappings(root.as_u64(), 46, read(&mem)).unwrap().len(), 3);
    }

    /// Hand-built tables mapping the last leaf of the address space (PML4
    /// index 511, PDPT 511, ...) with a leaf of `level`, and a neighbour just
    /// below it so merging runs at the top too.
    fn top_leaf(level: Level) -> Vec<MapRange> {
        let p = Pte::PRESENT | Pte::WRITABLE;
        let mut mem = Mem::default();
        let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
        fn table(mem: &mut Mem, at: u64) -> &mut [u64; ENTRIES] {
            mem.0.entry(at).or_insert([0; ENTRIES])
        }
        table(&mut mem, pml4)[511] = pdpt | p;
        let (t, leaf, bytes) = match level {
            Level::Pdpt => (pdpt, Pte::HUGE, 1u64 << 30),
            Level::Pd => {
                table(&mut mem, pdpt)[511] = pd | p;
                (pd, Pte::HUGE, 2 << 20)
            }
            _ => {
                table(&mut mem, pdpt)[511] = pd | p;
                table(&mut mem, pd)[511] = pt | p;
                (pt, 0, 4096)
            }
        };
        let frame = 0x4000_0000;
        table(&mut mem, t)[510] = (frame - bytes) | p | leaf;
        table(&mut mem, t)[511] = frame | p | leaf;
        mappings(pml4, 46, read(&mem)).unwrap()
    }

    #[test]
    fn the_last_leaf_of_the_address_space_ends_at_the_top_without_overflow() {
        for (level, bytes) in [(Level::Pt, 4096u64), (Level::Pd, 2 << 20), (Level::Pdpt, 1 << 30)] {
            let r = top_leaf(level);
            assert_eq!(r.len(), 1, "two leaves continuing each other merge: {r:#?}");
            assert_eq!((r[0].start, r[0].last, r[0].leaf_bytes), (0u64.wrapping_sub(2 * bytes), u64::MAX, bytes));
            assert_eq!((r[0].gpa, r[0].bytes()), (0x4000_0000 - bytes, 2 * bytes));
            let text = to_text(&r);
            assert!(text.contains("-ffffffffffffffff rw") && text.contains("(2 pages)"), "{text}");
        }
    }

    #[test]
    fn a_table_that_points_at_itself_ends_with_an_error() {
        let mut mem = Mem::default();
        // PML4 at 0x1000 whose every entry points back at itself: each level
        // reads 512 more copies of it.
        mem.0.insert(0x1000, [0x1000 | Pte::PRESENT; ENTRIES]);
        assert!(matches!(mappings_up_to(0x1000, 46, read(&mem), 100), Err(TranslateError::TooManyTables(100))));
    }
}
