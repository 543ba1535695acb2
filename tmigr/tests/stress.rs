//! Multi-threaded stress on real threads and the host clock: one thread per
//! vCPU plays the VMM (arm, cancel, halt/sleep/wake, exits, kicks) for a
//! bounded time per policy; a checker records every arming and every expiry.
//! Checked: nothing early (deadline <= clock after `expire` returned),
//! nothing twice, nothing replaced or cancelled fires, and after a final
//! drain nothing missed. Timings are never asserted.
#![cfg(not(loom))]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use tmigr::{Clock, Expired, MonotonicClock, Policy, ServiceConfig, TimerKind, TimerService};

const CPUS: u32 = 6;
const IDS_PER_CPU: u32 = 8;

#[derive(Default)]
struct IdLog {
    live: Option<u64>,
    armed: Vec<u64>,
    fired: HashSet<u64>,
    dead: HashSet<u64>,
    last: u64,
}

struct World {
    svc: TimerService<MonotonicClock>,
    logs: Vec<Mutex<IdLog>>,
    threads: Mutex<Vec<Option<Thread>>>,
    stop: AtomicBool,
}

impl World {
    fn record(&self, cpu: u32, out: &[Expired]) {
        let now = self.svc.clock().now_ns();
        for e in out {
            assert!(e.deadline <= now, "early: {e:?} at {now}");
            if self.svc.is_isolated(cpu) {
                assert_eq!(e.owner, cpu, "isolated vCPU {cpu} expired {e:?}");
            }
            if self.svc.policy() != Policy::Pull {
                assert_eq!(
                    e.owner,
                    cpu,
                    "{e:?} expired off its base under {:?}",
                    self.svc.policy()
                );
            }
            let mut l = self.logs[e.id as usize].lock().unwrap();
            assert!(
                !l.dead.contains(&e.deadline),
                "cancelled/replaced arming fired: {e:?}"
            );
            assert!(l.fired.insert(e.deadline), "fired twice: {e:?}");
        }
    }

    fn kick(&self) {
        let mut k = Vec::new();
        self.svc.take_kicks(&mut k);
        let th = self.threads.lock().unwrap();
        for c in k {
            if let Some(t) = &th[c as usize] {
                t.unpark();
            }
        }
    }

    fn exit(&self, cpu: u32, out: &mut Vec<Expired>) -> u64 {
        out.clear();
        self.svc.expire(cpu, out);
        self.record(cpu, out);
        self.kick();
        self.svc.next_event(cpu)
    }
}

fn sleep_until(clock: &MonotonicClock, t: u64, cap: Duration) {
    let now = clock.now_ns();
    if t > now {
        thread::park_timeout(Duration::from_nanos(t - now).min(cap));
    }
}

fn vcpu_thread(w: Arc<World>, cpu: u32, seed: u64) {
    let mut x = seed | 1;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let clock = *w.svc.clock();
    let mut out = Vec::new();
    let mut next = w.exit(cpu, &mut out);
    while !w.stop.load(Ordering::Relaxed) {
        match rnd(10) {
            0..=3 => {
                let id = cpu * IDS_PER_CPU + rnd(IDS_PER_CPU as u64) as u32;
                let kind = if rnd(3) == 0 {
                    TimerKind::Pinned
                } else {
                    TimerKind::Movable
                };
                let mut l = w.logs[id as usize].lock().unwrap();
                // Unique deadline per arming of an id: it identifies the arming.
                let d = (clock.now_ns() + 50_000 + rnd(2_000_000)).max(l.last + 1);
                l.last = d;
                // Half of the armings have a window (up to 0.5 ms).
                let slack = if rnd(2) == 0 { 0 } else { rnd(500_000) };
                let was = w.svc.arm(cpu, id, d, slack, kind);
                if was {
                    let old = l.live.unwrap();
                    l.dead.insert(old);
                }
                l.live = Some(d);
                l.armed.push(d);
                drop(l);
                w.kick();
            }
            4 => {
                let id = cpu * IDS_PER_CPU + rnd(IDS_PER_CPU as u64) as u32;
                let mut l = w.logs[id as usize].lock().unwrap();
                if w.svc.cancel(id) {
                    let old = l.live.take().unwrap();
                    l.dead.insert(old);
                }
                l.live = None;
            }
            5..=7 => {
                // HLT: sleep until the returned time or a kick, then wake.
                let wake = w.svc.vcpu_halt(cpu);
                w.kick();
                sleep_until(&clock, wake, Duration::from_millis(3 + rnd(5)));
                w.svc.vcpu_run(cpu);
                // Push: a vCPU woken into its doorbell handler counts as idle.
                w.svc.set_push_idle(cpu, rnd(2) == 0);
                next = w.exit(cpu, &mut out);
            }
            _ => {
                // Guest runs until its kick timer (or a kick), then exits.
                sleep_until(&clock, next, Duration::from_micros(200 + rnd(800)));
                w.svc.set_push_idle(cpu, false);
                next = w.exit(cpu, &mut out);
            }
        }
    }
}

