//! A trivially correct reference model and a simulator that drives the real
//! [`TimerService`] and the model with the same operations, the way the VMM
//! would, checking after every step.
//!
//! The model is one struct behind one lock (here: `&mut`): who is online and
//! running, what is pending and when it is due. The simulator plays the
//! VMM: it only knows the times the service gave it (`next_event`,
//! `vcpu_halt`) and the kicks it returned, so a missing kick or a wrong wake
//! time shows up as a timer left due after [`Op::Settle`].
//!
//! Checked at every step: `arm`/`cancel` return values; every expired timer
//! was pending with that deadline, slack and kind, its window had opened
//! (deadline `<= now`: nothing early), and is removed (nothing twice); Local/Push expire only on the owner; Pull expires a
//! movable timer of another vCPU only if that vCPU is halted; under Pull a
//! halt returns a wake-up before the vCPU's own pinned timers only if it was
//! the last running vCPU (only the root-idling vCPU wakes for movable
//! events); an isolated vCPU never expires another's timer, never receives a
//! Push placement, a hand-off or the forced-active role while a
//! non-isolated vCPU is online, and wakes for its own timers; after `Settle`
//! no window has ended with its timer still pending (nothing missed: every
//! timer fired by `deadline + slack` of simulated time); and the service's and hierarchy's
//! invariants after every operation (and after the `vcpu_prepare` that
//! precedes each `vcpu_online`).
//!
//! [`ops_from_bytes`] decodes any byte string into a configuration and an
//! operation sequence: the fuzz target, the proptests and fixed unit tests
//! share it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::{Clock, FakeClock};
use crate::service::{ServiceConfig, TimerService};
use crate::types::{CpuId, Expired, Policy, TimerId, TimerKind, KTIME_MAX};

/// One step of a simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `cpu` arms `id` for `[now + 1 + delta, now + 1 + delta + slack]`.
    Arm {
        /// Arming vCPU (may be halted: new timer while idle).
        cpu: CpuId,
        /// Timer.
        id: TimerId,
        /// Deadline offset.
        delta: u64,
        /// Window length after the deadline.
        slack: u64,
        /// Kind.
        kind: TimerKind,
    },
    /// Cancel `id`.
    Cancel {
        /// Timer.
        id: TimerId,
    },
    /// `cpu` halts (if running).
    Halt {
        /// vCPU.
        cpu: CpuId,
    },
    /// `cpu` wakes and runs (if halted): `vcpu_run`, `expire`, `next_event`.
    Run {
        /// vCPU.
        cpu: CpuId,
    },
    /// Time moves forward by `dt`, then [`Op::Settle`].
    Advance {
        /// Nanoseconds.
        dt: u64,
    },
    /// A running `cpu` exits: `expire`, `next_event`.
    Expire {
        /// vCPU.
        cpu: CpuId,
    },
    /// `cpu` comes online.
    Online {
        /// vCPU.
        cpu: CpuId,
    },
    /// `cpu` goes offline (never the last online one).
    Offline {
        /// vCPU.
        cpu: CpuId,
    },
    /// Push: `cpu` counts as idle for placement or not.
    PushIdle {
        /// vCPU.
        cpu: CpuId,
        /// Idle for push.
        idle: bool,
    },
    /// Deliver kicks and due wake-ups until nothing is due; then check that
    /// nothing due is left pending.
    Settle,
}

/// The configuration of a simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Policy.
    pub policy: Policy,
    /// vCPU ids are `0..possible`.
    pub possible: u32,
    /// vCPUs `0..initially_online` start online and running.
    pub initially_online: u32,
    /// Group size.
    pub group_size: usize,
    /// Nodes per vCPU.
    pub nodes: Option<Vec<u32>>,
    /// Timer ids.
    pub max_timers: u32,
    /// Isolated vCPUs ([`ServiceConfig::isolated`]).
    pub isolated: Vec<CpuId>,
}

