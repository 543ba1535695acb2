//! The simulated guests: what each vCPU does at start, in its timer callbacks, when another vCPU
//! hands it work, and when a busy phase ends.
//!
//! A workload never calls the timer service: it answers each event with [`Action`]s, which the engine
//! applies on the vCPU the event happened on (so an `Arm` from a callback queues the timer on the vCPU
//! that runs the callback, as the kernel's `mod_timer` does since the pull model). All random draws are
//! keyed by timer or vCPU (see [`super::rng`]), so the three policies see the same guest.

use std::fmt;
use std::str::FromStr;

use tmigr::service::{CpuId, TimerId, TimerKind, KTIME_MAX};

use super::rng::Rng;

const MS: u64 = 1_000_000;
const US: u64 = 1_000;

/// The workloads `quietvm simulate` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// vCPU 0 busy all the time; every other vCPU only halts and owns periodic movable timers.
    OneBusy,
    /// Every vCPU only halts between the callbacks of its periodic movable timers.
    AllIdle,
    /// Three vCPUs in four work in bursts; every vCPU owns periodic movable timers.
    MostlyBusy,
    /// vCPU 0 busy; every vCPU owns a set of movable timers whose callbacks re-arm and cancel
    /// others of the set, so most armings never fire.
    RearmHeavy,
    /// vCPU 0 busy; every vCPU owns one movable timer and re-arms it on itself after every expiry,
    /// wherever that expiry happened.
    PingPong,
}

impl WorkloadKind {
    /// Every workload, in the order the docs list them.
    pub const ALL: [WorkloadKind; 5] = [
        WorkloadKind::OneBusy,
        WorkloadKind::AllIdle,
        WorkloadKind::MostlyBusy,
        WorkloadKind::RearmHeavy,
        WorkloadKind::PingPong,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::OneBusy => "one-busy",
            WorkloadKind::AllIdle => "all-idle",
            WorkloadKind::MostlyBusy => "mostly-busy",
            WorkloadKind::RearmHeavy => "rearm-heavy",
            WorkloadKind::PingPong => "ping-pong",
        }
    }

    /// Timers per vCPU when `--timers` is not given.
    pub fn default_timers(self) -> u32 {
        match self {
            WorkloadKind::RearmHeavy => 8,
            WorkloadKind::PingPong => 1,
            _ => 2,
        }
    }

    /// The smallest `--timers` the workload works with (rearm-heavy picks 4 others of a set).
    pub fn min_timers(self) -> u32 {
        match self {
            WorkloadKind::RearmHeavy => 5,
            _ => 1,
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WorkloadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkloadKind::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = WorkloadKind::ALL.iter().map(|w| w.name()).collect();
                format!("unknown workload `{s}` ({})", names.join(", "))
            })
    }
}

/// What a workload asks the engine to do, on the vCPU the event happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Arm (or re-arm) a timer from this vCPU.
    Arm {
        id: TimerId,
        deadline: u64,
        kind: TimerKind,
        /// The timer's period (periodic workloads), or 0 for its timeout (deadline minus now):
        /// what `--slack-pct` is a share of.
        span: u64,
    },
    /// Cancel a timer wherever it is pending.
    Cancel { id: TimerId },
    /// This vCPU stays in the guest, busy until the given time (`KTIME_MAX`: for ever).
    Busy { until: u64 },
    /// Hand work to another vCPU (an IPI): it is kicked and gets `msg` in [`Workload::on_message`].
    Post { to: CpuId, msg: u32 },
}

/// Per-timer state of the workloads.
#[derive(Clone, Copy, Debug, Default)]
struct TimerState {
    /// Periodic workloads: the period.
    period: u64,
    /// Armings of this timer so far (keys its random draws).
    armings: u64,
}

