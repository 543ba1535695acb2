//! From parsed records to what the replay needs: the tick rate and the jiffies-to-time mapping, the
//! timers as dense ids, each CPU's idle timeline, the replay's operations in time order, and the
//! kernel's own figures from the same trace.
//!
//! # Jiffies to nanoseconds
//!
//! `timer_start` gives `expires` and, through `[timeout=N]`, the jiffies value when the timer was
//! armed (`now = expires - timeout`); `timer_expire_entry` gives `now`. Each such *sample* pairs a
//! timestamp with the jiffy current at that time. The tick rate is the least-squares slope of
//! jiffies over time, snapped to the nearest of 100, 250, 300 and 1000 Hz when within 10 % (else
//! an error asks for `--hz`); `--hz` overrides it. A sample at jiffy `j` can only be taken after
//! that jiffy began (a CPU woken from a tickless idle even catches up on jiffies before its
//! handlers run), so the start of jiffy `j` is at most `timestamp - j * period` for every sample:
//! the smallest such value, taken over all samples, is the start of the jiffy grid. The replay's
//! deadline of a timer is the start of its `bucket_expiry` jiffy on that grid, less
//! [`TICK_SLACK_NS`] (what the first traced event after a tick may lag behind it): the jiffy at
//! which the kernel's wheel considers it due. That is at least one jiffy after `expires` (the
//! wheel rounds up so that a timer armed at the edge of a tick does not fire early), and up to
//! 12.5 % of the timeout later for long timeouts (the coarser levels of the wheel): the batching
//! of those timers is one of the kernel's decisions the replay keeps.
//!
//! # Idle timeline
//!
//! A CPU is idle from `cpu_idle` with a state other than `4294967295` to the next `cpu_idle` with
//! that state. On a CPU that halts with interrupts enabled (HLT, haltpoll) the kernel handles the
//! waking interrupt, and the timer softirq that follows it, *before* it traces the idle exit: an
//! event recorded by the CPU inside its idle span therefore ends the span at that event (the
//! idle exit is taken to be there), and the later `cpu_idle` exit changes nothing. A CPU whose first
//! `cpu_idle` event is an exit was idle when the trace started.
//!
//! # Cancels
//!
//! The kernel traces `timer_cancel` whenever it takes a timer off a wheel: for a cancel, before
//! re-queueing it (`mod_timer` on a pending timer), and just before running its callback. The next
//! event of the same timer tells which: `timer_expire_entry` (its expiry: not replayed),
//! `timer_start` as the very next event of the same CPU (a re-arm: the replayed arm replaces the
//! pending one), anything else or nothing (a cancel).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tmigr::service::{CpuId, TimerId, TimerKind};

use super::parse::{Ev, ParsedTrace, Record, TimerFlags, IDLE_EXIT_STATE};
use quietvm_vmm::accounting::{Lateness, LatenessRecorder};

/// The tick rates the kernel can be built with (`CONFIG_HZ_*`), for snapping the estimate.
pub const KNOWN_HZ: [u32; 4] = [100, 250, 300, 1000];
/// A deadline is put this much before the traced start of its jiffy (see the module docs).
pub const TICK_SLACK_NS: u64 = 50_000;
/// Most CPUs a trace may name.
pub const MAX_CPUS: u32 = quietvm_vmm::limits::MAX_TRACE_CPUS;
/// Most distinct timers a trace may hold.
pub const MAX_TIMERS: usize = 1 << 20;

/// How the tick rate was found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HzInfo {
    /// The rate used.
    pub hz: u32,
    /// "inferred" or "--hz".
    pub source: String,
    /// Least-squares slope of jiffies over time (Hz), if there were enough samples.
    pub estimate: Option<f64>,
    /// Samples (timestamp, jiffies) the estimate used.
    pub samples: usize,
}

