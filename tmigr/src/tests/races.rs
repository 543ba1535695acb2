//! One test per race of the design note, named after it. Interleavings inside
//! an operation are forced with the hierarchy's test hooks: the hook runs on
//! the walking thread and performs the other vCPU's operation inline, at the
//! exact point of the race.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock::{Clock, FakeClock};
use crate::hierarchy::{HierConfig, Hierarchy, Hook, TMIGR_NONE};
use crate::service::{ServiceConfig, TimerService};
use crate::types::{CpuId, Policy, TimerKind, KTIME_MAX};

pub(super) type Svc = TimerService<Arc<FakeClock>>;

pub(super) fn hier(n: u32, gs: usize) -> Arc<Hierarchy> {
    let h = Arc::new(Hierarchy::new(HierConfig {
        group_size: gs,
        nodes: None,
        max_cpus: n,
    }));
    for c in 0..n {
        h.online(c);
    }
    h
}

pub(super) fn svc(n: u32, gs: usize) -> (Arc<Svc>, Arc<FakeClock>) {
    let clock = Arc::new(FakeClock::new(1_000));
    let s = Arc::new(TimerService::new(
        ServiceConfig {
            policy: Policy::Pull,
            max_timers: 64,
            group_size: gs,
            nodes: None,
            max_cpus: None,
            isolated: Vec::new(),
        },
        clock.clone(),
        n,
    ));
    (s, clock)
}

pub(super) fn set_hook_h(
    h: &Arc<Hierarchy>,
    pred: impl Fn(Hook) -> bool + Send + Sync + 'static,
    f: impl Fn(&Hierarchy) + Send + Sync + 'static,
) -> Arc<AtomicBool> {
    let fired = Arc::new(AtomicBool::new(false));
    let fired2 = fired.clone();
    let weak = Arc::downgrade(h);
    h.set_hook(Some(Arc::new(move |hk: Hook| {
        if pred(hk) && !fired2.swap(true, Ordering::SeqCst) {
            if let Some(t) = weak.upgrade() {
                f(&t);
            }
        }
    })));
    fired
}

pub(super) fn set_hook_s(
    s: &Arc<Svc>,
    pred: impl Fn(Hook) -> bool + Send + Sync + 'static,
    f: impl Fn(&Svc) + Send + Sync + 'static,
) -> Arc<AtomicBool> {
    let fired = Arc::new(AtomicBool::new(false));
    let fired2 = fired.clone();
    let weak = Arc::downgrade(s);
    s.hierarchy().set_hook(Some(Arc::new(move |hk: Hook| {
        if pred(hk) && !fired2.swap(true, Ordering::SeqCst) {
            if let Some(t) = weak.upgrade() {
                f(&t);
            }
        }
    })));
    fired
}

fn no_pending(_: CpuId) -> u64 {
    KTIME_MAX
}

/// The review's scenario: GRP0:0 = {0, 1}, GRP0:1 = {2, 3}, root GRP1:0.
/// CPU0 goes idle and has read GRP1:0 and computed "GRP0:0 idle" when CPU1
/// wakes and propagates all the way up first. CPU1's CAS on GRP1:0 changes
/// only `seq` (GRP0:0 was still marked active there), so without `seq` CPU0's
/// stale CAS would succeed and mark GRP0:0 idle under a running CPU1.
#[test]
fn race_out_of_order_propagation_seq_rejects_stale_cas() {
    let h = hier(4, 2);
    h.deactivate(1, KTIME_MAX);
    h.deactivate(3, KTIME_MAX);
    let g00 = h.cpu_group(0).unwrap();
    let root = h.root().unwrap();
    assert_eq!(h.group_parent(g00), Some(root));
    let before = h.stats().cas_retries;
    let fired = set_hook_h(
        &h,
        move |hk| matches!(hk, Hook::BeforeStateCas { cpu: 0, group, activating: false, attempt: 0 } if group == root),
        |h| {
            h.activate(1);
        },
    );
    h.deactivate(0, KTIME_MAX);
    assert!(fired.load(Ordering::SeqCst), "hook did not run");
    assert!(
        h.stats().cas_retries > before,
        "the stale CAS must fail on seq"
    );
    let rs = h.group_state(root);
    let g00_bit = 1u8; // GRP0:0 is the root's first child
    assert_ne!(
        rs.active & g00_bit,
        0,
        "GRP0:0 must stay active in the root: {rs:?}"
    );
    assert_eq!(
        h.responsible_cpu(root),
        h.responsible_cpu(root).filter(|&c| c == 1 || c == 2)
    );
    h.check_invariants(&no_pending).unwrap();
}

