//! The workload a guest runs after its self-test, typed.
//!
//! `--workload KIND:key=value,...` (or `workload = "..."` in a config file)
//! is parsed once, at the edge, into a [`Workload`]; everything after that
//! matches on the enum. [`Workload::spec`] encodes it for the guest (the
//! ABI's `WorkloadSpec`), and [`std::fmt::Display`] writes it back as a
//! string that parses to the same value (snapshots store that string).
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
//! - `balloon-hostile:mode=M`: feed the balloon hostile input `M` (1-9 or
//!   its name, `memvisor_abi::workload::HostileMode`).
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
//! - `ticker[:secs=S,mibs=R,pages=N,fill=0|1]`: see
//!   `memvisor_abi::workload::WorkloadKind::Ticker`; defaults 5 s, no
//!   writes, one page, no fill.
//! - `shootdown[:pages=N,rounds=R,mode=remap|wp,skip=0|1|2,writer=kernel|user]`:
//!   see `memvisor_abi::workload::WorkloadKind::Shootdown`; defaults 16
//!   pages, 200 rounds, remap, `skip=0` (full shootdowns; 1: no IPIs, the
//!   writer flushes only its own TLB; 2: no flush at all), `writer=kernel`
//!   (`user`: the PTE stores run natively in a ring-3 writer). Needs
//!   `--vcpus` of 2 or more to have readers (with one CPU it runs and
//!   reports that nothing was shot down).

use std::fmt;
use std::str::FromStr;

use memvisor_abi::paging::{Pattern, Policy};
use memvisor_abi::workload::{HostileMode, PAGING_MEASURE, PAGING_PROBE_READ_ONLY, PAGING_PROBE_WILD, SHOOTDOWN_REMAP, SHOOTDOWN_SKIP_IPI, SHOOTDOWN_SKIP_LOCAL, SHOOTDOWN_USER_WRITER, SHOOTDOWN_WRITE_PROTECT, WorkloadKind, WorkloadSpec};
use thiserror::Error;

/// A workload string that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WorkloadError {
    /// Unknown kind.
    #[error("unknown workload {0:?}; known: dirty, checksum, balloon, balloon-hostile, paging, cow, translation, ticker, shootdown")]
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
/// Most pages the shootdown workload shares (the guest's `vm::shootdown::MAX_PAGES`).
pub const MAX_SHOOTDOWN_PAGES: u64 = 64;
/// Most rounds of the shootdown workload (the guest keeps one latency
/// sample per round).
pub const MAX_SHOOTDOWN_ROUNDS: u64 = 4096;
/// Largest balloon OOM allocation: 128 blocks of 2 MiB, in 4 KiB pages.
const MAX_OOM_PAGES: u64 = 128 * 512;

/// The dirty-page rounds (`WorkloadKind::Dirty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DirtyWorkload {
    /// Pages written per round.
    pub pages: u64,
    /// Rounds.
    pub rounds: u64,
    /// Seed of the page choice.
    pub seed: u64,
    /// Pages in the buffer the rounds write into.
    pub buffer: u64,
    /// Whether the VMM tracks (false: a baseline without logging).
    pub log: bool,
    /// Rounds run before the VMM switches logging on.
    pub warmup: u64,
}

/// The balloon driver's service loop (`WorkloadKind::Balloon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonWorkload {
    /// Returns of the balloon to zero before the driver ends (0: never).
    pub rounds: u64,
    /// Free page reporting: 0 off, 1 at start and after deflates, 2 only after deflates.
    pub report: u64,
    /// Pages to allocate after the first inflate (deflate-on-OOM), 0 for none.
    pub oom_pages: u64,
    /// Wait for the device's interrupt instead of polling.
    pub irq: bool,
    /// Run a small demand-paging task first.
    pub paging: bool,
}

