//! `vmm bench linux-boot`: a stock Linux bzImage booted by memvisor and by
//! QEMU side by side, timed from process spawn to milestones on the serial
//! console.
//!
//! Every run is a fresh process with the same bzImage, initrd, command line
//! and guest RAM: `vmm run` (the VMM decompresses the kernel, the default),
//! `qemu-system-x86_64 -enable-kvm -M microvm ...` (QEMU enters the bzImage,
//! whose decompressor runs in the guest) and `vmm run --kernel-decompress
//! guest` (memvisor entering the bzImage the same way, to show where the
//! gain comes from). Runs are interleaved (memvisor, QEMU, memvisor with
//! guest decompression, memvisor, QEMU, ...), so load on the host falls on
//! all of them alike. The milestones are Linux's own lines: "Linux
//! version" (the kernel proper has started), the last "BIOS-e820" line (it
//! has read the memory map) and "Memory:" (the page allocator is up). The
//! run is killed at the last milestone asked for (`--until`), and its CPU
//! time (all threads, user and system: on KVM's PVM flavour emulated guest
//! instructions are the vCPU thread's system time) is the kernel's account
//! of the killed child (wait4(2)).
//!
//! The bench installs nothing: QEMU comes from Debian's `qemu-system-x86`
//! (`apt-get install qemu-system-x86`); without it memvisor runs alone.
//! Without `--kernel` it asks `resources/linux/fetch.sh` (the tests'
//! kernel, cached under `target/linux`) for the bzImage and initramfs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::boot::load_average;
use crate::stats::{Summary, summarize};
use memvisor::size::{format_size, parse_size};

/// The command line of `tests/tests/linux.rs`: the serial console from the
/// first line (`earlyprintk`), `noxsave` (this host's emulator refuses
/// `xrstor` at ring 0: docs/linux-guests.md) and a reboot or panic that
/// ends the VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,keep noxsave reboot=k panic=-1";
/// How long a run that reached its last milestone waits for Linux's
/// "Command line:" line before it is stopped.
const CMDLINE_GRACE: Duration = Duration::from_secs(5);
/// The goal: memvisor at most 0.9× QEMU's time at every milestone.
pub const GOAL_RATIO: f64 = 0.9;

/// A console milestone, in boot order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Milestone {
    /// "Linux version": the kernel proper prints its banner.
    Version,
    /// The last "BIOS-e820" line: the memory map has been read.
    E820,
    /// "Memory:": the page allocator counts the RAM it manages.
    Memory,
}

impl Milestone {
    /// Every milestone, in boot order.
    pub const ALL: [Milestone; 3] = [Milestone::Version, Milestone::E820, Milestone::Memory];

    /// How the table names it.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Milestone::Version => "\"Linux version\"",
            Milestone::E820 => "last \"BIOS-e820\"",
            Milestone::Memory => "\"Memory:\"",
        }
    }
}

