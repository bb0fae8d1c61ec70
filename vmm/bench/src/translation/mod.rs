//! `vmm bench translation`: what the second dimension of address
//! translation costs, measured with the same workload code natively and in
//! the guest.
//!
//! The workloads (`memvisor_user::translation`: page-strided and
//! cache-line-strided pointer chases, GUPS, sequential read) run natively in
//! this process ([`native`]) and as a ring-3 task in the tiny guest
//! ([`guest`]), both timed with `rdtsc` against the same TSC (the guest's
//! TSC is the host's; `KVM_GET_TSC_KHZ` converts ticks to ns). The matrix is
//! working set × guest leaf size × host backing; every cell gets ≥ 5 timed
//! repetitions after a warm-up pass (median, min, max), the ratio to native
//! on the same backing, and the KVM binary-statistics deltas of its timed
//! phase ([`probe`]). Cells that cannot run say why ("not available": the
//! guest CPU lacks 1 GiB pages; "failed": the error) instead of being
//! faked. Results go out as JSON, CSV, Markdown and plots ([`output`],
//! [`plot`]).

pub mod guest;
pub mod hugetlb;
pub mod native;
pub mod output;
pub mod plot;
pub mod replot;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use memvisor_user::translation::Workload;

use crate::stats::summarize;
use memvisor::config::{Backing, GuestPage};
use memvisor::size::{format_size, parse_size};
use memvisor::host::{self, TranslationMode};

/// Flags of `vmm bench translation`.
#[derive(Debug, clap::Args)]
pub struct TranslationArgs {
    /// A subset that runs in under a minute (4 MiB and 64 MiB; 4k/2m
    /// guest leaves; anon and thp backings; 2^18 accesses per repetition).
    #[arg(long)]
    pub quick: bool,
    /// Working sets (comma-separated sizes; default 4M,16M,64M,256M,1G,4G).
    #[arg(long, value_name = "LIST")]
    pub ws: Option<String>,
    /// Guest leaf sizes (default 4k,2m,1g).
    #[arg(long, value_name = "LIST")]
    pub leaves: Option<String>,
    /// Host backings (default anon,thp,hugetlb-2m,hugetlb-1g).
    #[arg(long, value_name = "LIST")]
    pub backings: Option<String>,
    /// Timed repetitions per cell (at least 5).
    #[arg(long, default_value_t = 5)]
    pub reps: u64,
    /// Accesses per repetition for the chases and GUPS (default 2^20;
    /// 2^18 with --quick).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Where to write results.{json,csv,md} and the plots.
    #[arg(long, value_name = "DIR", default_value = "target/bench-translation")]
    pub out: PathBuf,
    /// Print the JSON instead of the Markdown table.
    #[arg(long)]
    pub json: bool,
    /// Measure nothing: redraw the plots in DIR from its results.csv (for
    /// example after merging the cells of a second run into it).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["quick", "ws", "leaves", "backings", "steps", "json"])]
    pub replot: Option<PathBuf>,
}

/// Median, min and max of a cell's ns per access.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ns {
    /// Repetitions.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

/// Whether a cell ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CellStatus {
    /// Measured.
    Ok,
    /// This host cannot run it (the reason says why).
    NotAvailable,
    /// It was tried and failed (the reason is the error).
    Failed,
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Workload name.
    pub workload: &'static str,
    /// Working set, bytes.
    pub ws: u64,
    /// Guest leaf size ("native" for the VMM process itself).
    pub leaf: String,
    /// Host backing.
    pub backing: Backing,
    /// Whether it ran.
    pub status: CellStatus,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// ns per access.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ns: Option<Ns>,
    /// Guest median / native median on the same backing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// KVM statistic deltas over build + warm-up.
    pub kvm_warm: BTreeMap<String, i64>,
    /// KVM statistic deltas over the timed repetitions.
    pub kvm_timed: BTreeMap<String, i64>,
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct TranslationResults {
    /// The command that produced it.
    pub command: String,
    /// How this host does the second dimension.
    pub mode: TranslationMode,
    /// Its description.
    pub mode_description: &'static str,
    /// How to read the ratios on this host.
    pub reading: String,
    /// TSC frequency used to convert ticks (kHz).
    pub tsc_khz: u64,
    /// Timed repetitions per cell.
    pub reps: u64,
    /// Accesses per repetition (chases, GUPS).
    pub steps: u64,
    /// Every cell.
    pub cells: Vec<Cell>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The host's 1-minute load average at the start and the end (other
    /// work on the machine shows up as noise in the min–max spread).
    pub load_average: (Option<f64>, Option<f64>),
}

