//! The timer device without KVM: a fake clock, anonymous guest memory, and a kicker that records.
//! Each test plays the guest (writes the device page, issues commands) and the vCPU threads (the halt
//! protocol's three calls) by hand, so every interleaving is chosen, not hoped for.

use std::sync::{Arc, Mutex};

use tmigr::clock::FakeClock;
use tmigr::service::{Policy, ServiceConfig, TimerService};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::abi;
use super::*;

const PAGES: u64 = 0x10000;
/// The state words (16 timers), well clear of the device pages.
const STATES: u64 = 0x80000;

#[derive(Default)]
struct RecordingKicker {
    kicks: Mutex<Vec<(CpuId, KickReasons)>>,
}

impl VcpuKicker for RecordingKicker {
    fn kick(&self, cpu: CpuId, why: KickReasons) {
        self.kicks.lock().unwrap().push((cpu, why));
    }
}

impl RecordingKicker {
    fn take(&self) -> Vec<(CpuId, KickReasons)> {
        std::mem::take(&mut *self.kicks.lock().unwrap())
    }
}

struct Vm {
    dev: TimerDevice<Arc<FakeClock>>,
    clock: Arc<FakeClock>,
    mem: GuestMemoryMmap,
    ports: Vec<VcpuPort>,
    kicker: Arc<RecordingKicker>,
}

impl Vm {
    fn new(policy: Policy, vcpus: u32) -> Self {
        let clock = Arc::new(FakeClock::new(1_000));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let service = TimerService::new(
            ServiceConfig {
                policy,
                max_timers: 16,
                max_cpus: Some(vcpus),
                ..ServiceConfig::default()
            },
            Arc::clone(&clock),
            vcpus,
        );
        let kicker = Arc::new(RecordingKicker::default());
        let dev = TimerDevice::new(
            service,
            mem.clone(),
            PAGES,
            STATES,
            vcpus,
            Arc::clone(&kicker) as Arc<dyn VcpuKicker>,
        );
        let ports = (0..vcpus).map(|c| dev.attach(c)).collect();
        Vm {
            dev,
            clock,
            mem,
            ports,
            kicker,
        }
    }

    fn put<T: vm_memory::ByteValued>(&self, cpu: CpuId, off: u64, v: T) {
        self.mem
            .write_obj(
                v,
                GuestAddress(PAGES + abi::DEVICE_PAGE_SIZE * u64::from(cpu) + off),
            )
            .unwrap();
    }

    fn get_u32(&self, cpu: CpuId, off: u64) -> u32 {
        self.mem
            .read_obj(GuestAddress(
                PAGES + abi::DEVICE_PAGE_SIZE * u64::from(cpu) + off,
            ))
            .unwrap()
    }

    fn get_u64(&self, cpu: CpuId, off: u64) -> u64 {
        self.mem
            .read_obj(GuestAddress(
                PAGES + abi::DEVICE_PAGE_SIZE * u64::from(cpu) + off,
            ))
            .unwrap()
    }

    /// Issues `cmd` from `cpu` (a 32-bit `out`) and returns (status, value).
    fn cmd(&mut self, cpu: CpuId, cmd: u32) -> (u32, u64) {
        let effect = self.dev.command(&mut self.ports[cpu as usize], 4, cmd);
        assert_eq!(effect, CommandEffect::None);
        (
            self.get_u32(cpu, abi::OFF_STATUS),
            self.get_u64(cpu, abi::OFF_VALUE),
        )
    }

    fn arm(&mut self, cpu: CpuId, id: u32, flags: u32, deadline: u64) -> (u32, u64) {
        self.arm_slack(cpu, id, flags, deadline, 0)
    }

    fn arm_slack(
        &mut self,
        cpu: CpuId,
        id: u32,
        flags: u32,
        deadline: u64,
        slack: u64,
    ) -> (u32, u64) {
        self.put(cpu, abi::OFF_ID, id);
        self.put(cpu, abi::OFF_FLAGS, flags);
        self.put(cpu, abi::OFF_DEADLINE, deadline);
        self.put(cpu, abi::OFF_SLACK, slack);
        self.cmd(cpu, abi::CMD_ARM)
    }

    fn cancel(&mut self, cpu: CpuId, id: u32, sync: bool) -> (u32, u64) {
        self.put(cpu, abi::OFF_ID, id);
        self.cmd(
            cpu,
            if sync {
                abi::CMD_CANCEL_SYNC
            } else {
                abi::CMD_CANCEL
            },
        )
    }

    /// `POP`, acknowledging `ack` (`NO_TIMER`: nothing): the popped timer's id, or `None` if empty.
    fn pop(&mut self, cpu: CpuId, ack: u32) -> Option<u32> {
        self.put(cpu, abi::OFF_ID, ack);
        match self.cmd(cpu, abi::CMD_POP).0 {
            abi::OK => Some(self.get_u32(cpu, abi::OFF_EXP_ID)),
            abi::EMPTY => None,
            other => panic!("POP status {other}"),
        }
    }

    fn entry(&mut self, cpu: CpuId) -> EntryPlan {
        self.dev.before_entry(&mut self.ports[cpu as usize], true)
    }

    fn halt(&mut self, cpu: CpuId) -> HaltPlan {
        self.dev.halt(&mut self.ports[cpu as usize])
    }

    fn wake(&mut self, cpu: CpuId, reasons: KickReasons) -> Wake {
        self.dev.wake(&mut self.ports[cpu as usize], true, reasons)
    }
}

#[test]
fn an_arming_fires_once_at_its_deadline_never_early() {
    let mut vm = Vm::new(Policy::Pull, 1);
    assert_eq!(vm.arm(0, 3, abi::FLAG_PINNED, 5_000), (abi::OK, 0));
    let plan = vm.entry(0);
    assert!(!plan.inject_doorbell);
    assert_eq!(plan.deadline, 5_000);
    vm.clock.set(4_999);
    assert!(!vm.entry(0).inject_doorbell, "nothing before the deadline");
    vm.clock.set(5_200);
    assert!(vm.entry(0).inject_doorbell);
    assert!(
        !vm.entry(0).inject_doorbell,
        "one doorbell until the queue is empty"
    );
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(3));
    assert_eq!(vm.get_u64(0, abi::OFF_EXP_DEADLINE), 5_000);
    assert_eq!(vm.get_u64(0, abi::OFF_EXP_FIRED_AT), 5_200);
    assert_eq!(vm.get_u32(0, abi::OFF_EXP_OWNER), 0);
    assert_eq!(vm.pop(0, 3), None);
    let t = vm.dev.timer_stats(10_000);
    assert_eq!((t.armed, t.fired, t.early, t.missed), (1, 1, 0, 0));
    assert_eq!((t.lateness_ns.p50, t.lateness_ns.max), (200, 200));
    assert_eq!(vm.dev.vcpu_timer_counts(0), (1, 0));
}