/// CPU0 and CPU1 are the two active children of GRP0:0, CPU0 the migrator.
/// CPU0 goes idle; between its load of the group state and its CAS, CPU1 goes
/// idle too (with an event queued). CPU0's CAS fails; it must rebuild its new
/// state from the re-loaded (Acquire) value, i.e. see that nobody is left
/// active, make the group idle and carry CPU1's event to the root, which it
/// now idles: so it must return CPU1's event as its wake-up. A retry computed
/// from the stale value would hand the migrator role to idle CPU1 and return
/// KTIME_MAX: the event would be lost. (Loom covers the memory-ordering half:
/// tests/loom.rs.)
#[test]
fn race_failed_cas_reloads_with_acquire() {
    let h = hier(2, 2);
    let g = h.cpu_group(0).unwrap();
    assert_eq!(h.group_state(g).migrator, 1);
    let before = h.stats().cas_retries;
    let fired = set_hook_h(
        &h,
        move |hk| matches!(hk, Hook::BeforeStateCas { cpu: 0, group, activating: false, attempt: 0 } if group == g),
        |h| {
            let r = h.deactivate(1, 5_000);
            assert_eq!(r.firstexp, KTIME_MAX, "CPU0 still looks active to CPU1");
        },
    );
    let r = h.deactivate(0, KTIME_MAX);
    assert!(fired.load(Ordering::SeqCst));
    assert!(h.stats().cas_retries > before);
    assert_eq!(h.group_state(g).migrator, TMIGR_NONE);
    assert_eq!(
        r.firstexp, 5_000,
        "CPU0 idled the root and must wake for CPU1's event"
    );
    h.check_invariants(&|c| if c == 1 { 5_000 } else { KTIME_MAX })
        .unwrap();
}

/// GRP0:0 = {0, 1}, GRP0:1 = {2}; 1 and 2 are halted, 0 is the last running
/// vCPU. While 0 halts, idle 1 gets a first movable timer (new timer while
/// idle). Two interleavings: 1's walk runs right after 0's CAS on GRP0:0, or
/// right after 0's CAS on the root. In both, someone must end up waking by
/// the deadline: the halting vCPU (it idles the root) or vCPU 1 itself (a
/// kick with its new wake-up); the event must not look "covered by an active
/// parent" to both.
#[test]
fn race_last_cpu_idles_while_other_arms_first_movable() {
    for level in 0..2 {
        let (s, clock) = svc(3, 2);
        s.vcpu_halt(1);
        s.vcpu_halt(2);
        let g = s.hierarchy().cpu_group(0).unwrap();
        let group = if level == 0 {
            g
        } else {
            s.hierarchy().root().unwrap()
        };
        let deadline = 10_000;
        let fired = set_hook_s(
            &s,
            move |hk| matches!(hk, Hook::AfterStateCas { cpu: 0, group: gg, activating: false } if gg == group),
            move |s| {
                s.arm(1, 7, deadline, 0, TimerKind::Movable);
            },
        );
        let wake0 = s.vcpu_halt(0);
        assert!(fired.load(Ordering::SeqCst));
        s.hierarchy().set_hook(None);
        let mut kicks = vec![];
        s.take_kicks(&mut kicks);
        let wake1 = s.hierarchy().cpu_wakeup(1);
        assert!(
            wake0 <= deadline || (kicks.contains(&1) && wake1 <= deadline),
            "level {level}: nobody wakes for the new timer (cpu0 wakes {wake0}, kicks {kicks:?}, cpu1 wakeup {wake1})"
        );
        s.check_invariants().unwrap();
        // Play the VMM: whoever wakes first at the deadline expires it.
        clock.set(deadline);
        let waker = if wake0 <= deadline { 0 } else { 1 };
        s.vcpu_run(waker);
        let mut out = vec![];
        s.expire(waker, &mut out);
        assert_eq!(
            out.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![7],
            "level {level}"
        );
    }
}

