//! Time sources: the host monotonic clock and a test clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A source of absolute time in nanoseconds. All deadlines given to the
/// service are on this clock's scale.
pub trait Clock: Send + Sync {
    /// The current time in nanoseconds on this clock's scale (monotonic).
    fn now_ns(&self) -> u64;
}

/// Host `CLOCK_MONOTONIC` (through [`Instant`]): nanoseconds since the clock
/// was created, so time 0 is the creation of the clock.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    /// A clock whose time 0 is now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// The instant this clock calls 0, to convert deadlines to host timers
    /// (e.g. `start_instant() + Duration::from_nanos(deadline)`).
    pub fn start_instant(&self) -> Instant {
        self.start
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        // u64 nanoseconds last 584 years: the truncation cannot happen.
        self.start.elapsed().as_nanos() as u64
    }
}

/// A clock that only moves when told to: for deterministic tests.
#[derive(Debug, Default)]
pub struct FakeClock {
    now: AtomicU64,
}

impl FakeClock {
    /// A fake clock reading `now`.
    pub fn new(now: u64) -> Self {
        Self {
            now: AtomicU64::new(now),
        }
    }

    /// Sets the time (tests only move it forward).
    pub fn set(&self, now: u64) {
        self.now.store(now, Ordering::SeqCst);
    }

    /// Moves the time forward by `delta` ns and returns the new time.
    pub fn advance(&self, delta: u64) -> u64 {
        self.now.fetch_add(delta, Ordering::SeqCst) + delta
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_set_and_advance() {
        let c = FakeClock::new(5);
        assert_eq!(c.now_ns(), 5);
        assert_eq!(c.advance(10), 15);
        c.set(100);
        assert_eq!(c.now_ns(), 100);
    }

    #[test]
    fn monotonic_clock_moves_forward_from_zero() {
        let c = MonotonicClock::new();
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(b >= a);
        assert!(c.start_instant() <= Instant::now());
    }
}
