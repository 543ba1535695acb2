//! `abi-check`: vCPU 0 goes through every answer of the timer device (docs/timer-abi.md) and checks it:
//! NOW, INVALID (ids, flags), PAST, UNKNOWN_COMMAND, BAD_ACCESS (8- and 16-bit writes, read back with the
//! 32-bit `in`), BAD_ACK (POP/ACK naming a callback not running), DEADLOCK (CANCEL_SYNC from a timer's
//! own callback), re-arm and cancel values, the `exp_*` fields, and with 2+ vCPUs RUNNING (CANCEL_SYNC
//! while another vCPU runs the callback), a re-arm held back until that callback ends, and a re-arm
//! taking a timer over from another vCPU's queue; T is armed PINNED with a hostile slack of 2^64 - 1,
//! which quietvm must clamp to `MAX_SLACK_NS` and report as `exp_slack` (a pinned timer keeps the
//! guest's slack, whatever the VM's minimum; 0 under kvm-lapic, which has no slack).
//!
//! Then, on vCPU 0 in either mode: an expiry handed to vCPU 0 while it runs masked (D: in queue mode it
//! has fired, so `CANCEL` answers 0 and its callback runs once unmasked; with commands it waits for
//! `POP` and is still pending, so `CANCEL` answers 1 and it never fires); a timer re-armed from its own
//! callback and due while that callback still runs (H) fires again only after the callback ended; and
//! the windows of a pinned and a movable arming (S, S2). In queue mode (`queue_mode`) every rule of
//! docs/timer-abi.md's "Queue mode" besides, through the runtime: the flag and clock, the state words
//! and submission entries, `PAST`/`INVALID` changing nothing, `SYNC`'s value, the full ring, and an
//! owed `SYNC`. All of these go through the same `device` calls as the commands (`runtime::queues`).

mod queue_mode;

use super::Env;
use crate::arch;
use crate::checks;
use crate::runtime::device::{self, command, status, Expired, Reply, MOVABLE, NONE, PINNED};
use crate::runtime::doorbell;
use crate::runtime::time::{self, MS};
use crate::runtime::{boot, irq, lapic, percpu, queues, vm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Timer ids used: T fires on vCPU 0 and runs the in-callback checks; U runs a long callback on vCPU 1;
/// W is armed by vCPU 1 and taken over by vCPU 0; D is handed over while vCPU 0 is masked; H is re-armed
/// from its own callback; S and S2 have windows; `queue_mode` uses its own (`queue_mode::IDS`).
const T: u32 = 0;
const U: u32 = 1;
const W: u32 = 2;
const D: u32 = 3;
const H: u32 = 4;
const S: u32 = 5;
const S2: u32 = 6;

static CHECKS: AtomicU32 = AtomicU32::new(0);
static T_DEADLINE: AtomicU64 = AtomicU64::new(0);
static T_DONE: AtomicBool = AtomicBool::new(false);
static U_RUNNING: AtomicBool = AtomicBool::new(false);
static U_RELEASE: AtomicBool = AtomicBool::new(false);
/// When U's callback ends by itself (0: only when released).
static U_RELEASE_AT: AtomicU64 = AtomicU64::new(0);
/// U's callbacks so far, and the vCPU the last one ran on + 1.
static U_FIRES: AtomicU32 = AtomicU32::new(0);
static U_FIRED_ON: AtomicU32 = AtomicU32::new(0);
/// vCPU 1's progress: 1 = U (about to be) armed, 2 = W armed.
static STEP: AtomicU32 = AtomicU32::new(0);
/// vCPU W fired on + 1, and its exp_owner + 1.
static W_FIRED_ON: AtomicU32 = AtomicU32::new(0);
static W_OWNER: AtomicU32 = AtomicU32::new(0);
/// D's callbacks.
static D_FIRES: AtomicU32 = AtomicU32::new(0);
/// H's callbacks, whether one runs, the guest time its first one ended, and the deadline it re-armed for.
static H_FIRES: AtomicU32 = AtomicU32::new(0);
static H_IN_CALLBACK: AtomicBool = AtomicBool::new(false);
static H_ENDED_AT: AtomicU64 = AtomicU64::new(0);
static H_REARMED_FOR: AtomicU64 = AtomicU64::new(0);
/// S's and S2's deadlines, the slack they asked for, and their callbacks.
static S_DEADLINE: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
const S_SLACK: [u64; 2] = [3 * MS, 2 * MS];
static S_FIRES: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];

