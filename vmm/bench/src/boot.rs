//! `vmm bench boot`: boot time and the VMM's own memory, over fresh
//! processes.
//!
//! Each run spawns the `vmm` binary ([`crate::vmm_binary`]) as
//! `vmm run --json --skip-selftest --mem SIZE`, with `MEMVISOR_SPAWN_NS`
//! set to CLOCK_MONOTONIC just before the spawn, so the child's timings
//! ([`memvisor::timeline`]) count from the parent's fork: exec, dynamic
//! linking and Rust start-up included. From each child's JSON report it
//! takes (a) `timings_us.first_report_us`, (b) `timings_us.ready_us` (the
//! guest's Ready report, sent before its self-test, which is skipped
//! anyway) and (c) `vmm_memory.vmm_overhead_bytes`, the child's RSS beyond
//! guest RAM at the end of its run. A few warm-up runs come first and are
//! not counted: this host is a VM whose host reclaims idle memory, and the
//! first spawn after idling pays to fault the binary back in.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;
use thiserror::Error;

use crate::stats::{Summary, summarize};
use memvisor::size::{format_size, parse_size};
use memvisor::timeline;

/// Target for (b), process start → guest ready, at 256 MiB (issue 2).
pub const READY_TARGET_US: f64 = 10_000.0;
/// Target for (c), the VMM's RSS beyond guest memory (issue 2; Firecracker
/// publishes ≤ 5 MiB).
pub const OVERHEAD_TARGET_BYTES: f64 = 3.0 * 1024.0 * 1024.0;

/// Flags of `vmm bench boot`.
#[derive(Debug, Clone, clap::Args)]
pub struct BootArgs {
    /// Measured runs, each a fresh process.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Unmeasured runs first (warm the binary and the host's page cache).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Guest memory size.
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// Kernel to boot (default: the built-in tiny guest).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Errors running the boot benchmark.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Bad flags.
    #[error("{0}")]
    Args(String),
    /// The vmm binary is not where it should be.
    #[error("{0}")]
    Exe(String),
    /// Spawning failed.
    #[error("cannot spawn {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// A run exited nonzero.
    #[error("run {run} failed with {status}; its stderr ends with:\n{stderr}")]
    RunFailed {
        /// Which run (1-based; warm-up runs are negative-free: counted first).
        run: usize,
        /// Exit status.
        status: std::process::ExitStatus,
        /// The end of its stderr.
        stderr: String,
    },
    /// A run's report was not what `vmm run --json` prints.
    #[error("run {run} printed an unreadable report: {detail}")]
    BadReport {
        /// Which run.
        run: usize,
        /// What was wrong.
        detail: String,
    },
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// (a) process start → guest's first report, µs.
    pub first_report_us: Option<f64>,
    /// (b) process start → guest ready, µs.
    pub ready_us: Option<f64>,
    /// (c) the VMM's RSS beyond guest memory, bytes.
    pub vmm_overhead_bytes: Option<u64>,
    /// Process start → the vCPU's first KVM_RUN, µs.
    pub vcpu_start_us: Option<f64>,
    /// Spawn → the parent saw the child exit, µs.
    pub wall_us: f64,
    /// The child's start-up milestones: (name, µs since process start).
    pub phases: Vec<(String, f64)>,
}

