//! Snapshots through the control socket and `vmm restore` (issue 3): a full
//! and a diff snapshot of a running VM restore under both modes, and every
//! damaged or mismatched snapshot is refused with one clear line, a nonzero
//! exit, and no file changed.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memvisor_tests::vmm::{Running, TempDir};
use memvisor_tests::{RunResult, Vmm};

/// `vmm ctl SOCKET ARGS...`, asserting success; returns the response JSON.
fn ctl(socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut v = Vmm::new(["ctl"]).arg(socket);
    for a in args {
        v = v.arg(a);
    }
    let r = v.output();
    r.assert_success();
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("ctl answered {:?}: {e}", r.stdout))
}

/// A VM serving a control socket, waited on until the guest idles.
fn idle_vm(dir: &TempDir) -> (Running, PathBuf) {
    let socket = dir.path().join("api.sock");
    let vm = Vmm::run_json(["--mem", "64M", "--api-socket"]).arg(&socket).spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the guest never idled");
        if socket.exists() {
            let r = Vmm::new(["ctl"]).arg(&socket).arg("status").output();
            if r.code() == 0 && r.stdout.contains("\"idle\"") {
                return (vm, socket);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Takes a full snapshot and a diff on top of it; returns (full, diff).
fn full_and_diff(dir: &TempDir) -> (PathBuf, PathBuf) {
    let (vm, socket) = idle_vm(dir);
    let full = dir.path().join("full");
    let diff = dir.path().join("diff");
    let r = ctl(&socket, &["snapshot", "--full", full.to_str().unwrap()]);
    assert_eq!(r["data"]["kind"], "full");
    assert!(r["data"]["memory_bytes"].as_u64().unwrap() > 0, "a booted guest has touched memory: {r}");
    let r = ctl(&socket, &["snapshot", "--diff", diff.to_str().unwrap()]);
    assert_eq!(r["data"]["kind"], "diff");
    ctl(&socket, &["shutdown"]);
    vm.wait(Duration::from_secs(30)).assert_success();
    (full, diff)
}

fn restore(dir: &Path, extra: &[&str]) -> RunResult {
    let mut v = Vmm::new(["restore", "--json"]).arg(dir);
    for a in extra {
        v = v.arg(a);
    }
    v.output()
}

/// Every file under `dir` with its length and contents hash, to prove a
/// failed restore changed nothing.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(fingerprint(&p));
        } else if p.extension().is_none_or(|e| e != "sock") {
            let bytes = std::fs::read(&p).unwrap();
            out.push((p, bytes.len() as u64, crc(&bytes)));
        }
    }
    out.sort();
    out
}

fn crc(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |h, &b| h.rotate_left(5) ^ u32::from(b))
}

fn assert_refused(dir: &TempDir, target: &Path, extra: &[&str], needles: &[&str]) {
    let before = fingerprint(dir.path());
    restore(target, extra).assert_error(needles);
    assert_eq!(fingerprint(dir.path()), before, "a refused restore changed no file");
}

#[test]
fn full_and_diff_snapshots_restore_by_copy_and_lazily() {
    let dir = TempDir::new("snap-ok");
    let (full, diff) = full_and_diff(&dir);
    for target in [&full, &diff] {
        for mode in ["copy", "lazy"] {
            let r = restore(target, &["--restore-mode", mode]);
            r.assert_success();
            let report = r.json();
            assert_eq!(report["exit_status"], 0, "{mode} restore of {}", target.display());
            assert_eq!(report["config"]["mem_size"], 64 << 20);
        }
    }
}

#[test]
fn snapshot_into_an_existing_directory_is_refused() {
    let dir = TempDir::new("snap-exists");
    let (vm, socket) = idle_vm(&dir);
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    let r = Vmm::new(["ctl"]).arg(&socket).args(&["snapshot", "--full"]).arg(&taken).output();
    assert_ne!(r.code(), 0);
    assert!(r.stdout.contains("already exists") || r.stderr.contains("already exists"), "{}", r.describe());
    // A diff before any full snapshot has nothing to diff against.
    let r = Vmm::new(["ctl"]).arg(&socket).args(&["snapshot", "--diff"]).arg(dir.path().join("d")).output();
    assert!(r.stderr.contains("full snapshot first") || r.stdout.contains("full snapshot first"), "{}", r.describe());
    assert!(!dir.path().join("d").exists());
    ctl(&socket, &["shutdown"]);
    vm.wait(Duration::from_secs(30)).assert_success();
}

