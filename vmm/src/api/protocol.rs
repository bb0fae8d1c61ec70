//! Control-socket messages.
//!
//! Requests are JSON objects with a `cmd` field, e.g. `{"cmd":"pause"}`;
//! responses are `{"ok":true,"state":"paused"}` or
//! `{"ok":false,"error":"..."}`. Lines longer than [`MAX_LINE`] are refused.

use serde::{Deserialize, Serialize};

use crate::control::VmState;

/// Longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Report the VM's state.
    Status,
    /// Pause the vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// End the VM.
    Shutdown,
    /// Switch dirty logging on or off for one memslot, or for all when
    /// `slot` is absent; answers with every slot's state.
    DirtyLog {
        /// On or off.
        on: bool,
        /// The memslot (RAM region index), or all.
        #[serde(default)]
        slot: Option<u32>,
    },
    /// Set the balloon's target.
    BalloonSet {
        /// Target in bytes (a multiple of 4 KiB).
        bytes: u64,
    },
    /// The balloon's state and metrics.
    BalloonGet,
    /// Fresh guest memory statistics from the balloon's stats queue.
    BalloonStats,
    /// Take a snapshot into `dir` (the vCPU is stopped meanwhile).
    Snapshot {
        /// Full or diff.
        kind: crate::snapshot::format::SnapshotKind,
        /// Destination directory (must not exist).
        dir: std::path::PathBuf,
    },
    /// The swap device's counters and the slots holding data now.
    Swap,
    /// Migrate the VM to a destination waiting in `vmm run --incoming`;
    /// answers when the guest runs there (and the VM here then ends) or
    /// with why it still runs here.
    Migrate {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        to: String,
        /// The longest the guest may be stopped, milliseconds.
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// A cap on the link, MiB per second.
        #[serde(default)]
        bandwidth_mib_s: Option<u64>,
        /// `auto`, `never` or `after:N`.
        #[serde(default)]
        postcopy: Option<String>,
        /// How long either side waits for a silent peer, milliseconds.
        #[serde(default)]
        link_timeout_ms: Option<u64>,
    },
    /// The progress of the migration under way, or of the last one.
    MigrateStatus,
    /// Explain the translation of `gva` under the vCPU's CR3, or with `map`
    /// list every mapping; the answer's data holds the JSON and a `text`.
    Translate {
        /// The guest-virtual address.
        #[serde(default)]
        gva: Option<u64>,
        /// List all mappings instead.
        #[serde(default)]
        map: bool,
    },
}

/// A response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The VM's state after the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// Why the request failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Extra data some requests return.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    /// A success with the state.
    #[must_use]
    pub fn ok(state: VmState) -> Self {
        Response { ok: true, state: Some(state), error: None, data: None }
    }

    /// A failure.
    #[must_use]
    pub fn error(message: impl Into<String>) -> Self {
        Response { ok: false, state: None, error: Some(message.into()), data: None }
    }
}

