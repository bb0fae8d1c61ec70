//! `vmm bench snapshot`: what snapshots cost.
//!
//! - Diff-snapshot pause: a micro guest ([`super::page_writer`]) with
//!   2 GiB of RAM, all touched, dirties 57 MiB between snapshots and then
//!   keeps running (re-writing one page in a loop). A second thread asks
//!   for the diff the way the control socket does: it sets a flag and
//!   kicks the vCPU thread out of `KVM_RUN` with a signal. The pause is
//!   the time from that request until the vCPU is back in `KVM_RUN`: the
//!   kick, leaving guest code, harvesting the dirty pages, copying them
//!   out, and re-entering. The file is written after the vCPU resumed.
//!   Diffs chain on one full snapshot. Cloud Hypervisor reports 15 ms for
//!   this case; the target is ≤ 10 ms.
//! - Full-snapshot throughput: bytes saved per second, alternating with
//!   `dd` writing the same amount with `conv=fsync` into the same directory
//!   in the same run (target ≥ 0.8 of dd).
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

use crate::bench::page_writer::{FIRST_DATA_PAGE, PASS_PORT, PageWriter};
use crate::bench::stats::{Summary, summarize};
use crate::config::{Backing, VmConfig, format_size, parse_size};
use crate::devices::Devices;
use crate::dirty::DirtyMode;
use crate::snapshot::format::SnapshotKind;
use crate::snapshot::{self, Live, SnapshotChain};
use crate::timeline;
use crate::vmm::VmmError;

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
    /// Repetitions of the full snapshot and dd (default 3; 2 with --quick);
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
    /// Diff pause as the guest sees it: request (kick) → vCPU back in
    /// `KVM_RUN`, ms.
    pub diff_pause_ms: Summary,
    /// Of which the capture alone (vCPU out of guest code), ms.
    pub diff_capture_ms: Summary,
    /// Of which harvesting, ms.
    pub diff_harvest_ms: Summary,
    /// Diff total (pause + write + fsync), ms.
    pub diff_total_ms: Summary,
    /// Full snapshot bytes written.
    pub full_bytes: u64,
    /// Full snapshot throughput, MB/s.
    pub full_mb_s: Summary,
    /// dd throughput over the same bytes, MB/s.
    pub dd_mb_s: Summary,
    /// Median full / median dd.
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
    VmmError::Boot(crate::boot::BootError::Load(e.to_string()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(v: &[f64]) -> Result<Summary, VmmError> {
    summarize(v).ok_or_else(|| err("no samples"))
}

/// Raw samples from the micro guest.
struct MicroSamples {
    mode: DirtyMode,
    pause: Vec<f64>,
    capture: Vec<f64>,
    harvest: Vec<f64>,
    total: Vec<f64>,
    full_bytes: u64,
    full_mb_s: Vec<f64>,
    dd_mb_s: Vec<f64>,
}

fn live<'a>(vm: &'a crate::vm::Vm, vcpu: &'a kvm_ioctls::VcpuFd, config: &'a VmConfig) -> Live<'a> {
    let devices = Devices::new(Box::new(std::io::sink())).state();
    Live { kvm: vm.kvm(), vm_fd: vm.fd(), vcpu, ram: vm.ram(), config, devices, guest_idle: None, irqchip: vm.has_irqchip() }
}

/// How long after the guest resumed looping the stop is asked for.
const STOP_AFTER: Duration = Duration::from_millis(2);

/// One diff of a running guest, asked for from another thread as the
/// control socket does; returns (request → vCPU back in `KVM_RUN`, capture
/// alone, harvest, request → diff durable), ms, and the bytes saved.
fn diff_of_running_guest(w: &mut PageWriter, config: &VmConfig, chain: &mut SnapshotChain, dir: &Path) -> Result<([f64; 4], u64), VmmError> {
    // As the control server does before asking for the stop.
    if let Some(buf) = chain.spare.as_mut() {
        snapshot::warm(buf);
    }
    // The guest now re-writes one page in a loop, exiting after each pass.
    w.pass(FIRST_DATA_PAGE, 1, 1)?;
    crate::control::install_kick_handler();
    let stop = AtomicBool::new(false);
    // SAFETY: pthread_self has no preconditions.
    let vcpu_thread = unsafe { libc::pthread_self() };
    let (asked, captured, resumed) = std::thread::scope(|s| -> Result<(Instant, crate::snapshot::Captured, Instant), VmmError> {
        let asker = s.spawn(|| {
            std::thread::sleep(STOP_AFTER);
            let asked = Instant::now();
            stop.store(true, Ordering::SeqCst);
            // SAFETY: the vCPU thread is this scope's owner and outlives
            // the scoped thread; the kick handler is installed.
            unsafe { libc::pthread_kill(vcpu_thread, crate::control::kick_signal()) };
            asked
        });
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
        let captured = snapshot::capture(&live(&w.vm, &w.vcpu, config), &mut w.tracker, chain, dir, SnapshotKind::Diff)?;
        let resumed = Instant::now();
        // Back into the guest; its next exit shows it ran.
        loop {
            match w.vcpu.run() {
                Ok(VcpuExit::IoOut(PASS_PORT, _)) => break,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(other) => return Err(err(format!("unexpected exit {other:?}"))),
                Err(e) => return Err(VmmError::Run(e)),
            }
        }
        let asked = asker.join().map_err(|_| err("the stop thread panicked"))?;
        Ok((asked, captured, resumed))
    })?;
    let (capture_us, harvest_us) = (captured.pause_us(), captured.harvest_us());
    let (info, spare) = captured.persist()?;
    if spare.is_some() {
        chain.spare = spare;
    }
    let pause = ms(resumed.saturating_duration_since(asked));
    Ok(([pause, capture_us / 1e3, harvest_us / 1e3, ms(asked.elapsed())], info.memory_bytes))
}

