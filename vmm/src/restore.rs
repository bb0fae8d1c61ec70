//! Starting a VM from a snapshot chain (`vmm restore`).
//!
//! A lazy restore of 1 GiB is dominated by three kernel calls, about
//! 0.3 ms to create the VM, 0.5–0.9 ms to register the memslot (KVM
//! allocates and zeroes its reverse-map and write-tracking arrays, ~2.5 MiB
//! per GiB of slot, on this nested host ~0.7 µs per KiB of slot) and
//! 0.3 ms to create the vCPU, and by reading the snapshot (~0.5 ms). The
//! kernel calls cannot overlap each other (run on two threads on the
//! reference host they slow each other down by as much as they overlap;
//! a memslot change also holds KVM's `slots_lock` throughout), but they can
//! overlap reading the snapshot. So a restore runs in two threads:
//!
//! | main thread | KVM thread |
//! |---|---|
//! | (`vmm restore`: starts the KVM thread ([`KvmThread::start`]), sets up logging and parses its flags) | |
//! | reads the manifests, opens the memory files ([`snapshot::open_chain`]) | opens `/dev/kvm`, creates the VM |
//! | maps guest RAM, hands it over | registers the memslots |
//! | reads and checks chunk tables and state ([`OpenChain::load`]), builds the devices | |
//! | takes the VM back; applies diffs, re-releases balloon holes; irqchip, vCPU, its state | |
//! | runs the guest | checks the base image's chunks (lazy mode; [`Verifier`]) |
//!
//! Every check of the snapshot still happens before the guest runs; a
//! damaged snapshot is refused with the VM at most created, never run, and
//! nothing on disk is touched either way.
//!
//! [`snapshot::open_chain`]: crate::snapshot::open_chain
//! [`OpenChain::load`]: crate::snapshot::OpenChain::load
//! [`Verifier`]: crate::machine::Verifier

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

use serde::Serialize;

use crate::config::VmConfig;
use crate::devices::Devices;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mmio::MmioTransport;
use crate::dirty::DirtyTracker;
use crate::machine::{Machine, Verifier, VerifyJob};
use crate::memory::GuestRam;
use crate::snapshot::format::SnapshotKind;
use crate::snapshot::{self, Chain, SnapshotChain, SnapshotError, memory_file};
use crate::vm::{self, Vm, VmError};
use crate::control::VmControl;
use crate::machine::{RunOutcome, VmmError};
use crate::vmm::RunOptions;
use crate::{host, timeline, vcpu};

/// How a restore loads guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// Read every saved page into fresh guest RAM before starting (every
    /// chunk's checksum verified first).
    Copy,
    /// Map the base image privately so pages load on first guest access;
    /// diffs are copied on top. Only for anonymous and THP backings.
    Lazy,
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "copy" => Ok(RestoreMode::Copy),
            "lazy" => Ok(RestoreMode::Lazy),
            _ => Err(format!("invalid restore mode {s:?}; expected copy or lazy")),
        }
    }
}

/// How to restore.
#[derive(Debug)]
pub struct RestoreOptions {
    /// How memory is loaded.
    pub mode: RestoreMode,
    /// Control socket for the restored VM.
    pub api_socket: Option<std::path::PathBuf>,
    /// When set, the snapshot's memory size must be this.
    pub expected_mem: Option<u64>,
    /// The KVM thread, when the caller started it early ([`KvmThread::start`]).
    pub kvm_thread: Option<KvmThread>,
}

/// The balloon device of a restored VM.
pub type BalloonDevice = MmioTransport<Balloon>;

