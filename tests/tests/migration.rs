//! Live migration (issue G): `vmm run --incoming` and `vmm ctl SOCK
//! migrate`, over a Unix socket and over TCP between two network
//! namespaces joined by a veth pair. The guest proves integrity itself
//! (the checksum workload checks every page of its buffer each round and
//! reports the same checksums as a run that never migrated); the dirty
//! workload's exact page set is checked word by word in the destination's
//! memory; every refusal and fault leaves the source's guest running and
//! ends the destination with one error line.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod balloon_util;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memvisor_tests::netns::NetPair;
use memvisor_tests::vmm::{Running, TempDir};
use memvisor_tests::{RunResult, Vmm};
use serde_json::Value;

/// The integrity workload: 4096 pages (16 MiB), an eighth rewritten and
/// all of them checked every 150 ms round, 40 rounds: 6 s of guest time,
/// so that it outlasts a migration on a loaded two-core host (where round
/// 0 alone has taken ~5 s) and still has rounds to run on the destination.
const CHECKSUM: &str = "checksum:pages=4096,rounds=40,ms=150";

fn ctl_raw(socket: &Path, args: &[&str]) -> RunResult {
    Vmm::new(["ctl"]).arg(socket).args(args).output()
}

fn ctl(socket: &Path, args: &[&str]) -> Value {
    let r = ctl_raw(socket, args);
    r.assert_success();
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("ctl answered {:?}: {e}", r.stdout))
}