/// The translation benchmark's workload (`WorkloadKind::Translation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranslationWorkload {
    /// Bit `w` runs `memvisor_user::translation::Workload` number `w`.
    pub mask: u64,
    /// Working set in bytes (a power of two).
    pub working_set: u64,
    /// Timed repetitions.
    pub reps: u64,
    /// Accesses per repetition.
    pub steps: u64,
    /// Seed.
    pub seed: u64,
}

/// What a paging task does after its accesses, to provoke a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingProbe {
    /// Nothing.
    None,
    /// Writes its read-only argument page.
    ReadOnly,
    /// Reads outside every region it owns.
    Wild,
}

impl PagingProbe {
    const NAMES: [(&'static str, PagingProbe); 3] = [("none", PagingProbe::None), ("ro", PagingProbe::ReadOnly), ("wild", PagingProbe::Wild)];

    fn flags(self) -> u32 {
        match self {
            PagingProbe::None => 0,
            PagingProbe::ReadOnly => PAGING_PROBE_READ_ONLY,
            PagingProbe::Wild => PAGING_PROBE_WILD,
        }
    }

    fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, p)| *p == self).map_or("none", |(n, _)| n)
    }
}

/// Demand paging with a bounded frame pool (`WorkloadKind::Paging`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingWorkload {
    /// Replacement policy.
    pub policy: Policy,
    /// Frames the kernel may hold.
    pub frames: u64,
    /// Access pattern.
    pub pattern: Pattern,
    /// Pages of the region.
    pub pages: u64,
    /// Accesses made.
    pub accesses: u64,
    /// Seed.
    pub seed: u64,
    /// Percentage of accesses that write.
    pub write_percent: u64,
    /// The deliberate bad access at the end.
    pub probe: PagingProbe,
    /// Time one ring-0 and one device copy first.
    pub measure: bool,
}

/// What the shootdown workload's writer does to a page each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShootdownMode {
    /// Points the page at another frame (unmap and map: the old frame is
    /// then reused).
    Remap,
    /// Clears the page's W bit (as fork's copy-on-write does).
    WriteProtect,
}

impl ShootdownMode {
    const NAMES: [(&'static str, ShootdownMode); 2] = [("remap", ShootdownMode::Remap), ("wp", ShootdownMode::WriteProtect)];

    fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, m)| *m == self).map_or("remap", |(n, _)| n)
    }
}

/// How much of the shootdown the writer leaves out (a teaching mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShootdownSkip {
    /// Nothing: `invlpg` here, IPIs to the others, wait for their acks.
    None,
    /// The IPIs: the writer flushes only its own TLB (the classic bug).
    Ipi,
    /// Every flush, its own too.
    All,
}

/// Where the shootdown workload's PTE stores run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShootdownWriter {
    /// In the kernel, at ring 0 (emulated on KVM's PVM flavour).
    Kernel,
    /// In a ring-3 task through a mapping of the leaf table (native).
    User,
}

impl ShootdownWriter {
    const NAMES: [(&'static str, ShootdownWriter); 2] = [("kernel", ShootdownWriter::Kernel), ("user", ShootdownWriter::User)];

    fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, m)| *m == self).map_or("kernel", |(n, _)| n)
    }
}

/// TLB shootdown across CPUs (`WorkloadKind::Shootdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShootdownWorkload {
    /// Pages the readers share.
    pub pages: u64,
    /// Changes the writer makes.
    pub rounds: u64,
    /// What a change is.
    pub mode: ShootdownMode,
    /// Teaching mode: what of the shootdown to leave out.
    pub skip: ShootdownSkip,
    /// Where the PTE stores run.
    pub writer: ShootdownWriter,
}

