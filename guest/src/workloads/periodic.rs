//! Periodic timers, shared by `idle-movable`, `all-idle`, `mixed` and `never-ack`. Each callback re-arms
//! its timer at the previous deadline + period on the vCPU it runs on (as a kernel timer re-armed in its
//! callback stays there); if that is already past, at now + period, counting a skip and the periods lost.
//!
//! Callbacks of a deadline at or after the workload's end re-arm nothing (see `PeriodicSet::end`), and T
//! below is the earlier of the stop and that end.
//!
//! Check, after `stop_and_check`: a timer started at t0 with period P and stopped at T should have fired
//! N = floor((T - t0) / P) times; it may miss the last one (still on its way) and the periods its skips
//! lost, and it can fire at most once more (the arming pending when it was stopped):
//! N - 1 - skips - lost <= fired <= N + 1. An arming already due at T but still pending when it is
//! cancelled was late, not lost by quietvm: its periods up to T count as lost too.

use crate::checks::{self, Book};
use crate::runtime::arena::{self, Zeroable};
use crate::runtime::device::{status, Expired};
use crate::runtime::rand::Rng;
use crate::runtime::sync::Published;
use crate::runtime::time::{self, US};
use crate::runtime::vm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

pub struct Periodic {
    id: AtomicU32,
    flags: AtomicU32,
    period: AtomicU64,
    /// When it was started (0 = never).
    t0: AtomicU64,
    fires: AtomicU64,
    skips: AtomicU64,
    lost: AtomicU64,
    /// The deadline of the latest successful arming.
    armed_for: AtomicU64,
}

// SAFETY: atomics only.
unsafe impl Zeroable for Periodic {}

pub struct PeriodicSet {
    book: &'static Book,
    first_id: u32,
    timers: &'static [Periodic],
    stopping: AtomicBool,
    /// Guest time at which the workload ends: a callback of a deadline at or after it re-arms nothing,
    /// so the timers die out by themselves even if vCPU 0 never gets back to its main code to stop
    /// them (on a slow host timers gather on the vCPUs that run callbacks, since a re-arm makes the
    /// running vCPU the owner, until one of them gets callbacks faster than it runs them and its
    /// doorbell handler never returns: seen as a 64-vCPU `hotplug` run that never ended).
    end: u64,
}

static SET: Published<PeriodicSet> = Published::new();

/// The common start of the periodic workloads: vCPU 0 creates the book and a set of `per_cpu` timers
/// for every vCPU (periods 1-10 ms, flags `flags_of(i)`), and every vCPU starts its own share.
pub fn start_per_cpu(
    env: &super::Env,
    per_cpu: u32,
    flags_of: impl Fn(u32) -> u32,
) -> &'static PeriodicSet {
    let all = env.ids(per_cpu * env.vcpus);
    if env.cpu == 0 {
        let book = crate::checks::create_book();
        create(
            book,
            all.start,
            all.len() as u32,
            &mut Rng::new(env.seed, 0),
            time::MS..10 * time::MS,
            env.start + env.duration,
            flags_of,
        );
    }
    let set = set();
    for id in env.ids_of(per_cpu, env.cpu) {
        set.start(id);
    }
    set
}

/// Creates the set (one vCPU; the others call `set()`): timers `first_id ..` with `flags_of(i)` and
/// periods drawn from `periods` (ns), which the args `period_min_us` / `period_max_us`
/// override (to size a workload to the host: 64 vCPUs at 1-10 ms is more than 2 host cores can serve).
pub fn create(
    book: &'static Book,
    first_id: u32,
    count: u32,
    rng: &mut Rng,
    periods: core::ops::Range<u64>,
    end: u64,
    flags_of: impl Fn(u32) -> u32,
) -> &'static PeriodicSet {
    let (min_period, max_period) = (periods.start, periods.end);
    let min_period = super::arg_u64("period_min_us", min_period / US) * US;
    let max_period = super::arg_u64("period_max_us", max_period / US) * US;
    if min_period == 0 || max_period <= min_period {
        vm::usage_error(format_args!(
            "guest: need 0 < period_min_us < period_max_us"
        ));
    }
    let timers = arena::alloc::<Periodic>(count as usize);
    for (i, t) in timers.iter().enumerate() {
        let i = i as u32;
        t.id.store(first_id + i, Ordering::Relaxed);
        t.flags.store(flags_of(i), Ordering::Relaxed);
        // Whole microseconds, for readable messages.
        t.period.store(
            rng.range(min_period / US, max_period / US) * US,
            Ordering::Relaxed,
        );
    }
    let set = arena::leak(PeriodicSet {
        book,
        first_id,
        timers,
        stopping: AtomicBool::new(false),
        end,
    });
    SET.publish(set);
    set
}

