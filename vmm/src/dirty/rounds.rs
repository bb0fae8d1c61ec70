//! The dirty workload's harvests, checked round by round.
//!
//! The guest's ring-3 task writes the pages [`dirty_page`] names in each
//! round and reports `RoundDone`; the VMM then harvests (the guest waits in
//! the port write) and compares: every page the task wrote must be in the
//! harvest (a miss is a bug, reported in `missing`); anything else must be
//! explained: a page the VMM wrote, or one in a region the guest kernel
//! declared as its own bookkeeping (kernel data and stacks, page-table
//! arena with its accessed/dirty bits, the task's stack). Pages with no
//! explanation are listed as `unexplained`.
//!
//! With `warmup=W` the first `W` rounds run before logging is switched on
//! (recorded, not harvested): the task has then touched its buffer, so KVM
//! has built its mappings, huge ones included, and the samples show what
//! switching logging on does to them.

use std::collections::BTreeSet;

use memvisor_abi::workload::{Event, dirty_page};
use serde::Serialize;

use crate::dirty::{DirtyError, DirtyMode, DirtyTracker, PageRange};
use crate::workload::DirtyWorkload;
use crate::kvm_stats::StatsFd;
use crate::memory::GuestRam;

/// Most kernel regions a guest may declare.
const MAX_REGIONS: usize = 16;
/// Most rounds recorded (each holds page lists); later rounds are counted
/// in the report but their pages are dropped.
const MAX_ROUNDS: usize = 4096;

/// What each declared kernel region is, in the order the guest sends them.
const REGION_REASONS: [&str; 3] = [
    "guest kernel image (kernel data, stacks, message outbox)",
    "guest page-table arena (page tables, accessed/dirty bits, task argument pages)",
    "workload task stack",
];

/// Pages outside the expected set, grouped by reason.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Extra {
    /// Why they were dirty.
    pub reason: String,
    /// Guest page frame numbers.
    pub pages: Vec<u64>,
}

/// One round's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: u64,
    /// Distinct pages the guest task wrote (the expected set).
    pub expected: u64,
    /// Pages KVM reported for the guest.
    pub harvested: u64,
    /// Expected pages not harvested: must be empty.
    pub missing: Vec<u64>,
    /// Pages harvested beyond the expected ones, with their reasons.
    pub extra: Vec<Extra>,
    /// Harvest time, µs.
    pub harvest_us: f64,
    /// KVM reported a possibly overflowed ring (then every page counts).
    pub ring_overflowed: bool,
    /// How long the guest's writes took, µs (guest TSC; 0 when unknown).
    pub guest_us: f64,
    /// Every page KVM reported for the guest this round.
    pub harvested_pages: Vec<PageRange>,
    /// Whether logging was on for this round (off: a warm-up round, or a
    /// `log=0` baseline; nothing was harvested).
    pub logged: bool,
}

/// Where in the run a mapping sample was taken.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Before logging was switched on.
    BeforeLogging,
    /// While logging was on.
    Logging,
    /// After logging was switched off.
    AfterLogging,
}

/// KVM's mapping sizes at one moment (binary stats).
#[derive(Debug, Clone, Serialize)]
pub struct MappingSample {
    /// When: "before logging", "round N", "after logging".
    pub phase: String,
    /// The stage `phase` belongs to.
    pub stage: Stage,
    /// 4 KiB leaves.
    pub pages_4k: Option<u64>,
    /// 2 MiB leaves.
    pub pages_2m: Option<u64>,
    /// 1 GiB leaves.
    pub pages_1g: Option<u64>,
}

/// What logging did to KVM's 2 MiB mappings, from the samples.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HugeSplit {
    /// 2 MiB mappings right before logging was switched on.
    pub before: Option<u64>,
    /// Fewest 2 MiB mappings while logging.
    pub during_min: Option<u64>,
    /// 2 MiB mappings at the end, after logging (the guest touched its
    /// buffer again).
    pub after: Option<u64>,
    /// before − fewest during: mappings split to 4 KiB by logging.
    pub split: Option<u64>,
    /// Whether the count got back to at least `before`.
    pub recovered: Option<bool>,
}

/// Summarises the 2 MiB mapping samples: the last one before logging, the
/// fewest while logging, the last one after it.
#[must_use]
pub fn huge_split(samples: &[MappingSample]) -> HugeSplit {
    let last_of = |stage: Stage| samples.iter().rev().find(|m| m.stage == stage).and_then(|m| m.pages_2m);
    let before = last_of(Stage::BeforeLogging);
    let after = last_of(Stage::AfterLogging);
    let during_min = samples.iter().filter(|m| m.stage == Stage::Logging).filter_map(|m| m.pages_2m).min();
    HugeSplit {
        before,
        during_min,
        after,
        split: before.zip(during_min).map(|(b, d)| b.saturating_sub(d)),
        recovered: before.zip(after).map(|(b, a)| a >= b),
    }
}

