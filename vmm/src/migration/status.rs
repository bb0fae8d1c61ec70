//! What `vmm ctl SOCK migrate-status` reports: the source's progress,
//! published through the VM's handle after every round and every few
//! frames.

use serde::Serialize;

use super::convergence::Round;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connecting and agreeing on the VM.
    Setup,
    /// Sending memory while the guest runs.
    Precopy,
    /// The guest stopped; sending the rest and the state.
    StopAndCopy,
    /// The guest runs on the destination; sending the pages it lacks.
    Postcopy,
    /// Done: the guest runs on the destination.
    Completed,
    /// Failed; the guest runs here (or, after the hand-over, nowhere: see
    /// the error).
    Failed,
}

/// The source's view of a migration.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Where it is.
    pub phase: Phase,
    /// The destination.
    pub to: String,
    /// The pre-copy round under way (0 sends all of memory).
    pub round: u32,
    /// Bytes put on the link so far, frame headers included.
    pub bytes_sent: u64,
    /// Pages sent with their contents.
    pub data_pages: u64,
    /// Pages sent as zero-page markers.
    pub zero_pages: u64,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Bytes of guest memory still to send (the last harvest).
    pub remaining_bytes: u64,
    /// Bytes the guest dirtied per second in the last round.
    pub dirty_rate_bytes_per_s: f64,
    /// The link's measured bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// What stopping the guest now would cost, milliseconds.
    pub expected_downtime_ms: f64,
    /// The maximum downtime asked for, milliseconds.
    pub max_downtime_ms: f64,
    /// The bandwidth cap, bytes per second (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit_bytes_per_s: Option<u64>,
    /// The post-copy policy.
    pub postcopy: String,
    /// Percent of the vCPU's time it is kept stopped (auto-converge).
    pub throttle_percent: u8,
    /// Time since the migration started, milliseconds.
    pub elapsed_ms: f64,
    /// How long the guest was stopped: from the stop to the destination's
    /// "resumed" (pre-copy) or to the start of post-copy, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// The host's TSC when the guest was stopped for the final copy (the
    /// guest's TSC is the host's here; a guest-side clock gap that starts
    /// just before it is the downtime the guest saw).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_tsc: Option<u64>,
    /// Pages the destination asked for during post-copy.
    pub postcopy_requests: u64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every round's figures.
    pub rounds: Vec<Round>,
}

impl Status {
    /// A migration to `to` that is just starting.
    #[must_use]
    pub fn new(to: String, ram_bytes: u64, max_downtime_ms: f64, limit: Option<u64>, postcopy: String) -> Self {
        Status {
            phase: Phase::Setup,
            to,
            round: 0,
            bytes_sent: 0,
            data_pages: 0,
            zero_pages: 0,
            ram_bytes,
            remaining_bytes: 0,
            dirty_rate_bytes_per_s: 0.0,
            bandwidth_bytes_per_s: 0.0,
            expected_downtime_ms: 0.0,
            max_downtime_ms,
            bandwidth_limit_bytes_per_s: limit,
            postcopy,
            throttle_percent: 0,
            elapsed_ms: 0.0,
            downtime_ms: None,
            stop_tsc: None,
            postcopy_requests: 0,
            error: None,
            rounds: Vec::new(),
        }
    }

    /// As JSON.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