#[test]
fn a_snapshot_that_runs_out_of_space_leaves_nothing_behind() {
    let dir = TempDir::new("snap-enospc");
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&small).status().unwrap();
    assert!(mounted.success(), "mounting a 1 MiB tmpfs (the test runs as root)");
    let (vm, socket) = idle_vm(&dir);
    let r = Vmm::new(["ctl"]).arg(&socket).args(&["snapshot", "--full"]).arg(small.join("s")).output();
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(said.contains("No space left"), "{}", r.describe());
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0, "no snapshot and no temporary left in the full file system");
    // The VM is unharmed and still snapshots elsewhere.
    ctl(&socket, &["snapshot", "--full", dir.path().join("ok").to_str().unwrap()]);
    ctl(&socket, &["shutdown"]);
    vm.wait(Duration::from_secs(30)).assert_success();
    let _ = std::process::Command::new("umount").arg(&small).status();
}

#[test]
fn damaged_snapshots_are_refused_and_left_as_they_were() {
    let dir = TempDir::new("snap-bad");
    let (full, diff) = full_and_diff(&dir);

    // Truncated memory image.
    let mem = full.join("memory.bin");
    let len = std::fs::metadata(&mem).unwrap().len();
    let saved = std::fs::read(&mem).unwrap();
    std::fs::OpenOptions::new().write(true).open(&mem).unwrap().set_len(len / 2).unwrap();
    assert_refused(&dir, &full, &[], &["truncated"]);
    std::fs::write(&mem, &saved).unwrap();

    // One flipped byte inside a saved chunk.
    // chunks.bin: 24-byte records, the file offset at bytes 8..16.
    let records = std::fs::read(full.join("chunks.bin")).unwrap();
    let chunk_off = u64::from_le_bytes(records[8..16].try_into().unwrap()) as usize;
    let mut bad = saved.clone();
    bad[chunk_off + 100] ^= 0xff;
    std::fs::write(&mem, &bad).unwrap();
    assert_refused(&dir, &full, &[], &["corrupted", "checksum"]);
    // A lazy restore checks the base image beside the running guest and
    // fails the run just the same.
    assert_refused(&dir, &full, &["--restore-mode", "lazy"], &["corrupted", "checksum"]);
    std::fs::write(&mem, &saved).unwrap();

    // A damaged chunk table.
    let table = full.join("chunks.bin");
    let mut bad = records.clone();
    bad[20] ^= 1;
    std::fs::write(&table, &bad).unwrap();
    assert_refused(&dir, &full, &[], &["chunks.bin", "checksum"]);
    std::fs::write(&table, &records).unwrap();

    // Damaged vCPU state.
    let state = full.join("state.json");
    let saved_state = std::fs::read(&state).unwrap();
    let mut bad = saved_state.clone();
    let i = bad.len() / 2;
    bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
    std::fs::write(&state, &bad).unwrap();
    assert_refused(&dir, &full, &[], &["state.json", "checksum"]);
    std::fs::write(&state, &saved_state).unwrap();

    // Another format version.
    let manifest_path = full.join("manifest.json");
    let saved_manifest = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::write(&manifest_path, saved_manifest.replacen("\"version\": 1", "\"version\": 99", 1)).unwrap();
    assert_refused(&dir, &full, &[], &["version 99 is not supported"]);
    std::fs::write(&manifest_path, &saved_manifest).unwrap();

    // Not a snapshot at all.
    assert_refused(&dir, dir.path(), &[], &["manifest.json"]);

    // A memory size that is not the snapshot's.
    assert_refused(&dir, &full, &["--mem", "128M"], &["does not match", "64 MiB"]);

    // A diff whose layout differs from its base.
    let diff_manifest = diff.join("manifest.json");
    let saved_diff = std::fs::read_to_string(&diff_manifest).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&saved_diff).unwrap();
    v["regions"][0]["size"] = serde_json::json!(32 << 20);
    v["config"]["mem_size"] = serde_json::json!(32 << 20);
    std::fs::write(&diff_manifest, serde_json::to_string(&v).unwrap()).unwrap();
    assert_refused(&dir, &diff, &[], &["layout differs"]);
    std::fs::write(&diff_manifest, &saved_diff).unwrap();

    // A diff whose base is gone.
    let moved = dir.path().join("moved");
    std::fs::rename(&full, &moved).unwrap();
    assert_refused(&dir, &diff, &[], &["base snapshot", "is missing"]);
    std::fs::rename(&moved, &full).unwrap();

    // Put back together, the chain restores.
    restore(&diff, &[]).assert_success();
}



