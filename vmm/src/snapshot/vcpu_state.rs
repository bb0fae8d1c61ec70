//! Saving and restoring a vCPU: registers, special registers, FPU/XSAVE,
//! XCRs, MSRs, pending events, MP state and, when the VM has an in-kernel
//! irqchip, the LAPIC (the PICs and IOAPIC are VM state: [`super::irqchip`]).
//! Most VMs have no in-kernel irqchip (only a virtio device makes one), and
//! then there is no LAPIC to save.

use kvm_bindings::{Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::snapshot::SnapshotError;

/// Everything KVM holds for one vCPU. The KVM structures are stored as
/// their raw bytes (hex), since kvm-bindings does not serialise all of them.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    #[serde(with = "raw")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    #[serde(with = "raw")]
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (always saved; XSAVE supersedes it when present).
    #[serde(with = "raw")]
    pub fpu: kvm_fpu,
    /// XSAVE area, where KVM offers it.
    #[serde(with = "raw_opt")]
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers, where KVM offers them.
    #[serde(with = "raw_opt")]
    pub xcrs: Option<kvm_xcrs>,
    /// MSRs KVM reports as saveable (KVM_GET_MSR_INDEX_LIST) and could read.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts and NMIs.
    #[serde(with = "raw_opt")]
    pub events: Option<kvm_vcpu_events>,
    /// Runnable, halted, …
    #[serde(with = "raw_opt")]
    pub mp_state: Option<kvm_mp_state>,
    /// The local APIC's registers, when the VM has an in-kernel irqchip
    /// (absent in snapshots written before it was saved).
    #[serde(default, with = "raw_opt")]
    pub lapic: Option<kvm_lapic_state>,
    /// The CPUID the vCPU had, so the restored one gets the same (and the
    /// restore skips KVM_GET_SUPPORTED_CPUID).
    #[serde(with = "raw_vec")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState").field("rip", &self.regs.rip).field("msrs", &self.msrs.len()).finish_non_exhaustive()
    }
}

/// KVM structures that are plain data: `repr(C)`, integer fields and
/// explicit padding only, valid for every bit pattern (bindgen output of
/// include/uapi/linux/kvm.h and asm/kvm.h).
///
/// # Safety
/// Only for such types.
pub unsafe trait KvmPod: Sized {}
// SAFETY: all five are bindgen `repr(C)` structs of integers and integer
// arrays with explicit padding fields.
unsafe impl KvmPod for kvm_regs {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_sregs {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_fpu {}
// SAFETY: as above (the flexible `extra` array is zero-sized).
unsafe impl KvmPod for kvm_xsave {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_mp_state {}
// SAFETY: as above (function, index, flags, four registers, padding).
unsafe impl KvmPod for kvm_cpuid_entry2 {}
// SAFETY: as above (1024 register bytes).
unsafe impl KvmPod for kvm_lapic_state {}
// SAFETY: as above (chip id, explicit padding, and a union of integer
// structs and a 512-byte array, the union's full size, so every byte is
// covered by the array member).
unsafe impl KvmPod for kvm_irqchip {}

fn to_hex<T: KvmPod>(v: &T) -> String {
    // SAFETY: `KvmPod` types have no uninitialised bytes.
    let bytes = unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex<T: KvmPod>(s: &str) -> Result<T, String> {
    if s.len() != 2 * size_of::<T>() {
        return Err(format!("expected {} hex bytes, found {}", size_of::<T>(), s.len() / 2));
    }
    // By bytes, not by `str` slices: a multi-byte character (which can
    // pass the CRC of a deliberately edited file) must be an error, not a
    // slice across a character boundary.
    let digit = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let bytes: Vec<u8> = s
        .as_bytes()
        .chunks_exact(2)
        .map(|pair| match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
            _ => Err(format!("invalid hex byte {:?}", String::from_utf8_lossy(pair))),
        })
        .collect::<Result<_, _>>()?;
    // SAFETY: the length matches and `KvmPod` types accept any bit pattern.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

mod raw {
    use super::{KvmPod, from_hex, to_hex};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: KvmPod, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(v))
    }

    pub fn deserialize<'de, T: KvmPod, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let s = String::deserialize(d)?;
        from_hex(&s).map_err(serde::de::Error::custom)
    }
}

pub(crate) mod raw_vec {
    use super::{KvmPod, from_hex, to_hex};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: KvmPod, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(to_hex))
    }

    pub fn deserialize<'de, T: KvmPod, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter().map(|s| from_hex(s).map_err(serde::de::Error::custom)).collect()
    }
}

