//! The life of one vCPU thread: run the guest, handle its exits, inject its doorbell, and sleep while
//! it halts, until something is due.
//!
//! # The halt path
//! A `HLT` exit puts the vCPU to sleep in quietvm: [`TimerService::vcpu_halt`] (a deactivate, under
//! `pull`) says when it must wake; the thread sleeps in `sigwaitinfo` until its deadline timer or a kick
//! (another vCPU handed it work, the hierarchy moved its event, or the VM ends). On waking it runs again
//! ([`TimerService::vcpu_run`]), expires what is due, and returns to the guest with its doorbell if it
//! has work; with nothing to do it halts again without re-entering the guest. Every real sleep is one
//! host wakeup, counted with its cause.
//!
//! # Injection
//! There is no in-kernel irqchip, and the interrupt-window exit is unreliable on the project's machines
//! (kvm-here.md), so the doorbell is injected at an exit when the guest can take it; if it cannot (its
//! interrupts are off), quietvm asks for the window exit and also kicks itself shortly after, and tries
//! again at that exit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tmigr::clock::Clock;
use tmigr::service::{Expired, KTIME_MAX};

use super::kicks::{KICK_CONTROL, KICK_DELIVERY, KICK_HIERARCHY, KICK_STOP};
use super::{
    begin_vcpu_run, crash_outcome, end_vcpu_run, enter_vcpu_thread, exit_stat_name, GuestClock,
    Outcome, VmShared,
};
use crate::devices::timer::{Effects, TimerDevice};
use crate::devices::{DOORBELL_VECTOR, TIMER_PORT};
use crate::stats::{VcpuStats, WakeupCause};
use crate::sys::kvm::kick::{drain_kicks, sleep_until_kicked, DeadlineTimer};
use crate::sys::kvm::vcpu::{Exit, Vcpu};
use crate::sys::os::gettid;

/// How soon to retry a doorbell the guest could not take (interrupts off).
const DOORBELL_RETRY_NS: u64 = 200_000;

type Shared = VmShared<TimerDevice<GuestClock>>;

pub(super) struct VcpuThread {
    shared: Arc<Shared>,
    index: u32,
    vcpu: Vcpu,
    timer: DeadlineTimer,
    stats: VcpuStats,
    scratch: Vec<Expired>,
    effects: Effects,
    /// A doorbell is waiting for the guest to enable interrupts; retry at this guest time.
    doorbell_retry_at: u64,
    /// The guest has issued its first timer command or `HLT`, so it can take the doorbell
    /// (docs/timer-abi.md, "Taking part"). Until then the vCPU is idle to the timer service.
    joined_timers: bool,
    /// Exits since the figures were last published for the live `stats` request.
    unpublished_exits: u32,
}

/// Live statistics are published at every halt and at least every this many exits.
const PUBLISH_EVERY_EXITS: u32 = 64;

impl VcpuThread {
    /// Runs vCPU `index` on the calling thread until the VM ends. Returns its statistics.
    pub(super) fn run(shared: Arc<Shared>, index: u32, vcpu: Vcpu) -> VcpuStats {
        let mut stats = VcpuStats::new(index);
        stats.tid = gettid();
        let timer = match enter_vcpu_thread(&shared, index, &vcpu)
            .and_then(|()| DeadlineTimer::for_this_thread())
        {
            Ok(t) => t,
            Err(e) => {
                shared.end(Outcome::VmmError(format!("vCPU {index}: {e}")));
                shared.kicks.register(index, None);
                return stats;
            }
        };
        let kernel_at_start = begin_vcpu_run(&shared, index);
        let mut thread = VcpuThread {
            shared,
            index,
            vcpu,
            timer,
            stats,
            scratch: Vec::new(),
            effects: Effects::default(),
            doorbell_retry_at: KTIME_MAX,
            joined_timers: false,
            unpublished_exits: 0,
        };
        // Until the guest can take its doorbell it must not become a migrator and be handed other
        // vCPUs' timers: on hosts where ring 3 always runs with interrupts on, an early doorbell would
        // arrive before the guest's IDT exists.
        thread.shared.device.service().vcpu_halt(index);
        thread.apply_service_kicks();
        if !thread.shared.control[index as usize]
            .online
            .load(Ordering::Acquire)
        {
            thread.start_parked();
        }
        if let Err(outcome) = thread.run_loop() {
            thread.shared.end(outcome);
        }
        end_vcpu_run(&thread.shared, &mut thread.stats, &kernel_at_start);
        thread.shared.publish(&thread.stats);
        thread.stats
    }

