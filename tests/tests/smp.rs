//! Several vCPUs (issue J), on real KVM: every CPU comes up and runs its
//! share of ring-3 work, TLB shootdowns keep every other CPU from using a
//! translation the boot CPU changed, the teaching modes show what a missing
//! shootdown lets through (or, where this host cannot show it, say why),
//! and a 2-vCPU guest snapshotted mid-workload continues after a restore.
//!
//! Runs are kept short: every vCPU of these guests spins (readers in ring 3,
//! the writer at emulated ring 0) on a 2-core reference host shared with
//! builds, so an IPI can wait a host scheduler time slice.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::{Duration, Instant};

use memvisor_tests::vmm::TempDir;
use memvisor_tests::{RunResult, Vmm};
use serde_json::Value;

fn n(v: &Value, path: &str) -> u64 {
    path.split('.').fold(v, |v, k| if let Ok(i) = k.parse::<usize>() { &v[i] } else { &v[k] }).as_u64().unwrap_or_else(|| panic!("{path} missing in {v}"))
}

fn run(vcpus: u32, extra: &[&str]) -> Value {
    let r = Vmm::run_json(["--mem", "128M", "--vcpus", &vcpus.to_string()]).args(extra).timeout(Duration::from_secs(300)).output();
    r.assert_success();
    r.json()
}

fn shootdown(vcpus: u32, spec: &str) -> (Value, Value) {
    let report = run(vcpus, &["--workload", &format!("shootdown:{spec}")]);
    let s = report["shootdown_workload"].clone();
    assert!(s.is_object(), "{spec}: no shootdown summary in {report}");
    (report, s)
}

fn on_pvm(report: &Value) -> bool {
    report["translation_mode"] == "pvm-shadow"
}

