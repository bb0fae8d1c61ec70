//! What a trap means: the dispatcher every entry stub calls.
//!
//! The top of the trap path. The stubs in [`crate::idt`] save a
//! [`TrapFrame`] and `call trap_dispatch` by its symbol name, so the IDT
//! does not import this module (nor anything above it); this module imports
//! the pieces a trap can reach, one way: the guest-paging workloads
//! ([`crate::vm`]) first, then the task's own system calls and the end of a
//! task ([`crate::task`]). A trap from ring 0 is a kernel bug: reported, and
//! the VM ends.
//!
//! Ring 0 costs ~1 µs per instruction on the reference host, so this stays
//! one direct call from the stub with everything below it inlined.

use memvisor_user::sys::{SYS_EVENT, SYS_EXIT};

use crate::console::{Dec, Hex};
use crate::task::{Fault, TaskExit, end_task};
use crate::trap::{PAGE_FAULT, TrapFrame};
use crate::{cpu, println};

/// Called by the entry stubs (`trap_common` in `idt.rs`, which names this
/// symbol) with the frame they saved; returning resumes the trapped code
/// through that frame.
#[unsafe(no_mangle)]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    if frame.is_from_user() {
        // The guest-paging workloads resolve faults and own fork/yield.
        if frame.vector == PAGE_FAULT && crate::vm::page_fault(frame) {
            return;
        }
        let is_syscall = frame.is_syscall();
        if is_syscall && crate::vm::syscall(frame) {
            return;
        }
        if is_syscall {
            match frame.rax {
                SYS_EXIT => end_task(TaskExit::Exited(frame.rdi)),
                SYS_EVENT => {
                    // Forwarded as is; the VMM validates the event.
                    if let Some(event) = memvisor_abi::workload::Event::from_raw(frame.rdi as u32) {
                        crate::report::send(&memvisor_abi::msg::Report::Workload { event, a: frame.rsi, b: frame.rdx });
                        if event == memvisor_abi::workload::Event::ClockGap {
                            // On the console too, for VMMs that do not read
                            // reports (the migration bench's QEMU peer).
                            println!("guest: clock gap {} ns at tsc {}", Dec(frame.rsi), Hex(frame.rdx));
                        }
                        frame.rax = 0;
                    } else {
                        frame.rax = u64::MAX;
                    }
                    return;
                }
                _ => {
                    frame.rax = u64::MAX;
                    return;
                }
            }
        }
        let cr2 = if frame.vector == PAGE_FAULT { cpu::read_cr2() } else { 0 };
        end_task(TaskExit::Faulted(Fault { vector: frame.vector, error: frame.error, cr2, rip: frame.rip }));
    }
    let cr2 = cpu::read_cr2();
    println!(
        "guest: kernel exception {} error {} rip {} cr2 {} rsp {}",
        Dec(frame.vector),
        Hex(frame.error),
        Hex(frame.rip),
        Hex(cr2),
        Hex(frame.rsp)
    );
    crate::report::exit(crate::EXIT_KERNEL_FAULT)
}