/// A workload instance for one run.
pub struct Workload {
    kind: WorkloadKind,
    seed: u64,
    vcpus: u32,
    /// Timers per vCPU (periodic timers, or the rearm-heavy set size).
    per_cpu: u32,
    timers: Vec<TimerState>,
    /// Bursts started per vCPU (keys mostly-busy's draws).
    bursts: Vec<u64>,
    /// Periods skipped because the next periodic deadline had already passed.
    pub skipped_periods: u64,
}

/// Periodic timers: 1-10 ms unless [`Workload::with_periods`] says otherwise.
pub const PERIOD_MIN: u64 = MS;
pub const PERIOD_MAX: u64 = 10 * MS;
/// mostly-busy: busy 1-5 ms, then halted 0.2-1 ms (on a pinned sleep timer).
const BURST_MIN: u64 = MS;
const BURST_MAX: u64 = 5 * MS;
const NAP_MIN: u64 = 200 * US;
const NAP_MAX: u64 = MS;
/// rearm-heavy: every arming 2-20 ms ahead.
const REARM_MIN: u64 = 2 * MS;
const REARM_MAX: u64 = 20 * MS;
/// ping-pong: 1-4 ms ahead.
const PING_MIN: u64 = MS;
const PING_MAX: u64 = 4 * MS;

impl Workload {
    /// A workload over `vcpus` vCPUs with `per_cpu` timers each (already validated).
    pub fn new(kind: WorkloadKind, vcpus: u32, per_cpu: u32, seed: u64) -> Self {
        let mut w = Workload {
            kind,
            seed,
            vcpus,
            per_cpu,
            timers: Vec::new(),
            bursts: vec![0; vcpus as usize],
            skipped_periods: 0,
        };
        w.timers = vec![TimerState::default(); w.max_timers() as usize];
        if w.periodic() {
            for id in 0..vcpus * per_cpu {
                w.timers[id as usize].period =
                    Rng::keyed(seed, u64::from(id), u64::MAX).range(PERIOD_MIN, PERIOD_MAX);
            }
        }
        w
    }

    /// The periodic timers' periods drawn from `[min, max)` instead (`min < max`, both above 0).
    pub fn with_periods(mut self, min: u64, max: u64) -> Self {
        if self.periodic() {
            for id in 0..self.vcpus * self.per_cpu {
                self.timers[id as usize].period =
                    Rng::keyed(self.seed, u64::from(id), u64::MAX).range(min, max);
            }
        }
        self
    }

    /// Timer ids the workload uses (`0..max_timers`).
    pub fn max_timers(&self) -> u32 {
        match self.kind {
            // One pinned sleep timer per vCPU after the movable ones.
            WorkloadKind::MostlyBusy => self.vcpus * self.per_cpu + self.vcpus,
            WorkloadKind::PingPong => self.vcpus,
            _ => self.vcpus * self.per_cpu,
        }
    }

    fn periodic(&self) -> bool {
        matches!(
            self.kind,
            WorkloadKind::OneBusy | WorkloadKind::AllIdle | WorkloadKind::MostlyBusy
        )
    }

    fn bursty(&self, cpu: CpuId) -> bool {
        self.kind == WorkloadKind::MostlyBusy && cpu % 4 != 3
    }

    fn sleep_timer(&self, cpu: CpuId) -> TimerId {
        self.vcpus * self.per_cpu + cpu
    }

    /// The next draw stream of timer `id` (one per arming).
    fn timer_rng(&mut self, id: TimerId) -> Rng {
        let t = &mut self.timers[id as usize];
        t.armings += 1;
        Rng::keyed(self.seed, u64::from(id), t.armings)
    }

    fn burst(&mut self, cpu: CpuId, now: u64, out: &mut Vec<Action>) {
        self.bursts[cpu as usize] += 1;
        let mut r = Rng::keyed(
            self.seed,
            u64::from(u32::MAX) + u64::from(cpu),
            self.bursts[cpu as usize],
        );
        out.push(Action::Busy {
            until: now + r.range(BURST_MIN, BURST_MAX),
        });
    }

