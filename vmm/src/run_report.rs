//! The report `vmm run` prints at the end: as text, or one JSON object.

use std::fmt::Write as _;

use memvisor_abi::msg::{CheckId, Report};
use memvisor_abi::workload::Event;

use crate::size::format_size;
use crate::machine::RunOutcome;

/// One self-test check, as printed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    /// Which check (snake-case name).
    pub check: String,
    /// Human description.
    pub description: &'static str,
    /// Pass or fail.
    pub passed: bool,
    /// Expected value.
    pub expected: u64,
    /// Observed value.
    pub got: u64,
    /// Faulting address, for fault checks.
    pub cr2: u64,
    /// Faulting instruction, for fault checks.
    pub rip: u64,
}

/// The self-test results in the outcome.
#[must_use]
pub fn checks(outcome: &RunOutcome) -> Vec<CheckResult> {
    outcome
        .reports
        .iter()
        .filter_map(|r| match r.report {
            Report::Check { id, passed, expected, got, cr2, rip } => Some(CheckResult {
                check: check_key(id).to_string(),
                description: id.name(),
                passed,
                expected,
                got,
                cr2,
                rip,
            }),
            _ => None,
        })
        .collect()
}

/// A stable machine name for a check.
#[must_use]
pub fn check_key(id: CheckId) -> &'static str {
    match id {
        CheckId::RamPattern => "ram_pattern",
        CheckId::ReadOnlyWrite => "read_only_write",
        CheckId::NxFetch => "nx_fetch",
        CheckId::UserReadsKernel => "user_reads_kernel",
        CheckId::Unmapped => "unmapped",
    }
}

