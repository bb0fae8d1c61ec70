//! What a run's CPUs did: the guest's per-CPU figures beside KVM's per-vCPU
//! statistics, and the TLB shootdown workload's summary.
//!
//! The guest reports `CpuOnline` when an application processor comes up
//! and one `CpuStats` per CPU before it ends (`memvisor_abi::msg`); both are
//! guest input, so a CPU index beyond the VM's vCPUs is ignored, never
//! indexed. Guest times are TSC ticks, converted with the TSC frequency
//! KVM reports (the guest's TSC is the host's on KVM).

use std::fmt::Write as _;

use memvisor_abi::msg::{CpuStats, Report};
use memvisor_abi::workload::Event;

use crate::host::TranslationMode;
use crate::machine::{RunOutcome, TimedReport};
use crate::workload::{ShootdownMode, ShootdownSkip, ShootdownWorkload, ShootdownWriter, Workload};

/// One CPU's figures.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CpuFigures {
    /// The CPU (vCPU index).
    pub cpu: u32,
    /// When the guest reported it online (ms from process start; the boot
    /// CPU: its first report).
    pub online_ms: Option<f64>,
    /// The guest's counters (absent if the guest never reported them).
    pub guest: Option<GuestCpuCounters>,
    /// Milliseconds it spent in ring-3 tasks.
    pub task_ms: Option<f64>,
    /// KVM's exits of this vCPU.
    pub kvm_exits: Option<u64>,
}

/// The guest's counters of one CPU (`memvisor_abi::msg::CpuStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuestCpuCounters {
    /// Ring-3 tasks run.
    pub tasks: u64,
    /// TSC ticks spent in them.
    pub task_tsc: u64,
    /// Bytes the self-test's RAM task verified on this CPU.
    pub selftest_bytes: u64,
    /// IPIs taken.
    pub ipis_received: u64,
    /// Shootdown requests carried out and acknowledged.
    pub shootdowns_acked: u64,
    /// Shootdowns started.
    pub shootdowns_sent: u64,
    /// IPIs sent.
    pub ipis_sent: u64,
}

impl From<CpuStats> for GuestCpuCounters {
    fn from(s: CpuStats) -> Self {
        GuestCpuCounters {
            tasks: s.tasks,
            task_tsc: s.task_tsc,
            selftest_bytes: s.selftest_bytes,
            ipis_received: s.ipis_received,
            shootdowns_acked: s.shootdowns_acked,
            shootdowns_sent: s.shootdowns_sent,
            ipis_sent: s.ipis_sent,
        }
    }
}

fn ticks_ms(ticks: u64, tsc_khz: u64) -> Option<f64> {
    (tsc_khz > 0).then(|| ticks as f64 / tsc_khz as f64)
}

fn ticks_us(ticks: u64, tsc_khz: u64) -> Option<f64> {
    ticks_ms(ticks, tsc_khz).map(|ms| ms * 1000.0)
}

/// Every vCPU's figures, in index order.
#[must_use]
pub fn cpus(outcome: &RunOutcome) -> Vec<CpuFigures> {
    let n = outcome.config.vcpus as usize;
    let mut out: Vec<CpuFigures> = (0..n)
        .map(|i| CpuFigures {
            cpu: i as u32,
            online_ms: if i == 0 { outcome.timings.first_report_us.map(|us| us / 1000.0) } else { None },
            kvm_exits: outcome.kvm_stats.vcpu_value(i, "exits"),
            ..CpuFigures::default()
        })
        .collect();
    for r in &outcome.reports {
        match r.report {
            Report::CpuOnline { cpu, .. } => {
                if let Some(c) = out.get_mut(cpu as usize) {
                    c.online_ms = Some(r.at_us / 1000.0);
                }
            }
            Report::CpuStats { cpu, stats } => {
                if let Some(c) = out.get_mut(cpu as usize) {
                    c.task_ms = ticks_ms(stats.task_tsc, outcome.tsc_khz);
                    c.guest = Some(stats.into());
                }
            }
            _ => {}
        }
    }
    out
}

