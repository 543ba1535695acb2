//! `hotplug`: every vCPU arms `timers=` (default 2) PINNED and as many MOVABLE periodic timers (periods
//! 1-10 ms) and halts between callbacks, while quietvm takes vCPUs offline and back (through its API).
//! A vCPU asked to go offline acknowledges at its next halt (runtime::hotplug); quietvm hands its
//! timers, pinned ones included, to another vCPU, where they keep firing. vCPUs started late (with
//! `--vcpus-online`) start their timers when they first run. vCPU 0, which cannot go offline, ends the
//! run after `duration_ms` and checks every timer: each arming fired at most once, never early, no two
//! callbacks of one timer at once, a pinned timer off its owner only if the owner went offline since it
//! was armed, and each timer's count for its period (periodic.rs, checks.rs).

use super::{periodic, Env};
use crate::checks;
use crate::runtime::device::{MOVABLE, PINNED};
use crate::runtime::rand::Rng;
use crate::runtime::time::{self, MS};
use crate::runtime::{boot, vm};

pub fn run(env: &Env) -> ! {
    let per_cpu = 2 * boot::arg_u64("timers", 2) as u32;
    let all = env.ids(per_cpu * env.vcpus);
    if env.cpu == 0 {
        let book = checks::create_book();
        let flags = |i: u32| if i & 1 == 0 { PINNED } else { MOVABLE };
        periodic::create(
            book,
            all.start,
            all.len() as u32,
            &mut Rng::new(env.seed, 0),
            MS,
            10 * MS,
            flags,
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