pub(crate) mod raw_opt {
    use super::{KvmPod, from_hex, to_hex};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: KvmPod, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&to_hex(v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: KvmPod, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| from_hex(&s).map_err(serde::de::Error::custom)).transpose()
    }
}

pub(super) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm { what, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// Reads MSRs one batch at a time, skipping any the vCPU refuses (KVM stops
/// at the first unreadable index and returns how many it read).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else { break };
        let n = vcpu.get_msrs(&mut msrs).unwrap_or(0);
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Skip the MSR that stopped the batch.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    out
}

/// Writes MSRs in batches, skipping any the vCPU refuses (KVM stops at the
/// first MSR it cannot set and returns how many it set).
fn restore_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) {
    let mut rest = msrs;
    let mut refused = Vec::new();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let Ok(batch) = Msrs::from_entries(&entries) else { break };
        let n = vcpu.set_msrs(&batch).unwrap_or(0);
        if let Some(&(index, _)) = rest.get(n) {
            refused.push(index);
        }
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    if !refused.is_empty() {
        log::warn!("KVM refused to restore MSRs {refused:x?}; the guest continues with their reset values");
    }
}

impl VcpuState {
    /// Reads the state of a stopped vCPU; its LAPIC too when the VM has an
    /// in-kernel irqchip (`irqchip`).
    ///
    /// # Errors
    /// [`SnapshotError::Kvm`] when a mandatory read fails.
    pub fn save(kvm: &Kvm, vcpu: &VcpuFd, irqchip: bool) -> Result<Self, SnapshotError> {
        let lapic = if irqchip { Some(vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?) } else { None };
        let indices: Vec<u32> = kvm.get_msr_index_list().map(|l| l.as_slice().to_vec()).unwrap_or_default();
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
            xsave: vcpu.get_xsave().ok(),
            xcrs: vcpu.get_xcrs().ok(),
            msrs: read_msrs(vcpu, &indices),
            events: vcpu.get_vcpu_events().ok(),
            mp_state: vcpu.get_mp_state().ok(),
            lapic,
            cpuid: vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map(|c| c.as_slice().to_vec()).map_err(kvm_err("KVM_GET_CPUID2"))?,
        })
    }

    /// The saved CPUID, for [`crate::vcpu::create_with_cpuid`].
    ///
    /// # Errors
    /// [`SnapshotError::Corrupt`] when it has too many entries.
    pub fn cpuid(&self) -> Result<kvm_bindings::CpuId, SnapshotError> {
        kvm_bindings::CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::Corrupt("too many CPUID entries".into()))
    }

    /// Writes the state into a fresh vCPU (of a VM with an in-kernel
    /// irqchip when the state holds a LAPIC).
    ///
    /// # Errors
    /// [`SnapshotError::Kvm`] when KVM refuses a part.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        vcpu.set_sregs(&self.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        match &self.xsave {
            // SAFETY: the XSAVE area came from KVM_GET_XSAVE on a vCPU of
            // the same host kind; KVM validates its contents.
            Some(xsave) => unsafe { vcpu.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?,
            None => vcpu.set_fpu(&self.fpu).map_err(kvm_err("KVM_SET_FPU"))?,
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        // After the special registers (the APIC base) and before the MSRs
        // (the TSC deadline timer needs the LAPIC's mode).
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }
        restore_msrs(vcpu, &self.msrs);
        if let Some(events) = &self.events {
            vcpu.set_vcpu_events(events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        if let Some(mp) = &self.mp_state {
            vcpu.set_mp_state(*mp).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_structures_round_trip_through_hex() {
        let regs = kvm_regs { rip: 0x1234, rax: 7, rflags: 2, ..Default::default() };
        let back: kvm_regs = from_hex(&to_hex(&regs)).unwrap();
        assert_eq!((back.rip, back.rax, back.rflags), (0x1234, 7, 2));
        assert!(from_hex::<kvm_regs>("00").is_err());
        assert!(from_hex::<kvm_mp_state>("zzzzzzzz").is_err());
    }

    #[test]
    fn non_ascii_hex_is_an_error_not_a_panic() {
        // Eight bytes, the length of a kvm_mp_state's hex, but "é" is two
        // bytes: slicing by two would cut it in half.
        assert_eq!("0é00000".len(), 8);
        assert!(from_hex::<kvm_mp_state>("0é00000").is_err());
        assert!(from_hex::<kvm_mp_state>("éééé").is_err());
        assert!(from_hex::<kvm_mp_state>("+1000000").is_err(), "a sign is not a hex digit");
        let mp = kvm_mp_state { mp_state: 0x0102_0304 };
        assert_eq!(from_hex::<kvm_mp_state>(&to_hex(&mp)).unwrap().mp_state, 0x0102_0304);
    }
}
