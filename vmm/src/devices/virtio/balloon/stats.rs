//! The guest's memory statistics from the stats queue (virtio 1.2
//! §5.5.6.3): packed `u16` tag + `u64` value entries, little endian.

use serde::{Deserialize, Serialize};

use memvisor_abi::virtio::stat;

/// Statistics as the guest last reported them; absent tags stay `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    pub disk_caches: Option<u64>,
    /// Huge page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Failed huge page allocations.
    pub hugetlb_failures: Option<u64>,
    /// Entries with a tag this device does not know (ignored).
    pub unknown_tags: u64,
}

/// Most statistics entries read from one buffer (there are ten tags; a
/// longer buffer is read only this far).
pub const MAX_ENTRIES: usize = 64;

impl GuestStats {
    /// Parses a stats buffer; a trailing partial entry is ignored.
    #[must_use]
    pub fn parse(bytes: &[u8]) -> Self {
        let mut s = GuestStats::default();
        for e in bytes.chunks_exact(stat::ENTRY_SIZE).take(MAX_ENTRIES) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            let value = Some(u64::from_le_bytes(v));
            match tag {
                stat::SWAP_IN => s.swap_in = value,
                stat::SWAP_OUT => s.swap_out = value,
                stat::MAJFLT => s.major_faults = value,
                stat::MINFLT => s.minor_faults = value,
                stat::MEMFREE => s.free_memory = value,
                stat::MEMTOT => s.total_memory = value,
                stat::AVAIL => s.available_memory = value,
                stat::CACHES => s.disk_caches = value,
                stat::HTLB_PGALLOC => s.hugetlb_allocations = value,
                stat::HTLB_PGFAIL => s.hugetlb_failures = value,
                _ => s.unknown_tags += 1,
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, v: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&v.to_le_bytes());
        e
    }

    #[test]
    fn packed_entries_parse_and_unknown_tags_are_counted() {
        let mut b = entry(stat::MEMFREE, 100);
        b.extend(entry(stat::MEMTOT, 200));
        b.extend(entry(77, 1));
        b.extend([1, 2, 3]);
        let s = GuestStats::parse(&b);
        assert_eq!((s.free_memory, s.total_memory, s.unknown_tags), (Some(100), Some(200), 1));
        assert_eq!(s.major_faults, None);
    }
}
