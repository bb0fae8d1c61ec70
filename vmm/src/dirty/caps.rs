//! What dirty-logging features the kernel offers (KVM_CHECK_EXTENSION).

use kvm_bindings::{KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_ioctls::VmFd;
use serde::Serialize;

use crate::dirty::{DirtyError, DirtyMode};

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` (KVM api.rst, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
pub const MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_DIRTY_LOG_INITIALLY_SET`: logging starts with every bit set and
/// pages are write-protected only when cleared, so huge pages are not split
/// up front.
pub const INITIALLY_SET: u64 = 2;

/// The kernel's dirty-logging capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirtyCaps {
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: the supported flags (0: none).
    pub manual_protect: u64,
    /// KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]: the largest ring in bytes (0: none).
    pub ring_bytes: u64,
    /// Whether the ring is offered with acquire/release ordering.
    pub ring_acq_rel: bool,
    /// KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP.
    pub ring_with_bitmap: bool,
}

impl DirtyCaps {
    /// Asks KVM (on the VM fd, as api.rst recommends for these caps).
    #[must_use]
    pub fn probe(vm: &VmFd) -> Self {
        let cap = |c: u32| u64::try_from(vm.check_extension_raw(u64::from(c))).unwrap_or(0);
        let acq_rel = cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
        let plain = cap(KVM_CAP_DIRTY_LOG_RING);
        DirtyCaps {
            manual_protect: cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            ring_bytes: acq_rel.max(plain),
            ring_acq_rel: acq_rel > 0,
            ring_with_bitmap: cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) > 0,
        }
    }

    /// Whether `mode` can be used.
    ///
    /// # Errors
    /// [`DirtyError::Unavailable`] saying what is missing.
    pub fn check(&self, mode: DirtyMode) -> Result<(), DirtyError> {
        match mode {
            DirtyMode::Bitmap => Ok(()),
            DirtyMode::Clear if self.manual_protect & MANUAL_PROTECT_ENABLE != 0 => Ok(()),
            DirtyMode::Clear => Err(DirtyError::Unavailable { mode, why: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not offered" }),
            DirtyMode::Ring if self.ring_bytes > 0 => Ok(()),
            DirtyMode::Ring => Err(DirtyError::Unavailable { mode, why: "KVM_CAP_DIRTY_LOG_RING is not offered" }),
        }
    }
}