/// The report as one JSON value.
#[must_use]
pub fn to_json(outcome: &RunOutcome) -> serde_json::Value {
    let mut page_tables = serde_json::Value::Null;
    let mut frames = serde_json::Value::Null;
    let mut guest_page_shift = serde_json::Value::Null;
    for r in &outcome.reports {
        match r.report {
            Report::PageTables { table_pages, leaves } => {
                page_tables = serde_json::json!({ "table_pages": table_pages, "leaves_4k": leaves[0], "leaves_2m": leaves[1], "leaves_1g": leaves[2] });
            }
            Report::Frames { ram_bytes, managed_bytes, free_bytes } => {
                frames = serde_json::json!({ "ram_bytes": ram_bytes, "managed_bytes": managed_bytes, "free_bytes": free_bytes });
            }
            Report::Ready { page_shift, has_1g_pages, .. } => {
                guest_page_shift = serde_json::json!({ "page_shift": page_shift, "cpu_has_1g_pages": has_1g_pages });
            }
            _ => {}
        }
    }
    let checks = checks(outcome);
    serde_json::json!({
        "exit_status": outcome.exit_status,
        "config": outcome.config,
        "translation_mode": outcome.translation_mode,
        "timings_us": outcome.timings,
        "boot_phases_us": outcome.boot_phases.iter().map(|(name, at)| serde_json::json!({ "phase": name, "at_us": at })).collect::<Vec<_>>(),
        "guest_paging": guest_page_shift,
        "self_test": {
            "passed": checks.iter().filter(|c| c.passed).count(),
            "failed": checks.iter().filter(|c| !c.passed).count(),
            "checks": checks,
        },
        "page_tables": page_tables,
        "guest_frames": frames,
        "memory": outcome.memory,
        "dirty": outcome.dirty,
        "balloon": outcome.balloon,
        "workload_events": outcome.reports.iter().filter_map(|r| match r.report {
            Report::Workload { event, a, b } => Some(serde_json::json!({ "event": format!("{event:?}"), "a": a, "b": b, "at_us": r.at_us })),
            _ => None,
        }).collect::<Vec<_>>(),
        "kvm_mappings": outcome.kvm_mappings,
        "kvm_stats": outcome.kvm_stats,
        "vmm_memory": outcome.vmm_memory,
        "bad_messages": outcome.bad_messages,
        "unhandled": outcome.unhandled,
        "paging_workload": crate::guest_paging::outcome_paging(outcome),
        "cow_workload": crate::guest_paging::outcome_cow(outcome),
        "cpus": crate::smp_report::cpus(outcome),
        "shootdown_workload": crate::smp_report::outcome_shootdown(outcome),
        "tsc_khz": outcome.tsc_khz,
        "swap_device": outcome.swap_device,
    })
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

/// The report as text.
#[must_use]
pub fn to_text(outcome: &RunOutcome) -> String {
    let mut s = String::new();
    let t = &outcome.timings;
    let _ = writeln!(s, "\n── memvisor report ──────────────────────────────────────────");
    let _ = writeln!(
        s,
        "guest: {} RAM, {} vCPU, guest pages {}, backing {}",
        format_size(outcome.config.mem_size),
        outcome.config.vcpus,
        outcome.config.guest_page,
        outcome.config.backing
    );
    let _ = writeln!(s, "translation: {}", outcome.translation_mode.describe());
    let _ = writeln!(
        s,
        "boot: vCPU start {}, first report {}, ready {}, end {} (from process start)",
        ms(t.vcpu_start_us),
        t.first_report_us.map_or("-".into(), ms),
        t.ready_us.map_or("-".into(), ms),
        ms(t.end_us)
    );
    for r in &outcome.reports {
        match r.report {
            Report::Ready { page_shift, has_1g_pages, .. } => {
                let _ = writeln!(s, "guest paging: leaf size {} (CPU 1 GiB pages: {})", format_size(1 << page_shift), if has_1g_pages { "yes" } else { "no" });
            }
            Report::PageTables { table_pages, leaves } => {
                let _ = writeln!(s, "page tables: {table_pages} table pages built; leaves 4K={} 2M={} 1G={}", leaves[0], leaves[1], leaves[2]);
            }
            Report::Frames { ram_bytes, managed_bytes, free_bytes } => {
                let _ = writeln!(
                    s,
                    "guest frames (buddy): RAM {}, managed {}, free {}",
                    format_size(ram_bytes),
                    format_size(managed_bytes),
                    format_size(free_bytes)
                );
            }
            _ => {}
        }
    }
    let checks = checks(outcome);
    if !checks.is_empty() {
        let _ = writeln!(s, "self-test:");
        for c in &checks {
            let detail = if c.check == "ram_pattern" {
                format!("{} of {} verified", format_size(c.got), format_size(c.expected))
            } else {
                format!("error code expected {:#x}, got {:#x}, cr2={:#x} rip={:#x}", c.expected, c.got, c.cr2, c.rip)
            };
            let _ = writeln!(s, "  [{}] {} ({detail})", if c.passed { "pass" } else { "FAIL" }, c.description);
        }
    }
    let _ = writeln!(s, "memory:");
    for (i, m) in outcome.memory.iter().enumerate() {
        let nodes: Vec<String> = m.placement.bytes_per_node.iter().map(|(n, b)| format!("node {n}: {}", format_size(*b))).collect();
        let _ = writeln!(
            s,
            "  region {i}: guest {:#x}-{:#x} host {:#x} backing {} policy {}",
            m.guest_start,
            m.guest_end,
            m.host_addr,
            m.backing,
            m.numa_policy.as_deref().unwrap_or("default")
        );
        let _ = writeln!(
            s,
            "            resident {}, huge pages {:.0}%, locked {}, measured placement: {}",
            format_size(m.resident_bytes),
            m.huge_coverage() * 100.0,
            format_size(m.locked_bytes),
            if nodes.is_empty() { "nothing resident".to_string() } else { nodes.join(", ") }
        );
    }
    match &outcome.kvm_mappings {
        Some(k) => {
            let _ = writeln!(
                s,
                "KVM mappings: 4K={} 2M={} 1G={} leaves, {} mapped, huge pages {:.0}%",
                k.pages_4k,
                k.pages_2m,
                k.pages_1g,
                format_size(k.mapped_bytes),
                k.huge_coverage * 100.0
            );
            let _ = writeln!(s, "            ({})", k.what);
        }
        None => {
            let why = outcome.kvm_stats.unavailable.as_deref().unwrap_or("KVM has no pages_4k/2m/1g statistics");
            let _ = writeln!(s, "KVM mappings: unknown ({why})");
        }
    }
    for i in 0..outcome.kvm_stats.vcpus.len() {
        let stat = |name: &str| outcome.kvm_stats.vcpu_value(i, name).map_or("-".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "vCPU {i} (KVM stats): exits {}, io exits {}, page faults taken {} (fixed {}, reflected to guest {}, emulated {}), instructions emulated {}",
            stat("exits"),
            stat("io_exits"),
            stat("pf_taken"),
            stat("pf_fixed"),
            stat("pf_guest"),
            stat("pf_emulate"),
            stat("insn_emulation")
        );
    }
    s.push_str(&crate::smp_report::text(outcome));
    let m = &outcome.vmm_memory;
    let _ = writeln!(
        s,
        "VMM process: RSS {} (guest RAM {}, guest hugetlb {} outside RSS); VMM overhead beyond guest RAM {} ({} anonymous, {} binary and libraries)",
        format_size(m.process_rss_bytes),
        format_size(m.guest_rss_bytes),
        format_size(m.guest_hugetlb_bytes),
        format_size(m.vmm_overhead_bytes),
        format_size(m.vmm_overhead_anon_bytes),
        format_size(m.vmm_overhead_file_bytes)
    );
    if outcome.unhandled.port_accesses + outcome.unhandled.mmio_accesses > 0 || outcome.bad_messages > 0 {
        let _ = writeln!(
            s,
            "unhandled: {} port and {} MMIO accesses, {} bad messages",
            outcome.unhandled.port_accesses, outcome.unhandled.mmio_accesses, outcome.bad_messages
        );
    }
    let sums: Vec<(u64, u64, bool)> = outcome
        .reports
        .iter()
        .filter_map(|r| match r.report {
            Report::Workload { event: Event::Checksum, a, b } => Some((a, b, false)),
            Report::Workload { event: Event::Mismatch, a, b } => Some((a, b, true)),
            _ => None,
        })
        .collect();
    if let (Some(first), Some(last)) = (sums.iter().find(|s| !s.2), sums.iter().rev().find(|s| !s.2)) {
        let bad: Vec<&(u64, u64, bool)> = sums.iter().filter(|s| s.2).collect();
        let differing: u64 = bad.iter().map(|s| s.1).sum();
        let _ = writeln!(
            s,
            "checksum workload: rounds {}..={}, last checksum {:#x}, {} check(s) found {differing} differing page(s)",
            first.0,
            last.0,
            last.1,
            bad.len(),
        );
    }
    let gaps: Vec<u64> = outcome.reports.iter().filter_map(|r| match r.report {
        Report::Workload { event: Event::ClockGap, a, .. } => Some(a),
        _ => None,
    }).collect();
    if let Some(Report::Workload { a: written, b: ran_ns, .. }) = outcome.reports.iter().map(|r| r.report).find(|r| matches!(r, Report::Workload { event: Event::TickerDone, .. })) {
        let shown: Vec<String> = gaps.iter().take(4).map(|&g| format!("{:.3} ms", g as f64 / 1e6)).collect();
        let _ = writeln!(s, "ticker workload: {written} page writes in {:.3} s; longest clock gaps {}", ran_ns as f64 / 1e9, shown.join(", "));
    }
    if let Some(b) = &outcome.balloon {
        let m = &b.metrics;
        let _ = writeln!(
            s,
            "balloon: target {}, actual {}, in balloon {}, reclaimed {}, pending {} (host pages of {}); released {} in {} calls, reported free {}; rejected {} guest inputs",
            format_size(b.target_bytes),
            format_size(b.actual_bytes),
            format_size(b.balloon_bytes),
            format_size(b.reclaimed_bytes),
            format_size(b.pending_bytes),
            format_size(b.host_page_bytes),
            format_size(m.released_bytes),
            m.release_calls,
            format_size(m.reported_bytes),
            m.rejected()
        );
    }
    if let Some(d) = &outcome.dirty {
        let _ = writeln!(s, "dirty workload ({} tracking; {} pages × {} rounds, seed {}, buffer of {} pages at page {:#x}):", d.mode, d.workload.pages, d.workload.rounds, d.workload.seed, d.workload.buffer, d.buffer_pfn);
        for r in &d.rounds {
            if !r.logged {
                let _ = writeln!(s, "  round {}: wrote {} pages in {:.0} µs, not logged", r.round, r.expected, r.guest_us);
                continue;
            }
            let extra: Vec<String> = r.extra.iter().map(|e| format!("{} {}", e.pages.len(), e.reason)).collect();
            let _ = writeln!(
                s,
                "  round {}: wrote {} pages in {:.0} µs, harvested {} in {:.0} µs, missed {}{}{}",
                r.round,
                r.expected,
                r.guest_us,
                r.harvested,
                r.harvest_us,
                r.missing.len(),
                if extra.is_empty() { String::new() } else { format!("; also: {}", extra.join("; ")) },
                if r.ring_overflowed { " (ring overflowed: every page reported)" } else { "" }
            );
        }
        let maps: Vec<String> = d
            .mappings
            .iter()
            .map(|m| format!("{}: 4K={} 2M={}", m.phase, m.pages_4k.map_or("-".into(), |v| v.to_string()), m.pages_2m.map_or("-".into(), |v| v.to_string())))
            .collect();
        let _ = writeln!(s, "  KVM mappings: {}", maps.join(" | "));
        if !d.ring_entries_per_vcpu.is_empty() {
            let per: Vec<String> = d.ring_entries_per_vcpu.iter().enumerate().map(|(i, n)| format!("vCPU {i}: {n}")).collect();
            let _ = writeln!(s, "  dirty-ring entries collected: {}", per.join(", "));
        }
        if let (Some(split), Some(recovered)) = (d.huge_split.split, d.huge_split.recovered) {
            let _ = writeln!(s, "  2 MiB mappings split by logging: {split}; back after logging: {}", if recovered { "yes" } else { "no" });
        }
    }
    s.push_str(&crate::guest_paging::text(outcome));
    let _ = writeln!(s, "exit status: {}", outcome.exit_status);
    s
}
