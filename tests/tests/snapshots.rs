//! Snapshots through the control socket and `vmm restore` (issue 3): a full
//! and a diff snapshot of a running VM restore under both modes, and every
//! damaged or mismatched snapshot is refused with one clear line, a nonzero
//! exit, and no file changed.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod balloon_util;

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

/// Whether the VM behind `socket` answers `status` with the idle state.
fn is_idle(socket: &Path) -> bool {
    socket.exists() && {
        let r = Vmm::new(["ctl"]).arg(socket).arg("status").output();
        r.code() == 0 && r.stdout.contains("\"idle\"")
    }
}

/// Polls until the guest behind `socket` idles; panics with `what` after
/// `within`.
fn wait_idle(socket: &Path, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while !is_idle(socket) {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the guest's "workload starting" line (stderr with --json,
/// printed once its self-test is over).
fn wait_workload_started(vm: &Running, within: Duration) {
    let deadline = Instant::now() + within;
    while !vm.stderr_so_far().contains("guest: workload starting") {
        assert!(Instant::now() < deadline, "the workload never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the workload to end (the guest idles), shuts the VM down and
/// returns how it ended.
fn shut_down_when_idle(vm: Running, socket: &Path, within: Duration) -> RunResult {
    wait_idle(socket, within, "the workload never finished");
    ctl(socket, &["shutdown"]);
    // A hang guard only: at load averages of 5-6 on the 2-core reference
    // host, 30 s was once not enough for this exit (not reproduced since).
    vm.wait(Duration::from_secs(120))
}

/// A VM serving a control socket, waited on until the guest idles.
fn idle_vm(dir: &TempDir) -> (Running, PathBuf) {
    let socket = dir.path().join("api.sock");
    let vm = Vmm::run_json(["--mem", "64M", "--api-socket"]).arg(&socket).spawn();
    wait_idle(&socket, Duration::from_secs(60), "the guest never idled");
    (vm, socket)
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
            // KVM takes every saved MSR back: nothing is refused, so
            // nothing is warned of.
            assert!(!r.stderr.contains("WARN"), "{mode} restore of {} warned: {}", target.display(), r.stderr);
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
    // Missing parent directories are not created.
    let deep = dir.path().join("no").join("such").join("snap");
    let r = Vmm::new(["ctl"]).arg(&socket).args(&["snapshot", "--full"]).arg(&deep).output();
    assert!(format!("{}{}", r.stdout, r.stderr).contains("parent directory"), "{}", r.describe());
    assert!(!dir.path().join("no").exists(), "nothing was created");
    // A temporary directory a killed VMM left behind (its process gone) is
    // removed by the next snapshot to the same place; one of a live
    // process is not touched.
    let dead = dir.path().join(".snap.tmp-999999999");
    let live = dir.path().join(format!(".snap.tmp-{}", std::process::id()));
    for d in [&dead, &live] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("memory.bin"), b"half written").unwrap();
    }
    ctl(&socket, &["snapshot", "--full", dir.path().join("snap").to_str().unwrap()]);
    assert!(!dead.exists(), "the abandoned temporary directory is removed");
    assert!(live.exists(), "a live process's temporary directory is left alone");
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
    // The self-test zeroes what it touched, and zero pages are holes, not
    // data: a workload leaves 4 MiB of data behind, more than the 1 MiB.
    let socket = dir.path().join("api.sock");
    let vm = Vmm::run_json(["--mem", "64M", "--workload", "checksum:pages=1024,rounds=1,ms=0", "--api-socket"]).arg(&socket).spawn();
    wait_idle(&socket, Duration::from_secs(60), "the guest never idled");
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

    // Another format version: a newer one, and an older one (version 1
    // stored the KVM structures as hex strings).
    let manifest_path = full.join("manifest.json");
    let saved_manifest = std::fs::read_to_string(&manifest_path).unwrap();
    for (version, needle) in [(99, "version 99 is not supported: written by a newer memvisor"), (1, "version 1 is not supported: written by an older memvisor")] {
        let mut v: serde_json::Value = serde_json::from_str(&saved_manifest).unwrap();
        v["version"] = version.into();
        std::fs::write(&manifest_path, serde_json::to_string(&v).unwrap()).unwrap();
        assert_refused(&dir, &full, &[], &[needle]);
    }
    std::fs::write(&manifest_path, &saved_manifest).unwrap();

    // An MSR KVM does not take back is an error naming it, not a warning:
    // MSR_KVM_ASYNC_PF_INT, which KVM refuses in a VM without an in-kernel
    // LAPIC (so a save leaves it out: snapshot::msrs::to_save).
    edit_state(&full, |s| s["vcpus"][0]["msrs"].as_array_mut().unwrap().push(serde_json::json!([0x4b56_4d06u32, 0])));
    assert_refused(&dir, &full, &[], &["KVM refused to restore MSR 0x4b564d06"]);
    std::fs::write(&state, &saved_state).unwrap();
    std::fs::write(&manifest_path, &saved_manifest).unwrap();

    // Not a snapshot at all.
    assert_refused(&dir, dir.path(), &[], &["manifest.json"]);

    // A memory size that is not the snapshot's.
    assert_refused(&dir, &full, &["--mem", "128M"], &["does not match", "64 MiB"]);

    // A manifest edited without care for its checksum.
    let diff_manifest = diff.join("manifest.json");
    let saved_diff = std::fs::read_to_string(&diff_manifest).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&saved_diff).unwrap();
    v["config"]["cmdline"] = serde_json::json!("edited");
    std::fs::write(&diff_manifest, serde_json::to_string(&v).unwrap()).unwrap();
    assert_refused(&dir, &diff, &[], &["manifest fails its checksum"]);
    std::fs::write(&diff_manifest, &saved_diff).unwrap();

    // A diff whose layout differs from its base (resealed, so the link
    // check refuses it).
    edit_manifest(&diff, |v| {
        v["regions"][0]["size"] = serde_json::json!(32 << 20);
        v["config"]["mem_size"] = serde_json::json!(32 << 20);
    });
    assert_refused(&dir, &diff, &[], &["layout differs"]);
    std::fs::write(&diff_manifest, &saved_diff).unwrap();

    // Another base in the base's place, with the base's name and id: the
    // diff is bound to its base by content (the base manifest's checksum).
    let full_manifest = full.join("manifest.json");
    let saved_full = std::fs::read_to_string(&full_manifest).unwrap();
    edit_manifest(&full, |v| v["config"]["cmdline"] = serde_json::json!("an impostor"));
    assert_refused(&dir, &diff, &[], &["is not the one this diff was taken on top of"]);
    std::fs::write(&full_manifest, &saved_full).unwrap();

    // A layout that is not this build's for the recorded memory size (its
    // sizes still add up, so only the layout check can refuse it).
    edit_manifest(&full, |v| v["regions"] = serde_json::json!([{ "guest_start": 0, "size": 32 << 20 }, { "guest_start": 1u64 << 32, "size": 32 << 20 }]));
    assert_refused(&dir, &full, &[], &["RAM layout", "differs from this build's"]);
    std::fs::write(&full_manifest, &saved_full).unwrap();

    // A diff whose base is gone.
    let moved = dir.path().join("moved");
    std::fs::rename(&full, &moved).unwrap();
    assert_refused(&dir, &diff, &[], &["base snapshot", "is missing"]);
    std::fs::rename(&moved, &full).unwrap();

    // Put back together, the chain restores.
    restore(&diff, &[]).assert_success();
}

/// (round, value) pairs of one kind of workload event.
type Events = Vec<(u64, u64)>;

/// The checksum workload's checks of a run's report: (round, checksum)
/// per round, and (round, differing pages) per check that found any.
fn checks(report: &serde_json::Value) -> (Events, Events) {
    let events = report["workload_events"].as_array().unwrap();
    let pick = |kind: &str| events.iter().filter(|e| e["event"] == kind).map(|e| (e["a"].as_u64().unwrap(), e["b"].as_u64().unwrap())).collect::<Vec<_>>();
    (pick("Checksum"), pick("Mismatch"))
}

/// The checksum workload's buffer (guest-physical start, pages).
fn buffer(report: &serde_json::Value) -> (u64, u64) {
    let e = report["workload_events"].as_array().unwrap().iter().find(|e| e["event"] == "BufferReady").expect("the workload reported its buffer");
    (e["a"].as_u64().unwrap(), e["b"].as_u64().unwrap())
}

/// A checksum workload (4096 pages, an eighth rewritten every 50 ms round)
/// snapshotted mid-run: a full snapshot, then two diffs 300 ms apart (six
/// rounds of rewrites each). Returns the finished run's report, the full
/// snapshot and the diffs.
fn snapshotted_checksum_run(dir: &TempDir) -> (serde_json::Value, PathBuf, PathBuf, PathBuf) {
    let socket = dir.path().join("api.sock");
    let vm = Vmm::run_json(["--mem", "64M", "--workload", "checksum:pages=4096,rounds=40,ms=50", "--api-socket"]).arg(&socket).spawn();
    wait_workload_started(&vm, Duration::from_secs(120));
    // Let a few rounds pass.
    std::thread::sleep(Duration::from_millis(200));
    let full = dir.path().join("full");
    let d1 = dir.path().join("d1");
    let d2 = dir.path().join("d2");
    ctl(&socket, &["snapshot", "--full", full.to_str().unwrap()]);
    for d in [&d1, &d2] {
        std::thread::sleep(Duration::from_millis(300));
        let r = ctl(&socket, &["snapshot", "--diff", d.to_str().unwrap()]);
        assert_eq!(r["state"], "running", "the guest was mid-workload: {r}");
        // ~6 rounds rewrite about half of the 16 MiB buffer.
        assert!(r["data"]["memory_bytes"].as_u64().unwrap() > 2 << 20, "the diff holds the pages the guest rewrote: {r}");
    }
    let original = shut_down_when_idle(vm, &socket, Duration::from_secs(120));
    original.assert_success();
    let report = original.json();
    let (sums, bad) = checks(&report);
    assert_eq!(sums.len(), 40, "the original run reported every round");
    assert!(bad.is_empty(), "the original run found no differing page: {bad:?}");
    let mut distinct: Vec<u64> = sums.iter().map(|s| s.1).collect();
    distinct.dedup();
    assert_eq!(distinct.len(), 40, "every round rewrote pages, so no round's checksum equals the round before's");
    (report, full, d1, d2)
}

#[test]
fn a_guest_restored_from_a_chain_of_diffs_finds_every_page_it_rewrote() {
    let dir = TempDir::new("snap-continue");
    let (original, full, d1, d2) = snapshotted_checksum_run(&dir);
    let (reference, _) = checks(&original);
    for target in [&full, &d1, &d2] {
        for mode in ["copy", "lazy"] {
            let what = format!("{mode} restore of {}", target.display());
            let r = restore(target, &["--restore-mode", mode]);
            r.assert_success();
            let report = r.json();
            let (after, bad) = checks(&report);
            // The guest checked every page against its last write at the
            // start of each round after the restore, and once more at the end.
            assert!(bad.is_empty(), "{what}: the guest found differing pages {bad:?}");
            assert_eq!(report["exit_status"], 0, "{what}");
            assert!(!after.is_empty(), "{what}: the restored guest went on with its rounds");
            assert!(after[0].0 > 0, "{what}: it continued where it was (round {} first), not from the start", after[0].0);
            assert_eq!(after.last().map(|a| a.0), Some(39), "{what}: and ran to the last round");
            for (round, c) in after {
                assert_eq!(c, reference[round as usize].1, "{what}: round {round} rewrote the same pages as the original run");
            }
        }
    }
}

/// Drops every chunk of `diff` that holds part of guest RAM `[start, end)`,
/// fixing up chunks.bin's count and checksum in the manifest, as a diff
/// that lost those pages would look. Returns the chunks dropped.
fn drop_diff_pages(diff: &Path, start: u64, end: u64) -> usize {
    let records = std::fs::read(diff.join("chunks.bin")).unwrap();
    let kept: Vec<u8> = records
        .chunks_exact(24)
        .filter(|r| {
            let ram = u64::from_le_bytes(r[0..8].try_into().unwrap());
            let len = u64::from(u32::from_le_bytes(r[16..20].try_into().unwrap()));
            ram + len <= start || ram >= end
        })
        .flatten()
        .copied()
        .collect();
    std::fs::write(diff.join("chunks.bin"), &kept).unwrap();
    edit_manifest(diff, |v| {
        v["chunk_count"] = serde_json::json!(kept.len() / 24);
        v["chunks_crc32"] = serde_json::json!(crc32fast::hash(&kept));
    });
    (records.len() - kept.len()) / 24
}

#[test]
fn a_diff_that_lost_guest_writes_is_caught_by_the_guest() {
    let dir = TempDir::new("snap-lost");
    let (original, _full, d1, _d2) = snapshotted_checksum_run(&dir);
    let (buf, pages) = buffer(&original);
    // 64 MiB guests have one RAM region at 0: RAM offset = guest-physical.
    let dropped = drop_diff_pages(&d1, buf, buf + pages * 4096);
    assert!(dropped > 0, "the diff held pages of the buffer");
    for mode in ["copy", "lazy"] {
        let r = restore(&d1, &["--restore-mode", mode]);
        let report = r.json();
        let (_, bad) = checks(&report);
        assert!(!bad.is_empty() && bad[0].1 > 0, "{mode}: the guest noticed pages that went back to the full snapshot's contents\n{}", r.describe());
        assert_ne!(report["exit_status"], 0, "{mode}");
        assert_ne!(r.code(), 0, "{mode}: the run fails");
    }
}

#[test]
fn a_full_snapshot_of_a_mostly_untouched_guest_is_sparse() {
    let dir = TempDir::new("snap-sparse");
    let socket = dir.path().join("api.sock");
    // Without the self-test the guest touches a few MiB of its 1 GiB.
    let vm = Vmm::run_json(["--mem", "1G", "--skip-selftest", "--api-socket"]).arg(&socket).spawn();
    wait_idle(&socket, Duration::from_secs(60), "the guest never idled");
    let snap = dir.path().join("full");
    let r = ctl(&socket, &["snapshot", "--full", snap.to_str().unwrap()]);
    ctl(&socket, &["shutdown"]);
    vm.wait(Duration::from_secs(30)).assert_success();
    let saved = r["data"]["memory_bytes"].as_u64().unwrap();
    let meta = std::fs::metadata(snap.join("memory.bin")).unwrap();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    assert_eq!(meta.len(), 1 << 30, "the image is as long as RAM");
    assert!(saved < 64 << 20, "only touched pages were saved: {saved} bytes");
    assert!(allocated < 64 << 20, "the untouched pages are holes: {allocated} bytes allocated for a {} byte image", meta.len());
    assert!(allocated >= saved, "the saved pages are on disk");
    // And the holes read back as zeros: the restored guest runs.
    restore(&snap, &[]).assert_success();
}

#[test]
fn a_guest_that_zeroed_its_ram_snapshots_as_holes_and_restores_without_writing_them() {
    // The self-test writes a pattern over all free RAM of the 1 GiB guest
    // and zeroes it again: ~1 GiB resident on the host that holds nothing.
    // The checksum workload then keeps 4 MiB of data, rewritten as it goes.
    let dir = TempDir::new("snap-zero");
    let socket = dir.path().join("api.sock");
    let vm = Vmm::run_json(["--mem", "1G", "--backing", "anon", "--workload", "checksum:pages=1024,rounds=30,ms=50", "--api-socket"]).arg(&socket).spawn();
    wait_workload_started(&vm, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(200));
    let snap = dir.path().join("full");
    let r = ctl(&socket, &["snapshot", "--full", snap.to_str().unwrap()]);
    let original = shut_down_when_idle(vm, &socket, Duration::from_secs(120));
    original.assert_success();
    let resident_before = memvisor_tests::report::total(&original.json(), "resident_bytes");
    assert!(resident_before > 900 << 20, "the self-test touched the guest's RAM: {resident_before} bytes resident");
    let saved = r["data"]["memory_bytes"].as_u64().unwrap();
    let image = snap.join("memory.bin");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 30, "the image is as long as RAM");
    assert!(saved < 24 << 20, "only pages holding data were saved: {saved} bytes");
    assert!(allocated(&image) < 24 << 20, "zero pages are holes: {} bytes allocated", allocated(&image));
    // Restored by copy, the zero pages are not written (fresh RAM is zero):
    // the VM holds about what was saved, and the guest finds every page of
    // its buffer as it left it and ends with the original run's checksums.
    let (reference, _) = checks(&original.json());
    let r = restore(&snap, &["--restore-mode", "copy"]);
    r.assert_success();
    let report = r.json();
    let resident = memvisor_tests::report::total(&report, "resident_bytes");
    assert!(resident < 48 << 20, "a copy restore leaves zero pages untouched: {resident} bytes resident");
    let (after, bad) = checks(&report);
    assert!(bad.is_empty(), "the restored guest found differing pages {bad:?}");
    assert!(!after.is_empty() && after[0].0 > 0, "the restored guest went on from where it was: {after:?}");
    for (round, c) in after {
        assert_eq!(c, reference[round as usize].1, "round {round}'s checksum matches the original run's");
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
    // self-test, which zeroes them again: zero pages are holes, so the image
    // holds little (memory_file's unit test
    // a_full_image_of_ram_split_by_the_mmio_hole_writes_both_sides has data
    // right up to both sides of the hole).
    let dir = TempDir::new("snap-5g");
    let socket = dir.path().join("api.sock");
    // Generous hang guards: 5 GiB is written and read back, and CI machines
    // share their disk.
    let vm = Vmm::run_json(["--mem", "5G", "--api-socket"]).arg(&socket).timeout(Duration::from_secs(400)).spawn();
    wait_idle(&socket, Duration::from_secs(300), "the 5 GiB guest never idled");
    let snap = dir.path().join("full");
    let r = ctl(&socket, &["snapshot", "--full", snap.to_str().unwrap()]);
    let saved = r["data"]["memory_bytes"].as_u64().unwrap();
    assert!(saved < 64 << 20, "the zeroed pages of both regions are holes: {r}");
    assert_eq!(std::fs::metadata(snap.join("memory.bin")).unwrap().len(), 5 << 30, "the image spans both regions");
    ctl(&socket, &["shutdown"]);
    vm.wait(Duration::from_secs(120)).assert_success();
    let restored = Vmm::new(["restore", "--json"]).arg(&snap).timeout(Duration::from_secs(400)).output();
    restored.assert_success();
    let report = restored.json();
    assert_eq!(report["memory"].as_array().unwrap().len(), 2, "two RAM regions");
    assert_eq!(report["memory"][1]["guest_start"], 1u64 << 32);
    // A lazily restored VM reads all of both regions to save them (its
    // untouched pages live in the image it came from, mapped privately):
    // it saves the same data pages as the original, and that snapshot
    // restores too.
    let again = dir.path().join("again.sock");
    let lazy = Vmm::new(["restore", "--json"]).arg(&snap).args(&["--restore-mode", "lazy", "--api-socket"]).arg(&again).timeout(Duration::from_secs(400)).spawn();
    wait_idle(&again, Duration::from_secs(300), "the lazily restored guest never idled");
    let snap2 = dir.path().join("full-again");
    let r = ctl(&again, &["snapshot", "--full", snap2.to_str().unwrap()]);
    assert_eq!(r["data"]["memory_bytes"].as_u64().unwrap(), saved, "the data pages the image held: {r}");
    ctl(&again, &["shutdown"]);
    lazy.wait(Duration::from_secs(120)).assert_success();
    Vmm::new(["restore", "--json"]).arg(&snap2).timeout(Duration::from_secs(400)).output().assert_success();
}

#[test]
fn pages_the_guest_rewrites_between_a_diffs_two_stops_are_saved_as_of_the_second() {
    // The checksum workload with no wait between rounds: the guest rewrites
    // an eighth of its 32 MiB buffer every few ms, all through each diff,
    // so pages are written after the first stop's harvest, while the
    // control server pre-copies them. The restored guest checks every page
    // against its last write before each round.
    let dir = TempDir::new("snap-precopy");
    let socket = dir.path().join("api.sock");
    let rounds = 600;
    let vm = Vmm::run_json(["--mem", "128M", "--workload", &format!("checksum:pages=8192,rounds={rounds},ms=0"), "--api-socket"]).arg(&socket).spawn();
    wait_workload_started(&vm, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(100));
    ctl(&socket, &["snapshot", "--full", dir.path().join("full").to_str().unwrap()]);
    let mut diffs = Vec::new();
    let mut late = 0;
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(100));
        let d = dir.path().join(format!("d{i}"));
        let r = ctl(&socket, &["snapshot", "--diff", d.to_str().unwrap()]);
        assert_eq!(r["state"], "running", "the guest was mid-workload: {r}");
        assert!(r["data"]["precopied_bytes"].as_u64().unwrap() > 1 << 20, "the diff was pre-copied: {r}");
        late += r["data"]["late_bytes"].as_u64().unwrap();
        diffs.push(d);
    }
    assert!(late > 0, "the guest wrote pages between the stops of some diff");
    let original = shut_down_when_idle(vm, &socket, Duration::from_secs(240));
    original.assert_success();
    let (reference, bad) = checks(&original.json());
    assert!(bad.is_empty(), "the original run found no differing page: {bad:?}");
    for (i, d) in diffs.iter().enumerate() {
        let modes: &[&str] = if i + 1 == diffs.len() { &["copy", "lazy"] } else { &["copy"] };
        for mode in modes {
            let what = format!("{mode} restore of {}", d.display());
            let r = restore(d, &["--restore-mode", mode]);
            r.assert_success();
            let report = r.json();
            let (after, bad) = checks(&report);
            assert!(bad.is_empty(), "{what}: the guest found differing pages {bad:?}");
            assert!(!after.is_empty() && after[0].0 > 0, "{what}: it continued mid-workload");
            assert_eq!(after.last().map(|a| a.0), Some(rounds - 1), "{what}: and ran to the last round");
            for (round, c) in after {
                assert_eq!(c, reference[round as usize].1, "{what}: round {round}'s checksum matches the original run's");
            }
        }
    }
}

