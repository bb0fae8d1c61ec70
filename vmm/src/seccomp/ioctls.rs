//! KVM ioctl request numbers, for filters that allow `ioctl` by request.
//!
//! Computed as Linux's `_IO`/`_IOR`/`_IOW`/`_IOWR` do
//! (include/uapi/asm-generic/ioctl.h: direction in bits 30–31, argument
//! size in bits 16–29, type in 8–15, number in 0–7), with the numbers and
//! argument structs of include/uapi/linux/kvm.h (the same definitions
//! kvm-ioctls uses, whose own constants are private).

use kvm_bindings::{
    KVMIO, kvm_clear_dirty_log, kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_enable_cap, kvm_fpu, kvm_irq_level, kvm_irqchip, kvm_irqfd, kvm_lapic_state,
    kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation, kvm_userspace_memory_region, kvm_userspace_memory_region2,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

const NONE: u64 = 0;
const WRITE: u64 = 1;
const READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((KVMIO as u64) << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(NONE, nr, 0)
}
const fn ior<T>(nr: u64) -> u64 {
    ioc(READ, nr, size_of::<T>())
}
const fn iow<T>(nr: u64) -> u64 {
    ioc(WRITE, nr, size_of::<T>())
}
const fn iowr<T>(nr: u64) -> u64 {
    ioc(READ | WRITE, nr, size_of::<T>())
}

// /dev/kvm.
/// `KVM_GET_API_VERSION`.
pub const KVM_GET_API_VERSION: u64 = io(0x00);
/// `KVM_CREATE_VM`.
pub const KVM_CREATE_VM: u64 = io(0x01);
/// `KVM_GET_MSR_INDEX_LIST`.
pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr::<kvm_msr_list>(0x02);
/// `KVM_CHECK_EXTENSION` (also on VM fds).
pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
/// `KVM_GET_VCPU_MMAP_SIZE`.
pub const KVM_GET_VCPU_MMAP_SIZE: u64 = io(0x04);
/// `KVM_GET_SUPPORTED_CPUID`.
pub const KVM_GET_SUPPORTED_CPUID: u64 = iowr::<kvm_cpuid2>(0x05);
/// `KVM_GET_MSR_FEATURE_INDEX_LIST`.
pub const KVM_GET_MSR_FEATURE_INDEX_LIST: u64 = iowr::<kvm_msr_list>(0x0a);

// VM fds.
/// `KVM_CREATE_VCPU`.
pub const KVM_CREATE_VCPU: u64 = io(0x41);
/// `KVM_GET_DIRTY_LOG`.
pub const KVM_GET_DIRTY_LOG: u64 = iow::<kvm_dirty_log>(0x42);
/// `KVM_SET_USER_MEMORY_REGION`.
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);
/// `KVM_SET_TSS_ADDR`.
pub const KVM_SET_TSS_ADDR: u64 = io(0x47);
/// `KVM_SET_IDENTITY_MAP_ADDR`.
pub const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow::<u64>(0x48);
/// `KVM_SET_USER_MEMORY_REGION2`.
pub const KVM_SET_USER_MEMORY_REGION2: u64 = iow::<kvm_userspace_memory_region2>(0x49);
/// `KVM_CREATE_IRQCHIP`.
pub const KVM_CREATE_IRQCHIP: u64 = io(0x60);
/// `KVM_IRQ_LINE`.
pub const KVM_IRQ_LINE: u64 = iow::<kvm_irq_level>(0x61);
/// `KVM_GET_IRQCHIP`.
pub const KVM_GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
/// `KVM_SET_IRQCHIP`.
pub const KVM_SET_IRQCHIP: u64 = ior::<kvm_irqchip>(0x63);
/// `KVM_IRQFD`.
pub const KVM_IRQFD: u64 = iow::<kvm_irqfd>(0x76);
/// `KVM_CREATE_PIT2`.
pub const KVM_CREATE_PIT2: u64 = iow::<kvm_pit_config>(0x77);
/// `KVM_SET_CLOCK`.
pub const KVM_SET_CLOCK: u64 = iow::<kvm_clock_data>(0x7b);
/// `KVM_GET_CLOCK`.
pub const KVM_GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
/// `KVM_GET_PIT2`.
pub const KVM_GET_PIT2: u64 = ior::<kvm_pit_state2>(0x9f);
/// `KVM_SET_PIT2`.
pub const KVM_SET_PIT2: u64 = iow::<kvm_pit_state2>(0xa0);
/// `KVM_ENABLE_CAP` (VM and vCPU fds).
pub const KVM_ENABLE_CAP: u64 = iow::<kvm_enable_cap>(0xa3);
/// `KVM_CLEAR_DIRTY_LOG`.
pub const KVM_CLEAR_DIRTY_LOG: u64 = iowr::<kvm_clear_dirty_log>(0xc0);
/// `KVM_RESET_DIRTY_RINGS`.
pub const KVM_RESET_DIRTY_RINGS: u64 = io(0xc7);
/// `KVM_GET_STATS_FD` (VM and vCPU fds).
pub const KVM_GET_STATS_FD: u64 = io(0xce);

