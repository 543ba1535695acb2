//! `abi-check` in queue mode (docs/timer-abi.md, "Queue mode: timer operations without exits"), on
//! vCPU 0 after the checks every mode shares (which then already went through the queues: arm, re-arm
//! and cancel values, `INVALID`, `PAST`, `BAD_ACK`, `EMPTY`, `DEADLOCK`, `RUNNING`, held expiries, the
//! `exp_*` fields). Here, what only queue mode has:
//! - `enabled` = 1 and a stable clock; the clock read from the TSC agrees with the `NOW` command
//!   (`pv_before <= cmd_now <= pv_after`) and never goes backwards;
//! - each `ARM`/`CANCEL` moves the state word to the next generation (`PENDING` set or cleared) and
//!   writes one submission entry saying so (`op`, `id`, `gen`, `flags` with `ENDED_PENDING`,
//!   `deadline`, `slack`, `at`); `CANCEL_SYNC` too if an arming was pending, else it only reads the
//!   word; `PAST` and `INVALID` change neither word nor ring;
//! - `SYNC`'s value is the number of entries quietvm had not read; more than 32 operations in a row
//!   fill the ring and `SYNC` first (they all succeed);
//! - inside a callback the word says it runs here; an arming made there owes its `SYNC` (none issued)
//!   and still fires (paid at the handler's end, or read at the `HLT` exit).

use super::{check, expect};
use crate::runtime::device::{self, command, status, Expired, MOVABLE, NONE, PINNED};
use crate::runtime::time::{self, MS};
use crate::runtime::{boot, irq, percpu, queues};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use quietvm_abi::queue::{State, SubEntry, ENDED_PENDING, OP_ARM, OP_CANCEL, SUB_ENTRIES};

/// Q is armed and cancelled without ever firing; O's callback arms O2; the burst ids fill the ring.
const Q: u32 = 16;
const O: u32 = 17;
const O2: u32 = 18;
const BURST: core::ops::Range<u32> = 24..24 + SUB_ENTRIES + 8;
/// Every id this part uses (`abi_check::run` reserves up to its end).
pub const IDS: core::ops::Range<u32> = Q..BURST.end;

static O_FIRED: AtomicBool = AtomicBool::new(false);
static O2_FIRES: AtomicU32 = AtomicU32::new(0);
static O2_DEADLINE: AtomicU64 = AtomicU64::new(0);

pub fn run() {
    flag_and_clock();
    words_and_entries();
    sync_value();
    full_ring();
    owed_sync();
}

fn flag_and_clock() {
    check(
        "queue block: enabled = 1",
        queues::enabled_field() == 1,
        queues::enabled_field(),
    );
    let mut agree = true;
    let mut worst = (0, 0, 0);
    for _ in 0..20 {
        let before = time::now();
        let cmd = device::raw(command::NOW, NONE, 0, 0);
        let after = time::now();
        if !(before <= cmd.now && cmd.now <= after && cmd.value == cmd.now) {
            agree = false;
            worst = (before, cmd.now, after);
        }
    }
    check(
        "TSC clock before <= NOW command <= TSC clock after",
        agree,
        worst,
    );
    let mut last = time::now();
    let mut monotonic = true;
    for _ in 0..1000 {
        let t = time::now();
        monotonic &= t >= last;
        last = t;
    }
    check("TSC clock is monotonic", monotonic, last);
}

/// The submission entry an operation just wrote: the one before `sub_head`.
fn last_entry() -> SubEntry {
    queues::sub_entry(queues::sub_ring().0.wrapping_sub(1))
}

/// One operation and what it must do to Q's word and the ring.
fn expect_entry(what: &str, before: State, entry: SubEntry, op: u32, flags: u32, pending: bool) {
    let after = queues::state(Q);
    check(
        what,
        after.gen() == before.gen().wrapping_add(1)
            && after.pending() == pending
            && !after.running()
            && entry.op == op
            && entry.id == Q
            && entry.gen == after.gen()
            && entry.flags == flags
            && entry.at <= time::now(),
        (before, after, entry),
    );
}