/// Extracts a [`Sample`] from a `vmm run --json` report.
///
/// # Errors
/// A description when the report is not JSON or lacks the timings.
pub fn sample_from_report(json: &str, wall_us: f64) -> Result<Sample, String> {
    let v: serde_json::Value = serde_json::from_str(json.trim()).map_err(|e| format!("not JSON ({e})"))?;
    let t = v.get("timings_us").ok_or("no timings_us")?;
    let us = |k: &str| t.get(k).and_then(serde_json::Value::as_f64);
    Ok(Sample {
        first_report_us: us("first_report_us"),
        ready_us: us("ready_us"),
        vmm_overhead_bytes: v.pointer("/vmm_memory/vmm_overhead_bytes").and_then(serde_json::Value::as_u64),
        vcpu_start_us: us("vcpu_start_us"),
        wall_us,
        phases: v
            .get("boot_phases_us")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p.get("phase")?.as_str()?.to_string(), p.get("at_us")?.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The summaries the benchmark prints.
#[derive(Debug, Clone, Serialize)]
pub struct BootResults {
    /// The command each run executed.
    pub command: String,
    /// Measured runs.
    pub runs: usize,
    /// Warm-up runs (not counted).
    pub warmup: usize,
    /// (a) in µs.
    pub first_report_us: Option<Summary>,
    /// (b) in µs; `None` when the guest never reported ready.
    pub ready_us: Option<Summary>,
    /// (c) in bytes.
    pub vmm_overhead_bytes: Option<Summary>,
    /// Process start → first KVM_RUN, µs (where (a) and (b) begin to
    /// depend on the guest).
    pub vcpu_start_us: Option<Summary>,
    /// Target for (b), µs.
    pub ready_target_us: f64,
    /// Target for (c), bytes.
    pub overhead_target_bytes: f64,
    /// Where start-up time goes: each milestone's median time since the
    /// previous one (the first since process start), in order.
    pub phases: Vec<PhaseSummary>,
    /// /proc/loadavg's 1-minute figure before and after the runs: timings
    /// on a busy host are not boot times.
    pub load_average: (Option<f64>, Option<f64>),
    /// Every sample.
    pub samples: Vec<Sample>,
}

/// The 1-minute load average (/proc/loadavg).
#[must_use]
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// One start-up phase over all runs.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummary {
    /// The milestone that ends the phase.
    pub until: String,
    /// Time from the previous milestone, µs.
    pub duration_us: Summary,
}

/// Per-phase durations: each sample's milestones (plus the first KVM_RUN,
/// first report and ready) turned into time since the previous one, and
/// summarised by name in the order of the first sample.
#[must_use]
pub fn phase_summaries(samples: &[Sample]) -> Vec<PhaseSummary> {
    let durations = |s: &Sample| -> Vec<(String, f64)> {
        let mut points = s.phases.clone();
        for (name, at) in [("first KVM_RUN", s.vcpu_start_us), ("guest's first report", s.first_report_us), ("guest ready", s.ready_us)] {
            if let Some(at) = at {
                points.push((name.to_string(), at));
            }
        }
        let mut prev = 0.0;
        points
            .into_iter()
            .map(|(name, at)| {
                let d = at - prev;
                prev = at;
                (name, d)
            })
            .collect()
    };
    let all: Vec<Vec<(String, f64)>> = samples.iter().map(durations).collect();
    let Some(first) = all.first() else { return Vec::new() };
    first
        .iter()
        .filter_map(|(name, _)| {
            let values: Vec<f64> = all.iter().filter_map(|d| d.iter().find(|(n, _)| n == name).map(|(_, v)| *v)).collect();
            Some(PhaseSummary { until: name.clone(), duration_us: summarize(&values)? })
        })
        .collect()
}

/// Summarises samples.
#[must_use]
pub fn results(command: String, warmup: usize, samples: Vec<Sample>) -> BootResults {
    let col = |f: fn(&Sample) -> Option<f64>| summarize(&samples.iter().filter_map(f).collect::<Vec<_>>());
    BootResults {
        command,
        runs: samples.len(),
        warmup,
        first_report_us: col(|s| s.first_report_us),
        ready_us: col(|s| s.ready_us),
        vmm_overhead_bytes: col(|s| s.vmm_overhead_bytes.map(|b| b as f64)),
        vcpu_start_us: col(|s| s.vcpu_start_us),
        ready_target_us: READY_TARGET_US,
        overhead_target_bytes: OVERHEAD_TARGET_BYTES,
        phases: phase_summaries(&samples),
        load_average: (None, None),
        samples,
    }
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1024.0 * 1024.0))
}

