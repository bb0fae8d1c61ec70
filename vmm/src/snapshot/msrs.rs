//! A vCPU's model-specific registers in a snapshot: which ones to save,
//! and reading and writing them, where an MSR KVM will not read or write
//! is an error naming it.
//!
//! KVM_GET_MSRS and KVM_SET_MSRS go through the entries in order, stop at
//! the first MSR they cannot read or write, and return how many they did
//! (KVM api.rst, 4.18 KVM_GET_MSRS and 4.19 KVM_SET_MSRS: "Returns: number
//! of msrs successfully returned/set"; `__msr_io` in Linux
//! arch/x86/kvm/x86.c). A count short of the batch therefore names the
//! refused MSR: the entry at that position.
//!
//! The ioctls are passed in as functions, so that the bookkeeping around
//! them is tested without KVM.

use kvm_bindings::{KVM_MAX_MSR_ENTRIES, Msrs, kvm_msr_entry};

use super::{SnapshotError, kvm_err};

/// `MSR_KVM_ASYNC_PF_INT` (Linux arch/x86/include/uapi/asm/kvm_para.h):
/// the interrupt vector of asynchronous page-fault "page ready"
/// notifications (Documentation/virt/kvm/x86/msr.rst).
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;

/// One saved MSR: index and value.
pub type SavedMsr = (u32, u64);

/// The MSRs to save, in the order KVM lists them (`listed`, from
/// KVM_GET_MSR_INDEX_LIST), less those that hold no state in this VM.
///
/// There is one such MSR: [`MSR_KVM_ASYNC_PF_INT`] when the vCPU has no
/// in-kernel LAPIC (`lapic` false). KVM then refuses every write to it,
/// the guest's WRMSR as well as the host's KVM_SET_MSRS:
/// `kvm_pv_enable_async_pf_int` (Linux arch/x86/kvm/x86.c) returns 1 when
/// `!lapic_in_kernel(vcpu)`, whatever the value. So it always reads as its
/// reset value 0, there is nothing to save, and restoring it is refused
/// (memvisor logged a warning about it on every restore of such a VM).
#[must_use]
pub fn to_save(listed: &[u32], lapic: bool) -> Vec<u32> {
    listed.iter().copied().filter(|&index| lapic || index != MSR_KVM_ASYNC_PF_INT).collect()
}

