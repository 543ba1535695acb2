//! The costs of the pull model's operations through the public `TimerService`, at 8, 64, 512 and
//! 4096 vCPUs (1, 2, 3 and 4 hierarchy levels):
//!
//! * `arm_cancel`: arm and cancel a movable timer on a running vCPU's own base (16 other timers
//!   pending there). Should not depend on the vCPU count at all.
//! * `halt_run_lone`: `vcpu_halt` + `vcpu_run` of the last vCPU while only vCPU 0 runs (every other
//!   vCPU idle with a movable timer in the hierarchy). The vCPU is alone in its subtree, so both
//!   walks go to the top: the worst case, which grows with the number of levels.
//! * `halt_run_sibling_active`: the same pair while a sibling in its level-0 group runs: both
//!   walks stop in the first group, whatever the size.
//! * `remote_expiry`: running vCPU 0 (the only one, so migrator of every group) calls `expire` and
//!   expires one due movable timer of the idle last vCPU: the walk down the groups it is migrator
//!   of, the remote expiry on the idle vCPU's base, and the re-queue walk back up. Only `expire`
//!   is timed (the arming and halting that make the timer due are not); each sample includes two
//!   `Instant::now()` reads.
//!
//! Every case uses a `FakeClock`, so no time source is read inside the measured calls.
//! `cargo bench -p tmigr --bench hierarchy`; figures in docs/performance.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tmigr::clock::FakeClock;
use tmigr::service::{Policy, ServiceConfig, TimerKind, TimerService};

const SIZES: [u32; 4] = [8, 64, 512, 4096];
/// Far enough that nothing set up here ever falls due unless a case moves the clock to it.
const FAR: u64 = 1_000_000_000_000;

/// A pull service over `n` vCPUs in which every vCPU owns a far movable timer (id = vCPU) and
/// all but `running` have halted, so the hierarchy holds a realistic set of idle events.
fn service(n: u32, running: &[u32], extra_timers: u32) -> TimerService<FakeClock> {
    let svc = TimerService::new(
        ServiceConfig {
            policy: Policy::Pull,
            max_timers: n + extra_timers,
            ..ServiceConfig::default()
        },
        FakeClock::new(1),
        n,
    );
    for c in 0..n {
        svc.arm(c, c, FAR + u64::from(c), 0, TimerKind::Movable);
    }
    for c in (0..n).filter(|c| !running.contains(c)) {
        svc.vcpu_halt(c);
    }
    for &c in running {
        svc.next_event(c);
    }
    let mut kicks = Vec::new();
    svc.take_kicks(&mut kicks);
    svc
}

fn arm_cancel(c: &mut Criterion) {
    let mut g = c.benchmark_group("arm_cancel");
    for n in SIZES {
        let svc = service(n, &[0], 17);
        // 16 more pending timers on vCPU 0's base, so the arming goes into a populated queue.
        for k in 0..16 {
            svc.arm(
                0,
                n + k,
                FAR / 2 + u64::from(k) * 1_000,
                0,
                TimerKind::Movable,
            );
        }
        let id = n + 16;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut deadline = 1_000_000;
            b.iter(|| {
                // Vary the deadline a little, as a guest re-arming a periodic timer would.
                deadline = 1_000_000 + (deadline + 7_919) % 1_000_000;
                svc.arm(0, id, black_box(deadline), 0, TimerKind::Movable);
                black_box(svc.cancel(id))
            })
        });
    }
    g.finish();
}

fn halt_run(c: &mut Criterion, name: &str, sibling_active: bool) {
    let mut g = c.benchmark_group(name);
    for n in SIZES {
        let me = n - 1;
        let mut running = vec![0, me];
        if sibling_active {
            running.push(me - 1);
        }
        let svc = service(n, &running, 0);
        let before = svc.stats().hierarchy.levels_walked;
        svc.vcpu_halt(me);
        svc.vcpu_run(me);
        eprintln!(
            "{name}: {n} vCPUs, {} levels; one pair walks {} groups",
            svc.hierarchy().levels(),
            svc.stats().hierarchy.levels_walked - before
        );
        let mut kicks = Vec::new();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let wake = svc.vcpu_halt(me);
                svc.vcpu_run(me);
                svc.take_kicks(&mut kicks);
                kicks.clear();
                black_box(wake)
            })
        });
    }
    g.finish();
}

fn halt_run_lone(c: &mut Criterion) {
    halt_run(c, "halt_run_lone", false);
}

fn halt_run_sibling_active(c: &mut Criterion) {
    halt_run(c, "halt_run_sibling_active", true);
}

fn remote_expiry(c: &mut Criterion) {
    let mut g = c.benchmark_group("remote_expiry");
    for n in SIZES {
        let svc = service(n, &[0], 1);
        let victim = n - 1;
        let id = n;
        let mut out = Vec::new();
        let mut kicks = Vec::new();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // The idle vCPU wakes, arms a timer due 1 ns from now, and halts again.
                    let now = svc.clock().advance(1_000);
                    svc.vcpu_run(victim);
                    svc.arm(victim, id, now + 1, 0, TimerKind::Movable);
                    svc.vcpu_halt(victim);
                    svc.clock().advance(2);
                    svc.take_kicks(&mut kicks);
                    kicks.clear();
                    out.clear();
                    let t = Instant::now();
                    svc.expire(0, &mut out);
                    timed += t.elapsed();
                    assert_eq!(out.len(), 1, "vCPU 0 must expire the idle vCPU's timer");
                }
                timed
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    targets = arm_cancel, halt_run_lone, halt_run_sibling_active, remote_expiry
}
criterion_main!(benches);