fn check(what: &str, ok: bool, got: impl core::fmt::Debug) {
    CHECKS.fetch_add(1, Ordering::Relaxed);
    if !ok {
        checks::fail!("{}: got {:?}", what, got);
    }
}

fn expect(what: &str, reply: Reply, want_status: u32, want_value: Option<u64>) {
    let ok = reply.status == want_status && want_value.is_none_or(|v| reply.value == v);
    check(what, ok, (status::name(reply.status), reply.value));
}

pub fn run(env: &Env) -> ! {
    env.ids(queue_mode::IDS.end);
    match env.cpu {
        0 => vcpu0(env),
        1 => vcpu1(),
        _ => vm::halt_forever(),
    }
}

fn vcpu0(env: &Env) -> ! {
    let max = boot::info().max_timers;
    let far = || time::now() + 1_000 * MS;

    // NOW: value = now, and the clock never goes backwards.
    let first = device::raw(command::NOW, NONE, 0, 0);
    check(
        "NOW: status OK, value = now",
        first.status == status::OK && first.value == first.now,
        first,
    );
    let mut last = first.value;
    let mut monotonic = true;
    for _ in 0..50 {
        let t = time::now();
        monotonic &= t >= last;
        last = t;
    }
    check("NOW is monotonic", monotonic, last);
    check(
        "in: last status OK",
        device::last_status() == status::OK,
        device::last_status(),
    );

    // Bad ids and flags: INVALID, nothing changes.
    expect(
        "ARM with id max_timers",
        device::arm(max, PINNED, far()),
        status::INVALID,
        None,
    );
    expect(
        "ARM with id 0xffffffff",
        device::arm(NONE, PINNED, far()),
        status::INVALID,
        None,
    );
    expect(
        "CANCEL with id max_timers",
        device::cancel(max),
        status::INVALID,
        None,
    );
    expect(
        "CANCEL_SYNC with id 0xffffffff",
        device::cancel_sync(NONE),
        status::INVALID,
        None,
    );
    expect(
        "ARM with flags 0",
        device::arm(T, 0, far()),
        status::INVALID,
        None,
    );
    expect(
        "ARM with flags 3 (PINNED|MOVABLE)",
        device::arm(T, 3, far()),
        status::INVALID,
        None,
    );
    expect(
        "ARM with flags 4",
        device::arm(T, 4, far()),
        status::INVALID,
        None,
    );
    expect(
        "CANCEL after invalid ARMs: nothing was armed",
        device::cancel(T),
        status::OK,
        Some(0),
    );

    // PAST: deadline not after now.
    expect(
        "ARM with deadline 0",
        device::arm(T, PINNED, 0),
        status::PAST,
        None,
    );
    let now = time::now();
    expect(
        "ARM with deadline = an earlier now",
        device::arm(T, MOVABLE, now),
        status::PAST,
        None,
    );
    expect(
        "CANCEL after PAST: nothing was armed",
        device::cancel(T),
        status::OK,
        Some(0),
    );

    // Unknown commands and access sizes.
    // OFFLINE_ACK with no offline request pending is refused and changes nothing.
    expect(
        "OFFLINE_ACK without a request",
        device::offline_ack(),
        status::INVALID,
        Some(0),
    );
    for cmd in [0, command::SYNC + 1, 0x100, 0xdead_beef] {
        expect(
            "unknown command",
            device::raw(cmd, T, PINNED, far()),
            status::UNKNOWN_COMMAND,
            None,
        );
    }
    check(
        "in: last status UNKNOWN_COMMAND",
        device::last_status() == status::UNKNOWN_COMMAND,
        device::last_status(),
    );
    // Access sizes are a property of the port, which the software device under kvm-lapic does not use.
    if !lapic::active() {
        arch::outw(boot::info().timer_port, command::NOW as u16);
        check(
            "16-bit out: BAD_ACCESS",
            device::last_status() == status::BAD_ACCESS,
            device::last_status(),
        );
        arch::outb(boot::info().timer_port, command::NOW as u8);
        check(
            "8-bit out: BAD_ACCESS",
            device::last_status() == status::BAD_ACCESS,
            device::last_status(),
        );
    }
    expect(
        "NOW after BAD_ACCESS",
        device::raw(command::NOW, NONE, 0, 0),
        status::OK,
        None,
    );

    // Arm, re-arm, cancel values.
    expect(
        "ARM of an idle timer: value 0",
        device::arm(T, PINNED, far()),
        status::OK,
        Some(0),
    );
    expect(
        "re-ARM: value 1",
        device::arm(T, PINNED, far()),
        status::OK,
        Some(1),
    );
    expect(
        "re-ARM as MOVABLE: value 1",
        device::arm(T, MOVABLE, far()),
        status::OK,
        Some(1),
    );
    expect(
        "CANCEL of a pending timer: value 1",
        device::cancel(T),
        status::OK,
        Some(1),
    );
    expect(
        "CANCEL of an idle timer: value 0",
        device::cancel(T),
        status::OK,
        Some(0),
    );
    expect(
        "CANCEL_SYNC of an idle timer: OK, value 0",
        device::cancel_sync(T),
        status::OK,
        Some(0),
    );
    expect(
        "ARM then CANCEL_SYNC: value 1",
        {
            device::arm(T, PINNED, far());
            device::cancel_sync(T)
        },
        status::OK,
        Some(1),
    );

    // POP/ACK naming a callback that is not running (masked: no real POP may run meanwhile).
    let was_unmasked = irq::mask();
    expect(
        "POP naming timer 5, no callback running",
        device::pop(5).0,
        status::BAD_ACK,
        None,
    );
    expect(
        "ACK naming timer 5, no callback running",
        device::ack(5),
        status::BAD_ACK,
        None,
    );
    expect(
        "POP with none, nothing expired",
        device::pop(NONE).0,
        status::EMPTY,
        None,
    );
    irq::restore(was_unmasked);

    // A real firing; the in-callback checks are in `on_timer`. Its window may reach a second past the
    // deadline, so poll (each wakeup of this running vCPU expires what is past its deadline) rather
    // than sleep until the window's end.
    let deadline = time::now() + 2 * MS;
    T_DEADLINE.store(deadline, Ordering::Relaxed);
    expect(
        "ARM T for 2 ms with a hostile slack",
        device::arm_with_slack(T, PINNED, deadline, u64::MAX),
        status::OK,
        Some(0),
    );
    check(
        "T fired",
        time::poll_until(deadline + 2_000 * MS, MS, || T_DONE.load(Ordering::Acquire)),
        (),
    );
    // T was re-armed in its callback then cancelled by the CANCEL_SYNC there: it must stay quiet.
    expect(
        "CANCEL of T after its callback: nothing pending",
        device::cancel(T),
        status::OK,
        Some(0),
    );

    if env.vcpus >= 2 {
        // RUNNING: vCPU 1 runs U's callback until released.
        while STEP.load(Ordering::Acquire) < 1 {
            arch::pause();
        }
        let started = time::poll_until(time::now() + 1_000 * MS, MS, || {
            U_RUNNING.load(Ordering::Acquire)
        });
        check("U's callback started on vCPU 1", started, ());
        if started {
            expect(
                "CANCEL_SYNC while vCPU 1 runs the callback",
                device::cancel_sync(U),
                status::RUNNING,
                Some(0),
            );
            expect(
                "CANCEL while it runs: nothing pending",
                device::cancel(U),
                status::OK,
                Some(0),
            );
            // Serialization: re-armed here while its callback runs on vCPU 1, U is held until that
            // callback ends, then fires on vCPU 0, its new owner (PINNED).
            let fires = U_FIRES.load(Ordering::Acquire);
            let due = time::now() + MS;
            expect(
                "ARM U while vCPU 1 runs its callback: value 0",
                device::arm(U, PINNED, due),
                status::OK,
                Some(0),
            );
            time::sleep_until(due + 3 * MS);
            check(
                "U's re-arming is held while its callback runs",
                U_FIRES.load(Ordering::Acquire) == fires,
                U_FIRES.load(Ordering::Acquire),
            );
            // vCPU 1 ends the callback by itself in 3 ms, while this vCPU halts: only the end of the
            // callback can wake it for U. Then the held arming runs here (two more callbacks).
            let release_at = time::now() + 3 * MS;
            U_RELEASE_AT.store(release_at, Ordering::Release);
            let fired = time::wait_until(Some(release_at + 2_000 * MS), || {
                U_FIRES.load(Ordering::Acquire) >= fires + 2
            });
            let waited = time::now() - release_at;
            U_RELEASE.store(true, Ordering::Release);
            check(
                "U's held re-arming fired once its callback ended",
                fired,
                (),
            );
            check(
                "U's held re-arming fired within 500 ms of the callback's end",
                waited < 500 * MS,
                waited,
            );
            check(
                "U's held re-arming fired on vCPU 0",
                U_FIRED_ON.load(Ordering::Relaxed) == 1,
                U_FIRED_ON.load(Ordering::Relaxed),
            );
            let limit = time::now() + 1_000 * MS;
            let mut reply = device::cancel_sync(U);
            while reply.status == status::RUNNING && reply.now < limit {
                reply = device::cancel_sync(U);
            }
            expect(
                "CANCEL_SYNC once the callback ended",
                reply,
                status::OK,
                Some(0),
            );
        }
        U_RELEASE.store(true, Ordering::Release);

        // Taking over W, pending on vCPU 1's queue.
        while STEP.load(Ordering::Acquire) < 2 {
            arch::pause();
        }
        let deadline = time::now() + 2 * MS;
        expect(
            "ARM of W pending on vCPU 1: value 1",
            device::arm(W, PINNED, deadline),
            status::OK,
            Some(1),
        );
        let fired = time::wait_until(Some(deadline + 1_000 * MS), || {
            W_FIRED_ON.load(Ordering::Acquire) != 0
        });
        check("W fired", fired, ());
        check(
            "W fired on vCPU 0 (its new owner)",
            W_FIRED_ON.load(Ordering::Relaxed) == 1,
            W_FIRED_ON.load(Ordering::Relaxed),
        );
        check(
            "W's exp_owner is vCPU 0",
            W_OWNER.load(Ordering::Relaxed) == 1,
            W_OWNER.load(Ordering::Relaxed),
        );
    }

    delivered_while_masked();
    held_by_own_callback();
    windows();
    if queues::on() {
        queue_mode::run();
    }

    let cpu = percpu::this();
    super::finish(
        env,
        format_args!(
            "{} checks queues={} syncs={} held_ends={} safety_pops={}/{}",
            CHECKS.load(Ordering::Relaxed),
            if queues::on() { "on" } else { "off" },
            cpu.syncs.load(Ordering::Relaxed),
            cpu.held_ends.load(Ordering::Relaxed),
            cpu.safety_pops.load(Ordering::Relaxed),
            cpu.safety_pops_found.load(Ordering::Relaxed),
        ),
    )
}

