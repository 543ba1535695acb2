//! `quietvm simulate`: a deterministic discrete-event simulation that drives the real
//! [`TimerService`] (all three policies) with virtual time, to count what each policy costs at vCPU
//! counts no test machine has. No KVM: the vCPUs are state machines.
//!
//! # The model
//!
//! Each vCPU follows the calling contract of [`tmigr::service`] exactly as `vmm/src/vm/vcpu_thread.rs`
//! does, on a [`FakeClock`] the engine sets before each event:
//!
//! * **Start** (time 0, in vCPU order): every vCPU first halts (`vcpu_halt`, as each VMM thread does
//!   before its guest joins the timers), then at its start joins (`vcpu_run`), makes its workload's
//!   first armings, and either stays busy or is awake (below) and halts.
//! * **Running** (busy in the guest): it is kicked out of the guest at the time `next_event` gave it
//!   and pays the *exit cost* before the VMM runs: `expire` samples the clock at
//!   `next_event + exit_cost`. The callbacks of what it expired run on it at once and may arm, cancel or
//!   hand work to another vCPU; then `next_event` again. A running vCPU only exits for timers and
//!   kicks (real guests exit for other reasons too; those exits would only make it look earlier).
//! * **Halted**: `vcpu_halt` says when to wake; a halted vCPU sleeps until then or until kicked and
//!   pays the *wake latency* (the host waking its thread): it runs `vcpu_run` + `expire` at
//!   `wake time + wake_latency`. The callbacks of what it expired, and any work another vCPU handed
//!   it, run at once (under push it counts as idle until it halts again, as the VMM's doorbell
//!   handler does). Then it stays **awake** (running, in the hierarchy too) for one exit cost plus
//!   one per callback or message it ran (each costs the guest at least one exit for its timer
//!   commands), entering the guest only if it ran something, and halts again unless its workload
//!   made it busy. If `vcpu_halt` returns a time already passed it does not sleep (the VMM's rule):
//!   it runs again at once and no wakeup is counted.
//!
//!   The awake time matters beyond lateness: two vCPUs woken at the same time must overlap, as two
//!   host threads do. If each halted before the next one woke, each would be the last to idle the
//!   root in turn and be handed the same first expiry, and they would all wake together at every
//!   expiry from then on (a stale root-idler wakeup that never dies out).
//! * **Kicks**: after every step the engine drains `take_kicks` and kicks each vCPU but the one that
//!   made the step (it re-reads its own next event anyway, as the VMM skips itself). A kicked running
//!   vCPU exits after the exit cost, a kicked halted one wakes after the wake latency.
//! * **Wakeups** are counted each time a halted vCPU's sleep ends, with the cause the VMM gives
//!   ([`WakeupCause`]): its own pinned timer, its own movable timer, other vCPUs' movable timers (the
//!   root idler or a migrator), work handed to it (`interrupt`), a hierarchy kick, or nothing.
//!
//! Lateness (expiry minus deadline) therefore comes from the model's structure only: about the exit
//! cost for a timer a running vCPU expires, about the wake latency for one that needed a wakeup, plus
//! whatever the policy adds (a timer behind another that shares its wakeup, a kick chain).
//!
//! Every arming is recorded by the engine itself; every expiry is checked against that record:
//! a timer must fire with the deadline it was armed with, not before it (`early`), not after it was
//! cancelled or replaced (`bogus`), and every arming still pending at the end although its deadline
//! passed more than [`MISS_GRACE_NS`] + wake latency + exit cost before the end is `missed`. The
//! return values of `arm` and `cancel` are checked against the record too, and
//! `TimerService::check_invariants` runs at the end (and every N events in the tests).
//!
//! Runs are deterministic: events at the same time run in the order they were scheduled, and the
//! workloads' random draws are keyed by seed, timer and arming (see [`rng`]).

mod cli;
pub mod report;
pub mod rng;
pub mod workloads;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::mem;
use std::time::Instant;

use tmigr::clock::FakeClock;
use tmigr::service::{
    CpuId, Expired, Policy, ServiceConfig, TimerId, TimerKind, TimerService, KTIME_MAX,
};

pub use cli::{main, SimulateArgs};
use report::{HierarchyFigures, PolicyReport, ServiceFigures, SimReport, TimerFigures};
use workloads::{Action, Workload, WorkloadKind};

use crate::optimum::OptimumBuilder;
use quietvm_vmm::accounting::{
    classify_wakeup, ExpiryCounts, KickReasons, LatenessRecorder, WakeupCause,
};

