//! The PVH entry: 32-bit protected mode to 64-bit long mode.
//!
//! The VMM enters at `pvh_start32` in 32-bit protected mode with paging off
//! and `ebx` pointing at the `hvm_start_info` (Xen `docs/misc/pvh.pandoc`).
//! This code switches to long mode with a static boot page table that
//! identity-maps the first 8 MiB with 2 MiB pages (enough for the kernel
//! image and its boot stack), then calls [`crate::kernel_main`]. Everything
//! here is data the linker fills in: no loops at ring 0, where every
//! instruction is expensive on an emulating host.

use core::arch::global_asm;

/// Size of the boot stack (the kernel stack for everything but exceptions).
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

/// The stack `pvh_start32` switches to; 16-byte aligned by `repr(align)`.
#[repr(C, align(4096))]
pub struct Stack(pub [u8; BOOT_STACK_SIZE]);

/// The boot stack, in .bss (zero by the VMM's contract that fresh RAM is zero).
#[unsafe(no_mangle)]
pub static mut BOOT_STACK: Stack = Stack([0; BOOT_STACK_SIZE]);

global_asm!(
    r#"
    .section .boot.text, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %edi              // start info → first argument of kernel_main
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax             // PAE (bit 5), OSFXSR (9), OSXMMEXCPT (10): SDM 3A §2.5
    movl %eax, %cr4
    movl $0xC0000080, %ecx       // IA32_EFER
    rdmsr
    orl $0x900, %eax             // LME (bit 8), NXE (bit 11): SDM 3A §2.2.1
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFF3, %eax       // clear EM (2) and TS (3): FPU/SSE moves allowed
    orl $0x80010023, %eax        // PG (31), WP (16), NE (5), MP (1), PE (0)
    movl %eax, %cr0
    lgdt boot_gdt_desc
    ljmp $0x08, $start64         // reload CS with the 64-bit code segment

    .code64
start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq BOOT_STACK+{stack_size}(%rip), %rsp
    movl %edi, %edi              // upper halves are undefined after the mode switch
    xorl %ebp, %ebp
    call kernel_main
2:  hlt
    jmp 2b

    .section .boot.data, "aw"
    .balign 4096
    .global boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x3        // P | RW
    .fill 511, 8, 0
    .balign 4096
boot_pdpt:
    .quad boot_pd + 0x3
    .fill 511, 8, 0
    .balign 4096
boot_pd:
    .quad 0x000000 | 0x83        // P | RW | PS: 2 MiB pages over the first 8 MiB
    .quad 0x200000 | 0x83
    .quad 0x400000 | 0x83
    .quad 0x600000 | 0x83
    .fill 508, 8, 0

    .balign 16
boot_gdt:
    .quad 0                      // null
    .quad 0x00af9a000000ffff     // 0x08: 64-bit code, DPL 0 (SDM 3A §3.4.5)
    .quad 0x00cf92000000ffff     // 0x10: data, DPL 0
boot_gdt_end:
boot_gdt_desc:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    // PVH entry note: Xen elfnote XEN_ELFNOTE_PHYS32_ENTRY (18), read by
    // linux-loader to find the 32-bit entry point.
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                      // name size ("Xen\0")
    .long 4                      // descriptor size
    .long 18                     // XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .text
    "#,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax),
);