/// A workload, parsed and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Dirty-page rounds the VMM harvests and checks.
    Dirty(DirtyWorkload),
    /// Memory checks across snapshots.
    Checksum {
        /// Pages of the buffer.
        pages: u64,
        /// Rounds.
        rounds: u64,
        /// Milliseconds between rounds.
        ms: u64,
        /// Seed.
        seed: u64,
    },
    /// The balloon driver.
    Balloon(BalloonWorkload),
    /// Hostile input to the balloon.
    BalloonHostile(HostileMode),
    /// The translation benchmark.
    Translation(TranslationWorkload),
    /// Demand paging.
    Paging(PagingWorkload),
    /// Copy-on-write fork over this many pages.
    Cow {
        /// Pages of the region.
        pages: u64,
    },
    /// Keeps time and dirties memory at a set rate (migration).
    Ticker {
        /// How long it runs, seconds.
        secs: u64,
        /// MiB of pages it writes per second (0: none).
        mibs: u64,
        /// Pages of its buffer.
        pages: u64,
        /// Whether it first fills the buffer with data.
        fill: bool,
    },
    /// TLB shootdown across CPUs.
    Shootdown(ShootdownWorkload),
}

/// `key=value` pairs of one spec, checked against the keys its kind takes.
struct Params<'a> {
    kind: &'static str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Params<'a> {
    fn new(kind: &'static str, text: &'a str, allowed: &[&str]) -> Result<Self, WorkloadError> {
        let mut pairs = Vec::new();
        for kv in text.split(',').filter(|kv| !kv.trim().is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| WorkloadError::BadParam(kv.to_string()))?;
            let k = k.trim();
            if !allowed.contains(&k) {
                return Err(WorkloadError::BadParam(k.to_string()));
            }
            pairs.push((k, v.trim()));
        }
        Ok(Params { kind, pairs })
    }

    fn text(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// A number or size (`64M`), or `default`.
    fn num(&self, key: &str, default: u64) -> Result<u64, WorkloadError> {
        match self.text(key) {
            None => Ok(default),
            Some(v) => crate::size::parse_size(v).map_err(|_| WorkloadError::BadParam(format!("{key}={v}"))),
        }
    }

    /// A 0/1 switch (anything above 1 counts as 1, as before).
    fn flag(&self, key: &str) -> Result<bool, WorkloadError> {
        Ok(self.num(key, 0)? != 0)
    }

    /// One of `names`, or `default`.
    fn named<T: Copy>(&self, key: &str, names: &[(&str, T)], default: T) -> Result<T, WorkloadError> {
        match self.text(key) {
            None => Ok(default),
            Some(v) => names.iter().find(|(n, _)| *n == v).map(|(_, t)| *t).ok_or_else(|| WorkloadError::BadParam(format!("{key}={v}"))),
        }
    }

    fn bad(&self, why: String) -> WorkloadError {
        WorkloadError::OutOfRange { kind: self.kind, why }
    }
}

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(text: &str) -> Result<Self, WorkloadError> {
        let (kind, rest) = text.trim().split_once(':').unwrap_or((text.trim(), ""));
        match kind {
            "dirty" => parse_dirty(rest),
            "checksum" => {
                let p = Params::new("checksum", rest, &["pages", "rounds", "ms", "seed"])?;
                let (pages, rounds) = (p.num("pages", 1024)?, p.num("rounds", 10)?);
                if !(1..=MAX_BUFFER_PAGES).contains(&pages) || !(1..=MAX_ROUNDS).contains(&rounds) {
                    return Err(p.bad(format!("pages must be 1..={MAX_BUFFER_PAGES} and rounds 1..={MAX_ROUNDS}")));
                }
                Ok(Workload::Checksum { pages, rounds, ms: p.num("ms", 100)?, seed: p.num("seed", 1)? })
            }
            "balloon" => parse_balloon(rest),
            "balloon-hostile" => {
                let p = Params::new("balloon-hostile", rest, &["mode"])?;
                let text = p.text("mode").unwrap_or("0");
                let mode = HostileMode::ALL.into_iter().find(|m| m.name() == text).or_else(|| text.parse().ok().and_then(HostileMode::from_raw));
                mode.map(Workload::BalloonHostile).ok_or_else(|| p.bad(format!("mode {text} is not 1..=9 or a mode's name")))
            }
            "translation" => parse_translation(rest),
            "paging" => parse_paging(rest),
            "cow" => {
                let p = Params::new("cow", rest, &["pages"])?;
                let pages = p.num("pages", 64)?;
                if !(1..=MAX_COW_PAGES).contains(&pages) {
                    return Err(p.bad(format!("pages must be 1..={MAX_COW_PAGES}")));
                }
                Ok(Workload::Cow { pages })
            }
            "ticker" => {
                let p = Params::new("ticker", rest, &["secs", "mibs", "pages", "fill"])?;
                let (secs, mibs, pages) = (p.num("secs", 5)?, p.num("mibs", 0)?, p.num("pages", 1)?);
                if !(1..=3600).contains(&secs) || !(1..=MAX_BUFFER_PAGES).contains(&pages) || mibs > 1 << 20 {
                    return Err(p.bad(format!("secs must be 1..=3600, pages 1..={MAX_BUFFER_PAGES} and mibs at most 1048576")));
                }
                Ok(Workload::Ticker { secs, mibs, pages, fill: p.flag("fill")? })
            }
            "shootdown" => parse_shootdown(rest),
            other => Err(WorkloadError::UnknownKind(other.to_string())),
        }
    }
}