/// Most vCPUs a simulation accepts (four times KVM's usual maximum; the hierarchy has 5 levels).
pub const MAX_VCPUS: u32 = 16_384;
/// Longest simulated run, in seconds (for messages).
const MAX_DURATION_S: u64 = MAX_DURATION_NS / 1_000_000_000;
/// Most timers per vCPU.
pub const MAX_TIMERS_PER_VCPU: u32 = 64;
/// Longest simulated run.
pub const MAX_DURATION_NS: u64 = 3_600 * 1_000_000_000;
/// Largest `--slack-pct`: a window as long as the period.
pub const MAX_SLACK_PCT: u32 = 100;
/// Longest period of a periodic timer (`--period-max-us`).
pub const MAX_PERIOD_NS: u64 = 60 * 1_000_000_000;
/// Largest wake latency or exit cost.
pub const MAX_COST_NS: u64 = 1_000_000_000;
/// An arming still pending this long (plus wake latency and exit cost) after its deadline at the end
/// of the run counts as missed.
pub const MISS_GRACE_NS: u64 = 1_000_000;

/// One simulation's settings (shared by the policies it runs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    pub vcpus: u32,
    pub workload: WorkloadKind,
    /// Simulated time.
    pub duration_ns: u64,
    pub seed: u64,
    /// Timers per vCPU (periodic timers, or the rearm-heavy set size; ping-pong always has one).
    pub timers_per_vcpu: u32,
    /// From a halted vCPU's wake time (or kick) to its `vcpu_run`.
    pub wake_latency_ns: u64,
    /// From a running vCPU's exit (its `next_event`, or a kick) to its `expire`.
    pub exit_cost_ns: u64,
    /// Also run `TimerService::check_invariants` after every this many events (0: only at the end).
    pub check_every: u64,
    /// Print a progress line on stderr.
    pub progress: bool,
    /// vCPUs kept out of the hierarchy (tmigr's `ServiceConfig::isolated`): they never expire
    /// another vCPU's timer.
    pub isolated: Vec<CpuId>,
    /// Each arming's slack, in percent of its period or timeout (0: exact deadlines): the timer may
    /// fire anywhere in `[deadline, deadline + slack]`.
    pub slack_pct: u32,
    /// The periodic workloads' periods are drawn from `[min, max)` (default 1-10 ms).
    pub periods_ns: (u64, u64),
}

impl SimConfig {
    /// Defaults for `vcpus` and `workload`: 1 s, seed 1, the workload's timer count, 50 us wake
    /// latency, 5 us exit cost.
    pub fn new(vcpus: u32, workload: WorkloadKind) -> Self {
        SimConfig {
            vcpus,
            workload,
            duration_ns: 1_000_000_000,
            seed: 1,
            timers_per_vcpu: workload.default_timers(),
            wake_latency_ns: 50_000,
            exit_cost_ns: 5_000,
            check_every: 0,
            progress: false,
            isolated: Vec::new(),
            slack_pct: 0,
            periods_ns: (workloads::PERIOD_MIN, workloads::PERIOD_MAX),
        }
    }

    /// What is wrong, if anything.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SimError::Vcpus(self.vcpus));
        }
        if self.duration_ns == 0 || self.duration_ns > MAX_DURATION_NS {
            return Err(SimError::Duration(self.duration_ns as f64 / 1e9));
        }
        let min = self.workload.min_timers();
        if self.timers_per_vcpu < min || self.timers_per_vcpu > MAX_TIMERS_PER_VCPU {
            return Err(SimError::Timers {
                min,
                workload: self.workload,
                got: self.timers_per_vcpu,
            });
        }
        if self.wake_latency_ns > MAX_COST_NS || self.exit_cost_ns > MAX_COST_NS {
            return Err(SimError::Costs);
        }
        if let Some(&c) = self.isolated.iter().find(|&&c| c >= self.vcpus) {
            return Err(SimError::Isolated(c, self.vcpus));
        }
        if self.slack_pct > MAX_SLACK_PCT {
            return Err(SimError::SlackPct(self.slack_pct));
        }
        let (lo, hi) = self.periods_ns;
        if lo == 0 || lo >= hi || hi > MAX_PERIOD_NS {
            return Err(SimError::Periods);
        }
        Ok(())
    }
}