    /// vCPU `cpu` starts at `now` (running): its first armings, and whether it stays busy.
    pub fn start(&mut self, cpu: CpuId, now: u64, out: &mut Vec<Action>) {
        match self.kind {
            WorkloadKind::OneBusy | WorkloadKind::AllIdle | WorkloadKind::MostlyBusy => {
                // one-busy: vCPU 0 only works, unless it is alone (then it owns the timers too).
                let owns = self.kind != WorkloadKind::OneBusy || cpu != 0 || self.vcpus == 1;
                if owns {
                    for id in cpu * self.per_cpu..(cpu + 1) * self.per_cpu {
                        let period = self.timers[id as usize].period;
                        self.timers[id as usize].armings += 1;
                        out.push(Action::Arm {
                            id,
                            deadline: now + period,
                            kind: TimerKind::Movable,
                            span: period,
                        });
                    }
                }
                if self.kind == WorkloadKind::OneBusy && cpu == 0 {
                    out.push(Action::Busy { until: KTIME_MAX });
                } else if self.bursty(cpu) {
                    self.burst(cpu, now, out);
                }
            }
            WorkloadKind::RearmHeavy => {
                for id in cpu * self.per_cpu..(cpu + 1) * self.per_cpu {
                    let mut r = self.timer_rng(id);
                    out.push(Action::Arm {
                        id,
                        deadline: now + r.range(REARM_MIN, REARM_MAX),
                        kind: TimerKind::Movable,
                        span: 0,
                    });
                }
                if cpu == 0 {
                    out.push(Action::Busy { until: KTIME_MAX });
                }
            }
            WorkloadKind::PingPong => {
                let mut r = self.timer_rng(cpu);
                out.push(Action::Arm {
                    id: cpu,
                    deadline: now + r.range(PING_MIN, PING_MAX),
                    kind: TimerKind::Movable,
                    span: 0,
                });
                if cpu == 0 {
                    out.push(Action::Busy { until: KTIME_MAX });
                }
            }
        }
    }

    /// Timer `id` (due at `deadline`) expired and its callback runs on `cpu` at `now`.
    pub fn on_expire(
        &mut self,
        cpu: CpuId,
        id: TimerId,
        deadline: u64,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        match self.kind {
            WorkloadKind::MostlyBusy if id >= self.vcpus * self.per_cpu => {
                // The pinned sleep timer: the nap is over, work again.
                self.burst(cpu, now, out);
            }
            WorkloadKind::OneBusy | WorkloadKind::AllIdle | WorkloadKind::MostlyBusy => {
                // Periodic: the next deadline is the previous one plus the period; a period that
                // has already gone by is skipped (re-armed a period from now), as the guest does.
                let t = &mut self.timers[id as usize];
                t.armings += 1;
                let mut next = deadline + t.period;
                if next <= now {
                    self.skipped_periods += 1;
                    next = now + t.period;
                }
                let span = t.period;
                out.push(Action::Arm {
                    id,
                    deadline: next,
                    kind: TimerKind::Movable,
                    span,
                });
            }
            WorkloadKind::RearmHeavy => {
                let set = id / self.per_cpu * self.per_cpu;
                let mut r = self.timer_rng(id);
                out.push(Action::Arm {
                    id,
                    deadline: now + r.range(REARM_MIN, REARM_MAX),
                    kind: TimerKind::Movable,
                    span: 0,
                });
                // Four distinct others of the set: re-arm two, cancel two.
                let mut others: Vec<TimerId> =
                    (set..set + self.per_cpu).filter(|&o| o != id).collect();
                for k in 0..4 {
                    let pick = others.swap_remove(r.index(others.len()));
                    if k < 2 {
                        let mut rp = self.timer_rng(pick);
                        out.push(Action::Arm {
                            id: pick,
                            deadline: now + rp.range(REARM_MIN, REARM_MAX),
                            kind: TimerKind::Movable,
                            span: 0,
                        });
                    } else {
                        out.push(Action::Cancel { id: pick });
                    }
                }
            }
            WorkloadKind::PingPong => {
                let owner = id;
                if owner == cpu {
                    self.rearm_ping(id, now, out);
                } else {
                    // Expired elsewhere: tell the owner, which re-arms on itself.
                    out.push(Action::Post { to: owner, msg: id });
                }
            }
        }
    }

