//! What the host says about guest RAM, per region: residency, huge-page
//! coverage (smaps) and the NUMA node of the resident pages (move_pages);
//! how KVM maps guest RAM (its `pages_4k/2m/1g` statistics); and how much
//! memory the VMM process holds beyond guest RAM.

use serde::Serialize;

use crate::host::TranslationMode;
use crate::kvm_stats::KvmStatsReport;
use crate::memory::numa::{self, NodePlacement};
use crate::memory::smaps::Vma;
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
    /// Resident hugetlb bytes (part of `resident_bytes`; hugetlb pages are
    /// not counted in the process's VmRSS).
    pub hugetlb_bytes: u64,
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
    regions_from(ram, &read_smaps())
}

/// The smaps fields the reports use.
const SMAPS_KEYS: [&str; 8] = ["Rss", "Anonymous", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb", "Locked"];

/// /proc/self/smaps, parsed one mapping at a time and keeping only
/// [`SMAPS_KEYS`], so that reading it does not leave a heap the size of the
/// file behind (it would count towards the RSS [`process_memory`]
/// reports); empty when it cannot be read.
fn read_smaps() -> Vec<Vma> {
    use std::io::BufRead as _;
    let Ok(file) = std::fs::File::open("/proc/self/smaps") else { return Vec::new() };
    let mut out = Vec::new();
    let mut chunk = String::new();
    let flush = |chunk: &mut String, out: &mut Vec<Vma>| {
        for mut vma in smaps::parse(chunk) {
            vma.fields.retain(|k, _| SMAPS_KEYS.contains(&k.as_str()));
            out.push(vma);
        }
        chunk.clear();
    };
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        // A mapping starts with its range, "start-end perms ..."; fields
        // are "Key: value".
        let header = line.split_whitespace().next().is_some_and(|w| !w.ends_with(':'));
        if header && !chunk.is_empty() {
            flush(&mut chunk, &mut out);
        }
        chunk.push_str(&line);
        chunk.push('\n');
    }
    flush(&mut chunk, &mut out);
    out
}

/// Builds the report for every region from already-read smaps.
///
/// # Errors
/// [`MemoryError::MovePages`] when the NUMA query fails.
pub fn regions_from(ram: &GuestRam, vmas: &[Vma]) -> Result<Vec<RegionReport>, MemoryError> {
    let mut out = Vec::new();
    for region in ram.regions() {
        let start = region.mapping.as_ptr() as u64;
        let end = start + region.mapping.size() as u64;
        let fields = smaps::sum_over(vmas, start, end);
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
            hugetlb_bytes: hugetlb,
            locked_bytes: get("Locked"),
            placement,
        });
    }
    Ok(out)
}

/// How KVM maps guest RAM, from its VM statistics `pages_4k`, `pages_2m`
/// and `pages_1g` (x86 `kvm_vm_stat`: leaf entries KVM installed at each
/// level).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvmMappings {
    /// Leaves mapping 4 KiB.
    pub pages_4k: u64,
    /// Leaves mapping 2 MiB.
    pub pages_2m: u64,
    /// Leaves mapping 1 GiB.
    pub pages_1g: u64,
    /// Bytes those leaves map.
    pub mapped_bytes: u64,
    /// Share of `mapped_bytes` mapped by 2 MiB or 1 GiB leaves, 0..=1.
    pub huge_coverage: f64,
    /// What the leaves are on this host.
    pub what: &'static str,
}

/// Reads [`KvmMappings`] out of the VM statistics; `None` when KVM has no
/// such counters (or no statistics at all).
#[must_use]
pub fn kvm_mappings(stats: &KvmStatsReport, mode: TranslationMode) -> Option<KvmMappings> {
    let p4k = stats.vm_value("pages_4k")?;
    let p2m = stats.vm_value("pages_2m").unwrap_or(0);
    let p1g = stats.vm_value("pages_1g").unwrap_or(0);
    let huge = p2m * (2 << 20) + p1g * (1 << 30);
    let mapped = p4k * 4096 + huge;
    let what = match mode {
        TranslationMode::Ept | TranslationMode::Npt => "EPT/NPT leaves: guest-physical to host-physical mappings",
        TranslationMode::PvmShadow | TranslationMode::Shadow => {
            "shadow page-table leaves: guest-virtual to host-physical mappings, built on demand as the guest touches \
             pages; their size is the smaller of the guest's leaf and the host backing's page"
        }
        TranslationMode::Unknown => "KVM MMU leaves (translation mode unknown)",
    };
    Some(KvmMappings {
        pages_4k: p4k,
        pages_2m: p2m,
        pages_1g: p1g,
        mapped_bytes: mapped,
        huge_coverage: if mapped == 0 { 0.0 } else { huge as f64 / mapped as f64 },
        what,
    })
}

