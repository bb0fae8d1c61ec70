//! Reading the `vmm run --json` report (vmm/src/run_report.rs) and the
//! assertions every boot test makes on it.

use serde_json::Value;

/// The self-test checks every boot must report, by their JSON names.
pub const CHECKS: [&str; 5] = ["ram_pattern", "read_only_write", "nx_fetch", "user_reads_kernel", "unmapped"];

fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| v.get(k).unwrap_or_else(|| panic!("report has no `{path}` (missing `{k}`):\n{v:#}")))
}

/// A numeric field by dotted path.
///
/// # Panics
/// When the field is missing or not a number.
#[must_use]
pub fn u64_at(v: &Value, path: &str) -> u64 {
    field(v, path).as_u64().unwrap_or_else(|| panic!("`{path}` is not a number: {}", field(v, path)))
}

/// A string field by dotted path.
///
/// # Panics
/// When the field is missing or not a string.
#[must_use]
pub fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    field(v, path).as_str().unwrap_or_else(|| panic!("`{path}` is not a string: {}", field(v, path)))
}

/// Asserts that every self-test check was reported, exactly once, and passed.
///
/// # Panics
/// When one is missing or failed; the message shows the checks.
pub fn assert_self_test_passed(report: &Value) {
    let checks = field(report, "self_test.checks").as_array().unwrap_or_else(|| panic!("self_test.checks is not a list"));
    let shown = serde_json::to_string_pretty(checks).unwrap_or_default();
    assert!(!checks.is_empty(), "the guest reported no self-test checks (does it run its self-test?)");
    for name in CHECKS {
        let found: Vec<&Value> = checks.iter().filter(|c| c.get("check").and_then(Value::as_str) == Some(name)).collect();
        assert_eq!(found.len(), 1, "self-test check {name} should be reported once:\n{shown}");
        assert_eq!(found[0].get("passed"), Some(&Value::Bool(true)), "self-test check {name} failed:\n{shown}");
    }
    assert_eq!(u64_at(report, "self_test.failed"), 0, "{shown}");
    assert_eq!(u64_at(report, "self_test.passed"), CHECKS.len() as u64, "{shown}");
}

/// The memory regions.
///
/// # Panics
/// When `memory` is missing or empty.
#[must_use]
pub fn regions(report: &Value) -> &[Value] {
    let r = field(report, "memory").as_array().unwrap_or_else(|| panic!("memory is not a list"));
    assert!(!r.is_empty(), "the memory report lists no regions");
    r
}

/// A byte count summed over every region.
#[must_use]
pub fn total(report: &Value, key: &str) -> u64 {
    regions(report).iter().map(|r| u64_at(r, key)).sum()
}

/// Bytes measured on `node`, summed over regions.
#[must_use]
pub fn on_node(report: &Value, node: u32) -> u64 {
    regions(report).iter().map(|r| field(r, "placement.bytes_per_node").get(node.to_string()).and_then(Value::as_u64).unwrap_or(0)).sum()
}

/// Bytes measured on any node, summed over regions.
#[must_use]
pub fn on_any_node(report: &Value) -> u64 {
    regions(report)
        .iter()
        .flat_map(|r| field(r, "placement.bytes_per_node").as_object().map(|m| m.values().filter_map(Value::as_u64).collect::<Vec<_>>()).unwrap_or_default())
        .sum()
}