/// Reads the MSRs `indices` through `get` (KVM_GET_MSRS), in batches of
/// at most [`KVM_MAX_MSR_ENTRIES`] (the most one `Msrs` holds).
///
/// # Errors
/// [`SnapshotError::Kvm`] when the ioctl fails;
/// [`SnapshotError::MsrUnreadable`] naming the first MSR it did not read.
pub fn read(mut get: impl FnMut(&mut Msrs) -> Result<usize, kvm_ioctls::Error>, indices: &[u32]) -> Result<Vec<SavedMsr>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    for batch in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).expect("a batch of at most KVM_MAX_MSR_ENTRIES fits an Msrs");
        let n = get(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if let Some(&index) = batch.get(n) {
            return Err(SnapshotError::MsrUnreadable { index });
        }
        out.extend(msrs.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(out)
}

/// Writes `msrs` in order through `set` (KVM_SET_MSRS), in batches of at
/// most [`KVM_MAX_MSR_ENTRIES`].
///
/// # Errors
/// [`SnapshotError::Kvm`] when the ioctl fails;
/// [`SnapshotError::MsrRefused`] naming the first MSR KVM did not set
/// (those after it are not written).
pub fn write(mut set: impl FnMut(&Msrs) -> Result<usize, kvm_ioctls::Error>, msrs: &[SavedMsr]) -> Result<(), SnapshotError> {
    for batch in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = batch.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).expect("a batch of at most KVM_MAX_MSR_ENTRIES fits an Msrs");
        let n = set(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if let Some(&(index, value)) = batch.get(n) {
            return Err(SnapshotError::MsrRefused { index, value });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A KVM_SET_MSRS stand-in that sets entries until it meets `refused`,
    /// recording what it set.
    fn refusing(refused: u32, set: &mut Vec<SavedMsr>) -> impl FnMut(&Msrs) -> Result<usize, kvm_ioctls::Error> + '_ {
        move |msrs| {
            let n = msrs.as_slice().iter().take_while(|e| e.index != refused).count();
            set.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            Ok(n)
        }
    }

    #[test]
    fn a_refused_msr_is_an_error_naming_it() {
        let saved = [(0x10, 1), (0x4b56_4d06, 0), (0x174, 2)];
        let mut set = Vec::new();
        let e = write(refusing(0x4b56_4d06, &mut set), &saved).unwrap_err();
        assert!(matches!(e, SnapshotError::MsrRefused { index: 0x4b56_4d06, value: 0 }), "{e:?}");
        assert_eq!(e.to_string(), "KVM refused to restore MSR 0x4b564d06 (value 0x0)");
        assert_eq!(set, [(0x10, 1)], "KVM stopped at the refused MSR");
        let mut set = Vec::new();
        write(refusing(0x999, &mut set), &saved).unwrap();
        assert_eq!(set, saved, "every MSR accepted, in order");
    }

    #[test]
    fn a_refusal_in_a_later_batch_names_the_right_msr() {
        let saved: Vec<SavedMsr> = (0..600).map(|i| (i, u64::from(i) * 3)).collect();
        let mut set = Vec::new();
        let e = write(refusing(300, &mut set), &saved).unwrap_err();
        assert!(matches!(e, SnapshotError::MsrRefused { index: 300, value: 900 }), "{e:?}");
        assert_eq!(set.len(), 300, "the first batch whole, the second up to the refused MSR");
    }

    #[test]
    fn msrs_are_read_in_batches_and_an_unread_one_is_an_error() {
        let indices: Vec<u32> = (0..600).collect();
        let mut calls = 0;
        let got = read(
            |m| {
                calls += 1;
                for e in m.as_mut_slice() {
                    e.data = u64::from(e.index) + 7;
                }
                Ok(m.as_slice().len())
            },
            &indices,
        )
        .unwrap();
        assert_eq!(calls, 3, "600 MSRs in batches of {KVM_MAX_MSR_ENTRIES}");
        assert_eq!(got.len(), 600);
        assert!(got.iter().all(|&(i, d)| d == u64::from(i) + 7));
        let e = read(|m| Ok(m.as_slice().iter().take_while(|e| e.index != 0x3a).count()), &[0x10, 0x3a, 0x174]).unwrap_err();
        assert!(matches!(e, SnapshotError::MsrUnreadable { index: 0x3a }), "{e:?}");
    }

    #[test]
    fn async_pf_int_is_saved_only_with_an_in_kernel_lapic() {
        let listed = [0x10, MSR_KVM_ASYNC_PF_INT, 0x174];
        assert_eq!(to_save(&listed, false), [0x10, 0x174]);
        assert_eq!(to_save(&listed, true), listed);
    }

    /// What [`to_save`] relies on, asked of the running kernel: without an
    /// in-kernel LAPIC KVM_SET_MSRS refuses MSR_KVM_ASYNC_PF_INT even at
    /// its reset value (this is the refusal memvisor used to log on every
    /// restore); with one, it takes it.
    #[test]
    fn kvm_refuses_async_pf_int_without_an_in_kernel_lapic() {
        let kvm = crate::vm::open_kvm().unwrap();
        let reset = [(MSR_KVM_ASYNC_PF_INT, 0)];
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        assert_eq!(read(|m| vcpu.get_msrs(m), &[MSR_KVM_ASYNC_PF_INT]).unwrap(), reset, "it reads, as its reset value");
        let e = write(|m| vcpu.set_msrs(m), &reset).unwrap_err();
        assert!(matches!(e, SnapshotError::MsrRefused { index: MSR_KVM_ASYNC_PF_INT, .. }), "{e:?}");

        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        write(|m| vcpu.set_msrs(m), &reset).unwrap();
    }
}