/// Bytes of `path` allocated on disk (a sparse file's holes take none).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// The balloon's sizes of a `balloon get` answer: (target, actual, in
/// balloon, reclaimed, pending).
fn balloon_sizes(b: &serde_json::Value) -> [u64; 5] {
    ["target_bytes", "actual_bytes", "balloon_bytes", "reclaimed_bytes", "pending_bytes"].map(|k| b[k].as_u64().unwrap_or(u64::MAX))
}

/// Deflates a restored VM to 0, lets the guest's driver write and verify
/// every page it got back (the workload's one round then ends), and checks
/// that `expected` bytes were verified, all of them good, and that the
/// guest, which sleeps until the balloon interrupts it (`irq=1`), was woken
/// through the restored irqfd.
fn deflate_and_verify(b: balloon_util::BalloonVm, expected: u64, what: &str) {
    let (sum, good, verified, report) = deflate_to_end(b);
    assert_eq!((sum, good), (expected, expected), "{what}: every returned page written and read back by the guest: {verified:?}");
    let injections = report["kvm_stats"]["vcpus"][0]["irq_injections"].as_u64().unwrap_or(0);
    assert!(injections >= 1, "{what}: the restored guest was interrupted by the balloon ({injections} injections)");
}

/// Deflates to 0 and lets the workload end: the bytes the guest verified,
/// those that read back right, its `BalloonVerified` events and the run
/// report.
fn deflate_to_end(mut b: balloon_util::BalloonVm) -> (u64, u64, Vec<(u64, u64)>, serde_json::Value) {
    b.set_and_wait(0);
    let report = b.finish().json();
    let verified = balloon_util::events(&report, "BalloonVerified");
    let (sum, good) = verified.iter().fold((0, 0), |(s, g), (a, b)| (s + a, g + b));
    (sum, good, verified, report)
}