/// Flags of `vmm bench linux-boot`.
#[derive(Debug, Clone, clap::Args)]
pub struct LinuxBootArgs {
    /// Runs of each VMM, interleaved.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Guest RAM, the same for every VMM.
    #[arg(long, default_value = "512M")]
    pub mem: String,
    /// The bzImage (default: resources/linux/fetch.sh's VMLINUZ).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The initrd (default: fetch.sh's INITRAMFS when --kernel is not given).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line, the same for every VMM.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Stop each run at this milestone.
    #[arg(long, value_enum, default_value = "memory")]
    pub until: Milestone,
    /// Give up on a run after this many seconds; milestones not reached by
    /// then are reported as such.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
    /// QEMU's machine type and options.
    #[arg(long, default_value = "microvm")]
    pub qemu_machine: String,
    /// Leave QEMU out.
    #[arg(long)]
    pub no_qemu: bool,
    /// Leave out memvisor with the guest's own decompressor.
    #[arg(long)]
    pub no_guest_decompress: bool,
    /// A short run: one round, each run stopped at "Linux version".
    #[arg(long)]
    pub quick: bool,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Errors running the benchmark.
#[derive(Debug, Error)]
pub enum LinuxBootError {
    /// Bad flags.
    #[error("{0}")]
    Args(String),
    /// No kernel: fetch.sh is not where it should be or failed.
    #[error("{0}")]
    Kernel(String),
    /// The vmm binary is not where it should be.
    #[error("{0}")]
    Exe(String),
    /// Spawning failed.
    #[error("cannot spawn {0}")]
    Spawn(String, #[source] std::io::Error),
    /// JSON output failed.
    #[error("cannot print the results")]
    Json(#[from] serde_json::Error),
}

/// One VMM configuration under test.
#[derive(Debug, Clone, Serialize)]
pub struct Contender {
    /// Its name in the table.
    pub name: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Whether the ratio to QEMU is judged for it (memvisor's default path).
    pub judged: bool,
    /// Whether it is QEMU (the reference of the ratios).
    pub reference: bool,
}

impl Contender {
    /// The command as a shell would show it.
    #[must_use]
    pub fn command(&self) -> String {
        let quote = |a: &str| if a.contains(' ') { format!("\"{a}\"") } else { a.to_string() };
        std::iter::once(self.program.display().to_string()).chain(self.args.iter().map(|a| quote(a))).collect::<Vec<_>>().join(" ")
    }
}

/// What one run saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds from spawn to each milestone reached, in [`Milestone::ALL`]'s order.
    pub at_s: [Option<f64>; 3],
    /// The process's CPU time (user + system, all threads) until it was
    /// stopped, seconds.
    pub cpu_s: Option<f64>,
    /// What Linux printed after "Command line: ".
    pub cmdline: Option<String>,
    /// Seconds the run lasted.
    pub wall_s: f64,
    /// The last console lines when the run stopped short of its milestone.
    pub tail: Vec<String>,
}

/// Reads console lines into a [`Sample`]: a pure state machine, fed one
/// line at a time with its time since spawn.
#[derive(Debug, Default)]
pub struct ConsoleTracker {
    /// What has been seen.
    pub sample: Sample,
    /// Whether the last line was a "BIOS-e820" line (the map is printed
    /// in one run of lines; the milestone is its last).
    in_e820: bool,
    /// Whether a map line has been followed by another line.
    e820_done: bool,
    recent: std::collections::VecDeque<String>,
}

impl ConsoleTracker {
    /// Takes one console line seen at `t` seconds.
    pub fn line(&mut self, t: f64, line: &str) {
        let s = &mut self.sample;
        if s.at_s[0].is_none() && line.contains("Linux version ") {
            s.at_s[0] = Some(t);
        }
        if s.cmdline.is_none()
            && let Some(rest) = line.split_once("Command line: ").map(|(_, r)| r)
        {
            s.cmdline = Some(rest.trim_end().to_string());
        }
        let e820 = line.contains("BIOS-e820: ");
        if e820 && !self.e820_done {
            s.at_s[1] = Some(t);
        } else if self.in_e820 {
            self.e820_done = true;
        }
        self.in_e820 = e820;
        if s.at_s[2].is_none() && line.contains("Memory: ") && line.contains("K/") {
            s.at_s[2] = Some(t);
        }
        self.recent.push_back(line.to_string());
        if self.recent.len() > 8 {
            self.recent.pop_front();
        }
    }

    /// Whether `m` has been reached (for the map: its last line has been
    /// followed by another).
    #[must_use]
    pub fn reached(&self, m: Milestone) -> bool {
        match m {
            Milestone::Version => self.sample.at_s[0].is_some(),
            Milestone::E820 => self.e820_done,
            Milestone::Memory => self.sample.at_s[2].is_some(),
        }
    }
}

/// Kills `child` and reaps it, returning its CPU time (user + system, all
/// threads) from wait4(2).
fn kill_and_reap(child: &mut Child) -> Option<f64> {
    let _ = child.kill();
    let pid = libc::pid_t::try_from(child.id()).ok()?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped (std's Child only reaps
    // in wait/try_wait, which this module never calls); both pointers are
    // to live locals for the duration of the call.
    let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    if r != pid {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// Runs `c` once: spawns it, reads its console until `until` or `timeout`,
/// then kills it.
fn run_once(c: &Contender, until: Milestone, timeout: Duration) -> Result<Sample, LinuxBootError> {
    let mut cmd = Command::new(&c.program);
    cmd.args(&c.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| LinuxBootError::Spawn(c.program.display().to_string(), e))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        // Bytes, not UTF-8 lines: firmware and early consoles print
        // whatever they like.
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
            if tx.send((start.elapsed().as_secs_f64(), line)).is_err() {
                break;
            }
            buf.clear();
        }
    });
    let mut tracker = ConsoleTracker::default();
    // "Command line:" follows "Linux version" at once (both come out of
    // the log when the early console starts); a run stopped at the banner
    // waits a moment more for it.
    let mut grace: Option<Instant> = None;
    loop {
        if tracker.reached(until) {
            if tracker.sample.cmdline.is_some() || grace.is_some_and(|g| g.elapsed() >= CMDLINE_GRACE) {
                break;
            }
            grace.get_or_insert_with(Instant::now);
        }
        let Some(left) = timeout.checked_sub(start.elapsed()) else { break };
        let left = if grace.is_some() { left.min(CMDLINE_GRACE) } else { left };
        match rx.recv_timeout(left) {
            Ok((t, line)) => tracker.line(t, &line),
            // Timed out, or the process closed its console (exited).
            Err(_) => break,
        }
    }
    let cpu = kill_and_reap(&mut child);
    let _ = reader.join();
    let short = !tracker.reached(until);
    let mut sample = tracker.sample;
    sample.cpu_s = cpu;
    sample.wall_s = start.elapsed().as_secs_f64();
    if short {
        sample.tail = tracker.recent.into_iter().collect();
    }
    Ok(sample)
}

/// One milestone (or CPU time) of one contender over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Runs that reached it, and their summary (seconds).
    pub summary: Option<Summary>,
    /// Runs that did not reach it.
    pub missed: usize,
    /// The median over QEMU's, when both exist.
    pub ratio_to_qemu: Option<f64>,
}

/// A contender's results.
#[derive(Debug, Clone, Serialize)]
pub struct ContenderResults {
    /// Who.
    pub contender: Contender,
    /// Per milestone, in [`Milestone::ALL`]'s order (up to `--until`).
    pub milestones: Vec<(Milestone, Row)>,
    /// CPU time until stopped.
    pub cpu: Row,
    /// Whether every run's Linux printed our command line exactly.
    pub cmdline_is_ours: bool,
    /// Every run.
    pub samples: Vec<Sample>,
}

/// The whole benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Runs per contender.
    pub runs: usize,
    /// The kernel, initrd, RAM and command line every contender got.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// The command line.
    pub cmdline: String,
    /// Per-run bound, seconds.
    pub timeout_s: u64,
    /// Load average before and after.
    pub load_average: (Option<f64>, Option<f64>),
    /// Per contender.
    pub contenders: Vec<ContenderResults>,
    /// Whether memvisor's default path is at most [`GOAL_RATIO`] × QEMU at
    /// every milestone (`None`: no QEMU, or a milestone missing).
    pub goal_met: Option<bool>,
}

/// Summarises each contender's samples, with the ratio of medians to the
/// reference (QEMU) per milestone.
#[must_use]
pub fn summarise(contenders: &[Contender], samples: &[Vec<Sample>], until: Milestone) -> (Vec<ContenderResults>, Option<bool>) {
    let milestones: Vec<Milestone> = Milestone::ALL.into_iter().filter(|m| *m <= until).collect();
    let column = |runs: &[Sample], f: &dyn Fn(&Sample) -> Option<f64>| {
        let values: Vec<f64> = runs.iter().filter_map(f).collect();
        (summarize(&values), runs.len() - values.len())
    };
    let reference = contenders.iter().position(|c| c.reference).map(|i| &samples[i]);
    let row = |runs: &[Sample], f: &dyn Fn(&Sample) -> Option<f64>| {
        let (summary, missed) = column(runs, f);
        let ratio = match (summary, reference.map(|r| column(r, f).0)) {
            (Some(s), Some(Some(q))) if q.median > 0.0 => Some(s.median / q.median),
            _ => None,
        };
        Row { summary, missed, ratio_to_qemu: ratio }
    };
    let mut goal = None;
    let results = contenders
        .iter()
        .zip(samples)
        .map(|(c, runs)| {
            let rows: Vec<(Milestone, Row)> = milestones.iter().map(|&m| (m, row(runs, &|s: &Sample| s.at_s[m as usize]))).collect();
            if c.judged && reference.is_some() {
                let each: Option<Vec<bool>> = rows.iter().map(|(_, r)| if r.missed > 0 { None } else { r.ratio_to_qemu.map(|x| x <= GOAL_RATIO) }).collect();
                goal = each.map(|v| v.iter().all(|&ok| ok));
            }
            ContenderResults {
                contender: c.clone(),
                cpu: row(runs, &|s: &Sample| s.cpu_s),
                milestones: rows,
                cmdline_is_ours: false,
                samples: runs.clone(),
            }
        })
        .collect();
    (results, goal)
}

fn secs(v: f64) -> String {
    format!("{v:.1} s")
}

/// The results as a text table.
#[must_use]
pub fn to_text(r: &Results) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "vmm bench linux-boot: {} interleaved runs per VMM, each a fresh process, timed from spawn", r.runs);
    let _ = writeln!(s, "  kernel {} ({}), initrd {}", r.kernel.display(), format_size(r.mem), r.initrd.as_ref().map_or("none".into(), |p| p.display().to_string()));
    let _ = writeln!(s, "  command line (the same for all): {}", r.cmdline);
    for c in &r.contenders {
        let _ = writeln!(s, "  {}: {}", c.contender.name, c.contender.command());
    }
    let load = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let _ = writeln!(s, "  host load average {} before, {} after ({cpus} CPUs); each run stopped at its last milestone or after {} s", load(r.load_average.0), load(r.load_average.1), r.timeout_s);
    let width = r.contenders.iter().map(|c| c.contender.name.len()).max().unwrap_or(8).max(8);
    let _ = writeln!(s, "{:<20} {:<width$} {:>9} {:>9} {:>9}   median vs QEMU", "milestone", "VMM", "min", "median", "max");
    let mut line = |label: &str, name: &str, row: &Row, judged: bool| {
        let cells = match row.summary {
            Some(x) => format!("{:>9} {:>9} {:>9}", secs(x.min), secs(x.median), secs(x.max)),
            None => format!("{:>29}", "not reached"),
        };
        let ratio = row.ratio_to_qemu.map_or(String::new(), |x| {
            let verdict = if !judged {
                ""
            } else if x <= GOAL_RATIO {
                "  (goal ≤ 0.9×: met)"
            } else {
                "  (goal ≤ 0.9×: MISSED)"
            };
            format!("{x:.2}×{verdict}")
        });
        let missed = if row.missed > 0 { format!("  [{} run(s) did not reach it within {} s]", row.missed, r.timeout_s) } else { String::new() };
        let _ = writeln!(s, "{label:<20} {name:<width$} {cells}   {ratio}{missed}");
    };
    let count = r.contenders.first().map_or(0, |c| c.milestones.len());
    for i in 0..count {
        for (j, c) in r.contenders.iter().enumerate() {
            let (m, row) = &c.milestones[i];
            line(if j == 0 { m.label() } else { "" }, &c.contender.name, row, c.contender.judged);
        }
    }
    for (j, c) in r.contenders.iter().enumerate() {
        line(if j == 0 { "VMM CPU time" } else { "" }, &c.contender.name, &c.cpu, false);
    }
    for c in &r.contenders {
        let printed: Vec<&str> = c.samples.iter().filter_map(|x| x.cmdline.as_deref()).collect();
        let what = if c.cmdline_is_ours {
            "ours, exactly".to_string()
        } else {
            printed.first().map_or("not printed".to_string(), |p| format!("{p:?} (not ours)"))
        };
        let _ = writeln!(s, "Linux's \"Command line:\" under {}: {what}", c.contender.name);
        for (k, x) in c.samples.iter().enumerate().filter(|(_, x)| !x.tail.is_empty()) {
            let _ = writeln!(s, "  run {} stopped short after {:.0} s; its last console lines:", k + 1, x.wall_s);
            for l in &x.tail {
                let _ = writeln!(s, "    {l}");
            }
        }
    }
    let _ = match r.goal_met {
        Some(true) => writeln!(s, "goal (memvisor ≤ {GOAL_RATIO}× QEMU at every milestone, medians): met"),
        Some(false) => writeln!(s, "goal (memvisor ≤ {GOAL_RATIO}× QEMU at every milestone, medians): MISSED"),
        None => writeln!(s, "goal (memvisor ≤ {GOAL_RATIO}× QEMU at every milestone): not assessed (no QEMU, or a milestone not reached)"),
    };
    s
}