/// What the results mean on a host in `mode`.
#[must_use]
pub fn reading(mode: TranslationMode) -> String {
    match mode {
        TranslationMode::Ept | TranslationMode::Npt => "Hardware two-dimensional walk: a guest TLB miss walks the guest tables and, for every guest-physical \
             address on the way, the host's nested tables — up to (n+1)(m+1)-1 = 24 references for 4 KiB pages in both dimensions. Larger \
             pages in either dimension shorten it; expect the guest/native ratio to grow with the working set on 4K/4K and shrink with 2M or 1G \
             pages on both sides."
            .into(),
        TranslationMode::PvmShadow | TranslationMode::Shadow => "Shadow paging: there is no two-dimensional walk. The CPU walks one shadow table \
             (guest-virtual to host-physical) that KVM builds from the guest's tables, so a TLB miss costs a native-length walk. Its leaf is the \
             smaller of the guest leaf and the host page: a 2 MiB guest leaf over 4 KiB host backing is split into 4 KiB shadow entries, which is \
             what grows the ratio here (more TLB misses), not a longer walk. Guest page-table writes and first touches trap to KVM instead \
             (see the KVM deltas)."
            .into(),
        TranslationMode::Unknown => "Unknown host mode: the ratios are measured, but cannot be attributed to a walk kind.".into(),
    }
}

fn list<T: std::str::FromStr>(text: Option<&str>, default: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    text.unwrap_or(default).split(',').map(|s| s.trim().parse::<T>().map_err(|e| format!("{s:?}: {e}"))).collect()
}

fn sizes(text: Option<&str>, default: &str) -> Result<Vec<u64>, String> {
    text.unwrap_or(default).split(',').map(|s| parse_size(s.trim()).map_err(|e| e.to_string())).collect()
}

/// ns per access of (ticks, accesses) samples.
fn ns(reps: &[(u64, u64)], tsc_khz: u64) -> Option<Ns> {
    let per: Vec<f64> = reps.iter().map(|&(t, n)| t as f64 * 1e6 / tsc_khz as f64 / n.max(1) as f64).collect();
    summarize(&per).map(|s| Ns { n: s.n, median: s.median, min: s.min, max: s.max })
}

fn tsc_khz() -> Result<u64, String> {
    let kvm = memvisor::vm::open_kvm().map_err(|e| memvisor::error_chain(&e))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    vcpu.get_tsc_khz().map(u64::from).map_err(|e| format!("KVM_GET_TSC_KHZ: {e}"))
}

/// A pool guard for `backing`, big enough for `bytes` (and the guest's extra).
fn reserve(backing: Backing, bytes: u64) -> Result<Option<hugetlb::PoolGuard>, String> {
    backing.hugetlb_page_size().map(|page| hugetlb::PoolGuard::reserve(page, bytes / page)).transpose()
}

fn cell(workload: Workload, ws: u64, leaf: &str, backing: Backing) -> Cell {
    Cell {
        workload: workload.name(),
        ws,
        leaf: leaf.to_string(),
        backing,
        status: CellStatus::Ok,
        reason: None,
        ns: None,
        ratio: None,
        kvm_warm: BTreeMap::new(),
        kvm_timed: BTreeMap::new(),
    }
}

fn failed(mut c: Cell, status: CellStatus, why: &str) -> Cell {
    c.status = status;
    c.reason = Some(why.to_string());
    c
}

