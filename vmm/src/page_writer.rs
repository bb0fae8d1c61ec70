//! A hand-assembled micro guest that writes pages on command, for the dirty
//! benchmarks and tests: it needs no kernel, so it measures KVM and the VMM
//! rather than a guest's own code.
//!
//! The guest runs in 32-bit protected mode with paging off (the PVH entry
//! state). Each pass reads its parameters from a parameter block, writes
//! one dword to each of `count` pages, stops with `out 0x80, al` and, when
//! resumed, starts the next pass. A pass writes its pages in ascending
//! order ([`PageWriter::pass`]) or in a scattered order
//! ([`PageWriter::pass_scattered`]), which the dirty ring sees out of order.

use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::config::{Backing, VmConfig};
use crate::dirty::{DirtyMode, DirtyTracker};
use crate::memory::GuestRam;
use crate::vm::{Vm, open_kvm};
use crate::machine::VmmError;

/// Where the code lives (guest-physical).
pub const CODE: u64 = 0x1000;
/// Where the pass parameters live (u32 each): first address, count,
/// stride in bytes, the loop to run (its address), span in bytes.
pub const PARAMS: u64 = 0x800;
/// The port the guest writes after each pass.
pub const PASS_PORT: u16 = 0x80;
/// First page the benchmark dirties (above code and parameters).
pub const FIRST_DATA_PAGE: u64 = 16;
/// The ascending loop: `asc` in [`PASS_CODE`].
const ASCENDING: u32 = CODE as u32 + 6;
/// The scattered loop: `mod` in [`PASS_CODE`].
const SCATTERED: u32 = CODE as u32 + 34;

/// The pass loops (32-bit code, Intel SDM Vol. 2 encodings; byte offsets
/// on the left):
/// ```text
///  0 start: jmp dword [0x80c]       FF 25 0C 08 00 00
///  6 asc:   mov eax, [0x800]        A1 00 08 00 00
/// 11        mov ecx, [0x804]        8B 0D 04 08 00 00
/// 17        mov edx, [0x808]        8B 15 08 08 00 00
/// 23 aloop: mov [eax], eax          89 00
/// 25        add eax, edx            01 D0
/// 27        dec ecx                 49
/// 28        jnz aloop               75 F9
/// 30        out 0x80, al            E6 80
/// 32        jmp start               EB DE
/// 34 mod:   mov esi, [0x800]        8B 35 00 08 00 00
/// 40        mov ecx, [0x804]        8B 0D 04 08 00 00
/// 46        mov edx, [0x808]        8B 15 08 08 00 00
/// 52        mov ebx, [0x810]        8B 1D 10 08 00 00
/// 58        xor eax, eax            31 C0
/// 60 mloop: mov [esi+eax], eax      89 04 06
/// 63        add eax, edx            01 D0
/// 65        cmp eax, ebx            39 D8
/// 67        jb skip                 72 02
/// 69        sub eax, ebx            29 D8
/// 71 skip:  dec ecx                 49
/// 72        jnz mloop               75 F2
/// 74        out 0x80, al            E6 80
/// 76        jmp start               EB B2
/// ```
pub const PASS_CODE: [u8; 78] = [
    0xFF, 0x25, 0x0C, 0x08, 0x00, 0x00, // start
    0xA1, 0x00, 0x08, 0x00, 0x00, 0x8B, 0x0D, 0x04, 0x08, 0x00, 0x00, 0x8B, 0x15, 0x08, 0x08, 0x00, 0x00, // asc
    0x89, 0x00, 0x01, 0xD0, 0x49, 0x75, 0xF9, 0xE6, 0x80, 0xEB, 0xDE, // aloop
    0x8B, 0x35, 0x00, 0x08, 0x00, 0x00, 0x8B, 0x0D, 0x04, 0x08, 0x00, 0x00, 0x8B, 0x15, 0x08, 0x08, 0x00, 0x00, 0x8B, 0x1D, 0x10, 0x08, 0x00, 0x00,
    0x31, 0xC0, // mod
    0x89, 0x04, 0x06, 0x01, 0xD0, 0x39, 0xD8, 0x72, 0x02, 0x29, 0xD8, 0x49, 0x75, 0xF2, 0xE6, 0x80, 0xEB, 0xB2, // mloop
];

