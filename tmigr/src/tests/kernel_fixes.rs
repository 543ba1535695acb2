//! Every fix the kernel's timer hierarchy (kernel/time/timer_migration.c)
//! needed since 6.9, as a test of tmigr (issue 15). Each test drives the
//! hierarchy into the situation the kernel commit describes and asserts the
//! fixed behaviour. Its comment says whether quietvm had the bug (and which
//! commit of ours fixed it) or why the shape cannot occur here, and names the
//! one-line change to quietvm that brings the kernel's bug back: each was
//! applied, seen to fail this test, and reverted (see the crate README's
//! table). Loom models of the ordering ones are in `tests/loom.rs`
//! (`loom_kernel_fix_*`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::races::{hier, set_hook_h, svc};
use crate::hierarchy::{HierConfig, Hierarchy, Hook, TMIGR_NONE};
use crate::types::{CpuId, TimerKind, KTIME_MAX};

fn no_pending(_: CpuId) -> u64 {
    KTIME_MAX
}

/// Groups reachable from the cpus that ever came online, with the cpus
/// beneath each one.
fn groups_with_cpus(h: &Hierarchy) -> BTreeMap<u32, BTreeSet<CpuId>> {
    let mut m: BTreeMap<u32, BTreeSet<CpuId>> = BTreeMap::new();
    for c in 0..h.max_cpus() {
        let mut g = h.cpu_group(c);
        while let Some(x) = g {
            m.entry(x).or_default().insert(c);
            g = h.group_parent(x);
        }
    }
    m
}

/// The shape every hierarchy must have: each parent exactly one level up,
/// every cpu at the same depth (the number of levels), one root at the top
/// level, and below the crossnode level no group with cpus of two nodes.
fn check_shape(h: &Hierarchy, nodes: Option<&[u32]>) -> Result<(), String> {
    let levels = h.levels();
    let root = h.root().ok_or("no root")?;
    if h.group_level(root) as usize + 1 != levels {
        return Err(format!(
            "root {root} at level {} of {levels}",
            h.group_level(root)
        ));
    }
    for (g, cpus) in groups_with_cpus(h) {
        let lvl = h.group_level(g);
        match h.group_parent(g) {
            Some(p) if h.group_level(p) != lvl + 1 => {
                return Err(format!(
                    "group {g} (level {lvl}) under group {p} of level {}",
                    h.group_level(p)
                ))
            }
            None if g != root => return Err(format!("group {g} not connected")),
            _ => {}
        }
        if let Some(nodes) = nodes {
            if (lvl as usize) < h.crossnode_level() {
                let ns: BTreeSet<u32> = cpus.iter().map(|&c| nodes[c as usize]).collect();
                if ns.len() > 1 {
                    return Err(format!(
                        "group {g} at level {lvl} (below crossnode level {}) holds cpus {cpus:?} of nodes {ns:?}",
                        h.crossnode_level()
                    ));
                }
            }
        }
    }
    for c in 0..h.max_cpus() {
        let Some(mut g) = h.cpu_group(c) else {
            continue;
        };
        let mut depth = 1;
        while let Some(p) = h.group_parent(g) {
            g = p;
            depth += 1;
        }
        if depth != levels {
            return Err(format!("cpu {c} at depth {depth} of {levels} levels"));
        }
    }
    Ok(())
}

