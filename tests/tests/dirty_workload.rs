//! The dirty workload (issue 3): a ring-3 task in the guest writes a
//! pseudo-random set of pages each round; after each round the VMM
//! harvests, and every page the task wrote must be in the harvest, under
//! every mechanism the kernel offers. Everything else harvested must have a
//! reason (VMM write or a region of the guest kernel's own bookkeeping).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;

use memvisor::dirty::{DirtyCaps, DirtyMode};
use memvisor_abi::workload::dirty_page;
use memvisor_tests::Vmm;
use memvisor_tests::vmm::TempDir;

fn offered(mode: DirtyMode) -> bool {
    let vm = memvisor::vm::open_kvm().unwrap().create_vm().unwrap();
    DirtyCaps::probe(&vm).check(mode).is_ok()
}

fn check_mode(mode: DirtyMode) {
    let dir = TempDir::new("dirty-workload");
    let report_path = dir.path().join("dirty.json");
    let (pages, rounds, seed, buffer) = (300u64, 4u64, 0x5eed_u64, 1200u64);
    let r = Vmm::run_json(["--mem", "128M", "--dirty-mode", mode.as_str(), "--workload"])
        .arg(format!("dirty:pages={pages},rounds={rounds},seed={seed},buffer={buffer}"))
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
        let expected: BTreeSet<u64> = (0..pages).map(|i| base + dirty_page(seed, round, i, buffer)).collect();
        assert_eq!(rec["expected"].as_u64().unwrap(), expected.len() as u64, "the VMM computed the same set");
        assert_eq!(rec["missing"].as_array().unwrap().len(), 0, "{mode}: round {round} missed pages: {rec}");
        assert!(rec["harvested"].as_u64().unwrap() >= expected.len() as u64);
        for extra in rec["extra"].as_array().unwrap() {
            assert_ne!(extra["reason"], "unexplained", "{mode}: round {round} has pages nobody explains: {extra}");
        }
    }
    assert!(report["mappings"].as_array().unwrap().len() as u64 >= rounds + 2, "mapping sizes before, during and after logging");
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
fn bad_workloads_and_reports_are_refused() {
    Vmm::run_json(["--workload", "spin"]).output().assert_error(&["unknown workload"]);
    Vmm::run_json(["--workload", "dirty:pages=0"]).output().assert_error(&["at least 1"]);
    Vmm::run_json(["--dirty-report", "/tmp/never-written.json"]).output().assert_error(&["needs a dirty workload"]);
    assert!(!std::path::Path::new("/tmp/never-written.json").exists());
}