/// The VMM process's memory at one moment, and how much of it is not guest
/// RAM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    /// VmRSS from /proc/self/status (the kernel's per-process counters;
    /// these may lag by a few pages per CPU). Excludes hugetlb.
    pub vm_rss_bytes: u64,
    /// RssAnon from /proc/self/status.
    pub rss_anon_bytes: u64,
    /// RssFile from /proc/self/status (binary and libraries).
    pub rss_file_bytes: u64,
    /// RssShmem from /proc/self/status (includes memfd-backed guest RAM).
    pub rss_shmem_bytes: u64,
    /// Resident bytes of every mapping, summed from /proc/self/smaps
    /// (exact: a page-table walk). Excludes hugetlb, like VmRSS.
    pub process_rss_bytes: u64,
    /// Of that, bytes inside guest RAM mappings (anon, THP, memfd).
    pub guest_rss_bytes: u64,
    /// Guest RAM on hugetlb pages: resident, but in neither figure above.
    pub guest_hugetlb_bytes: u64,
    /// `process_rss_bytes - guest_rss_bytes`: what the VMM itself holds
    /// (binary, libraries, heap, stacks, the kvm_run pages).
    pub vmm_overhead_bytes: u64,
    /// Of the overhead, anonymous memory (heap, stacks, private data).
    pub vmm_overhead_anon_bytes: u64,
    /// Of the overhead, file-backed and shared pages (the binary's and the
    /// shared libraries' text and data, the kvm_run mapping).
    pub vmm_overhead_file_bytes: u64,
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Computes [`ProcessMemory`] from the process's smaps, the host ranges
/// of guest RAM and the text of /proc/self/status.
#[must_use]
pub fn process_memory_from(vmas: &[Vma], guest_ranges: &[(u64, u64)], status: &str) -> ProcessMemory {
    let rss = |v: &Vma| v.fields.get("Rss").copied().unwrap_or(0);
    let hugetlb = |v: &Vma| v.fields.get("Shared_Hugetlb").copied().unwrap_or(0) + v.fields.get("Private_Hugetlb").copied().unwrap_or(0);
    let in_guest = |v: &Vma| guest_ranges.iter().any(|&(s, e)| v.start >= s && v.end <= e);
    let anon = |v: &Vma| v.fields.get("Anonymous").copied().unwrap_or(0);
    let process_rss: u64 = vmas.iter().map(rss).sum();
    let guest_rss: u64 = vmas.iter().filter(|v| in_guest(v)).map(rss).sum();
    let overhead_anon: u64 = vmas.iter().filter(|v| !in_guest(v)).map(anon).sum();
    let overhead = process_rss.saturating_sub(guest_rss);
    ProcessMemory {
        vm_rss_bytes: status_kib(status, "VmRSS"),
        rss_anon_bytes: status_kib(status, "RssAnon"),
        rss_file_bytes: status_kib(status, "RssFile"),
        rss_shmem_bytes: status_kib(status, "RssShmem"),
        process_rss_bytes: process_rss,
        guest_rss_bytes: guest_rss,
        guest_hugetlb_bytes: vmas.iter().filter(|v| in_guest(v)).map(hugetlb).sum(),
        vmm_overhead_bytes: overhead,
        vmm_overhead_anon_bytes: overhead_anon,
        vmm_overhead_file_bytes: overhead.saturating_sub(overhead_anon),
    }
}

/// Measures [`ProcessMemory`] now.
#[must_use]
pub fn process_memory(ram: &GuestRam) -> ProcessMemory {
    let ranges: Vec<(u64, u64)> = ram
        .regions()
        .iter()
        .map(|r| {
            let start = r.mapping.as_ptr() as u64;
            (start, start + r.mapping.size() as u64)
        })
        .collect();
    // Read status first: reading smaps allocates a buffer of its own size,
    // which then counts (a little) towards the figures it reports.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    process_memory_from(&read_smaps(), &ranges, &status)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
555500000000-555500100000 r-xp 00000000 08:01 1 /usr/bin/vmm
Rss:                 900 kB
Anonymous:             0 kB
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Rss:                2048 kB
AnonHugePages:      2048 kB
7f0000200000-7f0010000000 rw-p 00000000 00:00 0
Rss:                 100 kB
7f2000000000-7f2000200000 rw-s 00000000 00:0f 7 /anon_hugepage (deleted)
Rss:                   0 kB
Shared_Hugetlb:     2048 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  24 kB
Anonymous:            24 kB
";

    const STATUS: &str = "Name:\tvmm\nVmRSS:\t    3072 kB\nRssAnon:\t    2172 kB\nRssFile:\t     900 kB\nRssShmem:\t       0 kB\n";

    #[test]
    fn overhead_is_process_rss_outside_guest_ram() {
        let vmas = smaps::parse(SMAPS);
        let guest = [(0x7f00_0000_0000, 0x7f00_1000_0000), (0x7f20_0000_0000, 0x7f20_0020_0000)];
        let m = process_memory_from(&vmas, &guest, STATUS);
        assert_eq!(m.process_rss_bytes, (900 + 2048 + 100 + 24) * 1024);
        assert_eq!(m.guest_rss_bytes, (2048 + 100) * 1024);
        assert_eq!(m.guest_hugetlb_bytes, 2048 * 1024, "hugetlb guest RAM is reported apart, not subtracted from RSS");
        assert_eq!(m.vmm_overhead_bytes, (900 + 24) * 1024);
        assert_eq!(m.vmm_overhead_anon_bytes, 24 * 1024, "the stack is anonymous");
        assert_eq!(m.vmm_overhead_file_bytes, 900 * 1024, "the binary's text is file-backed");
        assert_eq!(m.vm_rss_bytes, 3072 * 1024);
        assert_eq!(m.rss_file_bytes, 900 * 1024);
    }

    #[test]
    fn kvm_huge_coverage_weighs_leaves_by_size() {
        let mut stats = KvmStatsReport::default();
        assert_eq!(kvm_mappings(&stats, TranslationMode::Ept), None, "no counters, no mapping report");
        stats.vm.insert("pages_4k".into(), 512.into());
        stats.vm.insert("pages_2m".into(), 1.into());
        stats.vm.insert("pages_1g".into(), 0.into());
        let m = kvm_mappings(&stats, TranslationMode::PvmShadow).unwrap();
        assert_eq!(m.mapped_bytes, 4 << 20);
        assert!((m.huge_coverage - 0.5).abs() < 1e-9);
        assert!(m.what.contains("shadow"));
    }
}
