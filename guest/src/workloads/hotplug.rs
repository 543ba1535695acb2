//! `hotplug`: every vCPU arms `timers=` (default 2) PINNED and as many MOVABLE periodic timers (periods
//! 1-10 ms) and halts between callbacks, while quietvm takes vCPUs offline and back (through its API).
//! A vCPU asked to go offline acknowledges at its next halt (runtime::hotplug); quietvm hands its
//! timers, pinned ones included, to another vCPU, where they keep firing. vCPUs started late (with
//! `--vcpus-online`) start their timers when they first run. vCPU 0, which cannot go offline, ends the
//! run after `duration_ms` and checks every timer: each arming fired at most once, never early, no two
//! callbacks of one timer at once, a pinned timer off its owner only if the owner went offline since it
//! was armed, and each timer's count for its period (periodic.rs, checks.rs).

use super::{all_idle, Env};
use crate::runtime::device::{MOVABLE, PINNED};

pub fn run(env: &Env) -> ! {
    let per_cpu = 2 * super::arg_u64("timers", 2) as u32;
    all_idle::run_halting(env, per_cpu, |i| if i & 1 == 0 { PINNED } else { MOVABLE })
}
