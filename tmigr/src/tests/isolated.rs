//! Isolated vCPUs (`ServiceConfig::isolated`, the kernel's "timers/migration:
//! Exclude isolated cpus from hierarchy"): out of the hierarchy under every
//! policy, their own movable timers expire on themselves, never a Push
//! placement, never a hotplug recipient or forced-active vCPU while a
//! non-isolated vCPU is online.

use std::sync::Arc;

use proptest::prelude::*;

use crate::clock::FakeClock;
use crate::model::{Op, Sim, SimConfig};
use crate::service::{ServiceConfig, TimerService};
use crate::types::{CpuId, Policy, TimerKind, KTIME_MAX};

type Svc = TimerService<Arc<FakeClock>>;

fn svc(policy: Policy, n: u32, isolated: &[CpuId]) -> (Svc, Arc<FakeClock>) {
    let clock = Arc::new(FakeClock::new(1_000));
    let s = TimerService::new(
        ServiceConfig {
            policy,
            max_timers: 64,
            group_size: 2,
            nodes: None,
            max_cpus: Some(n),
            isolated: isolated.to_vec(),
        },
        clock.clone(),
        n,
    );
    (s, clock)
}

const POLICIES: [Policy; 3] = [Policy::Pull, Policy::Local, Policy::Push];

/// An isolated vCPU is never in the hierarchy, never a migrator, and never
/// expires another vCPU's timer, even when it is the only one running.
#[test]
fn isolated_vcpu_never_migrator_nor_expires_others() {
    let (s, clock) = svc(Policy::Pull, 4, &[1]);
    let h = s.hierarchy();
    assert_eq!(h.cpu_group(1), None, "isolated vCPU 1 has a group");
    s.arm(2, 2, 5_000, 0, TimerKind::Movable);
    assert_eq!(s.vcpu_halt(2), KTIME_MAX);
    s.vcpu_halt(3);
    // vCPU 0 is the last non-isolated one: it idles the root and must wake
    // for vCPU 2's timer although isolated vCPU 1 still runs.
    assert_eq!(s.vcpu_halt(0), 5_000);
    assert!(s.is_running(1));
    s.check_invariants().unwrap();
    clock.set(6_000);
    let mut out = vec![];
    s.expire(1, &mut out);
    assert!(out.is_empty(), "isolated vCPU 1 expired {out:?}");
    assert_eq!(s.next_event(1), KTIME_MAX);
    s.vcpu_run(0);
    s.expire(0, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].id, out[0].owner), (2, 2));
    s.check_invariants().unwrap();
}

/// A halted isolated vCPU wakes for its own movable timers (pinned-like),
/// under every policy, also for one armed while it is halted.
#[test]
fn isolated_vcpu_wakes_for_its_own_movable_timers() {
    for policy in POLICIES {
        let (s, clock) = svc(policy, 3, &[2]);
        s.arm(2, 7, 4_000, 0, TimerKind::Movable);
        assert_eq!(s.vcpu_halt(2), 4_000, "{policy}");
        // Armed on it while halted (a callback, a device): earlier, so a kick.
        s.arm(2, 8, 3_000, 0, TimerKind::Movable);
        let mut kicks = vec![];
        s.take_kicks(&mut kicks);
        assert!(kicks.contains(&2), "{policy}: kicks {kicks:?}");
        s.vcpu_run(2);
        assert_eq!(s.vcpu_halt(2), 3_000, "{policy}");
        s.check_invariants().unwrap();
        // Nobody else takes them, even if everybody else halts.
        s.vcpu_halt(0);
        s.vcpu_halt(1);
        clock.set(4_000);
        let mut out = vec![];
        for c in 0..2 {
            s.vcpu_run(c);
            s.expire(c, &mut out);
        }
        assert!(out.is_empty(), "{policy}: {out:?}");
        s.vcpu_run(2);
        s.expire(2, &mut out);
        let mut ids: Vec<_> = out.iter().map(|e| (e.id, e.owner)).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![(7, 2), (8, 2)], "{policy}");
    }
}

/// Push never places a timer on an isolated vCPU, even the nearest busy one.
#[test]
fn push_never_places_on_isolated_vcpu() {
    let (s, _clock) = svc(Policy::Push, 4, &[1]);
    s.set_push_idle(0, true);
    s.arm(0, 1, 5_000, 0, TimerKind::Movable);
    let (owner, _) = s.timer_owner(1).unwrap();
    assert_ne!(owner, 1, "placed on isolated vCPU 1");
    assert_eq!(owner, 2, "nearest busy non-isolated vCPU");
    // Only isolated vCPUs busy: stays local.
    s.vcpu_halt(2);
    s.vcpu_halt(3);
    s.arm(0, 2, 5_000, 0, TimerKind::Movable);
    assert_eq!(s.timer_owner(2).unwrap().0, 0);
    // An isolated vCPU's own push-idle arm may go to a busy non-isolated one.
    s.set_push_idle(1, true);
    s.vcpu_run(2);
    s.arm(1, 3, 5_000, 0, TimerKind::Movable);
    assert_eq!(s.timer_owner(3).unwrap().0, 2);
    s.check_invariants().unwrap();
}

