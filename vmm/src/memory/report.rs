//! What the host says about guest RAM, per region: residency, huge-page
//! coverage (smaps) and the NUMA node of the resident pages (move_pages).

use serde::Serialize;

use crate::memory::numa::{self, NodePlacement};
use crate::memory::{GuestRam, MemoryError, smaps};

/// The report for one RAM region.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    /// First guest-physical address.
    pub guest_start: u64,
    /// One past the last guest-physical address.
    pub guest_end: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Backing kind.
    pub backing: String,
    /// NUMA policy and nodes, when set ("bind:0").
    pub numa_policy: Option<String>,
    /// Bytes resident in host memory.
    pub resident_bytes: u64,
    /// Resident bytes mapped by huge pages (THP or hugetlb).
    pub huge_bytes: u64,
    /// Bytes locked (mlock).
    pub locked_bytes: u64,
    /// Measured NUMA placement of the resident pages.
    pub placement: NodePlacement,
}

impl RegionReport {
    /// Share of resident memory on huge pages, 0..=1.
    #[must_use]
    pub fn huge_coverage(&self) -> f64 {
        if self.resident_bytes == 0 { 0.0 } else { self.huge_bytes as f64 / self.resident_bytes as f64 }
    }
}

/// Builds the report for every region.
///
/// # Errors
/// [`MemoryError::MovePages`] when the NUMA query fails.
pub fn regions(ram: &GuestRam) -> Result<Vec<RegionReport>, MemoryError> {
    let mut out = Vec::new();
    for region in ram.regions() {
        let start = region.mapping.as_ptr() as u64;
        let end = start + region.mapping.size() as u64;
        let fields = smaps::read_range(start, end);
        let get = |k: &str| fields.get(k).copied().unwrap_or(0);
        let hugetlb = get("Shared_Hugetlb") + get("Private_Hugetlb");
        let resident = get("Rss") + hugetlb;
        let huge = get("AnonHugePages") + get("ShmemPmdMapped") + get("FilePmdMapped") + hugetlb;
        let step = region.mapping.backing().hugetlb_page_size().unwrap_or(4096) as usize;
        let placement = numa::measure(&region.mapping, step)?;
        out.push(RegionReport {
            guest_start: region.range.start.0,
            guest_end: region.range.end().0,
            host_addr: start,
            backing: region.mapping.backing().to_string(),
            numa_policy: ram.numa().map(|(p, nodes)| format!("{p}:{}", nodes.iter().map(u32::to_string).collect::<Vec<_>>().join(","))),
            resident_bytes: resident,
            huge_bytes: huge,
            locked_bytes: get("Locked"),
            placement,
        });
    }
    Ok(out)
}
