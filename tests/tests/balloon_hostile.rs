//! A hostile guest cannot hurt the host through the balloon: each kind of
//! bad input is refused and counted in the device's metrics, the VMM does
//! not panic, and the device still serves a well-formed request afterwards.

use std::time::Duration;

use memvisor_tests::Vmm;
use memvisor_tests::hugetlb::{PageSize, Reservation};
use serde_json::Value;

/// Runs hostile mode `mode` and returns the balloon's final state after
/// checking that the guest saw the device still answering.
fn hostile(mode: u32, extra: &[&str]) -> Value {
    let workload = format!("balloon-hostile:mode={mode}");
    let mut args = vec!["--balloon", "0", "--workload", workload.as_str()];
    // 4 KiB host pages unless the test asks for another backing: the
    // counts below assume a released page is freed at once, not held until
    // the rest of its huge page follows.
    if !extra.contains(&"--backing") {
        args.extend_from_slice(&["--backing", "anon"]);
    }
    args.extend_from_slice(extra);
    let r = Vmm::run_json(args).timeout(Duration::from_secs(120)).output();
    r.assert_success();
    let report = r.json();
    let done: Vec<&Value> = report["workload_events"].as_array().expect("events").iter().filter(|e| e["event"] == "BalloonHostileDone").collect();
    assert_eq!(done.len(), 1, "{}", r.describe());
    assert_eq!(done[0]["a"].as_u64(), Some(u64::from(mode)));
    assert_eq!(done[0]["b"].as_u64(), Some(1), "the device still served a good inflate and deflate after mode {mode}");
    let balloon = report["balloon"].clone();
    assert_eq!(balloon["balloon_bytes"].as_u64(), Some(0), "nothing left in the balloon: {balloon}");
    balloon
}

fn counter(b: &Value, name: &str) -> u64 {
    b["metrics"][name].as_u64().unwrap_or_else(|| panic!("no metric {name} in {b}"))
}

#[test]
fn pfn_outside_ram_is_refused_and_counted() {
    let b = hostile(1, &[]);
    assert_eq!(counter(&b, "pfn_outside_ram"), 1, "{b}");
}

#[test]
fn pfn_in_the_mmio_hole_is_refused_and_counted() {
    let b = hostile(2, &[]);
    assert_eq!(counter(&b, "pfn_in_hole"), 1, "{b}");
}

#[test]
fn duplicate_pfn_is_refused_and_counted() {
    let b = hostile(3, &[]);
    assert_eq!(counter(&b, "duplicate_pfn"), 1, "{b}");
    assert_eq!(counter(&b, "deflate_not_in_balloon"), 0, "{b}");
}

#[test]
fn part_of_a_huge_page_is_held_back_not_released() {
    let _pool = Reservation::reserve(PageSize::M2, 128).unwrap_or_else(|e| panic!("{e}"));
    let b = hostile(4, &["--backing", "hugetlb-2m"]);
    assert!(counter(&b, "partial_host_page_pieces") >= 256, "{b}");
    assert_eq!(counter(&b, "released_bytes"), 0, "no 2 MiB host page was complete: {b}");
}

#[test]
fn descriptor_outside_ram_is_refused_and_counted() {
    let b = hostile(5, &[]);
    assert_eq!(counter(&b, "descriptor_outside_ram"), 1, "{b}");
}

#[test]
fn looping_descriptor_chain_is_refused_and_counted() {
    let b = hostile(6, &[]);
    assert_eq!(counter(&b, "chain_too_long"), 1, "{b}");
}

#[test]
fn queue_size_not_a_power_of_two_is_refused_and_counted() {
    let b = hostile(7, &[]);
    assert_eq!(counter(&b, "bad_queue_size"), 1, "{b}");
}

#[test]
fn head_index_beyond_the_queue_is_refused_and_counted_on_its_own() {
    let b = hostile(8, &[]);
    assert_eq!(counter(&b, "bad_head_descriptor"), 1, "{b}");
    assert_eq!(counter(&b, "chain_too_long"), 0, "a bad head is not a long chain: {b}");
}

#[test]
fn bad_input_on_the_deflate_reporting_and_stats_queues_is_refused_and_counted() {
    // 4 KiB host pages: the final check's single page is then released
    // (with the default THP backing it is a piece of a 2 MiB host page and
    // stays pending).
    let b = hostile(9, &["--backing", "anon"]);
    assert_eq!(counter(&b, "pfn_outside_ram"), 1, "deflate of a PFN beyond RAM: {b}");
    assert_eq!(counter(&b, "deflate_not_in_balloon"), 1, "deflate of a page never inflated: {b}");
    assert_eq!(counter(&b, "descriptor_outside_ram"), 2, "a free page report and a stats buffer in the MMIO window: {b}");
    assert_eq!(counter(&b, "reported_bytes"), 0, "{b}");
    assert_eq!(counter(&b, "released_bytes"), 4096, "only the final check's well-formed page was released: {b}");
}
