//! Translation work a run does on its own: `vmm run --translate GVA,...`
//! explained at the guest's Ready point, and the benchmark's probe that
//! samples KVM statistics at the translation workload's events. The run
//! loop ([`crate::machine`]) calls in here; it runs on the vCPU thread.

use serde::Serialize;

use crate::bench::translation::probe::StatsProbe;
use crate::machine::Machine;

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

/// What a run is asked to do about translation.
#[derive(Debug, Default)]
pub struct RunTranslation {
    /// Addresses to explain when the guest reports Ready.
    pub at_ready: Vec<u64>,
    /// Their results, in order.
    pub results: Vec<ReadyTranslation>,
    /// The benchmark's KVM-statistics probe, when the translation workload runs.
    pub probe: Option<StatsProbe>,
}

/// Explains every `--translate` address (called when Ready arrives; the
/// guest is stopped in its port write, CR3 is the kernel's).
pub fn at_ready(m: &mut Machine) {
    let gvas = std::mem::take(&mut m.translation.at_ready);
    for gva in gvas {
        let r = super::explain(m.vm.ram(), &m.vcpu, m.mode, gva);
        let (explanation, error) = match r {
            Ok(e) => (Some(e), None),
            Err(e) => (None, Some(crate::error_chain(&e))),
        };
        m.translation.results.push(ReadyTranslation { gva, explanation, error });
    }
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

/// The control socket's `translate GVA` job (on the vCPU thread): the
/// explanation as JSON with its text beside it.
///
/// # Errors
/// The translation error, as text.
pub fn explain_job(m: &mut Machine, gva: u64) -> crate::control::JobResult {
    let e = super::explain(m.vm.ram(), &m.vcpu, m.mode, gva).map_err(|e| crate::error_chain(&e))?;
    let text = super::text::to_text(&e);
    let mut v = serde_json::to_value(&e).map_err(|e| e.to_string())?;
    v["text"] = text.into();
    Ok(v)
}

/// The control socket's `translate --map` job: every mapping under the
/// current CR3, merged.
///
/// # Errors
/// The reason the tables could not be listed, as text.
pub fn map_job(m: &mut Machine) -> crate::control::JobResult {
    let (cr3, phys_bits) = super::paging_root(&m.vcpu).map_err(|e| crate::error_chain(&e))?;
    let ram = m.vm.ram();
    let ranges = super::map::mappings(cr3, phys_bits, |gpa| super::read_gpa(ram, gpa)).map_err(|e| crate::error_chain(&e))?;
    let text = format!("CR3 {cr3:#x}: {} ranges\n{}", ranges.len(), super::map::to_text(&ranges));
    Ok(serde_json::json!({ "cr3": cr3, "ranges": ranges, "text": text }))
}
