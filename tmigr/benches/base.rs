//! Arm+cancel cost of the timer base, against a BTreeSet queue, at a few
//! queue sizes. A std-only harness (no criterion: it would be the heaviest
//! build dependency for one number). Run:
//! `cargo bench -p tmigr --bench base`.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Instant;

use tmigr::base::{TimerBase, TimerSlots};
use tmigr::TimerKind;

fn bench_heap(pending: u32, iters: u32) -> f64 {
    let slots = TimerSlots::new(pending + 1);
    let mut b = TimerBase::new(0);
    for i in 0..pending {
        b.arm(
            &slots,
            i,
            1_000_000 + (i as u64 * 7919) % 100_000,
            0,
            TimerKind::Movable,
        )
        .unwrap();
    }
    let id = pending;
    let t = Instant::now();
    for i in 0..iters {
        b.arm(
            &slots,
            id,
            1_000_000 + (i as u64 * 104_729) % 100_000,
            0,
            TimerKind::Movable,
        )
        .unwrap();
        black_box(b.cancel(&slots, id));
    }
    black_box(b.first(&slots, TimerKind::Movable));
    t.elapsed().as_nanos() as f64 / iters as f64
}

fn bench_btree(pending: u32, iters: u32) -> f64 {
    let mut set = BTreeSet::new();
    let mut at = vec![0u64; pending as usize + 1];
    for i in 0..pending {
        let d = 1_000_000 + (i as u64 * 7919) % 100_000;
        at[i as usize] = d;
        set.insert((d, i));
    }
    let id = pending;
    let t = Instant::now();
    for i in 0..iters {
        let d = 1_000_000 + (i as u64 * 104_729) % 100_000;
        at[id as usize] = d;
        set.insert((d, id));
        black_box(set.remove(&(at[id as usize], id)));
    }
    black_box(set.first());
    t.elapsed().as_nanos() as f64 / iters as f64
}

/// Through the service (base lock, slot claim, kick check) on a running vCPU.
fn bench_service(pending: u32, iters: u32) -> f64 {
    use tmigr::{FakeClock, Policy, ServiceConfig, TimerService};
    let svc = TimerService::new(
        ServiceConfig {
            policy: Policy::Pull,
            max_timers: pending + 1,
            group_size: 8,
            nodes: None,
            max_cpus: None,
            isolated: Vec::new(),
        },
        FakeClock::new(0),
        8,
    );
    for i in 0..pending {
        svc.arm(
            0,
            i,
            1_000_000 + (i as u64 * 7919) % 100_000,
            0,
            TimerKind::Movable,
        );
    }
    let t = Instant::now();
    for i in 0..iters {
        svc.arm(
            0,
            pending,
            1_000_000 + (i as u64 * 104_729) % 100_000,
            0,
            TimerKind::Movable,
        );
        black_box(svc.cancel(pending));
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

fn main() {
    let iters = 2_000_000;
    println!("arm+cancel pair, ns (kernel's published pull enqueue/dequeue: 109 ns)");
    for pending in [16, 256, 4096, 65536] {
        let h = bench_heap(pending, iters);
        let bt = bench_btree(pending, iters);
        let sv = bench_service(pending, iters);
        println!(
            "pending {pending:>6}: heap+lazy-delete {h:6.1}   btreeset {bt:6.1}   service {sv:6.1}"
        );
    }
}
