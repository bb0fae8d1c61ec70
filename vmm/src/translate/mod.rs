//! `vmm translate`: how a guest-virtual address becomes a host-physical one,
//! level by level.
//!
//! Owns the explanation of one translation ([`explain`]): the guest's walk
//! from CR3 (the pure walk of `memvisor_guest_mm::paging::walk`, reading
//! guest memory through vm-memory), then for every guest-physical address it
//! touched — each table and the final page — the memslot, host-virtual
//! address and host frame ([`host`]), the count of memory references native,
//! nested and shadow walks would cost ([`cost`]), and a cross-check of the
//! guest-physical result against `KVM_TRANSLATE`. [`map`] lists every
//! mapping as merged ranges. It runs on the vCPU thread (it needs the vCPU's
//! registers) and does not change guest state. Text rendering is in [`text`].

pub mod cost;
pub mod host;
pub mod map;
pub mod probe;
pub mod ready;
pub mod text;

pub use ready::ReadyTranslation;

use kvm_ioctls::VcpuFd;
use serde::Serialize;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use memvisor_guest_mm::paging::{self, Level, PageTableEntry as Pte, PhysAddr, VirtAddr, WalkStop};

use crate::host::TranslationMode;
use crate::memory::GuestRam;
use crate::x86::{CR0_PG, CR4_LA57, CR4_PAE, EFER_LMA};

/// CR3 bits 51:12 hold the PML4's address (SDM Vol. 3A §4.5, Table 4-12).
const CR3_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// CPUID leaf with MAXPHYADDR in EAX[7:0] (SDM Vol. 2A, CPUID).
const CPUID_ADDR_SIZES: u32 = 0x8000_0008;

/// Why a translation could not be explained.
#[derive(Debug, Error)]
pub enum TranslateError {
    /// The address is not canonical.
    #[error("{0:#x} is not a canonical address: bits 63:47 must all equal bit 47 under 4-level paging")]
    NonCanonical(u64),
    /// The guest has not enabled 4-level long-mode paging.
    #[error("the guest is not in 4-level long-mode paging (CR0 {cr0:#x}, CR4 {cr4:#x}, EFER {efer:#x})")]
    NotLongMode {
        /// CR0.
        cr0: u64,
        /// CR4.
        cr4: u64,
        /// EFER.
        efer: u64,
    },
    /// An entry on the way has P=0.
    #[error("{gva:#x} is not mapped: the walk stopped at the {level} at index {index} (guest-physical {entry_gpa:#x}), which is not present (P=0, value {raw:#x})")]
    NotMapped {
        /// The address.
        gva: u64,
        /// Level name.
        level: &'static str,
        /// Index in the table.
        index: usize,
        /// Where the entry is.
        entry_gpa: u64,
        /// Its value.
        raw: u64,
    },
    /// An entry has reserved bits set.
    #[error("{gva:#x}: the walk stopped at the {level} at index {index} (value {raw:#x}): reserved bits {bits:#x} are set, so the CPU would raise #PF with RSVD=1")]
    ReservedBits {
        /// The address.
        gva: u64,
        /// Level name.
        level: &'static str,
        /// Index in the table.
        index: usize,
        /// Its value.
        raw: u64,
        /// The offending bits.
        bits: u64,
    },
    /// A table lies outside guest RAM.
    #[error("{gva:#x}: the walk stopped at the {level} table, whose guest-physical address {table:#x} lies outside guest RAM")]
    TableOutsideRam {
        /// The address.
        gva: u64,
        /// Level name.
        level: &'static str,
        /// The table's address.
        table: u64,
    },
    /// Reading the vCPU's registers failed.
    #[error("cannot read the vCPU's {what}")]
    Registers {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM's own walk disagrees with ours.
    #[error("KVM_TRANSLATE disagrees for {gva:#x}: our walk gives {ours}, KVM gives {kvm}")]
    Disagreement {
        /// The address.
        gva: u64,
        /// Our result.
        ours: String,
        /// KVM's.
        kvm: String,
    },
    /// `--map` found more tables than any real guest has.
    #[error("the guest's page tables reach more than {0} tables; stopped (a loop in the tables?)")]
    TooManyTables(usize),
}

/// The name of a level's entry, as the SDM spells it.
#[must_use]
pub const fn entry_name(level: Level) -> &'static str {
    match level {
        Level::Pml4 => "PML4E",
        Level::Pdpt => "PDPTE",
        Level::Pd => "PDE",
        Level::Pt => "PTE",
    }
}

