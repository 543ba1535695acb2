//! Devices the guest sees: the serial console, the timer device and the debug-exit port.

pub mod serial;
pub mod timer;

// The ports and the doorbell vector are the guest ABI's (quietvm-abi; docs/boot.md, docs/timer-abi.md).
pub use quietvm_abi::ports::{EXIT_PORT, IDLE_PORT, REPORT_PORT, SERIAL_PORT, TIMER_PORT};
pub use quietvm_abi::timer::DOORBELL_VECTOR;
/// The 16550 UART's registers.
pub const SERIAL_PORTS: std::ops::Range<u16> =
    SERIAL_PORT..SERIAL_PORT + quietvm_abi::ports::SERIAL_PORT_COUNT;
