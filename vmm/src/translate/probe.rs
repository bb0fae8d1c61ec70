//! KVM statistics around each phase of the guest's translation workload.
//!
//! The guest reports `TranslationBegin` before building a workload's data,
//! `TranslationTimed` once it is built and warmed, a `TranslationRep` per
//! timed repetition and `TranslationEnd` after the last. The run loop
//! hands each event to [`StatsProbe::on_event`] while the guest waits in its
//! port write, so a KVM binary-statistics snapshot taken there brackets the
//! phase exactly; the deltas (set-up+warm, timed) are what the benchmark
//! reports per cell.

use std::collections::BTreeMap;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::Serialize;

use memvisor_abi::workload::Event;

use crate::kvm_stats::{self, KvmStatsReport};

/// One workload's phases in one guest run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadRecord {
    /// The workload (`memvisor_user::translation::Workload` as u64).
    pub workload: u64,
    /// Units it works on (nodes, words).
    pub units: u64,
    /// (TSC ticks, accesses) per timed repetition.
    pub reps: Vec<(u64, u64)>,
    /// Statistic deltas over set-up and warm-up (nonzero ones).
    pub warm_delta: BTreeMap<String, i64>,
    /// Statistic deltas over the timed repetitions (nonzero ones).
    pub timed_delta: BTreeMap<String, i64>,
    /// The workload's checksum (keeps the compiler honest; same natively).
    pub checksum: u64,
}

/// Samples KVM statistics at the translation workload's events.
#[derive(Debug, Default)]
pub struct StatsProbe {
    /// Finished and running workloads, in order.
    pub records: Vec<WorkloadRecord>,
    last: Option<KvmStatsReport>,
}

/// Most repetitions kept per workload record: far above any `--reps`, and
/// a bound on what a misbehaving guest's reports can make the VMM hold.
pub const MAX_REPS: usize = 1 << 16;

/// Every numeric statistic of a report, vCPU ones prefixed `vcpu.`.
fn flatten(r: &KvmStatsReport) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for (k, v) in &r.vm {
        if let Some(n) = v.as_i64() {
            out.insert(k.clone(), n);
        }
    }
    for m in &r.vcpus {
        for (k, v) in m {
            if let Some(n) = v.as_i64() {
                let sum = out.entry(format!("vcpu.{k}")).or_insert(0);
                *sum = sum.saturating_add(n);
            }
        }
    }
    out
}

/// `after − before` for every statistic, nonzero ones only.
#[must_use]
pub fn delta(before: &KvmStatsReport, after: &KvmStatsReport) -> BTreeMap<String, i64> {
    let (b, a) = (flatten(before), flatten(after));
    a.iter().filter_map(|(k, v)| {
        let d = v.saturating_sub(b.get(k).copied().unwrap_or(0));
        (d != 0).then(|| (k.clone(), d))
    }).collect()
}

impl StatsProbe {
    /// Handles one guest event; other events are ignored.
    pub fn on_event(&mut self, event: Event, a: u64, b: u64, kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd) {
        match event {
            Event::TranslationBegin => {
                self.records.push(WorkloadRecord { workload: a, units: b, ..Default::default() });
                self.last = Some(kvm_stats::collect(kvm, vm, &[vcpu]));
            }
            Event::TranslationTimed => {
                let now = kvm_stats::collect(kvm, vm, &[vcpu]);
                if let (Some(r), Some(before)) = (self.records.last_mut(), self.last.as_ref()) {
                    r.warm_delta = delta(before, &now);
                }
                self.last = Some(now);
            }
            Event::TranslationRep => {
                // The guest sends these: keep at most MAX_REPS, whatever it sends.
                if let Some(r) = self.records.last_mut().filter(|r| r.reps.len() < MAX_REPS) {
                    r.reps.push((a, b));
                }
            }
            Event::TranslationEnd => {
                let now = kvm_stats::collect(kvm, vm, &[vcpu]);
                if let (Some(r), Some(before)) = (self.records.last_mut(), self.last.as_ref()) {
                    r.timed_delta = delta(before, &now);
                    r.checksum = b;
                }
                self.last = None;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_keep_nonzero_changes_of_vm_and_vcpu_stats() {
        let mut before = KvmStatsReport::default();
        before.vm.insert("pages_4k".into(), 10.into());
        before.vm.insert("pages_2m".into(), 5.into());
        before.vcpus.push([("pf_fixed".to_string(), serde_json::Value::from(1))].into_iter().collect());
        let mut after = before.clone();
        after.vm.insert("pages_4k".into(), 522.into());
        after.vm.insert("pages_2m".into(), 4.into());
        after.vcpus[0].insert("pf_fixed".into(), 3.into());
        let d = delta(&before, &after);
        assert_eq!(d.get("pages_4k"), Some(&512));
        assert_eq!(d.get("pages_2m"), Some(&-1));
        assert_eq!(d.get("vcpu.pf_fixed"), Some(&2));
        assert_eq!(d.len(), 3);
    }
}
