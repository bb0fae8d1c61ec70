//! The translation benchmark's results as files: JSON (everything), CSV
//! (one row per cell) and Markdown (one table per workload, plus the KVM
//! deltas), and the plots ([`super::plot`]). Every file is written
//! atomically.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{Cell, CellStatus, TranslationResults};
use memvisor::size::format_size;

/// KVM statistics shown in the CSV and Markdown (all are in the JSON).
pub const KEY_STATS: [&str; 6] = ["pages_4k", "pages_2m", "pages_1g", "vcpu.pf_fixed", "vcpu.pf_taken", "vcpu.exits"];

fn fmt_ns(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

/// The CSV's columns before the KVM statistics (`warm_<stat>,timed_<stat>`
/// per [`KEY_STATS`] entry) and the closing `reason`; `--replot` reads
/// them back by position (`super::replot`).
pub const LEADING_COLUMNS: [&str; 10] = ["workload", "ws_bytes", "leaf", "backing", "status", "median_ns", "min_ns", "max_ns", "reps", "ratio_to_native"];

/// The cells as CSV.
#[must_use]
pub fn csv(r: &TranslationResults) -> String {
    let mut s = LEADING_COLUMNS.join(",");
    for k in KEY_STATS {
        let _ = write!(s, ",warm_{k},timed_{k}");
    }
    s.push_str(",reason\n");
    for c in &r.cells {
        let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
        let _ = write!(
            s,
            "{},{},{},{},{},{},{},{},{},{}",
            c.workload,
            c.ws,
            c.leaf,
            c.backing,
            serde_json::to_value(c.status).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            num(c.ns.map(|n| n.median)),
            num(c.ns.map(|n| n.min)),
            num(c.ns.map(|n| n.max)),
            c.ns.map_or(0, |n| n.n),
            num(c.ratio)
        );
        for k in KEY_STATS {
            let _ = write!(s, ",{},{}", c.kvm_warm.get(k).copied().unwrap_or(0), c.kvm_timed.get(k).copied().unwrap_or(0));
        }
        let _ = writeln!(s, ",\"{}\"", c.reason.as_deref().unwrap_or("").replace('"', "'"));
    }
    s
}

fn cell_text(c: &Cell) -> String {
    match (c.status, c.ns) {
        (CellStatus::Ok, Some(n)) => {
            let ratio = c.ratio.map_or(String::new(), |r| format!(" ×{r:.2}"));
            format!("{} [{}–{}]{ratio}", fmt_ns(n.median), fmt_ns(n.min), fmt_ns(n.max))
        }
        (CellStatus::NotAvailable, _) => "n/a¹".into(),
        _ => "failed²".into(),
    }
}

/// The results as Markdown.
#[must_use]
pub fn markdown(r: &TranslationResults) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Host: {}; TSC {} kHz; {} timed repetitions per cell; {} accesses per repetition (chases, GUPS).\n", r.mode_description, r.tsc_khz, r.reps, r.steps);
    let _ = writeln!(s, "Reading: {}\n", r.reading);
    let mut ws: Vec<u64> = r.cells.iter().map(|c| c.ws).collect();
    ws.sort_unstable();
    ws.dedup();
    let mut rows: Vec<(String, String)> = Vec::new();
    for c in &r.cells {
        let key = (c.backing.to_string(), c.leaf.clone());
        if !rows.contains(&key) {
            rows.push(key);
        }
    }
    let mut workloads: Vec<&str> = Vec::new();
    for c in &r.cells {
        if !workloads.contains(&c.workload) {
            workloads.push(c.workload);
        }
    }
    for w in &workloads {
        let _ = writeln!(s, "**{w}** — ns per access, median [min–max] ×guest/native on the same backing\n");
        let _ = write!(s, "| backing | guest leaf |");
        for x in &ws {
            let _ = write!(s, " {} |", format_size(*x));
        }
        let _ = write!(s, "\n|---|---|");
        for _ in &ws {
            s.push_str("---|");
        }
        s.push('\n');
        for (backing, leaf) in &rows {
            let _ = write!(s, "| {backing} | {leaf} |");
            for x in &ws {
                let c = r.cells.iter().find(|c| c.workload == *w && c.ws == *x && c.backing.to_string() == *backing && c.leaf == *leaf);
                let _ = write!(s, " {} |", c.map_or(String::new(), cell_text));
            }
            s.push('\n');
        }
        s.push('\n');
    }
    let _ = writeln!(s, "KVM statistics during the timed repetitions of chase-page (Δ pages_4k / Δ pages_2m / Δ pages_1g / Δ pf_fixed / Δ exits):\n");
    let _ = writeln!(s, "| backing | guest leaf | working set | Δ4k | Δ2m | Δ1g | Δpf_fixed | Δexits | warm-up Δ4k / Δ2m / Δ1g / Δpf_fixed |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for c in r.cells.iter().filter(|c| c.workload == "chase-page" && c.leaf != "native" && c.status == CellStatus::Ok) {
        let t = |m: &std::collections::BTreeMap<String, i64>, k: &str| m.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} / {} |",
            c.backing,
            c.leaf,
            format_size(c.ws),
            t(&c.kvm_timed, "pages_4k"),
            t(&c.kvm_timed, "pages_2m"),
            t(&c.kvm_timed, "pages_1g"),
            t(&c.kvm_timed, "vcpu.pf_fixed"),
            t(&c.kvm_timed, "vcpu.exits"),
            t(&c.kvm_warm, "pages_4k"),
            t(&c.kvm_warm, "pages_2m"),
            t(&c.kvm_warm, "pages_1g"),
            t(&c.kvm_warm, "vcpu.pf_fixed")
        );
    }
    let mut notes: Vec<String> = Vec::new();
    for c in r.cells.iter().filter(|c| c.status != CellStatus::Ok) {
        let tag = if c.status == CellStatus::NotAvailable { "¹ not available" } else { "² failed" };
        let n = format!("{tag}: {}", c.reason.as_deref().unwrap_or("no reason recorded"));
        if !notes.contains(&n) {
            notes.push(n);
        }
    }
    if !notes.is_empty() {
        s.push('\n');
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    let load = |l: Option<f64>| l.map_or_else(|| "?".to_string(), |v| format!("{v:.2}"));
    let _ = writeln!(s, "\nWall time {:.0} s; 1-minute load average {} at the start, {} at the end.", r.seconds, load(r.load_average.0), load(r.load_average.1));
    s
}

