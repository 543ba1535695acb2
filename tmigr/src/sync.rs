//! Synchronisation primitives of the concurrent paths, switchable to `loom`.
//!
//! Build with `RUSTFLAGS="--cfg loom"` and every atomic and lock used by the
//! hierarchy and the service comes from `loom`, so the loom models in
//! `tests/loom.rs` explore their interleavings and weak-memory outcomes.
//! Statistics counters deliberately stay `std` atomics (see [`StatCounter`]):
//! they are not on any correctness path and would only blow up loom's search.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
/// Outside loom the locks spin and then yield, and never sleep: the VMM's
/// wakeup counts are checked against the kernel's voluntary context switches
/// of its vCPU threads, and a futex wait on a contended `std` mutex would be
/// one of those. Critical sections here are short and never block.
#[cfg(not(loom))]
pub(crate) type Mutex<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;
#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = spin::mutex::SpinMutexGuard<'a, T, spin::relax::Yield>;

/// Locks `m`.
#[cfg(not(loom))]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

/// Locks `m`, ignoring poisoning: every critical section leaves its data
/// consistent before it can panic (panics here are assertion failures in tests).
#[cfg(loom)]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A relaxed statistics counter (always `std`, never `loom`).
#[derive(Default, Debug)]
pub(crate) struct StatCounter(std::sync::atomic::AtomicU64);

impl StatCounter {
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