/// Spins (in whatever masking the caller has) until `done()` or until the guest clock passes `limit`,
/// issuing a `NOW` command each round: quietvm expires due timers at a running vCPU's exits, and in
/// queue mode nothing else here exits. Returns `done()`.
fn spin_with_exits(limit: u64, done: impl Fn() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if device::raw(command::NOW, NONE, 0, 0).value >= limit {
            return done();
        }
    }
}

/// D is handed to vCPU 0 while it runs masked. In queue mode that is the hand-over (the word says its
/// callback runs here), so `CANCEL` answers 0 and the callback runs once vCPU 0 unmasks; `CANCEL_SYNC`
/// meanwhile answers `RUNNING` (the runtime's answer while masked: repeat after unmasking). With
/// commands the expiry waits for `POP` and is still pending: `CANCEL` answers 1 and it never fires.
fn delivered_while_masked() {
    let was_unmasked = irq::mask();
    let deadline = time::now() + MS;
    expect(
        "ARM D for 1 ms, masked",
        device::arm(D, PINNED, deadline),
        status::OK,
        Some(0),
    );
    let cpu = percpu::this();
    let delivered = spin_with_exits(deadline + 1_000 * MS, || {
        if queues::on() {
            queues::state(D).running_on() == Some(0)
        } else {
            cpu.irq_pending.load(Ordering::SeqCst) != 0
        }
    });
    check("D handed to vCPU 0 while it runs masked", delivered, ());
    if queues::on() {
        expect(
            "CANCEL of D handed over, not yet taken (queue mode: it fired)",
            device::cancel(D),
            status::OK,
            Some(0),
        );
        expect(
            "CANCEL_SYNC of D masked while its callback waits here",
            device::cancel_sync(D),
            status::RUNNING,
            Some(0),
        );
    } else {
        expect(
            "CANCEL of D waiting for POP (still pending)",
            device::cancel(D),
            status::OK,
            Some(1),
        );
    }
    irq::restore(was_unmasked);
    let want = u32::from(queues::on());
    // Its doorbell may still be on its way (the word changes before the entry is published).
    time::wait_until(Some(time::now() + 1_000 * MS), || {
        D_FIRES.load(Ordering::Acquire) >= want
    });
    time::sleep_until(time::now() + 2 * MS);
    check(
        "D's callbacks once vCPU 0 unmasked",
        D_FIRES.load(Ordering::Acquire) == want,
        (D_FIRES.load(Ordering::Acquire), want),
    );
    expect(
        "CANCEL_SYNC of D afterwards",
        device::cancel_sync(D),
        status::OK,
        Some(0),
    );
}

