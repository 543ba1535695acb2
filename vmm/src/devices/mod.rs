//! Devices the guest sees: the serial console, the timer device and the debug-exit port.

pub mod serial;
pub mod timer;

/// The 16550 UART's base port and its 8 registers.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORTS: std::ops::Range<u16> = SERIAL_PORT..SERIAL_PORT + 8;
/// A 32-bit `out` here ends the VM with that exit code (docs/boot.md).
pub const EXIT_PORT: u16 = 0x510;
/// The timer device's command port (docs/timer-abi.md).
pub const TIMER_PORT: u16 = 0x520;
/// Where a guest hands quietvm its own timer figures under `--policy kvm-lapic` (docs/boot.md, "Timer
/// report"): a 32-bit `out` of the report's page number.
pub const REPORT_PORT: u16 = 0x530;
/// The vector injected when a vCPU has expired timers waiting.
pub const DOORBELL_VECTOR: u8 = 0x20;