    fn rearm_ping(&mut self, id: TimerId, now: u64, out: &mut Vec<Action>) {
        let mut r = self.timer_rng(id);
        out.push(Action::Arm {
            id,
            deadline: now + r.range(PING_MIN, PING_MAX),
            kind: TimerKind::Movable,
            span: 0,
        });
    }

    /// `cpu` received `msg` from [`Action::Post`] (ping-pong: re-arm your timer).
    pub fn on_message(&mut self, cpu: CpuId, msg: u32, now: u64, out: &mut Vec<Action>) {
        if self.kind == WorkloadKind::PingPong {
            debug_assert_eq!(msg, cpu);
            self.rearm_ping(msg, now, out);
        }
    }

    /// `cpu`'s busy phase ended at `now`; it is about to halt.
    pub fn on_burst_end(&mut self, cpu: CpuId, now: u64, out: &mut Vec<Action>) {
        if self.bursty(cpu) {
            let mut r = Rng::keyed(
                self.seed,
                u64::from(u32::MAX) * 2 + u64::from(cpu),
                self.bursts[cpu as usize],
            );
            out.push(Action::Arm {
                id: self.sleep_timer(cpu),
                deadline: now + r.range(NAP_MIN, NAP_MAX),
                kind: TimerKind::Pinned,
                span: 0,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for w in WorkloadKind::ALL {
            assert_eq!(w.name().parse::<WorkloadKind>(), Ok(w));
        }
        let e = "busy".parse::<WorkloadKind>().unwrap_err();
        assert!(e.contains("one-busy") && e.contains("ping-pong"), "{e}");
    }

    #[test]
    fn periods_do_not_depend_on_anything_but_the_seed_and_the_timer() {
        let a = Workload::new(WorkloadKind::OneBusy, 8, 2, 5);
        let b = Workload::new(WorkloadKind::AllIdle, 64, 2, 5);
        for id in 0..16 {
            assert_eq!(a.timers[id].period, b.timers[id].period);
            assert!((PERIOD_MIN..=PERIOD_MAX).contains(&a.timers[id].period));
        }
    }

    #[test]
    fn rearm_heavy_callback_rearms_itself_and_two_others_and_cancels_two() {
        let mut w = Workload::new(WorkloadKind::RearmHeavy, 2, 8, 1);
        let mut out = Vec::new();
        w.on_expire(1, 9, 0, 100, &mut out);
        let arms: Vec<TimerId> = out
            .iter()
            .filter_map(|a| match a {
                Action::Arm { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        let cancels: Vec<TimerId> = out
            .iter()
            .filter_map(|a| match a {
                Action::Cancel { id } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(arms.len(), 3);
        assert_eq!(arms[0], 9);
        assert_eq!(cancels.len(), 2);
        let mut all: Vec<TimerId> = arms.iter().chain(&cancels).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 5, "distinct timers: {out:?}");
        assert!(all.iter().all(|&t| (8..16).contains(&t)));
    }

    #[test]
    fn ping_pong_posts_to_the_owner_after_a_remote_expiry() {
        let mut w = Workload::new(WorkloadKind::PingPong, 4, 1, 1);
        let mut out = Vec::new();
        w.on_expire(0, 3, 0, 10, &mut out);
        assert_eq!(out, vec![Action::Post { to: 3, msg: 3 }]);
        out.clear();
        w.on_message(3, 3, 20, &mut out);
        assert!(
            matches!(out[..], [Action::Arm { id: 3, deadline, .. }] if deadline >= 20 + PING_MIN)
        );
    }
}