fn verdict(s: &Summary, target: f64) -> &'static str {
    if s.median <= target && s.p90 <= target {
        "met (median and p90)"
    } else if s.median <= target {
        "median met, p90 missed"
    } else {
        "MISSED"
    }
}

/// The results as a text table.
#[must_use]
pub fn to_text(r: &BootResults) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "vmm bench boot: {} runs (after {} warm-up runs), each a fresh process:", r.runs, r.warmup);
    let _ = writeln!(s, "  {}", r.command);
    let load = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let _ = writeln!(s, "  host load average {} before, {} after ({cpus} CPUs); a busy host inflates every time below", load(r.load_average.0), load(r.load_average.1));
    let _ = writeln!(s, "{:<42} {:>10} {:>10} {:>10} {:>10}   target", "", "median", "p90", "min", "max");
    let mut row = |name: &str, sum: Option<&Summary>, fmt: fn(f64) -> String, target: Option<f64>, missing: &str| match sum {
        Some(x) => {
            let t = target.map_or(String::new(), |t| format!("≤ {}: {}", fmt(t), verdict(x, t)));
            let _ = writeln!(s, "{name:<42} {:>10} {:>10} {:>10} {:>10}   {t}", fmt(x.median), fmt(x.p90), fmt(x.min), fmt(x.max));
        }
        None => {
            let _ = writeln!(s, "{name:<42} {missing}");
        }
    };
    row("process start → first KVM_RUN", r.vcpu_start_us.as_ref(), ms, None, "n/a");
    row("(a) process start → guest's first report", r.first_report_us.as_ref(), ms, None, "n/a: the guest sent no report");
    row(
        "(b) process start → guest ready",
        r.ready_us.as_ref(),
        ms,
        Some(r.ready_target_us),
        "n/a: the guest sent no Ready report (a guest kernel that predates it); target not assessed",
    );
    row("(c) VMM RSS beyond guest memory", r.vmm_overhead_bytes.as_ref(), mib, Some(r.overhead_target_bytes), "n/a: the report has no vmm_memory");
    if !r.phases.is_empty() {
        let _ = writeln!(s, "where start-up time goes (median time since the previous milestone):");
        for p in &r.phases {
            let _ = writeln!(s, "  {:<40} {:>8.0} µs   (p90 {:.0} µs)", format!("→ {}", p.until), p.duration_us.median, p.duration_us.p90);
        }
    }
    s
}

