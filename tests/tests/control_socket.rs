//! The control socket (`vmm run --api-socket PATH`) and its client
//! (`vmm ctl PATH ...`): the VM stays up after the guest's workloads,
//! answers status/pause/resume, refuses bad requests without dying, and
//! `shutdown` ends the run with the guest's status.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use memvisor_tests::report::assert_self_test_passed;
use memvisor_tests::vmm::{Running, TempDir};
use memvisor_tests::Vmm;
use serde_json::Value;

/// Sends one raw line and returns the parsed response line.
fn request(socket: &Path, line: &str) -> Value {
    let mut s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("set a read timeout");
    // The server may answer an over-long line and hang up before it has
    // all been sent: a failed write is fine as long as an answer comes.
    let _ = s.write_all(line.as_bytes()).and_then(|()| s.write_all(b"\n"));
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("read the response");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("response {reply:?} to {line:?} is not JSON: {e}"))
}

/// `vmm ctl SOCKET CMD`: its printed response.
fn ctl(socket: &Path, cmd: &str) -> Value {
    let r = Vmm::new(["ctl".as_ref(), socket.as_os_str(), cmd.as_ref()]).output();
    r.assert_success();
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("`vmm ctl {cmd}` printed no JSON: {e}\n{}", r.describe()))
}

fn state(v: &Value) -> &str {
    v.get("state").and_then(Value::as_str).unwrap_or_else(|| panic!("no state in {v}"))
}

/// One raw status request, tolerating a socket that is not up yet.
fn status_line(socket: &Path) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).ok()?;
    Some(reply.trim().to_string())
}

/// Waits until the VM reports `want`, failing if the process exits first.
fn wait_for_state(vm: Running, socket: &Path, want: &str, timeout: Duration) -> Running {
    wait_for_any(vm, socket, &[want], timeout)
}