#[test]
fn bad_commands_get_their_status_and_change_nothing() {
    let mut vm = Vm::new(Policy::Local, 1);
    assert_eq!(vm.arm(0, 99, abi::FLAG_PINNED, 5_000).0, abi::INVALID);
    assert_eq!(vm.arm(0, 1, 7, 5_000).0, abi::INVALID);
    assert_eq!(vm.arm(0, 1, abi::FLAG_MOVABLE, 1_000).0, abi::PAST);
    assert_eq!(vm.cancel(0, 99, false).0, abi::INVALID);
    assert_eq!(vm.cmd(0, 0xdead).0, abi::UNKNOWN_COMMAND);
    vm.put(0, abi::OFF_ID, 5u32);
    assert_eq!(vm.cmd(0, abi::CMD_ACK).0, abi::BAD_ACK);
    assert_eq!(
        vm.cmd(0, abi::CMD_OFFLINE_ACK).0,
        abi::INVALID,
        "no offline request"
    );
    let effect = vm.dev.command(&mut vm.ports[0], 2, abi::CMD_NOW);
    assert_eq!(effect, CommandEffect::None);
    assert_eq!(vm.get_u32(0, abi::OFF_STATUS), abi::BAD_ACCESS);
    assert_eq!(vm.dev.last_status(0), abi::BAD_ACCESS);
    assert_eq!(vm.dev.timer_stats(10_000).armed, 0);
}

#[test]
fn a_rearm_while_the_callback_runs_is_held_until_its_ack() {
    let mut vm = Vm::new(Policy::Local, 2);
    assert_eq!(vm.arm(0, 1, abi::FLAG_MOVABLE, 2_000).0, abi::OK);
    vm.clock.set(2_000);
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(1));
    // vCPU 1 re-arms timer 1 while its callback still runs on vCPU 0.
    assert_eq!(vm.arm(1, 1, abi::FLAG_MOVABLE, 3_000), (abi::OK, 0));
    vm.clock.set(3_000);
    assert!(
        !vm.entry(1).inject_doorbell,
        "held back: the previous callback still runs on vCPU 0"
    );
    assert_eq!(vm.dev.timer_stats(3_000).serialized, 1);
    assert_eq!(vm.pop(1, abi::NO_TIMER), None);
    // The ACK on vCPU 0 releases it there (a movable timer fires on the vCPU that ended it).
    assert_eq!(vm.pop(0, 1), Some(1));
    assert_eq!(vm.get_u32(0, abi::OFF_EXP_OWNER), 1);
    assert_eq!(vm.pop(0, 1), None);
    let t = vm.dev.timer_stats(10_000);
    assert_eq!((t.fired, t.remote_expiries, t.early), (2, 1, 0));
}

#[test]
fn cancel_sync_says_running_until_no_callback_runs() {
    let mut vm = Vm::new(Policy::Local, 2);
    vm.arm(0, 4, abi::FLAG_PINNED, 2_000);
    vm.clock.set(2_500);
    vm.entry(0);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(4));
    assert_eq!(vm.cancel(1, 4, true), (abi::RUNNING, 0));
    assert_eq!(
        vm.cancel(0, 4, true),
        (abi::DEADLOCK, 0),
        "from its own callback"
    );
    assert_eq!(vm.pop(0, 4), None);
    assert_eq!(vm.cancel(1, 4, true), (abi::OK, 0));
}

#[test]
fn cancel_against_expiry_fires_exactly_once_or_not_at_all() {
    let mut vm = Vm::new(Policy::Local, 2);
    vm.arm(0, 2, abi::FLAG_MOVABLE, 2_000);
    vm.clock.set(2_000);
    // Expired into vCPU 0's delivery queue but not popped: the cancel still stops it.
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.cancel(1, 2, false), (abi::OK, 1));
    assert_eq!(vm.pop(0, abi::NO_TIMER), None);
    // Once popped, a cancel says it was no longer pending.
    vm.arm(0, 2, abi::FLAG_MOVABLE, 3_000);
    vm.clock.set(3_000);
    vm.entry(0);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(2));
    assert_eq!(vm.cancel(1, 2, false), (abi::OK, 0));
    let t = vm.dev.timer_stats(10_000);
    assert_eq!((t.fired, t.cancelled, t.missed), (1, 1, 0));
}

#[test]
fn a_halted_vcpu_sleeps_to_its_pinned_timer_and_learns_why_it_woke() {
    let mut vm = Vm::new(Policy::Pull, 1);
    vm.arm(0, 0, abi::FLAG_PINNED, 4_000);
    assert_eq!(vm.halt(0), HaltPlan::Sleep { until: 4_000 });
    vm.clock.set(4_100);
    let w = vm.wake(0, KickReasons::NONE);
    assert_eq!(w.cause, Some(WakeupCause::OwnPinnedTimer));
    assert!(w.resume_guest);
    assert_eq!(vm.halt(0), HaltPlan::Resume, "its doorbell is due");
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(0));
    assert_eq!(vm.pop(0, 0), None);
    assert_eq!(vm.halt(0), HaltPlan::Sleep { until: NO_DEADLINE });
    let w = vm.wake(0, KickReasons::STOP);
    assert_eq!(w.cause, Some(WakeupCause::Control));
    assert!(!w.resume_guest);
}

#[test]
fn under_pull_a_running_vcpu_expires_a_halted_ones_movable_timer() {
    let mut vm = Vm::new(Policy::Pull, 2);
    // Both join; vCPU 1 arms a movable timer and halts, vCPU 0 keeps running.
    vm.entry(0);
    vm.cmd(0, abi::CMD_NOW);
    vm.arm(1, 6, abi::FLAG_MOVABLE, 8_000);
    assert_eq!(
        vm.halt(1),
        HaltPlan::Sleep { until: NO_DEADLINE },
        "its movable timer is the migrator's"
    );
    vm.kicker.take();
    assert_eq!(vm.entry(0).deadline, 8_000);
    vm.clock.set(8_050);
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(6));
    assert_eq!(vm.get_u32(0, abi::OFF_EXP_OWNER), 1);
    assert_eq!(vm.dev.vcpu_timer_counts(0), (1, 1));
    assert!(
        vm.kicker.take().iter().all(|&(c, _)| c != 1),
        "the halted vCPU was not woken"
    );
}

