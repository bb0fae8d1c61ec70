//! Live migration: moving a running VM to another memvisor process, on
//! this host or another, over TCP or a Unix socket.
//!
//! The source ([`source`]) runs on the control-socket thread that got
//! `vmm ctl SOCK migrate ...`, and reaches the VM only through its
//! [`crate::machine::MachineHandle`], as snapshots do: each stop of the
//! vCPU is a job on its thread. Pre-copy sends all of memory while the
//! guest runs (round 0), then, round after round, what the dirty log says
//! the guest wrote meanwhile; when what is left can be sent within the
//! maximum downtime at the measured bandwidth ([`convergence`]) it stops
//! the guest, sends the rest and the vCPU, irqchip and device state (the
//! snapshot code's own serialisation), and hands over. A guest that
//! dirties memory faster than the link takes it is throttled or moved
//! post-copy ([`postcopy`]).
//!
//! The destination ([`destination`], `vmm run --incoming ADDR`) builds a
//! machine as a restore does, from the stream instead of files, and runs
//! it once the source commits. The stream ([`stream`]) is versioned and
//! every frame checksummed; the conversation, in order:
//!
//! ```text
//! source                                   destination
//! preamble (version)            ⇄          preamble (version)
//! Hello (config, RAM layout)    →
//!                               ←          Accept | Abort(reason)
//! Setup (CPUID)                 →          creates VM, RAM, vCPU
//! Pages / Zeros … RoundEnd(0)   →          writes RAM
//!                               ←          RoundAck(0): all in RAM
//! … rounds 1..n (dirty pages), each acknowledged
//! [guest stopped] Pages/Zeros, RoundEnd, State →  loads vCPU, irqchip, devices
//!                               ←          RoundAck, Ready
//! Commit                        →          runs the guest
//!                               ←          Resumed
//! exits
//! ```
//!
//! Until the source sends Commit the guest is the source's: any failure
//! (the link cut, the destination gone or refusing) resumes it there and
//! the destination, whose guest never ran, exits. After Commit the guest
//! is the destination's; the source never runs it again.

pub mod convergence;
pub mod destination;
pub mod pages;
pub mod postcopy;
pub mod source;
pub mod status;
pub mod stream;
pub mod transport;

use thiserror::Error;

pub use convergence::PostcopyPolicy;
pub use transport::Address;

/// Errors of a migration, on either side.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// The stream failed or carried something invalid.
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    /// The connection could not be made or set up.
    #[error("{what}")]
    Connect {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer refused or abandoned the migration.
    #[error("the {peer} abandoned the migration: {reason}")]
    PeerAborted {
        /// "source" or "destination".
        peer: &'static str,
        /// Its reason.
        reason: String,
    },
    /// The two sides' VMs do not fit (RAM size, layout, …).
    #[error("the destination does not match the source: {0}")]
    Mismatch(String),
    /// The VM cannot be migrated now.
    #[error("{0}")]
    Refused(String),
    /// Data from the stream that names memory outside guest RAM.
    #[error("the source sent pages outside guest RAM: {0}")]
    OutsideRam(String),
    /// A step on the vCPU thread failed.
    #[error("{0}")]
    Vcpu(String),
    /// Building or running the VM on the destination.
    #[error(transparent)]
    Vmm(#[from] crate::machine::VmmError),
    /// Post-copy's page service failed.
    #[error(transparent)]
    Postcopy(#[from] postcopy::PostcopyError),
}

impl From<crate::snapshot::SnapshotError> for MigrationError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        MigrationError::Vmm(e.into())
    }
}

/// What `vmm ctl SOCK migrate` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    /// Where the destination listens.
    pub to: Address,
    /// The longest the guest may be stopped for the final copy.
    pub max_downtime: std::time::Duration,
    /// A cap on the bytes per second sent (`None`: as fast as the link).
    pub bandwidth: Option<u64>,
    /// When post-copy may start.
    pub postcopy: PostcopyPolicy,
    /// How long either side waits for the other before it gives up.
    pub link_timeout: std::time::Duration,
}

/// The default maximum downtime, as QEMU's `downtime-limit`.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;
/// The default time a side waits for its silent peer.
pub const DEFAULT_LINK_TIMEOUT_MS: u64 = 10_000;
