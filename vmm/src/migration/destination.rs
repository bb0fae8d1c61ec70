//! The destination side of a migration (`vmm run --incoming ADDR`): waits
//! for one source, builds the VM from the stream as a restore builds it
//! from files, and runs it once the source commits.
//!
//! The guest's own configuration (RAM size, workload, command line,
//! balloon, guest page size) comes from the source; the host side
//! (backing, NUMA policy, prefault, mlock, dirty mode, control socket) and
//! the RAM size to expect come from this process's flags. A RAM size or
//! layout that differs, or another stream version, is refused on both
//! sides before anything is built. Guest RAM, the VM and its vCPU are
//! built while the first round's pages arrive, so that the final stop
//! only loads the vCPU's registers.
//!
//! Anything wrong in the stream (a damaged or truncated frame, pages
//! outside guest RAM, state that does not load) ends the process with the
//! error, after telling the source when the link still works; the guest
//! never ran here, its memory goes with the process, and the source keeps
//! running it. So does a source that goes silent for the link timeout.

use std::time::Duration;

use kvm_ioctls::VcpuFd;

use super::pages::{PageSink, RamMap};
use super::source::Hello;
use super::stream::{self, Kind, PAGE};
use super::transport::{Address, Conn, Listener};
use super::MigrationError;
use crate::config::VmConfig;
use crate::devices::Devices;
use crate::dirty::DirtyTracker;
use crate::machine::{Machine, RunOutcome};
use crate::memory::GuestRam;
use crate::snapshot::{SavedState, SnapshotChain};
use crate::vm::Vm;
use crate::vmm::RunOptions;
use crate::{host, timeline, vcpu};

/// Binds the address a source will connect to.
///
/// # Errors
/// [`MigrationError::Connect`] when it cannot be bound.
pub fn listen(addr: &Address) -> Result<Listener, MigrationError> {
    Listener::bind(addr).map_err(|source| MigrationError::Connect { what: format!("cannot listen on {addr}"), source })
}

/// The configuration the destination runs: the source's guest, this
/// process's host side (`host`: its flags), if the two fit.
///
/// # Errors
/// Why they do not (RAM size, layout, page size, an invalid result).
pub fn accept_hello(hello: &Hello, host: &VmConfig) -> Result<VmConfig, String> {
    if hello.page_size != PAGE {
        return Err(format!("the source counts pages of {} bytes, this build {PAGE}", hello.page_size));
    }
    let theirs = hello.config.mem_size;
    if theirs != host.mem_size {
        return Err(format!(
            "the source's guest has {} of RAM, this destination was started for {} (give it --mem {})",
            crate::size::format_size(theirs),
            crate::size::format_size(host.mem_size),
            flag_size(theirs)
        ));
    }
    let layout: Vec<(u64, u64)> = crate::layout::ram_ranges(theirs).iter().map(|r| (r.start.0, r.size)).collect();
    if layout != hello.regions {
        return Err(format!("the source's RAM layout {:x?} differs from this build's {layout:x?} for the same size", hello.regions));
    }
    let mut config = hello.config.clone();
    config.backing = host.backing;
    config.numa_policy = host.numa_policy;
    config.numa_nodes.clone_from(&host.numa_nodes);
    config.prefault = host.prefault;
    config.mlock = host.mlock;
    config.dirty_mode = host.dirty_mode;
    config.api_socket.clone_from(&host.api_socket);
    config.validate().map_err(|e| format!("the source's configuration does not fit this destination: {}", crate::error_chain(&e)))?;
    Ok(config)
}

/// `bytes` as `--mem` takes it (`1G`, `384M`, or bytes).
fn flag_size(bytes: u64) -> String {
    match bytes {
        b if b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        b if b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        b => b.to_string(),
    }
}

/// Runs of pages: (RAM offset, pages).
type Runs = Vec<(u64, u64)>;

/// What the destination has built so far.
struct Building {
    config: VmConfig,
    vm: Vm,
    tracker: Option<DirtyTracker>,
    /// The vCPUs, once the source's CPUID has arrived.
    vcpus: Vec<VcpuFd>,
}

/// Tells the source why, when the link still works, and returns the error.
fn abort(conn: &mut Conn, e: MigrationError) -> MigrationError {
    let _ = stream::write_json(conn, Kind::Abort, &crate::error_chain(&e));
    e
}

/// Reads the next frame, which must be `expected`.
fn expect(conn: &mut Conn, buf: &mut Vec<u8>, expected: Kind, what: &'static str) -> Result<(), MigrationError> {
    match stream::read_frame(conn, buf)? {
        k if k == expected => Ok(()),
        Kind::Abort => Err(MigrationError::PeerAborted { peer: "source", reason: stream::json(Kind::Abort, buf)? }),
        got => Err(stream::StreamError::Unexpected { got, expected: what }.into()),
    }
}