/// H's first callback re-arms H, due 1 ms later, and runs on past that: the re-arming must wait for it
/// (held) and fire once, after it ended.
fn held_by_own_callback() {
    let deadline = time::now() + 2 * MS;
    expect(
        "ARM H for 2 ms",
        device::arm(H, PINNED, deadline),
        status::OK,
        Some(0),
    );
    let fired = time::wait_until(Some(deadline + 2_000 * MS), || {
        H_FIRES.load(Ordering::Acquire) >= 2
    });
    check("H's re-arming fired after its callback", fired, ());
    time::sleep_until(time::now() + 2 * MS);
    check(
        "H fired exactly twice",
        H_FIRES.load(Ordering::Acquire) == 2,
        H_FIRES.load(Ordering::Acquire),
    );
    expect(
        "CANCEL of H: nothing pending",
        device::cancel(H),
        status::OK,
        Some(0),
    );
}

fn h_callback(expired: &Expired) {
    if H_IN_CALLBACK.swap(true, Ordering::AcqRel) {
        check("H: two callbacks at once", false, expired);
    }
    check(
        "H: exp_fired_at >= exp_deadline",
        expired.fired_at >= expired.deadline,
        expired,
    );
    match H_FIRES.load(Ordering::Acquire) {
        0 => {
            let deadline = time::now() + MS;
            H_REARMED_FOR.store(deadline, Ordering::Relaxed);
            expect(
                "re-ARM H from its own callback, due in 1 ms",
                device::arm(H, PINNED, deadline),
                status::OK,
                Some(0),
            );
            if queues::on() {
                // An arming in a callback owes its SYNC; pay now, so that quietvm holds the expiry.
                queues::sync();
                let held = spin_with_exits(deadline + 200 * MS, || queues::state(H).held());
                check(
                    "H's word HELD while its callback runs past the deadline",
                    held,
                    (),
                );
            } else {
                spin_with_exits(deadline + MS, || false);
            }
            H_ENDED_AT.store(time::now(), Ordering::Release);
        }
        _ => {
            check(
                "H's re-arming: exp_deadline as armed",
                expired.deadline == H_REARMED_FOR.load(Ordering::Relaxed),
                expired,
            );
            let ended = H_ENDED_AT.load(Ordering::Acquire);
            check(
                "H's re-arming fired after its previous callback ended",
                expired.fired_at >= ended,
                (expired.fired_at, ended),
            );
        }
    }
    H_IN_CALLBACK.store(false, Ordering::Release);
    H_FIRES.fetch_add(1, Ordering::AcqRel);
}

