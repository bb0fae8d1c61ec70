//! A hand-assembled micro guest that writes pages on command, for the dirty
//! benchmarks and tests: it needs no kernel, so it measures KVM and the VMM
//! rather than a guest's own code.
//!
//! The guest runs in 32-bit protected mode with paging off (the PVH entry
//! state). Each pass reads `(first address, count, stride)` from a parameter
//! block, writes one dword to `count` addresses, stops with `out 0x80, al`
//! and, when resumed, starts the next pass.

use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::config::{Backing, VmConfig};
use crate::dirty::{DirtyMode, DirtyTracker};
use crate::memory::GuestRam;
use crate::vm::{Vm, open_kvm};
use crate::vmm::VmmError;

/// Where the code lives (guest-physical).
pub const CODE: u64 = 0x1000;
/// Where the pass parameters live: first address, count, stride (u32 each).
pub const PARAMS: u64 = 0x800;
/// The port the guest writes after each pass.
pub const PASS_PORT: u16 = 0x80;
/// First page the benchmark dirties (above code and parameters).
pub const FIRST_DATA_PAGE: u64 = 16;

/// The pass loop (32-bit code, Intel SDM Vol. 2 encodings):
/// ```text
/// start: mov eax, [0x800]      A1 00 08 00 00
///        mov ecx, [0x804]      8B 0D 04 08 00 00
///        mov edx, [0x808]      8B 15 08 08 00 00
/// loop:  mov [eax], eax        89 00
///        add eax, edx          01 D0
///        dec ecx               49
///        jnz loop              75 F9
///        out 0x80, al          E6 80
///        jmp start             EB E4
/// ```
pub const PASS_CODE: [u8; 28] = [
    0xA1, 0x00, 0x08, 0x00, 0x00, 0x8B, 0x0D, 0x04, 0x08, 0x00, 0x00, 0x8B, 0x15, 0x08, 0x08, 0x00, 0x00, 0x89, 0x00, 0x01, 0xD0, 0x49, 0x75,
    0xF9, 0xE6, 0x80, 0xEB, 0xE4,
];

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
    params: [u32; 3],
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
        let vcpu = crate::vcpu::create_pvh(&vm, 0, CODE, 0)?;
        tracker.attach_vcpu(&vcpu, 0)?;
        vm.ram().memory().write_slice(&PASS_CODE, GuestAddress(CODE)).map_err(|e| VmmError::Boot(crate::boot::BootError::WriteMemory(e.to_string())))?;
        Ok(PageWriter { vm, vcpu, tracker, params: [0; 3] })
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
        let params = [(first << 12) as u32, count, (stride << 12) as u32];
        if params != self.params {
            let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.vm.ram().memory().write_slice(&bytes, GuestAddress(PARAMS)).map_err(|e| VmmError::Boot(crate::boot::BootError::WriteMemory(e.to_string())))?;
            self.params = params;
        }
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
