//! The control-socket server: one thread accepting connections, one thread
//! per connection, each answering requests against the shared [`VmControl`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::ApiError;
use crate::api::protocol::{MAX_LINE, Request, Response, parse_request};
use crate::control::VmControl;

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
        Request::Snapshot { kind, dir } => {
            let (kind, dir) = (*kind, dir.clone());
            let result = control.call(Box::new(move |m| {
                m.snapshot(&dir, kind).map_err(|e| error_chain(&e)).and_then(|info| serde_json::to_value(info).map_err(|e| e.to_string()))
            }));
            match result {
                Ok(data) => Response { data: Some(data), ..Response::ok(control.state()) },
                Err(e) => Response::error(e),
            }
        }
    }
}

/// An error and its sources on one line.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
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
