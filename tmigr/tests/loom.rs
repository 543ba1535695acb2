//! Loom models of the hierarchy's concurrent paths. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p tmigr --test loom --release`.
//! Each model checks, after all threads joined, the hierarchy invariants
//! (active masks, migrator chains, idle events queued in parents) and that
//! no event is lost: a pending movable event is either reachable by an
//! active migrator or some vCPU must wake for it.
#![cfg(loom)]

use loom::thread;
use std::sync::Arc;
use tmigr::hierarchy::{HierConfig, Hierarchy};
use tmigr::KTIME_MAX;

const EVT: u64 = 100;

fn builder() -> loom::model::Builder {
    // Builder::new() reads LOOM_MAX_PREEMPTIONS; default to 3 (CI-sized: ~seconds; 2 misses the weakened initial load).
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b
}

fn hier(n: u32, gs: usize) -> Arc<Hierarchy> {
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

/// No event lost: the event is handled by the running migrator chain from
/// the root, or a vCPU wakes for it.
fn assert_covered(h: &Hierarchy, wakes: &[u64], running: &[u32]) {
    let root = h.root().unwrap();
    let covered_by_migrator = running.iter().any(|&c| h.next_remote_expiry(c) <= EVT);
    let covered_by_wake =
        wakes.iter().any(|&w| w <= EVT) || (0..h.max_cpus()).any(|c| h.cpu_wakeup(c) <= EVT);
    assert!(
        covered_by_migrator || covered_by_wake,
        "event {EVT} lost: root {:?} next {}, wakes {wakes:?}\n{}",
        h.group_state(root),
        h.group_next_expiry(root),
        h.dump()
    );
}

/// Two vCPUs of one group go idle at the same time; vCPU 1 has an event.
/// Whoever idles the group last (and so the root) must wake for it.
#[test]
fn loom_two_cpus_idle_one_group() {
    builder().check(|| {
        let h = hier(2, 2);
        let h1 = h.clone();
        let t = thread::spawn(move || h1.deactivate(1, EVT).firstexp);
        let w0 = h.deactivate(0, KTIME_MAX).firstexp;
        let w1 = t.join().unwrap();
        h.check_invariants(&|c| if c == 1 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[w0, w1], &[]);
    });
}

/// One vCPU idles while the other wakes, in one group: the waking one must
/// end up migrator (of group and root) with the idle one's event visible.
#[test]
fn loom_two_cpus_idle_and_wake_one_group() {
    builder().check(|| {
        let h = hier(2, 2);
        h.deactivate(1, KTIME_MAX);
        let h1 = h.clone();
        let t = thread::spawn(move || h1.activate(1));
        h.deactivate(0, EVT);
        t.join().unwrap();
        h.check_invariants(&|c| if c == 0 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[], &[1]);
    });
}

/// The review's out-of-order propagation across two levels (group size 2,
/// 3 vCPUs: GRP0:0 = {0, 1}, GRP0:1 = {2}): vCPU 2 is idle with an event,
/// vCPU 0 goes idle while vCPU 1 wakes. The root must end up active through
/// GRP0:0 with vCPU 1 as migrator, and vCPU 2's event reachable by it.
#[test]
fn loom_three_cpus_idle_and_wake_two_levels() {
    builder().check(|| {
        let h = hier(3, 2);
        h.deactivate(1, KTIME_MAX);
        h.deactivate(2, EVT);
        let h1 = h.clone();
        let t = thread::spawn(move || h1.activate(1));
        h.deactivate(0, KTIME_MAX);
        t.join().unwrap();
        h.check_invariants(&|c| if c == 2 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[], &[1]);
    });
}

/// Three vCPUs, two levels, all changing at once: 0 idles, 1 wakes, 2 idles
/// with an event.
#[test]
fn loom_three_cpus_all_change_two_levels() {
    builder().check(|| {
        let h = hier(3, 2);
        h.deactivate(1, KTIME_MAX);
        let h1 = h.clone();
        let h2 = h.clone();
        let t1 = thread::spawn(move || {
            h1.activate(1);
        });
        let t2 = thread::spawn(move || h2.deactivate(2, EVT).firstexp);
        let w0 = h.deactivate(0, KTIME_MAX).firstexp;
        t1.join().unwrap();
        let w2 = t2.join().unwrap();
        h.check_invariants(&|c| if c == 2 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[w0, w2], &[1]);
    });
}

/// The last running vCPU idles while an idle vCPU gets a first movable
/// timer (new timer while idle): someone must wake for it.
#[test]
fn loom_last_cpu_idles_while_other_arms_first_movable() {
    builder().check(|| {
        let h = hier(3, 2);
        h.deactivate(1, KTIME_MAX);
        h.deactivate(2, KTIME_MAX);
        let h1 = h.clone();
        let t = thread::spawn(move || h1.new_timer(1, EVT).map_or(KTIME_MAX, |r| r.firstexp));
        let w0 = h.deactivate(0, KTIME_MAX).firstexp;
        let w1 = t.join().unwrap();
        h.check_invariants(&|c| if c == 1 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[w0, w1], &[]);
    });
}

/// The last active vCPU goes offline while another idles again; vCPU 1's
/// event must be owned: either a wake-up is returned (the offline one's is
/// the hand-off: then another vCPU is forced active) or someone runs.
#[test]
fn loom_offline_last_active_cpu() {
    builder().check(|| {
        let h = hier(3, 2);
        h.deactivate(1, EVT);
        let h2 = h.clone();
        let t = thread::spawn(move || h2.deactivate(2, KTIME_MAX).firstexp);
        let w0 = h.offline(0).firstexp;
        let w2 = t.join().unwrap();
        assert_covered(&h, &[w0, w2], &[]);
        if w0 != KTIME_MAX {
            // tmigr_trigger_active: the hand-off target runs.
            h.activate(2);
            assert_covered(&h, &[w2], &[2]);
        }
        h.check_invariants(&|c| if c == 1 { EVT } else { KTIME_MAX })
            .unwrap();
    });
}

/// The kernel's "timers/migration: Fix another race between hotplug and
/// idle entry/exit" (and "Enforce group initialization visibility to tree
/// walkers"): vCPU 2 is prepared (a new root put above the old one, from
/// another thread) while vCPU 0, the last active vCPU of the old root, goes
/// idle and vCPU 1 has an event. The old root's state is reconciled with a
/// read-modify-write after the publication: without it (a plain load) the
/// preparing thread can read the old root still active while vCPU 0 read
/// "no parent", leaving a bogus active bit and migrator in the new root and
/// nobody on the way to vCPU 1's event. The non-loom twin is
/// `kernel_fix_hotplug_vs_idle_entry_exit` (src/tests/kernel_fixes.rs).
#[test]
fn loom_kernel_fix_hotplug_vs_idle() {
    builder().check(|| {
        let h = Arc::new(Hierarchy::new(HierConfig {
            group_size: 2,
            nodes: None,
            max_cpus: 3,
        }));
        h.online(0);
        h.online(1);
        h.deactivate(1, EVT);
        let h1 = h.clone();
        let t = thread::spawn(move || h1.prepare(2).firstexp);
        let w0 = h.deactivate(0, KTIME_MAX).firstexp;
        let wp = t.join().unwrap();
        h.check_invariants(&|c| if c == 1 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[w0, wp], &[]);
        // vCPU 2 comes online: it is the migrator and sees the event.
        h.online(2);
        assert_covered(&h, &[], &[2]);
    });
}

/// The same with idle exit: vCPU 1 wakes while vCPU 2 is prepared and vCPU 0
/// goes idle; the new root must end up with vCPU 1's subtree as migrator.
#[test]
fn loom_kernel_fix_hotplug_vs_idle_exit() {
    builder().check(|| {
        let h = Arc::new(Hierarchy::new(HierConfig {
            group_size: 2,
            nodes: None,
            max_cpus: 3,
        }));
        h.online(0);
        h.online(1);
        h.deactivate(1, KTIME_MAX);
        h.deactivate(0, EVT);
        let h1 = h.clone();
        let t = thread::spawn(move || h1.prepare(2).firstexp);
        h.activate(1);
        let wp = t.join().unwrap();
        h.check_invariants(&|c| if c == 0 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[wp], &[1]);
    });
}

/// The kernel's "timers/migration: Fix endless timer requeue after idle
/// interrupts" and the audit's double root wake-up: vCPU 0 idles the root
/// for vCPU 2's event; vCPU 1 (woken by an interrupt) halts again while
/// vCPU 0 wakes. Whatever the interleaving, the event is covered (a waking
/// vCPU, or the migrator vCPU 0) even when vCPU 1 leaves the wake-up to
/// vCPU 0's stored one; and when vCPU 0 halts again only one of them wakes.
#[test]
fn loom_kernel_fix_endless_requeue_after_idle_interrupts() {
    builder().check(|| {
        let h = hier(3, 2);
        h.deactivate(2, EVT);
        h.deactivate(1, KTIME_MAX);
        assert_eq!(h.deactivate(0, KTIME_MAX).firstexp, EVT);
        h.activate(1);
        let h1 = h.clone();
        let t = thread::spawn(move || h1.deactivate(1, KTIME_MAX).firstexp);
        h.activate(0);
        let w1 = t.join().unwrap();
        h.check_invariants(&|c| if c == 2 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[w1], &[0]);
        // vCPU 0 halts again: it or vCPU 1 (by its stored wake-up) wakes.
        let w0 = h.deactivate(0, KTIME_MAX).firstexp;
        h.check_invariants(&|c| if c == 2 { EVT } else { KTIME_MAX })
            .unwrap();
        assert_covered(&h, &[w0, w1], &[]);
        assert!(
            w0 == KTIME_MAX || w1 == KTIME_MAX,
            "both vCPUs wake for the root: {w0}, {w1}"
        );
    });
}

/// Windows: two idle vCPUs in different groups idle at the same time, vCPU 1
/// with `[50, 300]` and vCPU 2 with `[200, 250]`. Whoever idles the root
/// last wakes at the earliest window end (250, vCPU 2's), and the root's event
/// keeps the earliest deadline (50, vCPU 1's), so that one wake-up at 250
/// expires both: the events carry both ends, whatever the interleaving.
#[test]
fn loom_windows_two_cpus_idle_in_different_groups() {
    use tmigr::Expiry;
    let w1 = Expiry {
        soft: 50,
        hard: 300,
    };
    let w2 = Expiry {
        soft: 200,
        hard: 250,
    };
    builder().check(move || {
        let h = hier(4, 2);
        h.deactivate(0, KTIME_MAX);
        h.deactivate(3, KTIME_MAX);
        let h1 = h.clone();
        let t = thread::spawn(move || h1.deactivate(1, w1).firstexp);
        let wake2 = h.deactivate(2, w2).firstexp;
        let wake1 = t.join().unwrap();
        h.check_invariants(&|c| match c {
            1 => w1,
            2 => w2,
            _ => Expiry::NONE,
        })
        .unwrap();
        let root = h.root().unwrap();
        assert_eq!(
            h.group_next(root),
            Expiry {
                soft: 50,
                hard: 250
            },
            "{}",
            h.dump()
        );
        // Both may wake (each walk saw the root idle before the other stored
        // its wake-up); the earlier wake-up must be the earliest window end.
        assert_eq!(wake1.min(wake2), 250, "{}", h.dump());
    });
}
