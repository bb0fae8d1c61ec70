//! `vmm bench snapshot`: what snapshots cost.
//!
//! - Diff-snapshot pause: a micro guest ([`memvisor::page_writer`]) with
//!   2 GiB of RAM, all touched, dirties 57 MiB between snapshots and then
//!   keeps running during the snapshot, re-writing one page in a loop. A
//!   second thread takes the diff the way the control socket does, in two
//!   stops (`memvisor::snapshot::diff`): it sets a flag and kicks the vCPU
//!   thread out of `KVM_RUN` with a signal; the vCPU thread harvests the
//!   dirty log and resumes the guest; the second thread copies those pages
//!   with the guest running, then stops the vCPU again, which harvests
//!   again, copies the pages written since the first stop and saves the
//!   vCPU state. Each stop's pause is the time from its request until the
//!   vCPU is back in `KVM_RUN` (the kick, leaving guest code, the work,
//!   re-entering); both are reported, and their sum. The file is written
//!   after the vCPU resumed. Diffs chain on one full snapshot. Cloud
//!   Hypervisor reports 15 ms for this case; the target is ≤ 10 ms.
//!   A second, shorter series has the guest keep re-writing all of its
//!   57 MiB in a loop during the snapshot, so the final stop has more to
//!   recopy.
//! - Full-snapshot throughput: bytes saved per second, alternating with
//!   `dd` writing the same amount into the same directory in the same run,
//!   once through the page cache (`conv=fsync`) and once with
//!   `oflag=direct`; the disk's sequential write speed is the faster of the
//!   two medians (target ≥ 0.8 of it).
//! - Restore latency for a 1 GiB tiny-guest snapshot (taken mid-workload,
//!   after the self-test touched all of RAM), lazily and by copy: process
//!   start → the restored vCPU ready for its first `KVM_RUN`, and process
//!   start → its first exit to the VMM, which comes after the guest ran
//!   (within one round of the checksum workload: ≤ ~1.3 ms of guest time,
//!   mostly its 1 ms wait). The first guest instruction lies between the two.
//!   Firecracker documents 3 ms for lazy restores; the target is ≤ 3 ms.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use serde::Serialize;

use memvisor::page_writer::{FIRST_DATA_PAGE, PASS_PORT, PageWriter};
use crate::stats::{Summary, summarize};
use memvisor::config::{Backing, VmConfig};
use memvisor::size::{format_size, parse_size};
use memvisor::devices::Devices;
use memvisor::dirty::DirtyMode;
use memvisor::snapshot::format::SnapshotKind;
use memvisor::snapshot::{self, Live, SnapshotChain};
use memvisor::timeline;
use memvisor::vmm::VmmError;

/// Flags of `vmm bench snapshot`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Guest RAM of the pause and throughput runs (default 2G; 512M with --quick).
    #[arg(long)]
    pub mem: Option<String>,
    /// Dirty memory between diffs (default 57M; 16M with --quick).
    #[arg(long)]
    pub dirty: Option<String>,
    /// Guest RAM of the restore runs (default 1G; 128M with --quick).
    #[arg(long)]
    pub restore_mem: Option<String>,
    /// Repetitions of the full snapshot and of dd, buffered and direct
    /// (default 5; 2 with --quick);
    /// restores run 10 lazy and 6 copy (4 and 2 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Diff snapshots measured (default 30; 6 with --quick).
    #[arg(long)]
    pub diff_reps: Option<usize>,
    /// Where snapshots are written (default: a directory under /var/tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A subset that runs in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The results.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotResults {
    /// Guest RAM for pause and throughput.
    pub mem_bytes: u64,
    /// Dirty bytes per diff.
    pub dirty_bytes: u64,
    /// Dirty-tracking mechanism used.
    pub dirty_mode: DirtyMode,
    /// Diffs with the guest re-writing one page during the snapshot.
    pub diff: DiffSeries,
    /// Diffs with the guest re-writing all its dirty pages in a loop
    /// during the snapshot.
    pub diff_rewriting: DiffSeries,
    /// Full snapshot bytes written.
    pub full_bytes: u64,
    /// Full snapshot throughput, MB/s.
    pub full_mb_s: Summary,
    /// dd throughput over the same bytes through the page cache
    /// (`conv=fsync`), MB/s.
    pub dd_mb_s: Summary,
    /// dd throughput with `oflag=direct` (and `conv=fsync`), MB/s.
    pub dd_direct_mb_s: Summary,
    /// Median full / the higher of the two dd medians (the disk's
    /// sequential write speed is whichever way dd wrote faster).
    pub full_vs_dd: f64,
    /// Guest RAM of the restore runs.
    pub restore_mem_bytes: u64,
    /// Lazy restore: process start → vCPU ready for `KVM_RUN`, ms.
    pub restore_lazy_ms: Summary,
    /// Lazy restore: process start → the guest's first exit, ms.
    pub restore_lazy_first_exit_ms: Summary,
    /// Copy restore: process start → vCPU ready for `KVM_RUN`, ms.
    pub restore_copy_ms: Summary,
    /// Copy restore: process start → the guest's first exit, ms.
    pub restore_copy_first_exit_ms: Summary,
}