/// The whole dirty workload report (`--dirty-report FILE`).
#[derive(Debug, Clone, Serialize)]
pub struct DirtyReport {
    /// Mechanism.
    pub mode: DirtyMode,
    /// The workload's parameters.
    pub workload: DirtyWorkload,
    /// The buffer's first guest page frame.
    pub buffer_pfn: u64,
    /// Each round.
    pub rounds: Vec<RoundRecord>,
    /// KVM mapping sizes before, during and after logging.
    pub mappings: Vec<MappingSample>,
    /// What logging did to 2 MiB mappings.
    pub huge_split: HugeSplit,
    /// Dirty-ring entries collected from each vCPU's ring, in vCPU order
    /// (empty for the bitmap mechanisms).
    pub ring_entries_per_vcpu: Vec<u64>,
}

/// Follows a dirty workload's events.
#[derive(Debug)]
pub struct DirtyRounds {
    workload: DirtyWorkload,
    tsc_khz: u64,
    regions: Vec<(u64, u64)>,
    buffer: Option<(u64, u64)>,
    rounds: Vec<RoundRecord>,
    mappings: Vec<MappingSample>,
    stats: Option<StatsFd>,
}

impl DirtyRounds {
    /// For the workload `workload`; `tsc_khz` converts the guest's round
    /// times.
    #[must_use]
    pub fn new(workload: DirtyWorkload, tsc_khz: u64, stats: Option<StatsFd>) -> Self {
        DirtyRounds { workload, tsc_khz, regions: Vec::new(), buffer: None, rounds: Vec::new(), mappings: Vec::new(), stats }
    }

    fn logging(&self) -> bool {
        self.workload.log
    }

    fn warmup(&self) -> u64 {
        self.workload.warmup
    }

    fn sample(&mut self, phase: String, stage: Stage) {
        let snap = self.stats.as_ref().and_then(|s| s.snapshot().ok());
        let get = |n: &str| snap.as_ref().and_then(|s| s.value(n));
        self.mappings.push(MappingSample { phase, stage, pages_4k: get("pages_4k"), pages_2m: get("pages_2m"), pages_1g: get("pages_1g") });
    }

    /// Samples the mappings as `phase`, then switches logging on when the
    /// workload logs at all.
    fn start_logging(&mut self, phase: String, tracker: &mut DirtyTracker, vm: &kvm_ioctls::VmFd, ram: &GuestRam) -> Result<(), DirtyError> {
        self.sample(phase, Stage::BeforeLogging);
        if self.logging() {
            tracker.start(vm, ram)?;
        }
        Ok(())
    }

    /// Handles one workload event.
    ///
    /// # Errors
    /// [`DirtyError`] when harvesting fails.
    pub fn on_event(&mut self, event: Event, a: u64, b: u64, tracker: &mut DirtyTracker, vm: &kvm_ioctls::VmFd, ram: &GuestRam) -> Result<(), DirtyError> {
        match event {
            // A guest declares a handful; more are ignored, so a guest
            // cannot grow the VMM's memory with them.
            Event::KernelRegion if self.regions.len() < MAX_REGIONS => self.regions.push((a, b)),
            Event::KernelRegion => {}
            Event::BufferReady => {
                // Guest-supplied: only used if it lies in RAM.
                let last = b.checked_sub(1).and_then(|n| n.checked_mul(4096)).and_then(|n| a.checked_add(n));
                if ram.ram_offset_of(a).is_some() && last.is_some_and(|l| ram.ram_offset_of(l).is_some()) {
                    self.buffer = Some((a >> 12, b));
                }
                if self.warmup() == 0 {
                    self.start_logging("before logging".into(), tracker, vm, ram)?;
                } else {
                    self.sample("before warm-up".into(), Stage::BeforeLogging);
                }
            }
            Event::RoundDone => {
                let guest_us = if self.tsc_khz == 0 { 0.0 } else { b as f64 * 1000.0 / self.tsc_khz as f64 };
                if !self.logging() || a < self.warmup() {
                    let mut record = self.check_round(a, &[], &[], 0.0, false);
                    record.missing.clear();
                    record.guest_us = guest_us;
                    record.logged = false;
                    if self.rounds.len() < MAX_ROUNDS {
                        self.rounds.push(record);
                    }
                    if a.saturating_add(1) == self.warmup() {
                        self.start_logging(format!("before logging (after {} warm-up rounds)", self.warmup()), tracker, vm, ram)?;
                    }
                    return Ok(());
                }
                let t = std::time::Instant::now();
                let h = tracker.harvest(vm, ram)?;
                let harvest_us = t.elapsed().as_secs_f64() * 1e6;
                self.sample(format!("round {a}"), Stage::Logging);
                let mut record = self.check_round(a, &h.guest, &h.vmm, harvest_us, h.ring_overflowed);
                record.guest_us = guest_us;
                if self.rounds.len() < MAX_ROUNDS {
                    self.rounds.push(record);
                }
                if a.saturating_add(1) >= self.workload.rounds {
                    tracker.stop(vm, ram)?;
                }
            }
            // Other workloads' events.
            _ => {}
        }
        Ok(())
    }

