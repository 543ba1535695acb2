//! The life of one vCPU thread under quietvm's own timers: run the guest, hand its exits to the devices,
//! and sleep while it halts, until something is due.
//!
//! The timer device owns the timer protocol (docs/architecture.md); this loop makes its three calls:
//! [`TimerDevice::before_entry`] before each `KVM_RUN` (inject the doorbell? when to kick the thread
//! out?), [`TimerDevice::halt`] at a `HLT` exit (sleep until when?) and [`TimerDevice::wake`] after the
//! sleep (why it woke, back to the guest or halt again). What stays here is what only a thread can do:
//! enter the guest, sleep in `sigwaitinfo` with its deadline timer armed, park while paused or
//! offline, and count what it did. Every real sleep is one host wakeup, counted with the cause the
//! device gives.

use std::sync::Arc;

use super::{
    begin_vcpu_run, crash_outcome, end_vcpu_run, enter_vcpu_thread, exit_stat_name,
    record_kvm_exits, GuestClock, Outcome, VcpuRunState, VmShared,
};
use crate::accounting::{KickReasons, WakeupCause};
use crate::devices::timer::{CommandEffect, HaltPlan, TimerDevice, VcpuPort, NO_DEADLINE};
use crate::devices::{DOORBELL_VECTOR, IDLE_PORT, TIMER_PORT};
use crate::stats::VcpuStats;
use crate::sys::kvm::kick::{drain_kicks, sleep_until_kicked, DeadlineTimer};
use crate::sys::kvm::vcpu::{Exit, Vcpu};
use crate::sys::os::gettid;

type Shared = VmShared<TimerDevice<GuestClock>>;

pub(super) struct VcpuThread {
    shared: Arc<Shared>,
    index: u32,
    vcpu: Vcpu,
    timer: DeadlineTimer,
    /// The guest time the deadline timer was last armed for ([`NO_DEADLINE`]: disarmed).
    armed_for: u64,
    /// This vCPU's side of the timer device.
    port: VcpuPort,
    stats: VcpuStats,
    /// Exits since the figures were last published for the live `stats` request.
    unpublished_exits: u32,
    /// The last exit's kind, port and value (for `--timeout-ms`'s report of a hung guest).
    last_exit: (&'static str, u16, u32),
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
        let port = shared.device.attach(index);
        let mut thread = VcpuThread {
            shared,
            index,
            vcpu,
            timer,
            armed_for: NO_DEADLINE,
            port,
            stats,
            unpublished_exits: 0,
            last_exit: ("none", 0, 0),
        };
        if !thread.shared.control[index as usize]
            .wanted_online
            .load(std::sync::atomic::Ordering::Acquire)
        {
            thread.offline_until_wanted(VcpuRunState::Parked);
        }
        if let Err(outcome) = thread.run_loop() {
            thread.shared.end(outcome);
        }
        if thread.shared.timed_out() {
            let (kind, port, value) = thread.last_exit;
            log::warn!(
                "timeout: vCPU {index} thread: last exit {kind} port={port:#x} value={value:#x}; {}",
                thread.vcpu.describe_state()
            );
        }
        end_vcpu_run(&thread.shared, &mut thread.stats, &kernel_at_start);
        record_kvm_exits(&thread.vcpu, &mut thread.stats);
        thread.shared.publish(&thread.stats);
        thread.stats
    }

    fn set_state(&self, state: VcpuRunState) {
        self.shared.control[self.index as usize].set_state(state);
    }

