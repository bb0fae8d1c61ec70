//! The `vmm` command: `vmm run`, `vmm ctl`, `vmm translate`, `vmm restore`,
//! `vmm bench`.
//!
//! Parses flags into the shared config shape, runs, prints the report, and
//! maps the outcome to an exit status: the guest's own status after a run,
//! 1 with a one-line message for any error (the chain joined by ": ").

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use memvisor::api::{self, protocol::Request};
use memvisor::config::{Backing, ConfigFile, GuestPage, NodesValue, NumaPolicy, SizeValue};
use memvisor::control::VmControl;
use memvisor::snapshot::format::SnapshotKind;
use memvisor::vmm::{self, RestoreMode, RunOptions};
use memvisor::{run_report, timeline};

#[derive(Debug, Parser)]
#[command(name = "vmm", version, about = "memvisor: a small KVM hypervisor whose subject is memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// `defer`: each subcommand's flags are built only when it is the one
// invoked. Building every subcommand's definitions (the benches have many)
// took ~0.25 ms of a lazy restore's ~3 ms, mostly first-touch page faults in
// clap's code; deferred, parsing `vmm restore ...` takes ~0.1 ms.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum Command {
    /// Boot a guest (the built-in tiny guest by default) and report on memory.
    Run(Box<RunArgs>),
    /// Send a command to a running VM's control socket.
    Ctl {
        /// The control socket (`vmm run --api-socket PATH`).
        socket: PathBuf,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Explain how guest-virtual addresses of a running or paused VM
    /// translate, level by level, down to host-physical frames; or list every
    /// mapping (`--map`). Talks to the VM's control socket.
    Translate {
        /// The control socket (`vmm run --api-socket PATH`).
        socket: PathBuf,
        #[command(flatten)]
        args: TranslateArgs,
    },
    /// Start a VM from a snapshot (and the chain of snapshots it diffs against).
    Restore {
        /// The snapshot directory.
        dir: PathBuf,
        /// How guest memory is loaded.
        #[arg(long, default_value = "copy", value_parser = clap::builder::PossibleValuesParser::new(["copy", "lazy"]))]
        restore_mode: String,
        /// Serve a control socket here.
        #[arg(long, value_name = "PATH")]
        api_socket: Option<PathBuf>,
        /// Check that the snapshot has this much guest memory.
        #[arg(long, value_name = "SIZE")]
        mem: Option<String>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run a benchmark.
    Bench {
        #[command(subcommand)]
        bench: memvisor::bench::BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Print the VM's state.
    Status,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// End the VM.
    Shutdown,
    /// Switch dirty logging on or off, for one memslot (`--slot N`) or all.
    DirtyLog {
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// The memslot (RAM region index); default: every slot.
        #[arg(long)]
        slot: Option<u32>,
    },
    /// The balloon: `set SIZE`, `get`, `stats`.
    Balloon {
        #[command(subcommand)]
        command: BalloonCommand,
    },
    /// Print the swap device's counters and how many slots hold data now.
    Swap,
    /// Take a snapshot: `--full DIR` or `--diff DIR`.
    Snapshot {
        /// Save all guest memory.
        #[arg(long, value_name = "DIR", conflicts_with = "diff", required_unless_present = "diff")]
        full: Option<PathBuf>,
        /// Save only pages dirtied since the previous snapshot.
        #[arg(long, value_name = "DIR")]
        diff: Option<PathBuf>,
    },
    /// Explain how a guest-virtual address translates, level by level, down
    /// to the host-physical frame; or list every mapping (`--map`). The same
    /// as `vmm translate SOCKET ...`.
    Translate(TranslateArgs),
}

/// What `vmm translate` (and `vmm ctl SOCKET translate`) asks for.
#[derive(Debug, Args)]
struct TranslateArgs {
    /// Guest-virtual addresses, comma-separated (hexadecimal, e.g.
    /// 0xffff800000200000,0x108abc).
    #[arg(value_name = "GVA[,GVA...]", required_unless_present = "map", conflicts_with = "map")]
    gva: Option<String>,
    /// List all of the guest's mappings as merged ranges, like /proc/PID/maps.
    #[arg(long)]
    map: bool,
    /// Print the answer as JSON: one response object per line, one line per
    /// address.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum BalloonCommand {
    /// Set the balloon's target (how much memory the guest should give back).
    Set {
        /// A size (512M, 1G, 0).
        size: String,
    },
    /// Print the balloon's target, size, reclaimed and pending bytes and metrics.
    Get,
    /// Ask the guest for fresh memory statistics and print them.
    Stats,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Guest memory size (256M, 1G, 1073741824). Default 256M.
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// Number of vCPUs (1; SMP is not implemented yet).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Host backing of guest RAM.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Backing::ALL.iter().map(|b| b.as_str())))]
    backing: Option<String>,
    /// Populate guest RAM before boot (MADV_POPULATE_WRITE).
    #[arg(long)]
    prefault: bool,
    /// Lock guest RAM in host memory (mlock).
    #[arg(long)]
    mlock: bool,
    /// NUMA policy for guest RAM.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(NumaPolicy::ALL.iter().map(|b| b.as_str())))]
    numa_policy: Option<String>,
    /// NUMA nodes for the policy (0, 0-1, 0,2).
    #[arg(long, value_name = "LIST")]
    numa_nodes: Option<String>,
    /// Leaf size the guest maps its RAM with.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(GuestPage::ALL.iter().map(|b| b.as_str())))]
    guest_page: Option<String>,
    /// Kernel image: an x86-64 ELF with a PVH entry, a bzImage or a vmlinux
    /// (Linux's 64-bit boot protocol); default: the built-in tiny guest.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for a bzImage or vmlinux kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// TOML config file with the same fields; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve a control socket here; the VM then stays up until `vmm ctl PATH shutdown`.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// A workload after the self-test: dirty:pages=N,rounds=R,seed=S or
    /// checksum:pages=N,rounds=R,ms=T; guest paging (docs/guest-paging.md):
    /// paging:policy=fifo|clock|lru,frames=N,pattern=seq|random|hotcold or cow:pages=N.
    #[arg(long, value_name = "SPEC")]
    workload: Option<String>,
    /// Write the dirty workload's per-round harvest report (JSON) here.
    #[arg(long, value_name = "FILE")]
    dirty_report: Option<PathBuf>,
    /// Force a dirty-tracking mechanism (default: the best the kernel offers).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["ring", "clear", "bitmap"]))]
    dirty_mode: Option<String>,
    /// Add a virtio balloon with this initial target (0 for an empty one);
    /// change it later with `vmm ctl PATH balloon set SIZE`.
    #[arg(long, value_name = "SIZE")]
    balloon: Option<String>,
    /// Explain these guest-virtual addresses (hex, comma-separated) when the
    /// guest is ready, like `vmm ctl SOCKET translate`.
    #[arg(long, value_name = "GVA[,GVA...]")]
    translate: Option<String>,
    /// Print the report as one JSON object (the guest console goes to stderr).
    #[arg(long)]
    json: bool,
    /// Skip the guest's self-test (used by boot benchmarks).
    #[arg(long, hide = true)]
    skip_selftest: bool,
}

impl RunArgs {
    fn flags_as_config(&self) -> anyhow_free::Result<ConfigFile> {
        fn parse<T: std::str::FromStr<Err = String>>(v: &Option<String>) -> Result<Option<T>, String> {
            v.as_deref().map(str::parse).transpose()
        }
        Ok(ConfigFile {
            mem: self.mem.clone().map(SizeValue::Text),
            vcpus: self.vcpus,
            backing: parse(&self.backing)?,
            prefault: self.prefault.then_some(true),
            mlock: self.mlock.then_some(true),
            numa_policy: parse(&self.numa_policy)?,
            numa_nodes: self.numa_nodes.clone().map(NodesValue::Text),
            guest_page: parse(&self.guest_page)?,
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            initrd: self.initrd.clone(),
            api_socket: self.api_socket.clone(),
            dirty_mode: parse(&self.dirty_mode)?,
            workload: self.workload.clone(),
            balloon: self.balloon.clone().map(SizeValue::Text),
        })
    }
}

/// Errors are reported as one line: the error and its sources.
mod anyhow_free {
    pub type Result<T> = std::result::Result<T, String>;

    pub fn chain(e: &dyn std::error::Error) -> String {
        memvisor::error_chain(e)
    }
}

fn run(args: RunArgs) -> anyhow_free::Result<u32> {
    let file = match &args.config {
        Some(p) => ConfigFile::load(p).map_err(|e| anyhow_free::chain(&e))?,
        None => ConfigFile::default(),
    };
    let config = file.merged_with(args.flags_as_config()?).into_vm_config().map_err(|e| anyhow_free::chain(&e))?;
    if args.dirty_report.is_some() && !memvisor::workload::is_dirty(config.workload.as_deref()) {
        return Err("--dirty-report needs a dirty workload (--workload dirty:...)".into());
    }
    timeline::mark("config");
    let control = config.api_socket.as_ref().map(|_| Arc::new(VmControl::default()));
    let _server = match (&config.api_socket, &control) {
        (Some(path), Some(c)) => Some(api::server::spawn(path, Arc::clone(c)).map_err(|e| anyhow_free::chain(&e))?),
        _ => None,
    };
    let translate = args.translate.as_deref().map(memvisor::translate::parse_gva_list).transpose()?.unwrap_or_default();
    let console: Box<dyn std::io::Write + Send> = if args.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let outcome = vmm::run(&config, RunOptions { console, control, skip_selftest: args.skip_selftest, translate }).map_err(|e| anyhow_free::chain(&e))?;
    if let Some(path) = &args.dirty_report {
        let report = outcome.dirty.as_ref().ok_or("--dirty-report needs a dirty workload (--workload dirty:...)")?;
        let text = serde_json::to_vec_pretty(report).map_err(|e| e.to_string())?;
        memvisor::fsutil::write_atomic(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if args.json {
        let mut report = run_report::to_json(&outcome);
        if args.translate.is_some() {
            report["translations"] = serde_json::to_value(&outcome.translations).map_err(|e| e.to_string())?;
        }
        println!("{report}");
    } else {
        print!("{}", run_report::to_text(&outcome));
        print!("{}", memvisor::translate::ready::to_text(&outcome.translations));
    }
    let failed = outcome.translations.iter().filter(|t| t.error.is_some()).count();
    if failed > 0 {
        return Err(format!("{failed} of {} translations failed (see above)", outcome.translations.len()));
    }
    Ok(outcome.exit_status)
}

fn restore(dir: PathBuf, mode: &str, api_socket: Option<PathBuf>, mem: Option<String>, json: bool) -> anyhow_free::Result<u32> {
    let mode: RestoreMode = mode.parse()?;
    let expected_mem = mem.map(|m| memvisor::config::parse_size(&m)).transpose().map_err(|e| anyhow_free::chain(&e))?;
    let control = api_socket.as_ref().map(|_| Arc::new(VmControl::default()));
    let _server = match (&api_socket, &control) {
        (Some(path), Some(c)) => Some(api::server::spawn(path, Arc::clone(c)).map_err(|e| anyhow_free::chain(&e))?),
        _ => None,
    };
    let console: Box<dyn std::io::Write + Send> = if json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let options = vmm::RestoreOptions { mode, api_socket, expected_mem };
    let outcome = vmm::restore(&dir, &options, RunOptions { console, control, skip_selftest: false, translate: Vec::new() }).map_err(|e| anyhow_free::chain(&e))?;
    if json {
        println!("{}", run_report::to_json(&outcome));
    } else {
        print!("{}", run_report::to_text(&outcome));
    }
    Ok(outcome.exit_status)
}

fn ctl(socket: PathBuf, command: CtlCommand) -> anyhow_free::Result<u32> {
    let request = match command {
        CtlCommand::Status => Request::Status,
        CtlCommand::Pause => Request::Pause,
        CtlCommand::Resume => Request::Resume,
        CtlCommand::Shutdown => Request::Shutdown,
        CtlCommand::Swap => Request::Swap,
        CtlCommand::DirtyLog { state, slot } => Request::DirtyLog { on: state == "on", slot },
        CtlCommand::Balloon { command } => match command {
            BalloonCommand::Set { size } => Request::BalloonSet { bytes: memvisor::config::parse_size(&size).map_err(|e| anyhow_free::chain(&e))? },
            BalloonCommand::Get => Request::BalloonGet,
            BalloonCommand::Stats => Request::BalloonStats,
        },
        CtlCommand::Snapshot { full, diff } => match (full, diff) {
            (Some(dir), _) => Request::Snapshot { kind: SnapshotKind::Full, dir },
            (None, Some(dir)) => Request::Snapshot { kind: SnapshotKind::Diff, dir },
            (None, None) => return Err("snapshot needs --full DIR or --diff DIR".into()),
        },
        CtlCommand::Translate(args) => return translate(&socket, &args),
    };
    let response = api::client::send(&socket, &request).map_err(|e| anyhow_free::chain(&e))?;
    println!("{}", serde_json::to_string(&response).map_err(|e| e.to_string())?);
    if response.ok { Ok(0) } else { Err(response.error.unwrap_or_else(|| "request failed".into())) }
}

/// `vmm translate SOCKET (GVA[,GVA...] | --map) [--json]`: one control
/// request per address (or one for the map), each answer printed as it
/// comes; fails when any address did not translate.
fn translate(socket: &std::path::Path, args: &TranslateArgs) -> anyhow_free::Result<u32> {
    let requests = if args.map {
        vec![Request::Translate { gva: None, map: true }]
    } else {
        let gvas = memvisor::translate::parse_gva_list(args.gva.as_deref().unwrap_or_default())?;
        if gvas.is_empty() {
            return Err("translate needs at least one guest-virtual address, or --map".into());
        }
        gvas.into_iter().map(|gva| Request::Translate { gva: Some(gva), map: false }).collect()
    };
    let total = requests.len();
    let mut errors = Vec::new();
    for request in &requests {
        let response = api::client::send(socket, request).map_err(|e| anyhow_free::chain(&e))?;
        if args.json {
            println!("{}", serde_json::to_string(&response).map_err(|e| e.to_string())?);
        } else if let Some(text) = response.data.as_ref().and_then(|d| d["text"].as_str()) {
            print!("{text}");
        }
        if !response.ok {
            let why = response.error.unwrap_or_else(|| "request failed".into());
            if total > 1 && !args.json {
                if let Request::Translate { gva: Some(gva), .. } = request {
                    println!("guest-virtual {gva:#018x}: error: {why}");
                }
            }
            errors.push(why);
        }
    }
    match errors.len() {
        0 => Ok(0),
        1 if total == 1 => Err(errors.remove(0)),
        n => Err(format!("{n} of {total} translations failed (see above)")),
    }
}

fn exit_code(status: u32) -> ExitCode {
    // Exit statuses are 8 bits; a nonzero guest status never maps to 0.
    let low = (status & 0xff) as u8;
    ExitCode::from(if status != 0 && low == 0 { 1 } else { low })
}

fn main() -> ExitCode {
    timeline::process_start_ns();
    timeline::mark("main");
    if std::env::args_os().nth(1).is_some_and(|a| a == "restore") {
        // The VM is created while the flags are parsed (memvisor::restore).
        memvisor::restore::start_early();
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).format_timestamp(None).init();
    timeline::mark("logger");
    let cli = Cli::parse();
    timeline::mark("parse flags");
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Ctl { socket, command } => ctl(socket, command),
        Command::Translate { socket, args } => translate(&socket, &args),
        Command::Restore { dir, restore_mode, api_socket, mem, json } => restore(dir, &restore_mode, api_socket, mem, json),
        Command::Bench { bench } => memvisor::bench::run(bench).map_err(|e| anyhow_free::chain(&*e)),
    };
    match result {
        Ok(status) => exit_code(status),
        Err(message) => {
            eprintln!("vmm: error: {message}");
            ExitCode::from(1)
        }
    }
}
