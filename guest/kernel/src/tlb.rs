//! TLB invalidation, local and across CPUs (shootdown).
//!
//! A CPU caches translations; when the kernel removes or restricts one
//! (unmaps a page, points it at another frame, clears W or the A bit),
//! every CPU that may hold the old translation must drop it **before** the
//! frame is reused or the restriction is relied on. The local CPU uses
//! `invlpg`; the others are told by an inter-processor interrupt and
//! acknowledge ([`shootdown`]).
//!
//! Who "may hold" it: the CPUs running in that address space now
//! ([`crate::percpu::PerCpu::current_root`]). A CPU that left the space
//! reloaded CR3, which drops every non-global translation (the kernel maps
//! no user page global), so it cannot hold one. The race with a CPU that is
//! entering the space is closed with a full barrier on both sides: the
//! entering CPU publishes its root with `xchg` before loading CR3, and
//! [`shootdown`] reads the roots after a locked instruction that follows
//! the caller's PTE store; so either the initiator sees the CPU and
//! interrupts it, or the CPU's walk sees the new PTE.
//!
//! The protocol: one shootdown at a time (a spinlock). The initiator writes
//! the request (one page, or "all"), sets the targets' bits in `PENDING`,
//! sends each a [`VECTOR`] IPI (one ICR write for "all others" when that
//! is the set), flushes locally, and spins until `PENDING` has none of the
//! targets left. Each target's handler (a 16-instruction stub, no Rust:
//! ring 0 costs ~1 µs per instruction on this project's host) flushes,
//! clears its bit with `lock btr`, and signals EOI. A CPU waiting for the
//! lock answers requests addressed to it while it waits, so two CPUs never
//! wait for each other with interrupts off.
//!
//! One page is flushed with `invlpg`, more with a CR3 reload: at ~1 µs per
//! emulated instruction a loop of `invlpg`s soon costs more than a full
//! flush (Linux's cut-off, `tlb_single_page_flush_ceiling`, is 33 pages).
//!
//! With one CPU online [`shootdown`] is a local flush and nothing else.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use memvisor_guest_mm::sync::{SpinLock, cpus_of};

use crate::percpu::{self, offsets};
use crate::{apic, io};

/// The shootdown IPI's vector.
pub const VECTOR: u8 = 0x41;
/// `REQUEST_VA` value: flush everything (reload CR3).
const FLUSH_ALL: u64 = u64::MAX;

/// The page to flush, or [`FLUSH_ALL`] (read by the stub).
#[unsafe(no_mangle)]
static TLB_REQUEST_VA: AtomicU64 = AtomicU64::new(0);
/// CPUs that have yet to acknowledge the current request (bit per CPU;
/// cleared by the stub).
#[unsafe(no_mangle)]
static TLB_PENDING: AtomicU64 = AtomicU64::new(0);
/// One shootdown at a time.
static LOCK: SpinLock<()> = SpinLock::new(());

global_asm!(
    r#"
    .global tlb_shootdown_entry
tlb_shootdown_entry:
    push rax
    push rcx
    mov rax, [rip + TLB_REQUEST_VA]
    cmp rax, -1
    je 1f
    invlpg [rax]
    jmp 2f
1:  mov rax, cr3
    mov cr3, rax
2:  mov rcx, gs:[{cpu}]
    lock btr [rip + TLB_PENDING], rcx
    inc qword ptr gs:[{ipis}]
    inc qword ptr gs:[{acked}]
    mov eax, {eoi}
    mov dword ptr [rax], 0
    pop rcx
    pop rax
    iretq
    "#,
    cpu = const offsets::CPU,
    ipis = const offsets::IPIS_RECEIVED,
    acked = const offsets::SHOOTDOWNS_ACKED,
    eoi = const apic::EOI_ADDR,
);

unsafe extern "C" {
    /// The IPI handler above, for the IDT.
    fn tlb_shootdown_entry();
}

/// The handler's address, for its IDT gate.
pub fn handler() -> u64 {
    tlb_shootdown_entry as *const () as usize as u64
}

/// Invalidates this CPU's translation of `va` (SDM Vol. 2A, INVLPG).
#[inline(always)]
pub fn invlpg(va: u64) {
    // SAFETY: invlpg only drops a TLB entry.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}

/// Drops every non-global translation of this CPU (reloads CR3).
#[inline(always)]
pub fn flush_all_local() {
    // SAFETY: reloading the current CR3 changes no mapping.
    unsafe { asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack, preserves_flags)) };
}