/// What the replay does, in time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// The CPU goes idle.
    IdleEnter,
    /// The CPU leaves idle; `early` when an event inside the idle span ended it (an interrupt in
    /// idle), before the `cpu_idle` exit.
    IdleExit { early: bool },
    /// The trace's `cpu_idle` exit after an early exit (the CPU leaves the interrupt-in-idle).
    IdleExitLate,
    /// `timer_start`: queued on `base`'s wheel.
    Arm {
        id: TimerId,
        base: CpuId,
        /// When the wheel fires it: the start of its `bucket_expiry` jiffy (module docs).
        deadline: u64,
        /// The start of its `expires` jiffy, the same way (`deadline` if the trace's bucket is
        /// before `expires`): the earliest its contract lets it fire. `[earliest, deadline]` is the
        /// window the wheel's rounding already grants it (`quietvm replay --windows wheel`).
        earliest: u64,
        kind: TimerKind,
        deferrable: bool,
    },
    /// `timer_cancel` that was a cancel.
    Cancel { id: TimerId },
}

/// One operation: at `t` (ns since the trace's first event), on CPU `cpu` (the one that traced it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub t: u64,
    pub cpu: CpuId,
    pub line: usize,
    pub kind: OpKind,
}

/// The kernel's own figures from the trace (what its pull hierarchy did on this machine).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct KernelFigures {
    /// `timer_expire_entry` events.
    pub expiries: u64,
    /// ... of timers whose `timer_start` is not in the trace (armed before it began).
    pub expiries_armed_before_trace: u64,
    /// ... of deferrable timers.
    pub deferrable_expiries: u64,
    /// ... on a CPU other than the one whose wheel the timer was queued on (`cpu=` of its start).
    pub remote_expiries: u64,
    /// ... on a CPU other than the one that traced its `timer_start`.
    pub expired_off_arming_cpu: u64,
    /// Idle exits (incl. those ended early by an interrupt in idle).
    pub idle_exits: u64,
    /// Idle exits followed within one jiffy, before the CPU next goes idle, by the expiry on that
    /// CPU of a non-deferrable timer that was due at the exit (its deadline, as the replay puts
    /// it, not after the exit time).
    pub timer_wakeups: u64,
    /// ... of CPUs that had not stopped their tick (no `tmigr_cpu_idle` since their last
    /// `tmigr_cpu_active`): a CPU idle with its tick running is not in the kernel's hierarchy as
    /// idle, and expires its own timers at its tick.
    pub timer_wakeups_tick_running: u64,
    /// ... where a timer queued on that CPU's own wheel expired (pinned, then movable counted
    /// first), or only other CPUs' timers (the kernel's migrator or last idle CPU).
    pub timer_wakeups_own_pinned: u64,
    pub timer_wakeups_own_movable: u64,
    pub timer_wakeups_remote: u64,
    /// Non-deferrable timers the kernel cancelled or re-armed after their deadline, before its
    /// timer softirq got to them (the replay, which expires on time, fires them instead).
    pub cancelled_when_due: u64,
    /// Non-deferrable timers still pending at the end of the trace although due more than a
    /// jiffy before it.
    pub due_at_end: u64,
    /// `tmigr_handle_remote_cpu`: a migrator handled an idle CPU's timers.
    pub tmigr_handle_remote_cpu: u64,
    /// `tmigr_handle_remote`: group walks for remote expiry.
    pub tmigr_handle_remote: u64,
    /// `tmigr_cpu_idle` / `tmigr_cpu_active`: CPU deactivations / activations in the hierarchy.
    pub tmigr_cpu_idle: u64,
    pub tmigr_cpu_active: u64,
    /// Other `timer_migration:*` events.
    pub tmigr_other: u64,
    /// `tick_stop` with `success=1`.
    pub tick_stops: u64,
    /// Expiry time minus the replay's deadline (see the module docs), non-deferrable timers whose
    /// start is in the trace.
    pub lateness_ns: Lateness,
    /// The same for deferrable timers.
    pub deferrable_lateness_ns: Lateness,
}

/// Everything the replay needs from one trace.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub cpus: u32,
    /// Time of the last event (ns since the first).
    pub end: u64,
    /// Timestamp of the first event (ns, the trace clock).
    pub start_ts_ns: u64,
    pub hz: Option<HzInfo>,
    pub ops: Vec<Op>,
    /// Distinct timers armed in the trace (ids `0..timers`).
    pub timers: u32,
    /// CPUs idle when the trace began.
    pub initially_idle: Vec<bool>,
    /// Event counts by name (known and unknown).
    pub events: BTreeMap<String, u64>,
    /// Unknown events skipped.
    pub unknown_events: u64,
    pub lost_events: u64,
    pub lines: usize,
    pub armings: ArmingCounts,
    pub kernel: KernelFigures,
}

