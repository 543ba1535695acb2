//! Queue mode of the timer device (docs/timer-abi.md, "Queue mode: timer operations without exits"):
//! the vCPU arms and cancels by compare-and-swap on the timer's state word plus an entry in its
//! submission ring, reads the clock from the TSC, and takes expired timers from its delivery ring. It
//! exits (`SYNC`) only when an arming's window ends before quietvm's `horizon` for this vCPU, when its
//! submission ring is full, or when a callback ends whose timer quietvm holds (`HELD`).
//!
//! `device` calls in here for a vCPU in queue mode (`on`), with the same answers (`Reply`) as the
//! commands; every vCPU opts in at its start (`enable`) unless `queues=0`, or under kvm-lapic.
//!
//! # Masking
//! Each vCPU's submission ring has one producer, the vCPU, but two kinds of code on it produce: main
//! code and its doorbell handler (callbacks arm). So every ring operation runs with the doorbell
//! masked, from the compare-and-swap to the `sub_head` store and the `horizon` check.
//!
//! # Owed SYNCs
//! An arming made inside the doorbell handler does not `SYNC` at once: it records that a `SYNC` is
//! owed up to its submission index (`owe`). The handler pays it at its end (`pay_owed`) unless it
//! interrupted the halt path (`PerCpu::halting`): then the coming `HLT` exit makes quietvm read the
//! ring anyway, and `time::wait_until` pays it if it returns instead of halting. A payment is skipped
//! when quietvm has read past the owed index already (`sub_tail`, e.g. at a kick's exit), and any
//! `SYNC` pays everything owed. A handler whose callbacks take so long that an owed arming's window
//! has ended, or is about to, pays at once.
//!
//! # Memory
//! The queue block, the rings and the state words are shared with quietvm (and the words with the
//! other vCPUs): indices, entries and clock fields are read and written volatile, at their natural
//! alignment (single `mov`s), in program order; a full fence (`mfence`) separates a store the other
//! side must see from the load that decides whether it did (`sub_head` then `horizon`, `dlv_tail` then
//! the next `dlv_head`), as docs/timer-abi.md's handshake asks. Words change only by compare-and-swap
//! (`quietvm_abi::queue::update`).

use super::timer_abi::{command, status, Expired, Reply, MOVABLE, NONE, PINNED};
use super::{boot, irq, percpu};
use crate::arch;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{fence, AtomicU64, Ordering};
use quietvm_abi::queue::{
    self as q, DeliveryEntry, QueueControl, State, SubEntry, Update, DELIVERY_ENTRIES, SUB_ENTRIES,
};
use quietvm_abi::timer::{self as abi, MAX_SLACK_NS};

/// `PerCpu::owed_sync`: a `SYNC` is owed (the low 32 bits are the submission index).
const OWED: u64 = 1 << 32;

/// How close to the end of an owed arming's window a doorbell handler still running callbacks pays
/// the `SYNC` (`pay_owed_if_overdue`): about what the rest of the handler and its halt take.
const OVERDUE_NS: u64 = 100_000;

/// How long `cancel_sync` waits for quietvm to publish an expiry it already handed to this vCPU.
const HANDOVER_LIMIT_NS: u64 = 10_000_000_000;

/// Whether this vCPU is in queue mode.
#[inline]
pub fn on() -> bool {
    percpu::this().queues.load(Ordering::Relaxed)
}

// ---- Shared memory ----------------------------------------------------------------------------------

fn page_base() -> u64 {
    boot::info().device_pages + abi::DEVICE_PAGE_SIZE * u64::from(percpu::index())
}

fn control() -> *mut QueueControl {
    (page_base() + q::OFF_QUEUES) as *mut QueueControl
}

/// Timer `id`'s state word (`id < max_timers`, which callers check).
fn word(id: u32) -> &'static AtomicU64 {
    debug_assert!(id < boot::info().max_timers);
    let at = boot::info().timer_states + 8 * u64::from(id);
    // SAFETY: `enable` checked that the `max_timers` words lie in guest memory (identity-mapped,
    // user-accessible) and are 8-aligned, and `id < max_timers`; quietvm and every vCPU access them
    // only atomically, and quietvm never moves them.
    unsafe { &*(at as *const AtomicU64) }
}

