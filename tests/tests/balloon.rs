//! The virtio balloon with our guest's driver, for real: inflating gives
//! memory back to the host (RSS drops) for anonymous, memfd and hugetlb
//! backings; deflated pages are written and verified by the guest; free
//! page reporting returns memory without an inflate; deflate-on-OOM gives
//! pages back when the guest's allocator runs dry; stats arrive.

mod balloon_util;

use std::time::Duration;

use balloon_util::{BalloonVm, MIB, ctl, events};
use memvisor_tests::Vmm;
use memvisor_tests::hugetlb::{PageSize, Reservation};
use memvisor_tests::report::assert_self_test_passed;
use serde_json::Value;

/// Inflates 512 MiB of a 1 GiB guest that touched all its RAM (the
/// self-test writes every free page), checks the RSS drop, deflates, and
/// checks that the guest wrote and verified every deflated page.
fn inflate_deflate(tag: &str, backing: &str) {
    let mut b = BalloonVm::start(tag, &["--mem", "1G", "--backing", backing, "--balloon", "0", "--workload", "balloon:rounds=1"]);
    let before = b.resident();
    assert!(before > 900 * MIB, "the guest touched its RAM: {before} bytes resident");
    let state = b.set_and_wait(512 * MIB);
    let after = b.resident();
    let dropped = before.saturating_sub(after);
    eprintln!("{backing}: resident {} MiB -> {} MiB ({} MiB returned)", before / MIB, after / MIB, dropped / MIB);
    assert!(dropped * 100 >= 95 * 512 * MIB, "{backing}: inflating 512 MiB returned only {dropped} bytes ({before} -> {after}); {state}");
    assert_eq!(state["balloon_bytes"].as_u64(), Some(512 * MIB), "{state}");
    assert_eq!(state["reclaimed_bytes"].as_u64(), Some(512 * MIB), "2 MiB blocks leave nothing pending: {state}");
    assert_eq!(state["pending_bytes"].as_u64(), Some(0), "{state}");
    assert_eq!(state["metrics"]["release_errors"].as_u64(), Some(0), "{state}");

    let state = b.set_and_wait(0);
    assert_eq!(state["balloon_bytes"].as_u64(), Some(0), "{state}");
    let r = b.finish();
    let report = r.json();
    assert_self_test_passed(&report);
    let verified = events(&report, "BalloonVerified");
    let (expected, good) = verified.iter().fold((0, 0), |(e, g), (a, b)| (e + a, g + b));
    assert_eq!(expected, 512 * MIB, "every deflated page was verified: {verified:?}");
    assert_eq!(good, expected, "deflated pages hold what the guest wrote: {verified:?}");
    assert_eq!(report["balloon"]["metrics"]["deflated_pages"].as_u64(), Some(131_072));
    assert_eq!(report["balloon"]["metrics"]["inflated_pages"].as_u64(), Some(131_072));
}

#[test]
fn balloon_inflate_returns_rss_to_host_anon() {
    inflate_deflate("balloon-anon", "anon");
}

#[test]
fn balloon_inflate_returns_rss_to_host_memfd() {
    inflate_deflate("balloon-memfd", "memfd");
}

#[test]
fn balloon_inflate_returns_rss_to_host_hugetlb_2m() {
    let _pool = Reservation::reserve(PageSize::M2, 512).unwrap_or_else(|e| panic!("{e}"));
    inflate_deflate("balloon-hugetlb", "hugetlb-2m");
}

