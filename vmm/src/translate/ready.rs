//! Translations asked for by name: `vmm run --translate GVA,...` (explained
//! when the guest reports Ready, by the run's translation observer) and the
//! control socket's `translate` requests, as values and as JSON with their
//! text beside them. The caller holds the stopped vCPU.

use kvm_ioctls::VcpuFd;
use serde::Serialize;

use crate::host::TranslationMode;
use crate::memory::GuestRam;

/// One `--translate` address and what came of it.
#[derive(Debug, Clone, Serialize)]
pub struct ReadyTranslation {
    /// The address asked for.
    pub gva: u64,
    /// The explanation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<super::Explanation>,
    /// Why there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Explains each of `gvas` under the vCPU's current CR3.
#[must_use]
pub fn explain_all(ram: &GuestRam, vcpu: &VcpuFd, mode: TranslationMode, gvas: &[u64]) -> Vec<ReadyTranslation> {
    gvas.iter()
        .map(|&gva| match super::explain(ram, vcpu, mode, gva) {
            Ok(e) => ReadyTranslation { gva, explanation: Some(e), error: None },
            Err(e) => ReadyTranslation { gva, explanation: None, error: Some(crate::error_chain(&e)) },
        })
        .collect()
}

/// The results as text.
#[must_use]
pub fn to_text(results: &[ReadyTranslation]) -> String {
    let mut s = String::new();
    for r in results {
        match (&r.explanation, &r.error) {
            (Some(e), _) => s.push_str(&super::text::to_text(e)),
            (None, Some(err)) => s.push_str(&format!("guest-virtual {:#018x}: error: {err}\n", r.gva)),
            (None, None) => {}
        }
    }
    s
}

/// The explanation of `gva` as JSON, with its text under `"text"`.
///
/// # Errors
/// The translation error, as text.
pub fn explain_json(ram: &GuestRam, vcpu: &VcpuFd, mode: TranslationMode, gva: u64) -> Result<serde_json::Value, String> {
    let e = super::explain(ram, vcpu, mode, gva).map_err(|e| crate::error_chain(&e))?;
    let text = super::text::to_text(&e);
    let mut v = serde_json::to_value(&e).map_err(|e| e.to_string())?;
    v["text"] = text.into();
    Ok(v)
}

/// Every mapping under the vCPU's current CR3, merged, as JSON with its
/// text under `"text"`.
///
/// # Errors
/// The reason the tables could not be listed, as text.
pub fn map_json(ram: &GuestRam, vcpu: &VcpuFd) -> Result<serde_json::Value, String> {
    let (cr3, phys_bits) = super::paging_root(vcpu).map_err(|e| crate::error_chain(&e))?;
    let ranges = super::map::mappings(cr3, phys_bits, |gpa| super::read_gpa(ram, gpa)).map_err(|e| crate::error_chain(&e))?;
    let text = format!("CR3 {cr3:#x}: {} ranges\n{}", ranges.len(), super::map::to_text(&ranges));
    Ok(serde_json::json!({ "cr3": cr3, "ranges": ranges, "text": text }))
}