/// Decodes bytes into a configuration and operations (never fails).
/// `max_cpus` caps the number of vCPUs (300 in the proptests).
pub fn ops_from_bytes(data: &[u8], max_cpus: u32) -> (SimConfig, Vec<Op>) {
    let b = |i: usize| data.get(i).copied().unwrap_or(0);
    let policy = match b(0) % 3 {
        0 => Policy::Pull,
        1 => Policy::Local,
        _ => Policy::Push,
    };
    let possible = 1 + (u16::from_le_bytes([b(1), b(2)]) as u32) % max_cpus.max(1);
    let initially_online = 1 + b(3) as u32 % possible;
    let group_size = 2 + b(4) as usize % 7;
    let nodes = (b(5) & 1 == 1).then(|| {
        let nn = 1 + (b(5) >> 1) as u32 % 3;
        (0..possible).map(|c| c % nn).collect()
    });
    let max_timers = 64;
    // Isolated vCPUs (every third one from vCPU 1) when the first byte is
    // 0xc0 or above: the policy still comes from `b(0) % 3`, and byte
    // strings below that decode as they always did.
    let isolated = if b(0) >= 0xc0 {
        (0..possible).filter(|c| c % 3 == 1).collect()
    } else {
        Vec::new()
    };
    let cfg = SimConfig {
        policy,
        possible,
        initially_online,
        group_size,
        nodes,
        max_timers,
        isolated,
    };
    let mut ops = Vec::new();
    for ch in data.get(6..).unwrap_or(&[]).chunks(4) {
        let g = |i: usize| ch.get(i).copied().unwrap_or(0);
        let cpu = (u16::from_le_bytes([g(1), g(3)]) as u32) % possible;
        let op = match g(0) % 12 {
            0 | 1 => Op::Arm {
                cpu,
                id: g(2) as u32 % max_timers,
                delta: (g(3) as u64 % 64 + 1) * 250,
                // The id's unused top bits: no slack, a short window, a
                // quarter of the timeout (a housekeeping timer's), or longer
                // than the timeout.
                slack: match g(2) >> 6 {
                    0 => 0,
                    1 => 100,
                    2 => (g(3) as u64 % 64 + 1) * 250 / 4,
                    _ => (g(3) as u64 % 64 + 1) * 500,
                },
                kind: if g(0) & 0x80 != 0 {
                    TimerKind::Pinned
                } else {
                    TimerKind::Movable
                },
            },
            2 => Op::Cancel {
                id: g(2) as u32 % max_timers,
            },
            3 | 4 => Op::Halt { cpu },
            5 => Op::Run { cpu },
            6 => Op::Advance {
                dt: (g(2) as u64 + 1) * 100,
            },
            7 => Op::Expire { cpu },
            8 => Op::Online { cpu },
            9 => Op::Offline { cpu },
            10 => Op::PushIdle {
                cpu,
                idle: g(2) & 1 == 1,
            },
            _ => Op::Settle,
        };
        ops.push(op);
    }
    ops.push(Op::Settle);
    (cfg, ops)
}

/// The reference model: one global view.
#[derive(Debug, Default)]
pub struct Model {
    /// Online flag per vCPU.
    pub online: Vec<bool>,
    /// Running flag per vCPU.
    pub running: Vec<bool>,
    /// Pending timers: deadline, slack and kind.
    pub pending: HashMap<TimerId, (u64, u64, TimerKind)>,
    /// Isolated flag per vCPU.
    pub isolated: Vec<bool>,
}

impl Model {
    /// Timers whose window has ended at `now` (`deadline + slack <= now`):
    /// `(id, deadline, slack)`.
    pub fn due(&self, now: u64) -> Vec<(TimerId, u64, u64)> {
        let mut v: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, &(d, sl, _))| d.saturating_add(sl) <= now)
            .map(|(&id, &(d, sl, _))| (id, d, sl))
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of running vCPUs.
    pub fn running_count(&self) -> usize {
        self.running
            .iter()
            .zip(&self.online)
            .filter(|(r, o)| **r && **o)
            .count()
    }

    /// Number of running vCPUs that are not isolated (those in the hierarchy under Pull).
    pub fn running_in_hier(&self) -> usize {
        (0..self.online.len())
            .filter(|&c| {
                self.running[c] && self.online[c] && !self.isolated.get(c).copied().unwrap_or(false)
            })
            .count()
    }
}

