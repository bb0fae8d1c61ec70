//! The control-socket server: one thread accepting connections, one thread
//! per connection, each answering requests against the shared [`VmControl`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::api::ApiError;
use crate::api::protocol::{MAX_LINE, Request, Response, parse_request};
use crate::control::VmControl;
use crate::snapshot::Captured;
use crate::snapshot::format::SnapshotKind;

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

/// Starts serving `control` on `path` (a stale socket file is replaced).
///
/// # Errors
/// [`ApiError::Bind`].
pub fn spawn(path: &Path, control: Arc<VmControl>) -> Result<ApiServer, ApiError> {
    let bind_err = |source| ApiError::Bind { path: path.to_path_buf(), source };
    if path.exists() && UnixStream::connect(path).is_err() {
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let control = Arc::clone(&control);
                let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, &control));
            }
        })
        .map_err(bind_err)?;
    Ok(ApiServer { path: path.to_path_buf() })
}

/// Answers one request.
#[must_use]
pub fn handle(request: &Request, control: &VmControl) -> Response {
    match request {
        Request::Status => Response::ok(control.state()),
        Request::Pause => Response::ok(control.pause()),
        Request::Resume => Response::ok(control.resume()),
        Request::Shutdown => {
            control.shutdown();
            Response::ok(control.state())
        }
        Request::Snapshot { kind, dir } => snapshot(control, *kind, dir.clone()),
        Request::BalloonSet { bytes } => answer(control, crate::devices::virtio::balloon::control::set(control, *bytes)),
        Request::BalloonGet => answer(control, crate::devices::virtio::balloon::control::get(control)),
        Request::BalloonStats => answer(control, crate::devices::virtio::balloon::control::stats(control)),
        Request::Swap => answer(
            control,
            control.call(Box::new(|m| serde_json::to_value(m.devices.swap.stats()).map_err(|e| format!("cannot encode the swap counters: {e}")))),
        ),
        Request::Translate { gva, map } => {
            let result = match (gva, map) {
                (_, true) => control.call(Box::new(crate::translate::ready::map_job)),
                (Some(gva), false) => {
                    let gva = *gva;
                    control.call(Box::new(move |m| crate::translate::ready::explain_job(m, gva)))
                }
                (None, false) => Err("translate needs a guest-virtual address or map".into()),
            };
            match result {
                Ok(data) => Response { data: Some(data), ..Response::ok(control.state()) },
                Err(e) => Response::error(e),
            }
        }
        Request::DirtyLog { on, slot } => {
            let (on, slot) = (*on, *slot);
            let result = control.call(Box::new(move |m| {
                let tracker = m.tracker.as_mut().ok_or("dirty tracking is not prepared for this VM")?;
                let (vm, ram) = (m.vm.fd(), m.vm.ram());
                let result = match (slot, on) {
                    (Some(s), _) => tracker.set_slot_logging(vm, ram, s, on),
                    (None, true) => tracker.start(vm, ram),
                    (None, false) => tracker.stop(vm, ram),
                };
                result.map_err(|e| crate::error_chain(&e))?;
                let slots: Vec<serde_json::Value> = tracker
                    .slot_logging()
                    .into_iter()
                    .map(|(info, logging)| serde_json::json!({ "slot": info.slot, "first_pfn": info.first_pfn, "pages": info.pages, "logging": logging }))
                    .collect();
                Ok(serde_json::json!({ "mode": tracker.mode(), "slots": slots }))
            }));
            match result {
                Ok(data) => Response { data: Some(data), ..Response::ok(control.state()) },
                Err(e) => Response::error(e),
            }
        }
    }
}

/// A job's result as a response.
fn answer(control: &VmControl, result: crate::control::JobResult) -> Response {
    match result {
        Ok(data) => Response { data: Some(data), ..Response::ok(control.state()) },
        Err(e) => Response::error(e),
    }
}

/// A snapshot: captured on the vCPU thread (the vCPU stopped only for
/// that), then made durable here while the guest runs on.
fn snapshot(control: &VmControl, kind: SnapshotKind, dir: PathBuf) -> Response {
    // One snapshot at a time, capture through persist: a second one must
    // not chain to a first that may still fail.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    // The previous diff's page buffer, kept here between snapshots (a VM
    // has one control server) so it can be warmed while the guest runs and
    // handed back without stopping the vCPU again.
    static SPARE: Mutex<Option<Vec<u8>>> = Mutex::new(None);
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut spare = SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(buf) = spare.as_mut() {
        crate::snapshot::warm(buf);
    }
    let slot: Arc<Mutex<Option<Captured>>> = Arc::default();
    let out = Arc::clone(&slot);
    let captured = control.call(Box::new(move |m| {
        if spare.is_some() {
            m.chain.spare = spare;
        }
        let c = m.capture_snapshot(&dir, kind).map_err(|e| crate::error_chain(&e))?;
        *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(c);
        Ok(serde_json::Value::Null)
    }));
    if let Err(e) = captured {
        return Response::error(e);
    }
    let Some(captured) = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() else {
        return Response::error("the snapshot was not captured");
    };
    match captured.persist() {
        Ok((info, spare)) => {
            if spare.is_some() {
                *SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = spare;
            }
            Response { data: serde_json::to_value(info).ok(), ..Response::ok(control.state()) }
        }
        Err(e) => {
            // Its dirty pages were harvested and are not on disk: the next
            // snapshot must be a full one.
            let _ = control.call(Box::new(|m| {
                m.chain.last = None;
                Ok(serde_json::Value::Null)
            }));
            Response::error(crate::error_chain(&e))
        }
    }
}

fn serve(stream: UnixStream, control: &VmControl) {
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
        let response = match parse_request(&line) {
            Ok(req) => handle(&req, control),
            Err(e) => Response::error(e),
        };
        let Ok(mut text) = serde_json::to_string(&response) else { return };
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() || line.len() > MAX_LINE {
            return;
        }
    }
}