/// Runs the benchmark.
///
/// # Errors
/// A message for bad flags or a host that cannot run KVM at all; cells that
/// fail are recorded as failed, not fatal.
pub fn run(args: &TranslationArgs) -> Result<u32, String> {
    if let Some(dir) = &args.replot {
        let written = replot::replot(dir)?;
        eprintln!("wrote {}", written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
        return Ok(0);
    }
    let start = std::time::Instant::now();
    let load_start = crate::boot::load_average();
    let ws_list = sizes(args.ws.as_deref(), if args.quick { "4M,64M" } else { "4M,16M,64M,256M,1G,4G" })?;
    let leaves: Vec<GuestPage> = list(args.leaves.as_deref(), if args.quick { "4k,2m" } else { "4k,2m,1g" })?;
    let backings: Vec<Backing> = list(args.backings.as_deref(), if args.quick { "anon,thp" } else { "anon,thp,hugetlb-2m,hugetlb-1g" })?;
    if args.reps < 5 {
        return Err("at least 5 repetitions per cell (--reps)".into());
    }
    if args.reps > memvisor::translate::probe::MAX_REPS as u64 {
        return Err(format!("at most {} repetitions per cell (--reps)", memvisor::translate::probe::MAX_REPS));
    }
    let steps = args.steps.unwrap_or(if args.quick { 1 << 18 } else { 1 << 20 });
    for ws in &ws_list {
        format!("translation:ws={ws}").parse::<memvisor::workload::Workload>().map_err(|e| e.to_string())?;
    }
    let mode = host::detect();
    let tsc_khz = tsc_khz()?;
    let workloads = Workload::ALL;
    let mask = (1u64 << workloads.len()) - 1;
    let seed = 0x7a11_5eed;
    let runs = (ws_list.len() * backings.len() * (leaves.len() + 1)) as u64;
    let bar = if args.json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(runs) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut cells = Vec::new();
    // Whether the guest CPU offers 1 GiB leaves: learnt from the first 1g run.
    let mut no_1g: Option<String> = None;
    for &backing in &backings {
        for &ws in &ws_list {
            bar.set_message(format!("native, {}, {backing}", format_size(ws)));
            let pool = reserve(backing, ws.max(backing.hugetlb_page_size().unwrap_or(0)));
            let native = pool.and_then(|_guard| native::run(backing, ws, &workloads, args.reps, steps, seed).map_err(|e| memvisor::error_chain(&e)));
            let mut native_median = BTreeMap::new();
            for &w in &workloads {
                let c = cell(w, ws, "native", backing);
                cells.push(match &native {
                    Ok(runs) => {
                        let mut c = c;
                        c.ns = runs.iter().find(|(x, _)| *x == w).and_then(|(_, r)| ns(&r.reps, tsc_khz));
                        if let Some(n) = c.ns {
                            native_median.insert(w.name(), n.median);
                        }
                        c
                    }
                    Err(e) => failed(c, CellStatus::Failed, e),
                });
            }
            bar.inc(1);
            for &leaf in &leaves {
                bar.set_message(format!("guest {leaf}, {}, {backing}", format_size(ws)));
                if let (GuestPage::G1, Some(why)) = (leaf, &no_1g) {
                    cells.extend(workloads.iter().map(|&w| failed(cell(w, ws, leaf.as_str(), backing), CellStatus::NotAvailable, why)));
                    bar.inc(1);
                    continue;
                }
                let spec = format!("translation:ws={ws},workloads={mask},reps={},steps={steps},seed={seed}", args.reps);
                let result = reserve(backing, guest::guest_mem(ws, backing)).and_then(|_guard| guest::run(ws, leaf, backing, &spec));
                bar.inc(1);
                let run = match result {
                    Ok(r) if leaf == GuestPage::G1 && r.page_shift != Some(30) => {
                        let why = format!(
                            "the guest CPU has no 1 GiB pages (CPUID 8000_0001h EDX[26] {}); the guest fell back to 2 MiB leaves, which the 2m column measures",
                            if r.has_1g_pages { "set, yet the guest used another size" } else { "clear" }
                        );
                        no_1g = Some(why.clone());
                        cells.extend(workloads.iter().map(|&w| failed(cell(w, ws, leaf.as_str(), backing), CellStatus::NotAvailable, &why)));
                        continue;
                    }
                    Ok(r) => r,
                    Err(e) => {
                        cells.extend(workloads.iter().map(|&w| failed(cell(w, ws, leaf.as_str(), backing), CellStatus::Failed, &e)));
                        continue;
                    }
                };
                for &w in &workloads {
                    let mut c = cell(w, ws, leaf.as_str(), backing);
                    match run.records.iter().find(|r| r.workload == w as u64) {
                        Some(rec) => {
                            c.ns = ns(&rec.reps, tsc_khz);
                            c.ratio = c.ns.and_then(|n| native_median.get(w.name()).map(|m| n.median / m));
                            c.kvm_warm.clone_from(&rec.warm_delta);
                            c.kvm_timed.clone_from(&rec.timed_delta);
                        }
                        None => c = failed(c, CellStatus::Failed, "the guest reported no results for this workload"),
                    }
                    cells.push(c);
                }
            }
        }
    }
    bar.finish_and_clear();
    let results = TranslationResults {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        mode,
        mode_description: mode.describe(),
        reading: reading(mode),
        tsc_khz,
        reps: args.reps,
        steps,
        cells,
        seconds: start.elapsed().as_secs_f64(),
        load_average: (load_start, crate::boot::load_average()),
    };
    let written = output::write_all(&results, &args.out)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?);
    } else {
        print!("{}", output::markdown(&results));
        eprintln!("wrote {}", written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_per_access_uses_the_tsc_frequency() {
        // 2.5 GHz: 2500 ticks per µs; 1000 accesses in 250_000 ticks = 100 ns.
        let n = ns(&[(250_000, 1000), (500_000, 1000), (300_000, 1000), (260_000, 1000), (250_000, 1000)], 2_500_000).unwrap();
        assert_eq!((n.n, n.min, n.median, n.max), (5, 100.0, 104.0, 200.0));
    }

    #[test]
    fn readings_never_call_shadow_paging_a_2d_walk() {
        assert!(reading(TranslationMode::PvmShadow).contains("no two-dimensional walk"));
        assert!(reading(TranslationMode::Ept).contains("(n+1)(m+1)-1"));
        assert!(!reading(TranslationMode::Shadow).contains("EPT"));
    }

    #[test]
    fn guest_memory_leaves_room_and_fits_the_backing() {
        assert_eq!(guest::guest_mem(4 << 20, Backing::Anon), 132 << 20);
        assert_eq!(guest::guest_mem(4 << 30, Backing::Hugetlb1G), 5 << 30);
        assert_eq!(guest::guest_mem(1 << 30, Backing::Hugetlb2M), (1 << 30) + (512 << 20));
    }
}