/// What the trace armed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ArmingCounts {
    pub armings: u64,
    pub pinned: u64,
    pub movable: u64,
    /// Deadline-wise deferrable (pinned or not).
    pub deferrable: u64,
    /// Queued on another CPU's wheel than the arming one (`add_timer_on`, or a timer kept on the
    /// base its callback runs on).
    pub on_other_cpu: u64,
    pub cancels: u64,
    /// `timer_cancel` events that were a re-arm's or an expiry's detach (not replayed).
    pub detaches: u64,
    /// Cancels of timers not armed in the trace (ignored).
    pub cancels_unknown: u64,
}

/// Errors are one line.
pub type Result<T> = std::result::Result<T, String>;

fn event_name(ev: &Ev) -> &str {
    match ev {
        Ev::TimerStart { .. } => "timer_start",
        Ev::TimerCancel { .. } => "timer_cancel",
        Ev::TimerExpire { .. } => "timer_expire_entry",
        Ev::CpuIdle { .. } => "cpu_idle",
        Ev::TickStop { .. } => "tick_stop",
        Ev::TmigrCpuIdle { .. } => "tmigr_cpu_idle",
        Ev::TmigrCpuActive { .. } => "tmigr_cpu_active",
        Ev::TmigrHandleRemoteCpu { .. } => "tmigr_handle_remote_cpu",
        Ev::TmigrHandleRemote => "tmigr_handle_remote",
        Ev::TmigrOther(n) | Ev::Unknown(n) => n,
    }
}

/// The tick rate and the jiffy grid.
#[derive(Debug, Clone, Copy)]
struct Grid {
    hz: u32,
    /// Jiffy `base` starts at `origin` ns (may be negative: before the first event).
    base: u64,
    origin: i128,
}

impl Grid {
    fn start_of(&self, jiffy: u64) -> i128 {
        let d = i128::from(jiffy) - i128::from(self.base);
        self.origin + d * 1_000_000_000 / i128::from(self.hz)
    }

    fn deadline(&self, jiffy: u64) -> u64 {
        let t = self.start_of(jiffy) - i128::from(TICK_SLACK_NS);
        t.clamp(0, i128::from(u64::MAX)) as u64
    }

    fn period_ns(&self) -> u64 {
        1_000_000_000 / u64::from(self.hz)
    }
}

/// (timestamp since start, jiffies) pairs.
fn samples(records: &[Record], start: u64) -> Vec<(u64, u64)> {
    records
        .iter()
        .filter_map(|r| match r.ev {
            Ev::TimerStart { now, .. } | Ev::TimerExpire { now, .. } => {
                Some((r.ts_ns - start, now))
            }
            _ => None,
        })
        .collect()
}

/// Least-squares slope of jiffies over seconds; `None` without two distinct timestamps and jiffies.
fn slope_hz(s: &[(u64, u64)]) -> Option<f64> {
    if s.len() < 2 {
        return None;
    }
    let n = s.len() as f64;
    let j0 = s[0].1 as f64;
    let mt = s.iter().map(|&(t, _)| t as f64 / 1e9).sum::<f64>() / n;
    let mj = s.iter().map(|&(_, j)| j as f64 - j0).sum::<f64>() / n;
    let (mut cov, mut var) = (0.0, 0.0);
    for &(t, j) in s {
        let dt = t as f64 / 1e9 - mt;
        cov += dt * (j as f64 - j0 - mj);
        var += dt * dt;
    }
    if var <= 0.0 || cov <= 0.0 {
        return None;
    }
    Some(cov / var)
}