#[test]
fn an_offlined_vcpu_hands_its_delivery_queue_and_timers_to_another() {
    let mut vm = Vm::new(Policy::Pull, 3);
    for c in 0..3 {
        vm.cmd(c, abi::CMD_NOW); // every guest has joined
    }
    vm.arm(2, 1, abi::FLAG_MOVABLE, 2_000);
    vm.arm(2, 2, abi::FLAG_PINNED, 9_000);
    vm.clock.set(2_000);
    assert!(
        vm.entry(2).inject_doorbell,
        "timer 1 waits in vCPU 2's queue"
    );
    vm.dev.request_offline(2);
    let effect = vm.dev.command(&mut vm.ports[2], 4, abi::CMD_OFFLINE_ACK);
    assert_eq!(effect, CommandEffect::GoOffline);
    vm.kicker.take();
    vm.dev.go_offline(&mut vm.ports[2]);
    let kicks = vm.kicker.take();
    let to = kicks
        .iter()
        .find(|&&(_, why)| why == KickReasons::DELIVERY)
        .map(|&(c, _)| c)
        .unwrap_or_else(|| panic!("the recipient is told: {kicks:?}"));
    assert_ne!(to, 2);
    assert!(vm.entry(to).inject_doorbell);
    assert_eq!(vm.pop(to, abi::NO_TIMER), Some(1));
    assert_eq!(vm.get_u32(to, abi::OFF_EXP_OWNER), 2);
    assert_eq!(vm.pop(to, 1), None);
    // Its pinned timer moved too, and fires elsewhere while it is offline.
    vm.entry(0);
    vm.entry(1);
    vm.clock.set(9_000);
    let fired_on: Vec<u32> = (0..2u32)
        .filter(|&c| {
            vm.entry(c);
            vm.pop(c, abi::NO_TIMER) == Some(2)
        })
        .collect();
    assert_eq!(fired_on.len(), 1, "timer 2 fired exactly once");
    // Back online, the guest is told through `control`.
    vm.dev.come_online(&mut vm.ports[2]);
    assert_eq!(vm.get_u32(2, abi::OFF_CONTROL), abi::CONTROL_ONLINE);
    assert_eq!(vm.halt(2), HaltPlan::Resume, "its doorbell rings for it");
    let t = vm.dev.timer_stats(20_000);
    assert_eq!((t.fired, t.missed, t.early), (2, 0, 0));
}

#[test]
fn an_unacknowledged_offline_request_is_withdrawn() {
    let mut vm = Vm::new(Policy::Local, 2);
    vm.dev.request_offline(1);
    assert_eq!(
        vm.get_u32(1, abi::OFF_CONTROL),
        abi::CONTROL_OFFLINE_REQUESTED
    );
    assert!(vm.dev.withdraw_offline(1));
    assert_eq!(vm.get_u32(1, abi::OFF_CONTROL), abi::CONTROL_NONE);
    assert_eq!(vm.cmd(1, abi::CMD_OFFLINE_ACK).0, abi::INVALID);
}

#[test]
fn an_isolated_vcpu_hands_a_held_expiry_of_another_owner_back_to_it() {
    let clock = Arc::new(FakeClock::new(1_000));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let service = TimerService::new(
        ServiceConfig {
            policy: Policy::Pull,
            max_timers: 16,
            max_cpus: Some(2),
            isolated: vec![1],
            ..ServiceConfig::default()
        },
        Arc::clone(&clock),
        2,
    );
    let kicker = Arc::new(RecordingKicker::default());
    let dev = TimerDevice::new(
        service,
        mem.clone(),
        PAGES,
        STATES,
        2,
        Arc::clone(&kicker) as Arc<dyn VcpuKicker>,
    );
    let ports = (0..2).map(|c| dev.attach(c)).collect();
    let mut vm = Vm {
        dev,
        clock,
        mem,
        ports,
        kicker,
    };
    vm.cmd(0, abi::CMD_NOW);
    // Timer 5 fires on isolated vCPU 1, its owner; while its callback runs, vCPU 0 re-arms it.
    vm.arm(1, 5, abi::FLAG_MOVABLE, 2_000);
    vm.clock.set(2_000);
    assert!(vm.entry(1).inject_doorbell);
    assert_eq!(vm.pop(1, abi::NO_TIMER), Some(5));
    vm.arm(0, 5, abi::FLAG_MOVABLE, 3_000);
    vm.clock.set(3_000);
    vm.entry(0);
    assert_eq!(vm.dev.timer_stats(3_000).serialized, 1, "held back");
    vm.kicker.take();
    // vCPU 1 ends the callback: the held expiry belongs to vCPU 0 and goes there, not to vCPU 1.
    assert_eq!(vm.pop(1, 5), None);
    assert!(vm.kicker.take().contains(&(0, KickReasons::DELIVERY)));
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(5));
    assert_eq!(
        vm.dev.vcpu_timer_counts(1),
        (1, 0),
        "vCPU 1 ran only its own"
    );
}

#[test]
fn describe_vcpu_shows_the_queue_the_running_callback_and_the_doorbell() {
    let mut vm = Vm::new(Policy::Local, 1);
    let before = vm.dev.describe_vcpu(0);
    assert!(before.starts_with("joined=false "), "{before}");
    assert!(before.contains(" queue=0 in_flight=none "), "{before}");
    vm.arm(0, 3, abi::FLAG_PINNED, 5_000);
    vm.arm(0, 4, abi::FLAG_PINNED, 5_000);
    vm.clock.set(5_100);
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(3));
    let s = vm.dev.describe_vcpu(0);
    for part in [
        "joined=true",
        "queue=1",
        "in_flight=3",
        "doorbell_armed=false",
        "last_status=0",
        "queued=[4]",
        "running_here=[3]",
        "programmed=",
    ] {
        assert!(s.contains(part), "{part} missing from: {s}");
    }
    assert_eq!(vm.dev.describe_vcpu(7), "no vCPU 7");
}

