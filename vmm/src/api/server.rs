//! The control-socket server: one thread accepting connections, one thread
//! per connection, each answering requests through the VM's
//! [`MachineHandle`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::ApiError;
use crate::api::protocol::{MAX_LINE, Request, Response, parse_request};
use crate::machine::MachineHandle;

/// A listening control socket; the file is removed on drop.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts serving `vm` on `path` (a stale socket file is replaced).
///
/// # Errors
/// [`ApiError::Bind`].
pub fn spawn(path: &Path, vm: Arc<MachineHandle>) -> Result<ApiServer, ApiError> {
    let bind_err = |source| ApiError::Bind { path: path.to_path_buf(), source };
    if path.exists() && UnixStream::connect(path).is_err() {
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let vm = Arc::clone(&vm);
                let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, &vm));
            }
        })
        .map_err(bind_err)?;
    Ok(ApiServer { path: path.to_path_buf() })
}

/// Answers one request.
#[must_use]
pub fn handle(request: &Request, vm: &MachineHandle) -> Response {
    let result = match request {
        Request::Status => return Response::ok(vm.state()),
        Request::Pause => return Response::ok(vm.pause()),
        Request::Resume => return Response::ok(vm.resume()),
        Request::Shutdown => {
            vm.shutdown();
            return Response::ok(vm.state());
        }
        Request::Snapshot { kind, dir } => vm.snapshot(*kind, dir.clone()),
        Request::BalloonSet { bytes } => vm.balloon_set(*bytes),
        Request::BalloonGet => vm.balloon_info(),
        Request::BalloonStats => vm.balloon_stats(),
        Request::Swap => vm.swap(),
        Request::Translate { gva: _, map: true } => vm.translation_map(),
        Request::Translate { gva: Some(gva), map: false } => vm.translate(*gva),
        Request::Translate { gva: None, map: false } => Err("translate needs a guest-virtual address or map".into()),
        Request::DirtyLog { on, slot } => vm.dirty_log(*on, *slot),
        Request::Migrate { to, max_downtime_ms, bandwidth_mib_s, postcopy, link_timeout_ms } => {
            migrate_request(to, *max_downtime_ms, *bandwidth_mib_s, postcopy.as_deref(), *link_timeout_ms).and_then(|req| crate::migration::source::migrate(vm, &req))
        }
        Request::MigrateStatus => vm.migration_status().ok_or_else(|| "no migration has been started on this VM".into()),
    };
    match result {
        Ok(data) => Response { data: Some(data), ..Response::ok(vm.state()) },
        Err(e) => Response::error(e),
    }
}

/// A migrate request's fields, checked and typed.
fn migrate_request(to: &str, max_downtime_ms: Option<u64>, bandwidth_mib_s: Option<u64>, postcopy: Option<&str>, link_timeout_ms: Option<u64>) -> Result<crate::migration::MigrateRequest, String> {
    use crate::migration::{DEFAULT_LINK_TIMEOUT_MS, DEFAULT_MAX_DOWNTIME_MS, MigrateRequest, PostcopyPolicy};
    if bandwidth_mib_s == Some(0) {
        return Err("a bandwidth of 0 MiB/s would never finish".into());
    }
    Ok(MigrateRequest {
        to: to.parse()?,
        max_downtime: std::time::Duration::from_millis(max_downtime_ms.unwrap_or(DEFAULT_MAX_DOWNTIME_MS)),
        bandwidth: bandwidth_mib_s.map(|b| b.saturating_mul(1 << 20)),
        postcopy: postcopy.map_or(Ok(PostcopyPolicy::Never), str::parse)?,
        link_timeout: std::time::Duration::from_millis(link_timeout_ms.unwrap_or(DEFAULT_LINK_TIMEOUT_MS).max(1)),
    })
}

fn serve(stream: UnixStream, vm: &MachineHandle) {
    let Ok(mut writer) = stream.try_clone() else { return };
    // Bound every line so a peer cannot make us buffer without limit.
    let mut reader = BufReader::new(stream.take(u64::MAX));
    let mut line = String::new();
    loop {
        line.clear();
        reader.get_mut().set_limit(MAX_LINE as u64 + 1);
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let (response, migrated) = match parse_request(&line) {
            Ok(req) => {
                let response = handle(&req, vm);
                let migrated = response.ok && matches!(req, Request::Migrate { .. });
                (response, migrated)
            }
            Err(e) => (Response::error(e), false),
        };
        let Ok(mut text) = serde_json::to_string(&response) else { return };
        text.push('\n');
        let written = writer.write_all(text.as_bytes());
        if migrated {
            // The guest runs on the destination now: this VM ends, after
            // the answer is out (the process exits once it has ended).
            vm.shutdown();
        }
        if written.is_err() || line.len() > MAX_LINE {
            return;
        }
    }
}