/// Timer `id`'s state word now (`id < max_timers`).
pub fn state(id: u32) -> State {
    State(word(id).load(Ordering::SeqCst))
}

/// Applies `transition` to timer `id`'s word by compare-and-swap until it is done or refused: a guest
/// that loses a race (to quietvm or another vCPU) simply tries again on the word it found.
fn transition(id: u32, mut transition: impl FnMut(State) -> Option<State>) -> Update {
    loop {
        match q::update(word(id), q::CAS_TRIES, &mut transition) {
            Update::Contended => arch::pause(),
            done => return done,
        }
    }
}

/// The queue block's fields this runtime reads (see the module docs on volatile access).
struct Indices {
    sub_head: u32,
    sub_tail: u32,
}

fn sub_indices() -> Indices {
    let c = control();
    // SAFETY: this vCPU's own device page (mapped, user-accessible); quietvm writes `sub_tail`
    // behind the compiler's back, hence volatile.
    unsafe {
        Indices {
            sub_head: addr_of!((*c).sub_head).read_volatile(),
            sub_tail: addr_of!((*c).sub_tail).read_volatile(),
        }
    }
}

/// Submission ring entry `index`, as this vCPU wrote it (for checks).
pub fn sub_entry(index: u32) -> SubEntry {
    let slot = (page_base() + q::sub_slot(index)) as *const SubEntry;
    // SAFETY: a slot of this vCPU's submission ring (in its device page, 8-aligned).
    unsafe { slot.read_volatile() }
}

/// This vCPU's submission ring indices `(sub_head, sub_tail)` (for checks).
pub fn sub_ring() -> (u32, u32) {
    let i = sub_indices();
    (i.sub_head, i.sub_tail)
}

/// This vCPU's `horizon`: the guest time by which quietvm reads its submission ring anyway.
pub fn horizon() -> u64 {
    // SAFETY: as in `sub_indices`.
    unsafe { addr_of!((*control()).horizon).read_volatile() }
}

/// The queue block's `enabled` field (for checks).
pub fn enabled_field() -> u32 {
    // SAFETY: as in `sub_indices`.
    unsafe { addr_of!((*control()).enabled).read_volatile() }
}

fn max_timers() -> u32 {
    boot::info().max_timers
}

fn reply(status: u32, value: u64, now: u64) -> Reply {
    Reply { status, value, now }
}

/// Issues a command that takes no inputs (`ENABLE_QUEUES`, `SYNC`) and reads its results from the
/// page. Never under kvm-lapic (no queue mode there).
fn command(cmd: u32) -> Reply {
    arch::outl(boot::info().timer_port, cmd);
    let page = page_base() as *const abi::Page;
    // SAFETY: this vCPU's own device page; quietvm wrote the results during the `out` (which the
    // compiler cannot see: the asm is not `nomem`), hence volatile.
    unsafe {
        Reply {
            status: addr_of!((*page).status).read_volatile(),
            value: addr_of!((*page).value).read_volatile(),
            now: addr_of!((*page).now).read_volatile(),
        }
    }
}

// ---- Opting in ----------------------------------------------------------------------------------------

/// Turns queue mode on for this vCPU (`ENABLE_QUEUES`), at its start: after its IDT, before its first
/// timer operation. Not under kvm-lapic (there is no device). If quietvm cannot offer it, the vCPU keeps
/// using commands; vCPU 0 says so in one line.
///
/// Masked from the command until the runtime knows the answer: the command makes the vCPU take part
/// in timer expiry, so quietvm may hand it timers (in the delivery ring) and ring the doorbell at once,
/// and a handler that ran before `on()` says so would take them with `POP` instead.
pub fn enable(cpu: u32) {
    let was_unmasked = irq::mask();
    enable_masked(cpu);
    irq::restore(was_unmasked);
}