fn parse_shootdown(rest: &str) -> Result<Workload, WorkloadError> {
    let p = Params::new("shootdown", rest, &["pages", "rounds", "mode", "skip", "writer"])?;
    let (pages, rounds) = (p.num("pages", 16)?, p.num("rounds", 200)?);
    if !(1..=MAX_SHOOTDOWN_PAGES).contains(&pages) || !(1..=MAX_SHOOTDOWN_ROUNDS).contains(&rounds) {
        return Err(p.bad(format!("pages must be 1..={MAX_SHOOTDOWN_PAGES} and rounds 1..={MAX_SHOOTDOWN_ROUNDS}")));
    }
    let mode = p.named("mode", &ShootdownMode::NAMES, ShootdownMode::Remap)?;
    let skip = p.named("skip", &[("0", ShootdownSkip::None), ("1", ShootdownSkip::Ipi), ("2", ShootdownSkip::All)], ShootdownSkip::None)?;
    let writer = p.named("writer", &ShootdownWriter::NAMES, ShootdownWriter::Kernel)?;
    Ok(Workload::Shootdown(ShootdownWorkload { pages, rounds, mode, skip, writer }))
}

fn parse_dirty(rest: &str) -> Result<Workload, WorkloadError> {
    let p = Params::new("dirty", rest, &["pages", "rounds", "seed", "buffer", "log", "warmup"])?;
    let pages = p.num("pages", 256)?;
    let rounds = p.num("rounds", 3)?;
    let buffer = p.num("buffer", pages.saturating_mul(4))?;
    let warmup = p.num("warmup", 0)?;
    if pages == 0 || rounds == 0 {
        return Err(p.bad("pages and rounds must be at least 1".into()));
    }
    if warmup >= rounds {
        return Err(p.bad(format!("warmup={warmup} leaves no logged round of {rounds}")));
    }
    if pages > MAX_BUFFER_PAGES || rounds > MAX_ROUNDS {
        return Err(p.bad(format!("at most {MAX_BUFFER_PAGES} pages per round and {MAX_ROUNDS} rounds")));
    }
    if buffer == 0 || buffer > MAX_BUFFER_PAGES {
        return Err(p.bad(format!("buffer of {buffer} pages is outside 1..={MAX_BUFFER_PAGES}")));
    }
    let log = p.num("log", 1)? != 0;
    Ok(Workload::Dirty(DirtyWorkload { pages, rounds, seed: p.num("seed", 1)?, buffer, log, warmup }))
}

