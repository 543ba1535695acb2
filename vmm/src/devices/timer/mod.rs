//! The paravirtual timer device (docs/timer-abi.md), and the one owner of a vCPU's timer protocol.
//!
//! The device keeps the guest-visible state of every timer (pending, delivered, running), serializes
//! callbacks, fills the per-vCPU delivery queues and decides when a vCPU's doorbell rings. It owns the
//! [`TimerService`] (tmigr: *where* a movable timer expires under `local`, `push` or `pull`) and drives
//! it, so the vCPU thread never sees the hierarchy. A vCPU thread makes three calls into it, as
//! crosvm's userspace irqchip asks its vCPU loop to:
//!
//! ```text
//!   vCPU thread                       TimerDevice                         TimerService (tmigr)
//!   -----------                       -----------                         --------------------
//!   before each KVM_RUN  --before_entry-->  expire what is due ------------> expire, next_event
//!        <-- EntryPlan { inject doorbell?, interrupt window?, deadline }
//!   HLT exit          -----halt------->  work waiting? Resume : ---------> vcpu_halt (deactivate)
//!        <-- HaltPlan { Resume | Sleep { until } | Recheck }
//!   (sleeps in sigwaitinfo until `until` or a kick)
//!   after the sleep   -----wake------->  ------------------------------> vcpu_run, expire
//!        <-- Wake { cause of the host wakeup, resume the guest? }
//!   `out` to the port ----command----->  ARM / CANCEL / POP / ACK ... ---> arm, cancel
//! ```
//!
//! plus the hotplug steps (`go_offline`, `come_online`, `start_parked`) at the points the guest's
//! `OFFLINE_ACK` and the control API choose.
//!
//! # Lock order
//! One lock, [`TimerDevice::state`] (a [`NoSleepMutex`]: vCPU threads must never sleep outside their
//! halt, see `crate::sync`), covers the per-timer slots, the per-vCPU queues and the counters. It is
//! held across the calls into the service that change a timer's place (`arm`, `cancel`, `expire`), so
//! a timer's slot and its place in the service never disagree. Order: device state, then the
//! service's own locks (per-vCPU base locks, then group locks, as tmigr documents). The service never
//! calls back into the device. The calls that only move a vCPU in the hierarchy (`vcpu_halt`,
//! `vcpu_run`, `next_event`, hotplug) are made without the device lock. Kicks are sent after the lock
//! is dropped.
//!
//! # Kick protocol
//! The device tells other vCPU threads to look again through a [`VcpuKicker`] (in the VMM a reason bit
//! plus a signal, `vm::kicks`), with a [`KickReasons`]:
//! - `DELIVERY`: this vCPU was handed an expired timer (its delivery queue grew, or a held expiry was
//!   released to it): a halted one wakes and gets its doorbell, a running one exits and gets it;
//! - `HIERARCHY`: the service says this vCPU's next event moved earlier than the time it was last
//!   given (`TimerService::take_kicks`); it calls `before_entry` or `halt` again, which re-read it.
//!
//! After every call that can change a timer's place the device drains the service's kick list and
//! kicks every vCPU in it but the caller (which re-reads its own next event before it enters the guest
//! or sleeps anyway). A kick is never lost: the thread takes its reasons after it decided to sleep and
//! before it sleeps, and the signal interrupts the sleep (`sys::kvm::kick`).
//!
//! # Queue mode
//! A vCPU whose guest issued `ENABLE_QUEUES` arms and cancels without exits (docs/timer-abi.md,
//! "Queue mode"). The per-timer state words in guest memory are then the truth about every timer
//! (pending, which generation, running where), for every vCPU: commands change them too, by the same
//! compare-and-swap transitions (`quietvm_abi::queue`), so a command is exactly what a guest would
//! have done in shared memory, done by the device under its lock. Every `ARM` and `CANCEL`, queued or
//! commanded, then goes through one path (`TimerDevice::apply_op`): the counts, the timer log and
//! the service's copy follow from it.
//!
//! The device reads a vCPU's submission ring at each of that vCPU's exits, first
//! (`TimerDevice::consume_ring`), and hands expired timers over into its delivery ring just before
//! it enters the guest (`TimerDevice::fill_delivery`). Before the vCPU enters it publishes the
//! horizon (the vCPU's deadline: it will be back by then) and reads the ring once more: the
//! handshake of `abi/tests/loom_queue.rs`.
//!
//! The device's own record of a timer can lag behind the word (an operation sits in another vCPU's
//! ring): it never acts on that record without checking the word. An expiry hands over only the
//! generation the word shows pending (`quietvm_abi::queue::expire`); anything else is stale and
//! dropped; the operation that ended it is still in some ring and accounts for it when read.
//!
//! # Joining
//! A vCPU takes part in timer expiry only from its guest's first timer command or `HLT` (docs/
//! timer-abi.md, "Taking part"): until then it is idle to the service, so it is never made a migrator
//! and handed other vCPUs' timers before its guest can take a doorbell.

pub mod timer_log;

mod shared_memory;

use std::collections::VecDeque;
use std::sync::Arc;

use quietvm_abi::queue::{self as q, DeliveryEntry, Expiry, State, SubEntry, Update};
use shared_memory::SharedMemory;
use tmigr::clock::Clock;
use tmigr::service::{CpuId, Expired, TimerId, TimerKind, TimerService};
use vm_memory::GuestMemoryMmap;

use crate::accounting::{
    classify_wakeup, ExpiryCounts, KickReasons, LatenessRecorder, WakeupCause,
};
use crate::stats::TimerStats;
use crate::sync::NoSleepMutex;
use timer_log::{LogOutcome, LogRecord, TimerLog};

/// Command numbers, statuses and device-page offsets of docs/timer-abi.md: the guest ABI's.
pub use quietvm_abi::timer as abi;

/// "No deadline": the vCPU sleeps (or runs) until kicked.
pub const NO_DEADLINE: u64 = u64::MAX;

/// How soon to retry a doorbell the guest could not take (its interrupts were off).
const DOORBELL_RETRY_NS: u64 = 200_000;

/// Queue mode: how long a vCPU just woken from its halt with a doorbell is left to run its handler
/// before it is kicked for a timer that comes due meanwhile. An idle guest halts again when its
/// handler is done, and that `HLT` exit hands the timer over: one exit (the halt it makes anyway)
/// instead of a kick and then the halt. A guest that does not halt by then is kicked as before, so a
/// timer is at most this much later than with a kick (well inside `WINDOW_TOLERANCE_NS`).
const WOKEN_HANDLER_GRACE_NS: u64 = 300_000;

/// Where the device's kicks go (the VMM: a reason bit and a signal to the vCPU's thread; tests: a
/// record).
pub trait VcpuKicker: Send + Sync {
    /// Tells vCPU `cpu`'s thread to look again, for `why`. May be spurious; must never block.
    fn kick(&self, cpu: CpuId, why: KickReasons);
}

/// The answer to [`TimerDevice::before_entry`]: what to do before entering the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPlan {
    /// Inject the doorbell vector now (the device has recorded it as injected).
    pub inject_doorbell: bool,
    /// Ask KVM for an interrupt-window exit (a doorbell waits for the guest to enable interrupts).
    pub want_interrupt_window: bool,
    /// Guest time at which the thread must be kicked out of the guest ([`NO_DEADLINE`]: none).
    pub deadline: u64,
}

/// The answer to [`TimerDevice::halt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaltPlan {
    /// Work is waiting (a doorbell to ring): return to the guest without sleeping.
    Resume,
    /// Sleep until guest time `until` ([`NO_DEADLINE`]: until kicked), then call
    /// [`TimerDevice::wake`].
    Sleep { until: u64 },
    /// Something is due already: do not sleep, call [`TimerDevice::wake`] at once (no host wakeup).
    Recheck,
}

