//! Masking the doorbell at ring 3, in software. Ring 3 cannot use cli/sti here (nested KVM runs ring 3
//! with IOPL 0 and IF=1 whatever the guest asks), so each vCPU has a `masked` flag that the ring-0
//! doorbell stub honours: while it is set, a doorbell only sets `pending`, and [`unmask`] runs the
//! handler. Code that a callback on the same vCPU could also enter (a lock, a device page sequence)
//! runs masked; callbacks themselves run masked, one at a time.
//!
//! Only this vCPU and its own interrupt stubs touch its flags, so the atomics only have to keep the
//! compiler from moving memory accesses across them (SeqCst does).

use super::{doorbell, percpu};
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
        doorbell::handle();
    }
}

/// Undoes a [`mask`] that returned `was_unmasked`.
#[inline]
pub fn restore(was_unmasked: bool) {
    if was_unmasked {
        unmask();
    }
}

pub fn is_masked() -> bool {
    percpu::this().irq_masked.load(Ordering::SeqCst) != 0
}