/// A full barrier (Linux's `smp_mb`): a locked no-op on the stack, which
/// orders the caller's earlier stores before its later loads.
#[inline(always)]
fn full_barrier() {
    // SAFETY: adds zero to the word at rsp, atomically.
    unsafe { asm!("lock or qword ptr [rsp], 0", options(preserves_flags)) };
}

/// The CPUs other than this one that run in `root` now.
fn others_in(root: u64, me: usize) -> u64 {
    let mut mask = 0;
    for cpu in cpus_of(percpu::online() & !(1 << me)) {
        if percpu::of(cpu).current_root.load(Ordering::Acquire) == root {
            mask |= 1 << cpu;
        }
    }
    mask
}

/// Answers a request addressed to this CPU while it waits with interrupts
/// off (the lock below, or its own shootdown's acks).
fn answer_own_request(me: usize) {
    if TLB_PENDING.load(Ordering::Acquire) & (1 << me) != 0 {
        let va = TLB_REQUEST_VA.load(Ordering::Acquire);
        if va == FLUSH_ALL { flush_all_local() } else { invlpg(va) }
        TLB_PENDING.fetch_and(!(1 << me), Ordering::AcqRel);
        percpu::bump(&percpu::this().shootdowns_acked, 1);
    }
}

/// What one [`shootdown`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shot {
    /// CPUs interrupted.
    pub targets: u32,
    /// TSC ticks from the request to the last acknowledgement (0 without
    /// targets).
    pub ticks: u64,
}

/// After the caller changed the PTE(s) of `pages` pages from `va` in the
/// address space `root` (removed or restricted them), makes sure no CPU
/// still uses the old translations: flushes them here if this CPU runs in
/// `root`, and interrupts every other CPU that does and waits for its
/// acknowledgement ([`shootdown_remote`]). `pages` of 1 flushes one page,
/// more a whole address space. Returns who was interrupted and how long it
/// took.
#[inline(always)]
pub fn shootdown(root: u64, va: u64, pages: u64) -> Shot {
    if !percpu::is_smp() {
        // One CPU: the flush a uniprocessor kernel does, after one load
        // and test of the online set (inlined: every emulated instruction
        // of a call would cost ~1 µs on this project's host).
        if pages == 1 { invlpg(va) } else { flush_all_local() }
        return Shot::default();
    }
    shootdown_smp(root, va, pages)
}

/// [`shootdown`] with other CPUs online.
#[inline(never)]
fn shootdown_smp(root: u64, va: u64, pages: u64) -> Shot {
    if percpu::this().current_root.load(Ordering::Relaxed) == root {
        if pages == 1 { invlpg(va) } else { flush_all_local() }
    }
    shootdown_remote(root, va, pages)
}

/// The other CPUs' half of [`shootdown`], for a caller that flushed its
/// own TLB already (page by page, say). With one CPU online: nothing.
#[inline(always)]
pub fn shootdown_remote(root: u64, va: u64, pages: u64) -> Shot {
    if !percpu::is_smp() {
        return Shot::default();
    }
    shootdown_remote_smp(root, va, pages)
}

#[inline(never)]
fn shootdown_remote_smp(root: u64, va: u64, pages: u64) -> Shot {
    let me = percpu::index();
    full_barrier();
    if others_in(root, me) == 0 {
        return Shot::default();
    }
    let _guard = LOCK.lock_with(|| answer_own_request(me));
    // Read again under the lock: a CPU may have left meanwhile.
    let targets = others_in(root, me);
    if targets == 0 {
        return Shot::default();
    }
    let t0 = io::rdtsc();
    TLB_REQUEST_VA.store(if pages == 1 { va } else { FLUSH_ALL }, Ordering::Release);
    TLB_PENDING.store(targets, Ordering::Release);
    let n = targets.count_ones();
    if targets == percpu::online() & !(1 << me) {
        apic::send_ipi_all_but_self(VECTOR);
    } else {
        for cpu in cpus_of(targets) {
            apic::send_ipi(cpu, VECTOR);
        }
    }
    while TLB_PENDING.load(Ordering::Acquire) & targets != 0 {
        core::hint::spin_loop();
    }
    let ticks = io::rdtsc().wrapping_sub(t0);
    let here = percpu::this();
    percpu::bump(&here.shootdowns_sent, 1);
    percpu::bump(&here.ipis_sent, u64::from(n));
    Shot { targets: n, ticks }
}

/// [`shootdown_remote`] of the whole address space `root`: before its
/// tables and frames go back to the allocators, no other CPU may still
/// translate through them.
pub fn shootdown_space_remote(root: u64) -> Shot {
    shootdown_remote(root, 0, u64::MAX)
}
