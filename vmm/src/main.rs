//! The `vmm` command: `vmm run`, `vmm ctl`, `vmm translate`, `vmm restore`,
//! `vmm bench`.
//!
//! Parses flags into the shared config shape, runs, prints the report, and
//! maps the outcome to an exit status: the guest's own status after a run,
//! 1 with a one-line message for any error (the chain joined by ": ").

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};

use memvisor::api::{self, protocol::Request};
use memvisor::config::{Backing, ConfigFile, DirtyMode, GuestPage, KernelDecompress, NodesValue, NumaPolicy, SizeValue};
use memvisor::restore::{KvmThread, RestoreMode, RestoreOptions};
use memvisor::seccomp::{SeccompMode, ThreadKind};
use memvisor::snapshot::format::SnapshotKind;
use memvisor::vmm::{self, MachineHandle, RunOptions};
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
        #[arg(long, default_value = "copy", value_parser = choices::<RestoreMode>(["copy", "lazy"]))]
        restore_mode: RestoreMode,
        /// Serve a control socket here (mode 0600; only this user may connect).
        #[arg(long, value_name = "PATH")]
        api_socket: Option<PathBuf>,
        /// Also let this user id use the control socket (repeatable).
        #[arg(long, value_name = "UID")]
        api_allow_uid: Vec<u32>,
        /// Check that the snapshot has this much guest memory.
        #[arg(long, value_name = "SIZE")]
        mem: Option<String>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        seccomp: SeccompArgs,
    },
    /// Run a benchmark (`vmm bench --help` lists them): runs the
    /// `vmm-bench` binary beside this one.
    #[command(disable_help_flag = true)]
    Bench {
        /// The benchmark and its flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
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
        #[arg(value_parser = choices::<OnOff>(["on", "off"]))]
        state: OnOff,
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
    /// Migrate the VM to a destination waiting in `vmm run --incoming ADDR`
    /// (docs/migration.md); answers when the guest runs there, and this VM
    /// then ends.
    Migrate {
        /// tcp:HOST:PORT or unix:PATH.
        to: String,
        /// The longest the guest may be stopped for the final copy.
        #[arg(long, value_name = "N", default_value_t = memvisor::migration::DEFAULT_MAX_DOWNTIME_MS)]
        max_downtime_ms: u64,
        /// Send at most this many MiB per second.
        #[arg(long, value_name = "MiB/s")]
        bandwidth: Option<u64>,
        /// When the guest may move before all its memory has: auto (when
        /// pre-copy does not converge), never (throttle it instead), after:N
        /// (after N pre-copy rounds).
        #[arg(long, value_name = "auto|never|after:N", default_value = "never")]
        postcopy: String,
        /// How long to wait for a silent destination before giving up.
        #[arg(long, value_name = "N", default_value_t = memvisor::migration::DEFAULT_LINK_TIMEOUT_MS)]
        link_timeout_ms: u64,
    },
    /// Print the progress of the migration under way, or of the last one
    /// (JSON: round, bytes sent, dirty rate, expected downtime, ...).
    MigrateStatus,
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
    #[arg(long, value_parser = choices::<Backing>(Backing::ALL.iter().map(|b| b.as_str())))]
    backing: Option<Backing>,
    /// Populate guest RAM before boot (MADV_POPULATE_WRITE).
    #[arg(long)]
    prefault: bool,
    /// Lock guest RAM in host memory (mlock).
    #[arg(long)]
    mlock: bool,
    /// NUMA policy for guest RAM.
    #[arg(long, value_parser = choices::<NumaPolicy>(NumaPolicy::ALL.iter().map(|b| b.as_str())))]
    numa_policy: Option<NumaPolicy>,
    /// NUMA nodes for the policy (0, 0-1, 0,2).
    #[arg(long, value_name = "LIST")]
    numa_nodes: Option<String>,
    /// Leaf size the guest maps its RAM with.
    #[arg(long, value_parser = choices::<GuestPage>(GuestPage::ALL.iter().map(|b| b.as_str())))]
    guest_page: Option<GuestPage>,
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
    /// Who decompresses a bzImage's kernel: the VMM before boot (default),
    /// or the guest's own decompressor at ring 0.
    #[arg(long, value_name = "WHO", value_parser = choices::<KernelDecompress>(KernelDecompress::ALL.iter().map(|b| b.as_str())))]
    kernel_decompress: Option<KernelDecompress>,
    /// TOML config file with the same fields; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve a control socket here; the VM then stays up until `vmm ctl PATH shutdown`.
    /// The socket has mode 0600 and only this user may connect.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Also let this user id use the control socket (repeatable).
    #[arg(long, value_name = "UID")]
    api_allow_uid: Vec<u32>,
    /// A workload after the self-test: dirty:pages=N,rounds=R,seed=S or
    /// checksum:pages=N,rounds=R,ms=T; guest paging (docs/guest-paging.md):
    /// paging:policy=fifo|clock|lru,frames=N,pattern=seq|random|hotcold or cow:pages=N.
    #[arg(long, value_name = "SPEC")]
    workload: Option<String>,
    /// Write the dirty workload's per-round harvest report (JSON) here.
    #[arg(long, value_name = "FILE")]
    dirty_report: Option<PathBuf>,
    /// Force a dirty-tracking mechanism (default: the best the kernel offers).
    #[arg(long, value_parser = choices::<DirtyMode>(DirtyMode::ALL.iter().map(|b| b.as_str())))]
    dirty_mode: Option<DirtyMode>,
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
    /// Boot nothing: wait for a migration on tcp:ADDR:PORT or unix:PATH and
    /// run the guest it brings (docs/migration.md). The guest's own settings
    /// come from the source; --mem must match it.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["workload", "kernel", "cmdline", "balloon", "translate", "dirty_report", "skip_selftest"])]
    incoming: Option<String>,
    /// With --incoming: how long to wait for a silent source once it has
    /// connected.
    #[arg(long, value_name = "N", default_value_t = memvisor::migration::DEFAULT_LINK_TIMEOUT_MS, requires = "incoming")]
    link_timeout_ms: u64,
    #[command(flatten)]
    seccomp: SeccompArgs,
}