/// The pages a scattered pass writes, in order: page
/// `first + stride × (i × step mod count)` for `i` in `0..count`, the same
/// set as an ascending pass when `step` and `count` are coprime.
#[must_use]
pub fn scattered_order(first: u64, count: u64, stride: u64, step: u64) -> Vec<u64> {
    (0..count).map(|i| first + stride * ((i * step) % count)).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A step coprime to `count` near `count` × 0.618 (consecutive writes
/// land far apart), for [`PageWriter::pass_scattered`].
#[must_use]
pub fn scatter_step(count: u64) -> u64 {
    let mut step = (count * 618 / 1000).max(1);
    while gcd(step, count) != 1 {
        step += 1;
    }
    step
}

/// A VM running the page writer, with a dirty tracker.
#[derive(Debug)]
pub struct PageWriter {
    /// The VM.
    pub vm: Vm,
    /// Its vCPU.
    pub vcpu: VcpuFd,
    /// Dirty tracking, prepared (not started).
    pub tracker: DirtyTracker,
    /// The parameters in guest memory, so they are written (a VMM write)
    /// only when they change.
    params: [u32; 5],
}

impl PageWriter {
    /// A VM of `mem_size` bytes (below the MMIO hole) with the page writer
    /// loaded and `mode` prepared.
    ///
    /// # Errors
    /// [`VmmError`] when KVM or memory set-up fails.
    pub fn new(mem_size: u64, backing: Backing, mode: DirtyMode) -> Result<Self, VmmError> {
        let config = VmConfig { mem_size, backing, ..VmConfig::default() };
        config.validate().map_err(|e| VmmError::Boot(crate::boot::BootError::Load(e.to_string())))?;
        let ram = GuestRam::new(&config)?;
        let vm = Vm::new(open_kvm()?, ram)?;
        let mut tracker = DirtyTracker::prepare(vm.fd(), vm.ram(), Some(mode))?;
        let vcpu = crate::vcpu::create_pvh(&vm, 0, 1, CODE, 0)?;
        tracker.attach_vcpu(&vcpu, 0)?;
        vm.ram().memory().write_slice(&PASS_CODE, GuestAddress(CODE)).map_err(|e| VmmError::Boot(crate::boot::BootError::WriteMemory(e.to_string())))?;
        let mut w = PageWriter { vm, vcpu, tracker, params: [0; 5] };
        // The first pass starts at `start`, which jumps through the
        // parameter block: it must name a loop before the vCPU first runs.
        w.set_params([0, 0, 0, ASCENDING, 0])?;
        Ok(w)
    }

    fn set_params(&mut self, params: [u32; 5]) -> Result<(), VmmError> {
        if params != self.params {
            let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.vm.ram().memory().write_slice(&bytes, GuestAddress(PARAMS)).map_err(|e| VmmError::Boot(crate::boot::BootError::WriteMemory(e.to_string())))?;
            self.params = params;
        }
        Ok(())
    }

    /// Runs one pass writing the pages of [`pass`](Self::pass)`(first,
    /// count, stride)` in the order of [`scattered_order`] with `step`;
    /// returns how long the vCPU ran.
    ///
    /// # Errors
    /// [`VmmError`] when `step` and `count` are not coprime (some pages
    /// would be written twice and others never), when the pass does not fit
    /// the guest's 32-bit addresses, on a KVM failure or an unexpected exit.
    pub fn pass_scattered(&mut self, first: u64, count: u32, stride: u64, step: u64) -> Result<Duration, VmmError> {
        if count == 0 {
            return Ok(Duration::ZERO);
        }
        let bad = |what: &str| VmmError::Boot(crate::boot::BootError::Load(format!("scattered pass: {what}")));
        if gcd(step, u64::from(count)) != 1 {
            return Err(bad("step and count must be coprime"));
        }
        let fit = |v: u64| u32::try_from(v).map_err(|_| bad("pages beyond 4 GiB"));
        let span = fit(u64::from(count) * stride * 4096)?;
        let params = [fit(first << 12)?, count, fit(step * stride * 4096)?, SCATTERED, span];
        fit((first << 12) + u64::from(span))?;
        self.set_params(params)?;
        self.run_pass()
    }

    /// Runs one pass writing `count` pages from page `first`, every
    /// `stride` pages; returns how long the vCPU ran.
    ///
    /// # Errors
    /// [`VmmError`] on a KVM failure or an unexpected exit.
    pub fn pass(&mut self, first: u64, count: u32, stride: u64) -> Result<Duration, VmmError> {
        if count == 0 {
            return Ok(Duration::ZERO);
        }
        self.set_params([(first << 12) as u32, count, (stride << 12) as u32, ASCENDING, 0])?;
        self.run_pass()
    }

    fn run_pass(&mut self) -> Result<Duration, VmmError> {
        let start = Instant::now();
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(PASS_PORT, _)) => return Ok(start.elapsed()),
                Ok(VcpuExit::Unsupported(31)) => {
                    self.tracker.on_ring_full(self.vm.fd())?;
                }
                Ok(other) => {
                    return Err(VmmError::GuestFailed { what: format!("unexpected exit {other:?}"), regs: Box::new(crate::vcpu::RegisterDump::read(&self.vcpu)) });
                }
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(VmmError::Run(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scattered_pass_writes_the_ascending_set_out_of_order() {
        for count in [1u64, 2, 10, 262, 2621, 4096] {
            let step = scatter_step(count);
            assert_eq!(gcd(step, count), 1);
            let order = scattered_order(16, count, 3, step);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..count).map(|i| 16 + 3 * i).collect::<Vec<_>>(), "count {count}");
            if count > 2 {
                assert!(order.windows(2).any(|w| w[1] < w[0]), "count {count}: out of order");
            }
        }
    }

    #[test]
    fn the_pass_code_jumps_land_on_their_labels() {
        // rel8 jumps: target = offset of the next instruction + rel8.
        let target = |at: usize| (at as i64 + 2 + i64::from(PASS_CODE[at + 1] as i8)) as u64;
        assert_eq!(target(28), 23, "jnz aloop");
        assert_eq!(target(32), 0, "jmp start");
        assert_eq!(target(67), 71, "jb skip");
        assert_eq!(target(72), 60, "jnz mloop");
        assert_eq!(target(76), 0, "jmp start");
        assert_eq!(u64::from(ASCENDING) - CODE, 6);
        assert_eq!(u64::from(SCATTERED) - CODE, 34);
        assert_eq!(&PASS_CODE[6..7], &[0xA1]);
        assert_eq!(&PASS_CODE[34..36], &[0x8B, 0x35]);
    }
}
