//! tmigr (docs being written)
pub mod base;
pub mod clock;
pub mod hierarchy;
pub mod model;
pub mod service;
pub(crate) mod sync;

pub use clock::{Clock, FakeClock, MonotonicClock};
pub use service::{
    CpuId, Expired, Policy, ServiceConfig, ServiceStats, TimerId, TimerKind, TimerService,
    KTIME_MAX,
};

#[cfg(test)]
mod tests;
