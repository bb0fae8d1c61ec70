//! The `vmm ctl` client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::api::ApiError;
use crate::api::protocol::{Request, Response};

/// Sends one request and returns the response.
///
/// # Errors
/// [`ApiError::Connect`], [`ApiError::Io`], [`ApiError::BadMessage`],
/// [`ApiError::Closed`].
pub fn send(path: &Path, request: &Request) -> Result<Response, ApiError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ApiError::Connect { path: path.to_path_buf(), source })?;
    let mut line = serde_json::to_string(request).map_err(|e| ApiError::BadMessage(e.to_string()))?;
    line.push('\n');
    // A peer that hangs up shows as EPIPE on the write, ECONNRESET or EOF
    // on the read: all are "the VMM closed the connection".
    let closed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => ApiError::Closed,
        _ => ApiError::Io(e),
    };
    // A VMM that refuses the connection answers at once and hangs up, so
    // the write may fail while its answer waits to be read: read either way.
    let sent = stream.write_all(line.as_bytes());
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    if reader.read_line(&mut answer).map_err(closed)? == 0 {
        return Err(sent.err().map_or(ApiError::Closed, closed));
    }
    serde_json::from_str(&answer).map_err(|e| ApiError::BadMessage(format!("{e}: {answer:?}")))
}
