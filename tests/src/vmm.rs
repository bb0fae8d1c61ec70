//! Finding the `vmm` binary, running it with a timeout, and reading what it
//! printed.
//!
//! `cargo test` puts test executables in `target/<profile>/deps/`; the `vmm`
//! binary of the same profile is `target/<profile>/vmm`. Before the first run
//! in a test process, [`binary`] runs `cargo build --bin vmm --bin vmm-bench` for that profile
//! (a no-op when it is fresh), so a test never runs a stale VMM.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one `vmm` run may take before the test kills it and fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// How long building the binary may take (a fresh clone builds the guest too).
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// The workspace root (this crate is `<root>/tests`).
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory").to_path_buf()
}

/// `target/<profile>` of the running test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe.parent().expect("the test executable is in a directory");
    // Integration tests live in target/<profile>/deps.
    if dir.file_name() == Some(OsStr::new("deps")) { dir.parent().expect("deps/ has a parent").to_path_buf() } else { dir.to_path_buf() }
}

/// The `vmm` binary of this test run's profile, built once per test process.
///
/// # Panics
/// When the binary cannot be built: no test can run without it.
#[must_use]
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let profile_dir = profile_dir();
        let profile = profile_dir.file_name().and_then(OsStr::to_str).unwrap_or("debug").to_string();
        let mut target_dir = profile_dir.parent().expect("target/<profile> has a parent").to_path_buf();
        // With a build target configured (the root .cargo/config.toml links
        // the VMM statically), profiles live in target/<triple>/<profile>.
        if target_dir.file_name().and_then(OsStr::to_str).is_some_and(|n| n.contains("-unknown-linux-")) {
            target_dir = target_dir.parent().expect("target/<triple> has a parent").to_path_buf();
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        // `vmm bench ...` runs the `vmm-bench` binary beside `vmm`.
        cmd.current_dir(workspace_root()).args(["build", "--quiet", "--bin", "vmm", "--bin", "vmm-bench", "--target-dir"]).arg(&target_dir);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let result = run_with_timeout(cmd, BUILD_TIMEOUT, "cargo build --bin vmm --bin vmm-bench");
        assert!(result.status.success(), "building the vmm binary failed:\n{}", result.stderr);
        let path = profile_dir.join("vmm");
        assert!(path.is_file(), "cargo build succeeded but {} does not exist", path.display());
        path
    })
}

/// What one run printed, and how it ended.
#[derive(Debug)]
pub struct RunResult {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl RunResult {
    /// The exit code; panics if the process died of a signal.
    #[must_use]
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("`{}` died of signal {:?}\n{}", self.command, self.status.signal(), self.describe()))
    }

    /// stdout and stderr, for failure messages.
    #[must_use]
    pub fn describe(&self) -> String {
        format!("--- status: {}\n--- stdout:\n{}\n--- stderr:\n{}", self.status, self.stdout, self.stderr)
    }

    /// Asserts exit status 0.
    pub fn assert_success(&self) {
        assert_eq!(self.code(), 0, "`{}` failed\n{}", self.command, self.describe());
    }

    /// The `--json` report: the last stdout line that is a JSON object.
    ///
    /// # Panics
    /// When stdout holds no JSON object.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        self.stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok().filter(serde_json::Value::is_object))
            .unwrap_or_else(|| panic!("`{}` printed no JSON report\n{}", self.command, self.describe()))
    }

    /// Asserts that the run failed with a nonzero exit and exactly one
    /// error line `vmm: error: ...` on stderr, and returns that line.
    ///
    /// Log lines (`[WARN ...]`) and a guest console on stderr are allowed
    /// around it; a second error line or a panic is not.
    #[must_use]
    pub fn error_line(&self) -> String {
        assert_ne!(self.code(), 0, "`{}` should have failed\n{}", self.command, self.describe());
        assert!(!self.stderr.contains("panicked"), "`{}` panicked\n{}", self.command, self.describe());
        let errors: Vec<&str> = self.stderr.lines().filter(|l| l.starts_with("vmm: error:")).collect();
        assert_eq!(errors.len(), 1, "`{}` should print one `vmm: error:` line\n{}", self.command, self.describe());
        errors[0].to_string()
    }

    /// Asserts a one-line error that contains every one of `needles`.
    pub fn assert_error(&self, needles: &[&str]) {
        let line = self.error_line();
        for n in needles {
            assert!(line.contains(n), "`{}`: error line {line:?} should mention {n:?}\n{}", self.command, self.describe());
        }
    }
}

/// A `vmm` command being put together.
#[derive(Debug)]
pub struct Vmm {
    cmd: Command,
    words: Vec<String>,
    timeout: Duration,
}

