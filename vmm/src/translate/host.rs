//! The host side of a translation: guest-physical → memslot → host-virtual
//! → host-physical frame, with the host page size behind it.
//!
//! The frame comes from `/proc/self/pagemap` (one 64-bit entry per 4 KiB
//! virtual page: bit 63 present, bit 62 swapped, bits 54:0 the PFN, which
//! only root sees; kernel `Documentation/admin-guide/mm/pagemap.rst`). The
//! page size comes from `/proc/self/smaps` (`KernelPageSize` of the VMA:
//! 2048 or 1048576 kB for hugetlb) and, for transparent huge pages, from the
//! frame's `/proc/kpageflags` entry (bit 22, `KPF_THP`, same document).
//! Decoding is pure; the readers are thin.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::Serialize;

use crate::memory::GuestRam;

/// Bit 63 of a pagemap entry: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Bits 54:0: the page frame number, when present.
const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// `KPF_THP` in /proc/kpageflags (include/uapi/linux/kernel-page-flags.h).
const KPF_THP: u64 = 1 << 22;
/// `KPF_HUGE`: part of a hugetlb page.
const KPF_HUGE: u64 = 1 << 17;
/// `KPF_ZERO_PAGE`: the shared zero page (a read of never-written memory).
const KPF_ZERO_PAGE: u64 = 1 << 24;

/// The host page kind behind a guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HostPage {
    /// An ordinary 4 KiB page.
    #[serde(rename = "4k")]
    Base4K,
    /// Part of a transparent huge page (2 MiB).
    #[serde(rename = "thp-2m")]
    Thp2M,
    /// Part of a 2 MiB hugetlb page.
    #[serde(rename = "hugetlb-2m")]
    Hugetlb2M,
    /// Part of a 1 GiB hugetlb page.
    #[serde(rename = "hugetlb-1g")]
    Hugetlb1G,
    /// Not in host memory (never touched, or reclaimed): no frame yet.
    #[serde(rename = "not-present")]
    NotPresent,
}

impl HostPage {
    /// Bytes in the host page (a page not present counts as 4 KiB: that is
    /// what its first touch would map on an ordinary backing).
    #[must_use]
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Thp2M | Self::Hugetlb2M => 2 << 20,
            Self::Hugetlb1G => 1 << 30,
            Self::Base4K | Self::NotPresent => 4096,
        }
    }

    /// A short label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Base4K => "4K",
            Self::Thp2M => "THP 2M",
            Self::Hugetlb2M => "hugetlb 2M",
            Self::Hugetlb1G => "hugetlb 1G",
            Self::NotPresent => "not present",
        }
    }
}

/// A decoded pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    /// Present in RAM.
    pub present: bool,
    /// Swapped out.
    pub swapped: bool,
    /// The frame (0 when not present, or when not root).
    pub pfn: u64,
}

/// Decodes one pagemap entry.
#[must_use]
pub const fn decode_pagemap(raw: u64) -> PagemapEntry {
    let present = raw & PM_PRESENT != 0;
    PagemapEntry { present, swapped: raw & PM_SWAPPED != 0, pfn: if present { raw & PM_PFN_MASK } else { 0 } }
}

/// The page kind from the VMA's `KernelPageSize` (bytes) and the frame's
/// kpageflags (when readable).
#[must_use]
pub const fn classify(present: bool, kernel_page_size: u64, kpageflags: Option<u64>) -> HostPage {
    if !present {
        return HostPage::NotPresent;
    }
    match kernel_page_size {
        0x4000_0000 => HostPage::Hugetlb1G,
        0x20_0000 => HostPage::Hugetlb2M,
        _ => match kpageflags {
            Some(f) if f & KPF_THP != 0 && f & KPF_ZERO_PAGE == 0 => HostPage::Thp2M,
            Some(f) if f & KPF_HUGE != 0 => HostPage::Hugetlb2M,
            _ => HostPage::Base4K,
        },
    }
}

