//! The dirty workload (issue 3): a ring-3 task in the guest writes a
//! pseudo-random set of pages each round; after each round the VMM
//! harvests, and every page the task wrote must be in the harvest, under
//! every mechanism the kernel offers. Everything else harvested must have a
//! reason (VMM write or a region of the guest kernel's own bookkeeping).
//! The test recomputes the task's pages itself from the documented
//! generator (`memvisor_abi::workload::dirty_page`) and checks them against
//! the harvested page lists of the report, not only the VMM's own verdict.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;

use memvisor::dirty::{DirtyCaps, DirtyMode};
use memvisor_abi::workload::dirty_page;
use memvisor_tests::Vmm;
use memvisor_tests::hugetlb::{PageSize, Reservation};
use memvisor_tests::vmm::TempDir;

fn offered(mode: DirtyMode) -> bool {
    let vm = memvisor::vm::open_kvm().unwrap().create_vm().unwrap();
    DirtyCaps::probe(&vm).check(mode).is_ok()
}

/// One dirty workload run, to be checked.
#[derive(Clone, Copy)]
struct Run<'a> {
    mode: DirtyMode,
    backing: &'a str,
    pages: u64,
    rounds: u64,
    seed: u64,
    buffer: u64,
    warmup: u64,
    /// vCPUs (with more than one, every CPU writes its share of a round).
    vcpus: u32,
}

fn check_mode(mode: DirtyMode) {
    check(Run { mode, backing: "anon", pages: 300, rounds: 4, seed: 0x5eed, buffer: 1200, warmup: 0, vcpus: 1 });
}

