//! The replay: a trace's timeline through the real [`TimerService`] under one policy, on virtual
//! time ([`FakeClock`]).
//!
//! The trace fixes *when each CPU runs*: every CPU is running outside its idle spans and runs at
//! least from each idle exit the trace shows. Inside an idle span the CPU is halted
//! (`vcpu_halt`), and the policy decides whether it must wake before the trace's own exit: at the
//! time `vcpu_halt` returned (plus the wake latency), or when the service asks for a kick. Such a
//! *policy-made* wakeup runs `vcpu_run` + `expire` and halts again at once (the trace says the
//! CPU is idle); so does the trace's own exit, after which the CPU runs on, as a running vCPU does
//! in the VMM: `expire` at each `next_event` (plus the exit cost). The trace's `timer_start` and
//! `timer_cancel` are replayed at their time on the CPU that traced them (a timer is queued on the
//! wheel `cpu=` names, usually that CPU): callbacks are not re-run, what they armed is replayed as
//! the kernel recorded it.
//!
//! **Deferrable timers** do not go to the service: as in the kernel (where they live in a per-CPU
//! `BASE_DEF` wheel that is not part of the hierarchy and not looked at when the tick stops) each
//! one stays on its own CPU, fires on time while that CPU runs, never wakes it when idle, and is
//! expired by that CPU at its next wakeup of any kind. They are counted apart and never count as
//! missed.
//!
//! **Wakeups counted** are idle CPUs' wakeups for timers: a policy-made wakeup that expired at least
//! one non-deferrable timer, or a trace exit at which the CPU found such timers due (it would have
//! had to wake for them anyway: the kernel's own timer wakeups are among the trace's exits). Each
//! has one cause, by the base of what it expired: an own pinned timer, else an own movable one,
//! else other CPUs' timers (as migrator or last idle CPU). Policy-made wakeups that expired
//! nothing (a kick, a stale wake time) are counted as `other_wakeups`.
//!
//! **Windows** (`--windows wheel`): the kernel's wheel already coalesces: it files a timer due at
//! jiffy `expires` in a bucket that expires at `bucket_expiry` (up to 12.5 % of the timeout later
//! on the coarser levels), so the timer's contract tolerates any time in between. With windows,
//! each non-deferrable arming goes to the service with its deadline at the start of `expires` and
//! its slack up to the start of `bucket_expiry` (docs/replay.md); without (the default), with its
//! deadline at `bucket_expiry` and no slack, as before. Deferrable timers stay as they are (they
//! never wake anyone). The trace's hrtimers are not replayed at all (the parser skips their events):
//! they are per-CPU in the kernel, not part of its hierarchy, and would keep slack 0.
//!
//! **The optimum** ([`crate::optimum`]): the fewest idle-CPU wakeups that could have served every
//! non-deferrable arming this policy fired inside its window, given when the trace's CPUs run
//! anyway: a movable window that meets any CPU's running span (outside its trace idle spans) needs
//! no wakeup, nor a pinned one that meets its own CPU's; the rest is interval stabbing (movable
//! ones machine-wide, pinned ones per CPU). The policy's wakeups it made itself
//! (`timer_wakeups_policy_made`) are set against it: a window none of the trace's running spans
//! meets can only be served by a policy-made wakeup (or after the window's end).
//!
//! Checked on every expiry: a timer fires with the deadline it was armed with and not before it,
//! not after a cancel or a re-arm, and a pinned one only on the CPU whose wheel it was queued on;
//! at the end no non-deferrable arming is still pending more than [`MISS_GRACE_NS`] plus the wake
//! latency and exit cost after its deadline, the `arm`/`cancel` results agree with the record, and
//! `TimerService::check_invariants` holds.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::mem;

use serde::Serialize;
use tmigr::clock::FakeClock;
use tmigr::service::{
    CpuId, Expired, Policy, ServiceConfig, TimerId, TimerKind, TimerService, KTIME_MAX,
};

use super::timeline::{Op, OpKind, Timeline};
use crate::optimum::{BusySpans, Optimum, OptimumBuilder};
use crate::simulate::MISS_GRACE_NS;
use quietvm_vmm::accounting::{ExpiryCounts, Lateness, LatenessRecorder, WakeupCause};

