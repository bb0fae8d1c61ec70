//! A vCPU: its CPUID, its initial state for a PVH or a Linux 64-bit entry,
//! and its register dump. The values are built by pure functions in
//! [`crate::boot::cpu`] and [`crate::boot::long_mode`]; this file hands
//! them to KVM.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_UNINITIALIZED, Msrs, kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use serde::Serialize;

use crate::vm::{Vm, VmError};
use crate::x86::{CR0_ET, CR0_PE, RFLAGS_RESERVED};


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

/// Creates vCPU `id` of `count` with the CPUID KVM supports on this host,
/// with the leaves a VMM fixes ([`crate::boot::cpu::fix_cpuid`]: APIC id
/// `id`, the hypervisor bit, a topology of `count` cores, KVM's signature).
///
/// # Errors
/// [`VmError::Kvm`] when an ioctl fails.
pub fn create(vm: &Vm, id: u64, count: u32) -> Result<VcpuFd, VmError> {
    let supported: CpuId = vm.kvm().get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|source| VmError::Kvm { what: "KVM_GET_SUPPORTED_CPUID", source })?;
    let mut entries = supported.as_slice().to_vec();
    crate::boot::cpu::fix_cpuid(&mut entries, u32::try_from(id).unwrap_or(u32::MAX), count);
    if crate::host::detect().is_pvm() {
        crate::boot::cpu::hide_unemulated_features(&mut entries);
    }
    let cpuid = CpuId::from_entries(&entries).map_err(|_| VmError::Kvm { what: "KVM_SET_CPUID2 (too many CPUID entries)", source: kvm_ioctls::Error::new(libc::E2BIG) })?;
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

/// Creates vCPU `id` of `count` and puts it at `entry` in 32-bit protected
/// mode with paging off and `ebx = start_info` (PVH).
///
/// # Errors
/// [`VmError::Kvm`] when an ioctl fails.
pub fn create_pvh(vm: &Vm, id: u64, count: u32, entry: u64, start_info: u64) -> Result<VcpuFd, VmError> {
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let vcpu = create(vm, id, count)?;
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

    let regs = kvm_regs { rip: entry, rbx: start_info, rflags: RFLAGS_RESERVED, ..Default::default() };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(vcpu)
}

/// x87 control word and MXCSR at power-on (SDM Vol. 3A §9.1.1, Table 9-1:
/// FCW 0x037f, MXCSR 0x1f80).
const FPU_CONTROL_WORD: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Creates vCPU `id` of `count` and puts it at Linux's 64-bit entry `entry`
/// (boot.rst, "64-bit Boot Protocol"): long mode on the boot page tables and
/// GDT, `rsi` at the zero page, the FPU at its reset state, and the
/// platform state of every Linux vCPU ([`set_linux_platform`]). The VM
/// needs its in-kernel irqchip first ([`crate::boot::linux::prepare_vm`]).
///
/// # Errors
/// [`VmError::Kvm`] when an ioctl fails.
pub fn create_linux(vm: &Vm, id: u64, count: u32, entry: &crate::boot::linux::LinuxEntry) -> Result<VcpuFd, VmError> {
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let vcpu = create(vm, id, count)?;
    set_linux_platform(&vcpu)?;
    let sregs = crate::boot::long_mode::sregs(&vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?);
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&crate::boot::long_mode::regs(entry.rip, entry.zero_page)).map_err(kvm_err("KVM_SET_REGS"))?;
    let fpu = kvm_fpu { fcw: FPU_CONTROL_WORD, mxcsr: MXCSR_DEFAULT, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    Ok(vcpu)
}

/// Creates application processor `id` of `count` for a Linux guest: in its
/// reset state, waiting for the INIT and SIPI Linux sends it
/// (`KVM_MP_STATE_UNINITIALIZED`, which needs the in-kernel irqchip; KVM
/// api.rst, KVM_SET_MP_STATE), with the same platform state as vCPU 0
/// ([`set_linux_platform`]; INIT keeps the MSRs, as on hardware). Its
/// thread's `KVM_RUN` blocks in KVM until the SIPI, as Firecracker's APs do.
///
/// # Errors
/// [`VmError::Kvm`] when an ioctl fails.
pub fn create_linux_ap(vm: &Vm, id: u64, count: u32) -> Result<VcpuFd, VmError> {
    let vcpu = create(vm, id, count)?;
    set_linux_platform(&vcpu)?;
    vcpu.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_UNINITIALIZED }).map_err(|source| VmError::Kvm { what: "KVM_SET_MP_STATE", source })?;
    Ok(vcpu)
}

/// What every vCPU of a Linux guest gets before it runs: the boot MSRs
/// ([`crate::boot::cpu::boot_msrs`]) and the LAPIC's LINT0/LINT1 wired as
/// ExtINT/NMI ([`crate::boot::cpu::set_lint`]), as Firecracker does for
/// each of its vCPUs.
///
/// # Errors
/// [`VmError::Kvm`] when an ioctl fails.
fn set_linux_platform(vcpu: &VcpuFd) -> Result<(), VmError> {
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let wanted = crate::boot::cpu::boot_msrs();
    let msrs = Msrs::from_entries(&wanted).map_err(|_| VmError::Kvm { what: "KVM_SET_MSRS (too many MSRs)", source: kvm_ioctls::Error::new(libc::E2BIG) })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    // KVM stops at the first MSR it refuses; the rest are tried one by one
    // so that one refusal (this host's flavour may lack an MSR) does not
    // drop the others.
    for m in wanted.iter().skip(set) {
        let one = Msrs::from_entries(std::slice::from_ref(m)).map_err(|_| VmError::Kvm { what: "KVM_SET_MSRS", source: kvm_ioctls::Error::new(libc::E2BIG) })?;
        if vcpu.set_msrs(&one).map_err(kvm_err("KVM_SET_MSRS"))? != 1 {
            log::warn!("KVM refused boot MSR {:#x} = {:#x}; left at its reset value", m.index, m.data);
        }
    }
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    // SAFETY: `regs` is a plain `[c_char; 1024]`; viewing it as bytes of
    // the same length and alignment is sound.
    let regs = unsafe { std::slice::from_raw_parts_mut(lapic.regs.as_mut_ptr().cast::<u8>(), lapic.regs.len()) };
    crate::boot::cpu::set_lint(regs);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    Ok(())
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