/// Starts a balloon VM (`tag`, `args`), inflates it to `bytes`, takes a
/// full snapshot into `snap` and shuts the VM down.
fn snapshot_ballooned(tag: &str, args: &[&str], bytes: u64, snap: &Path) {
    let mut b = balloon_util::BalloonVm::start(tag, args);
    b.set_and_wait(bytes);
    let r = ctl(&b.socket, &["snapshot", "--full", snap.to_str().unwrap()]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(ctl(&b.socket, &["shutdown"])["ok"], true);
    b.vm.wait(Duration::from_secs(60)).assert_success();
}

/// A balloon inflated to 256 MiB of a 512 MiB guest that touched all its
/// RAM: full snapshot; the balloon grows to 320 MiB: diff. Each restores by
/// copy and lazily with the balloon as it was, the reclaimed memory not in
/// the restored VMM, and a deflate whose pages the guest writes and
/// verifies (the driver sleeps until interrupted: `irq=1`).
#[test]
fn a_ballooned_guest_restores_with_its_balloon_and_its_holes() {
    use balloon_util::{BalloonVm, MIB};
    let dir = TempDir::new("snap-balloon");
    let mut b = BalloonVm::start("snap-balloon-vm", &["--mem", "512M", "--balloon", "0", "--workload", "balloon:rounds=1,irq=1"]);
    let full = dir.path().join("full");
    let diff = dir.path().join("diff");
    let at_full = b.set_and_wait(256 * MIB);
    assert_eq!(balloon_sizes(&at_full), [256 * MIB, 256 * MIB, 256 * MIB, 256 * MIB, 0], "{at_full}");
    let r = ctl(&b.socket, &["snapshot", "--full", full.to_str().unwrap()]);
    assert_eq!(r["ok"], true, "{r}");
    // The 256 MiB the guest gave back are holes in the image.
    let image = allocated(&full.join("memory.bin"));
    assert!(image < (512 - 256 + 16) * MIB, "the ballooned pages are not saved: {} MiB allocated", image / MIB);
    let at_diff = b.set_and_wait(320 * MIB);
    let r = ctl(&b.socket, &["snapshot", "--diff", diff.to_str().unwrap()]);
    // The 64 MiB ballooned since are released (VMM writes) but not saved.
    let saved = r["data"]["memory_bytes"].as_u64().unwrap();
    assert!(saved < 16 * MIB, "the diff skips the newly ballooned pages: {saved} bytes saved; {r}");
    assert_eq!(ctl(&b.socket, &["shutdown"])["ok"], true);
    b.vm.wait(Duration::from_secs(60)).assert_success();

    for (snap, state, held) in [(&full, &at_full, 256 * MIB), (&diff, &at_diff, 320 * MIB)] {
        for mode in ["copy", "lazy"] {
            let what = format!("{mode} restore of {}", snap.display());
            let mut r = BalloonVm::restore("snap-balloon-restored", snap, &["--restore-mode", mode]);
            let got = r.get();
            assert_eq!(balloon_sizes(&got), [held, held, held, held, 0], "{what}: the balloon is as it was: {got}");
            assert_eq!(got["features"], state["features"], "{what}: {got}");
            assert_eq!(got["metrics"]["inflated_pages"], state["metrics"]["inflated_pages"], "{what}: the metrics came back: {got}");
            let resident = r.resident();
            eprintln!("{what}: resident {} MiB with {} MiB in the balloon", resident / MIB, held / MIB);
            assert!(resident + held <= (512 + 24) * MIB, "{what}: the reclaimed memory stays with the host: {} MiB resident", resident / MIB);
            deflate_and_verify(r, held, &what);
        }
    }
}

/// hugetlb-2m: a host page half in the balloon (1 MiB pending) survives a
/// snapshot; restored, the rest of it arrives and the host page is
/// released.
#[test]
fn pending_pieces_of_a_huge_host_page_survive_a_snapshot() {
    use balloon_util::{BalloonVm, MIB};
    use memvisor_tests::hugetlb::{PageSize, Reservation};
    // 128 pages for the guest, one VM at a time.
    let _pool = Reservation::reserve(PageSize::M2, 136).unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("snap-pending");
    let snap = dir.path().join("full");
    let mut b = BalloonVm::start("snap-pending-vm", &["--mem", "256M", "--backing", "hugetlb-2m", "--balloon", "0", "--workload", "balloon:rounds=1,irq=1"]);
    b.set_and_wait(4 * MIB);
    // As in balloon.rs: the driver deflates the first 1 MiB of its 4 MiB
    // block, leaving half of a host page in the balloon.
    let s = b.set_and_wait(3 * MIB);
    assert_eq!(balloon_sizes(&s), [3 * MIB, 3 * MIB, 3 * MIB, 2 * MIB, MIB], "{s}");
    assert_eq!(ctl(&b.socket, &["snapshot", "--full", snap.to_str().unwrap()])["ok"], true);
    assert_eq!(ctl(&b.socket, &["shutdown"])["ok"], true);
    b.vm.wait(Duration::from_secs(60)).assert_success();

    let mut r = BalloonVm::restore("snap-pending-restored", &snap, &[]);
    let got = r.get();
    assert_eq!(balloon_sizes(&got), [3 * MIB, 3 * MIB, 3 * MIB, 2 * MIB, MIB], "the pending half came back pending: {got}");
    assert_eq!(got["host_page_bytes"].as_u64(), Some(2 * MIB));
    assert_eq!(got["metrics"]["partial_host_page_pieces"], s["metrics"]["partial_host_page_pieces"]);
    let hugetlb = |b: &BalloonVm| {
        let text = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", b.vm.pid())).unwrap();
        text.lines().filter(|l| l.contains("_Hugetlb:")).filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).sum::<u64>() * 1024
    };
    let before = hugetlb(&r);
    assert!(before <= 254 * MIB, "the released host page is not in the restored VMM: {} MiB of huge pages", before / MIB);
    // The rest of the host page arrives: released now.
    let s = r.set_and_wait(4 * MIB);
    assert_eq!(balloon_sizes(&s), [4 * MIB, 4 * MIB, 4 * MIB, 4 * MIB, 0], "the host page is complete: {s}");
    let after = hugetlb(&r);
    // The host page held only zeros when it was saved (the guest's driver
    // zeroes what it verified), so the restore left it a hole and there is
    // no resident huge page to give back: the release shows in the
    // balloon's counters, and no huge page was taken meanwhile.
    assert!(after <= before, "no huge page was taken ({before} -> {after})");
    let released = |v: &serde_json::Value| v["metrics"]["released_bytes"].as_u64().unwrap();
    assert_eq!(released(&s) - released(&got), 2 * MIB, "the completed host page was released: {s}");
    deflate_and_verify(r, 4 * MIB, "the restored hugetlb guest");
}

