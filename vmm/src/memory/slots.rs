//! KVM memslots: the only code that calls `set_user_memory_region`.
//!
//! Each RAM region becomes one slot, numbered in guest-physical order, so
//! KVM builds the second dimension of translation over it (EPT on Intel,
//! NPT on AMD, shadow page tables where neither exists).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use crate::memory::{GuestRam, MemoryError};

/// `KVM_MEM_LOG_DIRTY_PAGES` (KVM api.rst, 4.35 KVM_SET_USER_MEMORY_REGION).
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;

/// Registers every RAM region as a memslot with `flags`.
///
/// # Errors
/// [`MemoryError::SetMemslot`] when KVM refuses one.
pub fn register(vm: &VmFd, ram: &GuestRam, flags: u32) -> Result<(), MemoryError> {
    register_only(vm, ram, flags, None)
}

/// Re-registers memslot `slot` alone with `flags` (e.g. to switch dirty
/// logging for one region at run time); an unknown slot is ignored.
///
/// # Errors
/// [`MemoryError::SetMemslot`] when KVM refuses.
pub fn register_one(vm: &VmFd, ram: &GuestRam, slot: u32, flags: u32) -> Result<(), MemoryError> {
    register_only(vm, ram, flags, Some(slot))
}

fn register_only(vm: &VmFd, ram: &GuestRam, flags: u32, only: Option<u32>) -> Result<(), MemoryError> {
    for (slot, region) in ram.regions().iter().enumerate() {
        let slot = u32::try_from(slot).expect("fewer than 2^32 regions");
        if only.is_some_and(|o| o != slot) {
            continue;
        }
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.range.start.0,
            memory_size: region.range.size,
            userspace_addr: region.mapping.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `ram`, which the
        // caller keeps alive as long as the VM (Vm owns both, and drops the
        // VM fd first); slots never overlap because the layout's ranges do not.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::SetMemslot { slot, guest_addr: desc.guest_phys_addr, source })?;
    }
    Ok(())
}
