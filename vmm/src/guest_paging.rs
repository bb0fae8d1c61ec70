//! The VMM's side of the guest-paging workloads (issue 6): regenerating the
//! guest's access trace, Belady's optimal replacement over it, replaying the
//! guest's own policy to predict its counters, and the summaries the run
//! report prints.
//!
//! The guest does not report its trace: access `i` is
//! `memvisor_abi::paging::access(pattern, seed, i, pages)` on both sides,
//! so the VMM rebuilds the same trace from the workload's parameters. OPT
//! and the replay are pure functions of that trace.

use std::collections::{BTreeSet, HashMap};

use memvisor_abi::msg::Report;
use memvisor_abi::paging::{Policy, access, is_write};
use memvisor_abi::workload::Event;
use memvisor_guest_mm::replace::{Counters, Replacer, Sim, SimPage};

use crate::machine::{RunOutcome, TimedReport};
use crate::workload::{PagingWorkload, Workload};

/// The accesses a paging workload makes: (page, writes?) in order.
#[must_use]
pub fn trace(pattern: u64, seed: u64, pages: u64, accesses: u64, write_pct: u64) -> Vec<(u64, bool)> {
    (0..accesses).map(|i| (access(pattern, seed, i, pages), is_write(seed, i, write_pct))).collect()
}

/// Faults of Belady's optimal policy (evict the page whose next use is
/// furthest away; Belady 1966) on `pages` with `frames` frames.
#[must_use]
pub fn opt_faults(pages: &[u64], frames: usize) -> u64 {
    if frames == 0 {
        return pages.len() as u64;
    }
    // next[i]: the index of the next access to pages[i] after i.
    let mut next = vec![usize::MAX; pages.len()];
    let mut last: HashMap<u64, usize> = HashMap::new();
    for (i, p) in pages.iter().enumerate().rev() {
        next[i] = last.get(p).copied().unwrap_or(usize::MAX);
        last.insert(*p, i);
    }
    let mut resident: HashMap<u64, usize> = HashMap::new();
    let mut by_next: BTreeSet<(usize, u64)> = BTreeSet::new();
    let mut faults = 0;
    for (i, &p) in pages.iter().enumerate() {
        if let Some(n) = resident.get(&p) {
            by_next.remove(&(*n, p));
        } else {
            faults += 1;
            if resident.len() == frames
                && let Some((_, victim)) = by_next.pop_last()
            {
                resident.remove(&victim);
            }
        }
        resident.insert(p, next[i]);
        by_next.insert((next[i], p));
    }
    faults
}

/// The guest's counters as the guest kernel would produce them for `trace`
/// under `policy` with `frames` frames (the guest's own replacement code,
/// replayed with the A and D bits an access sets).
#[must_use]
pub fn replay(policy: Policy, frames: usize, pages: usize, trace: &[(u64, bool)]) -> Counters {
    let (mut age, mut loaded) = (vec![0; frames], vec![0; frames]);
    let mut state = vec![SimPage::default(); pages];
    let mut owner = vec![None; frames];
    let mut sim = Sim::new(Replacer::new(policy, &mut age, &mut loaded), &mut state, &mut owner);
    for &(p, w) in trace {
        sim.access(usize::try_from(p).unwrap_or(usize::MAX), w);
    }
    sim.counters
}

/// What the guest reported for a paging run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuestCounters {
    /// Faults on never-touched pages.
    pub minor_faults: u64,
    /// Faults read back from swap.
    pub major_faults: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Dirty pages written to swap.
    pub dirty_writebacks: u64,
    /// Recycled frames zeroed by the swap device.
    pub frames_zeroed: u64,
    /// Time in the guest's page-fault handler (µs, guest TSC).
    pub handler_us: u64,
    /// Accesses the task made and checked.
    pub accesses_checked: u64,
    /// Accesses that read other data than the page's last write.
    pub mismatches: u64,
}

/// A fault that killed the task.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Killed {
    /// "protection" or "invalid".
    pub kind: &'static str,
    /// Faulting address.
    pub address: u64,
    /// Page-fault error code.
    pub error_code: u64,
}

/// One 4 KiB copy and one zeroing, timed by the guest at ring 0 and
/// through the swap device (`measure=1`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyCost {
    /// ns for a copy at ring 0 (`rep movsq`).
    pub ring0_copy_ns: u64,
    /// ns for a copy by the swap device (one exit and a native copy).
    pub device_copy_ns: u64,
    /// ns for zeroing at ring 0 (`rep stosq`).
    pub ring0_zero_ns: u64,
    /// ns for zeroing by the swap device.
    pub device_zero_ns: u64,
}

