//! `vmm bench dirty`: what harvesting dirty pages costs, per mechanism.
//!
//! A micro guest ([`memvisor::page_writer`]) dirties 0.1 %, 1 % or 100 % of a
//! memslot; then either the raw kernel calls ([`DirtyTracker::harvest_raw`])
//! or memvisor's whole harvest ([`DirtyTracker::harvest`]: ioctls, ranges,
//! merge with VMM writes) collect them, alternately, on the same kind of
//! dirty set. The ratio of medians is the overhead memvisor adds (target
//! ≤ 1.2×). The guest-visible cost of re-dirtying a page is the pass time
//! with logging on minus the same pass with logging off, per page.
//!
//! The micro guest writes its pages in ascending order, the dirty ring's
//! best case (its entries then arrive as page runs); ring mode is also
//! measured with the same pages written in a scattered order, which sends
//! its harvest through a bucketed key list (or, past `ring_pages::MAX_KEYS`
//! entries per slot, the bitmap). Every harvest of memvisor's is checked to
//! hold exactly the pages the pass wrote.
//!
//! [`DirtyTracker::harvest_raw`]: memvisor::dirty::DirtyTracker::harvest_raw
//! [`DirtyTracker::harvest`]: memvisor::dirty::DirtyTracker::harvest

use std::time::Instant;

use serde::Serialize;

use memvisor::page_writer::{FIRST_DATA_PAGE, PageWriter, scatter_step};
use crate::stats::{Summary, summarize};
use memvisor::config::Backing;
use memvisor::size::{format_size, parse_size};
use memvisor::dirty::{DirtyCaps, DirtyMode, PageRange, ranges};
use memvisor::vmm::VmmError;

/// Flags of `vmm bench dirty`.
#[derive(Debug, clap::Args)]
pub struct DirtyArgs {
    /// Memslot size (default 1G; 256M with --quick).
    #[arg(long)]
    pub mem: Option<String>,
    /// Repetitions per cell (default 5; 3 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// A subset that runs in well under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measure only this mechanism (ring, clear or bitmap), harvests and
    /// re-dirty cost alike: many repetitions of one cell in little time.
    #[arg(long)]
    pub mode: Option<DirtyMode>,
    /// Measure only these dirty fractions, in percent of the slot
    /// (default: 0.1,1,100).
    #[arg(long, value_delimiter = ',')]
    pub dirty: Vec<f64>,
    /// Time only the harvest's pure kernels, without a VM: the ring's key
    /// list against the bitmap, and the key sort (`--reps` repetitions,
    /// default 301).
    #[arg(long)]
    pub kernels: bool,
}

/// One (mechanism, dirty fraction) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Mechanism.
    pub mode: DirtyMode,
    /// Dirty fraction of the slot.
    pub fraction: f64,
    /// The guest wrote its pages in a scattered order (else ascending).
    pub scattered: bool,
    /// Pages dirtied per pass.
    pub pages: u64,
    /// Raw kernel-call harvest, µs per GiB of slot.
    pub raw_us_per_gib: Summary,
    /// memvisor's harvest, µs per GiB of slot.
    pub ours_us_per_gib: Summary,
    /// ours / raw (medians): the figure the target is about.
    pub ratio: f64,
    /// The median of ours / raw over the reps' pairs (each rep times one
    /// raw harvest and then one of memvisor's, after identical passes):
    /// a cross-check that slow swings of the host, which move both halves
    /// of a pair alike, cancel out of.
    pub paired_ratio: f64,
    /// Guest-visible cost of re-dirtying one page after a harvest, µs.
    pub redirty_us_per_page: f64,
    /// Every harvest of memvisor's held exactly the pages written: all of
    /// them and no other (page sets compared each rep).
    pub complete: bool,
    /// The pass was capped to fit one dirty ring (PVM only; see below).
    pub capped_to_ring: bool,
}

