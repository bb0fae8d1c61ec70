//! seccomp filters: what each kind of VMM thread may ask of the kernel.
//!
//! A guest that escapes into the VMM through a device bug runs as one of
//! the VMM's threads. Each thread therefore gets, before the guest runs,
//! a seccomp-BPF filter (built with rust-vmm's `seccompiler`) that allows
//! only the system calls that kind of thread makes, KVM ioctls by request
//! number. Three kinds ([`ThreadKind`]), one file each:
//!
//! | kind | threads | file |
//! |---|---|---|
//! | [`ThreadKind::Vmm`] | the main thread once the VM is built (it waits, then reports), the control socket's `api` thread and its `api-conn` threads (which run jobs: snapshots and their writer threads, translations, balloon requests), `signals`, a restore's `restore-kvm` thread (its image check), a migration destination's `postcopy-*` threads | [`vmm`] |
//! | [`ThreadKind::Vcpu`] | `vcpuN`: `KVM_RUN` and the exits it handles (devices, guest reports, dirty-ring harvests) | [`vcpu`] |
//! | [`ThreadKind::Device`] | the balloon's `balloon` release thread | [`device`] |
//!
//! Every kind also gets [`common`]'s list: what the Rust runtime and glibc
//! do on any thread (allocate, lock, log, end the thread). Threads started
//! by a filtered thread inherit its filter (seccomp(2)), which is how the
//! `api-conn` threads and the snapshot writer threads get the VMM
//! threads' one; the others install their own when they start.
//!
//! What the filter does when a thread makes a call outside its list is
//! the user's choice ([`SeccompMode`], `--seccomp`): `kill` (the default)
//! kills the whole process with `SIGSYS` (`SECCOMP_RET_KILL_PROCESS`);
//! `log` lets the call through and has the kernel log it
//! (`SECCOMP_RET_LOG`: an `audit: type=1326 ... comm="vcpu0" ...
//! syscall=N` line in `dmesg`); `none` installs nothing. The mode is
//! process-wide and set once by the `vmm` binary ([`configure`]); a program
//! that uses this crate as a library and never calls it installs nothing.
//!
//! # Extending the lists
//! A new code path that runs on a filtered thread and makes a system call
//! no list has ends the VMM with `SIGSYS` under the default `kill`. To find
//! what it needs:
//! 1. run it, or the integration tests (the `vmm` binary reads a default
//!    mode from `MEMVISOR_SECCOMP`, which the tests' helper passes
//!    through), with `MEMVISOR_SECCOMP=log`;
//! 2. read the kernel log: `dmesg | grep 'type=1326'` gives the thread
//!    (`comm=`, e.g. `vcpu1`, `api-conn`, `balloon`) and the call
//!    (`syscall=` number: `ausyscall N`, or `libc::SYS_*` in
//!    the libc crate); an `ioctl` (16) is logged without its request
//!    number: `strace -f -e trace=ioctl` the same run to see which;
//! 3. add it to that thread kind's file (ioctls to its request list, in
//!    [`ioctls`] when it is a new KVM ioctl) with a comment saying which
//!    code path needs it, and run the suite again under `kill`.
//!
//! Keep the lists tight: a call belongs on a thread kind only when code
//! that runs on that kind makes it. docs/security.md lists them with
//! their reasons.

pub mod common;
pub mod device;
pub mod ioctls;
pub mod vcpu;
pub mod vmm;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};
use serde::{Deserialize, Serialize};

/// What a filter does with a call outside its thread kind's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompMode {
    /// Kill the process (`SECCOMP_RET_KILL_PROCESS`: `SIGSYS`).
    #[default]
    Kill,
    /// Allow the call and log it (`SECCOMP_RET_LOG`: the kernel's audit
    /// log, `dmesg`).
    Log,
    /// No filter.
    None,
}

impl SeccompMode {
    /// Every mode, in the order `--help` lists them.
    pub const ALL: &'static [SeccompMode] = &[SeccompMode::Kill, SeccompMode::Log, SeccompMode::None];

    /// The name in flags, files and reports.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
            SeccompMode::None => "none",
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SeccompMode::ALL.iter().copied().find(|m| m.as_str() == s).ok_or_else(|| format!("invalid value {s:?}; expected one of: kill, log, none"))
    }
}

