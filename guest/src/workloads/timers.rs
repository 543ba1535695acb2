//! `timers`: each vCPU, in rounds until `duration_ms`, arms `timers=` (default 4) PINNED one-shot timers
//! 0.5-20 ms ahead, re-arms about a quarter and cancels about a quarter of them before they expire, and
//! halts until every arming fired or was cancelled. Checks (checks.rs): each arming fired at most once,
//! on its owner, never early; the ones not cancelled or replaced fired (within 500 ms of their deadline);
//! the cancelled ones never did. vCPU 0 collects the results.

use super::Env;
use crate::checks;
use crate::runtime::device::{Expired, PINNED};
use crate::runtime::rand::Rng;
use crate::runtime::time::{self, MS, US};
use crate::runtime::vm;
use core::sync::atomic::{AtomicU32, Ordering};

static DONE: AtomicU32 = AtomicU32::new(0);

pub fn run(env: &Env) -> ! {
    let per_cpu = super::arg_u64("timers", 4) as u32;
    let mine = env.ids_of(per_cpu, env.cpu);
    if env.cpu == 0 {
        checks::create_book();
    }
    let book = checks::book();
    let mut rng = Rng::new(env.seed, u64::from(env.cpu));
    let end = env.start + env.duration;
    let mut rounds = 0u64;
    loop {
        let now = time::now();
        if now >= end && rounds > 0 {
            break;
        }
        let mut latest = 0;
        for id in mine.clone() {
            let timeout = rng.range(500 * US, 20 * MS);
            let deadline = now + timeout;
            book.arm(id, PINNED, deadline, timeout);
            latest = latest.max(deadline);
        }
        for id in mine.clone() {
            if rng.chance(25) {
                let timeout = rng.range(500 * US, 20 * MS);
                let deadline = time::now() + timeout;
                book.arm(id, PINNED, deadline, timeout);
                latest = latest.max(deadline);
            } else if rng.chance(33) {
                book.cancel(id);
            }
        }
        let all_done = || mine.clone().all(|id| !book.outstanding(id));
        if !time::wait_until(Some(latest + 500 * MS), all_done) {
            checks::fail!(
                "round {}: timers {:?} did not all fire within 500 ms of their deadlines",
                rounds,
                mine
            );
            break;
        }
        rounds += 1;
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    if env.cpu != 0 {
        vm::halt_forever();
    }
    while DONE.load(Ordering::Acquire) < env.vcpus {
        crate::arch::pause();
    }
    book.check_quiescent(env.ids(per_cpu * env.vcpus));
    super::finish(
        env,
        format_args!("rounds(vCPU 0)={} {}", rounds, book.summary()),
    )
}

pub fn on_timer(expired: &Expired) {
    let _callback = checks::book().enter(expired);
}
