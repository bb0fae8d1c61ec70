//! `vmm bench migrate`: live migration of a 1 GiB guest, idle and under
//! dirty rates, over loopback and over a veth pair between two network
//! namespaces, memvisor and QEMU side by side in the same run.
//!
//! The guest is memvisor's own, in both VMMs (QEMU boots the same ELF with
//! `-M microvm -kernel` and its boot configuration placed at 0x8000 by
//! `-device loader`): after its self-test (which touches and zeroes all
//! RAM) it runs the ticker workload over half of RAM, filled with data,
//! rewriting pages at the case's rate while it watches its own clock.
//! Each run migrates once, from a fresh source to a fresh destination:
//!
//! - total time: memvisor's `elapsed_ms`, QEMU's `total-time`;
//! - bytes on the link ÷ RAM, and ÷ the guest's data (the ticker's buffer);
//! - throughput of the first round (memvisor: round 0's bytes over its
//!   send time; QEMU: its `mbps`) ÷ the link's, measured in the same run
//!   with a plain TCP stream between the same endpoints;
//! - downtime as each VMM reports it, and as the guest saw it: the
//!   longest gap in its clock that began between the `migrate` request and
//!   the end (the guest's TSC is the host's here: restoring the TSC MSR
//!   does not stop it, `docs/migration.md`).
//!
//! QEMU 7.2 caps migration at 128 MiB/s by default; the bench raises
//! `max-bandwidth` to 100 GiB/s and sets `downtime-limit` to the same
//! maximum downtime memvisor gets.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};

use memvisor_abi::Pod as _;

use crate::stats::{Summary, summarize};

/// Flags of `vmm bench migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Migrations per case.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Guest RAM (the ticker's buffer is half of it, at most 1 GiB).
    #[arg(long, default_value = "1G")]
    mem: String,
    /// Dirty rates besides the idle guest, MiB/s, comma-separated.
    #[arg(long, default_value = "50,200")]
    rates: String,
    /// The maximum downtime asked of both VMMs, ms.
    #[arg(long, default_value_t = 50)]
    max_downtime_ms: u64,
    /// Leave QEMU out.
    #[arg(long)]
    no_qemu: bool,
    /// Leave the veth pair out (loopback only).
    #[arg(long)]
    no_veth: bool,
    /// Shape the veth pair to this many Mbit/s each way (`tc tbf`), a link
    /// slower than the VMMs: then the link, not the two cores, is what a
    /// migration waits for.
    #[arg(long, value_name = "MBIT")]
    link_rate: Option<u64>,
    /// A short run: 256 MiB, one run per case, one rate, loopback.
    #[arg(long)]
    quick: bool,
    /// Write every sample and summary as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn err(msg: impl Into<String>) -> Box<dyn std::error::Error + Send + Sync> {
    msg.into().into()
}

/// One migration's figures.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    total_ms: f64,
    bytes_sent: u64,
    vmm_downtime_ms: f64,
    guest_downtime_ms: Option<f64>,
    /// memvisor only: the guest's clock gap that spans the stop (its host
    /// TSC is in migrate-status), ms.
    stop_gap_ms: Option<f64>,
    throughput_mb_s: f64,
}

/// A case's summaries.
#[derive(Debug, Clone, Serialize)]
struct CaseResult {
    vmm: &'static str,
    link: String,
    guest: String,
    samples: Vec<Sample>,
    /// Runs that failed, with the reason: a failed migration is a result
    /// (listed and counted), not the end of the bench.
    failures: Vec<String>,
    total_ms: Option<Summary>,
    bytes_per_ram: Option<Summary>,
    bytes_per_data: Option<Summary>,
    vmm_downtime_ms: Option<Summary>,
    guest_downtime_ms: Option<Summary>,
    stop_gap_ms: Option<Summary>,
    throughput_per_link: Option<Summary>,
}

/// Where the two sides run.
#[derive(Debug)]
struct Link {
    name: &'static str,
    /// Namespaces of source and destination (none: this one).
    ns: Option<[String; 2]>,
    /// The destination's address.
    dest_ip: String,
    /// Raw TCP throughput, MB/s.
    baseline_mb_s: f64,
}

/// The veth pair's namespaces, deleted on drop.
struct Veth([String; 2]);