/// Free page reporting alone, on `backing`: the driver reports only after
/// a deflate (`report=2`), so the VMM's resident memory is measured before
/// any report; a small inflate/deflate round trip then triggers the report.
fn reporting_drops_rss(tag: &str, backing: &str) -> BalloonVm {
    let mut b = BalloonVm::start(tag, &["--mem", "1G", "--backing", backing, "--balloon", "0", "--workload", "balloon:report=2"]);
    let before = b.resident();
    let state = b.get();
    assert_eq!(state["metrics"]["reported_bytes"].as_u64(), Some(0), "nothing reported yet: {state}");
    assert!(before > 900 * MIB, "{backing}: the guest touched its RAM: {before} bytes resident");
    b.set_and_wait(64 * MIB);
    b.set_and_wait(0);
    let state = b.wait_for("free page reports", Duration::from_secs(60), |s| s["metrics"]["reported_released_bytes"].as_u64().unwrap_or(0) > 0);
    let after = b.resident();
    eprintln!("{backing}: resident {} MiB before reporting, {} MiB after", before / MIB, after / MIB);
    assert_eq!(state["balloon_bytes"].as_u64(), Some(0), "the balloon is empty again: {state}");
    let reported = state["metrics"]["reported_released_bytes"].as_u64().unwrap_or(0);
    assert!(reported >= 800 * MIB, "most of the idle guest's RAM is reported free: {state}");
    let dropped = before.saturating_sub(after);
    assert!(dropped >= 700 * MIB && dropped * 100 >= reported * 85, "{backing}: reporting {reported} bytes dropped the VMM's resident memory by only {dropped} ({before} -> {after})");
    b
}

#[test]
fn free_page_reporting_returns_memory_without_inflate() {
    let mut b = reporting_drops_rss("balloon-report", "anon");
    // Stats come from the same driver.
    let stats = ctl(&b.socket, &["balloon", "stats"]);
    assert_eq!(stats["ok"], Value::Bool(true), "{stats}");
    let free = stats["data"]["free_memory"].as_u64().unwrap_or(0);
    let total = stats["data"]["total_memory"].as_u64().unwrap_or(0);
    assert!(total > 900 * MIB && free > 800 * MIB && free <= total, "{stats}");
    // A snapshot in the middle (the balloon's state is saved with it,
    // tests/tests/snapshots.rs restores such snapshots) leaves the running
    // VM's balloon working: a round trip through it still verifies every
    // deflated page.
    let snap = ctl(&b.socket, &["snapshot", "--full", b.socket.with_extension("snap").to_str().unwrap_or_default()]);
    assert_eq!(snap["ok"], Value::Bool(true), "{snap}");
    b.set_and_wait(64 * MIB);
    b.set_and_wait(0);
    assert_eq!(ctl(&b.socket, &["shutdown"])["ok"], Value::Bool(true));
    let r = b.vm.wait(Duration::from_secs(60));
    r.assert_success();
    let report = r.json();
    let verified = events(&report, "BalloonVerified");
    assert!(verified.iter().all(|(a, b)| a == b) && !verified.is_empty(), "{verified:?}");
    assert!(!events(&report, "BalloonReported").is_empty());
}

#[test]
fn free_page_reporting_returns_memory_without_inflate_memfd() {
    let b = reporting_drops_rss("balloon-report-memfd", "memfd");
    assert_eq!(ctl(&b.socket, &["shutdown"])["ok"], Value::Bool(true));
    b.vm.wait(Duration::from_secs(60)).assert_success();
}

