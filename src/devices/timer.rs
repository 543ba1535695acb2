//! The paravirtual timer device (docs/timer-abi.md): the guest-facing state machine of every timer
//! (pending, delivered, running), serialization of callbacks, and the per-vCPU delivery queues.
//!
//! *Where* a timer's expiry is handled (its owner, a push target, or a pull migrator) is decided by
//! [`tmigr::service::TimerService`], which this device drives; the device decides *what the guest
//! sees*: it hands each expired timer to a vCPU's delivery queue, raises that vCPU's doorbell, and holds
//! an expiry back while the timer's previous callback still runs elsewhere.
//!
//! # Locking
//! One lock ([`TimerDevice::state`], a [`NoSleepMutex`]) covers the per-timer slots and the per-vCPU queues, and is held
//! across the calls into the service, so a timer's slot and its place in the service never disagree.
//! Lock order: device state, then the service's own locks. The service never calls back into the device.

use std::collections::VecDeque;

use tmigr::clock::Clock;
use tmigr::service::{CpuId, Expired, TimerId, TimerKind, TimerService};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::sync::NoSleepMutex;

/// Command numbers, statuses and device-page offsets of docs/timer-abi.md: the guest ABI's.
pub use quietvm_abi::timer as abi;

/// What the vCPU loop must do after a device access: kick other vCPUs.
#[derive(Debug, Default)]
pub struct Effects {
    /// vCPUs that were handed a timer to run (their doorbell is due).
    pub deliver: Vec<CpuId>,
    /// vCPUs the timer service asked to re-read their next event.
    pub recheck: Vec<CpuId>,
    /// The guest acknowledged an offline request: the vCPU must leave now (`OFFLINE_ACK`).
    pub go_offline: bool,
}

#[derive(Debug, Clone, Copy)]
struct Arming {
    deadline: u64,
    /// The vCPU that issued the `ARM`: the timer's owner, reported as `exp_owner`.
    armed_by: CpuId,
}

/// The guest-visible state of one timer id.
#[derive(Debug, Default)]
struct TimerSlot {
    /// The pending arming (queued in the service, delivered, or held), if any.
    armed: Option<Arming>,
    /// The vCPU whose delivery queue holds the expired arming.
    delivered_to: Option<CpuId>,
    /// An expiry held back until the running callback ends.
    held: Option<Expired>,
    /// The vCPU running this timer's callback.
    running_on: Option<CpuId>,
}

/// One vCPU's side of the device.
#[derive(Debug)]
struct VcpuSide {
    queue: VecDeque<Expired>,
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
    last_status: u32,
    fired: u64,
    remote_expiries: u64,
}

struct DeviceState {
    timers: Vec<TimerSlot>,
    vcpus: Vec<VcpuSide>,
    armed: u64,
    fired: u64,
    cancelled: u64,
    early: u64,
    remote_expiries: u64,
    serialized: u64,
    lateness: Vec<u64>,
}

/// Lateness samples reserved at start (8 MiB of address space).
const LATENESS_SAMPLES_RESERVED: usize = 1 << 20;

/// Figures the device counted, for the statistics.
#[derive(Debug, Default, Clone)]
pub struct DeviceCounters {
    pub armed: u64,
    pub fired: u64,
    pub cancelled: u64,
    pub early: u64,
    pub missed: u64,
    pub remote_expiries: u64,
    pub serialized: u64,
    pub lateness: Vec<u64>,
    pub fired_per_vcpu: Vec<u64>,
    pub remote_per_vcpu: Vec<u64>,
}

/// The timer device of one VM.
pub struct TimerDevice<C: Clock> {
    service: TimerService<C>,
    memory: GuestMemoryMmap,
    device_pages: u64,
    state: NoSleepMutex<DeviceState>,
}

