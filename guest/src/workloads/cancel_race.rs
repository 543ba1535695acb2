//! `cancel-race`: each vCPU arms a MOVABLE timer 1-3 ms ahead and cancels it (CANCEL or CANCEL_SYNC at
//! random) within 300 us of its deadline, either spinning up to that moment or asleep until it (so that
//! under the pull policy another vCPU may be expiring it at that very time). Checks the cancel rule: a
//! cancel that answered 1 means that arming never fires; one that answered 0 means it fired or will,
//! exactly once (CANCEL_SYNC: already has, callback done), with the checks.rs checks on every arming.

use super::Env;
use crate::checks;
use crate::runtime::device::{status, Expired, MOVABLE};
use crate::runtime::rand::Rng;
use crate::runtime::time::{self, MS, US};
use crate::runtime::vm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

static DONE: AtomicU32 = AtomicU32::new(0);
static WON: AtomicU64 = AtomicU64::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);

pub fn run(env: &Env) -> ! {
    let id = env.ids_of(1, env.cpu).start;
    if env.cpu == 0 {
        checks::create_book();
    }
    let book = checks::book();
    let mut rng = Rng::new(env.seed, u64::from(env.cpu));
    let end = env.start + env.duration;
    loop {
        let now = time::now();
        if now >= end {
            break;
        }
        let deadline = now + rng.range(MS, 3 * MS);
        if book.arm(id, MOVABLE, deadline, deadline - now).status != status::OK {
            continue; // PAST: this vCPU was held up for over a millisecond; nothing armed
        }
        let target = deadline - 300 * US + rng.range(0, 600 * US);
        if rng.chance(50) {
            time::spin_until(target);
        } else {
            time::sleep_until(target);
        }
        let removed = if rng.chance(50) {
            book.cancel_sync(id).0
        } else {
            book.cancel(id)
        };
        if removed {
            WON.fetch_add(1, Ordering::Relaxed);
        } else {
            LOST.fetch_add(1, Ordering::Relaxed);
            // It fired or will: its callback must run (maybe on another vCPU, hence polling).
            if !time::poll_until(deadline + 500 * MS, 200 * US, || !book.outstanding(id)) {
                checks::fail!(
                    "timer {}: the cancel answered 0 (fired) but no callback ran within 500 ms",
                    id
                );
                break;
            }
        }
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    if env.cpu != 0 {
        vm::halt_forever();
    }
    while DONE.load(Ordering::Acquire) < env.vcpus {
        crate::arch::pause();
    }
    book.check_quiescent(env.ids(env.vcpus));
    super::finish(
        env,
        format_args!(
            "cancels_before_firing={} cancels_too_late={} {}",
            WON.load(Ordering::Relaxed),
            LOST.load(Ordering::Relaxed),
            book.summary()
        ),
    )
}

pub fn on_timer(expired: &Expired) {
    let _callback = checks::book().enter(expired);
}