/// Why a simulation could not run, or stopped. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("--vcpus must be 1..={MAX_VCPUS}, not {0}")]
    Vcpus(u32),
    #[error("--duration-s must be more than 0 and at most {MAX_DURATION_S} s, not {0}")]
    Duration(f64),
    #[error("--timers must be {min}..={MAX_TIMERS_PER_VCPU} for workload {workload}, not {got}")]
    Timers {
        min: u32,
        workload: WorkloadKind,
        got: u32,
    },
    #[error("--wake-latency-us and --exit-cost-us must be at most 1 s")]
    Costs,
    #[error(
        "--period-min-us must be above 0 and below --period-max-us, which must be at most 60 s"
    )]
    Periods,
    #[error("--slack-pct must be 0..={MAX_SLACK_PCT}, not {0}")]
    SlackPct(u32),
    #[error("isolated vCPU {0} does not exist (the simulation has {1})")]
    Isolated(CpuId, u32),
    #[error("--isolated-vcpus: {0}")]
    IsolatedList(String),
    #[error("{flag} must be 0..=1000000, not {value}")]
    Micros { flag: &'static str, value: f64 },
    #[error("unknown policy `{0}` (local, push, pull or all)")]
    UnknownPolicy(String),
    #[error("{0}")]
    UnknownWorkload(String),
    #[error("ping-pong has exactly one timer per vCPU (--timers 1)")]
    PingPongTimers,
    /// A bug in the service or the engine: time stood still.
    #[error(
        "{policy}: no progress at t={at_ns} ns after {events} events at that time (vCPU {cpu})"
    )]
    NoProgress {
        policy: Policy,
        at_ns: u64,
        events: u64,
        cpu: CpuId,
    },
}

/// One policy's result and how long the host took to simulate it.
pub struct PolicyRun {
    pub report: PolicyReport,
    pub wall_ms: f64,
}

/// Runs `policies` one after the other on the same guest; `Err` if `cfg` is invalid or a simulation
/// stopped making progress (a bug in the service or the engine).
pub fn simulate(cfg: &SimConfig, policies: &[Policy]) -> Result<(SimReport, Vec<f64>), SimError> {
    cfg.validate()?;
    let mut report = SimReport {
        workload: cfg.workload.name().to_string(),
        vcpus: cfg.vcpus,
        duration_ns: cfg.duration_ns,
        seed: cfg.seed,
        timers_per_vcpu: cfg.timers_per_vcpu,
        wake_latency_ns: cfg.wake_latency_ns,
        exit_cost_ns: cfg.exit_cost_ns,
        slack_pct: cfg.slack_pct,
        periods_ns: cfg.periods_ns,
        policies: Vec::new(),
        ratios_vs_local: Vec::new(),
    };
    let mut wall = Vec::new();
    for &p in policies {
        let run = run_policy(cfg, p)?;
        report.policies.push(run.report);
        wall.push(run.wall_ms);
    }
    report.compute_ratios();
    Ok((report, wall))
}