/// S (PINNED) and S2 (MOVABLE) with slack: each fires once, in its window, and `exp_slack` is the
/// slack asked for (a movable arming's at least that: the VM's minimum may raise it).
fn windows() {
    let now = time::now();
    for (i, (id, flags)) in [(S, PINNED), (S2, MOVABLE)].into_iter().enumerate() {
        let deadline = now + 2 * MS;
        S_DEADLINE[i].store(deadline, Ordering::Relaxed);
        expect(
            "ARM with a window",
            device::arm_with_slack(id, flags, deadline, S_SLACK[i]),
            status::OK,
            Some(0),
        );
    }
    let limit = now + 2_000 * MS;
    let fired = time::poll_until(limit, MS, || {
        S_FIRES.iter().all(|f| f.load(Ordering::Acquire) >= 1)
    });
    check("S and S2 fired", fired, ());
    time::sleep_until(time::now() + 2 * MS);
    for (i, id) in [S, S2].into_iter().enumerate() {
        check(
            "a window's arming fired once",
            S_FIRES[i].load(Ordering::Acquire) == 1,
            (id, S_FIRES[i].load(Ordering::Acquire)),
        );
    }
}

fn s_callback(i: usize, expired: &Expired) {
    let deadline = S_DEADLINE[i].load(Ordering::Relaxed);
    check(
        "window: exp_deadline as armed, exp_fired_at >= it",
        expired.deadline == deadline && expired.fired_at >= deadline,
        expired,
    );
    let asked = S_SLACK[i];
    let ok = if lapic::active() {
        expired.slack == 0
    } else if i == 0 {
        expired.slack == asked
    } else {
        (asked..=quietvm_abi::timer::MAX_SLACK_NS).contains(&expired.slack)
    };
    check("window: exp_slack as asked", ok, (expired.slack, asked));
    S_FIRES[i].fetch_add(1, Ordering::AcqRel);
}