    fn now(&self) -> u64 {
        self.shared.device.service().clock().now_ns()
    }

    fn run_loop(&mut self) -> Result<(), Outcome> {
        loop {
            if self.shared.stopping() {
                return Ok(());
            }
            self.shared.kicks.take(self.index);
            if self.shared.paused() {
                self.park_while(|s| s.paused());
                continue;
            }
            if self.joined_timers {
                self.expire_due();
                self.offer_doorbell()?;
                self.arm_deadline(self.shared.device.service().next_event(self.index));
            }
            let exit = {
                let shared = &self.shared;
                let index = self.index;
                self.vcpu
                    .run(|port, size| shared.io_in(index, port, size))
                    .map_err(|e| Outcome::VmmError(format!("vCPU {index}: {e}")))?
            };
            log::trace!("vCPU {}: exit {exit:?}", self.index);
            self.stats.count_exit(exit_stat_name(&exit));
            self.unpublished_exits += 1;
            if self.unpublished_exits >= PUBLISH_EVERY_EXITS {
                self.unpublished_exits = 0;
                self.shared.publish(&self.stats);
            }
            match exit {
                Exit::IoOut { port, size, value } => self.io_out(port, size, value),
                Exit::IoIn { .. } => {}
                Exit::Hlt => {
                    self.stats.halts += 1;
                    self.join_timers();
                    self.halt();
                }
                Exit::Interrupted => drain_kicks(),
                // The loop's top injects the waiting doorbell.
                Exit::InterruptWindow => {}
                crash => {
                    return Err(
                        crash_outcome(self.index, &crash, &self.vcpu).unwrap_or_else(|| {
                            Outcome::GuestCrash(format!(
                                "vCPU {}: unexpected exit {crash:?}",
                                self.index
                            ))
                        }),
                    )
                }
            }
        }
    }

    /// Programs the deadline timer for guest time `at` (`KTIME_MAX`: no deadline), also covering a
    /// pending doorbell retry.
    fn arm_deadline(&mut self, at: u64) {
        let at = at.min(self.doorbell_retry_at);
        let mono = if at == KTIME_MAX {
            0
        } else {
            self.shared.clock_start_mono + at
        };
        self.timer.arm_at(mono);
    }

    fn expire_due(&mut self) -> (u32, u32, u32) {
        let found = self
            .shared
            .device
            .expire_due(self.index, &mut self.scratch, &mut self.effects);
        self.apply_effects();
        found
    }

    fn apply_service_kicks(&mut self) {
        self.shared
            .device
            .service()
            .take_kicks(&mut self.effects.recheck);
        self.apply_effects();
    }

    /// The guest is ready for timers: it becomes a running vCPU of the timer service.
    fn join_timers(&mut self) {
        if !self.joined_timers {
            self.joined_timers = true;
            self.shared.device.service().vcpu_run(self.index);
        }
    }

    fn apply_effects(&mut self) {
        for cpu in self.effects.deliver.drain(..) {
            self.shared.kicks.kick(cpu, KICK_DELIVERY);
        }
        for cpu in self.effects.recheck.drain(..) {
            // This thread re-reads its own next event before it enters the guest or sleeps anyway.
            if cpu != self.index {
                self.shared.kicks.kick(cpu, KICK_HIERARCHY);
            }
        }
    }

