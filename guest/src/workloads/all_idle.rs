//! `all-idle`: every vCPU arms `timers=` (default 2) periodic MOVABLE timers (periods 1-10 ms) and only
//! halts between callbacks: no vCPU is ever busy, so under the pull policy the last vCPU to go idle must
//! wake for the hierarchy's first expiry. vCPU 0 sleeps on its pinned sleep timer until `duration_ms`,
//! then stops all timers and checks them (periodic.rs, checks.rs).

use super::{periodic, Env};
use crate::checks;
use crate::runtime::device::MOVABLE;
use crate::runtime::rand::Rng;
use crate::runtime::time::{self, MS};
use crate::runtime::{boot, vm};

pub fn run(env: &Env) -> ! {
    let per_cpu = boot::arg_u64("timers", 2) as u32;
    let all = env.ids(per_cpu * env.vcpus);
    if env.cpu == 0 {
        let book = checks::create_book();
        periodic::create(
            book,
            all.start,
            all.len() as u32,
            &mut Rng::new(env.seed, 0),
            MS,
            10 * MS,
            |_| MOVABLE,
        );
    }
    let set = periodic::set();
    for id in env.ids_of(per_cpu, env.cpu) {
        set.start(id);
    }
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