fn err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Boot(memvisor::boot::BootError::Load(e.to_string()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(v: &[f64]) -> Result<Summary, VmmError> {
    summarize(v).ok_or_else(|| err("no samples"))
}

/// One series of diffs.
#[derive(Debug, Clone, Serialize)]
pub struct DiffSeries {
    /// What the guest does during the snapshot.
    pub guest: String,
    /// The final stop, as the guest sees it: its request (kick) → vCPU
    /// back in `KVM_RUN`, ms.
    pub pause_ms: Summary,
    /// The first stop (harvest only), request → back in `KVM_RUN`, ms.
    pub precopy_pause_ms: Summary,
    /// Both stops together, ms.
    pub total_pause_ms: Summary,
    /// The final stop's capture alone (vCPU out of guest code), ms.
    pub capture_ms: Summary,
    /// The first stop's capture alone, ms.
    pub first_capture_ms: Summary,
    /// Harvesting, both stops, ms.
    pub harvest_ms: Summary,
    /// The pre-copy, between the stops (guest running), ms.
    pub precopy_ms: Summary,
    /// MiB copied between the stops.
    pub precopied_mib: Summary,
    /// KiB copied in the final stop.
    pub late_kib: Summary,
    /// Diff total, first request → durable (both stops, pre-copy, merge,
    /// write + fsync), ms.
    pub total_ms: Summary,
}

/// Raw samples of one diff.
#[derive(Debug, Default)]
struct DiffSamples {
    pause: Vec<f64>,
    precopy_pause: Vec<f64>,
    total_pause: Vec<f64>,
    capture: Vec<f64>,
    first_capture: Vec<f64>,
    harvest: Vec<f64>,
    precopy: Vec<f64>,
    precopied: Vec<f64>,
    late: Vec<f64>,
    total: Vec<f64>,
}

impl DiffSamples {
    fn push(&mut self, d: &DiffSample) {
        self.pause.push(d.pause);
        self.precopy_pause.push(d.precopy_pause);
        self.total_pause.push(d.pause + d.precopy_pause);
        self.capture.push(d.capture);
        self.first_capture.push(d.first_capture);
        self.harvest.push(d.harvest);
        self.precopy.push(d.precopy);
        self.precopied.push(d.precopied as f64 / f64::from(1 << 20));
        self.late.push(d.late as f64 / 1024.0);
        self.total.push(d.total);
    }

    fn series(&self, guest: &str) -> Result<DiffSeries, VmmError> {
        Ok(DiffSeries {
            guest: guest.into(),
            pause_ms: summary(&self.pause)?,
            precopy_pause_ms: summary(&self.precopy_pause)?,
            total_pause_ms: summary(&self.total_pause)?,
            capture_ms: summary(&self.capture)?,
            first_capture_ms: summary(&self.first_capture)?,
            harvest_ms: summary(&self.harvest)?,
            precopy_ms: summary(&self.precopy)?,
            precopied_mib: summary(&self.precopied)?,
            late_kib: summary(&self.late)?,
            total_ms: summary(&self.total)?,
        })
    }
}

/// One diff's figures, ms and bytes.
#[derive(Debug)]
struct DiffSample {
    pause: f64,
    precopy_pause: f64,
    capture: f64,
    first_capture: f64,
    harvest: f64,
    precopy: f64,
    precopied: u64,
    late: u64,
    total: f64,
    bytes: u64,
}

/// Raw samples from the micro guest.
struct MicroSamples {
    mode: DirtyMode,
    diff: DiffSeries,
    rewriting: DiffSeries,
    full_bytes: u64,
    full_mb_s: Vec<f64>,
    dd_mb_s: Vec<f64>,
    dd_direct_mb_s: Vec<f64>,
}

fn live<'a>(vm: &'a memvisor::vm::Vm, vcpu: &'a kvm_ioctls::VcpuFd, config: &'a VmConfig) -> Live<'a> {
    let devices = Devices::new(Box::new(std::io::sink())).state();
    Live { kvm: vm.kvm(), vm_fd: vm.fd(), vcpus: vec![vcpu], ram: vm.ram(), config, devices, guest_idle: None, irqchip: vm.has_irqchip(), skip: Vec::new() }
}