    /// Injects the doorbell if the guest has timers waiting and can take it now.
    fn offer_doorbell(&mut self) -> Result<(), Outcome> {
        if !self.shared.device.doorbell_due(self.index) {
            self.doorbell_retry_at = KTIME_MAX;
            return Ok(());
        }
        if self.vcpu.can_take_interrupt() {
            self.vcpu
                .inject(DOORBELL_VECTOR)
                .map_err(|e| Outcome::VmmError(format!("vCPU {}: {e}", self.index)))?;
            self.shared.device.doorbell_injected(self.index);
            self.vcpu.request_interrupt_window(false);
            self.doorbell_retry_at = KTIME_MAX;
        } else {
            self.vcpu.request_interrupt_window(true);
            self.doorbell_retry_at = self.now() + DOORBELL_RETRY_NS;
        }
        Ok(())
    }

    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        if self.shared.common_out(port, size, value) {
            return;
        }
        match port {
            TIMER_PORT => {
                self.join_timers();
                self.shared
                    .device
                    .command(self.index, size, value, &mut self.effects);
                self.apply_effects();
                if std::mem::take(&mut self.effects.go_offline) {
                    self.go_offline();
                }
            }
            _ => {
                log::debug!(
                    "vCPU {}: out {value:#x} to unknown port {port:#x}",
                    self.index
                );
            }
        }
    }

    /// Parks the thread (out of the guest, no deadline) while `still(shared)` holds and the VM runs.
    /// Every real sleep is a host wakeup with cause `control`.
    fn park_while(&mut self, still: impl Fn(&Shared) -> bool) {
        let control = &self.shared.control[self.index as usize];
        self.timer.arm_at(0);
        self.shared.publish(&self.stats);
        control.parked.store(true, Ordering::Release);
        while still(&self.shared) && !self.shared.stopping() {
            if self.shared.kicks.take(self.index) != 0 {
                continue;
            }
            if sleep_until_kicked() {
                self.stats.count_wakeup(WakeupCause::Control);
            }
        }
        control.parked.store(false, Ordering::Release);
    }

    /// The guest acknowledged an offline request (`OFFLINE_ACK`): leave the timer service (its timers
    /// go to another vCPU; if it was the last active one with movable events pending, another is made
    /// active), hand over its delivery queue, and park until `vcpu-online`. The `out` completes when
    /// it is back.
    fn go_offline(&mut self) {
        let index = self.index;
        let service = self.shared.device.service();
        // The recipient the service names (the last-active hand-off) is also in its kick list.
        let _forced_active = service.vcpu_offline(index);
        self.shared.device.take_offline(index, 0, &mut self.effects);
        self.apply_service_kicks();
        self.shared.control[index as usize]
            .online
            .store(false, Ordering::Release);
        self.park_while(|s| {
            !s.control[index as usize]
                .wanted_online
                .load(Ordering::Acquire)
        });
        if self.shared.stopping() {
            return;
        }
        self.come_online(true);
    }

    /// Rejoins the timer service (the hierarchy grows if needed) and, if the guest was running, tells
    /// it through `control` and its doorbell.
    fn come_online(&mut self, tell_guest: bool) {
        let index = self.index;
        let service = self.shared.device.service();
        service.vcpu_online(index);
        if !self.joined_timers {
            // Idle to the service until the guest can take its doorbell (see `run`).
            service.vcpu_halt(index);
        }
        self.apply_service_kicks();
        self.shared.device.bring_online(index, tell_guest);
        self.shared.control[index as usize]
            .online
            .store(true, Ordering::Release);
    }

    /// `--vcpus-online`: this vCPU starts parked, before its first instruction, until `vcpu-online`.
    fn start_parked(&mut self) {
        let index = self.index;
        self.shared.device.service().vcpu_offline(index);
        self.shared.device.take_offline(index, 0, &mut self.effects);
        self.apply_service_kicks();
        self.park_while(|s| {
            !s.control[index as usize]
                .wanted_online
                .load(Ordering::Acquire)
        });
        if !self.shared.stopping() {
            self.come_online(false);
        }
    }

    /// The guest halted: sleep until something is due for this vCPU, then return to the guest.
    fn halt(&mut self) {
        let shared = Arc::clone(&self.shared);
        let service = shared.device.service();
        loop {
            if self.shared.stopping()
                || self.shared.paused()
                || self.shared.device.doorbell_due(self.index)
            {
                self.shared.publish(&self.stats);
                return;
            }
            let wake_at = service.vcpu_halt(self.index);
            self.apply_service_kicks();

            let reasons = self.shared.kicks.take(self.index);
            let slept = if reasons == 0 && wake_at > self.now() {
                self.arm_deadline(wake_at);
                sleep_until_kicked()
            } else {
                false
            };
            let reasons = reasons | self.shared.kicks.take(self.index);

            service.vcpu_run(self.index);
            let (own_pinned, own_movable, remote) = self.expire_due();
            let has_work = self.shared.device.doorbell_due(self.index);
            if slept {
                let cause = if reasons & (KICK_STOP | KICK_CONTROL) != 0 || self.shared.stopping() {
                    WakeupCause::Control
                } else if own_pinned > 0 {
                    WakeupCause::OwnPinnedTimer
                } else if own_movable > 0 {
                    WakeupCause::OwnMovableTimer
                } else if remote > 0 {
                    WakeupCause::RemoteMovableTimer
                } else if has_work || reasons & KICK_DELIVERY != 0 {
                    WakeupCause::Interrupt
                } else if reasons & KICK_HIERARCHY != 0 {
                    WakeupCause::MigratorKick
                } else {
                    WakeupCause::Spurious
                };
                self.stats.count_wakeup(cause);
            }
            if has_work {
                self.shared.device.woke_from_halt(self.index);
                return;
            }
        }
    }
}
