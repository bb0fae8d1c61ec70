//! The bitmap mechanisms: `KVM_GET_DIRTY_LOG`, and `KVM_CLEAR_DIRTY_LOG`
//! with manual protect (KVM api.rst 4.8 and 4.118).
//!
//! Buffers are owned by the caller and reused, so a harvest allocates
//! nothing and costs what the ioctls cost.

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::dirty::DirtyError;

/// KVM's ioctl type (include/uapi/linux/kvm.h).
const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

fn last_error(what: &'static str) -> DirtyError {
    DirtyError::Kvm { what, source: std::io::Error::last_os_error() }
}

/// Turns on manual protect with the given flags (`MANUAL_PROTECT_ENABLE`,
/// optionally `INITIALLY_SET`).
///
/// # Errors
/// [`DirtyError::Kvm`].
pub fn enable_manual_protect(vm: &VmFd, flags: u64) -> Result<(), DirtyError> {
    let cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args: [flags, 0, 0, 0], ..Default::default() };
    vm.enable_cap(&cap).map_err(|e| DirtyError::Kvm { what: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", source: std::io::Error::from_raw_os_error(e.errno()) })
}

/// Reads slot `slot`'s dirty bitmap into `bitmap` (which must hold one bit
/// per page of the slot). Without manual protect this also re-protects the
/// slot and resets KVM's copy.
///
/// # Errors
/// [`DirtyError::Kvm`].
pub fn get(vm: &VmFd, slot: u32, bitmap: &mut [u64]) -> Result<(), DirtyError> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 { dirty_bitmap: bitmap.as_mut_ptr().cast() },
    };
    // SAFETY: KVM writes at most one bit per page of the slot into the
    // buffer, which the caller sized for the slot; `log` outlives the call.
    let rc = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if rc < 0 {
        return Err(last_error("KVM_GET_DIRTY_LOG"));
    }
    Ok(())
}

/// Re-protects the pages whose bits are set in `bitmap` (bit 0 = page
/// `first_page` of the slot), clearing them in KVM's bitmap.
///
/// `first_page` must be a multiple of 64 and `num_pages` either a multiple
/// of 64 or reach the end of the slot (api.rst, KVM_CLEAR_DIRTY_LOG).
///
/// # Errors
/// [`DirtyError::Kvm`].
pub fn clear(vm: &VmFd, slot: u32, first_page: u64, num_pages: u32, bitmap: &mut [u64]) -> Result<(), DirtyError> {
    let log = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 { dirty_bitmap: bitmap.as_mut_ptr().cast() },
    };
    // SAFETY: KVM reads `num_pages` bits from the buffer, which holds at
    // least that many (the caller's bitmap covers the slot).
    let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &log) };
    if rc < 0 {
        return Err(last_error("KVM_CLEAR_DIRTY_LOG"));
    }
    Ok(())
}

/// Re-arms every vCPU's harvested dirty-ring entries.
///
/// # Errors
/// [`DirtyError::Kvm`].
pub fn reset_rings(vm: &VmFd) -> Result<u64, DirtyError> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if rc < 0 {
        return Err(last_error("KVM_RESET_DIRTY_RINGS"));
    }
    Ok(rc as u64)
}