// vCPU fds.
/// `KVM_RUN`.
pub const KVM_RUN: u64 = io(0x80);
/// `KVM_GET_REGS`.
pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
/// `KVM_SET_REGS`.
pub const KVM_SET_REGS: u64 = iow::<kvm_regs>(0x82);
/// `KVM_GET_SREGS`.
pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
/// `KVM_SET_SREGS`.
pub const KVM_SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
/// `KVM_TRANSLATE`.
pub const KVM_TRANSLATE: u64 = iowr::<kvm_translation>(0x85);
/// `KVM_GET_MSRS`.
pub const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
/// `KVM_SET_MSRS`.
pub const KVM_SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
/// `KVM_GET_FPU`.
pub const KVM_GET_FPU: u64 = ior::<kvm_fpu>(0x8c);
/// `KVM_SET_FPU`.
pub const KVM_SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
/// `KVM_GET_LAPIC`.
pub const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
/// `KVM_SET_LAPIC`.
pub const KVM_SET_LAPIC: u64 = iow::<kvm_lapic_state>(0x8f);
/// `KVM_SET_CPUID2`.
pub const KVM_SET_CPUID2: u64 = iow::<kvm_cpuid2>(0x90);
/// `KVM_GET_CPUID2`.
pub const KVM_GET_CPUID2: u64 = iowr::<kvm_cpuid2>(0x91);
/// `KVM_GET_MP_STATE`.
pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
/// `KVM_SET_MP_STATE`.
pub const KVM_SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
/// `KVM_GET_VCPU_EVENTS`.
pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
/// `KVM_SET_VCPU_EVENTS`.
pub const KVM_SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
/// `KVM_GET_DEBUGREGS`.
pub const KVM_GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
/// `KVM_SET_DEBUGREGS`.
pub const KVM_SET_DEBUGREGS: u64 = iow::<kvm_debugregs>(0xa2);
/// `KVM_GET_TSC_KHZ`.
pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
/// `KVM_GET_XSAVE`.
pub const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
/// `KVM_SET_XSAVE`.
pub const KVM_SET_XSAVE: u64 = iow::<kvm_xsave>(0xa5);
/// `KVM_GET_XCRS`.
pub const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
/// `KVM_SET_XCRS`.
pub const KVM_SET_XCRS: u64 = iow::<kvm_xcrs>(0xa7);
/// `KVM_GET_XSAVE2`.
pub const KVM_GET_XSAVE2: u64 = ior::<kvm_xsave>(0xcf);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernels() {
        // From strace's decoding tables (and `_IO*` by hand).
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        assert_eq!(KVM_SET_CPUID2, 0x4008_ae90);
    }
}