/// Hotplug hand-off: the offlined vCPU's timers and the forced-active vCPU
/// are never isolated while a non-isolated vCPU is online; with only
/// isolated vCPUs left, the timers go to one of them and nothing is forced.
#[test]
fn offline_hands_off_to_non_isolated_vcpus() {
    for policy in POLICIES {
        let (s, _clock) = svc(policy, 4, &[1, 2]);
        assert_eq!(s.handoff_target(0), 3, "{policy}");
        assert_eq!(s.handoff_target(3), 0, "{policy}");
        s.arm(3, 9, 5_000, 0, TimerKind::Movable);
        s.vcpu_halt(3);
        s.arm(0, 10, 6_000, 0, TimerKind::Pinned);
        s.arm(0, 11, 7_000, 0, TimerKind::Movable);
        // vCPU 0 is the last non-isolated running vCPU: under Pull another
        // one must be forced active, and that is vCPU 3, not 1 or 2.
        let forced = s.vcpu_offline(0);
        if policy == Policy::Pull {
            assert_eq!(forced, Some(3), "{policy}");
        }
        for id in [10, 11] {
            assert_eq!(s.timer_owner(id).unwrap().0, 3, "{policy}: timer {id}");
        }
        s.check_invariants().unwrap();
        // Now only isolated vCPUs 1 and 2 would be left: the hand-off goes
        // to the lowest of them, nothing is forced active.
        s.vcpu_run(3);
        assert_eq!(s.handoff_target(3), 1, "{policy}");
        assert_eq!(s.vcpu_offline(3), None, "{policy}");
        for id in [9, 10, 11] {
            assert_eq!(s.timer_owner(id).unwrap().0, 1, "{policy}: timer {id}");
        }
        s.check_invariants().unwrap();
        // The last online vCPU hands off to itself.
        s.vcpu_offline(2);
        assert_eq!(s.handoff_target(1), 1);
    }
}

fn op_strategy(n: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..n, 0..32u32, 1..20_000u64, any::<bool>(), prop_oneof![Just(0u64), 0..20_000u64]).prop_map(|(cpu, id, delta, p, slack)| Op::Arm {
            slack,
            cpu, id, delta, kind: if p { TimerKind::Pinned } else { TimerKind::Movable }
        }),
        1 => (0..32u32).prop_map(|id| Op::Cancel { id }),
        3 => (0..n).prop_map(|cpu| Op::Halt { cpu }),
        1 => (0..n).prop_map(|cpu| Op::Run { cpu }),
        2 => (1..5_000u64).prop_map(|dt| Op::Advance { dt }),
        1 => (0..n).prop_map(|cpu| Op::Expire { cpu }),
        1 => (0..n).prop_map(|cpu| Op::Online { cpu }),
        1 => (0..n).prop_map(|cpu| Op::Offline { cpu }),
        1 => (0..n, any::<bool>()).prop_map(|(cpu, idle)| Op::PushIdle { cpu, idle }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every policy, some vCPUs isolated: the model's checks (an isolated
    /// vCPU never expires another's timer, never receives a Push placement
    /// or a hand-off while a non-isolated vCPU is online, is never forced
    /// active, wakes for its own timers) plus the invariants after each step.
    #[test]
    fn isolated_vcpus_match_model(
        (n, gs, pol, iso, ops) in (2..24u32, 2..9usize, 0..3u8).prop_flat_map(|(n, gs, pol)| {
            (Just(n), Just(gs), Just(pol),
             proptest::collection::vec(0..n, 1..(n as usize).min(6)),
             proptest::collection::vec(op_strategy(n), 1..200))
        })
    ) {
        let cfg = SimConfig {
            policy: POLICIES[pol as usize],
            possible: n,
            initially_online: (n / 2).max(1),
            group_size: gs,
            nodes: (n % 2 == 0).then(|| (0..n).map(|c| c % 2).collect()),
            max_timers: 32,
            isolated: iso,
        };
        Sim::run(&cfg, &ops).map_err(|e| TestCaseError::fail(format!("{cfg:?}\n{e}")))?;
    }
}
