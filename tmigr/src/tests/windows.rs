//! Windows (`[deadline, deadline + slack]`): one wake-up serves every window
//! it falls in, and remote handling ends when a group's earliest deadline
//! and earliest window end belong to different vCPUs ("Windows" in the crate
//! docs).

use super::races::svc;
use crate::clock::Clock;
use crate::types::{Expired, Expiry, TimerKind, KTIME_MAX};

fn ids(out: &[Expired]) -> Vec<(u32, u32, u64, u64)> {
    let mut v: Vec<_> = out
        .iter()
        .map(|e| (e.id, e.owner, e.deadline, e.slack))
        .collect();
    v.sort_unstable();
    v
}

/// All four vCPUs idle with three overlapping windows: the last vCPU to halt
/// wakes at the earliest window end (2600), expires both windows that have
/// opened, and halts again until the third one ends. Two wake-ups for three
/// timers; with slack 0 it would take three.
#[test]
fn windows_one_wakeup_serves_overlapping_windows_when_all_idle() {
    let (s, clock) = svc(4, 2);
    s.arm(1, 1, 2_000, 1_000, TimerKind::Movable);
    s.arm(2, 2, 2_500, 100, TimerKind::Movable);
    s.arm(3, 3, 2_900, 0, TimerKind::Movable);
    for c in 1..4 {
        assert_eq!(s.vcpu_halt(c), KTIME_MAX, "vCPU 0 still runs");
    }
    assert_eq!(s.vcpu_halt(0), 2_600, "the last one wakes at the first end");
    s.check_invariants().unwrap();
    let root = s.hierarchy().root().unwrap();
    assert_eq!(
        s.hierarchy().group_next(root),
        Expiry {
            hard: 2_600,
            soft: 2_000
        }
    );
    clock.set(2_600);
    s.vcpu_run(0);
    let mut out = Vec::new();
    s.expire(0, &mut out);
    assert_eq!(ids(&out), vec![(1, 1, 2_000, 1_000), (2, 2, 2_500, 100)]);
    assert_eq!(s.next_event(0), 2_900);
    assert_eq!(s.vcpu_halt(0), 2_900);
    clock.set(2_900);
    s.vcpu_run(0);
    out.clear();
    s.expire(0, &mut out);
    assert_eq!(ids(&out), vec![(3, 3, 2_900, 0)]);
    assert_eq!(s.next_event(0), KTIME_MAX);
    s.check_invariants().unwrap();
}

/// RACE (livelock with windows): vCPU 0 runs and is the root's migrator;
/// in the other group, vCPU 2's window `[1500, 5000]` opened first and
/// vCPU 3's `[3000, 3100]` ends first. At 2000 the group's event is open
/// (deadline 1500) while the vCPU of its end (3) has nothing due: the event
/// names vCPU 2, whose timer is expired, and the re-queued event (3000, not
/// open) ends the walk. Named after vCPU 3 with vCPU 2's deadline, the walk
/// would hand the migrator vCPU 3 for ever; named after vCPU 3 with its own
/// deadline, vCPU 2's open window would be left for later (this test fails
/// either way).
#[test]
fn windows_remote_handling_ends_when_soft_and_hard_cpus_differ() {
    let (s, clock) = svc(4, 2);
    s.arm(2, 2, 1_500, 3_500, TimerKind::Movable);
    s.arm(3, 3, 3_000, 100, TimerKind::Movable);
    for c in 1..4 {
        s.vcpu_halt(c);
    }
    s.check_invariants().unwrap();
    assert_eq!(
        s.next_event(0),
        3_100,
        "the migrator looks at the first end"
    );
    clock.set(2_000);
    let mut out = Vec::new();
    s.expire(0, &mut out);
    assert_eq!(ids(&out), vec![(2, 2, 1_500, 3_500)]);
    assert_eq!(s.next_event(0), 3_100);
    clock.set(3_100);
    out.clear();
    s.expire(0, &mut out);
    assert_eq!(ids(&out), vec![(3, 3, 3_000, 100)]);
    s.check_invariants().unwrap();
    assert_eq!(s.stats().remote_expiries, 2);
}

/// A halted vCPU whose pinned window ends first wakes for it and takes its
/// movable timers whose windows opened; the rest goes to the hierarchy when
/// it halts again.
#[test]
fn windows_pinned_wakeup_takes_opened_movable_windows() {
    let (s, clock) = svc(2, 2);
    s.arm(1, 1, 2_000, 0, TimerKind::Pinned);
    s.arm(1, 2, 1_800, 1_000, TimerKind::Movable); // [1800, 2800]
    s.arm(1, 3, 2_400, 100, TimerKind::Movable); // [2400, 2500]
    assert_eq!(s.vcpu_halt(1), 2_000, "its own pinned timer; vCPU 0 runs");
    clock.set(2_000);
    s.vcpu_run(1);
    let mut out = Vec::new();
    s.expire(1, &mut out);
    assert_eq!(ids(&out), vec![(1, 1, 2_000, 0), (2, 1, 1_800, 1_000)]);
    assert_eq!(s.vcpu_halt(1), KTIME_MAX, "vCPU 0 is the migrator");
    assert_eq!(s.next_event(0), 2_500);
    s.check_invariants().unwrap();
}

/// Local policy: a halting vCPU wakes at its own earliest window end.
#[test]
fn windows_local_policy_wakes_at_the_first_end() {
    use crate::service::{ServiceConfig, TimerService};
    use crate::types::Policy;
    let clock = std::sync::Arc::new(crate::clock::FakeClock::new(1_000));
    let s = TimerService::new(
        ServiceConfig {
            policy: Policy::Local,
            max_timers: 8,
            group_size: 2,
            nodes: None,
            max_cpus: None,
            isolated: Vec::new(),
        },
        clock.clone(),
        1,
    );
    s.arm(0, 0, 2_000, 500, TimerKind::Movable);
    s.arm(0, 1, 2_300, 0, TimerKind::Pinned);
    assert_eq!(s.vcpu_halt(0), 2_300);
    clock.set(2_300);
    s.vcpu_run(0);
    let mut out = Vec::new();
    s.expire(0, &mut out);
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|e| e.deadline <= clock.now_ns()));
}