/// Minimum, median and maximum, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latency {
    /// Fastest.
    pub min_us: f64,
    /// Median (the lower middle of an even count).
    pub median_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// `samples` (TSC ticks) as min/median/max µs; `None` when empty or the
/// TSC frequency is unknown.
#[must_use]
pub fn latency(samples: &[u64], tsc_khz: u64) -> Option<Latency> {
    let mut v = samples.to_vec();
    v.sort_unstable();
    let (first, last) = (*v.first()?, *v.last()?);
    let mid = v[(v.len() - 1) / 2];
    Some(Latency { min_us: ticks_us(first, tsc_khz)?, median_us: ticks_us(mid, tsc_khz)?, max_us: ticks_us(last, tsc_khz)? })
}

/// One reader CPU's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReaderResult {
    /// The CPU.
    pub cpu: u64,
    /// Checks it made after a change was published.
    pub checks: u64,
    /// Of those, how many still saw the old translation.
    pub stale: u64,
}

/// The shootdown workload's summary.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShootdownSummary {
    /// What ran.
    pub workload: String,
    /// Changes made (rounds).
    pub rounds: u64,
    /// Shootdowns that interrupted at least one CPU.
    pub shootdowns: u64,
    /// IPIs they sent.
    pub ipis: u64,
    /// Latency from the PTE change to the last acknowledgement.
    pub latency: Option<Latency>,
    /// Each reader's checks.
    pub readers: Vec<ReaderResult>,
    /// Stale observations, all readers.
    pub stale: u64,
    /// What the run shows, in one sentence.
    pub verdict: String,
}

/// Builds the summary from the guest's events.
#[must_use]
pub fn shootdown_summary(w: &ShootdownWorkload, reports: &[TimedReport], tsc_khz: u64, mode: TranslationMode) -> ShootdownSummary {
    let mut samples = Vec::new();
    let (mut shootdowns, mut ipis, mut rounds) = (0, 0, 0);
    let mut readers = Vec::new();
    for r in reports {
        if let Report::Workload { event, a, b } = r.report {
            match event {
                Event::ShootdownSample => {
                    rounds += 1;
                    if b > 0 {
                        samples.push(a);
                        shootdowns += 1;
                        ipis += b;
                    }
                }
                Event::ShootdownReader => readers.push(ReaderResult { cpu: a, checks: b, stale: 0 }),
                Event::ShootdownStale => {
                    if let Some(x) = readers.iter_mut().rev().find(|x| x.cpu == a) {
                        x.stale = b;
                    }
                }
                _ => {}
            }
        }
    }
    let stale: u64 = readers.iter().map(|r| r.stale).sum();
    let checks: u64 = readers.iter().map(|r| r.checks).sum();
    let what = match w.mode {
        ShootdownMode::Remap => "a reader read the old frame after the page was remapped",
        ShootdownMode::WriteProtect => "a reader's write went through after the page was write-protected",
    };
    let verdict = if readers.is_empty() {
        "no reader ran (one CPU: nothing to shoot down)".to_string()
    } else if w.skip == ShootdownSkip::None {
        if stale == 0 {
            format!("with shootdowns: never stale ({checks} checks)")
        } else {
            format!("with shootdowns: STALE {stale} times in {checks} checks ({what})")
        }
    } else {
        let without = match w.skip {
            ShootdownSkip::Ipi => "without IPIs (the writer flushed only its own TLB)",
            _ => "without any flush",
        };
        if stale > 0 {
            format!("{without}: stale {stale} times in {checks} checks ({what})")
        } else if let Some(why) = why_not_observable(w, mode) {
            format!("{without}: not observable on shadow paging ({checks} checks): {why}")
        } else {
            format!("{without}: no stale translation seen in {checks} checks (the readers' TLBs happened not to hold the old entry)")
        }
    };
    ShootdownSummary { workload: Workload::Shootdown(*w).to_string(), rounds, shootdowns, ipis, latency: latency(&samples, tsc_khz), readers, stale, verdict }
}