fn words_and_entries() {
    let far = time::now() + 10_000 * MS;
    // An idle cancel.
    let before = queues::state(Q);
    expect("CANCEL of idle Q", device::cancel(Q), status::OK, Some(0));
    expect_entry(
        "CANCEL of idle Q: next generation, entry without ENDED_PENDING",
        before,
        last_entry(),
        OP_CANCEL,
        0,
        false,
    );
    // Arm, re-arm, cancel.
    let before = queues::state(Q);
    expect(
        "ARM Q with slack",
        device::arm_with_slack(Q, PINNED, far, 5 * MS),
        status::OK,
        Some(0),
    );
    let entry = last_entry();
    expect_entry(
        "ARM Q: next generation, PENDING, an ARM entry",
        before,
        entry,
        OP_ARM,
        PINNED,
        true,
    );
    check(
        "ARM entry: deadline and slack as armed",
        entry.deadline == far && entry.slack == 5 * MS,
        entry,
    );
    let before = queues::state(Q);
    expect(
        "re-ARM Q as MOVABLE",
        device::arm(Q, MOVABLE, far + MS),
        status::OK,
        Some(1),
    );
    expect_entry(
        "re-ARM Q: entry MOVABLE | ENDED_PENDING",
        before,
        last_entry(),
        OP_ARM,
        MOVABLE | ENDED_PENDING,
        true,
    );
    let before = queues::state(Q);
    expect(
        "CANCEL of pending Q",
        device::cancel(Q),
        status::OK,
        Some(1),
    );
    expect_entry(
        "CANCEL of pending Q: entry ENDED_PENDING, not PENDING",
        before,
        last_entry(),
        OP_CANCEL,
        ENDED_PENDING,
        false,
    );
    // CANCEL_SYNC of a pending timer is a CANCEL; of an idle one, only a look at its word.
    expect("re-ARM Q", device::arm(Q, PINNED, far), status::OK, Some(0));
    let before = queues::state(Q);
    expect(
        "CANCEL_SYNC of pending Q: OK, value 1",
        device::cancel_sync(Q),
        status::OK,
        Some(1),
    );
    expect_entry(
        "CANCEL_SYNC of pending Q: a CANCEL entry",
        before,
        last_entry(),
        OP_CANCEL,
        ENDED_PENDING,
        false,
    );
    let before = (queues::state(Q), queues::sub_ring().0);
    expect(
        "CANCEL_SYNC of idle Q: OK, value 0",
        device::cancel_sync(Q),
        status::OK,
        Some(0),
    );
    let after = (queues::state(Q), queues::sub_ring().0);
    check(
        "CANCEL_SYNC of idle Q only reads the word",
        before == after,
        (before, after),
    );

    // Refused operations change nothing.
    let max = boot::info().max_timers;
    let before = (queues::state(Q), queues::sub_ring().0);
    for (what, reply, want) in [
        ("ARM Q at 0", device::arm(Q, PINNED, 0), status::PAST),
        (
            "ARM Q at an earlier now",
            device::arm(Q, PINNED, time::now()),
            status::PAST,
        ),
        (
            "ARM id max_timers",
            device::arm(max, PINNED, far),
            status::INVALID,
        ),
        (
            "ARM Q with flags 3",
            device::arm(Q, 3, far),
            status::INVALID,
        ),
        ("CANCEL of NONE", device::cancel(NONE), status::INVALID),
        (
            "CANCEL_SYNC of max_timers",
            device::cancel_sync(max),
            status::INVALID,
        ),
    ] {
        expect(what, reply, want, Some(0));
    }
    let after = (queues::state(Q), queues::sub_ring().0);
    check(
        "PAST and INVALID changed neither the word nor the ring",
        before == after,
        (before, after),
    );
}

