//! A stock Linux kernel (Debian's cloud kernel, fetched by
//! `resources/linux/fetch.sh`) boots under memvisor, and Linux itself is
//! the oracle: the memory map it prints is the one the VMM built, the
//! command line it prints is ours, and the memory it counts is all of
//! guest RAM but the holes.
//!
//! On this project's reference host guest ring-0 code is emulated (KVM's
//! PVM flavour), so a kernel gets through early boot only: these tests stop
//! the VM at the milestones they check ("BIOS-e820" and "Command line:"
//! after ~15 s, "Memory:" after ~45 s). On a VT-x/AMD-V host the same
//! lines come within a second. The kernel is entered as a plain vmlinux
//! through Linux's 64-bit boot protocol (fetch.sh's copy without the PVH
//! note); `earlyprintk` prints each line as it is made, before the real
//! console is up.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use memvisor_tests::vmm::{binary, workspace_root};

/// fetch.sh's KEY=PATH lines, fetched once per test process.
fn linux() -> &'static BTreeMap<String, PathBuf> {
    static FILES: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    FILES.get_or_init(|| {
        let script = workspace_root().join("resources/linux/fetch.sh");
        let out = Command::new("bash").arg(&script).stderr(Stdio::inherit()).output().expect("run resources/linux/fetch.sh");
        assert!(out.status.success(), "resources/linux/fetch.sh failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect()
    })
}

/// The kernel command line every test uses: the serial console from the
/// first line (`earlyprintk`), `noxsave` because this host's emulator
/// refuses `xrstor` at ring 0 (vmm/src/boot/linux.rs), and a reboot or
/// panic that ends the VM.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,keep noxsave reboot=k panic=-1";

/// What a boot printed: each console line with the seconds since spawn.
struct Console {
    lines: Vec<(f64, String)>,
    /// Whether every milestone was seen.
    complete: bool,
}

impl Console {
    fn lines_with(&self, needle: &str) -> Vec<&str> {
        self.lines.iter().filter(|(_, l)| l.contains(needle)).map(|(_, l)| l.as_str()).collect()
    }

    fn describe(&self) -> String {
        let tail: Vec<String> = self.lines.iter().rev().take(30).rev().map(|(t, l)| format!("{t:8.2} {l}")).collect();
        format!("--- last console lines:\n{}", tail.join("\n"))
    }
}

