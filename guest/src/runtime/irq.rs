//! Masking the doorbell at ring 3, in software. Ring 3 cannot use cli/sti here (nested KVM runs ring 3
//! with IOPL 0 and IF=1 whatever the guest asks), so each vCPU has a `masked` flag that the ring-0
//! doorbell stub honours: while it is set, a doorbell only sets `pending`, and [`unmask`] runs the
//! handler. Code that a callback on the same vCPU could also enter (a lock, a device page sequence)
//! runs masked; callbacks themselves run masked, one at a time.
//!
//! The handler is `runtime::doorbell`'s, which stands above this module (locks mask, and the handler's
//! callbacks take locks): [`unmask`] calls it as the upcall trampoline does, through the symbol that
//! arch/ names (`arch::run_doorbell_handler`).
//!
//! Only this vCPU and its own interrupt stubs touch its flags, so the atomics only have to keep the
//! compiler from moving memory accesses across them (SeqCst does).

use super::percpu;
use crate::arch;
use core::sync::atomic::Ordering;

/// Masks the doorbell on this vCPU; returns true if it was unmasked (for [`restore`]).
#[inline]
pub fn mask() -> bool {
    percpu::this().irq_masked.swap(1, Ordering::SeqCst) == 0
}

/// Unmasks the doorbell, first running the handler for any doorbell that came while masked.
#[inline]
pub fn unmask() {
    let cpu = percpu::this();
    cpu.irq_masked.store(0, Ordering::SeqCst);
    if cpu.irq_pending.load(Ordering::SeqCst) != 0 {
        arch::run_doorbell_handler();
    }
}

/// Undoes a [`mask`] that returned `was_unmasked`.
#[inline]
pub fn restore(was_unmasked: bool) {
    if was_unmasked {
        unmask();
    }
}

/// Runs the doorbell handler now, from unmasked main code, as if the doorbell had rung: for code that
/// knows expired timers wait for this vCPU and must not wait for the doorbell's upcall (`queues`).
pub fn run_handler_now() {
    assert!(!is_masked(), "run_handler_now with the doorbell masked");
    arch::run_doorbell_handler();
}

pub fn is_masked() -> bool {
    percpu::this().irq_masked.load(Ordering::SeqCst) != 0
}
