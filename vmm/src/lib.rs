//! quietvm's virtual machine monitor: boot a VM on KVM, run one thread per vCPU, emulate each vCPU's
//! timers and its idle `HLT` in userspace, and report what it cost.
//!
//! Layers, each importing only the ones below it (docs/architecture.md):
//!
//! ```text
//!   api (control socket, `quietvm ctl`)        config (TOML + flags)
//!        \                                         /
//!         vm (the VM, vCPU threads, event loop, kvm-lapic mode)
//!          |                    \
//!   devices (serial, timer device: owns the timer service)     stats (figures, JSON)
//!          |                    /
//!   sys (all `unsafe`: KVM in sys::kvm, libc calls in sys::os)   sync   exit_code
//! ```
//!
//! The guest ABI is the `quietvm-abi` crate; the timer hierarchy is the `tmigr` crate (pure Rust, no
//! KVM), which only the timer device uses. The measuring commands (compare, fleet, simulate, replay)
//! are the `quietvm-measure` crate, built on this one.

pub mod accounting;
pub mod api;
pub mod config;
pub mod devices;
pub mod exit_code;
pub mod limits;
pub mod stats;
pub mod sync;
pub mod sys;
pub mod vm;