/// Boots `kernel` with `args` and reads the console until every line in
/// `milestones` has appeared (then kills the VM), the VM exits, or
/// `timeout` passes.
fn boot_until(kernel: &PathBuf, args: &[&str], milestones: &[&str], timeout: Duration) -> Console {
    let start = Instant::now();
    let mut child = Command::new(binary())
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vmm run");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((start.elapsed().as_secs_f64(), line)).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut missing: Vec<&str> = milestones.to_vec();
    while !missing.is_empty() {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok((t, line)) => {
                missing.retain(|m| !line.contains(m));
                lines.push((t, line));
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    while let Ok(l) = rx.try_recv() {
        lines.push(l);
    }
    Console { lines, complete: missing.is_empty() }
}

/// `[mem 0x...-0x...] usable|reserved` entries of `BIOS-e820` lines, as
/// (start, end exclusive, usable).
fn e820_lines(c: &Console) -> Vec<(u64, u64, bool)> {
    c.lines_with("BIOS-e820: [mem ")
        .iter()
        .map(|l| {
            let range = l.split("[mem ").nth(1).and_then(|r| r.split(']').next()).unwrap_or_else(|| panic!("no range in {l:?}"));
            let (a, b) = range.split_once('-').unwrap_or_else(|| panic!("no range in {l:?}"));
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("bad address in {l:?}"));
            let kind = l.rsplit(']').next().unwrap_or("").trim();
            (hex(a), hex(b) + 1, kind == "usable")
        })
        .collect()
}

/// The map the VMM builds for `mem` bytes, with adjacent entries of one
/// kind merged as Linux merges them (e820__update_table) before printing.
fn expected_e820(mem: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in memvisor::layout::e820_map(mem) {
        let usable = e.kind == memvisor_abi::boot::E820_RAM;
        match out.last_mut() {
            Some(last) if last.1 == e.addr && last.2 == usable => last.1 = e.addr + e.size,
            _ => out.push((e.addr, e.addr + e.size, usable)),
        }
    }
    out
}

#[test]
fn linux_prints_the_memory_map_and_command_line_memvisor_built() {
    let kernel = &linux()["VMLINUX_NOPVH"];
    // Below the MMIO hole, and split around it (RAM above 4 GiB).
    for (mem, arg) in [(512u64 << 20, "512M"), (5 << 30, "5G")] {
        // Linux prints its command line first, then the map (setup_arch):
        // wait for the line of the map's last entry.
        let last = expected_e820(mem).last().map(|e| format!("BIOS-e820: [mem {:#018x}-{:#018x}]", e.0, e.1 - 1)).expect("a map");
        let c = boot_until(kernel, &["--mem", arg, "--cmdline", CMDLINE], &["Command line:", &last], Duration::from_secs(300));
        assert!(c.complete, "{arg}: Linux printed its command line and memory map\n{}", c.describe());
        let printed = e820_lines(&c);
        assert_eq!(printed, expected_e820(mem), "{arg}: Linux's BIOS-e820 map is memvisor's\n{}", c.describe());
        let cmd = c.lines_with("Command line: ");
        assert_eq!(cmd.first().and_then(|l| l.split("Command line: ").nth(1)), Some(CMDLINE), "{arg}: Linux runs with our command line\n{}", c.describe());
    }
}

#[test]
fn linux_sees_the_balloon_memvisor_announces_on_its_command_line() {
    let kernel = &linux()["VMLINUX_NOPVH"];
    let c = boot_until(kernel, &["--mem", "512M", "--balloon", "0", "--cmdline", CMDLINE], &["Command line:"], Duration::from_secs(300));
    assert!(c.complete, "{}", c.describe());
    let layout = memvisor::layout::BALLOON;
    let want = format!("{CMDLINE} virtio_mmio.device=4K@{:#x}:{}", layout.base.0, layout.gsi);
    let cmd = c.lines_with("Command line: ");
    assert_eq!(cmd.first().and_then(|l| l.split("Command line: ").nth(1)), Some(want.as_str()), "{}", c.describe());
}

#[test]
fn linux_counts_all_of_guest_ram_but_the_holes() {
    let kernel = &linux()["VMLINUX_NOPVH"];
    let mem = 512u64 << 20;
    let c = boot_until(kernel, &["--mem", "512M", "--cmdline", CMDLINE], &["Memory: "], Duration::from_secs(600));
    assert!(c.complete, "Linux printed its memory line\n{}", c.describe());
    let line = c.lines_with("Memory: ")[0].to_string();
    // "Memory: 219840K/523896K available (...)": the second figure is every
    // page of usable RAM Linux manages.
    let total_k: u64 = line.split("Memory: ").nth(1).and_then(|r| r.split('/').nth(1)).and_then(|t| t.split('K').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("cannot read {line:?}"));
    // Usable ranges, each rounded inward to whole pages, less page 0 (which
    // Linux reserves on x86: the BIOS data area, trim_bios_range).
    let usable: u64 = expected_e820(mem).iter().filter(|e| e.2).map(|e| (e.1 & !0xfff).saturating_sub((e.0 + 0xfff) & !0xfff)).sum();
    assert_eq!(total_k * 1024, usable - 4096, "{line}: Linux counts every usable page memvisor gave it ({mem} bytes less the holes)\n{}", c.describe());
}

/// The bzImage itself, decompressed by memvisor (`--kernel-decompress
/// vmm`, the default; `vmm/src/boot/decompress.rs`): what memvisor takes
/// out of it is, byte for byte, the vmlinux fetch.sh extracted with the
/// compressor's own tool, and entered with the bzImage's setup header it
/// prints "Linux version" (the one fetch.sh downloaded) and runs with our
/// command line. The VM is stopped there: without the guest's ring-0
/// decompressor that is ~15 s on the reference host instead of ~100 s.
#[test]
fn a_bzimage_decompressed_by_the_vmm_boots_with_our_command_line() {
    let files = linux();
    let image = std::fs::read(&files["VMLINUZ"]).expect("read the bzImage");
    let info = memvisor::boot::bzimage::parse(&image).expect("a bootable bzImage");
    let payload = memvisor::boot::decompress::payload(&image, &info).expect("the bzImage's payload");
    let vmlinux = memvisor::boot::decompress::decompress(&payload, memvisor::boot::decompress::DECOMPRESSED_MAX).expect("the payload decompresses");
    let want = std::fs::read(&files["VMLINUX"]).expect("read fetch.sh's vmlinux");
    assert!(vmlinux == want, "memvisor's {} payload decompresses to {} bytes, fetch.sh's vmlinux has {}: they differ", payload.compression, vmlinux.len(), want.len());

    let initrd = files["INITRAMFS"].to_str().expect("a UTF-8 path");
    let args = ["--mem", "512M", "--kernel-decompress", "vmm", "--initrd", initrd, "--cmdline", CMDLINE];
    let c = boot_until(&files["VMLINUZ"], &args, &["Linux version", "Command line:"], Duration::from_secs(300));
    assert!(c.complete, "the bzImage printed its version and command line\n{}", c.describe());
    let version = c.lines_with("Linux version ");
    // VERSION is the package's version, which the banner ends with ("Debian 6.1.192-3 (...)").
    let release = files["VERSION"].to_string_lossy();
    assert!(version.first().is_some_and(|l| l.contains(&format!("Debian {release} "))), "Linux {release} is the kernel fetch.sh downloaded\n{}", c.describe());
    let cmd = c.lines_with("Command line: ");
    assert_eq!(cmd.first().and_then(|l| l.split("Command line: ").nth(1)), Some(CMDLINE), "Linux runs with our command line\n{}", c.describe());
    let at = |needle: &str| c.lines.iter().find(|(_, l)| l.contains(needle)).map(|(t, _)| *t);
    eprintln!("bzImage, VMM decompression: \"Linux version\" at {:.1} s, \"Command line:\" at {:.1} s", at("Linux version ").unwrap_or(f64::NAN), at("Command line: ").unwrap_or(f64::NAN));
}