/// Rewrites a snapshot's state.json through `f` and fixes the manifest's
/// checksum of it, so that only the balloon's own checks can refuse it.
fn edit_state(snap: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let state_path = snap.join("state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    f(&mut state);
    let bytes = serde_json::to_vec(&state).unwrap();
    std::fs::write(&state_path, &bytes).unwrap();
    edit_manifest(snap, |m| m["state_crc32"] = serde_json::json!(crc32fast::hash(&bytes)));
}

/// Rewrites a snapshot's manifest through `f` and seals it again (as a
/// careful forger would), so that only the checks after the manifest's own
/// checksum can refuse it.
fn edit_manifest(snap: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = snap.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    let mut m: memvisor::snapshot::format::Manifest = serde_json::from_value(v).unwrap();
    m.seal();
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// A balloon record that is inconsistent, truncated or missing is refused
/// with one clear line and a nonzero exit, in both restore modes, and no
/// file is changed by the attempt.
#[test]
fn a_corrupted_balloon_record_is_refused() {
    use balloon_util::{BalloonVm, MIB};
    let dir = TempDir::new("snap-balloon-bad");
    let snap = dir.path().join("full");
    snapshot_ballooned("snap-balloon-bad-vm", &["--mem", "128M", "--balloon", "0", "--workload", "balloon:rounds=1"], 16 * MIB, &snap);
    let (state, manifest) = (std::fs::read(snap.join("state.json")).unwrap(), std::fs::read(snap.join("manifest.json")).unwrap());
    let put_back = || {
        std::fs::write(snap.join("state.json"), &state).unwrap();
        std::fs::write(snap.join("manifest.json"), &manifest).unwrap();
    };
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &[&str]); 7] = [
        (|s| s["devices"]["balloon"]["transport"]["queues"][0]["size"] = 100.into(), &["balloon's saved state is invalid", "queue 0's size 100 is not a power of two"]),
        (|s| s["devices"]["balloon"]["transport"]["queues"][1]["used_ring"] = (1u64 << 40).into(), &["queue 1 is ready but its rings are not inside guest RAM"]),
        // Pending pieces for pages beyond the 32768 of 128 MiB.
        (|s| s["devices"]["balloon"]["device"]["pages"].as_array_mut().unwrap().push(serde_json::json!([40000, 8])), &["beyond the 32768 pages of guest RAM"]),
        (|s| s["devices"]["balloon"]["device"]["version"] = 7.into(), &["balloon state version 7 is not supported"]),
        (|s| s["devices"]["balloon"]["transport"]["status"] = 0x44.into(), &["device status 0x44"]),
        // Truncated: a field gone.
        (|s| _ = s["devices"]["balloon"]["device"].as_object_mut().unwrap().remove("pages"), &["state.json", "missing field `pages`"]),
        // Gone altogether, as from a build that did not save it.
        (|s| _ = s["devices"].as_object_mut().unwrap().remove("balloon"), &["holds no balloon state"]),
    ];
    for (edit, needles) in cases {
        edit_state(&snap, edit);
        for mode in ["copy", "lazy"] {
            assert_refused(&dir, &snap, &["--restore-mode", mode], needles);
        }
        put_back();
    }
    // Untouched, it restores (and the guest's round ends once deflated).
    let r = BalloonVm::restore("snap-balloon-bad-ok", &snap, &[]);
    deflate_and_verify_polling(r, 16 * MIB);
}

