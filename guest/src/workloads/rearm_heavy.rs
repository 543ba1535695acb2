//! `rearm-heavy`: most armings never fire. Each vCPU starts a set of `timers=` (default 8, at least 5)
//! timers 2-20 ms ahead (even ids PINNED, odd MOVABLE); each callback re-arms 3 timers of its set and
//! cancels 2 others, wherever it runs. After `duration_ms` vCPU 0 stops everything and checks every
//! arming (checks.rs): fired at most once, never after a cancel or re-arm said it would not, and
//! armed = fired + cancelled + replaced.
//!
//! The callbacks stop re-arming by themselves once they fire at or after the end (`duration_ms`), not
//! only when vCPU 0 sets `stopping`: each callback arms about 3 new armings 2-20 ms ahead, and every
//! re-arm makes the vCPU running the callback the owner, so on a slow host the sets gather on the few
//! vCPUs that run callbacks until one of them, vCPU 0 included, gets them faster than it can run them.
//! Its doorbell handler then never `POP`s `EMPTY` and never returns to its main code, so a stop left to
//! vCPU 0's main code would never come (64 vCPUs on a loaded 2-core host: about 1 run in 20 hung).

use super::Env;
use crate::checks::{self, Book};
use crate::runtime::arena;
use crate::runtime::device::{Expired, MOVABLE, PINNED};
use crate::runtime::rand::{self, Rng};
use crate::runtime::sync::Published;
use crate::runtime::time::{self, MS};
use crate::runtime::{percpu, vm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

struct State {
    book: &'static Book,
    set_size: u32,
    /// One PRNG state per vCPU, for its callbacks.
    rng: &'static [AtomicU64],
    stopping: AtomicBool,
    /// The guest time at which the workload ends: a callback that fires at or after it re-arms nothing.
    end: u64,
}

static STATE: Published<State> = Published::new();

fn flags_of(id: u32) -> u32 {
    if id & 1 == 0 {
        PINNED
    } else {
        MOVABLE
    }
}

pub fn run(env: &Env) -> ! {
    let set_size = (super::arg_u64("timers", 8) as u32).max(5);
    let mine = env.ids_of(set_size, env.cpu);
    if env.cpu == 0 {
        let book = checks::create_book();
        let rng = arena::alloc::<AtomicU64>(env.vcpus as usize);
        for (cpu, state) in rng.iter().enumerate() {
            state.store(
                env.seed ^ (cpu as u64 + 1).wrapping_mul(0x51_7cc1_b727_220a),
                Ordering::Relaxed,
            );
        }
        STATE.publish(arena::leak(State {
            book,
            set_size,
            rng,
            stopping: AtomicBool::new(false),
            end: env.start + env.duration,
        }));
    }
    let state = STATE.get();
    let mut rng = Rng::new(env.seed, u64::from(env.cpu));
    let now = time::now();
    for id in mine {
        let timeout = rng.range(2 * MS, 20 * MS);
        state.book.arm(id, flags_of(id), now + timeout, timeout);
    }
    if env.cpu != 0 {
        vm::halt_forever();
    }
    time::sleep_until(env.start + env.duration);
    state.stopping.store(true, Ordering::Release);
    let all = env.ids(set_size * env.vcpus);
    // Two passes: a callback that began before `stopping` may re-arm timers the first pass had passed;
    // after the first pass every such callback has ended.
    for _ in 0..2 {
        for id in all.clone() {
            state.book.cancel_sync(id);
        }
    }
    state.book.check_quiescent(all);
    let t = state.book.totals();
    let never_fired = t.cancelled + t.rearmed;
    super::finish(
        env,
        format_args!(
            "{}% of armings cancelled or replaced before firing; {}",
            never_fired * 100 / t.armed.max(1),
            state.book.summary()
        ),
    )
}

pub fn on_timer(expired: &Expired) {
    let state = STATE.get();
    let _callback = state.book.enter(expired);
    // The time test does not need vCPU 0: the sets die out after the end even while vCPU 0 is still
    // in its doorbell handler (see the module comment).
    if state.stopping.load(Ordering::Acquire) || expired.fired_at >= state.end {
        return;
    }
    let n = state.set_size;
    let first = expired.id / n * n;
    let cpu = percpu::index() as usize;
    rand::with_state(&state.rng[cpu], |rng| {
        // 3 distinct timers of the set to re-arm, then 2 distinct others to cancel: a set never dies out.
        let mut order = [0u32; 64];
        let n = n.min(64);
        for (i, slot) in order.iter_mut().enumerate().take(n as usize) {
            *slot = i as u32;
        }
        for i in 0..5 {
            let j = rng.range(i, u64::from(n)) as usize;
            order.swap(i as usize, j);
        }
        for &offset in &order[..3] {
            let id = first + offset;
            let timeout = rng.range(2 * MS, 20 * MS);
            state
                .book
                .arm(id, flags_of(id), expired.fired_at + timeout, timeout);
        }
        for &offset in &order[3..5] {
            state.book.cancel(first + offset);
        }
    });
}
