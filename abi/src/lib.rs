//! The guest ABI of quietvm, defined once: what the VMM and a guest must agree on, as numbers and
//! `#[repr(C)]` layouts. The VMM (`quietvm`) and the built-in guest (`guest/`) both import it; neither
//! defines any of these numbers itself.
//!
//! - [`boot`]: the memory map, the boot info at [`boot::BOOT_INFO`] and the entry state (docs/boot.md).
//! - [`ports`]: the I/O ports of the console, the debug exit, the timer device and the timer report
//!   (docs/boot.md, "Devices").
//! - [`timer`]: the paravirtual timer device: commands, statuses, flags, the device page, `control`
//!   values and the doorbell vector (docs/timer-abi.md).
//! - [`queue`]: the timer device's queue mode: per-timer state words, the submission and delivery
//!   rings, the horizon and the shared clock (docs/timer-abi.md, "Queue mode").
//! - [`report`]: the timer report a guest hands over under `--policy kvm-lapic` (docs/boot.md, "The
//!   timer report").
//!
//! All values are little endian on the wire; every address is guest-physical (and, as the guest runs on
//! an identity map, virtual). `tests/pinned.rs` pins every value, offset and size: changing one is a
//! change of the ABI, and must come with a new [`ABI_VERSION`] and updated docs.

#![no_std]
#![forbid(unsafe_code)]

pub mod boot;
pub mod ports;
pub mod queue;
pub mod report;
pub mod timer;

/// The version of this ABI: the boot info's `version` field ([`boot::VERSION`]), checked by the guest
/// at boot (docs/boot.md, "Boot info"), and the version in docs/timer-abi.md's title.
pub const ABI_VERSION: u32 = 1;