/// Waits for a source on `listener`, receives its VM and runs it.
/// `host` holds this process's flags (the host side and the RAM size to
/// expect); `link_timeout` how long a silent source is waited for once
/// connected.
///
/// # Errors
/// Any [`MigrationError`]: before the source commits the process ends
/// with it and the guest keeps running on the source.
pub fn run(listener: Listener, host: &VmConfig, link_timeout: Duration, options: RunOptions) -> Result<RunOutcome, MigrationError> {
    let mut conn = listener.accept().map_err(|source| MigrationError::Connect { what: "cannot accept the source's connection".into(), source })?;
    drop(listener);
    timeline::mark("source connected");
    conn.set_timeout(Some(link_timeout)).map_err(|source| MigrationError::Connect { what: "cannot set the link timeout".into(), source })?;
    stream::exchange_preambles(&mut conn)?;
    let mut buf = Vec::new();
    // The source stops here when its VM cannot move (it sends why).
    expect(&mut conn, &mut buf, Kind::Hello, "the source's hello")?;
    let hello: Hello = stream::json(Kind::Hello, &buf)?;
    let config = accept_hello(&hello, host).map_err(|why| abort(&mut conn, MigrationError::Mismatch(why)))?;
    let mut b = build(config, options.stay_up).map_err(|e| abort(&mut conn, e))?;
    stream::write_json(&mut conn, Kind::Accept, &super::source::Accepted { postcopy: super::postcopy::supported(b.config.backing) }).map_err(MigrationError::from)?;
    timeline::mark("VM built");
    let mut sink = PageSink::new(RamMap::of(b.vm.ram()));
    let (state, pending) = receive(&mut conn, &mut buf, &mut b, &mut sink)?;
    let loading = std::time::Instant::now();
    let (vcpus, devices, guest_idle) = load(&mut b, &state, options.console).map_err(|e| abort(&mut conn, e))?;
    log::debug!("state loaded in {:?}", loading.elapsed());
    let postcopy = match &pending {
        Some(runs) => Some(std::sync::Arc::new(super::postcopy::Destination::prepare(sink.ram().clone(), runs, |o| sink.was_written(o)).map_err(|e| abort(&mut conn, e))?)),
        None => None,
    };
    stream::write_frame(&mut conn, Kind::Ready, &[])?;
    expect(&mut conn, &mut buf, Kind::Commit, "the source's commit")?;
    // The guest is ours now: say so, and run it.
    let _ = stream::write_frame(&mut conn, Kind::Resumed, &[]);
    timeline::mark("committed");
    let service = match postcopy {
        Some(pc) => Some(start_postcopy(pc, conn, std::sync::Arc::clone(options.handle.control()))?),
        None => {
            drop(conn);
            None
        }
    };
    log::info!("migration received: {} data pages, {} zero pages", sink.data_pages, sink.zero_pages);
    let observers = crate::observers::for_run(&b.config, &b.vm, vcpus[0].get_tsc_khz().map_or(0, u64::from), Vec::new());
    let mut machine = Machine::new(b.config, host::detect(), b.vm, vcpus, devices, b.tracker, SnapshotChain::default(), options.stay_up);
    machine.guest_idle = guest_idle;
    machine.observers = observers;
    // The source's CPUs were all running.
    machine.started_aps.fill(true);
    let outcome = machine.drive(options.handle.control());
    if let Some(service) = service
        && let Some(e) = service.stop()
    {
        // The run ended because post-copy failed: say that, not how the
        // run loop words an abort.
        return Err(e.into());
    }
    Ok(outcome?)
}

/// Post-copy's two threads on the destination.
struct PostcopyService {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conn: Conn,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Why post-copy failed, when it did (the VM was aborted with it).
    failed: std::sync::Arc<std::sync::Mutex<Option<super::postcopy::PostcopyError>>>,
}