/// What re-dirtying costs a ring-3 guest task, per mechanism: the tiny
/// guest's dirty workload with tracking on and off, same pages.
#[derive(Debug, Clone, Serialize)]
pub struct GuestRedirty {
    /// Mechanism.
    pub mode: DirtyMode,
    /// Distinct pages written per round (median).
    pub pages: u64,
    /// Round time with tracking, µs (median over rounds 1..).
    pub logged_round_us: f64,
    /// Round time without tracking, µs.
    pub unlogged_round_us: f64,
    /// (logged − unlogged) / pages, µs.
    pub per_page_us: f64,
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct DirtyResults {
    /// Slot size in bytes.
    pub mem_bytes: u64,
    /// Repetitions per cell.
    pub reps: usize,
    /// What the kernel offers.
    pub caps: DirtyCaps,
    /// The cells.
    pub cells: Vec<Cell>,
    /// Guest-visible re-dirty cost, from ring-3 writes in the tiny guest.
    pub guest_redirty: Vec<GuestRedirty>,
}

/// Runs the tiny guest's dirty workload (spawning this binary) and returns
/// (median distinct pages, median round µs) over rounds after the first.
fn dirty_workload_rounds(mode: DirtyMode, log: bool) -> Result<(u64, f64), VmmError> {
    let exe = crate::vmm_binary().map_err(err)?;
    let report = std::env::temp_dir().join(format!("memvisor-bench-dirty-{}-{}.json", std::process::id(), mode.as_str()));
    let spec = format!("dirty:pages=4096,rounds=8,buffer=4096,seed=3,log={}", u8::from(log));
    let out = std::process::Command::new(exe)
        .args(["run", "--json", "--mem", "64M", "--dirty-mode", mode.as_str(), "--workload", &spec, "--dirty-report"])
        .arg(&report)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(err)?;
    if !out.success() {
        return Err(err(format!("the dirty workload failed: {out}")));
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).map_err(err)?).map_err(err)?;
    let _ = std::fs::remove_file(&report);
    let rounds = v["rounds"].as_array().cloned().unwrap_or_default();
    let times: Vec<f64> = rounds.iter().skip(1).filter_map(|r| r["guest_us"].as_f64()).collect();
    let pages: Vec<f64> = rounds.iter().skip(1).filter_map(|r| r["expected"].as_f64()).collect();
    Ok((summarize(&pages).map_or(0.0, |s| s.median) as u64, summarize(&times).ok_or_else(|| err("no rounds"))?.median))
}

fn err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Boot(memvisor::boot::BootError::Load(e.to_string()))
}

/// The dirty fractions measured, each with the write order: ascending, and
/// for the ring (whose harvest depends on the order) also scattered.
fn cells_of(mode: DirtyMode, fractions: &[f64]) -> Vec<(f64, bool)> {
    let mut cells: Vec<(f64, bool)> = fractions.iter().map(|&f| (f, false)).collect();
    if mode == DirtyMode::Ring {
        // Not at 100 %: a scattered pass costs the emulated guest more
        // instructions per page, and the ascending one is capped anyway.
        cells.extend(fractions.iter().filter(|&&f| f < 1.0).map(|&f| (f, true)));
    }
    cells
}