/// The checksum events of a run's report: (round, checksum, mismatch?).
fn checksums(report: &serde_json::Value) -> Vec<(u64, u64, bool)> {
    report["workload_events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "Checksum" || e["event"] == "Mismatch")
        .map(|e| (e["a"].as_u64().unwrap(), e["b"].as_u64().unwrap(), e["event"] == "Mismatch"))
        .collect()
}

#[test]
fn a_running_guest_continues_after_restore_with_identical_memory() {
    let dir = TempDir::new("snap-continue");
    let socket = dir.path().join("api.sock");
    // 40 rounds, 50 ms apart: the snapshots land mid-workload.
    let vm = Vmm::run_json(["--mem", "64M", "--workload", "checksum:pages=4096,rounds=40,ms=50", "--api-socket"]).arg(&socket).spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(socket.exists() && Vmm::new(["ctl"]).arg(&socket).arg("status").output().stdout.contains("\"running\"")) {
        assert!(Instant::now() < deadline, "the VM never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the self-test finish and a few rounds pass.
    std::thread::sleep(Duration::from_millis(700));
    let full = dir.path().join("full");
    let diff = dir.path().join("diff");
    ctl(&socket, &["snapshot", "--full", full.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    let d = ctl(&socket, &["snapshot", "--diff", diff.to_str().unwrap()]);
    assert_eq!(d["state"], "running", "the guest was mid-workload: {d}");
    let original = loop {
        let status = Vmm::new(["ctl"]).arg(&socket).arg("status").output();
        if status.stdout.contains("\"idle\"") {
            ctl(&socket, &["shutdown"]);
            break vm.wait(Duration::from_secs(30));
        }
        assert!(Instant::now() < deadline, "the workload never finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    original.assert_success();
    let first = checksums(&original.json());
    assert_eq!(first.len(), 40, "the original run reported every round");
    let reference = first[0].1;
    assert!(first.iter().all(|&(_, c, bad)| c == reference && !bad));

    for target in [&full, &diff] {
        for mode in ["copy", "lazy"] {
            let r = restore(target, &["--restore-mode", mode]);
            r.assert_success();
            let report = r.json();
            assert_eq!(report["exit_status"], 0, "no mismatch after a {mode} restore of {}", target.display());
            let after = checksums(&report);
            assert!(!after.is_empty(), "the restored guest went on with its rounds");
            assert!(after[0].0 > 0, "it continued where it was (round {} first), not from the start", after[0].0);
            assert_eq!(after.last().map(|a| a.0), Some(39), "and ran to the last round");
            for (round, c, bad) in after {
                assert!(!bad && c == reference, "{mode} restore of {}: round {round} saw checksum {c:#x}, not {reference:#x}", target.display());
            }
        }
    }
}

#[test]
fn a_diff_after_dirty_logging_was_paused_is_refused() {
    let dir = TempDir::new("snap-interrupted");
    let (vm, socket) = idle_vm(&dir);
    ctl(&socket, &["snapshot", "--full", dir.path().join("full").to_str().unwrap()]);
    // Logging paused and resumed: pages written meanwhile would be missing.
    ctl(&socket, &["dirty-log", "off", "--slot", "0"]);
    ctl(&socket, &["dirty-log", "on", "--slot", "0"]);
    let r = Vmm::new(["ctl"]).arg(&socket).args(&["snapshot", "--diff"]).arg(dir.path().join("diff")).output();
    assert!(format!("{}{}", r.stdout, r.stderr).contains("take a full snapshot"), "{}", r.describe());
    assert!(!dir.path().join("diff").exists());
    // A new full snapshot starts a new chain.
    ctl(&socket, &["snapshot", "--full", dir.path().join("full2").to_str().unwrap()]);
    ctl(&socket, &["snapshot", "--diff", dir.path().join("diff2").to_str().unwrap()]);
    ctl(&socket, &["shutdown"]);
    vm.wait(Duration::from_secs(30)).assert_success();
}

#[test]
fn guests_split_around_the_mmio_hole_snapshot_and_restore() {
    // 5 GiB: 3 GiB below the hole and 2 GiB above it, all touched by the
    // self-test, so the saved pages run right up to both sides of the hole.
    let dir = TempDir::new("snap-5g");
    let socket = dir.path().join("api.sock");
    // Generous hang guards: 5 GiB is written and read back, and CI machines
    // share their disk.
    let vm = Vmm::run_json(["--mem", "5G", "--api-socket"]).arg(&socket).timeout(Duration::from_secs(400)).spawn();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !(socket.exists() && Vmm::new(["ctl"]).arg(&socket).arg("status").output().stdout.contains("\"idle\"")) {
        assert!(Instant::now() < deadline, "the 5 GiB guest never idled");
        std::thread::sleep(Duration::from_millis(100));
    }
    let snap = dir.path().join("full");
    let r = ctl(&socket, &["snapshot", "--full", snap.to_str().unwrap()]);
    assert!(r["data"]["memory_bytes"].as_u64().unwrap() > 4 << 30, "both regions were saved: {r}");
    ctl(&socket, &["shutdown"]);
    vm.wait(Duration::from_secs(120)).assert_success();
    let restored = Vmm::new(["restore", "--json"]).arg(&snap).timeout(Duration::from_secs(400)).output();
    restored.assert_success();
    let report = restored.json();
    assert_eq!(report["memory"].as_array().unwrap().len(), 2, "two RAM regions");
    assert_eq!(report["memory"][1]["guest_start"], 1u64 << 32);
}
