//! Synchronisation across vCPUs (ring-3 atomics run natively) and against this vCPU's own doorbell
//! callbacks (which interrupt ring-3 code like a signal handler, so every lock is taken with the
//! doorbell masked: a callback spinning on a lock its own vCPU holds would never get it).

use super::irq;
use crate::arch;
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

/// A spinlock whose guard keeps the doorbell masked on this vCPU.
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock serialises all access to `value`.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: all-zero is an unlocked lock around an all-zero `T`.
unsafe impl<T: super::arena::Zeroable> super::arena::Zeroable for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    pub fn lock(&self) -> SpinGuard<'_, T> {
        let was_unmasked = irq::mask();
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.locked.load(Ordering::Relaxed) {
                arch::pause();
            }
        }
        SpinGuard {
            lock: self,
            was_unmasked,
        }
    }
}

impl<T> SpinLock<T> {
    /// The lock if it is free now, else `None` (for code that must not wait, such as the last report
    /// before the VM ends, which may come from a panic inside a lock holder).
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        let was_unmasked = irq::mask();
        if self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Some(SpinGuard {
                lock: self,
                was_unmasked,
            });
        }
        irq::restore(was_unmasked);
        None
    }
}

pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
    was_unmasked: bool,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
        irq::restore(self.was_unmasked);
    }
}

/// A `&'static T` that one vCPU (usually 0) sets up and publishes, and the others wait for.
pub struct Published<T: 'static>(AtomicPtr<T>);

impl<T> Published<T> {
    pub const fn new() -> Self {
        Self(AtomicPtr::new(core::ptr::null_mut()))
    }

    pub fn publish(&self, value: &'static T) {
        self.0.store(value as *const T as *mut T, Ordering::Release);
    }

    /// Waits (spinning) until published.
    pub fn get(&self) -> &'static T {
        loop {
            if let Some(value) = self.try_get() {
                return value;
            }
            arch::pause();
        }
    }

    pub fn try_get(&self) -> Option<&'static T> {
        let ptr = self.0.load(Ordering::Acquire);
        // SAFETY: only ever set from a `&'static T`.
        (!ptr.is_null()).then(|| unsafe { &*ptr })
    }
}