fn infer_hz(s: &[(u64, u64)], forced: Option<u32>) -> Result<HzInfo> {
    let estimate = slope_hz(s);
    if let Some(hz) = forced {
        return Ok(HzInfo {
            hz,
            source: "--hz".to_string(),
            estimate,
            samples: s.len(),
        });
    }
    let Some(est) = estimate else {
        return Err(format!(
            "cannot infer HZ: {} jiffies sample(s) from timer_start/timer_expire_entry do not span \
             a tick; pass --hz",
            s.len()
        ));
    };
    let best = KNOWN_HZ
        .iter()
        .copied()
        .min_by(|a, b| {
            let da = (est / f64::from(*a) - 1.0).abs();
            let db = (est / f64::from(*b) - 1.0).abs();
            da.total_cmp(&db)
        })
        .unwrap_or(250);
    if (est / f64::from(best) - 1.0).abs() > 0.10 {
        return Err(format!(
            "cannot infer HZ: jiffies advance at {est:.1} Hz over {} samples, not near 100, 250, \
             300 or 1000; pass --hz",
            s.len()
        ));
    }
    Ok(HzInfo {
        hz: best,
        source: "inferred".to_string(),
        estimate: Some(est),
        samples: s.len(),
    })
}

fn grid(s: &[(u64, u64)], hz: u32) -> Grid {
    let base = s.iter().map(|&(_, j)| j).min().unwrap_or(0);
    let mut g = Grid {
        hz,
        base,
        origin: 0,
    };
    g.origin = s
        .iter()
        .map(|&(t, j)| {
            let d = i128::from(j) - i128::from(base);
            i128::from(t) - d * 1_000_000_000 / i128::from(hz)
        })
        .min()
        .unwrap_or(0);
    g
}