/// The name of a level's table.
#[must_use]
pub const fn table_name(level: Level) -> &'static str {
    match level {
        Level::Pml4 => "PML4",
        Level::Pdpt => "PDPT",
        Level::Pd => "PD",
        Level::Pt => "PT",
    }
}

/// The flags of one entry, decoded (SDM Vol. 3A §4.5, Tables 4-15..4-20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[allow(clippy::struct_excessive_bools)]
pub struct Flags {
    /// Present.
    pub p: bool,
    /// Writable.
    pub rw: bool,
    /// User-accessible.
    pub us: bool,
    /// Page-level write-through.
    pub pwt: bool,
    /// Page-level cache disable.
    pub pcd: bool,
    /// Accessed.
    pub a: bool,
    /// Dirty (leaves only).
    pub d: bool,
    /// Page size (PDPTE/PDE: a leaf).
    pub ps: bool,
    /// Global (leaves only).
    pub g: bool,
    /// No-execute.
    pub nx: bool,
}

impl Flags {
    /// Decodes `raw`.
    #[must_use]
    pub const fn decode(raw: u64) -> Self {
        let e = Pte(raw);
        Flags {
            p: e.has(Pte::PRESENT),
            rw: e.has(Pte::WRITABLE),
            us: e.has(Pte::USER),
            pwt: e.has(Pte::WRITE_THROUGH),
            pcd: e.has(Pte::CACHE_DISABLE),
            a: e.has(Pte::ACCESSED),
            d: e.has(Pte::DIRTY),
            ps: e.has(Pte::HUGE),
            g: e.has(Pte::GLOBAL),
            nx: e.has(Pte::NO_EXECUTE),
        }
    }
}

/// One level of the guest walk.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The table's name (PML4, PDPT, PD, PT).
    pub table: &'static str,
    /// The entry's name (PML4E, ...).
    pub entry: &'static str,
    /// Guest-physical address of the table.
    pub table_gpa: u64,
    /// Index into it (from the address's bits).
    pub index: usize,
    /// Guest-physical address of the entry.
    pub entry_gpa: u64,
    /// The raw entry.
    pub raw: u64,
    /// Its flags.
    pub flags: Flags,
    /// Where it points: the next table, or the page frame for a leaf.
    pub points_to: u64,
}

/// The host side of one guest-physical address the walk touched.
#[derive(Debug, Clone, Serialize)]
pub struct Touched {
    /// What it is ("PML4 table", ..., "page").
    pub what: String,
    /// Where it is on the host; `None` outside every memslot.
    pub host: Option<host::HostLocation>,
}

/// `KVM_TRANSLATE`'s answer and whether it agrees.
#[derive(Debug, Clone, Serialize)]
pub struct KvmCheck {
    /// Whether the ioctl worked on this host.
    pub available: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// KVM's `valid`.
    pub valid: bool,
    /// KVM's guest-physical address.
    pub gpa: u64,
    /// KVM's `writeable` (x86 KVM always answers 1: not compared).
    pub writeable: bool,
    /// KVM's `usermode` (x86 KVM always answers 0: not compared).
    pub usermode: bool,
    /// Whether it agrees with our walk (`None` when the ioctl failed).
    pub agrees: Option<bool>,
}

/// The whole explanation of one translation.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The guest-virtual address.
    pub gva: u64,
    /// CR3 at the time.
    pub cr3: u64,
    /// The guest's MAXPHYADDR (reserved-bit checks use it).
    pub phys_bits: u32,
    /// How this host does the second dimension.
    pub mode: TranslationMode,
    /// The guest walk, from the root.
    pub steps: Vec<Step>,
    /// The guest-physical result.
    pub gpa: u64,
    /// The guest leaf size in bytes.
    pub leaf_bytes: u64,
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// Not executable.
    pub no_execute: bool,
    /// Every guest-physical address touched: the tables, then the page.
    pub touched: Vec<Touched>,
    /// Memory references.
    pub refs: cost::RefCounts,
    /// The cross-check.
    pub kvm: KvmCheck,
}