fn enable_masked(cpu: u32) {
    let info = boot::info();
    let words_end = u64::from(info.max_timers)
        .checked_mul(8)
        .and_then(|len| info.timer_states.checked_add(len));
    let why = if info.timer_states == 0 {
        Some("the boot info has no timer_states")
    } else if !info.timer_states.is_multiple_of(8)
        || words_end.is_none_or(|end| end > info.mem_size)
    {
        Some("timer_states is not 8-aligned inside guest memory")
    } else {
        None
    };
    let answer = match why {
        Some(why) => Err(("", why)),
        None => {
            let reply = command(command::ENABLE_QUEUES);
            if reply.status == status::OK {
                Ok(())
            } else {
                Err(("ENABLE_QUEUES answered ", status::name(reply.status)))
            }
        }
    };
    if let Err((what, why)) = answer {
        if cpu == 0 {
            println!("guest: timer queue mode not available ({what}{why}); using commands");
        }
        return;
    }
    let enabled = enabled_field();
    assert!(
        enabled == 1,
        "ENABLE_QUEUES answered OK but the queue block says enabled = {enabled}"
    );
    let (version, params) = clock_params();
    assert!(
        params.1 != 0,
        "ENABLE_QUEUES answered OK but the clock has ns_per_tick_q32 = 0 (version {version})"
    );
    percpu::this().queues.store(true, Ordering::Relaxed);
}

// ---- The clock ------------------------------------------------------------------------------------------

/// The clock parameters `(tsc_base, ns_per_tick_q32)` read as a seqlock, with their version, and the
/// TSC read inside the same read.
fn clock_read() -> (u32, (u64, u64), u64) {
    let c = control();
    loop {
        // SAFETY: as in `sub_indices`; quietvm writes the fields, then an even `version` (and
        // would make it odd around a later update).
        // Volatile reads stay in program order, and x86 does not reorder loads with loads.
        let (v1, base, mult, tsc, v2) = unsafe {
            let v1 = addr_of!((*c).clock.version).read_volatile();
            let base = addr_of!((*c).clock.tsc_base).read_volatile();
            let mult = addr_of!((*c).clock.ns_per_tick_q32).read_volatile();
            let tsc = arch::rdtsc();
            let v2 = addr_of!((*c).clock.version).read_volatile();
            (v1, base, mult, tsc, v2)
        };
        if v1 == v2 && v1 & 1 == 0 {
            return (v1, (base, mult), tsc);
        }
        arch::pause();
    }
}

fn clock_params() -> (u32, (u64, u64)) {
    let (version, params, _) = clock_read();
    (version, params)
}

/// The guest clock from the TSC and the published parameters: the device's own clock, no exit.
pub fn now() -> u64 {
    let (_, (base, mult), tsc) = clock_read();
    q::clock_ns(tsc, base, mult)
}

// ---- SYNC, owed and paid ---------------------------------------------------------------------------------

/// `SYNC`: quietvm reads this vCPU's submission ring now (and releases expiries held for callbacks
/// that ended). Pays whatever is owed.
pub fn sync() -> Reply {
    let was_unmasked = irq::mask();
    let cpu = percpu::this();
    // Masked: nothing can owe between this and the `out`, which reads every entry written so far.
    cpu.owed_sync.store(0, Ordering::Relaxed);
    let reply = command(command::SYNC);
    cpu.syncs.fetch_add(1, Ordering::Relaxed);
    assert!(
        reply.status == status::OK,
        "SYNC answered {}",
        status::name(reply.status)
    );
    irq::restore(was_unmasked);
    reply
}

/// Whether an owed `SYNC` (`PerCpu::owed_sync`) covers entries quietvm has not read yet.
fn still_owed(owed: u64) -> bool {
    if owed == 0 {
        return false;
    }
    // quietvm has read up to the owed index or past it (at some exit) if `sub_tail` is there.
    let unread = (owed as u32).wrapping_sub(sub_indices().sub_tail);
    unread != 0 && unread <= SUB_ENTRIES
}

/// Records that a `SYNC` is owed for the entries up to `head` (exclusive), for an arming whose window
/// ends at `window_end`. Masked.
fn owe(head: u32, window_end: u64) {
    let cpu = percpu::this();
    // An earlier owed SYNC that an exit has paid meanwhile does not count.
    let until = if still_owed(cpu.owed_sync.load(Ordering::Relaxed)) {
        cpu.owed_until.load(Ordering::Relaxed).min(window_end)
    } else {
        window_end
    };
    cpu.owed_until.store(until, Ordering::Relaxed);
    cpu.owed_sync
        .store(OWED | u64::from(head), Ordering::Relaxed);
}