/// The answer to [`TimerDevice::wake`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// Why the thread was woken, if it really slept (one host wakeup).
    pub cause: Option<WakeupCause>,
    /// The guest has work (a doorbell): return to it. Otherwise halt again.
    pub resume_guest: bool,
}

/// What a guest `out` to the command port asks of the vCPU thread beyond the device's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandEffect {
    /// Nothing: continue in the guest.
    None,
    /// The guest acknowledged an offline request (`OFFLINE_ACK`): the vCPU must leave now
    /// ([`TimerDevice::go_offline`]).
    GoOffline,
}

/// One vCPU thread's own side of the device: what only that thread reads and writes (no lock).
#[derive(Debug)]
pub struct VcpuPort {
    cpu: CpuId,
    /// The guest has issued its first timer command or `HLT` (see "Joining").
    joined: bool,
    /// A doorbell is waiting for the guest to enable interrupts; retry at this guest time.
    doorbell_retry_at: u64,
    /// Queue mode: woken from its halt into its handler; not kicked for a timer before this guest
    /// time ([`WOKEN_HANDLER_GRACE_NS`]). 0: no grace.
    woken_grace_until: u64,
    /// The guest halted through the idle port: its next entry returns from that `out`, after which
    /// it looks at its work itself, so no doorbell is injected for what is due then.
    returning_from_idle: bool,
    expired: Vec<Expired>,
    kicks: Vec<(CpuId, KickReasons)>,
    service_kicks: Vec<CpuId>,
}

impl VcpuPort {
    fn new(cpu: CpuId, joined: bool) -> Self {
        VcpuPort {
            cpu,
            joined,
            doorbell_retry_at: NO_DEADLINE,
            woken_grace_until: 0,
            returning_from_idle: false,
            expired: Vec::new(),
            kicks: Vec::new(),
            service_kicks: Vec::new(),
        }
    }

    /// The vCPU this port belongs to.
    pub fn cpu(&self) -> CpuId {
        self.cpu
    }

    /// Whether the guest takes part in timer expiry yet.
    pub fn joined(&self) -> bool {
        self.joined
    }
}

#[derive(Debug, Clone, Copy)]
struct Arming {
    /// Its generation: the state word's when it was armed (docs/timer-abi.md, "Queue mode").
    gen: u32,
    deadline: u64,
    /// The applied slack (docs/timer-abi.md, "Timer windows").
    slack: u64,
    /// The vCPU that issued the `ARM`: the timer's owner, reported as `exp_owner`.
    armed_by: CpuId,
    armed_at: u64,
    kind: TimerKind,
    /// Its expiry was held back by callback serialization (for the timer log).
    held: bool,
    /// Expired, but the word had moved on: an operation still in some vCPU's ring ended it.
    stale: bool,
}

impl Arming {
    /// The timer-log record of this arming ending as `outcome` at `at` (`fired_on`: who popped it).
    fn record(
        &self,
        id: TimerId,
        outcome: LogOutcome,
        at: Option<u64>,
        fired_on: Option<CpuId>,
    ) -> LogRecord {
        LogRecord {
            owner: self.armed_by,
            id,
            pinned: self.kind == TimerKind::Pinned,
            armed_at: self.armed_at,
            deadline: self.deadline,
            slack: self.slack,
            outcome,
            at,
            fired_on,
            held: self.held,
        }
    }
}

/// The slack quietvm applies to an arming (docs/timer-abi.md, "Timer windows"): the guest's, raised to
/// the VM's minimum for a MOVABLE timer (a pinned one keeps the guest's own), then clamped to
/// [`abi::MAX_SLACK_NS`], whatever the guest wrote.
pub fn applied_slack(guest: u64, kind: TimerKind, vm_minimum: u64) -> u64 {
    let raised = match kind {
        TimerKind::Movable => guest.max(vm_minimum),
        TimerKind::Pinned => guest,
    };
    raised.min(abi::MAX_SLACK_NS)
}

/// An expired arming waiting to be handed over (in a delivery queue, or held).
#[derive(Debug, Clone, Copy)]
struct Pending {
    e: Expired,
    gen: u32,
}

/// The start or the end of an arming whose other half is still in another vCPU's ring (only kept
/// for `--timer-log`, which writes each arming once, whole).
#[derive(Debug, Clone, Copy)]
enum Unmatched {
    Start(Arming),
    End {
        gen: u32,
        outcome: LogOutcome,
        at: u64,
    },
}

/// At most this many unmatched halves in the VM per vCPU: each waits for an entry still unread in some
/// vCPU's ring, so a correct guest has at most two per ring slot. More only comes from a guest that
/// invents generations; then the timer's oldest is dropped (counted in `queue_errors`).
const UNMATCHED_PER_VCPU: usize = 2 * q::SUB_ENTRIES as usize;

/// The device's record of one timer id. Whether it is pending or running is its state word's.
#[derive(Debug, Default)]
struct TimerSlot {
    /// The arming the device gave the service last (queued there, expired and waiting, or held).
    armed: Option<Arming>,
    /// The vCPU whose delivery queue holds the expired arming.
    delivered_to: Option<CpuId>,
    /// An expiry held back until the running callback ends.
    held: Option<Pending>,
    unmatched: Vec<Unmatched>,
}

/// quietvm's own indices of a queue-mode vCPU's rings (never read back from the guest).
#[derive(Debug, Clone, Copy, Default)]
struct Rings {
    sub_tail: u32,
    dlv_head: u32,
    /// The guest had read every delivery entry when the device last looked.
    caught_up: bool,
}

/// One vCPU's side of the device, under the device lock.
#[derive(Debug)]
struct VcpuSide {
    queue: VecDeque<Pending>,
    /// Queue mode is on (`ENABLE_QUEUES`).
    rings: Option<Rings>,
    /// The timer whose callback this vCPU runs (between `POP` and its `ACK`).
    in_flight: Option<TimerId>,
    /// A doorbell may be injected (the guest has `POP`ped its queue empty since the last one).
    doorbell_armed: bool,
    /// Woken from a halt and still in the handler it was woken into: idle, for `push`.
    in_wake_handler: bool,
    /// Online: it takes part in expiry and deliveries; offline vCPUs get none.
    online: bool,
    /// quietvm asked the guest to take this vCPU offline and waits for `OFFLINE_ACK`.
    offline_requested: bool,
    /// A `control` change the guest has not been rung for yet.
    control_pending: bool,
    /// Its guest takes part in timer expiry (a copy of [`VcpuPort::joined`], for `describe_vcpu`).
    joined: bool,
    last_status: u32,
    fired: u64,
    remote_expiries: u64,
}

impl VcpuSide {
    fn new() -> Self {
        VcpuSide {
            // Grows to its peak and stays: a queue never holds a timer twice, so it is bounded by
            // the VM's timer count.
            queue: VecDeque::new(),
            rings: None,
            in_flight: None,
            doorbell_armed: true,
            in_wake_handler: false,
            online: true,
            offline_requested: false,
            control_pending: false,
            joined: false,
            last_status: abi::OK,
            fired: 0,
            remote_expiries: 0,
        }
    }

    /// Expired timers handed to it (or, without queue mode, waiting for its `POP`) that the guest
    /// has not read, as the device saw it at its last delivery.
    fn has_unread(&self) -> bool {
        match self.rings {
            Some(r) => !r.caught_up,
            None => !self.queue.is_empty(),
        }
    }

    fn doorbell_due(&self) -> bool {
        match self.rings {
            // Queue mode: entries the guest has not read, and it had read all before them.
            Some(r) => self.control_pending || (self.doorbell_armed && !r.caught_up),
            None => self.control_pending || (self.doorbell_armed && !self.queue.is_empty()),
        }
    }
}

