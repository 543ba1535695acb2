//! Ending the VM, and the guest's exit codes (docs/guest.md).

use super::boot;

pub const EXIT_OK: u32 = 0;
/// A workload's own checks failed.
pub const EXIT_FAIL: u32 = 1;
// 90, a CPU exception, is `arch::EXIT_EXCEPTION`: the ring-0 stub in arch/ring0.s writes it.
/// A Rust panic.
pub const EXIT_PANIC: u32 = 91;
/// Unknown workload or malformed argument.
pub const EXIT_USAGE: u32 = 92;
/// The boot info is not what docs/boot.md describes.
pub const EXIT_BAD_BOOT: u32 = 93;

/// Ends the VM with `code` (a 32-bit `out` to the exit port), and halts if quietvm does not stop at once.
/// Under `policy=kvm-lapic` it first hands quietvm the software timers' figures, which quietvm cannot
/// count itself there; under a foreign VMM (PVH entry) it ends through `pvh::end`.
pub fn exit(code: u32) -> ! {
    let report = if super::lapic::active() {
        super::soft_timers::report()
    } else {
        None
    };
    if crate::arch::pvh::booted() {
        // A foreign VMM has no report port: the launcher learns the page from the console.
        super::pvh::end(code, report);
    }
    crate::arch::outl(boot::info().exit_port, code);
    halt_forever()
}

/// Ends the VM with `EXIT_USAGE` after vCPU 0 printed `message` (every vCPU finds the same error; only
/// vCPU 0 reports it, so that the message is whole when the VM ends).
pub fn usage_error(message: core::fmt::Arguments) -> ! {
    if super::percpu::index() == 0 {
        println!("{}", message);
        exit(EXIT_USAGE)
    }
    halt_forever()
}

pub use super::hotplug::halt_forever;

/// A numeric launch argument (decimal, or hex with `0x`), `default` if absent; a malformed one ends the
/// VM with a usage error.
pub fn arg_u64(key: &str, default: u64) -> u64 {
    boot::arg_u64(key, default).unwrap_or_else(|text| {
        usage_error(format_args!(
            "guest: argument {}={} is not a number",
            key, text
        ))
    })
}
