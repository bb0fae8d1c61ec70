//! memvisor's tiny guest kernel.
//!
//! Entered the PVH way (see [`boot`]), it builds its own address space
//! ([`paging`]), descriptor tables ([`gdt`], [`idt`]) and frame allocator
//! ([`frames`]), reports `Ready`, runs the self-test as ring-3 tasks
//! ([`task`], [`selftest`]; traps go to [`dispatch`]) and exits (or idles)
//! with the result. It reports to the VMM through the ABI in `memvisor-abi`.
//!
//! Ring 0 is expensive on the reference host (every instruction emulated,
//! ~0.7 µs), so the path from entry to `Ready` is kept to a few thousand
//! instructions: no console output, O(blocks) allocator set-up, only the
//! IDT gates in use, no clearing of fresh RAM (zero by the VMM's contract).
#![no_std]
#![no_main]

mod apic;
mod boot;
mod bootinfo;
mod console;
mod cpu;
mod dispatch;
mod drivers;
mod frames;
mod gdt;
mod idt;
mod io;
mod paging;
mod percpu;
mod report;
mod rt;
mod selftest;
mod smp;
mod task;
mod tlb;
mod trap;
mod translation;
mod vm;
mod workload;

use memvisor_abi::boot::{FLAG_IDLE_AT_END, FLAG_SKIP_SELFTEST, FLAG_SYSCALL_INSN};
use memvisor_abi::msg::Report;
use memvisor_guest_mm::buddy::Buddy;
use memvisor_guest_mm::paging::{MapError, Mapper, PageSize, PhysAddr};

use crate::console::{Dec, Hex};
use crate::frames::IdentityTables;
use crate::paging::KernelMapper;

/// Exit status: every check passed.
const EXIT_OK: u32 = 0;
/// Exit status: a self-test check failed.
const EXIT_CHECK_FAILED: u32 = 1;
/// Exit status: the kernel could not set itself up.
const EXIT_SETUP_FAILED: u32 = 2;
/// Exit status: an exception in the kernel itself.
pub const EXIT_KERNEL_FAULT: u32 = 3;

/// The kernel's state after boot.
pub struct Kernel {
    /// Builds page tables, from the arena's pool.
    pub mapper: KernelMapper,
    /// Free frames.
    buddy: Buddy<'static>,
    /// The kernel's PML4.
    pub root: PhysAddr,
    /// Leaf size for RAM mappings, after any fallback.
    pub leaf: PageSize,
    /// Whether ring 3 enters the kernel with `syscall`.
    pub syscall_insn: bool,
    /// TSC ticks the self-test's RAM task ran.
    pub selftest_ram_tsc: u64,
    /// The virtio-mmio devices the command line announced (drivers look
    /// for their device among them).
    pub virtio_mmio: bootinfo::VirtioMmioList,
}

impl Kernel {
    /// The frame allocator.
    pub fn buddy(&mut self) -> &mut Buddy<'static> {
        &mut self.buddy
    }

    /// A block of 2^order fresh frames.
    pub fn frames_alloc(&mut self, order: usize) -> Option<u64> {
        self.buddy.alloc(order)
    }
}

