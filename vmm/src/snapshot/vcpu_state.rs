//! Saving and restoring a vCPU: registers, special registers, FPU/XSAVE,
//! XCRs, MSRs, pending events, MP state and, when the VM has an in-kernel
//! irqchip, the LAPIC (the PICs and IOAPIC are VM state: [`super::irqchip`]).
//! Most VMs have no in-kernel irqchip (only a virtio device makes one), and
//! then there is no LAPIC to save.
//!
//! The KVM structures are serialised by kvm-bindings' own serde support
//! (its "serde" feature: each structure as its bytes, in JSON an array of
//! numbers), except `kvm_fpu`, which kvm-bindings 0.14 leaves out (see
//! [`KvmFpuDef`]). Reading a structure back, kvm-bindings zero-pads or cuts
//! an array of the wrong length (meant for structures a newer kernel
//! grows); the CRC-32 of state.json in the manifest is what catches damage.
//!
//! What a save reads: every part KVM offers. XSAVE, XCRs, vCPU events and
//! MP state are not offered by every KVM (each has a capability, probed
//! with KVM_CHECK_EXTENSION); one this KVM does not offer is saved as
//! `None` and restored as the fresh vCPU has it. One this KVM offers but
//! fails to read makes the save fail, as does an MSR it lists but does not
//! read; a restore that KVM refuses any part of fails, naming the part
//! (for MSRs, the MSR).

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::msrs::{self, SavedMsr};
use super::{SnapshotError, kvm_err};

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (always saved; XSAVE supersedes it when present).
    #[serde(with = "KvmFpuDef")]
    pub fpu: kvm_fpu,
    /// XSAVE area; `None` where KVM lacks KVM_CAP_XSAVE.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers; `None` where KVM lacks KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// The MSRs of [`msrs::to_save`], in KVM's order.
    pub msrs: Vec<SavedMsr>,
    /// Pending exceptions, interrupts and NMIs; `None` where KVM lacks
    /// KVM_CAP_VCPU_EVENTS.
    pub events: Option<kvm_vcpu_events>,
    /// Runnable, halted, …; `None` where KVM lacks KVM_CAP_MP_STATE.
    pub mp_state: Option<kvm_mp_state>,
    /// The local APIC's registers, when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// The CPUID the vCPU had, so the restored one gets the same (and the
    /// restore skips KVM_GET_SUPPORTED_CPUID).
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState").field("rip", &self.regs.rip).field("msrs", &self.msrs.len()).finish_non_exhaustive()
    }
}

/// `kvm_fpu` field by field, for serde's remote derive: kvm-bindings 0.14
/// implements serde for the other KVM structures here but not for this one
/// (it is missing from the `serde_impls!` list of its
/// src/x86_64/serialize.rs and derives no zerocopy traits), and naming
/// the fields needs no unsafe byte copy. The layout is `struct kvm_fpu` of
/// Linux arch/x86/include/uapi/asm/kvm.h.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu")]
struct KvmFpuDef {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// Reads a part of the vCPU state that not every KVM has: `None` when KVM
/// does not offer it (`offered`, from its capability), never calling
/// `read`; an error when KVM offers it but `read` fails.
fn optional<T>(offered: bool, what: &'static str, ioctl: &'static str, read: impl FnOnce() -> Result<T, kvm_ioctls::Error>) -> Result<Option<T>, SnapshotError> {
    if !offered {
        return Ok(None);
    }
    read().map(Some).map_err(|e| SnapshotError::VcpuStateUnreadable { what, ioctl, source: std::io::Error::from_raw_os_error(e.errno()) })
}

impl VcpuState {
    /// Reads the state of a stopped vCPU; its LAPIC too when the VM has an
    /// in-kernel irqchip (`irqchip`).
    ///
    /// The capabilities are those of each ioctl's "Capability:" line in
    /// KVM api.rst (KVM_GET_XSAVE: KVM_CAP_XSAVE, KVM_GET_XCRS:
    /// KVM_CAP_XCRS, KVM_GET_VCPU_EVENTS: KVM_CAP_VCPU_EVENTS,
    /// KVM_GET_MP_STATE: KVM_CAP_MP_STATE).
    ///
    /// # Errors
    /// [`SnapshotError::Kvm`] when a read every KVM offers fails;
    /// [`SnapshotError::VcpuStateUnreadable`] when KVM offers a part but
    /// does not read it; [`SnapshotError::MsrUnreadable`].
    pub fn save(kvm: &Kvm, vcpu: &VcpuFd, irqchip: bool) -> Result<Self, SnapshotError> {
        let lapic = if irqchip { Some(vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?) } else { None };
        let listed = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let offered = |cap| kvm.check_extension(cap);
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
            xsave: optional(offered(Cap::Xsave), "XSAVE area", "KVM_GET_XSAVE", || vcpu.get_xsave())?,
            xcrs: optional(offered(Cap::Xcrs), "extended control registers", "KVM_GET_XCRS", || vcpu.get_xcrs())?,
            msrs: msrs::read(|m| vcpu.get_msrs(m), &msrs::to_save(listed.as_slice(), irqchip))?,
            events: optional(offered(Cap::VcpuEvents), "pending events", "KVM_GET_VCPU_EVENTS", || vcpu.get_vcpu_events())?,
            mp_state: optional(offered(Cap::MpState), "MP state", "KVM_GET_MP_STATE", || vcpu.get_mp_state())?,
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
    /// [`SnapshotError::Kvm`] when KVM refuses a part;
    /// [`SnapshotError::MsrRefused`] naming the first MSR it refuses.
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
        msrs::write(|m| vcpu.set_msrs(m), &self.msrs)?;
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

    /// A state with a distinctive value in every part.
    fn sample() -> VcpuState {
        let mut xsave = kvm_xsave::default();
        xsave.region[0] = 0x037f;
        xsave.region[1023] = 0xdead_beef;
        let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        xcrs.xcrs[0].value = 0x7;
        let mut events = kvm_vcpu_events::default();
        events.exception.injected = 1;
        events.exception.nr = 14;
        events.nmi.pending = 1;
        let mut lapic = kvm_lapic_state { regs: [0; 1024] };
        lapic.regs[0x80] = 0x20;
        let mut fpu = kvm_fpu { fcw: 0x037f, mxcsr: 0x1f80, last_ip: 0x1234_5678, ..Default::default() };
        fpu.xmm[15][3] = 0xab;
        fpu.fpr[7][15] = 0xcd;
        let mut sregs = kvm_sregs { cr3: 0x1000, efer: 0x500, ..Default::default() };
        sregs.cs.selector = 0x08;
        sregs.interrupt_bitmap[3] = 1 << 63;
        VcpuState {
            regs: kvm_regs { rip: 0x1234, rax: 7, rflags: 2, r15: u64::MAX, ..Default::default() },
            sregs,
            fpu,
            xsave: Some(xsave),
            xcrs: Some(xcrs),
            msrs: vec![(0x10, 0x00ca_3034_f122), (0xc000_0080, 0x500)],
            events: Some(events),
            mp_state: Some(kvm_mp_state { mp_state: 3 }),
            lapic: Some(lapic),
            cpuid: vec![kvm_cpuid_entry2 { function: 0x4000_0001, eax: 0x0100_7efb, ..Default::default() }],
        }
    }

    #[test]
    fn every_part_of_a_vcpu_state_round_trips_through_json() {
        let s = sample();
        let text = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.regs, s.regs);
        assert_eq!(back.sregs, s.sregs);
        assert_eq!(back.fpu, s.fpu);
        assert_eq!(back.xsave.as_ref().unwrap().region, s.xsave.as_ref().unwrap().region);
        assert_eq!(back.xcrs, s.xcrs);
        assert_eq!(back.msrs, s.msrs);
        assert_eq!(back.events, s.events);
        assert_eq!(back.mp_state, s.mp_state);
        assert_eq!(back.lapic.unwrap().regs, s.lapic.unwrap().regs);
        assert_eq!(back.cpuid, s.cpuid);
        assert_eq!(serde_json::to_string(&back).unwrap(), text, "and encodes the same again");
    }