fn parse_balloon(rest: &str) -> Result<Workload, WorkloadError> {
    let p = Params::new("balloon", rest, &["rounds", "report", "oom", "irq", "paging"])?;
    let oom_pages = p.num("oom", 0)? / memvisor_abi::layout::PAGE_SIZE;
    if oom_pages > MAX_OOM_PAGES {
        return Err(p.bad("oom is at most 256M (128 blocks of 2 MiB)".into()));
    }
    Ok(Workload::Balloon(BalloonWorkload {
        rounds: p.num("rounds", 0)?,
        report: p.num("report", 0)?.min(2),
        oom_pages,
        irq: p.flag("irq")?,
        paging: p.flag("paging")?,
    }))
}

fn parse_translation(rest: &str) -> Result<Workload, WorkloadError> {
    let p = Params::new("translation", rest, &["ws", "workloads", "reps", "steps", "seed"])?;
    let working_set = p.num("ws", 64 << 20)?;
    let all = (1u64 << memvisor_user::translation::Workload::ALL.len()) - 1;
    let mask = p.num("workloads", all)?;
    let reps = p.num("reps", 5)?;
    let steps = p.num("steps", 1 << 20)?;
    if !working_set.is_power_of_two() || !(MIN_TRANSLATION_WS..=MAX_TRANSLATION_WS).contains(&working_set) {
        return Err(p.bad(format!("the working set must be a power of two from 64 KiB to 16 GiB, not {working_set}")));
    }
    if mask == 0 || mask & !all != 0 {
        return Err(p.bad(format!("workloads is a bit mask within {all:#x}")));
    }
    if reps == 0 || reps > MAX_ROUNDS || steps == 0 || steps > 1 << 32 {
        return Err(p.bad(format!("reps must be 1..={MAX_ROUNDS} and steps 1..=2^32")));
    }
    Ok(Workload::Translation(TranslationWorkload { mask, working_set, reps, steps, seed: p.num("seed", 1)? }))
}

fn parse_paging(rest: &str) -> Result<Workload, WorkloadError> {
    let allowed = ["policy", "frames", "pattern", "pages", "accesses", "seed", "writes", "probe", "measure"];
    let p = Params::new("paging", rest, &allowed)?;
    let policies: Vec<(&str, Policy)> = Policy::ALL.iter().map(|x| (x.name(), *x)).collect();
    let patterns: Vec<(&str, Pattern)> = Pattern::ALL.iter().map(|x| (x.name(), *x)).collect();
    let frames = p.num("frames", 16)?;
    let pages = p.num("pages", frames.saturating_add(1))?;
    let accesses = p.num("accesses", pages.saturating_mul(4))?;
    let write_percent = p.num("writes", 100)?;
    if !(1..=MAX_PAGING_FRAMES).contains(&frames) {
        return Err(p.bad(format!("frames must be 1..={MAX_PAGING_FRAMES}")));
    }
    if !(1..=MAX_PAGING_PAGES).contains(&pages) {
        return Err(p.bad(format!("pages must be 1..={MAX_PAGING_PAGES}")));
    }
    if !(1..=MAX_PAGING_ACCESSES).contains(&accesses) {
        return Err(p.bad(format!("accesses must be 1..={MAX_PAGING_ACCESSES}")));
    }
    if write_percent > 100 {
        return Err(p.bad("writes is a percentage, 0..=100".into()));
    }
    Ok(Workload::Paging(PagingWorkload {
        policy: p.named("policy", &policies, Policy::Clock)?,
        frames,
        pattern: p.named("pattern", &patterns, Pattern::Seq)?,
        pages,
        accesses,
        seed: p.num("seed", 1)?,
        write_percent,
        probe: p.named("probe", &PagingProbe::NAMES, PagingProbe::None)?,
        measure: p.flag("measure")?,
    }))
}