/// Kernel fix 1: "timers/migration: Fix endless timer requeue after idle interrupts".
/// The kernel: a CPU that lost the race out of idle kept a stale wake-up
/// and reprogrammed for it forever. tmigr recomputes the wake-up on every
/// halt and clears it on activation (`race_stale_wakeup_recomputed_not_trusted`
/// checks that part). quietvm HAD the related shape an outside audit found:
/// once two vCPUs idled the root for the same expiry, both woke for every
/// later root expiry. Fixed in "tmigr: one wake-up per root expiry, not one
/// per vCPU that idled the root".
/// Re-break: in `Hierarchy::deactivate`, `if data.firstexp != KTIME_MAX &&
/// self.wakeup_covered(..)` -> `if false && ...`: every round then has two
/// wake-ups and the test fails (and so does the loom model
/// `loom_kernel_fix_endless_requeue_after_idle_interrupts`, which checks
/// the change never loses an event under any interleaving).
#[test]
fn kernel_fix_endless_requeue_after_idle_interrupts() {
    const PERIOD: u64 = 1_000;
    let (s, clock) = svc(2, 2);
    s.arm(1, 0, 2_000, 0, TimerKind::Movable);
    assert_eq!(s.vcpu_halt(1), KTIME_MAX);
    let mut told = [s.vcpu_halt(0), KTIME_MAX];
    assert_eq!(told[0], 2_000, "vCPU 0 idled the root");
    // vCPU 1 wakes on its own (a device interrupt) and halts again, idling
    // the root for the same expiry: vCPU 0 already wakes for it.
    clock.set(1_500);
    s.vcpu_run(1);
    let mut out = vec![];
    s.expire(1, &mut out);
    assert!(out.is_empty());
    s.next_event(1);
    told[1] = s.vcpu_halt(1);
    assert_eq!(
        told[1], KTIME_MAX,
        "a second vCPU wakes for the same root expiry"
    );
    s.check_invariants().unwrap();
    // Play the VMM for a few root expiries: the expired timer is re-armed
    // by whoever ran its callback. Exactly one wake-up per expiry.
    for round in 0..6 {
        let t = told.iter().copied().min().unwrap();
        assert_ne!(t, KTIME_MAX, "round {round}: nobody wakes");
        clock.set(t);
        let mut woke = vec![];
        for c in 0..2u32 {
            if told[c as usize] > t {
                continue;
            }
            woke.push(c);
            s.vcpu_run(c);
            out.clear();
            s.expire(c, &mut out);
            for e in &out {
                s.arm(c, e.id, t + PERIOD, 0, TimerKind::Movable);
            }
            s.next_event(c);
            told[c as usize] = s.vcpu_halt(c);
        }
        let mut kicks = vec![];
        s.take_kicks(&mut kicks);
        assert!(kicks.is_empty(), "round {round}: kicks {kicks:?}");
        assert_eq!(
            woke.len(),
            1,
            "round {round} at {t}: vCPUs {woke:?} all woke"
        );
        s.check_invariants().unwrap();
    }
}

/// Kernel fix 2: "timers/migration: Return early on deactivation" (and the buggy early
/// return it replaced). A deactivation whose group stays active stops there:
/// the parent is not touched (no seq bump, no lock), the remaining migrator
/// handles the event. quietvm always did this (`walk_done = new.active != 0`
/// in `inactive_up`); the buggy early return is fix 3's test.
/// Re-break: `let walk_done = new.active != 0;` -> `let walk_done = false;`
/// in `inactive_up`: the walk goes on to the root and the test fails.
#[test]
fn kernel_fix_return_early_on_deactivation() {
    let h = hier(4, 2);
    h.deactivate(2, KTIME_MAX);
    h.deactivate(3, KTIME_MAX);
    let g0 = h.cpu_group(0).unwrap();
    let root = h.root().unwrap();
    let before = h.group_state(root);
    let r = h.deactivate(0, 5_000);
    assert_eq!(r.levels, 1, "the walk must stop in the still active group");
    assert_eq!(r.stopped_at, Some(g0));
    assert_eq!(r.firstexp, KTIME_MAX);
    assert_eq!(h.group_state(root), before, "the parent was touched");
    assert_eq!(h.group_state(g0).migrator, 2, "vCPU 1 is the migrator now");
    assert_eq!(h.next_remote_expiry(1), 5_000);
    h.check_invariants(&|c| if c == 0 { 5_000 } else { KTIME_MAX })
        .unwrap();
}

