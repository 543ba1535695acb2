//! The per-arming verification shared by all timer workloads.
//!
//! Every `ARM`, `CANCEL` and `CANCEL_SYNC` of a workload goes through the [`Book`], which records the
//! timer's outstanding armings and checks every callback against them:
//! - every arming fires at most once, never early (`exp_fired_at >= deadline`), for the deadline and
//!   owner it was armed with, and a pinned one on its owner;
//! - with `slack_pct=P` (0..=100, default 0) every arming asks for a slack of P% of its timer's period
//!   or timeout, and the slack quietvm applied (`exp_slack`) is the one asked for (pinned; at most
//!   `MAX_SLACK_NS`) or at least it (movable: the VM's minimum may raise it); a firing more than
//!   `WINDOW_TOLERANCE_NS` after `deadline + exp_slack` is counted (`late_beyond_window=` in the
//!   summary), not failed: lateness is the host's, not a broken promise of the ABI;
//! - an arming that a cancel reported as pending (value 1), or that a re-arm replaced, never fires;
//! - an arming that a cancel reported as not pending had already been handed over: it fires exactly once;
//! - no two callbacks of one timer run at once, and `CANCEL_SYNC` answers `OK` only once none runs.
//!
//! A timer can fire on another vCPU before its arming vCPU is back from `ARM`, so each timer's record is
//! behind a lock, taken with the doorbell masked around the command and its recording, and by the callback.

use crate::runtime::arena::{self, Zeroable};
use crate::runtime::device::{self, status, Expired, Reply, PINNED};
use crate::runtime::sync::{Published, SpinLock};
use crate::runtime::{boot, lapic, percpu, vm};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use quietvm_abi::timer::{MAX_SLACK_NS, WINDOW_TOLERANCE_NS};

/// One arming of a timer; deadline 0 means none (deadlines are always after `now` >= 0).
#[derive(Clone, Copy, Default)]
struct Arming {
    deadline: u64,
    owner: u32,
    flags: u32,
    /// The slack asked for.
    slack: u64,
    /// The owner's `offline_count` when it armed: a pinned timer may fire on another vCPU only if the
    /// owner has gone offline since (quietvm hands a leaving vCPU's timers over).
    owner_offlines: u64,
}

impl Arming {
    fn is_some(&self) -> bool {
        self.deadline != 0
    }
}

#[derive(Default)]
struct Record {
    /// The arming the device holds as pending, as far as we know.
    pending: Arming,
    /// An arming the device has handed over to a callback that has not recorded it yet.
    in_flight: Arming,
}

struct Slot {
    record: SpinLock<Record>,
    in_callback: AtomicBool,
}

// SAFETY: all-zero is an unlocked, empty record and a cleared flag.
unsafe impl Zeroable for Record {}
// SAFETY: as above.
unsafe impl Zeroable for Slot {}

/// Counters of one vCPU (of what it did, whichever timers).
#[derive(Default)]
pub struct Counters {
    /// `ARM`s that armed (status OK).
    pub armed: AtomicU64,
    /// Of those, re-arms that replaced a pending arming (value 1).
    pub rearmed: AtomicU64,
    /// `ARM`s answered `PAST`.
    pub past: AtomicU64,
    /// Cancels that removed a pending arming (value 1).
    pub cancelled: AtomicU64,
    /// Cancels too late: the arming had been handed over (value 0 while one was outstanding).
    pub cancel_late: AtomicU64,
    /// Callbacks run on this vCPU, and how many of them for another vCPU's timer.
    pub fired: AtomicU64,
    pub fired_remote: AtomicU64,
    /// Callbacks handed over more than `WINDOW_TOLERANCE_NS` after `deadline + exp_slack`.
    pub late_beyond_window: AtomicU64,
}

// SAFETY: atomics only.
unsafe impl Zeroable for Counters {}

/// Sums of the counters over all vCPUs.
#[derive(Clone, Copy, Default, Debug)]
pub struct Totals {
    pub armed: u64,
    pub rearmed: u64,
    pub past: u64,
    pub cancelled: u64,
    pub cancel_late: u64,
    pub fired: u64,
    pub fired_remote: u64,
    pub late_beyond_window: u64,
}

pub struct Book {
    slots: &'static [Slot],
    counters: &'static [Counters],
    /// `slack_pct`: every arming's slack, in percent of its period or timeout.
    slack_pct: u64,
}

static BOOK: Published<Book> = Published::new();
static ERRORS: AtomicU64 = AtomicU64::new(0);
static WORKLOAD: Published<&'static str> = Published::new();