/// Pause, total and throughput figures from the micro guest.
fn pause_and_throughput(dir: &Path, mem: u64, dirty: u64, reps: usize, diff_reps: usize) -> Result<MicroSamples, VmmError> {
    let mut w = PageWriter::new(mem, Backing::Anon, crate::dirty::choose_mode(&crate::dirty::DirtyCaps::probe(&crate::vm::open_kvm()?.create_vm().map_err(|source| crate::vm::VmError::Kvm { what: "KVM_CREATE_VM", source })?), None, crate::host::detect().is_pvm())?)?;
    let mode = w.tracker.mode();
    let pages = mem / 4096 - FIRST_DATA_PAGE;
    // Touch every page so the full snapshot saves all of RAM.
    w.pass(FIRST_DATA_PAGE, pages as u32, 1)?;
    let config = VmConfig { mem_size: mem, ..VmConfig::default() };
    let mut chain = SnapshotChain::default();
    let (mut full_mb_s, mut dd_mb_s) = (Vec::new(), Vec::new());
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
        dd_mb_s.push(dd(dir, full_bytes)?);
    }
    let (mut pause, mut capture, mut harvest, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let dirty_pages = (dirty / 4096).max(1);
    let stride = (pages / dirty_pages).max(1);
    for rep in 0..diff_reps {
        w.pass(FIRST_DATA_PAGE, dirty_pages as u32, stride)?;
        let diff_dir = dir.join(format!("diff-{rep}"));
        let ([p, c, h, t], bytes) = diff_of_running_guest(&mut w, &config, &mut chain, &diff_dir)?;
        pause.push(p);
        capture.push(c);
        harvest.push(h);
        total.push(t);
        if bytes < dirty_pages * 4096 {
            return Err(err(format!("the diff saved {bytes} bytes, fewer than the {} dirtied", dirty_pages * 4096)));
        }
        // Only the chain's metadata is needed for the next diff.
        let _ = std::fs::remove_dir_all(&diff_dir);
    }
    Ok(MicroSamples { mode, pause, capture, harvest, total, full_bytes, full_mb_s, dd_mb_s })
}

/// `dd` writing `bytes` with fsync into `dir`, MB/s.
fn dd(dir: &Path, bytes: u64) -> Result<f64, VmmError> {
    let out = dir.join("dd.bin");
    let t = Instant::now();
    let status = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .arg("bs=1M")
        .arg(format!("count={}", bytes.div_ceil(1 << 20)))
        .arg("conv=fsync")
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
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("vmm"));
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
    let reps = args.reps.unwrap_or(if args.quick { 2 } else { 3 }).max(1);
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
        let MicroSamples { mode: dirty_mode, pause, capture, harvest, total, full_bytes, full_mb_s, dd_mb_s } = pause_and_throughput(&dir, mem, dirty, reps, diff_reps)?;
        say(&format!("restore latency: {} tiny-guest snapshot ...", format_size(restore_mem)));
        let snap = dir.join("restore-src");
        make_guest_snapshot(&dir, restore_mem, &snap)?;
        // One unmeasured restore warms the page cache.
        restore_once(&snap, "copy")?;
        let (lazy, lazy_exit): (Vec<f64>, Vec<f64>) = (0..if args.quick { 4 } else { 10 }).map(|_| restore_once(&snap, "lazy")).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let (copy, copy_exit): (Vec<f64>, Vec<f64>) = (0..if args.quick { 2 } else { 6 }).map(|_| restore_once(&snap, "copy")).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let full_s = summary(&full_mb_s)?;
        let dd_s = summary(&dd_mb_s)?;
        Ok(SnapshotResults {
            mem_bytes: mem,
            dirty_bytes: dirty,
            dirty_mode,
            diff_pause_ms: summary(&pause)?,
            diff_capture_ms: summary(&capture)?,
            diff_harvest_ms: summary(&harvest)?,
            diff_total_ms: summary(&total)?,
            full_bytes,
            full_vs_dd: full_s.median / dd_s.median,
            full_mb_s: full_s,
            dd_mb_s: dd_s,
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
    let _ = writeln!(s, "snapshots ({} dirty tracking)", r.dirty_mode);
    let _ = writeln!(s, "  diff pause (request → vCPU back in KVM_RUN), {} guest, {} dirty: {} ms (target ≤ 10 ms; Cloud Hypervisor 15 ms)", format_size(r.mem_bytes), format_size(r.dirty_bytes), f(&r.diff_pause_ms));
    let _ = writeln!(s, "    of which capture: {} ms; harvest: {} ms", f(&r.diff_capture_ms), f(&r.diff_harvest_ms));
    let _ = writeln!(s, "    request → diff durable (write + fsync after resuming): {} ms", f(&r.diff_total_ms));
    let _ = writeln!(s, "  full snapshot of {}: {} MB/s; dd: {} MB/s; ratio of medians {:.2} (target ≥ 0.8)", format_size(r.full_bytes), f(&r.full_mb_s), f(&r.dd_mb_s), r.full_vs_dd);
    let _ = writeln!(s, "  restore of {}, process start → vCPU ready for KVM_RUN / → first guest exit (target ≤ 3 ms, lazy):", format_size(r.restore_mem_bytes));
    let _ = writeln!(s, "    lazy: {} ms / {} ms", f(&r.restore_lazy_ms), f(&r.restore_lazy_first_exit_ms));
    let _ = writeln!(s, "    copy: {} ms / {} ms", f(&r.restore_copy_ms), f(&r.restore_copy_first_exit_ms));
    s
}