/// Costs of the replayed machine (as `quietvm simulate`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Costs {
    /// From a halted CPU's wake time (or kick) to its `vcpu_run`.
    pub wake_latency_ns: u64,
    /// From a running CPU's `next_event` (or kick) to its `expire`.
    pub exit_cost_ns: u64,
}

/// Which window each arming gets (`quietvm replay --windows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Windows {
    /// Deadline at the wheel's bucket, no slack (what the replay always did).
    #[default]
    None,
    /// `[expires, bucket_expiry]`: the window the wheel's rounding grants (module docs).
    Wheel,
}

impl Windows {
    pub fn name(self) -> &'static str {
        match self {
            Windows::None => "none",
            Windows::Wheel => "wheel",
        }
    }
}

/// Correctness checks (all must be 0 / "ok").
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Checks {
    /// Fired before their deadline.
    pub early: u64,
    /// Still pending at the end although due long before it.
    pub missed: u64,
    /// Pinned timers expired on a CPU other than the one whose wheel they were queued on.
    pub pinned_off_cpu: u64,
    /// Expiries of a timer not pending with that deadline.
    pub bogus: u64,
    /// `arm`/`cancel` results that disagree with the record.
    pub api_mismatches: u64,
    /// `TimerService::check_invariants` at the end.
    pub invariants: String,
}

impl Checks {
    /// What failed, one phrase each.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for (n, v) in [
            ("early", self.early),
            ("missed", self.missed),
            ("pinned off their CPU", self.pinned_off_cpu),
            ("bogus", self.bogus),
            ("api mismatches", self.api_mismatches),
        ] {
            if v != 0 {
                f.push(format!("{v} {n}"));
            }
        }
        if self.invariants != "ok" {
            f.push(format!("invariants: {}", self.invariants));
        }
        f
    }
}

/// What one policy did with the trace.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PolicyFigures {
    pub policy: String,
    /// The windows the armings had.
    pub windows: Windows,
    /// Idle CPUs' wakeups for timers (policy-made or at a trace exit, see the module docs).
    pub timer_wakeups: u64,
    pub timer_wakeups_own_pinned: u64,
    pub timer_wakeups_own_movable: u64,
    pub timer_wakeups_remote: u64,
    /// ... of which the policy made (the trace shows the CPU asleep on).
    pub timer_wakeups_policy_made: u64,
    /// Policy-made wakeups that expired no timer (kicks, stale wake times).
    pub other_wakeups: u64,
    /// Non-deferrable timers fired.
    pub expired: u64,
    /// ... by a CPU other than the one whose wheel they were queued on.
    pub remote_expiries: u64,
    /// ... (and deferrable ones) on a CPU other than the one that armed them.
    pub expired_off_arming_cpu: u64,
    pub lateness_ns: Lateness,
    pub deferrable_expired: u64,
    /// Deferrable timers still waiting at the end for their idle CPU to wake.
    pub deferrable_pending_at_end: u64,
    pub deferrable_lateness_ns: Lateness,
    /// Armings replaced before they fired, and cancelled.
    pub replaced: u64,
    pub cancelled: u64,
    /// Service counters.
    pub svc_halts: u64,
    pub svc_kicks: u64,
    pub svc_push_remote_placements: u64,
    /// Hierarchy: idle CPUs' timers handled by a migrator (the kernel's
    /// `tmigr_handle_remote_cpu` that expired something), and back-offs.
    pub remote_cpu_handled: u64,
    pub remote_backoffs: u64,
    pub checks: Checks,
    /// Steps the replay took.
    pub steps: u64,
    /// Non-deferrable timers fired after the end of their window (the deadline without windows):
    /// the wake latency, the exit cost, or the policy's delay (counted, not a failure).
    pub after_window: u64,
    /// The fewest idle-CPU wakeups that could have served what this run fired (module docs).
    pub optimum: Optimum,
    /// `timer_wakeups_policy_made / optimum.total` (`null` if the optimum is 0).
    pub policy_made_per_optimum: Option<f64>,
}

