//! The control socket: line-delimited JSON over a Unix stream socket.
//!
//! One request per line, one response per line. [`protocol`] defines both;
//! [`server`] answers them against a running VM; [`client`] is what
//! `vmm ctl` uses.

pub mod client;
pub mod protocol;
pub mod server;

use thiserror::Error;

/// Errors of the control socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("cannot listen on control socket {path}")]
    Bind {
        /// Socket path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be reached.
    #[error("cannot connect to control socket {path}")]
    Connect {
        /// Socket path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("control socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a valid message.
    #[error("invalid message on the control socket: {0}")]
    BadMessage(String),
    /// The socket path holds something that is not a control socket.
    #[error("{0} exists and is not a socket; refusing to replace it (remove it or choose another path)")]
    NotASocket(std::path::PathBuf),
    /// Another VMM serves the socket path.
    #[error("{0} is the control socket of a running VMM; choose another path")]
    InUse(std::path::PathBuf),
    /// The socket could not be made private to its owner.
    #[error("cannot make control socket {path} private (mode {mode:o})")]
    NotPrivate {
        /// Socket path.
        path: std::path::PathBuf,
        /// The mode it got.
        mode: u32,
    },
    /// The VMM closed the connection without answering.
    #[error("the VMM closed the connection without answering")]
    Closed,
    /// The VMM answered with an error.
    #[error("the VMM refused the request: {0}")]
    Refused(String),
}
