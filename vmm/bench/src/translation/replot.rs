//! `vmm bench translation --replot DIR`: the plots again from a recorded
//! `results.csv` (for example after cells of a second run were merged into
//! it), without measuring anything.
//!
//! The CSV is [`super::output::csv`]'s: fixed columns, then the quoted
//! reason, which may hold commas (so each row is split at most
//! [`FIXED_COLUMNS`] times). The host mode for the captions comes from the
//! first line of `results.md` beside it (`Host: <description>; ...`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memvisor_user::translation::Workload;

use super::output::KEY_STATS;
use super::{Cell, CellStatus, Ns, TranslationResults};
use memvisor::config::Backing;
use memvisor::host::TranslationMode;

/// Columns before the KVM statistics.
const LEADING_COLUMNS: usize = super::output::LEADING_COLUMNS.len();
/// Columns before the reason.
pub const FIXED_COLUMNS: usize = LEADING_COLUMNS + 2 * KEY_STATS.len();

const MODES: [TranslationMode; 5] = [TranslationMode::Ept, TranslationMode::Npt, TranslationMode::PvmShadow, TranslationMode::Shadow, TranslationMode::Unknown];

fn number<T: std::str::FromStr>(field: &str, what: &str, line: usize) -> Result<T, String> {
    field.parse().map_err(|_| format!("results.csv line {line}: {what} {field:?} is not a number"))
}

fn optional(field: &str, what: &str, line: usize) -> Result<Option<f64>, String> {
    if field.is_empty() { Ok(None) } else { number(field, what, line).map(Some) }
}

/// The cells of a results CSV.
///
/// # Errors
/// A message naming the line and field that do not parse.
pub fn cells(text: &str) -> Result<Vec<Cell>, String> {
    let mut out = Vec::new();
    for (i, row) in text.lines().enumerate().skip(1).filter(|(_, r)| !r.trim().is_empty()) {
        let line = i + 1;
        let f: Vec<&str> = row.splitn(FIXED_COLUMNS + 1, ',').collect();
        if f.len() != FIXED_COLUMNS + 1 {
            return Err(format!("results.csv line {line}: {} fields, expected {}", f.len(), FIXED_COLUMNS + 1));
        }
        let workload = Workload::ALL.iter().map(|w| w.name()).find(|n| *n == f[0]).ok_or_else(|| format!("results.csv line {line}: unknown workload {:?}", f[0]))?;
        let backing: Backing = f[3].parse().map_err(|e| format!("results.csv line {line}: {e}"))?;
        let status = match f[4] {
            "ok" => CellStatus::Ok,
            "not-available" => CellStatus::NotAvailable,
            "failed" => CellStatus::Failed,
            other => return Err(format!("results.csv line {line}: unknown status {other:?}")),
        };
        let (median, min, max) = (optional(f[5], "median_ns", line)?, optional(f[6], "min_ns", line)?, optional(f[7], "max_ns", line)?);
        let ns = match (median, min, max) {
            (Some(median), Some(min), Some(max)) => Some(Ns { n: number(f[8], "reps", line)?, median, min, max }),
            _ => None,
        };
        let (mut kvm_warm, mut kvm_timed) = (BTreeMap::new(), BTreeMap::new());
        for (k, name) in KEY_STATS.iter().enumerate() {
            let (w, t): (i64, i64) = (number(f[LEADING_COLUMNS + 2 * k], name, line)?, number(f[LEADING_COLUMNS + 2 * k + 1], name, line)?);
            if w != 0 {
                kvm_warm.insert((*name).to_string(), w);
            }
            if t != 0 {
                kvm_timed.insert((*name).to_string(), t);
            }
        }
        let reason = f[FIXED_COLUMNS].trim_matches('"');
        out.push(Cell {
            workload,
            ws: number(f[1], "ws_bytes", line)?,
            leaf: f[2].to_string(),
            backing,
            status,
            reason: (!reason.is_empty()).then(|| reason.to_string()),
            ns,
            ratio: optional(f[9], "ratio_to_native", line)?,
            kvm_warm,
            kvm_timed,
        });
    }
    Ok(out)
}

/// The host mode a `results.md` names on its first line.
#[must_use]
pub fn mode_of(markdown: &str) -> TranslationMode {
    let first = markdown.lines().next().unwrap_or_default();
    MODES.into_iter().find(|m| first.starts_with(&format!("Host: {};", m.describe()))).unwrap_or(TranslationMode::Unknown)
}

/// Reads `dir/results.csv` (and `dir/results.md` for the mode) and writes
/// the plots into `dir`.
///
/// # Errors
/// A message when the CSV cannot be read or parsed, or a plot not written.
pub fn replot(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let path = dir.join("results.csv");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = mode_of(&std::fs::read_to_string(dir.join("results.md")).unwrap_or_default());
    let results = TranslationResults {
        command: format!("vmm bench translation --replot {}", dir.display()),
        mode,
        mode_description: mode.describe(),
        reading: super::reading(mode),
        tsc_khz: 0,
        reps: 0,
        steps: 0,
        cells: cells(&text)?,
        seconds: 0.0,
        load_average: (None, None),
    };
    super::plot::write_plots(&results, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_come_back_as_the_cells_they_were_written_from() {
        let ok = Cell {
            workload: "gups",
            ws: 1 << 30,
            leaf: "2m".into(),
            backing: Backing::Hugetlb1G,
            status: CellStatus::Ok,
            reason: None,
            ns: Some(Ns { n: 7, median: 19.7, min: 18.0, max: 19.9 }),
            ratio: Some(0.875),
            kvm_warm: BTreeMap::from([("pages_2m".to_string(), 512)]),
            kvm_timed: BTreeMap::from([("vcpu.exits".to_string(), 30)]),
        };
        let failed = Cell { status: CellStatus::Failed, reason: Some("only 2 of 5 pages, not enough".into()), ns: None, ratio: None, ..ok.clone() };
        let r = TranslationResults {
            command: String::new(),
            mode: TranslationMode::PvmShadow,
            mode_description: TranslationMode::PvmShadow.describe(),
            reading: String::new(),
            tsc_khz: 1,
            reps: 7,
            steps: 1,
            cells: vec![ok, failed],
            seconds: 0.0,
            load_average: (None, None),
        };
        let back = cells(&super::super::output::csv(&r)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!((back[0].workload, back[0].ws, back[0].backing, back[0].ns, back[0].ratio), ("gups", 1 << 30, Backing::Hugetlb1G, r.cells[0].ns, Some(0.875)));
        assert_eq!((&back[0].kvm_warm, &back[0].kvm_timed), (&r.cells[0].kvm_warm, &r.cells[0].kvm_timed));
        assert_eq!((back[1].status, back[1].reason.as_deref()), (CellStatus::Failed, Some("only 2 of 5 pages, not enough")));
        assert!(cells("header\nchase-page,1,4k").is_err());
        assert_eq!(mode_of(&super::super::output::markdown(&r)), TranslationMode::PvmShadow);
        assert_eq!(mode_of("no header"), TranslationMode::Unknown);
    }
}
