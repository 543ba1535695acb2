//! The timer service used by the VMM and the simulator.
//!
//! # Contract with the caller (the VMM)
//!
//! Every method takes `&self` and may be called concurrently from any thread.
//! The VMM drives each vCPU thread like this:
//!
//! * **Running** (in guest mode): on every exit, call [`TimerService::expire`]
//!   and deliver what it returns, then program the thread's kick timer at
//!   [`TimerService::next_event`] (`KTIME_MAX`: none).
//! * **Halt** (`HLT`): call [`TimerService::vcpu_halt`]; sleep until the time
//!   it returns (`KTIME_MAX`: forever) or until kicked.
//! * **Wake** (timer or kick): call [`TimerService::vcpu_run`], then
//!   [`TimerService::expire`] and [`TimerService::next_event`] as on any exit.
//!   A vCPU woken at its root wake-up activates and, as the migrator, expires
//!   the idle vCPUs' due movable timers.
//! * **Hotplug**: before a vCPU's thread starts (boot or plug), any thread
//!   may call [`TimerService::vcpu_prepare`] (else `vcpu_online` sets the
//!   vCPU up on its own thread); the vCPU's thread then calls
//!   [`TimerService::vcpu_online`]. A leaving vCPU calls
//!   [`TimerService::vcpu_offline`]; whatever else it hands on (pending
//!   deliveries) goes to [`TimerService::handoff_target`] (the rule
//!   `vcpu_offline` applies to its timers: never an isolated vCPU while a
//!   non-isolated one is online).
//! * **Kicks**: after any call that mutates (`arm`, `cancel`, `vcpu_halt`,
//!   `vcpu_run`, `expire`, `vcpu_prepare`, `vcpu_online`, `vcpu_offline`),
//!   some thread calls [`TimerService::take_kicks`] and kicks every vCPU it
//!   returns: a running one
//!   is forced out of guest mode (then `expire` + `next_event`), a halted one is
//!   woken (then `vcpu_run` + `expire` + `next_event`). Kicks are idempotent
//!   and may be spurious; they are never lost: a vCPU is returned by
//!   `take_kicks` whenever the time it must look at moved before the time it
//!   was last given (by `next_event` or `vcpu_halt`).
//!
//! # How kicks are computed ("programmed" times)
//!
//! Each vCPU has a programmed time P: what `next_event` or `vcpu_halt` last
//! returned, 0 while it is running between `vcpu_run`/`expire` and its
//! `next_event` (it is about to look anyway). A change that makes a vCPU's
//! required time R earlier than P queues a kick. Two kinds of change:
//!
//! * **Base changes** (a timer queued on that vCPU's base by another thread:
//!   an idle arm, a Push placement, a hotplug migration). P is stored under
//!   the base lock, and the arming thread compares under the same lock: one
//!   of them sees the other.
//! * **Hierarchy changes** (a group's first event moved earlier, or a vCPU
//!   became migrator of a group with events): made by other vCPUs' walks
//!   without that vCPU's lock. The walker writes (compare-and-swap or
//!   group-locked store), issues `fence(SeqCst)`, finds the migrator by
//!   following migrator bits down from the group where its walk stopped,
//!   and compares that migrator's remote expiry with its P. `next_event`
//!   stores P, issues `fence(SeqCst)`, then re-reads the remote expiry.
//!   This is the store-buffering pattern: with both fences, either the
//!   walker reads the new P or `next_event` reads the new state. If the
//!   migrator changed meanwhile, whoever changed it ran the same check after
//!   its own change.

use crate::base::{BaseCounters, TimerBase, TimerSlots};
use crate::clock::Clock;
use crate::hierarchy::{HierConfig, HierStatsSnapshot, Hierarchy, RemoteExpiry, WalkResult};
use crate::sync::{lock, AtomicBool, AtomicU32, AtomicU64, Mutex, Ordering, StatCounter};

// The basic types live in `types`; re-exported here so `tmigr::service::{...}`
// paths keep working (new code uses `tmigr::types` or the crate root).
pub use crate::types::{CpuId, Expired, Expiry, Policy, TimerId, TimerKind, KTIME_MAX};

