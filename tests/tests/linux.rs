//! A stock Linux kernel (Debian's cloud kernel, fetched by
//! `resources/linux/fetch.sh`) boots under memvisor, and Linux itself is
//! the oracle: the memory map it prints is the one the VMM built, the
//! command line it prints is ours, the memory it counts is all of guest
//! RAM but the holes, and the CPUs it allows are the vCPUs the VMM's ACPI
//! tables announce.
//!
//! On this project's reference host guest ring-0 code is emulated (KVM's
//! PVM flavour), so a kernel gets through early boot only: these tests stop
//! the VM at the milestones they check ("BIOS-e820" and "Command line:"
//! after ~15 s, "Memory:" after ~45 s). On a VT-x/AMD-V host the same
//! lines come within a second. The kernel is entered as a plain vmlinux
//! through Linux's 64-bit boot protocol (fetch.sh's copy without the PVH
//! note), and once, with two vCPUs, the PVH way; `earlyprintk` prints
//! each line as it is made, before the real console is up. The boots take
//! a test process's turns one at a time
//! ([`boot_until`]): each keeps a host core busy for a minute, and the
//! reference host has two.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
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
    // One boot at a time in this process: Linux's early boot runs
    // emulated at ~1 µs an instruction, and tests booting side by side on
    // the 2-core reference host slow each other past their timeouts. A test
    // that failed while holding the lock leaves it usable (into_inner).
    static ONE_BOOT: Mutex<()> = Mutex::new(());
    let _turn = ONE_BOOT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// `[mem 0x...-0x...] usable|reserved|ACPI data` entries of `BIOS-e820`
/// lines, as (start, end exclusive, the kind as Linux names it).
fn e820_lines(c: &Console) -> Vec<(u64, u64, String)> {
    c.lines_with("BIOS-e820: [mem ")
        .iter()
        .map(|l| {
            let range = l.split("[mem ").nth(1).and_then(|r| r.split(']').next()).unwrap_or_else(|| panic!("no range in {l:?}"));
            let (a, b) = range.split_once('-').unwrap_or_else(|| panic!("no range in {l:?}"));
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("bad address in {l:?}"));
            let kind = l.rsplit(']').next().unwrap_or("").trim();
            (hex(a), hex(b) + 1, kind.to_string())
        })
        .collect()
}

/// How Linux names an E820 type when it prints the map
/// (arch/x86/kernel/e820.c, `e820_type_to_string`).
fn e820_kind(kind: u32) -> &'static str {
    match kind {
        memvisor_abi::boot::E820_RAM => "usable",
        memvisor_abi::boot::E820_ACPI => "ACPI data",
        _ => "reserved",
    }
}

