//! `idle-movable`: vCPU 0 computes (checked work) for `duration_ms` while every other vCPU arms
//! `timers=` (default 2) periodic MOVABLE timers (periods 1-10 ms) and only halts. Under the pull policy
//! the busy vCPU ends up running the idle vCPUs' timers. At the end vCPU 0 stops them all and checks each
//! fired as often as its period allows (periodic.rs) and every arming (checks.rs). With one vCPU,
//! vCPU 0 arms the timers itself.

use super::{busy, periodic, Env};
use crate::checks;
use crate::runtime::device::MOVABLE;
use crate::runtime::rand::Rng;
use crate::runtime::time::{self, MS};
use crate::runtime::vm;

pub fn run(env: &Env) -> ! {
    let per_cpu = super::arg_u64("timers", 2) as u32;
    let owners = env.vcpus.saturating_sub(1).max(1);
    let ids = env.ids(per_cpu * owners);
    // Timers of vCPU c (c >= 1) are c-1's share; with one vCPU, vCPU 0 has them.
    let owner_of = |cpu: u32| cpu.saturating_sub(1);
    if env.cpu == 0 {
        let book = checks::create_book();
        periodic::create(
            book,
            ids.start,
            ids.len() as u32,
            &mut Rng::new(env.seed, 0),
            MS..10 * MS,
            env.start + env.duration,
            |_| MOVABLE,
        );
    }
    let set = periodic::set();
    if env.vcpus == 1 || env.cpu != 0 {
        let owner = owner_of(env.cpu);
        for id in ids.start + owner * per_cpu..ids.start + (owner + 1) * per_cpu {
            set.start(id);
        }
    }
    if env.cpu != 0 {
        vm::halt_forever();
    }

    // vCPU 0: busy until the end, then stop and check.
    let end = env.start + env.duration;
    let mut units = 0u64;
    while time::now() < end {
        if !busy::work_unit() {
            checks::fail!("busy work gave a wrong result (unit {})", units);
        }
        units += 1;
    }
    let (timers, fires, skips) = set.stop_and_check();
    super::finish(
        env,
        format_args!(
            "timers={} fires={} skips={} work_units={} {}",
            timers,
            fires,
            skips,
            units,
            checks::book().summary()
        ),
    )
}