fn spawn_one(exe: &Path, args: &[String], run: usize) -> Result<Sample, BenchError> {
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Read the clock last, right before the fork.
    let spawn_ns = timeline::monotonic_ns();
    cmd.env(timeline::SPAWN_NS_ENV, spawn_ns.to_string());
    let out = cmd.output().map_err(|e| BenchError::Spawn(exe.to_path_buf(), e))?;
    let wall_us = timeline::monotonic_ns().saturating_sub(spawn_ns) as f64 / 1000.0;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(10).collect();
        return Err(BenchError::RunFailed { run, status: out.status, stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n") });
    }
    sample_from_report(&String::from_utf8_lossy(&out.stdout), wall_us).map_err(|detail| BenchError::BadReport { run, detail })
}

/// Runs the benchmark and prints its results.
///
/// # Errors
/// [`BenchError`] when a run cannot be spawned or fails.
pub fn run(args: &BootArgs) -> Result<u32, BenchError> {
    if args.runs == 0 {
        return Err(BenchError::Args("--runs must be at least 1".into()));
    }
    let mem = parse_size(&args.mem).map_err(|e| BenchError::Args(format!("--mem: {e}")))?;
    let exe = crate::vmm_binary().map_err(BenchError::Exe)?;
    let mut child_args: Vec<String> = vec!["run".into(), "--json".into(), "--skip-selftest".into(), "--mem".into(), args.mem.clone()];
    if let Some(k) = &args.kernel {
        child_args.push("--kernel".into());
        child_args.push(k.display().to_string());
    }
    let command = format!("{} {}", exe.display(), child_args.join(" "));
    if !args.json {
        eprintln!("booting {} guests of {} ({} warm-up)…", args.runs, format_size(mem), args.warmup);
    }
    let load_before = load_average();
    for i in 0..args.warmup {
        spawn_one(&exe, &child_args, i + 1)?;
    }
    let mut samples = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        samples.push(spawn_one(&exe, &child_args, args.warmup + i + 1)?);
    }
    let mut r = results(command, args.warmup, samples);
    r.load_average = (load_before, load_average());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(|e| BenchError::Args(e.to_string()))?);
    } else {
        print!("{}", to_text(&r));
        if r.runs < 20 {
            println!("note: issue 2 asks for at least 20 runs; this used {}", r.runs);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(first: f64, ready: Option<f64>, rss: u64) -> Sample {
        Sample {
            first_report_us: Some(first),
            ready_us: ready,
            vmm_overhead_bytes: Some(rss),
            vcpu_start_us: Some(first / 2.0),
            wall_us: first * 2.0,
            phases: vec![("main".into(), first / 4.0)],
        }
    }

    #[test]
    fn report_fields_are_taken_from_run_json() {
        let json = r#"{"timings_us":{"vcpu_start_us":1200.5,"first_report_us":1500.0,"ready_us":null,"end_us":3000.0},
                       "vmm_memory":{"vmm_overhead_bytes":2500000}}"#;
        let s = sample_from_report(json, 9.0).unwrap();
        assert_eq!(s.first_report_us, Some(1500.0));
        assert_eq!(s.ready_us, None, "null ready_us means the guest never reported ready");
        assert_eq!(s.vmm_overhead_bytes, Some(2_500_000));
        assert_eq!(s.vcpu_start_us, Some(1200.5));
        assert!(s.phases.is_empty(), "a report without boot_phases_us has no phases");
        assert!(sample_from_report("vmm: error: x", 0.0).is_err());
        assert!(sample_from_report("{}", 0.0).is_err());
    }

    #[test]
    fn missing_ready_reports_say_so_instead_of_a_number() {
        let r = results("vmm run".into(), 0, (1..=20).map(|i| sample(f64::from(i) * 100.0, None, 1 << 20)).collect());
        assert!(r.ready_us.is_none());
        let text = to_text(&r);
        assert!(text.contains("no Ready report"), "{text}");
        assert!(text.contains("met (median and p90)"), "1 MiB is under the 3 MiB target: {text}");
    }

    #[test]
    fn phases_are_durations_since_the_previous_milestone() {
        let s = |main: f64, run: f64| Sample {
            first_report_us: Some(run + 300.0),
            ready_us: None,
            vmm_overhead_bytes: None,
            vcpu_start_us: Some(run + 100.0),
            wall_us: 0.0,
            phases: vec![("main".into(), main), ("run".into(), run)],
        };
        let p = phase_summaries(&[s(500.0, 900.0), s(700.0, 1000.0), s(600.0, 1000.0)]);
        let names: Vec<&str> = p.iter().map(|p| p.until.as_str()).collect();
        assert_eq!(names, ["main", "run", "first KVM_RUN", "guest's first report"]);
        assert_eq!(p[0].duration_us.median, 600.0);
        assert_eq!(p[1].duration_us.median, 400.0, "run - main: 400, 300, 400");
        assert_eq!(p[2].duration_us.median, 100.0);
        assert_eq!(p[3].duration_us.median, 200.0);
    }

    #[test]
    fn targets_are_judged_on_median_and_p90() {
        let r = results("vmm run".into(), 2, (1..=20).map(|i| sample(100.0, Some(f64::from(i) * 600.0), 4 << 20)).collect());
        let ready = r.ready_us.unwrap();
        assert_eq!((ready.median, ready.p90), (6000.0, 10800.0));
        assert_eq!(verdict(&ready, READY_TARGET_US), "median met, p90 missed");
        assert_eq!(verdict(&r.vmm_overhead_bytes.unwrap(), OVERHEAD_TARGET_BYTES), "MISSED");
    }
}