/// The first Rust code: called by the PVH entry in long mode with the boot
/// page tables, on the boot stack, with the start-info address.
#[unsafe(no_mangle)]
pub extern "C" fn kernel_main(start_info: u64) -> ! {
    // SAFETY: the boot CPU, first thing: reports go out of its per-CPU block.
    unsafe { percpu::init(0, gdt::boot_syscall_stack_top()) };
    percpu::set_online();
    report::send(&Report::Hello { tsc: io::rdtsc() });
    // SAFETY: start_info is what the PVH entry got in ebx; the boot tables
    // identity-map the low memory it and its data are in.
    let info = unsafe { bootinfo::read(start_info) };
    if info.test_hook == bootinfo::TestHook::TripleFault {
        idt::triple_fault();
    }
    let config = info.config;
    let has_1g = cpu::has_1g_pages();
    let mut leaf = PageSize::from_shift(config.guest_page_shift).unwrap_or(PageSize::Size2M);
    let fell_back = leaf == PageSize::Size1G && !has_1g;
    if fell_back {
        leaf = PageSize::Size2M;
    }
    let frames = match frames::init(&info) {
        Ok(f) => f,
        Err(frames::FramesError::NoRoomForArena) => {
            println!("guest: no RAM range below 1 GiB holds the kernel arena");
            report::exit(EXIT_SETUP_FAILED)
        }
    };
    let mut mapper = Mapper::new(IdentityTables, frames.pool);
    let root = match paging::build_kernel_space(&mut mapper, &info, frames.arena, leaf) {
        Ok(r) => r,
        Err(e) => {
            println!("guest: cannot build the kernel page tables: {}", MapErrorText(e));
            report::exit(EXIT_SETUP_FAILED)
        }
    };
    // SAFETY: the new tables map the kernel image with its permissions, the
    // boot stack (.bss) and the arena: everything used next (the boot data
    // was copied into `info`).
    unsafe { cpu::write_cr3(root.as_u64()) };
    task::set_kernel_root(root);
    // SAFETY: once, at ring 0, on the boot path; GDT before IDT.
    unsafe {
        gdt::init();
        idt::init();
    }
    let syscall_insn = config.flags & FLAG_SYSCALL_INSN != 0;
    if syscall_insn {
        // SAFETY: once, at ring 0, after the GDT.
        unsafe { idt::enable_syscall() };
    }
    if info.test_hook == bootinfo::TestHook::KernelFault {
        // SAFETY: deliberately faulting: low memory below the kernel is
        // unmapped after the switch; the #PF handler reports and ends the VM.
        let _ = unsafe { (memvisor_abi::layout::PAGE_SIZE as *const u64).read_volatile() };
    }
    let mut k = Kernel { mapper, buddy: frames.buddy, root, leaf, syscall_insn, selftest_ram_tsc: 0, virtio_mmio: info.virtio_mmio };
    if info.test_hook == bootinfo::TestHook::BadTables {
        paging::plant_bad_entries(&mut k.mapper, root);
    }
    report::send(&Report::Ready { tsc: io::rdtsc(), page_shift: leaf.shift(), has_1g_pages: has_1g });

    if fell_back {
        // After Ready: each console byte is an exit (~30 µs).
        println!("guest: CPU lacks 1 GiB pages (CPUID 8000_0001h EDX[26]); using 2 MiB");
    }
    let managed = k.buddy.managed_bytes();
    report::send(&Report::Frames { ram_bytes: frames.ram_bytes, managed_bytes: managed, free_bytes: k.buddy.free_bytes() });
    if let Err(e) = smp::start_aps(&mut k, config.cpu_count(), config.tsc_khz) {
        match e {
            smp::SmpError::NoMemory => println!("guest: no arena frames to start the other CPUs"),
            smp::SmpError::Refused(cpu, status) => println!("guest: the VMM refused to start CPU {} (status {})", Dec(u64::from(cpu)), Dec(u64::from(status))),
        }
        report::exit(EXIT_SETUP_FAILED)
    }
    let status = if config.flags & FLAG_SKIP_SELFTEST != 0 {
        EXIT_OK
    } else {
        match selftest::run(&mut k) {
            Ok(true) => EXIT_OK,
            Ok(false) => EXIT_CHECK_FAILED,
            Err(e) => {
                println!("guest: self-test set-up failed: {}", MapErrorText(e));
                EXIT_SETUP_FAILED
            }
        }
    };
    let status = if status == EXIT_OK {
        let image = frames::kernel_image();
        let regions = [(image.0, image.1 - image.0), (frames.arena.0, frames.arena.1 - frames.arena.0)];
        workload::run(&mut k, &config.workload, config.tsc_khz, &regions)
    } else {
        status
    };
    smp::report_stats();
    let stats = k.mapper.stats;
    report::send(&Report::PageTables { table_pages: stats.table_pages, leaves: stats.leaves });
    if config.flags & FLAG_SKIP_SELFTEST == 0 && config.tsc_khz != 0 {
        println!("guest: self-test RAM task {} ms", Dec(k.selftest_ram_tsc / config.tsc_khz));
    }
    if config.flags & FLAG_IDLE_AT_END != 0 {
        report::send(&Report::Idle { status });
        cpu::halt_forever()
    }
    report::exit(status)
}

/// A [`MapError`] printed without `core::fmt` integer formatting.
struct MapErrorText(MapError);

impl core::fmt::Display for MapErrorText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            MapError::Misaligned => f.write_str("address or length not page-aligned"),
            MapError::OutOfFrames => f.write_str("no frames left for page tables"),
            MapError::HugePageInTheWay(va) => write!(f, "a huge page already maps {}", Hex(va.as_u64())),
            MapError::AlreadyMapped(va) => write!(f, "{} is already mapped", Hex(va.as_u64())),
        }
    }
}
