//! `ping-pong`: each vCPU owns one MOVABLE timer and re-arms it on itself as soon as it has expired,
//! wherever it fired. Under the pull policy an idle owner's timer is expired by another vCPU, and the
//! owner, woken by its own pinned sleep timer (polling every 200 us), re-arms it: the ping-pong cost the
//! pull model pays. The owner first sleeps until 200 us past the deadline. Checks (checks.rs): every arming fires exactly once, for its owner, never early;
//! counts the rounds and how many fired remotely.

use super::Env;
use crate::checks;
use crate::runtime::arena;
use crate::runtime::device::{status, Expired, MOVABLE};
use crate::runtime::rand::Rng;
use crate::runtime::sync::Published;
use crate::runtime::time::{self, MS, US};
use crate::runtime::{percpu, vm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

struct State {
    /// Per owner: its timer has fired since it last armed it.
    expired: &'static [AtomicBool],
    rounds: &'static [AtomicU64],
    remote: &'static [AtomicU64],
}

static STATE: Published<State> = Published::new();
static DONE: AtomicU32 = AtomicU32::new(0);

pub fn run(env: &Env) -> ! {
    let id = env.ids_of(1, env.cpu).start;
    let cpu = env.cpu as usize;
    if env.cpu == 0 {
        checks::create_book();
        let n = env.vcpus as usize;
        STATE.publish(arena::leak(State {
            expired: arena::alloc(n),
            rounds: arena::alloc(n),
            remote: arena::alloc(n),
        }));
    }
    let (book, state) = (checks::book(), STATE.get());
    let mut rng = Rng::new(env.seed, u64::from(env.cpu));
    let end = env.start + env.duration;
    loop {
        let now = time::now();
        if now >= end {
            break;
        }
        let deadline = now + rng.range(MS, 4 * MS);
        state.expired[cpu].store(false, Ordering::Relaxed);
        if book.arm(id, MOVABLE, deadline, deadline - now).status != status::OK {
            continue; // PAST: this vCPU was held up for over a millisecond; nothing armed
        }
        // Asleep past the deadline, so that under the pull policy another vCPU can expire it first.
        time::sleep_until(deadline + 200 * US);
        if !time::poll_until(deadline + 500 * MS, 200 * US, || {
            state.expired[cpu].load(Ordering::Acquire)
        }) {
            checks::fail!(
                "timer {} (deadline {}) did not fire within 500 ms",
                id,
                deadline
            );
            break;
        }
        state.rounds[cpu].fetch_add(1, Ordering::Relaxed);
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    if env.cpu != 0 {
        vm::halt_forever();
    }
    while DONE.load(Ordering::Acquire) < env.vcpus {
        crate::arch::pause();
    }
    book.check_quiescent(env.ids(env.vcpus));
    let sum = |v: &[AtomicU64]| v.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    super::finish(
        env,
        format_args!(
            "rounds={} fired_remotely={} {}",
            sum(state.rounds),
            sum(state.remote),
            book.summary()
        ),
    )
}

pub fn on_timer(expired: &Expired) {
    let state = STATE.get();
    let _callback = checks::book().enter(expired);
    // Timer i belongs to vCPU i (ids_of(1, i)); only its owner arms it.
    let owner = expired.id as usize;
    if percpu::index() as usize != owner {
        state.remote[owner].fetch_add(1, Ordering::Relaxed);
    }
    state.expired[owner].store(true, Ordering::Release);
}