/// What the walk needs from the vCPU: CR3 and MAXPHYADDR, after checking
/// the guest runs 4-level paging.
///
/// # Errors
/// [`TranslateError::Registers`] or [`TranslateError::NotLongMode`].
pub fn paging_root(vcpu: &VcpuFd) -> Result<(u64, u32), TranslateError> {
    let s = vcpu.get_sregs().map_err(|source| TranslateError::Registers { what: "special registers", source })?;
    if s.cr0 & CR0_PG == 0 || s.cr4 & CR4_PAE == 0 || s.efer & EFER_LMA == 0 || s.cr4 & CR4_LA57 != 0 {
        return Err(TranslateError::NotLongMode { cr0: s.cr0, cr4: s.cr4, efer: s.efer });
    }
    let phys_bits = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()
        .and_then(|c| c.as_slice().iter().find(|e| e.function == CPUID_ADDR_SIZES).map(|e| e.eax & 0xff))
        .filter(|b| (32..=52).contains(b))
        .unwrap_or(52);
    Ok((s.cr3 & CR3_ADDR, phys_bits))
}

/// Reads a guest-physical u64; `None` outside RAM.
#[must_use]
pub fn read_gpa(ram: &GuestRam, gpa: u64) -> Option<u64> {
    ram.memory().read_obj::<u64>(GuestAddress(gpa)).ok()
}

/// The guest walk alone, as an error where it stops: (steps, gpa, leaf
/// bytes, writable, user, nx).
///
/// # Errors
/// [`TranslateError::NonCanonical`], [`TranslateError::NotMapped`],
/// [`TranslateError::ReservedBits`], [`TranslateError::TableOutsideRam`].
pub fn guest_walk(ram: &GuestRam, cr3: u64, phys_bits: u32, gva: u64) -> Result<(Vec<Step>, paging::Translation), TranslateError> {
    let va = VirtAddr::new(gva).ok_or(TranslateError::NonCanonical(gva))?;
    let root = PhysAddr::new_truncate(cr3);
    let w = paging::walk(root, va, phys_bits, |p| read_gpa(ram, p.as_u64()));
    let mut steps = Vec::new();
    for s in w.steps() {
        let Some(entry) = s.entry else { break };
        let leaf = s.level == Level::Pt || entry.is_huge() && s.level != Level::Pml4;
        let points_to = if leaf {
            let size = match s.level {
                Level::Pdpt => 1 << 30,
                Level::Pd => 2 << 20,
                _ => 4096,
            };
            entry.0 & Pte::ADDR_MASK & !(size - 1)
        } else {
            entry.addr().as_u64()
        };
        steps.push(Step {
            table: table_name(s.level),
            entry: entry_name(s.level),
            table_gpa: s.table.as_u64(),
            index: s.index,
            entry_gpa: s.table.as_u64() + 8 * s.index as u64,
            raw: entry.0,
            flags: Flags::decode(entry.0),
            points_to,
        });
    }
    match w.result {
        Ok(t) => Ok((steps, t)),
        Err((level, why)) => {
            let step = w.steps().find(|s| s.level == level);
            let (index, table) = step.map_or((0, 0), |s| (s.index, s.table.as_u64()));
            let raw = step.and_then(|s| s.entry).map_or(0, |e| e.0);
            Err(match why {
                WalkStop::NotPresent => TranslateError::NotMapped { gva, level: entry_name(level), index, entry_gpa: table + 8 * index as u64, raw },
                WalkStop::ReservedBits { bits } => TranslateError::ReservedBits { gva, level: entry_name(level), index, raw, bits },
                WalkStop::TableOutsideMemory => TranslateError::TableOutsideRam { gva, level: table_name(level), table },
            })
        }
    }
}

/// `KVM_TRANSLATE` for `gva`, compared with `ours` (`None`: our walk found
/// no mapping).
fn kvm_check(vcpu: &VcpuFd, gva: u64, ours: Option<u64>) -> KvmCheck {
    match vcpu.translate_gva(gva) {
        Ok(t) => {
            let valid = t.valid != 0;
            let agrees = match ours {
                Some(gpa) => valid && t.physical_address == gpa,
                None => !valid,
            };
            KvmCheck { available: true, error: None, valid, gpa: t.physical_address, writeable: t.writeable != 0, usermode: t.usermode != 0, agrees: Some(agrees) }
        }
        Err(e) => KvmCheck { available: false, error: Some(format!("KVM_TRANSLATE failed: {e}")), valid: false, gpa: 0, writeable: false, usermode: false, agrees: None },
    }
}