#[test]
fn every_cpu_comes_up_and_runs_its_share_of_the_self_test_in_ring_3() {
    let report = run(4, &[]);
    memvisor_tests::report::assert_self_test_passed(&report);
    let cpus = report["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), 4, "{report}");
    let pattern = report["self_test"]["checks"].as_array().unwrap().iter().find(|c| c["check"] == "ram_pattern").unwrap().clone();
    let mut verified = 0;
    for (i, c) in cpus.iter().enumerate() {
        assert_eq!(n(c, "cpu"), i as u64);
        assert!(c["online_ms"].as_f64().is_some(), "CPU {i} reported itself online: {c}");
        // KVM counted exits of every vCPU: each ran guest code.
        assert!(n(c, "kvm_exits") > 0, "vCPU {i} never ran: {c}");
        assert!(n(&report, &format!("kvm_stats.vcpus.{i}.exits")) > 0);
        assert!(n(c, "guest.tasks") >= 1, "CPU {i} ran a ring-3 task: {c}");
        let bytes = n(c, "guest.selftest_bytes");
        // An even share: the boot CPU halves blocks larger than a quarter.
        assert!(bytes > n(&pattern, "expected") / 8, "CPU {i} verified its share ({bytes} bytes): {c}");
        verified += bytes;
    }
    assert_eq!(verified, n(&pattern, "got"), "the shares add up to what the check verified");
    // The boot CPU woke each AP once and was woken by each once.
    assert_eq!(n(&cpus[0], "guest.ipis_sent"), 3);
    for c in &cpus[1..] {
        assert_eq!(n(c, "guest.ipis_received"), 1, "one wake-up per task: {c}");
    }
}

#[test]
fn one_cpu_pays_for_no_smp() {
    let report = run(1, &["--workload", "shootdown:rounds=20"]);
    let cpus = report["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), 1);
    for key in ["ipis_received", "ipis_sent", "shootdowns_sent", "shootdowns_acked"] {
        assert_eq!(n(&cpus[0], &format!("guest.{key}")), 0, "{key}: {report}");
    }
    let s = &report["shootdown_workload"];
    assert_eq!((n(s, "rounds"), n(s, "shootdowns"), n(s, "ipis")), (20, 0, 0), "{s}");
    assert!(s["verdict"].as_str().unwrap().contains("no reader ran"), "{s}");
    // No LAPIC access at all: the guest never mapped it, so nothing of the
    // SMP machinery ran (an unhandled MMIO access would be counted).
    assert_eq!(n(&report, "unhandled.mmio_accesses"), 0, "{report}");
}

#[test]
fn shootdowns_keep_every_reader_from_seeing_the_old_translation() {
    for mode in ["remap", "wp"] {
        for writer in ["kernel", "user"] {
            let rounds = 60;
            let (report, s) = shootdown(3, &format!("pages=16,rounds={rounds},mode={mode},writer={writer}"));
            let what = format!("{mode}/{writer}: {s}");
            assert_eq!(report["exit_status"], 0, "{what}");
            assert_eq!(n(&s, "rounds"), rounds, "{what}");
            assert_eq!(n(&s, "shootdowns"), rounds, "every change interrupted the readers: {what}");
            assert_eq!(n(&s, "ipis"), 2 * rounds, "two readers each time: {what}");
            assert_eq!(n(&s, "stale"), 0, "{what}");
            let readers = s["readers"].as_array().unwrap();
            assert_eq!(readers.len(), 2, "{what}");
            for r in readers {
                assert_eq!(n(r, "checks"), rounds, "each reader checked every round: {what}");
            }
            let l = &s["latency"];
            let (min, med, max) = (l["min_us"].as_f64().unwrap(), l["median_us"].as_f64().unwrap(), l["max_us"].as_f64().unwrap());
            assert!(0.0 < min && min <= med && med <= max, "{what}");
            assert!(s["verdict"].as_str().unwrap().starts_with("with shootdowns: never stale"), "{what}");
            // The guest's own counters agree: the boot CPU started them, each
            // reader acknowledged every one.
            let cpus = report["cpus"].as_array().unwrap();
            assert_eq!(n(&cpus[0], "guest.shootdowns_sent"), rounds, "{what}");
            for c in &cpus[1..] {
                assert_eq!(n(c, "guest.shootdowns_acked"), rounds, "{what}");
            }
        }
    }
}

#[test]
fn without_any_flush_a_natively_written_pte_leaves_the_readers_stale() {
    // KVM's shadow MMU lets a guest leaf table that the guest writes
    // natively go "unsync": the stores are not trapped, and each vCPU keeps
    // its old shadow entry until it executes invlpg or reloads CR3, exactly
    // as a hardware TLB would. writer=user makes the stores from ring 3,
    // which this host runs natively.
    for mode in ["remap", "wp"] {
        let (report, s) = shootdown(2, &format!("pages=16,rounds=60,mode={mode},skip=2,writer=user"));
        let stale = n(&s, "stale");
        if on_pvm(&report) || report["translation_mode"] == "shadow" {
            assert!(stale > 0, "{mode}: a reader saw the old translation: {s}");
            assert!(s["verdict"].as_str().unwrap().starts_with("without any flush: stale"), "{s}");
        } else {
            // With EPT/NPT the reader's TLB decides; the report says what it saw.
            eprintln!("{mode}: {}", s["verdict"]);
        }
        // The teaching mode is not a failure of the guest.
        assert_eq!(report["exit_status"], 0, "{s}");
    }
}

#[test]
fn where_this_host_cannot_show_a_stale_translation_the_report_says_why() {
    // The kernel's own PTE stores: on PVM they are emulated, and KVM sees
    // every one (no flush at all, and still never stale).
    let (report, s) = shootdown(2, "pages=16,rounds=40,skip=2");
    if on_pvm(&report) {
        assert_eq!(n(&s, "stale"), 0, "{s}");
        let v = s["verdict"].as_str().unwrap();
        assert!(v.contains("not observable on shadow paging") && v.contains("emulates the guest kernel"), "{v}");
    }
    // Native stores, but the writer flushes its own TLB: that invlpg also
    // resynchronises the shadow page the reader shares.
    let (report, s) = shootdown(2, "pages=16,rounds=40,skip=1,writer=user");
    assert_eq!((n(&s, "shootdowns"), n(&s, "ipis")), (0, 0), "skip=1 sends no IPI: {s}");
    if on_pvm(&report) {
        assert_eq!(n(&s, "stale"), 0, "{s}");
        let v = s["verdict"].as_str().unwrap();
        assert!(v.contains("not observable on shadow paging") && v.contains("resynchronises"), "{v}");
    }
}

fn ctl(socket: &Path, args: &[&str]) -> Value {
    let r = Vmm::new(["ctl"]).arg(socket).args(args).output();
    r.assert_success();
    serde_json::from_str(r.stdout.trim()).unwrap()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn samples(report: &Value) -> usize {
    report["workload_events"].as_array().unwrap().iter().filter(|e| e["event"] == "ShootdownSample").count()
}

#[test]
fn a_two_cpu_guest_snapshotted_mid_shootdowns_continues_after_restore() {
    let dir = TempDir::new("smp-snap");
    let socket = dir.path().join("api.sock");
    let rounds = 1500;
    let spec = format!("shootdown:pages=16,rounds={rounds}");
    let vm = Vmm::run_json(["--mem", "64M", "--vcpus", "2", "--workload", &spec, "--api-socket"]).arg(&socket).spawn();
    wait_for("the workload never started", Duration::from_secs(120), || vm.stderr_so_far().contains("guest: workload starting"));
    std::thread::sleep(Duration::from_millis(150));
    let snap = dir.path().join("full");
    let r = ctl(&socket, &["snapshot", "--full", snap.to_str().unwrap()]);
    assert_eq!(r["state"], "running", "taken mid-workload: {r}");
    wait_for("the workload never finished", Duration::from_secs(240), || {
        let r = Vmm::new(["ctl"]).arg(&socket).arg("status").output();
        r.code() == 0 && r.stdout.contains("\"idle\"")
    });
    ctl(&socket, &["shutdown"]);
    let original: RunResult = vm.wait(Duration::from_secs(120));
    original.assert_success();
    let original = original.json();
    assert_eq!(n(&original, "shootdown_workload.stale"), 0);
    assert_eq!(samples(&original), rounds as usize);

    for mode in ["copy", "lazy"] {
        let r = Vmm::new(["restore", "--json"]).arg(&snap).args(&["--restore-mode", mode]).timeout(Duration::from_secs(300)).output();
        r.assert_success();
        let report = r.json();
        let what = format!("{mode} restore: {}", report["shootdown_workload"]);
        assert_eq!(report["exit_status"], 0, "{what}");
        // Both vCPUs came back where they were: the writer went on with the
        // rounds it had left, the reader (whose counters are in its
        // registers and stack) checked every round of the whole run.
        let after = samples(&report);
        assert!(after > 0 && after < rounds as usize, "the writer continued mid-run: {after} rounds after the restore; {what}");
        let readers = report["shootdown_workload"]["readers"].as_array().unwrap();
        assert_eq!(readers.len(), 1, "{what}");
        assert_eq!(n(&readers[0], "checks"), rounds, "{what}");
        assert_eq!(n(&readers[0], "stale"), 0, "{what}");
        let cpus = report["cpus"].as_array().unwrap();
        assert_eq!(cpus.len(), 2, "{what}");
        assert!(n(&cpus[1], "kvm_exits") > 0, "the restored AP ran: {what}");
        assert_eq!(n(&cpus[1], "guest.shootdowns_acked"), rounds, "the AP acknowledged every shootdown, before and after: {what}");
    }
}