/// The kinds of VMM thread, each with its own filter (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Main, control socket, signal and restore threads.
    Vmm,
    /// vCPU threads.
    Vcpu,
    /// Device threads (the balloon's release thread).
    Device,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Device];

    /// The name used by `--seccomp-probe` and in messages.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
        }
    }

    fn index(self) -> usize {
        match self {
            ThreadKind::Vmm => 0,
            ThreadKind::Vcpu => 1,
            ThreadKind::Device => 2,
        }
    }
}

impl std::str::FromStr for ThreadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ThreadKind::ALL.iter().copied().find(|k| k.as_str() == s).ok_or_else(|| format!("invalid thread kind {s:?}; expected one of: vmm, vcpu, device"))
    }
}

/// Why the filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused a rule or the filter.
    #[error("cannot build the seccomp filter of the {kind} threads: {message}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's message.
        message: String,
    },
    /// seccomp(2) refused the filter.
    #[error("cannot install the seccomp filter of the {kind} threads: {message}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's message.
        message: String,
    },
    /// [`configure`] was called twice.
    #[error("seccomp filters are configured already")]
    Configured,
}

/// One allowed system call: any arguments, or only some values of one.
#[derive(Debug, Clone, Copy)]
pub enum Allow {
    /// The call, whatever its arguments.
    Call(i64),
    /// The call when argument `arg` (32 bits) is one of these values.
    Arg(i64, u8, &'static [u64]),
}

/// The filters, compiled once by [`configure`].
#[derive(Debug)]
struct Configured {
    mode: SeccompMode,
    /// By [`ThreadKind::index`]; empty under [`SeccompMode::None`].
    filters: Vec<BpfProgram>,
    /// A thread kind each of whose threads makes a forbidden call right
    /// after installing its filter (`--seccomp-probe`, for tests).
    probe: Option<ThreadKind>,
}

static CONFIGURED: OnceLock<Configured> = OnceLock::new();

/// The system calls threads of `kind` may make: [`common`]'s and its own,
/// merged per call (argument rules of one call are or-ed).
#[must_use]
pub fn allowlist(kind: ThreadKind) -> Vec<Allow> {
    let own = match kind {
        ThreadKind::Vmm => vmm::allowed(),
        ThreadKind::Vcpu => vcpu::allowed(),
        ThreadKind::Device => device::allowed(),
    };
    common::allowed().into_iter().chain(own).collect()
}

/// The system call numbers of `kind`'s list, ascending (for the docs and
/// tests).
#[must_use]
pub fn syscall_numbers(kind: ThreadKind) -> Vec<i64> {
    let mut v: Vec<i64> = allowlist(kind).iter().map(|a| match a {
        Allow::Call(n) | Allow::Arg(n, _, _) => *n,
    }).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The filter of `kind` whose calls outside the list get `mismatch`.
fn build(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let err = |e: seccompiler::BackendError| SeccompError::Build { kind: kind.as_str(), message: e.to_string() };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // A call allowed whatever its arguments has an empty rule list, which
    // seccompiler reads as "always"; it wins over argument rules.
    let mut unconditional = Vec::new();
    for a in allowlist(kind) {
        match a {
            Allow::Call(n) => unconditional.push(n),
            Allow::Arg(n, arg, values) => {
                let entry = rules.entry(n).or_default();
                for &v in values {
                    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v).map_err(err)?;
                    entry.push(SeccompRule::new(vec![cond]).map_err(err)?);
                }
            }
        }
    }
    for n in unconditional {
        rules.insert(n, Vec::new());
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SeccompError::Build { kind: kind.as_str(), message: e.to_string() })?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// Sets the process's mode and compiles every kind's filter; the threads
/// install theirs with [`apply`] as they start. `probe`: a thread kind
/// whose threads make a forbidden call (`execve`) right after installing
/// their filter, to show the filter at work.
///
/// # Errors
/// [`SeccompError::Build`], or [`SeccompError::Configured`] on a second call.
pub fn configure(mode: SeccompMode, probe: Option<ThreadKind>) -> Result<(), SeccompError> {
    let mismatch = match mode {
        SeccompMode::Kill => Some(SeccompAction::KillProcess),
        SeccompMode::Log => Some(SeccompAction::Log),
        SeccompMode::None => None,
    };
    let filters = match mismatch {
        Some(m) => ThreadKind::ALL.iter().map(|&k| build(k, m.clone())).collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    CONFIGURED.set(Configured { mode, filters, probe }).map_err(|_| SeccompError::Configured)
}

/// The mode [`configure`] set, if it was called.
#[must_use]
pub fn mode() -> Option<SeccompMode> {
    CONFIGURED.get().map(|c| c.mode)
}

/// Installs `kind`'s filter on the calling thread (nothing when the
/// process did not [`configure`] filters, or chose `none`).
///
/// # Errors
/// [`SeccompError::Install`].
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(c) = CONFIGURED.get() else { return Ok(()) };
    if let Some(filter) = c.filters.get(kind.index()) {
        seccompiler::apply_filter(filter).map_err(|e| SeccompError::Install { kind: kind.as_str(), message: e.to_string() })?;
    }
    if c.probe == Some(kind) {
        probe(kind);
    }
    Ok(())
}

/// [`apply`] for a thread that cannot hand an error back: a thread that
/// should be filtered and is not must not run, so the process ends with
/// the error (status 1).
pub fn apply_or_abort(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("vmm: error: {e}");
        std::process::exit(1);
    }
}

/// The forbidden call of `--seccomp-probe`: `execve` with a null path,
/// which no thread kind allows. Under `kill` the process dies of `SIGSYS`
/// here; under `log` the kernel logs it and it fails with `EFAULT`; with no
/// filter it just fails.
fn probe(kind: ThreadKind) {
    log::warn!("seccomp probe: a {} thread calls execve, which its filter forbids", kind.as_str());
    // SAFETY: execve with null pointers reads nothing and fails with
    // EFAULT when the filter lets it through.
    let r = unsafe { libc::syscall(libc::SYS_execve, std::ptr::null::<libc::c_char>(), std::ptr::null::<*const libc::c_char>(), std::ptr::null::<*const libc::c_char>()) };
    log::warn!("seccomp probe: execve returned {r} ({}); the filter let it through", std::io::Error::last_os_error());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_under_both_actions() {
        for kind in ThreadKind::ALL {
            for action in [SeccompAction::KillProcess, SeccompAction::Log] {
                let p = build(kind, action).unwrap();
                assert!(!p.is_empty());
            }
        }
    }

    #[test]
    fn no_kind_may_exec_or_fork_and_only_vmm_threads_open_sockets() {
        for kind in ThreadKind::ALL {
            let calls = syscall_numbers(kind);
            for forbidden in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_fork, libc::SYS_vfork, libc::SYS_ptrace, libc::SYS_process_vm_writev] {
                assert!(!calls.contains(&forbidden), "{kind:?} allows syscall {forbidden}");
            }
            // A migration's stream is the VMM threads' only socket.
            if kind != ThreadKind::Vmm {
                for forbidden in [libc::SYS_socket, libc::SYS_connect] {
                    assert!(!calls.contains(&forbidden), "{kind:?} allows syscall {forbidden}");
                }
            }
        }
    }

    #[test]
    fn the_release_thread_opens_no_files() {
        for kind in [ThreadKind::Device] {
            let calls = syscall_numbers(kind);
            for forbidden in [libc::SYS_openat, libc::SYS_open, libc::SYS_unlinkat, libc::SYS_renameat2] {
                assert!(!calls.contains(&forbidden), "{kind:?} allows syscall {forbidden}");
            }
        }
    }

    #[test]
    fn modes_and_kinds_parse_their_names() {
        for m in SeccompMode::ALL {
            assert_eq!(m.as_str().parse::<SeccompMode>(), Ok(*m));
        }
        assert!("off".parse::<SeccompMode>().is_err());
        assert_eq!("vcpu".parse::<ThreadKind>(), Ok(ThreadKind::Vcpu));
        assert_eq!(SeccompMode::default(), SeccompMode::Kill);
    }
}
