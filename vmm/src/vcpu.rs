//! A vCPU: its initial state for a PVH entry, and its register dump.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use serde::Serialize;

use crate::vm::{Vm, VmError};

/// CR0.PE and CR0.ET (SDM Vol. 3A §2.5).
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;

/// A flat 32-bit segment as the PVH ABI requires at entry: base 0, limit
/// 4 GiB, present, DPL 0 (SDM Vol. 3A §3.4.5).
fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Creates vCPU `id` with the CPUID KVM supports on this host.
///
/// # Errors
/// [`VmError::Kvm`] when an ioctl fails.
pub fn create(vm: &Vm, id: u64) -> Result<VcpuFd, VmError> {
    let cpuid: CpuId = vm.kvm().get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|source| VmError::Kvm { what: "KVM_GET_SUPPORTED_CPUID", source })?;
    create_with_cpuid(vm, id, &cpuid)
}

/// Creates vCPU `id` with the given CPUID (a restore passes the one the
/// snapshotted vCPU had).
///
/// # Errors
/// [`VmError::Kvm`] when an ioctl fails.
pub fn create_with_cpuid(vm: &Vm, id: u64, cpuid: &CpuId) -> Result<VcpuFd, VmError> {
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let vcpu = vm.fd().create_vcpu(id).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// Creates vCPU `id` and puts it at `entry` in 32-bit protected mode with
/// paging off and `ebx = start_info` (PVH).
///
/// # Errors
/// [`VmError::Kvm`] when an ioctl fails.
pub fn create_pvh(vm: &Vm, id: u64, entry: u64, start_info: u64) -> Result<VcpuFd, VmError> {
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let vcpu = create(vm, id)?;
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cs = flat_segment(0x08, 0xb); // execute/read, accessed
    let data = flat_segment(0x10, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;

    let regs = kvm_regs { rip: entry, rbx: start_info, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(vcpu)
}

/// The registers worth printing when a guest dies.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegisterDump {
    /// General-purpose registers by name.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags.
    pub rflags: u64,
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp.
    pub gprs: [u64; 7],
    /// Control registers.
    pub cr0: u64,
    /// Page-fault address.
    pub cr2: u64,
    /// Page-table root.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// Code segment selector (its low bits are the CPL).
    pub cs: u16,
}

impl RegisterDump {
    /// Reads the vCPU's registers; zeros where KVM refuses.
    #[must_use]
    pub fn read(vcpu: &VcpuFd) -> Self {
        let r = vcpu.get_regs().unwrap_or_default();
        let s = vcpu.get_sregs().unwrap_or_default();
        RegisterDump {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            gprs: [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp],
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs: s.cs.selector,
        }
    }
}

impl std::fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.gprs;
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} \
             cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip, self.rsp, self.rflags, self.cs, g[0], g[1], g[2], g[3], g[4], g[5], g[6], self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )
    }
}