/// Waits until `vm` has printed `needle` on stderr; returns that stderr.
fn wait_for(vm: &Running, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let s = vm.stderr_so_far();
        if s.contains(needle) {
            return s;
        }
        assert!(Instant::now() < deadline, "never saw {needle:?} within {within:?}; stderr so far:\n{s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (round, value) pairs of one kind of workload event.
fn events(report: &Value, kind: &str) -> Vec<(u64, u64)> {
    report["workload_events"].as_array().unwrap().iter().filter(|e| e["event"] == kind).map(|e| (e["a"].as_u64().unwrap(), e["b"].as_u64().unwrap())).collect()
}

/// A destination waiting (`vmm run --incoming ADDR`), started through
/// `vmm` (plain, or inside a namespace); returns it once it listens, with
/// the address it printed.
fn destination(vmm: Vmm) -> (Running, String) {
    let dst = vmm.spawn();
    let err = wait_for(&dst, "waiting for a migration on ", Duration::from_secs(30));
    let addr = err.split("waiting for a migration on ").nth(1).unwrap().lines().next().unwrap().trim().to_string();
    (dst, addr)
}

/// A source running the checksum workload with a control socket, waited on
/// until the workload is a few rounds in.
fn source(vmm: Vmm, socket: &Path) -> Running {
    let src = vmm.arg("--api-socket").arg(socket).spawn();
    wait_for(&src, "guest: workload starting", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    src
}

/// Checks a migrated checksum run: the source ended after the hand-over,
/// the destination's guest found no differing page, went on from where the
/// source was and reported each round's checksum as `reference` did.
fn assert_continued(src: Running, dst: Running, reference: &[(u64, u64)], what: &str) {
    let src = src.wait(Duration::from_secs(60));
    src.assert_success();
    assert!(src.stderr.contains("vmm: migrated to"), "{what}: the source says where the guest went\n{}", src.describe());
    let before = events(&src.json(), "Checksum");
    let dst = dst.wait(Duration::from_secs(120));
    dst.assert_success();
    let report = dst.json();
    let after = events(&report, "Checksum");
    assert!(events(&report, "Mismatch").is_empty(), "{what}: the migrated guest found differing pages {:?}", events(&report, "Mismatch"));
    assert_eq!(report["exit_status"], 0, "{what}");
    assert!(!after.is_empty() && after[0].0 > 0, "{what}: the guest went on from where it was, not from the start: {after:?}");
    assert_eq!(after[0].0, before.last().map_or(0, |b| b.0 + 1), "{what}: no round was lost or repeated across the hand-over");
    assert_eq!(after.last().map(|a| a.0), Some(39), "{what}: and ran to its last round");
    for (round, c) in before.iter().chain(&after) {
        assert_eq!(*c, reference[*round as usize].1, "{what}: round {round}'s checksum is the unmigrated run's");
    }
}

/// The checksums of a run that never migrates.
fn reference_run(mem: &str) -> Running {
    Vmm::run_json(["--mem", mem, "--workload", CHECKSUM]).spawn()
}

fn reference(run: Running) -> Vec<(u64, u64)> {
    let r = run.wait(Duration::from_secs(120));
    r.assert_success();
    let sums = events(&r.json(), "Checksum");
    assert_eq!(sums.len(), 40);
    sums
}

#[test]
fn a_guest_migrated_over_a_unix_socket_goes_on_with_the_unmigrated_runs_checksums() {
    let dir = TempDir::new("mig-unix");
    let refrun = reference_run("256M");
    let to = format!("unix:{}", dir.path().join("mig.sock").display());
    let (dst, _) = destination(Vmm::run_json(["--mem", "256M", "--incoming", &to]));
    let socket = dir.path().join("src.sock");
    let src = source(Vmm::run_json(["--mem", "256M", "--workload", CHECKSUM]), &socket);
    // 40 MiB/s: round 0's 16 MiB of data take ~0.4 s, long enough to watch.
    let watcher = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let r = ctl_raw(&socket, &["migrate-status"]);
                if let Ok(v) = serde_json::from_str::<Value>(r.stdout.trim()) {
                    let phase = v["data"]["phase"].as_str().unwrap_or("").to_string();
                    seen.push(v);
                    if phase == "completed" || phase == "failed" {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            seen
        })
    };
    let r = ctl(&socket, &["migrate", &to, "--bandwidth", "40"]);
    let d = &r["data"];
    assert_eq!(d["phase"], "completed", "{r}");
    let (data, zero, sent) = (d["data_pages"].as_u64().unwrap(), d["zero_pages"].as_u64().unwrap(), d["bytes_sent"].as_u64().unwrap());
    assert!(data >= 4096, "the workload's 16 MiB went as data: {r}");
    assert!(zero > 30_000, "the self-test's zeroed RAM went as markers: {r}");
    assert!(data + zero <= 2 * 65536, "256 MiB is 65536 pages, and the rounds resend what the guest rewrote: {r}");
    assert!(sent < data * 4096 + data * 4096 / 20 + (1 << 20), "the stream costs little beyond the data pages: {sent} bytes for {data} pages");
    assert!(d["downtime_ms"].as_f64().unwrap() > 0.0);
    let seen = watcher.join().unwrap();
    let during: Vec<&Value> = seen.iter().filter(|v| v["data"]["phase"] == "precopy").collect();
    assert!(!during.is_empty(), "migrate-status answered during pre-copy: {seen:?}");
    let s = &during[during.len() - 1]["data"];
    for key in ["round", "bytes_sent", "dirty_rate_bytes_per_s", "expected_downtime_ms", "bandwidth_bytes_per_s", "remaining_bytes"] {
        assert!(s.get(key).is_some_and(Value::is_number), "migrate-status reports {key}: {s}");
    }
    assert!(during.iter().any(|v| v["data"]["bytes_sent"].as_u64().unwrap() > 0));
    assert_continued(src, dst, &reference(refrun), "unix");
}

#[test]
fn a_guest_migrated_over_tcp_between_two_network_namespaces_goes_on_unharmed() {
    let net = NetPair::new();
    // A 1 Gbit/s link.
    net.limit_rate("1gbit");
    let dir = TempDir::new("mig-tcp");
    let refrun = reference_run("256M");
    let to = format!("tcp:{}:4444", net.ip[1]);
    let (dst, _) = destination(net.vmm(1, &["run", "--json", "--mem", "256M", "--incoming", &to]));
    let socket = dir.path().join("src.sock");
    let src = source(net.vmm(0, &["run", "--json", "--mem", "256M", "--workload", CHECKSUM]), &socket);
    let r = ctl(&socket, &["migrate", &to]);
    assert_eq!(r["data"]["phase"], "completed", "{r}");
    let rounds = r["data"]["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "{r}");
    // The link's bandwidth as the source measured it: at most what netem
    // allows.
    let bw = r["data"]["bandwidth_bytes_per_s"].as_f64().unwrap();
    assert!(bw <= 1.05 * 125e6, "measured {bw} B/s over a 1 Gbit/s link");
    assert_continued(src, dst, &reference(refrun), "tcp over veth");
}

/// Every word the dirty workload writes, in order (`memvisor_abi::workload`
/// and `memvisor_user::workloads::dirty_rounds`): the buffer as it must be
/// when the workload ends.
fn dirty_buffer(pages: u64, rounds: u64, seed: u64, buffer: u64) -> Vec<u64> {
    let mut words = vec![0u64; (buffer * 512) as usize];
    for r in 0..rounds {
        for i in 0..pages {
            let p = memvisor_abi::workload::dirty_page(seed, r, i, buffer);
            words[(p * 512 + r % 512) as usize] = r ^ i;
        }
    }
    for p in 0..buffer {
        words[(p * 512) as usize] = p;
    }
    words
}

#[test]
fn every_page_the_dirty_workload_writes_arrives_with_exactly_its_contents() {
    // log=0: the workload's own round checks do not harvest, so migration
    // has the dirty log. 4096 rounds of 64 scattered writes into 32 MiB,
    // the migration in the middle of them; then a full snapshot of the
    // destination is compared word by word with what the rounds wrote.
    let (pages, rounds, seed, buffer) = (64u64, 4096u64, 7u64, 8192u64);
    let workload = format!("dirty:pages={pages},rounds={rounds},seed={seed},buffer={buffer},log=0");
    let dir = TempDir::new("mig-dirty");
    let dst_socket = dir.path().join("dst.sock");
    let (dst, to) = destination(Vmm::run_json(["--mem", "128M", "--incoming", "tcp:127.0.0.1:0", "--api-socket"]).arg(&dst_socket));
    let socket = dir.path().join("src.sock");
    let src = Vmm::run_json(["--mem", "128M", "--workload", &workload, "--api-socket"]).arg(&socket).spawn();
    wait_for(&src, "guest: workload starting", Duration::from_secs(120));
    let r = ctl(&socket, &["migrate", &to]);
    assert_eq!(r["data"]["phase"], "completed", "{r}");
    let src = src.wait(Duration::from_secs(60));
    src.assert_success();
    let report = src.json();
    let done = events(&report, "RoundDone").len() as u64;
    assert!(done > 0 && done < rounds, "the migration came mid-workload: {done} of {rounds} rounds on the source");
    let (buf_gpa, buf_pages) = events(&report, "BufferReady")[0];
    assert_eq!(buf_pages, buffer);
    // The destination runs the rest; its guest then idles.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ctl_raw(&dst_socket, &["status"]).stdout.contains("\"idle\"") {
        assert!(Instant::now() < deadline, "the migrated workload never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let snap = dir.path().join("after");
    ctl(&dst_socket, &["snapshot", "--full", snap.to_str().unwrap()]);
    ctl(&dst_socket, &["shutdown"]);
    let d = dst.wait(Duration::from_secs(60));
    d.assert_success();
    assert_eq!(events(&d.json(), "RoundDone").len() as u64, rounds - done, "the destination ran exactly the remaining rounds");
    let image = std::fs::File::open(snap.join("memory.bin")).unwrap();
    let mut bytes = vec![0u8; (buffer * 4096) as usize];
    std::os::unix::fs::FileExt::read_exact_at(&image, &mut bytes, buf_gpa).unwrap();
    let expected = dirty_buffer(pages, rounds, seed, buffer);
    let got: Vec<u64> = bytes.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect();
    let wrong: Vec<u64> = (0..buffer).filter(|&p| got[(p * 512) as usize..((p + 1) * 512) as usize] != expected[(p * 512) as usize..((p + 1) * 512) as usize]).collect();
    assert!(wrong.is_empty(), "{} of {buffer} buffer pages differ from what the workload wrote, first {:?}", wrong.len(), &wrong[..wrong.len().min(8)]);
}

#[test]
fn a_destination_of_another_ram_size_is_refused_on_both_sides_and_the_guest_runs_on() {
    let dir = TempDir::new("mig-mismatch");
    let to = format!("unix:{}", dir.path().join("mig.sock").display());
    let (dst, _) = destination(Vmm::run_json(["--mem", "128M", "--incoming", &to]));
    let socket = dir.path().join("src.sock");
    let src = source(Vmm::run_json(["--mem", "256M", "--workload", CHECKSUM]), &socket);
    let r = ctl_raw(&socket, &["migrate", &to]);
    r.assert_error(&["does not match", "256 MiB", "128 MiB", "keeps running here"]);
    dst.wait(Duration::from_secs(30)).assert_error(&["does not match", "256 MiB", "--mem 256M"]);
    assert_source_unharmed(src, &socket);
}

/// The source after a failed migration: still running its guest, which
/// ends its workload with no differing page.
fn assert_source_unharmed(src: Running, socket: &Path) {
    let state = ctl(socket, &["status"])["state"].clone();
    assert!(state == "running" || state == "idle", "the guest runs on (or has finished its work): {state}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ctl_raw(socket, &["status"]).stdout.contains("\"idle\"") {
        assert!(Instant::now() < deadline, "the workload never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    ctl(socket, &["shutdown"]);
    let r = src.wait(Duration::from_secs(60));
    r.assert_success();
    let report = r.json();
    assert!(events(&report, "Mismatch").is_empty(), "the source's guest found differing pages {:?}", events(&report, "Mismatch"));
    assert_eq!(events(&report, "Checksum").len(), 40, "and ran every round");
    assert!(!r.stderr.contains("migrated to"));
}

/// This build's preamble with another version.
fn preamble(version: u32) -> Vec<u8> {
    let mut p = b"memvisor-migrate".to_vec();
    p.extend_from_slice(&version.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

#[test]
fn another_stream_version_is_refused_on_both_sides() {
    let dir = TempDir::new("mig-version");
    // A destination meets a source of version 99.
    let to = format!("unix:{}", dir.path().join("d.sock").display());
    let (dst, _) = destination(Vmm::run_json(["--mem", "128M", "--incoming", &to]));
    let mut fake = UnixStream::connect(dir.path().join("d.sock")).unwrap();
    fake.write_all(&preamble(99)).unwrap();
    let mut theirs = [0u8; 24];
    fake.read_exact(&mut theirs).unwrap();
    assert_eq!(&theirs[..16], b"memvisor-migrate", "the destination says which version it speaks");
    let dst = dst.wait(Duration::from_secs(30));
    dst.assert_error(&["version 99", "version 2"]);
    // A source meets a destination of version 99: the guest runs on.
    let fake_dest = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&fake_dest).unwrap();
    let answer = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.write_all(&preamble(99)).unwrap();
        let mut theirs = [0u8; 24];
        c.read_exact(&mut theirs).unwrap();
        theirs
    });
    let socket = dir.path().join("src.sock");
    let src = source(Vmm::run_json(["--mem", "256M", "--workload", CHECKSUM]), &socket);
    ctl_raw(&socket, &["migrate", &format!("unix:{}", fake_dest.display())]).assert_error(&["version 99", "keeps running here"]);
    assert_eq!(&answer.join().unwrap()[..16], b"memvisor-migrate");
    assert_source_unharmed(src, &socket);
}

/// What a man in the middle does to a source→destination frame.
enum Tamper {
    Forward,
    /// Send this instead.
    Replace(Vec<u8>),
    /// Send this much of the frame, then close both sides.
    Cut(usize),
}

/// Forwards a source's connection on `listen` to the destination on
/// `dest`, showing every source→destination frame (after the preamble) to
/// `tamper`.
fn man_in_the_middle(listen: &Path, dest: PathBuf, mut tamper: impl FnMut(usize, &[u8]) -> Tamper + Send + 'static) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = UnixStream::connect(&dest).unwrap();
        let (mut back_from, mut back_to) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(std::net::Shutdown::Write);
        });
        let mut pre = [0u8; 24];
        from_src.read_exact(&mut pre).unwrap();
        to_dst.write_all(&pre).unwrap();
        let mut n = 0;
        loop {
            let mut h = [0u8; 16];
            if from_src.read_exact(&mut h).is_err() {
                break;
            }
            let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
            let mut frame = h.to_vec();
            frame.resize(16 + len, 0);
            if from_src.read_exact(&mut frame[16..]).is_err() {
                break;
            }
            let out = match tamper(n, &frame) {
                Tamper::Forward => frame,
                Tamper::Replace(f) => f,
                Tamper::Cut(keep) => {
                    let _ = to_dst.write_all(&frame[..keep]);
                    let _ = to_dst.shutdown(std::net::Shutdown::Both);
                    let _ = from_src.shutdown(std::net::Shutdown::Both);
                    return;
                }
            };
            if to_dst.write_all(&out).is_err() {
                break;
            }
            n += 1;
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
    })
}

/// The kind of a frame (bytes 4..6 of its header).
fn kind(frame: &[u8]) -> u16 {
    u16::from_le_bytes(frame[4..6].try_into().unwrap())
}

/// `frame` with its CRC recomputed over header and payload.
fn fix_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..12]);
    h.update(&frame[16..]);
    let crc = h.finalize();
    frame[12..16].copy_from_slice(&crc.to_le_bytes());
    frame
}