impl Drop for Veth {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> BenchResult<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| err(format!("cannot run ip (install iproute2): {e}")))?;
    if out.status.success() { Ok(()) } else { Err(err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))) }
}

fn make_veth(rate_mbit: Option<u64>) -> BenchResult<(Veth, [String; 2])> {
    let tag = format!("{:x}", std::process::id() % 0xffff);
    let ns = [format!("mvbench-{tag}-a"), format!("mvbench-{tag}-b")];
    let dev = [format!("mvba{tag}"), format!("mvbb{tag}")];
    let guard = Veth(ns.clone());
    for n in &ns {
        ip(&["netns", "add", n])?;
    }
    ip(&["link", "add", &dev[0], "type", "veth", "peer", "name", &dev[1]])?;
    let addrs = ["10.77.0.1", "10.77.0.2"];
    for i in 0..2 {
        ip(&["link", "set", &dev[i], "netns", &ns[i]])?;
        ip(&["-n", &ns[i], "addr", "add", &format!("{}/24", addrs[i]), "dev", &dev[i]])?;
        ip(&["-n", &ns[i], "link", "set", &dev[i], "up"])?;
        ip(&["-n", &ns[i], "link", "set", "lo", "up"])?;
        if let Some(rate) = rate_mbit {
            // A token bucket (tc-tbf(8)): `rate` sustained, a 1 MiB burst,
            // packets waiting at most 100 ms.
            let out = Command::new("ip")
                .args(["netns", "exec", &ns[i], "tc", "qdisc", "add", "dev", &dev[i], "root", "tbf", "rate", &format!("{rate}mbit"), "burst", "1mb", "latency", "100ms"])
                .output()
                .map_err(|e| err(format!("cannot run tc (install iproute2): {e}")))?;
            if !out.status.success() {
                return Err(err(format!("tc tbf on {}: {}", dev[i], String::from_utf8_lossy(&out.stderr).trim())));
            }
        }
    }
    Ok((guard, [addrs[0].to_string(), addrs[1].to_string()]))
}

/// Moves the calling thread into network namespace `ns` (setns(2)).
fn enter_netns(ns: &str) -> BenchResult<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on a namespace file we hold open; it changes only this
    // thread's network namespace.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Raw TCP throughput from the source's side to `dest_ip`, MB/s: 1 GiB in
/// 1 MiB writes, the best of three.
fn link_baseline(ns: Option<&[String; 2]>, dest_ip: &str) -> BenchResult<f64> {
    const BYTES: usize = 1 << 30;
    let mut best = 0f64;
    for _ in 0..3 {
        let (tx, rx) = channel::<u16>();
        let ns_b = ns.map(|n| n[1].clone());
        let ip_b = dest_ip.to_string();
        let sink = std::thread::spawn(move || -> BenchResult<()> {
            if let Some(n) = &ns_b {
                enter_netns(n)?;
            }
            let l = std::net::TcpListener::bind((ip_b.as_str(), 0))?;
            tx.send(l.local_addr()?.port())?;
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            while s.read(&mut buf)? > 0 {}
            Ok(())
        });
        let port = rx.recv_timeout(Duration::from_secs(10))?;
        let ns_a = ns.map(|n| n[0].clone());
        let ip_b = dest_ip.to_string();
        let secs = std::thread::spawn(move || -> BenchResult<f64> {
            if let Some(n) = &ns_a {
                enter_netns(n)?;
            }
            let mut s = std::net::TcpStream::connect((ip_b.as_str(), port))?;
            let buf = vec![0x5au8; 1 << 20];
            let t = Instant::now();
            for _ in 0..BYTES >> 20 {
                s.write_all(&buf)?;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut one = [0u8; 1];
            let _ = s.read(&mut one);
            Ok(t.elapsed().as_secs_f64())
        })
        .join()
        .map_err(|_| err("the link probe panicked"))??;
        sink.join().map_err(|_| err("the link sink panicked"))??;
        best = best.max(BYTES as f64 / secs / 1e6);
    }
    Ok(best)
}

/// A command, inside namespace `ns` when given.
fn command(ns: Option<&str>, program: &Path, args: &[String]) -> Command {
    match ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n]).arg(program).args(args);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }
}