/// Totals of one simulation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimReport {
    /// Operations applied (skipped no-ops excluded).
    pub applied: usize,
    /// Timers expired.
    pub expired: usize,
    /// Of which by another vCPU than their owner.
    pub remote: usize,
    /// Halted vCPUs woken (by time or kick).
    pub wakeups: usize,
}

/// Drives a [`TimerService`] and a [`Model`] side by side.
pub struct Sim {
    /// The service under test.
    pub svc: TimerService<Arc<FakeClock>>,
    /// Its clock.
    pub clock: Arc<FakeClock>,
    /// The model.
    pub model: Model,
    /// What the simulated VMM was told per vCPU (next_event / halt).
    pub told: Vec<u64>,
    kicked: Vec<bool>,
    /// Totals.
    pub report: SimReport,
    buf: Vec<Expired>,
}

impl Sim {
    /// A simulation of `cfg`.
    pub fn new(cfg: &SimConfig) -> Self {
        let clock = Arc::new(FakeClock::new(1_000));
        let svc = TimerService::new(
            ServiceConfig {
                policy: cfg.policy,
                max_timers: cfg.max_timers,
                group_size: cfg.group_size,
                nodes: cfg.nodes.clone(),
                max_cpus: None,
                isolated: cfg.isolated.clone(),
            },
            clock.clone(),
            cfg.initially_online,
        );
        let n = cfg.possible as usize;
        let mut model = Model {
            online: vec![false; n],
            running: vec![false; n],
            pending: HashMap::new(),
            isolated: (0..n as CpuId).map(|c| cfg.isolated.contains(&c)).collect(),
        };
        for c in 0..cfg.initially_online as usize {
            model.online[c] = true;
            model.running[c] = true;
        }
        let mut sim = Sim {
            svc,
            clock,
            model,
            told: vec![KTIME_MAX; n],
            kicked: vec![false; n],
            report: SimReport::default(),
            buf: Vec::new(),
        };
        for c in 0..cfg.initially_online {
            sim.told[c as usize] = sim.svc.next_event(c);
        }
        sim
    }

    /// Runs `ops` with checks; the first violation is returned as an error.
    pub fn run(cfg: &SimConfig, ops: &[Op]) -> Result<SimReport, String> {
        let mut sim = Sim::new(cfg);
        for (i, op) in ops.iter().enumerate() {
            sim.step(*op).map_err(|e| format!("op #{i} {op:?}: {e}"))?;
        }
        sim.step(Op::Settle)
            .map_err(|e| format!("final settle: {e}"))?;
        Ok(sim.report)
    }

    fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    fn collect_kicks(&mut self) {
        let mut k = Vec::new();
        self.svc.take_kicks(&mut k);
        for c in k {
            self.kicked[c as usize] = true;
        }
    }

    /// Running `cpu` handles an exit: expire, then next_event.
    fn exit(&mut self, cpu: CpuId) -> Result<(), String> {
        let mut out = std::mem::take(&mut self.buf);
        out.clear();
        self.svc.expire(cpu, &mut out);
        let now = self.now();
        for e in &out {
            match self.model.pending.remove(&e.id) {
                None => {
                    return Err(format!(
                        "{e:?} expired but not pending (twice, or cancelled)"
                    ))
                }
                Some((d, sl, k)) => {
                    if d != e.deadline || sl != e.slack || k != e.kind {
                        return Err(format!("{e:?} expired but pending as ({d}, {sl}, {k:?})"));
                    }
                }
            }
            if e.deadline > now {
                return Err(format!("{e:?} expired early at {now}"));
            }
            if e.owner != cpu {
                if self.model.isolated[cpu as usize] {
                    return Err(format!(
                        "{e:?} expired on isolated cpu {cpu}, not its owner"
                    ));
                }
                if self.svc.policy() != Policy::Pull || e.kind != TimerKind::Movable {
                    return Err(format!("{e:?} expired on cpu {cpu}, not its owner"));
                }
                if self.model.running[e.owner as usize] && self.model.online[e.owner as usize] {
                    return Err(format!("{e:?} pulled by cpu {cpu} while its owner runs"));
                }
                self.report.remote += 1;
            }
            self.report.expired += 1;
        }
        self.buf = out;
        self.told[cpu as usize] = self.svc.next_event(cpu);
        Ok(())
    }

