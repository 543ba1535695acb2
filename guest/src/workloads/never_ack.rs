//! `never-ack`: a hostile guest. vCPU 0's timer H fires, and its callback re-arms H (MOVABLE, due in
//! 1 ms) and then does not return for `duration_ms`, spinning (masked, as all callbacks). Meanwhile vCPUs 1..n
//! run `timers=` (default 2) PINNED periodic timers (periods 1-5 ms) that must keep firing as usual
//! (periodic.rs bounds), and H's re-arming must not fire before the stuck callback ends (it then fires
//! once, on whichever vCPU). vCPU 0 then stops everything and checks (checks.rs).

use super::{periodic, Env};
use crate::checks;
use crate::runtime::device::{Expired, MOVABLE, PINNED};
use crate::runtime::rand::Rng;
use crate::runtime::time::{self, MS};
use crate::runtime::vm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// H's id: after the periodic timers.
static HOSTILE: AtomicU32 = AtomicU32::new(0);
static H_FIRES: AtomicU32 = AtomicU32::new(0);
static STALL: AtomicU64 = AtomicU64::new(0);
static STALL_END: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicBool = AtomicBool::new(false);

pub fn run(env: &Env) -> ! {
    let per_cpu = super::arg_u64("timers", 2) as u32;
    let others = env.vcpus - 1;
    let hostile = per_cpu * others;
    env.ids(hostile + 1);
    if env.cpu == 0 {
        let book = checks::create_book();
        HOSTILE.store(hostile, Ordering::Relaxed);
        STALL.store(env.duration, Ordering::Relaxed);
        periodic::create(
            book,
            0,
            hostile,
            &mut Rng::new(env.seed, 0),
            MS..5 * MS,
            env.start + env.duration,
            |_| PINNED,
        );
    }
    let set = periodic::set();
    if env.cpu != 0 {
        for id in (env.cpu - 1) * per_cpu..env.cpu * per_cpu {
            set.start(id);
        }
        vm::halt_forever();
    }
    let book = checks::book();
    book.arm(hostile, PINNED, time::now() + MS, MS);
    let limit = env.start + env.duration + 5_000 * MS;
    if !time::poll_until(limit, MS, || DONE.load(Ordering::Acquire)) {
        checks::fail!("the hostile timer's re-arming never fired after its callback ended");
    }
    let (timers, fires, skips) = set.stop_and_check();
    super::finish(
        env,
        format_args!(
            "stalled {} ms; other timers={} fires={} skips={} {}",
            env.duration / MS,
            timers,
            fires,
            skips,
            book.summary()
        ),
    )
}

pub fn on_timer(expired: &Expired) {
    if expired.id != HOSTILE.load(Ordering::Relaxed) {
        return periodic::on_timer(expired);
    }
    let book = checks::book();
    let _callback = book.enter(expired);
    if H_FIRES.fetch_add(1, Ordering::AcqRel) == 0 {
        // The stuck callback. Its re-arming falls due during the stall and must wait for our POP.
        let start = time::now();
        book.arm(expired.id, MOVABLE, start + MS, MS);
        // Busy, masked: a NOW every iteration (each an exit) is the only thing it does.
        time::spin_until(start + STALL.load(Ordering::Relaxed));
        STALL_END.store(time::now(), Ordering::Release);
    } else {
        let stall_end = STALL_END.load(Ordering::Acquire);
        if expired.fired_at < stall_end {
            checks::fail!(
                "the hostile timer's re-arming fired at {} while its previous callback still ran (until {})",
                expired.fired_at,
                stall_end
            );
        }
        DONE.store(true, Ordering::Release);
    }
}
