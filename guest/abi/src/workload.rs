//! Workloads the guest can run as ring-3 tasks, and how they are named.

use crate::Pod;

/// Which workload a [`WorkloadSpec`] asks for.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Only the self-test.
    None = 0,
}

impl WorkloadKind {
    /// Decodes a raw kind, `None` for unknown values.
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::None),
            _ => None,
        }
    }
}

/// A workload and its parameters, as written into the boot configuration.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// A [`WorkloadKind`] as `u32`.
    pub kind: u32,
    /// Workload-specific flags.
    pub flags: u32,
    /// Workload-specific parameters (documented with each kind).
    pub params: [u64; 7],
}
// SAFETY: repr(C), integer fields only, 64 bytes with no padding.
unsafe impl Pod for WorkloadSpec {}