fn stress(policy: Policy, millis: u64) {
    stress_isolated(policy, millis, &[]);
}

fn stress_isolated(policy: Policy, millis: u64, isolated: &[u32]) {
    let w = Arc::new(World {
        svc: TimerService::new(
            ServiceConfig {
                policy,
                max_timers: CPUS * IDS_PER_CPU,
                group_size: 2,
                nodes: None,
                max_cpus: None,
                isolated: isolated.to_vec(),
            },
            MonotonicClock::new(),
            CPUS,
        ),
        logs: (0..CPUS * IDS_PER_CPU)
            .map(|_| Mutex::new(IdLog::default()))
            .collect(),
        threads: Mutex::new(vec![None; CPUS as usize]),
        stop: AtomicBool::new(false),
    });
    let handles: Vec<_> = (0..CPUS)
        .map(|c| {
            let w = w.clone();
            thread::spawn(move || vcpu_thread(w, c, 0x9e37_79b9 * (c as u64 + 1)))
        })
        .collect();
    for (c, h) in handles.iter().enumerate() {
        w.threads.lock().unwrap()[c] = Some(h.thread().clone());
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(millis) {
        thread::sleep(Duration::from_millis(10));
        // Spurious unparks are allowed; keep sleepers honest about kicks.
        w.kick();
    }
    w.stop.store(true, Ordering::Relaxed);
    for h in &handles {
        h.thread().unpark();
    }
    for h in handles {
        h.join().unwrap();
    }
    // Quiescent now: every thread ended after an exit or a wake, i.e. running.
    w.svc.check_invariants().unwrap();
    // Drain: wait past every deadline, expire on every vCPU.
    let last = w
        .logs
        .iter()
        .map(|l| l.lock().unwrap().last)
        .max()
        .unwrap_or(0);
    while w.svc.clock().now_ns() <= last {
        thread::sleep(Duration::from_millis(1));
    }
    let mut out = Vec::new();
    for c in 0..CPUS {
        out.clear();
        w.svc.expire(c, &mut out);
        w.record(c, &out);
    }
    let mut armed = 0;
    for (id, l) in w.logs.iter().enumerate() {
        let l = l.lock().unwrap();
        for d in &l.armed {
            armed += 1;
            assert!(
                l.fired.contains(d) ^ l.dead.contains(d),
                "timer {id} arming {d}: missed (fired {}, dead {})",
                l.fired.contains(d),
                l.dead.contains(d)
            );
        }
    }
    let s = w.svc.stats();
    eprintln!("{policy}: {armed} armings, {s:?}");
    assert!(armed > 100);
}

#[test]
fn stress_pull_real_threads() {
    stress(Policy::Pull, 1500);
}

/// vCPUs 1 and 4 isolated: out of the hierarchy, they expire only their own
/// timers, and nothing is missed.
#[test]
fn stress_pull_isolated_real_threads() {
    stress_isolated(Policy::Pull, 600, &[1, 4]);
}

#[test]
fn stress_local_real_threads() {
    stress(Policy::Local, 400);
}

#[test]
fn stress_push_real_threads() {
    stress(Policy::Push, 400);
}