/// A paging run: parameters, the guest's counters, the VMM's prediction
/// from the same trace, and Belady's OPT.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PagingSummary {
    /// Replacement policy.
    pub policy: &'static str,
    /// Access pattern.
    pub pattern: &'static str,
    /// Frames the guest could use.
    pub frames: u64,
    /// Pages of the region.
    pub pages: u64,
    /// Accesses.
    pub accesses: u64,
    /// Percentage of accesses that write.
    pub write_percent: u64,
    /// The seed of the pattern.
    pub seed: u64,
    /// What the guest counted.
    pub guest: GuestCounters,
    /// Faults per access, as the guest counted them.
    pub fault_rate: f64,
    /// What the VMM's replay of the guest's policy predicts: all faults.
    pub predicted_faults: u64,
    /// Predicted minor faults (first touches, zero-filled).
    pub predicted_minor_faults: u64,
    /// Predicted major faults (read back from swap).
    pub predicted_major_faults: u64,
    /// Predicted evictions.
    pub predicted_evictions: u64,
    /// Predicted dirty write-backs.
    pub predicted_writebacks: u64,
    /// Whether minor faults, major faults, evictions and write-backs all
    /// match the prediction.
    pub matches_prediction: bool,
    /// Faults of Belady's OPT on the same trace.
    pub opt_faults: u64,
    /// OPT's faults per access.
    pub opt_fault_rate: f64,
    /// The fault that killed the task, if one did.
    pub killed: Option<Killed>,
    /// Copy and zeroing costs, when measured.
    pub copy_cost: Option<CopyCost>,
}

/// A copy-on-write run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CowSummary {
    /// Pages of the region.
    pub pages: u64,
    /// Pages copied on a write fault.
    pub copies: u64,
    /// Write faults that found the frame no longer shared.
    pub reuses: u64,
    /// Copies the workload's writes imply: the parent's writes to the even
    /// pages each copy; the child's writes to pages divisible by 3 copy
    /// unless the parent copied that page already.
    pub expected_copies: u64,
    /// Write faults that should only restore write access.
    pub expected_reuses: u64,
    /// Stack pages copied on a write fault (fork shares the stack
    /// copy-on-write too; how many depends on the compiled code's stack use).
    pub stack_copies: u64,
    /// Stack write faults that only restored write access.
    pub stack_reuses: u64,
    /// Pages where the parent saw other data than its own (None: no report).
    pub parent_mismatches: Option<u64>,
    /// Pages where the child saw other data than its own.
    pub child_mismatches: Option<u64>,
}

fn events(reports: &[TimedReport]) -> impl Iterator<Item = (Event, u64, u64)> + '_ {
    reports.iter().filter_map(|r| match r.report {
        Report::Workload { event, a, b } => Some((event, a, b)),
        _ => None,
    })
}

/// The paging summary of a run of the paging workload `w`.
#[must_use]
pub fn paging_summary(w: &PagingWorkload, reports: &[TimedReport]) -> PagingSummary {
    let PagingWorkload { policy, frames, pattern, pages, accesses, seed, write_percent, .. } = *w;
    let mut g = GuestCounters::default();
    let mut killed = None;
    let mut cost: Option<CopyCost> = None;
    for (event, a, b) in events(reports) {
        match event {
            Event::PagingCopyCost => (cost.get_or_insert_default().ring0_copy_ns, cost.get_or_insert_default().device_copy_ns) = (a, b),
            Event::PagingZeroCost => (cost.get_or_insert_default().ring0_zero_ns, cost.get_or_insert_default().device_zero_ns) = (a, b),
            Event::PagingFaults => (g.minor_faults, g.major_faults) = (a, b),
            Event::PagingEvictions => (g.evictions, g.dirty_writebacks) = (a, b),
            Event::PagingCost => (g.frames_zeroed, g.handler_us) = (a, b),
            Event::PagingChecked => (g.accesses_checked, g.mismatches) = (a, b),
            Event::ProtectionFault => killed = Some(Killed { kind: "protection", address: a, error_code: b }),
            Event::InvalidAccess => killed = Some(Killed { kind: "invalid", address: a, error_code: b }),
            _ => {}
        }
    }
    let t = trace(pattern as u64, seed, pages, accesses, write_percent);
    let frames_n = usize::try_from(frames).unwrap_or(usize::MAX);
    let predicted = replay(policy, frames_n, usize::try_from(pages).unwrap_or(0), &t);
    let opt = opt_faults(&t.iter().map(|(p, _)| *p).collect::<Vec<_>>(), frames_n);
    let faults = g.minor_faults + g.major_faults;
    let rate = |f: u64| if accesses == 0 { 0.0 } else { f as f64 / accesses as f64 };
    let matches_prediction = (g.minor_faults, g.major_faults, g.evictions, g.dirty_writebacks)
        == (predicted.minor, predicted.major, predicted.evictions, predicted.writebacks);
    PagingSummary {
        policy: policy.name(),
        pattern: pattern.name(),
        frames,
        pages,
        accesses,
        write_percent,
        seed,
        fault_rate: rate(faults),
        predicted_faults: predicted.faults(),
        predicted_minor_faults: predicted.minor,
        predicted_major_faults: predicted.major,
        predicted_evictions: predicted.evictions,
        predicted_writebacks: predicted.writebacks,
        matches_prediction,
        opt_faults: opt,
        opt_fault_rate: rate(opt),
        guest: g,
        killed,
        copy_cost: cost,
    }
}