impl Vmm {
    /// `vmm ARGS...`.
    #[must_use]
    pub fn new<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::with_binary(binary(), args)
    }

    /// `PATH ARGS...` (a copy of the binary, for runs as another user).
    #[must_use]
    pub fn with_binary<I, S>(path: &Path, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(path);
        let mut words = vec!["vmm".to_string()];
        for a in args {
            words.push(a.as_ref().to_string_lossy().into_owned());
            cmd.arg(a.as_ref());
        }
        // A test asserts on messages, not on log noise a developer enabled.
        cmd.env_remove("RUST_LOG").env_remove("MEMVISOR_KVM_DEVICE");
        Vmm { cmd, words, timeout: DEFAULT_TIMEOUT }
    }

    /// `vmm run --json ARGS...`: a run whose report the test reads.
    #[must_use]
    pub fn run_json<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut v = Self::new(["run", "--json"]);
        for a in args {
            v = v.arg(a);
        }
        v
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.words.push(a.as_ref().to_string_lossy().into_owned());
        self.cmd.arg(a);
        self
    }

    /// Adds several arguments.
    #[must_use]
    pub fn args(mut self, args: &[&str]) -> Self {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    /// Sets an environment variable.
    #[must_use]
    pub fn env(mut self, k: &str, v: impl AsRef<OsStr>) -> Self {
        self.words.insert(0, format!("{k}={}", v.as_ref().to_string_lossy()));
        self.cmd.env(k, v);
        self
    }

    /// Removes an environment variable the test process has.
    #[must_use]
    pub fn env_remove(mut self, k: &str) -> Self {
        self.words.insert(0, format!("[no {k}]"));
        self.cmd.env_remove(k);
        self
    }

    /// Runs as this uid and gid (needs root).
    #[must_use]
    pub fn as_user(mut self, uid: u32, gid: u32) -> Self {
        self.words.insert(0, format!("[uid {uid}]"));
        self.cmd.gid(gid).uid(uid);
        self
    }

    /// Runs with this file-mode creation mask.
    #[must_use]
    pub fn umask(mut self, mask: u32) -> Self {
        self.words.insert(0, format!("[umask {mask:03o}]"));
        // SAFETY: umask(2) is async-signal-safe and touches nothing the
        // parent shares with the child.
        unsafe {
            self.cmd.pre_exec(move || {
                libc::umask(mask as libc::mode_t);
                Ok(())
            });
        }
        self
    }

    /// Sets the timeout.
    #[must_use]
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The command line, for messages.
    #[must_use]
    pub fn describe(&self) -> String {
        self.words.join(" ")
    }

    /// Runs to the end (or the timeout, which fails the test).
    #[must_use]
    pub fn output(self) -> RunResult {
        let what = self.describe();
        run_with_timeout(self.cmd, self.timeout, &what)
    }

    /// Starts the process with stdout and stderr piped; see [`Running`].
    ///
    /// # Panics
    /// When the process cannot be started.
    #[must_use]
    pub fn spawn(mut self) -> Running {
        let what = self.describe();
        Running::new(start(&mut self.cmd, &what), what)
    }
}

/// A started process whose output is collected by two threads.
#[derive(Debug)]
pub struct Running {
    child: Child,
    command: String,
    started: Instant,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// stderr as read so far.
    stderr_live: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

fn collect(mut r: impl Read + Send + 'static, live: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    })
}

impl Running {
    fn new(mut child: Child, command: String) -> Self {
        let stderr_live = std::sync::Arc::default();
        let stdout = child.stdout.take().map(|r| collect(r, std::sync::Arc::default()));
        let stderr = child.stderr.take().map(|r| collect(r, std::sync::Arc::clone(&stderr_live)));
        Running { child, command, started: Instant::now(), stdout, stderr, stderr_live }
    }

    /// What the process has written to stderr so far (with `--json`, the
    /// guest console).
    #[must_use]
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr_live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (without reaping its output).
    ///
    /// # Panics
    /// When waiting fails.
    #[must_use]
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap_or_else(|e| panic!("waiting for `{}`: {e}", self.command)).is_some()
    }

    /// Waits until the process ends; kills it and panics after `timeout`.
    ///
    /// # Panics
    /// On timeout, with everything the process printed.
    #[must_use]
    pub fn wait(mut self, timeout: Duration) -> RunResult {
        let deadline = self.started + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("waiting for `{}`: {e}", self.command),
            }
        };
        let timed_out = status.is_none();
        let status = match status {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                self.child.wait().unwrap_or_else(|e| panic!("reaping `{}`: {e}", self.command))
            }
        };
        let join = |h: Option<std::thread::JoinHandle<String>>| h.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let result = RunResult {
            command: self.command.clone(),
            status,
            stdout: join(self.stdout.take()),
            stderr: join(self.stderr.take()),
            elapsed: self.started.elapsed(),
        };
        assert!(!timed_out, "`{}` did not finish within {timeout:?}; killed it\n{}", result.command, result.describe());
        result
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that panicked must not leave a VM behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `cmd` with stdout and stderr piped.
///
/// A binary a test has just copied can be briefly "busy" (ETXTBSY): a
/// process another test thread forks at that moment inherits the copy's
/// write descriptor until it execs. That passes within milliseconds, so
/// starting is retried for a while.
fn start(cmd: &mut Command, what: &str) -> Child {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot start `{what}`: {e}"),
        }
    }
}

fn run_with_timeout(mut cmd: Command, timeout: Duration, what: &str) -> RunResult {
    let child = start(&mut cmd, what);
    Running::new(child, what.to_string()).wait(timeout)
}

/// A directory under the system temp dir, removed on drop; readable by
/// every user (tests that run the VMM as another uid put files here).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory named after `tag`.
    ///
    /// # Panics
    /// When the directory cannot be created.
    #[must_use]
    pub fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("memvisor-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        TempDir(path)
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` in the directory and returns its path.
    ///
    /// # Panics
    /// When the file cannot be written.
    #[must_use]
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
