//! What a ring-3 page fault means, from its error code and what the kernel
//! knows about the address (pure; the guest kernel's handler acts on it).
//!
//! Error-code bits: SDM Vol. 3A §4.7, Figure 4-12.

/// P: the fault was a protection violation on a present page (clear: the
/// page was not present).
pub const ERR_PRESENT: u64 = 1 << 0;
/// W/R: the access was a write.
pub const ERR_WRITE: u64 = 1 << 1;
/// U/S: the access came from ring 3.
pub const ERR_USER: u64 = 1 << 2;
/// RSVD: a reserved bit was set in some paging-structure entry.
pub const ERR_RESERVED: u64 = 1 << 3;
/// I/D: the access was an instruction fetch.
pub const ERR_FETCH: u64 = 1 << 4;

/// The kinds of fault the handler tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// First touch of a page of a demand-paged region: map a zero frame.
    Minor,
    /// A page of a demand-paged region whose data is in swap: read it back.
    Major,
    /// A write to a present page shared copy-on-write: copy (or, when no
    /// longer shared, just make it writable).
    CopyOnWrite,
    /// An access the page's permissions forbid: the task is killed.
    Protection,
    /// An access outside every region of the task: the task is killed.
    Invalid,
}

/// What the kernel knows about the faulting address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageInfo {
    /// The address lies in one of the task's demand-paged regions.
    pub in_region: bool,
    /// The page's data is in swap.
    pub in_swap: bool,
    /// The page is mapped read-only because its frame is shared
    /// copy-on-write.
    pub cow: bool,
}

/// Classifies a fault with error code `error` on a page described by `page`.
#[must_use]
pub const fn classify(error: u64, page: PageInfo) -> FaultKind {
    if error & (ERR_RESERVED | ERR_FETCH) != 0 {
        // Regions hold data (NX); reserved bits mean a corrupt table.
        return if page.in_region { FaultKind::Protection } else { FaultKind::Invalid };
    }
    if error & ERR_PRESENT != 0 {
        if page.in_region && page.cow && error & ERR_WRITE != 0 {
            FaultKind::CopyOnWrite
        } else {
            FaultKind::Protection
        }
    } else if !page.in_region {
        FaultKind::Invalid
    } else if page.in_swap {
        FaultKind::Major
    } else {
        FaultKind::Minor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGION: PageInfo = PageInfo { in_region: true, in_swap: false, cow: false };

    #[test]
    fn not_present_pages_of_a_region_are_minor_or_major() {
        assert_eq!(classify(ERR_USER, REGION), FaultKind::Minor);
        assert_eq!(classify(ERR_USER | ERR_WRITE, REGION), FaultKind::Minor);
        assert_eq!(classify(ERR_USER, PageInfo { in_swap: true, ..REGION }), FaultKind::Major);
    }

    #[test]
    fn writes_to_shared_pages_copy_and_other_violations_kill() {
        let cow = PageInfo { cow: true, ..REGION };
        assert_eq!(classify(ERR_USER | ERR_WRITE | ERR_PRESENT, cow), FaultKind::CopyOnWrite);
        // A read of a present page cannot fault for COW reasons.
        assert_eq!(classify(ERR_USER | ERR_PRESENT, cow), FaultKind::Protection);
        // The error codes the self-test sees: RO write 0x7, supervisor read 0x5.
        assert_eq!(classify(0x7, PageInfo::default()), FaultKind::Protection);
        assert_eq!(classify(0x5, PageInfo::default()), FaultKind::Protection);
        assert_eq!(classify(0x7, REGION), FaultKind::Protection);
    }

    #[test]
    fn accesses_outside_every_region_are_invalid() {
        assert_eq!(classify(0x4, PageInfo::default()), FaultKind::Invalid);
        assert_eq!(classify(0x14, PageInfo::default()), FaultKind::Invalid);
        assert_eq!(classify(0x15, REGION), FaultKind::Protection);
    }
}
