//! The basic types shared by every module: vCPU and timer ids, `KTIME_MAX`,
//! timer kinds, policies and expired-timer records.
//!
//! This module depends on nothing else in the crate, so the module graph has
//! no cycles: `types` <- `base` <- `hierarchy` <- `service` <- `model`.
//! [`crate::service`] re-exports all of them, so `tmigr::service::{...}`
//! paths keep working; new code names `tmigr::types` or the crate root.

use std::fmt;
use std::str::FromStr;

/// A vCPU index.
pub type CpuId = u32;
/// A timer id, caller-chosen, dense in `0..max_timers`.
pub type TimerId = u32;
/// "Never" (the kernel's `KTIME_MAX`).
pub const KTIME_MAX: u64 = u64::MAX;

/// Where a timer may expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// Always expires on the vCPU whose base it is queued on.
    Pinned,
    /// May be expired by any vCPU (the pull model's global timers).
    Movable,
}

/// How movable timers are placed and expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Every timer expires on its base; a halted vCPU wakes for its own timers.
    Local,
    /// Movable timers armed by a vCPU that counts as idle are queued on the
    /// nearest running vCPU (the kernel's old `get_nohz_timer_target`).
    Push,
    /// The timer-migration hierarchy: idle vCPUs' movable timers are pulled
    /// by a running migrator at expiry.
    Pull,
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Policy::Local),
            "push" => Ok(Policy::Push),
            "pull" => Ok(Policy::Pull),
            _ => Err(format!("unknown timer policy {s:?} (local, push, pull)")),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Local => "local",
            Policy::Push => "push",
            Policy::Pull => "pull",
        })
    }
}

/// A timer handed to the caller by `TimerService::expire`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The timer.
    pub id: TimerId,
    /// The vCPU whose base it was queued on.
    pub owner: CpuId,
    /// Its deadline, the start of its window (`<=` the time `expire` sampled).
    pub deadline: u64,
    /// Its slack: it could fire as late as `deadline + slack` (the end of its window).
    pub slack: u64,
    /// Its kind.
    pub kind: TimerKind,
}

/// When a timer, or the first of a set of timers, may fire: from `soft` (a deadline; nothing fires
/// before its own) to `hard` (deadline + slack; the latest it may fire). For a set, `soft` is the
/// earliest deadline and `hard` the earliest window end, which may belong to different timers; a
/// wake-up at `hard` that expires every timer whose `soft` has passed is the greedy that serves the
/// most windows with the fewest wake-ups ("Windows" in the crate docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// The earliest window end: the time to wake at.
    pub hard: u64,
    /// The earliest deadline: from then on, something may be expired.
    pub soft: u64,
}

impl Expiry {
    /// Nothing pending.
    pub const NONE: Expiry = Expiry {
        hard: KTIME_MAX,
        soft: KTIME_MAX,
    };

    /// True if nothing is pending.
    pub fn is_none(&self) -> bool {
        self.hard == KTIME_MAX
    }

    /// The earliest of both: earliest end and earliest start.
    pub fn min(self, other: Expiry) -> Expiry {
        Expiry {
            hard: self.hard.min(other.hard),
            soft: self.soft.min(other.soft),
        }
    }
}

/// A bare time: a window of one instant (slack 0), or none for `KTIME_MAX`.
impl From<u64> for Expiry {
    fn from(t: u64) -> Self {
        Expiry { hard: t, soft: t }
    }
}