    fn run_loop(&mut self) -> Result<(), Outcome> {
        loop {
            if self.shared.stopping() {
                return Ok(());
            }
            self.shared.kicks.take(self.index);
            if self.shared.paused() {
                self.park_while(VcpuRunState::Paused, |s| s.paused());
                self.set_state(VcpuRunState::Running);
                continue;
            }
            let can_take = self.vcpu.can_take_interrupt();
            let plan = self.shared.device.before_entry(&mut self.port, can_take);
            if plan.inject_doorbell {
                self.vcpu
                    .inject(DOORBELL_VECTOR)
                    .map_err(|e| Outcome::VmmError(format!("vCPU {}: {e}", self.index)))?;
            }
            self.vcpu
                .request_interrupt_window(plan.want_interrupt_window);
            self.arm_deadline(plan.deadline);
            let exit = {
                let shared = &self.shared;
                let index = self.index;
                self.vcpu
                    .run(|port, size| shared.io_in(index, port, size))
                    .map_err(|e| Outcome::VmmError(format!("vCPU {index}: {e}")))?
            };
            log::trace!("vCPU {}: exit {exit:?}", self.index);
            self.stats.count_exit(exit_stat_name(&exit));
            self.last_exit = match exit {
                Exit::IoOut { port, value, .. } => (exit.kind(), port, value),
                Exit::IoIn { port, .. } => (exit.kind(), port, 0),
                _ => (exit.kind(), 0, 0),
            };
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
                    // Its first HLT joins it to timer expiry even if a pause or stop cuts the
                    // halt short.
                    self.shared.device.join(&mut self.port);
                    self.halt(false);
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

    /// Waits awake until guest time `at` if it is at most `halt-poll-ns` away (or until a kick, whose
    /// reasons go into `reasons`, or the VM's end), as an idle governor polls when the coming idle
    /// period is shorter than a sleep state's target residency, and as KVM polls its own halts: no
    /// host wakeup is taken for a timer due that soon (docs/performance.md, "Short halts"). Unlike
    /// KVM, which guesses, the device knows when the vCPU's next timer is due. `false`: too far off
    /// (or polling is off), nothing was done.
    fn poll_until(&mut self, at: u64, reasons: &mut KickReasons) -> bool {
        let poll = self.shared.halt_poll_ns;
        if poll == 0 || at.saturating_sub(self.shared.now()) > poll {
            return false;
        }
        // The deadline timer of the last entry would fire just after the poll: a spurious kick.
        self.arm_deadline(NO_DEADLINE);
        while self.shared.now() < at && !self.shared.stopping() {
            let kicked = self.shared.kicks.take(self.index);
            if !kicked.is_empty() {
                *reasons |= kicked;
                break;
            }
            std::hint::spin_loop();
        }
        true
    }

    /// Programs the deadline timer for guest time `at` ([`NO_DEADLINE`]: none). The same guest time
    /// again, while the timer is still ahead (or still disarmed), costs nothing: with the TSC clock
    /// each conversion to `CLOCK_MONOTONIC` gives another value, so the check is on guest time; once
    /// the timer has fired it is programmed again (and fires at once).
    fn arm_deadline(&mut self, at: u64) {
        let armed = self.timer.armed_at();
        let still_armed = if at == NO_DEADLINE {
            armed == 0
        } else {
            armed != 0 && armed > crate::sys::os::monotonic_ns()
        };
        if at == self.armed_for && still_armed {
            return;
        }
        self.armed_for = at;
        let mono = if at == NO_DEADLINE {
            0
        } else {
            self.shared.clock.host_deadline(at)
        };
        self.timer.arm_at(mono);
    }

    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        if self.shared.common_out(port, size, value) {
            return;
        }
        match port {
            IDLE_PORT if size == 4 => {
                self.stats.halts += 1;
                self.shared.device.join(&mut self.port);
                self.halt(true);
            }
            TIMER_PORT => {
                let effect = self.shared.device.command(&mut self.port, size, value);
                if effect == CommandEffect::GoOffline {
                    self.offline_until_wanted(VcpuRunState::Offline);
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

    /// Parks the thread (out of the guest, no deadline) in `state` while `still(shared)` holds and the
    /// VM runs. Every real sleep is a host wakeup with cause `control`.
    fn park_while(&mut self, state: VcpuRunState, still: impl Fn(&Shared) -> bool) {
        self.arm_deadline(NO_DEADLINE);
        self.shared.publish(&self.stats);
        self.set_state(state);
        while still(&self.shared) && !self.shared.stopping() {
            if !self.shared.kicks.take(self.index).is_empty() {
                continue;
            }
            if sleep_until_kicked() {
                self.stats.count_wakeup(WakeupCause::Control);
            }
        }
    }

    /// Parks until the API wants this vCPU online again.
    fn park_until_wanted(&mut self, state: VcpuRunState) {
        let index = self.index as usize;
        self.park_while(state, |s| {
            !s.control[index]
                .wanted_online
                .load(std::sync::atomic::Ordering::Acquire)
        });
    }

    /// Leaves the timer service (the device hands this vCPU's timers and delivery queue to another)
    /// and parks in `state` until `vcpu-online`, then comes back. Two callers: the guest's
    /// `OFFLINE_ACK` (state `Offline`; the `out` completes when the vCPU is back) and `--vcpus-online`
    /// (state `Parked`, before the vCPU's first instruction).
    fn offline_until_wanted(&mut self, state: VcpuRunState) {
        self.shared.device.go_offline(&mut self.port);
        self.park_until_wanted(state);
        if self.shared.stopping() {
            return;
        }
        self.set_state(VcpuRunState::Changing);
        self.shared.device.come_online(&mut self.port);
        self.set_state(VcpuRunState::Running);
    }

    /// The guest halted (`idle`: through the idle port, its doorbell masked): sleep until something
    /// is due for this vCPU, then return to the guest.
    fn halt(&mut self, idle: bool) {
        self.set_state(VcpuRunState::Halted);
        // Before it sleeps, as well as after: a vCPU may sleep for the VM's whole life, and a live
        // `stats` should still show what it did up to its halt.
        self.shared.publish(&self.stats);
        loop {
            if self.shared.stopping() || self.shared.paused() {
                break;
            }
            let plan = if idle {
                self.shared.device.idle(&mut self.port)
            } else {
                self.shared.device.halt(&mut self.port)
            };
            let until = match plan {
                HaltPlan::Resume => break,
                HaltPlan::Recheck => None,
                HaltPlan::Sleep { until } => Some(until),
            };
            let mut reasons = self.shared.kicks.take(self.index);
            let mut polled = false;
            let slept = match until {
                Some(at) if reasons.is_empty() => {
                    if self.poll_until(at, &mut reasons) {
                        polled = true;
                        false
                    } else {
                        self.arm_deadline(at);
                        sleep_until_kicked()
                    }
                }
                _ => false,
            };
            reasons |= self.shared.kicks.take(self.index);
            if polled {
                // The signals of kicks taken while polling: their reasons are in hand, and a kick
                // that comes after this is in the reasons the next step takes before it sleeps or
                // enters. Left pending, each would cut the next sleep or `KVM_RUN` short.
                drain_kicks();
            }
            if self.shared.stopping() {
                reasons |= KickReasons::STOP;
            }
            let wake = self.shared.device.wake(&mut self.port, slept, reasons);
            if let Some(cause) = wake.cause {
                self.stats.count_wakeup(cause);
            }
            if wake.resume_guest {
                break;
            }
        }
        self.set_state(VcpuRunState::Running);
        self.shared.publish(&self.stats);
    }
}