/// The map the VMM builds for `mem` bytes, with adjacent entries of one
/// kind merged as Linux merges them (e820__update_table) before printing.
fn expected_e820(mem: u64) -> Vec<(u64, u64, String)> {
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for e in memvisor::layout::e820_map(mem) {
        let kind = e820_kind(e.kind);
        match out.last_mut() {
            Some(last) if last.1 == e.addr && last.2 == kind => last.1 = e.addr + e.size,
            _ => out.push((e.addr, e.addr + e.size, kind.to_string())),
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
    let usable: u64 = expected_e820(mem).iter().filter(|e| e.2 == "usable").map(|e| (e.1 & !0xfff).saturating_sub((e.0 + 0xfff) & !0xfff)).sum();
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

/// The address and length of each `ACPI: SIG 0x... LEN (...)` table line
/// Linux prints as it finds the tables (acpi_tb_print_table_header), by
/// signature.
fn acpi_table_lines(c: &Console) -> BTreeMap<String, (u64, u64)> {
    c.lines_with("] ACPI: ")
        .iter()
        .filter_map(|l| {
            let mut words = l.split("] ACPI: ").nth(1)?.split_whitespace();
            let (sig, addr, len) = (words.next()?, words.next()?, words.next()?);
            let addr = u64::from_str_radix(addr.strip_prefix("0x")?, 16).ok()?;
            let len = u64::from_str_radix(len, 16).ok()?;
            (sig.len() == 4).then(|| (sig.to_string(), (addr, len)))
        })
        .collect()
}

/// The number after `word` in `line` ("Allowing 4 CPUs": `Allowing` gives 4).
fn number_after(line: &str, word: &str) -> Option<u64> {
    let mut words = line.split_whitespace().skip_while(|w| *w != word);
    words.next()?;
    words.next()?.trim_end_matches(',').parse().ok()
}

#[test]
fn linux_sees_every_vcpu_through_the_acpi_tables() {
    use memvisor::layout::abi;
    // Both ways in: 2 vCPUs the PVH way (the start info's rsdp_paddr),
    // 4 through the 64-bit boot protocol (the zero page's acpi_rsdp_addr).
    for (cpus, kernel) in [(2u32, "VMLINUX"), (4, "VMLINUX_NOPVH")] {
        let kernel = &linux()[kernel];
        let n = cpus.to_string();
        // Linux parses the MADT in setup_arch and prints the CPUs it allows
        // right after (prefill_possible_map): stop there, ~25 s in here.
        let c = boot_until(kernel, &["--mem", "512M", "--vcpus", &n, "--cmdline", CMDLINE], &["smpboot: Allowing"], Duration::from_secs(400));
        assert!(c.complete, "{cpus} vCPUs: Linux printed the CPUs it allows\n{}", c.describe());

        // Each table where the layout puts it, as long as the VMM built it.
        let built = memvisor::boot::acpi::tables(cpus).expect("tables for this count");
        let len_at = |addr: u64| built.iter().find(|t| t.addr.0 == addr).map(|t| t.bytes.len() as u64).expect("a table there");
        let found = acpi_table_lines(&c);
        for (sig, addr) in [("RSDP", abi::ACPI_RSDP), ("XSDT", abi::ACPI_XSDT), ("FACP", abi::ACPI_FADT), ("FACS", abi::ACPI_FACS), ("DSDT", abi::ACPI_DSDT), ("APIC", abi::ACPI_MADT)] {
            assert_eq!(found.get(sig), Some(&(addr, len_at(addr))), "{cpus} vCPUs: Linux found the {sig} at {addr:#x}\n{}", c.describe());
        }
        // The MADT's length is 44 bytes of header, 8 per Local APIC entry
        // and 28 for the IOAPIC, the SCI's override and the NMI entry: the
        // length Linux printed counts the CPUs it read.
        let madt_len = found.get("APIC").map_or(0, |&(_, len)| len);
        assert_eq!((madt_len - 44 - 28) / 8, u64::from(cpus), "{cpus} vCPUs: one Local APIC entry each in the MADT Linux read");
        // Linux 6.1 prints each "ACPI: LAPIC (acpi_id[..] lapic_id[..]
        // enabled)" at debug level only; a kernel that prints them must
        // list exactly vCPUs 0..N.
        let lapics: Vec<&str> = c.lines_with("ACPI: LAPIC (");
        if !lapics.is_empty() {
            let ids: Vec<String> = lapics.iter().filter_map(|l| l.split("lapic_id[").nth(1)?.split(']').next().map(str::to_string)).collect();
            let want: Vec<String> = (0..cpus).map(|i| format!("0x{i:02x}")).collect();
            assert_eq!(ids, want, "{cpus} vCPUs: the LAPIC entries Linux printed\n{}", c.describe());
        }
        let mode = c.lines_with("ACPI: Using ACPI (MADT) for SMP configuration information");
        assert!(!mode.is_empty(), "{cpus} vCPUs: Linux took its SMP configuration from the MADT\n{}", c.describe());
        let ioapic = c.lines_with("IOAPIC[0]: apic_id");
        assert!(ioapic.first().is_some_and(|l| l.contains("address 0xfec00000, GSI 0-23")), "{cpus} vCPUs: the IOAPIC at its address with GSIs from 0 (KVM's 24 pins)\n{}", c.describe());
        let nmi = c.lines_with("ACPI: LAPIC_NMI (");
        assert!(nmi.first().is_some_and(|l| l.contains("acpi_id[0xff]") && l.contains("lint[0x1]")), "{cpus} vCPUs: every CPU's LINT1 is its NMI input\n{}", c.describe());
        // (When the real console takes over, Linux prints its log again:
        // a line may appear twice if the VM ran that far.)
        let overrides = c.lines_with("ACPI: INT_SRC_OVR (");
        assert!(!overrides.is_empty(), "{cpus} vCPUs: the SCI's override\n{}", c.describe());
        assert!(overrides.iter().all(|l| l.contains("bus_irq 9 global_irq 9 high level")), "{cpus} vCPUs: the SCI's override and none for IRQ 0\n{}", c.describe());

        let allowing = c.lines_with("smpboot: Allowing ");
        let line = allowing.first().copied().unwrap_or_default();
        assert_eq!(number_after(line, "Allowing"), Some(u64::from(cpus)), "{cpus} vCPUs: {line:?}\n{}", c.describe());
        assert_eq!(number_after(line, "CPUs,"), Some(0), "{cpus} vCPUs: no hotplug CPUs: {line:?}\n{}", c.describe());
    }
}
