//! The control-socket server: one thread accepting connections, one thread
//! per connection, each answering requests through the VM's
//! [`MachineHandle`].
//!
//! The socket controls the VM (shutdown, snapshots anywhere the VMM may
//! write), so it is the owner's alone: created with mode 0600 whatever the
//! umask, and every connection's peer is checked with `SO_PEERCRED`
//! against the allowed user ids (the VMM's own unless configured with
//! `--api-allow-uid`; then the socket is opened to every user, mode 0666,
//! and the peer check is what keeps the others out). Only a stale socket at
//! the path is replaced; anything else there is refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
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

/// Who may use the socket: these user ids (the VMM's own effective uid
/// when none is configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    uids: Vec<u32>,
}

impl Access {
    /// The VMM's own user and `extra` ones.
    #[must_use]
    pub fn owner_and(extra: &[u32]) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let mut uids = vec![me];
        uids.extend_from_slice(extra);
        Access { uids }
    }

    fn allows(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }

    /// Whether users other than the VMM's own may connect.
    fn shared(&self) -> bool {
        self.uids.iter().any(|u| *u != self.uids[0])
    }
}

/// Makes `path` free for a new socket: nothing there, or a stale socket
/// (which is removed). A live socket or anything that is not a socket is
/// refused.
fn clear_path(path: &Path) -> Result<(), ApiError> {
    let bind_err = |source| ApiError::Bind { path: path.to_path_buf(), source };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(bind_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse(path.to_path_buf())),
        // Nobody listens: a socket left by a VMM that ended without
        // removing it.
        Err(_) => std::fs::remove_file(path).map_err(bind_err),
    }
}

/// Binds `path` with mode 0600: the umask is 0177 during bind(2), which
/// creates the file (process-wide, so this runs before any thread that
/// creates files), and the mode is checked afterwards.
fn bind_private(path: &Path) -> Result<UnixListener, ApiError> {
    // SAFETY: umask has no preconditions; the old mask is restored below.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| ApiError::Bind { path: path.to_path_buf(), source })?;
    let mode = std::fs::symlink_metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o777);
    if mode & 0o077 != 0 {
        let _ = std::fs::remove_file(path);
        return Err(ApiError::NotPrivate { path: path.to_path_buf(), mode });
    }
    Ok(listener)
}

/// The user id of the process at the other end of `stream` (SO_PEERCRED,
/// socket(7)).
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid out-buffers of the size passed;
    // the fd is the stream's, open for this call.
    let r = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &raw mut len) };
    (r == 0).then_some(cred.uid)
}

/// Starts serving `vm` on `path` to the users `access` allows.
///
/// # Errors
/// [`ApiError::Bind`], [`ApiError::NotASocket`], [`ApiError::InUse`],
/// [`ApiError::NotPrivate`].
pub fn spawn(path: &Path, vm: Arc<MachineHandle>, access: Access) -> Result<ApiServer, ApiError> {
    clear_path(path)?;
    let listener = bind_private(path)?;
    if access.shared() {
        // The allowed users must be able to connect(2); SO_PEERCRED keeps
        // everyone else out.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(|source| ApiError::Bind { path: path.to_path_buf(), source })?;
    }
    let server = ApiServer { path: path.to_path_buf() };
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Before the first request; the connection threads inherit it
            // (`crate::seccomp`).
            crate::seccomp::apply_or_abort(crate::seccomp::ThreadKind::Vmm);
            for mut stream in listener.incoming().flatten() {
                match peer_uid(&stream) {
                    Some(uid) if access.allows(uid) => {}
                    peer => {
                        let who = peer.map_or("an unknown user".to_string(), |u| format!("user {u}"));
                        log::warn!("control socket: refused a connection from {who}");
                        let refusal = Response::error(format!("permission denied: {who} may not control this VM"));
                        if let Ok(text) = serde_json::to_string(&refusal) {
                            let _ = stream.write_all(format!("{text}\n").as_bytes());
                        }
                        continue;
                    }
                }
                let vm = Arc::clone(&vm);
                let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, &vm));
            }
        })
        .map_err(|source| ApiError::Bind { path: path.to_path_buf(), source })?;
    Ok(server)
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
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        reader.get_mut().set_limit(MAX_LINE as u64 + 1);
        match reader.read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let (response, migrated) = match std::str::from_utf8(&bytes) {
            Ok(text) => match parse_request(text) {
                Ok(req) => {
                    let response = handle(&req, vm);
                    let migrated = response.ok && matches!(req, Request::Migrate { .. });
                    (response, migrated)
                }
                Err(e) => (Response::error(e), false),
            },
            Err(e) => (Response::error(format!("invalid request: not UTF-8 text ({e})")), false),
        };
        let Ok(mut text) = serde_json::to_string(&response) else { return };
        text.push('\n');
        let written = writer.write_all(text.as_bytes());
        if migrated {
            // The guest runs on the destination now: this VM ends, after
            // the answer is out (the process exits once it has ended).
            vm.shutdown();
        }
        if written.is_err() || bytes.len() > MAX_LINE {
            return;
        }
    }
}