/// Why a skipped shootdown cannot show a stale translation on this host,
/// when there is a reason (docs/smp.md has the experiments behind each).
#[must_use]
pub fn why_not_observable(w: &ShootdownWorkload, mode: TranslationMode) -> Option<&'static str> {
    if mode.is_pvm() && w.writer == ShootdownWriter::Kernel {
        Some(
            "this host emulates the guest kernel's instructions, and KVM's emulator hands every store into a guest page table to the shadow MMU, which updates the shadow entries of every vCPU at once (writer=user makes the stores natively)",
        )
    } else if mode.is_shadow() && w.skip == ShootdownSkip::Ipi {
        Some(
            "the writer's own invlpg resynchronises KVM's shadow copy of the leaf table, which every vCPU running in this address space shares, and KVM then flushes them all; a hardware TLB keeps each CPU's entries apart (skip=2 leaves out that invlpg too)",
        )
    } else {
        None
    }
}

/// The shootdown summary of a run of that workload.
#[must_use]
pub fn outcome_shootdown(outcome: &RunOutcome) -> Option<ShootdownSummary> {
    match outcome.config.workload {
        Some(Workload::Shootdown(w)) => Some(shootdown_summary(&w, &outcome.reports, outcome.tsc_khz, outcome.translation_mode)),
        _ => None,
    }
}

/// The report's lines: one per CPU, and the shootdown summary.
#[must_use]
pub fn text(outcome: &RunOutcome) -> String {
    let mut s = String::new();
    let figures = cpus(outcome);
    if figures.iter().any(|c| c.guest.is_some()) {
        let _ = writeln!(s, "CPUs (guest's figures):");
        for c in &figures {
            let online = c.online_ms.map_or("never reported online".to_string(), |ms| format!("online at {ms:.2} ms"));
            match &c.guest {
                Some(g) => {
                    let _ = writeln!(
                        s,
                        "  CPU {}: {online}; {} ring-3 tasks for {}, self-test verified {}; IPIs received {}, sent {}; shootdowns acknowledged {}, started {}",
                        c.cpu,
                        g.tasks,
                        c.task_ms.map_or(format!("{} TSC ticks", g.task_tsc), |ms| format!("{ms:.1} ms")),
                        crate::size::format_size(g.selftest_bytes),
                        g.ipis_received,
                        g.ipis_sent,
                        g.shootdowns_acked,
                        g.shootdowns_sent
                    );
                }
                None => {
                    let _ = writeln!(s, "  CPU {}: {online}; no figures reported", c.cpu);
                }
            }
        }
    }
    if let Some(sd) = outcome_shootdown(outcome) {
        let _ = writeln!(s, "TLB shootdown ({}): {} rounds, {} shootdowns, {} IPIs", sd.workload, sd.rounds, sd.shootdowns, sd.ipis);
        if let Some(l) = sd.latency {
            let _ = writeln!(s, "  shootdown latency (PTE change to last ack): min {:.1} µs, median {:.1} µs, max {:.1} µs", l.min_us, l.median_us, l.max_us);
        }
        for r in &sd.readers {
            let _ = writeln!(s, "  reader CPU {}: {} checks, {} stale", r.cpu, r.checks, r.stale);
        }
        let _ = writeln!(s, "  {}", sd.verdict);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_min_median_max_in_microseconds() {
        // 1 MHz TSC: one tick is one microsecond.
        let l = latency(&[30, 10, 20, 40], 1000).unwrap();
        assert_eq!((l.min_us, l.median_us, l.max_us), (10.0, 20.0, 40.0));
        assert!(latency(&[], 1000).is_none());
        assert!(latency(&[5], 0).is_none());
    }
}