/// Kernel fix 3: "timers/migration: Fix ignored event due to missing CPU update". The
/// kernel's early return skipped the update of the idling CPU's own event
/// in its still-active group, leaving it ignored: when the group later went
/// idle nobody woke for that CPU's timer. Cannot occur in quietvm:
/// `inactive_up` always calls `update_events` for the group it changed and
/// only then returns whether the walk is done.
/// Re-break: insert `if walk_done { return true; }` before
/// `self.update_events(g, child, childmask, data);` in `inactive_up`.
#[test]
fn kernel_fix_ignored_event_due_to_missing_cpu_update() {
    let h = hier(2, 2);
    let r = h.deactivate(0, 5_000);
    assert_eq!(r.firstexp, KTIME_MAX, "vCPU 1 still runs");
    assert_eq!(h.next_remote_expiry(1), 5_000, "vCPU 0's event is ignored");
    // Now the group goes idle: the last one must wake for vCPU 0's timer.
    let r = h.deactivate(1, KTIME_MAX);
    assert_eq!(r.firstexp, 5_000);
    h.check_invariants(&|c| if c == 0 { 5_000 } else { KTIME_MAX })
        .unwrap();
}

/// Kernel fix 4: "timer/migration: Fix quick check reporting late expiry". The
/// kernel's quick check returned the top group's next expiry, but while the
/// checking CPU is active its own groups' events are not propagated up, so
/// a lower group can hold an earlier one. quietvm's equivalent,
/// `next_remote_expiry` (which `requires_handle_remote` and `next_event`
/// use), has always kept the minimum over every group the vCPU is migrator
/// of: cannot occur.
/// Re-break: `first = first.min(grp.next_expiry.load(Ordering::Acquire));`
/// -> `first = grp.next_expiry.load(Ordering::Acquire);`.
#[test]
fn kernel_fix_quick_check_reporting_late_expiry() {
    // GRP0:0 = {0, 1}, GRP0:1 = {2, 3}; vCPU 0 is migrator of both levels.
    let (s, clock) = svc(4, 2);
    s.arm(2, 2, 8_000, 0, TimerKind::Movable);
    s.vcpu_halt(2);
    s.vcpu_halt(3);
    s.arm(1, 1, 3_000, 0, TimerKind::Movable);
    s.vcpu_halt(1);
    let h = s.hierarchy();
    let root = h.root().unwrap();
    assert_eq!(
        h.group_next_expiry(root),
        8_000,
        "GRP0:0 is active: its event stays below"
    );
    assert_eq!(h.next_remote_expiry(0), 3_000, "late expiry reported");
    assert!(!h.requires_handle_remote(0, 2_999));
    assert!(h.requires_handle_remote(0, 3_000));
    assert_eq!(s.next_event(0), 3_000);
    clock.set(3_000);
    let mut out = vec![];
    s.expire(0, &mut out);
    assert_eq!(out.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1]);
    s.check_invariants().unwrap();
}

/// Kernel fix 5: "timers/migration: Prevent out of bounds access on failure". The
/// kernel's error path, after a failed group allocation in the middle of
/// building a chain, indexed past the groups it had. Cannot occur in
/// quietvm: there is no failure path. The group arena is sized for
/// `max_cpus` at creation (every level, one partial group per node below the
/// crossnode level, one more per level for a new root), and `online` /
/// `prepare` reject a vCPU beyond `max_cpus` before touching anything. This
/// test shows the sizing holds for every shape we can build (node layouts,
/// group sizes, online orders) and that the rejection leaves a usable
/// hierarchy.
/// Re-break: `let extra = if lvl < crossnode_level { nnodes } else { 0 };`
/// -> `let extra = 0;` in `Hierarchy::new`: the arena runs out.
#[test]
fn kernel_fix_prevent_out_of_bounds_on_failure() {
    type Layout = fn(u32) -> u32;
    let layouts: [(&str, Option<Layout>); 5] = [
        ("one node", None),
        ("c % 2", Some(|c| c % 2)),
        ("c % 3", Some(|c| c % 3)),
        ("blocks of 3", Some(|c| c / 3)),
        ("one vCPU on node 1", Some(|c| (c == 5) as u32)),
    ];
    for n in [1u32, 2, 3, 5, 8, 9, 17, 33, 64] {
        for gs in 2..=8usize {
            for (name, layout) in layouts {
                let nodes: Option<Vec<u32>> = layout.map(|f| (0..n).map(f).collect());
                let orders: [Vec<u32>; 3] = [
                    (0..n).collect(),
                    (0..n).rev().collect(),
                    (0..n)
                        .filter(|c| c % 2 == 0)
                        .chain((0..n).filter(|c| c % 2 == 1))
                        .collect(),
                ];
                for order in orders {
                    let h = Hierarchy::new(HierConfig {
                        group_size: gs,
                        nodes: nodes.clone(),
                        max_cpus: n,
                    });
                    for &c in &order {
                        h.online(c);
                    }
                    let ctx = format!("{n} vCPUs, group size {gs}, {name}, order {order:?}");
                    h.check_invariants(&no_pending)
                        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    check_shape(&h, nodes.as_deref()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                }
            }
        }
    }
    // A vCPU beyond max_cpus is refused before anything changes.
    let h = hier(3, 2);
    let levels = h.levels();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.online(3)));
    assert!(r.is_err());
    assert_eq!(h.levels(), levels);
    h.check_invariants(&no_pending).unwrap();
    h.deactivate(0, 1_000);
    h.check_invariants(&|c| if c == 0 { 1_000 } else { KTIME_MAX })
        .unwrap();
}