fn vcpu1() -> ! {
    // Before the ARM: U's callback may start before the ARM returns here (a preempted vCPU thread) and
    // holds this vCPU until vCPU 0, which waits for step 1, releases it.
    STEP.store(1, Ordering::Release);
    // PAST only if this vCPU's thread was held up for a millisecond between the two reads of the clock
    // (a loaded host): arm again, or U would never run.
    while device::arm(U, PINNED, time::now() + MS).status == status::PAST {}
    // U's callback runs here; vCPU 0 releases it (remotely, hence polling).
    let limit = time::now() + 5_000 * MS;
    time::poll_until(limit, MS, || {
        U_RELEASE.load(Ordering::Acquire) && !U_RUNNING.load(Ordering::Acquire)
    });
    device::arm(W, PINNED, time::now() + 10_000 * MS);
    STEP.store(2, Ordering::Release);
    vm::halt_forever()
}

pub fn on_timer(expired: &Expired) {
    match expired.id {
        T => t_callback(expired),
        U => {
            // Holds the callback (masked, as all callbacks) until vCPU 0 releases it or the time it set.
            U_RUNNING.store(true, Ordering::Release);
            loop {
                let at = U_RELEASE_AT.load(Ordering::Acquire);
                if U_RELEASE.load(Ordering::Acquire) || (at != 0 && time::now() >= at) {
                    break;
                }
                arch::pause();
            }
            U_RUNNING.store(false, Ordering::Release);
            U_FIRED_ON.store(percpu::index() + 1, Ordering::Relaxed);
            U_FIRES.fetch_add(1, Ordering::Release);
        }
        W => {
            W_OWNER.store(expired.owner + 1, Ordering::Relaxed);
            W_FIRED_ON.store(percpu::index() + 1, Ordering::Release);
        }
        D => {
            check(
                "D: exp_fired_at >= exp_deadline",
                expired.fired_at >= expired.deadline,
                expired,
            );
            D_FIRES.fetch_add(1, Ordering::AcqRel);
        }
        H => h_callback(expired),
        S => s_callback(0, expired),
        S2 => s_callback(1, expired),
        id if queue_mode::IDS.contains(&id) => queue_mode::on_timer(expired),
        id => check("a timer this workload never armed fired", false, id),
    }
}

fn t_callback(expired: &Expired) {
    let deadline = T_DEADLINE.load(Ordering::Relaxed);
    check("T: exp_owner 0", expired.owner == 0, expired.owner);
    check(
        "T: exp_deadline as armed",
        expired.deadline == deadline,
        (expired.deadline, deadline),
    );
    check(
        "T: exp_fired_at >= deadline",
        expired.fired_at >= deadline,
        (expired.fired_at, deadline),
    );
    check("T: fired on vCPU 0", percpu::index() == 0, percpu::index());
    let want_slack = if lapic::active() {
        0
    } else {
        quietvm_abi::timer::MAX_SLACK_NS
    };
    check(
        "T: exp_slack is the hostile slack clamped",
        expired.slack == want_slack,
        (expired.slack, want_slack),
    );
    expect(
        "POP naming another timer inside T's callback",
        device::pop(T + 5).0,
        status::BAD_ACK,
        None,
    );
    expect(
        "ACK naming another timer inside T's callback",
        device::ack(T + 5),
        status::BAD_ACK,
        None,
    );
    expect(
        "re-ARM T from its own callback: value 0",
        device::arm(T, PINNED, time::now() + MS),
        status::OK,
        Some(0),
    );
    expect(
        "CANCEL_SYNC of T from its own callback",
        device::cancel_sync(T),
        status::DEADLOCK,
        Some(1),
    );
    expect(
        "CANCEL after DEADLOCK: it was cancelled",
        device::cancel(T),
        status::OK,
        Some(0),
    );
    expect(
        "ACK of the running callback",
        doorbell::ack_running(),
        status::OK,
        None,
    );
    expect(
        "ACK again: no longer running",
        device::ack(T),
        status::BAD_ACK,
        None,
    );
    T_DONE.store(true, Ordering::Release);
}
