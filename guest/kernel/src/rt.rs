//! What a freestanding Rust program must provide itself: the memory
//! primitives `core` calls, the panic handler and the unwinding personality.
//!
//! The mem* functions are written as simple byte loops that the compiler
//! must not turn back into calls to themselves; `volatile` prevents that.

use core::panic::PanicInfo;


/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; rep movs copies
    // forwards, which is correct for non-overlapping ranges. Quadwords
    // first: an emulated ring 0 runs one `rep` iteration per step, so
    // moving 8 bytes per iteration is 8 times cheaper than bytes.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            "mov rcx, {tail}",
            "rep movsb",
            tail = in(reg) n & 7,
            inout("rcx") n >> 3 => _, inout("rdi") dest => _, inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is safe when dest is below src or past its end.
        return unsafe { memcpy(dest, src, n) };
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        // SAFETY: i < n, both ranges valid per the caller; backwards copy
        // handles the overlap.
        unsafe { dest.add(i).write_volatile(src.add(i).read_volatile()) };
    }
    dest
}

/// # Safety
/// `dest` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    let byte = u64::from(c as u8);
    // SAFETY: the caller guarantees `dest` is valid for `n` bytes; quadwords
    // first, for the reason given in memcpy.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            "mov rcx, {tail}",
            "rep stosb",
            tail = in(reg) n & 7,
            inout("rcx") n >> 3 => _, inout("rdi") dest => _, in("rax") byte * 0x0101_0101_0101_0101,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both ranges.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Never called (panic=abort), but `core` references it.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // Not `{info}`: the location's line number would go through core's
    // SSE decimal formatter (see console.rs). Not `println!` either: this
    // CPU may hold the console lock already.
    use core::fmt::Write as _;
    let mut c = crate::console::Console;
    let _ = match info.location() {
        Some(l) => writeln!(c, "guest panic at {}:{}", l.file(), crate::console::Dec(u64::from(l.line()))),
        None => writeln!(c, "guest panic"),
    };
    crate::report::exit(0xdead)
}