/// The seccomp flags of `vmm run` and `vmm restore`.
#[derive(Debug, Args)]
struct SeccompArgs {
    /// What the threads' seccomp filters do with a system call outside
    /// their lists: kill the process (SIGSYS), log it (dmesg), or no
    /// filters. Default kill (or $MEMVISOR_SECCOMP).
    #[arg(long, value_name = "MODE", value_parser = choices::<SeccompMode>(SeccompMode::ALL.iter().map(|m| m.as_str())))]
    seccomp: Option<SeccompMode>,
    /// Make each thread of this kind (vmm, vcpu, device) call execve once
    /// its filter is installed (tests).
    #[arg(long, hide = true, value_name = "KIND", value_parser = choices::<ThreadKind>(["vmm", "vcpu", "device"]))]
    seccomp_probe: Option<ThreadKind>,
}

impl SeccompArgs {
    /// Sets the process's seccomp mode: the flag, else `file` (the config
    /// file's), else `$MEMVISOR_SECCOMP`, else kill. Before any thread that
    /// installs a filter starts.
    fn configure(&self, file: Option<SeccompMode>) -> anyhow_free::Result<()> {
        let env = match std::env::var("MEMVISOR_SECCOMP") {
            Ok(v) => Some(v.parse::<SeccompMode>().map_err(|e| format!("MEMVISOR_SECCOMP: {e}"))?),
            Err(_) => None,
        };
        let mode = self.seccomp.or(file).or(env).unwrap_or_default();
        memvisor::seccomp::configure(mode, self.seccomp_probe).map_err(|e| anyhow_free::chain(&e))
    }
}

impl RunArgs {
    /// The flags as the config-file shape, every text value parsed here, at
    /// the edge (an invalid one is the run's one-line error).
    fn flags_as_config(&self) -> anyhow_free::Result<ConfigFile> {
        let size = |v: &Option<String>| v.as_deref().map(memvisor::size::parse_size).transpose().map_err(|e| anyhow_free::chain(&e));
        Ok(ConfigFile {
            mem: size(&self.mem)?.map(SizeValue::Bytes),
            vcpus: self.vcpus,
            backing: self.backing,
            prefault: self.prefault.then_some(true),
            mlock: self.mlock.then_some(true),
            numa_policy: self.numa_policy,
            numa_nodes: self.numa_nodes.as_deref().map(memvisor::config::parse_node_list).transpose().map_err(|e| anyhow_free::chain(&e))?.map(NodesValue::List),
            guest_page: self.guest_page,
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            initrd: self.initrd.clone(),
            kernel_decompress: self.kernel_decompress,
            api_socket: self.api_socket.clone(),
            dirty_mode: self.dirty_mode,
            workload: self.workload.as_deref().map(str::parse).transpose().map_err(|e| anyhow_free::chain(&e))?,
            balloon: size(&self.balloon)?.map(SizeValue::Bytes),
            seccomp: self.seccomp.seccomp,
        })
    }
}