/// Slots allocated for vCPUs when neither `cpus_online` nor `nodes` asks for
/// more (KVM's `KVM_CAP_MAX_VCPUS` here). `vcpu_online` panics beyond it.
pub const DEFAULT_MAX_CPUS: u32 = 1024;

/// Service configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Placement/expiry policy.
    pub policy: Policy,
    /// Timer ids are `0..max_timers`.
    pub max_timers: u32,
    /// Children per hierarchy group (2..=8; 8 as in the kernel).
    pub group_size: usize,
    /// Node of each vCPU (`nodes[cpu]`); groups below the crossnode level
    /// hold one node's vCPUs. `None`: one node.
    pub nodes: Option<Vec<u32>>,
    /// The most vCPUs that will ever be online (ids `0..max_cpus`): per-vCPU
    /// state and the group arena are sized for it up front. `None`:
    /// [`DEFAULT_MAX_CPUS`]. A VMM that knows its vCPU count passes it, so a
    /// small VM does not carry state for a thousand vCPUs.
    pub max_cpus: Option<u32>,
    /// Isolated vCPUs (ids; duplicates and ids `>= max_cpus` are ignored),
    /// as the kernel's `isolcpus=`/`nohz_full` CPUs are excluded from its
    /// hierarchy ("timers/migration: Exclude isolated cpus from hierarchy").
    /// Under every policy an isolated vCPU: is never in the hierarchy, so it
    /// never becomes a migrator and never expires another vCPU's timer; has
    /// its own movable timers expire on itself, like pinned ones (a halted
    /// isolated vCPU wakes for them); is never chosen by Push as the place
    /// of another vCPU's timer; and is never the recipient of an offlined
    /// vCPU's timers or the vCPU forced active by `vcpu_offline`, unless
    /// every other online vCPU is isolated (see
    /// [`TimerService::handoff_target`]). Empty: none.
    pub isolated: Vec<CpuId>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Pull,
            max_timers: 1024,
            group_size: 8,
            nodes: None,
            max_cpus: None,
            isolated: Vec::new(),
        }
    }
}

/// Counters (monotonic since creation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// `arm` calls.
    pub arms: u64,
    /// `arm` calls that replaced a pending arming.
    pub rearms: u64,
    /// `cancel` calls that removed a pending timer.
    pub cancels: u64,
    /// Timers expired by their own base's vCPU.
    pub local_expiries: u64,
    /// Timers expired by another vCPU (pull model).
    pub remote_expiries: u64,
    /// Movable timers Push placed on another vCPU.
    pub push_remote_placements: u64,
    /// `vcpu_halt` calls.
    pub halts: u64,
    /// Kicks queued (after de-duplication).
    pub kicks: u64,
    /// Times `vcpu_offline` returned a vCPU to force active.
    pub forced_active: u64,
    /// Hierarchy walks, levels, compare-and-swap retries, remote handling.
    pub hierarchy: HierStatsSnapshot,
}

/// Per-vCPU service state, padded to its own cache lines.
#[repr(align(128))]
struct VCpu {
    base: Mutex<TimerBase>,
    online: AtomicBool,
    running: AtomicBool,
    push_idle: AtomicBool,
    /// P: see "How kicks are computed".
    programmed: AtomicU64,
    kick_pending: AtomicBool,
    /// Out of the hierarchy (see [`ServiceConfig::isolated`]); fixed.
    isolated: bool,
}

/// The timer service (see the module docs for the calling contract).
pub struct TimerService<C: Clock> {
    policy: Policy,
    group_size: usize,
    clock: C,
    slots: TimerSlots,
    cpus: Box<[VCpu]>,
    hier: Hierarchy,
    /// Highest online cpu id + 1 ever (bounds Push's scan).
    ncpus: AtomicU32,
    kicks: Mutex<Vec<CpuId>>,
    kick_count: StatCounter,
    push_remote: StatCounter,
    halts: StatCounter,
    forced_active: StatCounter,
}

/// The migrator's side of a remote expiry.
struct Remote<'a, C: Clock> {
    svc: &'a TimerService<C>,
    out: &'a mut Vec<Expired>,
    stopped: Vec<u32>,
}