impl PostcopyService {
    /// Ends the threads (the VM has ended) and waits for them; returns why
    /// post-copy failed, if it did.
    fn stop(self) -> Option<super::postcopy::PostcopyError> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.conn.shutdown();
        for t in self.threads {
            let _ = t.join();
        }
        self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// Starts serving faults and receiving pages; a failure of either stops
/// the VM with the error (its memory cannot be completed).
fn start_postcopy(pc: std::sync::Arc<super::postcopy::Destination>, conn: Conn, control: std::sync::Arc<crate::control::VmControl<Machine>>) -> Result<PostcopyService, MigrationError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let clone = |c: &Conn| c.try_clone().map_err(|source| MigrationError::Connect { what: "cannot clone the connection".into(), source });
    let writer = std::sync::Arc::new(std::sync::Mutex::new(clone(&conn)?));
    let mut reader = clone(&conn)?;
    // Pages may come slowly while the source pushes; only a dead link ends this.
    let _ = reader.set_timeout(None);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let failed: std::sync::Arc<std::sync::Mutex<Option<super::postcopy::PostcopyError>>> = std::sync::Arc::default();
    let fail = {
        let failed = std::sync::Arc::clone(&failed);
        move |control: &crate::control::VmControl<Machine>, e: super::postcopy::PostcopyError| {
            control.abort(crate::error_chain(&e));
            failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(e);
        }
    };
    let faults = {
        let (pc, writer, stop, control, fail) = (std::sync::Arc::clone(&pc), std::sync::Arc::clone(&writer), std::sync::Arc::clone(&stop), std::sync::Arc::clone(&control), fail.clone());
        std::thread::Builder::new().name("postcopy-faults".into()).spawn(move || {
            crate::seccomp::apply_or_abort(crate::seccomp::ThreadKind::Vmm);
            if let Err(e) = pc.serve_faults(&writer, &stop) {
                fail(&control, e);
            }
        })
    }
    .map_err(|source| MigrationError::Connect { what: "cannot start the post-copy fault thread".into(), source })?;
    let pages = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::Builder::new().name("postcopy-pages".into()).spawn(move || {
            crate::seccomp::apply_or_abort(crate::seccomp::ThreadKind::Vmm);
            let t = std::time::Instant::now();
            match pc.receive(&mut reader, &writer) {
                Ok(()) => log::info!("post-copy: every page arrived {:.1} ms after the switch", t.elapsed().as_secs_f64() * 1e3),
                Err(e) if !stop.load(Ordering::Relaxed) => fail(&control, e),
                Err(_) => {}
            }
            stop.store(true, Ordering::Relaxed);
        })
    }
    .map_err(|source| MigrationError::Connect { what: "cannot start the post-copy page thread".into(), source })?;
    Ok(PostcopyService { stop, conn, threads: vec![faults, pages], failed })
}

/// Guest RAM, the VM, its irqchip (a VM with a balloon has one) and
/// dirty tracking, before any page arrives.
fn build(config: VmConfig, stay_up: bool) -> Result<Building, MigrationError> {
    let kvm = crate::vm::open_kvm().map_err(crate::machine::VmmError::from)?;
    let ram = GuestRam::new(&config).map_err(crate::machine::VmmError::from)?;
    let vm = Vm::new(kvm, ram).map_err(crate::machine::VmmError::from)?;
    if config.balloon.is_some() || config.vcpus > 1 {
        vm.create_irqchip().map_err(crate::machine::VmmError::from)?;
    }
    // Before the vCPU exists (the dirty ring can only be enabled then).
    let tracker = crate::dirty::prepare(&config, vm.fd(), vm.ram(), stay_up).map_err(crate::machine::VmmError::from)?;
    Ok(Building { config, vm, tracker, vcpus: Vec::new() })
}

/// Takes frames until the state arrives; returns it, and the runs of
/// pages still to come when the source switches to post-copy.
fn receive(conn: &mut Conn, buf: &mut Vec<u8>, b: &mut Building, sink: &mut PageSink) -> Result<(SavedState, Option<Runs>), MigrationError> {
    let mut pending = None;
    loop {
        let kind = stream::read_frame(conn, buf).map_err(|e| abort(conn, e.into()))?;
        let step = match kind {
            Kind::Pages => sink.pages(buf),
            Kind::Zeros => sink.zeros(buf),
            // Everything before it is in RAM: say so (the source waits).
            Kind::RoundEnd => stream::u64_payload(kind, buf).and_then(|round| stream::write_frame(conn, Kind::RoundAck, &[&round.to_le_bytes()])).map_err(MigrationError::from),
            Kind::Setup => setup_vcpu(b, buf),
            Kind::State => return stream::json(kind, buf).map(|s| (s, pending)).map_err(|e| abort(conn, e.into())),
            Kind::PostcopyPending if super::postcopy::supported(b.config.backing) => stream::runs(kind, buf).map(|r| pending = Some(r)).map_err(MigrationError::from),
            Kind::Abort => return Err(MigrationError::PeerAborted { peer: "source", reason: stream::json(kind, buf)? }),
            got => Err(stream::StreamError::Unexpected { got, expected: "pages or the state" }.into()),
        };
        step.map_err(|e| abort(conn, e))?;
    }
}