/// Pays an owed `SYNC`: issues it unless quietvm has read the ring past the owed index meanwhile.
pub fn pay_owed() {
    let cpu = percpu::this();
    if cpu.owed_sync.load(Ordering::Relaxed) == 0 {
        return; // (a handler that runs from here on pays for itself)
    }
    let was_unmasked = irq::mask();
    let owed = cpu.owed_sync.load(Ordering::Relaxed);
    if owed != 0 {
        if !still_owed(owed) {
            cpu.owed_sync.store(0, Ordering::Relaxed);
        } else {
            sync();
        }
    }
    irq::restore(was_unmasked);
}

/// Pays an owed `SYNC` whose earliest window has ended or is about to (within `OVERDUE_NS`): for a
/// doorbell handler whose callbacks run long (the halt it would wait for is still far).
pub fn pay_owed_if_overdue() {
    let cpu = percpu::this();
    if cpu.owed_sync.load(Ordering::Relaxed) != 0
        && now().saturating_add(OVERDUE_NS) >= cpu.owed_until.load(Ordering::Relaxed)
    {
        pay_owed();
    }
}

// ---- Submissions -------------------------------------------------------------------------------------------

/// Makes room for one entry: `SYNC` if the ring is full. Masked.
fn ensure_room() {
    let i = sub_indices();
    if ring_len_sub(i.sub_head, i.sub_tail) < SUB_ENTRIES {
        return;
    }
    sync();
    let i = sub_indices();
    assert!(
        ring_len_sub(i.sub_head, i.sub_tail) < SUB_ENTRIES,
        "quietvm bug: the submission ring is still full after SYNC (sub_head {}, sub_tail {})",
        i.sub_head,
        i.sub_tail
    );
}

fn ring_len_sub(head: u32, tail: u32) -> u32 {
    q::ring_len(head, tail, SUB_ENTRIES).unwrap_or_else(|| {
        panic!(
            "quietvm bug: submission ring sub_head {head}, sub_tail {tail} ({} entries, ring of {SUB_ENTRIES})",
            head.wrapping_sub(tail)
        )
    })
}

/// Publishes `entry` (the slot, then `sub_head`); returns the new `sub_head`. Masked.
fn submit(entry: SubEntry) -> u32 {
    let c = control();
    // SAFETY: this vCPU's own device page: the slot `sub_head % SUB_ENTRIES` of its submission ring,
    // free (`ensure_room`), and `sub_head`, which only this vCPU writes. Volatile stores stay in
    // program order and x86 does not reorder stores with stores, so quietvm sees the entry before
    // the index.
    unsafe {
        let head = addr_of!((*c).sub_head).read_volatile();
        ((page_base() + q::sub_slot(head)) as *mut SubEntry).write_volatile(entry);
        let head = head.wrapping_add(1);
        addr_of_mut!((*c).sub_head).write_volatile(head);
        head
    }
}

fn ended_pending(old: State) -> u32 {
    if old.pending() {
        q::ENDED_PENDING
    } else {
        0
    }
}

fn done_states(update: Update) -> (State, State) {
    match update {
        Update::Done(old, new) => (old, new),
        other => unreachable!("arm and cancel transitions never refuse: {other:?}"),
    }
}

/// `ARM` in queue mode, with the command's answers: `INVALID`, `PAST`, or `OK` with `value` 1 for a
/// re-arm. The `SYNC` it may need is issued at once, or owed inside the doorbell handler (or with
/// `defer`, by a caller that halts or pays before it runs on: `time::wait_until`).
pub fn arm(id: u32, flags: u32, deadline: u64, slack: u64, defer: bool) -> Reply {
    if id >= max_timers() || (flags != PINNED && flags != MOVABLE) {
        return reply(status::INVALID, 0, now());
    }
    let was_unmasked = irq::mask();
    let now = now();
    if deadline <= now {
        irq::restore(was_unmasked);
        return reply(status::PAST, 0, now);
    }
    ensure_room();
    let (old, new) = done_states(transition(id, |s| Some(s.armed())));
    let head = submit(SubEntry {
        op: q::OP_ARM,
        id,
        gen: new.gen(),
        flags: flags | ended_pending(old),
        deadline,
        slack,
        at: now,
        reserved: 0,
    });
    // The handshake: `sub_head` stored, then `horizon` loaded (quietvm: horizon stored, then
    // `sub_head` loaded).
    fence(Ordering::SeqCst);
    let window_end = deadline.saturating_add(slack.min(MAX_SLACK_NS));
    if window_end < horizon() {
        if defer || percpu::this().in_handler.load(Ordering::Relaxed) {
            owe(head, window_end);
        } else {
            sync();
        }
    }
    irq::restore(was_unmasked);
    reply(status::OK, u64::from(old.pending()), now)
}