#[test]
fn slack_is_the_guests_for_pinned_and_at_least_the_vm_minimum_for_movable() {
    let mut vm = Vm::new(Policy::Local, 1);
    vm.dev.set_min_slack(1_000);
    assert_eq!(vm.arm_slack(0, 1, abi::FLAG_PINNED, 5_000, 200).0, abi::OK);
    assert_eq!(vm.arm_slack(0, 2, abi::FLAG_MOVABLE, 5_000, 200).0, abi::OK);
    assert_eq!(
        vm.arm_slack(0, 3, abi::FLAG_MOVABLE, 5_100, 3_000).0,
        abi::OK
    );
    assert_eq!(vm.arm_slack(0, 4, abi::FLAG_PINNED, 9_000, 0).0, abi::OK);
    // The vCPU is told to look at the earliest window end (the pinned one's, 5_200)...
    assert_eq!(vm.entry(0).deadline, 5_200);
    // ... where every timer whose deadline passed expires at once.
    vm.clock.set(5_200);
    assert!(vm.entry(0).inject_doorbell);
    let mut got = Vec::new();
    let mut ack = abi::NO_TIMER;
    while let Some(id) = vm.pop(0, ack) {
        got.push((id, vm.get_u64(0, abi::OFF_EXP_SLACK)));
        assert!(vm.get_u64(0, abi::OFF_EXP_FIRED_AT) >= vm.get_u64(0, abi::OFF_EXP_DEADLINE));
        ack = id;
    }
    got.sort_unstable();
    assert_eq!(got, vec![(1, 200), (2, 1_000), (3, 3_000)]);
    vm.clock.set(9_000);
    vm.entry(0);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(4));
    assert_eq!(
        vm.get_u64(0, abi::OFF_EXP_SLACK),
        0,
        "pinned, no slack asked"
    );
    let t = vm.dev.timer_stats(10_000);
    assert_eq!((t.fired, t.early, t.late_beyond_window), (4, 0, 0));
}

#[test]
fn a_hostile_huge_slack_is_clamped_to_the_maximum() {
    let mut vm = Vm::new(Policy::Pull, 1);
    let deadline = 5_000;
    assert_eq!(
        vm.arm_slack(0, 1, abi::FLAG_MOVABLE, deadline, u64::MAX).0,
        abi::OK
    );
    assert_eq!(vm.entry(0).deadline, deadline + abi::MAX_SLACK_NS);
    // A deadline near the end of time with a huge slack neither overflows nor panics.
    assert_eq!(
        vm.arm_slack(0, 2, abi::FLAG_PINNED, u64::MAX - 1, u64::MAX)
            .0,
        abi::OK
    );
    vm.clock.set(deadline + abi::MAX_SLACK_NS);
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(1));
    assert_eq!(vm.get_u64(0, abi::OFF_EXP_SLACK), abi::MAX_SLACK_NS);
    assert_eq!(vm.pop(0, 1), None);
    assert_eq!(
        applied_slack(u64::MAX, TimerKind::Pinned, 0),
        abi::MAX_SLACK_NS
    );
    assert_eq!(
        applied_slack(0, TimerKind::Movable, u64::MAX),
        abi::MAX_SLACK_NS
    );
    vm.dev.set_min_slack(u64::MAX);
    assert_eq!(
        vm.arm_slack(0, 3, abi::FLAG_MOVABLE, deadline * 1_000_000, 0)
            .0,
        abi::OK
    );
    let t = vm.dev.timer_stats(deadline * 1_000_000);
    assert_eq!((t.armed, t.fired, t.missed), (3, 1, 0));
}

#[test]
fn a_firing_past_its_window_is_counted_and_missed_counts_window_ends() {
    let mut vm = Vm::new(Policy::Local, 1);
    let tol = abi::WINDOW_TOLERANCE_NS;
    assert_eq!(
        vm.arm_slack(0, 1, abi::FLAG_PINNED, 5_000, 1_000).0,
        abi::OK
    );
    assert_eq!(vm.arm_slack(0, 2, abi::FLAG_PINNED, 5_000, 0).0, abi::OK);
    // Within the tolerance past the window of 1, beyond it for 2.
    vm.clock.set(6_000 + tol);
    vm.entry(0);
    assert!(vm.pop(0, abi::NO_TIMER).is_some());
    let a = vm.get_u32(0, abi::OFF_EXP_ID);
    assert!(vm.pop(0, a).is_some());
    let b = vm.get_u32(0, abi::OFF_EXP_ID);
    assert_eq!(vm.pop(0, b), None);
    let t = vm.dev.timer_stats(vm.clock.now_ns());
    assert_eq!((t.fired, t.early, t.late_beyond_window), (2, 0, 1));
    assert_eq!(
        t.lateness_ns.max,
        1_000 + tol,
        "lateness is from the deadline"
    );
    // Pending at the end: missed only once its window has ended.
    let now = vm.clock.now_ns();
    assert_eq!(
        vm.arm_slack(0, 3, abi::FLAG_PINNED, now + 10, 500).0,
        abi::OK
    );
    assert_eq!(vm.dev.timer_stats(now + 20).missed, 0);
    assert_eq!(vm.dev.timer_stats(now + 511).missed, 1);
}

