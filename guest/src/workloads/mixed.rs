//! `mixed`: every vCPU arms `timers=` (default 2) PINNED and as many MOVABLE periodic timers (periods
//! 1-10 ms). Even vCPUs (0 included) work in bursts: busy 1-5 ms, then asleep 1-5 ms; odd vCPUs only
//! halt. After `duration_ms` vCPU 0 stops all timers and checks them (periodic.rs, checks.rs; pinned
//! ones must fire on their owner).

use super::{busy, periodic, Env};
use crate::checks;
use crate::runtime::device::{MOVABLE, PINNED};
use crate::runtime::rand::Rng;
use crate::runtime::time::{self, MS};
use crate::runtime::vm;

pub fn run(env: &Env) -> ! {
    let per_cpu = 2 * super::arg_u64("timers", 2) as u32;
    let set = periodic::start_per_cpu(env, per_cpu, |i| if i & 1 == 0 { PINNED } else { MOVABLE });
    let end = env.start + env.duration;
    let mut units = 0u64;
    if env.cpu & 1 == 0 {
        let mut rng = Rng::new(env.seed, 1000 + u64::from(env.cpu));
        loop {
            let now = time::now();
            if now >= end {
                break;
            }
            let burst_end = now + rng.range(MS, 5 * MS);
            while time::now() < burst_end {
                if !busy::short_unit() {
                    checks::fail!("busy work gave a wrong result (unit {})", units);
                }
                units += 1;
            }
            time::sleep_until((time::now() + rng.range(MS, 5 * MS)).min(end));
        }
    }
    if env.cpu != 0 {
        vm::halt_forever();
    }
    time::sleep_until(end);
    let (timers, fires, skips) = set.stop_and_check();
    super::finish(
        env,
        format_args!(
            "timers={} fires={} skips={} work_units(vCPU 0)={} {}",
            timers,
            fires,
            skips,
            units,
            checks::book().summary()
        ),
    )
}