impl PolicyFigures {
    /// The column heading: the policy, and `+wheel` with windows.
    pub fn label(&self) -> String {
        match self.windows {
            Windows::None => self.policy.clone(),
            Windows::Wheel => format!("{}+wheel", self.policy),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arming {
    Idle,
    Pending {
        deadline: u64,
        slack: u64,
        armed_by: CpuId,
        base: CpuId,
        kind: TimerKind,
    },
    Deferred {
        deadline: u64,
        armed_by: CpuId,
        base: CpuId,
    },
}

#[derive(Default)]
struct CpuState {
    /// Halted in the service (only ever inside a trace idle span).
    halted: bool,
    /// When its pending look runs (`KTIME_MAX`: none).
    look_at: u64,
    look_gen: u32,
    /// Deferrable timers queued on it: (deadline, id).
    deferred: BTreeSet<(u64, TimerId)>,
}

struct Engine<'a> {
    tl: &'a Timeline,
    costs: Costs,
    policy: Policy,
    svc: TimerService<FakeClock>,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, CpuId, u32)>>,
    cpus: Vec<CpuState>,
    armings: Vec<Arming>,
    expired: Vec<Expired>,
    kick_buf: Vec<CpuId>,
    fig: PolicyFigures,
    windows: Windows,
    optimum: OptimumBuilder,
    late: LatenessRecorder,
    def_late: LatenessRecorder,
}

/// Replays `tl` under `policy`.
/// A replay that stopped: a bug in the service or the engine, never the trace's fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{policy}: no progress at t={at_ns} ns (a bug in the service or the replay)")]
    NoProgress { policy: Policy, at_ns: u64 },
    #[error("{policy}: CPU {cpu} cannot halt at t={at_ns} ns: its wake time stays in the past")]
    CannotHalt {
        policy: Policy,
        cpu: CpuId,
        at_ns: u64,
    },
}

pub fn replay(tl: &Timeline, policy: Policy, costs: Costs) -> Result<PolicyFigures, EngineError> {
    replay_with(tl, policy, costs, Windows::None)
}

/// Replays `tl` under `policy` with the given windows.
pub fn replay_with(
    tl: &Timeline,
    policy: Policy,
    costs: Costs,
    windows: Windows,
) -> Result<PolicyFigures, EngineError> {
    let mut e = Engine::new(tl, policy, costs);
    e.windows = windows;
    e.fig.windows = windows;
    e.run()?;
    Ok(e.finish())
}

impl<'a> Engine<'a> {
    fn new(tl: &'a Timeline, policy: Policy, costs: Costs) -> Self {
        let svc = TimerService::new(
            ServiceConfig {
                policy,
                max_timers: tl.timers.max(1),
                ..ServiceConfig::default()
            },
            FakeClock::new(0),
            tl.cpus,
        );
        Engine {
            tl,
            costs,
            policy,
            svc,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            cpus: (0..tl.cpus)
                .map(|_| CpuState {
                    look_at: KTIME_MAX,
                    ..CpuState::default()
                })
                .collect(),
            armings: vec![Arming::Idle; tl.timers as usize],
            expired: Vec::new(),
            kick_buf: Vec::new(),
            fig: PolicyFigures {
                policy: policy.to_string(),
                ..PolicyFigures::default()
            },
            windows: Windows::None,
            optimum: OptimumBuilder::new(),
            late: LatenessRecorder::new(),
            def_late: LatenessRecorder::new(),
        }
    }

    fn run(&mut self) -> Result<(), EngineError> {
        for c in 0..self.tl.cpus {
            if self.tl.initially_idle[c as usize] {
                self.halt(c)?;
            } else {
                self.program(c);
            }
        }
        self.deliver_kicks(CpuId::MAX);
        let tl: &'a Timeline = self.tl;
        let ops = &tl.ops;
        let mut i = 0;
        let mut same_time = 0u64;
        loop {
            let op_t = ops.get(i).map_or(KTIME_MAX, |o| o.t);
            let look = self.heap.peek().map(|Reverse(l)| *l);
            let t = match look {
                Some((lt, ..)) if lt <= op_t && lt <= tl.end => lt,
                _ if op_t != KTIME_MAX => op_t,
                _ => break,
            };
            if t == self.now {
                same_time += 1;
                if same_time > 1_000_000 {
                    return Err(EngineError::NoProgress {
                        policy: self.policy,
                        at_ns: t,
                    });
                }
            } else {
                same_time = 0;
            }
            self.now = t;
            self.svc.clock().set(t);
            self.fig.steps += 1;
            match look {
                Some((lt, _, cpu, gen)) if lt == t && lt <= op_t => {
                    self.heap.pop();
                    if gen == self.cpus[cpu as usize].look_gen {
                        self.look(cpu)?;
                    }
                }
                _ => {
                    let op = ops[i];
                    i += 1;
                    self.op(op)?;
                }
            }
        }
        self.now = tl.end;
        self.svc.clock().set(tl.end);
        Ok(())
    }