/// Waits until the VM reports one of `wanted`, failing if the process exits first.
fn wait_for_any(mut vm: Running, socket: &Path, wanted: &[&str], timeout: Duration) -> Running {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("(socket not up)");
    while Instant::now() < deadline {
        if vm.has_exited() {
            let r = vm.wait(Duration::from_secs(1));
            panic!("the VM exited while waiting for state {wanted:?} (last: {last})\n{}", r.describe());
        }
        if let Some(reply) = socket.exists().then(|| status_line(socket)).flatten() {
            last = reply;
            if serde_json::from_str::<Value>(&last).ok().and_then(|v| v.get("state").and_then(Value::as_str).map(|s| wanted.contains(&s))) == Some(true) {
                return vm;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the VM did not reach state {wanted:?} within {timeout:?} (last: {last})");
}

#[test]
fn control_socket_pauses_resumes_and_shuts_down_a_vm() {
    let dir = TempDir::new("api");
    let socket = dir.path().join("api.sock");
    // The guest's self-test over 1 GiB keeps its vCPU busy for seconds on
    // the reference host: time to pause it while it runs. On a host where
    // the guest finishes before the pause lands (pausing an idle VM is a
    // no-op), try again with more memory.
    let mut attempt = None;
    for mem in ["1G", "4G"] {
        let vm = Vmm::run_json(["--mem".as_ref(), mem.as_ref(), "--api-socket".as_ref(), socket.as_os_str()]).spawn();
        let vm = wait_for_any(vm, &socket, &["running", "idle"], Duration::from_secs(60));
        let p = ctl(&socket, "pause");
        assert_eq!(p["ok"], Value::Bool(true), "{p}");
        if state(&p) == "paused" {
            attempt = Some(vm);
            break;
        }
        assert_eq!(state(&p), "idle", "pausing a running VM: {p}");
        eprintln!("the guest with {mem} finished before the pause landed; trying with more memory");
        assert_eq!(ctl(&socket, "shutdown")["ok"], Value::Bool(true));
        vm.wait(Duration::from_secs(30)).assert_success();
    }
    let vm = attempt.expect("a guest was paused while it ran (even with 4 GiB it finished first)");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(&ctl(&socket, "status")), "paused", "a paused VM stays paused");
    let r = ctl(&socket, "resume");
    assert_eq!(r["ok"], Value::Bool(true), "{r}");
    assert_ne!(state(&r), "paused", "{r}");

    // The guest finishes its work and idles; the VM stays up.
    let mut vm = wait_for_state(vm, &socket, "idle", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!vm.has_exited(), "with a control socket the VM stays up after the guest's workloads");
    let s = ctl(&socket, "status");
    assert_eq!(s["ok"], Value::Bool(true));
    assert_eq!(state(&s), "idle");
    // Pausing an idle VM (no guest code runs) changes nothing.
    let p = ctl(&socket, "pause");
    assert_eq!(p["ok"], Value::Bool(true), "{p}");
    assert_eq!(state(&p), "idle", "{p}");

    let shut = ctl(&socket, "shutdown");
    assert_eq!(shut["ok"], Value::Bool(true), "{shut}");
    let result = vm.wait(Duration::from_secs(30));
    result.assert_success();
    let report = result.json();
    assert_eq!(report["exit_status"], Value::from(0), "the run exits with the guest's status");
    // Paused and resumed in the middle, the self-test still passed.
    assert_self_test_passed(&report);
    assert!(!socket.exists(), "the socket file is removed when the VM ends");
}

#[test]
fn bad_requests_get_an_error_and_the_vm_keeps_running() {
    let dir = TempDir::new("api-bad");
    let socket = dir.path().join("api.sock");
    let vm = Vmm::run_json(["--api-socket".as_ref(), socket.as_os_str()]).spawn();
    let mut vm = wait_for_state(vm, &socket, "idle", Duration::from_secs(120));

    let long = format!("{{\"cmd\":\"status\",\"pad\":\"{}\"}}", "x".repeat(100_000));
    for bad in ["not json", "{\"cmd\":\"reboot\"}", "{\"cmd\":\"Status\"}", "{\"cmd\":5}", "{}", "[1,2,3]", "\u{0}\u{1}\u{2}", long.as_str()] {
        let reply = request(&socket, bad);
        assert_eq!(reply["ok"], Value::Bool(false), "request {:?} should be refused: {reply}", &bad[..bad.len().min(40)]);
        let error = reply["error"].as_str().unwrap_or_else(|| panic!("a refusal says why: {reply}"));
        assert!(!error.is_empty());
        assert!(!vm.has_exited(), "a bad request must not end the VM");
    }
    // Bytes that are not UTF-8 get the same kind of answer.
    let mut s = UnixStream::connect(&socket).expect("connect");
    s.write_all(b"{\"cmd\":\"st\xffatus\"}\n").expect("send");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("an answer to bytes that are not UTF-8");
    let reply: Value = serde_json::from_str(&reply).expect("JSON");
    assert_eq!(reply["ok"], Value::Bool(false), "{reply}");
    assert!(reply["error"].as_str().is_some_and(|e| e.contains("UTF-8")), "{reply}");
    // Several requests on one connection, the bad one in the middle.
    let mut s = UnixStream::connect(&socket).expect("connect");
    s.write_all(b"{\"cmd\":\"status\"}\nnonsense\n{\"cmd\":\"status\"}\n").expect("send");
    let lines: Vec<Value> = BufReader::new(s).lines().take(3).map(|l| serde_json::from_str(&l.expect("a line")).expect("JSON")).collect();
    assert_eq!(lines.iter().map(|v| v["ok"].as_bool()).collect::<Vec<_>>(), vec![Some(true), Some(false), Some(true)]);

    assert_eq!(state(&ctl(&socket, "status")), "idle");
    assert_eq!(ctl(&socket, "shutdown")["ok"], Value::Bool(true));
    vm.wait(Duration::from_secs(30)).assert_success();
}

#[test]
fn ctl_without_a_vm_is_a_one_line_error() {
    let dir = TempDir::new("api-none");
    let socket = dir.path().join("nobody-listens.sock");
    let r = Vmm::new(["ctl".as_ref(), socket.as_os_str(), "status".as_ref()]).output();
    let line = r.error_line();
    assert!(line.contains("nobody-listens.sock"), "{line}");
}

/// `vmm ctl SOCKET CMD` as user `uid`, from a copy of the binary in `dir`
/// that every user may run (the build tree may not be reachable).
fn ctl_as(dir: &TempDir, uid: u32, socket: &Path, cmd: &str) -> memvisor_tests::vmm::RunResult {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.path().join("vmm-copy");
    if !copy.exists() {
        std::fs::copy(memvisor_tests::vmm::binary(), &copy).expect("copy the vmm binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod the copy");
    }
    Vmm::with_binary(&copy, ["ctl".as_ref(), socket.as_os_str(), cmd.as_ref()]).as_user(uid, uid).output()
}

#[test]
fn ctl_says_when_the_vmm_closes_the_connection_without_answering() {
    let dir = TempDir::new("api-closed");
    let socket = dir.path().join("hangs-up.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind a stand-in socket");
    let server = std::thread::spawn(move || {
        // Accept, read nothing, hang up.
        let _ = listener.accept();
    });
    let r = Vmm::new(["ctl".as_ref(), socket.as_os_str(), "status".as_ref()]).output();
    r.assert_error(&["the VMM closed the connection"]);
    assert!(!r.stderr.contains("EOF"), "not a JSON parser's message: {}", r.describe());
    server.join().expect("the stand-in server");
}

#[test]
fn the_socket_is_private_and_refuses_to_replace_anything_but_a_stale_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("api-private");
    // A regular file at the path is left alone.
    let file = dir.write("not-a-socket", b"precious");
    Vmm::run_json(["--api-socket".as_ref(), file.as_os_str()]).output().assert_error(&["exists and is not a socket"]);
    assert_eq!(std::fs::read(&file).expect("the file is still there"), b"precious");
    // A stale socket (nobody listens) is replaced; the new one is 0600
    // even under umask 000.
    let socket = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("a stale socket"));
    let vm = Vmm::run_json(["--api-socket".as_ref(), socket.as_os_str()]).umask(0).spawn();
    let vm = wait_for_state(vm, &socket, "idle", Duration::from_secs(120));
    let mode = std::fs::metadata(&socket).expect("the socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is the owner's alone");
    // A second VMM on the same path is refused: the socket is live.
    Vmm::run_json(["--api-socket".as_ref(), socket.as_os_str()]).output().assert_error(&["control socket of a running VMM"]);
    // Another user cannot connect at all.
    let r = ctl_as(&dir, 65534, &socket, "status");
    r.assert_error(&["cannot connect"]);
    assert_eq!(ctl(&socket, "shutdown")["ok"], Value::Bool(true));
    vm.wait(Duration::from_secs(30)).assert_success();
}