impl<C: Clock> RemoteExpiry for Remote<'_, C> {
    fn expire_movable(&mut self, cpu: CpuId, now: u64) {
        let mut b = lock(&self.svc.cpus[cpu as usize].base);
        // Invariant 5: back off if the owner woke; it expires its own timers.
        if !self.svc.hier.cpu_is_idle(cpu) {
            return;
        }
        let n = b.pop_due(&self.svc.slots, TimerKind::Movable, now, self.out);
        b.counters.remote_expiries += n as u64;
    }

    fn with_base_locked(&mut self, cpu: CpuId, f: &mut dyn FnMut(Expiry)) {
        let mut b = lock(&self.svc.cpus[cpu as usize].base);
        let ev = b.global_event(&self.svc.slots);
        f(ev);
    }

    fn requeued(&mut self, res: WalkResult) {
        if let Some(g) = res.stopped_at {
            self.stopped.push(g);
        }
    }
}

impl<C: Clock> TimerService<C> {
    /// A service with vCPUs `0..cpus_online` online and running.
    pub fn new(cfg: ServiceConfig, clock: C, cpus_online: u32) -> Self {
        let max_cpus = cfg
            .max_cpus
            .unwrap_or(DEFAULT_MAX_CPUS)
            .max(cpus_online)
            .max(cfg.nodes.as_ref().map_or(0, |n| n.len() as u32));
        let hier = Hierarchy::new(HierConfig {
            group_size: cfg.group_size,
            nodes: cfg.nodes.clone(),
            max_cpus,
        });
        let svc = Self {
            policy: cfg.policy,
            group_size: cfg.group_size,
            clock,
            slots: TimerSlots::new(cfg.max_timers),
            cpus: (0..max_cpus)
                .map(|c| VCpu {
                    base: Mutex::new(TimerBase::new(c)),
                    online: AtomicBool::new(false),
                    running: AtomicBool::new(false),
                    push_idle: AtomicBool::new(false),
                    programmed: AtomicU64::new(KTIME_MAX),
                    kick_pending: AtomicBool::new(false),
                    isolated: cfg.isolated.contains(&c),
                })
                .collect(),
            hier,
            ncpus: AtomicU32::new(0),
            kicks: Mutex::new(Vec::new()),
            kick_count: StatCounter::default(),
            push_remote: StatCounter::default(),
            halts: StatCounter::default(),
            forced_active: StatCounter::default(),
        };
        for c in 0..cpus_online {
            svc.vcpu_online(c);
        }
        svc
    }