/// `SYNC`'s value: the entries quietvm had not read (3 cancels of idle Q, which need no `SYNC`), then 0.
fn sync_value() {
    let was_unmasked = irq::mask();
    let mut unread = 0;
    for _ in 0..5 {
        queues::sync();
        for _ in 0..3 {
            device::cancel(Q);
        }
        let (head, tail) = queues::sub_ring();
        unread = head.wrapping_sub(tail);
        if unread == 3 {
            break; // else an exit (a kick) let quietvm read them: try again
        }
    }
    let reply = queues::sync();
    check(
        "SYNC: value = the entries not yet read",
        reply.status == status::OK && reply.value == u64::from(unread) && unread == 3,
        (reply, unread),
    );
    let (head, tail) = queues::sub_ring();
    check(
        "SYNC: sub_tail = sub_head after it",
        head == tail,
        (head, tail),
    );
    let reply = queues::sync();
    check("SYNC again: value 0", reply.value == 0, reply);
    irq::restore(was_unmasked);
}

/// More than a ring's worth of operations in a row: arms (which may `SYNC` for the horizon), then
/// cancels (which never do): the ring fills and the runtime `SYNC`s first; every operation succeeds.
fn full_ring() {
    let cpu = percpu::this();
    let far = time::now() + 10_000 * MS;
    let mut ok = true;
    for id in BURST {
        ok &= device::arm(id, MOVABLE, far).status == status::OK;
    }
    check("a burst of ARMs all OK", ok, ());
    let syncs = cpu.syncs.load(Ordering::Relaxed);
    let mut removed = 0;
    for id in BURST {
        let reply = device::cancel(id);
        ok &= reply.status == status::OK;
        removed += reply.value;
    }
    let syncs = cpu.syncs.load(Ordering::Relaxed) - syncs;
    check(
        "a burst of CANCELs all OK, each found its arming",
        ok && removed == u64::from(BURST.len() as u32),
        removed,
    );
    check(
        "more than 32 CANCELs in a row: the full ring SYNCs first",
        syncs >= 1,
        syncs,
    );
}

/// O's callback arms O2 (due before the horizon: it needs a `SYNC`), which must not `SYNC` there but
/// be owed, and O2 must still fire.
fn owed_sync() {
    let deadline = time::now() + 2 * MS;
    expect(
        "ARM O",
        device::arm(O, PINNED, deadline),
        status::OK,
        Some(0),
    );
    let fired = time::wait_until(Some(deadline + 2_000 * MS), || {
        O2_FIRES.load(Ordering::Acquire) >= 1
    });
    check("O fired, and O2, armed in its callback, fired", fired, ());
    check(
        "O's word after its callback: not running",
        !queues::state(O).running(),
        queues::state(O),
    );
    time::sleep_until(time::now() + 2 * MS);
    check(
        "O2 fired once",
        O2_FIRES.load(Ordering::Acquire) == 1,
        O2_FIRES.load(Ordering::Acquire),
    );
}

pub fn on_timer(expired: &Expired) {
    let cpu = percpu::this();
    match expired.id {
        O if !O_FIRED.swap(true, Ordering::AcqRel) => {
            let word = queues::state(O);
            check(
                "in O's callback its word says it runs here, not pending",
                word.running_on() == Some(percpu::index()) && !word.pending(),
                word,
            );
            let syncs = cpu.syncs.load(Ordering::Relaxed);
            let deadline = time::now() + MS;
            O2_DEADLINE.store(deadline, Ordering::Relaxed);
            expect(
                "ARM O2 in O's callback",
                device::arm(O2, PINNED, deadline),
                status::OK,
                Some(0),
            );
            // Whether it owes one depends on the horizon; it never issues one here.
            check(
                "an arming in a callback issues no SYNC",
                cpu.syncs.load(Ordering::Relaxed) == syncs,
                (queues::horizon(), cpu.owed_sync.load(Ordering::Relaxed)),
            );
        }
        O2 => {
            let deadline = O2_DEADLINE.load(Ordering::Relaxed);
            check(
                "O2: exp_deadline as armed, exp_fired_at >= it",
                expired.deadline == deadline && expired.fired_at >= deadline,
                expired,
            );
            O2_FIRES.fetch_add(1, Ordering::AcqRel);
        }
        id => check("a queue-mode timer fired that should not have", false, id),
    }
}
