//! NUMA placement of guest RAM: policy (mbind(2)) and measurement
//! (move_pages(2) in query mode).
//!
//! The policy is applied to the empty mapping before anything touches it,
//! so every page is allocated where the policy says. The report never
//! trusts the policy: it asks the kernel where each resident page is.

use std::collections::BTreeMap;

use crate::config::NumaPolicy;
use crate::memory::MemoryError;
use crate::memory::backing::HostMapping;

/// `MPOL_*` modes (include/uapi/linux/mempolicy.h).
const MPOL_PREFERRED: libc::c_int = 1;
const MPOL_BIND: libc::c_int = 2;
const MPOL_INTERLEAVE: libc::c_int = 3;
/// Largest node number memvisor accepts (also the nodemask width).
pub const MAX_NODES: u32 = 1024;

/// The host's NUMA nodes, as listed under /sys/devices/system/node.
#[must_use]
pub fn host_nodes() -> Vec<u32> {
    let mut nodes: Vec<u32> = std::fs::read_dir("/sys/devices/system/node")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("node")).and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    if nodes.is_empty() {
        // Kernels without NUMA support still have node 0.
        nodes.push(0);
    }
    nodes.sort_unstable();
    nodes
}

/// Nodes this process may allocate on (`Mems_allowed_list` in
/// /proc/self/status; cpusets restrict it).
#[must_use]
pub fn allowed_nodes() -> Vec<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Mems_allowed_list:").map(|v| v.trim().to_string())))
        .and_then(|list| crate::config::parse_node_list(&list).ok())
        .unwrap_or_else(host_nodes)
}

/// Checks that every node exists and is allowed.
///
/// # Errors
/// [`MemoryError::NoSuchNode`] or [`MemoryError::NodeNotAllowed`].
pub fn check_nodes(nodes: &[u32]) -> Result<(), MemoryError> {
    check_nodes_against(nodes, &host_nodes(), &allowed_nodes())
}

/// [`check_nodes`] against given lists of the host's nodes and the allowed
/// ones (pure, so "not allowed" is testable on a host with one node).
///
/// # Errors
/// [`MemoryError::NoSuchNode`] or [`MemoryError::NodeNotAllowed`].
pub fn check_nodes_against(nodes: &[u32], host: &[u32], allowed: &[u32]) -> Result<(), MemoryError> {
    for &n in nodes {
        if !host.contains(&n) {
            return Err(MemoryError::NoSuchNode { node: n, host: host.to_vec() });
        }
        if !allowed.contains(&n) {
            return Err(MemoryError::NodeNotAllowed { node: n, allowed: allowed.to_vec() });
        }
    }
    Ok(())
}

/// A nodemask as mbind(2) wants it: bit `n` of word `n / 64`.
#[must_use]
pub fn nodemask(nodes: &[u32]) -> Vec<libc::c_ulong> {
    let mut mask = vec![0 as libc::c_ulong; (MAX_NODES / 64) as usize];
    for &n in nodes {
        if n < MAX_NODES {
            mask[(n / 64) as usize] |= 1 << (n % 64);
        }
    }
    mask
}

