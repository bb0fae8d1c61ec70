//! Booting a VM: from a configuration to a running [`Machine`].
//!
//! [`run`] builds guest RAM, the VM, its devices, the boot data and one
//! vCPU, picks the run's observers from its workload, and drives the
//! machine in the calling thread until the guest exits, idles and is shut
//! down, or dies. [`crate::restore`] builds a machine from a snapshot
//! instead; both hand it the same [`MachineHandle`] the control socket
//! uses.

use std::sync::Arc;

use memvisor_abi::boot::{BOOT_CONFIG_MAGIC, BOOT_CONFIG_VERSION, BootConfig, FLAG_IDLE_AT_END, FLAG_SKIP_SELFTEST, FLAG_SYSCALL_INSN};

use crate::boot;
use crate::config::VmConfig;
use crate::devices::Devices;
use crate::host::{self, TranslationMode};
use crate::layout;
use crate::memory::GuestRam;
use crate::snapshot::SnapshotChain;
use crate::timeline;
use crate::vcpu;
use crate::vm::{self, Vm};

pub use crate::machine::{BootTimings, Machine, MachineHandle, RunOutcome, TimedReport, VmmError};

/// How to run.
pub struct RunOptions {
    /// Where the guest's serial console goes.
    pub console: Box<dyn std::io::Write + Send>,
    /// The VM's control handle (the control socket, when there is one,
    /// holds it too).
    pub handle: Arc<MachineHandle>,
    /// Keep the VM up when the guest idles, serving requests until shut
    /// down (a control socket is up): the guest is told to idle at the end
    /// and dirty tracking is prepared for snapshots.
    pub stay_up: bool,
    /// Skip the guest's self-test (boot benchmarks).
    pub skip_selftest: bool,
    /// Guest-virtual addresses to explain when the guest is ready (`--translate`).
    pub translate: Vec<u64>,
}

impl RunOptions {
    /// A run whose console goes to `console`, with a handle nobody else
    /// holds, that ends when the guest does.
    #[must_use]
    pub fn new(console: Box<dyn std::io::Write + Send>) -> Self {
        RunOptions { console, handle: MachineHandle::new(), stay_up: false, skip_selftest: false, translate: Vec::new() }
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("stay_up", &self.stay_up)
            .field("skip_selftest", &self.skip_selftest)
            .field("translate", &self.translate)
            .finish_non_exhaustive()
    }
}

/// The boot configuration for `config` on this host.
#[must_use]
pub fn boot_config(config: &VmConfig, mode: TranslationMode, idle_at_end: bool, skip_selftest: bool, tsc_khz: u64) -> BootConfig {
    let mut flags = 0;
    if idle_at_end {
        flags |= FLAG_IDLE_AT_END;
    }
    if skip_selftest {
        flags |= FLAG_SKIP_SELFTEST;
    }
    if !mode.is_pvm() {
        // Elsewhere `syscall` from ring 3 works (host-facts: not on PVM).
        flags |= FLAG_SYSCALL_INSN;
    }
    BootConfig {
        magic: BOOT_CONFIG_MAGIC,
        version: BOOT_CONFIG_VERSION,
        guest_page_shift: config.guest_page.shift(),
        flags,
        tsc_khz,
        vmm_start_tsc: 0,
        workload: config.workload.map(|w| w.spec()).unwrap_or_default(),
        cpus: config.vcpus,
        reserved: 0,
    }
}

