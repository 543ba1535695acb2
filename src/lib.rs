//! quietvm: a small KVM virtual machine monitor whose idle vCPUs stay asleep.
//!
//! - [`kvm`]: the only place that talks to KVM or uses `unsafe`.
//! - [`vmm`]: the VM and its vCPU threads, the halt path, kicks and interrupt injection.
//! - [`devices`]: the serial console and the paravirtual timer device (docs/timer-abi.md).
//! - [`config`]: the TOML config and its command-line overrides.
//! - [`api`]: the control API on a Unix socket, and `quietvm ctl`.
//! - [`compare`]: `quietvm compare`, policies side by side with the kernel's counters as ground truth.
//! - [`fleet`]: `quietvm fleet`, many VMs at once (one process each) and what they cost together.
//! - [`stats`]: the statistics printed at exit and written as JSON (docs/stats.md).
//! - [`replay`]: `quietvm replay` (real Linux timer traces under each policy) and `quietvm trace-host`.
//! - [`simulate`]: `quietvm simulate`, the timer service under all policies on virtual time (no KVM).
//!
//! The timer hierarchy itself is the `tmigr` crate: pure Rust with no KVM in it.

pub mod api;
pub mod compare;
pub mod config;
pub mod devices;
pub mod fleet;
pub mod kvm;
pub mod replay;
pub mod simulate;
pub mod stats;
pub mod sync;
pub mod vmm;
