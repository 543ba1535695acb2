//! Per-vCPU data of the ring-3 runtime, in a page of each vCPU's per-vCPU area (arch::layout).
//! The current vCPU is found from the stack pointer: ring-3 code always runs on its own vCPU's stack
//! (the upcall too), and there is no cheaper per-CPU register at ring 3 without ring-0 help.

use super::boot;
use super::timer_abi::NONE;
use crate::arch::{self, layout};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

#[repr(C)]
pub struct PerCpu {
    /// Software interrupt mask (runtime::irq); read and written by the ring-0 stubs too.
    pub irq_masked: AtomicU32,
    /// A doorbell came while masked; set by the ring-0 doorbell stub.
    pub irq_pending: AtomicU32,
    /// The timer whose callback this vCPU runs now (`timer_abi::NONE` between callbacks).
    pub running: AtomicU32,
    /// Set by the callback of this vCPU's sleep timer (`time`).
    pub sleep_fired: AtomicBool,
    /// Doorbell upcalls taken, and timers popped.
    pub upcalls: AtomicU64,
    pub popped: AtomicU64,
    /// quietvm asked this vCPU to go offline (seen by the doorbell handler in `control`); the next
    /// halt acknowledges it (`hotplug`).
    pub offline_requested: AtomicBool,
    /// Times this vCPU went offline: a pinned timer of it may fire elsewhere only if this grew since
    /// the timer was armed (quietvm hands a leaving vCPU's timers to another one).
    pub offline_count: AtomicU64,

    // Queue mode of the timer device (`queues`). Only this vCPU touches these, from main code and
    // from its doorbell handler.
    /// Queue mode is on for this vCPU (`ENABLE_QUEUES` answered OK).
    pub queues: AtomicBool,
    /// The doorbell handler runs on this vCPU: an arming defers its `SYNC` ("owes" it).
    pub in_handler: AtomicBool,
    /// This vCPU is on its halt path (`time::wait_until`, `hotplug::halt_forever`), around the `hlt`:
    /// a handler that runs then leaves an owed `SYNC` to the coming `HLT` exit, or to
    /// `wait_until`'s return.
    pub halting: AtomicBool,
    /// An owed `SYNC`: 0 = none, else `OWED | i`, `i` the submission index it covers up to (the
    /// `sub_head` after the arming that owes it).
    pub owed_sync: AtomicU64,
    /// The earliest window end (`deadline + slack`) of the armings that owe the `SYNC`.
    pub owed_until: AtomicU64,
    /// The running callback came from a `POP` command (ended with a command), not the delivery ring.
    pub running_popped: AtomicBool,
    /// `SYNC`s issued; callback ends that found `HELD`; `POP`s of the queue-mode safety net and the
    /// timers they found (docs in `doorbell`).
    pub syncs: AtomicU64,
    pub held_ends: AtomicU64,
    pub safety_pops: AtomicU64,
    pub safety_pops_found: AtomicU64,
}

// The ring-0 stubs find the two flags where arch::layout says.
const _: () = assert!(core::mem::offset_of!(PerCpu, irq_masked) == layout::IRQ_MASKED);
const _: () = assert!(core::mem::offset_of!(PerCpu, irq_pending) == layout::IRQ_PENDING);

const _: () = assert!(core::mem::size_of::<PerCpu>() <= 4096);

/// This vCPU's index.
#[inline]
pub fn index() -> u32 {
    let info = boot::info();
    ((arch::stack_pointer() as u64 - info.percpu_base) / info.percpu_size) as u32
}

/// Base address of vCPU `cpu`'s per-vCPU area.
pub fn area_base(cpu: u32) -> usize {
    let info = boot::info();
    (info.percpu_base + info.percpu_size * u64::from(cpu)) as usize
}

pub fn of(cpu: u32) -> &'static PerCpu {
    // SAFETY: a page of vCPU `cpu`'s area reserved for this struct; zeroed at boot, which is a valid
    // PerCpu, and only accessed through atomics.
    unsafe { &*((area_base(cpu) + layout::PERCPU_DATA) as *const PerCpu) }
}

pub fn this() -> &'static PerCpu {
    of(index())
}

pub fn init(cpu: u32) {
    of(cpu).running.store(NONE, Ordering::Relaxed);
}
