//! Tests of each operation, and regressions found by the property tests.

use crate::clock::Clock;
use crate::model::{Op, Sim, SimConfig};
use crate::types::{Policy, TimerKind};

#[test]
fn regression_offline_then_idle_parent_keeps_event() {
    use Op::*;
    let cfg = SimConfig {
        policy: Policy::Pull,
        possible: 18,
        initially_online: 9,
        group_size: 3,
        nodes: None,
        max_timers: 32,
        isolated: vec![],
    };
    let ops = [
        Online { cpu: 9 },
        Halt { cpu: 4 },
        Halt { cpu: 5 },
        Halt { cpu: 7 },
        Halt { cpu: 0 },
        Arm {
            cpu: 3,
            id: 0,
            delta: 11657,
            slack: 0,
            kind: TimerKind::Movable,
        },
        Advance { dt: 1 },
        Halt { cpu: 3 },
        Halt { cpu: 6 },
        Advance { dt: 3338 },
        Advance { dt: 3183 },
        Offline { cpu: 3 },
        Advance { dt: 457 },
        Halt { cpu: 1 },
        Halt { cpu: 2 },
        Offline { cpu: 8 },
        Advance { dt: 4679 },
    ];
    let mut sim = Sim::new(&cfg);
    for (i, op) in ops.iter().enumerate() {
        let r = sim.step(*op);
        eprintln!(
            "#{i} {op:?} now={} owner={:?} told={:?}",
            sim.clock.now_ns(),
            sim.svc.timer_owner(0),
            &sim.told[..10]
        );
        if i >= 13 {
            eprintln!("{}", sim.svc.hierarchy().dump());
        }
        r.unwrap();
    }
}

#[test]
fn hierarchy_grows_levels_for_many_cpus_and_small_capacities() {
    use crate::hierarchy::{HierConfig, Hierarchy};
    for (n, gs, levels) in [
        (1u32, 2usize, 1usize),
        (3, 2, 2),
        (4, 2, 2),
        (5, 2, 3),
        (8, 8, 1),
        (9, 8, 2),
        (64, 8, 2),
        (300, 8, 3),
        (300, 2, 9),
    ] {
        let h = Hierarchy::new(HierConfig {
            group_size: gs,
            nodes: None,
            max_cpus: n,
        });
        for c in 0..n {
            h.online(c);
        }
        assert_eq!(h.levels(), levels, "{n} cpus, group size {gs}");
        h.check_invariants(&|_| crate::types::KTIME_MAX).unwrap();
    }
}

#[test]
fn nodes_keep_groups_apart_below_crossnode_level() {
    use crate::hierarchy::{HierConfig, Hierarchy};
    // 2 nodes of 4 vCPUs interleaved, group size 2: crossnode level 2.
    let nodes: Vec<u32> = (0..8).map(|c| c % 2).collect();
    let h = Hierarchy::new(HierConfig {
        group_size: 2,
        nodes: Some(nodes.clone()),
        max_cpus: 8,
    });
    assert_eq!(h.crossnode_level(), 2);
    for c in 0..8 {
        h.online(c);
    }
    for a in 0..8u32 {
        for b in 0..8u32 {
            if h.cpu_group(a) == h.cpu_group(b) {
                assert_eq!(
                    nodes[a as usize], nodes[b as usize],
                    "cpus {a} and {b} share a group"
                );
            }
        }
    }
    h.check_invariants(&|_| crate::types::KTIME_MAX).unwrap();
}