/// Boots the VM `config` describes and runs it to the end.
///
/// # Errors
/// Any [`VmmError`]: set-up failures, or a guest that dies.
pub fn run(config: &VmConfig, options: RunOptions) -> Result<RunOutcome, VmmError> {
    timeline::mark("run");
    let kvm = vm::open_kvm()?;
    vm::check_vcpus(&kvm, config.vcpus)?;
    timeline::mark("open /dev/kvm");
    let mode = host::detect();
    timeline::mark("detect host");
    let ram = GuestRam::new(config)?;
    timeline::mark("map guest RAM");
    let vm = Vm::new(kvm, ram)?;
    timeline::mark("create VM + memslots");
    // The irqchip must exist before the vCPUs; VMs with a virtio device or
    // more than one vCPU (inter-processor interrupts; APs that wait to be
    // started) get one (snapshots save its state and the LAPICs', and the
    // balloon's own: devices::virtio::balloon::state).
    if config.balloon.is_some() || config.vcpus > 1 {
        vm.create_irqchip()?;
    }
    let balloon = match config.balloon {
        Some(target) => {
            let irqfd = vm.irqfd(layout::BALLOON.gsi)?;
            let device = crate::devices::virtio::balloon::Balloon::new(vm.ram(), target);
            Some(crate::devices::virtio::mmio::MmioTransport::new(device, layout::BALLOON.base.0, Some(irqfd)))
        }
        None => None,
    };
    // Before any vCPU exists: the dirty ring can only be enabled then.
    let mut tracker = crate::dirty::prepare(config, vm.fd(), vm.ram(), options.stay_up)?;
    let image = boot::read_kernel(config.kernel.as_deref())?;
    // The boot data is written once the vCPU exists, so the TSC frequency
    // it reports can go into the boot configuration.
    let cmdline = boot::cmdline::with_virtio_mmio(&config.cmdline, balloon.as_ref().map(|_| layout::BALLOON).as_slice());
    // A bzImage or a vmlinux without a PVH note boots through Linux's
    // 64-bit boot protocol (boot::linux); a PVH ELF the PVH way.
    let linux_entry = boot::load_linux(&vm, &image, config.kernel_decompress, config.initrd.as_deref(), &cmdline, config.vcpus)?;
    let is_pvh = linux_entry.is_none();
    let cpus = config.vcpus;
    let mut vcpus = Vec::with_capacity(cpus as usize);
    match linux_entry {
        Some(entry) => {
            vcpus.push(vcpu::create_linux(&vm, 0, cpus, &entry)?);
            for id in 1..u64::from(cpus) {
                // Linux starts its application processors with INIT and
                // SIPI, which KVM's in-kernel LAPIC delivers; the MADT
                // announces them (boot::acpi).
                vcpus.push(vcpu::create_linux_ap(&vm, id, cpus)?);
            }
        }
        None => {
            let entry = boot::load_kernel(vm.ram(), &image)?;
            timeline::mark("load kernel ELF");
            vcpus.push(vcpu::create_pvh(&vm, 0, cpus, entry.0, layout::abi::PVH_START_INFO)?);
            for id in 1..u64::from(cpus) {
                // Application processors wait, not running, until the guest
                // starts them (memvisor_abi::smp; a Linux kernel entered the
                // PVH way sends INIT/SIPI: with the in-kernel irqchip KVM
                // creates every vCPU but 0 waiting for them).
                vcpus.push(vcpu::create(&vm, id, cpus)?);
            }
        }
    }
    timeline::mark("create vCPU + CPUID + registers");
    let tsc_khz = vcpus[0].get_tsc_khz().map_or(0, u64::from);
    let boot_cfg = boot_config(config, mode, options.stay_up, options.skip_selftest, tsc_khz);
    if is_pvh {
        boot::pvh::write_boot_data(vm.ram().memory(), vm.ram().size(), &cmdline, &boot_cfg)?;
    }
    let mut devices = Devices::new(options.console);
    if vm.has_irqchip() {
        // COM1's interrupt (Linux's 8250 driver waits for transmitter-empty).
        devices.connect_serial_irq(vm.irqfd(memvisor_abi::ports::COM1_GSI)?);
    }
    devices.balloon = balloon;
    if let Some(t) = tracker.as_mut() {
        for (i, v) in vcpus.iter().enumerate() {
            t.attach_vcpu(v, i)?;
        }
    }
    timeline::mark("write boot data");
    let observers = crate::observers::for_run(config, &vm, tsc_khz, options.translate);
    let mut machine = Machine::new(config.clone(), mode, vm, vcpus, devices, tracker, SnapshotChain::default(), options.stay_up);
    machine.observers = observers;
    machine.drive(options.handle.control())
}
