//! quietvm's measuring commands, apart from the VMM they measure:
//!
//! - [`compare`]: `quietvm compare`, policies side by side with the kernel's counters as ground truth.
//! - [`fleet`]: `quietvm fleet`, many VMs at once (one process each) and what they cost together.
//! - [`simulate`]: `quietvm simulate`, the timer service under all policies on virtual time (no KVM).
//! - [`replay`]: `quietvm replay` (real Linux timer traces under each policy) and `quietvm trace-host`.
//! - [`optimum`]: the fewest wake-ups that could have served every fired timer in its window, and the
//!   reader of `quietvm run --timer-log`; the figure the three above are measured against.
//! - [`qemu`]: the `qemu` policy, the same guest under QEMU with KVM as a peer (`quietvm run --policy
//!   qemu`, which `compare` and `fleet` run like any other).
//!
//! `compare` and `fleet` run the real `quietvm run` in child processes; `simulate` and `replay` drive
//! the same timer code the VMM runs (tmigr's service and the VMM's expiry accounting) on virtual time.

pub mod compare;
pub mod fleet;
pub mod optimum;
pub mod qemu;
pub mod replay;
pub mod simulate;