impl Workload {
    /// The workload as the guest's boot configuration carries it.
    #[must_use]
    pub fn spec(&self) -> WorkloadSpec {
        let (kind, flags, params): (WorkloadKind, u32, &[u64]) = match *self {
            Workload::Dirty(d) => (WorkloadKind::Dirty, 0, &[d.pages, d.rounds, d.seed, d.buffer, u64::from(d.log), d.warmup]),
            Workload::Checksum { pages, rounds, ms, seed } => (WorkloadKind::Checksum, 0, &[pages, rounds, ms, seed]),
            Workload::Balloon(b) => (WorkloadKind::Balloon, 0, &[b.rounds, b.report, b.oom_pages, u64::from(b.irq), u64::from(b.paging)]),
            Workload::BalloonHostile(mode) => (WorkloadKind::BalloonHostile, 0, &[mode as u64]),
            Workload::Translation(t) => (WorkloadKind::Translation, 0, &[t.mask, t.working_set, t.reps, t.steps, t.seed]),
            Workload::Paging(p) => {
                let flags = p.probe.flags() | if p.measure { PAGING_MEASURE } else { 0 };
                (WorkloadKind::Paging, flags, &[p.policy as u64, p.frames, p.pattern as u64, p.pages, p.accesses, p.seed, p.write_percent])
            }
            Workload::Cow { pages } => (WorkloadKind::Cow, 0, &[pages]),
            Workload::Ticker { secs, mibs, pages, fill } => (WorkloadKind::Ticker, 0, &[secs, mibs, pages, u64::from(fill)]),
            Workload::Shootdown(w) => {
                let mode = match w.mode {
                    ShootdownMode::Remap => SHOOTDOWN_REMAP,
                    ShootdownMode::WriteProtect => SHOOTDOWN_WRITE_PROTECT,
                };
                let skip = match w.skip {
                    ShootdownSkip::None => 0,
                    ShootdownSkip::Ipi => SHOOTDOWN_SKIP_IPI,
                    ShootdownSkip::All => SHOOTDOWN_SKIP_IPI | SHOOTDOWN_SKIP_LOCAL,
                };
                let writer = if w.writer == ShootdownWriter::User { SHOOTDOWN_USER_WRITER } else { 0 };
                (WorkloadKind::Shootdown, skip | writer, &[w.pages, w.rounds, mode])
            }
        };
        let mut spec = WorkloadSpec { kind: kind as u32, flags, ..WorkloadSpec::default() };
        spec.params[..params.len()].copy_from_slice(params);
        spec
    }

    /// The name of its kind, as on the command line.
    #[must_use]
    pub fn kind_name(&self) -> &'static str {
        match self {
            Workload::Dirty(_) => "dirty",
            Workload::Checksum { .. } => "checksum",
            Workload::Balloon(_) => "balloon",
            Workload::BalloonHostile(_) => "balloon-hostile",
            Workload::Translation(_) => "translation",
            Workload::Paging(_) => "paging",
            Workload::Cow { .. } => "cow",
            Workload::Ticker { .. } => "ticker",
            Workload::Shootdown(_) => "shootdown",
        }
    }

    /// Whether it drives the balloon device (and so needs one).
    #[must_use]
    pub fn uses_balloon(&self) -> bool {
        matches!(self, Workload::Balloon(_) | Workload::BalloonHostile(_))
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind_name();
        match *self {
            Workload::Dirty(d) => write!(f, "{kind}:pages={},rounds={},seed={},buffer={},log={},warmup={}", d.pages, d.rounds, d.seed, d.buffer, u8::from(d.log), d.warmup),
            Workload::Checksum { pages, rounds, ms, seed } => write!(f, "{kind}:pages={pages},rounds={rounds},ms={ms},seed={seed}"),
            Workload::Balloon(b) => {
                let oom = b.oom_pages * memvisor_abi::layout::PAGE_SIZE;
                write!(f, "{kind}:rounds={},report={},oom={oom},irq={},paging={}", b.rounds, b.report, u8::from(b.irq), u8::from(b.paging))
            }
            Workload::BalloonHostile(mode) => write!(f, "{kind}:mode={}", mode.name()),
            Workload::Translation(t) => write!(f, "{kind}:ws={},workloads={},reps={},steps={},seed={}", t.working_set, t.mask, t.reps, t.steps, t.seed),
            Workload::Paging(p) => write!(
                f,
                "{kind}:policy={},frames={},pattern={},pages={},accesses={},seed={},writes={},probe={},measure={}",
                p.policy.name(),
                p.frames,
                p.pattern.name(),
                p.pages,
                p.accesses,
                p.seed,
                p.write_percent,
                p.probe.name(),
                u8::from(p.measure)
            ),
            Workload::Cow { pages } => write!(f, "{kind}:pages={pages}"),
            Workload::Ticker { secs, mibs, pages, fill } => write!(f, "{kind}:secs={secs},mibs={mibs},pages={pages},fill={}", u8::from(fill)),
            Workload::Shootdown(w) => {
                let skip = match w.skip {
                    ShootdownSkip::None => 0,
                    ShootdownSkip::Ipi => 1,
                    ShootdownSkip::All => 2,
                };
                write!(f, "{kind}:pages={},rounds={},mode={},skip={skip},writer={}", w.pages, w.rounds, w.mode.name(), w.writer.name())
            }
        }
    }
}