/// Writes results.json, results.csv, results.md and the plots into `dir`.
///
/// # Errors
/// A message naming the file that could not be written.
pub fn write_all(r: &TranslationResults, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let json = serde_json::to_vec_pretty(r).map_err(|e| e.to_string())?;
    for (name, bytes) in [("results.json", json), ("results.csv", csv(r).into_bytes()), ("results.md", markdown(r).into_bytes())] {
        let path = dir.join(name);
        memvisor::fsutil::write_atomic(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    written.extend(super::plot::write_plots(r, dir)?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::translation::{Cell, Ns};
    use memvisor::config::Backing;
    use memvisor::host::TranslationMode;

    fn results() -> TranslationResults {
        let ok = Cell {
            workload: "chase-page",
            ws: 4 << 20,
            leaf: "4k".into(),
            backing: Backing::Anon,
            status: CellStatus::Ok,
            reason: None,
            ns: Some(Ns { n: 5, median: 12.5, min: 10.0, max: 300.0 }),
            ratio: Some(1.25),
            kvm_warm: BTreeMap::from([("pages_4k".to_string(), 1024)]),
            kvm_timed: BTreeMap::new(),
        };
        let na = Cell { leaf: "1g".into(), status: CellStatus::NotAvailable, reason: Some("no 1 GiB pages".into()), ns: None, ratio: None, ..ok.clone() };
        TranslationResults {
            command: "vmm bench translation".into(),
            mode: TranslationMode::PvmShadow,
            mode_description: TranslationMode::PvmShadow.describe(),
            reading: "r".into(),
            tsc_khz: 2_500_000,
            reps: 5,
            steps: 1 << 20,
            cells: vec![ok, na],
            seconds: 1.0,
            load_average: (Some(0.5), None),
        }
    }

    #[test]
    fn csv_has_a_row_per_cell_with_stats_and_reasons() {
        let text = csv(&results());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("workload,ws_bytes,leaf,backing,status,median_ns"));
        assert!(lines[1].starts_with("chase-page,4194304,4k,anon,ok,12.500,10.000,300.000,5,1.250,1024,0"), "{}", lines[1]);
        assert!(lines[2].contains("not-available") && lines[2].ends_with("\"no 1 GiB pages\""), "{}", lines[2]);
    }

    #[test]
    fn markdown_shows_the_spread_the_ratio_and_why_cells_are_missing() {
        let text = markdown(&results());
        assert!(text.contains("| anon | 4k | 12.5 [10.0–300] ×1.25 |"), "{text}");
        assert!(text.contains("| anon | 1g | n/a¹ |"));
        assert!(text.contains("¹ not available: no 1 GiB pages"));
        assert!(text.contains("shadow paging"));
        assert!(text.contains("load average 0.50 at the start, ? at the end"));
        // The KVM table shows every page-size counter, pages_1g included.
        assert!(text.contains("| Δ4k | Δ2m | Δ1g |"), "{text}");
        assert!(text.contains("| anon | 4k | 4 MiB | 0 | 0 | 0 | 0 | 0 | 1024 / 0 / 0 / 0 |"), "{text}");
    }
}