/// Compares our walk's outcome for `gva` with `KVM_TRANSLATE`: our gpa or
/// `None` when unmapped. Returns KVM's answer.
///
/// # Errors
/// [`TranslateError::Disagreement`].
pub fn cross_check(vcpu: &VcpuFd, gva: u64, ours: Option<u64>) -> Result<KvmCheck, TranslateError> {
    let k = kvm_check(vcpu, gva, ours);
    if k.agrees == Some(false) {
        let fmt = |v: Option<u64>| v.map_or_else(|| "no mapping".to_string(), |g| format!("guest-physical {g:#x}"));
        return Err(TranslateError::Disagreement { gva, ours: fmt(ours), kvm: fmt(k.valid.then_some(k.gpa)) });
    }
    Ok(k)
}

/// Explains the translation of `gva` under the vCPU's current CR3.
///
/// # Errors
/// Any [`TranslateError`]; an address the walk cannot translate is
/// cross-checked too (KVM must also find no mapping), then reported.
pub fn explain(ram: &GuestRam, vcpu: &VcpuFd, mode: TranslationMode, gva: u64) -> Result<Explanation, TranslateError> {
    VirtAddr::new(gva).ok_or(TranslateError::NonCanonical(gva))?;
    let (cr3, phys_bits) = paging_root(vcpu)?;
    let (steps, t) = match guest_walk(ram, cr3, phys_bits, gva) {
        Ok(r) => r,
        Err(e) => {
            cross_check(vcpu, gva, None)?;
            return Err(e);
        }
    };
    let kvm = cross_check(vcpu, gva, Some(t.phys.as_u64()))?;
    let reader = host::HostReader::open();
    let mut touched: Vec<Touched> =
        steps.iter().map(|s| Touched { what: format!("{} table", s.table), host: reader.locate(ram, s.table_gpa) }).collect();
    touched.push(Touched { what: "page".into(), host: reader.locate(ram, t.phys.as_u64()) });
    let host_levels: Vec<u32> = touched.iter().map(|x| cost::levels_for(x.host.as_ref().map_or(4096, |h| h.page.bytes()))).collect();
    let host_page = touched.last().and_then(|x| x.host.as_ref()).map_or(4096, |h| h.page.bytes());
    let refs = cost::counts(&host_levels, t.size.bytes(), host_page);
    Ok(Explanation {
        gva,
        cr3,
        phys_bits,
        mode,
        steps,
        gpa: t.phys.as_u64(),
        leaf_bytes: t.size.bytes(),
        writable: t.writable,
        user: t.user,
        no_execute: t.no_execute,
        touched,
        refs,
        kvm,
    })
}

/// Parses a guest-virtual address: hexadecimal, with or without `0x`,
/// underscores allowed.
///
/// # Errors
/// A message naming the bad text.
pub fn parse_gva(text: &str) -> Result<u64, String> {
    let t = text.trim().trim_start_matches("0x").trim_start_matches("0X").replace('_', "");
    u64::from_str_radix(&t, 16).map_err(|_| format!("invalid guest-virtual address {text:?}: expected hexadecimal, e.g. 0xffff800000200000"))
}

/// Parses a comma-separated list of addresses.
///
/// # Errors
/// As [`parse_gva`].
pub fn parse_gva_list(text: &str) -> Result<Vec<u64>, String> {
    text.split(',').filter(|s| !s.trim().is_empty()).map(parse_gva).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_hex_with_or_without_prefix() {
        assert_eq!(parse_gva("0xffff_8000_0020_0000"), Ok(0xffff_8000_0020_0000));
        assert_eq!(parse_gva("1000"), Ok(0x1000));
        assert!(parse_gva("zz").is_err());
        assert!(parse_gva("0x1_0000_0000_0000_0000").is_err());
        assert_eq!(parse_gva_list("0x1000,0x2000"), Ok(vec![0x1000, 0x2000]));
    }

    #[test]
    fn flags_decode_every_documented_bit() {
        let f = Flags::decode(0x8000_0000_0000_01ff);
        assert!(f.p && f.rw && f.us && f.pwt && f.pcd && f.a && f.d && f.ps && f.g && f.nx);
        let f = Flags::decode(0x1);
        assert!(f.p && !f.rw && !f.nx);
    }
}