fn measure_mode(mode: DirtyMode, mem: u64, fractions: &[f64], reps: usize) -> Result<Vec<Cell>, VmmError> {
    let pages_total = mem / 4096 - FIRST_DATA_PAGE;
    let gib = mem as f64 / (1u64 << 30) as f64;
    let mut w = PageWriter::new(mem, Backing::Anon, mode)?;
    // Fault every data page in once, before logging, so host page faults
    // are not part of what is measured.
    w.pass(FIRST_DATA_PAGE, pages_total as u32, 1)?;
    let mut cells = Vec::new();
    // On KVM's PVM flavour the micro guest's writes are emulated at CPL0
    // and can overrun a dirty ring that must take more than one ring's worth
    // in one pass (it then never drains: DirtyError::RingStuck), so ring
    // passes are capped to one ring there.
    let ring_cap = (mode == DirtyMode::Ring && memvisor::host::detect().is_pvm()).then(|| u64::from(memvisor::dirty::tracker::MAX_RING_BYTES as u32 / 16) - 4096);
    for (fraction, scattered) in cells_of(mode, fractions) {
        let wanted = ((pages_total as f64 * fraction) as u64).max(1);
        let count = ring_cap.map_or(wanted, |cap| wanted.min(cap));
        let stride = (pages_total / count).max(1);
        let step = scatter_step(count);
        let pass = |w: &mut PageWriter| {
            if scattered { w.pass_scattered(FIRST_DATA_PAGE, count as u32, stride, step) } else { w.pass(FIRST_DATA_PAGE, count as u32, stride) }
        };
        // What every harvest must hold, exactly.
        let want: Vec<PageRange> = ranges::pages_to_ranges(&(0..count).map(|i| i * stride).collect::<Vec<_>>(), FIRST_DATA_PAGE);
        // Baseline pass time without logging (pages already writable).
        w.tracker.stop(w.vm.fd(), w.vm.ram())?;
        pass(&mut w)?;
        let base_pass = (0..reps).map(|_| pass(&mut w).map(|d| d.as_secs_f64() * 1e6)).collect::<Result<Vec<_>, _>>()?;
        w.tracker.start(w.vm.fd(), w.vm.ram())?;
        let mut raw = Vec::new();
        let mut ours = Vec::new();
        let mut logged_pass = Vec::new();
        let mut complete = true;
        let mut h = memvisor::dirty::Harvest::default();
        for _ in 0..reps {
            logged_pass.push(pass(&mut w)?.as_secs_f64() * 1e6);
            let t = Instant::now();
            w.tracker.harvest_raw(w.vm.fd())?;
            raw.push(t.elapsed().as_secs_f64() * 1e6 / gib);

            logged_pass.push(pass(&mut w)?.as_secs_f64() * 1e6);
            let t = Instant::now();
            w.tracker.harvest_into(w.vm.fd(), w.vm.ram(), &mut h)?;
            ours.push(t.elapsed().as_secs_f64() * 1e6 / gib);
            // The parameter page is a VMM write, listed apart; the guest's
            // pages must be the pass's, no more and no fewer.
            complete &= h.guest == want && !h.ring_overflowed;
        }
        let (raw_s, ours_s) = (summarize(&raw).ok_or_else(|| err("no samples"))?, summarize(&ours).ok_or_else(|| err("no samples"))?);
        let base = summarize(&base_pass).map_or(0.0, |s| s.median);
        let logged = summarize(&logged_pass).map_or(0.0, |s| s.median);
        cells.push(Cell {
            mode,
            fraction,
            scattered,
            pages: count,
            ratio: ours_s.median / raw_s.median.max(1e-9),
            paired_ratio: summarize(&raw.iter().zip(&ours).map(|(r, o)| o / r.max(1e-9)).collect::<Vec<_>>()).map_or(0.0, |s| s.median),
            raw_us_per_gib: raw_s,
            ours_us_per_gib: ours_s,
            redirty_us_per_page: (logged - base) / count as f64,
            complete,
            capped_to_ring: count < wanted,
        });
    }
    Ok(cells)
}

