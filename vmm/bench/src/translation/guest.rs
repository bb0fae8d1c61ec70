//! The guest side of the translation benchmark: one tiny-guest run per
//! (working set, guest leaf, host backing), in this process, running every
//! asked workload as a ring-3 task (`translation:` workload). The run's
//! [`super::probe`] records give the repetitions and the KVM statistic
//! deltas; the Ready report gives the leaf size the guest really used.

use std::io::Write;
use std::sync::{Arc, Mutex};

use memvisor_abi::msg::Report;

use memvisor::translate::probe::WorkloadRecord;
use memvisor::config::{Backing, ConfigFile, GuestPage, SizeValue};
use memvisor::vmm::{self, RunOptions};

/// What one guest run gave.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The leaf size the guest used (log2), after any fallback.
    pub page_shift: Option<u32>,
    /// Whether the guest's CPU offers 1 GiB pages.
    pub has_1g_pages: bool,
    /// One record per workload.
    pub records: Vec<WorkloadRecord>,
}

/// Collects the guest console, for error messages.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut v = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded: only the tail matters for an error message.
        if v.len() < 1 << 16 {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Guest memory for a working set of `ws` bytes on `backing`: the buffer
/// plus room for the kernel, its arena and the RAM hole's leftovers,
/// rounded to the backing's page.
#[must_use]
pub fn guest_mem(ws: u64, backing: Backing) -> u64 {
    let mem = ws + if ws >= 1 << 30 { 512 << 20 } else { 128 << 20 };
    let page = backing.hugetlb_page_size().unwrap_or(2 << 20);
    mem.next_multiple_of(page)
}

/// Boots the tiny guest with `spec` (a `translation:` workload) and returns
/// its records.
///
/// # Errors
/// A message: the configuration, the VMM or the guest failed (with the tail
/// of the guest console).
pub fn run(ws: u64, leaf: GuestPage, backing: Backing, spec: &str) -> Result<GuestRun, String> {
    let file = ConfigFile {
        mem: Some(SizeValue::Bytes(guest_mem(ws, backing))),
        backing: Some(backing),
        guest_page: Some(leaf),
        workload: Some(spec.parse().map_err(|e| memvisor::error_chain(&e))?),
        ..ConfigFile::default()
    };
    let config = file.into_vm_config().map_err(|e| memvisor::error_chain(&e))?;
    let console = Console::default();
    let options = RunOptions { skip_selftest: true, ..RunOptions::new(Box::new(console.clone())) };
    let outcome = vmm::run(&config, options).map_err(|e| memvisor::error_chain(&e))?;
    let tail = || {
        let v = console.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&v[v.len().saturating_sub(400)..]).trim().to_string()
    };
    if outcome.exit_status != 0 {
        return Err(format!("the guest exited with status {}: {}", outcome.exit_status, tail()));
    }
    let (mut page_shift, mut has_1g_pages) = (None, false);
    for r in &outcome.reports {
        if let Report::Ready { page_shift: s, has_1g_pages: g, .. } = r.report {
            page_shift = Some(s);
            has_1g_pages = g;
        }
    }
    Ok(GuestRun { page_shift, has_1g_pages, records: outcome.translation_probe.unwrap_or_default() })
}