/// Starts a VM from the snapshot chain ending at `dir`; the guest continues
/// where it was.
///
/// # Errors
/// Any [`VmmError`]; a damaged or inconsistent snapshot is rejected before
/// the guest runs.
pub fn restore(dir: &std::path::Path, restore: RestoreOptions, options: RunOptions) -> Result<RunOutcome, VmmError> {
    timeline::mark("restore");
    let mut kvm = match restore.kvm_thread {
        Some(k) => k,
        None => KvmThread::start()?,
    };
    let opened = snapshot::open_chain(dir)?;
    timeline::mark("open snapshot chain");
    let top = opened.top();
    let mut config = top.manifest.config.clone();
    config.validate().map_err(|e| SnapshotError::Corrupt(format!("the saved configuration is invalid: {e}")))?;
    if let Some(mem) = restore.expected_mem
        && mem != config.mem_size
    {
        return Err(SnapshotError::Mismatch(format!(
            "the snapshot holds {} of guest memory, not the {} asked for",
            crate::size::format_size(config.mem_size),
            crate::size::format_size(mem)
        ))
        .into());
    }
    let layout: Vec<(u64, u64)> = crate::layout::ram_ranges(config.mem_size).iter().map(|r| (r.start.0, r.size)).collect();
    let recorded: Vec<(u64, u64)> = top.manifest.regions.iter().map(|r| (r.guest_start, r.size)).collect();
    if layout != recorded {
        return Err(SnapshotError::Mismatch(format!("the snapshot's RAM layout {recorded:x?} differs from this build's {layout:x?}")).into());
    }
    config.api_socket.clone_from(&restore.api_socket);
    let base = opened.base();
    if base.manifest.kind != SnapshotKind::Full {
        return Err(SnapshotError::Corrupt(format!("the chain starts at {}, which is not a full snapshot", base.dir.display())).into());
    }
    let lazy = restore.mode == RestoreMode::Lazy && matches!(config.backing, crate::config::Backing::Anon | crate::config::Backing::Thp);
    if restore.mode == RestoreMode::Lazy && !lazy {
        log::warn!("lazy restore needs an anon or thp backing; restoring {} backing by copy", config.backing);
    }
    kvm.register(if lazy { GuestRam::from_image(&config, &base.memory)? } else { GuestRam::new(&config)? });
    timeline::mark("map guest RAM");
    let mut chain = opened.load()?;
    timeline::mark("load + check chunk tables and state");
    let host_mode = host::detect();
    let mut devices = Devices::from_state(&chain.state.devices, options.console).map_err(SnapshotError::Corrupt)?;
    let vm = kvm.vm()?;
    timeline::mark("VM with memslots");
    for link in &chain.links[usize::from(lazy)..] {
        memory_file::apply(vm.ram(), &link.memory, &link.manifest.chunks)?;
    }
    // Checked before the guest runs; releases the balloon's holes.
    let balloon = restore_balloon(&config, &chain.state, vm.ram())?;
    // Writes made while restoring are not guest activity.
    let _ = crate::memory::vmm_writes::take(vm.ram());
    timeline::mark("load guest RAM");
    // Before the vCPU, as at boot (the dirty ring can only be enabled then).
    let mut tracker = crate::dirty::prepare(&config, vm.fd(), vm.ram(), options.stay_up)?;
    if chain.state.vcpus.len() != config.vcpus as usize || chain.state.vcpus.is_empty() {
        return Err(SnapshotError::Corrupt(format!("the snapshot holds {} vCPU states for a VM of {} vCPUs", chain.state.vcpus.len(), config.vcpus)).into());
    }
    let vcpus = load_vcpus(&vm, &chain, tracker.as_mut(), balloon, &mut devices)?;
    // A lazy restore has not read the base image: check it beside the guest.
    let verifier = if lazy {
        let base = &mut chain.links[0];
        let file = base.memory.try_clone().map_err(|source| SnapshotError::Io { what: "reopening the base image".into(), source })?;
        // The chain needs the base's chunk table no longer.
        Some(kvm.verifier(file, std::mem::take(&mut base.manifest.chunks), Arc::clone(options.handle.control())))
    } else {
        // Ends the thread, which would otherwise wait for a check.
        drop(kvm);
        None
    };
    timeline::mark("devices + verifier");
    let mut snapshots = SnapshotChain::default();
    if let Some(t) = tracker.as_mut() {
        // Diffs taken from here on apply on top of the restored snapshot.
        t.start(vm.fd(), vm.ram())?;
        let top = chain.top();
        snapshots.last = Some(crate::snapshot::format::ParentRef { dir: top.dir.clone(), id: top.manifest.id.clone(), manifest_crc32: top.manifest.manifest_crc32 });
        snapshots.generation = t.generation();
    }
    let guest_idle = chain.state.guest_idle.then_some(chain.state.idle_status);
    let observers = crate::observers::for_run(&config, &vm, vcpus[0].get_tsc_khz().map_or(0, u64::from), Vec::new());
    let mut machine = Machine::new(config, host_mode, vm, vcpus, devices, tracker, snapshots, options.stay_up);
    machine.guest_idle = guest_idle;
    machine.verifier = verifier;
    machine.observers = observers;
    // A restored guest's CPUs are all running already.
    machine.started_aps.fill(true);
    machine.drive(options.handle.control())
}

