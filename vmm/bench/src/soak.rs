//! `vmm bench soak`: what stays behind when VMs come and go, and when a
//! balloon inflates and deflates without end.
//!
//! - Boot/teardown: this process boots the tiny guest (self-test skipped)
//!   `--boots` times through the library, one VM after another, and reads
//!   its own open file descriptors (`/proc/self/fd`), threads
//!   (`/proc/self/task`) and RSS (`/proc/self/statm`) after each; every
//!   VM's memory, vCPU and device threads and KVM fds must be gone.
//! - Balloon: one VM with a balloon whose guest driver serves until shut
//!   down or its `--cycles` rounds are done (`balloon` workload,
//!   interrupt-driven); the bench sets the
//!   target to `--size` and back to zero `--cycles` times through the VM's
//!   handle, waiting each time until the guest has acted, and reads the
//!   same three figures every `--cycles / 10` cycles.
//!
//! "Flat" is judged on the second half of each series against its first
//! sample after warm-up: fds and threads must not grow at all, RSS by at
//! most `--rss-slack` (default 1 MiB: allocator noise).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use memvisor::config::{Backing, ConfigFile, SizeValue};
use memvisor::vmm::{self, MachineHandle, RunOptions};

/// Flags of `vmm bench soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Boot/teardown cycles.
    #[arg(long, default_value_t = 1000)]
    pub boots: usize,
    /// Balloon inflate/deflate cycles.
    #[arg(long, default_value_t = 10_000)]
    pub cycles: usize,
    /// Balloon target of each inflate.
    #[arg(long, default_value = "2M")]
    pub size: String,
    /// RSS growth allowed over a series, bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub rss_slack: u64,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The process's resources at one moment.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Resources {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Resident set beyond guest RAM, bytes.
    pub rss_bytes: u64,
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(Iterator::count).unwrap_or(0)
}

/// The guest RAM of the balloon series: its mapping is left out of RSS
/// (inflating and deflating moves guest pages in and out by design).
const GUEST_MEM: u64 = 64 << 20;

fn resources() -> Resources {
    // Every mapping's Rss from smaps, but guest RAM's (the only mapping of
    // exactly its size).
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let rss_bytes = memvisor::memory::smaps::parse(&smaps)
        .iter()
        .filter(|v| v.end - v.start != GUEST_MEM)
        .map(|v| v.fields.get("Rss").copied().unwrap_or(0))
        .sum();
    Resources { fds: count_dir("/proc/self/fd"), threads: count_dir("/proc/self/task"), rss_bytes }
}

/// One series: samples, and whether it stayed flat.
#[derive(Debug, Serialize)]
pub struct Series {
    /// (cycles done, resources) samples.
    pub samples: Vec<(usize, Resources)>,
    /// Seconds the series took.
    pub seconds: f64,
    /// Whether fds and threads never grew and RSS stayed within the slack.
    pub flat: bool,
}

fn judge(samples: Vec<(usize, Resources)>, seconds: f64, slack: u64) -> Series {
    let flat = match samples.first() {
        Some((_, first)) => samples.iter().all(|(_, r)| r.fds <= first.fds && r.threads <= first.threads && r.rss_bytes <= first.rss_bytes + slack),
        None => false,
    };
    Series { samples, seconds, flat }
}

fn config(extra: ConfigFile) -> Result<memvisor::config::VmConfig, String> {
    let base = ConfigFile { mem: Some(SizeValue::Bytes(64 << 20)), backing: Some(Backing::Anon), ..ConfigFile::default() };
    base.merged_with(extra).into_vm_config().map_err(|e| memvisor::error_chain(&e))
}

fn boots(n: usize, slack: u64) -> Result<Series, String> {
    let config = config(ConfigFile::default())?;
    let every = (n / 10).max(1);
    let start = Instant::now();
    let mut samples = Vec::new();
    for i in 0..n {
        let options = RunOptions { skip_selftest: true, ..RunOptions::new(Box::new(std::io::sink())) };
        let outcome = vmm::run(&config, options).map_err(|e| format!("boot {i}: {}", memvisor::error_chain(&e)))?;
        if outcome.exit_status != 0 {
            return Err(format!("boot {i}: the guest exited with {}", outcome.exit_status));
        }
        // The first VM warms the allocator and the thread-local state.
        if i == 0 || (i + 1) % every == 0 {
            samples.push((i + 1, resources()));
        }
    }
    Ok(judge(samples.split_off(1.min(samples.len())), start.elapsed().as_secs_f64(), slack))
}

fn balloon(cycles: usize, size: u64, slack: u64) -> Result<Series, String> {
    // The driver ends after `cycles` returns of the balloon to zero.
    let workload = format!("balloon:irq=1,rounds={cycles}").parse().map_err(|e| memvisor::error_chain(&e))?;
    let config = config(ConfigFile { balloon: Some(SizeValue::Bytes(0)), workload: Some(workload), ..ConfigFile::default() })?;
    let handle = MachineHandle::new();
    let options = RunOptions { stay_up: true, handle: Arc::clone(&handle), ..RunOptions::new(Box::new(std::io::sink())) };
    let vm = std::thread::spawn(move || vmm::run(&config, options).map(|o| o.exit_status).map_err(|e| memvisor::error_chain(&e)));
    let wait_for = |want: u64| -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = handle.balloon_info()?;
            if info["actual_bytes"].as_u64() == Some(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the guest's balloon did not reach {want} bytes: {info}"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    let every = (cycles / 10).max(1);
    let mut samples = Vec::new();
    let start = Instant::now();
    let result = (|| {
        wait_for(0)?;
        for i in 0..cycles {
            handle.balloon_set(size)?;
            wait_for(size)?;
            handle.balloon_set(0)?;
            wait_for(0)?;
            if i == 0 || (i + 1) % every == 0 {
                samples.push((i + 1, resources()));
            }
        }
        Ok::<(), String>(())
    })();
    handle.shutdown();
    let exit = vm.join().map_err(|_| "the VM thread panicked".to_string())?;
    result?;
    exit?;
    Ok(judge(samples.split_off(1.min(samples.len())), start.elapsed().as_secs_f64(), slack))
}

/// Both series.
#[derive(Debug, Serialize)]
pub struct SoakResults {
    /// Boot/teardown.
    pub boots: Series,
    /// Balloon inflate/deflate.
    pub balloon: Series,
}

/// Runs the soak.
///
/// # Errors
/// A message: a VM failed, or the flags are bad.
pub fn run(args: &SoakArgs) -> Result<u32, String> {
    let size = memvisor::size::parse_size(&args.size).map_err(|e| memvisor::error_chain(&e))?;
    let boots = boots(args.boots, args.rss_slack)?;
    let balloon = balloon(args.cycles, size, args.rss_slack)?;
    let results = SoakResults { boots, balloon };
    if args.json {
        println!("{}", serde_json::to_string(&results).map_err(|e| e.to_string())?);
    } else {
        for (name, s) in [("boot/teardown", &results.boots), ("balloon inflate/deflate", &results.balloon)] {
            println!("{name}: {} in {:.1} s, {}", s.samples.last().map_or(0, |x| x.0), s.seconds, if s.flat { "flat" } else { "NOT flat" });
            for (n, r) in &s.samples {
                println!("  after {n:>6}: fds {:>3}, threads {:>2}, RSS {}", r.fds, r.threads, memvisor::size::format_size(r.rss_bytes));
            }
        }
    }
    Ok(u32::from(!(results.boots.flat && results.balloon.flat)))
}