#[test]
fn a_huge_host_page_partly_in_the_balloon_is_pending_until_the_rest_arrives() {
    let _pool = Reservation::reserve(PageSize::M2, 128).unwrap_or_else(|e| panic!("{e}"));
    let mut b = BalloonVm::start("balloon-pending", &["--mem", "256M", "--backing", "hugetlb-2m", "--balloon", "0", "--workload", "balloon:rounds=1"]);
    let hugetlb = |b: &BalloonVm| {
        let text = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", b.vm.pid())).expect("read smaps_rollup");
        let kib: u64 = text.lines().filter(|l| l.contains("_Hugetlb:")).filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).sum();
        kib * 1024
    };
    let before = hugetlb(&b);
    assert!(before > 200 * MIB, "the guest touched its huge pages: {before} bytes");
    // 4 MiB: one 4 MiB block, two whole host pages, released.
    let s = b.set_and_wait(4 * MIB);
    assert_eq!(s["host_page_bytes"].as_u64(), Some(2 * MIB), "{s}");
    assert_eq!((s["reclaimed_bytes"].as_u64(), s["pending_bytes"].as_u64()), (Some(4 * MIB), Some(0)), "{s}");
    assert_eq!(before.saturating_sub(hugetlb(&b)), 4 * MIB);
    // 3 MiB: the driver splits the block and deflates its first 1 MiB; the
    // rest of that host page stays in the balloon, pending.
    let s = b.set_and_wait(3 * MIB);
    let mid = hugetlb(&b);
    assert_eq!(s["balloon_bytes"].as_u64(), Some(3 * MIB), "{s}");
    assert_eq!(s["pending_bytes"].as_u64(), Some(MIB), "half a host page waits for its other half: {s}");
    assert_eq!(s["reclaimed_bytes"].as_u64(), Some(2 * MIB), "{s}");
    assert_eq!(before.saturating_sub(mid), 2 * MIB, "the guest wrote the deflated half: its host page is back ({before} -> {mid})");
    // 4 MiB again: the buddy allocator hands out the 1 MiB block just
    // freed (the head of its list), completing the host page.
    let s = b.set_and_wait(4 * MIB);
    let after = hugetlb(&b);
    assert_eq!(s["pending_bytes"].as_u64(), Some(0), "the host page is complete: {s}");
    assert_eq!(s["reclaimed_bytes"].as_u64(), Some(4 * MIB), "{s}");
    assert_eq!(mid.saturating_sub(after), 2 * MIB, "the completed host page was released ({mid} -> {after})");
    assert!(s["metrics"]["partial_host_page_pieces"].as_u64() >= Some(255), "{s}");
    b.set_and_wait(0);
    let report = b.finish().json();
    let balloon = &report["balloon"];
    assert_eq!((balloon["balloon_bytes"].as_u64(), balloon["pending_bytes"].as_u64()), (Some(0), Some(0)), "{balloon}");
    let verified = events(&report, "BalloonVerified");
    assert_eq!(verified.iter().map(|v| v.1).sum::<u64>(), 5 * MIB, "the deflated pages read back right: {verified:?}");
}

#[test]
fn stats_report_the_guest_kernels_fault_counters() {
    // paging=1: a small demand-paging run (minor faults, evictions, major
    // faults from swap) before the driver starts.
    let mut b = BalloonVm::start("balloon-faults", &["--mem", "256M", "--balloon", "0", "--workload", "balloon:rounds=1,paging=1"]);
    let stats = ctl(&b.socket, &["balloon", "stats"]);
    assert_eq!(stats["ok"], Value::Bool(true), "{stats}");
    let (major, minor) = (stats["data"]["major_faults"].as_u64(), stats["data"]["minor_faults"].as_u64());
    b.set_and_wait(4 * MIB);
    b.set_and_wait(0);
    let report = b.finish().json();
    let faults = events(&report, "PagingFaults");
    assert_eq!(faults.len(), 1, "{faults:?}");
    let (pager_minor, pager_major) = faults[0];
    assert!(pager_minor > 0 && pager_major > 0, "the paging run faulted both ways: {faults:?}");
    assert_eq!((minor, major), (Some(pager_minor), Some(pager_major)), "the stats are the kernel's counters: {stats}");
}

#[test]
fn deflate_on_oom_gives_pages_back_when_the_guest_runs_dry() {
    // The target leaves ~110 MiB free; the guest then needs 256 MiB.
    let r = Vmm::run_json(["--mem", "1G", "--balloon", "900M", "--workload", "balloon:oom=256M"]).timeout(Duration::from_secs(300)).output();
    r.assert_success();
    let report = r.json();
    let oom = events(&report, "BalloonOomDeflated");
    assert_eq!(oom.len(), 1, "{oom:?}");
    let (deflated, good) = oom[0];
    assert!(deflated >= (256 - 120) * 256, "the driver deflated on OOM: {deflated} pages");
    assert_eq!(good, 256 * MIB + deflated * 4096, "the whole allocation and every deflated page verified");
    let balloon = &report["balloon"];
    assert_eq!(balloon["metrics"]["deflated_pages"].as_u64(), Some(deflated), "{balloon}");
    assert_eq!(balloon["actual_bytes"].as_u64(), Some(900 * MIB - deflated * 4096), "{balloon}");
    assert_eq!(balloon["target_bytes"].as_u64(), Some(900 * MIB), "the host's target did not change");
}