/// Errors printed in full; later ones are only counted (every console byte is an exit).
const ERRORS_PRINTED: u64 = 10;

/// The first failure's text, for the workload's summary line.
static FIRST_ERROR: SpinLock<TextBuf> = SpinLock::new(TextBuf {
    bytes: [0; 160],
    len: 0,
});

struct TextBuf {
    bytes: [u8; 160],
    len: usize,
}

impl fmt::Write for TextBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// Records a failed check: prints it (the first few) and counts it. Called through [`fail!`].
pub fn record_failure(args: fmt::Arguments) {
    let n = ERRORS.fetch_add(1, Ordering::Relaxed);
    if n == 0 {
        let _ = fmt::Write::write_fmt(&mut *FIRST_ERROR.lock(), args);
    }
    if n < ERRORS_PRINTED {
        let name = WORKLOAD.try_get().copied().unwrap_or("guest");
        println!("{}: error on vCPU {}: {}", name, percpu::index(), args);
    }
}

/// `checks::fail!("...", ...)`: records a failed check, formatted as `println!` does.
macro_rules! fail {
    ($($arg:tt)*) => { $crate::checks::record_failure(format_args!($($arg)*)) };
}
pub(crate) use fail;

pub fn errors() -> u64 {
    ERRORS.load(Ordering::Relaxed)
}

/// Calls `f` with the first failure's text (empty if none).
pub fn with_first_error<R>(f: impl FnOnce(&str) -> R) -> R {
    let buf = FIRST_ERROR.lock();
    f(core::str::from_utf8(&buf.bytes[..buf.len]).unwrap_or("(not UTF-8)"))
}

/// Names the workload in error messages (every vCPU may call it).
pub fn set_workload_name(name: &'static &'static str) {
    WORKLOAD.publish(name);
}

/// Creates the book (on one vCPU; the others use [`book`], which waits for it).
pub fn create_book() -> &'static Book {
    let info = boot::info();
    let slots = arena::alloc::<Slot>(info.max_timers as usize);
    let counters = arena::alloc::<Counters>(info.vcpus as usize);
    let slack_pct = vm::arg_u64("slack_pct", 0);
    if slack_pct > 100 {
        vm::usage_error(format_args!(
            "guest: slack_pct={} is not a percentage (0..=100)",
            slack_pct
        ));
    }
    let book = arena::leak(Book {
        slots,
        counters,
        slack_pct,
    });
    BOOK.publish(book);
    book
}

pub fn book() -> &'static Book {
    BOOK.get()
}