/// The [`Kind::Setup`] frame: creates the VM's vCPUs with the source's
/// CPUID (each gets its own with its state).
fn setup_vcpu(b: &mut Building, payload: &[u8]) -> Result<(), MigrationError> {
    if !b.vcpus.is_empty() {
        return Err(stream::StreamError::Unexpected { got: Kind::Setup, expected: "pages (the vCPUs exist)" }.into());
    }
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = stream::json(Kind::Setup, payload)?;
    let cpuid = kvm_bindings::CpuId::from_entries(&entries).map_err(|_| stream::StreamError::Malformed { kind: Kind::Setup, why: "too many CPUID entries".into() })?;
    for id in 0..b.config.vcpus {
        let vcpu = vcpu::create_with_cpuid(&b.vm, u64::from(id), &cpuid).map_err(crate::machine::VmmError::from)?;
        if let Some(t) = b.tracker.as_mut() {
            t.attach_vcpu(&vcpu, id as usize).map_err(crate::machine::VmmError::from)?;
        }
        b.vcpus.push(vcpu);
    }
    Ok(())
}

/// Loads the state into the built VM: devices, the balloon over the
/// received RAM, the irqchip, the vCPU's registers. Returns the vCPU, the
/// devices and the guest's idle status.
fn load(b: &mut Building, state: &SavedState, console: Box<dyn std::io::Write + Send>) -> Result<(Vec<VcpuFd>, Devices, Option<u32>), MigrationError> {
    let bad = |why: String| MigrationError::Vmm(crate::snapshot::SnapshotError::Corrupt(why).into());
    if state.vcpus.len() != b.config.vcpus as usize {
        return Err(bad(format!("the state holds {} vCPUs for a VM of {}", state.vcpus.len(), b.config.vcpus)));
    }
    if state.irqchip.is_some() != b.vm.has_irqchip() {
        return Err(bad(format!("the state {} irqchip state but the VM {} one", if state.irqchip.is_some() { "holds" } else { "holds no" }, if b.vm.has_irqchip() { "has" } else { "has no" })));
    }
    if b.vcpus.is_empty() {
        return Err(bad("the source sent no CPUID before its state".into()));
    }
    let vcpus = std::mem::take(&mut b.vcpus);
    let mut devices = Devices::from_state(&state.devices, console).map_err(bad)?;
    let balloon = crate::restore::restore_balloon(&b.config, state, b.vm.ram())?;
    // Writes made while restoring are not guest activity.
    let _ = crate::memory::vmm_writes::take(b.vm.ram());
    if let Some(chips) = &state.irqchip {
        chips.restore(b.vm.fd())?;
    }
    for (saved, vcpu) in state.vcpus.iter().zip(&vcpus) {
        if !saved.cpuid.is_empty() {
            // Each vCPU's own CPUID (its APIC id); allowed until it first runs.
            vcpu.set_cpuid2(&saved.cpuid()?).map_err(|source| crate::machine::VmmError::from(crate::vm::VmError::Kvm { what: "KVM_SET_CPUID2", source }))?;
        }
        saved.restore(vcpu)?;
    }
    if b.vm.has_irqchip() {
        devices.connect_serial_irq(b.vm.irqfd(memvisor_abi::ports::COM1_GSI).map_err(crate::machine::VmmError::from)?);
    }
    if let Some(mut t) = balloon {
        t.set_irqfd(Some(b.vm.irqfd(crate::layout::BALLOON.gsi).map_err(crate::machine::VmmError::from)?));
        devices.balloon = Some(t);
    }
    Ok((vcpus, devices, state.guest_idle.then_some(state.idle_status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(mem: u64) -> Hello {
        let config = VmConfig { mem_size: mem, ..VmConfig::default() };
        let regions = crate::layout::ram_ranges(mem).iter().map(|r| (r.start.0, r.size)).collect();
        Hello { config, regions, page_size: PAGE }
    }

    #[test]
    fn a_destination_takes_the_guest_from_the_source_and_the_host_side_from_its_flags() {
        let mut h = hello(256 << 20);
        h.config.cmdline = "from the source".into();
        h.config.backing = crate::config::Backing::Anon;
        let host = VmConfig { mem_size: 256 << 20, backing: crate::config::Backing::Memfd, prefault: true, api_socket: Some("/tmp/d.sock".into()), ..VmConfig::default() };
        let c = accept_hello(&h, &host).unwrap();
        assert_eq!(c.cmdline, "from the source");
        assert_eq!(c.backing, crate::config::Backing::Memfd);
        assert!(c.prefault);
        assert_eq!(c.api_socket, host.api_socket);
    }

    #[test]
    fn another_ram_size_layout_or_page_size_is_refused_with_the_reason() {
        let host = VmConfig { mem_size: 256 << 20, ..VmConfig::default() };
        let e = accept_hello(&hello(1 << 30), &host).unwrap_err();
        assert!(e.contains("1 GiB") && e.contains("--mem 1G"), "{e}");
        let mut h = hello(256 << 20);
        h.regions = vec![(0, 128 << 20), (1 << 32, 128 << 20)];
        assert!(accept_hello(&h, &host).unwrap_err().contains("layout"));
        let mut h = hello(256 << 20);
        h.page_size = 65536;
        assert!(accept_hello(&h, &host).unwrap_err().contains("65536"));
    }
}