/// Simulates one policy.
pub fn run_policy(cfg: &SimConfig, policy: Policy) -> Result<PolicyRun, SimError> {
    cfg.validate()?;
    let started = Instant::now();
    let mut engine = Engine::new(cfg, policy);
    engine.run()?;
    Ok(PolicyRun {
        report: engine.finish(),
        wall_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum What {
    /// A running vCPU's exit or a halted one's wake, valid only while `gen` is the vCPU's `look_gen`.
    Look,
    /// The end of a running vCPU's [`Phase`] (valid while `gen` is its `phase_gen`).
    PhaseEnd,
    /// The vCPU's guest joins the timers.
    Start,
}

/// Ordered by time, then by scheduling order: a deterministic total order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    time: u64,
    seq: u64,
    cpu: CpuId,
    what: What,
    gen: u32,
}

/// What a vCPU is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Asleep in the VMM's halt path.
    Halted,
    /// In the guest, busy with the workload's own work until `until` (`KTIME_MAX`: for ever).
    Busy { until: u64 },
    /// Awake briefly, not busy: running the callbacks or work it was woken for, or only the VMM's
    /// halt loop; halts at `until`. Two vCPUs woken at the same time are both active meanwhile, as
    /// two host threads woken together are.
    Awake { until: u64 },
}

struct VcpuSim {
    started: bool,
    phase: Phase,
    phase_gen: u32,
    /// Entered the guest since it last woke (a running vCPU in the halt loop has not).
    in_guest: bool,
    /// When the pending `Look` runs (`KTIME_MAX`: none).
    look_at: u64,
    look_gen: u32,
    /// Kick reasons received since the vCPU last looked.
    kicked: KickReasons,
    /// Work handed to it by other vCPUs ([`Action::Post`]).
    inbox: Vec<u32>,
}

impl VcpuSim {
    fn running(&self) -> bool {
        self.phase != Phase::Halted
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arming {
    Idle,
    /// Queued in the service.
    Pending {
        deadline: u64,
        slack: u64,
        armed_by: CpuId,
    },
    /// Returned by `expire`, its callback not run yet (a callback before it in the same batch may
    /// still cancel or re-arm it, which withdraws the delivery, as the device does).
    Delivered {
        deadline: u64,
        slack: u64,
        armed_by: CpuId,
    },
}

/// What a step of a running vCPU did: the wakeup-cause counts, callbacks and messages run, and
/// the busy phase the workload asked for.
#[derive(Clone, Copy, Debug, Default)]
struct StepOutcome {
    found: ExpiryCounts,
    ran: u64,
    busy: Option<u64>,
}

struct Engine<'a> {
    cfg: &'a SimConfig,
    policy: Policy,
    svc: TimerService<FakeClock>,
    wl: Workload,
    now: u64,
    end: u64,
    queue: BinaryHeap<Reverse<Event>>,
    seq: u64,
    cpus: Vec<VcpuSim>,
    armings: Vec<Arming>,
    // Reused buffers.
    expired: Vec<Expired>,
    actions: Vec<Action>,
    kick_buf: Vec<CpuId>,
    // Figures.
    wakeups: [u64; WakeupCause::ALL.len()],
    timers: TimerFigures,
    /// Every fired arming's window, for the optimum.
    optimum: OptimumBuilder,
    lateness: LatenessRecorder,
    last_expiry_instant: u64,
    guest_exits: u64,
    kicks_delivered: u64,
    events: u64,
    invariants: Option<String>,
    // Progress.
    progress_shown: bool,
    last_progress: Instant,
}

impl<'a> Engine<'a> {
    fn new(cfg: &'a SimConfig, policy: Policy) -> Self {
        let (lo, hi) = cfg.periods_ns;
        let wl = Workload::new(cfg.workload, cfg.vcpus, cfg.timers_per_vcpu, cfg.seed)
            .with_periods(lo, hi);
        let svc = TimerService::new(
            ServiceConfig {
                policy,
                max_timers: wl.max_timers(),
                isolated: cfg.isolated.clone(),
                ..ServiceConfig::default()
            },
            FakeClock::new(0),
            cfg.vcpus,
        );
        let n = cfg.vcpus as usize;
        Engine {
            cfg,
            policy,
            svc,
            armings: vec![Arming::Idle; wl.max_timers() as usize],
            wl,
            now: 0,
            end: cfg.duration_ns,
            queue: BinaryHeap::with_capacity(4 * n),
            seq: 0,
            cpus: (0..n)
                .map(|_| VcpuSim {
                    started: false,
                    phase: Phase::Halted,
                    phase_gen: 0,
                    in_guest: false,
                    look_at: KTIME_MAX,
                    look_gen: 0,
                    kicked: KickReasons::NONE,
                    inbox: Vec::new(),
                })
                .collect(),
            expired: Vec::new(),
            actions: Vec::new(),
            kick_buf: Vec::new(),
            wakeups: [0; WakeupCause::ALL.len()],
            timers: TimerFigures::default(),
            optimum: OptimumBuilder::new(),
            lateness: LatenessRecorder::new(),
            last_expiry_instant: KTIME_MAX,
            guest_exits: 0,
            kicks_delivered: 0,
            events: 0,
            invariants: None,
            progress_shown: false,
            last_progress: Instant::now(),
        }
    }

    fn schedule(&mut self, time: u64, cpu: CpuId, what: What, gen: u32) {
        self.seq += 1;
        self.queue.push(Reverse(Event {
            time,
            seq: self.seq,
            cpu,
            what,
            gen,
        }));
    }

    /// Replaces `cpu`'s pending look with one at `at` (`KTIME_MAX`: none).
    fn set_look(&mut self, cpu: CpuId, at: u64) {
        let v = &mut self.cpus[cpu as usize];
        v.look_gen = v.look_gen.wrapping_add(1);
        v.look_at = at;
        let gen = v.look_gen;
        if at != KTIME_MAX {
            self.schedule(at, cpu, What::Look, gen);
        }
    }

    /// Starts a new phase of `cpu` (ending at `until` unless halted or `KTIME_MAX`).
    fn set_phase(&mut self, cpu: CpuId, phase: Phase) {
        if self.policy == Policy::Push && !matches!(phase, Phase::Awake { .. }) {
            // A vCPU woken with work counts as idle for push until it halts again (the VMM: until
            // its guest has popped every expired timer, just before its `HLT`) or gets busy.
            self.svc.set_push_idle(cpu, false);
        }
        let v = &mut self.cpus[cpu as usize];
        v.phase = phase;
        v.phase_gen = v.phase_gen.wrapping_add(1);
        let gen = v.phase_gen;
        match phase {
            Phase::Busy { until } | Phase::Awake { until } if until != KTIME_MAX => {
                self.schedule(until, cpu, What::PhaseEnd, gen);
            }
            _ => {}
        }
    }

    fn run(&mut self) -> Result<(), SimError> {
        // Every VMM thread halts before its guest joins the timers.
        for c in 0..self.cfg.vcpus {
            self.svc.vcpu_halt(c);
        }
        let mut ignored = Vec::new();
        self.svc.take_kicks(&mut ignored);
        for c in 0..self.cfg.vcpus {
            self.schedule(0, c, What::Start, 0);
        }
        // A step at a time it did not advance from: more than this in a row means a livelock.
        let livelock_limit = 1_000_000 + 100 * u64::from(self.cfg.vcpus);
        let mut same_time = 0u64;
        while let Some(&Reverse(ev)) = self.queue.peek() {
            if ev.time > self.end {
                break;
            }
            self.queue.pop();
            let v = &self.cpus[ev.cpu as usize];
            let valid = match ev.what {
                What::Look => ev.gen == v.look_gen,
                What::PhaseEnd => ev.gen == v.phase_gen && v.running(),
                What::Start => true,
            };
            if !valid {
                continue;
            }
            if ev.time == self.now {
                same_time += 1;
                if same_time > livelock_limit {
                    return Err(SimError::NoProgress {
                        policy: self.policy,
                        at_ns: self.now,
                        events: same_time,
                        cpu: ev.cpu,
                    });
                }
            } else {
                same_time = 0;
            }
            self.now = ev.time;
            self.svc.clock().set(ev.time);
            self.events += 1;
            match ev.what {
                What::Look => {
                    self.cpus[ev.cpu as usize].look_at = KTIME_MAX;
                    if self.cpus[ev.cpu as usize].running() {
                        self.exit(ev.cpu);
                    } else {
                        self.wake(ev.cpu);
                    }
                }
                What::PhaseEnd => self.phase_end(ev.cpu),
                What::Start => self.start(ev.cpu),
            }
            if self.cfg.check_every > 0
                && self.events.is_multiple_of(self.cfg.check_every)
                && self.invariants.is_none()
            {
                if let Err(e) = self.svc.check_invariants() {
                    self.invariants = Some(format!("at t={} ns: {e}", self.now));
                }
            }
            if self.cfg.progress && self.events.is_multiple_of(65_536) {
                self.show_progress(false);
            }
        }
        self.now = self.end;
        self.svc.clock().set(self.end);
        if self.progress_shown {
            self.show_progress(true);
        }
        Ok(())
    }

    fn show_progress(&mut self, done: bool) {
        if !done && self.last_progress.elapsed().as_millis() < 500 {
            return;
        }
        self.last_progress = Instant::now();
        self.progress_shown = true;
        let pct = self.now as f64 * 100.0 / self.end as f64;
        eprint!(
            "\rsimulate: {} {}: {pct:5.1}% of {:.3} s simulated{}",
            self.policy,
            self.cfg.workload,
            self.end as f64 / 1e9,
            if done { "\n" } else { "" }
        );
    }

    /// The guest of `cpu` joins the timers at `now`: its first armings, then busy or awake.
    fn start(&mut self, cpu: CpuId) {
        self.cpus[cpu as usize].started = true;
        self.svc.vcpu_run(cpu);
        let mut actions = mem::take(&mut self.actions);
        self.wl.start(cpu, self.now, &mut actions);
        let ran = actions.len() as u64;
        let busy = self.apply(cpu, &mut actions);
        self.actions = actions;
        self.after_step(
            cpu,
            StepOutcome {
                ran,
                busy,
                ..StepOutcome::default()
            },
        );
    }

    /// After a step of `cpu`, which is running: busy if the workload said so; else awake for one
    /// exit cost per callback or message it ran (each one exits at least once for its timer
    /// commands) plus one, then it halts. It enters the guest (`next_event`) if busy, if it ran
    /// something, or if it was in the guest already; a vCPU woken for nothing only goes round the
    /// VMM's halt loop.
    fn after_step(&mut self, cpu: CpuId, out: StepOutcome) {
        let phase = self.cpus[cpu as usize].phase;
        match (out.busy, phase) {
            (Some(u), Phase::Busy { until }) => {
                if u > until {
                    self.set_phase(cpu, Phase::Busy { until: u });
                }
            }
            (Some(u), _) => self.set_phase(cpu, Phase::Busy { until: u }),
            (None, Phase::Busy { .. }) => {}
            (None, Phase::Awake { until }) if until != KTIME_MAX && out.ran == 0 => {}
            (None, _) => {
                let mut until = self.now + self.cfg.exit_cost_ns * (1 + out.ran);
                if let Phase::Awake { until: cur } = phase {
                    if cur != KTIME_MAX {
                        until = until.max(cur);
                    }
                }
                self.set_phase(cpu, Phase::Awake { until });
            }
        }
        let v = &self.cpus[cpu as usize];
        if out.ran > 0 || v.in_guest || matches!(v.phase, Phase::Busy { .. }) {
            self.program(cpu);
        }
        self.deliver_kicks(cpu);
    }

    /// A running `cpu` enters the guest until its next event.
    fn program(&mut self, cpu: CpuId) {
        self.cpus[cpu as usize].in_guest = true;
        let next = self.svc.next_event(cpu);
        let at = if next == KTIME_MAX {
            KTIME_MAX
        } else {
            next.max(self.now) + self.cfg.exit_cost_ns
        };
        self.set_look(cpu, at);
    }

    /// A running `cpu` exits (its next event came, or it was kicked): expire, callbacks, enter again.
    fn exit(&mut self, cpu: CpuId) {
        self.guest_exits += 1;
        self.cpus[cpu as usize].kicked = KickReasons::NONE;
        let mut out = self.expire(cpu, false);
        let (ran, busy) = self.deliver_inbox(cpu);
        out.ran += ran;
        out.busy = out.busy.max(busy);
        self.after_step(cpu, out);
    }

    /// A running `cpu`'s phase ends: a busy one runs the workload's end of burst, then both halt
    /// unless the workload made it busy again.
    fn phase_end(&mut self, cpu: CpuId) {
        if matches!(self.cpus[cpu as usize].phase, Phase::Busy { .. }) {
            let mut actions = mem::take(&mut self.actions);
            self.wl.on_burst_end(cpu, self.now, &mut actions);
            let busy = self.apply(cpu, &mut actions);
            self.actions = actions;
            if let Some(until) = busy {
                self.set_phase(cpu, Phase::Busy { until });
                self.program(cpu);
                self.deliver_kicks(cpu);
                return;
            }
        }
        self.halt(cpu);
    }

    /// `cpu` halts (the VMM's halt path): sleep until `vcpu_halt`'s time, unless that has passed or
    /// work is waiting, in which case it runs again at once without a wakeup.
    fn halt(&mut self, cpu: CpuId) {
        let v = &mut self.cpus[cpu as usize];
        v.in_guest = false;
        // Kicks taken while running are answered by this halt: `vcpu_halt` computes afresh.
        v.kicked = KickReasons::NONE;
        if v.inbox.is_empty() {
            self.set_phase(cpu, Phase::Halted);
            let wake_at = self.svc.vcpu_halt(cpu);
            self.deliver_kicks(cpu);
            if wake_at > self.now {
                let at = if wake_at == KTIME_MAX {
                    KTIME_MAX
                } else {
                    wake_at + self.cfg.wake_latency_ns
                };
                self.set_look(cpu, at);
                return;
            }
        }
        self.run_after_halt(cpu, false);
    }

    /// A halted `cpu`'s sleep ended (its time, or a kick): a wakeup.
    fn wake(&mut self, cpu: CpuId) {
        self.run_after_halt(cpu, true);
    }

    /// `vcpu_run` + `expire` + callbacks after a halt; counts the wakeup if it `slept`.
    fn run_after_halt(&mut self, cpu: CpuId, slept: bool) {
        let reasons = mem::take(&mut self.cpus[cpu as usize].kicked);
        self.svc.vcpu_run(cpu);
        // Running from here on, for a time `after_step` decides (`KTIME_MAX`: not decided yet).
        self.set_phase(cpu, Phase::Awake { until: KTIME_MAX });
        self.set_look(cpu, KTIME_MAX);
        self.cpus[cpu as usize].in_guest = false;
        let mut out = self.expire(cpu, true);
        let handed_work = !self.cpus[cpu as usize].inbox.is_empty();
        if handed_work {
            if self.policy == Policy::Push {
                self.svc.set_push_idle(cpu, true);
            }
            let (ran, busy) = self.deliver_inbox(cpu);
            out.ran += ran;
            out.busy = out.busy.max(busy);
        }
        if slept {
            let cause = classify_wakeup(out.found, reasons, handed_work);
            self.wakeups[cause.index()] += 1;
        }
        self.after_step(cpu, out);
    }

    /// `expire` on `cpu` and run the callbacks: what it found (counted as the VMM counts them for
    /// wakeup causes: by the base they were queued on), how many callbacks ran, and the busy phase
    /// they asked for.
    fn expire(&mut self, cpu: CpuId, from_halt: bool) -> StepOutcome {
        let mut expired = mem::take(&mut self.expired);
        expired.clear();
        self.svc.expire(cpu, &mut expired);
        let mut out = StepOutcome::default();
        for e in &expired {
            out.found.count(cpu, e);
            // Every returned timer must be pending with that deadline.
            match self.armings[e.id as usize] {
                Arming::Pending {
                    deadline,
                    slack,
                    armed_by,
                } if deadline == e.deadline && slack == e.slack => {
                    self.armings[e.id as usize] = Arming::Delivered {
                        deadline,
                        slack,
                        armed_by,
                    };
                }
                _ => self.timers.bogus += 1,
            }
        }
        (out.ran, out.busy) = if expired.is_empty() {
            (0, None)
        } else if from_halt {
            if self.policy == Policy::Push {
                self.svc.set_push_idle(cpu, true);
            }
            self.run_callbacks(cpu, &expired)
        } else {
            self.run_callbacks(cpu, &expired)
        };
        self.expired = expired;
        out
    }

    /// Runs the callbacks of `expired` on `cpu`: (callbacks run, busy phase asked for).
    fn run_callbacks(&mut self, cpu: CpuId, expired: &[Expired]) -> (u64, Option<u64>) {
        let mut busy = None;
        let mut ran = 0;
        let mut actions = mem::take(&mut self.actions);
        for e in expired {
            let Arming::Delivered {
                deadline,
                slack,
                armed_by,
            } = self.armings[e.id as usize]
            else {
                continue; // withdrawn by an earlier callback of this batch (or bogus)
            };
            if deadline != e.deadline {
                continue;
            }
            self.armings[e.id as usize] = Arming::Idle;
            self.timers.fired += 1;
            self.optimum
                .add(e.owner, e.kind == TimerKind::Pinned, deadline, slack);
            ran += 1;
            if self.now > deadline.saturating_add(slack) {
                self.timers.after_window += 1;
            }
            if self.now < deadline {
                self.timers.early += 1;
                self.lateness.record(0);
            } else {
                self.lateness.record(self.now - deadline);
            }
            if armed_by != cpu {
                self.timers.remote_expiries += 1;
                if self.svc.is_isolated(cpu) {
                    self.timers.isolated_remote_expiries += 1;
                }
            }
            if self.last_expiry_instant != self.now {
                self.last_expiry_instant = self.now;
                self.timers.expiry_instants += 1;
            }
            actions.clear();
            self.wl
                .on_expire(cpu, e.id, deadline, self.now, &mut actions);
            busy = busy.max(self.apply(cpu, &mut actions));
        }
        self.actions = actions;
        (ran, busy)
    }

    /// Runs the work other vCPUs handed to `cpu`: (messages run, busy phase asked for).
    fn deliver_inbox(&mut self, cpu: CpuId) -> (u64, Option<u64>) {
        let mut busy = None;
        let mut ran = 0;
        let mut actions = Vec::new();
        while !self.cpus[cpu as usize].inbox.is_empty() {
            let msgs = mem::take(&mut self.cpus[cpu as usize].inbox);
            for msg in msgs {
                ran += 1;
                actions.clear();
                self.wl.on_message(cpu, msg, self.now, &mut actions);
                busy = busy.max(self.apply(cpu, &mut actions));
            }
        }
        (ran, busy)
    }

    /// Applies a workload's actions on `cpu`; returns the busy phase they asked for.
    fn apply(&mut self, cpu: CpuId, actions: &mut Vec<Action>) -> Option<u64> {
        let mut busy = None;
        for a in actions.drain(..) {
            match a {
                Action::Arm {
                    id,
                    deadline,
                    kind,
                    span,
                } => self.arm(cpu, id, deadline, kind, span),
                Action::Cancel { id } => self.cancel(id),
                Action::Busy { until } => busy = busy.max(Some(until)),
                Action::Post { to, msg } => {
                    self.cpus[to as usize].inbox.push(msg);
                    if to != cpu {
                        self.kick(to, KickReasons::DELIVERY);
                    }
                }
            }
        }
        busy
    }

    fn arm(&mut self, cpu: CpuId, id: TimerId, deadline: u64, kind: TimerKind, span: u64) {
        // The device refuses a deadline not in the future; the workloads never ask for one.
        let deadline = deadline.max(self.now + 1);
        let span = if span == 0 { deadline - self.now } else { span };
        let slack = span.saturating_mul(u64::from(self.cfg.slack_pct)) / 100;
        let was = self.svc.arm(cpu, id, deadline, slack, kind);
        let expected = match self.armings[id as usize] {
            Arming::Pending { .. } => {
                self.timers.replaced += 1;
                true
            }
            Arming::Delivered { .. } => {
                self.timers.replaced += 1;
                false
            }
            Arming::Idle => false,
        };
        if was != expected {
            self.timers.api_mismatches += 1;
        }
        self.timers.armed += 1;
        self.armings[id as usize] = Arming::Pending {
            deadline,
            slack,
            armed_by: cpu,
        };
    }

    fn cancel(&mut self, id: TimerId) {
        let was = self.svc.cancel(id);
        let expected = match self.armings[id as usize] {
            Arming::Pending { .. } => {
                self.timers.cancelled += 1;
                true
            }
            Arming::Delivered { .. } => {
                self.timers.cancelled += 1;
                false
            }
            Arming::Idle => false,
        };
        if was != expected {
            self.timers.api_mismatches += 1;
        }
        self.armings[id as usize] = Arming::Idle;
    }

    /// Delivers the kicks the service asked for, except to `actor` (it re-reads its own time).
    fn deliver_kicks(&mut self, actor: CpuId) {
        let mut buf = mem::take(&mut self.kick_buf);
        self.svc.take_kicks(&mut buf);
        for k in buf.drain(..) {
            if k != actor {
                self.kicks_delivered += 1;
                self.kick(k, KickReasons::HIERARCHY);
            }
        }
        self.kick_buf = buf;
    }

    fn kick(&mut self, cpu: CpuId, reason: KickReasons) {
        let v = &mut self.cpus[cpu as usize];
        if !v.started {
            return; // its start runs vcpu_run and computes everything afresh
        }
        v.kicked |= reason;
        let at = self.now
            + if v.running() {
                self.cfg.exit_cost_ns
            } else {
                self.cfg.wake_latency_ns
            };
        if at < v.look_at {
            self.set_look(cpu, at);
        }
    }

    fn finish(mut self) -> PolicyReport {
        self.timers.skipped_periods = self.wl.skipped_periods;
        let grace = MISS_GRACE_NS + self.cfg.wake_latency_ns + self.cfg.exit_cost_ns;
        self.timers.missed = self
            .armings
            .iter()
            .filter(|a| {
                matches!(a, Arming::Pending { deadline, slack, .. } | Arming::Delivered { deadline, slack, .. }
                    if deadline.saturating_add(*slack).saturating_add(grace) < self.end)
            })
            .count() as u64;
        self.timers.lateness_ns = self.lateness.summary();
        if self.invariants.is_none() {
            if let Err(e) = self.svc.check_invariants() {
                self.invariants = Some(format!("at the end: {e}"));
            }
        }
        let s = self.svc.stats();
        let h = s.hierarchy;
        let causes = WakeupCause::ALL
            .iter()
            .map(|&c| (c.name(), self.wakeups[c.index()]))
            .collect();
        let movable = self.wakeups[WakeupCause::OwnMovableTimer.index()]
            + self.wakeups[WakeupCause::RemoteMovableTimer.index()];
        let wakeups: u64 = self.wakeups.iter().sum();
        let optimum = mem::take(&mut self.optimum).finish();
        PolicyReport {
            policy: self.policy.to_string(),
            wakeups,
            wakeups_per_optimum: (optimum.total > 0).then(|| wakeups as f64 / optimum.total as f64),
            optimum,
            movable_wakeups: movable,
            wakeup_causes: causes,
            guest_exits: self.guest_exits,
            kicks_delivered: self.kicks_delivered,
            timers: self.timers,
            service: ServiceFigures {
                arms: s.arms,
                rearms: s.rearms,
                cancels: s.cancels,
                local_expiries: s.local_expiries,
                remote_expiries: s.remote_expiries,
                push_remote_placements: s.push_remote_placements,
                halts: s.halts,
                kicks: s.kicks,
            },
            hierarchy: HierarchyFigures {
                activate_walks: h.activate_walks,
                deactivate_walks: h.deactivate_walks,
                levels_walked: h.levels_walked,
                new_timer_walks: h.new_timer_walks,
                remote_cpu_handled: h.remote_cpu_handled,
                remote_backoffs: h.remote_backoffs,
                cas_retries: h.cas_retries,
            },
            invariants: self.invariants.unwrap_or_else(|| "ok".to_string()),
            events: self.events,
        }
    }
}

#[cfg(test)]
mod tests;