/// vCPU 1 is halted with a movable timer queued in the hierarchy; vCPU 0, the
/// last running one, goes offline. Someone must be made active, or nobody
/// ever expires the timer.
#[test]
fn race_last_active_cpu_offline_forces_another_active() {
    let (s, clock) = svc(3, 2);
    s.arm(1, 3, 5_000, 0, TimerKind::Movable);
    assert_eq!(s.vcpu_halt(1), KTIME_MAX);
    s.vcpu_halt(2);
    let forced = s.vcpu_offline(0).expect("must force a vCPU active");
    assert!(forced == 1 || forced == 2);
    let mut kicks = vec![];
    s.take_kicks(&mut kicks);
    assert!(kicks.contains(&forced));
    s.vcpu_run(forced);
    let mut out = vec![];
    s.expire(forced, &mut out);
    assert!(out.is_empty());
    assert_eq!(
        s.next_event(forced),
        5_000,
        "the forced vCPU is the migrator now"
    );
    clock.set(5_000);
    s.expire(forced, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].owner, 1);
    s.check_invariants().unwrap();
    // Not the last active vCPU: nobody needs forcing.
    assert_eq!(s.vcpu_offline(forced), None);
}

/// vCPUs 0 and 1 fill the root GRP0:0 (group_size 2); vCPU 2 comes online, so
/// a new root is created above GRP0:0. At the moment it is published, it must
/// already carry GRP0:0's bit (never a zero mask a delayed walker could turn
/// into a bogus permanent migrator), and walkers of the old root racing with
/// the publication must leave a consistent hierarchy: one activating, one
/// idling the old root.
#[test]
fn race_new_root_published_with_child_mask() {
    for idle_in_hook in [false, true] {
        let h = Arc::new(Hierarchy::new(HierConfig {
            group_size: 2,
            nodes: None,
            max_cpus: 3,
        }));
        h.online(0);
        h.online(1);
        h.deactivate(1, 7_000);
        if !idle_in_hook {
            h.deactivate(0, KTIME_MAX); // old root idle: CPU1 will wake in the hook
        }
        let seen = Arc::new(Mutex::new(None));
        let seen2 = seen.clone();
        let fired = set_hook_h(
            &h,
            |hk| matches!(hk, Hook::NewRootPublished { .. }),
            move |h| {
                let root = h.root().unwrap();
                let old = h.cpu_group(0).unwrap();
                *seen2.lock().unwrap() = Some((old, root, h.group_state(root)));
                assert_eq!(h.group_parent(old), Some(root));
                if idle_in_hook {
                    // The old root's last active vCPU idles it right now.
                    h.deactivate(0, KTIME_MAX);
                } else {
                    // A walker wakes in the old root and reaches the new root.
                    h.activate(1);
                }
            },
        );
        h.online(2);
        assert!(fired.load(Ordering::SeqCst));
        let (old, root, st) = seen.lock().unwrap().unwrap();
        assert_ne!(old, root);
        assert_eq!(
            st.active, 1,
            "new root published without the old root's bit: {st:?}"
        );
        assert_eq!(st.migrator, 1);
        h.check_invariants(&|c| {
            if c == 1 && idle_in_hook {
                7_000
            } else {
                KTIME_MAX
            }
        })
        .unwrap_or_else(|e| panic!("idle_in_hook {idle_in_hook}: {e}\n{}", h.dump()));
        let st = h.group_state(root);
        if idle_in_hook {
            // Only vCPU 2 runs; vCPU 1's event made it to the new root.
            assert_eq!(st.active, 2, "{st:?}");
            assert_eq!(h.group_next_expiry(root), 7_000);
            assert_eq!(h.next_remote_expiry(2), 7_000);
        } else {
            assert_eq!(st.active, 3, "{st:?}");
        }
    }
}

