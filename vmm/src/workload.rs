//! Naming workloads on the command line: `--workload KIND:key=value,...`
//! parsed into the boot configuration's `WorkloadSpec` (pure, tested).
//!
//! - `dirty:pages=N,rounds=R,seed=S[,buffer=B,log=0|1]`: see
//!   `memvisor_abi::workload::WorkloadKind::Dirty`; the buffer defaults to
//!   4 × N pages.
//! - `checksum:pages=N,rounds=R[,ms=T,seed=S]`: see
//!   `memvisor_abi::workload::WorkloadKind::Checksum`; `ms` defaults to 100.
//! - `balloon[:rounds=R,report=0|1,oom=SIZE]`: the balloon driver's service
//!   loop (`WorkloadKind::Balloon`; needs `--balloon`); `oom` is a size.
//! - `balloon-hostile:mode=M`: feed the balloon hostile input `M` (1-7,
//!   `memvisor_abi::workload::HostileMode`).

use memvisor_abi::workload::{WorkloadKind, WorkloadSpec};
use thiserror::Error;

/// A workload string that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WorkloadError {
    /// Unknown kind.
    #[error("unknown workload {0:?}; known: dirty, checksum, balloon, balloon-hostile")]
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
/// Most rounds of a workload (the VMM keeps a record per dirty round).
const MAX_ROUNDS: u64 = 4096;

fn params(text: &str) -> Result<Vec<(String, u64)>, WorkloadError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| WorkloadError::BadParam(kv.to_string()))?;
            let v = crate::config::parse_size(v.trim()).map_err(|_| WorkloadError::BadParam(kv.to_string()))?;
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
            let allowed = ["pages", "rounds", "seed", "buffer", "log"];
            let pages = get("pages", &allowed)?.unwrap_or(256);
            let rounds = get("rounds", &allowed)?.unwrap_or(3);
            let seed = get("seed", &allowed)?.unwrap_or(1);
            let buffer = get("buffer", &allowed)?.unwrap_or(pages.saturating_mul(4));
            let log = get("log", &allowed)?.unwrap_or(1).min(1);
            let bad = |why: String| WorkloadError::OutOfRange { kind: "dirty", why };
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
            spec.params[..5].copy_from_slice(&[pages, rounds, seed, buffer, log]);
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
            let allowed = ["rounds", "report", "oom"];
            let rounds = get("rounds", &allowed)?.unwrap_or(0);
            let report = get("report", &allowed)?.unwrap_or(0).min(1);
            let oom = get("oom", &allowed)?.unwrap_or(0) / memvisor_abi::layout::PAGE_SIZE;
            if oom > 128 * 512 {
                return Err(WorkloadError::OutOfRange { kind: "balloon", why: "oom is at most 256M (128 blocks of 2 MiB)".into() });
            }
            spec.kind = WorkloadKind::Balloon as u32;
            spec.params[..3].copy_from_slice(&[rounds, report, oom]);
        }
        "balloon-hostile" => {
            let mode = get("mode", &["mode"])?.unwrap_or(0);
            if memvisor_abi::workload::HostileMode::from_raw(mode).is_none() {
                return Err(WorkloadError::OutOfRange { kind: "balloon-hostile", why: format!("mode {mode} is not 1..=7") });
            }
            spec.kind = WorkloadKind::BalloonHostile as u32;
            spec.params[0] = mode;
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
        assert_eq!(parse("balloon-hostile:mode=3").unwrap().params[0], 3);
        assert!(parse("balloon-hostile:mode=8").is_err());
        assert!(parse("balloon:oom=1G").is_err());
    }

    #[test]
    fn dirty_specs_parse_with_defaults() {
        let s = parse("dirty:pages=100,rounds=5,seed=7").unwrap();
        assert_eq!(s.kind, WorkloadKind::Dirty as u32);
        assert_eq!(&s.params[..5], &[100, 5, 7, 400, 1]);
        assert_eq!(parse("dirty").unwrap().params[..5], [256, 3, 1, 1024, 1]);
        assert_eq!(parse("dirty:log=0").unwrap().params[4], 0);
    }

    #[test]
    fn checksum_specs_parse() {
        let s = parse("checksum:pages=64,rounds=3,ms=10").unwrap();
        assert_eq!(s.kind, WorkloadKind::Checksum as u32);
        assert_eq!(&s.params[..4], &[64, 3, 10, 1]);
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