impl<C: Clock> TimerDevice<C> {
    /// A device for `vcpus` vCPUs whose pages start at guest address `device_pages`.
    pub fn new(
        service: TimerService<C>,
        memory: GuestMemoryMmap,
        device_pages: u64,
        vcpus: u32,
        max_timers: u32,
    ) -> Self {
        let state = DeviceState {
            timers: (0..max_timers).map(|_| TimerSlot::default()).collect(),
            vcpus: (0..vcpus)
                .map(|_| VcpuSide {
                    queue: VecDeque::new(),
                    in_flight: None,
                    doorbell_armed: true,
                    in_wake_handler: false,
                    online: true,
                    offline_requested: false,
                    control_pending: false,
                    last_status: abi::OK,
                    fired: 0,
                    remote_expiries: 0,
                })
                .collect(),
            armed: 0,
            fired: 0,
            cancelled: 0,
            early: 0,
            remote_expiries: 0,
            serialized: 0,
            // Reserved up front (untouched pages cost nothing): growing it mid-run would remap memory
            // under mmap_lock, which stalls, and may put to sleep, vCPU threads faulting in guest pages.
            lateness: Vec::with_capacity(LATENESS_SAMPLES_RESERVED),
        };
        TimerDevice {
            service,
            memory,
            device_pages,
            state: NoSleepMutex::new(state),
        }
    }

    /// The timer service (placement policy and hierarchy).
    pub fn service(&self) -> &TimerService<C> {
        &self.service
    }