    fn wake(&mut self, cpu: CpuId) -> Result<(), String> {
        self.svc.vcpu_run(cpu);
        self.model.running[cpu as usize] = true;
        self.report.wakeups += 1;
        self.exit(cpu)
    }

    fn first_pinned(&self, cpu: CpuId) -> u64 {
        self.model
            .pending
            .iter()
            .filter(|(&id, &(_, _, k))| {
                k == TimerKind::Pinned && self.svc.timer_owner(id).map(|o| o.0) == Some(cpu)
            })
            .map(|(_, &(d, sl, _))| d.saturating_add(sl))
            .min()
            .unwrap_or(KTIME_MAX)
    }

    fn first_own(&self, cpu: CpuId) -> u64 {
        self.model
            .pending
            .iter()
            .filter(|(&id, _)| self.svc.timer_owner(id).map(|o| o.0) == Some(cpu))
            .map(|(_, &(d, sl, _))| d.saturating_add(sl))
            .min()
            .unwrap_or(KTIME_MAX)
    }

    /// Applies one operation and checks.
    pub fn step(&mut self, op: Op) -> Result<(), String> {
        let on = |s: &Self, c: CpuId| s.model.online[c as usize];
        let run = |s: &Self, c: CpuId| s.model.online[c as usize] && s.model.running[c as usize];
        match op {
            Op::Arm {
                cpu,
                id,
                delta,
                slack,
                kind,
            } => {
                if !on(self, cpu) {
                    return Ok(());
                }
                let deadline = self.now() + 1 + delta;
                let was = self.svc.arm(cpu, id, deadline, slack, kind);
                let model_was = self
                    .model
                    .pending
                    .insert(id, (deadline, slack, kind))
                    .is_some();
                if was != model_was {
                    return Err(format!("arm returned {was}, model says {model_was}"));
                }
                match self.svc.timer_owner(id) {
                    Some((owner, k)) if k == kind => {
                        if owner != cpu && self.model.isolated[owner as usize] {
                            return Err(format!(
                                "timer {id} armed by {cpu} placed on isolated cpu {owner}"
                            ));
                        }
                    }
                    _ => return Err(format!("armed timer {id} not queued as {kind:?}")),
                }
            }
            Op::Cancel { id } => {
                let was = self.svc.cancel(id);
                let model_was = self.model.pending.remove(&id).is_some();
                if was != model_was {
                    return Err(format!("cancel returned {was}, model says {model_was}"));
                }
            }
            Op::Halt { cpu } => {
                if !run(self, cpu) {
                    return Ok(());
                }
                let others_running = self.model.running_in_hier() > 1;
                let w = self.svc.vcpu_halt(cpu);
                self.model.running[cpu as usize] = false;
                self.told[cpu as usize] = w;
                match self.svc.policy() {
                    _ if self.model.isolated[cpu as usize] => {
                        let own = self.first_own(cpu);
                        if w != own {
                            return Err(format!(
                                "isolated cpu halt returned {w}, own first timer is {own}"
                            ));
                        }
                    }
                    Policy::Local | Policy::Push => {
                        let own = self.first_own(cpu);
                        if w != own {
                            return Err(format!("halt returned {w}, own first timer is {own}"));
                        }
                    }
                    Policy::Pull => {
                        let pinned = self.first_pinned(cpu);
                        if w > pinned {
                            return Err(format!(
                                "halt returned {w} after its first pinned timer {pinned}"
                            ));
                        }
                        if w < pinned && others_running {
                            return Err(format!(
                                "halt returned {w} < pinned {pinned}: woken for movable events while others run"
                            ));
                        }
                    }
                }
            }
            Op::Run { cpu } => {
                if !on(self, cpu) || run(self, cpu) {
                    return Ok(());
                }
                self.wake(cpu)?;
            }
            Op::Advance { dt } => {
                self.clock.advance(dt);
                self.collect_kicks();
                return self.step(Op::Settle);
            }
            Op::Expire { cpu } => {
                if !run(self, cpu) {
                    return Ok(());
                }
                self.exit(cpu)?;
            }
            Op::Online { cpu } => {
                if on(self, cpu) {
                    return Ok(());
                }
                // The VMM prepares a vCPU's place in the hierarchy before it
                // runs (an even one prepares the next one too, ahead of time,
                // so groups of never-online vCPUs exist while others run).
                self.svc.vcpu_prepare(cpu);
                if cpu % 2 == 0 && ((cpu + 1) as usize) < self.model.online.len() {
                    self.svc.vcpu_prepare(cpu + 1);
                }
                self.svc
                    .check_invariants()
                    .map_err(|e| format!("invariant after prepare: {e}"))?;
                self.svc.vcpu_online(cpu);
                self.model.online[cpu as usize] = true;
                self.model.running[cpu as usize] = true;
                self.exit(cpu)?;
            }
            Op::Offline { cpu } => {
                let online = self.model.online.iter().filter(|&&o| o).count();
                if !on(self, cpu) || online < 2 {
                    return Ok(());
                }
                let own: Vec<TimerId> = self
                    .model
                    .pending
                    .keys()
                    .copied()
                    .filter(|&id| self.svc.timer_owner(id).map(|o| o.0) == Some(cpu))
                    .collect();
                let forced = self.svc.vcpu_offline(cpu);
                self.model.online[cpu as usize] = false;
                self.model.running[cpu as usize] = false;
                self.told[cpu as usize] = KTIME_MAX;
                let all_isolated = (0..self.model.online.len())
                    .all(|c| !self.model.online[c] || self.model.isolated[c]);
                for id in own {
                    match self.svc.timer_owner(id) {
                        Some((o, _)) if o != cpu && on(self, o) => {
                            if self.model.isolated[o as usize] && !all_isolated {
                                return Err(format!(
                                    "timer {id} of offlined cpu {cpu} handed to isolated cpu {o}"
                                ));
                            }
                        }
                        other => {
                            return Err(format!(
                                "timer {id} of offlined cpu {cpu} now at {other:?}"
                            ))
                        }
                    }
                }
                if let Some(o) = forced {
                    if !on(self, o) || o == cpu {
                        return Err(format!("offline forced {o} active, which is not online"));
                    }
                    if self.model.isolated[o as usize] {
                        return Err(format!("offline forced isolated cpu {o} active"));
                    }
                    if !run(self, o) {
                        self.wake(o)?;
                    }
                }
            }
            Op::PushIdle { cpu, idle } => {
                self.svc.set_push_idle(cpu, idle);
            }
            Op::Settle => {
                self.settle()?;
            }
        }
        self.report.applied += 1;
        // Kicks are taken only when settling: a kick queued but not yet
        // delivered covers its vCPU (see `TimerService::check_invariants`).
        self.svc
            .check_invariants()
            .map_err(|e| format!("invariant: {e}"))
    }

    fn settle(&mut self) -> Result<(), String> {
        for round in 0.. {
            if round > 10_000 {
                return Err("settle does not converge (livelock?)".into());
            }
            self.collect_kicks();
            let now = self.now();
            let n = self.model.online.len() as CpuId;
            let next = (0..n).find(|&c| {
                self.model.online[c as usize]
                    && (self.kicked[c as usize] || self.told[c as usize] <= now)
            });
            let Some(c) = next else { break };
            self.kicked[c as usize] = false;
            if self.model.running[c as usize] {
                self.exit(c)?;
            } else {
                self.wake(c)?;
            }
        }
        let now = self.now();
        let due = self.model.due(now);
        if !due.is_empty() {
            let detail: Vec<_> = due
                .iter()
                .map(|&(id, d, sl)| (id, d, sl, self.svc.timer_owner(id)))
                .collect();
            return Err(format!(
                "missed at {now}: (id, deadline, slack, owner) {detail:?}"
            ));
        }
        Ok(())
    }
}