/// The copies and reuses the cow workload's writes imply for `pages`.
#[must_use]
pub fn cow_expected(pages: u64) -> (u64, u64) {
    let parent = pages.div_ceil(2);
    let child_odd = (0..pages).filter(|p| p % 3 == 0 && p % 2 == 1).count() as u64;
    let child_even = (0..pages).filter(|p| p % 6 == 0).count() as u64;
    (parent + child_odd, child_even)
}

/// The cow summary of a run of the cow workload over `pages` pages.
#[must_use]
pub fn cow_summary(pages: u64, reports: &[TimedReport]) -> CowSummary {
    let (expected_copies, expected_reuses) = cow_expected(pages);
    let mut s = CowSummary {
        pages,
        copies: 0,
        reuses: 0,
        expected_copies,
        expected_reuses,
        stack_copies: 0,
        stack_reuses: 0,
        parent_mismatches: None,
        child_mismatches: None,
    };
    for (event, a, b) in events(reports) {
        match event {
            Event::CowCopies => (s.copies, s.reuses) = (a, b),
            Event::CowStackCopies => (s.stack_copies, s.stack_reuses) = (a, b),
            Event::CowChecked if a == 0 => s.parent_mismatches = Some(b),
            Event::CowChecked => s.child_mismatches = Some(b),
            _ => {}
        }
    }
    s
}

/// The paging summary of a run, if it ran the paging workload.
#[must_use]
pub fn outcome_paging(outcome: &RunOutcome) -> Option<PagingSummary> {
    match &outcome.config.workload {
        Some(Workload::Paging(w)) => Some(paging_summary(w, &outcome.reports)),
        _ => None,
    }
}

/// The cow summary of a run, if it ran the cow workload.
#[must_use]
pub fn outcome_cow(outcome: &RunOutcome) -> Option<CowSummary> {
    match outcome.config.workload {
        Some(Workload::Cow { pages }) => Some(cow_summary(pages, &outcome.reports)),
        _ => None,
    }
}

