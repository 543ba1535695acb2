//! The ring-3 runtime every workload builds on: boot info, console, the timer device client, the
//! doorbell handler, per-vCPU data, locks, memory, time and randomness; and for `policy=kvm-lapic`
//! the timer device in software on top of the vCPU's own LAPIC timer (`soft_timers`, `lapic`).
//!
//! Its modules import one another in one direction only, layer on layer from the bottom up:
//! - primitives, on arch/ alone: `boot` (boot info and arguments), `percpu`, `irq` (the software
//!   interrupt mask), `arena`, `sync` (locks, which mask), `serial`, `rand`, `mem`;
//! - the timer device: its vocabulary (`timer_abi`), the LAPIC (`lapic`) and the software device on
//!   it (`soft_timers`), queue mode in shared memory (`queues`), the client (`device`, which uses
//!   the commands or `queues`), and going offline on a halt (`hotplug`);
//! - waiting (`time`), and ending the VM (`vm`, which hands over the software device's report first);
//! - under a foreign VMM (the PVH entry): the boot info, the other vCPUs' start and the end (`pvh`);
//! - the doorbell handler (`doorbell`), which runs the sleep timers' callbacks and the workload's.
//!
//! `irq::unmask` runs the doorbell handler as the upcall trampoline does, through the symbol that
//! arch/ names, not by importing `doorbell`.

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
pub mod pvh;
pub mod queues;
pub mod rand;
pub mod soft_timers;
pub mod sync;
pub mod time;
pub mod timer_abi;
pub mod vm;