    /// The clock deadlines are measured on.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The hierarchy (tests, invariants, diagnostics).
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hier
    }

    /// Number of timer ids.
    pub fn max_timers(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Where `id` is pending: (base cpu, kind). A snapshot.
    pub fn timer_owner(&self, id: TimerId) -> Option<(CpuId, TimerKind)> {
        self.slots.location(id)
    }

    /// True if `cpu` is online and running (not halted).
    pub fn is_running(&self, cpu: CpuId) -> bool {
        let v = &self.cpus[cpu as usize];
        v.online.load(Ordering::Acquire) && v.running.load(Ordering::Acquire)
    }

    /// True if `cpu` is online.
    pub fn is_online(&self, cpu: CpuId) -> bool {
        self.cpus[cpu as usize].online.load(Ordering::Acquire)
    }

    /// True if `cpu` is isolated ([`ServiceConfig::isolated`]).
    pub fn is_isolated(&self, cpu: CpuId) -> bool {
        self.cpus.get(cpu as usize).is_some_and(|v| v.isolated)
    }

    /// `cpu` takes part in the hierarchy: Pull and not isolated.
    fn in_hier(&self, cpu: CpuId) -> bool {
        self.policy == Policy::Pull && !self.cpus[cpu as usize].isolated
    }

    /// Where the timers (and, in the VMM, the pending deliveries) of `from`
    /// go when it goes offline, and the vCPU `vcpu_offline` forces active:
    /// the nearest busy (running, not push-idle) online vCPU other than
    /// `from` that is not isolated; else the lowest-numbered online one
    /// that is not isolated; else, only if every other online vCPU is
    /// isolated, the lowest-numbered online one (its timers then expire on
    /// that isolated vCPU, which wakes for them as for its own; with no
    /// non-isolated vCPU online the hierarchy holds nothing to hand on).
    /// `from` itself if no other vCPU is online. A snapshot: `vcpu_offline`
    /// computes it again when it moves the timers.
    pub fn handoff_target(&self, from: CpuId) -> CpuId {
        let n = self.ncpus.load(Ordering::Acquire) as usize;
        let others = || (0..n).filter(move |&c| c != from as usize);
        others()
            .filter(|&c| self.busy(c))
            .min_by_key(|&c| (c as i64 - from as i64).abs())
            .or_else(|| others().find(|&c| self.is_online(c as CpuId) && !self.cpus[c].isolated))
            .or_else(|| others().find(|&c| self.is_online(c as CpuId)))
            .map_or(from, |c| c as CpuId)
    }

    /// The time `cpu` was last given (P in the module docs).
    pub fn programmed(&self, cpu: CpuId) -> u64 {
        self.cpus[cpu as usize].programmed.load(Ordering::SeqCst)
    }

    /// Push only: `cpu` counts as idle for placement (a vCPU running the
    /// doorbell handler it was woken into from a halt, as the kernel's
    /// `get_nohz_timer_target` saw the idle task). Ignored by other policies.
    pub fn set_push_idle(&self, cpu: CpuId, idle: bool) {
        self.cpus[cpu as usize]
            .push_idle
            .store(idle, Ordering::Release);
    }

    /// Online, running, not push-idle and not isolated: a place for Push
    /// and a first choice for hand-offs.
    fn busy(&self, cpu: usize) -> bool {
        let v = &self.cpus[cpu];
        !v.isolated
            && v.online.load(Ordering::Acquire)
            && v.running.load(Ordering::Acquire)
            && !v.push_idle.load(Ordering::Acquire)
    }

    /// Push placement: the nearest busy vCPU in hierarchy order (same block of
    /// `group_size` ids first, then the enclosing blocks), else `cpu`.
    fn push_target(&self, cpu: CpuId) -> CpuId {
        let n = (self.ncpus.load(Ordering::Acquire) as usize).max(cpu as usize + 1);
        let mut span = self.group_size;
        loop {
            let start = cpu as usize / span * span;
            let end = (start + span).min(n);
            if let Some(c) = (start..end).find(|&c| c != cpu as usize && self.busy(c)) {
                return c as CpuId;
            }
            if span >= n {
                return cpu;
            }
            span *= self.group_size;
        }
    }

    fn kick(&self, cpu: CpuId) {
        let v = &self.cpus[cpu as usize];
        if !v.kick_pending.swap(true, Ordering::SeqCst) {
            lock(&self.kicks).push(cpu);
            self.kick_count.add(1);
        }
    }

    /// Hierarchy change at group `g` (a walk stopped there): kick its
    /// migrator if its remote expiry is now before what it was given.
    fn kick_check_group(&self, g: u32) {
        Hierarchy::fence();
        if let Some(m) = self.hier.responsible_cpu(g) {
            let t = self.hier.next_remote_expiry(m);
            if t < self.cpus[m as usize].programmed.load(Ordering::SeqCst) {
                self.kick(m);
            }
        }
    }

    fn after_walk(&self, res: Option<WalkResult>) {
        if let Some(WalkResult {
            stopped_at: Some(g),
            ..
        }) = res
        {
            self.kick_check_group(g);
        }
    }

    /// Under `target`'s base lock, after queueing a timer whose window ends at
    /// `end`: tell the hierarchy (idle target, Pull) and decide whether
    /// `target` must be kicked. Returns (kick target, walk to check).
    fn after_insert(
        &self,
        target: CpuId,
        b: &mut TimerBase,
        end: u64,
        kind: TimerKind,
    ) -> (bool, Option<WalkResult>) {
        let p = self.cpus[target as usize].programmed.load(Ordering::SeqCst);
        if self.in_hier(target) && kind == TimerKind::Movable && self.hier.cpu_is_idle(target) {
            // New timer while idle: the migrator (or this vCPU, if the whole
            // hierarchy is idle) must learn about it.
            let ev = b.global_event(&self.slots);
            let res = self.hier.new_timer(target, ev);
            let wake = self.hier.cpu_wakeup(target);
            let pinned = b.first(&self.slots, TimerKind::Pinned);
            return (wake.min(pinned) < p, res);
        }
        (end < p, None)
    }

    /// `cpu` (running) arms `id` for `[deadline, deadline + slack]`: it fires
    /// no earlier than `deadline` and, if the VMM serves the times it is
    /// given, no later than `deadline + slack` (slack 0: at its deadline).
    /// Queued on `cpu`'s base (Push may place a Movable timer armed by a
    /// push-idle vCPU on the nearest busy one), replacing any pending arming
    /// on any base. Returns true if an arming was pending (re-arm). The caller
    /// has validated `id < max_timers` and `deadline > now`. May queue kicks
    /// (see the module docs).
    pub fn arm(&self, cpu: CpuId, id: TimerId, deadline: u64, slack: u64, kind: TimerKind) -> bool {
        let end = deadline.saturating_add(slack);
        let target = if self.policy == Policy::Push
            && kind == TimerKind::Movable
            && self.cpus[cpu as usize].push_idle.load(Ordering::Acquire)
        {
            let t = self.push_target(cpu);
            if t != cpu {
                self.push_remote.add(1);
            }
            t
        } else {
            cpu
        };
        loop {
            let (was, kick, res) = match self.slots.location(id) {
                Some((other, _)) if other != target => {
                    // Move between bases with both locks held (in cpu order,
                    // the only place besides hotplug that holds two): the
                    // timer never looks "pending nowhere" to a racing cancel.
                    let (lo, hi) = (other.min(target), other.max(target));
                    let mut g_lo = lock(&self.cpus[lo as usize].base);
                    let mut g_hi = lock(&self.cpus[hi as usize].base);
                    let (ob, tb) = if other < target {
                        (&mut *g_lo, &mut *g_hi)
                    } else {
                        (&mut *g_hi, &mut *g_lo)
                    };
                    if ob.take(&self.slots, id).is_none() {
                        continue; // moved or fired meanwhile
                    }
                    tb.insert_taken(&self.slots, id, deadline, slack, kind);
                    tb.counters.arms += 1;
                    tb.counters.rearms += 1;
                    let (k, r) = self.after_insert(target, tb, end, kind);
                    (true, k, r)
                }
                _ => {
                    let mut b = lock(&self.cpus[target as usize].base);
                    let Ok(was) = b.arm(&self.slots, id, deadline, slack, kind) else {
                        continue; // claimed by another base meanwhile
                    };
                    b.counters.arms += 1;
                    b.counters.rearms += was as u64;
                    let (k, r) = self.after_insert(target, &mut b, end, kind);
                    (was, k, r)
                }
            };
            if kick {
                self.kick(target);
            }
            self.after_walk(res);
            return was;
        }
    }

    /// Removes a pending arming of `id` wherever it is queued; true if one was
    /// pending. After it returns, `id` is not returned by any later `expire`.
    /// (Leaves the owner's hierarchy event in place if it was the first: a
    /// stale event only makes a migrator look once, as in the kernel.)
    pub fn cancel(&self, id: TimerId) -> bool {
        loop {
            let Some((cpu, _)) = self.slots.location(id) else {
                return false;
            };
            let mut b = lock(&self.cpus[cpu as usize].base);
            if b.cancel(&self.slots, id) {
                b.counters.cancels += 1;
                return true;
            }
        }
    }

    /// `cpu` starts to halt. Returns the absolute time its thread must wake
    /// at (`KTIME_MAX`: until kicked): its first pinned expiry; under
    /// Local/Push also its first movable one; under Pull, the hierarchy's
    /// first expiry if this vCPU idled the root (it is then the one vCPU that
    /// wakes for the idle vCPUs' movable timers) and no other halted vCPU
    /// already wakes by then, else nothing more.
    pub fn vcpu_halt(&self, cpu: CpuId) -> u64 {
        let v = &self.cpus[cpu as usize];
        self.halts.add(1);
        let mut b = lock(&v.base);
        v.running.store(false, Ordering::Release);
        let pinned = b.first(&self.slots, TimerKind::Pinned);
        let (wake, res) = match self.policy {
            _ if v.isolated => (pinned.min(b.first(&self.slots, TimerKind::Movable)), None),
            Policy::Local | Policy::Push => {
                (pinned.min(b.first(&self.slots, TimerKind::Movable)), None)
            }
            Policy::Pull => {
                let ev = b.global_event(&self.slots);
                let r = self.hier.deactivate(cpu, ev);
                (pinned.min(r.firstexp), Some(r))
            }
        };
        // Stored under the base lock: every later change of this vCPU's
        // required time happens under this lock too (see module docs).
        v.programmed.store(wake, Ordering::SeqCst);
        drop(b);
        self.after_walk(res);
        wake
    }

    /// `cpu` runs guest code again (activates in the hierarchy under Pull).
    /// Idempotent. Follow with `expire` and `next_event`.
    pub fn vcpu_run(&self, cpu: CpuId) {
        let v = &self.cpus[cpu as usize];
        v.programmed.store(0, Ordering::SeqCst);
        v.running.store(true, Ordering::Release);
        if self.in_hier(cpu) {
            self.hier.activate(cpu);
        }
    }

    /// Called by a running `cpu`: appends to `out` every timer due now that
    /// this vCPU must expire: its own pinned and movable ones and, under Pull,
    /// the due movable timers of idle vCPUs it is migrator for. Each returned
    /// timer is no longer pending anywhere. Follow with `next_event`.
    pub fn expire(&self, cpu: CpuId, out: &mut Vec<Expired>) {
        let v = &self.cpus[cpu as usize];
        // Until `next_event`, this vCPU will look anyway: no kicks needed.
        v.programmed.store(0, Ordering::SeqCst);
        let now = self.clock.now_ns();
        {
            let mut b = lock(&v.base);
            let n = b.pop_due(&self.slots, TimerKind::Pinned, now, out)
                + b.pop_due(&self.slots, TimerKind::Movable, now, out);
            b.counters.local_expiries += n as u64;
        }
        if self.in_hier(cpu) && self.hier.requires_handle_remote(cpu, now) {
            let mut rx = Remote {
                svc: self,
                out,
                stopped: Vec::new(),
            };
            self.hier.handle_remote(cpu, now, &mut rx);
            for g in std::mem::take(&mut rx.stopped) {
                self.kick_check_group(g);
            }
        }
    }

    /// For a running `cpu`: the absolute time of the next thing it must look
    /// at (its own first timer and, under Pull, the first event of the groups
    /// it is migrator of). `KTIME_MAX` if none. Records it as P.
    pub fn next_event(&self, cpu: CpuId) -> u64 {
        let v = &self.cpus[cpu as usize];
        let pull = self.in_hier(cpu);
        let t = {
            let mut b = lock(&v.base);
            let mut t = b
                .first(&self.slots, TimerKind::Pinned)
                .min(b.first(&self.slots, TimerKind::Movable));
            if pull {
                t = t.min(self.hier.next_remote_expiry(cpu));
            }
            v.programmed.store(t, Ordering::SeqCst);
            t
        };
        if pull {
            // Store P, fence, re-read: pairs with `kick_check_group`.
            Hierarchy::fence();
            let h = self.hier.next_remote_expiry(cpu);
            if h < t {
                v.programmed.store(h, Ordering::SeqCst);
                return h;
            }
        }
        t
    }

    /// Appends the vCPUs to kick (each at most once per call) and clears them.
    /// See the module docs for what a kick means and when to call this.
    pub fn take_kicks(&self, out: &mut Vec<CpuId>) {
        let drained = std::mem::take(&mut *lock(&self.kicks));
        for c in drained {
            // Cleared after leaving the list: a kick raced in meanwhile is
            // merged into this one, which the caller delivers afterwards.
            self.cpus[c as usize]
                .kick_pending
                .store(false, Ordering::SeqCst);
            out.push(c);
        }
    }

    /// `cpu` leaves. Its timers (pinned and movable) move to
    /// [`handoff_target`](Self::handoff_target)`(cpu)` (the kernel's
    /// `timers_dead_cpu`): never an isolated vCPU unless every other online
    /// vCPU is isolated; a halted recipient is kicked if it must wake
    /// earlier. Returns `Some(other)` if `cpu` was the last active vCPU of
    /// the hierarchy and movable events are pending: `other` (the hand-off
    /// target if it is not isolated, else the lowest-numbered online vCPU
    /// that is not) must be woken and run now (it is also queued as a
    /// kick), or they would be owned by nobody (`tmigr_trigger_active`).
    /// Never an isolated vCPU: if no other online vCPU is in the hierarchy,
    /// nothing is pending in it (every timer of the vCPUs that left it was
    /// handed on) and `None` is returned.
    pub fn vcpu_offline(&self, cpu: CpuId) -> Option<CpuId> {
        let v = &self.cpus[cpu as usize];
        if !v.online.swap(false, Ordering::AcqRel) {
            return None;
        }
        v.running.store(false, Ordering::Release);
        let res = self.in_hier(cpu).then(|| self.hier.offline(cpu));
        let target = Some(self.handoff_target(cpu)).filter(|&t| t != cpu);
        if let Some(t) = target {
            let (lo, hi) = (cpu.min(t), cpu.max(t));
            let mut g_lo = lock(&self.cpus[lo as usize].base);
            let mut g_hi = lock(&self.cpus[hi as usize].base);
            let (ob, tb) = if cpu < t {
                (&mut *g_lo, &mut *g_hi)
            } else {
                (&mut *g_hi, &mut *g_lo)
            };
            let moved = ob.take_all(&self.slots);
            let mut kick = false;
            let mut walk = None;
            for &(id, deadline, slack, kind) in &moved {
                tb.insert_taken(&self.slots, id, deadline, slack, kind);
            }
            // The earliest window end of the moved timers decides the kick;
            // a movable one, if any, tells the hierarchy (idle target).
            let first_end = moved
                .iter()
                .map(|&(_, d, sl, k)| (d.saturating_add(sl), k))
                .min_by_key(|&(end, _)| end);
            if let Some((end, kind)) = first_end {
                (kick, walk) = self.after_insert(t, tb, end, kind);
                if kind == TimerKind::Pinned && self.in_hier(t) {
                    // The first one is pinned; a movable one may still need
                    // the hierarchy.
                    if let Some(&(_, d, sl, k)) = moved.iter().find(|m| m.3 == TimerKind::Movable) {
                        let (k2, w2) = self.after_insert(t, tb, d.saturating_add(sl), k);
                        kick |= k2;
                        walk = walk.or(w2);
                    }
                }
            }
            drop(g_hi);
            drop(g_lo);
            if kick {
                self.kick(t);
            }
            self.after_walk(walk);
        }
        v.programmed.store(KTIME_MAX, Ordering::SeqCst);
        self.after_walk(res);
        if res.is_some_and(|r| r.firstexp != KTIME_MAX) {
            let n = self.ncpus.load(Ordering::Acquire) as usize;
            let other = target.filter(|&t| !self.is_isolated(t)).or_else(|| {
                (0..n as u32).find(|&c| c != cpu && self.is_online(c) && !self.is_isolated(c))
            });
            if let Some(o) = other {
                self.forced_active.add(1);
                self.kick(o);
            }
            return other;
        }
        None
    }

    /// Sets up `cpu`'s place in the hierarchy (growing it if needed) before
    /// `cpu` ever runs, from any thread: the VMM calls it when it creates or
    /// plugs a vCPU, before starting its thread (the kernel moved this into
    /// a prepare callback, "timers/migration: Move hierarchy setup into
    /// cpuhotplug prepare callback"). Optional: `vcpu_online` does it on its
    /// own thread otherwise. Idempotent; a no-op for isolated vCPUs and
    /// policies other than Pull. May queue kicks (the migrator of a new root,
    /// or an online vCPU if the grown hierarchy is idle with events nobody
    /// wakes for).
    pub fn vcpu_prepare(&self, cpu: CpuId) {
        assert!(
            (cpu as usize) < self.cpus.len(),
            "cpu {cpu} beyond capacity"
        );
        if !self.in_hier(cpu) {
            return;
        }
        let r = self.hier.prepare(cpu);
        self.after_walk(Some(r));
        if r.firstexp != KTIME_MAX {
            let n = self.ncpus.load(Ordering::Acquire);
            if let Some(o) = (0..n).find(|&c| self.is_online(c) && !self.is_isolated(c)) {
                self.kick(o);
            }
        }
    }

    /// `cpu` comes online (setting up its place in the hierarchy if
    /// `vcpu_prepare` did not) and runs. Follow with `expire` and
    /// `next_event` on its thread.
    pub fn vcpu_online(&self, cpu: CpuId) {
        let v = &self.cpus[cpu as usize];
        assert!(
            (cpu as usize) < self.cpus.len(),
            "cpu {cpu} beyond capacity"
        );
        if v.online.load(Ordering::Acquire) {
            return;
        }
        self.ncpus.fetch_max(cpu + 1, Ordering::AcqRel);
        v.programmed.store(0, Ordering::SeqCst);
        v.running.store(true, Ordering::Release);
        v.online.store(true, Ordering::Release);
        if self.in_hier(cpu) {
            let r = self.hier.online(cpu);
            self.after_walk(Some(r));
            if r.firstexp != KTIME_MAX {
                self.kick(cpu);
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> ServiceStats {
        let mut c = BaseCounters::default();
        let n = self.ncpus.load(Ordering::Acquire) as usize;
        for v in &self.cpus[..n] {
            let b = lock(&v.base);
            c.arms += b.counters.arms;
            c.rearms += b.counters.rearms;
            c.cancels += b.counters.cancels;
            c.local_expiries += b.counters.local_expiries;
            c.remote_expiries += b.counters.remote_expiries;
        }
        ServiceStats {
            arms: c.arms,
            rearms: c.rearms,
            cancels: c.cancels,
            local_expiries: c.local_expiries,
            remote_expiries: c.remote_expiries,
            push_remote_placements: self.push_remote.get(),
            halts: self.halts.get(),
            kicks: self.kick_count.get(),
            forced_active: self.forced_active.get(),
            hierarchy: self.hier.stats(),
        }
    }

    /// Checks the invariants on a quiescent service (tests): under Pull the
    /// hierarchy's (see [`Hierarchy::check_invariants`]), with an idle vCPU's
    /// movable event required in the hierarchy unless its own programmed
    /// wake-up comes first; for all policies, that running/online flags agree
    /// with the hierarchy, that no timer is left on an offline base while
    /// a vCPU is online, and that an isolated vCPU is not in the hierarchy
    /// and, halted, wakes for its own first timer of either kind.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.ncpus.load(Ordering::Acquire);
        let any_online = (0..n).any(|c| self.is_online(c));
        for c in 0..n {
            let v = &self.cpus[c as usize];
            let online = v.online.load(Ordering::Acquire);
            if any_online && !online && !lock(&v.base).is_empty() {
                return Err(format!("offline cpu {c} still has timers"));
            }
            if v.isolated {
                // Out of the hierarchy, and a halted one wakes for all its
                // own timers, movable ones included.
                if self.hier.cpu_group(c).is_some() || self.hier.cpu_is_online(c) {
                    return Err(format!("isolated cpu {c} is in the hierarchy"));
                }
                if online && !v.running.load(Ordering::Acquire) {
                    let mut b = lock(&v.base);
                    let first = b
                        .first(&self.slots, TimerKind::Pinned)
                        .min(b.first(&self.slots, TimerKind::Movable));
                    if first < v.programmed.load(Ordering::SeqCst)
                        && !v.kick_pending.load(Ordering::SeqCst)
                    {
                        return Err(format!(
                            "halted isolated cpu {c} does not wake for its own timer at {first}"
                        ));
                    }
                }
                continue;
            }
            if self.policy == Policy::Pull && online {
                let running = v.running.load(Ordering::Acquire);
                if self.hier.cpu_is_idle(c) == running || !self.hier.cpu_is_online(c) {
                    return Err(format!(
                        "cpu {c}: running {running} but hierarchy idle {}",
                        self.hier.cpu_is_idle(c)
                    ));
                }
            }
        }
        if self.policy != Policy::Pull {
            return Ok(());
        }
        self.hier.check_invariants(&|c| {
            let v = &self.cpus[c as usize];
            let mut b = lock(&v.base);
            let ev = b.global_event(&self.slots);
            // Covered by its own wake-up, or by a kick not yet delivered.
            if ev.hard < v.programmed.load(Ordering::SeqCst)
                && !v.kick_pending.load(Ordering::SeqCst)
            {
                ev
            } else {
                Expiry::NONE
            }
        })
    }
}