#[test]
fn only_the_users_allowed_may_use_a_shared_socket() {
    let dir = TempDir::new("api-allow");
    let socket = dir.path().join("api.sock");
    let vm = Vmm::run_json(["--api-socket".as_ref(), socket.as_os_str(), "--api-allow-uid".as_ref(), "65534".as_ref()]).spawn();
    let mut vm = wait_for_state(vm, &socket, "idle", Duration::from_secs(120));
    // The allowed user gets answers.
    let allowed = ctl_as(&dir, 65534, &socket, "status");
    allowed.assert_success();
    assert!(allowed.stdout.contains("\"ok\":true"), "{}", allowed.describe());
    // Another user connects (the socket is open to all) and is refused by
    // its credentials.
    let refused = ctl_as(&dir, 65533, &socket, "shutdown");
    refused.assert_error(&["permission denied", "user 65533"]);
    assert!(!vm.has_exited(), "a refused shutdown does not end the VM");
    assert_eq!(ctl(&socket, "shutdown")["ok"], Value::Bool(true));
    vm.wait(Duration::from_secs(30)).assert_success();
}

#[test]
fn sigterm_and_sigint_end_the_vm_with_its_report_and_remove_the_socket() {
    for (signal, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let dir = TempDir::new("api-signal");
        let socket = dir.path().join("api.sock");
        let vm = Vmm::run_json(["--api-socket".as_ref(), socket.as_os_str()]).spawn();
        let vm = wait_for_state(vm, &socket, "idle", Duration::from_secs(120));
        let pid = i32::try_from(vm.pid()).expect("a pid fits in i32");
        // SAFETY: `pid` is the VMM child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let r = vm.wait(Duration::from_secs(30));
        assert_eq!(r.code(), status, "128 + signal {signal}\n{}", r.describe());
        let report = r.json();
        assert_self_test_passed(&report);
        assert!(!socket.exists(), "the socket file is removed");
    }
}