const PAGES_FRAME: u16 = 5;

#[test]
fn a_damaged_truncated_or_out_of_ram_stream_ends_the_destination_and_the_guest_runs_on() {
    type Case = (&'static str, Box<dyn FnMut(usize, &[u8]) -> Tamper + Send>, &'static [&'static str]);
    let mut pages_seen = 0;
    let mut pages_seen2 = 0;
    let cases: Vec<Case> = vec![
        (
            "one flipped bit",
            Box::new(move |_, f: &[u8]| {
                if kind(f) == PAGES_FRAME {
                    pages_seen += 1;
                    if pages_seen == 3 {
                        let mut bad = f.to_vec();
                        bad[16 + 8 + 1000] ^= 0x20;
                        return Tamper::Replace(bad);
                    }
                }
                Tamper::Forward
            }),
            &["fails its checksum"],
        ),
        (
            "a frame cut short",
            Box::new(move |_, f: &[u8]| {
                if kind(f) == PAGES_FRAME {
                    pages_seen2 += 1;
                    if pages_seen2 == 2 {
                        return Tamper::Cut(f.len() / 2);
                    }
                }
                Tamper::Forward
            }),
            &["closed the connection in the middle of a frame"],
        ),
        (
            "pages beyond guest RAM",
            Box::new(|_, f: &[u8]| {
                if kind(f) == PAGES_FRAME {
                    // 256 MiB guest: the first byte past its RAM, CRC fixed.
                    let mut bad = f.to_vec();
                    bad[16..24].copy_from_slice(&(256u64 << 20).to_le_bytes());
                    return Tamper::Replace(fix_crc(bad));
                }
                Tamper::Forward
            }),
            &["outside guest RAM"],
        ),
    ];
    for (what, tamper, needles) in cases {
        let dir = TempDir::new("mig-damage");
        let real = dir.path().join("d.sock");
        let (dst, _) = destination(Vmm::run_json(["--mem", "256M", "--incoming", &format!("unix:{}", real.display())]));
        let mitm = dir.path().join("mitm.sock");
        let proxy = man_in_the_middle(&mitm, real, tamper);
        let socket = dir.path().join("src.sock");
        let src = source(Vmm::run_json(["--mem", "256M", "--workload", CHECKSUM]), &socket);
        let r = ctl_raw(&socket, &["migrate", &format!("unix:{}", mitm.display())]);
        r.assert_error(&["keeps running here"]);
        let d = dst.wait(Duration::from_secs(30));
        d.assert_error(needles);
        assert!(d.stdout.trim().is_empty(), "{what}: the destination never ran the guest, so it reports nothing\n{}", d.describe());
        let _ = proxy.join();
        assert_source_unharmed(src, &socket);
    }
}

#[test]
fn a_destination_killed_during_pre_copy_leaves_the_guest_running_on_the_source() {
    let dir = TempDir::new("mig-kill");
    let to = format!("unix:{}", dir.path().join("mig.sock").display());
    let (dst, _) = destination(Vmm::run_json(["--mem", "256M", "--incoming", &to]));
    let socket = dir.path().join("src.sock");
    let src = source(Vmm::run_json(["--mem", "256M", "--workload", CHECKSUM]), &socket);
    let pid = dst.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        // SAFETY: kill(2) on the test's own child process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    // 10 MiB/s: round 0 takes well over a second, so the kill lands in it.
    let r = ctl_raw(&socket, &["migrate", &to, "--bandwidth", "10"]);
    killer.join().unwrap();
    r.assert_error(&["keeps running here"]);
    let status = ctl(&socket, &["migrate-status"]);
    assert_eq!(status["data"]["phase"], "failed", "{status}");
    assert!(status["data"]["bytes_sent"].as_u64().unwrap() > 0, "it was under way: {status}");
    let _ = dst.wait(Duration::from_secs(10));
    assert_source_unharmed(src, &socket);
}

#[test]
fn a_link_cut_during_pre_copy_fails_both_sides_after_the_link_timeout() {
    let net = NetPair::new();
    let dir = TempDir::new("mig-cut");
    let to = format!("tcp:{}:4444", net.ip[1]);
    let (dst, _) = destination(net.vmm(1, &["run", "--json", "--mem", "256M", "--incoming", &to, "--link-timeout-ms", "2000"]));
    let socket = dir.path().join("src.sock");
    let src = source(net.vmm(0, &["run", "--json", "--mem", "256M", "--workload", CHECKSUM]), &socket);
    let t = Instant::now();
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(400));
            net.cut();
        });
        ctl_raw(&socket, &["migrate", &to, "--bandwidth", "10", "--link-timeout-ms", "2000"])
    });
    r.assert_error(&["keeps running here"]);
    assert!(t.elapsed() < Duration::from_secs(20), "the source gave up after its link timeout, not much later: {:?}", t.elapsed());
    let d = dst.wait(Duration::from_secs(30));
    d.assert_error(&["incoming migration failed"]);
    assert_source_unharmed(src, &socket);
}