/// Builds the timeline of a parsed trace; `hz` overrides the inferred tick rate.
pub fn build(parsed: &ParsedTrace, hz: Option<u32>) -> Result<Timeline> {
    let records = &parsed.records;
    if records.is_empty() {
        return Err("the trace holds no events".to_string());
    }
    // The trace file is sorted by time; trace-cmd merges per-CPU buffers the same way. Be sure.
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| records[i].ts_ns);
    let recs: Vec<&Record> = order.iter().map(|&i| &records[i]).collect();
    let start = recs[0].ts_ns;
    let end = recs[recs.len() - 1].ts_ns - start;

    let mut max_cpu = 0u32;
    for r in &recs {
        let c = match r.ev {
            Ev::CpuIdle { cpu, .. } => cpu.max(r.cpu),
            Ev::TimerStart { base_cpu, .. } => base_cpu.max(r.cpu),
            _ => r.cpu,
        };
        if c >= MAX_CPUS {
            return Err(format!("line {}: CPU {c} is beyond {MAX_CPUS}", r.line));
        }
        max_cpu = max_cpu.max(c);
    }
    if let Some(h) = parsed.header_cpus.filter(|&h| h > MAX_CPUS) {
        return Err(format!(
            "the header names {h} CPUs; quietvm replays at most {MAX_CPUS} (docs/limits.md)"
        ));
    }
    let cpus = parsed.header_cpus.unwrap_or(0).max(max_cpu + 1);

    let mut events: BTreeMap<String, u64> = BTreeMap::new();
    let mut unknown_events = 0;
    for r in &recs {
        *events.entry(event_name(&r.ev).to_string()).or_default() += 1;
        if matches!(r.ev, Ev::Unknown(_)) {
            unknown_events += 1;
        }
    }

    let sorted: Vec<Record> = recs.iter().map(|r| (*r).clone()).collect();
    let smp = samples(&sorted, start);
    let any_timer = sorted
        .iter()
        .any(|r| matches!(r.ev, Ev::TimerStart { .. } | Ev::TimerExpire { .. }));
    let (hz_info, grid) = if any_timer {
        let info = infer_hz(&smp, hz)?;
        let g = grid(&smp, info.hz);
        (Some(info), Some(g))
    } else {
        (None, None)
    };

    // Next event of the same timer (index into `sorted`), for classifying cancels.
    let timer_of = |ev: &Ev| match *ev {
        Ev::TimerStart { timer, .. }
        | Ev::TimerCancel { timer }
        | Ev::TimerExpire { timer, .. } => Some(timer),
        _ => None,
    };
    let mut next_same_timer = vec![usize::MAX; sorted.len()];
    let mut next_on_cpu = vec![usize::MAX; sorted.len()];
    {
        let mut last: HashMap<u64, usize> = HashMap::new();
        let mut last_cpu: HashMap<u32, usize> = HashMap::new();
        for i in (0..sorted.len()).rev() {
            if let Some(n) = last_cpu.insert(sorted[i].cpu, i) {
                next_on_cpu[i] = n;
            }
            if let Some(t) = timer_of(&sorted[i].ev) {
                if let Some(&n) = last.get(&t) {
                    next_same_timer[i] = n;
                }
                last.insert(t, i);
            }
        }
    }

    let mut initially_idle = vec![false; cpus as usize];
    let mut seen_idle = vec![false; cpus as usize];
    for r in &sorted {
        if let Ev::CpuIdle { state, cpu } = r.ev {
            if !seen_idle[cpu as usize] {
                seen_idle[cpu as usize] = true;
                initially_idle[cpu as usize] = state == IDLE_EXIT_STATE;
            }
        }
    }

    let mut ids: HashMap<u64, TimerId> = HashMap::new();
    // Per timer: (arming CPU, base CPU, deadline, flags) of its last start.
    let mut last_start: HashMap<u64, (CpuId, CpuId, u64, TimerFlags)> = HashMap::new();
    // Per timer: the deadline of its pending non-deferrable arming, in the kernel.
    let mut pending: HashMap<u64, u64> = HashMap::new();
    let mut ops = Vec::new();
    let mut idle = initially_idle.clone();
    // Per CPU: the idle span ended early by an event; when it was left (for kernel wakeups).
    let mut early = vec![false; cpus as usize];
    let mut armings = ArmingCounts::default();
    let mut k = KernelFigures::default();
    let mut k_late = LatenessRecorder::new();
    let mut k_def_late = LatenessRecorder::new();
    // Per CPU: time of its last idle exit while the kernel-wakeup window is open, and whether its
    // tick was running then.
    let mut wake_window: Vec<Option<(u64, bool)>> = vec![None; cpus as usize];
    // Per CPU: idle in the kernel's hierarchy (tick stopped), from the tmigr events.
    let mut tmigr_idle = vec![false; cpus as usize];
    let period = grid.map_or(4_000_000, |g| g.period_ns());

    for (i, r) in sorted.iter().enumerate() {
        let t = r.ts_ns - start;
        let c = r.cpu;
        // An event of a CPU inside its idle span ends the span there.
        let is_idle_ev = matches!(r.ev, Ev::CpuIdle { .. });
        if !is_idle_ev && idle[c as usize] {
            idle[c as usize] = false;
            early[c as usize] = true;
            ops.push(Op {
                t,
                cpu: c,
                line: r.line,
                kind: OpKind::IdleExit { early: true },
            });
            k.idle_exits += 1;
            wake_window[c as usize] = Some((t, !tmigr_idle[c as usize]));
        }
        match r.ev {
            Ev::CpuIdle { state, cpu } => {
                let ci = cpu as usize;
                if state == IDLE_EXIT_STATE {
                    if idle[ci] {
                        idle[ci] = false;
                        ops.push(Op {
                            t,
                            cpu,
                            line: r.line,
                            kind: OpKind::IdleExit { early: false },
                        });
                        k.idle_exits += 1;
                        wake_window[ci] = Some((t, !tmigr_idle[ci]));
                    } else if early[ci] {
                        ops.push(Op {
                            t,
                            cpu,
                            line: r.line,
                            kind: OpKind::IdleExitLate,
                        });
                    }
                    early[ci] = false;
                } else if !idle[ci] {
                    idle[ci] = true;
                    early[ci] = false;
                    wake_window[ci] = None;
                    ops.push(Op {
                        t,
                        cpu,
                        line: r.line,
                        kind: OpKind::IdleEnter,
                    });
                }
            }
            Ev::TimerStart {
                timer,
                expires,
                bucket_expiry,
                base_cpu,
                flags,
                ..
            } => {
                let Some(g) = grid else { continue };
                let n = ids.len();
                let id = *ids.entry(timer).or_insert(n as TimerId);
                if ids.len() > MAX_TIMERS {
                    return Err(format!(
                        "line {}: more than {MAX_TIMERS} distinct timers",
                        r.line
                    ));
                }
                let deadline = g.deadline(bucket_expiry);
                let earliest = if bucket_expiry >= expires {
                    g.deadline(expires)
                } else {
                    deadline
                };
                let kind = if flags.pinned {
                    TimerKind::Pinned
                } else {
                    TimerKind::Movable
                };
                armings.armings += 1;
                match kind {
                    TimerKind::Pinned => armings.pinned += 1,
                    TimerKind::Movable => armings.movable += 1,
                }
                armings.deferrable += flags.deferrable as u64;
                armings.on_other_cpu += (base_cpu != c) as u64;
                last_start.insert(timer, (c, base_cpu, deadline, flags));
                if !flags.deferrable {
                    pending.insert(timer, deadline);
                } else {
                    pending.remove(&timer);
                }
                ops.push(Op {
                    t,
                    cpu: c,
                    line: r.line,
                    kind: OpKind::Arm {
                        id,
                        base: base_cpu,
                        deadline,
                        earliest,
                        kind,
                        deferrable: flags.deferrable,
                    },
                });
            }
            Ev::TimerCancel { timer } => {
                let next = next_same_timer[i];
                let expiry =
                    next != usize::MAX && matches!(sorted[next].ev, Ev::TimerExpire { .. });
                let rearm = next != usize::MAX
                    && matches!(sorted[next].ev, Ev::TimerStart { .. })
                    && next_on_cpu[i] == next;
                if let Some(d) = pending.remove(&timer) {
                    if !expiry && d < t {
                        k.cancelled_when_due += 1;
                    }
                }
                if expiry || rearm {
                    armings.detaches += 1;
                } else if let Some(&id) = ids.get(&timer) {
                    armings.cancels += 1;
                    ops.push(Op {
                        t,
                        cpu: c,
                        line: r.line,
                        kind: OpKind::Cancel { id },
                    });
                } else {
                    armings.cancels_unknown += 1;
                }
            }
            Ev::TimerExpire { timer, .. } => {
                k.expiries += 1;
                pending.remove(&timer);
                let Some(&(armer, base, deadline, flags)) = last_start.get(&timer) else {
                    k.expiries_armed_before_trace += 1;
                    continue;
                };
                if base != c {
                    k.remote_expiries += 1;
                }
                if armer != c {
                    k.expired_off_arming_cpu += 1;
                }
                let late = t.saturating_sub(deadline);
                if flags.deferrable {
                    k.deferrable_expiries += 1;
                    k_def_late.record(late);
                } else {
                    k_late.record(late);
                    if let Some((w, tick)) = wake_window[c as usize] {
                        if t <= w + period && deadline <= w {
                            wake_window[c as usize] = None;
                            k.timer_wakeups += 1;
                            k.timer_wakeups_tick_running += tick as u64;
                            if base != c {
                                k.timer_wakeups_remote += 1;
                            } else if flags.pinned {
                                k.timer_wakeups_own_pinned += 1;
                            } else {
                                k.timer_wakeups_own_movable += 1;
                            }
                        }
                    }
                }
            }
            Ev::TickStop { success } => k.tick_stops += success as u64,
            Ev::TmigrCpuIdle { cpu } => {
                k.tmigr_cpu_idle += 1;
                if let Some(x) = tmigr_idle.get_mut(cpu as usize) {
                    *x = true;
                }
            }
            Ev::TmigrCpuActive { cpu } => {
                k.tmigr_cpu_active += 1;
                if let Some(x) = tmigr_idle.get_mut(cpu as usize) {
                    *x = false;
                }
            }
            Ev::TmigrHandleRemoteCpu { .. } => k.tmigr_handle_remote_cpu += 1,
            Ev::TmigrHandleRemote => k.tmigr_handle_remote += 1,
            Ev::TmigrOther(_) => k.tmigr_other += 1,
            Ev::Unknown(_) => {}
        }
        if let Some((w, _)) = wake_window[c as usize] {
            if t > w + period {
                wake_window[c as usize] = None;
            }
        }
    }
    k.due_at_end = pending
        .values()
        .filter(|&&d| d.saturating_add(period) < end)
        .count() as u64;
    k.lateness_ns = k_late.summary();
    k.deferrable_lateness_ns = k_def_late.summary();

    Ok(Timeline {
        cpus,
        end,
        start_ts_ns: start,
        hz: hz_info,
        ops,
        timers: ids.len() as u32,
        initially_idle,
        events,
        unknown_events,
        lost_events: parsed.lost_events,
        lines: parsed.lines,
        armings,
        kernel: k,
    })
}
