//! Dirty-page tracking: which guest pages were written since the last look.
//!
//! Three harvest mechanisms, best first:
//! - [`DirtyMode::Ring`]: per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`):
//!   the guest's writes arrive as a list of (slot, page) entries; harvest
//!   cost follows the number of dirty pages, not the size of RAM.
//! - [`DirtyMode::Clear`]: the bitmap with manual protect
//!   (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): `KVM_GET_DIRTY_LOG` only reads,
//!   `KVM_CLEAR_DIRTY_LOG` re-protects exactly the pages harvested.
//! - [`DirtyMode::Bitmap`]: plain `KVM_GET_DIRTY_LOG`, which reads and
//!   re-protects the whole slot in one call.
//!
//! Pages the VMM itself writes through vm-memory are tracked by vm-memory's
//! `AtomicBitmap` and merged in (`memory::vmm_writes`), so nothing written is ever
//! missed. This module owns the mechanisms and the per-slot bitmaps; the run
//! loop decides when to harvest.

pub mod caps;
pub mod key_buckets;
pub mod log;
pub mod prefetch;
pub mod ranges;
pub mod ring;
pub mod ring_pages;
pub mod rounds;
pub mod tracker;

use thiserror::Error;

pub use crate::config::DirtyMode;

pub use caps::DirtyCaps;
pub use ranges::PageRange;
pub use tracker::{DirtyTracker, Harvest};

/// Errors of dirty tracking.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// A forced mode the kernel does not offer.
    #[error("dirty mode {mode} is not available on this kernel: {why}")]
    Unavailable {
        /// The mode asked for.
        mode: DirtyMode,
        /// What is missing.
        why: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mapping a dirty ring failed.
    #[error("cannot map the dirty ring of vCPU {vcpu}")]
    MapRing {
        /// The vCPU.
        vcpu: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A dirty ring stays full although it was harvested: KVM pushed past
    /// its end (seen on the PVM flavour when guest code at CPL0, which it
    /// emulates, dirties many pages between two checks) and can no longer
    /// reset it, so the vCPU cannot run.
    #[error("the dirty ring of a vCPU is stuck full (KVM overran it); run with --dirty-mode clear")]
    RingStuck,
    /// A memslot number that does not exist.
    #[error("no memslot {0}")]
    NoSuchSlot(u32),
    /// Memslot update failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

/// Prepares dirty tracking for a run of `config` when anything may need
/// it: a forced mode, a dirty workload, or a VM that stays up to serve a
/// control socket (snapshots). Must run before any vCPU exists (the dirty
/// ring can only be enabled then).
///
/// # Errors
/// [`DirtyError`] when the forced mode is missing or KVM refuses.
pub fn prepare(config: &crate::config::VmConfig, vm: &kvm_ioctls::VmFd, ram: &crate::memory::GuestRam, stay_up: bool) -> Result<Option<DirtyTracker>, DirtyError> {
    let dirty_workload = matches!(config.workload, Some(crate::workload::Workload::Dirty(_)));
    if config.dirty_mode.is_none() && !stay_up && !dirty_workload {
        return Ok(None);
    }
    DirtyTracker::prepare(vm, ram, config.dirty_mode).map(Some)
}

/// Chooses the mode: the forced one if the kernel offers it, else the best
/// one it offers. On KVM's PVM flavour the ring is chosen only when forced:
/// its instruction emulator can push more entries than a ring holds before
/// the vCPU stops, and an overrun ring never drains again (see
/// [`DirtyError::RingStuck`]); bitmap harvests with manual protect have no
/// such failure.
///
/// # Errors
/// [`DirtyError::Unavailable`] when a forced mode is missing.
pub fn choose_mode(caps: &DirtyCaps, forced: Option<DirtyMode>, pvm: bool) -> Result<DirtyMode, DirtyError> {
    match forced {
        Some(mode) => caps.check(mode).map(|()| mode),
        None => Ok(DirtyMode::ALL
            .iter()
            .copied()
            .filter(|m| !(pvm && *m == DirtyMode::Ring))
            .find(|m| caps.check(*m).is_ok())
            .unwrap_or(DirtyMode::Bitmap)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_available_mode_is_chosen() {
        let all = DirtyCaps { manual_protect: 3, ring_bytes: 1 << 20, ring_acq_rel: true, ring_with_bitmap: false };
        assert_eq!(choose_mode(&all, None, false).unwrap(), DirtyMode::Ring);
        assert_eq!(choose_mode(&all, None, true).unwrap(), DirtyMode::Clear, "no ring by default on PVM");
        assert_eq!(choose_mode(&all, Some(DirtyMode::Ring), true).unwrap(), DirtyMode::Ring);
        let no_ring = DirtyCaps { ring_bytes: 0, ring_acq_rel: false, ..all };
        assert_eq!(choose_mode(&no_ring, None, false).unwrap(), DirtyMode::Clear);
        let old = DirtyCaps { manual_protect: 0, ..no_ring };
        assert_eq!(choose_mode(&old, None, false).unwrap(), DirtyMode::Bitmap);
    }

    #[test]
    fn a_forced_mode_the_kernel_lacks_fails_clearly() {
        let old = DirtyCaps::default();
        let e = choose_mode(&old, Some(DirtyMode::Ring), false).unwrap_err();
        assert!(e.to_string().contains("ring"), "{e}");
        assert!(choose_mode(&old, Some(DirtyMode::Clear), false).is_err());
        assert_eq!(choose_mode(&old, Some(DirtyMode::Bitmap), false).unwrap(), DirtyMode::Bitmap);
    }
}
