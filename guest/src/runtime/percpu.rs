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