/// Lines a child writes to one of its pipes, as they come.
fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns it and every line seen.
fn wait_line(rx: &Receiver<String>, needle: &str, within: Duration, seen: &mut Vec<String>) -> BenchResult<String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).map_err(|_| err(format!("never saw {needle:?}; last lines: {:?}", &seen[seen.len().saturating_sub(5)..])))?;
        seen.push(line.clone());
        if line.contains(needle) {
            return Ok(line);
        }
    }
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The longest guest clock gap that began between `t0` and `t1` (host
/// TSC), ms; gaps are (ns, start TSC).
fn window_gap(gaps: &[(u64, u64)], t0: u64, t1: u64) -> Option<f64> {
    gaps.iter().filter(|g| g.1 >= t0 && g.1 <= t1).map(|g| g.0 as f64 / 1e6).fold(None, |m, g| Some(m.map_or(g, |m: f64| m.max(g))))
}

/// The guest case: its name and ticker workload.
fn ticker(pages: u64, rate: u64, secs: u64) -> String {
    format!("ticker:secs={secs},mibs={rate},pages={pages},fill=1")
}

/// How long the ticker runs: boot, 1 s before the migration, the
/// migration, and a margin.
const TICKER_SECS: u64 = 8;
/// When the migration starts after the workload did.
const SETTLE: Duration = Duration::from_secs(1);

#[allow(clippy::too_many_arguments)]
fn memvisor_once(vmm: &Path, link: &Link, mem: u64, workload: &str, max_downtime_ms: u64, port: u16, dir: &Path, tsc_khz: u64) -> BenchResult<Sample> {
    let to = format!("tcp:{}:{port}", link.dest_ip);
    let ns = |i: usize| link.ns.as_ref().map(|n| n[i].clone());
    let m = mem.to_string();
    let mut dst = command(ns(1).as_deref(), vmm, &["run".into(), "--json".into(), "--mem".into(), m.clone(), "--incoming".into(), to.clone()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let dst_err = lines(dst.stderr.take().ok_or_else(|| err("no stderr"))?);
    let mut seen = Vec::new();
    wait_line(&dst_err, "waiting for a migration", Duration::from_secs(30), &mut seen)?;
    let socket = dir.join("src.sock");
    let args: Vec<String> = ["run", "--json", "--mem", &m, "--workload", workload, "--api-socket"].iter().map(|s| s.to_string()).chain([socket.to_string_lossy().into_owned()]).collect();
    let mut src = command(ns(0).as_deref(), vmm, &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let src_err = lines(src.stderr.take().ok_or_else(|| err("no stderr"))?);
    if let Err(e) = wait_line(&src_err, "guest: workload starting", Duration::from_secs(120), &mut seen) {
        kill(src);
        kill(dst);
        return Err(e);
    }
    std::thread::sleep(SETTLE);
    let t0 = rdtsc();
    let out = Command::new(vmm).args(["ctl"]).arg(&socket).args(["migrate", &to, "--max-downtime-ms", &max_downtime_ms.to_string()]).output()?;
    let t1 = rdtsc();
    let answer: Value = serde_json::from_slice(&out.stdout).map_err(|e| err(format!("migrate answered {:?}: {e}", String::from_utf8_lossy(&out.stderr))))?;
    let _ = src.wait();
    let mut report = String::new();
    dst.stdout.take().ok_or_else(|| err("no stdout"))?.read_to_string(&mut report)?;
    let _ = dst.wait();
    let d = &answer["data"];
    if d["phase"] != "completed" {
        return Err(err(format!("migration failed: {answer}")));
    }
    let r: Value = serde_json::from_str(report.lines().last().unwrap_or("{}"))?;
    let gaps: Vec<(u64, u64)> = r["workload_events"].as_array().into_iter().flatten().filter(|e| e["event"] == "ClockGap").filter_map(|e| Some((e["a"].as_u64()?, e["b"].as_u64()?))).collect();
    let r0 = &d["rounds"][0];
    Ok(Sample {
        total_ms: d["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        bytes_sent: d["bytes_sent"].as_u64().unwrap_or(0),
        vmm_downtime_ms: d["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        guest_downtime_ms: window_gap(&gaps, t0, t1),
        stop_gap_ms: d["stop_tsc"].as_u64().and_then(|st| gaps.iter().filter(|g| g.1 <= st && st <= g.1 + g.0 * tsc_khz / 1_000_000).map(|g| g.0 as f64 / 1e6).next()),
        throughput_mb_s: r0["sent_bytes"].as_f64().unwrap_or(0.0) / r0["send_secs"].as_f64().unwrap_or(f64::NAN) / 1e6,
    })
}

/// A QMP connection.
struct Qmp {
    r: BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> BenchResult<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut q = Qmp { r: BufReader::new(s.try_clone()?), w: s };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.call("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Runs a command; returns its "return" (events before it are skipped).
    fn call(&mut self, cmd: &str, args: Value) -> BenchResult<Value> {
        writeln!(self.w, "{}", json!({ "execute": cmd, "arguments": args }))?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(err("QMP closed"));
            }
            let v: Value = serde_json::from_str(&line)?;
            if let Some(e) = v.get("error") {
                return Err(err(format!("QMP {cmd}: {e}")));
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }
}

fn qemu_args(mem: u64, guest: &Path, bootcfg: &Path, qmp: &Path, incoming: Option<&str>) -> Vec<String> {
    let mut a: Vec<String> = [
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["-m".into(), format!("{}M", mem >> 20), "-kernel".into(), guest.to_string_lossy().into_owned()]);
    a.extend(["-device".into(), format!("loader,file={},addr=0x8000,force-raw=on", bootcfg.display())]);
    a.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())]);
    if let Some(i) = incoming {
        a.extend(["-incoming".into(), i.to_string()]);
    }
    a
}

#[allow(clippy::too_many_arguments)]
fn qemu_once(qemu: &Path, link: &Link, mem: u64, guest: &Path, bootcfg: &Path, max_downtime_ms: u64, port: u16, dir: &Path) -> BenchResult<Sample> {
    let to = format!("tcp:{}:{port}", link.dest_ip);
    let ns = |i: usize| link.ns.as_ref().map(|n| n[i].clone());
    let (sq, dq) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    // QEMU's own messages, for the error when a run fails.
    let (se, de) = (dir.join("src.stderr"), dir.join("dst.stderr"));
    let mut dst = command(ns(1).as_deref(), qemu, &qemu_args(mem, guest, bootcfg, &dq, Some(&to))).stdout(Stdio::piped()).stderr(std::fs::File::create(&de)?).spawn()?;
    let dst_out = lines(dst.stdout.take().ok_or_else(|| err("no stdout"))?);
    let mut src = command(ns(0).as_deref(), qemu, &qemu_args(mem, guest, bootcfg, &sq, None)).stdout(Stdio::piped()).stderr(std::fs::File::create(&se)?).spawn()?;
    let src_out = lines(src.stdout.take().ok_or_else(|| err("no stdout"))?);
    let mut seen = Vec::new();
    let result = (|| -> BenchResult<Sample> {
        wait_line(&src_out, "guest: workload starting", Duration::from_secs(120), &mut seen)?;
        let _dq = Qmp::connect(&dq).map_err(|e| err(format!("the destination's QMP: {e}")))?;
        let mut q = Qmp::connect(&sq).map_err(|e| err(format!("the source's QMP: {e}")))?;
        q.call("migrate-set-parameters", json!({ "max-bandwidth": 100u64 << 30, "downtime-limit": max_downtime_ms }))?;
        std::thread::sleep(SETTLE);
        let t0 = rdtsc();
        q.call("migrate", json!({ "uri": to }))?;
        let info = loop {
            let i = q.call("query-migrate", json!({}))?;
            match i["status"].as_str() {
                Some("completed") => break i,
                Some("failed") | Some("cancelled") => return Err(err(format!("QEMU migration failed: {i}"))),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let t1 = rdtsc();
        let _ = q.call("quit", json!({}));
        let mut gaps = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(TICKER_SECS + 30);
        while let Ok(line) = dst_out.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            // "guest: clock gap N ns at tsc 0xX"
            if let Some(rest) = line.strip_prefix("guest: clock gap ") {
                let mut w = rest.split_whitespace();
                let ns = w.next().and_then(|n| n.parse::<u64>().ok());
                let at = w.nth(3).and_then(|t| u64::from_str_radix(t.trim_start_matches("0x"), 16).ok());
                if let (Some(ns), Some(at)) = (ns, at) {
                    gaps.push((ns, at));
                }
            }
            if line.contains("self-test RAM task") {
                break;
            }
        }
        let ram = &info["ram"];
        let mbps = ram["mbps"].as_f64().unwrap_or(f64::NAN);
        Ok(Sample {
            total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
            bytes_sent: ram["transferred"].as_u64().unwrap_or(0),
            vmm_downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
            guest_downtime_ms: window_gap(&gaps, t0, t1),
            stop_gap_ms: None,
            throughput_mb_s: mbps / 8.0,
        })
    })();
    kill(src);
    kill(dst);
    result.map_err(|e| {
        let tail = |p: &Path| std::fs::read_to_string(p).unwrap_or_default().lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        err(format!("QEMU: {e} (source stderr: {:?}; destination stderr: {:?})", tail(&se), tail(&de)))
    })
}

/// The TSC's frequency, kHz (`KVM_GET_TSC_KHZ` of a throwaway vCPU).
fn tsc_khz() -> BenchResult<u64> {
    let kvm = memvisor::vm::open_kvm()?;
    let vm = kvm.create_vm().map_err(|e| err(format!("KVM_CREATE_VM: {e}")))?;
    let vcpu = vm.create_vcpu(0).map_err(|e| err(format!("KVM_CREATE_VCPU: {e}")))?;
    Ok(vcpu.get_tsc_khz().map_or(0, u64::from))
}

/// The boot configuration QEMU's guest reads at 0x8000: the same guest,
/// exiting (not idling) when its ticker ends.
fn write_bootcfg(path: &Path, mem: u64, workload: &str, tsc_khz: u64) -> BenchResult<()> {
    let config = memvisor::config::VmConfig { mem_size: mem, workload: Some(workload.parse().map_err(|e: memvisor::workload::WorkloadError| err(e.to_string()))?), ..Default::default() };
    let cfg = memvisor::vmm::boot_config(&config, memvisor::host::detect(), false, false, tsc_khz);
    std::fs::write(path, cfg.as_bytes())?;
    Ok(())
}

/// Runs the benchmark.
///
/// # Errors
/// Set-up failures (no `ip`, a guest that does not start); a failed
/// migration fails the run.
pub fn run(args: &MigrateArgs) -> BenchResult<u32> {
    let mem = memvisor::size::parse_size(if args.quick { "256M" } else { &args.mem }).map_err(|e| err(e.to_string()))?;
    let runs = if args.quick { 1 } else { args.runs.max(1) };
    let mut rates: Vec<u64> = vec![0];
    for r in args.rates.split(',').filter(|s| !s.is_empty()) {
        rates.push(r.trim().parse().map_err(|_| err(format!("bad rate {r:?}")))?);
    }
    if args.quick {
        rates.truncate(2);
    }
    let pages = (mem / 2 / 4096).min(1 << 18);
    let tsc_khz = tsc_khz()?;
    let vmm = crate::vmm_binary()?;
    let dir = std::env::temp_dir().join(format!("memvisor-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = dir.join("guest.elf");
    std::fs::write(&guest, memvisor::boot::TINY_GUEST)?;
    let qemu = if args.no_qemu { None } else { crate::qemu::find() };
    if !args.no_qemu && qemu.is_none() {
        eprintln!("vmm bench migrate: qemu-system-x86_64 not found; memvisor only (apt-get install qemu-system-x86)");
    }
    let mut links = vec![Link { name: "loopback", ns: None, dest_ip: "127.0.0.1".into(), baseline_mb_s: 0.0 }];
    let _veth = if args.quick || args.no_veth {
        None
    } else {
        let (guard, ips) = make_veth(args.link_rate)?;
        links.push(Link { name: "veth", ns: Some(guard.0.clone()), dest_ip: ips[1].clone(), baseline_mb_s: 0.0 });
        Some(guard)
    };
    for l in &mut links {
        l.baseline_mb_s = link_baseline(l.ns.as_ref(), &l.dest_ip)?;
        eprintln!("link {}: raw TCP {:.0} MB/s", l.name, l.baseline_mb_s);
    }
    let mut results = Vec::new();
    let mut port = 47000u16;
    for link in &links {
        for &rate in &rates {
            let workload = ticker(pages, rate, TICKER_SECS);
            let guest_name = if rate == 0 { format!("idle, {} MiB of data", pages >> 8) } else { format!("{rate} MiB/s dirty over {} MiB", pages >> 8) };
            let bootcfg = dir.join(format!("bootcfg-{rate}.bin"));
            write_bootcfg(&bootcfg, mem, &workload, tsc_khz)?;
            let mut vmms: Vec<&'static str> = vec!["memvisor"];
            if qemu.is_some() {
                vmms.push("qemu 7.2");
            }
            // Interleaved, so both see the same load.
            let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); vmms.len()];
            let mut failures: Vec<Vec<String>> = vec![Vec::new(); vmms.len()];
            for run in 0..runs {
                for (i, &which) in vmms.iter().enumerate() {
                    port += 1;
                    let case_dir = dir.join(format!("{}-{rate}-{run}-{i}", link.name));
                    std::fs::create_dir_all(&case_dir)?;
                    let once = match (which, &qemu) {
                        ("memvisor", _) => memvisor_once(&vmm, link, mem, &workload, args.max_downtime_ms, port, &case_dir, tsc_khz),
                        (_, Some(q)) => qemu_once(q, link, mem, &guest, &bootcfg, args.max_downtime_ms, port, &case_dir),
                        _ => continue,
                    };
                    let s = match once {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("{} {which} {guest_name} run {run}: FAILED: {e}", link.name);
                            failures[i].push(e.to_string());
                            continue;
                        }
                    };
                    eprintln!(
                        "{} {} {guest_name} run {run}: {:.0} ms total, {:.1} MiB sent, {:.0} MB/s, downtime {:.2} ms (guest saw {})",
                        link.name,
                        which,
                        s.total_ms,
                        s.bytes_sent as f64 / (1 << 20) as f64,
                        s.throughput_mb_s,
                        s.vmm_downtime_ms,
                        s.guest_downtime_ms.map_or("-".into(), |g| format!("{g:.2} ms"))
                    );
                    samples[i].push(s);
                }
            }
            for (i, which) in vmms.iter().enumerate() {
                let s = &samples[i];
                let f = |g: &dyn Fn(&Sample) -> Option<f64>| summarize(&s.iter().filter_map(g).collect::<Vec<_>>());
                results.push(CaseResult {
                    vmm: which,
                    link: format!("{} ({:.0} MB/s raw TCP)", link.name, link.baseline_mb_s),
                    guest: guest_name.clone(),
                    total_ms: f(&|x| Some(x.total_ms)),
                    bytes_per_ram: f(&|x| Some(x.bytes_sent as f64 / mem as f64)),
                    bytes_per_data: f(&|x| Some(x.bytes_sent as f64 / (pages * 4096) as f64)),
                    vmm_downtime_ms: f(&|x| Some(x.vmm_downtime_ms)),
                    guest_downtime_ms: f(&|x| x.guest_downtime_ms),
                    stop_gap_ms: f(&|x| x.stop_gap_ms),
                    throughput_per_link: f(&|x| Some(x.throughput_mb_s / link.baseline_mb_s)),
                    samples: s.clone(),
                    failures: failures[i].clone(),
                });
            }
        }
    }
    print_table(&results, mem);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&json!({ "mem": mem, "runs": runs, "max_downtime_ms": args.max_downtime_ms, "cases": results }))?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    // memvisor's own failures fail the bench; QEMU's are listed.
    Ok(u32::from(results.iter().any(|r| r.vmm == "memvisor" && !r.failures.is_empty())))
}

fn cell(s: &Option<Summary>, digits: usize) -> String {
    s.as_ref().map_or("-".into(), |s| format!("{:.d$} / {:.d$} / {:.d$}", s.min, s.median, s.max, d = digits))
}

fn print_table(results: &[CaseResult], mem: u64) {
    println!("\nmigration of a {} MiB guest: min / median / max", mem >> 20);
    println!("| VMM | link | guest | failed runs | total ms | bytes ÷ RAM | bytes ÷ data | first-round throughput ÷ link | downtime ms (VMM) | longest guest clock gap during the migration, ms | guest clock gap at the stop, ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {} | {} | {} of {} | {} | {} | {} | {} | {} | {} | {} |",
            r.vmm,
            r.link,
            r.guest,
            r.failures.len(),
            r.failures.len() + r.samples.len(),
            cell(&r.total_ms, 0),
            cell(&r.bytes_per_ram, 3),
            cell(&r.bytes_per_data, 3),
            cell(&r.throughput_per_link, 2),
            cell(&r.vmm_downtime_ms, 2),
            cell(&r.guest_downtime_ms, 2),
            cell(&r.stop_gap_ms, 2)
        );
    }
}