    /// Called when the run ends: the last mapping sample.
    pub fn finish(&mut self) {
        self.sample("after logging (guest touched its buffer again)".into(), Stage::AfterLogging);
    }

    fn check_round(&self, round: u64, guest: &[PageRange], vmm: &[PageRange], harvest_us: f64, ring_overflowed: bool) -> RoundRecord {
        let (pages, seed) = (self.workload.pages, self.workload.seed);
        let (base, buffer_pages) = self.buffer.unwrap_or((0, 0));
        let expected: BTreeSet<u64> = (0..pages).map(|i| base.saturating_add(dirty_page(seed, round, i, buffer_pages))).collect();
        let harvested: BTreeSet<u64> = guest.iter().flat_map(|r| r.first..r.end()).collect();
        let vmm_pages: BTreeSet<u64> = vmm.iter().flat_map(|r| r.first..r.end()).collect();
        let missing: Vec<u64> = expected.difference(&harvested).copied().collect();
        let mut extra: Vec<Extra> = Vec::new();
        let mut add = |reason: &str, page: u64| match extra.iter_mut().find(|e| e.reason == reason) {
            Some(e) => e.pages.push(page),
            None => extra.push(Extra { reason: reason.to_string(), pages: vec![page] }),
        };
        for &p in harvested.difference(&expected) {
            let gpa = p << 12;
            let region = self.regions.iter().position(|&(start, len)| gpa >= start && gpa < start.saturating_add(len));
            match region {
                Some(i) => add(REGION_REASONS.get(i).copied().unwrap_or("guest kernel bookkeeping"), p),
                None if ring_overflowed => add("dirty ring overflowed: every page reported", p),
                None => add("unexplained", p),
            }
        }
        for &p in &vmm_pages {
            add("written by the VMM", p);
        }
        RoundRecord {
            round,
            expected: expected.len() as u64,
            harvested: harvested.len() as u64,
            missing,
            extra,
            harvest_us,
            ring_overflowed,
            guest_us: 0.0,
            harvested_pages: guest.to_vec(),
            logged: true,
        }
    }

    /// The report.
    #[must_use]
    pub fn report(&self, mode: DirtyMode) -> DirtyReport {
        DirtyReport {
            mode,
            workload: self.workload,
            buffer_pfn: self.buffer.map_or(0, |b| b.0),
            rounds: self.rounds.clone(),
            huge_split: huge_split(&self.mappings),
            ring_entries_per_vcpu: Vec::new(),
            mappings: self.mappings.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_splits_and_recovery_are_computed_from_samples() {
        let s = |stage: Stage, m2: u64| MappingSample { phase: String::new(), stage, pages_4k: Some(0), pages_2m: Some(m2), pages_1g: Some(0) };
        use Stage::{AfterLogging as After, BeforeLogging as Before, Logging as During};
        let h = huge_split(&[s(Before, 10), s(During, 4), s(During, 6), s(After, 10)]);
        assert_eq!((h.split, h.recovered), (Some(6), Some(true)));
        let h = huge_split(&[s(Before, 10), s(During, 10), s(After, 3)]);
        assert_eq!((h.split, h.recovered), (Some(0), Some(false)));
        assert_eq!(huge_split(&[]).split, None);
        // After warm-up rounds the last sample before logging counts, not
        // the first (taken before the guest touched anything).
        let h = huge_split(&[s(Before, 0), s(Before, 8), s(During, 1), s(After, 2)]);
        assert_eq!(h, HugeSplit { before: Some(8), during_min: Some(1), after: Some(2), split: Some(7), recovered: Some(false) });
    }

    #[test]
    fn rounds_classify_extras_and_misses() {
        let w = DirtyWorkload { pages: 10, rounds: 2, seed: 7, buffer: 64, log: true, warmup: 0 };
        let mut d = DirtyRounds::new(w, 0, None);
        d.buffer = Some((0x1000, 64));
        d.regions = vec![(0x10_0000, 0x1000)];
        let expected: Vec<u64> = (0..10).map(|i| 0x1000 + dirty_page(7, 0, i, 64)).collect();
        let mut guest: Vec<PageRange> = expected.iter().skip(1).map(|&p| PageRange { first: p, count: 1 }).collect();
        guest.push(PageRange { first: 0x100, count: 1 }); // kernel region
        guest.push(PageRange { first: 0x9999, count: 1 }); // nobody's
        guest.sort();
        let r = d.check_round(0, &guest, &[PageRange { first: 5, count: 1 }], 1.0, false);
        assert_eq!(r.missing, vec![expected[0]].into_iter().filter(|p| !expected[1..].contains(p)).collect::<Vec<_>>());
        let reasons: Vec<&str> = r.extra.iter().map(|e| e.reason.as_str()).collect();
        assert!(reasons.contains(&REGION_REASONS[0]));
        assert!(reasons.contains(&"unexplained"));
        assert!(reasons.contains(&"written by the VMM"));
    }
}
