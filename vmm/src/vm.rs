//! The KVM VM: opening /dev/kvm, creating the VM and its memory.
//!
//! One file per KVM object, as in Firecracker's `vstate/`: this one owns the
//! `Kvm` and `VmFd` handles and registers guest RAM; vCPUs are in
//! [`crate::vcpu`].

use std::path::PathBuf;

use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::layout::abi;
use crate::memory::{GuestRam, MemoryError, slots};

/// Errors creating the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm, or enable nested virtualisation)")]
    KvmMissing,
    /// /dev/kvm exists but may not be opened.
    #[error("no permission to open {0}: run as root or add your user to the kvm group")]
    KvmPermission(PathBuf),
    /// Opening /dev/kvm failed otherwise.
    #[error("cannot open {path}")]
    OpenKvm {
        /// The device path.
        path: PathBuf,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM refused {what}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// More vCPUs than this host's KVM runs in one VM.
    #[error("{asked} vCPUs asked for, but this host's KVM runs at most {max} in a VM (KVM_CAP_MAX_VCPUS)")]
    TooManyVcpus {
        /// vCPUs asked for.
        asked: u32,
        /// KVM's limit.
        max: usize,
    },
}

/// Checks that `kvm` runs `vcpus` vCPUs in one VM.
///
/// # Errors
/// [`VmError::TooManyVcpus`].
pub fn check_vcpus(kvm: &Kvm, vcpus: u32) -> Result<(), VmError> {
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(VmError::TooManyVcpus { asked: vcpus, max });
    }
    Ok(())
}

/// Path of the KVM device; `MEMVISOR_KVM_DEVICE` overrides it (tests use this
/// to check the error messages for a missing or forbidden device).
#[must_use]
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os("MEMVISOR_KVM_DEVICE").map_or_else(|| PathBuf::from("/dev/kvm"), PathBuf::from)
}

/// Opens the KVM device with a message that says what is wrong.
///
/// # Errors
/// [`VmError::KvmMissing`], [`VmError::KvmPermission`] or [`VmError::OpenKvm`].
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = kvm_device_path();
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| VmError::KvmMissing)?;
    Kvm::new_with_path(cpath).map_err(|source| match source.errno() {
        libc::ENOENT => VmError::KvmMissing,
        libc::EACCES | libc::EPERM => VmError::KvmPermission(path.clone()),
        _ => VmError::OpenKvm { path: path.clone(), source },
    })
}