/// fetch.sh's VMLINUZ and INITRAMFS.
fn fetched_kernel() -> Result<(PathBuf, PathBuf), LinuxBootError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../resources/linux/fetch.sh");
    if !script.is_file() {
        return Err(LinuxBootError::Kernel(format!("no --kernel given and {} is not there to fetch one", script.display())));
    }
    let out = Command::new("bash").arg(&script).stderr(Stdio::inherit()).output().map_err(|e| LinuxBootError::Spawn(script.display().to_string(), e))?;
    if !out.status.success() {
        return Err(LinuxBootError::Kernel(format!("{} failed ({}); give --kernel and --initrd", script.display(), out.status)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(PathBuf::from);
    match (get("VMLINUZ="), get("INITRAMFS=")) {
        (Some(k), Some(i)) => Ok((k, i)),
        _ => Err(LinuxBootError::Kernel(format!("{} printed no VMLINUZ or INITRAMFS line", script.display()))),
    }
}

/// The contenders, in the order each round runs them.
fn contenders(args: &LinuxBootArgs, vmm: &Path, qemu: Option<&Path>, kernel: &Path, initrd: Option<&Path>) -> Vec<Contender> {
    let mut base: Vec<String> = vec!["run".into(), "--mem".into(), args.mem.clone(), "--kernel".into(), kernel.display().to_string()];
    if let Some(i) = initrd {
        base.extend(["--initrd".into(), i.display().to_string()]);
    }
    base.extend(["--cmdline".into(), args.cmdline.clone()]);
    let mut out = vec![Contender { name: "memvisor".into(), program: vmm.to_path_buf(), args: base.clone(), judged: true, reference: false }];
    if let Some(q) = qemu {
        let mut a: Vec<String> = ["-enable-kvm", "-M", &args.qemu_machine, "-cpu", "host,-arch-capabilities", "-m", &qemu_mem(&args.mem), "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-kernel"]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
        a.push(kernel.display().to_string());
        if let Some(i) = initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        a.extend(["-append".into(), args.cmdline.clone()]);
        out.push(Contender { name: "QEMU microvm".into(), program: q.to_path_buf(), args: a, judged: false, reference: true });
    }
    if !args.no_guest_decompress {
        let mut a = base;
        a.extend(["--kernel-decompress".into(), "guest".into()]);
        out.push(Contender { name: "memvisor, guest decompresses".into(), program: vmm.to_path_buf(), args: a, judged: false, reference: false });
    }
    out
}

/// `--mem` in QEMU's notation (`-m 512M`): whole MiB.
fn qemu_mem(mem: &str) -> String {
    parse_size(mem).map_or_else(|_| mem.to_string(), |b| format!("{}M", b >> 20))
}

/// Runs the benchmark and prints its results.
///
/// # Errors
/// [`LinuxBootError`] when the flags are wrong, no kernel can be found or a
/// process cannot be spawned. A run that stops short of a milestone is a
/// result, not an error.
pub fn run(args: &LinuxBootArgs) -> Result<u32, LinuxBootError> {
    let quick;
    let args = if args.quick {
        quick = LinuxBootArgs { runs: 1, until: Milestone::Version, ..args.clone() };
        &quick
    } else {
        args
    };
    if args.runs == 0 {
        return Err(LinuxBootError::Args("--runs must be at least 1".into()));
    }
    let mem = parse_size(&args.mem).map_err(|e| LinuxBootError::Args(format!("--mem: {e}")))?;
    if mem % (1 << 20) != 0 {
        return Err(LinuxBootError::Args("--mem must be whole MiB (QEMU's -m)".into()));
    }
    let (kernel, initrd) = match &args.kernel {
        Some(k) => (k.clone(), args.initrd.clone()),
        None => {
            let (k, i) = fetched_kernel()?;
            (k, Some(args.initrd.clone().unwrap_or(i)))
        }
    };
    let vmm = crate::vmm_binary().map_err(LinuxBootError::Exe)?;
    let qemu = if args.no_qemu { None } else { crate::qemu::find() };
    if !args.no_qemu && qemu.is_none() {
        eprintln!("vmm bench linux-boot: qemu-system-x86_64 not found; memvisor only (apt-get install qemu-system-x86)");
    }
    let contenders = contenders(args, &vmm, qemu.as_deref(), &kernel, initrd.as_deref());
    let timeout = Duration::from_secs(args.timeout);
    let load_before = load_average();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); contenders.len()];
    for round in 0..args.runs {
        for (c, out) in contenders.iter().zip(samples.iter_mut()) {
            if !args.json {
                eprint!("run {}/{}: {} … ", round + 1, args.runs, c.name);
            }
            let s = run_once(c, args.until, timeout)?;
            if !args.json {
                let at: Vec<String> = Milestone::ALL.iter().filter(|m| **m <= args.until).map(|m| s.at_s[*m as usize].map_or("-".into(), secs)).collect();
                eprintln!("{}", at.join(" / "));
            }
            out.push(s);
        }
    }
    let (mut results, goal_met) = summarise(&contenders, &samples, args.until);
    for r in &mut results {
        r.cmdline_is_ours = !r.samples.is_empty() && r.samples.iter().all(|s| s.cmdline.as_deref() == Some(args.cmdline.as_str()));
    }
    let r = Results {
        runs: args.runs,
        kernel,
        initrd,
        mem,
        cmdline: args.cmdline.clone(),
        timeout_s: args.timeout,
        load_average: (load_before, load_average()),
        contenders: results,
        goal_met,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", to_text(&r));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[(f64, &str)]) -> ConsoleTracker {
        let mut t = ConsoleTracker::default();
        for (at, l) in lines {
            t.line(*at, l);
        }
        t
    }

    #[test]
    fn milestones_are_read_from_linux_console_lines() {
        let t = feed(&[
            (0.5, "Probing EDD (edd=off to disable)... ok"),
            (10.0, "[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) ..."),
            (10.1, "[    0.000000] Command line: console=ttyS0 noxsave"),
            (10.2, "[    0.000000] BIOS-provided physical RAM map:"),
            (10.3, "[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
            (10.4, "[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        ]);
        assert!(t.reached(Milestone::Version));
        assert!(!t.reached(Milestone::E820), "the map may go on");
        let mut t = t;
        t.line(10.5, "[    0.000000] printk: console [earlyser0] enabled");
        t.line(11.0, "[    0.100000] e820: update [mem 0x00000000-0x00000fff] usable ==> reserved");
        t.line(50.0, "[   34.147511] Memory: 219840K/523896K available (14343K kernel code, ...)");
        assert!(t.reached(Milestone::E820) && t.reached(Milestone::Memory));
        assert_eq!(t.sample.at_s, [Some(10.0), Some(10.4), Some(50.0)]);
        assert_eq!(t.sample.cmdline.as_deref(), Some("console=ttyS0 noxsave"));
        // A later "Memory:" without the K/K figures is not the milestone.
        let t = feed(&[(1.0, "Memory: something else")]);
        assert!(!t.reached(Milestone::Memory));
    }

    fn contender(name: &str, judged: bool, reference: bool) -> Contender {
        Contender { name: name.into(), program: PathBuf::from(name), args: vec![], judged, reference }
    }

    fn sample(at: [Option<f64>; 3]) -> Sample {
        Sample { at_s: at, cpu_s: Some(1.0), ..Sample::default() }
    }

    #[test]
    fn ratios_are_medians_over_qemus_and_judge_the_goal() {
        let cs = [contender("memvisor", true, false), contender("qemu", false, true)];
        let mv = vec![sample([Some(10.0), Some(11.0), Some(40.0)]), sample([Some(12.0), Some(13.0), Some(50.0)]), sample([Some(11.0), Some(12.0), Some(45.0)])];
        let q = vec![sample([Some(100.0), Some(101.0), Some(150.0)]); 3];
        let (r, goal) = summarise(&cs, &[mv.clone(), q.clone()], Milestone::Memory);
        assert_eq!(goal, Some(true));
        let (m, row) = &r[0].milestones[2];
        assert_eq!(*m, Milestone::Memory);
        assert_eq!(row.summary.map(|s| (s.min, s.median, s.max)), Some((40.0, 45.0, 50.0)));
        assert!((row.ratio_to_qemu.unwrap() - 0.3).abs() < 1e-9);
        // Slower than 0.9× at one milestone misses the goal.
        let slow = vec![sample([Some(95.0), Some(96.0), Some(40.0)]); 3];
        assert_eq!(summarise(&cs, &[slow, q.clone()], Milestone::Memory).1, Some(false));
        // A milestone memvisor did not reach is not judged a success.
        let short = vec![sample([Some(10.0), Some(11.0), None]); 3];
        let (r, goal) = summarise(&cs, &[short, q], Milestone::Memory);
        assert_eq!((goal, r[0].milestones[2].1.missed), (None, 3));
        // --until stops the table early; without QEMU nothing is judged.
        let (r, goal) = summarise(&cs[..1], &[mv], Milestone::Version);
        assert_eq!((r[0].milestones.len(), goal), (1, None));
    }

    #[test]
    fn the_table_names_every_contender_and_the_verdict() {
        let cs = [contender("memvisor", true, false), contender("QEMU microvm", false, true)];
        let mut mv = vec![sample([Some(10.0), Some(11.0), Some(40.0)]); 3];
        mv[0].cmdline = Some("console=ttyS0".into());
        let q = vec![sample([Some(100.0), Some(101.0), None]); 3];
        let (contenders, goal_met) = summarise(&cs, &[mv, q], Milestone::Memory);
        let r = Results {
            runs: 3,
            kernel: "vmlinuz".into(),
            initrd: None,
            mem: 512 << 20,
            cmdline: "console=ttyS0".into(),
            timeout_s: 300,
            load_average: (Some(1.0), None),
            contenders,
            goal_met,
        };
        let text = to_text(&r);
        assert!(text.contains("0.10×  (goal ≤ 0.9×: met)"), "{text}");
        assert!(text.contains("not reached") && text.contains("did not reach it within 300 s"), "{text}");
        assert!(text.contains("not assessed"), "QEMU never reached Memory:, so no ratio there\n{text}");
        assert_eq!(qemu_mem("512M"), "512M");
        assert_eq!(qemu_mem("1G"), "1024M");
    }
}