    #[test]
    fn parts_kvm_does_not_offer_round_trip_as_none() {
        let s = VcpuState { xsave: None, xcrs: None, events: None, mp_state: None, lapic: None, ..sample() };
        let back: VcpuState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert!(back.xsave.is_none() && back.xcrs.is_none() && back.events.is_none() && back.mp_state.is_none() && back.lapic.is_none());
    }

    #[test]
    fn the_older_hex_encoding_is_not_read_as_a_structure() {
        // Format version 1 wrote each structure as a hex string; the
        // manifest's version check refuses such snapshots first, and the
        // structures do not parse either.
        let mut v = serde_json::to_value(sample()).unwrap();
        v["mp_state"] = serde_json::json!("03000000");
        assert!(serde_json::from_value::<VcpuState>(v).is_err());
    }

    #[test]
    fn a_part_kvm_does_not_offer_is_none_and_one_it_fails_to_read_is_an_error() {
        let never = || -> Result<u32, kvm_ioctls::Error> { panic!("not offered, so not read") };
        assert_eq!(optional(false, "XSAVE area", "KVM_GET_XSAVE", never).unwrap(), None);
        assert_eq!(optional(true, "XSAVE area", "KVM_GET_XSAVE", || Ok(5)).unwrap(), Some(5));
        let e = optional::<u32>(true, "XSAVE area", "KVM_GET_XSAVE", || Err(kvm_ioctls::Error::new(libc::EINVAL))).unwrap_err();
        assert!(matches!(e, SnapshotError::VcpuStateUnreadable { ioctl: "KVM_GET_XSAVE", .. }), "{e:?}");
        assert_eq!(e.to_string(), "KVM offers the vCPU's XSAVE area but KVM_GET_XSAVE failed");
    }

    /// Against KVM: a vCPU of a VM without an in-kernel irqchip saves no
    /// MSR_KVM_ASYNC_PF_INT, and its state restores into a new vCPU with
    /// every MSR accepted.
    #[test]
    fn a_vcpu_without_a_lapic_restores_with_every_msr_accepted() {
        let kvm = crate::vm::open_kvm().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0xfff0_1234;
        vcpu.set_regs(&regs).unwrap();
        let state = VcpuState::save(&kvm, &vcpu, false).unwrap();
        assert!(state.lapic.is_none());
        assert!(!state.msrs.is_empty());
        assert!(state.msrs.iter().all(|&(i, _)| i != msrs::MSR_KVM_ASYNC_PF_INT));
        assert!(state.xsave.is_some() == kvm.check_extension(Cap::Xsave), "saved exactly when offered");
        let state: VcpuState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        let vm2 = kvm.create_vm().unwrap();
        let vcpu2 = vm2.create_vcpu(0).unwrap();
        vcpu2.set_cpuid2(&state.cpuid().unwrap()).unwrap();
        state.restore(&vcpu2).unwrap();
        assert_eq!(vcpu2.get_regs().unwrap().rip, 0xfff0_1234);
    }
}