/// Creates a VM fd, with the addresses Intel hosts need set.
///
/// # Errors
/// [`VmError::Kvm`] when KVM refuses.
pub fn create_vm_fd(kvm: &Kvm) -> Result<VmFd, VmError> {
    let fd = kvm.create_vm().map_err(|source| VmError::Kvm { what: "KVM_CREATE_VM", source })?;
    // Intel hosts without unrestricted guest need these for real-mode
    // emulation (KVM api.rst, KVM_SET_TSS_ADDR). Other flavours (AMD,
    // PVM) ignore or refuse them; that is harmless for a PVH boot,
    // which never enters real mode.
    if let Err(e) = fd.set_identity_map_address(abi::KVM_IDENTITY_MAP) {
        log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
    }
    if let Err(e) = fd.set_tss_address(abi::KVM_TSS as usize) {
        log::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    Ok(fd)
}

/// A KVM VM with its guest RAM registered.
#[derive(Debug)]
pub struct Vm {
    /// The VM fd. Dropped before `ram` (field order), so KVM stops using the
    /// memory before it is unmapped.
    fd: VmFd,
    /// The system fd.
    kvm: Kvm,
    /// Guest RAM.
    ram: GuestRam,
    /// Whether [`Vm::create_irqchip`] ran (snapshots then save its state).
    irqchip: std::sync::atomic::AtomicBool,
}

impl Vm {
    /// Creates the VM and registers `ram` as its memslots.
    ///
    /// # Errors
    /// [`VmError`] when KVM refuses.
    pub fn new(kvm: Kvm, ram: GuestRam) -> Result<Self, VmError> {
        let fd = create_vm_fd(&kvm)?;
        let vm = Self::from_parts(kvm, fd, ram);
        vm.register_memslots()?;
        Ok(vm)
    }

    /// A VM from a VM fd made by [`create_vm_fd`] and its RAM, not yet
    /// registered: a restore creates the fd on a second thread while it
    /// reads the snapshot, then registers the memslots there
    /// ([`crate::restore`]). KVM allows vCPUs and memslots in either order
    /// (memory hotplug adds slots to running VMs; KVM api.rst, 4.35
    /// KVM_SET_USER_MEMORY_REGION).
    #[must_use]
    pub fn from_parts(kvm: Kvm, fd: VmFd, ram: GuestRam) -> Self {
        Vm { fd, kvm, ram, irqchip: std::sync::atomic::AtomicBool::new(false) }
    }

    /// Registers guest RAM as the VM's memslots (see [`Vm::from_parts`]).
    ///
    /// # Errors
    /// [`VmError::Memory`] when KVM refuses a slot.
    pub fn register_memslots(&self) -> Result<(), VmError> {
        Ok(slots::register(&self.fd, &self.ram, 0)?)
    }

    /// Creates KVM's in-kernel interrupt controllers (PIC, IOAPIC and a
    /// LAPIC per vCPU; KVM api.rst, KVM_CREATE_IRQCHIP) so devices can
    /// raise interrupts through irqfds. Must come before any vCPU.
    ///
    /// # Errors
    /// [`VmError::Kvm`].
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd.create_irq_chip().map_err(|source| VmError::Kvm { what: "KVM_CREATE_IRQCHIP", source })?;
        self.irqchip.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether the VM has KVM's in-kernel interrupt controllers.
    #[must_use]
    pub fn has_irqchip(&self) -> bool {
        self.irqchip.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An eventfd that raises `gsi` on the in-kernel IOAPIC when written
    /// (KVM api.rst, KVM_IRQFD).
    ///
    /// # Errors
    /// [`VmError::Kvm`] (or the eventfd could not be made).
    pub fn irqfd(&self, gsi: u32) -> Result<vmm_sys_util::eventfd::EventFd, VmError> {
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Kvm { what: "eventfd", source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)) })?;
        self.fd.register_irqfd(&fd, gsi).map_err(|source| VmError::Kvm { what: "KVM_IRQFD", source })?;
        Ok(fd)
    }

    /// The VM fd.
    #[must_use]
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The system fd.
    #[must_use]
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Guest RAM.
    #[must_use]
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

    /// Reads one 32-bit LAPIC register from a `kvm_lapic_state`.
    fn lapic_reg(l: &kvm_bindings::kvm_lapic_state, off: usize) -> u32 {
        u32::from_le_bytes([l.regs[off] as u8, l.regs[off + 1] as u8, l.regs[off + 2] as u8, l.regs[off + 3] as u8])
    }

    #[test]
    fn an_irqfd_write_becomes_an_interrupt_pending_at_the_vcpu() {
        const VECTOR: u64 = 0x30;
        let ram = GuestRam::new(&VmConfig { mem_size: 2 << 20, ..VmConfig::default() }).unwrap();
        let vm = Vm::new(open_kvm().unwrap(), ram).unwrap();
        vm.create_irqchip().unwrap();
        let vcpu = crate::vcpu::create(&vm, 0, 1).unwrap();
        // Software-enable the LAPIC (SVR at 0xF0, bit 8; SDM Vol. 3A §11.9).
        let mut lapic = vcpu.get_lapic().unwrap();
        for (i, b) in 0x1ffu32.to_le_bytes().iter().enumerate() {
            lapic.regs[0xf0 + i] = *b as std::os::raw::c_char;
        }
        vcpu.set_lapic(&lapic).unwrap();
        // Route the balloon's GSI: fixed delivery of VECTOR to APIC 0, edge,
        // unmasked (82093AA datasheet §3.2.4, redirection table entry).
        let gsi = crate::layout::BALLOON.gsi;
        let mut chip = kvm_bindings::kvm_irqchip { chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC, ..Default::default() };
        vm.fd().get_irqchip(&mut chip).unwrap();
        // SAFETY: chip_id IOAPIC selects the ioapic member of the union.
        unsafe { chip.chip.ioapic.redirtbl[gsi as usize].bits = VECTOR };
        vm.fd().set_irqchip(&chip).unwrap();

        let fd = vm.irqfd(gsi).unwrap();
        fd.write(1).unwrap();
        // KVM consumes the eventfd asynchronously (its irqfd worker).
        let mut irr = 0;
        for _ in 0..100 {
            // IRR bits 32-63 are the register at 0x210 (SDM Vol. 3A §11.8.4).
            irr = lapic_reg(&vcpu.get_lapic().unwrap(), 0x210);
            if irr & (1 << (VECTOR - 32)) != 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_ne!(irr & (1 << (VECTOR - 32)), 0, "LAPIC IRR[63:32] = {irr:#x}");
    }

    #[test]
    fn a_linux_application_processor_waits_for_init_and_sipi() {
        let ram = GuestRam::new(&VmConfig { mem_size: 2 << 20, ..VmConfig::default() }).unwrap();
        let vm = Vm::new(open_kvm().unwrap(), ram).unwrap();
        vm.create_irqchip().unwrap();
        let ap = crate::vcpu::create_linux_ap(&vm, 1, 2).unwrap();
        assert_eq!(ap.get_mp_state().unwrap().mp_state, kvm_bindings::KVM_MP_STATE_UNINITIALIZED);
        // LINT1 is NMI (delivery mode 0b100 in bits 10:8), as on vCPU 0.
        assert_eq!(lapic_reg(&ap.get_lapic().unwrap(), 0x360) & 0x700, 0x400);
    }
}
