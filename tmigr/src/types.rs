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
    /// Its deadline (`<=` the time `expire` sampled).
    pub deadline: u64,
    /// Its kind.
    pub kind: TimerKind,
}