/// Snapshots and config files hold a workload as its string.
impl serde::Serialize for Workload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Workload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Workload, WorkloadError> {
        text.parse()
    }

    #[test]
    fn every_workload_prints_as_a_string_that_parses_back_to_it() {
        for text in [
            "dirty",
            "dirty:pages=100,rounds=5,seed=7,log=0",
            "checksum:pages=64,rounds=3,ms=10",
            "balloon:rounds=2,report=1,oom=64M,irq=1",
            "balloon-hostile:mode=3",
            "translation:ws=4M,reps=7",
            "paging:policy=lru,frames=8,pattern=hotcold,probe=wild,measure=1",
            "cow:pages=9",
            "ticker:secs=3,mibs=100,pages=4096,fill=1",
            "shootdown:pages=4,rounds=10,mode=wp,skip=1",
            "shootdown:skip=2,writer=user",
        ] {
            let w = parse(text).unwrap();
            assert_eq!(parse(&w.to_string()).unwrap(), w, "{text} -> {w}");
            let json = serde_json::to_string(&w).unwrap();
            assert_eq!(serde_json::from_str::<Workload>(&json).unwrap(), w);
        }
        assert!(serde_json::from_str::<Workload>("\"dirty:pages=0\"").is_err(), "a bad stored spec is an error, not an empty one");
    }

    #[test]
    fn balloon_specs_parse() {
        let s = parse("balloon:rounds=2,report=1,oom=64M").unwrap().spec();
        assert_eq!(s.kind, WorkloadKind::Balloon as u32);
        assert_eq!(&s.params[..3], &[2, 1, 16384]);
        assert_eq!(&parse("balloon:report=2,paging=1").unwrap().spec().params[..5], &[0, 2, 0, 0, 1]);
        assert_eq!(parse("balloon-hostile:mode=3").unwrap().spec().params[0], 3);
        assert_eq!(parse("balloon-hostile:mode=9").unwrap().spec().params[0], 9);
        assert_eq!(parse("balloon-hostile:mode=duplicate-pfn").unwrap(), Workload::BalloonHostile(HostileMode::DuplicatePfn));
        assert!(parse("balloon-hostile:mode=10").is_err());
        assert!(parse("balloon:oom=1G").is_err());
    }

    #[test]
    fn dirty_specs_parse_with_defaults() {
        let s = parse("dirty:pages=100,rounds=5,seed=7").unwrap().spec();
        assert_eq!(s.kind, WorkloadKind::Dirty as u32);
        assert_eq!(&s.params[..5], &[100, 5, 7, 400, 1]);
        assert_eq!(parse("dirty").unwrap().spec().params[..5], [256, 3, 1, 1024, 1]);
        assert_eq!(parse("dirty:log=0").unwrap().spec().params[4], 0);
        assert_eq!(parse("dirty:rounds=4,warmup=1").unwrap().spec().params[5], 1);
        assert!(matches!(parse("dirty:rounds=2,warmup=2"), Err(WorkloadError::OutOfRange { .. })));
    }

    #[test]
    fn checksum_specs_parse() {
        let s = parse("checksum:pages=64,rounds=3,ms=10").unwrap().spec();
        assert_eq!(s.kind, WorkloadKind::Checksum as u32);
        assert_eq!(&s.params[..4], &[64, 3, 10, 1]);
    }

    #[test]
    fn translation_specs_parse_and_check_the_working_set() {
        let s = parse("translation:ws=4M,reps=7").unwrap().spec();
        assert_eq!(s.kind, WorkloadKind::Translation as u32);
        assert_eq!(&s.params[..5], &[0xf, 4 << 20, 7, 1 << 20, 1]);
        assert!(matches!(parse("translation:ws=3M"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("translation:ws=4K"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("translation:workloads=64"), Err(WorkloadError::OutOfRange { .. })));
    }

    #[test]
    fn paging_specs_parse_names_and_defaults() {
        let s = parse("paging:policy=lru,frames=8,pattern=hotcold,pages=40,accesses=500,seed=3,writes=50,probe=wild").unwrap().spec();
        assert_eq!(s.kind, WorkloadKind::Paging as u32);
        assert_eq!(s.params, [Policy::Lru as u64, 8, Pattern::HotCold as u64, 40, 500, 3, 50]);
        assert_eq!(s.flags, PAGING_PROBE_WILD);
        assert_eq!(parse("paging:probe=ro,measure=1").unwrap().spec().flags, PAGING_PROBE_READ_ONLY | PAGING_MEASURE);
        let d = parse("paging:frames=10").unwrap().spec();
        assert_eq!(d.params, [Policy::Clock as u64, 10, Pattern::Seq as u64, 11, 44, 1, 100]);
        assert_eq!(d.flags, 0);
        assert_eq!(parse("paging").unwrap().spec().params[1], 16);
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
        assert_eq!(parse("cow").unwrap(), Workload::Cow { pages: 64 });
        assert_eq!(parse("cow:pages=9").unwrap().spec().kind, WorkloadKind::Cow as u32);
        assert!(matches!(parse("cow:pages=513"), Err(WorkloadError::OutOfRange { .. })));
    }

    #[test]
    fn shootdown_specs_parse_and_are_checked() {
        let w = ShootdownWorkload { pages: 16, rounds: 200, mode: ShootdownMode::Remap, skip: ShootdownSkip::None, writer: ShootdownWriter::Kernel };
        assert_eq!(parse("shootdown").unwrap(), Workload::Shootdown(w));
        let spec = parse("shootdown:pages=8,mode=wp,skip=1").unwrap().spec();
        assert_eq!((spec.kind, spec.flags, spec.params[0], spec.params[2]), (WorkloadKind::Shootdown as u32, SHOOTDOWN_SKIP_IPI, 8, SHOOTDOWN_WRITE_PROTECT));
        let spec = parse("shootdown:skip=2,writer=user").unwrap().spec();
        assert_eq!(spec.flags, SHOOTDOWN_SKIP_IPI | SHOOTDOWN_SKIP_LOCAL | SHOOTDOWN_USER_WRITER);
        assert!(matches!(parse("shootdown:skip=3"), Err(WorkloadError::BadParam(_))));
        assert!(matches!(parse("shootdown:writer=vmm"), Err(WorkloadError::BadParam(_))));
        assert!(matches!(parse("shootdown:pages=0"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("shootdown:pages=65"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("shootdown:rounds=5000"), Err(WorkloadError::OutOfRange { .. })));
        assert!(matches!(parse("shootdown:mode=unmap"), Err(WorkloadError::BadParam(_))));
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