/// How long after the guest resumed looping the stop is asked for.
const STOP_AFTER: Duration = Duration::from_millis(2);

/// Runs the guest until `stop` is set, serving its exits.
fn run_until(w: &mut PageWriter, stop: &AtomicBool) -> Result<(), VmmError> {
    while !stop.load(Ordering::SeqCst) {
        match w.vcpu.run() {
            Ok(VcpuExit::IoOut(PASS_PORT, _)) => {}
            // KVM_EXIT_DIRTY_RING_FULL (KVM api.rst, kvm_run exit reasons).
            Ok(VcpuExit::Unsupported(31)) => w.tracker.on_ring_full(w.vm.fd())?,
            Ok(other) => return Err(err(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(VmmError::Run(e)),
        }
    }
    Ok(())
}

/// Asks the vCPU thread to stop, as the control socket does: a flag and a
/// kick out of `KVM_RUN`; returns when it was asked.
fn ask_stop(stop: &AtomicBool, vcpu_thread: libc::pthread_t) -> Instant {
    let asked = Instant::now();
    stop.store(true, Ordering::SeqCst);
    // SAFETY: the vCPU thread owns the scope this runs in and outlives it;
    // the kick handler is installed.
    unsafe { libc::pthread_kill(vcpu_thread, memvisor::control::kick_signal()) };
    asked
}

/// One two-stop diff of a running guest, asked for from another thread as
/// the control socket does. During it the guest loops over `during`
/// (first page, count, stride) passes.
fn diff_of_running_guest(w: &mut PageWriter, config: &VmConfig, chain: &mut SnapshotChain, dir: &Path, during: (u64, u32, u64)) -> Result<DiffSample, VmmError> {
    // As the control server does before asking for the stop.
    for buf in [chain.spare.as_mut(), chain.spare_late.as_mut()].into_iter().flatten() {
        snapshot::warm(buf);
    }
    // From here each KVM_RUN runs one more such pass.
    w.pass(during.0, during.1, during.2)?;
    memvisor::control::install_kick_handler();
    let stop = AtomicBool::new(false);
    // SAFETY: pthread_self has no preconditions.
    let vcpu_thread = unsafe { libc::pthread_self() };
    let (plan_tx, plan_rx) = std::sync::mpsc::channel::<snapshot::diff::Precopy>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<snapshot::diff::Precopy>();
    let (asked, captured, resumed, precopy_ms) = std::thread::scope(|s| -> Result<([Instant; 2], memvisor::snapshot::Captured, [Instant; 2], f64), VmmError> {
        let stop = &stop;
        let asker = s.spawn(move || {
            // As the control server's thread does for a snapshot.
            let _batch = snapshot::diff::BatchPolicy::enter();
            std::thread::sleep(STOP_AFTER);
            let first = ask_stop(stop, vcpu_thread);
            let mut pre = plan_rx.recv().ok()?;
            let t = Instant::now();
            // SAFETY: the plan is of `w`'s RAM, which outlives this scope.
            unsafe { pre.copy() };
            let copy_ms = ms(t.elapsed());
            back_tx.send(pre).ok()?;
            Some((first, copy_ms, ask_stop(stop, vcpu_thread)))
        });
        let plan_tx = plan_tx;
        run_until(w, stop)?;
        let pre = snapshot::diff::begin(&live(&w.vm, &w.vcpu, config), &mut w.tracker, chain, dir)?;
        stop.store(false, Ordering::SeqCst);
        plan_tx.send(pre).map_err(|_| err("the pre-copy thread is gone"))?;
        let resumed_first = Instant::now();
        run_until(w, stop)?;
        let pre = back_rx.recv().map_err(|_| err("the pre-copy thread is gone"))?;
        let captured = snapshot::diff::finish(&live(&w.vm, &w.vcpu, config), &mut w.tracker, chain, pre)?;
        let resumed = Instant::now();
        // Back into the guest; its next exit shows it ran.
        loop {
            match w.vcpu.run() {
                Ok(VcpuExit::IoOut(PASS_PORT, _)) => break,
                Ok(VcpuExit::Unsupported(31)) => w.tracker.on_ring_full(w.vm.fd())?,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(other) => return Err(err(format!("unexpected exit {other:?}"))),
                Err(e) => return Err(VmmError::Run(e)),
            }
        }
        let (first, copy_ms, second) = asker.join().map_err(|_| err("the stop thread panicked"))?.ok_or_else(|| err("the pre-copy thread failed"))?;
        Ok(([first, second], captured, [resumed_first, resumed], copy_ms))
    })?;
    let capture_us = captured.pause_us();
    let (info, spares) = captured.persist()?;
    chain.keep(spares);
    Ok(DiffSample {
        pause: ms(resumed[1].saturating_duration_since(asked[1])),
        precopy_pause: ms(resumed[0].saturating_duration_since(asked[0])),
        capture: capture_us / 1e3,
        first_capture: info.precopy_pause_us / 1e3,
        harvest: info.harvest_us / 1e3,
        precopy: precopy_ms,
        precopied: info.precopied_bytes,
        late: info.late_bytes,
        total: ms(asked[0].elapsed()),
        bytes: info.memory_bytes,
    })
}

/// Pause, total and throughput figures from the micro guest.
fn pause_and_throughput(dir: &Path, mem: u64, dirty: u64, reps: usize, diff_reps: usize) -> Result<MicroSamples, VmmError> {
    let mut w = PageWriter::new(mem, Backing::Anon, memvisor::dirty::choose_mode(&memvisor::dirty::DirtyCaps::probe(&memvisor::vm::open_kvm()?.create_vm().map_err(|source| memvisor::vm::VmError::Kvm { what: "KVM_CREATE_VM", source })?), None, memvisor::host::detect().is_pvm())?)?;
    let mode = w.tracker.mode();
    let pages = mem / 4096 - FIRST_DATA_PAGE;
    // Touch every page so the full snapshot saves all of RAM.
    w.pass(FIRST_DATA_PAGE, pages as u32, 1)?;
    let config = VmConfig { mem_size: mem, ..VmConfig::default() };
    let mut chain = SnapshotChain::default();
    let (mut full_mb_s, mut dd_mb_s, mut dd_direct_mb_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut full_bytes = 0;
    // Full snapshots alternate with dd, so both see the same disk and load;
    // the last one stays as the base of the diffs.
    for rep in 0..reps {
        let full_dir = dir.join(format!("full-{rep}"));
        let t = Instant::now();
        let info = snapshot::take(&live(&w.vm, &w.vcpu, &config), &mut w.tracker, &mut chain, &full_dir, SnapshotKind::Full)?;
        full_mb_s.push(info.memory_bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
        full_bytes = info.memory_bytes;
        if rep + 1 < reps {
            let _ = std::fs::remove_dir_all(&full_dir);
        }
        dd_mb_s.push(dd(dir, full_bytes, false)?);
        dd_direct_mb_s.push(dd(dir, full_bytes, true)?);
    }
    let dirty_pages = (dirty / 4096).max(1);
    let stride = (pages / dirty_pages).max(1);
    let (mut one_page, mut rewriting) = (DiffSamples::default(), DiffSamples::default());
    // The rewriting series is a third as long: each of its diffs has the
    // guest write 57 MiB per pass, several passes per snapshot.
    let rewriting_reps = diff_reps.div_ceil(3);
    for rep in 0..diff_reps + rewriting_reps {
        w.pass(FIRST_DATA_PAGE, dirty_pages as u32, stride)?;
        let diff_dir = dir.join(format!("diff-{rep}"));
        let rewrite = rep >= diff_reps;
        let during = if rewrite { (FIRST_DATA_PAGE, dirty_pages as u32, stride) } else { (FIRST_DATA_PAGE, 1, 1) };
        let d = diff_of_running_guest(&mut w, &config, &mut chain, &diff_dir, during)?;
        if d.bytes < dirty_pages * 4096 {
            return Err(err(format!("the diff saved {} bytes, fewer than the {} dirtied", d.bytes, dirty_pages * 4096)));
        }
        if rewrite { rewriting.push(&d) } else { one_page.push(&d) }
        // Only the chain's metadata is needed for the next diff.
        let _ = std::fs::remove_dir_all(&diff_dir);
    }
    let diff = one_page.series("re-writes one page in a loop")?;
    let rewriting = rewriting.series(&format!("re-writes its {} dirty pages in a loop", dirty_pages))?;
    Ok(MicroSamples { mode, diff, rewriting, full_bytes, full_mb_s, dd_mb_s, dd_direct_mb_s })
}

/// `dd` writing `bytes` with fsync into `dir`, through the page cache or
/// with `oflag=direct` (1 MiB blocks either way), MB/s.
fn dd(dir: &Path, bytes: u64, direct: bool) -> Result<f64, VmmError> {
    let out = dir.join("dd.bin");
    let t = Instant::now();
    let status = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .arg("bs=1M")
        .arg(format!("count={}", bytes.div_ceil(1 << 20)))
        .arg("conv=fsync")
        .args(direct.then_some("oflag=direct"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| err(format!("cannot run dd: {e}")))?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        return Err(err(format!("dd failed: {status}")));
    }
    Ok(bytes.div_ceil(1 << 20) as f64 * (1 << 20) as f64 / secs / 1e6)
}

fn vmm(args: &[&str]) -> Command {
    let exe = crate::vmm_binary().unwrap_or_else(|_| PathBuf::from("vmm"));
    let mut c = Command::new(exe);
    c.args(args).stdin(Stdio::null());
    c
}

/// The console line the guest prints when its self-test is over and the
/// workload is about to start (guest/kernel/src/workload.rs).
const WORKLOAD_STARTING: &str = "guest: workload starting";

/// The restore guest's workload: the checksum rounds on one page, 1 ms
/// apart (an exit at least every ~1.3 ms), 4096 rounds (the most the
/// workload takes): ~5 s.
const RESTORE_WORKLOAD: &str = "checksum:pages=1,rounds=4096,ms=1";

/// How long after the workload started the snapshot is taken: the rounds
/// take ≥ 4.1 s (4096 waits of 1 ms) plus their exits (~0.25 ms each,
/// more on a loaded host), so the restored guest has a few hundred ms of
/// rounds left; it must still be running at the snapshot, and each
/// restore runs to its end.
const SNAPSHOT_AFTER_START: Duration = Duration::from_millis(4400);

/// Boots the tiny guest with `mem` running [`RESTORE_WORKLOAD`], waits for
/// the self-test to end and takes a full snapshot into `snap` mid-workload.
fn make_guest_snapshot(dir: &Path, mem: u64, snap: &Path) -> Result<(), VmmError> {
    let socket = dir.join("api.sock");
    let workload = RESTORE_WORKLOAD;
    let mut child = vmm(&["run", "--json", "--mem", &mem.to_string(), "--workload", workload, "--api-socket", &socket.to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot start the guest: {e}")))?;
    let ctl = |args: &[&str]| -> Result<String, VmmError> {
        let mut all = vec!["ctl", socket.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        let out = vmm(&all).output().map_err(|e| err(e.to_string()))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // With --json the console goes to stderr.
    let console = child.stderr.take().ok_or_else(|| err("no console"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(console).lines().map_while(Result::ok) {
            if line.contains(WORKLOAD_STARTING) {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(300)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(err("the guest did not start its workload within 300 s"));
    }
    std::thread::sleep(SNAPSHOT_AFTER_START);
    let answer = ctl(&["snapshot", "--full", &snap.to_string_lossy()])?;
    let _ = ctl(&["shutdown"]);
    let _ = child.wait();
    if !answer.contains("\"ok\":true") {
        return Err(err(format!("snapshot failed: {answer}")));
    }
    if answer.contains("\"idle\"") {
        return Err(err("the workload had ended before the snapshot (a loaded machine?); the restored guest would not run"));
    }
    Ok(())
}

/// A restore: process start → vCPU ready, and → the guest's first exit, ms.
fn restore_once(snap: &Path, mode: &str) -> Result<(f64, f64), VmmError> {
    let mut cmd = vmm(&["restore", "--json", "--restore-mode", mode, &snap.to_string_lossy()]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    cmd.env(timeline::SPAWN_NS_ENV, timeline::monotonic_ns().to_string());
    let out = cmd.output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!("restore failed: {}", out.status)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| err(format!("restore report: {e}")))?;
    let t = &v["timings_us"];
    let ready = t["vcpu_start_us"].as_f64().ok_or_else(|| err("restore report lacks timings_us.vcpu_start_us"))?;
    let first = t["first_exit_us"].as_f64().ok_or_else(|| err("the restored guest never exited (was it idle?)"))?;
    Ok((ready / 1e3, first / 1e3))
}

/// Runs the benchmark.
///
/// # Errors
/// [`VmmError`].
pub fn run(args: &SnapshotArgs) -> Result<u32, VmmError> {
    let size = |v: &Option<String>, full: u64, quick: u64| v.as_deref().map_or(Ok(if args.quick { quick } else { full }), |s| parse_size(s).map_err(err));
    let mem = size(&args.mem, 2 << 30, 512 << 20)?;
    let dirty = size(&args.dirty, 57 << 20, 16 << 20)?;
    let restore_mem = size(&args.restore_mem, 1 << 30, 128 << 20)?;
    let reps = args.reps.unwrap_or(if args.quick { 2 } else { 5 }).max(1);
    let diff_reps = args.diff_reps.unwrap_or(if args.quick { 6 } else { 30 }).max(1);
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(format!("/var/tmp/memvisor-bench-snapshot-{}", std::process::id())));
    std::fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    let result = (|| -> Result<SnapshotResults, VmmError> {
        let say = |m: &str| {
            if !args.json {
                eprintln!("{m}");
            }
        };
        say(&format!("full throughput ({reps} reps, alternating with dd) and diff pause ({diff_reps} diffs): {} guest, {} dirty per diff ...", format_size(mem), format_size(dirty)));
        let MicroSamples { mode: dirty_mode, diff, rewriting, full_bytes, full_mb_s, dd_mb_s, dd_direct_mb_s } = pause_and_throughput(&dir, mem, dirty, reps, diff_reps)?;
        say(&format!("restore latency: {} tiny-guest snapshot ...", format_size(restore_mem)));
        let snap = dir.join("restore-src");
        make_guest_snapshot(&dir, restore_mem, &snap)?;
        // One unmeasured restore warms the page cache.
        restore_once(&snap, "copy")?;
        let (lazy, lazy_exit): (Vec<f64>, Vec<f64>) = (0..if args.quick { 4 } else { 10 }).map(|_| restore_once(&snap, "lazy")).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let (copy, copy_exit): (Vec<f64>, Vec<f64>) = (0..if args.quick { 2 } else { 6 }).map(|_| restore_once(&snap, "copy")).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let full_s = summary(&full_mb_s)?;
        let dd_s = summary(&dd_mb_s)?;
        let dd_direct_s = summary(&dd_direct_mb_s)?;
        Ok(SnapshotResults {
            mem_bytes: mem,
            dirty_bytes: dirty,
            dirty_mode,
            diff,
            diff_rewriting: rewriting,
            full_bytes,
            full_vs_dd: full_s.median / dd_s.median.max(dd_direct_s.median),
            full_mb_s: full_s,
            dd_mb_s: dd_s,
            dd_direct_mb_s: dd_direct_s,
            restore_mem_bytes: restore_mem,
            restore_lazy_ms: summary(&lazy)?,
            restore_lazy_first_exit_ms: summary(&lazy_exit)?,
            restore_copy_ms: summary(&copy)?,
            restore_copy_first_exit_ms: summary(&copy_exit)?,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let r = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(err)?);
    } else {
        print!("{}", to_text(&r));
    }
    Ok(0)
}

/// The results as text.
#[must_use]
pub fn to_text(r: &SnapshotResults) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let f = |x: &Summary| format!("p50 {:.2} p90 {:.2} [min {:.2}, max {:.2}; n {}]", x.median, x.p90, x.min, x.max, x.n);
    let f3 = |x: &Summary| format!("p50 {:.0} p90 {:.0} [min {:.0}, max {:.0}; n {}]", x.median, x.p90, x.min, x.max, x.n);
    let _ = writeln!(s, "snapshots ({} dirty tracking)", r.dirty_mode);
    for (d, title) in [(&r.diff, "diff"), (&r.diff_rewriting, "diff, guest rewriting")] {
        let _ = writeln!(s, "  {title}: {} guest, {} dirty, during the snapshot the guest {}:", format_size(r.mem_bytes), format_size(r.dirty_bytes), d.guest);
        let _ = writeln!(s, "    final-stop pause (request → vCPU back in KVM_RUN): {} ms (target ≤ 10 ms; Cloud Hypervisor 15 ms)", f(&d.pause_ms));
        let _ = writeln!(s, "    first-stop pause (harvest only): {} ms; its capture alone: {} ms", f(&d.precopy_pause_ms), f(&d.first_capture_ms));
        let _ = writeln!(s, "    total paused (both stops): {} ms", f(&d.total_pause_ms));
        let _ = writeln!(s, "    final capture alone: {} ms; harvests: {} ms", f(&d.capture_ms), f(&d.harvest_ms));
        let _ = writeln!(s, "    pre-copied with the guest running: {} MiB in {} ms", f(&d.precopied_mib), f(&d.precopy_ms));
        let _ = writeln!(s, "    copied in the final stop: {} KiB", f3(&d.late_kib));
        let _ = writeln!(s, "    first request → diff durable (merge, write + fsync after resuming): {} ms", f(&d.total_ms));
    }
    let _ = writeln!(s, "  full snapshot of {}: {} MB/s", format_size(r.full_bytes), f(&r.full_mb_s));
    let _ = writeln!(s, "    dd, page cache + fsync: {} MB/s; dd, O_DIRECT: {} MB/s", f(&r.dd_mb_s), f(&r.dd_direct_mb_s));
    let _ = writeln!(s, "    full / the faster dd (ratio of medians): {:.2} (target ≥ 0.8)", r.full_vs_dd);
    let _ = writeln!(s, "  restore of {}, process start → vCPU ready for KVM_RUN / → first guest exit (target ≤ 3 ms, lazy):", format_size(r.restore_mem_bytes));
    let _ = writeln!(s, "    lazy: {} ms / {} ms", f(&r.restore_lazy_ms), f(&r.restore_lazy_first_exit_ms));
    let _ = writeln!(s, "    copy: {} ms / {} ms", f(&r.restore_copy_ms), f(&r.restore_copy_first_exit_ms));
    s
}