/// As [`deflate_and_verify`], for a driver that polls (no interrupt check).
fn deflate_and_verify_polling(b: balloon_util::BalloonVm, expected: u64) {
    let (_, good, verified, _) = deflate_to_end(b);
    assert_eq!(good, expected, "{verified:?}");
}

/// A lazily restored VM maps its RAM privately from the snapshot image, and
/// its balloon still gives memory back: restored with 256 MiB ballooned,
/// the guest takes them back and writes every page (private copies in the
/// VMM), inflates again, and the VMM's resident memory drops by ≥ 95 % of
/// 256 MiB with no release refused.
#[test]
fn a_lazily_restored_guest_gives_memory_back_through_its_balloon() {
    use balloon_util::{BalloonVm, MIB};
    let dir = TempDir::new("snap-lazy-reinflate");
    let snap = dir.path().join("full");
    snapshot_ballooned("snap-lazy-reinflate-vm", &["--mem", "512M", "--balloon", "0", "--workload", "balloon:rounds=2"], 256 * MIB, &snap);

    let mut r = BalloonVm::restore("snap-lazy-reinflate-restored", &snap, &["--restore-mode", "lazy"]);
    // The first round ends: the guest writes and verifies the 256 MiB.
    r.set_and_wait(0);
    let before = r.resident();
    assert!(before >= 256 * MIB * 95 / 100, "the guest's copies of the deflated pages are resident: {} MiB", before / MIB);
    let s = r.set_and_wait(256 * MIB);
    assert!(s["reclaimed_bytes"].as_u64() >= Some(256 * MIB), "{s}");
    assert_eq!(s["metrics"]["release_errors"], 0, "no release was refused on the image mapping: {s}");
    let after = r.resident();
    let dropped = before.saturating_sub(after);
    assert!(dropped >= 256 * MIB * 95 / 100, "the VMM's resident memory dropped by {} MiB ({} -> {} MiB) for 256 MiB ballooned", dropped / MIB, before / MIB, after / MIB);
    // The second round: the guest takes them back once more and its
    // workload ends.
    let (sum, good, verified, _) = deflate_to_end(r);
    assert_eq!((sum, good), (512 * MIB, 512 * MIB), "both deflates verified every page: {verified:?}");
}