/// `CANCEL` in queue mode (no `SYNC`: a cancelled arming can never fire); with `sync_status`, the
/// status `CANCEL_SYNC` takes from the word it wrote.
fn cancel_op(id: u32, sync_status: bool) -> Reply {
    if id >= max_timers() {
        return reply(status::INVALID, 0, now());
    }
    let was_unmasked = irq::mask();
    let now = now();
    ensure_room();
    let (old, new) = done_states(transition(id, |s| Some(s.cancelled())));
    submit(SubEntry {
        op: q::OP_CANCEL,
        id,
        gen: new.gen(),
        flags: ended_pending(old),
        deadline: 0,
        slack: 0,
        at: now,
        reserved: 0,
    });
    irq::restore(was_unmasked);
    let status = if sync_status {
        new.cancel_sync_status(percpu::index())
    } else {
        status::OK
    };
    reply(status, u64::from(old.pending()), now)
}

pub fn cancel(id: u32) -> Reply {
    cancel_op(id, false)
}

/// `CANCEL_SYNC` in queue mode: as `CANCEL`, except that a timer with no pending arming has nothing to
/// cancel, so its word is only read (no generation, no entry: the repeats of a guest waiting for `OK`
/// cost nothing, as docs/timer-abi.md asks; a `CANCEL` there would change nothing but the generation).
///
/// The word says `DEADLOCK` (a callback of the timer runs on this vCPU)
/// also while that expiry still waits in this vCPU's delivery ring, handed over but not yet taken:
/// its callback has not started. Outside callbacks the runtime then runs it, as the command's
/// caller would expect (`CANCEL_SYNC` answers `OK` once no callback runs): at once from unmasked main
/// code, which waits for it here and gets `OK`; masked main code (a lock held) cannot run callbacks
/// and gets `RUNNING` (repeat after unmasking, as for another vCPU's callback). A callback gets
/// `DEADLOCK`: the waiting one runs after it.
pub fn cancel_sync(id: u32) -> Reply {
    if id >= max_timers() {
        return reply(status::INVALID, 0, now());
    }
    let word = state(id);
    let mut reply = if word.pending() {
        cancel_op(id, true)
    } else {
        reply(word.cancel_sync_status(percpu::index()), 0, now())
    };
    let cpu = percpu::this();
    if reply.status != status::DEADLOCK
        || cpu.running.load(Ordering::Relaxed) == id
        || cpu.in_handler.load(Ordering::Relaxed)
    {
        return reply;
    }
    if irq::is_masked() {
        reply.status = status::RUNNING;
        return reply;
    }
    let me = percpu::index();
    let limit = reply.now.saturating_add(HANDOVER_LIMIT_NS);
    loop {
        let status = state(id).cancel_sync_status(me);
        if status != status::DEADLOCK {
            reply.status = status;
            return reply;
        }
        if delivery_waiting() {
            irq::run_handler_now();
        } else {
            // quietvm has swapped the word and not yet published the entry.
            assert!(
                now() < limit,
                "quietvm bug: timer {id}'s word says it runs on vCPU {me}, but nothing was delivered in 10 s"
            );
            arch::pause();
        }
    }
}

// ---- Delivery and the end of callbacks -------------------------------------------------------------------

/// Whether this vCPU's delivery ring holds entries (false outside queue mode).
pub fn delivery_waiting() -> bool {
    if !on() {
        return false;
    }
    let c = control();
    // SAFETY: as in `sub_indices`.
    unsafe { addr_of!((*c).dlv_head).read_volatile() != addr_of!((*c).dlv_tail).read_volatile() }
}

