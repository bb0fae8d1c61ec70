//! `vmm bench balloon`: how fast memory given back through the balloon
//! really leaves the VMM, against the raw system call in the same run.
//!
//! Per backing (anon, memfd, and hugetlb-2m when the host has the pages
//! reserved; the bench never changes host knobs):
//! - **raw**: map `--mem` of that backing in this process, write every page,
//!   and time one release of `--size` bytes with the same call the device
//!   uses (`MADV_DONTNEED` or `fallocate(PUNCH_HOLE)`): bytes per second.
//! - **end to end**: start a VM (this binary, `vmm run --balloon 0
//!   --workload balloon:irq=1`) whose self-test touches all its RAM, send
//!   `balloon set SIZE` on the control socket, and take the device's own
//!   clock: from the moment the target changed in the device until the
//!   release call that made `SIZE` bytes reclaimed returned
//!   (`last_target_to_reclaimed_ns`). That is the guest noticing the new
//!   target, allocating, filling the PFN array, the device checking every
//!   PFN and the system calls; the control socket's own latency is not in
//!   it (it is shown apart). The VMM's resident memory (RSS plus hugetlb
//!   pages, `/proc/PID/smaps_rollup`) must then have dropped by ≥ 95 % of
//!   `SIZE`, or the run fails. The ratio to raw is the figure of merit (the
//!   target is ≥ 0.8).
//! - **bound**: the ratio a device that cost nothing beyond a raw-speed
//!   release would reach with this guest: raw time / (raw time + the
//!   guest's reaction). Where the guest's reaction alone is longer than a
//!   quarter of the raw release, no device work reaches 0.8.
//! - **give-back**: from `balloon set 0` until the driver reports the
//!   balloon empty (`last_target_to_actual_ns`): the deflate notification,
//!   and a ring-3 task that writes (each first write faults a fresh host
//!   page in) and verifies every page, per 4 KiB page. It is not a bare
//!   re-fault time: it includes the guest's write and read-back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use memvisor::api::client;
use memvisor::api::protocol::Request;
use memvisor::config::{Backing, VmConfig};
use memvisor::size::{format_size, parse_size};
use memvisor::devices::virtio::balloon::reclaim;
use memvisor::memory::GuestRam;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct BalloonArgs {
    /// Guest memory per VM.
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// How much to inflate.
    #[arg(long, default_value = "512M")]
    pub size: String,
    /// Runs per backing (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// A subset in well under a minute: 512M guests, 256M inflates, one run.
    #[arg(long)]
    pub quick: bool,
    /// Only these backings (comma-separated: anon, memfd, hugetlb-2m).
    #[arg(long, value_delimiter = ',', default_value = "anon,memfd,hugetlb-2m")]
    pub backing: Vec<Backing>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BalloonBenchError {
    /// A size that does not parse.
    #[error(transparent)]
    Size(#[from] memvisor::size::SizeError),
    /// Guest memory for the raw measurement.
    #[error(transparent)]
    Memory(#[from] memvisor::memory::MemoryError),
    /// The VM did something unexpected.
    #[error("{0}")]
    Vm(String),
}

/// One backing's figures (medians over the runs).
#[derive(Debug, Clone, Serialize)]
pub struct BackingResult {
    /// The backing.
    pub backing: Backing,
    /// Raw release throughput, GiB/s.
    pub raw_gib_s: f64,
    /// End-to-end reclaim rate (target set → reclaimed), GiB/s.
    pub end_to_end_gib_s: f64,
    /// end_to_end / raw of each run (raw measured just before its VM),
    /// median.
    pub ratio: f64,
    /// The best ratio this guest allows: the ratio if the device added
    /// nothing and released at the raw rate, i.e. raw time over raw time
    /// plus the guest's reaction (`guest_ms`), median. Below 0.8 the target
    /// cannot be met by any device work.
    pub guest_bound: f64,
    /// The device's own release calls, GiB/s (time in the system calls only).
    pub device_syscall_gib_s: f64,
    /// Milliseconds from the target change to reclaimed (device clock).
    pub inflate_ms: f64,
    /// Milliseconds from sending `balloon set SIZE` until `balloon get`
    /// showed it reclaimed (control path and polling included).
    pub wall_ms: f64,
    /// MiB the VMM's resident memory dropped by.
    pub rss_drop_mib: f64,
    /// Of those, milliseconds inside the device's inflate handling (PFN
    /// checks, bookkeeping, release calls); the rest is the guest and the
    /// control path.
    pub device_ms: f64,
    /// Of those, milliseconds from the target change (in the VMM) to the
    /// guest's inflate notification.
    pub guest_ms: f64,
    /// Microseconds per 4 KiB page from `balloon set 0` until the guest
    /// has deflated, re-faulted (written) and verified every page.
    pub give_back_us_per_page: f64,
    /// Runs measured.
    pub runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

const GIB: f64 = (1u64 << 30) as f64;

/// One raw release of `size` bytes of a freshly written `mem` mapping.
fn raw_once(backing: Backing, mem: u64, size: u64) -> Result<f64, BalloonBenchError> {
    let config = VmConfig { mem_size: mem, backing, prefault: true, ..VmConfig::default() };
    let ram = GuestRam::new(&config)?;
    let m = &ram.regions()[0].mapping;
    // SAFETY: writing our own fresh mapping (touches every page, as the
    // guest's self-test does).
    unsafe { m.as_ptr().write_bytes(0x5a, m.size()) };
    let t = Instant::now();
    let r = reclaim::release(&ram, 0, size);
    let secs = t.elapsed().as_secs_f64();
    if r.errors > 0 || r.bytes != size {
        return Err(BalloonBenchError::Vm(format!("raw release of {size} bytes released {} with {} errors", r.bytes, r.errors)));
    }
    Ok(size as f64 / GIB / secs)
}

fn request(socket: &Path, r: &Request) -> Result<serde_json::Value, BalloonBenchError> {
    let resp = client::send(socket, r).map_err(|e| BalloonBenchError::Vm(memvisor::error_chain(&e)))?;
    if !resp.ok {
        return Err(BalloonBenchError::Vm(resp.error.unwrap_or_default()));
    }
    Ok(resp.data.unwrap_or_default())
}

fn wait_balloon(socket: &Path, timeout: Duration, done: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value, BalloonBenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(v) = request(socket, &Request::BalloonGet)
            && done(&v)
        {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(BalloonBenchError::Vm(format!("the balloon did not get there within {timeout:?}")));
        }
        // Each poll is a job on the vCPU thread (it kicks the guest out of
        // KVM_RUN). The figures come from the device's clock, so polls need
        // not be frequent; rare ones disturb the guest less.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What one VM measured.
struct VmRun {
    inflate_s: f64,
    wall_s: f64,
    rss_drop: u64,
    syscall_gib_s: f64,
    device_ms: f64,
    guest_ms: f64,
    give_back_us: f64,
}

/// Rss + Shared_Hugetlb + Private_Hugetlb of process `pid`, bytes.
fn resident_of(pid: u32) -> Result<u64, BalloonBenchError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).map_err(|e| BalloonBenchError::Vm(format!("cannot read the VM's smaps_rollup: {e}")))?;
    let kib: u64 = text
        .lines()
        .filter(|l| l.starts_with("Rss:") || l.starts_with("Shared_Hugetlb:") || l.starts_with("Private_Hugetlb:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Ok(kib * 1024)
}

fn ns_metric(v: &serde_json::Value, name: &str) -> Result<f64, BalloonBenchError> {
    match v["metrics"][name].as_u64() {
        Some(ns) if ns > 0 => Ok(ns as f64),
        _ => Err(BalloonBenchError::Vm(format!("the device did not time {name}: {v}"))),
    }
}

/// One VM.
fn vm_once(backing: Backing, mem: u64, size: u64, dir: &Path) -> Result<VmRun, BalloonBenchError> {
    let socket = dir.join(format!("balloon-bench-{}.sock", std::process::id()));
    let exe = crate::vmm_binary().map_err(BalloonBenchError::Vm)?;
    let mut child = Command::new(exe)
        .args(["run", "--json", "--mem", &mem.to_string(), "--backing", backing.as_str(), "--balloon", "0", "--workload", "balloon:rounds=1,irq=1", "--api-socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BalloonBenchError::Vm(format!("cannot start the VM: {e}")))?;
    let result = (|| {
        wait_balloon(&socket, Duration::from_secs(120), |v| v["driver_ok"] == serde_json::Value::Bool(true))?;
        // Let the guest settle into its wait for the device's interrupt.
        std::thread::sleep(Duration::from_millis(200));
        let before = resident_of(child.id())?;
        let t = Instant::now();
        request(&socket, &Request::BalloonSet { bytes: size })?;
        let v = wait_balloon(&socket, Duration::from_secs(120), |v| v["reclaimed_bytes"].as_u64() >= Some(size))?;
        let wall = t.elapsed().as_secs_f64();
        let after = resident_of(child.id())?;
        let rss_drop = before.saturating_sub(after);
        if rss_drop * 100 < size * 95 {
            return Err(BalloonBenchError::Vm(format!("the VM's resident memory dropped by only {rss_drop} bytes ({before} -> {after}) for {size} reclaimed")));
        }
        let inflate = ns_metric(&v, "last_target_to_reclaimed_ns")? / 1e9;
        let m = &v["metrics"];
        let ns = m["release_ns"].as_f64().unwrap_or(f64::NAN);
        let syscall = m["released_bytes"].as_f64().unwrap_or(0.0) / GIB / (ns / 1e9);
        let device_ms = m["inflate_ns"].as_f64().unwrap_or(f64::NAN) / 1e6;
        let guest_ms = ns_metric(&v, "last_target_to_inflate_ns")? / 1e6;
        request(&socket, &Request::BalloonSet { bytes: 0 })?;
        let v = wait_balloon(&socket, Duration::from_secs(120), |v| v["actual_bytes"].as_u64() == Some(0) && v["metrics"]["last_target_to_actual_ns"].as_u64() > Some(0))?;
        let give_back = ns_metric(&v, "last_target_to_actual_ns")? / 1e3 / (size / 4096) as f64;
        Ok(VmRun { inflate_s: inflate, wall_s: wall, rss_drop, syscall_gib_s: syscall, device_ms, guest_ms, give_back_us: give_back })
    })();
    let _ = request(&socket, &Request::Shutdown);
    let _ = child.wait();
    result
}

/// Runs the benchmark; prints the table (or JSON).
///
/// # Errors
/// [`BalloonBenchError`].
pub fn run(args: &BalloonArgs) -> Result<u32, BalloonBenchError> {
    let (mem, size, runs) = if args.quick { (512 << 20, 256 << 20, 1) } else { (parse_size(&args.mem)?, parse_size(&args.size)?, args.runs.max(1)) };
    let dir = std::env::temp_dir();
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for &backing in &args.backing {
        if !matches!(backing, Backing::Anon | Backing::Memfd | Backing::Hugetlb2M) {
            skipped.push(format!("{backing}: not measured by this bench (anon, memfd and hugetlb-2m are)"));
            continue;
        }
        if let Some(page) = backing.hugetlb_page_size() {
            // The raw mapping and the VM each need `mem` of pages.
            let (free, _) = memvisor::memory::hugetlb_available(page);
            if free * page < mem {
                skipped.push(format!("{backing}: {} of free hugetlb pages needed, {} free", format_size(mem), format_size(free * page)));
                continue;
            }
        }
        let mut raw = Vec::new();
        let mut e2e = Vec::new();
        let mut ratio = Vec::new();
        let mut sys = Vec::new();
        let mut give_back = Vec::new();
        let mut inflate_ms = Vec::new();
        let mut wall_ms = Vec::new();
        let mut rss_drop = Vec::new();
        let mut device_ms = Vec::new();
        let mut guest_ms = Vec::new();
        let mut bound = Vec::new();
        for _ in 0..runs {
            let r = raw_once(backing, mem, size)?;
            raw.push(r);
            let v = vm_once(backing, mem, size, &dir)?;
            ratio.push(size as f64 / GIB / v.inflate_s / r);
            device_ms.push(v.device_ms);
            guest_ms.push(v.guest_ms);
            let raw_ms = size as f64 / GIB / r * 1e3;
            bound.push(raw_ms / (raw_ms + v.guest_ms));
            e2e.push(size as f64 / GIB / v.inflate_s);
            inflate_ms.push(v.inflate_s * 1e3);
            wall_ms.push(v.wall_s * 1e3);
            rss_drop.push(v.rss_drop as f64 / (1u64 << 20) as f64);
            sys.push(v.syscall_gib_s);
            give_back.push(v.give_back_us);
        }
        let (raw, e2e) = (median(raw), median(e2e));
        results.push(BackingResult {
            backing,
            raw_gib_s: raw,
            end_to_end_gib_s: e2e,
            ratio: median(ratio),
            guest_bound: median(bound),
            device_syscall_gib_s: median(sys),
            inflate_ms: median(inflate_ms),
            wall_ms: median(wall_ms),
            rss_drop_mib: median(rss_drop),
            device_ms: median(device_ms),
            guest_ms: median(guest_ms),
            give_back_us_per_page: median(give_back),
            runs,
        });
    }
    if args.json {
        println!("{}", serde_json::json!({ "mem": mem, "size": size, "results": results, "skipped": skipped }));
        return Ok(0);
    }
    println!("balloon reclaim: {} inflated in a {} guest that touched all its RAM; medians of {runs} run(s)", format_size(size), format_size(mem));
    println!(
        "{:<11} {:>10} {:>10} {:>6} {:>6} {:>12} {:>11} {:>9} {:>10} {:>8} {:>8} {:>18}",
        "backing", "raw GiB/s", "e2e GiB/s", "ratio", "bound", "calls GiB/s", "inflate ms", "guest ms", "device ms", "wall ms", "RSS MiB", "give-back µs/page"
    );
    for r in &results {
        println!(
            "{:<11} {:>10.2} {:>10.2} {:>6.2} {:>6.2} {:>12.2} {:>11.2} {:>9.2} {:>10.2} {:>8.1} {:>8.0} {:>18.2}",
            r.backing.as_str(),
            r.raw_gib_s,
            r.end_to_end_gib_s,
            r.ratio,
            r.guest_bound,
            r.device_syscall_gib_s,
            r.inflate_ms,
            r.guest_ms,
            r.device_ms,
            r.wall_ms,
            r.rss_drop_mib,
            r.give_back_us_per_page
        );
    }
    for s in &skipped {
        println!("skipped {s}");
    }
    println!("bound: the ratio if the device cost nothing beyond a raw-speed release (raw time / (raw time + guest ms))");
    Ok(0)
}

