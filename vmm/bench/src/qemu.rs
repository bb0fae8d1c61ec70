//! QEMU, the peer the benches that compare against it run side by side.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `qemu-system-x86_64` from `PATH`, when it runs (`--version` succeeds).
pub fn find() -> Option<PathBuf> {
    let q = PathBuf::from("qemu-system-x86_64");
    Command::new(&q).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().ok().filter(std::process::ExitStatus::success).map(|_| q)
}