    fn lock(&self) -> spin::mutex::SpinMutexGuard<'_, DeviceState, spin::relax::Yield> {
        self.state.lock()
    }

    fn page(&self, cpu: CpuId) -> u64 {
        self.device_pages + abi::DEVICE_PAGE_SIZE * u64::from(cpu)
    }

    fn read_u32(&self, cpu: CpuId, off: u64) -> u32 {
        self.memory
            .read_obj(GuestAddress(self.page(cpu) + off))
            .unwrap_or(0)
    }

    fn read_u64(&self, cpu: CpuId, off: u64) -> u64 {
        self.memory
            .read_obj(GuestAddress(self.page(cpu) + off))
            .unwrap_or(0)
    }

    fn write<T: vm_memory::ByteValued>(&self, cpu: CpuId, off: u64, v: T) {
        // The pages lie inside guest memory by construction (vmm::layout); a failure cannot happen.
        let _ = self.memory.write_obj(v, GuestAddress(self.page(cpu) + off));
    }

    /// A guest `out` to the command port from `cpu`.
    pub fn command(&self, cpu: CpuId, size: u8, cmd: u32, effects: &mut Effects) {
        let mut st = self.lock();
        // Read under the lock: waiting for it can take milliseconds on an oversubscribed host, while
        // another vCPU expires timers at a later time; a time read before the wait would make a timer
        // handed over now look as if it fired before its deadline.
        let now = self.service.clock().now_ns();
        let (status, value) = if size != 4 {
            (abi::BAD_ACCESS, 0)
        } else {
            match cmd {
                abi::CMD_NOW => (abi::OK, now),
                abi::CMD_ARM => self.arm(&mut st, cpu, now, effects),
                abi::CMD_CANCEL => {
                    let id = self.read_u32(cpu, abi::OFF_ID);
                    match self.cancel(&mut st, id) {
                        Some(was) => (abi::OK, was as u64),
                        None => (abi::INVALID, 0),
                    }
                }
                abi::CMD_CANCEL_SYNC => {
                    let id = self.read_u32(cpu, abi::OFF_ID);
                    match self.cancel(&mut st, id) {
                        Some(was) => match st.timers[id as usize].running_on {
                            Some(r) if r == cpu => (abi::DEADLOCK, was as u64),
                            Some(_) => (abi::RUNNING, was as u64),
                            None => (abi::OK, was as u64),
                        },
                        None => (abi::INVALID, 0),
                    }
                }
                abi::CMD_POP => self.pop(&mut st, cpu, now, effects),
                abi::CMD_ACK => {
                    let id = self.read_u32(cpu, abi::OFF_ID);
                    (self.end_callback(&mut st, cpu, id, effects), 0)
                }
                abi::CMD_OFFLINE_ACK => {
                    let side = &st.vcpus[cpu as usize];
                    if !side.offline_requested {
                        (abi::INVALID, 0)
                    } else if side.in_flight.is_some() {
                        (abi::BAD_ACK, 0)
                    } else {
                        effects.go_offline = true;
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
        self.collect_service_kicks(effects);
    }

    /// A guest `in` from the command port: the status of this vCPU's last command.
    pub fn last_status(&self, cpu: CpuId) -> u32 {
        self.lock().vcpus[cpu as usize].last_status
    }

    fn collect_service_kicks(&self, effects: &mut Effects) {
        self.service.take_kicks(&mut effects.recheck);
    }

    fn arm(&self, st: &mut DeviceState, cpu: CpuId, now: u64, effects: &mut Effects) -> (u32, u64) {
        let id = self.read_u32(cpu, abi::OFF_ID);
        let flags = self.read_u32(cpu, abi::OFF_FLAGS);
        let deadline = self.read_u64(cpu, abi::OFF_DEADLINE);
        let kind = match flags {
            abi::FLAG_PINNED => TimerKind::Pinned,
            abi::FLAG_MOVABLE => TimerKind::Movable,
            _ => return (abi::INVALID, 0),
        };
        if id as usize >= st.timers.len() {
            return (abi::INVALID, 0);
        }
        if deadline <= now {
            return (abi::PAST, 0);
        }
        let mut was_pending = Self::unqueue_delivered(st, id);
        let slot = &mut st.timers[id as usize];
        was_pending |= slot.held.take().is_some();
        was_pending |= self.service.arm(cpu, id, deadline, kind);
        slot.armed = Some(Arming {
            deadline,
            armed_by: cpu,
        });
        st.armed += 1;
        let _ = effects;
        (abi::OK, was_pending as u64)
    }

    /// Removes an expired-but-not-popped arming from the delivery queue it waits in.
    fn unqueue_delivered(st: &mut DeviceState, id: TimerId) -> bool {
        match st.timers[id as usize].delivered_to.take() {
            Some(q) => {
                st.vcpus[q as usize].queue.retain(|e| e.id != id);
                true
            }
            None => false,
        }
    }

    /// Cancels `id` wherever its arming is; `None` for an unknown id.
    fn cancel(&self, st: &mut DeviceState, id: TimerId) -> Option<bool> {
        if id as usize >= st.timers.len() {
            return None;
        }
        let mut was_pending = Self::unqueue_delivered(st, id);
        let slot = &mut st.timers[id as usize];
        was_pending |= slot.held.take().is_some();
        was_pending |= self.service.cancel(id);
        slot.armed = None;
        if was_pending {
            st.cancelled += 1;
        }
        Some(was_pending)
    }

    /// Ends the callback `cpu` runs, if `id` names it; releases an expiry held back for it.
    fn end_callback(
        &self,
        st: &mut DeviceState,
        cpu: CpuId,
        id: TimerId,
        effects: &mut Effects,
    ) -> u32 {
        let side = &mut st.vcpus[cpu as usize];
        match side.in_flight {
            Some(t) if t == id => {
                side.in_flight = None;
                let slot = &mut st.timers[t as usize];
                slot.running_on = None;
                if let Some(e) = slot.held.take() {
                    // A pinned timer fires on its owner (if that is still online); a movable one
                    // right here, on a running vCPU.
                    let target = if e.kind == TimerKind::Pinned && st.vcpus[e.owner as usize].online
                    {
                        e.owner
                    } else {
                        cpu
                    };
                    Self::enqueue(st, target, e);
                    if target != cpu {
                        effects.deliver.push(target);
                    }
                }
                abi::OK
            }
            None if id == abi::NO_TIMER => abi::OK,
            _ => abi::BAD_ACK,
        }
    }

    fn enqueue(st: &mut DeviceState, target: CpuId, e: Expired) {
        st.timers[e.id as usize].delivered_to = Some(target);
        st.vcpus[target as usize].queue.push_back(e);
    }

    fn pop(&self, st: &mut DeviceState, cpu: CpuId, now: u64, effects: &mut Effects) -> (u32, u64) {
        let ack = self.read_u32(cpu, abi::OFF_ID);
        let status = self.end_callback(st, cpu, ack, effects);
        if status != abi::OK {
            return (status, 0);
        }
        let side = &mut st.vcpus[cpu as usize];
        let Some(e) = side.queue.pop_front() else {
            side.doorbell_armed = true;
            if side.in_wake_handler {
                side.in_wake_handler = false;
                self.service.set_push_idle(cpu, false);
            }
            return (abi::EMPTY, 0);
        };
        side.in_flight = Some(e.id);
        side.fired += 1;
        let slot = &mut st.timers[e.id as usize];
        let owner = slot.armed.map_or(e.owner, |a| a.armed_by);
        slot.delivered_to = None;
        slot.armed = None;
        slot.running_on = Some(cpu);
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
        st.lateness.push(now.saturating_sub(e.deadline));
        self.write(cpu, abi::OFF_EXP_ID, e.id);
        self.write(cpu, abi::OFF_EXP_OWNER, owner);
        self.write(cpu, abi::OFF_EXP_DEADLINE, e.deadline);
        self.write(cpu, abi::OFF_EXP_FIRED_AT, now);
        (abi::OK, 0)
    }

    /// Moves every timer that `cpu` (running) must expire now into delivery queues. Returns what the
    /// expiry found, for wake-up accounting: (own pinned, own movable, remote movable) counts.
    pub fn expire_due(
        &self,
        cpu: CpuId,
        scratch: &mut Vec<Expired>,
        effects: &mut Effects,
    ) -> (u32, u32, u32) {
        scratch.clear();
        let mut st = self.lock();
        self.service.expire(cpu, scratch);
        let mut found = (0, 0, 0);
        for e in scratch.drain(..) {
            match (e.owner == cpu, e.kind) {
                (true, TimerKind::Pinned) => found.0 += 1,
                (true, TimerKind::Movable) => found.1 += 1,
                (false, _) => found.2 += 1,
            }
            let slot = &mut st.timers[e.id as usize];
            if slot.running_on.is_some() {
                // Serialization: the previous callback of this timer still runs somewhere.
                slot.held = Some(e);
                st.serialized += 1;
            } else {
                Self::enqueue(&mut st, cpu, e);
            }
        }
        drop(st);
        self.collect_service_kicks(effects);
        found
    }

    /// Whether `cpu` should get its doorbell now (expired timers wait and none was injected since the
    /// guest last emptied its queue).
    pub fn doorbell_due(&self, cpu: CpuId) -> bool {
        let st = self.lock();
        let side = &st.vcpus[cpu as usize];
        side.control_pending || (side.doorbell_armed && !side.queue.is_empty())
    }

    /// Records that the doorbell was injected into `cpu`.
    pub fn doorbell_injected(&self, cpu: CpuId) {
        let mut st = self.lock();
        let side = &mut st.vcpus[cpu as usize];
        side.doorbell_armed = false;
        side.control_pending = false;
    }

    fn set_control(&self, st: &mut DeviceState, cpu: CpuId, value: u32) {
        st.vcpus[cpu as usize].control_pending = value != abi::CONTROL_NONE;
        self.write(cpu, abi::OFF_CONTROL, value);
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

    /// `cpu` leaves (after its `OFFLINE_ACK`): the expired timers waiting in its delivery queue go to
    /// `to`, and it gets no deliveries until it is back. The timer service moves its queued timers.
    pub fn take_offline(&self, cpu: CpuId, to: CpuId, effects: &mut Effects) {
        let mut st = self.lock();
        let side = &mut st.vcpus[cpu as usize];
        side.online = false;
        side.offline_requested = false;
        side.doorbell_armed = true;
        let moved: Vec<Expired> = side.queue.drain(..).collect();
        if !moved.is_empty() {
            for e in moved {
                Self::enqueue(&mut st, to, e);
            }
            effects.deliver.push(to);
        }
    }

    /// `cpu` is back online; a guest that was running is told through `control` and its doorbell
    /// (`tell_guest`), one that has not started yet (`--vcpus-online`) is not.
    pub fn bring_online(&self, cpu: CpuId, tell_guest: bool) {
        let mut st = self.lock();
        st.vcpus[cpu as usize].online = true;
        if tell_guest {
            self.set_control(&mut st, cpu, abi::CONTROL_ONLINE);
        }
    }

    /// `cpu` was woken from a halt with work to do: until it empties its queue it counts as idle for
    /// `push` (the kernel's "timer armed from an interrupt in the idle task").
    pub fn woke_from_halt(&self, cpu: CpuId) {
        let mut st = self.lock();
        st.vcpus[cpu as usize].in_wake_handler = true;
        self.service.set_push_idle(cpu, true);
    }

    /// The counters, with `missed` computed at `now` (the VM's end).
    pub fn counters(&self, now: u64) -> DeviceCounters {
        let st = self.lock();
        DeviceCounters {
            armed: st.armed,
            fired: st.fired,
            cancelled: st.cancelled,
            early: st.early,
            missed: st
                .timers
                .iter()
                .filter(|t| t.armed.is_some_and(|a| a.deadline < now))
                .count() as u64,
            remote_expiries: st.remote_expiries,
            serialized: st.serialized,
            lateness: st.lateness.clone(),
            fired_per_vcpu: st.vcpus.iter().map(|v| v.fired).collect(),
            remote_per_vcpu: st.vcpus.iter().map(|v| v.remote_expiries).collect(),
        }
    }
}