    fn set_look(&mut self, cpu: CpuId, at: u64) {
        let s = &mut self.cpus[cpu as usize];
        s.look_gen = s.look_gen.wrapping_add(1);
        s.look_at = at;
        let gen = s.look_gen;
        if at != KTIME_MAX {
            self.seq += 1;
            self.heap.push(Reverse((at, self.seq, cpu, gen)));
        }
    }

    fn op(&mut self, op: Op) -> Result<(), EngineError> {
        let c = op.cpu;
        match op.kind {
            OpKind::IdleEnter => {
                if self.policy == Policy::Push {
                    self.svc.set_push_idle(c, false);
                }
                if !self.cpus[c as usize].halted {
                    self.halt(c)?;
                }
            }
            OpKind::IdleExit { early } => {
                if self.cpus[c as usize].halted {
                    self.cpus[c as usize].halted = false;
                    self.svc.vcpu_run(c);
                    let found = self.expire(c);
                    if found.any() {
                        self.count_timer_wakeup(found, false);
                    }
                }
                // An interrupt in idle: the kernel's old push placement saw the idle task.
                if early && self.policy == Policy::Push {
                    self.svc.set_push_idle(c, true);
                }
                self.program(c);
                self.deliver_kicks(c);
            }
            OpKind::IdleExitLate => {
                if self.policy == Policy::Push {
                    self.svc.set_push_idle(c, false);
                }
            }
            OpKind::Arm {
                id,
                base,
                deadline,
                earliest,
                kind,
                deferrable,
            } => {
                let window = match self.windows {
                    Windows::Wheel => (earliest.min(deadline), deadline),
                    Windows::None => (deadline, deadline),
                };
                self.arm(c, id, base, window, kind, deferrable);
                self.deliver_kicks(c);
            }
            OpKind::Cancel { id } => {
                self.cancel(id);
                self.deliver_kicks(c);
            }
        }
        Ok(())
    }

    /// A look came: a running CPU exits, a halted one wakes (policy-made).
    fn look(&mut self, c: CpuId) -> Result<(), EngineError> {
        self.cpus[c as usize].look_at = KTIME_MAX;
        if self.cpus[c as usize].halted {
            self.cpus[c as usize].halted = false;
            self.svc.vcpu_run(c);
            let found = self.expire(c);
            if found.any() {
                self.count_timer_wakeup(found, true);
            } else {
                self.fig.other_wakeups += 1;
            }
            self.deliver_kicks(c);
            // The trace says it is idle: halt again at once.
            self.halt(c)
        } else {
            self.expire(c);
            self.deliver_kicks(c);
            self.program(c);
            Ok(())
        }
    }

    fn count_timer_wakeup(&mut self, f: ExpiryCounts, policy_made: bool) {
        self.fig.timer_wakeups += 1;
        self.fig.timer_wakeups_policy_made += policy_made as u64;
        match f.timer_cause() {
            Some(WakeupCause::OwnPinnedTimer) => self.fig.timer_wakeups_own_pinned += 1,
            Some(WakeupCause::OwnMovableTimer) => self.fig.timer_wakeups_own_movable += 1,
            _ => self.fig.timer_wakeups_remote += 1,
        }
    }

    /// `c` halts; if its wake time has passed already it runs again at once (no wakeup counted,
    /// the VMM's rule) and halts again.
    fn halt(&mut self, c: CpuId) -> Result<(), EngineError> {
        for _ in 0..64 {
            let wake = self.svc.vcpu_halt(c);
            self.cpus[c as usize].halted = true;
            self.deliver_kicks(c);
            if wake > self.now {
                let at = if wake == KTIME_MAX {
                    KTIME_MAX
                } else {
                    wake.saturating_add(self.costs.wake_latency_ns)
                };
                self.set_look(c, at);
                return Ok(());
            }
            self.cpus[c as usize].halted = false;
            self.svc.vcpu_run(c);
            self.expire(c);
            self.deliver_kicks(c);
        }
        Err(EngineError::CannotHalt {
            policy: self.policy,
            cpu: c,
            at_ns: self.now,
        })
    }