/// Runs the benchmark.
///
/// # Errors
/// [`VmmError`] when KVM fails.
pub fn run(args: &DirtyArgs) -> Result<u32, VmmError> {
    if args.kernels {
        super::dirty_kernels::run(args.reps.unwrap_or(301)).map_err(err)?;
        return Ok(0);
    }
    let mem = match &args.mem {
        Some(m) => parse_size(m).map_err(err)?,
        None if args.quick => 256 << 20,
        None => 1 << 30,
    };
    let reps = args.reps.unwrap_or(if args.quick { 3 } else { 5 }).max(1);
    let fractions: Vec<f64> = if args.dirty.is_empty() { vec![0.001, 0.01, 1.0] } else { args.dirty.iter().map(|p| p / 100.0).collect() };
    if let Some(bad) = fractions.iter().find(|f| !(**f > 0.0 && **f <= 1.0)) {
        return Err(err(format!("--dirty takes percentages in (0, 100], not {}", bad * 100.0)));
    }
    let modes: Vec<DirtyMode> = [DirtyMode::Bitmap, DirtyMode::Clear, DirtyMode::Ring].into_iter().filter(|m| args.mode.is_none_or(|only| only == *m)).collect();
    let kvm = memvisor::vm::open_kvm()?;
    let probe_vm = kvm.create_vm().map_err(|source| memvisor::vm::VmError::Kvm { what: "KVM_CREATE_VM", source })?;
    let caps = DirtyCaps::probe(&probe_vm);
    drop(probe_vm);
    let mut cells = Vec::new();
    for &mode in &modes {
        if let Err(e) = caps.check(mode) {
            eprintln!("skipping {mode}: {e}");
            continue;
        }
        if !args.json {
            eprintln!("measuring {mode} on {} ...", format_size(mem));
        }
        cells.extend(measure_mode(mode, mem, &fractions, reps)?);
    }
    let mut guest_redirty = Vec::new();
    for &mode in &modes {
        if caps.check(mode).is_err() {
            continue;
        }
        if !args.json {
            eprintln!("guest re-dirty cost under {mode} ...");
        }
        let (pages, logged) = dirty_workload_rounds(mode, true)?;
        let (_, unlogged) = dirty_workload_rounds(mode, false)?;
        guest_redirty.push(GuestRedirty { mode, pages, logged_round_us: logged, unlogged_round_us: unlogged, per_page_us: (logged - unlogged) / pages.max(1) as f64 });
    }
    let results = DirtyResults { mem_bytes: mem, reps, caps, cells, guest_redirty };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results).map_err(err)?);
    } else {
        print!("{}", to_text(&results));
    }
    // A harvest that was not exactly the pages written is a tracking bug,
    // whatever it cost.
    if results.cells.iter().any(|c| !c.complete) {
        eprintln!("vmm: error: a harvest did not hold exactly the pages the guest wrote");
        return Ok(1);
    }
    Ok(0)
}

/// The results as a table.
#[must_use]
pub fn to_text(r: &DirtyResults) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "dirty harvest, {} slot, {} reps; µs per GiB of slot (median [min–max])", format_size(r.mem_bytes), r.reps);
    let _ = writeln!(s, "{:<7} {:>7} {:>9} {:>8} {:>26} {:>26} {:>7} {:>7} {:>12}", "mode", "dirty", "order", "pages", "raw ioctls", "memvisor harvest", "ratio", "paired", "re-dirty/pg");
    for c in &r.cells {
        let cell = |x: &Summary| format!("{:.1} [{:.1}–{:.1}]", x.median, x.min, x.max);
        let _ = writeln!(
            s,
            "{:<7} {:>6.1}% {:>9} {:>8} {:>26} {:>26} {:>6.2}x {:>6.2}x {:>9.2} µs{}",
            c.mode.as_str(),
            c.fraction * 100.0,
            if c.scattered { "scattered" } else { "ascending" },
            c.pages,
            cell(&c.raw_us_per_gib),
            cell(&c.ours_us_per_gib),
            c.ratio,
            c.paired_ratio,
            c.redirty_us_per_page,
            if c.complete { "" } else { "  (a harvest was not exactly the pages written!)" }
        );
        if c.capped_to_ring {
            let _ = writeln!(s, "        (pass capped to {} pages to fit one dirty ring: PVM emulates these CPL0 writes and would overrun it)", c.pages);
        }
    }
    let _ = writeln!(s, "target: ratio ≤ 1.2x (ratio: of the medians; paired: median of each rep's ours / raw)");
    let _ = writeln!(s, "(re-dirty/pg above: the micro guest writes at CPL0, which this host's PVM flavour emulates, so its writes are logged without faults)");
    let _ = writeln!(s, "guest-visible re-dirty cost (ring-3 task of the tiny guest, median round, rounds 2..8):");
    for g in &r.guest_redirty {
        let _ = writeln!(
            s,
            "  {:<7} {:>5} pages/round: logged {:>8.1} µs, unlogged {:>8.1} µs → {:.2} µs per re-dirtied page",
            g.mode.as_str(),
            g.pages,
            g.logged_round_us,
            g.unlogged_round_us,
            g.per_page_us
        );
    }
    s
}