#[test]
fn a_guest_that_outruns_the_link_is_throttled_until_it_converges() {
    // The ticker rewrites its 8 MiB buffer at 100 MiB/s of its running
    // time; the link is capped at 20 MiB/s and the downtime at 30 ms. Each
    // round finds the whole buffer dirty until the throttle keeps the vCPU
    // stopped most of the time.
    let dir = TempDir::new("mig-converge");
    let to = format!("unix:{}", dir.path().join("mig.sock").display());
    let (dst, _) = destination(Vmm::run_json(["--mem", "256M", "--incoming", &to]));
    let socket = dir.path().join("src.sock");
    let src = Vmm::run_json(["--mem", "256M", "--workload", "ticker:secs=15,mibs=100,pages=2048,fill=1", "--api-socket"]).arg(&socket).spawn();
    wait_for(&src, "guest: workload starting", Duration::from_secs(120));
    let r = ctl(&socket, &["migrate", &to, "--bandwidth", "20", "--max-downtime-ms", "30"]);
    let d = &r["data"];
    assert_eq!(d["phase"], "completed", "{r}");
    let rounds = d["rounds"].as_array().unwrap();
    let dirty: Vec<u64> = rounds.iter().map(|x| x["dirty_bytes"].as_u64().unwrap()).collect();
    // (A round the host preempted the vCPU in dirties less: the most of
    // the first three.)
    assert!(dirty.iter().skip(1).take(3).max().is_some_and(|&d| d >= 6 << 20), "unthrottled, a round finds most of the buffer dirty again: {dirty:?}");
    assert!(d["throttle_percent"].as_u64().unwrap() >= 20, "auto-converge throttled the vCPU and says so: {r}");
    assert!(*dirty.last().unwrap() < (6 << 20) / 4, "throttled, the guest dirties less per round: {dirty:?}");
    assert!(d["expected_downtime_ms"].as_f64().unwrap() <= 30.0, "it stopped once the rest fitted the maximum: {r}");
    src.wait(Duration::from_secs(60)).assert_success();
    // The guest runs on at full speed on the destination.
    let dst = dst.wait(Duration::from_secs(120));
    dst.assert_success();
    let done = events(&dst.json(), "TickerDone");
    assert_eq!(done.len(), 1, "the ticker finished on the destination");
}

