//! `vmm-bench`: memvisor's benchmarks, one file per benchmark plus the
//! summary statistics they share. `vmm bench ARGS` runs this binary (it
//! sits next to `vmm`), so the VMM itself carries none of the benchmarks'
//! code or their plotting and progress-bar dependencies.
//!
//! The benchmarks that boot VMs start the `vmm` binary beside this one
//! ([`vmm_binary`]) as a fresh process per run, or drive the `memvisor`
//! library in-process where they time the library's own calls.

mod balloon;
mod boot;
mod dirty;
mod dirty_kernels;
mod linux_boot;
mod migrate;
mod qemu;
mod snapshot;
mod soak;
mod stats;
mod translation;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "vmm bench", version, about = "memvisor's benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: BenchCommand,
}

/// Which benchmark.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Balloon reclaim rate per backing against raw madvise/punch-hole, and re-fault time.
    Balloon(balloon::BalloonArgs),
    /// Boot time and VMM memory overhead, over fresh processes.
    Boot(boot::BootArgs),
    /// Dirty-page harvest cost per mechanism, against the raw ioctls.
    Dirty(dirty::DirtyArgs),
    /// A stock Linux bzImage's boot to its console milestones, memvisor
    /// and QEMU side by side.
    LinuxBoot(linux_boot::LinuxBootArgs),
    /// Live migration of a 1 GiB guest, idle and dirtying, over loopback
    /// and a veth pair, memvisor and QEMU side by side.
    Migrate(migrate::MigrateArgs),
    /// Diff-snapshot pause, full-snapshot throughput and restore latency.
    Snapshot(snapshot::SnapshotArgs),
    /// Resources left behind by 1,000 boots and 10,000 balloon
    /// inflate/deflate cycles (fds, threads, RSS).
    Soak(soak::SoakArgs),
    /// What nested (or shadow) translation costs: the same workloads
    /// natively and in the guest, over working sets, leaf sizes and backings.
    Translation(translation::TranslationArgs),
}

/// The `vmm` binary next to this one, which the benchmarks start as
/// fresh VMM processes.
///
/// # Errors
/// A message when this binary's own path is unknown or `vmm` is not beside it.
pub fn vmm_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary's path: {e}"))?;
    let vmm = me.with_file_name("vmm");
    if vmm.is_file() {
        Ok(vmm)
    } else {
        Err(format!("the vmm binary is not next to {} (build both: cargo build --release --workspace)", me.display()))
    }
}

fn run(bench: BenchCommand) -> Result<u32, Box<dyn std::error::Error>> {
    match bench {
        BenchCommand::Balloon(args) => Ok(balloon::run(&args)?),
        BenchCommand::Boot(args) => Ok(boot::run(&args)?),
        BenchCommand::Dirty(args) => Ok(dirty::run(&args)?),
        BenchCommand::LinuxBoot(args) => Ok(linux_boot::run(&args)?),
        BenchCommand::Migrate(args) => migrate::run(&args).map_err(|e| e as Box<dyn std::error::Error>),
        BenchCommand::Snapshot(args) => Ok(snapshot::run(&args)?),
        BenchCommand::Soak(args) => Ok(soak::run(&args)?),
        BenchCommand::Translation(args) => Ok(translation::run(&args)?),
    }
}

fn main() -> ExitCode {
    memvisor::timeline::process_start_ns();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).format_timestamp(None).init();
    let cli = Cli::parse();
    match run(cli.bench) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(e) => {
            eprintln!("vmm bench: error: {}", memvisor::error_chain(&*e));
            ExitCode::from(1)
        }
    }
}