/// A flag's closed set of choices: clap lists and checks the names (a
/// wrong one is its usage error), then the value is typed.
fn choices<T>(names: impl IntoIterator<Item = &'static str>) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr<Err = String> + Clone + Send + Sync + 'static,
{
    clap::builder::PossibleValuesParser::new(names).try_map(|s| s.parse::<T>())
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OnOff(bool);

impl std::str::FromStr for OnOff {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(OnOff(true)),
            "off" => Ok(OnOff(false)),
            _ => Err(format!("invalid value {s:?}; expected on or off")),
        }
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
    let merged = file.merged_with(args.flags_as_config()?);
    args.seccomp.configure(merged.seccomp)?;
    let config = merged.into_vm_config().map_err(|e| anyhow_free::chain(&e))?;
    if args.dirty_report.is_some() && !matches!(config.workload, Some(memvisor::workload::Workload::Dirty(_))) {
        return Err("--dirty-report needs a dirty workload (--workload dirty:...)".into());
    }
    timeline::mark("config");
    let handle = MachineHandle::new();
    memvisor::signals::watch(Arc::clone(&handle));
    let access = api::server::Access::owner_and(&args.api_allow_uid);
    if let Some(addr) = &args.incoming {
        return incoming(addr, &config, &args, handle, access);
    }
    let _server = config.api_socket.as_ref().map(|path| api::server::spawn(path, Arc::clone(&handle), access)).transpose().map_err(|e| anyhow_free::chain(&e))?;
    let translate = args.translate.as_deref().map(memvisor::translate::parse_gva_list).transpose()?.unwrap_or_default();
    let console: Box<dyn std::io::Write + Send> = if args.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let options = RunOptions { console, handle: Arc::clone(&handle), stay_up: config.api_socket.is_some(), skip_selftest: args.skip_selftest, translate };
    let outcome = vmm::run(&config, options).map_err(|e| anyhow_free::chain(&e))?;
    let signalled = handle.terminated_by();
    if let Some(s) = handle.migration_status().filter(|s| s["phase"] == "completed") {
        eprintln!("vmm: migrated to {}; the guest runs there now", s["to"].as_str().unwrap_or("?"));
    }
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
    if let Some(signal) = signalled {
        return Ok(memvisor::signals::exit_status(signal));
    }
    let failed = outcome.translations.iter().filter(|t| t.error.is_some()).count();
    if failed > 0 {
        return Err(format!("{failed} of {} translations failed (see above)", outcome.translations.len()));
    }
    Ok(outcome.exit_status)
}

/// `vmm run --incoming ADDR`: waits for a source, then runs the guest it
/// sends and reports as `vmm run` does.
fn incoming(addr: &str, config: &memvisor::config::VmConfig, args: &RunArgs, handle: Arc<MachineHandle>, access: api::server::Access) -> anyhow_free::Result<u32> {
    use memvisor::migration::destination;
    let address: memvisor::migration::Address = addr.parse()?;
    let listener = destination::listen(&address).map_err(|e| anyhow_free::chain(&e))?;
    let _server = config.api_socket.as_ref().map(|path| api::server::spawn(path, Arc::clone(&handle), access)).transpose().map_err(|e| anyhow_free::chain(&e))?;
    // Scripts and tests wait for this line before they start the source.
    eprintln!("vmm: waiting for a migration on {}", listener.local());
    let console: Box<dyn std::io::Write + Send> = if args.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let options = RunOptions { console, handle, stay_up: config.api_socket.is_some(), skip_selftest: false, translate: Vec::new() };
    let timeout = std::time::Duration::from_millis(args.link_timeout_ms.max(1));
    let outcome = destination::run(listener, config, timeout, options).map_err(|e| format!("incoming migration failed: {}", anyhow_free::chain(&e)))?;
    if args.json {
        println!("{}", run_report::to_json(&outcome));
    } else {
        print!("{}", run_report::to_text(&outcome));
    }
    Ok(outcome.exit_status)
}

#[allow(clippy::too_many_arguments)]
fn restore(dir: PathBuf, mode: RestoreMode, api_socket: Option<PathBuf>, access: api::server::Access, expected_mem: Option<u64>, json: bool, kvm_thread: Option<KvmThread>, seccomp: &SeccompArgs) -> anyhow_free::Result<u32> {
    seccomp.configure(None)?;
    let handle = MachineHandle::new();
    memvisor::signals::watch(Arc::clone(&handle));
    let _server = api_socket.as_ref().map(|path| api::server::spawn(path, Arc::clone(&handle), access)).transpose().map_err(|e| anyhow_free::chain(&e))?;
    let console: Box<dyn std::io::Write + Send> = if json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let run = RunOptions { console, handle: Arc::clone(&handle), stay_up: api_socket.is_some(), skip_selftest: false, translate: Vec::new() };
    let options = RestoreOptions { mode, api_socket, expected_mem, kvm_thread };
    let outcome = memvisor::restore::restore(&dir, options, run).map_err(|e| anyhow_free::chain(&e))?;
    if json {
        println!("{}", run_report::to_json(&outcome));
    } else {
        print!("{}", run_report::to_text(&outcome));
    }
    Ok(handle.terminated_by().map_or(outcome.exit_status, memvisor::signals::exit_status))
}

fn ctl(socket: PathBuf, command: CtlCommand) -> anyhow_free::Result<u32> {
    let request = match command {
        CtlCommand::Status => Request::Status,
        CtlCommand::Pause => Request::Pause,
        CtlCommand::Resume => Request::Resume,
        CtlCommand::Shutdown => Request::Shutdown,
        CtlCommand::Swap => Request::Swap,
        CtlCommand::DirtyLog { state, slot } => Request::DirtyLog { on: state.0, slot },
        CtlCommand::Balloon { command } => match command {
            BalloonCommand::Set { size } => Request::BalloonSet { bytes: memvisor::size::parse_size(&size).map_err(|e| anyhow_free::chain(&e))? },
            BalloonCommand::Get => Request::BalloonGet,
            BalloonCommand::Stats => Request::BalloonStats,
        },
        CtlCommand::Snapshot { full, diff } => match (full, diff) {
            (Some(dir), _) => Request::Snapshot { kind: SnapshotKind::Full, dir },
            (None, Some(dir)) => Request::Snapshot { kind: SnapshotKind::Diff, dir },
            (None, None) => return Err("snapshot needs --full DIR or --diff DIR".into()),
        },
        CtlCommand::Translate(args) => return translate(&socket, &args),
        CtlCommand::Migrate { to, max_downtime_ms, bandwidth, postcopy, link_timeout_ms } => {
            Request::Migrate { to, max_downtime_ms: Some(max_downtime_ms), bandwidth_mib_s: bandwidth, postcopy: Some(postcopy), link_timeout_ms: Some(link_timeout_ms) }
        }
        CtlCommand::MigrateStatus => Request::MigrateStatus,
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
            if total > 1 && !args.json
                && let Request::Translate { gva: Some(gva), .. } = request {
                    println!("guest-virtual {gva:#018x}: error: {why}");
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

/// `vmm bench ARGS`: replaces this process with `vmm-bench ARGS`, the
/// benchmarks' own binary next to this one (the VMM carries none of their
/// code). Returns only when that fails.
fn bench(args: &[std::ffi::OsString]) -> anyhow_free::Result<u32> {
    use std::os::unix::process::CommandExt;
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary's path: {e}"))?;
    let bench = me.with_file_name("vmm-bench");
    let e = std::process::Command::new(&bench).args(args).exec();
    Err(format!("cannot run {} (build it with cargo build --release --workspace): {e}", bench.display()))
}

fn exit_code(status: u32) -> ExitCode {
    // Exit statuses are 8 bits; a nonzero guest status never maps to 0.
    let low = (status & 0xff) as u8;
    ExitCode::from(if status != 0 && low == 0 { 1 } else { low })
}

fn main() -> ExitCode {
    timeline::process_start_ns();
    timeline::mark("main");
    let subcommand = std::env::args_os().nth(1);
    if subcommand.as_ref().is_some_and(|a| a == "run" || a == "restore") {
        // Before any thread starts, so every thread inherits the mask and
        // only the signal thread takes SIGINT/SIGTERM (memvisor::signals).
        memvisor::signals::block_termination();
    }
    // The VM is created while the flags are parsed (memvisor::restore); a
    // thread that cannot start is left for the restore to report.
    let kvm_thread = subcommand.is_some_and(|a| a == "restore").then(KvmThread::start).and_then(Result::ok);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).format_timestamp(None).init();
    timeline::mark("logger");
    let cli = Cli::parse();
    timeline::mark("parse flags");
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Ctl { socket, command } => ctl(socket, command),
        Command::Translate { socket, args } => translate(&socket, &args),
        Command::Restore { dir, restore_mode, api_socket, api_allow_uid, mem, json, seccomp } => match mem.as_deref().map(memvisor::size::parse_size).transpose() {
            Ok(expected_mem) => restore(dir, restore_mode, api_socket, api::server::Access::owner_and(&api_allow_uid), expected_mem, json, kvm_thread, &seccomp),
            Err(e) => Err(anyhow_free::chain(&e)),
        },
        Command::Bench { args } => bench(&args),
    };
    match result {
        Ok(status) => exit_code(status),
        Err(message) => {
            eprintln!("vmm: error: {message}");
            ExitCode::from(1)
        }
    }
}
