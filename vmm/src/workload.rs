//! Naming workloads on the command line: `--workload KIND:key=value,...`
//! parsed into the boot configuration's `WorkloadSpec` (pure, tested).
//!
//! - `dirty:pages=N,rounds=R,seed=S[,buffer=B,log=0|1,warmup=W]`: see
//!   `memvisor_abi::workload::WorkloadKind::Dirty`; the buffer defaults to
//!   4 × N pages; the first `W` rounds (default 0, fewer than `R`) run
//!   before the VMM switches logging on.
//! - `checksum:pages=N,rounds=R[,ms=T,seed=S]`: see
//!   `memvisor_abi::workload::WorkloadKind::Checksum`; `ms` defaults to 100.
//! - `balloon[:rounds=R,report=0|1|2,oom=SIZE,irq=0|1,paging=0|1]`: the balloon driver's
//!   service loop (`WorkloadKind::Balloon`; needs `--balloon`); `oom` is a
//!   size; `irq=1` waits for the device's interrupt instead of polling;
//!   `report=2` reports free pages only after deflates (not at start);
//!   `paging=1` runs a small demand-paging task first (faults for the stats).
//! - `balloon-hostile:mode=M`: feed the balloon hostile input `M` (1-7,
//!   `memvisor_abi::workload::HostileMode`).
//! - `translation:ws=SIZE[,workloads=MASK,reps=R,steps=N,seed=S]`: see
//!   `memvisor_abi::workload::WorkloadKind::Translation`; the working set is
//!   a power of two from 64 KiB to 16 GiB, `workloads` a bit mask of
//!   `memvisor_user::translation::Workload` (default all), `reps` 5, `steps`
//!   2^20 accesses per repetition.
//! - `paging:policy=fifo|clock|lru,frames=N,pattern=seq|random|hotcold[,pages=P,accesses=A,seed=S,writes=W,probe=ro|wild,measure=0|1]`:
//!   see `memvisor_abi::workload::WorkloadKind::Paging`; defaults: clock,
//!   16 frames, seq, P = N + 1, A = 4 × P, seed 1, 100 % writes, no probe,
//!   no copy-cost measurement.
//! - `cow[:pages=N]`: see `memvisor_abi::workload::WorkloadKind::Cow`;
//!   N defaults to 64.

use memvisor_abi::paging::{Pattern, Policy};
use memvisor_abi::workload::{PAGING_MEASURE, PAGING_PROBE_READ_ONLY, PAGING_PROBE_WILD, WorkloadKind, WorkloadSpec};
use thiserror::Error;

/// A workload string that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WorkloadError {
    /// Unknown kind.
    #[error("unknown workload {0:?}; known: dirty, checksum, balloon, balloon-hostile, paging, cow, translation")]
    UnknownKind(String),
    /// A malformed or unknown parameter.
    #[error("invalid workload parameter {0:?}")]
    BadParam(String),
    /// A required parameter is missing or out of range.
    #[error("workload {kind}: {why}")]
    OutOfRange {
        /// The kind.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Largest dirty buffer: 1 GiB of 4 KiB pages (one buddy block).
const MAX_BUFFER_PAGES: u64 = 1 << 18;
/// Smallest translation working set: 16 pages.
const MIN_TRANSLATION_WS: u64 = 64 << 10;
/// Largest translation working set (the guest maps it from several buddy blocks).
const MAX_TRANSLATION_WS: u64 = 16 << 30;
/// Most rounds of a workload (the VMM keeps a record per dirty round).
const MAX_ROUNDS: u64 = 4096;
/// Most frames of a paging pool (the guest's `vm::pager::MAX_FRAMES`).
pub const MAX_PAGING_FRAMES: u64 = 1024;
/// Most pages of a paging region (the guest's `vm::pager::MAX_PAGES`).
pub const MAX_PAGING_PAGES: u64 = 4096;
/// Most accesses of a paging run: every one may be a fault costing ~0.2 ms
/// of emulated ring 0 on this project's host, and the VMM replays them.
pub const MAX_PAGING_ACCESSES: u64 = 1_000_000;
/// Most pages of a cow region (the guest's `vm::cow::MAX_PAGES`).
pub const MAX_COW_PAGES: u64 = 512;

/// Replaces the named value of `key` in `rest` by its number.
fn named(rest: &str, key: &str, names: &[(&str, u64)]) -> Result<String, WorkloadError> {
    let mut out = Vec::new();
    for kv in rest.split(',').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some((k, v)) if k.trim() == key => {
                let n = names.iter().find(|(name, _)| *name == v.trim()).ok_or_else(|| WorkloadError::BadParam(kv.to_string()))?.1;
                out.push(format!("{key}={n}"));
            }
            _ => out.push(kv.to_string()),
        }
    }
    Ok(out.join(","))
}