/// Applies `policy` over `nodes` to the whole of `mapping`.
///
/// # Errors
/// [`MemoryError::Mbind`] when the kernel refuses.
pub fn bind(mapping: &HostMapping, policy: NumaPolicy, nodes: &[u32]) -> Result<(), MemoryError> {
    let (addr, len) = (mapping.as_ptr(), mapping.size());
    let mode = match policy {
        NumaPolicy::Bind => MPOL_BIND,
        NumaPolicy::Preferred => MPOL_PREFERRED,
        NumaPolicy::Interleave => MPOL_INTERLEAVE,
    };
    let mask = nodemask(nodes);
    // maxnode counts bits; the kernel reads maxnode - 1 of them (mbind(2) BUGS).
    let maxnode = libc::c_ulong::from(MAX_NODES) + 1;
    // SAFETY: mbind only changes the policy of our own mapping; the mask
    // outlives the call and holds MAX_NODES bits.
    let rc = unsafe { libc::syscall(libc::SYS_mbind, addr, len, mode, mask.as_ptr(), maxnode, 0u32) };
    if rc != 0 {
        return Err(MemoryError::Mbind { policy, nodes: nodes.to_vec(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Where a range's pages are, as measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodePlacement {
    /// Bytes resident on each node.
    pub bytes_per_node: BTreeMap<u32, u64>,
    /// Bytes sampled that were not resident.
    pub not_resident: u64,
}

/// Measures the node of each resident page of `mapping`, one query per
/// `step` bytes (the host page size of the backing), with move_pages(2) in
/// query mode (`nodes == NULL`).
///
/// # Errors
/// [`MemoryError::MovePages`] when the syscall itself fails.
pub fn measure(mapping: &HostMapping, step: usize) -> Result<NodePlacement, MemoryError> {
    let (addr, len) = (mapping.as_ptr(), mapping.size());
    const BATCH: usize = 4096;
    let mut placement = NodePlacement::default();
    let pages = len / step;
    let mut ptrs: Vec<*mut libc::c_void> = Vec::with_capacity(BATCH);
    let mut status: Vec<libc::c_int> = vec![0; BATCH];
    let mut done = 0;
    while done < pages {
        let n = BATCH.min(pages - done);
        ptrs.clear();
        // Addresses only; nothing is dereferenced here.
        ptrs.extend((done..done + n).map(|i| addr.wrapping_add(i * step).cast::<libc::c_void>()));
        // SAFETY: query mode (nodes NULL) only reads page state of our own
        // process; `ptrs` and `status` hold `n` entries.
        let rc = unsafe {
            libc::syscall(libc::SYS_move_pages, 0, n as libc::c_ulong, ptrs.as_ptr(), std::ptr::null::<libc::c_int>(), status.as_mut_ptr(), 0)
        };
        if rc < 0 {
            return Err(MemoryError::MovePages(std::io::Error::last_os_error()));
        }
        for &s in &status[..n] {
            if s >= 0 {
                *placement.bytes_per_node.entry(s as u32).or_default() += step as u64;
            } else {
                placement.not_resident += step as u64;
            }
        }
        done += n;
    }
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodemask_sets_the_right_bits() {
        let m = nodemask(&[0, 3, 65]);
        assert_eq!(m[0], 0b1001);
        assert_eq!(m[1], 0b10);
        assert_eq!(m.len(), 16);
    }

    #[test]
    fn node_zero_exists_and_node_4000_does_not() {
        assert!(host_nodes().contains(&0));
        assert!(check_nodes(&[0]).is_ok());
        assert!(matches!(check_nodes(&[999]), Err(MemoryError::NoSuchNode { .. })));
    }

    #[test]
    fn a_node_outside_the_allowed_set_is_refused() {
        assert!(check_nodes_against(&[0, 1], &[0, 1], &[0, 1]).is_ok());
        assert!(matches!(check_nodes_against(&[1], &[0, 1], &[0]), Err(MemoryError::NodeNotAllowed { node: 1, .. })));
        assert!(matches!(check_nodes_against(&[2], &[0, 1], &[0]), Err(MemoryError::NoSuchNode { node: 2, .. })));
    }

    #[test]
    fn measured_placement_counts_touched_pages() {
        let len = 64 * 4096;
        let m = HostMapping::new(crate::config::Backing::Anon, len as u64).unwrap();
        bind(&m, NumaPolicy::Bind, &[0]).unwrap();
        for i in 0..16 {
            // SAFETY: inside our own mapping.
            unsafe { m.as_ptr().add(i * 4096).write(1) };
        }
        let p = measure(&m, 4096).unwrap();
        assert_eq!(p.bytes_per_node.get(&0), Some(&(16 * 4096)));
        assert_eq!(p.not_resident, 48 * 4096);
    }
}
