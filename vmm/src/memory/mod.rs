//! Guest RAM: host mappings, their placement, KVM memslots and the report.
//!
//! Owns every byte of guest RAM. [`GuestRam::new`] maps one host region per
//! RAM range of the layout, applies the NUMA policy before the first touch,
//! then prefaults and locks as configured; [`slots`] is the only code that
//! hands the regions to KVM. It does not own what the guest puts there.

pub mod backing;
pub mod numa;
pub mod report;
pub mod slots;
pub mod smaps;
pub mod vmm_writes;
pub mod zero;

use std::path::PathBuf;

use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

use crate::config::{Backing, NumaPolicy, VmConfig};
use crate::size::format_size;
use crate::memory::vmm_writes::{VmmWriteBitmap, WriteFlag};
use crate::layout::{RamRange, ram_ranges};
use backing::HostMapping;

/// Errors setting up or inspecting guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// A size that does not fit the host's address space.
    #[error("size {0} does not fit in the host address space")]
    TooLarge(u64),
    /// More memory than the host has.
    #[error("guest memory of {} is more than the host can give ({} of RAM in total)", format_size(*.asked), format_size(*.host))]
    MoreThanHost {
        /// Bytes asked for.
        asked: u64,
        /// MemTotal of the host.
        host: u64,
    },
    /// Not enough hugetlb pages reserved.
    #[error(
        "hugetlb pages not reserved: {backing} needs {needed} free {page_kib} KiB pages, the host has {free}; \
         reserve them with `echo {needed} > {knob}`"
    )]
    HugePagesNotReserved {
        /// The backing.
        backing: Backing,
        /// Pages needed.
        needed: u64,
        /// Pages free and not reserved by others.
        free: u64,
        /// Page size in KiB.
        page_kib: u64,
        /// The sysfs knob to raise.
        knob: PathBuf,
    },
    /// mmap failed.
    #[error("cannot map {} of guest memory", format_size(*.size))]
    Map {
        /// Bytes.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// memfd_create or ftruncate failed.
    #[error("cannot create the memfd backing guest memory")]
    Memfd(#[source] std::io::Error),
    /// madvise failed.
    #[error("{what} failed on guest memory")]
    Madvise {
        /// Which advice.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mlock failed.
    #[error("cannot lock guest memory (mlock); check RLIMIT_MEMLOCK")]
    Mlock(#[source] std::io::Error),
    /// A NUMA node that the host does not have.
    #[error("NUMA node {node} does not exist on this host (nodes: {host:?})")]
    NoSuchNode {
        /// The node.
        node: u32,
        /// The host's nodes.
        host: Vec<u32>,
    },
    /// A node the process may not use.
    #[error("NUMA node {node} is not allowed for this process (allowed: {allowed:?})")]
    NodeNotAllowed {
        /// The node.
        node: u32,
        /// Allowed nodes.
        allowed: Vec<u32>,
    },
    /// mbind failed.
    #[error("cannot apply NUMA policy {policy} on nodes {nodes:?}")]
    Mbind {
        /// The policy.
        policy: NumaPolicy,
        /// The nodes.
        nodes: Vec<u32>,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// move_pages failed.
    #[error("cannot query the NUMA node of guest pages (move_pages)")]
    MovePages(#[source] std::io::Error),
    /// vm-memory refused the regions.
    #[error("cannot build the guest memory map: {0}")]
    GuestMemory(String),
    /// KVM refused a memslot.
    #[error("KVM refused memslot {slot} at guest-physical {guest_addr:#x}")]
    SetMemslot {
        /// Slot number.
        slot: u32,
        /// Guest-physical start.
        guest_addr: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest memory as the VMM accesses it: every write through it is recorded
/// in a per-region dirty bitmap (4 KiB pages), which dirty tracking merges
/// with KVM's log so VMM writes are never missed.
pub type GuestMemory = GuestMemoryMmap<VmmWriteBitmap>;

/// One RAM range and the host mapping behind it.
#[derive(Debug)]
pub struct RamRegion {
    /// Where the guest sees it.
    pub range: RamRange,
    /// What backs it.
    pub mapping: HostMapping,
}

/// All of guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    /// The regions, in guest-physical order. Declared before `memory` is
    /// irrelevant for drop order: vm-memory does not own these mappings.
    regions: Vec<RamRegion>,
    /// vm-memory's view of the same regions (not owning the mappings).
    memory: GuestMemory,
    /// The NUMA policy applied, for the report.
    numa: Option<(NumaPolicy, Vec<u32>)>,
    /// Set by every VMM write to any region (see `memory::vmm_writes`).
    vmm_writes: WriteFlag,
}

impl GuestRam {
    /// Maps, places, prefaults and locks guest RAM as `config` says.
    ///
    /// # Errors
    /// Any [`MemoryError`]; nothing is left mapped on error.
    pub fn new(config: &VmConfig) -> Result<Self, MemoryError> {
        Self::build(config, None)
    }

    /// Guest RAM whose pages load lazily from a full snapshot's sparse
    /// memory image (RAM offset = file offset): each region is a private
    /// file mapping, so a page is read on first touch and copied on first
    /// write; the file is never modified.
    ///
    /// # Errors
    /// Any [`MemoryError`].
    pub fn from_image(config: &VmConfig, image: &std::fs::File) -> Result<Self, MemoryError> {
        Self::build(config, Some(image))
    }

    fn build(config: &VmConfig, image: Option<&std::fs::File>) -> Result<Self, MemoryError> {
        if image.is_none() {
            check_host_can_give(config)?;
        }
        let numa = config.numa_policy.map(|p| (p, config.numa_nodes.clone()));
        if let Some((_, nodes)) = &numa {
            numa::check_nodes(nodes)?;
        }
        let mut regions = Vec::new();
        let mut ram_offset = 0;
        for range in ram_ranges(config.mem_size) {
            let mapping = match image {
                None => HostMapping::new(config.backing, range.size)?,
                Some(file) => HostMapping::file_private(config.backing, file, ram_offset, range.size)?,
            };
            ram_offset += range.size;
            if let Some((policy, nodes)) = &numa {
                numa::bind(&mapping, *policy, nodes)?;
            }
            if config.prefault {
                mapping.prefault()?;
            }
            if config.mlock {
                mapping.mlock()?;
            }
            regions.push(RamRegion { range, mapping });
        }
        let vmm_writes = WriteFlag::default();
        let mut mm_regions = Vec::new();
        for r in &regions {
            // SAFETY: the pointer is our live mapping of exactly this size,
            // which outlives `memory` (both are owned by `GuestRam`, and the
            // builder does not take ownership: it will not munmap it).
            let builder = unsafe {
                MmapRegionBuilder::new_with_bitmap(r.mapping.size(), VmmWriteBitmap::with_flag(r.mapping.size(), vmm_writes.clone()))
                    .with_raw_mmap_pointer(r.mapping.as_ptr())
            };
            let region = builder
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()
                .map_err(|e| MemoryError::GuestMemory(e.to_string()))?;
            let region = GuestRegionMmap::new(region, r.range.start).ok_or_else(|| MemoryError::GuestMemory("region wraps around".into()))?;
            mm_regions.push(region);
        }
        let memory = GuestMemory::from_regions(mm_regions).map_err(|e| MemoryError::GuestMemory(e.to_string()))?;
        Ok(GuestRam { regions, memory, numa, vmm_writes })
    }

    /// The host address of `len` bytes at `ram_offset` (regions concatenated
    /// in guest-physical order), when they lie inside one region.
    #[must_use]
    pub fn host_range(&self, ram_offset: u64, len: u64) -> Option<*mut u8> {
        let mut base = 0;
        for r in &self.regions {
            if ram_offset >= base && ram_offset.checked_add(len)? <= base + r.range.size {
                return Some(r.mapping.as_ptr().wrapping_add((ram_offset - base) as usize));
            }
            base += r.range.size;
        }
        None
    }

    /// The RAM offset where the region holding `gpa` starts.
    #[must_use]
    pub fn region_offset_of(&self, gpa: u64) -> Option<u64> {
        let mut base = 0;
        for r in &self.regions {
            if gpa >= r.range.start.0 && gpa < r.range.end().0 {
                return Some(base);
            }
            base += r.range.size;
        }
        None
    }

    /// The RAM offset of a guest-physical address.
    #[must_use]
    pub fn ram_offset_of(&self, gpa: u64) -> Option<u64> {
        let mut base = 0;
        for r in &self.regions {
            if gpa >= r.range.start.0 && gpa < r.range.end().0 {
                return Some(base + gpa - r.range.start.0);
            }
            base += r.range.size;
        }
        None
    }

    /// The regions, in guest-physical order.
    #[must_use]
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// vm-memory's view, for loaders and devices.
    #[must_use]
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Whether the VMM wrote any region since dirty tracking last looked.
    #[must_use]
    pub fn vmm_write_flag(&self) -> &WriteFlag {
        &self.vmm_writes
    }

    /// The NUMA policy in force, if any.
    #[must_use]
    pub fn numa(&self) -> Option<&(NumaPolicy, Vec<u32>)> {
        self.numa.as_ref()
    }

    /// Total RAM in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.range.size).sum()
    }
}

/// `MemTotal` of /proc/meminfo in bytes.
#[must_use]
pub fn host_mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Free hugetlb pages of `page_size` not promised to another mapping, and the
/// sysfs directory of that size.
#[must_use]
pub fn hugetlb_available(page_size: u64) -> (u64, PathBuf) {
    let dir = PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size / 1024));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    (read("free_hugepages").saturating_sub(read("resv_hugepages")), dir)
}

/// Refuses configurations the host cannot satisfy, with a message that says
/// what to do, before anything is mapped.
fn check_host_can_give(config: &VmConfig) -> Result<(), MemoryError> {
    if let Some(page) = config.backing.hugetlb_page_size() {
        let needed = config.mem_size / page;
        let (free, dir) = hugetlb_available(page);
        if free < needed {
            return Err(MemoryError::HugePagesNotReserved {
                backing: config.backing,
                needed,
                free,
                page_kib: page / 1024,
                knob: dir.join("nr_hugepages"),
            });
        }
    } else if let Some(total) = host_mem_total()
        && config.mem_size > total
    {
        return Err(MemoryError::MoreThanHost { asked: config.mem_size, host: total });
    }
    Ok(())
}