fn paging_spec(rest: &str) -> Result<WorkloadSpec, WorkloadError> {
    let policies: Vec<(&str, u64)> = Policy::ALL.iter().map(|p| (p.name(), *p as u64)).collect();
    let patterns: Vec<(&str, u64)> = Pattern::ALL.iter().map(|p| (p.name(), *p as u64)).collect();
    let probes = [("none", 0), ("ro", u64::from(PAGING_PROBE_READ_ONLY)), ("wild", u64::from(PAGING_PROBE_WILD))];
    let rest = named(&named(&named(rest, "policy", &policies)?, "pattern", &patterns)?, "probe", &probes)?;
    let given = params(&rest)?;
    let allowed = ["policy", "frames", "pattern", "pages", "accesses", "seed", "writes", "probe", "measure"];
    if let Some((k, _)) = given.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(WorkloadError::BadParam(k.clone()));
    }
    let get = |name: &str| given.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    let frames = get("frames").unwrap_or(16);
    let pages = get("pages").unwrap_or(frames.saturating_add(1));
    let accesses = get("accesses").unwrap_or(pages.saturating_mul(4));
    let writes = get("writes").unwrap_or(100);
    let bad = |why: String| WorkloadError::OutOfRange { kind: "paging", why };
    if !(1..=MAX_PAGING_FRAMES).contains(&frames) {
        return Err(bad(format!("frames must be 1..={MAX_PAGING_FRAMES}")));
    }
    if !(1..=MAX_PAGING_PAGES).contains(&pages) {
        return Err(bad(format!("pages must be 1..={MAX_PAGING_PAGES}")));
    }
    if !(1..=MAX_PAGING_ACCESSES).contains(&accesses) {
        return Err(bad(format!("accesses must be 1..={MAX_PAGING_ACCESSES}")));
    }
    if writes > 100 {
        return Err(bad("writes is a percentage, 0..=100".into()));
    }
    let mut spec = WorkloadSpec { kind: WorkloadKind::Paging as u32, ..WorkloadSpec::default() };
    spec.params = [get("policy").unwrap_or(Policy::Clock as u64), frames, get("pattern").unwrap_or(Pattern::Seq as u64), pages, accesses, get("seed").unwrap_or(1), writes];
    spec.flags = u32::try_from(get("probe").unwrap_or(0)).unwrap_or(0);
    if get("measure").unwrap_or(0) != 0 {
        spec.flags |= PAGING_MEASURE;
    }
    Ok(spec)
}

fn params(text: &str) -> Result<Vec<(String, u64)>, WorkloadError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| WorkloadError::BadParam(kv.to_string()))?;
            let v = crate::size::parse_size(v.trim()).map_err(|_| WorkloadError::BadParam(kv.to_string()))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

/// Whether `text` names a valid dirty workload (the one whose rounds the
/// VMM harvests and checks).
#[must_use]
pub fn is_dirty(text: Option<&str>) -> bool {
    text.and_then(|t| parse(t).ok()).is_some_and(|s| s.kind == WorkloadKind::Dirty as u32)
}

