//! `--config FILE`: the example configs in resources/ are valid, a file's
//! values reach the VM, and flags override them.

use memvisor::config::ConfigFile;
use memvisor_tests::vmm::{TempDir, workspace_root};
use memvisor_tests::Vmm;
use serde_json::Value;

#[test]
fn every_example_config_in_resources_is_valid() {
    let dir = workspace_root().join("resources");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("resources/ exists") {
        let path = entry.expect("a directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let file = ConfigFile::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        file.into_vm_config().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 3, "resources/ should hold the example configs (found {seen})");
}

#[test]
fn the_small_example_config_boots() {
    let path = workspace_root().join("resources/small.toml");
    let r = Vmm::run_json(["--config".as_ref(), path.as_os_str()]).output();
    r.assert_success();
    let report = r.json();
    assert_eq!(report["config"]["mem_size"], Value::from(256u64 << 20));
    assert_eq!(report["config"]["backing"], Value::from("thp"));
}

#[test]
fn flags_override_the_config_file() {
    let dir = TempDir::new("config");
    // The file alone would fail (no 2 MiB hugetlb pages are reserved for
    // this test and 64T is more than any host has): the flags must win.
    let file = dir.write("vm.toml", "mem = \"64T\"\nbacking = \"hugetlb-2m\"\nguest-page = \"4k\"\nnuma-policy = \"bind\"\nnuma-nodes = [0]\n");
    let r = Vmm::run_json(["--config".as_ref(), file.as_os_str(), "--mem".as_ref(), "128M".as_ref(), "--backing".as_ref(), "memfd".as_ref()]).output();
    r.assert_success();
    let c = &r.json()["config"];
    assert_eq!(c["mem_size"], Value::from(128u64 << 20), "--mem overrides mem");
    assert_eq!(c["backing"], Value::from("memfd"), "--backing overrides backing");
    assert_eq!(c["guest_page"], Value::from("4k"), "fields without a flag come from the file");
    assert_eq!(c["numa_policy"], Value::from("bind"));
    assert_eq!(c["numa_nodes"], serde_json::json!([0]));
}
