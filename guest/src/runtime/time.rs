//! Time and waiting. A vCPU waits by halting (the point of quietvm: an idle vCPU costs nothing) until
//! one of its own callbacks makes the condition true, or until its sleep timer fires. Each vCPU owns one
//! sleep timer: the last `vcpus` timer ids are reserved for them, the rest are the workloads'.

use super::device::{self, status, Expired, PINNED};
use super::{boot, irq, percpu, queues};
use core::sync::atomic::Ordering;

pub const MS: u64 = 1_000_000;
pub const US: u64 = 1_000;

pub fn now() -> u64 {
    device::now()
}

/// Timer ids the workloads may use: `0 .. workload_timers()`.
pub fn workload_timers() -> u32 {
    let info = boot::info();
    info.max_timers.saturating_sub(info.vcpus)
}

fn sleep_timer(cpu: u32) -> u32 {
    workload_timers() + cpu
}

/// Called for every expired timer first: true if it was a sleep timer. The flag set is the sleep
/// timer's own vCPU's, not this one's: after a vCPU went offline its timers, its sleep timer too,
/// fire on another vCPU (docs/api.md).
pub fn on_timer(expired: &Expired) -> bool {
    if expired.id < workload_timers() {
        return false;
    }
    percpu::of(expired.id - workload_timers())
        .sleep_fired
        .store(true, Ordering::Relaxed);
    true
}

/// Halts until `done()` is true (checked with the doorbell masked, so a callback cannot slip in between
/// the check and the halt) or, with a deadline, until the guest clock passes it. Returns `done()`.
/// Only from main code (unmasked), not from callbacks.
///
/// In queue mode the `SYNC`s owed by armings of callbacks that ran while it halted, and by its own
/// sleep timer's arming, are left to its `HLT` exits, which make quietvm read the submission ring; it
/// pays what is still owed when it returns instead (`queues`, "Owed SYNCs").
pub fn wait_until(deadline: Option<u64>, done: impl Fn() -> bool) -> bool {
    let result = wait(deadline, done);
    queues::pay_owed();
    result
}

fn wait(deadline: Option<u64>, done: impl Fn() -> bool) -> bool {
    assert!(!irq::is_masked(), "wait_until with the doorbell masked");
    let cpu = percpu::index();
    let sleep = sleep_timer(cpu);
    let pc = percpu::of(cpu);
    pc.sleep_fired.store(false, Ordering::Relaxed);
    if let Some(deadline) = deadline {
        let reply = device::arm_before_halt(sleep, PINNED, deadline);
        match reply.status {
            status::OK => {}
            status::PAST => return done(),
            s => panic!("ARM of the sleep timer answered {}", status::name(s)),
        }
    }
    let result = loop {
        irq::mask();
        if done() {
            irq::unmask();
            break true;
        }
        if pc.sleep_fired.load(Ordering::Relaxed) {
            irq::unmask();
            break false;
        }
        let offline_before = pc.offline_count.load(Ordering::SeqCst);
        super::hotplug::go_offline_if_asked();
        if pc.offline_count.load(Ordering::SeqCst) != offline_before {
            // Back from offline. quietvm handed this vCPU's timers, the sleep timer too, to another
            // vCPU, where they fire without waking this one: arm the sleep timer here again (an ARM
            // places it on the arming vCPU), and look again before halting.
            if let Some(deadline) = deadline {
                if !pc.sleep_fired.load(Ordering::Relaxed) {
                    match device::arm_before_halt(sleep, PINNED, deadline).status {
                        status::OK => {}
                        status::PAST => pc.sleep_fired.store(true, Ordering::Relaxed),
                        s => panic!("ARM of the sleep timer answered {}", status::name(s)),
                    }
                }
            }
            irq::unmask();
            continue;
        }
        // A doorbell handler that runs from here to the flag's reset leaves what it owes to the
        // `HLT` exit (or to this function's return).
        pc.halting.store(true, Ordering::SeqCst);
        super::queues::halt_then_unmask();
        pc.halting.store(false, Ordering::SeqCst);
    };
    if deadline.is_some() && !pc.sleep_fired.load(Ordering::Relaxed) {
        // After an offline it may be half-way through firing on another vCPU: wait for that
        // callback, so it cannot set the flag of this vCPU's next wait.
        while device::cancel_sync(sleep).status == status::RUNNING {
            crate::arch::pause();
        }
    }
    result
}

/// Halts until the guest clock reaches `deadline`.
pub fn sleep_until(deadline: u64) {
    wait_until(Some(deadline), || false);
}

/// Spins (busy, interrupts on) until the guest clock reaches `deadline`; returns the clock.
pub fn spin_until(deadline: u64) -> u64 {
    loop {
        let now = now();
        if now >= deadline {
            return now;
        }
    }
}

/// Like `wait_until`, for a condition another vCPU may make true (which does not wake this one): halts
/// in steps of `interval`, until `done()` or until the clock passes `limit`. Returns `done()`.
pub fn poll_until(limit: u64, interval: u64, done: impl Fn() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        let now = now();
        if now >= limit {
            return done();
        }
        if wait_until(Some((now + interval).min(limit)), &done) {
            return true;
        }
    }
}
