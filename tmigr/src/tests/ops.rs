//! Tests of each operation, and regressions found by the property tests.

use crate::clock::Clock;
use crate::model::{Op, Sim, SimConfig};
use crate::service::{Policy, TimerKind};

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
