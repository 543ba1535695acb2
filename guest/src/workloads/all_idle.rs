//! `all-idle`: every vCPU arms `timers=` (default 2) periodic MOVABLE timers (periods 1-10 ms) and only
//! halts between callbacks: no vCPU is ever busy, so under the pull policy the last vCPU to go idle must
//! wake for the hierarchy's first expiry. vCPU 0 sleeps on its pinned sleep timer until `duration_ms`,
//! then stops all timers and checks them (periodic.rs, checks.rs).

use super::{periodic, Env};
use crate::checks;
use crate::runtime::device::MOVABLE;
use crate::runtime::time;
use crate::runtime::vm;

pub fn run(env: &Env) -> ! {
    let per_cpu = super::arg_u64("timers", 2) as u32;
    run_halting(env, per_cpu, |_| MOVABLE)
}

/// Every vCPU starts `per_cpu` periodic timers and halts between callbacks; vCPU 0 ends the run after
/// `duration_ms` and checks them. Shared with `hotplug`.
pub fn run_halting(env: &Env, per_cpu: u32, flags_of: impl Fn(u32) -> u32) -> ! {
    let set = periodic::start_per_cpu(env, per_cpu, flags_of);
    if env.cpu != 0 {
        vm::halt_forever();
    }
    time::sleep_until(env.start + env.duration);
    let (timers, fires, skips) = set.stop_and_check();
    super::finish(
        env,
        format_args!(
            "timers={} fires={} skips={} {}",
            timers,
            fires,
            skips,
            checks::book().summary()
        ),
    )
}