/// Takes the next expired timer from the delivery ring: its callback runs on this vCPU from its
/// hand-over. Panics on what quietvm cannot have written (its bug).
fn take() -> Option<Expired> {
    let c = control();
    let info = boot::info();
    // SAFETY: as in `sub_indices`; the entry is read after `dlv_head` (volatile reads in program
    // order, and x86 keeps loads in order), so it is the one quietvm wrote before publishing the
    // index; it is copied out before `dlv_tail` gives its slot back.
    unsafe {
        let head = addr_of!((*c).dlv_head).read_volatile();
        let tail = addr_of!((*c).dlv_tail).read_volatile();
        let len = q::ring_len(head, tail, DELIVERY_ENTRIES).unwrap_or_else(|| {
            panic!("quietvm bug: delivery ring dlv_head {head}, dlv_tail {tail} (ring of {DELIVERY_ENTRIES})")
        });
        if len == 0 {
            return None;
        }
        let e = ((page_base() + q::delivery_slot(tail)) as *const DeliveryEntry).read_volatile();
        assert!(
            e.id < info.max_timers && e.owner < info.vcpus,
            "quietvm bug: delivery entry {tail} names timer {} of owner {} (max_timers {}, vcpus {})",
            e.id,
            e.owner,
            info.max_timers,
            info.vcpus
        );
        addr_of_mut!((*c).dlv_tail).write_volatile(tail.wrapping_add(1));
        // The handshake of the doorbell: `dlv_tail` stored, then the next `dlv_head` loaded (quietvm
        // rings only if the guest had taken every earlier entry).
        fence(Ordering::SeqCst);
        Some(Expired {
            id: e.id,
            owner: e.owner,
            deadline: e.deadline,
            fired_at: e.fired_at,
            slack: e.slack,
        })
    }
}

/// Ends the callback of `id` on this vCPU: `RUNNING`, `HELD` and the vCPU off the word; `SYNC` if quietvm
/// holds an expiry for its end. `BAD_ACK` if the word says no callback of `id` runs here.
fn end_callback(id: u32) -> u32 {
    if id >= max_timers() {
        return status::BAD_ACK;
    }
    let cpu = percpu::index();
    match transition(id, |s| s.callback_ended(cpu)) {
        Update::Done(old, _) => {
            if old.held() {
                percpu::this().held_ends.fetch_add(1, Ordering::Relaxed);
                sync();
            }
            status::OK
        }
        _ => status::BAD_ACK,
    }
}

/// `ACK` in queue mode: `id` must name the callback this vCPU runs (`NONE`: none runs).
pub fn ack(id: u32) -> Reply {
    reply(end_running(id), 0, now())
}

fn end_running(id: u32) -> u32 {
    let running = percpu::this().running.load(Ordering::Relaxed);
    if id != running {
        return status::BAD_ACK;
    }
    if id == NONE {
        return status::OK;
    }
    end_callback(id)
}

/// `POP` in queue mode: ends callback `prev` (as `ack`), then takes the next expired timer from the
/// delivery ring, or answers `EMPTY`.
pub fn pop(prev: u32) -> (Reply, Option<Expired>) {
    let status = end_running(prev);
    if status != status::OK {
        return (reply(status, 0, now()), None);
    }
    match take() {
        Some(e) => (reply(status::OK, 0, now()), Some(e)),
        None => (reply(status::EMPTY, 0, now()), None),
    }
}

/// Halts this vCPU, called with its doorbell masked, and unmasks, which runs the handler for what
/// came. In queue mode through the idle port: one exit instead of the `hlt`'s trip through ring 0,
/// and its return is the doorbell: quietvm injects none for the work it returns for, so the handler
/// is run here (docs/timer-abi.md, "Halting in one exit"). A doorbell noted while masked is handled
/// first, without halting. Otherwise the ring-0 `hlt` path.
pub fn halt_then_unmask() {
    if !on() {
        crate::arch::unmask_and_halt();
        return;
    }
    let pc = percpu::this();
    if pc.irq_pending.load(Ordering::SeqCst) == 0 {
        crate::arch::outl(quietvm_abi::ports::IDLE_PORT, 0);
        pc.irq_pending.store(1, Ordering::SeqCst);
    }
    super::irq::unmask();
}