#[test]
fn the_timer_log_ends_every_arming_once() {
    use timer_log::TimerLog;
    let path =
        std::env::temp_dir().join(format!("quietvm-device-timer-log-{}", std::process::id()));
    let log = TimerLog::create(&path).unwrap();
    let mut vm = Vm::new(Policy::Pull, 2);
    vm.dev.set_min_slack(300);
    vm.dev.set_log(Arc::clone(&log));
    assert_eq!(
        vm.arm_slack(0, 1, abi::FLAG_MOVABLE, 5_000, 100),
        (abi::OK, 0)
    );
    assert_eq!(
        vm.arm_slack(0, 1, abi::FLAG_MOVABLE, 6_000, 100),
        (abi::OK, 1)
    ); // replaces
    assert_eq!(
        vm.arm_slack(1, 2, abi::FLAG_PINNED, 7_000, 100),
        (abi::OK, 0)
    );
    assert_eq!(vm.cancel(1, 2, false), (abi::OK, 1)); // cancelled
    assert_eq!(vm.arm_slack(1, 3, abi::FLAG_PINNED, 50_000, 0).0, abi::OK); // pending
    vm.clock.set(6_300);
    vm.entry(0);
    assert_eq!(vm.pop(0, abi::NO_TIMER), Some(1)); // fired on 0
                                                   // Re-armed while its callback runs, and due before the ACK: held.
    assert_eq!(vm.arm_slack(0, 1, abi::FLAG_PINNED, 6_400, 0).0, abi::OK);
    vm.clock.set(6_500);
    vm.entry(0);
    assert_eq!(vm.pop(0, 1), Some(1)); // the held one, released by this ACK
    assert_eq!(vm.pop(0, 1), None);
    vm.dev.log_pending_at_end();
    log.finish().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let brief: Vec<(u64, &str, &str, u64, bool)> = lines
        .iter()
        .map(|v| {
            (
                v["id"].as_u64().unwrap(),
                v["flags"].as_str().unwrap(),
                v["outcome"].as_str().unwrap(),
                v["slack_ns"].as_u64().unwrap(),
                v["held"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        vec![
            (1, "movable", "replaced", 300, false),
            (2, "pinned", "cancelled", 100, false),
            (1, "movable", "fired", 300, false),
            (1, "pinned", "fired", 0, true),
            (3, "pinned", "pending", 0, false),
        ]
    );
    let fired = &lines[2];
    assert_eq!(fired["owner"], 0);
    assert_eq!(fired["armed_at_ns"], 1_000);
    assert_eq!(fired["deadline_ns"], 6_000);
    assert_eq!(fired["at_ns"], 6_300);
    assert_eq!(fired["fired_on"], 0);
    assert!(lines[4]["at_ns"].is_null() && lines[4]["fired_on"].is_null());
    assert_eq!(lines[1]["owner"], 1);
    let t = vm.dev.timer_stats(6_500);
    let logged_fired = lines.iter().filter(|v| v["outcome"] == "fired").count() as u64;
    assert_eq!((t.armed, t.fired), (lines.len() as u64, logged_fired));
}

// ---- Queue mode: each test plays a queue-mode guest by hand (docs/timer-abi.md, "Queue mode") ----

use quietvm_abi::queue::{self as q, State};

/// A clock a queue-mode guest could read (the tests never read it: the fake clock is the time).
const CLOCK: q::ClockParams = q::ClockParams {
    version: 2,
    reserved: 0,
    tsc_base: 0,
    ns_per_tick_q32: 1 << 32,
};

impl Vm {
    fn queued(policy: Policy, vcpus: u32) -> Self {
        Vm::queued_on(policy, vcpus, 0..vcpus)
    }

    /// Queue mode offered, and enabled on the vCPUs in `on` (the others use commands).
    fn queued_on(policy: Policy, vcpus: u32, on: std::ops::Range<u32>) -> Self {
        let mut vm = Vm::new(policy, vcpus);
        vm.dev.offer_queues(CLOCK);
        for c in on {
            assert_eq!(vm.cmd(c, abi::CMD_ENABLE_QUEUES).0, abi::OK);
            assert_eq!(vm.get_u32(c, q::OFF_Q_ENABLED), 1);
        }
        vm
    }

    fn word(&self, id: u32) -> State {
        State(
            self.mem
                .read_obj(GuestAddress(STATES + 8 * u64::from(id)))
                .unwrap(),
        )
    }

    fn set_word(&self, id: u32, s: State) {
        self.mem
            .write_obj(s.0, GuestAddress(STATES + 8 * u64::from(id)))
            .unwrap();
    }

    /// Writes `e` to `cpu`'s submission ring and publishes it, as a guest does.
    fn submit(&self, cpu: CpuId, e: q::SubEntry) {
        let head = self.get_u32(cpu, q::OFF_Q_SUB_HEAD);
        let at = q::sub_slot(head);
        self.put(cpu, at, e.op);
        self.put(cpu, at + 4, e.id);
        self.put(cpu, at + 8, e.gen);
        self.put(cpu, at + 12, e.flags);
        self.put(cpu, at + 16, e.deadline);
        self.put(cpu, at + 24, e.slack);
        self.put(cpu, at + 32, e.at);
        self.put(cpu, q::OFF_Q_SUB_HEAD, head.wrapping_add(1));
    }

    /// A queue-mode `ARM` without an exit: swap the word, queue the entry. Returns the re-arm `value`.
    fn q_arm(&self, cpu: CpuId, id: u32, flags: u32, deadline: u64, slack: u64) -> bool {
        let old = self.word(id);
        let new = old.armed();
        self.set_word(id, new);
        self.submit(
            cpu,
            q::SubEntry {
                op: q::OP_ARM,
                id,
                gen: new.gen(),
                flags: flags | if old.pending() { q::ENDED_PENDING } else { 0 },
                deadline,
                slack,
                at: self.clock.now_ns(),
                reserved: 0,
            },
        );
        old.pending()
    }

    /// A queue-mode `CANCEL`; returns its `value` and the word it left.
    fn q_cancel(&self, cpu: CpuId, id: u32) -> (bool, State) {
        let old = self.word(id);
        let new = old.cancelled();
        self.set_word(id, new);
        self.submit(
            cpu,
            q::SubEntry {
                op: q::OP_CANCEL,
                id,
                gen: new.gen(),
                flags: if old.pending() { q::ENDED_PENDING } else { 0 },
                at: self.clock.now_ns(),
                ..q::SubEntry::default()
            },
        );
        (old.pending(), new)
    }

    /// Reads every delivery entry `cpu`'s guest has not read: (id, owner, deadline, fired_at, slack).
    fn take_deliveries(&self, cpu: CpuId) -> Vec<(u32, u32, u64, u64, u64)> {
        let head = self.get_u32(cpu, q::OFF_Q_DLV_HEAD);
        let mut tail = self.get_u32(cpu, q::OFF_Q_DLV_TAIL);
        let mut out = Vec::new();
        while tail != head {
            let at = q::delivery_slot(tail);
            out.push((
                self.get_u32(cpu, at),
                self.get_u32(cpu, at + 4),
                self.get_u64(cpu, at + 16),
                self.get_u64(cpu, at + 32),
                self.get_u64(cpu, at + 24),
            ));
            tail = tail.wrapping_add(1);
        }
        self.put(cpu, q::OFF_Q_DLV_TAIL, tail);
        out
    }

    /// Ends the callback of `id` on `cpu` in the word; true if quietvm held an expiry for it (then
    /// the guest must `SYNC`).
    fn q_end(&self, cpu: CpuId, id: u32) -> bool {
        let old = self.word(id);
        let new = old.callback_ended(cpu).expect("the callback runs here");
        self.set_word(id, new);
        old.held()
    }
}

#[test]
fn queue_mode_arms_without_an_exit_and_delivers_through_the_ring() {
    let mut vm = Vm::queued(Policy::Pull, 1);
    vm.entry(0);
    assert!(!vm.q_arm(0, 3, abi::FLAG_PINNED, 5_000, 0));
    assert_eq!(vm.dev.timer_stats(0).armed, 0, "not read before an exit");
    // The halt exit reads the ring first, then sleeps to the deadline.
    assert_eq!(vm.halt(0), HaltPlan::Sleep { until: 5_000 });
    assert_eq!(vm.get_u32(0, q::OFF_Q_SUB_TAIL), 1);
    vm.clock.set(5_300);
    let w = vm.wake(0, KickReasons::NONE);
    assert!(w.resume_guest, "a delivery rings the doorbell");
    assert!(vm.entry(0).inject_doorbell);
    assert!(
        !vm.entry(0).inject_doorbell,
        "once, until the guest has read the ring"
    );
    assert_eq!(vm.take_deliveries(0), vec![(3, 0, 5_000, 5_300, 0)]);
    let word = vm.word(3);
    assert_eq!((word.pending(), word.running_on()), (false, Some(0)));
    assert!(!vm.q_end(0, 3));
    let t = vm.dev.timer_stats(10_000);
    assert_eq!((t.armed, t.fired, t.early, t.missed), (1, 1, 0, 0));
    assert_eq!((t.queue_entries, t.queue_errors), (1, 0));
    assert_eq!(vm.word(3).running_on(), None);
}

#[test]
fn queue_mode_publishes_the_horizon_it_will_be_back_by() {
    let mut vm = Vm::queued(Policy::Local, 1);
    vm.arm(0, 1, abi::FLAG_PINNED, 9_000);
    let plan = vm.entry(0);
    assert_eq!(plan.deadline, 9_000);
    assert_eq!(vm.get_u64(0, q::OFF_Q_HORIZON), 9_000);
    // An arming due later needs no exit: the kick at 9_000 reads it.
    vm.q_arm(0, 2, abi::FLAG_PINNED, 12_000, 0);
    vm.clock.set(9_000);
    let plan = vm.entry(0);
    assert_eq!(vm.dev.timer_stats(9_000).armed, 2);
    assert_eq!(
        plan.deadline, 12_000,
        "timer 1 is delivered, timer 2 is next"
    );
    assert_eq!(vm.get_u64(0, q::OFF_Q_HORIZON), 12_000);
}

#[test]
fn a_queued_rearm_or_cancel_wins_over_an_expiry_it_overtakes() {
    let mut vm = Vm::queued(Policy::Local, 1);
    vm.arm(0, 1, abi::FLAG_PINNED, 5_000);
    vm.arm(0, 2, abi::FLAG_PINNED, 5_000);
    vm.entry(0);
    vm.clock.set(5_100);
    // Both expire into the delivery queue at this exit, but the ring was full of nothing yet...
    // the guest re-arms 1 and cancels 2 before quietvm hands them over.
    assert!(
        vm.q_arm(0, 1, abi::FLAG_PINNED, 8_000, 0),
        "still pending: a re-arm"
    );
    assert!(vm.q_cancel(0, 2).0, "still pending: cancelled");
    let plan = vm.entry(0);
    assert!(!plan.inject_doorbell, "nothing stale is delivered");
    assert!(vm.take_deliveries(0).is_empty());
    assert_eq!(plan.deadline, 8_000);
    vm.clock.set(8_000);
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.take_deliveries(0).len(), 1);
    let t = vm.dev.timer_stats(9_000);
    assert_eq!((t.armed, t.fired, t.cancelled, t.missed), (3, 1, 1, 0));
}

#[test]
fn an_expiry_is_overtaken_by_a_cancel_still_in_the_ring_when_it_is_handed_over() {
    let mut vm = Vm::queued(Policy::Local, 1);
    vm.arm(0, 4, abi::FLAG_PINNED, 5_000);
    vm.clock.set(5_000);
    // The service expires it while the cancel sits in the word only (the entry is not written yet).
    let old = vm.word(4);
    vm.set_word(4, old.cancelled());
    assert!(
        !vm.entry(0).inject_doorbell,
        "the word says cancelled: dropped"
    );
    assert!(vm.take_deliveries(0).is_empty());
    // The entry arrives later and accounts for it.
    vm.submit(
        0,
        q::SubEntry {
            op: q::OP_CANCEL,
            id: 4,
            gen: old.gen() + 1,
            flags: q::ENDED_PENDING,
            at: 5_000,
            ..q::SubEntry::default()
        },
    );
    vm.entry(0);
    let t = vm.dev.timer_stats(9_000);
    assert_eq!((t.armed, t.fired, t.cancelled, t.missed), (1, 0, 1, 0));
}

#[test]
fn an_expiry_behind_a_running_callback_is_held_until_the_guest_ends_it_and_syncs() {
    let mut vm = Vm::queued(Policy::Local, 2);
    vm.arm(0, 5, abi::FLAG_MOVABLE, 5_000);
    vm.clock.set(5_000);
    assert!(vm.entry(0).inject_doorbell);
    assert_eq!(vm.take_deliveries(0).len(), 1);
    // The callback (on vCPU 0) re-arms it on vCPU 1's behalf... by vCPU 1, due at once.
    vm.q_arm(1, 5, abi::FLAG_MOVABLE, 5_100, 0);
    vm.clock.set(5_200);
    vm.entry(1);
    assert!(vm.word(5).held(), "held behind the callback on vCPU 0");
    assert!(vm.take_deliveries(1).is_empty());
    // vCPU 0 ends its callback, sees HELD, and syncs.
    assert!(vm.q_end(0, 5));
    let (status, _) = vm.cmd(0, abi::CMD_SYNC);
    assert_eq!(status, abi::OK);
    // A movable timer goes to the vCPU whose callback ended.
    assert!(vm.entry(0).inject_doorbell);
    let got = vm.take_deliveries(0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 5);
    assert_eq!(got[0].1, 1, "owner: the vCPU that re-armed it");
    let t = vm.dev.timer_stats(9_000);
    assert_eq!(
        (t.armed, t.fired, t.serialized, t.queue_syncs),
        (2, 2, 1, 1)
    );
}

#[test]
fn commands_and_queues_mix_and_cancel_sync_reads_the_word() {
    let mut vm = Vm::queued_on(Policy::Local, 2, 0..1);
    vm.q_arm(0, 6, abi::FLAG_PINNED, 5_000, 0);
    vm.halt(0);
    vm.clock.set(5_000);
    assert!(vm.wake(0, KickReasons::NONE).resume_guest);
    vm.take_deliveries(0);
    // vCPU 1, with commands, sees the callback running on vCPU 0.
    assert_eq!(vm.cancel(1, 6, true), (abi::RUNNING, 0));
    assert!(!vm.q_end(0, 6));
    assert_eq!(vm.cancel(1, 6, true), (abi::OK, 0));
    // A command re-arm of a queued arming answers as the queue would.
    vm.q_arm(0, 7, abi::FLAG_PINNED, 9_000, 0);
    assert_eq!(vm.arm(1, 7, abi::FLAG_PINNED, 9_500), (abi::OK, 1));
    vm.entry(0);
    vm.clock.set(9_600);
    vm.entry(0);
    assert!(
        vm.take_deliveries(0).is_empty(),
        "the first arming was replaced"
    );
    let plan = vm.entry(1);
    assert!(plan.inject_doorbell);
    assert_eq!(
        vm.pop(1, abi::NO_TIMER),
        Some(7),
        "vCPU 1 uses commands: POP"
    );
    let t = vm.dev.timer_stats(10_000);
    assert_eq!((t.armed, t.fired, t.missed), (3, 2, 0));
}

#[test]
fn a_full_delivery_ring_keeps_the_rest_and_comes_back_for_it() {
    let mut vm = Vm::queued(Policy::Local, 1);
    let n = q::DELIVERY_ENTRIES + 8;
    // 16 timers are all this harness has: fill the ring with re-arms of them in rounds.
    for round in 0..(n / 16 + 1) {
        for id in 0..16u32 {
            vm.q_arm(
                0,
                id,
                abi::FLAG_PINNED,
                1_000 + u64::from(round) * 100 + 50,
                0,
            );
        }
        vm.entry(0);
        vm.clock.set(1_000 + u64::from(round) * 100 + 60);
        vm.entry(0);
        // The guest reads nothing: entries pile up.
        for id in 0..16u32 {
            if let Some(cpu) = vm.word(id).running_on() {
                vm.q_end(cpu, id);
            }
        }
    }
    let head = vm.get_u32(0, q::OFF_Q_DLV_HEAD);
    assert_eq!(head, q::DELIVERY_ENTRIES, "never more than the ring holds");
    let plan = vm.entry(0);
    assert!(plan.deadline <= vm.clock.now_ns() + DOORBELL_RETRY_NS);
    let first = vm.take_deliveries(0).len() as u32;
    assert_eq!(first, q::DELIVERY_ENTRIES);
    vm.entry(0);
    assert!(
        !vm.take_deliveries(0).is_empty(),
        "the rest, once there is room"
    );
}

// ---- Queue mode, hostile guests -----------------------------------------------------------------

#[test]
fn a_submission_head_that_makes_no_sense_is_counted_and_changes_nothing() {
    let mut vm = Vm::queued(Policy::Local, 1);
    vm.put(0, q::OFF_Q_SUB_HEAD, 1_000u32);
    vm.entry(0);
    let t = vm.dev.timer_stats(0);
    assert_eq!((t.armed, t.queue_entries), (0, 0));
    assert!(t.queue_errors >= 1);
    assert_eq!(vm.get_u32(0, q::OFF_Q_SUB_TAIL), 0);
    // The guest puts it right: the device goes on from its own tail.
    vm.put(0, q::OFF_Q_SUB_HEAD, 0u32);
    vm.q_arm(0, 1, abi::FLAG_PINNED, 5_000, 0);
    vm.entry(0);
    assert_eq!(vm.dev.timer_stats(0).armed, 1);
}

#[test]
fn garbage_entries_are_skipped_one_ring_at_a_time() {
    let mut vm = Vm::queued(Policy::Local, 1);
    let bad = [
        q::SubEntry {
            op: 9,
            id: 1,
            ..Default::default()
        },
        q::SubEntry {
            op: q::OP_ARM,
            id: 999,
            flags: abi::FLAG_PINNED,
            ..Default::default()
        },
        q::SubEntry {
            op: q::OP_ARM,
            id: 1,
            flags: 3,
            ..Default::default()
        },
        q::SubEntry {
            op: q::OP_ARM,
            id: 1,
            flags: abi::FLAG_PINNED | 0x8000,
            ..Default::default()
        },
        // A generation the word never had.
        q::SubEntry {
            op: q::OP_ARM,
            id: 2,
            gen: 77,
            flags: abi::FLAG_PINNED,
            deadline: 5_000,
            ..Default::default()
        },
    ];
    for e in bad {
        vm.submit(0, e);
    }
    vm.entry(0);
    let t = vm.dev.timer_stats(0);
    assert_eq!((t.armed, t.queue_entries, t.queue_errors), (0, 5, 5));
    // A whole ring of garbage in one go: read once, each skipped; no more than the ring holds.
    for i in 0..q::SUB_ENTRIES {
        vm.submit(
            0,
            q::SubEntry {
                op: 0xdead,
                id: i,
                ..Default::default()
            },
        );
    }
    vm.entry(0);
    let t = vm.dev.timer_stats(0);
    assert_eq!(t.queue_entries, 5 + u64::from(q::SUB_ENTRIES));
    assert_eq!(t.queue_errors, 5 + u64::from(q::SUB_ENTRIES));
}

#[test]
fn a_scribbled_delivery_tail_or_state_word_hurts_only_that_guest() {
    let mut vm = Vm::queued(Policy::Local, 2);
    vm.arm(0, 1, abi::FLAG_PINNED, 5_000);
    vm.arm(1, 2, abi::FLAG_PINNED, 5_000);
    vm.arm(1, 3, abi::FLAG_PINNED, 5_000);
    vm.put(0, q::OFF_Q_DLV_TAIL, 0x8000_0000u32);
    // Timer 3's word: every bit set (running on vCPU 0xffff, which does not exist).
    vm.set_word(3, State(u64::MAX));
    vm.clock.set(5_000);
    assert!(
        !vm.entry(0).inject_doorbell,
        "vCPU 0's ring is taken as full"
    );
    assert!(vm.dev.timer_stats(5_000).queue_errors >= 1);
    assert!(vm.entry(1).inject_doorbell);
    let got: Vec<u32> = vm.take_deliveries(1).iter().map(|d| d.0).collect();
    assert_eq!(
        got,
        vec![2],
        "vCPU 1 gets its good timer; the scribbled one is not handed over"
    );
    let t = vm.dev.timer_stats(5_000);
    assert_eq!(t.early, 0);
    assert_eq!(vm.dev.check_hierarchy(), "ok");
}

#[test]
fn a_vcpu_woken_into_its_handler_is_not_kicked_before_it_can_halt_again() {
    let mut vm = Vm::queued(Policy::Local, 1);
    vm.arm(0, 1, abi::FLAG_PINNED, 5_000);
    vm.arm(0, 2, abi::FLAG_PINNED, 5_050);
    assert_eq!(vm.halt(0), HaltPlan::Sleep { until: 5_000 });
    vm.clock.set(5_000);
    assert!(vm.wake(0, KickReasons::NONE).resume_guest);
    let plan = vm.entry(0);
    assert!(plan.inject_doorbell);
    assert_eq!(
        plan.deadline,
        5_000 + WOKEN_HANDLER_GRACE_NS,
        "timer 2 waits for the halt that ends the handler"
    );
    // The handler ends and the guest halts: timer 2 is handed over at that exit, no sleep.
    vm.take_deliveries(0);
    vm.q_end(0, 1);
    vm.clock.set(5_100);
    assert_eq!(vm.halt(0), HaltPlan::Recheck, "due already: no sleep");
    assert!(
        vm.dev
            .wake(&mut vm.ports[0], false, KickReasons::NONE)
            .resume_guest
    );
    // A callback's re-arm (queued, no exit) waits for the halt too.
    vm.q_arm(0, 3, abi::FLAG_PINNED, 5_200, 0);
    assert_eq!(vm.entry(0).deadline, 5_100 + WOKEN_HANDLER_GRACE_NS);
    // An exit that is not the halt (a SYNC: main code armed something due soon) ends the grace.
    assert_eq!(vm.cmd(0, abi::CMD_SYNC).0, abi::OK);
    assert_eq!(vm.entry(0).deadline, 5_200);
    // Nothing armed: no kick at all.
    vm.cancel(0, 3, false);
    assert_eq!(vm.entry(0).deadline, NO_DEADLINE);
    // With commands (no queue mode) nothing changes: the kick comes at the deadline.
    let mut legacy = Vm::new(Policy::Local, 1);
    legacy.arm(0, 1, abi::FLAG_PINNED, 5_000);
    legacy.arm(0, 2, abi::FLAG_PINNED, 5_050);
    legacy.halt(0);
    legacy.clock.set(5_000);
    assert!(legacy.wake(0, KickReasons::NONE).resume_guest);
    assert_eq!(legacy.entry(0).deadline, 5_050);
}

#[test]
fn the_idle_port_does_not_sleep_past_a_doorbell_the_masked_guest_has_not_handled() {
    let mut vm = Vm::queued(Policy::Local, 1);
    vm.arm(0, 1, abi::FLAG_PINNED, 5_000);
    vm.clock.set(5_000);
    assert!(vm.entry(0).inject_doorbell);
    // The guest, its doorbell masked, halts before its handler read the ring: back at once.
    assert_eq!(vm.dev.idle(&mut vm.ports[0]), HaltPlan::Resume);
    assert!(
        !vm.entry(0).inject_doorbell,
        "rung already: the guest has it pending"
    );
    vm.take_deliveries(0);
    vm.q_end(0, 1);
    // Work found by the idle halt itself is not rung for: the return is the doorbell.
    vm.arm(0, 2, abi::FLAG_PINNED, 6_000);
    assert_eq!(
        vm.dev.idle(&mut vm.ports[0]),
        HaltPlan::Sleep { until: 6_000 }
    );
    vm.clock.set(6_000);
    assert!(vm.wake(0, KickReasons::NONE).resume_guest);
    assert!(
        !vm.entry(0).inject_doorbell,
        "the idle return is the doorbell"
    );
    assert!(!vm.entry(0).inject_doorbell);
    assert_eq!(vm.take_deliveries(0).len(), 1);
    vm.q_end(0, 2);
    assert_eq!(
        vm.dev.idle(&mut vm.ports[0]),
        HaltPlan::Sleep { until: NO_DEADLINE }
    );
    // An offline request waits: no sleep either.
    vm.dev.request_offline(0);
    assert_eq!(vm.dev.idle(&mut vm.ports[0]), HaltPlan::Resume);
}

#[test]
fn a_queue_mode_guest_that_pops_instead_of_reading_its_ring_is_not_rung_at_every_exit() {
    let mut vm = Vm::queued(Policy::Local, 1);
    vm.arm(0, 1, abi::FLAG_PINNED, 5_000);
    vm.clock.set(5_000);
    assert!(vm.entry(0).inject_doorbell);
    // The guest answers with POP commands (it has not switched to its ring yet, say).
    assert_eq!(vm.pop(0, abi::NO_TIMER), None);
    assert!(!vm.entry(0).inject_doorbell, "no doorbell storm");
    assert_eq!(vm.pop(0, abi::NO_TIMER), None);
    assert!(!vm.entry(0).inject_doorbell);
    // Once it has read the ring, the next delivery rings again.
    vm.take_deliveries(0);
    vm.q_end(0, 1);
    vm.arm(0, 2, abi::FLAG_PINNED, 6_000);
    vm.clock.set(6_000);
    assert!(vm.entry(0).inject_doorbell);
}

#[test]
fn what_a_vcpu_queued_after_its_last_exit_is_read_when_the_vm_ends() {
    let mut vm = Vm::queued(Policy::Local, 1);
    vm.entry(0);
    vm.q_arm(0, 3, abi::FLAG_PINNED, 50_000, 0);
    assert_eq!(vm.dev.timer_stats(0).armed, 0);
    vm.dev.read_rings_at_end();
    let t = vm.dev.timer_stats(1_000);
    assert_eq!((t.armed, t.queue_entries, t.missed), (1, 1, 0));
}