    /// A running `c` enters the "guest" until its next event (or deferrable timer).
    fn program(&mut self, c: CpuId) {
        let mut t = self.svc.next_event(c);
        if let Some(&(d, _)) = self.cpus[c as usize].deferred.first() {
            t = t.min(d);
        }
        let at = if t == KTIME_MAX {
            KTIME_MAX
        } else {
            t.max(self.now).saturating_add(self.costs.exit_cost_ns)
        };
        self.set_look(c, at);
    }

    /// `expire` on running `c`, plus its due deferrable timers; checks and counts each expiry.
    fn expire(&mut self, c: CpuId) -> ExpiryCounts {
        let mut buf = mem::take(&mut self.expired);
        buf.clear();
        self.svc.expire(c, &mut buf);
        let mut found = ExpiryCounts::default();
        for e in &buf {
            found.count(c, e);
            let Arming::Pending {
                deadline,
                slack,
                armed_by,
                base,
                kind,
            } = self.armings[e.id as usize]
            else {
                self.fig.checks.bogus += 1;
                continue;
            };
            if deadline != e.deadline || slack != e.slack {
                self.fig.checks.bogus += 1;
                continue;
            }
            self.armings[e.id as usize] = Arming::Idle;
            self.fig.expired += 1;
            self.fig.after_window += (self.now > deadline.saturating_add(slack)) as u64;
            self.optimum
                .add(base, kind == TimerKind::Pinned, deadline, slack);
            if self.now < deadline {
                self.fig.checks.early += 1;
            }
            self.late.record(self.now.saturating_sub(deadline));
            if e.owner != c {
                self.fig.remote_expiries += 1;
            }
            if armed_by != c {
                self.fig.expired_off_arming_cpu += 1;
            }
            if kind == TimerKind::Pinned && base != c {
                self.fig.checks.pinned_off_cpu += 1;
            }
        }
        self.expired = buf;
        // Deferrable timers due on this CPU.
        while let Some(&(d, id)) = self.cpus[c as usize].deferred.first() {
            if d > self.now {
                break;
            }
            self.cpus[c as usize].deferred.pop_first();
            if let Arming::Deferred { armed_by, .. } = self.armings[id as usize] {
                self.armings[id as usize] = Arming::Idle;
                self.fig.deferrable_expired += 1;
                self.def_late.record(self.now - d);
                if armed_by != c {
                    self.fig.expired_off_arming_cpu += 1;
                }
            }
        }
        found
    }

    /// Withdraws `id`'s pending arming, if any; true if there was one.
    fn withdraw(&mut self, id: TimerId) -> bool {
        match self.armings[id as usize] {
            Arming::Idle => {
                if self.svc.cancel(id) {
                    self.fig.checks.api_mismatches += 1;
                }
                false
            }
            Arming::Pending { .. } => {
                if !self.svc.cancel(id) {
                    self.fig.checks.api_mismatches += 1;
                }
                true
            }
            Arming::Deferred { deadline, base, .. } => {
                self.cpus[base as usize].deferred.remove(&(deadline, id));
                true
            }
        }
    }

    fn arm(
        &mut self,
        actor: CpuId,
        id: TimerId,
        base: CpuId,
        (earliest, deadline): (u64, u64),
        kind: TimerKind,
        deferrable: bool,
    ) {
        // The kernel fires a timer armed in the past at its next tick; the service wants a
        // deadline in the future.
        let end = deadline.max(self.now + 1);
        let deadline = earliest.max(self.now + 1);
        let slack = end - deadline;
        let prev = self.armings[id as usize];
        let was_pending = !matches!(prev, Arming::Idle);
        if was_pending {
            self.fig.replaced += 1;
        }
        if deferrable {
            // Deferrable timers keep the wheel's bucket: they never wake anyone anyway.
            self.withdraw(id);
            self.cpus[base as usize].deferred.insert((end, id));
            self.armings[id as usize] = Arming::Deferred {
                deadline: end,
                armed_by: actor,
                base,
            };
            if !self.cpus[base as usize].halted {
                self.program(base);
            }
            return;
        }
        if let Arming::Deferred {
            deadline: d,
            base: b,
            ..
        } = prev
        {
            self.cpus[b as usize].deferred.remove(&(d, id));
        }
        let was = self.svc.arm(base, id, deadline, slack, kind);
        if was != matches!(prev, Arming::Pending { .. }) {
            self.fig.checks.api_mismatches += 1;
        }
        self.armings[id as usize] = Arming::Pending {
            deadline,
            slack,
            armed_by: actor,
            base,
            kind,
        };
        // The arming CPU expires what is due and re-reads its next event, as the VMM's vCPU loop
        // does after every exit. Re-programming alone would push a due expiry back by one exit cost
        // at each arm: on a dense trace (arms 2 us apart) it would never come, and be "missed".
        if !self.cpus[actor as usize].halted {
            self.expire(actor);
            self.deliver_kicks(actor);
            self.program(actor);
        }
    }