/// The restore's second thread (module docs): it creates the VM at once,
/// registers the RAM it is handed as memslots, hands the VM back, and then
/// runs the base image's check if it is given one.
///
/// Dropping it early (a damaged snapshot) ends the thread: without RAM it
/// drops the bare VM fd; with RAM, the VM it could not hand back, whose fd
/// goes before its RAM (`Vm`'s field order), so no memslot ever points at
/// unmapped memory.
///
/// `vmm restore` starts it first thing in `main`, before it has even parsed
/// its flags (the ~0.2 ms of logger and flag parsing then overlap creating
/// the VM), and passes it in [`RestoreOptions::kvm_thread`]; if the process
/// turns out not to restore (bad flags, `--help`), the thread waits for RAM
/// with its empty VM until the process exits.
#[derive(Debug)]
pub struct KvmThread {
    ram: Option<Sender<GuestRam>>,
    vm: Receiver<Result<Vm, VmError>>,
    job: Sender<VerifyJob>,
    thread: std::thread::JoinHandle<()>,
}

impl KvmThread {
    /// Starts the thread, which opens `/dev/kvm` and creates the VM at once.
    ///
    /// # Errors
    /// [`VmmError::KvmThread`] when the thread cannot start.
    pub fn start() -> Result<Self, VmmError> {
        let allowed = own_affinity();
        let (ram_tx, ram_rx) = mpsc::channel::<GuestRam>();
        let (vm_tx, vm_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel::<VerifyJob>();
        let body = move || {
            let made = vm::open_kvm().and_then(|kvm| vm::create_vm_fd(&kvm).map(|fd| (kvm, fd)));
            timeline::mark("VM created (KVM thread)");
            let vm = match made {
                Ok((kvm, fd)) => {
                    let Ok(ram) = ram_rx.recv() else { return };
                    let vm = Vm::from_parts(kvm, fd, ram);
                    vm.register_memslots().map(|()| vm)
                }
                Err(e) => Err(e),
            };
            timeline::mark("memslots registered (KVM thread)");
            // Before the guest can run (it runs once the VM is handed
            // over): from here on this thread checks the image
            // (`crate::seccomp`; the mode is set before the RAM comes).
            crate::seccomp::apply_or_abort(crate::seccomp::ThreadKind::Vmm);
            if vm_tx.send(vm).is_ok() {
                if let Some(all) = &allowed {
                    set_own_affinity(all);
                }
                // From here on background work: woken with the check while
                // the main thread is starting the vCPU, the thread must not
                // preempt it (see `BatchPolicy`).
                let _batch = crate::snapshot::diff::BatchPolicy::enter();
                if let Ok(job) = job_rx.recv() {
                    job.run();
                }
            }
        };
        let thread = std::thread::Builder::new().name("restore-kvm".into()).spawn(body).map_err(|_| VmmError::KvmThread("could not start"))?;
        if let Some(all) = &allowed {
            keep_off_this_cpu(&thread, all);
        }
        Ok(KvmThread { ram: Some(ram_tx), vm: vm_rx, job: job_tx, thread })
    }

    /// Hands guest RAM over for registration. When the thread has already
    /// ended (it could not create the VM), `ram` is dropped unregistered
    /// and [`vm`](Self::vm) returns the error.
    fn register(&mut self, ram: GuestRam) {
        if let Some(tx) = self.ram.take() {
            let _ = tx.send(ram);
        }
    }

    /// Waits for the VM, with its memslots registered.
    fn vm(&self) -> Result<Vm, VmmError> {
        Ok(self.vm.recv().map_err(|_| VmmError::KvmThread("ended without a VM"))??)
    }

    /// Starts the check of the base image on this thread.
    fn verifier(self, file: std::fs::File, chunks: Vec<snapshot::format::Chunk>, control: Arc<VmControl<Machine>>) -> Verifier {
        let KvmThread { job, thread, .. } = self;
        Verifier::start_on(file, chunks, control, move |j| {
            // The thread waits for this job once it has handed the VM back.
            let _ = job.send(j);
            thread
        })
    }
}

/// The CPUs the calling thread may run on, if it may run on more than one.
fn own_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is a valid out-buffer of
    // the size passed.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) } == 0;
    // SAFETY: `set` is initialised.
    (ok && unsafe { libc::CPU_COUNT(&set) } > 1).then_some(set)
}

/// Puts the calling thread back on `set`.
fn set_own_affinity(set: &libc::cpu_set_t) {
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
}