/// Polls `socket` until migrate-status reports `phase`.
fn wait_phase(socket: &Path, phase: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = ctl_raw(socket, &["migrate-status"]);
        if let Ok(v) = serde_json::from_str::<Value>(r.stdout.trim())
            && v["data"]["phase"] == phase
        {
            return v;
        }
        assert!(Instant::now() < deadline, "migrate-status never reported {phase}: {}", r.describe());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_guest_moved_post_copy_runs_at_once_and_fetches_its_missing_pages() {
    // after:1: the guest moves after round 0; the 16 MiB its rounds rewrote
    // meanwhile follow, pushed at 20 MiB/s or fetched when it touches them.
    let dir = TempDir::new("mig-postcopy");
    let refrun = reference_run("256M");
    let to = format!("unix:{}", dir.path().join("mig.sock").display());
    let (dst, _) = destination(Vmm::run_json(["--mem", "256M", "--incoming", &to]));
    let socket = dir.path().join("src.sock");
    let src = source(Vmm::run_json(["--mem", "256M", "--workload", CHECKSUM]), &socket);
    let r = ctl(&socket, &["migrate", &to, "--postcopy", "after:1", "--bandwidth", "20"]);
    let d = &r["data"];
    assert_eq!(d["phase"], "completed", "{r}");
    assert_eq!(d["rounds"].as_array().unwrap().len(), 1, "one pre-copy round, then post-copy: {r}");
    assert!(d["postcopy_requests"].as_u64().unwrap() > 0, "the guest asked for pages it touched before they were pushed: {r}");
    assert!(d["downtime_ms"].as_f64().unwrap() < 300.0, "the stop moved the state, not the dirty pages: {r}");
    assert_continued(src, dst, &reference(refrun), "post-copy");
}

#[test]
fn a_source_lost_during_post_copy_ends_the_destination_with_a_clear_error() {
    let dir = TempDir::new("mig-postcopy-lost");
    let to = format!("unix:{}", dir.path().join("mig.sock").display());
    let (dst, _) = destination(Vmm::run_json(["--mem", "256M", "--incoming", &to]));
    let socket = dir.path().join("src.sock");
    // A workload that outlives the slow migration (400 rounds, 20 s).
    let src = source(Vmm::run_json(["--mem", "256M", "--workload", "checksum:pages=4096,rounds=400,ms=50"]), &socket);
    let migrate = std::thread::spawn({
        let socket = socket.clone();
        move || ctl_raw(&socket, &["migrate", &to, "--postcopy", "after:1", "--bandwidth", "4"])
    });
    wait_phase(&socket, "postcopy", Duration::from_secs(60));
    // The source dies with most of the rewritten pages still on it.
    // SAFETY: kill(2) on the test's own child process.
    unsafe { libc::kill(src.pid() as i32, libc::SIGKILL) };
    let d = dst.wait(Duration::from_secs(60));
    d.assert_error(&["post-copy lost its source", "the guest cannot continue"]);
    let _ = migrate.join();
    let _ = src.wait(Duration::from_secs(10));
}

#[test]
fn a_ballooned_guest_moves_with_its_balloon_and_without_the_memory_it_gave_back() {
    use balloon_util::{BalloonVm, MIB};
    let mut src = BalloonVm::start("mig-balloon-src", &["--mem", "512M", "--balloon", "0", "--workload", "balloon:rounds=1,irq=1"]);
    let before = src.set_and_wait(256 * MIB);
    let dir = TempDir::new("mig-balloon");
    let to = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst_socket = dir.path().join("dst.sock");
    let (dst, _) = destination(Vmm::run_json(["--mem", "512M", "--incoming", &to, "--api-socket"]).arg(&dst_socket));
    let r = ctl(&src.socket, &["migrate", &to]);
    let d = &r["data"];
    assert_eq!(d["phase"], "completed", "{r}");
    let sent_pages = d["data_pages"].as_u64().unwrap() + d["zero_pages"].as_u64().unwrap();
    // 512 MiB is 131072 pages, 65536 of them in the balloon: none of those
    // went, not even as a zero marker.
    assert!(sent_pages < 65536 + 4096, "the balloon's pages were not sent: {sent_pages} pages sent");
    src.vm.wait(Duration::from_secs(60)).assert_success();
    // The destination's balloon is the source's.
    let get = ctl(&dst_socket, &["balloon", "get"]);
    for key in ["target_bytes", "actual_bytes", "balloon_bytes", "reclaimed_bytes", "features"] {
        assert_eq!(get["data"][key], before[key], "{key}: {get}");
    }
    // Given back, the pages are written and verified by the guest there,
    // woken through the destination's irqfd.
    ctl(&dst_socket, &["balloon", "set", "0"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ctl_raw(&dst_socket, &["status"]).stdout.contains("\"idle\"") {
        assert!(Instant::now() < deadline, "the destination's guest never finished deflating");
        std::thread::sleep(Duration::from_millis(50));
    }
    ctl(&dst_socket, &["shutdown"]);
    let d = dst.wait(Duration::from_secs(60));
    d.assert_success();
    let verified = events(&d.json(), "BalloonVerified");
    let (written, good) = verified.iter().fold((0, 0), |(w, g), v| (w + v.0, g + v.1));
    assert!(written >= 256 * MIB && good == written, "the guest got its 256 MiB back and every byte read back right: {verified:?}");
}
