//! Shared helpers of the balloon tests: a VM with a control socket, the
//! balloon commands, and the VMM's resident memory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memvisor_tests::Vmm;
use memvisor_tests::vmm::{RunResult, Running, TempDir};
use serde_json::Value;

pub const MIB: u64 = 1 << 20;

/// A running VM with a balloon and a control socket.
pub struct BalloonVm {
    pub vm: Running,
    pub socket: PathBuf,
    _dir: TempDir,
}

/// `vmm ctl SOCKET args...`: the printed response.
pub fn ctl(socket: &Path, args: &[&str]) -> Value {
    let mut all: Vec<&std::ffi::OsStr> = vec!["ctl".as_ref(), socket.as_os_str()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    let r = Vmm::new(all).output();
    r.assert_success();
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("`vmm ctl {args:?}` printed no JSON: {e}\n{}", r.describe()))
}

/// `balloon get`'s data, or `None` while the socket does not answer.
fn try_get(socket: &Path) -> Option<Value> {
    let r = Vmm::new(["ctl".as_ref(), socket.as_os_str(), "balloon".as_ref(), "get".as_ref()]).output();
    let v: Value = serde_json::from_str(r.stdout.trim()).ok()?;
    (v["ok"] == Value::Bool(true)).then(|| v["data"].clone())
}

impl BalloonVm {
    /// Starts `vmm run --json --api-socket ... --balloon 0 extra...` and
    /// waits until the guest's balloon driver is up.
    pub fn start(tag: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let socket = dir.path().join("api.sock");
        let mut args: Vec<&std::ffi::OsStr> = vec!["--api-socket".as_ref(), socket.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let vm = Vmm::run_json(args).timeout(Duration::from_secs(300)).spawn();
        let mut me = BalloonVm { vm, socket, _dir: dir };
        me.wait_for("the driver to start", Duration::from_secs(120), |b| b["driver_ok"] == Value::Bool(true));
        me
    }

    /// Starts `vmm restore --json SNAPSHOT --api-socket ... extra...` and
    /// waits until the restored balloon answers `balloon get`.
    pub fn restore(tag: &str, snapshot: &Path, extra: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let socket = dir.path().join("api.sock");
        let mut v = Vmm::new(["restore", "--json"]).arg(snapshot).arg("--api-socket").arg(&socket);
        for a in extra {
            v = v.arg(a);
        }
        let vm = v.timeout(Duration::from_secs(300)).spawn();
        let mut me = BalloonVm { vm, socket, _dir: dir };
        me.wait_for("the restored VM to answer", Duration::from_secs(120), |_| true);
        me
    }

    /// `balloon get`'s data.
    pub fn get(&mut self) -> Value {
        let r = ctl(&self.socket, &["balloon", "get"]);
        assert_eq!(r["ok"], Value::Bool(true), "{r}");
        r["data"].clone()
    }

    /// Polls `balloon get` until `done` holds; panics after `timeout` or
    /// when the VM exits.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            assert!(!self.vm.has_exited(), "the VM exited while waiting for {what} (last balloon state: {last})");
            if let Some(v) = self.socket.exists().then(|| try_get(&self.socket)).flatten() {
                last = v;
                if done(&last) {
                    return last;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out after {timeout:?} waiting for {what}; last balloon state: {last}");
    }

    /// Sets the target and waits until the driver's `actual` meets it and
    /// the device's release thread has made every release it queued (the
    /// device acknowledges an inflate before its releases are done when the
    /// driver accepted `MUST_TELL_HOST`, as ours does).
    pub fn set_and_wait(&mut self, bytes: u64) -> Value {
        let r = ctl(&self.socket, &["balloon", "set", &bytes.to_string()]);
        assert_eq!(r["ok"], Value::Bool(true), "{r}");
        self.wait_for(&format!("actual = {bytes}, nothing releasing"), Duration::from_secs(120), |b| {
            b["actual_bytes"].as_u64() == Some(bytes) && b["releasing_bytes"].as_u64() == Some(0)
        })
    }

    /// Waits for the guest to idle, shuts the VM down, returns the run.
    pub fn finish(self) -> RunResult {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let s = ctl(&self.socket, &["status"]);
            if s["state"] == "idle" {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(ctl(&self.socket, &["shutdown"])["ok"], Value::Bool(true));
        let r = self.vm.wait(Duration::from_secs(60));
        r.assert_success();
        r
    }

    /// Resident bytes of the VMM: RSS plus hugetlb pages (which RSS leaves out).
    pub fn resident(&self) -> u64 {
        resident_of(self.vm.pid())
    }
}

/// Rss + Shared_Hugetlb + Private_Hugetlb of a process (smaps_rollup).
pub fn resident_of(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("read smaps_rollup");
    text.lines()
        .filter(|l| l.starts_with("Rss:") || l.starts_with("Shared_Hugetlb:") || l.starts_with("Private_Hugetlb:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// The workload events named `name` of a JSON run report: (a, b).
pub fn events(report: &Value, name: &str) -> Vec<(u64, u64)> {
    report["workload_events"]
        .as_array()
        .expect("workload_events")
        .iter()
        .filter(|e| e["event"] == name)
        .map(|e| (e["a"].as_u64().unwrap_or(0), e["b"].as_u64().unwrap_or(0)))
        .collect()
}
