//! The lock vCPU threads share.
//!
//! quietvm's wakeup counts are checked against the kernel's voluntary context switches, so a vCPU
//! thread must never sleep except in its halt path. `std::sync::Mutex` parks a contended waiter on a
//! futex (one voluntary switch each time); this lock spins briefly and then yields the CPU, which the
//! kernel counts as an involuntary switch. Critical sections under it are short (no I/O, no waiting).

/// A spin lock that yields while contended and never sleeps.
pub type NoSleepMutex<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;