#[test]
fn balloon_commands_without_a_balloon_are_refused() {
    let dir = memvisor_tests::vmm::TempDir::new("balloon-none");
    let socket = dir.path().join("api.sock");
    let mut vm = Vmm::run_json(["--api-socket".as_ref(), socket.as_os_str()]).spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = Vmm::new(["ctl".as_ref(), socket.as_os_str(), "balloon".as_ref(), "get".as_ref()]).output();
    assert!(r.error_line().contains("no balloon"), "{}", r.describe());
    assert!(!vm.has_exited());
    assert_eq!(ctl(&socket, &["shutdown"])["ok"], Value::Bool(true));
    vm.wait(Duration::from_secs(60)).assert_success();
}

#[test]
fn the_driver_can_sleep_until_the_balloon_interrupts_it() {
    // irq=1: the guest routes the balloon's GSI through the IOAPIC and
    // halts between requests; only the device's interrupt (irqfd into the
    // in-kernel irqchip) wakes it.
    let mut b = BalloonVm::start("balloon-irq", &["--mem", "512M", "--balloon", "0", "--workload", "balloon:rounds=1,irq=1"]);
    std::thread::sleep(Duration::from_millis(300));
    let state = b.set_and_wait(128 * MIB);
    assert_eq!(state["reclaimed_bytes"].as_u64(), Some(128 * MIB), "{state}");
    let stats = ctl(&b.socket, &["balloon", "stats"]);
    assert_eq!(stats["ok"], Value::Bool(true), "a stats request wakes the guest too: {stats}");
    b.set_and_wait(0);
    let report = b.finish().json();
    let verified = events(&report, "BalloonVerified");
    assert_eq!(verified.iter().map(|v| v.0).sum::<u64>(), 128 * MIB, "{verified:?}");
    assert!(verified.iter().all(|(a, b)| a == b), "{verified:?}");
    let vcpu = &report["kvm_stats"]["vcpus"][0];
    let injections = vcpu["irq_injections"].as_u64().unwrap_or(0);
    let halts = vcpu["halt_exits"].as_u64().unwrap_or(0);
    assert!(injections >= 3, "two target changes and a stats request were interrupts: {injections} injected");
    assert!(halts >= 3, "the guest halted while it waited: {halts} halts");
}

#[test]
fn the_guest_probes_every_announced_window_until_it_finds_the_balloon() {
    // The user's command line comes first, so the guest meets these two
    // announced windows, where nothing answers (an unhandled MMIO read is
    // all ones, not the virtio magic), before the VMM's own announcement
    // of the balloon; the first is 512-byte aligned, as QEMU's are.
    let decoys = "virtio_mmio.device=512@0xd0010e00:12 virtio_mmio.device=4K@0xd0020000:6";
    let r = Vmm::run_json(["--mem", "256M", "--balloon", "16M", "--workload", "balloon:oom=4M", "--cmdline", decoys]).timeout(Duration::from_secs(300)).output();
    r.assert_success();
    let report = r.json();
    assert_eq!(events(&report, "BalloonOomDeflated").len(), 1, "the driver started and ran: {}", report["workload_events"]);
    assert_eq!(report["balloon"]["actual_bytes"].as_u64(), Some(16 * MIB), "{}", report["balloon"]);
    let probes = report["unhandled"]["mmio_accesses"].as_u64().unwrap_or(0);
    assert!(probes >= 2, "each decoy window was probed: {}", report["unhandled"]);
}