/// Runs the workload and checks every logged round; returns the report.
fn check(run: Run<'_>) -> serde_json::Value {
    let Run { mode, backing, pages, rounds, seed, buffer, warmup, vcpus } = run;
    let dir = TempDir::new("dirty-workload");
    let report_path = dir.path().join("dirty.json");
    let r = Vmm::run_json(["--mem", "128M", "--vcpus", &vcpus.to_string(), "--backing", backing, "--dirty-mode", mode.as_str(), "--workload"])
        .arg(format!("dirty:pages={pages},rounds={rounds},seed={seed},buffer={buffer},warmup={warmup}"))
        .arg("--dirty-report")
        .arg(&report_path)
        .output();
    r.assert_success();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["mode"], mode.as_str());
    let base = report["buffer_pfn"].as_u64().unwrap();
    assert!(base > 0, "the guest reported its buffer");
    let recorded = report["rounds"].as_array().unwrap();
    assert_eq!(recorded.len() as u64, rounds, "one harvest per round");
    for (round, rec) in recorded.iter().enumerate() {
        let round = round as u64;
        assert_eq!(rec["logged"].as_bool().unwrap(), round >= warmup, "{mode}: round {round}: only warm-up rounds are not logged");
        if round < warmup {
            continue;
        }
        // The set the guest wrote, recomputed here from the documented
        // generator rather than taken from the VMM's own comparison.
        let expected: BTreeSet<u64> = (0..pages).map(|i| base + dirty_page(seed, round, i, buffer)).collect();
        assert_eq!(rec["expected"].as_u64().unwrap(), expected.len() as u64, "the VMM computed the same set");
        let harvested: BTreeSet<u64> = rec["harvested_pages"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                let first = r["first"].as_u64().unwrap();
                first..first + r["count"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(rec["harvested"].as_u64().unwrap(), harvested.len() as u64, "{mode}: round {round}: the count matches the pages listed");
        let missed: Vec<u64> = expected.difference(&harvested).copied().collect();
        assert!(missed.is_empty(), "{mode}: round {round}: the harvest lacks pages the guest wrote: {missed:?}");
        assert_eq!(rec["missing"].as_array().unwrap().len(), 0, "{mode}: round {round}: the VMM's own check agrees: {rec}");
        // Every other page harvested must be listed, with a reason.
        let mut explained: BTreeSet<u64> = BTreeSet::new();
        for extra in rec["extra"].as_array().unwrap() {
            let reason = extra["reason"].as_str().unwrap();
            assert!(!reason.is_empty() && reason != "unexplained", "{mode}: round {round} has pages nobody explains: {extra}");
            for p in extra["pages"].as_array().unwrap() {
                let p = p.as_u64().unwrap();
                assert!(!expected.contains(&p), "{mode}: round {round}: page {p:#x} the guest task wrote is listed as extra ({reason})");
                explained.insert(p);
            }
        }
        let unlisted: Vec<u64> = harvested.iter().filter(|p| !expected.contains(p) && !explained.contains(p)).copied().collect();
        assert!(unlisted.is_empty(), "{mode}: round {round}: harvested pages neither written by the task nor listed with a reason: {unlisted:?}");
    }
    assert!(report["mappings"].as_array().unwrap().len() as u64 >= rounds - warmup + 2, "mapping sizes before, during and after logging");
    report
}

/// Issue 3, item 5: the guest's buffer is mapped with 2 MiB leaves on
/// 2 MiB host pages and touched in a warm-up round before logging, so KVM
/// holds 2 MiB mappings when logging starts. They must be split while it is
/// on, and the report's verdict on whether they came back once it is off
/// must match KVM's counters. On the reference host (PVM, shadow paging)
/// they do come back: the guest's touches after logging map 2 MiB again.
fn huge_mappings_split_under_logging(backing: &str) {
    let mode = if offered(DirtyMode::Clear) { DirtyMode::Clear } else { DirtyMode::Bitmap };
    // 2048 pages: four 2 MiB leaves; 2048 draws touch all four.
    let report = check(Run { mode, backing, pages: 2048, rounds: 3, seed: 5, buffer: 2048, warmup: 1, vcpus: 1 });
    let maps = report["mappings"].as_array().unwrap();
    let m2 = |m: &serde_json::Value| m["pages_2m"].as_u64().unwrap();
    let stage = |m: &serde_json::Value, s: &str| m["stage"] == s;
    let before = m2(maps.iter().rev().find(|m| stage(m, "before-logging")).unwrap());
    let during = maps.iter().filter(|m| stage(m, "logging")).map(m2).min().unwrap();
    let after = m2(maps.iter().rev().find(|m| stage(m, "after-logging")).unwrap());
    assert!(before >= 4, "{backing}: KVM maps the warmed-up buffer with 2 MiB pages before logging: {maps:?}");
    let split = &report["huge_split"];
    assert_eq!(split["before"].as_u64().unwrap(), before);
    assert_eq!(split["during_min"].as_u64().unwrap(), during);
    assert_eq!(split["after"].as_u64().unwrap(), after);
    assert!(split["split"].as_u64().unwrap() > 0, "{backing}: logging splits 2 MiB mappings: {split}");
    assert_eq!(split["split"].as_u64().unwrap(), before - during);
    assert_eq!(split["recovered"].as_bool().unwrap(), after >= before, "{backing}: the verdict matches the counters: {split}");
    assert!(split["recovered"].as_bool().unwrap(), "{backing}: on this host 2 MiB mappings come back after logging: {maps:?}");
}

#[test]
fn logging_splits_2m_mappings_of_thp_backed_memory_and_they_come_back_after() {
    huge_mappings_split_under_logging("thp");
}

#[test]
fn logging_splits_2m_mappings_of_hugetlb_backed_memory_and_they_come_back_after() {
    let _pool = Reservation::reserve(PageSize::M2, 64).unwrap_or_else(|e| panic!("{e}"));
    huge_mappings_split_under_logging("hugetlb-2m");
}

#[test]
fn bitmap_harvests_never_miss_a_guest_write() {
    check_mode(DirtyMode::Bitmap);
}

#[test]
fn clear_harvests_never_miss_a_guest_write() {
    if offered(DirtyMode::Clear) {
        check_mode(DirtyMode::Clear);
    } else {
        Vmm::run_json(["--dirty-mode", "clear", "--workload", "dirty"]).output().assert_error(&["not available"]);
    }
}

#[test]
fn ring_harvests_never_miss_a_guest_write() {
    if offered(DirtyMode::Ring) {
        check_mode(DirtyMode::Ring);
    } else {
        Vmm::run_json(["--dirty-mode", "ring", "--workload", "dirty"]).output().assert_error(&["not available"]);
    }
}

#[test]
fn with_two_vcpus_each_has_its_own_ring_and_a_round_written_by_both_is_harvested_whole() {
    // Both CPUs write every round (CPU c the pages i with i % 2 == c), so
    // half of each round is only in vCPU 1's ring; the harvest, taken while
    // vCPU 0 waits in its report and vCPU 1 keeps running, must still hold
    // every page (checked by `check`).
    for mode in [DirtyMode::Ring, DirtyMode::Clear] {
        if !offered(mode) {
            Vmm::run_json(["--vcpus", "2", "--dirty-mode", mode.as_str(), "--workload", "dirty"]).output().assert_error(&["not available"]);
            continue;
        }
        let (pages, rounds) = (300, 4);
        let report = check(Run { mode, backing: "anon", pages, rounds, seed: 0x5eed, buffer: 1200, warmup: 0, vcpus: 2 });
        let per_vcpu: Vec<u64> = report["ring_entries_per_vcpu"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        if mode == DirtyMode::Ring {
            assert_eq!(per_vcpu.len(), 2, "one ring per vCPU: {per_vcpu:?}");
            // vCPU 1 wrote half of 4 rounds of ~300 distinct pages each.
            assert!(per_vcpu[1] >= rounds * pages / 2 * 8 / 10, "vCPU 1's ring held its writes: {per_vcpu:?}");
            assert!(per_vcpu[0] >= rounds * pages / 2 * 8 / 10, "and vCPU 0's its own: {per_vcpu:?}");
        } else {
            assert!(per_vcpu.is_empty(), "no rings with {mode}: {per_vcpu:?}");
        }
    }
}

#[test]
fn bad_workloads_and_reports_are_refused() {
    Vmm::run_json(["--workload", "spin"]).output().assert_error(&["unknown workload"]);
    Vmm::run_json(["--workload", "dirty:pages=0"]).output().assert_error(&["at least 1"]);
    Vmm::run_json(["--dirty-report", "/tmp/never-written.json"]).output().assert_error(&["needs a dirty workload"]);
    assert!(!std::path::Path::new("/tmp/never-written.json").exists());
}
