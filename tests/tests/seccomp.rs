//! The seccomp filters at work (`vmm/src/seccomp`): a thread that makes a
//! forbidden system call (`execve`, through the hidden `--seccomp-probe
//! KIND` hook, right after its filter is installed) kills the VMM with
//! `SIGSYS` under the default `--seccomp kill`, is logged by the kernel and
//! lets the VM run on under `log`, and is not filtered under `none`. Every
//! other integration test runs under the default filters.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use memvisor_tests::vmm::TempDir;
use memvisor_tests::{RunResult, Vmm};

/// `vmm run` of a small VM with a balloon (so all three thread kinds
/// exist) whose first thread of `kind` calls execve; `mode` is
/// `--seccomp`, or the default when `None` (`$MEMVISOR_SECCOMP` removed).
fn probe(kind: &str, mode: Option<&str>) -> (RunResult, u32) {
    let mut v = Vmm::new(["run", "--mem", "64M", "--balloon", "0", "--seccomp-probe", kind]).env_remove("MEMVISOR_SECCOMP");
    if let Some(m) = mode {
        v = v.args(&["--seccomp", m]);
    }
    let running = v.spawn();
    let pid = running.pid();
    (running.wait(Duration::from_secs(120)), pid)
}

/// The kernel's seccomp records (`audit: type=1326`) of process `pid`,
/// waiting up to 3 s for the first.
fn seccomp_records(pid: u32) -> Vec<String> {
    let needle = format!(" pid={pid} ");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = std::process::Command::new("dmesg").output().expect("dmesg runs (root)");
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("type=1326") && l.contains(&needle)).map(str::to_string).collect();
        if !lines.is_empty() || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_killed_by_sigsys(r: &RunResult, pid: u32, comm: &str) {
    assert_eq!(r.status.signal(), Some(libc::SIGSYS), "`{}` should die of SIGSYS\n{}", r.command, r.describe());
    let records = seccomp_records(pid);
    assert!(
        records.iter().any(|l| l.contains(&format!("comm=\"{comm}")) && l.contains(" syscall=59 ") && l.contains(" sig=31 ")),
        "the kernel should log the killed execve of a {comm} thread: {records:#?}"
    );
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_kills_the_vmm_by_default() {
    let (r, pid) = probe("vcpu", None);
    assert_killed_by_sigsys(&r, pid, "vcpu0");
    assert!(!r.stdout.contains("memvisor report"), "the VM never got to its report: {}", r.describe());
}

#[test]
fn a_forbidden_call_on_the_balloons_release_thread_kills_the_vmm() {
    let (r, pid) = probe("device", Some("kill"));
    assert_killed_by_sigsys(&r, pid, "balloon");
}

#[test]
fn a_forbidden_call_on_a_vmm_thread_kills_the_vmm() {
    let (r, pid) = probe("vmm", Some("kill"));
    assert_eq!(r.status.signal(), Some(libc::SIGSYS), "{}", r.describe());
    // The signal thread or the main thread, whichever installed first.
    let records = seccomp_records(pid);
    assert!(records.iter().any(|l| l.contains(" syscall=59 ") && l.contains(" sig=31 ")), "{records:#?}");
}

#[test]
fn log_mode_logs_the_forbidden_call_and_the_vm_runs_on() {
    let (r, pid) = probe("vcpu", Some("log"));
    r.assert_success();
    assert!(r.stderr.contains("execve returned -1"), "the call went through and failed on its own (EFAULT): {}", r.describe());
    let records = seccomp_records(pid);
    assert!(
        records.iter().any(|l| l.contains("comm=\"vcpu0\"") && l.contains(" syscall=59 ") && l.contains(" sig=0 ")),
        "SECCOMP_RET_LOG records the call: {records:#?}"
    );
}

#[test]
fn none_installs_no_filter() {
    let (r, pid) = probe("vcpu", Some("none"));
    r.assert_success();
    assert!(r.stderr.contains("execve returned -1"), "{}", r.describe());
    assert!(seccomp_records(pid).is_empty(), "nothing is filtered, so nothing is logged");
}

#[test]
fn the_config_file_sets_the_mode_and_the_flag_overrides_it() {
    let dir = TempDir::new("seccomp-config");
    let file = dir.write("vm.toml", "mem = \"64M\"\nballoon = \"0\"\nseccomp = \"log\"\n");
    let r = Vmm::new(["run", "--seccomp-probe", "vcpu", "--config"]).arg(&file).env_remove("MEMVISOR_SECCOMP").output();
    r.assert_success();
    let r = Vmm::new(["run", "--seccomp-probe", "vcpu", "--seccomp", "kill", "--config"]).arg(&file).env_remove("MEMVISOR_SECCOMP").output();
    assert_eq!(r.status.signal(), Some(libc::SIGSYS), "{}", r.describe());
}

#[test]
fn bad_modes_are_refused() {
    let r = Vmm::new(["run", "--seccomp", "off"]).output();
    assert_eq!(r.code(), 2, "clap refuses an unknown mode: {}", r.describe());
    let r = Vmm::new(["run", "--mem", "64M"]).env("MEMVISOR_SECCOMP", "sometimes").output();
    r.assert_error(&["MEMVISOR_SECCOMP", "sometimes"]);
}
