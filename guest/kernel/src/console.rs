//! The serial console (COM1, a 16550 emulated by the VMM).
//!
//! Output only, and without polling the line-status register: the VMM's
//! UART accepts every byte at once, and each extra `in` would be one more
//! exit to the VMM per byte.
//!
//! Integers are printed with [`Dec`] and [`Hex`], never with `core::fmt`'s
//! own integer formatting: the precompiled `core` is built with SSE2 and its
//! decimal formatter uses `pinsrw`, which this host's ring-0 emulator
//! rejects (seen as a KVM internal error on a four-digit number).

use core::fmt;

use memvisor_abi::ports::COM1;

use memvisor_guest_mm::sync::{SpinGuard, SpinLock};

use crate::io::outb;

/// One CPU prints at a time, a whole `print!` at once, so lines from
/// several CPUs do not interleave byte by byte.
static LOCK: SpinLock<()> = SpinLock::new(());

/// Holds the console for one `print!` ([`crate::print`] takes it).
pub fn lock() -> SpinGuard<'static, ()> {
    LOCK.lock()
}

/// A `core::fmt::Write` sink for the console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                outb(COM1, b'\r');
            }
            outb(COM1, b);
        }
        Ok(())
    }
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _held = $crate::console::lock();
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _held = $crate::console::lock();
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}

/// An integer printed in decimal by the kernel's own SSE-free code.
#[derive(Debug, Clone, Copy)]
pub struct Dec(pub u64);

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut v = self.0;
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        f.write_str(core::str::from_utf8(&buf[i..]).unwrap_or("?"))
    }
}

/// An integer printed as `0x…` hexadecimal by the kernel's own code.
#[derive(Debug, Clone, Copy)]
pub struct Hex(pub u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 18];
        let mut i = buf.len();
        let mut v = self.0;
        loop {
            i -= 1;
            buf[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        i -= 2;
        buf[i] = b'0';
        buf[i + 1] = b'x';
        f.write_str(core::str::from_utf8(&buf[i..]).unwrap_or("?"))
    }
}