/// The text report's lines for the guest-paging workloads (empty otherwise).
#[must_use]
pub fn text(outcome: &RunOutcome) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if let Some(p) = outcome_paging(outcome) {
        let g = &p.guest;
        let faults = g.minor_faults + g.major_faults;
        let _ = writeln!(
            s,
            "guest paging: policy {}, pattern {}, {} frames for {} pages, {} accesses ({} % writes, seed {})",
            p.policy, p.pattern, p.frames, p.pages, p.accesses, p.write_percent, p.seed
        );
        let _ = writeln!(
            s,
            "  faults {faults} ({} minor, {} major), fault rate {:.3}; evictions {}, dirty write-backs {}, recycled frames zeroed {}",
            g.minor_faults, g.major_faults, p.fault_rate, g.evictions, g.dirty_writebacks, g.frames_zeroed
        );
        let per_fault = if faults == 0 { 0.0 } else { g.handler_us as f64 / faults as f64 };
        let _ = writeln!(s, "  fault handler: {} µs in all, {per_fault:.0} µs per fault (guest TSC)", g.handler_us);
        let _ = writeln!(
            s,
            "  VMM replay of the policy: {} faults ({} minor, {} major), {} evictions, {} write-backs ({}); Belady's OPT: {} faults, rate {:.3}",
            p.predicted_faults,
            p.predicted_minor_faults,
            p.predicted_major_faults,
            p.predicted_evictions,
            p.predicted_writebacks,
            if p.matches_prediction { "matches the guest" } else { "DIFFERS from the guest" },
            p.opt_faults,
            p.opt_fault_rate
        );
        let _ = writeln!(s, "  data check: {} accesses, {} mismatches", g.accesses_checked, g.mismatches);
        if let Some(c) = &p.copy_cost {
            let _ = writeln!(
                s,
                "  one 4 KiB page: copy {:.1} µs at ring 0 vs {:.1} µs by the swap device; zeroing {:.1} µs vs {:.1} µs",
                c.ring0_copy_ns as f64 / 1000.0,
                c.device_copy_ns as f64 / 1000.0,
                c.ring0_zero_ns as f64 / 1000.0,
                c.device_zero_ns as f64 / 1000.0
            );
        }
        if let Some(k) = &p.killed {
            let _ = writeln!(s, "  task killed: {} fault at {:#x}, error code {:#x}", k.kind, k.address, k.error_code);
        }
    }
    if let Some(c) = outcome_cow(outcome) {
        let show = |m: Option<u64>| m.map_or("no report".to_string(), |m| format!("{m} mismatches"));
        let _ = writeln!(
            s,
            "copy-on-write: {} pages; {} copies (expected {}), {} write faults on no-longer-shared frames (expected {}); stack {} copies, {} reuses; parent {}, child {}",
            c.pages,
            c.copies,
            c.expected_copies,
            c.reuses,
            c.expected_reuses,
            c.stack_copies,
            c.stack_reuses,
            show(c.parent_mismatches),
            show(c.child_mismatches)
        );
    }
    let d = &outcome.swap_device;
    if d.writes + d.reads + d.zeroes + d.copies + d.errors > 0 {
        let _ = writeln!(
            s,
            "swap device: {} writes, {} reads, {} frames zeroed, {} frames copied, {} refused; {} slots in use",
            d.writes, d.reads, d.zeroes, d.copies, d.errors, d.slots_used
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_abi::paging::Pattern;

    /// The reference string of Silberschatz, Galvin and Gagne's textbook.
    const BOOK: [u64; 20] = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1];

    fn reads(pages: &[u64]) -> Vec<(u64, bool)> {
        pages.iter().map(|p| (*p, false)).collect()
    }

    #[test]
    fn the_textbook_string_gives_the_textbook_fault_counts() {
        assert_eq!(opt_faults(&BOOK, 3), 9);
        assert_eq!(replay(Policy::Fifo, 3, 8, &reads(&BOOK)).faults(), 15);
        assert_eq!(replay(Policy::Lru, 3, 8, &reads(&BOOK)).faults(), 12);
    }

    #[test]
    fn opt_on_a_loop_faults_once_per_frames_accesses_after_the_first_pass() {
        for (frames, loops) in [(2usize, 2u64), (8, 4), (16, 10)] {
            let pages = frames as u64 + 1;
            let t: Vec<u64> = (0..pages * loops).map(|i| i % pages).collect();
            assert_eq!(opt_faults(&t, frames), pages + (pages * (loops - 1)) / frames as u64, "{frames} frames");
        }
    }

    #[test]
    fn opt_never_faults_more_than_any_policy() {
        for pattern in Pattern::ALL {
            let t = trace(pattern as u64, 7, 40, 3000, 50);
            let pages: Vec<u64> = t.iter().map(|(p, _)| *p).collect();
            let opt = opt_faults(&pages, 10);
            for policy in Policy::ALL {
                assert!(opt <= replay(policy, 10, 40, &t).faults(), "{pattern:?} {policy:?}");
            }
            assert_eq!(opt_faults(&pages, 40), 40.min(pages.iter().collect::<BTreeSet<_>>().len() as u64));
        }
        assert_eq!(opt_faults(&[1, 2, 3], 0), 3);
    }

    #[test]
    fn cow_expectations_follow_the_workload() {
        // 16 pages: parent copies 0,2,..,14 (8); child writes 0,3,6,9,12,15:
        // 3, 9, 15 copy, 0, 6, 12 only regain write access.
        assert_eq!(cow_expected(16), (11, 3));
        assert_eq!(cow_expected(1), (1, 1));
    }

    #[test]
    fn summaries_read_the_guest_events() {
        let Ok(Workload::Paging(spec)) = "paging:policy=fifo,frames=8,pattern=seq".parse() else { panic!("a paging workload") };
        let ev = |event, a, b| TimedReport { at_us: 0.0, report: Report::Workload { event, a, b } };
        let reports = [ev(Event::PagingChecked, 36, 0), ev(Event::PagingFaults, 9, 27), ev(Event::PagingEvictions, 28, 28), ev(Event::PagingCost, 1, 5000)];
        let s = paging_summary(&spec, &reports);
        assert!(s.matches_prediction, "{s:?}");
        assert_eq!((s.predicted_faults, s.opt_faults), (36, 9 + 27 / 8));
        assert_eq!((s.predicted_minor_faults, s.predicted_major_faults), (9, 27));
        // The same total split differently between minor and major is a mismatch.
        let split = [ev(Event::PagingChecked, 36, 0), ev(Event::PagingFaults, 10, 26), ev(Event::PagingEvictions, 28, 28)];
        assert!(!paging_summary(&spec, &split).matches_prediction);
        assert!((s.fault_rate - 1.0).abs() < 1e-9);
        let c = cow_summary(16, &[ev(Event::CowCopies, 11, 3), ev(Event::CowStackCopies, 2, 2), ev(Event::CowChecked, 1, 0)]);
        assert_eq!((c.copies, c.expected_copies, c.parent_mismatches, c.child_mismatches), (11, 11, None, Some(0)));
        assert_eq!((c.stack_copies, c.stack_reuses), (2, 2));
    }
}