impl Book {
    fn slot(&self, id: u32) -> &'static Slot {
        let slots: &'static [Slot] = self.slots;
        &slots[id as usize]
    }

    fn mine(&self) -> &Counters {
        &self.counters[percpu::index() as usize]
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in self.counters {
            t.armed += c.armed.load(Ordering::Relaxed);
            t.rearmed += c.rearmed.load(Ordering::Relaxed);
            t.past += c.past.load(Ordering::Relaxed);
            t.cancelled += c.cancelled.load(Ordering::Relaxed);
            t.cancel_late += c.cancel_late.load(Ordering::Relaxed);
            t.fired += c.fired.load(Ordering::Relaxed);
            t.fired_remote += c.fired_remote.load(Ordering::Relaxed);
            t.late_beyond_window += c.late_beyond_window.load(Ordering::Relaxed);
        }
        t
    }

    /// The slack to ask for a timer of this period or timeout (ns): `slack_pct` of it.
    pub fn slack_for(&self, interval: u64) -> u64 {
        // u128: no overflow, whatever the interval.
        (u128::from(interval) * u128::from(self.slack_pct) / 100) as u64
    }

    /// `ARM` at `deadline` with the slack for a timer of period or timeout `interval` (ns), recorded.
    /// Status OK or PAST; anything else is a failed check.
    pub fn arm(&self, id: u32, flags: u32, deadline: u64, interval: u64) -> Reply {
        let cpu = percpu::index();
        let slack = self.slack_for(interval);
        let mut record = self.slot(id).record.lock();
        let reply = device::arm_with_slack(id, flags, deadline, slack);
        match reply.status {
            status::OK => {
                self.mine().armed.fetch_add(1, Ordering::Relaxed);
                if reply.value == 1 {
                    if !record.pending.is_some() {
                        fail!(
                            "ARM of timer {} answered re-arm (value 1), but no arming was pending",
                            id
                        );
                    }
                    self.mine().rearmed.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.handed_over(id, &mut record);
                }
                record.pending = Arming {
                    deadline,
                    owner: cpu,
                    flags,
                    slack,
                    owner_offlines: percpu::of(cpu).offline_count.load(Ordering::SeqCst),
                };
            }
            status::PAST => {
                self.mine().past.fetch_add(1, Ordering::Relaxed);
                if deadline > reply.now {
                    fail!(
                        "ARM of timer {} at {} answered PAST, but now was {}",
                        id,
                        deadline,
                        reply.now
                    );
                }
            }
            s => fail!("ARM of timer {} answered {}", id, status::name(s)),
        }
        reply
    }

    /// The device says the arming we hold as pending is not pending any more: it was handed over, and
    /// its callback (maybe waiting for this lock) will record it.
    fn handed_over(&self, id: u32, record: &mut Record) {
        if record.pending.is_some() {
            if record.in_flight.is_some() {
                fail!(
                    "timer {}: two armings handed over, neither callback has run",
                    id
                );
            }
            record.in_flight = record.pending;
            record.pending = Arming::default();
        }
    }

    /// Records a cancel's `value`: 1 = the pending arming is gone, 0 = nothing was pending.
    fn cancelled(&self, id: u32, record: &mut Record, value: u64) -> bool {
        if value == 1 {
            if !record.pending.is_some() {
                fail!(
                    "cancel of timer {} answered 1, but no arming was pending",
                    id
                );
            }
            record.pending = Arming::default();
            self.mine().cancelled.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            if record.pending.is_some() {
                self.mine().cancel_late.fetch_add(1, Ordering::Relaxed);
            }
            self.handed_over(id, record);
            false
        }
    }

    /// `CANCEL`, recorded; true if it removed a pending arming (which must then never fire).
    pub fn cancel(&self, id: u32) -> bool {
        let mut record = self.slot(id).record.lock();
        let reply = device::cancel(id);
        if reply.status != status::OK {
            fail!(
                "CANCEL of timer {} answered {}",
                id,
                status::name(reply.status)
            );
            return false;
        }
        self.cancelled(id, &mut record, reply.value)
    }

    /// `CANCEL_SYNC`, repeated while `RUNNING`; true if some attempt removed a pending arming. On return
    /// the timer is not pending and no callback of it runs. Returns the first attempt's reply too.
    pub fn cancel_sync(&self, id: u32) -> (bool, Reply) {
        let mut removed = false;
        let mut first = None;
        loop {
            let mut record = self.slot(id).record.lock();
            let reply = device::cancel_sync(id);
            first.get_or_insert(reply);
            match reply.status {
                status::OK | status::RUNNING | status::DEADLOCK => {
                    removed |= self.cancelled(id, &mut record, reply.value);
                }
                s => {
                    fail!("CANCEL_SYNC of timer {} answered {}", id, status::name(s));
                    break;
                }
            }
            match reply.status {
                status::OK => {
                    if record.in_flight.is_some() {
                        fail!("CANCEL_SYNC of timer {} answered OK before the callback of a handed-over arming ran", id);
                    }
                    break;
                }
                status::DEADLOCK => break,
                _ => {}
            }
            drop(record); // let the running callback take it
            crate::arch::pause();
        }
        (removed, first.expect("loop ran once"))
    }

    /// Checks and records a callback; keep the guard for the whole callback.
    pub fn enter(&self, expired: &Expired) -> CallbackGuard {
        let cpu = percpu::index();
        let id = expired.id;
        let slot = self.slot(id);
        if slot.in_callback.swap(true, Ordering::Acquire) {
            fail!("timer {}: two callbacks at once", id);
        }
        {
            let mut record = slot.record.lock();
            let arming = if record.in_flight.is_some() {
                core::mem::take(&mut record.in_flight)
            } else {
                core::mem::take(&mut record.pending)
            };
            if !arming.is_some() {
                fail!(
                    "timer {} fired (deadline {}) with no arming outstanding: fired twice, or after a cancel or re-arm said it would not",
                    id, expired.deadline
                );
            } else {
                if arming.deadline != expired.deadline {
                    fail!(
                        "timer {} fired for deadline {}, but was armed for {}",
                        id,
                        expired.deadline,
                        arming.deadline
                    );
                }
                if arming.owner != expired.owner {
                    fail!(
                        "timer {} fired with owner {}, but was armed by vCPU {}",
                        id,
                        expired.owner,
                        arming.owner
                    );
                }
                let owner_went_offline = percpu::of(arming.owner)
                    .offline_count
                    .load(Ordering::SeqCst)
                    != arming.owner_offlines;
                self.check_slack(id, &arming, expired);
                if arming.flags == PINNED && cpu != arming.owner && !owner_went_offline {
                    fail!(
                        "pinned timer {} of vCPU {} fired on vCPU {}",
                        id,
                        arming.owner,
                        cpu
                    );
                }
            }
        }
        if expired.owner >= boot::info().vcpus {
            fail!(
                "timer {} fired with owner {}, not a vCPU",
                id,
                expired.owner
            );
        }
        if expired.fired_at < expired.deadline {
            fail!(
                "timer {} fired early: at {}, deadline {}",
                id,
                expired.fired_at,
                expired.deadline
            );
        }
        let mine = self.mine();
        let window_end = expired.deadline.saturating_add(expired.slack);
        if expired.fired_at.saturating_sub(window_end) > WINDOW_TOLERANCE_NS {
            mine.late_beyond_window.fetch_add(1, Ordering::Relaxed);
        }
        mine.fired.fetch_add(1, Ordering::Relaxed);
        if cpu != expired.owner {
            mine.fired_remote.fetch_add(1, Ordering::Relaxed);
        }
        CallbackGuard { slot }
    }

    /// The applied slack (`exp_slack`) against the one asked for (docs/timer-abi.md, "Timer windows").
    fn check_slack(&self, id: u32, arming: &Arming, expired: &Expired) {
        let asked = arming.slack.min(MAX_SLACK_NS);
        let ok = if lapic::active() {
            expired.slack == 0 // kvm-lapic has no slack
        } else if arming.flags == PINNED {
            expired.slack == asked
        } else {
            (asked..=MAX_SLACK_NS).contains(&expired.slack)
        };
        if !ok {
            fail!(
                "timer {} (flags {}) asked for slack {} ns, quietvm applied {} ns",
                id,
                arming.flags,
                arming.slack,
                expired.slack
            );
        }
    }

    /// True if the timer has an arming that has not fired (pending or handed over).
    pub fn outstanding(&self, id: u32) -> bool {
        let record = self.slot(id).record.lock();
        record.pending.is_some() || record.in_flight.is_some()
    }

    /// After all timers stopped: each of `ids` has nothing outstanding and no callback running, and every
    /// arming was resolved exactly one way (fired, cancelled or replaced).
    pub fn check_quiescent(&self, ids: core::ops::Range<u32>) {
        for id in ids {
            let slot = self.slot(id);
            let record = slot.record.lock();
            if record.pending.is_some() {
                fail!(
                    "timer {} still pending (deadline {}) after it was stopped or due",
                    id,
                    record.pending.deadline
                );
            }
            if record.in_flight.is_some() {
                fail!(
                    "timer {} was handed over (deadline {}) but its callback never ran",
                    id,
                    record.in_flight.deadline
                );
            }
            if slot.in_callback.load(Ordering::Relaxed) {
                fail!("timer {}: a callback still runs after it was stopped", id);
            }
        }
        let t = self.totals();
        if t.armed != t.fired + t.cancelled + t.rearmed {
            fail!(
                "armings do not add up: armed {} != fired {} + cancelled {} + replaced {}",
                t.armed,
                t.fired,
                t.cancelled,
                t.rearmed
            );
        }
    }

    /// "armed=.. fired=.. cancelled=.. rearmed=.. past=.. remote=.. per-vCPU a/f/c: 0:x/y/z ..."
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

pub struct Summary<'a>(&'a Book);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0.totals();
        write!(
            f,
            "armed={} fired={} cancelled={} rearmed={} past={} fired_remote={} slack_pct={} late_beyond_window={} per-vCPU armed/fired/cancelled:",
            t.armed,
            t.fired,
            t.cancelled,
            t.rearmed,
            t.past,
            t.fired_remote,
            self.0.slack_pct,
            t.late_beyond_window
        )?;
        for (cpu, c) in self.0.counters.iter().enumerate() {
            write!(
                f,
                " {}:{}/{}/{}",
                cpu,
                c.armed.load(Ordering::Relaxed),
                c.fired.load(Ordering::Relaxed),
                c.cancelled.load(Ordering::Relaxed)
            )?;
        }
        Ok(())
    }
}

/// Held for the whole callback: clears the timer's in-callback flag when dropped.
pub struct CallbackGuard {
    slot: &'static Slot,
}

impl Drop for CallbackGuard {
    fn drop(&mut self) {
        self.slot.in_callback.store(false, Ordering::Release);
    }
}
