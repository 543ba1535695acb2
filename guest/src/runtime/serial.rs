//! The console: the 16550 UART's transmit register, one `out` per byte (quietvm's UART needs no
//! polling). A lock keeps lines whole; it is taken with the doorbell masked, as callbacks print too.

use super::boot;
use super::sync::SpinLock;
use core::fmt::{self, Write};

static LOCK: SpinLock<()> = SpinLock::new(());

struct Uart(u16);

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            crate::arch::outb(self.0, byte);
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn print_args(args: fmt::Arguments) {
    let _guard = LOCK.lock();
    let _ = Uart(boot::info().serial_port).write_fmt(args);
}

/// Writes to the serial console, whole even when several vCPUs print at once.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::runtime::serial::print_args(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::runtime::serial::print_args(format_args!("{}\n", format_args!($($arg)*))) };
}