/// A migrator expires an idle vCPU that always has a timer due "now" in real
/// time: every time the migrator is about to expire it, time jumps and a new
/// timer due at the new time is armed on it. Remote expiry must still end
/// (it uses the `now` it sampled) and must expire what was due then.
#[test]
fn race_remote_expiry_livelock_makes_progress() {
    let (s, clock) = svc(2, 2);
    for i in 0..20 {
        s.arm(1, i, 2_000 + i as u64, 0, TimerKind::Movable);
    }
    s.vcpu_halt(1);
    let hooks = Arc::new(AtomicUsize::new(0));
    let hooks2 = hooks.clone();
    let weak = Arc::downgrade(&s);
    let clock2 = clock.clone();
    s.hierarchy().set_hook(Some(Arc::new(move |hk: Hook| {
        if let Hook::RemoteBeforeExpire { cpu: 1, .. } = hk {
            let n = hooks2.fetch_add(1, Ordering::SeqCst) as u32;
            if let Some(s) = weak.upgrade() {
                let now = clock2.advance(1_000);
                // Armed "by" idle vCPU 1 (e.g. a callback): due right now.
                s.arm(1, 30 + n % 30, now, 0, TimerKind::Movable);
            }
        }
    })));
    clock.set(2_100);
    let mut out = vec![];
    s.expire(0, &mut out);
    let first_round = hooks.load(Ordering::SeqCst);
    assert!(first_round <= 2, "remote expiry looped {first_round} times");
    assert_eq!(out.len(), 20, "everything due at the sampled time expires");
    // The timers armed meanwhile are due at later times: the next calls get
    // them, each call still bounded.
    for _ in 0..5 {
        out.clear();
        s.expire(0, &mut out);
    }
    assert!(hooks.load(Ordering::SeqCst) <= first_round + 10);
    s.hierarchy().set_hook(None);
    s.check_invariants().unwrap();
}

/// vCPU 0 idles the root and stores wake-up T1 (vCPU 1's timer). vCPU 1 then
/// wakes on its own, cancels its timer and halts again, idling the root
/// itself. vCPU 0's stored wake-up is now stale. When vCPU 0 wakes at T1 and
/// halts again, its wake-up must be recomputed (nothing pending: KTIME_MAX),
/// not re-armed from the stale T1 (in the past: an endless wake-up storm).
#[test]
fn race_stale_wakeup_recomputed_not_trusted() {
    let (s, clock) = svc(2, 2);
    s.arm(1, 1, 3_000, 0, TimerKind::Movable);
    s.vcpu_halt(1);
    assert_eq!(s.vcpu_halt(0), 3_000);
    assert_eq!(s.hierarchy().cpu_wakeup(0), 3_000);
    s.vcpu_run(1);
    assert!(s.cancel(1));
    assert_eq!(s.vcpu_halt(1), KTIME_MAX);
    clock.set(3_000);
    s.vcpu_run(0);
    assert_eq!(
        s.hierarchy().cpu_wakeup(0),
        KTIME_MAX,
        "wake-up cleared on activate"
    );
    let mut out = vec![];
    s.expire(0, &mut out);
    assert!(out.is_empty());
    for _ in 0..3 {
        let w = s.vcpu_halt(0);
        assert!(
            w > clock.now_ns(),
            "stale wake-up {w} trusted: wake-up storm"
        );
        s.vcpu_run(0);
    }
    s.vcpu_halt(0);
    s.check_invariants().unwrap();
}

/// `race_failed_cas_reloads_with_acquire` with a window: the event CPU1
/// queues from inside CPU0's walk is `[3000, 5000]`. CPU0's retried CAS idles
/// the root; it must wake at the window's end and the root must keep the
/// window's start, so that the wake-up expires what opened before it.
#[test]
fn race_failed_cas_reloads_with_acquire_keeps_windows() {
    use crate::types::Expiry;
    let window = Expiry {
        soft: 3_000,
        hard: 5_000,
    };
    let h = hier(2, 2);
    let g = h.cpu_group(0).unwrap();
    let fired = set_hook_h(
        &h,
        move |hk| matches!(hk, Hook::BeforeStateCas { cpu: 0, group, activating: false, attempt: 0 } if group == g),
        move |h| {
            let r = h.deactivate(1, window);
            assert_eq!(r.firstexp, KTIME_MAX, "CPU0 still looks active to CPU1");
        },
    );
    let r = h.deactivate(0, KTIME_MAX);
    assert!(fired.load(Ordering::SeqCst));
    assert_eq!(r.firstexp, 5_000, "woken at the window's end");
    assert_eq!(h.group_next(h.root().unwrap()), window);
    h.check_invariants(&|c| if c == 1 { window } else { Expiry::NONE })
        .unwrap();
}
