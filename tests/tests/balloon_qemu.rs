//! Our guest under QEMU, as a new user would run it: QEMU's `microvm`
//! machine boots the guest ELF the PVH way, and its virtio balloon sits
//! where QEMU puts virtio-mmio devices (from 0xfeb0_0000 up; with one
//! device, `virtio_mmio.device=512@0xfeb00e00:12`), not where memvisor puts
//! its own. The guest must find it from the command line QEMU writes, drive
//! it (QEMU's transport is the legacy one by default, and it completes
//! notifications on its I/O thread) and give QEMU its memory back.
//!
//! These need `qemu-system-x86_64` (Debian: `apt-get install
//! qemu-system-x86`, which `.ci/run` installs); without it they fail and
//! say so.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use memvisor::config::VmConfig;
use memvisor_abi::Pod;
use memvisor_tests::vmm::TempDir;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
/// Guest RAM.
const MEM: u64 = 256 * MIB;

/// The settings block for `workload` (what `vmm run --workload` would
/// write at 0x8000), as bytes for QEMU's `-device loader`.
fn boot_config(workload: &str) -> Vec<u8> {
    let config = VmConfig { workload: Some(workload.parse().expect("a valid workload")), ..VmConfig::default() };
    memvisor::vmm::boot_config(&config, memvisor::host::detect(), false, false, 0).as_bytes().to_vec()
}

/// A running QEMU with a QMP socket; killed when dropped.
struct Qemu {
    child: Child,
    qmp: PathBuf,
    serial: Option<std::thread::JoinHandle<String>>,
    _dir: TempDir,
}

impl Qemu {
    /// `qemu-system-x86_64 -M microvm,MACHINE ...` with a virtio balloon
    /// and our guest running `workload`.
    fn start(tag: &str, machine: &str, workload: &str) -> Self {
        let dir = TempDir::new(tag);
        let kernel = dir.write("guest.elf", memvisor::boot::TINY_GUEST);
        let settings = dir.write("boot-config.bin", boot_config(workload));
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.arg("-M").arg(format!("microvm{machine}"));
        // `-cpu host` alone aborts on this host (MSR 0x10a; host-facts.md).
        cmd.args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", &format!("{}M", MEM / MIB)]);
        cmd.args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-device", "virtio-balloon-device"]);
        cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-append", ""]);
        cmd.arg("-kernel").arg(&kernel);
        cmd.arg("-device").arg(format!("loader,file={},addr=0x8000", settings.display()));
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86): {e}"));
        let mut out = child.stdout.take().expect("stdout is piped");
        let serial = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Qemu { child, qmp, serial: Some(serial), _dir: dir }
    }

    /// Waits for QEMU to exit; its status and the guest's serial output.
    /// The guest's exit status `s` is QEMU's `(s << 1) | 1` (isa-debug-exit).
    fn wait(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait");
                panic!("QEMU still ran after {timeout:?} ({status}); serial:\n{}", self.serial());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code(), self.serial())
    }

    /// The guest's serial output, once QEMU has exited.
    fn serial(&mut self) -> String {
        self.serial.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }

    /// QEMU's resident memory.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("QEMU's /proc status");
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok());
        kib.expect("VmRSS") * 1024
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection (QEMU's `docs/interop/qmp-spec.rst`: one JSON object
/// per line; events may come between a command and its answer).
struct Qmp {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(socket: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("no QMP socket at {}: {e}", socket.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut qmp = Qmp { input: BufReader::new(stream.try_clone().expect("clone")), out: stream };
        qmp.read().and_then(|_| qmp.execute("qmp_capabilities", json!({}))).unwrap_or_else(|e| panic!("{e}"));
        qmp
    }

    fn read(&mut self) -> Result<Value, String> {
        loop {
            let mut line = String::new();
            match self.input.read_line(&mut line) {
                Ok(0) => return Err("QMP connection closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("QMP read: {e}")),
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("QMP sent {line:?}: {e}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        writeln!(self.out, "{}", json!({ "execute": command, "arguments": arguments })).map_err(|e| format!("{command}: QMP write: {e}"))?;
        let answer = self.read()?;
        answer.get("return").cloned().ok_or_else(|| format!("{command}: {answer}"))
    }

    /// Sets the guest's memory to `bytes` (`balloon`) and waits until the
    /// driver's `actual` matches it (`query-balloon`).
    fn balloon_and_wait(&mut self, bytes: u64) -> Result<(), String> {
        self.execute("balloon", json!({ "value": bytes }))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let actual = self.execute("query-balloon", json!({}))?["actual"].as_u64();
            if actual == Some(bytes) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the guest did not follow the balloon to {bytes}: actual {actual:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn our_guest_finds_and_drives_qemus_balloon() {
    // acpi=off: only then does microvm announce its devices on the command
    // line (with ACPI it describes them in the DSDT, which our guest does
    // not read). rounds=2: the second round lets the test measure QEMU's
    // memory with the balloon full and empty before the guest exits.
    let qemu = Qemu::start("qemu-balloon", ",acpi=off", "balloon:rounds=2");
    let mut qmp = Qmp::connect(&qemu.qmp);
    let mut rss = Vec::new();
    let steps = (|| {
        qmp.balloon_and_wait(MEM / 2)?;
        rss.push(qemu.rss());
        qmp.balloon_and_wait(MEM)?;
        // The deflated pages were written and verified by the guest:
        // resident again.
        rss.push(qemu.rss());
        qmp.balloon_and_wait(MEM / 2)?;
        // The guest ends once the balloon is empty again: nothing to wait
        // for but QEMU's exit.
        qmp.execute("balloon", json!({ "value": MEM })).map(drop)
    })();
    drop(qmp);
    let (code, serial) = qemu.wait(Duration::from_secs(120));
    if let Err(e) = steps {
        panic!("{e}; QEMU exited with {code:?}; serial:\n{serial}");
    }
    let (inflated, deflated) = (rss[0], rss[1]);
    eprintln!("QEMU resident: {} MiB with half the guest in the balloon, {} MiB after deflating", inflated / MIB, deflated / MIB);
    assert!(deflated.saturating_sub(inflated) >= MEM / 2 * 9 / 10, "inflating gave QEMU's memory back: {inflated} -> {deflated}");
    assert_eq!(code, Some(1), "the guest ended with status 0 (QEMU exits with 2 * status + 1); serial:\n{serial}");
    assert!(!serial.contains("no balloon"), "{serial}");
}

#[test]
fn without_an_announcement_the_guest_says_the_command_line_named_no_balloon() {
    // microvm's default (ACPI on) announces nothing on the command line.
    let qemu = Qemu::start("qemu-no-balloon", "", "balloon:rounds=1");
    let (code, serial) = qemu.wait(Duration::from_secs(120));
    assert_eq!(code, Some(2 * 5 + 1), "the guest ended with status 5 (no balloon); serial:\n{serial}");
    assert!(serial.contains("no balloon: the command line announces no virtio-mmio balloon"), "{serial}");
}