struct DeviceState {
    timers: Vec<TimerSlot>,
    vcpus: Vec<VcpuSide>,
    armed: u64,
    fired: u64,
    cancelled: u64,
    early: u64,
    /// Fired more than [`abi::WINDOW_TOLERANCE_NS`] after their window's end.
    late_beyond_window: u64,
    remote_expiries: u64,
    serialized: u64,
    /// Timers whose expiry is held (`TimerSlot::held`), to look at when callbacks end.
    held_ids: Vec<TimerId>,
    /// Unmatched halves kept over all timers (`TimerSlot::unmatched`), at most
    /// `UNMATCHED_PER_VCPU` per vCPU.
    unmatched: usize,
    /// Submission entries read, `SYNC`s, and what a guest wrote that made no sense (docs/stats.md).
    queue_entries: u64,
    queue_syncs: u64,
    queue_errors: u64,
    /// Constant memory however long the VM runs (docs/stats.md).
    lateness: LatenessRecorder,
}

/// The timer device of one VM.
pub struct TimerDevice<C: Clock> {
    service: TimerService<C>,
    shared: SharedMemory,
    /// The clock published to queue-mode guests; `None`: queue mode is not offered.
    queue_clock: Option<q::ClockParams>,
    kicker: Arc<dyn VcpuKicker>,
    state: NoSleepMutex<DeviceState>,
    /// The VM's minimum slack for MOVABLE armings (`timer-slack-ns`), at most [`abi::MAX_SLACK_NS`].
    min_slack: u64,
    /// `--timer-log`: every arming's end, pushed under the device lock (a leaf lock after it).
    log: Option<Arc<TimerLog>>,
}

impl<C: Clock> TimerDevice<C> {
    /// A device for the service's vCPUs whose pages start at guest address `device_pages`; its kicks
    /// go to `kicker`.
    pub fn new(
        service: TimerService<C>,
        memory: GuestMemoryMmap,
        device_pages: u64,
        timer_states: u64,
        vcpus: u32,
        kicker: Arc<dyn VcpuKicker>,
    ) -> Self {
        let max_timers = service.max_timers();
        let state = DeviceState {
            timers: (0..max_timers).map(|_| TimerSlot::default()).collect(),
            vcpus: (0..vcpus).map(|_| VcpuSide::new()).collect(),
            armed: 0,
            fired: 0,
            cancelled: 0,
            early: 0,
            late_beyond_window: 0,
            remote_expiries: 0,
            serialized: 0,
            held_ids: Vec::new(),
            unmatched: 0,
            queue_entries: 0,
            queue_syncs: 0,
            queue_errors: 0,
            lateness: LatenessRecorder::new(),
        };
        TimerDevice {
            service,
            shared: SharedMemory::new(memory, device_pages, timer_states, max_timers),
            queue_clock: None,
            kicker,
            state: NoSleepMutex::new(state),
            min_slack: 0,
            log: None,
        }
    }

    /// Sets the VM's minimum slack for MOVABLE armings (`timer-slack-ns`; clamped to
    /// [`abi::MAX_SLACK_NS`]). Before the VM runs.
    pub fn set_min_slack(&mut self, ns: u64) {
        self.min_slack = ns.min(abi::MAX_SLACK_NS);
    }

    /// Offers queue mode, with `clock` as the clock the guest reads (it must be this device's clock's
    /// formula: docs/timer-abi.md, "The clock"). Before the VM runs.
    pub fn offer_queues(&mut self, clock: q::ClockParams) {
        self.queue_clock = Some(clock);
    }

    /// Logs every arming's end to `log` (`--timer-log`). Before the VM runs.
    pub fn set_log(&mut self, log: Arc<TimerLog>) {
        self.log = Some(log);
    }

    fn log(&self, record: LogRecord) {
        if let Some(l) = &self.log {
            l.push(record);
        }
    }

    /// Reads what queue-mode vCPUs queued after their last exit (the VM ended first: an arming due
    /// after the horizon needs no `SYNC`), so that it is counted and logged like every other. Once
    /// every vCPU thread has ended.
    pub fn read_rings_at_end(&self) {
        let mut st = self.lock();
        for cpu in 0..st.vcpus.len() as CpuId {
            if st.vcpus[cpu as usize].rings.is_none() {
                continue;
            }
            // The thread is gone: a port of its own for this last read, whose kicks go nowhere.
            let mut port = VcpuPort::new(cpu, true);
            self.consume_ring(&mut st, &mut port);
        }
    }

    /// Logs every arming still pending as `pending` (the VM has ended: its vCPU threads are back).
    pub fn log_pending_at_end(&self) {
        if self.log.is_none() {
            return;
        }
        let st = self.lock();
        for (id, slot) in st.timers.iter().enumerate() {
            // An arming whose end is still in a ring nobody read is pending as far as the log knows.
            let unmatched = slot.unmatched.iter().filter_map(|u| match u {
                Unmatched::Start(a) => Some(a),
                Unmatched::End { .. } => None,
            });
            for a in slot.armed.iter().chain(unmatched) {
                self.log(a.record(id as TimerId, LogOutcome::Pending, None, None));
            }
        }
    }

    /// Guest time now, in nanoseconds (the service's clock).
    pub fn now(&self) -> u64 {
        self.service.clock().now_ns()
    }

