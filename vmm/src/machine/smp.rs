//! Starting the guest's application processors (`memvisor_abi::smp`): the
//! request is read and checked on the thread of the CPU that wrote the
//! port, the AP's entry state is built from that CPU's registers, and the
//! AP's own thread applies it before its next `KVM_RUN`.

use kvm_bindings::{KVM_MP_STATE_RUNNABLE, kvm_mp_state, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use memvisor_abi::Pod as _;
use memvisor_abi::smp::{AP_START_OK, ApStart, ApStartError};

use super::{Machine, VmmError};
use crate::vm::VmError;

/// RFLAGS bit 1 is reserved and reads as one (SDM Vol. 1 §3.4.3).
const RFLAGS_RESERVED: u64 = 0x2;

/// The state an AP starts in.
#[derive(Debug, Clone)]
pub struct ApState {
    regs: kvm_regs,
    sregs: kvm_sregs,
}

impl ApState {
    /// Puts `vcpu` in this state and makes it runnable (with the in-kernel
    /// irqchip an AP waits for INIT/SIPI otherwise; KVM api.rst,
    /// KVM_SET_MP_STATE).
    ///
    /// # Errors
    /// [`VmmError::Vm`] when KVM refuses.
    pub fn apply(&self, vcpu: &VcpuFd) -> Result<(), VmmError> {
        let kvm = |what| move |source| VmmError::Vm(VmError::Kvm { what, source });
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

/// The entry state of the AP `req` names, started by a CPU in `starter`'s
/// state: its control, segment and descriptor-table registers, with the
/// request's page tables (the AP loads its own GDT and TSS once running).
#[must_use]
pub fn entry_state(req: &ApStart, starter: &kvm_sregs) -> ApState {
    let sregs = kvm_sregs { cr3: req.cr3, ..*starter };
    let regs = kvm_regs { rip: req.rip, rsp: req.rsp, rdi: req.arg, rsi: u64::from(req.cpu), rflags: RFLAGS_RESERVED, ..Default::default() };
    ApState { regs, sregs }
}

/// Handles vCPU `from`'s request at `gpa`: checks it, queues the AP's
/// state, and writes the status back. Returns the AP's index to kick.
///
/// # Errors
/// Why the request was refused (the guest reads the status).
pub fn request(m: &mut Machine, from: usize, vcpu: &VcpuFd, gpa: u64) -> Result<usize, String> {
    let mem = m.vm.ram().memory();
    let mut bytes = [0u8; size_of::<ApStart>()];
    mem.read_slice(&mut bytes, GuestAddress(gpa)).map_err(|_| format!("the block at {gpa:#x} is not in guest RAM"))?;
    let req = ApStart::from_bytes(&bytes).ok_or("short block")?;
    let refuse = |m: &Machine, e: ApStartError, why: String| {
        // The status field follows `cpu` (offset 4).
        let _ = m.vm.ram().memory().write_obj(e as u32, GuestAddress(gpa + 4));
        Err(why)
    };
    let cpu = req.cpu as usize;
    if cpu == 0 || cpu == from || cpu >= m.ap_starts.len() {
        return refuse(m, ApStartError::NoSuchCpu, format!("no application processor {cpu} (vCPUs: {})", m.ap_starts.len()));
    }
    if req.check().is_err() {
        return refuse(m, ApStartError::BadState, format!("entry {:#x}, stack {:#x} or page tables {:#x} invalid", req.rip, req.rsp, req.cr3));
    }
    if m.started_aps.get(cpu).copied().unwrap_or(true) {
        return refuse(m, ApStartError::AlreadyStarted, format!("CPU {cpu} was started already"));
    }
    let starter = vcpu.get_sregs().map_err(|e| format!("cannot read the starting CPU's registers: {e}"))?;
    m.ap_starts[cpu] = Some(entry_state(&req, &starter));
    m.started_aps[cpu] = true;
    let _ = m.vm.ram().memory().write_obj(AP_START_OK, GuestAddress(gpa + 4));
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ap_starts_in_its_starters_mode_at_its_own_entry() {
        let starter = kvm_sregs { cr0: 0x8000_0011, cr3: 0x5000, cr4: 0x20, efer: 0xd00, ..Default::default() };
        let req = ApStart { cpu: 2, rip: 0xffff_8000_0010_0000, rsp: 0x30_0000, arg: 0x7000, cr3: 0x9000, ..ApStart::default() };
        let s = entry_state(&req, &starter);
        assert_eq!((s.sregs.cr0, s.sregs.cr4, s.sregs.efer), (0x8000_0011, 0x20, 0xd00));
        assert_eq!(s.sregs.cr3, 0x9000, "the request's page tables");
        assert_eq!((s.regs.rip, s.regs.rsp, s.regs.rdi, s.regs.rsi), (req.rip, req.rsp, 0x7000, 2));
        assert_eq!(s.regs.rflags, 2);
    }
}