pub fn set() -> &'static PeriodicSet {
    SET.get()
}

/// The workload callback for a set's timers.
pub fn on_timer(expired: &Expired) {
    if !set().on_timer(expired) {
        checks::fail!("timer {} is not one of the periodic timers", expired.id);
    }
}

impl PeriodicSet {
    fn get(&self, id: u32) -> Option<&Periodic> {
        self.timers.get(id.checked_sub(self.first_id)? as usize)
    }

    pub fn ids(&self) -> core::ops::Range<u32> {
        self.first_id..self.first_id + self.timers.len() as u32
    }

    /// Starts timer `id` on this vCPU: first deadline now + period.
    pub fn start(&self, id: u32) {
        let t = self.get(id).expect("start: not in the set");
        let now = time::now();
        let period = t.period.load(Ordering::Relaxed);
        t.t0.store(now, Ordering::Relaxed);
        self.arm(t, now + period);
    }

    /// Arms at `deadline`, or at now + period if that is past (a skip).
    fn arm(&self, t: &Periodic, deadline: u64) {
        let (id, flags, period) = (
            t.id.load(Ordering::Relaxed),
            t.flags.load(Ordering::Relaxed),
            t.period.load(Ordering::Relaxed),
        );
        let mut deadline = deadline;
        loop {
            let reply = self.book.arm(id, flags, deadline, period);
            if reply.status != status::PAST {
                t.armed_for.store(deadline, Ordering::Relaxed);
                return;
            }
            t.skips.fetch_add(1, Ordering::Relaxed);
            t.lost.fetch_add(
                (reply.now - (deadline - period)) / period,
                Ordering::Relaxed,
            );
            deadline = reply.now + period;
        }
    }

    /// The callback: true if `expired` is one of ours.
    pub fn on_timer(&self, expired: &Expired) -> bool {
        let Some(t) = self.get(expired.id) else {
            return false;
        };
        let _callback = self.book.enter(expired);
        t.fires.fetch_add(1, Ordering::Relaxed);
        if !self.stopping.load(Ordering::Acquire) && expired.deadline < self.end {
            self.arm(t, expired.deadline + t.period.load(Ordering::Relaxed));
        }
        true
    }

    /// Stops every timer (callbacks stop re-arming, then `CANCEL_SYNC` each) and checks its count.
    /// Returns (timers, fires, skips).
    pub fn stop_and_check(&self) -> (u32, u64, u64) {
        // Stop re-arming first, then read the time: every arming was then made before `stop`, by a
        // callback of a deadline before it, so a timer has fired at most N + 1 times. Read the other
        // way round, a vCPU 0 descheduled between the two (a loaded host) let callbacks elsewhere
        // re-arm and fire past `stop`, and the check counted fires it had not allowed for.
        self.stopping.store(true, Ordering::Release);
        // No timer re-arms past `end`, so the counts are for the time up to it even when vCPU 0
        // comes here late.
        let stop = time::now().min(self.end);
        // An arming that was already due at `stop` but still pending when cancelled is late, not
        // missing: a starved host (many busy vCPU threads on few cores) delays delivery past the stop.
        for t in self.timers {
            if t.t0.load(Ordering::Relaxed) != 0 {
                let (was_pending, _) = self.book.cancel_sync(t.id.load(Ordering::Relaxed));
                let due = t.armed_for.load(Ordering::Relaxed);
                if was_pending && due <= stop {
                    let period = t.period.load(Ordering::Relaxed);
                    t.lost
                        .fetch_add((stop - due) / period + 1, Ordering::Relaxed);
                }
            }
        }
        let (mut started, mut fires, mut skips) = (0, 0, 0);
        for t in self.timers {
            let t0 = t.t0.load(Ordering::Relaxed);
            if t0 == 0 {
                continue;
            }
            let id = t.id.load(Ordering::Relaxed);
            let period = t.period.load(Ordering::Relaxed);
            let fired = t.fires.load(Ordering::Relaxed);
            let (skipped, lost) = (
                t.skips.load(Ordering::Relaxed),
                t.lost.load(Ordering::Relaxed),
            );
            let n = stop.saturating_sub(t0) / period;
            let low = n.saturating_sub(1 + skipped + lost);
            if fired < low || fired > n + 1 {
                checks::fail!(
                    "periodic timer {} (period {} us, {} skips losing {} periods) fired {} times in {} us, expected {}..={}",
                    id,
                    period / US,
                    skipped,
                    lost,
                    fired,
                    (stop - t0) / US,
                    low,
                    n + 1
                );
            }
            started += 1;
            fires += fired;
            skips += skipped;
        }
        self.book.check_quiescent(self.ids());
        (started, fires, skips)
    }
}