    fn lock(&self) -> spin::mutex::SpinMutexGuard<'_, DeviceState, spin::relax::Yield> {
        self.state.lock()
    }

    fn read_u32(&self, cpu: CpuId, off: u64) -> u32 {
        self.shared.read_u32(cpu, off)
    }

    fn read_u64(&self, cpu: CpuId, off: u64) -> u64 {
        self.shared.read_u64(cpu, off)
    }

    fn write<T: vm_memory::ByteValued>(&self, cpu: CpuId, off: u64, v: T) {
        self.shared.write(cpu, off, v);
    }

    // ---- The halt protocol: the three calls of a vCPU thread ------------------------------------

    /// The port of vCPU `cpu`, made by its thread when it starts. Until its guest joins (first timer
    /// command or `HLT`), the vCPU is idle to the service.
    pub fn attach(&self, cpu: CpuId) -> VcpuPort {
        let mut port = VcpuPort::new(cpu, false);
        self.service.vcpu_halt(cpu);
        self.send_kicks(&mut port);
        port
    }

    /// Before each entry into the guest: expires what is due on this vCPU and says whether to inject
    /// the doorbell (`can_take_interrupt`: the guest has interrupts on and nothing is queued), whether
    /// to ask for an interrupt window, and when to kick the thread out of the guest.
    pub fn before_entry(&self, port: &mut VcpuPort, can_take_interrupt: bool) -> EntryPlan {
        if !port.joined {
            return EntryPlan {
                inject_doorbell: false,
                want_interrupt_window: false,
                deadline: port.doorbell_retry_at,
            };
        }
        self.consume_own_ring(port);
        self.expire_due(port);
        let mut plan = EntryPlan {
            inject_doorbell: false,
            want_interrupt_window: false,
            deadline: NO_DEADLINE,
        };
        let queue_mode = {
            let mut st = self.lock();
            let now = self.now();
            self.fill_delivery(&mut st, port, now);
            let side = &mut st.vcpus[port.cpu as usize];
            let answered_by_idle = std::mem::take(&mut port.returning_from_idle);
            if !side.doorbell_due() {
                port.doorbell_retry_at = NO_DEADLINE;
            } else if can_take_interrupt || answered_by_idle {
                side.doorbell_armed = false;
                side.control_pending = false;
                // The idle port's return is the doorbell: the guest looks at its work itself
                // (docs/timer-abi.md, "Halting in one exit"), which saves the injection.
                plan.inject_doorbell = !answered_by_idle;
                port.doorbell_retry_at = NO_DEADLINE;
            } else {
                // The interrupt-window exit is unreliable on some hosts (docs/kvm-host.md): ask for
                // it, and also come back shortly to try again.
                plan.want_interrupt_window = true;
                port.doorbell_retry_at = self.now() + DOORBELL_RETRY_NS;
            }
            if side.rings.is_some() && !side.queue.is_empty() {
                // The delivery ring is full: come back soon to hand over the rest.
                port.doorbell_retry_at = port.doorbell_retry_at.min(now + DOORBELL_RETRY_NS);
            }
            side.rings.is_some()
        };
        plan.deadline = self.entry_deadline(port);
        if queue_mode {
            self.publish_horizon(port, &mut plan);
        }
        plan
    }

    /// The grace of a vCPU going back into its handler at guest time `now` (queue mode only; 0: none).
    fn handler_grace(side: &VcpuSide, now: u64) -> u64 {
        match side.rings {
            Some(_) => now + WOKEN_HANDLER_GRACE_NS,
            None => 0,
        }
    }

    /// When to kick the thread out of the guest: its next event, or a doorbell retry; not before
    /// the grace of a queue-mode vCPU just woken into its handler.
    fn entry_deadline(&self, port: &VcpuPort) -> u64 {
        let mut next = self.service.next_event(port.cpu);
        if port.woken_grace_until != 0 && next < port.woken_grace_until {
            next = port.woken_grace_until;
        }
        next.min(port.doorbell_retry_at)
    }

    /// Queue mode, just before entering the guest: tells it the time by which this thread will be
    /// back anyway (`plan.deadline`), then reads the ring once more (docs/timer-abi.md, the horizon
    /// handshake); whatever it finds is applied and the deadline taken again. Bounded: the guest
    /// cannot keep it here.
    fn publish_horizon(&self, port: &mut VcpuPort, plan: &mut EntryPlan) {
        let cpu = port.cpu;
        for _ in 0..4 {
            let head = self.shared.publish_horizon(cpu, plan.deadline);
            let tail = self.lock().vcpus[cpu as usize]
                .rings
                .map_or(head, |r| r.sub_tail);
            if head == tail {
                return;
            }
            self.consume_own_ring(port);
            if !self.lock().vcpus[cpu as usize].queue.is_empty() {
                // What that read released (a held expiry) waits to be handed over: come back soon.
                port.doorbell_retry_at = port.doorbell_retry_at.min(self.now() + DOORBELL_RETRY_NS);
            }
            plan.deadline = self.entry_deadline(port);
        }
        // Still moving: a guest writing its ring in a loop. It will exit at this deadline anyway.
    }

    /// Reads the port's vCPU's submission ring (queue mode; nothing otherwise) and sends the kicks
    /// that what it applied calls for.
    fn consume_own_ring(&self, port: &mut VcpuPort) {
        {
            let mut st = self.lock();
            if st.vcpus[port.cpu as usize].rings.is_none() {
                return;
            }
            self.consume_ring(&mut st, port);
        }
        self.send_kicks(port);
    }

    /// The guest halted (`HLT`): joins it to timer expiry if it was not yet, and says whether it must
    /// sleep (and until when) or return to the guest at once.
    pub fn halt(&self, port: &mut VcpuPort) -> HaltPlan {
        self.halt_unless(port, VcpuSide::doorbell_due)
    }

    /// The guest halted through the idle port (docs/timer-abi.md, "Halting in one exit"): as
    /// [`Self::halt`], for a guest that halts with its doorbell masked. A doorbell already injected
    /// but not yet handled cannot wake such a guest, so it resumes at once while anything the
    /// doorbell was for is still unread (its delivery ring or queue) or an offline request waits.
    pub fn idle(&self, port: &mut VcpuPort) -> HaltPlan {
        port.returning_from_idle = true;
        self.halt_unless(port, |side| {
            side.doorbell_due() || side.has_unread() || side.offline_requested
        })
    }

    /// The halt of [`Self::halt`] and [`Self::idle`]: `Resume` if `has_work` says the guest has work
    /// (after its ring was read and its deliveries handed over), else how long to sleep.
    fn halt_unless(&self, port: &mut VcpuPort, has_work: impl Fn(&VcpuSide) -> bool) -> HaltPlan {
        self.join(port);
        // Queue mode: what the guest queued before it halted is armed before the vCPU goes idle.
        self.consume_own_ring(port);
        {
            let mut st = self.lock();
            let now = self.now();
            self.fill_delivery(&mut st, port, now);
            let side = &st.vcpus[port.cpu as usize];
            if has_work(side) {
                // Back into the handler without sleeping: the same grace as after a wake.
                port.woken_grace_until = Self::handler_grace(side, now);
                return HaltPlan::Resume;
            }
        }
        port.woken_grace_until = 0;
        // No doorbell waits, so no retry of one either: a stale retry time would cut the sleep short
        // for nothing.
        port.doorbell_retry_at = NO_DEADLINE;
        let wake_at = self.service.vcpu_halt(port.cpu);
        // Another vCPU may have moved this one's required time earlier between `vcpu_halt` and
        // here (a hotplug hand-off, a push placement): that kick is this vCPU's own, in the
        // service's list, and must not be dropped as "the caller looks anyway".
        let kicked_self = self.send_kicks(port);
        if kicked_self || wake_at <= self.now() {
            HaltPlan::Recheck
        } else {
            HaltPlan::Sleep { until: wake_at }
        }
    }

    /// After a halt's sleep (`slept`: it really slept, one host wakeup) or its recheck: the vCPU runs
    /// again, expires what is due, and learns why it woke and whether its guest has work. `reasons`
    /// are the kicks its thread took around the sleep (with `STOP` if the VM is ending).
    pub fn wake(&self, port: &mut VcpuPort, slept: bool, reasons: KickReasons) -> Wake {
        self.service.vcpu_run(port.cpu);
        let found = self.expire_due(port);
        let has_work = {
            let mut st = self.lock();
            let now = self.now();
            self.fill_delivery(&mut st, port, now);
            let side = &mut st.vcpus[port.cpu as usize];
            let due = side.doorbell_due();
            if due {
                // Until its guest empties its queue it counts as idle for `push` (the kernel's
                // "timer armed from an interrupt in the idle task").
                side.in_wake_handler = true;
                self.service.set_push_idle(port.cpu, true);
                port.woken_grace_until = Self::handler_grace(side, now);
            }
            due
        };
        Wake {
            cause: slept.then(|| classify_wakeup(found, reasons, has_work)),
            resume_guest: has_work,
        }
    }

    /// A guest `out` to the command port from this vCPU (docs/timer-abi.md).
    pub fn command(&self, port: &mut VcpuPort, size: u8, cmd: u32) -> CommandEffect {
        self.join(port);
        // An exit before the halt: the grace is over, its timers are due as they come.
        port.woken_grace_until = 0;
        let cpu = port.cpu;
        let mut effect = CommandEffect::None;
        let mut st = self.lock();
        // Queue mode: what the guest queued before this command took effect before it.
        let queued = self.consume_ring(&mut st, port);
        // Read under the lock: waiting for it can take milliseconds on an oversubscribed host, while
        // another vCPU expires timers at a later time; a time read before the wait would make a timer
        // handed over now look as if it fired before its deadline.
        let now = self.now();
        let (status, value) = if size != 4 {
            (abi::BAD_ACCESS, 0)
        } else {
            match cmd {
                abi::CMD_NOW => (abi::OK, now),
                abi::CMD_ARM => self.arm(&mut st, cpu, now),
                abi::CMD_CANCEL => {
                    let id = self.read_u32(cpu, abi::OFF_ID);
                    match self.cancel(&mut st, cpu, id, now) {
                        Some((was, _)) => (abi::OK, was as u64),
                        None => (abi::INVALID, 0),
                    }
                }
                abi::CMD_CANCEL_SYNC => {
                    let id = self.read_u32(cpu, abi::OFF_ID);
                    match self.cancel(&mut st, cpu, id, now) {
                        Some((was, word)) => (word.cancel_sync_status(cpu), was as u64),
                        None => (abi::INVALID, 0),
                    }
                }
                abi::CMD_POP => self.pop(&mut st, port, now),
                abi::CMD_ACK => {
                    let id = self.read_u32(cpu, abi::OFF_ID);
                    (self.end_callback(&mut st, port, id), 0)
                }
                abi::CMD_ENABLE_QUEUES => match self.queue_clock {
                    Some(clock) => {
                        let side = &mut st.vcpus[cpu as usize];
                        if side.rings.is_none() {
                            side.rings = Some(Rings {
                                caught_up: true,
                                ..Rings::default()
                            });
                            self.shared.enable_queues(cpu, clock);
                        }
                        (abi::OK, 0)
                    }
                    None => (abi::INVALID, 0),
                },
                abi::CMD_SYNC => {
                    st.queue_syncs += 1;
                    (abi::OK, u64::from(queued))
                }
                abi::CMD_OFFLINE_ACK => {
                    let side = &st.vcpus[cpu as usize];
                    // Entries handed over that the guest has not taken, read now: the guest may
                    // have drained its ring since the device last looked.
                    let unread = side
                        .rings
                        .is_some_and(|r| r.dlv_head != self.shared.dlv_tail(cpu));
                    if !side.offline_requested {
                        (abi::INVALID, 0)
                    } else if side.in_flight.is_some() || unread {
                        (abi::BAD_ACK, 0)
                    } else {
                        effect = CommandEffect::GoOffline;
                        (abi::OK, 0)
                    }
                }
                _ => (abi::UNKNOWN_COMMAND, 0),
            }
        };
        st.vcpus[cpu as usize].last_status = status;
        drop(st);
        self.write(cpu, abi::OFF_STATUS, status);
        self.write(cpu, abi::OFF_VALUE, value);
        self.write(cpu, abi::OFF_NOW, now);
        self.send_kicks(port);
        effect
    }

    /// A guest `in` from the command port: the status of this vCPU's last command.
    pub fn last_status(&self, cpu: CpuId) -> u32 {
        self.lock().vcpus[cpu as usize].last_status
    }

    // ---- Hotplug -----------------------------------------------------------------------------

    /// The vCPU leaves (its guest acknowledged with `OFFLINE_ACK`, or it starts parked): the service
    /// moves its queued timers (pinned too) to its hand-off target and takes it out of the hierarchy
    /// (if it was the last active one with movable events pending, the service names another to run
    /// now, which is kicked); the expired timers waiting in its delivery queue go to that forced-active
    /// vCPU, or else to the hand-off target.
    pub fn go_offline(&self, port: &mut VcpuPort) {
        let cpu = port.cpu;
        self.consume_own_ring(port);
        let forced_active = self.service.vcpu_offline(cpu);
        // Never an isolated vCPU while another can take them (tmigr's `handoff_target`).
        let to = forced_active.unwrap_or_else(|| self.service.handoff_target(cpu));
        if let Some(o) = forced_active {
            // Also in the service's kick list; named here so the hand-off is explicit.
            port.kicks.push((o, KickReasons::HIERARCHY));
        }
        {
            let mut st = self.lock();
            let side = &mut st.vcpus[cpu as usize];
            side.online = false;
            side.offline_requested = false;
            side.doorbell_armed = true;
            if side.in_wake_handler {
                // Left mid-handler: it is not idle-for-push once it is back.
                side.in_wake_handler = false;
                self.service.set_push_idle(cpu, false);
            }
            if to != cpu && !st.vcpus[cpu as usize].queue.is_empty() {
                while let Some(e) = st.vcpus[cpu as usize].queue.pop_front() {
                    Self::enqueue(&mut st, to, e);
                }
                port.kicks.push((to, KickReasons::DELIVERY));
            }
        }
        self.send_kicks(port);
    }

    /// Sets up the hierarchy for vCPU `cpu` before it comes online, on the calling thread (the control
    /// plane's), so the vCPU's own thread does not build groups when it runs again (the kernel moved
    /// this into its hotplug prepare step: "timers/migration: Move hierarchy setup into cpuhotplug
    /// prepare callback").
    pub fn prepare_online(&self, cpu: CpuId) {
        self.service.vcpu_prepare(cpu);
        // On the control thread: no vCPU is the caller, every vCPU listed is kicked.
        self.send_service_kicks(&mut Vec::new(), None);
    }

    /// The vCPU comes back (`vcpu-online`): it rejoins the service (the hierarchy grows if needed). A
    /// guest that was running is told through `control` and its doorbell; one that has not started
    /// yet (`--vcpus-online`) is not, and stays idle to the service until it joins.
    pub fn come_online(&self, port: &mut VcpuPort) {
        let cpu = port.cpu;
        self.service.vcpu_online(cpu);
        if !port.joined {
            self.service.vcpu_halt(cpu);
        }
        self.send_kicks(port);
        let mut st = self.lock();
        st.vcpus[cpu as usize].online = true;
        if port.joined {
            self.set_control(&mut st, cpu, abi::CONTROL_ONLINE);
        }
    }

    /// Asks the guest to take `cpu` offline (its doorbell rings; it answers with `OFFLINE_ACK`).
    pub fn request_offline(&self, cpu: CpuId) {
        let mut st = self.lock();
        st.vcpus[cpu as usize].offline_requested = true;
        self.set_control(&mut st, cpu, abi::CONTROL_OFFLINE_REQUESTED);
    }

    /// Withdraws an offline request the guest did not acknowledge in time. `false` if it was
    /// acknowledged meanwhile (the vCPU is leaving: the request can no longer be withdrawn).
    pub fn withdraw_offline(&self, cpu: CpuId) -> bool {
        let mut st = self.lock();
        if !st.vcpus[cpu as usize].online {
            return false;
        }
        st.vcpus[cpu as usize].offline_requested = false;
        self.set_control(&mut st, cpu, abi::CONTROL_NONE);
        true
    }

    fn set_control(&self, st: &mut DeviceState, cpu: CpuId, value: u32) {
        st.vcpus[cpu as usize].control_pending = value != abi::CONTROL_NONE;
        self.write(cpu, abi::OFF_CONTROL, value);
    }

    // ---- Figures -------------------------------------------------------------------------------

    /// The VM's timer figures, with `missed` counted at guest time `now`. Copies percentiles, not the
    /// lateness histogram, under the lock.
    pub fn timer_stats(&self, now: u64) -> TimerStats {
        let st = self.lock();
        TimerStats {
            armed: st.armed,
            fired: st.fired,
            cancelled: st.cancelled,
            early: st.early,
            late_beyond_window: st.late_beyond_window,
            missed: st
                .timers
                .iter()
                .filter(|t| {
                    t.armed
                        .is_some_and(|a| !a.stale && a.deadline.saturating_add(a.slack) < now)
                })
                .count() as u64,
            remote_expiries: st.remote_expiries,
            serialized: st.serialized,
            queue_entries: st.queue_entries,
            queue_syncs: st.queue_syncs,
            queue_errors: st.queue_errors,
            lateness_ns: st.lateness.summary(),
            cross_node_below_crossnode: self.service.hierarchy().stats().cross_node_below_crossnode,
            hierarchy_check: String::new(),
        }
    }

    /// Checks the timer service's invariants (tmigr's `check_invariants`); for a VM whose vCPU threads
    /// have all ended, when nothing moves. "ok", or what is broken.
    pub fn check_hierarchy(&self) -> String {
        match self.service.check_invariants() {
            Ok(()) => "ok".into(),
            Err(e) => e,
        }
    }

    /// Timer callbacks handed to vCPU `cpu` so far, and how many of them were other vCPUs' timers.
    pub fn vcpu_timer_counts(&self, cpu: CpuId) -> (u64, u64) {
        let st = self.lock();
        st.vcpus
            .get(cpu as usize)
            .map_or((0, 0), |v| (v.fired, v.remote_expiries))
    }

    /// [`Self::vcpu_timer_counts`] of every vCPU in `out` (indexed by vCPU), under one lock: a
    /// consistent snapshot.
    pub fn each_vcpu_timer_counts(&self, mut out: impl FnMut(CpuId, u64, u64)) {
        let st = self.lock();
        for (i, v) in st.vcpus.iter().enumerate() {
            out(i as CpuId, v.fired, v.remote_expiries);
        }
    }

    /// vCPU `cpu`'s side of the device in one line, for the report of a VM that did not end in time
    /// (`--timeout-ms`): whether it joined, its delivery queue, the callback it runs, its doorbell
    /// state, its last command's status, the timers held for it or running on it, and the time the
    /// service last gave it. Read-only, under the device lock.
    pub fn describe_vcpu(&self, cpu: CpuId) -> String {
        use std::fmt::Write;
        let st = self.lock();
        let Some(side) = st.vcpus.get(cpu as usize) else {
            return format!("no vCPU {cpu}");
        };
        let mut out = format!(
            "joined={} online={} queue={} in_flight={} doorbell_armed={} control_pending={} \
             in_wake_handler={} last_status={} fired={}",
            side.joined,
            side.online,
            side.queue.len(),
            side.in_flight.map_or("none".into(), |t| t.to_string()),
            side.doorbell_armed,
            side.control_pending,
            side.in_wake_handler,
            side.last_status,
            side.fired,
        );
        if !side.queue.is_empty() {
            let ids: Vec<String> = side
                .queue
                .iter()
                .take(8)
                .map(|p| p.e.id.to_string())
                .collect();
            let _ = write!(out, " queued=[{}]", ids.join(","));
        }
        let running: Vec<String> = (0..st.timers.len())
            .filter(|&t| self.word(t as TimerId).running_on() == Some(cpu))
            .take(8)
            .map(|t| t.to_string())
            .collect();
        if !running.is_empty() {
            let _ = write!(out, " running_here=[{}]", running.join(","));
        }
        let held: Vec<String> = (0..st.timers.len())
            .filter(|&t| st.timers[t].held.is_some_and(|p| p.e.owner == cpu))
            .take(8)
            .map(|t| t.to_string())
            .collect();
        if !held.is_empty() {
            let _ = write!(out, " held_owned=[{}]", held.join(","));
        }
        let programmed = self.service.programmed(cpu);
        let now = self.now();
        if programmed == NO_DEADLINE {
            out.push_str(" programmed=none");
        } else {
            let _ = write!(
                out,
                " programmed={programmed} ({}{} ns from now)",
                if programmed < now { "-" } else { "+" },
                programmed.abs_diff(now)
            );
        }
        let _ = write!(out, " running={}", self.service.is_running(cpu));
        out
    }

    // ---- Internals -----------------------------------------------------------------------------

    /// The guest takes part in timer expiry from now on (its first timer command or `HLT`; see
    /// "Joining"). Idempotent.
    pub fn join(&self, port: &mut VcpuPort) {
        if !port.joined {
            port.joined = true;
            self.lock().vcpus[port.cpu as usize].joined = true;
            self.service.vcpu_run(port.cpu);
            self.send_kicks(port);
        }
    }

    /// Kicks what this call left to kick: the deliveries it made and the service's list (all but the
    /// caller, which re-reads its own next event anyway). Never under the device lock.
    /// Returns whether the service's list named the caller itself.
    fn send_kicks(&self, port: &mut VcpuPort) -> bool {
        let kicked_self = self.send_service_kicks(&mut port.service_kicks, Some(port.cpu));
        for (c, why) in port.kicks.drain(..) {
            if c != port.cpu {
                self.kicker.kick(c, why);
            }
        }
        kicked_self
    }

    /// Drains the service's kick list (into `buf`, reused) and kicks every vCPU in it but `caller`;
    /// returns whether it named `caller`.
    fn send_service_kicks(&self, buf: &mut Vec<CpuId>, caller: Option<CpuId>) -> bool {
        buf.clear();
        self.service.take_kicks(buf);
        let mut named_caller = false;
        for &c in buf.iter() {
            if Some(c) == caller {
                named_caller = true;
            } else {
                self.kicker.kick(c, KickReasons::HIERARCHY);
            }
        }
        named_caller
    }

    /// Timer `id`'s state word, as quietvm sees it now.
    fn word(&self, id: TimerId) -> State {
        self.shared.state(id)
    }

    /// Applies `transition` to timer `id`'s word (bounded: docs/timer-abi.md, "A hostile guest").
    fn update_word(&self, id: TimerId, transition: impl FnMut(State) -> Option<State>) -> Update {
        self.shared
            .with_word(id, |w| q::update(w, q::CAS_TRIES, transition))
            .unwrap_or(Update::Contended)
    }

    /// `ARM` as a command: the guest's queue-mode steps (decide, swap the word) done by the device,
    /// then the same [`Self::apply_op`] as a queued entry.
    fn arm(&self, st: &mut DeviceState, cpu: CpuId, now: u64) -> (u32, u64) {
        let id = self.read_u32(cpu, abi::OFF_ID);
        let flags = self.read_u32(cpu, abi::OFF_FLAGS);
        let deadline = self.read_u64(cpu, abi::OFF_DEADLINE);
        let guest_slack = self.read_u64(cpu, abi::OFF_SLACK);
        if flags != abi::FLAG_PINNED && flags != abi::FLAG_MOVABLE {
            return (abi::INVALID, 0);
        }
        if id as usize >= st.timers.len() {
            return (abi::INVALID, 0);
        }
        if deadline <= now {
            return (abi::PAST, 0);
        }
        let Update::Done(old, new) = self.update_word(id, |s| Some(s.armed())) else {
            st.queue_errors += 1;
            return (abi::INVALID, 0);
        };
        let entry = SubEntry {
            op: q::OP_ARM,
            id,
            gen: new.gen(),
            flags: flags | if old.pending() { q::ENDED_PENDING } else { 0 },
            deadline,
            slack: guest_slack,
            at: now,
            reserved: 0,
        };
        self.apply_op(st, cpu, &entry);
        (abi::OK, old.pending() as u64)
    }

    /// `CANCEL` as a command; the word it left (`None` for an unknown id).
    fn cancel(
        &self,
        st: &mut DeviceState,
        cpu: CpuId,
        id: TimerId,
        now: u64,
    ) -> Option<(bool, State)> {
        if id as usize >= st.timers.len() {
            return None;
        }
        let Update::Done(old, new) = self.update_word(id, |s| Some(s.cancelled())) else {
            st.queue_errors += 1;
            return None;
        };
        let entry = SubEntry {
            op: q::OP_CANCEL,
            id,
            gen: new.gen(),
            flags: if old.pending() { q::ENDED_PENDING } else { 0 },
            at: now,
            ..SubEntry::default()
        };
        self.apply_op(st, cpu, &entry);
        Some((old.pending(), new))
    }

    /// One `ARM` or `CANCEL` of vCPU `cpu` that already took effect on the word (a queued entry, or a
    /// command above): the counts, the timer log, and the service's copy.
    fn apply_op(&self, st: &mut DeviceState, cpu: CpuId, entry: &SubEntry) {
        let id = entry.id;
        let ended = entry.flags & q::ENDED_PENDING != 0;
        let now_word = self.word(id);
        if entry.op == q::OP_ARM {
            st.armed += 1;
            let kind = if entry.flags & q::ARM_KIND_MASK == abi::FLAG_PINNED {
                TimerKind::Pinned
            } else {
                TimerKind::Movable
            };
            let slack = applied_slack(entry.slack, kind, self.min_slack);
            let arming = Arming {
                gen: entry.gen,
                deadline: entry.deadline,
                slack,
                armed_by: cpu,
                armed_at: entry.at,
                kind,
                held: false,
                stale: false,
            };
            // Still the live arming: nothing newer has touched the word since.
            let live = now_word.pending() && now_word.gen() == entry.gen;
            if ended {
                self.end_arming(
                    st,
                    id,
                    entry.gen.wrapping_sub(1),
                    LogOutcome::Replaced,
                    entry.at,
                    !live,
                );
            }
            if live {
                Self::unqueue_delivered(st, id);
                let slot = &mut st.timers[id as usize];
                slot.held = None;
                self.service.arm(cpu, id, entry.deadline, slack, kind);
                if let Some(older) = slot.armed.replace(arming) {
                    // Ended by an operation still in another vCPU's ring.
                    self.unmatched(st, id, Unmatched::Start(older));
                }
            } else {
                self.unmatched(st, id, Unmatched::Start(arming));
            }
        } else if ended {
            st.cancelled += 1;
            self.end_arming(
                st,
                id,
                entry.gen.wrapping_sub(1),
                LogOutcome::Cancelled,
                entry.at,
                true,
            );
        }
    }

    /// Arming `gen` of timer `id` ended (`outcome`, at guest time `at`); `remove`: take it out of the
    /// service and the delivery queues (an `ARM` that replaces it live does that itself).
    fn end_arming(
        &self,
        st: &mut DeviceState,
        id: TimerId,
        gen: u32,
        outcome: LogOutcome,
        at: u64,
        remove: bool,
    ) {
        let slot = &mut st.timers[id as usize];
        if slot.armed.is_some_and(|a| a.gen == gen) {
            let a = slot.armed.take().expect("checked");
            self.log(a.record(id, outcome, Some(at), None));
            if remove {
                slot.held = None;
                self.service.cancel(id);
                Self::unqueue_delivered(st, id);
            }
        } else {
            self.unmatched(st, id, Unmatched::End { gen, outcome, at });
        }
    }

    /// Keeps one half of an arming until its other half is read from another ring, or logs the
    /// arming if that half was here already. Only for the timer log.
    fn unmatched(&self, st: &mut DeviceState, id: TimerId, half: Unmatched) {
        if self.log.is_none() {
            return;
        }
        let slot = &mut st.timers[id as usize];
        let gen_of = |u: &Unmatched| match u {
            Unmatched::Start(a) => a.gen,
            Unmatched::End { gen, .. } => *gen,
        };
        let other = slot.unmatched.iter().position(|u| {
            gen_of(u) == gen_of(&half)
                && matches!(
                    (u, &half),
                    (Unmatched::Start(_), Unmatched::End { .. })
                        | (Unmatched::End { .. }, Unmatched::Start(_))
                )
        });
        match other {
            Some(i) => {
                let u = slot.unmatched.swap_remove(i);
                st.unmatched -= 1;
                let (a, outcome, at) = match (u, half) {
                    (Unmatched::Start(a), Unmatched::End { outcome, at, .. })
                    | (Unmatched::End { outcome, at, .. }, Unmatched::Start(a)) => (a, outcome, at),
                    _ => unreachable!("matched a start with an end"),
                };
                self.log(a.record(id, outcome, Some(at), None));
            }
            None => {
                if st.unmatched >= UNMATCHED_PER_VCPU * st.vcpus.len() {
                    st.queue_errors += 1;
                    let slot = &mut st.timers[id as usize];
                    if slot.unmatched.is_empty() {
                        return;
                    }
                    slot.unmatched.remove(0);
                    st.unmatched -= 1;
                }
                st.timers[id as usize].unmatched.push(half);
                st.unmatched += 1;
            }
        }
    }

    /// Removes an expired-but-not-handed-over arming from the delivery queue it waits in.
    fn unqueue_delivered(st: &mut DeviceState, id: TimerId) {
        if let Some(q) = st.timers[id as usize].delivered_to.take() {
            st.vcpus[q as usize].queue.retain(|p| p.e.id != id);
        }
    }

    /// Ends the callback the port's vCPU runs (a `POP` or `ACK` command), if `id` names it.
    fn end_callback(&self, st: &mut DeviceState, port: &mut VcpuPort, id: TimerId) -> u32 {
        let cpu = port.cpu;
        let side = &mut st.vcpus[cpu as usize];
        match side.in_flight {
            Some(t) if t == id => {
                side.in_flight = None;
                // A word that no longer says so was scribbled on by the guest: nothing to end.
                let _ = self.update_word(t, |s| s.callback_ended(cpu));
                self.release_held(st, port);
                abi::OK
            }
            None if id == abi::NO_TIMER => abi::OK,
            _ => abi::BAD_ACK,
        }
    }

    /// Hands over every held expiry whose callback has ended (its word no longer says `RUNNING`), to
    /// where it fires: a pinned timer on its owner (if that is still online); a movable one right
    /// here, on a running vCPU, unless this vCPU is isolated and the timer is another's: an isolated
    /// vCPU never runs another vCPU's callback, so it goes to its owner, or where the owner's timers
    /// went if it is offline. Drops the ones the word says are stale.
    fn release_held(&self, st: &mut DeviceState, port: &mut VcpuPort) {
        if st.held_ids.is_empty() {
            return;
        }
        let cpu = port.cpu;
        let mut i = 0;
        while i < st.held_ids.len() {
            let id = st.held_ids[i];
            let word = self.word(id);
            let Some(p) = st.timers[id as usize].held else {
                st.held_ids.swap_remove(i);
                continue;
            };
            if !word.pending() || word.gen() != p.gen {
                st.timers[id as usize].held = None;
                st.held_ids.swap_remove(i);
                continue;
            }
            if word.running() {
                i += 1;
                continue;
            }
            st.timers[id as usize].held = None;
            st.held_ids.swap_remove(i);
            let e = p.e;
            let owner_online = st.vcpus[e.owner as usize].online;
            let target = if e.kind == TimerKind::Pinned && owner_online {
                e.owner
            } else if e.owner == cpu || !self.service.is_isolated(cpu) {
                cpu
            } else if owner_online {
                e.owner
            } else {
                self.service.handoff_target(e.owner)
            };
            Self::enqueue(st, target, p);
            port.kicks.push((target, KickReasons::DELIVERY));
        }
    }

    fn enqueue(st: &mut DeviceState, target: CpuId, p: Pending) {
        st.timers[p.e.id as usize].delivered_to = Some(target);
        st.vcpus[target as usize].queue.push_back(p);
    }

    fn hold(st: &mut DeviceState, p: Pending) {
        let slot = &mut st.timers[p.e.id as usize];
        if slot.held.is_none() {
            st.held_ids.push(p.e.id);
        }
        slot.held = Some(p);
        if let Some(a) = slot.armed.as_mut() {
            a.held = true;
        }
        st.serialized += 1;
    }

    /// Hands the next expired timer of `cpu`'s delivery queue over to it (the timer fires now, at
    /// guest time `now`): its word says `RUNNING` here, and it is counted and logged. Skips (and
    /// drops) stale ones and holds the ones whose previous callback still runs. `None`: none left.
    fn hand_over_next(&self, st: &mut DeviceState, cpu: CpuId, now: u64) -> Option<DeliveryEntry> {
        while let Some(p) = st.vcpus[cpu as usize].queue.pop_front() {
            let e = p.e;
            st.timers[e.id as usize].delivered_to = None;
            let expiry = self
                .shared
                .with_word(e.id, |w| q::expire(w, p.gen, cpu, q::CAS_TRIES))
                .unwrap_or(Expiry::Stale);
            match expiry {
                Expiry::Stale => continue,
                Expiry::Held => {
                    Self::hold(st, p);
                    continue;
                }
                Expiry::HandedOver => {}
            }
            st.vcpus[cpu as usize].fired += 1;
            let slot = &mut st.timers[e.id as usize];
            let mut owner = e.owner;
            if slot.armed.is_some_and(|a| a.gen == p.gen) {
                let a = slot.armed.take().expect("checked");
                owner = a.armed_by;
                self.log(a.record(e.id, LogOutcome::Fired, Some(now), Some(cpu)));
            }
            if owner != cpu {
                st.vcpus[cpu as usize].remote_expiries += 1;
                st.remote_expiries += 1;
            }
            st.fired += 1;
            if now < e.deadline {
                st.early += 1;
                log::error!(
                    "timer {} fired {} ns early on vCPU {cpu}",
                    e.id,
                    e.deadline - now
                );
            }
            // Lateness stays measured from the deadline (the window's start); a firing past the
            // window's end (by more than the tolerance) is counted on its own (docs/stats.md).
            st.lateness.record(now.saturating_sub(e.deadline));
            let window_end = e.deadline.saturating_add(e.slack);
            if now.saturating_sub(window_end) > abi::WINDOW_TOLERANCE_NS {
                st.late_beyond_window += 1;
            }
            return Some(DeliveryEntry {
                id: e.id,
                owner,
                gen: p.gen,
                deadline: e.deadline,
                slack: e.slack,
                fired_at: now,
                ..DeliveryEntry::default()
            });
        }
        None
    }

    /// `POP` as a command.
    fn pop(&self, st: &mut DeviceState, port: &mut VcpuPort, now: u64) -> (u32, u64) {
        let cpu = port.cpu;
        let ack = self.read_u32(cpu, abi::OFF_ID);
        let status = self.end_callback(st, port, ack);
        if status != abi::OK {
            return (status, 0);
        }
        let Some(d) = self.hand_over_next(st, cpu, now) else {
            let side = &mut st.vcpus[cpu as usize];
            if side.rings.is_some() {
                // Queue mode: the doorbell is armed again when the guest has read its delivery
                // ring (`fill_delivery`), not by a `POP`: a guest that pops instead of reading its
                // ring would otherwise be rung again at every exit for entries it never reads.
                return (abi::EMPTY, 0);
            }
            side.doorbell_armed = true;
            if side.in_wake_handler {
                side.in_wake_handler = false;
                self.service.set_push_idle(cpu, false);
            }
            return (abi::EMPTY, 0);
        };
        st.vcpus[cpu as usize].in_flight = Some(d.id);
        self.write(cpu, abi::OFF_EXP_ID, d.id);
        self.write(cpu, abi::OFF_EXP_OWNER, d.owner);
        self.write(cpu, abi::OFF_EXP_DEADLINE, d.deadline);
        self.write(cpu, abi::OFF_EXP_FIRED_AT, d.fired_at);
        self.write(cpu, abi::OFF_EXP_SLACK, d.slack);
        (abi::OK, 0)
    }

    /// Queue mode: reads what the guest of the port's vCPU queued since the last look (at most one
    /// ring's worth), applies it, and hands over held expiries whose callbacks ended. Returns the
    /// entries read. Under the device lock.
    fn consume_ring(&self, st: &mut DeviceState, port: &mut VcpuPort) -> u32 {
        let cpu = port.cpu;
        let Some(mut rings) = st.vcpus[cpu as usize].rings else {
            return 0;
        };
        let head = self.shared.sub_head(cpu);
        let mut read = 0;
        match q::ring_len(head, rings.sub_tail, q::SUB_ENTRIES) {
            None => {
                st.queue_errors += 1;
                log::debug!(
                    "vCPU {cpu}: submission ring head {head} tail {} makes no sense",
                    rings.sub_tail
                );
            }
            Some(len) => {
                for _ in 0..len {
                    let entry = self.shared.sub_entry(cpu, rings.sub_tail);
                    rings.sub_tail = rings.sub_tail.wrapping_add(1);
                    read += 1;
                    if self.valid_entry(st, &entry) {
                        self.apply_op(st, cpu, &entry);
                    } else {
                        st.queue_errors += 1;
                    }
                }
                if len > 0 {
                    self.shared.set_sub_tail(cpu, rings.sub_tail);
                }
            }
        }
        st.queue_entries += u64::from(read);
        st.vcpus[cpu as usize].rings = Some(rings);
        self.release_held(st, port);
        read
    }

    /// An entry whose op, id and flags make sense, and whose generation is one the word has had
    /// (never ahead of it: a guest that invents one gains nothing, but the log would wait for it).
    fn valid_entry(&self, st: &DeviceState, e: &SubEntry) -> bool {
        if e.id as usize >= st.timers.len() {
            return false;
        }
        let ahead = e.gen.wrapping_sub(self.word(e.id).gen()) as i32 > 0;
        let ops_ok = match e.op {
            q::OP_ARM => {
                let kind = e.flags & q::ARM_KIND_MASK;
                kind == abi::FLAG_PINNED || kind == abi::FLAG_MOVABLE
            }
            q::OP_CANCEL => true,
            _ => false,
        };
        ops_ok && !ahead && e.flags & !(q::ARM_KIND_MASK | q::ENDED_PENDING) == 0
    }

    /// Queue mode: hands expired timers over into the delivery ring as far as it has room, and
    /// notes whether the guest had read everything before (then the doorbell rings). Under the lock.
    fn fill_delivery(&self, st: &mut DeviceState, port: &mut VcpuPort, now: u64) {
        let cpu = port.cpu;
        let Some(mut rings) = st.vcpus[cpu as usize].rings else {
            return;
        };
        let tail = self.shared.dlv_tail(cpu);
        let Some(mut len) = q::ring_len(rings.dlv_head, tail, q::DELIVERY_ENTRIES) else {
            st.queue_errors += 1;
            return;
        };
        let side = &mut st.vcpus[cpu as usize];
        if len == 0 {
            side.doorbell_armed = true;
            if side.queue.is_empty() && side.in_wake_handler {
                // It has read everything and has nothing more: out of the handler, for `push`.
                side.in_wake_handler = false;
                self.service.set_push_idle(cpu, false);
            }
        }
        let before = rings.dlv_head;
        while len < q::DELIVERY_ENTRIES {
            let Some(d) = self.hand_over_next(st, cpu, now) else {
                break;
            };
            self.shared.put_delivery(cpu, rings.dlv_head, d);
            rings.dlv_head = rings.dlv_head.wrapping_add(1);
            len += 1;
        }
        if rings.dlv_head != before {
            self.shared.set_dlv_head(cpu, rings.dlv_head);
        }
        rings.caught_up = len == 0;
        st.vcpus[cpu as usize].rings = Some(rings);
    }

    /// Moves every timer the port's vCPU (running) must expire now into delivery queues: held
    /// behind a running callback, or dropped if the word says the arming is no longer pending.
    /// Returns what the expiry found, for the wakeup's cause.
    fn expire_due(&self, port: &mut VcpuPort) -> ExpiryCounts {
        let cpu = port.cpu;
        port.expired.clear();
        let mut st = self.lock();
        self.service.expire(cpu, &mut port.expired);
        let found = ExpiryCounts::of(cpu, &port.expired);
        for e in port.expired.drain(..) {
            let slot = &mut st.timers[e.id as usize];
            let Some(a) = slot.armed.as_mut() else {
                continue;
            };
            let p = Pending { e, gen: a.gen };
            // Serialization: while a previous callback of this timer runs somewhere, the expiry is
            // held, and the word says HELD so that the guest ending that callback tells the device.
            match self.update_word(e.id, |s| s.held_back(p.gen)) {
                Update::Done(..) => Self::hold(&mut st, p),
                Update::Refused(s) if s.pending() && s.gen() == p.gen => {
                    Self::enqueue(&mut st, cpu, p)
                }
                // Cancelled or re-armed in a ring not read yet (that entry logs it), or a guest
                // that keeps rewriting the word.
                _ => {
                    if let Some(a) = st.timers[e.id as usize].armed.as_mut() {
                        a.stale = true;
                    }
                }
            }
        }
        drop(st);
        self.send_kicks(port);
        found
    }
}

#[cfg(test)]
mod tests;