/// Where one guest-physical address lives on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostLocation {
    /// The guest-physical address.
    pub gpa: u64,
    /// The KVM memslot holding it.
    pub slot: u32,
    /// The host-virtual address in the VMM.
    pub hva: u64,
    /// The host-physical address, when the page is present (and we are root).
    pub hpa: Option<u64>,
    /// The host frame number.
    pub pfn: Option<u64>,
    /// The host page kind.
    pub page: HostPage,
    /// Swapped out on the host.
    pub swapped: bool,
}

/// Reads the files the host side needs, once per explanation.
#[derive(Debug)]
pub struct HostReader {
    pagemap: Option<File>,
    kpageflags: Option<File>,
    vmas: Vec<crate::memory::smaps::Vma>,
}

impl HostReader {
    /// Opens pagemap and kpageflags and reads smaps now.
    #[must_use]
    pub fn open() -> Self {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        HostReader {
            pagemap: File::open("/proc/self/pagemap").ok(),
            kpageflags: File::open("/proc/kpageflags").ok(),
            vmas: crate::memory::smaps::parse(&smaps),
        }
    }

    fn read_u64(file: Option<&File>, index: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        file?.read_exact_at(&mut b, index.checked_mul(8)?).ok()?;
        Some(u64::from_ne_bytes(b))
    }

    /// Where `gpa` lives on the host; `None` when no memslot holds it.
    #[must_use]
    pub fn locate(&self, ram: &GuestRam, gpa: u64) -> Option<HostLocation> {
        let (slot, region) = ram.regions().iter().enumerate().find(|(_, r)| gpa >= r.range.start.0 && gpa < r.range.end().0)?;
        let hva = region.mapping.as_ptr() as u64 + (gpa - region.range.start.0);
        let entry = Self::read_u64(self.pagemap.as_ref(), hva / 4096).map(decode_pagemap);
        let present = entry.is_some_and(|e| e.present);
        let pfn = entry.map(|e| e.pfn).filter(|p| *p != 0);
        let flags = pfn.and_then(|p| Self::read_u64(self.kpageflags.as_ref(), p));
        let kps = self.vmas.iter().find(|v| hva >= v.start && hva < v.end).and_then(|v| v.fields.get("KernelPageSize").copied()).unwrap_or(4096);
        Some(HostLocation {
            gpa,
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            hva,
            // The PFN field is 55 bits wide: checked, so a corrupt entry cannot wrap.
            hpa: pfn.and_then(|p| p.checked_mul(4096)).map(|a| a | (hva & 0xfff)),
            pfn,
            page: classify(present, kps, flags),
            swapped: entry.is_some_and(|e| e.swapped),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entries_decode_present_swapped_and_pfn() {
        let e = decode_pagemap(PM_PRESENT | 0x1234);
        assert_eq!(e, PagemapEntry { present: true, swapped: false, pfn: 0x1234 });
        // Soft-dirty (55) and exclusive (56) bits are not part of the PFN.
        assert_eq!(decode_pagemap(PM_PRESENT | (1 << 55) | (1 << 56) | 7).pfn, 7);
        let s = decode_pagemap(PM_SWAPPED | 0x55);
        assert!(!s.present && s.swapped && s.pfn == 0);
    }

    #[test]
    fn page_kinds_come_from_the_vma_and_the_frame_flags() {
        assert_eq!(classify(true, 1 << 30, None), HostPage::Hugetlb1G);
        assert_eq!(classify(true, 2 << 20, Some(0)), HostPage::Hugetlb2M);
        assert_eq!(classify(true, 4096, Some(KPF_THP)), HostPage::Thp2M);
        assert_eq!(classify(true, 4096, Some(KPF_THP | KPF_ZERO_PAGE)), HostPage::Base4K);
        assert_eq!(classify(true, 4096, None), HostPage::Base4K);
        assert_eq!(classify(false, 2 << 20, None), HostPage::NotPresent);
        assert_eq!(HostPage::Thp2M.bytes(), 2 << 20);
    }
}
