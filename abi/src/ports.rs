//! The I/O ports quietvm emulates (docs/boot.md, "Devices"). The boot info also carries each of them
//! ([`crate::boot::BootInfo`]), and a guest should take them from there.

/// Base of the 16550 UART (the serial console); it has [`SERIAL_PORT_COUNT`] registers.
pub const SERIAL_PORT: u16 = 0x3f8;
/// The number of the UART's ports, from [`SERIAL_PORT`] up.
pub const SERIAL_PORT_COUNT: u16 = 8;
/// The debug exit: a 32-bit `out` of `v` ends the VM with exit code `v` (docs/boot.md).
pub const EXIT_PORT: u16 = 0x510;
/// The timer device's command port (docs/timer-abi.md): a 32-bit `out` of a command number
/// ([`crate::timer`]), a 32-bit `in` of the last status.
pub const TIMER_PORT: u16 = 0x520;
/// The idle port: a 32-bit `out` (any value) halts the vCPU as `HLT` does, in one exit, for a guest
/// that halts with its doorbell masked (docs/timer-abi.md, "Halting in one exit"). Not under
/// `--policy kvm-lapic`.
pub const IDLE_PORT: u16 = 0x524;
/// Under `--policy kvm-lapic` only: a 32-bit `out` of the page number of the guest's timer report
/// ([`crate::report`]; docs/boot.md, "The timer report").
pub const REPORT_PORT: u16 = 0x530;
