//! The in-kernel interrupt controllers' state, for VMs that have them
//! (KVM_CREATE_IRQCHIP: today those with a virtio device): the two 8259
//! PICs and the IOAPIC (KVM_GET_IRQCHIP / KVM_SET_IRQCHIP, chip ids 0, 1
//! and 2 in KVM api.rst). Each vCPU's LAPIC is saved with the vCPU
//! ([`super::vcpu_state::VcpuState::lapic`]). memvisor creates no in-kernel
//! PIT (KVM_CREATE_PIT2), so there is no PIT state to save.

use kvm_bindings::kvm_irqchip;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{SnapshotError, kvm_err};

/// `kvm_irqchip.chip_id` values (KVM api.rst, KVM_GET_IRQCHIP):
/// `KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE`, `KVM_IRQCHIP_IOAPIC`.
const CHIP_IDS: [u32; 3] = [kvm_bindings::KVM_IRQCHIP_PIC_MASTER, kvm_bindings::KVM_IRQCHIP_PIC_SLAVE, kvm_bindings::KVM_IRQCHIP_IOAPIC];

/// The PICs' and the IOAPIC's state.
#[derive(Serialize, Deserialize)]
pub struct IrqchipState {
    /// One `kvm_irqchip` per chip id, in [`CHIP_IDS`] order (serialised
    /// by kvm-bindings, as its bytes).
    pub chips: Vec<kvm_irqchip>,
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqchipState").field("chips", &self.chips.iter().map(|c| c.chip_id).collect::<Vec<_>>()).finish()
    }
}

impl IrqchipState {
    /// Reads every chip of a VM that has an in-kernel irqchip.
    ///
    /// # Errors
    /// [`SnapshotError::Kvm`].
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        let mut chips = Vec::with_capacity(CHIP_IDS.len());
        for chip_id in CHIP_IDS {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            chips.push(chip);
        }
        Ok(IrqchipState { chips })
    }

    /// Writes the chips into a VM whose irqchip was just created.
    ///
    /// # Errors
    /// [`SnapshotError::Corrupt`] for an unknown chip id;
    /// [`SnapshotError::Kvm`] when KVM refuses the state.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        for chip in &self.chips {
            if !CHIP_IDS.contains(&chip.chip_id) {
                return Err(SnapshotError::Corrupt(format!("unknown interrupt controller id {}", chip.chip_id)));
            }
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::vcpu_state::VcpuState;

    /// LAPIC task-priority register offset (Intel SDM Vol. 3A, Table 11-1:
    /// TPR at 0xFEE0_0080).
    const APIC_TPR: usize = 0x80;

    /// IOAPIC redirection entry 3, with its mask bit (bit 16) clear and
    /// vector 0x43 (the entry's low 8 bits).
    const REDIRECT: u64 = 0x43;

    fn ioapic_entry(chip: &kvm_irqchip, pin: usize) -> u64 {
        // SAFETY: chip_id is the IOAPIC, so the union holds its state.
        unsafe { chip.chip.ioapic.redirtbl[pin].bits }
    }

    #[test]
    fn lapic_and_irqchip_state_survive_a_save_and_restore() {
        let kvm = crate::vm::open_kvm().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        lapic.regs[APIC_TPR] = 0x20;
        vcpu.set_lapic(&lapic).unwrap();
        let mut ioapic = kvm_irqchip { chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC, ..Default::default() };
        vm.get_irqchip(&mut ioapic).unwrap();
        // SAFETY: as in ioapic_entry.
        unsafe { ioapic.chip.ioapic.redirtbl[3].bits = REDIRECT };
        vm.set_irqchip(&ioapic).unwrap();

        let vcpu_state = VcpuState::save(&kvm, &vcpu, true).unwrap();
        let chips = IrqchipState::save(&vm).unwrap();
        // Through the snapshot's JSON, as a restore reads it.
        let vcpu_state: VcpuState = serde_json::from_str(&serde_json::to_string(&vcpu_state).unwrap()).unwrap();
        let chips: IrqchipState = serde_json::from_str(&serde_json::to_string(&chips).unwrap()).unwrap();

        let vm2 = kvm.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        let vcpu2 = vm2.create_vcpu(0).unwrap();
        chips.restore(&vm2).unwrap();
        vcpu_state.restore(&vcpu2).unwrap();
        assert_eq!(vcpu2.get_lapic().unwrap().regs[APIC_TPR], 0x20, "the LAPIC came back");
        let mut back = kvm_irqchip { chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC, ..Default::default() };
        vm2.get_irqchip(&mut back).unwrap();
        assert_eq!(ioapic_entry(&back, 3), REDIRECT, "the IOAPIC came back");
    }

    #[test]
    fn a_vm_without_an_irqchip_saves_no_lapic() {
        let kvm = crate::vm::open_kvm().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        assert!(VcpuState::save(&kvm, &vcpu, false).unwrap().lapic.is_none());
    }

    #[test]
    fn an_unknown_chip_id_is_refused() {
        let kvm = crate::vm::open_kvm().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let state = IrqchipState { chips: vec![kvm_irqchip { chip_id: 7, ..Default::default() }] };
        assert!(matches!(state.restore(&vm), Err(SnapshotError::Corrupt(_))));
    }
}