/// Parses a workload string.
///
/// # Errors
/// [`WorkloadError`].
pub fn parse(text: &str) -> Result<WorkloadSpec, WorkloadError> {
    let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
    if kind == "paging" {
        // Its policy, pattern and probe are names, not numbers.
        return paging_spec(rest);
    }
    let given = params(rest)?;
    let get = |name: &str, allowed: &[&str]| -> Result<Option<u64>, WorkloadError> {
        if let Some((k, _)) = given.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(WorkloadError::BadParam(k.clone()));
        }
        Ok(given.iter().find(|(k, _)| k == name).map(|(_, v)| *v))
    };
    let mut spec = WorkloadSpec::default();
    match kind {
        "dirty" => {
            let allowed = ["pages", "rounds", "seed", "buffer", "log", "warmup"];
            let pages = get("pages", &allowed)?.unwrap_or(256);
            let rounds = get("rounds", &allowed)?.unwrap_or(3);
            let seed = get("seed", &allowed)?.unwrap_or(1);
            let buffer = get("buffer", &allowed)?.unwrap_or(pages.saturating_mul(4));
            let log = get("log", &allowed)?.unwrap_or(1).min(1);
            let warmup = get("warmup", &allowed)?.unwrap_or(0);
            let bad = |why: String| WorkloadError::OutOfRange { kind: "dirty", why };
            if warmup >= rounds {
                return Err(bad(format!("warmup={warmup} leaves no logged round of {rounds}")));
            }
            if pages == 0 || rounds == 0 {
                return Err(bad("pages and rounds must be at least 1".into()));
            }
            if pages > MAX_BUFFER_PAGES || rounds > MAX_ROUNDS {
                return Err(bad(format!("at most {MAX_BUFFER_PAGES} pages per round and {MAX_ROUNDS} rounds")));
            }
            if buffer == 0 || buffer > MAX_BUFFER_PAGES {
                return Err(bad(format!("buffer of {buffer} pages is outside 1..={MAX_BUFFER_PAGES}")));
            }
            spec.kind = WorkloadKind::Dirty as u32;
            spec.params[..6].copy_from_slice(&[pages, rounds, seed, buffer, log, warmup]);
        }
        "checksum" => {
            let allowed = ["pages", "rounds", "ms", "seed"];
            let pages = get("pages", &allowed)?.unwrap_or(1024);
            let rounds = get("rounds", &allowed)?.unwrap_or(10);
            let ms = get("ms", &allowed)?.unwrap_or(100);
            let seed = get("seed", &allowed)?.unwrap_or(1);
            if pages == 0 || pages > MAX_BUFFER_PAGES || rounds == 0 || rounds > MAX_ROUNDS {
                return Err(WorkloadError::OutOfRange { kind: "checksum", why: format!("pages must be 1..={MAX_BUFFER_PAGES} and rounds at least 1") });
            }
            spec.kind = WorkloadKind::Checksum as u32;
            spec.params[..4].copy_from_slice(&[pages, rounds, ms, seed]);
        }
        "balloon" => {
            let allowed = ["rounds", "report", "oom", "irq", "paging"];
            let rounds = get("rounds", &allowed)?.unwrap_or(0);
            // 1: report free pages at start and after each deflate; 2: only after deflates.
            let report = get("report", &allowed)?.unwrap_or(0).min(2);
            let oom = get("oom", &allowed)?.unwrap_or(0) / memvisor_abi::layout::PAGE_SIZE;
            if oom > 128 * 512 {
                return Err(WorkloadError::OutOfRange { kind: "balloon", why: "oom is at most 256M (128 blocks of 2 MiB)".into() });
            }
            let irq = get("irq", &allowed)?.unwrap_or(0).min(1);
            let paging = get("paging", &allowed)?.unwrap_or(0).min(1);
            spec.kind = WorkloadKind::Balloon as u32;
            spec.params[..5].copy_from_slice(&[rounds, report, oom, irq, paging]);
        }
        "balloon-hostile" => {
            let mode = get("mode", &["mode"])?.unwrap_or(0);
            if memvisor_abi::workload::HostileMode::from_raw(mode).is_none() {
                return Err(WorkloadError::OutOfRange { kind: "balloon-hostile", why: format!("mode {mode} is not 1..=9") });
            }
            spec.kind = WorkloadKind::BalloonHostile as u32;
            spec.params[0] = mode;
        }
        "translation" => {
            let allowed = ["ws", "workloads", "reps", "steps", "seed"];
            let ws = get("ws", &allowed)?.unwrap_or(64 << 20);
            let all = (1u64 << memvisor_user::translation::Workload::ALL.len()) - 1;
            let mask = get("workloads", &allowed)?.unwrap_or(all);
            let reps = get("reps", &allowed)?.unwrap_or(5);
            let steps = get("steps", &allowed)?.unwrap_or(1 << 20);
            let seed = get("seed", &allowed)?.unwrap_or(1);
            let bad = |why: String| WorkloadError::OutOfRange { kind: "translation", why };
            if !ws.is_power_of_two() || !(MIN_TRANSLATION_WS..=MAX_TRANSLATION_WS).contains(&ws) {
                return Err(bad(format!("the working set must be a power of two from 64 KiB to 16 GiB, not {ws}")));
            }
            if mask == 0 || mask & !all != 0 {
                return Err(bad(format!("workloads is a bit mask within {all:#x}")));
            }
            if reps == 0 || reps > MAX_ROUNDS || steps == 0 || steps > 1 << 32 {
                return Err(bad(format!("reps must be 1..={MAX_ROUNDS} and steps 1..=2^32")));
            }
            spec.kind = WorkloadKind::Translation as u32;
            spec.params[..5].copy_from_slice(&[mask, ws, reps, steps, seed]);
        }
        "cow" => {
            let pages = get("pages", &["pages"])?.unwrap_or(64);
            if !(1..=MAX_COW_PAGES).contains(&pages) {
                return Err(WorkloadError::OutOfRange { kind: "cow", why: format!("pages must be 1..={MAX_COW_PAGES}") });
            }
            spec.kind = WorkloadKind::Cow as u32;
            spec.params[0] = pages;
        }
        other => return Err(WorkloadError::UnknownKind(other.to_string())),
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloon_specs_parse() {
        let s = parse("balloon:rounds=2,report=1,oom=64M").unwrap();
        assert_eq!(s.kind, WorkloadKind::Balloon as u32);
        assert_eq!(&s.params[..3], &[2, 1, 16384]);
        assert_eq!(&parse("balloon:report=2,paging=1").unwrap().params[..5], &[0, 2, 0, 0, 1]);
        assert_eq!(parse("balloon-hostile:mode=3").unwrap().params[0], 3);
        assert_eq!(parse("balloon-hostile:mode=9").unwrap().params[0], 9);
        assert!(parse("balloon-hostile:mode=10").is_err());
        assert!(parse("balloon:oom=1G").is_err());
    }

    #[test]
    fn dirty_specs_parse_with_defaults() {
        let s = parse("dirty:pages=100,rounds=5,seed=7").unwrap();
        assert_eq!(s.kind, WorkloadKind::Dirty as u32);
        assert_eq!(&s.params[..5], &[100, 5, 7, 400, 1]);
        assert_eq!(parse("dirty").unwrap().params[..5], [256, 3, 1, 1024, 1]);
        assert_eq!(parse("dirty:log=0").unwrap().params[4], 0);
        assert_eq!(parse("dirty:rounds=4,warmup=1").unwrap().params[5], 1);
        assert!(matches!(parse("dirty:rounds=2,warmup=2"), Err(WorkloadError::OutOfRange { .. })));
    }

    #[test]
    fn checksum_specs_parse() {
        let s = parse("checksum:pages=64,rounds=3,ms=10").unwrap();
        assert_eq!(s.kind, WorkloadKind::Checksum as u32);
        assert_eq!(&s.params[..4], &[64, 3, 10, 1]);
    }

    #[test]
    fn translation_specs_parse_and_check_the_working_set() {
        let s = parse("translation:ws=4M,reps=7").unwrap();
        assert_eq!(s.kind, WorkloadKind::Translation as u32);
        assert_eq!(&s.params[..5], &[0xf, 4 << 20, 7, 1 << 20, 1]);
        assert!(matches!(parse("translation:ws=3M"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("translation:ws=4K"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("translation:workloads=64"), Err(WorkloadError::OutOfRange { .. })));
    }

    #[test]
    fn paging_specs_parse_names_and_defaults() {
        let s = parse("paging:policy=lru,frames=8,pattern=hotcold,pages=40,accesses=500,seed=3,writes=50,probe=wild").unwrap();
        assert_eq!(s.kind, WorkloadKind::Paging as u32);
        assert_eq!(s.params, [Policy::Lru as u64, 8, Pattern::HotCold as u64, 40, 500, 3, 50]);
        assert_eq!(s.flags, PAGING_PROBE_WILD);
        assert_eq!(parse("paging:probe=ro,measure=1").unwrap().flags, PAGING_PROBE_READ_ONLY | PAGING_MEASURE);
        let d = parse("paging:frames=10").unwrap();
        assert_eq!(d.params, [Policy::Clock as u64, 10, Pattern::Seq as u64, 11, 44, 1, 100]);
        assert_eq!(d.flags, 0);
        assert_eq!(parse("paging").unwrap().params[1], 16);
    }

    #[test]
    fn bad_paging_and_cow_specs_are_refused() {
        assert!(matches!(parse("paging:policy=mru"), Err(WorkloadError::BadParam(_))));
        assert!(matches!(parse("paging:pattern=zipf"), Err(WorkloadError::BadParam(_))));
        assert!(matches!(parse("paging:frames=0"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("paging:frames=2000"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("paging:pages=5000"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("paging:writes=101"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("paging:rounds=3"), Err(WorkloadError::BadParam(_))));
        assert_eq!(parse("cow").unwrap().params[0], 64);
        assert_eq!(parse("cow:pages=9").unwrap().kind, WorkloadKind::Cow as u32);
        assert!(matches!(parse("cow:pages=513"), Err(WorkloadError::OutOfRange { .. })));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert!(matches!(parse("spin"), Err(WorkloadError::UnknownKind(_))));
        assert!(matches!(parse("dirty:pages"), Err(WorkloadError::BadParam(_))));
        assert!(matches!(parse("dirty:colour=3"), Err(WorkloadError::BadParam(_))));
        assert!(matches!(parse("dirty:pages=0"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("dirty:buffer=999999999"), Err(WorkloadError::OutOfRange { .. })));
    }
}