/// Kernel fix 6: "timers/migration: Do not rely always on group->parent". A group's
/// parent link can appear while a walk is on its way up (a new root); the
/// kernel read `group->parent` at several points of one step and acted on
/// different answers. In quietvm a link is set once and each step reads it
/// once: `queue_child_evt` decides "top" from one Acquire load, and
/// `walk_groups` loads the parent only after the step said "go on", so the
/// decision and the continuation agree. Here a new root is published (and
/// the onlined vCPU halts) between vCPU 0's compare-and-swap on the old root
/// and its event update: vCPU 0's own, earlier event must still reach the
/// new root and somebody must wake for it.
/// Re-break: in `walk_groups`, load `parent` before calling `up(..)`
/// instead of after it (a parent read that predates the step).
#[test]
fn kernel_fix_do_not_rely_on_group_parent() {
    let h = Arc::new(Hierarchy::new(HierConfig {
        group_size: 2,
        nodes: None,
        max_cpus: 3,
    }));
    h.online(0);
    h.online(1);
    h.deactivate(1, 7_000);
    let old_root = h.root().unwrap();
    let w2 = Arc::new(Mutex::new(KTIME_MAX));
    let w2h = w2.clone();
    let fired = set_hook_h(
        &h,
        move |hk| matches!(hk, Hook::AfterStateCas { cpu: 0, group, activating: false } if group == old_root),
        move |h| {
            h.online(2);
            *w2h.lock().unwrap() = h.deactivate(2, KTIME_MAX).firstexp;
        },
    );
    let w0 = h.deactivate(0, 5_000).firstexp;
    assert!(fired.load(Ordering::SeqCst));
    h.set_hook(None);
    assert_ne!(h.root(), Some(old_root), "no new root");
    let w2 = *w2.lock().unwrap();
    assert!(
        w0.min(w2) <= 5_000,
        "nobody wakes for vCPU 0's event (wakes {w0}, {w2})\n{}",
        h.dump()
    );
    h.check_invariants(&|c| match c {
        0 => 5_000,
        1 => 7_000,
        _ => KTIME_MAX,
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", h.dump()));
}

/// Kernel fix 7: "timers/migration: Move hierarchy setup into cpuhotplug prepare
/// callback". The kernel set up an incoming CPU's groups on that CPU while
/// others went idle; a new top level could get a wrong migrator, or a zero
/// child mask that left it active for ever. quietvm had the shape (a vCPU
/// set up its own groups in `online`) but not the bug: the new root is
/// created with the old root's bit active and as migrator and reconciled
/// after publication. It now also has the kernel's shape:
/// `Hierarchy::prepare` / `TimerService::vcpu_prepare` set a vCPU's groups
/// up from any thread before it runs; `online` only activates it (and
/// prepares first if nobody did). Both paths are tested, with the old root
/// active and idle.
/// Re-break: in `setup_groups`, store `TmigrState::IDLE.pack()` instead of
/// the `{active: 1 << o_slot, migrator: 1 << o_slot}` state of a new group
/// above the old root (the zero child mask).
#[test]
fn kernel_fix_hierarchy_setup_in_prepare_callback() {
    for prepared in [true, false] {
        for old_root_active in [true, false] {
            let ctx = format!("prepared {prepared}, old root active {old_root_active}");
            let h = Arc::new(Hierarchy::new(HierConfig {
                group_size: 2,
                nodes: None,
                max_cpus: 3,
            }));
            h.online(0);
            h.online(1);
            h.deactivate(1, 7_000);
            let mut w0 = KTIME_MAX;
            if !old_root_active {
                w0 = h.deactivate(0, KTIME_MAX).firstexp;
                assert_eq!(w0, 7_000);
            }
            let old = h.root().unwrap();
            if prepared {
                // From another thread (the VMM's), before vCPU 2 exists.
                let h2 = h.clone();
                let r = std::thread::spawn(move || h2.prepare(2)).join().unwrap();
                assert_eq!(r.firstexp, KTIME_MAX, "{ctx}: vCPU 0 already wakes");
                let root = h.root().unwrap();
                assert_ne!(root, old, "{ctx}");
                let st = h.group_state(root);
                if old_root_active {
                    assert_eq!((st.active, st.migrator), (1, 1), "{ctx}: {st:?}");
                    assert_eq!(h.responsible_cpu(root), Some(0), "{ctx}");
                } else {
                    assert_eq!((st.active, st.migrator), (0, TMIGR_NONE), "{ctx}: {st:?}");
                    assert_eq!(h.group_next_expiry(root), 7_000, "{ctx}");
                }
                assert!(!h.cpu_is_online(2));
                h.check_invariants(&|c| if c == 1 { 7_000 } else { KTIME_MAX })
                    .unwrap_or_else(|e| panic!("{ctx}: {e}\n{}", h.dump()));
                assert_eq!(
                    w0.min(h.cpu_wakeup(0)),
                    if old_root_active { KTIME_MAX } else { 7_000 }
                );
            }
            h.online(2);
            let root = h.root().unwrap();
            assert_ne!(root, old, "{ctx}");
            let st = h.group_state(root);
            assert_eq!(
                st.active,
                if old_root_active { 3 } else { 2 },
                "{ctx}: {st:?}"
            );
            assert_eq!(
                h.next_remote_expiry(if old_root_active { 0 } else { 2 }),
                7_000,
                "{ctx}"
            );
            h.check_invariants(&|c| if c == 1 { 7_000 } else { KTIME_MAX })
                .unwrap_or_else(|e| panic!("{ctx}: {e}\n{}", h.dump()));
        }
    }
    // Through the service: prepared from the VMM's thread, then onlined.
    let (s, _clock) = svc(2, 2);
    s.vcpu_prepare(2);
    assert!(!s.is_online(2));
    s.check_invariants().unwrap();
    s.vcpu_online(2);
    s.check_invariants().unwrap();
}

/// Kernel fix 8: "timers/migration: Fix another race between hotplug and idle
/// entry/exit" and "timers/migration: Enforce group initialization
/// visibility to tree walkers". While a prepare connects the old root under
/// a new one, vCPUs of the old root go idle and wake. quietvm never had it:
/// groups are initialised while unreachable and published top-down with
/// Release (walkers Acquire), and the old root's state is reconciled after
/// publication with a read-modify-write (`reconcile_new_root`). Here: the
/// old root went idle just before the prepare (idle entry), then in the
/// middle of it (at `NewRootPublished`, before the reconciliation) vCPU 1
/// wakes and vCPU 0 halts; at that point every published group must be
/// reachable and fully initialised. The ordering half (a stale view of the
/// old root) is the loom model `loom_kernel_fix_hotplug_vs_idle`.
/// Re-break: remove the `self.reconcile_new_root(old, &mut data, cpu);`
/// call in `Hierarchy::prepare`: the new root keeps a bogus active bit.
#[test]
fn kernel_fix_hotplug_vs_idle_entry_exit() {
    for in_hook in [false, true] {
        let h = Arc::new(Hierarchy::new(HierConfig {
            group_size: 2,
            nodes: None,
            max_cpus: 3,
        }));
        h.online(0);
        h.online(1);
        h.deactivate(1, 7_000);
        let mut wakes = vec![];
        if !in_hook {
            wakes.push(h.deactivate(0, KTIME_MAX).firstexp);
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let fired = set_hook_h(
            &h,
            |hk| matches!(hk, Hook::NewRootPublished { .. }),
            move |h| {
                // Visibility: everything reachable is connected up to the
                // published root, level by level.
                let root = h.root().unwrap();
                for c in 0..2 {
                    let mut g = h.cpu_group(c).unwrap();
                    while let Some(p) = h.group_parent(g) {
                        assert_eq!(h.group_level(p), h.group_level(g) + 1);
                        g = p;
                    }
                    assert_eq!(g, root, "cpu {c} reaches {g}, not the root");
                }
                assert_ne!(h.group_state(root).active, 0, "new root with a zero mask");
                if in_hook {
                    h.activate(1);
                    let w = h.deactivate(0, KTIME_MAX).firstexp;
                    seen2.lock().unwrap().push(w);
                }
            },
        );
        let h2 = h.clone();
        let r = std::thread::spawn(move || h2.prepare(2)).join().unwrap();
        assert!(fired.load(Ordering::SeqCst));
        h.set_hook(None);
        wakes.push(r.firstexp);
        wakes.extend(seen.lock().unwrap().iter().copied());
        let pending = move |c: CpuId| if c == 1 && !in_hook { 7_000 } else { KTIME_MAX };
        h.check_invariants(&pending)
            .unwrap_or_else(|e| panic!("in_hook {in_hook}: {e}\n{}", h.dump()));
        let root = h.root().unwrap();
        let st = h.group_state(root);
        if in_hook {
            // vCPU 1 runs: it is the migrator all the way up.
            assert_eq!(h.responsible_cpu(root), Some(1), "{st:?}");
        } else {
            assert_eq!(st.active, 0, "bogus active bit in the new root: {st:?}");
            assert!(
                wakes.iter().any(|&w| w <= 7_000) || h.cpu_wakeup(0) <= 7_000,
                "nobody wakes for vCPU 1's event: {wakes:?}"
            );
        }
        h.online(2);
        h.check_invariants(&pending).unwrap();
    }
}

/// Kernel fix 9: "timers/migration: Fix off-by-one root mis-connection" (reported from
/// a production fleet). When one vCPU makes the hierarchy grow by several
/// levels at once (a first vCPU of a new node below the crossnode level),
/// the old root must be connected exactly one level up, on its own node's
/// chain, and only the topmost new group is the root. quietvm could not
/// have it before, because it grew one level at a time (with fix 10's
/// bug); the chain building of fix 10's commit is what this test holds
/// to the right shape.
/// Re-break: in `setup_groups`' join loop, `let mut k = lvl + 1;` ->
/// `let mut k = lvl + 2;` (the old root's new parent one level too high).
#[test]
fn kernel_fix_off_by_one_root_misconnection() {
    for (n, gs, nn) in [
        (8u32, 2usize, 2u32),
        (12, 2, 3),
        (16, 2, 2),
        (64, 4, 2),
        (128, 8, 2),
    ] {
        let nodes: Vec<u32> = (0..n).map(|c| c % nn).collect();
        let h = Hierarchy::new(HierConfig {
            group_size: gs,
            nodes: Some(nodes.clone()),
            max_cpus: n,
        });
        let ctx = format!("{n} vCPUs, group size {gs}, {nn} nodes");
        // vCPU 0 alone, then vCPU 1 of another node: every level up to the
        // crossnode level appears at once.
        h.online(0);
        let old_root = h.root().unwrap();
        h.online(1);
        assert_eq!(h.levels(), h.crossnode_level() + 1, "{ctx}");
        let p = h.group_parent(old_root).expect("old root not connected");
        assert_eq!(h.group_level(p), h.group_level(old_root) + 1, "{ctx}");
        check_shape(&h, Some(&nodes)).unwrap_or_else(|e| panic!("{ctx}: {e}\n{}", h.dump()));
        for c in 2..n {
            h.online(c);
            check_shape(&h, Some(&nodes)).unwrap_or_else(|e| panic!("{ctx}, +{c}: {e}"));
        }
        h.check_invariants(&no_pending).unwrap();
        // Events flow through the grown levels.
        for c in 1..n {
            h.deactivate(c, 1_000 + c as u64);
        }
        assert_eq!(h.next_remote_expiry(0), 1_001, "{ctx}");
        assert_eq!(h.deactivate(0, KTIME_MAX).firstexp, 1_001, "{ctx}");
    }
}

/// Kernel fix 10: "timers/migration: Fix imbalanced NUMA trees". quietvm HAD it (outside
/// audit): with nodes = vCPU % 2, group size 2 and 8 vCPUs onlined in
/// order, a level-1 group held vCPUs of both nodes and the tree had 4 levels
/// where 3 suffice. Fixed in "tmigr: balanced per-node trees when the root
/// grows, and a prepare step". Checked at every level below the crossnode
/// level (the old test only looked at level 0), in several online orders,
/// and the migrator of every group below the crossnode level is a vCPU of
/// that group's node.
/// Re-break: `let single = k >= self.crossnode_level || o_node == node;` ->
/// `let single = true;` in `setup_groups`.
#[test]
fn kernel_fix_imbalanced_numa_trees() {
    let nodes: Vec<u32> = (0..8).map(|c| c % 2).collect();
    let orders: [Vec<u32>; 3] = [
        (0..8).collect(),
        (0..8).rev().collect(),
        vec![0, 2, 4, 6, 1, 3, 5, 7],
    ];
    for order in orders {
        let h = Hierarchy::new(HierConfig {
            group_size: 2,
            nodes: Some(nodes.clone()),
            max_cpus: 8,
        });
        assert_eq!(h.crossnode_level(), 2);
        for &c in &order {
            h.online(c);
        }
        assert_eq!(h.levels(), 3, "order {order:?}\n{}", h.dump());
        check_shape(&h, Some(&nodes))
            .unwrap_or_else(|e| panic!("order {order:?}: {e}\n{}", h.dump()));
        h.check_invariants(&no_pending).unwrap();
        // Only vCPU 0 (node 0) and vCPU 7 (node 1) run: below the crossnode
        // level nobody migrates the other node's timers.
        for c in 1..7 {
            h.deactivate(c, 1_000 + c as u64);
        }
        for (g, cpus) in groups_with_cpus(&h) {
            if (h.group_level(g) as usize) < h.crossnode_level() {
                if let Some(m) = h.responsible_cpu(g) {
                    assert!(cpus.contains(&m), "group {g} {cpus:?} migrated by vCPU {m}");
                }
            }
        }
        h.check_invariants(&|c| {
            if (1..7).contains(&c) {
                1_000 + c as u64
            } else {
                KTIME_MAX
            }
        })
        .unwrap();
    }
}

/// Kernel fix 11: "timers/migration: Remove dead code handling idle CPU checking for
/// remote timers". quietvm HAD the same dead branch (an idle vCPU's
/// `requires_handle_remote` compared `now` with its wake-up): never reached,
/// since only running vCPUs expire, but a hazard: an idle vCPU let through
/// passes `check_migrator` on idle groups and expires other idle vCPUs'
/// timers while idle. Removed in "tmigr: an idle vCPU never checks for
/// remote timers". Here vCPU 0 idled the root and `expire` is called on it
/// while still halted (a caller breaking the contract): it must take nothing.
/// Re-break: restore `if tmc.idle.load(Ordering::Acquire) { return now >=
/// tmc.wakeup.load(Ordering::Acquire); }` in `requires_handle_remote`.
#[test]
fn kernel_fix_dead_code_idle_cpu_remote_check() {
    let (s, clock) = svc(2, 2);
    s.arm(1, 1, 3_000, 0, TimerKind::Movable);
    s.vcpu_halt(1);
    assert_eq!(s.vcpu_halt(0), 3_000);
    clock.set(3_000);
    let h = s.hierarchy();
    assert!(
        !h.requires_handle_remote(0, 3_000),
        "an idle vCPU checks for remote timers"
    );
    let mut out = vec![];
    s.expire(0, &mut out);
    assert!(out.is_empty(), "idle vCPU 0 expired {out:?}");
    s.vcpu_run(0);
    s.expire(0, &mut out);
    assert_eq!(
        out.iter().map(|e| (e.id, e.owner)).collect::<Vec<_>>(),
        vec![(1, 1)]
    );
    s.check_invariants().unwrap();
}

/// Kernel fix 12: "timers/migration: Fix livelock in tmigr_handle_remote_up()" (2026).
/// The kernel's remote expiry skipped an event without consuming it while
/// time moved on, and its loop found that event again for ever. Cannot
/// occur in quietvm: `handle_remote` samples `now` once, and every event it
/// pops is dequeued before it is handled, so a back-off (owner awake,
/// already being handled) consumes it too. Here, while migrator vCPU 0 is
/// expiring idle vCPU 3 (its `remote` flag set), time moves and vCPU 2
/// wakes: as GRP0:1's new migrator it finds vCPU 3's event due, must back
/// off (vCPU 3 is being handled) and must return.
/// Re-break: delete `gl.evts[slot] = EVT_NONE;` in `next_expired_groupevt`
/// (pop without consuming): vCPU 2 spins for ever and the watchdog fires.
#[test]
fn kernel_fix_livelock_in_handle_remote_up() {
    let (s, clock) = svc(4, 2);
    s.vcpu_halt(1);
    s.arm(3, 3, 2_000, 0, TimerKind::Movable);
    s.vcpu_halt(3);
    s.vcpu_halt(2);
    s.arm(0, 0, 2_000, 0, TimerKind::Movable);
    let backoffs = s.hierarchy().stats().remote_backoffs;
    let clock2 = clock.clone();
    let done = Arc::new(Mutex::new(None));
    let done2 = done.clone();
    let fired = Arc::new(AtomicBool::new(false));
    let fired2 = fired.clone();
    let weak = Arc::downgrade(&s);
    s.hierarchy().set_hook(Some(Arc::new(move |hk: Hook| {
        if !matches!(
            hk,
            Hook::RemoteBeforeExpire {
                migrator: 0,
                cpu: 3
            }
        ) || fired2.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let Some(s2) = weak.upgrade() else { return };
        clock2.advance(500);
        // vCPU 2 on its own thread, with a watchdog (on a livelock the
        // thread spins on until the test process exits).
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            s2.vcpu_run(2);
            let mut out = vec![];
            s2.expire(2, &mut out);
            let _ = tx.send(out);
        });
        let out = rx
            .recv_timeout(Duration::from_secs(3))
            .expect("vCPU 2's remote expiry livelocked");
        *done2.lock().unwrap() = Some(out);
    })));
    clock.set(2_000);
    let mut out = vec![];
    s.expire(0, &mut out);
    assert!(fired.load(Ordering::SeqCst));
    s.hierarchy().set_hook(None);
    let mut ids: Vec<_> = out.iter().map(|e| (e.id, e.owner)).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![(0, 0), (3, 3)],
        "own and remote timers due at the sampled time"
    );
    let out2 = done.lock().unwrap().take().expect("vCPU 2 did not finish");
    assert!(out2.is_empty(), "vCPU 3's timer expired twice: {out2:?}");
    assert!(
        s.hierarchy().stats().remote_backoffs > backoffs,
        "vCPU 2 did not back off"
    );
    s.check_invariants().unwrap();
}