    fn cancel(&mut self, id: TimerId) {
        if self.withdraw(id) {
            self.fig.cancelled += 1;
        }
        self.armings[id as usize] = Arming::Idle;
    }

    /// Delivers the service's kicks, except to `actor` (it re-reads its own time).
    fn deliver_kicks(&mut self, actor: CpuId) {
        let mut buf = mem::take(&mut self.kick_buf);
        buf.clear();
        self.svc.take_kicks(&mut buf);
        for &k in &buf {
            if k == actor {
                continue;
            }
            let s = &self.cpus[k as usize];
            let at = self.now
                + if s.halted {
                    self.costs.wake_latency_ns
                } else {
                    self.costs.exit_cost_ns
                };
            if at < s.look_at {
                self.set_look(k, at);
            }
        }
        self.kick_buf = buf;
    }

    fn finish(mut self) -> PolicyFigures {
        let grace = MISS_GRACE_NS + self.costs.wake_latency_ns + self.costs.exit_cost_ns;
        let end = self.tl.end;
        for a in &self.armings {
            match *a {
                Arming::Pending {
                    deadline, slack, ..
                } if deadline.saturating_add(slack).saturating_add(grace) < end => {
                    self.fig.checks.missed += 1;
                }
                Arming::Deferred { .. } => self.fig.deferrable_pending_at_end += 1,
                _ => {}
            }
        }
        self.fig.lateness_ns = self.late.summary();
        self.fig.deferrable_lateness_ns = self.def_late.summary();
        self.fig.checks.invariants = match self.svc.check_invariants() {
            Ok(()) => "ok".to_string(),
            Err(e) => e,
        };
        let s = self.svc.stats();
        self.fig.svc_halts = s.halts;
        self.fig.svc_kicks = s.kicks;
        self.fig.svc_push_remote_placements = s.push_remote_placements;
        self.fig.remote_cpu_handled = s.hierarchy.remote_cpu_handled;
        self.fig.remote_backoffs = s.hierarchy.remote_backoffs;
        let optimum = mem::take(&mut self.optimum).finish_with_busy(&busy_spans(self.tl));
        self.fig.policy_made_per_optimum = (optimum.total > 0)
            .then(|| self.fig.timer_wakeups_policy_made as f64 / optimum.total as f64);
        self.fig.optimum = optimum;
        self.fig
    }
}

/// When each CPU of the trace runs: outside its idle spans (an idle exit ended early by an
/// interrupt in idle counts from that event, as the timeline puts it), from 0 to the trace's end.
pub fn busy_spans(tl: &Timeline) -> BusySpans {
    let n = tl.cpus as usize;
    let mut per_cpu: Vec<Vec<(u64, u64)>> = vec![Vec::new(); n];
    // The start of each CPU's current running span, if it runs.
    let mut since: Vec<Option<u64>> = (0..n)
        .map(|c| (!tl.initially_idle[c]).then_some(0))
        .collect();
    for op in &tl.ops {
        let c = op.cpu as usize;
        match op.kind {
            OpKind::IdleEnter => {
                if let Some(from) = since[c].take() {
                    per_cpu[c].push((from, op.t));
                }
            }
            OpKind::IdleExit { .. } => {
                since[c].get_or_insert(op.t);
            }
            _ => {}
        }
    }
    for (c, s) in since.into_iter().enumerate() {
        if let Some(from) = s {
            per_cpu[c].push((from, tl.end.max(from)));
        }
    }
    BusySpans { per_cpu }
}
