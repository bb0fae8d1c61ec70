//! The control-socket server: one thread accepting connections, one thread
//! per connection, each answering requests against the shared [`VmControl`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::api::ApiError;
use crate::api::protocol::{MAX_LINE, Request, Response, parse_request};
use crate::control::VmControl;
use crate::snapshot::Spares;
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

/// The previous diff's page buffers, kept here between snapshots (a VM has
/// one control server) so they can be warmed while the guest runs and
/// handed back without stopping the vCPU again.
static SPARES: Mutex<Spares> = Mutex::new(Spares { pages: None, late: None });

/// A snapshot: captured on the vCPU thread (the vCPU stopped only for
/// that), then made durable here while the guest runs on. A diff stops the
/// vCPU twice: once to harvest the dirty log, then, after this thread has
/// copied those pages with the guest running, to recopy the pages written
/// meanwhile and save the vCPU state (`crate::snapshot::diff`).
fn snapshot(control: &VmControl, kind: SnapshotKind, dir: PathBuf) -> Response {
    // One snapshot at a time, capture through persist: a second one must
    // not chain to a first that may still fail.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // This thread's work is background work to the guest: when the vCPU
    // thread wakes it at the end of a stop it must not take the vCPU's CPU
    // before the vCPU is back in the guest.
    let _batch = crate::snapshot::diff::BatchPolicy::enter();
    let captured = match kind {
        SnapshotKind::Full => on_vcpu(control, move |m| m.capture_snapshot(&dir, kind)),
        SnapshotKind::Diff => {
            // Only a diff uses the previous diff's buffers: warm them here,
            // with the guest running, not in the stop.
            let mut spares = std::mem::take(&mut *SPARES.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            for buf in [spares.pages.as_mut(), spares.late.as_mut()].into_iter().flatten() {
                crate::snapshot::warm(buf);
            }
            let pre = on_vcpu(control, move |m| {
                m.chain.keep(spares);
                m.begin_diff(&dir)
            });
            pre.and_then(|mut pre| {
                let Some(lease) = control.lease_ram() else {
                    return Err("the VM has exited".into());
                };
                // SAFETY: the plan comes from this VM's first stop, and the
                // lease keeps its RAM mapped until it is dropped after the
                // copy (VmControl::exited waits for it).
                unsafe { pre.copy() };
                drop(lease);
                on_vcpu(control, move |m| m.finish_diff(pre))
            })
        }
    };
    let captured = match captured {
        Ok(c) => c,
        // A failure before the final stop's capture leaves any harvested
        // pages in the chain's `pending` list: the next diff includes them.
        Err(e) => return Response::error(e),
    };
    match captured.persist() {
        Ok((info, spares)) => {
            *SPARES.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = spares;
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

/// Runs `job` on the vCPU thread (the vCPU stopped) and hands back what it
/// returned.
fn on_vcpu<T: Send + 'static>(control: &VmControl, job: impl FnOnce(&mut crate::machine::Machine) -> Result<T, crate::snapshot::SnapshotError> + Send + 'static) -> Result<T, String> {
    let slot: Arc<Mutex<Option<T>>> = Arc::default();
    let out = Arc::clone(&slot);
    control.call(Box::new(move |m| {
        let value = job(m).map_err(|e| crate::error_chain(&e))?;
        *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(value);
        Ok(serde_json::Value::Null)
    }))?;
    let value = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    value.ok_or_else(|| "the snapshot was not captured".into())
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