/// Parses a request line.
///
/// # Errors
/// A message that says what is wrong with the line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!("request of {} bytes is longer than {MAX_LINE}", line.len()));
    }
    let value: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| format!("invalid request: {e}"))?;
    // serde ignores unknown fields of internally tagged unit variants, so
    // the fields each command takes are checked here.
    let cmd = value.get("cmd").and_then(serde_json::Value::as_str).ok_or("invalid request: no \"cmd\"")?;
    let allowed: &[&str] = match cmd {
        "dirty-log" => &["cmd", "on", "slot"],
        "snapshot" => &["cmd", "kind", "dir"],
        "balloon-set" => &["cmd", "bytes"],
        "translate" => &["cmd", "gva", "map"],
        "migrate" => &["cmd", "to", "max_downtime_ms", "bandwidth_mib_s", "postcopy", "link_timeout_ms"],
        _ => &["cmd"],
    };
    if let Some(obj) = value.as_object()
        && let Some(extra) = obj.keys().find(|k| !allowed.contains(&k.as_str()))
    {
        return Err(format!("invalid request: unknown field {extra:?} for {cmd:?}"));
    }
    serde_json::from_value(value).map_err(|e| format!("invalid request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_json_lines() {
        assert_eq!(parse_request("{\"cmd\":\"status\"}\n"), Ok(Request::Status));
        assert_eq!(parse_request("{\"cmd\":\"shutdown\"}"), Ok(Request::Shutdown));
        assert_eq!(
            parse_request("{\"cmd\":\"snapshot\",\"kind\":\"diff\",\"dir\":\"/tmp/s\"}"),
            Ok(Request::Snapshot { kind: crate::snapshot::format::SnapshotKind::Diff, dir: "/tmp/s".into() })
        );
    }

    #[test]
    fn balloon_requests_parse() {
        assert_eq!(parse_request("{\"cmd\":\"balloon-set\",\"bytes\":4096}"), Ok(Request::BalloonSet { bytes: 4096 }));
        assert_eq!(parse_request("{\"cmd\":\"balloon-get\"}"), Ok(Request::BalloonGet));
        assert!(parse_request("{\"cmd\":\"balloon-set\"}").is_err());
        assert!(parse_request("{\"cmd\":\"balloon-stats\",\"bytes\":1}").is_err());
    }

    #[test]
    fn swap_requests_parse_and_take_no_fields() {
        assert_eq!(parse_request("{\"cmd\":\"swap\"}"), Ok(Request::Swap));
        assert!(parse_request("{\"cmd\":\"swap\",\"slot\":1}").is_err());
    }

    #[test]
    fn translate_requests_parse() {
        assert_eq!(parse_request("{\"cmd\":\"translate\",\"gva\":4096}"), Ok(Request::Translate { gva: Some(4096), map: false }));
        assert_eq!(parse_request("{\"cmd\":\"translate\",\"map\":true}"), Ok(Request::Translate { gva: None, map: true }));
    }

    #[test]
    fn migrate_requests_parse() {
        assert_eq!(
            parse_request("{\"cmd\":\"migrate\",\"to\":\"tcp:10.0.0.2:4444\",\"max_downtime_ms\":5,\"postcopy\":\"after:2\"}"),
            Ok(Request::Migrate { to: "tcp:10.0.0.2:4444".into(), max_downtime_ms: Some(5), bandwidth_mib_s: None, postcopy: Some("after:2".into()), link_timeout_ms: None })
        );
        assert_eq!(parse_request("{\"cmd\":\"migrate-status\"}"), Ok(Request::MigrateStatus));
        assert!(parse_request("{\"cmd\":\"migrate\"}").is_err(), "no destination");
        assert!(parse_request("{\"cmd\":\"migrate\",\"to\":\"unix:/x\",\"speed\":1}").is_err());
    }

    #[test]
    fn garbage_requests_are_refused_with_a_reason() {
        assert!(parse_request("not json").is_err());
        assert!(parse_request("{\"cmd\":\"reboot\"}").is_err());
        assert!(parse_request(&"x".repeat(MAX_LINE + 1)).is_err());
        assert!(parse_request("{\"cmd\":\"status\",\"extra\":1}").is_err(), "unknown fields are refused");
        assert!(parse_request("{\"cmd\":\"snapshot\",\"kind\":\"full\",\"dir\":\"/x\",\"force\":true}").is_err());
        assert!(parse_request("[1,2]").is_err());
        assert!(parse_request("{\"cmd\":\"translate\",\"gva\":\"x\"}").is_err());
        assert!(parse_request("{\"cmd\":\"translate\",\"gva\":1,\"level\":2}").is_err());
    }

    #[test]
    fn responses_serialise_compactly() {
        let r = serde_json::to_string(&Response::ok(VmState::Paused)).unwrap();
        assert_eq!(r, "{\"ok\":true,\"state\":\"paused\"}");
        let e = serde_json::to_string(&Response::error("no")).unwrap();
        assert_eq!(e, "{\"ok\":false,\"error\":\"no\"}");
    }
}
