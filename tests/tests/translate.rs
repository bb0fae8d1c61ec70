//! `vmm translate`: explanations of real translations in a real guest, the
//! errors for addresses that do not translate, and agreement with KVM's own
//! walk (`KVM_TRANSLATE`) over many random addresses under every guest leaf
//! size. On this host (KVM's PVM flavour) `KVM_TRANSLATE` works; a test
//! that found it unavailable fails rather than passing without the check.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use memvisor_tests::Vmm;
use memvisor_tests::hugetlb::{PageSize, Reservation};
use memvisor_tests::vmm::{Running, TempDir};
use serde_json::Value;

/// Kernel direct map base (guest/kernel/src/paging.rs): physical `p` is at `BASE + p`.
const DIRECT_MAP_BASE: u64 = 0xffff_8000_0000_0000;

fn request(socket: &Path, line: &str) -> Value {
    let mut s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("set a read timeout");
    s.write_all(line.as_bytes()).and_then(|()| s.write_all(b"\n")).expect("send the request");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("read the response");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("response {reply:?} to {line:?} is not JSON: {e}"))
}

fn wait_idle(mut vm: Running, socket: &Path) -> Running {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        assert!(!vm.has_exited(), "the VM exited before it idled");
        if let Ok(mut s) = UnixStream::connect(socket) {
            let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
            let mut reply = String::new();
            let _ = BufReader::new(s).read_line(&mut reply);
            if reply.contains("\"idle\"") {
                return vm;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the VM did not idle within 120 s");
}

/// The single `--translate` result of a run.
fn translation(report: &Value, i: usize) -> &Value {
    &report["translations"][i]
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not an unsigned number"))
}

#[test]
fn translate_at_ready_explains_a_direct_map_address_level_by_level() {
    let gva = DIRECT_MAP_BASE + 0x20_1234;
    let r = Vmm::run_json(["--backing", "anon", "--guest-page", "2m", "--translate", &format!("{gva:#x}")]).output();
    r.assert_success();
    let report = r.json();
    let t = translation(&report, 0);
    assert_eq!(u(&t["gva"]), gva);
    let e = &t["explanation"];
    assert!(e.is_object(), "an explanation, not an error: {t}");
    let steps = e["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().map(|s| s["entry"].as_str().unwrap_or("")).collect();
    assert_eq!(names, ["PML4E", "PDPTE", "PDE"], "a 2 MiB leaf ends at the PDE");
    assert_eq!(steps.iter().map(|s| u(&s["index"])).collect::<Vec<_>>(), [256, 0, 1]);
    assert!(steps[2]["flags"]["ps"].as_bool() == Some(true) && steps[2]["flags"]["nx"].as_bool() == Some(true), "{}", steps[2]);
    // Each table is where the entry above points.
    assert_eq!(u(&steps[1]["table_gpa"]), u(&steps[0]["points_to"]));
    assert_eq!(u(&steps[2]["table_gpa"]), u(&steps[1]["points_to"]));
    assert_eq!(u(&e["gpa"]), 0x20_1234, "the direct map maps physical p at BASE + p");
    assert_eq!(u(&e["leaf_bytes"]), 2 << 20);
    assert_eq!(e["kvm"]["available"], Value::Bool(true), "KVM_TRANSLATE works on this host: {}", e["kvm"]);
    assert_eq!(e["kvm"]["agrees"], Value::Bool(true));
    assert_eq!(u(&e["kvm"]["gpa"]), 0x20_1234);
    // Three tables and the page, each in slot 0 with a host frame (root sees PFNs).
    let touched = e["touched"].as_array().expect("touched");
    assert_eq!(touched.len(), 4);
    for x in touched {
        let h = &x["host"];
        assert_eq!(u(&h["slot"]), 0, "{x}");
        assert!(h["hpa"].as_u64().is_some_and(|a| a != 0), "a present page has a host-physical address: {x}");
        assert_eq!(u(&h["hpa"]) & 0xfff, u(&h["gpa"]) & 0xfff, "the page offset survives both dimensions");
        assert_eq!(h["page"], "4k", "anonymous backing without THP: 4 KiB host pages ({x})");
    }
    assert_eq!(touched[3]["what"], "page");
    // n = 3 guest levels; 4 KiB host pages: m = 4 for every address.
    let refs = &e["refs"];
    assert_eq!((u(&refs["native"]), u(&refs["nested"]), u(&refs["nested_formula"]), u(&refs["shadow"])), (3, 19, 19, 4));
}

#[test]
fn translate_shows_hugetlb_host_pages_and_their_shorter_nested_walk() {
    let _pool = Reservation::reserve(PageSize::M2, 128).unwrap_or_else(|e| panic!("{e}"));
    let gva = DIRECT_MAP_BASE + 0x40_0000;
    // Prefaulted: at Ready the guest has not touched the page yet.
    let r = Vmm::run_json(["--guest-page", "2m", "--backing", "hugetlb-2m", "--prefault", "--translate", &format!("{gva:#x}")]).output();
    r.assert_success();
    let report = r.json();
    let e = &translation(&report, 0)["explanation"];
    for x in e["touched"].as_array().expect("touched") {
        assert_eq!(x["host"]["page"], "hugetlb-2m", "{x}");
    }
    // Every guest-physical address sits on a 2 MiB host page: m = 3.
    assert_eq!((u(&e["refs"]["nested"]), u(&e["refs"]["nested_formula"]), u(&e["refs"]["shadow"])), (15, 15, 3));
}

#[test]
fn addresses_that_do_not_translate_get_an_error_naming_the_level_and_the_reason() {
    // The bad-tables hook plants a PML4E pointing into the MMIO hole (slot 3)
    // and one with the reserved PS bit (slot 4).
    let asks = ["0x800000000000", "0x10000000000", "0x0", "0x18000000000", "0x20000000000"];
    let r = Vmm::new(["run", "--json", "--cmdline", "memvisor.test=bad-tables", "--translate", &asks.join(",")]).output();
    assert_ne!(r.code(), 0, "failed translations make the run fail: {}", r.describe());
    assert!(r.stderr.contains("5 of 5 translations failed"), "{}", r.describe());
    let report = r.json();
    let err = |i: usize| translation(&report, i)["error"].as_str().unwrap_or_else(|| panic!("no error for {}: {report}", asks[i])).to_string();
    let e = err(0);
    assert!(e.contains("not a canonical address") && e.contains("bits 63:47"), "{e}");
    let e = err(1);
    assert!(e.contains("not mapped") && e.contains("PML4E at index 2") && e.contains("P=0"), "{e}");
    let e = err(2);
    assert!(e.contains("not mapped") && e.contains("PTE at index 0"), "page 0 is mapped down to the PT, its PTE is not: {e}");
    let e = err(3);
    assert!(e.contains("outside guest RAM") && e.contains("0xc0000000") && e.contains("PDPT table"), "{e}");
    let e = err(4);
    assert!(e.contains("reserved bits 0x80") && e.contains("PML4E at index 4") && e.contains("RSVD"), "{e}");
    for i in 0..asks.len() {
        assert!(!err(i).contains("disagrees"), "KVM also finds no translation: {}", err(i));
    }
}

/// SplitMix64, for reproducible random addresses.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn compare_random_addresses(leaf: &str) -> (usize, usize, Vec<u64>) {
    let dir = TempDir::new(&format!("translate-{leaf}"));
    let socket = dir.path().join("api.sock");
    let vm = Vmm::run_json(["--guest-page".as_ref(), leaf.as_ref(), "--api-socket".as_ref(), socket.as_os_str()]).spawn();
    let vm = wait_idle(vm, &socket);
    let map = request(&socket, "{\"cmd\":\"translate\",\"map\":true}");
    assert_eq!(map["ok"], Value::Bool(true), "{map}");
    let ranges: Vec<(u64, u64, u64, u64)> = map["data"]["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| (u(&r["start"]), u(&r["last"]), u(&r["gpa"]), u(&r["leaf_bytes"])))
        .collect();
    assert!(!ranges.is_empty());
    let mapped = |a: u64| ranges.iter().find(|r| a >= r.0 && a <= r.1);
    let mut rng = 0x5eed_u64 ^ leaf.len() as u64;
    let (mut hits, mut misses) = (0, 0);
    let mut leaves = Vec::new();
    for i in 0..300 {
        let gva = if i % 3 == 2 {
            // Any canonical address: mostly unmapped.
            let a = next(&mut rng) & 0x0000_ffff_ffff_fff8;
            if a & (1 << 47) != 0 { a | 0xffff_0000_0000_0000 } else { a }
        } else {
            let r = ranges[(next(&mut rng) % ranges.len() as u64) as usize];
            r.0 + next(&mut rng) % (r.1 - r.0 + 1)
        };
        let reply = request(&socket, &format!("{{\"cmd\":\"translate\",\"gva\":{gva}}}"));
        match mapped(gva) {
            Some(r) => {
                assert_eq!(reply["ok"], Value::Bool(true), "{gva:#x} is in a mapped range: {reply}");
                let d = &reply["data"];
                assert_eq!(u(&d["gpa"]), r.2 + (gva - r.0), "walk result for {gva:#x} against the map");
                assert_eq!(d["kvm"]["available"], Value::Bool(true), "KVM_TRANSLATE must be usable here: {}", d["kvm"]);
                assert_eq!(d["kvm"]["valid"], Value::Bool(true));
                assert_eq!(u(&d["kvm"]["gpa"]), u(&d["gpa"]), "KVM's walk agrees for {gva:#x}");
                leaves.push(u(&d["leaf_bytes"]));
                hits += 1;
            }
            None => {
                assert_eq!(reply["ok"], Value::Bool(false), "{gva:#x} is not in the map: {reply}");
                let e = reply["error"].as_str().unwrap_or_default();
                assert!(e.contains("not mapped"), "an unmapped address is reported as such: {e}");
                assert!(!e.contains("disagrees"), "{e}");
                misses += 1;
            }
        }
    }
    check_translate_command(&socket, &ranges);
    request(&socket, "{\"cmd\":\"shutdown\"}");
    vm.wait(Duration::from_secs(30)).assert_success();
    leaves.sort_unstable();
    leaves.dedup();
    (hits, misses, leaves)
}

/// `vmm translate SOCKET ...`, the top-level command, and its `vmm ctl`
/// spelling: text for several addresses, JSON lines, the map, and a failure
/// among successes.
fn check_translate_command(socket: &Path, ranges: &[(u64, u64, u64, u64)]) {
    let (lo, hi) = (ranges[0].0, ranges[ranges.len() - 1].0);
    let both = format!("{lo:#x},{hi:#x}");
    let text = Vmm::new(["translate".as_ref(), socket.as_os_str(), both.as_ref()]).output();
    text.assert_success();
    assert_eq!(text.stdout.matches("KVM_TRANSLATE agrees").count(), 2, "one explanation per address: {}", text.stdout);
    assert!(text.stdout.contains("PML4E") && text.stdout.contains("nested (EPT/NPT) walk"), "{}", text.stdout);
    let json = Vmm::new(["translate".as_ref(), socket.as_os_str(), both.as_ref(), "--json".as_ref()]).output();
    json.assert_success();
    let lines: Vec<Value> = json.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}"))).collect();
    assert_eq!(lines.len(), 2, "one JSON line per address: {}", json.stdout);
    assert_eq!((u(&lines[0]["data"]["gva"]), u(&lines[1]["data"]["gva"])), (lo, hi));
    let maps = Vmm::new(["translate".as_ref(), socket.as_os_str(), "--map".as_ref()]).output();
    maps.assert_success();
    assert!(maps.stdout.lines().count() > ranges.len(), "one line per range plus a header: {}", maps.stdout);
    // An unmapped address among mapped ones: the others are still explained.
    let mixed = format!("{lo:#x},0x7fff00001000");
    let r = Vmm::new(["translate".as_ref(), socket.as_os_str(), mixed.as_ref()]).output();
    assert_ne!(r.code(), 0, "{}", r.describe());
    assert!(r.stdout.contains("KVM_TRANSLATE agrees") && r.stdout.contains("0x00007fff00001000: error:") && r.stdout.contains("not mapped"), "{}", r.describe());
    assert!(r.stderr.contains("1 of 2 translations failed"), "{}", r.describe());
    // `vmm ctl SOCKET translate` is the same command.
    let ctl = Vmm::new(["ctl".as_ref(), socket.as_os_str(), "translate".as_ref(), format!("{lo:#x}").as_ref()]).output();
    ctl.assert_success();
    assert!(ctl.stdout.contains("KVM_TRANSLATE agrees"), "{}", ctl.stdout);
}

#[test]
fn walk_agrees_with_kvm_translate_for_random_addresses_under_every_leaf_size() {
    for leaf in ["4k", "2m", "1g"] {
        let (hits, misses, leaves) = compare_random_addresses(leaf);
        assert!(hits >= 150 && misses > 0, "{leaf}: {hits} mapped and {misses} unmapped addresses compared");
        match leaf {
            // The kernel image has 4 KiB leaves, the arena 2 MiB ones; no direct map.
            "4k" => assert!(leaves.contains(&4096), "{leaf}: {leaves:?}"),
            // The direct map uses 2 MiB leaves; this host's CPU has no 1 GiB
            // pages, so a 1g guest falls back to 2 MiB (the guest says so).
            _ => assert!(leaves.iter().any(|l| *l >= 2 << 20), "{leaf}: {leaves:?}"),
        }
    }
}

#[test]
fn a_paused_workload_task_shows_its_own_user_mappings() {
    let dir = TempDir::new("translate-paused");
    let socket = dir.path().join("api.sock");
    // A long translation workload: most of its time is spent inside the
    // ring-3 task, whose address space maps the buffer at USER_HEAP_BASE
    // with 4 KiB user leaves.
    let spec = "translation:ws=256M,reps=200,steps=4000000";
    let mut vm = Vmm::run_json(["--mem", "512M", "--guest-page", "4k", "--skip-selftest", "--workload", spec, "--api-socket"]).arg(&socket).spawn();
    let heap = memvisor_abi::layout::USER_HEAP_BASE;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = None;
    while Instant::now() < deadline && seen.is_none() {
        assert!(!vm.has_exited(), "the VM ended before a translation inside the task");
        if UnixStream::connect(&socket).is_err() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let p = request(&socket, "{\"cmd\":\"pause\"}");
        assert_eq!(p["ok"], Value::Bool(true), "{p}");
        let t = request(&socket, &format!("{{\"cmd\":\"translate\",\"gva\":{}}}", heap + 0x12_3456));
        if t["ok"] == Value::Bool(true) {
            seen = Some(t);
        }
        assert_eq!(request(&socket, "{\"cmd\":\"resume\"}")["ok"], Value::Bool(true));
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = seen.expect("a pause landed while the task ran");
    let d = &t["data"];
    assert_eq!(u(&d["leaf_bytes"]), 4096, "{d}");
    assert_eq!((d["user"].as_bool(), d["writable"].as_bool(), d["no_execute"].as_bool()), (Some(true), Some(true), Some(true)), "{d}");
    assert_eq!(d["steps"].as_array().map(Vec::len), Some(4));
    assert!(d["steps"].as_array().expect("steps").iter().all(|s| s["flags"]["us"] == Value::Bool(true)), "U/S at every level for a user page: {d}");
    assert_eq!(d["kvm"]["agrees"], Value::Bool(true));
    assert_eq!(u(&d["gpa"]) & 0xfff, 0x456);
    request(&socket, "{\"cmd\":\"shutdown\"}");
    vm.wait(Duration::from_secs(60)).assert_success();
}