/// Moves the just-started `thread` to the CPUs of `allowed` other than the
/// one the caller runs on, so that it runs beside the caller at once:
/// otherwise the scheduler often queues it behind the caller on the same
/// CPU, and it starts only when the caller next blocks, ~1.5 ms later, which
/// undoes the overlap (measured on the reference host with a C probe: the
/// new thread's first instruction 1.5 ms after `pthread_create` in most
/// tries with the creator busy, 40–70 µs when kept off its CPU). The thread
/// takes `allowed` back once it has handed the VM over.
fn keep_off_this_cpu(thread: &std::thread::JoinHandle<()>, allowed: &libc::cpu_set_t) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: sched_getcpu has no preconditions.
    let Ok(here) = usize::try_from(unsafe { libc::sched_getcpu() }) else { return };
    if here >= libc::CPU_SETSIZE as usize {
        return;
    }
    let mut others = *allowed;
    // SAFETY: CPU_CLR and CPU_COUNT only touch the set they are given, and
    // `here` is inside it (checked above).
    let some_left = unsafe {
        libc::CPU_CLR(here, &mut others);
        libc::CPU_COUNT(&others) > 0
    };
    if some_left {
        // SAFETY: the handle's thread has not been joined, so its pthread_t
        // is live; `others` is a valid cpu_set_t of the size passed.
        unsafe { libc::pthread_setaffinity_np(thread.as_pthread_t(), std::mem::size_of::<libc::cpu_set_t>(), &others) };
    }
}

/// The balloon of a snapshot, checked against its configuration and built
/// over the restored `ram` (without its irqfd, which needs the VM); `None`
/// for a VM without one. A migration's destination builds its balloon the
/// same way (`crate::migration::destination`).
///
/// # Errors
/// [`VmmError::Snapshot`] when the record does not fit the configuration or is invalid.
pub fn restore_balloon(config: &VmConfig, state: &snapshot::SavedState, ram: &GuestRam) -> Result<Option<BalloonDevice>, VmmError> {
    let saved = match (config.balloon.is_some(), &state.devices.balloon) {
        (false, None) => return Ok(None),
        (true, Some(saved)) => saved,
        (true, None) => {
            // Builds before balloon state was saved refused such snapshots,
            // so this is damage, not an old format.
            return Err(SnapshotError::Corrupt("the configuration has a balloon but the snapshot holds no balloon state".into()).into());
        }
        (false, Some(_)) => return Err(SnapshotError::Corrupt("the snapshot holds balloon state but its configuration has no balloon".into()).into()),
    };
    if state.irqchip.is_none() {
        return Err(SnapshotError::Corrupt("a VM with a balloon has an in-kernel irqchip, but the snapshot holds no irqchip state".into()).into());
    }
    let t = crate::devices::virtio::balloon::state::restore(saved, ram, crate::layout::BALLOON.base.0, None).map_err(SnapshotError::from)?;
    Ok(Some(t))
}

/// The vCPU side of a restore: the irqchip (before the vCPU, as at boot),
/// the vCPU with its saved CPUID and state, and the balloon (given its
/// irqfd) added to `devices`.
fn load_vcpus(vm: &Vm, chain: &Chain, mut tracker: Option<&mut DirtyTracker>, balloon: Option<BalloonDevice>, devices: &mut Devices) -> Result<Vec<kvm_ioctls::VcpuFd>, VmmError> {
    if chain.state.irqchip.is_some() {
        vm.create_irqchip()?;
        devices.connect_serial_irq(vm.irqfd(memvisor_abi::ports::COM1_GSI)?);
    }
    let mut vcpus = Vec::with_capacity(chain.state.vcpus.len());
    for (i, saved) in chain.state.vcpus.iter().enumerate() {
        let id = i as u64;
        // A snapshot without CPUID predates SMP: its vCPU had a topology of one.
        let vcpu = if saved.cpuid.is_empty() { vcpu::create(vm, id, 1)? } else { vcpu::create_with_cpuid(vm, id, &saved.cpuid()?)? };
        if let Some(t) = tracker.as_deref_mut() {
            t.attach_vcpu(&vcpu, i)?;
        }
        vcpus.push(vcpu);
    }
    timeline::mark("create vCPUs + CPUID");
    if let Some(chips) = &chain.state.irqchip {
        chips.restore(vm.fd())?;
    }
    for (saved, vcpu) in chain.state.vcpus.iter().zip(&vcpus) {
        saved.restore(vcpu)?;
    }
    timeline::mark("restore vCPU + irqchip state");
    if let Some(mut b) = balloon {
        // The same wiring as at boot: an irqfd on the balloon's GSI of the
        // restored IOAPIC, whose routing the guest programmed (or not).
        b.set_irqfd(Some(vm.irqfd(crate::layout::BALLOON.gsi)?));
        devices.balloon = Some(b);
    }
    Ok(vcpus)
}
