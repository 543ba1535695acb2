//! The ring-3 runtime every workload builds on: boot info, console, the timer device client, the
//! doorbell handler, per-vCPU data, locks, memory, time and randomness; and for `policy=kvm-lapic`
//! the timer device in software on top of the vCPU's own LAPIC timer (`soft_timers`, `lapic`).

// First: its print!/println! macros are used by the modules below.
#[macro_use]
pub mod serial;

pub mod arena;
pub mod boot;
pub mod device;
pub mod doorbell;
pub mod hotplug;
pub mod irq;
pub mod lapic;
pub mod mem;
pub mod percpu;
pub mod rand;
pub mod soft_timers;
pub mod sync;
pub mod time;
pub mod timer_abi;
pub mod vm;
